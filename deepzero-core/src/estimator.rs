//! Gradient estimators: backprop (first-order baseline), RGE and CGE.
//!
//! Every estimator sees only an [`Objective`] and counts the queries (loss evaluations) it made.
//! Queries run in parallel over the rayon pool. On any objective the result does not depend on
//! the thread count: each query's value depends only on its own point, CGE writes each
//! coordinate's difference to its own place, and RGE adds its terms in fixed groups in a fixed
//! order.

use crate::distributed::{Collective, QueryTiming, Shard, StepShares};
use crate::error::{Error, Result, Setting};
use crate::fast;
use crate::objective::{FastCapable, Objective};
use candle_core::{DType, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

pub use crate::query::{draw_direction, Difference, Direction, QueryEngine};

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
    /// Share each estimate's queries over `comm`'s ranks ([`crate::distributed`]); every rank
    /// then returns the whole, identical estimate. Returns whether this estimator shares its
    /// queries: those that do not (backprop, RGE) compute the whole estimate on every rank, which
    /// gives the same numbers, without the speed-up.
    fn distribute(&mut self, _comm: Arc<dyn Collective>) -> Result<bool> {
        Ok(false)
    }
}

/// Queries handed to [`Objective::losses`] in one call by the generic (non-graph) paths: enough
/// for a black box to answer one large batch, few enough that the per-thread copies of the
/// parameters stay small.
pub const QUERY_BATCH: usize = 16;

/// Which estimator, with its settings: what a run's configuration names.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EstimatorConfig {
    /// Backprop, RGE or CGE.
    pub kind: EstimatorKind,
    /// RGE directions per step.
    pub q: usize,
    /// Finite-difference step μ.
    pub mu: f64,
    /// Forward or central difference.
    pub difference: Difference,
    /// RGE direction distribution.
    pub direction: Direction,
    /// How queries are evaluated.
    pub engine: QueryEngine,
}

/// The three estimators.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum EstimatorKind {
    /// First-order baseline (backprop).
    Fo,
    /// Randomized gradient estimate.
    Rge,
    /// Coordinate-wise gradient estimate.
    #[default]
    Cge,
}

impl EstimatorKind {
    /// The peak learning rate that trains the default model (the digits MLP, SGD with momentum
    /// 0.9) with this estimator: 0.1 for backprop and CGE, 0.01 for RGE, whose estimates of
    /// `q` random directions are far noisier (at 0.1 the default RGE run's loss blows up to
    /// 1e20; 0.01 reaches a test accuracy of 0.93 with `q` = 20).
    pub fn default_lr(self) -> f64 {
        match self {
            EstimatorKind::Rge => 0.01,
            EstimatorKind::Fo | EstimatorKind::Cge => 0.1,
        }
    }
}

impl Default for EstimatorConfig {
    fn default() -> Self {
        EstimatorConfig {
            kind: EstimatorKind::Cge,
            q: 10,
            mu: 5e-3,
            difference: Difference::Forward,
            direction: Direction::Gaussian,
            engine: QueryEngine::Fast,
        }
    }
}

impl EstimatorConfig {
    /// The dense estimator.
    pub fn build(&self) -> Result<Box<dyn GradientEstimator>> {
        Ok(match self.kind {
            EstimatorKind::Fo => Box::new(Backprop),
            EstimatorKind::Rge => Box::new(
                Rge::new(self.q, self.mu, self.difference, self.direction)?
                    .with_engine(self.engine),
            ),
            EstimatorKind::Cge => Box::new(self.cge()?),
        })
    }
    /// The CGE these settings describe.
    pub fn cge(&self) -> Result<Cge> {
        Cge::new(self.mu, self.difference, self.engine)
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
            Some((loss, grad)) => Ok(Estimate {
                loss,
                grad,
                queries: 1,
            }),
            None => Err(Error::invalid(
                Setting::Estimator,
                "backprop needs a gradient, and this objective is a black box; use CGE or RGE",
            )),
        }
    }
}

/// Check a number of RGE directions: at least one, and their seeds fit into memory (a step
/// holds one seed per direction; the directions themselves are drawn group by group).
pub fn check_directions(q: usize) -> Result<()> {
    if q == 0 {
        return Err(Error::invalid(Setting::Directions, "must be at least 1"));
    }
    crate::bounds::check_memory(
        Setting::Directions,
        q,
        std::mem::size_of::<u64>(),
        "direction seeds",
    )
}

/// Check a finite-difference step μ: a positive number.
pub fn check_mu(mu: f64) -> Result<()> {
    if !(mu.is_finite() && mu > 0.0) {
        return Err(Error::invalid(
            Setting::Mu,
            format!("must be a positive number, got {mu}"),
        ));
    }
    Ok(())
}

/// The fast engine's base forward on the objective's batch at f32 `params`; the batch's
/// batch-norm statistics go to the objective (for running statistics).
fn fast_engine<'a>(f: &'a dyn FastCapable, params: &Tensor) -> Result<fast::Engine<'a>> {
    let (x, n) = f.batch_host()?;
    let p32 = params.to_vec1::<f32>()?;
    let engine = fast::Engine::new(f.model(), &p32, &x, n, f.head())?;
    f.record_bn_stats(engine.bn_batch_stats());
    Ok(engine)
}

/// The objective's layer graph, when the precision allows our (f32) kernels.
fn graph_path<'a>(obj: &'a dyn Objective, params: &Tensor) -> Option<&'a dyn FastCapable> {
    if params.dtype() != DType::F32 {
        return None;
    }
    obj.fast()
}

fn host(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.to_dtype(DType::F64)?.to_vec1::<f64>()?)
}

fn to_tensor(v: &[f64], like: &Tensor) -> Result<Tensor> {
    Ok(Tensor::from_slice(v, v.len(), like.device())?.to_dtype(like.dtype())?)
}

/// Randomized gradient estimator with `q` directions.
///
/// Direction `i` is drawn from its own seed (the `i`-th draw of the step's generator), so
/// directions are regenerated instead of stored (MeZO's trick), every engine draws the same
/// directions, and the estimate does not depend on the thread count.
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
    /// Kept for configuration symmetry with CGE: every RGE query perturbs every layer, so all
    /// engines run full forwards — on our kernels for objectives with a layer graph and f32
    /// parameters, otherwise through the objective's own batched `losses`.
    pub engine: QueryEngine,
}

/// Directions per group: partial sums of a group are added in group order.
const RGE_GROUP: usize = 8;

impl Rge {
    /// Check the settings once.
    pub fn new(q: usize, mu: f64, difference: Difference, direction: Direction) -> Result<Self> {
        check_directions(q)?;
        check_mu(mu)?;
        Ok(Rge {
            q,
            mu,
            difference,
            direction,
            engine: QueryEngine::Fast,
        })
    }
    /// Choose the query engine.
    pub fn with_engine(mut self, engine: QueryEngine) -> Self {
        self.engine = engine;
        self
    }

    /// `(1/q) Σ c_i u_i` and the queries made (without the base), on the objective's `losses`.
    fn generic(
        &self,
        obj: &dyn Objective,
        theta: &[f64],
        f0: f64,
        seeds: &[u64],
    ) -> Result<(Vec<f64>, u64)> {
        let d = theta.len();
        let (mu, diff, dir) = (self.mu, self.difference, self.direction);
        let group_sum = |group: &[u64]| -> Result<Vec<f64>> {
            let dirs: Vec<Vec<f64>> = group
                .iter()
                .map(|&s| draw_direction(d, dir, &mut StdRng::seed_from_u64(s)))
                .collect();
            let signs: &[f64] = match diff {
                Difference::Forward => &[1.0],
                Difference::Central => &[1.0, -1.0],
            };
            let points: Vec<Vec<f64>> = dirs
                .iter()
                .flat_map(|u| {
                    signs.iter().map(move |&sg| {
                        theta
                            .iter()
                            .zip(u)
                            .map(|(t, ui)| t + sg * mu * ui)
                            .collect()
                    })
                })
                .collect();
            let refs: Vec<&[f64]> = points.iter().map(|p| p.as_slice()).collect();
            let l = obj.losses(&refs)?;
            let mut g = vec![0.0f64; d];
            for (i, u) in dirs.iter().enumerate() {
                let coef = match diff {
                    Difference::Forward => (l[i] - f0) / mu,
                    Difference::Central => (l[2 * i] - l[2 * i + 1]) / (2.0 * mu),
                };
                for (gi, ui) in g.iter_mut().zip(u) {
                    *gi += coef * ui;
                }
            }
            Ok(g)
        };
        let mut g = vec![0.0f64; d];
        // A bounded number of groups in flight (partial sums are d long each).
        let span = RGE_GROUP * 4 * rayon::current_num_threads().max(1);
        for seeds in seeds.chunks(span) {
            let parts: Result<Vec<Vec<f64>>> = seeds.par_chunks(RGE_GROUP).map(group_sum).collect();
            for part in parts? {
                for (gi, v) in g.iter_mut().zip(part) {
                    *gi += v;
                }
            }
        }
        let inv_q = 1.0 / seeds.len().max(1) as f64;
        g.iter_mut().for_each(|v| *v *= inv_q);
        Ok((g, diff.queries_per_point() * seeds.len() as u64))
    }
}

impl GradientEstimator for Rge {
    fn name(&self) -> String {
        format!("rge(q={})", self.q)
    }
    fn estimate(
        &mut self,
        obj: &dyn Objective,
        params: &Tensor,
        rng: &mut StdRng,
    ) -> Result<Estimate> {
        let seeds: Vec<u64> = (0..self.q).map(|_| rng.random()).collect();
        if let Some(f) = graph_path(obj, params) {
            let engine = fast_engine(f, params)?;
            let (g, q) = engine.rge(&seeds, self.mu, self.difference, self.direction)?;
            return Ok(Estimate {
                loss: engine.base_mean_loss(),
                grad: to_tensor(&g, params)?,
                queries: q + 1,
            });
        }
        let theta = host(params)?;
        let f0 = obj.base_loss(&theta)?;
        let (g, q) = self.generic(obj, &theta, f0, &seeds)?;
        Ok(Estimate {
            loss: f0,
            grad: to_tensor(&g, params)?,
            queries: q + 1,
        })
    }
}

/// Coordinate-wise gradient estimator over all coordinates or a subset.
#[derive(Clone, Debug)]
pub struct Cge {
    /// Smoothing radius μ.
    pub mu: f64,
    /// Forward or central difference.
    pub difference: Difference,
    /// Query engine.
    pub engine: QueryEngine,
    /// Sorted flat coordinates to estimate; `None` = every coordinate.
    pub coords: Option<Vec<usize>>,
    /// The ranks this estimator's queries are shared over (`None`: all in this process).
    shard: Option<Shard>,
}

impl Cge {
    /// Dense CGE.
    pub fn new(mu: f64, difference: Difference, engine: QueryEngine) -> Result<Self> {
        check_mu(mu)?;
        Ok(Cge {
            mu,
            difference,
            engine,
            coords: None,
            shard: None,
        })
    }
    /// How the ranks divided the last estimate (distributed runs only).
    pub fn last_shares(&self) -> Option<&StepShares> {
        self.shard.as_ref().and_then(|s| s.last())
    }
    /// The query time fitted to the ranks' measured times (distributed runs only).
    pub fn query_timing(&self) -> Option<QueryTiming> {
        self.shard.as_ref().and_then(|s| s.timing())
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
        self.difference.queries_per_point() * n as u64 + 1
    }

    /// Coordinates per call of [`Cge::generic`] to the objective's `losses`.
    fn generic_group(diff: Difference) -> usize {
        (QUERY_BATCH / diff.queries_per_point() as usize).max(1)
    }

    /// Finite differences over `coords` with the objective's batched `losses`: each worker
    /// perturbs one coordinate of its own copies of `θ` and restores it (no per-query copy).
    fn generic(
        (mu, diff): (f64, Difference),
        obj: &dyn Objective,
        theta: &[f64],
        f0: f64,
        coords: &[usize],
    ) -> Result<Vec<f64>> {
        let signs: &[f64] = match diff {
            Difference::Forward => &[1.0],
            Difference::Central => &[1.0, -1.0],
        };
        let per_call = Self::generic_group(diff);
        let chunks: Vec<Vec<f64>> = coords
            .par_chunks(per_call)
            .map_init(
                || vec![theta.to_vec(); per_call * signs.len()],
                |slots, chunk| -> Result<Vec<f64>> {
                    let used = chunk.len() * signs.len();
                    for (k, &i) in chunk.iter().enumerate() {
                        for (s, &sg) in signs.iter().enumerate() {
                            slots[k * signs.len() + s][i] = theta[i] + sg * mu;
                        }
                    }
                    let refs: Vec<&[f64]> = slots[..used].iter().map(|p| p.as_slice()).collect();
                    let l = obj.losses(&refs);
                    for (k, &i) in chunk.iter().enumerate() {
                        for s in 0..signs.len() {
                            slots[k * signs.len() + s][i] = theta[i];
                        }
                    }
                    let l = l?;
                    Ok((0..chunk.len())
                        .map(|k| match diff {
                            Difference::Forward => (l[k] - f0) / mu,
                            Difference::Central => (l[2 * k] - l[2 * k + 1]) / (2.0 * mu),
                        })
                        .collect())
                },
            )
            .collect::<Result<_>>()?;
        Ok(chunks.into_iter().flatten().collect())
    }

    /// Feature reuse on candle tensors: resume at the node that reads each coordinate.
    fn reuse(
        (mu, diff): (f64, Difference),
        r: &dyn crate::objective::Resumable,
        obj: &dyn Objective,
        params: &Tensor,
        coords: &[usize],
    ) -> Result<(f64, Vec<f64>)> {
        let (f0, cache) = r.prepare(params)?;
        let layout = obj.layout();
        let g: Vec<f64> = coords
            .par_iter()
            .map(|&i| -> Result<f64> {
                let e = layout
                    .entry_of(i)
                    .ok_or_else(|| Error::Shape(format!("coordinate {i} outside the layout")))?;
                let entry = &layout.entries[e];
                let mut w = host(&cache.views[e].flatten_all()?)?;
                let j = i - entry.offset;
                let orig = w[j];
                let mut at = |delta: f64| -> Result<f64> {
                    w[j] = orig + delta;
                    let t = to_tensor(&w, params)?.reshape(entry.shape.as_slice())?;
                    r.loss_with(&cache, e, &t)
                };
                Ok(match diff {
                    Difference::Forward => (at(mu)? - f0) / mu,
                    Difference::Central => (at(mu)? - at(-mu)?) / (2.0 * mu),
                })
            })
            .collect::<Result<_>>()?;
        Ok((f0, g))
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
        if let Some(&last) = self.coords.as_ref().and_then(|c| c.last()) {
            if last >= d {
                return Err(Error::Shape(format!(
                    "CGE coordinate {last} out of range for {d} parameters"
                )));
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
        let queries = self.queries_for(coords.len());
        let (fd, engine) = ((self.mu, self.difference), self.engine);
        let shard = &mut self.shard;
        let (loss, values) = if let Some(f) = graph_path(obj, params) {
            let base = fast_engine(f, params)?;
            let loss = base.base_mean_loss();
            let group = fast::cge_group(f.head());
            values(shard, engine, coords, Some(f.model()), group, |part| {
                Ok((loss, base.cge(part, fd.0, fd.1, engine)?.0))
            })?
        } else {
            let model = obj.fast().map(|f| f.model());
            match (engine, obj.resumable()) {
                (QueryEngine::Reuse | QueryEngine::Fast, Some(r)) => {
                    values(shard, engine, coords, model, 1, |part| {
                        Cge::reuse(fd, r, obj, params, part)
                    })?
                }
                _ => {
                    let theta = host(params)?;
                    let f0 = obj.base_loss(&theta)?;
                    let group = Cge::generic_group(fd.1);
                    values(shard, engine, coords, model, group, |part| {
                        Ok((f0, Cge::generic(fd, obj, &theta, f0, part)?))
                    })?
                }
            }
        };
        let mut g = vec![0.0f64; d];
        for (&i, v) in coords.iter().zip(values) {
            g[i] = v;
        }
        Ok(Estimate {
            loss,
            grad: to_tensor(&g, params)?,
            queries,
        })
    }
    fn on_epoch_start(&mut self, epoch: usize, _seed: u64, _params: &mut Tensor) -> Result<()> {
        if let Some(shard) = &mut self.shard {
            shard.begin_epoch(epoch);
        }
        Ok(())
    }
    fn distribute(&mut self, comm: Arc<dyn Collective>) -> Result<bool> {
        self.shard = Some(Shard::new(comm));
        Ok(true)
    }
}

/// This rank's base loss and the values of `coords`, in order. Alone: `eval(coords)`.
/// Distributed: `eval` on this rank's cost-balanced range (ranges cut at multiples of
/// `group`), then every rank's values gathered. Query costs from the fast engine's cost
/// model where there is a layer graph, else uniform.
fn values(
    shard: &mut Option<Shard>,
    engine: QueryEngine,
    coords: &[usize],
    model: Option<&crate::model::Model>,
    group: usize,
    eval: impl FnOnce(&[usize]) -> Result<(f64, Vec<f64>)>,
) -> Result<(f64, Vec<f64>)> {
    let Some(shard) = shard else {
        return eval(coords);
    };
    let costs = match model {
        Some(m) => fast::coordinate_costs(m, coords, engine)?,
        None => vec![1.0; coords.len()],
    };
    shard.run(&costs, group, |range| eval(&coords[range]))
}
