//! The IDX format of MNIST and Fashion-MNIST.
//!
//! An IDX file is a big-endian header — the magic number `0x0000 08 NN` (unsigned bytes,
//! `NN` dimensions) followed by `NN` 32-bit sizes — and then the data, row-major.

use std::path::{Path, PathBuf};

use super::io::{maybe_gunzip, read_maybe_gzip};
use super::Dataset;
use crate::error::{Error, Result};

/// Magic number of an IDX file of unsigned-byte images (3 dimensions: N, rows, columns).
pub const IDX_IMAGES_MAGIC: u32 = 0x0000_0803;
/// Magic number of an IDX file of unsigned-byte labels (1 dimension: N).
pub const IDX_LABELS_MAGIC: u32 = 0x0000_0801;

/// Number of classes of MNIST and Fashion-MNIST.
const IDX_CLASSES: usize = 10;

fn be_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

fn describe_magic(magic: u32) -> String {
    let (elem, ndims) = ((magic >> 8) & 0xff, magic & 0xff);
    match magic {
        IDX_IMAGES_MAGIC => "an IDX image file".into(),
        IDX_LABELS_MAGIC => "an IDX label file".into(),
        _ if magic >> 16 != 0 => "not an IDX file at all".into(),
        _ if elem == 0x08 => format!("an unsigned-byte IDX file with {ndims} dimensions"),
        _ => format!("an IDX file of element type {elem:#04x}, not unsigned bytes"),
    }
}

/// Check the header of an IDX file against `expected_magic` (whose low byte is the number of
/// dimensions) and the file length against the sizes; return the sizes and the data bytes.
fn parse_header<'a>(
    bytes: &'a [u8],
    path: &Path,
    expected_magic: u32,
    what: &str,
) -> Result<(Vec<usize>, &'a [u8])> {
    let ndims = (expected_magic & 0xff) as usize;
    let header_len = 4 + 4 * ndims;
    if bytes.len() < 4 {
        return Err(Error::data(
            path,
            format!(
                "file is only {} bytes long, too short for an IDX {what} file; re-download it",
                bytes.len()
            ),
        ));
    }
    let magic = be_u32(bytes, 0);
    if magic != expected_magic {
        let hint = match (expected_magic, magic) {
            (IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC) | (IDX_LABELS_MAGIC, IDX_IMAGES_MAGIC) => {
                format!(
                    "this is {}: are the images and labels files swapped?",
                    describe_magic(magic)
                )
            }
            _ => format!("the file is {}", describe_magic(magic)),
        };
        return Err(Error::data(
            path,
            format!(
                "wrong magic number {magic:#010x}, expected {expected_magic:#010x} for IDX \
                 {what}; {hint}"
            ),
        ));
    }
    if bytes.len() < header_len {
        return Err(Error::data(
            path,
            format!(
                "truncated IDX header: {} bytes, need {header_len}; re-download the file",
                bytes.len()
            ),
        ));
    }
    let dims: Vec<usize> = (0..ndims)
        .map(|i| be_u32(bytes, 4 + 4 * i) as usize)
        .collect();
    let body_len = dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
    let body = &bytes[header_len..];
    let Some(body_len) = body_len else {
        return Err(Error::data(
            path,
            format!("IDX header sizes {dims:?} overflow; the file is corrupt"),
        ));
    };
    if body.len() < body_len {
        return Err(Error::data(
            path,
            format!(
                "truncated: the header announces {what} of shape {dims:?} ({body_len} data bytes) \
                 but only {} data bytes follow; re-download the file",
                body.len()
            ),
        ));
    }
    if body.len() > body_len {
        return Err(Error::data(
            path,
            format!(
                "{} unexpected bytes after the {body_len} data bytes announced by the header \
                 (shape {dims:?}); the file is corrupt or not the one the header describes",
                body.len() - body_len
            ),
        ));
    }
    Ok((dims, body))
}

/// Bytes 0..=255 to f32 in [0, 1].
pub(crate) fn bytes_to_unit(bytes: &[u8]) -> Vec<f32> {
    bytes.iter().map(|&b| f32::from(b) / 255.0).collect()
}

/// Load an IDX image file and its IDX label file (MNIST, Fashion-MNIST), raw or gzip
/// (detected by the gzip magic bytes, not the file name).
///
/// Pixels are scaled to [0, 1]; the result is 1×H×W with 10 classes.
pub fn load_idx(images: &Path, labels: &Path) -> Result<Dataset> {
    let img_bytes = read_maybe_gzip(images)?;
    let lab_bytes = read_maybe_gzip(labels)?;
    parse_idx(&img_bytes, images, &lab_bytes, labels)
}

/// [`load_idx`] from the bytes of the two files in memory (raw or gzip); `images` and `labels`
/// name them in error messages.
pub fn parse_idx(
    image_bytes: &[u8],
    images: &Path,
    label_bytes: &[u8],
    labels: &Path,
) -> Result<Dataset> {
    let img_bytes = maybe_gunzip(image_bytes, images)?;
    let (dims, img_body) = parse_header(&img_bytes, images, IDX_IMAGES_MAGIC, "images")?;
    let (n_images, height, width) = (dims[0], dims[1], dims[2]);
    if height == 0 || width == 0 {
        return Err(Error::data(
            images,
            format!("the header announces images of {height}×{width} pixels; the file is corrupt"),
        ));
    }

    let lab_bytes = maybe_gunzip(label_bytes, labels)?;
    let (ldims, lab_body) = parse_header(&lab_bytes, labels, IDX_LABELS_MAGIC, "labels")?;
    let n_labels = ldims[0];

    if n_labels != n_images {
        return Err(Error::data(
            labels,
            format!(
                "holds {n_labels} labels but {} holds {n_images} images; the two files must \
                 belong to the same split (train-* with train-*, t10k-* with t10k-*)",
                images.display()
            ),
        ));
    }
    if let Some(i) = lab_body.iter().position(|&l| l as usize >= IDX_CLASSES) {
        return Err(Error::data(
            labels,
            format!(
                "label {} at index {i} is out of range (expected 0..={}); the file is corrupt or \
                 not a 10-class data set",
                lab_body[i],
                IDX_CLASSES - 1
            ),
        ));
    }
    Ok(Dataset {
        images: bytes_to_unit(img_body),
        labels: lab_body.to_vec(),
        channels: 1,
        height,
        width,
        num_classes: IDX_CLASSES,
    })
}

/// Find `stem.gz` or `stem` in `dir` (also accepting the `name.idxN-ubyte` spelling some
/// mirrors use).
fn find_idx_file(dir: &Path, stem: &str) -> Result<PathBuf> {
    let dotted = stem.replacen("-idx", ".idx", 1);
    let candidates = [
        format!("{stem}.gz"),
        stem.to_string(),
        format!("{dotted}.gz"),
        dotted,
    ];
    for c in &candidates {
        let p = dir.join(c);
        if p.is_file() {
            return Ok(p);
        }
    }
    Err(Error::NotFound(format!(
        "{}: missing {stem}.gz (or {stem}); an IDX data directory must contain \
         train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and \
         t10k-labels-idx1-ubyte, each gzipped (.gz) or raw",
        dir.display()
    )))
}

/// Load the train and test splits from a directory with the four standard IDX files
/// (`train-images-idx3-ubyte[.gz]`, `train-labels-idx1-ubyte[.gz]`,
/// `t10k-images-idx3-ubyte[.gz]`, `t10k-labels-idx1-ubyte[.gz]`).
pub fn load_idx_dir(dir: &Path) -> Result<(Dataset, Dataset)> {
    let files = [
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ]
    .map(|stem| find_idx_file(dir, stem));
    let [tr_i, tr_l, te_i, te_l] = files;
    let (tr_i, tr_l, te_i, te_l) = (tr_i?, tr_l?, te_i?, te_l?);
    let train = load_idx(&tr_i, &tr_l)?;
    let test = load_idx(&te_i, &te_l)?;
    if (train.height, train.width) != (test.height, test.width) {
        return Err(Error::data(
            &te_i,
            format!(
                "test images are {}×{} but the training images in {} are {}×{}; the files come \
                 from different data sets",
                test.height,
                test.width,
                tr_i.display(),
                train.height,
                train.width
            ),
        ));
    }
    Ok((train, test))
}

/// Whether `dir` holds the four IDX files.
pub(crate) fn has_idx_files(dir: &Path) -> bool {
    [
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ]
    .iter()
    .all(|stem| find_idx_file(dir, stem).is_ok())
}
