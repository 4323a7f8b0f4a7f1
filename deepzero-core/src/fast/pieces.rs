//! Pieces of a batch: whole samples, about [`PIECE_COLUMNS`] positions per piece, fixed by the
//! shapes alone (never by the thread count), worked on by threads at once. Small pieces also
//! keep a convolution's working set in cache: a batch in pieces runs faster than in one product
//! even on one thread.

use super::kernels::Act;
use rayon::prelude::*;

/// Output positions (samples × positions per sample) per piece of work.
pub const PIECE_COLUMNS: usize = 2048;

/// Samples per piece of work for `plane` positions per sample (at least one).
pub fn samples_per_piece(plane: usize) -> usize {
    (PIECE_COLUMNS / plane.max(1)).max(1)
}

/// `out`'s planes cut into the pieces of [`samples_per_piece`]`(plane)` samples, and `f(start,
/// samples, segments)` run over the pieces at once, `segments[c]` being the piece's part of
/// `out`'s plane `c` (`samples · H · W` values): a map whose samples do not interact, written
/// straight into its output (no piece activations to join).
pub(crate) fn for_pieces_into(
    out: &mut Act,
    plane: usize,
    f: impl Fn(usize, usize, &mut [&mut [f32]]) + Sync,
) {
    let n = out.n;
    let per = samples_per_piece(plane);
    let out_image = out.h * out.w;
    let mut pieces: Vec<Vec<&mut [f32]>> = (0..n.div_ceil(per)).map(|_| Vec::new()).collect();
    if out_image > 0 {
        for channel in out.data.chunks_mut(n * out_image) {
            for (p, segment) in channel.chunks_mut(per * out_image).enumerate() {
                pieces[p].push(segment);
            }
        }
    }
    pieces
        .into_par_iter()
        .enumerate()
        .for_each(|(p, mut segments)| f(p * per, per.min(n - p * per), &mut segments));
}

/// Samples `start..start + count` of each of `a`'s planes (no copy).
pub(crate) fn sample_planes(a: &Act, start: usize, count: usize) -> Vec<&[f32]> {
    let hw = a.h * a.w;
    (0..a.c)
        .map(|c| &a.plane(c)[start * hw..(start + count) * hw])
        .collect()
}
