//! `deepzero bench objective`: how CGE on a generic objective scales with threads.
//!
//! The objective is a black box of a chosen cost per query (a busy computation, calibrated on
//! this machine), with no layer graph, so the estimator takes its generic path: queries in
//! batches, sharded over the rayon pool, each worker perturbing its own copies of the parameters.

use crate::common::{flag_error, thread_count};
use anyhow::{bail, Result};
use clap::Args;
use deepzero_core::error::Setting;
use deepzero_core::estimator::{Cge, Difference, GradientEstimator, QueryEngine};
use deepzero_core::layout::{ParamKind, ParamLayout};
use deepzero_core::model::{params_tensor, tensor_to_vec, Precision};
use deepzero_core::objective::Objective;
use serde::Serialize;
use std::time::Instant;

#[derive(Args, Debug)]
pub struct ObjectiveBenchArgs {
    /// Target cost of one query in milliseconds.
    #[arg(long, default_value_t = 1.0)]
    pub query_ms: f64,
    /// Coordinates estimated (one query each, plus the base).
    #[arg(long, default_value_t = 400)]
    pub coords: usize,
    /// Threads of the parallel run (0 = all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize, Debug)]
pub struct ObjectiveBench {
    pub coords: usize,
    pub threads: usize,
    pub seconds_per_query: f64,
    pub one_thread_seconds: f64,
    pub threaded_seconds: f64,
    pub speedup: f64,
    pub bitwise_identical: bool,
}

/// A black box whose every query does `work` rounds of arithmetic over a fixed buffer.
struct Busy {
    layout: ParamLayout,
    work: usize,
    buf: Vec<f64>,
}

impl Busy {
    fn value(&self, p: &[f64]) -> f64 {
        let s: f64 = p
            .iter()
            .enumerate()
            .map(|(i, v)| v * v * (1.0 + i as f64))
            .sum();
        let mut acc = s;
        for r in 0..self.work {
            let mut t = 0.0;
            for &b in &self.buf {
                t += (b * acc + r as f64).sin();
            }
            acc = s + t * 1e-9;
        }
        acc
    }
}

impl Objective for Busy {
    fn layout(&self) -> &ParamLayout {
        &self.layout
    }
    fn loss(&self, params: &[f64]) -> deepzero_core::Result<f64> {
        Ok(self.value(params))
    }
}

fn estimate(obj: &Busy, coords: usize, threads: usize) -> Result<(Vec<f64>, f64)> {
    let params = params_tensor(
        &vec![0.5; coords],
        Precision::F64,
        &candle_core::Device::Cpu,
    )?;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()?;
    pool.install(|| {
        let mut cge = Cge::new(1e-4, Difference::Forward, QueryEngine::Fast)?;
        let mut rng = deepzero_core::seed::stream_rng(0, &[]);
        let t = Instant::now();
        let e = cge.estimate(obj, &params, &mut rng)?;
        Ok((tensor_to_vec(&e.grad)?, t.elapsed().as_secs_f64()))
    })
}

pub fn run(a: &ObjectiveBenchArgs) -> Result<()> {
    if !(a.query_ms.is_finite() && a.query_ms > 0.0) || a.coords == 0 {
        bail!("--query-ms must be positive and --coords at least 1");
    }
    // Parameters, gradient and two estimates of `--coords` entries each.
    deepzero_core::bounds::check_memory(
        Setting::Coordinates,
        a.coords,
        4 * std::mem::size_of::<f64>(),
        "parameter and gradient vectors",
    )
    .map_err(flag_error)?;
    let threads = thread_count(a.threads);
    let mut layout = ParamLayout::default();
    layout.push("theta", ParamKind::Weight, vec![a.coords], 0);
    let mut obj = Busy {
        layout,
        work: 1,
        buf: (0..1000).map(|i| (i as f64 * 0.001).cos()).collect(),
    };
    // Calibrate the work per query to the target cost.
    let p = vec![0.5; a.coords];
    let t = Instant::now();
    let reps = 20;
    for _ in 0..reps {
        std::hint::black_box(obj.value(&p));
    }
    let per_round = t.elapsed().as_secs_f64() / reps as f64;
    obj.work = ((a.query_ms * 1e-3 / per_round).round() as usize).max(1);
    let t = Instant::now();
    for _ in 0..10 {
        std::hint::black_box(obj.value(&p));
    }
    let per_query = t.elapsed().as_secs_f64() / 10.0;

    let (g1, t1) = estimate(&obj, a.coords, 1)?;
    let (gn, tn) = estimate(&obj, a.coords, threads)?;
    let r = ObjectiveBench {
        coords: a.coords,
        threads,
        seconds_per_query: per_query,
        one_thread_seconds: t1,
        threaded_seconds: tn,
        speedup: t1 / tn,
        bitwise_identical: g1 == gn,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!("{r:#?}");
    }
    Ok(())
}
