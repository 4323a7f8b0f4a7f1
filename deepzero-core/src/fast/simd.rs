//! Register-blocked matrix-product micro-kernels with run-time instruction-set dispatch.
//!
//! One product shape serves every convolution of the engine: `C[m × p] = A[m × K] · B`, where
//! row `r` of `B` is read at `b[off[r] ..]` with unit stride. With `off[r]` the position of input
//! channel `c` shifted by kernel tap `(i, j)` in a padded copy of the input, that product *is* the
//! convolution (an "indirect" gemm): no im2col matrix is written, and each output tile keeps its
//! accumulators in registers over all `K = C_in · k²` rows.
//!
//! A micro-kernel computes an `MR × NR` tile of `C` (rows = output channels, columns = output
//! positions): per row of `B` it loads `NR` values, broadcasts `MR` values of `A` and issues
//! `MR · NR / lanes` fused multiply-adds.
//!
//! | instruction set | tile | accumulators |
//! |---|---|---|
//! | AVX-512F | 8 × 48 | 24 zmm |
//! | AVX2 + FMA | 6 × 16 | 12 ymm |
//! | portable | 4 × 8 | scalar `mul_add` |
//!
//! Every path adds the rows of `B` in the same order with one fused multiply-add each, so all
//! three give bit-identical results; tests force each path and compare.
//!
//! Callers own the buffers: `A` packed by [`pack_a`] (`m` rounded up to `MR`), `C` with room for
//! whole tiles (`MR` rows, columns rounded up to `NR`), and `B` readable `NR` values past the last
//! position of every row. That removes all edge handling from the kernels.
#![allow(unsafe_code)]

use std::sync::atomic::{AtomicU8, Ordering};

/// Instruction set of the micro-kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// Plain Rust (`f32::mul_add`).
    Portable,
    /// AVX2 with FMA (x86-64-v3).
    Avx2,
    /// AVX-512F.
    Avx512,
}

impl Isa {
    /// Tile rows (output channels per micro-kernel call).
    pub fn mr(self) -> usize {
        match self {
            Isa::Portable => 4,
            Isa::Avx2 => 6,
            Isa::Avx512 => 8,
        }
    }
    /// Tile columns (output positions per micro-kernel call).
    pub fn nr(self) -> usize {
        match self {
            Isa::Portable => 8,
            Isa::Avx2 => 16,
            Isa::Avx512 => 48,
        }
    }
    /// Whether this CPU can run it.
    pub fn supported(self) -> bool {
        match self {
            Isa::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => is_x86_feature_detected!("avx512f"),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }
    /// Name as the benchmarks print it.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }
}

impl std::str::FromStr for Isa {
    type Err = String;
    fn from_str(s: &str) -> Result<Isa, String> {
        match s {
            "avx512" => Ok(Isa::Avx512),
            "avx2" => Ok(Isa::Avx2),
            "portable" => Ok(Isa::Portable),
            other => Err(format!(
                "unknown instruction set '{other}': use avx512, avx2 or portable"
            )),
        }
    }
}

/// 0: not chosen yet; otherwise 1 + the index of the chosen path.
static CHOSEN: AtomicU8 = AtomicU8::new(0);

const ORDER: [Isa; 3] = [Isa::Portable, Isa::Avx2, Isa::Avx512];

/// The best path this CPU runs.
pub fn detected() -> Isa {
    [Isa::Avx512, Isa::Avx2]
        .into_iter()
        .find(|i| i.supported())
        .unwrap_or(Isa::Portable)
}

/// The path the kernels take: [`detected`] unless [`force`] chose another.
pub fn active() -> Isa {
    match CHOSEN.load(Ordering::Relaxed) {
        0 => {
            let isa = detected();
            let _ = CHOSEN.compare_exchange(
                0,
                1 + ORDER.iter().position(|&i| i == isa).expect("listed") as u8,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
            active()
        }
        v => ORDER[(v - 1) as usize],
    }
}

/// Make every later kernel call take `isa` (as a CPU without AVX-512 would), or go back to the
/// detected path with `None`. Refuses a path this CPU cannot run. Results are the same on every
/// path, so this changes speed only.
pub fn force(isa: Option<Isa>) -> Result<(), String> {
    let isa = match isa {
        Some(i) if !i.supported() => {
            return Err(format!("this CPU cannot run the {} kernels", i.name()))
        }
        Some(i) => i,
        None => detected(),
    };
    CHOSEN.store(
        1 + ORDER.iter().position(|&i| i == isa).expect("listed") as u8,
        Ordering::Relaxed,
    );
    Ok(())
}

/// Pack `A` (`m × k`, row stride `lda`) into panels of `mr` rows: `[m / mr][k][mr]`, the last
/// panel padded with zero rows. `out` is resized to fit.
pub fn pack_a(a: &[f32], lda: usize, m: usize, k: usize, mr: usize, out: &mut Vec<f32>) {
    let panels = m.div_ceil(mr);
    out.clear();
    out.resize(panels * k * mr, 0.0);
    for pnl in 0..panels {
        let dst = &mut out[pnl * k * mr..(pnl + 1) * k * mr];
        for i in 0..mr.min(m - pnl * mr) {
            let row = &a[(pnl * mr + i) * lda..][..k];
            for (r, &v) in row.iter().enumerate() {
                dst[r * mr + i] = v;
            }
        }
    }
}

/// Where the columns of each micro-kernel tile come from and go to.
///
/// A tile's `NR` columns are read in pieces of `piece` values (16 or 8, dividing `NR`; the
/// portable path takes 8): piece `v` of tile `t` reads row `r` of `B` at
/// `b[off[r] + pieces[t · NR/piece + v] ..]`, and the tile is written at column `dst[t]` of
/// `C`. Consecutive pieces make a plain product; pieces that skip the padding between output
/// rows let a convolution compute (and store) only real outputs.
pub struct Tiles<'a> {
    /// Values per piece.
    pub piece: usize,
    /// Per tile, `NR / piece` positions in `B`.
    pub pieces: &'a [usize],
    /// Per tile, its first column in `C`.
    pub dst: &'a [usize],
}

/// `C[rows, tile columns] (+)= bias + A · B` for the `rows` rows of packed `A` ([`pack_a`],
/// `rows.div_ceil(MR)` panels) and every tile of `tiles`. Row `i` of panel `p` goes to
/// `c[(p · MR + i) · ldc + dst ..]`; a last panel of fewer than `MR` rows computes and writes
/// only those (a 2-channel output is not charged for 8). Each value starts at its row's bias
/// (or 0), adds the rows of `B` in order with one fused multiply-add each, and is then stored,
/// or added to what `C` holds with `add`.
///
/// Panics unless every read and write is inside the slices (checked once, up front).
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    isa: Isa,
    rows: usize,
    k: usize,
    a: &[f32],
    b: &[f32],
    off: &[usize],
    tiles: &Tiles,
    c: &mut [f32],
    ldc: usize,
    bias: Option<&[f32]>,
    add: bool,
) {
    let (mr, nr) = (isa.mr(), isa.nr());
    let per = nr / tiles.piece;
    let count = tiles.dst.len();
    let panels = rows.div_ceil(mr);
    if panels == 0 || count == 0 {
        return;
    }
    let piece_ok = match isa {
        Isa::Portable => tiles.piece == 8,
        Isa::Avx2 => tiles.piece == 8,
        Isa::Avx512 => tiles.piece == 16 || tiles.piece == 8,
    };
    assert!(
        piece_ok,
        "gemm: pieces of {} values on {isa:?}",
        tiles.piece
    );
    assert!(tiles.pieces.len() >= count * per, "gemm: too few pieces");
    assert!(a.len() >= panels * k * mr, "gemm: A too short");
    assert!(off.len() >= k, "gemm: too few row offsets");
    if let (Some(&mo), Some(&mp)) = (
        off[..k].iter().max(),
        tiles.pieces[..count * per].iter().max(),
    ) {
        assert!(mo + mp + tiles.piece <= b.len(), "gemm: B too short");
    }
    let md = *tiles.dst.iter().max().expect("a tile");
    assert!(md + nr <= ldc, "gemm: ldc too small");
    assert!(c.len() >= (rows - 1) * ldc + md + nr, "gemm: C too short");
    if let Some(b) = bias {
        assert!(b.len() >= panels * mr, "gemm: bias too short");
    }
    for p in 0..panels {
        let ap = &a[p * k * mr..(p + 1) * k * mr];
        let bp = bias.map(|b| &b[p * mr..(p + 1) * mr]);
        let m = mr.min(rows - p * mr);
        for t in 0..count {
            let pcs = &tiles.pieces[t * per..(t + 1) * per];
            let ct = p * mr * ldc + tiles.dst[t];
            match isa {
                Isa::Portable => portable(k, m, ap, b, off, pcs[0], &mut c[ct..], ldc, bp, add),
                #[cfg(target_arch = "x86_64")]
                // SAFETY: the path is only chosen where the CPU has the features (`force`
                // refuses otherwise, `detected` checks); the asserts above bound every access:
                // B pieces `off[r] + piece position .. + piece ≤ b.len()`, C rows
                // `ct + i · ldc .. + NR` for `i < m ≤ MR` inside `c`, A `k · MR` values,
                // bias `MR`.
                Isa::Avx2 => unsafe {
                    let args = (
                        k,
                        ap.as_ptr(),
                        b.as_ptr(),
                        off.as_ptr(),
                        [pcs[0], pcs[1]],
                        c[ct..].as_mut_ptr(),
                        ldc,
                        bp.map_or(std::ptr::null(), |b| b.as_ptr()),
                        add,
                    );
                    let (k, a, b, off, pieces, c, ldc, bias, add) = args;
                    x86::avx2_tile(m, k, a, b, off, pieces, c, ldc, bias, add)
                },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: as above.
                Isa::Avx512 => unsafe {
                    let cp = c[ct..].as_mut_ptr();
                    let bp = bp.map_or(std::ptr::null(), |b| b.as_ptr());
                    let pieces = if tiles.piece == 16 {
                        [pcs[0], pcs[1], pcs[2], 0, 0, 0]
                    } else {
                        [pcs[0], pcs[1], pcs[2], pcs[3], pcs[4], pcs[5]]
                    };
                    x86::avx512_tile(
                        m,
                        tiles.piece == 8,
                        k,
                        ap.as_ptr(),
                        b.as_ptr(),
                        off.as_ptr(),
                        pieces,
                        cp,
                        ldc,
                        bp,
                        add,
                    )
                },
                #[cfg(not(target_arch = "x86_64"))]
                _ => unreachable!("only the portable path exists off x86-64"),
            }
        }
    }
}

/// Consecutive pieces: tile `t` reads `B` columns `col0 + t · NR ..` and writes `C` columns
/// `t · NR ..` (a plain product over `tiles · NR` columns).
pub fn consecutive(
    isa: Isa,
    piece: usize,
    col0: usize,
    tiles: usize,
    pieces: &mut Vec<usize>,
    dst: &mut Vec<usize>,
) {
    let nr = isa.nr();
    pieces.clear();
    dst.clear();
    for t in 0..tiles {
        dst.push(t * nr);
        pieces.extend((0..nr / piece).map(|v| col0 + t * nr + v * piece));
    }
}

/// Lanes of a dot product: position `q` of a reduction adds to lane `q mod 16`.
pub const DOT_LANES: usize = 16;

/// Partial dot products for a weight gradient: for every row `i < m` of `dy` (at
/// `dy[i · ldy ..]`) and every row `j < k` of `B` (at `b[off[j] ..]`), lane `l` of
/// `acc[(i · k + j) · 16 ..]` adds `dy[i][q] · B[j][q]` for the positions `q ≡ l (mod 16)` of
/// `[q0, q0 + len)`, in increasing `q`, one fused multiply-add each. `len` is a multiple of 16.
/// Calls over consecutive ranges continue the same sums, and every path adds in the same
/// order, so the lanes (and [`lane_sum`] of them) are the same bits on every path.
#[allow(clippy::too_many_arguments)]
pub fn dot_lanes(
    isa: Isa,
    m: usize,
    k: usize,
    dy: &[f32],
    ldy: usize,
    b: &[f32],
    off: &[usize],
    q0: usize,
    len: usize,
    acc: &mut [f32],
) {
    assert_eq!(
        len % DOT_LANES,
        0,
        "dot_lanes: len must be a multiple of 16"
    );
    if m == 0 || k == 0 || len == 0 {
        return;
    }
    assert!(off.len() >= k, "dot_lanes: too few row offsets");
    assert!(
        (m - 1) * ldy + q0 + len <= dy.len(),
        "dot_lanes: dy too short"
    );
    let mo = *off[..k].iter().max().expect("k > 0");
    assert!(mo + q0 + len <= b.len(), "dot_lanes: B too short");
    assert!(acc.len() >= m * k * DOT_LANES, "dot_lanes: acc too short");
    match isa {
        Isa::Portable => {
            for i in 0..m {
                let d = &dy[i * ldy + q0..][..len];
                for j in 0..k {
                    let x = &b[off[j] + q0..][..len];
                    let a = &mut acc[(i * k + j) * DOT_LANES..][..DOT_LANES];
                    for (dc, xc) in d.chunks_exact(DOT_LANES).zip(x.chunks_exact(DOT_LANES)) {
                        for l in 0..DOT_LANES {
                            a[l] = dc[l].mul_add(xc[l], a[l]);
                        }
                    }
                }
            }
        }
        #[cfg(target_arch = "x86_64")]
        isa => {
            let (ti, tj) = if isa == Isa::Avx512 { (4, 6) } else { (2, 2) };
            for i0 in (0..m).step_by(ti) {
                for j0 in (0..k).step_by(tj) {
                    let (ni, nj) = ((m - i0).min(ti), (k - j0).min(tj));
                    // SAFETY: the features are present (the path was chosen for this CPU);
                    // rows i0..i0+ni of dy and j0..j0+nj of B are read over [q0, q0 + len),
                    // inside the slices by the asserts above; acc entries of those (i, j)
                    // pairs are inside acc.
                    unsafe {
                        x86::dot_tile(
                            isa,
                            ni,
                            nj,
                            len,
                            dy.as_ptr().add(i0 * ldy + q0),
                            ldy,
                            b.as_ptr().add(q0),
                            off[j0..].as_ptr(),
                            acc.as_mut_ptr().add((i0 * k + j0) * DOT_LANES),
                            k * DOT_LANES,
                        )
                    }
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        _ => unreachable!("only the portable path exists off x86-64"),
    }
}

/// The sum of 16 lanes in a fixed pairwise order.
pub fn lane_sum(l: &[f32]) -> f32 {
    let s8: [f32; 8] = std::array::from_fn(|i| l[i] + l[i + 8]);
    let s4: [f32; 4] = std::array::from_fn(|i| s8[i] + s8[i + 4]);
    (s4[0] + s4[2]) + (s4[1] + s4[3])
}

/// Even- and odd-indexed values of `src` into `even` and `odd` (as many as each holds): the
/// stride-2 phase split of a convolution's input rows.
pub fn deinterleave2(src: &[f32], even: &mut [f32], odd: &mut [f32]) {
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if active() != Isa::Portable {
        let blocks = (src.len() / 16).min(even.len() / 8).min(odd.len() / 8);
        // SAFETY: AVX2 is present (every non-portable path has it); block `i` reads
        // `src[16i .. 16i + 16]` and writes `even[8i .. 8i + 8]`, `odd[8i .. 8i + 8]`, all in
        // bounds by the choice of `blocks`.
        unsafe {
            x86::deinterleave2_avx2(blocks, src.as_ptr(), even.as_mut_ptr(), odd.as_mut_ptr())
        };
        done = blocks * 8;
    }
    for (v, pair) in src[2 * done..].chunks_exact(2).enumerate() {
        if done + v < even.len() {
            even[done + v] = pair[0];
        }
        if done + v < odd.len() {
            odd[done + v] = pair[1];
        }
    }
}

/// The portable tile: 4 × 8 (its first `m` rows), one fused multiply-add per product, rows in
/// order.
#[allow(clippy::too_many_arguments)]
fn portable(
    k: usize,
    m: usize,
    a: &[f32],
    b: &[f32],
    off: &[usize],
    col: usize,
    c: &mut [f32],
    ldc: usize,
    bias: Option<&[f32]>,
    add: bool,
) {
    const MR: usize = 4;
    const NR: usize = 8;
    let mut acc = [[0.0f32; NR]; MR];
    if let Some(bias) = bias {
        for i in 0..MR {
            acc[i] = [bias[i]; NR];
        }
    }
    for r in 0..k {
        let br = &b[off[r] + col..][..NR];
        let ar = &a[r * MR..][..MR];
        for i in 0..m {
            for j in 0..NR {
                acc[i][j] = ar[i].mul_add(br[j], acc[i][j]);
            }
        }
    }
    for i in 0..m {
        let row = &mut c[i * ldc..i * ldc + NR];
        if add {
            for (d, v) in row.iter_mut().zip(acc[i]) {
                *d += v;
            }
        } else {
            row.copy_from_slice(&acc[i]);
        }
    }
}

/// `Σ f(v)` over `p` in f64 with eight independent accumulators, added in a fixed order (one
/// f64 add chain is latency-bound; eight vectorise). Compiled for the active instruction set's
/// vector width: the same additions in the same order on every path, so the same bits.
pub fn sum8(p: &[f32], f: impl Fn(f32) -> f64) -> f64 {
    match active() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the path is chosen only where the CPU has the feature (`active`).
        Isa::Avx512 => unsafe { x86::sum8_avx512(p, f) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe { x86::sum8_avx2(p, f) },
        _ => sum8_body(p, f),
    }
}

#[inline(always)]
fn sum8_body(p: &[f32], f: impl Fn(f32) -> f64) -> f64 {
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

/// `(Σ dy, Σ dy · ((x − m) · s))` over one batch-norm channel, in f64 with eight independent
/// lanes added in a fixed order; compiled per instruction set like [`sum8`], same bits.
pub fn bn_gradient_sums(x: &[f32], dy: &[f32], m: f32, s: f32) -> (f64, f64) {
    match active() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the path is chosen only where the CPU has the feature (`active`).
        Isa::Avx512 => unsafe { x86::bn_gradient_sums_avx512(x, dy, m, s) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe { x86::bn_gradient_sums_avx2(x, dy, m, s) },
        _ => bn_gradient_sums_body(x, dy, m, s),
    }
}

#[inline(always)]
fn bn_gradient_sums_body(x: &[f32], dy: &[f32], m: f32, s: f32) -> (f64, f64) {
    let (mut sd, mut sdx) = ([0.0f64; 8], [0.0f64; 8]);
    let (xc, dc) = (x.chunks_exact(8), dy.chunks_exact(8));
    let (xr, dr) = (xc.remainder(), dc.remainder());
    for (xs, ds) in xc.zip(dc) {
        for l in 0..8 {
            sd[l] += ds[l] as f64;
            sdx[l] += ds[l] as f64 * ((xs[l] - m) * s) as f64;
        }
    }
    for (&xv, &d) in xr.iter().zip(dr) {
        sd[0] += d as f64;
        sdx[0] += d as f64 * ((xv - m) * s) as f64;
    }
    (sd.iter().sum(), sdx.iter().sum())
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// [`super::sum8`] compiled for AVX-512.
    ///
    /// # Safety
    /// AVX-512F present.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn sum8_avx512(p: &[f32], f: impl Fn(f32) -> f64) -> f64 {
        super::sum8_body(p, f)
    }

    /// [`super::sum8`] compiled for AVX2.
    ///
    /// # Safety
    /// AVX2 present.
    #[target_feature(enable = "avx2")]
    pub unsafe fn sum8_avx2(p: &[f32], f: impl Fn(f32) -> f64) -> f64 {
        super::sum8_body(p, f)
    }

    /// [`super::bn_gradient_sums`] compiled for AVX-512.
    ///
    /// # Safety
    /// AVX-512F present.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn bn_gradient_sums_avx512(x: &[f32], dy: &[f32], m: f32, s: f32) -> (f64, f64) {
        super::bn_gradient_sums_body(x, dy, m, s)
    }

    /// [`super::bn_gradient_sums`] compiled for AVX2.
    ///
    /// # Safety
    /// AVX2 present.
    #[target_feature(enable = "avx2")]
    pub unsafe fn bn_gradient_sums_avx2(x: &[f32], dy: &[f32], m: f32, s: f32) -> (f64, f64) {
        super::bn_gradient_sums_body(x, dy, m, s)
    }

    /// One tile of [`super::dot_lanes`]: `ni × nj` lane sets, dispatched to a fixed-size kernel.
    ///
    /// # Safety
    /// As [`super::dot_lanes`]' call: `dy` rows `i · ldy`, `i < ni`, and `b + off[j]`,
    /// `j < nj`, hold `len` values; `acc + i · lda + j · 16` holds 16 values.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn dot_tile(
        isa: super::Isa,
        ni: usize,
        nj: usize,
        len: usize,
        dy: *const f32,
        ldy: usize,
        b: *const f32,
        off: *const usize,
        acc: *mut f32,
        lda: usize,
    ) {
        macro_rules! go {
            ($f:ident, $($i:literal, $j:literal);*) => {
                match (ni, nj) {
                    $(($i, $j) => $f::<$i, $j>(len, dy, ldy, b, off, acc, lda),)*
                    _ => unreachable!("tile {ni}x{nj}"),
                }
            };
        }
        if isa == super::Isa::Avx512 {
            go!(dot512, 1,1; 1,2; 1,3; 1,4; 1,5; 1,6; 2,1; 2,2; 2,3; 2,4; 2,5; 2,6;
                3,1; 3,2; 3,3; 3,4; 3,5; 3,6; 4,1; 4,2; 4,3; 4,4; 4,5; 4,6)
        } else {
            go!(dot256, 1,1; 1,2; 2,1; 2,2)
        }
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn dot512<const I: usize, const J: usize>(
        len: usize,
        dy: *const f32,
        ldy: usize,
        b: *const f32,
        off: *const usize,
        acc: *mut f32,
        lda: usize,
    ) {
        let mut s = [[_mm512_setzero_ps(); J]; I];
        let mut xs = [b; J];
        for (j, x) in xs.iter_mut().enumerate() {
            *x = b.add(*off.add(j));
        }
        for (i, row) in s.iter_mut().enumerate() {
            for (j, v) in row.iter_mut().enumerate() {
                *v = _mm512_loadu_ps(acc.add(i * lda + j * 16));
            }
        }
        let mut q = 0;
        while q < len {
            let d: [__m512; I] = std::array::from_fn(|i| _mm512_loadu_ps(dy.add(i * ldy + q)));
            for j in 0..J {
                let x = _mm512_loadu_ps(xs[j].add(q));
                for i in 0..I {
                    s[i][j] = _mm512_fmadd_ps(d[i], x, s[i][j]);
                }
            }
            q += 16;
        }
        for (i, row) in s.iter().enumerate() {
            for (j, v) in row.iter().enumerate() {
                _mm512_storeu_ps(acc.add(i * lda + j * 16), *v);
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot256<const I: usize, const J: usize>(
        len: usize,
        dy: *const f32,
        ldy: usize,
        b: *const f32,
        off: *const usize,
        acc: *mut f32,
        lda: usize,
    ) {
        // Lanes 0–7 and 8–15 of the 16-lane order in two registers each.
        let mut s = [[[_mm256_setzero_ps(); 2]; J]; I];
        let mut xs = [b; J];
        for (j, x) in xs.iter_mut().enumerate() {
            *x = b.add(*off.add(j));
        }
        for (i, row) in s.iter_mut().enumerate() {
            for (j, v) in row.iter_mut().enumerate() {
                v[0] = _mm256_loadu_ps(acc.add(i * lda + j * 16));
                v[1] = _mm256_loadu_ps(acc.add(i * lda + j * 16 + 8));
            }
        }
        let mut q = 0;
        while q < len {
            let d: [[__m256; 2]; I] = std::array::from_fn(|i| {
                [
                    _mm256_loadu_ps(dy.add(i * ldy + q)),
                    _mm256_loadu_ps(dy.add(i * ldy + q + 8)),
                ]
            });
            for j in 0..J {
                let x0 = _mm256_loadu_ps(xs[j].add(q));
                let x1 = _mm256_loadu_ps(xs[j].add(q + 8));
                for i in 0..I {
                    s[i][j][0] = _mm256_fmadd_ps(d[i][0], x0, s[i][j][0]);
                    s[i][j][1] = _mm256_fmadd_ps(d[i][1], x1, s[i][j][1]);
                }
            }
            q += 16;
        }
        for (i, row) in s.iter().enumerate() {
            for (j, v) in row.iter().enumerate() {
                _mm256_storeu_ps(acc.add(i * lda + j * 16), v[0]);
                _mm256_storeu_ps(acc.add(i * lda + j * 16 + 8), v[1]);
            }
        }
    }

    /// `blocks` blocks of 16 values split into 8 even- and 8 odd-indexed ones.
    ///
    /// # Safety
    /// AVX2 present; `src` holds `16 · blocks` values, `even` and `odd` `8 · blocks` each.
    #[target_feature(enable = "avx2")]
    pub unsafe fn deinterleave2_avx2(
        blocks: usize,
        src: *const f32,
        even: *mut f32,
        odd: *mut f32,
    ) {
        for i in 0..blocks {
            let lo = _mm256_loadu_ps(src.add(16 * i));
            let hi = _mm256_loadu_ps(src.add(16 * i + 8));
            // [l0 l2 h0 h2 | l4 l6 h4 h6], then 64-bit lanes reordered 0 2 1 3.
            let e = _mm256_shuffle_ps::<0b10_00_10_00>(lo, hi);
            let o = _mm256_shuffle_ps::<0b11_01_11_01>(lo, hi);
            let e = _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(e)));
            let o = _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(o)));
            _mm256_storeu_ps(even.add(8 * i), e);
            _mm256_storeu_ps(odd.add(8 * i), o);
        }
    }

    /// [`avx2_6x16`] with its first `m` rows (1 to 6).
    ///
    /// # Safety
    /// As [`avx2_6x16`], with `c` rows `i < m`.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn avx2_tile(
        m: usize,
        k: usize,
        a: *const f32,
        b: *const f32,
        off: *const usize,
        pieces: [usize; 2],
        c: *mut f32,
        ldc: usize,
        bias: *const f32,
        add: bool,
    ) {
        let run = match m {
            1 => avx2_6x16::<1>,
            2 => avx2_6x16::<2>,
            3 => avx2_6x16::<3>,
            4 => avx2_6x16::<4>,
            5 => avx2_6x16::<5>,
            _ => avx2_6x16::<6>,
        };
        run(k, a, b, off, pieces, c, ldc, bias, add)
    }

    /// [`avx512_8x48`] with its first `m` rows (1 to 8), pieces of 8 values with `half`.
    ///
    /// # Safety
    /// As [`avx512_8x48`], with `c` rows `i < m`.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn avx512_tile(
        m: usize,
        half: bool,
        k: usize,
        a: *const f32,
        b: *const f32,
        off: *const usize,
        pieces: [usize; 6],
        c: *mut f32,
        ldc: usize,
        bias: *const f32,
        add: bool,
    ) {
        macro_rules! by_rows {
            ($half:literal) => {
                match m {
                    1 => avx512_8x48::<1, $half>,
                    2 => avx512_8x48::<2, $half>,
                    3 => avx512_8x48::<3, $half>,
                    4 => avx512_8x48::<4, $half>,
                    5 => avx512_8x48::<5, $half>,
                    6 => avx512_8x48::<6, $half>,
                    7 => avx512_8x48::<7, $half>,
                    _ => avx512_8x48::<8, $half>,
                }
            };
        }
        let run = if half {
            by_rows!(true)
        } else {
            by_rows!(false)
        };
        run(k, a, b, off, pieces, c, ldc, bias, add)
    }

    /// 6 × 16 tile, 12 ymm accumulators (its first `M` rows: `2M`); the two 8-value pieces at
    /// `pieces`.
    ///
    /// # Safety
    /// AVX2 and FMA present; `a` holds `k · 6` values, every `b + off[r] + pieces[v]` holds 8,
    /// `c` rows `i · ldc`, `i < M`, hold 16; `bias` is null or holds 6.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn avx2_6x16<const M: usize>(
        k: usize,
        a: *const f32,
        b: *const f32,
        off: *const usize,
        pieces: [usize; 2],
        c: *mut f32,
        ldc: usize,
        bias: *const f32,
        add: bool,
    ) {
        let mut acc = [[_mm256_setzero_ps(); 2]; M];
        if !bias.is_null() {
            for (i, row) in acc.iter_mut().enumerate() {
                let v = _mm256_set1_ps(*bias.add(i));
                *row = [v, v];
            }
        }
        let (b0p, b1p) = (b.add(pieces[0]), b.add(pieces[1]));
        for r in 0..k {
            let o = *off.add(r);
            let b0 = _mm256_loadu_ps(b0p.add(o));
            let b1 = _mm256_loadu_ps(b1p.add(o));
            let ar = a.add(r * 6);
            for (i, row) in acc.iter_mut().enumerate() {
                let x = _mm256_broadcast_ss(&*ar.add(i));
                row[0] = _mm256_fmadd_ps(x, b0, row[0]);
                row[1] = _mm256_fmadd_ps(x, b1, row[1]);
            }
        }
        for (i, row) in acc.iter().enumerate() {
            let ci = c.add(i * ldc);
            for (v, &x) in row.iter().enumerate() {
                let x = if add {
                    _mm256_add_ps(_mm256_loadu_ps(ci.add(8 * v)), x)
                } else {
                    x
                };
                _mm256_storeu_ps(ci.add(8 * v), x);
            }
        }
    }

    /// 8 × 48 tile, 24 zmm accumulators (its first `M` rows: `3M`). Pieces of 16 values at `pieces[..3]`, or with `HALF`
    /// of 8 values at `pieces[..6]` (two joined per register).
    ///
    /// # Safety
    /// AVX-512F present; `a` holds `k · 8` values, every `b + off[r] + pieces[v]` holds a
    /// piece, `c` rows `i · ldc`, `i < M`, hold 48; `bias` is null or holds 8.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn avx512_8x48<const M: usize, const HALF: bool>(
        k: usize,
        a: *const f32,
        b: *const f32,
        off: *const usize,
        pieces: [usize; 6],
        c: *mut f32,
        ldc: usize,
        bias: *const f32,
        add: bool,
    ) {
        let mut acc = [[_mm512_setzero_ps(); 3]; M];
        if !bias.is_null() {
            for (i, row) in acc.iter_mut().enumerate() {
                let v = _mm512_set1_ps(*bias.add(i));
                *row = [v, v, v];
            }
        }
        let p: [*const f32; 6] = [
            b.add(pieces[0]),
            b.add(pieces[1]),
            b.add(pieces[2]),
            b.add(pieces[3]),
            b.add(pieces[4]),
            b.add(pieces[5]),
        ];
        for r in 0..k {
            let o = *off.add(r);
            let (b0, b1, b2) = if HALF {
                let join = |lo: *const f32, hi: *const f32| {
                    let lo = _mm512_castps256_ps512(_mm256_loadu_ps(lo));
                    let hi = _mm256_castps_pd(_mm256_loadu_ps(hi));
                    _mm512_castpd_ps(_mm512_insertf64x4::<1>(_mm512_castps_pd(lo), hi))
                };
                (
                    join(p[0].add(o), p[1].add(o)),
                    join(p[2].add(o), p[3].add(o)),
                    join(p[4].add(o), p[5].add(o)),
                )
            } else {
                (
                    _mm512_loadu_ps(p[0].add(o)),
                    _mm512_loadu_ps(p[1].add(o)),
                    _mm512_loadu_ps(p[2].add(o)),
                )
            };
            let ar = a.add(r * 8);
            for (i, row) in acc.iter_mut().enumerate() {
                let x = _mm512_set1_ps(*ar.add(i));
                row[0] = _mm512_fmadd_ps(x, b0, row[0]);
                row[1] = _mm512_fmadd_ps(x, b1, row[1]);
                row[2] = _mm512_fmadd_ps(x, b2, row[2]);
            }
        }
        for (i, row) in acc.iter().enumerate() {
            let ci = c.add(i * ldc);
            for (v, &x) in row.iter().enumerate() {
                let x = if add {
                    _mm512_add_ps(_mm512_loadu_ps(ci.add(16 * v)), x)
                } else {
                    x
                };
                _mm512_storeu_ps(ci.add(16 * v), x);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::kernels::tests::pattern;
    use super::*;

    #[test]
    fn every_path_gives_the_same_bits_as_the_definition() {
        let (m, k) = (13, 37);
        let a = pattern(m * k, 0);
        let b = pattern(4000, 1);
        // Rows of B at scattered offsets, some overlapping.
        let off: Vec<usize> = (0..k).map(|r| (r * 71) % 900).collect();
        let mut reference: Option<Vec<f32>> = None;
        for isa in [Isa::Portable, Isa::Avx2, Isa::Avx512] {
            if !isa.supported() {
                continue;
            }
            let (mr, nr) = (isa.mr(), isa.nr());
            let cols = 96; // a multiple of every NR
            let mut ap = Vec::new();
            pack_a(&a, k, m, k, mr, &mut ap);
            let panels = m.div_ceil(mr);
            let mut c = vec![f32::NAN; panels * mr * cols];
            let (mut pieces, mut dst) = (Vec::new(), Vec::new());
            consecutive(isa, 8, 5, cols / nr, &mut pieces, &mut dst);
            let tiles = Tiles {
                piece: 8,
                pieces: &pieces,
                dst: &dst,
            };
            gemm(isa, m, k, &ap, &b, &off, &tiles, &mut c, cols, None, false);
            let got: Vec<f32> = (0..m)
                .flat_map(|i| c[i * cols..(i + 1) * cols].to_vec())
                .collect();
            // The definition, in the same order.
            for i in 0..m {
                for j in 0..cols {
                    let mut s = 0.0f32;
                    for r in 0..k {
                        s = a[i * k + r].mul_add(b[off[r] + 5 + j], s);
                    }
                    assert_eq!(
                        got[i * cols + j].to_bits(),
                        s.to_bits(),
                        "{isa:?} ({i}, {j})"
                    );
                }
            }
            match &reference {
                None => reference = Some(got),
                Some(r) => assert_eq!(r, &got, "{isa:?}"),
            }
        }
    }

    #[test]
    fn force_refuses_nothing_it_can_run_and_restores() {
        assert!(force(Some(Isa::Portable)).is_ok());
        assert_eq!(active(), Isa::Portable);
        force(None).unwrap();
        assert_eq!(active(), detected());
    }
}
