//! Flags and set-up shared by the subcommands: data, model, estimator.

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use deepzero_core::data::{self, Augment, Dataset, DatasetKind, Normalization};
use deepzero_core::distributed::{Collective, Fault, Single};
use deepzero_core::error::Setting;
use deepzero_core::estimator::{
    Cge, Difference, Direction, EstimatorConfig, EstimatorKind, GradientEstimator, QueryEngine,
};
use deepzero_core::model::{DeviceKind, Model, ModelSpec, Precision};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::Arc;

/// Data sets the CLI knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DataArg {
    /// scikit-learn's 8×8 digits (shipped; 80/20 stratified split).
    Digits,
    /// Fashion-MNIST (full set from /usr/share/datasets/fashion-mnist or --data-dir; else the shipped 10k/2k subset).
    FashionMnist,
    /// MNIST IDX files in --data-dir.
    Mnist,
    /// CIFAR-10 binary batches in --data-dir.
    Cifar10,
    /// Random Gaussian 3×32×32 images with random labels (for checks and benchmarks only).
    Synthetic,
}

/// Architectures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ModelArg {
    /// Fully connected ReLU network: --depth hidden layers of --width units.
    Mlp,
    /// DeepZero's simple CNN: --depth blocks of conv3×3(--width)-BN-ReLU-maxpool.
    Cnn,
    /// ResNet-20 (269,722 parameters on CIFAR-10).
    Resnet20,
}

/// Gradient estimators.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EstimatorArg {
    /// First-order baseline (backprop).
    Fo,
    /// Randomized gradient estimate with --q directions.
    Rge,
    /// Coordinate-wise gradient estimate.
    Cge,
}

/// Where the data comes from and how much of it.
#[derive(Args, Debug, Clone, Serialize, Deserialize)]
pub struct DataOpts {
    /// Data set.
    #[arg(long, value_enum, default_value_t = DataArg::Digits)]
    pub dataset: DataArg,
    /// Directory with the data set's files (overrides the shipped / system copies).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Use only the first N training samples.
    #[arg(long)]
    pub train_limit: Option<usize>,
    /// Use only the first N test samples.
    #[arg(long)]
    pub test_limit: Option<usize>,
}

/// The network.
#[derive(Args, Debug, Clone, Serialize, Deserialize)]
pub struct ModelOpts {
    /// Architecture.
    #[arg(long, value_enum, default_value_t = ModelArg::Mlp)]
    pub model: ModelArg,
    /// CNN blocks or MLP hidden layers [default: cnn 2, mlp 1].
    #[arg(long)]
    pub depth: Option<usize>,
    /// CNN channels or MLP hidden units [default: cnn 18, mlp 32].
    #[arg(long)]
    pub width: Option<usize>,
}

impl ModelOpts {
    /// Replace unset depth/width by the architecture's defaults.
    pub fn resolve(&mut self) {
        let (d, w) = match self.model {
            ModelArg::Mlp => (1, 32),
            ModelArg::Cnn => (2, 18),
            ModelArg::Resnet20 => return,
        };
        self.depth.get_or_insert(d);
        self.width.get_or_insert(w);
    }
    pub fn spec(&self) -> Result<ModelSpec> {
        Ok(match self.model {
            ModelArg::Mlp => {
                let depth = self.depth.unwrap_or(1);
                // Each hidden layer holds at least one parameter: bound the list of widths too.
                deepzero_core::model::check_params(depth)
                    .map_err(|e| anyhow::anyhow!("--depth {depth}: {e}"))?;
                ModelSpec::Mlp {
                    hidden: vec![self.width.unwrap_or(32); depth],
                }
            }
            ModelArg::Cnn => ModelSpec::SimpleCnn {
                depth: self.depth.unwrap_or(2),
                width: self.width.unwrap_or(18),
            },
            ModelArg::Resnet20 => ModelSpec::Resnet20,
        })
    }
}

/// How gradients are made.
#[derive(Args, Debug, Clone, Serialize, Deserialize)]
pub struct EstimatorOpts {
    /// Gradient estimator.
    #[arg(long, value_enum, default_value_t = EstimatorArg::Cge)]
    pub estimator: EstimatorArg,
    /// RGE directions per step.
    #[arg(long, default_value_t = EstimatorConfig::default().q)]
    pub q: usize,
    /// Finite-difference step μ.
    #[arg(long, default_value_t = EstimatorConfig::default().mu)]
    pub mu: f64,
    /// Finite-difference scheme.
    #[arg(long, value_enum, default_value_t = DifferenceArg::Forward)]
    pub difference: DifferenceArg,
    /// RGE direction distribution.
    #[arg(long, value_enum, default_value_t = DirectionArg::Gaussian)]
    pub direction: DirectionArg,
    /// How queries are evaluated (all give the same numbers up to rounding): `naive` one full
    /// forward per query, `reuse` resumes at the perturbed layer, `fast` propagates the change
    /// (CGE). RGE always runs full forwards.
    #[arg(long, value_enum, default_value_t = EngineArg::Fast, alias = "cge-engine")]
    #[serde(alias = "cge_engine")]
    pub engine: EngineArg,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DifferenceArg {
    Forward,
    Central,
}
impl From<DifferenceArg> for Difference {
    fn from(d: DifferenceArg) -> Self {
        match d {
            DifferenceArg::Forward => Difference::Forward,
            DifferenceArg::Central => Difference::Central,
        }
    }
}
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DirectionArg {
    Gaussian,
    Sphere,
}
impl From<DirectionArg> for Direction {
    fn from(d: DirectionArg) -> Self {
        match d {
            DirectionArg::Gaussian => Direction::Gaussian,
            DirectionArg::Sphere => Direction::Sphere,
        }
    }
}
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EngineArg {
    /// One full forward per query.
    Naive,
    /// Resume the forward at the perturbed layer (feature reuse).
    Reuse,
    /// Delta propagation on deepzero's own kernels, threads over queries (f32).
    Fast,
}
impl From<EngineArg> for QueryEngine {
    fn from(e: EngineArg) -> Self {
        match e {
            EngineArg::Naive => QueryEngine::Naive,
            EngineArg::Reuse => QueryEngine::Reuse,
            EngineArg::Fast => QueryEngine::Fast,
        }
    }
}
impl From<EstimatorArg> for EstimatorKind {
    fn from(e: EstimatorArg) -> Self {
        match e {
            EstimatorArg::Fo => EstimatorKind::Fo,
            EstimatorArg::Rge => EstimatorKind::Rge,
            EstimatorArg::Cge => EstimatorKind::Cge,
        }
    }
}
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DtypeArg {
    F32,
    F64,
}
impl DtypeArg {
    pub fn precision(self) -> Precision {
        match self {
            DtypeArg::F32 => Precision::F32,
            DtypeArg::F64 => Precision::F64,
        }
    }
}
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeviceArg {
    Cpu,
    Cuda,
}
impl DeviceArg {
    pub fn kind(self) -> DeviceKind {
        match self {
            DeviceArg::Cpu => DeviceKind::Cpu,
            DeviceArg::Cuda => DeviceKind::Cuda,
        }
    }
}

impl EstimatorOpts {
    /// The core's configuration of these flags.
    pub fn config(&self) -> EstimatorConfig {
        EstimatorConfig {
            kind: self.estimator.into(),
            q: self.q,
            mu: self.mu,
            difference: self.difference.into(),
            direction: self.direction.into(),
            engine: self.engine.into(),
        }
    }
    pub fn build(&self) -> Result<Box<dyn GradientEstimator>> {
        self.config().build().map_err(flag_error)
    }
    pub fn cge(&self) -> Result<Cge> {
        self.config().cge().map_err(flag_error)
    }
}

/// The command-line flag of a core setting.
pub fn flag_of(setting: Setting) -> &'static str {
    match setting {
        Setting::Epochs => "--epochs",
        Setting::LearningRate => "--lr",
        Setting::WarmupEpochs => "--warmup-epochs",
        Setting::Momentum => "--momentum",
        Setting::WeightDecay => "--weight-decay",
        Setting::Directions => "--q",
        Setting::Mu => "--mu",
        Setting::Sparsity => "--sparsity",
        Setting::MaskInterval => "--mask-interval",
        Setting::BatchSize => "--batch-size",
        Setting::QueryBatch => "--query-batch",
        Setting::Estimator => "--estimator",
        Setting::Coordinates => "--coords",
        Setting::ModelSize => "the model's parameter count (--width, --depth)",
    }
}

/// A core error in the command line's words: an out-of-range setting names its flag.
pub fn flag_error(e: deepzero_core::Error) -> anyhow::Error {
    match e {
        deepzero_core::Error::Invalid { setting, message } => {
            anyhow::anyhow!("{} {message}", flag_of(setting))
        }
        other => other.into(),
    }
}

/// An error as the user reads it: core names settings in its own words, so say which flag it
/// was (an error with context of its own keeps it).
pub fn in_flags(e: anyhow::Error) -> anyhow::Error {
    if e.chain().count() == 1 {
        match e.downcast::<deepzero_core::Error>() {
            Ok(core) => flag_error(core),
            Err(other) => other,
        }
    } else {
        e
    }
}

/// Train and test sets, normalised, limited, plus the augmentation to use.
pub fn load_data(
    opts: &DataOpts,
    seed: u64,
    augment: bool,
) -> Result<(Dataset, Dataset, Option<Augment>)> {
    let (mut train, mut test) = raw_data(opts, seed)?;
    let (norm, aug) = normalization(opts, &train);
    norm.apply(&mut train)?;
    norm.apply(&mut test)?;
    Ok((train, test, aug.filter(|_| augment)))
}

/// The input normalisation `train` uses for these data options (fitted on the limited training
/// set; CIFAR-10's published statistics), and CIFAR-10's augmentation.
pub fn normalization(opts: &DataOpts, train: &Dataset) -> (Normalization, Option<Augment>) {
    match opts.dataset {
        DataArg::Cifar10 => (Normalization::cifar10(), Some(Augment::cifar10())),
        DataArg::Synthetic => (Normalization::identity(train.channels), None),
        _ => (Normalization::fit(train), None),
    }
}

/// Train and test sets as loaded (pixels in [0, 1]), limited, not normalised.
pub fn raw_data(opts: &DataOpts, seed: u64) -> Result<(Dataset, Dataset)> {
    let (mut train, mut test) = match opts.dataset {
        DataArg::Synthetic => (synthetic(1024, seed), synthetic(256, seed ^ 1)),
        other => {
            let kind = match other {
                DataArg::Digits => DatasetKind::Digits,
                DataArg::FashionMnist => DatasetKind::FashionMnist,
                DataArg::Mnist => DatasetKind::Mnist,
                DataArg::Cifar10 => DatasetKind::Cifar10,
                DataArg::Synthetic => unreachable!("handled above"),
            };
            data::load(kind, opts.data_dir.as_deref(), seed)
                .with_context(|| format!("loading --dataset {}", kind_name(other)))?
        }
    };
    if let Some(n) = opts.train_limit {
        if n == 0 {
            bail!("--train-limit must be at least 1");
        }
        train = train.take(n);
    }
    if let Some(n) = opts.test_limit {
        if n == 0 {
            bail!("--test-limit must be at least 1");
        }
        test = test.take(n);
    }
    Ok((train, test))
}

fn kind_name(d: DataArg) -> String {
    d.to_possible_value()
        .map(|v| v.get_name().to_string())
        .unwrap_or_default()
}

fn synthetic(n: usize, seed: u64) -> Dataset {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let sl = 3 * 32 * 32;
    let images = (0..n * sl).map(|_| rng.random::<f32>()).collect();
    let labels = (0..n).map(|_| rng.random_range(0..10u8)).collect();
    Dataset {
        images,
        labels,
        channels: 3,
        height: 32,
        width: 32,
        num_classes: 10,
    }
}

/// Build the model for a data set's image shape.
pub fn build_model(opts: &ModelOpts, ds: &Dataset) -> Result<Model> {
    Model::build(
        &opts.spec()?,
        [ds.channels, ds.height, ds.width],
        ds.num_classes,
    )
    .with_context(|| {
        let flag =
            |name: &str, v: Option<usize>| v.map(|v| format!(" --{name} {v}")).unwrap_or_default();
        format!(
            "--model {:?}{}{}",
            opts.model,
            flag("depth", opts.depth),
            flag("width", opts.width)
        )
        .to_lowercase()
    })
}

/// Use `n` threads for tensor kernels (0 = all cores; see [`thread_count`]).
pub fn set_threads(n: usize) {
    if n > 0 {
        std::env::set_var("RAYON_NUM_THREADS", thread_count(n).to_string());
    }
}

/// The threads to run for `--threads n`: 0 means all cores, and more than the machine's cores
/// is capped to them with a warning (thousands of threads would only be spawned to wait).
pub fn thread_count(n: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    if n == 0 {
        return cores;
    }
    if n > cores {
        crate::note!(
            "warning: --threads {n} is more than the {cores} cores of this machine; using {cores}"
        );
        return cores;
    }
    n
}

/// Pruning scores (`deepzero prune --method`, `deepzero train --prune`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PruneArg {
    /// ZO-GraSP: −θ ⊙ Ĥg from two RGE estimates (forward passes only).
    ZoGrasp,
    /// First-order GraSP: −θ ⊙ Hg from two autograd gradients (the reference).
    Grasp,
    /// |θ|.
    Magnitude,
    /// The same keep ratio 1 − sparsity in every layer.
    Random,
}

impl PruneArg {
    /// The library's method.
    pub fn method(self) -> deepzero_core::sparsity::PruneMethod {
        use deepzero_core::sparsity::PruneMethod;
        match self {
            PruneArg::ZoGrasp => PruneMethod::ZoGrasp,
            PruneArg::Grasp => PruneMethod::Grasp,
            PruneArg::Magnitude => PruneMethod::Magnitude,
            PruneArg::Random => PruneMethod::Random,
        }
    }
}

/// Sparse training (DeepZero Algorithm 1): which coordinates each step estimates.
#[derive(Args, Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct SparsityOpts {
    /// Sparse training: fraction of the weights left out of every gradient, in [0, 1)
    /// (--estimator cge: sparse CGE; fo: sparse gradients, or a pruned network with --prune-weights).
    #[arg(long)]
    pub sparsity: Option<f64>,
    /// Layer-wise keep ratios from `deepzero prune --out` [default: --prune, else 1 − sparsity in every layer].
    #[arg(long, conflicts_with = "prune")]
    pub ratios: Option<PathBuf>,
    /// Compute the layer ratios first, on a class-balanced sample of the training data (same seed).
    #[arg(long, value_enum)]
    pub prune: Option<PruneArg>,
    /// Epochs between redraws of the per-layer random coordinate sets.
    #[arg(long, default_value_t = 5)]
    pub mask_interval: usize,
    /// Sample biases and batch-norm parameters too (default: they are estimated densely).
    #[arg(long)]
    pub sparse_all: bool,
    /// Train the pruned network (a fixed weight mask, pruned weights held at 0) with --estimator fo.
    #[arg(long)]
    pub prune_weights: bool,
    /// RGE directions per estimate of --prune zo-grasp.
    #[arg(long, default_value_t = 192)]
    pub prune_q: usize,
    /// Samples per class in the pruning batch of --prune.
    #[arg(long, default_value_t = 25)]
    pub prune_per_class: usize,
}

impl Default for SparsityOpts {
    fn default() -> Self {
        SparsityOpts {
            sparsity: None,
            ratios: None,
            prune: None,
            mask_interval: 5,
            sparse_all: false,
            prune_weights: false,
            prune_q: 192,
            prune_per_class: 25,
        }
    }
}

impl SparsityOpts {
    /// Whether any sparse-training flag that selects a sparse estimator is set.
    pub fn is_sparse(&self) -> bool {
        self.sparsity.is_some()
            || self.ratios.is_some()
            || self.prune.is_some()
            || self.prune_weights
    }
}

/// Kaiming initial parameters of a run ([`deepzero_core::seed::initial_params`]) as a tensor.
pub fn initial_params(
    model: &Model,
    seed: u64,
    precision: Precision,
    device: &candle_core::Device,
) -> Result<candle_core::Tensor> {
    Ok(deepzero_core::model::params_tensor(
        &deepzero_core::seed::initial_params(model, seed),
        precision,
        device,
    )?)
}

/// How a command's processes work together.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DistributedArg {
    /// The processes of an MPI job (`mpirun -np N deepzero … --distributed mpi`).
    Mpi,
}

/// Distributed runs: each step's CGE queries shared over processes and machines. How to run,
/// not what to compute (results do not depend on the rank count): not saved in `config.json`,
/// and `--resume` takes it from the resuming command.
#[derive(Args, Debug, Clone)]
pub struct DistributedOpts {
    /// Share each step's CGE queries over the ranks of an MPI job, cost-balanced; every rank
    /// applies the same update and rank 0 writes the run directory. Needs a build with
    /// `--features mpi`.
    #[arg(long, value_enum)]
    pub distributed: Option<DistributedArg>,
    /// Seconds a rank waits for the others at a step's exchange before the job stops with an
    /// error (a rank died or hangs).
    #[arg(long, default_value_t = DEFAULT_RANK_TIMEOUT)]
    pub rank_timeout: f64,
}

impl Default for DistributedOpts {
    fn default() -> Self {
        DistributedOpts {
            distributed: None,
            rank_timeout: DEFAULT_RANK_TIMEOUT,
        }
    }
}

/// The hidden, test-only fault injection of distributed runs: `RANK:EXCHANGE:die|hang` makes
/// that rank abort or hang at that (1-based) gradient exchange.
pub const FAULT_ENV: &str = "DEEPZERO_FAULT";

/// The hidden, test-only pause inside checkpoint saves: `MS` makes `deepzero train` stop for
/// that many milliseconds at each point between a checkpoint's writes
/// ([`checkpoint::Interruption`](deepzero_core::checkpoint::Interruption)), announcing each pause
/// on stderr, so that a test can kill the process there (tests/kill_resume.rs). Never set in
/// normal use.
pub const CHECKPOINT_PAUSE_ENV: &str = "DEEPZERO_TEST_CHECKPOINT_PAUSE_MS";

/// What `deepzero train` calls between a checkpoint's writes.
pub type CheckpointHook =
    Box<dyn FnMut(deepzero_core::checkpoint::Interruption) -> deepzero_core::Result<()>>;

/// The [`CheckpointHook`] of this process: nothing, or the pause of [`CHECKPOINT_PAUSE_ENV`].
pub fn checkpoint_hook() -> Result<CheckpointHook> {
    let pause = match std::env::var(CHECKPOINT_PAUSE_ENV) {
        Ok(ms) => Some(std::time::Duration::from_millis(
            ms.parse()
                .with_context(|| format!("{CHECKPOINT_PAUSE_ENV}={ms}"))?,
        )),
        Err(_) => None,
    };
    Ok(Box::new(move |at| {
        if let Some(pause) = pause {
            eprintln!("checkpoint: pausing {} ms at {at:?}", pause.as_millis());
            std::thread::sleep(pause);
        }
        Ok(())
    }))
}

/// Default of `--rank-timeout`, seconds.
pub const DEFAULT_RANK_TIMEOUT: f64 = 600.0;

static ROOT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Whether this process reports (rank 0, or not distributed).
pub fn is_root() -> bool {
    ROOT.load(std::sync::atomic::Ordering::Relaxed)
}

/// `eprintln!` on rank 0 only.
#[macro_export]
macro_rules! note {
    ($($arg:tt)*) => {
        if $crate::common::is_root() {
            eprintln!($($arg)*);
        }
    };
}

/// This process's place among the ranks of a run.
pub struct Ranks {
    /// The transport (a single process when not distributed).
    pub comm: Arc<dyn Collective>,
}

impl DistributedOpts {
    /// Join the run's ranks (MPI is initialised here, once per process).
    pub fn connect(&self) -> Result<Ranks> {
        let comm: Arc<dyn Collective> = match self.distributed {
            None => Arc::new(Single),
            Some(DistributedArg::Mpi) => {
                let timeout = self.rank_timeout;
                if !(timeout.is_finite() && timeout > 0.0) {
                    bail!("--rank-timeout must be a positive number of seconds, got {timeout}");
                }
                let fault = match std::env::var(FAULT_ENV) {
                    Ok(s) => Some(s.parse().with_context(|| format!("{FAULT_ENV}={s}"))?),
                    Err(_) => None,
                };
                mpi_world(timeout, fault)?
            }
        };
        ROOT.store(comm.rank() == 0, std::sync::atomic::Ordering::Relaxed);
        Ok(Ranks { comm })
    }
}

#[cfg(feature = "mpi")]
fn mpi_world(timeout: f64, fault: Option<Fault>) -> Result<Arc<dyn Collective>> {
    let hint = "Raise --rank-timeout if a step legitimately takes longer. The last checkpoint is \
                intact: continue with --resume DIR (any number of ranks)."
        .to_string();
    let mpi = deepzero_core::distributed::mpi::Mpi::init(
        std::time::Duration::from_secs_f64(timeout),
        hint,
        fault,
    )?;
    Ok(Arc::new(mpi))
}

#[cfg(not(feature = "mpi"))]
fn mpi_world(_timeout: f64, _fault: Option<Fault>) -> Result<Arc<dyn Collective>> {
    bail!(
        "--distributed mpi: this deepzero was built without MPI; rebuild it with `cargo build \
         --release -p deepzero-cli --features mpi` (needs libopenmpi-dev, openmpi-bin and \
         libclang-dev) and start it under mpirun"
    )
}

impl Ranks {
    /// Whether this is rank 0 (the one that writes and reports).
    pub fn is_root(&self) -> bool {
        self.comm.rank() == 0
    }

    /// Share `estimator`'s queries over the ranks (nothing to do for a single process).
    pub fn share(&self, estimator: &mut dyn GradientEstimator) -> Result<()> {
        let size = self.comm.size();
        if size == 1 {
            return Ok(());
        }
        if estimator.distribute(Arc::clone(&self.comm))? {
            crate::note!(
                "distributed: {} shares each step's queries over {size} ranks",
                estimator.name()
            );
        } else {
            crate::note!(
                "distributed: {} does not share its queries; each of the {size} ranks computes \
                 the whole estimate (same numbers, no speed-up)",
                estimator.name()
            );
        }
        Ok(())
    }

    /// A command's result on this rank. An error on one rank of several stops them all now
    /// (the others would wait for it at the next exchange).
    pub fn finish<T>(&self, result: Result<T>) -> Result<T> {
        match result {
            Err(e) if self.comm.size() > 1 => {
                eprintln!(
                    "error on rank {} of {}: {:#}",
                    self.comm.rank(),
                    self.comm.size(),
                    in_flags(e)
                );
                self.comm.abort(1)
            }
            other => other,
        }
    }

    /// Wait until every rank gets here (`what`: for the timeout message). One value each: an
    /// MPI library may complete an exchange of nothing without waiting.
    pub fn barrier(&self, what: &str) -> Result<()> {
        let counts = vec![1; self.comm.size()];
        self.comm.all_gather(&[0.0], &counts, what)?;
        Ok(())
    }
}
