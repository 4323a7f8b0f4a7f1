//! Backprop on our f32 kernels against candle autograd in f64: loss, gradient and the recorded
//! batch-norm statistics, for every model the project builds; the convolution gradient
//! primitives against their definition; the gradient does not depend on the thread count.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use deepzero_core::fast::backprop;
use deepzero_core::fast::conv_grad::{conv_backward_data, conv_backward_weight};
use deepzero_core::fast::kernels::{Act, ConvGeom};
use deepzero_core::head::Head;
use deepzero_core::layout::Init;
use deepzero_core::model::{
    params_tensor, tensor_to_vec, Activation, BnBatchStats, ConvSpec, GraphBuilder, Model,
    ModelSpec, Padding, Precision,
};
use deepzero_core::objective::{ModelObjective, Objective};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn rel_l2(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}

/// Which head a check uses.
#[derive(Clone, Copy, Debug)]
enum HeadKind {
    CrossEntropy,
    SquaredError,
}

/// Initial parameters, then noise on every entry not marked zero-initialised (biases and
/// batch-norm scales away from their trivial starting values).
fn params_for(model: &Model, rng: &mut StdRng) -> Vec<f64> {
    let mut p = model.init_params(rng);
    for e in &model.layout.entries {
        if e.init == Init::Zeros {
            continue;
        }
        for v in &mut p[e.range()] {
            *v += 0.2 * (rng.random::<f64>() - 0.5);
        }
    }
    p
}

fn head_for(kind: HeadKind, model: &Model, batch: usize, rng: &mut StdRng) -> Head {
    match kind {
        HeadKind::CrossEntropy => {
            let k = model.num_classes().expect("a classifier") as u32;
            Head::CrossEntropy((0..batch).map(|_| rng.random_range(0..k)).collect())
        }
        HeadKind::SquaredError => Head::squared_error(
            (0..batch * model.output_len())
                .map(|_| rng.random::<f64>() - 0.5)
                .collect(),
        ),
    }
}

fn check_stats(ours: &BnBatchStats, reference: &BnBatchStats, what: &str) {
    assert_eq!(ours.stats.len(), reference.stats.len(), "{what}: BN nodes");
    for (k, ((m, v, n), (rm, rv, rn))) in ours.stats.iter().zip(&reference.stats).enumerate() {
        assert_eq!(n, rn, "{what}: count of BN node {k}");
        assert_eq!((m.len(), v.len()), (rm.len(), rv.len()), "{what}: channels");
        for c in 0..m.len() {
            assert!(
                (m[c] - rm[c]).abs() <= 1e-5 * (1.0 + rm[c].abs()),
                "{what}: BN node {k} channel {c} mean {} vs {}",
                m[c],
                rm[c]
            );
            assert!(
                (v[c] - rv[c]).abs() <= 1e-4 * rv[c].abs() + 1e-9,
                "{what}: BN node {k} channel {c} variance {} vs {}",
                v[c],
                rv[c]
            );
        }
    }
}

/// Loss, gradient and BN statistics of our path (through `ModelObjective::loss_and_grad` with
/// f32 parameters) against candle autograd in f64.
fn check_model(model: &Model, batch: usize, kind: HeadKind, seed: u64) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(seed);
    let init = params_for(model, &mut rng);
    let [c, h, w] = model.input_shape;
    let x: Vec<f32> = (0..batch * c * h * w)
        .map(|_| rng.random::<f32>() * 2.0 - 1.0)
        .collect();
    let head = head_for(kind, model, batch, &mut rng);
    let dev = Device::Cpu;
    let xt = Tensor::from_vec(x, (batch, c, h, w), &dev)?;

    let reference = ModelObjective::new(model, xt.to_dtype(DType::F64)?, head.clone())?;
    let (loss64, g64) = reference
        .loss_and_grad(&params_tensor(&init, Precision::F64, &dev)?)?
        .expect("a gradient");
    let g64 = tensor_to_vec(&g64)?;
    let stats64 = reference.take_bn_stats().expect("BN statistics recorded");

    let ours = ModelObjective::new(model, xt, head)?;
    let (loss, g) = ours
        .loss_and_grad(&params_tensor(&init, Precision::F32, &dev)?)?
        .expect("a gradient");
    assert_eq!(g.dtype(), DType::F32);
    let g = tensor_to_vec(&g)?;
    let stats = ours.take_bn_stats().expect("BN statistics recorded");

    let what = format!("{} ({kind:?}, batch {batch})", model.name);
    let r = rel_l2(&g, &g64);
    println!(
        "{what}: loss {loss:.6} vs {loss64:.6}, gradient rel L2 {r:.2e}, |g| {:.3e}",
        g64.iter().map(|v| v * v).sum::<f64>().sqrt()
    );
    assert!(
        (loss - loss64).abs() <= 1e-5 * (1.0 + loss64.abs()),
        "{what}: loss {loss} vs {loss64}"
    );
    assert!(r <= 1e-4, "{what}: gradient rel L2 {r:.2e}");
    // Every parameter tensor, not only the whole vector.
    for e in &model.layout.entries {
        let (a, b) = (&g[e.range()], &g64[e.range()]);
        let norm = b.iter().map(|v| v * v).sum::<f64>().sqrt();
        if norm > 1e-3 * g64.iter().map(|v| v * v).sum::<f64>().sqrt() {
            let re = rel_l2(a, b);
            assert!(re <= 1e-3, "{what}: {} rel L2 {re:.2e}", e.name);
        }
    }
    check_stats(&stats, &stats64, &what);
    Ok(())
}

#[test]
fn mlp() -> Result<()> {
    let model = Model::build(
        &ModelSpec::Mlp {
            hidden: vec![32, 16],
        },
        [1, 8, 8],
        10,
    )?;
    check_model(&model, 8, HeadKind::CrossEntropy, 1)?;
    check_model(&model, 8, HeadKind::SquaredError, 2)
}

#[test]
fn simple_cnn_depths_1_to_3() -> Result<()> {
    for depth in 1..=3 {
        let spec = ModelSpec::SimpleCnn { depth, width: 8 };
        let model = Model::build(&spec, [3, 16, 16], 10)?;
        check_model(&model, 6, HeadKind::CrossEntropy, 10 + depth as u64)?;
    }
    Ok(())
}

#[test]
fn resnet20() -> Result<()> {
    let model = Model::build(&ModelSpec::Resnet20, [3, 8, 8], 10)?;
    check_model(&model, 4, HeadKind::CrossEntropy, 20)?;
    let model = Model::build(&ModelSpec::Resnet20, [3, 16, 16], 10)?;
    check_model(&model, 4, HeadKind::CrossEntropy, 21)
}

#[test]
fn correction_nets_circular_padding_zero_last_layer() -> Result<()> {
    for activation in [Activation::Relu, Activation::Tanh] {
        let spec = ModelSpec::CorrectionCnn {
            width: 6,
            blocks: 1,
            kernel: 5,
            out_channels: 2,
            activation,
        };
        let model = Model::build_image(&spec, [3, 8, 8])?;
        check_model(&model, 4, HeadKind::SquaredError, 30)?;
    }
    // Circular padding with stride 2, kernels 1 and 3, no bias, batch norm, and a
    // zero-initialised last layer, built by hand.
    let mut b = GraphBuilder::new([2, 10, 10])?;
    let circ = |out, k| ConvSpec::new(out, k).padding(Padding::Circular);
    let x = b.conv("c1", GraphBuilder::INPUT, circ(5, 3))?;
    let x = b.tanh("t1", x)?;
    let y = b.conv("c2", x, circ(6, 3).stride(2).bias(false))?;
    let y = b.batch_norm("bn", y)?;
    let y = b.relu("r", y)?;
    let z = b.conv("c3", y, circ(6, 1))?;
    let s = b.add("add", z, y)?;
    let out = b.conv("out", s, circ(2, 5))?;
    b.zero_init(out)?;
    let model = b.finish("circular-stride2");
    check_model(&model, 5, HeadKind::SquaredError, 31)
}

#[test]
fn dncnn_residual_to_input() -> Result<()> {
    let spec = ModelSpec::Dncnn { depth: 4, width: 6 };
    let model = Model::build_image(&spec, [1, 8, 8])?;
    check_model(&model, 4, HeadKind::SquaredError, 40)
}

#[test]
fn pools_tanh_shortcut_and_both_heads() -> Result<()> {
    // MaxPool 3 and AvgPool 2 on sizes they do not divide, tanh, the option-A shortcut,
    // a zero-padded stride-2 5×5 convolution, flatten and two linear layers.
    let mut b = GraphBuilder::new([3, 11, 11])?;
    let x = b.conv("c1", GraphBuilder::INPUT, ConvSpec::new(4, 3))?;
    let x = b.tanh("t1", x)?;
    let x = b.max_pool("mp", x, 3)?; // 11 -> 3
    let x = b.conv("c2", x, ConvSpec::new(6, 5).stride(2).bias(false))?; // 3 -> 2
    let x = b.batch_norm("bn", x)?;
    let x = b.relu("r", x)?;
    let s = b.shortcut_a("sc", x, 1)?; // 6 -> 8 channels, 2 -> 1
    let f = b.flatten("flat", s)?;
    let f = b.linear("fc1", f, 12)?;
    let f = b.tanh("t2", f)?;
    b.linear("fc2", f, 5)?;
    let model = b.finish("pools-a");
    check_model(&model, 7, HeadKind::CrossEntropy, 50)?;
    check_model(&model, 7, HeadKind::SquaredError, 51)?;

    let mut b = GraphBuilder::new([2, 9, 9])?;
    let x = b.conv("c1", GraphBuilder::INPUT, ConvSpec::new(4, 3))?;
    let x = b.relu("r1", x)?;
    let x = b.avg_pool("ap", x, 2)?; // 9 -> 4
    let x = b.conv("c2", x, ConvSpec::new(4, 3))?;
    let x = b.max_pool("mp", x, 2)?; // 4 -> 2
    let x = b.global_avg_pool("gap", x)?;
    b.linear("fc", x, 3)?;
    let model = b.finish("pools-b");
    check_model(&model, 6, HeadKind::CrossEntropy, 52)
}

fn gradient_with_threads(threads: usize, model: &Model, batch: usize, seed: u64) -> Vec<f64> {
    let mut rng = StdRng::seed_from_u64(seed);
    let p: Vec<f32> = params_for(model, &mut rng)
        .iter()
        .map(|&v| v as f32)
        .collect();
    let [c, h, w] = model.input_shape;
    let x: Vec<f32> = (0..batch * c * h * w)
        .map(|_| rng.random::<f32>() * 2.0 - 1.0)
        .collect();
    let head = head_for(HeadKind::CrossEntropy, model, batch, &mut rng);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("a thread pool");
    pool.install(|| backprop::loss_and_grad(model, &p, &x, batch, &head))
        .expect("a gradient")
        .1
}

#[test]
fn gradient_does_not_depend_on_the_thread_count() -> Result<()> {
    // Batches large enough for several pieces of work per convolution.
    for (spec, shape, batch) in [
        (ModelSpec::Resnet20, [3, 16, 16], 20),
        (ModelSpec::SimpleCnn { depth: 2, width: 8 }, [1, 28, 28], 24),
        (ModelSpec::Mlp { hidden: vec![80] }, [1, 12, 12], 70),
    ] {
        let model = Model::build(&spec, shape, 10)?;
        let one = gradient_with_threads(1, &model, batch, 60);
        let two = gradient_with_threads(2, &model, batch, 60);
        let three = gradient_with_threads(3, &model, batch, 60);
        assert!(one.iter().any(|&v| v != 0.0));
        assert!(
            one.iter()
                .zip(&two)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{}: 1 and 2 threads differ",
            model.name
        );
        assert!(
            one.iter()
                .zip(&three)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{}: 1 and 3 threads differ",
            model.name
        );
    }
    Ok(())
}

/// Input index of output position `o` through tap `t` (`None` in zero padding).
fn source(o: usize, t: usize, stride: usize, pad: usize, size: usize, circ: bool) -> Option<usize> {
    let i = (o * stride + t) as isize - pad as isize;
    if circ {
        Some(i.rem_euclid(size as isize) as usize)
    } else if i >= 0 && (i as usize) < size {
        Some(i as usize)
    } else {
        None
    }
}

/// The definitions: `dW[o,c,i,j] = Σ dy[o,n,y,x] x[c,n,src(y,i),src(x,j)]` and its adjoint
/// `dx[c,n,src(y,i),src(x,j)] += Σ_o dy[o,n,y,x] W[o,c,i,j]`, in f64.
fn conv_grads_direct(x: &Act, w: &[f32], dy: &Act, g: &ConvGeom) -> (Vec<f64>, Vec<f64>) {
    let (ci, co, k) = (x.c, dy.c, g.k);
    let mut dw = vec![0.0f64; co * ci * k * k];
    let mut dx = vec![0.0f64; x.data.len()];
    for o in 0..co {
        for c in 0..ci {
            for i in 0..k {
                for j in 0..k {
                    let wi = ((o * ci + c) * k + i) * k + j;
                    for n in 0..x.n {
                        for oy in 0..g.oh {
                            let Some(iy) = source(oy, i, g.stride, g.pad, g.h, g.circular) else {
                                continue;
                            };
                            for ox in 0..g.ow {
                                let Some(ix) = source(ox, j, g.stride, g.pad, g.w, g.circular)
                                else {
                                    continue;
                                };
                                let d = dy.plane(o)[(n * g.oh + oy) * g.ow + ox] as f64;
                                let xi = c * x.plane_len() + (n * g.h + iy) * g.w + ix;
                                dw[wi] += d * x.data[xi] as f64;
                                dx[xi] += d * w[wi] as f64;
                            }
                        }
                    }
                }
            }
        }
    }
    (dw, dx)
}

#[test]
fn conv_gradients_match_the_definition() {
    let mut rng = StdRng::seed_from_u64(70);
    // (ci, co, h, w, k, stride, pad, circular, n): zero and circular padding, stride 1 and 2,
    // k 1/3/5, "same" and other paddings, odd sizes, a wrap further than one row, and enough
    // samples for several pieces.
    for &(ci, co, h, w, k, s, p, circ, n) in &[
        (3, 5, 7, 6, 3, 1, 1, false, 3),
        (3, 5, 7, 6, 3, 1, 1, true, 3),
        (4, 2, 8, 8, 3, 2, 1, false, 2),
        (4, 2, 8, 8, 3, 2, 1, true, 2),
        (4, 3, 9, 7, 3, 2, 1, true, 2),
        (2, 3, 5, 5, 1, 1, 0, false, 3),
        (2, 3, 6, 6, 1, 2, 0, true, 3),
        (3, 4, 6, 7, 5, 1, 2, false, 2),
        (6, 3, 4, 6, 5, 1, 2, true, 2),
        (2, 3, 9, 9, 5, 2, 2, true, 3),
        (2, 2, 7, 7, 5, 2, 0, false, 2),
        (2, 3, 20, 20, 3, 1, 1, true, 11),
        (2, 3, 20, 20, 3, 1, 1, false, 11),
        (3, 6, 20, 20, 3, 1, 1, true, 11),
        (3, 6, 20, 20, 5, 1, 2, false, 7),
        (3, 4, 7, 7, 3, 1, 0, false, 2),
        (4, 5, 8, 8, 5, 1, 1, true, 2),
        // Strided with zero padding and sides divisible by the stride (split by phase): k 1,
        // 3, 4, 5, stride 2 and 3, padding 0 (fewer outputs than phase positions) to 2, and a
        // batch of several pieces.
        (2, 3, 6, 6, 1, 2, 0, false, 3),
        (3, 4, 8, 6, 5, 2, 2, false, 3),
        (3, 2, 9, 9, 3, 3, 0, false, 2),
        (2, 2, 8, 8, 4, 2, 1, false, 2),
        (2, 3, 8, 8, 3, 2, 0, false, 2),
        (5, 4, 16, 16, 3, 2, 1, false, 20),
    ] {
        let g = ConvGeom::new(k, s, p, circ, h, w);
        let mut act = |c: usize, hh: usize, ww: usize| Act {
            c,
            n,
            h: hh,
            w: ww,
            data: (0..c * n * hh * ww)
                .map(|_| rng.random::<f32>() * 2.0 - 1.0)
                .collect(),
        };
        let x = act(ci, h, w);
        let dy = act(co, g.oh, g.ow);
        let wt: Vec<f32> = (0..co * ci * k * k)
            .map(|_| rng.random::<f32>() * 2.0 - 1.0)
            .collect();
        let (dw_want, dx_want) = conv_grads_direct(&x, &wt, &dy, &g);
        let dw = conv_backward_weight(&x, &dy, co, &g);
        let dx = conv_backward_data(&dy, &wt, ci, &g);
        assert_eq!((dx.c, dx.n, dx.h, dx.w), (ci, n, h, w));
        let what = format!("{ci}->{co} {h}x{w} k{k} s{s} p{p} circular {circ} n{n}");
        for (name, got, want) in [("dW", dw, dw_want), ("dx", dx.data.clone(), dx_want)] {
            assert_eq!(got.len(), want.len(), "{what}: {name} length");
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (*a as f64 - b).abs() <= 1e-4 * (1.0 + b.abs()),
                    "{what}: {name}[{i}] = {a} vs {b}"
                );
            }
        }
    }
}

/// Running batch-norm statistics away from 0 and 1: means in [−½, ½), variances in [½, 1½).
fn running_stats(model: &Model, rng: &mut StdRng) -> deepzero_core::model::BnState {
    let mut channels = |f: &dyn Fn(f64) -> f64| -> Vec<Vec<f64>> {
        model
            .bn_channels
            .iter()
            .map(|&c| (0..c).map(|_| f(rng.random::<f64>())).collect())
            .collect()
    };
    let mean = channels(&|u| u - 0.5);
    let var = channels(&|u| 0.5 + u);
    deepzero_core::model::BnState { mean, var }
}

/// The eval-mode forward on our kernels (batch norm with running statistics) against candle's
/// eval forward in f64, on models with batch norm, max pooling, stride 2 and shortcuts, with
/// running statistics away from 0 and 1; a state of the wrong shape is refused.
#[test]
fn eval_forward_matches_candle() -> Result<()> {
    use deepzero_core::fast::forward_eval;
    use deepzero_core::model::Mode;
    let mut rng = StdRng::seed_from_u64(90);
    for (model, n) in [
        (
            Model::build(
                &ModelSpec::SimpleCnn { depth: 2, width: 6 },
                [1, 12, 12],
                10,
            )?,
            37,
        ),
        (Model::build(&ModelSpec::Resnet20, [3, 8, 8], 10)?, 5),
    ] {
        let params = params_for(&model, &mut rng);
        let bn = running_stats(&model, &mut rng);
        let [c, h, w] = model.input_shape;
        let x: Vec<f32> = (0..n * c * h * w).map(|_| rng.random::<f32>()).collect();
        let p32: Vec<f32> = params.iter().map(|&v| v as f32).collect();
        let ours: Vec<f64> = forward_eval(&model, &p32, &bn, &x, n)?
            .into_iter()
            .map(f64::from)
            .collect();
        let dev = Device::Cpu;
        let p64 = params_tensor(
            &p32.iter().map(|&v| v as f64).collect::<Vec<_>>(),
            Precision::F64,
            &dev,
        )?;
        let xt = Tensor::from_slice(&x, (n, c, h, w), &dev)?.to_dtype(DType::F64)?;
        let want =
            tensor_to_vec(&model.forward(&model.param_views(&p64)?, &xt, Mode::Eval(&bn))?)?;
        let d = rel_l2(&ours, &want);
        assert!(
            d < 1e-5,
            "{}: eval forward {d:e} from candle f64",
            model.name
        );
        let mut short = bn.clone();
        short.mean[0].pop();
        assert!(forward_eval(&model, &p32, &short, &x, n).is_err());
    }
    Ok(())
}

/// An eval-mode trace (batch norm with fixed running statistics) gives the gradients of the
/// mean cross-entropy with respect to the input and the parameters that candle autograd gives
/// through its eval forward in f64.
#[test]
fn eval_trace_gradients_match_candle() -> Result<()> {
    use candle_core::Var;
    use deepzero_core::fast::append_batch_major;
    use deepzero_core::fast::backprop::{head_loss_and_grad, Trace};
    use deepzero_core::model::{per_sample_cross_entropy, Mode};
    let mut rng = StdRng::seed_from_u64(91);
    for (model, n) in [
        (
            Model::build(
                &ModelSpec::SimpleCnn { depth: 2, width: 5 },
                [1, 12, 12],
                10,
            )?,
            9,
        ),
        (Model::build(&ModelSpec::Resnet20, [3, 8, 8], 10)?, 3),
    ] {
        let params = params_for(&model, &mut rng);
        let bn = running_stats(&model, &mut rng);
        let [c, h, w] = model.input_shape;
        let x: Vec<f32> = (0..n * c * h * w).map(|_| rng.random::<f32>()).collect();
        let labels: Vec<u32> = (0..n).map(|i| (i % 10) as u32).collect();
        let p32: Vec<f32> = params.iter().map(|&v| v as f32).collect();
        let trace = Trace::forward_eval(&model, &p32, &bn, &x, n)?;
        let (loss, d) = head_loss_and_grad(&Head::CrossEntropy(labels.clone()), trace.output())?;
        let mut g = Vec::new();
        append_batch_major(&d, &mut g);
        let (dp, dx) = trace.backward_with_input(&g)?;
        assert!(trace.bn_batch_stats().stats.is_empty());

        let dev = Device::Cpu;
        let p64: Vec<f64> = p32.iter().map(|&v| v as f64).collect();
        let pv = Var::from_tensor(&params_tensor(&p64, Precision::F64, &dev)?)?;
        let xv =
            Var::from_tensor(&Tensor::from_slice(&x, (n, c, h, w), &dev)?.to_dtype(DType::F64)?)?;
        let logits = model.forward(
            &model.param_views(pv.as_tensor())?,
            xv.as_tensor(),
            Mode::Eval(&bn),
        )?;
        let y = Tensor::from_slice(&labels, n, &dev)?;
        let l = per_sample_cross_entropy(&logits, &y)?.mean_all()?;
        let grads = l.backward()?;
        let want_p = tensor_to_vec(grads.get(pv.as_tensor()).expect("parameter gradient"))?;
        let want_x = tensor_to_vec(grads.get(xv.as_tensor()).expect("input gradient"))?;
        let want_loss = l.to_scalar::<f64>()?;
        assert!(
            (loss - want_loss).abs() < 1e-5 * want_loss.abs().max(1.0),
            "{}: loss",
            model.name
        );
        let (ep, ex) = (rel_l2(&dp, &want_p), rel_l2(&dx, &want_x));
        assert!(
            ep < 1e-4 && ex < 1e-4,
            "{}: parameters {ep:e}, input {ex:e}",
            model.name
        );
    }
    Ok(())
}
