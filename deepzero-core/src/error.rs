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
    /// The loss became NaN or infinite.
    #[error("training diverged: {0}")]
    Diverged(String),
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
    /// A format error in the data file `path`.
    pub fn data(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Data {
            path: path.into(),
            msg: msg.into(),
        }
    }
}
