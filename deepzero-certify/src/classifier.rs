//! The black-box classifier interface.
//!
//! A [`BlackBox`] answers class scores for a batch of images and nothing else: no gradients,
//! no internals. Every image evaluated is one query, and every implementation counts them, so
//! that the cost of smoothing and of zeroth-order training can be reported.
//!
//! Images are `n × C × H × W` f32 values, row-major (NCHW), in [0, 1] pixel units plus noise
//! (never clipped). Scores come back `n × K`, row-major.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::error::{Error, Result};

/// A classifier that may only be queried.
///
/// Contract:
/// - [`logits`](BlackBox::logits) takes `n` images of [`input_shape`](BlackBox::input_shape)
///   and returns `n × K` finite scores (K = [`num_classes`](BlackBox::num_classes)); it adds
///   `n` to the query counter.
/// - Implementations are `Send + Sync`: one classifier may be shared between threads.
pub trait BlackBox: Send + Sync {
    /// `[C, H, W]` of one image.
    fn input_shape(&self) -> [usize; 3];

    /// Number of classes K. May cost a query where the classifier must be asked (a
    /// program that has not answered yet).
    fn num_classes(&self) -> Result<usize>;

    /// Class scores for `n` images (`images.len() == n·C·H·W`), `n × K` row-major.
    fn logits(&self, images: &[f32], n: usize) -> Result<Vec<f32>>;

    /// Images evaluated so far (one query = one image).
    fn queries(&self) -> u64;

    /// The top class of each image (the first one on ties).
    fn classify(&self, images: &[f32], n: usize) -> Result<Vec<usize>> {
        let logits = self.logits(images, n)?;
        let k = classes_in(&logits, n)?;
        argmax_rows(&logits, k)
    }
}

/// A reference or smart pointer to a black box is the same black box.
macro_rules! forward_black_box {
    ($($pointer:ty),*) => {$(
        impl<T: BlackBox + ?Sized> BlackBox for $pointer {
            fn input_shape(&self) -> [usize; 3] {
                (**self).input_shape()
            }
            fn num_classes(&self) -> Result<usize> {
                (**self).num_classes()
            }
            fn logits(&self, images: &[f32], n: usize) -> Result<Vec<f32>> {
                (**self).logits(images, n)
            }
            fn queries(&self) -> u64 {
                (**self).queries()
            }
        }
    )*};
}

forward_black_box!(&T, Box<T>, Arc<T>);

/// A thread-safe query counter for [`BlackBox`] implementations.
#[derive(Debug, Default)]
pub struct QueryCounter(AtomicU64);

impl QueryCounter {
    /// Add `n` queries.
    pub fn add(&self, n: usize) {
        self.0.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Queries so far.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Check that `images` holds `n` images of `shape`; the error says how many values were
/// expected.
pub fn check_batch(images: &[f32], n: usize, shape: [usize; 3]) -> Result<()> {
    let per_image: usize = shape.iter().product();
    if images.len() != n * per_image {
        return Err(Error::Shape(format!(
            "{n} images of shape {shape:?} need {} values, got {}",
            n * per_image,
            images.len()
        )));
    }
    Ok(())
}

/// The number of classes in an `n × K` score matrix (`n ≥ 1`).
pub fn classes_in(logits: &[f32], n: usize) -> Result<usize> {
    if n == 0 || logits.is_empty() || !logits.len().is_multiple_of(n) {
        return Err(Error::Classifier(format!(
            "{} scores cannot be {n} rows of K ≥ 1 class scores",
            logits.len()
        )));
    }
    Ok(logits.len() / n)
}

/// Index of the largest score of each row of a `rows × k` matrix (first on ties). Errors on
/// a non-finite score, naming the row.
pub fn argmax_rows(logits: &[f32], k: usize) -> Result<Vec<usize>> {
    logits
        .chunks_exact(k)
        .enumerate()
        .map(|(row, scores)| {
            let mut best = 0;
            for (c, &s) in scores.iter().enumerate() {
                if !s.is_finite() {
                    return Err(Error::Classifier(format!(
                        "score {c} of image {row} in the batch is {s}; a classifier must \
                         return finite scores"
                    )));
                }
                if s > scores[best] {
                    best = c;
                }
            }
            Ok(best)
        })
        .collect()
}
