//! What a query is: the finite-difference scheme, the distribution of random directions, and the
//! engine that evaluates queries. Estimators ([`crate::estimator`]) and the fast engine
//! ([`crate::fast`]) both build on this module; neither imports the other's vocabulary.

use rand::rngs::StdRng;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};

/// Finite-difference scheme.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Difference {
    /// `(f(θ + μu) − f(θ)) / μ`: one query per direction plus one base query.
    #[default]
    Forward,
    /// `(f(θ + μu) − f(θ − μu)) / 2μ`: two queries per direction.
    Central,
}

impl Difference {
    /// Queries per coordinate or direction (the base query not counted).
    pub fn queries_per_point(self) -> u64 {
        match self {
            Difference::Forward => 1,
            Difference::Central => 2,
        }
    }
}

/// Distribution of RGE directions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Standard Gaussian `u ~ N(0, I)`.
    #[default]
    Gaussian,
    /// Uniform on the sphere of radius √d (same second moment as the Gaussian).
    Sphere,
}

/// Draw one direction of dimension `d`.
pub fn draw_direction(d: usize, direction: Direction, rng: &mut StdRng) -> Vec<f64> {
    let mut u: Vec<f64> = (0..d).map(|_| StandardNormal.sample(rng)).collect();
    if direction == Direction::Sphere {
        let norm = u
            .iter()
            .map(|v| v * v)
            .sum::<f64>()
            .sqrt()
            .max(f64::MIN_POSITIVE);
        let s = (d as f64).sqrt() / norm;
        u.iter_mut().for_each(|v| *v *= s);
    }
    u
}

/// How queries are evaluated, for CGE and RGE alike. All engines give the same numbers up to
/// float rounding; they differ in cost.
///
/// * `Naive`: one full forward per query. On an objective with a layer graph
///   ([`crate::objective::Objective::fast`]) and f32 parameters this is a full forward on our
///   kernels; otherwise the objective's own [`crate::objective::Objective::losses`].
/// * `Reuse`: feature reuse, resuming the forward at the node that reads the perturbed
///   parameter (CGE only; RGE perturbs every layer, so it runs as `Naive`).
/// * `Fast` (default): delta propagation for CGE ([`crate::fast`]); full forwards on our kernels
///   for RGE. Objectives without a layer graph fall back to `Naive`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum QueryEngine {
    /// Full forward per query.
    Naive,
    /// Resume the forward at the perturbed node.
    Reuse,
    /// Delta propagation (CGE) / our kernels (RGE).
    #[default]
    Fast,
}
