//! Best-of-K sampling, shared by rejection sampling ([`crate::rejection_sampling`]) and ReST
//! ([`crate::rest`]): K completions per prompt from the current policy, generated in batches
//! with the KV cache (each prompt's K rows share one prompt pass), scored by a [`Scorer`], and
//! appended to `samples.jsonl` one whole batch at a time. A run that stops mid-sampling
//! continues after the last whole batch on disk; batch k always holds the same prompts and
//! samples with the same seed, so the resumed file equals an uninterrupted one.
//!
//! Also here: the policy such a method trains between rounds ([`Policy`]: LoRA adapters carried
//! from round to round on the same base, or full weights), and the SFT step on chosen
//! completions (the shared loop, loss on completion tokens only, ids as generated: nothing is
//! decoded and re-tokenised).

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use rlhf_data::{PromptRecord, SftExample, IGNORE_INDEX};
use rlhf_model::generate::{generate, GenerationConfig};
use rlhf_model::lora::LoraConfig;
use rlhf_model::model::SourceCache;
use rlhf_model::tokenizer::Tokenizer;
use rlhf_model::{Heads, LoadOptions, Model, Training};
use serde::{Deserialize, Serialize};

use crate::config::TrainingArgs;
use crate::metrics::MetricsLogger;
use crate::rollout::Decoder;
use crate::scoring::{Completions, IdSource, Scorer, ScorerSpec};
use crate::sft::SftObjective;
use crate::trainer::{mix, Summary};
use crate::{Error, Result};

/// A temperature for every round, or one per round (`temperature = [0.7, 0.9]`: Llama 2 raised
/// it as the policy sharpened).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Temperature {
    /// The same in every round.
    One(f64),
    /// Round i uses the i-th (the last one for rounds beyond the list).
    PerRound(Vec<f64>),
}

impl Temperature {
    /// The temperature of round `round` (1-based).
    pub fn of_round(&self, round: usize) -> f64 {
        match self {
            Temperature::One(t) => *t,
            Temperature::PerRound(v) => v[(round.max(1) - 1).min(v.len() - 1)],
        }
    }

    fn check(&self, k: &crate::config::Knobs) -> Result<()> {
        match self {
            Temperature::One(t) => k.positive("temperature", *t),
            Temperature::PerRound(v) if v.is_empty() => Err(k.error(
                "temperature",
                "a number > 0 or a list of them, one per round",
                "[]",
            )),
            Temperature::PerRound(v) => v.iter().try_for_each(|t| k.positive("temperature", *t)),
        }
    }
}

/// The sampling keys rejection sampling and ReST share (generation_config / TRL names).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct SamplingArgs {
    /// K: completions sampled per prompt (TRL's `num_generations`).
    pub num_samples: usize,
    /// Sampling temperature, or one per round.
    pub temperature: Temperature,
    /// Keep the k most likely tokens (0: all).
    pub top_k: usize,
    /// Nucleus sampling (1.0: off).
    pub top_p: f64,
    /// New tokens per completion at most.
    pub max_new_tokens: usize,
    /// Completions per generation batch (rounded to whole prompts: each prompt's K rows are
    /// generated together, sharing one prompt pass).
    pub generation_batch_size: usize,
}

impl Default for SamplingArgs {
    fn default() -> Self {
        Self {
            num_samples: 4,
            temperature: Temperature::One(1.0),
            top_k: 0,
            top_p: 1.0,
            max_new_tokens: 64,
            generation_batch_size: 32,
        }
    }
}

/// The keys of [`SamplingArgs`].
pub const SAMPLING_KEYS: &[&str] = &[
    "num_samples",
    "temperature",
    "top_k",
    "top_p",
    "max_new_tokens",
    "generation_batch_size",
];

impl SamplingArgs {
    /// Checks what serde cannot: the message names `path` (the config file) and the key.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let k = crate::config::Knobs::new(path);
        k.at_least("num_samples", self.num_samples, 1)?;
        k.at_least("max_new_tokens", self.max_new_tokens, 1)?;
        k.at_least("generation_batch_size", self.generation_batch_size, 1)?;
        k.open_closed("top_p", self.top_p, 0.0, 1.0)?;
        self.temperature.check(&k)
    }

    /// Prompts per generation batch.
    pub fn prompts_per_batch(&self) -> usize {
        (self.generation_batch_size / self.num_samples).max(1)
    }
}

/// One scored completion: a line of `samples.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Sample {
    /// The prompt's row number in the prompt file (0-based).
    pub prompt_index: usize,
    /// Which of the prompt's K samples (0-based).
    pub sample_index: usize,
    /// The round that sampled it (1-based).
    pub round: usize,
    /// The prompt as the input row gave it (text or messages).
    pub prompt: serde_json::Value,
    /// The completion text, without the EOS that ended it.
    pub completion: String,
    /// The generated ids (EOS included when generation stopped on it): what SFT trains on.
    pub completion_ids: Vec<u32>,
    /// Whether generation stopped on an EOS (else it ran to `max_new_tokens`).
    pub finished: bool,
    /// The scorer's reward.
    pub score: f32,
    /// Each part of the reward where the scorer has parts (Llama 2's `helpfulness`, `safety`
    /// and `safety_gated`; a weighted sum's sources).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub scores: BTreeMap<String, f32>,
}

/// What the sampling of one round was run with: a resumed round must match it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct SamplingPlan {
    prompts: usize,
    num_samples: usize,
    prompts_per_batch: usize,
    temperature: f64,
    top_k: usize,
    top_p: f64,
    max_new_tokens: usize,
    seed: u64,
}

/// The policy a sampling method trains round after round, with what it needs to generate.
pub struct Policy {
    /// The model (LoRA adapters trainable, or every weight).
    pub model: Model,
    /// Its tokenizer.
    pub tok: Tokenizer,
    /// Padding id.
    pub pad_id: u32,
    /// Ids that end a completion.
    pub eos_ids: Vec<u32>,
    args: TrainingArgs,
    lora: Option<LoraConfig>,
}

impl Policy {
    /// Loads `args.model` to train with `lora` (fresh adapters) or fully; `from` is an
    /// earlier round's (or checkpoint's) output to continue from: its adapter on the same
    /// base, or its full weights.
    pub fn load(
        args: &TrainingArgs,
        lora: Option<&LoraConfig>,
        from: Option<&Path>,
    ) -> Result<Self> {
        let tok = Tokenizer::from_dir(&args.model)?;
        let pad_id = rlhf_data::pad_id(&tok)?;
        let (dir, adapter, training) = match (lora, from) {
            (Some(l), f) => (
                args.model.clone(),
                f.map(Path::to_path_buf),
                Training::Lora(l.clone()),
            ),
            (None, Some(f)) => (f.to_path_buf(), None, Training::Full),
            (None, None) => (args.model.clone(), None, Training::Full),
        };
        let model = Model::load(
            &dir,
            &LoadOptions {
                heads: Heads::Lm,
                training,
                seed: args.seed,
                adapter,
                ..Default::default()
            },
        )?;
        let eos_ids = rlhf_model::generate::eos_ids(&model, &tok);
        if eos_ids.is_empty() {
            tracing::warn!("the model names no EOS token: every completion runs to max_new_tokens");
        }
        Ok(Self {
            model,
            tok,
            pad_id,
            eos_ids,
            args: args.clone(),
            lora: lora.cloned(),
        })
    }

    /// A policy that only samples (every weight frozen): `rlhf bench best-of-n`, or sampling
    /// from a finished model.
    pub fn frozen(args: &TrainingArgs) -> Result<Self> {
        let tok = Tokenizer::from_dir(&args.model)?;
        let pad_id = rlhf_data::pad_id(&tok)?;
        let mut model = Model::load(&args.model, &LoadOptions::default())?;
        if rlhf_model::kernels::autocast_bf16() {
            // Nothing trains it: under bf16 autocast its weights are kept once, in bf16.
            model.keep_frozen_in_bf16_for_decoding()?;
        }
        let eos_ids = rlhf_model::generate::eos_ids(&model, &tok);
        Ok(Self {
            model,
            tok,
            pad_id,
            eos_ids,
            args: args.clone(),
            lora: None,
        })
    }

    /// Replaces the weights with those saved in `from` (a round's output or a checkpoint).
    pub fn reload(&mut self, from: &Path) -> Result<()> {
        *self = Self::load(&self.args, self.lora.as_ref(), Some(from))?;
        Ok(())
    }

    /// The prompts of `path`, tokenised, at most `max_length − max_new_tokens` tokens each.
    pub fn prompts(
        &self,
        path: &Path,
        max_new_tokens: usize,
    ) -> Result<(Vec<PromptRecord>, Vec<Vec<u32>>)> {
        let max_prompt = self.args.max_length.saturating_sub(max_new_tokens).max(1);
        let (records, ids) =
            crate::rollout::load_prompts(path, &self.tok, self.args.skip_invalid, max_prompt)?;
        if records.is_empty() {
            return Err(Error::Config(format!("{}: no prompts", path.display())));
        }
        Ok((records, ids))
    }

    /// SFT of the policy on `chosen` completions into `out_dir` (its final weights there, its
    /// checkpoints under it), continuing from `resume` when given (the model must then hold
    /// that checkpoint's weights: [`Policy::reload`]).
    pub fn sft(
        &self,
        out_dir: &Path,
        chosen: &[&Sample],
        prompt_ids: &[Vec<u32>],
        resume: Option<&Path>,
    ) -> Result<Summary> {
        let examples: Vec<SftExample> = chosen
            .iter()
            .map(|s| sft_example(&prompt_ids[s.prompt_index], s, self.args.max_length))
            .collect();
        let args = TrainingArgs {
            output_dir: out_dir.to_path_buf(),
            ..self.args.clone()
        };
        self.tok.save(out_dir)?;
        let objective = SftObjective {
            pad_id: self.pad_id,
        };
        let summary = crate::trainer::train(
            &args,
            &self.model,
            &objective,
            &examples,
            &[],
            Heads::Lm,
            resume,
        )?;
        self.model.set_training(false);
        Ok(summary)
    }

    /// Saves the weights as a run's output (adapter or full model, and the tokenizer).
    pub fn save(&self, dir: &Path) -> Result<()> {
        crate::checkpoint::save_weights(&self.model, Heads::Lm, dir)?;
        self.tok.save(dir)?;
        Ok(())
    }
}

/// What a finished step (a round, an Improve step) writes last: its metrics, the step's done
/// marker.
pub const STEP_FILE: &str = "round.json";

/// A sampling method's run: its steps in order, each an output directory that is finished
/// when it holds [`STEP_FILE`]; the policy as the last finished step left it, the scorer, the
/// prompts, and `output_dir/metrics.jsonl` (one line per step).
pub struct Steps {
    /// The policy, from the last finished step's output (or `model` when none).
    pub policy: Policy,
    /// What scores the samples.
    pub scorer: Box<dyn Scorer>,
    /// The prompt rows.
    pub prompts: Vec<PromptRecord>,
    /// Their ids.
    pub prompt_ids: Vec<Vec<u32>>,
    /// Steps finished in an earlier run.
    pub done: usize,
    /// The metrics of the last finished step (empty when none): the run's summary so far.
    pub last: Summary,
    logger: MetricsLogger,
}

impl Steps {
    /// Opens a run whose steps write to `dirs`, in order. Without `resume`, an earlier run's
    /// first step directory is refused rather than overwritten.
    pub fn open(
        args: &TrainingArgs,
        lora: Option<&LoraConfig>,
        scorer: &ScorerSpec,
        sampling: &SamplingArgs,
        dirs: &[PathBuf],
        resume: bool,
    ) -> Result<Self> {
        if let (false, Some(first)) = (resume, dirs.first().filter(|d| d.exists())) {
            return Err(Error::Resume(format!(
                "{} exists from an earlier run: pass --resume to continue it, or choose \
                 another output_dir",
                first.display()
            )));
        }
        let done = dirs
            .iter()
            .take_while(|d| d.join(STEP_FILE).exists())
            .count();
        let last_dir = done.checked_sub(1).map(|i| dirs[i].as_path());
        let policy = Policy::load(args, lora, last_dir)?;
        let scorer = scorer.load(&mut SourceCache::default())?;
        let (prompts, prompt_ids) = policy.prompts(&args.train_file, sampling.max_new_tokens)?;
        let out = &args.output_dir;
        std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
        let logger = MetricsLogger::open(out, &args.report_to, done)?;
        let last = match last_dir {
            Some(d) => {
                tracing::info!("{done} of {} steps done in an earlier run", dirs.len());
                crate::checkpoint::read_json(&d.join(STEP_FILE))?
            }
            None => Summary::new(),
        };
        Ok(Self {
            policy,
            scorer,
            prompts,
            prompt_ids,
            done,
            last,
            logger,
        })
    }

    /// Samples and scores a round ([`sample_and_score`]) into `path`.
    pub fn sample(&mut self, round: &Round, path: &Path) -> Result<Vec<Sample>> {
        sample_and_score(
            &self.policy,
            self.scorer.as_mut(),
            &self.prompts,
            &self.prompt_ids,
            round,
            path,
        )
    }

    /// Fine-tunes the policy on `chosen` into `dir`, continuing from the newest checkpoint
    /// there when a killed run left one.
    pub fn sft(&mut self, dir: &Path, chosen: &[&Sample]) -> Result<Summary> {
        let ckpt = crate::trainer::checkpoints(dir).pop().map(|(_, p)| p);
        if let Some(c) = &ckpt {
            self.policy.reload(c)?;
        }
        self.policy
            .sft(dir, chosen, &self.prompt_ids, ckpt.as_deref())
    }

    /// Ends step `step` (1-based) in `dir`: logs its metrics and writes its done marker.
    pub fn finish(&mut self, step: usize, dir: &Path, metrics: Summary) -> Result<()> {
        self.logger.log(step, &metrics)?;
        crate::checkpoint::write_json(&dir.join(STEP_FILE), &metrics)?;
        self.last = metrics;
        Ok(())
    }

    /// Saves the final policy into `output_dir` and logs the summary at `step`.
    pub fn close(mut self, step: usize, mut summary: Summary) -> Result<Summary> {
        self.policy.save(&self.policy.args.output_dir.clone())?;
        summary.extend(std::mem::take(&mut self.last));
        self.logger.summary(step, &summary)?;
        Ok(summary)
    }
}

/// Prompt + completion as one SFT example, the loss on the completion only; at most
/// `max_length` tokens (the completion's end is cut, and with it the EOS).
pub fn sft_example(prompt: &[u32], s: &Sample, max_length: usize) -> SftExample {
    let mut input_ids: Vec<u32> = prompt.iter().chain(&s.completion_ids).copied().collect();
    let mut labels: Vec<i64> = std::iter::repeat_n(IGNORE_INDEX, prompt.len())
        .chain(s.completion_ids.iter().map(|&t| t as i64))
        .collect();
    input_ids.truncate(max_length);
    labels.truncate(max_length);
    SftExample {
        at: rlhf_data::Location {
            path: std::sync::Arc::from(Path::new("samples.jsonl")),
            line: s.prompt_index + 1,
            unit: rlhf_data::Unit::Line,
        },
        input_ids,
        labels,
    }
}

/// What a round samples with.
pub struct Round<'a> {
    /// The round (1-based): part of every seed.
    pub round: usize,
    /// The sampling keys.
    pub args: &'a SamplingArgs,
    /// The run's seed.
    pub seed: u64,
    /// For tests of resumption: stop (with [`Error::Interrupted`]-like config error) after
    /// this many batches were written.
    pub stop_after_batches: Option<usize>,
}

/// Samples K completions for every prompt with `policy`, scores them, and appends them to
/// `path` batch by batch, continuing after the whole batches already there (a torn last
/// batch is dropped and sampled again). Returns every sample, in prompt order.
pub fn sample_and_score(
    policy: &Policy,
    scorer: &mut dyn Scorer,
    prompts: &[PromptRecord],
    prompt_ids: &[Vec<u32>],
    round: &Round,
    path: &Path,
) -> Result<Vec<Sample>> {
    let a = round.args;
    let k = a.num_samples;
    let ppb = a.prompts_per_batch();
    let temperature = a.temperature.of_round(round.round);
    let plan = SamplingPlan {
        prompts: prompts.len(),
        num_samples: k,
        prompts_per_batch: ppb,
        temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        max_new_tokens: a.max_new_tokens,
        seed: round.seed,
    };
    let plan_path = path.with_file_name("sampling.json");
    let mut samples = Vec::new();
    if plan_path.exists() {
        let was: SamplingPlan = crate::checkpoint::read_json(&plan_path)?;
        if was != plan {
            return Err(Error::Resume(format!(
                "{} was sampled with other settings ({}) than this run's ({}): restore them, \
                 or delete {} to sample again",
                path.display(),
                serde_json::to_string(&was).expect("plan serialises"),
                serde_json::to_string(&plan).expect("plan serialises"),
                path.parent().unwrap_or(Path::new(".")).display()
            )));
        }
        samples = read_whole_batches(path, k * ppb, prompts.len() * k)?;
    } else {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        crate::checkpoint::write_json(&plan_path, &plan)?;
    }
    // Rewrite what is kept (drops a torn tail), then append.
    write_samples(path, &samples)?;
    let done_prompts = samples.len() / k;
    if done_prompts > 0 && done_prompts < prompts.len() {
        tracing::info!(
            "{}: {done_prompts} of {} prompts already sampled; continuing",
            path.display(),
            prompts.len()
        );
    }
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    let bar = crate::run::progress(prompts.len(), done_prompts);
    bar.set_message("prompts sampled".to_string());
    let decoder = Decoder::new(&policy.tok, &policy.eos_ids);
    // Under bf16 autocast (`bf16 = true`) the samples come from a bf16 copy of the policy:
    // the same products (operands rounded to bf16, f32 sums) on half the weight bytes.
    // (A policy loaded only to sample from, `Policy::frozen`, has nothing to train: its
    // weights were kept in bf16 in place.)
    let trains = !policy.model.params().trainable().is_empty();
    let bf16_copy = if rlhf_model::kernels::autocast_bf16() && trains {
        policy.model.bf16_decoding_copy()?
    } else {
        None
    };
    let sampler = bf16_copy.as_ref().unwrap_or(&policy.model);
    let mut written = 0usize;
    for (b, first) in (0..prompts.len()).step_by(ppb).enumerate() {
        if first < done_prompts {
            continue;
        }
        if round.stop_after_batches == Some(written) {
            return Err(Error::Config(format!(
                "sampling stopped after {written} batches (stop_after_batches)"
            )));
        }
        let last = (first + ppb).min(prompts.len());
        let rows: Vec<usize> = (first..last)
            .flat_map(|p| std::iter::repeat_n(p, k))
            .collect();
        let ids: Vec<Vec<u32>> = rows.iter().map(|&p| prompt_ids[p].clone()).collect();
        let cfg = GenerationConfig {
            max_new_tokens: a.max_new_tokens,
            temperature,
            top_k: (a.top_k > 0).then_some(a.top_k),
            top_p: (a.top_p < 1.0).then_some(a.top_p),
            eos_token_ids: policy.eos_ids.clone(),
            pad_token_id: policy.pad_id,
            seed: mix(round.seed, round.round as u64, 7_000_000 + b as u64),
        };
        let gens = generate(sampler, &ids, &cfg)?;
        let texts: Vec<String> = gens
            .iter()
            .map(|g| decoder.text(&g.completion_ids))
            .collect::<Result<_>>()?;
        let finished: Vec<bool> = gens.iter().map(|g| g.finished).collect();
        let completion_ids: Vec<Vec<u32>> = gens.into_iter().map(|g| g.completion_ids).collect();
        let records: Vec<&PromptRecord> = rows.iter().map(|&p| &prompts[p]).collect();
        let mut extra = Vec::new();
        let (scores, parts) = scorer.score_parts(
            &Completions {
                prompts: &records,
                texts: &texts,
                ids: &completion_ids,
                source: Some(IdSource {
                    tokenizer: &policy.tok,
                    eos_ids: &policy.eos_ids,
                }),
            },
            &mut extra,
        )?;
        let batch: Vec<Sample> = rows
            .iter()
            .zip(texts)
            .zip(completion_ids)
            .enumerate()
            .map(|(r, ((&p, completion), completion_ids))| Sample {
                prompt_index: p,
                sample_index: r % k,
                round: round.round,
                prompt: prompt_value(&prompts[p]),
                completion,
                completion_ids,
                finished: finished[r],
                score: scores[r],
                scores: parts.iter().map(|(k, v)| (k.clone(), v[r])).collect(),
            })
            .collect();
        append_batch(&mut file, path, &batch)?;
        samples.extend(batch);
        written += 1;
        bar.inc((last - first) as u64);
    }
    bar.finish_and_clear();
    Ok(samples)
}

/// The prompt of a row as the file gave it.
fn prompt_value(r: &PromptRecord) -> serde_json::Value {
    r.row
        .get("prompt")
        .or_else(|| r.row.get("messages"))
        .cloned()
        .unwrap_or(serde_json::Value::Null)
}

/// One batch as JSON lines, written with one call and synced: on disk whole or (torn) cut
/// short, never interleaved.
fn append_batch(file: &mut std::fs::File, path: &Path, batch: &[Sample]) -> Result<()> {
    let mut buf = String::new();
    for s in batch {
        buf.push_str(&serde_json::to_string(s).expect("samples serialise"));
        buf.push('\n');
    }
    file.write_all(buf.as_bytes())
        .and_then(|_| file.sync_data())
        .map_err(|e| Error::io(path, e))
}

/// Writes `samples` as JSON lines, atomically.
pub fn write_samples<'a>(path: &Path, samples: impl IntoIterator<Item = &'a Sample>) -> Result<()> {
    let mut buf = String::new();
    for s in samples {
        buf.push_str(&serde_json::to_string(s).expect("samples serialise"));
        buf.push('\n');
    }
    rlhf_model::save::write_atomic(path, buf.as_bytes())?;
    Ok(())
}

/// Reads samples written by [`write_samples`] or [`sample_and_score`].
pub fn read_samples(path: &Path) -> Result<Vec<Sample>> {
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line.map_err(|e| Error::io(path, e))?;
        if line.trim().is_empty() {
            continue;
        }
        out.push(serde_json::from_str(&line).map_err(|e| {
            Error::Config(format!(
                "{}:{}: not a sample row ({e}); was the file edited?",
                path.display(),
                i + 1
            ))
        })?);
    }
    Ok(out)
}

/// The samples of `path` up to its last whole batch of `per_batch` rows (or `total`, the
/// round's size, when the file is complete); a torn or unreadable tail is dropped, with a
/// message.
fn read_whole_batches(path: &Path, per_batch: usize, total: usize) -> Result<Vec<Sample>> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut rows = Vec::new();
    for line in text.split_inclusive('\n') {
        // A line without its newline is a write cut short.
        let Some(body) = line.strip_suffix('\n') else {
            break;
        };
        match serde_json::from_str::<Sample>(body) {
            Ok(s) => rows.push(s),
            Err(_) => break,
        }
    }
    let keep = if rows.len() >= total {
        total
    } else {
        rows.len() / per_batch * per_batch
    };
    if keep < text.lines().count() {
        tracing::warn!(
            "{}: kept the first {keep} samples (whole batches); the rest was cut short and is \
             sampled again",
            path.display()
        );
    }
    rows.truncate(keep);
    Ok(rows)
}

/// Scores grouped by prompt, in sample order.
pub fn by_prompt(samples: &[Sample]) -> BTreeMap<usize, Vec<&Sample>> {
    let mut m: BTreeMap<usize, Vec<&Sample>> = BTreeMap::new();
    for s in samples {
        m.entry(s.prompt_index).or_default().push(s);
    }
    m
}

/// numpy's median (the mean of the two middle values for an even count).
pub fn median(xs: &[f32]) -> f64 {
    let mut v: Vec<f64> = xs.iter().map(|&x| x as f64).collect();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Llama 2's Figure 7: for N = 1..K, the mean over prompts of the maximum and of the median
/// reward among each prompt's first N samples. The gap between the two is what rejection
/// sampling can gain.
pub fn best_of_n_curve(samples: &[Sample]) -> Vec<(usize, f64, f64)> {
    let groups = by_prompt(samples);
    let k = groups.values().map(Vec::len).min().unwrap_or(0);
    (1..=k)
        .map(|n| {
            let (mut max_sum, mut med_sum) = (0.0, 0.0);
            for g in groups.values() {
                let first: Vec<f32> = g.iter().take(n).map(|s| s.score).collect();
                max_sum += first.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
                med_sum += median(&first);
            }
            let m = groups.len().max(1) as f64;
            (n, max_sum / m, med_sum / m)
        })
        .collect()
}

/// The metrics of a round's samples: `rs/max_reward@N` and `rs/median_reward@N` for each N,
/// and the mean reward and EOS share over all samples.
pub fn sample_metrics(samples: &[Sample], prefix: &str) -> BTreeMap<String, f64> {
    let mut m = BTreeMap::new();
    for (n, max, med) in best_of_n_curve(samples) {
        m.insert(format!("{prefix}/max_reward@{n}"), max);
        m.insert(format!("{prefix}/median_reward@{n}"), med);
    }
    let n = samples.len().max(1) as f64;
    m.insert(
        format!("{prefix}/mean_reward"),
        samples.iter().map(|s| s.score as f64).sum::<f64>() / n,
    );
    // Each part's mean (`rs/scores_helpfulness`, `rs/scores_safety_gated`: the gate's share).
    let mut parts: BTreeMap<&str, (f64, usize)> = BTreeMap::new();
    for s in samples {
        for (k, v) in &s.scores {
            let e = parts.entry(k).or_default();
            e.0 += *v as f64;
            e.1 += 1;
        }
    }
    for (k, (sum, c)) in parts {
        m.insert(format!("{prefix}/scores_{k}"), sum / c as f64);
    }
    m.insert(
        format!("{prefix}/finished_fraction"),
        samples.iter().filter(|s| s.finished).count() as f64 / n,
    );
    m.insert(
        format!("{prefix}/mean_completion_length"),
        samples
            .iter()
            .map(|s| s.completion_ids.len() as f64)
            .sum::<f64>()
            / n,
    );
    m
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample(prompt: usize, k: usize, round: usize, score: f32) -> Sample {
        Sample {
            prompt_index: prompt,
            sample_index: k,
            round,
            prompt: serde_json::Value::String(format!("p{prompt}")),
            completion: format!("c{prompt}.{k}.{round}"),
            completion_ids: vec![prompt as u32, k as u32],
            finished: true,
            score,
            scores: BTreeMap::new(),
        }
    }

    #[test]
    fn median_is_numpys() {
        assert_eq!(median(&[3.0]), 3.0);
        assert_eq!(median(&[3.0, 1.0]), 2.0);
        assert_eq!(median(&[5.0, 1.0, 3.0]), 3.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
    }

    #[test]
    fn best_of_n_curve_on_hand_made_scores() {
        // Prompt 0: 1, 3, 2, 0; prompt 1: 4, 0, 0, 8.
        let s: Vec<Sample> = [1.0, 3.0, 2.0, 0.0]
            .iter()
            .enumerate()
            .map(|(k, &x)| sample(0, k, 1, x))
            .chain(
                [4.0, 0.0, 0.0, 8.0]
                    .iter()
                    .enumerate()
                    .map(|(k, &x)| sample(1, k, 1, x)),
            )
            .collect();
        let c = best_of_n_curve(&s);
        let want = [
            (1, (1.0 + 4.0) / 2.0, (1.0 + 4.0) / 2.0),
            (2, (3.0 + 4.0) / 2.0, (2.0 + 2.0) / 2.0),
            (3, (3.0 + 4.0) / 2.0, (2.0 + 0.0) / 2.0),
            (4, (3.0 + 8.0) / 2.0, (1.5 + 2.0) / 2.0),
        ];
        assert_eq!(c.len(), 4);
        for ((n, mx, md), (wn, wmx, wmd)) in c.into_iter().zip(want) {
            assert_eq!(n, wn);
            assert!((mx - wmx).abs() < 1e-12, "N={n}: max {mx} vs {wmx}");
            assert!((md - wmd).abs() < 1e-12, "N={n}: median {md} vs {wmd}");
        }
    }

    #[test]
    fn a_torn_tail_keeps_whole_batches_only() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("samples.jsonl");
        let rows: Vec<Sample> = (0..6).map(|i| sample(i / 2, i % 2, 1, i as f32)).collect();
        write_samples(&p, &rows).unwrap();
        // Whole file: all kept.
        assert_eq!(read_whole_batches(&p, 4, 6).unwrap(), rows);
        // Cut in the middle of row 5 (batches of 4 rows): the first batch survives.
        let text = std::fs::read_to_string(&p).unwrap();
        let cut = text.len() - 10;
        std::fs::write(&p, &text[..cut]).unwrap();
        assert_eq!(read_whole_batches(&p, 4, 6).unwrap(), rows[..4].to_vec());
        // A garbled line ends what is read.
        let mut lines: Vec<&str> = text.lines().collect();
        lines[2] = "{not json";
        std::fs::write(&p, lines.join("\n") + "\n").unwrap();
        assert_eq!(read_whole_batches(&p, 2, 6).unwrap(), rows[..2].to_vec());
    }

    #[test]
    fn sft_examples_label_the_completion_only() {
        let s = sample(0, 0, 1, 0.0);
        let e = sft_example(&[7, 8, 9], &s, 100);
        assert_eq!(e.input_ids, vec![7, 8, 9, 0, 0]);
        assert_eq!(e.labels, vec![-100, -100, -100, 0, 0]);
        let e = sft_example(&[7, 8, 9], &s, 4);
        assert_eq!(e.input_ids, vec![7, 8, 9, 0]);
        assert_eq!(e.labels, vec![-100, -100, -100, 0]);
    }

    #[test]
    fn temperatures_per_round() {
        let t = Temperature::PerRound(vec![0.7, 0.9]);
        assert_eq!(t.of_round(1), 0.7);
        assert_eq!(t.of_round(2), 0.9);
        assert_eq!(t.of_round(5), 0.9);
        let k = crate::config::Knobs::new(Path::new("c.toml"));
        let err = Temperature::One(0.0).check(&k).unwrap_err().to_string();
        assert!(
            err.contains("c.toml: \"temperature\" must be a finite number > 0, found 0"),
            "{err}"
        );
        assert!(Temperature::PerRound(vec![]).check(&k).is_err());
        assert!(Temperature::PerRound(vec![0.5, f64::NAN])
            .check(&k)
            .is_err());
    }
}
