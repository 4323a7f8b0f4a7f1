//! Fuzz targets of core's file parsers: IDX images and labels, CIFAR-10 binary batches, the
//! digits CSV, both files of a checkpoint, and the layer-ratios JSON (checked against a model).
//! See `fuzz_harness` for the inputs, the property and the long mode
//! (`DEEPZERO_FUZZ_SECONDS=600 cargo test --release -p deepzero-core --test fuzz`).
//! The named tests at the end are inputs that once broke a parser.

mod fuzz_harness;

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use candle_core::{Device, Tensor};
use deepzero_core::checkpoint::{self, STATE_FILE, TENSORS_FILE};
use deepzero_core::data::{parse_cifar10_batch, parse_digits_csv, parse_idx, Dataset};
use deepzero_core::model::{Model, ModelSpec};
use deepzero_core::sparsity::LayerRatios;
use deepzero_core::trainer::{EpochMetrics, TrainState};
use fuzz_harness::{fuzz, Format, Parsed, Verdict};

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

/// Every loader's promise: one label per image, labels below the class count, pixels in [0, 1].
fn consistent(ds: &Dataset) -> Result<(), String> {
    let per = ds.channels * ds.height * ds.width;
    if per == 0 || ds.images.len() != ds.len() * per {
        return Err(format!(
            "{} pixel values for {} images of {}×{}×{}",
            ds.images.len(),
            ds.len(),
            ds.channels,
            ds.height,
            ds.width
        ));
    }
    if let Some(l) = ds.labels.iter().find(|&&l| l as usize >= ds.num_classes) {
        return Err(format!("label {l} of {} classes", ds.num_classes));
    }
    match ds.images.iter().find(|v| !(0.0..=1.0).contains(*v)) {
        Some(v) => Err(format!("pixel value {v} outside [0, 1]")),
        None => Ok(()),
    }
}

/// An IDX file: magic, the sizes, the data.
fn idx_file(magic: u32, dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut out = magic.to_be_bytes().to_vec();
    for d in dims {
        out.extend_from_slice(&d.to_be_bytes());
    }
    out.extend_from_slice(data);
    out
}

const IDX_N: u32 = 3;

fn idx_images() -> Vec<u8> {
    let pixels: Vec<u8> = (0..IDX_N * 4 * 5).map(|i| (i * 37 % 256) as u8).collect();
    idx_file(0x0803, &[IDX_N, 4, 5], &pixels)
}

fn idx_labels() -> Vec<u8> {
    idx_file(0x0801, &[IDX_N], &[7, 0, 9])
}

fn check_idx(images: &[u8], labels: &[u8]) -> Verdict {
    Parsed::from(
        parse_idx(images, Path::new("images"), labels, Path::new("labels")),
        consistent,
    )
}

#[test]
fn fuzz_idx_images() {
    let valid = [idx_images(), gzip(&idx_images())];
    let labels = idx_labels();
    fuzz("idx-images", Format::Binary, &valid, |input| {
        check_idx(input, &labels)
    });
}

#[test]
fn fuzz_idx_labels() {
    let valid = [idx_labels(), gzip(&idx_labels())];
    let images = idx_images();
    fuzz("idx-labels", Format::Binary, &valid, |input| {
        check_idx(&images, input)
    });
}

#[test]
fn fuzz_cifar10_batch() {
    let record = |label: u8| {
        let mut r = vec![label];
        r.extend((0..3072u32).map(|i| (i * 7 % 256) as u8));
        r
    };
    let batch = [record(3), record(9)].concat();
    let valid = [batch.clone(), gzip(&batch)];
    fuzz("cifar10", Format::Binary, &valid, |input| {
        Parsed::from(parse_cifar10_batch(input, Path::new("batch")), consistent)
    });
}

#[test]
fn fuzz_digits_csv() {
    let row = |label: u32| {
        let pixels: Vec<String> = (0..64u32).map(|i| ((i + label) % 17).to_string()).collect();
        format!("{},{label}\n", pixels.join(","))
    };
    let csv = [row(0), row(5), row(9)].concat().into_bytes();
    let valid = [csv.clone(), gzip(&csv)];
    fuzz("digits-csv", Format::Text, &valid, |input| {
        Parsed::from(parse_digits_csv(input, Path::new("digits.csv")), consistent)
    });
}

/// The two files of a real checkpoint at epoch 2 with Adam state.
fn checkpoint_files() -> (Vec<u8>, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let params = Tensor::new(&[0.5f32, -1.25, 3.0, 0.0], &Device::Cpu).unwrap();
    let history = (1..=2)
        .map(|epoch| EpochMetrics {
            epoch,
            train_loss: 2.0 / epoch as f64,
            metrics: vec![("test_accuracy".into(), 0.25 * epoch as f64)],
            queries: 100 * epoch as u64,
            seconds: 1.5 * epoch as f64,
            lr: 0.01,
        })
        .collect();
    let optimizer = HashMap::from([
        ("adam.m".to_string(), (&params * 0.1).unwrap()),
        ("adam.v".to_string(), (&params * 0.01).unwrap()),
        (
            "adam.t".to_string(),
            Tensor::new(&[8.0f64], &Device::Cpu).unwrap(),
        ),
    ]);
    let state = TrainState {
        epoch: 2,
        steps: 20,
        fingerprint: None,
        params,
        task: serde_json::json!({ "bn": null }),
        optimizer,
        queries: 200,
        seconds: 3.0,
        history,
    };
    checkpoint::save(dir.path(), &state).unwrap();
    let at = dir.path().join(checkpoint::DIR).join("epoch-000002");
    (
        std::fs::read(at.join(TENSORS_FILE)).unwrap(),
        std::fs::read(at.join(STATE_FILE)).unwrap(),
    )
}

fn check_checkpoint(tensors: &[u8], state: &[u8]) -> Verdict {
    let parsed = checkpoint::parse(
        tensors,
        Path::new(TENSORS_FILE),
        state,
        Path::new(STATE_FILE),
        &Device::Cpu,
    );
    Parsed::from(parsed, |s| {
        if s.history.len() != s.epoch {
            return Err(format!(
                "epoch {} with {} metrics",
                s.epoch,
                s.history.len()
            ));
        }
        let values = s
            .params
            .to_dtype(candle_core::DType::F64)
            .and_then(|t| t.to_vec1::<f64>())
            .map_err(|e| format!("params unreadable after an Ok load: {e}"))?;
        match values.iter().all(|v| v.is_finite()) {
            true => Ok(()),
            false => Err("non-finite params accepted".into()),
        }
    })
}

#[test]
fn fuzz_checkpoint_tensors() {
    let (tensors, state) = checkpoint_files();
    fuzz("checkpoint-tensors", Format::Binary, &[tensors], |input| {
        check_checkpoint(input, &state)
    });
}

#[test]
fn fuzz_checkpoint_state() {
    let (tensors, state) = checkpoint_files();
    fuzz("checkpoint-state", Format::Text, &[state], |input| {
        check_checkpoint(&tensors, input)
    });
}

#[test]
fn fuzz_layer_ratios() {
    let model = Model::build(&ModelSpec::SimpleCnn { depth: 2, width: 4 }, [1, 8, 8], 10).unwrap();
    let ratios = LayerRatios::uniform(&model, 0.75).unwrap();
    let valid = [serde_json::to_vec_pretty(&ratios).unwrap()];
    fuzz("layer-ratios", Format::Text, &valid, |input| {
        let parsed = LayerRatios::parse(input, Path::new("ratios.json"));
        Parsed::from(parsed, |r| {
            // A file that parses may still be for another model; resolving must not panic.
            if let Ok(keep) = r.resolve(&model.layout) {
                let entries = model.layout.entries.len();
                if let Some(bad) = keep
                    .iter()
                    .find(|(i, k)| *i >= entries || !(0.0..=1.0).contains(k))
                {
                    return Err(format!("resolved to {bad:?}"));
                }
            }
            Ok(())
        })
    });
}

// Regression cases: inputs that broke a parser or the code that reads its result.

/// An IDX header announcing images of 0×0 pixels was accepted: a data set of empty images.
#[test]
fn idx_images_of_zero_pixels_are_an_error() {
    let images = idx_file(0x0803, &[IDX_N, 0, 0], &[]);
    let err = parse_idx(
        &images,
        Path::new("images"),
        &idx_labels(),
        Path::new("labels"),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("0×0 pixels"), "{err}");
}

/// Adam read its step count as `adam.t[0]` and panicked on an empty tensor from a damaged
/// checkpoint.
#[test]
fn adam_state_without_a_step_count_is_an_error() {
    use deepzero_core::optim::{OptimizerConfig, OptimizerKind};
    let mut adam = OptimizerConfig {
        kind: OptimizerKind::Adam,
        ..OptimizerConfig::default()
    }
    .build()
    .unwrap();
    let zeros = Tensor::zeros(4, candle_core::DType::F32, &Device::Cpu).unwrap();
    for t in [vec![], vec![1.0, 2.0], vec![f64::NAN]] {
        let state = HashMap::from([
            ("adam.m".to_string(), zeros.clone()),
            ("adam.v".to_string(), zeros.clone()),
            (
                "adam.t".to_string(),
                Tensor::new(t.as_slice(), &Device::Cpu).unwrap(),
            ),
        ]);
        let err = adam.load_state(&state).unwrap_err().to_string();
        assert!(err.contains("adam.t"), "{err}");
    }
}

/// The harness itself: a parser that panics on some inputs is caught, and the input shrunk.
#[test]
#[should_panic(expected = "shrunk input (1 bytes)")]
fn harness_catches_a_panicking_parser() {
    fuzz(
        "panics-on-0xff",
        Format::Binary,
        &[vec![1, 2, 3]],
        |input| {
            assert!(!input.contains(&0xff), "0xff");
            Ok(match input {
                [1, 2, 3] => Parsed::Accepted,
                _ => Parsed::Rejected,
            })
        },
    );
}
