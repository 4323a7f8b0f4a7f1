//! Learned correction of the coarse solver with the solver in the loop (SPEC §7).
//!
//! A correction network `C` ([`ModelSpec::CorrectionCnn`] on the source grid) takes the solver's
//! prediction and the forcing of the step and returns a change of the state:
//! `s̃_{i+1} = P(s̃_i) + C(P(s̃_i), f_i)`. Its inputs are the state channels followed by the
//! forcing channels (Burgers: `u, v, f_u, f_v`; Navier–Stokes: vorticity and its forcing), its
//! output has the state's channels, with its spatial mean per channel removed: the solvers keep
//! the mean, and a constant offset added every step would accumulate over a rollout.
//!
//! Methods ([`Method`]): **SRC** runs the solver alone; **NON** trains `C` on single steps from
//! reference states (input `(P(ref_i), f_i)`, target `ref_{i+1} − P(ref_i)`), a
//! [`ModelObjective`] with a squared-error head, so backprop applies; **ZO-SOL** unrolls `m`
//! steps of solver + correction from a reference state and compares with the reference over the
//! `m` steps ([`SolObjective`]): the solver is a black box, so the gradient is estimated with
//! sparse CGE. Two baselines train the same unrolled loss by backprop ([`SolGradient`]):
//! **sol-nograd** takes every solver step's output as a constant (the solver's Jacobian dropped,
//! so, like ZO-SOL, it needs no solver gradient: what a user without an adjoint would try
//! first), and **FO-SOL** chains the network's backprop with the solver's hand-written adjoint
//! ([`crate::adjoint`], Burgers 2-D only), the white-box upper bound. Every trained method is
//! one [`CorrectionTask`] for the core trainer.
//!
//! Defaults: a width-8 network with one residual block and 5×5 kernels (4,426 parameters), in
//! f32 on core's CPU kernels. NON: Adam 1e-3, 20 epochs of 100 steps of 10 windows, by backprop
//! (the solver is not involved). ZO-SOL: SOL-4 unrolling, sparse CGE over 10% of each weight
//! tensor and every bias (467 queries a step), Adam 1e-3 for 10 epochs of 10 steps, starting
//! from NON's trained network ([`SolStart::Non`]): backprop learns what needs no solver, and the
//! queries go to what only the unrolled solver shows. sol-nograd and FO-SOL: NON's schedule,
//! from a fresh network, SOL-4 (a step is one unrolled forward and backward).
//! `deepzero pde --solver burgers` runs in
//! minutes on two CPU cores. Solver-in-the-Loop's full protocol (5×5 kernels, 32 channels,
//! Adam 1e-4, 100 epochs of batch 5 over 10 training simulations) is
//! `deepzero pde --solver burgers --width 32 --blocks 2 --lr 1e-4 --epochs 100
//! --steps-per-epoch 394 --batch-size 5 --zo-sol-start scratch`; with about 107,000 parameters
//! its ZO-SOL needs about 10,700 queries a step, far beyond a CPU.
//!
//! Batches are `batch_size` windows `(simulation, start step)` drawn without replacement from
//! the stream `[PDE_STREAM, epoch, step]` of the run's seed, so a resumed run repeats them.

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Device, Tensor};
use deepzero_core::estimator::{Backprop, EstimatorConfig, EstimatorKind, GradientEstimator};
use deepzero_core::head::Head;
use deepzero_core::layout::ParamLayout;
use deepzero_core::model::{Activation, Mode, Model, ModelSpec, Precision};
use deepzero_core::objective::{ModelObjective, Objective};
use deepzero_core::query::{Difference, QueryEngine};
use deepzero_core::seed::stream_rng;
use deepzero_core::sparsity::{sparse_estimator, LayerRatios, SparseConfig};
use deepzero_core::task::{Metrics, Task};
use ndarray::Array3;
use serde::{Deserialize, Serialize};

use crate::dataset::{Dataset, DatasetConfig, GridSolver, Simulation};
use crate::error::{Error, Result};
use crate::solver::Solver;

/// Seed stream of the training windows (`"PDE"`).
pub const PDE_STREAM: u64 = 0x0050_4445;

/// How a correction is obtained.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// The source solver alone, no correction.
    Src,
    /// Trained on single steps from reference states, no solver in the loop (backprop).
    Non,
    /// Trained through `m` unrolled solver steps by backprop through the network's
    /// corrections only: each step's solver output is taken as a constant (its Jacobian
    /// dropped), so, like ZO-SOL, it needs no solver gradient.
    SolNograd,
    /// Trained through `m` unrolled solver steps, the solver a black box (sparse CGE).
    ZoSol,
    /// Trained through `m` unrolled solver steps with the exact gradient: the network's
    /// backprop chained with the solver's hand-written adjoint ([`crate::adjoint`], Burgers
    /// 2-D only). The white-box upper bound.
    FoSol,
}

impl Method {
    /// The name used on the command line and in reports (`src`, `non`, `sol-nograd`, `zo-sol`,
    /// `fo-sol`).
    pub fn name(self) -> &'static str {
        match self {
            Method::Src => "src",
            Method::Non => "non",
            Method::SolNograd => "sol-nograd",
            Method::ZoSol => "zo-sol",
            Method::FoSol => "fo-sol",
        }
    }

    /// Whether the method trains a network.
    pub fn trains(self) -> bool {
        !matches!(self, Method::Src)
    }

    /// Steps of solver + correction one training window unrolls (0 for SRC).
    pub fn unroll(self, config: &CorrectionConfig) -> usize {
        match self {
            Method::Src => 0,
            Method::Non => 1,
            Method::SolNograd | Method::ZoSol | Method::FoSol => config.unroll,
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Method {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "src" => Ok(Method::Src),
            "non" => Ok(Method::Non),
            "sol-nograd" | "solnograd" | "sol_nograd" | "nograd" => Ok(Method::SolNograd),
            "zo-sol" | "zosol" | "zo_sol" => Ok(Method::ZoSol),
            "fo-sol" | "fosol" | "fo_sol" => Ok(Method::FoSol),
            other => Err(Error::parameter(
                "method",
                other,
                "one of src, non, sol-nograd, zo-sol, fo-sol",
            )),
        }
    }
}

/// Where ZO-SOL's network starts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SolStart {
    /// A fresh network with its last convolution at zero: the uncorrected solver, as NON starts.
    Scratch,
    /// NON's trained network: ZO-SOL fine-tunes it through the solver. The part of the problem
    /// that needs no solver is learnt by backprop, and the queries go where only ZO can go.
    #[default]
    Non,
}

impl SolStart {
    /// The name used on the command line (`scratch`, `non`).
    pub fn name(self) -> &'static str {
        match self {
            SolStart::Scratch => "scratch",
            SolStart::Non => "non",
        }
    }
}

/// The correction network's size (a [`ModelSpec::CorrectionCnn`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkConfig {
    /// Channels of the hidden convolutions (default 8: 4,426 parameters with the other
    /// defaults, so that a ZO-SOL step of 10% of the weights is under 500 queries).
    pub width: usize,
    /// Residual blocks (default 1).
    pub blocks: usize,
    /// Odd kernel size (default 5, Solver-in-the-Loop's).
    pub kernel: usize,
    /// Nonlinearity (default tanh: the corrections are smooth and signed).
    pub activation: Activation,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self {
            width: 8,
            blocks: 1,
            kernel: 5,
            activation: Activation::Tanh,
        }
    }
}

impl NetworkConfig {
    /// The spec for states of `channels` channels.
    pub fn spec(&self, channels: usize) -> ModelSpec {
        ModelSpec::CorrectionCnn {
            width: self.width,
            blocks: self.blocks,
            kernel: self.kernel,
            out_channels: channels,
            activation: self.activation,
        }
    }

    /// The network for a data set: inputs `[2·channels, n, n]` (state, forcing), output the
    /// state's channels; its last convolution starts at zero.
    pub fn build(&self, data: &DatasetConfig) -> Result<Model> {
        let channels = data.problem.channels();
        let n = data.source_size;
        Ok(Model::build_image(
            &self.spec(channels),
            [2 * channels, n, n],
        )?)
    }
}

/// How long and how fast one trained method runs: Adam with cosine decay of `lr` over
/// `epochs` of `steps_per_epoch` steps ([`train_config`]).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Schedule {
    /// Epochs.
    pub epochs: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Optimizer steps per epoch.
    pub steps_per_epoch: usize,
}

/// NON's default schedule, also the default of the unrolled backprop baselines.
const NON_SCHEDULE: Schedule = Schedule {
    epochs: 20,
    lr: 1e-3,
    steps_per_epoch: 100,
};

/// Settings of correction training besides the seed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CorrectionConfig {
    /// Windows per optimizer step (default 10; Solver-in-the-Loop's batch is 5: ZO-SOL's
    /// fine-tuning signal is small beside the batch noise at 5, and NON fits better at 10).
    pub batch_size: usize,
    /// NON's schedule (default 20 epochs of 100 steps, Adam 1e-3: backprop is cheap, and the
    /// one-step fit needs about 2,000 steps before its rollouts beat the plain solver).
    pub non: Schedule,
    /// ZO-SOL's schedule (default 10 epochs of 10 steps, Adam 1e-3: every step costs a query
    /// per sampled coordinate, each `unroll` solver steps long).
    pub zo_sol: Schedule,
    /// The schedule of the backprop baselines through the unrolled solver, sol-nograd and
    /// fo-sol (default NON's: 20 epochs of 100 steps, Adam 1e-3). They start from a fresh
    /// network, as NON does: a step costs one unrolled forward and backward.
    pub sol: Schedule,
    /// Unrolled steps `m` of ZO-SOL (default 4, SOL-4).
    pub unroll: usize,
    /// Fraction of each weight tensor left out of every sparse CGE step (default 0.9; biases
    /// are always estimated).
    pub sparsity: f64,
    /// Epochs between redraws of the sparse coordinate sets (default 1).
    pub mask_interval: usize,
    /// Finite-difference step μ of CGE (default 1e-3, forward differences).
    pub mu: f64,
    /// Precision of the network (default f32, on core's CPU kernels; f64 runs on candle). The
    /// solvers always run in f64.
    pub precision: Precision,
    /// Where ZO-SOL starts (default [`SolStart::Non`]: it fine-tunes NON's network).
    pub sol_start: SolStart,
}

impl Default for CorrectionConfig {
    fn default() -> Self {
        Self {
            batch_size: 10,
            non: NON_SCHEDULE,
            zo_sol: Schedule {
                epochs: 10,
                lr: 1e-3,
                steps_per_epoch: 10,
            },
            sol: NON_SCHEDULE,
            unroll: 4,
            sparsity: 0.9,
            mask_interval: 1,
            mu: 1e-3,
            precision: Precision::F32,
            sol_start: SolStart::Non,
        }
    }
}

impl CorrectionConfig {
    /// The schedule of a trained method (NON's for SRC, which trains nothing).
    pub fn schedule(&self, method: Method) -> &Schedule {
        match method {
            Method::ZoSol => &self.zo_sol,
            Method::SolNograd | Method::FoSol => &self.sol,
            Method::Src | Method::Non => &self.non,
        }
    }

    /// Checks the counts; the sparsity and μ are checked by core when the estimator is built.
    pub fn validate(&self, data: &DatasetConfig) -> Result<()> {
        if self.batch_size == 0 {
            return Err(Error::parameter(
                "batch_size",
                0,
                "at least 1 window per step",
            ));
        }
        for (name, schedule) in [
            ("non.steps_per_epoch", &self.non),
            ("zo_sol.steps_per_epoch", &self.zo_sol),
            ("sol.steps_per_epoch", &self.sol),
        ] {
            if schedule.steps_per_epoch == 0 {
                return Err(Error::parameter(name, 0, "at least 1 step per epoch"));
            }
        }
        if self.unroll == 0 || self.unroll > data.steps {
            return Err(Error::parameter(
                "unroll",
                self.unroll,
                format!("between 1 and the simulation length ({} steps)", data.steps),
            ));
        }
        Ok(())
    }
}

/// A simulation prepared for correction: its source solver, reference states and forcings.
pub struct PreparedSimulation {
    solver: GridSolver,
    reference: Vec<Array3<f64>>,
    forcing: Vec<Array3<f64>>,
}

impl PreparedSimulation {
    /// Builds the source solver of `simulation` and samples its forcing at every step.
    pub fn new(dataset: &Dataset, simulation: &Simulation) -> Result<Self> {
        let solver = dataset.source_solver(simulation)?;
        let steps = simulation.reference.len().saturating_sub(1);
        let forcing = (0..steps)
            .map(|step| solver.forcing_at(step))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            solver,
            reference: simulation.reference.clone(),
            forcing,
        })
    }

    /// Steps of the simulation.
    pub fn steps(&self) -> usize {
        self.forcing.len()
    }

    /// The downsampled reference states.
    pub fn reference(&self) -> &[Array3<f64>] {
        &self.reference
    }
}

/// Prepares every simulation of a slice of the data set.
pub fn prepare(dataset: &Dataset, simulations: &[Simulation]) -> Result<Vec<PreparedSimulation>> {
    simulations
        .iter()
        .map(|s| PreparedSimulation::new(dataset, s))
        .collect()
}

/// Fixed scales of the network's inputs and outputs, measured once on the training data: the
/// network sees `state / input[c]` and `forcing / input[channels + c]`, and its output is
/// multiplied by `output[c]`. Raw Burgers velocities reach ±20 while one step's correction is
/// about 0.1, so without them a tanh network saturates and an optimizer step of a given size
/// means very different corrections on different problems.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Scaling {
    /// Root-mean-square of each input channel (state channels, then forcing channels).
    pub input: Vec<f64>,
    /// Root-mean-square of each channel of the one-step residual `ref_{i+1} − P(ref_i)`.
    pub output: Vec<f64>,
}

impl Scaling {
    /// Scales of no effect (every factor 1) for states of `channels` channels.
    pub fn identity(channels: usize) -> Self {
        Self {
            input: vec![1.0; 2 * channels],
            output: vec![1.0; channels],
        }
    }

    /// Measures the scales on every step of `simulations` (one solver step per reference
    /// state); channels with no signal get scale 1.
    pub fn measure(simulations: &[PreparedSimulation]) -> Result<Self> {
        let Some(first) = simulations.first().and_then(|s| s.reference.first()) else {
            return Err(Error::parameter(
                "train_simulations",
                0,
                "at least one training simulation to measure scales on",
            ));
        };
        let channels = first.shape()[0];
        let mut input = vec![0.0; 2 * channels];
        let mut output = vec![0.0; channels];
        let mut count = 0.0;
        for s in simulations {
            for step in 0..s.steps() {
                let state = &s.reference[step];
                let predicted = s.solver.step(state, step)?;
                let residual = &s.reference[step + 1] - &predicted;
                for c in 0..channels {
                    let ms = |a: &Array3<f64>| {
                        let ch = a.index_axis(ndarray::Axis(0), c);
                        ch.iter().map(|v| v * v).sum::<f64>() / ch.len().max(1) as f64
                    };
                    input[c] += ms(&predicted);
                    input[channels + c] += ms(&s.forcing[step]);
                    output[c] += ms(&residual);
                }
                count += 1.0;
            }
        }
        let finish = |v: Vec<f64>| -> Vec<f64> {
            v.into_iter()
                .map(|m| {
                    let rms = (m / f64::max(count, 1.0)).sqrt();
                    if rms.is_finite() && rms > 1e-12 {
                        rms
                    } else {
                        1.0
                    }
                })
                .collect()
        };
        Ok(Self {
            input: finish(input),
            output: finish(output),
        })
    }
}

/// The correction network's parameters in the form its forward takes: f32 on the CPU runs on
/// core's kernels ([`deepzero_core::fast::forward`]), anything else on candle.
pub enum Weights {
    /// Flat f32 parameters for core's CPU kernels.
    Host(Vec<f32>),
    /// Candle parameter views (f64, or another device).
    Candle(Vec<Tensor>),
}

impl Weights {
    /// The weights of `model` from a flat parameter tensor.
    pub fn new(model: &Model, params: &Tensor) -> deepzero_core::Result<Self> {
        if params.dtype() == DType::F32 && params.device().is_cpu() {
            Ok(Weights::Host(params.to_vec1::<f32>()?))
        } else {
            Ok(Weights::Candle(model.param_views(params)?))
        }
    }

    /// The weights of `model` from flat f64 values (an objective's query point), in `precision`.
    pub fn from_values(
        model: &Model,
        params: &[f64],
        precision: Precision,
    ) -> deepzero_core::Result<Self> {
        match precision {
            Precision::F32 => Ok(Weights::Host(params.iter().map(|&v| v as f32).collect())),
            Precision::F64 => {
                let flat = Tensor::from_slice(params, params.len(), &Device::Cpu)?;
                Ok(Weights::Candle(model.param_views(&flat)?))
            }
        }
    }

    /// The network's output on the scaled `(predicted, forcing)` ([`network_input`]),
    /// batch-major in f64.
    fn forward(
        &self,
        model: &Model,
        scaling: &Scaling,
        predicted: &[Array3<f64>],
        forcing: &[&Array3<f64>],
    ) -> deepzero_core::Result<Vec<f64>> {
        let [c, h, w] = model.input_shape;
        let n = predicted.len();
        match self {
            Weights::Host(params) => HOST_INPUT.with(|buffer| {
                // Straight to f32 (the same values as the f64 input rounded), into a buffer
                // each thread keeps: a fresh one per query costs the allocator's page faults.
                let x = &mut *buffer.borrow_mut();
                fill_network_input(x, scaling, predicted, forcing);
                deepzero_core::fast::forward(model, params, x, n)
            }),
            Weights::Candle(views) => {
                let input: Vec<f64> = network_input(scaling, predicted, forcing);
                let x = Tensor::from_vec(input, (n, c, h, w), &Device::Cpu)?;
                let x = x.to_dtype(views.first().map_or(DType::F64, |v| v.dtype()))?;
                let out = model.forward(views, &x, Mode::Train)?;
                Ok(out.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?)
            }
        }
    }
}

/// `predicted + C(predicted, forcing)` for a batch, one forward of the network on the scaled
/// inputs ([`Scaling`]); the network's output has its spatial mean per channel removed (the
/// correction moves no momentum) and is multiplied by the output scale.
pub fn apply_correction(
    model: &Model,
    scaling: &Scaling,
    weights: &Weights,
    predicted: &[Array3<f64>],
    forcing: &[&Array3<f64>],
) -> deepzero_core::Result<Vec<Array3<f64>>> {
    if predicted.is_empty() {
        return Ok(Vec::new());
    }
    let out = weights.forward(model, scaling, predicted, forcing)?;
    add_change(scaling, predicted, &out)
}

thread_local! {
    /// Each thread's f32 input buffer of the correction network.
    static HOST_INPUT: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The network's input for a batch: each prediction's channels, then its forcing's, each
/// divided (in f64) by its input scale ([`Scaling::input`]); batch-major, in `T`.
fn network_input<T: InputValue>(
    scaling: &Scaling,
    predicted: &[Array3<f64>],
    forcing: &[&Array3<f64>],
) -> Vec<T> {
    let mut input = Vec::new();
    fill_network_input(&mut input, scaling, predicted, forcing);
    input
}

/// [`network_input`] into `input` (cleared first).
fn fill_network_input<T: InputValue>(
    input: &mut Vec<T>,
    scaling: &Scaling,
    predicted: &[Array3<f64>],
    forcing: &[&Array3<f64>],
) {
    input.clear();
    let Some(first) = predicted.first() else {
        return;
    };
    let (channels, n, m) = first.dim();
    let plane = n * m;
    input.reserve(predicted.len() * 2 * channels * plane);
    for (state, f) in predicted.iter().zip(forcing) {
        for (c, scale) in scaling.input.iter().enumerate() {
            let channel = if c < channels {
                state.index_axis(ndarray::Axis(0), c)
            } else {
                f.index_axis(ndarray::Axis(0), c - channels)
            };
            match channel.as_slice() {
                Some(values) => input.extend(values.iter().map(|&v| T::from_f64(v / scale))),
                None => input.extend(channel.iter().map(|&v| T::from_f64(v / scale))),
            }
        }
    }
}

/// What [`network_input`] writes: f64, or f32 rounded from the f64 quotient.
trait InputValue {
    fn from_f64(v: f64) -> Self;
}

impl InputValue for f64 {
    fn from_f64(v: f64) -> Self {
        v
    }
}

impl InputValue for f32 {
    fn from_f64(v: f64) -> Self {
        v as f32
    }
}

/// `predicted + change(out)` per sample, where the change is the network's output `out`
/// (batch-major) with its spatial mean per channel removed, times the output scale.
fn add_change(
    scaling: &Scaling,
    predicted: &[Array3<f64>],
    out: &[f64],
) -> deepzero_core::Result<Vec<Array3<f64>>> {
    let Some(first) = predicted.first() else {
        return Ok(Vec::new());
    };
    let (channels, n, m) = first.dim();
    let plane = n * m;
    if out.len() != predicted.len() * channels * plane {
        return Err(deepzero_core::Error::Shape(format!(
            "a network output of {} values for {} states of {channels}×{n}×{m}",
            out.len(),
            predicted.len()
        )));
    }
    Ok(predicted
        .iter()
        .zip(out.chunks_exact(channels * plane))
        .map(|(state, change)| {
            let mut next = state.clone();
            // Mean-free per channel: both solvers keep the spatial mean (momentum, total
            // vorticity) up to interpolation error, and a constant offset added every step
            // would grow linearly over a rollout.
            for (c, mut channel) in next.outer_iter_mut().enumerate() {
                let change = &change[c * plane..(c + 1) * plane];
                let mean = ndarray::ArrayView1::from(change).mean().unwrap_or(0.0);
                let scale = scaling.output[c];
                channel
                    .iter_mut()
                    .zip(change)
                    .for_each(|(s, &v)| *s += (v - mean) * scale);
            }
            next
        })
        .collect())
}

/// The adjoint of [`add_change`]'s change with respect to the network's output: the
/// cotangent `λ` of the corrected state, per channel mean-free and times the output scale
/// (the map is a scaled orthogonal projection, so it is its own adjoint). Batch-major.
fn change_adjoint(scaling: &Scaling, lambdas: &[Array3<f64>]) -> Vec<f64> {
    let mut out = Vec::with_capacity(lambdas.iter().map(|l| l.len()).sum());
    for lambda in lambdas {
        for (c, channel) in lambda.outer_iter().enumerate() {
            let mean = channel.mean().unwrap_or(0.0);
            let scale = scaling.output[c];
            out.extend(channel.iter().map(|&v| (v - mean) * scale));
        }
    }
    out
}

/// A PDE error as core sees it: blow-ups are divergence, the rest configuration.
pub fn to_core(error: Error) -> deepzero_core::Error {
    // With a correction in the loop, a blow-up means its output grew too large: the solver's
    // own advice (a smaller Δt) does not apply.
    const CAUSE: &str = "the correction network's output is too large; lower the learning rate \
                         (or μ)";
    match error {
        Error::Cfl {
            step, cfl, limit, ..
        } => deepzero_core::Error::Diverged(format!(
            "the corrected state blew up at solver step {step} (CFL number {cfl:.3e} > {limit}): \
             {CAUSE}"
        )),
        Error::NonFinite { step, field, .. } => deepzero_core::Error::Diverged(format!(
            "the corrected {field} has NaN or infinite values at solver step {step}: {CAUSE}"
        )),
        other => deepzero_core::Error::Config(other.to_string()),
    }
}

/// Mean squared difference of two states, each channel divided by `scale[c]²`.
fn mean_squared(a: &Array3<f64>, b: &Array3<f64>, scale: &[f64]) -> f64 {
    let n = a.len().max(1) as f64;
    let plane = (a.len() / a.shape()[0].max(1)).max(1);
    if let (Some(a), Some(b)) = (a.as_slice(), b.as_slice()) {
        // One running sum in element order, as below, without a division per index.
        let mut sum = 0.0;
        for ((x, y), s) in a.chunks(plane).zip(b.chunks(plane)).zip(scale) {
            for (x, y) in x.iter().zip(y) {
                let d = (x - y) / s;
                sum += d * d;
            }
        }
        return sum / n;
    }
    a.iter()
        .zip(b)
        .enumerate()
        .map(|(i, (x, y))| {
            let d = (x - y) / scale[i / plane];
            d * d
        })
        .sum::<f64>()
        / n
}

/// A training window: simulation index and start step.
pub type Window = (usize, usize);

/// ZO-SOL's loss: `m` unrolled steps of solver + correction from reference states, the mean
/// squared error against the reference averaged over the steps, the windows and the grid, each
/// channel in units of its one-step residual ([`Scaling::output`], NON's units: a fresh
/// network scores about 1 on one step). Without them a Navier–Stokes loss is about 1e-11, and
/// its gradients fall below Adam's ε.
///
/// The solver runs as a black box on the host; the network runs on core's kernels in f32 (or
/// candle in f64, [`Precision`]). Nothing in it is random, so the loss is a deterministic
/// function of the parameters.
pub struct SolObjective<'a> {
    model: &'a Model,
    scaling: &'a Scaling,
    simulations: &'a [PreparedSimulation],
    windows: Vec<Window>,
    unroll: usize,
    precision: Precision,
    /// The solver's first step from each window's reference state: it does not depend on the
    /// network, so every query shares it.
    first: Vec<Array3<f64>>,
    /// Which gradient [`Objective::loss_and_grad`] gives (none: a black box for ZO-SOL).
    gradient: SolGradient,
}

/// The gradient of the unrolled loss that a [`SolObjective`] offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SolGradient {
    /// None: the solver is a black box (ZO-SOL estimates the gradient from losses).
    #[default]
    None,
    /// Backprop through the network's corrections only, every solver step's output taken as
    /// a constant (sol-nograd): each step's correction sees the gradient of that step's own
    /// loss term.
    NoSolver,
    /// The exact gradient: the network's backprop chained with the solver's adjoint through
    /// every unrolled step (fo-sol; [`GridSolver::step_vjp`]).
    Exact,
}

impl<'a> SolObjective<'a> {
    /// The loss over `windows` (each `start + unroll ≤ steps` of its simulation), the network
    /// run in `precision`.
    pub fn new(
        model: &'a Model,
        scaling: &'a Scaling,
        simulations: &'a [PreparedSimulation],
        windows: Vec<Window>,
        unroll: usize,
        precision: Precision,
    ) -> Result<Self> {
        if windows.is_empty() || unroll == 0 {
            return Err(Error::parameter(
                "windows",
                windows.len(),
                "at least one window and one unrolled step",
            ));
        }
        for &(sim, start) in &windows {
            let ok = simulations
                .get(sim)
                .is_some_and(|s| start + unroll <= s.steps());
            if !ok {
                return Err(Error::parameter(
                    "windows",
                    format!("({sim}, {start})"),
                    format!("a simulation index and a start with {unroll} steps after it"),
                ));
            }
        }
        Ok(Self {
            model,
            scaling,
            simulations,
            first: windows
                .iter()
                .map(|&(sim, start)| {
                    let s = &simulations[sim];
                    s.solver.step(&s.reference[start], start)
                })
                .collect::<Result<Vec<_>>>()?,
            windows,
            unroll,
            precision,
            gradient: SolGradient::None,
        })
    }

    /// The same objective with `gradient` offered by [`Objective::loss_and_grad`] (an exact one
    /// through [`GridSolver::step_vjp`]).
    pub fn with_gradient(mut self, gradient: SolGradient) -> Self {
        self.gradient = gradient;
        self
    }

    /// The loss and its gradient (`exact`: through the solver's adjoint; otherwise with the
    /// solver's Jacobian dropped), in the parameters' dtype.
    ///
    /// Forward: `s_{k+1} = p_k + A(N(θ, x_k))` with `p_k = P(s_k)`, `x_k` the scaled
    /// `(p_k, f_k)`, `A` the mean removal and output scale. Backward, `λ_k = ∂L/∂s_k`:
    /// `λ_{k+1}` goes through `A` (its own adjoint) to the network's output; the network's
    /// backprop gives `∂L/∂θ` and, for the exact gradient, `∂L/∂x_k`, whose state part over
    /// the input scale joins `λ_{k+1}` as `∂L/∂p_k`; the solver's adjoint takes that to
    /// `s_k`, where `s_k`'s own loss term adds. Without the solver's Jacobian each step's
    /// network sees only its own loss term.
    fn unrolled_loss_and_grad(
        &self,
        params: &Tensor,
        exact: bool,
    ) -> deepzero_core::Result<(f64, Tensor)> {
        let Some(first) = self.first.first() else {
            return Err(deepzero_core::Error::Shape("no windows".into()));
        };
        let (channels, n, m) = first.dim();
        let plane = n * m;
        let batch = self.windows.len();
        let norm = (self.unroll * batch * first.len()) as f64;
        let network = NetworkGradient::new(self.model, params)?;
        // States entering each unrolled step after the first, the tapes of the network's
        // forwards, and each corrected state's own loss gradient.
        let mut entering: Vec<Vec<Array3<f64>>> = Vec::with_capacity(self.unroll);
        let mut tapes = Vec::with_capacity(self.unroll);
        let mut direct: Vec<Vec<Array3<f64>>> = Vec::with_capacity(self.unroll);
        let mut states: Vec<Array3<f64>> = Vec::new();
        let mut total = 0.0;
        for offset in 0..self.unroll {
            let predicted = if offset == 0 {
                self.first.clone()
            } else {
                let stepped = self.step_all(&states, offset)?;
                entering.push(std::mem::take(&mut states));
                stepped
            };
            let forcing = self.forcing(offset);
            let (out, tape) = network.forward(self.model, self.scaling, &predicted, &forcing)?;
            states = add_change(self.scaling, &predicted, &out)?;
            tapes.push(tape);
            let mut grads = Vec::with_capacity(batch);
            for (&(sim, start), state) in self.windows.iter().zip(&states) {
                let target = &self.simulations[sim].reference[start + offset + 1];
                total += mean_squared(state, target, &self.scaling.output);
                let mut g = state - target;
                for (c, mut channel) in g.outer_iter_mut().enumerate() {
                    let s = self.scaling.output[c];
                    channel.mapv_inplace(|v| 2.0 * v / (s * s * norm));
                }
                grads.push(g);
            }
            direct.push(grads);
        }
        let loss = total / (self.unroll * batch) as f64;
        if !loss.is_finite() {
            return Err(deepzero_core::Error::Diverged(format!(
                "the unrolled loss is {loss}; lower the learning rate"
            )));
        }
        let mut grad = vec![0.0f64; self.model.num_params()];
        // λ of the states the last step produced.
        let mut lambda = direct.pop().expect("unroll ≥ 1");
        for offset in (0..self.unroll).rev() {
            let d_out = change_adjoint(self.scaling, &lambda);
            let tape = tapes.pop().expect("one tape per step");
            let (d_params, d_input) = network.backward(tape, &d_out, exact)?;
            grad.iter_mut().zip(&d_params).for_each(|(g, d)| *g += d);
            if offset == 0 {
                break;
            }
            let mut next = direct.pop().expect("one gradient per step");
            if exact {
                let sources = entering.pop().expect("one entering state per later step");
                let sample = 2 * channels * plane;
                for (w, (&(sim, _), source)) in self.windows.iter().zip(&sources).enumerate() {
                    // ∂L/∂p: the corrected state's cotangent plus the network input's.
                    let mut d_predicted = lambda[w].clone();
                    for (i, v) in d_predicted.iter_mut().enumerate() {
                        *v += d_input[w * sample + i] / self.scaling.input[i / plane];
                    }
                    let back = self.simulations[sim]
                        .solver
                        .step_vjp(source, &d_predicted)
                        .map_err(to_core)?;
                    next[w] += &back;
                }
            }
            lambda = next;
        }
        let grad = Tensor::from_vec(grad, self.model.num_params(), params.device())?
            .to_dtype(params.dtype())?;
        Ok((loss, grad))
    }

    /// One solver step of every window's state at unrolled step `offset`.
    fn step_all(
        &self,
        states: &[Array3<f64>],
        offset: usize,
    ) -> deepzero_core::Result<Vec<Array3<f64>>> {
        self.windows
            .iter()
            .zip(states)
            .map(|(&(sim, start), state)| {
                self.simulations[sim]
                    .solver
                    .step(state, start + offset)
                    .map_err(to_core)
            })
            .collect()
    }

    /// The forcing every window's network sees at unrolled step `offset`.
    fn forcing(&self, offset: usize) -> Vec<&Array3<f64>> {
        self.windows
            .iter()
            .map(|&(sim, start)| &self.simulations[sim].forcing[start + offset])
            .collect()
    }

    /// The loss with the network's weights.
    fn loss_with(&self, weights: &Weights) -> deepzero_core::Result<f64> {
        let mut states: Vec<Array3<f64>> = Vec::new();
        let mut total = 0.0;
        for offset in 0..self.unroll {
            // The first step is shared (borrowed, not copied per query).
            let stepped: Vec<Array3<f64>>;
            let predicted: &[Array3<f64>] = if offset == 0 {
                &self.first
            } else {
                stepped = self.step_all(&states, offset)?;
                &stepped
            };
            let forcing = self.forcing(offset);
            states = apply_correction(self.model, self.scaling, weights, predicted, &forcing)?;
            for (&(sim, start), state) in self.windows.iter().zip(&states) {
                let target = &self.simulations[sim].reference[start + offset + 1];
                total += mean_squared(state, target, &self.scaling.output);
            }
        }
        let loss = total / (self.unroll * self.windows.len()) as f64;
        if loss.is_finite() {
            Ok(loss)
        } else {
            Err(deepzero_core::Error::Diverged(format!(
                "the ZO-SOL loss is {loss}; lower the learning rate or μ"
            )))
        }
    }
}

impl Objective for SolObjective<'_> {
    fn layout(&self) -> &ParamLayout {
        &self.model.layout
    }
    fn loss(&self, params: &[f64]) -> deepzero_core::Result<f64> {
        self.loss_with(&Weights::from_values(self.model, params, self.precision)?)
    }
    fn loss_and_grad(&self, params: &Tensor) -> deepzero_core::Result<Option<(f64, Tensor)>> {
        match self.gradient {
            SolGradient::None => Ok(None),
            SolGradient::NoSolver => self.unrolled_loss_and_grad(params, false).map(Some),
            SolGradient::Exact => self.unrolled_loss_and_grad(params, true).map(Some),
        }
    }
}

/// The correction network's forward with what its backward needs: on core's kernels for f32
/// parameters on the CPU ([`deepzero_core::fast::backprop::Trace`]), by candle autograd
/// otherwise.
enum NetworkGradient {
    Host(Vec<f32>),
    Candle(candle_core::Var, Vec<Tensor>),
}

/// One forward of [`NetworkGradient`], kept for its backward.
enum Tape<'a> {
    Host(deepzero_core::fast::backprop::Trace<'a>),
    Candle(candle_core::Var, Tensor),
}

impl NetworkGradient {
    fn new(model: &Model, params: &Tensor) -> deepzero_core::Result<Self> {
        if params.dtype() == DType::F32 && params.device().is_cpu() {
            Ok(NetworkGradient::Host(params.to_vec1::<f32>()?))
        } else {
            let var = candle_core::Var::from_tensor(params)?;
            let views = model.param_views(var.as_tensor())?;
            Ok(NetworkGradient::Candle(var, views))
        }
    }

    /// The output (batch-major, f64) on the scaled `(predicted, forcing)` and its tape.
    fn forward<'a>(
        &'a self,
        model: &'a Model,
        scaling: &Scaling,
        predicted: &[Array3<f64>],
        forcing: &[&Array3<f64>],
    ) -> deepzero_core::Result<(Vec<f64>, Tape<'a>)> {
        let n = predicted.len();
        match self {
            NetworkGradient::Host(params) => {
                let x: Vec<f32> = network_input(scaling, predicted, forcing);
                let trace = deepzero_core::fast::backprop::Trace::forward(model, params, &x, n)?;
                Ok((trace.output_batch_major(), Tape::Host(trace)))
            }
            NetworkGradient::Candle(var, views) => {
                let [c, h, w] = model.input_shape;
                let input: Vec<f64> = network_input(scaling, predicted, forcing);
                let x =
                    Tensor::from_vec(input, (n, c, h, w), var.device())?.to_dtype(var.dtype())?;
                let x = candle_core::Var::from_tensor(&x)?;
                let out = model.forward(views, x.as_tensor(), Mode::Train)?;
                let values = out.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
                Ok((values, Tape::Candle(x, out)))
            }
        }
    }

    /// The gradients of `Σ output · d_out` with respect to the parameters (flat, f64) and, when
    /// `input` is asked for, the input (batch-major; empty otherwise).
    fn backward(
        &self,
        tape: Tape<'_>,
        d_out: &[f64],
        input: bool,
    ) -> deepzero_core::Result<(Vec<f64>, Vec<f64>)> {
        match (self, tape) {
            (NetworkGradient::Host(_), Tape::Host(trace)) => {
                if input {
                    trace.backward_with_input(d_out)
                } else {
                    Ok((trace.backward_batch_major(d_out)?, Vec::new()))
                }
            }
            (NetworkGradient::Candle(var, _), Tape::Candle(x, out)) => {
                let g =
                    Tensor::from_slice(d_out, out.shape(), out.device())?.to_dtype(out.dtype())?;
                let grads = (out * g)?.sum_all()?.backward()?;
                let flat = |t: Option<&Tensor>, like: &Tensor| -> deepzero_core::Result<Vec<f64>> {
                    Ok(match t {
                        Some(t) => t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?,
                        None => vec![0.0; like.elem_count()],
                    })
                };
                let d_params = flat(grads.get(var.as_tensor()), var.as_tensor())?;
                let d_input = if input {
                    flat(grads.get(x.as_tensor()), x.as_tensor())?
                } else {
                    Vec::new()
                };
                Ok((d_params, d_input))
            }
            _ => Err(deepzero_core::Error::Config(
                "a network tape of another kind".into(),
            )),
        }
    }
}

/// NON's objective on `windows`: input `(P(ref_i), f_i)`, target `ref_{i+1} − P(ref_i)`, both
/// scaled ([`Scaling`]), mean squared error (a [`ModelObjective`] with [`Head::SquaredError`],
/// so backprop applies), the batch in `precision`.
pub fn non_objective<'a>(
    model: &'a Model,
    scaling: &Scaling,
    simulations: &[PreparedSimulation],
    windows: &[Window],
    precision: Precision,
) -> deepzero_core::Result<ModelObjective<'a>> {
    let mut targets: Vec<f64> = Vec::new();
    let mut input: Vec<f64> = Vec::new();
    for &(sim, start) in windows {
        let s = simulations.get(sim).ok_or_else(|| {
            deepzero_core::Error::Shape(format!("no simulation {sim} in the training set"))
        })?;
        let p = s.solver.step(&s.reference[start], start).map_err(to_core)?;
        let plane = p.shape()[1] * p.shape()[2];
        let channels = p.shape()[0];
        let residual = &s.reference[start + 1] - &p;
        targets.extend(
            residual
                .iter()
                .enumerate()
                .map(|(i, v)| v / scaling.output[i / plane]),
        );
        input.extend(
            p.iter()
                .enumerate()
                .map(|(i, v)| v / scaling.input[i / plane]),
        );
        input.extend(
            s.forcing[start]
                .iter()
                .enumerate()
                .map(|(i, v)| v / scaling.input[channels + i / plane]),
        );
    }
    let [c, h, w] = model.input_shape;
    let x = Tensor::from_vec(input, (windows.len(), c, h, w), &Device::Cpu)?
        .to_dtype(precision.dtype())?;
    ModelObjective::new(model, x, Head::squared_error(targets))
}

/// Test figures of a correction: rollouts of every test simulation from its first reference
/// state over all its steps.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RolloutErrors {
    /// Mean absolute error against the reference per step (index 0 is the shared initial
    /// state), averaged over the simulations.
    pub mae_per_step: Vec<f64>,
    /// Per simulation, the mean absolute error over steps `1..=steps`.
    pub mae_per_simulation: Vec<f64>,
}

impl RolloutErrors {
    /// Mean over simulations of the per-simulation MAE (= mean over steps and simulations).
    pub fn mae(&self) -> f64 {
        let n = self.mae_per_simulation.len().max(1) as f64;
        self.mae_per_simulation.iter().sum::<f64>() / n
    }

    /// Population standard deviation of the per-simulation MAE.
    pub fn mae_std(&self) -> f64 {
        let n = self.mae_per_simulation.len().max(1) as f64;
        let mean = self.mae();
        (self
            .mae_per_simulation
            .iter()
            .map(|v| (v - mean) * (v - mean))
            .sum::<f64>()
            / n)
            .sqrt()
    }
}

/// Corrected (or, with `network = None`, plain SRC) rollouts of `simulations` from their first
/// reference state; all simulations advance together so the network sees one batch per step.
/// Returns the errors and the trajectories.
pub fn rollouts(
    simulations: &[PreparedSimulation],
    network: Option<(&Model, &Scaling, &Tensor)>,
) -> deepzero_core::Result<(RolloutErrors, Vec<Vec<Array3<f64>>>)> {
    let weights = match network {
        Some((model, scaling, params)) => Some((model, scaling, Weights::new(model, params)?)),
        None => None,
    };
    let steps = simulations.iter().map(|s| s.steps()).min().unwrap_or(0);
    let mut trajectories: Vec<Vec<Array3<f64>>> = simulations
        .iter()
        .map(|s| vec![s.reference[0].clone()])
        .collect();
    for step in 0..steps {
        let predicted = simulations
            .iter()
            .zip(&trajectories)
            .map(|(s, t)| s.solver.step(&t[step], step).map_err(to_core))
            .collect::<deepzero_core::Result<Vec<_>>>()?;
        let next = match &weights {
            Some((model, scaling, weights)) => {
                let forcing: Vec<&Array3<f64>> =
                    simulations.iter().map(|s| &s.forcing[step]).collect();
                apply_correction(model, scaling, weights, &predicted, &forcing)?
            }
            None => predicted,
        };
        for (t, state) in trajectories.iter_mut().zip(next) {
            t.push(state);
        }
    }
    let abs_error = |s: &PreparedSimulation, t: &[Array3<f64>], step: usize| {
        let (a, b) = (&t[step], &s.reference[step]);
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).sum::<f64>() / a.len().max(1) as f64
    };
    let mae_per_step = (0..=steps)
        .map(|step| {
            simulations
                .iter()
                .zip(&trajectories)
                .map(|(s, t)| abs_error(s, t, step))
                .sum::<f64>()
                / simulations.len().max(1) as f64
        })
        .collect();
    let mae_per_simulation = simulations
        .iter()
        .zip(&trajectories)
        .map(|(s, t)| {
            (1..=steps).map(|step| abs_error(s, t, step)).sum::<f64>() / steps.max(1) as f64
        })
        .collect();
    Ok((
        RolloutErrors {
            mae_per_step,
            mae_per_simulation,
        },
        trajectories,
    ))
}

/// NON or ZO-SOL training of a correction network, as a core [`Task`]: objectives from seeded
/// windows of the training simulations, the test rollouts' MAE (`test_mae`) as the metric.
pub struct CorrectionTask<'a> {
    method: Method,
    model: &'a Model,
    scaling: &'a Scaling,
    train: &'a [PreparedSimulation],
    test: &'a [PreparedSimulation],
    config: CorrectionConfig,
    windows: Vec<Window>,
}

impl<'a> CorrectionTask<'a> {
    /// A task for `method` (NON or ZO-SOL).
    pub fn new(
        method: Method,
        model: &'a Model,
        scaling: &'a Scaling,
        train: &'a [PreparedSimulation],
        test: &'a [PreparedSimulation],
        config: CorrectionConfig,
    ) -> Result<Self> {
        let unroll = method.unroll(&config);
        if method == Method::Src {
            return Err(not_trained(method));
        }
        if config.batch_size == 0 || config.schedule(method).steps_per_epoch == 0 || unroll == 0 {
            return Err(Error::parameter(
                "batch_size",
                config.batch_size,
                "a positive batch size, steps per epoch and unroll",
            ));
        }
        let windows: Vec<Window> = train
            .iter()
            .enumerate()
            .flat_map(|(sim, s)| {
                (0..=s.steps().saturating_sub(unroll)).map(move |start| (sim, start))
            })
            .filter(|&(sim, start)| start + unroll <= train[sim].steps())
            .collect();
        if windows.is_empty() || test.is_empty() {
            return Err(Error::parameter(
                "train_simulations",
                train.len(),
                "at least one training and one test simulation with enough steps to unroll",
            ));
        }
        Ok(Self {
            method,
            model,
            scaling,
            train,
            test,
            config,
            windows,
        })
    }

    /// Every window a batch may draw from.
    pub fn windows(&self) -> &[Window] {
        &self.windows
    }

    /// The windows of step `step` of epoch `epoch`: `batch_size` distinct windows (fewer if the
    /// data has fewer) from the stream `[PDE_STREAM, epoch, step]` of `seed`.
    pub fn batch(&self, epoch: usize, step: usize, seed: u64) -> Vec<Window> {
        let mut rng = stream_rng(seed, &[PDE_STREAM, epoch as u64, step as u64]);
        let count = self.config.batch_size.min(self.windows.len());
        rand::seq::index::sample(&mut rng, self.windows.len(), count)
            .into_iter()
            .map(|i| self.windows[i])
            .collect()
    }

    /// The unrolled objective on explicit windows (ZO-SOL's; with the gradient of the method
    /// for sol-nograd and fo-sol).
    pub fn sol_objective(&self, windows: Vec<Window>) -> Result<SolObjective<'a>> {
        let objective = SolObjective::new(
            self.model,
            self.scaling,
            self.train,
            windows,
            self.config.unroll,
            self.config.precision,
        )?;
        Ok(match self.method {
            Method::SolNograd => objective.with_gradient(SolGradient::NoSolver),
            Method::FoSol => objective.with_gradient(SolGradient::Exact),
            _ => objective,
        })
    }
}

impl Task for CorrectionTask<'_> {
    fn layout(&self) -> &ParamLayout {
        &self.model.layout
    }
    fn steps_per_epoch(&self) -> usize {
        self.config.schedule(self.method).steps_per_epoch
    }
    fn objective(
        &self,
        epoch: usize,
        step: usize,
        seed: u64,
    ) -> deepzero_core::Result<Box<dyn Objective + '_>> {
        let windows = self.batch(epoch, step, seed);
        Ok(match self.method {
            Method::Non => Box::new(non_objective(
                self.model,
                self.scaling,
                self.train,
                &windows,
                self.config.precision,
            )?),
            _ => Box::new(self.sol_objective(windows).map_err(to_core)?),
        })
    }
    fn evaluate(&self, params: &Tensor) -> deepzero_core::Result<Metrics> {
        let (errors, _) = rollouts(self.test, Some((self.model, self.scaling, params)))?;
        Ok(vec![("test_mae".to_string(), errors.mae())])
    }
}

fn not_trained(method: Method) -> Error {
    Error::parameter(
        "method",
        method,
        "a trained method (non, sol-nograd, zo-sol, fo-sol)",
    )
}

/// The estimator of a method: backprop for NON, sol-nograd and fo-sol (each objective gives
/// its own gradient), sparse CGE (forward differences, uniform per-layer keep ratio
/// `1 − sparsity` over the weight tensors, every bias) for ZO-SOL.
pub fn estimator(
    method: Method,
    model: &Model,
    config: &CorrectionConfig,
    seed: u64,
) -> Result<Box<dyn GradientEstimator>> {
    match method {
        Method::Non | Method::SolNograd | Method::FoSol => Ok(Box::new(Backprop)),
        Method::ZoSol => {
            let est = EstimatorConfig {
                kind: EstimatorKind::Cge,
                mu: config.mu,
                difference: Difference::Forward,
                engine: QueryEngine::Naive,
                ..EstimatorConfig::default()
            };
            let ratios = LayerRatios::uniform(model, config.sparsity)?;
            let sparse = SparseConfig {
                mask_interval: config.mask_interval,
                sparse_all: false,
                prune_weights: false,
            };
            Ok(sparse_estimator(
                &est,
                &model.layout,
                &ratios,
                None,
                &sparse,
                seed,
            )?)
        }
        Method::Src => Err(not_trained(method)),
    }
}

/// Queries of one ZO-SOL step: forward CGE over the sampled weights and every bias, plus the
/// base point (a backprop step counts one).
pub fn queries_per_step(method: Method, model: &Model, config: &CorrectionConfig) -> Result<u64> {
    Ok(match method {
        Method::ZoSol => {
            let ratios = LayerRatios::uniform(model, config.sparsity)?;
            let sampler = deepzero_core::sparsity::CoordinateSampler::new(
                &model.layout,
                &ratios,
                config.mask_interval.max(1),
                false,
            )?;
            sampler.num_coords() as u64 + 1
        }
        Method::Non | Method::SolNograd | Method::FoSol => 1,
        Method::Src => 0,
    })
}

/// The trainer settings of a schedule: Adam (β1 = 0.9), no weight decay, no warm-up, cosine
/// decay of `lr` over `epochs` (core's schedule).
pub fn train_config(schedule: &Schedule, seed: u64) -> deepzero_core::trainer::TrainConfig {
    deepzero_core::trainer::TrainConfig {
        epochs: schedule.epochs,
        lr: schedule.lr,
        warmup_epochs: 0,
        seed,
        optimizer: deepzero_core::optim::OptimizerConfig {
            kind: deepzero_core::optim::OptimizerKind::Adam,
            momentum: 0.9,
            weight_decay: 0.0,
        },
    }
}

/// Trains `method` (NON or ZO-SOL) from `state` (fresh, or restored from a checkpoint) to the
/// end of its [`Schedule`] with the core trainer and `seed`; `observer` sees every step and
/// epoch. With `ranks`, each step's queries are shared over them
/// ([`deepzero_core::distributed`]).
#[allow(clippy::too_many_arguments)]
pub fn train(
    method: Method,
    model: &Model,
    scaling: &Scaling,
    train: &[PreparedSimulation],
    test: &[PreparedSimulation],
    config: &CorrectionConfig,
    seed: u64,
    state: &mut deepzero_core::trainer::TrainState,
    observer: &mut dyn deepzero_core::trainer::Observer,
    ranks: Option<std::sync::Arc<dyn deepzero_core::distributed::Collective>>,
) -> Result<()> {
    let train_config = train_config(config.schedule(method), seed);
    let mut task = CorrectionTask::new(method, model, scaling, train, test, config.clone())?;
    let mut est = estimator(method, model, config, seed)?;
    if let Some(comm) = ranks {
        est.distribute(comm)?;
    }
    let mut optimizer = train_config.optimizer.build()?;
    if !state.optimizer.is_empty() {
        // A resumed run continues with its optimizer's moments.
        optimizer.load_state(&state.optimizer)?;
    }
    deepzero_core::trainer::Trainer {
        config: &train_config,
    }
    .run(&mut task, state, est.as_mut(), optimizer.as_mut(), observer)?;
    Ok(())
}

/// The initial parameters of a correction run with `seed` (core's stream `[0]`; the last
/// convolution is zero, so training starts from SRC), in `precision`.
pub fn initial_state(
    model: &Model,
    seed: u64,
    precision: Precision,
) -> Result<deepzero_core::trainer::TrainState> {
    let params = deepzero_core::seed::initial_params(model, seed);
    let params =
        Tensor::from_vec(params, model.num_params(), &Device::Cpu)?.to_dtype(precision.dtype())?;
    Ok(deepzero_core::trainer::TrainState::new(params))
}
