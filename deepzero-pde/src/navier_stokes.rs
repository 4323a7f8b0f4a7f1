//! Incompressible Navier–Stokes in 2-D, vorticity–streamfunction form, periodic on `[0, L)²`:
//!
//! `∂ω/∂t + u·∇ω = ν∇²ω − αω + f_ω`, `∇²ψ = −ω`, `u = ∂ψ/∂y`, `v = −∂ψ/∂x`.
//!
//! Pseudo-spectral: the Poisson equation is solved by FFT (`ψ̂ = ω̂/|K|²`, `K = 2πk/L`), the
//! advection term is formed in physical space from dealiased fields and dealiased again by the
//! 2/3 rule (modes with `|kx|` or `|ky| ≥ n/3` are zeroed), and time stepping is integrating-factor
//! RK4 (Lawson) with diffusion and drag integrated exactly. The state is the vorticity on an
//! `n × n` cell-centred grid (`[y, x]`), default `L = 2π`. The CFL number is
//! `Δt · max(|u| + |v|) / Δx`; the default limit 1 is inside RK4's stability interval for the
//! dealiased advection term.

use std::f64::consts::PI;

use ndarray::{Array1, Array2, Array3, ArrayView2, Axis, Zip};
use realfft::num_complex::Complex64;
use serde::{Deserialize, Serialize};

use crate::burgers::{check_cfl_bound, check_finite_min};
use crate::error::{Error, Result};
use crate::fft::{check_grid_size, derivative_wavenumber, signed_wavenumber, Fft2};
use crate::grid::all_finite;
use crate::solver::Solver;
use crate::stepping::lawson_rk4;

/// Kolmogorov forcing: the body force `f = (A sin(2πk_f y/L), 0)`, i.e. the vorticity source
/// `f_ω = −A·(2πk_f/L)·cos(2πk_f y/L)`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KolmogorovForcing {
    /// Amplitude A of the body force.
    pub amplitude: f64,
    /// Wavenumber k_f (cycles per domain length).
    pub wavenumber: i64,
}

/// Parameters of [`NavierStokes2d`] (the grid size is given separately).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NavierStokesParams {
    /// Kinematic viscosity ν (default 1e-3).
    pub viscosity: f64,
    /// Linear drag α (default 0).
    pub drag: f64,
    /// Time step Δt (default 0.01).
    pub dt: f64,
    /// Side length L (default 2π).
    pub domain_length: f64,
    /// Largest CFL number (default 1).
    pub max_cfl: f64,
    /// Stated bound on `|u| + |v|`, checked against `max_cfl` at construction (default 2).
    pub velocity_bound: f64,
    /// Optional Kolmogorov forcing (default none).
    pub forcing: Option<KolmogorovForcing>,
}

impl Default for NavierStokesParams {
    fn default() -> Self {
        Self {
            viscosity: 1e-3,
            drag: 0.0,
            dt: 0.01,
            domain_length: 2.0 * PI,
            max_cfl: 1.0,
            velocity_bound: 2.0,
            forcing: None,
        }
    }
}

impl NavierStokesParams {
    /// Checks every field; errors name the field and its allowed range.
    pub fn validate(&self) -> Result<()> {
        check_finite_min("viscosity", self.viscosity, 0.0, true)?;
        check_finite_min("drag", self.drag, 0.0, true)?;
        check_finite_min("dt", self.dt, 0.0, false)?;
        check_finite_min("domain_length", self.domain_length, 0.0, false)?;
        check_finite_min("max_cfl", self.max_cfl, 0.0, false)?;
        check_finite_min("velocity_bound", self.velocity_bound, 0.0, true)?;
        if let Some(forcing) = &self.forcing {
            if !forcing.amplitude.is_finite() {
                return Err(Error::parameter(
                    "forcing.amplitude",
                    forcing.amplitude,
                    "a finite number",
                ));
            }
            if forcing.wavenumber < 1 {
                return Err(Error::parameter(
                    "forcing.wavenumber",
                    forcing.wavenumber,
                    "an integer ≥ 1",
                ));
            }
        }
        Ok(())
    }
}

/// The 2-D Navier–Stokes solver; see the [module docs](self).
#[derive(Clone, Debug)]
pub struct NavierStokes2d {
    params: NavierStokesParams,
    size: usize,
    spacing: f64,
    fft: Fft2,
    /// `exp(−(ν|K|² + α)Δt/2)` per mode.
    half_decay: Array2<f64>,
    /// `iKx`, `iKy` for first derivatives (Nyquist zeroed).
    derivative_x: Array2<Complex64>,
    derivative_y: Array2<Complex64>,
    /// `1/|K|²`, 0 for the mean mode.
    inverse_laplacian: Array2<f64>,
    /// 1 on modes kept by the 2/3 rule, 0 elsewhere.
    dealias: Array2<f64>,
    forcing_spectrum: Array2<Complex64>,
}

impl NavierStokes2d {
    /// A solver on a `size × size` grid; fails on bad parameters, a size the FFT cannot take,
    /// a forcing wavenumber the grid cannot resolve, or a `velocity_bound` beyond `max_cfl`.
    pub fn new(params: &NavierStokesParams, size: usize) -> Result<Self> {
        params.validate()?;
        check_grid_size("Navier–Stokes grid", size)?;
        let spacing = params.domain_length / size as f64;
        check_cfl_bound(params.velocity_bound, params.dt, spacing, params.max_cfl)?;
        let fft = Fft2::new(size, size)?;
        let shape = fft.spectrum_shape();
        let to_angular = 2.0 * PI / params.domain_length;
        let laplacian = Array2::from_shape_fn(shape, |(row, column)| {
            let ky = to_angular * signed_wavenumber(row, size) as f64;
            let kx = to_angular * column as f64;
            kx * kx + ky * ky
        });
        let half_decay =
            laplacian.mapv(|k2| (-(params.viscosity * k2 + params.drag) * 0.5 * params.dt).exp());
        let inverse_laplacian = laplacian.mapv(|k2| if k2 > 0.0 { 1.0 / k2 } else { 0.0 });
        let derivative_x = Array2::from_shape_fn(shape, |(_, column)| {
            Complex64::new(0.0, to_angular * derivative_wavenumber(column, size))
        });
        let derivative_y = Array2::from_shape_fn(shape, |(row, _)| {
            Complex64::new(0.0, to_angular * derivative_wavenumber(row, size))
        });
        let cutoff = size as f64 / 3.0;
        let dealias = Array2::from_shape_fn(shape, |(row, column)| {
            let kept =
                (signed_wavenumber(row, size).abs() as f64) < cutoff && (column as f64) < cutoff;
            if kept {
                1.0
            } else {
                0.0
            }
        });
        let mut solver = Self {
            params: params.clone(),
            size,
            spacing,
            fft,
            half_decay,
            derivative_x,
            derivative_y,
            inverse_laplacian,
            dealias,
            forcing_spectrum: Array2::zeros(shape),
        };
        solver.forcing_spectrum = solver.kolmogorov_spectrum()?;
        Ok(solver)
    }

    fn kolmogorov_spectrum(&self) -> Result<Array2<Complex64>> {
        let Some(forcing) = &self.params.forcing else {
            return Ok(Array2::zeros(self.fft.spectrum_shape()));
        };
        if 2 * forcing.wavenumber >= self.size as i64 {
            return Err(Error::GridSize {
                what: "Navier–Stokes forcing",
                size: self.size,
                minimum: 2 * forcing.wavenumber as usize + 2,
                reason: format!(
                    "it cannot resolve forcing wavenumber {}",
                    forcing.wavenumber
                ),
            });
        }
        let angular = 2.0 * PI * forcing.wavenumber as f64 / self.params.domain_length;
        let y = self.coordinates();
        let field = Array2::from_shape_fn((self.size, self.size), |(row, _)| {
            -forcing.amplitude * angular * (angular * y[row]).cos()
        });
        self.fft.forward(field.view())
    }

    /// Grid size n.
    pub fn size(&self) -> usize {
        self.size
    }

    /// The FFT plan of this grid.
    pub fn fft(&self) -> &Fft2 {
        &self.fft
    }

    /// The vorticity source `f_ω` on this grid (zero without forcing).
    pub fn forcing_field(&self) -> Result<Array2<f64>> {
        self.fft.inverse(self.forcing_spectrum.view())
    }

    /// The parameters.
    pub fn params(&self) -> &NavierStokesParams {
        &self.params
    }

    /// Cell-centre coordinates `(j + ½)L/n` (same along x and y).
    pub fn coordinates(&self) -> Array1<f64> {
        Array1::from_shape_fn(self.size, |j| (j as f64 + 0.5) * self.spacing)
    }

    /// The velocity `[2, n, n]` (channel 0 = u, 1 = v) of a vorticity field; divergence-free
    /// to round-off.
    pub fn velocity(&self, vorticity: ArrayView2<'_, f64>) -> Result<Array3<f64>> {
        let spectrum = self.fft.forward(vorticity)?;
        self.velocity_from_spectrum(&spectrum)
    }

    fn velocity_from_spectrum(&self, spectrum: &Array2<Complex64>) -> Result<Array3<f64>> {
        let streamfunction = spectrum * &self.inverse_laplacian;
        let u = self
            .fft
            .inverse((&streamfunction * &self.derivative_y).view())?;
        let v = self
            .fft
            .inverse((&streamfunction * &self.derivative_x).mapv(|z| -z).view())?;
        let mut velocity = Array3::zeros((2, self.size, self.size));
        velocity.index_axis_mut(Axis(0), 0).assign(&u);
        velocity.index_axis_mut(Axis(0), 1).assign(&v);
        Ok(velocity)
    }

    /// Spectral divergence `∂u/∂x + ∂v/∂y` of a `[2, n, n]` velocity.
    pub fn divergence(&self, velocity: &Array3<f64>) -> Result<Array2<f64>> {
        self.check_shape("velocity", velocity.shape(), &[2, self.size, self.size])?;
        let u_hat = self.fft.forward(velocity.index_axis(Axis(0), 0))?;
        let v_hat = self.fft.forward(velocity.index_axis(Axis(0), 1))?;
        let divergence = &u_hat * &self.derivative_x + &v_hat * &self.derivative_y;
        self.fft.inverse(divergence.view())
    }

    /// Kinetic energy `E = ½·mean(u² + v²)` of a vorticity field.
    pub fn energy(&self, vorticity: ArrayView2<'_, f64>) -> Result<f64> {
        let velocity = self.velocity(vorticity)?;
        Ok(0.5 * velocity.mapv(|c| c * c).sum() / (self.size * self.size) as f64)
    }

    /// Enstrophy `Z = ½·mean(ω²)`; unforced, undragged flow has `dE/dt = −2νZ`.
    pub fn enstrophy(&self, vorticity: ArrayView2<'_, f64>) -> f64 {
        0.5 * vorticity.mapv(|w| w * w).sum() / (self.size * self.size) as f64
    }

    /// The nonlinear term and forcing `−u·∇ω + f_ω` of a vorticity field, in physical space,
    /// as a step evaluates it (2/3 dealiased); for tests against closed forms.
    #[doc(hidden)]
    pub fn nonlinear_term(&self, vorticity: ArrayView2<'_, f64>) -> Result<Array2<f64>> {
        self.check_shape("vorticity", vorticity.shape(), &[self.size, self.size])?;
        let spectrum = self.fft.forward(vorticity)?;
        self.fft.inverse(self.nonlinear(&spectrum)?.view())
    }

    /// `−u·∇ω + f_ω` in spectral space, dealiased by the 2/3 rule.
    fn nonlinear(&self, spectrum: &Array2<Complex64>) -> Result<Array2<Complex64>> {
        let truncated = spectrum * &self.dealias;
        let velocity = self.velocity_from_spectrum(&truncated)?;
        let vorticity_x = self.fft.inverse((&truncated * &self.derivative_x).view())?;
        let vorticity_y = self.fft.inverse((&truncated * &self.derivative_y).view())?;
        let mut advection = Array2::zeros((self.size, self.size));
        Zip::from(&mut advection)
            .and(velocity.index_axis(Axis(0), 0))
            .and(velocity.index_axis(Axis(0), 1))
            .and(&vorticity_x)
            .and(&vorticity_y)
            .for_each(|a, &u, &v, &wx, &wy| *a = u * wx + v * wy);
        let advection_hat = self.fft.forward(advection.view())?;
        Ok(&self.forcing_spectrum - &(advection_hat * &self.dealias))
    }

    /// `(∂step(state)/∂state)ᵀ · cotangent`: the reverse-mode derivative of one
    /// [`Solver::step`] (FO-SOL's gradient through Navier–Stokes).
    ///
    /// Every linear piece of the step is a Fourier multiplier, i.e. a circulant operator in
    /// physical space: the decay `E`, the dealiasing `D` and the inverse Laplacian `Ψ` are real
    /// and even in `k`, so each is its own adjoint; a first derivative `∂` is imaginary and odd,
    /// so its adjoint is `−∂`. With `N(ω) = f − D(u·∂ₓω' + v·∂ᵧω')`, `ω' = Dω`, `u = ∂ᵧΨω'`,
    /// `v = −∂ₓΨω'`, the adjoint of `N'` at `ω` on `λ` is, with `μ = −Dλ`,
    /// `−D[∂ᵧΨ(μ·∂ₓω') + ∂ₓ(μ·u) − ∂ₓΨ(μ·∂ᵧω') + ∂ᵧ(μ·v)]`; the Lawson RK4 stages are
    /// recomputed and walked backwards.
    pub fn step_vjp(&self, state: &Array2<f64>, cotangent: &Array2<f64>) -> Result<Array2<f64>> {
        let expected = [self.size, self.size];
        self.check_shape("vorticity", state.shape(), &expected)?;
        self.check_shape("vorticity cotangent", cotangent.shape(), &expected)?;
        let (e, h) = (&self.half_decay, self.params.dt);
        // The forward stages, as `lawson_rk4` forms them.
        let s1 = self.fft.forward(state.view())?;
        let a = self.nonlinear(&s1)?;
        let s2 = (&s1 + &(&a * Complex64::new(0.5 * h, 0.0))) * e;
        let b = self.nonlinear(&s2)?;
        let s3 = &s1 * e + &b * Complex64::new(0.5 * h, 0.0);
        let c = self.nonlinear(&s3)?;
        let s4 = &s1 * &(e * e) + &(&c * e) * Complex64::new(h, 0.0);
        // Backwards, every cotangent a spectrum of a real field (all operators commute).
        let next = self.fft.forward(cotangent.view())?;
        let scale = |z: &Array2<Complex64>, f: f64| z * Complex64::new(f, 0.0);
        let lambda_d = scale(&next, h / 6.0);
        let mut lambda_c = scale(&(&next * e), h / 3.0);
        let mut lambda_b = lambda_c.clone();
        let mut lambda_a = scale(&(&next * &(e * e)), h / 6.0);
        let mut lambda_s = &next * &(e * e);
        let back4 = self.nonlinear_vjp(&s4, &lambda_d)?;
        lambda_s += &(&back4 * &(e * e));
        lambda_c += &scale(&(&back4 * e), h);
        let back3 = self.nonlinear_vjp(&s3, &lambda_c)?;
        lambda_s += &(&back3 * e);
        lambda_b += &scale(&back3, 0.5 * h);
        let back2 = self.nonlinear_vjp(&s2, &lambda_b)?;
        lambda_s += &(&back2 * e);
        lambda_a += &scale(&(&back2 * e), 0.5 * h);
        lambda_s += &self.nonlinear_vjp(&s1, &lambda_a)?;
        self.fft.inverse(lambda_s.view())
    }

    /// `N'(σ)ᵀ λ` for the spectrum `σ` of a state and the spectrum `λ` of a cotangent, as a
    /// spectrum (see [`NavierStokes2d::step_vjp`]).
    fn nonlinear_vjp(
        &self,
        spectrum: &Array2<Complex64>,
        cotangent: &Array2<Complex64>,
    ) -> Result<Array2<Complex64>> {
        let truncated = spectrum * &self.dealias;
        let velocity = self.velocity_from_spectrum(&truncated)?;
        let vorticity_x = self.fft.inverse((&truncated * &self.derivative_x).view())?;
        let vorticity_y = self.fft.inverse((&truncated * &self.derivative_y).view())?;
        let mu = self
            .fft
            .inverse((cotangent * &self.dealias).mapv(|z| -z).view())?;
        let times = |field: ArrayView2<'_, f64>| -> Result<Array2<Complex64>> {
            self.fft.forward((&mu * &field).view())
        };
        let u = velocity.index_axis(Axis(0), 0);
        let v = velocity.index_axis(Axis(0), 1);
        let psi_dy = &self.derivative_y * &self.inverse_laplacian;
        let psi_dx = &self.derivative_x * &self.inverse_laplacian;
        let sum = &psi_dy * &times(vorticity_x.view())? + &self.derivative_x * &times(u)?
            - &psi_dx * &times(vorticity_y.view())?
            + &self.derivative_y * &times(v)?;
        Ok((sum * &self.dealias).mapv(|z| -z))
    }

    fn check_shape(&self, what: &'static str, found: &[usize], expected: &[usize]) -> Result<()> {
        if found == expected {
            Ok(())
        } else {
            Err(Error::Shape {
                what,
                expected: expected.to_vec(),
                found: found.to_vec(),
            })
        }
    }

    fn check_cfl(&self, spectrum: &Array2<Complex64>, step: usize) -> Result<()> {
        let velocity = self.velocity_from_spectrum(spectrum)?;
        let u = velocity.index_axis(Axis(0), 0);
        let v = velocity.index_axis(Axis(0), 1);
        let max_speed = u
            .iter()
            .zip(v.iter())
            .fold(0.0_f64, |acc, (a, b)| acc.max(a.abs() + b.abs()));
        crate::solver::check_cfl(
            step,
            max_speed,
            self.params.dt,
            self.spacing,
            self.params.max_cfl,
        )
    }
}

impl Solver for NavierStokes2d {
    type State = Array2<f64>;

    fn dt(&self) -> f64 {
        self.params.dt
    }

    fn step(&self, state: &Array2<f64>, step: usize) -> Result<Array2<f64>> {
        self.check_shape("vorticity", state.shape(), &[self.size, self.size])?;
        if !all_finite(state.iter()) {
            return Err(Error::NonFinite {
                simulation: None,
                step,
                field: "input vorticity",
            });
        }
        let spectrum = self.fft.forward(state.view())?;
        self.check_cfl(&spectrum, step)?;
        let next = lawson_rk4(&spectrum, &self.half_decay, self.params.dt, |s| {
            self.nonlinear(s)
        })?;
        let vorticity = self.fft.inverse(next.view())?;
        if !all_finite(vorticity.iter()) {
            return Err(Error::NonFinite {
                simulation: None,
                step,
                field: "vorticity",
            });
        }
        Ok(vorticity)
    }
}
