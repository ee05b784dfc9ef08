//! The one error type of `rlhf-train`: each variant says what to fix, naming the path, key or
//! parameter involved and, where a value is wrong, what was expected and what was found.

use std::path::PathBuf;

/// Errors from configuring, running and resuming training.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A config value or combination is invalid; the message names the key.
    #[error("config: {0}")]
    Config(String),
    /// A setting has a value this crate does not accept (an unknown scheduler, a β outside
    /// [0, 1), ...).
    #[error("\"{key}\" must be {expected}, found {found}")]
    InvalidValue {
        /// The setting, as named in the config (`lr_scheduler_type`, `adam_beta1`, ...).
        key: String,
        /// What was given.
        found: String,
        /// What is accepted.
        expected: String,
    },
    /// Losses or gradients stayed non-finite; no poisoned weights were saved.
    #[error("training diverged: {0}")]
    Diverged(String),
    /// Resuming is impossible (checkpoint and run disagree).
    #[error("resume: {0}")]
    Resume(String),
    /// The optimiser state being loaded lacks an entry this run's parameters need.
    #[error(
        "optimizer state has no `{key}`: the checkpoint was written for other trainable \
         parameters (were the model, the LoRA settings or the trainer changed since?)"
    )]
    MissingState {
        /// The missing entry (`{param}.exp_avg`, `{param}.exp_avg_sq` or `step`).
        key: String,
    },
    /// An optimiser state entry has a different shape than the parameter it belongs to.
    #[error(
        "optimizer state `{key}` has shape {found:?}, the parameter has {expected:?}: the \
         checkpoint was written for a different model or LoRA rank"
    )]
    StateShape {
        /// The entry.
        key: String,
        /// The parameter's shape.
        expected: Vec<usize>,
        /// The entry's shape.
        found: Vec<usize>,
    },
    /// The optimiser state holds moments for parameters this run does not train.
    #[error(
        "optimizer state has entries for parameters this run does not train ({}): the \
         checkpoint was written for other trainable parameters",
        .keys.join(", ")
    )]
    UnknownState {
        /// Some of the unexpected entries (at most a handful, sorted).
        keys: Vec<String>,
    },
    /// A gradient does not have its parameter's shape (a bug in the code that built it).
    #[error("gradient of `{param}` has shape {found:?}, the parameter has {expected:?}")]
    GradShape {
        /// The parameter.
        param: String,
        /// The parameter's shape.
        expected: Vec<usize>,
        /// The gradient's shape.
        found: Vec<usize>,
    },
    /// A reward program could not be started, exited or hung before answering a row, or
    /// answered with a line that is not a score; the message names the row and the fix.
    #[error("reward program `{command}`: {problem}")]
    RewardProgram {
        /// The command as configured (`reward_program`).
        command: String,
        /// What went wrong, naming the row (file:line) it was answering.
        problem: String,
    },
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

    /// An [`Error::InvalidValue`] for `key`.
    pub fn invalid(
        key: impl Into<String>,
        found: impl std::fmt::Display,
        expected: impl Into<String>,
    ) -> Self {
        Error::InvalidValue {
            key: key.into(),
            found: found.to_string(),
            expected: expected.into(),
        }
    }
}
