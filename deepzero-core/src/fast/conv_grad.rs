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
use super::pieces::{for_pieces_into, sample_planes, samples_per_piece};
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
    if g.stride > 1 && !g.circular && g.h.is_multiple_of(g.stride) && g.w.is_multiple_of(g.stride) {
        return phase_backward_data(dy, w, ci, g);
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
    let out_plane = g.oh * g.ow;
    let columns = n * out_plane;
    // col2im adds into dx: it starts at zero.
    let mut dx = Act::zeros(ci, n, g.h, g.w);
    for_pieces_into(&mut dx, out_plane, |s0, samples, segments| {
        let piece_columns = samples * out_plane;
        DCOLS.with(|cell| {
            let dcols = &mut *cell.borrow_mut();
            dcols.clear();
            dcols.resize(rows * piece_columns, 0.0);
            sgemm(
                rows,
                piece_columns,
                co,
                &wt,
                co,
                &dy.data[s0 * out_plane..],
                columns,
                dcols,
                piece_columns,
                false,
            );
            col2im(dcols, samples, g, segments);
        });
    });
    dx
}

thread_local! {
    /// The column gradient of one piece in [`conv_backward_data`], kept per thread (a fresh
    /// buffer of this size faults in new pages every time).
    static DCOLS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The taps of one axis of a strided convolution by the phase of the input position they
/// reach: `(phase r, tap i, offset d)` for every `i` with `s·o + i − p = s·a + r`, that is
/// input position `s·a + r` reads output `o = a + d`; and the smallest and largest `d`.
fn phase_taps(k: usize, s: usize, p: usize) -> (Vec<(usize, usize, isize)>, isize, isize) {
    let mut taps = Vec::new();
    for r in 0..s {
        for i in 0..k {
            let t = (r + p) as isize - i as isize;
            if t.rem_euclid(s as isize) == 0 {
                taps.push((r, i, t.div_euclid(s as isize)));
            }
        }
    }
    let dmin = taps.iter().map(|t| t.2).min().unwrap_or(0);
    let dmax = taps.iter().map(|t| t.2).max().unwrap_or(0);
    (taps, dmin, dmax)
}

/// [`conv_backward_data`] of a strided convolution (zero padding, input sides divisible by
/// the stride `s`), split by phase: the input positions `(s·a + ry, s·b + rx)` of one phase
/// `(ry, rx)` receive `dy` through that phase's taps only, at output offsets `(a + dy', b + dx')`
/// with `dy', dx'` in `dmin ..= dmax`. So all `s²` phases are one stride-1 convolution of `dy`
/// (zero-padded to the offsets' range) with a `kt × kt` kernel (`kt = dmax − dmin + 1`, 2 for
/// 3×3 stride 2) into `s² · ci` channels, run on the indirect kernels, whose outputs are then
/// interleaved into `dx`. For 3×3 stride 2 that is 16/9 of the product's multiply-adds, at the
/// kernels' rate, instead of a matrix product and a scatter (col2im) at a fraction of it.
fn phase_backward_data(dy: &Act, w: &[f32], ci: usize, g: &ConvGeom) -> Act {
    let (co, n, s, k) = (dy.c, dy.n, g.stride, g.k);
    let (taps, dmin, dmax) = phase_taps(k, s, g.pad);
    let kt = (dmax - dmin + 1) as usize;
    let phases = s * s;
    // Kernel [s²·ci, co, kt, kt]: phase (ry, rx), channel c reads output channel o at offset
    // (ty, tx) with the weight of the taps (i, j) that reach it.
    let mut wp = vec![0.0f32; phases * ci * co * kt * kt];
    for &(ry, i, dyo) in &taps {
        for &(rx, j, dxo) in &taps {
            let (ty, tx) = ((dyo - dmin) as usize, (dxo - dmin) as usize);
            let ph = ry * s + rx;
            for c in 0..ci {
                for o in 0..co {
                    wp[((ph * ci + c) * co + o) * kt * kt + ty * kt + tx] =
                        w[((o * ci + c) * k + i) * k + j];
                }
            }
        }
    }
    // dy zero-padded so that phase position a reads padded rows a ..= a + kt − 1.
    let (ph_h, ph_w) = (g.h / s, g.w / s);
    let (qh, qw) = (ph_h + kt - 1, ph_w + kt - 1);
    let mut padded = Act::zeros(co, n, qh, qw);
    let (out_image, q_image) = (g.oh * g.ow, qh * qw);
    padded
        .data
        .par_chunks_mut((n * q_image).max(1))
        .enumerate()
        .for_each(|(o, dst)| {
            let src = dy.plane(o);
            for ni in 0..n {
                for qy in 0..qh {
                    let y = qy as isize + dmin;
                    if y < 0 || y >= g.oh as isize {
                        continue;
                    }
                    let srow = &src[ni * out_image + y as usize * g.ow..][..g.ow];
                    let drow = &mut dst[ni * q_image + qy * qw..][..qw];
                    // Padded column qx holds dy's column qx + dmin where that exists.
                    let q0 = (-dmin).max(0) as usize;
                    let x0 = dmin.max(0) as usize;
                    let len = (qw - q0).min(g.ow.saturating_sub(x0));
                    drow[q0..q0 + len].copy_from_slice(&srow[x0..x0 + len]);
                }
            }
        });
    let gp = ConvGeom::new(kt, 1, 0, false, qh, qw);
    let mut by_phase = Act::for_overwrite(phases * ci, n, ph_h, ph_w);
    for_pieces_into(&mut by_phase, q_image, |s0, samples, segments| {
        let planes = sample_planes(&padded, s0, samples);
        kernels::conv_into(&planes, samples, &gp, &wp, phases * ci, None, segments);
    });
    let mut dx = Act::for_overwrite(ci, n, g.h, g.w);
    let (in_image, ph_image) = (g.h * g.w, ph_h * ph_w);
    dx.data
        .par_chunks_mut((n * in_image).max(1))
        .enumerate()
        .for_each(|(c, dst)| {
            for ry in 0..s {
                for rx in 0..s {
                    let src = by_phase.plane((ry * s + rx) * ci + c);
                    for ni in 0..n {
                        for a in 0..ph_h {
                            let srow = &src[ni * ph_image + a * ph_w..][..ph_w];
                            let drow = &mut dst[ni * in_image + (s * a + ry) * g.w..][..g.w];
                            for (b, &v) in srow.iter().enumerate() {
                                drow[s * b + rx] = v;
                            }
                        }
                    }
                }
            }
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
    let gt = ConvGeom::new(k, 1, g.pad, g.circular, dy.h, dy.w);
    let mut dx = Act::for_overwrite(ci, dy.n, g.h, g.w);
    for_pieces_into(&mut dx, dy.h * dy.w, |s0, samples, segments| {
        let planes = sample_planes(dy, s0, samples);
        kernels::conv_into(&planes, samples, &gt, &flipped, ci, None, segments);
    });
    dx
}

/// Gradient of a convolution's weight: input `x` (`[Ci, N, H, W]`) and `dy` (`[co, N, Ho, Wo]`)
/// to `dW`, laid out `[co, Ci, k, k]`. (The bias gradient is the per-channel sum of `dy`.)
pub fn conv_backward_weight(x: &Act, dy: &Act, co: usize, g: &ConvGeom) -> Vec<f32> {
    let (ci, n) = (x.c, x.n);
    let per = samples_per_piece(g.oh * g.ow);
    let starts: Vec<usize> = (0..n).step_by(per).collect();
    // Per piece, the weight gradient on the indirect kernels; added in piece order.
    let partials: Vec<Vec<f32>> = starts
        .par_iter()
        .map(|&s0| {
            let samples = per.min(n - s0);
            let planes = sample_planes(x, s0, samples);
            let dys = sample_planes(dy, s0, samples);
            kernels::conv_weight_grad(&planes, samples, g, &dys)
        })
        .collect();
    let mut dw = vec![0.0f32; co * ci * g.k * g.k];
    for part in &partials {
        dw.iter_mut().zip(part).for_each(|(s, v)| *s += v);
    }
    dw
}
