//! Run-report helpers: line charts (PNG + SVG), atomic file writes, JSON-lines
//! logs and run-directory management.

use std::fs::{self, File};
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;

/// One series of a line chart.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

/// A line chart, written as both `<stem>.png` (1024×640) and `<stem>.svg` in `dir`.
#[derive(Debug, Clone, Copy)]
pub struct LineChart<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    pub y_label: &'a str,
    pub series: &'a [Series],
    /// Fixed y range `(lo, hi)`; `None` derives it from the data.
    pub y_range: Option<(f64, f64)>,
    /// Logarithmic y axis (points with `y <= 0` are skipped).
    pub log_y: bool,
}

/// Chart size in pixels (PNG) / user units (SVG).
const CHART_SIZE: (u32, u32) = (1024, 640);
const FONT_FAMILY: &str = "sans-serif";

/// Indices into [`Palette99`] that read well on a white background
/// (skips its yellow, cyan, lime and pastel entries).
const PALETTE_ORDER: [usize; 12] = [3, 0, 1, 4, 5, 10, 7, 12, 14, 18, 16, 20];

fn series_color(i: usize) -> RGBColor {
    let (r, g, b) = Palette99::COLORS[PALETTE_ORDER[i % PALETTE_ORDER.len()]];
    RGBColor(r, g, b)
}

/// Register the embedded DejaVu Sans font with plotters (no system fonts needed).
fn ensure_font() -> anyhow::Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        plotters::style::register_font(
            FONT_FAMILY,
            plotters::style::FontStyle::Normal,
            dejavu::sans::regular(),
        )
        .is_ok()
    });
    if ok {
        Ok(())
    } else {
        bail!("failed to register the embedded DejaVu Sans font with plotters")
    }
}

fn draw_err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow::anyhow!("chart rendering failed: {e}")
}

/// Pad a degenerate (or tiny) interval around `v`.
fn pad_equal(v: f64) -> Range<f64> {
    let pad = if v == 0.0 { 1.0 } else { v.abs() * 0.1 };
    (v - pad)..(v + pad)
}

fn min_max(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    values.fold(None, |acc, v| match acc {
        None => Some((v, v)),
        Some((lo, hi)) => Some((lo.min(v), hi.max(v))),
    })
}

/// The finite (and, for a log axis, positive-y) points of every series.
fn clean_series(chart: &LineChart) -> Vec<Vec<(f64, f64)>> {
    chart
        .series
        .iter()
        .map(|s| {
            s.points
                .iter()
                .copied()
                .filter(|&(x, y)| x.is_finite() && y.is_finite() && (!chart.log_y || y > 0.0))
                .collect()
        })
        .collect()
}

fn x_range(points: &[Vec<(f64, f64)>]) -> Range<f64> {
    match min_max(points.iter().flatten().map(|p| p.0)) {
        None => 0.0..1.0,
        Some((lo, hi)) if lo == hi => pad_equal(lo),
        Some((lo, hi)) => lo..hi,
    }
}

fn y_range(chart: &LineChart, points: &[Vec<(f64, f64)>]) -> anyhow::Result<Range<f64>> {
    if let Some((a, b)) = chart.y_range {
        let (lo, hi) = (a.min(b), a.max(b));
        if !(lo.is_finite() && hi.is_finite()) {
            bail!("chart `{}`: y range ({a}, {b}) is not finite", chart.title);
        }
        if chart.log_y && lo <= 0.0 {
            bail!(
                "chart `{}`: y range ({a}, {b}) must be positive on a log axis",
                chart.title
            );
        }
        return Ok(match (chart.log_y, lo == hi) {
            (true, true) => log_axis(lo / 2.0, hi * 2.0),
            (true, false) => log_axis(lo, hi),
            (false, true) => pad_equal(lo),
            (false, false) => lo..hi,
        });
    }
    let data = min_max(points.iter().flatten().map(|p| p.1));
    Ok(match (data, chart.log_y) {
        (None, false) => 0.0..1.0,
        (None, true) => log_axis(0.1, 1.0),
        (Some((lo, hi)), true) if lo == hi => log_axis(lo / 2.0, hi * 2.0),
        (Some((lo, hi)), true) => {
            // ~5% of the decades spanned as margin on each side.
            let m = (hi / lo).powf(0.05);
            log_axis(lo / m, hi * m)
        }
        (Some((lo, hi)), false) if lo == hi => pad_equal(lo),
        (Some((lo, hi)), false) => {
            let m = (hi - lo) * 0.05;
            lo - m..hi + m
        }
    })
}

/// A log-axis range that plotters can label: its tick labels start at the
/// first power of ten >= the range start, so a range containing no power of
/// ten gets no labels at all. Extend such a range down to the power of ten
/// below it, and nudge the start down so an exact power of ten is not lost
/// to rounding in plotters' `ceil(log10(start))`.
fn log_axis(lo: f64, hi: f64) -> Range<f64> {
    let first_pow = 10f64.powf((lo.log10() - 1e-9).ceil());
    let lo = if first_pow > hi * (1.0 + 1e-9) {
        10f64.powf((lo.log10() + 1e-9).floor())
    } else {
        lo
    };
    lo * (1.0 - 1e-9)..hi
}

/// Strip trailing zeros (and a trailing '.') from a fixed-point mantissa.
fn trim_zeros(s: &str) -> &str {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        s
    }
}

/// Tick label with `decimals` fixed-point decimals, or scientific notation
/// with `sig` significant digits for very large / very small magnitudes;
/// trailing zeros trimmed.
fn fmt_num(v: f64, decimals: usize, sig: usize) -> String {
    let a = v.abs();
    if a < 1e-12 {
        "0".to_string()
    } else if !(1e-3..1e5).contains(&a) {
        let s = format!("{v:.*e}", sig.saturating_sub(1));
        // 1.00e-4 -> 1e-4, 2.50e6 -> 2.5e6
        match s.split_once('e') {
            Some((m, e)) => format!("{}e{e}", trim_zeros(m)),
            None => s,
        }
    } else {
        trim_zeros(&format!("{v:.decimals$}")).to_string()
    }
}

/// Log-axis ticks are 1..9 × 10^k: two significant digits always suffice.
fn fmt_log_tick(v: f64) -> String {
    fmt_num(v, 4, 2)
}

/// Digits needed to tell apart ticks on a linear axis spanning `r`
/// (ticks are ~1/10 of the span apart, on 1/2/5 steps).
fn linear_tick_digits(r: &Range<f64>) -> (usize, usize) {
    let span = (r.end - r.start).abs().max(f64::MIN_POSITIVE);
    let mag = r.start.abs().max(r.end.abs()).max(span);
    let decimals = (2.0 - span.log10().floor()).clamp(0.0, 12.0) as usize;
    let sig = ((mag / span).log10().ceil() + 2.0).clamp(2.0, 12.0) as usize;
    (decimals, sig)
}

/// The plot corner where the legend covers the least of the data: the
/// corner box the legend will roughly occupy is tested against points
/// sampled along every line segment (in axis-normalised coordinates).
fn legend_position(
    chart: &LineChart,
    points: &[Vec<(f64, f64)>],
    xr: &Range<f64>,
    yr: &Range<f64>,
) -> SeriesLabelPosition {
    // Approximate plot area (pixels) and legend size for the fonts used.
    let (plot_w, plot_h) = (CHART_SIZE.0 as f64 - 140.0, CHART_SIZE.1 as f64 - 130.0);
    let n = chart.series.iter().filter(|s| !s.label.is_empty()).count();
    let chars = chart
        .series
        .iter()
        .map(|s| s.label.chars().count())
        .max()
        .unwrap_or(0);
    let w = ((chars as f64 * 9.0 + 70.0) / plot_w).min(1.0);
    let h = ((n as f64 * 21.0 + 30.0) / plot_h).min(1.0);

    let ty = |y: f64| if chart.log_y { y.ln() } else { y };
    let (y0, y1) = (ty(yr.start), ty(yr.end));
    let norm = |(x, y): (f64, f64)| {
        (
            (x - xr.start) / (xr.end - xr.start),
            (ty(y) - y0) / (y1 - y0),
        )
    };
    let mut samples = Vec::new();
    for pts in points {
        if let [p] = pts.as_slice() {
            samples.push(norm(*p));
        }
        for seg in pts.windows(2) {
            let (a, b) = (norm(seg[0]), norm(seg[1]));
            for k in 0..=16 {
                let t = k as f64 / 16.0;
                samples.push((a.0 + (b.0 - a.0) * t, a.1 + (b.1 - a.1) * t));
            }
        }
    }
    let candidates = [
        (
            SeriesLabelPosition::UpperRight,
            1.0 - w..=1.0,
            1.0 - h..=1.0,
        ),
        (SeriesLabelPosition::LowerRight, 1.0 - w..=1.0, 0.0..=h),
        (SeriesLabelPosition::UpperLeft, 0.0..=w, 1.0 - h..=1.0),
        (SeriesLabelPosition::LowerLeft, 0.0..=w, 0.0..=h),
    ];
    let mut best = (SeriesLabelPosition::UpperRight, usize::MAX);
    for (pos, bx, by) in candidates {
        let hits = samples
            .iter()
            .filter(|(u, v)| bx.contains(u) && by.contains(v))
            .count();
        if hits < best.1 {
            best = (pos, hits);
        }
    }
    best.0
}

/// Draw the chart onto any plotters backend.
fn draw_chart<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    chart: &LineChart,
    points: &[Vec<(f64, f64)>],
) -> anyhow::Result<()> {
    let xr = x_range(points);
    let yr = y_range(chart, points)?;

    root.fill(&WHITE).map_err(draw_err)?;
    let mut builder = ChartBuilder::on(root);
    builder
        .caption(chart.title, (FONT_FAMILY, 28))
        .margin(18)
        .margin_right(36) // room for the last x tick label
        .x_label_area_size(56)
        .y_label_area_size(84);

    let legend = legend_position(chart, points, &xr, &yr);
    let (xd, xs) = linear_tick_digits(&xr);
    let x_fmt = move |v: &f64| fmt_num(*v, xd, xs);
    if chart.log_y {
        let ctx = builder
            .build_cartesian_2d(xr, yr.log_scale())
            .map_err(draw_err)?;
        draw_body(ctx, chart, points, legend, &x_fmt, &|v| fmt_log_tick(*v))?;
    } else {
        let (yd, ys) = linear_tick_digits(&yr);
        let ctx = builder.build_cartesian_2d(xr, yr).map_err(draw_err)?;
        draw_body(ctx, chart, points, legend, &x_fmt, &|v| fmt_num(*v, yd, ys))?;
    }
    root.present().map_err(draw_err)?;
    Ok(())
}

/// Mesh, series and legend; generic over the y coordinate (linear or log).
fn draw_body<'a, DB, Y>(
    mut ctx: ChartContext<'a, DB, Cartesian2d<RangedCoordf64, Y>>,
    chart: &LineChart,
    points: &[Vec<(f64, f64)>],
    legend: SeriesLabelPosition,
    x_fmt: &dyn Fn(&f64) -> String,
    y_fmt: &dyn Fn(&f64) -> String,
) -> anyhow::Result<()>
where
    DB: DrawingBackend + 'a,
    Y: Ranged<ValueType = f64> + plotters::coord::ranged1d::ValueFormatter<f64>,
{
    let mut mesh = ctx.configure_mesh();
    mesh.x_desc(chart.x_label)
        .y_desc(chart.y_label)
        .label_style((FONT_FAMILY, 16))
        .axis_desc_style((FONT_FAMILY, 18))
        .x_label_formatter(x_fmt)
        .y_label_formatter(y_fmt)
        .bold_line_style(BLACK.mix(0.15))
        .light_line_style(BLACK.mix(0.05));
    if chart.log_y {
        // The 1..9 × 10^k ticks already grid a log axis; plotters' extra
        // light lines there bunch up into a grey band.
        mesh.y_max_light_lines(0);
    }
    mesh.draw().map_err(draw_err)?;

    let mut any_label = false;
    for (i, (series, pts)) in chart.series.iter().zip(points).enumerate() {
        let color = series_color(i);
        let style = color.stroke_width(2);
        let anno = if pts.len() == 1 {
            // A single point draws no line: mark it.
            ctx.draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled())))
                .map_err(draw_err)?
        } else {
            ctx.draw_series(LineSeries::new(pts.iter().copied(), style))
                .map_err(draw_err)?
        };
        if !series.label.is_empty() {
            any_label = true;
            anno.label(series.label.as_str()).legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(3))
            });
        }
    }
    if any_label {
        ctx.configure_series_labels()
            .position(legend)
            .label_font((FONT_FAMILY, 16))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.4))
            .margin(12)
            .draw()
            .map_err(draw_err)?;
    }
    Ok(())
}

/// Write `chart` as `<stem>.png` (1024×640) and `<stem>.svg` in `dir`
/// (created if missing). Both files are replaced atomically.
pub fn write_line_chart(dir: &Path, stem: &str, chart: &LineChart) -> anyhow::Result<()> {
    ensure_font()?;
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let points = clean_series(chart);

    // SVG: render into memory, then write atomically.
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, CHART_SIZE).into_drawing_area();
        draw_chart(&root, chart, &points)?;
    }
    write_atomic(&dir.join(format!("{stem}.svg")), svg.as_bytes())?;

    // PNG: BitMapBackend picks the encoder from the extension, so render to a
    // hidden `.png` temp name in the same directory, fsync and rename.
    let tmp = dir.join(format!(".{stem}.tmp.png"));
    let dest = dir.join(format!("{stem}.png"));
    let result = (|| -> anyhow::Result<()> {
        {
            let root = BitMapBackend::new(&tmp, CHART_SIZE).into_drawing_area();
            draw_chart(&root, chart, &points)?;
        }
        File::open(&tmp)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("syncing {}", tmp.display()))?;
        fs::rename(&tmp, &dest)
            .with_context(|| format!("renaming {} to {}", tmp.display(), dest.display()))?;
        sync_parent(&dest);
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.with_context(|| format!("writing chart {}", dest.display()))
}

/// Best-effort fsync of the directory holding `path`, so a rename is durable.
fn sync_parent(path: &Path) {
    #[cfg(unix)]
    if let Some(parent) = path.parent() {
        let parent = if parent.as_os_str().is_empty() {
            Path::new(".")
        } else {
            parent
        };
        if let Ok(d) = File::open(parent) {
            let _ = d.sync_all();
        }
    }
    #[cfg(not(unix))]
    let _ = path;
}

/// Write bytes atomically: write to `<path>.tmp` in the same directory, fsync, rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let Some(name) = path.file_name() else {
        bail!("cannot write to {}: not a file path", path.display());
    };
    let mut tmp_name = name.to_os_string();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    let result = (|| -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("writing {}", path.display()));
    }
    sync_parent(path);
    Ok(())
}

/// Serialize `value` as pretty JSON (plus a trailing newline) and write it atomically.
pub fn write_json_atomic<T: serde::Serialize + ?Sized>(
    path: &Path,
    value: &T,
) -> anyhow::Result<()> {
    let mut s = serde_json::to_string_pretty(value)
        .with_context(|| format!("serializing JSON for {}", path.display()))?;
    s.push('\n');
    write_atomic(path, s.as_bytes())
}

/// Create the run directory `path` (and its parents).
///
/// Fails if `path` exists but is not a directory, or is a non-empty directory
/// and `overwrite` is false. With `overwrite`, existing files are left in place
/// (and get replaced as the run writes its outputs); nothing is deleted here
/// (`train` clears the old run's checkpoints with [`clear_previous_run`]).
pub fn prepare_run_dir(path: &Path, overwrite: bool) -> anyhow::Result<()> {
    check_run_dir(path, overwrite)?;
    fs::create_dir_all(path).with_context(|| format!("creating run directory {}", path.display()))
}

/// The checks of [`prepare_run_dir`] without creating anything: a command makes them before its
/// set-up, so that a failed set-up leaves no directory behind.
pub fn check_run_dir(path: &Path, overwrite: bool) -> anyhow::Result<()> {
    if path.exists() {
        if !path.is_dir() {
            bail!(
                "run directory {} exists and is not a directory; choose another location with --out",
                path.display()
            );
        }
        let non_empty = fs::read_dir(path)
            .with_context(|| format!("reading {}", path.display()))?
            .next()
            .is_some();
        if non_empty && !overwrite {
            bail!(
                "run directory {} already exists and is not empty; \
                 choose another location with --out <DIR> or pass --overwrite to reuse it",
                path.display()
            );
        }
    }
    Ok(())
}

/// The saved `config.json` of the run in `dir`, for `--resume dir` of `deepzero {command}`: a
/// missing directory or file is an error that says what `dir` should be.
pub fn read_saved_config(dir: &Path, command: &str) -> anyhow::Result<String> {
    let path = dir.join("config.json");
    if !dir.is_dir() {
        bail!(
            "--resume {}: no such run directory; give the --out directory of an earlier \
             `deepzero {command}` run",
            dir.display()
        );
    }
    fs::read_to_string(&path).map_err(|e| {
        anyhow::anyhow!(
            "--resume {}: not a `deepzero {command}` run directory ({} cannot be read: {e}); give \
             the --out directory of an earlier run",
            dir.display(),
            path.display()
        )
    })
}

/// A single output file (`prune --out`, `certify export --out`): an existing one is replaced only
/// with `--overwrite`, and a directory never. Checked before any work starts.
pub fn check_output_file(path: &Path, overwrite: bool) -> anyhow::Result<()> {
    if path.is_dir() {
        bail!("--out {} is a directory; give a file name", path.display());
    }
    if path.exists() && !overwrite {
        bail!(
            "--out {} exists; pass --overwrite to replace it, or choose another file",
            path.display()
        );
    }
    Ok(())
}

/// Remove what an earlier run left in `dir` (its checkpoints and `files`), for `--overwrite`:
/// a resume must never continue the old run under the new configuration.
pub fn clear_previous_run(dir: &Path, files: &[&str]) -> anyhow::Result<()> {
    deepzero_core::checkpoint::remove(dir)?;
    for name in files {
        let p = dir.join(name);
        if p.is_file() {
            fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
        }
    }
    Ok(())
}

/// Default run directory: `runs/<command>-<YYYYmmdd-HHMMSS>` (UTC, now).
pub fn default_run_dir(command: &str) -> PathBuf {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    PathBuf::from("runs").join(format!("{command}-{}", utc_stamp(secs)))
}

/// `YYYYmmdd-HHMMSS` in UTC for `secs` seconds after the Unix epoch.
fn utc_stamp(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}{m:02}{d:02}-{:02}{:02}{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Proleptic Gregorian (year, month, day) for a count of days since
/// 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
    let mp = (5 * doy + 2) / 153; // [0, 11], March-based
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn demo_series() -> Vec<Series> {
        let train = (0..=50)
            .map(|i| {
                let x = i as f64;
                (x, 2.0 * (-x / 12.0).exp() + 0.05 + 0.02 * (x * 0.9).sin())
            })
            .collect();
        let mut val: Vec<(f64, f64)> = (0..=10)
            .map(|i| {
                let x = 5.0 * i as f64;
                (x, 2.2 * (-x / 14.0).exp() + 0.09)
            })
            .collect();
        val.push((55.0, f64::NAN)); // skipped
        vec![
            Series {
                label: "train loss".into(),
                points: train,
            },
            Series {
                label: "validation loss".into(),
                points: val,
            },
        ]
    }

    #[test]
    fn report_line_chart_writes_png_and_svg() {
        let dir = tempfile::tempdir().unwrap();
        let series = demo_series();
        let chart = LineChart {
            title: "Training loss (demo)",
            x_label: "epoch",
            y_label: "loss",
            series: &series,
            y_range: None,
            log_y: false,
        };
        write_line_chart(dir.path(), "loss", &chart).unwrap();
        let png = fs::read(dir.path().join("loss.png")).unwrap();
        assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"));
        // IHDR width/height.
        assert_eq!(&png[16..24], &[0, 0, 4, 0, 0, 0, 2, 128]);
        let svg = fs::read_to_string(dir.path().join("loss.svg")).unwrap();
        assert!(svg.contains("<svg"));
        assert!(svg.contains("Training loss (demo)"));
        assert!(svg.contains("validation loss"));
        assert!(svg.contains("epoch"));
        // Only the two outputs remain (no temp files).
        let mut names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["loss.png", "loss.svg"]);

        // Rewriting over existing files works.
        write_line_chart(dir.path(), "loss", &chart).unwrap();

        // Keep a copy for visual inspection.
        let out = std::env::temp_dir().join("deepzero-report-demo");
        write_line_chart(&out, "loss", &chart).unwrap();
        let log_chart = LineChart {
            title: "Training loss, log scale (demo)",
            log_y: true,
            ..chart
        };
        write_line_chart(&out, "loss_log", &log_chart).unwrap();
        let acc = [Series {
            label: "test accuracy".into(),
            points: (1..=40)
                .map(|i| {
                    (
                        i as f64 * 250.0,
                        0.9812 + 0.0034 * (1.0 - (-i as f64 / 8.0).exp()),
                    )
                })
                .collect(),
        }];
        let acc_chart = LineChart {
            title: "Accuracy (narrow range)",
            x_label: "step",
            y_label: "accuracy",
            series: &acc,
            y_range: None,
            log_y: false,
        };
        write_line_chart(&out, "accuracy", &acc_chart).unwrap();
    }

    #[test]
    fn report_line_chart_degenerate_inputs() {
        let dir = tempfile::tempdir().unwrap();
        let flat = [Series {
            label: "flat".into(),
            points: vec![(0.0, 3.0), (1.0, 3.0), (2.0, f64::INFINITY)],
        }];
        let single = [Series {
            label: "one".into(),
            points: vec![(5.0, 0.0)],
        }];
        let empty = [Series {
            label: "".into(),
            points: vec![(f64::NAN, 1.0)],
        }];
        for (stem, series, log_y, y_range) in [
            ("flat", &flat[..], false, None),
            ("flat_log", &flat[..], true, None),
            ("single", &single[..], false, None),
            ("single_log", &single[..], true, None),
            ("empty", &empty[..], false, None),
            ("none", &[][..], true, None),
            ("fixed", &flat[..], false, Some((0.0, 10.0))),
            ("fixed_log", &flat[..], true, Some((1e-3, 10.0))),
            ("clipped", &flat[..], false, Some((0.0, 1.0))),
            ("clipped_log", &flat[..], true, Some((10.0, 100.0))),
        ] {
            let chart = LineChart {
                title: stem,
                x_label: "x",
                y_label: "y",
                series,
                y_range,
                log_y,
            };
            write_line_chart(dir.path(), stem, &chart).unwrap();
            assert!(dir.path().join(format!("{stem}.png")).is_file());
            assert!(dir.path().join(format!("{stem}.svg")).is_file());
        }
        let bad = LineChart {
            title: "bad",
            x_label: "x",
            y_label: "y",
            series: &flat,
            y_range: Some((0.0, 1.0)),
            log_y: true,
        };
        assert!(write_line_chart(dir.path(), "bad", &bad).is_err());
    }

    #[test]
    fn report_write_atomic_and_json() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.txt");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert!(!dir.path().join("a.txt.tmp").exists());

        let j = dir.path().join("summary.json");
        write_json_atomic(&j, &serde_json::json!({"a": 1, "b": [1.5, 2.0]})).unwrap();
        let text = fs::read_to_string(&j).unwrap();
        assert!(text.ends_with("}\n"));
        assert!(
            text.contains('\n') && text.lines().count() > 2,
            "pretty JSON"
        );
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["a"], 1);

        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 2);
    }

    #[test]
    fn report_prepare_run_dir() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("runs").join("r1");
        prepare_run_dir(&run, false).unwrap();
        assert!(run.is_dir());
        // Existing but empty: fine.
        prepare_run_dir(&run, false).unwrap();
        fs::write(run.join("x"), "1").unwrap();
        let err = prepare_run_dir(&run, false).unwrap_err().to_string();
        assert!(err.contains(&run.display().to_string()), "{err}");
        assert!(
            err.contains("--out") && err.contains("--overwrite"),
            "{err}"
        );
        prepare_run_dir(&run, true).unwrap();
        assert!(run.join("x").exists());
        // A file in the way is an error even with overwrite.
        let file = dir.path().join("file");
        fs::write(&file, "1").unwrap();
        assert!(prepare_run_dir(&file, true).is_err());
    }

    #[test]
    fn report_default_run_dir_and_civil_dates() {
        for (secs, want) in [
            (0, "19700101-000000"),
            (951_782_400, "20000229-000000"),
            (1_795_305_600, "20261122-000000"),
            (1_709_251_199, "20240229-235959"),
            (1_234_567_890, "20090213-233130"),
            (4_102_444_800, "21000101-000000"),
        ] {
            assert_eq!(utc_stamp(secs), want, "secs = {secs}");
        }
        let p = default_run_dir("train");
        let comps: Vec<_> = p.components().collect();
        assert_eq!(comps.len(), 2);
        assert_eq!(comps[0].as_os_str(), "runs");
        let name = comps[1].as_os_str().to_str().unwrap();
        let stamp = name.strip_prefix("train-").unwrap();
        let b = stamp.as_bytes();
        assert_eq!(b.len(), 15);
        assert_eq!(b[8], b'-');
        assert!(b
            .iter()
            .enumerate()
            .all(|(i, c)| i == 8 || c.is_ascii_digit()));
        assert!(stamp[..4].parse::<u32>().unwrap() >= 2024);
    }

    #[test]
    fn report_log_axis_contains_a_power_of_ten() {
        for (lo, hi) in [
            (1.5, 6.0),
            (0.1, 1.0),
            (0.065, 2.3),
            (2e-5, 9e-5),
            (3.0, 3.5),
        ] {
            let r = log_axis(lo, hi);
            assert!(r.start <= lo && r.end == hi, "{lo}..{hi} -> {r:?}");
            let k = (r.start.log10()).ceil();
            assert!(10f64.powf(k) <= r.end, "{lo}..{hi} -> {r:?}");
        }
        // Ranges already containing a power of ten are kept (up to the nudge).
        let r = log_axis(0.065, 2.3);
        assert!((r.start / 0.065 - 1.0).abs() < 1e-8);
    }

    #[test]
    fn report_tick_labels() {
        assert_eq!(fmt_log_tick(0.0), "0");
        assert_eq!(fmt_log_tick(0.5), "0.5");
        assert_eq!(fmt_log_tick(10.0), "10");
        assert_eq!(fmt_log_tick(1e-4), "1e-4");
        assert_eq!(fmt_log_tick(2e-5), "2e-5");
        assert_eq!(fmt_log_tick(3e6), "3e6");
        let lin = |r: Range<f64>, v: f64| {
            let (d, s) = linear_tick_digits(&r);
            fmt_num(v, d, s)
        };
        assert_eq!(lin(0.0..2.3, 1.5), "1.5");
        assert_eq!(lin(0.0..2.3, 2.0), "2");
        assert_eq!(lin(0.0..50.0, 25.0), "25");
        assert_eq!(lin(0.0012..0.0015, 0.00125), "0.00125");
        assert_eq!(lin(0.0..1e6, 2.5e5), "2.5e5");
        assert_eq!(lin(-1.0..1.0, -0.25), "-0.25");
        assert_eq!(lin(1e-5..3e-5, 1.5e-5), "1.5e-5");
        // Labels of neighbouring ticks stay distinct on a narrow range.
        assert_ne!(lin(0.0012..0.0015, 0.00125), lin(0.0012..0.0015, 0.0013));
    }
}

/// One square field for [`write_field_grid`]: `n × n` values, row-major (row 0 at the top).
#[derive(Debug, Clone, PartialEq)]
pub struct Field {
    pub n: usize,
    pub values: Vec<f64>,
}

/// Diverging blue–white–red colour of `t` in `[-1, 1]`.
fn diverging(t: f64) -> RGBColor {
    let t = t.clamp(-1.0, 1.0);
    let mix = |a: f64, b: f64, s: f64| (a + (b - a) * s).round() as u8;
    if t < 0.0 {
        let s = -t;
        RGBColor(
            mix(255.0, 33.0, s),
            mix(255.0, 102.0, s),
            mix(255.0, 172.0, s),
        )
    } else {
        RGBColor(
            mix(255.0, 178.0, t),
            mix(255.0, 24.0, t),
            mix(255.0, 43.0, t),
        )
    }
}

/// Heat maps of fields in a grid (`rows[r].1[c]`, row labels `rows[r].0`, column labels
/// `columns`), one symmetric colour scale for all with a colour bar, written to `<stem>.png`
/// in `dir` through a temporary file and a rename.
pub fn write_field_grid(
    dir: &Path,
    stem: &str,
    title: &str,
    columns: &[String],
    rows: &[(String, Vec<Field>)],
) -> anyhow::Result<()> {
    ensure_font()?;
    let cell = 160u32;
    let (left, top, bar) = (110u32, 60u32, 90u32);
    let width = left + cell * columns.len() as u32 + bar;
    let height = top + cell * rows.len() as u32 + 20;
    let scale = rows
        .iter()
        .flat_map(|(_, fields)| fields.iter().flat_map(|f| f.values.iter()))
        .filter(|v| v.is_finite())
        .fold(0.0f64, |m, v| m.max(v.abs()))
        .max(1e-12);
    let tmp = dir.join(format!(".{stem}.tmp.png"));
    let dest = dir.join(format!("{stem}.png"));
    let result = (|| -> anyhow::Result<()> {
        {
            let root = BitMapBackend::new(&tmp, (width, height)).into_drawing_area();
            root.fill(&WHITE).map_err(draw_err)?;
            let font = (FONT_FAMILY, 18).into_font();
            root.draw(&Text::new(title.to_string(), (10, 10), font.clone()))
                .map_err(draw_err)?;
            for (c, label) in columns.iter().enumerate() {
                let x = (left + cell * c as u32 + 10) as i32;
                root.draw(&Text::new(
                    label.clone(),
                    (x, (top - 24) as i32),
                    font.clone(),
                ))
                .map_err(draw_err)?;
            }
            for (r, (label, fields)) in rows.iter().enumerate() {
                let y0 = top + cell * r as u32;
                root.draw(&Text::new(
                    label.clone(),
                    (8, (y0 + cell / 2) as i32),
                    font.clone(),
                ))
                .map_err(draw_err)?;
                for (c, field) in fields.iter().enumerate() {
                    let x0 = left + cell * c as u32;
                    let n = field.n.max(1);
                    let px = (cell - 6) as f64 / n as f64;
                    for i in 0..n {
                        for j in 0..n {
                            let v = field.values.get(i * n + j).copied().unwrap_or(f64::NAN);
                            let color = if v.is_finite() {
                                diverging(v / scale)
                            } else {
                                BLACK
                            };
                            let xa = x0 as f64 + j as f64 * px;
                            let ya = y0 as f64 + i as f64 * px;
                            root.draw(&Rectangle::new(
                                [
                                    (xa as i32, ya as i32),
                                    ((xa + px).ceil() as i32, (ya + px).ceil() as i32),
                                ],
                                color.filled(),
                            ))
                            .map_err(draw_err)?;
                        }
                    }
                }
            }
            // Colour bar: +scale at the top, −scale at the bottom.
            let bx = (left + cell * columns.len() as u32 + 15) as i32;
            let (by0, by1) = (top as i32, (top + cell * rows.len() as u32) as i32 - 6);
            for y in by0..by1 {
                let t = 1.0 - 2.0 * (y - by0) as f64 / (by1 - by0).max(1) as f64;
                root.draw(&Rectangle::new(
                    [(bx, y), (bx + 18, y + 1)],
                    diverging(t).filled(),
                ))
                .map_err(draw_err)?;
            }
            let small = (FONT_FAMILY, 14).into_font();
            for (text, y) in [
                (format!("{scale:+.2}"), by0),
                ("0".to_string(), (by0 + by1) / 2),
                (format!("{:+.2}", -scale), by1 - 14),
            ] {
                root.draw(&Text::new(text, (bx + 22, y), small.clone()))
                    .map_err(draw_err)?;
            }
            root.present().map_err(draw_err)?;
        }
        File::open(&tmp)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("syncing {}", tmp.display()))?;
        fs::rename(&tmp, &dest)
            .with_context(|| format!("renaming {} to {}", tmp.display(), dest.display()))?;
        sync_parent(&dest);
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.with_context(|| format!("writing {}", dest.display()))
}
