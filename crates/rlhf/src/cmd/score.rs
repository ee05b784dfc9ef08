//! `rlhf score`: reward-model scores for prompt/response rows.

use std::path::PathBuf;

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
/// scored exactly as given. A row with nothing to score (an empty `text`, an empty message
/// list, or ids that come out empty) is an error naming the file, line and field: scoring it
/// would read a padding token and report a made-up score.
pub fn row_ids(tok: &Tokenizer, row: &Row) -> Result<Vec<u32>> {
    use rlhf_data::Content;
    let (ids, field) = if let Some(m) = jsonl::messages_field(row, "messages")? {
        (
            rlhf_data::reward_ids(tok, None, &Content::Messages(m))
                .map_err(|e| anyhow::anyhow!("{}: {e}", row.at))?,
            "messages",
        )
    } else if let Some(text) = jsonl::str_field(row, "text")? {
        if text.is_empty() {
            bail!(
                "{}: field \"text\" is empty: there is nothing to score; give it text or drop \
                 the row",
                row.at
            );
        }
        (tok.encode(text, true)?, "text")
    } else {
        let content = |field: &str| -> Result<Option<Content>> {
            if let Some(m) = match row.value.get(field) {
                Some(serde_json::Value::Array(_)) => jsonl::messages_field(row, field)?,
                _ => None,
            } {
                return Ok(Some(Content::Messages(m)));
            }
            Ok(jsonl::str_field(row, field)?.map(|s| Content::Text(s.to_string())))
        };
        let (prompt, response) = (content("prompt")?, content("response")?);
        let Some(response) = response else {
            bail!(
                "{}: expected {{\"prompt\", \"response\"}}, {{\"text\"}} or {{\"messages\"}}",
                row.at
            );
        };
        (
            rlhf_data::reward_ids(tok, prompt.as_ref(), &response)
                .map_err(|e| anyhow::anyhow!("{}: {e}", row.at))?,
            "response",
        )
    };
    if ids.is_empty() {
        bail!(
            "{}: field \"{field}\" comes out empty (no tokens): there is nothing to score; \
             give it text or drop the row",
            row.at
        );
    }
    Ok(ids)
}

/// Runs `rlhf score`.
pub fn run(a: Args) -> Result<()> {
    if a.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let tok = super::load_tokenizer(&a.model, a.adapter.as_deref())?;
    // Every row is read and checked before the model is loaded.
    let rows = jsonl::read(&a.input)?;
    let ids: Vec<Vec<u32>> = rows
        .iter()
        .map(|r| row_ids(&tok, r))
        .collect::<Result<_>>()?;
    let model = Model::load(
        &a.model,
        &LoadOptions {
            heads: Heads::Score,
            adapter: a.adapter.clone(),
            // A head initialised here would score at random.
            require_score_head: true,
            ..Default::default()
        },
    )?;
    let pad = model
        .config
        .pad_token_id
        .or(tok.pad_or_eos_token_id())
        .unwrap_or(0);
    let pb = super::progress(rows.len() as u64, "score");
    let mut out = jsonl::Output::not_over(a.output.as_deref(), &[&a.input])?;
    for (chunk_rows, chunk_ids) in rows.chunks(a.batch_size).zip(ids.chunks(a.batch_size)) {
        let batch = Batch::pad(chunk_ids, pad, false);
        let hidden = model.hidden(&batch)?;
        let scores = model.scores(&hidden, &batch)?.to_vec1::<f32>()?;
        for (row, s) in chunk_rows.iter().zip(scores) {
            if !s.is_finite() {
                bail!(
                    "{}: the score is {s}: the model's weights are not finite (NaN or infinite \
                     values in {}{}); retrain it, or score with an earlier checkpoint",
                    row.at,
                    a.model.display(),
                    a.adapter
                        .as_ref()
                        .map(|p| format!(" or the adapter {}", p.display()))
                        .unwrap_or_default()
                );
            }
            let mut v = row.value.clone();
            v.insert("score".into(), serde_json::json!(s));
            out.write(&v)?;
            pb.inc(1);
        }
    }
    pb.finish_and_clear();
    out.finish()
}
