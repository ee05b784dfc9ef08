//! `rlhf constitutional`: the supervised stage of Constitutional AI (Bai et al. 2022, §3):
//! red-team prompt → initial answer → critique by a principle → revision, in one
//! conversation, `rounds` times with a principle drawn at random each round.
//!
//! 1. **constitution**: principles, each a critique request and a revision request, in the
//!    Hugging Face recipe's JSON (`{"constitutions": [{"critic", "revision"}], "system_chat":
//!    [[turns], ...]}`, or a bare list of `{"critic", "revision"}`), or our own JSON/TOML list
//!    of `{critique_request, revision_request, preference?}`. `system_chat`'s example
//!    conversations go before every prompt (the recipe's few-shot), unless `system_chat =
//!    false`.
//! 2. **loop**: per batch of prompts, one generation call per turn (the initial answer, then
//!    each round's critique and revision), every row a whole conversation rendered with the
//!    policy's chat template (Bai et al.'s "Human:/Assistant:" text where it has none);
//! 3. **write**: `constitutional.jsonl` with the recipe's columns (`init_prompt`,
//!    `init_response`, `critic_prompt`, `critic_response`, `revision_prompt`,
//!    `revision_response`: the last round's; every round under `rounds`) and its
//!    `messages`/`chosen`/`rejected` conversations, appended a whole batch at a time (a rerun
//!    continues after the last whole batch); then `sft.jsonl` (`prompt`, `completion` = the
//!    final revision: the SL stage) and `pairs.jsonl` (revision chosen, initial answer
//!    rejected: DPO).
//!
//! Revisions lose the labels small models put before them ("Revision:", "Here is a revised
//! response:") and quotes around the whole text; generated text is cut where the model starts
//! the next turn itself ("Human:", "User:").

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use rlhf_data::Content;
use rlhf_model::tokenizer::{ChatMessage, Tokenizer};
use rlhf_model::{Heads, LoadOptions, Model};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::trainer::{mix, Summary};
use crate::{Error, Result};

/// One principle: how to critique a response, how to revise it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Principle {
    /// Asked after the answer (the recipe's `critic`).
    pub critique_request: String,
    /// Asked after the critique (the recipe's `revision`).
    pub revision_request: String,
    /// The question an AI judge answers when it compares two responses by this principle
    /// (RL-CAI); default: the critique request turned into a comparison.
    pub preference: Option<String>,
}

impl Principle {
    /// The judge's preamble for this principle ([`crate::label_ai`] with a constitution).
    pub fn preference_text(&self) -> String {
        match &self.preference {
            Some(p) => p.clone(),
            None => format!(
                "You are comparing two responses to an instruction by this principle: {} \
                 Prefer the response that does better by it. Answer with the number of the \
                 better response, 1 or 2.",
                self.critique_request.trim()
            ),
        }
    }
}

/// A constitution: its principles and the example conversations shown before each prompt.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Constitution {
    /// The principles, one drawn per round.
    pub principles: Vec<Principle>,
    /// Few-shot conversations (the recipe's `system_chat`), each a list of turns.
    pub system_chat: Vec<Vec<ChatMessage>>,
}

impl Constitution {
    /// Reads a constitution: `.json` in the recipe's shape or ours, `.toml` with
    /// `[[principles]]` tables (and optional `[[system_chat]]` tables holding `turns`).
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let value: Value = match path.extension().and_then(|e| e.to_str()) {
            Some("toml") => {
                let t: toml::Table = text.parse().map_err(|e: toml::de::Error| {
                    Error::Config(format!("{}: {e}", path.display()))
                })?;
                serde_json::to_value(t).map_err(|e| Error::Config(e.to_string()))?
            }
            _ => serde_json::from_str(&text)
                .map_err(|e| Error::Config(format!("{}: not JSON: {e}", path.display())))?,
        };
        Self::from_value(path, &value)
    }

    fn from_value(path: &Path, v: &Value) -> Result<Self> {
        let shape = "a constitution is {\"constitutions\": [{\"critic\": ..., \"revision\": \
                     ...}], \"system_chat\": [[{\"role\", \"content\"}, ...]]} (the Hugging Face \
                     recipe's), a list of {\"critic\", \"revision\"}, or {\"principles\": \
                     [{\"critique_request\", \"revision_request\"}]}";
        let bad = |m: String| Error::Config(format!("{}: {m}", path.display()));
        let (list, list_key, chats) = match v {
            Value::Array(a) => (a, "", None),
            Value::Object(o) => {
                let key = ["constitutions", "principles"]
                    .into_iter()
                    .find(|k| o.contains_key(*k))
                    .ok_or_else(|| {
                        bad(format!("no \"constitutions\" or \"principles\"; {shape}"))
                    })?;
                let list = o[key]
                    .as_array()
                    .ok_or_else(|| bad(format!("\"{key}\" must be a list; {shape}")))?;
                for k in o.keys() {
                    if !["constitutions", "principles", "system_chat"].contains(&k.as_str()) {
                        return Err(bad(format!("unknown key \"{k}\"; {shape}")));
                    }
                }
                (list, key, o.get("system_chat"))
            }
            _ => return Err(bad(shape.into())),
        };
        let mut principles = Vec::with_capacity(list.len());
        for (i, p) in list.iter().enumerate() {
            let at = if list_key.is_empty() {
                format!("[{i}]")
            } else {
                format!("{list_key}[{i}]")
            };
            let get = |names: [&str; 2]| -> Result<Option<String>> {
                for n in names {
                    match p.get(n) {
                        Some(Value::String(s)) if !s.trim().is_empty() => {
                            return Ok(Some(s.clone()))
                        }
                        Some(Value::String(_)) => return Err(bad(format!("{at}.{n} is empty"))),
                        Some(other) => {
                            return Err(bad(format!("{at}.{n} must be a string, found {other}")))
                        }
                        None => {}
                    }
                }
                Ok(None)
            };
            let need = |names: [&str; 2]| -> Result<String> {
                get(names)?.ok_or_else(|| {
                    bad(format!(
                        "{at} has no \"{}\" (or \"{}\"); {shape}",
                        names[0], names[1]
                    ))
                })
            };
            if let Some(o) = p.as_object() {
                for k in o.keys() {
                    if ![
                        "critic",
                        "revision",
                        "critique_request",
                        "revision_request",
                        "preference",
                    ]
                    .contains(&k.as_str())
                    {
                        return Err(bad(format!("{at}: unknown key \"{k}\"; {shape}")));
                    }
                }
            } else {
                return Err(bad(format!("{at} must be an object; {shape}")));
            }
            principles.push(Principle {
                critique_request: need(["critique_request", "critic"])?,
                revision_request: need(["revision_request", "revision"])?,
                preference: get(["preference", "preference"])?,
            });
        }
        if principles.is_empty() {
            return Err(bad(format!("no principles; {shape}")));
        }
        let mut system_chat = Vec::new();
        if let Some(c) = chats {
            let convs = c
                .as_array()
                .ok_or_else(|| bad("\"system_chat\" must be a list of conversations".into()))?;
            for (i, conv) in convs.iter().enumerate() {
                // TOML cannot nest arrays of tables in arrays: there a conversation is a table
                // with `turns`.
                let turns = conv.get("turns").unwrap_or(conv);
                let turns: Vec<ChatMessage> =
                    serde_json::from_value(turns.clone()).map_err(|e| {
                        bad(format!(
                            "system_chat[{i}] must be a list of {{\"role\", \"content\"}} turns: {e}"
                        ))
                    })?;
                system_chat.push(turns);
            }
        }
        Ok(Self {
            principles,
            system_chat,
        })
    }
}

/// `rlhf constitutional`'s settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ConstitutionalConfig {
    /// The model that answers, critiques and revises (an HF or adapter directory).
    pub model: PathBuf,
    /// Red-team prompts (`{"prompt"}` or `{"messages"}` rows).
    pub train_file: PathBuf,
    /// The constitution file.
    pub constitution: PathBuf,
    /// Where constitutional.jsonl, sft.jsonl and pairs.jsonl go.
    pub output_dir: PathBuf,
    /// Critique-revision rounds per prompt, each with a principle drawn with `seed`.
    pub rounds: usize,
    /// Seed of the principles drawn and of sampling.
    pub seed: u64,
    /// New tokens per turn at most.
    pub max_new_tokens: usize,
    /// Sampling temperature (0: greedy).
    pub temperature: f64,
    /// Top-k filtering (0: none).
    pub top_k: usize,
    /// Top-p filtering (1.0: none).
    pub top_p: f64,
    /// Conversations per generation call.
    pub generation_batch_size: usize,
    /// Conversation + new tokens at most; longer conversations keep their last tokens.
    pub max_length: usize,
    /// Use only the first N prompts (0: all).
    pub num_prompts: usize,
    /// Put the constitution's example conversations before each prompt.
    pub system_chat: bool,
    /// Strip leading labels ("Revision:") and enclosing quotes from revisions.
    pub strip_revisions: bool,
    /// Start afresh over an earlier run in `output_dir` made with other settings.
    pub overwrite_output_dir: bool,
}

impl Default for ConstitutionalConfig {
    fn default() -> Self {
        Self {
            model: PathBuf::new(),
            train_file: PathBuf::new(),
            constitution: PathBuf::new(),
            output_dir: PathBuf::from("constitutional"),
            rounds: 1,
            seed: 42,
            max_new_tokens: 128,
            temperature: 0.7,
            top_k: 0,
            top_p: 1.0,
            generation_batch_size: 16,
            max_length: 1024,
            num_prompts: 0,
            system_chat: true,
            strip_revisions: true,
            overwrite_output_dir: false,
        }
    }
}

/// The config keys of `rlhf constitutional`.
pub const KEYS: &[&str] = &[
    "model",
    "train_file",
    "constitution",
    "output_dir",
    "rounds",
    "seed",
    "max_new_tokens",
    "temperature",
    "top_k",
    "top_p",
    "generation_batch_size",
    "max_length",
    "num_prompts",
    "system_chat",
    "strip_revisions",
    "overwrite_output_dir",
];

/// The SFT file in `output_dir` (the SL stage trains on it).
pub const SFT_FILE: &str = "sft.jsonl";
/// The pairs file in `output_dir` (revision chosen, initial answer rejected).
pub const PAIRS_FILE: &str = "pairs.jsonl";
/// Every conversation, in the recipe's columns.
pub const ROWS_FILE: &str = "constitutional.jsonl";

impl ConstitutionalConfig {
    /// Reads `path` with `--set` overrides; unknown keys are errors naming the closest one.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        let mut table = crate::config::load_table(path, overrides, KEYS)?;
        let base = path.parent().unwrap_or(Path::new("."));
        if let Some(toml::Value::String(s)) = table.get_mut("constitution") {
            *s = crate::config::joined_to(base, s);
        }
        let cfg: Self = crate::config::parse(path, table)?;
        cfg.check(path)?;
        Ok(cfg)
    }

    /// Checks what serde cannot, in the one message shape.
    pub fn check(&self, path: &Path) -> Result<()> {
        let k = crate::config::Knobs::new(path);
        for (key, v) in [
            ("model", &self.model),
            ("train_file", &self.train_file),
            ("constitution", &self.constitution),
        ] {
            if v.as_os_str().is_empty() {
                return Err(Error::Config(format!(
                    "{}: `{key}` is required",
                    path.display()
                )));
            }
        }
        k.at_least("rounds", self.rounds, 1)?;
        k.at_least("max_new_tokens", self.max_new_tokens, 1)?;
        k.at_least("generation_batch_size", self.generation_batch_size, 1)?;
        k.non_negative("temperature", self.temperature)?;
        k.open_closed("top_p", self.top_p, 0.0, 1.0)?;
        if self.max_length <= self.max_new_tokens {
            return Err(k.error(
                "max_length",
                &format!("greater than max_new_tokens ({})", self.max_new_tokens),
                self.max_length,
            ));
        }
        Ok(())
    }
}

/// One round of a conversation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundRow {
    /// The principle's index in the constitution.
    pub principle: usize,
    /// The critique request asked.
    pub critic_prompt: String,
    /// The model's critique.
    pub critic_response: String,
    /// The revision request asked.
    pub revision_prompt: String,
    /// The revision (stripped of artefacts).
    pub revision_response: String,
}

/// One line of constitutional.jsonl.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaiRow {
    /// The prompt as the input row gave it.
    pub prompt: Value,
    /// The user's turn (the prompt's text).
    pub init_prompt: String,
    /// The initial answer.
    pub init_response: String,
    /// The last round's critique request.
    pub critic_prompt: String,
    /// The last round's critique.
    pub critic_response: String,
    /// The last round's revision request.
    pub revision_prompt: String,
    /// The final revision.
    pub revision_response: String,
    /// Every round.
    pub rounds: Vec<RoundRow>,
    /// The recipe's SFT conversation: the prompt and the final revision.
    pub messages: Vec<ChatMessage>,
    /// The recipe's preference conversations: the revision chosen, the initial answer
    /// rejected.
    pub chosen: Vec<ChatMessage>,
    /// See `chosen`.
    pub rejected: Vec<ChatMessage>,
}

/// What constitutional.jsonl was made with: a rerun continues it only with the same.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Plan {
    model: PathBuf,
    train_file: PathBuf,
    constitution: Value,
    rounds: usize,
    seed: u64,
    max_new_tokens: usize,
    temperature: f64,
    top_k: usize,
    top_p: f64,
    generation_batch_size: usize,
    max_length: usize,
    system_chat: bool,
    strip_revisions: bool,
}

/// The index of the principle of round `round` (1-based) for prompt `prompt`.
pub fn principle_of(seed: u64, prompt: usize, round: usize, n: usize) -> usize {
    (mix(seed, 1 + prompt as u64, round as u64) as usize) % n.max(1)
}

/// Labels small models put before a rewrite, lower case; a revision starting with one of
/// them (and a colon) loses it.
const REVISION_LABELS: [&str; 10] = [
    "revision",
    "revised response",
    "revised answer",
    "rewritten response",
    "rewrite",
    "new response",
    "here is a revised response",
    "here is the revised response",
    "here's a revised response",
    "here is a revision of the response",
];

/// A revision without a leading label ("Revision:", "Here is a revised response:") and
/// without quotes around the whole text.
pub fn strip_revision(text: &str) -> String {
    let mut s = text.trim();
    loop {
        // Markdown emphasis or a heading mark may come first: "**Revision:**".
        let t = s.trim_start_matches(['*', '#', ' ']);
        let cut = REVISION_LABELS.iter().find_map(|l| {
            let head = t.get(..l.len())?;
            if !head.eq_ignore_ascii_case(l) {
                return None;
            }
            let after = t[l.len()..].trim_start_matches(['*', ' ']);
            after.starts_with(':').then(|| t.len() - after.len() + 1)
        });
        match cut {
            Some(c) => s = t[c..].trim_start_matches(['*', ' ', '\n']).trim(),
            None => break,
        }
    }
    for (open, close) in [('"', '"'), ('\u{201c}', '\u{201d}')] {
        if s.len() >= 2 && s.starts_with(open) && s.ends_with(close) {
            let inner = &s[open.len_utf8()..s.len() - close.len_utf8()];
            if !inner.contains(open) && !inner.contains(close) {
                s = inner.trim();
            }
        }
    }
    s.to_string()
}

/// Generated text up to where the model starts the next turn itself.
pub fn cut_turn(text: &str) -> String {
    let mut end = text.len();
    for stop in ["\nHuman:", "\nUser:", "Human:", "User:", "###"] {
        if let Some(i) = text.find(stop) {
            if i > 0 || stop.starts_with('\n') {
                end = end.min(i);
            }
        }
    }
    text[..end].trim().to_string()
}

/// A conversation as the policy reads it, ending where the assistant's next turn begins: its
/// chat template with the generation prompt, or Bai et al.'s "Human:/Assistant:" text.
pub fn render(tok: &Tokenizer, conv: &[ChatMessage]) -> Result<Vec<u32>> {
    if tok.chat_template().is_some() {
        let text = tok.apply_chat_template(conv, true)?;
        Ok(tok.encode(&text, false)?)
    } else {
        let mut text = String::new();
        for m in conv {
            let who = if m.role == "assistant" {
                "Assistant"
            } else {
                "Human"
            };
            text.push_str(&format!("\n\n{who}: {}", m.content.trim()));
        }
        text.push_str("\n\nAssistant:");
        Ok(tok.encode(&text, true)?)
    }
}

/// The prompt's text as a user turn, and earlier turns of a conversation prompt.
fn prompt_turns(c: &Content) -> Vec<ChatMessage> {
    match c {
        Content::Text(t) => vec![ChatMessage::new("user", t.trim())],
        Content::Messages(m) => m.clone(),
    }
}

/// The completion of an SFT row for `prompt`: a text prompt that ends without a space (such as
/// "Answer:") gets one before the answer, as the repo's demonstrations are written.
fn completion_for(prompt: &Value, answer: &str) -> Value {
    match prompt {
        Value::String(p) if !p.ends_with(char::is_whitespace) => format!(" {answer}").into(),
        Value::String(_) => answer.into(),
        _ => json!([{"role": "assistant", "content": answer}]),
    }
}

fn to_jsonl<T: Serialize>(rows: &[T]) -> String {
    let mut s = String::new();
    for r in rows {
        s.push_str(&serde_json::to_string(r).expect("rows serialise"));
        s.push('\n');
    }
    s
}

/// Runs the critique-revision loop and writes the three files; returns the stage summary.
pub fn run(cfg: &ConstitutionalConfig) -> Result<Summary> {
    let started = Instant::now();
    let out = &cfg.output_dir;
    crate::outdir::check_not_input(out, "model", &cfg.model)?;
    let _lock = crate::outdir::lock(out)?;
    let constitution = Constitution::load(&cfg.constitution)?;
    let model = Model::load(
        &cfg.model,
        &LoadOptions {
            heads: Heads::Lm,
            ..Default::default()
        },
    )?;
    let tok = if cfg.model.join("tokenizer.json").is_file() {
        Tokenizer::from_dir(&cfg.model)?
    } else {
        Tokenizer::from_dir(model.dir())?
    };
    let data = rlhf_data::load::<rlhf_data::PromptRecord>(
        &cfg.train_file,
        &rlhf_data::ReadOptions::default(),
    )?;
    let mut prompts = data.records;
    if cfg.num_prompts > 0 {
        prompts.truncate(cfg.num_prompts);
    }
    if prompts.is_empty() {
        return Err(Error::Config(format!(
            "{}: no prompts",
            cfg.train_file.display()
        )));
    }
    let eos = rlhf_model::generate::eos_ids(&model, &tok);
    let pad = rlhf_data::pad_id(&tok)?;
    let gen = crate::rollout::Sampling {
        max_new_tokens: cfg.max_new_tokens,
        temperature: cfg.temperature,
        top_k: cfg.top_k,
        top_p: cfg.top_p,
    }
    .config(&eos, pad, cfg.seed);
    gen.validate()?;
    let decoder = crate::rollout::Decoder::new(&tok, &eos);

    // Resume after the whole batches an earlier run with the same settings wrote.
    let plan = Plan {
        model: cfg.model.clone(),
        train_file: cfg.train_file.clone(),
        constitution: serde_json::to_value(
            constitution
                .principles
                .iter()
                .map(|p| (&p.critique_request, &p.revision_request))
                .collect::<Vec<_>>(),
        )
        .expect("strings serialise"),
        rounds: cfg.rounds,
        seed: cfg.seed,
        max_new_tokens: cfg.max_new_tokens,
        temperature: cfg.temperature,
        top_k: cfg.top_k,
        top_p: cfg.top_p,
        generation_batch_size: cfg.generation_batch_size,
        max_length: cfg.max_length,
        system_chat: cfg.system_chat,
        strip_revisions: cfg.strip_revisions,
    };
    let plan_path = out.join("constitutional_plan.json");
    let rows_path = out.join(ROWS_FILE);
    let mut rows: Vec<CaiRow> = Vec::new();
    if plan_path.exists() && rows_path.exists() && !cfg.overwrite_output_dir {
        let was: Plan = crate::checkpoint::read_json(&plan_path)?;
        if was != plan {
            return Err(Error::Resume(format!(
                "{} was made with other settings: restore them to continue it, or set \
                 overwrite_output_dir = true to start afresh",
                rows_path.display()
            )));
        }
        let text = std::fs::read_to_string(&rows_path).map_err(|e| Error::io(&rows_path, e))?;
        rows = text
            .lines()
            .map_while(|l| serde_json::from_str::<CaiRow>(l).ok())
            .collect();
        // Only whole batches count (a kill mid-write leaves a torn one), unless all are done.
        if rows.len() < prompts.len() {
            rows.truncate(rows.len() / cfg.generation_batch_size * cfg.generation_batch_size);
        } else {
            rows.truncate(prompts.len());
        }
        if !rows.is_empty() {
            tracing::info!(
                "{}: {} of {} prompts done in an earlier run; continuing",
                rows_path.display(),
                rows.len(),
                prompts.len()
            );
        }
    }
    crate::checkpoint::write_json(&plan_path, &plan)?;
    std::fs::write(&rows_path, to_jsonl(&rows)).map_err(|e| Error::io(&rows_path, e))?;
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&rows_path)
        .map_err(|e| Error::io(&rows_path, e))?;

    let few_shot: Vec<ChatMessage> = if cfg.system_chat {
        constitution.system_chat.iter().flatten().cloned().collect()
    } else {
        Vec::new()
    };
    let max_prompt = cfg.max_length - cfg.max_new_tokens;
    let mut truncated = 0usize;
    let mut stripped = 0usize;
    let done = rows.len();
    for (b, batch) in prompts
        .chunks(cfg.generation_batch_size)
        .enumerate()
        .skip_while(|(b, _)| b * cfg.generation_batch_size < done)
    {
        let base = b * cfg.generation_batch_size;
        let mut convs: Vec<Vec<ChatMessage>> = batch
            .iter()
            .map(|r| {
                let mut c = few_shot.clone();
                c.extend(prompt_turns(&r.prompt));
                c
            })
            .collect();
        // One generation call per turn for the whole batch; seeds by (batch, turn).
        let mut turn = 0u64;
        let mut step = |convs: &mut Vec<Vec<ChatMessage>>| -> Result<Vec<String>> {
            let mut ids = Vec::with_capacity(convs.len());
            for c in convs.iter() {
                let mut p = render(&tok, c)?;
                if p.len() > max_prompt {
                    p.drain(..p.len() - max_prompt);
                    truncated += 1;
                }
                ids.push(p);
            }
            let g = rlhf_model::generate::GenerationConfig {
                seed: mix(cfg.seed, 1000 + b as u64, turn),
                ..gen.clone()
            };
            turn += 1;
            let gens = rlhf_model::generate::generate(&model, &ids, &g)?;
            gens.iter()
                .map(|g| Ok(cut_turn(&decoder.text(&g.completion_ids)?)))
                .collect()
        };
        let init = step(&mut convs)?;
        for (c, a) in convs.iter_mut().zip(&init) {
            c.push(ChatMessage::new("assistant", a.clone()));
        }
        let mut rounds: Vec<Vec<RoundRow>> = vec![Vec::new(); batch.len()];
        for round in 1..=cfg.rounds {
            let picks: Vec<usize> = (0..batch.len())
                .map(|i| principle_of(cfg.seed, base + i, round, constitution.principles.len()))
                .collect();
            for (c, &p) in convs.iter_mut().zip(&picks) {
                c.push(ChatMessage::new(
                    "user",
                    constitution.principles[p].critique_request.clone(),
                ));
            }
            let critiques = step(&mut convs)?;
            for ((c, &p), cr) in convs.iter_mut().zip(&picks).zip(&critiques) {
                c.push(ChatMessage::new("assistant", cr.clone()));
                c.push(ChatMessage::new(
                    "user",
                    constitution.principles[p].revision_request.clone(),
                ));
            }
            let revisions = step(&mut convs)?;
            for (i, ((c, &p), rev)) in convs.iter_mut().zip(&picks).zip(revisions).enumerate() {
                let rev = if cfg.strip_revisions {
                    let s = strip_revision(&rev);
                    stripped += (s != rev.trim()) as usize;
                    s
                } else {
                    rev
                };
                c.push(ChatMessage::new("assistant", rev.clone()));
                let pr = &constitution.principles[p];
                rounds[i].push(RoundRow {
                    principle: p,
                    critic_prompt: pr.critique_request.clone(),
                    critic_response: critiques[i].clone(),
                    revision_prompt: pr.revision_request.clone(),
                    revision_response: rev,
                });
            }
        }
        let mut new_rows = Vec::with_capacity(batch.len());
        for ((r, init), rounds) in batch.iter().zip(init).zip(rounds) {
            let turns = prompt_turns(&r.prompt);
            let init_prompt = turns.last().map(|m| m.content.clone()).unwrap_or_default();
            let last = rounds.last().expect("rounds >= 1").clone();
            let with = |answer: &str| {
                let mut m = turns.clone();
                m.push(ChatMessage::new("assistant", answer));
                m
            };
            new_rows.push(CaiRow {
                prompt: r
                    .row
                    .get("prompt")
                    .or_else(|| r.row.get("messages"))
                    .cloned()
                    .unwrap_or_default(),
                messages: with(&last.revision_response),
                chosen: with(&last.revision_response),
                rejected: with(&init),
                init_prompt,
                init_response: init,
                critic_prompt: last.critic_prompt,
                critic_response: last.critic_response,
                revision_prompt: last.revision_prompt,
                revision_response: last.revision_response,
                rounds,
            });
        }
        file.write_all(to_jsonl(&new_rows).as_bytes())
            .and_then(|_| file.flush())
            .and_then(|_| file.sync_data())
            .map_err(|e| Error::io(&rows_path, e))?;
        rows.extend(new_rows);
        tracing::info!(
            "constitutional: {} of {} prompts revised",
            rows.len(),
            prompts.len()
        );
    }
    if truncated > 0 {
        tracing::warn!(
            "{truncated} conversations longer than max_length − max_new_tokens = {max_prompt} \
             tokens kept their last tokens (the system_chat examples go first: set \
             system_chat = false or raise max_length)"
        );
    }

    // The SL stage's demonstrations and the pairs for DPO.
    let sft: Vec<Value> = rows
        .iter()
        .map(|r| json!({"prompt": r.prompt, "completion": completion_for(&r.prompt, &r.revision_response)}))
        .collect();
    let mut identical = 0usize;
    let pairs: Vec<Value> = rows
        .iter()
        .filter(|r| {
            let same = r.revision_response.trim() == r.init_response.trim()
                || r.revision_response.trim().is_empty();
            identical += same as usize;
            !same
        })
        .map(|r| {
            json!({
                "prompt": r.prompt,
                "chosen": completion_for(&r.prompt, &r.revision_response),
                "rejected": completion_for(&r.prompt, &r.init_response),
            })
        })
        .collect();
    for (name, body) in [(SFT_FILE, to_jsonl(&sft)), (PAIRS_FILE, to_jsonl(&pairs))] {
        rlhf_model::save::write_atomic(&out.join(name), body.as_bytes())?;
    }
    let mean_words = |f: &dyn Fn(&CaiRow) -> &str| {
        rows.iter()
            .map(|r| f(r).split_whitespace().count())
            .sum::<usize>() as f64
            / rows.len() as f64
    };
    let mut summary = Summary::new();
    summary.insert("prompts".into(), rows.len() as f64);
    summary.insert("rounds".into(), cfg.rounds as f64);
    summary.insert("pairs".into(), pairs.len() as f64);
    summary.insert("identical_revisions".into(), identical as f64);
    summary.insert("stripped_revisions".into(), stripped as f64);
    summary.insert("truncated_conversations".into(), truncated as f64);
    summary.insert("init_words".into(), mean_words(&|r| &r.init_response));
    summary.insert(
        "revision_words".into(),
        mean_words(&|r| &r.revision_response),
    );
    summary.insert("runtime_s".into(), started.elapsed().as_secs_f64());
    crate::checkpoint::write_json(&out.join("constitutional.json"), &summary)?;
    Ok(summary)
}

/// `rlhf constitutional --config FILE [--set k=v]...`.
pub fn run_file(path: &Path, overrides: &[String]) -> Result<Summary> {
    run(&ConstitutionalConfig::load(path, overrides)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_revision_labels_and_quotes() {
        assert_eq!(strip_revision("Revision: I can't help."), "I can't help.");
        assert_eq!(
            strip_revision("**Revised response:** \"I won't do that.\""),
            "I won't do that."
        );
        assert_eq!(
            strip_revision("Here is a revised response:\nSorry, no."),
            "Sorry, no."
        );
        // A colon later in the text, or quotes inside it, are kept.
        assert_eq!(
            strip_revision("Revisions take time: yes."),
            "Revisions take time: yes."
        );
        assert_eq!(strip_revision("\"a\" and \"b\""), "\"a\" and \"b\"");
    }

    #[test]
    fn cuts_where_the_model_starts_the_next_turn() {
        assert_eq!(cut_turn("No.\n\nHuman: and now?"), "No.");
        assert_eq!(cut_turn("Fine. User: more"), "Fine.");
        assert_eq!(cut_turn("plain"), "plain");
    }

    #[test]
    fn reads_the_recipe_shape_ours_and_toml() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.json");
        std::fs::write(
            &p,
            r#"{"constitutions": [{"critic": "C1", "revision": "R1"}],
                "system_chat": [[{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]]}"#,
        )
        .unwrap();
        let c = Constitution::load(&p).unwrap();
        assert_eq!(c.principles[0].critique_request, "C1");
        assert_eq!(c.system_chat[0][1].content, "a");
        std::fs::write(&p, r#"[{"critic": "C", "revision": "R"}, {"critique_request": "C2", "revision_request": "R2", "preference": "Which is kinder?"}]"#).unwrap();
        let c = Constitution::load(&p).unwrap();
        assert_eq!(c.principles.len(), 2);
        assert_eq!(c.principles[1].preference_text(), "Which is kinder?");
        assert!(c.principles[0]
            .preference_text()
            .contains("by this principle: C"));
        let t = dir.path().join("c.toml");
        std::fs::write(
            &t,
            "[[principles]]\ncritique_request = \"C\"\nrevision_request = \"R\"\n",
        )
        .unwrap();
        assert_eq!(
            Constitution::load(&t).unwrap().principles[0].revision_request,
            "R"
        );
        // Errors name the file and the entry.
        std::fs::write(&p, r#"{"constitutions": [{"critic": "C"}]}"#).unwrap();
        let e = Constitution::load(&p).unwrap_err().to_string();
        assert!(
            e.contains("c.json") && e.contains("constitutions[0]") && e.contains("revision"),
            "{e}"
        );
        std::fs::write(
            &p,
            r#"{"constitutions": [{"critic": "C", "revison": "R"}]}"#,
        )
        .unwrap();
        let e = Constitution::load(&p).unwrap_err().to_string();
        assert!(e.contains("unknown key \"revison\""), "{e}");
        std::fs::write(&p, r#"{"constitutions": []}"#).unwrap();
        assert!(Constitution::load(&p)
            .unwrap_err()
            .to_string()
            .contains("no principles"));
    }

    #[test]
    fn principles_are_drawn_from_the_seed() {
        let picks: Vec<usize> = (0..50).map(|i| principle_of(42, i, 1, 4)).collect();
        assert!(picks.iter().all(|&p| p < 4));
        // Every principle gets drawn; another seed draws otherwise.
        for p in 0..4 {
            assert!(picks.contains(&p), "{picks:?}");
        }
        let other: Vec<usize> = (0..50).map(|i| principle_of(7, i, 1, 4)).collect();
        assert_ne!(picks, other);
    }

    #[test]
    fn completions_follow_the_prompt_format() {
        assert_eq!(completion_for(&"Q?\nAnswer:".into(), "No."), json!(" No."));
        assert_eq!(completion_for(&"Q? ".into(), "No."), json!("No."));
        assert_eq!(
            completion_for(&json!([{"role": "user", "content": "q"}]), "No."),
            json!([{"role": "assistant", "content": "No."}])
        );
    }
}
