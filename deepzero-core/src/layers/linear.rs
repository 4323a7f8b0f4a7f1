//! Fully connected layer.

use super::{
    change_to_full, channel_sums, shape_error, Base, CandleCtx, HostParams, Layer, NodeCache,
    NodeGrads, Shapes, Spread,
};
use crate::error::Result;
use crate::fast::kernels::{self, Act};
use crate::fast::Change;
use crate::layout::{ParamEntry, ParamKind, ParamLayout};
use candle_core::Tensor;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// Rows of a gradient per piece of work in the backward (fixed, so results do not depend on the
/// thread count).
const ROWS_PER_PIECE: usize = 64;

/// `y = x Wᵀ + b` on `[N, F]` input.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Linear {
    /// Weight `[O, F]` (layout index).
    pub weight: usize,
    /// Bias `[O]` (layout index).
    pub bias: Option<usize>,
}

impl Linear {
    /// `(O, F)`.
    fn dims(&self, layout: &ParamLayout) -> (usize, usize) {
        let s = &layout.entries[self.weight].shape;
        (s[0], s[1])
    }
}

impl Layer for Linear {
    fn params(&self) -> Vec<usize> {
        std::iter::once(self.weight).chain(self.bias).collect()
    }
    fn shape(&self, name: &str, ins: &[&[usize]], layout: &ParamLayout) -> Result<Vec<usize>> {
        let (o, f) = self.dims(layout);
        match ins[0] {
            [g] if *g == f => Ok(vec![o]),
            s => Err(shape_error(
                name,
                format!("needs [{f}] features per sample, got {s:?} (flatten first)"),
            )),
        }
    }
    fn cost(&self, _shapes: &Shapes, layout: &ParamLayout) -> u64 {
        let (o, f) = self.dims(layout);
        (o * f) as u64
    }
    fn forward(&self, ins: &[&Tensor], ctx: &mut CandleCtx) -> Result<Tensor> {
        let y = ins[0].matmul(&ctx.params.get(self.weight).t()?)?;
        Ok(match self.bias {
            Some(b) => y.broadcast_add(ctx.params.get(b))?,
            None => y,
        })
    }
    fn forward_fast(&self, ins: &[&Act], params: HostParams) -> (Act, NodeCache) {
        let (o, _) = self.dims(params.layout);
        let bias = self.bias.map(|b| params.get(b));
        (
            kernels::linear(ins[0], params.get(self.weight), o, bias),
            None,
        )
    }
    fn backward_fast(&self, base: &Base, dy: Act, wanted: &[bool]) -> NodeGrads {
        let (o, f) = self.dims(base.params.layout);
        let (x, n) = (base.input(0), dy.n);
        let w = base.params.get(self.weight);
        // dWᵀ[F, O] = x[F, N] · dyᵀ[N, O], by pieces of rows of F.
        let dyt = transpose(&dy.data, o, n);
        let mut dwt = vec![0.0f32; f * o];
        dwt.par_chunks_mut(ROWS_PER_PIECE * o)
            .enumerate()
            .for_each(|(p, rows)| {
                let r0 = p * ROWS_PER_PIECE;
                let m = rows.len() / o.max(1);
                kernels::sgemm(m, o, n, &x.data[r0 * n..], n, &dyt, o, rows, o, false);
            });
        let mut params = vec![(self.weight, transpose(&dwt, f, o))];
        if let Some(b) = self.bias {
            params.push((b, channel_sums(&dy)));
        }
        // dx[F, N] = Wᵀ[F, O] · dy[O, N], by pieces of rows of F.
        let dx = wanted[0].then(|| {
            let wt = transpose(w, o, f);
            let mut dx = Act::zeros(x.c, x.n, x.h, x.w);
            dx.data
                .par_chunks_mut(ROWS_PER_PIECE * n)
                .enumerate()
                .for_each(|(p, rows)| {
                    let r0 = p * ROWS_PER_PIECE;
                    let m = rows.len() / n.max(1);
                    kernels::sgemm(m, n, o, &wt[r0 * o..], o, &dy.data, n, rows, n, false);
                });
            dx
        });
        NodeGrads {
            inputs: vec![dx],
            params,
        }
    }
    fn perturbed(&self, base: &Base, entry: &ParamEntry, j: usize, delta: f32) -> Change {
        if entry.kind != ParamKind::Weight {
            return Change::Chan(j, vec![delta; base.out.plane_len()]);
        }
        let f = entry.shape[1];
        let (o, c) = (j / f, j % f);
        Change::Chan(
            o,
            base.input(0).plane(c).iter().map(|&v| delta * v).collect(),
        )
    }
    fn propagate(&self, base: &Base, ins: &[&Change]) -> Change {
        let (o, f) = self.dims(base.params.layout);
        let w = base.params.get(self.weight);
        let y = base.out;
        match ins[0] {
            Change::Same => Change::Same,
            Change::Chan(c, d) => {
                let mut out = Act::zeros(y.c, y.n, 1, 1);
                for r in 0..o {
                    let wr = w[r * f + c];
                    for (v, dv) in out.plane_mut(r).iter_mut().zip(d) {
                        *v = wr * dv;
                    }
                }
                Change::Full(out)
            }
            full => Change::Full(kernels::linear(
                &change_to_full(full, base.input(0)),
                w,
                o,
                None,
            )),
        }
    }
    fn perturbed_cost(&self, cost: f64, _shapes: &Shapes, layout: &ParamLayout) -> f64 {
        let (o, f) = self.dims(layout);
        cost / o.max(1) as f64 / f.max(1) as f64
    }
    fn propagate_cost(
        &self,
        ins: &[Spread],
        cost: f64,
        _shapes: &Shapes,
        layout: &ParamLayout,
    ) -> (Spread, f64) {
        if ins.contains(&Spread::Full) {
            (Spread::Full, cost)
        } else {
            (Spread::Full, cost / self.dims(layout).1.max(1) as f64)
        }
    }
}

/// Transpose of a row-major `rows × cols` matrix.
fn transpose(a: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0.0f32; rows * cols];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = a[r * cols + c];
        }
    }
    t
}
