//! The binary version of CIFAR-10 (`cifar-10-binary.tar.gz`).
//!
//! Each file is a sequence of 3,073-byte records: one label byte (0..=9), then the 32×32 red
//! plane, the green plane and the blue plane (1,024 bytes each, row-major). That is already
//! the C×H×W layout of [`Dataset`].

use std::path::{Path, PathBuf};

use super::io::{maybe_gunzip, read_maybe_gzip};
use super::Dataset;
use crate::error::{Error, Result};

/// Side length of a CIFAR-10 image.
const SIDE: usize = 32;
/// Pixel bytes of one record (3 planes of 32×32).
const PIXELS: usize = 3 * SIDE * SIDE;
/// Bytes of one record: the label byte and the pixels.
pub const CIFAR10_RECORD_BYTES: usize = 1 + PIXELS;
/// Number of classes.
const CLASSES: usize = 10;

/// File names of the training batches.
pub const CIFAR10_TRAIN_FILES: [&str; 5] = [
    "data_batch_1.bin",
    "data_batch_2.bin",
    "data_batch_3.bin",
    "data_batch_4.bin",
    "data_batch_5.bin",
];
/// File name of the test batch.
pub const CIFAR10_TEST_FILE: &str = "test_batch.bin";

/// What the user must provide, for error messages.
pub(crate) const CIFAR10_EXPECTED: &str =
    "a CIFAR-10 directory must contain data_batch_1.bin … data_batch_5.bin and test_batch.bin \
     (the binary version, cifar-10-binary.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html)";

/// The directory that actually holds the batches: `dir`, or `dir/cifar-10-batches-bin` (the
/// folder the tarball unpacks to) when only that one has them.
fn batches_dir(dir: &Path) -> PathBuf {
    let nested = dir.join("cifar-10-batches-bin");
    if !dir.join(CIFAR10_TEST_FILE).exists() && nested.join(CIFAR10_TEST_FILE).exists() {
        nested
    } else {
        dir.to_path_buf()
    }
}

/// Parse one CIFAR-10 binary batch file held in memory (raw or gzip); `origin` names it in
/// error messages. The result is 3×32×32 with 10 classes.
pub fn parse_cifar10_batch(bytes: &[u8], origin: &Path) -> Result<Dataset> {
    let (mut images, mut labels) = (Vec::new(), Vec::new());
    append_batch(
        &maybe_gunzip(bytes, origin)?,
        origin,
        &mut images,
        &mut labels,
    )?;
    Ok(cifar10(images, labels))
}

fn cifar10(images: Vec<f32>, labels: Vec<u8>) -> Dataset {
    Dataset {
        images,
        labels,
        channels: 3,
        height: SIDE,
        width: SIDE,
        num_classes: CLASSES,
    }
}

/// Append the records of one (decompressed) batch file to `images` / `labels`.
fn append_batch(
    bytes: &[u8],
    path: &Path,
    images: &mut Vec<f32>,
    labels: &mut Vec<u8>,
) -> Result<()> {
    if bytes.is_empty() {
        return Err(Error::data(
            path,
            "file is empty; re-extract it from cifar-10-binary.tar.gz",
        ));
    }
    if !bytes.len().is_multiple_of(CIFAR10_RECORD_BYTES) {
        return Err(Error::data(
            path,
            format!(
                "size {} bytes is not a multiple of the {CIFAR10_RECORD_BYTES}-byte CIFAR-10 \
                 record (1 label byte + 3072 pixel bytes): the file is truncated or not from the \
                 binary version of CIFAR-10 (cifar-10-binary.tar.gz; the python and matlab \
                 versions are not supported)",
                bytes.len()
            ),
        ));
    }
    let n = bytes.len() / CIFAR10_RECORD_BYTES;
    images.reserve(n * PIXELS);
    labels.reserve(n);
    for (i, rec) in bytes.chunks_exact(CIFAR10_RECORD_BYTES).enumerate() {
        let label = rec[0];
        if label as usize >= CLASSES {
            return Err(Error::data(
                path,
                format!(
                    "record {i} has label {label}, expected 0..=9; this is not a CIFAR-10 \
                     binary file (CIFAR-100 uses 2 label bytes per record)"
                ),
            ));
        }
        labels.push(label);
        images.extend(rec[1..].iter().map(|&b| f32::from(b) / 255.0));
    }
    Ok(())
}

/// Load the binary version of CIFAR-10 from `dir`: the training set (`train = true`,
/// `data_batch_1.bin` … `data_batch_5.bin`, all five required) or the test set
/// (`test_batch.bin`). Pixels are scaled to [0, 1]; the result is 3×32×32 with 10 classes.
///
/// `dir` may also be the folder that contains `cifar-10-batches-bin/`.
pub fn load_cifar10(dir: &Path, train: bool) -> Result<Dataset> {
    if !dir.is_dir() {
        return Err(Error::NotFound(format!(
            "CIFAR-10 directory {} does not exist or is not a directory; {CIFAR10_EXPECTED}",
            dir.display()
        )));
    }
    let dir = batches_dir(dir);
    let names: &[&str] = if train {
        &CIFAR10_TRAIN_FILES
    } else {
        std::slice::from_ref(&CIFAR10_TEST_FILE)
    };
    let paths: Vec<PathBuf> = names.iter().map(|n| dir.join(n)).collect();
    if let Some(missing) = paths.iter().find(|p| !p.is_file()) {
        return Err(Error::NotFound(format!(
            "{} not found; {CIFAR10_EXPECTED}",
            missing.display()
        )));
    }
    let mut images = Vec::new();
    let mut labels = Vec::new();
    for p in &paths {
        append_batch(&read_maybe_gzip(p)?, p, &mut images, &mut labels)?;
    }
    Ok(cifar10(images, labels))
}
