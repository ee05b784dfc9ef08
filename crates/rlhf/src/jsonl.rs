//! JSONL input and output with errors that name the file, line and field.

use std::io::{BufRead, Write};
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};

/// One input row with its line number (1-based) for messages.
pub struct Row {
    /// 1-based line number in the input file.
    pub line: usize,
    /// The JSON object.
    pub value: Map<String, Value>,
}

/// Reads every non-empty line of a JSONL file as an object.
pub fn read(path: &Path) -> Result<Vec<Row>> {
    let f =
        std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let mut rows = Vec::new();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line.with_context(|| format!("{}:{}: cannot read", path.display(), i + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(&line).with_context(|| {
            format!(
                "{}:{}: not valid JSON (each line must be one JSON object)",
                path.display(),
                i + 1
            )
        })?;
        let Value::Object(value) = v else {
            bail!(
                "{}:{}: expected a JSON object, found {}",
                path.display(),
                i + 1,
                kind(&v)
            );
        };
        rows.push(Row { line: i + 1, value });
    }
    Ok(rows)
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
pub fn str_field<'a>(path: &Path, row: &'a Row, field: &str) -> Result<Option<&'a str>> {
    match row.value.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(v) => bail!(
            "{}:{}: field \"{field}\" must be a string, found {}",
            path.display(),
            row.line,
            kind(v)
        ),
    }
}

/// A `messages` field: a list of {"role", "content"} objects.
pub fn messages_field(
    path: &Path,
    row: &Row,
    field: &str,
) -> Result<Option<Vec<rlhf_model::tokenizer::ChatMessage>>> {
    match row.value.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => serde_json::from_value(v.clone()).map(Some).map_err(|e| {
            anyhow::anyhow!(
                "{}:{}: field \"{field}\" must be a list of {{\"role\", \"content\"}} objects: {e}",
                path.display(),
                row.line
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
