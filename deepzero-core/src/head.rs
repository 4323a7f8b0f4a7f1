//! Heads: what turns a model's output into per-sample losses.
//!
//! A model-based objective is *model + head*. The fast engine ([`crate::fast`]) propagates a
//! query's change through the model and hands the head the output; the naive path runs the whole
//! model and hands the head the same output. Cross-entropy over labels is evaluated in closed form
//! (in f64, from the change of the logits); any other loss is a closure that receives the
//! perturbed outputs of many queries at once, so that a black box behind it (a classifier we may
//! only query, a process, a model runtime) answers one large batch instead of many small ones.

use crate::error::{Error, Result};
use std::sync::Arc;

/// A per-sample loss of a model's output that the estimators cannot differentiate.
///
/// Arguments: `outputs`, `queries` blocks of the batch's `N` outputs (batch-major: sample `i`
/// of block `q` starts at `(q·N + i)·len`, each output `len = Model::output_len()` values, in
/// f64), and `queries`. Returns `queries · N` per-sample losses in the same order. Sample `i` of
/// every block is sample `i` of the objective's batch, so the closure may capture per-sample
/// targets. It must be deterministic.
pub type OutputLossFn = dyn Fn(&[f64], usize) -> Result<Vec<f64>> + Send + Sync;

/// What follows the model.
#[derive(Clone)]
pub enum Head {
    /// Cross-entropy of the logits against these labels (one per sample).
    CrossEntropy(Vec<u32>),
    /// Any per-sample loss of the output, batched over queries.
    Output(Arc<OutputLossFn>),
    /// Mean squared error of each sample's output against its target (`N · len` values,
    /// batch-major): the regression loss, with a gradient for backprop.
    SquaredError(Arc<Vec<f64>>),
}

impl std::fmt::Debug for Head {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Head::CrossEntropy(l) => write!(f, "CrossEntropy({} labels)", l.len()),
            Head::Output(_) => write!(f, "Output(closure)"),
            Head::SquaredError(t) => write!(f, "SquaredError({} target values)", t.len()),
        }
    }
}

impl Head {
    /// A head from a closure (see [`OutputLossFn`]).
    pub fn output(f: impl Fn(&[f64], usize) -> Result<Vec<f64>> + Send + Sync + 'static) -> Head {
        Head::Output(Arc::new(f))
    }

    /// Per-sample losses of `queries` blocks of `n` outputs of `len` values each (batch-major,
    /// f64), as [`OutputLossFn`] describes; checks what the closure returns.
    pub fn losses(
        &self,
        outputs: &[f64],
        queries: usize,
        n: usize,
        len: usize,
    ) -> Result<Vec<f64>> {
        if outputs.len() != queries * n * len {
            return Err(Error::Shape(format!(
                "head: {} output values for {queries} queries of {n} samples × {len}",
                outputs.len()
            )));
        }
        match self {
            Head::CrossEntropy(labels) => {
                if labels.len() != n {
                    return Err(Error::Shape(format!(
                        "head: {} labels for a batch of {n}",
                        labels.len()
                    )));
                }
                Ok(outputs
                    .chunks_exact(len)
                    .enumerate()
                    .map(|(r, z)| cross_entropy_f64(z, labels[r % n] as usize))
                    .collect())
            }
            Head::SquaredError(targets) => {
                if targets.len() != n * len {
                    return Err(Error::Shape(format!(
                        "head: {} target values for {n} samples × {len}",
                        targets.len()
                    )));
                }
                Ok(outputs
                    .chunks_exact(len)
                    .enumerate()
                    .map(|(r, o)| {
                        let t = &targets[(r % n) * len..][..len];
                        o.iter().zip(t).map(|(a, b)| (a - b) * (a - b)).sum::<f64>() / len as f64
                    })
                    .collect())
            }
            Head::Output(f) => {
                let l = f(outputs, queries)?;
                if l.len() != queries * n {
                    return Err(Error::Shape(format!(
                        "head: the output loss returned {} values for {queries} queries of {n} samples",
                        l.len()
                    )));
                }
                Ok(l)
            }
        }
    }

    /// Squared error against `targets` (`N · len` values, batch-major).
    pub fn squared_error(targets: Vec<f64>) -> Head {
        Head::SquaredError(Arc::new(targets))
    }

    /// Check the head against a batch of `n` samples and outputs of `len` values.
    pub fn check(&self, n: usize, len: usize) -> Result<()> {
        if let Head::SquaredError(t) = self {
            if t.len() != n * len {
                return Err(Error::Shape(format!(
                    "{} target values for {n} samples of {len} outputs",
                    t.len()
                )));
            }
        }
        if let Head::CrossEntropy(labels) = self {
            if labels.len() != n {
                return Err(Error::Shape(format!(
                    "{} labels for a batch of {n}",
                    labels.len()
                )));
            }
            if let Some(&y) = labels.iter().find(|&&y| y as usize >= len) {
                return Err(Error::Shape(format!(
                    "label {y} out of range for {len} classes"
                )));
            }
        }
        Ok(())
    }
}

/// Cross-entropy of one logit vector against class `y`, in f64 (log-sum-exp with the maximum
/// subtracted).
pub fn cross_entropy_f64(z: &[f64], y: usize) -> f64 {
    let mx = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let lse = mx + z.iter().map(|&v| (v - mx).exp()).sum::<f64>().ln();
    lse - z[y]
}
