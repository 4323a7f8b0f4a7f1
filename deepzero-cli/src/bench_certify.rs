//! `deepzero bench certify`: the cost of certifying one image against the classifier's own
//! forward rate. CERTIFY with `n0 + n` samples is `n0 + n` forward passes plus the noise draws
//! and the counting; the bench times both on the same classifier and batch size, so their ratio
//! is the overhead of certification itself.

use crate::certify::{classifier_from_spec, test_images};
use crate::common::DataArg;
use anyhow::{bail, Result};
use clap::Args;
use deepzero_certify::smoothing::{Smoothed, SmoothingConfig};
use deepzero_certify::{image_rng, BlackBox};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Args, Debug)]
pub struct CertifyBenchArgs {
    /// The black box: `run:DIR`, `process:COMMAND` or `onnx:FILE`.
    #[arg(long)]
    pub classifier: String,
    /// Data set of the test image.
    #[arg(long, value_enum, default_value_t = DataArg::Digits)]
    pub dataset: DataArg,
    /// Directory with the data set's files.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Index of the test image.
    #[arg(long, default_value_t = 0)]
    pub image: usize,
    /// Noise level σ.
    #[arg(long, default_value_t = 0.25)]
    pub sigma: f64,
    /// Selection samples.
    #[arg(long, default_value_t = 100)]
    pub n0: usize,
    /// Estimation samples.
    #[arg(long, default_value_t = 100_000)]
    pub n: usize,
    /// Noisy images per classifier call.
    #[arg(long, default_value_t = 1000)]
    pub batch: usize,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize, Debug)]
pub struct CertifyBench {
    pub classifier: String,
    pub forwards: u64,
    pub batch: usize,
    /// Seconds of `n0 + n` forward passes in batches (the images drawn once, outside the timing).
    pub forward_seconds: f64,
    pub forwards_per_second: f64,
    /// For a `run:` classifier: the same forwards through its ONNX export on tract, in the
    /// same run (our kernels beside the ONNX runtime).
    pub tract_forward_seconds: Option<f64>,
    pub tract_forwards_per_second: Option<f64>,
    /// Seconds of CERTIFY on one image with `n0`, `n`.
    pub certify_seconds: f64,
    /// `certify_seconds / forward_seconds`.
    pub ratio: f64,
    pub predict: i64,
    pub radius: f64,
}

pub fn run(args: &CertifyBenchArgs) -> Result<()> {
    if args.n == 0 || args.n0 == 0 || args.batch == 0 {
        bail!("--n, --n0 and --batch must be at least 1");
    }
    if !(args.sigma.is_finite() && args.sigma > 0.0) {
        bail!("--sigma must be positive, got {}", args.sigma);
    }
    // The victim's own test split, as `certify run` takes it.
    let split = crate::certify::victim_split(&args.classifier)?;
    let data = test_images(args.dataset, &args.data_dir, split.seed)?;
    let shape = [data.channels, data.height, data.width];
    let per: usize = shape.iter().product();
    if args.image >= data.labels.len() {
        bail!(
            "--image {}: the test set has {} images",
            args.image,
            data.labels.len()
        );
    }
    let x = &data.images[args.image * per..(args.image + 1) * per];
    let classifier = classifier_from_spec(&args.classifier, shape, Duration::from_secs(600))?;
    let total = (args.n0 + args.n) as u64;

    // Forward passes alone: one batch of noisy copies, drawn once, sent total / batch times.
    let batch = args.batch.min(total as usize);
    let mut rng = image_rng(1, args.image);
    let noise = rand_distr::Normal::new(0.0f32, args.sigma as f32)?;
    let noisy: Vec<f32> = (0..batch)
        .flat_map(|_| x.to_vec())
        .map(|v| v + rand_distr::Distribution::sample(&noise, &mut rng))
        .collect();
    let forward_seconds = forwards_seconds(classifier.as_ref(), &noisy, batch, total, per)?;
    let tract_forward_seconds = match args.classifier.strip_prefix("run:") {
        Some(dir) => Some(tract_seconds(Path::new(dir), &noisy, batch, total, per)?),
        None => None,
    };

    let config = SmoothingConfig {
        sigma: args.sigma,
        n0: args.n0 as u64,
        n: args.n as u64,
        alpha: 0.001,
        batch: args.batch,
    };
    let smoothed = Smoothed::from_config(classifier.as_ref(), &config)?;
    let mut rng = image_rng(0, args.image);
    let start = Instant::now();
    let cert = smoothed.certify(x, config.n0, config.n, config.alpha, &mut rng)?;
    let certify_seconds = start.elapsed().as_secs_f64();

    let r = CertifyBench {
        classifier: args.classifier.clone(),
        forwards: total,
        batch,
        forward_seconds,
        forwards_per_second: total as f64 / forward_seconds,
        tract_forward_seconds,
        tract_forwards_per_second: tract_forward_seconds.map(|t| total as f64 / t),
        certify_seconds,
        ratio: certify_seconds / forward_seconds,
        predict: cert.class.map_or(-1, |c| c as i64),
        radius: cert.radius,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!("{r:#?}");
    }
    Ok(())
}

/// Seconds of `total` forwards of the `run:` classifier in `dir` through its ONNX export on
/// tract ([`forwards_seconds`]). The export goes to a temporary file, removed afterwards.
fn tract_seconds(dir: &Path, noisy: &[f32], batch: usize, total: u64, per: usize) -> Result<f64> {
    let classifier = crate::certify::model_classifier(dir)?;
    let path = std::env::temp_dir().join(format!("deepzero-bench-{}.onnx", std::process::id()));
    deepzero_certify::export::write_onnx(&classifier, &path)?;
    let onnx = deepzero_certify::OnnxClassifier::load(&path);
    let _ = std::fs::remove_file(&path);
    forwards_seconds(&onnx?, noisy, batch, total, per)
}

/// Seconds of `total` forwards of `classifier` in batches of `batch` noisy images (`per`
/// values each, `noisy` holds one batch), after one warm-up batch.
fn forwards_seconds(
    classifier: &dyn BlackBox,
    noisy: &[f32],
    batch: usize,
    total: u64,
    per: usize,
) -> Result<f64> {
    classifier.logits(&noisy[..batch * per], batch)?;
    let start = Instant::now();
    let mut left = total;
    while left > 0 {
        let m = left.min(batch as u64) as usize;
        classifier.logits(&noisy[..m * per], m)?;
        left -= m as u64;
    }
    Ok(start.elapsed().as_secs_f64())
}
