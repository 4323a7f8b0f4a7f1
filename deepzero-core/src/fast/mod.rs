//! The fast CGE engine: feature reuse at layer granularity, delta propagation and our own
//! CPU kernels, sharded over threads.
//!
//! A coordinate-wise query perturbs one parameter. This engine caches every register of the base
//! forward (channel-major, see [`kernels`]) and, for a query on a parameter read by node `l`:
//!
//! * [`QueryMode::Naive`] re-runs the whole network (the reference, same kernels);
//! * [`QueryMode::Reuse`] re-runs nodes `l..` from the cached input of node `l` (feature reuse);
//! * [`QueryMode::Fast`] computes the perturbed node's output change directly — one weight
//!   `W[o, c, i, j]` changes output channel `o` only, by μ times a shifted slice of input channel
//!   `c` — carries the one changed channel through per-channel nodes (batch norm with that
//!   channel's own batch statistics, ReLU, pooling, the shortcut, additions), feeds the next
//!   convolution only the changed input channel (1/C_in of its work), and evaluates a changed
//!   logit column in closed form.
//!
//! Loss changes are taken per sample in f64 (`L_i(θ + δe_j) − L_i(θ)`), which removes most of
//! the rounding a difference of two f32 batch means carries.

pub mod kernels;

use crate::error::{Error, Result};
use crate::layout::ParamKind;
use crate::model::{BnBatchStats, Model, Op, BN_EPS};
use crate::query::{draw_direction, Difference, Direction};
use kernels::{Act, ConvGeom};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// How a query is evaluated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueryMode {
    /// Full forward per query.
    Naive,
    /// Resume at the perturbed node, full recomputation after it.
    Reuse,
    /// Delta propagation.
    Fast,
}

/// State of one register during a query.
enum St {
    /// Equal to the base forward's.
    Same,
    /// Equal except channel `o`, whose new plane is given.
    Chan(usize, Vec<f32>),
    /// Entirely recomputed.
    Full(Act),
}

/// Parameters that replace the engine's own in a forward.
#[derive(Clone, Copy)]
enum Over<'b> {
    /// Tensor `e` replaced.
    One(usize, &'b [f32]),
    /// The whole flat parameter vector replaced.
    All(&'b [f32]),
}

/// Per-channel batch-norm statistics of the base forward: (mean, 1/std).
type BnCache = Option<(Vec<f32>, Vec<f32>)>;

/// A base forward, ready to answer queries.
pub struct Engine<'a> {
    model: &'a Model,
    params: Vec<f32>,
    labels: Vec<u32>,
    regs: Vec<Act>,
    /// Per node: batch-norm (mean, 1/std) per channel.
    bn: Vec<BnCache>,
    base_loss: Vec<f64>,
    /// Base softmax probabilities, `[K, N]` (for closed-form loss changes).
    probs: Vec<f64>,
}

fn bad(msg: String) -> Error {
    Error::Shape(msg)
}

impl<'a> Engine<'a> {
    /// Run the base forward on `x` (`[N, C, H, W]`, batch-major f32) with `labels`.
    pub fn new(
        model: &'a Model,
        params: &[f32],
        x: &[f32],
        _n: usize,
        head: &crate::head::Head,
    ) -> Result<Engine<'a>> {
        let crate::head::Head::CrossEntropy(labels) = head else {
            return Err(bad("output heads are not supported yet".into()));
        };
        let [c, h, w] = model.input_shape;
        let n = labels.len();
        if params.len() != model.num_params() {
            return Err(bad(format!(
                "{} parameters given, model {} has {}",
                params.len(),
                model.name,
                model.num_params()
            )));
        }
        if n == 0 || x.len() != n * c * h * w {
            return Err(bad(format!(
                "batch of {} values for {n} labels of shape {c}x{h}x{w}",
                x.len()
            )));
        }
        if let Some(&y) = labels.iter().find(|&&y| y as usize >= model.num_classes) {
            return Err(bad(format!(
                "label {y} out of range for {} classes",
                model.num_classes
            )));
        }
        let mut e = Engine {
            model,
            params: params.to_vec(),
            labels: labels.to_vec(),
            regs: vec![Act::from_nchw(x, n, c, h, w)],
            bn: Vec::with_capacity(model.nodes.len()),
            base_loss: Vec::new(),
            probs: Vec::new(),
        };
        for k in 0..model.nodes.len() {
            let ins: Vec<&Act> = model.nodes[k].inputs.iter().map(|&r| &e.regs[r]).collect();
            let (out, stats) = e.full_op(k, &ins, None);
            e.regs.push(out);
            e.bn.push(stats);
        }
        e.base_loss = e.losses(e.regs.last().expect("output"), None);
        let z = e.regs.last().expect("output");
        let mut probs = vec![0.0f64; z.c * z.n];
        for i in 0..z.n {
            let mx = (0..z.c)
                .map(|k| z.data[k * z.n + i] as f64)
                .fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = (0..z.c)
                .map(|k| (z.data[k * z.n + i] as f64 - mx).exp())
                .sum();
            for k in 0..z.c {
                probs[k * z.n + i] = (z.data[k * z.n + i] as f64 - mx).exp() / sum;
            }
        }
        e.probs = probs;
        Ok(e)
    }

    /// Mean loss of the base forward.
    pub fn base_mean_loss(&self) -> f64 {
        self.base_loss.iter().sum::<f64>() / self.base_loss.len() as f64
    }

    /// Batch statistics of the base forward (for running statistics).
    pub fn bn_batch_stats(&self) -> BnBatchStats {
        let mut s = BnBatchStats::default();
        for (k, node) in self.model.nodes.iter().enumerate() {
            if let (Op::BatchNorm { .. }, Some((m, inv))) = (&node.op, &self.bn[k]) {
                let x = &self.regs[node.inputs[0]];
                let var = inv
                    .iter()
                    .map(|&i| 1.0 / (i as f64 * i as f64) - BN_EPS)
                    .collect();
                s.stats
                    .push((m.iter().map(|&v| v as f64).collect(), var, x.plane_len()));
            }
        }
        s
    }

    /// Logits of the base forward as `[N, K]` batch-major.
    pub fn logits(&self) -> Vec<f32> {
        let z = self.regs.last().expect("output");
        let mut out = vec![0.0; z.n * z.c];
        for k in 0..z.c {
            for (i, &v) in z.plane(k).iter().enumerate() {
                out[i * z.c + k] = v;
            }
        }
        out
    }

    fn entry_slice(&self, e: usize) -> &[f32] {
        &self.params[self.model.layout.entries[e].range()]
    }

    /// Parameter tensor `e`, or the override if it is the one replaced.
    fn p<'b>(&'b self, e: usize, over: Option<Over<'b>>) -> &'b [f32] {
        match over {
            Some(Over::One(oe, v)) if oe == e => v,
            Some(Over::All(all)) => &all[self.model.layout.entries[e].range()],
            _ => self.entry_slice(e),
        }
    }

    /// One node on full inputs.
    fn full_op(&self, k: usize, ins: &[&Act], over: Option<Over>) -> (Act, BnCache) {
        let x = ins[0];
        let layout = &self.model.layout;
        let out = match &self.model.nodes[k].op {
            Op::Conv2d {
                weight,
                bias,
                stride,
                padding,
            } => {
                let shape = &layout.entries[*weight].shape;
                let b = bias.map(|b| self.p(b, over));
                kernels::conv(
                    x,
                    self.p(*weight, over),
                    shape[0],
                    b,
                    shape[2],
                    *stride,
                    *padding,
                )
            }
            Op::Linear { weight, bias } => {
                let shape = &layout.entries[*weight].shape;
                kernels::linear(
                    x,
                    self.p(*weight, over),
                    shape[0],
                    bias.map(|b| self.p(b, over)),
                )
            }
            Op::BatchNorm { scale, shift, .. } => {
                let (g, b) = (self.p(*scale, over), self.p(*shift, over));
                let mut out = Act::zeros(x.c, x.n, x.h, x.w);
                let (mut ms, mut invs) = (Vec::with_capacity(x.c), Vec::with_capacity(x.c));
                for c in 0..x.c {
                    let (m, inv) =
                        kernels::bn_plane(x.plane(c), g[c], b[c], BN_EPS, out.plane_mut(c));
                    ms.push(m);
                    invs.push(inv);
                }
                return (out, Some((ms, invs)));
            }
            Op::Relu => {
                let mut out = x.clone();
                kernels::relu_inplace(&mut out.data);
                out
            }
            Op::MaxPool(kk) | Op::AvgPool(kk) => {
                let max = matches!(self.model.nodes[k].op, Op::MaxPool(_));
                let mut out = Act::zeros(x.c, x.n, x.h / kk, x.w / kk);
                for c in 0..x.c {
                    kernels::pool_plane(x.plane(c), x.n, x.h, x.w, *kk, max, out.plane_mut(c));
                }
                out
            }
            Op::GlobalAvgPool => {
                let mut out = Act::zeros(x.c, x.n, 1, 1);
                for c in 0..x.c {
                    kernels::gap_plane(x.plane(c), x.n, x.h * x.w, out.plane_mut(c));
                }
                out
            }
            Op::Flatten => {
                let hw = x.h * x.w;
                let mut out = Act::zeros(x.c * hw, x.n, 1, 1);
                for c in 0..x.c {
                    let p = x.plane(c);
                    for ni in 0..x.n {
                        for s in 0..hw {
                            out.data[(c * hw + s) * x.n + ni] = p[ni * hw + s];
                        }
                    }
                }
                out
            }
            Op::Add => {
                let mut out = x.clone();
                for (o, &v) in out.data.iter_mut().zip(&ins[1].data) {
                    *o += v;
                }
                out
            }
            Op::ShortcutA { pad } => {
                let mut out = Act::zeros(x.c + 2 * pad, x.n, x.h / 2, x.w / 2);
                for c in 0..x.c {
                    kernels::subsample2_plane(x.plane(c), x.n, x.h, x.w, out.plane_mut(c + pad));
                }
                out
            }
        };
        (out, None)
    }

    /// Per-sample cross-entropy (f64) of logits `z` (`[K, N, 1, 1]`), with column `o` replaced.
    fn losses(&self, z: &Act, col: Option<(usize, &[f32])>) -> Vec<f64> {
        (0..z.n)
            .map(|i| {
                let at = |k: usize| -> f64 {
                    match col {
                        Some((o, v)) if o == k => v[i] as f64,
                        _ => z.data[k * z.n + i] as f64,
                    }
                };
                let mx = (0..z.c).map(at).fold(f64::NEG_INFINITY, f64::max);
                let lse = mx + (0..z.c).map(|k| (at(k) - mx).exp()).sum::<f64>().ln();
                lse - at(self.labels[i] as usize)
            })
            .collect()
    }

    fn full_of<'b>(&'b self, r: usize, st: &'b [St]) -> std::borrow::Cow<'b, Act> {
        use std::borrow::Cow;
        match &st[r] {
            St::Same => Cow::Borrowed(&self.regs[r]),
            St::Full(a) => Cow::Borrowed(a),
            St::Chan(o, p) => {
                let mut a = self.regs[r].clone();
                a.plane_mut(*o).copy_from_slice(p);
                Cow::Owned(a)
            }
        }
    }

    /// Mean over the batch of `L_i(θ + δ e_coord) − L_i(θ)`.
    pub fn loss_delta(&self, coord: usize, delta: f32, mode: QueryMode) -> Result<f64> {
        let layout = &self.model.layout;
        let e = layout.entry_of(coord).ok_or_else(|| {
            bad(format!(
                "coordinate {coord} out of range for {} parameters",
                layout.len()
            ))
        })?;
        let entry = &layout.entries[e];
        let j = coord - entry.offset;
        let l = entry.node;
        let nodes = &self.model.nodes;
        let mut st: Vec<St> = (0..=nodes.len()).map(|_| St::Same).collect();
        let perturbed: Vec<f32>;
        let over = if mode == QueryMode::Fast {
            None
        } else {
            let mut v = self.entry_slice(e).to_vec();
            v[j] += delta;
            perturbed = v;
            Some(Over::One(e, perturbed.as_slice()))
        };
        let start = if mode == QueryMode::Naive { 0 } else { l };
        for k in start..nodes.len() {
            let node = &nodes[k];
            let all_same = node.inputs.iter().all(|&r| matches!(st[r], St::Same));
            let s = if k == l && mode == QueryMode::Fast {
                self.perturbed_node(k, e, j, delta)
            } else if all_same && !(mode == QueryMode::Naive || k == l) {
                St::Same
            } else if mode == QueryMode::Fast {
                self.propagate(k, &st)
            } else {
                let ins: Vec<std::borrow::Cow<Act>> =
                    node.inputs.iter().map(|&r| self.full_of(r, &st)).collect();
                let refs: Vec<&Act> = ins.iter().map(|c| c.as_ref()).collect();
                St::Full(self.full_op(k, &refs, over).0)
            };
            st[k + 1] = s;
        }
        let last = nodes.len();
        let n = self.base_loss.len() as f64;
        if mode == QueryMode::Fast {
            return Ok(self.loss_changes(&st[last]).iter().sum::<f64>() / n);
        }
        let new = match &st[last] {
            St::Same => return Ok(0.0),
            St::Chan(o, v) => self.losses(&self.regs[last], Some((*o, v))),
            St::Full(a) => self.losses(a, None),
        };
        Ok(new
            .iter()
            .zip(&self.base_loss)
            .map(|(a, b)| a - b)
            .sum::<f64>()
            / n)
    }

    /// Change of the perturbed node's output: one channel (`Δ` plane).
    fn perturbed_node(&self, k: usize, e: usize, j: usize, delta: f32) -> St {
        let node = &self.model.nodes[k];
        let x = &self.regs[node.inputs[0]];
        let out = &self.regs[k + 1];
        let entry = &self.model.layout.entries[e];
        let plane = out.plane_len();
        match (&node.op, entry.kind) {
            (
                Op::Conv2d {
                    stride, padding, ..
                },
                ParamKind::Weight,
            ) => {
                let (ci, kk) = (entry.shape[1], entry.shape[2]);
                let o = j / (ci * kk * kk);
                let c = (j / (kk * kk)) % ci;
                let (i, jj) = ((j / kk) % kk, j % kk);
                let g = ConvGeom::new(kk, *stride, *padding, x.h, x.w);
                let mut p = vec![0.0f32; plane];
                let src = x.plane(c);
                for ni in 0..x.n {
                    for oy in 0..g.oh {
                        let iy = (oy * g.stride + i) as isize - g.pad as isize;
                        if iy < 0 || iy >= x.h as isize {
                            continue;
                        }
                        let srow = &src[(ni * x.h + iy as usize) * x.w..][..x.w];
                        let drow = &mut p[(ni * g.oh + oy) * g.ow..][..g.ow];
                        for (ox, d) in drow.iter_mut().enumerate() {
                            let ix = (ox * g.stride + jj) as isize - g.pad as isize;
                            if ix >= 0 && (ix as usize) < x.w {
                                *d = delta * srow[ix as usize];
                            }
                        }
                    }
                }
                St::Chan(o, p)
            }
            (Op::Linear { .. }, ParamKind::Weight) => {
                let f = entry.shape[1];
                let (o, c) = (j / f, j % f);
                St::Chan(o, x.plane(c).iter().map(|&v| delta * v).collect())
            }
            (Op::BatchNorm { .. }, ParamKind::BnScale) => {
                let (m, inv) = self.bn[k]
                    .as_ref()
                    .expect("batch-norm statistics of the base forward");
                St::Chan(
                    j,
                    x.plane(j)
                        .iter()
                        .map(|&v| delta * (v - m[j]) * inv[j])
                        .collect(),
                )
            }
            // Biases and batch-norm shifts add δ to one output channel.
            _ => St::Chan(j, vec![delta; plane]),
        }
    }

    /// Change of the output of node `k` from the changes of its inputs. Linear nodes map changes
    /// to changes exactly; nonlinear ones are written so that f32 rounding stays relative to the
    /// change, not to the activation (a ReLU that keeps its sign passes Δ unchanged, a max-pool
    /// window compares `(x − max) + Δ`, batch norm updates its statistics from sums in f64).
    fn propagate(&self, k: usize, st: &[St]) -> St {
        let node = &self.model.nodes[k];
        let layout = &self.model.layout;
        let r0 = node.inputs[0];
        let x = &self.regs[r0];
        let y = &self.regs[k + 1];
        // Per-channel nodes map a one-channel change to a one-channel change.
        let per_channel = |c: usize, d: &[f32]| -> Option<(usize, Vec<f32>)> {
            Some(match &node.op {
                Op::BatchNorm { scale, .. } => {
                    let (m, inv) = self.bn[k].as_ref().expect("batch-norm statistics");
                    (
                        c,
                        bn_delta(x.plane(c), d, m[c], inv[c], self.entry_slice(*scale)[c]),
                    )
                }
                Op::Relu => (c, relu_delta(x.plane(c), d)),
                Op::MaxPool(kk) => (
                    c,
                    maxpool_delta(x.plane(c), y.plane(c), d, x.n, x.h, x.w, *kk),
                ),
                Op::AvgPool(kk) => {
                    let mut q = vec![0.0; x.n * (x.h / kk) * (x.w / kk)];
                    kernels::pool_plane(d, x.n, x.h, x.w, *kk, false, &mut q);
                    (c, q)
                }
                Op::GlobalAvgPool => {
                    let mut q = vec![0.0; x.n];
                    kernels::gap_plane(d, x.n, x.h * x.w, &mut q);
                    (c, q)
                }
                Op::Flatten if x.h * x.w == 1 => (c, d.to_vec()),
                Op::ShortcutA { pad } => {
                    let mut q = vec![0.0; x.n * (x.h / 2) * (x.w / 2)];
                    kernels::subsample2_plane(d, x.n, x.h, x.w, &mut q);
                    (c + pad, q)
                }
                _ => return None,
            })
        };
        match (&node.op, &st[r0]) {
            (Op::Add, _) => {
                let r1 = node.inputs[1];
                return match (&st[r0], &st[r1]) {
                    (St::Chan(c, d), St::Same) | (St::Same, St::Chan(c, d)) => {
                        St::Chan(*c, d.clone())
                    }
                    (St::Chan(c0, d0), St::Chan(c1, d1)) if c0 == c1 => {
                        St::Chan(*c0, d0.iter().zip(d1).map(|(a, b)| a + b).collect())
                    }
                    _ => {
                        let mut a = self.delta_of(r0, st).into_owned();
                        let b = self.delta_of(r1, st);
                        for (u, v) in a.data.iter_mut().zip(&b.data) {
                            *u += v;
                        }
                        St::Full(a)
                    }
                };
            }
            (
                Op::Conv2d {
                    weight,
                    stride,
                    padding,
                    ..
                },
                St::Chan(c, d),
            ) => {
                let shape = &layout.entries[*weight].shape;
                let g = ConvGeom::new(shape[2], *stride, *padding, x.h, x.w);
                let mut out = Act::zeros(y.c, y.n, y.h, y.w);
                kernels::conv_add_channel(
                    &mut out,
                    d,
                    self.entry_slice(*weight),
                    shape[1],
                    *c,
                    &g,
                    x.n,
                );
                return St::Full(out);
            }
            (Op::Linear { weight, .. }, St::Chan(c, d)) => {
                let f = layout.entries[*weight].shape[1];
                let w = self.entry_slice(*weight);
                let mut out = Act::zeros(y.c, y.n, 1, 1);
                for o in 0..out.c {
                    let wo = w[o * f + c];
                    for (v, dv) in out.plane_mut(o).iter_mut().zip(d) {
                        *v = wo * dv;
                    }
                }
                return St::Full(out);
            }
            (_, St::Chan(c, d)) => {
                if let Some((o, q)) = per_channel(*c, d) {
                    return St::Chan(o, q);
                }
            }
            _ => {}
        }
        // A change in every channel.
        let dx = self.delta_of(r0, st);
        match &node.op {
            Op::Conv2d {
                weight,
                stride,
                padding,
                ..
            } => {
                let shape = &layout.entries[*weight].shape;
                St::Full(kernels::conv(
                    &dx,
                    self.entry_slice(*weight),
                    shape[0],
                    None,
                    shape[2],
                    *stride,
                    *padding,
                ))
            }
            Op::Linear { weight, .. } => {
                let o = layout.entries[*weight].shape[0];
                St::Full(kernels::linear(&dx, self.entry_slice(*weight), o, None))
            }
            Op::Flatten if x.h * x.w != 1 => {
                let (a, _) = self.full_op(k, &[&dx], None);
                St::Full(a)
            }
            _ => {
                let mut out = Act::zeros(y.c, y.n, y.h, y.w);
                for c in 0..dx.c {
                    let (o, q) = per_channel(c, dx.plane(c)).expect("per-channel node");
                    out.plane_mut(o).copy_from_slice(&q);
                }
                St::Full(out)
            }
        }
    }

    /// The change of register `r` as a full activation (zeros where unchanged).
    fn delta_of<'b>(&self, r: usize, st: &'b [St]) -> std::borrow::Cow<'b, Act> {
        std::borrow::Cow::Owned(match &st[r] {
            St::Full(a) => return std::borrow::Cow::Borrowed(a),
            St::Same => {
                let base = &self.regs[r];
                Act::zeros(base.c, base.n, base.h, base.w)
            }
            St::Chan(o, d) => {
                let base = &self.regs[r];
                let mut a = Act::zeros(base.c, base.n, base.h, base.w);
                a.plane_mut(*o).copy_from_slice(d);
                a
            }
        })
    }

    /// Per-sample loss changes from a change of the logits (f64):
    /// `ΔL_i = log Σ_k softmax(z_i)_k e^{Δz_ik} − Δz_{i,y_i}`, via `ln_1p`/`exp_m1`.
    fn loss_changes(&self, dz: &St) -> Vec<f64> {
        let z = self.regs.last().expect("output");
        let d = |k: usize, i: usize| -> f64 {
            match dz {
                St::Same => 0.0,
                St::Chan(o, v) => {
                    if *o == k {
                        v[i] as f64
                    } else {
                        0.0
                    }
                }
                St::Full(a) => a.data[k * a.n + i] as f64,
            }
        };
        (0..z.n)
            .map(|i| {
                let acc: f64 = (0..z.c)
                    .map(|k| self.probs[k * z.n + i] * d(k, i).exp_m1())
                    .sum();
                acc.ln_1p() - d(self.labels[i] as usize, i)
            })
            .collect()
    }

    /// Mean over the batch of `L_i(θ') − L_i(θ)` for a whole parameter vector `θ'`: one full
    /// forward on the cached input (an RGE query). Registers are dropped after their last use.
    pub fn loss_change_at(&self, params: &[f32]) -> Result<f64> {
        if params.len() != self.params.len() {
            return Err(bad(format!(
                "{} parameters given, model {} has {}",
                params.len(),
                self.model.name,
                self.params.len()
            )));
        }
        let nodes = &self.model.nodes;
        let mut last_use = vec![0usize; nodes.len() + 1];
        for (k, node) in nodes.iter().enumerate() {
            for &r in &node.inputs {
                last_use[r] = k;
            }
        }
        let mut regs: Vec<Option<Act>> = (0..=nodes.len()).map(|_| None).collect();
        for k in 0..nodes.len() {
            let r0 = nodes[k].inputs[0];
            if matches!(nodes[k].op, Op::Relu) && r0 != 0 && last_use[r0] == k {
                // Nothing else reads the input: rectify it in place instead of copying it.
                let mut a = regs[r0].take().expect("register computed before use");
                kernels::relu_inplace(&mut a.data);
                regs[k + 1] = Some(a);
                continue;
            }
            let out = {
                let ins: Vec<&Act> = nodes[k]
                    .inputs
                    .iter()
                    .map(|&r| {
                        if r == 0 {
                            &self.regs[0]
                        } else {
                            regs[r].as_ref().expect("register computed before use")
                        }
                    })
                    .collect();
                self.full_op(k, &ins, Some(Over::All(params))).0
            };
            for &r in &nodes[k].inputs {
                if last_use[r] == k {
                    regs[r] = None;
                }
            }
            regs[k + 1] = Some(out);
        }
        let z = regs[nodes.len()].as_ref().expect("output");
        let n = self.base_loss.len() as f64;
        Ok(self
            .losses(z, None)
            .iter()
            .zip(&self.base_loss)
            .map(|(a, b)| a - b)
            .sum::<f64>()
            / n)
    }

    /// RGE from full forwards on our kernels: direction `i` is drawn from its own seed
    /// (`seeds[i]`), so directions are regenerated rather than stored and the result does not
    /// depend on the thread count (fixed chunks of directions, partial sums added in order).
    /// Returns `(1/q) Σ_i c_i u_i` and the number of queries made (without the base).
    pub fn rge(
        &self,
        seeds: &[u64],
        mu: f64,
        difference: Difference,
        direction: Direction,
    ) -> Result<(Vec<f64>, u64)> {
        use rand::SeedableRng;
        const CHUNK: usize = 8;
        let d = self.params.len();
        let chunk_sum = |chunk: &[u64]| -> Result<Vec<f64>> {
            let mut g = vec![0.0f64; d];
            let mut p = vec![0.0f32; d];
            for &seed in chunk {
                let u = draw_direction(d, direction, &mut rand::rngs::StdRng::seed_from_u64(seed));
                let mut at = |sign: f64| -> Result<f64> {
                    for ((pi, &ti), &ui) in p.iter_mut().zip(&self.params).zip(&u) {
                        *pi = (ti as f64 + sign * mu * ui) as f32;
                    }
                    self.loss_change_at(&p)
                };
                let coef = match difference {
                    Difference::Forward => at(1.0)? / mu,
                    Difference::Central => (at(1.0)? - at(-1.0)?) / (2.0 * mu),
                };
                for (gi, &ui) in g.iter_mut().zip(&u) {
                    *gi += coef * ui;
                }
            }
            Ok(g)
        };
        // Partial sums of a few chunks per thread are held at a time (q/8 vectors of length d
        // would not fit for large models); they are added in chunk order either way.
        let group = CHUNK * 4 * rayon::current_num_threads().max(1);
        let mut g = vec![0.0f64; d];
        for seeds in seeds.chunks(group) {
            let partials: Result<Vec<Vec<f64>>> = seeds.par_chunks(CHUNK).map(chunk_sum).collect();
            for part in partials? {
                for (gi, v) in g.iter_mut().zip(part) {
                    *gi += v;
                }
            }
        }
        let inv_q = 1.0 / seeds.len().max(1) as f64;
        g.iter_mut().for_each(|v| *v *= inv_q);
        let per = if difference == Difference::Central {
            2
        } else {
            1
        };
        Ok((g, per * seeds.len() as u64))
    }

    /// CGE over `coords` (each query independent; sharded over the rayon pool). Returns the
    /// gradient entries in `coords` order and the number of queries made (without the base).
    pub fn cge(
        &self,
        coords: &[usize],
        mu: f64,
        difference: Difference,
        mode: crate::query::QueryEngine,
    ) -> Result<(Vec<f64>, u64)> {
        let mode = match mode {
            crate::query::QueryEngine::Naive => QueryMode::Naive,
            crate::query::QueryEngine::Reuse => QueryMode::Reuse,
            crate::query::QueryEngine::Fast => QueryMode::Fast,
        };
        let m = mu as f32;
        let g: Result<Vec<f64>> = coords
            .par_iter()
            .with_min_len(8)
            .map(|&i| match difference {
                Difference::Forward => Ok(self.loss_delta(i, m, mode)? / mu),
                Difference::Central => {
                    Ok((self.loss_delta(i, m, mode)? - self.loss_delta(i, -m, mode)?) / (2.0 * mu))
                }
            })
            .collect();
        let per = if difference == Difference::Central {
            2
        } else {
            1
        };
        Ok((g?, per * coords.len() as u64))
    }
}

/// Batch-norm output change of one channel: `γ[(Δ − Δm)·s' + (x − m)(s' − s)]` with the new
/// inverse std `s'` from f64 sums of the change.
fn bn_delta(x: &[f32], d: &[f32], m: f32, inv: f32, gamma: f32) -> Vec<f32> {
    let n = x.len() as f64;
    // Sums of Δ, (x − m)Δ and Δ² over the plane: eight independent f64 lanes (vectorised, no
    // long dependency chain).
    let (mut sd, mut sxd, mut sdd) = ([0.0f64; 8], [0.0f64; 8], [0.0f64; 8]);
    let (xc, dc) = (x.chunks_exact(8), d.chunks_exact(8));
    let (xr, dr) = (xc.remainder(), dc.remainder());
    for (xs, ds) in xc.zip(dc) {
        for l in 0..8 {
            let dv = ds[l] as f64;
            sd[l] += dv;
            sxd[l] += (xs[l] - m) as f64 * dv;
            sdd[l] += dv * dv;
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
    x.iter()
        .zip(d)
        .map(|(&xv, &dv)| (dv - dm) * a + (xv - m) * b)
        .collect()
}

/// ReLU output change, exact where the sign does not flip.
fn relu_delta(x: &[f32], d: &[f32]) -> Vec<f32> {
    x.iter()
        .zip(d)
        .map(|(&xv, &dv)| {
            let new = xv + dv;
            if xv > 0.0 && new > 0.0 {
                dv
            } else {
                new.max(0.0) - xv.max(0.0)
            }
        })
        .collect()
}

/// Max-pool output change: per window `max_i((x_i − M) + Δ_i)` with `M` the base maximum.
fn maxpool_delta(
    x: &[f32],
    y: &[f32],
    d: &[f32],
    n: usize,
    h: usize,
    w: usize,
    k: usize,
) -> Vec<f32> {
    let (oh, ow) = (h / k, w / k);
    let mut out = vec![0.0; n * oh * ow];
    for ni in 0..n {
        for oy in 0..oh {
            let orow = &mut out[(ni * oh + oy) * ow..][..ow];
            let yrow = &y[(ni * oh + oy) * ow..][..ow];
            if k == 2 {
                let r0 = (ni * h + oy * 2) * w;
                let (x0, x1) = (&x[r0..r0 + w], &x[r0 + w..r0 + 2 * w]);
                let (d0, d1) = (&d[r0..r0 + w], &d[r0 + w..r0 + 2 * w]);
                for ox in 0..ow {
                    let mx = yrow[ox];
                    let j = 2 * ox;
                    let a = ((x0[j] - mx) + d0[j]).max((x0[j + 1] - mx) + d0[j + 1]);
                    let b = ((x1[j] - mx) + d1[j]).max((x1[j + 1] - mx) + d1[j + 1]);
                    orow[ox] = a.max(b);
                }
                continue;
            }
            for ox in 0..ow {
                let mx = yrow[ox];
                let mut best = f32::NEG_INFINITY;
                for i in 0..k {
                    let base = (ni * h + oy * k + i) * w + ox * k;
                    for j in 0..k {
                        best = best.max((x[base + j] - mx) + d[base + j]);
                    }
                }
                orow[ox] = best;
            }
        }
    }
    out
}

/// Multiply-adds (per sample) that one query on parameter tensor `entry` costs in each mode,
/// from the model's per-node costs: `(naive, reuse, fast)`.
pub fn query_costs(model: &Model, entry: usize) -> (f64, f64, f64) {
    let costs = model.node_costs();
    let l = model.layout.entries[entry].node;
    let naive: f64 = costs.iter().map(|&c| c as f64).sum();
    let reuse: f64 = costs[l..].iter().map(|&c| c as f64).sum();
    // Walk the state kinds: 0 = same, 1 = one channel (of `ch` channels), 2 = full.
    let channels = out_channels(model);
    let mut kind = vec![0u8; model.nodes.len() + 1];
    let mut fast = 0.0;
    for k in l..model.nodes.len() {
        let node = &model.nodes[k];
        let c = costs[k] as f64;
        let ch = channels[k + 1].max(1) as f64;
        let ins: Vec<u8> = node.inputs.iter().map(|&r| kind[r]).collect();
        let (kd, cost) = if k == l {
            // The perturbed node: one output channel, one multiply-add per element (a conv
            // weight touches one tap of one input channel).
            (1, c / ch / fan_in(model, k) as f64)
        } else if ins.iter().all(|&v| v == 0) {
            (0, 0.0)
        } else if ins.contains(&2) {
            (2, c)
        } else {
            match &node.op {
                // One changed input channel: 1/C_in of the layer.
                Op::Conv2d { .. } | Op::Linear { .. } => {
                    (2, c / in_channels(model, k).max(1) as f64)
                }
                Op::Add if ins.iter().filter(|&&v| v == 1).count() == 2 => (2, c),
                _ => (1, c / ch),
            }
        };
        kind[k + 1] = kd;
        fast += cost;
    }
    (naive, reuse, fast)
}

/// Multiply-adds per output element of node `k` (C_in·k² for a conv, F for a linear layer).
fn fan_in(model: &Model, k: usize) -> usize {
    match &model.nodes[k].op {
        Op::Conv2d { weight, .. } | Op::Linear { weight, .. } => model.layout.entries[*weight]
            .shape[1..]
            .iter()
            .product::<usize>()
            .max(1),
        _ => 1,
    }
}

fn in_channels(model: &Model, k: usize) -> usize {
    match &model.nodes[k].op {
        Op::Conv2d { weight, .. } | Op::Linear { weight, .. } => {
            model.layout.entries[*weight].shape[1]
        }
        _ => out_channels(model)[model.nodes[k].inputs[0]],
    }
}

/// Channel (feature) count of every register.
fn out_channels(model: &Model) -> Vec<usize> {
    model.register_shapes().iter().map(|s| s[0]).collect()
}
