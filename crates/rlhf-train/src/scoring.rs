//! Scoring completions: reward models (each with its own tokenizer and chat template),
//! Llama 2's helpfulness + safety combination, reward programs ([`crate::program`]), a
//! weighted sum of these (TRL's `reward_funcs` + `reward_weights`), or any rule that
//! implements [`Scorer`]. [`ScorerSpec`] holds the config keys that choose them, so every
//! command that scores (PPO, eval, sampling) reads the same keys.
//!
//! A reward model reads a completion as the reward trainer built its inputs (prompt +
//! answer + EOS, or the conversation through its chat template). When the completion's ids
//! come with the tokenizer that made them ([`Completions::source`]) and that tokenizer is the
//! reward model's own (same [`Tokenizer::fingerprint`]: vocabulary, merges, added and special
//! tokens, chat template; not the file's bytes, which also store padding), the reward model
//! reads the generated ids as they are instead of decoding them and tokenising the text
//! again: its input is its own ids of the prompt (with the generation prompt, for a
//! conversation), then the generated ids without their EOS, then what its format puts after
//! an answer (the EOS id for text; for a conversation, the template's text after the
//! answer). That shortcut is taken for a text row when the tokenizer adds nothing after a
//! sequence (a BOS-only post-processor) and names an EOS token, and for a conversation when
//! the template renders the prompt with its generation prompt as the start of the
//! conversation with the answer, and the answer's text whole (a template that strips or
//! rewrites the answer is read through text instead); other rows go through text.
//!
//! Where both apply, the two paths give the same ids, hence the same scores, whenever the
//! generated ids are the tokenizer's own encoding of their text and tokens do not merge
//! across the prompt/answer boundary. Sampling can break either: a sampled sequence may
//! spell a word in pieces the tokenizer would merge (" s" "at" for " sat"), an answer that
//! begins without a space can merge with the prompt's last word, and decoding drops special
//! tokens a policy emitted mid-answer. The shortcut then scores exactly the tokens the
//! policy produced, which is what PPO's KL and advantages are computed on; the text path
//! scores a re-tokenised neighbour.

use std::path::{Path, PathBuf};
use std::time::Duration;

use candle_core::{DType, Tensor};
use rlhf_data::{Content, PromptRecord};
use rlhf_model::model::SourceCache;
use rlhf_model::tokenizer::{ChatMessage, Tokenizer};
use rlhf_model::{Heads, LoadOptions, Model};
use serde::{Deserialize, Serialize};

use crate::program::RewardProgram;
use crate::rl;
use crate::{Error, Result};

/// The completions of one batch, for a [`Scorer`].
pub struct Completions<'a> {
    /// The prompt row of each completion.
    pub prompts: &'a [&'a PromptRecord],
    /// The decoded completion, without the EOS that ended it.
    pub texts: &'a [String],
    /// The generated ids (EOS included when generation stopped on it).
    pub ids: &'a [Vec<u32>],
    /// The tokenizer `ids` are in, when known: a reward model with the same one reads `ids`
    /// without decoding and re-tokenising them (see the module docs).
    pub source: Option<IdSource<'a>>,
}

/// Which tokenizer made a batch's ids, and which ids end a completion.
#[derive(Clone, Copy)]
pub struct IdSource<'a> {
    /// The policy's tokenizer.
    pub tokenizer: &'a Tokenizer,
    /// The ids that stop generation (a completion's last id is dropped when it is one of
    /// them, as from its text).
    pub eos_ids: &'a [u32],
}

/// Scores, and each named part's scores, one per completion.
pub type ScoreParts = (Vec<f32>, Vec<(String, Vec<f32>)>);

/// What scores completions: reward models, or any rule (tests, rule-based rewards).
pub trait Scorer {
    /// One score per completion; `metrics` receives extras (e.g. the share gated to safety).
    fn score(&mut self, batch: &Completions, metrics: &mut Vec<(String, f64)>) -> Result<Vec<f32>>;

    /// [`Scorer::score`], with each part's own score per completion where the scorer has parts
    /// (Llama 2's `helpfulness` and `safety` and whether the gate chose safety, a weighted
    /// sum's sources): what `samples.jsonl` keeps beside the score.
    fn score_parts(
        &mut self,
        batch: &Completions,
        metrics: &mut Vec<(String, f64)>,
    ) -> Result<ScoreParts> {
        Ok((self.score(batch, metrics)?, Vec::new()))
    }

    /// The score head to start the value head from, if any.
    fn value_head_init(&self) -> Option<Tensor> {
        None
    }
}

/// A reward model with its own tokenizer and chat template.
pub struct RewardModel {
    model: Model,
    tok: Tokenizer,
    batch_size: usize,
    /// The id that ends a text row's answer, where generated ids can be read directly (the
    /// EOS token is one id and the tokenizer adds nothing after a sequence).
    text_end: Option<u32>,
}

/// Stands for the answer while finding what a chat template puts around it; the spaces
/// catch templates that strip the answer.
const ANSWER: &str = " \u{E000}answer\u{E000} ";

impl RewardModel {
    /// Loads a reward model (an HF directory with a score head, or a SEQ_CLS adapter).
    pub fn load(dir: &Path, batch_size: usize, cache: &mut SourceCache) -> Result<Self> {
        let mut model = Model::load_cached(
            dir,
            &LoadOptions {
                heads: Heads::Score,
                // A model without a trained head is refused, not given a random one.
                require_score_head: true,
                ..Default::default()
            },
            cache,
        )?;
        if rlhf_model::kernels::autocast_bf16() {
            // Under bf16 autocast its products read the weights rounded anyway: keep them
            // once, in bf16 (half the memory, and the bf16 kernel reads them in place).
            model.keep_frozen_in_bf16_for_decoding()?;
        }
        let tok = Tokenizer::from_dir(dir)?;
        let text_end = match tok.eos_token().and_then(|e| tok.token_to_id(e)) {
            Some(eos)
                if tok
                    .encode("a b", true)?
                    .ends_with(&tok.encode("a b", false)?) =>
            {
                Some(eos)
            }
            _ => None,
        };
        Ok(Self {
            model,
            tok,
            batch_size: batch_size.max(1),
            text_end,
        })
    }

    /// Scores a batch of completions, reading the generated ids directly where the module
    /// docs say so, else their text ([`Self::score_texts`]).
    pub fn score(&self, batch: &Completions) -> Result<Vec<f32>> {
        let ids = self.input_ids(batch)?;
        self.score_ids(&ids)
    }

    /// The ids this model reads for each completion of `batch`.
    pub fn input_ids(&self, batch: &Completions) -> Result<Vec<Vec<u32>>> {
        let source = batch
            .source
            .filter(|s| s.tokenizer.fingerprint() == self.tok.fingerprint());
        let mut out = Vec::with_capacity(batch.prompts.len());
        for (i, p) in batch.prompts.iter().enumerate() {
            let direct = match source {
                Some(s) => self.direct_ids(&p.prompt, &batch.ids[i], s.eos_ids)?,
                None => None,
            };
            out.push(match direct {
                Some(ids) => ids,
                None => self.text_ids(&p.prompt, &batch.texts[i])?,
            });
        }
        Ok(out)
    }

    /// The prompt's ids, the generated ids without their EOS, and what follows an answer;
    /// `None` where the format does not allow reading the ids directly.
    fn direct_ids(
        &self,
        prompt: &Content,
        generated: &[u32],
        eos_ids: &[u32],
    ) -> Result<Option<Vec<u32>>> {
        let body = match generated.last() {
            Some(l) if eos_ids.contains(l) => &generated[..generated.len() - 1],
            _ => generated,
        };
        let (mut ids, end) = match prompt {
            Content::Text(p) => {
                let Some(eos) = self.text_end else {
                    return Ok(None);
                };
                (self.tok.encode(p, true)?, vec![eos])
            }
            Content::Messages(m) => {
                let start = self.tok.apply_chat_template(m, true)?;
                let mut probe = m.clone();
                probe.push(ChatMessage::new("assistant", ANSWER));
                let whole = self.tok.apply_chat_template(&probe, false)?;
                let Some(after) = whole
                    .strip_prefix(start.as_str())
                    .and_then(|rest| rest.strip_prefix(ANSWER))
                else {
                    return Ok(None);
                };
                (
                    self.tok.encode(&start, false)?,
                    self.tok.encode(after, false)?,
                )
            }
        };
        ids.extend_from_slice(body);
        ids.extend(end);
        Ok(Some(ids))
    }

    /// The reward trainer's ids of a prompt and an answer's text.
    fn text_ids(&self, prompt: &Content, completion: &str) -> Result<Vec<u32>> {
        let response = match prompt {
            Content::Text(_) => Content::Text(completion.to_string()),
            Content::Messages(_) => {
                Content::Messages(vec![ChatMessage::new("assistant", completion)])
            }
        };
        Ok(rlhf_data::reward_ids(&self.tok, Some(prompt), &response)?)
    }

    /// Scores each (prompt, completion) as the reward trainer built its inputs: prompt text +
    /// completion + EOS, or the conversation with the completion as the assistant's turn,
    /// through this model's own chat template.
    pub fn score_texts(&self, prompts: &[&Content], completions: &[String]) -> Result<Vec<f32>> {
        let ids = prompts
            .iter()
            .zip(completions)
            .map(|(p, c)| self.text_ids(p, c))
            .collect::<Result<Vec<_>>>()?;
        self.score_ids(&ids)
    }

    /// Scores sequences of this model's ids, `batch_size` per forward pass, without
    /// gradients.
    pub fn score_ids(&self, ids: &[Vec<u32>]) -> Result<Vec<f32>> {
        let was = self.model.set_grad_enabled(false);
        let out = (|| -> Result<Vec<f32>> {
            let mut scores = Vec::with_capacity(ids.len());
            for chunk in ids.chunks(self.batch_size) {
                let s = self.model.scores_of(chunk)?;
                scores.extend(s.to_dtype(DType::F32)?.to_vec1::<f32>()?);
            }
            Ok(scores)
        })();
        self.model.set_grad_enabled(was);
        out
    }

    /// The model's score head weight, (1, hidden).
    pub fn score_weight(&self) -> Option<Tensor> {
        self.model
            .params()
            .iter()
            .find(|(n, _)| n.ends_with("score.weight"))
            .map(|(_, p)| p.tensor().detach())
    }
}

/// One reward model, or Llama 2's helpfulness + safety pair.
pub enum ModelScorer {
    /// A single reward model.
    Single(Box<RewardModel>),
    /// Llama 2's combination.
    Llama2 {
        /// Helpfulness RM.
        helpfulness: Box<RewardModel>,
        /// Safety RM.
        safety: Box<RewardModel>,
        /// The gate.
        gate: Llama2Gate,
    },
}

impl Scorer for ModelScorer {
    fn score(&mut self, batch: &Completions, metrics: &mut Vec<(String, f64)>) -> Result<Vec<f32>> {
        Ok(self.score_parts(batch, metrics)?.0)
    }

    fn score_parts(
        &mut self,
        batch: &Completions,
        metrics: &mut Vec<(String, f64)>,
    ) -> Result<ScoreParts> {
        match self {
            ModelScorer::Single(rm) => Ok((rm.score(batch)?, Vec::new())),
            ModelScorer::Llama2 {
                helpfulness,
                safety,
                gate,
            } => {
                let h = helpfulness.score(batch)?;
                let s = safety.score(batch)?;
                let tagged: Vec<bool> = batch
                    .prompts
                    .iter()
                    .map(|p| p.tags.contains(&gate.safety_tag))
                    .collect();
                let (combined, gated) = rl::llama2_combine(&h, &s, &tagged, gate.safety_threshold);
                let n = gated.len().max(1) as f64;
                metrics.push((
                    "objective/safety_gated".into(),
                    gated.iter().filter(|&&g| g).count() as f64 / n,
                ));
                metrics.push((
                    "objective/scores_helpfulness".into(),
                    h.iter().map(|&x| x as f64).sum::<f64>() / n,
                ));
                metrics.push((
                    "objective/scores_safety".into(),
                    s.iter().map(|&x| x as f64).sum::<f64>() / n,
                ));
                let combined = if gate.whiten && combined.len() > 1 {
                    rl::whiten_flat(&combined, true)
                } else {
                    combined
                };
                let gated = gated.iter().map(|&g| g as u8 as f32).collect();
                Ok((
                    combined,
                    vec![
                        ("helpfulness".into(), h),
                        ("safety".into(), s),
                        ("safety_gated".into(), gated),
                    ],
                ))
            }
        }
    }

    fn value_head_init(&self) -> Option<Tensor> {
        match self {
            ModelScorer::Single(rm) => rm.score_weight(),
            ModelScorer::Llama2 { helpfulness, .. } => helpfulness.score_weight(),
        }
    }
}

/// Llama 2's two reward models.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RewardModels {
    /// Helpfulness reward model directory.
    pub helpfulness: PathBuf,
    /// Safety reward model directory.
    pub safety: PathBuf,
}

/// The Llama 2 gate: R = R_safety if the prompt is tagged `safety_tag` or
/// σ(R_safety) < `safety_threshold`, else R_helpfulness; then whitened across the batch.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Llama2Gate {
    /// Threshold on σ(safety score) (Llama 2: 0.15).
    pub safety_threshold: f64,
    /// The prompt tag that always routes to the safety model.
    pub safety_tag: String,
    /// Whiten the combined score across the rollout batch (Llama 2 does).
    pub whiten: bool,
}

impl Default for Llama2Gate {
    fn default() -> Self {
        Self {
            safety_threshold: 0.15,
            safety_tag: "safety".into(),
            whiten: true,
        }
    }
}

/// Several scorers summed with weights (TRL's `reward_funcs` with `reward_weights`). Each
/// part's unweighted batch mean is logged as `objective/scores_<name>`.
pub struct WeightedSum {
    parts: Vec<(String, f32, Box<dyn Scorer>)>,
}

impl WeightedSum {
    /// `(name, weight, scorer)` for each part; the value head starts from the first part that
    /// has a score head.
    pub fn new(parts: Vec<(String, f64, Box<dyn Scorer>)>) -> Self {
        Self {
            parts: parts
                .into_iter()
                .map(|(n, w, s)| (n, w as f32, s))
                .collect(),
        }
    }
}

impl Scorer for WeightedSum {
    fn score(&mut self, batch: &Completions, metrics: &mut Vec<(String, f64)>) -> Result<Vec<f32>> {
        Ok(self.score_parts(batch, metrics)?.0)
    }

    fn score_parts(
        &mut self,
        batch: &Completions,
        metrics: &mut Vec<(String, f64)>,
    ) -> Result<ScoreParts> {
        let mut total = vec![0f32; batch.texts.len()];
        let mut parts = Vec::new();
        for (name, w, scorer) in &mut self.parts {
            let (s, sub) = scorer.score_parts(batch, metrics)?;
            if s.len() != total.len() {
                return Err(Error::Config(format!(
                    "reward source `{name}` returned {} scores for {} completions",
                    s.len(),
                    total.len()
                )));
            }
            let mean = s.iter().map(|&x| x as f64).sum::<f64>() / s.len().max(1) as f64;
            metrics.push((format!("objective/scores_{name}"), mean));
            for (t, x) in total.iter_mut().zip(&s) {
                *t += *w * x;
            }
            parts.extend(sub.into_iter().map(|(k, v)| (format!("{name}/{k}"), v)));
            parts.push((name.clone(), s));
        }
        Ok((total, parts))
    }

    fn value_head_init(&self) -> Option<Tensor> {
        self.parts.iter().find_map(|(_, _, s)| s.value_head_init())
    }
}

/// The config keys that choose how completions are scored (PPO's, eval's, sampling's).
pub const SCORER_KEYS: &[&str] = &[
    "reward_model",
    "reward_models",
    "llama2",
    "reward_program",
    "reward_weights",
    "reward_program_timeout",
];

/// How to score completions, as a config gives it: a reward model or Llama 2's pair, and/or a
/// reward program, summed with `reward_weights`. Parse the [`SCORER_KEYS`] of a config table
/// after [`resolve_scorer_paths`], set `batch_size`, [`validate`](Self::validate), then
/// [`load`](Self::load).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ScorerSpec {
    /// `reward_model`: a reward model directory (an HF sequence-classification model or a
    /// SEQ_CLS adapter).
    pub reward_model: Option<PathBuf>,
    /// `reward_models = { helpfulness = "...", safety = "..." }`: Llama 2's pair, combined by
    /// `[llama2]`.
    pub reward_models: Option<RewardModels>,
    /// `[llama2]`: the Llama 2 safety gate.
    pub llama2: Llama2Gate,
    /// `reward_program = ["python3", "judge.py"]`: a command scoring completions over JSON
    /// lines ([`crate::program`]).
    pub reward_program: Option<Vec<String>>,
    /// `reward_weights`: one weight per reward source, the reward model (or pair) first, then
    /// the program; all 1.0 when absent.
    pub reward_weights: Option<Vec<f64>>,
    /// `reward_program_timeout`: seconds the program may take to answer one batch.
    pub reward_program_timeout: f64,
    /// Completions per reward-model forward (not a config key: the command sets it).
    #[serde(skip)]
    pub batch_size: usize,
}

impl Default for ScorerSpec {
    fn default() -> Self {
        Self {
            reward_model: None,
            reward_models: None,
            llama2: Llama2Gate::default(),
            reward_program: None,
            reward_weights: None,
            reward_program_timeout: 60.0,
            batch_size: 8,
        }
    }
}

impl ScorerSpec {
    /// The reward sources given, in `reward_weights` order.
    pub fn sources(&self) -> Vec<&'static str> {
        let mut s = Vec::new();
        if self.reward_model.is_some() {
            s.push("reward_model");
        }
        if self.reward_models.is_some() {
            s.push("reward_models");
        }
        if self.reward_program.is_some() {
            s.push("reward_program");
        }
        s
    }

    /// Checks what serde cannot; the message names the key.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.reward_model.is_some() && self.reward_models.is_some() {
            return Err("give `reward_model` or `reward_models`, not both".into());
        }
        let sources = self.sources();
        if sources.is_empty() {
            return Err(
                "`reward_model` is required (or `reward_models = { helpfulness, \
                        safety }`, or `reward_program = [\"python3\", \"judge.py\"]`)"
                    .into(),
            );
        }
        if let Some(p) = &self.reward_program {
            if p.first().is_none_or(|c| c.is_empty()) {
                return Err(
                    "`reward_program` is empty: give the command and its arguments, \
                            e.g. [\"python3\", \"judge.py\"]"
                        .into(),
                );
            }
        }
        if let Some(w) = &self.reward_weights {
            if w.len() != sources.len() {
                return Err(format!(
                    "`reward_weights` has {} weight{} for {} reward sources ({}): give one \
                     per source, in that order",
                    w.len(),
                    if w.len() == 1 { "" } else { "s" },
                    sources.len(),
                    sources.join(", ")
                ));
            }
            if let Some(x) = w.iter().find(|x| !x.is_finite()) {
                return Err(format!(
                    "`reward_weights` holds {x}: weights must be finite"
                ));
            }
        }
        let t = self.reward_program_timeout;
        if !(t.is_finite() && t > 0.0) {
            return Err(format!(
                "`reward_program_timeout` = {t}: give a positive number of seconds"
            ));
        }
        Ok(())
    }

    /// Loads the reward model(s) and starts the reward program; several sources, or one with
    /// a weight other than 1, are combined by a [`WeightedSum`].
    pub fn load(&self, cache: &mut SourceCache) -> Result<Box<dyn Scorer>> {
        self.validate().map_err(Error::Config)?;
        let bs = self.batch_size;
        let mut parts: Vec<(String, Box<dyn Scorer>)> = Vec::new();
        if let Some(dir) = &self.reward_model {
            let rm = RewardModel::load(dir, bs, cache)?;
            parts.push((
                "reward_model".into(),
                Box::new(ModelScorer::Single(Box::new(rm))),
            ));
        }
        if let Some(rm) = &self.reward_models {
            parts.push((
                "reward_models".into(),
                Box::new(ModelScorer::Llama2 {
                    helpfulness: Box::new(RewardModel::load(&rm.helpfulness, bs, cache)?),
                    safety: Box::new(RewardModel::load(&rm.safety, bs, cache)?),
                    gate: self.llama2.clone(),
                }),
            ));
        }
        if let Some(argv) = &self.reward_program {
            let timeout = Duration::from_secs_f64(self.reward_program_timeout);
            parts.push((
                "reward_program".into(),
                Box::new(RewardProgram::start(argv, timeout)?),
            ));
        }
        let weights = self
            .reward_weights
            .clone()
            .unwrap_or_else(|| vec![1.0; parts.len()]);
        if parts.len() == 1 && weights[0] == 1.0 {
            return Ok(parts.pop().expect("one part").1);
        }
        Ok(Box::new(WeightedSum::new(
            parts
                .into_iter()
                .zip(weights)
                .map(|((n, s), w)| (n, w, s))
                .collect(),
        )))
    }
}

/// Resolves the paths among a config table's scorer keys against `base` (the config file's
/// directory): the reward model directories, and the `reward_program` arguments that name
/// existing files ([`crate::program::resolve_program_args`]).
pub fn resolve_scorer_paths(base: &Path, table: &mut toml::Table) {
    let rel = |v: &mut toml::Value| {
        if let toml::Value::String(s) = v {
            *s = crate::config::relative_to(base, s);
        }
    };
    if let Some(v) = table.get_mut("reward_model") {
        rel(v);
    }
    if let Some(toml::Value::Table(t)) = table.get_mut("reward_models") {
        for (_, x) in t.iter_mut() {
            rel(x);
        }
    }
    if let Some(v) = table.get_mut("reward_program") {
        crate::program::resolve_program_args(base, v);
    }
}
