//! The scikit-learn copy of the UCI handwritten digits (`digits.csv.gz`).
//!
//! One sample per line: 64 integers 0..=16 (an 8×8 image, row-major), then the label 0..=9,
//! comma-separated, no header.

use std::path::Path;

use super::io::{maybe_gunzip, read_maybe_gzip};
use super::Dataset;
use crate::error::{Error, Result};

const SIDE: usize = 8;
const PIXELS: usize = SIDE * SIDE;
const MAX_VALUE: u32 = 16;
const CLASSES: usize = 10;

/// Load `digits.csv.gz` (gzip or plain text) from disk. Pixels are divided by 16; the
/// result is 1×8×8 with 10 classes.
pub fn load_digits_csv(path: &Path) -> Result<Dataset> {
    let bytes = read_maybe_gzip(path)?;
    parse_csv_text(&bytes, path)
}

/// [`load_digits_csv`] from bytes in memory (gzip or plain), e.g. a file embedded with
/// `include_bytes!`. `origin` names the source in error messages.
pub fn parse_digits_csv(bytes: &[u8], origin: &Path) -> Result<Dataset> {
    parse_csv_text(&maybe_gunzip(bytes, origin)?, origin)
}

/// Parse one integer field; also accepts integral decimals such as `5.0`.
fn parse_int(field: &str) -> Option<u32> {
    let f = field.trim();
    if let Ok(v) = f.parse::<u32>() {
        return Some(v);
    }
    let v = f.parse::<f64>().ok()?;
    (v.fract() == 0.0 && (0.0..=u32::MAX as f64).contains(&v)).then_some(v as u32)
}

fn parse_csv_text(text: &[u8], origin: &Path) -> Result<Dataset> {
    let text = std::str::from_utf8(text).map_err(|e| {
        Error::data(
            origin,
            format!("not a text CSV file ({e}); expected digits.csv or digits.csv.gz"),
        )
    })?;
    let mut images = Vec::with_capacity(1800 * PIXELS);
    let mut labels = Vec::with_capacity(1800);
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let bad = |msg: String| Error::data(origin, format!("line {line_no}: {msg}"));
        let mut n_fields = 0usize;
        for (j, field) in line.split(',').enumerate() {
            n_fields += 1;
            if j > PIXELS {
                continue; // counted and reported below
            }
            let Some(v) = parse_int(field) else {
                return Err(bad(format!(
                    "field {} is {:?}, not an integer; each row must be 64 pixel values 0..=16 \
                     and then the label 0..=9",
                    j + 1,
                    field.trim()
                )));
            };
            if j < PIXELS {
                if v > MAX_VALUE {
                    return Err(bad(format!(
                        "pixel {} is {v}, outside 0..={MAX_VALUE}",
                        j + 1
                    )));
                }
                images.push(v as f32 / MAX_VALUE as f32);
            } else {
                if v as usize >= CLASSES {
                    return Err(bad(format!("label {v} is outside 0..=9")));
                }
                labels.push(v as u8);
            }
        }
        if n_fields != PIXELS + 1 {
            return Err(bad(format!(
                "{n_fields} comma-separated values, expected {} (64 pixel values then the label)",
                PIXELS + 1
            )));
        }
    }
    if labels.is_empty() {
        return Err(Error::data(
            origin,
            "no data rows; expected lines of 64 pixel values and a label",
        ));
    }
    Ok(Dataset {
        images,
        labels,
        channels: 1,
        height: SIDE,
        width: SIDE,
        num_classes: CLASSES,
    })
}
