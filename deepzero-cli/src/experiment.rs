//! `deepzero experiment`: the paper's comparisons as sets of training runs.
//!
//! * `cge-vs-rge` (DeepZero Fig. 2 / §5 table): the simple CNN at several depths, trained with
//!   backprop, CGE and RGE where RGE gets CGE's query budget (q = d directions, forward
//!   difference: d + 1 queries per step).
//! * `sparsity` (Fig. 4): one model at several sparsities, sparse CGE with ZO-GraSP layer ratios
//!   vs random (uniform) ratios vs backprop with the same sparse gradient masks.
//!
//! Every sub-run is an ordinary `deepzero train` run (via [`train::execute`]) in a subdirectory;
//! the experiment directory gets `config.json`, `table.md`, `table.json` and `accuracy.{png,svg}`.

use crate::common::{
    build_model, initial_params, load_data, DataArg, DataOpts, EngineArg, EstimatorArg, ModelArg,
    ModelOpts,
};
use crate::report::{self, LineChart, Series};
use crate::train::{self, Summary, TrainArgs};
use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use deepzero_core::model::Precision;
use deepzero_core::sparsity::{check_sparsity, LayerRatios, PruneConfig, PruneMethod};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The experiments.
#[derive(Subcommand, Debug)]
pub enum ExperimentCommand {
    /// FO vs CGE vs RGE (same queries per step as CGE) for the simple CNN at several depths.
    CgeVsRge(CgeVsRgeArgs),
    /// Sparse CGE with ZO-GraSP vs random layer ratios vs FO with sparse gradients.
    Sparsity(SparsityArgs),
}

/// Flags every experiment shares.
#[derive(Args, Debug, Clone, Serialize)]
pub struct CommonOpts {
    /// Data set.
    #[arg(long, value_enum, default_value_t = DataArg::FashionMnist)]
    pub dataset: DataArg,
    /// Directory with the data set's files.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Use only the first N training samples.
    #[arg(long)]
    pub train_limit: Option<usize>,
    /// Use only the first N test samples.
    #[arg(long)]
    pub test_limit: Option<usize>,
    /// Training epochs of every sub-run.
    #[arg(long, default_value_t = 20)]
    pub epochs: usize,
    /// Mini-batch size.
    #[arg(long, default_value_t = 256)]
    pub batch_size: usize,
    /// Peak learning rate (SGD, momentum 0.9, weight decay 5e-4, cosine schedule).
    #[arg(long, default_value_t = 0.1)]
    pub lr: f64,
    /// Linear warm-up epochs before the cosine decay (the paper uses 3) [default: epochs / 10].
    #[arg(long)]
    pub warmup_epochs: Option<usize>,
    /// Seed of every sub-run.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Query engine (all give the same numbers up to rounding).
    #[arg(long, value_enum, default_value_t = EngineArg::Fast, alias = "cge-engine")]
    pub engine: EngineArg,
    /// Threads for tensor kernels (0 = all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Experiment directory [default: runs/<experiment>-<UTC time>].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Allow writing into a non-empty --out directory (sub-runs are redone).
    #[arg(long, conflicts_with = "resume")]
    pub overwrite: bool,
    /// Continue the experiment in --out: finished sub-runs are kept, interrupted ones resumed.
    #[arg(long, requires = "out")]
    pub resume: bool,
}

/// Flags of `deepzero experiment cge-vs-rge`.
#[derive(Args, Debug, Clone, Serialize)]
pub struct CgeVsRgeArgs {
    #[command(flatten)]
    pub common: CommonOpts,
    /// CNN depths (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
    pub depths: Vec<usize>,
    /// CNN channels.
    #[arg(long, default_value_t = 18)]
    pub width: usize,
}

/// Flags of `deepzero experiment sparsity`.
#[derive(Args, Debug, Clone, Serialize)]
pub struct SparsityArgs {
    #[command(flatten)]
    pub common: CommonOpts,
    /// Sparsities (comma-separated, each in [0, 1)).
    #[arg(long, value_delimiter = ',', default_value = "0,0.8,0.9,0.95,0.99")]
    pub sparsities: Vec<f64>,
    /// Architecture.
    #[arg(long, value_enum, default_value_t = ModelArg::Cnn)]
    pub model: ModelArg,
    /// CNN blocks or MLP hidden layers [default: cnn 2, mlp 1].
    #[arg(long)]
    pub depth: Option<usize>,
    /// CNN channels or MLP hidden units [default: cnn 18, mlp 32].
    #[arg(long)]
    pub width: Option<usize>,
    /// Epochs between redraws of the sparse coordinate sets.
    #[arg(long, default_value_t = 5)]
    pub mask_interval: usize,
    /// RGE directions per estimate of ZO-GraSP.
    #[arg(long, default_value_t = 192)]
    pub prune_q: usize,
    /// Samples per class in the ZO-GraSP batch.
    #[arg(long, default_value_t = 25)]
    pub prune_per_class: usize,
}

pub fn run(cmd: ExperimentCommand) -> Result<()> {
    match cmd {
        ExperimentCommand::CgeVsRge(a) => cge_vs_rge(a),
        ExperimentCommand::Sparsity(a) => sparsity(a),
    }
}

/// `train`'s defaults, for building sub-run configurations from typed fields.
#[derive(Parser)]
struct TrainDefaults {
    #[command(flatten)]
    args: TrainArgs,
}

fn base_args(c: &CommonOpts) -> Result<TrainArgs> {
    let mut a = TrainDefaults::try_parse_from(["train"])
        .context("building the default training configuration")?
        .args;
    a.data = DataOpts {
        dataset: c.dataset,
        data_dir: c.data_dir.clone(),
        train_limit: c.train_limit,
        test_limit: c.test_limit,
    };
    a.epochs = c.epochs;
    a.batch_size = c.batch_size;
    a.lr = Some(c.lr);
    a.warmup_epochs = c.warmup_epochs;
    a.seed = c.seed;
    a.threads = c.threads;
    a.estimator.engine = c.engine;
    a.overwrite = c.overwrite;
    Ok(a)
}

/// Settings that may differ between an experiment and its `--resume`: how to run, not what.
const RESUME_MAY_CHANGE: &[&str] = &["threads", "out", "overwrite", "resume"];

/// The experiment's saved configuration: its flags and, under `experiment`, its name.
fn saved_config(name: &str, config: &impl Serialize) -> Result<serde_json::Value> {
    let mut v = serde_json::to_value(config)?;
    if let Some(obj) = v.as_object_mut() {
        obj.insert("experiment".into(), name.into());
    }
    Ok(v)
}

/// Prepare the experiment directory and save the experiment's flags. With `--resume`, the
/// directory must hold this experiment, saved with the same settings.
fn prepare(c: &CommonOpts, name: &str, config: &impl Serialize) -> Result<PathBuf> {
    // The sub-runs' shared training flags, checked before the directory exists.
    train::train_config(&base_args(c)?)?;
    let dir = c
        .out
        .clone()
        .unwrap_or_else(|| report::default_run_dir(name));
    let config = saved_config(name, config)?;
    if c.resume {
        check_resume(&dir, name, &config)?;
        return Ok(dir);
    }
    report::prepare_run_dir(&dir, c.overwrite)?;
    report::write_json_atomic(&dir.join("config.json"), &config)?;
    Ok(dir)
}

/// `--resume --out DIR`: DIR must exist and hold a `name` experiment whose saved settings are
/// `config`'s (apart from [`RESUME_MAY_CHANGE`]); otherwise nothing is touched.
fn check_resume(dir: &Path, name: &str, config: &serde_json::Value) -> Result<()> {
    let shown = dir.display();
    let path = dir.join("config.json");
    if !dir.is_dir() {
        bail!(
            "--resume --out {shown}: there is no experiment there to resume; drop --resume to \
             start it"
        );
    }
    let text = std::fs::read_to_string(&path).map_err(|_| {
        anyhow::anyhow!(
            "--resume --out {shown}: not an experiment directory (it has no config.json); drop \
             --resume and choose a new --out to start the experiment"
        )
    })?;
    let saved: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("--resume --out {shown}: {} is not JSON", path.display()))?;
    let kind = saved.get("experiment").and_then(|k| k.as_str());
    if kind != Some(name) {
        let what = match kind {
            Some(other) => format!("a `deepzero experiment {other}` run"),
            None if saved.get("common").is_some() => "an experiment of an older format".into(),
            None => "a run of another command (e.g. `deepzero train`)".into(),
        };
        bail!(
            "--resume --out {shown}: the directory holds {what}, not a `deepzero experiment \
             {name}` run; nothing was changed — choose the right directory or drop --resume"
        );
    }
    let (mut mine, mut theirs) = (Vec::new(), Vec::new());
    leaves("", config, &mut mine);
    leaves("", &saved, &mut theirs);
    let mut differences = Vec::new();
    for (key, value) in &mine {
        let flag = key.rsplit('.').next().unwrap_or(key);
        if RESUME_MAY_CHANGE.contains(&flag) {
            continue;
        }
        let other = theirs.iter().find(|(k, _)| k == key).map(|(_, v)| v);
        if other != Some(value) {
            let show = |v: Option<&serde_json::Value>| match v {
                Some(serde_json::Value::String(s)) => s.clone(),
                Some(v) => v.to_string(),
                None => "unset".into(),
            };
            differences.push(format!(
                "--{} {} (the experiment has {})",
                flag.replace('_', "-"),
                show(Some(value)),
                show(other)
            ));
        }
    }
    if !differences.is_empty() {
        bail!(
            "--resume --out {shown}: settings differ from the saved experiment ({}); resume with \
             its flags (they are in {}) so that every row of its table has the same settings",
            differences.join(", "),
            path.display()
        );
    }
    Ok(())
}

/// Every leaf of a JSON object as (dotted path, value); arrays are leaves.
fn leaves(prefix: &str, v: &serde_json::Value, out: &mut Vec<(String, serde_json::Value)>) {
    match v.as_object() {
        Some(obj) => {
            for (k, x) in obj {
                let key = match prefix {
                    "" => k.clone(),
                    p => format!("{p}.{k}"),
                };
                leaves(&key, x, out);
            }
        }
        None => out.push((prefix.to_string(), v.clone())),
    }
}

/// Runs sub-runs one after the other and prints a line per sub-run.
struct Runner {
    done: usize,
    total: usize,
    resume: bool,
    started: Instant,
}

impl Runner {
    fn new(total: usize, resume: bool) -> Self {
        Runner {
            done: 0,
            total,
            resume,
            started: Instant::now(),
        }
    }

    /// Train `args` into `dir` (or take its finished summary with `--resume`).
    fn run(&mut self, label: &str, dir: &Path, mut args: TrainArgs) -> Result<Summary> {
        self.done += 1;
        let tag = format!("[{}/{}] {label}", self.done, self.total);
        let summary_path = dir.join("summary.json");
        let summary = if self.resume && summary_path.is_file() {
            let text = std::fs::read_to_string(&summary_path)
                .with_context(|| format!("reading {}", summary_path.display()))?;
            let s: Summary = serde_json::from_str(&text)
                .with_context(|| format!("{}: not a run summary", summary_path.display()))?;
            eprintln!("{tag}: finished earlier, kept");
            s
        } else {
            eprintln!("{tag}: training → {}", dir.display());
            if self.resume && deepzero_core::checkpoint::exists(dir) {
                args.resume = Some(dir.to_path_buf());
            } else {
                args.out = Some(dir.to_path_buf());
                args.overwrite |= self.resume;
            }
            train::execute(args).with_context(|| format!("sub-run {label}"))?
        };
        eprintln!(
            "{tag}: test accuracy {:.4} (best {:.4}), {:.0} queries/step, {:.1}s training [{:.0}s elapsed]",
            summary.test_accuracy,
            summary.best_test_accuracy,
            summary.queries_per_step,
            summary.wall_seconds,
            self.started.elapsed().as_secs_f64()
        );
        Ok(summary)
    }
}

/// A sub-run's figures in `table.json`.
#[derive(Serialize)]
struct Cell {
    run: String,
    #[serde(flatten)]
    summary: Summary,
}

fn cell(run: &str, summary: &Summary) -> Cell {
    Cell {
        run: run.to_string(),
        summary: summary.clone(),
    }
}

fn pct(x: f64) -> String {
    format!("{:.2}", 100.0 * x)
}

/// A sparsity as a percentage without float noise (`0.95` → `95`, `0.875` → `87.5`).
fn sparsity_pct(s: f64) -> String {
    let t = format!("{:.4}", 100.0 * s);
    t.trim_end_matches('0').trim_end_matches('.').to_string()
}

#[derive(Serialize)]
struct DepthRow {
    depth: usize,
    params: usize,
    fo: Cell,
    cge: Cell,
    rge: Cell,
}

fn cge_vs_rge(args: CgeVsRgeArgs) -> Result<()> {
    let c = &args.common;
    if args.depths.is_empty() || args.depths.contains(&0) {
        bail!("--depths must list positive depths, e.g. --depths 1,2,3");
    }
    if args.width == 0 {
        bail!("--width must be at least 1");
    }
    // Check every depth fits the data before training anything.
    let (train_ds, _, _) = load_data(&data_opts(c), c.seed, false)?;
    let mut params = Vec::new();
    for &depth in &args.depths {
        let m = build_model(&cnn(depth, args.width), &train_ds)
            .with_context(|| format!("--depths {depth}"))?;
        params.push(m.num_params());
    }
    drop(train_ds);
    let dir = prepare(c, "cge-vs-rge", &args)?;
    let mut runner = Runner::new(3 * args.depths.len(), c.resume);
    let mut rows = Vec::new();
    for (&depth, &d) in args.depths.iter().zip(&params) {
        let mut base = base_args(c)?;
        base.model = cnn(depth, args.width);
        let mut run = |est: EstimatorArg, q: usize| -> Result<(String, Summary)> {
            let name = format!("d{depth}-{}", est_name(est));
            let mut a = base.clone();
            a.estimator.estimator = est;
            a.estimator.q = q;
            let label = match est {
                EstimatorArg::Rge => format!("depth {depth} ({d} params) rge q={q}"),
                _ => format!("depth {depth} ({d} params) {}", est_name(est)),
            };
            let s = runner.run(&label, &dir.join(&name), a)?;
            Ok((name, s))
        };
        let fo = run(EstimatorArg::Fo, base.estimator.q)?;
        let cge = run(EstimatorArg::Cge, base.estimator.q)?;
        // Forward-difference RGE with q = d directions: d + 1 queries, CGE's budget.
        let rge = run(EstimatorArg::Rge, d)?;
        rows.push(DepthRow {
            depth,
            params: d,
            fo: cell(&fo.0, &fo.1),
            cge: cell(&cge.0, &cge.1),
            rge: cell(&rge.0, &rge.1),
        });
    }
    let mut md = format!(
        "# CGE vs RGE ({}{}, {} epochs, batch {}, lr {}, seed {})\n\n\
         RGE uses q = d directions (forward difference), i.e. the same d + 1 queries per step as CGE.\n\n\
         | depth | params | FO acc % | CGE acc % | RGE acc % | CGE queries/step | RGE queries/step | FO s/epoch | CGE s/epoch | RGE s/epoch |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
        dataset_name(c.dataset),
        limits(c),
        c.epochs,
        c.batch_size,
        c.lr,
        c.seed
    );
    for r in &rows {
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {:.0} | {:.0} | {:.2} | {:.2} | {:.2} |\n",
            r.depth,
            r.params,
            pct(r.fo.summary.test_accuracy),
            pct(r.cge.summary.test_accuracy),
            pct(r.rge.summary.test_accuracy),
            r.cge.summary.queries_per_step,
            r.rge.summary.queries_per_step,
            r.fo.summary.seconds_per_epoch,
            r.cge.summary.seconds_per_epoch,
            r.rge.summary.seconds_per_epoch,
        ));
    }
    let series: Vec<Series> = [("FO", 0usize), ("CGE", 1), ("RGE (same queries)", 2)]
        .iter()
        .map(|&(label, k)| Series {
            label: label.to_string(),
            points: rows
                .iter()
                .map(|r| {
                    let cell = [&r.fo, &r.cge, &r.rge][k];
                    (r.params as f64, 100.0 * cell.summary.test_accuracy)
                })
                .collect(),
        })
        .collect();
    finish(
        &dir,
        &md,
        &serde_json::json!({
            "experiment": "cge-vs-rge",
            "dataset": dataset_name(c.dataset),
            "epochs": c.epochs,
            "rows": rows,
        }),
        &LineChart {
            title: "CGE vs RGE: test accuracy by model size",
            x_label: "parameters",
            y_label: "test accuracy (%)",
            series: &series,
            y_range: None,
            log_y: false,
        },
    )
}

#[derive(Serialize)]
struct SparsityRow {
    sparsity: f64,
    /// ZO-GraSP ratios' achieved global sparsity over the weights.
    zo_grasp_global_sparsity: f64,
    zo_grasp: Cell,
    random: Cell,
    fo_sparse_gradients: Cell,
}

fn sparsity(args: SparsityArgs) -> Result<()> {
    let c = &args.common;
    if args.sparsities.is_empty() {
        bail!("--sparsities must list at least one value, e.g. --sparsities 0,0.9");
    }
    for &s in &args.sparsities {
        check_sparsity(s).map_err(|e| anyhow::anyhow!("--sparsities: {e}"))?;
    }
    if args.mask_interval == 0 {
        bail!("--mask-interval must be at least 1");
    }
    let mut model_opts = ModelOpts {
        model: args.model,
        depth: args.depth,
        width: args.width,
    };
    model_opts.resolve();
    // ZO-GraSP scores once, at the initialisation every sub-run starts from; the layer ratios
    // of each sparsity come from the same scores.
    let (train_ds, _, _) = load_data(&data_opts(c), c.seed, false)?;
    let model = build_model(&model_opts, &train_ds)?;
    let init = initial_params(&model, c.seed, Precision::F32, &candle_core::Device::Cpu)?;
    let dir = prepare(c, "sparsity", &args)?;
    let config = PruneConfig {
        method: PruneMethod::ZoGrasp,
        sparsity: 0.0,
        q: args.prune_q,
        mu: 5e-3,
    };
    let pruning = crate::prune::prune_at_init(
        &model,
        &train_ds,
        &init,
        &config,
        args.prune_per_class,
        c.seed,
    )?;
    drop(train_ds);
    let scores = pruning.scores.context("zo-grasp gives scores")?;
    let queries = pruning.ratios.queries;
    eprintln!(
        "ZO-GraSP on {} ({} params): {queries} queries",
        model.name,
        model.num_params()
    );
    let nonzero = args.sparsities.iter().filter(|&&s| s > 0.0).count();
    let zero = args.sparsities.len() - nonzero;
    let mut runner = Runner::new(3 * nonzero + 2 * zero.min(1), c.resume);
    let mut base = base_args(c)?;
    base.model = model_opts.clone();
    base.sparsity.mask_interval = args.mask_interval;
    let mut dense: Option<(Cell, Cell)> = None;
    let mut rows = Vec::new();
    for &s in &args.sparsities {
        let tag = format!("s{s}");
        let row = if s == 0.0 {
            if dense.is_none() {
                let mut a = base.clone();
                a.estimator.estimator = EstimatorArg::Cge;
                let cge = runner.run("dense cge", &dir.join("s0-cge"), a)?;
                let mut a = base.clone();
                a.estimator.estimator = EstimatorArg::Fo;
                let fo = runner.run("dense fo", &dir.join("s0-fo"), a)?;
                dense = Some((cell("s0-cge", &cge), cell("s0-fo", &fo)));
            }
            let (cge, fo) = dense.as_ref().context("dense runs")?;
            SparsityRow {
                sparsity: 0.0,
                zo_grasp_global_sparsity: 0.0,
                zo_grasp: cell(&cge.run, &cge.summary),
                random: cell(&cge.run, &cge.summary),
                fo_sparse_gradients: cell(&fo.run, &fo.summary),
            }
        } else {
            let ratios =
                LayerRatios::from_scores(&model, &scores, s, PruneMethod::ZoGrasp, queries)?;
            let path = dir.join(format!("ratios-zo-grasp-{tag}.json"));
            report::write_json_atomic(&path, &ratios)?;
            let mut zo = base.clone();
            zo.estimator.estimator = EstimatorArg::Cge;
            zo.sparsity.ratios = Some(path.clone());
            let name = format!("{tag}-zo-grasp");
            let zo_s = runner.run(
                &format!("sparsity {s} zo-grasp ratios, sparse cge"),
                &dir.join(&name),
                zo,
            )?;
            let zo_c = cell(&name, &zo_s);
            let mut rnd = base.clone();
            rnd.estimator.estimator = EstimatorArg::Cge;
            rnd.sparsity.sparsity = Some(s);
            let name = format!("{tag}-random");
            let rnd_s = runner.run(
                &format!("sparsity {s} random ratios, sparse cge"),
                &dir.join(&name),
                rnd,
            )?;
            let rnd_c = cell(&name, &rnd_s);
            let mut fo = base.clone();
            fo.estimator.estimator = EstimatorArg::Fo;
            fo.sparsity.ratios = Some(path);
            let name = format!("{tag}-fo");
            let fo_s = runner.run(
                &format!("sparsity {s} fo, sparse gradients (zo-grasp ratios)"),
                &dir.join(&name),
                fo,
            )?;
            SparsityRow {
                sparsity: s,
                zo_grasp_global_sparsity: ratios.global_sparsity,
                zo_grasp: zo_c,
                random: rnd_c,
                fo_sparse_gradients: cell(&name, &fo_s),
            }
        };
        rows.push(row);
    }
    let mut md = format!(
        "# Sparse training: {} on {}{} ({} epochs, batch {}, lr {}, mask interval {}, seed {})\n\n\
         ZO-GraSP: q = {}, {} per class, {} queries. Sparse CGE estimates round(keep ratio × size) random \
         coordinates of each weight tensor (redrawn every {} epochs) plus biases and batch-norm parameters; \
         FO uses the same masks on backprop gradients with the ZO-GraSP ratios.\n\n\
         | sparsity % | ZO-GraSP + sparse CGE acc % | random + sparse CGE acc % | FO sparse gradients acc % | ZO-GraSP CGE queries/step | random CGE queries/step |\n\
         |---|---|---|---|---|---|\n",
        model.name,
        dataset_name(c.dataset),
        limits(c),
        c.epochs,
        c.batch_size,
        c.lr,
        args.mask_interval,
        c.seed,
        args.prune_q,
        args.prune_per_class,
        queries,
        args.mask_interval,
    );
    for r in &rows {
        md.push_str(&format!(
            "| {} | {} | {} | {} | {:.0} | {:.0} |\n",
            sparsity_pct(r.sparsity),
            pct(r.zo_grasp.summary.test_accuracy),
            pct(r.random.summary.test_accuracy),
            pct(r.fo_sparse_gradients.summary.test_accuracy),
            r.zo_grasp.summary.queries_per_step,
            r.random.summary.queries_per_step,
        ));
    }
    let pick = |f: fn(&SparsityRow) -> &Cell| -> Vec<(f64, f64)> {
        rows.iter()
            .map(|r| (100.0 * r.sparsity, 100.0 * f(r).summary.test_accuracy))
            .collect()
    };
    let series = [
        Series {
            label: "ZO-GraSP ratios + sparse CGE".into(),
            points: pick(|r| &r.zo_grasp),
        },
        Series {
            label: "random ratios + sparse CGE".into(),
            points: pick(|r| &r.random),
        },
        Series {
            label: "FO, sparse gradients".into(),
            points: pick(|r| &r.fo_sparse_gradients),
        },
    ];
    finish(
        &dir,
        &md,
        &serde_json::json!({
            "experiment": "sparsity",
            "model": model.name,
            "dataset": dataset_name(c.dataset),
            "epochs": c.epochs,
            "zo_grasp_queries": queries,
            "rows": rows,
        }),
        &LineChart {
            title: "Sparse training: test accuracy by sparsity",
            x_label: "sparsity (%)",
            y_label: "test accuracy (%)",
            series: &series,
            y_range: None,
            log_y: false,
        },
    )
}

fn finish(dir: &Path, md: &str, json: &serde_json::Value, chart: &LineChart) -> Result<()> {
    report::write_atomic(&dir.join("table.md"), md.as_bytes())?;
    report::write_json_atomic(&dir.join("table.json"), json)?;
    report::write_line_chart(dir, "accuracy", chart)?;
    println!("{md}");
    eprintln!("→ {}", dir.join("table.md").display());
    Ok(())
}

/// `--train-limit` / `--test-limit` for table titles (empty when neither is set).
fn limits(c: &CommonOpts) -> String {
    let mut s = String::new();
    if let Some(n) = c.train_limit {
        s.push_str(&format!(", first {n} training images"));
    }
    if let Some(n) = c.test_limit {
        s.push_str(&format!(", first {n} test images"));
    }
    s
}

fn data_opts(c: &CommonOpts) -> DataOpts {
    DataOpts {
        dataset: c.dataset,
        data_dir: c.data_dir.clone(),
        train_limit: c.train_limit,
        test_limit: c.test_limit,
    }
}

fn cnn(depth: usize, width: usize) -> ModelOpts {
    ModelOpts {
        model: ModelArg::Cnn,
        depth: Some(depth),
        width: Some(width),
    }
}

fn est_name(e: EstimatorArg) -> &'static str {
    match e {
        EstimatorArg::Fo => "fo",
        EstimatorArg::Cge => "cge",
        EstimatorArg::Rge => "rge",
    }
}

fn dataset_name(d: DataArg) -> String {
    serde_json::to_value(d)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| format!("{d:?}"))
}
