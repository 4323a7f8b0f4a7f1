//! The fast engine: feature reuse at layer granularity, delta propagation and our own CPU
//! kernels, sharded over threads; a [`Head`] turns the model's output into per-sample losses.
//!
//! A coordinate-wise query perturbs one parameter. This engine caches every register of the base
//! forward (channel-major, see [`kernels`]) and, for a query on a parameter read by node `l`:
//!
//! * [`QueryEngine::Naive`] re-runs the whole network (the reference, same kernels);
//! * [`QueryEngine::Reuse`] re-runs nodes `l..` from the cached input of node `l` (feature reuse);
//! * [`QueryEngine::Fast`] computes the perturbed node's output change directly — one weight
//!   `W[o, c, i, j]` changes output channel `o` only, by μ times a shifted slice of input channel
//!   `c` — carries the one changed channel through per-channel nodes (batch norm with that
//!   channel's own batch statistics, ReLU, tanh, pooling, the shortcut, sums and differences),
//!   feeds the next convolution only the changed input channel (1/C_in of its work), and hands
//!   the output change to the head.
//!
//! Each layer kind says how it does its part ([`crate::layers::Layer`]); this module walks the
//! graph. The head: cross-entropy evaluates a changed logit column in closed form, per query;
//! an output closure ([`Head::Output`]) receives `base + change` (in f64, so the change keeps
//! its precision) for [`OUTPUT_GROUP`] queries at once — groups fixed by position in the
//! coordinate list, so results do not depend on the thread count.
//!
//! Loss changes are taken per sample in f64 (`L_i(θ + δe_j) − L_i(θ)`), which removes most of
//! the rounding a difference of two f32 batch means carries.

pub mod backprop;
pub mod conv_grad;
pub mod kernels;
pub mod pieces;
pub mod simd;

use crate::error::{Error, Result};
use crate::head::Head;
use crate::layers::{Base, HostParams, NodeCache, Shapes, Spread};
use crate::model::{BnBatchStats, BnState, Model, Node, Op, BN_EPS};
use crate::query::{draw_direction, Difference, Direction, QueryEngine};
use kernels::Act;
use rayon::prelude::*;

/// Queries whose outputs an output head receives in one call (CGE; RGE hands over a chunk of
/// directions at a time).
pub const OUTPUT_GROUP: usize = 32;

/// Directions per fixed chunk of RGE (partial sums added in chunk order).
const RGE_CHUNK: usize = 8;

/// State of one register during a query.
pub(crate) enum Change {
    /// Equal to the base forward's.
    Same,
    /// Equal except channel `o`: its change (fast mode) or its new plane.
    Chan(usize, Vec<f32>),
    /// Every channel: the change (fast mode) or the recomputed activation (naive, reuse).
    Full(Act),
}

/// A base forward, ready to answer queries.
pub struct Engine<'a> {
    model: &'a Model,
    params: Vec<f32>,
    head: Head,
    /// Labels of a cross-entropy head (empty otherwise).
    labels: Vec<u32>,
    regs: Vec<Act>,
    /// Per node: what it kept from the base forward (batch-norm statistics).
    caches: Vec<NodeCache>,
    base_loss: Vec<f64>,
    /// Cross-entropy head: base softmax probabilities, `[K, N]` (closed-form loss changes).
    probs: Vec<f64>,
    /// Output head: the base output in f64, batch-major `[N, output_len]`.
    base_output: Vec<f64>,
    /// Per register: the last node that reads it (`usize::MAX` for the output), so a query
    /// drops its changed values as soon as nothing needs them.
    last_use: Vec<usize>,
}

/// Per register of `model`: the last node reading it; `usize::MAX` for the output register.
fn last_uses(model: &Model) -> Vec<usize> {
    let mut last = vec![0; model.nodes.len() + 1];
    for (k, node) in model.nodes.iter().enumerate() {
        for &r in &node.inputs {
            last[r] = k;
        }
    }
    last[model.nodes.len()] = usize::MAX;
    last
}

fn shape_error(msg: String) -> Error {
    Error::Shape(msg)
}

impl<'a> Engine<'a> {
    /// Run the base forward on `x` (`[N, C, H, W]`, batch-major f32, `n` samples) and evaluate
    /// `head` on its output.
    pub fn new(
        model: &'a Model,
        params: &[f32],
        x: &[f32],
        n: usize,
        head: &Head,
    ) -> Result<Engine<'a>> {
        check_batch(model, params, x, n)?;
        let [c, h, w] = model.input_shape;
        check_head(model, head, n)?;
        let labels = match head {
            Head::CrossEntropy(labels) => labels.clone(),
            Head::Output(_) | Head::SquaredError(_) => Vec::new(),
        };
        let mut e = Engine {
            model,
            params: params.to_vec(),
            head: head.clone(),
            labels,
            regs: vec![Act::from_nchw(x, n, c, h, w)],
            caches: Vec::with_capacity(model.nodes.len()),
            base_loss: Vec::new(),
            probs: Vec::new(),
            base_output: Vec::new(),
            last_use: last_uses(model),
        };
        for node in &model.nodes {
            let ins: Vec<&Act> = node.inputs.iter().map(|&r| &e.regs[r]).collect();
            let (out, cache) = node.op.layer().forward_fast(&ins, e.host_params(None));
            e.regs.push(out);
            e.caches.push(cache);
        }
        let z = e.output();
        let (base_loss, probs, base_output) = match &e.head {
            Head::CrossEntropy(_) => (e.cross_entropy(z, None), softmax_columns(z), Vec::new()),
            Head::Output(_) | Head::SquaredError(_) => {
                let mut out = Vec::with_capacity(n * model.output_len());
                append_batch_major(z, &mut out);
                let losses = e.head.losses(&out, 1, n, model.output_len())?;
                (losses, Vec::new(), out)
            }
        };
        (e.base_loss, e.probs, e.base_output) = (base_loss, probs, base_output);
        Ok(e)
    }

    fn n(&self) -> usize {
        self.regs[0].n
    }

    fn output(&self) -> &Act {
        self.regs.last().expect("output register")
    }

    fn host_params<'b>(&'b self, over: Option<(usize, &'b [f32])>) -> HostParams<'b> {
        HostParams {
            layout: &self.model.layout,
            flat: &self.params,
            over,
        }
    }

    /// Mean loss of the base forward.
    pub fn base_mean_loss(&self) -> f64 {
        self.base_loss.iter().sum::<f64>() / self.base_loss.len() as f64
    }

    /// Per-sample losses of the base forward.
    pub fn base_losses(&self) -> &[f64] {
        &self.base_loss
    }

    /// Batch statistics of the base forward (for running statistics).
    pub fn bn_batch_stats(&self) -> BnBatchStats {
        batch_stats(self.model, &self.regs, &self.caches)
    }

    /// The base forward's output, batch-major `[N, output_len]` (logits `[N, K]` for a
    /// classifier).
    pub fn logits(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.n() * self.model.output_len());
        let z = self.output();
        let hw = z.h * z.w;
        for i in 0..z.n {
            for c in 0..z.c {
                out.extend_from_slice(&z.plane(c)[i * hw..(i + 1) * hw]);
            }
        }
        out
    }

    /// Per-sample cross-entropy (f64) of logits `z` (`[K, N, 1, 1]`), with column `o` replaced.
    fn cross_entropy(&self, z: &Act, col: Option<(usize, &[f32])>) -> Vec<f64> {
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

    /// Register `r` as values during a naive or reuse query.
    fn values_of<'b>(&'b self, r: usize, st: &'b [Change]) -> std::borrow::Cow<'b, Act> {
        use std::borrow::Cow;
        match &st[r] {
            Change::Same => Cow::Borrowed(&self.regs[r]),
            Change::Full(a) => Cow::Borrowed(a),
            Change::Chan(o, p) => {
                let mut a = self.regs[r].clone();
                a.plane_mut(*o).copy_from_slice(p);
                Cow::Owned(a)
            }
        }
    }

    /// The output register after moving coordinate `coord` by `delta`: its change
    /// (`QueryEngine::Fast`) or its values (`Naive`, `Reuse`; `Same` if untouched).
    fn query_output(&self, coord: usize, delta: f32, mode: QueryEngine) -> Result<Change> {
        let layout = &self.model.layout;
        let e = layout.entry_of(coord).ok_or_else(|| {
            shape_error(format!(
                "coordinate {coord} out of range for {} parameters",
                layout.len()
            ))
        })?;
        let entry = &layout.entries[e];
        let j = coord - entry.offset;
        let l = entry.node;
        let nodes = &self.model.nodes;
        let mut st: Vec<Change> = (0..=nodes.len()).map(|_| Change::Same).collect();
        let perturbed: Vec<f32>;
        let over = if mode == QueryEngine::Fast {
            None
        } else {
            let mut v = layout.entries[e]
                .range()
                .map(|i| self.params[i])
                .collect::<Vec<_>>();
            v[j] += delta;
            perturbed = v;
            Some((e, perturbed.as_slice()))
        };
        let start = if mode == QueryEngine::Naive { 0 } else { l };
        for k in start..nodes.len() {
            let node = &nodes[k];
            let layer = node.op.layer();
            let all_same = node.inputs.iter().all(|&r| matches!(st[r], Change::Same));
            let base = || Base {
                regs: &self.regs,
                inputs: &node.inputs,
                out: &self.regs[k + 1],
                cache: &self.caches[k],
                params: self.host_params(None),
            };
            let s = if k == l && mode == QueryEngine::Fast {
                layer.perturbed(&base(), entry, j, delta)
            } else if all_same && !(mode == QueryEngine::Naive || k == l) {
                Change::Same
            } else if mode == QueryEngine::Fast {
                let ins: Vec<&Change> = node.inputs.iter().map(|&r| &st[r]).collect();
                layer.propagate(&base(), &ins)
            } else {
                let ins: Vec<std::borrow::Cow<Act>> = node
                    .inputs
                    .iter()
                    .map(|&r| self.values_of(r, &st))
                    .collect();
                let refs: Vec<&Act> = ins.iter().map(|c| c.as_ref()).collect();
                Change::Full(layer.forward_fast(&refs, self.host_params(over)).0)
            };
            st[k + 1] = s;
            for &r in &node.inputs {
                if self.last_use[r] == k {
                    st[r] = Change::Same;
                }
            }
        }
        Ok(st.pop().expect("output register"))
    }

    /// Mean over the batch of `L_i(θ + δ e_coord) − L_i(θ)`.
    pub fn loss_delta(&self, coord: usize, delta: f32, mode: QueryEngine) -> Result<f64> {
        let out = self.query_output(coord, delta, mode)?;
        Ok(self.mean_changes(&[(out, mode == QueryEngine::Fast)])?[0])
    }

    /// Mean loss change of each query output (`(output, is_change)`), in order; an output head
    /// receives them all in one call.
    fn mean_changes(&self, outs: &[(Change, bool)]) -> Result<Vec<f64>> {
        let n = self.n();
        let per_sample: Vec<f64> = match &self.head {
            Head::CrossEntropy(_) => {
                let z = self.output();
                let mut all = Vec::with_capacity(outs.len());
                for (out, is_change) in outs {
                    let new = match (out, is_change) {
                        (Change::Same, _) => {
                            all.push(0.0);
                            continue;
                        }
                        (change, true) => {
                            all.push(
                                self.cross_entropy_changes(change).iter().sum::<f64>() / n as f64,
                            );
                            continue;
                        }
                        (Change::Chan(o, v), false) => self.cross_entropy(z, Some((*o, v))),
                        (Change::Full(a), false) => self.cross_entropy(a, None),
                    };
                    all.push(
                        new.iter()
                            .zip(&self.base_loss)
                            .map(|(a, b)| a - b)
                            .sum::<f64>()
                            / n as f64,
                    );
                }
                return Ok(all);
            }
            Head::Output(_) | Head::SquaredError(_) => {
                let len = self.model.output_len();
                let mut buf = Vec::with_capacity(outs.len() * n * len);
                for (out, is_change) in outs {
                    self.append_output(out, *is_change, &mut buf);
                }
                self.head.losses(&buf, outs.len(), n, len)?
            }
        };
        Ok(per_sample
            .chunks_exact(n)
            .map(|l| {
                l.iter()
                    .zip(&self.base_loss)
                    .map(|(a, b)| a - b)
                    .sum::<f64>()
                    / n as f64
            })
            .collect())
    }

    /// Append one query's output, batch-major f64, to `buf`: base + change (the f32 change
    /// converted on its own, so it keeps its precision) or the recomputed values.
    fn append_output(&self, out: &Change, is_change: bool, buf: &mut Vec<f64>) {
        let start = buf.len();
        match (out, is_change) {
            (Change::Full(a), false) => return append_batch_major(a, buf),
            _ => buf.extend_from_slice(&self.base_output),
        }
        let z = self.output();
        let (hw, len) = (z.h * z.w, self.model.output_len());
        let block = &mut buf[start..];
        let mut add = |c: usize, d: &[f32]| {
            for i in 0..z.n {
                let dst = &mut block[i * len + c * hw..][..hw];
                let src = &d[i * hw..(i + 1) * hw];
                if is_change {
                    dst.iter_mut().zip(src).for_each(|(o, &v)| *o += v as f64);
                } else {
                    dst.iter_mut().zip(src).for_each(|(o, &v)| *o = v as f64);
                }
            }
        };
        match out {
            Change::Same => {}
            Change::Chan(c, d) => add(*c, d),
            Change::Full(a) => (0..a.c).for_each(|c| add(c, a.plane(c))),
        }
    }

    /// Per-sample cross-entropy changes from a change of the logits (f64):
    /// `ΔL_i = log Σ_k softmax(z_i)_k e^{Δz_ik} − Δz_{i,y_i}`, via `ln_1p`/`exp_m1`.
    fn cross_entropy_changes(&self, dz: &Change) -> Vec<f64> {
        let z = self.output();
        let d = |k: usize, i: usize| -> f64 {
            match dz {
                Change::Same => 0.0,
                Change::Chan(o, v) => {
                    if *o == k {
                        v[i] as f64
                    } else {
                        0.0
                    }
                }
                Change::Full(a) => a.data[k * a.n + i] as f64,
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

    /// The output of one full forward at `params` on the cached input (an RGE query).
    /// Registers are dropped after their last use.
    fn forward_at(&self, params: &[f32]) -> Result<Act> {
        if params.len() != self.params.len() {
            return Err(shape_error(format!(
                "{} parameters given, model {} has {}",
                params.len(),
                self.model.name,
                self.params.len()
            )));
        }
        let nodes = &self.model.nodes;
        let host = HostParams {
            layout: &self.model.layout,
            flat: params,
            over: None,
        };
        let mut last_use = vec![0usize; nodes.len() + 1];
        for (k, node) in nodes.iter().enumerate() {
            for &r in &node.inputs {
                last_use[r] = k;
            }
        }
        let mut regs: Vec<Option<Act>> = (0..=nodes.len()).map(|_| None).collect();
        for k in 0..nodes.len() {
            let r0 = nodes[k].inputs[0];
            if matches!(nodes[k].op, Op::Relu(_)) && r0 != 0 && last_use[r0] == k {
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
                nodes[k].op.layer().forward_fast(&ins, host).0
            };
            for &r in &nodes[k].inputs {
                if last_use[r] == k {
                    regs[r] = None;
                }
            }
            regs[k + 1] = Some(out);
        }
        Ok(regs[nodes.len()].take().expect("output"))
    }

    /// Mean over the batch of `L_i(θ') − L_i(θ)` for a whole parameter vector `θ'`: one full
    /// forward on the cached input (an RGE query).
    pub fn loss_change_at(&self, params: &[f32]) -> Result<f64> {
        let z = self.forward_at(params)?;
        Ok(self.mean_changes(&[(Change::Full(z), false)])?[0])
    }

    /// RGE from full forwards on our kernels: direction `i` is drawn from its own seed
    /// (`seeds[i]`), so directions are regenerated rather than stored and the result does not
    /// depend on the thread count (fixed chunks of directions, partial sums added in order).
    /// An output head receives each chunk's outputs in one call.
    /// Returns `(1/q) Σ_i c_i u_i` and the number of queries made (without the base).
    pub fn rge(
        &self,
        seeds: &[u64],
        mu: f64,
        difference: Difference,
        direction: Direction,
    ) -> Result<(Vec<f64>, u64)> {
        use rand::SeedableRng;
        let d = self.params.len();
        let signs: &[f64] = match difference {
            Difference::Forward => &[1.0],
            Difference::Central => &[1.0, -1.0],
        };
        let chunk_sum = |chunk: &[u64]| -> Result<Vec<f64>> {
            let mut p = vec![0.0f32; d];
            let mut dirs = Vec::with_capacity(chunk.len());
            let mut outs = Vec::with_capacity(chunk.len() * signs.len());
            for &seed in chunk {
                let u = draw_direction(d, direction, &mut rand::rngs::StdRng::seed_from_u64(seed));
                for &sign in signs {
                    for ((pi, &ti), &ui) in p.iter_mut().zip(&self.params).zip(&u) {
                        *pi = (ti as f64 + sign * mu * ui) as f32;
                    }
                    outs.push((Change::Full(self.forward_at(&p)?), false));
                }
                dirs.push(u);
            }
            let changes = self.mean_changes(&outs)?;
            let mut g = vec![0.0f64; d];
            for (q, u) in dirs.iter().enumerate() {
                let coef = match difference {
                    Difference::Forward => changes[q] / mu,
                    Difference::Central => (changes[2 * q] - changes[2 * q + 1]) / (2.0 * mu),
                };
                for (gi, &ui) in g.iter_mut().zip(u) {
                    *gi += coef * ui;
                }
            }
            Ok(g)
        };
        // Partial sums of a few chunks per thread are held at a time (q/8 vectors of length d
        // would not fit for large models); they are added in chunk order either way.
        let group = RGE_CHUNK * 4 * rayon::current_num_threads().max(1);
        let mut g = vec![0.0f64; d];
        for seeds in seeds.chunks(group) {
            let partials: Result<Vec<Vec<f64>>> =
                seeds.par_chunks(RGE_CHUNK).map(chunk_sum).collect();
            for part in partials? {
                for (gi, v) in g.iter_mut().zip(part) {
                    *gi += v;
                }
            }
        }
        let inv_q = 1.0 / seeds.len().max(1) as f64;
        g.iter_mut().for_each(|v| *v *= inv_q);
        Ok((g, difference.queries_per_point() * seeds.len() as u64))
    }

    /// CGE over `coords` (each query independent; sharded over the rayon pool). Returns the
    /// gradient entries in `coords` order and the number of queries made (without the base).
    pub fn cge(
        &self,
        coords: &[usize],
        mu: f64,
        difference: Difference,
        engine: QueryEngine,
    ) -> Result<(Vec<f64>, u64)> {
        let m = mu as f32;
        let g: Vec<f64> = match self.head {
            Head::CrossEntropy(_) => coords
                .par_iter()
                .with_min_len(8)
                .map(|&i| match difference {
                    Difference::Forward => Ok(self.loss_delta(i, m, engine)? / mu),
                    Difference::Central => Ok((self.loss_delta(i, m, engine)?
                        - self.loss_delta(i, -m, engine)?)
                        / (2.0 * mu)),
                })
                .collect::<Result<_>>()?,
            Head::Output(_) | Head::SquaredError(_) => coords
                .par_chunks(OUTPUT_GROUP)
                .map(|group| self.cge_group(group, m, mu, difference, engine))
                .collect::<Result<Vec<Vec<f64>>>>()?
                .concat(),
        };
        Ok((g, difference.queries_per_point() * coords.len() as u64))
    }

    /// One group of coordinates for an output head: every query's output, one head call.
    fn cge_group(
        &self,
        group: &[usize],
        m: f32,
        mu: f64,
        difference: Difference,
        engine: QueryEngine,
    ) -> Result<Vec<f64>> {
        let deltas: &[f32] = match difference {
            Difference::Forward => &[m],
            Difference::Central => &[m, -m],
        };
        let mut outs = Vec::with_capacity(deltas.len() * group.len());
        for &delta in deltas {
            for &i in group {
                outs.push((
                    self.query_output(i, delta, engine)?,
                    engine == QueryEngine::Fast,
                ));
            }
        }
        let changes = self.mean_changes(&outs)?;
        Ok(match difference {
            Difference::Forward => changes.iter().map(|c| c / mu).collect(),
            Difference::Central => {
                let q = group.len();
                (0..q)
                    .map(|i| (changes[i] - changes[q + i]) / (2.0 * mu))
                    .collect()
            }
        })
    }
}

/// The output of `model` at `params` on `x` (`[N, C, H, W]`, batch-major f32, `n` samples),
/// batch-major `[N, output_len]` in f64: one forward on our kernels (batch norm with the batch's
/// statistics, as [`crate::model::Mode::Train`]), each register dropped after its last reader.
/// For callers that run the network inside a black box of their own (a solver loop).
pub fn forward(model: &Model, params: &[f32], x: &[f32], n: usize) -> Result<Vec<f64>> {
    let z = run_forward(model, params, x, n, |node, ins, host| {
        node.op.layer().forward_fast(ins, host).0
    })?;
    let mut out = Vec::with_capacity(z.data.len());
    append_batch_major(&z, &mut out);
    Ok(out)
}

/// The output of `model` in eval mode (batch norm with the running statistics `bn`, as
/// [`crate::model::Mode::Eval`]) at `params` on `x` (`[N, C, H, W]`, batch-major f32, `n`
/// samples), batch-major `[N, output_len]` in f32: one forward on our kernels, each layer spread
/// over threads (convolutions by pieces of the batch, the rest by channels or chunks), each
/// register dropped after its last reader. A trained network used as a classifier.
pub fn forward_eval(
    model: &Model,
    params: &[f32],
    bn: &BnState,
    x: &[f32],
    n: usize,
) -> Result<Vec<f32>> {
    check_bn_state(model, bn)?;
    let z = run_forward(model, params, x, n, |node, ins, host| {
        node.op.layer().forward_eval(ins, host, bn).0
    })?;
    let (hw, len) = (z.h * z.w, z.c * z.h * z.w);
    let mut out = vec![0.0f32; z.data.len()];
    for c in 0..z.c {
        let plane = z.plane(c);
        for i in 0..z.n {
            out[i * len + c * hw..][..hw].copy_from_slice(&plane[i * hw..][..hw]);
        }
    }
    Ok(out)
}

/// A batch-norm state that fits `model` (running means and variances for each batch norm).
pub fn check_bn_state(model: &Model, bn: &BnState) -> Result<()> {
    let fits = bn.mean.len() == model.bn_channels.len()
        && bn.var.len() == model.bn_channels.len()
        && model
            .bn_channels
            .iter()
            .zip(bn.mean.iter().zip(&bn.var))
            .all(|(&c, (m, v))| m.len() == c && v.len() == c);
    if !fits {
        return Err(shape_error(format!(
            "the batch-norm state does not fit model {}: it needs running means and variances \
             for channels {:?}",
            model.name, model.bn_channels
        )));
    }
    Ok(())
}

/// The forward loop of [`forward`] and [`forward_eval`]: `step` computes one node's output.
fn run_forward(
    model: &Model,
    params: &[f32],
    x: &[f32],
    n: usize,
    step: impl Fn(&Node, &[&Act], HostParams) -> Act,
) -> Result<Act> {
    check_batch(model, params, x, n)?;
    let [c, h, w] = model.input_shape;
    let last_use = last_uses(model);
    let host = HostParams {
        layout: &model.layout,
        flat: params,
        over: None,
    };
    let mut regs: Vec<Option<Act>> = Vec::with_capacity(model.nodes.len() + 1);
    regs.push(Some(Act::from_nchw(x, n, c, h, w)));
    for (k, node) in model.nodes.iter().enumerate() {
        let ins: Vec<&Act> = node
            .inputs
            .iter()
            .map(|&r| {
                regs[r]
                    .as_ref()
                    .expect("a register is read before its last use")
            })
            .collect();
        let out = step(node, &ins, host);
        regs.push(Some(out));
        for &r in &node.inputs {
            if last_use[r] == k {
                regs[r] = None;
            }
        }
    }
    regs.pop()
        .flatten()
        .ok_or_else(|| shape_error(format!("model {} has no output", model.name)))
}

/// Check `params` and a batch `x` of `n` samples (`[N, C, H, W]`, batch-major) against `model`.
fn check_batch(model: &Model, params: &[f32], x: &[f32], n: usize) -> Result<()> {
    let [c, h, w] = model.input_shape;
    if params.len() != model.num_params() {
        return Err(shape_error(format!(
            "{} parameters given, model {} has {}",
            params.len(),
            model.name,
            model.num_params()
        )));
    }
    if n == 0 || x.len() != n * c * h * w {
        return Err(shape_error(format!(
            "batch of {} values for {n} samples of shape {c}x{h}x{w}",
            x.len()
        )));
    }
    Ok(())
}

/// Check `head` against `model`'s output and a batch of `n` samples.
fn check_head(model: &Model, head: &Head, n: usize) -> Result<()> {
    let len = match head {
        Head::CrossEntropy(_) => model.num_classes().ok_or_else(|| {
            shape_error(format!(
                "a cross-entropy head needs class scores, model {} outputs {:?}; use an output head",
                model.name, model.output_shape
            ))
        })?,
        Head::Output(_) | Head::SquaredError(_) => model.output_len(),
    };
    head.check(n, len)
}

/// Batch statistics of a train-mode forward (registers and per-node caches), as the candle
/// forward records them: per batch-norm node, channel means, biased variances and the count.
fn batch_stats(model: &Model, regs: &[Act], caches: &[NodeCache]) -> BnBatchStats {
    let mut s = BnBatchStats::default();
    for (k, node) in model.nodes.iter().enumerate() {
        if let (Op::BatchNorm(_), Some(bn)) = (&node.op, &caches[k]) {
            if bn.eval {
                continue;
            }
            let x = &regs[node.inputs[0]];
            let var = bn
                .inv_std
                .iter()
                .map(|&i| 1.0 / (i as f64 * i as f64) - BN_EPS)
                .collect();
            s.stats.push((
                bn.mean.iter().map(|&v| v as f64).collect(),
                var,
                x.plane_len(),
            ));
        }
    }
    s
}

/// Softmax of every column of logits `[K, N]`, in f64.
fn softmax_columns(z: &Act) -> Vec<f64> {
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
    probs
}

/// Append a channel-major activation to `buf` as batch-major f64 `[N, C·H·W]`.
pub fn append_batch_major(a: &Act, buf: &mut Vec<f64>) {
    let hw = a.h * a.w;
    for i in 0..a.n {
        for c in 0..a.c {
            buf.extend(a.plane(c)[i * hw..(i + 1) * hw].iter().map(|&v| v as f64));
        }
    }
}

/// Multiply-adds (per sample) that one query on parameter tensor `entry` costs in each mode,
/// from the model's per-node costs: `(naive, reuse, fast)`.
pub fn query_costs(model: &Model, entry: usize) -> (f64, f64, f64) {
    let (shapes, costs) = (model.register_shapes(), model.node_costs());
    entry_costs(model, entry, &shapes, &costs)
}

fn entry_costs(
    model: &Model,
    entry: usize,
    shapes: &[Vec<usize>],
    costs: &[u64],
) -> (f64, f64, f64) {
    let layout = &model.layout;
    let l = layout.entries[entry].node;
    let naive: f64 = costs.iter().map(|&c| c as f64).sum();
    let reuse: f64 = costs[l..].iter().map(|&c| c as f64).sum();
    let mut spread = vec![Spread::Same; model.nodes.len() + 1];
    let mut fast = 0.0;
    for k in l..model.nodes.len() {
        let node = &model.nodes[k];
        let layer = node.op.layer();
        let c = costs[k] as f64;
        let in_shapes: Vec<&[usize]> = node.inputs.iter().map(|&r| shapes[r].as_slice()).collect();
        let sh = Shapes {
            ins: &in_shapes,
            out: &shapes[k + 1],
        };
        let ins: Vec<Spread> = node.inputs.iter().map(|&r| spread[r]).collect();
        let (s, cost) = if k == l {
            (Spread::One, layer.perturbed_cost(c, &sh, layout))
        } else if ins.iter().all(|&v| v == Spread::Same) {
            (Spread::Same, 0.0)
        } else {
            layer.propagate_cost(&ins, c, &sh, layout)
        };
        spread[k + 1] = s;
        fast += cost;
    }
    (naive, reuse, fast)
}

/// Multiply-adds per sample of one CGE step over `coords` (one forward query each) in each
/// mode, `(naive, reuse, fast)`: the cost model of [`query_costs`] summed over the coordinates.
pub fn step_cost(model: &Model, coords: &[usize]) -> Result<(f64, f64, f64)> {
    Ok(per_coordinate(model, coords)?
        .into_iter()
        .fold((0.0, 0.0, 0.0), |(n, r, f), (a, b, c)| {
            (n + a, r + b, f + c)
        }))
}

/// Multiply-adds per sample of the query on each of `coords` under `engine` (the cost model of
/// [`query_costs`]), in order: what a distributed step balances.
pub fn coordinate_costs(model: &Model, coords: &[usize], engine: QueryEngine) -> Result<Vec<f64>> {
    Ok(per_coordinate(model, coords)?
        .into_iter()
        .map(|(naive, reuse, fast)| match engine {
            QueryEngine::Naive => naive,
            QueryEngine::Reuse => reuse,
            QueryEngine::Fast => fast,
        })
        .collect())
}

/// Consecutive coordinates whose values [`Engine::cge`] computes together under `head` (an
/// output head receives a group's outputs in one call); a coordinate list cut at multiples of
/// it gives the same values piece by piece as whole.
pub fn cge_group(head: &Head) -> usize {
    match head {
        Head::CrossEntropy(_) => 1,
        Head::Output(_) | Head::SquaredError(_) => OUTPUT_GROUP,
    }
}

fn per_coordinate(model: &Model, coords: &[usize]) -> Result<Vec<(f64, f64, f64)>> {
    let (shapes, costs) = (model.register_shapes(), model.node_costs());
    let mut per_entry: Vec<Option<(f64, f64, f64)>> = vec![None; model.layout.entries.len()];
    coords
        .iter()
        .map(|&i| {
            let e = model.layout.entry_of(i).ok_or_else(|| {
                shape_error(format!(
                    "coordinate {i} out of range for {} parameters",
                    model.num_params()
                ))
            })?;
            Ok(*per_entry[e].get_or_insert_with(|| entry_costs(model, e, &shapes, &costs)))
        })
        .collect()
}
