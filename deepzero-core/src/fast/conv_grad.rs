//! Gradients of a convolution on channel-major activations (`[C, N, H, W]`, see [`super::kernels`]).
//!
//! With `cols = im2col(x)` (`[Ci·k², N·Ho·Wo]`) the forward is `y = W · cols` (`W` as
//! `[Co, Ci·k²]`), so
//!
//! * the weight gradient is `dW = dy · colsᵀ`, computed as `dWᵀ = cols · dyᵀ` (a transpose of
//!   `dy` is cheaper than one of `cols`);
//! * the input gradient is `dx = col2im(Wᵀ · dy)`: every column entry is added back to the input
//!   position it was read from ([`col2im`], the adjoint of [`im2col`]; with circular
//!   padding a read that wrapped around adds to the wrapped position, a read of zero padding
//!   adds nothing).
//!
//! Both run over pieces of the batch at once ([`super::pieces`]). The weight gradient adds the
//! pieces' partial products in piece order, so results do not depend on the thread count.

use super::kernels::{self, im2col, sgemm, Act, ConvGeom};
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
    let (ci, n, kk) = (x.c, x.n, g.k * g.k);
    let per = samples_per_piece(g.oh * g.ow);
    // Shifted products for stride-1 "same" convolutions, except where they lose: one input
    // channel (a product of one row per tap) or a padded border that adds over half the image
    // (small images).
    let padded = (g.h + 2 * g.pad) * (g.w + 2 * g.pad);
    let same = g.stride == 1 && 2 * g.pad + 1 == g.k && ci > 1 && 2 * padded <= 3 * g.h * g.w;
    let starts: Vec<usize> = (0..n).step_by(per).collect();
    // Per piece dWᵀ, [Ci·k², Co] (im2col) or [k², Ci, Co] (taps); added in piece order.
    let partials: Vec<Vec<f32>> = starts
        .par_iter()
        .map(|&s0| {
            let samples = per.min(n - s0);
            if same {
                piece_weight_taps(x, dy, s0, samples, g)
            } else {
                piece_weight_im2col(x, dy, s0, samples, g)
            }
        })
        .collect();
    let mut sum = vec![0.0f32; kk * ci * co];
    for part in &partials {
        sum.iter_mut().zip(part).for_each(|(s, v)| *s += v);
    }
    let mut dw = vec![0.0f32; co * ci * kk];
    for c in 0..ci {
        for t in 0..kk {
            let row = if same { t * ci + c } else { c * kk + t };
            for o in 0..co {
                dw[(o * ci + c) * kk + t] = sum[row * co + o];
            }
        }
    }
    dw
}

/// `dy` of samples `s0..s0 + samples`, transposed to `[positions, Co]`; with `pad`, on the
/// grid of the padded images (`(Ho + 2 pad) × (Wo + 2 pad)` each, output `(y, x)` at
/// `(y + pad, x + pad)`, zeros elsewhere).
fn transposed_dy(dy: &Act, s0: usize, samples: usize, pad: usize) -> Vec<f32> {
    let (co, oh, ow) = (dy.c, dy.h, dy.w);
    let (hp, wp) = (oh + 2 * pad, ow + 2 * pad);
    let mut dyt = vec![0.0f32; samples * hp * wp * co];
    for o in 0..co {
        let src = &dy.plane(o)[s0 * oh * ow..(s0 + samples) * oh * ow];
        for (row, values) in src.chunks_exact(ow).enumerate() {
            let (ni, y) = (row / oh, row % oh);
            let q0 = (ni * hp + y + pad) * wp + pad;
            for (x, &v) in values.iter().enumerate() {
                dyt[(q0 + x) * co + o] = v;
            }
        }
    }
    dyt
}

/// One piece of the weight gradient by im2col: `dWᵀ[Ci·k², Co] = cols · dyᵀ`.
fn piece_weight_im2col(x: &Act, dy: &Act, s0: usize, samples: usize, g: &ConvGeom) -> Vec<f32> {
    let (ci, co) = (x.c, dy.c);
    let rows = ci * g.k * g.k;
    let (in_plane, piece_columns) = (g.h * g.w, samples * g.oh * g.ow);
    let planes: Vec<&[f32]> = (0..ci)
        .map(|c| &x.plane(c)[s0 * in_plane..(s0 + samples) * in_plane])
        .collect();
    let mut cols = vec![0.0f32; rows * piece_columns];
    im2col(&planes, samples, g, &mut cols);
    let dyt = transposed_dy(dy, s0, samples, 0);
    let mut part = vec![0.0f32; rows * co];
    sgemm(
        rows,
        co,
        piece_columns,
        &cols,
        piece_columns,
        &dyt,
        co,
        &mut part,
        co,
        false,
    );
    part
}

/// One piece of the weight gradient of a stride-1 "same" convolution without an im2col
/// matrix: on a padded copy of the input (images `(H + 2p) × (W + 2p)` back to back, the
/// border zero or wrapped around) and `dyᵀ` on the same grid, tap `t = (i, j)` reads the input
/// shifted by `(i − p)·(W + 2p) + (j − p)`, so `dWᵀ_t[Ci, Co] = x_pad[:, shifted] · dyᵀ` is one
/// product per tap over a working set that stays in cache. Returns `[k², Ci, Co]`.
fn piece_weight_taps(x: &Act, dy: &Act, s0: usize, samples: usize, g: &ConvGeom) -> Vec<f32> {
    let (ci, co, k, pad) = (x.c, dy.c, g.k, g.pad);
    let (hp, wp) = (g.h + 2 * pad, g.w + 2 * pad);
    let plane = samples * hp * wp;
    let margin = pad * wp + pad;
    let ld = plane + 2 * margin;
    // Source row and column of each padded position (`None` in zero padding).
    let rows: Vec<Option<usize>> = (0..hp).map(|py| g.source(py, 0, g.h)).collect();
    let cols: Vec<Option<usize>> = (0..wp).map(|px| g.source(px, 0, g.w)).collect();
    let mut xp = vec![0.0f32; ci * ld];
    for c in 0..ci {
        let src = &x.plane(c)[s0 * g.h * g.w..(s0 + samples) * g.h * g.w];
        let dst = &mut xp[c * ld + margin..][..plane];
        for (image, padded) in src
            .chunks_exact(g.h * g.w)
            .zip(dst.chunks_exact_mut(hp * wp))
        {
            for (drow, iy) in padded.chunks_exact_mut(wp).zip(&rows) {
                let Some(iy) = iy else {
                    continue;
                };
                let srow = &image[iy * g.w..][..g.w];
                for (d, ix) in drow.iter_mut().zip(&cols) {
                    if let Some(ix) = ix {
                        *d = srow[*ix];
                    }
                }
            }
        }
    }
    let dyt = transposed_dy(dy, s0, samples, pad);
    let mut part = vec![0.0f32; k * k * ci * co];
    for (t, tap) in part.chunks_exact_mut(ci * co).enumerate() {
        // margin + (i − p)·wp + (j − p)
        let start = (t / k) * wp + t % k;
        sgemm(ci, co, plane, &xp[start..], ld, &dyt, co, tap, co, false);
    }
    part
}
