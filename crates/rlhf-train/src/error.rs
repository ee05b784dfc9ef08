//! The one error type of `rlhf-train`: each variant says what to fix.

use std::path::PathBuf;

/// Errors from configuring, running and resuming training.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A config value or combination is invalid; the message names the key.
    #[error("config: {0}")]
    Config(String),
    /// Losses or gradients stayed non-finite; no poisoned weights were saved.
    #[error("training diverged: {0}")]
    Diverged(String),
    /// Resuming is impossible (checkpoint and run disagree).
    #[error("resume: {0}")]
    Resume(String),
    /// I/O with the path it happened on.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Model loading, saving or computing.
    #[error(transparent)]
    Model(#[from] rlhf_model::Error),
    /// Data reading or tokenising.
    #[error(transparent)]
    Data(#[from] rlhf_data::Error),
    /// Tensor math.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// I/O from the metrics sinks (their messages already name the file).
    #[error(transparent)]
    Sink(#[from] std::io::Error),
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Wraps an I/O error with its path.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
