//! `deepzero pde`: learned correction of a coarse PDE solver with the solver in the loop
//! (SRC / NON / sol-nograd / ZO-SOL / FO-SOL), and `deepzero pde generate` for the data alone.

use crate::config;
use crate::report::{self, Field, LineChart, Series};
use crate::train::{epoch_line, four_digits};
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use deepzero_core::checkpoint;
use deepzero_core::trainer::{EpochMetrics, Observer, StepInfo, TrainState};
use deepzero_pde::correction::{self, prepare, rollouts};
use deepzero_pde::{
    CorrectionConfig, Dataset, DatasetConfig, InitialStateConfig, Method, NavierStokesParams,
    NetworkConfig, Problem, Schedule, SolStart,
};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Which PDE.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SolverArg {
    /// Forced 2-D Burgers (Solver-in-the-Loop's set-up).
    Burgers,
    /// 1-D Burgers (solver only; no data set or correction yet).
    Burgers1d,
    /// 2-D incompressible Navier–Stokes (vorticity).
    NavierStokes,
}

/// Where ZO-SOL starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SolStartArg {
    /// A fresh network (last layer zero: the uncorrected solver).
    Scratch,
    /// NON's trained network, fine-tuned through the solver (needs non in --methods).
    Non,
}

impl SolStartArg {
    fn start(self) -> SolStart {
        match self {
            SolStartArg::Scratch => SolStart::Scratch,
            SolStartArg::Non => SolStart::Non,
        }
    }
}

/// `deepzero pde [generate]`.
#[derive(Args, Debug, Clone)]
#[command(args_conflicts_with_subcommands = true)]
pub struct PdeArgs {
    #[command(subcommand)]
    pub command: Option<PdeCommand>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Subcommand, Debug, Clone)]
pub enum PdeCommand {
    /// Generate (or check) the data set alone.
    Generate(GenerateArgs),
}

/// Flags of `deepzero pde generate`.
#[derive(Args, Debug, Clone)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub data: DataFlags,
    /// Directory of the data set.
    #[arg(long)]
    pub out: PathBuf,
}

/// What data to simulate (defaults: the data set's defaults for the solver).
#[derive(Args, Debug, Clone, Serialize, Deserialize)]
pub struct DataFlags {
    /// The PDE.
    #[arg(long, value_enum, default_value_t = SolverArg::Burgers)]
    pub solver: SolverArg,
    /// Source (coarse) grid size [default: 32].
    #[arg(long)]
    pub grid: Option<usize>,
    /// Reference (fine) grid size, a multiple of --grid [default: 4 × --grid].
    #[arg(long)]
    pub reference_grid: Option<usize>,
    /// Training simulations [default: 10].
    #[arg(long)]
    pub train_sims: Option<usize>,
    /// Test simulations [default: 5].
    #[arg(long)]
    pub test_sims: Option<usize>,
    /// Steps per simulation [default: 200].
    #[arg(long)]
    pub steps: Option<usize>,
    /// Time step [default: 0.1 Burgers, 0.01 Navier–Stokes].
    #[arg(long)]
    pub dt: Option<f64>,
    /// Viscosity ν [default: 0.1 Burgers, 1e-3 Navier–Stokes].
    #[arg(long)]
    pub viscosity: Option<f64>,
    /// Largest amplitude of the Burgers forcing waves [default: 0.15].
    #[arg(long)]
    pub forcing_amplitude: Option<f64>,
    /// Largest angular frequency of the Burgers forcing waves [default: 0.4].
    #[arg(long)]
    pub forcing_frequency: Option<f64>,
    /// Root-mean-square value of the initial state [default: 1 Burgers, 0.25 Navier–Stokes].
    #[arg(long)]
    pub initial_rms: Option<f64>,
    /// Reference steps before the first recorded state [default: 30, Solver-in-the-Loop's].
    #[arg(long)]
    pub skip_steps: Option<usize>,
    /// Seed of the simulations [default: 2020].
    #[arg(long)]
    pub data_seed: Option<u64>,
}

/// Flags of `deepzero pde`.
#[derive(Args, Debug, Clone, Serialize, Deserialize)]
pub struct RunArgs {
    #[command(flatten)]
    pub data: DataFlags,
    /// Methods, comma separated: src, non, sol-nograd (backprop through the unrolled
    /// corrections, the solver a constant), zo-sol, fo-sol (the exact gradient through the
    /// solver's hand-written adjoint).
    #[arg(long, value_delimiter = ',', default_value = "src,non,zo-sol")]
    pub methods: Vec<Method>,
    /// Epochs of every trained method (see --non-epochs, --zo-sol-epochs).
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Peak learning rate of every trained method, Adam with cosine decay (see --non-lr,
    /// --zo-sol-lr).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Optimizer steps per epoch of every trained method (see --non-steps-per-epoch,
    /// --zo-sol-steps-per-epoch).
    #[arg(long)]
    pub steps_per_epoch: Option<usize>,
    /// Epochs of NON [default: 20].
    #[arg(long)]
    pub non_epochs: Option<usize>,
    /// Peak learning rate of NON [default: 1e-3].
    #[arg(long)]
    pub non_lr: Option<f64>,
    /// Optimizer steps per epoch of NON [default: 100].
    #[arg(long)]
    pub non_steps_per_epoch: Option<usize>,
    /// Epochs of ZO-SOL [default: 10].
    #[arg(long)]
    pub zo_sol_epochs: Option<usize>,
    /// Peak learning rate of ZO-SOL [default: 1e-3].
    #[arg(long)]
    pub zo_sol_lr: Option<f64>,
    /// Optimizer steps per epoch of ZO-SOL [default: 10].
    #[arg(long)]
    pub zo_sol_steps_per_epoch: Option<usize>,
    /// Epochs of sol-nograd and fo-sol [default: 20].
    #[arg(long)]
    pub sol_epochs: Option<usize>,
    /// Peak learning rate of sol-nograd and fo-sol [default: 1e-3].
    #[arg(long)]
    pub sol_lr: Option<f64>,
    /// Optimizer steps per epoch of sol-nograd and fo-sol [default: 100].
    #[arg(long)]
    pub sol_steps_per_epoch: Option<usize>,
    /// Windows per step [default: 10].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Unrolled steps of ZO-SOL, sol-nograd and fo-sol [default: 4].
    #[arg(long)]
    pub unroll: Option<usize>,
    /// Where ZO-SOL starts: non (fine-tunes NON's trained network) or scratch (a fresh
    /// network, the uncorrected solver) [default: non].
    #[arg(long, value_enum)]
    pub zo_sol_start: Option<SolStartArg>,
    /// Fraction of each weight tensor left out of a sparse CGE step [default: 0.9].
    #[arg(long)]
    pub sparsity: Option<f64>,
    /// Finite-difference step of CGE [default: 1e-3].
    #[arg(long)]
    pub mu: Option<f64>,
    /// Hidden channels of the correction network [default: 8].
    #[arg(long)]
    pub width: Option<usize>,
    /// Residual blocks [default: 1].
    #[arg(long)]
    pub blocks: Option<usize>,
    /// Kernel size, odd [default: 5].
    #[arg(long)]
    pub kernel: Option<usize>,
    /// Seed of initialisation, batches and coordinate sets.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Precision of the correction network (f32 runs on our CPU kernels, f64 on candle); the
    /// solvers always run in f64.
    #[arg(long, value_enum, default_value_t = crate::common::DtypeArg::F32)]
    pub dtype: crate::common::DtypeArg,
    /// Threads (0 = all cores); results do not depend on it.
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    #[command(flatten)]
    #[serde(skip)]
    pub distributed: crate::common::DistributedOpts,
    /// Data directory [default: <out>/data]; a matching data set there is reused.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Run directory [default: runs/pde-<UTC time>]; trained methods resume from checkpoints
    /// found in <out>/<method>.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn run(args: PdeArgs) -> Result<()> {
    match args.command {
        Some(PdeCommand::Generate(g)) => generate(g),
        None => execute(args.run),
    }
}

/// A PDE-layer error in the command line's words: the flag that set the bad value.
fn flag_error(e: deepzero_pde::Error) -> anyhow::Error {
    use deepzero_pde::Error as E;
    let flag = match &e {
        E::GridSize { what, .. } if what.contains("reference") => "--reference-grid",
        E::GridSize { .. } => "--grid",
        E::GridRatio { .. } => "--reference-grid",
        E::CflBound { .. } | E::Cfl { .. } => "--dt",
        E::NonFinite { .. } => "--dt (or --lr for a trained correction)",
        E::InvalidParameter { name, .. } => match *name {
            "dt" => "--dt",
            "viscosity" => "--viscosity",
            "steps" => "--steps",
            "batch_size" => "--batch-size",
            "non.steps_per_epoch" => "--non-steps-per-epoch (or --steps-per-epoch)",
            "zo_sol.steps_per_epoch" => "--zo-sol-steps-per-epoch (or --steps-per-epoch)",
            "sol.steps_per_epoch" => "--sol-steps-per-epoch (or --steps-per-epoch)",
            "unroll" => "--unroll",
            "method" => "--methods",
            "train_simulations" => "--train-sims",
            deepzero_pde::dataset::DATASET_SIZE => "--train-sims, --test-sims, --steps, --grid",
            deepzero_pde::dataset::DATASET_WORK => {
                "--train-sims, --test-sims, --skip-steps, --steps, --reference-grid"
            }
            _ => "",
        },
        E::Core(_) => {
            if let E::Core(core) = e {
                return crate::common::flag_error(core);
            }
            ""
        }
        _ => "",
    };
    if flag.is_empty() {
        e.into()
    } else {
        anyhow::anyhow!("{flag}: {e}")
    }
}

fn dataset_config(flags: &DataFlags) -> Result<DatasetConfig> {
    let mut config = DatasetConfig::default();
    match flags.solver {
        SolverArg::Burgers => {
            if let Problem::Burgers2d(params) = &mut config.problem {
                if let Some(dt) = flags.dt {
                    params.dt = dt;
                }
                if let Some(nu) = flags.viscosity {
                    params.viscosity = nu;
                }
            }
        }
        SolverArg::NavierStokes => {
            let mut params = NavierStokesParams::default();
            if let Some(dt) = flags.dt {
                params.dt = dt;
            }
            if let Some(nu) = flags.viscosity {
                params.viscosity = nu;
            }
            config.problem = Problem::NavierStokes(params);
            config.initial = InitialStateConfig::for_problem(&config.problem);
        }
        SolverArg::Burgers1d => bail!(
            "--solver burgers1d: the 1-D Burgers solver has no data set or correction network \
             yet; use --solver burgers or --solver navier-stokes"
        ),
    }
    if let Some(n) = flags.grid {
        config.source_size = n;
        config.reference_size = 4 * n;
    }
    if let Some(n) = flags.reference_grid {
        config.reference_size = n;
    }
    if let Some(n) = flags.train_sims {
        config.train_simulations = n;
    }
    if let Some(n) = flags.test_sims {
        if n == 0 {
            bail!("--test-sims must be at least 1 (the errors are measured on test simulations)");
        }
        config.test_simulations = n;
    }
    if let Some(n) = flags.steps {
        config.steps = n;
    }
    if let Some(n) = flags.skip_steps {
        config.skip_steps = n;
    }
    if let Some(amplitude) = flags.forcing_amplitude {
        if !(amplitude.is_finite() && amplitude >= 0.0) {
            bail!("--forcing-amplitude must be a finite number ≥ 0, got {amplitude}");
        }
        config.forcing.amplitude = amplitude;
    }
    if let Some(omega) = flags.forcing_frequency {
        if !(omega.is_finite() && omega >= 0.0) {
            bail!("--forcing-frequency must be a finite number ≥ 0, got {omega}");
        }
        config.forcing.max_angular_frequency = omega;
    }
    if let Some(rms) = flags.initial_rms {
        if !(rms.is_finite() && rms >= 0.0) {
            bail!("--initial-rms must be a finite number ≥ 0, got {rms}");
        }
        config.initial.rms = rms;
    }
    if let Some(seed) = flags.data_seed {
        config.seed = seed;
    }
    config.validate().map_err(flag_error)?;
    // The solvers check their own parameters (Δt, ν, the CFL bound) when built.
    deepzero_pde::GridSolver::new(
        &config.problem,
        config.reference_size,
        deepzero_pde::WaveField::zero(config.problem.channels()),
    )
    .map_err(flag_error)?;
    Ok(config)
}

fn spinner(message: &str) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    bar.set_style(ProgressStyle::with_template("{spinner} {msg} {elapsed}").expect("template"));
    bar.set_message(message.to_string());
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    bar
}

/// A data directory given by `flag` must be a directory if it exists (it is created otherwise).
fn check_data_dir(dir: &Path, flag: &str) -> Result<()> {
    if dir.exists() && !dir.is_dir() {
        bail!(
            "{flag} {} is a file, not a directory; give the folder that holds (or will hold) the \
             data set",
            dir.display()
        );
    }
    Ok(())
}

fn load_data(dir: &Path, config: &DatasetConfig) -> Result<Dataset> {
    let bar = spinner(&format!("data in {}", dir.display()));
    let dataset = Dataset::load_or_generate(dir, config).map_err(flag_error);
    bar.finish_and_clear();
    dataset
}

fn generate(args: GenerateArgs) -> Result<()> {
    let config = dataset_config(&args.data)?;
    let started = Instant::now();
    check_data_dir(&args.out, "--out")?;
    let dataset = load_data(&args.out, &config)?;
    let errors = rollouts(&prepare(&dataset, &dataset.test).map_err(flag_error)?, None)
        .map_err(crate::common::flag_error)?
        .0;
    eprintln!(
        "{} + {} simulations × {} steps ({}² → {}²) in {}: SRC MAE on the test set {:.4} ({:.1}s)",
        dataset.train.len(),
        dataset.test.len(),
        config.steps,
        config.reference_size,
        config.source_size,
        args.out.display(),
        errors.mae(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `config.json` of a `deepzero pde` run.
#[derive(Serialize)]
struct ResolvedConfig<'a> {
    args: &'a RunArgs,
    dataset: &'a DatasetConfig,
    network: &'a NetworkConfig,
    correction: &'a CorrectionConfig,
}

/// Settings of a pde run's `config.json` that its checkpoints' hash leaves out besides the
/// common ones: which methods run (each has its own checkpoints), where the data set is, and
/// each method's epochs (a resume may raise them, as `--epochs`).
const NOT_HASHED: &[&str] = &[
    "methods",
    "data_dir",
    "non_epochs",
    "zo_sol_epochs",
    "sol_epochs",
];

/// A run into an `--out` that holds checkpoints continues them: refuse it when the flags
/// disagree with the saved `config.json` (all but the epochs, --threads, --methods, --data-dir).
fn check_resume(dir: &Path, args: &RunArgs) -> Result<()> {
    let path = dir.join("config.json");
    let resumes = args
        .methods
        .iter()
        .any(|m| m.trains() && checkpoint::exists(&dir.join(m.name())));
    if !resumes || !path.is_file() {
        return Ok(());
    }
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let saved: Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a deepzero pde config", path.display()))?;
    let saved = saved
        .get("args")
        .with_context(|| format!("{}: not a deepzero pde config (no `args`)", path.display()))?;
    let ids: Vec<String> = config::setting_ids(&serde_json::to_value(args)?)
        .into_iter()
        .filter(|id| !NOT_HASHED.contains(&id.as_str()) && id != "out")
        .collect();
    config::refuse_conflicts(
        &format!("--out {}", dir.display()),
        &config::resume_conflicts(&ids, args, saved)?,
        "its checkpoints would continue under other settings: give the saved flags to go on \
         (--epochs may be raised), or use a new --out",
    )
}

/// One method's figures.
struct Outcome {
    method: Method,
    errors: deepzero_pde::RolloutErrors,
    trajectory: Vec<Vec<f64>>,
    params: usize,
    queries: u64,
    seconds: f64,
}

fn execute(args: RunArgs) -> Result<()> {
    let ranks = args.distributed.connect()?;
    let result = execute_on(args, &ranks);
    ranks.finish(result)
}

/// [`execute`] as one of `ranks`: rank 0 writes the data set and the run directory and reports.
fn execute_on(args: RunArgs, ranks: &crate::common::Ranks) -> Result<()> {
    let root = ranks.is_root();
    crate::common::set_threads(args.threads);
    let dir = args
        .out
        .clone()
        .unwrap_or_else(|| report::default_run_dir("pde"));
    let data = dataset_config(&args.data)?;
    if args.methods.is_empty() {
        bail!("--methods: name at least one of src, non, sol-nograd, zo-sol, fo-sol");
    }
    // Each method once, in the order src, non, sol-nograd, zo-sol, fo-sol: ZO-SOL may start
    // from NON's network.
    let mut methods = args.methods.clone();
    methods.sort_by_key(|m| *m as u8);
    methods.dedup();
    let defaults = NetworkConfig::default();
    let network = NetworkConfig {
        width: args.width.unwrap_or(defaults.width),
        blocks: args.blocks.unwrap_or(defaults.blocks),
        kernel: args.kernel.unwrap_or(defaults.kernel),
        activation: defaults.activation,
    };
    let defaults = CorrectionConfig::default();
    // A method's own flag, else the flag of every method, else the method's default.
    let schedule =
        |d: Schedule, epochs: Option<usize>, lr: Option<f64>, steps: Option<usize>| Schedule {
            epochs: epochs.or(args.epochs).unwrap_or(d.epochs),
            lr: lr.or(args.lr).unwrap_or(d.lr),
            steps_per_epoch: steps.or(args.steps_per_epoch).unwrap_or(d.steps_per_epoch),
        };
    let mut correction = CorrectionConfig {
        batch_size: args.batch_size.unwrap_or(defaults.batch_size),
        non: schedule(
            defaults.non,
            args.non_epochs,
            args.non_lr,
            args.non_steps_per_epoch,
        ),
        zo_sol: schedule(
            defaults.zo_sol,
            args.zo_sol_epochs,
            args.zo_sol_lr,
            args.zo_sol_steps_per_epoch,
        ),
        sol: schedule(
            defaults.sol,
            args.sol_epochs,
            args.sol_lr,
            args.sol_steps_per_epoch,
        ),
        unroll: args.unroll.unwrap_or(defaults.unroll),
        sparsity: args.sparsity.unwrap_or(defaults.sparsity),
        mu: args.mu.unwrap_or(defaults.mu),
        precision: args.dtype.precision(),
        sol_start: args
            .zo_sol_start
            .map_or(defaults.sol_start, SolStartArg::start),
        ..defaults
    };
    correction.validate(&data).map_err(flag_error)?;
    for (method, prefix) in [
        (Method::Non, "--non"),
        (Method::ZoSol, "--zo-sol"),
        (Method::FoSol, "--sol"),
    ] {
        let schedule = correction.schedule(method);
        correction::train_config(schedule, args.seed)
            .validate()
            .map_err(|e| {
                let flag = if schedule.epochs == 0 { "epochs" } else { "lr" };
                anyhow::anyhow!("{prefix}-{flag} (or --{flag}): {e}")
            })?;
    }
    let model = network
        .build(&data)
        .map_err(|e| anyhow::anyhow!("--width/--blocks/--kernel: {e}"))?;
    if correction.sol_start == SolStart::Non
        && methods.contains(&Method::ZoSol)
        && !methods.contains(&Method::Non)
    {
        if args.zo_sol_start.is_none() {
            // The default start needs NON's network; without NON in the run, ZO-SOL starts from
            // a fresh network, and says so (summary.json records the start too).
            crate::note!(
                "note: non is not among --methods, so ZO-SOL starts from a fresh network \
                 (--zo-sol-start scratch); add non to fine-tune NON's network instead"
            );
            correction.sol_start = SolStart::Scratch;
        } else {
            bail!(
                "--zo-sol-start non: ZO-SOL starts from NON's trained network, so --methods must \
             include non (a finished NON run in --out is reused, not trained again)"
            );
        }
    }
    for &method in methods.iter().filter(|m| m.trains()) {
        // Builds the estimator once so that a bad --sparsity or --mu fails before any work.
        correction::estimator(method, &model, &correction, args.seed).map_err(flag_error)?;
    }
    let data_dir = args.data_dir.clone().unwrap_or_else(|| dir.join("data"));
    check_data_dir(&data_dir, "--data-dir")?;
    let resolved = ResolvedConfig {
        args: &args,
        dataset: &data,
        network: &network,
        correction: &correction,
    };
    if root {
        check_resume(&dir, &args)?;
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        report::write_json_atomic(&dir.join("config.json"), &resolved)?;
        load_data(&data_dir, &data)?;
    }
    // The other ranks read the data set rank 0 found or generated.
    ranks.barrier("waiting for rank 0 to generate the data set")?;
    let dataset = load_data(&data_dir, &data)?;
    let train = prepare(&dataset, &dataset.train).map_err(flag_error)?;
    let test = prepare(&dataset, &dataset.test).map_err(flag_error)?;
    let scaling = deepzero_pde::Scaling::measure(&train).map_err(flag_error)?;
    crate::note!(
        "{}: {} + {} simulations × {} steps, network {} ({} parameters)",
        dir.display(),
        train.len(),
        test.len(),
        data.steps,
        model.name,
        model.num_params()
    );
    let mut outcomes = Vec::new();
    let mut non_params: Option<candle_core::Tensor> = None;
    for &method in &methods {
        let started = Instant::now();
        let outcome = if method.trains() {
            let method_dir = dir.join(method.name());
            if root {
                std::fs::create_dir_all(&method_dir)?;
            }
            let fingerprint = config::fingerprint(&method_dir, &resolved, NOT_HASHED, &[])?;
            let mut state = if checkpoint::exists(&method_dir) {
                config::load_checkpoint(&method_dir, &candle_core::Device::Cpu, &fingerprint)?
            } else {
                let mut s = correction::initial_state(&model, args.seed, correction.precision)
                    .map_err(flag_error)?;
                if method == Method::ZoSol && correction.sol_start == SolStart::Non {
                    s.params = non_params
                        .clone()
                        .context("ZO-SOL starts from NON's network, and NON has not run")?;
                }
                s.fingerprint = Some(fingerprint);
                s
            };
            let mut observer = PdeObserver::new(&method_dir, method);
            let mut silent = deepzero_core::trainer::Silent;
            let shared = (ranks.comm.size() > 1).then(|| std::sync::Arc::clone(&ranks.comm));
            correction::train(
                method,
                &model,
                &scaling,
                &train,
                &test,
                &correction,
                args.seed,
                &mut state,
                if root { &mut observer } else { &mut silent },
                shared,
            )
            .map_err(flag_error)?;
            observer.bar.finish_and_clear();
            if method == Method::Non {
                non_params = Some(state.params.clone());
            }
            let (errors, trajectories) = rollouts(&test, Some((&model, &scaling, &state.params)))
                .map_err(crate::common::flag_error)?;
            Outcome {
                method,
                errors,
                trajectory: flatten(&trajectories[0]),
                params: model.num_params(),
                queries: state.queries,
                seconds: state.seconds,
            }
        } else {
            let (errors, trajectories) =
                rollouts(&test, None).map_err(crate::common::flag_error)?;
            Outcome {
                method,
                errors,
                trajectory: flatten(&trajectories[0]),
                params: 0,
                queries: 0,
                seconds: started.elapsed().as_secs_f64(),
            }
        };
        crate::note!(
            "{:>6}: test MAE {} ± {}  ({} queries, {:.1}s)",
            method.name(),
            four_digits(outcome.errors.mae()),
            four_digits(outcome.errors.mae_std()),
            outcome.queries,
            outcome.seconds
        );
        outcomes.push(outcome);
    }
    if root {
        write_reports(&dir, &outcomes, &test, &model.name, &scaling, &correction)?;
        eprintln!("summary → {}", dir.join("summary.json").display());
    }
    Ok(())
}

fn flatten(states: &[ndarray::Array3<f64>]) -> Vec<Vec<f64>> {
    states.iter().map(|s| s.iter().copied().collect()).collect()
}

fn write_reports(
    dir: &Path,
    outcomes: &[Outcome],
    test: &[deepzero_pde::PreparedSimulation],
    model: &str,
    scaling: &deepzero_pde::Scaling,
    correction: &CorrectionConfig,
) -> Result<()> {
    let mut mae = Map::new();
    let mut mae_std = Map::new();
    let mut params = Map::new();
    let mut queries = Map::new();
    let mut seconds = Map::new();
    for o in outcomes {
        let name = o.method.name().to_string();
        mae.insert(name.clone(), json!(o.errors.mae()));
        mae_std.insert(name.clone(), json!(o.errors.mae_std()));
        params.insert(name.clone(), json!(o.params));
        queries.insert(name.clone(), json!(o.queries));
        seconds.insert(name, json!(o.seconds));
    }
    let summary = json!({
        "mae": mae, "mae_std": mae_std, "params": params, "queries": queries,
        "seconds": seconds, "model": model, "scaling": scaling,
        "zo_sol_start": correction.sol_start.name(),
        "mae_per_step": outcomes.iter().map(|o| (o.method.name().to_string(), json!(o.errors.mae_per_step))).collect::<Map<String, Value>>(),
    });
    report::write_json_atomic(&dir.join("summary.json"), &summary)?;
    let curves: Vec<(String, Vec<f64>)> = outcomes
        .iter()
        .map(|o| {
            (
                o.method.name().to_uppercase(),
                o.errors.mae_per_step.clone(),
            )
        })
        .collect();
    plot_mae_over_time(dir, &curves)?;
    // Heat maps of the first channel of the first test simulation.
    let Some(simulation) = test.first() else {
        return Ok(());
    };
    let reference = simulation.reference();
    let steps = reference.len() - 1;
    let shots: Vec<usize> = [steps / 4, steps / 2, steps]
        .into_iter()
        .filter(|&s| s > 0)
        .collect();
    let n = reference[0].shape()[1];
    let field = |values: &[f64]| Field {
        n,
        values: values[..n * n].to_vec(),
    };
    let mut rows = vec![(
        "reference".to_string(),
        shots
            .iter()
            .map(|&s| field(reference[s].as_slice().unwrap_or(&[])))
            .collect::<Vec<_>>(),
    )];
    for o in outcomes {
        rows.push((
            o.method.name().to_uppercase(),
            shots.iter().map(|&s| field(&o.trajectory[s])).collect(),
        ));
    }
    let columns: Vec<String> = shots.iter().map(|s| format!("step {s}")).collect();
    report::write_field_grid(
        dir,
        "fields",
        "First state channel, test simulation 0",
        &columns,
        &rows,
    )
}

/// `mae_over_time.png|svg`: each curve's MAE against the reference at every step (`deepzero
/// report` overlays several runs' curves with it).
pub fn plot_mae_over_time(dir: &Path, curves: &[(String, Vec<f64>)]) -> Result<()> {
    let series: Vec<Series> = curves
        .iter()
        .map(|(label, mae)| Series {
            label: label.clone(),
            points: mae
                .iter()
                .enumerate()
                .map(|(i, v)| (i as f64, *v))
                .collect(),
        })
        .collect();
    report::write_line_chart(
        dir,
        "mae_over_time",
        &LineChart {
            title: "Mean absolute error against the reference (test simulations)",
            x_label: "step",
            y_label: "MAE",
            series: &series,
            y_range: None,
            log_y: false,
        },
    )
}

/// Progress bar, `metrics.jsonl` and checkpoints of one trained method.
struct PdeObserver {
    dir: PathBuf,
    method: Method,
    bar: ProgressBar,
}

impl PdeObserver {
    fn new(dir: &Path, method: Method) -> Self {
        let bar = ProgressBar::with_draw_target(Some(1), ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} ({eta})")
                .expect("valid template")
                .progress_chars("=> "),
        );
        Self {
            dir: dir.to_path_buf(),
            method,
            bar,
        }
    }
}

impl Observer for PdeObserver {
    fn on_step(&mut self, info: &StepInfo) {
        if info.step == 1 {
            self.bar.reset();
            self.bar.set_length(info.steps as u64);
            self.bar
                .set_prefix(format!("{} epoch {}", self.method.name(), info.epoch));
        }
        self.bar.set_position(info.step as u64);
        self.bar.set_message(format!(
            "loss {:.5} | {:.0} queries/s",
            info.loss, info.queries_per_second
        ));
    }

    fn on_epoch_end(&mut self, m: &EpochMetrics, state: &TrainState) -> deepzero_core::Result<()> {
        let io = |e: anyhow::Error| {
            deepzero_core::Error::Config(format!("writing the run directory: {e:#}"))
        };
        self.bar
            .suspend(|| eprintln!("{}: {}", self.method.name(), epoch_line(m)));
        checkpoint::save(&self.dir, state)?;
        let mut lines = String::new();
        for h in &state.history {
            lines.push_str(&serde_json::to_string(h).map_err(|e| io(e.into()))?);
            lines.push('\n');
        }
        report::write_atomic(&self.dir.join("metrics.jsonl"), lines.as_bytes()).map_err(io)?;
        Ok(())
    }
}
