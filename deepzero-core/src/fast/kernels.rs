//! CPU kernels on channel-major activations (`[C, N, H, W]`, one contiguous plane per channel).
//!
//! Channel-major layout makes the per-channel work of delta propagation (batch norm, ReLU,
//! pooling of one changed channel) touch one contiguous slice, and turns a convolution over the
//! whole batch into one matrix product `W[Co, Ci·k²] × cols[Ci·k², N·Ho·Wo]` whose result is
//! already channel-major. That product runs on our micro-kernels ([`super::simd`]) without
//! writing `cols`: each of its rows is the input shifted by one tap, read from a padded copy
//! ([`conv_indirect`]); the weight gradient reads the same copy ([`conv_weight_grad`]).
//!
//! Activation buffers and the kernels' scratch are kept per thread and reused, so the engines'
//! queries do not fault in fresh pages.

/// Activations `[C, N, H, W]` (a feature matrix `[F, N]` has `h = w = 1`).
#[derive(Debug, PartialEq)]
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

/// Activation buffers kept per thread for reuse: the engines allocate and drop megabytes of
/// activations per query, and fresh allocations of that size come from the OS as new pages
/// (page faults took ≈ 25% of a naive ResNet-20 query before).
struct Pool {
    buffers: Vec<Vec<f32>>,
    bytes: usize,
}

/// Most bytes of activation buffers all threads keep together (each thread its share, between
/// 16 and 128 MiB), so a machine with many cores does not hold gigabytes of idle buffers.
const POOL_TOTAL_BYTES: usize = 1 << 30;

/// This thread's share of [`POOL_TOTAL_BYTES`] (by the core count: asking rayon here would
/// start its global pool from a destructor).
fn pool_bytes() -> usize {
    static SHARE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *SHARE.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
        (POOL_TOTAL_BYTES / cores).clamp(16 << 20, 128 << 20)
    })
}
/// Smallest buffer worth keeping (smaller ones come cheaply from the allocator).
const POOL_MIN_LEN: usize = 4096;

thread_local! {
    static POOL: std::cell::RefCell<Pool> = const {
        std::cell::RefCell::new(Pool { buffers: Vec::new(), bytes: 0 })
    };
}

/// A buffer of `len` values, reusing a kept one where one is large enough: zeroed, or, with
/// `zero == false`, holding whatever values it held before.
fn pooled(len: usize, zero: bool) -> Vec<f32> {
    if len >= POOL_MIN_LEN {
        let reused = POOL
            .try_with(|p| {
                let mut p = p.borrow_mut();
                // The smallest kept buffer that fits.
                let best = p
                    .buffers
                    .iter()
                    .enumerate()
                    .filter(|(_, b)| b.capacity() >= len)
                    .min_by_key(|(_, b)| b.capacity())
                    .map(|(i, _)| i)?;
                let b = p.buffers.swap_remove(best);
                p.bytes -= b.capacity() * 4;
                Some(b)
            })
            .ok()
            .flatten();
        if let Some(mut b) = reused {
            if zero {
                b.clear();
            }
            b.resize(len, 0.0);
            b.truncate(len);
            return b;
        }
    }
    vec![0.0; len]
}

impl Drop for Act {
    fn drop(&mut self) {
        let b = std::mem::take(&mut self.data);
        if b.capacity() < POOL_MIN_LEN {
            return;
        }
        let _ = POOL.try_with(|p| {
            let mut p = p.borrow_mut();
            let size = b.capacity() * 4;
            // Make room by dropping the smallest kept buffers; keep nothing over the budget.
            let budget = pool_bytes();
            while p.bytes + size > budget && !p.buffers.is_empty() {
                let i = (0..p.buffers.len())
                    .min_by_key(|&i| p.buffers[i].capacity())
                    .expect("non-empty");
                let old = p.buffers.swap_remove(i);
                p.bytes -= old.capacity() * 4;
            }
            if p.bytes + size <= budget {
                p.bytes += size;
                p.buffers.push(b);
            }
        });
    }
}

impl Clone for Act {
    /// A copy in a kept buffer (a derived clone would fault in fresh pages every time).
    fn clone(&self) -> Act {
        let mut data = pooled(self.data.len(), false);
        data.copy_from_slice(&self.data);
        Act {
            c: self.c,
            n: self.n,
            h: self.h,
            w: self.w,
            data,
        }
    }
}

impl Act {
    /// Zeros of the given shape.
    pub fn zeros(c: usize, n: usize, h: usize, w: usize) -> Act {
        Act {
            c,
            n,
            h,
            w,
            data: pooled(c * n * h * w, true),
        }
    }
    /// An activation of the given shape whose values are left as they come (stale values of a
    /// reused buffer, or zeros): for callers that write every value, which saves a memset.
    pub fn for_overwrite(c: usize, n: usize, h: usize, w: usize) -> Act {
        Act {
            c,
            n,
            h,
            w,
            data: pooled(c * n * h * w, false),
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

/// `C[m×n] = A[m×k] · B[k×n]` (row-major, packed) on our micro-kernels, the convolutions'
/// kernels run as a plain product: the benchmarks' reference rate beside [`sgemm`]. `B` is
/// copied into rows padded to whole tiles.
pub fn sgemm_tiled(m: usize, n: usize, k: usize, a: &[f32], b: &[f32], c: &mut [f32]) {
    assert!(
        a.len() >= m * k && b.len() >= k * n && c.len() >= m * n,
        "sgemm_tiled: short slices"
    );
    if m == 0 || n == 0 {
        return;
    }
    let isa = super::simd::active();
    let (mr, nr) = (isa.mr(), isa.nr());
    let ld = n.div_ceil(nr) * nr;
    SCRATCH.with(|cell| {
        let scratch = &mut *cell.borrow_mut();
        scratch.padded.clear();
        scratch.padded.resize(k * ld, 0.0);
        for r in 0..k {
            scratch.padded[r * ld..r * ld + n].copy_from_slice(&b[r * n..(r + 1) * n]);
        }
        scratch.offsets.clear();
        scratch.offsets.extend((0..k).map(|r| r * ld));
        super::simd::pack_a(a, k, m, k, mr, &mut scratch.packed);
        let panels = m.div_ceil(mr);
        scratch.product.clear();
        scratch.product.resize(panels * mr * ld, 0.0);
        let piece = if isa == super::simd::Isa::Avx512 {
            16
        } else {
            8
        };
        super::simd::consecutive(
            isa,
            piece,
            0,
            ld / nr,
            &mut scratch.pieces,
            &mut scratch.dst,
        );
        let tiles = super::simd::Tiles {
            piece,
            pieces: &scratch.pieces,
            dst: &scratch.dst,
        };
        super::simd::gemm(
            isa,
            m,
            k,
            &scratch.packed,
            &scratch.padded,
            &scratch.offsets,
            &tiles,
            &mut scratch.product,
            ld,
            None,
            false,
        );
        for i in 0..m {
            c[i * n..(i + 1) * n].copy_from_slice(&scratch.product[i * ld..i * ld + n]);
        }
    });
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

/// Full convolution: `out[co] = Σ_ci W[co, ci] ⋆ x[ci] (+ b[co])`, zero or circular padding.
///
/// Runs the indirect micro-kernels of [`super::simd`] on a padded copy of the input (see
/// [`conv_indirect`]); circular padding with a stride above 1 takes one im2col product instead.
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
    let g = ConvGeom::new(k, stride, pad, circular, x.h, x.w);
    let planes: Vec<&[f32]> = (0..x.c).map(|c| x.plane(c)).collect();
    if circular && stride > 1 {
        let mut out = Act::zeros(co, x.n, g.oh, g.ow);
        let kk = x.c * k * k;
        let cols_n = x.n * g.oh * g.ow;
        let mut cols = vec![0.0f32; kk * cols_n];
        im2col(&planes, x.n, &g, &mut cols);
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
        return out;
    }
    // Every output value is written (`Epilogue::Set`).
    let mut out = Act::for_overwrite(co, x.n, g.oh, g.ow);
    conv_indirect(
        &planes,
        x.n,
        &g,
        w,
        x.c * k * k,
        co,
        &mut out.data,
        Epilogue::Set(bias),
    );
    out
}

/// [`conv`] of `n` samples given as input-channel slices (`planes[c]`, `[n, H, W]` each, for
/// example one piece of a batch's planes) into `segments[o]` (`[n, Ho, Wo]` each, for example
/// one piece of each output plane): no copy of the input piece, and the product goes through a
/// buffer kept per thread (hot in cache when copied out) instead of a fresh activation.
#[allow(clippy::too_many_arguments)]
pub fn conv_into(
    planes: &[&[f32]],
    n: usize,
    g: &ConvGeom,
    w: &[f32],
    co: usize,
    bias: Option<&[f32]>,
    segments: &mut [&mut [f32]],
) {
    let out_plane = n * g.oh * g.ow;
    assert_eq!(
        segments.len(),
        co,
        "conv_into: one segment per output channel"
    );
    PIECE_OUT.with(|cell| {
        let buf = &mut *cell.borrow_mut();
        buf.clear();
        buf.resize(co * out_plane, 0.0);
        let kk = planes.len() * g.k * g.k;
        if g.circular && g.stride > 1 {
            let mut cols = vec![0.0f32; kk * out_plane];
            im2col(planes, n, g, &mut cols);
            if let Some(b) = bias {
                for (o, plane) in buf.chunks_exact_mut(out_plane.max(1)).enumerate() {
                    plane.fill(b[o]);
                }
            }
            sgemm(
                co,
                out_plane,
                kk,
                w,
                kk,
                &cols,
                out_plane,
                buf,
                out_plane,
                bias.is_some(),
            );
        } else {
            conv_indirect(planes, n, g, w, kk, co, buf, Epilogue::Set(bias));
        }
        for (o, seg) in segments.iter_mut().enumerate() {
            seg[..out_plane].copy_from_slice(&buf[o * out_plane..(o + 1) * out_plane]);
        }
    });
}

/// What [`conv_indirect`] does with the product.
#[derive(Clone, Copy)]
pub enum Epilogue<'a> {
    /// `out = product (+ bias)`.
    Set(Option<&'a [f32]>),
    /// `out += product`.
    Add,
}

/// Scratch buffers of [`conv_indirect`], one set per thread, reused across calls (the fast
/// engine runs thousands of convolutions per step; allocating them each time showed up as
/// ≈ 10% memset and memmove in profiles).
#[derive(Default)]
struct Scratch {
    padded: Vec<f32>,
    packed: Vec<f32>,
    product: Vec<f32>,
    offsets: Vec<usize>,
    /// Output row pieces of one pass.
    spans: Vec<(usize, usize, usize)>,
    /// Tile pieces and destinations of one pass.
    pieces: Vec<usize>,
    dst: Vec<usize>,
    /// The bias padded to whole panels.
    bias: Vec<f32>,
    /// Lane sums of a weight gradient.
    lanes: Vec<f32>,
    /// `dy` at the padded positions of a weight gradient, and the layout and channel count it
    /// was laid out for.
    dy_padded: Vec<f32>,
    dy_layout: Option<(LayoutKey, usize)>,
    /// Padded input copies by layout. A call with a layout seen before rewrites only the data
    /// slots (its zero slots are still zero), which saves a memset as large as the input.
    layouts: Vec<(LayoutKey, Vec<f32>)>,
}

/// What fixes where a padded copy's zero slots are: channels, batch, geometry.
#[derive(Clone, Copy, PartialEq, Eq)]
struct LayoutKey {
    ci: usize,
    n: usize,
    h: usize,
    w: usize,
    k: usize,
    stride: usize,
    pad: usize,
    circular: bool,
}

/// Padded copies kept per thread (a ResNet-20 has six convolution layouts, and the fast engine's
/// one-channel changes six more).
const KEPT_LAYOUTS: usize = 16;
/// Most bytes of kept padded copies per thread.
const KEPT_LAYOUT_BYTES: usize = 64 << 20;

impl Scratch {
    /// The padded buffer for `key` (`len` values): a kept one, or a new zeroed one (evicting the
    /// least recently used).
    fn padded_for(&mut self, key: LayoutKey, len: usize) -> Vec<f32> {
        if let Some(i) = self.layouts.iter().position(|(k, _)| *k == key) {
            let (_, buf) = self.layouts.remove(i);
            if buf.len() == len {
                return buf;
            }
        }
        if self.layouts.len() >= KEPT_LAYOUTS {
            self.layouts.remove(0);
        }
        vec![0.0; len]
    }
    fn keep(&mut self, key: LayoutKey, buf: Vec<f32>) {
        self.layouts.push((key, buf));
        // At most KEPT_LAYOUT_BYTES in all: the oldest go first.
        while self.layouts.iter().map(|(_, b)| b.len() * 4).sum::<usize>() > KEPT_LAYOUT_BYTES {
            self.layouts.remove(0);
        }
    }
}

thread_local! {
    /// Tests: this thread's convolutions take the given instruction set.
    static ISA_OVERRIDE: std::cell::Cell<Option<super::simd::Isa>> = const { std::cell::Cell::new(None) };
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
    /// The product of [`conv_into`] before it is copied out.
    static PIECE_OUT: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// One dimension of a convolution split by stride phase: input index `s·o + t − pad` of tap `t`
/// is in phase `(t − pad) mod s`, at phase index `o + d_t` with `d_t = ⌊(t − pad) / s⌋`.
struct Axis {
    /// Per tap: (phase, d).
    taps: Vec<(usize, isize)>,
    /// Zero slots before the data (the most negative `d`, as a count).
    lo: usize,
    /// Data (and zero-filled) slots per line: covers every phase and every read.
    data: usize,
    /// Input lines per phase.
    phase_len: Vec<usize>,
}

impl Axis {
    fn new(size: usize, out: usize, k: usize, s: usize, pad: usize) -> Axis {
        let taps: Vec<(usize, isize)> = (0..k)
            .map(|t| {
                let v = t as isize - pad as isize;
                (v.rem_euclid(s as isize) as usize, v.div_euclid(s as isize))
            })
            .collect();
        let lo = taps
            .iter()
            .map(|&(_, d)| (-d).max(0) as usize)
            .max()
            .unwrap_or(0);
        let hi = taps
            .iter()
            .map(|&(_, d)| d.max(0) as usize)
            .max()
            .unwrap_or(0);
        let phase_len: Vec<usize> = (0..s).map(|a| (size + s - 1 - a) / s).collect();
        let data = phase_len.iter().copied().max().unwrap_or(0).max(out + hi);
        Axis {
            taps,
            lo,
            data,
            phase_len,
        }
    }
}

/// Geometry of the padded, stride-phase-split input copy that [`conv_indirect`] describes.
struct PaddedLayout {
    rows: Axis,
    cols: Axis,
    /// Values per line (row) of a padded image.
    line: usize,
    /// Values per padded image.
    image: usize,
    /// Zero (or wrapped) values before the first image's data.
    margin: usize,
    /// Values per (channel, phase) plane.
    plane_len: usize,
    /// Padded positions from the first output to the last, plus one.
    q_len: usize,
    ci: usize,
    n: usize,
}

impl PaddedLayout {
    fn new(g: &ConvGeom, n: usize, ci: usize) -> PaddedLayout {
        let (k, s) = (g.k, g.stride);
        let (rows, cols) = if g.circular {
            // Whole padded images: p slots of wrapped values on each side.
            let full = |size: usize| Axis {
                taps: (0..k).map(|t| (0, t as isize - g.pad as isize)).collect(),
                lo: g.pad,
                data: size + g.pad,
                phase_len: vec![size],
            };
            (full(g.h), full(g.w))
        } else {
            (
                Axis::new(g.h, g.oh, k, s, g.pad),
                Axis::new(g.w, g.ow, k, s, g.pad),
            )
        };
        let line = cols.data + cols.lo;
        let image = (rows.data + rows.lo) * line;
        let margin = rows.lo * line + cols.lo;
        PaddedLayout {
            line,
            image,
            margin,
            plane_len: margin + n * image,
            q_len: (n - 1) * image + (g.oh - 1) * line + g.ow,
            rows,
            cols,
            ci,
            n,
        }
    }

    /// Padded output position of output `pos` (`(n, oy, ox)` in dense order).
    fn position(&self, g: &ConvGeom, pos: usize) -> usize {
        let (ni, rest) = (pos / (g.oh * g.ow), pos % (g.oh * g.ow));
        ni * self.image + (rest / g.ow) * self.line + rest % g.ow
    }

    /// The padded copy of `planes`, readable `slack` values past every position read, and its
    /// key (hand both back to [`Scratch::keep`]).
    fn fill(
        &self,
        scratch: &mut Scratch,
        planes: &[&[f32]],
        g: &ConvGeom,
        slack: usize,
    ) -> (Vec<f32>, LayoutKey) {
        let (s, n, ci) = (g.stride, self.n, self.ci);
        let (rows, cols, line, image, margin) =
            (&self.rows, &self.cols, self.line, self.image, self.margin);
        let phases = s * s;
        let plane_len = self.plane_len;
        let key = LayoutKey {
            ci,
            n,
            h: g.h,
            w: g.w,
            k: g.k,
            stride: s,
            pad: g.pad,
            circular: g.circular,
        };
        let hi_read = (rows.data + 1) * line + slack;
        let mut padded = scratch.padded_for(key, ci * phases * plane_len + hi_read);
        for (c, src) in planes.iter().enumerate() {
            for pa in 0..s {
                let bases: Vec<usize> = (0..s)
                    .map(|pb| (c * phases + pa * s + pb) * plane_len + margin)
                    .collect();
                for ni in 0..n {
                    let img = &src[ni * g.h * g.w..(ni + 1) * g.h * g.w];
                    for u in 0..rows.phase_len[pa] {
                        let srow = &img[(u * s + pa) * g.w..][..g.w];
                        let at = ni * image + u * line;
                        if s == 1 {
                            copy_short(srow, &mut padded[bases[0] + at..][..g.w]);
                        } else if s == 2 {
                            // Both column phases in one pass over the source row.
                            let (lo, hi) = padded.split_at_mut(bases[1] + at);
                            let d0 = &mut lo[bases[0] + at..][..cols.phase_len[0]];
                            let d1 = &mut hi[..cols.phase_len[1]];
                            super::simd::deinterleave2(srow, d0, d1);
                            if g.w % 2 == 1 {
                                d0[g.w / 2] = srow[g.w - 1];
                            }
                        } else {
                            for pb in 0..s {
                                let d = &mut padded[bases[pb] + at..][..cols.phase_len[pb]];
                                for (v, dv) in d.iter_mut().enumerate() {
                                    *dv = srow[v * s + pb];
                                }
                            }
                        }
                    }
                }
                if g.circular {
                    for ni in 0..n {
                        let start = bases[0] - margin + ni * image;
                        wrap_border(&mut padded[start..start + image], g.h, g.w, g.pad);
                    }
                }
            }
        }
        (padded, key)
    }

    /// Where row `(c, i, j)` of the product's `B` starts in the padded copy.
    fn offsets(&self, g: &ConvGeom, offsets: &mut Vec<usize>) {
        let s = g.stride;
        let phases = s * s;
        offsets.clear();
        for c in 0..self.ci {
            for &(pa, di) in &self.rows.taps {
                for &(pb, dj) in &self.cols.taps {
                    let plane = (c * phases + pa * s + pb) * self.plane_len;
                    let shift = (self.rows.lo as isize + di) * self.line as isize
                        + self.cols.lo as isize
                        + dj;
                    offsets.push(plane + shift as usize);
                }
            }
        }
    }
}

/// `out = W ⋆ x` as an indirect product: the input goes once into a padded, stride-phase-split
/// copy, and row `(c, i, j)` of the product's `B` is that copy shifted by the tap — so the
/// micro-kernel keeps each output tile in registers over all `C_in · k²` taps.
///
/// Layout of the copy, per input channel and stride phase: images back to back, each line
/// (row) `data + lo` long and each image `data + lo` lines, the `lo` trailing slots zero. With
/// zero padding those zeros serve as the left (top) padding of the next line (image) too, so the
/// output positions computed and dropped between rows are few (1.27× the outputs on 8×8 maps,
/// 1.06× on 32×32). Circular padding (stride 1) pads each image on every side with its wrapped
/// values instead.
///
/// `planes`: the input channels, each `[N, H, W]`; `a`: the weights, row `o` at `a[o · lda ..]`
/// with the `C_in · k²` taps in `(c, i, j)` order.
#[allow(clippy::too_many_arguments)]
pub fn conv_indirect(
    planes: &[&[f32]],
    n: usize,
    g: &ConvGeom,
    a: &[f32],
    lda: usize,
    co: usize,
    out: &mut [f32],
    epilogue: Epilogue,
) {
    let (ci, k, s) = (planes.len(), g.k, g.stride);
    let kk = ci * k * k;
    let out_plane = n * g.oh * g.ow;
    assert!(
        out.len() >= co * out_plane,
        "conv_indirect: output too short"
    );
    if co == 0 || out_plane == 0 {
        return;
    }
    if kk == 0 {
        if let Epilogue::Set(b) = epilogue {
            for o in 0..co {
                out[o * out_plane..(o + 1) * out_plane].fill(b.map_or(0.0, |b| b[o]));
            }
        }
        return;
    }
    assert!(!g.circular || s == 1, "circular padding with stride > 1");
    let isa = ISA_OVERRIDE
        .with(|o| o.get())
        .unwrap_or_else(super::simd::active);
    // Passes over groups of images whose padded copy (≈ 512 KiB) stays in L2 from the copy to
    // the products: on two cores at once, streaming a whole batch's copy through memory cost
    // a stride-2 layer half its rate.
    let per_pass = ((1usize << 17) / (ci * g.h * g.w).max(1)).clamp(1, n);
    let (in_image, out_image) = (g.h * g.w, g.oh * g.ow);
    for n0 in (0..n).step_by(per_pass) {
        let m = per_pass.min(n - n0);
        let part: Vec<&[f32]> = planes
            .iter()
            .map(|p| &p[n0 * in_image..(n0 + m) * in_image])
            .collect();
        conv_pass(
            &part,
            m,
            g,
            a,
            lda,
            co,
            &mut out[n0 * out_image..],
            out_plane,
            epilogue,
            isa,
        );
    }
}

/// [`conv_indirect`] over `n` images whose outputs start at `out[0]`, output channel `o` at
/// `out[o · ldc ..]`.
#[allow(clippy::too_many_arguments)]
fn conv_pass(
    planes: &[&[f32]],
    n: usize,
    g: &ConvGeom,
    a: &[f32],
    lda: usize,
    co: usize,
    out: &mut [f32],
    ldc: usize,
    epilogue: Epilogue,
    isa: super::simd::Isa,
) {
    let (ci, k) = (planes.len(), g.k);
    let kk = ci * k * k;
    let out_plane = n * g.oh * g.ow;
    let (mr, nr) = (isa.mr(), isa.nr());
    let lay = PaddedLayout::new(g, n, ci);
    let (rows, line, q_len) = (&lay.rows, lay.line, lay.q_len);
    SCRATCH.with(|cell| {
        let scratch = &mut *cell.borrow_mut();
        let (padded, key) = lay.fill(scratch, planes, g, nr);
        lay.offsets(g, &mut scratch.offsets);
        super::simd::pack_a(a, lda, co, kk, mr, &mut scratch.packed);
        let panels = co.div_ceil(mr);
        let (bias, add) = match epilogue {
            Epilogue::Set(b) => (b, false),
            Epilogue::Add => (None, true),
        };
        let bias = bias.map(|b| {
            scratch.bias.clear();
            scratch.bias.extend_from_slice(&b[..co]);
            scratch.bias.resize(panels * mr, 0.0);
            scratch.bias.as_slice()
        });
        let piece = if isa == super::simd::Isa::Avx512 && g.ow.is_multiple_of(16) {
            16
        } else {
            8
        };
        // One product call, the same in every mode but for where it writes.
        let (packed, offsets) = (&scratch.packed, &scratch.offsets);
        let run = |tiles: &super::simd::Tiles, c: &mut [f32], ldc: usize, add: bool| {
            super::simd::gemm(
                isa, co, kk, packed, &padded, offsets, tiles, c, ldc, bias, add,
            )
        };
        let (pieces, dst) = (&mut scratch.pieces, &mut scratch.dst);
        if g.ow.is_multiple_of(piece) {
            // Dense tiles: pieces skip the padding, so only real outputs are computed, and
            // they go straight into `out` (a last panel of fewer than MR rows writes only its
            // own). Passes of ≈ 256 KiB of input keep it in L2 across
            // the panels.
            let position = |pos: usize| lay.position(g, pos);
            let per = nr / piece;
            let pass = ((1usize << 16) / ci).max(nr) / nr * nr;
            let full = out_plane / nr;
            let mut t0 = 0;
            while t0 < full {
                let t1 = (t0 + pass / nr).min(full);
                pieces.clear();
                dst.clear();
                for t in t0..t1 {
                    dst.push(t * nr);
                    pieces.extend((0..per).map(|v| position(t * nr + v * piece)));
                }
                let tiles = super::simd::Tiles { piece, pieces, dst };
                run(&tiles, out, ldc, add);
                t0 = t1;
            }
            let tail = out_plane - full * nr;
            if tail > 0 {
                // The last, partial tile into a scratch tile (pieces past the end read
                // position 0 and are dropped).
                pieces.clear();
                pieces.extend((0..per).map(|v| {
                    let pos = full * nr + v * piece;
                    if pos < out_plane {
                        position(pos)
                    } else {
                        0
                    }
                }));
                let product = &mut scratch.product;
                if product.len() < panels * mr * nr {
                    product.resize(panels * mr * nr, 0.0);
                }
                let tiles = super::simd::Tiles {
                    piece,
                    pieces,
                    dst: &[0],
                };
                run(&tiles, product, nr, false);
                for o in 0..co {
                    let src = &product[o * nr..o * nr + tail];
                    let d = &mut out[o * ldc + full * nr..o * ldc + out_plane];
                    for (d, &v) in d.iter_mut().zip(src) {
                        *d = if add { *d + v } else { v };
                    }
                }
            }
        } else {
            // Tiles over consecutive padded positions, padding included, into a product
            // buffer of ≈ 256 KiB (it stays in L2), from which the real outputs are copied.
            let chunk = ((1usize << 16) / (panels * mr)).max(nr) / nr * nr;
            let product = &mut scratch.product;
            if product.len() < panels * mr * chunk {
                product.resize(panels * mr * chunk, 0.0);
            }
            let spans = &mut scratch.spans;
            let piece = if isa == super::simd::Isa::Avx512 {
                16
            } else {
                8
            };
            let mut q0 = 0;
            while q0 < q_len {
                let count = (q_len - q0).min(chunk).div_ceil(nr);
                super::simd::consecutive(isa, piece, q0, count, pieces, dst);
                let tiles = super::simd::Tiles { piece, pieces, dst };
                run(&tiles, product, chunk, false);
                let q1 = (q0 + count * nr).min(q_len);
                // Output rows (n, oy) that meet [q0, q1): (start in the product, start in the
                // output plane, length).
                let image_lines = rows.data + rows.lo;
                spans.clear();
                for lrow in q0 / line..=(q1 - 1) / line {
                    let (ni, oy) = (lrow / image_lines, lrow % image_lines);
                    let qs = lrow * line;
                    let (a0, a1) = (qs.max(q0), (qs + g.ow).min(q1));
                    if oy < g.oh && a0 < a1 {
                        spans.push((a0 - q0, (ni * g.oh + oy) * g.ow + (a0 - qs), a1 - a0));
                    }
                }
                for o in 0..co {
                    let src = &product[o * chunk..(o + 1) * chunk];
                    let d = &mut out[o * ldc..o * ldc + out_plane];
                    for &(p, at, len) in spans.iter() {
                        let (d, src) = (&mut d[at..at + len], &src[p..p + len]);
                        if add {
                            for (d, &v) in d.iter_mut().zip(src) {
                                *d += v;
                            }
                        } else {
                            d.copy_from_slice(src);
                        }
                    }
                }
                q0 = q1;
            }
        }
        scratch.keep(key, padded);
    });
}

/// Weight gradient of a convolution: `dW[o, (c, i, j)] = Σ_(n, oy, ox) dy[o][n, oy, ox] ·
/// x_pad[c][n, s·oy + i − p, s·ox + j − p]`, laid out `[Co, Ci, k, k]` (the bias gradient is the
/// per-channel sum of `dy`, not computed here).
///
/// The same padded copy as [`conv_indirect`] gives each tap's input row at a fixed offset from
/// the output position; `dy` goes into the same padded positions (zeros between rows), and
/// every `(o, tap)` pair is a dot product over those positions, summed in 16 lanes
/// ([`super::simd::dot_lanes`], register tiles of 4 × 6 pairs) in passes that keep the input
/// in L2. The order of the additions is fixed, so the result does not depend on the
/// instruction set.
///
/// `planes`: the input channels, each `[N, H, W]`; `dy`: the output channels, each `N · Ho · Wo`
/// (for example one piece of each of a batch's planes).
pub fn conv_weight_grad(planes: &[&[f32]], n: usize, g: &ConvGeom, dy: &[&[f32]]) -> Vec<f32> {
    let ci = planes.len();
    let co = dy.len();
    let kk = ci * g.k * g.k;
    let out_plane = n * g.oh * g.ow;
    assert!(
        dy.iter().all(|d| d.len() >= out_plane),
        "conv_weight_grad: dy too short"
    );
    let mut dw = vec![0.0f32; co * kk];
    if co == 0 || kk == 0 || out_plane == 0 {
        return dw;
    }
    if g.circular && g.stride > 1 {
        // im2col · dyᵀ (the layouts of conv_indirect need stride 1 with circular padding).
        let mut cols = vec![0.0f32; kk * out_plane];
        im2col(planes, n, g, &mut cols);
        let mut dyt = vec![0.0f32; out_plane * co];
        for (o, d) in dy.iter().enumerate() {
            for (p, &v) in d[..out_plane].iter().enumerate() {
                dyt[p * co + o] = v;
            }
        }
        let mut dwt = vec![0.0f32; kk * co];
        sgemm(
            kk, co, out_plane, &cols, out_plane, &dyt, co, &mut dwt, co, false,
        );
        for r in 0..kk {
            for o in 0..co {
                dw[o * kk + r] = dwt[r * co + o];
            }
        }
        return dw;
    }
    let isa = ISA_OVERRIDE
        .with(|o| o.get())
        .unwrap_or_else(super::simd::active);
    let lanes = super::simd::DOT_LANES;
    let lay = PaddedLayout::new(g, n, ci);
    let qp = lay.q_len.div_ceil(lanes) * lanes;
    SCRATCH.with(|cell| {
        let scratch = &mut *cell.borrow_mut();
        let (padded, key) = lay.fill(scratch, planes, g, lanes);
        lay.offsets(g, &mut scratch.offsets);
        // dy at the padded positions, zero elsewhere: the buffer of the last call with the
        // same layout and channels has its zeros where they belong already (the pieces of a
        // batch come one after another on a thread), so only the rows are written then.
        let dyq = &mut scratch.dy_padded;
        if scratch.dy_layout != Some((key, co)) {
            dyq.clear();
            dyq.resize(co * qp, 0.0);
            scratch.dy_layout = Some((key, co));
        }
        for (o, d) in dy.iter().enumerate() {
            let src = &d[..out_plane];
            let dst = &mut dyq[o * qp..(o + 1) * qp];
            for (r, row) in src.chunks_exact(g.ow).enumerate() {
                let q = lay.position(g, r * g.ow);
                copy_short(row, &mut dst[q..q + g.ow]);
            }
        }
        let acc = &mut scratch.lanes;
        acc.clear();
        acc.resize(co * kk * lanes, 0.0);
        // Passes of ≈ 256 KiB of input.
        let pass = ((1usize << 16) / ci).max(lanes) / lanes * lanes;
        let mut q0 = 0;
        while q0 < qp {
            let len = pass.min(qp - q0);
            super::simd::dot_lanes(
                isa,
                co,
                kk,
                dyq,
                qp,
                &padded,
                &scratch.offsets,
                q0,
                len,
                acc,
            );
            q0 += len;
        }
        for (d, l) in dw.iter_mut().zip(acc.chunks_exact(lanes)) {
            *d = super::simd::lane_sum(l);
        }
        scratch.keep(key, padded);
    });
    dw
}

/// `dst.copy_from_slice(src)` for short rows (8 to 64 values): fixed-size pieces compile to
/// vector moves, where `copy_from_slice` calls `memmove` once per row.
fn copy_short(src: &[f32], dst: &mut [f32]) {
    let mut s8 = src.chunks_exact(8);
    let mut d8 = dst.chunks_exact_mut(8);
    for (d, s) in (&mut d8).zip(&mut s8) {
        let s: &[f32; 8] = s.try_into().expect("8 values");
        let d: &mut [f32; 8] = d.try_into().expect("8 values");
        *d = *s;
    }
    for (d, s) in d8.into_remainder().iter_mut().zip(s8.remainder()) {
        *d = *s;
    }
}

/// Fill the border of one padded image (`(h + 2p) × (w + 2p)`, interior already written) with
/// the periodic continuation of the interior.
fn wrap_border(img: &mut [f32], h: usize, w: usize, pad: usize) {
    let wp = w + 2 * pad;
    let wrap = |i: usize, n: usize| (i + n - pad % n) % n + pad;
    // Columns of the interior rows first, then whole rows (which then include the corners).
    // The source column of each border column, worked out once (not per row: the modulo
    // cost more than the copies).
    let columns: Vec<(usize, usize)> = (0..pad)
        .chain(pad + w..wp)
        .map(|xx| (xx, wrap(xx, w)))
        .collect();
    for y in pad..pad + h {
        let row = &mut img[y * wp..(y + 1) * wp];
        for &(xx, src) in &columns {
            row[xx] = row[src];
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
    if g.circular && g.stride > 1 {
        let cols_n = n * g.oh * g.ow;
        let mut cols = vec![0.0f32; kk * cols_n];
        im2col(&[delta], n, g, &mut cols);
        sgemm(
            out.c,
            cols_n,
            kk,
            &w[c * kk..],
            ci_total * kk,
            &cols,
            cols_n,
            &mut out.data,
            cols_n,
            true,
        );
        return;
    }
    // W[co, c, :, :] rows start at (o·ci_total + c)·k², stride ci_total·k².
    let co = out.c;
    conv_indirect(
        &[delta],
        n,
        g,
        &w[c * kk..],
        ci_total * kk,
        co,
        &mut out.data,
        Epilogue::Add,
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
    let mean = super::simd::sum8(p, |v| v as f64) / n;
    let var = super::simd::sum8(p, |v| (v as f64 - mean) * (v as f64 - mean)) / n;
    (mean as f32, (1.0 / (var + eps).sqrt()) as f32)
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

/// tanh of one value: a [13/6] odd rational approximation (Eigen's `ptanh_float`
/// coefficients) on `x` clamped to ±7.9053, and `x` itself where |x| < 4e-4. Within 8 ulp of the
/// exact value (4 for |x| < 1; 7 measured), monotone up to that (the unit test checks both);
/// branch-free, so loops over it vectorise, and every
/// ISA path gives the same bits (no fused multiply-adds). libm's `tanhf` took 60% of a PDE
/// correction query.
#[inline(always)]
pub fn tanh_f32(a: f32) -> f32 {
    const CLAMP: f32 = 7.905_311;
    let x = a.clamp(-CLAMP, CLAMP);
    let x2 = x * x;
    let mut p = -2.760_768_5e-16_f32;
    p = p * x2 + 2.000_188e-13;
    p = p * x2 - 8.604_672e-11;
    p = p * x2 + 5.122_297e-8;
    p = p * x2 + 1.485_722_4e-5;
    p = p * x2 + 6.372_619_3e-4;
    p = p * x2 + 4.893_524_6e-3;
    let mut q = 1.198_258_4e-6_f32;
    q = q * x2 + 1.185_347_1e-4;
    q = q * x2 + 2.268_434_6e-3;
    q = q * x2 + 4.893_525e-3;
    let r = x * p / q;
    if a.abs() < 4e-4 {
        a
    } else {
        r
    }
}

/// [`tanh_f32`] in place.
pub fn tanh_inplace(x: &mut [f32]) {
    for v in x {
        *v = tanh_f32(*v);
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
pub(crate) mod tests {
    use super::super::simd::Isa;
    use super::*;

    /// `len` deterministic test values in [-1, 1]: two different patterns (`which` 0 or 1).
    pub(crate) fn pattern(len: usize, which: usize) -> Vec<f32> {
        let (mul, modulus, div) = [(37, 101, 50.0), (53, 97, 48.0)][which];
        (0..len)
            .map(|i| ((i * mul % modulus) as f32 / div) - 1.0)
            .collect()
    }

    #[test]
    fn tanh_is_within_eight_ulp_odd_monotone_and_keeps_nan() {
        let mut worst = 0.0f64;
        let mut previous = f32::NEG_INFINITY;
        let mut x = -12.0f32;
        while x <= 12.0 {
            let t = tanh_f32(x);
            let exact = (x as f64).tanh();
            // One ulp at the exact value (f32 spacing), at least that of the smallest normal.
            let ulp = (exact.abs() as f32).max(f32::MIN_POSITIVE);
            let ulp = (f32::from_bits(ulp.to_bits() + 1) - ulp) as f64;
            worst = worst.max((t as f64 - exact).abs() / ulp);
            assert_eq!(tanh_f32(-x).to_bits(), (-t).to_bits(), "odd at {x}");
            // Monotone up to the error bound (rounding wiggles where it saturates).
            let slack = 8.0 * previous.abs() * f32::EPSILON;
            assert!(t >= previous - slack, "monotone at {x}: {t} < {previous}");
            assert!(t.abs() <= 1.0);
            previous = t;
            x += 1.0 / 4096.0;
        }
        for x in [1e-30f32, 1e-8, 3e-4, 5e-4, 1e-3] {
            let exact = (x as f64).tanh();
            assert!(((tanh_f32(x) as f64) - exact).abs() <= 4.0 * exact * f32::EPSILON as f64);
        }
        eprintln!("tanh_f32: worst error {worst:.2} ulp");
        assert!(worst <= 8.0, "worst error {worst} ulp");
        assert!(tanh_f32(f32::NAN).is_nan());
        assert_eq!(tanh_f32(f32::INFINITY), tanh_f32(100.0));
    }

    /// `conv` on one instruction set (the ISA is passed down instead of forced globally, so
    /// tests running at the same time keep theirs).
    #[allow(clippy::too_many_arguments)]
    fn conv_with(
        isa: Isa,
        x: &Act,
        w: &[f32],
        co: usize,
        bias: Option<&[f32]>,
        k: usize,
        s: usize,
        p: usize,
        circ: bool,
    ) -> Act {
        ISA_OVERRIDE.with(|o| o.set(Some(isa)));
        let out = conv(x, w, co, bias, k, s, p, circ);
        ISA_OVERRIDE.with(|o| o.set(None));
        out
    }

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
    fn weight_gradient_matches_the_definition_on_every_path() {
        for &(c, co, h, w, k, s, p, circ) in &[
            (3, 5, 7, 6, 3, 1, 1, false),
            (2, 7, 8, 8, 3, 2, 1, false),
            (3, 4, 6, 7, 5, 1, 2, true),
            (4, 9, 8, 16, 3, 1, 1, false),
            (2, 3, 7, 9, 3, 2, 1, true),
            (2, 3, 6, 6, 3, 1, 0, false),
        ] {
            let n = 3;
            let x = pattern(n * c * h * w, 0);
            let a = Act::from_nchw(&x, n, c, h, w);
            let g = ConvGeom::new(k, s, p, circ, h, w);
            let dy = pattern(co * n * g.oh * g.ow, 1);
            // The definition: dW[o, c, i, j] = Σ dy[o, n, oy, ox] x[c, n, src(oy, i), src(ox, j)].
            let planes: Vec<&[f32]> = (0..c).map(|ch| a.plane(ch)).collect();
            let mut first: Option<Vec<f32>> = None;
            for isa in [Isa::Portable, Isa::Avx2, Isa::Avx512] {
                if !isa.supported() {
                    continue;
                }
                ISA_OVERRIDE.with(|o| o.set(Some(isa)));
                let dys: Vec<&[f32]> = dy.chunks_exact(n * g.oh * g.ow).collect();
                let got = conv_weight_grad(&planes, n, &g, &dys);
                ISA_OVERRIDE.with(|o| o.set(None));
                match &first {
                    None => first = Some(got),
                    Some(f) => assert_eq!(f, &got, "{isa:?}: {c}->{co} k{k} s{s} circ {circ}"),
                }
            }
            let got = first.expect("portable");
            for o in 0..co {
                for ch in 0..c {
                    for i in 0..k {
                        for j in 0..k {
                            let mut want = 0.0f64;
                            for ni in 0..n {
                                for oy in 0..g.oh {
                                    for ox in 0..g.ow {
                                        let (Some(iy), Some(ix)) =
                                            (g.source(oy, i, h), g.source(ox, j, w))
                                        else {
                                            continue;
                                        };
                                        want += dy
                                            [o * n * g.oh * g.ow + (ni * g.oh + oy) * g.ow + ox]
                                            as f64
                                            * a.plane(ch)[(ni * h + iy) * w + ix] as f64;
                                    }
                                }
                            }
                            let v = got[((o * c + ch) * k + i) * k + j] as f64;
                            assert!(
                                (v - want).abs() < 1e-4 * (1.0 + want.abs()),
                                "{c}->{co} k{k} s{s} circ {circ}: dW[{o},{ch},{i},{j}] {v} vs {want}"
                            );
                        }
                    }
                }
            }
        }
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
            // Odd sizes with stride 2, stride 3, valid (unpadded) and 1×1 strided convolutions,
            // and more output channels than one micro-kernel tile.
            (3, 4, 7, 9, 3, 2, 1, false),
            (2, 3, 9, 8, 3, 3, 1, false),
            (3, 2, 7, 6, 3, 1, 0, false),
            (4, 3, 7, 7, 1, 2, 0, false),
            (2, 3, 8, 7, 5, 2, 2, false),
            (3, 19, 5, 6, 3, 1, 1, false),
            (3, 19, 5, 6, 3, 1, 1, true),
            (2, 3, 5, 37, 3, 2, 1, false),
            (2, 3, 5, 34, 3, 2, 1, false),
            // Dense tiles (output widths of 8 and 16, output channels a multiple of every
            // tile height), with a partial last tile.
            (3, 24, 5, 8, 3, 1, 1, false),
            (3, 24, 5, 8, 3, 1, 1, true),
            (2, 24, 4, 16, 3, 1, 1, false),
            (2, 24, 6, 32, 3, 2, 1, false),
            (2, 48, 3, 16, 5, 1, 2, true),
            // One image per pass (a padded copy of over 512 KiB per image).
            (64, 8, 48, 48, 3, 1, 1, false),
            (64, 8, 48, 48, 3, 2, 1, false),
        ] {
            let n = 3;
            let x = pattern(n * c * h * w, 0);
            let wt = pattern(co * c * k * k, 1);
            let bias: Vec<f32> = (0..co).map(|i| i as f32 * 0.1).collect();
            let a = Act::from_nchw(&x, n, c, h, w);
            let want = conv_direct(&a, &wt, co, k, s, p, circ);
            // Every instruction set gives the same bits.
            let mut first: Option<Act> = None;
            for isa in [Isa::Portable, Isa::Avx2, Isa::Avx512] {
                if !isa.supported() {
                    continue;
                }
                let got = conv_with(isa, &a, &wt, co, Some(&bias), k, s, p, circ);
                match &first {
                    None => first = Some(got),
                    Some(f) => assert_eq!(f, &got, "{isa:?}: conv {c}->{co} k{k} s{s}"),
                }
            }
            let got = first.expect("the portable path");
            // A second call on the same layout reuses the padded copy: only its data changes.
            let neg = Act::from_nchw(&x.iter().map(|v| -v).collect::<Vec<_>>(), n, c, h, w);
            let again = conv(&neg, &wt, co, None, k, s, p, circ);
            for o in 0..co {
                for (g, a) in got.plane(o).iter().zip(again.plane(o)) {
                    assert!((g - bias[o] + a).abs() < 1e-4, "reused layout: {g} vs {a}");
                }
            }
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
