//! Tests of `deepzero_core::model` and `deepzero_core::layout`: parameter counts, layouts,
//! initialisation, batch norm, max-pool gradients and resumed forwards.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use deepzero_core::estimator::{Cge, Difference, GradientEstimator, QueryEngine};
use deepzero_core::layout::ParamKind;
use deepzero_core::model::{
    params_tensor, tensor_to_vec, BatchNorm, Conv2d, Linear, MaxPool, Mode, Model, ModelSpec, Op,
    Precision, BN_EPS,
};
use deepzero_core::objective::{ClassifierObjective, Objective};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};

// ---------------------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------------------

fn cnn(depth: usize, width: usize) -> ModelSpec {
    ModelSpec::SimpleCnn { depth, width }
}

fn mlp(hidden: &[usize]) -> ModelSpec {
    ModelSpec::Mlp {
        hidden: hidden.to_vec(),
    }
}

/// Standard-normal batch `[n, c, h, w]` in f64.
fn gaussian_batch(n: usize, shape: [usize; 3], seed: u64) -> Result<Tensor> {
    let mut rng = StdRng::seed_from_u64(seed);
    let [c, h, w] = shape;
    let v: Vec<f64> = (0..n * c * h * w)
        .map(|_| StandardNormal.sample(&mut rng))
        .collect();
    Ok(Tensor::from_vec(v, (n, c, h, w), &Device::Cpu)?)
}

fn labels(n: usize, classes: usize, seed: u64) -> Result<Tensor> {
    let mut rng = StdRng::seed_from_u64(seed);
    let y: Vec<u32> = (0..n)
        .map(|_| rng.random_range(0..classes as u32))
        .collect();
    Ok(Tensor::from_vec(y, n, &Device::Cpu)?)
}

/// Kaiming-initialised parameters as an f64 tensor.
fn init(model: &Model, seed: u64) -> Result<(Vec<f64>, Tensor)> {
    let p = model.init_params(&mut StdRng::seed_from_u64(seed));
    let t = params_tensor(&p, Precision::F64, &Device::Cpu)?;
    Ok((p, t))
}

fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f64 = a.iter().map(|x| x * x).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| x * x).sum::<f64>().sqrt();
    dot / (na * nb)
}

fn rel_err(est: &[f64], truth: &[f64]) -> f64 {
    let num: f64 = est
        .iter()
        .zip(truth)
        .map(|(a, b)| (a - b) * (a - b))
        .sum::<f64>()
        .sqrt();
    let den: f64 = truth.iter().map(|x| x * x).sum::<f64>().sqrt();
    num / den
}

/// Index of the first node whose op is batch norm.
fn first_bn_node(model: &Model) -> usize {
    model
        .nodes
        .iter()
        .position(|n| matches!(n.op, Op::BatchNorm { .. }))
        .expect("model has a batch-norm node")
}

/// Per-channel (mean, biased variance) of an `[N, C, H, W]` f64 tensor.
fn channel_moments(t: &Tensor) -> Result<(Vec<f64>, Vec<f64>)> {
    let (n, c, h, w) = t.dims4()?;
    let v = tensor_to_vec(t)?;
    let m = (n * h * w) as f64;
    let mut mean = vec![0.0; c];
    let mut var = vec![0.0; c];
    for ch in 0..c {
        let vals = (0..n).flat_map(|i| {
            let base = (i * c + ch) * h * w;
            v[base..base + h * w].iter().copied()
        });
        let s: f64 = vals.clone().sum();
        mean[ch] = s / m;
        var[ch] = vals.map(|x| (x - mean[ch]) * (x - mean[ch])).sum::<f64>() / m;
    }
    Ok((mean, var))
}

// ---------------------------------------------------------------------------------------
// parameter counts and layouts
// ---------------------------------------------------------------------------------------

#[test]
fn simple_cnn_param_counts_on_cifar_shape() -> Result<()> {
    // Per block after the first: conv 18·18·9 + 18 bias + BN 2·18 = 2970.
    // First block: 3·18·9 + 18 + 36 = 540; head: 18·10 + 10 = 190.
    let expected = [730, 3700, 6670, 9640, 12610];
    for (depth, want) in (1..=5).zip(expected) {
        let m = Model::build(&cnn(depth, 18), [3, 32, 32], 10)?;
        assert_eq!(m.num_params(), want, "depth {depth}");
        assert_eq!(m.layout.len(), want);
        assert_eq!(540 + 2970 * (depth - 1) + 190, want);
        assert_eq!(m.bn_channels, vec![18; depth]);
    }
    Ok(())
}

#[test]
fn resnet20_param_count() -> Result<()> {
    let m = Model::build(&ModelSpec::Resnet20, [3, 32, 32], 10)?;
    assert_eq!(m.num_params(), 269_722);
    // 19 convolutions without bias, 19 batch norms, one linear layer.
    let convs = m
        .nodes
        .iter()
        .filter(|n| matches!(n.op, Op::Conv2d { .. }))
        .count();
    assert_eq!(convs, 19);
    assert_eq!(m.bn_channels.len(), 19);
    assert_eq!(
        m.layout.count_kind(ParamKind::Bias),
        10,
        "only fc has a bias"
    );
    // BN scale and shift: 2 · (16 + 6·16 + 6·32 + 6·64) = 2 · 688.
    assert_eq!(m.layout.count_kind(ParamKind::BnScale), 688);
    assert_eq!(m.layout.count_kind(ParamKind::BnShift), 688);
    Ok(())
}

#[test]
fn mlp_param_count_formula() -> Result<()> {
    let cases: [(&[usize], [usize; 3], usize); 4] = [
        (&[], [1, 8, 8], 10),
        (&[32], [1, 8, 8], 10),
        (&[64, 16], [3, 5, 7], 4),
        (&[7, 7, 7], [1, 28, 28], 2),
    ];
    for (hidden, shape, classes) in cases {
        let m = Model::build(&mlp(hidden), shape, classes)?;
        let mut widths = vec![shape.iter().product::<usize>()];
        widths.extend_from_slice(hidden);
        widths.push(classes);
        let want: usize = widths.windows(2).map(|w| w[0] * w[1] + w[1]).sum();
        assert_eq!(m.num_params(), want, "hidden {hidden:?}");
    }
    Ok(())
}

#[test]
fn layout_offsets_contiguous_and_entry_of_boundaries() -> Result<()> {
    for (spec, shape) in [
        (mlp(&[16, 8]), [1, 8, 8]),
        (cnn(3, 18), [3, 32, 32]),
        (ModelSpec::Resnet20, [3, 32, 32]),
    ] {
        let m = Model::build(&spec, shape, 10)?;
        let l = &m.layout;
        assert_eq!(l.entries[0].offset, 0);
        for w in l.entries.windows(2) {
            assert_eq!(w[1].offset, w[0].offset + w[0].len(), "{}", w[1].name);
        }
        let sum: usize = l.entries.iter().map(|e| e.len()).sum();
        assert_eq!(l.len(), sum);
        for (i, e) in l.entries.iter().enumerate() {
            assert!(!e.is_empty());
            assert_eq!(l.entry_of(e.offset), Some(i), "first of {}", e.name);
            assert_eq!(
                l.entry_of(e.offset + e.len() - 1),
                Some(i),
                "last of {}",
                e.name
            );
            if e.len() > 2 {
                assert_eq!(l.entry_of(e.offset + e.len() / 2), Some(i));
            }
            // The node an entry names reads it.
            let node = &m.nodes[e.node];
            let reads = match &node.op {
                Op::Linear(Linear { weight, bias }) | Op::Conv2d(Conv2d { weight, bias, .. }) => {
                    *weight == i || *bias == Some(i)
                }
                Op::BatchNorm(BatchNorm { scale, shift, .. }) => *scale == i || *shift == i,
                _ => false,
            };
            assert!(reads, "entry {} is not read by node {}", e.name, node.name);
        }
        assert_eq!(l.entry_of(l.len()), None);
        assert_eq!(l.entry_of(l.len() + 100), None);
    }
    Ok(())
}

#[test]
fn build_rejects_bad_shapes_with_clear_messages() {
    let e = Model::build(&cnn(4, 8), [1, 8, 8], 10).unwrap_err();
    assert!(e.to_string().contains("depth 3 or less"), "{e}");
    assert!(Model::build(&cnn(3, 8), [1, 8, 8], 10).is_ok());
    assert!(Model::build(&cnn(0, 8), [1, 8, 8], 10).is_err());
    assert!(Model::build(&mlp(&[0]), [1, 8, 8], 10).is_err());
    assert!(Model::build(&mlp(&[4]), [1, 8, 8], 1).is_err());
    assert!(Model::build(&ModelSpec::Resnet20, [3, 3, 3], 10).is_err());
}

/// A model that `build` accepts must also run a forward pass: otherwise the error surfaces
/// mid-training instead of at set-up.
#[test]
fn resnet20_that_builds_also_runs() -> Result<()> {
    for side in 4..=10 {
        let Ok(m) = Model::build(&ModelSpec::Resnet20, [3, side, side], 10) else {
            continue;
        };
        let (_, p) = init(&m, 0)?;
        let views = m.param_views(&p)?;
        let x = gaussian_batch(2, [3, side, side], 1)?;
        let out = m.forward(&views, &x, Mode::Train);
        assert!(
            out.is_ok(),
            "ResNet-20 builds for {side}x{side} inputs but its forward fails: {}",
            out.unwrap_err()
        );
        assert_eq!(out?.dims(), [2, 10]);
    }
    Ok(())
}

#[test]
fn forward_output_shape() -> Result<()> {
    for (spec, shape, n) in [
        (mlp(&[8]), [1, 8, 8], 5),
        (cnn(2, 6), [3, 16, 16], 3),
        (cnn(3, 4), [1, 9, 11], 2),
        (ModelSpec::Resnet20, [3, 32, 32], 2),
    ] {
        let m = Model::build(&spec, shape, 10)?;
        let (_, p) = init(&m, 3)?;
        let views = m.param_views(&p)?;
        let x = gaussian_batch(n, shape, 4)?;
        let bn = m.new_bn_state();
        for mode in [Mode::Train, Mode::Eval(&bn)] {
            let y = m.forward(&views, &x, mode)?;
            assert_eq!(y.dims(), [n, 10], "{}", m.name);
            assert!(tensor_to_vec(&y)?.iter().all(|v| v.is_finite()));
        }
    }
    Ok(())
}

#[test]
fn param_views_reject_wrong_length() -> Result<()> {
    let m = Model::build(&mlp(&[4]), [1, 3, 3], 10)?;
    let t = Tensor::zeros(m.num_params() + 1, DType::F64, &Device::Cpu)?;
    assert!(m.param_views(&t).is_err());
    Ok(())
}

// ---------------------------------------------------------------------------------------
// initialisation
// ---------------------------------------------------------------------------------------

#[test]
fn init_is_deterministic_in_the_seed() -> Result<()> {
    let m = Model::build(&cnn(2, 18), [3, 32, 32], 10)?;
    let a = m.init_params(&mut StdRng::seed_from_u64(42));
    let b = m.init_params(&mut StdRng::seed_from_u64(42));
    let c = m.init_params(&mut StdRng::seed_from_u64(43));
    assert_eq!(a.len(), m.num_params());
    assert_eq!(a, b);
    assert_ne!(a, c);
    let differing = a.iter().zip(&c).filter(|(x, y)| x != y).count();
    assert!(differing > m.layout.count_kind(ParamKind::Weight) / 2);
    Ok(())
}

#[test]
fn init_kaiming_std_and_constant_tensors() -> Result<()> {
    let m = Model::build(&ModelSpec::Resnet20, [3, 32, 32], 10)?;
    let p = m.init_params(&mut StdRng::seed_from_u64(7));
    let e = m
        .layout
        .entries
        .iter()
        .find(|e| e.name == "layer3.2.conv2.weight")
        .expect("layer3.2.conv2.weight");
    assert_eq!(e.shape, vec![64, 64, 3, 3]);
    let w = &p[e.range()];
    let n = w.len() as f64;
    let mean = w.iter().sum::<f64>() / n;
    let std = (w.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n).sqrt();
    let want = (2.0f64 / 576.0).sqrt();
    assert!((std / want - 1.0).abs() < 0.05, "std {std} vs {want}");
    assert!(mean.abs() < 0.05 * want, "mean {mean}");
    // The first conv has fan-in 27: a different std.
    let e1 = &m.layout.entries[0];
    assert_eq!(e1.name, "conv1.weight");
    let w1 = &p[e1.range()];
    let std1 = (w1.iter().map(|v| v * v).sum::<f64>() / w1.len() as f64).sqrt();
    let want1 = (2.0f64 / 27.0).sqrt();
    assert!((std1 / want1 - 1.0).abs() < 0.15, "std {std1} vs {want1}");
    for e in &m.layout.entries {
        let v = &p[e.range()];
        match e.kind {
            ParamKind::BnScale => assert!(v.iter().all(|&x| x == 1.0), "{}", e.name),
            ParamKind::BnShift | ParamKind::Bias => {
                assert!(v.iter().all(|&x| x == 0.0), "{}", e.name)
            }
            ParamKind::Weight => {}
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// batch norm
// ---------------------------------------------------------------------------------------

/// Parameters with random batch-norm scales and shifts (so the checks see γ and β).
fn with_random_bn(model: &Model, seed: u64) -> Result<(Vec<f64>, Tensor)> {
    let (mut p, _) = init(model, seed)?;
    let mut rng = StdRng::seed_from_u64(seed + 1000);
    for e in &model.layout.entries {
        match e.kind {
            ParamKind::BnScale => p[e.range()]
                .iter_mut()
                .for_each(|v| *v = rng.random_range(0.5..2.0)),
            ParamKind::BnShift | ParamKind::Bias => p[e.range()]
                .iter_mut()
                .for_each(|v| *v = rng.random_range(-1.0..1.0)),
            ParamKind::Weight => {}
        }
    }
    let t = params_tensor(&p, Precision::F64, &Device::Cpu)?;
    Ok((p, t))
}

#[test]
fn batch_norm_train_mode_normalises_with_batch_statistics() -> Result<()> {
    let m = Model::build(&cnn(2, 6), [3, 16, 16], 10)?;
    let k = first_bn_node(&m);
    let (scale, shift) = match m.nodes[k].op {
        Op::BatchNorm(BatchNorm { scale, shift, .. }) => (scale, shift),
        _ => unreachable!(),
    };
    let x = gaussian_batch(4, [3, 16, 16], 11)?;

    // Fresh init: γ = 1, β = 0, so the output has per-channel mean 0 and variance ≈ 1.
    let (_, p) = init(&m, 5)?;
    let regs = m.forward_cached(&m.param_views(&p)?, &x, Mode::Train, None)?;
    let (mean, var) = channel_moments(&regs[k + 1])?;
    for c in 0..mean.len() {
        assert!(mean[c].abs() < 1e-10, "channel {c} mean {}", mean[c]);
        assert!((var[c] - 1.0).abs() < 1e-3, "channel {c} var {}", var[c]);
    }

    // Random γ, β: mean β, variance γ² v / (v + ε) with v the *biased* input variance.
    let (pv, p) = with_random_bn(&m, 6)?;
    let regs = m.forward_cached(&m.param_views(&p)?, &x, Mode::Train, None)?;
    let (in_mean, in_var) = channel_moments(&regs[m.nodes[k].inputs[0]])?;
    let (mean, var) = channel_moments(&regs[k + 1])?;
    let gamma = &pv[m.layout.entries[scale].range()];
    let beta = &pv[m.layout.entries[shift].range()];
    for c in 0..mean.len() {
        assert!(in_mean[c].abs() > 1e-3, "conv bias should shift the input");
        assert!((mean[c] - beta[c]).abs() < 1e-10, "channel {c}");
        let want = gamma[c] * gamma[c] * in_var[c] / (in_var[c] + BN_EPS);
        assert!(
            (var[c] - want).abs() < 1e-9 * want,
            "channel {c}: var {} vs {want}",
            var[c]
        );
    }
    Ok(())
}

#[test]
fn batch_norm_records_batch_statistics() -> Result<()> {
    use deepzero_core::model::BnBatchStats;
    let m = Model::build(&cnn(2, 5), [3, 8, 8], 10)?;
    let (_, p) = with_random_bn(&m, 2)?;
    let x = gaussian_batch(3, [3, 8, 8], 3)?;
    let mut stats = BnBatchStats::default();
    let regs = m.forward_cached(&m.param_views(&p)?, &x, Mode::Train, Some(&mut stats))?;
    assert_eq!(stats.stats.len(), 2);
    let bn_nodes: Vec<usize> = (0..m.nodes.len())
        .filter(|&i| matches!(m.nodes[i].op, Op::BatchNorm { .. }))
        .collect();
    for (s, &k) in stats.stats.iter().zip(&bn_nodes) {
        let input = &regs[m.nodes[k].inputs[0]];
        let (mean, var) = channel_moments(input)?;
        let (_, _, h, w) = input.dims4()?;
        assert_eq!(s.2, 3 * h * w);
        for c in 0..mean.len() {
            assert!((s.0[c] - mean[c]).abs() < 1e-12);
            assert!((s.1[c] - var[c]).abs() < 1e-12);
        }
    }
    // Running update (PyTorch rule): 0.9 · old + 0.1 · batch, variance unbiased.
    let mut bn = m.new_bn_state();
    bn.update(&stats);
    let (m0, v0, n0) = &stats.stats[0];
    let nn = *n0 as f64;
    for c in 0..m0.len() {
        assert!((bn.mean[0][c] - 0.1 * m0[c]).abs() < 1e-15);
        assert!((bn.var[0][c] - (0.9 + 0.1 * v0[c] * nn / (nn - 1.0))).abs() < 1e-14);
    }
    Ok(())
}

#[test]
fn batch_norm_eval_mode_with_fresh_state_is_affine() -> Result<()> {
    let m = Model::build(&cnn(2, 6), [3, 16, 16], 10)?;
    let k = first_bn_node(&m);
    let (scale, shift) = match m.nodes[k].op {
        Op::BatchNorm(BatchNorm { scale, shift, .. }) => (scale, shift),
        _ => unreachable!(),
    };
    let (pv, p) = with_random_bn(&m, 9)?;
    let x = gaussian_batch(3, [3, 16, 16], 12)?;
    let bn = m.new_bn_state();
    let regs = m.forward_cached(&m.param_views(&p)?, &x, Mode::Eval(&bn), None)?;
    let input = &regs[m.nodes[k].inputs[0]];
    let (n, c, h, w) = input.dims4()?;
    let xin = tensor_to_vec(input)?;
    let out = tensor_to_vec(&regs[k + 1])?;
    let gamma = &pv[m.layout.entries[scale].range()];
    let beta = &pv[m.layout.entries[shift].range()];
    let s = (1.0 + BN_EPS).sqrt();
    for i in 0..n * c * h * w {
        let ch = (i / (h * w)) % c;
        let want = xin[i] * gamma[ch] / s + beta[ch];
        assert!(
            (out[i] - want).abs() < 1e-12,
            "element {i}: {} vs {want}",
            out[i]
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// gradients through max pooling
// ---------------------------------------------------------------------------------------

/// Images that are zero except for a random square in the middle: convolutions give equal
/// values all over the flat border, so max-pool windows there hold ties. A window's max has
/// a derivative through one element; routing the gradient to every tied element (or scaling
/// it) makes backprop disagree with finite differences.
#[test]
fn max_pool_gradient_with_ties_matches_central_differences() -> Result<()> {
    let (n, side) = (4, 16);
    let m = Model::build(&cnn(2, 8), [3, side, side], 10)?;
    let mut rng = StdRng::seed_from_u64(21);
    let mut img = vec![0.0f64; n * 3 * side * side];
    for i in 0..n * 3 {
        for r in 5..11 {
            for c in 5..11 {
                img[(i * side + r) * side + c] = StandardNormal.sample(&mut rng);
            }
        }
    }
    let x = Tensor::from_vec(img, (n, 3, side, side), &Device::Cpu)?;
    let y = labels(n, 10, 22)?;
    let (_, p) = init(&m, 23)?;
    let obj = ClassifierObjective::classifier(&m, x, y)?;
    let (_, g) = obj.loss_and_grad(&p)?.expect("classifier has a gradient");
    let truth = tensor_to_vec(&g)?;

    // Every parameter except conv biases (they feed batch norm: true gradient 0).
    let coords: Vec<usize> = m
        .layout
        .entries
        .iter()
        .filter(|e| e.kind != ParamKind::Bias || !e.name.starts_with("conv"))
        .flat_map(|e| e.range())
        .collect();
    let mut cge =
        Cge::new(1e-6, Difference::Central, QueryEngine::Naive)?.with_coords(coords.clone());
    let est = cge.estimate(&obj, &p, &mut StdRng::seed_from_u64(0))?;
    let est = tensor_to_vec(&est.grad)?;
    let a: Vec<f64> = coords.iter().map(|&i| est[i]).collect();
    let b: Vec<f64> = coords.iter().map(|&i| truth[i]).collect();
    let cos = cosine(&a, &b);
    let rel = rel_err(&a, &b);
    assert!(cos >= 0.9999, "cosine {cos}");
    assert!(rel <= 1e-4, "relative error {rel}");

    // conv1.weight on its own (the tensor whose gradient the tie bug corrupted).
    let e = &m.layout.entries[0];
    assert_eq!(e.name, "conv1.weight");
    let a: Vec<f64> = e.range().map(|i| est[i]).collect();
    let b: Vec<f64> = e.range().map(|i| truth[i]).collect();
    assert!(cosine(&a, &b) >= 0.9999, "conv1 cosine {}", cosine(&a, &b));
    Ok(())
}

/// Max pooling itself: the forward takes each window's maximum, and the gradient reaches
/// exactly one element per window (one holding the maximum), even when the window is all ties.
#[test]
fn max_pool_forward_and_gradient_on_ties() -> Result<()> {
    // conv1, bn1, relu1, pool1, gap, fc: feed the pool a hand-made register with ties.
    let m = Model::build(&cnn(1, 2), [1, 4, 4], 10)?;
    let pool = m
        .nodes
        .iter()
        .position(|n| matches!(n.op, Op::MaxPool(MaxPool(2))))
        .expect("pool node");
    let (_, p) = init(&m, 0)?;
    let views = m.param_views(&p)?;
    let x = gaussian_batch(1, [1, 4, 4], 1)?;
    let regs = m.forward_cached(&views, &x, Mode::Train, None)?;
    #[rustfmt::skip]
    let input: Vec<f64> = vec![
        // channel 0: window maxima 1, 2, 3, 5
        1.0, 1.0, 2.0, 0.0,
        1.0, 1.0, 2.0, 2.0,
        3.0, -1.0, 5.0, 5.0,
        0.0, 0.0, 5.0, 5.0,
        // channel 1: window maxima -2, 0, 7, 7
        -2.0, -2.0, 0.0, 0.0,
        -2.0, -2.0, 0.0, 0.0,
        7.0, 7.0, 7.0, 7.0,
        7.0, 7.0, 7.0, 7.0,
    ];
    let var = candle_core::Var::from_vec(input.clone(), (1, 2, 4, 4), &Device::Cpu)?;
    let mut cache: Vec<Tensor> = regs[..pool].to_vec();
    cache.push(var.as_tensor().clone());
    // Resuming at the pool with an entry it never reads is a plain forward from the pool on.
    let logits = m.resume(&views, &cache, pool, 0, &views[0])?;
    let (fc_w, fc_b) = (m.layout.entries.len() - 2, m.layout.entries.len() - 1);
    assert_eq!(m.layout.entries[fc_w].name, "fc.weight");
    let w = tensor_to_vec(&views[fc_w].flatten_all()?)?; // [10, 2]
    let b = tensor_to_vec(&views[fc_b])?;
    // Global average of the window maxima: 11/4 and 12/4.
    let gap = [11.0 / 4.0, 12.0 / 4.0];
    let got = tensor_to_vec(&logits)?;
    for k in 0..10 {
        let want = w[2 * k] * gap[0] + w[2 * k + 1] * gap[1] + b[k];
        assert!(
            (got[k] - want).abs() < 1e-12,
            "logit {k}: {} vs {want}",
            got[k]
        );
    }
    // d(Σ logits)/d(window max of channel c) = Σ_k W[k, c] / 4.
    let grads = logits.sum_all()?.backward()?;
    let gin = tensor_to_vec(grads.get(var.as_tensor()).expect("gradient of the input"))?;
    for ch in 0..2 {
        let per_window: f64 = (0..10).map(|k| w[k * 2 + ch]).sum::<f64>() / 4.0;
        for (wr, wc) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
            let idx: Vec<usize> = (0..2)
                .flat_map(|dr| (0..2).map(move |dc| ch * 16 + (2 * wr + dr) * 4 + 2 * wc + dc))
                .collect();
            let gs: Vec<f64> = idx.iter().map(|&i| gin[i]).collect();
            let hits: Vec<usize> = idx.iter().copied().filter(|&i| gin[i] != 0.0).collect();
            assert_eq!(hits.len(), 1, "channel {ch} window ({wr},{wc}): {gs:?}");
            let total: f64 = gs.iter().sum();
            assert!(
                (total - per_window).abs() < 1e-12,
                "channel {ch} window ({wr},{wc}): {total} vs {per_window}"
            );
            let max = idx.iter().map(|&i| input[i]).fold(f64::MIN, f64::max);
            assert_eq!(
                input[hits[0]], max,
                "gradient went to a non-maximal element"
            );
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// resumed forwards (feature reuse)
// ---------------------------------------------------------------------------------------

fn check_resume(spec: ModelSpec, shape: [usize; 3], n: usize) -> Result<()> {
    let m = Model::build(&spec, shape, 10)?;
    let (pv, p) = with_random_bn(&m, 31)?;
    let views = m.param_views(&p)?;
    let x = gaussian_batch(n, shape, 32)?;
    let cache = m.forward_cached(&views, &x, Mode::Train, None)?;
    let logits = tensor_to_vec(cache.last().expect("output"))?;
    let full = tensor_to_vec(&m.forward(&views, &x, Mode::Train)?)?;
    assert_eq!(logits, full, "{}: forward_cached vs forward", m.name);
    for (e, entry) in m.layout.entries.iter().enumerate() {
        // Same tensor: bit-identical logits.
        let r = m.resume(&views, &cache, entry.node, e, &views[e])?;
        assert_eq!(
            tensor_to_vec(&r)?,
            logits,
            "{}: resume at {}",
            m.name,
            entry.name
        );
        // Changed tensor: the same logits as a full forward with the changed parameters.
        let mut changed = pv.clone();
        changed[entry.range()].iter_mut().for_each(|v| *v += 0.01);
        let pc = params_tensor(&changed, Precision::F64, &Device::Cpu)?;
        let want = tensor_to_vec(&m.forward(&m.param_views(&pc)?, &x, Mode::Train)?)?;
        let value = m.param_views(&pc)?[e].clone();
        let got = tensor_to_vec(&m.resume(&views, &cache, entry.node, e, &value)?)?;
        let diff = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(diff <= 1e-12, "{}: {} changed: {diff}", m.name, entry.name);
        assert!(
            got.iter().zip(&logits).any(|(a, b)| a != b),
            "{}: changing {} did not change the logits",
            m.name,
            entry.name
        );
    }
    Ok(())
}

#[test]
fn resume_matches_forward_mlp() -> Result<()> {
    check_resume(mlp(&[12, 6]), [1, 5, 5], 4)
}

#[test]
fn resume_matches_forward_cnn() -> Result<()> {
    check_resume(cnn(2, 5), [3, 12, 12], 3)
}

#[test]
fn resume_matches_forward_resnet20() -> Result<()> {
    check_resume(ModelSpec::Resnet20, [3, 8, 8], 2)
}
