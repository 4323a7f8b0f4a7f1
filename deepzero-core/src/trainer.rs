//! One training loop for every task and every estimator.
//!
//! Per epoch the trainer asks the [`Task`] for each step's objective, the estimator for a
//! gradient of it, applies the optimizer with the scheduled learning rate, evaluates the task and
//! reports to an [`Observer`] (which checkpoints). It knows neither how gradients are made nor
//! what is being learned.

use crate::checkpoint::Fingerprint;
use crate::error::{Error, Result, Setting};
use crate::estimator::GradientEstimator;
use crate::optim::{Optimizer, OptimizerConfig, Schedule};
use crate::seed::step_rng;
use crate::task::{Metrics, Task};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::time::Instant;

pub use crate::seed::derive_seed;
pub use crate::task::{batch_tensors, evaluate};

/// Settings of the loop itself (the task and the estimator are configured separately).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Epochs.
    pub epochs: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Linear warm-up epochs before cosine decay.
    pub warmup_epochs: usize,
    /// Optimizer.
    pub optimizer: OptimizerConfig,
    /// Seed of every random choice (init, order, directions).
    pub seed: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            epochs: 20,
            lr: 0.1,
            warmup_epochs: 0,
            optimizer: OptimizerConfig::default(),
            seed: 0,
        }
    }
}

impl TrainConfig {
    /// Check ranges.
    pub fn validate(&self) -> Result<()> {
        if self.epochs == 0 {
            return Err(Error::invalid(Setting::Epochs, "must be at least 1"));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(Error::invalid(
                Setting::LearningRate,
                format!("must be positive, got {}", self.lr),
            ));
        }
        if self.warmup_epochs >= self.epochs && self.warmup_epochs > 0 {
            return Err(Error::invalid(
                Setting::WarmupEpochs,
                format!(
                    "({}) must be smaller than the number of epochs ({})",
                    self.warmup_epochs, self.epochs
                ),
            ));
        }
        Ok(())
    }
}

/// Figures of one finished epoch (one line of `metrics.jsonl`): `epoch`, `train_loss`, the task's
/// metrics in its order, `queries`, `seconds`, `lr`, as one flat JSON object.
#[derive(Clone, Debug, PartialEq)]
pub struct EpochMetrics {
    /// 1-based epoch.
    pub epoch: usize,
    /// Mean training loss over the epoch's steps (at the pre-update parameters).
    pub train_loss: f64,
    /// The task's evaluation.
    pub metrics: Metrics,
    /// Queries used so far (cumulative).
    pub queries: u64,
    /// Training seconds so far (cumulative, evaluation excluded).
    pub seconds: f64,
    /// Learning rate at the epoch's last step.
    pub lr: f64,
}

impl EpochMetrics {
    /// A figure by name: `train_loss`, `queries`, `seconds`, `lr`, `epoch` or a task metric.
    pub fn get(&self, name: &str) -> Option<f64> {
        match name {
            "epoch" => Some(self.epoch as f64),
            "train_loss" => Some(self.train_loss),
            "queries" => Some(self.queries as f64),
            "seconds" => Some(self.seconds),
            "lr" => Some(self.lr),
            _ => self
                .metrics
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| *v),
        }
    }
}

const FIXED: [&str; 5] = ["epoch", "train_loss", "queries", "seconds", "lr"];

impl Serialize for EpochMetrics {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(5 + self.metrics.len()))?;
        m.serialize_entry("epoch", &self.epoch)?;
        m.serialize_entry("train_loss", &self.train_loss)?;
        for (k, v) in &self.metrics {
            m.serialize_entry(k, v)?;
        }
        m.serialize_entry("queries", &self.queries)?;
        m.serialize_entry("seconds", &self.seconds)?;
        m.serialize_entry("lr", &self.lr)?;
        m.end()
    }
}

impl<'de> Deserialize<'de> for EpochMetrics {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = EpochMetrics;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object of epoch figures")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<EpochMetrics, A::Error> {
                use serde::de::Error as _;
                let mut fixed: HashMap<&str, serde_json::Value> = HashMap::new();
                let mut metrics = Vec::new();
                while let Some(k) = map.next_key::<String>()? {
                    match FIXED.iter().find(|f| **f == k) {
                        Some(f) => {
                            fixed.insert(f, map.next_value()?);
                        }
                        None => {
                            // Non-finite figures are written as null.
                            let v: Option<f64> = map.next_value()?;
                            metrics.push((k, v.unwrap_or(f64::NAN)));
                        }
                    }
                }
                let num = |k: &str| -> std::result::Result<f64, A::Error> {
                    match fixed.get(k) {
                        Some(serde_json::Value::Null) => Ok(f64::NAN),
                        Some(v) => v
                            .as_f64()
                            .ok_or_else(|| A::Error::custom(format!("`{k}` is not a number"))),
                        None => Err(A::Error::missing_field(
                            FIXED.iter().find(|f| **f == k).expect("fixed key"),
                        )),
                    }
                };
                let int = |k: &str| -> std::result::Result<u64, A::Error> {
                    fixed.get(k).and_then(|v| v.as_u64()).ok_or_else(|| {
                        A::Error::custom(format!("`{k}` is missing or not a whole number"))
                    })
                };
                Ok(EpochMetrics {
                    epoch: int("epoch")? as usize,
                    train_loss: num("train_loss")?,
                    metrics,
                    queries: int("queries")?,
                    seconds: num("seconds")?,
                    lr: num("lr")?,
                })
            }
        }
        d.deserialize_map(V)
    }
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
    /// Loss of this step's objective.
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
    /// Completed optimizer steps (over all epochs).
    pub steps: u64,
    /// Flat parameters.
    pub params: Tensor,
    /// The task's own state ([`Task::state`]; batch-norm running statistics for classification).
    pub task: serde_json::Value,
    /// Optimizer state.
    pub optimizer: HashMap<String, Tensor>,
    /// Queries so far.
    pub queries: u64,
    /// Training seconds so far.
    pub seconds: f64,
    /// Metrics of completed epochs.
    pub history: Vec<EpochMetrics>,
    /// What run this state belongs to, as its front end describes it: saved with every
    /// checkpoint and compared by [`checkpoint::load_checked`](crate::checkpoint::load_checked).
    pub fingerprint: Option<Fingerprint>,
}

impl TrainState {
    /// A fresh run at `params`.
    pub fn new(params: Tensor) -> TrainState {
        TrainState {
            epoch: 0,
            steps: 0,
            params,
            task: serde_json::Value::Null,
            optimizer: HashMap::new(),
            queries: 0,
            seconds: 0.0,
            history: Vec::new(),
            fingerprint: None,
        }
    }
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

/// The training loop.
pub struct Trainer<'a> {
    /// Loop settings.
    pub config: &'a TrainConfig,
}

impl Trainer<'_> {
    /// Train `task` from `state` (fresh or restored) to `config.epochs`. A restored state's task
    /// state is loaded into the task first.
    pub fn run(
        &self,
        task: &mut dyn Task,
        state: &mut TrainState,
        estimator: &mut dyn GradientEstimator,
        optimizer: &mut dyn Optimizer,
        observer: &mut dyn Observer,
    ) -> Result<()> {
        let cfg = self.config;
        cfg.validate()?;
        let d = task.layout().len();
        if state.params.dims() != [d] {
            return Err(Error::Shape(format!(
                "parameter vector has shape {:?}, the task trains {d} parameters",
                state.params.dims()
            )));
        }
        if !state.task.is_null() {
            task.load_state(&state.task)?;
        }
        let steps = task.steps_per_epoch();
        if steps == 0 {
            return Err(Error::Config("the task has no steps per epoch".into()));
        }
        let schedule = Schedule {
            lr: cfg.lr,
            warmup_epochs: cfg.warmup_epochs,
            epochs: cfg.epochs,
            steps_per_epoch: steps,
        };
        // The first loss this process sees: a loss BLOWUP times larger has diverged, finite or
        // not.
        let mut first_loss: Option<f64> = None;
        for epoch in state.epoch..cfg.epochs {
            estimator.on_epoch_start(epoch, cfg.seed, &mut state.params)?;
            task.begin_epoch(epoch, cfg.seed)?;
            let started = Instant::now();
            let base_seconds = state.seconds;
            let mut loss_sum = 0.0;
            let mut lr = cfg.lr;
            for s in 0..steps {
                let (est, bn) = {
                    let obj = task.objective(epoch, s, cfg.seed)?;
                    let mut rng = step_rng(cfg.seed, epoch, s);
                    let est = estimator
                        .estimate(obj.as_ref(), &state.params, &mut rng)
                        .map_err(|e| match e {
                            Error::Diverged(m) => Error::Diverged(format!(
                                "at epoch {}, step {}: {m}",
                                epoch + 1,
                                s + 1
                            )),
                            other => other,
                        })?;
                    (est, obj.take_bn_stats())
                };
                if !est.loss.is_finite() {
                    return Err(Error::Diverged(format!(
                        "the loss is {} at epoch {}, step {}; lower the learning rate (or μ)",
                        est.loss,
                        epoch + 1,
                        s + 1
                    )));
                }
                let first = *first_loss.get_or_insert(est.loss);
                if est.loss > BLOWUP * first.abs().max(BLOWUP_FLOOR) {
                    return Err(Error::Diverged(format!(
                        "the loss grew from {first:.4e} to {:.4e} (more than {BLOWUP:e} times) by \
                         epoch {}, step {}; lower the learning rate (now {})",
                        est.loss,
                        epoch + 1,
                        s + 1,
                        schedule.lr_at(epoch * steps + s)
                    )));
                }
                if !all_finite(&est.grad)? {
                    return Err(Error::Diverged(format!(
                        "the gradient estimate has NaN or infinite entries at epoch {}, step {} \
                         (loss {}); lower the learning rate, or μ if the loss is still small",
                        epoch + 1,
                        s + 1,
                        est.loss
                    )));
                }
                task.end_step(bn)?;
                lr = schedule.lr_at(epoch * steps + s);
                optimizer.step(&mut state.params, &est.grad, lr)?;
                state.queries += est.queries;
                state.steps += 1;
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
            let metrics = task.evaluate(&state.params).map_err(|e| match e {
                Error::Diverged(m) => Error::Diverged(format!(
                    "evaluating the model after epoch {}: {m}",
                    epoch + 1
                )),
                other => other,
            })?;
            let m = EpochMetrics {
                epoch: epoch + 1,
                train_loss: loss_sum / steps as f64,
                metrics,
                queries: state.queries,
                seconds: state.seconds,
                lr,
            };
            state.epoch = epoch + 1;
            state.optimizer = optimizer.state();
            state.task = task.state()?;
            state.history.push(m.clone());
            observer.on_epoch_end(&m, state)?;
        }
        Ok(())
    }
}

/// A run whose loss exceeds this many times its first loss has diverged (stopped like a NaN).
pub const BLOWUP: f64 = 1e3;
/// The smallest first loss [`BLOWUP`] is taken of (a run starting at a loss of zero may rise a
/// little without diverging).
const BLOWUP_FLOOR: f64 = 1e-6;

/// Whether every entry of `t` is a finite number (one pass; the sum in f64 cannot overflow
/// from finite f32 or reasonable f64 entries, and any NaN or infinity makes it non-finite).
fn all_finite(t: &Tensor) -> Result<bool> {
    let sum = t
        .to_dtype(candle_core::DType::F64)?
        .abs()?
        .sum_all()?
        .to_scalar::<f64>()?;
    Ok(sum.is_finite())
}
