//! The rollout every sampling method shares (PPO, `rlhf eval`, and later rejection sampling
//! and ReST): prompts tokenised once, completions generated in batches with the KV cache
//! ([`Sampling`] turns a config's sampling keys into a [`GenerationConfig`]), decoded for
//! scorers ([`Decoder`]), and the log-probs of a response under the policy
//! ([`response_logprobs`], with gradients) or its frozen [`Reference`] (the
//! adapter-disabled policy for LoRA, or a second model).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use rlhf_data::PromptRecord;
use rlhf_model::generate::{generate, generate_with_states, Generation, GenerationConfig};
use rlhf_model::tokenizer::Tokenizer;
use rlhf_model::{Batch, Model};

use crate::{Error, Result};

/// Loads a prompt file and tokenises each prompt (text as is with special tokens, messages
/// through the chat template with the generation prompt), keeping at most `max_prompt`
/// tokens (the last ones; counted and reported).
pub fn load_prompts(
    path: &Path,
    tok: &Tokenizer,
    skip_invalid: bool,
    max_prompt: usize,
) -> Result<(Vec<PromptRecord>, Vec<Vec<u32>>)> {
    let data = rlhf_data::load::<PromptRecord>(path, &rlhf_data::ReadOptions { skip_invalid })?;
    if data.report.skipped > 0 {
        tracing::warn!("{}", data.report);
    }
    let mut ids = Vec::with_capacity(data.records.len());
    let mut truncated = 0;
    for r in &data.records {
        let mut p = rlhf_data::prompt_ids(tok, &r.prompt)?;
        if p.is_empty() {
            return Err(Error::Config(format!(
                "{}: the prompt tokenises to nothing",
                r.at
            )));
        }
        if p.len() > max_prompt {
            p.drain(..p.len() - max_prompt);
            truncated += 1;
        }
        ids.push(p);
    }
    if truncated > 0 {
        tracing::warn!(
            "{}: {truncated} prompts longer than max_length − response_length = {max_prompt} \
             tokens kept their last {max_prompt} tokens",
            path.display()
        );
    }
    Ok((data.records, ids))
}

/// Rollout rows laid out for one forward pass: each row is its prompt left-padded to the
/// longest prompt, then its response right-padded to the longest response, so response
/// token j of every row sits at column P + j.
pub struct Packed {
    pub(crate) batch: Batch,
    pub(crate) prompt_len: usize,
    pub(crate) response_len: usize,
    /// (b, R) response token ids (pad where the row has ended).
    pub(crate) targets: Tensor,
    /// (b, R) 1.0 on real response tokens.
    pub mask: Tensor,
    /// Each row's prompt + response without padding, and its prompt's length: the same
    /// rows packed into one sequence, for models that run them so
    /// ([`Model::packs_natively`]).
    pub(crate) rows: Vec<Vec<u32>>,
    pub(crate) prompt_lens: Vec<usize>,
}

/// Lays out prompts and their responses for one forward pass.
pub fn pack(prompts: &[&[u32]], responses: &[&[u32]], pad: u32, device: &Device) -> Result<Packed> {
    let p = prompts.iter().map(|x| x.len()).max().unwrap_or(0);
    let r = responses.iter().map(|x| x.len()).max().unwrap_or(0).max(1);
    let mut input_ids = Vec::with_capacity(prompts.len());
    let mut attention_mask = Vec::with_capacity(prompts.len());
    let mut targets = Vec::with_capacity(prompts.len() * r);
    let mut mask = Vec::with_capacity(prompts.len() * r);
    for (pr, re) in prompts.iter().zip(responses) {
        let mut ids = vec![pad; p - pr.len()];
        let mut m = vec![0u8; p - pr.len()];
        ids.extend_from_slice(pr);
        m.extend(std::iter::repeat_n(1u8, pr.len()));
        ids.extend_from_slice(re);
        m.extend(std::iter::repeat_n(1u8, re.len()));
        ids.extend(std::iter::repeat_n(pad, r - re.len()));
        m.extend(std::iter::repeat_n(0u8, r - re.len()));
        input_ids.push(ids);
        attention_mask.push(m);
        targets.extend_from_slice(re);
        targets.extend(std::iter::repeat_n(pad, r - re.len()));
        mask.extend((0..r).map(|j| (j < re.len()) as u8 as f32));
    }
    let b = prompts.len();
    Ok(Packed {
        batch: Batch {
            input_ids,
            attention_mask,
        },
        prompt_len: p,
        response_len: r,
        targets: Tensor::from_vec(targets, (b, r), device)?,
        mask: Tensor::from_vec(mask, (b, r), device)?,
        rows: prompts
            .iter()
            .zip(responses)
            .map(|(p, r)| [*p, *r].concat())
            .collect(),
        prompt_lens: prompts.iter().map(|p| p.len()).collect(),
    })
}

/// The hidden states that predict each response token, (b, R, hidden): from the padded
/// batch, or, where the model runs packed sequences natively, from the rows packed into one
/// sequence with no padding, each distinct prompt once for all the rows that share it
/// ([`Model::hidden_shared_prompts`]; then the slots past a row's response repeat its last
/// state, and the mask zeroes them wherever they are used).
pub fn response_states(model: &Model, packed: &Packed) -> Result<Tensor> {
    response_states_as(model, packed, model.packs_natively())
}

pub(crate) fn response_states_as(model: &Model, packed: &Packed, pack: bool) -> Result<Tensor> {
    let (p, r) = (packed.prompt_len, packed.response_len);
    if !pack || packed.prompt_lens.contains(&0) {
        let hidden = model.hidden(&packed.batch)?;
        return Ok(hidden.narrow(1, p - 1, r)?);
    }
    // Rows with the same prompt (a prompt's completions) share one copy of it.
    let mut group_of: HashMap<&[u32], usize> = HashMap::new();
    let mut groups: Vec<(&[u32], Vec<&[u32]>)> = Vec::new();
    let mut place = Vec::with_capacity(packed.rows.len()); // (group, completion)
    for (row, &pl) in packed.rows.iter().zip(&packed.prompt_lens) {
        let (prompt, response) = row.split_at(pl);
        let g = *group_of.entry(prompt).or_insert_with(|| {
            groups.push((prompt, Vec::new()));
            groups.len() - 1
        });
        place.push((g, groups[g].1.len()));
        groups[g].1.push(response);
    }
    let (hidden, offsets) = model.hidden_shared_prompts(&groups)?;
    let mut idx = Vec::with_capacity(packed.rows.len() * r);
    for (&(g, c), &pl) in place.iter().zip(&packed.prompt_lens) {
        let o = &offsets[g];
        let len = groups[g].1[c].len();
        let last = o.prompt_row(pl - 1) as u32;
        // The state before response token j: the prompt's last for j = 0, then the
        // completion's own tokens; past its end, its last state (masked where used).
        idx.extend((0..r).map(|j| match j {
            0 => last,
            _ if len == 0 => last,
            _ => (o.completions[c] + (j - 1).min(len - 1)) as u32,
        }));
    }
    let idx = Tensor::new(idx.as_slice(), hidden.device())?;
    let h = hidden.squeeze(0)?.index_select(&idx, 0)?;
    Ok(h.reshape((packed.rows.len(), r, ()))?)
}

/// The first `lens[i]` values of each row of `t`.
// t: (b, R) -> b ragged rows
pub fn rows_of(t: &Tensor, lens: &[usize]) -> Result<Vec<Vec<f32>>> {
    let all: Vec<Vec<f32>> = t.to_dtype(DType::F32)?.to_vec2()?;
    Ok(all
        .into_iter()
        .zip(lens)
        .map(|(mut r, &n)| {
            r.truncate(n);
            r
        })
        .collect())
}

/// Ragged rows zero-padded to `width`.
// -> (rows, width)
pub fn padded(rows: &[&Vec<f32>], width: usize, device: &Device) -> Result<Tensor> {
    let mut flat = Vec::with_capacity(rows.len() * width);
    for r in rows {
        flat.extend_from_slice(r);
        flat.extend(std::iter::repeat_n(0.0, width - r.len()));
    }
    Ok(Tensor::from_vec(flat, (rows.len(), width), device)?)
}

/// Turns generated ids into the text a scorer reads: without the EOS that ended them.
pub struct Decoder<'a> {
    tok: &'a Tokenizer,
    eos_ids: &'a [u32],
}

impl<'a> Decoder<'a> {
    /// A decoder for `tok`, stripping a final id in `eos_ids`.
    pub fn new(tok: &'a Tokenizer, eos_ids: &'a [u32]) -> Self {
        Self { tok, eos_ids }
    }

    /// The completion text of `ids`.
    pub fn text(&self, ids: &[u32]) -> Result<String> {
        let body = match ids.last() {
            Some(l) if self.eos_ids.contains(l) => &ids[..ids.len() - 1],
            _ => ids,
        };
        Ok(self.tok.decode(body, true)?)
    }

    /// The completion text of each id list.
    pub fn texts(&self, ids: &[Vec<u32>]) -> Result<Vec<String>> {
        ids.iter().map(|c| self.text(c)).collect()
    }
}

/// How completions are sampled, in the config's names (TRL's): `top_k = 0` and `top_p = 1.0`
/// switch those filters off.
#[derive(Debug, Clone, Copy)]
pub struct Sampling {
    /// New tokens per completion at most.
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    pub temperature: f64,
    /// Top-k filtering (0: none).
    pub top_k: usize,
    /// Top-p filtering (1.0: none).
    pub top_p: f64,
}

impl Sampling {
    /// The generation settings for a policy whose tokenizer ends completions with `eos_ids`
    /// and pads with `pad`.
    pub fn config(&self, eos_ids: &[u32], pad: u32, seed: u64) -> GenerationConfig {
        GenerationConfig {
            max_new_tokens: self.max_new_tokens,
            temperature: self.temperature,
            top_k: (self.top_k > 0).then_some(self.top_k),
            top_p: (self.top_p < 1.0).then_some(self.top_p),
            eos_token_ids: eos_ids.to_vec(),
            pad_token_id: pad,
            seed,
        }
    }

    /// The same settings, decoding greedily (evaluation).
    pub fn greedy(&self) -> Self {
        Self {
            temperature: 0.0,
            ..*self
        }
    }
}

/// Generates one completion per prompt, `batch` prompts per KV-cache batch; batch k samples
/// with seed `seed_of(k)`, so a run is reproducible whatever else runs beside it.
pub fn generate_batched(
    model: &Model,
    prompts: &[Vec<u32>],
    cfg: &GenerationConfig,
    batch: usize,
    seed_of: impl Fn(usize) -> u64,
) -> Result<Vec<Generation>> {
    let mut out = Vec::with_capacity(prompts.len());
    for (k, chunk) in prompts.chunks(batch.max(1)).enumerate() {
        let cfg = GenerationConfig {
            seed: seed_of(k),
            ..cfg.clone()
        };
        out.extend(generate(model, chunk, &cfg)?);
    }
    Ok(out)
}

/// [`generate_batched`] that also returns, per completion, the hidden states that predicted
/// each of its tokens (`(len_i, hidden)`): what a value head reads, without a second forward
/// pass ([`generate_with_states`]).
pub fn generate_batched_with_states(
    model: &Model,
    prompts: &[Vec<u32>],
    cfg: &GenerationConfig,
    batch: usize,
    seed_of: impl Fn(usize) -> u64,
) -> Result<(Vec<Generation>, Vec<Tensor>)> {
    let mut gens = Vec::with_capacity(prompts.len());
    let mut states = Vec::with_capacity(prompts.len());
    for (k, chunk) in prompts.chunks(batch.max(1)).enumerate() {
        let cfg = GenerationConfig {
            seed: seed_of(k),
            ..cfg.clone()
        };
        let (g, st) = generate_with_states(model, chunk, &cfg)?;
        gens.extend(g);
        states.extend(st);
    }
    Ok((gens, states))
}

/// Temperature-scaled log-probs of each response token under `model` (with gradients when
/// the model has them on), and the hidden states that predicted them, as TRL reads them:
/// positions P−1 .. P+R−2 predict the response.
// -> logprobs (b, R), states (b, R, hidden)
pub fn response_logprobs(
    model: &Model,
    packed: &Packed,
    temperature: f64,
) -> Result<(Tensor, Tensor)> {
    let h = response_states(model, packed)?;
    let logp = model.token_logprobs(&h, &packed.targets, temperature)?;
    Ok((logp, h))
}

/// The frozen reference a policy's KL is measured against.
#[derive(Clone, Copy)]
pub enum Reference<'a> {
    /// A separate frozen model (the reference of a fully fine-tuned policy).
    Model(&'a Model),
    /// The policy itself with its LoRA adapters disabled (no second copy of the weights).
    AdaptersOff(&'a Model),
}

impl<'a> Reference<'a> {
    /// `reference` when there is one, else the adapter-disabled `policy`.
    pub fn of(policy: &'a Model, reference: Option<&'a Model>) -> Self {
        match reference {
            Some(r) => Reference::Model(r),
            None => Reference::AdaptersOff(policy),
        }
    }

    /// Temperature-scaled log-probs of each response under the reference, without
    /// gradients, `batch` rows per forward pass.
    // -> one row per response: (len_i)
    pub fn logprobs(
        &self,
        prompts: &[Vec<u32>],
        responses: &[Vec<u32>],
        temperature: f64,
        pad: u32,
        batch: usize,
    ) -> Result<Vec<Vec<f32>>> {
        let (model, adapters_off) = match *self {
            Reference::Model(m) => (m, false),
            Reference::AdaptersOff(m) => (m, true),
        };
        response_logprobs_no_grad(
            model,
            adapters_off,
            prompts,
            responses,
            temperature,
            pad,
            batch,
        )
    }
}

/// Temperature-scaled log-probs of each response token under `model` without gradients, or,
/// with `adapters_off`, under the model with its LoRA adapters disabled (the frozen
/// reference of a LoRA policy), `batch` rows per forward pass.
// -> one row per response: (len_i)
pub fn response_logprobs_no_grad(
    model: &Model,
    adapters_off: bool,
    prompts: &[Vec<u32>],
    responses: &[Vec<u32>],
    temperature: f64,
    pad: u32,
    batch: usize,
) -> Result<Vec<Vec<f32>>> {
    let was = model.set_grad_enabled(false);
    if adapters_off {
        model.set_adapters_enabled(false);
    }
    let out = (|| -> Result<Vec<Vec<f32>>> {
        let mut rows = Vec::with_capacity(prompts.len());
        let batch = batch.max(1);
        for (pc, rc) in prompts.chunks(batch).zip(responses.chunks(batch)) {
            let pr: Vec<&[u32]> = pc.iter().map(|x| x.as_slice()).collect();
            let re: Vec<&[u32]> = rc.iter().map(|x| x.as_slice()).collect();
            let lens: Vec<usize> = re.iter().map(|x| x.len()).collect();
            let packed = pack(&pr, &re, pad, model.device())?;
            let (logp, _) = response_logprobs(model, &packed, temperature)?;
            rows.extend(rows_of(&logp, &lens)?);
        }
        Ok(rows)
    })();
    if adapters_off {
        model.set_adapters_enabled(true);
    }
    model.set_grad_enabled(was);
    out
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use rlhf_model::LoadOptions;

    use super::*;

    fn fixture(name: &str) -> PathBuf {
        PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../../shared/fixtures/models"
        ))
        .join(name)
    }

    /// Rows packed into one sequence, each prompt shared by its completions (two prompts
    /// here have two and three), give the padded batch's response states on every real
    /// response token; also when every prompt starts with the same turn (packed once, as
    /// the root every group sees).
    #[test]
    fn packed_rows_give_the_padded_batchs_response_states() {
        let model = Model::load(&fixture("llama-gqa"), &LoadOptions::default()).unwrap();
        let plain: Vec<Vec<u32>> = vec![
            vec![5, 6, 7, 3],
            vec![8, 9],
            vec![5, 6, 7, 3],
            vec![4],
            vec![4],
            vec![4],
        ];
        let system = [30u32, 31, 32, 33, 34];
        let rooted: Vec<Vec<u32>> = plain
            .iter()
            .map(|p| system.iter().chain(p).copied().collect())
            .collect();
        for prompts in [plain, rooted] {
            let prompts: Vec<&[u32]> = prompts.iter().map(|p| p.as_slice()).collect();
            check_packed_response_states(&model, &prompts);
        }
    }

    fn check_packed_response_states(model: &Model, prompts: &[&[u32]]) {
        let responses: Vec<&[u32]> = vec![
            &[10, 11, 12],
            &[13, 14, 15, 16, 17],
            &[19, 20],
            &[18],
            &[21, 22, 23, 24],
            &[25, 26],
        ];
        let packed = pack(prompts, &responses, 1, &Device::Cpu).unwrap();
        let a = response_states_as(model, &packed, false).unwrap();
        let b = response_states_as(model, &packed, true).unwrap();
        assert_eq!(a.dims(), b.dims());
        let mask = packed.mask.unsqueeze(2).unwrap();
        let diff = (a.broadcast_mul(&mask).unwrap() - b.broadcast_mul(&mask).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            diff < 1e-5,
            "packed and padded response states differ by {diff}"
        );
    }
}
