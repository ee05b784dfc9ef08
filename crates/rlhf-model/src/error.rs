//! The one error type of `rlhf-model`: every variant carries what a user needs to fix it.

use std::path::PathBuf;

/// Errors from loading, saving, converting and running models.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file the model directory needs is absent.
    #[error("{path}: file not found ({what}); {hint}")]
    MissingFile {
        path: PathBuf,
        what: &'static str,
        hint: String,
    },
    /// A file exists but could not be read or parsed.
    #[error("{path}: {msg}")]
    BadFile { path: PathBuf, msg: String },
    /// config.json names an architecture this crate does not implement.
    #[error("{path}: unknown model_type {found:?}; supported: {supported}")]
    UnknownModelType {
        path: PathBuf,
        found: String,
        supported: &'static str,
    },
    /// A tensor the architecture needs is missing from the checkpoint.
    #[error("{path}: tensor {name:?} not found in the checkpoint{hint}")]
    MissingTensor {
        path: PathBuf,
        name: String,
        hint: String,
    },
    /// A tensor in the checkpoint has a shape the config does not allow.
    #[error("{path}: tensor {name:?} has shape {found:?}, expected {expected:?} from config.json")]
    ShapeMismatch {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    /// A path looks like a hub name; nothing is downloaded at run time.
    #[error("{name:?} is not a local directory. rlhf never downloads at run time: fetch the files first (e.g. `huggingface-cli download {name} --local-dir DIR` on a machine with network access, or `rlhf convert gguf FILE.gguf DIR`) and pass the directory")]
    HubName { name: String },
    /// Invalid configuration value (LoRA config, generation options, ...).
    #[error("invalid config: {0}")]
    Config(String),
    /// A forward pass asked to run on no tokens (an empty sequence or batch); the message
    /// names the row.
    #[error("empty input: {0}")]
    EmptyInput(String),
    /// Tokenizer or chat-template failure.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// Numerical/tensor failure from candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// I/O failure with the path it happened on.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// A parse or content error in a file.
    pub fn bad_file(path: impl Into<PathBuf>, msg: impl std::fmt::Display) -> Self {
        Error::BadFile {
            path: path.into(),
            msg: msg.to_string(),
        }
    }
}
