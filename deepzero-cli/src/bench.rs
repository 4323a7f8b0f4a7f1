//! `deepzero bench`: speed of the CGE engines and of the kernels, as ratios from one run.

use crate::common::{build_model, load_data, set_threads, DataArg, DataOpts, ModelArg, ModelOpts};
use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use deepzero_core::estimator::{Cge, Difference, GradientEstimator};
use deepzero_core::fast::backprop;
use deepzero_core::fast::conv_grad;
use deepzero_core::fast::kernels::{self, Act};
use deepzero_core::fast::simd::{self, Isa};
use deepzero_core::fast::{append_batch_major, step_cost, Engine};
use deepzero_core::head::Head;
use deepzero_core::model::{circular_pad, params_tensor, tensor_to_vec, Model, Padding, Precision};
use deepzero_core::objective::{ClassifierObjective, Objective};
use deepzero_core::query::QueryEngine;
use deepzero_core::trainer::batch_tensors;
use rand::seq::index::sample;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use serde::Serialize;
use std::time::Instant;

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Seconds per CGE query of the naive, reuse and fast engines on the same coordinates.
    Cge(CgeBenchArgs),
    /// Throughput of the convolution and linear kernels per layer shape vs the matmul rate.
    Kernels(KernelBenchArgs),
    /// Seconds per first-order step (loss and gradient by backprop) on our kernels vs candle
    /// autograd, same parameters and batch.
    Fo(FoBenchArgs),
    /// Threaded speedup of CGE on a black-box objective (no layer graph) of a given query cost.
    Objective(crate::bench_objective::ObjectiveBenchArgs),
    /// Seconds to certify one image (n0 + n samples) vs the same number of forward passes.
    Certify(crate::bench_certify::CertifyBenchArgs),
    /// A sparse-CGE step shared over MPI ranks (one thread each) vs one rank: compute time per
    /// rank, load imbalance, bytes exchanged, speedup; and a projection to many ranks.
    Distributed(Box<crate::bench_distributed::DistributedBenchArgs>),
}

/// The network and batch a step-level bench runs on (`bench cge`, `bench distributed`).
#[derive(Args, Debug)]
pub struct BenchModelArgs {
    /// Architecture.
    #[arg(long, value_enum, default_value_t = ModelArg::Resnet20)]
    pub model: ModelArg,
    /// CNN blocks or MLP hidden layers.
    #[arg(long)]
    pub depth: Option<usize>,
    /// CNN channels or MLP hidden units.
    #[arg(long)]
    pub width: Option<usize>,
    /// Data set whose image shape to use [default: synthetic 3×32×32 for resnet20, fashion-mnist otherwise].
    #[arg(long, value_enum)]
    pub dataset: Option<DataArg>,
    /// Batch size.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
}

impl BenchModelArgs {
    /// The model and the images it reads (see [`model_for`]).
    pub fn build(&self, seed: u64) -> Result<(Model, deepzero_core::data::Dataset)> {
        model_for(self.model, self.depth, self.width, self.dataset, seed)
    }

    /// The model, its seeded initial parameters and a seeded batch of `--batch` images (f32, on
    /// the CPU); `rng` is the batch's stream, left for what the bench draws next.
    pub(crate) fn seeded_batch(&self, seed: u64) -> Result<BenchBatch> {
        let (model, train) = self.build(seed)?;
        let init = deepzero_core::seed::initial_params(&model, seed);
        let mut rng = deepzero_core::seed::stream_rng(seed, &[3]);
        let idx = sample(&mut rng, train.len(), self.batch.min(train.len())).into_vec();
        let (x, y) = batch_tensors(
            &train,
            &idx,
            None,
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )?;
        Ok(BenchBatch {
            model,
            init,
            n: idx.len(),
            x,
            y,
            rng,
        })
    }
}

/// What [`BenchModelArgs::seeded_batch`] gives.
pub(crate) struct BenchBatch {
    pub model: Model,
    pub init: Vec<f64>,
    /// Images in the batch.
    pub n: usize,
    pub x: candle_core::Tensor,
    pub y: candle_core::Tensor,
    pub rng: rand::rngs::StdRng,
}

#[derive(Args, Debug)]
pub struct CgeBenchArgs {
    #[command(flatten)]
    pub net: BenchModelArgs,
    /// Coordinates, sampled uniformly over all parameters (so each layer in proportion to its size).
    #[arg(long, default_value_t = 2000)]
    pub coords: usize,
    /// Of those, how many the naive engine and the float64 reference also evaluate (uniform
    /// subset; both are slow). 0 = all.
    #[arg(long, default_value_t = 200)]
    pub check_coords: usize,
    /// Finite-difference step.
    #[arg(long, default_value_t = 5e-3)]
    pub mu: f64,
    /// Threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Instruction set of our kernels: avx512, avx2 or portable [default: the best this CPU runs].
    #[arg(long, value_parser = parse_isa)]
    pub isa: Option<Isa>,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct KernelBenchArgs {
    /// Architecture whose layer shapes to time.
    #[arg(long, value_enum, default_value_t = ModelArg::Resnet20)]
    pub model: ModelArg,
    /// Batch size.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Instruction set of our kernels: avx512, avx2 or portable [default: the best this CPU runs].
    #[arg(long, value_parser = parse_isa)]
    pub isa: Option<Isa>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

fn parse_isa(s: &str) -> std::result::Result<Isa, String> {
    s.parse()
}

/// Take `--isa`: refuse one this CPU cannot run.
pub(crate) fn use_isa(isa: Option<Isa>) -> Result<Isa> {
    simd::force(isa)
        .map_err(|e| anyhow::anyhow!("--isa: {e}; leave it out to use the best one"))?;
    Ok(simd::active())
}

/// Median seconds of one call of `f`, over 7 samples of at least 50 ms each (as many calls as
/// that takes, `min_reps` or more), after one warm-up call: first-touch page faults, cold
/// caches and timer granularity stay out of the figure.
pub(crate) fn median_seconds(min_reps: usize, mut f: impl FnMut()) -> f64 {
    let t = Instant::now();
    f();
    let first = t.elapsed().as_secs_f64();
    let reps = ((0.05 / first.max(1e-9)).ceil() as usize).clamp(min_reps.max(1), 10_000);
    let mut samples: Vec<f64> = (0..7)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..reps {
                f();
            }
            t.elapsed().as_secs_f64() / reps as f64
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    samples[3]
}

#[derive(Args, Debug)]
pub struct FoBenchArgs {
    #[command(flatten)]
    pub net: BenchModelArgs,
    /// Timed steps of each path (after one warm-up step).
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    /// Threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Instruction set of our kernels: avx512, avx2 or portable [default: the best this CPU runs].
    #[arg(long, value_parser = parse_isa)]
    pub isa: Option<Isa>,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Output of `bench fo`.
#[derive(Serialize, Debug)]
pub struct FoBench {
    pub model: String,
    pub params: usize,
    pub batch: usize,
    pub threads: usize,
    pub steps: usize,
    pub ours_seconds_per_step: f64,
    pub candle_seconds_per_step: f64,
    pub speedup_vs_candle: f64,
    pub ours_gflops: f64,
    /// Relative L2 distance of the two f32 gradients.
    pub grad_rel_diff: f64,
    /// Of ours, and of candle's, from candle's float64 gradient.
    pub ours_rel_diff_f64: f64,
    pub candle_rel_diff_f64: f64,
    /// ReLU inputs whose sign differs from the float64 forward's, in our f32 forward and in
    /// candle's: each such flip changes that position's derivative from 0 to 1 (or back), and
    /// one flip moves the whole gradient by ≈1e-4 to 1e-3 relative, far more than rounding in
    /// the sums does. Where both counts are 0, the two distances above measure rounding alone.
    pub relu_flips_ours: usize,
    pub relu_flips_candle: usize,
    pub loss_ours: f64,
    pub loss_candle: f64,
    pub isa: String,
}

/// Output of `bench cge` (keys as the issue specifies).
#[derive(Serialize, Debug)]
pub struct CgeBench {
    pub model: String,
    pub params: usize,
    pub batch: usize,
    pub coords: usize,
    pub check_coords: usize,
    pub threads: usize,
    pub naive_seconds_per_query: f64,
    pub reuse_seconds_per_query: f64,
    pub fast_seconds_per_query: f64,
    pub speedup_vs_naive: f64,
    pub speedup_vs_reuse: f64,
    pub max_rel_diff: f64,
    pub fast_rel_diff: f64,
    pub model_speedup_vs_naive: f64,
    pub model_speedup_reuse_vs_naive: f64,
    pub effective_gflops: f64,
    /// The naive engine's full forward (the model's multiply-adds × 2 × batch per query).
    pub naive_gflops: f64,
    pub sgemm_gflops: f64,
    /// Instruction set of our kernels.
    pub isa: String,
}

pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Cge(a) => {
            let r = bench_cge(&a)?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!("{r:#?}");
            }
        }
        BenchCommand::Kernels(a) => bench_kernels(&a)?,
        BenchCommand::Fo(a) => {
            let r = bench_fo(&a)?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!("{r:#?}");
            }
        }
        BenchCommand::Objective(a) => crate::bench_objective::run(&a)?,
        BenchCommand::Certify(a) => crate::bench_certify::run(&a)?,
        BenchCommand::Distributed(a) => crate::bench_distributed::run(&a)?,
    }
    Ok(())
}

fn rel_l2(a: &[f64], b: &[f64]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}

pub(crate) fn model_for(
    model: ModelArg,
    depth: Option<usize>,
    width: Option<usize>,
    dataset: Option<DataArg>,
    seed: u64,
) -> Result<(Model, deepzero_core::data::Dataset)> {
    let ds = dataset.unwrap_or(if model == ModelArg::Resnet20 {
        DataArg::Synthetic
    } else {
        DataArg::FashionMnist
    });
    let opts = DataOpts {
        dataset: ds,
        data_dir: None,
        train_limit: None,
        test_limit: None,
    };
    let (train, _, _) = load_data(&opts, seed, false)?;
    let m = build_model(
        &ModelOpts {
            model,
            depth,
            width,
        },
        &train,
    )?;
    Ok((m, train))
}

pub fn bench_cge(a: &CgeBenchArgs) -> Result<CgeBench> {
    if a.net.batch == 0 || a.coords == 0 {
        bail!("--batch and --coords must be at least 1");
    }
    set_threads(a.threads);
    let isa = use_isa(a.isa)?;
    let threads = rayon::current_num_threads();
    // The batch and the coordinates: a stream of their own.
    let BenchBatch {
        model,
        init,
        n,
        x,
        y,
        mut rng,
    } = a.net.seeded_batch(a.seed)?;
    let d = model.num_params();
    let device = candle_core::Device::Cpu;
    let xh = x.flatten_all()?.to_vec1::<f32>()?;
    let yh = y.to_vec1::<u32>()?;
    let p32: Vec<f32> = init.iter().map(|&v| v as f32).collect();
    let mut coords = sample(&mut rng, d, a.coords.min(d)).into_vec();
    coords.sort_unstable();
    let mut check: Vec<usize> = if a.check_coords == 0 || a.check_coords >= coords.len() {
        coords.clone()
    } else {
        sample(&mut rng, coords.len(), a.check_coords)
            .into_iter()
            .map(|i| coords[i])
            .collect()
    };
    check.sort_unstable();

    let engine = Engine::new(&model, &p32, &xh, n, &Head::CrossEntropy(yh))?;
    let time = |cs: &[usize], mode: QueryEngine| -> Result<(Vec<f64>, f64)> {
        let t = Instant::now();
        let (g, q) = engine.cge(cs, a.mu, Difference::Forward, mode)?;
        Ok((g, t.elapsed().as_secs_f64() / q as f64))
    };
    let (fast_all, fast_s) = time(&coords, QueryEngine::Fast)?;
    let (_, reuse_s) = time(&coords, QueryEngine::Reuse)?;
    let (naive_g, naive_s) = time(&check, QueryEngine::Naive)?;
    let (reuse_g, _) = engine.cge(&check, a.mu, Difference::Forward, QueryEngine::Reuse)?;
    let (fast_g, _) = engine.cge(&check, a.mu, Difference::Forward, QueryEngine::Fast)?;

    // float64 reference: the candle model in f64 (reuse gives the naive numbers exactly).
    let p64 = params_tensor(&init, Precision::F64, &device)?;
    let obj = ClassifierObjective::classifier(&model, x.to_dtype(candle_core::DType::F64)?, y)?;
    let mut reference =
        Cge::new(a.mu, Difference::Forward, QueryEngine::Reuse)?.with_coords(check.clone());
    let g64 = tensor_to_vec(&reference.estimate(&obj, &p64, &mut rng)?.grad)?;
    let truth: Vec<f64> = check.iter().map(|&i| g64[i]).collect();
    let fast_rel = rel_l2(&fast_g, &truth);
    let max_rel = [rel_l2(&naive_g, &truth), rel_l2(&reuse_g, &truth), fast_rel]
        .into_iter()
        .fold(0.0, f64::max);

    // Cost model over the same coordinates.
    let (cn, cr, cf) = step_cost(&model, &coords)?;
    let flops_fast = 2.0 * cf * n as f64;
    let _ = fast_all;
    Ok(CgeBench {
        model: model.name.clone(),
        params: d,
        batch: n,
        coords: coords.len(),
        check_coords: check.len(),
        threads,
        naive_seconds_per_query: naive_s,
        reuse_seconds_per_query: reuse_s,
        fast_seconds_per_query: fast_s,
        speedup_vs_naive: naive_s / fast_s,
        speedup_vs_reuse: reuse_s / fast_s,
        max_rel_diff: max_rel,
        fast_rel_diff: fast_rel,
        model_speedup_vs_naive: cn / cf,
        model_speedup_reuse_vs_naive: cn / cr,
        effective_gflops: flops_fast / (fast_s * coords.len() as f64) / 1e9,
        naive_gflops: 2.0 * model.node_costs().iter().sum::<u64>() as f64 * n as f64
            / naive_s
            / 1e9,
        sgemm_gflops: sgemm_gflops(threads),
        isa: isa.name().into(),
    })
}

pub fn bench_fo(a: &FoBenchArgs) -> Result<FoBench> {
    if a.net.batch == 0 || a.steps == 0 {
        bail!("--batch and --steps must be at least 1");
    }
    set_threads(a.threads);
    let isa = use_isa(a.isa)?;
    let threads = rayon::current_num_threads();
    let BenchBatch {
        model,
        init,
        n,
        x,
        y,
        ..
    } = a.net.seeded_batch(a.seed)?;
    let device = candle_core::Device::Cpu;
    let flips = relu_flips(&model, &init, &x, n)?;
    let (obj_x64, y64) = (x.to_dtype(candle_core::DType::F64)?, y.clone());
    let obj = ClassifierObjective::classifier(&model, x, y)?;
    let params = params_tensor(&init, Precision::F32, &device)?;
    // One warm-up step, then `steps` timed ones; the last step's loss and gradient are kept.
    let time =
        |step: &dyn Fn() -> Result<(f64, candle_core::Tensor)>| -> Result<(f64, f64, Vec<f64>)> {
            step()?;
            let t = Instant::now();
            let mut last = None;
            for _ in 0..a.steps {
                last = Some(step()?);
            }
            let seconds = t.elapsed().as_secs_f64() / a.steps as f64;
            let (loss, g) = last.expect("at least one step");
            Ok((seconds, loss, tensor_to_vec(&g)?))
        };
    let (ours_s, loss_ours, g_ours) = time(&|| {
        obj.loss_and_grad(&params)?
            .ok_or_else(|| anyhow::anyhow!("the classifier objective has a gradient"))
    })?;
    let (candle_s, loss_candle, g_candle) = time(&|| Ok(obj.candle_loss_and_grad(&params)?))?;
    // float64 reference: which of the two f32 gradients is nearer the exact one.
    let obj64 = ClassifierObjective::classifier(&model, obj_x64, y64)?;
    let (_, g64) = obj64.candle_loss_and_grad(&params_tensor(&init, Precision::F64, &device)?)?;
    let g64 = tensor_to_vec(&g64)?;
    let flops = backprop::step_flops(&model, n);
    Ok(FoBench {
        model: model.name.clone(),
        params: model.num_params(),
        batch: n,
        threads,
        steps: a.steps,
        ours_seconds_per_step: ours_s,
        candle_seconds_per_step: candle_s,
        speedup_vs_candle: candle_s / ours_s,
        ours_gflops: flops / ours_s / 1e9,
        grad_rel_diff: rel_l2(&g_ours, &g_candle),
        ours_rel_diff_f64: rel_l2(&g_ours, &g64),
        candle_rel_diff_f64: rel_l2(&g_candle, &g64),
        relu_flips_ours: flips.0,
        relu_flips_candle: flips.1,
        loss_ours,
        loss_candle,
        isa: isa.name().into(),
    })
}

/// ReLU inputs (over every ReLU node of a train-mode forward) whose sign differs from the
/// float64 forward's: `(our f32 forward, candle's f32 forward)`.
fn relu_flips(
    model: &Model,
    init: &[f64],
    x: &candle_core::Tensor,
    n: usize,
) -> Result<(usize, usize)> {
    use deepzero_core::model::{Mode, Op};
    let device = candle_core::Device::Cpu;
    let candle_regs = |precision: Precision| -> Result<Vec<Vec<f64>>> {
        let p = params_tensor(init, precision, &device)?;
        let xs = x.to_dtype(p.dtype())?;
        let regs = model.forward_cached(&model.param_views(&p)?, &xs, Mode::Train, None)?;
        regs.iter()
            .map(|r| {
                Ok(r.flatten_all()?
                    .to_dtype(candle_core::DType::F64)?
                    .to_vec1()?)
            })
            .collect()
    };
    let (r64, r32) = (candle_regs(Precision::F64)?, candle_regs(Precision::F32)?);
    let p32: Vec<f32> = init.iter().map(|&v| v as f32).collect();
    let xh: Vec<f32> = x.flatten_all()?.to_vec1()?;
    let trace = backprop::Trace::forward(model, &p32, &xh, n)?;
    let mut ours = Vec::new();
    let (mut flips_ours, mut flips_candle) = (0, 0);
    for node in &model.nodes {
        if !matches!(node.op, Op::Relu(_)) {
            continue;
        }
        let r = node.inputs[0];
        ours.clear();
        append_batch_major(&trace.registers()[r], &mut ours);
        let differs = |a: f64, b: f64| (a >= 0.0) != (b >= 0.0);
        flips_ours += ours
            .iter()
            .zip(&r64[r])
            .filter(|(&a, &b)| differs(a, b))
            .count();
        flips_candle += r32[r]
            .iter()
            .zip(&r64[r])
            .filter(|(&a, &b)| differs(a, b))
            .count();
    }
    Ok((flips_ours, flips_candle))
}

/// Matrix-multiply rate of the machine as the engines use it: one single-threaded 512³ f32
/// product per thread, all threads at once; the faster of the `gemm` crate (candle's kernels)
/// and our own micro-kernels, so that ratios against it are not flattered by a slow reference.
pub fn sgemm_gflops(threads: usize) -> f64 {
    let n = 512;
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let a: Vec<f32> = (0..n * n).map(|_| rng.random::<f32>()).collect();
    let b: Vec<f32> = (0..n * n).map(|_| rng.random::<f32>()).collect();
    let flops = 2.0 * (n * n * n) as f64 * threads as f64;
    let crate_s = median_seconds(2, || {
        (0..threads).into_par_iter().for_each(|_| {
            let mut c = vec![0.0f32; n * n];
            kernels::sgemm(n, n, n, &a, n, &b, n, &mut c, n, false);
            std::hint::black_box(&c);
        })
    });
    let ours_s = median_seconds(2, || {
        (0..threads).into_par_iter().for_each(|_| {
            let mut c = vec![0.0f32; n * n];
            kernels::sgemm_tiled(n, n, n, &a, &b, &mut c);
            std::hint::black_box(&c);
        })
    });
    flops / crate_s.min(ours_s) / 1e9
}

#[derive(Serialize, Debug)]
struct KernelRow {
    layer: String,
    shape: String,
    /// Forward.
    ours_gflops: f64,
    candle_gflops: f64,
    /// Backward: the weight gradient.
    ours_weight_grad_gflops: f64,
    /// Backward: the input gradient.
    ours_input_grad_gflops: f64,
    /// The sgemm rate measured right before this row's kernels (its ratios divide by it).
    sgemm_gflops: f64,
}

fn bench_kernels(a: &KernelBenchArgs) -> Result<()> {
    set_threads(a.threads);
    let isa = use_isa(a.isa)?;
    let threads = rayon::current_num_threads();
    let (model, _) = model_for(a.model, None, None, None, 0)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let mut rows = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for layer in model.conv_layers() {
        let (ci, co, kk, stride, padding) = (
            layer.in_channels,
            layer.out_channels,
            layer.kernel,
            layer.stride,
            layer.padding,
        );
        let (h, w) = (layer.height, layer.width);
        let circular = layer.padding_mode == Padding::Circular;
        let key = format!(
            "{ci}->{co} k{kk} s{stride} {h}x{w}{}",
            if circular { " circ" } else { "" }
        );
        if !seen.insert(key.clone()) {
            continue;
        }
        let x: Vec<f32> = (0..a.batch * ci * h * w)
            .map(|_| rng.random::<f32>())
            .collect();
        let wt: Vec<f32> = (0..co * ci * kk * kk)
            .map(|_| rng.random::<f32>())
            .collect();
        let act = Act::from_nchw(&x, a.batch, ci, h, w);
        let flops = 2.0 * layer.cost as f64 * a.batch as f64;
        // The reference rate next to each row: the machine's speed drifts within a run.
        let sgemm = sgemm_gflops(threads);
        // ours: one conv per thread at once (as queries run).
        let ours_s = median_seconds(2, || {
            (0..threads).into_par_iter().for_each(|_| {
                std::hint::black_box(kernels::conv(
                    &act, &wt, co, None, kk, stride, padding, circular,
                ));
            })
        });
        let ours = flops * threads as f64 / ours_s / 1e9;
        let g = kernels::ConvGeom::new(kk, stride, padding, circular, h, w);
        let dy: Vec<f32> = (0..co * a.batch * g.oh * g.ow)
            .map(|_| rng.random::<f32>() - 0.5)
            .collect();
        let planes: Vec<&[f32]> = (0..ci).map(|c| act.plane(c)).collect();
        let wgrad_s = median_seconds(2, || {
            (0..threads).into_par_iter().for_each(|_| {
                let dys: Vec<&[f32]> = dy.chunks_exact(a.batch * g.oh * g.ow).collect();
                std::hint::black_box(kernels::conv_weight_grad(&planes, a.batch, &g, &dys));
            })
        });
        let wgrad = flops * threads as f64 / wgrad_s / 1e9;
        let dya = Act {
            c: co,
            n: a.batch,
            h: g.oh,
            w: g.ow,
            data: dy.clone(),
        };
        let xgrad_s = median_seconds(2, || {
            (0..threads).into_par_iter().for_each(|_| {
                std::hint::black_box(conv_grad::conv_backward_data(&dya, &wt, ci, &g));
            })
        });
        let xgrad = flops * threads as f64 / xgrad_s / 1e9;
        let dev = candle_core::Device::Cpu;
        let mut xt = candle_core::Tensor::from_vec(x.clone(), (a.batch, ci, h, w), &dev)?;
        let mut pad = padding;
        if circular {
            xt = circular_pad(&xt, padding)?;
            pad = 0;
        }
        let wtt = candle_core::Tensor::from_vec(wt.clone(), (co, ci, kk, kk), &dev)?;
        let candle_s = median_seconds(1, || {
            std::hint::black_box(xt.conv2d(&wtt, pad, stride, 1, 1).expect("candle conv2d"));
        });
        let candle = flops / candle_s / 1e9;
        rows.push(KernelRow {
            layer: layer.name.clone(),
            shape: key,
            ours_gflops: ours,
            candle_gflops: candle,
            ours_weight_grad_gflops: wgrad,
            ours_input_grad_gflops: xgrad,
            sgemm_gflops: sgemm,
        });
    }
    let mut rates: Vec<f64> = rows.iter().map(|r| r.sgemm_gflops).collect();
    rates.sort_by(f64::total_cmp);
    let sgemm = rates.get(rates.len() / 2).copied().unwrap_or(0.0);
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"threads": threads, "isa": isa.name(), "sgemm_gflops": sgemm, "layers": rows})
            )?
        );
    } else {
        println!(
            "threads {threads}, kernels {}, sgemm {sgemm:.1} GFLOP/s (512³ per thread; median of the rows' own measurements)",
            isa.name()
        );
        println!(
            "GFLOP/s per layer (fwd: forward, dW: weight gradient, dX: input gradient), and as a fraction of sgemm"
        );
        println!(
            "{:<16} {:<22} {:>7} {:>7} {:>7} {:>7} {:>9} {:>8} {:>8}",
            "layer", "shape", "fwd", "dW", "dX", "candle", "fwd/sgemm", "dW/sgemm", "dX/sgemm"
        );
        for r in &rows {
            println!(
                "{:<16} {:<22} {:>7.1} {:>7.1} {:>7.1} {:>7.1} {:>9.2} {:>8.2} {:>8.2}",
                r.layer,
                r.shape,
                r.ours_gflops,
                r.ours_weight_grad_gflops,
                r.ours_input_grad_gflops,
                r.candle_gflops,
                r.ours_gflops / r.sgemm_gflops,
                r.ours_weight_grad_gflops / r.sgemm_gflops,
                r.ours_input_grad_gflops / r.sgemm_gflops
            );
        }
    }
    Ok(())
}
