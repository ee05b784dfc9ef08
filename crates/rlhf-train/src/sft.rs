//! Supervised fine-tuning (InstructGPT step 1, TRL's `SFTTrainer`): next-token cross-entropy on
//! the completion tokens only (prompt tokens are labelled −100), chat templates for `messages`
//! rows, LoRA or full fine-tuning. The loss is normalised by the labelled tokens of the whole
//! optimiser step, as transformers does with `num_items_in_batch`.

use std::collections::BTreeMap;
use std::path::Path;

use rlhf_data::{collate_sft, Demonstration, SftExample, TokenizeOptions, IGNORE_INDEX};
use rlhf_model::{Heads, Model};
use serde::{Deserialize, Serialize};

use crate::config::{self, TrainingArgs};
use crate::losses::hidden_nll_sum;
use crate::trainer::{self, MicroOut, Objective, StepScale, Summary};
use crate::Result;

/// Keys of the SFT trainer beyond the shared ones (TRL's SFTConfig names).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct SftArgs {
    /// No loss on prompt tokens of prompt/completion rows.
    pub completion_only_loss: bool,
    /// Loss on assistant turns only for `messages` rows.
    pub assistant_only_loss: bool,
}

impl Default for SftArgs {
    fn default() -> Self {
        Self {
            completion_only_loss: true,
            assistant_only_loss: true,
        }
    }
}

const SFT_KEYS: [&str; 2] = ["completion_only_loss", "assistant_only_loss"];

/// A parsed SFT config.
#[derive(Debug, Clone)]
pub struct SftConfig {
    /// Shared training arguments.
    pub args: TrainingArgs,
    /// SFT-specific arguments.
    pub sft: SftArgs,
    /// LoRA, when the `[lora]` table is present.
    pub lora: Option<rlhf_model::lora::LoraConfig>,
}

impl SftConfig {
    /// Reads `path` with `--set` overrides; TRL's SFTConfig defaults where the file is silent
    /// (learning_rate 2e-5, max_length 1024).
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        let mut allowed = config::TRAINING_KEYS.to_vec();
        allowed.extend(SFT_KEYS);
        allowed.push("lora");
        let mut table = config::load_table(path, overrides, &allowed)?;
        let lora = config::take_lora(path, &mut table)?;
        let own = config::take_keys(&mut table, &SFT_KEYS);
        table
            .entry("learning_rate")
            .or_insert(toml::Value::Float(2e-5));
        let args: TrainingArgs = config::parse(path, table)?;
        args.validate(path)?;
        Ok(Self {
            args,
            sft: config::parse(path, own)?,
            lora,
        })
    }
}

/// The SFT objective.
pub struct SftObjective {
    /// Padding id.
    pub pad_id: u32,
}

/// Labels shifted so position i holds the token position i predicts.
fn shifted(labels: &[i64]) -> Vec<i64> {
    let mut v: Vec<i64> = labels.iter().skip(1).copied().collect();
    v.push(IGNORE_INDEX);
    v
}

impl SftObjective {
    // examples -> (sum of token NLL, labelled tokens, non-pad tokens)
    fn nll(
        &self,
        model: &Model,
        examples: &[&SftExample],
    ) -> Result<(candle_core::Tensor, usize, usize)> {
        let b = collate_sft(examples.iter().copied(), self.pad_id);
        let hidden = model.hidden(&b.batch)?;
        let labels: Vec<Vec<i64>> = b.labels.iter().map(|l| shifted(l)).collect();
        let (sum, n) = hidden_nll_sum(model, &hidden, &labels)?;
        let tokens = b
            .batch
            .attention_mask
            .iter()
            .flatten()
            .filter(|&&m| m == 1)
            .count();
        Ok((sum, n, tokens))
    }
}

impl Objective for SftObjective {
    type Example = SftExample;

    fn items(&self, ex: &SftExample) -> usize {
        ex.labels
            .iter()
            .skip(1)
            .filter(|&&l| l != IGNORE_INDEX)
            .count()
    }

    fn loss(&self, model: &Model, batch: &[&SftExample], scale: StepScale) -> Result<MicroOut> {
        let (sum, n, tokens) = self.nll(model, batch)?;
        let loss = (sum / scale.step_items.max(1) as f64)?;
        let micro_mean = loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?
            * scale.step_items.max(1) as f64
            / n.max(1) as f64;
        Ok(MicroOut {
            loss,
            metrics: vec![("mean_token_nll", micro_mean)],
            samples: batch.len(),
            tokens,
        })
    }

    fn evaluate(
        &self,
        model: &Model,
        examples: &[SftExample],
        batch_size: usize,
    ) -> Result<BTreeMap<String, f64>> {
        let (mut sum, mut n) = (0.0, 0usize);
        for chunk in examples.chunks(batch_size.max(1)) {
            let refs: Vec<&SftExample> = chunk.iter().collect();
            let (s, k, _) = self.nll(model, &refs)?;
            sum += s.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
            n += k;
        }
        let loss = sum / n.max(1) as f64;
        Ok(BTreeMap::from([
            ("loss".to_string(), loss),
            ("perplexity".to_string(), loss.exp()),
        ]))
    }
}

/// Loads and tokenises a demonstration file, logging skips and truncation.
pub fn load_examples(
    path: &Path,
    tok: &rlhf_model::tokenizer::Tokenizer,
    args: &TrainingArgs,
    sft: &SftArgs,
) -> Result<Vec<SftExample>> {
    let data = rlhf_data::load::<Demonstration>(
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
        completion_only_loss: sft.completion_only_loss,
        assistant_only_loss: sft.assistant_only_loss,
        skip_invalid: args.skip_invalid,
        ..Default::default()
    };
    let t = rlhf_data::tokenize_demonstrations(tok, &data.records, &opts)?;
    tracing::info!("{}: {}", path.display(), t.report);
    Ok(t.examples)
}

/// `rlhf sft --config FILE [--set k=v]... [--resume [DIR]]`.
pub fn run(
    config_path: &Path,
    overrides: &[String],
    resume: Option<Option<&Path>>,
) -> Result<Summary> {
    let cfg = SftConfig::load(config_path, overrides)?;
    let args = &cfg.args;
    // Before anything is written: not into the model, the lock, no other run's checkpoints.
    let _lock = crate::outdir::prepare_run(args, &[], resume.is_some())?;
    let tok = rlhf_model::tokenizer::Tokenizer::from_dir(&args.model)?;
    let train_set = load_examples(&args.train_file, &tok, args, &cfg.sft)?;
    let eval_set = match &args.eval_file {
        Some(p) => load_examples(p, &tok, args, &cfg.sft)?,
        None => Vec::new(),
    };
    let resume_dir = crate::trainer::resume_dir(&args.output_dir, resume)?;
    let model =
        crate::checkpoint::load_model(args, cfg.lora.as_ref(), Heads::Lm, resume_dir.as_deref())?;
    let objective = SftObjective {
        pad_id: rlhf_data::pad_id(&tok)?,
    };
    tok.save(&args.output_dir)?;
    trainer::train(
        args,
        &model,
        &objective,
        &train_set,
        &eval_set,
        Heads::Lm,
        resume_dir.as_deref(),
    )
}
