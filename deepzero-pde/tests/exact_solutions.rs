//! Solvers against mathematics: closed-form solutions, exact per-mode decay, exact shifts,
//! the energy balance, and incompressibility.

use std::f64::consts::PI;

use deepzero_pde::grid::advect_semi_lagrangian;
use deepzero_pde::{
    Burgers1d, Burgers1dParams, Burgers1dScheme, Burgers2d, Burgers2dParams, KolmogorovForcing,
    NavierStokes2d, NavierStokesParams, Solver, WaveField,
};
use ndarray::{Array1, Array2, Axis};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn max_abs_difference<'a>(
    a: impl IntoIterator<Item = &'a f64>,
    b: impl IntoIterator<Item = &'a f64>,
) -> f64 {
    a.into_iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// Taylor–Green on [0, 2π]²: ω = −2 cos x cos y e^{−2νt}, u = cos x sin y e^{−2νt},
/// v = −sin x cos y e^{−2νt}. The advection term vanishes, so only diffusion acts.
#[test]
fn taylor_green_vortex_decays_as_exact_solution() -> anyhow::Result<()> {
    let params = NavierStokesParams {
        viscosity: 0.05,
        dt: 0.01,
        ..NavierStokesParams::default()
    };
    let n = 32;
    let solver = NavierStokes2d::new(&params, n)?;
    let x = solver.coordinates();
    let initial = Array2::from_shape_fn((n, n), |(i, j)| -2.0 * x[j].cos() * x[i].cos());
    let steps = 1000;
    let last = solver.advance(&initial, 0, steps)?;
    let decay = (-2.0 * params.viscosity * steps as f64 * params.dt).exp();
    let exact = initial.mapv(|w| w * decay);
    let vorticity_error = max_abs_difference(&last, &exact);
    let velocity = solver.velocity(last.view())?;
    let exact_u = Array2::from_shape_fn((n, n), |(i, j)| x[j].cos() * x[i].sin() * decay);
    let exact_v = Array2::from_shape_fn((n, n), |(i, j)| -x[j].sin() * x[i].cos() * decay);
    let velocity_error = max_abs_difference(velocity.index_axis(Axis(0), 0), &exact_u).max(
        max_abs_difference(velocity.index_axis(Axis(0), 1), &exact_v),
    );
    println!("Taylor–Green after {steps} steps (t = 10, decay {decay:.4}): max |ω error| {vorticity_error:.3e}, max |u error| {velocity_error:.3e}");
    assert!(
        vorticity_error < 1e-12,
        "vorticity error {vorticity_error:e}"
    );
    assert!(velocity_error < 1e-12, "velocity error {velocity_error:e}");
    Ok(())
}

/// Each Fourier mode of the Burgers diffusion stage decays by exactly exp(−4π²|k|²νΔt).
#[test]
fn spectral_diffusion_decays_each_mode_exactly() -> anyhow::Result<()> {
    let params = Burgers2dParams {
        viscosity: 0.01,
        dt: 0.1,
        domain_length: 1.0, // the unit square, where the factor has no 1/L²
        ..Burgers2dParams::default()
    };
    let n = 32;
    let solver = Burgers2d::new(&params, n, WaveField::zero(2))?;
    let h = solver.spacing();
    let mut worst: f64 = 0.0;
    for (kx, ky, phase) in [
        (1_i64, 0_i64, 0.3),
        (0, 2, 1.0),
        (3, -2, 2.0),
        (7, 5, -0.4),
        (-11, 4, 0.9),
        (15, 15, 0.1),
    ] {
        let mode = Array2::from_shape_fn((n, n), |(i, j)| {
            let (x, y) = ((j as f64 + 0.5) * h, (i as f64 + 0.5) * h);
            (2.0 * PI * (kx as f64 * x + ky as f64 * y) + phase).cos()
        });
        let factor =
            (-4.0 * PI * PI * ((kx * kx + ky * ky) as f64) * params.viscosity * params.dt).exp();
        let mut field = mode.clone();
        for repeat in 1..=3 {
            field = solver.diffuse(field.view())?;
            let expected = mode.mapv(|m| m * factor.powi(repeat));
            let error = max_abs_difference(&field, &expected);
            worst = worst.max(error);
            assert!(
                error < 1e-14,
                "mode ({kx}, {ky}) after {repeat} steps: error {error:e}"
            );
        }
    }
    println!("spectral diffusion: worst per-mode error {worst:.3e}");
    Ok(())
}

/// With Δt·u/Δx and Δt·v/Δx whole numbers, semi-Lagrangian advection is an exact shift.
#[test]
fn semi_lagrangian_whole_cell_advection_shifts_exactly() -> anyhow::Result<()> {
    let n = 32;
    let spacing = 1.0 / n as f64;
    let dt = 0.125; // Δt/Δx = 4 exactly
    let mut rng = StdRng::seed_from_u64(3);
    let field = Array2::from_shape_fn((n, n), |_| rng.random::<f64>() - 0.5);
    let u = Array2::from_elem((n, n), 0.5); // 2 cells per step along x
    let v = Array2::from_elem((n, n), -0.25); // −1 cell per step along y
    let advected = advect_semi_lagrangian(&[field.view()], u.view(), v.view(), dt, spacing)?;
    let shifted = Array2::from_shape_fn((n, n), |(i, j)| field[[(i + 1) % n, (j + n - 2) % n]]);
    assert_eq!(advected[0], shifted, "shift is not exact");
    // A non-integer shift must not reproduce the field (the test can fail).
    let advected_half =
        advect_semi_lagrangian(&[field.view()], (&u * 1.0625).view(), v.view(), dt, spacing)?;
    assert_ne!(advected_half[0], shifted);
    Ok(())
}

/// Cole–Hopf: u = 2νkb e^{−νk²t} sin kx / (a + b e^{−νk²t} cos kx) on [0, 2π/k].
fn cole_hopf(x: &Array1<f64>, t: f64, viscosity: f64, k: f64, a: f64, b: f64) -> Array1<f64> {
    let decay = (-viscosity * k * k * t).exp();
    x.mapv(|x| 2.0 * viscosity * k * b * decay * (k * x).sin() / (a + b * decay * (k * x).cos()))
}

/// Max error against Cole–Hopf with `(ν, k, a, b)` = `solution` at `end_time`.
fn cole_hopf_error(
    scheme: Burgers1dScheme,
    solution: (f64, f64, f64, f64),
    n: usize,
    dt: f64,
    end_time: f64,
) -> anyhow::Result<f64> {
    let (viscosity, k, a, b) = solution;
    let params = Burgers1dParams {
        viscosity,
        dt,
        domain_length: 2.0 * PI / k,
        scheme,
        max_cfl: 4.0,
        velocity_bound: 0.0,
    };
    let solver = Burgers1d::new(&params, n)?;
    let x = solver.coordinates();
    let steps = (end_time / dt).round() as usize;
    let last = solver.advance(&cole_hopf(&x, 0.0, viscosity, k, a, b), 0, steps)?;
    let exact = cole_hopf(&x, steps as f64 * dt, viscosity, k, a, b);
    Ok(max_abs_difference(&last, &exact))
}

fn observed_orders(errors: &[f64]) -> Vec<f64> {
    errors.windows(2).map(|w| (w[0] / w[1]).log2()).collect()
}

/// Pseudo-spectral IF-RK4 is fourth order in Δt (space is resolved to round-off at n = 64).
#[test]
fn burgers_1d_pseudo_spectral_matches_cole_hopf_at_fourth_order() -> anyhow::Result<()> {
    let time_steps = [0.2, 0.1, 0.05, 0.025];
    let errors = time_steps
        .iter()
        .map(|&dt| {
            cole_hopf_error(
                Burgers1dScheme::PseudoSpectral,
                (0.5, 1.0, 2.0, 1.0),
                64,
                dt,
                4.0,
            )
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let orders = observed_orders(&errors);
    println!(
        "pseudo-spectral Cole–Hopf: Δt {time_steps:?} errors {:?} orders {orders:.3?}",
        scientific(&errors)
    );
    for order in &orders {
        assert!(
            (3.6..=4.4).contains(order),
            "observed order {order}, expected 4"
        );
    }
    Ok(())
}

/// The semi-Lagrangian scheme with Δt ∝ Δx converges at first order.
#[test]
fn burgers_1d_semi_lagrangian_matches_cole_hopf_at_first_order() -> anyhow::Result<()> {
    let sizes = [64, 128, 256, 512];
    let errors = sizes
        .iter()
        .map(|&n| {
            cole_hopf_error(
                Burgers1dScheme::SemiLagrangian,
                (0.2, 1.0, 1.2, 1.0),
                n,
                3.2 / n as f64,
                4.0,
            )
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let orders = observed_orders(&errors);
    println!(
        "semi-Lagrangian Cole–Hopf: n {sizes:?} (Δt = 3.2/n) errors {:?} orders {orders:.3?}",
        scientific(&errors)
    );
    for order in &orders {
        assert!(
            (0.8..=1.2).contains(order),
            "observed order {order}, expected 1"
        );
    }
    Ok(())
}

fn random_vorticity(solver: &NavierStokes2d, seed: u64, rms: f64) -> anyhow::Result<Array2<f64>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let field = WaveField::random_smooth(&mut rng, 1, 6, rms)?;
    Ok(field
        .evaluate(solver.fft(), 0.0)?
        .index_axis_move(Axis(0), 0))
}

/// Unforced 2-D flow: dE/dt = −2νZ, checked by a finite difference over one small step.
#[test]
fn navier_stokes_energy_dissipation_equals_twice_nu_enstrophy() -> anyhow::Result<()> {
    let params = NavierStokesParams {
        viscosity: 0.02,
        dt: 1e-3,
        ..NavierStokesParams::default()
    };
    let solver = NavierStokes2d::new(&params, 64)?;
    // Let the nonlinear term shape the flow first, so the check is not of a trivial state.
    let vorticity = solver.advance(&random_vorticity(&solver, 11, 2.0)?, 0, 100)?;
    let next = solver.step(&vorticity, 100)?;
    let energy_rate = (solver.energy(next.view())? - solver.energy(vorticity.view())?) / params.dt;
    let enstrophy_mid = 0.5 * (solver.enstrophy(vorticity.view()) + solver.enstrophy(next.view()));
    let predicted = -2.0 * params.viscosity * enstrophy_mid;
    let relative = ((energy_rate - predicted) / predicted).abs();
    println!("dE/dt {energy_rate:.10e}, −2νZ {predicted:.10e}, relative error {relative:.3e}");
    assert!(relative < 1e-6, "relative error {relative:e}");
    Ok(())
}

/// The velocity of a forced, evolved vorticity field is divergence-free to round-off.
#[test]
fn navier_stokes_velocity_stays_divergence_free() -> anyhow::Result<()> {
    let params = NavierStokesParams {
        viscosity: 1e-3,
        dt: 0.01,
        forcing: Some(KolmogorovForcing {
            amplitude: 1.0,
            wavenumber: 4,
        }),
        drag: 0.1,
        ..NavierStokesParams::default()
    };
    let solver = NavierStokes2d::new(&params, 64)?;
    let states = solver.rollout(&random_vorticity(&solver, 5, 1.0)?, 0, 300)?;
    let mut worst_ratio: f64 = 0.0;
    for state in states.iter().step_by(50) {
        let velocity = solver.velocity(state.view())?;
        let divergence = solver.divergence(&velocity)?;
        let max_divergence = divergence.iter().fold(0.0_f64, |m, d| m.max(d.abs()));
        let max_vorticity = state.iter().fold(0.0_f64, |m, w| m.max(w.abs()));
        worst_ratio = worst_ratio.max(max_divergence / max_vorticity);
    }
    println!("max |∇·u| / max |ω| over 300 steps: {worst_ratio:.3e}");
    assert!(worst_ratio < 1e-13, "divergence ratio {worst_ratio:e}");
    Ok(())
}

fn scientific(values: &[f64]) -> Vec<String> {
    values.iter().map(|v| format!("{v:.3e}")).collect()
}
