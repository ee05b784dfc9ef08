//! Training pipelines as one command: stages run in the order the config writes them, each
//! stage's output directory feeding the next (`rlhf pipeline --config pipeline.toml`): the
//! InstructGPT pipeline (SFT → reward model → PPO), Llama 2's (SFT → helpfulness and safety
//! reward models → rejection sampling → PPO with the gate), or any other order of sft,
//! reward, ppo, rejection_sampling, rest, hir, dpo and kto.
//!
//! The config has top-level keys shared by every stage (`model`, `output_dir`, `seed`,
//! `report_to`, `logging_steps`, `max_length`, ...) and one table per stage, holding what that
//! stage's own config holds (its `[lora]` as `[sft.lora]`, ...). A table is named after its
//! trainer (`[sft]`, `[rejection_sampling]`), or names it with `trainer = "reward"` (two
//! reward models: `[helpfulness]` and `[safety]`, each `trainer = "reward"`). A stage table
//! wins over the shared keys. Where a stage is silent: the first policy stage trains `model`,
//! each later one starts from the previous policy stage's output (a LoRA adapter is merged
//! into its base in memory); a reward model starts from the latest SFT stage's output; a stage
//! that scores samples (ppo, rejection_sampling, rest, hir) and names no scorer uses the latest
//! reward stage's model; outputs go to `output_dir/STAGE`. A model key (`model`,
//! `reward_model`, `reward_models`, `ref_model`) may name an earlier stage: `reward_models =
//! { helpfulness = "helpfulness", safety = "safety" }` means those stages' outputs. The exact config each stage ran is
//! written beside its output (`output_dir/STAGE.toml`), and `pipeline_state.json` records
//! the stages done, so `--resume` skips them and resumes the interrupted one (from its newest
//! checkpoint, or for the sampling methods from their last whole batch or round).
//!
//! AI feedback makes data for the stages after it: `[label_ai]` (RLAIF) writes pairs that a
//! later reward or dpo stage trains on, `[constitutional]` revisions that a later sft stage
//! and pairs that a later dpo (or reward) stage trains on, wherever that stage names no
//! `train_file`. They take only their own keys from the shared ones; label_ai gets a `model`
//! only when it samples a policy (`prompt_file`).
//!
//! A stage's `train_file` or `eval_file` may be a feedback database (`.sqlite`, `.sqlite3`,
//! `.db`, from `rlhf feedback`): when the stage starts, its labels are exported (one
//! consistent snapshot, so labelling can go on) in the format the trainer reads (reward and
//! dpo: pairs; sft: sft; kto: kto) into the stage's output directory as
//! `feedback-<format>.jsonl` (`feedback-<format>-eval.jsonl`), and that file is the data.
//! Optional stage keys: `feedback_project` (one project; default every project the format can
//! use) and `feedback_aggregate = "none"` (a row per annotator, the default) or `"majority"`.
//! A resumed stage reuses the file it exported, so it resumes on the same data.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::trainer::Summary;
use crate::{Error, Result};

/// What a stage can run.
pub const KINDS: [&str; 10] = [
    "label_ai",
    "constitutional",
    "sft",
    "reward",
    "ppo",
    "rejection_sampling",
    "rest",
    "hir",
    "dpo",
    "kto",
];

/// Stages whose output is the policy the next stage starts from.
const POLICY_KINDS: [&str; 7] = [
    "sft",
    "ppo",
    "rejection_sampling",
    "rest",
    "hir",
    "dpo",
    "kto",
];

/// Stages that score samples, and so need a reward model or program.
const SCORED_KINDS: [&str; 4] = ["ppo", "rejection_sampling", "rest", "hir"];

/// Keys whose values are paths, made absolute against the pipeline config's directory.
const PATH_KEYS: [&str; 12] = [
    "model",
    "train_file",
    "eval_file",
    "output_dir",
    "ptx_file",
    "reward_model",
    "ref_model",
    // label_ai and constitutional
    "input_file",
    "prompt_file",
    "judge_model_path",
    "human_labels_file",
    "constitution",
];

/// The AI-feedback stages (they make data, not models), with the keys each takes: a shared
/// key reaches them only where it is theirs.
fn ai_feedback_keys(kind: &str) -> Option<&'static [&'static str]> {
    match kind {
        "label_ai" => Some(crate::label_ai::KEYS),
        "constitutional" => Some(crate::constitutional::KEYS),
        _ => None,
    }
}

/// The data an AI-feedback stage's output gives a later stage of `kind` that names no
/// `train_file`: label_ai's pairs (reward, dpo), constitutional's revisions (sft) and pairs
/// (reward, dpo).
fn ai_feedback_data(ai_kind: &str, out: &str, kind: &str) -> Option<String> {
    let file = match (ai_kind, kind) {
        ("label_ai", "reward" | "dpo") => crate::label_ai::PAIRS_FILE,
        ("constitutional", "sft") => crate::constitutional::SFT_FILE,
        ("constitutional", "reward" | "dpo") => crate::constitutional::PAIRS_FILE,
        _ => return None,
    };
    Some(Path::new(out).join(file).to_string_lossy().into_owned())
}

/// Stage keys that say how a feedback database is read; they are not passed to the trainer.
const FEEDBACK_KEYS: [&str; 2] = ["feedback_project", "feedback_aggregate"];

/// Data keys that may name a feedback database, with the suffix of the file exported for it.
const FEEDBACK_DATA_KEYS: [(&str, &str); 2] = [("train_file", ""), ("eval_file", "-eval")];

/// Whether a data path names a feedback database (`.sqlite`, `.sqlite3` or `.db`) rather than
/// a record file.
pub fn is_feedback_db(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "sqlite" | "sqlite3" | "db"))
}

/// The export format a stage kind trains on; `None` for stages that read prompts.
pub fn feedback_format(kind: &str) -> Option<rlhf_feedback::export::Format> {
    use rlhf_feedback::export::Format;
    match kind {
        "reward" | "dpo" => Some(Format::Pairs),
        "sft" => Some(Format::Sft),
        "kto" => Some(Format::Kto),
        _ => None,
    }
}

/// Checks a stage's feedback settings (before any stage runs) and returns the export options
/// its feedback database(s) will be read with; `None` when it reads no database.
fn feedback_options(
    path: &Path,
    name: &str,
    kind: &str,
    t: &toml::Table,
) -> Result<Option<rlhf_feedback::export::ExportOptions>> {
    use rlhf_feedback::export::{Aggregate, ExportOptions};
    let at = |key: &str| format!("{}: [{name}] {key}", path.display());
    let dbs: Vec<&str> = FEEDBACK_DATA_KEYS
        .iter()
        .filter_map(|(k, _)| t.get(*k).and_then(|v| v.as_str()))
        .filter(|f| is_feedback_db(Path::new(f)))
        .collect();
    if dbs.is_empty() {
        if let Some(k) = FEEDBACK_KEYS.iter().find(|k| t.contains_key(**k)) {
            return Err(Error::Config(format!(
                "{}: is for a stage whose train_file is a feedback database (.sqlite, .sqlite3 \
                 or .db); this stage reads {}: remove {k}, or give the database as train_file",
                at(k),
                t.get("train_file")
                    .and_then(|v| v.as_str())
                    .unwrap_or("no train_file")
            )));
        }
        return Ok(None);
    }
    let Some(format) = feedback_format(kind) else {
        return Err(Error::Config(format!(
            "{}: {} is a feedback database, but a {kind} stage reads prompts, not labels; give \
             it a prompt file (JSONL or Parquet). Feedback databases train reward, dpo, sft and \
             kto stages",
            at("train_file"),
            dbs[0]
        )));
    };
    let project = match t.get("feedback_project") {
        None => None,
        Some(toml::Value::String(s)) => Some(s.clone()),
        Some(v) => {
            return Err(Error::Config(format!(
                "{} = {v}: give a project name as a string",
                at("feedback_project")
            )))
        }
    };
    let aggregate = match t.get("feedback_aggregate") {
        None => Aggregate::None,
        Some(toml::Value::String(s)) => Aggregate::parse(s)
            .map_err(|e| Error::Config(format!("{}: {e}", at("feedback_aggregate"))))?,
        Some(v) => {
            return Err(Error::Config(format!(
                "{} = {v}: use \"none\" or \"majority\"",
                at("feedback_aggregate")
            )))
        }
    };
    Ok(Some(ExportOptions {
        format,
        aggregate,
        project,
    }))
}

/// Exports a feedback database to `out` for a stage; returns the number of rows.
fn export_feedback(
    stage: &str,
    db: &Path,
    opts: &rlhf_feedback::export::ExportOptions,
    out: &Path,
) -> Result<usize> {
    let fail = |e: rlhf_feedback::Error| Error::Config(format!("[{stage}] {}: {e}", db.display()));
    if !db.is_file() {
        return Err(Error::Config(format!(
            "[{stage}] {}: no such feedback database (create one with `rlhf feedback import`)",
            db.display()
        )));
    }
    let mut store = rlhf_feedback::Store::open(db).map_err(fail)?;
    let (rows, report) = rlhf_feedback::export::export(&mut store, opts).map_err(fail)?;
    if rows.is_empty() {
        return Err(Error::Config(format!(
            "[{stage}] {}: no {} rows to train on ({report}){}; label more items, or choose \
             another feedback_project or feedback_aggregate",
            db.display(),
            opts.format,
            opts.project
                .as_ref()
                .map(|p| format!(" in project {p:?}"))
                .unwrap_or_default()
        )));
    }
    rlhf_feedback::export::write_rows(&rows, opts.format, out).map_err(fail)?;
    tracing::info!(
        "[{stage}] {}: {report} ({} {}) -> {}",
        db.display(),
        opts.format,
        opts.aggregate.as_str(),
        out.display()
    );
    Ok(rows.len())
}

/// Replaces a stage's feedback databases by their exports in the stage's output directory
/// (reused when the stage resumes) and drops the feedback keys, so the trainer's config holds
/// only its own keys.
fn feedback_data(
    path: &Path,
    name: &str,
    kind: &str,
    table: &mut toml::Table,
    stage_out: &Path,
    resume: bool,
) -> Result<()> {
    let opts = feedback_options(path, name, kind, table)?;
    for k in FEEDBACK_KEYS {
        table.remove(k);
    }
    let Some(opts) = opts else { return Ok(()) };
    for (key, suffix) in FEEDBACK_DATA_KEYS {
        let Some(db) = table
            .get(key)
            .and_then(|v| v.as_str())
            .map(PathBuf::from)
            .filter(|p| is_feedback_db(p))
        else {
            continue;
        };
        let file = stage_out.join(format!("feedback-{}{suffix}.jsonl", opts.format));
        if resume && file.exists() {
            tracing::info!(
                "[{name}] resuming on {} (exported from {} when the stage started)",
                file.display(),
                db.display()
            );
        } else {
            export_feedback(name, &db, &opts, &file)?;
        }
        table.insert(
            key.to_string(),
            toml::Value::String(file.to_string_lossy().into_owned()),
        );
    }
    Ok(())
}

/// What `pipeline_state.json` holds.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct PipelineState {
    /// Stages finished, with their summaries.
    pub done: BTreeMap<String, Summary>,
}

/// What a pipeline run reports: each stage's summary.
pub type PipelineSummary = BTreeMap<String, Summary>;

/// Resolves a path value against the pipeline config's directory the way a stage config
/// would (`config::relative_to` for models, which keeps hub-style names for their error;
/// `config::joined_to` for data and outputs), then makes it absolute, since the stage configs
/// are written elsewhere.
fn absolute(base: &Path, key: &str, v: &mut toml::Value) {
    let toml::Value::String(s) = v else { return };
    let resolved = if matches!(key, "model" | "reward_model" | "reward_models") {
        crate::config::relative_to(base, s)
    } else {
        crate::config::joined_to(base, s)
    };
    if resolved == *s {
        return; // absolute already, empty, or a hub-style name
    }
    let joined = PathBuf::from(resolved);
    // Canonical when it exists; else absolute against the working directory (outputs).
    let abs = joined
        .canonicalize()
        .or_else(|_| std::path::absolute(&joined))
        .unwrap_or(joined);
    *s = abs.to_string_lossy().into_owned();
}

/// A pipeline config split into its stages.
pub struct Stages {
    /// The pipeline's `output_dir` (holds `pipeline_state.json` and each stage's config).
    pub output_dir: PathBuf,
    /// Each stage's name and full standalone config, with absolute paths, in order.
    pub stages: Vec<(String, toml::Table)>,
    /// Each stage's trainer (`kinds[i]` runs `stages[i]`).
    pub kinds: Vec<String>,
    /// The held-out evaluation after the last stage (`[eval]`), if the config has one.
    pub eval: Option<PipelineEval>,
}

/// The pipeline's `[eval]`: `rlhf eval` of the last policy stage's output against the SFT
/// policy, and, with `gold_proxy = true`, the proxy and gold judges over every policy that
/// stage saved on the way (PPO's checkpoints, rejection sampling's rounds, ReST's Improve
/// steps: Gao et al. 2022).
pub struct PipelineEval {
    /// The evaluation's settings, with the pipeline's defaults filled in.
    pub config: crate::eval::EvalConfig,
    /// Run the proxy (`proxy_judge`) and gold (`gold_judge`) judges over PPO's checkpoints.
    pub gold_proxy: bool,
    /// The judge the policy was trained against (default "proxy").
    pub proxy_judge: String,
    /// The held-out judge (default "gold").
    pub gold_judge: String,
}

impl Stages {
    /// The `output_dir` a stage writes to.
    pub fn output_of(&self, stage: &str) -> Option<PathBuf> {
        self.stages
            .iter()
            .find(|(n, _)| n == stage)
            .and_then(|(_, t)| t.get("output_dir"))
            .and_then(|v| v.as_str())
            .map(PathBuf::from)
    }
}

/// The config of each stage, as full standalone configs with absolute paths.
pub fn stage_tables(path: &Path, overrides: &[String]) -> Result<Stages> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut top: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| Error::Config(format!("{}: {e}", path.display())))?;
    for o in overrides {
        crate::config::apply_override(&mut top, o)?;
    }
    let base = path
        .parent()
        .map(|p| {
            if p.as_os_str().is_empty() {
                Path::new(".")
            } else {
                p
            }
        })
        .unwrap_or(Path::new("."));
    let eval_table = match top.remove("eval") {
        Some(toml::Value::Table(t)) => Some(t),
        Some(_) => {
            return Err(Error::Config(format!(
                "{}: `eval` must be a table ([eval])",
                path.display()
            )))
        }
        None => None,
    };
    // Every other table is a stage, in the order written.
    let names: Vec<String> = top
        .iter()
        .filter(|(_, v)| v.is_table())
        .map(|(k, _)| k.clone())
        .collect();
    let mut stages: Vec<(String, String, toml::Table)> = Vec::new();
    for name in names {
        let Some(toml::Value::Table(mut t)) = top.remove(&name) else {
            unreachable!("filtered to tables")
        };
        let kind = match t.remove("trainer") {
            Some(toml::Value::String(k)) => k,
            Some(v) => {
                return Err(Error::Config(format!(
                    "{}: [{name}] trainer = {v}: give one of {}",
                    path.display(),
                    KINDS.join(", ")
                )))
            }
            None => name.clone(),
        };
        if !KINDS.contains(&kind.as_str()) {
            return Err(Error::Config(format!(
                "{}: [{name}] is not a trainer ({}): name the table after one, or say which \
                 with `trainer = \"reward\"`",
                path.display(),
                KINDS.join(", ")
            )));
        }
        stages.push((name, kind, t));
    }
    if stages.is_empty() {
        return Err(Error::Config(format!(
            "{}: no stage tables; write one per stage in the order to run them, e.g. [sft], \
             [reward], [ppo]",
            path.display()
        )));
    }
    for (k, v) in top.iter_mut() {
        if PATH_KEYS.contains(&k.as_str()) {
            absolute(base, k, v);
        }
    }
    let model = top
        .get("model")
        .and_then(|v| v.as_str())
        .map(PathBuf::from)
        .ok_or_else(|| Error::Config(format!("{}: `model` is required", path.display())))?;
    let out = top
        .get("output_dir")
        .and_then(|v| v.as_str())
        .map(PathBuf::from)
        .ok_or_else(|| Error::Config(format!("{}: `output_dir` is required", path.display())))?;
    let out_of = |s: &str| out.join(s).to_string_lossy().into_owned();
    let mut result = Vec::new();
    let mut kinds = Vec::new();
    let mut last_policy: Option<String> = None;
    let mut last_sft: Option<String> = None;
    let mut last_reward: Option<String> = None;
    let mut last_ai: Option<(String, String)> = None;
    let mut outputs: BTreeMap<String, String> = BTreeMap::new();
    for (name, kind, mut t) in stages {
        // A model key naming an earlier stage means that stage's output.
        let by_name = |v: &mut toml::Value| {
            if let Some(o) = v.as_str().and_then(|s| outputs.get(s)) {
                *v = toml::Value::String(o.clone());
            }
        };
        for (k, v) in t.iter_mut() {
            match k.as_str() {
                "model" | "reward_model" | "ref_model" => by_name(v),
                "reward_models" => {
                    if let toml::Value::Table(rm) = v {
                        rm.iter_mut().for_each(|(_, x)| by_name(x));
                    }
                }
                _ => {}
            }
        }
        for (k, v) in t.iter_mut() {
            if PATH_KEYS.contains(&k.as_str()) {
                absolute(base, k, v);
            }
            if k == "reward_program" {
                // Its file arguments, absolute now, since the stage config is written elsewhere.
                crate::program::resolve_program_args(base, v);
            }
            if k == "reward_models" {
                if let toml::Value::Table(rm) = v {
                    for (_, x) in rm.iter_mut() {
                        absolute(base, k, x);
                    }
                }
            }
        }
        // A stage after an AI-feedback stage trains on what it wrote, unless it says otherwise.
        if !t.contains_key("train_file") {
            if let Some(f) = last_ai
                .as_ref()
                .and_then(|(k, o)| ai_feedback_data(k, o, &kind))
            {
                t.insert("train_file".into(), toml::Value::String(f));
            }
        }
        // Shared keys fill in what the stage does not set; the pipeline's own keys do not.
        let own_keys = ai_feedback_keys(&kind);
        for (k, v) in &top {
            if k != "model"
                && k != "output_dir"
                && !t.contains_key(k)
                && own_keys.is_none_or(|keys| keys.contains(&k.as_str()))
            {
                t.insert(k.clone(), v.clone());
            }
        }
        // label_ai labels given pairs, or samples of a policy (`prompt_file`): only then a model.
        let wants_model = kind != "label_ai" || t.contains_key("prompt_file");
        let default_model = match kind.as_str() {
            "reward" => last_sft.clone(),
            _ => last_policy.clone(),
        }
        .unwrap_or_else(|| model.to_string_lossy().into_owned());
        if wants_model {
            t.entry("model")
                .or_insert(toml::Value::String(default_model));
        }
        t.entry("output_dir")
            .or_insert(toml::Value::String(out_of(&name)));
        let scorer_given = ["reward_model", "reward_models", "reward_program"]
            .iter()
            .any(|k| t.contains_key(*k));
        if SCORED_KINDS.contains(&kind.as_str()) && !scorer_given {
            if let Some(rm) = &last_reward {
                t.insert("reward_model".into(), toml::Value::String(rm.clone()));
            }
        }
        let this_out = t["output_dir"].as_str().expect("set above").to_string();
        outputs.insert(name.clone(), this_out.clone());
        match kind.as_str() {
            "label_ai" | "constitutional" => last_ai = Some((kind.clone(), this_out)),
            "reward" => last_reward = Some(this_out),
            k if POLICY_KINDS.contains(&k) => {
                if k == "sft" {
                    last_sft = Some(this_out.clone());
                }
                last_policy = Some(this_out);
            }
            _ => {}
        }
        // A feedback database's settings are checked now, before any stage runs.
        feedback_options(path, &name, &kind, &t)?;
        result.push((name, t));
        kinds.push(kind);
    }
    let eval = eval_table
        .map(|t| pipeline_eval(path, base, t, &out, &result, &kinds))
        .transpose()?;
    Ok(Stages {
        output_dir: out,
        stages: result,
        kinds,
        eval,
    })
}

/// `[eval]` with the pipeline's defaults: the PPO policy against the SFT policy (also the KL
/// reference), PPO's held-out prompts, and the reward stage's model as the judge "proxy".
fn pipeline_eval(
    path: &Path,
    base: &Path,
    mut t: toml::Table,
    out: &Path,
    stages: &[(String, toml::Table)],
    kinds: &[String],
) -> Result<PipelineEval> {
    let get = |i: usize, k: &str| -> Option<PathBuf> {
        stages[i]
            .1
            .get(k)
            .and_then(|v| v.as_str())
            .map(PathBuf::from)
    };
    let last_of = |pred: &dyn Fn(&str) -> bool| (0..stages.len()).rev().find(|&i| pred(&kinds[i]));
    let policy = last_of(&|k| POLICY_KINDS.contains(&k));
    let first_sft = (0..stages.len()).find(|&i| kinds[i] == "sft");
    let reward = last_of(&|k| k == "reward");
    let gold_proxy = match t.remove("gold_proxy") {
        Some(toml::Value::Boolean(b)) => b,
        None => false,
        Some(v) => {
            return Err(Error::Config(format!(
                "{}: [eval] gold_proxy = {v}: use true or false",
                path.display()
            )))
        }
    };
    let name = |t: &mut toml::Table, k: &str, default: &str| -> String {
        match t.remove(k) {
            Some(toml::Value::String(s)) => s,
            _ => default.to_string(),
        }
    };
    let proxy_judge = name(&mut t, "proxy_judge", "proxy");
    let gold_judge = name(&mut t, "gold_judge", "gold");
    let mut config = crate::eval::EvalConfig::from_table(path, base, t)?;
    if config.model.as_os_str().is_empty() {
        config.model = policy
            .and_then(|i| get(i, "output_dir"))
            .unwrap_or_default();
    }
    if config.baseline_model.is_none() && config.baseline_file.is_none() {
        // The SFT policy; without an SFT stage (or when it is what is judged), the model the
        // judged stage started from.
        config.baseline_model = match (first_sft, policy) {
            (Some(s), Some(p)) if s != p => get(s, "output_dir"),
            (_, Some(p)) => get(p, "model"),
            _ => None,
        };
    }
    if config.eval_file.as_os_str().is_empty() {
        if let Some(f) = (0..stages.len()).rev().find_map(|i| get(i, "eval_file")) {
            config.eval_file = f;
        }
    }
    if config.output_dir == crate::eval::EvalConfig::default().output_dir {
        config.output_dir = out.join("eval");
    }
    if !config.judges.contains_key(&proxy_judge) {
        // What the last stage that scored samples was trained against; else the last reward
        // model. The Llama 2 gate judges unwhitened: a judge's score must not depend on the
        // batch an answer landed in.
        let mut j = crate::eval::JudgeSpec::default();
        let scored = last_of(&|k| SCORED_KINDS.contains(&k));
        let spec = scored.and_then(|i| {
            let t = &stages[i].1;
            let keys: toml::Table = crate::scoring::SCORER_KEYS
                .iter()
                .filter_map(|k| t.get(*k).map(|v| ((*k).to_string(), v.clone())))
                .collect();
            crate::config::parse::<crate::scoring::ScorerSpec>(path, keys).ok()
        });
        match spec {
            Some(mut s) if !s.sources().is_empty() => {
                s.llama2.whiten = false;
                s.batch_size = j.scorer.batch_size;
                j.scorer = s;
            }
            _ => j.scorer.reward_model = reward.and_then(|i| get(i, "output_dir")),
        }
        // A pipeline with no scored stage and no reward model (SFT, DPO, AI feedback) has no
        // proxy to judge by: the config's own judges only.
        if !j.scorer.sources().is_empty() {
            config.judges.insert(proxy_judge.clone(), j);
        } else if gold_proxy {
            return Err(Error::Config(format!(
                "{}: [eval] gold_proxy = true needs a proxy judge, and no stage scored                  against a reward model: add [eval.judges.{proxy_judge}]",
                path.display()
            )));
        }
    }
    Ok(PipelineEval {
        config,
        gold_proxy,
        proxy_judge,
        gold_judge,
    })
}

/// `rlhf pipeline --config FILE [--set k=v]... [--resume]`. Overrides apply to the whole
/// file (`--set ppo.max_steps=10`).
pub fn run(path: &Path, overrides: &[String], resume: bool) -> Result<PipelineSummary> {
    let Stages {
        output_dir: out,
        stages,
        kinds,
        eval,
    } = stage_tables(path, overrides)?;
    // Before anything is written: not into a stage's model, the lock, no other pipeline's
    // state (a shared `overwrite_output_dir = true` deletes it; each stage its checkpoints).
    let overwrite = stages.iter().all(|(_, t)| {
        t.get("overwrite_output_dir")
            .and_then(|v| v.as_bool())
            .unwrap_or(false)
    });
    let models: Vec<(&str, &Path)> = stages
        .iter()
        .filter_map(|(_, t)| t.get("model").and_then(|v| v.as_str()))
        .map(|m| ("model", Path::new(m)))
        .collect();
    let _lock = crate::outdir::prepare(&out, &models, resume, overwrite)?;
    let state_path = out.join("pipeline_state.json");
    let mut state: PipelineState = if resume && state_path.exists() {
        crate::checkpoint::read_json(&state_path)?
    } else {
        PipelineState::default()
    };
    for ((name, table), kind) in stages.iter().zip(&kinds) {
        if state.done.contains_key(name) {
            tracing::info!("== {name}: done in an earlier run, skipped");
            continue;
        }
        let cfg_path = out.join(format!("{name}.toml"));
        let stage_out = PathBuf::from(
            table
                .get("output_dir")
                .and_then(|v| v.as_str())
                .expect("stage_tables sets every output_dir"),
        );
        // Resume the interrupted stage: from its newest checkpoint, or for the sampling
        // methods from what they wrote (their rounds and samples).
        let sampling = matches!(kind.as_str(), "rejection_sampling" | "rest" | "hir");
        let resume_stage = resume
            && if sampling {
                stage_out.exists()
            } else {
                !crate::trainer::checkpoints(&stage_out).is_empty()
            };
        // A feedback database becomes the stage's export, written before the config so the
        // config records the file the stage trained on.
        let mut table = table.clone();
        feedback_data(path, name, kind, &mut table, &stage_out, resume_stage)?;
        let text = toml::to_string(&table)
            .map_err(|e| Error::Config(format!("{}: {e}", cfg_path.display())))?;
        rlhf_model::save::write_atomic(&cfg_path, text.as_bytes())?;
        let r = resume_stage.then_some(None);
        tracing::info!("== {name} ({kind}): {}", cfg_path.display());
        let summary = match kind.as_str() {
            "sft" => crate::sft::run(&cfg_path, &[], r)?,
            "reward" => crate::reward::run(&cfg_path, &[], r)?,
            "ppo" => crate::ppo::run(&cfg_path, &[], r)?,
            "rejection_sampling" => crate::rejection_sampling::run(&cfg_path, &[], r)?,
            "rest" => crate::rest::run(&cfg_path, &[], r)?,
            "hir" => crate::hir::run(&cfg_path, &[], r)?,
            // They continue an interrupted run by themselves (the judge cache, whole batches).
            "label_ai" => crate::label_ai::run_stage(&cfg_path)?,
            "constitutional" => crate::constitutional::run_file(&cfg_path, &[])?,
            "dpo" => crate::dpo::run(&cfg_path, &[], r)?,
            _ => crate::kto::run(&cfg_path, &[], r)?,
        };
        state.done.insert(name.clone(), summary);
        crate::checkpoint::write_json(&state_path, &state)?;
    }
    if let Some(ev) = eval {
        if state.done.contains_key("eval") {
            tracing::info!("== eval: done in an earlier run, skipped");
        } else {
            let summary = run_eval(&ev, &stages)?;
            state.done.insert("eval".into(), summary);
            crate::checkpoint::write_json(&state_path, &state)?;
        }
    }
    Ok(state.done)
}

/// The pipeline's evaluation: gold and proxy over PPO's checkpoints (when asked), then the
/// final policy against the SFT policy; its summary holds each judge's numbers and the KL.
fn run_eval(ev: &PipelineEval, stages: &[(String, toml::Table)]) -> Result<Summary> {
    let cfg = &ev.config;
    tracing::info!(
        "== eval: {} vs {:?}",
        cfg.model.display(),
        cfg.baseline_model
    );
    if ev.gold_proxy {
        let judged = cfg.model.to_string_lossy();
        let max_steps = stages
            .iter()
            .find(|(_, t)| t.get("output_dir").and_then(|v| v.as_str()) == Some(&*judged))
            .and_then(|(_, t)| t.get("max_steps"))
            .and_then(|v| v.as_integer())
            .unwrap_or(0) as usize;
        let start = cfg.baseline_model.clone().ok_or_else(|| {
            Error::Config(
                "[eval] gold_proxy needs the policy training started from (baseline_model)".into(),
            )
        })?;
        let policies = crate::eval::run_policies(&start, &cfg.model, max_steps);
        crate::eval::gold_proxy(cfg, &policies, &ev.proxy_judge, &ev.gold_judge)?;
    }
    let report = crate::eval::run(cfg)?;
    tracing::info!("\n{}", crate::eval::table(&report));
    let mut summary = Summary::new();
    for (name, j) in &report.judges {
        let r = &j.rates;
        summary.insert(format!("{name}/win_rate"), r.win_rate);
        summary.insert(
            format!("{name}/length_controlled_winrate"),
            r.length_controlled_winrate,
        );
        if let Some(w) = r.llama2_win_rate {
            summary.insert(format!("{name}/llama2_win_rate"), w);
        }
        for (k, v) in [
            ("policy_mean", j.policy_mean),
            ("baseline_mean", j.baseline_mean),
        ] {
            if let Some(v) = v {
                summary.insert(format!("{name}/{k}"), v);
            }
        }
    }
    if let Some(kl) = report.kl {
        summary.insert("kl_k1".into(), kl.k1);
        summary.insert("kl_k3".into(), kl.k3);
    }
    Ok(summary)
}

/// For the held-out prompts PPO evaluated: the reward-model score before PPO (the SFT
/// policy) and after, and `show` answers side by side (those that changed first).
pub fn report(ppo_dir: &Path, show: usize) -> Result<String> {
    let mut evals: Vec<(usize, PathBuf)> = std::fs::read_dir(ppo_dir)
        .map_err(|e| Error::io(ppo_dir, e))?
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
    evals.sort();
    let (Some((_, first)), Some((last_step, last))) = (evals.first(), evals.last()) else {
        return Ok(format!(
            "{}: no eval_step*.jsonl (give [ppo] an eval_file to compare answers)",
            ppo_dir.display()
        ));
    };
    let read = |p: &Path| -> Result<Vec<serde_json::Value>> {
        let text = std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?;
        Ok(text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect())
    };
    let (before, after) = (read(first)?, read(last)?);
    let score = |rows: &[serde_json::Value]| {
        rows.iter().filter_map(|r| r["score"].as_f64()).sum::<f64>() / rows.len().max(1) as f64
    };
    let won = before
        .iter()
        .zip(&after)
        .filter(|(b, a)| a["score"].as_f64() > b["score"].as_f64())
        .count();
    let mut out = format!(
        "held-out prompts ({}): mean reward {:.3} before PPO (the SFT policy) -> {:.3} after \
         {last_step} PPO steps; the answer after PPO scores higher on {won} of {}\n",
        before.len(),
        score(&before),
        score(&after),
        before.len()
    );
    let clip = |v: &serde_json::Value| -> String {
        let s = v.as_str().unwrap_or("").replace('\n', " ");
        let s = s.trim();
        if s.chars().count() > 90 {
            format!("{}…", s.chars().take(90).collect::<String>())
        } else {
            s.to_string()
        }
    };
    // Answers that changed first: they show what PPO did.
    let mut pairs: Vec<(&serde_json::Value, &serde_json::Value)> =
        before.iter().zip(&after).collect();
    pairs.sort_by_key(|(b, a)| b["completion"] == a["completion"]);
    for (b, a) in pairs.into_iter().take(show) {
        let prompt = b
            .get("prompt")
            .map(|p| match p {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            })
            .unwrap_or_default();
        out.push_str(&format!(
            "\nprompt: {}\n  before ({:+.2}): {}\n  after  ({:+.2}): {}\n",
            clip(&serde_json::Value::String(prompt)),
            b["score"].as_f64().unwrap_or(f64::NAN),
            clip(&b["completion"]),
            a["score"].as_f64().unwrap_or(f64::NAN),
            clip(&a["completion"]),
        ));
    }
    Ok(out)
}
