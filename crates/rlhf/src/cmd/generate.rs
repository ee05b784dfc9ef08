//! `rlhf generate`: prompts in, completions out.

use std::path::PathBuf;

use anyhow::{bail, Result};
use rlhf_model::generate::{generate, GenerationConfig};
use rlhf_model::tokenizer::{ChatMessage, Tokenizer};
use rlhf_model::{Heads, LoadOptions, Model};
use serde_json::Value;

use crate::jsonl::{self, Row};

/// Options of `rlhf generate`.
#[derive(clap::Args)]
pub struct Args {
    /// Model directory (Hugging Face format).
    #[arg(long)]
    model: PathBuf,
    /// PEFT LoRA adapter directory to apply.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// JSONL rows with "prompt" (a string, or a list of messages) or "messages".
    #[arg(long)]
    input: PathBuf,
    /// Output JSONL (default: stdout).
    #[arg(long)]
    output: Option<PathBuf>,
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Keep the k most likely tokens when sampling.
    #[arg(long)]
    top_k: Option<usize>,
    /// Nucleus sampling mass.
    #[arg(long)]
    top_p: Option<f64>,
    /// Completions per prompt.
    #[arg(long, default_value_t = 1)]
    num_return_sequences: usize,
    /// Sampler seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Wrap plain "prompt" strings in the model's chat template as a user turn.
    #[arg(long)]
    chat: bool,
    /// Prompts per forward batch.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Dtype of the frozen linear weights while decoding (transformers' `torch_dtype`): bf16
    /// keeps them once in bf16 (half the bytes read per token) with the products in f32;
    /// f32 keeps them as loaded.
    #[arg(long, value_enum, default_value_t = WeightDtype::Bf16)]
    dtype: WeightDtype,
}

/// The dtype the frozen linear weights are kept in for decoding (`--dtype`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum WeightDtype {
    /// bf16 weights, f32 products ([`Model::keep_frozen_in_bf16_for_decoding`]).
    Bf16,
    /// The weights as loaded (f32).
    F32,
}

impl WeightDtype {
    /// Whether the weights are kept in bf16.
    pub fn is_bf16(self) -> bool {
        self == WeightDtype::Bf16
    }
}

/// Converts a model that only decodes to `dtype` and logs the choice once.
pub fn apply_weight_dtype(model: &mut Model, dtype: WeightDtype) -> Result<()> {
    match dtype {
        WeightDtype::Bf16 => {
            let n = model.keep_frozen_in_bf16_for_decoding()?;
            tracing::info!(
                "decoding with bf16 weights ({n} frozen tensors kept in bf16, products in f32; \
                 --dtype f32 keeps f32)"
            );
        }
        WeightDtype::F32 => tracing::info!("decoding with f32 weights (--dtype f32)"),
    }
    Ok(())
}

/// A prompt as the model sees it: text rendered through the chat template when asked, then
/// ids. A prompt with no ids at all is an error naming the file, line and field (the model
/// has no token to continue from). An empty `prompt` string is a prompt where the tokenizer
/// adds a BOS token or `--chat` wraps it in the template's turn header: unconditional
/// generation from BOS is a use of its own. An empty message list is refused (by
/// [`jsonl::messages_field`]): a conversation without a message is a data mistake, and the
/// template would render only its generation prompt.
pub fn prompt_ids(tok: &Tokenizer, row: &Row, chat: bool) -> Result<Vec<u32>> {
    let (field, messages) = match row.value.get("prompt") {
        Some(Value::Array(_)) => ("prompt", jsonl::messages_field(row, "prompt")?),
        _ => ("messages", jsonl::messages_field(row, "messages")?),
    };
    let (field, ids, why) = if let Some(m) = messages {
        let text = tok.apply_chat_template(&m, true)?;
        // The template already holds any BOS it wants.
        (
            field,
            tok.encode(&text, false)?,
            "renders to no tokens through the chat template",
        )
    } else {
        let Some(prompt) = jsonl::str_field(row, "prompt")? else {
            bail!(
                "{}: no \"prompt\" or \"messages\" field; rows look like {{\"prompt\": \"...\"}}",
                row.at
            );
        };
        let why = "is empty and comes out as no tokens (this tokenizer adds no BOS token; pass \
                   --chat to wrap it in the chat template)";
        if chat {
            let text = tok.apply_chat_template(&[ChatMessage::new("user", prompt)], true)?;
            ("prompt", tok.encode(&text, false)?, why)
        } else {
            ("prompt", tok.encode(prompt, true)?, why)
        }
    };
    if ids.is_empty() {
        bail!(
            "{}: field \"{field}\" {why}, so the model has nothing to continue from; give it \
             text or drop the row",
            row.at
        );
    }
    Ok(ids)
}

/// Runs `rlhf generate`.
pub fn run(a: Args) -> Result<()> {
    if a.batch_size == 0 || a.num_return_sequences == 0 {
        bail!("--batch-size and --num-return-sequences must be at least 1");
    }
    let tok = super::load_tokenizer(&a.model, a.adapter.as_deref())?;
    // Every row is read and checked before the model is loaded.
    let rows = jsonl::read(&a.input)?;
    let mut prompts = Vec::with_capacity(rows.len());
    for row in &rows {
        prompts.push(prompt_ids(&tok, row, a.chat)?);
    }
    let mut model = Model::load(
        &a.model,
        &LoadOptions {
            heads: Heads::Lm,
            adapter: a.adapter.clone(),
            ..Default::default()
        },
    )?;
    apply_weight_dtype(&mut model, a.dtype)?;
    let cfg = GenerationConfig {
        max_new_tokens: a.max_new_tokens,
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        eos_token_ids: rlhf_model::generate::eos_ids(&model, &tok),
        pad_token_id: tok.pad_or_eos_token_id().unwrap_or(0),
        seed: a.seed,
    };
    // Each prompt appears num_return_sequences times in a row.
    let jobs: Vec<(usize, usize)> = (0..rows.len())
        .flat_map(|r| (0..a.num_return_sequences).map(move |s| (r, s)))
        .collect();
    let pb = super::progress(jobs.len() as u64, "generate");
    let mut out = jsonl::Output::not_over(a.output.as_deref(), &[&a.input])?;
    for (chunk_no, chunk) in jobs.chunks(a.batch_size).enumerate() {
        let batch: Vec<Vec<u32>> = chunk.iter().map(|&(r, _)| prompts[r].clone()).collect();
        let cfg = GenerationConfig {
            seed: a.seed.wrapping_add(chunk_no as u64),
            ..cfg.clone()
        };
        let gens = generate(&model, &batch, &cfg)?;
        for (&(r, s), g) in chunk.iter().zip(gens) {
            let mut row = rows[r].value.clone();
            row.insert(
                "completion".into(),
                tok.decode(&g.completion_ids, true)?.into(),
            );
            row.insert("completion_ids".into(), serde_json::json!(g.completion_ids));
            row.insert(
                "finish_reason".into(),
                if g.finished { "eos" } else { "length" }.into(),
            );
            if a.num_return_sequences > 1 {
                row.insert("sequence_index".into(), s.into());
            }
            out.write(&row)?;
            pb.inc(1);
        }
    }
    pb.finish_and_clear();
    out.finish()
}
