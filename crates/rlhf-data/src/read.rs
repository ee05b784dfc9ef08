//! Reading rows from JSON-lines and Parquet files as JSON objects with their line (row) numbers.
//!
//! Both formats stream: [`rows`] returns an iterator, so a large file is never held twice. A
//! Parquet file is read with the `parquet` crate's row API (no Arrow) and each row converted
//! to the same `serde_json` object a JSONL line would give, so record parsing is written once:
//! strings stay strings, lists of structs (`messages`) become arrays of objects, integers and
//! floats become numbers. Snappy, gzip and LZ4 pages are read; zstd and brotli are not compiled
//! in (zstd needs a C library), and such files fail with a message saying how to rewrite them.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::sync::Arc;

use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::{Field, Row};
use serde_json::{Map, Value};

use crate::error::{Error, Location, Result};

/// One row of a data file: its fields and where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct RawRow {
    /// The file and line (row) number, for error messages.
    pub at: Location,
    /// The row's fields as a JSON object.
    pub fields: Map<String, Value>,
}

/// The formats [`rows`] reads, chosen by file extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileFormat {
    /// One JSON object per line (`.jsonl`, `.ndjson`, `.json`).
    Jsonl,
    /// Apache Parquet (`.parquet`, `.pq`).
    Parquet,
}

impl FileFormat {
    /// The format a file name implies.
    pub fn from_path(path: &Path) -> Result<Self> {
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        match ext.as_deref() {
            // `datasets.Dataset.to_json` writes JSON lines to `.json` files by default.
            Some("jsonl" | "ndjson" | "json") => Ok(FileFormat::Jsonl),
            Some("parquet" | "pq") => Ok(FileFormat::Parquet),
            // A pipe or a device (`/dev/stdin`, `<(cmd)`) has no name to go by, and Parquet
            // cannot be read from a stream: JSON lines.
            None if is_stream(path) => Ok(FileFormat::Jsonl),
            _ => Err(Error::UnknownFileType {
                path: path.to_path_buf(),
            }),
        }
    }
}

/// Whether `path` is a pipe, socket or character device rather than a file on disk.
fn is_stream(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(path).is_ok_and(|m| {
        let t = m.file_type();
        t.is_fifo() || t.is_char_device() || t.is_socket()
    })
}

/// A streaming iterator over the rows of a data file; see [`rows`].
pub struct Rows {
    inner: RowsInner,
}

enum RowsInner {
    Jsonl(JsonlRows),
    Parquet(ParquetRows),
}

impl Iterator for Rows {
    type Item = Result<RawRow>;

    fn next(&mut self) -> Option<Self::Item> {
        match &mut self.inner {
            RowsInner::Jsonl(r) => r.next(),
            RowsInner::Parquet(r) => r.next(),
        }
    }
}

/// Opens a JSONL or Parquet file (by extension) and iterates over its rows.
///
/// Items are `Err` for a line that is not a JSON object (a row error, see
/// [`Error::is_row_error`]) and for read failures (not row errors: stop there).
pub fn rows(path: &Path) -> Result<Rows> {
    let inner = match FileFormat::from_path(path)? {
        FileFormat::Jsonl => RowsInner::Jsonl(JsonlRows::open(path)?),
        FileFormat::Parquet => RowsInner::Parquet(ParquetRows::open(path)?),
    };
    Ok(Rows { inner })
}

/// Reads every row of a file; the first error of any kind stops the read.
pub fn read_rows(path: &Path) -> Result<Vec<RawRow>> {
    rows(path)?.collect()
}

/// Rows of a JSON-lines file. Blank lines are skipped (but counted, so numbers match editors').
struct JsonlRows {
    path: Arc<Path>,
    reader: BufReader<File>,
    line: usize,
    buf: Vec<u8>,
    /// Set after an I/O error so that iteration ends instead of repeating it.
    failed: bool,
}

impl JsonlRows {
    fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        Ok(Self {
            path: path.into(),
            reader: BufReader::new(file),
            line: 0,
            buf: Vec::new(),
            failed: false,
        })
    }

    fn parse(&self, bytes: &[u8]) -> Result<Option<RawRow>> {
        let at = Location::line(self.path.clone(), self.line);
        let text = std::str::from_utf8(bytes).map_err(|e| Error::BadJson {
            at: at.clone(),
            msg: format!("not UTF-8: {e}"),
        })?;
        // A UTF-8 byte-order mark (some Windows editors write one) is not JSON.
        let text = if self.line == 1 {
            text.trim_start_matches('\u{feff}')
        } else {
            text
        };
        if text.trim().is_empty() {
            return Ok(None);
        }
        match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(fields)) => Ok(Some(RawRow { at, fields })),
            Ok(other) => Err(Error::BadJson {
                at,
                msg: format!("found {}", describe(&other)),
            }),
            Err(e) => Err(Error::BadJson {
                at,
                msg: e.to_string(),
            }),
        }
    }
}

impl Iterator for JsonlRows {
    type Item = Result<RawRow>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if self.failed {
                return None;
            }
            self.buf.clear();
            match self.reader.read_until(b'\n', &mut self.buf) {
                Ok(0) => return None,
                Ok(_) => {}
                Err(e) => {
                    self.failed = true;
                    return Some(Err(Error::io(&self.path, e)));
                }
            }
            self.line += 1;
            let bytes = std::mem::take(&mut self.buf);
            let parsed = self.parse(&bytes);
            self.buf = bytes;
            match parsed {
                Ok(None) => continue,
                Ok(Some(row)) => return Some(Ok(row)),
                Err(e) => return Some(Err(e)),
            }
        }
    }
}

/// Rows of a Parquet file, over all row groups, through the `parquet` crate's row API.
struct ParquetRows {
    path: Arc<Path>,
    iter: parquet::record::reader::RowIter<'static>,
    row: usize,
    failed: bool,
}

impl ParquetRows {
    fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let reader = SerializedFileReader::new(file).map_err(|e| parquet_error(path, e))?;
        let iter = parquet::record::reader::RowIter::from_file_into(
            Box::new(reader) as Box<dyn FileReader>
        );
        Ok(Self {
            path: path.into(),
            iter,
            row: 0,
            failed: false,
        })
    }
}

impl Iterator for ParquetRows {
    type Item = Result<RawRow>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        match self.iter.next()? {
            Ok(row) => {
                self.row += 1;
                Some(Ok(RawRow {
                    at: Location::row(self.path.clone(), self.row),
                    fields: row_to_json(row),
                }))
            }
            Err(e) => {
                // A page that fails to decode leaves the reader in an unknown state.
                self.failed = true;
                Some(Err(parquet_error(&self.path, e)))
            }
        }
    }
}

/// A Parquet error with a fix for the codecs this build leaves out.
fn parquet_error(path: &Path, e: parquet::errors::ParquetError) -> Error {
    let msg = e.to_string();
    let hint = if msg.contains("Disabled feature") {
        "; this build reads Parquet compressed with snappy, gzip or lz4 (zstd and brotli would \
         need C libraries or a much larger build): rewrite the file, e.g. in Python \
         `pyarrow.parquet.write_table(pyarrow.parquet.read_table(IN), OUT, compression=\"snappy\")`, \
         or export it as JSON lines"
    } else {
        "; is this a Parquet file? (pyarrow, pandas, polars and `datasets.Dataset.to_parquet` \
         write ones this crate reads)"
    };
    Error::Parquet {
        path: path.to_path_buf(),
        msg: format!("cannot read Parquet: {msg}{hint}"),
    }
}

/// A Parquet row as the JSON object the same data would be in a JSONL file.
fn row_to_json(row: Row) -> Map<String, Value> {
    row.into_columns()
        .into_iter()
        .map(|(name, field)| (name, field_to_json(&field)))
        .collect()
}

fn field_to_json(field: &Field) -> Value {
    match field {
        Field::Null => Value::Null,
        Field::Bool(b) => Value::Bool(*b),
        Field::Byte(n) => Value::from(*n),
        Field::Short(n) => Value::from(*n),
        Field::Int(n) => Value::from(*n),
        Field::Long(n) => Value::from(*n),
        Field::UByte(n) => Value::from(*n),
        Field::UShort(n) => Value::from(*n),
        Field::UInt(n) => Value::from(*n),
        Field::ULong(n) => Value::from(*n),
        Field::Float16(n) => float(n.to_f64()),
        // Through the shortest decimal form, so a float32 0.1 reads as 0.1, as in JSON.
        Field::Float(n) => float(n.to_string().parse().unwrap_or(f64::from(*n))),
        Field::Double(n) => float(*n),
        Field::Str(s) => Value::String(s.clone()),
        // Binary columns holding text (some writers use them for strings) read as strings.
        Field::Bytes(b) => match std::str::from_utf8(b.data()) {
            Ok(s) => Value::String(s.to_string()),
            Err(_) => Value::Array(b.data().iter().map(|&x| Value::from(x)).collect()),
        },
        Field::Group(row) => Value::Object(
            row.get_column_iter()
                .map(|(name, f)| (name.clone(), field_to_json(f)))
                .collect(),
        ),
        Field::ListInternal(list) => {
            Value::Array(list.elements().iter().map(field_to_json).collect())
        }
        Field::MapInternal(map) => Value::Object(
            map.entries()
                .iter()
                .map(|(k, v)| {
                    let key = match field_to_json(k) {
                        Value::String(s) => s,
                        other => other.to_string(),
                    };
                    (key, field_to_json(v))
                })
                .collect(),
        ),
        // Decimals, dates and times keep the parquet crate's text form; no record format here
        // uses them, so they only need to survive a round trip to output rows.
        other => Value::String(other.to_string()),
    }
}

fn float(x: f64) -> Value {
    serde_json::Number::from_f64(x)
        .map(Value::Number)
        .unwrap_or(Value::Null)
}

/// A short description of a JSON value for error messages: its type and an excerpt.
pub(crate) fn describe(v: &Value) -> String {
    let kind = match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    };
    let text = v.to_string();
    const MAX: usize = 40;
    if matches!(v, Value::Null) {
        kind.to_string()
    } else if text.chars().count() > MAX {
        let cut: String = text.chars().take(MAX).collect();
        format!("{kind} ({cut}...)")
    } else {
        format!("{kind} ({text})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn jsonl_lines_are_numbered_and_blank_lines_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        let mut f = File::create(&path).unwrap();
        write!(
            f,
            "\u{feff}{{\"a\": 1}}\n\n{{\"b\": 2}}\r\n[1]\n{{bad\n{{\"c\": 3}}"
        )
        .unwrap();
        drop(f);
        let rows: Vec<_> = rows(&path).unwrap().collect();
        assert_eq!(rows.len(), 5);
        let r0 = rows[0].as_ref().unwrap();
        assert_eq!((r0.at.line, r0.fields["a"].as_i64()), (1, Some(1)));
        assert_eq!(rows[1].as_ref().unwrap().at.line, 3);
        let e = rows[2].as_ref().unwrap_err().to_string();
        assert!(
            e.contains("a.jsonl:4: not a JSON object (found a list ([1]))"),
            "{e}"
        );
        assert!(rows[3]
            .as_ref()
            .unwrap_err()
            .to_string()
            .contains("a.jsonl:5:"));
        assert_eq!(rows[4].as_ref().unwrap().at.line, 6);
    }

    #[test]
    fn extensions_choose_the_format() {
        assert_eq!(
            FileFormat::from_path(Path::new("x/train.JSONL")).unwrap(),
            FileFormat::Jsonl
        );
        assert_eq!(
            FileFormat::from_path(Path::new("t.parquet")).unwrap(),
            FileFormat::Parquet
        );
        let e = FileFormat::from_path(Path::new("t.csv")).unwrap_err();
        assert!(e.to_string().starts_with("t.csv: unknown data file type"));
        // A device or pipe (here /dev/null, as /dev/stdin would be) reads as JSON lines; a
        // regular file without an extension still needs one.
        assert_eq!(
            FileFormat::from_path(Path::new("/dev/null")).unwrap(),
            FileFormat::Jsonl
        );
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("rows");
        std::fs::write(&plain, "{}\n").unwrap();
        assert!(FileFormat::from_path(&plain).is_err());
    }
}
