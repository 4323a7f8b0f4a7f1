//! The one error type of `deepzero-pde`.

use std::path::PathBuf;

/// Everything that can go wrong in the PDE layer. Messages say what was wrong and how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A grid size the FFT set-up cannot take (zero, odd, too small, or too small for the modes).
    #[error(
        "{what}: grid size {size} is not usable ({reason}); use an even size of at least {minimum}"
    )]
    GridSize {
        /// Which grid (e.g. "Burgers 2-D grid").
        what: &'static str,
        /// The size that was given.
        size: usize,
        /// The smallest even size that works here.
        minimum: usize,
        /// Why the size was refused.
        reason: String,
    },
    /// The reference grid is not a whole multiple of the source grid, so block averaging is impossible.
    #[error(
        "reference grid {reference} is not a multiple of source grid {source_size} (or is smaller); \
         use a reference size of source × an integer, e.g. {suggestion}"
    )]
    GridRatio {
        /// Reference grid size.
        reference: usize,
        /// Source grid size.
        source_size: usize,
        /// A reference size that would work.
        suggestion: usize,
    },
    /// The stated velocity bound makes the CFL number too large for this Δt and grid.
    #[error(
        "time step Δt = {dt} is beyond the CFL limit for velocity bound {velocity_bound} on grid spacing {dx:.4e}: \
         CFL number {cfl:.3} > limit {limit}; use Δt ≤ {suggested_dt:.3e}, a coarser grid, or a smaller velocity bound"
    )]
    CflBound {
        /// CFL number implied by the bound.
        cfl: f64,
        /// Largest allowed CFL number.
        limit: f64,
        /// The stated velocity bound (|u| + |v| in 2-D, |u| in 1-D).
        velocity_bound: f64,
        /// Time step.
        dt: f64,
        /// Grid spacing.
        dx: f64,
        /// Largest Δt that satisfies the limit.
        suggested_dt: f64,
    },
    /// The current state moves faster than the time step allows.
    #[error(
        "CFL number {cfl:.3} exceeds the limit {limit} at step {step}{} (max speed {max_speed:.4}, Δt = {dt}); \
         use Δt ≤ {suggested_dt:.3e} or a weaker forcing/initial state",
        in_simulation(*.simulation)
    )]
    Cfl {
        /// Simulation index, when known (filled in by data generation).
        simulation: Option<usize>,
        /// Index of the step that was about to be taken.
        step: usize,
        /// CFL number of the current state.
        cfl: f64,
        /// Largest allowed CFL number.
        limit: f64,
        /// Largest speed in the state (|u| + |v| in 2-D).
        max_speed: f64,
        /// Time step.
        dt: f64,
        /// Largest Δt that satisfies the limit for this state.
        suggested_dt: f64,
    },
    /// A NaN or infinity appeared in a state.
    #[error(
        "{field} holds a NaN or infinity after step {step}{}; the run blew up: reduce Δt, \
         check the initial state and forcing for non-finite values, or lower their amplitude",
        in_simulation(*.simulation)
    )]
    NonFinite {
        /// Simulation index, when known (filled in by data generation).
        simulation: Option<usize>,
        /// Index of the step whose result (or input) was not finite.
        step: usize,
        /// Which field ("velocity", "vorticity", ...).
        field: &'static str,
    },
    /// A configuration value is out of range; the message names the field and the allowed range.
    #[error("invalid parameter {name} = {value}: {expected}")]
    InvalidParameter {
        /// Field name.
        name: &'static str,
        /// The value that was given.
        value: String,
        /// What is allowed.
        expected: String,
    },
    /// A state of the wrong shape was passed to a solver.
    #[error("{what} has shape {found:?}, expected {expected:?}; build states with the solver's grid size")]
    Shape {
        /// What was passed.
        what: &'static str,
        /// Shape expected.
        expected: Vec<usize>,
        /// Shape found.
        found: Vec<usize>,
    },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// An error of the training machinery (model, estimator, trainer, checkpoint).
    #[error(transparent)]
    Core(#[from] deepzero_core::Error),
    /// A tensor operation failed inside candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A data set file exists but its contents are not what the format requires.
    #[error("{path}: {msg}; delete the directory and generate the data set again")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong in it.
        msg: String,
    },
}

/// Result with the PDE [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

fn in_simulation(simulation: Option<usize>) -> String {
    simulation.map_or_else(String::new, |index| format!(" of simulation {index}"))
}

impl Error {
    /// Names the simulation in step errors ([`Error::Cfl`], [`Error::NonFinite`]); other errors pass through.
    pub fn in_simulation(self, index: usize) -> Self {
        match self {
            Error::Cfl {
                step,
                cfl,
                limit,
                max_speed,
                dt,
                suggested_dt,
                ..
            } => Error::Cfl {
                simulation: Some(index),
                step,
                cfl,
                limit,
                max_speed,
                dt,
                suggested_dt,
            },
            Error::NonFinite { step, field, .. } => Error::NonFinite {
                simulation: Some(index),
                step,
                field,
            },
            other => other,
        }
    }

    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// A format error in the file `path`.
    pub fn format(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Format {
            path: path.into(),
            msg: msg.into(),
        }
    }

    /// An out-of-range parameter.
    pub fn parameter(
        name: &'static str,
        value: impl ToString,
        expected: impl Into<String>,
    ) -> Self {
        Error::InvalidParameter {
            name,
            value: value.to_string(),
            expected: expected.into(),
        }
    }
}
