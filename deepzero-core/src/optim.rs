//! Optimizers that take a gradient from any source, and the learning-rate schedule.

use crate::error::{Error, Result, Setting};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// Applies a gradient to the parameters.
pub trait Optimizer {
    /// One update with learning rate `lr`.
    fn step(&mut self, params: &mut Tensor, grad: &Tensor, lr: f64) -> Result<()>;
    /// Internal state for checkpoints (name → tensor).
    fn state(&self) -> HashMap<String, Tensor>;
    /// Restore state written by [`Optimizer::state`].
    fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()>;
}

/// Which optimizer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// SGD with momentum and weight decay (PyTorch's formulation).
    #[default]
    Sgd,
    /// Adam with L2 weight decay.
    Adam,
}

/// Optimizer settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OptimizerConfig {
    /// Which optimizer.
    pub kind: OptimizerKind,
    /// Momentum (SGD) or β1 (Adam).
    pub momentum: f64,
    /// L2 weight decay added to the gradient.
    pub weight_decay: f64,
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        OptimizerConfig {
            kind: OptimizerKind::Sgd,
            momentum: 0.9,
            weight_decay: 5e-4,
        }
    }
}

impl OptimizerConfig {
    /// Validate and build.
    pub fn build(&self) -> Result<Box<dyn Optimizer>> {
        if !(0.0..1.0).contains(&self.momentum) {
            return Err(Error::invalid(
                Setting::Momentum,
                format!("must be in [0, 1), got {}", self.momentum),
            ));
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            return Err(Error::invalid(
                Setting::WeightDecay,
                format!("must be ≥ 0, got {}", self.weight_decay),
            ));
        }
        Ok(match self.kind {
            OptimizerKind::Sgd => Box::new(Sgd {
                momentum: self.momentum,
                weight_decay: self.weight_decay,
                buf: None,
            }),
            OptimizerKind::Adam => Box::new(Adam {
                beta1: self.momentum,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: self.weight_decay,
                m: None,
                v: None,
                t: 0,
            }),
        })
    }
}

/// `buf = m·buf + (g + wd·θ)`, `θ -= lr·buf`.
#[derive(Debug)]
pub struct Sgd {
    momentum: f64,
    weight_decay: f64,
    buf: Option<Tensor>,
}

impl Optimizer for Sgd {
    fn step(&mut self, params: &mut Tensor, grad: &Tensor, lr: f64) -> Result<()> {
        let mut g = grad.clone();
        if self.weight_decay > 0.0 {
            g = (g + (&*params * self.weight_decay)?)?;
        }
        if self.momentum > 0.0 {
            let b = match self.buf.take() {
                Some(b) => ((b * self.momentum)? + g)?,
                None => g,
            };
            self.buf = Some(b.clone());
            g = b;
        }
        *params = (&*params - (g * lr)?)?;
        Ok(())
    }
    fn state(&self) -> HashMap<String, Tensor> {
        self.buf
            .iter()
            .map(|b| ("sgd.momentum".to_string(), b.clone()))
            .collect()
    }
    fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        self.buf = state.get("sgd.momentum").cloned();
        Ok(())
    }
}

/// Adam (Kingma & Ba) with bias correction.
#[derive(Debug)]
pub struct Adam {
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
    m: Option<Tensor>,
    v: Option<Tensor>,
    t: u64,
}

impl Optimizer for Adam {
    fn step(&mut self, params: &mut Tensor, grad: &Tensor, lr: f64) -> Result<()> {
        let mut g = grad.clone();
        if self.weight_decay > 0.0 {
            g = (g + (&*params * self.weight_decay)?)?;
        }
        self.t += 1;
        let m = match self.m.take() {
            Some(m) => ((m * self.beta1)? + (&g * (1.0 - self.beta1))?)?,
            None => (&g * (1.0 - self.beta1))?,
        };
        let v = match self.v.take() {
            Some(v) => ((v * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?,
            None => (g.sqr()? * (1.0 - self.beta2))?,
        };
        let bc1 = 1.0 - self.beta1.powi(self.t as i32);
        let bc2 = 1.0 - self.beta2.powi(self.t as i32);
        let denom = ((&v / bc2)?.sqrt()? + self.eps)?;
        let update = ((&m / bc1)? / denom)?;
        *params = (&*params - (update * lr)?)?;
        self.m = Some(m);
        self.v = Some(v);
        Ok(())
    }
    fn state(&self) -> HashMap<String, Tensor> {
        let mut s = HashMap::new();
        if let (Some(m), Some(v)) = (&self.m, &self.v) {
            s.insert("adam.m".into(), m.clone());
            s.insert("adam.v".into(), v.clone());
            s.insert(
                "adam.t".into(),
                Tensor::new(&[self.t as f64], m.device()).expect("scalar"),
            );
        }
        s
    }
    fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        self.m = state.get("adam.m").cloned();
        self.v = state.get("adam.v").cloned();
        if let Some(t) = state.get("adam.t") {
            let t = t
                .flatten_all()?
                .to_dtype(candle_core::DType::F64)?
                .to_vec1::<f64>()?;
            self.t = match t[..] {
                [t] if t.is_finite() && t >= 0.0 => t as u64,
                _ => {
                    return Err(Error::Shape(format!(
                        "the optimizer state `adam.t` is {t:?}, expected one step count"
                    )))
                }
            };
        }
        Ok(())
    }
}

/// Linear warm-up over `warmup_epochs`, then cosine decay to 0 at the end of training
/// (DeepZero's schedule), evaluated per step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    /// Peak learning rate.
    pub lr: f64,
    /// Warm-up epochs (may be 0).
    pub warmup_epochs: usize,
    /// Total epochs.
    pub epochs: usize,
    /// Steps per epoch.
    pub steps_per_epoch: usize,
}

impl Schedule {
    /// Learning rate for global step `step` (0-based).
    pub fn lr_at(&self, step: usize) -> f64 {
        let warm = self.warmup_epochs * self.steps_per_epoch;
        let total = (self.epochs * self.steps_per_epoch).max(1);
        if step < warm {
            self.lr * (step + 1) as f64 / warm as f64
        } else {
            let span = (total - warm.min(total)).max(1) as f64;
            let t = (step - warm) as f64 / span;
            0.5 * self.lr * (1.0 + (std::f64::consts::PI * t.min(1.0)).cos())
        }
    }
}
