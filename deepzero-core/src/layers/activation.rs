//! Element-wise activations.

use super::{map_act, zip_apply, Base, CandleCtx, HostParams, Layer, NodeCache, NodeGrads};
use crate::error::Result;
use crate::fast::kernels::Act;
use crate::layout::ParamLayout;
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

/// max(x, 0).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Relu;

/// tanh(x).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tanh;

impl Layer for Relu {
    fn shape(&self, _name: &str, ins: &[&[usize]], _layout: &ParamLayout) -> Result<Vec<usize>> {
        Ok(ins[0].to_vec())
    }
    fn forward(&self, ins: &[&Tensor], _ctx: &mut CandleCtx) -> Result<Tensor> {
        Ok(ins[0].relu()?)
    }
    fn forward_fast(&self, ins: &[&Act], _params: HostParams) -> (Act, NodeCache) {
        (map_act(ins[0], |v| v.max(0.0)), None)
    }
    fn backward_fast(&self, base: &Base, dy: Act, wanted: &[bool]) -> NodeGrads {
        // The derivative is taken as 1 at 0, as candle does.
        let mut dx = dy;
        zip_apply(
            &mut dx,
            &base.input(0).data,
            |d, x| if x >= 0.0 { d } else { 0.0 },
        );
        NodeGrads {
            inputs: vec![wanted[0].then_some(dx)],
            params: Vec::new(),
        }
    }
    fn per_channel(&self, base: &Base, c: usize, d: &[f32]) -> Option<(usize, Vec<f32>)> {
        let mut q = vec![0.0; d.len()];
        relu_delta(base.input(0).plane(c), d, &mut q);
        Some((c, q))
    }
    fn per_channel_into(&self, base: &Base, c: usize, d: &[f32], out: &mut Act) -> Option<usize> {
        relu_delta(base.input(0).plane(c), d, out.plane_mut(c));
        Some(c)
    }
}

impl Layer for Tanh {
    fn shape(&self, _name: &str, ins: &[&[usize]], _layout: &ParamLayout) -> Result<Vec<usize>> {
        Ok(ins[0].to_vec())
    }
    fn forward(&self, ins: &[&Tensor], _ctx: &mut CandleCtx) -> Result<Tensor> {
        Ok(ins[0].tanh()?)
    }
    fn forward_fast(&self, ins: &[&Act], _params: HostParams) -> (Act, NodeCache) {
        let mut out = ins[0].clone();
        crate::fast::kernels::tanh_inplace(&mut out.data);
        (out, None)
    }
    fn backward_fast(&self, base: &Base, dy: Act, wanted: &[bool]) -> NodeGrads {
        let mut dx = dy;
        zip_apply(&mut dx, &base.out.data, |d, y| d * (1.0 - y * y));
        NodeGrads {
            inputs: vec![wanted[0].then_some(dx)],
            params: Vec::new(),
        }
    }
    fn per_channel(&self, base: &Base, c: usize, d: &[f32]) -> Option<(usize, Vec<f32>)> {
        Some((c, tanh_delta(base.input(0).plane(c), d)))
    }
}

/// ReLU output change, exact where the sign does not flip.
fn relu_delta(x: &[f32], d: &[f32], out: &mut [f32]) {
    for ((o, &xv), &dv) in out.iter_mut().zip(x).zip(d) {
        let new = xv + dv;
        *o = if xv > 0.0 && new > 0.0 {
            dv
        } else {
            new.max(0.0) - xv.max(0.0)
        };
    }
}

/// tanh output change `tanh(x + Δ) − tanh(x) = (1 − t²)·tanh Δ / (1 + t·tanh Δ)` with
/// `t = tanh x`, in f64: the rounding stays relative to Δ, not to the activation.
fn tanh_delta(x: &[f32], d: &[f32]) -> Vec<f32> {
    x.iter()
        .zip(d)
        .map(|(&xv, &dv)| {
            let t = (xv as f64).tanh();
            let td = (dv as f64).tanh();
            ((1.0 - t * t) * td / (1.0 + t * td)) as f32
        })
        .collect()
}
