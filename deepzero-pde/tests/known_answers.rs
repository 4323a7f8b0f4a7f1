//! Known answers and where they come from: Burgers steps against PhiFlow 3.4 (fixture made by
//! `scripts/burgers_phiflow_fixture.py`), the Navier–Stokes nonlinear term and velocity against
//! closed forms, the velocity's divergence by an independent finite-difference stencil, and the
//! rollout MAE against a hand-computed value.

use std::f64::consts::PI;
use std::path::PathBuf;

use deepzero_pde::correction::{prepare, rollouts};
use deepzero_pde::{
    Burgers2d, Burgers2dParams, Dataset, DatasetConfig, NavierStokes2d, NavierStokesParams,
    Problem, Simulation, Solver, Wave, WaveField,
};
use ndarray::{Array2, Array3, Axis};
use rand::rngs::StdRng;
use rand::SeedableRng;

fn max_abs_difference<'a>(
    a: impl IntoIterator<Item = &'a f64>,
    b: impl IntoIterator<Item = &'a f64>,
) -> f64 {
    a.into_iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

fn max_abs<'a>(a: impl IntoIterator<Item = &'a f64>) -> f64 {
    a.into_iter().fold(0.0, |m, x| m.max(x.abs()))
}

// ---------------------------------------------------------------------------------------------
// Burgers 2-D against PhiFlow
// ---------------------------------------------------------------------------------------------

/// `(kx, ky, [a_u, a_v], phase, ω)`, the script's `INITIAL` and `FORCING`.
type WaveRow = (i64, i64, [f64; 2], f64, f64);

const INITIAL: [WaveRow; 5] = [
    (1, 0, [1.5, 0.3], 0.4, 0.0),
    (0, 1, [-0.5, 0.8], 1.1, 0.0),
    (2, -1, [0.4, -0.6], 2.3, 0.0),
    (-1, 3, [0.25, 0.35], -0.7, 0.0),
    (3, 2, [-0.2, 0.15], 5.0, 0.0),
];

const FORCING: [WaveRow; 4] = [
    (1, 1, [0.15, -0.1], 0.2, 0.4),
    (-2, 1, [-0.12, 0.08], 1.7, -0.3),
    (0, 3, [0.1, 0.05], 3.1, 0.25),
    (4, 0, [0.05, -0.13], -1.2, 0.1),
];

fn wave_field(rows: &[WaveRow]) -> WaveField {
    WaveField {
        channels: 2,
        waves: rows
            .iter()
            .map(|&(kx, ky, amplitudes, phase, angular_frequency)| Wave {
                kx,
                ky,
                amplitudes: amplitudes.to_vec(),
                phase,
                angular_frequency,
            })
            .collect(),
    }
}

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/burgers_phiflow")
}

/// A `[2, n, n]` state of the fixture (raw little-endian f64).
fn fixture_state(name: &str, n: usize) -> anyhow::Result<Array3<f64>> {
    let path = fixture_dir().join(name);
    let bytes = std::fs::read(&path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    anyhow::ensure!(
        bytes.len() == 2 * n * n * 8,
        "{}: {} bytes, expected [2, {n}, {n}] f64",
        path.display(),
        bytes.len()
    );
    let values = bytes
        .chunks_exact(8)
        .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect();
    Ok(Array3::from_shape_vec((2, n, n), values)?)
}

/// The fixture was made from the same parameters and waves as this test builds.
#[test]
fn phiflow_fixture_describes_this_tests_setup() -> anyhow::Result<()> {
    let text = std::fs::read_to_string(fixture_dir().join("params.json"))?;
    let params: serde_json::Value = serde_json::from_str(&text)?;
    let defaults = Burgers2dParams::default();
    assert_eq!(params["phiflow"], "3.4.0");
    assert_eq!(params["domain_length"], defaults.domain_length);
    assert_eq!(params["dt"], defaults.dt);
    assert_eq!(params["viscosity"], defaults.viscosity);
    let initial: WaveField = serde_json::from_value(params["initial"].clone())?;
    let forcing: WaveField = serde_json::from_value(params["forcing"].clone())?;
    assert_eq!(initial, wave_field(&INITIAL));
    assert_eq!(forcing, wave_field(&FORCING));
    Ok(())
}

/// Our exactly sampled initial state equals the script's pointwise numpy evaluation (checks the
/// wave formula, the cell centres and the `[2, n, n]` layout independently of the step).
#[test]
fn initial_state_matches_pointwise_evaluation() -> anyhow::Result<()> {
    let solver = Burgers2d::new(&Burgers2dParams::default(), 32, wave_field(&FORCING))?;
    let ours = wave_field(&INITIAL).evaluate(solver.fft(), 0.0)?;
    let theirs = fixture_state("n32_initial.f64", 32)?;
    let relative = max_abs_difference(&ours, &theirs) / max_abs(&theirs);
    println!("initial state 32²: max relative difference {relative:.3e}");
    assert!(relative < 1e-14, "relative difference {relative:e}");
    Ok(())
}

/// `Burgers2d::step` (default L = 32, Δt = 0.1, ν = 0.1) agrees with PhiFlow 3.4's
/// `semi_lagrangian` + `diffuse.fourier(ν/Δx²)` + `Δt·f(step·Δt)` after 1 and 20 steps, on
/// the 32² grid (Δx = 1) and the 128² grid (Δx = 0.25).
///
/// Measured maximum differences relative to max |state| (PhiFlow 3.4.0 with numpy 2.4 in f64):
/// 7.6e-16 and 2.4e-15 on 32² after 1 and 20 steps, 8.4e-16 and 5.2e-15 on 128², while the
/// states move by 4e-2 and 0.6–0.7 of their maximum. The bound is 1e-13.
#[test]
fn burgers_steps_match_phiflow() -> anyhow::Result<()> {
    let params = Burgers2dParams::default();
    let initial = wave_field(&INITIAL);
    for n in [32, 128] {
        let solver = Burgers2d::new(&params, n, wave_field(&FORCING))?;
        let states = solver.rollout(&initial.evaluate(solver.fft(), 0.0)?, 0, 20)?;
        for steps in [1, 20] {
            let theirs = fixture_state(&format!("n{n}_step{steps}.f64"), n)?;
            let ours = &states[steps];
            let relative = max_abs_difference(ours, &theirs) / max_abs(&theirs);
            let change = max_abs_difference(ours, &states[0]) / max_abs(&theirs);
            println!(
                "Burgers vs PhiFlow, {n}² after {steps} steps: max relative difference \
                 {relative:.3e} (the state moved by {change:.3e})"
            );
            assert!(
                relative < 1e-13,
                "{n}² after {steps} steps: relative difference {relative:e}"
            );
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Navier–Stokes against closed forms
// ---------------------------------------------------------------------------------------------

/// Two vorticity modes `ω = A cos(k₁·x + φ₁) + B cos(k₂·x + φ₂)` (angular wavevectors
/// `kᵢ = 2π mᵢ / L`), with `ψ = Σ ωᵢ/|kᵢ|²`, `u = ∂ψ/∂y`, `v = −∂ψ/∂x`.
struct TwoModes {
    length: f64,
    modes: [(f64, [i64; 2], f64); 2],
}

impl TwoModes {
    fn example() -> Self {
        Self {
            // L ≠ 2π, so a missing 2π/L factor shows.
            length: 3.0,
            modes: [(1.3, [1, 2], 0.4), (-0.7, [-3, 1], 2.1)],
        }
    }

    fn wavevector(&self, mode: usize) -> [f64; 2] {
        let [mx, my] = self.modes[mode].1;
        let to_angular = 2.0 * PI / self.length;
        [to_angular * mx as f64, to_angular * my as f64]
    }

    fn angle(&self, mode: usize, x: f64, y: f64) -> f64 {
        let [kx, ky] = self.wavevector(mode);
        kx * x + ky * y + self.modes[mode].2
    }

    fn vorticity(&self, x: f64, y: f64) -> f64 {
        (0..2)
            .map(|m| self.modes[m].0 * self.angle(m, x, y).cos())
            .sum()
    }

    /// `(u, v)`: `u = ∂ψ/∂y = −Σ Aᵢ kᵢy sin θᵢ / |kᵢ|²`, `v = −∂ψ/∂x = Σ Aᵢ kᵢx sin θᵢ / |kᵢ|²`.
    fn velocity(&self, x: f64, y: f64) -> (f64, f64) {
        (0..2).fold((0.0, 0.0), |(u, v), m| {
            let [kx, ky] = self.wavevector(m);
            let scale = self.modes[m].0 * self.angle(m, x, y).sin() / (kx * kx + ky * ky);
            (u - ky * scale, v + kx * scale)
        })
    }

    /// `−u·∇ω`. The self terms cancel (each mode is a function of its own ψ); the cross terms
    /// give `u·∇ω = AB (k₂x k₁y − k₁x k₂y)(1/|k₁|² − 1/|k₂|²) sin θ₁ sin θ₂`.
    fn nonlinear_term(&self, x: f64, y: f64) -> f64 {
        let [k1x, k1y] = self.wavevector(0);
        let [k2x, k2y] = self.wavevector(1);
        let cross = (k2x * k1y - k1x * k2y)
            * (1.0 / (k1x * k1x + k1y * k1y) - 1.0 / (k2x * k2x + k2y * k2y));
        let amplitude = self.modes[0].0 * self.modes[1].0;
        -amplitude * cross * self.angle(0, x, y).sin() * self.angle(1, x, y).sin()
    }

    fn on_grid(&self, n: usize, f: impl Fn(f64, f64) -> f64) -> Array2<f64> {
        let h = self.length / n as f64;
        Array2::from_shape_fn((n, n), |(i, j)| {
            f((j as f64 + 0.5) * h, (i as f64 + 0.5) * h)
        })
    }

    fn solver(&self, n: usize, viscosity: f64, dt: f64) -> anyhow::Result<NavierStokes2d> {
        let params = NavierStokesParams {
            viscosity,
            dt,
            domain_length: self.length,
            ..NavierStokesParams::default()
        };
        Ok(NavierStokes2d::new(&params, n)?)
    }
}

/// The solver's `−u·∇ω` of two modes equals the closed form (non-zero: the modes differ in
/// |k|). Its products have wavenumbers `m₁ ± m₂` = (−2, 3), (4, 1), inside the 2/3 rule's band
/// at n = 32, so the dealiasing removes nothing and the agreement is to round-off.
#[test]
fn navier_stokes_nonlinear_term_matches_closed_form() -> anyhow::Result<()> {
    let flow = TwoModes::example();
    let n = 32;
    let solver = flow.solver(n, 0.0, 1e-3)?;
    let vorticity = flow.on_grid(n, |x, y| flow.vorticity(x, y));
    let ours = solver.nonlinear_term(vorticity.view())?;
    let exact = flow.on_grid(n, |x, y| flow.nonlinear_term(x, y));
    let scale = max_abs(&exact);
    let relative = max_abs_difference(&ours, &exact) / scale;
    println!("Navier–Stokes −u·∇ω of two modes: max |exact| {scale:.4}, max relative error {relative:.3e}");
    assert!(scale > 0.5, "the closed form must not vanish");
    assert!(relative < 1e-13, "relative error {relative:e}");
    Ok(())
}

/// One inviscid step of the same two modes moves ω by `Δt·(−u·∇ω) + O(Δt²)`: the nonlinear
/// term enters the time stepping with its sign and size.
#[test]
fn navier_stokes_step_moves_vorticity_by_the_closed_form_term() -> anyhow::Result<()> {
    let flow = TwoModes::example();
    let n = 32;
    let dt = 1e-4;
    let solver = flow.solver(n, 0.0, dt)?;
    let vorticity = flow.on_grid(n, |x, y| flow.vorticity(x, y));
    let next = solver.step(&vorticity, 0)?;
    let rate = (&next - &vorticity) / dt;
    let exact = flow.on_grid(n, |x, y| flow.nonlinear_term(x, y));
    let relative = max_abs_difference(&rate, &exact) / max_abs(&exact);
    println!(
        "Navier–Stokes (ω(Δt) − ω(0))/Δt against −u·∇ω, Δt = {dt}: relative error {relative:.3e}"
    );
    assert!(relative < 1e-3, "relative error {relative:e}");
    Ok(())
}

/// The solver's velocity of the two modes equals `u = ∂ψ/∂y`, `v = −∂ψ/∂x` in closed form.
#[test]
fn navier_stokes_velocity_matches_closed_form() -> anyhow::Result<()> {
    let flow = TwoModes::example();
    let n = 32;
    let solver = flow.solver(n, 0.0, 1e-3)?;
    let velocity = solver.velocity(flow.on_grid(n, |x, y| flow.vorticity(x, y)).view())?;
    let exact_u = flow.on_grid(n, |x, y| flow.velocity(x, y).0);
    let exact_v = flow.on_grid(n, |x, y| flow.velocity(x, y).1);
    let scale = max_abs(&exact_u).max(max_abs(&exact_v));
    let error = max_abs_difference(velocity.index_axis(Axis(0), 0), &exact_u).max(
        max_abs_difference(velocity.index_axis(Axis(0), 1), &exact_v),
    );
    println!(
        "Navier–Stokes velocity of two modes: max relative error {:.3e}",
        error / scale
    );
    assert!(error / scale < 1e-13, "relative error {:e}", error / scale);
    Ok(())
}

/// Fourth-order central differences `(−f₊₂ + 8f₊₁ − 8f₋₁ + f₋₂) / 12h` on the periodic grid,
/// along the last axis (x) or the first (y).
fn central_difference(field: &Array2<f64>, spacing: f64, along_x: bool) -> Array2<f64> {
    let (ny, nx) = field.dim();
    let at = |i: usize, j: usize, offset: isize| {
        if along_x {
            field[[i, (j as isize + offset).rem_euclid(nx as isize) as usize]]
        } else {
            field[[(i as isize + offset).rem_euclid(ny as isize) as usize, j]]
        }
    };
    Array2::from_shape_fn((ny, nx), |(i, j)| {
        (-at(i, j, 2) + 8.0 * at(i, j, 1) - 8.0 * at(i, j, -1) + at(i, j, -2)) / (12.0 * spacing)
    })
}

/// `max |∇·u| / max |∂u/∂x|` with finite differences, independent of the solver's spectral
/// derivatives.
fn finite_difference_divergence_ratio(velocity: &Array3<f64>, spacing: f64) -> f64 {
    let u = velocity.index_axis(Axis(0), 0).to_owned();
    let v = velocity.index_axis(Axis(0), 1).to_owned();
    let du_dx = central_difference(&u, spacing, true);
    let dv_dy = central_difference(&v, spacing, false);
    max_abs(&(&du_dx + &dv_dy)) / max_abs(&du_dx).max(max_abs(&dv_dy))
}

/// The velocity of an evolved random vorticity field has no divergence by a fourth-order
/// finite-difference stencil, to the stencil's truncation error; a velocity with `v`'s sign
/// flipped (`div = 2∂²ψ/∂x∂y`) is far above the bound.
#[test]
fn navier_stokes_velocity_is_divergence_free_by_finite_differences() -> anyhow::Result<()> {
    let n = 64;
    let params = NavierStokesParams {
        viscosity: 1e-3,
        dt: 0.01,
        ..NavierStokesParams::default()
    };
    let solver = NavierStokes2d::new(&params, n)?;
    let mut rng = StdRng::seed_from_u64(17);
    let initial = WaveField::random_smooth(&mut rng, 1, 3, 1.0)?
        .evaluate(solver.fft(), 0.0)?
        .index_axis_move(Axis(0), 0);
    let vorticity = solver.advance(&initial, 0, 50)?;
    let velocity = solver.velocity(vorticity.view())?;
    let spacing = params.domain_length / n as f64;
    let ratio = finite_difference_divergence_ratio(&velocity, spacing);
    let mut flipped = velocity.clone();
    flipped.index_axis_mut(Axis(0), 1).mapv_inplace(|v| -v);
    let flipped_ratio = finite_difference_divergence_ratio(&flipped, spacing);
    println!(
        "finite-difference max |∇·u| / max |∂u/∂x|: {ratio:.3e} (with v's sign flipped: {flipped_ratio:.3e})"
    );
    assert!(ratio < 1e-3, "divergence ratio {ratio:e}");
    assert!(
        flipped_ratio > 0.1,
        "the check cannot fail: {flipped_ratio:e}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Rollout MAE against hand-computed values
// ---------------------------------------------------------------------------------------------

/// A 4 × 4 Burgers state with uniform `u` and `v`.
fn uniform_state(u: f64, v: f64) -> Array3<f64> {
    let mut state = Array3::zeros((2, 4, 4));
    state.index_axis_mut(Axis(0), 0).fill(u);
    state.index_axis_mut(Axis(0), 1).fill(v);
    state
}

fn hand_made_simulation(index: usize, reference: Vec<Array3<f64>>) -> Simulation {
    Simulation {
        index,
        seed: 0,
        initial: WaveField::zero(2),
        forcing: WaveField::zero(2),
        source: reference.clone(),
        reference,
    }
}

/// A worked example: without forcing, a uniform velocity is a fixed point of the Burgers step
/// (advection of a constant, diffusion of the mean mode only), so the SRC rollout stays at the
/// initial state and its MAE is that of the hand-made reference trajectories against it.
///
/// 4 × 4 grid, 32 values per state, 2 steps:
/// - simulation A, start (0.5, −0.25): step 1 has u + 0.1 in all 16 cells → 1.6/32 = 0.05;
///   step 2 has u + 0.2 in all cells and v − 0.4 in 8 → (3.2 + 3.2)/32 = 0.2; MAE 0.125;
/// - simulation B, start (−1, 0.75): step 1 equal → 0; step 2 has v + 0.64 in all cells →
///   10.24/32 = 0.32; MAE 0.16.
///
/// Per step (mean over the two): 0, 0.025, 0.26; overall (0.125 + 0.16)/2 = 0.1425.
#[test]
fn rollout_mae_matches_a_worked_example() -> anyhow::Result<()> {
    let config = DatasetConfig {
        problem: Problem::Burgers2d(Burgers2dParams::default()),
        source_size: 4,
        reference_size: 4,
        train_simulations: 0,
        test_simulations: 2,
        steps: 2,
        skip_steps: 0,
        ..DatasetConfig::default()
    };
    let start_a = uniform_state(0.5, -0.25);
    let step1_a = uniform_state(0.6, -0.25);
    let mut step2_a = uniform_state(0.7, -0.25);
    step2_a
        .index_axis_mut(Axis(0), 1)
        .slice_mut(ndarray::s![0..2, ..])
        .fill(-0.65);
    let start_b = uniform_state(-1.0, 0.75);
    let step2_b = uniform_state(-1.0, 1.39);
    let dataset = Dataset {
        config,
        train: Vec::new(),
        test: vec![
            hand_made_simulation(0, vec![start_a, step1_a, step2_a]),
            hand_made_simulation(1, vec![start_b.clone(), start_b, step2_b]),
        ],
    };
    let (errors, trajectories) = rollouts(&prepare(&dataset, &dataset.test)?, None)?;
    println!(
        "worked MAE: per step {:?}, per simulation {:?}, overall {}",
        errors.mae_per_step,
        errors.mae_per_simulation,
        errors.mae()
    );
    let close = |a: f64, b: f64| (a - b).abs() < 1e-14;
    for (trajectory, simulation) in trajectories.iter().zip(&dataset.test) {
        let start = &simulation.reference[0];
        assert!(trajectory
            .iter()
            .all(|s| max_abs_difference(s, start) < 1e-15));
    }
    for (found, expected) in errors.mae_per_step.iter().zip([0.0, 0.025, 0.26]) {
        assert!(
            close(*found, expected),
            "per step {:?}",
            errors.mae_per_step
        );
    }
    for (found, expected) in errors.mae_per_simulation.iter().zip([0.125, 0.16]) {
        assert!(
            close(*found, expected),
            "per simulation {:?}",
            errors.mae_per_simulation
        );
    }
    assert_eq!(errors.mae_per_step.len(), 3);
    assert!(close(errors.mae(), 0.1425), "overall {}", errors.mae());
    Ok(())
}

/// On a small generated Burgers data set (16² source, 32² reference, 5 steps) the SRC MAE of
/// `rollouts` equals the mean of |solver − reference| computed here by running the solver.
#[test]
fn rollout_mae_matches_a_hand_computed_rollout() -> anyhow::Result<()> {
    let config = DatasetConfig {
        source_size: 16,
        reference_size: 32,
        train_simulations: 1,
        test_simulations: 2,
        steps: 5,
        skip_steps: 2,
        ..DatasetConfig::default()
    };
    let dataset = Dataset::generate(&config)?;
    let (errors, _) = rollouts(&prepare(&dataset, &dataset.test)?, None)?;
    let Problem::Burgers2d(params) = &config.problem else {
        unreachable!("the default problem is Burgers")
    };
    let mut per_simulation = Vec::new();
    for simulation in &dataset.test {
        let solver = Burgers2d::new(params, config.source_size, simulation.forcing.clone())?;
        let mut state = simulation.reference[0].clone();
        let mut total = 0.0;
        for step in 0..config.steps {
            state = solver.step(&state, step)?;
            let reference = &simulation.reference[step + 1];
            let mut sum = 0.0;
            for (a, b) in state.iter().zip(reference.iter()) {
                sum += (a - b).abs();
            }
            total += sum / state.len() as f64;
        }
        per_simulation.push(total / config.steps as f64);
    }
    let by_hand = per_simulation.iter().sum::<f64>() / per_simulation.len() as f64;
    println!(
        "SRC MAE: rollouts {:.15e}, by hand {by_hand:.15e} (per simulation {per_simulation:?})",
        errors.mae()
    );
    assert!(by_hand > 1e-4, "a trivial case: MAE {by_hand:e}");
    assert!(((errors.mae() - by_hand) / by_hand).abs() < 1e-12);
    for (found, expected) in errors.mae_per_simulation.iter().zip(&per_simulation) {
        assert!(((found - expected) / expected).abs() < 1e-12);
    }
    Ok(())
}
