//! `rlhf label-ai`: RLAIF (Lee et al. 2023): an AI judge labels preference pairs.
//!
//! 1. **pairs**: rows with a prompt and two responses, `{"prompt", "chosen", "rejected"}`
//!    (the file's order is ignored: both orders are asked), `{"prompt", "response_1",
//!    "response_2"}` or `{"prompt", "responses": [a, b]}`; or, with `model` and
//!    `prompt_file`, two samples per prompt from a policy (RL-CAI's preference data);
//! 2. **judge**: each pair asked in both orders of a local model ([`PairwiseJudge`]) or an
//!    OpenAI-compatible endpoint ([`EndpointJudge`]); P(first better) from the log-probs of
//!    "1" and "2"; the two orders' P(A better) averaged (RLAIF's position debiasing);
//! 3. **write**: `pairs.jsonl` in the pair format the reward and DPO trainers read, with
//!    `judge_prob` = P(chosen better); pairs closer to ½ than `tie_threshold` go to
//!    `ties.jsonl` (or nowhere, with `drop_ties`);
//! 4. **report**: `label_ai.json`: labelled, ties, unparsed, the share of pairs where both
//!    orders agree, and agreement with human labels where `human_labels_file` is given.
//!
//! Every answer is appended to `judge_cache.jsonl` (keyed by SHA-256 of the judge's identity
//! and the full query) before the batch's rows are written, so an interrupted run loses no
//! labelled row: a rerun reads every answer it has back, asks only what is missing, and
//! rewrites the outputs.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::constitutional::Constitution;
use crate::judge::{FewShot, JudgePrompt, PairwiseJudge};
use crate::judge_endpoint::{Answer, EndpointConfig, EndpointJudge};
use crate::trainer::{mix, Summary};
use crate::{Error, Result};

/// The default preamble (RLAIF's: the task, what makes a response good, the answer format).
pub const DEFAULT_PREAMBLE: &str = "\
You are comparing two responses to an instruction. A good response follows the instruction, \
is correct, helpful, harmless and honest, and is no longer than it needs to be. Judge the \
content, not the order or the length of the responses. Answer with the number of the better \
response, 1 or 2.";

/// The default per-pair template: it ends with RLAIF's "Preferred Response=", so the answer
/// digit is the next token.
pub const DEFAULT_TEMPLATE: &str = "\
Instruction:
{prompt}

Response 1:
{response_1}

Response 2:
{response_2}

Preferred Response=";

/// `rlhf label-ai`'s settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LabelAiConfig {
    /// Pairs to label (JSONL or Parquet).
    pub input_file: Option<PathBuf>,
    /// Or: the policy whose two samples per prompt are labelled (with `prompt_file`).
    pub model: Option<PathBuf>,
    /// The prompts the policy answers twice (`{"prompt"}` or `{"messages"}` rows).
    pub prompt_file: Option<PathBuf>,
    /// Sampling temperature of the two samples.
    pub temperature: f64,
    /// Top-k filtering of the samples (0: none).
    pub top_k: usize,
    /// Top-p filtering of the samples (1.0: none).
    pub top_p: f64,
    /// New tokens per sample at most.
    pub max_new_tokens: usize,
    /// Completions per generation batch.
    pub generation_batch_size: usize,
    /// Prompt + sample tokens at most.
    pub max_length: usize,
    /// Seed of the samples and of the principle drawn for each pair.
    pub seed: u64,
    /// Where pairs.jsonl, ties.jsonl, judge_cache.jsonl and label_ai.json go.
    pub output_dir: PathBuf,
    /// Label only the first N pairs (0: all).
    pub num_rows: usize,
    /// A local judge: an HF model directory (or an adapter directory).
    pub judge_model_path: Option<PathBuf>,
    /// Or an OpenAI-compatible API's base URL (`http://127.0.0.1:8000/v1`).
    pub judge_url: Option<String>,
    /// The endpoint's model name.
    pub judge_model: Option<String>,
    /// The environment variable holding the endpoint's API key.
    pub judge_api_key_env: Option<String>,
    /// The per-pair template (`{prompt}`, `{response_1}`, `{response_2}`).
    pub judge_template: Option<String>,
    /// Text before the exemplars and the pair (default [`DEFAULT_PREAMBLE`]; "" for none).
    pub preamble: Option<String>,
    /// Worked examples (`[[few_shot]]` with prompt, response_1, response_2, preferred).
    pub few_shot: Vec<FewShot>,
    /// A local judge with a chat template reads the query as the user's turn (true) or as
    /// raw text (false).
    pub judge_chat_template: bool,
    /// A constitution: each pair is judged by one of its principles, drawn with `seed`, as
    /// the preamble (RL-CAI's AI preference labels, Bai et al. 2022).
    pub constitution: Option<PathBuf>,
    /// Pairs per batch (a local judge's forward pass holds both orders of each).
    pub judge_batch_size: usize,
    /// `top_logprobs` asked of an endpoint.
    pub judge_top_logprobs: usize,
    /// Seconds an endpoint request may take.
    pub judge_timeout_s: f64,
    /// Retries of a failed endpoint request (timeouts, connection errors, 429, 5xx).
    pub judge_max_retries: usize,
    /// Seconds before the first retry, doubled each time.
    pub judge_backoff_s: f64,
    /// Endpoint requests in flight at once.
    pub judge_concurrency: usize,
    /// Pairs with |P − ½| below this are ties.
    pub tie_threshold: f64,
    /// Drop ties instead of writing them to ties.jsonl.
    pub drop_ties: bool,
    /// Human labels to measure agreement against (pair format, matched by prompt and the two
    /// responses).
    pub human_labels_file: Option<PathBuf>,
    /// Accepted for pipelines; the outputs are rewritten by every run anyway, and the judge
    /// cache is kept (its keys hold everything that decides an answer, so it is never stale).
    pub overwrite_output_dir: bool,
}

impl Default for LabelAiConfig {
    fn default() -> Self {
        Self {
            input_file: None,
            model: None,
            prompt_file: None,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            max_new_tokens: 64,
            generation_batch_size: 16,
            max_length: 512,
            seed: 42,
            output_dir: PathBuf::from("label_ai"),
            num_rows: 0,
            judge_model_path: None,
            judge_url: None,
            judge_model: None,
            judge_api_key_env: None,
            judge_template: None,
            preamble: None,
            few_shot: Vec::new(),
            judge_chat_template: true,
            constitution: None,
            judge_batch_size: 8,
            judge_top_logprobs: 20,
            judge_timeout_s: 60.0,
            judge_max_retries: 3,
            judge_backoff_s: 1.0,
            judge_concurrency: 4,
            tie_threshold: 0.0,
            drop_ties: false,
            human_labels_file: None,
            overwrite_output_dir: false,
        }
    }
}

/// The config keys of `rlhf label-ai` (a pipeline passes a stage only these).
pub const KEYS: &[&str] = &[
    "input_file",
    "model",
    "prompt_file",
    "temperature",
    "top_k",
    "top_p",
    "max_new_tokens",
    "generation_batch_size",
    "max_length",
    "seed",
    "output_dir",
    "num_rows",
    "judge_model_path",
    "judge_url",
    "judge_model",
    "judge_api_key_env",
    "judge_template",
    "preamble",
    "few_shot",
    "judge_chat_template",
    "constitution",
    "judge_batch_size",
    "judge_top_logprobs",
    "judge_timeout_s",
    "judge_max_retries",
    "judge_backoff_s",
    "judge_concurrency",
    "tie_threshold",
    "drop_ties",
    "human_labels_file",
    "overwrite_output_dir",
];

/// Keys holding paths, resolved against the config file's directory.
pub const PATH_KEYS: &[&str] = &[
    "input_file",
    "model",
    "prompt_file",
    "output_dir",
    "judge_model_path",
    "constitution",
    "human_labels_file",
];

/// The file the labelled pairs go to, in `output_dir`.
pub const PAIRS_FILE: &str = "pairs.jsonl";

impl LabelAiConfig {
    /// Reads `path` with `--set` overrides; unknown keys are errors naming the closest one.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        // `load_table` resolves `model` and `output_dir`; the other paths here.
        let mut table = crate::config::load_table(path, overrides, KEYS)?;
        let base = path.parent().unwrap_or(Path::new("."));
        for k in PATH_KEYS
            .iter()
            .filter(|k| !matches!(**k, "model" | "output_dir"))
        {
            if let Some(toml::Value::String(s)) = table.get_mut(*k) {
                *s = if *k == "judge_model_path" {
                    crate::config::relative_to(base, s)
                } else {
                    crate::config::joined_to(base, s)
                };
            }
        }
        let cfg: Self = crate::config::parse(path, table)?;
        cfg.check(path)?;
        Ok(cfg)
    }

    /// Checks what serde cannot, in the one message shape (`FILE: "key" must be ...`).
    pub fn check(&self, path: &Path) -> Result<()> {
        let k = crate::config::Knobs::new(path);
        let bad = |m: String| Err(Error::Config(format!("{}: {m}", path.display())));
        match (&self.input_file, &self.prompt_file) {
            (Some(_), Some(_)) => {
                return bad(
                    "give `input_file` (pairs to label) or `prompt_file` (prompts the policy \
                     `model` answers twice), not both"
                        .into(),
                )
            }
            (None, None) => {
                return bad(
                    "nothing to label: give `input_file` (pairs: {\"prompt\", \"chosen\", \
                     \"rejected\"}, {\"prompt\", \"response_1\", \"response_2\"} or {\"prompt\", \
                     \"responses\": [a, b]}) or `model` and `prompt_file`"
                        .into(),
                )
            }
            (None, Some(_)) if self.model.is_none() => {
                return bad("`prompt_file` needs `model`, the policy that answers".into())
            }
            (Some(_), None) if self.model.is_some() => {
                return bad(
                    "`model` samples answers to `prompt_file`; with `input_file` the pairs are \
                     given: remove `model`"
                        .into(),
                )
            }
            _ => {}
        }
        match (&self.judge_model_path, &self.judge_url) {
            (Some(_), Some(_)) => {
                return bad("give one judge: `judge_model_path` or `judge_url`, not both".into())
            }
            (None, None) => {
                return bad(
                    "no judge: give `judge_model_path` (a local model) or `judge_url` and \
                     `judge_model` (an OpenAI-compatible endpoint)"
                        .into(),
                )
            }
            (None, Some(_)) if self.judge_model.is_none() => {
                return bad("`judge_url` needs `judge_model`, the model name to ask for".into())
            }
            _ => {}
        }
        if self.output_dir.as_os_str().is_empty() {
            return bad("`output_dir` is required".into());
        }
        k.closed("tie_threshold", self.tie_threshold, 0.0, 0.5)?;
        k.at_least("judge_batch_size", self.judge_batch_size, 1)?;
        k.at_least("judge_concurrency", self.judge_concurrency, 1)?;
        k.at_least("judge_top_logprobs", self.judge_top_logprobs, 2)?;
        if self.judge_top_logprobs > 20 {
            return Err(k.error(
                "judge_top_logprobs",
                "an integer in [2, 20] (OpenAI's limit)",
                self.judge_top_logprobs,
            ));
        }
        k.positive("judge_timeout_s", self.judge_timeout_s)?;
        k.non_negative("judge_backoff_s", self.judge_backoff_s)?;
        k.non_negative("temperature", self.temperature)?;
        k.open_closed("top_p", self.top_p, 0.0, 1.0)?;
        k.at_least("max_new_tokens", self.max_new_tokens, 1)?;
        k.at_least("generation_batch_size", self.generation_batch_size, 1)?;
        k.at_least("max_length", self.max_length, 2)?;
        self.judge_prompt(None).check().map_err(|e| match e {
            Error::InvalidValue {
                key,
                found,
                expected,
            } => {
                let key = if key == "judge template" {
                    "judge_template".to_string()
                } else {
                    key
                };
                k.error(&key, &expected, found)
            }
            e => e,
        })
    }

    /// The judge's prompt, with `preamble` replaced by a principle's where one is drawn.
    pub fn judge_prompt(&self, principle: Option<&str>) -> JudgePrompt {
        let preamble = match principle {
            Some(p) => Some(p.to_string()),
            None => match &self.preamble {
                Some(p) if p.trim().is_empty() => None,
                Some(p) => Some(p.clone()),
                None => Some(DEFAULT_PREAMBLE.to_string()),
            },
        };
        JudgePrompt {
            preamble,
            few_shot: self.few_shot.clone(),
            template: self
                .judge_template
                .clone()
                .unwrap_or_else(|| DEFAULT_TEMPLATE.to_string()),
        }
    }
}

/// One pair to label.
#[derive(Debug, Clone)]
pub struct Item {
    /// Where it came from (`file:line`, or the prompt's line and "samples").
    pub at: String,
    /// The prompt as given (text or messages).
    pub prompt: Value,
    /// The prompt as the judge reads it (a conversation's last user turn).
    pub prompt_text: String,
    /// The two responses as given.
    pub responses: [Value; 2],
    /// The responses as the judge reads them.
    pub texts: [String; 2],
    /// Other fields of the row, carried to the output (not labels: `degree`, `margin` and
    /// `safety` name the input's chosen answer).
    pub extra: Map<String, Value>,
}

/// Fields an input row's label or answers live in; everything else is carried over.
const LABEL_FIELDS: [&str; 10] = [
    "prompt",
    "chosen",
    "rejected",
    "response_1",
    "response_2",
    "responses",
    "degree",
    "margin",
    "safety",
    "ranking",
];

/// A text field as the judge reads it: a string, or a message list's last turn of `role`
/// (the last turn of any role when none has it).
fn text_of(v: &Value, role: &str) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Array(turns) => turns
            .iter()
            .rev()
            .find(|t| t["role"] == role)
            .or_else(|| turns.last())
            .and_then(|t| t["content"].as_str())
            .map(str::to_string),
        _ => None,
    }
}

/// Reads pairs to label: `{"prompt", "chosen", "rejected"}`, `{"prompt", "response_1",
/// "response_2"}` or `{"prompt", "responses": [a, b]}`.
pub fn read_items(path: &Path) -> Result<Vec<Item>> {
    let shape = "rows look like {\"prompt\", \"chosen\", \"rejected\"}, {\"prompt\", \
                 \"response_1\", \"response_2\"} or {\"prompt\", \"responses\": [a, b]}";
    let mut items = Vec::new();
    for row in rlhf_data::read_rows(path)? {
        let at = row.at.to_string();
        let f = &row.fields;
        let field = |k: &str| f.get(k).filter(|v| !v.is_null());
        let responses: [Value; 2] = if let (Some(a), Some(b)) = (field("chosen"), field("rejected"))
        {
            [a.clone(), b.clone()]
        } else if let (Some(a), Some(b)) = (field("response_1"), field("response_2")) {
            [a.clone(), b.clone()]
        } else if let Some(r) = field("responses") {
            match r.as_array().map(Vec::as_slice) {
                Some([a, b]) => [a.clone(), b.clone()],
                _ => {
                    return Err(Error::Config(format!(
                        "{at}: \"responses\" must be a list of exactly two answers, found {}",
                        clip(&r.to_string(), 80)
                    )))
                }
            }
        } else {
            let keys: Vec<&String> = f.keys().collect();
            return Err(Error::Config(format!(
                "{at}: no two responses to compare (found keys {keys:?}); {shape}"
            )));
        };
        let prompt = field("prompt")
            .cloned()
            .ok_or_else(|| Error::Config(format!("{at}: no \"prompt\"; {shape}")))?;
        let prompt_text = text_of(&prompt, "user").ok_or_else(|| {
            Error::Config(format!(
                "{at}: \"prompt\" must be text or a list of messages, found {}",
                clip(&prompt.to_string(), 80)
            ))
        })?;
        let mut texts = [String::new(), String::new()];
        for (i, r) in responses.iter().enumerate() {
            texts[i] = text_of(r, "assistant").ok_or_else(|| {
                Error::Config(format!(
                    "{at}: response {} must be text or a list of messages, found {}",
                    i + 1,
                    clip(&r.to_string(), 80)
                ))
            })?;
        }
        let extra = f
            .iter()
            .filter(|(k, _)| !LABEL_FIELDS.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        items.push(Item {
            at,
            prompt,
            prompt_text,
            responses,
            texts,
            extra,
        });
    }
    Ok(items)
}

/// A key for a prompt and an unordered pair of responses (human labels are matched by it).
fn pair_key(prompt: &Value, a: &Value, b: &Value) -> String {
    let s = |v: &Value| match v {
        Value::String(s) => s.trim().to_string(),
        other => other.to_string(),
    };
    let (a, b) = (s(a), s(b));
    let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
    serde_json::to_string(&[s(prompt), lo, hi]).expect("strings serialise")
}

/// Which backend answers the queries.
enum Backend {
    Local(Box<PairwiseJudge>),
    Endpoint(EndpointJudge),
}

/// What the cache remembers of one query.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
enum Cached {
    Prob { p: f64 },
    Unparsed { unparsed: String },
}

#[derive(Serialize, Deserialize)]
struct CacheLine {
    key: String,
    #[serde(flatten)]
    answer: Cached,
}

/// `judge_cache.jsonl`: every answer, appended and flushed batch by batch.
struct Cache {
    path: PathBuf,
    map: HashMap<String, Cached>,
    file: std::fs::File,
}

impl Cache {
    fn open(path: &Path) -> Result<Self> {
        let mut map = HashMap::new();
        if let Ok(text) = std::fs::read_to_string(path) {
            let mut torn = 0;
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                match serde_json::from_str::<CacheLine>(line) {
                    Ok(l) => {
                        map.insert(l.key, l.answer);
                    }
                    Err(_) => torn += 1,
                }
            }
            if torn > 0 {
                tracing::warn!(
                    "{}: {torn} unreadable lines skipped (a run killed mid-write)",
                    path.display()
                );
            }
        }
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        // A line torn by a kill would swallow the next one's start: begin on a fresh line.
        let torn_tail = std::fs::read(path)
            .map(|b| b.last().is_some_and(|&c| c != b'\n'))
            .unwrap_or(false);
        if torn_tail {
            file.write_all(b"\n").map_err(|e| Error::io(path, e))?;
        }
        Ok(Self {
            path: path.to_path_buf(),
            map,
            file,
        })
    }

    fn add(&mut self, answers: Vec<(String, Cached)>) -> Result<()> {
        if answers.is_empty() {
            return Ok(());
        }
        let mut buf = String::new();
        for (key, answer) in answers {
            let line = CacheLine { key, answer };
            buf.push_str(&serde_json::to_string(&line).expect("answers serialise"));
            buf.push('\n');
            self.map.insert(line.key, line.answer);
        }
        let io = |e| Error::io(&self.path, e);
        self.file.write_all(buf.as_bytes()).map_err(io)?;
        self.file.flush().map_err(io)?;
        self.file.sync_data().map_err(io)
    }
}

/// An output file appended to batch by batch.
struct Out {
    path: PathBuf,
    file: std::fs::File,
}

impl Out {
    fn create(path: PathBuf) -> Result<Self> {
        let file = std::fs::File::create(&path).map_err(|e| Error::io(&path, e))?;
        Ok(Self { path, file })
    }

    fn append(&mut self, rows: &[Value]) -> Result<()> {
        let mut buf = String::new();
        for r in rows {
            buf.push_str(&serde_json::to_string(r).expect("rows serialise"));
            buf.push('\n');
        }
        let io = |e| Error::io(&self.path, e);
        self.file.write_all(buf.as_bytes()).map_err(io)?;
        self.file.flush().map_err(io)?;
        self.file.sync_data().map_err(io)
    }
}

/// `label_ai.json`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LabelReport {
    /// Pairs read (or sampled).
    pub rows: usize,
    /// Pairs written to pairs.jsonl.
    pub labelled: usize,
    /// Pairs within `tie_threshold` of ½.
    pub ties: usize,
    /// Ties dropped (`drop_ties`).
    pub dropped: usize,
    /// Pairs where an order's answer had neither "1" nor "2" among its top tokens.
    pub unparsed: usize,
    /// Where the first unparsed pairs came from, and what the judge said first.
    pub unparsed_examples: Vec<String>,
    /// Share of judged pairs where both orders prefer the same response.
    pub position_consistency: f64,
    /// Mean P(response shown first is better) over every query: 0.5 for an unbiased judge.
    pub mean_p_first: f64,
    /// Mean |P − ½| of the debiased preference.
    pub mean_confidence: f64,
    /// Queries answered by the judge in this run.
    pub queries_asked: usize,
    /// Queries answered from judge_cache.jsonl.
    pub queries_cached: usize,
    /// Agreement with human labels (when `human_labels_file` is given).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub human: Option<HumanAgreement>,
    /// Seconds the run took.
    pub runtime_s: f64,
}

/// Agreement of the judge with human labels.
#[derive(Debug, Clone, Default, Serialize)]
pub struct HumanAgreement {
    /// Judged pairs that the human file also labels.
    pub matched: usize,
    /// Of those, pairs the judge called a tie.
    pub ties: usize,
    /// Share of the matched non-tie pairs where the judge chose the human's chosen answer.
    pub agreement: f64,
    /// The same, ties counted as half.
    pub agreement_ties_half: f64,
    /// Agreement over the matched pairs whose two orders agreed.
    pub agreement_consistent: f64,
    /// How many matched pairs had both orders agree.
    pub consistent: usize,
}

impl LabelReport {
    /// The report as the numbers a pipeline stage's summary holds.
    pub fn summary(&self) -> Summary {
        let mut s = Summary::new();
        for (k, v) in [
            ("rows", self.rows as f64),
            ("labelled", self.labelled as f64),
            ("ties", self.ties as f64),
            ("dropped", self.dropped as f64),
            ("unparsed", self.unparsed as f64),
            ("position_consistency", self.position_consistency),
            ("mean_p_first", self.mean_p_first),
            ("queries_asked", self.queries_asked as f64),
            ("queries_cached", self.queries_cached as f64),
        ] {
            s.insert(k.into(), v);
        }
        if let Some(h) = &self.human {
            s.insert("human_agreement".into(), h.agreement);
            s.insert("human_agreement_ties_half".into(), h.agreement_ties_half);
            s.insert("human_matched".into(), h.matched as f64);
        }
        s
    }

    /// The lines `rlhf label-ai` prints on stderr.
    pub fn table(&self) -> String {
        let mut out = format!(
            "{} pairs: {} labelled, {} ties ({} dropped), {} unparsed; position consistency \
             {:.3}, mean P(first shown better) {:.3}; {} queries asked, {} from the cache\n",
            self.rows,
            self.labelled,
            self.ties,
            self.dropped,
            self.unparsed,
            self.position_consistency,
            self.mean_p_first,
            self.queries_asked,
            self.queries_cached
        );
        if let Some(h) = &self.human {
            out.push_str(&format!(
                "agreement with human labels: {:.3} over {} decided pairs ({:.3} with ties as \
                 half, {} matched, {} ties); {:.3} over the {} pairs both orders agreed on\n",
                h.agreement,
                h.matched - h.ties,
                h.agreement_ties_half,
                h.matched,
                h.ties,
                h.agreement_consistent,
                h.consistent
            ));
        }
        out
    }
}

/// One pair's verdict.
#[derive(Debug, Clone, Copy)]
struct Judged {
    /// P(response 0 better) with response 0 shown first.
    p_a_first: f64,
    /// P(response 0 better) with response 0 shown second.
    p_a_second: f64,
}

impl Judged {
    fn p(&self) -> f64 {
        0.5 * (self.p_a_first + self.p_a_second)
    }

    fn consistent(&self) -> bool {
        (self.p_a_first > 0.5 && self.p_a_second > 0.5)
            || (self.p_a_first < 0.5 && self.p_a_second < 0.5)
    }
}

/// The judge's identity in the cache key: what, besides the query text, decides an answer.
fn identity(cfg: &LabelAiConfig, backend: &Backend) -> Result<String> {
    let v = match backend {
        Backend::Local(j) => {
            let dir = cfg.judge_model_path.as_deref().expect("a local judge");
            let canon = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
            // The weights' sizes and times: a model retrained in place is another judge.
            let mut files = Vec::new();
            if let Ok(rd) = std::fs::read_dir(&canon) {
                for e in rd.flatten() {
                    let name = e.file_name().to_string_lossy().into_owned();
                    if name.ends_with(".safetensors") || name.ends_with(".json") {
                        if let Ok(m) = e.metadata() {
                            let t = m
                                .modified()
                                .ok()
                                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                                .map_or(0, |d| d.as_nanos());
                            files.push((name, m.len(), t));
                        }
                    }
                }
            }
            files.sort();
            serde_json::json!({"local": canon, "files": files, "chat": j.uses_chat_template()})
        }
        Backend::Endpoint(e) => serde_json::json!({
            "url": e.url(), "model": cfg.judge_model, "top_logprobs": cfg.judge_top_logprobs,
        }),
    };
    Ok(v.to_string())
}

fn key_of(identity: &str, query: &str) -> String {
    let mut h = Sha256::new();
    h.update(identity.as_bytes());
    h.update([0u8]);
    h.update(query.as_bytes());
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Answers `queries` with the backend: all of them, or (an endpoint) those asked before the
/// first failure, which is returned beside them with the query's index.
fn ask(
    cfg: &LabelAiConfig,
    backend: &Backend,
    queries: &[&str],
) -> (Vec<Option<Cached>>, Option<(usize, String)>) {
    match backend {
        Backend::Local(j) => {
            let owned: Vec<String> = queries.iter().map(|q| q.to_string()).collect();
            match j.prob_first_rendered(&owned) {
                Ok(ps) => (
                    ps.into_iter().map(|p| Some(Cached::Prob { p })).collect(),
                    None,
                ),
                Err(e) => (vec![None; queries.len()], Some((0, e.to_string()))),
            }
        }
        Backend::Endpoint(e) => {
            let results: Vec<std::sync::Mutex<Option<std::result::Result<Answer, String>>>> =
                queries
                    .iter()
                    .map(|_| std::sync::Mutex::new(None))
                    .collect();
            let next = std::sync::atomic::AtomicUsize::new(0);
            let failed = std::sync::atomic::AtomicBool::new(false);
            std::thread::scope(|s| {
                for _ in 0..cfg.judge_concurrency.min(queries.len()) {
                    s.spawn(|| loop {
                        if failed.load(std::sync::atomic::Ordering::Relaxed) {
                            return;
                        }
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if i >= queries.len() {
                            return;
                        }
                        let r = e.ask(queries[i]);
                        if r.is_err() {
                            failed.store(true, std::sync::atomic::Ordering::Relaxed);
                        }
                        *results[i].lock().expect("no panics hold it") = Some(r);
                    });
                }
            });
            let mut out = Vec::with_capacity(queries.len());
            let mut first_err = None;
            for (i, r) in results.into_iter().enumerate() {
                match r.into_inner().expect("no panics hold it") {
                    Some(Ok(Answer::Prob(p))) => out.push(Some(Cached::Prob { p })),
                    Some(Ok(Answer::Unparsed(u))) => {
                        out.push(Some(Cached::Unparsed { unparsed: u }))
                    }
                    Some(Err(m)) => {
                        if first_err.is_none() {
                            first_err = Some((i, m));
                        }
                        out.push(None);
                    }
                    None => out.push(None),
                }
            }
            (out, first_err)
        }
    }
}

/// The policy's two samples per prompt, as pairs (kept in `samples.json` under a key of the
/// settings that made them, so a rerun samples nothing twice).
fn sample_items(cfg: &LabelAiConfig) -> Result<Vec<Item>> {
    let model_dir = cfg.model.as_deref().expect("checked");
    let prompt_file = cfg.prompt_file.as_deref().expect("checked");
    let key = serde_json::json!({
        "model": model_dir, "prompt_file": prompt_file, "temperature": cfg.temperature,
        "top_k": cfg.top_k, "top_p": cfg.top_p, "max_new_tokens": cfg.max_new_tokens,
        "max_length": cfg.max_length, "seed": cfg.seed, "num_rows": cfg.num_rows,
    });
    let path = cfg.output_dir.join("samples.json");
    #[derive(Serialize, Deserialize)]
    struct Samples {
        key: Value,
        rows: Vec<(String, Value, String, [String; 2])>,
    }
    let cached = std::fs::read_to_string(&path)
        .ok()
        .and_then(|t| serde_json::from_str::<Samples>(&t).ok())
        .filter(|s| s.key == key);
    let rows = match cached {
        Some(s) => {
            tracing::info!("{}: samples read back", path.display());
            s.rows
        }
        None => {
            let model = rlhf_model::Model::load(
                model_dir,
                &rlhf_model::LoadOptions {
                    heads: rlhf_model::Heads::Lm,
                    ..Default::default()
                },
            )?;
            let tok = if model_dir.join("tokenizer.json").is_file() {
                rlhf_model::tokenizer::Tokenizer::from_dir(model_dir)?
            } else {
                rlhf_model::tokenizer::Tokenizer::from_dir(model.dir())?
            };
            let max_prompt = cfg.max_length.saturating_sub(cfg.max_new_tokens).max(1);
            let (mut records, mut ids) =
                crate::rollout::load_prompts(prompt_file, &tok, false, max_prompt)?;
            if cfg.num_rows > 0 {
                records.truncate(cfg.num_rows);
                ids.truncate(cfg.num_rows);
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
            let twice: Vec<Vec<u32>> = ids.iter().flat_map(|p| [p.clone(), p.clone()]).collect();
            tracing::info!("sampling two answers to each of {} prompts", records.len());
            let gens = crate::rollout::generate_batched(
                &model,
                &twice,
                &gen,
                cfg.generation_batch_size,
                |k| mix(cfg.seed, 7, k as u64),
            )?;
            let ids: Vec<Vec<u32>> = gens.into_iter().map(|g| g.completion_ids).collect();
            let texts = crate::rollout::Decoder::new(&tok, &eos).texts(&ids)?;
            let rows: Vec<(String, Value, String, [String; 2])> = records
                .iter()
                .zip(texts.chunks(2))
                .map(|(r, t)| {
                    let prompt = r
                        .row
                        .get("prompt")
                        .or_else(|| r.row.get("messages"))
                        .cloned()
                        .unwrap_or_default();
                    let text = text_of(&prompt, "user").unwrap_or_default();
                    (r.at.to_string(), prompt, text, [t[0].clone(), t[1].clone()])
                })
                .collect();
            let s = Samples { key, rows };
            rlhf_model::save::write_atomic(
                &path,
                &serde_json::to_vec(&s).expect("samples serialise"),
            )?;
            s.rows
        }
    };
    Ok(rows
        .into_iter()
        .map(|(at, prompt, prompt_text, [a, b])| {
            // A conversation's answers are assistant turns (TRL's conversational format: a
            // row's text fields are all strings or all message lists).
            let answer = |t: &str| match prompt {
                Value::Array(_) => serde_json::json!([{"role": "assistant", "content": t}]),
                _ => Value::String(t.to_string()),
            };
            Item {
                at: format!("{at} (samples)"),
                responses: [answer(&a), answer(&b)],
                prompt,
                prompt_text,
                texts: [a, b],
                extra: Map::new(),
            }
        })
        .collect())
}

/// Human labels by [`pair_key`]: the chosen response's text.
fn read_human(path: &Path) -> Result<HashMap<String, String>> {
    let mut out = HashMap::new();
    for row in rlhf_data::read_rows(path)? {
        let f = &row.fields;
        let (Some(p), Some(c), Some(r)) = (f.get("prompt"), f.get("chosen"), f.get("rejected"))
        else {
            return Err(Error::Config(format!(
                "{}: human labels are pairs {{\"prompt\", \"chosen\", \"rejected\"}} (the \
                 feedback app's `export pairs`, or data/prefs)",
                row.at
            )));
        };
        let chosen = text_of(c, "assistant").unwrap_or_default();
        out.insert(pair_key(p, c, r), chosen.trim().to_string());
    }
    Ok(out)
}

/// Runs `rlhf label-ai` with a loaded config; returns the report (also in label_ai.json).
pub fn run(cfg: &LabelAiConfig) -> Result<LabelReport> {
    let started = Instant::now();
    let _lock = crate::outdir::lock(&cfg.output_dir)?;
    let mut items = match &cfg.input_file {
        Some(f) => read_items(f)?,
        None => sample_items(cfg)?,
    };
    if cfg.num_rows > 0 {
        items.truncate(cfg.num_rows);
    }
    if items.is_empty() {
        return Err(Error::Config("label-ai: no pairs to label".into()));
    }
    let human = cfg
        .human_labels_file
        .as_deref()
        .map(read_human)
        .transpose()?;
    let principles = match &cfg.constitution {
        Some(p) => Some(Constitution::load(p)?),
        None => None,
    };
    let backend = match (&cfg.judge_model_path, &cfg.judge_url) {
        (Some(dir), _) => Backend::Local(Box::new(
            PairwiseJudge::load_with(dir, cfg.judge_prompt(None), cfg.judge_chat_template)?
                .with_batch_size(cfg.judge_batch_size * 2),
        )),
        (None, Some(url)) => {
            let api_key = match &cfg.judge_api_key_env {
                Some(var) => Some(std::env::var(var).map_err(|_| {
                    Error::Config(format!(
                        "judge_api_key_env = {var:?}: the environment variable is not set"
                    ))
                })?),
                None => None,
            };
            Backend::Endpoint(EndpointJudge::new(EndpointConfig {
                url: url.clone(),
                model: cfg.judge_model.clone().unwrap_or_default(),
                api_key,
                top_logprobs: cfg.judge_top_logprobs,
                timeout: Duration::from_secs_f64(cfg.judge_timeout_s),
                max_retries: cfg.judge_max_retries,
                backoff: Duration::from_secs_f64(cfg.judge_backoff_s),
            })?)
        }
        (None, None) => unreachable!("checked"),
    };
    let id = identity(cfg, &backend)?;
    let mut cache = Cache::open(&cfg.output_dir.join("judge_cache.jsonl"))?;
    let mut pairs_out = Out::create(cfg.output_dir.join(PAIRS_FILE))?;
    let mut ties_out = if cfg.drop_ties {
        None
    } else {
        Some(Out::create(cfg.output_dir.join("ties.jsonl"))?)
    };

    let mut report = LabelReport {
        rows: items.len(),
        ..Default::default()
    };
    let mut p_first_sum = 0.0;
    let mut p_first_n = 0usize;
    let mut consistent = 0usize;
    let mut judged_n = 0usize;
    let mut confidence = 0.0;
    let mut h = HumanAgreement::default();
    let (mut h_agree, mut h_agree_cons) = (0usize, 0usize);
    for (b, batch) in items.chunks(cfg.judge_batch_size).enumerate() {
        // Both orders of every pair; with a constitution, each pair's own principle.
        let mut queries = Vec::with_capacity(batch.len() * 2);
        for (i, item) in batch.iter().enumerate() {
            let index = b * cfg.judge_batch_size + i;
            let prompt = match &principles {
                Some(c) => {
                    let p = &c.principles[principle_index(cfg.seed, index, c.principles.len())];
                    cfg.judge_prompt(Some(&p.preference_text()))
                }
                None => cfg.judge_prompt(None),
            };
            let [a, bb] = &item.texts;
            queries.push(prompt.render(&item.prompt_text, a, bb));
            queries.push(prompt.render(&item.prompt_text, bb, a));
        }
        let keys: Vec<String> = queries.iter().map(|q| key_of(&id, q)).collect();
        let missing: Vec<usize> = (0..queries.len())
            .filter(|&i| !cache.map.contains_key(&keys[i]))
            .collect();
        report.queries_cached += queries.len() - missing.len();
        if !missing.is_empty() {
            let asked: Vec<&str> = missing.iter().map(|&i| queries[i].as_str()).collect();
            let (answers, failure) = ask(cfg, &backend, &asked);
            let got: Vec<(String, Cached)> = missing
                .iter()
                .zip(answers)
                .filter_map(|(&i, a)| a.map(|a| (keys[i].clone(), a)))
                .collect();
            report.queries_asked += got.len();
            // What was answered is kept before any error is reported: a rerun asks it no more.
            cache.add(got)?;
            if let Some((j, m)) = failure {
                let item = &batch[missing[j] / 2];
                return Err(Error::Config(format!(
                    "{}: judging this pair failed: {m}. The {} pairs labelled so far are in {} \
                     and every answer so far in {}: rerun to resume",
                    item.at,
                    report.labelled,
                    pairs_out.path.display(),
                    cache.path.display()
                )));
            }
        }
        let mut pair_rows = Vec::new();
        let mut tie_rows = Vec::new();
        for (i, item) in batch.iter().enumerate() {
            let a = &cache.map[&keys[2 * i]];
            let bb = &cache.map[&keys[2 * i + 1]];
            let (p_first, p_second) = match (a, bb) {
                (Cached::Prob { p: x }, Cached::Prob { p: y }) => (*x, *y),
                (a, bb) => {
                    report.unparsed += 1;
                    if report.unparsed_examples.len() < 5 {
                        let said = [a, bb]
                            .iter()
                            .find_map(|c| match c {
                                Cached::Unparsed { unparsed } => Some(unparsed.clone()),
                                _ => None,
                            })
                            .unwrap_or_default();
                        report
                            .unparsed_examples
                            .push(format!("{}: top tokens {said}", item.at));
                    }
                    continue;
                }
            };
            p_first_sum += p_first + p_second;
            p_first_n += 2;
            let j = Judged {
                p_a_first: p_first,
                p_a_second: 1.0 - p_second,
            };
            judged_n += 1;
            consistent += j.consistent() as usize;
            let p = j.p();
            confidence += (p - 0.5).abs();
            let tie = (p - 0.5).abs() < cfg.tie_threshold || p == 0.5;
            let (c, r) = if p >= 0.5 { (0, 1) } else { (1, 0) };
            let mut row = Map::new();
            row.insert("prompt".into(), item.prompt.clone());
            row.insert("chosen".into(), item.responses[c].clone());
            row.insert("rejected".into(), item.responses[r].clone());
            row.insert("judge_prob".into(), p.max(1.0 - p).into());
            // P(chosen better) with the chosen response shown first, then second.
            let (pf, ps) = if c == 0 {
                (j.p_a_first, j.p_a_second)
            } else {
                (1.0 - j.p_a_second, 1.0 - j.p_a_first)
            };
            row.insert("judge_probs".into(), serde_json::json!([pf, ps]));
            if tie {
                row.insert("tie".into(), true.into());
            }
            for (k, v) in &item.extra {
                row.entry(k.clone()).or_insert_with(|| v.clone());
            }
            if let Some(hm) = &human {
                let k = pair_key(&item.prompt, &item.responses[0], &item.responses[1]);
                if let Some(human_chosen) = hm.get(&k) {
                    h.matched += 1;
                    if tie {
                        h.ties += 1;
                    } else {
                        let agree = item.texts[c].trim() == human_chosen;
                        h_agree += agree as usize;
                        if j.consistent() {
                            h.consistent += 1;
                            h_agree_cons += agree as usize;
                        }
                    }
                }
            }
            if tie {
                report.ties += 1;
                if cfg.drop_ties {
                    report.dropped += 1;
                } else {
                    tie_rows.push(Value::Object(row));
                }
            } else {
                report.labelled += 1;
                pair_rows.push(Value::Object(row));
            }
        }
        pairs_out.append(&pair_rows)?;
        if let Some(t) = &mut ties_out {
            t.append(&tie_rows)?;
        }
        tracing::info!(
            "label-ai: {} of {} pairs judged",
            (b * cfg.judge_batch_size + batch.len()).min(items.len()),
            items.len()
        );
    }
    let ratio = |a: usize, b: usize| if b > 0 { a as f64 / b as f64 } else { f64::NAN };
    report.position_consistency = ratio(consistent, judged_n);
    report.mean_p_first = if p_first_n > 0 {
        p_first_sum / p_first_n as f64
    } else {
        f64::NAN
    };
    report.mean_confidence = if judged_n > 0 {
        confidence / judged_n as f64
    } else {
        f64::NAN
    };
    if human.is_some() {
        let decided = h.matched - h.ties;
        h.agreement = ratio(h_agree, decided);
        h.agreement_ties_half = ratio(2 * h_agree + h.ties, 2 * h.matched);
        h.agreement_consistent = ratio(h_agree_cons, h.consistent);
        report.human = Some(h);
    }
    report.runtime_s = started.elapsed().as_secs_f64();
    let path = cfg.output_dir.join("label_ai.json");
    rlhf_model::save::write_atomic(
        &path,
        &serde_json::to_vec_pretty(&report).expect("report serialises"),
    )?;
    if report.unparsed > 0 {
        tracing::warn!(
            "{} pairs had an answer with neither \"1\" nor \"2\" among the judge's top tokens \
             and were not labelled (first: {}); a template whose end asks for the digit helps",
            report.unparsed,
            report.unparsed_examples.join("; ")
        );
    }
    Ok(report)
}

/// `rlhf label-ai --config FILE [--set k=v]...`: loads the config and runs it.
pub fn run_file(path: &Path, overrides: &[String]) -> Result<LabelReport> {
    run(&LabelAiConfig::load(path, overrides)?)
}

/// [`run_file`] as a pipeline stage: the report's numbers as the stage's summary.
pub fn run_stage(path: &Path) -> Result<Summary> {
    let r = run_file(path, &[])?;
    tracing::info!("\n{}", r.table());
    Ok(r.summary())
}

fn clip(s: &str, n: usize) -> String {
    if s.chars().count() > n {
        format!("{}…", s.chars().take(n).collect::<String>())
    } else {
        s.to_string()
    }
}

/// The principle (an index into the constitution's) that judges pair `row`.
pub fn principle_index(seed: u64, row: usize, n: usize) -> usize {
    (mix(seed, 11, row as u64) as usize) % n.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pair_keys_ignore_order_and_padding() {
        let p = Value::String("q".into());
        let a = Value::String(" yes".into());
        let b = Value::String("no".into());
        assert_eq!(pair_key(&p, &a, &b), pair_key(&p, &b, &a));
        assert_eq!(pair_key(&p, &a, &b), pair_key(&p, &"yes".into(), &b));
        assert_ne!(pair_key(&p, &a, &b), pair_key(&"q2".into(), &a, &b));
    }

    #[test]
    fn judged_pairs_average_the_orders() {
        // A first-position-biased judge: 0.9 shown first, 0.3 (= 1 - 0.7) shown second.
        let j = Judged {
            p_a_first: 0.9,
            p_a_second: 0.3,
        };
        assert!((j.p() - 0.6).abs() < 1e-12);
        assert!(!j.consistent());
        let j = Judged {
            p_a_first: 0.2,
            p_a_second: 0.4,
        };
        assert!(j.consistent() && j.p() < 0.5);
    }

    #[test]
    fn input_shapes_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("in.jsonl");
        std::fs::write(
            &p,
            concat!(
                r#"{"prompt": "q1", "chosen": "a", "rejected": "b", "degree": "better", "id": 7}"#,
                "\n",
                r#"{"prompt": [{"role": "user", "content": "q2"}], "response_1": "c", "response_2": "d"}"#,
                "\n",
                r#"{"prompt": "q3", "responses": ["e", "f"]}"#,
                "\n"
            ),
        )
        .unwrap();
        let items = read_items(&p).unwrap();
        assert_eq!(items.len(), 3);
        assert_eq!(items[0].texts, ["a".to_string(), "b".to_string()]);
        assert_eq!(items[0].extra.keys().collect::<Vec<_>>(), ["id"]);
        assert_eq!(items[1].prompt_text, "q2");
        assert_eq!(items[2].texts[1], "f");
        std::fs::write(
            &p,
            "{\"prompt\": \"q\", \"responses\": [\"a\", \"b\", \"c\"]}\n",
        )
        .unwrap();
        let e = read_items(&p).unwrap_err().to_string();
        assert!(e.contains("in.jsonl:1") && e.contains("exactly two"), "{e}");
        std::fs::write(&p, "\n{\"prompt\": \"q\", \"completion\": \"a\"}\n").unwrap();
        let e = read_items(&p).unwrap_err().to_string();
        assert!(
            e.contains("in.jsonl:2") && e.contains("no two responses"),
            "{e}"
        );
    }
}
