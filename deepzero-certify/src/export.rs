//! Export of a [`ModelClassifier`] to ONNX, so that the same network can be queried as
//! `run:DIR`, `onnx:FILE` or through another runtime.
//!
//! The graph takes pixels `[N, C, H, W]` (f32, symbolic batch `N`) in [0, 1] plus noise, exactly
//! what the black box receives; the per-channel normalisation `(x − mean) / std` is its first
//! two nodes, then one ONNX node per layer of the deepzero graph (opset 13), batch norm with the
//! running statistics (eval mode). Its output `logits` is `[N, K]`.
//!
//! Every layer kind of a classifier exports: linear (`Gemm`), convolution with zero padding
//! (`Conv`), batch norm, ReLU, tanh, max and average pooling, global average pooling
//! (`GlobalAveragePool` + `Flatten`), flatten, add, sub, and the option-A shortcut (`Slice` with
//! step 2 + `Pad` of the channels). Circular padding has no opset-13 equivalent and is refused.

use std::path::Path;

use candle_core::DType;
use deepzero_core::layers::Op;
use deepzero_core::model::{Padding, BN_EPS};
use prost::Message;
use tract_onnx::pb;

use crate::error::{Error, Result};
use crate::model::ModelClassifier;

/// The ONNX opset the export targets.
pub const OPSET: i64 = 13;

/// The name of the exported graph's input.
pub const INPUT_NAME: &str = "pixels";

/// The name of the exported graph's output.
pub const OUTPUT_NAME: &str = "logits";

/// The serialised ONNX model of `classifier` (see the [module docs](self)).
pub fn onnx_bytes(classifier: &ModelClassifier) -> Result<Vec<u8>> {
    let graph = Exporter::new(classifier)?.graph()?;
    let model = pb::ModelProto {
        ir_version: 8,
        opset_import: vec![pb::OperatorSetIdProto {
            domain: String::new(),
            version: OPSET,
        }],
        producer_name: "deepzero".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        graph: Some(graph),
        ..Default::default()
    };
    Ok(model.encode_to_vec())
}

/// Writes the ONNX model of `classifier` to `path` (through a temporary file and a rename).
pub fn write_onnx(classifier: &ModelClassifier, path: &Path) -> Result<()> {
    let bytes = onnx_bytes(classifier)?;
    let tmp = path.with_extension("onnx.tmp");
    let io = |e: std::io::Error| Error::Config(format!("cannot write {}: {e}", path.display()));
    std::fs::write(&tmp, &bytes).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)?;
    Ok(())
}

struct Exporter<'a> {
    classifier: &'a ModelClassifier,
    params: Vec<f32>,
    nodes: Vec<pb::NodeProto>,
    initializers: Vec<pb::TensorProto>,
}

impl<'a> Exporter<'a> {
    fn new(classifier: &'a ModelClassifier) -> Result<Self> {
        let params = classifier
            .params()
            .to_dtype(DType::F32)?
            .to_device(&candle_core::Device::Cpu)?
            .to_vec1::<f32>()?;
        Ok(Self {
            classifier,
            params,
            nodes: Vec::new(),
            initializers: Vec::new(),
        })
    }

    fn constant_f32(&mut self, name: String, dims: &[usize], values: Vec<f32>) -> String {
        self.initializers.push(pb::TensorProto {
            name: name.clone(),
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: pb::tensor_proto::DataType::Float as i32,
            float_data: values,
            ..Default::default()
        });
        name
    }

    fn constant_i64(&mut self, name: String, values: Vec<i64>) -> String {
        self.initializers.push(pb::TensorProto {
            name: name.clone(),
            dims: vec![values.len() as i64],
            data_type: pb::tensor_proto::DataType::Int64 as i32,
            int64_data: values,
            ..Default::default()
        });
        name
    }

    /// The layout entry `index` as an initializer named after the parameter.
    fn param(&mut self, index: usize) -> String {
        let entry = &self.classifier.model().layout.entries[index];
        let (name, shape) = (entry.name.clone(), entry.shape.clone());
        let values = self.params[entry.range()].to_vec();
        self.constant_f32(name, &shape, values)
    }

    fn node(
        &mut self,
        op: &str,
        name: &str,
        inputs: Vec<String>,
        attributes: Vec<pb::AttributeProto>,
    ) -> String {
        let output = format!("{name}:out");
        self.nodes.push(pb::NodeProto {
            input: inputs,
            output: vec![output.clone()],
            name: name.to_string(),
            op_type: op.to_string(),
            attribute: attributes,
            ..Default::default()
        });
        output
    }

    /// A `k × k` pooling with stride `k` (deepzero's pooling layers).
    fn pool(&mut self, op: &str, name: &str, inputs: Vec<String>, k: usize) -> String {
        let k = k as i64;
        let window = vec![
            ints("kernel_shape", vec![k, k]),
            ints("strides", vec![k, k]),
        ];
        self.node(op, name, inputs, window)
    }

    fn graph(mut self) -> Result<pb::GraphProto> {
        let model = self.classifier.model();
        let [c, h, w] = model.input_shape;
        let Some(classes) = model.num_classes() else {
            return Err(Error::Config(format!(
                "model {} has an image-shaped output; only classifiers export to ONNX",
                model.name
            )));
        };
        let norm = self.classifier.normalization().clone();
        let mean = self.constant_f32("input.mean".into(), &[1, c, 1, 1], norm.mean.clone());
        let std = self.constant_f32("input.std".into(), &[1, c, 1, 1], norm.std.clone());
        let centred = self.node("Sub", "input.centre", vec![INPUT_NAME.into(), mean], vec![]);
        let normalised = self.node("Div", "input.scale", vec![centred, std], vec![]);
        // Register r holds the ONNX value of register r of the deepzero graph (0 = input).
        let mut registers = vec![normalised];
        let bn = self.classifier.bn_state().clone();
        for node in &model.nodes {
            let ins: Vec<String> = node.inputs.iter().map(|&r| registers[r].clone()).collect();
            let name = node.name.as_str();
            let out = match &node.op {
                Op::Linear(l) => {
                    let mut inputs = vec![ins[0].clone(), self.param(l.weight)];
                    if let Some(b) = l.bias {
                        inputs.push(self.param(b));
                    }
                    self.node("Gemm", name, inputs, vec![int("transB", 1)])
                }
                Op::Conv2d(conv) => {
                    if conv.padding_mode == Padding::Circular {
                        return Err(Error::Config(format!(
                            "layer {name} of model {} pads circularly, which ONNX opset {OPSET} \
                             cannot express; only zero-padded convolutions export",
                            model.name
                        )));
                    }
                    let weight = self.param(conv.weight);
                    let k = model.layout.entries[conv.weight].shape[2] as i64;
                    let mut inputs = vec![ins[0].clone(), weight];
                    if let Some(b) = conv.bias {
                        inputs.push(self.param(b));
                    }
                    let (s, p) = (conv.stride as i64, conv.padding as i64);
                    self.node(
                        "Conv",
                        name,
                        inputs,
                        vec![
                            ints("kernel_shape", vec![k, k]),
                            ints("strides", vec![s, s]),
                            ints("pads", vec![p, p, p, p]),
                        ],
                    )
                }
                Op::BatchNorm(b) => {
                    let scale = self.param(b.scale);
                    let shift = self.param(b.shift);
                    let channels = bn.mean[b.stats].len();
                    let to_f32 = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
                    let mean = self.constant_f32(
                        format!("{name}.running_mean"),
                        &[channels],
                        to_f32(&bn.mean[b.stats]),
                    );
                    let var = self.constant_f32(
                        format!("{name}.running_var"),
                        &[channels],
                        to_f32(&bn.var[b.stats]),
                    );
                    self.node(
                        "BatchNormalization",
                        name,
                        vec![ins[0].clone(), scale, shift, mean, var],
                        vec![float("epsilon", BN_EPS as f32)],
                    )
                }
                Op::Relu(_) => self.node("Relu", name, ins, vec![]),
                Op::Tanh(_) => self.node("Tanh", name, ins, vec![]),
                Op::MaxPool(p) => self.pool("MaxPool", name, ins, p.0),
                Op::AvgPool(p) => self.pool("AveragePool", name, ins, p.0),
                Op::GlobalAvgPool(_) => {
                    let pooled =
                        self.node("GlobalAveragePool", &format!("{name}.pool"), ins, vec![]);
                    self.node("Flatten", name, vec![pooled], vec![int("axis", 1)])
                }
                Op::Flatten(_) => self.node("Flatten", name, ins, vec![int("axis", 1)]),
                Op::Add(_) => self.node("Add", name, ins, vec![]),
                Op::Sub(_) => self.node("Sub", name, ins, vec![]),
                Op::ShortcutA(s) => {
                    let starts = self.constant_i64(format!("{name}.starts"), vec![0, 0]);
                    let ends = self.constant_i64(format!("{name}.ends"), vec![i64::MAX, i64::MAX]);
                    let axes = self.constant_i64(format!("{name}.axes"), vec![2, 3]);
                    let steps = self.constant_i64(format!("{name}.steps"), vec![2, 2]);
                    let sub = self.node(
                        "Slice",
                        &format!("{name}.subsample"),
                        vec![ins[0].clone(), starts, ends, axes, steps],
                        vec![],
                    );
                    let p = s.pad as i64;
                    let pads =
                        self.constant_i64(format!("{name}.pads"), vec![0, p, 0, 0, 0, p, 0, 0]);
                    self.node("Pad", name, vec![sub, pads], vec![])
                }
            };
            registers.push(out);
        }
        let last = registers.last().cloned().unwrap_or_default();
        self.nodes.push(pb::NodeProto {
            input: vec![last],
            output: vec![OUTPUT_NAME.into()],
            name: "output".into(),
            op_type: "Identity".into(),
            ..Default::default()
        });
        let batch = || pb::tensor_shape_proto::Dimension {
            value: Some(pb::tensor_shape_proto::dimension::Value::DimParam(
                "N".into(),
            )),
            ..Default::default()
        };
        let fixed = |d: usize| pb::tensor_shape_proto::Dimension {
            value: Some(pb::tensor_shape_proto::dimension::Value::DimValue(d as i64)),
            ..Default::default()
        };
        let value_info =
            |name: &str, dims: Vec<pb::tensor_shape_proto::Dimension>| pb::ValueInfoProto {
                name: name.into(),
                r#type: Some(pb::TypeProto {
                    value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                        elem_type: pb::tensor_proto::DataType::Float as i32,
                        shape: Some(pb::TensorShapeProto { dim: dims }),
                    })),
                    ..Default::default()
                }),
                ..Default::default()
            };
        Ok(pb::GraphProto {
            node: self.nodes,
            name: model.name.clone(),
            initializer: self.initializers,
            input: vec![value_info(
                INPUT_NAME,
                vec![batch(), fixed(c), fixed(h), fixed(w)],
            )],
            output: vec![value_info(OUTPUT_NAME, vec![batch(), fixed(classes)])],
            ..Default::default()
        })
    }
}

fn int(name: &str, value: i64) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        r#type: pb::attribute_proto::AttributeType::Int as i32,
        i: value,
        ..Default::default()
    }
}

fn ints(name: &str, values: Vec<i64>) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        r#type: pb::attribute_proto::AttributeType::Ints as i32,
        ints: values,
        ..Default::default()
    }
}

fn float(name: &str, value: f32) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        r#type: pb::attribute_proto::AttributeType::Float as i32,
        f: value,
        ..Default::default()
    }
}
