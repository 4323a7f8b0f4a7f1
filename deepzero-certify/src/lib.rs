//! # deepzero-certify
//!
//! Certified robustness of classifiers that may only be queried: randomized smoothing
//! (Cohen et al. 2019) over a [`BlackBox`] — a deepzero model ([`ModelClassifier`]), an external
//! program ([`ProcessClassifier`], `process:COMMAND`) or an ONNX file ([`OnnxClassifier`],
//! `onnx:FILE`, feature `onnx`).
//!
//! ```
//! use deepzero_certify::{BlackBox, QueryCounter, Result, Smoothed};
//! use rand::{rngs::StdRng, SeedableRng};
//!
//! /// f(x) = class 1 if the mean pixel exceeds 0.5, else class 0.
//! struct Threshold(QueryCounter);
//!
//! impl BlackBox for Threshold {
//!     fn input_shape(&self) -> [usize; 3] { [1, 2, 2] }
//!     fn num_classes(&self) -> Result<usize> { Ok(2) }
//!     fn logits(&self, images: &[f32], n: usize) -> Result<Vec<f32>> {
//!         self.0.add(n);
//!         Ok(images.chunks(4).flat_map(|x| {
//!             let s = x.iter().sum::<f32>() / 4.0 - 0.5;
//!             [-s, s]
//!         }).collect())
//!     }
//!     fn queries(&self) -> u64 { self.0.get() }
//! }
//!
//! let smoothed = Smoothed::new(Threshold(QueryCounter::default()), 0.25, 1000)?;
//! let mut rng = StdRng::seed_from_u64(0);
//! let cert = smoothed.certify(&[0.9; 4], 100, 10_000, 0.001, &mut rng)?;
//! assert_eq!(cert.class, Some(1));
//! // The exact radius is |w·x + b| / ‖w‖ = 0.4 · 4 / 2 = 0.8; the certificate stays below it.
//! assert!(cert.radius > 0.5 && cert.radius < 0.8);
//! assert_eq!(smoothed.classifier().queries(), 10_100);
//! # Ok::<(), deepzero_certify::Error>(())
//! ```
//!
//! Denoised smoothing: [`denoise`] trains a denoiser in front of the black box (MSE,
//! DeepZero, ZO-AE-DS, ZO-DS, FO-DS), each method a core task, and [`DenoisedClassifier`] puts it
//! in front of the classifier for certification.
//!
//! Modules: [`classifier`] (the interface), [`smoothing`] (CERTIFY, PREDICT and their
//! statistics), [`tsv`] (Cohen's output format, resume, certified accuracy), [`run`] (many
//! images, resumable), and one module per classifier kind.

pub mod classifier;
pub mod denoise;
pub mod error;
#[cfg(feature = "onnx")]
pub mod export;
pub mod model;
#[cfg(feature = "onnx")]
pub mod onnx;
pub mod process;
pub mod run;
pub mod smoothing;
pub mod tsv;

pub use classifier::{BlackBox, QueryCounter};
pub use denoise::{
    Autoencoder, AutoencoderSpec, DenoiseConfig, DenoiseMethod, DenoisedClassifier, DenoiserRecord,
    DenoiserRun, DenoiserTask, ZoConfig,
};
pub use error::{Error, ProcessFailure, Result};
pub use model::ModelClassifier;
#[cfg(feature = "onnx")]
pub use onnx::OnnxClassifier;
pub use process::ProcessClassifier;
pub use run::{certify_images, image_rng};
pub use smoothing::{
    binomial_test_half, clopper_pearson_lower, normal_inverse_cdf, Certificate, Prediction,
    Smoothed, SmoothingConfig,
};
pub use tsv::{certified_accuracy, parse_tsv, read_tsv, to_tsv, CertifyRow, TSV_HEADER};
