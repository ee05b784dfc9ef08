//! HIR, Hindsight Instruction Relabeling (Zhang et al. 2023, "The Wisdom of Hindsight Makes
//! Language Models Better Instruction Followers"): instruction following as goal reaching. Each
//! round has two phases:
//!
//! 1. **Online sampling**: K outputs per instruction (prompt) from the current policy
//!    ([`crate::sampling`]: KV-cache batches, scored, `samples.jsonl` appended batch by batch).
//! 2. **Hindsight relabelling and offline training**: each output gets the instruction it
//!    actually followed. A relabelling rule is a scorer ([`ScorerSpec`]: a reward model, a
//!    reward program, a weighted sum) and a list of rules, best first, each a threshold and an
//!    instruction template: `relabel = [{min_score = 0.5, instruction = "{prompt}"},
//!    {instruction = "Answer badly.\n{prompt}"}]` gives outputs scoring at least 0.5 the
//!    original instruction and the rest one that asks for what they did. The policy is then
//!    trained on the (relabelled instruction, output) pairs with the SFT loss on the output
//!    plus the paper's contrastive term: within a micro-batch, each output's score under each
//!    distinct instruction of the batch, s_ij = log P(o_i | instruction_j) / |o_i|, and the
//!    cross-entropy of softmax_j(s_i·) against the output's own instruction
//!    ([`hir_contrastive_loss`]), weighted by `contrastive_weight` (the paper's α); with
//!    `entropy_weight` > 0, minus that weight times the mean entropy of the policy's next-token
//!    distributions over the outputs (the released code's regulariser, 0.001 there).
//!
//! The next round samples from the trained policy (a LoRA adapter carried from round to round,
//! as rejection sampling does). Choices where the paper leaves room, in the order they matter:
//! - **Length-normalised scores**: the paper's implementation compares the per-token mean
//!   log-probability of an output under its instructions; a summed log-probability would make
//!   the softmax of a long output saturate (no gradient) and weigh outputs by their length.
//! - **Micro-batches hold whole prompts**: a training example is one prompt's relabelled
//!   outputs ([`HirGroup`]), so an output meets the other instructions its prompt's outputs
//!   earned (the contrast that teaches the policy what the instruction changes), besides the
//!   other prompts' instructions (the paper's in-batch negatives). A batch's candidates are its
//!   distinct instructions: two outputs relabelled alike share one column.
//! - **The best rule's instruction is the plain prompt** (`"{prompt}"`, checked when the
//!   config loads): at test time the policy is asked with the original instruction, so
//!   `rlhf eval` on the policy and on its starting point read the same prompts.
//! - Thresholds are reward values, quantiles of each round's scores (`threshold_type =
//!   "quantile"`, as ReST's are), or quantiles of each prompt's own K scores
//!   (`"prompt_quantile"`): a reward model's scale differs from one kind of prompt to another
//!   (on the quickstart, every answer to an explanation prompt scores below the round's
//!   median), and a round-wide threshold then relabels every answer to such a prompt, the
//!   good ones too, as a failure. A sample no rule takes (the last rule has a `min_score`)
//!   is not trained on. Not here: the paper's sub-output relabelling (training on random
//!   spans of an output) and its label smoothing of the contrastive target.
//!
//! `output_dir/iteration-i/` holds `samples.jsonl`, `relabelled.jsonl` (each kept sample with
//! its `rule` and `instruction`), the round's policy and its training logs (`sft_loss`,
//! `contrastive_loss`, `contrastive_accuracy` per logging window); `output_dir` the final
//! policy and `metrics.jsonl` with one line per round (`hir/mean_reward`,
//! `hir/relabelled_fraction`, `hir/rule<k>_fraction`, `hir/threshold<k>`, `hir/sft_loss`,
//! `hir/contrastive_loss`, ...). A killed run resumes like rejection sampling: finished rounds
//! (`round.json`) are kept, sampling continues after its last whole batch, training from the
//! round's newest checkpoint.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use rlhf_data::{Content, TruncationMode};
use rlhf_model::tokenizer::ChatMessage;
use rlhf_model::{Heads, Model};
use serde::{Deserialize, Serialize};

use crate::config::{self, Knobs, TrainingArgs};
use crate::losses::{hir_contrastive_loss, mean_token_entropy};
use crate::reference::{sequence_logps, Seq};
use crate::rejection_sampling::{parse_sampling_method, round_dir, sampling_method_keys};
use crate::sampling::{self, Round, Sample, SamplingArgs, Steps};
use crate::scoring::ScorerSpec;
use crate::trainer::{MicroOut, Objective, StepScale, Summary};
use crate::Result;

/// What stands for the original instruction in a template.
pub const PLACEHOLDER: &str = "{prompt}";

/// One relabelling rule: outputs scoring at least `min_score` (and not taken by an earlier
/// rule) are relabelled with `instruction`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RelabelRule {
    /// The threshold (a reward value, or a quantile of the round's scores); none on the last
    /// rule takes every output left.
    pub min_score: Option<f64>,
    /// The template of the relabelled instruction; `{prompt}` is the original prompt (for a
    /// conversation, the last user turn's text).
    pub instruction: String,
}

/// HIR's own keys.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct HirArgs {
    /// Rounds of sample → relabel → train.
    pub iterations: usize,
    /// The rules, best outputs first.
    pub relabel: Vec<RelabelRule>,
    /// "value" (thresholds are scores), "quantile" (of each round's scores) or
    /// "prompt_quantile" (of each prompt's own scores); quantiles in [0, 1].
    pub threshold_type: String,
    /// α: the weight of the contrastive term beside the SFT loss.
    pub contrastive_weight: f64,
    /// The weight of the entropy bonus (0: off; the paper's code uses 0.001).
    pub entropy_weight: f64,
}

impl Default for HirArgs {
    fn default() -> Self {
        Self {
            iterations: 1,
            relabel: Vec::new(),
            threshold_type: "value".into(),
            contrastive_weight: 1.0,
            entropy_weight: 0.0,
        }
    }
}

const HIR_KEYS: &[&str] = &[
    "iterations",
    "relabel",
    "threshold_type",
    "contrastive_weight",
    "entropy_weight",
];

impl HirArgs {
    /// Checks what serde cannot; messages name `path` and the key (`relabel[2].min_score`,
    /// rules counted from 1).
    pub fn validate(&self, path: &Path) -> Result<()> {
        let k = Knobs::new(path);
        k.at_least("iterations", self.iterations, 1)?;
        k.non_negative("contrastive_weight", self.contrastive_weight)?;
        k.non_negative("entropy_weight", self.entropy_weight)?;
        let quantile = match self.threshold_type.as_str() {
            "value" => false,
            "quantile" | "prompt_quantile" => true,
            other => {
                return Err(k.error(
                    "threshold_type",
                    "\"value\", \"quantile\" or \"prompt_quantile\"",
                    format!("{other:?}"),
                ))
            }
        };
        let rules = &self.relabel;
        if rules.len() < 2 {
            return Err(k.error(
                "relabel",
                "at least two rules, best outputs first, e.g. [{min_score = 0.5, instruction = \
                 \"{prompt}\"}, {instruction = \"Give a poor answer.\\n{prompt}\"}]",
                format!(
                    "{} rule{}",
                    rules.len(),
                    if rules.len() == 1 { "" } else { "s" }
                ),
            ));
        }
        let mut above: Option<(usize, f64)> = None;
        for (i, r) in rules.iter().enumerate() {
            let key = |f: &str| format!("relabel[{}].{f}", i + 1);
            if !r.instruction.contains(PLACEHOLDER) {
                return Err(k.error(
                    &key("instruction"),
                    "a template holding {prompt} (where the original prompt goes)",
                    format!("{:?}", r.instruction),
                ));
            }
            match (r.min_score, i + 1 == rules.len()) {
                (None, false) => {
                    return Err(k.error(
                        &key("min_score"),
                        "a threshold (only the last rule may leave it out, to take every \
                         output left)",
                        "none",
                    ))
                }
                (None, true) => {}
                (Some(m), _) => {
                    k.finite(&key("min_score"), m)?;
                    if quantile {
                        k.closed(&key("min_score"), m, 0.0, 1.0)?;
                    }
                    if let Some((j, prev)) = above {
                        if m >= prev {
                            return Err(k.error(
                                &key("min_score"),
                                &format!(
                                    "below relabel[{j}].min_score = {prev} (rules go from the \
                                     best outputs down)"
                                ),
                                m,
                            ));
                        }
                    }
                    above = Some((i + 1, m));
                }
            }
        }
        if rules[0].instruction != PLACEHOLDER {
            return Err(k.error(
                "relabel[1].instruction",
                "\"{prompt}\": the best outputs keep the original instruction, which is what \
                 the policy is asked at test time (`rlhf eval` reads the plain prompts)",
                format!("{:?}", rules[0].instruction),
            ));
        }
        Ok(())
    }
}

/// A parsed HIR config.
#[derive(Debug, Clone)]
pub struct HirConfig {
    /// Shared training arguments (`train_file` holds the instructions; the optimiser keys
    /// drive each round's training).
    pub args: TrainingArgs,
    /// How outputs are sampled.
    pub sampling: SamplingArgs,
    /// Rounds, rules and the loss weights.
    pub hir: HirArgs,
    /// What scores outputs for the rules.
    pub scorer: ScorerSpec,
    /// LoRA on the policy, carried from round to round.
    pub lora: Option<rlhf_model::lora::LoraConfig>,
    /// Tests of resumption: stop sampling after this many batches (not a config key).
    pub stop_after_batches: Option<usize>,
}

impl HirConfig {
    /// Reads `path` with `--set` overrides.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        let mut table = config::load_table(path, overrides, &sampling_method_keys(HIR_KEYS))?;
        Self::from_table(path, &mut table)
    }

    /// Builds the config from an already checked table (a pipeline stage).
    pub fn from_table(path: &Path, table: &mut toml::Table) -> Result<Self> {
        let (args, sampling, own, scorer, lora) = parse_sampling_method(path, table, HIR_KEYS)?;
        let hir: HirArgs = config::parse(path, own)?;
        hir.validate(path)?;
        Ok(Self {
            args,
            sampling,
            hir,
            scorer,
            lora,
            stop_after_batches: None,
        })
    }
}

/// Each sample's rule: the first whose threshold its score reaches, `None` when none does;
/// and the score each rule's threshold stood for (−∞ for a rule without one), averaged over
/// prompts for `"prompt_quantile"`. A threshold is a value, a quantile of all `scores`
/// (`"quantile"`), or a quantile of the scores of the sample's own prompt (`"prompt_quantile"`,
/// `prompt_of[i]` naming sample i's prompt).
pub fn relabel(
    scores: &[f32],
    prompt_of: &[usize],
    rules: &[RelabelRule],
    threshold_type: &str,
) -> (Vec<f64>, Vec<Option<usize>>) {
    let of = |scores: &[f32], kind: &str| -> Vec<f64> {
        rules
            .iter()
            .map(|r| match r.min_score {
                Some(m) => crate::rest::threshold_value(m, kind, scores),
                None => f64::NEG_INFINITY,
            })
            .collect()
    };
    let first = |s: f32, t: &[f64]| t.iter().position(|&t| s as f64 >= t);
    if threshold_type != "prompt_quantile" {
        let t = of(scores, threshold_type);
        let chosen = scores.iter().map(|&s| first(s, &t)).collect();
        return (t, chosen);
    }
    let mut groups: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (i, &p) in prompt_of.iter().enumerate() {
        groups.entry(p).or_default().push(i);
    }
    let mut chosen = vec![None; scores.len()];
    let mut mean = vec![0.0; rules.len()];
    for idx in groups.values() {
        let own: Vec<f32> = idx.iter().map(|&i| scores[i]).collect();
        let t = of(&own, "quantile");
        for &i in idx {
            chosen[i] = first(scores[i], &t);
        }
        for (m, x) in mean.iter_mut().zip(&t) {
            *m += x / groups.len() as f64;
        }
    }
    (mean, chosen)
}

/// The instruction `template` makes of `prompt`: `{prompt}` replaced by the prompt's text,
/// or, for a conversation, by the last user turn's text (the last turn's, without one).
pub fn instruction_of(prompt: &Content, template: &str) -> Content {
    match prompt {
        Content::Text(t) => Content::Text(template.replace(PLACEHOLDER, t)),
        Content::Messages(m) => {
            let mut m = m.clone();
            let at = m
                .iter()
                .rposition(|x| x.role == "user")
                .or(m.len().checked_sub(1));
            if let Some(i) = at {
                let content = template.replace(PLACEHOLDER, &m[i].content);
                m[i] = ChatMessage::new(m[i].role.clone(), content);
            }
            Content::Messages(m)
        }
    }
}

/// One relabelled output: the ids of its instruction and the output's ids as generated.
#[derive(Debug, Clone, PartialEq)]
pub struct HirItem {
    /// The relabelled instruction, tokenised as a prompt.
    pub instruction: Vec<u32>,
    /// The output (EOS included when generation stopped on it).
    pub output: Vec<u32>,
}

/// A prompt's relabelled outputs: one training example, so that a micro-batch holds whole
/// prompts and an output meets the other instructions its prompt's outputs earned.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HirGroup {
    /// The outputs.
    pub items: Vec<HirItem>,
}

/// HIR's training objective: SFT on each output under its relabelled instruction, plus
/// α × the contrastive term, minus `entropy_weight` × the mean token entropy.
pub struct HirObjective {
    /// Padding id.
    pub pad_id: u32,
    /// Tokens per sequence at most (the output loses its end beyond it).
    pub max_length: usize,
    /// α.
    pub contrastive_weight: f64,
    /// The entropy bonus's weight.
    pub entropy_weight: f64,
}

/// One micro-batch's parts of the loss.
struct Forward {
    /// −Σ log P(o_i | own instruction) over the batch's outputs.
    nll_sum: Tensor,
    /// Output tokens scored under their own instructions.
    labelled: usize,
    /// The contrastive term (mean over outputs).
    contrastive: Tensor,
    /// The mean next-token entropy over the outputs (when its weight is not 0).
    entropy: Option<Tensor>,
    /// Rows whose own instruction scores highest.
    accuracy: f64,
    /// Distinct instructions in the batch.
    candidates: usize,
    /// Tokens processed (every output under every candidate).
    tokens: usize,
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

impl HirObjective {
    // batch: groups -> the loss's parts
    fn forward(&self, model: &Model, batch: &[&HirGroup]) -> Result<Forward> {
        let items: Vec<&HirItem> = batch.iter().flat_map(|g| &g.items).collect();
        // The batch's distinct instructions, in order of first appearance; each output's own.
        let mut cands: Vec<&[u32]> = Vec::new();
        let mut own = Vec::with_capacity(items.len());
        for it in &items {
            let at = cands.iter().position(|c| *c == it.instruction.as_slice());
            own.push(at.unwrap_or_else(|| {
                cands.push(&it.instruction);
                cands.len() - 1
            }));
        }
        let (n, c) = (items.len(), cands.len());
        // Every output under every candidate, output by output.
        let seqs: Vec<Seq> = items
            .iter()
            .flat_map(|it| {
                cands.iter().map(|cand| {
                    Seq::fit(cand, &it.output, self.max_length, TruncationMode::KeepStart)
                })
            })
            .collect();
        let (logps, states) = sequence_logps(model, &seqs, self.pad_id)?; // (n·c), (Σ len, h)
        let logps = logps.reshape((n, c))?;
        let lens: Vec<usize> = seqs.iter().map(|s| s.completion.len()).collect();
        let inv_len: Vec<f32> = lens.iter().map(|&l| 1.0 / l.max(1) as f32).collect();
        let inv_len = Tensor::from_vec(inv_len, (n, c), logps.device())?.to_dtype(logps.dtype())?;
        let scores = (&logps * inv_len)?;
        let mut onehot = vec![0f32; n * c];
        for (i, &j) in own.iter().enumerate() {
            onehot[i * c + j] = 1.0;
        }
        let onehot = Tensor::from_vec(onehot, (n, c), logps.device())?.to_dtype(logps.dtype())?;
        let nll_sum = (&logps * onehot)?.sum_all()?.neg()?;
        let labelled = own.iter().enumerate().map(|(i, &j)| lens[i * c + j]).sum();
        let contrastive = hir_contrastive_loss(&scores, &own)?;
        let s = scores.detach().to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let right = s
            .iter()
            .zip(&own)
            .filter(|(row, &j)| row.iter().all(|&x| x <= row[j]))
            .count();
        let entropy = if self.entropy_weight > 0.0 {
            // The states that predicted each output's tokens under its own instruction.
            let mut starts = Vec::with_capacity(lens.len());
            let mut at = 0u32;
            for &l in &lens {
                starts.push(at);
                at += l as u32;
            }
            let rows: Vec<u32> = own
                .iter()
                .enumerate()
                .flat_map(|(i, &j)| {
                    let k = i * c + j;
                    starts[k]..starts[k] + lens[k] as u32
                })
                .collect();
            if rows.is_empty() {
                None
            } else {
                let idx = Tensor::new(rows.as_slice(), states.device())?;
                let logits = model.logits(&states.index_select(&idx, 0)?)?;
                Some(mean_token_entropy(&logits.to_dtype(DType::F32)?)?)
            }
        } else {
            None
        };
        Ok(Forward {
            nll_sum,
            labelled,
            contrastive,
            entropy,
            accuracy: right as f64 / n.max(1) as f64,
            candidates: c,
            tokens: seqs.iter().map(Seq::tokens).sum(),
        })
    }

    /// Metrics of a forward pass with TRL-style plain names (the loop adds `eval_`).
    fn metrics(&self, f: &Forward) -> Result<Vec<(&'static str, f64)>> {
        let mut m = vec![
            ("sft_loss", scalar(&f.nll_sum)? / f.labelled.max(1) as f64),
            ("contrastive_loss", scalar(&f.contrastive)?),
            ("contrastive_accuracy", f.accuracy),
            ("candidates", f.candidates as f64),
        ];
        if let Some(h) = &f.entropy {
            m.push(("entropy", scalar(h)?));
        }
        Ok(m)
    }
}

impl Objective for HirObjective {
    type Example = HirGroup;

    fn items(&self, ex: &HirGroup) -> usize {
        ex.items
            .iter()
            .map(|it| {
                Seq::fit(
                    &it.instruction,
                    &it.output,
                    self.max_length,
                    TruncationMode::KeepStart,
                )
                .completion
                .len()
            })
            .sum()
    }

    /// The SFT part is normalised by the output tokens of the whole optimiser step (as SFT's
    /// loss is); the contrastive and entropy parts are micro-batch means over outputs, divided
    /// by the micro-batches of the step (as DPO's loss is).
    fn loss(&self, model: &Model, batch: &[&HirGroup], scale: StepScale) -> Result<MicroOut> {
        let f = self.forward(model, batch)?;
        let m = scale.micro_batches.max(1) as f64;
        let mut loss = ((&f.nll_sum / scale.step_items.max(1) as f64)?
            + (&f.contrastive * (self.contrastive_weight / m))?)?;
        if let Some(h) = &f.entropy {
            loss = (loss - (h * (self.entropy_weight / m))?)?;
        }
        Ok(MicroOut {
            loss,
            metrics: self.metrics(&f)?,
            samples: batch.iter().map(|g| g.items.len()).sum(),
            tokens: f.tokens,
        })
    }

    fn evaluate(
        &self,
        model: &Model,
        examples: &[HirGroup],
        batch_size: usize,
    ) -> Result<BTreeMap<String, f64>> {
        crate::dpo::evaluate_batches(examples, batch_size, |batch| {
            let f = self.forward(model, batch)?;
            let mut loss = scalar(&f.nll_sum)? / f.labelled.max(1) as f64
                + self.contrastive_weight * scalar(&f.contrastive)?;
            if let Some(h) = &f.entropy {
                loss -= self.entropy_weight * scalar(h)?;
            }
            Ok((loss, self.metrics(&f)?))
        })
    }
}

/// A line of `relabelled.jsonl`: the sample, the rule that took it (1-based, as the config's
/// messages count) and the instruction it was relabelled with.
#[derive(Serialize)]
struct Relabelled<'a> {
    #[serde(flatten)]
    sample: &'a Sample,
    rule: usize,
    instruction: serde_json::Value,
}

/// The mean of `key` over the lines of a round's training log that hold it.
fn mean_logged(dir: &Path, key: &str) -> Option<f64> {
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).ok()?;
    let v: Vec<f64> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|l| l.get(key).and_then(|x| x.as_f64()))
        .collect();
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

/// `rlhf hir --config FILE [--set k=v]... [--resume]`.
pub fn run(
    config_path: &Path,
    overrides: &[String],
    resume: Option<Option<&Path>>,
) -> Result<Summary> {
    let cfg = HirConfig::load(config_path, overrides)?;
    run_config(cfg, resume.is_some())
}

/// Runs a parsed config; `resume` continues the rounds already in `output_dir`.
pub fn run_config(cfg: HirConfig, resume: bool) -> Result<Summary> {
    // Before anything is written: not into the model, the lock, no other run's rounds.
    let _lock = crate::outdir::prepare_run(&cfg.args, &[], resume)?;
    let out = cfg.args.output_dir.clone();
    let iters = cfg.hir.iterations;
    let dirs: Vec<PathBuf> = (1..=iters).map(|i| round_dir(&out, i)).collect();
    let mut run = Steps::open(
        &cfg.args,
        cfg.lora.as_ref(),
        &cfg.scorer,
        &cfg.sampling,
        &dirs,
        resume,
    )?;
    let max_prompt = cfg
        .args
        .max_length
        .saturating_sub(cfg.sampling.max_new_tokens)
        .max(1);
    for i in run.done + 1..=iters {
        let dir = &dirs[i - 1];
        let temperature = cfg.sampling.temperature.of_round(i);
        tracing::info!(
            "round {i}/{iters}: {} outputs for each of {} instructions at temperature \
             {temperature}",
            cfg.sampling.num_samples,
            run.prompts.len()
        );
        let samples = run.sample(
            &Round {
                round: i,
                args: &cfg.sampling,
                seed: cfg.args.seed,
                stop_after_batches: cfg.stop_after_batches,
            },
            &dir.join("samples.jsonl"),
        )?;
        let scores: Vec<f32> = samples.iter().map(|s| s.score).collect();
        let rules = &cfg.hir.relabel;
        let prompt_of: Vec<usize> = samples.iter().map(|s| s.prompt_index).collect();
        let (thresholds, taken) = relabel(&scores, &prompt_of, rules, &cfg.hir.threshold_type);

        // Each (prompt, rule)'s instruction, tokenised once; the best rule's is the prompt as
        // it was sampled from.
        let mut instructions: BTreeMap<(usize, usize), (Content, Vec<u32>)> = BTreeMap::new();
        let mut lines = Vec::new();
        let mut groups: BTreeMap<usize, HirGroup> = BTreeMap::new();
        for (s, r) in samples.iter().zip(&taken) {
            let Some(r) = *r else { continue };
            if s.completion_ids.is_empty() {
                continue;
            }
            let p = s.prompt_index;
            if let std::collections::btree_map::Entry::Vacant(e) = instructions.entry((p, r)) {
                let content = instruction_of(&run.prompts[p].prompt, &rules[r].instruction);
                let ids = if r == 0 {
                    run.prompt_ids[p].clone()
                } else {
                    let mut ids = rlhf_data::prompt_ids(&run.policy.tok, &content)?;
                    ids.drain(..ids.len().saturating_sub(max_prompt));
                    ids
                };
                e.insert((content, ids));
            }
            let (content, ids) = &instructions[&(p, r)];
            lines.push(Relabelled {
                sample: s,
                rule: r + 1,
                instruction: match content {
                    Content::Text(t) => serde_json::Value::String(t.clone()),
                    Content::Messages(m) => serde_json::to_value(m).expect("messages serialise"),
                },
            });
            groups.entry(p).or_default().items.push(HirItem {
                instruction: ids.clone(),
                output: s.completion_ids.clone(),
            });
        }
        let mut text = String::new();
        for l in &lines {
            text.push_str(&serde_json::to_string(l).expect("rows serialise"));
            text.push('\n');
        }
        rlhf_model::save::write_atomic(&dir.join("relabelled.jsonl"), text.as_bytes())?;

        let n = samples.len().max(1) as f64;
        let mut m = sampling::sample_metrics(&samples, "hir");
        m.insert("hir/temperature".into(), temperature);
        for (k, rule) in rules.iter().enumerate() {
            let of_rule: Vec<f64> = samples
                .iter()
                .zip(&taken)
                .filter(|(_, t)| **t == Some(k))
                .map(|(s, _)| s.score as f64)
                .collect();
            m.insert(
                format!("hir/rule{}_fraction", k + 1),
                of_rule.len() as f64 / n,
            );
            if !of_rule.is_empty() {
                m.insert(
                    format!("hir/rule{}_mean_reward", k + 1),
                    of_rule.iter().sum::<f64>() / of_rule.len() as f64,
                );
            }
            if rule.min_score.is_some() {
                m.insert(format!("hir/threshold{}", k + 1), thresholds[k]);
            }
        }
        m.insert(
            "hir/relabelled_fraction".into(),
            taken.iter().filter(|t| t.is_some_and(|r| r > 0)).count() as f64 / n,
        );
        m.insert(
            "hir/dropped_fraction".into(),
            taken.iter().filter(|t| t.is_none()).count() as f64 / n,
        );
        m.insert("hir/trained".into(), lines.len() as f64);
        tracing::info!(
            "round {i}: mean reward {:.4}; {} of {} outputs relabelled away from their prompt, \
             {} not trained on",
            m["hir/mean_reward"],
            taken.iter().filter(|t| t.is_some_and(|r| r > 0)).count(),
            samples.len(),
            samples.len() - lines.len()
        );
        let examples: Vec<HirGroup> = groups.into_values().collect();
        if examples.is_empty() {
            tracing::warn!("round {i}: no output to train on; the round trains nothing");
            run.policy.save(dir)?;
        } else {
            let summary = train_round(&mut run, &cfg, dir, &examples)?;
            m.insert("hir/train_loss".into(), summary["train_loss"]);
            m.insert("hir/train_runtime".into(), summary["train_runtime"]);
            for key in ["sft_loss", "contrastive_loss", "contrastive_accuracy"] {
                if let Some(v) = mean_logged(dir, key) {
                    m.insert(format!("hir/{key}"), v);
                }
            }
        }
        run.finish(i, dir, m)?;
    }
    run.close(
        iters,
        Summary::from([("iterations".to_string(), iters as f64)]),
    )
}

/// Trains the policy on a round's groups into `dir` (its weights there, its checkpoints under
/// it), continuing from the newest checkpoint there when a killed run left one.
fn train_round(
    run: &mut Steps,
    cfg: &HirConfig,
    dir: &Path,
    examples: &[HirGroup],
) -> Result<Summary> {
    let ckpt = crate::trainer::checkpoints(dir).pop().map(|(_, p)| p);
    if let Some(c) = &ckpt {
        run.policy.reload(c)?;
    }
    let args = TrainingArgs {
        output_dir: dir.to_path_buf(),
        ..cfg.args.clone()
    };
    run.policy.tok.save(dir)?;
    let objective = HirObjective {
        pad_id: run.policy.pad_id,
        max_length: cfg.args.max_length,
        contrastive_weight: cfg.hir.contrastive_weight,
        entropy_weight: cfg.hir.entropy_weight,
    };
    let summary = crate::trainer::train(
        &args,
        &run.policy.model,
        &objective,
        examples,
        &[],
        Heads::Lm,
        ckpt.as_deref(),
    )?;
    run.policy.model.set_training(false);
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(min: Option<f64>, instruction: &str) -> RelabelRule {
        RelabelRule {
            min_score: min,
            instruction: instruction.into(),
        }
    }

    fn args(rules: Vec<RelabelRule>, kind: &str) -> HirArgs {
        HirArgs {
            relabel: rules,
            threshold_type: kind.into(),
            ..Default::default()
        }
    }

    fn err(a: &HirArgs) -> String {
        a.validate(Path::new("hir.toml")).unwrap_err().to_string()
    }

    #[test]
    fn thresholds_relabel_by_value_and_by_quantile() {
        let rules = vec![
            rule(Some(0.5), "{prompt}"),
            rule(Some(-0.5), "Answer briefly.\n{prompt}"),
            rule(None, "Answer badly.\n{prompt}"),
        ];
        let scores = [1.0f32, 0.5, 0.2, -0.5, -0.7, 3.0];
        let prompts = [0, 0, 0, 1, 1, 1];
        let (t, r) = relabel(&scores, &prompts, &rules, "value");
        assert_eq!(t, vec![0.5, -0.5, f64::NEG_INFINITY]);
        // ≥ 0.5 → rule 1; ≥ −0.5 → rule 2; the rest → rule 3.
        assert_eq!(
            r,
            vec![Some(0), Some(0), Some(1), Some(1), Some(2), Some(0)]
        );

        // Quantiles of these scores (sorted −0.7 −0.5 0.2 0.5 1.0 3.0; numpy's linear rule):
        // the 0.5-quantile is (0.2 + 0.5)/2 = 0.35, the 0.2-quantile is −0.5.
        let rules = vec![
            rule(Some(0.5), "{prompt}"),
            rule(Some(0.2), "Answer briefly.\n{prompt}"),
        ];
        let (t, r) = relabel(&scores, &prompts, &rules, "quantile");
        assert!(
            (t[0] - 0.35).abs() < 1e-6 && (t[1] + 0.5).abs() < 1e-6,
            "{t:?}"
        );
        // A last rule with a threshold leaves what is below it untrained (−0.7).
        assert_eq!(r, vec![Some(0), Some(0), Some(1), Some(1), None, Some(0)]);

        // Per prompt: prompt 0 has 1.0 0.5 0.2 (median 0.5, 0.2-quantile 0.32), prompt 1
        // has −0.5 −0.7 3.0 (median −0.5, 0.2-quantile −0.62): its −0.5 keeps the prompt
        // though the round's median is 0.35; the thresholds logged are the prompts' means.
        let (t, r) = relabel(&scores, &prompts, &rules, "prompt_quantile");
        assert!(t[0].abs() < 1e-6 && (t[1] + 0.15).abs() < 1e-6, "{t:?}");
        assert_eq!(r, vec![Some(0), Some(0), None, Some(0), None, Some(0)]);
    }

    #[test]
    fn templates_fill_the_prompt_or_the_last_user_turn() {
        let t = instruction_of(
            &Content::Text("Question: 2+2?\nAnswer:".into()),
            "Be wrong.\n{prompt}",
        );
        assert_eq!(
            t,
            Content::Text("Be wrong.\nQuestion: 2+2?\nAnswer:".into())
        );
        let m = Content::Messages(vec![
            ChatMessage::new("system", "Be kind."),
            ChatMessage::new("user", "Hi?"),
        ]);
        match instruction_of(&m, "{prompt} (Reply rudely.)") {
            Content::Messages(v) => {
                assert_eq!(v[0].content, "Be kind.");
                assert_eq!(v[1].content, "Hi? (Reply rudely.)");
                assert_eq!(v[1].role, "user");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_rules_are_refused_naming_the_key() {
        let good = args(
            vec![rule(Some(0.5), "{prompt}"), rule(None, "Bad.\n{prompt}")],
            "value",
        );
        assert!(good.validate(Path::new("hir.toml")).is_ok());

        let e = err(&args(
            vec![
                rule(Some(0.5), "{prompt}"),
                rule(Some(0.9), "Meh.\n{prompt}"),
                rule(None, "Bad.\n{prompt}"),
            ],
            "value",
        ));
        assert!(
            e.contains(
                "hir.toml: \"relabel[2].min_score\" must be below relabel[1].min_score = 0.5"
            ) && e.contains("found 0.9"),
            "{e}"
        );
        let e = err(&args(
            vec![
                rule(Some(0.5), "{prompt}"),
                rule(None, "Bad answer please."),
            ],
            "value",
        ));
        assert!(
            e.contains("\"relabel[2].instruction\" must be a template holding {prompt}"),
            "{e}"
        );
        let e = err(&args(
            vec![rule(None, "{prompt}"), rule(None, "Bad.\n{prompt}")],
            "value",
        ));
        assert!(
            e.contains("\"relabel[1].min_score\" must be a threshold"),
            "{e}"
        );
        let e = err(&args(
            vec![
                rule(Some(0.5), "Be good.\n{prompt}"),
                rule(None, "{prompt}"),
            ],
            "value",
        ));
        assert!(
            e.contains("\"relabel[1].instruction\" must be \"{prompt}\""),
            "{e}"
        );
        let e = err(&args(vec![rule(Some(0.5), "{prompt}")], "value"));
        assert!(e.contains("\"relabel\" must be at least two rules"), "{e}");
        let e = err(&args(
            vec![rule(Some(1.5), "{prompt}"), rule(None, "Bad.\n{prompt}")],
            "quantile",
        ));
        assert!(
            e.contains("\"relabel[1].min_score\" must be a number in [0, 1]"),
            "{e}"
        );
        let e = err(&args(
            vec![
                rule(Some(f64::NAN), "{prompt}"),
                rule(None, "Bad.\n{prompt}"),
            ],
            "value",
        ));
        assert!(e.contains("must be a finite number"), "{e}");
        let mut a = good.clone();
        a.threshold_type = "median".into();
        assert!(err(&a).contains("\"threshold_type\""));
        let mut a = good.clone();
        a.contrastive_weight = -1.0;
        assert!(err(&a).contains("\"contrastive_weight\" must be a finite number >= 0"));
        let mut a = good;
        a.iterations = 0;
        assert!(err(&a).contains("\"iterations\" must be an integer >= 1"));
    }
}
