//! Forced viscous Burgers equation in 2-D, `∂u/∂t + (u·∇)u = ν∇²u + f`, as in
//! Solver-in-the-Loop (Um et al. 2020).
//!
//! Domain `[0, L)²`, periodic, `L = domain_length`, `n × n` cell-centred grid.
//!
//! # Length unit
//!
//! The default `L = 32` follows PhiFlow, which Solver-in-the-Loop used: lengths are measured in
//! cells of the 32² source grid (so the 128² reference has cells of 0.25). With the data set's
//! defaults (Δt = 0.1, ν = 0.1, 20 forcing waves of amplitude ≤ 0.15, initial velocities of
//! rms 1; [`crate::dataset`]) the uncorrected source run drifts from the reference by a mean
//! absolute error of 0.2633 over the 200 steps of the 5 test simulations
//! (`deepzero pde --solver burgers --methods src`; Solver-in-the-Loop's SRC error is 0.180).
//! On the unit square (`L = 1`) the diffusion factor `exp(−4π²|k|²νΔt/L²)` is 0.67 per step
//! already for `|k| = 1`, so viscosity damps every mode strongly and leaves little drift for a
//! correction to learn.
//!
//! One step of Δt is operator split:
//! 1. semi-Lagrangian advection: the velocity advects itself, departure points `x − Δt·u(x)`,
//!    bilinear interpolation ([`crate::grid::advect_semi_lagrangian`]);
//! 2. exact spectral diffusion: every Fourier mode `k` (integer wavenumbers) is multiplied by
//!    `exp(−4π²|k|²νΔt / L²)` — `exp(−4π²|k|²νΔt)` on the unit domain;
//! 3. explicit forcing: `+ Δt·f(t)` with `t = step · Δt`.
//!
//! The same step written with PhiFlow 3.4 (`advect.semi_lagrangian`, `diffuse.fourier` with
//! diffusivity `ν/Δx²`, as PhiFlow's Fourier diffusion counts wavenumbers per cell) agrees with
//! this one to 5e-15 of the state's size after 20 steps on 32² and 128² grids
//! (`tests/known_answers.rs`, fixture from `scripts/burgers_phiflow_fixture.py`).
//!
//! The state is a `[2, n, n]` array: channel 0 is `u` (along x, the last axis), channel 1 is `v`.
//!
//! Semi-Lagrangian advection is stable at any CFL number, so the CFL limit here guards accuracy
//! and blow-ups: a departure point more than `max_cfl` cells upstream is refused. The CFL number
//! is `Δt · max(|u| + |v|) / Δx`.

use std::f64::consts::PI;

use ndarray::{Array2, Array3, ArrayView2, ArrayView3, Axis};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::fft::{check_grid_size, signed_wavenumber, Fft2};
use crate::grid::{advect_semi_lagrangian, all_finite};
use crate::solver::Solver;
use crate::waves::WaveField;

/// Physical and numerical parameters of [`Burgers2d`] (the grid size is given separately).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Burgers2dParams {
    /// Viscosity ν (default 0.1).
    pub viscosity: f64,
    /// Time step Δt (default 0.1).
    pub dt: f64,
    /// Side length L of the periodic domain (default 32: PhiFlow's unit, one cell of the 32²
    /// source grid; see the [module docs](self)).
    pub domain_length: f64,
    /// Largest CFL number a step may take (default 32: departure points at most 32 cells, a
    /// quarter of the 128² reference domain, upstream).
    pub max_cfl: f64,
    /// Stated bound on `|u| + |v|`, checked against `max_cfl` at construction (default 2).
    pub velocity_bound: f64,
}

impl Default for Burgers2dParams {
    fn default() -> Self {
        Self {
            viscosity: 0.1,
            dt: 0.1,
            domain_length: 32.0,
            max_cfl: 32.0,
            velocity_bound: 2.0,
        }
    }
}

impl Burgers2dParams {
    /// Checks every field; errors name the field and its allowed range.
    pub fn validate(&self) -> Result<()> {
        check_finite_min("viscosity", self.viscosity, 0.0, true)?;
        check_finite_min("dt", self.dt, 0.0, false)?;
        check_finite_min("domain_length", self.domain_length, 0.0, false)?;
        check_finite_min("max_cfl", self.max_cfl, 0.0, false)?;
        check_finite_min("velocity_bound", self.velocity_bound, 0.0, true)
    }
}

/// Checks `value` is finite and above `minimum` (or equal, when `inclusive`).
pub(crate) fn check_finite_min(
    name: &'static str,
    value: f64,
    minimum: f64,
    inclusive: bool,
) -> Result<()> {
    let ok = value.is_finite() && (value > minimum || (inclusive && value == minimum));
    if ok {
        Ok(())
    } else {
        let relation = if inclusive { "≥" } else { ">" };
        Err(Error::parameter(
            name,
            value,
            format!("a finite number {relation} {minimum}"),
        ))
    }
}

/// Checks that a stated velocity bound keeps the CFL number within `limit`.
pub(crate) fn check_cfl_bound(
    velocity_bound: f64,
    dt: f64,
    spacing: f64,
    limit: f64,
) -> Result<()> {
    let cfl = velocity_bound * dt / spacing;
    if cfl > limit {
        return Err(Error::CflBound {
            cfl,
            limit,
            velocity_bound,
            dt,
            dx: spacing,
            suggested_dt: limit * spacing / velocity_bound,
        });
    }
    Ok(())
}

/// The 2-D forced viscous Burgers solver; see the [module docs](self).
#[derive(Clone, Debug)]
pub struct Burgers2d {
    params: Burgers2dParams,
    size: usize,
    spacing: f64,
    fft: Fft2,
    diffusion: Array2<f64>,
    forcing: WaveField,
}

impl Burgers2d {
    /// A solver on an `size × size` grid with the given 2-channel forcing
    /// ([`WaveField::zero`]`(2)` for none).
    ///
    /// Fails on bad parameters, a grid size the FFT cannot take or too small for the forcing's
    /// wavenumbers, and a `velocity_bound` whose CFL number exceeds `max_cfl`.
    pub fn new(params: &Burgers2dParams, size: usize, forcing: WaveField) -> Result<Self> {
        params.validate()?;
        check_grid_size("Burgers 2-D grid", size)?;
        forcing.check_for_grid("Burgers 2-D forcing", 2, size)?;
        let spacing = params.domain_length / size as f64;
        check_cfl_bound(params.velocity_bound, params.dt, spacing, params.max_cfl)?;
        let fft = Fft2::new(size, size)?;
        let rate = 4.0 * PI * PI * params.viscosity * params.dt
            / (params.domain_length * params.domain_length);
        let diffusion = Array2::from_shape_fn(fft.spectrum_shape(), |(row, column)| {
            let ky = signed_wavenumber(row, size) as f64;
            let kx = column as f64;
            (-rate * (kx * kx + ky * ky)).exp()
        });
        Ok(Self {
            params: params.clone(),
            size,
            spacing,
            fft,
            diffusion,
            forcing,
        })
    }

    /// Grid size n.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Cell size `L / n`.
    pub fn spacing(&self) -> f64 {
        self.spacing
    }

    /// The parameters.
    pub fn params(&self) -> &Burgers2dParams {
        &self.params
    }

    /// The forcing.
    pub fn forcing(&self) -> &WaveField {
        &self.forcing
    }

    /// The FFT plan of this grid.
    pub fn fft(&self) -> &Fft2 {
        &self.fft
    }

    /// The forcing field `f(step · Δt)` on this grid, `[2, n, n]`.
    pub fn forcing_at(&self, step: usize) -> Result<Array3<f64>> {
        self.forcing
            .evaluate(&self.fft, step as f64 * self.params.dt)
    }

    /// CFL number `Δt · max(|u| + |v|) / Δx` of a state (NaN if the state holds a NaN).
    pub fn cfl_number(&self, state: ArrayView3<'_, f64>) -> f64 {
        let u = state.index_axis(Axis(0), 0);
        let v = state.index_axis(Axis(0), 1);
        let max_speed = u.iter().zip(v.iter()).fold(0.0_f64, |acc, (a, b)| {
            let speed = a.abs() + b.abs();
            if speed.is_nan() || acc.is_nan() {
                f64::NAN
            } else {
                acc.max(speed)
            }
        });
        max_speed * self.params.dt / self.spacing
    }

    /// One step of exact spectral diffusion of a scalar field (stage 2 of the step).
    pub fn diffuse(&self, field: ArrayView2<'_, f64>) -> Result<Array2<f64>> {
        let spectrum = self.fft.forward(field)? * &self.diffusion;
        self.fft.inverse(spectrum.view())
    }

    fn check_state(&self, state: &Array3<f64>, step: usize) -> Result<()> {
        let expected = [2, self.size, self.size];
        if state.shape() != expected {
            return Err(Error::Shape {
                what: "Burgers 2-D state",
                expected: expected.to_vec(),
                found: state.shape().to_vec(),
            });
        }
        if !all_finite(state.iter()) {
            return Err(Error::NonFinite {
                simulation: None,
                step,
                field: "input velocity",
            });
        }
        let max_speed = self.cfl_number(state.view()) * self.spacing / self.params.dt;
        crate::solver::check_cfl(
            step,
            max_speed,
            self.params.dt,
            self.spacing,
            self.params.max_cfl,
        )
    }
}

impl Solver for Burgers2d {
    type State = Array3<f64>;

    fn dt(&self) -> f64 {
        self.params.dt
    }

    fn step(&self, state: &Array3<f64>, step: usize) -> Result<Array3<f64>> {
        self.check_state(state, step)?;
        let u = state.index_axis(Axis(0), 0);
        let v = state.index_axis(Axis(0), 1);
        let advected = advect_semi_lagrangian(&[u, v], u, v, self.params.dt, self.spacing)?;
        let mut spectra = advected
            .iter()
            .map(|component| Ok(self.fft.forward(component.view())? * &self.diffusion))
            .collect::<Result<Vec<_>>>()?;
        let time = step as f64 * self.params.dt;
        self.forcing
            .add_to_spectra(&mut spectra, time, self.params.dt);
        let mut next = Array3::zeros(state.raw_dim());
        for (channel, spectrum) in spectra.iter().enumerate() {
            next.index_axis_mut(Axis(0), channel)
                .assign(&self.fft.inverse(spectrum.view())?);
        }
        if !all_finite(next.iter()) {
            return Err(Error::NonFinite {
                simulation: None,
                step,
                field: "velocity",
            });
        }
        Ok(next)
    }
}
