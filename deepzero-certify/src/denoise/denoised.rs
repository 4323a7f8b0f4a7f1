//! [`DenoisedClassifier`]: a trained denoiser in front of a black box, itself a [`BlackBox`]
//! (what `certify run --denoiser RUN_DIR` smooths), and [`DenoiserRun`], the loader of a
//! denoiser training run directory.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use deepzero_core::checkpoint;
use deepzero_core::model::{BnState, Model, ModelSpec};
use serde::{Deserialize, Serialize};

use super::{bn_from_state, denoise_images, Autoencoder, AutoencoderSpec, DenoiseMethod};
use crate::classifier::{check_batch, BlackBox, QueryCounter};
use crate::error::{Error, Result};

/// What a denoiser run directory records about its network (`denoiser.json`).
pub const RECORD_FILE: &str = "denoiser.json";
/// The autoencoder's parameters in a zo-ae-ds run directory (tensor `params`).
pub const AUTOENCODER_FILE: &str = "autoencoder.safetensors";

/// The denoiser's architecture and how it was trained (`denoiser.json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DenoiserRecord {
    /// How it was trained.
    pub method: DenoiseMethod,
    /// Noise level σ it was trained for.
    pub sigma: f64,
    /// The denoiser's architecture.
    pub spec: ModelSpec,
    /// `[C, H, W]` of the images.
    pub input_shape: [usize; 3],
    /// The autoencoder that follows the denoiser (zo-ae-ds), saved in [`AUTOENCODER_FILE`].
    #[serde(default)]
    pub autoencoder: Option<AutoencoderSpec>,
}

impl DenoiserRecord {
    /// Write `denoiser.json` (and the autoencoder's parameters, if given) into `dir`.
    pub fn save(&self, dir: &Path, autoencoder: Option<&Autoencoder>) -> Result<()> {
        let path = dir.join(RECORD_FILE);
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| Error::Config(format!("serialising the denoiser record: {e}")))?;
        std::fs::write(&path, text).map_err(|e| Error::io(&path, e))?;
        if let Some(ae) = autoencoder {
            let path = dir.join(AUTOENCODER_FILE);
            let tensors = HashMap::from([("params".to_string(), ae.params().clone())]);
            candle_core::safetensors::save(&tensors, &path)?;
        }
        Ok(())
    }
}

/// A denoiser loaded from its run directory: architecture, parameters (f32) and batch-norm
/// statistics of the newest checkpoint, and the autoencoder for zo-ae-ds runs.
pub struct DenoiserRun {
    /// The record.
    pub record: DenoiserRecord,
    /// The network.
    pub model: Model,
    /// Flat parameters, f32 on the CPU.
    pub params: Tensor,
    /// Running batch-norm statistics.
    pub bn: BnState,
    /// Epochs trained.
    pub epochs: usize,
    /// The autoencoder that follows the denoiser (zo-ae-ds).
    pub autoencoder: Option<Autoencoder>,
}

impl DenoiserRun {
    /// Load `dir` (written by `deepzero certify train-denoiser`).
    pub fn load(dir: &Path) -> Result<DenoiserRun> {
        let path = dir.join(RECORD_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            Error::io(
                &path,
                std::io::Error::new(
                    e.kind(),
                    format!("{e}; is {} a `certify train-denoiser` run?", dir.display()),
                ),
            )
        })?;
        let record: DenoiserRecord = serde_json::from_str(&text)
            .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        let model = Model::build_image(&record.spec, record.input_shape)?;
        let state = checkpoint::load(dir, &Device::Cpu)?;
        let params = state.params.to_dtype(DType::F32)?;
        if params.dims() != [model.num_params()] {
            return Err(Error::Shape(format!(
                "{}: the checkpoint has {:?} parameters, denoiser {} needs {}",
                dir.display(),
                params.dims(),
                model.name,
                model.num_params()
            )));
        }
        let bn = bn_from_state(&state.task, &model)?;
        let autoencoder = match record.autoencoder {
            None => None,
            Some(spec) => {
                let path: PathBuf = dir.join(AUTOENCODER_FILE);
                let mut t = candle_core::safetensors::load(&path, &Device::Cpu)?;
                let p = t.remove("params").ok_or_else(|| {
                    Error::Config(format!("{}: no `params` tensor", path.display()))
                })?;
                let p = p.to_dtype(DType::F64)?.to_vec1::<f64>()?;
                Some(Autoencoder::new(spec, record.input_shape, &p)?)
            }
        };
        Ok(DenoiserRun {
            record,
            model,
            params,
            bn,
            epochs: state.epoch,
            autoencoder,
        })
    }
}

/// Denoiser `D` (eval mode), then the autoencoder if any, then the black box `f`: `f(D(x))`.
/// One query = one image through the whole pipeline; the inner classifier counts its own.
pub struct DenoisedClassifier<C: BlackBox> {
    model: Model,
    params: Tensor,
    bn: BnState,
    autoencoder: Option<Autoencoder>,
    inner: C,
    queries: QueryCounter,
}

impl<C: BlackBox> DenoisedClassifier<C> {
    /// From a loaded run.
    pub fn from_run(run: DenoiserRun, inner: C) -> Result<Self> {
        Self::new(run.model, run.params, run.bn, run.autoencoder, inner)
    }

    /// From the parts: the denoiser's model, flat parameters and batch-norm statistics.
    pub fn new(
        model: Model,
        params: Tensor,
        bn: BnState,
        autoencoder: Option<Autoencoder>,
        inner: C,
    ) -> Result<Self> {
        let per: usize = model.input_shape.iter().product();
        if model.input_shape != inner.input_shape() || model.output_len() != per {
            return Err(Error::Shape(format!(
                "denoiser {} maps {:?} to {} values; the classifier takes {:?}",
                model.name,
                model.input_shape,
                model.output_len(),
                inner.input_shape()
            )));
        }
        if params.dims() != [model.num_params()] {
            return Err(Error::Shape(format!(
                "denoiser {} has {} parameters, got {:?}",
                model.name,
                model.num_params(),
                params.dims()
            )));
        }
        Ok(DenoisedClassifier {
            model,
            params,
            bn,
            autoencoder,
            inner,
            queries: QueryCounter::default(),
        })
    }

    /// The classifier behind the denoiser.
    pub fn inner(&self) -> &C {
        &self.inner
    }
}

impl<C: BlackBox> BlackBox for DenoisedClassifier<C> {
    fn input_shape(&self) -> [usize; 3] {
        self.model.input_shape
    }
    fn num_classes(&self) -> Result<usize> {
        self.inner.num_classes()
    }
    fn logits(&self, images: &[f32], n: usize) -> Result<Vec<f32>> {
        check_batch(images, n, self.model.input_shape)?;
        let mut x = denoise_images(&self.model, &self.params, &self.bn, images, n)?;
        if let Some(ae) = &self.autoencoder {
            x = ae.reconstruct(&x, n)?;
        }
        let out = self.inner.logits(&x, n)?;
        self.queries.add(n);
        Ok(out)
    }
    fn queries(&self) -> u64 {
        self.queries.get()
    }
}
