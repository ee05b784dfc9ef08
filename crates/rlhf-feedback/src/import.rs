//! `rlhf feedback import`: prompts, or prompts with candidate answers, into a project.
//!
//! Reads
//! - the project's JSONL (or Parquet) rows: `{"prompt"}` (a demonstration task, or answers to
//!   come from `feedback generate`), `{"prompt", "completion"}` (single answer),
//!   `{"prompt", "chosen", "rejected"}` (pairwise; shown in a random but fixed order, so the
//!   file's chosen-first order does not leak into the labels), `{"prompt", "responses": [...]}`
//!   (pairwise for two, rank for more), `{"messages": [...]}` (the last assistant turn becomes
//!   the answer); every other field (`tags`, ids) is kept and exported with the labels;
//! - a JSON array: the Label Studio task list of the RLHF notebooks,
//!   `[{"prompt", "answer1", "answer2"}]`, or a Label Studio export (tasks with `"data"` and
//!   `"annotations"`), whose pairwise choices (`"selected": "left"|"right"`) are imported as
//!   labels of users named `labelstudio:<annotator>` (accounts without a password).

use std::path::Path;

use serde_json::{Map, Value};

use crate::label::{Choice, Kind, Label, Notes};
use crate::store::{NewItem, Project, Store};
use crate::{Error, Result};

/// What to import into.
#[derive(Debug, Clone, Default)]
pub struct ImportOptions {
    /// The project's name (created if absent).
    pub project: String,
    /// The task kind; `None`: from the first row's number of answers.
    pub kind: Option<Kind>,
    /// People per item for a new project (or a new value for an existing one).
    pub annotators_per_item: Option<u32>,
}

/// What an import did.
#[derive(Debug, Clone)]
pub struct ImportReport {
    /// The project the items went to.
    pub project: Project,
    /// Items added.
    pub items: usize,
    /// Labels imported (Label Studio exports).
    pub labels: usize,
}

/// One parsed input row.
struct Row {
    at: String,
    item: NewItem,
    /// Label Studio annotations: (annotator, label, lead time ms).
    labels: Vec<(String, Label, Option<i64>)>,
}

/// Imports `path` into `opts.project`: all rows in one transaction, or none.
pub fn import_file(store: &mut Store, path: &Path, opts: &ImportOptions) -> Result<ImportReport> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    });
    let rows = match text {
        Ok(t) if t.trim_start().starts_with('[') => json_array(path, &t)?,
        _ => jsonl_rows(path)?,
    };
    if rows.is_empty() {
        return Err(Error::Input {
            at: path.display().to_string(),
            msg: "has no rows".into(),
        });
    }
    let kind = match opts.kind {
        Some(k) => k,
        None => Kind::for_candidates(rows[0].item.candidates.len()),
    };
    let (lo, hi) = kind.candidates();
    for r in &rows {
        let n = r.item.candidates.len();
        if n != 0 && (n < lo || n > hi) {
            return Err(Error::Input {
                at: r.at.clone(),
                msg: format!(
                    "has {n} answer(s); a {kind} project needs {}; import it into a project of \
                     another kind (--kind {})",
                    if lo == hi {
                        lo.to_string()
                    } else {
                        format!("{lo} to {hi}")
                    },
                    Kind::for_candidates(n)
                ),
            });
        }
    }
    let project = store.ensure_project(&opts.project, kind, opts.annotators_per_item)?;
    let items: Vec<NewItem> = rows.iter().map(|r| r.item.clone()).collect();
    let ids = store.add_items(&project, &items)?;
    let mut labels = 0;
    for (row, id) in rows.iter().zip(&ids) {
        for (who, label, lead) in &row.labels {
            let user = match store.users()?.into_iter().find(|u| &u.name == who) {
                Some(u) => u,
                None => store.add_user(who, None, false)?.0,
            };
            store
                .submit(*id, user.id, label, *lead)
                .map_err(|e| Error::Input {
                    at: row.at.clone(),
                    msg: e.to_string(),
                })?;
            labels += 1;
        }
    }
    Ok(ImportReport {
        project,
        items: ids.len(),
        labels,
    })
}

fn jsonl_rows(path: &Path) -> Result<Vec<Row>> {
    rlhf_data::read_rows(path)?
        .into_iter()
        .map(|r| {
            let at = r.at.to_string();
            Ok(Row {
                item: item_from_fields(&at, r.fields)?,
                at,
                labels: vec![],
            })
        })
        .collect()
}

fn json_array(path: &Path, text: &str) -> Result<Vec<Row>> {
    let tasks: Vec<Value> = serde_json::from_str(text).map_err(|e| Error::Input {
        at: path.display().to_string(),
        msg: format!(
            "not a JSON array of tasks ({e}); give a Label Studio task list \
             [{{\"prompt\": ..., \"answer1\": ..., \"answer2\": ...}}] or a JSON-lines file"
        ),
    })?;
    tasks
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            let at = format!("{}: task {}", path.display(), i + 1);
            let Value::Object(mut obj) = t else {
                return Err(Error::Input {
                    at,
                    msg: "is not a JSON object".into(),
                });
            };
            // A Label Studio export: the task's fields under "data", labels under "annotations".
            let annotations = obj.remove("annotations");
            let fields = match obj.remove("data") {
                Some(Value::Object(d)) => d,
                Some(_) => {
                    return Err(Error::Input {
                        at,
                        msg: "field \"data\" must be an object".into(),
                    })
                }
                None => obj,
            };
            let item = item_from_fields(&at, fields)?;
            let labels = match annotations {
                Some(Value::Array(a)) => label_studio_annotations(&at, &a)?,
                _ => vec![],
            };
            Ok(Row { at, item, labels })
        })
        .collect()
}

/// Label Studio annotations of a pairwise task: `result[].value.selected` = left|right, and
/// (as `feedback export --format labelstudio` writes them) a `degree` choice.
fn label_studio_annotations(
    at: &str,
    annotations: &[Value],
) -> Result<Vec<(String, Label, Option<i64>)>> {
    let mut out = Vec::new();
    for (j, a) in annotations.iter().enumerate() {
        if a.get("was_cancelled").and_then(Value::as_bool) == Some(true) {
            continue;
        }
        let who = match a.get("completed_by") {
            Some(Value::Object(o)) => o
                .get("email")
                .or_else(|| o.get("id"))
                .map(value_text)
                .unwrap_or_default(),
            Some(v) => value_text(v),
            None => format!("annotation{}", j + 1),
        };
        let mut choice = None;
        let mut degree = None;
        for r in a
            .get("result")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let value = r.get("value");
            if let Some(sel) = value
                .and_then(|v| v.get("selected"))
                .and_then(Value::as_str)
            {
                choice = Some(match sel {
                    "left" => Choice::A,
                    "right" => Choice::B,
                    other => {
                        return Err(Error::Input {
                            at: format!("{at}, annotation {}", j + 1),
                            msg: format!(
                                "\"selected\" is {other:?}; expected \"left\" or \"right\""
                            ),
                        })
                    }
                });
            }
            if r.get("from_name").and_then(Value::as_str) == Some("degree") {
                degree = value
                    .and_then(|v| v.get("choices"))
                    .and_then(|c| c.get(0))
                    .and_then(Value::as_str)
                    .and_then(rlhf_data::Degree::parse);
            }
        }
        let Some(choice) = choice else { continue };
        let lead = a
            .get("lead_time")
            .and_then(Value::as_f64)
            .map(|s| (s * 1000.0).round() as i64);
        out.push((
            format!("labelstudio:{who}"),
            Label::Pairwise {
                choice,
                degree,
                safety: vec![],
                notes: Notes::default(),
            },
            lead,
        ));
    }
    Ok(out)
}

fn value_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A row's fields as an item: the prompt, its answers, the rest kept as `meta`.
fn item_from_fields(at: &str, mut f: Map<String, Value>) -> Result<NewItem> {
    let bad = |msg: String| Error::Input {
        at: at.to_string(),
        msg,
    };
    let answer = |v: Value, field: &str| -> Result<Value> {
        match v {
            Value::String(_) | Value::Array(_) => Ok(v),
            other => Err(bad(format!(
                "field {field:?} must be text or a message list, found {other}"
            ))),
        }
    };
    let (prompt, mut candidates) = if let Some(Value::Array(mut msgs)) = f.remove("messages") {
        let last_is_answer = msgs
            .last()
            .and_then(|m| m.get("role"))
            .and_then(Value::as_str)
            == Some("assistant");
        let answer = if last_is_answer {
            msgs.pop().and_then(|m| m.get("content").cloned())
        } else {
            None
        };
        (Value::Array(msgs), answer.into_iter().collect::<Vec<_>>())
    } else {
        let prompt =
            match f.remove("prompt") {
                Some(v @ (Value::String(_) | Value::Array(_))) => v,
                Some(other) => {
                    return Err(bad(format!(
                        "field \"prompt\" must be text or a message list, found {other}"
                    )))
                }
                None => return Err(bad(
                    "has no \"prompt\" (or \"messages\"); rows look like {\"prompt\": \"...\"}, \
                     optionally with \"chosen\"/\"rejected\", \"responses\", \"completion\" or \
                     \"answer1\"/\"answer2\""
                        .into(),
                )),
            };
        (prompt, Vec::new())
    };
    if prompt.as_str().is_some_and(|s| s.trim().is_empty()) {
        return Err(bad("field \"prompt\" is empty".into()));
    }
    if let Some(v) = f.remove("responses") {
        let Value::Array(list) = v else {
            return Err(bad("field \"responses\" must be a list of answers".into()));
        };
        for (i, a) in list.into_iter().enumerate() {
            candidates.push(answer(a, &format!("responses[{i}]"))?);
        }
        // A ranking that came with the answers is not a label of anyone here: drop it.
        f.remove("ranking");
    } else if f.contains_key("chosen") || f.contains_key("rejected") {
        let chosen = answer(
            f.remove("chosen")
                .ok_or_else(|| bad("has \"rejected\" but no \"chosen\"".into()))?,
            "chosen",
        )?;
        let rejected = answer(
            f.remove("rejected")
                .ok_or_else(|| bad("has \"chosen\" but no \"rejected\"".into()))?,
            "rejected",
        )?;
        // The order on the page must not reveal which one the file preferred: a fixed coin
        // per prompt, recorded so the file's label can still be compared.
        let chosen_first = coin(&prompt);
        f.insert(
            "imported_chosen".into(),
            Value::from(if chosen_first { "a" } else { "b" }),
        );
        f.remove("margin");
        f.remove("degree");
        candidates = if chosen_first {
            vec![chosen, rejected]
        } else {
            vec![rejected, chosen]
        };
    } else if f.contains_key("answer1") || f.contains_key("answer2") {
        for key in ["answer1", "answer2"] {
            let v = f
                .remove(key)
                .ok_or_else(|| bad(format!("has no {key:?} (Label Studio tasks have both)")))?;
            candidates.push(answer(v, key)?);
        }
    } else if let Some(v) = f.remove("completion") {
        candidates.push(answer(v, "completion")?);
    }
    Ok(NewItem {
        prompt,
        meta: f,
        candidates,
    })
}

/// A deterministic fair coin from the prompt's text (FNV-1a).
fn coin(prompt: &Value) -> bool {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in prompt.to_string().bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h >> 63 == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn item(v: Value) -> Result<NewItem> {
        let Value::Object(m) = v else { unreachable!() };
        item_from_fields("t.jsonl:1", m)
    }

    #[test]
    fn reads_each_row_shape() {
        let it = item(json!({"prompt": "p", "responses": ["a", "b", "c"], "tags": ["x"]})).unwrap();
        assert_eq!(it.candidates.len(), 3);
        assert_eq!(it.meta["tags"], json!(["x"]));
        let it = item(json!({"prompt": "p", "answer1": "a", "answer2": "b"})).unwrap();
        assert_eq!(it.candidates, vec![json!("a"), json!("b")]);
        let it = item(json!({"prompt": "p", "completion": "a"})).unwrap();
        assert_eq!(it.candidates, vec![json!("a")]);
        let it = item(json!({"messages": [{"role": "user", "content": "hi"},
                                           {"role": "assistant", "content": "hello"}]}))
        .unwrap();
        assert_eq!(it.candidates, vec![json!("hello")]);
        assert_eq!(it.prompt, json!([{"role": "user", "content": "hi"}]));
        let e = item(json!({"chosen": "a"})).unwrap_err().to_string();
        assert!(e.starts_with("t.jsonl:1: has no \"prompt\""), "{e}");
        let e = item(json!({"prompt": "p", "chosen": "a"}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no \"rejected\""), "{e}");
    }

    #[test]
    fn chosen_and_rejected_are_shown_in_a_recorded_random_order() {
        let mut firsts = 0;
        for i in 0..40 {
            let it = item(
                json!({"prompt": format!("question {i}"), "chosen": "good", "rejected": "bad"}),
            )
            .unwrap();
            let side = it.meta["imported_chosen"].as_str().unwrap();
            let pos = if side == "a" { 0 } else { 1 };
            assert_eq!(it.candidates[pos], json!("good"));
            firsts += (pos == 0) as usize;
        }
        assert!((10..=30).contains(&firsts), "{firsts} of 40 chosen-first");
    }
}
