//! The reverse-mode derivative of the 2-D Burgers step: FO-SOL's white-box gradient.
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
    /// Whether [`GridSolver::step_vjp`] is available (Burgers 2-D only).
    pub fn has_adjoint(&self) -> bool {
        matches!(self, GridSolver::Burgers2d(_))
    }

    /// `(∂P(state)/∂state)ᵀ · cotangent` of one step: the Burgers 2-D adjoint
    /// ([`burgers_step_vjp`]); Navier–Stokes has none and is refused.
    pub fn step_vjp(&self, state: &Array3<f64>, cotangent: &Array3<f64>) -> Result<Array3<f64>> {
        match self {
            GridSolver::Burgers2d(solver) => burgers_step_vjp(solver, state, cotangent),
            GridSolver::NavierStokes(_) => Err(no_adjoint()),
        }
    }
}

/// The error for FO-SOL on a solver without an adjoint.
pub(crate) fn no_adjoint() -> Error {
    Error::parameter(
        "method",
        "fo-sol",
        "a solver with a hand-written adjoint (burgers): Navier–Stokes has none; use \
         sol-nograd or zo-sol, which need no solver gradient",
    )
}

/// `(∂P(state)/∂state)ᵀ · cotangent` for one Burgers 2-D step from `state` (`[2, n, n]`).
pub fn burgers_step_vjp(
    solver: &Burgers2d,
    state: &Array3<f64>,
    cotangent: &Array3<f64>,
) -> Result<Array3<f64>> {
    let expected = [2, solver.size(), solver.size()];
    for (what, a) in [
        ("Burgers 2-D state", state),
        ("Burgers 2-D cotangent", cotangent),
    ] {
        if a.shape() != expected {
            return Err(Error::Shape {
                what,
                expected: expected.to_vec(),
                found: a.shape().to_vec(),
            });
        }
    }
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
            assert!(
                rel < 1e-7,
                "L = {length}: analytic {analytic}, central differences {numeric} (rel {rel:e})"
            );
        }
        Ok(())
    }
}
