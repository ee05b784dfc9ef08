//! The crate's one error type. Row-level variants carry a [`Location`] (file and line, or file
//! and row for Parquet), name the offending field and end with what a valid row looks like, so
//! that a message such as `train.jsonl:17: field "chosen" is missing; preference rows look like
//! {"prompt", "chosen", "rejected"}` is enough to fix the file without reading this code.
//! [`Error::is_row_error`] tells which errors `--skip-invalid` may skip.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Where a row came from: its file and 1-based line (JSONL) or row (Parquet) number.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Location {
    /// The file as it was given (not canonicalised, so messages show what the user typed).
    pub path: Arc<Path>,
    /// 1-based line (JSONL) or row (Parquet) number.
    pub line: usize,
    /// Whether `line` counts lines of text or Parquet rows.
    pub unit: Unit,
}

/// What [`Location::line`] counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Unit {
    /// Lines of a text file (JSONL); blank lines count, so editors' line numbers match.
    Line,
    /// Rows of a Parquet file, counted over all row groups.
    Row,
}

impl Location {
    /// A location in a text file.
    pub fn line(path: impl Into<Arc<Path>>, line: usize) -> Self {
        Self {
            path: path.into(),
            line,
            unit: Unit::Line,
        }
    }

    /// A location in a Parquet file.
    pub fn row(path: impl Into<Arc<Path>>, row: usize) -> Self {
        Self {
            path: path.into(),
            line: row,
            unit: Unit::Row,
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.unit {
            // `file:17` is what editors and compilers print, so terminals make it clickable.
            Unit::Line => write!(f, "{}:{}", self.path.display(), self.line),
            Unit::Row => write!(f, "{}: row {}", self.path.display(), self.line),
        }
    }
}

/// Everything that can go wrong reading, validating, tokenising or sampling training data.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file could not be opened or read.
    #[error("{path}: cannot read: {source}", path = path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's reason.
        source: std::io::Error,
    },

    /// The file name says nothing about the format.
    #[error(
        "{path}: unknown data file type; name JSON-lines files *.jsonl (or *.json, one object per \
         line) and Parquet files *.parquet",
        path = path.display()
    )]
    UnknownFileType {
        /// The file.
        path: PathBuf,
    },

    /// A JSONL line that is not one JSON object.
    #[error(
        "{at}: not a JSON object ({msg}); each line of a JSON-lines file must be one complete object \
         such as {{\"prompt\": \"...\", \"completion\": \"...\"}} (a file holding one JSON array can be \
         converted with `jq -c '.[]' in.json > out.jsonl`)"
    )]
    BadJson {
        /// The line.
        at: Location,
        /// What the JSON parser said.
        msg: String,
    },

    /// A Parquet file that cannot be decoded.
    #[error("{path}: {msg}", path = path.display())]
    Parquet {
        /// The file.
        path: PathBuf,
        /// The reason and, where there is one, the fix.
        msg: String,
    },

    /// A required field is absent or null.
    #[error("{at}: field \"{field}\" is missing; {hint}")]
    MissingField {
        /// The row.
        at: Location,
        /// The field's path (`chosen`, `messages[2].content`).
        field: String,
        /// What a valid row of this kind looks like.
        hint: &'static str,
    },

    /// A field has the wrong JSON type.
    #[error("{at}: field \"{field}\" must be {expected}, found {found}; {hint}")]
    WrongType {
        /// The row.
        at: Location,
        /// The field's path.
        field: String,
        /// The type the format needs.
        expected: &'static str,
        /// The type the row has (with a short excerpt of the value).
        found: String,
        /// What a valid row of this kind looks like.
        hint: &'static str,
    },

    /// A field has the right type but a value that is not allowed.
    #[error("{at}: field \"{field}\" {msg}")]
    BadValue {
        /// The row.
        at: Location,
        /// The field's path.
        field: String,
        /// What is wrong and what would be right.
        msg: String,
    },

    /// A row whose fields match none of the formats the file should hold.
    #[error("{at}: a row with fields {found} is not a {kind} row; {hint}")]
    UnknownFormat {
        /// The row.
        at: Location,
        /// The record kind expected (`demonstration`, `preference`, `prompt`).
        kind: &'static str,
        /// The row's field names.
        found: String,
        /// The formats accepted.
        hint: String,
    },

    /// The tokenizer or its chat template failed on one row.
    #[error("{at}: {msg}")]
    Tokenize {
        /// The row.
        at: Location,
        /// The tokenizer's message.
        msg: String,
    },

    /// A file with no usable row.
    #[error("{path}: no usable rows{detail}", path = path.display())]
    Empty {
        /// The file.
        path: PathBuf,
        /// Why (e.g. how many rows were skipped and the first reasons), with a leading `; `.
        detail: String,
    },

    /// A setting or tokenizer that cannot produce the data asked for.
    #[error("{0}")]
    Config(String),

    /// A saved sampler position that does not fit this data set.
    #[error("cannot resume the data order: {0}")]
    Resume(String),

    /// An error from the model crate (loading the tokenizer, ...).
    #[error(transparent)]
    Model(#[from] rlhf_model::Error),
}

impl Error {
    /// Whether the error is about one row, so that `skip_invalid` may count it and go on.
    /// File-level failures (unreadable file, corrupt Parquet, bad settings) are never skipped.
    pub fn is_row_error(&self) -> bool {
        matches!(
            self,
            Error::BadJson { .. }
                | Error::MissingField { .. }
                | Error::WrongType { .. }
                | Error::BadValue { .. }
                | Error::UnknownFormat { .. }
                | Error::Tokenize { .. }
        )
    }

    /// The row the error is about, if it is a row error.
    pub fn location(&self) -> Option<&Location> {
        match self {
            Error::BadJson { at, .. }
            | Error::MissingField { at, .. }
            | Error::WrongType { at, .. }
            | Error::BadValue { at, .. }
            | Error::UnknownFormat { at, .. }
            | Error::Tokenize { at, .. } => Some(at),
            _ => None,
        }
    }

    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_file_line_and_field() {
        let at = Location::line(Path::new("train.jsonl"), 17);
        let e = Error::MissingField {
            at,
            field: "chosen".into(),
            hint: "preference rows look like {\"prompt\", \"chosen\", \"rejected\"}",
        };
        assert_eq!(
            e.to_string(),
            "train.jsonl:17: field \"chosen\" is missing; preference rows look like \
             {\"prompt\", \"chosen\", \"rejected\"}"
        );
        assert!(e.is_row_error());
        let at = Location::row(Path::new("train.parquet"), 3);
        assert_eq!(at.to_string(), "train.parquet: row 3");
    }
}
