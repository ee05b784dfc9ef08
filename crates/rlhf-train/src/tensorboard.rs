//! A TensorBoard event-file writer and a scalar reader, with no TensorFlow or protobuf crate.
//!
//! The file is what `torch.utils.tensorboard.SummaryWriter` writes: TFRecord framing
//! (`u64` LE length, masked CRC32C of the length, the bytes, masked CRC32C of the bytes) around
//! `tensorflow.Event` protobufs. The first event carries `file_version: "brain.Event:2"`; each
//! later one a `step`, a `wall_time` and a `Summary` of `simple_value` scalars (or one text
//! value), which TensorBoard's scalar and text dashboards read.
//!
//! Every write call ends with the record handed to the OS, so a killed run loses nothing that a
//! call returned `Ok` for.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// `file_version` of the first event; TensorBoard checks it to pick the event format.
const FILE_VERSION: &str = "brain.Event:2";

/// Writes one TensorBoard event file in a log directory.
#[derive(Debug)]
pub struct TbWriter {
    path: PathBuf,
    file: File,
}

impl TbWriter {
    /// Creates `dir` (and parents) and a new `events.out.tfevents.{secs}.{host}.{pid}.{n}` in it,
    /// starting with the file-version event. `dir` is the run directory TensorBoard lists, e.g.
    /// `{output_dir}/runs/{timestamp}_{hostname}` as transformers does ([`default_run_dir`]).
    pub fn create(dir: impl AsRef<Path>) -> io::Result<Self> {
        // TensorBoard's own writer numbers files per process the same way, so two writers
        // created in the same second by one process get distinct names instead of clobbering.
        static NEXT_FILE: AtomicU64 = AtomicU64::new(0);
        let dir = dir.as_ref();
        fs::create_dir_all(dir).map_err(|e| with_path(e, dir, "cannot create log dir"))?;
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let name = format!(
            "events.out.tfevents.{secs:010}.{}.{}.{}",
            hostname(),
            std::process::id(),
            NEXT_FILE.fetch_add(1, Ordering::Relaxed)
        );
        let path = dir.join(name);
        // `create_new`: never append to or truncate another writer's file.
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| with_path(e, &path, "cannot create event file"))?;
        let mut writer = Self { path, file };
        let mut event = Vec::new();
        put_fixed64(&mut event, 1, wall_time().to_bits());
        put_bytes(&mut event, 3, FILE_VERSION.as_bytes());
        writer.write_record(&event)?;
        Ok(writer)
    }

    /// The event file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Logs one scalar, like `SummaryWriter.add_scalar(tag, value, step)`.
    pub fn add_scalar(&mut self, tag: &str, value: f32, step: i64) -> io::Result<()> {
        self.add_scalars(step, &[(tag, value)])
    }

    /// Logs several scalars at one step as a single event (one record, one write).
    pub fn add_scalars<S: AsRef<str>>(&mut self, step: i64, values: &[(S, f32)]) -> io::Result<()> {
        let mut summary = Vec::new();
        for (tag, value) in values {
            let mut v = Vec::new();
            put_bytes(&mut v, 1, tag.as_ref().as_bytes());
            put_fixed32(&mut v, 2, value.to_bits());
            put_bytes(&mut summary, 1, &v);
        }
        self.write_summary(step, &summary)
    }

    /// Logs text for TensorBoard's Text tab, like `SummaryWriter.add_text` (transformers logs
    /// the training arguments as text `args`). Markdown is rendered by TensorBoard.
    pub fn add_text(&mut self, tag: &str, text: &str, step: i64) -> io::Result<()> {
        // The text plugin reads a rank-1 DT_STRING tensor tagged with plugin_name "text";
        // its plugin content (TextPluginData{version: 0}) serialises to nothing.
        let mut plugin_data = Vec::new();
        put_bytes(&mut plugin_data, 1, b"text");
        let mut metadata = Vec::new();
        put_bytes(&mut metadata, 1, &plugin_data);
        let mut dim = Vec::new();
        put_varint_field(&mut dim, 1, 1);
        let mut shape = Vec::new();
        put_bytes(&mut shape, 2, &dim);
        let mut tensor = Vec::new();
        put_varint_field(&mut tensor, 1, DT_STRING);
        put_bytes(&mut tensor, 2, &shape);
        put_bytes(&mut tensor, 8, text.as_bytes());
        let mut v = Vec::new();
        put_bytes(&mut v, 1, tag.as_bytes());
        put_bytes(&mut v, 8, &tensor);
        put_bytes(&mut v, 9, &metadata);
        let mut summary = Vec::new();
        put_bytes(&mut summary, 1, &v);
        self.write_summary(step, &summary)
    }

    /// Flushes to the OS. Each write call already does this; it is here for symmetry with
    /// `SummaryWriter.flush()`. It does not fsync: surviving a killed process needs only the
    /// OS to hold the bytes, and an fsync per log step is slow on network file systems.
    pub fn flush(&mut self) -> io::Result<()> {
        self.file
            .flush()
            .map_err(|e| with_path(e, &self.path, "cannot flush"))
    }

    fn write_summary(&mut self, step: i64, summary: &[u8]) -> io::Result<()> {
        let mut event = Vec::with_capacity(summary.len() + 24);
        put_fixed64(&mut event, 1, wall_time().to_bits());
        // int64 fields are varints of the two's complement, so a negative step is 10 bytes.
        put_varint_field(&mut event, 2, step as u64);
        put_bytes(&mut event, 5, summary);
        self.write_record(&event)
    }

    fn write_record(&mut self, data: &[u8]) -> io::Result<()> {
        // One `write_all` of the whole record: a kill can at worst leave a truncated last
        // record, which TensorBoard (and `read_scalars`) skip, never a torn one mid-file.
        let len = (data.len() as u64).to_le_bytes();
        let mut record = Vec::with_capacity(data.len() + 16);
        record.extend_from_slice(&len);
        record.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
        record.extend_from_slice(data);
        record.extend_from_slice(&masked_crc32c(data).to_le_bytes());
        self.file
            .write_all(&record)
            .and_then(|()| self.file.flush())
            .map_err(|e| with_path(e, &self.path, "cannot write event"))
    }
}

/// Reads every `simple_value` scalar of an event file as `(step, tag, value)`, in file order.
///
/// Both CRCs of every record are checked; a mismatch or a malformed event is an
/// [`io::ErrorKind::InvalidData`] error naming the file and the record's byte offset. A
/// truncated last record (a run killed mid-write, or one still writing) is skipped with a
/// warning, as TensorBoard does. Scalars stored as tensors (TF2 `tf.summary.scalar`) are not
/// read: this reads what [`TbWriter`] and `torch.utils.tensorboard` write.
pub fn read_scalars(path: impl AsRef<Path>) -> io::Result<Vec<(i64, String, f32)>> {
    Ok(read_values(path.as_ref())?
        .into_iter()
        .filter_map(|(step, tag, v)| match v {
            Value::Scalar(x) => Some((step, tag, x)),
            Value::Text(_) => None,
        })
        .collect())
}

/// Reads every text value ([`TbWriter::add_text`]) of an event file as `(step, tag, text)`,
/// with the same checks as [`read_scalars`].
pub fn read_texts(path: impl AsRef<Path>) -> io::Result<Vec<(i64, String, String)>> {
    Ok(read_values(path.as_ref())?
        .into_iter()
        .filter_map(|(step, tag, v)| match v {
            Value::Text(t) => Some((step, tag, t)),
            Value::Scalar(_) => None,
        })
        .collect())
}

/// `{output_dir}/runs/{Mon}{DD}_{HH}-{MM}-{SS}_{hostname}`, transformers' default
/// `logging_dir` layout, so `tensorboard --logdir {output_dir}/runs` lists one run per launch.
/// The time is UTC (transformers uses local time; the standard library has no time zones).
pub fn default_run_dir(output_dir: impl AsRef<Path>) -> PathBuf {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    output_dir
        .as_ref()
        .join("runs")
        .join(format!("{}_{}", utc_stamp(secs), hostname()))
}

/// The machine's host name for file names (as `socket.gethostname()`), or `localhost`.
pub fn hostname() -> String {
    let from_file = |p: &str| fs::read_to_string(p).ok();
    let name = from_file("/proc/sys/kernel/hostname")
        .or_else(|| from_file("/etc/hostname"))
        .or_else(|| std::env::var("HOSTNAME").ok())
        .or_else(|| std::env::var("COMPUTERNAME").ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    // A separator in a file name would put the event file in another directory.
    let name: String = name
        .chars()
        .map(|c| if c == '/' || c == '\\' { '_' } else { c })
        .collect();
    if name.is_empty() {
        "localhost".into()
    } else {
        name
    }
}

/// `Jan05_14-03-22` for a unix time, transformers' `%b%d_%H-%M-%S` run-dir stamp.
fn utc_stamp(secs: u64) -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil-from-days (H. Hinnant): day count since 1970-01-01 to month and day.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    format!(
        "{}{:02}_{:02}-{:02}-{:02}",
        MONTHS[(month - 1) as usize],
        day,
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

fn wall_time() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn with_path(e: io::Error, path: &Path, what: &str) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}

// ---------------------------------------------------------------------------------------------
// CRC32C (Castagnoli), as TFRecord uses it.

/// Byte-at-a-time table for the reflected Castagnoli polynomial, built at compile time.
const CRC32C_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0x82F6_3B78
            } else {
                c >> 1
            };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
};

fn crc32c(data: &[u8]) -> u32 {
    !data.iter().fold(!0u32, |crc, &b| {
        CRC32C_TABLE[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8)
    })
}

/// TFRecord's masking, so that a CRC stored inside CRC'd data does not make the outer CRC
/// degenerate.
fn masked_crc32c(data: &[u8]) -> u32 {
    let crc = crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

// ---------------------------------------------------------------------------------------------
// Protobuf wire format, just the field kinds `tensorflow.Event` needs.

const WIRE_VARINT: u32 = 0;
const WIRE_FIXED64: u32 = 1;
const WIRE_LEN: u32 = 2;
const WIRE_FIXED32: u32 = 5;
/// `tensorflow.DataType.DT_STRING`.
const DT_STRING: u64 = 7;

fn put_varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

fn put_key(buf: &mut Vec<u8>, field: u32, wire: u32) {
    put_varint(buf, u64::from(field << 3 | wire));
}

fn put_varint_field(buf: &mut Vec<u8>, field: u32, v: u64) {
    put_key(buf, field, WIRE_VARINT);
    put_varint(buf, v);
}

fn put_fixed64(buf: &mut Vec<u8>, field: u32, v: u64) {
    put_key(buf, field, WIRE_FIXED64);
    buf.extend_from_slice(&v.to_le_bytes());
}

fn put_fixed32(buf: &mut Vec<u8>, field: u32, v: u32) {
    put_key(buf, field, WIRE_FIXED32);
    buf.extend_from_slice(&v.to_le_bytes());
}

fn put_bytes(buf: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    put_key(buf, field, WIRE_LEN);
    put_varint(buf, bytes.len() as u64);
    buf.extend_from_slice(bytes);
}

/// One decoded protobuf field value.
#[derive(Debug, Clone, Copy)]
enum Wire<'a> {
    Varint(u64),
    // Only tests look at the value (wall_time); the scalar reader skips it.
    Fixed64(#[cfg_attr(not(test), allow(dead_code))] u64),
    Len(&'a [u8]),
    Fixed32(u32),
}

fn get_varint(buf: &[u8], pos: &mut usize) -> Result<u64, String> {
    let mut v = 0u64;
    for shift in (0..70).step_by(7) {
        let b = *buf.get(*pos).ok_or("truncated varint")?;
        *pos += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err("varint longer than 10 bytes".into())
}

/// Splits a message into `(field number, value)` pairs; unknown fields are kept so callers can
/// skip them, as protobuf readers must.
fn fields(buf: &[u8]) -> Result<Vec<(u32, Wire<'_>)>, String> {
    fn take<'a>(buf: &'a [u8], pos: &mut usize, n: usize) -> Result<&'a [u8], String> {
        let end = pos
            .checked_add(n)
            .filter(|&e| e <= buf.len())
            .ok_or("field runs past the end of its message")?;
        let s = &buf[*pos..end];
        *pos = end;
        Ok(s)
    }
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < buf.len() {
        let key = get_varint(buf, &mut pos)?;
        let field = u32::try_from(key >> 3).map_err(|_| "field number too large")?;
        let value = match (key & 7) as u32 {
            WIRE_VARINT => Wire::Varint(get_varint(buf, &mut pos)?),
            WIRE_FIXED64 => Wire::Fixed64(u64::from_le_bytes(
                take(buf, &mut pos, 8)?.try_into().expect("8 bytes"),
            )),
            WIRE_LEN => {
                let n = get_varint(buf, &mut pos)?;
                let n = usize::try_from(n).map_err(|_| "length too large")?;
                Wire::Len(take(buf, &mut pos, n)?)
            }
            WIRE_FIXED32 => Wire::Fixed32(u32::from_le_bytes(
                take(buf, &mut pos, 4)?.try_into().expect("4 bytes"),
            )),
            w => return Err(format!("unsupported wire type {w} for field {field}")),
        };
        out.push((field, value));
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Reading.

/// A summary value this module understands.
#[derive(Debug, Clone, PartialEq)]
enum Value {
    Scalar(f32),
    Text(String),
}

fn invalid(path: &Path, offset: usize, msg: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{}: record at byte offset {offset}: {msg}", path.display()),
    )
}

/// Splits TFRecord framing into `(record offset, data)`, checking both CRCs. `path` is only for
/// messages.
fn records<'a>(bytes: &'a [u8], path: &Path) -> io::Result<Vec<(usize, &'a [u8])>> {
    let le32 = |b: &[u8]| u32::from_le_bytes(b.try_into().expect("4 bytes"));
    let mut out = Vec::new();
    let mut off = 0;
    while off < bytes.len() {
        let rest = &bytes[off..];
        if rest.len() < 12 {
            tracing::warn!(path = %path.display(), offset = off, "truncated last record header; skipped");
            break;
        }
        let (len_bytes, stored) = (&rest[..8], le32(&rest[8..12]));
        let computed = masked_crc32c(len_bytes);
        if stored != computed {
            return Err(invalid(
                path,
                off,
                format_args!("length CRC mismatch (stored {stored:#010x}, computed {computed:#010x}); the file is corrupt"),
            ));
        }
        // Checked only after its CRC, so a huge length here is a real (truncated) record.
        let len = u64::from_le_bytes(len_bytes.try_into().expect("8 bytes"));
        let end = usize::try_from(len)
            .ok()
            .and_then(|n| n.checked_add(16))
            .filter(|&end| end <= rest.len());
        let Some(end) = end else {
            tracing::warn!(path = %path.display(), offset = off, len, "truncated last record; skipped");
            break;
        };
        let data = &rest[12..end - 4];
        let (stored, computed) = (le32(&rest[end - 4..end]), masked_crc32c(data));
        if stored != computed {
            return Err(invalid(
                path,
                off,
                format_args!("data CRC mismatch (stored {stored:#010x}, computed {computed:#010x}); the file is corrupt"),
            ));
        }
        out.push((off, data));
        off += end;
    }
    Ok(out)
}

/// Every summary value of the file as `(step, tag, value)`; values of other kinds (images,
/// histograms, tensors of other plugins) are skipped.
fn read_values(path: &Path) -> io::Result<Vec<(i64, String, Value)>> {
    let bytes = fs::read(path).map_err(|e| with_path(e, path, "cannot read event file"))?;
    parse_values(&bytes, path)
}

fn parse_values(bytes: &[u8], path: &Path) -> io::Result<Vec<(i64, String, Value)>> {
    let mut out = Vec::new();
    for (off, data) in records(bytes, path)? {
        parse_event(data, &mut out)
            .map_err(|msg| invalid(path, off, format_args!("malformed Event: {msg}")))?;
    }
    Ok(out)
}

fn parse_event(data: &[u8], out: &mut Vec<(i64, String, Value)>) -> Result<(), String> {
    let mut step = 0i64;
    let mut summaries = Vec::new();
    for (field, v) in fields(data)? {
        match (field, v) {
            (2, Wire::Varint(s)) => step = s as i64,
            (5, Wire::Len(s)) => summaries.push(s),
            _ => {}
        }
    }
    for summary in summaries {
        for (field, v) in fields(summary)? {
            if let (1, Wire::Len(value)) = (field, v) {
                if let Some((tag, value)) = parse_summary_value(value)? {
                    out.push((step, tag, value));
                }
            }
        }
    }
    Ok(())
}

fn parse_summary_value(buf: &[u8]) -> Result<Option<(String, Value)>, String> {
    let mut tag = None;
    let mut scalar = None;
    let mut tensor = None;
    let mut is_text = false;
    for (field, v) in fields(buf)? {
        match (field, v) {
            (1, Wire::Len(t)) => tag = Some(utf8(t, "tag")?),
            (2, Wire::Fixed32(x)) => scalar = Some(f32::from_bits(x)),
            (8, Wire::Len(t)) => tensor = Some(t),
            (9, Wire::Len(m)) => is_text = plugin_name(m)?.as_deref() == Some("text"),
            _ => {}
        }
    }
    let tag = tag.unwrap_or_default();
    if let Some(x) = scalar {
        return Ok(Some((tag, Value::Scalar(x))));
    }
    if let (true, Some(t)) = (is_text, tensor) {
        // Several string_val entries (a text table) are joined by lines; ours have one.
        let mut parts = Vec::new();
        for (field, v) in fields(t)? {
            if let (8, Wire::Len(s)) = (field, v) {
                parts.push(utf8(s, "text")?);
            }
        }
        return Ok(Some((tag, Value::Text(parts.join("\n")))));
    }
    Ok(None)
}

fn plugin_name(metadata: &[u8]) -> Result<Option<String>, String> {
    for (field, v) in fields(metadata)? {
        if let (1, Wire::Len(pd)) = (field, v) {
            for (field, v) in fields(pd)? {
                if let (1, Wire::Len(name)) = (field, v) {
                    return utf8(name, "plugin_name").map(Some);
                }
            }
        }
    }
    Ok(None)
}

fn utf8(b: &[u8], what: &str) -> Result<String, String> {
    String::from_utf8(b.to_vec()).map_err(|_| format!("{what} is not UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn only_event_file(dir: &Path) -> PathBuf {
        let files: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(files.len(), 1, "{files:?}");
        files.into_iter().next().unwrap()
    }

    #[test]
    fn crc32c_matches_known_vectors() {
        // RFC 3720 (iSCSI) check value and its all-zeros vector.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(b""), 0);
    }

    /// The writer and reader share the mask, so round trips cannot catch a wrong one; these
    /// values come from TensorBoard's own
    /// `tensorboard.compat.tensorflow_stub.pywrap_tensorflow.masked_crc32c`.
    #[test]
    fn masked_crc_matches_tensorboard() {
        assert_eq!(masked_crc32c(b"123456789"), 0xc78a_b0e5);
        assert_eq!(masked_crc32c(&24u64.to_le_bytes()), 0x224b_7fa3);
        assert_eq!(masked_crc32c(b""), 0xa282_ead8);
    }

    #[test]
    fn varints_round_trip_including_negative_steps() {
        for v in [
            0u64,
            1,
            127,
            128,
            300,
            u32::MAX as u64,
            (-1i64) as u64,
            u64::MAX,
        ] {
            let mut buf = Vec::new();
            put_varint(&mut buf, v);
            let mut pos = 0;
            assert_eq!(get_varint(&buf, &mut pos).unwrap(), v);
            assert_eq!(pos, buf.len());
        }
    }

    #[test]
    fn utc_stamp_formats_like_transformers() {
        assert_eq!(utc_stamp(0), "Jan01_00-00-00");
        // 2024-02-29T13:45:07Z, a leap day.
        assert_eq!(utc_stamp(1_709_214_307), "Feb29_13-45-07");
        // 2023-12-31T23:59:59Z.
        assert_eq!(utc_stamp(1_704_067_199), "Dec31_23-59-59");
    }

    #[test]
    fn default_run_dir_is_under_runs() {
        let d = default_run_dir("/out");
        assert_eq!(d.parent().unwrap(), Path::new("/out/runs"));
        let name = d.file_name().unwrap().to_str().unwrap();
        assert!(name.ends_with(&format!("_{}", hostname())), "{name}");
    }

    #[test]
    fn file_name_and_first_record() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("runs").join("x");
        let w = TbWriter::create(&dir).unwrap();
        let name = w.path().file_name().unwrap().to_str().unwrap().to_string();
        let parts: Vec<_> = name.split('.').collect();
        assert_eq!(&parts[..3], ["events", "out", "tfevents"], "{name}");
        assert_eq!(parts[3].len(), 10, "{name}");
        assert!(name.ends_with(&format!(
            ".{}.{}",
            std::process::id(),
            parts.last().unwrap()
        )));
        drop(w);
        let path = only_event_file(&dir);
        let bytes = fs::read(&path).unwrap();
        let recs = records(&bytes, &path).unwrap();
        assert_eq!(recs.len(), 1);
        let f = fields(recs[0].1).unwrap();
        assert!(matches!(f[0], (1, Wire::Fixed64(t)) if f64::from_bits(t) > 1.6e9));
        assert!(matches!(f[1], (3, Wire::Len(v)) if v == b"brain.Event:2"));
        assert_eq!(read_scalars(&path).unwrap(), vec![]);
    }

    #[test]
    fn two_writers_in_one_dir_get_two_files() {
        let tmp = tempfile::tempdir().unwrap();
        let a = TbWriter::create(tmp.path()).unwrap();
        let b = TbWriter::create(tmp.path()).unwrap();
        assert_ne!(a.path(), b.path());
    }

    #[test]
    fn scalars_round_trip() {
        let tmp = tempfile::tempdir().unwrap();
        let mut w = TbWriter::create(tmp.path()).unwrap();
        w.add_scalar("train/loss", 2.5, 1).unwrap();
        w.add_scalar("train/loss", 1.25, 2).unwrap();
        w.add_scalars(
            10,
            &[
                ("eval/loss".to_string(), 0.75f32),
                ("eval/accuracy".to_string(), 0.5),
            ],
        )
        .unwrap();
        w.add_scalar("odd/neg_step", f32::NAN, -3).unwrap();
        w.add_scalar("big", 1e30, i64::MAX).unwrap();
        // No drop before reading: each call must already have reached the file.
        let got = read_scalars(w.path()).unwrap();
        assert_eq!(got.len(), 6, "{got:?}");
        assert_eq!(got[0], (1, "train/loss".into(), 2.5));
        assert_eq!(got[1], (2, "train/loss".into(), 1.25));
        assert_eq!(got[2], (10, "eval/loss".into(), 0.75));
        assert_eq!(got[3], (10, "eval/accuracy".into(), 0.5));
        assert_eq!((got[4].0, got[4].1.as_str()), (-3, "odd/neg_step"));
        assert!(got[4].2.is_nan());
        assert_eq!(got[5], (i64::MAX, "big".into(), 1e30));
        // add_scalars is one event: the version record, then 5 (not 6) scalar records.
        let bytes = fs::read(w.path()).unwrap();
        assert_eq!(records(&bytes, w.path()).unwrap().len(), 6);
    }

    /// Writes the file that was checked once with TensorBoard's own reader (2.21.0):
    ///
    /// ```text
    /// RLHF_TB_EXPORT_DIR=/tmp/tbcheck cargo test -p rlhf-train tensorboard_reads_this
    /// python - <<'PY'
    /// from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    /// acc = EventAccumulator("/tmp/tbcheck", size_guidance={"scalars": 0, "tensors": 0})
    /// acc.Reload()
    /// print(acc.Tags()["scalars"], acc.Tags()["tensors"])
    /// for tag in acc.Tags()["scalars"]:
    ///     print(tag, [(e.step, e.value) for e in acc.Scalars(tag)])
    /// for tag in acc.Tags()["tensors"]:
    ///     print(tag, [(e.step, e.tensor_proto.string_val) for e in acc.Tensors(tag)])
    /// PY
    /// ```
    ///
    /// which printed the scalars and text below, step for step; a flipped byte made it raise
    /// `DataLossError` (see the report that came with this module).
    #[test]
    fn tensorboard_reads_this() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = std::env::var_os("RLHF_TB_EXPORT_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| tmp.path().to_path_buf());
        let mut w = TbWriter::create(&dir).unwrap();
        w.add_text("args", "learning_rate: 1e-5 **bold**", 0)
            .unwrap();
        for step in 1..=3 {
            let loss = 2.0 / step as f32;
            w.add_scalars(
                step,
                &[
                    ("train/loss", loss),
                    ("train/learning_rate", 1e-5 * step as f32),
                ],
            )
            .unwrap();
        }
        w.add_scalar("eval/accuracy", 0.625, 3).unwrap();
        let got = read_scalars(w.path()).unwrap();
        assert_eq!(got.len(), 7);
        assert_eq!(got[4], (3, "train/loss".into(), 2.0 / 3.0));
        assert_eq!(got[6], (3, "eval/accuracy".into(), 0.625));
    }

    #[test]
    fn text_round_trips_and_is_not_a_scalar() {
        let tmp = tempfile::tempdir().unwrap();
        let mut w = TbWriter::create(tmp.path()).unwrap();
        w.add_text("args", "{\"lr\": 1e-5}\n**bold** ünïcode", 0)
            .unwrap();
        w.add_scalar("train/loss", 3.0, 1).unwrap();
        assert_eq!(
            read_texts(w.path()).unwrap(),
            vec![(0, "args".into(), "{\"lr\": 1e-5}\n**bold** ünïcode".into())]
        );
        assert_eq!(
            read_scalars(w.path()).unwrap(),
            vec![(1, "train/loss".into(), 3.0)]
        );
    }

    /// Flipping any single byte of the file must be caught by one of the two CRCs, and the
    /// error must name the file and the offset of the record that holds the byte.
    #[test]
    fn every_corrupted_byte_is_reported_with_file_and_offset() {
        let tmp = tempfile::tempdir().unwrap();
        let mut w = TbWriter::create(tmp.path()).unwrap();
        w.add_scalar("train/loss", 1.0, 1).unwrap();
        w.add_scalars(2, &[("a", 1.0), ("b", 2.0)]).unwrap();
        let path = w.path().to_path_buf();
        let good = fs::read(&path).unwrap();
        let starts: Vec<usize> = records(&good, &path).unwrap().iter().map(|r| r.0).collect();
        assert_eq!(starts.len(), 3);
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x01;
            let rec = *starts.iter().rev().find(|&&s| s <= i).unwrap();
            let err = parse_values(&bad, &path).expect_err(&format!("flip at {i} not detected"));
            assert_eq!(err.kind(), io::ErrorKind::InvalidData);
            let msg = err.to_string();
            assert!(msg.contains(&path.display().to_string()), "{msg}");
            assert!(
                msg.contains(&format!("byte offset {rec}:")),
                "flip at {i}: {msg}"
            );
            assert!(msg.contains("CRC mismatch"), "{msg}");
        }
        // And through the public API, on disk.
        let mut bad = good.clone();
        let last = bad.len() - 6;
        bad[last] ^= 0xff;
        fs::write(&path, &bad).unwrap();
        let msg = read_scalars(&path).unwrap_err().to_string();
        assert!(
            msg.contains(&format!(
                "{}: record at byte offset {}: data CRC mismatch",
                path.display(),
                starts[2]
            )),
            "{msg}"
        );
    }

    #[test]
    fn truncated_last_record_is_skipped() {
        let tmp = tempfile::tempdir().unwrap();
        let mut w = TbWriter::create(tmp.path()).unwrap();
        w.add_scalar("x", 1.0, 1).unwrap();
        w.add_scalar("x", 2.0, 2).unwrap();
        let path = w.path().to_path_buf();
        let good = fs::read(&path).unwrap();
        let starts: Vec<usize> = records(&good, &path).unwrap().iter().map(|r| r.0).collect();
        // Any cut inside the last record drops exactly that record.
        for cut in starts[2] + 1..good.len() {
            let got = parse_values(&good[..cut], &path).unwrap();
            assert_eq!(
                got,
                vec![(1, "x".into(), Value::Scalar(1.0))],
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn malformed_event_inside_valid_framing_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let mut w = TbWriter::create(tmp.path()).unwrap();
        // A length-delimited field claiming more bytes than the record holds.
        w.write_record(&[0x2a, 0x05, 0x01]).unwrap();
        let msg = read_scalars(w.path()).unwrap_err().to_string();
        assert!(msg.contains("malformed Event"), "{msg}");
    }

    #[test]
    fn missing_file_error_names_the_path() {
        let msg = read_scalars("/nonexistent/events.out.tfevents.x")
            .unwrap_err()
            .to_string();
        assert!(msg.contains("/nonexistent/events.out.tfevents.x"), "{msg}");
    }
}
