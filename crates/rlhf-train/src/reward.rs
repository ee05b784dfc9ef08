//! The reward-model trainer (InstructGPT step 2, TRL's `RewardTrainer`): a score head on the
//! backbone trained with −log σ(r_chosen − r_rejected − margin) over every pair of a prompt's
//! comparisons, with TRL's metric names (`accuracy`, `margin`, `mean_reward`, `min_reward`,
//! `max_reward`).

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::Tensor;
use rlhf_data::{collate_reward, Comparison, RewardGroup, TokenizeOptions};
use rlhf_model::{Heads, Model};
use serde::{Deserialize, Serialize};

use crate::config::{self, TrainingArgs};
use crate::losses::reward_loss;
use crate::trainer::{self, MicroOut, Objective, StepScale, Summary};
use crate::Result;

/// Keys of the reward trainer beyond the shared ones (TRL's RewardConfig names).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct RewardArgs {
    /// Adds coefficient·mean((r_c + r_r)²) so rewards stay centred at 0 (Eisenstein et al.).
    pub center_rewards_coefficient: Option<f64>,
    /// Llama 2 margin table for rows with a `degree`: "small" {1, 2/3, 1/3, 0} or
    /// "large" {3, 2, 1, 0}.
    pub margin_table: rlhf_data::MarginTable,
    /// Which end of an over-long pair survives `max_length`: "keep_start" (TRL's default
    /// name; long prompts can cut both answers away) or "keep_end" (the prompt is cut from
    /// its start, so both answers and their EOS stay).
    pub truncation_mode: rlhf_data::TruncationMode,
}

impl Default for RewardArgs {
    fn default() -> Self {
        Self {
            center_rewards_coefficient: None,
            margin_table: rlhf_data::MarginTable::Small,
            truncation_mode: rlhf_data::TruncationMode::KeepStart,
        }
    }
}

/// The keys of [`RewardArgs`].
const REWARD_KEYS: [&str; 3] = [
    "center_rewards_coefficient",
    "margin_table",
    "truncation_mode",
];

/// Every key a reward config may hold.
fn allowed_keys() -> Vec<&'static str> {
    let mut v = config::TRAINING_KEYS.to_vec();
    v.extend(REWARD_KEYS);
    v.push("lora");
    v
}

/// A parsed reward config.
#[derive(Debug, Clone)]
pub struct RewardConfig {
    /// Shared training arguments.
    pub args: TrainingArgs,
    /// Reward-specific arguments.
    pub reward: RewardArgs,
    /// LoRA, when the `[lora]` table is present.
    pub lora: Option<rlhf_model::lora::LoraConfig>,
}

impl RewardConfig {
    /// Reads `path` with `--set` overrides. TRL's RewardConfig defaults apply where the file
    /// is silent (learning_rate 1e-4, max_length 1024).
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        let mut table = config::load_table(path, overrides, &allowed_keys())?;
        let lora = config::take_lora(path, &mut table)?
            .map(reward_lora)
            .transpose()?;
        let reward_table = config::take_keys(&mut table, &REWARD_KEYS);
        table
            .entry("learning_rate")
            .or_insert(toml::Value::Float(1e-4));
        let args: TrainingArgs = config::parse(path, table)?;
        args.validate(path)?;
        let reward: RewardArgs = config::parse(path, reward_table)?;
        Ok(Self { args, reward, lora })
    }
}

/// A reward run's LoRA must save the score head it trains, as PEFT's SEQ_CLS task does (the
/// head joins `modules_to_save`, so the adapter holds it and loads back as a reward model):
/// `task_type` left out is SEQ_CLS; another task type (CAUSAL_LM, ...) is refused, since its
/// adapter would keep the LoRA weights and lose the head.
fn reward_lora(mut lora: rlhf_model::lora::LoraConfig) -> Result<rlhf_model::lora::LoraConfig> {
    match lora.task_type.as_deref() {
        None => lora.task_type = Some("SEQ_CLS".into()),
        Some("SEQ_CLS") => {}
        Some(t) => {
            return Err(crate::Error::invalid(
                "lora.task_type",
                format!("{t:?}"),
                format!(
                    "\"SEQ_CLS\" (or no task_type) for a reward model: it trains a score head, \
                     and only PEFT's sequence-classification task saves the head with the \
                     adapter (through modules_to_save); with {t:?} the trained head would be lost"
                ),
            ))
        }
    }
    Ok(lora)
}

/// The reward objective: one micro-batch of pair groups → loss and TRL's metrics.
pub struct RewardObjective {
    /// Padding id.
    pub pad_id: u32,
    /// See [`RewardArgs::center_rewards_coefficient`].
    pub center_rewards_coefficient: Option<f64>,
}

impl RewardObjective {
    // groups -> (scaled loss, stats, pairs, tokens)
    fn forward(
        &self,
        model: &Model,
        groups: &[&RewardGroup],
    ) -> Result<(Tensor, crate::losses::RewardStats, usize, usize)> {
        let rb = collate_reward(groups.iter().copied(), self.pad_id);
        let p = rb.num_pairs;
        // Scored unpadded (packed into one row where the model can), with the padded
        // batch's rule for where a score is read; (2P): chosen rows, then rejected.
        let seqs: Vec<Vec<u32>> = rb
            .batch
            .input_ids
            .iter()
            .zip(&rb.batch.attention_mask)
            .map(|(ids, m)| {
                ids.iter()
                    .zip(m)
                    .filter(|(_, &m)| m == 1)
                    .map(|(&i, _)| i)
                    .collect()
            })
            .collect();
        let scores = model.scores_of(&seqs)?;
        let chosen = scores.narrow(0, 0, p)?;
        let rejected = scores.narrow(0, p, p)?;
        let device = scores.device();
        let margins = match &rb.margins {
            Some(m) => Some(Tensor::new(m.as_slice(), device)?.to_dtype(scores.dtype())?),
            None => None,
        };
        let uniform = rb
            .pair_weights
            .iter()
            .all(|&w| (w - 1.0 / p as f32).abs() < 1e-9);
        let weights = if uniform {
            None
        } else {
            Some(Tensor::new(rb.pair_weights.as_slice(), device)?.to_dtype(scores.dtype())?)
        };
        let (loss, stats) = reward_loss(
            &chosen,
            &rejected,
            margins.as_ref(),
            weights.as_ref(),
            self.center_rewards_coefficient,
        )?;
        let tokens = rb
            .batch
            .attention_mask
            .iter()
            .flatten()
            .filter(|&&m| m == 1)
            .count();
        Ok((loss, stats, p, tokens))
    }
}

impl Objective for RewardObjective {
    type Example = RewardGroup;

    fn loss(&self, model: &Model, batch: &[&RewardGroup], scale: StepScale) -> Result<MicroOut> {
        let (loss, s, pairs, tokens) = self.forward(model, batch)?;
        // transformers divides a mean loss by the accumulation steps.
        let loss = (loss / scale.micro_batches as f64)?;
        Ok(MicroOut {
            loss,
            metrics: vec![
                ("min_reward", s.min_reward),
                ("mean_reward", s.mean_reward),
                ("max_reward", s.max_reward),
                ("accuracy", s.accuracy),
                ("margin", s.margin),
            ],
            samples: pairs,
            tokens,
        })
    }

    fn evaluate(
        &self,
        model: &Model,
        examples: &[RewardGroup],
        batch_size: usize,
    ) -> Result<BTreeMap<String, f64>> {
        let mut sums: BTreeMap<String, f64> = BTreeMap::new();
        let mut n = 0.0;
        for chunk in examples.chunks(batch_size.max(1)) {
            let refs: Vec<&RewardGroup> = chunk.iter().collect();
            let (loss, s, _, _) = self.forward(model, &refs)?;
            let l = loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
            for (k, v) in [
                ("loss", l),
                ("accuracy", s.accuracy),
                ("margin", s.margin),
                ("mean_reward", s.mean_reward),
                ("min_reward", s.min_reward),
                ("max_reward", s.max_reward),
            ] {
                *sums.entry(k.to_string()).or_default() += v;
            }
            n += 1.0;
        }
        Ok(sums.into_iter().map(|(k, v)| (k, v / n)).collect())
    }
}

/// Loads and tokenises a comparison file, logging what was skipped or truncated.
pub fn load_groups(
    path: &Path,
    tok: &rlhf_model::tokenizer::Tokenizer,
    args: &TrainingArgs,
    reward: &RewardArgs,
) -> Result<Vec<RewardGroup>> {
    let data = rlhf_data::load::<Comparison>(
        path,
        &rlhf_data::ReadOptions {
            skip_invalid: args.skip_invalid,
        },
    )?;
    if data.report.skipped > 0 {
        tracing::warn!("{}", data.report);
    }
    let opts = TokenizeOptions {
        max_length: Some(args.max_length),
        truncation_mode: reward.truncation_mode,
        margin_table: reward.margin_table,
        skip_invalid: args.skip_invalid,
        ..Default::default()
    };
    let t = rlhf_data::tokenize_comparisons(tok, &data.records, &opts)?;
    tracing::info!("{}: {}", path.display(), t.report);
    Ok(t.examples)
}

/// `rlhf reward --config FILE [--set k=v]... [--resume [DIR]]`.
pub fn run(
    config_path: &Path,
    overrides: &[String],
    resume: Option<Option<&Path>>,
) -> Result<Summary> {
    let cfg = RewardConfig::load(config_path, overrides)?;
    let args = &cfg.args;
    // Before anything is written: not into the model, the lock, no other run's checkpoints.
    let _lock = crate::outdir::prepare_run(args, &[], resume.is_some())?;
    let tok = rlhf_model::tokenizer::Tokenizer::from_dir(&args.model)?;
    let train_set = load_groups(&args.train_file, &tok, args, &cfg.reward)?;
    let eval_set = match &args.eval_file {
        Some(p) => load_groups(p, &tok, args, &cfg.reward)?,
        None => Vec::new(),
    };
    let resume_dir = crate::trainer::resume_dir(&args.output_dir, resume)?;
    let model = crate::checkpoint::load_model(
        args,
        cfg.lora.as_ref(),
        Heads::Score,
        resume_dir.as_deref(),
    )?;
    let (trainable, all) = model.params().counts();
    tracing::info!(
        "reward model: {trainable} trainable of {all} parameters ({:.2}%), {} train groups, {} eval groups",
        100.0 * trainable as f64 / all.max(1) as f64,
        train_set.len(),
        eval_set.len()
    );
    let objective = RewardObjective {
        pad_id: rlhf_data::pad_id(&tok)?,
        center_rewards_coefficient: cfg.reward.center_rewards_coefficient,
    };
    // The tokenizer travels with the output so `rlhf score` and PEFT users find it.
    tok.save(&args.output_dir)?;
    trainer::train(
        args,
        &model,
        &objective,
        &train_set,
        &eval_set,
        Heads::Score,
        resume_dir.as_deref(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_mode_is_read_from_the_config() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("reward.toml");
        std::fs::write(&p, "model = \"m\"\ntrain_file = \"t.jsonl\"\n").unwrap();
        let cfg = RewardConfig::load(&p, &[]).unwrap();
        assert_eq!(
            cfg.reward.truncation_mode,
            rlhf_data::TruncationMode::KeepStart
        );
        let set = |v: &str| RewardConfig::load(&p, &[format!("truncation_mode={v}")]);
        assert_eq!(
            set("keep_end").unwrap().reward.truncation_mode,
            rlhf_data::TruncationMode::KeepEnd
        );
        let err = set("keep_middle").unwrap_err().to_string();
        assert!(err.contains("keep_middle"), "{err}");
    }
}
