//! Gradients of a convolution on channel-major activations (`[C, N, H, W]`, see [`super::kernels`]).
//!
//! With `cols = im2col(x)` (`[Ci·k², N·Ho·Wo]`) the forward is `y = W · cols` (`W` as
//! `[Co, Ci·k²]`), so
//!
//! * the weight gradient is `dW = dy · colsᵀ`: dot products of `dy` with the input shifted by
//!   each tap, read from a padded copy without writing `cols` ([`kernels::conv_weight_grad`]);
//! * the input gradient is `dx = col2im(Wᵀ · dy)`: every column entry is added back to the input
//!   position it was read from ([`col2im`], the adjoint of [`im2col`]; with circular
//!   padding a read that wrapped around adds to the wrapped position, a read of zero padding
//!   adds nothing).
//!
//! Both run over pieces of the batch at once ([`super::pieces`]). The weight gradient adds the
//! pieces' partial products in piece order, so results do not depend on the thread count.

use super::kernels::{self, sgemm, Act, ConvGeom};
use super::pieces::{map_samples, samples_per_piece};
use rayon::prelude::*;

/// Adjoint of [`im2col`]: add every entry `cols[(c·k + i)·k + j][n, oy, ox]` to the
/// position of `planes[c]` (each `[n, H, W]`) it was read from — wrapped around with circular
/// padding, dropped where it read zero padding.
pub fn col2im(cols: &[f32], n: usize, g: &ConvGeom, planes: &mut [&mut [f32]]) {
    let k = g.k;
    let row = n * g.oh * g.ow;
    // Source row of each (tap, output row) and source column of each (tap, output column).
    let rows: Vec<Vec<Option<usize>>> = (0..k)
        .map(|i| (0..g.oh).map(|oy| g.source(oy, i, g.h)).collect())
        .collect();
    let columns: Vec<Vec<Option<usize>>> = (0..k)
        .map(|j| (0..g.ow).map(|ox| g.source(ox, j, g.w)).collect())
        .collect();
    for (ci, plane) in planes.iter_mut().enumerate() {
        for i in 0..k {
            for j in 0..k {
                let src = &cols[((ci * k + i) * k + j) * row..][..row];
                for ni in 0..n {
                    let image = &mut plane[ni * g.h * g.w..][..g.h * g.w];
                    for oy in 0..g.oh {
                        let Some(iy) = rows[i][oy] else {
                            continue;
                        };
                        let dst = &mut image[iy * g.w..][..g.w];
                        let srow = &src[(ni * g.oh + oy) * g.ow..][..g.ow];
                        for (&v, ix) in srow.iter().zip(&columns[j]) {
                            if let Some(ix) = ix {
                                dst[*ix] += v;
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Gradient of a convolution's input: `dy` (`[Co, N, Ho, Wo]`), weight `w` (`[Co, ci, k, k]`)
/// to `dx` shaped like the input, `[ci, N, H, W]`.
pub fn conv_backward_data(dy: &Act, w: &[f32], ci: usize, g: &ConvGeom) -> Act {
    if g.stride == 1 && 2 * g.pad + 1 == g.k {
        return same_conv_backward_data(dy, w, ci, g);
    }
    let (co, n) = (dy.c, dy.n);
    let rows = ci * g.k * g.k;
    // Wᵀ, [Ci·k², Co].
    let mut wt = vec![0.0f32; rows * co];
    for o in 0..co {
        for r in 0..rows {
            wt[r * co + o] = w[o * rows + r];
        }
    }
    let (out_plane, in_plane) = (g.oh * g.ow, g.h * g.w);
    let per = samples_per_piece(out_plane);
    let columns = n * out_plane;
    let mut dx = Act::zeros(ci, n, g.h, g.w);
    // Per piece, the piece's segment of every input channel (disjoint borrows).
    let mut pieces: Vec<Vec<&mut [f32]>> = (0..n.div_ceil(per)).map(|_| Vec::new()).collect();
    if in_plane > 0 {
        for plane in dx.data.chunks_mut(n * in_plane) {
            for (p, segment) in plane.chunks_mut(per * in_plane).enumerate() {
                pieces[p].push(segment);
            }
        }
    }
    pieces
        .into_par_iter()
        .enumerate()
        .for_each(|(p, mut segments)| {
            let samples = per.min(n - p * per);
            let piece_columns = samples * out_plane;
            let mut dcols = vec![0.0f32; rows * piece_columns];
            sgemm(
                rows,
                piece_columns,
                co,
                &wt,
                co,
                &dy.data[p * per * out_plane..],
                columns,
                &mut dcols,
                piece_columns,
                false,
            );
            col2im(&dcols, samples, g, &mut segments);
        });
    dx
}

/// [`conv_backward_data`] of a stride-1 "same" convolution (`2p + 1 = k`): itself a same
/// convolution of `dy` with the kernel transposed (`[ci, Co]`) and flipped in both spatial
/// dimensions — `dx[c, y] = Σ_o Σ_i W[o, c, i] dy[o, y + p − i]` reads `dy` at offsets
/// `i' − p` for the flipped tap `i' = k − 1 − i`, wrapped around the same way with circular
/// padding — run by [`kernels::conv`] over pieces of the batch.
fn same_conv_backward_data(dy: &Act, w: &[f32], ci: usize, g: &ConvGeom) -> Act {
    let (co, k) = (dy.c, g.k);
    let kk = k * k;
    let mut flipped = vec![0.0f32; ci * co * kk];
    for o in 0..co {
        for c in 0..ci {
            for t in 0..kk {
                flipped[(c * co + o) * kk + (kk - 1 - t)] = w[(o * ci + c) * kk + t];
            }
        }
    }
    map_samples(&[dy], |piece| {
        kernels::conv(piece[0], &flipped, ci, None, k, 1, g.pad, g.circular)
    })
}

/// Gradient of a convolution's weight: input `x` (`[Ci, N, H, W]`) and `dy` (`[co, N, Ho, Wo]`)
/// to `dW`, laid out `[co, Ci, k, k]`. (The bias gradient is the per-channel sum of `dy`.)
pub fn conv_backward_weight(x: &Act, dy: &Act, co: usize, g: &ConvGeom) -> Vec<f32> {
    let (ci, n) = (x.c, x.n);
    let per = samples_per_piece(g.oh * g.ow);
    let (in_plane, out_plane) = (g.h * g.w, g.oh * g.ow);
    let starts: Vec<usize> = (0..n).step_by(per).collect();
    // Per piece, the weight gradient on the indirect kernels; added in piece order.
    let partials: Vec<Vec<f32>> = starts
        .par_iter()
        .map(|&s0| {
            let samples = per.min(n - s0);
            let planes: Vec<&[f32]> = (0..ci)
                .map(|c| &x.plane(c)[s0 * in_plane..(s0 + samples) * in_plane])
                .collect();
            let mut piece_dy = Vec::with_capacity(co * samples * out_plane);
            for o in 0..co {
                piece_dy
                    .extend_from_slice(&dy.plane(o)[s0 * out_plane..(s0 + samples) * out_plane]);
            }
            kernels::conv_weight_grad(&planes, samples, g, &piece_dy, co)
        })
        .collect();
    let mut dw = vec![0.0f32; co * ci * g.k * g.k];
    for part in &partials {
        dw.iter_mut().zip(part).for_each(|(s, v)| *s += v);
    }
    dw
}
