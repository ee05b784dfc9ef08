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

/// The ids a reward model scores for a row, built by the reward trainer's own rule
/// (`rlhf_data::reward_ids`, TRL's: prompt + response with EOS text appended; message lists
/// through the chat template) so a pair scores the same in training and here; `text` rows are
/// scored exactly as given.
pub fn row_ids(tok: &Tokenizer, path: &Path, row: &Row) -> Result<Vec<u32>> {
    use rlhf_data::Content;
    if let Some(m) = jsonl::messages_field(path, row, "messages")? {
        return Ok(rlhf_data::reward_ids(tok, None, &Content::Messages(m))?);
    }
    if let Some(text) = jsonl::str_field(path, row, "text")? {
        return Ok(tok.encode(text, true)?);
    }
    let content = |field: &str| -> Result<Option<Content>> {
        if let Some(m) = match row.value.get(field) {
            Some(serde_json::Value::Array(_)) => jsonl::messages_field(path, row, field)?,
            _ => None,
        } {
            return Ok(Some(Content::Messages(m)));
        }
        Ok(jsonl::str_field(path, row, field)?.map(|s| Content::Text(s.to_string())))
    };
    let (prompt, response) = (content("prompt")?, content("response")?);
    let Some(response) = response else {
        bail!(
            "{}:{}: expected {{\"prompt\", \"response\"}}, {{\"text\"}} or {{\"messages\"}}",
            path.display(),
            row.line
        );
    };
    rlhf_data::reward_ids(tok, prompt.as_ref(), &response)
        .map_err(|e| anyhow::anyhow!("{}:{}: {e}", path.display(), row.line))
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
    if !model
        .params()
        .iter()
        .any(|(n, _)| n.ends_with("score.weight"))
    {
        bail!("{}: no score head", a.model.display());
    }
    let rows = jsonl::read(&a.input)?;
    let ids: Vec<Vec<u32>> = rows
        .iter()
        .map(|r| row_ids(&tok, &a.input, r))
        .collect::<Result<_>>()?;
    let pad = model
        .config
        .pad_token_id
        .or(tok.pad_or_eos_token_id())
        .unwrap_or(0);
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
