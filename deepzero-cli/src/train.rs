//! `deepzero train`: one run, one directory.

use crate::common::{
    build_model, checkpoint_hook, flag_error, initial_params, load_data, set_threads,
    CheckpointHook, DataOpts, DeviceArg, DistributedOpts, DtypeArg, EstimatorOpts, ModelOpts,
    Ranks, SparsityOpts,
};
use crate::config;
use crate::note;
use crate::report::{self, LineChart, Series};
use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use deepzero_core::checkpoint;
use deepzero_core::model::Model;
use deepzero_core::optim::{OptimizerConfig, OptimizerKind};
use deepzero_core::task::{ClassificationConfig, ClassificationTask, Task};
use deepzero_core::trainer::{
    EpochMetrics, Observer, Silent, StepInfo, TrainConfig, TrainState, Trainer,
};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OptimizerArg {
    Sgd,
    Adam,
}

/// Flags of `deepzero train`.
#[derive(Args, Debug, Clone, Serialize, Deserialize)]
pub struct TrainArgs {
    #[command(flatten)]
    pub data: DataOpts,
    #[command(flatten)]
    pub model: ModelOpts,
    #[command(flatten)]
    pub estimator: EstimatorOpts,
    #[command(flatten)]
    #[serde(default)]
    pub sparsity: SparsityOpts,
    /// Training epochs.
    #[arg(long, default_value_t = 20)]
    pub epochs: usize,
    /// Mini-batch size.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Peak learning rate [default: 0.1; 0.01 with `--estimator rge`].
    #[arg(long)]
    pub lr: Option<f64>,
    /// SGD momentum (Adam β1).
    #[arg(long, default_value_t = 0.9)]
    pub momentum: f64,
    /// L2 weight decay.
    #[arg(long, default_value_t = 5e-4)]
    pub weight_decay: f64,
    /// Linear warm-up epochs before the cosine decay [default: epochs / 10].
    #[arg(long)]
    pub warmup_epochs: Option<usize>,
    /// Optimizer.
    #[arg(long, value_enum, default_value_t = OptimizerArg::Sgd)]
    pub optimizer: OptimizerArg,
    /// Seed of every random choice.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Numeric precision.
    #[arg(long, value_enum, default_value_t = DtypeArg::F32)]
    pub dtype: DtypeArg,
    /// Device.
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    pub device: DeviceArg,
    /// Threads for tensor kernels and queries (0 = all cores; more than the cores are capped to
    /// them with a warning); results do not depend on it, and `--resume` takes it from the
    /// resuming command.
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    #[command(flatten)]
    #[serde(skip)]
    pub distributed: DistributedOpts,
    /// Disable CIFAR-10 augmentation (random crop, horizontal flip).
    #[arg(long)]
    pub no_augment: bool,
    /// Run directory [default: runs/train-<UTC time>].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Allow writing into a non-empty --out directory.
    #[arg(long)]
    #[serde(skip)]
    pub overwrite: bool,
    /// Continue the run in this directory from its last checkpoint. Other flags are read from
    /// its config.json: --epochs may be raised, --threads and --distributed are this command's,
    /// any other flag given must agree with the saved config.
    #[arg(long)]
    #[serde(skip)]
    pub resume: Option<PathBuf>,
    /// The flags given on the command line (clap ids), for `--resume`'s conflict check.
    #[arg(skip)]
    #[serde(skip)]
    pub given: Vec<String>,
}

/// The run's own copy of its layer ratios (`--ratios`, `--prune`): a resume reads this one.
const RATIOS_FILE: &str = "ratios.json";

/// Settings of `config.json` a checkpoint's configuration hash leaves out besides the common
/// ones: the `--ratios` path (the run's copy, `ratios.json`, is hashed as an input instead).
const NOT_HASHED: &[&str] = &["ratios"];

/// The last file a train run writes: a run without it did not finish.
const SUMMARY_FILE: &str = "summary.json";

/// Files a train run writes besides its checkpoints (removed by `--overwrite`).
const RUN_FILES: &[&str] = &[
    "config.json",
    RATIOS_FILE,
    "metrics.jsonl",
    SUMMARY_FILE,
    "loss.png",
    "loss.svg",
    "accuracy.png",
    "accuracy.svg",
];

/// `summary.json`.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Summary {
    /// Test accuracy after the last epoch, in [0, 1].
    pub test_accuracy: f64,
    /// Best test accuracy over the epochs.
    pub best_test_accuracy: f64,
    /// Mean training loss of the last epoch.
    pub final_train_loss: f64,
    /// Queries (loss evaluations) of the whole run.
    pub queries: u64,
    /// Mean queries per training step.
    pub queries_per_step: f64,
    /// Training seconds (evaluation excluded).
    pub wall_seconds: f64,
    /// Training seconds per epoch.
    pub seconds_per_epoch: f64,
    /// Model parameters.
    pub params: usize,
    /// Model name.
    pub model: String,
    /// Data set name.
    pub dataset: String,
    /// Estimator name.
    pub estimator: String,
    /// Epochs completed.
    pub epochs: usize,
}

pub fn run(args: TrainArgs) -> Result<()> {
    execute(args).map(|_| ())
}

/// The estimator's default peak learning rate ([`EstimatorKind::default_lr`]).
fn default_lr(args: &TrainArgs) -> f64 {
    deepzero_core::estimator::EstimatorKind::from(args.estimator.estimator).default_lr()
}

/// The loop's settings of `args`, checked (also the batch size). `deepzero experiment` checks
/// its flags with this before it creates anything.
pub fn train_config(args: &TrainArgs) -> Result<TrainConfig> {
    let config = TrainConfig {
        epochs: args.epochs,
        lr: args.lr.unwrap_or_else(|| default_lr(args)),
        warmup_epochs: args.warmup_epochs.unwrap_or(args.epochs / 10),
        optimizer: OptimizerConfig {
            kind: match args.optimizer {
                OptimizerArg::Sgd => OptimizerKind::Sgd,
                OptimizerArg::Adam => OptimizerKind::Adam,
            },
            momentum: args.momentum,
            weight_decay: args.weight_decay,
        },
        seed: args.seed,
    };
    config.validate().map_err(flag_error)?;
    config.optimizer.build().map_err(flag_error)?;
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    Ok(config)
}

/// One training run as configured by `args` (fresh into `args.out`, or `--resume`); writes the
/// run directory and returns its summary. `deepzero experiment` calls this for every sub-run.
pub fn execute(args: TrainArgs) -> Result<Summary> {
    let ranks = args.distributed.connect()?;
    let result = execute_on(args, &ranks);
    ranks.finish(result)
}

/// [`execute`] as one of `ranks` (rank 0 writes the run directory and reports).
fn execute_on(args: TrainArgs, ranks: &Ranks) -> Result<Summary> {
    let (args, dir, resumed) = match &args.resume {
        Some(dir) => (resumed_args(dir, &args)?, dir.clone(), true),
        None => {
            let mut args = args;
            // Save the resolved values, not the "use the default" markers.
            args.warmup_epochs = Some(args.warmup_epochs.unwrap_or(args.epochs / 10));
            args.lr = Some(args.lr.unwrap_or_else(|| default_lr(&args)));
            args.model.resolve();
            let dir = args
                .out
                .clone()
                .unwrap_or_else(|| report::default_run_dir("train"));
            if ranks.is_root() {
                // Checked now, created once the whole set-up has succeeded.
                report::check_run_dir(&dir, args.overwrite)?;
            }
            (args, dir, false)
        }
    };
    set_threads(args.threads);
    let device = args.device.kind().device()?;
    let (train, test, augment) = load_data(&args.data, args.seed, !args.no_augment)?;
    let model = build_model(&args.model, &train)?;
    let config = train_config(&args)?;
    let precision = args.dtype.precision();
    let mut task = ClassificationTask::new(
        &model,
        &train,
        &test,
        ClassificationConfig {
            batch_size: args.batch_size,
            eval_batch_size: 500,
            augment,
            precision,
            prune_per_class: args.sparsity.prune_per_class,
        },
    )?;
    let init = initial_params(&model, args.seed, precision, &device)?;
    let setup = crate::prune::build_estimator(
        &args.estimator,
        &args.sparsity,
        &model,
        &train,
        &init,
        args.seed,
    )?;
    let mut estimator = setup.estimator;
    ranks.share(estimator.as_mut())?;
    let mut optimizer = config.optimizer.build().map_err(flag_error)?;
    if !resumed && ranks.is_root() {
        // Everything is checked: now the run directory, cleared of an older run's outputs.
        report::prepare_run_dir(&dir, args.overwrite)?;
        if args.overwrite {
            report::clear_previous_run(&dir, RUN_FILES)?;
        }
        if let Some(r) = &setup.ratios {
            report::write_json_atomic(&dir.join(RATIOS_FILE), r)?;
        }
    }
    // What the checkpoints of this run belong to: its configuration and its copy of the ratios.
    let fingerprint = (resumed || ranks.is_root())
        .then(|| config::fingerprint(&dir, &args, NOT_HASHED, &[RATIOS_FILE]))
        .transpose()?;
    let mut state = if let (true, Some(expected)) = (resumed, &fingerprint) {
        let mut s = config::load_checkpoint(&dir, &device, expected)?;
        s.params = s.params.to_dtype(precision.dtype())?;
        optimizer.load_state(&s.optimizer)?;
        if s.epoch >= config.epochs && dir.join(SUMMARY_FILE).is_file() {
            bail!(
                "--resume {}: the run already finished its {} epochs (raise --epochs to go on)",
                dir.display(),
                config.epochs
            );
        }
        if ranks.is_root() && args.given.iter().any(|id| id == "epochs") {
            // The new length is the run's from now on (a later resume keeps it).
            report::write_json_atomic(&dir.join("config.json"), &args)?;
        }
        match s.epoch >= config.epochs {
            // Stopped after its last checkpoint, before its summary: write the reports.
            true => note!("finishing the reports of {}", dir.display()),
            false => note!("resuming {} at epoch {}", dir.display(), s.epoch + 1),
        }
        s
    } else {
        if ranks.is_root() {
            report::write_json_atomic(&dir.join("config.json"), &args)?;
        }
        let mut s = TrainState::new(init);
        s.fingerprint = fingerprint;
        s
    };
    note!(
        "deepzero train: {} ({} params) on {:?} ({} train / {} test), estimator {}, {} epochs → {}",
        model.name,
        model.num_params(),
        args.data.dataset,
        train.len(),
        test.len(),
        estimator.name(),
        config.epochs,
        dir.display()
    );
    let resumed_at_end = resumed && state.epoch >= config.epochs;
    let steps_per_epoch = task.steps_per_epoch();
    let trainer = Trainer { config: &config };
    let mut obs = match ranks.is_root() {
        true => Some(RunObserver::new(
            &dir,
            steps_per_epoch,
            &model,
            &args,
            checkpoint_hook()?,
        )?),
        false => None,
    };
    let mut silent = Silent;
    let started = Instant::now();
    let trained = trainer.run(
        &mut task,
        &mut state,
        estimator.as_mut(),
        optimizer.as_mut(),
        match &mut obs {
            Some(o) => o,
            None => &mut silent,
        },
    );
    if let Err(e @ deepzero_core::Error::Diverged(_)) = trained {
        let kept = match state.epoch {
            0 => "no checkpoint was written (it diverged in epoch 1)".to_string(),
            n => format!("{} keeps the checkpoint of epoch {n}", dir.display()),
        };
        bail!("{e}; {kept}");
    }
    trained.map_err(flag_error)?;
    let last = state.history.last().context("no epoch finished")?;
    let steps = (steps_per_epoch * state.epoch) as f64;
    let accuracy = |m: &EpochMetrics| m.get("test_accuracy").unwrap_or(f64::NAN);
    let summary = Summary {
        test_accuracy: accuracy(last),
        best_test_accuracy: state.history.iter().map(accuracy).fold(0.0, f64::max),
        final_train_loss: last.train_loss,
        queries: state.queries,
        queries_per_step: state.queries as f64 / steps.max(1.0),
        wall_seconds: state.seconds,
        seconds_per_epoch: state.seconds / state.epoch.max(1) as f64,
        params: model.num_params(),
        model: model.name.clone(),
        dataset: format!("{:?}", args.data.dataset).to_lowercase(),
        estimator: estimator.name(),
        epochs: state.epoch,
    };
    let Some(obs) = obs else {
        return Ok(summary);
    };
    obs.bar.finish_and_clear();
    if resumed_at_end {
        obs.write_history(&state.history)?;
    }
    report::write_json_atomic(&dir.join(SUMMARY_FILE), &summary)?;
    eprintln!(
        "done in {:.1}s (this process {:.1}s): test accuracy {:.4} (best {:.4}), {} queries → {}",
        state.seconds,
        started.elapsed().as_secs_f64(),
        summary.test_accuracy,
        summary.best_test_accuracy,
        summary.queries,
        dir.join("summary.json").display()
    );
    Ok(summary)
}

/// The flags of the run saved in `dir`, for `--resume dir` given `args` (this command's flags):
/// how to run (threads, ranks) comes from this command, what to compute from `config.json`.
fn resumed_args(dir: &Path, args: &TrainArgs) -> Result<TrainArgs> {
    let path = dir.join("config.json");
    let text = report::read_saved_config(dir, "train")?;
    let mut saved: TrainArgs = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a deepzero train config", path.display()))?;
    config::check_resumable(dir, &args.given, args, &saved)?;
    saved.resume = None;
    saved.given = args.given.clone();
    // The thread count is how to run, not what to compute (estimates do not depend on
    // it): a resumed run uses this command's `--threads`.
    saved.threads = args.threads;
    saved.distributed = args.distributed.clone();
    if args.given.iter().any(|id| id == "epochs") {
        saved.epochs = args.epochs;
    }
    if saved.sparsity.ratios.is_some() {
        // The run's own copy: the file given to `--ratios` may have changed or gone since.
        let copy = dir.join(RATIOS_FILE);
        if !copy.is_file() {
            bail!(
                "--resume {}: {} is missing (the run's copy of its --ratios file); restore it or \
                 start the run again",
                dir.display(),
                copy.display()
            );
        }
        saved.sparsity.ratios = Some(copy);
    }
    Ok(saved)
}

struct RunObserver {
    dir: PathBuf,
    /// Called between a checkpoint's writes ([`checkpoint_hook`]).
    checkpoint_hook: CheckpointHook,
    bar: ProgressBar,
    label: String,
    /// Without a terminal the bar is hidden: print a line at most once a minute instead.
    plain: Option<Instant>,
}

impl RunObserver {
    fn new(
        dir: &Path,
        steps: usize,
        model: &Model,
        args: &TrainArgs,
        checkpoint_hook: CheckpointHook,
    ) -> Result<Self> {
        let bar = ProgressBar::with_draw_target(Some(steps as u64), ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template("epoch {prefix} [{bar:30}] {pos}/{len} {msg} ({eta})")
                .expect("valid template")
                .progress_chars("=> "),
        );
        let est = format!("{:?}", args.estimator.estimator).to_lowercase();
        Ok(RunObserver {
            dir: dir.to_path_buf(),
            checkpoint_hook,
            plain: (!std::io::IsTerminal::is_terminal(&std::io::stderr())).then(Instant::now),
            bar,
            label: format!("{} {}", model.name, est),
        })
    }

    /// `metrics.jsonl` and the loss plots, from the checkpointed history.
    fn write_history(&self, history: &[EpochMetrics]) -> Result<()> {
        let mut lines = String::new();
        for h in history {
            lines.push_str(&serde_json::to_string(h)?);
            lines.push('\n');
        }
        report::write_atomic(&self.dir.join("metrics.jsonl"), lines.as_bytes())?;
        plot_history(&self.dir, history, &self.label)
    }
}

impl Observer for RunObserver {
    fn on_step(&mut self, info: &StepInfo) {
        if info.step == 1 {
            self.bar.reset();
            self.bar.set_length(info.steps as u64);
            self.bar.set_prefix(info.epoch.to_string());
        }
        self.bar.set_position(info.step as u64);
        self.bar.set_message(format!(
            "loss {:.4} | {:.0} queries/s",
            info.loss, info.queries_per_second
        ));
        if let Some(last) = &mut self.plain {
            if last.elapsed().as_secs() >= 60 {
                *last = Instant::now();
                eprintln!(
                    "epoch {} step {}/{}: loss {:.4}, {:.0} queries/s",
                    info.epoch, info.step, info.steps, info.loss, info.queries_per_second
                );
            }
        }
    }

    fn on_epoch_end(&mut self, m: &EpochMetrics, state: &TrainState) -> deepzero_core::Result<()> {
        let io = |e: anyhow::Error| {
            deepzero_core::Error::Config(format!("writing the run directory: {e:#}"))
        };
        self.bar.suspend(|| eprintln!("{}", epoch_line(m)));
        // Checkpoint first, then rewrite metrics.jsonl from the checkpointed history, so that a
        // run killed at any point resumes with metrics and parameters that agree.
        checkpoint::save_with(&self.dir, state, &mut *self.checkpoint_hook)?;
        self.write_history(&state.history).map_err(io)
    }
}

/// One line per finished epoch: the fixed figures and the task's metrics by name.
pub fn epoch_line(m: &EpochMetrics) -> String {
    let metrics: Vec<String> = m
        .metrics
        .iter()
        .map(|(k, v)| format!("{} {}", k.replace('_', " "), four_digits(*v)))
        .collect();
    format!(
        "epoch {:>3}: train loss {}  {}  queries {}  {:.1}s",
        m.epoch,
        four_digits(m.train_loss),
        metrics.join("  "),
        m.queries,
        m.seconds
    )
}

/// `v` with four decimals, or four significant digits in exponent form below 0.01 (a PDE error
/// of 1.3e-4 would read 0.0001).
pub fn four_digits(v: f64) -> String {
    if v != 0.0 && v.abs() < 0.01 && v.is_finite() {
        format!("{v:.3e}")
    } else {
        format!("{v:.4}")
    }
}

/// Plots of a run's history, named by the task's metrics: every metric whose name ends in
/// `loss` goes into `loss.png|svg` with the training loss, every `…accuracy` metric into
/// `accuracy.png|svg`, and any other metric into a chart of its own name.
pub fn plot_history(dir: &Path, h: &[EpochMetrics], label: &str) -> Result<()> {
    let names: Vec<String> = h
        .first()
        .map(|m| m.metrics.iter().map(|(k, _)| k.clone()).collect())
        .unwrap_or_default();
    let series = |name: &str, label: String| Series {
        label,
        points: h
            .iter()
            .filter_map(|m| m.get(name).map(|v| (m.epoch as f64, v)))
            .collect(),
    };
    let pretty = |n: &str| n.replace('_', " ");
    let mut loss = vec![series("train_loss", "train loss".into())];
    let mut accuracy = Vec::new();
    let mut others = Vec::new();
    for n in &names {
        if n.ends_with("loss") {
            loss.push(series(n, pretty(n)));
        } else if n.ends_with("accuracy") {
            accuracy.push(series(n, format!("{} ({label})", pretty(n))));
        } else {
            others.push(n.clone());
        }
    }
    if !accuracy.is_empty() {
        report::write_line_chart(
            dir,
            "accuracy",
            &LineChart {
                title: "Test accuracy",
                x_label: "epoch",
                y_label: "accuracy",
                series: &accuracy,
                y_range: None,
                log_y: false,
            },
        )?;
    }
    report::write_line_chart(
        dir,
        "loss",
        &LineChart {
            title: "Loss",
            x_label: "epoch",
            y_label: "loss",
            series: &loss,
            y_range: None,
            log_y: false,
        },
    )?;
    for n in others {
        let title = pretty(&n);
        report::write_line_chart(
            dir,
            &n,
            &LineChart {
                title: &title,
                x_label: "epoch",
                y_label: &title,
                series: &[series(&n, format!("{title} ({label})"))],
                y_range: None,
                log_y: false,
            },
        )?;
    }
    Ok(())
}
