//! PDE solvers and data for solver-in-the-loop error correction (DeepZero, SPEC §7).
//!
//! ```
//! use deepzero_pde::{Burgers2d, Burgers2dParams, Solver, WaveField};
//! use rand::{rngs::StdRng, SeedableRng};
//!
//! # fn main() -> deepzero_pde::Result<()> {
//! let mut rng = StdRng::seed_from_u64(7);
//! // 20 travelling sine waves as forcing, a random smooth initial velocity.
//! let forcing = WaveField::random_travelling(&mut rng, 2, 20, 4, 1.0, 1.0)?;
//! let initial = WaveField::random_smooth(&mut rng, 2, 4, 0.5)?;
//! let solver = Burgers2d::new(&Burgers2dParams::default(), 32, forcing)?;
//! let state = initial.evaluate(solver.fft(), 0.0)?; // [2, 32, 32]: (u, v)
//! let states = solver.rollout(&state, 0, 10)?;
//! assert_eq!(states.len(), 11);
//! // A correction C fits between steps: s̃_{i+1} = P(s̃_i) + C(P(s̃_i)).
//! let corrected = solver.rollout_corrected(&state, 0, 10, |_step, predicted| Ok(predicted * 0.99))?;
//! assert!(corrected[10].iter().all(|v| v.is_finite()));
//! # Ok(())
//! # }
//! ```
//!
//! - [`Solver`]: `step` is the core; `rollout`, `rollout_corrected` and `advance` are built on it.
//! - [`Burgers2d`]: forced viscous Burgers in 2-D as in Solver-in-the-Loop (semi-Lagrangian
//!   advection, exact spectral diffusion, explicit forcing) on the periodic square of side 32 (PhiFlow's cell unit).
//! - [`Burgers1d`]: the same equation in 1-D, semi-Lagrangian or pseudo-spectral.
//! - [`NavierStokes2d`]: incompressible vorticity–streamfunction, pseudo-spectral, 2/3
//!   dealiasing, integrating-factor RK4, optional Kolmogorov forcing.
//! - [`WaveField`]: seeded random smooth states and travelling-wave forcings, sampled exactly on
//!   any grid that resolves them.
//! - [`correction`]: the correction network, NON, sol-nograd, ZO-SOL and FO-SOL as core
//!   [`deepzero_core::task::Task`]s
//!   ([`CorrectionTask`], [`SolObjective`]), rollout evaluation.
//! - [`adjoint`]: the Burgers 2-D step's vector–Jacobian product (FO-SOL's gradient).
//! - [`Dataset`]: reference trajectories block-averaged to the source grid plus SRC rollouts,
//!   generated from seeds, saved as JSON + raw little-endian f64.
//!
//! Grids are periodic and cell-centred (see [`grid`]); FFT conventions are in [`fft`]. Bad
//! input — a grid the FFT cannot take, a reference size that is not a multiple of the source
//! size, a time step beyond the CFL limit, a NaN or infinity in a state — returns an [`Error`]
//! naming the problem (and the step and simulation where one is known).

pub mod adjoint;
pub mod burgers;
pub mod burgers1d;
pub mod correction;
pub mod dataset;
pub mod error;
pub mod fft;
pub mod grid;
pub mod navier_stokes;
pub mod solver;
mod stepping;
pub mod waves;

pub use burgers::{Burgers2d, Burgers2dParams};
pub use burgers1d::{Burgers1d, Burgers1dParams, Burgers1dScheme};
pub use correction::{
    CorrectionConfig, CorrectionTask, Method, NetworkConfig, PreparedSimulation, RolloutErrors,
    Scaling, Schedule, SolGradient, SolObjective, SolStart,
};
pub use dataset::{
    Dataset, DatasetConfig, ForcingConfig, GridSolver, InitialStateConfig, Problem, Simulation,
};
pub use error::{Error, Result};
pub use fft::{Fft1, Fft2};
pub use navier_stokes::{KolmogorovForcing, NavierStokes2d, NavierStokesParams};
pub use solver::Solver;
pub use waves::{Wave, WaveField};
