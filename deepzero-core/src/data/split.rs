//! Seeded, class-aware selections of samples.

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::Dataset;

/// The sample indices of each class, in data set order. Labels `>= num_classes` get classes
/// of their own at the end (so no sample is lost).
pub(crate) fn indices_by_class(ds: &Dataset) -> Vec<Vec<usize>> {
    let k = ds.class_counts().len();
    let mut by_class = vec![Vec::new(); k];
    for (i, &l) in ds.labels.iter().enumerate() {
        by_class[l as usize].push(i);
    }
    by_class
}

/// Split `ds` into `(train, test)`, stratified by class: each class is shuffled (seeded) and
/// `round(test_fraction × count)` of its samples go to the test set, the rest to the training
/// set; both outputs are then shuffled with the same seeded rng.
///
/// `test_fraction` is clamped to [0, 1] (NaN counts as 0). Deterministic for a given `seed`.
pub fn stratified_split(ds: &Dataset, test_fraction: f64, seed: u64) -> (Dataset, Dataset) {
    let frac = if test_fraction.is_nan() {
        0.0
    } else {
        test_fraction.clamp(0.0, 1.0)
    };
    let mut rng = StdRng::seed_from_u64(seed);
    let mut train = Vec::with_capacity(ds.len());
    let mut test = Vec::with_capacity((ds.len() as f64 * frac).ceil() as usize + 16);
    for mut idx in indices_by_class(ds) {
        idx.shuffle(&mut rng);
        let k = ((frac * idx.len() as f64).round() as usize).min(idx.len());
        test.extend_from_slice(&idx[..k]);
        train.extend_from_slice(&idx[k..]);
    }
    train.shuffle(&mut rng);
    test.shuffle(&mut rng);
    (ds.subset(&train), ds.subset(&test))
}

/// Up to `per_class` samples of each class, chosen with a seeded shuffle; the result is
/// shuffled as well.
pub(crate) fn balanced_sample(ds: &Dataset, per_class: usize, seed: u64) -> Dataset {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut chosen = Vec::new();
    for mut idx in indices_by_class(ds) {
        idx.shuffle(&mut rng);
        idx.truncate(per_class);
        chosen.extend_from_slice(&idx);
    }
    chosen.shuffle(&mut rng);
    ds.subset(&chosen)
}
