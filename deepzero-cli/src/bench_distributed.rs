//! `deepzero bench distributed`: a sparse-CGE step shared over ranks, against one rank, and a
//! projection of the step time to many ranks.
//!
//! Run it under `mpirun -np N … --distributed mpi` (alone it measures one rank). Every rank is
//! single-threaded, so N ranks on N cores compare fairly with one rank on one core. Rank 0 first
//! runs the whole step alone (the others wait), then all ranks run the same step shared; both
//! give bitwise the same gradient, which is checked.

use crate::common::{set_threads, DistributedOpts, ModelArg};
use anyhow::{bail, Context, Result};
use clap::Args;
use deepzero_core::distributed::{imbalance, split, QueryTiming};
use deepzero_core::estimator::{Cge, Difference, GradientEstimator, QueryEngine};
use deepzero_core::fast::{coordinate_costs, Engine};
use deepzero_core::head::Head;
use deepzero_core::model::{params_tensor, Model, Precision};
use deepzero_core::objective::ClassifierObjective;
use deepzero_core::sparsity::{CoordinateSampler, LayerRatios};
use rand::seq::index::sample;
use serde::Serialize;
use std::time::Instant;

#[derive(Args, Debug)]
pub struct DistributedBenchArgs {
    #[command(flatten)]
    pub net: crate::bench::BenchModelArgs,
    /// Fraction of each weight tensor left out of the step (uniform layer ratios; biases and
    /// batch-norm parameters dense, as in training).
    #[arg(long, default_value_t = 0.9)]
    pub sparsity: f64,
    /// Evaluate only this many of the step's coordinates, a uniform sample (0 = all).
    #[arg(long, default_value_t = 0)]
    pub coords: usize,
    /// Shared steps timed (one-rank steps: the same number).
    #[arg(long, default_value_t = 2)]
    pub steps: usize,
    /// Shared steps run first, untimed: the split's fit of the fixed part of a query
    /// (`QueryTiming`) learns from them, as in the first steps of a training run.
    #[arg(long, default_value_t = 1)]
    pub warmup_steps: usize,
    /// Seed of the parameters, the batch, the coordinate set and its sample.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Projection: batch size.
    #[arg(long, default_value_t = 256)]
    pub project_batch: usize,
    /// Projection: sparsity of the step (uniform layer ratios).
    #[arg(long, default_value_t = 0.9)]
    pub project_sparsity: f64,
    /// Projection: rank counts.
    #[arg(long, value_delimiter = ',', default_value = "1,8,16,32,64,128,256")]
    pub project_ranks: Vec<usize>,
    /// Projection: network bandwidth per rank, Gbit/s.
    #[arg(long, default_value_t = 10.0)]
    pub bandwidth_gbps: f64,
    /// Projection: latency per message, microseconds.
    #[arg(long, default_value_t = 50.0)]
    pub latency_us: f64,
    /// Projection: training images per epoch.
    #[arg(long, default_value_t = 50_000)]
    pub epoch_images: usize,
    #[command(flatten)]
    pub distributed: DistributedOpts,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// One shared step.
#[derive(Serialize, Debug)]
pub struct SharedStep {
    /// Per rank: the cost model's multiply-adds per sample of its share.
    pub cost_total: Vec<f64>,
    /// Wall seconds of the whole step on rank 0 (base forward, its queries, the exchange).
    pub seconds: f64,
    /// Per rank: wall seconds evaluating its queries.
    pub compute_seconds: Vec<f64>,
    /// Per rank: CPU seconds evaluating its queries (not counting time other programs took).
    pub cpu_seconds: Vec<f64>,
    /// Per rank: coordinates evaluated.
    pub coords: Vec<usize>,
    /// Per rank: the cost model's share of the step, in [0, 1].
    pub cost_share: Vec<f64>,
    /// Largest rank's CPU time over the mean: the balance of the split.
    pub imbalance: f64,
    /// Slowest rank's wall compute time over the mean (also counts other programs' load).
    pub wall_imbalance: f64,
    /// Payload bytes each rank sent plus received in the exchange.
    pub bytes: u64,
}

/// Projected step of the projection model at one rank count.
#[derive(Serialize, Debug)]
pub struct ProjectedStep {
    pub ranks: usize,
    pub compute_seconds: f64,
    pub base_seconds: f64,
    pub exchange_seconds: f64,
    pub step_seconds: f64,
    /// Modelled load imbalance of the cost-balanced split (max / mean cost).
    pub imbalance: f64,
    pub epoch_minutes: f64,
}

/// The projection and the assumptions it rests on.
#[derive(Serialize, Debug)]
pub struct Projection {
    pub model: String,
    pub batch: usize,
    pub sparsity: f64,
    pub coords_per_step: usize,
    /// Measured: multiply-adds of the cost model per second per rank (one core).
    pub madds_per_second: f64,
    /// Measured: fixed seconds per query at the projected batch (beyond its multiply-adds).
    pub query_overhead_seconds: f64,
    /// Measured: seconds of the base forward per sample (every rank runs it).
    pub base_seconds_per_sample: f64,
    pub bandwidth_gbps: f64,
    pub latency_us: f64,
    pub steps_per_epoch: usize,
    pub steps: Vec<ProjectedStep>,
}

#[derive(Serialize, Debug)]
pub struct DistributedBench {
    pub model: String,
    pub params: usize,
    pub batch: usize,
    pub sparsity: f64,
    /// Coordinates of the full sparse step, and of the timed sample.
    pub step_coords: usize,
    pub coords: usize,
    pub ranks: usize,
    /// Mean wall seconds of the step on rank 0 alone.
    pub one_rank_seconds: f64,
    pub shared: Vec<SharedStep>,
    /// One-rank seconds over the mean shared step's seconds.
    pub speedup: f64,
    /// Mean load imbalance (CPU time) over the shared steps.
    pub imbalance: f64,
    /// Mean wall-time imbalance over the shared steps.
    pub wall_imbalance: f64,
    /// Shared and one-rank gradients are bitwise identical.
    pub bitwise_identical: bool,
    /// Present for ResNet-20.
    pub projection: Option<Projection>,
}

pub fn run(a: &DistributedBenchArgs) -> Result<()> {
    // One thread per rank (before anything starts the thread pool).
    set_threads(1);
    let ranks = a.distributed.connect()?;
    let result = bench(a, &ranks);
    let r = ranks.finish(result)?;
    if let Some(r) = r {
        if a.json {
            println!("{}", serde_json::to_string_pretty(&r)?);
        } else {
            print_table(&r);
        }
    }
    Ok(())
}

/// The step's coordinates: the sparse set of draw 0, or a uniform sample of it.
fn step_coords(
    model: &Model,
    sparsity: f64,
    keep: usize,
    seed: u64,
) -> Result<(usize, Vec<usize>)> {
    let ratios = LayerRatios::uniform(model, sparsity)?;
    let all = CoordinateSampler::new(&model.layout, &ratios, 1, false)?.draw(seed, 0);
    if keep == 0 || keep >= all.len() {
        return Ok((all.len(), all));
    }
    let mut rng = deepzero_core::seed::stream_rng(seed, &[4]);
    let mut picked: Vec<usize> = sample(&mut rng, all.len(), keep)
        .into_iter()
        .map(|i| all[i])
        .collect();
    picked.sort_unstable();
    Ok((all.len(), picked))
}

fn bench(
    a: &DistributedBenchArgs,
    ranks: &crate::common::Ranks,
) -> Result<Option<DistributedBench>> {
    if a.net.batch == 0 || a.steps == 0 || a.project_batch == 0 {
        bail!("--batch, --steps and --project-batch must be at least 1");
    }
    deepzero_core::sparsity::check_sparsity(a.sparsity).map_err(crate::common::flag_error)?;
    deepzero_core::sparsity::check_sparsity(a.project_sparsity)
        .map_err(crate::common::flag_error)?;
    let crate::bench::BenchBatch {
        model,
        init,
        n,
        x,
        y,
        mut rng,
    } = a.net.seeded_batch(a.seed)?;
    let device = candle_core::Device::Cpu;
    let params = params_tensor(&init, Precision::F32, &device)?;
    let obj = ClassifierObjective::classifier(&model, x.clone(), y.clone())?;
    let (step_size, coords) = step_coords(&model, a.sparsity, a.coords, a.seed)?;
    let cge = Cge::new(5e-3, Difference::Forward, QueryEngine::Fast)?.with_coords(coords.clone());
    let root = ranks.is_root();

    // One rank alone (the others wait), timed per step; the base forward timed on its own.
    let mut alone_grad = None;
    let (mut one_rank_seconds, mut base_seconds) = (0.0, 0.0);
    if root {
        let xh = x.flatten_all()?.to_vec1::<f32>()?;
        let started = Instant::now();
        Engine::new(
            &model,
            &init.iter().map(|&v| v as f32).collect::<Vec<_>>(),
            &xh,
            n,
            &Head::CrossEntropy(y.to_vec1::<u32>()?),
        )?;
        base_seconds = started.elapsed().as_secs_f64();
        let mut alone = cge.clone();
        for _ in 0..a.steps {
            let started = Instant::now();
            let e = alone.estimate(&obj, &params, &mut rng)?;
            one_rank_seconds += started.elapsed().as_secs_f64() / a.steps as f64;
            alone_grad = Some(e.grad.to_vec1::<f32>()?);
        }
    }
    ranks.barrier("waiting for rank 0's one-rank steps")?;

    let mut shared_cge = cge;
    shared_cge.distribute(std::sync::Arc::clone(&ranks.comm))?;
    for _ in 0..a.warmup_steps {
        shared_cge.estimate(&obj, &params, &mut rng)?;
    }
    // Grows step by step: `--steps` bounds the time, not an allocation made up front.
    let mut shared = Vec::new();
    let mut identical = true;
    for _ in 0..a.steps {
        ranks.barrier("the start of a shared step")?;
        let started = Instant::now();
        let e = shared_cge.estimate(&obj, &params, &mut rng)?;
        let seconds = started.elapsed().as_secs_f64();
        if let Some(g) = &alone_grad {
            let mine = e.grad.to_vec1::<f32>()?;
            identical &= mine.iter().zip(g).all(|(p, q)| p.to_bits() == q.to_bits());
        }
        let s = shared_cge
            .last_shares()
            .cloned()
            .context("the shared estimator recorded no shares")?;
        let total: f64 = s.costs.iter().sum::<f64>().max(f64::MIN_POSITIVE);
        shared.push(SharedStep {
            cost_total: s.costs.clone(),
            seconds,
            imbalance: s.imbalance(),
            wall_imbalance: s.wall_imbalance(),
            cpu_seconds: s.cpu_seconds.clone(),
            coords: s.ranges.iter().map(|r| r.len()).collect(),
            cost_share: s.costs.iter().map(|c| c / total).collect(),
            compute_seconds: s.compute_seconds,
            bytes: s.bytes,
        });
    }
    if !root {
        return Ok(None);
    }
    let mean_step = shared.iter().map(|s| s.seconds).sum::<f64>() / shared.len() as f64;
    let projection = if a.net.model == ModelArg::Resnet20 {
        // The ranks' fitted query time; alone, the cost model's rate without a fixed part.
        let timing = shared_cge.query_timing().unwrap_or_else(|| {
            let costs: f64 = shared.iter().flat_map(|s| s.cost_total.iter()).sum();
            let compute: f64 = shared.iter().flat_map(|s| s.cpu_seconds.iter()).sum();
            QueryTiming {
                seconds_per_cost: compute / costs.max(f64::MIN_POSITIVE),
                seconds_per_query: 0.0,
            }
        });
        Some(project(a, &model, timing, n, base_seconds)?)
    } else {
        None
    };
    Ok(Some(DistributedBench {
        model: model.name.clone(),
        params: model.num_params(),
        batch: n,
        sparsity: a.sparsity,
        step_coords: step_size,
        coords: coords.len(),
        ranks: ranks.comm.size(),
        one_rank_seconds,
        speedup: one_rank_seconds / mean_step,
        imbalance: shared.iter().map(|s| s.imbalance).sum::<f64>() / shared.len() as f64,
        wall_imbalance: shared.iter().map(|s| s.wall_imbalance).sum::<f64>() / shared.len() as f64,
        shared,
        bitwise_identical: identical,
        projection,
    }))
}

/// The step time at many ranks: every rank runs the base forward, then the slowest rank's
/// share of the cost-balanced split at the measured query time (`timing`, measured at batch
/// `batch`, scaled linearly to the projected batch), then a ring all-gather of the values.
fn project(
    a: &DistributedBenchArgs,
    model: &Model,
    timing: QueryTiming,
    batch: usize,
    base_seconds: f64,
) -> Result<Projection> {
    let (_, coords) = step_coords(model, a.project_sparsity, 0, a.seed)?;
    let costs = coordinate_costs(model, &coords, QueryEngine::Fast)?;
    let scale = a.project_batch as f64 / batch as f64;
    let weights: Vec<f64> = costs.iter().map(|c| c + timing.overhead()).collect();
    let bandwidth = a.bandwidth_gbps * 1e9 / 8.0;
    let latency = a.latency_us * 1e-6;
    let steps_per_epoch = a.epoch_images.div_ceil(a.project_batch);
    let steps = a
        .project_ranks
        .iter()
        .filter(|&&n| n > 0)
        .map(|&n| {
            let seconds: Vec<f64> = split(&weights, 1, n)
                .into_iter()
                .map(|r| {
                    let cost: f64 = costs[r.clone()].iter().sum();
                    scale
                        * (timing.seconds_per_cost * cost
                            + timing.seconds_per_query * r.len() as f64)
                })
                .collect();
            let compute_seconds = seconds.iter().copied().fold(0.0, f64::max);
            let base_seconds = base_seconds * scale;
            // Each rank's piece: its values plus two header values; a ring passes n − 1 pieces.
            let bytes = 8.0 * (coords.len() + 2 * n) as f64;
            let exchange_seconds = if n > 1 {
                (n - 1) as f64 * latency + bytes * (n - 1) as f64 / n as f64 / bandwidth
            } else {
                0.0
            };
            let step_seconds = compute_seconds + base_seconds + exchange_seconds;
            ProjectedStep {
                ranks: n,
                compute_seconds,
                base_seconds,
                exchange_seconds,
                step_seconds,
                imbalance: imbalance(&seconds),
                epoch_minutes: step_seconds * steps_per_epoch as f64 / 60.0,
            }
        })
        .collect();
    Ok(Projection {
        model: model.name.clone(),
        batch: a.project_batch,
        sparsity: a.project_sparsity,
        coords_per_step: coords.len(),
        madds_per_second: batch as f64 / timing.seconds_per_cost,
        query_overhead_seconds: timing.seconds_per_query * scale,
        base_seconds_per_sample: base_seconds / batch as f64,
        bandwidth_gbps: a.bandwidth_gbps,
        latency_us: a.latency_us,
        steps_per_epoch,
        steps,
    })
}

fn print_table(r: &DistributedBench) {
    println!(
        "{} ({} params), batch {}, sparsity {}: {} of the step's {} coordinates, {} ranks (1 thread each)",
        r.model, r.params, r.batch, r.sparsity, r.coords, r.step_coords, r.ranks
    );
    println!("one rank: {:.3} s per step", r.one_rank_seconds);
    for (i, s) in r.shared.iter().enumerate() {
        let per_rank: Vec<String> = s
            .compute_seconds
            .iter()
            .zip(&s.cpu_seconds)
            .zip(&s.coords)
            .map(|((t, cpu), c)| format!("{t:.3} s ({cpu:.3} s CPU)/{c} coords"))
            .collect();
        println!(
            "shared step {}: {:.3} s; compute per rank [{}]; imbalance {:.3} CPU, {:.3} wall; {} bytes per rank",
            i + 1,
            s.seconds,
            per_rank.join(", "),
            s.imbalance,
            s.wall_imbalance,
            s.bytes
        );
    }
    println!(
        "speedup {:.2}× over one rank, mean imbalance {:.3} CPU, {:.3} wall, bitwise identical: {}",
        r.speedup, r.imbalance, r.wall_imbalance, r.bitwise_identical
    );
    if let Some(p) = &r.projection {
        println!(
            "projection: {} batch {}, sparsity {} ({} coordinates per step), {:.2} GMAdd/s per rank + {:.2} ms per query, {} Gbit/s, {} µs, {} steps per epoch",
            p.model,
            p.batch,
            p.sparsity,
            p.coords_per_step,
            p.madds_per_second / 1e9,
            p.query_overhead_seconds * 1e3,
            p.bandwidth_gbps,
            p.latency_us,
            p.steps_per_epoch
        );
        println!("| ranks | compute s | base s | exchange s | step s | imbalance | epoch min |");
        println!("|---|---|---|---|---|---|---|");
        for s in &p.steps {
            println!(
                "| {} | {:.2} | {:.2} | {:.4} | {:.2} | {:.3} | {:.1} |",
                s.ranks,
                s.compute_seconds,
                s.base_seconds,
                s.exchange_seconds,
                s.step_seconds,
                s.imbalance,
                s.epoch_minutes
            );
        }
    }
}
