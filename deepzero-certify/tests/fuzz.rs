//! Fuzz targets of certify's parsers: the certification TSV (read back by
//! `certify run --resume`), both sides of the `process:` protocol (the reply lines deepzero
//! reads, the request stream `certify serve` reads), and `onnx:` model files.
//! See `fuzz_harness` (in deepzero-core/tests) for the inputs, the property and the long mode
//! (`DEEPZERO_FUZZ_SECONDS=600 cargo test --release -p deepzero-certify --test fuzz`).
//! The named tests at the end are inputs that once broke a parser.

#[path = "../../deepzero-core/tests/fuzz_harness/mod.rs"]
mod fuzz_harness;

use std::path::Path;
use std::time::Duration;

use deepzero_certify::process::{parse_scores, serve};
use deepzero_certify::tsv::{parse_timedelta, parse_tsv, to_tsv, CertifyRow};
use deepzero_certify::{BlackBox, Error};
use fuzz_harness::{fuzz, Format, Parsed};

#[test]
fn fuzz_certify_tsv() {
    let row = |idx, label, predict: Option<usize>, radius, micros| CertifyRow {
        idx,
        label,
        predict,
        radius,
        correct: predict == Some(label),
        time: Duration::from_micros(micros),
    };
    let rows = [
        row(0, 3, Some(3), 0.412, 1_234_567),
        row(5, 1, None, 0.0, 90_061_000_001),
        row(17, 9, Some(2), 1.5, 3_000_000),
    ];
    let valid = [to_tsv(&rows).into_bytes()];
    fuzz("certify-tsv", Format::Text, &valid, |input| {
        // `read_tsv` reads the file as UTF-8 text (an I/O error otherwise), then parses it.
        let Ok(text) = std::str::from_utf8(input) else {
            return Ok(Parsed::Rejected);
        };
        Parsed::from(parse_tsv(text, Path::new("certify.tsv")), |rows| {
            for (i, r) in rows.iter().enumerate() {
                let ordered = i == 0 || rows[i - 1].idx < r.idx;
                let sound = r.radius.is_finite()
                    && r.radius >= 0.0
                    && r.correct == (r.predict == Some(r.label))
                    && (r.predict.is_some() || r.radius == 0.0);
                if !(ordered && sound) {
                    return Err(format!("row {i} accepted: {r:?}"));
                }
            }
            Ok(())
        })
    });
}

#[test]
fn fuzz_process_reply() {
    let valid = [b"0.25 -1.5 3e2\n".to_vec(), b"1 2 3\r\n".to_vec()];
    fuzz("process-reply", Format::Text, &valid, |input| {
        // As the first answer (any class count) and as a later one (3 classes known).
        let mut verdict = Parsed::Rejected;
        for known in [None, Some(3)] {
            let (mut k, mut scores) = (known, Vec::new());
            let parsed = parse_scores(input, &mut k, &mut scores);
            if parsed.is_ok() {
                if Some(scores.len()) != k || scores.iter().any(|v| !v.is_finite()) {
                    return Err(format!("accepted {scores:?} with class count {k:?}"));
                }
                verdict = Parsed::Accepted;
            }
        }
        Ok(verdict)
    });
}

/// A classifier of 1×2×2 images into 3 classes, for the server side of the protocol.
struct Tiny;

impl BlackBox for Tiny {
    fn input_shape(&self) -> [usize; 3] {
        [1, 2, 2]
    }
    fn num_classes(&self) -> deepzero_certify::Result<usize> {
        Ok(3)
    }
    fn logits(&self, images: &[f32], n: usize) -> deepzero_certify::Result<Vec<f32>> {
        if images.len() != n * 4 {
            return Err(Error::Shape(format!(
                "{} values for {n} images",
                images.len()
            )));
        }
        Ok(images
            .chunks(4)
            .flat_map(|x| [x[0], x[1] - x[2], x[3]])
            .collect())
    }
    fn queries(&self) -> u64 {
        0
    }
}

/// A request of `n` images of [`Tiny`]'s shape.
fn request(n: usize) -> Vec<u8> {
    let mut out = format!("{n} 1 2 2\n").into_bytes();
    for v in 0..n * 4 {
        out.extend_from_slice(&(v as f32 * 0.125).to_le_bytes());
    }
    out
}

#[test]
fn fuzz_process_serve() {
    let valid = [[request(2), request(1)].concat(), request(0)];
    fuzz("process-serve", Format::Binary, &valid, |input| {
        let mut answer = Vec::new();
        Parsed::from(serve(&Tiny, input, &mut answer), |_| {
            // Every answered image is one line of Tiny's 3 scores.
            let text = std::str::from_utf8(&answer).map_err(|e| e.to_string())?;
            match text.lines().find(|l| l.split(' ').count() != 3) {
                Some(line) => Err(format!("answered {line:?}")),
                None => Ok(()),
            }
        })
    });
}

#[cfg(feature = "onnx")]
#[test]
fn fuzz_onnx_model() {
    use deepzero_certify::OnnxClassifier;
    let fixture = |name: &str| {
        std::fs::read(format!(
            "{}/tests/fixtures/{name}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap()
    };
    let valid = [
        fixture("classifier_dyn.onnx"),
        fixture("classifier_b2.onnx"),
    ];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.onnx");
    fuzz("onnx-model", Format::Binary, &valid, |input| {
        std::fs::write(&path, input).unwrap();
        Parsed::from(OnnxClassifier::load(&path), |c| {
            let per: usize = c.input_shape().iter().product();
            let k = c.num_classes().map_err(|e| e.to_string())?;
            // A loaded model answers a query with K scores per image, or a clear error.
            match c.logits(&vec![0.25; per], 1) {
                Ok(scores) if scores.len() != k => {
                    Err(format!("{} scores for {k} classes", scores.len()))
                }
                _ => Ok(()),
            }
        })
    });
}

// Regression cases: inputs that broke a parser, found by the targets above.

/// `parse_timedelta` computed `Duration::from_secs_f64` of any finite number of seconds, which
/// panics beyond `Duration`'s range (about 5.8e11 years).
#[test]
fn tsv_time_beyond_duration_range_is_an_error() {
    assert_eq!(parse_timedelta("1e300"), None);
    assert_eq!(parse_timedelta("18446744073709551615:00:00"), None);
    let text = "idx\tlabel\tpredict\tradius\tcorrect\ttime\n0\t1\t1\t0.5\t1\t1e300\n";
    let err = parse_tsv(text, Path::new("certify.tsv")).unwrap_err();
    assert!(err.to_string().contains("line 2"), "{err}");
}

/// `certify serve` allocated the payload a header announced before reading it: a 20-byte
/// header could ask for petabytes.
#[test]
fn serve_header_announcing_a_huge_payload_is_an_error() {
    let mut answer = Vec::new();
    let err = serve(&Tiny, &b"1000000000000000 1 2 2\n\0\0\0\0"[..], &mut answer).unwrap_err();
    assert!(err.to_string().contains("incomplete"), "{err}");
    let err = serve(&Tiny, &b"18446744073709551615 1 2 2\n"[..], &mut answer).unwrap_err();
    assert!(err.to_string().contains("too many"), "{err}");
    assert!(answer.is_empty());
}

/// tract indexes its name table with each graph output and panics when no node computes it
/// (here the output `logits` renamed `xogits`); loading must be an error naming the file.
#[cfg(feature = "onnx")]
#[test]
fn onnx_output_computed_by_no_node_is_an_error() {
    let fixture = format!(
        "{}/tests/fixtures/classifier_dyn.onnx",
        env!("CARGO_MANIFEST_DIR")
    );
    let mut bytes = std::fs::read(fixture).unwrap();
    let at = bytes.windows(6).rposition(|w| w == b"logits").unwrap();
    bytes[at] = b'x';
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("renamed.onnx");
    std::fs::write(&path, bytes).unwrap();
    let err = deepzero_certify::OnnxClassifier::load(&path)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("renamed.onnx") && err.contains("could not load"),
        "{err}"
    );
}
