//! JSONL input and output with errors that name the file, line and field.
//!
//! Input goes through `rlhf_data::read_rows`, the reader every trainer uses: the same file
//! types (JSON lines by `.jsonl`/`.json`/`.ndjson`, Parquet by `.parquet`), a byte-order mark
//! and CRLF line ends read alike, and the same `file:line` messages.

use std::io::Write;
use std::path::Path;

use anyhow::{bail, Result};
use rlhf_data::Location;
use serde_json::{Map, Value};

/// One input row with where it came from, for messages.
pub struct Row {
    /// The file and line (Parquet: row); displays as `file:line`.
    pub at: Location,
    /// The JSON object.
    pub value: Map<String, Value>,
}

/// Reads every row of a data file (blank lines skipped) as an object.
pub fn read(path: &Path) -> Result<Vec<Row>> {
    Ok(rlhf_data::read_rows(path)?
        .into_iter()
        .map(|r| Row {
            at: r.at,
            value: r.fields,
        })
        .collect())
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A string field of a row, or an error naming file, line and field.
pub fn str_field<'a>(row: &'a Row, field: &str) -> Result<Option<&'a str>> {
    match row.value.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(v) => bail!(
            "{}: field \"{field}\" must be a string, found {}",
            row.at,
            kind(v)
        ),
    }
}

/// A `messages` field: a non-empty list of {"role", "content"} objects (an empty list is
/// refused here: a conversation without a message is nothing to score or answer).
pub fn messages_field(
    row: &Row,
    field: &str,
) -> Result<Option<Vec<rlhf_model::tokenizer::ChatMessage>>> {
    match row.value.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(a)) if a.is_empty() => bail!(
            "{}: field \"{field}\" is an empty list; give at least one {{\"role\", \"content\"}} \
             message, or drop the row",
            row.at
        ),
        Some(v) => serde_json::from_value(v.clone()).map(Some).map_err(|e| {
            anyhow::anyhow!(
                "{}: field \"{field}\" must be a list of {{\"role\", \"content\"}} objects: {e}",
                row.at
            )
        }),
    }
}

/// Where output rows go: a file (written whole, atomically, at the end) or stdout.
pub struct Output {
    path: Option<std::path::PathBuf>,
    buf: Vec<u8>,
}

impl Output {
    /// Output to `path`, or stdout when None.
    pub fn new(path: Option<&Path>) -> Self {
        Self {
            path: path.map(Path::to_path_buf),
            buf: Vec::new(),
        }
    }

    /// Output to `path` (stdout when None), which must not be one of `inputs`: writing the
    /// results over the file they are computed from would lose it.
    pub fn not_over(path: Option<&Path>, inputs: &[&Path]) -> Result<Self> {
        if let Some(out) = path {
            for input in inputs {
                if same_file(out, input) {
                    bail!(
                        "--output {} is the input file: write the results to another file \
                         (the input would be overwritten)",
                        out.display()
                    );
                }
            }
        }
        Ok(Self::new(path))
    }

    /// Appends one row; stdout rows are flushed at once so pipes see progress.
    pub fn write(&mut self, row: &Map<String, Value>) -> Result<()> {
        let line = serde_json::to_string(row)?;
        match &self.path {
            None => {
                let mut out = std::io::stdout().lock();
                writeln!(out, "{line}")?;
                out.flush()?;
            }
            Some(_) => {
                self.buf.extend_from_slice(line.as_bytes());
                self.buf.push(b'\n');
            }
        }
        Ok(())
    }

    /// Writes the file, if any.
    pub fn finish(self) -> Result<()> {
        if let Some(p) = &self.path {
            rlhf_model::save::write_atomic(p, &self.buf)?;
        }
        Ok(())
    }
}

/// Whether `a` and `b` name the same existing file (through links and `..`).
pub fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}
