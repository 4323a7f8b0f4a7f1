//! Test helpers: an in-process linear classifier and the command of the same classifier as a
//! `process:` program (examples/linear_client.py).
#![allow(dead_code)]

use deepzero_certify::{BlackBox, QueryCounter, Result};
use rand::Rng;
use rand_distr::{Distribution, StandardNormal};

/// f(x) = sign(w·x + b) with scores [−(w·x + b), w·x + b], computed in f64 in the same order
/// as examples/linear_client.py, so both give identical scores.
pub struct LinearBox {
    pub w: Vec<f64>,
    pub b: f64,
    pub shape: [usize; 3],
    pub queries: QueryCounter,
}

impl LinearBox {
    pub fn new(w: Vec<f64>, b: f64, shape: [usize; 3]) -> Self {
        LinearBox {
            w,
            b,
            shape,
            queries: QueryCounter::default(),
        }
    }

    pub fn margin(&self, x: &[f32]) -> f64 {
        let mut sum = 0.0f64;
        for (w, &x) in self.w.iter().zip(x) {
            sum += w * f64::from(x);
        }
        self.b + sum
    }

    pub fn norm(&self) -> f64 {
        self.w.iter().map(|w| w * w).sum::<f64>().sqrt()
    }

    /// The exact ℓ2 radius of the smoothed classifier at x: |w·x + b| / ‖w‖.
    pub fn exact_radius(&self, x: &[f32]) -> f64 {
        self.margin(x).abs() / self.norm()
    }

    /// The `sh -c` command running the same classifier in Python.
    pub fn command(&self) -> String {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/linear_client.py");
        let mut cmd = format!("exec python3 '{script}' {:?}", self.b);
        for w in &self.w {
            cmd.push_str(&format!(" {w:?}"));
        }
        cmd
    }
}

impl BlackBox for LinearBox {
    fn input_shape(&self) -> [usize; 3] {
        self.shape
    }
    fn num_classes(&self) -> Result<usize> {
        Ok(2)
    }
    fn logits(&self, images: &[f32], n: usize) -> Result<Vec<f32>> {
        deepzero_certify::classifier::check_batch(images, n, self.shape)?;
        self.queries.add(n);
        let d = self.w.len();
        Ok(images
            .chunks_exact(d)
            .flat_map(|x| {
                let s = self.margin(x);
                [-s as f32, s as f32]
            })
            .collect())
    }
    fn queries(&self) -> u64 {
        self.queries.get()
    }
}

/// A random linear classifier on 1×4×4 images and a point x in [0,1]^16 at which the smoothed
/// classifier's top class has probability `p_top` (class 1 or 0 at random).
pub fn linear_case(rng: &mut impl Rng, sigma: f64, p_top: f64) -> (LinearBox, Vec<f32>) {
    let shape = [1, 4, 4];
    let w: Vec<f64> = (0..16).map(|_| StandardNormal.sample(rng)).collect();
    let x: Vec<f32> = (0..16).map(|_| rng.random::<f32>()).collect();
    let probe = LinearBox::new(w.clone(), 0.0, shape);
    let z = deepzero_certify::normal_inverse_cdf(p_top).unwrap();
    let sign = if rng.random::<bool>() { 1.0 } else { -1.0 };
    // Choose b so that (w·x + b) / (σ‖w‖) = ±z.
    let b = sign * z * sigma * probe.norm() - probe.margin(&x);
    (LinearBox::new(w, b, shape), x)
}

/// Smallest m with P[Binomial(trials, p) > m] ≤ tail.
pub fn binomial_upper_quantile(trials: u64, p: f64, tail: f64) -> u64 {
    (0..=trials)
        .find(|&m| {
            m == trials
                || statrs::function::beta::beta_reg((m + 1) as f64, (trials - m) as f64, p) <= tail
        })
        .unwrap_or(trials)
}
