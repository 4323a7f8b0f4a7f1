//! Seeding: every random choice of a run derives from one seed through named streams, so the
//! same seed gives the same numbers, also when a run resumes or runs on more threads.
//!
//! Streams in use: `[0]` initial parameters; `[1, epoch, step]` a step's data augmentation;
//! `[2, epoch, step]` a step's estimator randomness (RGE directions); batch order and coordinate
//! sets have streams of their own in [`crate::data`] and [`crate::sparsity`].

use crate::model::Model;
use rand::rngs::StdRng;
use rand::SeedableRng;

/// Derive an independent seed from a base seed and a stream of integers (SplitMix64).
pub fn derive_seed(seed: u64, stream: &[u64]) -> u64 {
    let mut z = seed;
    for &s in stream {
        z = z.wrapping_add(0x9E37_79B9_7F4A_7C15).wrapping_add(s);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
    }
    z
}

/// A generator for one stream of `seed`.
pub fn stream_rng(seed: u64, stream: &[u64]) -> StdRng {
    StdRng::seed_from_u64(derive_seed(seed, stream))
}

/// The initial parameters of a run with `seed` (stream `[0]`): what `train` starts from and what
/// `prune` scores.
pub fn initial_params(model: &Model, seed: u64) -> Vec<f64> {
    model.init_params(&mut stream_rng(seed, &[0]))
}

/// The generator of step `(epoch, step)`'s estimator.
pub fn step_rng(seed: u64, epoch: usize, step: usize) -> StdRng {
    stream_rng(seed, &[2, epoch as u64, step as u64])
}
