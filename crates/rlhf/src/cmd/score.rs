//! `rlhf score`: reward-model scores for prompt/response rows.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use rlhf_model::tokenizer::Tokenizer;
use rlhf_model::{Batch, Heads, LoadOptions, Model};

use crate::jsonl::{self, Row};

/// Options of `rlhf score`.
#[derive(clap::Args)]
pub struct Args {
    /// Reward model directory (a score head `score.weight`).
    #[arg(long)]
    model: PathBuf,
    /// PEFT LoRA adapter (with the score head in modules_to_save).
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// JSONL rows {"prompt","response"}, {"text"} or {"messages"}.
    #[arg(long)]
    input: PathBuf,
    /// Output JSONL (default: stdout).
    #[arg(long)]
    output: Option<PathBuf>,
    /// Rows per forward batch.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
}

/// The ids a reward model scores for a row, built as the reward trainer builds them (TRL):
/// prompt + response with EOS appended; `messages` through the chat template; `text` as given.
pub fn row_ids(tok: &Tokenizer, path: &Path, row: &Row) -> Result<Vec<u32>> {
    if let Some(m) = jsonl::messages_field(path, row, "messages")? {
        let text = tok.apply_chat_template(&m, false)?;
        return Ok(tok.encode(&text, false)?);
    }
    if let Some(text) = jsonl::str_field(path, row, "text")? {
        return Ok(tok.encode(text, true)?);
    }
    let prompt = jsonl::str_field(path, row, "prompt")?;
    let response = jsonl::str_field(path, row, "response")?;
    let (Some(prompt), Some(response)) = (prompt, response) else {
        bail!(
            "{}:{}: expected {{\"prompt\", \"response\"}}, {{\"text\"}} or {{\"messages\"}}",
            path.display(),
            row.line
        );
    };
    let mut ids = tok.encode(&format!("{prompt}{response}"), true)?;
    if let Some(eos) = tok.eos_token_id() {
        if ids.last() != Some(&eos) {
            ids.push(eos);
        }
    }
    Ok(ids)
}

/// Runs `rlhf score`.
pub fn run(a: Args) -> Result<()> {
    if a.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let tok = super::load_tokenizer(&a.model, a.adapter.as_deref())?;
    let model = Model::load(
        &a.model,
        &LoadOptions {
            heads: Heads::Score,
            adapter: a.adapter.clone(),
            ..Default::default()
        },
    )?;
    if !model.params().iter().any(|(n, _)| n.ends_with("score.weight")) {
        bail!("{}: no score head", a.model.display());
    }
    let rows = jsonl::read(&a.input)?;
    let ids: Vec<Vec<u32>> = rows.iter().map(|r| row_ids(&tok, &a.input, r)).collect::<Result<_>>()?;
    let pad = model.config.pad_token_id.or(tok.pad_or_eos_token_id()).unwrap_or(0);
    let pb = super::progress(rows.len() as u64, "score");
    let mut out = jsonl::Output::new(a.output.as_deref());
    for (chunk_rows, chunk_ids) in rows.chunks(a.batch_size).zip(ids.chunks(a.batch_size)) {
        let batch = Batch::pad(chunk_ids, pad, false);
        let hidden = model.hidden(&batch)?;
        let scores = model.scores(&hidden, &batch)?.to_vec1::<f32>()?;
        for (row, s) in chunk_rows.iter().zip(scores) {
            let mut v = row.value.clone();
            v.insert("score".into(), serde_json::json!(s));
            out.write(&v)?;
            pb.inc(1);
        }
    }
    pb.finish_and_clear();
    out.finish()
}
