//! Real FFTs on periodic grids, and the wavenumber conventions every solver shares.
//!
//! A field on an `n_y × n_x` grid (`[y, x]` indexing) transforms to a half spectrum of shape
//! `n_y × (n_x/2 + 1)`: rows with `realfft`, then columns with `rustfft`. The inverse is
//! normalised, so `inverse(forward(f)) == f` to round-off. Index `i` along an axis of length `n`
//! stands for the integer wavenumber [`signed_wavenumber`]`(i, n)` (cycles per domain length).

use std::sync::Arc;

use ndarray::{Array1, Array2, ArrayView1, ArrayView2};
use realfft::num_complex::Complex64;
use realfft::{ComplexToReal, RealFftPlanner, RealToComplex};
use rustfft::{Fft, FftPlanner};

use crate::error::{Error, Result};

/// Smallest grid size the solvers accept along an axis.
pub const MIN_GRID_SIZE: usize = 4;

/// The integer wavenumber of index `i` on an axis of length `n`: `i` for `i ≤ n/2`, else `i − n`.
pub fn signed_wavenumber(i: usize, n: usize) -> i64 {
    if i <= n / 2 {
        i as i64
    } else {
        i as i64 - n as i64
    }
}

/// The wavenumber to use for a first derivative: like [`signed_wavenumber`], but 0 at the Nyquist
/// index `n/2`, whose derivative a real field cannot represent.
pub fn derivative_wavenumber(i: usize, n: usize) -> f64 {
    if i == n / 2 {
        0.0
    } else {
        signed_wavenumber(i, n) as f64
    }
}

/// Checks that `size` is even and at least [`MIN_GRID_SIZE`].
pub fn check_grid_size(what: &'static str, size: usize) -> Result<()> {
    let reason = if size == 0 {
        "it is zero"
    } else if size % 2 == 1 {
        "it is odd, and the spectral solvers need a Nyquist index"
    } else if size < MIN_GRID_SIZE {
        "it is below the minimum"
    } else {
        return Ok(());
    };
    Err(Error::GridSize {
        what,
        size,
        minimum: MIN_GRID_SIZE,
        reason: reason.to_string(),
    })
}

/// Forward and inverse real FFTs of one 2-D grid size.
#[derive(Clone)]
pub struct Fft2 {
    ny: usize,
    nx: usize,
    row_forward: Arc<dyn RealToComplex<f64>>,
    row_inverse: Arc<dyn ComplexToReal<f64>>,
    column_forward: Arc<dyn Fft<f64>>,
    column_inverse: Arc<dyn Fft<f64>>,
}

impl std::fmt::Debug for Fft2 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Fft2({}×{})", self.ny, self.nx)
    }
}

impl Fft2 {
    /// Plans the transforms of an `ny × nx` grid; both sizes must pass [`check_grid_size`].
    pub fn new(ny: usize, nx: usize) -> Result<Self> {
        check_grid_size("FFT grid (rows)", ny)?;
        check_grid_size("FFT grid (columns)", nx)?;
        let mut real_planner = RealFftPlanner::<f64>::new();
        let mut planner = FftPlanner::<f64>::new();
        Ok(Self {
            ny,
            nx,
            row_forward: real_planner.plan_fft_forward(nx),
            row_inverse: real_planner.plan_fft_inverse(nx),
            column_forward: planner.plan_fft_forward(ny),
            column_inverse: planner.plan_fft_inverse(ny),
        })
    }

    /// Grid shape `(ny, nx)`.
    pub fn shape(&self) -> (usize, usize) {
        (self.ny, self.nx)
    }

    /// Shape of the half spectrum, `(ny, nx/2 + 1)`.
    pub fn spectrum_shape(&self) -> (usize, usize) {
        (self.ny, self.nx / 2 + 1)
    }

    /// Unnormalised forward transform of a field of shape `(ny, nx)`.
    pub fn forward(&self, field: ArrayView2<'_, f64>) -> Result<Array2<Complex64>> {
        self.check_shape("field", field.dim(), (self.ny, self.nx))?;
        let columns = self.nx / 2 + 1;
        let mut row_in = vec![0.0; self.nx];
        let mut row_out = vec![Complex64::new(0.0, 0.0); columns];
        // Transposed spectrum: one contiguous run of `ny` values per column.
        let mut transposed = vec![Complex64::new(0.0, 0.0); columns * self.ny];
        for (y, row) in field.outer_iter().enumerate() {
            for (dst, src) in row_in.iter_mut().zip(row.iter()) {
                *dst = *src;
            }
            self.row_forward
                .process(&mut row_in, &mut row_out)
                .map_err(|e| fft_failure(e.to_string()))?;
            for (kx, value) in row_out.iter().enumerate() {
                transposed[kx * self.ny + y] = *value;
            }
        }
        self.column_forward.process(&mut transposed);
        Ok(Array2::from_shape_fn((self.ny, columns), |(ky, kx)| {
            transposed[kx * self.ny + ky]
        }))
    }

    /// Normalised inverse transform of a half spectrum of shape `(ny, nx/2 + 1)`.
    ///
    /// The imaginary parts the real field cannot hold (the `kx = 0` and Nyquist columns after
    /// the column transform) are dropped, i.e. the spectrum is projected onto real fields.
    pub fn inverse(&self, spectrum: ArrayView2<'_, Complex64>) -> Result<Array2<f64>> {
        let columns = self.nx / 2 + 1;
        self.check_shape("spectrum", spectrum.dim(), (self.ny, columns))?;
        let mut transposed = vec![Complex64::new(0.0, 0.0); columns * self.ny];
        for ((ky, kx), value) in spectrum.indexed_iter() {
            transposed[kx * self.ny + ky] = *value;
        }
        self.column_inverse.process(&mut transposed);
        let scale = 1.0 / (self.nx * self.ny) as f64;
        let mut row_in = vec![Complex64::new(0.0, 0.0); columns];
        let mut row_out = vec![0.0; self.nx];
        let mut field = Array2::zeros((self.ny, self.nx));
        for (y, mut out_row) in field.outer_iter_mut().enumerate() {
            for (kx, value) in row_in.iter_mut().enumerate() {
                *value = transposed[kx * self.ny + y];
            }
            row_in[0].im = 0.0;
            row_in[columns - 1].im = 0.0;
            self.row_inverse
                .process(&mut row_in, &mut row_out)
                .map_err(|e| fft_failure(e.to_string()))?;
            for (dst, src) in out_row.iter_mut().zip(row_out.iter()) {
                *dst = src * scale;
            }
        }
        Ok(field)
    }

    fn check_shape(
        &self,
        what: &'static str,
        found: (usize, usize),
        expected: (usize, usize),
    ) -> Result<()> {
        if found == expected {
            Ok(())
        } else {
            Err(Error::Shape {
                what,
                expected: vec![expected.0, expected.1],
                found: vec![found.0, found.1],
            })
        }
    }
}

/// Forward and inverse real FFTs of one 1-D grid size.
#[derive(Clone)]
pub struct Fft1 {
    n: usize,
    forward: Arc<dyn RealToComplex<f64>>,
    inverse: Arc<dyn ComplexToReal<f64>>,
}

impl std::fmt::Debug for Fft1 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Fft1({})", self.n)
    }
}

impl Fft1 {
    /// Plans the transforms of a grid of `n` points; `n` must pass [`check_grid_size`].
    pub fn new(n: usize) -> Result<Self> {
        check_grid_size("FFT grid", n)?;
        let mut planner = RealFftPlanner::<f64>::new();
        Ok(Self {
            n,
            forward: planner.plan_fft_forward(n),
            inverse: planner.plan_fft_inverse(n),
        })
    }

    /// Grid size.
    pub fn len(&self) -> usize {
        self.n
    }

    /// Always false: a planned grid has at least [`MIN_GRID_SIZE`] points.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Unnormalised forward transform; returns `n/2 + 1` coefficients.
    pub fn forward(&self, field: ArrayView1<'_, f64>) -> Result<Array1<Complex64>> {
        if field.len() != self.n {
            return Err(Error::Shape {
                what: "field",
                expected: vec![self.n],
                found: vec![field.len()],
            });
        }
        let mut input: Vec<f64> = field.iter().copied().collect();
        let mut output = vec![Complex64::new(0.0, 0.0); self.n / 2 + 1];
        self.forward
            .process(&mut input, &mut output)
            .map_err(|e| fft_failure(e.to_string()))?;
        Ok(Array1::from(output))
    }

    /// Normalised inverse transform of `n/2 + 1` coefficients (imaginary parts of the
    /// zero and Nyquist coefficients are dropped).
    pub fn inverse(&self, spectrum: ArrayView1<'_, Complex64>) -> Result<Array1<f64>> {
        let columns = self.n / 2 + 1;
        if spectrum.len() != columns {
            return Err(Error::Shape {
                what: "spectrum",
                expected: vec![columns],
                found: vec![spectrum.len()],
            });
        }
        let mut input: Vec<Complex64> = spectrum.iter().copied().collect();
        input[0].im = 0.0;
        input[columns - 1].im = 0.0;
        let mut output = vec![0.0; self.n];
        self.inverse
            .process(&mut input, &mut output)
            .map_err(|e| fft_failure(e.to_string()))?;
        let scale = 1.0 / self.n as f64;
        Ok(output.into_iter().map(|v| v * scale).collect())
    }
}

fn fft_failure(message: String) -> Error {
    Error::InvalidParameter {
        name: "fft buffer",
        value: message,
        expected: "buffers of the planned length (an internal error; please report it)".to_string(),
    }
}
