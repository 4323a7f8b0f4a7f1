//! The crate's error type.

use std::path::PathBuf;

/// Everything that can go wrong in `deepzero-certify`. Each message says what was wrong and,
/// where there is one, how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An argument is out of range (σ, n, α, batch size, timeout, normalisation, ...).
    #[error("invalid argument: {0}")]
    Config(String),
    /// Sizes that do not fit together (image length vs input shape, logits vs batch).
    #[error("shape mismatch: {0}")]
    Shape(String),
    /// A classifier answered something unusable (NaN logits, a changing class count).
    #[error("classifier: {0}")]
    Classifier(String),
    /// The external classifier program failed; see [`ProcessFailure`].
    #[error(transparent)]
    Process(Box<ProcessFailure>),
    /// An ONNX file could not be loaded or run.
    #[error("ONNX model {path}: {msg}")]
    Onnx {
        /// The file.
        path: PathBuf,
        /// What went wrong, with tract's explanation.
        msg: String,
    },
    /// A certification TSV file is malformed.
    #[error("{path}, line {line}: {msg}")]
    Tsv {
        /// The file (or the name given to the parsed text).
        path: PathBuf,
        /// One-based line number.
        line: usize,
        /// What is wrong with the line.
        msg: String,
    },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// An error from deepzero-core (model evaluation).
    #[error(transparent)]
    Core(#[from] deepzero_core::Error),
    /// A tensor operation failed inside candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result with the crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// Details of a failed exchange with an external classifier program (`process:COMMAND`).
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessFailure {
    /// The command as given to `sh -c`.
    pub command: String,
    /// One-based number of the request that failed (0: while starting the program).
    pub request: u64,
    /// One-based line of the response that was wrong, if one was.
    pub line: Option<usize>,
    /// What went wrong.
    pub msg: String,
    /// The program's last lines on stderr (oldest first).
    pub stderr: Vec<String>,
}

impl std::fmt::Display for ProcessFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "classifier program `{}`", self.command)?;
        if self.request > 0 {
            write!(f, ", request {}", self.request)?;
        }
        if let Some(line) = self.line {
            write!(f, ", response line {line}")?;
        }
        write!(f, ": {}", self.msg)?;
        if self.stderr.is_empty() {
            write!(f, " (the program wrote nothing to stderr)")
        } else {
            write!(f, "\nlast lines of the program's stderr:")?;
            for l in &self.stderr {
                write!(f, "\n  | {l}")?;
            }
            Ok(())
        }
    }
}

impl std::error::Error for ProcessFailure {}

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// The [`ProcessFailure`] inside, if this is a process error.
    pub fn process_failure(&self) -> Option<&ProcessFailure> {
        match self {
            Error::Process(p) => Some(p),
            _ => None,
        }
    }
}
