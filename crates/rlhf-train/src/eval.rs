//! `rlhf eval`: does the policy answer held-out prompts better than a baseline?
//!
//! 1. **generate**: greedy (or sampled) completions of the policy and of the baseline (another
//!    model, or a file of reference outputs) for the held-out prompts, kept in
//!    `generations.jsonl` so a judge that fails loses no generation (a rerun with the same
//!    settings reads them back);
//! 2. **judge**: each judge is a scorer (a reward model, Llama 2's pair, a reward program, or
//!    their weighted sum) that scores both answers, or a pairwise LLM judge asked in both
//!    orders (a win only when both orders agree);
//! 3. **report**: AlpacaEval's columns per judge (`win_rate` with ties as half,
//!    `standard_error`, `n_wins`, `n_wins_base`, `n_draws`, `n_total`, `avg_length`,
//!    `length_controlled_winrate`), Llama 2's win rate (ties dropped), the mean and median
//!    score of each side, and KL(policy ‖ reference) on the same prompts (k1 and k3 over
//!    completions sampled from the policy at temperature 1);
//! 4. `eval.json`: all of it and every row (both answers, every score and verdict).
//!
//! [`gold_proxy`] runs the same generation and scorers over each saved checkpoint of a run:
//! the proxy (the reward model the policy was trained against) and a gold judge against KL,
//! as Gao et al. (2022) plot reward-model over-optimisation.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use rlhf_data::PromptRecord;
use rlhf_model::model::SourceCache;
use rlhf_model::tokenizer::Tokenizer;
use rlhf_model::{Heads, LoadOptions, Model};
use serde::{Deserialize, Serialize};

use crate::judge::{PairwiseJudge, PairwiseJudgeApi};
use crate::rollout::{self, Decoder, Sampling};
use crate::scoring::{Completions, Scorer, ScorerSpec};
use crate::stats::{self, Verdict, WinRates};
use crate::trainer::mix;
use crate::{Error, Result};

/// One judge of `[judges.NAME]`: a scorer (the reward keys PPO takes) or a pairwise LLM.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JudgeSpec {
    /// Scores each answer: `reward_model`, `reward_models` + `llama2`, `reward_program`,
    /// `reward_weights`, `reward_program_timeout`, as in PPO's config.
    pub scorer: ScorerSpec,
    /// A local model that compares two answers (`{prompt}`, `{response_1}`, `{response_2}`
    /// in `judge_template`; the default asks which is better and reads "1" or "2").
    pub judge_model: Option<PathBuf>,
    /// The pairwise judge's prompt template.
    pub judge_template: Option<String>,
}

/// `rlhf eval`'s settings (TOML, or flags).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct EvalConfig {
    /// The policy: an HF directory or a PEFT adapter directory (merged into its base).
    pub model: PathBuf,
    /// The baseline model (often the SFT policy PPO started from).
    pub baseline_model: Option<PathBuf>,
    /// Or the baseline's answers: JSONL rows `{"prompt", "completion"}` matched by prompt.
    pub baseline_file: Option<PathBuf>,
    /// Held-out prompts: `{"prompt"}` or `{"messages"}` rows.
    pub eval_file: PathBuf,
    /// Where eval.json and generations.jsonl go.
    pub output_dir: PathBuf,
    /// Prompts to use (the first N; 0: all).
    pub num_prompts: usize,
    /// New tokens per answer at most.
    pub max_new_tokens: usize,
    /// 0 is greedy.
    pub temperature: f64,
    /// Top-k filtering when sampling (0: none).
    pub top_k: usize,
    /// Top-p filtering when sampling (1.0: none).
    pub top_p: f64,
    /// Prompt + answer tokens at most; longer prompts keep their last tokens.
    pub max_length: usize,
    /// Prompts per generation batch and per scoring batch.
    pub per_device_eval_batch_size: usize,
    /// Seed of sampled answers and of the KL samples.
    pub seed: u64,
    /// The reference of KL(policy ‖ reference) (default: `baseline_model`).
    pub kl_reference: Option<PathBuf>,
    /// Completions sampled per prompt at temperature 1 for the KL estimates (0: no KL).
    pub kl_samples: usize,
    /// Scores closer than this are a tie.
    pub tie_tolerance: f64,
    /// The judges, by name (`[judges.NAME]` tables, read by [`EvalConfig::from_table`]).
    #[serde(skip)]
    pub judges: BTreeMap<String, JudgeSpec>,
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self {
            model: PathBuf::new(),
            baseline_model: None,
            baseline_file: None,
            eval_file: PathBuf::new(),
            output_dir: PathBuf::from("eval"),
            num_prompts: 0,
            max_new_tokens: 64,
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            max_length: 512,
            per_device_eval_batch_size: 16,
            seed: 42,
            kl_reference: None,
            kl_samples: 2,
            tie_tolerance: 0.0,
            judges: BTreeMap::new(),
        }
    }
}

const PATH_KEYS: [&str; 6] = [
    "model",
    "baseline_model",
    "baseline_file",
    "eval_file",
    "output_dir",
    "kl_reference",
];

impl EvalConfig {
    /// Reads `path` with `--set key=value` overrides; relative paths resolve against the
    /// file's directory (a judge's too).
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let mut table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| Error::Config(format!("{}: {e}", path.display())))?;
        for o in overrides {
            crate::config::apply_override(&mut table, o)?;
        }
        let base = path.parent().unwrap_or(Path::new("."));
        Self::from_table(path, base, table)
    }

    /// Builds the config from a table whose relative paths are relative to `base`.
    pub fn from_table(path: &Path, base: &Path, mut table: toml::Table) -> Result<Self> {
        for (k, v) in table.iter_mut() {
            if PATH_KEYS.contains(&k.as_str()) {
                if let toml::Value::String(s) = v {
                    *s = crate::config::relative_to(base, s);
                }
            }
        }
        let judges = match table.remove("judges") {
            Some(toml::Value::Table(t)) => t,
            Some(_) => {
                return Err(Error::Config(format!(
                    "{}: `judges` must be a table of [judges.NAME] tables",
                    path.display()
                )))
            }
            None => toml::Table::new(),
        };
        let mut cfg: Self = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| Error::Config(format!("{}: {e}", path.display())))?;
        for (name, j) in judges {
            let toml::Value::Table(mut j) = j else {
                return Err(Error::Config(format!(
                    "{}: `judges.{name}` must be a table",
                    path.display()
                )));
            };
            crate::scoring::resolve_scorer_paths(base, &mut j);
            let mut take = |k: &str| match j.remove(k) {
                Some(toml::Value::String(s)) => Ok(Some(s)),
                None => Ok(None),
                Some(v) => Err(Error::Config(format!(
                    "{}: judges.{name}.{k} = {v}: expected a string",
                    path.display()
                ))),
            };
            let judge_model =
                take("judge_model")?.map(|s| PathBuf::from(crate::config::relative_to(base, &s)));
            let judge_template = take("judge_template")?;
            let scorer: ScorerSpec =
                toml::Value::Table(j)
                    .try_into()
                    .map_err(|e: toml::de::Error| {
                        Error::Config(format!(
                            "{}: [judges.{name}]: {e} (a judge takes reward_model, reward_models, \
                         llama2, reward_program, reward_weights, reward_program_timeout, or \
                         judge_model and judge_template)",
                            path.display()
                        ))
                    })?;
            cfg.judges.insert(
                name,
                JudgeSpec {
                    scorer,
                    judge_model,
                    judge_template,
                },
            );
        }
        Ok(cfg)
    }

    /// Checks that the settings make an evaluation ([`run`] checks too).
    pub fn check(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(format!("rlhf eval: {m}")));
        if self.model.as_os_str().is_empty() {
            return bad("`model` (the policy to evaluate) is required".into());
        }
        if self.eval_file.as_os_str().is_empty() {
            return bad("`eval_file` (held-out prompts) is required".into());
        }
        if self.baseline_model.is_some() == self.baseline_file.is_some() {
            return bad("give one baseline: `baseline_model` or `baseline_file`".into());
        }
        if self.judges.is_empty() {
            return bad(
                "no judge: add e.g. [judges.gold] reward_program = [\"python3\", \"judge.py\"] \
                 or [judges.proxy] reward_model = \"runs/reward\""
                    .into(),
            );
        }
        for (name, j) in &self.judges {
            let has_scorer = !j.scorer.sources().is_empty();
            if j.judge_model.is_some() == has_scorer {
                return bad(format!(
                    "[judges.{name}]: give a scorer (reward_model, reward_models or \
                     reward_program) or a pairwise `judge_model`, not both and not neither"
                ));
            }
        }
        // The one message shape of config checks: "key" must be WHAT, found VALUE.
        for (key, v) in [
            ("max_new_tokens", self.max_new_tokens),
            (
                "per_device_eval_batch_size",
                self.per_device_eval_batch_size,
            ),
        ] {
            if v == 0 {
                return bad(format!("\"{key}\" must be at least 1, found 0"));
            }
        }
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return bad(format!(
                "\"temperature\" must be a finite number >= 0 (0 is greedy), found {}",
                self.temperature
            ));
        }
        if !(0.0 < self.top_p && self.top_p <= 1.0) {
            return bad(format!(
                "\"top_p\" must be a number in (0, 1], found {}",
                self.top_p
            ));
        }
        if !(self.tie_tolerance.is_finite() && self.tie_tolerance >= 0.0) {
            return bad(format!(
                "\"tie_tolerance\" must be a finite number >= 0, found {}",
                self.tie_tolerance
            ));
        }
        Ok(())
    }

    fn kl_reference(&self) -> Option<&Path> {
        self.kl_reference
            .as_deref()
            .or(self.baseline_model.as_deref())
    }

    fn sampling(&self) -> Sampling {
        Sampling {
            max_new_tokens: self.max_new_tokens,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
        }
    }
}

/// The answers of one side (policy or baseline) to every prompt.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Answers {
    /// Where they came from (a model directory or a file).
    pub source: String,
    /// The decoded answer per prompt.
    pub texts: Vec<String>,
    /// The answer's token ids (the policy's tokenizer for a file).
    pub ids: Vec<Vec<u32>>,
}

/// One judge's summary: AlpacaEval's columns, Llama 2's win rate and, for scorers, the mean
/// and median score of each side.
#[derive(Debug, Clone, Serialize)]
pub struct JudgeSummary {
    /// "scorer" or "pairwise".
    pub kind: String,
    /// Mean score of the policy's answers (scorers).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy_mean: Option<f64>,
    /// Median score of the policy's answers (scorers).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy_median: Option<f64>,
    /// Mean score of the baseline's answers (scorers).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baseline_mean: Option<f64>,
    /// Median score of the baseline's answers (scorers).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baseline_median: Option<f64>,
    /// Win rates.
    #[serde(flatten)]
    pub rates: WinRates,
}

/// KL(policy ‖ reference) on the held-out prompts.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct KlSummary {
    /// Mean over sampled completions of Σ_t log π − log π_ref.
    pub k1: f64,
    /// Mean over sampled completions of Σ_t (r − 1 − log r), r = π_ref / π.
    pub k3: f64,
    /// Completions sampled.
    pub samples: usize,
}

/// What `eval.json` holds.
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    /// The policy evaluated.
    pub policy: String,
    /// The baseline.
    pub baseline: String,
    /// Prompts judged.
    pub n_prompts: usize,
    /// Per judge.
    pub judges: BTreeMap<String, JudgeSummary>,
    /// KL to the reference, when one is known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kl: Option<KlSummary>,
    /// Every prompt with both answers, their scores and verdicts.
    pub rows: Vec<serde_json::Value>,
}

/// The prompts, tokenised for `tok`, truncated to leave room for the answers.
fn prompts_for(cfg: &EvalConfig, tok: &Tokenizer) -> Result<(Vec<PromptRecord>, Vec<Vec<u32>>)> {
    let max_prompt = cfg.max_length.saturating_sub(cfg.max_new_tokens).max(1);
    let (mut records, mut ids) = rollout::load_prompts(&cfg.eval_file, tok, false, max_prompt)?;
    if cfg.num_prompts > 0 {
        records.truncate(cfg.num_prompts);
        ids.truncate(cfg.num_prompts);
    }
    if records.is_empty() {
        return Err(Error::Config(format!(
            "{}: no prompts",
            cfg.eval_file.display()
        )));
    }
    Ok((records, ids))
}

/// The tokenizer of a model directory, or of the base an adapter directory names.
fn tokenizer_of(dir: &Path, model: &Model) -> Result<Tokenizer> {
    if dir.join("tokenizer.json").is_file() {
        Ok(Tokenizer::from_dir(dir)?)
    } else {
        Ok(Tokenizer::from_dir(model.dir())?)
    }
}

fn load_lm(dir: &Path, cache: &mut SourceCache) -> Result<(Model, Tokenizer)> {
    let model = Model::load_cached(
        dir,
        &LoadOptions {
            heads: Heads::Lm,
            ..Default::default()
        },
        cache,
    )?;
    let tok = tokenizer_of(dir, &model)?;
    Ok((model, tok))
}

/// A model's answers to `prompt_ids` (its own tokenizer's ids of the same prompts).
fn answers_of(
    cfg: &EvalConfig,
    dir: &Path,
    model: &Model,
    tok: &Tokenizer,
    prompt_ids: &[Vec<u32>],
) -> Result<Answers> {
    let eos = rlhf_model::generate::eos_ids(model, tok);
    let pad = rlhf_data::pad_id(tok)?;
    let gen = cfg.sampling().config(&eos, pad, cfg.seed);
    let gens = rollout::generate_batched(
        model,
        prompt_ids,
        &gen,
        cfg.per_device_eval_batch_size,
        |k| mix(cfg.seed, 0, k as u64),
    )?;
    let ids: Vec<Vec<u32>> = gens.into_iter().map(|g| g.completion_ids).collect();
    Ok(Answers {
        source: dir.display().to_string(),
        texts: Decoder::new(tok, &eos).texts(&ids)?,
        ids,
    })
}

/// KL(policy ‖ reference) from `cfg.kl_samples` completions per prompt sampled from the
/// policy at temperature 1 (no top-k/top-p: the estimators need samples of π itself).
fn kl_of(
    cfg: &EvalConfig,
    policy: &Model,
    tok: &Tokenizer,
    prompt_ids: &[Vec<u32>],
    reference: &Model,
) -> Result<KlSummary> {
    let eos = rlhf_model::generate::eos_ids(policy, tok);
    let pad = rlhf_data::pad_id(tok)?;
    let gen = Sampling {
        temperature: 1.0,
        top_k: 0,
        top_p: 1.0,
        ..cfg.sampling()
    }
    .config(&eos, pad, cfg.seed);
    let prompts: Vec<Vec<u32>> = prompt_ids
        .iter()
        .flat_map(|p| std::iter::repeat_n(p.clone(), cfg.kl_samples))
        .collect();
    let gens = rollout::generate_batched(
        policy,
        &prompts,
        &gen,
        cfg.per_device_eval_batch_size,
        |k| mix(cfg.seed, 1, k as u64),
    )?;
    let responses: Vec<Vec<u32>> = gens.iter().map(|g| g.completion_ids.clone()).collect();
    let logprobs: Vec<Vec<f32>> = gens.into_iter().map(|g| g.logprobs).collect();
    let ref_logprobs = rollout::response_logprobs_no_grad(
        reference,
        false,
        &prompts,
        &responses,
        1.0,
        pad,
        cfg.per_device_eval_batch_size,
    )?;
    let (k1, k3) = stats::kl_estimates(&logprobs, &ref_logprobs);
    Ok(KlSummary {
        k1,
        k3,
        samples: prompts.len(),
    })
}

/// The baseline's answers read from a file, matched to the prompts by prompt.
fn answers_from_file(path: &Path, records: &[PromptRecord], tok: &Tokenizer) -> Result<Answers> {
    let rows = rlhf_data::read_rows(path)?;
    let mut by_prompt: BTreeMap<String, String> = BTreeMap::new();
    for row in &rows {
        let at = &row.at;
        let prompt = row.fields.get("prompt").ok_or_else(|| {
            Error::Config(format!(
                "{at}: no \"prompt\"; baseline rows look like {{\"prompt\": \"...\", \
                 \"completion\": \"...\"}}"
            ))
        })?;
        let completion = row
            .fields
            .get("completion")
            .and_then(|c| c.as_str())
            .ok_or_else(|| {
                Error::Config(format!(
                    "{at}: no \"completion\" string; baseline rows look like \
                     {{\"prompt\": \"...\", \"completion\": \"...\"}}"
                ))
            })?;
        by_prompt.insert(prompt_key(prompt), completion.to_string());
    }
    let mut texts = Vec::with_capacity(records.len());
    for r in records {
        let key = prompt_key(&prompt_value(r));
        let text = by_prompt.get(&key).ok_or_else(|| {
            Error::Config(format!(
                "{}: no answer for the prompt of {} ({})",
                path.display(),
                r.at,
                clip(&key, 60)
            ))
        })?;
        texts.push(text.clone());
    }
    let ids = texts
        .iter()
        .map(|t| Ok(tok.encode(t, false)?))
        .collect::<Result<_>>()?;
    Ok(Answers {
        source: path.display().to_string(),
        texts,
        ids,
    })
}

/// The row's prompt as given: its "prompt" (text or turns) or its "messages".
fn prompt_value(r: &PromptRecord) -> serde_json::Value {
    r.row
        .get("prompt")
        .or_else(|| r.row.get("messages"))
        .cloned()
        .unwrap_or_default()
}

fn prompt_key(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn clip(s: &str, n: usize) -> String {
    if s.chars().count() > n {
        format!("{}…", s.chars().take(n).collect::<String>())
    } else {
        s.to_string()
    }
}

/// Generations are kept beside eval.json, keyed by what made them, so a rerun after a judge
/// failed (or with another judge) generates nothing twice.
#[derive(Serialize, Deserialize)]
struct Cached {
    key: serde_json::Value,
    policy: Answers,
    baseline: Answers,
    kl: Option<KlSummary>,
}

fn cache_key(cfg: &EvalConfig) -> serde_json::Value {
    serde_json::json!({
        "model": cfg.model, "baseline_model": cfg.baseline_model,
        "baseline_file": cfg.baseline_file, "eval_file": cfg.eval_file,
        "num_prompts": cfg.num_prompts, "max_new_tokens": cfg.max_new_tokens,
        "temperature": cfg.temperature, "top_k": cfg.top_k, "top_p": cfg.top_p,
        "max_length": cfg.max_length, "seed": cfg.seed,
        "kl_reference": cfg.kl_reference(), "kl_samples": cfg.kl_samples,
    })
}

fn load_scorer(
    spec: &ScorerSpec,
    batch: usize,
    cache: &mut SourceCache,
) -> Result<Box<dyn Scorer>> {
    let spec = ScorerSpec {
        batch_size: batch,
        ..spec.clone()
    };
    spec.load(cache)
}

/// Scores of both sides by one scorer judge.
fn score_both(
    scorer: &mut dyn Scorer,
    records: &[PromptRecord],
    sides: [&Answers; 2],
    batch: usize,
) -> Result<[Vec<f32>; 2]> {
    let mut out: [Vec<f32>; 2] = [Vec::new(), Vec::new()];
    for (side, answers) in sides.iter().enumerate() {
        for start in (0..records.len()).step_by(batch) {
            let end = (start + batch).min(records.len());
            let prompts: Vec<&PromptRecord> = records[start..end].iter().collect();
            let mut extra = Vec::new();
            let s = scorer.score(
                &Completions {
                    prompts: &prompts,
                    texts: &answers.texts[start..end],
                    ids: &answers.ids[start..end],
                    // Each side's ids are in its own tokenizer: scorers read the text.
                    source: None,
                },
                &mut extra,
            )?;
            out[side].extend(s);
        }
    }
    Ok(out)
}

/// Runs the evaluation and writes `eval.json`; returns the report.
pub fn run(cfg: &EvalConfig) -> Result<EvalReport> {
    cfg.check()?;
    let started = Instant::now();
    std::fs::create_dir_all(&cfg.output_dir).map_err(|e| Error::io(&cfg.output_dir, e))?;
    let mut cache = SourceCache::default();
    let gen_path = cfg.output_dir.join("generations.json");
    let key = cache_key(cfg);
    let cached: Option<Cached> = std::fs::read_to_string(&gen_path)
        .ok()
        .and_then(|t| serde_json::from_str::<Cached>(&t).ok())
        .filter(|c| c.key == key);

    // 1. Generate (or read back) both sides' answers, and sample for the KL estimate.
    let (policy_model, tok) = load_lm(&cfg.model, &mut cache)?;
    let (records, prompt_ids) = prompts_for(cfg, &tok)?;
    let generated = match cached {
        Some(c) if c.policy.texts.len() == records.len() => {
            tracing::info!("{}: answers read back", gen_path.display());
            c
        }
        _ => {
            tracing::info!(
                "generating the policy's answers to {} prompts",
                records.len()
            );
            let policy = answers_of(cfg, &cfg.model, &policy_model, &tok, &prompt_ids)?;
            let kl_ref = cfg.kl_reference().map(Path::to_path_buf);
            let mut kl = None;
            let baseline = match (&cfg.baseline_model, &cfg.baseline_file) {
                (Some(dir), _) => {
                    let (m, btok) = load_lm(dir, &mut cache)?;
                    let (_, bids) = prompts_for(cfg, &btok)?;
                    tracing::info!("generating the baseline's answers");
                    let a = answers_of(cfg, dir, &m, &btok, &bids)?;
                    if cfg.kl_samples > 0 && kl_ref.as_deref() == Some(dir.as_path()) {
                        kl = Some(kl_of(cfg, &policy_model, &tok, &prompt_ids, &m)?);
                    }
                    a
                }
                (None, Some(file)) => answers_from_file(file, &records, &tok)?,
                (None, None) => unreachable!("check() requires a baseline"),
            };
            if kl.is_none() && cfg.kl_samples > 0 {
                if let Some(r) = &kl_ref {
                    let (m, _) = load_lm(r, &mut cache)?;
                    kl = Some(kl_of(cfg, &policy_model, &tok, &prompt_ids, &m)?);
                }
            }
            let c = Cached {
                key,
                policy,
                baseline,
                kl,
            };
            let text = serde_json::to_vec(&c).map_err(|e| Error::Config(e.to_string()))?;
            rlhf_model::save::write_atomic(&gen_path, &text)?;
            c
        }
    };
    drop(policy_model);
    let (policy, baseline) = (&generated.policy, &generated.baseline);

    // 2. Judge.
    let mut rows: Vec<serde_json::Map<String, serde_json::Value>> = records
        .iter()
        .zip(policy.texts.iter().zip(&baseline.texts))
        .map(|(r, (p, b))| {
            let mut m = serde_json::Map::new();
            m.insert("prompt".into(), prompt_value(r));
            m.insert("policy".into(), p.clone().into());
            m.insert("baseline".into(), b.clone().into());
            m.insert("scores".into(), serde_json::json!({}));
            m.insert("verdicts".into(), serde_json::json!({}));
            m
        })
        .collect();
    let policy_lens: Vec<usize> = policy.texts.iter().map(|t| t.chars().count()).collect();
    let baseline_lens: Vec<usize> = baseline.texts.iter().map(|t| t.chars().count()).collect();
    let mut judges = BTreeMap::new();
    for (name, spec) in &cfg.judges {
        tracing::info!("judging with {name}");
        let summary = if let Some(dir) = &spec.judge_model {
            let judge = PairwiseJudge::load(dir, spec.judge_template.clone())?;
            let prompts: Vec<String> = records.iter().map(prompt_text).collect();
            let asks: Vec<(&str, &str, &str)> = prompts
                .iter()
                .zip(policy.texts.iter().zip(&baseline.texts))
                .map(|(p, (a, b))| (p.as_str(), a.as_str(), b.as_str()))
                .collect();
            let mut verdicts = Vec::with_capacity(rows.len());
            for (chunk, rows) in asks
                .chunks(cfg.per_device_eval_batch_size)
                .zip(rows.chunks_mut(cfg.per_device_eval_batch_size))
            {
                for (j, row) in judge.judge_batch(chunk)?.into_iter().zip(rows) {
                    row["verdicts"][name] = serde_json::to_value(j.verdict).unwrap_or_default();
                    row["scores"][name] = serde_json::json!({
                        "p_policy_shown_first": j.p_policy_shown_first,
                        "p_policy_shown_second": j.p_policy_shown_second,
                    });
                    verdicts.push(j.verdict);
                }
            }
            JudgeSummary {
                kind: "pairwise".into(),
                policy_mean: None,
                policy_median: None,
                baseline_mean: None,
                baseline_median: None,
                rates: stats::win_rates(&verdicts, &policy_lens, &baseline_lens),
            }
        } else {
            let mut scorer = load_scorer(&spec.scorer, cfg.per_device_eval_batch_size, &mut cache)?;
            let [ps, bs] = score_both(
                scorer.as_mut(),
                &records,
                [policy, baseline],
                cfg.per_device_eval_batch_size,
            )?;
            let verdicts: Vec<Verdict> = ps
                .iter()
                .zip(&bs)
                .map(|(&p, &b)| stats::verdict_from_scores(p as f64, b as f64, cfg.tie_tolerance))
                .collect();
            for (i, row) in rows.iter_mut().enumerate() {
                row["scores"][name] = serde_json::json!({"policy": ps[i], "baseline": bs[i]});
                row["verdicts"][name] = serde_json::to_value(verdicts[i]).unwrap_or_default();
            }
            let f = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<f64>>();
            let (pm, pmed) = stats::mean_median(&f(&ps));
            let (bm, bmed) = stats::mean_median(&f(&bs));
            JudgeSummary {
                kind: "scorer".into(),
                policy_mean: Some(pm),
                policy_median: Some(pmed),
                baseline_mean: Some(bm),
                baseline_median: Some(bmed),
                rates: stats::win_rates(&verdicts, &policy_lens, &baseline_lens),
            }
        };
        judges.insert(name.clone(), summary);
    }

    // 3. Report.
    let report = EvalReport {
        policy: policy.source.clone(),
        baseline: baseline.source.clone(),
        n_prompts: records.len(),
        judges,
        kl: generated.kl,
        rows: rows.into_iter().map(serde_json::Value::Object).collect(),
    };
    let path = cfg.output_dir.join("eval.json");
    let text = serde_json::to_vec_pretty(&report).map_err(|e| Error::Config(e.to_string()))?;
    rlhf_model::save::write_atomic(&path, &text)?;
    tracing::info!(
        "eval of {} prompts in {:.1}s: {}",
        report.n_prompts,
        started.elapsed().as_secs_f64(),
        path.display()
    );
    Ok(report)
}

/// The prompt as text for a pairwise judge (a conversation's last user turn).
fn prompt_text(r: &PromptRecord) -> String {
    match prompt_value(r) {
        serde_json::Value::String(s) => s,
        serde_json::Value::Array(turns) => turns
            .iter()
            .rev()
            .find(|t| t["role"] == "user")
            .and_then(|t| t["content"].as_str())
            .unwrap_or_default()
            .to_string(),
        other => other.to_string(),
    }
}

/// The summary table a person reads (also printed by `rlhf eval`).
pub fn table(report: &EvalReport) -> String {
    let mut out = format!(
        "{} prompts; policy {} vs baseline {}\n",
        report.n_prompts, report.policy, report.baseline
    );
    out.push_str(&format!(
        "{:<14} {:>8} {:>8} {:>8} {:>6} {:>6} {:>6} {:>8} {:>10} {:>10}\n",
        "judge",
        "win_rate",
        "lc_win",
        "llama2",
        "wins",
        "losses",
        "draws",
        "se",
        "policy",
        "baseline"
    ));
    for (name, j) in &report.judges {
        let r = &j.rates;
        let num = |v: Option<f64>| v.map_or("-".to_string(), |x| format!("{x:.3}"));
        out.push_str(&format!(
            "{:<14} {:>8.3} {:>8.3} {:>8} {:>6} {:>6} {:>6} {:>8.3} {:>10} {:>10}\n",
            name,
            r.win_rate,
            r.length_controlled_winrate,
            num(r.llama2_win_rate),
            r.n_wins,
            r.n_wins_base,
            r.n_draws,
            r.standard_error,
            num(j.policy_mean),
            num(j.baseline_mean),
        ));
    }
    if let Some(kl) = &report.kl {
        out.push_str(&format!(
            "KL(policy || reference): k1 {:.3}, k3 {:.3} nats per answer ({} samples)\n",
            kl.k1, kl.k3, kl.samples
        ));
    }
    out
}

/// One point of the gold-and-proxy curve.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GoldProxyRow {
    /// The checkpoint directory's name (`checkpoint-N`, or the run's final output).
    pub checkpoint: String,
    /// Its training step.
    pub step: usize,
    /// KL to the reference, k1.
    pub kl_k1: f64,
    /// KL to the reference, k3.
    pub kl_k3: f64,
    /// Mean proxy score of its greedy answers.
    pub proxy: f64,
    /// Mean gold score of its greedy answers.
    pub gold: f64,
}

/// The proxy (`proxy` judge) and gold (`gold` judge) mean scores and KL to the reference of
/// each `(step, policy directory)`, written to `output_dir/gold_proxy.jsonl`.
pub fn gold_proxy(
    cfg: &EvalConfig,
    policies: &[(usize, PathBuf)],
    proxy: &str,
    gold: &str,
) -> Result<Vec<GoldProxyRow>> {
    std::fs::create_dir_all(&cfg.output_dir).map_err(|e| Error::io(&cfg.output_dir, e))?;
    let mut cache = SourceCache::default();
    let spec_of = |name: &str| {
        cfg.judges
            .get(name)
            .filter(|j| j.judge_model.is_none())
            .ok_or_else(|| Error::Config(format!("gold_proxy: no scorer judge named {name:?}")))
    };
    let bs = cfg.per_device_eval_batch_size;
    let mut proxy_scorer = load_scorer(&spec_of(proxy)?.scorer, bs, &mut cache)?;
    let mut gold_scorer = load_scorer(&spec_of(gold)?.scorer, bs, &mut cache)?;
    let reference = match cfg.kl_reference() {
        Some(r) => Some(load_lm(r, &mut cache)?.0),
        None => None,
    };
    let mut rows = Vec::new();
    let path = cfg.output_dir.join("gold_proxy.jsonl");
    let mut lines = String::new();
    for (step, dir) in policies {
        let (model, tok) = load_lm(dir, &mut cache)?;
        let (records, ids) = prompts_for(cfg, &tok)?;
        let answers = answers_of(cfg, dir, &model, &tok, &ids)?;
        let mean = |s: &mut dyn Scorer| -> Result<f64> {
            let [v, _] = score_both(s, &records, [&answers, &answers], bs)?;
            Ok(v.iter().map(|&x| x as f64).sum::<f64>() / v.len().max(1) as f64)
        };
        let (p, g) = (mean(proxy_scorer.as_mut())?, mean(gold_scorer.as_mut())?);
        let is_reference = cfg.kl_reference().is_some_and(|r| same_dir(r, dir));
        let kl = match (&reference, cfg.kl_samples) {
            // The reference against itself: 0 exactly, no samples needed.
            (Some(_), n) if n > 0 && is_reference => Some(KlSummary {
                k1: 0.0,
                k3: 0.0,
                samples: 0,
            }),
            (Some(r), n) if n > 0 => Some(kl_of(cfg, &model, &tok, &ids, r)?),
            _ => None,
        };
        let row = GoldProxyRow {
            checkpoint: dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            step: *step,
            kl_k1: kl.map_or(f64::NAN, |k| k.k1),
            kl_k3: kl.map_or(f64::NAN, |k| k.k3),
            proxy: p,
            gold: g,
        };
        tracing::info!(
            "step {step}: proxy {p:.3}, gold {g:.3}, KL k1 {:.3}",
            row.kl_k1
        );
        lines.push_str(&serde_json::to_string(&row).map_err(|e| Error::Config(e.to_string()))?);
        lines.push('\n');
        rlhf_model::save::write_atomic(&path, lines.as_bytes())?;
        rows.push(row);
    }
    Ok(rows)
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// The policies of a training run in step order: `(0, start)`, then each round's policy for
/// rejection sampling (`iteration-i` as step i) and ReST (`grow-g/improve-k` numbered in
/// order), else each `checkpoint-N` and the final output as `(max_steps, output_dir)` when it
/// holds a model.
pub fn run_policies(start: &Path, run_dir: &Path, final_step: usize) -> Vec<(usize, PathBuf)> {
    let mut out = vec![(0, start.to_path_buf())];
    let holds_model =
        |d: &Path| d.join("adapter_config.json").exists() || d.join("config.json").exists();
    let rounds: Vec<PathBuf> = (1..)
        .map(|i| run_dir.join(format!("iteration-{i}")))
        .take_while(|d| holds_model(d))
        .collect();
    let improve: Vec<PathBuf> = (1..)
        .map(|g| run_dir.join(format!("grow-{g}")))
        .take_while(|d| d.exists())
        .flat_map(|g| {
            (1..)
                .map(move |k| g.join(format!("improve-{k}")))
                .take_while(|d| holds_model(d))
                .collect::<Vec<_>>()
        })
        .collect();
    if !rounds.is_empty() || !improve.is_empty() {
        out.extend(
            rounds
                .into_iter()
                .chain(improve)
                .enumerate()
                .map(|(i, d)| (i + 1, d)),
        );
        return out;
    }
    out.extend(
        crate::trainer::checkpoints(run_dir)
            .into_iter()
            .filter(|(s, _)| *s < final_step),
    );
    if run_dir.join("adapter_config.json").exists() || run_dir.join("config.json").exists() {
        out.push((final_step, run_dir.to_path_buf()));
    }
    out
}
