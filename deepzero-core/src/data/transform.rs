//! Normalization, augmentation and mini-batch assembly.

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::Dataset;
use crate::error::{Error, Result};

/// Per-channel normalization `x ← (x − mean[c]) / std[c]`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Normalization {
    /// Mean of each channel.
    pub mean: Vec<f32>,
    /// Standard deviation of each channel.
    pub std: Vec<f32>,
}

impl Normalization {
    /// Per-channel mean and (population) standard deviation over all pixels of `ds`.
    ///
    /// A channel with zero spread (or an empty data set) gets `std = 1`, so that
    /// [`apply`](Self::apply) never divides by zero.
    pub fn fit(ds: &Dataset) -> Normalization {
        let c = ds.channels;
        let hw = ds.height * ds.width;
        let mut sum = vec![0f64; c];
        let mut sum_sq = vec![0f64; c];
        if hw > 0 && c > 0 {
            for (k, plane) in ds.images.chunks_exact(hw).enumerate() {
                let ch = k % c;
                // Accumulate each plane in f32 (short, exact enough), the totals in f64.
                let (s, s2) = plane
                    .iter()
                    .fold((0f32, 0f32), |(s, s2), &x| (s + x, s2 + x * x));
                sum[ch] += f64::from(s);
                sum_sq[ch] += f64::from(s2);
            }
        }
        let count = (ds.len() * hw) as f64;
        let mut mean = Vec::with_capacity(c);
        let mut std = Vec::with_capacity(c);
        for ch in 0..c {
            if count == 0.0 {
                mean.push(0.0);
                std.push(1.0);
                continue;
            }
            let m = sum[ch] / count;
            let var = (sum_sq[ch] / count - m * m).max(0.0);
            let s = var.sqrt();
            mean.push(m as f32);
            std.push(if s > 1e-12 { s as f32 } else { 1.0 });
        }
        Normalization { mean, std }
    }

    /// The usual CIFAR-10 statistics: mean (0.4914, 0.4822, 0.4465), std (0.2471, 0.2435,
    /// 0.2616).
    pub fn cifar10() -> Normalization {
        Normalization {
            mean: vec![0.4914, 0.4822, 0.4465],
            std: vec![0.2471, 0.2435, 0.2616],
        }
    }

    /// The identity for `channels` channels (mean 0, std 1).
    pub fn identity(channels: usize) -> Normalization {
        Normalization {
            mean: vec![0.0; channels],
            std: vec![1.0; channels],
        }
    }

    /// Normalize `ds` in place. Errors if the channel counts differ or a std is not a
    /// positive finite number.
    pub fn apply(&self, ds: &mut Dataset) -> Result<()> {
        if self.mean.len() != ds.channels || self.std.len() != ds.channels {
            return Err(Error::Shape(format!(
                "normalization has {} means and {} stds but the data set has {} channel(s); \
                 fit the normalization on this data set (Normalization::fit) or use the one \
                 saved with the model that was trained on it",
                self.mean.len(),
                self.std.len(),
                ds.channels
            )));
        }
        if let Some((c, s)) = self
            .std
            .iter()
            .enumerate()
            .find(|(_, s)| !(s.is_finite() && **s > 0.0))
        {
            return Err(Error::Config(format!(
                "normalization std of channel {c} is {s}; it must be a positive finite number"
            )));
        }
        let hw = ds.height * ds.width;
        let c = ds.channels;
        if hw == 0 || c == 0 {
            return Ok(());
        }
        let inv: Vec<f32> = self.std.iter().map(|s| 1.0 / s).collect();
        ds.images
            .par_chunks_mut(hw)
            .enumerate()
            .for_each(|(k, plane)| {
                let ch = k % c;
                let (m, r) = (self.mean[ch], inv[ch]);
                for x in plane {
                    *x = (*x - m) * r;
                }
            });
        Ok(())
    }
}

/// Training-time augmentation: a random crop of the image zero-padded by `crop_padding` on
/// every side (i.e. a random shift by −p..=p in each direction, vacated pixels set to 0.0),
/// then, if `hflip`, a horizontal mirror with probability ½.
///
/// The padding value 0.0 is applied to the stored values; on a normalized data set that is
/// the channel mean.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Augment {
    /// Zero padding on each side before the random crop (0: no crop).
    pub crop_padding: usize,
    /// Random horizontal flip with probability ½.
    pub hflip: bool,
}

impl Augment {
    /// No augmentation.
    pub fn none() -> Augment {
        Augment::default()
    }

    /// The standard CIFAR-10 augmentation: crop with 4 pixels of padding, horizontal flip.
    pub fn cifar10() -> Augment {
        Augment {
            crop_padding: 4,
            hflip: true,
        }
    }

    /// Whether this augmentation leaves every image unchanged.
    pub fn is_identity(&self) -> bool {
        self.crop_padding == 0 && !self.hflip
    }

    /// Write the augmented version of one C×H×W image `src` into `dst` (same length).
    fn apply_one<R: Rng + ?Sized>(
        &self,
        src: &[f32],
        dst: &mut [f32],
        (c, h, w): (usize, usize, usize),
        rng: &mut R,
    ) {
        let p = self.crop_padding as isize;
        let (dy, dx) = if p > 0 {
            // Offsets of the crop window in the padded image, 0..=2p, as shifts -p..=p.
            let span = 2 * self.crop_padding;
            let dy = rng.random_range(0..=span) as isize - p;
            let dx = rng.random_range(0..=span) as isize - p;
            (dy, dx)
        } else {
            (0, 0)
        };
        let flip = self.hflip && rng.random_bool(0.5);
        let (hi, wi) = (h as isize, w as isize);
        for ch in 0..c {
            let sp = &src[ch * h * w..(ch + 1) * h * w];
            let dp = &mut dst[ch * h * w..(ch + 1) * h * w];
            for y in 0..h {
                let out = &mut dp[y * w..(y + 1) * w];
                let sy = y as isize + dy;
                if sy < 0 || sy >= hi {
                    out.fill(0.0);
                    continue;
                }
                let row = &sp[sy as usize * w..(sy as usize + 1) * w];
                if !flip {
                    // out[x] = row[x + dx] where in range: one contiguous copy.
                    let x0 = (-dx).clamp(0, wi) as usize; // first x with x + dx >= 0
                    let x1 = (wi - dx).clamp(0, wi) as usize; // first x with x + dx >= w
                    out[..x0].fill(0.0);
                    if x1 > x0 {
                        let s0 = (x0 as isize + dx) as usize;
                        out[x0..x1].copy_from_slice(&row[s0..s0 + (x1 - x0)]);
                    }
                    out[x1.max(x0)..].fill(0.0);
                } else {
                    // Crop, then mirror: out[x] = cropped[w-1-x] = row[w-1-x + dx].
                    for (x, o) in out.iter_mut().enumerate() {
                        let sx = wi - 1 - x as isize + dx;
                        *o = if (0..wi).contains(&sx) {
                            row[sx as usize]
                        } else {
                            0.0
                        };
                    }
                }
            }
        }
    }
}

/// Copy the samples `indices` of `ds` into one contiguous B×C×H×W buffer and their labels.
/// With `Some((augment, rng))`, each image is augmented with draws from `rng` (deterministic
/// for a seeded rng).
///
/// Without augmentation the rng type cannot be inferred from `None`; use [`gather_plain`]
/// (or write `None::<(&Augment, &mut rand::rngs::StdRng)>`).
///
/// # Panics
/// If an index is `>= ds.len()` (a programming error, not a data error).
pub fn gather<R: Rng + ?Sized>(
    ds: &Dataset,
    indices: &[usize],
    augment: Option<(&Augment, &mut R)>,
) -> (Vec<f32>, Vec<u8>) {
    let sl = ds.sample_len();
    let labels: Vec<u8> = indices.iter().map(|&i| ds.labels[i]).collect();
    match augment {
        Some((aug, rng)) if !aug.is_identity() => {
            let mut out = vec![0f32; indices.len() * sl];
            if sl > 0 {
                let shape = (ds.channels, ds.height, ds.width);
                for (dst, &i) in out.chunks_exact_mut(sl).zip(indices) {
                    aug.apply_one(&ds.images[i * sl..(i + 1) * sl], dst, shape, rng);
                }
            }
            (out, labels)
        }
        _ => {
            let mut out = Vec::with_capacity(indices.len() * sl);
            for &i in indices {
                out.extend_from_slice(&ds.images[i * sl..(i + 1) * sl]);
            }
            (out, labels)
        }
    }
}

/// [`gather`] without augmentation.
pub fn gather_plain(ds: &Dataset, indices: &[usize]) -> (Vec<f32>, Vec<u8>) {
    gather::<StdRng>(ds, indices, None)
}

/// The rng seed of epoch `epoch` of a run with seed `seed` (SplitMix64 of both).
fn epoch_seed(seed: u64, epoch: usize) -> u64 {
    let mut z = seed
        ^ (epoch as u64)
            .wrapping_add(1)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The mini-batches of one epoch: the indices `0..n` — in a permutation determined by
/// `(seed, epoch)` if `shuffle`, else in order — cut into chunks of `batch_size`. With
/// `drop_last` a final short chunk is dropped. `batch_size == 0` means one batch of all `n`.
pub fn epoch_batches(
    n: usize,
    batch_size: usize,
    seed: u64,
    epoch: usize,
    shuffle: bool,
    drop_last: bool,
) -> Vec<Vec<usize>> {
    if n == 0 {
        return Vec::new();
    }
    let mut order: Vec<usize> = (0..n).collect();
    if shuffle {
        let mut rng = StdRng::seed_from_u64(epoch_seed(seed, epoch));
        order.shuffle(&mut rng);
    }
    let bs = if batch_size == 0 { n } else { batch_size };
    order
        .chunks(bs)
        .filter(|c| !drop_last || c.len() == bs)
        .map(<[usize]>::to_vec)
        .collect()
}
