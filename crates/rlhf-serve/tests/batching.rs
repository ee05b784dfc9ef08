//! Continuous batching: a request's tokens do not depend on what shares its batch. Requests
//! sent together, and requests joining a batch mid-way, give the tokens each gives alone and
//! the tokens `rlhf_model::generate` gives, on every fixture architecture (the fused KV
//! cache of the rotary models and the composed one of GPT-2 and OPT).

mod common;

use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use rand::{Rng, SeedableRng};
use rlhf_model::generate::{generate, GenerationConfig};
use rlhf_model::{LoadOptions, Model};
use rlhf_serve::engine::{EngineHandle, Event, Finish, GenRequest, Sampling};
use tokio::sync::mpsc;

fn sampling(max_tokens: usize, temperature: f64, seed: Option<u64>) -> Sampling {
    Sampling {
        max_tokens,
        temperature,
        top_p: None,
        top_k: None,
        seed,
        logprobs: None,
        ignore_eos: true,
    }
}

/// A queued request and what it has produced so far.
struct Pending {
    rx: mpsc::UnboundedReceiver<Event>,
    ids: Vec<u32>,
    finish: Option<Finish>,
    cancel: Arc<AtomicBool>,
}

fn request(prompt: &[u32], s: Sampling) -> (GenRequest, Pending) {
    let (tx, rx) = mpsc::unbounded_channel();
    let req = GenRequest {
        prompt: prompt.to_vec(),
        sampling: s,
        choice: 0,
        cancel: Arc::new(AtomicBool::new(false)),
        events: tx,
    };
    let pending = Pending {
        rx,
        ids: Vec::new(),
        finish: None,
        cancel: req.cancel.clone(),
    };
    (req, pending)
}

fn submit(engine: &EngineHandle, prompt: &[u32], s: Sampling) -> Pending {
    let (req, pending) = request(prompt, s);
    engine.generate(vec![req]).unwrap();
    pending
}

/// Requests queued as one job: admitted to the batch together.
fn submit_all(engine: &EngineHandle, reqs: Vec<(&[u32], Sampling)>) -> Vec<Pending> {
    let (reqs, pending): (Vec<_>, Vec<_>) = reqs.into_iter().map(|(p, s)| request(p, s)).unzip();
    engine.generate(reqs).unwrap();
    pending
}

impl Pending {
    /// Waits for the next event; false once the row has ended.
    fn next(&mut self) -> bool {
        match self.rx.blocking_recv().expect("the engine answers") {
            Event::Token { id, .. } => self.ids.push(id),
            Event::Done { finish, .. } => self.finish = Some(finish),
            Event::Failed { message, .. } => panic!("engine failed: {message}"),
        }
        self.finish.is_none()
    }

    fn wait(mut self) -> (Vec<u32>, Finish) {
        while self.next() {}
        (self.ids, self.finish.unwrap())
    }
}

/// Prompts of different lengths over the fixture's vocabulary.
fn prompts(vocab: u32) -> Vec<Vec<u32>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    [5, 1, 12, 7, 3, 9]
        .iter()
        .map(|&n| (0..n).map(|_| rng.random_range(2..vocab)).collect())
        .collect()
}

#[test]
fn requests_decode_alike_alone_together_and_joining_mid_batch() {
    for name in ["llama-gqa", "qwen2", "gpt2", "opt"] {
        let dir = common::fixtures().join(name);
        let server = common::start(&dir, 8, None);
        let engine = &server.app.engine;
        let vocab = server.app.tokenizer.vocab_size().min(engine.info.vocab) as u32;
        let prompts = prompts(vocab);
        let max = 24;
        // Greedy, alone: one request at a time.
        let alone: Vec<Vec<u32>> = prompts
            .iter()
            .map(|p| submit(engine, p, sampling(max, 0.0, None)).wait().0)
            .collect();
        // rlhf-model's generate, each prompt alone, EOS ignored as the requests ignore it.
        let model = Model::load(&dir, &LoadOptions::default()).unwrap();
        let cfg = GenerationConfig {
            max_new_tokens: max,
            pad_token_id: server.app.tokenizer.pad_or_eos_token_id().unwrap_or(0),
            ..Default::default()
        };
        for (p, want) in prompts.iter().zip(&alone) {
            let g = generate(&model, std::slice::from_ref(p), &cfg).unwrap();
            assert_eq!(
                &g[0].completion_ids, want,
                "{name}: generate vs the server alone"
            );
        }
        // All at once: one job, admitted together and decoded in one batch.
        let together = submit_all(
            engine,
            prompts
                .iter()
                .map(|p| (&p[..], sampling(max, 0.0, None)))
                .collect(),
        );
        for (i, p) in together.into_iter().enumerate() {
            assert_eq!(p.wait().0, alone[i], "{name}: prompt {i} together");
        }
        assert_eq!(
            engine.stats.max_rows.load(Relaxed),
            prompts.len() as u64,
            "{name}"
        );
        // Joining mid-batch: an anchor row runs while the others arrive one by one, each once
        // every running row has made two more tokens, so each joins a running batch, longer
        // or shorter than itself. The anchor is stopped at the end (the rotary models take
        // any length; GPT-2 and OPT stop at 128 positions, and their steps are slower).
        let anchor_max = if name == "gpt2" || name == "opt" {
            100
        } else {
            5000
        };
        let joined = engine.stats.joined.load(Relaxed);
        let mut anchor = submit(engine, &prompts[0], sampling(anchor_max, 0.0, None));
        let mut running: Vec<(usize, Pending)> = Vec::new();
        for (i, p) in prompts.iter().enumerate().skip(1) {
            for _ in 0..2 {
                anchor.next();
                for (_, r) in running.iter_mut() {
                    if r.finish.is_none() {
                        r.next();
                    }
                }
            }
            running.push((i, submit(engine, p, sampling(max, 0.0, None))));
        }
        for (i, p) in running {
            assert_eq!(p.wait().0, alone[i], "{name}: prompt {i} joining");
        }
        anchor.cancel.store(true, Relaxed);
        // Stopped, the row leaves the batch and drops its sender.
        while let Some(ev) = anchor.rx.blocking_recv() {
            match ev {
                Event::Token { id, .. } => anchor.ids.push(id),
                Event::Done { .. } => panic!("{name}: the anchor ended before it was stopped"),
                Event::Failed { message, .. } => panic!("{name}: {message}"),
            }
        }
        let n = anchor.ids.len();
        assert!(n < anchor_max, "{name}: the anchor ran to its end");
        let anchor_alone = submit(engine, &prompts[0], sampling(n, 0.0, None)).wait().0;
        assert_eq!(anchor.ids, anchor_alone, "{name}: the anchor");
        let joined = engine.stats.joined.load(Relaxed) - joined;
        assert_eq!(joined, 5, "{name}: requests that joined a running batch");
        // Sampling with a seed: the request's own generator, whatever shares the batch.
        let seeded = |i: usize| sampling(max, 0.9, Some(100 + i as u64));
        let alone: Vec<Vec<u32>> = (0..prompts.len())
            .map(|i| submit(engine, &prompts[i], seeded(i)).wait().0)
            .collect();
        let together = submit_all(
            engine,
            (0..prompts.len())
                .map(|i| (&prompts[i][..], seeded(i)))
                .collect(),
        );
        for (i, p) in together.into_iter().enumerate() {
            assert_eq!(p.wait().0, alone[i], "{name}: sampled prompt {i} together");
        }
        // Different seeds differ somewhere (the generator is really used).
        let other = submit(engine, &prompts[0], sampling(max, 0.9, Some(7)))
            .wait()
            .0;
        let again = submit(engine, &prompts[0], sampling(max, 0.9, Some(8)))
            .wait()
            .0;
        assert_ne!(other, again, "{name}: two seeds, one sample");
    }
}

/// More requests than rows: the rest wait for a free row, then join; every one ends with
/// its own tokens, and EOS ends a row (not the batch).
#[test]
fn requests_beyond_the_batch_size_wait_and_eos_ends_a_row() {
    let dir = common::fixtures().join("llama-gqa");
    let server = common::start(&dir, 2, None);
    let engine = &server.app.engine;
    let prompts = prompts(400);
    let alone: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| submit(engine, p, sampling(6, 0.0, None)).wait().0)
        .collect();
    let queued: Vec<Pending> = prompts
        .iter()
        .map(|p| submit(engine, p, sampling(6, 0.0, None)))
        .collect();
    for (i, p) in queued.into_iter().enumerate() {
        assert_eq!(p.wait(), (alone[i].clone(), Finish::Length), "prompt {i}");
    }
    // With EOS honoured, a row whose greedy path reaches an EOS id stops on it. Make the
    // first token of prompt 0 an EOS by serving it as one: the fixture's EOS id is 0, so
    // find a prompt whose greedy continuation holds 0, or check none ends early.
    let eos = engine.info.eos_token_ids.clone();
    assert!(!eos.is_empty(), "the fixture names an EOS id");
    for (p, ids) in prompts.iter().zip(&alone) {
        let mut s = sampling(6, 0.0, None);
        s.ignore_eos = false;
        let (got, finish) = submit(engine, p, s).wait();
        match ids.iter().position(|t| eos.contains(t)) {
            Some(at) => assert_eq!((got, finish), (ids[..=at].to_vec(), Finish::Eos)),
            None => assert_eq!((&got, finish), (ids, Finish::Length)),
        }
    }
}

/// A long prompt joins a one-token row, pads it far to the left, and leaves: the batch then
/// drops the padding, and the short row goes on with the tokens it gives alone.
#[test]
fn padding_left_by_a_long_row_is_dropped() {
    let dir = common::fixtures().join("llama-gqa");
    let server = common::start(&dir, 4, None);
    let engine = &server.app.engine;
    let short: Vec<u32> = vec![17];
    let long: Vec<u32> = (0..100).map(|i| 2 + (i * 37) % 400).collect();
    let alone = submit(engine, &short, sampling(60, 0.0, None)).wait().0;
    let long_alone = submit(engine, &long, sampling(3, 0.0, None)).wait().0;
    let mut row = submit(engine, &short, sampling(60, 0.0, None));
    for _ in 0..3 {
        row.next();
    }
    let joined = submit(engine, &long, sampling(3, 0.0, None)).wait().0;
    assert_eq!(joined, long_alone);
    assert_eq!(row.wait().0, alone);
    assert!(engine.stats.joined.load(Relaxed) >= 1);
    assert!(
        engine.stats.compactions.load(Relaxed) >= 1,
        "no compaction ran"
    );
}
