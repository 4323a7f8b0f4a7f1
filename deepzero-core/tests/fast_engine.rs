//! The fast CGE engine (naive / reuse / delta-propagation modes on deepzero's own f32 kernels)
//! against a float64 reference: the candle model in f64, same coordinates, same μ.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use deepzero_core::estimator::{Cge, Difference, GradientEstimator};
use deepzero_core::fast::Engine;
use deepzero_core::head::Head;
use deepzero_core::model::{params_tensor, tensor_to_vec, Model, ModelSpec, Precision};
use deepzero_core::objective::{ClassifierObjective, Objective};
use deepzero_core::query::QueryEngine;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn rel_l2(a: &[f64], b: &[f64]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    (num / den).sqrt()
}

/// Every parameter tensor contributes up to `per_entry` coordinates (weights, biases, BN).
fn coords_per_entry(model: &Model, per_entry: usize, rng: &mut StdRng) -> Vec<usize> {
    let mut c = Vec::new();
    for e in &model.layout.entries {
        for _ in 0..per_entry.min(e.len()) {
            c.push(e.offset + rng.random_range(0..e.len()));
        }
    }
    c.sort_unstable();
    c.dedup();
    c
}

fn check(
    spec: ModelSpec,
    shape: [usize; 3],
    batch: usize,
    per_entry: usize,
    seed: u64,
) -> Result<()> {
    let model = Model::build(&spec, shape, 10)?;
    let mut rng = StdRng::seed_from_u64(seed);
    let init = model.init_params(&mut rng);
    let n = batch * shape.iter().product::<usize>();
    let x: Vec<f32> = (0..n).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect();
    let y: Vec<u32> = (0..batch).map(|_| rng.random_range(0..10u32)).collect();
    let coords = coords_per_entry(&model, per_entry, &mut rng);
    let mu = 5e-3;

    // float64 reference through candle (feature reuse is exact in f64).
    let dev = Device::Cpu;
    let xt = Tensor::from_vec(x.clone(), (batch, shape[0], shape[1], shape[2]), &dev)?
        .to_dtype(DType::F64)?;
    let yt = Tensor::from_vec(y.clone(), batch, &dev)?;
    let obj = ClassifierObjective::classifier(&model, xt, yt)?;
    let p64 = params_tensor(&init, Precision::F64, &dev)?;
    let mut reference =
        Cge::new(mu, Difference::Forward, QueryEngine::Reuse)?.with_coords(coords.clone());
    let g = tensor_to_vec(&reference.estimate(&obj, &p64, &mut rng)?.grad)?;
    let truth: Vec<f64> = coords.iter().map(|&i| g[i]).collect();

    let p32: Vec<f32> = init.iter().map(|&v| v as f32).collect();
    let engine = Engine::new(&model, &p32, &x, y.len(), &Head::CrossEntropy(y.clone()))?;
    let base64 = obj.loss(&init)?;
    assert!(
        (engine.base_mean_loss() - base64).abs() < 1e-5,
        "base loss {} vs f64 {}",
        engine.base_mean_loss(),
        base64
    );
    for (mode, tol) in [
        (QueryEngine::Naive, 5e-3),
        (QueryEngine::Reuse, 5e-3),
        (QueryEngine::Fast, 1e-3),
    ] {
        let (est, q) = engine.cge(&coords, mu, Difference::Forward, mode)?;
        assert_eq!(q, coords.len() as u64);
        let r = rel_l2(&est, &truth);
        println!(
            "{} {mode:?}: rel diff {r:.2e} over {} coords",
            model.name,
            coords.len()
        );
        assert!(
            r <= tol,
            "{} {mode:?}: relative difference {r:.3e} > {tol:e}",
            model.name
        );
    }
    Ok(())
}

#[test]
fn fast_engine_matches_f64_on_mlp() -> Result<()> {
    check(
        ModelSpec::Mlp {
            hidden: vec![16, 12],
        },
        [1, 6, 6],
        16,
        20,
        1,
    )
}

#[test]
fn fast_engine_matches_f64_on_cnn() -> Result<()> {
    check(
        ModelSpec::SimpleCnn { depth: 3, width: 6 },
        [1, 12, 12],
        16,
        12,
        2,
    )
}

#[test]
fn fast_engine_matches_f64_on_resnet20_shortcuts_and_batch_norm() -> Result<()> {
    // 8×8 inputs reach every path: stride-2 blocks with option-A shortcuts, identity
    // shortcuts, batch norm scale/shift of every block, the classifier.
    check(ModelSpec::Resnet20, [3, 8, 8], 6, 3, 3)
}

#[test]
fn fast_engine_central_difference_matches_reuse() -> Result<()> {
    // Central differences (two queries per coordinate, ±μ) through the same delta machinery.
    let model = Model::build(&ModelSpec::SimpleCnn { depth: 2, width: 4 }, [1, 8, 8], 10)?;
    let mut rng = StdRng::seed_from_u64(9);
    let p32: Vec<f32> = model
        .init_params(&mut rng)
        .iter()
        .map(|&v| v as f32)
        .collect();
    let x: Vec<f32> = (0..8 * 64).map(|_| rng.random::<f32>()).collect();
    let y: Vec<u32> = (0..8).map(|_| rng.random_range(0..10u32)).collect();
    let engine = Engine::new(&model, &p32, &x, y.len(), &Head::CrossEntropy(y.clone()))?;
    let coords: Vec<usize> = (0..model.num_params()).collect();
    let (f, _) = engine.cge(&coords, 5e-3, Difference::Central, QueryEngine::Fast)?;
    let (r, _) = engine.cge(&coords, 5e-3, Difference::Central, QueryEngine::Reuse)?;
    assert!(
        rel_l2(&f, &r) < 5e-3,
        "fast vs reuse (central) {}",
        rel_l2(&f, &r)
    );
    Ok(())
}
