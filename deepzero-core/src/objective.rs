//! What is optimised: a loss available as function values, optionally with a gradient.
//!
//! Estimators see only [`Objective`]. [`ModelObjective`] is a model followed by a [`Head`] on
//! one batch: cross-entropy for classifiers, or a closure (a black box) for anything else. The
//! certify and PDE crates build their objectives from it or implement the trait themselves.

use crate::error::{Error, Result};
use crate::fast::backprop;
use crate::head::Head;
use crate::layout::ParamLayout;
use crate::model::{per_sample_cross_entropy, BnBatchStats, Mode, Model};
use candle_core::{DType, Tensor, Var};
use std::sync::Mutex;

/// A scalar loss of a flat parameter vector.
///
/// Requirements: `loss` must be deterministic for fixed parameters (the same batch, no
/// dropout), so that finite differences measure the parameters' effect alone. Objectives are
/// `Sync`: estimators evaluate queries from several threads at once.
pub trait Objective: Sync {
    /// Layout of the parameter vector (per-layer figures, coordinate sets).
    fn layout(&self) -> &ParamLayout;
    /// The loss at `params` (one query).
    fn loss(&self, params: &[f64]) -> Result<f64>;
    /// The losses at many points in one call (`points.len()` queries). The default evaluates
    /// them one by one; objectives that answer a large batch faster (a black box behind a
    /// process or a model runtime) override it.
    fn losses(&self, points: &[&[f64]]) -> Result<Vec<f64>> {
        points.iter().map(|p| self.loss(p)).collect()
    }
    /// The loss at the point whose gradient is being estimated. Objectives with state that
    /// follows training (batch-norm running statistics) record it here; defaults to `loss`.
    fn base_loss(&self, params: &[f64]) -> Result<f64> {
        self.loss(params)
    }
    /// Loss and exact gradient, where the objective is differentiable (`None` for black boxes).
    fn loss_and_grad(&self, _params: &Tensor) -> Result<Option<(f64, Tensor)>> {
        Ok(None)
    }
    /// Feature reuse on candle tensors, where the objective supports it.
    fn resumable(&self) -> Option<&dyn Resumable> {
        None
    }
    /// The fast engine's capability: a [`Model`] graph, a host batch and a head.
    fn fast(&self) -> Option<&dyn FastCapable> {
        None
    }
    /// Batch-norm statistics recorded by the last base evaluation, taken out.
    fn take_bn_stats(&self) -> Option<BnBatchStats> {
        None
    }
}

/// What the fast engine ([`crate::fast`]) needs: the layer graph, the batch on the host, the head.
pub trait FastCapable: Sync {
    /// The network.
    fn model(&self) -> &Model;
    /// Inputs `[N, C, H, W]` as f32 (batch-major) and `N`.
    fn batch_host(&self) -> Result<(Vec<f32>, usize)>;
    /// What turns the model's output into per-sample losses.
    fn head(&self) -> &Head;
    /// Record the batch-norm statistics of the base forward (running statistics follow them).
    fn record_bn_stats(&self, stats: BnBatchStats);
}

/// Capability for feature reuse: evaluate the loss with one parameter tensor replaced, resuming
/// the forward pass from cached inputs of the node that reads it.
pub trait Resumable: Sync {
    /// Run the base forward, keep what later nodes read; returns the base loss and the cache.
    fn prepare(&self, params: &Tensor) -> Result<(f64, ReuseCache)>;
    /// Loss with parameter tensor `entry` (index into the layout) replaced by `value`.
    fn loss_with(&self, cache: &ReuseCache, entry: usize, value: &Tensor) -> Result<f64>;
}

/// Registers of a base forward and the parameter views it used.
pub struct ReuseCache {
    /// Parameter tensors (views into the base parameter vector).
    pub views: Vec<Tensor>,
    /// Every register of the base forward.
    pub regs: Vec<Tensor>,
}

/// A model followed by a head, on one batch: the mean over the batch of the head's per-sample
/// losses of the model's output (batch norm in train mode, as in every ZO query).
pub struct ModelObjective<'a> {
    model: &'a Model,
    x: Tensor,
    n: usize,
    head: Head,
    stats: Mutex<Option<BnBatchStats>>,
}

/// A classifier's mean cross-entropy on one batch.
pub type ClassifierObjective<'a> = ModelObjective<'a>;

impl<'a> ModelObjective<'a> {
    /// `x`: `[N, C, H, W]` in the parameters' dtype (queries run in that dtype).
    pub fn new(model: &'a Model, x: Tensor, head: Head) -> Result<Self> {
        let dims = x.dims();
        if dims.len() != 4 || dims[1..] != model.input_shape || dims[0] == 0 {
            return Err(Error::Shape(format!(
                "batch has shape {:?}, model {} expects [N ≥ 1, {}, {}, {}]",
                dims, model.name, model.input_shape[0], model.input_shape[1], model.input_shape[2]
            )));
        }
        let n = dims[0];
        head.check(n, model.output_len())?;
        Ok(ModelObjective {
            model,
            x,
            n,
            head,
            stats: Mutex::new(None),
        })
    }

    /// Cross-entropy against `y`, `[N]` u32 labels.
    pub fn classifier(model: &'a Model, x: Tensor, y: Tensor) -> Result<Self> {
        let n = x.dims().first().copied().unwrap_or(0);
        if y.dtype() != DType::U32 || y.dims() != [n] {
            return Err(Error::Shape(format!(
                "labels must be u32 [{n}], got {:?} {:?}",
                y.dtype(),
                y.dims()
            )));
        }
        let labels = y.to_vec1::<u32>()?;
        Self::new(model, x, Head::CrossEntropy(labels))
    }

    /// Loss and gradient by candle autograd, in the parameters' dtype on their device (what
    /// [`Objective::loss_and_grad`] runs for f64 or off the CPU; the reference for backprop on
    /// our kernels). Records the batch-norm statistics. Needs a cross-entropy or squared-error
    /// head.
    pub fn candle_loss_and_grad(&self, params: &Tensor) -> Result<(f64, Tensor)> {
        let var = Var::from_tensor(params)?;
        let (loss, ReuseCache { regs, .. }) = self.base_forward(var.as_tensor())?;
        let out = regs.last().expect("output register");
        let loss_t = match &self.head {
            Head::CrossEntropy(labels) => {
                let y = Tensor::from_slice(labels, labels.len(), out.device())?;
                per_sample_cross_entropy(out, &y)?.mean_all()?
            }
            Head::SquaredError(targets) => {
                let t = Tensor::from_slice(targets.as_slice(), out.shape(), out.device())?
                    .to_dtype(out.dtype())?;
                (out - t)?.sqr()?.mean_all()?
            }
            Head::Output(_) => {
                return Err(Error::Config(
                    "backprop needs a differentiable head (cross-entropy or squared error), not an output closure".into(),
                ))
            }
        };
        let grads = loss_t.backward()?;
        let g = grads
            .get(var.as_tensor())
            .cloned()
            .unwrap_or(var.as_tensor().zeros_like()?);
        Ok((loss, g))
    }

    /// The model.
    pub fn model(&self) -> &Model {
        self.model
    }

    /// The head.
    pub fn head_ref(&self) -> &Head {
        &self.head
    }

    fn params_tensor(&self, params: &[f64]) -> Result<Tensor> {
        Ok(Tensor::from_slice(params, params.len(), self.x.device())?.to_dtype(self.x.dtype())?)
    }

    /// Mean of the head's losses over `queries` stacked outputs (`[queries·N, ...]` tensors).
    fn mean_losses(&self, outputs: &[Tensor]) -> Result<Vec<f64>> {
        let len = self.model.output_len();
        let mut host = Vec::with_capacity(outputs.len() * self.n * len);
        for o in outputs {
            host.extend(o.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?);
        }
        let per = self.head.losses(&host, outputs.len(), self.n, len)?;
        per.chunks_exact(self.n)
            .map(|c| {
                let mean = c.iter().sum::<f64>() / self.n as f64;
                if mean.is_finite() {
                    Ok(mean)
                } else {
                    Err(Error::Diverged(format!(
                        "the loss is {mean}; lower the learning rate (or μ)"
                    )))
                }
            })
            .collect()
    }

    fn forward(&self, params: &[f64]) -> Result<Tensor> {
        let p = self.params_tensor(params)?;
        let views = self.model.param_views(&p)?;
        self.model.forward(&views, &self.x, Mode::Train)
    }

    /// The forward at the point being estimated: keeps every register and records the
    /// batch-norm statistics.
    fn base_forward(&self, params: &Tensor) -> Result<(f64, ReuseCache)> {
        let views = self.model.param_views(params)?;
        let mut stats = BnBatchStats::default();
        let x = if self.x.dtype() == params.dtype() {
            self.x.clone()
        } else {
            self.x.to_dtype(params.dtype())?
        };
        let regs = self
            .model
            .forward_cached(&views, &x, Mode::Train, Some(&mut stats))?;
        *self.stats.lock().expect("stats lock") = Some(stats);
        let loss =
            self.mean_losses(std::slice::from_ref(regs.last().expect("output register")))?[0];
        Ok((loss, ReuseCache { views, regs }))
    }
}

impl Objective for ModelObjective<'_> {
    fn layout(&self) -> &ParamLayout {
        &self.model.layout
    }
    fn loss(&self, params: &[f64]) -> Result<f64> {
        Ok(self.mean_losses(&[self.forward(params)?])?[0])
    }
    fn losses(&self, points: &[&[f64]]) -> Result<Vec<f64>> {
        // One head call for all the points: a black box behind the head answers one batch.
        let outs: Vec<Tensor> = points
            .iter()
            .map(|p| self.forward(p))
            .collect::<Result<_>>()?;
        self.mean_losses(&outs)
    }
    fn base_loss(&self, params: &[f64]) -> Result<f64> {
        Ok(self.base_forward(&self.params_tensor(params)?)?.0)
    }
    fn loss_and_grad(&self, params: &Tensor) -> Result<Option<(f64, Tensor)>> {
        if matches!(self.head, Head::Output(_)) {
            return Ok(None);
        }
        if params.dtype() != DType::F32 || !params.device().is_cpu() {
            return self.candle_loss_and_grad(params).map(Some);
        }
        // f32 on the CPU: backprop on our kernels.
        let (x, n) = self.batch_host()?;
        let p = params.to_vec1::<f32>()?;
        let (loss, grad, stats) = backprop::loss_and_grad(self.model, &p, &x, n, &self.head)?;
        *self.stats.lock().expect("stats lock") = Some(stats);
        let grad: Vec<f32> = grad.iter().map(|&v| v as f32).collect();
        let len = grad.len();
        Ok(Some((loss, Tensor::from_vec(grad, len, params.device())?)))
    }
    fn resumable(&self) -> Option<&dyn Resumable> {
        Some(self)
    }
    fn fast(&self) -> Option<&dyn FastCapable> {
        Some(self)
    }
    fn take_bn_stats(&self) -> Option<BnBatchStats> {
        self.stats.lock().expect("stats lock").take()
    }
}

impl FastCapable for ModelObjective<'_> {
    fn model(&self) -> &Model {
        self.model
    }
    fn batch_host(&self) -> Result<(Vec<f32>, usize)> {
        let x = self
            .x
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        Ok((x, self.n))
    }
    fn head(&self) -> &Head {
        &self.head
    }
    fn record_bn_stats(&self, stats: BnBatchStats) {
        *self.stats.lock().expect("stats lock") = Some(stats);
    }
}

impl Resumable for ModelObjective<'_> {
    fn prepare(&self, params: &Tensor) -> Result<(f64, ReuseCache)> {
        self.base_forward(params)
    }
    fn loss_with(&self, cache: &ReuseCache, entry: usize, value: &Tensor) -> Result<f64> {
        let node = self.model.layout.entries[entry].node;
        let out = self
            .model
            .resume(&cache.views, &cache.regs, node, entry, value)?;
        Ok(self.mean_losses(&[out])?[0])
    }
}
