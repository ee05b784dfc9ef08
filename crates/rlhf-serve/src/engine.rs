//! The engine: one thread owns the model and decodes every running request together
//! (continuous batching).
//!
//! Requests arrive on a channel. Each turn of the loop admits the requests that are waiting
//! (up to the batch's size): their prompts run through one prefill of their own, each picks
//! its first token, and their cache rows join the running batch's, aligned by left padding
//! (`KvCache::append_rows`). Then every running row decodes one token in one forward pass.
//! A row leaves when it ends (EOS, `max_tokens`, its client stopping it or going away); when
//! the rows that remain share enough left padding, those columns are dropped.
//!
//! Each row keeps its own positions (counted from its first real token), sampling settings
//! and random generator (seeded by the request's `seed`), so its tokens do not depend on
//! which other requests share its batch.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use candle_core::{DType, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rlhf_model::generate::{pick_token, prefill, GenerationConfig};
use rlhf_model::kernels::KvCache;
use rlhf_model::model::SourceCache;
use rlhf_model::{Heads, LoadOptions, Model};
use tokio::sync::{mpsc, oneshot};

use crate::{Error, Result};

/// What the loaded model serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    /// A language model: chat and text completions.
    Generate,
    /// A reward model (a score head): `/v1/score`.
    Score,
}

/// Facts about the loaded model the HTTP side needs.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// What it serves.
    pub task: Task,
    /// Positions it was trained for (prompt plus completion at most).
    pub context: usize,
    /// Vocabulary size (prompt ids must be below it).
    pub vocab: usize,
    /// Ids that end a sequence (config.json, generation_config.json, the tokenizer).
    pub eos_token_ids: Vec<u32>,
}

/// Per-request decoding settings.
#[derive(Debug, Clone)]
pub struct Sampling {
    /// Tokens to generate at most (at least 1).
    pub max_tokens: usize,
    /// 0 is greedy.
    pub temperature: f64,
    /// Nucleus mass (None: no limit).
    pub top_p: Option<f64>,
    /// Keep the k most likely tokens (None: no limit).
    pub top_k: Option<usize>,
    /// Seeds this request's own generator; None draws a seed.
    pub seed: Option<u64>,
    /// Return each picked token's log-probability and this many alternatives.
    pub logprobs: Option<usize>,
    /// Keep going past EOS (benchmarks).
    pub ignore_eos: bool,
}

/// One sequence to generate.
pub struct GenRequest {
    /// Prompt ids (at least one).
    pub prompt: Vec<u32>,
    /// How to decode it.
    pub sampling: Sampling,
    /// Which choice of its HTTP request this is (events carry it back).
    pub choice: usize,
    /// Set by the client side to stop the row (a stop string was reached).
    pub cancel: Arc<AtomicBool>,
    /// Where its tokens go; a dropped receiver stops the row.
    pub events: mpsc::UnboundedSender<Event>,
}

/// Why a row ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// It generated an EOS id.
    Eos,
    /// It reached `max_tokens`.
    Length,
}

/// What the engine tells a request.
#[derive(Debug)]
pub enum Event {
    /// A generated token.
    Token {
        /// The request's choice.
        choice: usize,
        /// The token id.
        id: u32,
        /// With logprobs asked: log p(id), and the most likely tokens with theirs, under
        /// the model's own next-token distribution (before temperature, top-k or top-p).
        logprobs: Option<(f32, Vec<(u32, f32)>)>,
    },
    /// The row ended (sent after its last token).
    Done {
        /// The request's choice.
        choice: usize,
        /// Why.
        finish: Finish,
    },
    /// The engine failed on this row's batch.
    Failed {
        /// The request's choice.
        choice: usize,
        /// What went wrong.
        message: String,
    },
}

/// Sequences to score with a reward model.
pub struct ScoreRequest {
    /// Token ids of each sequence.
    pub seqs: Vec<Vec<u32>>,
    /// The scores, in order.
    pub reply: oneshot::Sender<std::result::Result<Vec<f32>, String>>,
}

enum Job {
    Generate(Vec<GenRequest>),
    Score(ScoreRequest),
}

/// Sends work to the engine thread; cheap to clone.
#[derive(Clone)]
pub struct EngineHandle {
    jobs: std::sync::mpsc::Sender<Job>,
    /// The loaded model.
    pub info: ModelInfo,
    /// What the loop has done so far.
    pub stats: Arc<Stats>,
}

/// Counters of the loop (for tests and logs).
#[derive(Debug, Default)]
pub struct Stats {
    /// Decoding steps run.
    pub steps: AtomicU64,
    /// Requests that joined a batch while it was decoding other requests.
    pub joined: AtomicU64,
    /// The most rows decoded in one step.
    pub max_rows: AtomicU64,
    /// Times the batch dropped left padding no row needed any more.
    pub compactions: AtomicU64,
}

/// The engine has stopped (its thread ended).
#[derive(Debug)]
pub struct Stopped;

impl EngineHandle {
    /// Queues sequences to generate, admitted together (one HTTP request's choices).
    pub fn generate(&self, reqs: Vec<GenRequest>) -> std::result::Result<(), Stopped> {
        self.jobs.send(Job::Generate(reqs)).map_err(|_| Stopped)
    }

    /// Queues sequences to score.
    pub fn score(&self, req: ScoreRequest) -> std::result::Result<(), Stopped> {
        self.jobs.send(Job::Score(req)).map_err(|_| Stopped)
    }
}

/// How to load the model.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Model directory (or a PEFT adapter directory over its base).
    pub model: PathBuf,
    /// A PEFT adapter to apply.
    pub adapter: Option<PathBuf>,
    /// Rows decoded together at most; later requests wait.
    pub max_batch_size: usize,
    /// The model's tokenizer (for its EOS and pad ids).
    pub tokenizer: rlhf_model::tokenizer::Tokenizer,
    /// Keep a language model's frozen linear weights in bf16 for decoding.
    pub bf16_weights: bool,
}

/// Loads the model on a thread of its own and starts the loop there; returns once the
/// model is loaded (or failed to load).
pub fn start(opts: EngineOptions) -> Result<EngineHandle> {
    let (jobs, rx) = std::sync::mpsc::channel::<Job>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<ModelInfo>>();
    let stats = Arc::new(Stats::default());
    let counters = stats.clone();
    std::thread::Builder::new()
        .name("rlhf-serve-engine".into())
        .spawn(move || {
            // The model holds reference-counted parts that stay on this thread.
            let loaded = load(
                &opts.model,
                opts.adapter.as_deref(),
                &opts.tokenizer,
                opts.bf16_weights,
            );
            let (model, info) = match loaded {
                Ok(m) => m,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let _ = ready_tx.send(Ok(info.clone()));
            Engine::new(&model, &opts, &info, counters).run(rx);
        })
        .map_err(|source| Error::Io {
            path: PathBuf::from("<engine thread>"),
            source,
        })?;
    let info = ready_rx.recv().map_err(|_| {
        Error::Invalid("the engine thread stopped while loading the model".into())
    })??;
    Ok(EngineHandle { jobs, info, stats })
}

/// Loads a reward model where the weights hold a score head (`score.weight`, or an adapter
/// saved with one), else a language model.
fn load(
    dir: &Path,
    adapter: Option<&Path>,
    tok: &rlhf_model::tokenizer::Tokenizer,
    bf16_weights: bool,
) -> Result<(Model, ModelInfo)> {
    let mut cache = SourceCache::default();
    let (_, source) = cache.resolve(dir, &candle_core::Device::Cpu, DType::F32)?;
    let adapter_scores = adapter.is_some_and(|a| {
        std::fs::read_to_string(a.join("adapter_config.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .is_some_and(|v| v["task_type"] == "SEQ_CLS")
    });
    let task = if source.contains("score.weight") || adapter_scores {
        Task::Score
    } else {
        Task::Generate
    };
    let opts = LoadOptions {
        heads: match task {
            Task::Score => Heads::Score,
            Task::Generate => Heads::Lm,
        },
        adapter: adapter.map(Path::to_path_buf),
        require_score_head: task == Task::Score,
        ..Default::default()
    };
    let mut model = Model::load_cached(dir, &opts, &mut cache)?;
    if bf16_weights && task == Task::Generate {
        // Decoding only: the frozen weights once in bf16, the products in f32.
        let n = model.keep_frozen_in_bf16_for_decoding()?;
        tracing::info!("serving with bf16 weights ({n} frozen tensors kept in bf16)");
    } else if task == Task::Generate {
        tracing::info!("serving with f32 weights");
    }
    let raw = &model.raw_config;
    let context = ["max_position_embeddings", "n_positions", "n_ctx"]
        .iter()
        .find_map(|k| raw.get(*k).and_then(|v| v.as_u64()))
        .unwrap_or(2048) as usize;
    let info = ModelInfo {
        task,
        context,
        vocab: model.config.vocab_size,
        eos_token_ids: rlhf_model::generate::eos_ids(&model, tok),
    };
    model.set_grad_enabled(false);
    Ok((model, info))
}

/// A running row.
struct Row {
    req: GenRequest,
    cfg: GenerationConfig,
    rng: StdRng,
    /// The token to feed next, and its position once picked.
    next: u32,
    pos: u32,
    generated: usize,
}

/// What the loop holds between steps.
struct Engine<'m> {
    model: &'m Model,
    stats: Arc<Stats>,
    max_batch: usize,
    eos: Vec<u32>,
    pad: u32,
    waiting: VecDeque<GenRequest>,
    scores: Vec<ScoreRequest>,
    rows: Vec<Row>,
    cache: KvCache,
    /// Per row, which cached positions are its tokens (1) or padding (0).
    key_mask: Vec<Vec<u8>>,
}

impl<'m> Engine<'m> {
    fn new(model: &'m Model, opts: &EngineOptions, info: &ModelInfo, stats: Arc<Stats>) -> Self {
        Engine {
            model,
            stats,
            max_batch: opts.max_batch_size.max(1),
            eos: info.eos_token_ids.clone(),
            pad: opts.tokenizer.pad_or_eos_token_id().unwrap_or(0),
            waiting: VecDeque::new(),
            scores: Vec::new(),
            rows: Vec::new(),
            cache: model.new_cache(),
            key_mask: Vec::new(),
        }
    }

    fn run(mut self, jobs: std::sync::mpsc::Receiver<Job>) {
        loop {
            // Sleep only when there is nothing to do.
            if self.rows.is_empty() && self.waiting.is_empty() {
                match jobs.recv() {
                    Ok(job) => self.take(job),
                    Err(_) => return,
                }
            }
            while let Ok(job) = jobs.try_recv() {
                self.take(job);
            }
            self.run_scores();
            if let Err(e) = self.admit() {
                self.fail_all(&e);
                continue;
            }
            if !self.rows.is_empty() {
                if let Err(e) = self.step() {
                    self.fail_all(&e);
                }
            }
        }
    }

    fn take(&mut self, job: Job) {
        match job {
            Job::Generate(r) => self.waiting.extend(r),
            Job::Score(s) => self.scores.push(s),
        }
    }

    /// Scores every waiting scoring request, a bounded number of sequences per pass.
    fn run_scores(&mut self) {
        for req in std::mem::take(&mut self.scores) {
            let mut out = Vec::with_capacity(req.seqs.len());
            let mut failed = None;
            for chunk in req.seqs.chunks(self.max_batch.max(8)) {
                match self
                    .model
                    .scores_of(chunk)
                    .and_then(|s| Ok(s.to_dtype(DType::F32)?.to_vec1::<f32>()?))
                {
                    Ok(s) => out.extend(s),
                    Err(e) => {
                        failed = Some(e.to_string());
                        break;
                    }
                }
            }
            let _ = req.reply.send(match failed {
                None => Ok(out),
                Some(e) => Err(e),
            });
        }
    }

    /// Prefills the waiting requests the batch has room for and adds their rows.
    fn admit(&mut self) -> rlhf_model::Result<()> {
        self.waiting.retain(|r| !gone(r));
        let room = self.max_batch.saturating_sub(self.rows.len());
        let n = room.min(self.waiting.len());
        if n == 0 {
            return Ok(());
        }
        let new: Vec<GenRequest> = self.waiting.drain(..n).collect();
        let prompts: Vec<Vec<u32>> = new.iter().map(|r| r.prompt.clone()).collect();
        let pre = match prefill(self.model, &prompts, self.pad) {
            Ok(p) => p,
            Err(e) => {
                for r in &new {
                    fail(r, &e);
                }
                return Ok(());
            }
        };
        let logits = match self.logits(&pre.last_hidden) {
            Ok(l) => l,
            Err(e) => {
                for r in &new {
                    fail(r, &e);
                }
                return Ok(());
            }
        };
        let mut rows: Vec<Row> = new
            .into_iter()
            .map(|req| {
                let s = &req.sampling;
                let cfg = GenerationConfig {
                    max_new_tokens: s.max_tokens,
                    temperature: s.temperature,
                    top_k: s.top_k,
                    top_p: s.top_p,
                    ..Default::default()
                };
                let rng = match s.seed {
                    Some(seed) => StdRng::seed_from_u64(seed),
                    None => StdRng::from_os_rng(),
                };
                // The prompt's last position: each pick moves on by one.
                let pos = req.prompt.len() as u32 - 1;
                Row {
                    req,
                    cfg,
                    rng,
                    next: 0,
                    pos,
                    generated: 0,
                }
            })
            .collect();
        let keep = self.pick(&mut rows, &logits);
        let mut cache = pre.cache;
        let mut key_mask = pre.key_mask;
        if keep.len() < rows.len() {
            cache.select_rows(&row_index(&keep, self.model)?)?;
            key_mask = keep.iter().map(|&i| key_mask[i].clone()).collect();
        }
        if keep.is_empty() {
            return Ok(());
        }
        let kept = take_rows(rows, &keep);
        if !self.rows.is_empty() {
            self.stats
                .joined
                .fetch_add(kept.len() as u64, Ordering::Relaxed);
        }
        let (pad_ours, pad_new) = self.cache.append_rows(cache)?;
        for m in &mut self.key_mask {
            m.splice(0..0, std::iter::repeat_n(0, pad_ours));
        }
        for mut m in key_mask {
            m.splice(0..0, std::iter::repeat_n(0, pad_new));
            self.key_mask.push(m);
        }
        self.rows.extend(kept);
        Ok(())
    }

    /// One decoding step of every running row.
    fn step(&mut self) -> rlhf_model::Result<()> {
        let b = self.rows.len();
        self.stats.steps.fetch_add(1, Ordering::Relaxed);
        self.stats.max_rows.fetch_max(b as u64, Ordering::Relaxed);
        let ids: Vec<u32> = self.rows.iter().map(|r| r.next).collect();
        let positions: Vec<Vec<u32>> = self.rows.iter().map(|r| vec![r.pos]).collect();
        for m in &mut self.key_mask {
            m.push(1);
        }
        let ids = Tensor::from_vec(ids, (b, 1), self.model.device())?;
        let hidden = self
            .model
            .hidden_cached(&ids, &positions, &self.key_mask, &mut self.cache)?; // (b, 1, h)
        let logits = self.logits(&hidden.squeeze(1)?)?;
        let mut rows = std::mem::take(&mut self.rows);
        let keep = self.pick(&mut rows, &logits);
        if keep.len() < b {
            self.cache.select_rows(&row_index(&keep, self.model)?)?;
            self.key_mask = keep.iter().map(|&i| self.key_mask[i].clone()).collect();
            self.rows = take_rows(rows, &keep);
            return self.compact();
        }
        self.rows = rows;
        Ok(())
    }

    /// Logits of the last hidden states as one f32 row per sequence.
    // hidden: (b, h) -> b × vocab
    fn logits(&self, hidden: &Tensor) -> rlhf_model::Result<Vec<f32>> {
        let logits = self.model.logits(hidden)?.to_dtype(DType::F32)?;
        Ok(logits.flatten_all()?.to_vec1::<f32>()?)
    }

    /// Picks each row's next token from its logits, tells its client, and returns the rows
    /// that go on (in order).
    fn pick(&self, rows: &mut [Row], logits: &[f32]) -> Vec<usize> {
        let vocab = logits.len() / rows.len().max(1);
        let mut keep = Vec::with_capacity(rows.len());
        for (i, row) in rows.iter_mut().enumerate() {
            let x = &logits[i * vocab..(i + 1) * vocab];
            let (id, _) = pick_token(x, &row.cfg, &mut row.rng);
            let logprobs = row.req.sampling.logprobs.map(|k| token_logprobs(x, id, k));
            let choice = row.req.choice;
            let sent = row.req.events.send(Event::Token {
                choice,
                id,
                logprobs,
            });
            row.generated += 1;
            row.next = id;
            row.pos += 1;
            let finish = if self.eos.contains(&id) && !row.req.sampling.ignore_eos {
                Some(Finish::Eos)
            } else if row.generated >= row.req.sampling.max_tokens {
                Some(Finish::Length)
            } else {
                None
            };
            match finish {
                Some(finish) => {
                    let _ = row.req.events.send(Event::Done { choice, finish });
                }
                None if sent.is_ok() && !gone(&row.req) => keep.push(i),
                None => {}
            }
        }
        keep
    }

    /// Drops the leading cache columns every row masks, once they are a large share.
    fn compact(&mut self) -> rlhf_model::Result<()> {
        if self.rows.is_empty() {
            self.cache = self.model.new_cache();
            self.key_mask.clear();
            return Ok(());
        }
        let lead = self
            .key_mask
            .iter()
            .map(|m| m.iter().take_while(|&&x| x == 0).count())
            .min()
            .unwrap_or(0);
        let len = self.key_mask[0].len();
        if lead > 0 && (2 * lead >= len || lead >= 256) {
            self.stats.compactions.fetch_add(1, Ordering::Relaxed);
            self.cache.drop_leading(lead)?;
            for m in &mut self.key_mask {
                m.drain(..lead);
            }
        }
        Ok(())
    }

    /// Tells every running row that the engine failed, and starts over empty.
    fn fail_all(&mut self, e: &rlhf_model::Error) {
        tracing::error!("decoding failed: {e}");
        for row in std::mem::take(&mut self.rows) {
            fail(&row.req, e);
        }
        self.cache = self.model.new_cache();
        self.key_mask.clear();
    }
}

fn fail(req: &GenRequest, e: &rlhf_model::Error) {
    let _ = req.events.send(Event::Failed {
        choice: req.choice,
        message: e.to_string(),
    });
}

/// Whether the client no longer wants the row.
fn gone(req: &GenRequest) -> bool {
    req.cancel.load(Ordering::Relaxed) || req.events.is_closed()
}

/// The rows at `keep` (ascending), in order.
fn take_rows(rows: Vec<Row>, keep: &[usize]) -> Vec<Row> {
    let mut all: Vec<Option<Row>> = rows.into_iter().map(Some).collect();
    keep.iter()
        .map(|&i| all[i].take().expect("each row kept once"))
        .collect()
}

fn row_index(keep: &[usize], model: &Model) -> rlhf_model::Result<Tensor> {
    let keep: Vec<u32> = keep.iter().map(|&i| i as u32).collect();
    Ok(Tensor::new(keep.as_slice(), model.device())?)
}

/// log p(id) and the `k` most likely tokens with theirs, under log_softmax(logits).
pub fn token_logprobs(logits: &[f32], id: u32, k: usize) -> (f32, Vec<(u32, f32)>) {
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&x| ((x - m) as f64).exp()).sum();
    let lse = m + sum.ln() as f32;
    let mut top: Vec<u32> = (0..logits.len() as u32).collect();
    let by_logit = |a: &u32, b: &u32| {
        logits[*b as usize]
            .total_cmp(&logits[*a as usize])
            .then(a.cmp(b))
    };
    let k = k.min(top.len());
    if k > 0 && k < top.len() {
        top.select_nth_unstable_by(k - 1, by_logit);
    }
    top.truncate(k);
    top.sort_unstable_by(by_logit);
    let top = top
        .into_iter()
        .map(|t| (t, logits[t as usize] - lse))
        .collect();
    (logits[id as usize] - lse, top)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_logprobs_are_the_log_softmax_and_its_best() {
        let logits = [1.0f32, 3.0, -2.0, 3.0, 0.5];
        let lse = logits.iter().map(|&x| (x as f64).exp()).sum::<f64>().ln() as f32;
        let (lp, top) = token_logprobs(&logits, 4, 3);
        assert!((lp - (0.5 - lse)).abs() < 1e-6);
        let ids: Vec<u32> = top.iter().map(|t| t.0).collect();
        // Ties by the lower id first.
        assert_eq!(ids, [1, 3, 0]);
        assert!((top[2].1 - (1.0 - lse)).abs() < 1e-6);
        assert_eq!(token_logprobs(&logits, 0, 0).1, []);
        assert_eq!(token_logprobs(&logits, 0, 9).1.len(), 5);
    }
}
