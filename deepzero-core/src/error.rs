//! The one error type of `deepzero-core`.

use std::path::PathBuf;

/// Everything that can go wrong in the core library. Messages say what was wrong and how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A data file exists but its contents are not what the format requires.
    #[error("{path}: {msg}")]
    Data { path: PathBuf, msg: String },
    /// A data set or directory was not found.
    #[error("{0}")]
    NotFound(String),
    /// A configuration value is out of range or inconsistent; the message names the option.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Shapes or sizes that do not fit together.
    #[error("shape mismatch: {0}")]
    Shape(String),
    /// A tensor operation failed inside candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// JSON (de)serialisation failed.
    #[error("{context}: {source}")]
    Json {
        context: String,
        #[source]
        source: serde_json::Error,
    },
    /// A setting is out of range, in core's words; front ends name their own flag for
    /// [`Setting`] (the CLI maps [`Setting::LearningRate`] to `--lr`).
    #[error("{} {message}", setting.name())]
    Invalid {
        /// Which setting.
        setting: Setting,
        /// What is wrong with it and the value given (`must be positive, got -1`).
        message: String,
    },
    /// The loss became NaN or infinite.
    #[error("training diverged: {0}")]
    Diverged(String),
    /// Ranks of a distributed run disagree, or their transport failed.
    #[error("distributed run: {0}")]
    Distributed(String),
}

/// The settings core validates (see [`Error::Invalid`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Setting {
    /// Training epochs.
    Epochs,
    /// Peak learning rate.
    LearningRate,
    /// Warm-up epochs.
    WarmupEpochs,
    /// SGD momentum / Adam β1.
    Momentum,
    /// L2 weight decay.
    WeightDecay,
    /// RGE directions per estimate.
    Directions,
    /// Finite-difference step μ.
    Mu,
    /// Fraction of weights left out of the gradient.
    Sparsity,
    /// Epochs between coordinate-set redraws.
    MaskInterval,
    /// Samples per step.
    BatchSize,
    /// Queries evaluated in one call.
    QueryBatch,
    /// The gradient estimator.
    Estimator,
    /// Coordinates (parameters) estimated or checked.
    Coordinates,
    /// Parameters of a model (its depth and width).
    ModelSize,
}

impl Setting {
    /// Name in core's words.
    pub fn name(self) -> &'static str {
        match self {
            Setting::Epochs => "the number of epochs",
            Setting::LearningRate => "the learning rate",
            Setting::WarmupEpochs => "the number of warm-up epochs",
            Setting::Momentum => "the momentum",
            Setting::WeightDecay => "the weight decay",
            Setting::Directions => "the number of RGE directions",
            Setting::Mu => "the finite-difference step μ",
            Setting::Sparsity => "the sparsity",
            Setting::MaskInterval => "the mask interval",
            Setting::BatchSize => "the batch size",
            Setting::QueryBatch => "the query batch",
            Setting::Estimator => "the estimator",
            Setting::Coordinates => "the number of coordinates",
            Setting::ModelSize => "the number of model parameters",
        }
    }
}

/// Result with the core [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
    /// An out-of-range setting.
    pub fn invalid(setting: Setting, message: impl Into<String>) -> Self {
        Error::Invalid {
            setting,
            message: message.into(),
        }
    }
    /// A format error in the data file `path`.
    pub fn data(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Data {
            path: path.into(),
            msg: msg.into(),
        }
    }
}
