//! Parsing rows into records ([`Record`]) and loading whole files ([`load`]).
//!
//! Unknown extra fields are ignored (datasets carry ids, sources, ...). Null counts as absent,
//! since Parquet files written from mixed rows fill missing columns with nulls. Every error
//! names the file, line and field and ends with what a valid row looks like. With
//! [`ReadOptions::skip_invalid`] bad rows are counted in a [`ReadReport`] instead of failing.

use std::fmt;
use std::path::{Path, PathBuf};

use rlhf_model::tokenizer::ChatMessage;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::read::{describe, rows, RawRow};
use crate::records::{
    Comparison, Content, Degree, Demonstration, DemonstrationBody, PairSafety, Preference,
    PromptRecord, Ranking, Safety, UnpairedPreference,
};

const DEMONSTRATION_HINT: &str = "demonstration rows look like {\"prompt\", \"completion\"}, \
    {\"messages\": [{\"role\", \"content\"}, ...]} or {\"text\"}";
const PREFERENCE_HINT: &str = "preference rows look like {\"prompt\", \"chosen\", \"rejected\"} \
    (optional \"margin\" or \"degree\", and \"safety\"), {\"chosen\", \"rejected\"} with the prompt \
    inside both, or {\"prompt\", \"responses\": [...], \"ranking\": [indices, best first]}";
const UNPAIRED_HINT: &str = "unpaired preference rows look like {\"prompt\", \"completion\", \
    \"label\": true} (true: a desirable completion, false: an undesirable one), prompt and \
    completion both strings or both message lists";
const PROMPT_HINT: &str =
    "prompt rows look like {\"prompt\"} or {\"messages\": [...]}, with optional \"tags\": [...]";
const MESSAGES_HINT: &str = "messages look like [{\"role\": \"user\", \"content\": \"...\"}, \
    {\"role\": \"assistant\", \"content\": \"...\"}]";
/// How many skip reasons a [`ReadReport`] keeps.
pub const MAX_REASONS: usize = 5;

/// A record type that can be parsed from a row; see [`load`].
pub trait Record: Sized {
    /// Name of the kind in messages (`"demonstration"`, ...).
    const KIND: &'static str;
    /// Parses and validates one row.
    fn from_row(row: RawRow) -> Result<Self>;
}

/// How [`load`] treats invalid rows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadOptions {
    /// Count and report invalid rows instead of failing on the first (`--skip-invalid`).
    pub skip_invalid: bool,
}

/// What reading a file found: rows read, rows skipped, and why the first few were.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadReport {
    /// The file.
    pub path: PathBuf,
    /// Rows (non-blank lines) seen.
    pub rows: usize,
    /// Rows skipped as invalid (only with `skip_invalid`).
    pub skipped: usize,
    /// The first [`MAX_REASONS`] skip reasons, as full error messages.
    pub reasons: Vec<String>,
}

impl ReadReport {
    /// Counts a skipped row, keeping its reason if fewer than [`MAX_REASONS`] are kept.
    pub fn skip(&mut self, e: &Error) {
        self.skipped += 1;
        if self.reasons.len() < MAX_REASONS {
            self.reasons.push(e.to_string());
        }
    }
}

impl fmt::Display for ReadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} rows, {} used",
            self.path.display(),
            self.rows,
            self.rows - self.skipped
        )?;
        if self.skipped > 0 {
            write!(f, ", {} skipped as invalid; first reasons:", self.skipped)?;
            for r in &self.reasons {
                write!(f, "\n  {r}")?;
            }
        }
        Ok(())
    }
}

/// Records read from a file, with the report of what was skipped.
#[derive(Debug, Clone)]
pub struct Loaded<T> {
    /// The valid records, in file order.
    pub records: Vec<T>,
    /// Rows read and skipped.
    pub report: ReadReport,
}

/// Reads and validates every row of a JSONL or Parquet file as `T`.
///
/// Without `skip_invalid` the first bad row fails with its file:line message; with it, bad
/// rows (not I/O or Parquet decoding failures) are counted in the report. A file with no
/// valid row is an error either way.
pub fn load<T: Record>(path: &Path, opts: &ReadOptions) -> Result<Loaded<T>> {
    from_rows(path, rows(path)?, opts)
}

/// [`load`] over rows from elsewhere (`path` names them in the report).
pub fn from_rows<T: Record>(
    path: &Path,
    rows: impl IntoIterator<Item = Result<RawRow>>,
    opts: &ReadOptions,
) -> Result<Loaded<T>> {
    let mut report = ReadReport {
        path: path.to_path_buf(),
        ..Default::default()
    };
    let mut records = Vec::new();
    for row in rows {
        let parsed = match row {
            Ok(row) => {
                report.rows += 1;
                T::from_row(row)
            }
            Err(e) if e.is_row_error() => {
                report.rows += 1;
                Err(e)
            }
            Err(e) => return Err(e),
        };
        match parsed {
            Ok(r) => records.push(r),
            Err(e) if opts.skip_invalid && e.is_row_error() => report.skip(&e),
            Err(e) => return Err(e),
        }
    }
    if records.is_empty() {
        let detail = if report.rows == 0 {
            format!("; the file is empty, expected {} rows", T::KIND)
        } else {
            format!(
                "; all {} rows were invalid, the first because: {}",
                report.rows,
                report.reasons.first().map(String::as_str).unwrap_or("?")
            )
        };
        return Err(Error::Empty {
            path: path.to_path_buf(),
            detail,
        });
    }
    if report.skipped > 0 {
        tracing::warn!("{report}");
    }
    Ok(Loaded { records, report })
}

/// Field access for one row, producing this crate's file:line:field errors.
struct Fields<'a> {
    row: &'a RawRow,
    hint: &'static str,
}

impl<'a> Fields<'a> {
    /// The field, with null treated as absent.
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.row.fields.get(key).filter(|v| !v.is_null())
    }

    fn has(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    fn required(&self, key: &str) -> Result<&'a Value> {
        self.get(key).ok_or_else(|| Error::MissingField {
            at: self.row.at.clone(),
            field: key.to_string(),
            hint: self.hint,
        })
    }

    fn wrong(&self, field: &str, expected: &'static str, found: &Value) -> Error {
        Error::WrongType {
            at: self.row.at.clone(),
            field: field.to_string(),
            expected,
            found: describe(found),
            hint: self.hint,
        }
    }

    fn bad(&self, field: &str, msg: impl Into<String>) -> Error {
        Error::BadValue {
            at: self.row.at.clone(),
            field: field.to_string(),
            msg: msg.into(),
        }
    }

    fn string(&self, key: &str) -> Result<String> {
        match self.required(key)? {
            Value::String(s) => Ok(s.clone()),
            other => Err(self.wrong(key, "a string", other)),
        }
    }

    /// A string or a list of messages.
    fn content(&self, key: &str) -> Result<Content> {
        self.content_value(key, self.required(key)?)
    }

    fn content_value(&self, field: &str, v: &Value) -> Result<Content> {
        match v {
            Value::String(s) => Ok(Content::Text(s.clone())),
            Value::Array(_) => Ok(Content::Messages(self.messages_value(field, v)?)),
            other => Err(self.wrong(field, "a string or a list of messages", other)),
        }
    }

    fn messages(&self, key: &str) -> Result<Vec<ChatMessage>> {
        self.messages_value(key, self.required(key)?)
    }

    fn messages_value(&self, field: &str, v: &Value) -> Result<Vec<ChatMessage>> {
        let Value::Array(items) = v else {
            return Err(self.wrong(field, "a list of messages", v));
        };
        if items.is_empty() {
            return Err(self.bad(field, format!("is an empty list; {MESSAGES_HINT}")));
        }
        items
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let path = format!("{field}[{i}]");
                let Value::Object(m) = m else {
                    return Err(self.wrong(&path, "a message object", m));
                };
                let text = |key: &str| -> Result<String> {
                    let path = format!("{path}.{key}");
                    match m.get(key) {
                        Some(Value::String(s)) => Ok(s.clone()),
                        None | Some(Value::Null) => Err(Error::MissingField {
                            at: self.row.at.clone(),
                            field: path,
                            hint: MESSAGES_HINT,
                        }),
                        // Multimodal content lists (`[{"type": "text", ...}]`) are not supported.
                        Some(other) => Err(Error::WrongType {
                            at: self.row.at.clone(),
                            field: path,
                            expected: "a string",
                            found: describe(other),
                            hint: MESSAGES_HINT,
                        }),
                    }
                };
                Ok(ChatMessage::new(text("role")?, text("content")?))
            })
            .collect()
    }

    /// A finite number, if present.
    fn number(&self, key: &str) -> Result<Option<f32>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Number(n)) => {
                let x = n.as_f64().unwrap_or(f64::NAN) as f32;
                if x.is_finite() {
                    Ok(Some(x))
                } else {
                    Err(self.bad(key, format!("must be a finite number, found {n}")))
                }
            }
            Some(other) => Err(self.wrong(key, "a number", other)),
        }
    }

    fn keys(&self) -> String {
        let keys: Vec<String> = self
            .row
            .fields
            .iter()
            .filter(|(_, v)| !v.is_null())
            .map(|(k, _)| format!("{k:?}"))
            .collect();
        format!("{{{}}}", keys.join(", "))
    }

    fn unknown(&self, kind: &'static str, hint: impl Into<String>) -> Error {
        Error::UnknownFormat {
            at: self.row.at.clone(),
            kind,
            found: self.keys(),
            hint: hint.into(),
        }
    }

    /// Fails unless `content` has the same kind (text or messages) as `like`.
    fn same_kind(&self, field: &str, content: &Content, like: &Content) -> Result<()> {
        if content.is_conversational() == like.is_conversational() {
            return Ok(());
        }
        let (expected, found) = if like.is_conversational() {
            (
                "a list of messages like the row's other text fields",
                "a string",
            )
        } else {
            (
                "a string like the row's other text fields",
                "a list of messages",
            )
        };
        Err(Error::WrongType {
            at: self.row.at.clone(),
            field: field.to_string(),
            expected,
            found: found.to_string(),
            hint: "all text fields of a row are either plain strings or message lists (TRL's \
                   conversational format), not a mix",
        })
    }
}

impl Record for Demonstration {
    const KIND: &'static str = "demonstration";

    fn from_row(row: RawRow) -> Result<Self> {
        let f = Fields {
            row: &row,
            hint: DEMONSTRATION_HINT,
        };
        let body = if f.has("messages") {
            DemonstrationBody::Messages(f.messages("messages")?)
        } else if f.has("prompt") || f.has("completion") {
            if f.has("chosen") && !f.has("completion") {
                return Err(f.unknown(
                    Self::KIND,
                    format!(
                        "it looks like a preference row, which reward and DPO training read; \
                         {DEMONSTRATION_HINT}"
                    ),
                ));
            }
            let prompt = f.content("prompt")?;
            let completion = f.content("completion")?;
            f.same_kind("completion", &completion, &prompt)?;
            DemonstrationBody::PromptCompletion { prompt, completion }
        } else if f.has("text") {
            DemonstrationBody::Text(f.string("text")?)
        } else {
            return Err(f.unknown(Self::KIND, DEMONSTRATION_HINT));
        };
        Ok(Demonstration { at: row.at, body })
    }
}

impl Record for Comparison {
    const KIND: &'static str = "preference";

    fn from_row(row: RawRow) -> Result<Self> {
        let f = Fields {
            row: &row,
            hint: PREFERENCE_HINT,
        };
        if f.has("responses") || f.has("ranking") {
            return parse_ranking(&f).map(Comparison::Ranking);
        }
        if !f.has("chosen") && !f.has("rejected") {
            if f.has("completion") || f.has("messages") || f.has("text") {
                return Err(f.unknown(
                    Self::KIND,
                    format!(
                        "it looks like a demonstration row, which SFT reads; {PREFERENCE_HINT}"
                    ),
                ));
            }
            // With a prompt only, say which field is missing rather than "unknown format".
            if !f.has("prompt") {
                return Err(f.unknown(Self::KIND, PREFERENCE_HINT));
            }
        }
        let prompt = match f.get("prompt") {
            Some(v) => Some(f.content_value("prompt", v)?),
            None => None,
        };
        let chosen = f.content("chosen")?;
        let rejected = f.content("rejected")?;
        f.same_kind("rejected", &rejected, &chosen)?;
        if let Some(p) = &prompt {
            f.same_kind("chosen", &chosen, p)?;
        }
        let margin = f.number("margin")?;
        let degree = match f.get("degree") {
            None => None,
            Some(Value::String(s)) => Some(Degree::parse(s).ok_or_else(|| {
                f.bad(
                    "degree",
                    format!(
                        "is {s:?}; it must be one of {} (Llama 2's levels)",
                        Degree::NAMES
                    ),
                )
            })?),
            Some(other) => return Err(f.wrong("degree", "a string", other)),
        };
        let safety = match f.get("safety") {
            None => None,
            Some(v) => Some(parse_safety(&f, v)?),
        };
        Ok(Comparison::Pair(Preference {
            at: row.at.clone(),
            prompt,
            chosen,
            rejected,
            margin,
            degree,
            safety,
        }))
    }
}

impl Record for UnpairedPreference {
    const KIND: &'static str = "KTO";

    fn from_row(row: RawRow) -> Result<Self> {
        let f = Fields {
            row: &row,
            hint: UNPAIRED_HINT,
        };
        if (f.has("chosen") || f.has("rejected")) && !f.has("completion") {
            return Err(f.unknown(
                Self::KIND,
                format!(
                    "it looks like a preference pair; split each pair into two rows, \
                     {{\"prompt\", \"completion\": chosen, \"label\": true}} and \
                     {{\"prompt\", \"completion\": rejected, \"label\": false}}; {UNPAIRED_HINT}"
                ),
            ));
        }
        if !f.has("completion") && !f.has("label") {
            return Err(f.unknown(Self::KIND, UNPAIRED_HINT));
        }
        let prompt = f.content("prompt")?;
        let completion = f.content("completion")?;
        f.same_kind("completion", &completion, &prompt)?;
        let label = match f.required("label")? {
            Value::Bool(b) => *b,
            other => {
                return Err(f.wrong("label", "true (desirable) or false (undesirable)", other))
            }
        };
        Ok(UnpairedPreference {
            at: row.at,
            prompt,
            completion,
            label,
        })
    }
}

fn parse_ranking(f: &Fields<'_>) -> Result<Ranking> {
    let prompt = f.content("prompt")?;
    let responses_value = f.required("responses")?;
    let Value::Array(items) = responses_value else {
        return Err(f.wrong("responses", "a list of answers", responses_value));
    };
    let responses = items
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let field = format!("responses[{i}]");
            let c = f.content_value(&field, v)?;
            f.same_kind(&field, &c, &prompt)?;
            Ok(c)
        })
        .collect::<Result<Vec<_>>>()?;
    if responses.len() < 2 {
        return Err(f.bad(
            "responses",
            format!(
                "has {} answer(s); a ranking needs at least 2",
                responses.len()
            ),
        ));
    }
    let ranking_value = f.required("ranking")?;
    let Value::Array(idx) = ranking_value else {
        return Err(f.wrong(
            "ranking",
            "a list of indices into \"responses\"",
            ranking_value,
        ));
    };
    let k = responses.len();
    let ranking = if idx.iter().any(Value::is_array) {
        grouped_ranking(f, idx, k)?
    } else {
        flat_ranking(f, idx, k)?
    };
    Ok(Ranking {
        at: f.row.at.clone(),
        prompt,
        responses,
        ranking,
    })
}

/// The flat form `[2, 0, 1]`: a permutation of `0..k`, best first, as groups of one.
fn flat_ranking(f: &Fields<'_>, idx: &[Value], k: usize) -> Result<Vec<Vec<usize>>> {
    let mut seen = vec![false; k];
    let mut ranking = Vec::with_capacity(k);
    for (i, v) in idx.iter().enumerate() {
        let n = v.as_u64().filter(|&n| (n as usize) < k).ok_or_else(|| {
            f.bad(
                &format!("ranking[{i}]"),
                format!(
                    "is {v}; it must be an index into \"responses\" (0 to {})",
                    k - 1
                ),
            )
        })? as usize;
        if std::mem::replace(&mut seen[n], true) {
            return Err(f.bad(
                "ranking",
                format!(
                    "lists response {n} twice; ties are not supported in a flat ranking, give \
                     each answer once (or write tied answers as one group: [[1], [0, 2]])"
                ),
            ));
        }
        ranking.push(vec![n]);
    }
    if ranking.len() != k {
        return Err(f.bad(
            "ranking",
            format!(
                "ranks {} of the {k} responses; it must list every index 0..{k} once, best first",
                ranking.len()
            ),
        ));
    }
    Ok(ranking)
}

/// The grouped form `[[1], [0, 2]]` (or mixed, `[1, [0, 2]]`): groups best first, answers in
/// one group tied; responses in no group are unranked; at least two groups.
fn grouped_ranking(f: &Fields<'_>, idx: &[Value], k: usize) -> Result<Vec<Vec<usize>>> {
    let mut seen = vec![false; k];
    let mut ranking = Vec::with_capacity(idx.len());
    let index = |field: String, v: &Value, seen: &mut Vec<bool>| -> Result<usize> {
        let n = v.as_u64().filter(|&n| (n as usize) < k).ok_or_else(|| {
            f.bad(
                &field,
                format!(
                    "is {v}; it must be an index into \"responses\" (0 to {})",
                    k - 1
                ),
            )
        })? as usize;
        if std::mem::replace(&mut seen[n], true) {
            return Err(f.bad(
                "ranking",
                format!(
                    "lists response {n} twice; give each answer once, tied answers in one \
                     group: [[1], [0, 2]]"
                ),
            ));
        }
        Ok(n)
    };
    for (i, v) in idx.iter().enumerate() {
        let group = match v {
            Value::Array(members) => {
                if members.is_empty() {
                    return Err(f.bad(
                        &format!("ranking[{i}]"),
                        "is an empty group; a group lists one or more tied indices, or is left \
                         out",
                    ));
                }
                members
                    .iter()
                    .enumerate()
                    .map(|(j, m)| index(format!("ranking[{i}][{j}]"), m, &mut seen))
                    .collect::<Result<Vec<_>>>()?
            }
            other => vec![index(format!("ranking[{i}]"), other, &mut seen)?],
        };
        ranking.push(group);
    }
    if ranking.len() < 2 {
        return Err(f.bad(
            "ranking",
            format!(
                "has {} group(s); a ranking needs at least two groups, best first (answers in \
                 one group are tied and give no pair)",
                ranking.len()
            ),
        ));
    }
    Ok(ranking)
}

fn parse_safety(f: &Fields<'_>, v: &Value) -> Result<PairSafety> {
    const EXPECTED: &str =
        "{\"chosen\": \"safe\"|\"unsafe\", \"rejected\": \"safe\"|\"unsafe\"} or [chosen, rejected]";
    let (c, r) = match v {
        Value::Object(m) => (m.get("chosen"), m.get("rejected")),
        Value::Array(a) if a.len() == 2 => (a.first(), a.get(1)),
        other => return Err(f.wrong("safety", EXPECTED, other)),
    };
    let label = |field: &str, v: Option<&Value>| -> Result<Safety> {
        match v
            .and_then(Value::as_str)
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            Some("safe") => Ok(Safety::Safe),
            Some("unsafe") => Ok(Safety::Unsafe),
            _ => Err(f.bad(
                field,
                format!(
                    "is {}; it must be \"safe\" or \"unsafe\"",
                    v.map(describe).unwrap_or_else(|| "missing".into())
                ),
            )),
        }
    };
    Ok(PairSafety {
        chosen: label("safety.chosen", c)?,
        rejected: label("safety.rejected", r)?,
    })
}

impl Record for PromptRecord {
    const KIND: &'static str = "prompt";

    fn from_row(row: RawRow) -> Result<Self> {
        let f = Fields {
            row: &row,
            hint: PROMPT_HINT,
        };
        let prompt = if f.has("prompt") {
            f.content("prompt")?
        } else if f.has("messages") {
            Content::Messages(f.messages("messages")?)
        } else {
            return Err(f.unknown(Self::KIND, PROMPT_HINT));
        };
        let tags = match f.get("tags") {
            None => Vec::new(),
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(a)) => a
                .iter()
                .enumerate()
                .map(|(i, t)| match t {
                    Value::String(s) => Ok(s.clone()),
                    other => Err(f.wrong(&format!("tags[{i}]"), "a string", other)),
                })
                .collect::<Result<_>>()?,
            Some(other) => Err(f.wrong("tags", "a list of strings", other))?,
        };
        Ok(PromptRecord {
            at: row.at,
            prompt,
            tags,
            row: row.fields,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Location;
    use crate::records::MarginTable;
    use std::path::Path;

    fn row(v: Value) -> RawRow {
        RawRow {
            at: Location::line(Path::new("t.jsonl"), 7),
            fields: v.as_object().unwrap().clone(),
        }
    }

    #[test]
    fn explicit_margin_wins_over_degree() {
        let c = Comparison::from_row(row(serde_json::json!({
            "prompt": "p", "chosen": "a", "rejected": "b", "margin": 0.5, "degree": "better"
        })))
        .unwrap();
        let Comparison::Pair(p) = c else { panic!() };
        assert_eq!(p.margin(MarginTable::Large), Some(0.5));
    }

    #[test]
    fn mixed_text_and_messages_are_rejected() {
        let e = Comparison::from_row(row(serde_json::json!({
            "prompt": "p", "chosen": [{"role": "assistant", "content": "a"}],
            "rejected": [{"role": "assistant", "content": "b"}]
        })))
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("t.jsonl:7: field \"chosen\" must be a string like the row's other"),
            "{e}"
        );
    }
}
