//! Sparsity: pruning scores at initialisation (ZO-GraSP and references), layer-wise keep ratios,
//! and the sparse estimators of DeepZero's Algorithm 1.
//!
//! * [`prune`] scores the conv and linear weights ([`ParamKind::Weight`](crate::layout::ParamKind::Weight)) with one of four
//!   [`PruneMethod`]s, keeps the top `1 − sparsity` fraction by one **global** threshold on
//!   `|score|` and reports what that mask implies per layer ([`LayerRatios`]). Only the per-layer
//!   keep ratios are used afterwards.
//! * [`CoordinateSampler`] draws, every `interval` epochs, a uniformly random coordinate set of
//!   exactly `round(keep_ratio × size)` coordinates per weight tensor (biases and batch-norm
//!   parameters densely unless `sparse_all`). The draw depends only on `(seed, epoch / interval)`,
//!   so a resumed run sees the same sets.
//! * [`SparseCge`] estimates only the sampled coordinates with CGE; [`SparseBackprop`] is the
//!   first-order reference with the same gradient masks; [`PrunedBackprop`] trains a pruned
//!   network (a fixed weight mask, pruned weights held at zero).
//!
//! ```
//! use deepzero_core::model::{Model, ModelSpec};
//! use deepzero_core::sparsity::{CoordinateSampler, LayerRatios};
//! let model = Model::build(&ModelSpec::SimpleCnn { depth: 1, width: 18 }, [3, 32, 32], 10).unwrap();
//! let ratios = LayerRatios::uniform(&model, 0.9).unwrap();
//! let mut sampler = CoordinateSampler::new(&model.layout, &ratios, 5, false).unwrap();
//! sampler.update(0, 42);
//! // conv1.weight: 486 → 49 kept; fc.weight: 180 → 18 kept; 64 biases/BN parameters dense.
//! assert_eq!(sampler.coords().len(), 49 + 18 + 64);
//! ```

use crate::distributed::Collective;
use crate::error::{Error, Result, Setting};
use crate::estimator::{
    Backprop, Cge, Estimate, EstimatorConfig, EstimatorKind, GradientEstimator, Rge,
};
use crate::layout::{ParamEntry, ParamLayout};
use crate::model::{tensor_to_vec, Model};
use crate::objective::Objective;
use crate::seed::derive_seed;
use crate::task::{Task, PRUNE_STREAM};
use candle_core::Tensor;
use rand::rngs::StdRng;
use rand::seq::index::sample;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::Arc;

/// Stream tag of the sparse-gradient coordinate draws in [`derive_seed`].
const SAMPLER_STREAM: u64 = 0x5350_4152;
/// Stream tag of the random weight masks of [`weight_mask`].
const MASK_STREAM: u64 = 0x4d41_534b;

/// How weights are scored for pruning.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PruneMethod {
    /// The same keep ratio `1 − sparsity` in every weight tensor (no scores, no queries).
    Random,
    /// `|θ|`.
    Magnitude,
    /// First-order GraSP, `−θ ⊙ Hg` with `Hg` from two autograd gradients (the reference
    /// that ZO-GraSP approximates).
    Grasp,
    /// ZO-GraSP (DeepZero): `−θ ⊙ Ĥg` with `Ĥg` from two RGE estimates, forward passes only.
    ZoGrasp,
}

impl PruneMethod {
    /// The name used on the command line and in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            PruneMethod::Random => "random",
            PruneMethod::Magnitude => "magnitude",
            PruneMethod::Grasp => "grasp",
            PruneMethod::ZoGrasp => "zo-grasp",
        }
    }
}

impl std::fmt::Display for PruneMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Settings of [`prune`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PruneConfig {
    /// Scoring method.
    pub method: PruneMethod,
    /// Fraction of weights to remove, in `[0, 1)`.
    pub sparsity: f64,
    /// RGE directions per gradient estimate (ZO-GraSP; paper: 192).
    pub q: usize,
    /// Finite-difference radius μ of the RGE estimates and of the Hessian-gradient product.
    pub mu: f64,
}

impl Default for PruneConfig {
    fn default() -> Self {
        PruneConfig {
            method: PruneMethod::ZoGrasp,
            sparsity: 0.9,
            q: 192,
            mu: 5e-3,
        }
    }
}

/// Check a sparsity value.
pub fn check_sparsity(sparsity: f64) -> Result<()> {
    if !(0.0..1.0).contains(&sparsity) {
        return Err(Error::invalid(
            Setting::Sparsity,
            format!("must be in [0, 1), got {sparsity}"),
        ));
    }
    Ok(())
}

impl PruneConfig {
    /// Check ranges.
    pub fn validate(&self) -> Result<()> {
        check_sparsity(self.sparsity)?;
        crate::estimator::check_directions(self.q)?;
        crate::estimator::check_mu(self.mu)
    }
}

/// Keep ratio of one weight tensor.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerRatio {
    /// Parameter tensor name, e.g. `conv1.weight`.
    pub name: String,
    /// Scalars in the tensor.
    pub params: usize,
    /// Fraction kept, `kept / params`.
    pub keep_ratio: f64,
    /// Scalars kept by the global mask.
    pub kept: usize,
}

/// Layer-wise keep ratios of the weight tensors: what pruning hands to sparse training (the
/// JSON file of `deepzero prune`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerRatios {
    /// Scoring method that produced the ratios.
    pub method: PruneMethod,
    /// Model name (`cnn-d2-w18`).
    pub model: String,
    /// Requested sparsity.
    pub sparsity: f64,
    /// Achieved sparsity over all weight tensors: `1 − Σ kept / Σ params`.
    pub global_sparsity: f64,
    /// Queries (loss evaluations) spent on scoring; autograd gradients count one each.
    pub queries: u64,
    /// One entry per weight tensor, in layout order.
    pub layers: Vec<LayerRatio>,
}

impl LayerRatios {
    /// The same keep ratio `1 − sparsity` in every weight tensor (`kept` rounded per tensor).
    pub fn uniform(model: &Model, sparsity: f64) -> Result<LayerRatios> {
        check_sparsity(sparsity)?;
        let layers = weight_entries(&model.layout)
            .map(|e| {
                let n = e.len();
                let kept = ((1.0 - sparsity) * n as f64).round() as usize;
                LayerRatio {
                    name: e.name.clone(),
                    params: n,
                    keep_ratio: kept as f64 / n.max(1) as f64,
                    kept,
                }
            })
            .collect();
        Ok(Self::finish(
            PruneMethod::Random,
            &model.name,
            sparsity,
            0,
            layers,
        ))
    }

    /// The ratios implied by one global threshold on `|scores|` (one score per flat coordinate;
    /// only the weight tensors' entries are read). Keeps the `round((1 − sparsity) · n)` largest,
    /// ties broken by the lower index.
    pub fn from_scores(
        model: &Model,
        scores: &[f64],
        sparsity: f64,
        method: PruneMethod,
        queries: u64,
    ) -> Result<LayerRatios> {
        let keep = global_keep(&model.layout, scores, sparsity)?;
        let layers = weight_entries(&model.layout)
            .map(|e| {
                let kept = keep[e.range()].iter().filter(|&&k| k).count();
                LayerRatio {
                    name: e.name.clone(),
                    params: e.len(),
                    keep_ratio: kept as f64 / e.len().max(1) as f64,
                    kept,
                }
            })
            .collect();
        Ok(Self::finish(method, &model.name, sparsity, queries, layers))
    }

    fn finish(
        method: PruneMethod,
        model: &str,
        sparsity: f64,
        queries: u64,
        layers: Vec<LayerRatio>,
    ) -> LayerRatios {
        let total: usize = layers.iter().map(|l| l.params).sum();
        let kept: usize = layers.iter().map(|l| l.kept).sum();
        LayerRatios {
            method,
            model: model.to_string(),
            sparsity,
            global_sparsity: 1.0 - kept as f64 / total.max(1) as f64,
            queries,
            layers,
        }
    }

    /// Weights kept over all weight tensors, `1 − global_sparsity`.
    pub fn keep_fraction(&self) -> f64 {
        1.0 - self.global_sparsity
    }

    /// Read a ratios file (the JSON of this struct, as `deepzero prune --out` writes it).
    pub fn load(path: &Path) -> Result<LayerRatios> {
        let bytes = std::fs::read(path).map_err(|e| {
            Error::NotFound(format!(
                "{}: {e}; write a ratios file with `deepzero prune --out`",
                path.display()
            ))
        })?;
        Self::parse(&bytes, path)
    }

    /// [`LayerRatios::load`] from the bytes of the file; `origin` names it in error messages.
    pub fn parse(bytes: &[u8], origin: &Path) -> Result<LayerRatios> {
        let r: LayerRatios = serde_json::from_slice(bytes).map_err(|e| {
            Error::data(
                origin,
                format!("not a deepzero ratios file ({e}); write one with `deepzero prune --out`"),
            )
        })?;
        for l in &r.layers {
            if !(0.0..=1.0).contains(&l.keep_ratio) {
                return Err(Error::data(
                    origin,
                    format!("{}: keep_ratio {} is outside [0, 1]", l.name, l.keep_ratio),
                ));
            }
        }
        Ok(r)
    }

    /// Keep ratio of every weight tensor of `layout`, by entry index, checking that the file was
    /// made for this architecture (same weight tensor names and sizes).
    pub fn resolve(&self, layout: &ParamLayout) -> Result<Vec<(usize, f64)>> {
        let mut out = Vec::new();
        for (i, e) in layout.entries.iter().enumerate() {
            if !e.kind.is_weight() {
                continue;
            }
            let l = self.layers.iter().find(|l| l.name == e.name).ok_or_else(|| {
                Error::Config(format!(
                    "the ratios file has no keep ratio for {} (the file was made for model {}); run `deepzero prune` with this model",
                    e.name, self.model
                ))
            })?;
            if l.params != e.len() {
                return Err(Error::Config(format!(
                    "the ratios file gives {} {} parameters (model {}) but {} here; run `deepzero prune` with this model",
                    e.name,
                    l.params,
                    self.model,
                    e.len()
                )));
            }
            out.push((i, l.keep_ratio));
        }
        if let Some(extra) = self.layers.iter().find(|l| {
            !layout
                .entries
                .iter()
                .any(|e| e.kind.is_weight() && e.name == l.name)
        }) {
            return Err(Error::Config(format!(
                "the ratios file has a ratio for {}, which this model does not have (file made for {})",
                extra.name, self.model
            )));
        }
        Ok(out)
    }
}

fn weight_entries(layout: &ParamLayout) -> impl Iterator<Item = &ParamEntry> {
    layout.entries.iter().filter(|e| e.kind.is_weight())
}

/// The global mask over all flat coordinates: `true` for the `round((1 − sparsity) · n)`
/// weights with the largest `|score|` (n = number of weight scalars, ties to the lower index);
/// coordinates outside weight tensors are `false`.
pub fn global_keep(layout: &ParamLayout, scores: &[f64], sparsity: f64) -> Result<Vec<bool>> {
    check_sparsity(sparsity)?;
    if scores.len() != layout.len() {
        return Err(Error::Shape(format!(
            "{} pruning scores for {} parameters",
            scores.len(),
            layout.len()
        )));
    }
    let mut idx: Vec<usize> = weight_entries(layout).flat_map(|e| e.range()).collect();
    if let Some(&i) = idx.iter().find(|&&i| !scores[i].is_finite()) {
        return Err(Error::Diverged(format!(
            "pruning score of coordinate {i} is {}; try a smaller μ",
            scores[i]
        )));
    }
    let keep = ((1.0 - sparsity) * idx.len() as f64).round() as usize;
    idx.sort_by(|&a, &b| scores[b].abs().total_cmp(&scores[a].abs()).then(a.cmp(&b)));
    let mut mask = vec![false; layout.len()];
    for &i in &idx[..keep.min(idx.len())] {
        mask[i] = true;
    }
    Ok(mask)
}

/// An objective restricted to the weight tensors: its parameter vector holds only the
/// [`ParamKind::Weight`](crate::layout::ParamKind::Weight) coordinates, the others stay at the base point. Lets the plain
/// estimators perturb conv and linear weights only.
pub struct WeightSubspace<'a> {
    inner: &'a dyn Objective,
    base: Vec<f64>,
    /// For each weight tensor: (offset in the full vector, offset in the subspace, length).
    blocks: Vec<(usize, usize, usize)>,
    layout: ParamLayout,
    like: Tensor,
}

impl<'a> WeightSubspace<'a> {
    /// Restrict `inner` around the full parameter vector `params`.
    pub fn new(inner: &'a dyn Objective, params: &Tensor) -> Result<Self> {
        let full = inner.layout();
        let base = tensor_to_vec(params)?;
        if base.len() != full.len() {
            return Err(Error::Shape(format!(
                "parameter vector has {} entries, the objective's layout {}",
                base.len(),
                full.len()
            )));
        }
        let mut layout = ParamLayout::default();
        let mut blocks = Vec::new();
        for e in weight_entries(full) {
            blocks.push((e.offset, layout.len(), e.len()));
            layout.push(e.name.clone(), e.kind, e.shape.clone(), e.node);
        }
        Ok(WeightSubspace {
            inner,
            base,
            blocks,
            layout,
            like: params.clone(),
        })
    }

    /// The weight coordinates of a full vector.
    pub fn restrict(&self, full: &[f64]) -> Vec<f64> {
        let mut out = Vec::with_capacity(self.layout.len());
        for &(off, _, n) in &self.blocks {
            out.extend_from_slice(&full[off..off + n]);
        }
        out
    }

    /// A full vector from the base point with the weight coordinates replaced by `sub`.
    pub fn embed(&self, sub: &[f64]) -> Vec<f64> {
        let mut out = self.base.clone();
        for &(off, soff, n) in &self.blocks {
            out[off..off + n].copy_from_slice(&sub[soff..soff + n]);
        }
        out
    }

    /// The base point's weight coordinates as a tensor of the parameters' dtype and device.
    pub fn base_tensor(&self) -> Result<Tensor> {
        self.tensor(&self.restrict(&self.base))
    }

    fn tensor(&self, v: &[f64]) -> Result<Tensor> {
        Ok(Tensor::from_slice(v, v.len(), self.like.device())?.to_dtype(self.like.dtype())?)
    }

    fn full(&self, sub: &Tensor) -> Result<Tensor> {
        let v = tensor_to_vec(sub)?;
        self.check_len(v.len())?;
        self.tensor(&self.embed(&v))
    }

    fn check_len(&self, n: usize) -> Result<()> {
        if n != self.layout.len() {
            return Err(Error::Shape(format!(
                "subspace vector has {n} entries, expected {}",
                self.layout.len()
            )));
        }
        Ok(())
    }
}

impl Objective for WeightSubspace<'_> {
    fn layout(&self) -> &ParamLayout {
        &self.layout
    }
    fn loss(&self, params: &[f64]) -> Result<f64> {
        self.check_len(params.len())?;
        self.inner.loss(&self.embed(params))
    }
    fn losses(&self, points: &[&[f64]]) -> Result<Vec<f64>> {
        let full: Vec<Vec<f64>> = points
            .iter()
            .map(|p| self.check_len(p.len()).map(|_| self.embed(p)))
            .collect::<Result<_>>()?;
        let refs: Vec<&[f64]> = full.iter().map(|p| p.as_slice()).collect();
        self.inner.losses(&refs)
    }
    fn loss_and_grad(&self, params: &Tensor) -> Result<Option<(f64, Tensor)>> {
        match self.inner.loss_and_grad(&self.full(params)?)? {
            Some((l, g)) => Ok(Some((l, self.tensor(&self.restrict(&tensor_to_vec(&g)?))?))),
            None => Ok(None),
        }
    }
}

/// Pruning scores of every flat coordinate (zero outside the weight tensors) and the queries
/// they cost.
#[derive(Clone, Debug)]
pub struct Scores {
    /// One score per flat coordinate; `None` for [`PruneMethod::Random`].
    pub values: Option<Vec<f64>>,
    /// Loss evaluations spent (autograd gradients count one each).
    pub queries: u64,
}

/// ZO-GraSP scores from forward passes only (DeepZero Algorithm 1, step 1):
/// `ĝ0 = RGE(θ)`, `ĝ1 = RGE(θ + μ ĝ0)` with fresh directions, `Ĥg = (ĝ1 − ĝ0) / μ`,
/// `score = −θ ⊙ Ĥg`, all in the subspace of the conv and linear weights. Uses the objective's
/// `loss` only, never `loss_and_grad`; queries are counted by [`Rge`] (`2 (q + 1)`).
pub fn zo_grasp_scores(
    obj: &dyn Objective,
    params: &Tensor,
    rge: &Rge,
    rng: &mut StdRng,
) -> Result<Scores> {
    let sub = WeightSubspace::new(obj, params)?;
    let theta = sub.base_tensor()?;
    let mut est = rge.clone();
    let e0 = est.estimate(&sub, &theta, rng)?;
    let shifted = (&theta + (&e0.grad * rge.mu)?)?;
    let e1 = est.estimate(&sub, &shifted, rng)?;
    let hg = ((e1.grad - &e0.grad)? / rge.mu)?;
    let s = (theta.neg()? * hg)?;
    Ok(Scores {
        values: Some(embed_scores(&sub, obj.layout().len(), &tensor_to_vec(&s)?)),
        queries: e0.queries + e1.queries,
    })
}

/// First-order GraSP scores, the reference ZO-GraSP approximates: `score = −θ ⊙ Hg` over the
/// conv and linear weights.
///
/// GraSP proper takes `Hg` by double backward (the gradient of `gᵀ·stop_grad(g)`); candle 0.11
/// has no double backward (its backward graph is not itself differentiable), so the
/// Hessian-gradient product is a finite difference of two autograd gradients,
/// `Hg ≈ (∇L(θ + μ g) − ∇L(θ)) / μ` with `g = ∇L(θ)`. Needs `Objective::loss_and_grad`.
pub fn grasp_scores(obj: &dyn Objective, params: &Tensor, mu: f64) -> Result<Scores> {
    let sub = WeightSubspace::new(obj, params)?;
    let theta = sub.base_tensor()?;
    let no_grad = || {
        Error::Config("GraSP needs a differentiable objective (a gradient); use ZO-GraSP".into())
    };
    let (_, g0) = sub.loss_and_grad(&theta)?.ok_or_else(no_grad)?;
    let shifted = (&theta + (&g0 * mu)?)?;
    let (_, g1) = sub.loss_and_grad(&shifted)?.ok_or_else(no_grad)?;
    let hg = ((g1 - &g0)? / mu)?;
    let s = (theta.neg()? * hg)?;
    Ok(Scores {
        values: Some(embed_scores(&sub, obj.layout().len(), &tensor_to_vec(&s)?)),
        queries: 2,
    })
}

/// Magnitude scores `|θ|` of the weights.
pub fn magnitude_scores(layout: &ParamLayout, params: &Tensor) -> Result<Scores> {
    let theta = tensor_to_vec(params)?;
    let mut v = vec![0.0; layout.len()];
    for e in weight_entries(layout) {
        for i in e.range() {
            v[i] = theta[i].abs();
        }
    }
    Ok(Scores {
        values: Some(v),
        queries: 0,
    })
}

fn embed_scores(sub: &WeightSubspace, d: usize, s: &[f64]) -> Vec<f64> {
    let mut out = vec![0.0; d];
    for &(off, soff, n) in &sub.blocks {
        out[off..off + n].copy_from_slice(&s[soff..soff + n]);
    }
    out
}

/// The outcome of [`prune`]: layer ratios and, where the method has them, per-weight scores.
#[derive(Clone, Debug)]
pub struct Pruning {
    /// Layer-wise keep ratios implied by the global mask.
    pub ratios: LayerRatios,
    /// Scores per flat coordinate (`None` for random).
    pub scores: Option<Vec<f64>>,
}

/// Score the weights of `model` at `params` on `obj` (typically a [`ClassifierObjective`] over a
/// class-balanced sample as one batch) and derive layer ratios with one global threshold.
///
/// [`ClassifierObjective`]: crate::objective::ClassifierObjective
pub fn prune(
    model: &Model,
    obj: &dyn Objective,
    params: &Tensor,
    config: &PruneConfig,
    rng: &mut StdRng,
) -> Result<Pruning> {
    config.validate()?;
    let scores = match config.method {
        PruneMethod::Random => Scores {
            values: None,
            queries: 0,
        },
        PruneMethod::Magnitude => magnitude_scores(&model.layout, params)?,
        PruneMethod::Grasp => grasp_scores(obj, params, config.mu)?,
        PruneMethod::ZoGrasp => {
            let rge = Rge::new(config.q, config.mu, Default::default(), Default::default())?;
            zo_grasp_scores(obj, params, &rge, rng)?
        }
    };
    let ratios = match &scores.values {
        None => LayerRatios::uniform(model, config.sparsity)?,
        Some(s) => {
            LayerRatios::from_scores(model, s, config.sparsity, config.method, scores.queries)?
        }
    };
    Ok(Pruning {
        ratios,
        scores: scores.values,
    })
}

/// A fixed weight mask over all flat coordinates: per weight tensor, `round(keep_ratio · size)`
/// weights kept — those with the largest `|score|` when `scores` are given (ties to the lower
/// index), else a uniformly random set drawn from `(seed, entry)`. Biases and batch-norm
/// parameters are always kept.
pub fn weight_mask(
    layout: &ParamLayout,
    ratios: &LayerRatios,
    scores: Option<&[f64]>,
    seed: u64,
) -> Result<Vec<bool>> {
    if let Some(s) = scores {
        if s.len() != layout.len() {
            return Err(Error::Shape(format!(
                "{} pruning scores for {} parameters",
                s.len(),
                layout.len()
            )));
        }
    }
    let mut mask = vec![true; layout.len()];
    for (entry, ratio) in ratios.resolve(layout)? {
        let e = &layout.entries[entry];
        let n = e.len();
        let keep = keep_count(ratio, n);
        mask[e.range()].fill(false);
        let chosen: Vec<usize> = match scores {
            Some(s) => {
                let mut idx: Vec<usize> = e.range().collect();
                idx.sort_by(|&a, &b| s[b].abs().total_cmp(&s[a].abs()).then(a.cmp(&b)));
                idx.truncate(keep);
                idx
            }
            None => {
                let mut rng =
                    StdRng::seed_from_u64(derive_seed(seed, &[MASK_STREAM, entry as u64]));
                sample(&mut rng, n, keep)
                    .into_iter()
                    .map(|j| e.offset + j)
                    .collect()
            }
        };
        for i in chosen {
            mask[i] = true;
        }
    }
    Ok(mask)
}

fn keep_count(ratio: f64, n: usize) -> usize {
    ((ratio * n as f64).round() as usize).min(n)
}

/// One tensor's share of the sampled coordinates.
#[derive(Clone, Debug, PartialEq)]
pub struct SampledTensor {
    /// Index into the layout's entries.
    pub entry: usize,
    /// First flat coordinate.
    pub offset: usize,
    /// Scalars in the tensor.
    pub len: usize,
    /// Coordinates drawn per interval (`len` for densely estimated tensors).
    pub keep: usize,
}

/// Draws the per-layer random coordinate sets of sparse training (DeepZero Algorithm 1, step 2).
///
/// Weight tensors get exactly `round(keep_ratio × size)` uniformly random coordinates; biases and
/// batch-norm parameters are dense unless `sparse_all`, in which case they use the ratios' global
/// keep fraction `1 − global_sparsity`. The set for epoch `e` depends only on
/// `(seed, e / interval)`.
#[derive(Clone, Debug)]
pub struct CoordinateSampler {
    tensors: Vec<SampledTensor>,
    interval: usize,
    block: Option<usize>,
    coords: Vec<usize>,
}

impl CoordinateSampler {
    /// Resolve `ratios` against `layout`; `interval` (epochs between draws) must be ≥ 1.
    pub fn new(
        layout: &ParamLayout,
        ratios: &LayerRatios,
        interval: usize,
        sparse_all: bool,
    ) -> Result<Self> {
        if interval == 0 {
            return Err(Error::invalid(Setting::MaskInterval, "must be at least 1"));
        }
        let weight = ratios.resolve(layout)?;
        let other = ratios.keep_fraction();
        let tensors = layout
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let keep = match weight.iter().find(|(j, _)| *j == i) {
                    Some(&(_, r)) => keep_count(r, e.len()),
                    None if sparse_all => keep_count(other, e.len()),
                    None => e.len(),
                };
                SampledTensor {
                    entry: i,
                    offset: e.offset,
                    len: e.len(),
                    keep,
                }
            })
            .collect();
        Ok(CoordinateSampler {
            tensors,
            interval,
            block: None,
            coords: Vec::new(),
        })
    }

    /// Per-tensor counts.
    pub fn tensors(&self) -> &[SampledTensor] {
        &self.tensors
    }

    /// Epochs between draws.
    pub fn interval(&self) -> usize {
        self.interval
    }

    /// Coordinates estimated per step (the same for every draw).
    pub fn num_coords(&self) -> usize {
        self.tensors.iter().map(|t| t.keep).sum()
    }

    /// The coordinate set of draw `block` (epochs `block·interval ..`), sorted.
    pub fn draw(&self, seed: u64, block: usize) -> Vec<usize> {
        let mut out = Vec::with_capacity(self.num_coords());
        for t in &self.tensors {
            if t.keep == t.len {
                out.extend(t.offset..t.offset + t.len);
                continue;
            }
            let mut rng = StdRng::seed_from_u64(derive_seed(
                seed,
                &[SAMPLER_STREAM, block as u64, t.entry as u64],
            ));
            let mut idx: Vec<usize> = sample(&mut rng, t.len, t.keep)
                .into_iter()
                .map(|j| t.offset + j)
                .collect();
            idx.sort_unstable();
            out.extend(idx);
        }
        out
    }

    /// Make the set current for `epoch` (0-based): redraws when the epoch starts a new interval
    /// or when no set has been drawn yet (a fresh or resumed run). Returns whether it redrew.
    pub fn update(&mut self, epoch: usize, seed: u64) -> bool {
        let block = epoch / self.interval;
        if self.block == Some(block) {
            return false;
        }
        self.coords = self.draw(seed, block);
        self.block = Some(block);
        true
    }

    /// The current set (empty before the first [`CoordinateSampler::update`]).
    pub fn coords(&self) -> &[usize] {
        &self.coords
    }

    /// A 0/1 mask tensor of the current set, shaped and typed like `like`.
    pub fn mask_tensor(&self, like: &Tensor) -> Result<Tensor> {
        let mut m = vec![0.0f64; like.elem_count()];
        for &i in &self.coords {
            m[i] = 1.0;
        }
        mask_like(&m, like)
    }

    fn check_drawn(&self) -> Result<()> {
        if self.block.is_none() {
            return Err(Error::Config(
                "sparse estimator used before on_epoch_start drew its coordinate set".into(),
            ));
        }
        Ok(())
    }
}

fn mask_like(m: &[f64], like: &Tensor) -> Result<Tensor> {
    Ok(Tensor::from_slice(m, like.shape(), like.device())?.to_dtype(like.dtype())?)
}

/// Sparse CGE: CGE on the sampler's current coordinate set; every other coordinate gets 0.
#[derive(Clone, Debug)]
pub struct SparseCge {
    /// Coordinate sets.
    pub sampler: CoordinateSampler,
    inner: Cge,
}

impl SparseCge {
    /// Wrap a CGE (its own coordinate set is replaced at every draw).
    pub fn new(inner: Cge, sampler: CoordinateSampler) -> Self {
        SparseCge { sampler, inner }
    }

    /// Queries of one step: the sampled coordinates plus the base query (forward difference).
    pub fn queries_per_step(&self) -> u64 {
        self.inner.queries_for(self.sampler.num_coords())
    }
}

impl GradientEstimator for SparseCge {
    fn name(&self) -> String {
        format!(
            "sparse-cge({} coords, every {} epochs)",
            self.sampler.num_coords(),
            self.sampler.interval()
        )
    }
    fn estimate(
        &mut self,
        obj: &dyn Objective,
        params: &Tensor,
        rng: &mut StdRng,
    ) -> Result<Estimate> {
        self.sampler.check_drawn()?;
        self.inner.estimate(obj, params, rng)
    }
    fn on_epoch_start(&mut self, epoch: usize, seed: u64, params: &mut Tensor) -> Result<()> {
        if self.sampler.update(epoch, seed) {
            self.inner = self
                .inner
                .clone()
                .with_coords(self.sampler.coords().to_vec());
        }
        self.inner.on_epoch_start(epoch, seed, params)
    }
    fn distribute(&mut self, comm: Arc<dyn Collective>) -> Result<bool> {
        self.inner.distribute(comm)
    }
}

/// First-order reference with sparse gradients: backprop, masked to the sampler's current set.
#[derive(Clone, Debug)]
pub struct SparseBackprop {
    /// Coordinate sets.
    pub sampler: CoordinateSampler,
    mask: Option<Tensor>,
}

impl SparseBackprop {
    /// Backprop masked by `sampler`'s sets.
    pub fn new(sampler: CoordinateSampler) -> Self {
        SparseBackprop {
            sampler,
            mask: None,
        }
    }
}

impl GradientEstimator for SparseBackprop {
    fn name(&self) -> String {
        format!(
            "sparse-fo({} coords, every {} epochs)",
            self.sampler.num_coords(),
            self.sampler.interval()
        )
    }
    fn estimate(
        &mut self,
        obj: &dyn Objective,
        params: &Tensor,
        rng: &mut StdRng,
    ) -> Result<Estimate> {
        self.sampler.check_drawn()?;
        let mask = match &self.mask {
            Some(m) if m.dtype() == params.dtype() => m.clone(),
            _ => {
                let m = self.sampler.mask_tensor(params)?;
                self.mask = Some(m.clone());
                m
            }
        };
        let mut e = Backprop.estimate(obj, params, rng)?;
        e.grad = (e.grad * mask)?;
        Ok(e)
    }
    fn on_epoch_start(&mut self, epoch: usize, seed: u64, params: &mut Tensor) -> Result<()> {
        if self.sampler.update(epoch, seed) {
            self.mask = Some(self.sampler.mask_tensor(params)?);
        }
        Ok(())
    }
}

/// First-order training of a pruned network: a fixed mask; pruned weights are set to zero at
/// every epoch start and their gradients are zeroed, so SGD (with weight decay and momentum) or
/// Adam keeps them at zero.
#[derive(Clone, Debug)]
pub struct PrunedBackprop {
    keep: Vec<bool>,
    mask: Option<Tensor>,
}

impl PrunedBackprop {
    /// `keep[i]`: whether flat coordinate `i` is trained (see [`weight_mask`]).
    pub fn new(keep: Vec<bool>) -> Self {
        PrunedBackprop { keep, mask: None }
    }

    /// Number of trained coordinates.
    pub fn num_kept(&self) -> usize {
        self.keep.iter().filter(|&&k| k).count()
    }

    fn mask(&mut self, like: &Tensor) -> Result<Tensor> {
        if like.elem_count() != self.keep.len() {
            return Err(Error::Shape(format!(
                "weight mask has {} entries, parameters {}",
                self.keep.len(),
                like.elem_count()
            )));
        }
        match &self.mask {
            Some(m) if m.dtype() == like.dtype() && m.device().same_device(like.device()) => {
                Ok(m.clone())
            }
            _ => {
                let v: Vec<f64> = self.keep.iter().map(|&k| f64::from(u8::from(k))).collect();
                let m = mask_like(&v, like)?;
                self.mask = Some(m.clone());
                Ok(m)
            }
        }
    }
}

impl GradientEstimator for PrunedBackprop {
    fn name(&self) -> String {
        format!("pruned-fo({} of {} kept)", self.num_kept(), self.keep.len())
    }
    fn estimate(
        &mut self,
        obj: &dyn Objective,
        params: &Tensor,
        rng: &mut StdRng,
    ) -> Result<Estimate> {
        let mask = self.mask(params)?;
        let mut e = Backprop.estimate(obj, params, rng)?;
        e.grad = (e.grad * mask)?;
        Ok(e)
    }
    fn on_epoch_start(&mut self, _epoch: usize, _seed: u64, params: &mut Tensor) -> Result<()> {
        let mask = self.mask(params)?;
        *params = (&*params * mask)?;
        Ok(())
    }
}

/// Spearman rank correlation of two equally long samples (average ranks for ties).
pub fn spearman(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "spearman: samples of different length");
    let (ra, rb) = (ranks(a), ranks(b));
    let n = a.len() as f64;
    let (ma, mb) = (ra.iter().sum::<f64>() / n, rb.iter().sum::<f64>() / n);
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for (x, y) in ra.iter().zip(&rb) {
        sab += (x - ma) * (y - mb);
        saa += (x - ma) * (x - ma);
        sbb += (y - mb) * (y - mb);
    }
    sab / (saa.sqrt() * sbb.sqrt()).max(f64::MIN_POSITIVE)
}

fn ranks(v: &[f64]) -> Vec<f64> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&i, &j| v[i].total_cmp(&v[j]));
    let mut r = vec![0.0; v.len()];
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && v[idx[j + 1]] == v[idx[i]] {
            j += 1;
        }
        let avg = (i + j) as f64 / 2.0;
        for &k in &idx[i..=j] {
            r[k] = avg;
        }
        i = j + 1;
    }
    r
}

/// Score the initial parameters `init` of `model` on the task's pruning objective (for
/// classification, a class-balanced sample as one batch) and derive the layer ratios.
/// Deterministic in `seed`.
pub fn prune_task(
    model: &Model,
    task: &dyn Task,
    init: &Tensor,
    config: &PruneConfig,
    seed: u64,
) -> Result<Pruning> {
    config.validate()?;
    let obj = task.pruning_objective(seed)?;
    let mut rng = StdRng::seed_from_u64(derive_seed(seed, &[PRUNE_STREAM, 1]));
    prune(model, obj.as_ref(), init, config, &mut rng)
}

/// Sparse training settings besides the layer ratios.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SparseConfig {
    /// Epochs between redraws of the coordinate sets.
    pub mask_interval: usize,
    /// Sample biases and batch-norm parameters too.
    pub sparse_all: bool,
    /// Train the pruned network (fixed weight mask) with backprop instead.
    pub prune_weights: bool,
}

impl Default for SparseConfig {
    fn default() -> Self {
        SparseConfig {
            mask_interval: 5,
            sparse_all: false,
            prune_weights: false,
        }
    }
}

/// The estimator of a sparse run (DeepZero Algorithm 1): sparse CGE over the per-layer random
/// coordinate sets, backprop with the same sparse gradient masks, or — with `prune_weights` —
/// backprop on the pruned network (weights with the largest `|score|` kept where `scores` are
/// given, else a random mask). RGE has no sparse form.
pub fn sparse_estimator(
    est: &EstimatorConfig,
    layout: &ParamLayout,
    ratios: &LayerRatios,
    scores: Option<&[f64]>,
    config: &SparseConfig,
    seed: u64,
) -> Result<Box<dyn GradientEstimator>> {
    if config.prune_weights {
        if est.kind != EstimatorKind::Fo {
            return Err(Error::invalid(
                Setting::Estimator,
                "training the pruned network (fixed weight mask) needs backprop",
            ));
        }
        let keep = weight_mask(layout, ratios, scores, seed)?;
        return Ok(Box::new(PrunedBackprop::new(keep)));
    }
    let sampler = CoordinateSampler::new(layout, ratios, config.mask_interval, config.sparse_all)?;
    Ok(match est.kind {
        EstimatorKind::Cge => Box::new(SparseCge::new(est.cge()?, sampler)),
        EstimatorKind::Fo => Box::new(SparseBackprop::new(sampler)),
        EstimatorKind::Rge => return Err(Error::invalid(
            Setting::Estimator,
            "sparse training applies to CGE (sparse CGE) or backprop (sparse gradients), not RGE",
        )),
    })
}
