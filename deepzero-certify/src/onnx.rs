//! [`OnnxClassifier`]: an ONNX file as a black box (`onnx:FILE`), run by tract (pure Rust).
//!
//! The graph must take one f32 input `[N, C, H, W]` and give scores `[N, K]` as its first
//! output. The image shape is read from the file; the batch dimension may be symbolic (any N:
//! a query batch runs in chunks of at most [`ONNX_CHUNK`] images) or fixed (N = B: the batch
//! runs in chunks of B, the last one padded with copies of its final image whose scores are
//! dropped and not counted as queries).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tract_onnx::prelude::*;

use crate::classifier::{check_batch, BlackBox, QueryCounter};
use crate::error::{Error, Result};

/// Largest chunk run at once for a model with a symbolic batch dimension.
pub const ONNX_CHUNK: usize = 256;

/// An ONNX classifier.
pub struct OnnxClassifier {
    path: PathBuf,
    plan: Arc<TypedRunnableModel>,
    input_shape: [usize; 3],
    /// `Some(B)` when the file fixes the batch size.
    fixed_batch: Option<usize>,
    num_classes: usize,
    queries: QueryCounter,
}

impl OnnxClassifier {
    /// Load and optimise `path`.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let fail = |msg: String| Error::Onnx {
            path: path.clone(),
            msg,
        };
        if !path.is_file() {
            return Err(fail("no such file; give the path of an .onnx model".into()));
        }
        let typed = guard_quietly(|| {
            tract_onnx::onnx()
                .model_for_path(&path)
                .and_then(|m| m.into_typed())
        })
        .map_err(|e| fail(format!("could not load the graph: {e:#}")))?;
        if typed.inputs.len() != 1 {
            return Err(fail(format!(
                "the graph has {} inputs; a classifier takes exactly one image batch",
                typed.inputs.len()
            )));
        }
        let fact = typed
            .input_fact(0)
            .map_err(|e| fail(format!("{e:#}")))?
            .clone();
        if fact.datum_type != f32::datum_type() {
            return Err(fail(format!(
                "the input is {:?}; only f32 image inputs are supported",
                fact.datum_type
            )));
        }
        let dims = fact.shape.dims();
        if dims.len() != 4 {
            return Err(fail(format!(
                "the input has shape {:?}; expected [N, C, H, W]",
                fact.shape
            )));
        }
        let mut input_shape = [0usize; 3];
        for (slot, d) in input_shape.iter_mut().zip(&dims[1..]) {
            *slot = d.as_i64().filter(|&v| v > 0).ok_or_else(|| {
                fail(format!(
                    "the input shape {:?} must have fixed C, H, W",
                    fact.shape
                ))
            })? as usize;
        }
        let fixed_batch = dims[0].as_i64().map(|b| b.max(1) as usize);
        let plan = guard_quietly(|| typed.into_optimized().and_then(|m| m.into_runnable()))
            .map_err(|e| fail(format!("could not optimise the graph: {e:#}")))?;
        let mut classifier = OnnxClassifier {
            path,
            plan,
            input_shape,
            fixed_batch,
            num_classes: 0,
            queries: QueryCounter::default(),
        };
        // K from one run on a grey image (not counted as a query).
        let grey = vec![0.5f32; input_shape.iter().product()];
        let scores = classifier.run_chunk(&grey, 1)?;
        if scores.is_empty() {
            return Err(classifier.error("the model answers no scores".into()));
        }
        classifier.num_classes = scores.len();
        Ok(classifier)
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The batch size fixed by the file, `None` when it is symbolic.
    pub fn fixed_batch(&self) -> Option<usize> {
        self.fixed_batch
    }

    fn error(&self, msg: String) -> Error {
        Error::Onnx {
            path: self.path.clone(),
            msg,
        }
    }

    /// Scores for `n` images (`n ≤` the chunk size), `n × K`.
    fn run_chunk(&self, images: &[f32], n: usize) -> Result<Vec<f32>> {
        let [c, h, w] = self.input_shape;
        let per_image = c * h * w;
        let run_n = self.fixed_batch.unwrap_or(n);
        let mut data = images.to_vec();
        if let Some(last) = images.len().checked_sub(per_image) {
            // Pad a fixed batch with copies of the final image.
            while data.len() < run_n * per_image {
                data.extend_from_within(last..last + per_image);
            }
        }
        let input = Tensor::from_shape(&[run_n, c, h, w], &data)
            .map_err(|e| self.error(format!("{e:#}")))?;
        let outputs = guard(|| self.plan.run(tvec!(input.into_tvalue())))
            .map_err(|e| self.error(format!("running the graph failed: {e:#}")))?;
        let output = outputs
            .first()
            .ok_or_else(|| self.error("the graph has no output".into()))?
            .cast_to::<f32>()
            .map_err(|e| self.error(format!("{e:#}")))?;
        let shape = output.shape().to_vec();
        let rows = shape.first().copied().unwrap_or(0);
        let total: usize = shape.iter().product();
        if rows != run_n || !total.is_multiple_of(run_n.max(1)) {
            return Err(self.error(format!(
                "the output has shape {shape:?}; expected [{run_n}, K] scores"
            )));
        }
        let k = total / run_n.max(1);
        let scores: Vec<f32> = output
            .to_plain_array_view::<f32>()
            .map_err(|e| self.error(format!("{e:#}")))?
            .iter()
            .copied()
            .take(n * k)
            .collect();
        Ok(scores)
    }
}

/// Run a tract call, turning a panic inside tract (a corrupt file can trigger one, e.g. a graph
/// output that no node computes) into an error, so that a bad model file is reported like any
/// other bad input.
fn guard<T>(call: impl FnOnce() -> TractResult<T>) -> TractResult<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(call)).unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "no message".into());
        Err(tract_onnx::tract_core::tract_data::internal::format_err!(
            "tract panicked ({what}); the file is corrupt or uses an unsupported construct"
        ))
    })
}

/// [`guard`], with the panic hook silenced for the call: loading a file runs once, and its
/// failure is reported as an error, not as a panic message on stderr.
fn guard_quietly<T>(call: impl FnOnce() -> TractResult<T>) -> TractResult<T> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let result = guard(call);
    std::panic::set_hook(hook);
    result
}

impl BlackBox for OnnxClassifier {
    fn input_shape(&self) -> [usize; 3] {
        self.input_shape
    }

    fn num_classes(&self) -> Result<usize> {
        Ok(self.num_classes)
    }

    fn logits(&self, images: &[f32], n: usize) -> Result<Vec<f32>> {
        check_batch(images, n, self.input_shape)?;
        let per_image: usize = self.input_shape.iter().product();
        let chunk = self.fixed_batch.unwrap_or(ONNX_CHUNK);
        let mut out = Vec::with_capacity(n * self.num_classes);
        for part in images.chunks(chunk * per_image) {
            let m = part.len() / per_image;
            let scores = self.run_chunk(part, m)?;
            if scores.len() != m * self.num_classes {
                return Err(self.error(format!(
                    "the graph answered {} scores for {m} images of {} classes",
                    scores.len(),
                    self.num_classes
                )));
            }
            out.extend(scores);
        }
        self.queries.add(n);
        Ok(out)
    }

    fn queries(&self) -> u64 {
        self.queries.get()
    }
}
