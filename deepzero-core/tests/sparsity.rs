//! Tests of `deepzero_core::sparsity`: ZO-GraSP against first-order GraSP, global-threshold
//! ratios, coordinate sampling for sparse CGE, and the sparse / pruned estimators.

use anyhow::Result;
use candle_core::{Device, Tensor};
use deepzero_core::data::{self, Dataset, DatasetKind, Normalization};
use deepzero_core::estimator::{Backprop, Cge, CgeEngine, Difference, GradientEstimator, Rge};
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
use std::cell::Cell;

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
        Ok(ClassifierObjective::new(
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
    losses: Cell<u64>,
}

impl Objective for ForwardOnly<'_> {
    fn layout(&self) -> &ParamLayout {
        self.inner.layout()
    }
    fn loss(&self, params: &Tensor) -> deepzero_core::Result<f64> {
        self.losses.set(self.losses.get() + 1);
        self.inner.loss(params)
    }
    fn base_loss(&self, params: &Tensor) -> deepzero_core::Result<f64> {
        self.losses.set(self.losses.get() + 1);
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
    let abs = |v: &[f64]| -> Vec<f64> { weights_of(&s.model.layout, v).iter().map(|x| x.abs()).collect() };
    let (zo, fo, mag) = (
        zo.values.unwrap(),
        fo.values.unwrap(),
        mag.values.unwrap(),
    );
    let signed = spearman(&weights_of(&s.model.layout, &zo), &weights_of(&s.model.layout, &fo));
    Ok((spearman(&abs(&zo), &abs(&fo)), spearman(&abs(&mag), &abs(&fo)), signed))
}

// ---------------------------------------------------------------------------------------
// ZO-GraSP
// ---------------------------------------------------------------------------------------

#[test]
#[ignore = "measurement; prints rank correlations over seeds"]
fn measure_zo_grasp_correlation() -> Result<()> {
    for (name, spec) in [
        ("cnn-d2-w8", cnn()),
        ("mlp-32", ModelSpec::Mlp { hidden: vec![32] }),
    ] {
        for q in [192] {
            for seed in 0..5 {
                let (zo, mag, signed) = correlations(spec.clone(), seed, q)?;
                println!("{name} q={q} seed={seed}: |zo| vs |fo| {zo:.3}  |mag| vs |fo| {mag:.3}  signed zo vs fo {signed:.3}");
            }
        }
    }
    Ok(())
}

#[test]
#[ignore = "measurement; Hg estimate quality, fresh vs common directions"]
fn measure_hg_quality() -> Result<()> {
    use deepzero_core::sparsity::WeightSubspace;
    let s = Setup::new(cnn(), 25, 0, Precision::F64)?;
    let obj = s.objective()?;
    let sub = WeightSubspace::new(&obj, &s.params)?;
    let th = sub.base_tensor()?;
    let mu = 5e-3;
    let (_, g0) = sub.loss_and_grad(&th)?.unwrap();
    let (_, g1) = sub.loss_and_grad(&(&th + (&g0 * mu)?)?)?.unwrap();
    let hg = tensor_to_vec(&((g1 - &g0)? / mu)?)?;
    let cos = |a: &[f64], b: &[f64]| {
        let d: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
        d / (a.iter().map(|x| x * x).sum::<f64>().sqrt() * b.iter().map(|x| x * x).sum::<f64>().sqrt())
    };
    println!("d_w = {}", hg.len());
    for q in [192usize, 1000] {
        for common in [false, true] {
            let mut est = Rge::new(q, mu, Difference::Forward, Default::default())?;
            let mut r = rng(7);
            let r2 = r.clone();
            let e0 = est.estimate(&sub, &th, &mut r)?;
            let mut r1 = if common { r2 } else { r };
            let e1 = est.estimate(&sub, &(&th + (&e0.grad * mu)?)?, &mut r1)?;
            // Compare with the true Hessian times the *estimated* step direction ĝ0.
            let (_, gz) = sub.loss_and_grad(&(&th + (&e0.grad * mu)?)?)?.unwrap();
            let (_, gb) = sub.loss_and_grad(&th)?.unwrap();
            let h_g0 = tensor_to_vec(&((gz - gb)? / mu)?)?;
            let zh = tensor_to_vec(&((e1.grad - &e0.grad)? / mu)?)?;
            println!(
                "q={q} common={common}: cos(Ĥg, Hg) {:.3}  spearman {:.3}  cos(Ĥg, H ĝ0) {:.3}",
                cos(&zh, &hg),
                spearman(&zh, &hg),
                cos(&zh, &h_g0)
            );
        }
    }
    Ok(())
}
