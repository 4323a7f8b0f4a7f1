//! Denoiser training: every method's task trains on digits and its loss falls; DeepZero's head
//! makes one black-box call per CGE group; FO-DS's gradient matches finite differences; ZO-DS
//! approaches FO-DS's direction with many directions; the denoised classifier is denoiser then
//! classifier.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use deepzero_certify::denoise::{denoise_images, DenoiserTask, ZoDsObjective};
use deepzero_certify::{
    Autoencoder, AutoencoderSpec, BlackBox, DenoiseConfig, DenoiseMethod, DenoisedClassifier,
    ModelClassifier, ZoConfig,
};
use deepzero_core::data::{self, Dataset, DatasetKind, Normalization};
use deepzero_core::estimator::{Backprop, Cge, GradientEstimator};
use deepzero_core::model::{Mode, Model, ModelSpec, Precision};
use deepzero_core::optim::{OptimizerConfig, OptimizerKind};
use deepzero_core::query::{Difference, QueryEngine};
use deepzero_core::seed::initial_params;
use deepzero_core::task::{ClassificationConfig, ClassificationTask, Task};
use deepzero_core::trainer::{Silent, TrainConfig, TrainState, Trainer};
use rand::{rngs::StdRng, SeedableRng};

/// Digits (pixels in [0, 1]) and a backprop-trained MLP victim on them.
fn digits_and_victim(dtype: DType) -> Result<(Dataset, Dataset, ModelClassifier)> {
    let (train, test) = data::load(DatasetKind::Digits, None, 0)?;
    let norm = Normalization::fit(&train);
    let (mut ntrain, mut ntest) = (train.clone(), test.clone());
    norm.apply(&mut ntrain)?;
    norm.apply(&mut ntest)?;
    let model = Model::build(&ModelSpec::Mlp { hidden: vec![32] }, [1, 8, 8], 10)?;
    let mut task =
        ClassificationTask::new(&model, &ntrain, &ntest, ClassificationConfig::default())?;
    let config = TrainConfig {
        epochs: 6,
        lr: 0.05,
        warmup_epochs: 0,
        seed: 0,
        optimizer: OptimizerConfig {
            kind: OptimizerKind::Sgd,
            momentum: 0.9,
            weight_decay: 0.0,
        },
    };
    let p = initial_params(&model, 0);
    let mut state = TrainState::new(
        Tensor::from_vec(p, model.num_params(), &Device::Cpu)?.to_dtype(DType::F32)?,
    );
    let mut opt = config.optimizer.build()?;
    Trainer { config: &config }.run(
        &mut task,
        &mut state,
        &mut Backprop,
        opt.as_mut(),
        &mut Silent,
    )?;
    let acc = state.history.last().unwrap().get("test_accuracy").unwrap();
    assert!(acc > 0.85, "victim accuracy {acc}");
    let bn = task.bn_state().clone();
    let victim = ModelClassifier::from_tensor(model, state.params.to_dtype(dtype)?, bn, norm)?;
    Ok((train, test, victim))
}

fn denoiser() -> Result<Model> {
    Ok(Model::build_image(
        &ModelSpec::Dncnn { depth: 3, width: 8 },
        [1, 8, 8],
    )?)
}

fn config(method: DenoiseMethod, precision: Precision) -> DenoiseConfig {
    DenoiseConfig {
        method,
        sigma: 0.25,
        batch_size: 32,
        eval_size: 100,
        zo: ZoConfig {
            q: 32,
            sparsity: 0.5,
            prune_q: 16,
            ..ZoConfig::default()
        },
        precision,
        seed: 3,
    }
}

fn init(model: &Model, dtype: DType) -> Result<Tensor> {
    let p = initial_params(model, 1);
    Ok(Tensor::from_vec(p, model.num_params(), &Device::Cpu)?.to_dtype(dtype)?)
}

fn host(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.to_dtype(DType::F64)?.to_vec1::<f64>()?)
}

/// Pre-train the autoencoder (method mse, σ = 0) on the digits.
fn autoencoder(
    train: &Dataset,
    test: &Dataset,
    victim: Arc<dyn BlackBox>,
) -> Result<Arc<Autoencoder>> {
    let spec = AutoencoderSpec {
        hidden: 64,
        code: 16,
    };
    let model = spec.build([1, 8, 8])?;
    let mut cfg = config(DenoiseMethod::Mse, Precision::F32);
    cfg.sigma = 0.0;
    let mut task = DenoiserTask::new(&model, train, test, victim, None, None, cfg)?;
    let params = train_task(&mut task, &model, &mut Backprop, 15, 0.05)?;
    Ok(Arc::new(Autoencoder::new(
        spec,
        [1, 8, 8],
        &host(&params)?,
    )?))
}

fn train_task(
    task: &mut DenoiserTask,
    model: &Model,
    estimator: &mut dyn GradientEstimator,
    epochs: usize,
    lr: f64,
) -> Result<Tensor> {
    let config = TrainConfig {
        epochs,
        lr,
        warmup_epochs: 0,
        seed: 3,
        optimizer: OptimizerConfig {
            kind: OptimizerKind::Adam,
            momentum: 0.9,
            weight_decay: 0.0,
        },
    };
    let mut state = TrainState::new(init(model, DType::F32)?);
    let mut opt = config.optimizer.build()?;
    Trainer { config: &config }.run(task, &mut state, estimator, opt.as_mut(), &mut Silent)?;
    Ok(state.params)
}

#[test]
fn every_method_trains_and_its_loss_falls() -> Result<()> {
    let (train, test, victim) = digits_and_victim(DType::F32)?;
    let train = train.take(256);
    let victim = Arc::new(victim);
    let black_box: Arc<dyn BlackBox> = victim.clone();
    let ae = autoencoder(&train, &test, black_box.clone())?;
    let model = denoiser()?;
    for method in DenoiseMethod::ALL {
        let cfg = config(method, Precision::F32);
        let mut task = DenoiserTask::new(
            &model,
            &train,
            &test,
            black_box.clone(),
            Some(victim.clone()),
            Some(ae.clone()),
            cfg.clone(),
        )?;
        let start = init(&model, DType::F32)?;
        let (mut estimator, ratios) = method.estimator(&task, &start, &cfg.zo)?;
        assert_eq!(ratios.is_some(), method == DenoiseMethod::DeepZero);
        let before = task.objective(0, 0, 3)?.loss(&host(&start)?)?;
        let lr = if method == DenoiseMethod::DeepZero {
            0.01
        } else {
            0.005
        };
        let params = train_task(&mut task, &model, estimator.as_mut(), 3, lr)?;
        let after = task.objective(0, 0, 3)?.loss(&host(&params)?)?;
        assert!(after < 0.8 * before, "{method}: loss {before} -> {after}");
        if method.uses_classifier() && method != DenoiseMethod::Fo {
            assert!(
                task.black_box_queries() > train.len() as u64,
                "{method}: queries not counted"
            );
        }
    }
    Ok(())
}

/// Counts `logits` calls of the inner black box.
struct CallCounter<C> {
    inner: C,
    calls: AtomicU64,
}

impl<C: BlackBox> BlackBox for CallCounter<C> {
    fn input_shape(&self) -> [usize; 3] {
        self.inner.input_shape()
    }
    fn num_classes(&self) -> deepzero_certify::Result<usize> {
        self.inner.num_classes()
    }
    fn logits(&self, images: &[f32], n: usize) -> deepzero_certify::Result<Vec<f32>> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.inner.logits(images, n)
    }
    fn queries(&self) -> u64 {
        self.inner.queries()
    }
}

#[test]
fn deepzero_head_calls_the_black_box_once_per_cge_group() -> Result<()> {
    let (train, test, victim) = digits_and_victim(DType::F32)?;
    let train = train.take(64);
    let counter = Arc::new(CallCounter {
        inner: victim,
        calls: AtomicU64::new(0),
    });
    let model = denoiser()?;
    let task = DenoiserTask::new(
        &model,
        &train,
        &test,
        counter.clone(),
        None,
        None,
        config(DenoiseMethod::DeepZero, Precision::F32),
    )?;
    let coords: Vec<usize> = (0..70).map(|i| i * 7).collect();
    let mut cge = Cge::new(5e-3, Difference::Forward, QueryEngine::Fast)?.with_coords(coords);
    let obj = task.objective(0, 0, 3)?;
    let queries_before = task.black_box_queries();
    counter.calls.store(0, Ordering::Relaxed);
    let est = cge.estimate(
        obj.as_ref(),
        &init(&model, DType::F32)?,
        &mut StdRng::seed_from_u64(0),
    )?;
    // The base forward, then ⌈70 / 32⌉ = 3 groups of coordinates.
    assert_eq!(counter.calls.load(Ordering::Relaxed), 1 + 3);
    assert_eq!(est.queries, 71);
    assert_eq!(task.black_box_queries() - queries_before, 71 * 32);
    Ok(())
}

#[test]
fn fo_gradient_matches_central_differences() -> Result<()> {
    let (train, test, victim) = digits_and_victim(DType::F64)?;
    let train = train.take(16);
    let victim = Arc::new(victim);
    let model = denoiser()?;
    let mut cfg = config(DenoiseMethod::Fo, Precision::F64);
    cfg.batch_size = 8;
    let task = DenoiserTask::new(
        &model,
        &train,
        &test,
        victim.clone(),
        Some(victim),
        None,
        cfg,
    )?;
    let params = init(&model, DType::F64)?;
    let obj = task.objective(0, 0, 3)?;
    let (_, grad) = obj.loss_and_grad(&params)?.expect("fo has a gradient");
    let grad = host(&grad)?;
    let theta = host(&params)?;
    let h = 1e-6;
    for i in (0..theta.len()).step_by(37) {
        let (mut up, mut down) = (theta.clone(), theta.clone());
        up[i] += h;
        down[i] -= h;
        let fd = (obj.loss(&up)? - obj.loss(&down)?) / (2.0 * h);
        assert!(
            (fd - grad[i]).abs() <= 1e-6 + 1e-4 * fd.abs(),
            "coordinate {i}: backprop {} vs finite differences {fd}",
            grad[i]
        );
    }
    Ok(())
}

#[test]
fn zo_ds_with_many_directions_points_like_fo() -> Result<()> {
    let (train, test, victim) = digits_and_victim(DType::F32)?;
    let train = train.take(8);
    let victim = Arc::new(victim);
    let model = denoiser()?;
    let mut cfg = config(DenoiseMethod::Fo, Precision::F32);
    cfg.batch_size = 4;
    let fo = DenoiserTask::new(
        &model,
        &train,
        &test,
        victim.clone(),
        Some(victim.clone()),
        None,
        cfg.clone(),
    )?;
    let params = init(&model, DType::F32)?;
    let (_, g_fo) = fo
        .objective(0, 0, 3)?
        .loss_and_grad(&params)?
        .expect("gradient");
    // The same batch and noise (same seed, epoch, step), RGE with 4000 directions at the image.
    let fo_obj = fo.objective(0, 0, 3)?;
    let x_loss = fo_obj.loss(&host(&params)?)?;
    cfg.method = DenoiseMethod::ZoDs;
    cfg.zo.q = 4000;
    cfg.zo.mu = 1e-3;
    let zo = DenoiserTask::new(
        &model,
        &train,
        &test,
        victim.clone(),
        Some(victim),
        None,
        cfg,
    )?;
    let obj = zo.objective(0, 0, 3)?;
    let (loss, g_zo) = obj.loss_and_grad(&params)?.expect("gradient");
    assert!(
        (loss - x_loss).abs() < 1e-4 * x_loss.abs().max(1.0),
        "{loss} vs {x_loss}"
    );
    let (a, b) = (host(&g_fo)?, host(&g_zo)?);
    let dot: f64 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
    let cos = dot
        / (a.iter().map(|x| x * x).sum::<f64>().sqrt()
            * b.iter().map(|x| x * x).sum::<f64>().sqrt());
    assert!(
        cos > 0.9,
        "cosine of ZO-DS (q = 4000) and FO-DS gradients: {cos}"
    );
    assert_eq!(zo.black_box_queries(), 8 + 4 * 4001);
    let _ = ZoDsObjective::new; // the objective is public for other chains
    Ok(())
}

#[test]
fn denoised_classifier_is_denoiser_then_classifier() -> Result<()> {
    let (_, test, victim) = digits_and_victim(DType::F32)?;
    let model = denoiser()?;
    let params = init(&model, DType::F32)?;
    let mut bn = model.new_bn_state();
    bn.mean[0] = vec![0.1; 8];
    bn.var[0] = vec![2.0; 8];
    let n = 5;
    let images = &test.images[..n * 64];
    // By hand: the denoiser in eval mode, then the classifier.
    let x = Tensor::from_slice(images, (n, 1, 8, 8), &Device::Cpu)?;
    let views = model.param_views(&params)?;
    let y = model.forward(&views, &x, Mode::Eval(&bn))?;
    let y = y.flatten_all()?.to_vec1::<f32>()?;
    let expected = victim.logits(&y, n)?;
    assert_eq!(denoise_images(&model, &params, &bn, images, n)?, y);
    let denoised = DenoisedClassifier::new(model, params, bn, None, victim)?;
    let got = denoised.logits(images, n)?;
    assert_eq!(got, expected);
    assert_eq!(denoised.queries(), n as u64);
    assert_eq!(denoised.inner().queries(), 2 * n as u64);
    Ok(())
}

#[test]
fn chains_on_our_kernels_match_candle() -> Result<()> {
    // The same objective (batch, noise, directions) of ZO-DS, FO-DS and ZO-AE-DS with f32
    // parameters (the denoiser's, the classifier's and the encoder's forwards and backwards on
    // our kernels) and f64 ones (candle autograd): losses and gradients agree, and both record
    // the denoiser's batch-norm statistics.
    let (train, test, victim32) = digits_and_victim(DType::F32)?;
    let (_, _, victim64) = digits_and_victim(DType::F64)?;
    let train = train.take(8);
    let (victim32, victim64) = (Arc::new(victim32), Arc::new(victim64));
    let ae = autoencoder(&train, &test, victim32.clone())?;
    let model = denoiser()?;
    for method in [
        DenoiseMethod::ZoDs,
        DenoiseMethod::Fo,
        DenoiseMethod::ZoAeDs,
    ] {
        let mut results = Vec::new();
        for (precision, dtype, victim) in [
            (Precision::F32, DType::F32, &victim32),
            (Precision::F64, DType::F64, &victim64),
        ] {
            let mut cfg = config(method, precision);
            cfg.batch_size = 4;
            let task = DenoiserTask::new(
                &model,
                &train,
                &test,
                victim.clone(),
                Some(victim.clone()),
                (method == DenoiseMethod::ZoAeDs).then(|| ae.clone()),
                cfg,
            )?;
            let obj = task.objective(0, 0, 3)?;
            let (loss, g) = obj.loss_and_grad(&init(&model, dtype)?)?.expect("gradient");
            let stats = obj.take_bn_stats().expect("batch-norm statistics");
            assert_eq!(stats.stats.len(), model.bn_channels.len());
            results.push((loss, host(&g)?, stats));
        }
        let ((l32, g32, s32), (l64, g64, s64)) = (&results[0], &results[1]);
        let num: f64 = g32.iter().zip(g64).map(|(a, b)| (a - b).powi(2)).sum();
        let den: f64 = g64.iter().map(|b| b * b).sum();
        let rel = (num / den).sqrt();
        assert!(
            (l32 - l64).abs() < 1e-4 * l64.abs().max(1.0),
            "{method:?}: {l32} vs {l64}"
        );
        assert!(
            rel < 1e-3,
            "{method:?} gradient, f32 ours vs f64 candle: rel L2 {rel:.2e}"
        );
        eprintln!("{method:?}: loss {l32} vs {l64}, gradient rel L2 {rel:.2e}");
        for ((m, v, n), (m64, v64, n64)) in s32.stats.iter().zip(&s64.stats) {
            assert_eq!(n, n64);
            for c in 0..m.len() {
                assert!((m[c] - m64[c]).abs() < 1e-5 * (1.0 + m64[c].abs()));
                assert!((v[c] - v64[c]).abs() < 1e-4 * v64[c].abs() + 1e-9);
            }
        }
    }
    Ok(())
}

#[test]
fn absurd_zo_ds_directions_are_refused_before_any_work() -> Result<()> {
    // q = usize::MAX: an error naming the directions and the memory, not a capacity overflow.
    let (train, test, victim) = digits_and_victim(DType::F32)?;
    let victim = Arc::new(victim);
    let model = denoiser()?;
    let mut cfg = config(DenoiseMethod::ZoDs, Precision::F32);
    cfg.zo.q = usize::MAX;
    let err = DenoiserTask::new(&model, &train, &test, victim.clone(), None, None, cfg)
        .err()
        .expect("refused")
        .to_string();
    assert!(
        err.contains("directions") && err.contains("memory"),
        "{err}"
    );
    Ok(())
}
