//! `deepzero certify train-denoiser` and `deepzero certify compare`: denoised smoothing of a
//! black-box classifier. The algorithms live in `deepzero_certify::denoise`; this file parses,
//! calls and reports.

use crate::common::{DataArg, DataOpts, DistributedOpts, Ranks};
use crate::config;
use crate::note;
use crate::report::{self, LineChart, Series};
use crate::train::{epoch_line, plot_history};
use anyhow::{bail, Context, Result};
use clap::Args;
use deepzero_certify::denoise::DenoiserTask;
use deepzero_certify::smoothing::SmoothingConfig;
use deepzero_certify::tsv::{certified_accuracy, read_tsv, CertifyRow, TSV_HEADER};
use deepzero_certify::{
    certify_images, Autoencoder, AutoencoderSpec, BlackBox, DenoiseConfig, DenoiseMethod,
    DenoisedClassifier, DenoiserRecord, DenoiserRun, ModelClassifier, ZoConfig,
};
use deepzero_core::checkpoint;
use deepzero_core::data::Dataset;
use deepzero_core::estimator::Backprop;
use deepzero_core::model::{Model, ModelSpec, Precision};
use deepzero_core::optim::{OptimizerConfig, OptimizerKind};
use deepzero_core::seed::initial_params;
use deepzero_core::task::Task;
use deepzero_core::trainer::{
    EpochMetrics, Observer, Silent, StepInfo, TrainConfig, TrainState, Trainer,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

fn parse_method(s: &str) -> std::result::Result<DenoiseMethod, String> {
    s.parse()
        .map_err(|e: deepzero_certify::Error| e.to_string())
}

/// Flags of `deepzero certify train-denoiser`.
#[derive(Args, Debug, Clone, Serialize, Deserialize)]
pub struct TrainDenoiserArgs {
    /// The black box: `run:DIR` (a `deepzero train` run; needed for `fo`), `process:COMMAND`
    /// or `onnx:FILE`.
    #[arg(long, required_unless_present = "resume")]
    pub classifier: Option<String>,
    /// Noise level σ in [0, 1] pixel units.
    #[arg(long, default_value_t = DenoiseConfig::default().sigma)]
    pub sigma: f64,
    /// mse | deepzero | zo-ae-ds | zo-ds | fo.
    #[arg(long, value_parser = parse_method, default_value = "deepzero")]
    pub method: DenoiseMethod,
    /// Start from this denoiser run (e.g. an `mse` pre-training).
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// Data set (the classifier's).
    #[arg(long, value_enum, default_value_t = DataArg::FashionMnist)]
    pub dataset: DataArg,
    /// Directory with the data set's files.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Use only the first N training images.
    #[arg(long)]
    pub train_limit: Option<usize>,
    /// DnCNN depth (conv layers).
    #[arg(long, default_value_t = 4)]
    pub depth: usize,
    /// DnCNN width (channels).
    #[arg(long, default_value_t = 16)]
    pub width: usize,
    /// Epochs.
    #[arg(long, default_value_t = 5)]
    pub epochs: usize,
    /// Peak learning rate (Adam, cosine decay).
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    /// Mini-batch size.
    #[arg(long, default_value_t = DenoiseConfig::default().batch_size)]
    pub batch_size: usize,
    /// Test images evaluated after each epoch.
    #[arg(long, default_value_t = DenoiseConfig::default().eval_size)]
    pub eval_size: usize,
    /// Finite-difference step μ of the ZO methods.
    #[arg(long, default_value_t = ZoConfig::default().mu)]
    pub mu: f64,
    /// ZO-DS directions per step.
    #[arg(long, default_value_t = ZoConfig::default().q)]
    pub q: usize,
    /// DeepZero: fraction of the denoiser's weights left out of CGE (ZO-GraSP ratios).
    #[arg(long, default_value_t = ZoConfig::default().sparsity)]
    pub sparsity: f64,
    /// ZO-AE-DS: code dimension (queries per image and step: code + 1).
    #[arg(long, default_value_t = AutoencoderSpec::default().code)]
    pub ae_code: usize,
    /// ZO-AE-DS: hidden width of encoder and decoder.
    #[arg(long, default_value_t = AutoencoderSpec::default().hidden)]
    pub ae_hidden: usize,
    /// ZO-AE-DS: autoencoder pre-training epochs (MSE, backprop).
    #[arg(long, default_value_t = 5)]
    pub ae_epochs: usize,
    /// Seed of noise, batches, directions and pruning.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    #[command(flatten)]
    #[serde(skip)]
    pub distributed: DistributedOpts,
    /// Run directory [default: runs/denoiser-<method>-<UTC time>].
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

/// `summary.json` of a denoiser run.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct DenoiserSummary {
    pub method: String,
    pub sigma: f64,
    pub epochs: usize,
    pub denoiser_params: usize,
    /// Stability (f(D(x+δ)) = f(x)) and accuracy on the evaluation images after the last epoch.
    pub test_stability: f64,
    pub test_accuracy: f64,
    pub test_mse: f64,
    pub final_train_loss: f64,
    /// Images shown to the black box for training (labels included).
    pub black_box_queries: u64,
    /// Black-box images per training step of a full batch.
    pub black_box_queries_per_step: u64,
    /// Loss evaluations per step as the estimator counts them (CGE: coordinates + 1).
    pub estimator_queries_per_step: f64,
    pub estimator: String,
    pub wall_seconds: f64,
    /// The train/test split of the data set (the victim's own; absent in older runs).
    #[serde(default)]
    pub split: Option<crate::certify::Split>,
}

/// Raw pixels (in [0, 1]) of the data set, the training set limited.
fn raw_data(
    dataset: DataArg,
    dir: &Option<PathBuf>,
    limit: Option<usize>,
    seed: u64,
) -> Result<(Dataset, Dataset)> {
    crate::common::raw_data(
        &DataOpts {
            dataset,
            data_dir: dir.clone(),
            train_limit: limit,
            test_limit: None,
        },
        seed,
    )
}

/// A black box and, where it is a deepzero model, the same classifier as a white box.
type Classifiers = (Arc<dyn BlackBox>, Option<Arc<ModelClassifier>>);

/// The black box `spec` names; for `run:DIR` also the white box (its model).
fn open_classifier(spec: &str, shape: [usize; 3]) -> Result<Classifiers> {
    let (kind, rest) = spec.split_once(':').with_context(|| {
        format!("--classifier {spec}: expected run:DIR, process:COMMAND or onnx:FILE")
    })?;
    if kind == "run" {
        let m = Arc::new(crate::certify::model_classifier(Path::new(rest))?);
        let want = m.input_shape();
        if want != shape {
            bail!("--classifier {spec} takes images of {want:?}, the data set has {shape:?}");
        }
        return Ok((m.clone(), Some(m)));
    }
    let bb: Arc<dyn BlackBox> = Arc::from(crate::certify::classifier_from_spec(
        spec,
        shape,
        std::time::Duration::from_secs(60),
    )?);
    let white = None;
    Ok((bb, white))
}

fn adam(epochs: usize, lr: f64, seed: u64) -> TrainConfig {
    TrainConfig {
        epochs,
        lr,
        warmup_epochs: 0,
        seed,
        optimizer: OptimizerConfig {
            kind: OptimizerKind::Adam,
            momentum: 0.9,
            weight_decay: 0.0,
        },
    }
}

/// Pre-train the ZO-AE-DS autoencoder (MSE on clean images, backprop), or load it on resume.
fn autoencoder(
    args: &TrainDenoiserArgs,
    dir: &Path,
    train: &Dataset,
    test: &Dataset,
    bb: &Arc<dyn BlackBox>,
    resumed: bool,
) -> Result<Arc<Autoencoder>> {
    let spec = AutoencoderSpec {
        hidden: args.ae_hidden,
        code: args.ae_code,
    };
    let shape = [train.channels, train.height, train.width];
    if resumed {
        let run = DenoiserRun::load(dir)?;
        return run
            .autoencoder
            .map(Arc::new)
            .context("the resumed run has no autoencoder");
    }
    let model = spec.build(shape)?;
    let cfg = DenoiseConfig {
        method: DenoiseMethod::Mse,
        sigma: 0.0,
        batch_size: 64,
        seed: args.seed,
        eval_size: args.eval_size,
        ..DenoiseConfig::default()
    };
    let mut task = DenoiserTask::new(&model, train, test, bb.clone(), None, None, cfg)?;
    let p = initial_params(&model, args.seed);
    let mut state = TrainState::new(
        candle_core::Tensor::from_vec(p, model.num_params(), &candle_core::Device::Cpu)?
            .to_dtype(candle_core::DType::F32)?,
    );
    let config = adam(args.ae_epochs.max(1), 1e-3, args.seed);
    let mut opt = config.optimizer.build()?;
    note!(
        "pre-training the autoencoder {} ({} params, {} epochs)",
        model.name,
        model.num_params(),
        config.epochs
    );
    Trainer { config: &config }.run(
        &mut task,
        &mut state,
        &mut Backprop,
        opt.as_mut(),
        &mut Lines,
    )?;
    let p = state
        .params
        .to_dtype(candle_core::DType::F64)?
        .to_vec1::<f64>()?;
    Ok(Arc::new(Autoencoder::new(spec, shape, &p)?))
}

/// Prints one line per epoch.
struct Lines;
impl Observer for Lines {
    fn on_epoch_end(&mut self, m: &EpochMetrics, _: &TrainState) -> deepzero_core::Result<()> {
        note!("  {}", epoch_line(m));
        Ok(())
    }
}

/// Checkpoints, metrics.jsonl and plots after every epoch; a line per minute of steps.
struct RunObserver {
    dir: PathBuf,
    label: String,
    last: Instant,
}

impl Observer for RunObserver {
    fn on_step(&mut self, info: &StepInfo) {
        if self.last.elapsed().as_secs() >= 30 || (info.epoch == 1 && info.step == 1) {
            self.last = Instant::now();
            eprintln!(
                "  epoch {} step {}/{}: loss {:.4}, {:.0} queries/s",
                info.epoch, info.step, info.steps, info.loss, info.queries_per_second
            );
        }
    }
    fn on_epoch_end(&mut self, m: &EpochMetrics, state: &TrainState) -> deepzero_core::Result<()> {
        let io = |e: anyhow::Error| {
            deepzero_core::Error::Config(format!("writing the run directory: {e:#}"))
        };
        eprintln!("{}", epoch_line(m));
        checkpoint::save(&self.dir, state)?;
        let mut lines = String::new();
        for h in &state.history {
            lines.push_str(&serde_json::to_string(h).map_err(|e| io(e.into()))?);
            lines.push('\n');
        }
        report::write_atomic(&self.dir.join("metrics.jsonl"), lines.as_bytes()).map_err(io)?;
        plot_history(&self.dir, &state.history, &self.label).map_err(io)?;
        Ok(())
    }
}

/// The flags of the denoiser run saved in `dir`, for `--resume dir` given `args` (this
/// command's): threads and ranks from this command, `--epochs` if given, the rest from
/// `config.json`; any other flag given must agree with it.
fn resumed_args(dir: &Path, args: &TrainDenoiserArgs) -> Result<TrainDenoiserArgs> {
    let path = dir.join("config.json");
    let text = crate::report::read_saved_config(dir, "certify train-denoiser")?;
    let mut saved: TrainDenoiserArgs = serde_json::from_str(&text).with_context(|| {
        format!(
            "{}: not a deepzero certify train-denoiser config",
            path.display()
        )
    })?;
    config::check_resumable(dir, &args.given, args, &saved)?;
    saved.resume = None;
    saved.given = args.given.clone();
    saved.threads = args.threads;
    saved.distributed = args.distributed.clone();
    if args.given.iter().any(|id| id == "epochs") {
        saved.epochs = args.epochs;
    }
    Ok(saved)
}

/// The run's copy of its ZO-GraSP layer ratios (`--method deepzero`).
const RATIOS_FILE: &str = "ratios.json";

/// `deepzero certify train-denoiser`: train a denoiser into a run directory that
/// `certify compare` / `certify run --denoiser` load.
pub fn run_train_denoiser(args: TrainDenoiserArgs) -> Result<DenoiserSummary> {
    let ranks = args.distributed.connect()?;
    let result = train_denoiser_on(args, &ranks);
    ranks.finish(result)
}

/// [`run_train_denoiser`] as one of `ranks` (rank 0 writes the run directory and reports).
fn train_denoiser_on(args: TrainDenoiserArgs, ranks: &Ranks) -> Result<DenoiserSummary> {
    let (args, dir, resumed) = match &args.resume {
        Some(dir) => (resumed_args(dir, &args)?, dir.clone(), true),
        None => {
            let dir = args
                .out
                .clone()
                .unwrap_or_else(|| report::default_run_dir(&format!("denoiser-{}", args.method)));
            if ranks.is_root() {
                // Checked now, created once the data, classifier and model are in hand.
                report::check_run_dir(&dir, args.overwrite)?;
            }
            (args, dir, false)
        }
    };
    crate::common::set_threads(args.threads);
    // The victim's own split: its test images are never a denoiser's training images.
    let split = match args.classifier.as_deref() {
        Some(spec) => crate::certify::victim_split(spec)?,
        None => crate::certify::Split::default(),
    };
    let (train, test) = raw_data(args.dataset, &args.data_dir, args.train_limit, split.seed)?;
    let shape = [train.channels, train.height, train.width];
    let classifier = args
        .classifier
        .as_deref()
        .context("--classifier is required")?;
    let (bb, white) = open_classifier(classifier, shape)?;
    let spec = ModelSpec::Dncnn {
        depth: args.depth,
        width: args.width,
    };
    let model = Model::build_image(&spec, shape)?;
    let ae = if args.method == DenoiseMethod::ZoAeDs {
        Some(autoencoder(&args, &dir, &train, &test, &bb, resumed)?)
    } else {
        None
    };
    // Everything before is checked set-up (the autoencoder only reads the directory on resume).
    if !resumed && ranks.is_root() {
        report::prepare_run_dir(&dir, args.overwrite)?;
        if args.overwrite {
            // A later --resume must not continue the old run's checkpoints.
            report::clear_previous_run(&dir, &[])?;
        }
    }
    let config = DenoiseConfig {
        method: args.method,
        sigma: args.sigma,
        batch_size: args.batch_size,
        eval_size: args.eval_size,
        zo: ZoConfig {
            mu: args.mu,
            q: args.q,
            sparsity: args.sparsity,
            ..ZoConfig::default()
        },
        precision: Precision::F32,
        seed: args.seed,
    };
    let mut task = DenoiserTask::new(
        &model,
        &train,
        &test,
        bb.clone(),
        white,
        ae.clone(),
        config.clone(),
    )
    .map_err(|e| match e {
        // A core setting's error names its flag.
        deepzero_certify::Error::Core(core) => crate::common::flag_error(core),
        other => other.into(),
    })?;
    // The state the run starts from (also on resume: sparse CGE's ZO-GraSP ratios are computed
    // at it, exactly as in the uninterrupted run).
    let start = match &args.init {
        Some(init) => {
            let run =
                DenoiserRun::load(init).with_context(|| format!("--init {}", init.display()))?;
            if run.record.spec != spec {
                bail!(
                    "--init {}: its denoiser is {:?}, this run's {spec:?}",
                    init.display(),
                    run.record.spec
                );
            }
            let mut s = TrainState::new(run.params);
            s.task = run.bn.to_task_state();
            s
        }
        None => {
            let p = initial_params(&model, args.seed);
            TrainState::new(
                candle_core::Tensor::from_vec(p, model.num_params(), &candle_core::Device::Cpu)?
                    .to_dtype(candle_core::DType::F32)?,
            )
        }
    };
    if !start.task.is_null() {
        task.load_state(&start.task)?;
    }
    let (mut estimator, ratios) = args.method.estimator(&task, &start.params, &config.zo)?;
    let mut state = if resumed {
        let expected = config::fingerprint(&dir, &args, &[], &[RATIOS_FILE])?;
        let s = config::load_checkpoint(&dir, &candle_core::Device::Cpu, &expected)?;
        if s.epoch >= args.epochs {
            bail!(
                "--resume {}: the run already finished its {} epochs (raise --epochs to go on)",
                dir.display(),
                args.epochs
            );
        }
        if ranks.is_root() && args.given.iter().any(|id| id == "epochs") {
            // The new length is the run's from now on (a later resume keeps it).
            report::write_json_atomic(&dir.join("config.json"), &args)?;
        }
        note!("resuming {} at epoch {}", dir.display(), s.epoch + 1);
        s
    } else {
        if ranks.is_root() {
            report::write_json_atomic(&dir.join("config.json"), &args)?;
            let record = DenoiserRecord {
                method: args.method,
                sigma: args.sigma,
                spec: spec.clone(),
                input_shape: shape,
                autoencoder: ae.as_ref().map(|a| a.spec),
            };
            record.save(&dir, ae.as_deref())?;
        }
        start
    };
    if resumed && !state.task.is_null() {
        task.load_state(&state.task)?;
    }
    ranks.share(estimator.as_mut())?;
    if let (Some(r), false, true) = (&ratios, resumed, ranks.is_root()) {
        report::write_json_atomic(&dir.join(RATIOS_FILE), r)?;
    }
    if !resumed && ranks.is_root() {
        state.fingerprint = Some(config::fingerprint(&dir, &args, &[], &[RATIOS_FILE])?);
    }
    let train_cfg = adam(args.epochs, args.lr, args.seed);
    let mut opt = train_cfg.optimizer.build()?;
    if resumed {
        opt.load_state(&state.optimizer)?;
    }
    note!(
        "deepzero certify train-denoiser: {} ({} params), method {}, σ = {}, {} train images, estimator {} → {}",
        model.name, model.num_params(), args.method, args.sigma, train.len(), estimator.name(), dir.display()
    );
    let mut obs = RunObserver {
        dir: dir.clone(),
        label: format!("{} {}", model.name, args.method),
        last: Instant::now(),
    };
    let mut silent = Silent;
    Trainer { config: &train_cfg }.run(
        &mut task,
        &mut state,
        estimator.as_mut(),
        opt.as_mut(),
        if ranks.is_root() {
            &mut obs
        } else {
            &mut silent
        },
    )?;
    let last = state.history.last().context("no epoch finished")?;
    let steps = (task.steps_per_epoch() * state.epoch).max(1) as f64;
    let coords = (state.queries as f64 / steps).round().max(1.0) as usize - 1;
    let summary = DenoiserSummary {
        method: args.method.to_string(),
        sigma: args.sigma,
        epochs: state.epoch,
        denoiser_params: model.num_params(),
        test_stability: last.get("test_stability").unwrap_or(f64::NAN),
        test_accuracy: last.get("test_accuracy").unwrap_or(f64::NAN),
        test_mse: last.get("test_mse").unwrap_or(f64::NAN),
        final_train_loss: last.train_loss,
        black_box_queries: last.get("black_box_queries").unwrap_or(0.0) as u64,
        black_box_queries_per_step: task.queries_per_step(coords),
        estimator_queries_per_step: state.queries as f64 / steps,
        estimator: estimator.name(),
        wall_seconds: state.seconds,
        split: Some(split),
    };
    if !ranks.is_root() {
        return Ok(summary);
    }
    report::write_json_atomic(&dir.join("summary.json"), &summary)?;
    eprintln!(
        "done in {:.0}s: stability {:.3}, accuracy {:.3} on {} noisy test images; {} black-box queries → {}",
        summary.wall_seconds, summary.test_stability, summary.test_accuracy, args.eval_size, summary.black_box_queries, dir.join("summary.json").display()
    );
    Ok(summary)
}

/// Flags of `deepzero certify compare`.
#[derive(Args, Debug, Clone, Serialize, Deserialize)]
pub struct CompareArgs {
    /// The black box (as for train-denoiser).
    #[arg(long)]
    pub classifier: String,
    /// Denoiser runs to compare, `NAME=DIR` (NAME defaults to the run's method); `none`
    /// (no denoiser) is always included.
    #[arg(long = "denoiser", num_args = 1..)]
    pub denoisers: Vec<String>,
    /// Noise level σ.
    #[arg(long, default_value_t = 0.25)]
    pub sigma: f64,
    #[arg(long, value_enum, default_value_t = DataArg::FashionMnist)]
    pub dataset: DataArg,
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    #[arg(long, default_value_t = 100)]
    pub n0: u64,
    #[arg(long, default_value_t = 10_000)]
    pub n: u64,
    #[arg(long, default_value_t = 0.001)]
    pub alpha: f64,
    /// Noisy images per classifier call.
    #[arg(long, default_value_t = 1000)]
    pub batch: usize,
    /// Certify every K-th test image.
    #[arg(long, default_value_t = 1)]
    pub skip: usize,
    /// Certify at most M images.
    #[arg(long, default_value_t = 100)]
    pub max: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Output directory (re-running with the same one resumes every table row).
    #[arg(long)]
    pub out: PathBuf,
}

/// Radii of the comparison table.
pub const RADII: [f64; 5] = [0.0, 0.25, 0.5, 0.75, 1.0];

/// `deepzero certify compare`: certified accuracy vs radius of the classifier alone and behind
/// each denoiser, on the same test images, resumable; `table.md`, `table.json`, a plot.
pub fn run_compare(args: CompareArgs) -> Result<()> {
    crate::common::set_threads(args.threads);
    crate::certify::check_alpha(args.alpha)?;
    std::fs::create_dir_all(&args.out)?;
    report::write_json_atomic(&args.out.join("config.json"), &args)?;
    let split = crate::certify::victim_split(&args.classifier)?;
    let (_, test) = raw_data(args.dataset, &args.data_dir, None, split.seed)?;
    let shape = [test.channels, test.height, test.width];
    let (bb, _) = open_classifier(&args.classifier, shape)?;
    let smoothing = SmoothingConfig {
        sigma: args.sigma,
        n0: args.n0,
        n: args.n,
        alpha: args.alpha,
        batch: args.batch,
    };
    let indices: Vec<usize> = (0..test.len())
        .step_by(args.skip.max(1))
        .take(args.max)
        .collect();
    let labels: Vec<usize> = test.labels.iter().map(|&l| l as usize).collect();
    let mut entries: Vec<(String, Option<PathBuf>)> = vec![("none".into(), None)];
    for d in &args.denoisers {
        let (name, dir) = match d.split_once('=') {
            Some((n, p)) => (n.to_string(), PathBuf::from(p)),
            None => {
                let run = DenoiserRun::load(Path::new(d))?;
                (run.record.method.to_string(), PathBuf::from(d))
            }
        };
        entries.push((name, Some(dir)));
    }
    let mut table = Vec::new();
    for (name, dir) in &entries {
        let tsv = args.out.join(format!("certify-{name}.tsv"));
        let done = if tsv.is_file() {
            read_tsv(&tsv)?
        } else {
            Vec::new()
        };
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&tsv)?;
        if done.is_empty() {
            file.set_len(0)?;
            writeln!(file, "{TSV_HEADER}")?;
        }
        let started = Instant::now();
        let mut count = done.len();
        let emit = |row: &CertifyRow| -> deepzero_certify::Result<()> {
            let line = deepzero_certify::to_tsv(std::slice::from_ref(row));
            let body = line.lines().skip(1).collect::<Vec<_>>().join("\n");
            writeln!(file, "{body}").map_err(|e| deepzero_certify::Error::io(&tsv, e))?;
            count += 1;
            eprintln!(
                "  {name}: image {} ({count}/{}): label {} predict {:?} radius {:.3} ({:.1}s)",
                row.idx,
                indices.len(),
                row.label,
                row.predict,
                row.radius,
                row.time.as_secs_f64()
            );
            Ok(())
        };
        eprintln!(
            "certifying {} images with {name} (n = {})",
            indices.len(),
            args.n
        );
        let clf: Box<dyn BlackBox> = match dir {
            None => Box::new(bb.clone()),
            Some(d) => Box::new(DenoisedClassifier::from_run(
                DenoiserRun::load(d)?,
                bb.clone(),
            )?),
        };
        let rows = certify_images(
            clf,
            &smoothing,
            &test.images,
            &labels,
            &indices,
            args.seed,
            &done,
            emit,
        )?;
        let acc = certified_accuracy(&rows, &RADII);
        eprintln!(
            "  {name}: {:?} in {:.0}s",
            acc,
            started.elapsed().as_secs_f64()
        );
        let budget = dir.as_deref().and_then(queries_per_step);
        table.push((name.clone(), rows, budget));
    }
    write_table(&args, &table)
}

/// Black-box images per training step of a denoiser run (its `summary.json`), if recorded.
fn queries_per_step(dir: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(dir.join("summary.json")).ok()?;
    let summary: serde_json::Value = serde_json::from_str(&text).ok()?;
    summary.get("black_box_queries_per_step")?.as_u64()
}

/// One row of the comparison: method, certificates, black-box images per training step.
type CompareRow = (String, Vec<CertifyRow>, Option<u64>);

fn write_table(args: &CompareArgs, table: &[CompareRow]) -> Result<()> {
    let mut md =
        format!(
        "Certified accuracy (%) at ℓ2 radius, σ = {}, n = {}, α = {}, {} test images\n\n| method |",
        args.sigma, args.n, args.alpha, table.first().map_or(0, |t| t.1.len())
    );
    for r in RADII {
        md.push_str(&format!(" r = {r} |"));
    }
    md.push_str(" black-box images / training step |\n|---|");
    md.push_str(&"---:|".repeat(RADII.len() + 1));
    md.push('\n');
    let mut json = BTreeMap::new();
    let mut series = Vec::new();
    for (name, rows, budget) in table {
        let acc = certified_accuracy(rows, &RADII);
        md.push_str(&format!("| {name} |"));
        for a in &acc {
            md.push_str(&format!(" {:.1} |", 100.0 * a));
        }
        match budget {
            Some(b) => md.push_str(&format!(" {b} |\n")),
            None => md.push_str(" – |\n"),
        }
        json.insert(
            name.clone(),
            RADII
                .iter()
                .zip(&acc)
                .map(|(r, a)| (format!("{r}"), *a))
                .collect::<BTreeMap<_, _>>(),
        );
        let grid: Vec<f64> = (0..=60).map(|i| i as f64 * 0.02).collect();
        let curve = certified_accuracy(rows, &grid);
        series.push(Series {
            label: name.clone(),
            points: grid.into_iter().zip(curve).collect(),
        });
    }
    report::write_atomic(&args.out.join("table.md"), md.as_bytes())?;
    report::write_json_atomic(&args.out.join("table.json"), &json)?;
    report::write_line_chart(
        &args.out,
        "certified_accuracy",
        &LineChart {
            title: "Certified accuracy",
            x_label: "ℓ2 radius",
            y_label: "certified accuracy",
            series: &series,
            y_range: Some((0.0, 1.0)),
            log_y: false,
        },
    )?;
    println!("{md}");
    eprintln!("report: {}", args.out.join("table.md").display());
    Ok(())
}

/// Parse flags of a subcommand from words (the default pipeline builds its steps this way, so
/// that every default comes from the one place clap takes it from).
fn parse_flags<T: Args>(words: &[String]) -> Result<T> {
    #[derive(clap::Parser)]
    struct Wrapper<U: Args> {
        #[command(flatten)]
        inner: U,
    }
    let argv = std::iter::once("deepzero".to_string()).chain(words.iter().cloned());
    Ok(<Wrapper<T> as clap::Parser>::try_parse_from(argv)?.inner)
}

fn words(s: &str, dir: &Path) -> Vec<String> {
    s.replace("{dir}", &dir.display().to_string())
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// `deepzero certify` with no subcommand: the whole pipeline on the shipped digits, in minutes —
/// a victim CNN trained by backprop (reused if `runs/certify-pipeline/victim` finished), an MSE
/// denoiser, DeepZero fine-tuning through the black box, then `compare` (none / mse /
/// deepzero). Every step reuses a finished run directory, so re-running resumes.
pub fn run_default() -> Result<()> {
    let dir = PathBuf::from("runs").join("certify-pipeline");
    std::fs::create_dir_all(&dir)?;
    let done = |name: &str| dir.join(name).join("summary.json").is_file();
    if !done("victim") {
        eprintln!("[1/4] training the victim classifier (digits, simple CNN, backprop)");
        let args: crate::train::TrainArgs = parse_flags(&words(
            "--dataset digits --model cnn --estimator fo --epochs 10 --lr 0.05 --out {dir}/victim --overwrite",
            &dir,
        ))?;
        crate::train::execute(args)?;
    }
    if !done("denoiser-mse") {
        eprintln!("[2/4] MSE pre-training of the denoiser");
        run_train_denoiser(parse_flags(&words(
            "--classifier run:{dir}/victim --dataset digits --method mse --sigma 0.25 --epochs 10 \
             --lr 0.003 --out {dir}/denoiser-mse --overwrite",
            &dir,
        ))?)?;
    }
    if !done("denoiser-deepzero") {
        eprintln!("[3/4] DeepZero: sparse CGE through the black box");
        run_train_denoiser(parse_flags(&words(
            "--classifier run:{dir}/victim --dataset digits --method deepzero --init {dir}/denoiser-mse \
             --sigma 0.25 --train-limit 512 --epochs 2 --lr 0.001 --sparsity 0.9 --out {dir}/denoiser-deepzero --overwrite",
            &dir,
        ))?)?;
    }
    eprintln!("[4/4] certifying (n = 10,000) without and with each denoiser");
    run_compare(parse_flags(&words(
        "--classifier run:{dir}/victim --dataset digits --denoiser mse={dir}/denoiser-mse \
         deepzero={dir}/denoiser-deepzero --sigma 0.25 --n 10000 --max 60 --skip 5 --out {dir}/compare",
        &dir,
    ))?)?;
    eprintln!(
        "the report is {}",
        dir.join("compare").join("table.md").display()
    );
    Ok(())
}
