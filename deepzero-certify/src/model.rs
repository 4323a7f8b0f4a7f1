//! [`ModelClassifier`]: a deepzero-core network as a black box.

use candle_core::{DType, Device, Tensor};
use deepzero_core::data::Normalization;
use deepzero_core::model::{BnState, Mode, Model};

use crate::classifier::{check_batch, BlackBox, QueryCounter};
use crate::error::{Error, Result};

/// Images per forward pass when a query batch is larger (bounds memory).
pub const MODEL_CHUNK: usize = 256;

/// A deepzero-core model with its parameters, evaluated in eval mode (batch norm uses the
/// running statistics), behind the [`BlackBox`] interface.
///
/// The black box receives pixels in [0, 1] plus noise; the per-channel normalisation
/// `(x − mean[c]) / std[c]` the model was trained with is applied inside.
pub struct ModelClassifier {
    model: Model,
    params: Tensor,
    bn: BnState,
    norm: Normalization,
    queries: QueryCounter,
}

impl ModelClassifier {
    /// From host parameters (converted to f32 on the CPU).
    pub fn new(model: Model, params: &[f64], bn: BnState, norm: Normalization) -> Result<Self> {
        let params =
            Tensor::from_slice(params, params.len(), &Device::Cpu)?.to_dtype(DType::F32)?;
        Self::from_tensor(model, params, bn, norm)
    }

    /// From a flat parameter tensor (its dtype and device are used for the forward passes).
    pub fn from_tensor(
        model: Model,
        params: Tensor,
        bn: BnState,
        norm: Normalization,
    ) -> Result<Self> {
        if params.dims() != [model.num_params()] {
            return Err(Error::Shape(format!(
                "model {} has {} parameters, the parameter tensor has shape {:?}",
                model.name,
                model.num_params(),
                params.dims()
            )));
        }
        let channels = model.input_shape[0];
        if norm.mean.len() != channels || norm.std.len() != channels {
            return Err(Error::Config(format!(
                "normalisation has {} means and {} stds, model {} takes {channels} channels",
                norm.mean.len(),
                norm.std.len(),
                model.name
            )));
        }
        if let Some(s) = norm.std.iter().find(|s| !(s.is_finite() && **s > 0.0)) {
            return Err(Error::Config(format!(
                "normalisation std must be positive and finite, got {s}"
            )));
        }
        if let Some(m) = norm.mean.iter().find(|m| !m.is_finite()) {
            return Err(Error::Config(format!(
                "normalisation mean must be finite, got {m}"
            )));
        }
        deepzero_core::fast::check_bn_state(&model, &bn)?;
        Ok(ModelClassifier {
            model,
            params,
            bn,
            norm,
            queries: QueryCounter::default(),
        })
    }

    /// The wrapped model.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The flat parameter tensor.
    pub fn params(&self) -> &Tensor {
        &self.params
    }

    /// The batch-norm running statistics used in eval mode.
    pub fn bn_state(&self) -> &BnState {
        &self.bn
    }

    /// The input normalisation applied inside.
    pub fn normalization(&self) -> &Normalization {
        &self.norm
    }

    /// Logits of `[N, C, H, W]` pixel images (in [0, 1] plus noise) as a candle expression:
    /// normalisation, then the model in eval mode with its fixed parameters. Gradients flow to
    /// `pixels` (the white-box access that FO-DS uses); no query is counted.
    pub fn forward_pixels(&self, pixels: &Tensor) -> Result<Tensor> {
        let c = self.model.input_shape[0];
        let dtype = self.params.dtype();
        let device = self.params.device();
        let mean: Vec<f64> = self.norm.mean.iter().map(|&m| f64::from(m)).collect();
        let std: Vec<f64> = self.norm.std.iter().map(|&s| f64::from(s)).collect();
        let mean = Tensor::from_vec(mean, (1, c, 1, 1), device)?.to_dtype(dtype)?;
        let std = Tensor::from_vec(std, (1, c, 1, 1), device)?.to_dtype(dtype)?;
        let x = pixels
            .to_dtype(dtype)?
            .broadcast_sub(&mean)?
            .broadcast_div(&std)?;
        let views = self.model.param_views(&self.params)?;
        Ok(self.model.forward(&views, &x, Mode::Eval(&self.bn))?)
    }
}

impl BlackBox for ModelClassifier {
    fn input_shape(&self) -> [usize; 3] {
        self.model.input_shape
    }

    fn num_classes(&self) -> Result<usize> {
        self.model.num_classes().ok_or_else(|| {
            Error::Config(format!(
                "model {} has an image-shaped output, not class scores",
                self.model.name
            ))
        })
    }

    fn logits(&self, images: &[f32], n: usize) -> Result<Vec<f32>> {
        check_batch(images, n, self.model.input_shape)?;
        // The normalisation the model was trained with, then the model in eval mode (on our
        // kernels for f32 parameters on the CPU).
        let [c, h, w] = self.model.input_shape;
        let mut x = images.to_vec();
        for (k, pixels) in x.chunks_exact_mut((h * w).max(1)).enumerate() {
            let (mean, std) = (self.norm.mean[k % c], self.norm.std[k % c]);
            for v in pixels {
                *v = (*v - mean) / std;
            }
        }
        let out = eval_forward(&self.model, &self.params, &self.bn, &x, n, MODEL_CHUNK)?;
        self.queries.add(n);
        Ok(out)
    }

    fn queries(&self) -> u64 {
        self.queries.get()
    }
}

/// `n` images (`[N, C, H, W]` f32, batch-major) through `model` in eval mode (batch norm with
/// `bn`) at the flat parameters `params`, `chunk` images per forward pass; f32 out, `[N,
/// output_len]`. With f32 parameters on the CPU the passes run on our kernels
/// ([`deepzero_core::fast::forward_eval`]); otherwise on candle in the parameters' dtype.
pub(crate) fn eval_forward(
    model: &Model,
    params: &Tensor,
    bn: &BnState,
    images: &[f32],
    n: usize,
    chunk: usize,
) -> Result<Vec<f32>> {
    let [c, h, w] = model.input_shape;
    let per = c * h * w;
    if images.len() != n * per {
        return Err(Error::Shape(format!(
            "{n} images of {:?} need {} values, got {}",
            model.input_shape,
            n * per,
            images.len()
        )));
    }
    let mut out = Vec::with_capacity(n * model.output_len());
    if params.dtype() == DType::F32 && params.device().is_cpu() {
        let host = params.to_vec1::<f32>()?;
        for part in images.chunks(chunk.max(1) * per.max(1)) {
            let m = part.len() / per.max(1);
            out.extend(deepzero_core::fast::forward_eval(
                model, &host, bn, part, m,
            )?);
        }
        return Ok(out);
    }
    let views = model.param_views(params)?;
    for part in images.chunks(chunk.max(1) * per.max(1)) {
        let m = part.len() / per.max(1);
        let x =
            Tensor::from_slice(part, (m, c, h, w), params.device())?.to_dtype(params.dtype())?;
        let y = model.forward(&views, &x, Mode::Eval(bn))?;
        out.extend(y.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
    }
    Ok(out)
}
