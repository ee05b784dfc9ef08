//! Tokenising records exactly as TRL 1.16 prepares its datasets, with truncation instead of
//! TRL's silent dropping.
//!
//! The rules, from TRL's `RewardTrainer`, `SFTTrainer` and `DPOTrainer` `_prepare_dataset`
//! (checked id for id against TRL in tests/trl_parity.rs):
//!
//! - Plain-text rows get the EOS token *text* appended to the answer (`chosen`, `rejected`,
//!   `completion`, `text`) unless it already ends with it, and are encoded with
//!   `add_special_tokens = true` (so a Llama-style post-processor adds BOS).
//! - Conversational rows (message lists) are rendered with the chat template and encoded with
//!   `add_special_tokens = false` (the template writes BOS itself); no EOS is appended.
//! - Reward: `prompt + chosen` and `prompt + rejected` (texts or message lists concatenated);
//!   the implicit-prompt form tokenises `chosen` and `rejected` as they are.
//! - SFT prompt-completion: the completion starts where the tokenised prompt (with the
//!   generation prompt, for conversations) and the tokenised prompt+completion diverge (TRL's
//!   `common_prefix_length`); prompt tokens get label [`IGNORE_INDEX`].
//! - DPO: prompt ids and the two completions' ids split at the shorter common prefix; the
//!   implicit-prompt form first takes the shared start of `chosen` and `rejected` as the prompt
//!   (TRL's `extract_prompt`, quirks included).
//! - KTO: prompt ids and the completion's ids split where the tokenised prompt and the
//!   tokenised prompt + completion diverge, as for DPO. (TRL's KTOTrainer cuts at the prompt's
//!   length instead, which is the same split whenever the prompt's tokens are a prefix of the
//!   whole, the case it warns about otherwise; cutting at the common prefix keeps the sequence
//!   the model reads equal to the tokenised prompt + completion.)
//!
//! Where this differs from TRL, on purpose:
//! - Sequences longer than `max_length` are truncated (keeping the start, TRL's default
//!   `truncation_mode`) and counted in a [`TokenizeReport`]; TRL's RewardTrainer drops such
//!   pairs without a word. Reward pairs may instead keep their end
//!   ([`TruncationMode::KeepEnd`]): the prompt is cut from its start, so a long conversation
//!   keeps both answers and the EOS the score is read at. Examples left with nothing to learn from (an SFT example with no
//!   label, a DPO prompt that fills `max_length`) are dropped, as TRL does, and counted.
//! - `messages` rows train on assistant turns only by default
//!   ([`TokenizeOptions::assistant_only_loss`]; TRL defaults to all tokens). TRL finds assistant
//!   tokens through `{% generation %}` markers, which few templates have; here every template
//!   works: for assistant turn `i`, its tokens run from where `messages[..i]` rendered with the
//!   generation prompt stops matching the full conversation's ids to where `messages[..=i]`
//!   stops matching. That is the turn's content and the end-of-turn text the template writes
//!   after it (e.g. `<|im_end|>\n`), which for templates whose `{% generation %}` block covers
//!   the content and end-of-turn text is the same set of tokens.

use std::fmt;

use rlhf_model::tokenizer::{ChatMessage, Tokenizer};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Location, Result};
use crate::load::MAX_REASONS;
use crate::records::{
    Comparison, Content, Demonstration, DemonstrationBody, MarginTable, Preference,
    UnpairedPreference,
};

/// The label of tokens that do not count in the loss (PyTorch's `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

/// Which end of an over-long sequence survives truncation (TRL's `truncation_mode` values).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TruncationMode {
    /// Keep the first `max_length` tokens (TRL's default): a prompt that fills the window
    /// cuts both answers away.
    #[default]
    KeepStart,
    /// Keep the last `max_length` tokens: the prompt is cut from its start and the answers,
    /// with their EOS, stay.
    KeepEnd,
}

impl TruncationMode {
    /// `ids` cut to at most `max` tokens from the chosen end.
    fn apply(self, ids: &mut Vec<u32>, max: usize) {
        match self {
            TruncationMode::KeepStart => ids.truncate(max),
            TruncationMode::KeepEnd => {
                let extra = ids.len().saturating_sub(max);
                ids.drain(..extra);
            }
        }
    }
}

/// Settings for turning records into token ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TokenizeOptions {
    /// Longest sequence kept; longer ones are cut, keeping the start. `None`: no limit.
    pub max_length: Option<usize>,
    /// Reward and DPO pairs: which end of an over-long sequence is kept (SFT and KTO keep the
    /// start). DPO pairs with [`TruncationMode::KeepEnd`] keep their ids whole and are cut row
    /// by row when batched.
    pub truncation_mode: TruncationMode,
    /// Which Llama 2 table turns a pair's `degree` into a margin.
    pub margin_table: MarginTable,
    /// SFT prompt-completion rows: no loss on prompt tokens (TRL's default for such rows).
    pub completion_only_loss: bool,
    /// SFT `messages` rows: loss on assistant turns only (TRL's flag; its default is `false`).
    pub assistant_only_loss: bool,
    /// Count rows the tokenizer fails on (e.g. a chat template's `raise_exception`) instead of
    /// failing.
    pub skip_invalid: bool,
}

impl Default for TokenizeOptions {
    fn default() -> Self {
        Self {
            max_length: None,
            truncation_mode: TruncationMode::KeepStart,
            margin_table: MarginTable::Small,
            completion_only_loss: true,
            assistant_only_loss: true,
            skip_invalid: false,
        }
    }
}

/// What tokenising a data set did, for the trainer to log.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenizeReport {
    /// Examples produced: SFT examples, reward pairs (a ranking counts its pairs), DPO pairs.
    pub examples: usize,
    /// Examples with a sequence cut to `max_length`.
    pub truncated: usize,
    /// Tokens removed by truncation, over all sequences.
    pub tokens_cut: usize,
    /// Longest sequence before truncation.
    pub longest: usize,
    /// Pairs whose chosen and rejected ids became identical after truncation (no signal left).
    pub identical_after_truncation: usize,
    /// Examples dropped because no token was left to learn from.
    pub dropped_no_loss: usize,
    /// Rows skipped because the tokenizer failed on them (only with `skip_invalid`).
    pub skipped: usize,
    /// The first skip reasons.
    pub reasons: Vec<String>,
    /// The limit applied.
    pub max_length: Option<usize>,
}

impl TokenizeReport {
    fn cut(&mut self, len: usize) -> bool {
        self.longest = self.longest.max(len);
        match self.max_length {
            Some(max) if len > max => {
                self.tokens_cut += len - max;
                true
            }
            _ => false,
        }
    }

    fn skip(&mut self, e: &Error) {
        self.skipped += 1;
        if self.reasons.len() < MAX_REASONS {
            self.reasons.push(e.to_string());
        }
    }
}

impl fmt::Display for TokenizeReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} examples, longest {} tokens",
            self.examples, self.longest
        )?;
        if let Some(max) = self.max_length {
            write!(
                f,
                "; {} truncated to max_length {max} ({} tokens cut)",
                self.truncated, self.tokens_cut
            )?;
        }
        if self.identical_after_truncation > 0 {
            write!(
                f,
                "; {} pairs identical after truncation (raise max_length, or set \
                 truncation_mode = \"keep_end\" to cut prompts from their start)",
                self.identical_after_truncation
            )?;
        }
        if self.dropped_no_loss > 0 {
            write!(
                f,
                "; {} dropped with no token left to learn from",
                self.dropped_no_loss
            )?;
        }
        if self.skipped > 0 {
            write!(f, "; {} rows skipped:", self.skipped)?;
            for r in &self.reasons {
                write!(f, "\n  {r}")?;
            }
        }
        Ok(())
    }
}

/// Examples with the report of how they were made.
#[derive(Debug, Clone)]
pub struct Tokenized<T> {
    /// The examples, in record order.
    pub examples: Vec<T>,
    /// Truncation and skip counts.
    pub report: TokenizeReport,
}

/// A tokenised SFT example.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SftExample {
    /// The row it came from.
    pub at: Location,
    /// Token ids.
    pub input_ids: Vec<u32>,
    /// Per-token targets: the id, or [`IGNORE_INDEX`] where there is no loss. Unshifted, as
    /// transformers' `labels` (the model shifts).
    pub labels: Vec<i64>,
}

/// One tokenised preference pair for reward modelling.
#[derive(Debug, Clone, PartialEq)]
pub struct RewardPair {
    /// Prompt + chosen answer (+ EOS), possibly truncated.
    pub chosen_ids: Vec<u32>,
    /// Prompt + rejected answer (+ EOS), possibly truncated.
    pub rejected_ids: Vec<u32>,
    /// The pair's margin (`margin`, or `degree` through the margin table).
    pub margin: Option<f32>,
}

/// The pairs of one comparison row: one pair, or all pairs of a ranking (InstructGPT keeps a
/// prompt's K(K-1)/2 pairs together as one batch element; ties and unranked answers give
/// fewer).
#[derive(Debug, Clone, PartialEq)]
pub struct RewardGroup {
    /// The row it came from.
    pub at: Location,
    /// Its pairs.
    pub pairs: Vec<RewardPair>,
}

/// A tokenised DPO pair, split like TRL's `prompt_ids` / `chosen_ids` / `rejected_ids`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DpoExample {
    /// The row it came from.
    pub at: Location,
    /// Shared prompt ids.
    pub prompt_ids: Vec<u32>,
    /// Chosen completion ids (truncated so prompt + completion fits `max_length`, unless
    /// the pair was tokenised to keep its end).
    pub chosen_ids: Vec<u32>,
    /// Rejected completion ids (likewise).
    pub rejected_ids: Vec<u32>,
}

/// A tokenised unpaired preference (KTO), split like TRL's `prompt_ids` / `completion_ids`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KtoExample {
    /// The row it came from.
    pub at: Location,
    /// Prompt ids.
    pub prompt_ids: Vec<u32>,
    /// Completion ids (truncated so prompt + completion fits `max_length`).
    pub completion_ids: Vec<u32>,
    /// Whether the completion is desirable.
    pub label: bool,
}

/// Ids of a reward model input as TRL's RewardTrainer builds them: `prompt + response`
/// (texts or message lists), EOS text appended to a plain-text response lacking it. The
/// `score` command uses the same rule so that a pair scores the same in training and scoring.
pub fn reward_ids(
    tok: &Tokenizer,
    prompt: Option<&Content>,
    response: &Content,
) -> rlhf_model::Result<Vec<u32>> {
    match (prompt, response) {
        (None, Content::Text(r)) => tok.encode(&with_eos(tok, r)?, true),
        (Some(Content::Text(p)), Content::Text(r)) => {
            tok.encode(&format!("{p}{}", with_eos(tok, r)?), true)
        }
        (None, Content::Messages(r)) => chat_ids(tok, r, false),
        (Some(Content::Messages(p)), Content::Messages(r)) => chat_ids(tok, &concat(p, r), false),
        _ => Err(mixed_kinds()),
    }
}

/// Prompt ids for generation: text encoded with special tokens (as TRL's GRPO/RLOO do),
/// conversations rendered with the generation prompt.
pub fn prompt_ids(tok: &Tokenizer, prompt: &Content) -> rlhf_model::Result<Vec<u32>> {
    match prompt {
        Content::Text(p) => tok.encode(p, true),
        Content::Messages(m) => chat_ids(tok, m, true),
    }
}

/// Tokenises comparison rows into reward groups; see the module docs for the rules.
pub fn tokenize_comparisons(
    tok: &Tokenizer,
    records: &[Comparison],
    opts: &TokenizeOptions,
) -> Result<Tokenized<RewardGroup>> {
    run(records, opts, |c, report| {
        tokenize_comparison(tok, c, opts, report).map(Some)
    })
}

/// Tokenises one comparison row (a pair, or a ranking's pairs), truncating into `report`.
pub fn tokenize_comparison(
    tok: &Tokenizer,
    c: &Comparison,
    opts: &TokenizeOptions,
    report: &mut TokenizeReport,
) -> Result<RewardGroup> {
    let at = c.at();
    let pairs = match c {
        Comparison::Pair(p) => vec![(
            row(at, reward_ids(tok, p.prompt.as_ref(), &p.chosen))?,
            row(at, reward_ids(tok, p.prompt.as_ref(), &p.rejected))?,
            p.margin(opts.margin_table),
        )],
        Comparison::Ranking(r) => {
            // Each ranked answer is tokenised once; the pairs share them. Unranked answers
            // (a partial ranking) are in no pair, so they are not tokenised.
            let mut ids: Vec<Option<Vec<u32>>> = vec![None; r.responses.len()];
            for i in r.ranked() {
                ids[i] = Some(row(at, reward_ids(tok, Some(&r.prompt), &r.responses[i]))?);
            }
            let ids_of = |i: usize| ids[i].clone().unwrap_or_default();
            r.index_pairs()
                .into_iter()
                .map(|(b, w)| (ids_of(b), ids_of(w), None))
                .collect()
        }
    };
    report.max_length = opts.max_length;
    let pairs = pairs
        .into_iter()
        .map(|(mut chosen_ids, mut rejected_ids, margin)| {
            let cut_c = report.cut(chosen_ids.len());
            let cut_r = report.cut(rejected_ids.len());
            if let Some(max) = opts.max_length {
                opts.truncation_mode.apply(&mut chosen_ids, max);
                opts.truncation_mode.apply(&mut rejected_ids, max);
            }
            report.examples += 1;
            if cut_c || cut_r {
                report.truncated += 1;
                if chosen_ids == rejected_ids {
                    report.identical_after_truncation += 1;
                }
            }
            RewardPair {
                chosen_ids,
                rejected_ids,
                margin,
            }
        })
        .collect();
    Ok(RewardGroup {
        at: at.clone(),
        pairs,
    })
}

/// Tokenises demonstrations for SFT; see the module docs for the rules.
pub fn tokenize_demonstrations(
    tok: &Tokenizer,
    records: &[Demonstration],
    opts: &TokenizeOptions,
) -> Result<Tokenized<SftExample>> {
    run(records, opts, |d, report| {
        tokenize_demonstration(tok, d, opts, report)
    })
}

/// Tokenises one demonstration; `None` when it has no token to learn from (counted).
pub fn tokenize_demonstration(
    tok: &Tokenizer,
    d: &Demonstration,
    opts: &TokenizeOptions,
    report: &mut TokenizeReport,
) -> Result<Option<SftExample>> {
    let (mut input_ids, mut labels) = row(&d.at, sft_ids(tok, &d.body, opts))?;
    report.max_length = opts.max_length;
    if report.cut(input_ids.len()) {
        report.truncated += 1;
    }
    if let Some(max) = opts.max_length {
        input_ids.truncate(max);
        labels.truncate(max);
    }
    if labels.iter().all(|&l| l == IGNORE_INDEX) {
        report.dropped_no_loss += 1;
        return Ok(None);
    }
    report.examples += 1;
    Ok(Some(SftExample {
        at: d.at.clone(),
        input_ids,
        labels,
    }))
}

/// Tokenises comparison rows for DPO (a ranking gives its pairs: K(K-1)/2 without ties).
pub fn tokenize_dpo(
    tok: &Tokenizer,
    records: &[Comparison],
    opts: &TokenizeOptions,
) -> Result<Tokenized<DpoExample>> {
    let mut out = Vec::new();
    let mut report = TokenizeReport {
        max_length: opts.max_length,
        ..Default::default()
    };
    for c in records {
        for p in c.pairs() {
            match tokenize_dpo_pair(tok, &p, opts, &mut report) {
                Ok(Some(ex)) => out.push(ex),
                Ok(None) => {}
                Err(e) if opts.skip_invalid && e.is_row_error() => report.skip(&e),
                Err(e) => return Err(e),
            }
        }
    }
    Ok(Tokenized {
        examples: out,
        report,
    })
}

/// Tokenises one DPO pair; `None` when the prompt alone fills `max_length` (counted). With
/// [`TruncationMode::KeepEnd`] nothing is cut or dropped here (see
/// [`TokenizeOptions::truncation_mode`]); over-long pairs are counted.
pub fn tokenize_dpo_pair(
    tok: &Tokenizer,
    p: &Preference,
    opts: &TokenizeOptions,
    report: &mut TokenizeReport,
) -> Result<Option<DpoExample>> {
    let (prompt_ids, mut chosen_ids, mut rejected_ids) = row(&p.at, dpo_ids(tok, p))?;
    report.max_length = opts.max_length;
    let cut_c = report.cut(prompt_ids.len() + chosen_ids.len());
    let cut_r = report.cut(prompt_ids.len() + rejected_ids.len());
    match (opts.max_length, opts.truncation_mode) {
        (Some(max), TruncationMode::KeepStart) => {
            if prompt_ids.len() >= max {
                report.dropped_no_loss += 1;
                return Ok(None);
            }
            chosen_ids.truncate(max - prompt_ids.len());
            rejected_ids.truncate(max - prompt_ids.len());
        }
        // Each row loses its own start when it is batched (TRL's collator): the chosen and
        // rejected rows may lose different numbers of prompt tokens, which one shared
        // `prompt_ids` cannot hold, so the ids stay whole here.
        (Some(_), TruncationMode::KeepEnd) | (None, _) => {}
    }
    report.examples += 1;
    if cut_c || cut_r {
        report.truncated += 1;
        if chosen_ids == rejected_ids {
            report.identical_after_truncation += 1;
        }
    }
    Ok(Some(DpoExample {
        at: p.at.clone(),
        prompt_ids,
        chosen_ids,
        rejected_ids,
    }))
}

/// Tokenises unpaired preferences for KTO; see the module docs for the rules.
pub fn tokenize_unpaired(
    tok: &Tokenizer,
    records: &[UnpairedPreference],
    opts: &TokenizeOptions,
) -> Result<Tokenized<KtoExample>> {
    run(records, opts, |u, report| {
        tokenize_unpaired_row(tok, u, opts, report)
    })
}

/// Tokenises one unpaired preference; `None` when the prompt alone fills `max_length`
/// (counted, as TRL drops such rows).
pub fn tokenize_unpaired_row(
    tok: &Tokenizer,
    u: &UnpairedPreference,
    opts: &TokenizeOptions,
    report: &mut TokenizeReport,
) -> Result<Option<KtoExample>> {
    let (prompt_ids, mut completion_ids) =
        row(&u.at, prompt_completion_ids(tok, &u.prompt, &u.completion))?;
    report.max_length = opts.max_length;
    let cut = report.cut(prompt_ids.len() + completion_ids.len());
    if let Some(max) = opts.max_length {
        if prompt_ids.len() >= max {
            report.dropped_no_loss += 1;
            return Ok(None);
        }
        completion_ids.truncate(max - prompt_ids.len());
    }
    report.examples += 1;
    report.truncated += cut as usize;
    Ok(Some(KtoExample {
        at: u.at.clone(),
        prompt_ids,
        completion_ids,
        label: u.label,
    }))
}

/// Applies `f` to every record, honouring `skip_invalid` for row errors.
fn run<R, T>(
    records: &[R],
    opts: &TokenizeOptions,
    mut f: impl FnMut(&R, &mut TokenizeReport) -> Result<Option<T>>,
) -> Result<Tokenized<T>> {
    let mut report = TokenizeReport {
        max_length: opts.max_length,
        ..Default::default()
    };
    let mut out = Vec::with_capacity(records.len());
    for r in records {
        match f(r, &mut report) {
            Ok(Some(ex)) => out.push(ex),
            Ok(None) => {}
            Err(e) if opts.skip_invalid && e.is_row_error() => report.skip(&e),
            Err(e) => return Err(e),
        }
    }
    Ok(Tokenized {
        examples: out,
        report,
    })
}

/// Attaches the row's location to a tokenizer error.
fn row<T>(at: &Location, r: rlhf_model::Result<T>) -> Result<T> {
    r.map_err(|e| Error::Tokenize {
        at: at.clone(),
        msg: match e {
            rlhf_model::Error::Tokenizer(msg) => msg,
            other => other.to_string(),
        },
    })
}

fn mixed_kinds() -> rlhf_model::Error {
    rlhf_model::Error::Tokenizer(
        "prompt and answers must all be text or all be message lists".to_string(),
    )
}

/// `text` with the EOS token text appended unless it already ends with it (TRL's `add_eos`).
fn with_eos(tok: &Tokenizer, text: &str) -> rlhf_model::Result<String> {
    let eos = tok.eos_token().ok_or_else(|| {
        rlhf_model::Error::Tokenizer(
            "the tokenizer names no eos_token, which plain-text rows need (TRL appends it to \
             every answer); set \"eos_token\" in tokenizer_config.json"
                .to_string(),
        )
    })?;
    Ok(if text.ends_with(eos) {
        text.to_string()
    } else {
        format!("{text}{eos}")
    })
}

/// Renders a conversation and encodes it without added special tokens (the template writes
/// them), as transformers' `apply_chat_template(tokenize=True)` does.
fn chat_ids(
    tok: &Tokenizer,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
) -> rlhf_model::Result<Vec<u32>> {
    tok.encode(
        &tok.apply_chat_template(messages, add_generation_prompt)?,
        false,
    )
}

fn concat(a: &[ChatMessage], b: &[ChatMessage]) -> Vec<ChatMessage> {
    a.iter().chain(b).cloned().collect()
}

/// Length of the longest common prefix (TRL's `common_prefix_length`).
fn common_prefix<T: PartialEq>(a: &[T], b: &[T]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Ids and labels of one demonstration, untruncated.
fn sft_ids(
    tok: &Tokenizer,
    body: &DemonstrationBody,
    opts: &TokenizeOptions,
) -> rlhf_model::Result<(Vec<u32>, Vec<i64>)> {
    let all = |ids: &[u32]| ids.iter().map(|&t| i64::from(t)).collect::<Vec<_>>();
    match body {
        DemonstrationBody::Text(t) => {
            let ids = tok.encode(&with_eos(tok, t)?, true)?;
            let labels = all(&ids);
            Ok((ids, labels))
        }
        DemonstrationBody::Messages(m) => {
            let ids = chat_ids(tok, m, false)?;
            let labels = if opts.assistant_only_loss {
                mask_labels(&ids, &assistant_mask(tok, m, &ids)?)
            } else {
                all(&ids)
            };
            Ok((ids, labels))
        }
        DemonstrationBody::PromptCompletion { prompt, completion } => {
            let (prompt_ids, ids, conversation) = match (prompt, completion) {
                (Content::Text(p), Content::Text(c)) => (
                    tok.encode(p, true)?,
                    tok.encode(&format!("{p}{}", with_eos(tok, c)?), true)?,
                    None,
                ),
                (Content::Messages(p), Content::Messages(c)) => {
                    let conv = concat(p, c);
                    (
                        chat_ids(tok, p, true)?,
                        chat_ids(tok, &conv, false)?,
                        Some(conv),
                    )
                }
                _ => return Err(mixed_kinds()),
            };
            let start = if opts.completion_only_loss {
                common_prefix(&prompt_ids, &ids)
            } else {
                0
            };
            let mut mask: Vec<bool> = (0..ids.len()).map(|i| i >= start).collect();
            // TRL ANDs the assistant mask in too (it matters for completions holding tool turns).
            if let (true, Some(conv)) = (opts.assistant_only_loss, &conversation) {
                let assistant = assistant_mask(tok, conv, &ids)?;
                mask.iter_mut().zip(&assistant).for_each(|(m, &a)| *m &= a);
            }
            let labels = mask_labels(&ids, &mask);
            Ok((ids, labels))
        }
    }
}

fn mask_labels(ids: &[u32], mask: &[bool]) -> Vec<i64> {
    ids.iter()
        .zip(mask)
        .map(|(&t, &m)| if m { i64::from(t) } else { IGNORE_INDEX })
        .collect()
}

/// Which of `ids` (the rendered conversation) belong to assistant turns, found by rendering
/// the conversation prefix by prefix (see the module docs).
fn assistant_mask(
    tok: &Tokenizer,
    messages: &[ChatMessage],
    ids: &[u32],
) -> rlhf_model::Result<Vec<bool>> {
    let mut mask = vec![false; ids.len()];
    for (i, m) in messages.iter().enumerate() {
        if m.role != "assistant" {
            continue;
        }
        let start = match chat_ids(tok, &messages[..i], true) {
            Ok(before) => common_prefix(&before, ids),
            // Templates that index `messages[0]` fail on an empty conversation.
            Err(_) if i == 0 => 0,
            Err(e) => return Err(e),
        };
        let end = common_prefix(&chat_ids(tok, &messages[..=i], false)?, ids);
        for flag in mask.iter_mut().take(end).skip(start) {
            *flag = true;
        }
    }
    Ok(mask)
}

/// TRL's `extract_prompt` for the implicit-prompt form: the shared start of both answers is
/// the prompt; for text, a space just before the first difference goes to the answers. As in
/// TRL, when one answer is a prefix of the other the last shared element stays in the answers.
fn extract_prompt(
    chosen: &Content,
    rejected: &Content,
) -> rlhf_model::Result<(Content, Content, Content)> {
    fn split<T: PartialEq + Clone>(c: &[T], r: &[T], is_space: impl Fn(&T) -> bool) -> usize {
        let n = c.len().min(r.len());
        match (0..n).find(|&i| c[i] != r[i]) {
            Some(i) if i > 0 && is_space(&c[i - 1]) => i - 1,
            Some(i) => i,
            // Python's loop variable ends on the last index when nothing differs.
            None => n.saturating_sub(1),
        }
    }
    match (chosen, rejected) {
        (Content::Text(c), Content::Text(r)) => {
            let (c, r): (Vec<char>, Vec<char>) = (c.chars().collect(), r.chars().collect());
            let i = split(&c, &r, |ch| *ch == ' ');
            let s = |x: &[char]| Content::Text(x.iter().collect());
            Ok((s(&c[..i]), s(&c[i..]), s(&r[i..])))
        }
        (Content::Messages(c), Content::Messages(r)) => {
            let i = split(c, r, |_| false);
            Ok((
                Content::Messages(c[..i].to_vec()),
                Content::Messages(c[i..].to_vec()),
                Content::Messages(r[i..].to_vec()),
            ))
        }
        _ => Err(mixed_kinds()),
    }
}

/// Prompt, chosen and rejected ids of one DPO pair, untruncated (TRL's DPO `tokenize_fn`).
fn dpo_ids(tok: &Tokenizer, p: &Preference) -> rlhf_model::Result<(Vec<u32>, Vec<u32>, Vec<u32>)> {
    let (prompt, chosen, rejected) = match &p.prompt {
        Some(prompt) => (prompt.clone(), p.chosen.clone(), p.rejected.clone()),
        None => extract_prompt(&p.chosen, &p.rejected)?,
    };
    let (prompt_ids, pc, pr) = match (&prompt, &chosen, &rejected) {
        (Content::Text(pt), Content::Text(c), Content::Text(r)) => (
            tok.encode(pt, true)?,
            tok.encode(&format!("{pt}{}", with_eos(tok, c)?), true)?,
            tok.encode(&format!("{pt}{}", with_eos(tok, r)?), true)?,
        ),
        (Content::Messages(pm), Content::Messages(c), Content::Messages(r)) => (
            chat_ids(tok, pm, true)?,
            chat_ids(tok, &concat(pm, c), false)?,
            chat_ids(tok, &concat(pm, r), false)?,
        ),
        _ => return Err(mixed_kinds()),
    };
    let n = common_prefix(&prompt_ids, &pc).min(common_prefix(&prompt_ids, &pr));
    Ok((prompt_ids[..n].to_vec(), pc[n..].to_vec(), pr[n..].to_vec()))
}

/// Prompt and completion ids of a prompt-completion row, untruncated, split where the
/// tokenised prompt stops being a prefix of the tokenised whole (TRL's KTO `tokenize_fn`).
fn prompt_completion_ids(
    tok: &Tokenizer,
    prompt: &Content,
    completion: &Content,
) -> rlhf_model::Result<(Vec<u32>, Vec<u32>)> {
    let (prompt_ids, whole) = match (prompt, completion) {
        (Content::Text(p), Content::Text(c)) => (
            tok.encode(p, true)?,
            tok.encode(&format!("{p}{}", with_eos(tok, c)?), true)?,
        ),
        (Content::Messages(p), Content::Messages(c)) => (
            chat_ids(tok, p, true)?,
            chat_ids(tok, &concat(p, c), false)?,
        ),
        _ => return Err(mixed_kinds()),
    };
    let n = common_prefix(&prompt_ids, &whole);
    Ok((prompt_ids[..n].to_vec(), whole[n..].to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extract_prompt_matches_trl() {
        let t = |s: &str| Content::Text(s.to_string());
        // Python: extract_prompt({"chosen": "Hi? Yes.", "rejected": "Hi? No."})
        assert_eq!(
            extract_prompt(&t("Hi? Yes."), &t("Hi? No.")).unwrap(),
            (t("Hi?"), t(" Yes."), t(" No."))
        );
        // One a prefix of the other: the loop ends on index 2 without a break.
        assert_eq!(
            extract_prompt(&t("abc"), &t("abcd")).unwrap(),
            (t("ab"), t("c"), t("cd"))
        );
    }

    #[test]
    fn common_prefix_counts_equal_leading_items() {
        assert_eq!(common_prefix(&[1, 2, 3], &[1, 2, 4, 5]), 2);
        assert_eq!(common_prefix::<u32>(&[], &[1]), 0);
    }
}
