//! Backprop on our kernels: the first-order baseline's loss and exact gradient.
//!
//! A train-mode forward ([`Trace::forward`], batch norm with the batch's statistics) keeps
//! every register and each node's cache; the head gives the mean loss and its gradient with
//! respect to the model's output; [`Trace::backward`] then walks the nodes in reverse. Each
//! node turns the gradient of its output into gradients of its inputs and parameters
//! (`Layer::backward_fast`, [`crate::layers`]); a register read by several nodes sums their
//! contributions, and it is complete once the walk passes the node that writes it (every reader
//! comes later in the graph).
//!
//! Work is spread over threads in pieces fixed by the shapes alone (channels, samples, rows),
//! and every sum runs in a fixed order, so the gradient does not depend on the thread count.

use super::kernels::Act;
use super::{append_batch_major, batch_stats, check_batch, check_head, softmax_columns};
use crate::error::{Error, Result};
use crate::head::Head;
use crate::layers::{Base, HostParams, NodeCache};
use crate::model::{BnBatchStats, BnState, Model, Node};

/// A train-mode forward on our kernels, ready for its backward.
pub struct Trace<'a> {
    model: &'a Model,
    params: &'a [f32],
    regs: Vec<Act>,
    caches: Vec<NodeCache>,
}

impl<'a> Trace<'a> {
    /// The forward of `model` at `params` on `x` (`[N, C, H, W]`, batch-major, `n` samples),
    /// batch norm with the batch's statistics.
    pub fn forward(model: &'a Model, params: &'a [f32], x: &[f32], n: usize) -> Result<Self> {
        Self::run(model, params, x, n, |node, ins, host| {
            node.op.layer().forward_train(ins, host)
        })
    }

    /// The forward of `model` at `params` on `x` in eval mode: batch norm with the running
    /// statistics `bn` (as [`crate::model::Mode::Eval`]), so each batch norm is an affine map
    /// in the backward too. For the gradient of a fixed, trained network with respect to its
    /// input ([`Trace::backward_with_input`]), a classifier behind a denoiser say.
    pub fn forward_eval(
        model: &'a Model,
        params: &'a [f32],
        bn: &BnState,
        x: &[f32],
        n: usize,
    ) -> Result<Self> {
        super::check_bn_state(model, bn)?;
        Self::run(model, params, x, n, |node, ins, host| {
            node.op.layer().forward_eval(ins, host, bn)
        })
    }

    fn run(
        model: &'a Model,
        params: &'a [f32],
        x: &[f32],
        n: usize,
        step: impl Fn(&Node, &[&Act], HostParams) -> (Act, NodeCache),
    ) -> Result<Self> {
        check_batch(model, params, x, n)?;
        let [c, h, w] = model.input_shape;
        let mut regs = Vec::with_capacity(model.nodes.len() + 1);
        regs.push(Act::from_nchw(x, n, c, h, w));
        let mut caches = Vec::with_capacity(model.nodes.len());
        let host = HostParams {
            layout: &model.layout,
            flat: params,
            over: None,
        };
        for node in &model.nodes {
            let ins: Vec<&Act> = node.inputs.iter().map(|&r| &regs[r]).collect();
            let (out, cache) = step(node, &ins, host);
            regs.push(out);
            caches.push(cache);
        }
        Ok(Trace {
            model,
            params,
            regs,
            caches,
        })
    }

    /// The model's output, channel-major.
    pub fn output(&self) -> &Act {
        self.regs.last().expect("output register")
    }

    /// The model's output, batch-major `[N, output_len]`, in f64.
    pub fn output_batch_major(&self) -> Vec<f64> {
        let mut out = Vec::with_capacity(self.output().data.len());
        append_batch_major(self.output(), &mut out);
        out
    }

    /// Every register of the forward, channel-major: the model's input first, then each node's
    /// output in graph order (as [`Model::forward_cached`] returns them batch-major).
    pub fn registers(&self) -> &[Act] {
        &self.regs
    }

    /// The batch-norm statistics of the forward, as the candle forward records them.
    pub fn bn_batch_stats(&self) -> BnBatchStats {
        batch_stats(self.model, &self.regs, &self.caches)
    }

    /// The gradient (flat, in the layout's order) of `Σ output · g`, given `g`, the gradient of
    /// the loss with respect to the model's output, batch-major `[N, output_len]`.
    pub fn backward_batch_major(&self, g: &[f64]) -> Result<Vec<f64>> {
        let d = self.output_gradient(g)?;
        Ok(self.backward(d))
    }

    /// The gradient (flat, in the layout's order) of `Σ output · d_output`: every node in
    /// reverse, each register's gradient summed over its readers.
    pub fn backward(&self, d_output: Act) -> Vec<f64> {
        self.walk(d_output, false).0
    }

    /// Like [`Trace::backward_batch_major`], with the gradient with respect to the model's
    /// input too: `(parameters, input)`, the input's batch-major `[N, C·H·W]` in f64. For
    /// callers that chain the network with something else (a solver's adjoint).
    pub fn backward_with_input(&self, g: &[f64]) -> Result<(Vec<f64>, Vec<f64>)> {
        let d = self.output_gradient(g)?;
        let (flat, dx) = self.walk(d, true);
        let [c, h, w] = self.model.input_shape;
        let n = self.regs[0].n;
        let mut input = Vec::with_capacity(n * c * h * w);
        match dx {
            Some(dx) => append_batch_major(&dx, &mut input),
            // No node reads the input: it has no effect.
            None => input.resize(n * c * h * w, 0.0),
        }
        Ok((flat, input))
    }

    /// `g` (batch-major) as a channel-major gradient of the output.
    fn output_gradient(&self, g: &[f64]) -> Result<Act> {
        let z = self.output();
        if g.len() != z.data.len() {
            return Err(Error::Shape(format!(
                "an output gradient of {} values for {} outputs",
                g.len(),
                z.data.len()
            )));
        }
        let (hw, len) = (z.h * z.w, z.c * z.h * z.w);
        let mut d = Act::zeros(z.c, z.n, z.h, z.w);
        for c in 0..z.c {
            let plane = d.plane_mut(c);
            for i in 0..z.n {
                for s in 0..hw {
                    plane[i * hw + s] = g[i * len + c * hw + s] as f32;
                }
            }
        }
        Ok(d)
    }

    /// The reverse walk: parameter gradients, and the input's gradient when `want_input`.
    fn walk(&self, d_output: Act, want_input: bool) -> (Vec<f64>, Option<Act>) {
        let nodes = &self.model.nodes;
        let layout = &self.model.layout;
        let host = HostParams {
            layout,
            flat: self.params,
            over: None,
        };
        let mut grads: Vec<Option<Act>> = (0..=nodes.len()).map(|_| None).collect();
        grads[nodes.len()] = Some(d_output);
        let mut flat = vec![0.0f64; layout.len()];
        for (k, node) in nodes.iter().enumerate().rev() {
            let Some(dy) = grads[k + 1].take() else {
                continue;
            };
            let base = Base {
                regs: &self.regs,
                inputs: &node.inputs,
                out: &self.regs[k + 1],
                cache: &self.caches[k],
                params: host,
            };
            // The model input needs a gradient only when asked for.
            let wanted: Vec<bool> = node.inputs.iter().map(|&r| r != 0 || want_input).collect();
            let g = node.op.layer().backward_fast(&base, dy, &wanted);
            for (entry, values) in g.params {
                for (t, v) in flat[layout.entries[entry].range()].iter_mut().zip(values) {
                    *t += v as f64;
                }
            }
            for (&r, dx) in node.inputs.iter().zip(g.inputs) {
                match (dx, &mut grads[r]) {
                    (None, _) => {}
                    (Some(dx), Some(sum)) => {
                        sum.data.iter_mut().zip(&dx.data).for_each(|(s, v)| *s += v);
                    }
                    (Some(dx), empty) => *empty = Some(dx),
                }
            }
        }
        (flat, grads[0].take())
    }
}

/// The head's mean loss over the batch and its gradient with respect to the model's output
/// `z` (channel-major). Cross-entropy: `(softmax(z_i) − onehot(y_i)) / N`, from f64
/// probabilities; squared error: the mean over samples and values of `(z − t)²` (as
/// [`Head::losses`] and the candle path take it), gradient `2 (z − t) / (N · len)`.
pub fn head_loss_and_grad(head: &Head, z: &Act) -> Result<(f64, Act)> {
    if let Head::Output(_) = head {
        return Err(Error::Config(
            "backprop needs a differentiable head (cross-entropy or squared error); an output closure is a black box, use CGE or RGE".into(),
        ));
    }
    let (n, len) = (z.n, z.c * z.h * z.w);
    let mut out = Vec::with_capacity(z.data.len());
    append_batch_major(z, &mut out);
    let per_sample = head.losses(&out, 1, n, len)?;
    let loss = per_sample.iter().sum::<f64>() / n as f64;
    if !loss.is_finite() {
        return Err(Error::Diverged(format!(
            "the loss is {loss}; lower the learning rate (or μ)"
        )));
    }
    let mut d = Act::zeros(z.c, z.n, z.h, z.w);
    match head {
        Head::CrossEntropy(labels) => {
            let probs = softmax_columns(z);
            for (k, (dv, p)) in d.data.iter_mut().zip(&probs).enumerate() {
                let onehot = if labels[k % n] as usize == k / n {
                    1.0
                } else {
                    0.0
                };
                *dv = ((p - onehot) / n as f64) as f32;
            }
        }
        Head::SquaredError(targets) => {
            let hw = z.h * z.w;
            let scale = 2.0 / (n * len) as f64;
            for c in 0..z.c {
                let (zs, ds) = (z.plane(c), d.plane_mut(c));
                for i in 0..n {
                    for s in 0..hw {
                        let t = targets[i * len + c * hw + s];
                        ds[i * hw + s] = ((zs[i * hw + s] as f64 - t) * scale) as f32;
                    }
                }
            }
        }
        Head::Output(_) => unreachable!("returned above"),
    }
    Ok((loss, d))
}

/// The mean loss of `model` + `head` at `params` on the batch `x` (`[N, C, H, W]`, batch-major
/// f32, `n` samples), its gradient (flat, in the layout's order) and the batch-norm statistics
/// of the forward (for running statistics).
pub fn loss_and_grad(
    model: &Model,
    params: &[f32],
    x: &[f32],
    n: usize,
    head: &Head,
) -> Result<(f64, Vec<f64>, BnBatchStats)> {
    check_batch(model, params, x, n)?;
    check_head(model, head, n)?;
    let trace = Trace::forward(model, params, x, n)?;
    let (loss, d_output) = head_loss_and_grad(head, trace.output())?;
    let grad = trace.backward(d_output);
    Ok((loss, grad, trace.bn_batch_stats()))
}

/// Floating-point operations of one forward and backward on `n` samples by the cost model
/// ([`Model::node_costs`]): the backward counted as twice the forward (input and parameter
/// gradients), two operations per multiply-add.
pub fn step_flops(model: &Model, n: usize) -> f64 {
    let forward: u64 = model.node_costs().iter().sum();
    3.0 * 2.0 * forward as f64 * n as f64
}
