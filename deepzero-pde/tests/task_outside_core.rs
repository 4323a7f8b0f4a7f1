//! A task defined outside core through its public API alone: a periodic image-to-image network
//! whose output reaches the loss only through a closure the estimators cannot differentiate
//! (a clipped, quantised error: a black box). It trains through the core trainer with CGE (naive
//! and fast engines), sparse CGE and RGE, and the fast engine's generic head agrees with a
//! float64 naive evaluation on a DnCNN-style model.

use anyhow::Result;
use candle_core::{Device, Tensor};
use deepzero_core::estimator::{Cge, Difference, Direction, GradientEstimator, QueryEngine, Rge};
use deepzero_core::estimator::{EstimatorConfig, EstimatorKind};
use deepzero_core::head::Head;
use deepzero_core::layout::ParamLayout;
use deepzero_core::model::{
    params_tensor, tensor_to_vec, Activation, ConvSpec, GraphBuilder, Model, ModelSpec, Padding,
    Precision,
};
use deepzero_core::objective::{ModelObjective, Objective};
use deepzero_core::optim::{OptimizerConfig, OptimizerKind};
use deepzero_core::sparsity::{sparse_estimator, LayerRatios, SparseConfig};
use deepzero_core::task::{Metrics, Task};
use deepzero_core::trainer::{Silent, TrainConfig, TrainState, Trainer};
use rand::{Rng, SeedableRng};
use std::sync::Arc;

const SIDE: usize = 8;

/// Smooth periodic fields and their targets: a one-cell shift plus a damped copy (something a
/// small circular CNN can learn).
fn field(rng: &mut impl Rng) -> Vec<f64> {
    let (a, b, p) = (
        rng.random::<f64>(),
        rng.random::<f64>(),
        rng.random::<f64>() * std::f64::consts::TAU,
    );
    let tau = std::f64::consts::TAU;
    (0..SIDE * SIDE)
        .map(|i| {
            let (y, x) = ((i / SIDE) as f64, (i % SIDE) as f64);
            a * (tau * x / SIDE as f64 + p).sin() + b * (tau * y / SIDE as f64).cos()
        })
        .collect()
}

fn target_of(x: &[f64]) -> Vec<f64> {
    (0..SIDE * SIDE)
        .map(|i| {
            let (y, c) = (i / SIDE, i % SIDE);
            0.8 * x[y * SIDE + (c + 1) % SIDE]
        })
        .collect()
}

/// The black box: per sample, a quantised squared error, clipped at 10.
fn black_box_loss(targets: Arc<Vec<f64>>, n: usize) -> Head {
    Head::output(move |outputs, queries| {
        let len = SIDE * SIDE;
        Ok((0..queries * n)
            .map(|r| {
                let o = &outputs[r * len..][..len];
                let t = &targets[(r % n) * len..][..len];
                let e: f64 =
                    o.iter().zip(t).map(|(a, b)| (a - b) * (a - b)).sum::<f64>() / len as f64;
                ((e.min(10.0)) * 1e12).round() / 1e12
            })
            .collect())
    })
}

/// Regression of fields to their shifted copies.
struct Shift<'a> {
    model: &'a Model,
    inputs: Vec<Vec<f64>>,
    batch: usize,
    precision: Precision,
}

impl Shift<'_> {
    fn objective_on(&self, idx: &[usize]) -> Result<ModelObjective<'_>, deepzero_core::Error> {
        let n = idx.len();
        let xs: Vec<f64> = idx.iter().flat_map(|&i| self.inputs[i].clone()).collect();
        let ts: Vec<f64> = idx
            .iter()
            .flat_map(|&i| target_of(&self.inputs[i]))
            .collect();
        let x = Tensor::from_vec(xs, (n, 1, SIDE, SIDE), &Device::Cpu)?
            .to_dtype(self.precision.dtype())?;
        ModelObjective::new(self.model, x, black_box_loss(Arc::new(ts), n))
    }
}

impl Task for Shift<'_> {
    fn layout(&self) -> &ParamLayout {
        &self.model.layout
    }
    fn steps_per_epoch(&self) -> usize {
        self.inputs.len() / self.batch
    }
    fn objective(
        &self,
        epoch: usize,
        step: usize,
        _seed: u64,
    ) -> deepzero_core::Result<Box<dyn Objective + '_>> {
        let k = self.steps_per_epoch();
        let start = ((epoch * k + step) % k) * self.batch;
        let idx: Vec<usize> = (start..start + self.batch).collect();
        Ok(Box::new(self.objective_on(&idx)?))
    }
    fn evaluate(&self, params: &Tensor) -> deepzero_core::Result<Metrics> {
        let idx: Vec<usize> = (0..self.inputs.len()).collect();
        let obj = self.objective_on(&idx)?;
        Ok(vec![(
            "loss_all".into(),
            obj.loss(&tensor_to_vec(params)?)?,
        )])
    }
}

/// A periodic residual network from the public builder: circular convs, tanh, a residual to the
/// input, and the last layer zero-initialised (the model starts as the identity map).
fn periodic_net() -> Result<Model> {
    let mut b = GraphBuilder::new([1, SIDE, SIDE])?;
    let conv = |out| ConvSpec::new(out, 3).padding(Padding::Circular);
    let h = b.conv("conv_in", 0, conv(4))?;
    let h = b.activation("act", h, Activation::Tanh)?;
    let d = b.conv("conv_out", h, conv(1))?;
    b.zero_init(d)?;
    b.residual_to_input("residual", d)?;
    Ok(b.finish("periodic-shift"))
}

fn train(
    model: &Model,
    estimator: &mut dyn GradientEstimator,
    epochs: usize,
    lr: f64,
) -> Result<(f64, f64)> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let inputs: Vec<Vec<f64>> = (0..16).map(|_| field(&mut rng)).collect();
    let mut task = Shift {
        model,
        inputs,
        batch: 4,
        precision: Precision::F32,
    };
    let init = deepzero_core::seed::initial_params(model, 1);
    let mut state = TrainState::new(params_tensor(&init, Precision::F32, &Device::Cpu)?);
    let before = task.evaluate(&state.params)?[0].1;
    let config = TrainConfig {
        epochs,
        lr,
        warmup_epochs: 0,
        optimizer: OptimizerConfig {
            kind: OptimizerKind::Adam,
            momentum: 0.9,
            weight_decay: 0.0,
        },
        seed: 0,
    };
    let mut opt = config.optimizer.build()?;
    Trainer { config: &config }.run(&mut task, &mut state, estimator, opt.as_mut(), &mut Silent)?;
    let after = state
        .history
        .last()
        .expect("epochs ran")
        .get("loss_all")
        .expect("metric");
    Ok((before, after))
}

#[test]
fn regression_task_outside_core_trains_with_every_zo_estimator() -> Result<()> {
    let model = periodic_net()?;
    assert_eq!(model.output_shape, vec![1, SIDE, SIDE]);
    assert_eq!(model.num_classes(), None);
    let cge = |engine| Cge::new(1e-3, Difference::Forward, engine);
    let ratios = LayerRatios::uniform(&model, 0.5)?;
    let mut sparse = sparse_estimator(
        &EstimatorConfig {
            kind: EstimatorKind::Cge,
            mu: 1e-3,
            ..Default::default()
        },
        &model.layout,
        &ratios,
        None,
        &SparseConfig {
            mask_interval: 1,
            ..Default::default()
        },
        0,
    )?;
    let mut runs: Vec<(&str, Box<dyn GradientEstimator>, usize)> = vec![
        ("cge naive", Box::new(cge(QueryEngine::Naive)?), 8),
        ("cge fast", Box::new(cge(QueryEngine::Fast)?), 8),
        (
            "rge",
            Box::new(Rge::new(
                40,
                1e-3,
                Difference::Forward,
                Direction::Gaussian,
            )?),
            8,
        ),
    ];
    let mut results = Vec::new();
    for (name, est, epochs) in runs.iter_mut() {
        let (before, after) = train(&model, est.as_mut(), *epochs, 0.02)?;
        results.push((name.to_string(), before, after));
    }
    let (before, after) = train(&model, sparse.as_mut(), 8, 0.02)?;
    results.push(("sparse cge".into(), before, after));
    for (name, before, after) in &results {
        eprintln!("{name}: loss {before:.5} -> {after:.5}");
        assert!(*after < 0.7 * before, "{name}: loss {before} -> {after}");
    }
    // The naive and fast engines give the same training run up to rounding.
    assert!((results[0].2 - results[1].2).abs() < 1e-3 * results[0].2.max(1e-9));
    Ok(())
}

/// The fast engine with the generic head (f32, delta propagation) against a float64 naive
/// evaluation (candle forwards, the same closure) on a DnCNN-style model: ≤ 1e-3 relative L2.
#[test]
fn dncnn_generic_head_fast_engine_matches_float64_naive() -> Result<()> {
    let model = Model::build_image(&ModelSpec::Dncnn { depth: 4, width: 6 }, [1, SIDE, SIDE])?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let n = 4;
    let inputs: Vec<Vec<f64>> = (0..n).map(|_| field(&mut rng)).collect();
    let xs: Vec<f64> = inputs.iter().flatten().copied().collect();
    let ts: Vec<f64> = inputs.iter().flat_map(|x| target_of(x)).collect();
    let init = deepzero_core::seed::initial_params(&model, 2);
    let grad = |p: Precision, engine: QueryEngine| -> Result<Vec<f64>> {
        let x =
            Tensor::from_vec(xs.clone(), (n, 1, SIDE, SIDE), &Device::Cpu)?.to_dtype(p.dtype())?;
        let obj = ModelObjective::new(&model, x, black_box_loss(Arc::new(ts.clone()), n))?;
        let params = params_tensor(&init, p, &Device::Cpu)?;
        let mut cge = Cge::new(5e-3, Difference::Forward, engine)?;
        Ok(tensor_to_vec(
            &cge.estimate(&obj, &params, &mut rand::rngs::StdRng::seed_from_u64(0))?
                .grad,
        )?)
    };
    let truth = grad(Precision::F64, QueryEngine::Naive)?;
    let fast = grad(Precision::F32, QueryEngine::Fast)?;
    let num: f64 = fast
        .iter()
        .zip(&truth)
        .map(|(a, b)| (a - b) * (a - b))
        .sum();
    let den: f64 = truth.iter().map(|b| b * b).sum();
    let rel = (num / den).sqrt();
    eprintln!(
        "DnCNN ({} params): fast f32 vs naive f64 relative L2 {rel:.2e}",
        model.num_params()
    );
    assert!(rel <= 1e-3, "relative L2 {rel}");
    assert!(truth.iter().any(|&g| g != 0.0));
    Ok(())
}
