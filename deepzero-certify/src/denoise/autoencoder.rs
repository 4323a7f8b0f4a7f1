//! The autoencoder of ZO-AE-DS: encoder `E` (image → code) and decoder `R` (code → image),
//! small fully connected networks built with the core `GraphBuilder`.
//!
//! The whole autoencoder is one [`Model`] (image → flat image) so that it is pre-trained like a
//! denoiser (method `mse`, any σ including 0); [`Autoencoder::new`] splits its parameters into
//! the encoder (a prefix of the vector) and the decoder (the rest).

use candle_core::{DType, Device, Tensor};
use deepzero_core::model::{BnState, GraphBuilder, Mode, Model};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The autoencoder's sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AutoencoderSpec {
    /// Width of the hidden layer of encoder and decoder.
    pub hidden: usize,
    /// Dimension of the code `z` (CGE queries per step: `code + 1` per image).
    pub code: usize,
}

impl Default for AutoencoderSpec {
    fn default() -> Self {
        AutoencoderSpec {
            hidden: 256,
            code: 64,
        }
    }
}

impl AutoencoderSpec {
    fn check(&self) -> Result<()> {
        if self.hidden == 0 || self.code == 0 {
            return Err(Error::Config(format!(
                "autoencoder widths must be positive, got hidden {} and code {}",
                self.hidden, self.code
            )));
        }
        Ok(())
    }

    fn encoder_into(&self, b: &mut GraphBuilder) -> Result<usize> {
        let x = b.flatten("flatten", GraphBuilder::INPUT)?;
        let h = b.linear("enc1", x, self.hidden)?;
        let h = b.relu("enc1_relu", h)?;
        Ok(b.linear("code", h, self.code)?)
    }

    fn decoder_into(&self, b: &mut GraphBuilder, z: usize, pixels: usize) -> Result<usize> {
        let h = b.linear("dec1", z, self.hidden)?;
        let h = b.relu("dec1_relu", h)?;
        Ok(b.linear("dec2", h, pixels)?)
    }

    /// The whole autoencoder for images of `input_shape` (output: the flat image).
    pub fn build(&self, input_shape: [usize; 3]) -> Result<Model> {
        self.check()?;
        let mut b = GraphBuilder::new(input_shape)?;
        let z = self.encoder_into(&mut b)?;
        self.decoder_into(&mut b, z, input_shape.iter().product())?;
        Ok(b.finish(format!("autoencoder-{}-{}", self.hidden, self.code)))
    }

    fn encoder(&self, input_shape: [usize; 3]) -> Result<Model> {
        let mut b = GraphBuilder::new(input_shape)?;
        self.encoder_into(&mut b)?;
        Ok(b.finish("encoder"))
    }

    fn decoder(&self, input_shape: [usize; 3]) -> Result<Model> {
        let mut b = GraphBuilder::new([self.code, 1, 1])?;
        let z = b.flatten("flatten", GraphBuilder::INPUT)?;
        self.decoder_into(&mut b, z, input_shape.iter().product())?;
        Ok(b.finish("decoder"))
    }
}

/// A trained autoencoder, split into encoder and decoder (parameters fixed, f32, CPU).
pub struct Autoencoder {
    /// Its sizes.
    pub spec: AutoencoderSpec,
    input_shape: [usize; 3],
    full: Model,
    full_params: Tensor,
    encoder: Model,
    encoder_params: Tensor,
    decoder: Model,
    decoder_params: Tensor,
}

impl Autoencoder {
    /// From the flat parameters of the model [`AutoencoderSpec::build`] makes.
    pub fn new(spec: AutoencoderSpec, input_shape: [usize; 3], params: &[f64]) -> Result<Self> {
        let full = spec.build(input_shape)?;
        let encoder = spec.encoder(input_shape)?;
        let decoder = spec.decoder(input_shape)?;
        if params.len() != full.num_params()
            || encoder.num_params() + decoder.num_params() != full.num_params()
        {
            return Err(Error::Shape(format!(
                "autoencoder {} has {} parameters, got {}",
                full.name,
                full.num_params(),
                params.len()
            )));
        }
        let tensor = |v: &[f64]| -> Result<Tensor> {
            Ok(Tensor::from_slice(v, v.len(), &Device::Cpu)?.to_dtype(DType::F32)?)
        };
        let split = encoder.num_params();
        Ok(Autoencoder {
            spec,
            input_shape,
            full_params: tensor(params)?,
            encoder_params: tensor(&params[..split])?,
            decoder_params: tensor(&params[split..])?,
            full,
            encoder,
            decoder,
        })
    }

    /// The whole autoencoder's flat parameters (f32).
    pub fn params(&self) -> &Tensor {
        &self.full_params
    }

    /// The encoder `E` and its parameters (f32 on the CPU), for callers that chain through it.
    pub(crate) fn encoder_parts(&self) -> (&Model, &Tensor) {
        (&self.encoder, &self.encoder_params)
    }

    /// Codes `[N, code]` of images `[N, C, H, W]` as a candle expression (gradients flow to
    /// the images; the encoder's parameters are constants), in the images' dtype.
    pub fn encode(&self, images: &Tensor) -> Result<Tensor> {
        let p = self.encoder_params.to_dtype(images.dtype())?;
        let views = self.encoder.param_views(&p)?;
        let no_bn = BnState::default();
        Ok(self.encoder.forward(&views, images, Mode::Eval(&no_bn))?)
    }

    /// Images (flat, `count × C·H·W`) of `count` codes (`count × code`).
    pub fn decode(&self, codes: &[f32], count: usize) -> Result<Vec<f32>> {
        run_flat(&self.decoder, &self.decoder_params, codes, count)
    }

    /// `R(E(x))` of `n` flat images.
    pub fn reconstruct(&self, images: &[f32], n: usize) -> Result<Vec<f32>> {
        run_flat(&self.full, &self.full_params, images, n)
    }

    /// `[C, H, W]` of the images.
    pub fn input_shape(&self) -> [usize; 3] {
        self.input_shape
    }
}

/// A batch-norm-free model on `n` flat inputs, in chunks.
fn run_flat(model: &Model, params: &Tensor, input: &[f32], n: usize) -> Result<Vec<f32>> {
    crate::model::eval_forward(model, params, &BnState::default(), input, n, 1024)
}
