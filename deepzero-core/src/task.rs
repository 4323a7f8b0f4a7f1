//! Tasks: what one application trains.
//!
//! The [`Trainer`](crate::trainer::Trainer) runs epochs, the learning-rate schedule, the
//! estimator, the optimizer, progress and checkpoints over any [`Task`]. A task supplies what is
//! specific to the application: how many steps an epoch has, the [`Objective`] of each step
//! (built deterministically from the seed), evaluation as named metrics, and the state that must
//! survive a checkpoint. Classification ([`ClassificationTask`]) is one task; the certify crate's
//! denoiser training and the PDE crate's solver-in-the-loop training are tasks in their crates.
//!
//! # Example: a task outside core
//!
//! Fit `θ` so that `θ·x` matches a target through a black box (`round` is not differentiable,
//! and estimators never look inside the closure):
//!
//! ```
//! use deepzero_core::estimator::Cge;
//! use deepzero_core::layout::{ParamKind, ParamLayout};
//! use deepzero_core::objective::Objective;
//! use deepzero_core::optim::{OptimizerConfig, OptimizerKind};
//! use deepzero_core::query::{Difference, QueryEngine};
//! use deepzero_core::task::{Metrics, Task};
//! use deepzero_core::trainer::{Silent, TrainConfig, TrainState, Trainer};
//! use deepzero_core::Result;
//!
//! /// Squared error of a 4-parameter linear map, seen through a black box.
//! struct Fit { layout: ParamLayout }
//! struct FitStep<'a> { task: &'a Fit, x: [f64; 4] }
//!
//! impl Objective for FitStep<'_> {
//!     fn layout(&self) -> &ParamLayout { &self.task.layout }
//!     fn loss(&self, p: &[f64]) -> Result<f64> {
//!         let y: f64 = p.iter().zip(&self.x).map(|(a, b)| a * b).sum();
//!         let target = self.x.iter().sum::<f64>(); // θ = (1, 1, 1, 1) is optimal
//!         let black_box = |v: f64| (v * 1e6).round() / 1e6;
//!         Ok(black_box((y - target).powi(2)))
//!     }
//! }
//!
//! impl Task for Fit {
//!     fn layout(&self) -> &ParamLayout { &self.layout }
//!     fn steps_per_epoch(&self) -> usize { 4 }
//!     fn objective(&self, epoch: usize, step: usize, _seed: u64) -> Result<Box<dyn Objective + '_>> {
//!         let k = (epoch * 4 + step) as f64;
//!         let x = [1.0, (k * 0.7).sin(), (k * 1.3).cos(), (k * 2.9 + 1.0).sin()];
//!         Ok(Box::new(FitStep { task: self, x }))
//!     }
//!     fn evaluate(&self, params: &candle_core::Tensor) -> Result<Metrics> {
//!         let p = params.to_vec1::<f64>()?;
//!         let err = p.iter().map(|v| (v - 1.0).powi(2)).sum::<f64>().sqrt();
//!         Ok(vec![("param_error".to_string(), err)])
//!     }
//! }
//!
//! let mut layout = ParamLayout::default();
//! layout.push("theta", ParamKind::Weight, vec![4], 0);
//! let mut task = Fit { layout };
//! let config = TrainConfig {
//!     epochs: 30, lr: 0.2, warmup_epochs: 0, seed: 0,
//!     optimizer: OptimizerConfig { kind: OptimizerKind::Sgd, momentum: 0.0, weight_decay: 0.0 },
//! };
//! let params = candle_core::Tensor::zeros(4, candle_core::DType::F64, &candle_core::Device::Cpu)?;
//! let mut state = TrainState::new(params);
//! let mut cge = Cge::new(1e-4, Difference::Central, QueryEngine::Naive)?;
//! let mut sgd = config.optimizer.build()?;
//! Trainer { config: &config }.run(&mut task, &mut state, &mut cge, sgd.as_mut(), &mut Silent)?;
//! let first = state.history[0].get("param_error").unwrap();
//! let last = state.history.last().unwrap().get("param_error").unwrap();
//! assert!(last < 0.1 * first, "{first} -> {last}");
//! # Ok::<(), deepzero_core::Error>(())
//! ```

use crate::data::{epoch_batches, gather, Augment, Dataset};
use crate::error::{Error, Result};
use crate::layout::ParamLayout;
use crate::model::{per_sample_cross_entropy, BnBatchStats, BnState, Mode, Model, Precision};
use crate::objective::{ModelObjective, Objective};
use crate::seed::{derive_seed, stream_rng};
use candle_core::{DType, Device, Tensor, D};
use rand::rngs::StdRng;

/// Named evaluation figures, in the order the task reports them (`[("test_loss", 0.4), ...]`).
pub type Metrics = Vec<(String, f64)>;

/// What one application trains. See the [module documentation](self) for an example.
///
/// Requirements: [`Task::objective`] must be a function of `(epoch, step, seed)` and the task's
/// state, so that a resumed run repeats the same steps; the objective it returns must be
/// deterministic in the parameters (see [`Objective`]).
pub trait Task {
    /// Layout of the trained parameter vector.
    fn layout(&self) -> &ParamLayout;
    /// Optimizer steps in one epoch.
    fn steps_per_epoch(&self) -> usize;
    /// Called before the first step of every epoch (also when a run resumes).
    fn begin_epoch(&mut self, _epoch: usize, _seed: u64) -> Result<()> {
        Ok(())
    }
    /// The objective of step `step` (0-based) of epoch `epoch` (0-based).
    fn objective(&self, epoch: usize, step: usize, seed: u64) -> Result<Box<dyn Objective + '_>>;
    /// After a step: batch-norm statistics the step's base forward recorded (running statistics
    /// follow them).
    fn end_step(&mut self, _bn: Option<BnBatchStats>) -> Result<()> {
        Ok(())
    }
    /// Evaluation after an epoch, as named metrics.
    fn evaluate(&self, params: &Tensor) -> Result<Metrics>;
    /// State to checkpoint besides parameters and optimizer (batch-norm running statistics).
    fn state(&self) -> Result<serde_json::Value> {
        Ok(serde_json::Value::Null)
    }
    /// Restore what [`Task::state`] returned.
    fn load_state(&mut self, _state: &serde_json::Value) -> Result<()> {
        Ok(())
    }
    /// The objective that pruning at initialisation scores (default: the first step's).
    fn pruning_objective(&self, seed: u64) -> Result<Box<dyn Objective + '_>> {
        self.objective(0, 0, seed)
    }
}

/// Settings of classification beyond the model and the data.
#[derive(Clone, Debug, PartialEq)]
pub struct ClassificationConfig {
    /// Training batch size.
    pub batch_size: usize,
    /// Batch size for evaluation.
    pub eval_batch_size: usize,
    /// Training-time augmentation.
    pub augment: Option<Augment>,
    /// Numeric precision of the batches.
    pub precision: Precision,
    /// Samples per class in the pruning batch.
    pub prune_per_class: usize,
}

impl Default for ClassificationConfig {
    fn default() -> Self {
        ClassificationConfig {
            batch_size: 64,
            eval_batch_size: 500,
            augment: None,
            precision: Precision::F32,
            prune_per_class: 25,
        }
    }
}

/// Seed stream of the pruning batch.
pub const PRUNE_STREAM: u64 = 0x5052_554e;

/// The shuffled mini-batches of a training set, epoch by epoch: drawn from `(seed, epoch)` by
/// [`epoch_batches`] when an epoch begins and looked up by step. A step of another epoch (say,
/// before `begin_epoch` on a resumed run) is drawn again from the seed, so it is the same batch.
#[derive(Clone, Debug)]
pub struct EpochBatches {
    len: usize,
    batch_size: usize,
    current: Option<(usize, Vec<Vec<usize>>)>,
}

impl EpochBatches {
    /// Batches of `batch_size` (≥ 1) over `len` samples; the last one may be short.
    pub fn new(len: usize, batch_size: usize) -> Self {
        Self {
            len,
            batch_size,
            current: None,
        }
    }

    /// Steps per epoch.
    pub fn steps(&self) -> usize {
        self.len.div_ceil(self.batch_size)
    }

    fn draw(&self, epoch: usize, seed: u64) -> Vec<Vec<usize>> {
        epoch_batches(self.len, self.batch_size, seed, epoch, true, false)
    }

    /// Draws the batches of `epoch`.
    pub fn begin(&mut self, epoch: usize, seed: u64) {
        self.current = Some((epoch, self.draw(epoch, seed)));
    }

    /// The sample indices of step `step` of `epoch`.
    pub fn get(&self, epoch: usize, step: usize, seed: u64) -> Result<Vec<usize>> {
        let batch = match &self.current {
            Some((e, b)) if *e == epoch => b.get(step).cloned(),
            _ => self.draw(epoch, seed).into_iter().nth(step),
        };
        batch.ok_or_else(|| {
            Error::Config(format!(
                "no batch {step} in epoch {epoch}: an epoch has {} steps",
                self.steps()
            ))
        })
    }
}

/// Image classification: mean cross-entropy on shuffled mini-batches; test loss and accuracy.
pub struct ClassificationTask<'a> {
    model: &'a Model,
    train: &'a Dataset,
    test: &'a Dataset,
    config: ClassificationConfig,
    bn: BnState,
    batches: EpochBatches,
}

impl<'a> ClassificationTask<'a> {
    /// Train `model` on `train`, evaluate on `test` (both normalised).
    pub fn new(
        model: &'a Model,
        train: &'a Dataset,
        test: &'a Dataset,
        config: ClassificationConfig,
    ) -> Result<Self> {
        if train.is_empty() {
            return Err(Error::Config("the training data set is empty".into()));
        }
        if test.is_empty() {
            return Err(Error::Config("the test data set is empty".into()));
        }
        if config.batch_size == 0 || config.eval_batch_size == 0 {
            return Err(Error::Config("the batch size must be at least 1".into()));
        }
        for ds in [train, test] {
            let shape = [ds.channels, ds.height, ds.width];
            if shape != model.input_shape {
                return Err(Error::Shape(format!(
                    "images are {shape:?}, model {} expects {:?}",
                    model.name, model.input_shape
                )));
            }
        }
        Ok(ClassificationTask {
            model,
            train,
            test,
            bn: model.new_bn_state(),
            batches: EpochBatches::new(train.len(), config.batch_size),
            config,
        })
    }

    /// Running batch-norm statistics.
    pub fn bn_state(&self) -> &BnState {
        &self.bn
    }

    fn device(&self) -> Device {
        Device::Cpu
    }

    fn objective_on(
        &self,
        ds: &Dataset,
        idx: &[usize],
        aug: Option<&mut StdRng>,
    ) -> Result<ModelObjective<'a>> {
        let augment = match (&self.config.augment, aug) {
            (Some(a), Some(rng)) => Some((a, rng)),
            _ => None,
        };
        let (x, y) = batch_tensors(
            ds,
            idx,
            augment,
            self.config.precision.dtype(),
            &self.device(),
        )?;
        ModelObjective::classifier(self.model, x, y)
    }
}

impl Task for ClassificationTask<'_> {
    fn layout(&self) -> &ParamLayout {
        &self.model.layout
    }
    fn steps_per_epoch(&self) -> usize {
        self.batches.steps()
    }
    fn begin_epoch(&mut self, epoch: usize, seed: u64) -> Result<()> {
        self.batches.begin(epoch, seed);
        Ok(())
    }
    fn objective(&self, epoch: usize, step: usize, seed: u64) -> Result<Box<dyn Objective + '_>> {
        let idx = self.batches.get(epoch, step, seed)?;
        let mut aug = stream_rng(seed, &[1, epoch as u64, step as u64]);
        Ok(Box::new(self.objective_on(
            self.train,
            &idx,
            Some(&mut aug),
        )?))
    }
    fn end_step(&mut self, bn: Option<BnBatchStats>) -> Result<()> {
        if let Some(s) = bn {
            self.bn.update(&s);
        }
        Ok(())
    }
    fn evaluate(&self, params: &Tensor) -> Result<Metrics> {
        let (loss, acc) = evaluate(
            self.model,
            params,
            &self.bn,
            self.test,
            self.config.eval_batch_size,
        )?;
        Ok(vec![
            ("test_loss".to_string(), loss),
            ("test_accuracy".to_string(), acc),
        ])
    }
    fn state(&self) -> Result<serde_json::Value> {
        Ok(self.bn.to_task_state())
    }
    fn load_state(&mut self, state: &serde_json::Value) -> Result<()> {
        self.bn = BnState::from_task_state(state, self.model)?.ok_or_else(|| {
            Error::Config("classification checkpoint has no batch-norm statistics (`bn`)".into())
        })?;
        Ok(())
    }
    fn pruning_objective(&self, seed: u64) -> Result<Box<dyn Objective + '_>> {
        if self.config.prune_per_class == 0 {
            return Err(Error::Config(
                "samples per class of the pruning batch must be at least 1".into(),
            ));
        }
        let sample = self.train.balanced_sample(
            self.config.prune_per_class,
            derive_seed(seed, &[PRUNE_STREAM, 0]),
        );
        let idx: Vec<usize> = (0..sample.len()).collect();
        let (x, y) = batch_tensors(
            &sample,
            &idx,
            None,
            self.config.precision.dtype(),
            &self.device(),
        )?;
        Ok(Box::new(ModelObjective::classifier(self.model, x, y)?))
    }
}

/// Copy samples into tensors `x [B, C, H, W]` (given dtype) and `y [B]` (u32).
pub fn batch_tensors(
    ds: &Dataset,
    idx: &[usize],
    augment: Option<(&Augment, &mut StdRng)>,
    dtype: DType,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let (xs, ys) = gather(ds, idx, augment);
    let x = Tensor::from_vec(xs, (idx.len(), ds.channels, ds.height, ds.width), device)?
        .to_dtype(dtype)?;
    let y = Tensor::from_vec(
        ys.into_iter().map(u32::from).collect::<Vec<u32>>(),
        idx.len(),
        device,
    )?;
    Ok((x, y))
}

/// Mean loss and accuracy of the model on a data set, batch norm in eval mode.
pub fn evaluate(
    model: &Model,
    params: &Tensor,
    bn: &BnState,
    ds: &Dataset,
    batch_size: usize,
) -> Result<(f64, f64)> {
    if ds.is_empty() {
        return Err(Error::Config("evaluation data set is empty".into()));
    }
    let views = model.param_views(params)?;
    let (mut loss, mut correct) = (0.0f64, 0usize);
    let idx: Vec<usize> = (0..ds.len()).collect();
    for chunk in idx.chunks(batch_size.max(1)) {
        let (x, y) = batch_tensors(ds, chunk, None, params.dtype(), params.device())?;
        let logits = model.forward(&views, &x, Mode::Eval(bn))?;
        loss += per_sample_cross_entropy(&logits, &y)?
            .to_dtype(DType::F64)?
            .sum_all()?
            .to_scalar::<f64>()?;
        let pred = logits.argmax(D::Minus1)?;
        correct += pred
            .eq(&y)?
            .to_dtype(DType::F64)?
            .sum_all()?
            .to_scalar::<f64>()? as usize;
    }
    Ok((loss / ds.len() as f64, correct as f64 / ds.len() as f64))
}
