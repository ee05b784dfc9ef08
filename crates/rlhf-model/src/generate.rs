//! Batched generation with a KV cache: greedy, temperature, top-k and top-p sampling, stopping
//! at EOS or `max_new_tokens`, seeded, returning the log-probability of each sampled token.
//!
//! Prompts are left-padded into one batch; each row's positions count from its first real
//! token, so a row generates the same tokens batched or alone.

use candle_core::Tensor;
use rand::{Rng, SeedableRng};

use crate::kernels::cpu::fused::simd_fn;
#[cfg(target_arch = "x86_64")]
use crate::kernels::cpu::fused::use_avx2;
use crate::model::{Batch, Model};
use crate::Result;

/// Decoding settings, named like transformers' `GenerationConfig`.
#[derive(Debug, Clone)]
pub struct GenerationConfig {
    /// Tokens to generate at most per row.
    pub max_new_tokens: usize,
    /// 0 means greedy; otherwise logits are divided by it before sampling.
    pub temperature: f64,
    /// Keep only the k most likely tokens (None or 0: no limit).
    pub top_k: Option<usize>,
    /// Keep the smallest set of tokens whose probability reaches p (None or 1.0: no limit).
    pub top_p: Option<f64>,
    /// Ids that end a row; empty means generate exactly max_new_tokens.
    pub eos_token_ids: Vec<u32>,
    /// Id used to pad prompts (left) and finished rows.
    pub pad_token_id: u32,
    /// Seed of the sampler.
    pub seed: u64,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: 64,
            temperature: 0.0,
            top_k: None,
            top_p: None,
            eos_token_ids: Vec::new(),
            pad_token_id: 0,
            seed: 0,
        }
    }
}

impl GenerationConfig {
    /// Checks the settings every generation entry point uses, naming the key in the one
    /// message shape of config checks: `"temperature" must be a finite number >= 0, found NaN`.
    /// (`max_new_tokens` 0 is allowed: it generates nothing.)
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, what: &str, found: String| {
            Err(crate::Error::Config(format!(
                "\"{key}\" must be {what}, found {found}"
            )))
        };
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return bad(
                "temperature",
                "a finite number >= 0 (0 is greedy)",
                self.temperature.to_string(),
            );
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return bad("top_p", "a number in (0, 1]", p.to_string());
            }
        }
        Ok(())
    }
}

/// One generated continuation.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// The generated ids, EOS included when the row stopped on it.
    pub completion_ids: Vec<u32>,
    /// log π(token) of each generated id under the temperature-scaled distribution before
    /// top-k/top-p filtering (what PPO needs; TRL computes it the same way).
    pub logprobs: Vec<f32>,
    /// Whether the row ended with an EOS id.
    pub finished: bool,
}

/// Generates a continuation for every prompt in one left-padded batch.
pub fn generate(
    model: &Model,
    prompts: &[Vec<u32>],
    cfg: &GenerationConfig,
) -> Result<Vec<Generation>> {
    Ok(generate_states(model, prompts, cfg, false)?.0)
}

/// [`generate`], also returning for each row the final hidden states that predicted its
/// generated tokens, (n_generated, hidden): what a value head reads (PPO's values), without
/// a second forward pass over the completions.
pub fn generate_with_states(
    model: &Model,
    prompts: &[Vec<u32>],
    cfg: &GenerationConfig,
) -> Result<(Vec<Generation>, Vec<Tensor>)> {
    generate_states(model, prompts, cfg, true)
}

fn generate_states(
    model: &Model,
    prompts: &[Vec<u32>],
    cfg: &GenerationConfig,
    keep_states: bool,
) -> Result<(Vec<Generation>, Vec<Tensor>)> {
    cfg.validate()?;
    if prompts.is_empty() {
        return Ok((Vec::new(), Vec::new()));
    }
    if let Some(i) = prompts.iter().position(|p| p.is_empty()) {
        return Err(crate::Error::EmptyInput(format!(
            "prompt {i} of {} has no tokens; generation needs at least one (text, a BOS token \
             or a chat template's turn header)",
            prompts.len()
        )));
    }
    // Sampling never backpropagates: keep no graph.
    let was = model.set_grad_enabled(false);
    let out = generate_inner(model, prompts, cfg, keep_states);
    model.set_grad_enabled(was);
    out
}

/// EOS ids from config.json, generation_config.json and the tokenizer.
pub fn eos_ids(model: &Model, tok: &crate::tokenizer::Tokenizer) -> Vec<u32> {
    let mut ids = model.config.eos_token_ids.clone();
    let gen = model.dir().join("generation_config.json");
    if let Ok(text) = std::fs::read_to_string(&gen) {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
            match v.get("eos_token_id") {
                Some(serde_json::Value::Number(n)) => ids.extend(n.as_u64().map(|x| x as u32)),
                Some(serde_json::Value::Array(a)) => {
                    ids.extend(a.iter().filter_map(|x| x.as_u64().map(|x| x as u32)))
                }
                _ => {}
            }
        }
    }
    ids.extend(tok.eos_token_id());
    ids.sort_unstable();
    ids.dedup();
    ids
}

fn generate_inner(
    model: &Model,
    prompts: &[Vec<u32>],
    cfg: &GenerationConfig,
    keep_states: bool,
) -> Result<(Vec<Generation>, Vec<Tensor>)> {
    let device = model.device().clone();
    let batch = Batch::pad(prompts, cfg.pad_token_id, true);
    let b = batch.len();
    let mut key_mask = batch.attention_mask.clone();
    let mut positions = crate::kernels::positions_from_mask(&batch.attention_mask);
    let mut cache = model.new_cache();
    let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed);
    let mut out: Vec<Generation> = (0..b)
        .map(|_| Generation {
            completion_ids: Vec::new(),
            logprobs: Vec::new(),
            finished: false,
        })
        .collect();

    let mut states: Vec<Tensor> = Vec::new();
    let mut ids = batch.ids_tensor(&device)?;
    let mut prefilled = prefill_shared(model, prompts, cfg.pad_token_id, &mut cache)?;
    for _step in 0..cfg.max_new_tokens {
        let hidden = match prefilled.take() {
            Some(h) => h,
            None => model.hidden_cached(&ids, &positions, &key_mask, &mut cache)?,
        };
        let t = hidden.dim(1)?;
        let last = hidden.narrow(1, t - 1, 1)?;
        if keep_states {
            states.push(last.squeeze(1)?.detach()); // (b, h)
        }
        let logits = model.logits(&last)?.squeeze(1)?; // (b, vocab)
        let logits = logits.to_dtype(candle_core::DType::F32)?;
        let vocab = logits.dim(1)?;
        let logits = logits.flatten_all()?.to_vec1::<f32>()?;
        let active: Vec<bool> = out.iter().map(|g| !g.finished).collect();
        let picks = pick_tokens(&logits, vocab, &active, cfg, &mut rng);
        let mut next = Vec::with_capacity(b);
        for (r, pick) in picks.into_iter().enumerate() {
            let Some((tok, logp)) = pick else {
                next.push(cfg.pad_token_id);
                continue;
            };
            out[r].completion_ids.push(tok);
            out[r].logprobs.push(logp);
            if cfg.eos_token_ids.contains(&tok) {
                out[r].finished = true;
            }
            next.push(tok);
        }
        if out.iter().all(|g| g.finished) {
            break;
        }
        // Rows that had finished get a masked pad slot so every row's cache stays aligned.
        for r in 0..b {
            let p = positions[r].last().copied().unwrap_or(0) + 1;
            key_mask[r].push(active[r] as u8);
            positions[r] = vec![p];
        }
        ids = Tensor::from_vec(next, (b, 1), &device)?;
    }
    let per_row = if keep_states && !states.is_empty() {
        let all = Tensor::stack(&states, 1)?; // (b, steps, h)
        out.iter()
            .enumerate()
            .map(|(r, g)| Ok(all.get(r)?.narrow(0, 0, g.completion_ids.len())?))
            .collect::<Result<Vec<_>>>()?
    } else {
        Vec::new()
    };
    Ok((out, per_row))
}

/// The prompt pass of a left-padded batch, as [`generate`] runs it (each distinct prompt
/// once, a common root once): what a decoding loop of its own starts from, such as a server
/// that lets requests join a running batch.
pub struct Prefill {
    /// The last layer's hidden state at each prompt's last token, `(b, hidden)`: what
    /// predicts each row's first new token.
    pub last_hidden: Tensor,
    /// The cache of every prompt position, left-padded to the longest prompt.
    pub cache: crate::kernels::KvCache,
    /// Which cached positions are real tokens (1) or left padding (0), one row per prompt.
    pub key_mask: Vec<Vec<u8>>,
}

/// Runs the prompt pass of `prompts` (none empty), left-padded with `pad`, without a graph.
// prompts: b rows -> last_hidden (b, hidden), cache of max prompt length
pub fn prefill(model: &Model, prompts: &[Vec<u32>], pad: u32) -> Result<Prefill> {
    if let Some(i) = prompts.iter().position(|p| p.is_empty()) {
        return Err(crate::Error::EmptyInput(format!(
            "prompt {i} of {} has no tokens; generation needs at least one",
            prompts.len()
        )));
    }
    let was = model.set_grad_enabled(false);
    let out = (|| {
        let batch = Batch::pad(prompts, pad, true);
        let mut cache = model.new_cache();
        let hidden = match prefill_shared(model, prompts, pad, &mut cache)? {
            Some(h) => h,
            None => {
                let positions = crate::kernels::positions_from_mask(&batch.attention_mask);
                let ids = batch.ids_tensor(model.device())?;
                model.hidden_cached(&ids, &positions, &batch.attention_mask, &mut cache)?
            }
        };
        let t = hidden.dim(1)?;
        Ok(Prefill {
            last_hidden: hidden.narrow(1, t - 1, 1)?.squeeze(1)?,
            cache,
            key_mask: batch.attention_mask,
        })
    })();
    model.set_grad_enabled(was);
    out
}

/// The next token for one row of logits (`vocab` of them) and its log-probability, picked as
/// [`generate`] picks it under `cfg`'s temperature, top-k and top-p, drawing from `rng`.
pub fn pick_token(logits: &[f32], cfg: &GenerationConfig, rng: &mut impl Rng) -> (u32, f32) {
    pick_tokens(logits, logits.len(), &[true], cfg, rng)[0].expect("the one row is active")
}

/// Where several rows have the same prompt (a prompt's completions), runs the prompt pass
/// once per distinct prompt and copies its cache to each of its rows: the hidden states of
/// the full batch's first step, with `cache` filled as that step would fill it. `None` when
/// every prompt is distinct (the loop's first step then runs as usual).
fn prefill_shared(
    model: &Model,
    prompts: &[Vec<u32>],
    pad: u32,
    cache: &mut crate::kernels::KvCache,
) -> Result<Option<Tensor>> {
    let mut index: std::collections::HashMap<&[u32], u32> = std::collections::HashMap::new();
    let mut distinct: Vec<Vec<u32>> = Vec::new();
    let rows: Vec<u32> = prompts
        .iter()
        .map(|p| {
            *index.entry(p.as_slice()).or_insert_with(|| {
                distinct.push(p.clone());
                distinct.len() as u32 - 1
            })
        })
        .collect();
    let refs: Vec<&[u32]> = distinct.iter().map(|p| p.as_slice()).collect();
    let lr = crate::model::common_root(&refs, 1);
    if lr == 0 && distinct.len() == prompts.len() {
        return Ok(None);
    }
    // Left-padded to the same width as the full batch (its longest prompt is among these).
    let batch = Batch::pad(&distinct, pad, true);
    let positions = crate::kernels::positions_from_mask(&batch.attention_mask);
    let ids = batch.ids_tensor(model.device())?;
    let hidden = match rooted_prefill(model, &batch, &positions, &ids, lr)? {
        Some((hidden, rooted)) => {
            *cache = rooted;
            hidden
        }
        None => model.hidden_cached(&ids, &positions, &batch.attention_mask, cache)?,
    };
    let rows = Tensor::new(rows.as_slice(), model.device())?;
    cache.select_rows(&rows)?;
    Ok(Some(hidden.index_select(&rows, 0)?))
}

/// The prompt pass when every prompt starts with the same `lr` tokens (a chat template's
/// system turn): those run once, as one row, their cache is laid into each row where its
/// left padding puts them, and the batch's columns past `lr` run on that cache. The hidden
/// states of those columns (the last is each prompt's last token) and the cache; `None`
/// without a root, or where the backbone's cache is not the fused attention's.
fn rooted_prefill(
    model: &Model,
    batch: &Batch,
    positions: &[Vec<u32>],
    ids: &Tensor,
    lr: usize,
) -> Result<Option<(Tensor, crate::kernels::KvCache)>> {
    let width = ids.dim(1)?;
    if lr == 0 || lr >= width || !model.packs_natively() {
        return Ok(None);
    }
    // Each row's left padding: where its root starts.
    let shifts: Vec<usize> = batch
        .attention_mask
        .iter()
        .map(|m| m.iter().take_while(|&&x| x == 0).count())
        .collect();
    let root = &batch.input_ids[0][shifts[0]..shifts[0] + lr];
    let root = Tensor::new(root, model.device())?.unsqueeze(0)?;
    let mut root_cache = model.new_cache();
    let root_pos = vec![(0..lr as u32).collect::<Vec<_>>()];
    model.hidden_cached(&root, &root_pos, &[vec![1u8; lr]], &mut root_cache)?;
    let Some(mut cache) = root_cache.shifted_rows(&shifts, lr) else {
        return Ok(None);
    };
    let rest = ids.narrow(1, lr, width - lr)?;
    let rest_pos: Vec<Vec<u32>> = positions.iter().map(|p| p[lr..].to_vec()).collect();
    let hidden = model.hidden_cached(&rest, &rest_pos, &batch.attention_mask, &mut cache)?;
    Ok(Some((hidden, cache)))
}

/// The next token of each active row and its log-probability under softmax(logits / T),
/// from the rows of `logits` (`vocab` each): greedy at temperature 0, else sampled (top-k /
/// top-p where set). Rows are worked on in parallel; the sampler's draws are taken in row
/// order, one per active row, so a seed gives the same tokens however the rows are shared out.
fn pick_tokens(
    logits: &[f32],
    vocab: usize,
    active: &[bool],
    cfg: &GenerationConfig,
    rng: &mut impl Rng,
) -> Vec<Option<(u32, f32)>> {
    let b = active.len();
    let inv_t = if cfg.temperature > 0.0 {
        (1.0 / cfg.temperature) as f32
    } else {
        1.0
    };
    let plain = cfg.temperature > 0.0
        && cfg.top_k.is_none_or(|k| k == 0 || k >= vocab)
        && cfg.top_p.is_none_or(|p| p >= 1.0);
    // Plain sampling draws once per active row, in row order, before the parallel part.
    let draws: Vec<f64> = active
        .iter()
        .map(|&a| if a && plain { rng.random::<f64>() } else { 0.0 })
        .collect();
    let picks = std::sync::Mutex::new(vec![None; b]);
    // Other modes keep each row's log-probabilities for the serial pass below.
    let rows = std::sync::Mutex::new(vec![Vec::new(); b]);
    crate::kernels::cpu::fused::par_units(b, vocab, |_, range| {
        let mut e = vec![0f32; vocab];
        for r in range {
            if !active[r] {
                continue;
            }
            let x = &logits[r * vocab..(r + 1) * vocab];
            let mut stats = (0f32, 0f64);
            scaled_exp_row(x, inv_t, &mut e, &mut stats);
            let (m, total) = stats;
            let lse = m + (total.ln() as f32);
            if plain {
                // Inverse CDF in vocabulary order: no sort needed.
                let mut u = draws[r] * total;
                let mut tok = 0;
                for (i, &q) in e.iter().enumerate() {
                    if q > 0.0 {
                        tok = i;
                        u -= q as f64;
                        if u <= 0.0 {
                            break;
                        }
                    }
                }
                let logp = x[tok] * inv_t - lse;
                picks.lock().expect("not poisoned")[r] = Some((tok as u32, logp));
            } else {
                let logp: Vec<f32> = x.iter().map(|&v| v * inv_t - lse).collect();
                rows.lock().expect("not poisoned")[r] = logp;
            }
        }
    });
    let mut picks = picks.into_inner().expect("not poisoned");
    if !plain {
        let rows = rows.into_inner().expect("not poisoned");
        for (r, row) in rows.iter().enumerate() {
            if !active[r] {
                continue;
            }
            let tok = if cfg.temperature > 0.0 {
                sample(row, cfg.top_k, cfg.top_p, rng)
            } else {
                argmax(row)
            };
            picks[r] = Some((tok, row[tok as usize]));
        }
    }
    picks
}

simd_fn! {
    // e = exp(x·inv_t − m) with m = max(x·inv_t); stats = (m, Σ e).
    fn scaled_exp_row(x: &[f32], inv_t: f32, e: &mut [f32], stats: &mut (f32, f64)) {
        let m = crate::kernels::cpu::fused::max(x) * inv_t;
        *stats = (m, crate::kernels::cpu::fused::scaled_exp_sum(x, inv_t, m, e) as f64);
    }
}

fn argmax(row: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, &v) in row.iter().enumerate() {
        // Strictly greater: ties go to the lowest id, as torch.argmax does.
        if v > row[best] {
            best = i;
        }
    }
    best as u32
}

/// Samples from log-probabilities after top-k and top-p filtering (plain sampling, with
/// neither, is `pick_tokens`' own inverse CDF).
fn sample(logp: &[f32], top_k: Option<usize>, top_p: Option<f64>, rng: &mut impl Rng) -> u32 {
    let top_k = top_k.filter(|&k| k > 0 && k < logp.len());
    let top_p = top_p.filter(|&p| p < 1.0);
    let by_logp = |a: &u32, b: &u32| {
        logp[*b as usize]
            .total_cmp(&logp[*a as usize])
            .then(a.cmp(b))
    };
    let mut idx: Vec<u32> = (0..logp.len() as u32).collect();
    if let Some(k) = top_k {
        // Only the k best need ordering.
        idx.select_nth_unstable_by(k - 1, by_logp);
        idx.truncate(k);
    }
    idx.sort_unstable_by(by_logp);
    let mut keep = idx.len();
    let probs: Vec<f64> = idx[..keep]
        .iter()
        .map(|&i| (logp[i as usize] as f64).exp())
        .collect();
    if let Some(p) = top_p {
        let total: f64 = probs.iter().sum();
        let mut acc = 0.0;
        let mut n = 0;
        for q in &probs {
            acc += q / total;
            n += 1;
            // transformers keeps tokens while the mass *before* them is below p.
            if acc >= p {
                break;
            }
        }
        keep = n.max(1);
    }
    let total: f64 = probs[..keep].iter().sum();
    let mut u = rng.random::<f64>() * total;
    for (j, q) in probs[..keep].iter().enumerate() {
        u -= q;
        if u <= 0.0 {
            return idx[j];
        }
    }
    idx[keep - 1]
}

/// Log-probabilities of given continuation tokens under the model (teacher forcing): the
/// PPO/DPO quantity, differentiable when the model has trainable parameters.
// logits: (b, t, vocab), targets: (b, t) u32 -> (b, t)
pub fn token_logprobs(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    crate::kernels::token_logprobs(logits, targets)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(temperature: f64, top_k: Option<usize>) -> GenerationConfig {
        GenerationConfig {
            max_new_tokens: 1,
            temperature,
            top_k,
            top_p: None,
            eos_token_ids: Vec::new(),
            pad_token_id: 0,
            seed: 0,
        }
    }

    /// The parallel picker's log-probabilities are log_softmax(logits / T) at the token it
    /// picks, greedy picks the argmax, inactive rows get nothing, and plain sampling follows
    /// the softmax (frequencies over many draws).
    #[test]
    fn picked_tokens_carry_their_log_softmax_and_follow_the_distribution() {
        let (b, vocab) = (4, 40_000);
        let logits: Vec<f32> = crate::test_util::values(b * vocab, 3)
            .iter()
            .map(|v| 4.0 * v)
            .collect();
        let active = [true, false, true, true];
        let t =
            candle_core::Tensor::from_vec(logits.clone(), (b, vocab), &candle_core::Device::Cpu)
                .unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        for (temp, top_k) in [(0.0, None), (0.7, None), (1.3, Some(50))] {
            let scaled = if temp > 0.0 {
                (&t / temp).unwrap()
            } else {
                t.clone()
            };
            let want: Vec<Vec<f32>> = crate::kernels::generic::log_softmax(&scaled)
                .unwrap()
                .to_vec2()
                .unwrap();
            let picks = pick_tokens(&logits, vocab, &active, &config(temp, top_k), &mut rng);
            for r in 0..b {
                let Some((tok, logp)) = picks[r] else {
                    assert!(!active[r], "row {r} is active");
                    continue;
                };
                assert!(active[r], "row {r} is inactive");
                let got = want[r][tok as usize];
                assert!(
                    (logp - got).abs() < 1e-4,
                    "T {temp}: row {r}: {logp} against {got}"
                );
                if temp == 0.0 {
                    assert_eq!(tok, argmax(&want[r]), "greedy row {r}");
                }
            }
        }
        // Four tokens with probabilities 0.5, 0.3, 0.15, 0.05.
        let logits: Vec<f32> = [0.5f32, 0.3, 0.15, 0.05].iter().map(|p| p.ln()).collect();
        let mut counts = [0usize; 4];
        let n = 20_000;
        for _ in 0..n {
            let picks = pick_tokens(&logits, 4, &[true], &config(1.0, None), &mut rng);
            counts[picks[0].unwrap().0 as usize] += 1;
        }
        for (c, p) in counts.iter().zip([0.5, 0.3, 0.15, 0.05]) {
            let f = *c as f64 / n as f64;
            assert!((f - p).abs() < 0.015, "frequency {f} against {p}");
        }
    }

    #[test]
    fn bad_settings_name_the_key() {
        for (cfg, key) in [
            (
                GenerationConfig {
                    temperature: f64::NAN,
                    ..Default::default()
                },
                "\"temperature\"",
            ),
            (
                GenerationConfig {
                    temperature: -1.0,
                    ..Default::default()
                },
                "\"temperature\"",
            ),
            (
                GenerationConfig {
                    temperature: f64::INFINITY,
                    ..Default::default()
                },
                "\"temperature\"",
            ),
            (
                GenerationConfig {
                    top_p: Some(0.0),
                    ..Default::default()
                },
                "\"top_p\"",
            ),
            (
                GenerationConfig {
                    top_p: Some(f64::NAN),
                    ..Default::default()
                },
                "\"top_p\"",
            ),
            (
                GenerationConfig {
                    top_p: Some(1.5),
                    ..Default::default()
                },
                "\"top_p\"",
            ),
        ] {
            let e = cfg.validate().unwrap_err().to_string();
            assert!(e.contains(key) && e.contains("must be"), "{e}");
        }
        GenerationConfig {
            temperature: 0.7,
            top_p: Some(1.0),
            ..Default::default()
        }
        .validate()
        .unwrap();
    }

    #[test]
    fn top_k_one_is_greedy_and_top_p_keeps_the_head() {
        let logp: Vec<f32> = [0.5f32, 0.3, 0.15, 0.05].iter().map(|p| p.ln()).collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        for _ in 0..50 {
            assert_eq!(sample(&logp, Some(1), None, &mut rng), 0);
            // top_p 0.7: 0.5 < 0.7 so token 1 is kept too, nothing else.
            let t = sample(&logp, None, Some(0.7), &mut rng);
            assert!(t == 0 || t == 1, "sampled {t}");
        }
    }

    #[test]
    fn sampling_follows_the_distribution() {
        let logp: Vec<f32> = [0.7f32, 0.2, 0.1].iter().map(|p| p.ln()).collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut counts = [0usize; 3];
        for _ in 0..20_000 {
            counts[sample(&logp, None, None, &mut rng) as usize] += 1;
        }
        let f0 = counts[0] as f64 / 20_000.0;
        assert!((f0 - 0.7).abs() < 0.02, "frequency of token 0: {f0}");
    }
}
