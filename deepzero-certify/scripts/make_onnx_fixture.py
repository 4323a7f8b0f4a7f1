#!/usr/bin/env python3
"""Write the ONNX test fixtures of deepzero-certify (run once; the files are committed).

    pip install onnx && python3 scripts/make_onnx_fixture.py

Graph: x[N,3,4,4] -> Conv(2 filters 3x3, pad 1, bias) -> Relu -> Flatten -> Gemm(32 -> 3).
Weights follow closed formulas so that tests/onnx.rs recomputes the logits in Rust:
  conv_w[i] = 0.3 sin(1 + i)   (flat OIHW index i), conv_b[j] = 0.1 cos(j)
  fc_w[i]   = 0.2 sin(2 + 0.5 i) (flat [3, 32] index i), fc_b[k] = 0.05 k
classifier_dyn.onnx has a symbolic batch dimension "N"; classifier_b2.onnx fixes N = 2.
"""
import math
import os

import onnx
from onnx import TensorProto, helper

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")


def graph(batch):
    conv_w = [0.3 * math.sin(1 + i) for i in range(2 * 3 * 3 * 3)]
    conv_b = [0.1 * math.cos(j) for j in range(2)]
    fc_w = [0.2 * math.sin(2 + 0.5 * i) for i in range(3 * 32)]
    fc_b = [0.05 * k for k in range(3)]
    inits = [
        helper.make_tensor("conv_w", TensorProto.FLOAT, [2, 3, 3, 3], conv_w),
        helper.make_tensor("conv_b", TensorProto.FLOAT, [2], conv_b),
        helper.make_tensor("fc_w", TensorProto.FLOAT, [3, 32], fc_w),
        helper.make_tensor("fc_b", TensorProto.FLOAT, [3], fc_b),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "conv_w", "conv_b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["logits"], transB=1),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 4, 4])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 3])
    g = helper.make_graph(nodes, "deepzero_certify_fixture", [x], [y], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


os.makedirs(OUT, exist_ok=True)
onnx.save(graph("N"), os.path.join(OUT, "classifier_dyn.onnx"))
onnx.save(graph(2), os.path.join(OUT, "classifier_b2.onnx"))
