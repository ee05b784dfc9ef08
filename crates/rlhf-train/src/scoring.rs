//! Scoring completions: reward models (each with its own tokenizer and chat template),
//! Llama 2's helpfulness + safety combination, or any rule that implements [`Scorer`].

use std::path::Path;

use candle_core::{DType, Tensor};
use rlhf_data::{Content, PromptRecord};
use rlhf_model::model::SourceCache;
use rlhf_model::tokenizer::{ChatMessage, Tokenizer};
use rlhf_model::{Heads, LoadOptions, Model};

use crate::ppo::Llama2Gate;
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
}

/// What scores completions: reward models, or any rule (tests, rule-based rewards).
pub trait Scorer {
    /// One score per completion; `metrics` receives extras (e.g. the share gated to safety).
    fn score(&mut self, batch: &Completions, metrics: &mut Vec<(String, f64)>) -> Result<Vec<f32>>;

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
}

impl RewardModel {
    /// Loads a reward model (an HF directory with a score head, or a SEQ_CLS adapter).
    pub fn load(dir: &Path, batch_size: usize, cache: &mut SourceCache) -> Result<Self> {
        let model = Model::load_cached(
            dir,
            &LoadOptions {
                heads: Heads::Score,
                ..Default::default()
            },
            cache,
        )?;
        if !model
            .params()
            .iter()
            .any(|(n, _)| n.ends_with("score.weight"))
        {
            return Err(Error::Config(format!(
                "{}: no score head (score.weight): is this a reward model?",
                dir.display()
            )));
        }
        let tok = Tokenizer::from_dir(dir)?;
        Ok(Self {
            model,
            tok,
            batch_size: batch_size.max(1),
        })
    }

    /// Scores each (prompt, completion) as the reward trainer built its inputs: prompt text +
    /// completion + EOS, or the conversation with the completion as the assistant's turn,
    /// through this model's own chat template.
    pub fn score_texts(&self, prompts: &[&Content], completions: &[String]) -> Result<Vec<f32>> {
        let mut ids = Vec::with_capacity(prompts.len());
        for (p, c) in prompts.iter().zip(completions) {
            let response = match p {
                Content::Text(_) => Content::Text(c.clone()),
                Content::Messages(_) => Content::Messages(vec![ChatMessage::new("assistant", c)]),
            };
            ids.push(rlhf_data::reward_ids(&self.tok, Some(p), &response)?);
        }
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
        let (prompts, completions) = (batch.prompts, batch.texts);
        let contents: Vec<&Content> = prompts.iter().map(|p| &p.prompt).collect();
        match self {
            ModelScorer::Single(rm) => rm.score_texts(&contents, completions),
            ModelScorer::Llama2 {
                helpfulness,
                safety,
                gate,
            } => {
                let h = helpfulness.score_texts(&contents, completions)?;
                let s = safety.score_texts(&contents, completions)?;
                let tagged: Vec<bool> = prompts
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
                Ok(if gate.whiten && combined.len() > 1 {
                    rl::whiten_flat(&combined, true)
                } else {
                    combined
                })
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
