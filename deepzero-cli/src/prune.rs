//! `deepzero prune`: layer-wise keep ratios from pruning scores at initialisation, and the
//! set-up of sparse training for `deepzero train --sparsity`.

use crate::common::{
    build_model, flag_error, initial_params, load_data, DataOpts, DistributedOpts, DtypeArg,
    EstimatorArg, EstimatorOpts, ModelOpts, PruneArg, Ranks, SparsityOpts,
};
use crate::report;
use anyhow::{bail, Context, Result};
use clap::Args;
use deepzero_core::data::Dataset;
use deepzero_core::error::Setting;
use deepzero_core::estimator::GradientEstimator;
use deepzero_core::model::Model;
use deepzero_core::model::Precision;
use deepzero_core::sparsity::{
    self, CoordinateSampler, LayerRatios, PruneConfig, Pruning, SparseConfig,
};
use deepzero_core::task::{ClassificationConfig, ClassificationTask};
use std::path::PathBuf;

/// Flags of `deepzero prune`.
#[derive(Args, Debug, Clone)]
pub struct PruneArgs {
    #[command(flatten)]
    pub data: DataOpts,
    #[command(flatten)]
    pub model: ModelOpts,
    /// Scoring method.
    #[arg(long, value_enum, default_value_t = PruneArg::ZoGrasp)]
    pub method: PruneArg,
    /// Fraction of the conv and linear weights to prune, in [0, 1).
    #[arg(long)]
    pub sparsity: f64,
    /// Output JSON file (per-layer keep ratios).
    #[arg(long)]
    pub out: PathBuf,
    /// Replace an existing --out file.
    #[arg(long)]
    pub overwrite: bool,
    /// RGE directions per gradient estimate (zo-grasp).
    #[arg(long, default_value_t = 192)]
    pub q: usize,
    /// Finite-difference step μ.
    #[arg(long, default_value_t = 5e-3)]
    pub mu: f64,
    /// Samples per class in the pruning batch.
    #[arg(long, default_value_t = 25)]
    pub per_class: usize,
    /// Seed (initialisation as in `train --seed`, sample, directions).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Numeric precision.
    #[arg(long, value_enum, default_value_t = DtypeArg::F32)]
    pub dtype: DtypeArg,
    #[command(flatten)]
    pub distributed: DistributedOpts,
}

/// Under `--distributed mpi` every rank computes the same scores (ZO-GraSP's RGE queries are not
/// shared) and rank 0 alone writes `--out` and reports.
pub fn run(args: PruneArgs) -> Result<()> {
    let ranks = args.distributed.connect()?;
    let result = run_on(args, &ranks);
    ranks.finish(result)
}

fn run_on(mut args: PruneArgs, ranks: &Ranks) -> Result<()> {
    args.model.resolve();
    let config = PruneConfig {
        method: args.method.method(),
        sparsity: args.sparsity,
        q: args.q,
        mu: args.mu,
    };
    config.validate().map_err(flag_error)?;
    report::check_output_file(&args.out, args.overwrite)?;
    let device = candle_core::Device::Cpu;
    let (train, _, _) = load_data(&args.data, args.seed, false)?;
    let model = build_model(&args.model, &train)?;
    let init = initial_params(&model, args.seed, args.dtype.precision(), &device)?;
    let p = prune_at_init(&model, &train, &init, &config, args.per_class, args.seed)?;
    if !ranks.is_root() {
        return Ok(());
    }
    report::write_json_atomic(&args.out, &p.ratios)?;
    eprintln!(
        "{} {} at sparsity {}: global sparsity {:.4}, {} queries → {}",
        config.method,
        model.name,
        config.sparsity,
        p.ratios.global_sparsity,
        p.ratios.queries,
        args.out.display()
    );
    for l in &p.ratios.layers {
        eprintln!(
            "  {:<24} {:>7} params  keep {:.4} ({})",
            l.name, l.params, l.keep_ratio, l.kept
        );
    }
    Ok(())
}

/// Score `model` at `init` on a class-balanced sample of `train` (`per_class` per class, one
/// batch) and derive the layer ratios. Deterministic in `seed`.
pub fn prune_at_init(
    model: &Model,
    train: &Dataset,
    init: &candle_core::Tensor,
    config: &PruneConfig,
    per_class: usize,
    seed: u64,
) -> Result<Pruning> {
    if per_class == 0 {
        bail!("--per-class must be at least 1");
    }
    let task = ClassificationTask::new(
        model,
        train,
        train,
        ClassificationConfig {
            prune_per_class: per_class,
            precision: if init.dtype() == candle_core::DType::F64 {
                Precision::F64
            } else {
                Precision::F32
            },
            ..Default::default()
        },
    )?;
    sparsity::prune_task(model, &task, init, config, seed)
        .map_err(flag_error)
        .with_context(|| format!("pruning with {}", config.method))
}

/// A run's estimator once the sparse-training flags are applied.
pub struct EstimatorSetup {
    /// The estimator to train with.
    pub estimator: Box<dyn GradientEstimator>,
    /// The layer ratios used, for sparse runs.
    pub ratios: Option<LayerRatios>,
}

/// Build the estimator of a training run: the plain one, or — with `--sparsity`, `--ratios`,
/// `--prune` or `--prune-weights` — sparse CGE, backprop with sparse gradients, or backprop on
/// the pruned network. `init` is the run's initial parameters (pruning scores the network at
/// initialisation, also when a run resumes).
pub fn build_estimator(
    est: &EstimatorOpts,
    sp: &SparsityOpts,
    model: &Model,
    train: &Dataset,
    init: &candle_core::Tensor,
    seed: u64,
) -> Result<EstimatorSetup> {
    if !sp.is_sparse() {
        return Ok(EstimatorSetup {
            estimator: est.build()?,
            ratios: None,
        });
    }
    if let Some(s) = sp.sparsity {
        sparsity::check_sparsity(s).map_err(flag_error)?;
    }
    if est.estimator == EstimatorArg::Rge {
        bail!("--sparsity applies to --estimator cge (sparse CGE) or fo (sparse gradients, --prune-weights), not rge");
    }
    if sp.prune_weights && est.estimator != EstimatorArg::Fo {
        bail!("--prune-weights trains the pruned network with backprop; use --estimator fo");
    }
    if sp.mask_interval == 0 {
        bail!("--mask-interval must be at least 1");
    }
    let (ratios, scores) = match (&sp.ratios, sp.prune, sp.sparsity) {
        (Some(_), Some(_), _) => bail!("--ratios and --prune exclude each other"),
        (Some(path), None, s) => {
            let r = LayerRatios::load(path).context("--ratios")?;
            if let Some(s) = s {
                if (r.global_sparsity - s).abs() > 0.01 {
                    bail!(
                        "--sparsity {s} disagrees with --ratios {} (global sparsity {:.4}); drop --sparsity or prune again",
                        path.display(),
                        r.global_sparsity
                    );
                }
            }
            (r, None)
        }
        (None, Some(m), Some(s)) => {
            let config = PruneConfig {
                method: m.method(),
                sparsity: s,
                q: sp.prune_q,
                mu: est.mu,
            };
            // Train names these settings --prune-q and --prune-per-class.
            config.validate().map_err(|e| match e {
                deepzero_core::Error::Invalid {
                    setting: Setting::Directions,
                    message,
                } => anyhow::anyhow!("--prune-q {message}"),
                other => flag_error(other),
            })?;
            if sp.prune_per_class == 0 {
                bail!("--prune-per-class must be at least 1");
            }
            let p = prune_at_init(model, train, init, &config, sp.prune_per_class, seed)
                .context("--prune")?;
            crate::note!(
                "pruned at init with {}: global sparsity {:.4}, {} queries",
                m.method(),
                p.ratios.global_sparsity,
                p.ratios.queries
            );
            (p.ratios, p.scores)
        }
        (None, Some(_), None) => bail!("--prune needs --sparsity"),
        (None, None, Some(s)) => (LayerRatios::uniform(model, s)?, None),
        (None, None, None) => bail!("--prune-weights needs --sparsity or --ratios"),
    };
    let layers: Vec<String> = ratios
        .layers
        .iter()
        .map(|l| format!("{} {:.3}", l.name, l.keep_ratio))
        .collect();
    let config = SparseConfig {
        mask_interval: sp.mask_interval,
        sparse_all: sp.sparse_all,
        prune_weights: sp.prune_weights,
    };
    let estimator = sparsity::sparse_estimator(
        &est.config(),
        &model.layout,
        &ratios,
        scores.as_deref(),
        &config,
        seed,
    )
    .map_err(flag_error)?;
    let n = CoordinateSampler::new(&model.layout, &ratios, sp.mask_interval, sp.sparse_all)?
        .num_coords();
    let d = model.num_params();
    let layers = layers.join(", ");
    match (sp.prune_weights, est.estimator) {
        (true, _) => crate::note!(
            "pruned network ({} mask): {}; keep ratios: {layers}",
            if scores.is_some() { "top-|score|" } else { "random" },
            estimator.name(),
        ),
        (false, EstimatorArg::Cge) => {
            let cge = est.cge()?;
            crate::note!(
                "sparse CGE: {n} of {d} coordinates per step, redrawn every {} epochs → {} queries per step (dense CGE {}); keep ratios: {layers}",
                sp.mask_interval,
                cge.queries_for(n),
                cge.queries_per_step(d),
            );
        }
        _ => crate::note!(
            "sparse gradients (backprop): {n} of {d} coordinates per step, redrawn every {} epochs; keep ratios: {layers}",
            sp.mask_interval,
        ),
    }
    Ok(EstimatorSetup {
        estimator,
        ratios: Some(ratios),
    })
}
