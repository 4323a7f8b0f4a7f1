//! Periodic-grid operations shared by the solvers: semi-Lagrangian advection with bilinear
//! interpolation, conservative downsampling, and checks on states.
//!
//! Convention: a field is stored `[y, x]` (2-D) or `[channel, y, x]`; sample `(i, j)` is the
//! value at the cell centre `((j + ½)Δx, (i + ½)Δy)` of a periodic domain. Block averaging
//! `factor × factor` fine cells therefore gives exactly the coarse cell whose centre is theirs.

use ndarray::{Array2, Array3, ArrayView2, ArrayView3, Axis};

use crate::error::{Error, Result};

/// Checks that `reference` is a whole multiple (≥ 1) of `source` and returns the factor.
pub fn downsample_factor(reference: usize, source: usize) -> Result<usize> {
    if source == 0 || reference < source || !reference.is_multiple_of(source) {
        return Err(Error::GridRatio {
            reference,
            source_size: source,
            suggestion: source.max(1) * 4,
        });
    }
    Ok(reference / source)
}

/// Conservative downsampling: the mean of each `factor × factor` block of cells.
///
/// The mean of the result equals the mean of `field` (to round-off). Both sides must be
/// divisible by `factor`.
pub fn downsample_block_mean(field: ArrayView2<'_, f64>, factor: usize) -> Result<Array2<f64>> {
    let (ny, nx) = field.dim();
    if factor == 0 || ny % factor != 0 || nx % factor != 0 {
        return Err(Error::parameter(
            "downsampling factor",
            factor,
            format!("a positive integer that divides both sides of the {ny} × {nx} field"),
        ));
    }
    let scale = 1.0 / (factor * factor) as f64;
    Ok(Array2::from_shape_fn(
        (ny / factor, nx / factor),
        |(i, j)| {
            let mut sum = 0.0;
            for fi in 0..factor {
                for fj in 0..factor {
                    sum += field[[i * factor + fi, j * factor + fj]];
                }
            }
            sum * scale
        },
    ))
}

/// [`downsample_block_mean`] on every channel of a `[channel, y, x]` state.
pub fn downsample_channels(state: ArrayView3<'_, f64>, factor: usize) -> Result<Array3<f64>> {
    let (channels, ny, nx) = state.dim();
    let factor_ok = factor > 0 && ny % factor == 0 && nx % factor == 0;
    let mut coarse = Array3::zeros((channels, ny / factor.max(1), nx / factor.max(1)));
    for (index, channel) in state.outer_iter().enumerate() {
        coarse
            .index_axis_mut(Axis(0), index)
            .assign(&downsample_block_mean(channel, factor)?);
    }
    if !factor_ok {
        // Only reachable with zero channels; report the same error as a non-empty state would.
        downsample_block_mean(Array2::<f64>::zeros((ny, nx)).view(), factor)?;
    }
    Ok(coarse)
}

/// Semi-Lagrangian advection of `fields` by the velocity `(u, v)` over one step `dt`.
///
/// Each cell takes the value at its departure point `x − Δt·u(x)`, interpolated bilinearly on
/// the periodic grid. `spacing` is the cell size (same in x and y). All arrays must share one
/// shape. When `Δt·u/Δx` and `Δt·v/Δx` are whole numbers the result is an exact shift.
pub fn advect_semi_lagrangian(
    fields: &[ArrayView2<'_, f64>],
    u: ArrayView2<'_, f64>,
    v: ArrayView2<'_, f64>,
    dt: f64,
    spacing: f64,
) -> Result<Vec<Array2<f64>>> {
    let shape = u.dim();
    check_shapes(
        shape,
        std::iter::once(("v", v.dim())).chain(fields.iter().map(|f| ("advected field", f.dim()))),
    )?;
    let (ny, nx) = shape;
    let cells_per_time = dt / spacing;
    let mut outputs = vec![Array2::zeros(shape); fields.len()];
    let slices: Option<Vec<&[f64]>> = fields.iter().map(|f| f.as_slice()).collect();
    if let (Some(slices), Some(us), Some(vs)) = (slices, u.as_slice(), v.as_slice()) {
        // Row-major slices: the same arithmetic without per-index bounds checks.
        let mut outs: Vec<&mut [f64]> = outputs
            .iter_mut()
            .map(|o| o.as_slice_mut().expect("a fresh array is contiguous"))
            .collect();
        for i in 0..ny {
            for j in 0..nx {
                let at = i * nx + j;
                let departure_y = i as f64 - cells_per_time * vs[at];
                let departure_x = j as f64 - cells_per_time * us[at];
                let stencil = BilinearStencil::new(departure_y, departure_x, ny, nx);
                for (field, output) in slices.iter().zip(outs.iter_mut()) {
                    output[at] = stencil.sample_slice(field, nx);
                }
            }
        }
        return Ok(outputs);
    }
    for i in 0..ny {
        for j in 0..nx {
            let departure_y = i as f64 - cells_per_time * v[[i, j]];
            let departure_x = j as f64 - cells_per_time * u[[i, j]];
            let stencil = BilinearStencil::new(departure_y, departure_x, ny, nx);
            for (field, output) in fields.iter().zip(outputs.iter_mut()) {
                output[[i, j]] = stencil.sample(field);
            }
        }
    }
    Ok(outputs)
}

/// Checks that every named 2-D shape equals `shape`.
fn check_shapes(
    shape: (usize, usize),
    named: impl IntoIterator<Item = (&'static str, (usize, usize))>,
) -> Result<()> {
    for (what, dim) in named {
        if dim != shape {
            return Err(Error::Shape {
                what,
                expected: vec![shape.0, shape.1],
                found: vec![dim.0, dim.1],
            });
        }
    }
    Ok(())
}

/// Cotangents of [`advect_semi_lagrangian`]'s inputs: `(fields, u, v)`.
pub type AdvectionCotangents = (Vec<Array2<f64>>, Array2<f64>, Array2<f64>);

/// The reverse-mode derivative of [`advect_semi_lagrangian`] when the velocity is advected
/// too: given the advected fields' cotangents `d_outputs` (one per field), returns the
/// cotangents of the fields and, through the departure points, of `u` and `v`.
///
/// Each output `q(i, j)` is a bilinear blend of four neighbours of the departure point
/// `(i − a·v, j − a·u)`, `a = Δt/Δx`; its derivative moves the cotangent back to those
/// neighbours with the same weights, and to `u(i, j)`, `v(i, j)` by the blend's slope times
/// `−a`. The floor that picks the neighbours is piecewise constant, so this is the exact
/// derivative everywhere but on cell boundaries (a set of measure zero).
///
/// Returns `(d_fields, d_u, d_v)`; a field that is also the velocity gets both parts by the
/// caller adding them.
pub fn advect_semi_lagrangian_vjp(
    fields: &[ArrayView2<'_, f64>],
    u: ArrayView2<'_, f64>,
    v: ArrayView2<'_, f64>,
    dt: f64,
    spacing: f64,
    d_outputs: &[ArrayView2<'_, f64>],
) -> Result<AdvectionCotangents> {
    let shape = u.dim();
    check_shapes(
        shape,
        std::iter::once(("v", v.dim()))
            .chain(fields.iter().map(|f| ("advected field", f.dim())))
            .chain(d_outputs.iter().map(|f| ("cotangent", f.dim()))),
    )?;
    if d_outputs.len() != fields.len() {
        return Err(Error::Shape {
            what: "cotangents of the advected fields",
            expected: vec![fields.len()],
            found: vec![d_outputs.len()],
        });
    }
    let (ny, nx) = shape;
    let cells_per_time = dt / spacing;
    let mut d_fields = vec![Array2::zeros(shape); fields.len()];
    let mut d_u = Array2::zeros(shape);
    let mut d_v = Array2::zeros(shape);
    for i in 0..ny {
        for j in 0..nx {
            let departure_y = i as f64 - cells_per_time * v[[i, j]];
            let departure_x = j as f64 - cells_per_time * u[[i, j]];
            let s = BilinearStencil::new(departure_y, departure_x, ny, nx);
            let [r0, r1] = s.rows;
            let [c0, c1] = s.columns;
            let (wy, wx) = (s.weight_y, s.weight_x);
            let mut slope_x = 0.0;
            let mut slope_y = 0.0;
            for ((field, d_field), d_out) in fields.iter().zip(d_fields.iter_mut()).zip(d_outputs) {
                let g = d_out[[i, j]];
                if g == 0.0 {
                    continue;
                }
                d_field[[r0, c0]] += (1.0 - wy) * (1.0 - wx) * g;
                d_field[[r0, c1]] += (1.0 - wy) * wx * g;
                d_field[[r1, c0]] += wy * (1.0 - wx) * g;
                d_field[[r1, c1]] += wy * wx * g;
                let top = (1.0 - wx) * field[[r0, c0]] + wx * field[[r0, c1]];
                let bottom = (1.0 - wx) * field[[r1, c0]] + wx * field[[r1, c1]];
                slope_y += g * (bottom - top);
                slope_x += g
                    * ((1.0 - wy) * (field[[r0, c1]] - field[[r0, c0]])
                        + wy * (field[[r1, c1]] - field[[r1, c0]]));
            }
            d_u[[i, j]] = -cells_per_time * slope_x;
            d_v[[i, j]] = -cells_per_time * slope_y;
        }
    }
    Ok((d_fields, d_u, d_v))
}

/// `i` modulo `n` in `0..n`: one compare for the usual index less than a period outside the
/// grid, the division only beyond that.
fn wrap_index(i: i64, n: usize) -> usize {
    let n = n as i64;
    let wrapped = if (0..n).contains(&i) {
        i
    } else if (-n..0).contains(&i) {
        i + n
    } else if (n..2 * n).contains(&i) {
        i - n
    } else {
        i.rem_euclid(n)
    };
    wrapped as usize
}

/// The four neighbours and weights of one periodic bilinear interpolation.
struct BilinearStencil {
    rows: [usize; 2],
    columns: [usize; 2],
    weight_y: f64,
    weight_x: f64,
}

impl BilinearStencil {
    fn new(position_y: f64, position_x: f64, ny: usize, nx: usize) -> Self {
        let floor_y = position_y.floor();
        let floor_x = position_x.floor();
        let row = wrap_index(floor_y as i64, ny);
        let column = wrap_index(floor_x as i64, nx);
        Self {
            rows: [row, if row + 1 == ny { 0 } else { row + 1 }],
            columns: [column, if column + 1 == nx { 0 } else { column + 1 }],
            weight_y: position_y - floor_y,
            weight_x: position_x - floor_x,
        }
    }

    /// [`BilinearStencil::sample`] on a row-major slice of rows of `nx` values.
    fn sample_slice(&self, field: &[f64], nx: usize) -> f64 {
        let [r0, r1] = self.rows;
        let [c0, c1] = self.columns;
        let (row0, row1) = (&field[r0 * nx..][..nx], &field[r1 * nx..][..nx]);
        let top = (1.0 - self.weight_x) * row0[c0] + self.weight_x * row0[c1];
        let bottom = (1.0 - self.weight_x) * row1[c0] + self.weight_x * row1[c1];
        (1.0 - self.weight_y) * top + self.weight_y * bottom
    }

    fn sample(&self, field: &ArrayView2<'_, f64>) -> f64 {
        let [r0, r1] = self.rows;
        let [c0, c1] = self.columns;
        let top = (1.0 - self.weight_x) * field[[r0, c0]] + self.weight_x * field[[r0, c1]];
        let bottom = (1.0 - self.weight_x) * field[[r1, c0]] + self.weight_x * field[[r1, c1]];
        (1.0 - self.weight_y) * top + self.weight_y * bottom
    }
}

/// Largest absolute value (0 for an empty array; NaN propagates as NaN).
pub fn max_abs<'a>(values: impl IntoIterator<Item = &'a f64>) -> f64 {
    values.into_iter().fold(0.0_f64, |acc, &v| {
        if v.is_nan() || acc.is_nan() {
            f64::NAN
        } else {
            acc.max(v.abs())
        }
    })
}

/// True when every value is finite.
pub fn all_finite<'a>(values: impl IntoIterator<Item = &'a f64>) -> bool {
    values.into_iter().all(|v| v.is_finite())
}
