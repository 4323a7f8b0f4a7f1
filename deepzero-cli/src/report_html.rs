//! `deepzero report RUN… --out DIR`: one self-contained HTML page that overlays runs.
//!
//! Each RUN is recognised by its files: a `deepzero train` or `certify train-denoiser` run by
//! `metrics.jsonl`, an `experiment` by its sub-runs, a `certify run` by `certify.tsv`, a
//! `certify compare` by its `certify-<method>.tsv` files, a `pde` run by the `mae_per_step` of
//! its `summary.json`. Training runs give train loss and test accuracy against epochs, wall
//! seconds and queries; certification runs certified accuracy against radius; PDE runs the MAE
//! of each method over time. Every chart is written by [`report::write_line_chart`] as PNG + SVG
//! into DIR, and its SVG is inlined into `report.html` with the summary tables: the page needs
//! no network, no script and no other file.

use crate::certify::{plot_certified_accuracy, SUMMARY_RADII};
use crate::report::{self, LineChart, Series};
use anyhow::{bail, Context, Result};
use clap::Args;
use deepzero_certify::tsv::{certified_accuracy, read_tsv, CertifyRow};
use deepzero_core::trainer::EpochMetrics;
use serde_json::Value;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

/// Flags of `deepzero report`.
#[derive(Args, Debug)]
pub struct ReportArgs {
    /// Run directories: `train`, `experiment` (each sub-run), `certify run`, `certify compare`
    /// (each method), `certify train-denoiser` or `pde` runs, in any mix.
    #[arg(required = true, value_name = "RUN")]
    pub runs: Vec<PathBuf>,
    /// Report directory: `report.html` and every chart as PNG + SVG.
    #[arg(long)]
    pub out: PathBuf,
    /// Allow writing into a non-empty --out directory.
    #[arg(long)]
    pub overwrite: bool,
}

/// The page, and the chart files beside it (`<stem>.png|svg`; removed by `--overwrite` first).
const PAGE: &str = "report.html";
const CERTIFY_STEM: &str = "certified_accuracy";
const PDE_STEM: &str = "mae_over_time";

/// The training figures plotted, each against every [`AXES`] entry.
const FIGURES: [Figure; 2] = [
    Figure {
        key: "train_loss",
        name: "train loss",
        stem: "loss",
    },
    Figure {
        key: "test_accuracy",
        name: "test accuracy",
        stem: "accuracy",
    },
];

/// The x axes of the training charts: a key of [`EpochMetrics::get`] and its label.
const AXES: [(&str, &str); 3] = [
    ("epoch", "epoch"),
    ("seconds", "training seconds"),
    ("queries", "queries"),
];

struct Figure {
    key: &'static str,
    name: &'static str,
    stem: &'static str,
}

fn chart_stem(figure: &Figure, axis: &str) -> String {
    format!("{}_by_{axis}", figure.stem)
}

/// A run with per-epoch history: `deepzero train` (also an experiment's sub-run) or
/// `certify train-denoiser`.
struct TrainingRun {
    label: String,
    dir: PathBuf,
    model: String,
    estimator: String,
    params: Option<u64>,
    history: Vec<EpochMetrics>,
}

/// Certificates of one classifier: a `certify run`, or one method of a `certify compare`.
struct CertifyRun {
    label: String,
    dir: PathBuf,
    rows: Vec<CertifyRow>,
}

/// One method of a `deepzero pde` run.
struct PdeMethod {
    name: String,
    mae: Option<f64>,
    mae_std: Option<f64>,
    params: Option<u64>,
    queries: Option<u64>,
    seconds: Option<f64>,
    mae_per_step: Vec<f64>,
}

struct PdeRun {
    label: String,
    dir: PathBuf,
    model: String,
    methods: Vec<PdeMethod>,
}

/// Everything found in the RUN directories, in the order given.
#[derive(Default)]
struct Runs {
    training: Vec<TrainingRun>,
    certify: Vec<CertifyRun>,
    pde: Vec<PdeRun>,
}

pub fn run(args: ReportArgs) -> Result<()> {
    report::check_run_dir(&args.out, args.overwrite)?;
    for dir in &args.runs {
        if same_dir(dir, &args.out) {
            bail!(
                "--out {} is one of the runs: write the report elsewhere (its charts would \
                 replace the run's own)",
                args.out.display()
            );
        }
    }
    let labels = labels(&args.runs);
    let mut runs = Runs::default();
    for (dir, label) in args.runs.iter().zip(labels) {
        load(dir, label, &mut runs)?;
    }
    report::prepare_run_dir(&args.out, args.overwrite)?;
    remove_old_charts(&args.out)?;
    let page = write_page(&args.out, &runs)?;
    eprintln!(
        "report of {} training, {} certification and {} PDE runs → {}",
        runs.training.len(),
        runs.certify.len(),
        runs.pde.len(),
        page.display()
    );
    Ok(())
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (fs::canonicalize(a), fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// Each run's label: its directory's name; names given more than once get their parent's name
/// in front, and a number after where that is still not enough.
fn labels(dirs: &[PathBuf]) -> Vec<String> {
    let absolute = |d: &PathBuf| std::path::absolute(d).unwrap_or_else(|_| d.clone());
    let tail = |d: &PathBuf, parts: usize| -> String {
        let path = absolute(d);
        let names: Vec<String> = path
            .components()
            .filter_map(|c| match c {
                std::path::Component::Normal(s) => Some(s.to_string_lossy().into_owned()),
                _ => None,
            })
            .collect();
        match names.len() {
            0 => path.display().to_string(),
            n => names[n.saturating_sub(parts)..].join("/"),
        }
    };
    let count = |all: &[String], x: &String| all.iter().filter(|y| *y == x).count();
    let short: Vec<String> = dirs.iter().map(|d| tail(d, 1)).collect();
    let longer: Vec<String> = dirs
        .iter()
        .zip(&short)
        .map(|(d, s)| match count(&short, s) {
            1 => s.clone(),
            _ => tail(d, 2),
        })
        .collect();
    longer
        .iter()
        .enumerate()
        .map(|(i, l)| match count(&longer, l) {
            1 => l.clone(),
            _ => format!(
                "{l} ({})",
                1 + longer[..i].iter().filter(|x| *x == l).count()
            ),
        })
        .collect()
}

/// What a RUN directory holds, recognised by its files.
enum Kind {
    /// `deepzero pde`: its `summary.json`, with `mae_per_step`.
    Pde(Value),
    /// `certify run`: `certify.tsv`.
    Certify,
    /// `certify compare`: each method's `certify-<method>.tsv`.
    Compare(Vec<(String, PathBuf)>),
    /// `train` or `certify train-denoiser`: `metrics.jsonl`.
    Training,
    /// `experiment`: sub-runs, each with `config.json` and `metrics.jsonl`.
    Experiment(Vec<(String, PathBuf)>),
}

fn kind(dir: &Path) -> Result<Kind> {
    if !dir.exists() {
        bail!("run {}: no such directory", dir.display());
    }
    if !dir.is_dir() {
        bail!(
            "run {}: not a directory; name a run directory",
            dir.display()
        );
    }
    let summary = dir.join("summary.json");
    if summary.is_file() {
        let s = read_json(&summary)?;
        if s.get("mae_per_step").is_some() {
            return Ok(Kind::Pde(s));
        }
    }
    if dir.join("certify.tsv").is_file() {
        return Ok(Kind::Certify);
    }
    let tsvs = compare_tsvs(dir)?;
    if !tsvs.is_empty() {
        return Ok(Kind::Compare(tsvs));
    }
    if dir.join("metrics.jsonl").is_file() {
        return Ok(Kind::Training);
    }
    let subs = sub_runs(dir)?;
    if !subs.is_empty() {
        return Ok(Kind::Experiment(subs));
    }
    if dir.join("config.json").is_file() {
        bail!(
            "run {}: no results yet (no metrics.jsonl, certify.tsv, or summary.json of a \
             finished pde run); wait until it has finished an epoch or an image, or leave it out",
            dir.display()
        );
    }
    bail!(
        "{} is not a deepzero run directory: it has none of metrics.jsonl (train, \
         certify train-denoiser), certify.tsv (certify run), certify-<method>.tsv (certify \
         compare), summary.json with mae_per_step (pde) or sub-runs (experiment)",
        dir.display()
    )
}

/// Read the run in `dir` (one RUN argument, labelled `label`) into `runs`.
fn load(dir: &Path, label: String, runs: &mut Runs) -> Result<()> {
    match kind(dir)? {
        Kind::Pde(summary) => runs.pde.push(pde_run(dir, label, &summary)?),
        Kind::Certify => runs.certify.push(CertifyRun {
            rows: certificates(&dir.join("certify.tsv"))?,
            label,
            dir: dir.to_path_buf(),
        }),
        Kind::Compare(tsvs) => {
            for (method, path) in tsvs {
                runs.certify.push(CertifyRun {
                    label: format!("{label}/{method}"),
                    rows: certificates(&path)?,
                    dir: dir.to_path_buf(),
                });
            }
        }
        Kind::Training => runs.training.push(training_run(dir, label)?),
        Kind::Experiment(subs) => {
            for (name, sub) in subs {
                runs.training
                    .push(training_run(&sub, format!("{label}/{name}"))?);
            }
        }
    }
    Ok(())
}

fn read_json(path: &Path) -> Result<Value> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))
}

/// The sorted subdirectories of `dir` that are training runs (`config.json` and
/// `metrics.jsonl`): the sub-runs of an experiment.
fn sub_runs(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut subs = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry
            .with_context(|| format!("reading {}", dir.display()))?
            .path();
        if path.join("config.json").is_file() && path.join("metrics.jsonl").is_file() {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            subs.push((name, path));
        }
    }
    subs.sort();
    Ok(subs)
}

/// The sorted `certify-<method>.tsv` files of a `certify compare` directory.
fn compare_tsvs(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry
            .with_context(|| format!("reading {}", dir.display()))?
            .path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if let Some(method) = name
            .strip_prefix("certify-")
            .and_then(|n| n.strip_suffix(".tsv"))
        {
            if path.is_file() {
                found.push((method.to_string(), path));
            }
        }
    }
    found.sort();
    Ok(found)
}

fn certificates(path: &Path) -> Result<Vec<CertifyRow>> {
    let rows = read_tsv(path)?;
    if rows.is_empty() {
        bail!(
            "{}: no image certified yet; wait for the first row or leave the run out",
            path.display()
        );
    }
    Ok(rows)
}

/// A training run's history from `metrics.jsonl`, and its model, estimator and size from
/// `summary.json` (`config.json` while the run has not finished).
fn training_run(dir: &Path, label: String) -> Result<TrainingRun> {
    let path = dir.join("metrics.jsonl");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut history = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let m: EpochMetrics = serde_json::from_str(line).with_context(|| {
            format!(
                "{} line {}: not an epoch's metrics (a deepzero run's metrics.jsonl?)",
                path.display(),
                i + 1
            )
        })?;
        history.push(m);
    }
    if history.is_empty() {
        bail!(
            "run {}: {} has no epoch yet; wait for the first epoch or leave the run out",
            dir.display(),
            path.display()
        );
    }
    let summary = dir.join("summary.json");
    let summary = match summary.is_file() {
        true => read_json(&summary)?,
        false => Value::Null,
    };
    let config = dir.join("config.json");
    let config = match config.is_file() {
        true => read_json(&config)?,
        false => Value::Null,
    };
    let text_of = |v: &Value| v.as_str().map(str::to_string);
    let denoiser = dir.join("denoiser.json").is_file();
    let model = match denoiser {
        true => text_of(&summary["method"])
            .or_else(|| text_of(&config["method"]))
            .map(|m| format!("denoiser ({m})")),
        false => text_of(&summary["model"]).or_else(|| text_of(&config["model"]["model"])),
    };
    let estimator =
        text_of(&summary["estimator"]).or_else(|| text_of(&config["estimator"]["estimator"]));
    Ok(TrainingRun {
        label,
        dir: dir.to_path_buf(),
        model: model.unwrap_or_else(|| "–".into()),
        estimator: estimator.unwrap_or_else(|| "–".into()),
        params: summary["params"]
            .as_u64()
            .or_else(|| summary["denoiser_params"].as_u64()),
        history,
    })
}

/// A `deepzero pde` run's methods from its `summary.json`.
fn pde_run(dir: &Path, label: String, summary: &Value) -> Result<PdeRun> {
    let path = dir.join("summary.json");
    let Some(curves) = summary["mae_per_step"].as_object() else {
        bail!("{}: `mae_per_step` is not an object", path.display());
    };
    let mut methods = Vec::new();
    for (name, curve) in curves {
        let mae_per_step = curve
            .as_array()
            .map(|a| a.iter().map(|v| v.as_f64().unwrap_or(f64::NAN)).collect())
            .with_context(|| {
                format!(
                    "{}: `mae_per_step.{name}` is not a list of numbers",
                    path.display()
                )
            })?;
        methods.push(PdeMethod {
            name: name.clone(),
            mae: summary["mae"][name].as_f64(),
            mae_std: summary["mae_std"][name].as_f64(),
            params: summary["params"][name].as_u64(),
            queries: summary["queries"][name].as_u64(),
            seconds: summary["seconds"][name].as_f64(),
            mae_per_step,
        });
    }
    Ok(PdeRun {
        label,
        dir: dir.to_path_buf(),
        model: summary["model"].as_str().unwrap_or("–").to_string(),
        methods,
    })
}

/// Remove the charts an earlier report left in `dir` (`--overwrite`), so none of another set of
/// runs stays beside the new page.
fn remove_old_charts(dir: &Path) -> Result<()> {
    let mut stems: Vec<String> = FIGURES
        .iter()
        .flat_map(|f| AXES.iter().map(move |(axis, _)| chart_stem(f, axis)))
        .collect();
    stems.extend([CERTIFY_STEM.to_string(), PDE_STEM.to_string()]);
    for stem in stems {
        for ext in ["png", "svg"] {
            let path = dir.join(format!("{stem}.{ext}"));
            if path.is_file() {
                fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
            }
        }
    }
    Ok(())
}

/// `s` with `& < > " '` escaped, for text and attribute values in the page.
pub fn escape_html(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A chart's SVG (just written to `dir`) as a figure of the page.
fn figure(dir: &Path, stem: &str) -> Result<String> {
    let path = dir.join(format!("{stem}.svg"));
    let svg = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok(format!(
        "<figure>\n{}\n<figcaption>{stem}.png · {stem}.svg</figcaption>\n</figure>\n",
        svg.trim()
    ))
}

/// The charts of the training runs, overlaid: every figure against every axis.
fn training_charts(dir: &Path, runs: &[TrainingRun]) -> Result<String> {
    let mut html = String::new();
    for f in &FIGURES {
        for (axis, axis_label) in AXES {
            let series: Vec<Series> = runs
                .iter()
                .map(|r| Series {
                    label: r.label.clone(),
                    points: r
                        .history
                        .iter()
                        .filter_map(|m| Some((m.get(axis)?, m.get(f.key)?)))
                        .collect(),
                })
                .collect();
            let stem = chart_stem(f, axis);
            let title = format!("{} by {axis_label}", capitalised(f.name));
            report::write_line_chart(
                dir,
                &stem,
                &LineChart {
                    title: &title,
                    x_label: axis_label,
                    y_label: f.name,
                    series: &series,
                    y_range: None,
                    log_y: false,
                },
            )?;
            html.push_str(&figure(dir, &stem)?);
        }
    }
    Ok(html)
}

fn capitalised(s: &str) -> String {
    let mut chars = s.chars();
    match chars.next() {
        Some(c) => c.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// An optional figure as a table cell.
fn cell<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "–".to_string(), |v| v.to_string())
}

fn fixed(v: Option<f64>, decimals: usize) -> String {
    cell(
        v.filter(|v| v.is_finite())
            .map(|v| format!("{v:.decimals$}")),
    )
}

/// One table: `head` cells, then rows of cells (already escaped).
fn table(head: &[&str], rows: &[Vec<String>]) -> String {
    let mut html = String::from("<table>\n<thead><tr>");
    for h in head {
        let _ = write!(html, "<th>{h}</th>");
    }
    html.push_str("</tr></thead>\n<tbody>\n");
    for row in rows {
        html.push_str("<tr>");
        for c in row {
            let _ = write!(html, "<td>{c}</td>");
        }
        html.push_str("</tr>\n");
    }
    html.push_str("</tbody>\n</table>\n");
    html
}

fn training_table(runs: &[TrainingRun]) -> String {
    let rows: Vec<Vec<String>> = runs
        .iter()
        .map(|r| {
            let last = r.history.last();
            let accuracy: Vec<f64> = r
                .history
                .iter()
                .filter_map(|m| m.get("test_accuracy"))
                .filter(|a| a.is_finite())
                .collect();
            vec![
                escape_html(&r.label),
                escape_html(&r.model),
                escape_html(&r.estimator),
                cell(last.map(|m| m.epoch)),
                fixed(last.and_then(|m| m.get("test_accuracy")), 4),
                fixed(accuracy.iter().copied().reduce(f64::max), 4),
                fixed(last.map(|m| m.train_loss), 4),
                cell(last.map(|m| m.queries)),
                fixed(last.map(|m| m.seconds), 2),
                cell(r.params),
                escape_html(&r.dir.display().to_string()),
            ]
        })
        .collect();
    table(
        &[
            "run",
            "model",
            "estimator",
            "epochs",
            "final test accuracy",
            "best test accuracy",
            "final train loss",
            "queries",
            "seconds",
            "params",
            "directory",
        ],
        &rows,
    )
}

fn certify_table(runs: &[CertifyRun]) -> String {
    let head: Vec<String> = SUMMARY_RADII.iter().map(|r| format!("r = {r}")).collect();
    let mut columns = vec!["run", "images", "abstain rate"];
    columns.extend(head.iter().map(String::as_str));
    columns.push("directory");
    let rows: Vec<Vec<String>> = runs
        .iter()
        .map(|r| {
            let abstain = r.rows.iter().filter(|c| c.predict.is_none()).count();
            let mut row = vec![
                escape_html(&r.label),
                r.rows.len().to_string(),
                format!("{:.3}", abstain as f64 / r.rows.len().max(1) as f64),
            ];
            row.extend(
                certified_accuracy(&r.rows, &SUMMARY_RADII)
                    .iter()
                    .map(|a| format!("{a:.3}")),
            );
            row.push(escape_html(&r.dir.display().to_string()));
            row
        })
        .collect();
    format!(
        "<p>Certified accuracy at ℓ2 radius r (fraction of the images certified correct with \
         radius ≥ r).</p>\n{}",
        table(&columns, &rows)
    )
}

fn pde_table(runs: &[PdeRun]) -> String {
    let rows: Vec<Vec<String>> = runs
        .iter()
        .flat_map(|r| {
            r.methods.iter().map(move |m| {
                vec![
                    escape_html(&r.label),
                    escape_html(&m.name.to_uppercase()),
                    fixed(m.mae, 4),
                    fixed(m.mae_std, 4),
                    escape_html(&r.model),
                    cell(m.params),
                    cell(m.queries),
                    fixed(m.seconds, 2),
                    escape_html(&r.dir.display().to_string()),
                ]
            })
        })
        .collect();
    table(
        &[
            "run",
            "method",
            "MAE",
            "MAE std",
            "network",
            "params",
            "queries",
            "seconds",
            "directory",
        ],
        &rows,
    )
}

const STYLE: &str = "body{font-family:sans-serif;margin:24px;color:#222;max-width:1500px}\
h1{font-size:26px}h2{font-size:21px;margin-top:36px;border-bottom:1px solid #ccc}\
table{border-collapse:collapse;margin:12px 0;font-size:14px}\
th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}\
th:first-child,td:first-child,td:last-child{text-align:left}\
thead{background:#f2f2f2}\
.charts{display:grid;grid-template-columns:repeat(auto-fill,minmax(560px,1fr));gap:12px}\
figure{margin:0}figure svg{width:100%;height:auto;display:block}\
figcaption{font-size:12px;color:#666;text-align:center}";

/// Write every chart and `report.html` into `dir`; the page's path.
fn write_page(dir: &Path, runs: &Runs) -> Result<PathBuf> {
    let mut html = String::new();
    let _ = write!(
        html,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <title>deepzero report</title>\n<style>{STYLE}</style>\n</head>\n<body>\n\
         <h1>deepzero report</h1>\n"
    );
    if !runs.training.is_empty() {
        html.push_str("<h2>Training</h2>\n");
        html.push_str(&training_table(&runs.training));
        html.push_str("<div class=\"charts\">\n");
        html.push_str(&training_charts(dir, &runs.training)?);
        html.push_str("</div>\n");
    }
    if !runs.certify.is_empty() {
        html.push_str("<h2>Certified accuracy</h2>\n");
        html.push_str(&certify_table(&runs.certify));
        let curves: Vec<(String, Vec<CertifyRow>)> = runs
            .certify
            .iter()
            .map(|r| (r.label.clone(), r.rows.clone()))
            .collect();
        plot_certified_accuracy(dir, &curves)?;
        let _ = write!(
            html,
            "<div class=\"charts\">\n{}</div>\n",
            figure(dir, CERTIFY_STEM)?
        );
    }
    if !runs.pde.is_empty() {
        html.push_str("<h2>PDE error over time</h2>\n");
        html.push_str(&pde_table(&runs.pde));
        let curves: Vec<(String, Vec<f64>)> = runs
            .pde
            .iter()
            .flat_map(|r| {
                r.methods.iter().map(move |m| {
                    let label = match runs.pde.len() {
                        1 => m.name.to_uppercase(),
                        _ => format!("{} {}", r.label, m.name.to_uppercase()),
                    };
                    (label, m.mae_per_step.clone())
                })
            })
            .collect();
        crate::pde::plot_mae_over_time(dir, &curves)?;
        let _ = write!(
            html,
            "<div class=\"charts\">\n{}</div>\n",
            figure(dir, PDE_STEM)?
        );
    }
    html.push_str("</body>\n</html>\n");
    let page = dir.join(PAGE);
    report::write_atomic(&page, html.as_bytes())?;
    Ok(page)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_html_escapes_markup() {
        assert_eq!(
            escape_html(r#"<a href="x">&'</a>"#),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;&lt;/a&gt;"
        );
        assert_eq!(escape_html("plain ℓ2"), "plain ℓ2");
    }

    #[test]
    fn report_labels_are_names_made_unique() {
        let dirs: Vec<PathBuf> = ["/r/a/cge", "/r/b/cge", "/r/fo", "/r/fo", "/r/rge"]
            .iter()
            .map(PathBuf::from)
            .collect();
        assert_eq!(
            labels(&dirs),
            ["a/cge", "b/cge", "r/fo (1)", "r/fo (2)", "rge"]
        );
    }
}
