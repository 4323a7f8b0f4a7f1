//! Randomized smoothing (Cohen, Rosenfeld & Kolter, ICML 2019).
//!
//! The smoothed classifier is g(x) = argmax_c P[f(x + δ) = c], δ ~ N(0, σ²I), with the noise
//! added in [0, 1] pixel space and not clipped. f is any [`BlackBox`]; it is only queried, in
//! batches of [`Smoothed::batch`] noisy copies.
//!
//! - [`Smoothed::certify`] (CERTIFY): n0 samples pick a candidate ĉ; n fresh samples count
//!   nA = #{f(x + δ) = ĉ}; pA = BetaInv(α; nA, n − nA + 1), the one-sided (1 − α)
//!   Clopper–Pearson lower bound; abstain if pA < ½, else the ℓ2 radius is σ·Φ⁻¹(pA). With
//!   probability at least 1 − α the answer is not a wrong certificate.
//! - [`Smoothed::predict`] (PREDICT): the top two counts c1 ≥ c2 of n samples; abstain if the
//!   two-sided binomial test of c1 successes in c1 + c2 trials at p = ½ has p-value > α.

use rand::Rng;
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Serialize};
use statrs::distribution::{Beta, ContinuousCDF, Normal as StdNormal};
use statrs::function::beta::beta_reg;

use crate::classifier::{argmax_rows, check_batch, classes_in, BlackBox};
use crate::error::{Error, Result};

/// Smoothing and certification settings, with Cohen et al.'s defaults (σ = 0.25,
/// n0 = 100, n = 100,000, α = 0.001) and 1000 noisy images per query batch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SmoothingConfig {
    /// Noise standard deviation σ in [0, 1] pixel units (> 0).
    pub sigma: f64,
    /// Selection samples of CERTIFY (≥ 1).
    pub n0: u64,
    /// Estimation samples of CERTIFY and samples of PREDICT (≥ 1).
    pub n: u64,
    /// Failure probability α in (0, 1).
    pub alpha: f64,
    /// Noisy images per classifier query (≥ 1).
    pub batch: usize,
}

impl Default for SmoothingConfig {
    fn default() -> Self {
        SmoothingConfig {
            sigma: 0.25,
            n0: 100,
            n: 100_000,
            alpha: 0.001,
            batch: 1000,
        }
    }
}

impl SmoothingConfig {
    /// Check every field; the error names the first bad one.
    pub fn validate(&self) -> Result<()> {
        check_sigma(self.sigma)?;
        check_batch_size(self.batch)?;
        check_count("n0", self.n0)?;
        check_count("n", self.n)?;
        check_alpha(self.alpha)
    }
}

/// The outcome of [`Smoothed::certify`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Certificate {
    /// The certified class, `None` when the smoothed classifier abstains.
    pub class: Option<usize>,
    /// Certified ℓ2 radius in [0, 1] pixel units (0 when abstaining).
    pub radius: f64,
    /// The candidate ĉ chosen from the selection samples (reported even when abstaining).
    pub candidate: usize,
    /// nA: estimation samples classified as the candidate.
    pub count: u64,
    /// n: estimation samples.
    pub n: u64,
    /// pA: the one-sided (1 − α) Clopper–Pearson lower bound on P[f(x + δ) = ĉ].
    pub p_lower: f64,
}

/// The outcome of [`Smoothed::predict`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    /// The predicted class, `None` when the smoothed classifier abstains.
    pub class: Option<usize>,
    /// Counts of every class over the n samples.
    pub counts: Vec<u64>,
    /// Two-sided binomial-test p-value of the top count against the runner-up.
    pub p_value: f64,
}

/// A classifier smoothed with isotropic Gaussian noise.
pub struct Smoothed<C> {
    classifier: C,
    sigma: f64,
    batch: usize,
}

impl<C: BlackBox> Smoothed<C> {
    /// Smooth `classifier` with noise of standard deviation `sigma` (pixel units, > 0),
    /// querying it in batches of `batch` (≥ 1) noisy images.
    pub fn new(classifier: C, sigma: f64, batch: usize) -> Result<Self> {
        check_sigma(sigma)?;
        check_batch_size(batch)?;
        check_batch_memory(batch, classifier.input_shape().iter().product())?;
        Ok(Smoothed {
            classifier,
            sigma,
            batch,
        })
    }

    /// Smooth `classifier` with `config`'s σ and batch size, after checking all of `config`.
    pub fn from_config(classifier: C, config: &SmoothingConfig) -> Result<Self> {
        config.validate()?;
        Self::new(classifier, config.sigma, config.batch)
    }

    /// The base classifier.
    pub fn classifier(&self) -> &C {
        &self.classifier
    }

    /// Noise standard deviation σ.
    pub fn sigma(&self) -> f64 {
        self.sigma
    }

    /// Noisy images per query batch.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// The base classifier back.
    pub fn into_inner(self) -> C {
        self.classifier
    }

    /// Class counts of f(x + δ) over `num` noise draws from `rng`, queried in batches.
    ///
    /// The noise is drawn image by image, pixel by pixel, so the counts for a seed do not
    /// depend on the batch size. The next batch's noise is drawn while the classifier
    /// evaluates the current one (the same draws in the same order).
    pub fn sample_counts<R: Rng + Send + ?Sized>(
        &self,
        x: &[f32],
        num: u64,
        rng: &mut R,
    ) -> Result<Vec<u64>> {
        let shape = self.classifier.input_shape();
        check_batch(x, 1, shape).map_err(|_| {
            Error::Shape(format!(
                "the image has {} values, the classifier takes {shape:?} = {} values",
                x.len(),
                shape.iter().product::<usize>()
            ))
        })?;
        let noise = Normal::new(0.0f32, self.sigma as f32)
            .map_err(|e| Error::Config(format!("sigma {}: {e}", self.sigma)))?;
        let batch = self.batch as u64;
        let draw = |rng: &mut R, m: usize, noisy: &mut Vec<f32>| {
            noisy.clear();
            noisy.reserve(m * x.len());
            for _ in 0..m {
                noisy.extend(x.iter().map(|&v| v + noise.sample(rng)));
            }
        };
        let mut counts: Vec<u64> = Vec::new();
        let (mut current, mut next) = (Vec::new(), Vec::new());
        let mut m = num.min(batch) as usize;
        draw(rng, m, &mut current);
        let mut left = num;
        while left > 0 {
            left -= m as u64;
            let m_next = left.min(batch) as usize;
            // The classifier on this batch while the next one's noise is drawn, as two tasks of
            // the same thread pool (a thread of its own would compete with the pool's).
            let (logits, ()) = rayon::join(
                || self.classifier.logits(&current, m),
                || draw(rng, m_next, &mut next),
            );
            let logits = logits?;
            let k = classes_in(&logits, m)?;
            if counts.is_empty() {
                counts = vec![0; k];
            } else if counts.len() != k {
                return Err(Error::Classifier(format!(
                    "the classifier answered {} classes, then {k}",
                    counts.len()
                )));
            }
            for c in argmax_rows(&logits, k)? {
                counts[c] += 1;
            }
            std::mem::swap(&mut current, &mut next);
            m = m_next;
        }
        Ok(counts)
    }

    /// Cohen et al.'s PREDICT with `n` samples at level `alpha`.
    pub fn predict<R: Rng + Send + ?Sized>(
        &self,
        x: &[f32],
        n: u64,
        alpha: f64,
        rng: &mut R,
    ) -> Result<Prediction> {
        check_count("n", n)?;
        check_alpha(alpha)?;
        let counts = self.sample_counts(x, n, rng)?;
        let (top, c1, c2) = top_two(&counts);
        let p_value = binomial_test_half(c1, c1 + c2);
        Ok(Prediction {
            class: (p_value <= alpha).then_some(top),
            counts,
            p_value,
        })
    }

    /// Cohen et al.'s CERTIFY: `n0` selection samples, `n` estimation samples, level `alpha`.
    pub fn certify<R: Rng + Send + ?Sized>(
        &self,
        x: &[f32],
        n0: u64,
        n: u64,
        alpha: f64,
        rng: &mut R,
    ) -> Result<Certificate> {
        check_count("n0", n0)?;
        check_count("n", n)?;
        check_alpha(alpha)?;
        let selection = self.sample_counts(x, n0, rng)?;
        let (candidate, _, _) = top_two(&selection);
        let estimation = self.sample_counts(x, n, rng)?;
        let count = estimation.get(candidate).copied().unwrap_or(0);
        let p_lower = clopper_pearson_lower(count, n, alpha)?;
        let (class, radius) = if p_lower < 0.5 {
            (None, 0.0)
        } else {
            (Some(candidate), self.sigma * normal_inverse_cdf(p_lower)?)
        };
        Ok(Certificate {
            class,
            radius,
            candidate,
            count,
            n,
            p_lower,
        })
    }
}

fn check_sigma(sigma: f64) -> Result<()> {
    if !(sigma.is_finite() && sigma > 0.0) {
        return Err(Error::Config(format!(
            "sigma must be a positive number in [0, 1] pixel units (e.g. 0.25), got {sigma}"
        )));
    }
    Ok(())
}

fn check_batch_size(batch: usize) -> Result<()> {
    if batch == 0 {
        return Err(Error::Config(
            "batch must be at least 1 (noisy images per classifier query)".into(),
        ));
    }
    Ok(())
}

/// That a batch of noisy images (`per_image` values each) fits into memory: CERTIFY holds two
/// batches (the one the classifier evaluates and the next one being drawn), and the classifier
/// at least a copy of its input.
pub fn check_batch_memory(batch: usize, per_image: usize) -> Result<()> {
    deepzero_core::bounds::check_memory(
        deepzero_core::error::Setting::QueryBatch,
        batch,
        per_image.saturating_mul(3 * 4),
        "noisy images (two batches and the classifier's copy)",
    )?;
    Ok(())
}

/// Most noise samples per image of n0 or n: 10⁹, ten thousand times Cohen et al.'s n = 100,000
/// (at a million classifier images per second, a quarter of an hour per image). More is a typo,
/// and a run that would never end.
pub const MAX_SAMPLES: u64 = 1_000_000_000;

fn check_count(name: &str, v: u64) -> Result<()> {
    if v == 0 {
        return Err(Error::Config(format!(
            "{name} must be at least 1 (Cohen et al. use n0 = 100, n = 100000)"
        )));
    }
    if v > MAX_SAMPLES {
        return Err(Error::Config(format!(
            "{name} = {v} is more than the limit of {MAX_SAMPLES} noise samples per image \
             (Cohen et al. use n0 = 100, n = 100000)"
        )));
    }
    Ok(())
}

/// The smallest significance level α taken: below it `1 − α` is 1 in f64 and the
/// Clopper–Pearson quantile cannot be computed (statrs fails near 1e-200).
pub const MIN_ALPHA: f64 = 1e-15;

fn check_alpha(alpha: f64) -> Result<()> {
    if !(MIN_ALPHA..1.0).contains(&alpha) {
        return Err(Error::Config(format!(
            "alpha must be in [{MIN_ALPHA:e}, 1) (e.g. 0.001), got {alpha}"
        )));
    }
    Ok(())
}

/// (index of the largest count, largest, second largest); the first index on ties.
fn top_two(counts: &[u64]) -> (usize, u64, u64) {
    let mut top = 0;
    for (c, &v) in counts.iter().enumerate() {
        if v > counts[top] {
            top = c;
        }
    }
    let second = counts
        .iter()
        .enumerate()
        .filter(|&(c, _)| c != top)
        .map(|(_, &v)| v)
        .max()
        .unwrap_or(0);
    (top, counts.get(top).copied().unwrap_or(0), second)
}

/// One-sided (1 − α) Clopper–Pearson lower confidence bound on a binomial proportion from
/// `successes` of `trials`: BetaInv(α; s, n − s + 1), and 0 when s = 0.
pub fn clopper_pearson_lower(successes: u64, trials: u64, alpha: f64) -> Result<f64> {
    check_alpha(alpha)?;
    if trials == 0 || successes > trials {
        return Err(Error::Config(format!(
            "Clopper–Pearson bound needs 0 ≤ successes ≤ trials and trials ≥ 1, got \
             {successes} of {trials}"
        )));
    }
    if successes == 0 {
        return Ok(0.0);
    }
    let beta = Beta::new(successes as f64, (trials - successes + 1) as f64).map_err(|e| {
        Error::Config(format!(
            "Beta({successes}, {}): {e}",
            trials - successes + 1
        ))
    })?;
    Ok(beta.inverse_cdf(alpha))
}

/// Φ⁻¹(p), the standard normal quantile, for p in (0, 1).
pub fn normal_inverse_cdf(p: f64) -> Result<f64> {
    if !(p > 0.0 && p < 1.0) {
        return Err(Error::Config(format!(
            "the normal quantile needs p in (0, 1), got {p}"
        )));
    }
    let normal = StdNormal::standard();
    Ok(normal.inverse_cdf(p))
}

/// Two-sided p-value of the exact binomial test of `successes` in `trials` at p = ½ (scipy's
/// `binomtest(k, n, 0.5).pvalue`): 2·P[X ≥ max(k, n − k)] capped at 1, and 1 for n = 0.
pub fn binomial_test_half(successes: u64, trials: u64) -> f64 {
    let successes = successes.min(trials);
    if trials == 0 || 2 * successes == trials {
        return 1.0;
    }
    let k = successes.max(trials - successes);
    // P[X ≥ k] for X ~ Bin(n, ½) = I_½(k, n − k + 1).
    let tail = beta_reg(k as f64, (trials - k + 1) as f64, 0.5);
    (2.0 * tail).min(1.0)
}
