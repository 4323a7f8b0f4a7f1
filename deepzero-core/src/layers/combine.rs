//! Nodes that combine or reshape registers: sum, difference, the option-A shortcut.

use super::{
    change_to_full, image_shape, shape_error, zip_map_act, Base, CandleCtx, HostParams, Layer,
    NodeCache, NodeGrads, Shapes, Spread,
};
use crate::error::Result;
use crate::fast::kernels::{self, Act};
use crate::fast::Change;
use crate::layout::ParamLayout;
use candle_core::Tensor;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// Sum of the two inputs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Add;

/// First input minus the second (`x − net(x)` for a residual to the model input).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sub;

fn same_shapes(name: &str, ins: &[&[usize]]) -> Result<Vec<usize>> {
    if ins[0] != ins[1] {
        return Err(shape_error(
            name,
            format!("inputs differ in shape: {:?} and {:?}", ins[0], ins[1]),
        ));
    }
    Ok(ins[0].to_vec())
}

/// `a + sign·b` for two changes.
fn combine(base: &Base, ins: &[&Change], sign: f32) -> Change {
    let neg = |d: &[f32]| -> Vec<f32> { d.iter().map(|v| sign * v).collect() };
    match (ins[0], ins[1]) {
        (Change::Same, Change::Same) => Change::Same,
        (Change::Chan(c, d), Change::Same) => Change::Chan(*c, d.clone()),
        (Change::Same, Change::Chan(c, d)) => Change::Chan(*c, neg(d)),
        (Change::Chan(c0, d0), Change::Chan(c1, d1)) if c0 == c1 => {
            Change::Chan(*c0, d0.iter().zip(d1).map(|(a, b)| a + sign * b).collect())
        }
        (a, b) => {
            let mut out = change_to_full(a, base.input(0)).into_owned();
            let b = change_to_full(b, base.input(1));
            for (u, v) in out.data.iter_mut().zip(&b.data) {
                *u += sign * v;
            }
            Change::Full(out)
        }
    }
}

fn combine_cost(ins: &[Spread], cost: f64, shapes: &Shapes) -> (Spread, f64) {
    if ins.contains(&Spread::Full) || ins.iter().filter(|&&s| s == Spread::One).count() == 2 {
        (Spread::Full, cost)
    } else {
        (Spread::One, cost / shapes.out[0].max(1) as f64)
    }
}

/// Backward of `a + sign·b`: `dy` and `sign·dy`.
fn combine_backward(dy: Act, wanted: &[bool], sign: f32) -> NodeGrads {
    let second = wanted[1].then(|| {
        let mut d = dy.clone();
        if sign != 1.0 {
            d.data.iter_mut().for_each(|v| *v *= sign);
        }
        d
    });
    NodeGrads {
        inputs: vec![wanted[0].then_some(dy), second],
        params: Vec::new(),
    }
}

fn combine_fast(ins: &[&Act], sign: f32) -> Act {
    zip_map_act(ins[0], ins[1], |a, b| a + sign * b)
}

impl Layer for Add {
    fn arity(&self) -> usize {
        2
    }
    fn shape(&self, name: &str, ins: &[&[usize]], _layout: &ParamLayout) -> Result<Vec<usize>> {
        same_shapes(name, ins)
    }
    fn forward(&self, ins: &[&Tensor], _ctx: &mut CandleCtx) -> Result<Tensor> {
        Ok((ins[0] + ins[1])?)
    }
    fn forward_fast(&self, ins: &[&Act], _params: HostParams) -> (Act, NodeCache) {
        (combine_fast(ins, 1.0), None)
    }
    fn backward_fast(&self, _base: &Base, dy: Act, wanted: &[bool]) -> NodeGrads {
        combine_backward(dy, wanted, 1.0)
    }
    fn propagate(&self, base: &Base, ins: &[&Change]) -> Change {
        combine(base, ins, 1.0)
    }
    fn propagate_cost(
        &self,
        ins: &[Spread],
        cost: f64,
        shapes: &Shapes,
        _layout: &ParamLayout,
    ) -> (Spread, f64) {
        combine_cost(ins, cost, shapes)
    }
}

impl Layer for Sub {
    fn arity(&self) -> usize {
        2
    }
    fn shape(&self, name: &str, ins: &[&[usize]], _layout: &ParamLayout) -> Result<Vec<usize>> {
        same_shapes(name, ins)
    }
    fn forward(&self, ins: &[&Tensor], _ctx: &mut CandleCtx) -> Result<Tensor> {
        Ok((ins[0] - ins[1])?)
    }
    fn forward_fast(&self, ins: &[&Act], _params: HostParams) -> (Act, NodeCache) {
        (combine_fast(ins, -1.0), None)
    }
    fn backward_fast(&self, _base: &Base, dy: Act, wanted: &[bool]) -> NodeGrads {
        combine_backward(dy, wanted, -1.0)
    }
    fn propagate(&self, base: &Base, ins: &[&Change]) -> Change {
        combine(base, ins, -1.0)
    }
    fn propagate_cost(
        &self,
        ins: &[Spread],
        cost: f64,
        shapes: &Shapes,
        _layout: &ParamLayout,
    ) -> (Spread, f64) {
        combine_cost(ins, cost, shapes)
    }
}

/// ResNet option-A shortcut: spatial subsample by 2, zero-pad `pad` channels on each side.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShortcutA {
    /// Zero channels added on each side.
    pub pad: usize,
}

impl Layer for ShortcutA {
    fn shape(&self, name: &str, ins: &[&[usize]], _layout: &ParamLayout) -> Result<Vec<usize>> {
        let [c, h, w] = image_shape(name, ins[0])?;
        if h % 2 != 0 || w % 2 != 0 {
            return Err(shape_error(
                name,
                format!("option-A shortcut needs even spatial size, got {h}x{w}"),
            ));
        }
        Ok(vec![c + 2 * self.pad, h / 2, w / 2])
    }
    fn forward(&self, ins: &[&Tensor], ctx: &mut CandleCtx) -> Result<Tensor> {
        let x = ins[0];
        let (n, c, h, w) = x.dims4()?;
        if h % 2 != 0 || w % 2 != 0 {
            return Err(shape_error(
                ctx.name,
                format!("option-A shortcut needs even spatial size, got {h}x{w}"),
            ));
        }
        let sub = x
            .reshape((n, c, h / 2, 2, w / 2, 2))?
            .narrow(3, 0, 1)?
            .narrow(5, 0, 1)?
            .reshape((n, c, h / 2, w / 2))?;
        Ok(sub.pad_with_zeros(1, self.pad, self.pad)?)
    }
    fn forward_fast(&self, ins: &[&Act], _params: HostParams) -> (Act, NodeCache) {
        let x = ins[0];
        let mut out = Act::zeros(x.c + 2 * self.pad, x.n, x.h / 2, x.w / 2);
        for c in 0..x.c {
            kernels::subsample2_plane(x.plane(c), x.n, x.h, x.w, out.plane_mut(c + self.pad));
        }
        (out, None)
    }
    fn backward_fast(&self, base: &Base, dy: Act, wanted: &[bool]) -> NodeGrads {
        // The subsampled positions of channel c receive dy's channel c + pad; the rest is 0.
        let x = base.input(0);
        let dx = wanted[0].then(|| {
            let mut dx = Act::zeros(x.c, x.n, x.h, x.w);
            let (oh, ow) = (x.h / 2, x.w / 2);
            dx.data
                .par_chunks_mut(x.plane_len().max(1))
                .enumerate()
                .for_each(|(c, dst)| {
                    let src = dy.plane(c + self.pad);
                    for ni in 0..x.n {
                        for oy in 0..oh {
                            for ox in 0..ow {
                                dst[(ni * x.h + 2 * oy) * x.w + 2 * ox] =
                                    src[(ni * oh + oy) * ow + ox];
                            }
                        }
                    }
                });
            dx
        });
        NodeGrads {
            inputs: vec![dx],
            params: Vec::new(),
        }
    }
    fn per_channel(&self, base: &Base, c: usize, d: &[f32]) -> Option<(usize, Vec<f32>)> {
        let x = base.input(0);
        let mut q = vec![0.0; x.n * (x.h / 2) * (x.w / 2)];
        kernels::subsample2_plane(d, x.n, x.h, x.w, &mut q);
        Some((c + self.pad, q))
    }
}
