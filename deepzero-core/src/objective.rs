//! What is optimised: a loss available as function values, optionally with a gradient.
//!
//! Estimators see only this trait. [`ClassifierObjective`] is a model's cross-entropy on one
//! batch; the certify and PDE crates provide objectives of their own.

use crate::error::{Error, Result};
use crate::layout::ParamLayout;
use crate::model::{per_sample_cross_entropy, BnBatchStats, Mode, Model};
use candle_core::{DType, Tensor, Var};
use std::cell::RefCell;

/// A scalar loss of a flat parameter vector.
///
/// Requirements: `loss` must be deterministic for fixed parameters (the same batch, no
/// dropout), so that finite differences measure the parameters' effect alone.
pub trait Objective {
    /// Layout of the parameter vector (per-layer figures, coordinate sets).
    fn layout(&self) -> &ParamLayout;
    /// The loss at `params` (one query).
    fn loss(&self, params: &Tensor) -> Result<f64>;
    /// The loss at the point whose gradient is being estimated. Objectives with state that
    /// follows training (batch-norm running statistics) record it here; defaults to `loss`.
    fn base_loss(&self, params: &Tensor) -> Result<f64> {
        self.loss(params)
    }
    /// Loss and exact gradient, where the objective is differentiable (`None` for black boxes).
    fn loss_and_grad(&self, _params: &Tensor) -> Result<Option<(f64, Tensor)>> {
        Ok(None)
    }
    /// Feature reuse, where the objective supports it.
    fn resumable(&self) -> Option<&dyn Resumable> {
        None
    }
    /// The fast CGE engine's capability: a [`Model`] graph and a host batch.
    fn fast(&self) -> Option<&dyn FastCapable> {
        None
    }
}

/// What the fast CGE engine ([`crate::fast`]) needs: the layer graph and the batch on the host.
pub trait FastCapable {
    /// The network.
    fn model(&self) -> &Model;
    /// Inputs `[N, C, H, W]` as f32 and labels.
    fn batch_host(&self) -> Result<(Vec<f32>, Vec<u32>)>;
    /// Record the batch-norm statistics of the base forward (running statistics follow them).
    fn record_bn_stats(&self, stats: BnBatchStats);
}

/// Capability for feature reuse: evaluate the loss with one parameter tensor replaced, resuming
/// the forward pass from cached inputs of the node that reads it.
pub trait Resumable {
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

/// Mean cross-entropy of a classifier on one batch.
pub struct ClassifierObjective<'a> {
    model: &'a Model,
    x: Tensor,
    y: Tensor,
    stats: RefCell<Option<BnBatchStats>>,
}

impl<'a> ClassifierObjective<'a> {
    /// `x`: `[N, C, H, W]` in the parameters' dtype; `y`: `[N]` u32 labels.
    pub fn new(model: &'a Model, x: Tensor, y: Tensor) -> Result<Self> {
        let dims = x.dims();
        if dims.len() != 4 || dims[1..] != model.input_shape {
            return Err(Error::Shape(format!(
                "batch has shape {:?}, model {} expects [N, {}, {}, {}]",
                dims, model.name, model.input_shape[0], model.input_shape[1], model.input_shape[2]
            )));
        }
        if y.dtype() != DType::U32 || y.dims() != [dims[0]] {
            return Err(Error::Shape(format!(
                "labels must be u32 [{}], got {:?} {:?}",
                dims[0],
                y.dtype(),
                y.dims()
            )));
        }
        Ok(ClassifierObjective {
            model,
            x,
            y,
            stats: RefCell::new(None),
        })
    }

    /// Batch-norm statistics recorded by the last `base_loss` call.
    pub fn take_bn_stats(&self) -> Option<BnBatchStats> {
        self.stats.borrow_mut().take()
    }

    fn mean_loss(&self, logits: &Tensor) -> Result<f64> {
        // Per-sample losses are summed in f64: the finite differences that estimators take are
        // tiny next to the loss, so the reduction should not add rounding of its own.
        let l = per_sample_cross_entropy(logits, &self.y)?
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?;
        let mean = l.iter().sum::<f64>() / l.len() as f64;
        if !mean.is_finite() {
            return Err(Error::Diverged(format!("loss is {mean}; lower --lr")));
        }
        Ok(mean)
    }

    fn cast(&self, params: &Tensor) -> Result<Tensor> {
        Ok(if self.x.dtype() == params.dtype() {
            self.x.clone()
        } else {
            self.x.to_dtype(params.dtype())?
        })
    }
}

impl Objective for ClassifierObjective<'_> {
    fn layout(&self) -> &ParamLayout {
        &self.model.layout
    }
    fn loss(&self, params: &Tensor) -> Result<f64> {
        let views = self.model.param_views(params)?;
        let logits = self
            .model
            .forward(&views, &self.cast(params)?, Mode::Train)?;
        self.mean_loss(&logits)
    }
    fn base_loss(&self, params: &Tensor) -> Result<f64> {
        Ok(self.prepare(params)?.0)
    }
    fn loss_and_grad(&self, params: &Tensor) -> Result<Option<(f64, Tensor)>> {
        let var = Var::from_tensor(params)?;
        let (loss, ReuseCache { regs, .. }) = self.base_forward(var.as_tensor())?;
        let logits = regs.last().expect("output register");
        let loss_t = per_sample_cross_entropy(logits, &self.y)?.mean_all()?;
        let grads = loss_t.backward()?;
        let g = grads
            .get(var.as_tensor())
            .cloned()
            .unwrap_or(var.as_tensor().zeros_like()?);
        Ok(Some((loss, g)))
    }
    fn resumable(&self) -> Option<&dyn Resumable> {
        Some(self)
    }
    fn fast(&self) -> Option<&dyn FastCapable> {
        Some(self)
    }
}

impl FastCapable for ClassifierObjective<'_> {
    fn model(&self) -> &Model {
        self.model
    }
    fn batch_host(&self) -> Result<(Vec<f32>, Vec<u32>)> {
        let x = self
            .x
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        Ok((x, self.y.to_vec1::<u32>()?))
    }
    fn record_bn_stats(&self, stats: BnBatchStats) {
        *self.stats.borrow_mut() = Some(stats);
    }
}

impl ClassifierObjective<'_> {
    /// The forward at the point being estimated: keeps every register and records the
    /// batch-norm statistics.
    fn base_forward(&self, params: &Tensor) -> Result<(f64, ReuseCache)> {
        let views = self.model.param_views(params)?;
        let mut stats = BnBatchStats::default();
        let regs = self.model.forward_cached(
            &views,
            &self.cast(params)?,
            Mode::Train,
            Some(&mut stats),
        )?;
        *self.stats.borrow_mut() = Some(stats);
        let loss = self.mean_loss(regs.last().expect("output register"))?;
        Ok((loss, ReuseCache { views, regs }))
    }
}

impl Resumable for ClassifierObjective<'_> {
    fn prepare(&self, params: &Tensor) -> Result<(f64, ReuseCache)> {
        self.base_forward(params)
    }
    fn loss_with(&self, cache: &ReuseCache, entry: usize, value: &Tensor) -> Result<f64> {
        let node = self.model.layout.entries[entry].node;
        let logits = self
            .model
            .resume(&cache.views, &cache.regs, node, entry, value)?;
        self.mean_loss(&logits)
    }
}
