//! One training loop for every estimator.
//!
//! The trainer draws batches, asks the estimator for a gradient of the batch objective, applies
//! the optimizer with the scheduled learning rate, evaluates after each epoch and reports to an
//! [`Observer`]. It does not know how gradients are made.

use crate::data::{epoch_batches, gather, Augment, Dataset};
use crate::error::{Error, Result};
use crate::estimator::GradientEstimator;
use crate::model::{per_sample_cross_entropy, BnState, Mode, Model, Precision};
use crate::objective::ClassifierObjective;
use crate::optim::{Optimizer, OptimizerConfig, Schedule};
use candle_core::{DType, Device, Tensor, D};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::time::Instant;

/// Settings of the loop itself (the estimator is configured separately).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Epochs.
    pub epochs: usize,
    /// Training batch size.
    pub batch_size: usize,
    /// Batch size for evaluation.
    pub eval_batch_size: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Linear warm-up epochs before cosine decay.
    pub warmup_epochs: usize,
    /// Optimizer.
    pub optimizer: OptimizerConfig,
    /// Training-time augmentation.
    pub augment: Option<Augment>,
    /// Numeric precision.
    pub precision: Precision,
    /// Seed of every random choice (init, order, directions).
    pub seed: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            epochs: 20,
            batch_size: 64,
            eval_batch_size: 500,
            lr: 0.1,
            warmup_epochs: 0,
            optimizer: OptimizerConfig::default(),
            augment: None,
            precision: Precision::F32,
            seed: 0,
        }
    }
}

impl TrainConfig {
    /// Check ranges; messages name the flag.
    pub fn validate(&self) -> Result<()> {
        if self.epochs == 0 {
            return Err(Error::Config("--epochs must be at least 1".into()));
        }
        if self.batch_size == 0 || self.eval_batch_size == 0 {
            return Err(Error::Config("--batch-size must be at least 1".into()));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(Error::Config(format!(
                "--lr must be positive, got {}",
                self.lr
            )));
        }
        if self.warmup_epochs >= self.epochs && self.warmup_epochs > 0 {
            return Err(Error::Config(format!(
                "--warmup-epochs ({}) must be smaller than --epochs ({})",
                self.warmup_epochs, self.epochs
            )));
        }
        Ok(())
    }
}

/// Figures of one finished epoch (one line of `metrics.jsonl`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpochMetrics {
    /// 1-based epoch.
    pub epoch: usize,
    /// Mean training loss over the epoch's batches (at the pre-update parameters).
    pub train_loss: f64,
    /// Test loss (eval mode).
    pub test_loss: f64,
    /// Test accuracy in [0, 1].
    pub test_accuracy: f64,
    /// Queries used so far (cumulative).
    pub queries: u64,
    /// Training seconds so far (cumulative, evaluation excluded).
    pub seconds: f64,
    /// Learning rate at the epoch's last step.
    pub lr: f64,
}

/// Progress within an epoch.
#[derive(Clone, Debug)]
pub struct StepInfo {
    /// 1-based epoch.
    pub epoch: usize,
    /// 1-based step within the epoch.
    pub step: usize,
    /// Steps in the epoch.
    pub steps: usize,
    /// Loss of this step's batch.
    pub loss: f64,
    /// Queries so far (cumulative).
    pub queries: u64,
    /// Queries per second over the run so far.
    pub queries_per_second: f64,
}

/// Everything needed to continue a run: what a checkpoint holds.
#[derive(Clone, Debug)]
pub struct TrainState {
    /// Completed epochs.
    pub epoch: usize,
    /// Flat parameters.
    pub params: Tensor,
    /// Batch-norm running statistics.
    pub bn: BnState,
    /// Optimizer state.
    pub optimizer: HashMap<String, Tensor>,
    /// Queries so far.
    pub queries: u64,
    /// Training seconds so far.
    pub seconds: f64,
    /// Metrics of completed epochs.
    pub history: Vec<EpochMetrics>,
}

/// Receives progress; the CLI uses it for progress bars, metrics files and checkpoints.
pub trait Observer {
    /// After every step.
    fn on_step(&mut self, _info: &StepInfo) {}
    /// After every epoch, with the state to checkpoint.
    fn on_epoch_end(&mut self, _metrics: &EpochMetrics, _state: &TrainState) -> Result<()> {
        Ok(())
    }
}

/// An observer that ignores everything.
pub struct Silent;
impl Observer for Silent {}

/// Derive an independent seed from a base seed and a stream of integers (SplitMix64).
pub fn derive_seed(seed: u64, stream: &[u64]) -> u64 {
    let mut z = seed;
    for &s in stream {
        z = z.wrapping_add(0x9E37_79B9_7F4A_7C15).wrapping_add(s);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
    }
    z
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
    for chunk in idx.chunks(batch_size) {
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

/// The training loop.
pub struct Trainer<'a> {
    /// The network.
    pub model: &'a Model,
    /// Training data (normalised).
    pub train: &'a Dataset,
    /// Test data (normalised).
    pub test: &'a Dataset,
    /// Loop settings.
    pub config: &'a TrainConfig,
}

impl Trainer<'_> {
    /// Steps per epoch (the last partial batch is kept).
    pub fn steps_per_epoch(&self) -> usize {
        self.train.len().div_ceil(self.config.batch_size)
    }

    /// Train from `state` (fresh or restored) to `config.epochs`.
    pub fn run(
        &self,
        state: &mut TrainState,
        estimator: &mut dyn GradientEstimator,
        optimizer: &mut dyn Optimizer,
        observer: &mut dyn Observer,
    ) -> Result<()> {
        let cfg = self.config;
        cfg.validate()?;
        if self.train.is_empty() {
            return Err(Error::Config(
                "training data set is empty (check --train-limit)".into(),
            ));
        }
        let steps = self.steps_per_epoch();
        let schedule = Schedule {
            lr: cfg.lr,
            warmup_epochs: cfg.warmup_epochs,
            epochs: cfg.epochs,
            steps_per_epoch: steps,
        };
        let device = state.params.device().clone();
        let dtype = state.params.dtype();
        for epoch in state.epoch..cfg.epochs {
            estimator.on_epoch_start(epoch, cfg.seed, &mut state.params)?;
            let started = Instant::now();
            let base_seconds = state.seconds;
            let batches = epoch_batches(
                self.train.len(),
                cfg.batch_size,
                cfg.seed,
                epoch,
                true,
                false,
            );
            let mut aug_rng = StdRng::seed_from_u64(derive_seed(cfg.seed, &[1, epoch as u64]));
            let mut loss_sum = 0.0;
            let mut lr = cfg.lr;
            for (s, idx) in batches.iter().enumerate() {
                let augment = cfg.augment.as_ref().map(|a| (a, &mut aug_rng));
                let (x, y) = batch_tensors(self.train, idx, augment, dtype, &device)?;
                let obj = ClassifierObjective::new(self.model, x, y)?;
                let mut rng =
                    StdRng::seed_from_u64(derive_seed(cfg.seed, &[2, epoch as u64, s as u64]));
                let est = estimator.estimate(&obj, &state.params, &mut rng)?;
                if let Some(stats) = obj.take_bn_stats() {
                    state.bn.update(&stats);
                }
                lr = schedule.lr_at(epoch * steps + s);
                optimizer.step(&mut state.params, &est.grad, lr)?;
                state.queries += est.queries;
                loss_sum += est.loss;
                let seconds = base_seconds + started.elapsed().as_secs_f64();
                observer.on_step(&StepInfo {
                    epoch: epoch + 1,
                    step: s + 1,
                    steps,
                    loss: est.loss,
                    queries: state.queries,
                    queries_per_second: state.queries as f64 / seconds.max(1e-9),
                });
            }
            state.seconds = base_seconds + started.elapsed().as_secs_f64();
            let (test_loss, test_accuracy) = evaluate(
                self.model,
                &state.params,
                &state.bn,
                self.test,
                cfg.eval_batch_size,
            )?;
            let m = EpochMetrics {
                epoch: epoch + 1,
                train_loss: loss_sum / batches.len() as f64,
                test_loss,
                test_accuracy,
                queries: state.queries,
                seconds: state.seconds,
                lr,
            };
            state.epoch = epoch + 1;
            state.optimizer = optimizer.state();
            state.history.push(m.clone());
            observer.on_epoch_end(&m, state)?;
        }
        Ok(())
    }
}
