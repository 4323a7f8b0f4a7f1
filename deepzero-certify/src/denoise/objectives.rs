//! The objectives of the methods that chain a gradient through the denoiser by backprop:
//! FO-DS (the classifier's true gradient), ZO-DS (RGE at the classifier's input) and ZO-AE-DS
//! (CGE at an autoencoder's code). Each offers `loss` (the black-box loss, for any estimator)
//! and `loss_and_grad` (what the `Backprop` estimator uses), and records the denoiser's
//! batch-norm statistics of the step. With f32 parameters on the CPU every chain runs on our
//! kernels ([`Trace`]: the denoiser in train mode, the classifier of FO-DS in eval mode, the
//! encoder of ZO-AE-DS); otherwise by candle autograd.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Tensor, Var};
use deepzero_core::fast::append_batch_major;
use deepzero_core::fast::backprop::{head_loss_and_grad, Trace};
use deepzero_core::head::Head;
use deepzero_core::layout::ParamLayout;
use deepzero_core::model::{per_sample_cross_entropy, BnBatchStats, Mode, Model};
use deepzero_core::objective::Objective;
use deepzero_core::seed::stream_rng;
use rand::Rng;
use rand_distr::StandardNormal;

use super::{stability_losses, to_core, Autoencoder};
use crate::classifier::BlackBox;
use crate::error::{Error, Result};
use crate::model::ModelClassifier;

/// The denoiser on one noisy batch, in train mode (batch statistics), recording them.
struct DenoiserBatch<'a> {
    model: &'a Model,
    x: Tensor,
    n: usize,
    labels: Vec<u32>,
    stats: Mutex<Option<BnBatchStats>>,
}

impl<'a> DenoiserBatch<'a> {
    fn new(model: &'a Model, x: Tensor, labels: Vec<u32>) -> Result<Self> {
        let n = x.dims().first().copied().unwrap_or(0);
        if x.dims().len() != 4 || x.dims()[1..] != model.input_shape || n == 0 {
            return Err(Error::Shape(format!(
                "batch of shape {:?} for denoiser {} on {:?}",
                x.dims(),
                model.name,
                model.input_shape
            )));
        }
        if labels.len() != n {
            return Err(Error::Shape(format!(
                "{} labels for {n} images",
                labels.len()
            )));
        }
        Ok(DenoiserBatch {
            model,
            x,
            n,
            labels,
            stats: Mutex::new(None),
        })
    }

    /// D(x) as a candle expression of `params` (`[N, C, H, W]`); records batch statistics
    /// when `record`.
    fn forward(&self, params: &Tensor, record: bool) -> Result<Tensor> {
        let views = self.model.param_views(params)?;
        let x = self.x.to_dtype(params.dtype())?;
        let mut stats = BnBatchStats::default();
        let mut regs =
            self.model
                .forward_cached(&views, &x, Mode::Train, record.then_some(&mut stats))?;
        if record {
            *self.stats.lock().expect("stats lock") = Some(stats);
        }
        let out = regs.pop().expect("output register");
        Ok(out.reshape(self.x.dims())?)
    }

    fn params_tensor(&self, params: &[f64]) -> Result<Tensor> {
        Ok(Tensor::from_slice(params, params.len(), self.x.device())?.to_dtype(self.x.dtype())?)
    }

    /// The parameters as host f32 when they are f32 on the CPU (backprop then runs on our
    /// kernels, [`Trace`]); `None` otherwise (candle autograd).
    fn host_f32_params(&self, params: &Tensor) -> Result<Option<Vec<f32>>> {
        if params.dtype() != DType::F32 || !params.device().is_cpu() {
            return Ok(None);
        }
        Ok(Some(params.to_vec1::<f32>()?))
    }

    fn take_stats(&self) -> Option<BnBatchStats> {
        self.stats.lock().expect("stats lock").take()
    }
}

/// A tensor's values on the host when it is f32 on the CPU.
fn host_if_f32_cpu(t: &Tensor) -> Result<Option<Vec<f32>>> {
    if t.dtype() != DType::F32 || !t.device().is_cpu() {
        return Ok(None);
    }
    Ok(Some(t.to_vec1::<f32>()?))
}

impl DenoiserBatch<'_> {
    /// The denoiser's train-mode forward on our kernels at host parameters `p`, recording its
    /// batch statistics: the trace and `D(x)` batch-major in f32.
    fn trace<'p>(&self, p: &'p [f32]) -> Result<(Trace<'p>, Vec<f32>)>
    where
        Self: 'p,
    {
        let x = host_f32(&self.x)?;
        let trace = Trace::forward(self.model, p, &x, self.n)?;
        *self.stats.lock().expect("stats lock") = Some(trace.bn_batch_stats());
        let out = trace
            .output_batch_major()
            .iter()
            .map(|&v| v as f32)
            .collect();
        Ok((trace, out))
    }
}

/// A gradient on the host as a flat f32 tensor on `like`'s device.
fn grad_tensor(grad: &[f64], like: &Tensor) -> Result<Tensor> {
    let g: Vec<f32> = grad.iter().map(|&v| v as f32).collect();
    Ok(Tensor::from_vec(g, grad.len(), like.device())?)
}

fn host_f32(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// The gradient of `sum(out · g)` with respect to the variable `var` (the chain rule's
/// vector-Jacobian product `J_outᵀ g`).
fn chain(var: &Var, out: &Tensor, g: Vec<f64>) -> Result<Tensor> {
    let g = Tensor::from_vec(g, out.shape(), out.device())?.to_dtype(out.dtype())?;
    let grads = (out * g)?.sum_all()?.backward()?;
    Ok(grads
        .get(var.as_tensor())
        .cloned()
        .unwrap_or(var.as_tensor().zeros_like()?))
}

/// FO-DS: the stability loss through a white-box classifier, with its true gradient
/// (denoiser → normalisation → classifier in eval mode with fixed parameters → CE → backward).
pub struct FoObjective<'a> {
    batch: DenoiserBatch<'a>,
    classifier: Arc<ModelClassifier>,
}

impl<'a> FoObjective<'a> {
    /// On noisy images `x` (`[N, C, H, W]`, pixels) with target classes `labels`.
    pub fn new(
        denoiser: &'a Model,
        x: Tensor,
        labels: Vec<u32>,
        classifier: Arc<ModelClassifier>,
    ) -> Result<Self> {
        Ok(FoObjective {
            batch: DenoiserBatch::new(denoiser, x, labels)?,
            classifier,
        })
    }

    fn loss_tensor(&self, params: &Tensor, record: bool) -> Result<Tensor> {
        let out = self.batch.forward(params, record)?;
        let logits = self.classifier.forward_pixels(&out)?;
        let y = Tensor::from_slice(&self.batch.labels, self.batch.n, logits.device())?;
        Ok(per_sample_cross_entropy(&logits, &y)?.mean_all()?)
    }
}

impl FoObjective<'_> {
    /// On our kernels: the denoiser's trace, the normalisation, the classifier's eval-mode
    /// trace, the cross-entropy's gradient back to the classifier's input, through the
    /// normalisation, and through the denoiser.
    fn loss_and_grad_ours(&self, p: &[f32], cp: &[f32], like: &Tensor) -> Result<(f64, Tensor)> {
        let n = self.batch.n;
        let (trace, out) = self.batch.trace(p)?;
        let model = self.classifier.model();
        let norm = self.classifier.normalization();
        let [c, h, w] = model.input_shape;
        let channel = |k: usize| (k / (h * w).max(1)) % c.max(1);
        let x: Vec<f32> = out
            .iter()
            .enumerate()
            .map(|(k, &v)| (v - norm.mean[channel(k)]) / norm.std[channel(k)])
            .collect();
        let ctrace = Trace::forward_eval(model, cp, self.classifier.bn_state(), &x, n)?;
        let head = Head::CrossEntropy(self.batch.labels.clone());
        let (loss, d) = head_loss_and_grad(&head, ctrace.output())?;
        let mut g = Vec::with_capacity(d.data.len());
        append_batch_major(&d, &mut g);
        let (_, dx) = ctrace.backward_with_input(&g)?;
        let d_out: Vec<f64> = dx
            .iter()
            .enumerate()
            .map(|(k, &v)| v / f64::from(norm.std[channel(k)]))
            .collect();
        let grad = trace.backward_batch_major(&d_out)?;
        Ok((loss, grad_tensor(&grad, like)?))
    }
}

impl Objective for FoObjective<'_> {
    fn layout(&self) -> &ParamLayout {
        &self.batch.model.layout
    }
    fn loss(&self, params: &[f64]) -> deepzero_core::Result<f64> {
        let run = || -> Result<f64> {
            let p = self.batch.params_tensor(params)?;
            Ok(self
                .loss_tensor(&p, false)?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?)
        };
        run().map_err(to_core)
    }
    fn loss_and_grad(&self, params: &Tensor) -> deepzero_core::Result<Option<(f64, Tensor)>> {
        let run = || -> Result<(f64, Tensor)> {
            if let (Some(p), Some(cp)) = (
                self.batch.host_f32_params(params)?,
                host_if_f32_cpu(self.classifier.params())?,
            ) {
                return self.loss_and_grad_ours(&p, &cp, params);
            }
            let var = Var::from_tensor(params)?;
            let loss = self.loss_tensor(var.as_tensor(), true)?;
            let grads = loss.backward()?;
            let g = grads
                .get(var.as_tensor())
                .cloned()
                .unwrap_or(params.zeros_like()?);
            Ok((loss.to_dtype(DType::F64)?.to_scalar::<f64>()?, g))
        };
        run().map(Some).map_err(to_core)
    }
    fn take_bn_stats(&self) -> Option<BnBatchStats> {
        self.batch.take_stats()
    }
}

/// ZO-DS: RGE at the classifier's input, chained through the denoiser by backprop.
///
/// At the denoised images `o = D(x+δ)` (per sample `o_i`, dimension `d = C·H·W`), with `q`
/// Gaussian directions `u_ij` per sample: `ĝ_i = (1/q) Σ_j (ℓ_i(o_i + μ u_ij) − ℓ_i(o_i))/μ · u_ij`,
/// from one black-box call of `N·(q + 1)` images; then the denoiser's gradient is
/// `J_Dᵀ ĝ / N` by backprop. Directions come from `directions_seed`.
pub struct ZoDsObjective<'a> {
    batch: DenoiserBatch<'a>,
    black_box: Arc<dyn BlackBox>,
    q: usize,
    mu: f64,
    directions_seed: u64,
    counter: Arc<AtomicU64>,
}

impl<'a> ZoDsObjective<'a> {
    /// On noisy images `x` with target classes `labels`; `q` directions, step `mu`.
    pub fn new(
        denoiser: &'a Model,
        x: Tensor,
        labels: Vec<u32>,
        black_box: Arc<dyn BlackBox>,
        q: usize,
        mu: f64,
        directions_seed: u64,
        counter: Arc<AtomicU64>,
    ) -> Result<Self> {
        if q == 0 || !(mu.is_finite() && mu > 0.0) {
            return Err(Error::Config(format!(
                "ZO-DS needs q ≥ 1 directions and μ > 0, got q = {q}, μ = {mu}"
            )));
        }
        Ok(ZoDsObjective {
            batch: DenoiserBatch::new(denoiser, x, labels)?,
            black_box,
            q,
            mu,
            directions_seed,
            counter,
        })
    }

    fn query(&self, images: &[f32], count: usize) -> Result<Vec<f64>> {
        self.counter.fetch_add(count as u64, Ordering::Relaxed);
        stability_losses(self.black_box.as_ref(), images, count, &self.batch.labels)
    }

    /// Mean loss and `ĝ` (the estimated gradient of the mean loss at the denoised images).
    pub fn input_gradient(&self, denoised: &[f32]) -> Result<(f64, Vec<f64>)> {
        let n = self.batch.n;
        let d = denoised.len() / n;
        let mut rng = stream_rng(self.directions_seed, &[]);
        let mut images = Vec::with_capacity((self.q + 1) * n * d);
        images.extend_from_slice(denoised);
        let mut dirs = Vec::with_capacity(self.q * n * d);
        for _ in 0..self.q * n * d {
            dirs.push(rng.sample::<f64, _>(StandardNormal));
        }
        for block in dirs.chunks_exact(n * d) {
            images.extend(
                denoised
                    .iter()
                    .zip(block)
                    .map(|(&o, &u)| o + (self.mu * u) as f32),
            );
        }
        let losses = self.query(&images, (self.q + 1) * n)?;
        let (base, perturbed) = losses.split_at(n);
        let mut g = vec![0.0f64; n * d];
        let scale = 1.0 / (self.q as f64 * self.mu * n as f64);
        for (j, block) in dirs.chunks_exact(n * d).enumerate() {
            for i in 0..n {
                let diff = (perturbed[j * n + i] - base[i]) * scale;
                for t in 0..d {
                    g[i * d + t] += diff * block[i * d + t];
                }
            }
        }
        Ok((mean(base), g))
    }
}

impl Objective for ZoDsObjective<'_> {
    fn layout(&self) -> &ParamLayout {
        &self.batch.model.layout
    }
    fn loss(&self, params: &[f64]) -> deepzero_core::Result<f64> {
        let run = || -> Result<f64> {
            let out = self
                .batch
                .forward(&self.batch.params_tensor(params)?, false)?;
            Ok(mean(&self.query(&host_f32(&out)?, self.batch.n)?))
        };
        run().map_err(to_core)
    }
    fn loss_and_grad(&self, params: &Tensor) -> deepzero_core::Result<Option<(f64, Tensor)>> {
        let run = || -> Result<(f64, Tensor)> {
            if let Some(p) = self.batch.host_f32_params(params)? {
                // f32 on the CPU: the denoiser's forward and backward on our kernels.
                let (trace, out) = self.batch.trace(&p)?;
                let (loss, g) = self.input_gradient(&out)?;
                let grad = trace.backward_batch_major(&g)?;
                return Ok((loss, grad_tensor(&grad, params)?));
            }
            let var = Var::from_tensor(params)?;
            let out = self.batch.forward(var.as_tensor(), true)?;
            let (loss, g) = self.input_gradient(&host_f32(&out)?)?;
            Ok((loss, chain(&var, &out, g)?))
        };
        run().map(Some).map_err(to_core)
    }
    fn take_bn_stats(&self) -> Option<BnBatchStats> {
        self.batch.take_stats()
    }
}

/// ZO-AE-DS: CGE at the autoencoder's code `z = E(D(x+δ))` on the black-box side `f ∘ R`
/// (one query per code coordinate plus the base, all in one black-box call of
/// `N·(code + 1)` images), chained through the encoder and the denoiser by backprop. The
/// autoencoder's parameters stay fixed.
pub struct ZoAeObjective<'a> {
    batch: DenoiserBatch<'a>,
    black_box: Arc<dyn BlackBox>,
    autoencoder: Arc<Autoencoder>,
    mu: f64,
    counter: Arc<AtomicU64>,
}

impl<'a> ZoAeObjective<'a> {
    /// On noisy images `x` with target classes `labels`; step `mu`.
    pub fn new(
        denoiser: &'a Model,
        x: Tensor,
        labels: Vec<u32>,
        black_box: Arc<dyn BlackBox>,
        autoencoder: Arc<Autoencoder>,
        mu: f64,
        counter: Arc<AtomicU64>,
    ) -> Result<Self> {
        if !(mu.is_finite() && mu > 0.0) {
            return Err(Error::Config(format!("μ must be positive, got {mu}")));
        }
        Ok(ZoAeObjective {
            batch: DenoiserBatch::new(denoiser, x, labels)?,
            black_box,
            autoencoder,
            mu,
            counter,
        })
    }

    fn query_codes(&self, codes: &[f32], count: usize) -> Result<Vec<f64>> {
        let images = self.autoencoder.decode(codes, count)?;
        self.counter.fetch_add(count as u64, Ordering::Relaxed);
        stability_losses(self.black_box.as_ref(), &images, count, &self.batch.labels)
    }

    /// Mean loss and the CGE of the mean loss's gradient at the codes `z` (`N × code`).
    pub fn code_gradient(&self, z: &[f32]) -> Result<(f64, Vec<f64>)> {
        let n = self.batch.n;
        let code = self.autoencoder.spec.code;
        let mut codes = Vec::with_capacity((code + 1) * n * code);
        codes.extend_from_slice(z);
        for k in 0..code {
            let start = codes.len();
            codes.extend_from_slice(z);
            for i in 0..n {
                codes[start + i * code + k] += self.mu as f32;
            }
        }
        let losses = self.query_codes(&codes, (code + 1) * n)?;
        let (base, perturbed) = losses.split_at(n);
        let mut g = vec![0.0f64; n * code];
        for k in 0..code {
            for i in 0..n {
                g[i * code + k] = (perturbed[k * n + i] - base[i]) / (self.mu * n as f64);
            }
        }
        Ok((mean(base), g))
    }
}

impl Objective for ZoAeObjective<'_> {
    fn layout(&self) -> &ParamLayout {
        &self.batch.model.layout
    }
    fn loss(&self, params: &[f64]) -> deepzero_core::Result<f64> {
        let run = || -> Result<f64> {
            let out = self
                .batch
                .forward(&self.batch.params_tensor(params)?, false)?;
            let z = self.autoencoder.encode(&out)?;
            Ok(mean(&self.query_codes(&host_f32(&z)?, self.batch.n)?))
        };
        run().map_err(to_core)
    }
    fn loss_and_grad(&self, params: &Tensor) -> deepzero_core::Result<Option<(f64, Tensor)>> {
        let run = || -> Result<(f64, Tensor)> {
            let (encoder, encoder_params) = self.autoencoder.encoder_parts();
            if let (Some(p), Some(ep)) = (
                self.batch.host_f32_params(params)?,
                host_if_f32_cpu(encoder_params)?,
            ) {
                // On our kernels: the denoiser's trace, the encoder's (no batch norm), the
                // codes' estimated gradient back through both.
                let (trace, out) = self.batch.trace(&p)?;
                let etrace = Trace::forward(encoder, &ep, &out, self.batch.n)?;
                let z: Vec<f32> = etrace
                    .output_batch_major()
                    .iter()
                    .map(|&v| v as f32)
                    .collect();
                let (loss, g) = self.code_gradient(&z)?;
                let (_, d_out) = etrace.backward_with_input(&g)?;
                let grad = trace.backward_batch_major(&d_out)?;
                return Ok((loss, grad_tensor(&grad, params)?));
            }
            let var = Var::from_tensor(params)?;
            let out = self.batch.forward(var.as_tensor(), true)?;
            let z = self.autoencoder.encode(&out)?;
            let (loss, g) = self.code_gradient(&host_f32(&z)?)?;
            Ok((loss, chain(&var, &z, g)?))
        };
        run().map(Some).map_err(to_core)
    }
    fn take_bn_stats(&self) -> Option<BnBatchStats> {
        self.batch.take_stats()
    }
}
