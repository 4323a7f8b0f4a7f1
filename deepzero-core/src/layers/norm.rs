//! Batch norm.

use super::{Base, BnCache, CandleCtx, HostParams, Layer, NodeCache, NodeGrads};
use crate::error::Result;
use crate::fast::kernels::{self, Act};
use crate::fast::simd;
use crate::fast::Change;
use crate::layout::{ParamEntry, ParamKind, ParamLayout};
use crate::model::{BnState, Mode, BN_EPS};
use candle_core::{DType, Tensor};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// Batch norm over channels (dim 1).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BatchNorm {
    /// Scale γ `[C]` (layout index).
    pub scale: usize,
    /// Shift β `[C]` (layout index).
    pub shift: usize,
    /// Index of this node's running statistics in [`crate::model::BnState`].
    pub stats: usize,
}

impl Layer for BatchNorm {
    fn params(&self) -> Vec<usize> {
        vec![self.scale, self.shift]
    }
    fn shape(&self, name: &str, ins: &[&[usize]], layout: &ParamLayout) -> Result<Vec<usize>> {
        let c = layout.entries[self.scale].shape[0];
        if ins[0].first() != Some(&c) {
            return Err(super::shape_error(
                name,
                format!("{c} channels expected, input is {:?}", ins[0]),
            ));
        }
        Ok(ins[0].to_vec())
    }
    fn forward(&self, ins: &[&Tensor], ctx: &mut CandleCtx) -> Result<Tensor> {
        let x = ins[0];
        let c = x.dim(1)?;
        let bshape: Vec<usize> = (0..x.rank()).map(|d| if d == 1 { c } else { 1 }).collect();
        let gamma = ctx.params.get(self.scale).reshape(bshape.as_slice())?;
        let beta = ctx.params.get(self.shift).reshape(bshape.as_slice())?;
        let xhat = match ctx.mode {
            Mode::Train => {
                let mean = channel_mean(x)?.reshape(bshape.as_slice())?;
                let xc = x.broadcast_sub(&mean)?;
                let var = channel_mean(&xc.sqr()?)?.reshape(bshape.as_slice())?;
                if let Some(s) = ctx.stats.as_deref_mut() {
                    let n = x.elem_count() / c;
                    let m = mean.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
                    let v = var.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
                    s.stats.push((m, v, n));
                }
                xc.broadcast_div(&(var + BN_EPS)?.sqrt()?)?
            }
            Mode::Eval(state) => {
                let dev = x.device();
                let m = Tensor::from_slice(&state.mean[self.stats], bshape.as_slice(), dev)?
                    .to_dtype(x.dtype())?;
                let v = Tensor::from_slice(&state.var[self.stats], bshape.as_slice(), dev)?
                    .to_dtype(x.dtype())?;
                x.broadcast_sub(&m)?.broadcast_div(&(v + BN_EPS)?.sqrt()?)?
            }
        };
        Ok(xhat.broadcast_mul(&gamma)?.broadcast_add(&beta)?)
    }
    fn forward_fast(&self, ins: &[&Act], params: HostParams) -> (Act, NodeCache) {
        let x = ins[0];
        let (g, b) = (params.get(self.scale), params.get(self.shift));
        let mut out = Act::for_overwrite(x.c, x.n, x.h, x.w);
        let plane = x.plane_len().max(1);
        // Channels over threads; each channel's statistics are its own (no cross-thread sums).
        let (mean, inv_std): (Vec<f32>, Vec<f32>) = out
            .data
            .par_chunks_mut(plane)
            .enumerate()
            .map(|(c, dst)| kernels::bn_plane(x.plane(c), g[c], b[c], BN_EPS, dst))
            .unzip();
        (
            out,
            Some(BnCache {
                mean,
                inv_std,
                eval: false,
            }),
        )
    }
    fn forward_eval(&self, ins: &[&Act], params: HostParams, bn: &BnState) -> (Act, NodeCache) {
        // The candle eval forward's operations, in its order: (x − m) / √(v + ε) · γ + β.
        let x = ins[0];
        let (g, b) = (params.get(self.scale), params.get(self.shift));
        let (mean, var) = (&bn.mean[self.stats], &bn.var[self.stats]);
        let mut out = Act::for_overwrite(x.c, x.n, x.h, x.w);
        let plane = x.plane_len().max(1);
        out.data
            .par_chunks_mut(plane)
            .enumerate()
            .for_each(|(c, dst)| {
                let (m, sd) = (mean[c] as f32, ((var[c] as f32) + BN_EPS as f32).sqrt());
                for (o, &v) in dst.iter_mut().zip(x.plane(c)) {
                    *o = (v - m) / sd * g[c] + b[c];
                }
            });
        let cache = BnCache {
            mean: mean.iter().map(|&m| m as f32).collect(),
            inv_std: var
                .iter()
                .map(|&v| 1.0 / ((v as f32) + BN_EPS as f32).sqrt())
                .collect(),
            eval: true,
        };
        (out, Some(cache))
    }
    fn backward_fast(&self, base: &Base, dy: Act, wanted: &[bool]) -> NodeGrads {
        // With x̂ = (x − m)·s: dγ = Σ dy·x̂, dβ = Σ dy, and through the batch's mean and
        // variance dx = γ·s·(dy − mean(dy) − x̂·mean(dy·x̂)).
        let (x, bn) = (base.input(0), base.bn());
        let gamma = base.params.get(self.scale);
        let plane = x.plane_len().max(1);
        let count = x.plane_len() as f64;
        let mut dx = dy;
        let sums: Vec<(f32, f32)> = dx
            .data
            .par_chunks_mut(plane)
            .enumerate()
            .map(|(c, d)| {
                let (m, s) = (bn.mean[c], bn.inv_std[c]);
                let xs = x.plane(c);
                let (sum_dy, sum_dy_xhat) = simd::bn_gradient_sums(xs, d, m, s);
                if wanted[0] && bn.eval {
                    // Fixed statistics: the layer is affine, dx = γ·s·dy.
                    let a = gamma[c] * s;
                    d.iter_mut().for_each(|d| *d *= a);
                } else if wanted[0] {
                    let a = gamma[c] * s;
                    let (mean_dy, mean_dy_xhat) =
                        ((sum_dy / count) as f32, (sum_dy_xhat / count) as f32);
                    for (d, &xv) in d.iter_mut().zip(xs) {
                        *d = a * (*d - mean_dy - (xv - m) * s * mean_dy_xhat);
                    }
                }
                (sum_dy_xhat as f32, sum_dy as f32)
            })
            .collect();
        let (dgamma, dbeta) = sums.into_iter().unzip();
        NodeGrads {
            inputs: vec![wanted[0].then_some(dx)],
            params: vec![(self.scale, dgamma), (self.shift, dbeta)],
        }
    }
    fn perturbed(&self, base: &Base, entry: &ParamEntry, j: usize, delta: f32) -> Change {
        if entry.kind != ParamKind::BnScale {
            // The shift adds δ to channel j.
            return Change::Chan(j, vec![delta; base.out.plane_len()]);
        }
        let bn = base.bn();
        let (m, inv) = (bn.mean[j], bn.inv_std[j]);
        Change::Chan(
            j,
            base.input(0)
                .plane(j)
                .iter()
                .map(|&v| delta * (v - m) * inv)
                .collect(),
        )
    }
    fn per_channel(&self, base: &Base, c: usize, d: &[f32]) -> Option<(usize, Vec<f32>)> {
        let bn = base.bn();
        let gamma = base.params.get(self.scale)[c];
        let mut q = vec![0.0; d.len()];
        bn_delta(
            base.input(0).plane(c),
            d,
            bn.mean[c],
            bn.inv_std[c],
            gamma,
            &mut q,
        );
        Some((c, q))
    }
    fn per_channel_into(&self, base: &Base, c: usize, d: &[f32], out: &mut Act) -> Option<usize> {
        let bn = base.bn();
        let gamma = base.params.get(self.scale)[c];
        let x = base.input(0).plane(c);
        bn_delta(x, d, bn.mean[c], bn.inv_std[c], gamma, out.plane_mut(c));
        Some(c)
    }
}

/// Batch-norm output change of one channel: `γ[(Δ − Δm)·s' + (x − m)(s' − s)]` with the new
/// inverse std `s'` from f64 sums of the change.
fn bn_delta(x: &[f32], d: &[f32], m: f32, inv: f32, gamma: f32, out: &mut [f32]) {
    let n = x.len() as f64;
    // Sums of Δ, (x − m)Δ and Δ² over the plane: eight lanes summed in f32 over blocks of 32
    // values (vectorised, no conversion per value), each block's lanes then added to f64
    // lanes; all in a fixed order.
    let (mut sd, mut sxd, mut sdd) = ([0.0f64; 8], [0.0f64; 8], [0.0f64; 8]);
    const BLOCK: usize = 32;
    let (xc, dc) = (x.chunks_exact(BLOCK), d.chunks_exact(BLOCK));
    let (xr, dr) = (xc.remainder(), dc.remainder());
    for (xb, db) in xc.zip(dc) {
        let (mut bd, mut bxd, mut bdd) = ([0.0f32; 8], [0.0f32; 8], [0.0f32; 8]);
        for (xs, ds) in xb.chunks_exact(8).zip(db.chunks_exact(8)) {
            for l in 0..8 {
                let dv = ds[l];
                bd[l] += dv;
                bxd[l] = (xs[l] - m).mul_add(dv, bxd[l]);
                bdd[l] = dv.mul_add(dv, bdd[l]);
            }
        }
        for l in 0..8 {
            sd[l] += bd[l] as f64;
            sxd[l] += bxd[l] as f64;
            sdd[l] += bdd[l] as f64;
        }
    }
    for (&xv, &dv) in xr.iter().zip(dr) {
        let dv = dv as f64;
        sd[0] += dv;
        sxd[0] += (xv - m) as f64 * dv;
        sdd[0] += dv * dv;
    }
    let total = |a: [f64; 8]| a.iter().sum::<f64>() / n;
    // var' = var + 2 cov(x − m, Δ) + var(Δ); x − m has mean 0 over the batch, so the
    // covariance needs no centring of Δ.
    let (dm, cov, ed2) = (total(sd), total(sxd), total(sdd));
    let var_eps = 1.0 / (inv as f64 * inv as f64);
    let var_new = var_eps + 2.0 * cov + (ed2 - dm * dm);
    let inv_new = 1.0 / var_new.sqrt();
    let dinv = (inv_new - inv as f64) as f32;
    let (a, dm) = (gamma * inv_new as f32, dm as f32);
    let b = gamma * dinv;
    for ((o, &xv), &dv) in out.iter_mut().zip(x).zip(d) {
        *o = (dv - dm) * a + (xv - m) * b;
    }
}

/// Per-channel mean of `[N, C, ...]` as `[C]`. Sums the contiguous trailing dims first:
/// candle's reduction over non-trailing dims walks the tensor element by element and was the
/// largest cost of a training step.
fn channel_mean(x: &Tensor) -> Result<Tensor> {
    let (n, c) = (x.dim(0)?, x.dim(1)?);
    let rest = x.elem_count() / (n * c).max(1);
    let s = if rest > 1 {
        x.reshape((n, c, rest))?.sum(2)?
    } else {
        x.reshape((n, c))?
    };
    Ok((s.sum(0)? / (n * rest) as f64)?)
}
