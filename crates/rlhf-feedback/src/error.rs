//! Errors of the feedback store, import and export.

use std::path::PathBuf;

/// Everything that can go wrong in the feedback store, its import and its export.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// SQLite said no.
    #[error("{path}: database error: {source}", path = path.display())]
    Sqlite {
        /// The database file.
        path: PathBuf,
        /// SQLite's reason.
        source: rusqlite::Error,
    },
    /// A file could not be read or written.
    #[error("{path}: {source}", path = path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's reason.
        source: std::io::Error,
    },
    /// A row of an input file is not something the importer understands.
    #[error("{at}: {msg}")]
    Input {
        /// `file:line` (or `file: task N` for a JSON array).
        at: String,
        /// What is wrong, and what a good row looks like.
        msg: String,
    },
    /// Reading a data file through rlhf-data failed.
    #[error(transparent)]
    Data(#[from] rlhf_data::Error),
    /// A request the store refuses (unknown project, wrong kind, bad label...).
    #[error("{0}")]
    Invalid(String),
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Attaches the database path to a rusqlite error.
pub(crate) trait SqlContext<T> {
    fn at(self, path: &std::path::Path) -> Result<T>;
}

impl<T> SqlContext<T> for std::result::Result<T, rusqlite::Error> {
    fn at(self, path: &std::path::Path) -> Result<T> {
        self.map_err(|source| Error::Sqlite {
            path: path.to_path_buf(),
            source,
        })
    }
}
