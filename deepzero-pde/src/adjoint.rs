//! The reverse-mode derivatives of the solvers' steps: FO-SOL's white-box gradient. Burgers
//! here; Navier–Stokes in [`crate::NavierStokes2d::step_vjp`].
//!
//! One step is `P(s) = D(A(s)) + Δt·f`, with `A` the semi-Lagrangian advection of the velocity
//! by itself and `D` exact spectral diffusion ([`crate::burgers`]). Its vector–Jacobian
//! product is `Pᵀλ = Aᵀ(D λ)`: `D` multiplies every Fourier mode by a real factor that depends
//! on `|k|²` only, so it is a symmetric circulant and its own adjoint; the forcing does not
//! depend on the state; `Aᵀ` is [`crate::grid::advect_semi_lagrangian_vjp`], with the part
//! that flows through the departure points added to the velocity's own cotangent.

use ndarray::{Array3, Axis};

use crate::burgers::Burgers2d;
use crate::dataset::GridSolver;
use crate::error::{Error, Result};
use crate::grid::advect_semi_lagrangian_vjp;

impl GridSolver {
    /// `(∂P(state)/∂state)ᵀ · cotangent` of one step: [`burgers_step_vjp`], or
    /// [`crate::NavierStokes2d::step_vjp`] on the one-channel vorticity state.
    pub fn step_vjp(&self, state: &Array3<f64>, cotangent: &Array3<f64>) -> Result<Array3<f64>> {
        match self {
            GridSolver::Burgers2d(solver) => burgers_step_vjp(solver, state, cotangent),
            GridSolver::NavierStokes(solver) => {
                check_pair(
                    [1, solver.size(), solver.size()],
                    ("Navier–Stokes state", state),
                    ("Navier–Stokes cotangent", cotangent),
                )?;
                let vorticity = state.index_axis(Axis(0), 0).to_owned();
                let lambda = cotangent.index_axis(Axis(0), 0).to_owned();
                Ok(solver.step_vjp(&vorticity, &lambda)?.insert_axis(Axis(0)))
            }
        }
    }
}

/// Checks that a state and its cotangent both have the shape `expected`.
fn check_pair(
    expected: [usize; 3],
    state: (&'static str, &Array3<f64>),
    cotangent: (&'static str, &Array3<f64>),
) -> Result<()> {
    for (what, a) in [state, cotangent] {
        if a.shape() != expected {
            return Err(Error::Shape {
                what,
                expected: expected.to_vec(),
                found: a.shape().to_vec(),
            });
        }
    }
    Ok(())
}

/// `(∂P(state)/∂state)ᵀ · cotangent` for one Burgers 2-D step from `state` (`[2, n, n]`).
pub fn burgers_step_vjp(
    solver: &Burgers2d,
    state: &Array3<f64>,
    cotangent: &Array3<f64>,
) -> Result<Array3<f64>> {
    check_pair(
        [2, solver.size(), solver.size()],
        ("Burgers 2-D state", state),
        ("Burgers 2-D cotangent", cotangent),
    )?;
    let diffused = cotangent
        .outer_iter()
        .map(|c| solver.diffuse(c))
        .collect::<Result<Vec<_>>>()?;
    let u = state.index_axis(Axis(0), 0);
    let v = state.index_axis(Axis(0), 1);
    let views: Vec<_> = diffused.iter().map(|d| d.view()).collect();
    let (d_fields, d_u, d_v) =
        advect_semi_lagrangian_vjp(&[u, v], u, v, solver.params().dt, solver.spacing(), &views)?;
    let mut out = Array3::zeros(state.raw_dim());
    out.index_axis_mut(Axis(0), 0)
        .assign(&(&d_fields[0] + &d_u));
    out.index_axis_mut(Axis(0), 1)
        .assign(&(&d_fields[1] + &d_v));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::solver::Solver;
    use crate::waves::WaveField;
    use crate::Burgers2dParams;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    /// `⟨λ, P(s + εδ) − P(s − εδ)⟩ / 2ε` against `⟨Pᵀλ, δ⟩` on a random smooth state and
    /// forcing, at L = 32 and on the unit square.
    #[test]
    fn step_vjp_matches_central_differences() -> Result<()> {
        for (length, size) in [(32.0, 16), (1.0, 8)] {
            let mut rng = StdRng::seed_from_u64(3);
            let forcing = WaveField::random_travelling(&mut rng, 2, 6, 3, 1.0, 1.0)?;
            let params = Burgers2dParams {
                domain_length: length,
                ..Burgers2dParams::default()
            };
            let solver = Burgers2d::new(&params, size, forcing)?;
            let initial = WaveField::random_smooth(&mut rng, 2, 3, 1.0)?;
            let state = initial.evaluate(solver.fft(), 0.0)?;
            let random = |rng: &mut StdRng| {
                Array3::from_shape_fn(state.raw_dim(), |_| rng.random_range(-1.0..1.0))
            };
            let (lambda, delta) = (random(&mut rng), random(&mut rng));
            let analytic = (&burgers_step_vjp(&solver, &state, &lambda)? * &delta).sum();
            let eps = 1e-6;
            let plus = solver.step(&(&state + &(&delta * eps)), 3)?;
            let minus = solver.step(&(&state - &(&delta * eps)), 3)?;
            let numeric = (&(&plus - &minus) * &lambda).sum() / (2.0 * eps);
            let rel = (analytic - numeric).abs() / numeric.abs();
            eprintln!("Burgers step adjoint (L = {length}) vs central differences: {rel:.2e}");
            assert!(
                rel < 1e-7,
                "L = {length}: analytic {analytic}, central differences {numeric} (rel {rel:e})"
            );
        }
        Ok(())
    }

    /// The same for a Navier–Stokes step, with Kolmogorov forcing and drag, at a Δt where the
    /// nonlinear term matters (a wrong sign in any adjoint term moves the result by O(1)).
    #[test]
    fn navier_stokes_step_vjp_matches_central_differences() -> Result<()> {
        use crate::{KolmogorovForcing, NavierStokes2d, NavierStokesParams};
        let params = NavierStokesParams {
            dt: 0.05,
            drag: 0.1,
            viscosity: 1e-2,
            forcing: Some(KolmogorovForcing {
                amplitude: 1.0,
                wavenumber: 2,
            }),
            ..NavierStokesParams::default()
        };
        let solver = NavierStokes2d::new(&params, 16)?;
        let mut rng = StdRng::seed_from_u64(5);
        let initial = WaveField::random_smooth(&mut rng, 1, 4, 2.0)?;
        let state = initial
            .evaluate(solver.fft(), 0.0)?
            .index_axis(ndarray::Axis(0), 0)
            .to_owned();
        let random = |rng: &mut StdRng| {
            ndarray::Array2::from_shape_fn(state.raw_dim(), |_| rng.random_range(-1.0..1.0))
        };
        let (lambda, delta) = (random(&mut rng), random(&mut rng));
        let analytic = (&solver.step_vjp(&state, &lambda)? * &delta).sum();
        let eps = 1e-6;
        let plus = solver.step(&(&state + &(&delta * eps)), 0)?;
        let minus = solver.step(&(&state - &(&delta * eps)), 0)?;
        let numeric = (&(&plus - &minus) * &lambda).sum() / (2.0 * eps);
        // Against the linear part alone: the nonlinear term is not negligible here.
        let linear_only = {
            let mut p = params.clone();
            p.forcing = None;
            let s = NavierStokes2d::new(&p, 16)?;
            let tiny = 1e-9;
            let l_plus = s.step(&(&delta * tiny), 0)?;
            (&l_plus * &lambda).sum() / tiny
        };
        let rel = (analytic - numeric).abs() / numeric.abs();
        eprintln!("Navier–Stokes step adjoint vs central differences: {rel:.2e} (linear part alone {linear_only:.4}, full {numeric:.4})");
        assert!(
            rel < 1e-7,
            "analytic {analytic}, central differences {numeric} (rel {rel:e})"
        );
        assert!(
            (linear_only - numeric).abs() > 1e-3 * numeric.abs(),
            "the nonlinear term does not matter at this Δt: the test would not see its adjoint"
        );
        Ok(())
    }
}
