//! `rlhf-data`: reading JSONL/Parquet training files in the record formats of DESIGN.md,
//! validating rows with file:line errors, tokenising them exactly as TRL 1.16 does (but
//! truncating where TRL drops), padding them into batches and ordering them with a seeded,
//! resumable sampler.
//!
//! The usual path, for reward modelling:
//!
//! ```no_run
//! # fn main() -> rlhf_data::Result<()> {
//! use rlhf_data::*;
//! let tok = rlhf_model::tokenizer::Tokenizer::from_dir("model".as_ref())?;
//! let data = load::<Comparison>("train.jsonl".as_ref(), &ReadOptions { skip_invalid: true })?;
//! eprintln!("{}", data.report);
//! let opts = TokenizeOptions { max_length: Some(512), ..Default::default() };
//! let groups = tokenize_comparisons(&tok, &data.records, &opts)?;
//! eprintln!("{}", groups.report);
//! let mut sampler = Sampler::new(groups.examples.len(), 42, true);
//! let idx = sampler.next_batch(8);
//! let batch = collate_reward(idx.iter().map(|&i| &groups.examples[i]), pad_id(&tok)?);
//! # let _ = batch; Ok(()) }
//! ```

pub mod collate;
pub mod error;
pub mod load;
pub mod read;
pub mod records;
pub mod sampler;
pub mod tokenize;

pub use collate::{
    collate_dpo, collate_prompts, collate_reward, collate_sft, pad_id, DpoBatch, RewardBatch,
    SftBatch,
};
pub use error::{Error, Location, Result, Unit};
pub use load::{from_rows, load, Loaded, ReadOptions, ReadReport, Record, MAX_REASONS};
pub use read::{read_rows, rows, FileFormat, RawRow, Rows};
pub use records::{
    Comparison, Content, Degree, Demonstration, DemonstrationBody, MarginTable, PairSafety,
    Preference, PromptRecord, Ranking, Safety, UnpairedPreference,
};
pub use sampler::{Sampler, SamplerState};
pub use tokenize::{
    prompt_ids, reward_ids, tokenize_comparison, tokenize_comparisons, tokenize_demonstration,
    tokenize_demonstrations, tokenize_dpo, tokenize_dpo_pair, tokenize_unpaired,
    tokenize_unpaired_row, DpoExample, KtoExample, RewardGroup, RewardPair, SftExample,
    TokenizeOptions, TokenizeReport, Tokenized, TruncationMode, IGNORE_INDEX,
};
