//! Reference and source trajectories for solver-in-the-loop training, generated from seeds and
//! cached on disk.
//!
//! For every simulation a random smooth initial state and (for Burgers) a random travelling-wave
//! forcing are drawn from the simulation's seed. The reference solver runs on the fine grid and
//! each state is block-averaged down to the source grid; the source solver (SRC, no correction)
//! runs on the source grid from the downsampled initial state.
//!
//! On disk a data set is a directory with `dataset.json` (the configuration, the per-simulation
//! seeds, initial states and forcings, and the layout) and `trajectories.f64`: raw little-endian
//! f64, simulations in order (training first), per simulation the reference then the source
//! trajectory, each `[steps + 1, channels, n, n]` in row-major order. Both files are written to a
//! temporary name and renamed, the header last, so a crash never leaves a readable half data set.

use std::fs;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use ndarray::{Array2, Array3, Axis};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::burgers::{Burgers2d, Burgers2dParams};
use crate::error::{Error, Result};
use crate::grid::{downsample_channels, downsample_factor};
use crate::navier_stokes::{NavierStokes2d, NavierStokesParams};
use crate::solver::Solver;
use crate::waves::WaveField;

const HEADER_FILE: &str = "dataset.json";
const DATA_FILE: &str = "trajectories.f64";
const FORMAT_NAME: &str = "deepzero-pde dataset";
const FORMAT_VERSION: u32 = 2;

/// Which PDE a data set simulates, with its parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Problem {
    /// Forced 2-D Burgers ([`Burgers2d`]); state channels `(u, v)`.
    Burgers2d(Burgers2dParams),
    /// 2-D Navier–Stokes ([`NavierStokes2d`]); one state channel, the vorticity.
    NavierStokes(NavierStokesParams),
}

impl Default for Problem {
    fn default() -> Self {
        Problem::Burgers2d(Burgers2dParams::default())
    }
}

impl Problem {
    /// Number of state channels.
    pub fn channels(&self) -> usize {
        match self {
            Problem::Burgers2d(_) => 2,
            Problem::NavierStokes(_) => 1,
        }
    }
}

/// Random smooth initial states ([`WaveField::random_smooth`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InitialStateConfig {
    /// Largest wavenumber |k| in the spectrum (default 4).
    pub max_wavenumber: i64,
    /// Root-mean-square value of each channel (default 1 for Burgers, 0.25 for Navier–Stokes:
    /// [`InitialStateConfig::for_problem`]).
    pub rms: f64,
}

impl Default for InitialStateConfig {
    fn default() -> Self {
        Self::for_problem(&Problem::default())
    }
}

impl InitialStateConfig {
    /// The defaults of `problem`: Burgers velocities of rms 1 (with Solver-in-the-Loop's forcing
    /// the coarse solver's MAE over 200 steps is then 0.2633 on the default test simulations;
    /// the paper's SRC row is 0.180), Navier–Stokes vorticity of rms 0.25.
    pub fn for_problem(problem: &Problem) -> Self {
        let rms = match problem {
            Problem::Burgers2d(_) => 1.0,
            Problem::NavierStokes(_) => 0.25,
        };
        Self {
            max_wavenumber: 4,
            rms,
        }
    }
}

/// Random travelling-wave forcing of Burgers ([`WaveField::random_travelling`]); Navier–Stokes
/// takes its forcing from [`NavierStokesParams::forcing`] instead.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ForcingConfig {
    /// Number of sine waves (default 20).
    pub waves: usize,
    /// Largest |kx|, |ky| (default 4).
    pub max_wavenumber: i64,
    /// Largest amplitude per channel (default 0.15: Solver-in-the-Loop's `burgers.py` draws
    /// each wave's amplitude uniformly in [−0.15, 0.15]).
    pub amplitude: f64,
    /// Largest angular frequency (default 0.4, as Solver-in-the-Loop's ω ∈ [−0.4, 0.4]).
    pub max_angular_frequency: f64,
}

impl Default for ForcingConfig {
    fn default() -> Self {
        Self {
            waves: 20,
            max_wavenumber: 4,
            amplitude: 0.15,
            max_angular_frequency: 0.4,
        }
    }
}

/// What to generate. The defaults are Solver-in-the-Loop's Burgers set: 128² reference, 32²
/// source, 10 training and 5 test simulations of 200 steps, fixed seed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatasetConfig {
    /// The PDE and its parameters.
    pub problem: Problem,
    /// Source (coarse) grid size (default 32).
    pub source_size: usize,
    /// Reference (fine) grid size, a multiple of `source_size` (default 128).
    pub reference_size: usize,
    /// Training simulations (default 10).
    pub train_simulations: usize,
    /// Test simulations (default 5).
    pub test_simulations: usize,
    /// Steps per simulation (default 200).
    pub steps: usize,
    /// Reference steps run from the initial state before the first recorded state, so that
    /// the recorded flow is developed (default 30, Solver-in-the-Loop's `--skipsteps 30`). The
    /// recorded forcing starts at the same moment ([`WaveField::shifted`]).
    pub skip_steps: usize,
    /// Base seed; simulation `i` uses [`simulation_seed`]`(seed, i)` (default 2020).
    pub seed: u64,
    /// Initial states.
    pub initial: InitialStateConfig,
    /// Forcing (Burgers only).
    pub forcing: ForcingConfig,
}

impl Default for DatasetConfig {
    fn default() -> Self {
        Self {
            problem: Problem::default(),
            source_size: 32,
            reference_size: 128,
            train_simulations: 10,
            test_simulations: 5,
            steps: 200,
            skip_steps: 30,
            seed: 2020,
            initial: InitialStateConfig::default(),
            forcing: ForcingConfig::default(),
        }
    }
}

/// The seed of simulation `index` (a SplitMix64 step from the base seed).
pub fn simulation_seed(seed: u64, index: usize) -> u64 {
    let mut z = seed.wrapping_add((index as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A solver of either problem on states `[channels, n, n]`, so data code and correction
/// training need not know which PDE they run.
#[derive(Clone, Debug)]
pub enum GridSolver {
    /// Burgers 2-D.
    Burgers2d(Box<Burgers2d>),
    /// Navier–Stokes 2-D (the vorticity as a one-channel state).
    NavierStokes(Box<NavierStokes2d>),
}

impl GridSolver {
    /// The solver of `problem` on a `size × size` grid with `forcing` (ignored by Navier–Stokes).
    pub fn new(problem: &Problem, size: usize, forcing: WaveField) -> Result<Self> {
        Ok(match problem {
            Problem::Burgers2d(params) => {
                GridSolver::Burgers2d(Box::new(Burgers2d::new(params, size, forcing)?))
            }
            Problem::NavierStokes(params) => {
                GridSolver::NavierStokes(Box::new(NavierStokes2d::new(params, size)?))
            }
        })
    }

    /// The forcing `[channels, n, n]` seen by step `step` (what a correction network takes as input).
    pub fn forcing_at(&self, step: usize) -> Result<Array3<f64>> {
        match self {
            GridSolver::Burgers2d(solver) => solver.forcing_at(step),
            GridSolver::NavierStokes(solver) => Ok(solver.forcing_field()?.insert_axis(Axis(0))),
        }
    }

    /// Samples a wave field at time 0 on this solver's grid.
    pub fn sample(&self, field: &WaveField) -> Result<Array3<f64>> {
        match self {
            GridSolver::Burgers2d(solver) => field.evaluate(solver.fft(), 0.0),
            GridSolver::NavierStokes(solver) => field.evaluate(solver.fft(), 0.0),
        }
    }
}

impl Solver for GridSolver {
    type State = Array3<f64>;

    fn dt(&self) -> f64 {
        match self {
            GridSolver::Burgers2d(solver) => solver.dt(),
            GridSolver::NavierStokes(solver) => solver.dt(),
        }
    }

    fn step(&self, state: &Array3<f64>, step: usize) -> Result<Array3<f64>> {
        match self {
            GridSolver::Burgers2d(solver) => solver.step(state, step),
            GridSolver::NavierStokes(solver) => {
                if state.shape()[0] != 1 {
                    return Err(Error::Shape {
                        what: "Navier–Stokes state",
                        expected: vec![1, solver.size(), solver.size()],
                        found: state.shape().to_vec(),
                    });
                }
                let vorticity: Array2<f64> = state.index_axis(Axis(0), 0).to_owned();
                Ok(solver.step(&vorticity, step)?.insert_axis(Axis(0)))
            }
        }
    }
}

/// One simulation: its seed, initial state, forcing and trajectories on the source grid.
#[derive(Clone, Debug, PartialEq)]
pub struct Simulation {
    /// Index over all simulations (training first).
    pub index: usize,
    /// The seed its initial state and forcing were drawn from.
    pub seed: u64,
    /// The initial state as a continuous field (`skip_steps` reference steps before
    /// `reference[0]`).
    pub initial: WaveField,
    /// The forcing from `reference[0]` on: at source step `i` it is sampled at time `i·Δt`
    /// (zero waves for Navier–Stokes).
    pub forcing: WaveField,
    /// The reference trajectory downsampled to the source grid, `steps + 1` states.
    pub reference: Vec<Array3<f64>>,
    /// The uncorrected source (SRC) trajectory from `reference[0]`, `steps + 1` states.
    pub source: Vec<Array3<f64>>,
}

/// Generated trajectories; see the [module docs](self).
#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    /// The configuration that produced it.
    pub config: DatasetConfig,
    /// Training simulations.
    pub train: Vec<Simulation>,
    /// Test simulations.
    pub test: Vec<Simulation>,
}

/// The parameter name of [`DatasetConfig::validate`]'s memory check (a product of settings).
pub const DATASET_SIZE: &str = "simulations × (steps + 1) × grid²";

/// The parameter name of [`DatasetConfig::validate`]'s work check (a product of settings).
pub const DATASET_WORK: &str = "simulations × (skip steps + steps) × reference grid²";

/// Most grid-point updates of the reference simulations a data set may ask for: about 10¹²,
/// days of computing at the reference solver's few million updates per second per core. The
/// defaults need 5.7 × 10⁷. A larger request is a typo (`--skip-steps 100000000000`), not a run.
pub const MAX_REFERENCE_UPDATES: u128 = 1_000_000_000_000;

impl DatasetConfig {
    /// Checks sizes and counts; the solvers check their own parameters.
    pub fn validate(&self) -> Result<()> {
        crate::fft::check_grid_size("source grid", self.source_size)?;
        crate::fft::check_grid_size("reference grid", self.reference_size)?;
        downsample_factor(self.reference_size, self.source_size)?;
        if self.steps == 0 {
            return Err(Error::parameter(
                "steps",
                0,
                "at least 1 step per simulation",
            ));
        }
        self.check_memory()?;
        self.check_work()
    }

    /// The reference simulations (warm-up and recorded steps on the fine grid) must be a
    /// computation that ends: at most [`MAX_REFERENCE_UPDATES`] grid-point updates.
    fn check_work(&self) -> Result<()> {
        let simulations = self.train_simulations as u128 + self.test_simulations as u128;
        let steps = self.skip_steps as u128 + self.steps as u128;
        let points = (self.reference_size as u128).pow(2);
        let updates = simulations
            .checked_mul(steps)
            .and_then(|s| s.checked_mul(points));
        match updates {
            Some(u) if u <= MAX_REFERENCE_UPDATES => Ok(()),
            _ => Err(Error::parameter(
                DATASET_WORK,
                format!(
                    "{simulations} × ({} + {}) × {}²",
                    self.skip_steps, self.steps, self.reference_size
                ),
                format!(
                    "the reference simulations would need {} grid-point updates, more than the \
                     limit of 10¹² (days of computing); use fewer simulations, steps or \
                     warm-up steps, or a smaller grid",
                    updates.map_or("more than 10³⁸".to_string(), |u| format!("{u:.2e}"))
                ),
            )),
        }
    }

    /// The data set holds every recorded state of every simulation (two velocity components on
    /// the source grid, f64): check that it fits into memory before any simulation runs.
    fn check_memory(&self) -> Result<()> {
        let simulations = self.train_simulations.saturating_add(self.test_simulations);
        let bytes = simulations
            .checked_mul(self.steps.saturating_add(1))
            .and_then(|states| states.checked_mul(self.source_size.checked_mul(self.source_size)?))
            .and_then(|values| values.checked_mul(2 * std::mem::size_of::<f64>()));
        let available = deepzero_core::bounds::available_memory().unwrap_or(isize::MAX as u64);
        match bytes {
            Some(b) if (b as u64) <= available => Ok(()),
            _ => Err(Error::parameter(
                DATASET_SIZE,
                format!(
                    "{simulations} × {} × {}²",
                    self.steps.saturating_add(1),
                    self.source_size
                ),
                format!(
                    "the data set would need {}, but {} of memory are available; use fewer \
                     simulations or steps, or a smaller grid",
                    bytes.map_or("more than this machine can address".to_string(), |b| {
                        deepzero_core::bounds::human_bytes(b as u128)
                    }),
                    deepzero_core::bounds::human_bytes(available as u128)
                ),
            )),
        }
    }
}

impl Dataset {
    /// Runs every simulation of `config`; errors name the simulation and step that failed.
    pub fn generate(config: &DatasetConfig) -> Result<Self> {
        config.validate()?;
        let total = config.train_simulations + config.test_simulations;
        let mut simulations = (0..total)
            .map(|index| generate_simulation(config, index).map_err(|e| e.in_simulation(index)))
            .collect::<Result<Vec<_>>>()?;
        let test = simulations.split_off(config.train_simulations);
        Ok(Self {
            config: config.clone(),
            train: simulations,
            test,
        })
    }

    /// The source-grid solver of `simulation` (its forcing on the source grid).
    pub fn source_solver(&self, simulation: &Simulation) -> Result<GridSolver> {
        GridSolver::new(
            &self.config.problem,
            self.config.source_size,
            simulation.forcing.clone(),
        )
    }

    /// Writes the data set to `dir` (created if missing); see the [module docs](self) for the format.
    pub fn save(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let data_path = dir.join(DATA_FILE);
        write_atomically(&data_path, |writer| {
            for simulation in self.train.iter().chain(&self.test) {
                for state in simulation.reference.iter().chain(&simulation.source) {
                    for value in state.iter() {
                        writer.write_all(&value.to_le_bytes())?;
                    }
                }
            }
            Ok(())
        })?;
        let header = Header {
            format: FORMAT_NAME.to_string(),
            version: FORMAT_VERSION,
            data_file: DATA_FILE.to_string(),
            layout: "little-endian f64; per simulation (train then test) reference then source, \
                     each [steps + 1, channels, source_size, source_size]"
                .to_string(),
            channels: self.config.problem.channels(),
            config: self.config.clone(),
            simulations: self
                .train
                .iter()
                .chain(&self.test)
                .map(|s| SimulationHeader {
                    index: s.index,
                    seed: s.seed,
                    initial: s.initial.clone(),
                    forcing: s.forcing.clone(),
                })
                .collect(),
        };
        let header_path = dir.join(HEADER_FILE);
        let json = serde_json::to_vec_pretty(&header)
            .map_err(|e| Error::format(&header_path, e.to_string()))?;
        write_atomically(&header_path, |writer| writer.write_all(&json))
    }

    /// Reads a data set written by [`Dataset::save`].
    pub fn load(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let header_path = dir.join(HEADER_FILE);
        let text = fs::read(&header_path).map_err(|e| Error::io(&header_path, e))?;
        let header: Header = serde_json::from_slice(&text)
            .map_err(|e| Error::format(&header_path, e.to_string()))?;
        if header.format != FORMAT_NAME || header.version != FORMAT_VERSION {
            return Err(Error::format(
                &header_path,
                format!(
                    "format {:?} version {}, expected {FORMAT_NAME:?} version {FORMAT_VERSION}",
                    header.format, header.version
                ),
            ));
        }
        let config = header.config;
        config.validate()?;
        let channels = config.problem.channels();
        let n = config.source_size;
        let total = config.train_simulations + config.test_simulations;
        if header.simulations.len() != total || header.channels != channels {
            return Err(Error::format(
                &header_path,
                format!(
                    "{} simulations with {} channels listed, the configuration says {total} with {channels}",
                    header.simulations.len(),
                    header.channels
                ),
            ));
        }
        if Path::new(&header.data_file).file_name() != Some(header.data_file.as_ref()) {
            return Err(Error::format(
                &header_path,
                format!(
                    "data_file {:?} must be a file name in the data set's directory",
                    header.data_file
                ),
            ));
        }
        let data_path = dir.join(&header.data_file);
        let state_len = channels * n * n;
        let values = (config.steps.checked_add(1))
            .and_then(|states| states.checked_mul(2 * state_len))
            .and_then(|per_simulation| per_simulation.checked_mul(total))
            .ok_or_else(|| Error::format(&header_path, "the data set's sizes overflow"))?;
        let values = read_f64s(&data_path, values)?;
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(Error::format(
                &data_path,
                format!(
                    "value {i} is {}; a data set holds finite states (regenerate it)",
                    values[i]
                ),
            ));
        }
        let mut chunks = values.chunks_exact(state_len);
        let mut next_trajectory = || -> Result<Vec<Array3<f64>>> {
            (0..=config.steps)
                .map(|_| {
                    let chunk = chunks.next().unwrap_or(&[]);
                    Array3::from_shape_vec((channels, n, n), chunk.to_vec())
                        .map_err(|e| Error::format(&data_path, e.to_string()))
                })
                .collect()
        };
        let mut simulations = Vec::with_capacity(total);
        for entry in header.simulations {
            let reference = next_trajectory()?;
            let source = next_trajectory()?;
            simulations.push(Simulation {
                index: entry.index,
                seed: entry.seed,
                initial: entry.initial,
                forcing: entry.forcing,
                reference,
                source,
            });
        }
        let test = simulations.split_off(config.train_simulations);
        Ok(Self {
            config,
            train: simulations,
            test,
        })
    }

    /// Loads the data set in `dir` if it was made with `config`, else generates and saves it.
    pub fn load_or_generate(dir: impl AsRef<Path>, config: &DatasetConfig) -> Result<Self> {
        let dir = dir.as_ref();
        if dir.join(HEADER_FILE).exists() {
            if let Ok(dataset) = Self::load(dir) {
                if &dataset.config == config {
                    return Ok(dataset);
                }
            }
        }
        let dataset = Self::generate(config)?;
        dataset.save(dir)?;
        Ok(dataset)
    }
}

fn generate_simulation(config: &DatasetConfig, index: usize) -> Result<Simulation> {
    let seed = simulation_seed(config.seed, index);
    let mut rng = StdRng::seed_from_u64(seed);
    let channels = config.problem.channels();
    let initial = WaveField::random_smooth(
        &mut rng,
        channels,
        config.initial.max_wavenumber,
        config.initial.rms,
    )?;
    let forcing = match config.problem {
        Problem::Burgers2d(_) => WaveField::random_travelling(
            &mut rng,
            2,
            config.forcing.waves,
            config.forcing.max_wavenumber,
            config.forcing.amplitude,
            config.forcing.max_angular_frequency,
        )?,
        Problem::NavierStokes(_) => WaveField::zero(1),
    };
    let factor = downsample_factor(config.reference_size, config.source_size)?;
    let reference_solver =
        GridSolver::new(&config.problem, config.reference_size, forcing.clone())?;
    // The recorded part starts `skip_steps` steps in; its forcing is the same waves from then.
    let forcing_from_start = forcing.shifted(config.skip_steps as f64 * reference_solver.dt());
    let source_solver = GridSolver::new(
        &config.problem,
        config.source_size,
        forcing_from_start.clone(),
    )?;
    let mut state = reference_solver.sample(&initial)?;
    for step in 0..config.skip_steps {
        state = reference_solver.step(&state, step)?;
    }
    let mut reference = Vec::with_capacity(config.steps + 1);
    reference.push(downsample_channels(state.view(), factor)?);
    for step in 0..config.steps {
        state = reference_solver.step(&state, config.skip_steps + step)?;
        reference.push(downsample_channels(state.view(), factor)?);
    }
    let source = source_solver.rollout(&reference[0], 0, config.steps)?;
    Ok(Simulation {
        index,
        seed,
        initial,
        forcing: forcing_from_start,
        reference,
        source,
    })
}

#[derive(Serialize, Deserialize)]
struct Header {
    format: String,
    version: u32,
    data_file: String,
    layout: String,
    channels: usize,
    config: DatasetConfig,
    simulations: Vec<SimulationHeader>,
}

#[derive(Serialize, Deserialize)]
struct SimulationHeader {
    index: usize,
    seed: u64,
    initial: WaveField,
    forcing: WaveField,
}

/// Writes `path` through a temporary file in the same directory and a rename.
fn write_atomically<F>(path: &Path, write: F) -> Result<()>
where
    F: FnOnce(&mut BufWriter<fs::File>) -> std::io::Result<()>,
{
    let mut temporary = PathBuf::from(path);
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("data");
    temporary.set_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let file = fs::File::create(&temporary)?;
        let mut writer = BufWriter::new(file);
        write(&mut writer)?;
        let file = writer.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        fs::rename(&temporary, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&temporary);
    }
    result.map_err(|e| Error::io(path, e))
}

/// The `expected` values of the file at `path`; its size is checked before anything is read,
/// so that a header announcing absurd sizes allocates nothing.
fn read_f64s(path: &Path, expected: usize) -> Result<Vec<f64>> {
    let mut file = fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let size = file.metadata().map_err(|e| Error::io(path, e))?.len();
    if Some(size) != (expected as u64).checked_mul(8) {
        return Err(Error::format(
            path,
            format!("{size} bytes, the header implies {expected} f64 values of 8 bytes"),
        ));
    }
    let mut bytes = Vec::with_capacity(size as usize);
    file.read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, e))?;
    if bytes.len() as u64 != size {
        return Err(Error::format(path, "the file changed while it was read"));
    }
    Ok(bytes
        .chunks_exact(8)
        .map(|chunk| {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            f64::from_le_bytes(word)
        })
        .collect())
}
