//! Tests of `deepzero_core::optim`, `deepzero_core::checkpoint` and `deepzero_core::trainer`.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use deepzero_core::checkpoint::{self, Fingerprint};
use deepzero_core::data::{load, Dataset, DatasetKind, Normalization};
use deepzero_core::estimator::{
    Backprop, Cge, Difference, Direction, GradientEstimator, QueryEngine, Rge,
};
use deepzero_core::model::{params_tensor, tensor_to_vec, BnState, Model, ModelSpec, Precision};
use deepzero_core::optim::{Optimizer, OptimizerConfig, OptimizerKind, Schedule};
use deepzero_core::task::{ClassificationConfig, ClassificationTask, Task};
use deepzero_core::trainer::{
    evaluate, EpochMetrics, Observer, Silent, TrainConfig, TrainState, Trainer,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};

// ---------------------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------------------

fn t64(v: &[f64]) -> Result<Tensor> {
    Ok(Tensor::from_slice(v, v.len(), &Device::Cpu)?)
}

fn v64(t: &Tensor) -> Result<Vec<f64>> {
    Ok(tensor_to_vec(t)?)
}

fn close(a: &[f64], b: &[f64], tol: f64) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= tol)
}

fn sgd(momentum: f64, weight_decay: f64) -> Result<Box<dyn Optimizer>> {
    Ok(OptimizerConfig {
        kind: OptimizerKind::Sgd,
        momentum,
        weight_decay,
    }
    .build()?)
}

fn adam(beta1: f64, weight_decay: f64) -> Result<Box<dyn Optimizer>> {
    Ok(OptimizerConfig {
        kind: OptimizerKind::Adam,
        momentum: beta1,
        weight_decay,
    }
    .build()?)
}

/// Digits, normalised with statistics of the training set; the training set optionally cut.
fn digits(train_limit: Option<usize>) -> Result<(Dataset, Dataset)> {
    let (mut train, mut test) = load(DatasetKind::Digits, None, 0)?;
    if let Some(n) = train_limit {
        train = train.take(n);
    }
    let norm = Normalization::fit(&train);
    norm.apply(&mut train)?;
    norm.apply(&mut test)?;
    Ok((train, test))
}

fn fresh_state(model: &Model, seed: u64, precision: Precision) -> Result<TrainState> {
    let init = deepzero_core::seed::initial_params(model, seed);
    Ok(TrainState::new(params_tensor(
        &init,
        precision,
        &Device::Cpu,
    )?))
}

fn config(epochs: usize, lr: f64, seed: u64) -> TrainConfig {
    TrainConfig {
        epochs,
        lr,
        warmup_epochs: 0,
        optimizer: OptimizerConfig::default(),
        seed,
    }
}

/// Classification of `train` in batches of `batch_size`, evaluated on `test`.
fn classify<'a>(
    model: &'a Model,
    train: &'a Dataset,
    test: &'a Dataset,
    batch_size: usize,
) -> Result<ClassificationTask<'a>> {
    Ok(ClassificationTask::new(
        model,
        train,
        test,
        ClassificationConfig {
            batch_size,
            ..Default::default()
        },
    )?)
}

/// Epoch, train loss, test loss, test accuracy, queries, learning rate.
type Row = (usize, f64, f64, f64, u64, f64);

/// Metrics without the wall-clock field.
fn timeless(h: &[EpochMetrics]) -> Vec<Row> {
    h.iter()
        .map(|m| {
            (
                m.epoch,
                m.train_loss,
                m.get("test_loss").expect("test loss"),
                m.get("test_accuracy").expect("test accuracy"),
                m.queries,
                m.lr,
            )
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// optimizers
// ---------------------------------------------------------------------------------------

#[test]
fn sgd_two_steps_by_hand() -> Result<()> {
    let (lr, m, wd) = (0.1, 0.9, 0.01);
    let theta0 = [1.0, -2.0, 0.5];
    let g1 = [0.5, 0.25, -1.0];
    let g2 = [0.1, -0.3, 0.2];
    let mut opt = sgd(m, wd)?;
    let mut p = t64(&theta0)?;
    opt.step(&mut p, &t64(&g1)?, lr)?;
    // buf₁ = g₁ + wd·θ₀, θ₁ = θ₀ − lr·buf₁
    let buf1: Vec<f64> = (0..3).map(|i| g1[i] + wd * theta0[i]).collect();
    let theta1: Vec<f64> = (0..3).map(|i| theta0[i] - lr * buf1[i]).collect();
    assert!(
        close(&v64(&p)?, &theta1, 1e-15),
        "{:?} vs {theta1:?}",
        v64(&p)?
    );
    opt.step(&mut p, &t64(&g2)?, lr)?;
    // buf₂ = m·buf₁ + g₂ + wd·θ₁, θ₂ = θ₁ − lr·buf₂
    let theta2: Vec<f64> = (0..3)
        .map(|i| theta1[i] - lr * (m * buf1[i] + g2[i] + wd * theta1[i]))
        .collect();
    let got = v64(&p)?;
    assert!(close(&got, &theta2, 1e-15), "{got:?} vs {theta2:?}");
    // The first coordinate worked out on paper: 1 − 0.1·0.51 = 0.949, then
    // buf = 0.9·0.51 + 0.1 + 0.00949 = 0.56849, θ = 0.949 − 0.056849 = 0.892151.
    assert!((got[0] - 0.892151).abs() < 1e-12, "{}", got[0]);
    // Momentum state for checkpoints.
    let st = opt.state();
    assert_eq!(st.len(), 1);
    assert!(st.contains_key("sgd.momentum"));

    // Plain SGD: θ − lr·g, and no state.
    let mut plain = sgd(0.0, 0.0)?;
    let mut p = t64(&theta0)?;
    plain.step(&mut p, &t64(&g1)?, 0.5)?;
    assert!(close(&v64(&p)?, &[0.75, -2.125, 1.0], 1e-15));
    assert!(plain.state().is_empty());
    Ok(())
}

#[test]
fn adam_steps_are_lr_times_sign_of_a_constant_gradient() -> Result<()> {
    let lr = 0.01;
    let theta0 = [0.3, -0.7, 2.0, 0.0];
    let g = [0.5, -3.0, 1e-2, -2e-3];
    let mut opt = adam(0.9, 0.0)?;
    let mut p = t64(&theta0)?;
    // Bias correction makes m̂ = g and v̂ = g² after any number of steps with the same g.
    for step in 1..=3 {
        opt.step(&mut p, &t64(&g)?, lr)?;
        let want: Vec<f64> = (0..4)
            .map(|i| theta0[i] - step as f64 * lr * g[i].signum())
            .collect();
        let got = v64(&p)?;
        // |g| / (|g| + 1e-8) differs from 1 by at most 5e-6 for |g| ≥ 2e-3.
        assert!(
            close(&got, &want, 1e-7 * step as f64),
            "step {step}: {got:?} vs {want:?}"
        );
    }
    let st = opt.state();
    let mut keys: Vec<&String> = st.keys().collect();
    keys.sort();
    assert_eq!(keys, ["adam.m", "adam.t", "adam.v"]);
    assert_eq!(v64(&st["adam.t"])?, vec![3.0]);
    Ok(())
}

#[test]
fn optimizer_config_rejects_bad_values() {
    for (m, wd) in [(1.0, 0.0), (-0.1, 0.0), (0.9, -1e-4), (0.9, f64::NAN)] {
        let e = OptimizerConfig {
            kind: OptimizerKind::Sgd,
            momentum: m,
            weight_decay: wd,
        }
        .build();
        assert!(e.is_err(), "momentum {m}, weight decay {wd} accepted");
    }
}

// ---------------------------------------------------------------------------------------
// schedule
// ---------------------------------------------------------------------------------------

#[test]
fn schedule_warmup_then_cosine() {
    let s = Schedule {
        lr: 0.2,
        warmup_epochs: 2,
        epochs: 10,
        steps_per_epoch: 10,
    };
    let (warm, total) = (20, 100);
    // Linear warm-up: equal increments, peak at the last warm-up step.
    let d = s.lr_at(1) - s.lr_at(0);
    assert!(d > 0.0);
    for k in 0..warm - 1 {
        assert!((s.lr_at(k + 1) - s.lr_at(k) - d).abs() < 1e-12, "step {k}");
    }
    assert!((s.lr_at(warm - 1) - 0.2).abs() < 1e-12);
    assert!(s.lr_at(0) > 0.0 && s.lr_at(0) <= 0.2 / warm as f64 + 1e-12);
    // Cosine from the peak: lr/2 halfway through the decay, ~0 at the end.
    assert!((s.lr_at(warm) - 0.2).abs() < 1e-12);
    assert!((s.lr_at(warm + (total - warm) / 2) - 0.1).abs() < 1e-12);
    assert!(s.lr_at(total - 1) < 1e-3 * 0.2, "{}", s.lr_at(total - 1));
    assert!(s.lr_at(total - 1) >= 0.0);
    for k in warm..total - 1 {
        assert!(s.lr_at(k + 1) <= s.lr_at(k), "not decreasing at {k}");
    }
    // A quarter of the way: lr·(1 + cos(π/4))/2.
    let q = 0.2 * (1.0 + std::f64::consts::FRAC_1_SQRT_2) / 2.0;
    assert!((s.lr_at(warm + (total - warm) / 4) - q).abs() < 1e-12);

    // No warm-up: starts at the peak.
    let s = Schedule {
        lr: 0.05,
        warmup_epochs: 0,
        epochs: 4,
        steps_per_epoch: 3,
    };
    assert!((s.lr_at(0) - 0.05).abs() < 1e-15);
    assert!((s.lr_at(6) - 0.025).abs() < 1e-12);
}

// ---------------------------------------------------------------------------------------
// checkpoints
// ---------------------------------------------------------------------------------------

fn tmp_files(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir.join(checkpoint::DIR))
        .expect("readable dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().contains(".tmp"))
        })
        .collect()
}

#[test]
fn checkpoint_round_trip() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut rng = StdRng::seed_from_u64(5);
    let d = 50;
    let p0: Vec<f64> = (0..d).map(|_| rng.random_range(-1.0..1.0)).collect();
    let mut params = params_tensor(&p0, Precision::F32, &Device::Cpu)?;
    let mut opt = adam(0.9, 1e-3)?;
    for _ in 0..2 {
        let g: Vec<f64> = (0..d).map(|_| rng.random_range(-1.0..1.0)).collect();
        opt.step(
            &mut params,
            &params_tensor(&g, Precision::F32, &Device::Cpu)?,
            0.01,
        )?;
    }
    // Statistics and metrics with full f64 mantissas.
    let bn = BnState {
        mean: vec![
            (0..16).map(|_| rng.random::<f64>() - 0.5).collect(),
            (0..8).map(|_| rng.random::<f64>()).collect(),
        ],
        var: vec![
            (0..16).map(|_| rng.random::<f64>() * 3.0).collect(),
            (0..8).map(|_| rng.random::<f64>() + 1.0).collect(),
        ],
    };
    let history: Vec<EpochMetrics> = (1..=2)
        .map(|epoch| EpochMetrics {
            epoch,
            train_loss: rng.random::<f64>() * 2.3,
            metrics: vec![
                ("test_loss".into(), rng.random::<f64>() * 2.3),
                ("test_accuracy".into(), rng.random()),
            ],
            queries: 12_345 * epoch as u64,
            seconds: rng.random::<f64>() * 100.0,
            lr: rng.random::<f64>() * 0.1,
        })
        .collect();
    let state = TrainState {
        epoch: 2,
        steps: 40,
        fingerprint: None,
        params: params.clone(),
        task: serde_json::json!({ "bn": bn }),
        optimizer: opt.state(),
        queries: 24_690,
        seconds: rng.random::<f64>() * 200.0,
        history: history.clone(),
    };
    checkpoint::save(dir.path(), &state)?;
    assert!(
        tmp_files(dir.path()).is_empty(),
        "{:?}",
        tmp_files(dir.path())
    );
    let unit = dir.path().join(checkpoint::DIR).join("epoch-000002");
    assert!(unit.join(checkpoint::TENSORS_FILE).is_file());
    assert!(unit.join(checkpoint::STATE_FILE).is_file());

    let back = checkpoint::load(dir.path(), &Device::Cpu)?;
    assert_eq!(back.epoch, 2);
    assert_eq!(back.steps, 40);
    assert_eq!(back.queries, 24_690);
    assert_eq!(back.seconds, state.seconds);
    assert_eq!(back.params.dtype(), DType::F32);
    assert_eq!(back.params.to_vec1::<f32>()?, params.to_vec1::<f32>()?);
    // Exact f64 round trip: resuming must not perturb running statistics or metrics.
    let back_bn: BnState = serde_json::from_value(back.task["bn"].clone())?;
    let (bn_same, history_same) = (back_bn == bn, back.history == history);
    assert!(
        bn_same && history_same,
        "f64 values changed in the checkpoint round trip: batch-norm statistics same: \
         {bn_same}, metrics same: {history_same}\nsaved {:?}\nloaded {:?}",
        (&bn, &history),
        (&back_bn, &back.history)
    );
    let mut keys: Vec<&String> = back.optimizer.keys().collect();
    keys.sort();
    assert_eq!(keys, ["adam.m", "adam.t", "adam.v"]);
    for (k, t) in &state.optimizer {
        assert_eq!(v64(&back.optimizer[k])?, v64(t)?, "{k}");
    }
    // A restored optimizer continues exactly like the original.
    let mut restored = adam(0.9, 1e-3)?;
    restored.load_state(&back.optimizer)?;
    let g = params_tensor(&vec![0.3; d], Precision::F32, &Device::Cpu)?;
    let mut a = params.clone();
    let mut b = back.params.clone();
    opt.step(&mut a, &g, 0.01)?;
    restored.step(&mut b, &g, 0.01)?;
    assert_eq!(a.to_vec1::<f32>()?, b.to_vec1::<f32>()?);

    // Saving again over an existing checkpoint replaces it.
    let mut later = state.clone();
    later.epoch = 3;
    later.history.push(later.history[1].clone());
    checkpoint::save(dir.path(), &later)?;
    assert_eq!(checkpoint::load(dir.path(), &Device::Cpu)?.epoch, 3);
    assert!(tmp_files(dir.path()).is_empty());
    // Only the newest checkpoint is kept.
    let kept: Vec<_> = std::fs::read_dir(dir.path().join(checkpoint::DIR))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<std::io::Result<_>>()?;
    assert_eq!(kept, ["epoch-000003"]);
    Ok(())
}

/// A small state at `epoch` (one metrics line per epoch) with `fingerprint`.
fn small_state(epoch: usize, fingerprint: Option<Fingerprint>) -> Result<TrainState> {
    let mut s = TrainState::new(params_tensor(
        &[epoch as f64; 4],
        Precision::F32,
        &Device::Cpu,
    )?);
    s.epoch = epoch;
    s.steps = 10 * epoch as u64;
    s.fingerprint = fingerprint;
    s.history = (1..=epoch)
        .map(|e| EpochMetrics {
            epoch: e,
            train_loss: 1.0,
            metrics: vec![],
            queries: 0,
            seconds: 0.0,
            lr: 0.1,
        })
        .collect();
    Ok(s)
}

#[test]
fn checkpoint_refuses_tensors_of_another_epoch() -> Result<()> {
    // Older checkpoints are deleted after a save: make the two epochs in two directories.
    let (one, two) = (tempfile::tempdir()?, tempfile::tempdir()?);
    checkpoint::save(one.path(), &small_state(1, None)?)?;
    checkpoint::save(two.path(), &small_state(2, None)?)?;
    let unit = |d: &Path, e: &str| {
        d.join(checkpoint::DIR)
            .join(e)
            .join(checkpoint::TENSORS_FILE)
    };
    std::fs::copy(
        unit(one.path(), "epoch-000001"),
        unit(two.path(), "epoch-000002"),
    )?;
    let e = checkpoint::load(two.path(), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("mixes two epochs") && e.contains("epoch 1") && e.contains("epoch 2"),
        "{e}"
    );
    Ok(())
}

#[test]
fn checkpoint_fingerprint_is_kept_and_checked() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mine = Fingerprint {
        run: "runs/a".into(),
        config: "c1".into(),
        inputs: [("ratios.json".to_string(), "h1".to_string())].into(),
    };
    checkpoint::save(dir.path(), &small_state(2, Some(mine.clone()))?)?;
    let back = checkpoint::load_checked(dir.path(), &Device::Cpu, &mine)?;
    assert_eq!(back.fingerprint.as_ref(), Some(&mine));
    assert_eq!(back.steps, 20);

    // Another configuration: names the run the checkpoint belongs to and both hashes.
    let other = Fingerprint {
        run: "runs/b".into(),
        config: "c2".into(),
        ..mine.clone()
    };
    let e = checkpoint::load_checked(dir.path(), &Device::Cpu, &other)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("another run (runs/a, configuration hash c1; this run's is c2)"),
        "{e}"
    );
    // A changed input file: its old and new hash.
    let changed = Fingerprint {
        inputs: [("ratios.json".to_string(), "h2".to_string())].into(),
        ..mine.clone()
    };
    let e = checkpoint::load_checked(dir.path(), &Device::Cpu, &changed)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("ratios.json changed") && e.contains("was h1, now h2"),
        "{e}"
    );
    assert!(!e.contains("another run"), "{e}");

    // A checkpoint without a fingerprint (written before them) loads, and says so.
    let old = tempfile::tempdir()?;
    checkpoint::save(old.path(), &small_state(1, None)?)?;
    let back = checkpoint::load_checked(old.path(), &Device::Cpu, &mine)?;
    assert!(back.fingerprint.is_none());
    Ok(())
}

#[test]
fn checkpoint_load_from_empty_dir_is_a_clear_error() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let e = checkpoint::load(dir.path(), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains(&dir.path().display().to_string()), "{e}");
    assert!(e.contains("checkpoint"), "{e}");
    Ok(())
}

// ---------------------------------------------------------------------------------------
// the trainer on the shipped digits
// ---------------------------------------------------------------------------------------

#[test]
fn first_order_training_learns_digits() -> Result<()> {
    let (train, test) = digits(None)?;
    let model = Model::build(&ModelSpec::Mlp { hidden: vec![32] }, [1, 8, 8], 10)?;
    let cfg = config(3, 0.1, 0);
    let mut task = classify(&model, &train, &test, 32)?;
    let mut state = fresh_state(&model, 0, Precision::F32)?;
    let mut opt = cfg.optimizer.build()?;
    Trainer { config: &cfg }.run(
        &mut task,
        &mut state,
        &mut Backprop,
        opt.as_mut(),
        &mut Silent,
    )?;
    assert_eq!(state.epoch, 3);
    assert_eq!(state.history.len(), 3);
    let steps = task.steps_per_epoch() as u64;
    assert_eq!(steps, train.len().div_ceil(32) as u64);
    assert_eq!(
        state.queries,
        3 * steps,
        "backprop counts one query per step"
    );
    for (i, m) in state.history.iter().enumerate() {
        assert_eq!(m.epoch, i + 1);
        assert_eq!(m.queries, (i as u64 + 1) * steps);
    }
    let last = state.history.last().expect("history");
    let acc = last.get("test_accuracy").expect("accuracy");
    assert!(acc >= 0.85, "test accuracy {acc}");
    assert!(last.train_loss < state.history[0].train_loss);
    // The recorded figures are the evaluation of the final parameters.
    let (loss, acc2) = evaluate(&model, &state.params, task.bn_state(), &test, 100)?;
    assert_eq!(acc2, acc);
    assert!((loss - last.get("test_loss").expect("loss")).abs() < 1e-9);
    // The checkpointed task state is the task's.
    let bn: BnState = serde_json::from_value(state.task["bn"].clone())?;
    assert_eq!(&bn, task.bn_state());
    Ok(())
}

#[test]
fn cge_training_improves_digits() -> Result<()> {
    let (train, test) = digits(Some(256))?;
    assert_eq!(train.len(), 256);
    let model = Model::build(&ModelSpec::Mlp { hidden: vec![16] }, [1, 8, 8], 10)?;
    let cfg = config(1, 0.1, 1);
    let mut task = classify(&model, &train, &test, 32)?;
    let mut state = fresh_state(&model, 1, Precision::F32)?;
    let (_, before) = evaluate(&model, &state.params, task.bn_state(), &test, 500)?;
    let mut cge = Cge::new(5e-3, Difference::Forward, QueryEngine::Reuse)?;
    let mut opt = cfg.optimizer.build()?;
    Trainer { config: &cfg }.run(&mut task, &mut state, &mut cge, opt.as_mut(), &mut Silent)?;
    let after = state.history[0].get("test_accuracy").expect("accuracy");
    assert!(after >= before + 0.1, "test accuracy {before} → {after}");
    assert_eq!(state.queries, 8 * (model.num_params() as u64 + 1));
    Ok(())
}

fn rge_run(seed: u64, init_seed: u64) -> Result<TrainState> {
    let (train, test) = digits(Some(128))?;
    let model = Model::build(&ModelSpec::Mlp { hidden: vec![8] }, [1, 8, 8], 10)?;
    let cfg = config(1, 0.05, seed);
    let mut task = classify(&model, &train, &test, 32)?;
    let mut state = fresh_state(&model, init_seed, Precision::F32)?;
    let mut rge = Rge::new(4, 5e-3, Difference::Forward, Direction::Gaussian)?;
    let mut opt = cfg.optimizer.build()?;
    Trainer { config: &cfg }.run(&mut task, &mut state, &mut rge, opt.as_mut(), &mut Silent)?;
    Ok(state)
}

#[test]
fn same_seed_same_params_different_seed_different_params() -> Result<()> {
    let a = rge_run(3, 3)?;
    let b = rge_run(3, 3)?;
    assert_eq!(a.params.to_vec1::<f32>()?, b.params.to_vec1::<f32>()?);
    assert_eq!(timeless(&a.history), timeless(&b.history));
    // Same initial parameters, different training seed (batch order, directions).
    let c = rge_run(4, 3)?;
    assert_ne!(a.params.to_vec1::<f32>()?, c.params.to_vec1::<f32>()?);
    Ok(())
}

/// Saves a checkpoint after epoch `at` and keeps going.
struct SaveAt {
    dir: PathBuf,
    at: usize,
}

impl Observer for SaveAt {
    fn on_epoch_end(&mut self, m: &EpochMetrics, state: &TrainState) -> deepzero_core::Result<()> {
        if m.epoch == self.at {
            checkpoint::save(&self.dir, state)?;
        }
        Ok(())
    }
}

/// Two epochs straight vs one epoch, checkpoint, load, second epoch: bit-identical. Uses a CNN
/// (batch-norm statistics in the checkpoint) and RGE (per-step random directions).
fn check_resume(kind: OptimizerKind) -> Result<()> {
    let (train, test) = digits(Some(160))?;
    let model = Model::build(&ModelSpec::SimpleCnn { depth: 1, width: 4 }, [1, 8, 8], 10)?;
    let mut cfg = config(2, 0.05, 11);
    cfg.optimizer.kind = kind;
    cfg.lr = if kind == OptimizerKind::Adam {
        0.01
    } else {
        0.05
    };
    let trainer = Trainer { config: &cfg };
    let estimator = || Rge::new(3, 5e-3, Difference::Forward, Direction::Gaussian);
    let dir = tempfile::tempdir()?;

    let mut straight = fresh_state(&model, 11, Precision::F32)?;
    let mut opt = cfg.optimizer.build()?;
    let mut obs = SaveAt {
        dir: dir.path().to_path_buf(),
        at: 1,
    };
    let mut task = classify(&model, &train, &test, 32)?;
    trainer.run(
        &mut task,
        &mut straight,
        &mut estimator()?,
        opt.as_mut(),
        &mut obs,
    )?;
    assert_eq!(straight.epoch, 2);

    let mut resumed = checkpoint::load(dir.path(), &Device::Cpu)?;
    assert_eq!(resumed.epoch, 1);
    assert_eq!(resumed.history.len(), 1);
    let mut opt = cfg.optimizer.build()?;
    opt.load_state(&resumed.optimizer)?;
    let mut est: Box<dyn GradientEstimator> = Box::new(estimator()?);
    // A fresh task: its batch-norm statistics come from the checkpoint.
    let mut task = classify(&model, &train, &test, 32)?;
    trainer.run(
        &mut task,
        &mut resumed,
        est.as_mut(),
        opt.as_mut(),
        &mut Silent,
    )?;
    assert_eq!(resumed.epoch, 2);
    assert_eq!(
        resumed.params.to_vec1::<f32>()?,
        straight.params.to_vec1::<f32>()?,
        "{kind:?}: parameters differ after resuming"
    );
    assert_eq!(resumed.queries, straight.queries);
    assert_eq!(
        resumed.task, straight.task,
        "{kind:?}: batch-norm statistics differ"
    );
    assert_eq!(timeless(&resumed.history), timeless(&straight.history));
    Ok(())
}

#[test]
fn resume_is_bit_identical_sgd() -> Result<()> {
    check_resume(OptimizerKind::Sgd)
}

#[test]
fn resume_is_bit_identical_adam() -> Result<()> {
    check_resume(OptimizerKind::Adam)
}

/// Saves after every epoch; after epoch `fail_at` the save is interrupted at `stop` and the run
/// stops there, as a kill would stop it.
struct InterruptAt {
    dir: PathBuf,
    fail_at: usize,
    stop: checkpoint::Interruption,
}

impl Observer for InterruptAt {
    fn on_epoch_end(&mut self, m: &EpochMetrics, state: &TrainState) -> deepzero_core::Result<()> {
        let stop = (m.epoch == self.fail_at).then_some(self.stop);
        checkpoint::save_interrupted(&self.dir, state, stop)
    }
}

/// A checkpoint interrupted between its parts: resume sees the old checkpoint or the new one,
/// never a mix, and finishes with the parameters of an uninterrupted run.
#[test]
fn interrupted_checkpoint_resumes_to_the_uninterrupted_result() -> Result<()> {
    let (train, test) = digits(Some(96))?;
    let model = Model::build(&ModelSpec::SimpleCnn { depth: 1, width: 4 }, [1, 8, 8], 10)?;
    let cfg = config(3, 0.05, 21);
    let trainer = Trainer { config: &cfg };
    let cge = || Cge::new(5e-3, Difference::Forward, QueryEngine::Fast);
    let run = |state: &mut TrainState, obs: &mut dyn Observer| -> Result<()> {
        let mut task = classify(&model, &train, &test, 32)?;
        let mut opt = cfg.optimizer.build()?;
        opt.load_state(&state.optimizer)?;
        trainer.run(&mut task, state, &mut cge()?, opt.as_mut(), obs)?;
        Ok(())
    };
    let mut straight = fresh_state(&model, 21, Precision::F32)?;
    run(&mut straight, &mut Silent)?;

    use checkpoint::Interruption::*;
    for (stop, expect_epoch) in [(AfterTensors, 1), (BeforeCommit, 1), (BeforeCleanup, 2)] {
        let dir = tempfile::tempdir()?;
        let mut state = fresh_state(&model, 21, Precision::F32)?;
        let mut obs = InterruptAt {
            dir: dir.path().to_path_buf(),
            fail_at: 2,
            stop,
        };
        let e = run(&mut state, &mut obs).unwrap_err().to_string();
        assert!(e.contains("interrupted"), "{stop:?}: {e}");
        let mut back = checkpoint::load(dir.path(), &Device::Cpu)?;
        assert_eq!(back.epoch, expect_epoch, "{stop:?}");
        assert_eq!(back.history.len(), expect_epoch, "{stop:?}");
        assert_eq!(
            back.history,
            straight.history[..expect_epoch]
                .iter()
                .map(|m| EpochMetrics {
                    seconds: back.history[m.epoch - 1].seconds,
                    ..m.clone()
                })
                .collect::<Vec<_>>(),
            "{stop:?}: the checkpoint's metrics are not those of its epoch"
        );
        run(
            &mut back,
            &mut SaveAt {
                dir: dir.path().to_path_buf(),
                at: 3,
            },
        )?;
        assert_eq!(
            back.params.to_vec1::<f32>()?,
            straight.params.to_vec1::<f32>()?,
            "{stop:?}: parameters differ from the uninterrupted run"
        );
        // The finished run's checkpoint is the only one left, with no temporary leftovers.
        assert_eq!(checkpoint::load(dir.path(), &Device::Cpu)?.epoch, 3);
        assert!(tmp_files(dir.path()).is_empty(), "{stop:?}");
    }
    Ok(())
}

#[test]
fn trainer_rejects_bad_config() -> Result<()> {
    let (train, test) = digits(Some(32))?;
    let model = Model::build(&ModelSpec::Mlp { hidden: vec![4] }, [1, 8, 8], 10)?;
    for (cfg, setting) in [
        (config(0, 0.1, 0), "number of epochs"),
        (config(1, 0.0, 0), "learning rate"),
        (
            TrainConfig {
                warmup_epochs: 2,
                ..config(2, 0.1, 0)
            },
            "warm-up epochs",
        ),
    ] {
        let mut task = classify(&model, &train, &test, 32)?;
        let mut state = fresh_state(&model, 0, Precision::F32)?;
        let mut opt = sgd(0.9, 0.0)?;
        let e = Trainer { config: &cfg }
            .run(
                &mut task,
                &mut state,
                &mut Backprop,
                opt.as_mut(),
                &mut Silent,
            )
            .unwrap_err()
            .to_string();
        assert!(e.contains(setting), "{e}");
    }
    let e = classify(&model, &train, &test, 0)
        .err()
        .expect("batch size 0")
        .to_string();
    assert!(e.contains("batch size"), "{e}");
    Ok(())
}

/// Backprop whose gradient turns NaN from `poison_at` (0-based epoch) on, as a diverging
/// estimate would, while the loss stays finite.
struct PoisonedBackprop {
    epoch: usize,
    poison_at: usize,
}

impl GradientEstimator for PoisonedBackprop {
    fn name(&self) -> String {
        "poisoned".into()
    }
    fn estimate(
        &mut self,
        obj: &dyn deepzero_core::objective::Objective,
        params: &Tensor,
        rng: &mut StdRng,
    ) -> deepzero_core::Result<deepzero_core::estimator::Estimate> {
        let mut e = Backprop.estimate(obj, params, rng)?;
        if self.epoch >= self.poison_at {
            e.grad = (e.grad * f64::NAN)?;
        }
        Ok(e)
    }
    fn on_epoch_start(
        &mut self,
        epoch: usize,
        _seed: u64,
        _params: &mut Tensor,
    ) -> deepzero_core::Result<()> {
        self.epoch = epoch;
        Ok(())
    }
}

/// Records the epochs it was asked to checkpoint.
#[derive(Default)]
struct Checkpoints(Vec<usize>);

impl Observer for Checkpoints {
    fn on_epoch_end(&mut self, _m: &EpochMetrics, state: &TrainState) -> deepzero_core::Result<()> {
        self.0.push(state.epoch);
        Ok(())
    }
}

#[test]
fn a_non_finite_gradient_stops_training_after_the_last_good_checkpoint() -> Result<()> {
    let (train, test) = digits(Some(200))?;
    let model = Model::build(&ModelSpec::Mlp { hidden: vec![8] }, [1, 8, 8], 10)?;
    let cfg = config(3, 0.1, 0);
    let mut task = classify(&model, &train, &test, 50)?;
    let mut state = fresh_state(&model, 0, Precision::F32)?;
    let mut opt = cfg.optimizer.build()?;
    let mut estimator = PoisonedBackprop {
        epoch: 0,
        poison_at: 1,
    };
    let mut checkpoints = Checkpoints::default();
    let err = Trainer { config: &cfg }
        .run(
            &mut task,
            &mut state,
            &mut estimator,
            opt.as_mut(),
            &mut checkpoints,
        )
        .expect_err("a NaN gradient must stop the run");
    let msg = err.to_string();
    assert!(
        matches!(err, deepzero_core::Error::Diverged(_)),
        "not a divergence: {msg}"
    );
    assert!(
        msg.contains("epoch 2, step 1") && msg.contains("gradient"),
        "{msg}"
    );
    // Epoch 1 was checkpointed; nothing after it.
    assert_eq!(checkpoints.0, vec![1]);
    assert_eq!(state.epoch, 1);
    Ok(())
}
