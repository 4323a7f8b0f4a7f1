//! Image classification data sets: loaders, splits, normalization, augmentation, batching.
//!
//! All loaders return a [`Dataset`]: `f32` pixels in [0, 1], laid out N×C×H×W, and `u8`
//! labels. Supported sources:
//!
//! * [`load_idx`] / [`load_idx_dir`] / [`parse_idx`] — MNIST and Fashion-MNIST IDX files, raw or gzipped;
//! * [`load_cifar10`] / [`parse_cifar10_batch`] — the binary version of CIFAR-10;
//! * [`load_digits_csv`] / [`parse_digits_csv`] — scikit-learn's 8×8 `digits.csv.gz`.
//!
//! [`load`] picks the files for a [`DatasetKind`]: the user's `--data-dir`, a system-wide copy
//! (Fashion-MNIST from the Debian package `dataset-fashion-mnist`), or the small sets shipped
//! in the repository's `data/` folder ([`shipped_data_dir`]).
//!
//! Training helpers are deterministic for a given seed: [`stratified_split`],
//! [`Dataset::balanced_sample`], [`epoch_batches`], and [`gather`] with a seeded rng and an
//! [`Augment`]. [`Normalization`] standardizes each channel.
//!
//! Every error names the offending file or directory and says how to fix it.

mod cifar;
mod digits;
mod idx;
mod io;
mod split;
mod transform;

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

pub use cifar::{
    load_cifar10, parse_cifar10_batch, CIFAR10_RECORD_BYTES, CIFAR10_TEST_FILE, CIFAR10_TRAIN_FILES,
};
pub use digits::{load_digits_csv, parse_digits_csv};
pub use idx::{load_idx, load_idx_dir, parse_idx, IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC};
pub use split::stratified_split;
pub use transform::{epoch_batches, gather, gather_plain, Augment, Normalization};

/// Where the Debian package `dataset-fashion-mnist` installs the full Fashion-MNIST set.
pub const FASHION_MNIST_SYSTEM_DIR: &str = "/usr/share/datasets/fashion-mnist";

/// Environment variable that overrides [`shipped_data_dir`].
pub const DATA_DIR_ENV: &str = "DEEPZERO_DATA";

/// Fraction of the digits set held out as the test set by [`load`].
pub const DIGITS_TEST_FRACTION: f64 = 0.2;

/// An image classification data set held in memory.
///
/// Images are stored as f32 in [0, 1] (before normalization), layout N×C×H×W, row-major.
#[derive(Clone, Debug)]
pub struct Dataset {
    /// All pixels, N×C×H×W row-major.
    pub images: Vec<f32>,
    /// One label per sample, `< num_classes`.
    pub labels: Vec<u8>,
    /// Channels per image (1 grey, 3 RGB).
    pub channels: usize,
    /// Image height in pixels.
    pub height: usize,
    /// Image width in pixels.
    pub width: usize,
    /// Number of classes.
    pub num_classes: usize,
}

impl Dataset {
    /// Number of samples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are no samples.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Values per sample, C×H×W.
    pub fn sample_len(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// The pixels of sample `i` (C×H×W).
    ///
    /// # Panics
    /// If `i >= self.len()`.
    pub fn image(&self, i: usize) -> &[f32] {
        let sl = self.sample_len();
        &self.images[i * sl..(i + 1) * sl]
    }

    /// A new data set of the samples `indices`, in that order (repeats allowed).
    ///
    /// # Panics
    /// If an index is `>= self.len()`.
    pub fn subset(&self, indices: &[usize]) -> Dataset {
        let sl = self.sample_len();
        let mut images = Vec::with_capacity(indices.len() * sl);
        let mut labels = Vec::with_capacity(indices.len());
        for &i in indices {
            images.extend_from_slice(&self.images[i * sl..(i + 1) * sl]);
            labels.push(self.labels[i]);
        }
        Dataset {
            images,
            labels,
            channels: self.channels,
            height: self.height,
            width: self.width,
            num_classes: self.num_classes,
        }
    }

    /// The first `n` samples (a clone if `n >= len`).
    pub fn take(&self, n: usize) -> Dataset {
        if n >= self.len() {
            return self.clone();
        }
        let sl = self.sample_len();
        Dataset {
            images: self.images[..n * sl].to_vec(),
            labels: self.labels[..n].to_vec(),
            channels: self.channels,
            height: self.height,
            width: self.width,
            num_classes: self.num_classes,
        }
    }

    /// Number of samples of each class (length `num_classes`, longer only if some label is
    /// out of range).
    pub fn class_counts(&self) -> Vec<usize> {
        let mut counts = vec![0usize; self.num_classes];
        for &l in &self.labels {
            let l = l as usize;
            if l >= counts.len() {
                counts.resize(l + 1, 0);
            }
            counts[l] += 1;
        }
        counts
    }

    /// Up to `per_class` samples of each class, chosen by a shuffle seeded with `seed`; the
    /// result is in shuffled order.
    pub fn balanced_sample(&self, per_class: usize, seed: u64) -> Dataset {
        split::balanced_sample(self, per_class, seed)
    }
}

/// The data sets `deepzero` knows how to load.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DatasetKind {
    /// scikit-learn's 8×8 handwritten digits (1,797 samples; shipped).
    Digits,
    /// Fashion-MNIST, 28×28 grey (subset shipped; full set from the system or `--data-dir`).
    FashionMnist,
    /// MNIST, 28×28 grey (`--data-dir` required).
    Mnist,
    /// CIFAR-10, 32×32 RGB, binary version (`--data-dir` required).
    Cifar10,
}

impl DatasetKind {
    /// All kinds.
    pub const ALL: [DatasetKind; 4] = [
        DatasetKind::Digits,
        DatasetKind::FashionMnist,
        DatasetKind::Mnist,
        DatasetKind::Cifar10,
    ];

    /// The kebab-case name used on the command line and in configs.
    pub fn name(self) -> &'static str {
        match self {
            DatasetKind::Digits => "digits",
            DatasetKind::FashionMnist => "fashion-mnist",
            DatasetKind::Mnist => "mnist",
            DatasetKind::Cifar10 => "cifar10",
        }
    }

    /// Image shape `[C, H, W]`.
    pub fn image_shape(self) -> [usize; 3] {
        match self {
            DatasetKind::Digits => [1, 8, 8],
            DatasetKind::FashionMnist | DatasetKind::Mnist => [1, 28, 28],
            DatasetKind::Cifar10 => [3, 32, 32],
        }
    }

    /// Number of classes (10 for all of them).
    pub fn num_classes(self) -> usize {
        10
    }
}

impl fmt::Display for DatasetKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DatasetKind {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let norm = s.trim().to_ascii_lowercase().replace('_', "-");
        let norm = match norm.as_str() {
            "fashion" | "fashionmnist" => "fashion-mnist",
            "cifar-10" | "cifar" => "cifar10",
            other => other,
        };
        DatasetKind::ALL
            .into_iter()
            .find(|k| k.name() == norm)
            .ok_or_else(|| {
                Error::Config(format!(
                    "unknown data set {s:?}; expected one of digits, fashion-mnist, mnist, cifar10"
                ))
            })
    }
}

/// The repository's `data/` folder: the environment variable `DEEPZERO_DATA` if set, else
/// `./data` if it contains `digits/`, else the `data/` folder next to this crate's sources.
pub fn shipped_data_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(DATA_DIR_ENV).filter(|v| !v.is_empty()) {
        return PathBuf::from(dir);
    }
    let local = Path::new("data");
    if local.join("digits").is_dir() {
        return local.to_path_buf();
    }
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../data"))
}

/// Check that the user's `--data-dir` exists and is a directory.
fn check_data_dir(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Err(Error::NotFound(format!(
            "data directory {} (--data-dir) does not exist; check the path",
            dir.display()
        )));
    }
    if !dir.is_dir() {
        return Err(Error::NotFound(format!(
            "--data-dir {} is a file, not a directory; pass the folder that holds the data files",
            dir.display()
        )));
    }
    Ok(())
}

/// Find the digits CSV in a user directory.
fn find_digits(dir: &Path) -> Result<PathBuf> {
    let candidates = [
        dir.join("digits.csv.gz"),
        dir.join("digits.csv"),
        dir.join("digits").join("digits.csv.gz"),
        dir.join("digits").join("digits.csv"),
    ];
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| {
            Error::NotFound(format!(
            "{}: no digits.csv.gz or digits.csv (also looked in digits/); omit --data-dir to use \
             the copy shipped with deepzero",
            dir.display()
        ))
        })
}

/// Load the train and test sets of `kind`.
///
/// `data_dir` is the user's `--data-dir` (an error naming it if it does not exist). Without
/// it: digits come from `data/digits/digits.csv.gz` under [`shipped_data_dir`];
/// Fashion-MNIST from [`FASHION_MNIST_SYSTEM_DIR`] if the full set is installed there, else
/// the shipped subset in `data/fashion-mnist/`; MNIST and CIFAR-10 need `--data-dir`.
///
/// Digits are split 80/20, stratified, with `seed` ([`stratified_split`]); the other sets
/// come with their own train/test split and `seed` is not used.
pub fn load(kind: DatasetKind, data_dir: Option<&Path>, seed: u64) -> Result<(Dataset, Dataset)> {
    if let Some(dir) = data_dir {
        check_data_dir(dir)?;
    }
    match kind {
        DatasetKind::Digits => {
            let path = match data_dir {
                Some(dir) => find_digits(dir)?,
                None => {
                    let p = shipped_data_dir().join("digits").join("digits.csv.gz");
                    if !p.is_file() {
                        return Err(Error::NotFound(format!(
                            "the shipped digits data {} was not found; run from the repository \
                             root, set {DATA_DIR_ENV} to the repository's data/ folder, or pass \
                             --data-dir with a folder holding digits.csv.gz",
                            p.display()
                        )));
                    }
                    p
                }
            };
            let ds = load_digits_csv(&path)?;
            Ok(stratified_split(&ds, DIGITS_TEST_FRACTION, seed))
        }
        DatasetKind::FashionMnist => match data_dir {
            Some(dir) => load_idx_dir(dir),
            None => {
                let system = Path::new(FASHION_MNIST_SYSTEM_DIR);
                if idx::has_idx_files(system) {
                    return load_idx_dir(system);
                }
                let shipped = shipped_data_dir().join("fashion-mnist");
                if !shipped.is_dir() {
                    return Err(Error::NotFound(format!(
                        "Fashion-MNIST not found: neither {FASHION_MNIST_SYSTEM_DIR} (Debian \
                         package dataset-fashion-mnist) nor the shipped subset {} exists; install \
                         the package, set {DATA_DIR_ENV} to the repository's data/ folder, or \
                         pass --data-dir with the four IDX files",
                        shipped.display()
                    )));
                }
                load_idx_dir(&shipped)
            }
        },
        DatasetKind::Mnist => match data_dir {
            Some(dir) => load_idx_dir(dir),
            None => Err(Error::NotFound(
                "MNIST is not shipped with deepzero; download it and pass --data-dir DIR, where \
                 DIR holds train-images-idx3-ubyte, train-labels-idx1-ubyte, \
                 t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte (gzipped .gz or raw)"
                    .into(),
            )),
        },
        DatasetKind::Cifar10 => match data_dir {
            Some(dir) => Ok((load_cifar10(dir, true)?, load_cifar10(dir, false)?)),
            None => Err(Error::NotFound(format!(
                "CIFAR-10 is not shipped with deepzero; pass --data-dir DIR, where {}",
                cifar::CIFAR10_EXPECTED.replacen("a CIFAR-10 directory", "DIR", 1)
            ))),
        },
    }
}
