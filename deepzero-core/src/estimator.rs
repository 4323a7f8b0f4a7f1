//! Gradient estimators: backprop (first-order baseline), RGE and CGE.
//!
//! Every estimator sees only an [`Objective`] and counts the queries (loss evaluations) it made.

use crate::error::{Error, Result};
use crate::objective::{FastCapable, Objective};
use candle_core::{DType, Tensor};
use rand::rngs::StdRng;
use rand::Rng;
use serde::{Deserialize, Serialize};

pub use crate::query::{draw_direction, Difference, Direction};

/// A gradient estimate at one point.
#[derive(Clone, Debug)]
pub struct Estimate {
    /// Loss at the point.
    pub loss: f64,
    /// The (estimated) gradient, same shape and dtype as the parameters.
    pub grad: Tensor,
    /// Loss evaluations (forward passes) used; backprop counts one.
    pub queries: u64,
}

/// Turns queries of an objective into a gradient.
pub trait GradientEstimator {
    /// Short name for logs.
    fn name(&self) -> String;
    /// Estimate the gradient of `obj` at `params`. Random choices come from `rng`.
    fn estimate(
        &mut self,
        obj: &dyn Objective,
        params: &Tensor,
        rng: &mut StdRng,
    ) -> Result<Estimate>;
    /// Called by the trainer before every epoch (0-based `epoch`, the run's `seed`), also when a
    /// run resumes. Estimators with per-epoch state (sparse coordinate sets resampled every few
    /// epochs) derive it from `(seed, epoch)` here, so a resumed run continues identically; they
    /// may also project the parameters (pruned weights held at zero).
    fn on_epoch_start(&mut self, _epoch: usize, _seed: u64, _params: &mut Tensor) -> Result<()> {
        Ok(())
    }
}

/// First-order baseline: the objective's exact gradient.
#[derive(Clone, Debug, Default)]
pub struct Backprop;

impl GradientEstimator for Backprop {
    fn name(&self) -> String {
        "fo".into()
    }
    fn estimate(
        &mut self,
        obj: &dyn Objective,
        params: &Tensor,
        _rng: &mut StdRng,
    ) -> Result<Estimate> {
        match obj.loss_and_grad(params)? {
            Some((loss, grad)) => Ok(Estimate { loss, grad, queries: 1 }),
            None => Err(Error::Config(
                "--estimator fo: this objective is a black box with no gradient; use --estimator cge or rge".into(),
            )),
        }
    }
}

/// Randomized gradient estimator with `q` directions.
#[derive(Clone, Debug)]
pub struct Rge {
    /// Number of directions.
    pub q: usize,
    /// Smoothing radius μ.
    pub mu: f64,
    /// Forward or central difference.
    pub difference: Difference,
    /// Gaussian or sphere directions.
    pub direction: Direction,
    /// Evaluate queries on our own kernels ([`crate::fast::Engine::rge`]), threads over
    /// directions, each direction drawn from its own seed. Used for f32 objectives with a layer
    /// graph; otherwise (and when `false`) candle forwards with directions drawn in sequence.
    pub fast: bool,
}

impl Rge {
    /// Check the settings once.
    pub fn new(q: usize, mu: f64, difference: Difference, direction: Direction) -> Result<Self> {
        if q == 0 {
            return Err(Error::Config("--q must be at least 1".into()));
        }
        check_mu(mu)?;
        Ok(Rge {
            q,
            mu,
            difference,
            direction,
            fast: false,
        })
    }
    /// Choose the query path (see [`Rge::fast`]).
    pub fn with_fast(mut self, fast: bool) -> Self {
        self.fast = fast;
        self
    }
}

fn check_mu(mu: f64) -> Result<()> {
    if !(mu.is_finite() && mu > 0.0) {
        return Err(Error::Config(format!(
            "--mu must be a positive number, got {mu}"
        )));
    }
    Ok(())
}

/// The fast engine's base forward on the objective's batch at f32 `params`; the batch's
/// batch-norm statistics go to the objective (for running statistics).
fn fast_engine<'a>(f: &'a dyn FastCapable, params: &Tensor) -> Result<crate::fast::Engine<'a>> {
    let (x, y) = f.batch_host()?;
    let p32 = params.to_vec1::<f32>()?;
    let n = y.len();
    let head = crate::head::Head::CrossEntropy(y);
    let engine = crate::fast::Engine::new(f.model(), &p32, &x, n, &head)?;
    f.record_bn_stats(engine.bn_batch_stats());
    Ok(engine)
}

fn host(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.to_dtype(DType::F64)?.to_vec1::<f64>()?)
}

fn to_tensor(v: &[f64], like: &Tensor) -> Result<Tensor> {
    Ok(Tensor::from_slice(v, v.len(), like.device())?.to_dtype(like.dtype())?)
}

impl GradientEstimator for Rge {
    fn name(&self) -> String {
        format!("rge(q={}{})", self.q, if self.fast { ", fast" } else { "" })
    }
    fn estimate(
        &mut self,
        obj: &dyn Objective,
        params: &Tensor,
        rng: &mut StdRng,
    ) -> Result<Estimate> {
        let d = params.dims1()?;
        if let (true, Some(f), DType::F32) = (self.fast, obj.fast(), params.dtype()) {
            let engine = fast_engine(f, params)?;
            let seeds: Vec<u64> = (0..self.q).map(|_| rng.random()).collect();
            let (g, q) = engine.rge(&seeds, self.mu, self.difference, self.direction)?;
            return Ok(Estimate {
                loss: engine.base_mean_loss(),
                grad: to_tensor(&g, params)?,
                queries: q + 1,
            });
        }
        let f0 = obj.base_loss(params)?;
        let mut queries = 1;
        let mut g = vec![0.0f64; d];
        for _ in 0..self.q {
            let u = draw_direction(d, self.direction, rng);
            let ut = to_tensor(&u, params)?;
            let plus = obj.loss(&(params + (&ut * self.mu)?)?)?;
            let coef = match self.difference {
                Difference::Forward => {
                    queries += 1;
                    (plus - f0) / self.mu
                }
                Difference::Central => {
                    let minus = obj.loss(&(params - (&ut * self.mu)?)?)?;
                    queries += 2;
                    (plus - minus) / (2.0 * self.mu)
                }
            };
            for (gi, ui) in g.iter_mut().zip(&u) {
                *gi += coef * ui;
            }
        }
        let inv_q = 1.0 / self.q as f64;
        g.iter_mut().for_each(|v| *v *= inv_q);
        Ok(Estimate {
            loss: f0,
            grad: to_tensor(&g, params)?,
            queries,
        })
    }
}

/// How CGE evaluates its queries. All engines give the same numbers (up to float rounding).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum CgeEngine {
    /// One full forward per coordinate.
    Naive,
    /// Feature reuse: resume the forward at the layer that reads the perturbed weight.
    Reuse,
    /// Delta propagation on our own kernels ([`crate::fast`]), f32, threads over queries.
    /// Falls back to `Reuse` for objectives without a layer graph and for f64 parameters.
    #[default]
    Fast,
}

/// Coordinate-wise gradient estimator over all coordinates or a subset.
#[derive(Clone, Debug)]
pub struct Cge {
    /// Smoothing radius μ.
    pub mu: f64,
    /// Forward or central difference.
    pub difference: Difference,
    /// Query engine.
    pub engine: CgeEngine,
    /// Sorted flat coordinates to estimate; `None` = every coordinate.
    pub coords: Option<Vec<usize>>,
}

impl Cge {
    /// Dense CGE.
    pub fn new(mu: f64, difference: Difference, engine: CgeEngine) -> Result<Self> {
        check_mu(mu)?;
        Ok(Cge {
            mu,
            difference,
            engine,
            coords: None,
        })
    }
    /// Restrict to a coordinate set (sorted and deduplicated here).
    pub fn with_coords(mut self, mut coords: Vec<usize>) -> Self {
        coords.sort_unstable();
        coords.dedup();
        self.coords = Some(coords);
        self
    }
    /// Queries one estimate costs for a model with `d` parameters.
    pub fn queries_per_step(&self, d: usize) -> u64 {
        self.queries_for(self.coords.as_ref().map_or(d, |c| c.len()))
    }
    /// Queries of an estimate over `n` coordinates (plus the base query).
    pub fn queries_for(&self, n: usize) -> u64 {
        let n = n as u64;
        match self.difference {
            Difference::Forward => n + 1,
            Difference::Central => 2 * n + 1,
        }
    }

    fn diff(&self, f0: f64, mut eval: impl FnMut(f64) -> Result<f64>) -> Result<(f64, u64)> {
        Ok(match self.difference {
            Difference::Forward => ((eval(self.mu)? - f0) / self.mu, 1),
            Difference::Central => ((eval(self.mu)? - eval(-self.mu)?) / (2.0 * self.mu), 2),
        })
    }
}

impl GradientEstimator for Cge {
    fn name(&self) -> String {
        match &self.coords {
            None => "cge".into(),
            Some(c) => format!("cge({} coords)", c.len()),
        }
    }
    fn estimate(
        &mut self,
        obj: &dyn Objective,
        params: &Tensor,
        _rng: &mut StdRng,
    ) -> Result<Estimate> {
        let d = params.dims1()?;
        if let Some(c) = &self.coords {
            if let Some(&last) = c.last() {
                if last >= d {
                    return Err(Error::Shape(format!(
                        "CGE coordinate {last} out of range for {d} parameters"
                    )));
                }
            }
        }
        let all: Vec<usize>;
        let coords: &[usize] = match &self.coords {
            Some(c) => c,
            None => {
                all = (0..d).collect();
                &all
            }
        };
        let mut g = vec![0.0f64; d];
        let mut queries = 1u64;
        if let (CgeEngine::Fast, Some(f), DType::F32) = (self.engine, obj.fast(), params.dtype()) {
            let engine = fast_engine(f, params)?;
            let (gs, q) = engine.cge(
                coords,
                self.mu,
                self.difference,
                crate::query::QueryEngine::Fast,
            )?;
            for (&i, v) in coords.iter().zip(gs) {
                g[i] = v;
            }
            return Ok(Estimate {
                loss: engine.base_mean_loss(),
                grad: to_tensor(&g, params)?,
                queries: q + 1,
            });
        }
        let resumable = match self.engine {
            CgeEngine::Reuse | CgeEngine::Fast => obj.resumable(),
            CgeEngine::Naive => None,
        };
        let f0;
        match resumable {
            None => {
                f0 = obj.base_loss(params)?;
                let mut theta = host(params)?;
                for &i in coords {
                    let orig = theta[i];
                    let (gi, q) = self.diff(f0, |delta| {
                        theta[i] = orig + delta;
                        let l = obj.loss(&to_tensor(&theta, params)?);
                        theta[i] = orig;
                        l
                    })?;
                    g[i] = gi;
                    queries += q;
                }
            }
            Some(r) => {
                let (base, cache) = r.prepare(params)?;
                f0 = base;
                let layout = obj.layout();
                let mut start = 0;
                while start < coords.len() {
                    let e = layout.entry_of(coords[start]).ok_or_else(|| {
                        Error::Shape(format!("coordinate {} outside the layout", coords[start]))
                    })?;
                    let entry = &layout.entries[e];
                    let end = start
                        + coords[start..].partition_point(|&i| i < entry.offset + entry.len());
                    let mut w = host(&cache.views[e].flatten_all()?)?;
                    let shape = entry.shape.as_slice();
                    for &i in &coords[start..end] {
                        let j = i - entry.offset;
                        let orig = w[j];
                        let (gi, q) = self.diff(f0, |delta| {
                            w[j] = orig + delta;
                            let t = to_tensor(&w, params)?.reshape(shape)?;
                            w[j] = orig;
                            r.loss_with(&cache, e, &t)
                        })?;
                        g[i] = gi;
                        queries += q;
                    }
                    start = end;
                }
            }
        }
        Ok(Estimate {
            loss: f0,
            grad: to_tensor(&g, params)?,
            queries,
        })
    }
}
