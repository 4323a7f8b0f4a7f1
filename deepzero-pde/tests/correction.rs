//! Correction training: the tasks train through the core trainer, the ZO-SOL objective is the
//! hand-unrolled rollout loss, and sparse CGE on it does not depend on the thread count.

use candle_core::{DType, Device, Tensor};
use deepzero_core::model::Precision;
use deepzero_core::seed::initial_params;
use deepzero_core::trainer::{Silent, TrainState, Trainer};
use deepzero_pde::correction::{
    apply_correction, estimator, prepare, rollouts, train_config, Weights,
};
use deepzero_pde::{
    CorrectionConfig, CorrectionTask, Dataset, DatasetConfig, Method, NetworkConfig, Schedule,
    Solver,
};
use ndarray::Array3;

fn small_dataset() -> anyhow::Result<Dataset> {
    let config = DatasetConfig {
        source_size: 16,
        reference_size: 32,
        train_simulations: 2,
        test_simulations: 1,
        steps: 12,
        ..DatasetConfig::default()
    };
    Ok(Dataset::generate(&config)?)
}

#[test]
fn non_and_zo_sol_train_through_the_core_trainer_and_the_loss_falls() -> anyhow::Result<()> {
    let dataset = small_dataset()?;
    let train = prepare(&dataset, &dataset.train)?;
    let test = prepare(&dataset, &dataset.test)?;
    let scaling = deepzero_pde::Scaling::measure(&train)?;
    let model = NetworkConfig {
        width: 8,
        ..NetworkConfig::default()
    }
    .build(&dataset.config)?;
    for (method, epochs, lr, sparsity) in
        [(Method::Non, 6, 1e-2, 0.8), (Method::ZoSol, 4, 1e-2, 0.8)]
    {
        let schedule = Schedule {
            epochs,
            lr,
            steps_per_epoch: 3,
        };
        let config = CorrectionConfig {
            batch_size: 4,
            non: schedule,
            zo_sol: schedule,
            unroll: 2,
            sparsity,
            ..CorrectionConfig::default()
        };
        let mut task =
            CorrectionTask::new(method, &model, &scaling, &train, &test, config.clone())?;
        let cfg = train_config(config.schedule(method), 3);
        // The default precision: f32 on core's kernels.
        let params = Tensor::new(initial_params(&model, cfg.seed), &Device::Cpu)?
            .to_dtype(config.precision.dtype())?;
        let mut state = TrainState::new(params);
        let mut est = estimator(method, &model, &config, cfg.seed)?;
        let mut optimizer = cfg.optimizer.build()?;
        Trainer { config: &cfg }.run(
            &mut task,
            &mut state,
            est.as_mut(),
            optimizer.as_mut(),
            &mut Silent,
        )?;
        // The unrolled loss over every window, before and after training.
        let all: Vec<(usize, usize)> = (0..train.len())
            .flat_map(|sim| (0..=train[sim].steps() - config.unroll).map(move |start| (sim, start)))
            .collect();
        let fixed = deepzero_pde::SolObjective::new(
            &model,
            &scaling,
            &train,
            all,
            config.unroll,
            Precision::F64,
        )?;
        let loss_at = |p: &Tensor| -> anyhow::Result<f64> {
            Ok(deepzero_core::objective::Objective::loss(
                &fixed,
                &p.to_dtype(DType::F64)?.to_vec1::<f64>()?,
            )?)
        };
        let before = loss_at(&Tensor::new(
            initial_params(&model, cfg.seed),
            &Device::Cpu,
        )?)?;
        let after = loss_at(&state.params)?;
        eprintln!(
            "{method}: loss {before} -> {after}, {} queries, {:.2}s",
            state.queries, state.seconds
        );
        assert!(after < 0.95 * before, "{method}: loss {before} -> {after}");
        assert!(state.queries > 0);
    }
    Ok(())
}

#[test]
fn zo_sol_objective_is_the_hand_unrolled_rollout_loss() -> anyhow::Result<()> {
    let dataset = small_dataset()?;
    let train = prepare(&dataset, &dataset.train)?;
    let test = prepare(&dataset, &dataset.test)?;
    let scaling = deepzero_pde::Scaling::measure(&train)?;
    let model = NetworkConfig::default().build(&dataset.config)?;
    // Random (non-zero) parameters everywhere, so the correction matters.
    let mut params = initial_params(&model, 11);
    for (i, p) in params.iter_mut().enumerate() {
        *p += 0.01 * ((i as f64) * 0.37).sin();
    }
    let windows = vec![(0, 2), (1, 5)];
    let loss_in = |precision: Precision| -> anyhow::Result<f64> {
        let config = CorrectionConfig {
            unroll: 3,
            precision,
            ..CorrectionConfig::default()
        };
        let task = CorrectionTask::new(Method::ZoSol, &model, &scaling, &train, &test, config)?;
        let objective = task.sol_objective(windows.clone())?;
        Ok(deepzero_core::objective::Objective::loss(
            &objective, &params,
        )?)
    };
    let loss = loss_in(Precision::F64)?;
    // The f32 network on core's kernels gives the same loss up to f32 rounding.
    let loss_f32 = loss_in(Precision::F32)?;

    let flat = Tensor::new(params.as_slice(), &Device::Cpu)?;
    let weights = Weights::Candle(model.param_views(&flat)?);
    let mut total = 0.0;
    let mut count = 0.0;
    for &(sim, start) in &windows {
        let simulation = &dataset.train[sim];
        let solver = dataset.source_solver(simulation)?;
        let mut state = simulation.reference[start].clone();
        for offset in 0..3 {
            let predicted = solver.step(&state, start + offset)?;
            let forcing = solver.forcing_at(start + offset)?;
            state = apply_correction(
                &model,
                &scaling,
                &weights,
                std::slice::from_ref(&predicted),
                &[&forcing],
            )?
            .remove(0);
            let target: &Array3<f64> = &simulation.reference[start + offset + 1];
            // In units of each channel's one-step residual.
            let mut error = &state - target;
            for (c, mut channel) in error.outer_iter_mut().enumerate() {
                channel.mapv_inplace(|v| v / scaling.output[c]);
            }
            total += error.mapv(|v| v * v).mean().unwrap_or(f64::NAN);
            count += 1.0;
            assert!((&state - &predicted).iter().any(|v| v.abs() > 1e-9));
        }
    }
    let expected = total / count;
    assert!(
        (loss - expected).abs() <= 1e-12 * expected.abs(),
        "{loss} vs {expected}"
    );
    assert!(
        (loss_f32 - expected).abs() <= 1e-5 * expected.abs() && loss_f32 != expected,
        "f32 {loss_f32} vs f64 {expected}"
    );
    Ok(())
}

#[test]
fn sparse_cge_on_zo_sol_is_thread_count_invariant() -> anyhow::Result<()> {
    let dataset = small_dataset()?;
    let train = prepare(&dataset, &dataset.train)?;
    let test = prepare(&dataset, &dataset.test)?;
    let scaling = deepzero_pde::Scaling::measure(&train)?;
    let model = NetworkConfig::default().build(&dataset.config)?;
    let config = CorrectionConfig {
        unroll: 2,
        batch_size: 3,
        sparsity: 0.9,
        ..CorrectionConfig::default()
    };
    let task = CorrectionTask::new(
        Method::ZoSol,
        &model,
        &scaling,
        &train,
        &test,
        config.clone(),
    )?;
    let params = Tensor::new(initial_params(&model, 5), &Device::Cpu)?;
    let grad_with = |threads: usize| -> anyhow::Result<Vec<f64>> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()?;
        pool.install(|| -> anyhow::Result<Vec<f64>> {
            let mut est = estimator(Method::ZoSol, &model, &config, 9)?;
            let mut p = params.clone();
            est.on_epoch_start(0, 9, &mut p)?;
            let objective = deepzero_core::task::Task::objective(&task, 0, 0, 9)?;
            let mut rng = deepzero_core::seed::step_rng(9, 0, 0);
            let estimate = est.estimate(objective.as_ref(), &p, &mut rng)?;
            Ok(estimate.grad.to_vec1::<f64>()?)
        })
    };
    let one = grad_with(1)?;
    let two = grad_with(2)?;
    assert!(one.iter().any(|g| *g != 0.0));
    assert_eq!(
        one.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        two.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    );
    Ok(())
}

#[test]
fn zero_network_reproduces_the_source_rollout() -> anyhow::Result<()> {
    let dataset = small_dataset()?;
    let test = prepare(&dataset, &dataset.test)?;
    let scaling = deepzero_pde::Scaling::measure(&test)?;
    let model = NetworkConfig::default().build(&dataset.config)?;
    let (plain, trajectories) = rollouts(&test, None)?;
    assert_eq!(trajectories[0], dataset.test[0].source);
    for dtype in [DType::F64, DType::F32] {
        let params = Tensor::new(initial_params(&model, 1), &Device::Cpu)?.to_dtype(dtype)?;
        let (corrected, _) = rollouts(&test, Some((&model, &scaling, &params)))?;
        // The last convolution starts at zero: a fresh network is the zero correction.
        assert_eq!(corrected, plain, "{dtype:?}");
    }
    assert!(plain.mae() > 0.0);
    Ok(())
}
