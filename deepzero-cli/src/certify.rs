//! `deepzero certify`: randomized-smoothing certificates of a classifier we may only query.
//!
//! `certify run` certifies test images with Cohen et al.'s CERTIFY and writes `certify.tsv`
//! (Cohen's format, one row per image as it goes), `summary.json` and a plot of certified
//! accuracy against radius. The classifier is a black box named by `--classifier`:
//! `run:DIR` (a `deepzero train` run), `process:COMMAND` (an external program speaking the
//! protocol in the README) or `onnx:FILE`.

use crate::common::{build_model, normalization, raw_data, DataArg, DataOpts};
use crate::report::{self, LineChart, Series};
use crate::train::TrainArgs;
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use deepzero_certify::classifier::BlackBox;
use deepzero_certify::model::ModelClassifier;
use deepzero_certify::process::ProcessClassifier;
use deepzero_certify::smoothing::SmoothingConfig;
use deepzero_certify::tsv::{self, CertifyRow, TSV_HEADER};
use deepzero_core::data::Dataset;
use deepzero_core::model::BnState;
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// `--alpha` in `[MIN_ALPHA, 1)`.
pub(crate) fn check_alpha(alpha: f64) -> Result<()> {
    use deepzero_certify::smoothing::MIN_ALPHA;
    if !(MIN_ALPHA..1.0).contains(&alpha) {
        bail!(
            "--alpha must be in [{MIN_ALPHA:e}, 1) (smaller levels are below float64's resolution \
             of 1 − α), got {alpha:?}"
        );
    }
    Ok(())
}

/// `--batch` noisy images of `per_image` values fit into memory (the library's check, in the
/// flag's name).
pub(crate) fn check_batch_memory(batch: usize, per_image: usize) -> Result<()> {
    deepzero_certify::smoothing::check_batch_memory(batch, per_image).map_err(|e| match e {
        deepzero_certify::Error::Core(deepzero_core::Error::Invalid { message, .. }) => {
            anyhow::anyhow!("--batch {message}")
        }
        other => other.into(),
    })
}

/// The longest `--classifier-timeout`: a year (longer ones do not fit a timer).
const MAX_TIMEOUT_SECONDS: f64 = 365.0 * 86_400.0;

/// `deepzero certify` and its subcommands.
#[derive(Args, Debug)]
pub struct CertifyArgs {
    #[command(subcommand)]
    pub command: Option<CertifyCommand>,
}

#[derive(Subcommand, Debug)]
pub enum CertifyCommand {
    /// Certify test images of a black-box classifier (Cohen et al.'s CERTIFY); writes certify.tsv.
    Run(Box<CertifyRunArgs>),
    /// Train a denoiser in front of a black-box classifier (mse, deepzero, zo-ae-ds, zo-ds, fo).
    TrainDenoiser(Box<crate::certify_train::TrainDenoiserArgs>),
    /// Certified accuracy vs radius: no denoiser and each denoiser run, same test images.
    Compare(Box<crate::certify_train::CompareArgs>),
    /// Export a `run:DIR` classifier to an ONNX file (normalisation included, pixels in [0, 1]).
    Export(ExportArgs),
    /// Serve a `run:DIR` or `onnx:FILE` classifier over the process protocol on stdin/stdout.
    Serve(ServeArgs),
}

/// Flags of `deepzero certify run`.
#[derive(Args, Debug, Clone, Serialize, Deserialize)]
pub struct CertifyRunArgs {
    /// The black box: `run:DIR` (a `deepzero train` run directory), `process:COMMAND` (started
    /// with `sh -c`, protocol in the README) or `onnx:FILE`.
    #[arg(long, required_unless_present = "resume")]
    pub classifier: Option<String>,
    /// Seconds one response of a `process:` classifier may take.
    #[arg(long, default_value_t = 60.0)]
    pub classifier_timeout: f64,
    /// Data set of the test images.
    #[arg(long, value_enum, default_value_t = DataArg::Digits)]
    pub dataset: DataArg,
    /// Directory with the data set's files.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Noise level σ in [0, 1] pixel units.
    #[arg(long, required_unless_present = "resume")]
    pub sigma: Option<f64>,
    /// Noise samples that select the candidate class.
    #[arg(long, default_value_t = 100)]
    pub n0: usize,
    /// Noise samples that bound its probability.
    #[arg(long, default_value_t = 100_000)]
    pub n: usize,
    /// Failure probability of each certificate.
    #[arg(long, default_value_t = 0.001)]
    pub alpha: f64,
    /// Noisy images per classifier call.
    #[arg(long, default_value_t = 1000)]
    pub batch: usize,
    /// Certify every K-th test image.
    #[arg(long, default_value_t = 1)]
    pub skip: usize,
    /// Certify at most M images.
    #[arg(long)]
    pub max: Option<usize>,
    /// Seed of the noise (each image has its own stream, so a resumed run repeats it).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Run directory [default: runs/certify-<UTC time>].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// A denoiser run (`certify train-denoiser --out DIR`) placed in front of the classifier.
    #[arg(long)]
    #[serde(default)]
    pub denoiser: Option<PathBuf>,
    /// Allow writing into a non-empty --out directory.
    #[arg(long)]
    #[serde(skip)]
    pub overwrite: bool,
    /// Continue the run in this directory (its certify.tsv and config.json); other flags given
    /// must agree with the saved ones.
    #[arg(long)]
    #[serde(skip)]
    pub resume: Option<PathBuf>,
    /// The flags given on the command line (clap ids), for `--resume`'s conflict check.
    #[arg(skip)]
    #[serde(skip)]
    pub given: Vec<String>,
}

/// `summary.json` of a certification run.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct CertifySummary {
    /// Fraction certified correct at radius "0.0", "0.25", "0.5", "0.75", "1.0".
    pub certified_accuracy: BTreeMap<String, f64>,
    /// Fraction of images where CERTIFY abstained.
    pub abstain_rate: f64,
    /// Images certified.
    pub images: usize,
    /// Classifier queries (one per image evaluated) of this process.
    pub classifier_queries: u64,
    /// Seconds of certification in this process.
    pub seconds: f64,
    /// Mean seconds per image (from the TSV's times, all images).
    pub seconds_per_image: f64,
    /// The classifier.
    pub classifier: String,
    /// σ, n0, n, α.
    pub sigma: f64,
    pub n0: usize,
    pub n: usize,
    pub alpha: f64,
    /// The test split certified ([`Split`]; absent in runs made before it was recorded).
    #[serde(default)]
    pub split: Option<Split>,
}

/// The radii the summary reports.
pub const SUMMARY_RADII: [f64; 5] = [0.0, 0.25, 0.5, 0.75, 1.0];

pub fn run(args: CertifyArgs) -> Result<()> {
    match args.command {
        Some(CertifyCommand::Run(a)) => run_certify(*a).map(|_| ()),
        Some(CertifyCommand::TrainDenoiser(a)) => {
            crate::certify_train::run_train_denoiser(*a).map(|_| ())
        }
        Some(CertifyCommand::Compare(a)) => crate::certify_train::run_compare(*a),
        Some(CertifyCommand::Export(a)) => run_export(a),
        Some(CertifyCommand::Serve(a)) => run_serve(a),
        None => crate::certify_train::run_default(),
    }
}

/// Open the black box that `spec` names, for images of `shape`.
pub fn classifier_from_spec(
    spec: &str,
    shape: [usize; 3],
    timeout: Duration,
) -> Result<Box<dyn BlackBox>> {
    let bb = open_classifier(spec, Some(shape), timeout)?;
    let want = bb.input_shape();
    if want != shape {
        bail!(
            "--classifier {spec} takes images of {want:?} (C, H, W), the data set has {shape:?}; choose the data set it was trained on"
        );
    }
    Ok(bb)
}

/// Open the black box that `spec` names; a `process:` program needs the image `shape` it is
/// sent (`None` refuses it).
fn open_classifier(
    spec: &str,
    shape: Option<[usize; 3]>,
    timeout: Duration,
) -> Result<Box<dyn BlackBox>> {
    let (kind, rest) = spec.split_once(':').with_context(|| {
        format!("--classifier {spec}: expected run:DIR, process:COMMAND or onnx:FILE")
    })?;
    Ok(match kind {
        "run" => Box::new(model_classifier(Path::new(rest))?),
        "process" => {
            if rest.trim().is_empty() {
                bail!("--classifier process: needs a command, e.g. process:'python3 client.py'");
            }
            let Some(shape) = shape else {
                bail!("--classifier {spec}: only run:DIR and onnx:FILE classifiers can be served");
            };
            Box::new(ProcessClassifier::spawn(rest, shape, timeout)?)
        }
        "onnx" => onnx_classifier(rest)?,
        other => bail!(
            "--classifier {spec}: unknown kind `{other}`; expected run:DIR, process:COMMAND or onnx:FILE"
        ),
    })
}

/// Flags of `deepzero certify export`.
#[derive(Args, Debug, Clone)]
pub struct ExportArgs {
    /// The classifier to export: `run:DIR` (a `deepzero train` run directory).
    #[arg(long)]
    pub classifier: String,
    /// The ONNX file to write.
    #[arg(long)]
    pub out: PathBuf,
    /// Replace an existing --out file.
    #[arg(long)]
    pub overwrite: bool,
}

/// Flags of `deepzero certify serve`.
#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// The classifier to serve: `run:DIR` or `onnx:FILE`.
    #[arg(long)]
    pub classifier: String,
}

/// `deepzero certify export`: a `run:` classifier (model, last checkpoint, batch-norm
/// statistics, input normalisation) as one ONNX file that takes pixels in [0, 1].
pub fn run_export(args: ExportArgs) -> Result<()> {
    let Some(dir) = args.classifier.strip_prefix("run:") else {
        bail!(
            "--classifier {}: only run:DIR classifiers export (a process: or onnx: classifier is not a deepzero model)",
            args.classifier
        );
    };
    if args.out.extension().and_then(|e| e.to_str()) != Some("onnx") {
        bail!(
            "--out {}: give a file name ending in .onnx",
            args.out.display()
        );
    }
    crate::report::check_output_file(&args.out, args.overwrite)?;
    let classifier = model_classifier(Path::new(dir))?;
    deepzero_certify::export::write_onnx(&classifier, &args.out)
        .with_context(|| format!("--out {}", args.out.display()))?;
    eprintln!(
        "exported {} ({} parameters) → {}",
        classifier.model().name,
        classifier.model().num_params(),
        args.out.display()
    );
    Ok(())
}

/// `deepzero certify serve`: answers the process protocol on stdin/stdout with a classifier
/// until stdin closes.
pub fn run_serve(args: ServeArgs) -> Result<()> {
    let classifier = open_classifier(&args.classifier, None, Duration::from_secs(60))?;
    let stdin = std::io::stdin();
    let stdout = std::io::stdout();
    deepzero_certify::process::serve(classifier.as_ref(), stdin.lock(), stdout.lock())
        .with_context(|| format!("serving --classifier {}", args.classifier))?;
    Ok(())
}

fn onnx_classifier(path: &str) -> Result<Box<dyn BlackBox>> {
    Ok(Box::new(deepzero_certify::onnx::OnnxClassifier::load(
        path,
    )?))
}

/// The flags a `deepzero train` run directory was trained with (its `config.json`).
fn train_run_args(dir: &Path) -> Result<TrainArgs> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "--classifier run:{}: cannot read {} (is it a `deepzero train` run directory?)",
            dir.display(),
            path.display()
        )
    })?;
    serde_json::from_str(&text)
        .with_context(|| format!("{}: not a deepzero train config", path.display()))
}

/// The train/test split that certification and denoiser training use (on digits it depends
/// on a seed): a `run:DIR` victim's own, the seed it was trained with, so that no image it
/// trained on is certified or denoised as a test image; otherwise the data set's default split
/// (seed 0), which a classifier from outside deepzero cannot tell us more about.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Split {
    /// The seed of the split.
    pub seed: u64,
    /// Where the seed comes from (`run:DIR` or `default`).
    pub source: String,
}

/// The [`Split`] of the classifier `spec`.
pub(crate) fn victim_split(spec: &str) -> Result<Split> {
    Ok(match spec.strip_prefix("run:") {
        Some(dir) => Split {
            seed: train_run_args(Path::new(dir))?.seed,
            source: spec.to_string(),
        },
        None => Split::default(),
    })
}

impl Default for Split {
    /// The data set's default split (seed 0).
    fn default() -> Self {
        Split {
            seed: 0,
            source: "default".to_string(),
        }
    }
}

/// A `deepzero train` run as a classifier: its model, last checkpoint, batch-norm statistics and
/// the input normalisation it trained with (refitted on the same training data).
pub fn model_classifier(dir: &Path) -> Result<ModelClassifier> {
    let args = train_run_args(dir)?;
    let (train, _) = raw_data(&args.data, args.seed)?;
    let (norm, _) = normalization(&args.data, &train);
    let model = build_model(&args.model, &train)?;
    let state = deepzero_core::checkpoint::load(dir, &candle_core::Device::Cpu)
        .with_context(|| format!("--classifier run:{}", dir.display()))?;
    let bn = BnState::from_task_state(&state.task, &model)?.unwrap_or_else(|| model.new_bn_state());
    let params = state.params.to_dtype(candle_core::DType::F32)?;
    Ok(ModelClassifier::from_tensor(model, params, bn, norm)?)
}

fn check_smoothing(a: &CertifyRunArgs) -> Result<SmoothingConfig> {
    let sigma = a.sigma.context("--sigma is required")?;
    if !(sigma.is_finite() && sigma > 0.0) {
        bail!("--sigma must be positive (pixel units in [0, 1]), got {sigma}");
    }
    if a.n0 == 0 || a.n == 0 {
        bail!("--n0 and --n must be at least 1");
    }
    let most = deepzero_certify::smoothing::MAX_SAMPLES;
    for (flag, v) in [("--n0", a.n0), ("--n", a.n)] {
        if v as u64 > most {
            bail!(
                "{flag} {v}: more than the limit of {most} noise samples per image, which would \
                 take hours per image (Cohen et al. use --n0 100 --n 100000); use a smaller value"
            );
        }
    }
    check_alpha(a.alpha)?;
    if a.batch == 0 || a.skip == 0 || a.max == Some(0) {
        bail!("--batch, --skip and --max must be at least 1");
    }
    if !(a.classifier_timeout.is_finite()
        && a.classifier_timeout > 0.0
        && a.classifier_timeout <= MAX_TIMEOUT_SECONDS)
    {
        bail!(
            "--classifier-timeout must be a positive number of seconds up to {MAX_TIMEOUT_SECONDS} \
             (a year), got {:?}",
            a.classifier_timeout
        );
    }
    let config = SmoothingConfig {
        sigma,
        n0: a.n0 as u64,
        n: a.n as u64,
        alpha: a.alpha,
        batch: a.batch,
    };
    config.validate()?;
    Ok(config)
}

/// The test images (pixels in [0, 1]) and labels of the data options.
pub(crate) fn test_images(
    dataset: DataArg,
    data_dir: &Option<PathBuf>,
    seed: u64,
) -> Result<Dataset> {
    let opts = DataOpts {
        dataset,
        data_dir: data_dir.clone(),
        train_limit: None,
        test_limit: None,
    };
    Ok(raw_data(&opts, seed)?.1)
}

/// One certification run; returns its summary.
pub fn run_certify(args: CertifyRunArgs) -> Result<CertifySummary> {
    let (args, dir, resumed) = match &args.resume {
        Some(dir) => {
            let path = dir.join("config.json");
            let text = crate::report::read_saved_config(dir, "certify run")?;
            let saved: CertifyRunArgs = serde_json::from_str(&text)
                .with_context(|| format!("{}: not a deepzero certify config", path.display()))?;
            let conflicts = crate::config::resume_conflicts(&args.given, &args, &saved)?;
            crate::config::refuse_conflicts(
                &format!("--resume {}", dir.display()),
                &conflicts,
                "drop them (the run's rows must share one setting) or start a new run with --out",
            )?;
            (saved, dir.clone(), true)
        }
        None => {
            let dir = args
                .out
                .clone()
                .unwrap_or_else(|| report::default_run_dir("certify"));
            (args, dir, false)
        }
    };
    // Everything is checked before the run directory is touched.
    let config = check_smoothing(&args)?;
    let spec = args
        .classifier
        .clone()
        .context("--classifier is required")?;
    let split = victim_split(&spec)?;
    let test = test_images(args.dataset, &args.data_dir, split.seed)?;
    let shape = [test.channels, test.height, test.width];
    let classifier = classifier_from_spec(
        &spec,
        shape,
        Duration::from_secs_f64(args.classifier_timeout),
    )?;
    let classifier: Box<dyn BlackBox> = match &args.denoiser {
        Some(d) => {
            let run = deepzero_certify::DenoiserRun::load(d)
                .with_context(|| format!("--denoiser {}", d.display()))?;
            if let Some(sigma) = args.sigma.filter(|&s| s != run.record.sigma) {
                eprintln!(
                    "note: the denoiser was trained for σ = {}, certifying at σ = {sigma}",
                    run.record.sigma
                );
            }
            Box::new(deepzero_certify::DenoisedClassifier::from_run(
                run, classifier,
            )?)
        }
        None => classifier,
    };
    let k = classifier.num_classes()?;
    if let Some(&bad) = test.labels.iter().find(|&&y| y as usize >= k) {
        bail!("--classifier {spec} answers {k} class scores, but the data set has label {bad}");
    }
    check_batch_memory(args.batch, shape.iter().product())?;
    let mut indices: Vec<usize> = (0..test.len()).step_by(args.skip).collect();
    if let Some(m) = args.max {
        indices.truncate(m);
    }
    let tsv_path = dir.join("certify.tsv");
    let done = if resumed {
        if tsv_path.exists() {
            tsv::read_tsv(&tsv_path)?
        } else {
            Vec::new()
        }
    } else {
        report::prepare_run_dir(&dir, args.overwrite)?;
        report::write_json_atomic(&dir.join("config.json"), &args)?;
        std::fs::write(&tsv_path, format!("{TSV_HEADER}\n"))
            .with_context(|| format!("writing {}", tsv_path.display()))?;
        Vec::new()
    };
    if resumed && !tsv_path.exists() {
        std::fs::write(&tsv_path, format!("{TSV_HEADER}\n"))?;
    }
    eprintln!(
        "deepzero certify: {} images of {:?} (σ = {}, n0 = {}, n = {}, α = {}) through {} → {}{}",
        indices.len(),
        args.dataset,
        config.sigma,
        args.n0,
        args.n,
        args.alpha,
        spec,
        dir.display(),
        if done.is_empty() {
            String::new()
        } else {
            format!(" (resuming after {} rows)", done.len())
        }
    );
    let labels: Vec<usize> = test.labels.iter().map(|&y| y as usize).collect();
    let bar = ProgressBar::new(indices.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("certify [{bar:30}] {pos}/{len} {msg} ({eta})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_position(done.len() as u64);
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&tsv_path)
        .with_context(|| format!("opening {}", tsv_path.display()))?;
    let started = Instant::now();
    let mut certified = 0usize;
    let result = deepzero_certify::run::certify_images(
        &classifier,
        &config,
        &test.images,
        &labels,
        &indices,
        args.seed,
        &done,
        |row: &CertifyRow| {
            file.write_all(format!("{row}\n").as_bytes())
                .and_then(|_| file.flush())
                .map_err(|e| deepzero_certify::Error::Io {
                    path: tsv_path.clone(),
                    source: e,
                })?;
            certified += 1;
            bar.inc(1);
            bar.set_message(format!("image {}: radius {:.3}", row.idx, row.radius));
            Ok(())
        },
    );
    bar.finish_and_clear();
    result.with_context(|| {
        format!(
            "certification stopped; the {} rows certified so far are in {} (continue with --resume {})",
            done.len() + certified,
            tsv_path.display(),
            dir.display()
        )
    })?;
    // The summary reads the file back, so fresh and resumed rows are counted alike (radii as
    // written, to three decimals).
    let rows = tsv::read_tsv(&tsv_path)?;
    let seconds = started.elapsed().as_secs_f64();
    let summary = summarize(&args, &split, &config, &rows, classifier.queries(), seconds);
    report::write_json_atomic(&dir.join("summary.json"), &summary)?;
    plot_certified_accuracy(&dir, &[(spec.clone(), rows.clone())])?;
    eprintln!(
        "certified {} images in {seconds:.1}s: certified accuracy {} (abstain {:.3}) → {}",
        rows.len(),
        summary
            .certified_accuracy
            .iter()
            .map(|(r, a)| format!("{r}: {a:.3}"))
            .collect::<Vec<_>>()
            .join(", "),
        summary.abstain_rate,
        dir.join("summary.json").display()
    );
    Ok(summary)
}

fn summarize(
    args: &CertifyRunArgs,
    split: &Split,
    config: &SmoothingConfig,
    rows: &[CertifyRow],
    queries: u64,
    seconds: f64,
) -> CertifySummary {
    let acc = tsv::certified_accuracy(rows, &SUMMARY_RADII);
    let n = rows.len().max(1) as f64;
    CertifySummary {
        certified_accuracy: SUMMARY_RADII
            .iter()
            .zip(acc)
            .map(|(r, a)| (format!("{r:?}"), a))
            .collect(),
        abstain_rate: rows.iter().filter(|r| r.predict.is_none()).count() as f64 / n,
        images: rows.len(),
        classifier_queries: queries,
        seconds,
        seconds_per_image: rows.iter().map(|r| r.time.as_secs_f64()).sum::<f64>() / n,
        classifier: args.classifier.clone().unwrap_or_default(),
        sigma: config.sigma,
        n0: args.n0,
        n: args.n,
        alpha: args.alpha,
        split: Some(split.clone()),
    }
}

/// `certified_accuracy.png|svg`: certified accuracy against radius, one line per set of rows.
pub fn plot_certified_accuracy(dir: &Path, runs: &[(String, Vec<CertifyRow>)]) -> Result<()> {
    let max_r = runs
        .iter()
        .flat_map(|(_, rows)| rows.iter().map(|r| r.radius))
        .fold(1.0f64, f64::max);
    let radii: Vec<f64> = (0..=200).map(|i| max_r * 1.05 * i as f64 / 200.0).collect();
    let series: Vec<Series> = runs
        .iter()
        .map(|(label, rows)| Series {
            label: label.clone(),
            points: radii
                .iter()
                .copied()
                .zip(tsv::certified_accuracy(rows, &radii))
                .collect(),
        })
        .collect();
    report::write_line_chart(
        dir,
        "certified_accuracy",
        &LineChart {
            title: "Certified accuracy",
            x_label: "ℓ2 radius",
            y_label: "certified accuracy",
            series: &series,
            y_range: Some((0.0, 1.0)),
            log_y: false,
        },
    )
}
