//! CPU kernels on channel-major activations (`[C, N, H, W]`, one contiguous plane per channel).
//!
//! Channel-major layout makes the per-channel work of delta propagation (batch norm, ReLU,
//! pooling of one changed channel) touch one contiguous slice, and turns a convolution over the
//! whole batch into one matrix product `W[Co, Ci·k²] × cols[Ci·k², N·Ho·Wo]` whose result is
//! already channel-major.

/// Activations `[C, N, H, W]` (a feature matrix `[F, N]` has `h = w = 1`).
#[derive(Clone, Debug, PartialEq)]
pub struct Act {
    /// Channels (features).
    pub c: usize,
    /// Batch size.
    pub n: usize,
    /// Height.
    pub h: usize,
    /// Width.
    pub w: usize,
    /// `c · n · h · w` values.
    pub data: Vec<f32>,
}

impl Act {
    /// Zeros of the given shape.
    pub fn zeros(c: usize, n: usize, h: usize, w: usize) -> Act {
        Act {
            c,
            n,
            h,
            w,
            data: vec![0.0; c * n * h * w],
        }
    }
    /// Values per channel (`n · h · w`).
    pub fn plane_len(&self) -> usize {
        self.n * self.h * self.w
    }
    /// Channel `o`.
    pub fn plane(&self, o: usize) -> &[f32] {
        let p = self.plane_len();
        &self.data[o * p..(o + 1) * p]
    }
    /// Channel `o`, mutable.
    pub fn plane_mut(&mut self, o: usize) -> &mut [f32] {
        let p = self.plane_len();
        &mut self.data[o * p..(o + 1) * p]
    }
    /// From `[N, C, H, W]` (batch-major) data.
    pub fn from_nchw(x: &[f32], n: usize, c: usize, h: usize, w: usize) -> Act {
        let hw = h * w;
        let mut a = Act::zeros(c, n, h, w);
        for ni in 0..n {
            for ci in 0..c {
                let src = &x[(ni * c + ci) * hw..(ni * c + ci + 1) * hw];
                a.data[(ci * n + ni) * hw..(ci * n + ni + 1) * hw].copy_from_slice(src);
            }
        }
        a
    }
}

/// `C[m×n] = (accumulate ? C : 0) + A[m×k] · B[k×n]`, all row-major with the given leading
/// dimensions. Runs the `gemm` crate's kernels (the ones candle uses) on one thread: callers
/// parallelise over independent queries instead, which keeps results independent of the thread
/// count.
#[allow(clippy::too_many_arguments)]
pub fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        lda >= k && ldb >= n && ldc >= n,
        "sgemm: leading dimensions too small"
    );
    assert!(k == 0 || a.len() >= (m - 1) * lda + k, "sgemm: A too short");
    assert!(k == 0 || b.len() >= (k - 1) * ldb + n, "sgemm: B too short");
    assert!(c.len() >= (m - 1) * ldc + n, "sgemm: C too short");
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                c[r * ldc..r * ldc + n].fill(0.0);
            }
        }
        return;
    }
    // SAFETY: the asserts above bound every index gemm touches: A is m×k with row stride lda,
    // B is k×n with row stride ldb, C is m×n with row stride ldc, unit column strides; the
    // slices are live and C does not alias A or B (distinct borrows).
    #[allow(unsafe_code)]
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            ldc as isize,
            accumulate,
            a.as_ptr(),
            1,
            lda as isize,
            b.as_ptr(),
            1,
            ldb as isize,
            1.0f32,
            1.0f32,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// Geometry of a convolution.
#[derive(Clone, Copy, Debug)]
pub struct ConvGeom {
    /// Kernel size.
    pub k: usize,
    /// Stride.
    pub stride: usize,
    /// Padding on each side.
    pub pad: usize,
    /// Circular (periodic) padding instead of zeros.
    pub circular: bool,
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Output height.
    pub oh: usize,
    /// Output width.
    pub ow: usize,
}

impl ConvGeom {
    /// Geometry for an input of `h × w`.
    pub fn new(
        k: usize,
        stride: usize,
        pad: usize,
        circular: bool,
        h: usize,
        w: usize,
    ) -> ConvGeom {
        ConvGeom {
            k,
            stride,
            pad,
            circular,
            h,
            w,
            oh: (h + 2 * pad - k) / stride + 1,
            ow: (w + 2 * pad - k) / stride + 1,
        }
    }

    /// Input index read by output position `o` through kernel tap `t` along a dimension of
    /// `size`: `None` where it falls into zero padding; wrapped around with circular padding.
    #[inline]
    pub fn source(&self, o: usize, t: usize, size: usize) -> Option<usize> {
        let i = (o * self.stride + t) as isize - self.pad as isize;
        if i >= 0 && (i as usize) < size {
            Some(i as usize)
        } else if self.circular {
            Some(i.rem_euclid(size as isize) as usize)
        } else {
            None
        }
    }
}

/// im2col of `planes` (each `[N, H, W]`, one per input channel) into `cols[(c·k + i)·k + j][n, oy, ox]`.
pub fn im2col(planes: &[&[f32]], n: usize, g: &ConvGeom, cols: &mut [f32]) {
    let k = g.k;
    let row = n * g.oh * g.ow;
    for (ci, plane) in planes.iter().enumerate() {
        for i in 0..k {
            for j in 0..k {
                let dst = &mut cols[((ci * k + i) * k + j) * row..][..row];
                for ni in 0..n {
                    let src = &plane[ni * g.h * g.w..(ni + 1) * g.h * g.w];
                    for oy in 0..g.oh {
                        let d = &mut dst[(ni * g.oh + oy) * g.ow..][..g.ow];
                        let Some(iy) = g.source(oy, i, g.h) else {
                            d.fill(0.0);
                            continue;
                        };
                        let srow = &src[iy * g.w..][..g.w];
                        for (ox, dv) in d.iter_mut().enumerate() {
                            *dv = g.source(ox, j, g.w).map_or(0.0, |ix| srow[ix]);
                        }
                    }
                }
            }
        }
    }
}

/// Fewest input channels for which [`conv`] uses shifted products instead of im2col.
const SHIFTED_MIN_CHANNELS: usize = 4;

/// Full convolution: `out[co] = Σ_ci W[co, ci] ⋆ x[ci] (+ b[co])`, zero or circular padding.
pub fn conv(
    x: &Act,
    w: &[f32],
    co: usize,
    bias: Option<&[f32]>,
    k: usize,
    stride: usize,
    pad: usize,
    circular: bool,
) -> Act {
    // The shifted path runs k² products of inner size C_in over the whole output; with few
    // input channels (a network's first layer) one im2col product of inner size C_in·k² is
    // faster.
    if stride == 1 && k > 1 && 2 * pad == k - 1 && x.c >= SHIFTED_MIN_CHANNELS {
        return conv_shifted(x, w, co, bias, k, pad, circular);
    }
    let g = ConvGeom::new(k, stride, pad, circular, x.h, x.w);
    let planes: Vec<&[f32]> = (0..x.c).map(|c| x.plane(c)).collect();
    let kk = x.c * k * k;
    let cols_n = x.n * g.oh * g.ow;
    let mut cols = vec![0.0f32; kk * cols_n];
    im2col(&planes, x.n, &g, &mut cols);
    let mut out = Act::zeros(co, x.n, g.oh, g.ow);
    if let Some(b) = bias {
        for o in 0..co {
            out.plane_mut(o).fill(b[o]);
        }
    }
    sgemm(
        co,
        cols_n,
        kk,
        w,
        kk,
        &cols,
        cols_n,
        &mut out.data,
        cols_n,
        bias.is_some(),
    );
    out
}

/// "Same" stride-1 convolution without an im2col matrix: on a zero-padded copy of the input
/// (each image `(h+2p) × (w+2p)`, laid out back to back), the output at padded position `q` is
/// `Σ_taps W_tap · x_pad[q + shift_tap]`, so each of the `k²` taps is one matrix product
/// `W_tap[Co, Ci] × x_pad[Ci, shifted columns]` accumulated into a padded output whose interior
/// is the result. This writes the input once instead of `k²` times. With circular padding the
/// border of each padded image holds the wrapped-around rows and columns instead of zeros.
fn conv_shifted(
    x: &Act,
    w: &[f32],
    co: usize,
    bias: Option<&[f32]>,
    k: usize,
    pad: usize,
    circular: bool,
) -> Act {
    let (ci, n) = (x.c, x.n);
    let (hp, wp) = (x.h + 2 * pad, x.w + 2 * pad);
    let plane = n * hp * wp;
    let margin = pad * wp + pad;
    let ld = plane + 2 * margin;
    let mut xp = vec![0.0f32; ci * ld];
    for c in 0..ci {
        let src = x.plane(c);
        let dst = &mut xp[c * ld + margin..][..plane];
        for ni in 0..n {
            for y in 0..x.h {
                let d0 = (ni * hp + y + pad) * wp + pad;
                dst[d0..d0 + x.w].copy_from_slice(&src[(ni * x.h + y) * x.w..][..x.w]);
            }
            if circular {
                wrap_border(&mut dst[ni * hp * wp..(ni + 1) * hp * wp], x.h, x.w, pad);
            }
        }
    }
    // Weights per tap, [Co, Ci].
    let kk = k * k;
    let mut wt = vec![0.0f32; kk * co * ci];
    for o in 0..co {
        for c in 0..ci {
            for t in 0..kk {
                wt[(t * co + o) * ci + c] = w[(o * ci + c) * kk + t];
            }
        }
    }
    let mut outp = vec![0.0f32; co * plane];
    for t in 0..kk {
        let (i, j) = (t / k, t % k);
        let start = (margin as isize
            + (i as isize - pad as isize) * wp as isize
            + (j as isize - pad as isize)) as usize;
        sgemm(
            co,
            plane,
            ci,
            &wt[t * co * ci..],
            ci,
            &xp[start..],
            ld,
            &mut outp,
            plane,
            t > 0,
        );
    }
    let mut out = Act::zeros(co, n, x.h, x.w);
    for o in 0..co {
        let b = bias.map_or(0.0, |b| b[o]);
        let src = &outp[o * plane..(o + 1) * plane];
        let dst = out.plane_mut(o);
        for ni in 0..n {
            for y in 0..x.h {
                let s0 = (ni * hp + y + pad) * wp + pad;
                let d = &mut dst[(ni * x.h + y) * x.w..][..x.w];
                for (dv, &sv) in d.iter_mut().zip(&src[s0..s0 + x.w]) {
                    *dv = sv + b;
                }
            }
        }
    }
    out
}

/// Fill the border of one padded image (`(h + 2p) × (w + 2p)`, interior already written) with
/// the periodic continuation of the interior.
fn wrap_border(img: &mut [f32], h: usize, w: usize, pad: usize) {
    let wp = w + 2 * pad;
    let wrap = |i: usize, n: usize| (i + n - pad % n) % n + pad;
    // Columns of the interior rows first, then whole rows (which then include the corners).
    for y in pad..pad + h {
        let row = &mut img[y * wp..(y + 1) * wp];
        for xx in (0..pad).chain(pad + w..wp) {
            row[xx] = row[wrap(xx, w)];
        }
    }
    for y in (0..pad).chain(pad + h..h + 2 * pad) {
        let src = wrap(y, h);
        img.copy_within(src * wp..(src + 1) * wp, y * wp);
    }
}

/// Change of a convolution's output when input channel `c` changes by `delta` (`[N, H, W]`):
/// `out += W[:, c] ⋆ delta`, 1/C_in of a full convolution.
pub fn conv_add_channel(
    out: &mut Act,
    delta: &[f32],
    w: &[f32],
    ci_total: usize,
    c: usize,
    g: &ConvGeom,
    n: usize,
) {
    let kk = g.k * g.k;
    let cols_n = n * g.oh * g.ow;
    let mut cols = vec![0.0f32; kk * cols_n];
    im2col(&[delta], n, g, &mut cols);
    // W[co, c, :, :] rows start at (o·ci_total + c)·k², stride ci_total·k².
    let a = &w[c * kk..];
    sgemm(
        out.c,
        cols_n,
        kk,
        a,
        ci_total * kk,
        &cols,
        cols_n,
        &mut out.data,
        cols_n,
        true,
    );
}

/// Linear layer on features `[F, N]`: `out[O, N] = W[O, F] · x (+ b)`.
pub fn linear(x: &Act, w: &[f32], o: usize, bias: Option<&[f32]>) -> Act {
    let f = x.c * x.h * x.w;
    debug_assert_eq!(x.h * x.w, 1);
    let mut out = Act::zeros(o, x.n, 1, 1);
    if let Some(b) = bias {
        for r in 0..o {
            out.plane_mut(r).fill(b[r]);
        }
    }
    sgemm(
        o,
        x.n,
        f,
        w,
        f,
        &x.data,
        x.n,
        &mut out.data,
        x.n,
        bias.is_some(),
    );
    out
}

/// Per-channel batch statistics and normalisation of one plane; returns (mean, 1/std).
pub fn plane_stats(p: &[f32], eps: f64) -> (f32, f32) {
    let n = p.len() as f64;
    let mean = sum8(p, |v| v as f64) / n;
    let var = sum8(p, |v| (v as f64 - mean) * (v as f64 - mean)) / n;
    (mean as f32, (1.0 / (var + eps).sqrt()) as f32)
}

/// `Σ f(v)` in f64 with eight independent accumulators (one f64 add chain is latency-bound;
/// eight vectorise), added in a fixed order.
fn sum8(p: &[f32], f: impl Fn(f32) -> f64) -> f64 {
    let mut acc = [0.0f64; 8];
    let chunks = p.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += f(v);
        }
    }
    let tail: f64 = rest.iter().map(|&v| f(v)).sum();
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// Batch norm of one plane with its own statistics: `out = γ (x − m)/s + β`.
pub fn bn_plane(x: &[f32], gamma: f32, beta: f32, eps: f64, out: &mut [f32]) -> (f32, f32) {
    let (m, inv) = plane_stats(x, eps);
    let a = gamma * inv;
    let b = beta - m * a;
    for (o, &v) in out.iter_mut().zip(x) {
        *o = v * a + b;
    }
    (m, inv)
}

/// ReLU in place.
pub fn relu_inplace(x: &mut [f32]) {
    for v in x {
        *v = v.max(0.0);
    }
}

/// Max (or mean) pooling of one plane `[N, H, W]` with kernel = stride = `k`.
pub fn pool_plane(x: &[f32], n: usize, h: usize, w: usize, k: usize, max: bool, out: &mut [f32]) {
    let (oh, ow) = (h / k, w / k);
    if oh == 0 || ow == 0 {
        return;
    }
    if max && k == 2 {
        // The common case, written so that it vectorises: pairs of rows, pairs of columns.
        for ni in 0..n {
            let src = &x[ni * h * w..(ni + 1) * h * w];
            let dst = &mut out[ni * oh * ow..(ni + 1) * oh * ow];
            for (oy, d) in dst.chunks_exact_mut(ow).enumerate() {
                let r0 = &src[2 * oy * w..][..2 * ow];
                let r1 = &src[(2 * oy + 1) * w..][..2 * ow];
                for ((o, a), b) in d.iter_mut().zip(r0.chunks_exact(2)).zip(r1.chunks_exact(2)) {
                    *o = a[0].max(a[1]).max(b[0].max(b[1]));
                }
            }
        }
        return;
    }
    let inv = 1.0 / (k * k) as f32;
    for ni in 0..n {
        let src = &x[ni * h * w..(ni + 1) * h * w];
        let dst = &mut out[ni * oh * ow..(ni + 1) * oh * ow];
        for oy in 0..oh {
            for ox in 0..ow {
                let mut acc = if max { f32::NEG_INFINITY } else { 0.0 };
                for i in 0..k {
                    let r = &src[(oy * k + i) * w + ox * k..][..k];
                    for &v in r {
                        if max {
                            acc = acc.max(v);
                        } else {
                            acc += v;
                        }
                    }
                }
                dst[oy * ow + ox] = if max { acc } else { acc * inv };
            }
        }
    }
}

/// Mean over each sample's `H × W` of one plane: `[N, H, W] -> [N]`.
pub fn gap_plane(x: &[f32], n: usize, hw: usize, out: &mut [f32]) {
    let inv = 1.0 / hw as f32;
    for ni in 0..n {
        out[ni] = x[ni * hw..(ni + 1) * hw].iter().sum::<f32>() * inv;
    }
}

/// Spatial subsample by 2 of one plane (option-A shortcut).
pub fn subsample2_plane(x: &[f32], n: usize, h: usize, w: usize, out: &mut [f32]) {
    let (oh, ow) = (h / 2, w / 2);
    for ni in 0..n {
        for oy in 0..oh {
            for ox in 0..ow {
                out[(ni * oh + oy) * ow + ox] = x[(ni * h + 2 * oy) * w + 2 * ox];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Direct convolution, the definition (circular: indices taken modulo the image size).
    fn conv_direct(
        x: &Act,
        w: &[f32],
        co: usize,
        k: usize,
        stride: usize,
        pad: usize,
        circular: bool,
    ) -> Act {
        let g = ConvGeom::new(k, stride, pad, circular, x.h, x.w);
        let mut out = Act::zeros(co, x.n, g.oh, g.ow);
        for o in 0..co {
            for ni in 0..x.n {
                for oy in 0..g.oh {
                    for ox in 0..g.ow {
                        let mut acc = 0.0f64;
                        for c in 0..x.c {
                            for i in 0..k {
                                for j in 0..k {
                                    let mut iy = (oy * stride + i) as isize - pad as isize;
                                    let mut ix = (ox * stride + j) as isize - pad as isize;
                                    if circular {
                                        iy = iy.rem_euclid(x.h as isize);
                                        ix = ix.rem_euclid(x.w as isize);
                                    }
                                    if iy >= 0
                                        && ix >= 0
                                        && (iy as usize) < x.h
                                        && (ix as usize) < x.w
                                    {
                                        let v = x.plane(c)
                                            [(ni * x.h + iy as usize) * x.w + ix as usize];
                                        acc += v as f64 * w[((o * x.c + c) * k + i) * k + j] as f64;
                                    }
                                }
                            }
                        }
                        out.plane_mut(o)[(ni * g.oh + oy) * g.ow + ox] = acc as f32;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn conv_paths_match_the_definition() {
        // Shifted-gemm (stride 1, same padding, ≥ 4 input channels) and im2col (few input
        // channels, stride 2, no padding, 1×1) paths.
        // Each shape with zero and with circular padding (5×5 circular on a 4×6 image wraps
        // further than one row).
        for &(c, co, h, w, k, s, p, circ) in &[
            (3, 5, 7, 6, 3, 1, 1, false),
            (1, 4, 6, 6, 3, 1, 1, false),
            (5, 3, 6, 7, 3, 1, 1, false),
            (4, 2, 8, 8, 3, 2, 1, false),
            (2, 3, 5, 5, 1, 1, 0, false),
            (3, 4, 6, 7, 5, 1, 2, false),
            (3, 5, 7, 6, 3, 1, 1, true),
            (1, 4, 6, 6, 3, 1, 1, true),
            (5, 3, 6, 7, 3, 1, 1, true),
            (4, 2, 8, 8, 3, 2, 1, true),
            (6, 3, 4, 6, 5, 1, 2, true),
            (2, 3, 4, 6, 5, 1, 2, true),
        ] {
            let n = 3;
            let x: Vec<f32> = (0..n * c * h * w)
                .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
                .collect();
            let wt: Vec<f32> = (0..co * c * k * k)
                .map(|i| ((i * 53 % 97) as f32 / 48.0) - 1.0)
                .collect();
            let bias: Vec<f32> = (0..co).map(|i| i as f32 * 0.1).collect();
            let a = Act::from_nchw(&x, n, c, h, w);
            let got = conv(&a, &wt, co, Some(&bias), k, s, p, circ);
            let want = conv_direct(&a, &wt, co, k, s, p, circ);
            assert_eq!(
                (got.c, got.n, got.h, got.w),
                (want.c, want.n, want.h, want.w)
            );
            for o in 0..co {
                for (g, w) in got.plane(o).iter().zip(want.plane(o)) {
                    assert!(
                        (g - (w + bias[o])).abs() < 1e-4,
                        "conv {c}->{co} k{k} s{s} circular {circ}: {g} vs {}",
                        w + bias[o]
                    );
                }
            }
        }
    }
}
