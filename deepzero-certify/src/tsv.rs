//! Cohen et al.'s certification output: a TSV file with the header
//! `idx\tlabel\tpredict\tradius\tcorrect\ttime`, one row per certified image.
//!
//! The format is written exactly as Cohen's `certify.py` writes it, because analysis tools
//! read it: `predict` is −1 when abstaining (radius 0), `radius` has three significant digits
//! as Python's `"{:.3}".format` writes them (`0.512`, `6e-05`: a small radius keeps its
//! value, where three decimals would read `0.000`; [`format_radius`]), `correct`
//! is 1 or 0, and `time` is Python's `str(datetime.timedelta)`, e.g. `0:00:01.234567`.
//! [`parse_tsv`] / [`read_tsv`] read such a file back (to resume an interrupted run) and check
//! every row, naming the line of the first bad one.

use std::fmt;
use std::path::Path;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::smoothing::Certificate;

/// The header line (without its newline).
pub const TSV_HEADER: &str = "idx\tlabel\tpredict\tradius\tcorrect\ttime";

/// One row of a certification file.
#[derive(Clone, Debug, PartialEq)]
pub struct CertifyRow {
    /// Index of the image in the data set.
    pub idx: usize,
    /// True label.
    pub label: usize,
    /// Certified class, `None` when abstaining (written as −1).
    pub predict: Option<usize>,
    /// Certified ℓ2 radius (0 when abstaining).
    pub radius: f64,
    /// Whether `predict == Some(label)`.
    pub correct: bool,
    /// Time spent certifying this image.
    pub time: Duration,
}

impl CertifyRow {
    /// The row for `certificate` of image `idx` with true class `label`.
    pub fn new(idx: usize, label: usize, certificate: &Certificate, time: Duration) -> Self {
        CertifyRow {
            idx,
            label,
            predict: certificate.class,
            radius: if certificate.class.is_some() {
                certificate.radius
            } else {
                0.0
            },
            correct: certificate.class == Some(label),
            time,
        }
    }
}

impl fmt::Display for CertifyRow {
    /// The row as Cohen's `certify.py` prints it (no newline).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let predict = self.predict.map_or(-1, |c| c as i64);
        write!(
            f,
            "{}\t{}\t{}\t{}\t{}\t{}",
            self.idx,
            self.label,
            predict,
            format_radius(self.radius),
            u8::from(self.correct),
            format_timedelta(self.time)
        )
    }
}

/// A float as Python's `"{:.3}".format(v)` writes it, which is how Cohen's `certify.py` writes
/// the radius: three significant digits; fixed-point with at least one decimal while the
/// exponent is in `[−4, 2)` (`0.0`, `0.5`, `0.000123`, `12.3`), scientific otherwise with
/// trailing zeros dropped and a two-digit exponent (`6e-05`, `1.23e+02`).
pub fn format_radius(v: f64) -> String {
    if v == 0.0 || !v.is_finite() {
        return match v {
            v if v.is_nan() => "nan".to_string(),
            v if v == f64::INFINITY => "inf".to_string(),
            v if v == f64::NEG_INFINITY => "-inf".to_string(),
            v if v.is_sign_negative() => "-0.0".to_string(),
            _ => "0.0".to_string(),
        };
    }
    // Rounded to three significant digits first, so that 9.996 counts as 10.0 (exponent 1).
    let scientific = format!("{v:.2e}");
    let (mantissa, exponent) = scientific
        .split_once('e')
        .expect("Rust's `e` format has an exponent");
    let exponent: i32 = exponent.parse().expect("an integer exponent");
    let strip = |digits: &str| -> String {
        if digits.contains('.') {
            digits
                .trim_end_matches('0')
                .trim_end_matches('.')
                .to_string()
        } else {
            digits.to_string()
        }
    };
    if (-4..2).contains(&exponent) {
        let decimals = (2 - exponent) as usize;
        let fixed = strip(&format!("{v:.decimals$}"));
        if fixed.contains('.') {
            fixed
        } else {
            format!("{fixed}.0")
        }
    } else {
        let sign = if exponent < 0 { '-' } else { '+' };
        format!("{}e{sign}{:02}", strip(mantissa), exponent.abs())
    }
}

/// Python's `str(datetime.timedelta(seconds=t))`: `H:MM:SS` or `H:MM:SS.ffffff`, with a
/// `D day(s), ` prefix from one day on.
pub fn format_timedelta(t: Duration) -> String {
    let micros = t.as_micros();
    let (secs, frac) = (micros / 1_000_000, micros % 1_000_000);
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let (h, m, s) = (rest / 3600, rest % 3600 / 60, rest % 60);
    let mut out = String::new();
    if days > 0 {
        out.push_str(&format!("{days} day{}, ", if days == 1 { "" } else { "s" }));
    }
    out.push_str(&format!("{h}:{m:02}:{s:02}"));
    if frac > 0 {
        out.push_str(&format!(".{frac:06}"));
    }
    out
}

/// Parse a [`format_timedelta`] string (also plain seconds, e.g. `1.5`).
pub fn parse_timedelta(s: &str) -> Option<Duration> {
    let s = s.trim();
    let (days, clock) = match s.split_once(", ") {
        Some((d, rest)) => {
            let d = d.strip_suffix(" days").or_else(|| d.strip_suffix(" day"))?;
            (d.trim().parse::<u64>().ok()?, rest)
        }
        None => (0, s),
    };
    let seconds = match clock.split(':').collect::<Vec<_>>().as_slice() {
        [h, m, sec] => {
            let h: u64 = h.parse().ok()?;
            let m: u64 = m.parse().ok()?;
            let sec: f64 = sec.parse().ok()?;
            if m >= 60 || !(0.0..60.0).contains(&sec) {
                return None;
            }
            (h as f64 * 3600.0 + m as f64 * 60.0) + sec
        }
        [sec] => sec.parse::<f64>().ok()?,
        _ => return None,
    };
    // In f64 (no integer overflow); a duration beyond `Duration`'s range is not a time.
    Duration::try_from_secs_f64(days as f64 * 86_400.0 + seconds).ok()
}

/// Parse the text of a certification file; `source` names it in errors.
///
/// Checks the header, six fields per row, integer `idx`, `label`, `predict ≥ −1`, a finite
/// `radius ≥ 0` (0 when abstaining), `correct` ∈ {0, 1} and equal to `predict == label`, a
/// readable `time`, and strictly increasing `idx`. A blank last line is allowed.
pub fn parse_tsv(text: &str, source: &Path) -> Result<Vec<CertifyRow>> {
    let err = |line: usize, msg: String| Error::Tsv {
        path: source.to_path_buf(),
        line,
        msg,
    };
    let mut lines = text.lines().enumerate();
    match lines.next() {
        Some((_, h)) if h.trim_end() == TSV_HEADER => {}
        Some((_, h)) => {
            return Err(err(
                1,
                format!("the header is {h:?}, expected {TSV_HEADER:?} (Cohen et al.'s format)"),
            ))
        }
        None => return Err(err(1, "the file is empty; expected the header line".into())),
    }
    let mut rows: Vec<CertifyRow> = Vec::new();
    for (i, line) in lines {
        let number = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let row = parse_row(line).map_err(|msg| err(number, msg))?;
        if let Some(prev) = rows.last() {
            if row.idx <= prev.idx {
                return Err(err(
                    number,
                    format!(
                        "idx {} does not follow idx {} (rows must have increasing idx)",
                        row.idx, prev.idx
                    ),
                ));
            }
        }
        rows.push(row);
    }
    Ok(rows)
}

fn parse_row(line: &str) -> std::result::Result<CertifyRow, String> {
    let fields: Vec<&str> = line.trim_end_matches('\r').split('\t').collect();
    let [idx, label, predict, radius, correct, time] = fields.as_slice() else {
        return Err(format!(
            "expected 6 tab-separated fields ({TSV_HEADER:?}), got {} (a row cut short by an \
             interrupted run? delete it and resume)",
            fields.len()
        ));
    };
    let idx: usize = idx
        .parse()
        .map_err(|_| format!("idx {idx:?} is not a non-negative integer"))?;
    let label: usize = label
        .parse()
        .map_err(|_| format!("label {label:?} is not a non-negative integer"))?;
    let predict: i64 = predict
        .parse()
        .map_err(|_| format!("predict {predict:?} is not an integer"))?;
    let predict = match predict {
        -1 => None,
        p if p >= 0 => Some(p as usize),
        p => {
            return Err(format!(
                "predict is {p}; it must be a class or −1 (abstain)"
            ))
        }
    };
    let radius: f64 = radius
        .parse()
        .map_err(|_| format!("radius {radius:?} is not a number"))?;
    if !(radius.is_finite() && radius >= 0.0) {
        return Err(format!("radius is {radius}; it must be finite and ≥ 0"));
    }
    let correct = match *correct {
        "1" => true,
        "0" => false,
        c => return Err(format!("correct is {c:?}; it must be 1 or 0")),
    };
    if correct != (predict == Some(label)) {
        return Err(format!(
            "correct is {} but predict is {} and label is {label}",
            u8::from(correct),
            predict.map_or(-1, |p| p as i64)
        ));
    }
    if predict.is_none() && radius != 0.0 {
        return Err(format!(
            "an abstention (predict −1) must have radius 0, got {radius}"
        ));
    }
    let time = parse_timedelta(time)
        .ok_or_else(|| format!("time {time:?} is not a duration like 0:00:01.234567"))?;
    Ok(CertifyRow {
        idx,
        label,
        predict,
        radius,
        correct,
        time,
    })
}

/// Read and check a certification file (see [`parse_tsv`]).
pub fn read_tsv(path: impl AsRef<Path>) -> Result<Vec<CertifyRow>> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    parse_tsv(&text, path)
}

/// The text of a certification file: header and rows, each line ending in a newline.
pub fn to_tsv(rows: &[CertifyRow]) -> String {
    let mut out = format!("{TSV_HEADER}\n");
    for row in rows {
        out.push_str(&format!("{row}\n"));
    }
    out
}

/// Certified accuracy at each radius r: the fraction of rows with `correct` and
/// `radius ≥ r` (0 for no rows).
pub fn certified_accuracy(rows: &[CertifyRow], radii: &[f64]) -> Vec<f64> {
    radii
        .iter()
        .map(|&r| {
            if rows.is_empty() {
                return 0.0;
            }
            let hits = rows
                .iter()
                .filter(|row| row.correct && row.radius >= r)
                .count();
            hits as f64 / rows.len() as f64
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pairs printed by CPython 3.11's `"{:.3}".format(v)`.
    #[test]
    fn radius_is_written_as_python_writes_it() {
        for (v, python) in [
            (0.0, "0.0"),
            (6e-5, "6e-05"),
            (0.5, "0.5"),
            (0.512345, "0.512"),
            (1.234, "1.23"),
            (12.34, "12.3"),
            (123.4, "1.23e+02"),
            (9.996, "10.0"),
            (0.0009996, "0.001"),
            (1e-4, "0.0001"),
            (0.00012345, "0.000123"),
            (2.0, "2.0"),
            (0.99951, "1.0"),
        ] {
            assert_eq!(format_radius(v), python, "{v:e}");
            // And it reads back as the rounded value.
            let back: f64 = python.parse().expect("a number");
            assert!((back - v).abs() <= 5e-3 * v.abs(), "{v} → {python}");
        }
    }
}
