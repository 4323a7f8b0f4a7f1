//! Training a denoiser in front of a black-box classifier (denoised smoothing).
//!
//! A denoiser `D` (image to image, e.g. [`ModelSpec::Dncnn`](deepzero_core::model::ModelSpec))
//! is trained so that the classifier `f` keeps its decision on denoised noisy images. Every
//! method is a core [`Task`] run by the core [`Trainer`](deepzero_core::trainer::Trainer); they
//! differ only in the objective of a step and in the estimator that goes with it
//! ([`DenoiseMethod::estimator`]):
//!
//! | method | loss | gradient | black-box images per step (batch `N`) |
//! |---|---|---|---|
//! | [`Mse`](DenoiseMethod::Mse) | `MSE(D(x+δ), x)` | backprop | 0 |
//! | [`DeepZero`](DenoiseMethod::DeepZero) | `CE(f(D(x+δ)), argmax f(x))` | sparse CGE over D's parameters (ZO-GraSP ratios, fast engine) | `N·(coords + 1)` |
//! | [`ZoAeDs`](DenoiseMethod::ZoAeDs) | `CE(f(R(E(D(x+δ)))), argmax f(x))` | CGE at the code `z = E(D(x+δ))`, backprop through E and D | `N·(code + 1)` |
//! | [`ZoDs`](DenoiseMethod::ZoDs) | `CE(f(D(x+δ)), argmax f(x))` | RGE (q directions) at D's output, backprop through D | `N·(q + 1)` |
//! | [`Fo`](DenoiseMethod::Fo) | same | the classifier's true gradient (white box; upper bound) | 0 (N white-box forwards) |
//!
//! δ ~ N(0, σ²) in [0, 1] pixel units, drawn per (epoch, step) from the seed; the denoiser works
//! on pixels and the black box receives pixels (it normalises inside). The labels `argmax f(x)`
//! of the training set are asked once when the task is built (counted). The objectives of the
//! ZO methods count every image they show the black box ([`DenoiserTask::black_box_queries`]);
//! the trainer's own query count is that of the estimator (one per step for backprop).

mod autoencoder;
mod denoised;
mod objectives;

pub use autoencoder::{Autoencoder, AutoencoderSpec};
pub use denoised::{
    DenoisedClassifier, DenoiserRecord, DenoiserRun, AUTOENCODER_FILE, RECORD_FILE,
};
pub use objectives::{FoObjective, ZoAeObjective, ZoDsObjective};

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use candle_core::{Device, Tensor};
use deepzero_core::data::Dataset;
use deepzero_core::estimator::{Backprop, Cge, GradientEstimator};
use deepzero_core::estimator::{EstimatorConfig, EstimatorKind};
use deepzero_core::head::{cross_entropy_f64, Head};
use deepzero_core::layout::ParamLayout;
use deepzero_core::model::{BnBatchStats, BnState, Model, Precision};
use deepzero_core::objective::{ModelObjective, Objective};
use deepzero_core::query::{Difference, QueryEngine};
use deepzero_core::seed::{derive_seed, stream_rng};
use deepzero_core::sparsity::{
    prune_task, sparse_estimator, LayerRatios, PruneConfig, PruneMethod, SparseConfig,
};
use deepzero_core::task::{EpochBatches, Metrics, Task};
use rand::Rng;
use rand_distr::StandardNormal;
use serde::{Deserialize, Serialize};

use crate::classifier::{argmax_rows, BlackBox};
use crate::error::{Error, Result};
use crate::model::ModelClassifier;

/// Seed stream of the training noise δ (per epoch and step).
pub const NOISE_STREAM: u64 = 0x4e4f_4953;
/// Seed stream of the evaluation noise.
pub const EVAL_STREAM: u64 = 0x4556_414c;
/// Seed stream of ZO-DS's random directions (per epoch and step).
pub const DIRECTION_STREAM: u64 = 0x4449_5245;

/// How the denoiser is trained (see the [module table](self)).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DenoiseMethod {
    /// MSE pre-training, backprop.
    Mse,
    /// DeepZero: sparse CGE over the denoiser's parameters through the black box.
    #[serde(rename = "deepzero")]
    DeepZero,
    /// ZO-AE-DS: CGE at an autoencoder's code, backprop through encoder and denoiser.
    ZoAeDs,
    /// ZO-DS: RGE at the classifier's input, backprop through the denoiser.
    ZoDs,
    /// FO-DS: the white-box classifier's gradient (upper bound).
    Fo,
}

impl DenoiseMethod {
    /// All methods, in the order of the module table.
    pub const ALL: [DenoiseMethod; 5] = [
        DenoiseMethod::Mse,
        DenoiseMethod::DeepZero,
        DenoiseMethod::ZoAeDs,
        DenoiseMethod::ZoDs,
        DenoiseMethod::Fo,
    ];

    /// The name used on the command line and in records.
    pub fn name(self) -> &'static str {
        match self {
            DenoiseMethod::Mse => "mse",
            DenoiseMethod::DeepZero => "deepzero",
            DenoiseMethod::ZoAeDs => "zo-ae-ds",
            DenoiseMethod::ZoDs => "zo-ds",
            DenoiseMethod::Fo => "fo",
        }
    }

    /// Whether the method's loss is the stability loss through the classifier.
    pub fn uses_classifier(self) -> bool {
        self != DenoiseMethod::Mse
    }

    /// The estimator of this method on `task` from the initial parameters `init`, with the
    /// layer ratios where DeepZero prunes (ZO-GraSP on the task's pruning objective).
    pub fn estimator(
        self,
        task: &DenoiserTask,
        init: &Tensor,
        zo: &ZoConfig,
    ) -> Result<(Box<dyn GradientEstimator>, Option<LayerRatios>)> {
        if self != DenoiseMethod::DeepZero {
            return Ok((Box::new(Backprop), None));
        }
        zo.validate()?;
        let est = EstimatorConfig {
            kind: EstimatorKind::Cge,
            mu: zo.mu,
            difference: Difference::Forward,
            engine: QueryEngine::Fast,
            ..EstimatorConfig::default()
        };
        if zo.sparsity == 0.0 {
            return Ok((
                Box::new(Cge::new(zo.mu, Difference::Forward, QueryEngine::Fast)?),
                None,
            ));
        }
        let prune = PruneConfig {
            method: PruneMethod::ZoGrasp,
            sparsity: zo.sparsity,
            q: zo.prune_q,
            mu: zo.mu,
        };
        let pruning = prune_task(task.denoiser, task, init, &prune, task.config.seed)?;
        let sparse = SparseConfig {
            mask_interval: zo.mask_interval,
            ..SparseConfig::default()
        };
        let estimator = sparse_estimator(
            &est,
            task.layout(),
            &pruning.ratios,
            pruning.scores.as_deref(),
            &sparse,
            task.config.seed,
        )?;
        Ok((estimator, Some(pruning.ratios)))
    }
}

impl std::fmt::Display for DenoiseMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for DenoiseMethod {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        DenoiseMethod::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| {
                Error::Config(format!(
                    "unknown denoiser method {s:?}; expected mse, deepzero, zo-ae-ds, zo-ds or fo"
                ))
            })
    }
}

/// Settings of the zeroth-order methods.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ZoConfig {
    /// Finite-difference step μ (CGE on parameters, CGE at the code, RGE at the image).
    pub mu: f64,
    /// ZO-DS: random directions per step.
    pub q: usize,
    /// DeepZero: fraction of the denoiser's weights left out of the CGE coordinate sets.
    pub sparsity: f64,
    /// DeepZero: RGE directions of ZO-GraSP.
    pub prune_q: usize,
    /// DeepZero: epochs between redraws of the coordinate sets.
    pub mask_interval: usize,
}

impl Default for ZoConfig {
    fn default() -> Self {
        ZoConfig {
            mu: 5e-3,
            q: 64,
            sparsity: 0.9,
            prune_q: 64,
            mask_interval: 1,
        }
    }
}

impl ZoConfig {
    /// Check ranges.
    pub fn validate(&self) -> Result<()> {
        if !(self.mu.is_finite() && self.mu > 0.0) {
            return Err(Error::Config(format!(
                "μ must be positive, got {}",
                self.mu
            )));
        }
        if self.q == 0 || self.prune_q == 0 {
            return Err(Error::Config("direction counts must be at least 1".into()));
        }
        if !(0.0..1.0).contains(&self.sparsity) {
            return Err(Error::Config(format!(
                "sparsity must be in [0, 1), got {}",
                self.sparsity
            )));
        }
        if self.mask_interval == 0 {
            return Err(Error::Config(
                "the mask interval must be at least 1 epoch".into(),
            ));
        }
        Ok(())
    }
}

/// Settings of a denoiser training task.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DenoiseConfig {
    /// The method.
    pub method: DenoiseMethod,
    /// Noise level σ in [0, 1] pixel units (`mse` also accepts 0: plain reconstruction).
    pub sigma: f64,
    /// Training batch size.
    pub batch_size: usize,
    /// Test images evaluated after each epoch (the first ones of the test set).
    pub eval_size: usize,
    /// Zeroth-order settings.
    pub zo: ZoConfig,
    /// Numeric precision of the denoiser's queries.
    pub precision: Precision,
    /// Seed of the noise, the batches, the directions and the pruning.
    pub seed: u64,
}

impl Default for DenoiseConfig {
    fn default() -> Self {
        DenoiseConfig {
            method: DenoiseMethod::DeepZero,
            sigma: 0.25,
            batch_size: 32,
            eval_size: 200,
            zo: ZoConfig::default(),
            precision: Precision::F32,
            seed: 0,
        }
    }
}

impl DenoiseConfig {
    /// Check ranges.
    pub fn validate(&self) -> Result<()> {
        let sigma_ok = self.sigma.is_finite()
            && (self.sigma > 0.0 || (self.sigma == 0.0 && self.method == DenoiseMethod::Mse));
        if !sigma_ok {
            return Err(Error::Config(format!(
                "σ must be positive (in [0, 1] pixel units, e.g. 0.25), got {}",
                self.sigma
            )));
        }
        if self.batch_size == 0 || self.eval_size == 0 {
            return Err(Error::Config(
                "batch size and evaluation size must be at least 1".into(),
            ));
        }
        self.zo.validate()
    }
}

/// Images of one batch: clean and noisy pixels, `N × C·H·W` row-major.
struct NoisyBatch {
    clean: Vec<f32>,
    noisy: Vec<f32>,
    n: usize,
}

fn noisy_batch(ds: &Dataset, idx: &[usize], sigma: f64, rng: &mut impl Rng) -> NoisyBatch {
    let mut clean = Vec::with_capacity(idx.len() * ds.sample_len());
    for &i in idx {
        clean.extend_from_slice(ds.image(i));
    }
    let noisy = clean
        .iter()
        .map(|&v| v + (sigma * rng.sample::<f64, _>(StandardNormal)) as f32)
        .collect();
    NoisyBatch {
        clean,
        noisy,
        n: idx.len(),
    }
}

/// Per-sample cross-entropy of the black box's scores of `count` images against `labels`
/// (image `r` against `labels[r % labels.len()]`): one `logits` call.
pub fn stability_losses(
    black_box: &dyn BlackBox,
    images: &[f32],
    count: usize,
    labels: &[u32],
) -> Result<Vec<f64>> {
    let logits = black_box.logits(images, count)?;
    let k = crate::classifier::classes_in(&logits, count)?;
    let n = labels.len();
    Ok(logits
        .chunks_exact(k)
        .enumerate()
        .map(|(r, row)| {
            let z: Vec<f64> = row.iter().map(|&v| f64::from(v)).collect();
            cross_entropy_f64(&z, labels[r % n] as usize)
        })
        .collect())
}

/// The head of DeepZero's objective: all queries' denoised images go to the black box in one
/// `logits` call, then per-sample cross-entropy against `labels` in f64.
pub fn stability_head(
    black_box: Arc<dyn BlackBox>,
    labels: Vec<u32>,
    counter: Arc<AtomicU64>,
) -> Head {
    Head::output(move |outputs: &[f64], queries: usize| {
        let images: Vec<f32> = outputs.iter().map(|&v| v as f32).collect();
        let count = queries * labels.len();
        counter.fetch_add(count as u64, Ordering::Relaxed);
        stability_losses(black_box.as_ref(), &images, count, &labels).map_err(to_core)
    })
}

/// A certify error inside a core callback.
pub(crate) fn to_core(e: Error) -> deepzero_core::Error {
    match e {
        Error::Core(c) => c,
        other => deepzero_core::Error::Config(format!("black-box classifier: {other}")),
    }
}

/// The fixed evaluation set: clean test images, one noisy copy each, true labels and the
/// classifier's decisions on the clean images.
struct EvalSet {
    clean: Vec<f32>,
    noisy: Vec<f32>,
    n: usize,
    labels: Vec<usize>,
    reference: Vec<usize>,
}

/// Denoiser training as a core [`Task`] (see the [module documentation](self)).
pub struct DenoiserTask<'a> {
    denoiser: &'a Model,
    train: &'a Dataset,
    black_box: Arc<dyn BlackBox>,
    white_box: Option<Arc<ModelClassifier>>,
    autoencoder: Option<Arc<Autoencoder>>,
    config: DenoiseConfig,
    train_labels: Vec<u32>,
    eval: EvalSet,
    bn: BnState,
    batches: EpochBatches,
    queries: Arc<AtomicU64>,
}

impl<'a> DenoiserTask<'a> {
    /// Train `denoiser` on `train` (pixels in [0, 1], not normalised) in front of
    /// `black_box`; evaluate on the first `config.eval_size` images of `test`.
    ///
    /// `fo` needs `white_box` (the same classifier with its internals), `zo-ae-ds` needs
    /// `autoencoder`. Asks the black box for `argmax f(x)` of every training image (counted in
    /// [`black_box_queries`](Self::black_box_queries)) unless the method is `mse`.
    pub fn new(
        denoiser: &'a Model,
        train: &'a Dataset,
        test: &Dataset,
        black_box: Arc<dyn BlackBox>,
        white_box: Option<Arc<ModelClassifier>>,
        autoencoder: Option<Arc<Autoencoder>>,
        config: DenoiseConfig,
    ) -> Result<Self> {
        config.validate()?;
        let shape = [train.channels, train.height, train.width];
        let per_image: usize = shape.iter().product();
        if denoiser.input_shape != shape || denoiser.output_len() != per_image {
            return Err(Error::Shape(format!(
                "images are {shape:?}; denoiser {} maps {:?} to {} values, it must map images \
                 to images of the same size",
                denoiser.name,
                denoiser.input_shape,
                denoiser.output_len()
            )));
        }
        if [test.channels, test.height, test.width] != shape || black_box.input_shape() != shape {
            return Err(Error::Shape(format!(
                "training images are {shape:?}, test images {:?}, the classifier takes {:?}",
                [test.channels, test.height, test.width],
                black_box.input_shape()
            )));
        }
        if train.is_empty() || test.is_empty() {
            return Err(Error::Config(
                "training and test sets must not be empty".into(),
            ));
        }
        if config.method == DenoiseMethod::ZoDs {
            // One step holds N·(q + 1) query images (f32) and N·q directions (f64).
            let per_direction = config
                .batch_size
                .saturating_mul(per_image)
                .saturating_mul(12);
            deepzero_core::bounds::check_memory(
                deepzero_core::error::Setting::Directions,
                config.zo.q.saturating_add(1),
                per_direction,
                "query images and directions of one step",
            )?;
        }
        if config.method == DenoiseMethod::Fo && white_box.is_none() {
            return Err(Error::Config(
                "method fo needs the classifier's gradient: use a deepzero model classifier \
                 (run:DIR), not a process or ONNX file"
                    .into(),
            ));
        }
        if config.method == DenoiseMethod::ZoAeDs && autoencoder.is_none() {
            return Err(Error::Config(
                "method zo-ae-ds needs a pre-trained autoencoder".into(),
            ));
        }
        let queries = Arc::new(AtomicU64::new(0));
        let train_labels = if config.method.uses_classifier() {
            let labels = classify_all(black_box.as_ref(), &train.images, train.len())?;
            queries.fetch_add(train.len() as u64, Ordering::Relaxed);
            labels.into_iter().map(|c| c as u32).collect()
        } else {
            Vec::new()
        };
        let n = config.eval_size.min(test.len());
        let idx: Vec<usize> = (0..n).collect();
        let mut rng = stream_rng(config.seed, &[EVAL_STREAM]);
        let batch = noisy_batch(test, &idx, config.sigma, &mut rng);
        let reference = classify_all(black_box.as_ref(), &batch.clean, n)?;
        let eval = EvalSet {
            clean: batch.clean,
            noisy: batch.noisy,
            n,
            labels: test.labels[..n].iter().map(|&l| l as usize).collect(),
            reference,
        };
        let batches = EpochBatches::new(train.len(), config.batch_size);
        Ok(DenoiserTask {
            denoiser,
            train,
            black_box,
            white_box,
            autoencoder,
            config,
            train_labels,
            eval,
            bn: denoiser.new_bn_state(),
            batches,
            queries,
        })
    }

    /// Running batch-norm statistics of the denoiser.
    pub fn bn_state(&self) -> &BnState {
        &self.bn
    }

    /// The configuration.
    pub fn config(&self) -> &DenoiseConfig {
        &self.config
    }

    /// Images shown to the black box for training so far (labels included, evaluation
    /// excluded).
    pub fn black_box_queries(&self) -> u64 {
        self.queries.load(Ordering::Relaxed)
    }

    /// Black-box images of one training step of a full batch, given the number of CGE
    /// coordinates DeepZero estimates (ignored by the other methods).
    pub fn queries_per_step(&self, deepzero_coords: usize) -> u64 {
        let n = self.config.batch_size.min(self.train.len()) as u64;
        match self.config.method {
            DenoiseMethod::Mse | DenoiseMethod::Fo => 0,
            DenoiseMethod::DeepZero => n * (deepzero_coords as u64 + 1),
            DenoiseMethod::ZoDs => n * (self.config.zo.q as u64 + 1),
            DenoiseMethod::ZoAeDs => {
                let code = self.autoencoder.as_ref().map_or(0, |a| a.spec.code);
                n * (code as u64 + 1)
            }
        }
    }

    fn build_objective(
        &self,
        epoch: usize,
        step: usize,
        seed: u64,
    ) -> Result<Box<dyn Objective + '_>> {
        let idx = self.batches.get(epoch, step, seed)?;
        let mut rng = stream_rng(seed, &[NOISE_STREAM, epoch as u64, step as u64]);
        let batch = noisy_batch(self.train, &idx, self.config.sigma, &mut rng);
        let [c, h, w] = self.denoiser.input_shape;
        let x = Tensor::from_vec(batch.noisy.clone(), (batch.n, c, h, w), &Device::Cpu)?
            .to_dtype(self.config.precision.dtype())?;
        let labels: Vec<u32> = idx
            .iter()
            .map(|&i| self.train_labels.get(i).copied().unwrap_or(0))
            .collect();
        let directions = derive_seed(seed, &[DIRECTION_STREAM, epoch as u64, step as u64]);
        let obj: Box<dyn Objective + '_> = match self.config.method {
            DenoiseMethod::Mse => {
                let targets = batch.clean.iter().map(|&v| f64::from(v)).collect();
                Box::new(ModelObjective::new(
                    self.denoiser,
                    x,
                    Head::squared_error(targets),
                )?)
            }
            DenoiseMethod::DeepZero => {
                let head = stability_head(self.black_box.clone(), labels, self.queries.clone());
                Box::new(ModelObjective::new(self.denoiser, x, head)?)
            }
            DenoiseMethod::Fo => Box::new(FoObjective::new(
                self.denoiser,
                x,
                labels,
                self.white_box.clone().expect("checked in new"),
            )?),
            DenoiseMethod::ZoDs => Box::new(ZoDsObjective::new(
                self.denoiser,
                x,
                labels,
                self.black_box.clone(),
                self.config.zo.q,
                self.config.zo.mu,
                directions,
                self.queries.clone(),
            )?),
            DenoiseMethod::ZoAeDs => Box::new(ZoAeObjective::new(
                self.denoiser,
                x,
                labels,
                self.black_box.clone(),
                self.autoencoder.clone().expect("checked in new"),
                self.config.zo.mu,
                self.queries.clone(),
            )?),
        };
        Ok(obj)
    }

    /// Denoise `n` pixel images with the denoiser in eval mode (then the autoencoder, for
    /// zo-ae-ds).
    fn denoise(&self, params: &Tensor, images: &[f32], n: usize) -> Result<Vec<f32>> {
        let mut out = denoise_images(self.denoiser, params, &self.bn, images, n)?;
        if let (DenoiseMethod::ZoAeDs, Some(ae)) = (self.config.method, &self.autoencoder) {
            out = ae.reconstruct(&out, n)?;
        }
        Ok(out)
    }
}

/// The top class of each of `n` images (one `classify` call per chunk of 500).
fn classify_all(black_box: &dyn BlackBox, images: &[f32], n: usize) -> Result<Vec<usize>> {
    let per = images.len() / n.max(1);
    let mut out = Vec::with_capacity(n);
    for chunk in images.chunks(500 * per.max(1)) {
        out.extend(black_box.classify(chunk, chunk.len() / per.max(1))?);
    }
    Ok(out)
}

/// Images per denoiser forward pass in evaluation and certification.
pub const DENOISE_CHUNK: usize = 256;

/// `n` pixel images through `model` in eval mode with flat parameters `params` (any dtype),
/// in chunks of [`DENOISE_CHUNK`]; f32 out, same layout.
pub fn denoise_images(
    model: &Model,
    params: &Tensor,
    bn: &BnState,
    images: &[f32],
    n: usize,
) -> Result<Vec<f32>> {
    crate::model::eval_forward(model, params, bn, images, n, DENOISE_CHUNK)
}

impl Task for DenoiserTask<'_> {
    fn layout(&self) -> &ParamLayout {
        &self.denoiser.layout
    }
    fn steps_per_epoch(&self) -> usize {
        self.batches.steps()
    }
    fn begin_epoch(&mut self, epoch: usize, seed: u64) -> deepzero_core::Result<()> {
        self.batches.begin(epoch, seed);
        Ok(())
    }
    fn objective(
        &self,
        epoch: usize,
        step: usize,
        seed: u64,
    ) -> deepzero_core::Result<Box<dyn Objective + '_>> {
        self.build_objective(epoch, step, seed).map_err(to_core)
    }
    fn end_step(&mut self, bn: Option<BnBatchStats>) -> deepzero_core::Result<()> {
        if let Some(s) = bn {
            self.bn.update(&s);
        }
        Ok(())
    }
    fn evaluate(&self, params: &Tensor) -> deepzero_core::Result<Metrics> {
        let run = || -> Result<Metrics> {
            let e = &self.eval;
            let denoised_only = denoise_images(self.denoiser, params, &self.bn, &e.noisy, e.n)?;
            let mse = denoised_only
                .iter()
                .zip(&e.clean)
                .map(|(a, b)| f64::from(a - b).powi(2))
                .sum::<f64>()
                / e.clean.len() as f64;
            let denoised = self.denoise(params, &e.noisy, e.n)?;
            let logits = self.black_box.logits(&denoised, e.n)?;
            let k = crate::classifier::classes_in(&logits, e.n)?;
            let pred = argmax_rows(&logits, k)?;
            let frac = |truth: &[usize]| {
                pred.iter().zip(truth).filter(|(a, b)| a == b).count() as f64 / e.n as f64
            };
            Ok(vec![
                ("test_mse".to_string(), mse),
                ("test_accuracy".to_string(), frac(&e.labels)),
                ("test_stability".to_string(), frac(&e.reference)),
                (
                    "black_box_queries".to_string(),
                    self.black_box_queries() as f64,
                ),
            ])
        };
        run().map_err(to_core)
    }
    fn state(&self) -> deepzero_core::Result<serde_json::Value> {
        let mut state = self.bn.to_task_state();
        if let Some(fields) = state.as_object_mut() {
            fields.insert(
                BLACK_BOX_QUERIES.to_string(),
                self.black_box_queries().into(),
            );
        }
        Ok(state)
    }
    fn load_state(&mut self, state: &serde_json::Value) -> deepzero_core::Result<()> {
        self.bn = bn_from_state(state, self.denoiser).map_err(to_core)?;
        // A resumed run goes on counting from the checkpoint's count.
        if let Some(n) = state.get(BLACK_BOX_QUERIES).and_then(|v| v.as_u64()) {
            self.queries.store(n, Ordering::Relaxed);
        }
        Ok(())
    }
}

/// The key of the black-box image count in the task state of a checkpoint.
const BLACK_BOX_QUERIES: &str = "black_box_queries";

/// The denoiser's batch-norm statistics from a checkpoint's task state (`{"bn": ...}`).
pub fn bn_from_state(state: &serde_json::Value, model: &Model) -> Result<BnState> {
    Ok(BnState::from_task_state(state, model)?.unwrap_or_else(|| model.new_bn_state()))
}
