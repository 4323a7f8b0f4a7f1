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

/// A map whose samples do not interact (a layer other than batch norm), run over pieces of the
/// batch at once and joined back: `forward` maps the pieces of the inputs to the piece of the
/// output.
pub(crate) fn map_samples(ins: &[&Act], forward: impl Fn(&[&Act]) -> Act + Sync) -> Act {
    let x = ins[0];
    let per = samples_per_piece(x.h * x.w);
    if per >= x.n {
        return forward(ins);
    }
    let starts: Vec<usize> = (0..x.n).step_by(per).collect();
    let outs: Vec<Act> = starts
        .par_iter()
        .map(|&s0| {
            let samples = per.min(x.n - s0);
            let pieces: Vec<Act> = ins.iter().map(|a| sample_range(a, s0, samples)).collect();
            let refs: Vec<&Act> = pieces.iter().collect();
            forward(&refs)
        })
        .collect();
    let first = &outs[0];
    let mut out = Act::zeros(first.c, x.n, first.h, first.w);
    let plane = out.plane_len();
    if plane > 0 {
        out.data
            .par_chunks_mut(plane)
            .enumerate()
            .for_each(|(c, dst)| {
                let mut at = 0;
                for piece in &outs {
                    let src = piece.plane(c);
                    dst[at..at + src.len()].copy_from_slice(src);
                    at += src.len();
                }
            });
    }
    out
}

/// Samples `start..start + count` of `a`.
fn sample_range(a: &Act, start: usize, count: usize) -> Act {
    let hw = a.h * a.w;
    let mut out = Act::zeros(a.c, count, a.h, a.w);
    for c in 0..a.c {
        out.plane_mut(c)
            .copy_from_slice(&a.plane(c)[start * hw..(start + count) * hw]);
    }
    out
}
