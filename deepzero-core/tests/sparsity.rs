//! Tests of `deepzero_core::sparsity`: ZO-GraSP against first-order GraSP, global-threshold
//! ratios, coordinate sampling for sparse CGE, and the sparse / pruned estimators.

use anyhow::Result;
use candle_core::{Device, Tensor};
use deepzero_core::data::{self, Dataset, DatasetKind, Normalization};
use deepzero_core::estimator::{Backprop, Cge, Difference, GradientEstimator, QueryEngine, Rge};
use deepzero_core::layout::{ParamKind, ParamLayout};
use deepzero_core::model::{params_tensor, tensor_to_vec, Model, ModelSpec, Precision};
use deepzero_core::objective::{ClassifierObjective, Objective};
use deepzero_core::optim::OptimizerConfig;
use deepzero_core::sparsity::{
    global_keep, grasp_scores, magnitude_scores, prune, spearman, weight_mask, zo_grasp_scores,
    CoordinateSampler, LayerRatios, PruneConfig, PruneMethod, PrunedBackprop, SparseBackprop,
    SparseCge,
};
use deepzero_core::trainer::batch_tensors;
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::sync::atomic::{AtomicU64, Ordering};

// ---------------------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------------------

fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// The shipped digits training set, normalised.
fn digits() -> Result<Dataset> {
    let (mut train, _) = data::load(DatasetKind::Digits, None, 0)?;
    Normalization::fit(&train).apply(&mut train)?;
    Ok(train)
}

/// A model on digits, its Kaiming init (seeded) and a class-balanced sample of `per_class`.
struct Setup {
    model: Model,
    params: Tensor,
    x: Tensor,
    y: Tensor,
}

impl Setup {
    fn new(spec: ModelSpec, per_class: usize, seed: u64, p: Precision) -> Result<Self> {
        let ds = digits()?;
        let model = Model::build(&spec, [ds.channels, ds.height, ds.width], ds.num_classes)?;
        let params = params_tensor(&model.init_params(&mut rng(seed)), p, &Device::Cpu)?;
        let sample = ds.balanced_sample(per_class, seed);
        let idx: Vec<usize> = (0..sample.len()).collect();
        let (x, y) = batch_tensors(&sample, &idx, None, p.dtype(), &Device::Cpu)?;
        Ok(Setup {
            model,
            params,
            x,
            y,
        })
    }
    fn objective(&self) -> Result<ClassifierObjective<'_>> {
        Ok(ClassifierObjective::classifier(
            &self.model,
            self.x.clone(),
            self.y.clone(),
        )?)
    }
}

/// The weight coordinates of a full-length vector.
fn weights_of(layout: &ParamLayout, v: &[f64]) -> Vec<f64> {
    layout
        .entries
        .iter()
        .filter(|e| e.kind == ParamKind::Weight)
        .flat_map(|e| v[e.range()].to_vec())
        .collect()
}

/// Counts the objective's calls; `loss_and_grad` panics (ZO methods must not use it).
struct ForwardOnly<'a> {
    inner: &'a dyn Objective,
    losses: AtomicU64,
}

impl Objective for ForwardOnly<'_> {
    fn layout(&self) -> &ParamLayout {
        self.inner.layout()
    }
    fn loss(&self, params: &[f64]) -> deepzero_core::Result<f64> {
        self.losses.fetch_add(1, Ordering::Relaxed);
        self.inner.loss(params)
    }
    fn base_loss(&self, params: &[f64]) -> deepzero_core::Result<f64> {
        self.losses.fetch_add(1, Ordering::Relaxed);
        self.inner.base_loss(params)
    }
    fn loss_and_grad(&self, _params: &Tensor) -> deepzero_core::Result<Option<(f64, Tensor)>> {
        panic!("ZO-GraSP asked for a gradient")
    }
}

fn cnn() -> ModelSpec {
    ModelSpec::SimpleCnn { depth: 2, width: 8 }
}

/// |score| rank correlations on the weights: (ZO-GraSP vs GraSP, magnitude vs GraSP).
fn correlations(spec: ModelSpec, seed: u64, q: usize) -> Result<(f64, f64, f64)> {
    let s = Setup::new(spec, 25, seed, Precision::F64)?;
    let obj = s.objective()?;
    let rge = Rge::new(q, 5e-3, Difference::Forward, Default::default())?;
    let zo = zo_grasp_scores(&obj, &s.params, &rge, &mut rng(seed + 100))?;
    let fo = grasp_scores(&obj, &s.params, 5e-3)?;
    let mag = magnitude_scores(&s.model.layout, &s.params)?;
    let abs = |v: &[f64]| -> Vec<f64> {
        weights_of(&s.model.layout, v)
            .iter()
            .map(|x| x.abs())
            .collect()
    };
    let (zo, fo, mag) = (zo.values.unwrap(), fo.values.unwrap(), mag.values.unwrap());
    let signed = spearman(
        &weights_of(&s.model.layout, &zo),
        &weights_of(&s.model.layout, &fo),
    );
    Ok((
        spearman(&abs(&zo), &abs(&fo)),
        spearman(&abs(&mag), &abs(&fo)),
        signed,
    ))
}

/// Layout of a plain quadratic (every coordinate a "weight" of one tensor).
fn flat_layout(d: usize) -> ParamLayout {
    let mut l = ParamLayout::default();
    l.push("w.weight", ParamKind::Weight, vec![d], 0);
    l
}

/// `L(θ) = ½ θᵀ A θ` with a fixed symmetric `A`: gradient `Aθ`, Hessian-gradient `A²θ`.
struct Quadratic {
    a: Vec<Vec<f64>>,
    layout: ParamLayout,
}

impl Quadratic {
    fn new(d: usize) -> Self {
        let a = (0..d)
            .map(|i| {
                (0..d)
                    .map(|j| {
                        if i == j {
                            1.0 + i as f64
                        } else {
                            0.3 / (1.0 + (i + j) as f64)
                        }
                    })
                    .collect()
            })
            .collect();
        Quadratic {
            a,
            layout: flat_layout(d),
        }
    }
    fn mul(&self, v: &[f64]) -> Vec<f64> {
        self.a
            .iter()
            .map(|row| row.iter().zip(v).map(|(x, y)| x * y).sum())
            .collect()
    }
}

impl Objective for Quadratic {
    fn layout(&self) -> &ParamLayout {
        &self.layout
    }
    fn loss(&self, t: &[f64]) -> deepzero_core::Result<f64> {
        Ok(0.5 * t.iter().zip(self.mul(t)).map(|(x, y)| x * y).sum::<f64>())
    }
    fn loss_and_grad(&self, params: &Tensor) -> deepzero_core::Result<Option<(f64, Tensor)>> {
        let t = tensor_to_vec(params)?;
        let g = self.mul(&t);
        let l = 0.5 * t.iter().zip(&g).map(|(x, y)| x * y).sum::<f64>();
        Ok(Some((l, Tensor::from_slice(&g, g.len(), params.device())?)))
    }
}

// ---------------------------------------------------------------------------------------
// ZO-GraSP
// ---------------------------------------------------------------------------------------

#[test]
fn zo_grasp_uses_forward_passes_only() -> Result<()> {
    let s = Setup::new(cnn(), 5, 0, Precision::F32)?;
    let inner = s.objective()?;
    let obj = ForwardOnly {
        inner: &inner,
        losses: AtomicU64::new(0),
    };
    let config = PruneConfig {
        method: PruneMethod::ZoGrasp,
        sparsity: 0.9,
        q: 12,
        mu: 5e-3,
    };
    let p = prune(&s.model, &obj, &s.params, &config, &mut rng(3))?;
    // Two RGE estimates of q directions plus a base query each, counted by the estimator.
    assert_eq!(p.ratios.queries, 2 * (12 + 1));
    assert_eq!(obj.losses.load(Ordering::Relaxed), p.ratios.queries);
    let scores = p.scores.expect("zo-grasp has per-weight scores");
    // Only weights are scored.
    for e in &s.model.layout.entries {
        if e.kind != ParamKind::Weight {
            assert!(
                scores[e.range()].iter().all(|&v| v == 0.0),
                "{} scored",
                e.name
            );
        }
    }
    Ok(())
}

#[test]
fn grasp_hessian_gradient_product_is_exact_on_a_quadratic() -> Result<()> {
    // For a quadratic the finite difference of gradients is exact: score = −θ ⊙ A²θ.
    let q = Quadratic::new(6);
    let theta = [0.5, -1.0, 0.25, 2.0, -0.75, 1.5];
    let t = Tensor::from_slice(&theta, 6, &Device::Cpu)?;
    let s = grasp_scores(&q, &t, 1e-3)?;
    let a2t = q.mul(&q.mul(&theta));
    for (i, v) in s.values.unwrap().iter().enumerate() {
        let want = -theta[i] * a2t[i];
        assert!(
            (v - want).abs() < 1e-8 * (1.0 + want.abs()),
            "{i}: {v} vs {want}"
        );
    }
    assert_eq!(s.queries, 2);
    Ok(())
}

#[test]
fn zo_grasp_is_unbiased_for_hg_on_a_quadratic() -> Result<()> {
    // For a quadratic, Gaussian forward-difference RGE is unbiased for any μ (the O(μ) term is
    // an odd moment of u) and ∇L(θ + μĝ0) − ∇L(θ) = μ A ĝ0 exactly, so E[score] = −θ ⊙ A²θ.
    // A large μ keeps the variance of (ĝ1 − ĝ0)/μ small enough to see the mean.
    let q = Quadratic::new(4);
    let theta = [0.5, -1.0, 0.25, 2.0];
    let t = Tensor::from_slice(&theta, 4, &Device::Cpu)?;
    let rge = Rge::new(64, 0.5, Difference::Forward, Default::default())?;
    let mut mean = [0.0f64; 4];
    let n = 400;
    let mut r = rng(11);
    for _ in 0..n {
        let s = zo_grasp_scores(&q, &t, &rge, &mut r)?.values.unwrap();
        for i in 0..4 {
            mean[i] += s[i] / n as f64;
        }
    }
    let a2t = q.mul(&q.mul(&theta));
    let want: Vec<f64> = (0..4).map(|i| -theta[i] * a2t[i]).collect();
    let err: f64 = mean
        .iter()
        .zip(&want)
        .map(|(m, w)| (m - w).powi(2))
        .sum::<f64>()
        .sqrt();
    let norm: f64 = want.iter().map(|w| w * w).sum::<f64>().sqrt();
    assert!(err < 0.15 * norm, "mean {mean:?} vs {want:?}");
    Ok(())
}

#[test]
fn zo_grasp_scores_rank_correlate_with_grasp() -> Result<()> {
    // Measured (cnn-d2-w8 on 25 digits per class, q = 192, f64): Spearman of |score| over the
    // weights 0.46 / 0.48 / 0.46 / 0.44 / 0.53 for seeds 0–4 (magnitude vs GraSP: 0.58–0.70).
    for seed in 0..3 {
        let (zo, _, _) = correlations(cnn(), seed, 192)?;
        assert!(zo > 0.3, "seed {seed}: Spearman {zo:.3}");
    }
    Ok(())
}

#[test]
fn global_threshold_hits_the_requested_sparsity() -> Result<()> {
    let s = Setup::new(cnn(), 5, 1, Precision::F32)?;
    let obj = s.objective()?;
    for method in [
        PruneMethod::Random,
        PruneMethod::Magnitude,
        PruneMethod::Grasp,
        PruneMethod::ZoGrasp,
    ] {
        for sparsity in [0.0, 0.5, 0.8, 0.9, 0.95, 0.99] {
            let config = PruneConfig {
                method,
                sparsity,
                q: 8,
                mu: 5e-3,
            };
            let r = prune(&s.model, &obj, &s.params, &config, &mut rng(0))?.ratios;
            assert!(
                (r.global_sparsity - sparsity).abs() <= 0.01,
                "{method} at {sparsity}: {}",
                r.global_sparsity
            );
            // What training will keep, from the ratios alone.
            let (mut kept, mut total) = (0usize, 0usize);
            for l in &r.layers {
                let k = (l.keep_ratio * l.params as f64).round() as usize;
                assert_eq!(k, l.kept, "{}", l.name);
                kept += k;
                total += l.params;
            }
            assert_eq!(total, s.model.layout.count_kind(ParamKind::Weight));
            let implied = 1.0 - kept as f64 / total as f64;
            assert!(
                (implied - sparsity).abs() <= 0.01,
                "{method} {sparsity}: {implied}"
            );
        }
    }
    Ok(())
}

#[test]
fn global_keep_takes_the_largest_magnitudes_across_layers() -> Result<()> {
    let mut layout = ParamLayout::default();
    layout.push("a.weight", ParamKind::Weight, vec![4], 0);
    layout.push("a.bias", ParamKind::Bias, vec![2], 0);
    layout.push("b.weight", ParamKind::Weight, vec![4], 1);
    let scores = [0.1, -5.0, 0.3, 2.0, 99.0, 99.0, -0.2, 1.0, 1.0, -4.0];
    // 8 weights, sparsity 0.5 → keep 4: −5, −4, 2, then the tie at |1.0| goes to index 7.
    let keep = global_keep(&layout, &scores, 0.5)?;
    let kept: Vec<usize> = (0..10).filter(|&i| keep[i]).collect();
    assert_eq!(kept, vec![1, 3, 7, 9]);
    assert!(global_keep(&layout, &scores, 1.0).is_err());
    let mut bad = scores;
    bad[2] = f64::NAN;
    assert!(global_keep(&layout, &bad, 0.5).is_err());
    Ok(())
}

#[test]
fn sparsity_errors_name_the_setting() {
    use deepzero_core::error::{Error, Setting};
    let model = Model::build(&cnn(), [1, 8, 8], 10).unwrap();
    let e = LayerRatios::uniform(&model, 1.2).unwrap_err();
    assert!(
        matches!(
            &e,
            Error::Invalid {
                setting: Setting::Sparsity,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(
        e.to_string()
            .contains("sparsity must be in [0, 1), got 1.2"),
        "{e}"
    );
    let r = LayerRatios::uniform(&model, 0.5).unwrap();
    let e = CoordinateSampler::new(&model.layout, &r, 0, false).unwrap_err();
    assert!(
        matches!(
            &e,
            Error::Invalid {
                setting: Setting::MaskInterval,
                ..
            }
        ),
        "{e:?}"
    );
}

#[test]
fn ratios_round_trip_and_check_the_model() -> Result<()> {
    let model = Model::build(&cnn(), [1, 8, 8], 10)?;
    let r = LayerRatios::uniform(&model, 0.9)?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("ratios.json");
    std::fs::write(&path, serde_json::to_string_pretty(&r)?)?;
    let back = LayerRatios::load(&path)?;
    assert_eq!(back.layers.len(), r.layers.len());
    for (a, b) in back.layers.iter().zip(&r.layers) {
        assert_eq!((&a.name, a.params, a.kept), (&b.name, b.params, b.kept));
        assert!((a.keep_ratio - b.keep_ratio).abs() < 1e-12);
    }
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    assert_eq!(json["method"], "random");
    assert_eq!(json["layers"][0]["name"], "conv1.weight");
    // A different width: same names, other sizes.
    let other = Model::build(&ModelSpec::SimpleCnn { depth: 2, width: 4 }, [1, 8, 8], 10)?;
    let e = r.resolve(&other.layout).unwrap_err().to_string();
    assert!(
        e.contains("conv1.weight") && e.contains("deepzero prune"),
        "{e}"
    );
    // A different depth: a missing layer.
    let deeper = Model::build(&ModelSpec::SimpleCnn { depth: 3, width: 8 }, [1, 8, 8], 10)?;
    let e = r.resolve(&deeper.layout).unwrap_err().to_string();
    assert!(e.contains("conv3.weight"), "{e}");
    Ok(())
}

// ---------------------------------------------------------------------------------------
// coordinate sampling
// ---------------------------------------------------------------------------------------

fn sampler_setup(sparsity: f64, interval: usize, sparse_all: bool) -> (Model, CoordinateSampler) {
    let model = Model::build(&cnn(), [1, 8, 8], 10).unwrap();
    let r = LayerRatios::uniform(&model, sparsity).unwrap();
    let s = CoordinateSampler::new(&model.layout, &r, interval, sparse_all).unwrap();
    (model, s)
}

fn per_entry(layout: &ParamLayout, coords: &[usize]) -> Vec<usize> {
    layout
        .entries
        .iter()
        .map(|e| coords.iter().filter(|&&i| e.range().contains(&i)).count())
        .collect()
}

#[test]
fn sampler_draws_exact_counts_per_layer() {
    let (model, mut s) = sampler_setup(0.9, 5, false);
    s.update(0, 1);
    let counts = per_entry(&model.layout, s.coords());
    for (e, &c) in model.layout.entries.iter().zip(&counts) {
        let want = if e.kind == ParamKind::Weight {
            (0.1 * e.len() as f64).round() as usize
        } else {
            e.len()
        };
        assert_eq!(c, want, "{}", e.name);
    }
    // conv1 72 → 7, conv2 576 → 58, fc 80 → 8; 58 biases/BN parameters dense.
    assert_eq!(s.coords().len(), 7 + 58 + 8 + 58);
    assert_eq!(s.num_coords(), s.coords().len());
    // Sorted, no duplicates.
    assert!(s.coords().windows(2).all(|w| w[0] < w[1]));
}

#[test]
fn sampler_sparse_all_samples_biases_and_batch_norm_too() {
    let (model, mut s) = sampler_setup(0.75, 5, true);
    s.update(0, 1);
    let counts = per_entry(&model.layout, s.coords());
    for (e, &c) in model.layout.entries.iter().zip(&counts) {
        assert_eq!(c, (0.25 * e.len() as f64).round() as usize, "{}", e.name);
    }
}

#[test]
fn sampler_resamples_every_interval_only() {
    let (_, mut s) = sampler_setup(0.9, 5, false);
    let mut sets = Vec::new();
    for epoch in 0..12 {
        let redrew = s.update(epoch, 7);
        assert_eq!(redrew, epoch % 5 == 0, "epoch {epoch}");
        sets.push(s.coords().to_vec());
    }
    for epoch in 0..12 {
        let first = epoch / 5 * 5;
        assert_eq!(
            sets[epoch], sets[first],
            "epoch {epoch} differs within its interval"
        );
    }
    assert_ne!(sets[0], sets[5]);
    assert_ne!(sets[5], sets[10]);
}

#[test]
fn sampler_is_deterministic_under_the_seed() {
    let (_, mut a) = sampler_setup(0.9, 3, false);
    let (_, mut b) = sampler_setup(0.9, 3, false);
    let (_, mut c) = sampler_setup(0.9, 3, false);
    a.update(4, 42);
    b.update(4, 42);
    c.update(4, 43);
    assert_eq!(a.coords(), b.coords());
    assert_ne!(a.coords(), c.coords());
    assert_eq!(a.draw(42, 1), a.coords());
}

#[test]
fn sampler_resumes_with_the_same_set() {
    // One run from epoch 0 to 7; another created fresh at epoch 7 (a resumed run).
    let (_, mut run) = sampler_setup(0.9, 5, false);
    for epoch in 0..=7 {
        run.update(epoch, 9);
    }
    let (_, mut resumed) = sampler_setup(0.9, 5, false);
    assert!(resumed.coords().is_empty());
    assert!(resumed.update(7, 9), "a fresh sampler must draw");
    assert_eq!(resumed.coords(), run.coords());
}

// ---------------------------------------------------------------------------------------
// sparse and pruned estimators
// ---------------------------------------------------------------------------------------

#[test]
fn sparse_cge_estimates_only_the_sampled_coordinates() -> Result<()> {
    let s = Setup::new(cnn(), 2, 0, Precision::F64)?;
    let obj = s.objective()?;
    let ratios = LayerRatios::uniform(&s.model, 0.95)?;
    let sampler = CoordinateSampler::new(&s.model.layout, &ratios, 5, false)?;
    let cge = Cge::new(1e-4, Difference::Forward, QueryEngine::Reuse)?;
    let mut est = SparseCge::new(cge.clone(), sampler);
    let mut params = s.params.clone();
    assert!(
        est.estimate(&obj, &params, &mut rng(0)).is_err(),
        "no set drawn yet"
    );
    est.on_epoch_start(0, 5, &mut params)?;
    let coords = est.sampler.coords().to_vec();
    let e = est.estimate(&obj, &params, &mut rng(0))?;
    assert_eq!(e.queries, coords.len() as u64 + 1);
    assert_eq!(est.queries_per_step(), e.queries);
    let g = tensor_to_vec(&e.grad)?;
    let dense = tensor_to_vec(
        &cge.clone()
            .with_coords(coords.clone())
            .estimate(&obj, &params, &mut rng(0))?
            .grad,
    )?;
    assert_eq!(g, dense);
    for (i, v) in g.iter().enumerate() {
        if coords.binary_search(&i).is_err() {
            assert_eq!(*v, 0.0, "coordinate {i} outside the set");
        }
    }
    // Agrees with backprop on the sampled coordinates.
    let truth = tensor_to_vec(&Backprop.estimate(&obj, &params, &mut rng(0))?.grad)?;
    let (mut num, mut den) = (0.0, 0.0);
    for &i in &coords {
        num += (g[i] - truth[i]).powi(2);
        den += truth[i].powi(2);
    }
    assert!(
        (num / den).sqrt() < 1e-2,
        "relative error {}",
        (num / den).sqrt()
    );
    Ok(())
}

#[test]
fn sparse_backprop_masks_the_gradient() -> Result<()> {
    let s = Setup::new(cnn(), 2, 0, Precision::F32)?;
    let obj = s.objective()?;
    let ratios = LayerRatios::uniform(&s.model, 0.8)?;
    let sampler = CoordinateSampler::new(&s.model.layout, &ratios, 2, false)?;
    let mut est = SparseBackprop::new(sampler);
    let mut params = s.params.clone();
    est.on_epoch_start(0, 3, &mut params)?;
    let set0 = est.sampler.coords().to_vec();
    let g = tensor_to_vec(&est.estimate(&obj, &params, &mut rng(0))?.grad)?;
    let truth = tensor_to_vec(&Backprop.estimate(&obj, &params, &mut rng(0))?.grad)?;
    for i in 0..g.len() {
        let want = if set0.binary_search(&i).is_ok() {
            truth[i]
        } else {
            0.0
        };
        assert_eq!(g[i], want, "coordinate {i}");
    }
    est.on_epoch_start(1, 3, &mut params)?;
    assert_eq!(est.sampler.coords(), set0.as_slice());
    est.on_epoch_start(2, 3, &mut params)?;
    assert_ne!(est.sampler.coords(), set0.as_slice());
    assert_eq!(
        params.to_vec1::<f32>()?,
        s.params.to_vec1::<f32>()?,
        "params untouched"
    );
    Ok(())
}

#[test]
fn weight_masks_keep_top_scores_or_a_seeded_random_set() -> Result<()> {
    let s = Setup::new(cnn(), 2, 0, Precision::F32)?;
    let layout = &s.model.layout;
    let ratios = LayerRatios::uniform(&s.model, 0.9)?;
    let mag = magnitude_scores(layout, &s.params)?.values.unwrap();
    let by_score = weight_mask(layout, &ratios, Some(&mag), 0)?;
    let random = weight_mask(layout, &ratios, None, 0)?;
    assert_eq!(random, weight_mask(layout, &ratios, None, 0)?);
    assert_ne!(random, weight_mask(layout, &ratios, None, 1)?);
    for e in &layout.entries {
        let (a, b) = (&by_score[e.range()], &random[e.range()]);
        if e.kind != ParamKind::Weight {
            assert!(a.iter().all(|&k| k) && b.iter().all(|&k| k), "{}", e.name);
            continue;
        }
        let want = (0.1 * e.len() as f64).round() as usize;
        assert_eq!(a.iter().filter(|&&k| k).count(), want, "{}", e.name);
        assert_eq!(b.iter().filter(|&&k| k).count(), want, "{}", e.name);
        // Every kept weight is at least as large as every pruned one.
        let kept_min = e
            .range()
            .filter(|&i| by_score[i])
            .map(|i| mag[i])
            .fold(f64::INFINITY, f64::min);
        let pruned_max = e
            .range()
            .filter(|&i| !by_score[i])
            .map(|i| mag[i])
            .fold(0.0, f64::max);
        assert!(kept_min >= pruned_max, "{}", e.name);
    }
    Ok(())
}

#[test]
fn pruned_weights_stay_zero_under_sgd_with_weight_decay() -> Result<()> {
    let s = Setup::new(cnn(), 2, 0, Precision::F32)?;
    let obj = s.objective()?;
    let ratios = LayerRatios::uniform(&s.model, 0.9)?;
    let keep = weight_mask(&s.model.layout, &ratios, None, 4)?;
    let mut est = PrunedBackprop::new(keep.clone());
    let mut opt = OptimizerConfig::default().build()?;
    let mut params = s.params.clone();
    est.on_epoch_start(0, 0, &mut params)?;
    for _ in 0..5 {
        let e = est.estimate(&obj, &params, &mut rng(0))?;
        opt.step(&mut params, &e.grad, 0.1)?;
    }
    let before = s.params.to_vec1::<f32>()?;
    let after = params.to_vec1::<f32>()?;
    let mut moved = 0;
    for i in 0..after.len() {
        if keep[i] {
            moved += usize::from(after[i] != before[i]);
        } else {
            assert_eq!(after[i], 0.0, "pruned coordinate {i} moved");
        }
    }
    assert!(
        moved > est.num_kept() / 2,
        "kept weights barely trained: {moved}"
    );
    Ok(())
}
