//! Viscous Burgers equation in 1-D, `∂u/∂t + u ∂u/∂x = ν ∂²u/∂x²`, periodic on `[0, L)`.
//!
//! Two schemes ([`Burgers1dScheme`]):
//! - `SemiLagrangian`: the 2-D scheme of [`crate::burgers`] in 1-D — advection to the departure
//!   point `x − Δt·u(x)` with linear interpolation, then exact spectral diffusion
//!   `exp(−(2πk/L)²νΔt)`. First order in Δt (operator splitting, first-order backtrace).
//! - `PseudoSpectral`: Fourier collocation with 2/3 dealiasing of `−∂(u²/2)/∂x`, diffusion by
//!   integrating factor, Lawson RK4 in time. Fourth order in Δt, spectral in space.
//!
//! The grid is cell-centred like [`crate::grid`]: sample `j` sits at `(j + ½)L/n`.

use std::f64::consts::PI;

use ndarray::{Array1, ArrayView1};
use realfft::num_complex::Complex64;
use serde::{Deserialize, Serialize};

use crate::burgers::{check_cfl_bound, check_finite_min};
use crate::error::{Error, Result};
use crate::fft::{check_grid_size, derivative_wavenumber, Fft1};
use crate::grid::{all_finite, max_abs};
use crate::solver::Solver;
use crate::stepping::lawson_rk4;

/// How [`Burgers1d`] takes a step.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Burgers1dScheme {
    /// Semi-Lagrangian advection + exact spectral diffusion (the 2-D Burgers scheme in 1-D).
    #[default]
    SemiLagrangian,
    /// Dealiased pseudo-spectral, integrating-factor RK4.
    PseudoSpectral,
}

/// Parameters of [`Burgers1d`] (the grid size is given separately).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Burgers1dParams {
    /// Viscosity ν (default 0.1).
    pub viscosity: f64,
    /// Time step Δt (default 0.01).
    pub dt: f64,
    /// Domain length L (default 2π).
    pub domain_length: f64,
    /// Largest CFL number `Δt·max|u|/Δx` (default 1).
    pub max_cfl: f64,
    /// Stated bound on `|u|`, checked against `max_cfl` at construction (default 1).
    pub velocity_bound: f64,
    /// The scheme (default semi-Lagrangian).
    pub scheme: Burgers1dScheme,
}

impl Default for Burgers1dParams {
    fn default() -> Self {
        Self {
            viscosity: 0.1,
            dt: 0.01,
            domain_length: 2.0 * PI,
            max_cfl: 1.0,
            velocity_bound: 1.0,
            scheme: Burgers1dScheme::SemiLagrangian,
        }
    }
}

/// The 1-D viscous Burgers solver; see the [module docs](self). State: `n` values of `u`.
#[derive(Clone, Debug)]
pub struct Burgers1d {
    params: Burgers1dParams,
    size: usize,
    spacing: f64,
    fft: Fft1,
    /// `exp(−νK²Δt)` per mode (semi-Lagrangian) or `exp(−νK²Δt/2)` (pseudo-spectral).
    decay: Array1<f64>,
    /// `iK` per mode with the Nyquist mode zeroed and, for the pseudo-spectral scheme, every
    /// mode above 2/3 of the resolved range zeroed.
    derivative: Array1<Complex64>,
}

impl Burgers1d {
    /// A solver on `size` cells; fails on bad parameters, a size the FFT cannot take, or a
    /// `velocity_bound` whose CFL number exceeds `max_cfl`.
    pub fn new(params: &Burgers1dParams, size: usize) -> Result<Self> {
        check_finite_min("viscosity", params.viscosity, 0.0, true)?;
        check_finite_min("dt", params.dt, 0.0, false)?;
        check_finite_min("domain_length", params.domain_length, 0.0, false)?;
        check_finite_min("max_cfl", params.max_cfl, 0.0, false)?;
        check_finite_min("velocity_bound", params.velocity_bound, 0.0, true)?;
        check_grid_size("Burgers 1-D grid", size)?;
        let spacing = params.domain_length / size as f64;
        check_cfl_bound(params.velocity_bound, params.dt, spacing, params.max_cfl)?;
        let fft = Fft1::new(size)?;
        let modes = size / 2 + 1;
        let to_angular = 2.0 * PI / params.domain_length;
        let decay_time = match params.scheme {
            Burgers1dScheme::SemiLagrangian => params.dt,
            Burgers1dScheme::PseudoSpectral => 0.5 * params.dt,
        };
        let decay = Array1::from_shape_fn(modes, |k| {
            let wavenumber = to_angular * k as f64;
            (-params.viscosity * wavenumber * wavenumber * decay_time).exp()
        });
        let cutoff = size as f64 / 3.0;
        let derivative = Array1::from_shape_fn(modes, |k| {
            let dealiased = params.scheme == Burgers1dScheme::PseudoSpectral && k as f64 > cutoff;
            let wavenumber = if dealiased {
                0.0
            } else {
                derivative_wavenumber(k, size)
            };
            Complex64::new(0.0, to_angular * wavenumber)
        });
        Ok(Self {
            params: params.clone(),
            size,
            spacing,
            fft,
            decay,
            derivative,
        })
    }

    /// Grid size n.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Cell-centre coordinates `(j + ½)L/n`.
    pub fn coordinates(&self) -> Array1<f64> {
        Array1::from_shape_fn(self.size, |j| (j as f64 + 0.5) * self.spacing)
    }

    /// The parameters.
    pub fn params(&self) -> &Burgers1dParams {
        &self.params
    }

    fn check_state(&self, state: &Array1<f64>, step: usize) -> Result<()> {
        if state.len() != self.size {
            return Err(Error::Shape {
                what: "Burgers 1-D state",
                expected: vec![self.size],
                found: vec![state.len()],
            });
        }
        if !all_finite(state.iter()) {
            return Err(Error::NonFinite {
                simulation: None,
                step,
                field: "input velocity",
            });
        }
        let max_speed = max_abs(state.iter());
        crate::solver::check_cfl(
            step,
            max_speed,
            self.params.dt,
            self.spacing,
            self.params.max_cfl,
        )
    }

    fn semi_lagrangian_step(&self, state: ArrayView1<'_, f64>) -> Result<Array1<f64>> {
        let n = self.size;
        let cells_per_time = self.params.dt / self.spacing;
        let advected = Array1::from_shape_fn(n, |j| {
            let departure = j as f64 - cells_per_time * state[j];
            let floor = departure.floor();
            let weight = departure - floor;
            let left = (floor as i64).rem_euclid(n as i64) as usize;
            (1.0 - weight) * state[left] + weight * state[(left + 1) % n]
        });
        let spectrum = self.fft.forward(advected.view())? * &self.decay;
        self.fft.inverse(spectrum.view())
    }

    /// `−∂(u²/2)/∂x` in spectral space, dealiased.
    fn advection_term(&self, spectrum: &Array1<Complex64>) -> Result<Array1<Complex64>> {
        let dealiased = Array1::from_shape_fn(spectrum.len(), |k| {
            if k as f64 > self.size as f64 / 3.0 {
                Complex64::new(0.0, 0.0)
            } else {
                spectrum[k]
            }
        });
        let velocity = self.fft.inverse(dealiased.view())?;
        let half_square = velocity.mapv(|u| 0.5 * u * u);
        let flux = self.fft.forward(half_square.view())?;
        Ok(Array1::from_shape_fn(flux.len(), |k| {
            -self.derivative[k] * flux[k]
        }))
    }

    fn pseudo_spectral_step(&self, state: ArrayView1<'_, f64>) -> Result<Array1<f64>> {
        let spectrum = self.fft.forward(state)?;
        let next = lawson_rk4(&spectrum, &self.decay, self.params.dt, |s| {
            self.advection_term(s)
        })?;
        self.fft.inverse(next.view())
    }
}

impl Solver for Burgers1d {
    type State = Array1<f64>;

    fn dt(&self) -> f64 {
        self.params.dt
    }

    fn step(&self, state: &Array1<f64>, step: usize) -> Result<Array1<f64>> {
        self.check_state(state, step)?;
        let next = match self.params.scheme {
            Burgers1dScheme::SemiLagrangian => self.semi_lagrangian_step(state.view())?,
            Burgers1dScheme::PseudoSpectral => self.pseudo_spectral_step(state.view())?,
        };
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
