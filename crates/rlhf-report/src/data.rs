//! What a run directory holds, read leniently: `metrics.jsonl` (training curves and the run
//! summary), `eval.json` (judges, KL, answers), `gold_proxy.jsonl` (gold and proxy scores
//! against KL per PPO checkpoint) and PPO's `eval_step{N}.jsonl` (scored greedy answers).
//! Formats: the eval format contract between `rlhf eval`, the pipeline and `rlhf report`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::{Error, Result};

/// One training run's `metrics.jsonl`: a series per numeric metric, and the summary line.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Metrics {
    /// `(metric, [(step, value)])`, in the order a reader wants them (see [`metric_rank`]),
    /// points sorted by step; non-finite values (written as `null`) are left out.
    pub series: Vec<(String, Vec<(f64, f64)>)>,
    /// The run summary (the line with `train_runtime`), every key as written.
    pub summary: Option<Map<String, Value>>,
    /// Lines that were not JSON objects (a killed run's cut last line).
    pub skipped_lines: usize,
}

/// Keys that are bookkeeping rather than a curve worth a chart.
fn not_plotted(key: &str) -> bool {
    key == "step"
        || key == "epoch"
        || key == "total_flos"
        || key.ends_with("_runtime")
        || key.ends_with("_per_second")
}

/// Where a metric goes among a stage's charts: the headline metrics of each trainer first
/// (the names TRL dashboards show), then the rest by name, the learning rate last.
fn metric_rank(key: &str) -> usize {
    const FIRST: [&str; 12] = [
        "loss",
        "eval_loss",
        "eval_accuracy",
        "accuracy",
        "objective/rlhf_reward",
        "objective/scores",
        "objective/kl",
        "objective/non_score_reward",
        "eval_objective/scores",
        "rewards/margins",
        "rewards/chosen",
        "rewards/rejected",
    ];
    match FIRST.iter().position(|&k| k == key) {
        Some(i) => i,
        None if key == "learning_rate" => usize::MAX,
        None => FIRST.len(),
    }
}

/// Parses a `metrics.jsonl` text. The summary is the line holding `train_runtime` (the
/// trainers' last line); every other line adds a point to each finite numeric key at its
/// `step`. A line without a `step` adds nothing to the curves.
pub fn parse_metrics(text: &str) -> Metrics {
    let mut m = Metrics::default();
    let mut series: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let Ok(Value::Object(obj)) = serde_json::from_str::<Value>(line) else {
            m.skipped_lines += 1;
            continue;
        };
        if obj.contains_key("train_runtime") {
            m.summary = Some(obj);
            continue;
        }
        let Some(step) = obj.get("step").and_then(Value::as_f64) else {
            continue;
        };
        for (k, v) in &obj {
            if not_plotted(k) {
                continue;
            }
            if let Some(x) = v.as_f64().filter(|x| x.is_finite()) {
                series.entry(k.clone()).or_default().push((step, x));
            }
        }
    }
    let mut series: Vec<(String, Vec<(f64, f64)>)> = series.into_iter().collect();
    for (_, pts) in &mut series {
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    // Stable, so equal ranks stay in name order.
    series.sort_by_key(|(k, _)| metric_rank(k));
    m.series = series;
    m
}

/// Reads and parses `path` (see [`parse_metrics`]).
pub fn read_metrics(path: &Path) -> Result<Metrics> {
    let m = parse_metrics(&read(path)?);
    if m.skipped_lines > 0 {
        tracing::warn!(
            "{}: {} line(s) not JSON objects; skipped",
            path.display(),
            m.skipped_lines
        );
    }
    Ok(m)
}

/// One judge's line of the eval table.
#[derive(Debug, Clone, PartialEq)]
pub struct Judge {
    /// The judge's name (free text).
    pub name: String,
    /// Its fields as written (`kind`, `win_rate`, `policy_mean`, ...).
    pub fields: Map<String, Value>,
}

impl Judge {
    /// A numeric field, if present and a number.
    pub fn num(&self, key: &str) -> Option<f64> {
        self.fields.get(key).and_then(Value::as_f64)
    }

    /// Whether the judge scores each answer (and so has per-row scores to histogram).
    pub fn is_scorer(&self) -> bool {
        self.fields.get("kind").and_then(Value::as_str) == Some("scorer")
    }
}

/// One prompt of `eval.json`'s `rows`: both answers, their scores and the verdicts.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalRow {
    /// The prompt as given to both models.
    pub prompt: String,
    /// The policy's completion.
    pub policy: String,
    /// The baseline's completion.
    pub baseline: String,
    /// Per scorer judge: `(judge, policy score, baseline score)`.
    pub scores: Vec<(String, Option<f64>, Option<f64>)>,
    /// Per judge: `(judge, "policy" | "baseline" | "tie")`.
    pub verdicts: Vec<(String, String)>,
}

/// `eval.json`, as far as the report shows it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Eval {
    /// The evaluated policy (a path).
    pub policy: Option<String>,
    /// What it was compared against (a model path or a JSONL file).
    pub baseline: Option<String>,
    /// How many prompts were judged.
    pub n_prompts: Option<u64>,
    /// The judges, in file order.
    pub judges: Vec<Judge>,
    /// `kl`: `k1`, `k3`, `samples`.
    pub kl: Option<Map<String, Value>>,
    /// The per-prompt rows.
    pub rows: Vec<EvalRow>,
}

fn str_of(v: &Value, key: &str) -> Option<String> {
    v.get(key).and_then(Value::as_str).map(str::to_string)
}

/// Parses `eval.json`'s text; missing keys are left empty rather than refused, so a partial
/// file still shows what it has.
pub fn parse_eval(text: &str) -> std::result::Result<Eval, String> {
    let v: Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    if !v.is_object() {
        return Err("expected a JSON object".into());
    }
    let judges = v
        .get("judges")
        .and_then(Value::as_object)
        .map(|j| {
            j.iter()
                .filter_map(|(name, f)| {
                    Some(Judge {
                        name: name.clone(),
                        fields: f.as_object()?.clone(),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    let rows = v
        .get("rows")
        .and_then(Value::as_array)
        .map(|rows| rows.iter().map(eval_row).collect())
        .unwrap_or_default();
    Ok(Eval {
        policy: str_of(&v, "policy"),
        baseline: str_of(&v, "baseline"),
        n_prompts: v.get("n_prompts").and_then(Value::as_u64),
        judges,
        kl: v.get("kl").and_then(Value::as_object).cloned(),
        rows,
    })
}

fn eval_row(r: &Value) -> EvalRow {
    let scores = r
        .get("scores")
        .and_then(Value::as_object)
        .map(|s| {
            s.iter()
                .map(|(j, pb)| {
                    let get = |k: &str| pb.get(k).and_then(Value::as_f64);
                    (j.clone(), get("policy"), get("baseline"))
                })
                .collect()
        })
        .unwrap_or_default();
    let verdicts = r
        .get("verdicts")
        .and_then(Value::as_object)
        .map(|s| {
            s.iter()
                .filter_map(|(j, v)| Some((j.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default();
    EvalRow {
        prompt: str_of(r, "prompt").unwrap_or_default(),
        policy: str_of(r, "policy").unwrap_or_default(),
        baseline: str_of(r, "baseline").unwrap_or_default(),
        scores,
        verdicts,
    }
}

/// One row of `gold_proxy.jsonl`: a PPO checkpoint's KL and mean gold and proxy scores.
#[derive(Debug, Clone, PartialEq)]
pub struct GoldProxy {
    /// The PPO step (0 = the starting policy).
    pub step: u64,
    /// KL(policy ‖ start), the k1 estimator.
    pub kl_k1: f64,
    /// Mean gold score of the greedy completions.
    pub gold: f64,
    /// Mean proxy (reward model) score of the same completions.
    pub proxy: f64,
}

/// Parses `gold_proxy.jsonl`, sorted by step; rows missing a number are skipped.
pub fn parse_gold_proxy(text: &str) -> Vec<GoldProxy> {
    let mut rows: Vec<GoldProxy> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| {
            let f = |k: &str| v.get(k).and_then(Value::as_f64).filter(|x| x.is_finite());
            Some(GoldProxy {
                step: v.get("step").and_then(Value::as_u64)?,
                kl_k1: f("kl_k1")?,
                gold: f("gold")?,
                proxy: f("proxy")?,
            })
        })
        .collect();
    rows.sort_by_key(|r| r.step);
    rows
}

/// One scored greedy answer from PPO's `eval_step{N}.jsonl`.
#[derive(Debug, Clone, PartialEq)]
pub struct Scored {
    /// The prompt (empty for a `messages` row).
    pub prompt: String,
    /// The policy's completion at that step.
    pub completion: String,
    /// The reward model's score.
    pub score: Option<f64>,
}

/// PPO's `eval_step{N}.jsonl` files in `dir`, sorted by step.
pub fn eval_steps(dir: &Path) -> Vec<(u64, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<(u64, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name
                .strip_prefix("eval_step")?
                .strip_suffix(".jsonl")?
                .parse()
                .ok()?;
            Some((step, e.path()))
        })
        .collect();
    out.sort();
    out
}

/// Reads one `eval_step{N}.jsonl`.
pub fn read_scored(path: &Path) -> Result<Vec<Scored>> {
    Ok(read(path)?
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .map(|v| Scored {
            prompt: str_of(&v, "prompt").unwrap_or_default(),
            completion: str_of(&v, "completion").unwrap_or_default(),
            score: v.get("score").and_then(Value::as_f64),
        })
        .collect())
}

/// The text of `path`, or an error naming it.
pub fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_curves_and_summary() {
        let text = r#"{"step":1,"loss":2.5,"learning_rate":1e-5,"epoch":0.1}
{"step":2,"loss":2.0,"learning_rate":2e-5,"eval_loss":2.2,"eval_runtime":0.5}
{"step":3,"loss":null,"learning_rate":2e-5,"objective/kl":0.1}
{"step":3,"train_runtime":12.0,"train_loss":2.1,"train_samples_per_second":4.0,"note":"done"}
{"step":4,"loss":1.
"#;
        let m = parse_metrics(text);
        let names: Vec<&str> = m.series.iter().map(|(k, _)| k.as_str()).collect();
        // Headline metrics first, learning rate last, bookkeeping (epoch, runtimes) left out.
        assert_eq!(
            names,
            ["loss", "eval_loss", "objective/kl", "learning_rate"]
        );
        assert_eq!(m.series[0].1, vec![(1.0, 2.5), (2.0, 2.0)]); // null dropped
        assert_eq!(m.series[1].1, vec![(2.0, 2.2)]);
        let s = m.summary.expect("summary line");
        assert_eq!(s["train_runtime"], 12.0);
        assert_eq!(s["note"], "done");
        // The summary's train_loss is not a curve point.
        assert!(!names.contains(&"train_loss"));
        assert_eq!(m.skipped_lines, 1);
    }

    #[test]
    fn metrics_points_sorted_by_step() {
        let m = parse_metrics("{\"step\":5,\"loss\":1}\n{\"step\":2,\"loss\":3}\n");
        assert_eq!(m.series[0].1, vec![(2.0, 3.0), (5.0, 1.0)]);
        assert!(m.summary.is_none());
    }

    #[test]
    fn eval_json_partial() {
        let e = parse_eval(
            r#"{"policy":"p","judges":{"gold":{"kind":"scorer","win_rate":0.7},
               "jm":{"kind":"pairwise","win_rate":0.5}},
               "rows":[{"prompt":"q","policy":"a","baseline":"b",
                        "scores":{"gold":{"policy":1.0,"baseline":0.0}},
                        "verdicts":{"gold":"policy","jm":"tie"}}]}"#,
        )
        .unwrap();
        assert_eq!(e.policy.as_deref(), Some("p"));
        assert!(e.baseline.is_none() && e.kl.is_none());
        assert_eq!(e.judges.len(), 2);
        assert!(e.judges[0].is_scorer() && !e.judges[1].is_scorer());
        assert_eq!(e.judges[0].num("win_rate"), Some(0.7));
        assert_eq!(
            e.rows[0].scores,
            vec![("gold".into(), Some(1.0), Some(0.0))]
        );
        assert_eq!(e.rows[0].verdicts.len(), 2);
        assert!(parse_eval("[1]").is_err());
        assert!(parse_eval("{").is_err());
    }

    #[test]
    fn gold_proxy_sorted_and_lenient() {
        let rows = parse_gold_proxy(
            "{\"step\":10,\"kl_k1\":0.8,\"proxy\":1.4,\"gold\":0.7}\n\
             {\"step\":0,\"kl_k1\":0.0,\"proxy\":0.2,\"gold\":0.1}\n\
             {\"step\":20,\"kl_k1\":null,\"proxy\":1.4,\"gold\":0.7}\nnot json\n",
        );
        assert_eq!(rows.iter().map(|r| r.step).collect::<Vec<_>>(), [0, 10]);
    }
}
