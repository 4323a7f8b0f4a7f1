//! Image-to-image models (DnCNN, the periodic correction CNN) and the layers they add
//! (circular convolution, tanh, subtraction, a residual to the input), through the fast engine
//! with an output head, against float64 references: the candle model in f64 with per-coordinate
//! finite differences and the same loss closure.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use deepzero_core::fast::Engine;
use deepzero_core::head::{cross_entropy_f64, Head};
use deepzero_core::model::{
    circular_pad, params_tensor, tensor_to_vec, Activation, ConvSpec, GraphBuilder, Mode, Model,
    ModelSpec, Padding, Precision,
};
use deepzero_core::query::{Difference, QueryEngine};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};
use std::sync::Arc;

fn rel_l2(a: &[f64], b: &[f64]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    (num / den).sqrt()
}

/// A per-sample loss of one output (`len` values) of sample `i`.
type SampleLoss = Arc<dyn Fn(usize, &[f64]) -> f64 + Send + Sync>;

/// The same loss as an output head: `queries` blocks of `n` outputs.
fn head_of(loss: &SampleLoss, n: usize, len: usize) -> Head {
    let loss = loss.clone();
    Head::output(move |outs, queries| {
        assert_eq!(outs.len(), queries * n * len);
        Ok(outs
            .chunks_exact(len)
            .enumerate()
            .map(|(r, o)| loss(r % n, o))
            .collect())
    })
}

/// Half the squared error against a fixed random target per sample.
fn squared_error(n: usize, len: usize, rng: &mut StdRng) -> SampleLoss {
    let target: Vec<f64> = (0..n * len).map(|_| rng.random::<f64>() - 0.5).collect();
    Arc::new(move |i, o| {
        o.iter()
            .zip(&target[i * len..(i + 1) * len])
            .map(|(a, b)| 0.5 * (a - b) * (a - b))
            .sum()
    })
}

/// Softmax cross-entropy of a fixed random linear map of the image to 10 scores, against a
/// fixed label per sample: a loss the estimators see only through its values.
fn linear_map_ce(n: usize, len: usize, rng: &mut StdRng) -> SampleLoss {
    let a: Vec<f64> = (0..10 * len)
        .map(|_| StandardNormal.sample(rng))
        .map(|v: f64| v / (len as f64).sqrt())
        .collect();
    let labels: Vec<usize> = (0..n).map(|_| rng.random_range(0..10)).collect();
    Arc::new(move |i, o| {
        let z: Vec<f64> = (0..10)
            .map(|k| {
                a[k * len..(k + 1) * len]
                    .iter()
                    .zip(o)
                    .map(|(w, v)| w * v)
                    .sum()
            })
            .collect();
        cross_entropy_f64(&z, labels[i])
    })
}

/// Mean loss of the candle float64 forward at `params`.
fn mean_loss_f64(model: &Model, params: &[f64], x: &Tensor, loss: &SampleLoss) -> Result<f64> {
    let p = params_tensor(params, Precision::F64, &Device::Cpu)?;
    let views = model.param_views(&p)?;
    let out = tensor_to_vec(&model.forward(&views, x, Mode::Train)?)?;
    let n = x.dim(0)?;
    let len = model.output_len();
    Ok(out
        .chunks_exact(len)
        .enumerate()
        .map(|(i, o)| loss(i, o))
        .sum::<f64>()
        / n as f64)
}

/// CGE in float64 through candle: per-coordinate finite differences of the mean loss.
fn reference_cge(
    model: &Model,
    params: &[f64],
    x: &Tensor,
    loss: &SampleLoss,
    coords: &[usize],
    mu: f64,
    difference: Difference,
) -> Result<Vec<f64>> {
    let base = mean_loss_f64(model, params, x, loss)?;
    let mut theta = params.to_vec();
    coords
        .iter()
        .map(|&i| {
            let mut at = |d: f64| -> Result<f64> {
                theta[i] = params[i] + d;
                let l = mean_loss_f64(model, &theta, x, loss);
                theta[i] = params[i];
                l
            };
            Ok(match difference {
                Difference::Forward => (at(mu)? - base) / mu,
                Difference::Central => (at(mu)? - at(-mu)?) / (2.0 * mu),
            })
        })
        .collect()
}

struct Case {
    model: Model,
    params: Vec<f64>,
    x: Vec<f32>,
    n: usize,
}

impl Case {
    fn new(model: Model, n: usize, seed: u64) -> Case {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut params = model.init_params(&mut rng);
        // Zero-initialised layers would make most gradients vanish: randomise them here.
        for e in &model.layout.entries {
            if e.init == deepzero_core::layout::Init::Zeros {
                for v in &mut params[e.range()] {
                    let z: f64 = StandardNormal.sample(&mut rng);
                    *v = 0.3 * z;
                }
            }
        }
        // Rounded to f32, so that the f32 engine and the f64 reference share the same point.
        let params = params.iter().map(|&v| v as f32 as f64).collect();
        let x = (0..n * model.input_shape.iter().product::<usize>())
            .map(|_| rng.random::<f32>() * 2.0 - 1.0)
            .collect();
        Case {
            model,
            params,
            x,
            n,
        }
    }
    fn x64(&self) -> Result<Tensor> {
        let [c, h, w] = self.model.input_shape;
        Ok(
            Tensor::from_vec(self.x.clone(), (self.n, c, h, w), &Device::Cpu)?
                .to_dtype(DType::F64)?,
        )
    }
    fn p32(&self) -> Vec<f32> {
        self.params.iter().map(|&v| v as f32).collect()
    }
    fn engine(&self, head: &Head) -> Result<Engine<'_>> {
        Ok(Engine::new(
            &self.model,
            &self.p32(),
            &self.x,
            self.n,
            head,
        )?)
    }

    /// CGE of every engine against the float64 reference over all coordinates; returns the
    /// relative L2 differences (naive, reuse, fast).
    fn check(
        &self,
        loss: &SampleLoss,
        mu: f64,
        difference: Difference,
        tol: [f64; 3],
    ) -> Result<[f64; 3]> {
        let coords: Vec<usize> = (0..self.model.num_params()).collect();
        let truth = reference_cge(
            &self.model,
            &self.params,
            &self.x64()?,
            loss,
            &coords,
            mu,
            difference,
        )?;
        let head = head_of(loss, self.n, self.model.output_len());
        let engine = self.engine(&head)?;
        let base = mean_loss_f64(&self.model, &self.params, &self.x64()?, loss)?;
        assert!(
            (engine.base_mean_loss() - base).abs() <= 1e-5 * base.abs().max(1.0),
            "{}: base loss {} vs f64 {base}",
            self.model.name,
            engine.base_mean_loss()
        );
        let mut out = [0.0; 3];
        for (k, mode) in [QueryEngine::Naive, QueryEngine::Reuse, QueryEngine::Fast]
            .into_iter()
            .enumerate()
        {
            let (g, q) = engine.cge(&coords, mu, difference, mode)?;
            assert_eq!(q, difference.queries_per_point() * coords.len() as u64);
            let r = rel_l2(&g, &truth);
            println!(
                "{} {mode:?} {difference:?} mu={mu:e}: rel L2 {r:.2e} over {} coords",
                self.model.name,
                coords.len()
            );
            assert!(
                r <= tol[k],
                "{} {mode:?} {difference:?}: relative L2 difference {r:.3e} > {:e}",
                self.model.name,
                tol[k]
            );
            out[k] = r;
        }
        Ok(out)
    }
}

/// Relative L2 tolerances (naive, reuse, fast); measured: ≤ 1.7e-4 and ≤ 1.7e-6.
const TOL: [f64; 3] = [1e-3, 1e-3, 1e-4];

/// Circular convolution (both paths of our kernels: few and many input channels), tanh.
fn circular_tanh_model() -> Result<Model> {
    let mut b = GraphBuilder::new([2, 6, 7])?;
    let circ = |out, k| ConvSpec::new(out, k).padding(Padding::Circular);
    let h = b.conv("conv1", GraphBuilder::INPUT, circ(5, 3))?;
    let h = b.tanh("tanh1", h)?;
    let h = b.conv("conv2", h, circ(4, 5))?;
    let h = b.tanh("tanh2", h)?;
    b.conv("conv3", h, circ(2, 3))?;
    Ok(b.finish("circ-tanh"))
}

/// Subtraction of two branches, batch norm, and a residual to the input.
fn sub_residual_model() -> Result<Model> {
    let mut b = GraphBuilder::new([2, 6, 6])?;
    let a = b.conv("a", GraphBuilder::INPUT, ConvSpec::new(4, 3))?;
    let a = b.relu("a.relu", a)?;
    let c = b.conv("c", GraphBuilder::INPUT, ConvSpec::new(4, 3).bias(false))?;
    let c = b.batch_norm("c.bn", c)?;
    let d = b.sub("a-c", a, c)?;
    let d = b.tanh("tanh", d)?;
    let e = b.sub("d-a", d, a)?;
    let y = b.conv("out", e, ConvSpec::new(2, 3))?;
    b.residual_to_input("residual", y)?;
    Ok(b.finish("sub-residual"))
}

#[test]
fn circular_conv_in_candle_and_on_our_kernels_matches_the_definition() -> Result<()> {
    let mut b = GraphBuilder::new([3, 5, 6])?;
    b.conv(
        "conv",
        GraphBuilder::INPUT,
        ConvSpec::new(4, 5).padding(Padding::Circular),
    )?;
    let model = b.finish("one-circular-conv");
    assert_eq!(model.output_shape, vec![4, 5, 6]);
    let case = Case::new(model, 2, 2);
    let (n, [c, h, w]) = (case.n, case.model.input_shape);
    let k = 5;
    let (wt, bias) = case.params.split_at(4 * c * k * k);
    // The definition: y[o, y, x] = b[o] + Σ W[o, c, i, j] x[c, (y + i − 2) mod h, (x + j − 2) mod w].
    let mut want = vec![0.0f64; n * 4 * h * w];
    for ni in 0..n {
        for o in 0..4 {
            for yy in 0..h {
                for xx in 0..w {
                    let mut acc = bias[o];
                    for ci in 0..c {
                        for i in 0..k {
                            for j in 0..k {
                                let sy = (yy + h + i - 2) % h;
                                let sx = (xx + 2 * w + j - 2) % w;
                                acc += wt[((o * c + ci) * k + i) * k + j]
                                    * case.x[((ni * c + ci) * h + sy) * w + sx] as f64;
                            }
                        }
                    }
                    want[((ni * 4 + o) * h + yy) * w + xx] = acc;
                }
            }
        }
    }
    // candle, float64.
    let p = params_tensor(&case.params, Precision::F64, &Device::Cpu)?;
    let views = case.model.param_views(&p)?;
    let got = tensor_to_vec(&case.model.forward(&views, &case.x64()?, Mode::Train)?)?;
    let err = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(err < 1e-12, "candle circular conv off by {err}");
    // The padding helper itself: wrapped rows and columns.
    let padded = tensor_to_vec(&circular_pad(&case.x64()?, 2)?)?;
    let (hp, wp) = (h + 4, w + 4);
    for (idx, v) in padded.iter().enumerate() {
        let (img, r, col) = (idx / (hp * wp), (idx / wp) % hp, idx % wp);
        let src = case.x[(img * h + (r + h - 2) % h) * w + (col + w - 2) % w] as f64;
        assert_eq!(
            *v, src,
            "circular_pad at image {img}, row {r}, column {col}"
        );
    }
    // Our kernels (through the engine's base forward), f32.
    let head = Head::output(move |o, q| Ok(vec![0.0; o.len() / (4 * 5 * 6) / q * q]));
    let engine = case.engine(&head)?;
    let ours = engine.logits();
    let err = ours
        .iter()
        .zip(&want)
        .map(|(a, b)| (*a as f64 - b).abs())
        .fold(0.0, f64::max);
    assert!(err < 1e-4, "our circular conv off by {err}");
    Ok(())
}

#[test]
fn circular_conv_and_tanh_cge_matches_f64() -> Result<()> {
    let case = Case::new(circular_tanh_model()?, 3, 3);
    let mut rng = StdRng::seed_from_u64(4);
    let loss = squared_error(case.n, case.model.output_len(), &mut rng);
    case.check(&loss, 5e-3, Difference::Forward, TOL)?;
    Ok(())
}

#[test]
fn subtract_and_residual_to_input_cge_matches_f64() -> Result<()> {
    let case = Case::new(sub_residual_model()?, 4, 5);
    let mut rng = StdRng::seed_from_u64(6);
    let loss = squared_error(case.n, case.model.output_len(), &mut rng);
    case.check(&loss, 5e-3, Difference::Forward, TOL)?;
    Ok(())
}

fn dncnn() -> Result<Model> {
    Ok(Model::build_image(
        &ModelSpec::Dncnn { depth: 4, width: 8 },
        [1, 8, 8],
    )?)
}

fn correction(activation: Activation) -> Result<Model> {
    Ok(Model::build_image(
        &ModelSpec::CorrectionCnn {
            width: 6,
            blocks: 2,
            kernel: 5,
            out_channels: 1,
            activation,
        },
        [2, 8, 8],
    )?)
}

/// The acceptance check: DnCNN (1×8×8, depth 4, width 8, batch 4) with an output head — softmax
/// cross-entropy of a fixed random linear map of the denoised image — over every coordinate,
/// forward differences with μ = 5e-3.
#[test]
fn dncnn_output_head_cge_matches_f64_forward() -> Result<()> {
    let case = Case::new(dncnn()?, 4, 7);
    assert_eq!(case.model.output_shape, vec![1, 8, 8]);
    assert!(case.model.num_params() >= 500);
    let mut rng = StdRng::seed_from_u64(8);
    let loss = linear_map_ce(case.n, case.model.output_len(), &mut rng);
    case.check(&loss, 5e-3, Difference::Forward, TOL)?;
    let loss = squared_error(case.n, case.model.output_len(), &mut rng);
    case.check(&loss, 5e-3, Difference::Forward, TOL)?;
    Ok(())
}

#[test]
fn dncnn_output_head_cge_matches_f64_central() -> Result<()> {
    let case = Case::new(dncnn()?, 4, 9);
    let mut rng = StdRng::seed_from_u64(10);
    let loss = linear_map_ce(case.n, case.model.output_len(), &mut rng);
    case.check(&loss, 5e-3, Difference::Central, TOL)?;
    Ok(())
}

#[test]
fn correction_cnn_cge_matches_f64() -> Result<()> {
    for (act, seed) in [(Activation::Tanh, 11), (Activation::Relu, 12)] {
        let case = Case::new(correction(act)?, 3, seed);
        let mut rng = StdRng::seed_from_u64(seed + 100);
        let loss = squared_error(case.n, case.model.output_len(), &mut rng);
        case.check(&loss, 5e-3, Difference::Forward, TOL)?;
    }
    Ok(())
}

#[test]
fn fresh_correction_cnn_outputs_exactly_zero() -> Result<()> {
    let model = correction(Activation::Tanh)?;
    assert_eq!(model.output_shape, vec![1, 8, 8]);
    assert_eq!(model.num_classes(), None);
    let mut rng = StdRng::seed_from_u64(13);
    let params = model.init_params(&mut rng);
    let x: Vec<f32> = (0..3 * 2 * 64).map(|_| rng.random::<f32>()).collect();
    let xt = Tensor::from_vec(x.clone(), (3, 2, 8, 8), &Device::Cpu)?;
    let p = params_tensor(&params, Precision::F32, &Device::Cpu)?;
    let out = tensor_to_vec(&model.forward(&model.param_views(&p)?, &xt, Mode::Train)?)?;
    assert!(
        out.iter().all(|&v| v == 0.0),
        "candle: fresh correction is not zero"
    );
    let p32: Vec<f32> = params.iter().map(|&v| v as f32).collect();
    let head = Head::output(|o, _| Ok(vec![0.0; o.len() / 64]));
    let engine = Engine::new(&model, &p32, &x, 3, &head)?;
    assert!(
        engine.logits().iter().all(|&v| v == 0.0),
        "engine: fresh correction is not zero"
    );
    // The rest of the network is initialised as usual.
    let nonzero = model
        .layout
        .entries
        .iter()
        .filter(|e| e.kind.is_weight() && params[e.range()].iter().any(|&v| v != 0.0))
        .count();
    assert_eq!(
        nonzero,
        model
            .layout
            .entries
            .iter()
            .filter(|e| e.kind.is_weight())
            .count()
            - 1
    );
    Ok(())
}

#[test]
fn output_head_cge_and_rge_do_not_depend_on_the_thread_count() -> Result<()> {
    let case = Case::new(dncnn()?, 4, 14);
    let mut rng = StdRng::seed_from_u64(15);
    let loss = linear_map_ce(case.n, case.model.output_len(), &mut rng);
    let head = head_of(&loss, case.n, case.model.output_len());
    let coords: Vec<usize> = (0..case.model.num_params()).step_by(3).collect();
    let seeds: Vec<u64> = (0..20).collect();
    let run = |threads: usize| -> Result<Vec<Vec<f64>>> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()?;
        pool.install(|| {
            let engine = case.engine(&head)?;
            let mut out = Vec::new();
            for mode in [QueryEngine::Fast, QueryEngine::Reuse] {
                for diff in [Difference::Forward, Difference::Central] {
                    out.push(engine.cge(&coords, 5e-3, diff, mode)?.0);
                }
            }
            out.push(
                engine
                    .rge(&seeds, 5e-3, Difference::Central, Default::default())?
                    .0,
            );
            Ok(out)
        })
    };
    let (one, two) = (run(1)?, run(2)?);
    for (a, b) in one.iter().zip(&two) {
        assert!(a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()));
    }
    Ok(())
}

/// An output head that computes cross-entropy gives what the closed-form cross-entropy head
/// gives (CGE fast and naive, RGE), on a classifier.
#[test]
fn output_head_with_cross_entropy_matches_the_cross_entropy_head() -> Result<()> {
    let model = Model::build(&ModelSpec::SimpleCnn { depth: 2, width: 4 }, [1, 8, 8], 10)?;
    let case = Case::new(model, 6, 16);
    let mut rng = StdRng::seed_from_u64(17);
    let labels: Vec<u32> = (0..case.n).map(|_| rng.random_range(0..10u32)).collect();
    let l = labels.clone();
    let loss: SampleLoss = Arc::new(move |i, o| cross_entropy_f64(o, l[i] as usize));
    let out_head = head_of(&loss, case.n, 10);
    let ce = case.engine(&Head::CrossEntropy(labels))?;
    let out = case.engine(&out_head)?;
    assert!((ce.base_mean_loss() - out.base_mean_loss()).abs() < 1e-12);
    let coords: Vec<usize> = (0..case.model.num_params()).collect();
    for mode in [QueryEngine::Fast, QueryEngine::Naive] {
        let (a, _) = ce.cge(&coords, 5e-3, Difference::Forward, mode)?;
        let (b, _) = out.cge(&coords, 5e-3, Difference::Forward, mode)?;
        let r = rel_l2(&b, &a);
        println!("CE head vs output head, {mode:?}: rel L2 {r:.2e}");
        assert!(r < 1e-4, "{mode:?}: {r:e}");
    }
    let seeds: Vec<u64> = (100..116).collect();
    let (a, qa) = ce.rge(&seeds, 5e-3, Difference::Forward, Default::default())?;
    let (b, qb) = out.rge(&seeds, 5e-3, Difference::Forward, Default::default())?;
    assert_eq!(qa, qb);
    let r = rel_l2(&b, &a);
    assert!(r < 1e-6, "rge: {r:e}");
    Ok(())
}

#[test]
fn image_models_reject_what_does_not_fit() {
    assert!(Model::build(&ModelSpec::Dncnn { depth: 4, width: 8 }, [1, 8, 8], 10).is_err());
    assert!(Model::build_image(&ModelSpec::Resnet20, [3, 32, 32]).is_err());
    assert!(Model::build_image(&ModelSpec::Dncnn { depth: 1, width: 8 }, [1, 8, 8]).is_err());
    let model = Model::build_image(&ModelSpec::Dncnn { depth: 3, width: 4 }, [1, 8, 8]).unwrap();
    // A cross-entropy head needs class scores.
    let p = vec![0.0f32; model.num_params()];
    let x = vec![0.0f32; 2 * 64];
    let e = Engine::new(&model, &p, &x, 2, &Head::CrossEntropy(vec![0, 1])).err();
    assert!(e.is_some_and(|e| e.to_string().contains("output head")));
    // Circular padding wider than the grid.
    let mut b = GraphBuilder::new([1, 2, 2]).unwrap();
    assert!(b
        .conv("c", 0, ConvSpec::new(1, 7).padding(Padding::Circular))
        .is_err());
}

/// The squared-error head: backprop's gradient equals central CGE in f64 (candle path), and the
/// fast engine in f32 agrees with it.
#[test]
fn squared_error_head_backprop_matches_cge() -> anyhow::Result<()> {
    use deepzero_core::estimator::{Backprop, Cge, Difference, GradientEstimator, QueryEngine};
    use deepzero_core::head::Head;
    use deepzero_core::model::{params_tensor, tensor_to_vec, Model, ModelSpec, Precision};
    use deepzero_core::objective::ModelObjective;
    use rand::{Rng, SeedableRng};
    let model = Model::build_image(&ModelSpec::Dncnn { depth: 3, width: 4 }, [1, 6, 6])?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let n = 3;
    let x: Vec<f64> = (0..n * 36).map(|_| rng.random::<f64>()).collect();
    let targets: Vec<f64> = (0..n * 36).map(|_| rng.random::<f64>()).collect();
    let init = deepzero_core::seed::initial_params(&model, 1);
    let dev = candle_core::Device::Cpu;
    let grad = |p: Precision, est: &mut dyn GradientEstimator| -> anyhow::Result<Vec<f64>> {
        let xt =
            candle_core::Tensor::from_vec(x.clone(), (n, 1, 6, 6), &dev)?.to_dtype(p.dtype())?;
        let obj = ModelObjective::new(&model, xt, Head::squared_error(targets.clone()))?;
        let params = params_tensor(&init, p, &dev)?;
        Ok(tensor_to_vec(
            &est.estimate(&obj, &params, &mut rng_of(0))?.grad,
        )?)
    };
    fn rng_of(s: u64) -> rand::rngs::StdRng {
        rand::rngs::StdRng::seed_from_u64(s)
    }
    let rel = |a: &[f64], b: &[f64]| {
        let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum();
        (num / b.iter().map(|y| y * y).sum::<f64>()).sqrt()
    };
    let truth = grad(Precision::F64, &mut Backprop)?;
    let cge64 = grad(
        Precision::F64,
        &mut Cge::new(1e-5, Difference::Central, QueryEngine::Naive)?,
    )?;
    let e64 = rel(&cge64, &truth);
    assert!(e64 < 1e-6, "f64 central CGE vs backprop: {e64}");
    let fast = grad(
        Precision::F32,
        &mut Cge::new(1e-3, Difference::Central, QueryEngine::Fast)?,
    )?;
    // f32 forwards: the base outputs carry f32 rounding, so agreement is at the 1e-2 level.
    let e32 = rel(&fast, &truth);
    assert!(e32 < 1e-2, "f32 fast CGE vs backprop: {e32}");
    Ok(())
}
