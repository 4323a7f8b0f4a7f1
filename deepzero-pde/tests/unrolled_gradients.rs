//! The gradients of the unrolled loss: fo-sol's (the network's backprop chained with the
//! solver's adjoint, Burgers and Navier–Stokes) against central differences of the loss itself
//! in float64; sol-nograd's is exact for one unrolled step and far from the exact one for three;
//! both on our f32 kernels against candle's float64.

use candle_core::{DType, Device, Tensor};
use deepzero_core::model::Precision;
use deepzero_core::objective::Objective;
use deepzero_core::seed::initial_params;
use deepzero_pde::correction::prepare;
use deepzero_pde::{
    Dataset, DatasetConfig, InitialStateConfig, NavierStokesParams, NetworkConfig, Problem,
    Scaling, SolGradient, SolObjective,
};
use rand::{rngs::StdRng, Rng, SeedableRng};

fn small_dataset() -> anyhow::Result<Dataset> {
    dataset_of(DatasetConfig::default().problem)
}

fn dataset_of(problem: Problem) -> anyhow::Result<Dataset> {
    let config = DatasetConfig {
        source_size: 16,
        reference_size: 32,
        train_simulations: 2,
        test_simulations: 1,
        steps: 8,
        initial: InitialStateConfig::for_problem(&problem),
        problem,
        ..DatasetConfig::default()
    };
    Ok(Dataset::generate(&config)?)
}

/// Parameters with a non-zero last layer (the initial one is zero, which would make the
/// network's input gradient vanish and hide a wrong solver adjoint).
fn random_params(n: usize, base: &[f64], seed: u64) -> Vec<f64> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|i| base[i] + 0.05 * rng.random_range(-1.0..1.0))
        .collect()
}

fn relative(a: &[f64], b: &[f64]) -> f64 {
    let diff: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let norm: f64 = b.iter().map(|y| y * y).sum();
    (diff / norm).sqrt()
}

#[test]
fn fo_sol_gradient_matches_central_differences_of_the_unrolled_loss() -> anyhow::Result<()> {
    let navier_stokes = Problem::NavierStokes(NavierStokesParams::default());
    for problem in [DatasetConfig::default().problem, navier_stokes] {
        let dataset = dataset_of(problem)?;
        fo_sol_against_differences(&dataset)?;
    }
    Ok(())
}

fn fo_sol_against_differences(dataset: &Dataset) -> anyhow::Result<()> {
    let train = prepare(dataset, &dataset.train)?;
    let scaling = Scaling::measure(&train)?;
    let model = NetworkConfig {
        width: 4,
        ..NetworkConfig::default()
    }
    .build(&dataset.config)?;
    let windows = vec![(0, 1), (1, 3)];
    let objective =
        SolObjective::new(&model, &scaling, &train, windows.clone(), 3, Precision::F64)?
            .with_gradient(SolGradient::Exact);
    let theta = random_params(model.num_params(), &initial_params(&model, 5), 11);
    let params = Tensor::new(theta.as_slice(), &Device::Cpu)?;
    let (loss, grad) = objective.loss_and_grad(&params)?.expect("a gradient");
    assert!((loss - objective.loss(&theta)?).abs() <= 1e-12 * loss.abs());
    let grad = grad.to_vec1::<f64>()?;
    // Every coordinate's central difference (1e-4: the truncation error, O(ε²), is below the
    // rounding of the Navier–Stokes loss differences, which grows as 1/ε).
    let eps = 1e-4;
    let mut numeric = Vec::with_capacity(theta.len());
    let mut point = theta.clone();
    for i in 0..theta.len() {
        point[i] = theta[i] + eps;
        let plus = objective.loss(&point)?;
        point[i] = theta[i] - eps;
        let minus = objective.loss(&point)?;
        point[i] = theta[i];
        numeric.push((plus - minus) / (2.0 * eps));
    }
    let name = format!("{:?}", dataset.config.problem)
        .split('(')
        .next()
        .unwrap_or("")
        .to_string();
    let rel = relative(&grad, &numeric);
    eprintln!("{name}: fo-sol gradient vs central differences: {rel:.2e}");
    assert!(
        rel < 1e-6,
        "{name}: fo-sol gradient vs central differences: {rel:e}"
    );
    // The solver's adjoint matters here: sol-nograd's gradient is far from the exact one.
    let nograd = SolObjective::new(&model, &scaling, &train, windows, 3, Precision::F64)?
        .with_gradient(SolGradient::NoSolver);
    let (_, g) = nograd.loss_and_grad(&params)?.expect("a gradient");
    let far = relative(&g.to_vec1::<f64>()?, &numeric);
    eprintln!("{name}: sol-nograd gradient vs the exact one: {far:.2e}");
    assert!(
        far > 1e-3,
        "{name}: sol-nograd equals the exact gradient ({far:e}): the test sees no solver"
    );
    Ok(())
}

/// sol-nograd's gradient is the sum over unrolled steps of each step's network gradient with
/// its input held fixed: with one unrolled step it is the exact gradient.
#[test]
fn sol_nograd_is_exact_for_one_step_and_f32_kernels_agree_with_candle() -> anyhow::Result<()> {
    let dataset = small_dataset()?;
    let train = prepare(&dataset, &dataset.train)?;
    let scaling = Scaling::measure(&train)?;
    let model = NetworkConfig {
        width: 4,
        ..NetworkConfig::default()
    }
    .build(&dataset.config)?;
    let theta = random_params(model.num_params(), &initial_params(&model, 2), 7);
    let params64 = Tensor::new(theta.as_slice(), &Device::Cpu)?;
    let windows = vec![(0, 0), (1, 2), (0, 4)];
    let gradient =
        |kind, unroll, precision: Precision, params: &Tensor| -> anyhow::Result<Vec<f64>> {
            let objective =
                SolObjective::new(&model, &scaling, &train, windows.clone(), unroll, precision)?
                    .with_gradient(kind);
            let (_, g) = objective.loss_and_grad(params)?.expect("a gradient");
            Ok(g.to_dtype(DType::F64)?.to_vec1::<f64>()?)
        };
    let one_nograd = gradient(SolGradient::NoSolver, 1, Precision::F64, &params64)?;
    let one_exact = gradient(SolGradient::Exact, 1, Precision::F64, &params64)?;
    assert!(relative(&one_nograd, &one_exact) < 1e-12);
    // f32 on our kernels against candle in f64, both gradients, three unrolled steps.
    let params32 = params64.to_dtype(DType::F32)?;
    for kind in [SolGradient::NoSolver, SolGradient::Exact] {
        let reference = gradient(kind, 3, Precision::F64, &params64)?;
        let ours = gradient(kind, 3, Precision::F32, &params32)?;
        let rel = relative(&ours, &reference);
        eprintln!("{kind:?}: f32 kernels vs candle f64 {rel:.2e}");
        assert!(rel < 1e-4, "{kind:?}: f32 kernels vs candle f64 {rel:e}");
    }
    Ok(())
}
