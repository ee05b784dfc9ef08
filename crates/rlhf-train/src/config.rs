//! Training configuration from TOML, named like transformers' `TrainingArguments` and TRL's
//! configs so that users' habits carry over. Unknown keys are errors that name the key and the
//! closest valid one; `--set key=value` overrides any key (dotted for tables: `lora.r=8`).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The keys every trainer shares (transformers' `TrainingArguments` names).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct TrainingArgs {
    /// Model directory (or the previous stage's output directory).
    pub model: PathBuf,
    /// Training data (JSONL or Parquet).
    pub train_file: PathBuf,
    /// Evaluation data.
    pub eval_file: Option<PathBuf>,
    /// Where checkpoints, logs and the final model go.
    pub output_dir: PathBuf,
    /// Optimiser steps; -1 means run `num_train_epochs` epochs.
    pub max_steps: i64,
    /// Epochs when `max_steps` is -1.
    pub num_train_epochs: f64,
    /// Examples (pairs, for the reward trainer) per micro-batch.
    pub per_device_train_batch_size: usize,
    /// Examples per evaluation batch.
    pub per_device_eval_batch_size: usize,
    /// Micro-batches per optimiser step.
    pub gradient_accumulation_steps: usize,
    /// Peak learning rate.
    pub learning_rate: f64,
    /// constant | constant_with_warmup | linear | cosine.
    pub lr_scheduler_type: String,
    /// Warmup steps (wins over `warmup_ratio` when > 0).
    pub warmup_steps: usize,
    /// Warmup as a fraction of the total steps.
    pub warmup_ratio: f64,
    /// Decoupled weight decay (not applied to biases and norm weights).
    pub weight_decay: f64,
    /// AdamW β1.
    pub adam_beta1: f64,
    /// AdamW β2.
    pub adam_beta2: f64,
    /// AdamW ε.
    pub adam_epsilon: f64,
    /// Clip the global gradient norm to this (0 disables).
    pub max_grad_norm: f64,
    /// Only "adamw_torch" (and its alias "adamw") is implemented.
    pub optim: String,
    /// Write a checkpoint every this many steps (0 disables).
    pub save_steps: usize,
    /// Keep at most this many checkpoints (oldest deleted first).
    pub save_total_limit: Option<usize>,
    /// Log every this many steps.
    pub logging_steps: usize,
    /// "no" | "steps" | "epoch" (after the step that ends each epoch of the training data; for
    /// PPO one pass over the prompts); alias `evaluation_strategy`.
    #[serde(alias = "evaluation_strategy")]
    pub eval_strategy: String,
    /// Evaluate every this many steps (defaults to `logging_steps`).
    pub eval_steps: Option<usize>,
    /// Log sinks: "tensorboard", "jsonl", "all" or "none".
    pub report_to: Vec<String>,
    /// Seed of initialisation, shuffling and dropout.
    pub seed: u64,
    /// Longest sequence; longer ones are truncated and counted.
    pub max_length: usize,
    /// Skip malformed rows (counted and reported) instead of stopping.
    pub skip_invalid: bool,
    /// Shuffle the training data each epoch (transformers' default).
    pub shuffle: bool,
    /// Evaluate once before the first step, logged at step 0 (transformers' `eval_on_start`).
    pub eval_on_start: bool,
    /// Let a fresh run (no `--resume`) start in an `output_dir` that holds another run's
    /// checkpoints; they are deleted first (transformers' `overwrite_output_dir`).
    pub overwrite_output_dir: bool,
    /// bf16 mixed precision, as transformers' `bf16=True` runs it on a CPU (torch's autocast):
    /// every matrix product reads its operands rounded to bf16 and sums in f32; the weights,
    /// the optimiser state, norms, softmax and losses stay f32. Off by default.
    pub bf16: bool,
    /// fp16 mixed precision: GPU-only in transformers (loss scaling); refused here, with the
    /// advice to use `bf16`.
    pub fp16: bool,
}

impl Default for TrainingArgs {
    fn default() -> Self {
        Self {
            model: PathBuf::new(),
            train_file: PathBuf::new(),
            eval_file: None,
            output_dir: PathBuf::from("output"),
            max_steps: -1,
            num_train_epochs: 3.0,
            per_device_train_batch_size: 8,
            per_device_eval_batch_size: 8,
            gradient_accumulation_steps: 1,
            learning_rate: 5e-5,
            lr_scheduler_type: "linear".into(),
            warmup_steps: 0,
            warmup_ratio: 0.0,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            max_grad_norm: 1.0,
            optim: "adamw_torch".into(),
            save_steps: 500,
            save_total_limit: None,
            logging_steps: 10,
            eval_strategy: "no".into(),
            eval_steps: None,
            report_to: vec!["tensorboard".into(), "jsonl".into()],
            seed: 42,
            max_length: 1024,
            skip_invalid: false,
            shuffle: true,
            eval_on_start: false,
            overwrite_output_dir: false,
            bf16: false,
            fp16: false,
        }
    }
}

/// Keys of the shared arguments, for unknown-key suggestions.
pub const TRAINING_KEYS: &[&str] = &[
    "model",
    "train_file",
    "eval_file",
    "output_dir",
    "max_steps",
    "num_train_epochs",
    "per_device_train_batch_size",
    "per_device_eval_batch_size",
    "gradient_accumulation_steps",
    "learning_rate",
    "lr_scheduler_type",
    "warmup_steps",
    "warmup_ratio",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "max_grad_norm",
    "optim",
    "save_steps",
    "save_total_limit",
    "logging_steps",
    "eval_strategy",
    "evaluation_strategy",
    "eval_steps",
    "report_to",
    "seed",
    "max_length",
    "skip_invalid",
    "shuffle",
    "eval_on_start",
    "overwrite_output_dir",
    "bf16",
    "fp16",
];

/// Keys of the `[lora]` table (PEFT's LoraConfig names).
pub const LORA_KEYS: &[&str] = &[
    "r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "bias",
    "task_type",
    "modules_to_save",
    "use_rslora",
];

/// Reads a TOML config file, applies `--set` overrides, and checks every key against
/// `allowed` (top level) and the `[lora]` table's keys.
pub fn load_table(path: &Path, overrides: &[String], allowed: &[&str]) -> Result<toml::Table> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::Io {
        path: path.to_path_buf(),
        source: e,
    })?;
    let mut table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| Error::Config(format!("{}: {e}", path.display())))?;
    // transformers' old name; one spelling internally so an override replaces the file's value.
    if let Some(v) = table.remove("evaluation_strategy") {
        table.insert("eval_strategy".into(), v);
    }
    for o in overrides {
        apply_override(&mut table, o)?;
    }
    check_keys(path, &table, allowed)?;
    // Relative paths in the file are relative to the file, so a config works from any cwd.
    let base = path.parent().unwrap_or(Path::new("."));
    for key in ["model", "train_file", "eval_file", "output_dir", "ptx_file"] {
        if let Some(toml::Value::String(s)) = table.get(key) {
            let resolved = if key == "model" {
                relative_to(base, s)
            } else {
                joined_to(base, s)
            };
            table.insert(key.into(), toml::Value::String(resolved));
        }
    }
    Ok(table)
}

/// A data or output path from a config file, relative to the file's directory.
pub fn joined_to(base: &Path, s: &str) -> String {
    if s.is_empty() || Path::new(s).is_absolute() {
        return s.to_string();
    }
    base.join(s).to_string_lossy().into_owned()
}

/// A model path from a config file, relative to the file's directory. A hub-style name
/// (`org/model`) that is no directory there stays as written, so loading it gets the error
/// that says how to fetch the files.
pub fn relative_to(base: &Path, s: &str) -> String {
    let p = Path::new(s);
    if s.is_empty() || !p.is_relative() {
        return s.to_string();
    }
    let joined = base.join(p);
    if rlhf_model::model::looks_like_hub_name(s) && !joined.exists() {
        return s.to_string();
    }
    joined.to_string_lossy().into_owned()
}

/// Removes the `[lora]` table from a config table and parses it (PEFT's LoraConfig names).
pub fn take_lora(
    path: &Path,
    table: &mut toml::Table,
) -> Result<Option<rlhf_model::lora::LoraConfig>> {
    match table.remove("lora") {
        Some(v) => Ok(Some(parse(
            path,
            v.as_table().cloned().unwrap_or_default(),
        )?)),
        None => Ok(None),
    }
}

/// Moves a trainer's own `keys` out of a config table into a table of their own.
pub fn take_keys(table: &mut toml::Table, keys: &[&str]) -> toml::Table {
    keys.iter()
        .filter_map(|k| table.remove(*k).map(|v| ((*k).to_string(), v)))
        .collect()
}

/// Parses `key=value` (value as TOML, bare words as strings) into the table.
pub fn apply_override(table: &mut toml::Table, o: &str) -> Result<()> {
    let (key, raw) = o
        .split_once('=')
        .ok_or_else(|| Error::Config(format!("--set {o:?}: expected key=value")))?;
    let value: toml::Value = format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let key = match key.trim() {
        "evaluation_strategy" => "eval_strategy",
        k => k,
    };
    let mut parts: Vec<&str> = key.split('.').collect();
    let last = parts.pop().unwrap_or_default();
    let mut t = table;
    for p in parts {
        t = t
            .entry(p)
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .ok_or_else(|| Error::Config(format!("--set {o:?}: {p} is not a table")))?;
    }
    t.insert(last.to_string(), value);
    Ok(())
}

fn check_keys(path: &Path, table: &toml::Table, allowed: &[&str]) -> Result<()> {
    for (k, v) in table {
        if k == "lora" {
            let t = v.as_table().ok_or_else(|| {
                Error::Config(format!(
                    "{}: `lora` must be a table ([lora])",
                    path.display()
                ))
            })?;
            for lk in t.keys() {
                if !LORA_KEYS.contains(&lk.as_str()) {
                    return Err(unknown(path, &format!("lora.{lk}"), lk, LORA_KEYS));
                }
            }
        } else if !allowed.contains(&k.as_str()) {
            return Err(unknown(path, k, k, allowed));
        }
    }
    Ok(())
}

fn unknown(path: &Path, shown: &str, key: &str, allowed: &[&str]) -> Error {
    let best = allowed
        .iter()
        .min_by_key(|a| edit_distance(key, a))
        .copied()
        .unwrap_or("");
    Error::Config(format!(
        "{}: unknown key `{shown}`; did you mean `{best}`?",
        path.display()
    ))
}

/// Levenshtein distance (keys are short; the quadratic table is fine).
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for i in 1..=a.len() {
        let mut cur = vec![i; b.len() + 1];
        for j in 1..=b.len() {
            let sub = prev[j - 1] + (a[i - 1] != b[j - 1]) as usize;
            cur[j] = sub.min(prev[j] + 1).min(cur[j - 1] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Deserialises a checked table into a config type, naming the key on type errors.
pub fn parse<T: serde::de::DeserializeOwned>(path: &Path, table: toml::Table) -> Result<T> {
    T::deserialize(toml::Value::Table(table))
        .map_err(|e| Error::Config(format!("{}: {e}", path.display())))
}

/// Range and finiteness checks of numeric config values, with one message shape naming the
/// file and the key: `FILE: "key" must be WHAT, found VALUE`.
pub struct Knobs<'a> {
    path: &'a Path,
}

impl<'a> Knobs<'a> {
    /// Checks of the values read from `path`.
    pub fn new(path: &'a Path) -> Self {
        Self { path }
    }

    /// The error for `key`: it must be `what`, and is `found`.
    pub fn error(&self, key: &str, what: &str, found: impl std::fmt::Display) -> Error {
        Error::Config(format!(
            "{}: \"{key}\" must be {what}, found {found}",
            self.path.display()
        ))
    }

    fn ensure(&self, ok: bool, key: &str, what: &str, v: impl std::fmt::Display) -> Result<()> {
        if ok {
            Ok(())
        } else {
            Err(self.error(key, what, v))
        }
    }

    /// A finite number > 0.
    pub fn positive(&self, key: &str, v: f64) -> Result<()> {
        self.ensure(v.is_finite() && v > 0.0, key, "a finite number > 0", v)
    }

    /// A finite number >= 0.
    pub fn non_negative(&self, key: &str, v: f64) -> Result<()> {
        self.ensure(v.is_finite() && v >= 0.0, key, "a finite number >= 0", v)
    }

    /// A finite number.
    pub fn finite(&self, key: &str, v: f64) -> Result<()> {
        self.ensure(v.is_finite(), key, "a finite number", v)
    }

    /// A number in [lo, hi].
    pub fn closed(&self, key: &str, v: f64, lo: f64, hi: f64) -> Result<()> {
        let what = format!("a number in [{lo}, {hi}]");
        self.ensure(v >= lo && v <= hi, key, &what, v)
    }

    /// A number in [lo, hi).
    pub fn half_open(&self, key: &str, v: f64, lo: f64, hi: f64) -> Result<()> {
        let what = format!("a number in [{lo}, {hi})");
        self.ensure(v >= lo && v < hi, key, &what, v)
    }

    /// A number in (lo, hi].
    pub fn open_closed(&self, key: &str, v: f64, lo: f64, hi: f64) -> Result<()> {
        let what = format!("a number in ({lo}, {hi}]");
        self.ensure(v > lo && v <= hi, key, &what, v)
    }

    /// An integer >= `min`.
    pub fn at_least(&self, key: &str, v: usize, min: usize) -> Result<()> {
        let what = format!("an integer >= {min}");
        self.ensure(v >= min, key, &what, v)
    }
}

impl TrainingArgs {
    /// Checks values that serde cannot: numbers in range and finite (naming `path`, the config
    /// file, and the key), known names, a model path.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if self.model.as_os_str().is_empty() {
            return bad("`model` is required: a model directory".into());
        }
        if self.train_file.as_os_str().is_empty() {
            return bad("`train_file` is required".into());
        }
        let k = Knobs::new(path);
        if !(self.max_steps == -1 || self.max_steps >= 1) {
            return Err(k.error("max_steps", "-1 or an integer >= 1", self.max_steps));
        }
        k.positive("num_train_epochs", self.num_train_epochs)?;
        k.at_least(
            "per_device_train_batch_size",
            self.per_device_train_batch_size,
            1,
        )?;
        k.at_least(
            "per_device_eval_batch_size",
            self.per_device_eval_batch_size,
            1,
        )?;
        k.at_least(
            "gradient_accumulation_steps",
            self.gradient_accumulation_steps,
            1,
        )?;
        k.non_negative("learning_rate", self.learning_rate)?;
        k.closed("warmup_ratio", self.warmup_ratio, 0.0, 1.0)?;
        k.non_negative("weight_decay", self.weight_decay)?;
        k.half_open("adam_beta1", self.adam_beta1, 0.0, 1.0)?;
        k.half_open("adam_beta2", self.adam_beta2, 0.0, 1.0)?;
        k.non_negative("adam_epsilon", self.adam_epsilon)?;
        k.non_negative("max_grad_norm", self.max_grad_norm)?;
        if let Some(n) = self.save_total_limit {
            k.at_least("save_total_limit", n, 1)?;
        }
        k.at_least("logging_steps", self.logging_steps, 1)?;
        if let Some(n) = self.eval_steps {
            k.at_least("eval_steps", n, 1)?;
        }
        k.at_least("max_length", self.max_length, 1)?;
        if !matches!(
            self.optim.as_str(),
            "adamw_torch" | "adamw" | "adamw_torch_fused"
        ) {
            return bad(format!(
                "optim = {:?}: only adamw_torch is implemented",
                self.optim
            ));
        }
        if self.fp16 {
            return bad(format!(
                "{}: fp16 = true: fp16 mixed precision needs a GPU (transformers refuses it on a \
                 CPU too); use bf16 = true",
                path.display()
            ));
        }
        if !matches!(self.eval_strategy.as_str(), "no" | "steps" | "epoch") {
            return bad(format!(
                "eval_strategy = {:?}: use \"no\", \"steps\" or \"epoch\"",
                self.eval_strategy
            ));
        }
        if self.eval_strategy != "no" && self.eval_file.is_none() {
            // Evaluation needs data; say which key is missing rather than skipping silently.
            return bad(format!(
                "eval_strategy = {:?} needs an `eval_file`",
                self.eval_strategy
            ));
        }
        for r in &self.report_to {
            if !matches!(r.as_str(), "tensorboard" | "jsonl" | "all" | "none") {
                return bad(format!(
                    "report_to {r:?}: use \"tensorboard\", \"jsonl\", \"all\" or \"none\""
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_name_the_closest_valid_one() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "model = \"m\"\nlearning_rte = 1e-4\n").unwrap();
        let err = load_table(&p, &[], TRAINING_KEYS).unwrap_err().to_string();
        assert!(
            err.contains("`learning_rte`") && err.contains("`learning_rate`"),
            "{err}"
        );
        std::fs::write(&p, "[lora]\nrank = 4\n").unwrap();
        let err = load_table(&p, &[], TRAINING_KEYS).unwrap_err().to_string();
        assert!(err.contains("`lora.rank`") && err.contains("`r`"), "{err}");
    }

    #[test]
    fn overrides_and_aliases_apply() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "model = \"m\"\ntrain_file = \"t.jsonl\"\nevaluation_strategy = \"steps\"\n[lora]\nr = 16\n").unwrap();
        let t = load_table(
            &p,
            &[
                "learning_rate=1e-3".into(),
                "lora.r=8".into(),
                "optim=adamw".into(),
            ],
            TRAINING_KEYS,
        )
        .unwrap();
        assert_eq!(t["lora"]["r"].as_integer(), Some(8));
        assert_eq!(
            t["model"].as_str().unwrap(),
            dir.path().join("m").to_str().unwrap()
        );
        let mut t2 = t.clone();
        t2.remove("lora");
        let args: TrainingArgs = parse(&p, t2).unwrap();
        assert_eq!(args.learning_rate, 1e-3);
        assert_eq!(args.eval_strategy, "steps");
        assert_eq!(args.optim, "adamw");
    }
}
