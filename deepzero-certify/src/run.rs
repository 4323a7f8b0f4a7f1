//! Certifying many images, resumably: one [`CertifyRow`] per image, each image with its own
//! RNG stream derived from (seed, index), so a run resumed from its TSV file gives the same
//! rows as an uninterrupted one.

use rand::rngs::StdRng;
use rand::SeedableRng;
use std::collections::{HashMap, HashSet};
use std::time::Instant;

use crate::classifier::BlackBox;
use crate::error::{Error, Result};
use crate::smoothing::{Smoothed, SmoothingConfig};
use crate::tsv::CertifyRow;

/// The noise RNG of image `idx` in a run with `seed`.
pub fn image_rng(seed: u64, idx: usize) -> StdRng {
    // Golden-ratio multiply spreads neighbouring indices over the seed space.
    StdRng::seed_from_u64(seed ^ (idx as u64 ^ 0x5DEE_CE66).wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// CERTIFY each image of `indices` (images `N × C·H·W` row-major with `labels`), skipping
/// those already in `done` (rows read back with [`read_tsv`](crate::tsv::read_tsv)).
///
/// Each new row is passed to `emit` as soon as it is ready (to append it to the TSV file and
/// report progress). Returns all rows, `done` ones included, in `indices` order.
pub fn certify_images<C: BlackBox>(
    classifier: C,
    config: &SmoothingConfig,
    images: &[f32],
    labels: &[usize],
    indices: &[usize],
    seed: u64,
    done: &[CertifyRow],
    mut emit: impl FnMut(&CertifyRow) -> Result<()>,
) -> Result<Vec<CertifyRow>> {
    let smoothed = Smoothed::from_config(classifier, config)?;
    let per_image: usize = smoothed.classifier().input_shape().iter().product();
    if per_image == 0 || images.len() != labels.len() * per_image {
        return Err(Error::Shape(format!(
            "{} labels need {} pixel values of images of {:?}, got {}",
            labels.len(),
            labels.len() * per_image,
            smoothed.classifier().input_shape(),
            images.len()
        )));
    }
    if let Some(&bad) = indices.iter().find(|&&i| i >= labels.len()) {
        return Err(Error::Config(format!(
            "image index {bad} is out of range: the data set has {} images",
            labels.len()
        )));
    }
    let wanted: HashSet<usize> = indices.iter().copied().collect();
    let mut finished: HashMap<usize, &CertifyRow> = HashMap::new();
    for row in done {
        if !wanted.contains(&row.idx) {
            return Err(Error::Config(format!(
                "the resumed file has a row for image {}, which this run does not certify; \
                 resume with the same skip/max settings or start a new file",
                row.idx
            )));
        }
        if row.label != labels[row.idx] {
            return Err(Error::Config(format!(
                "the resumed file gives image {} label {}, the data set {}; it was made for \
                 other data",
                row.idx, row.label, labels[row.idx]
            )));
        }
        finished.insert(row.idx, row);
    }
    let mut rows = Vec::with_capacity(indices.len());
    for &idx in indices {
        if let Some(&row) = finished.get(&idx) {
            rows.push(row.clone());
            continue;
        }
        let start = Instant::now();
        let x = &images[idx * per_image..(idx + 1) * per_image];
        let mut rng = image_rng(seed, idx);
        let cert = smoothed.certify(x, config.n0, config.n, config.alpha, &mut rng)?;
        let row = CertifyRow::new(idx, labels[idx], &cert, start.elapsed());
        emit(&row)?;
        rows.push(row);
    }
    Ok(rows)
}
