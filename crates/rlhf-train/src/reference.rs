//! What the offline preference trainers (DPO, KTO) share: a completion as the model reads it
//! ([`Seq`], cut to `max_length` as TRL's collators cut it), the summed log-probs of
//! completions under the policy (with gradients) and under the frozen reference ([`Reference`]:
//! the policy with its LoRA adapters off, a `ref_model`, or a frozen copy of the initial
//! policy), and the per-token statistics of the policy's logits that TRL logs (`logits/*`,
//! `entropy`, `mean_token_accuracy`).
//!
//! Both passes lay rows out with [`crate::rollout::pack`] and read the states that predict
//! each completion token with [`crate::rollout::response_states`], so a pair's chosen and
//! rejected rows (or a prompt's completions) share one pass over their prompt where the model
//! packs natively, and the reference's numbers come from the same arithmetic as the policy's.

use std::path::Path;

use candle_core::{DType, Tensor, D};
use rlhf_data::TruncationMode;
use rlhf_model::{Heads, LoadOptions, Model, Training};

use crate::rollout::{pack, response_states};
use crate::Result;

/// A completion after its prompt, as the model reads it: the tokens it is conditioned on and
/// the tokens whose log-probs are summed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seq<'a> {
    /// The tokens before the first scored one.
    pub prompt: &'a [u32],
    /// The scored tokens.
    pub completion: &'a [u32],
    /// The completion tokens of the row (TRL's `completion_mask` sum): `completion.len()`, plus
    /// one where a row left without prompt tokens lent its first token to the prompt.
    pub completion_tokens: usize,
}

impl<'a> Seq<'a> {
    /// `prompt + completion` cut to `max_length` tokens as TRL's collators cut it: keeping the
    /// start (the completion loses its end) or the end (the prompt loses its start, then the
    /// completion). A row with no prompt token left gives its first token to the prompt: no
    /// state predicts a sequence's first token, and TRL's shifted labels never score it.
    pub fn fit(
        prompt: &'a [u32],
        completion: &'a [u32],
        max_length: usize,
        mode: TruncationMode,
    ) -> Self {
        let (mut p, mut c) = (prompt, completion);
        let total = p.len() + c.len();
        if total > max_length {
            match mode {
                TruncationMode::KeepStart => {
                    if p.len() >= max_length {
                        p = &p[..max_length];
                        c = &[];
                    } else {
                        c = &c[..max_length - p.len()];
                    }
                }
                TruncationMode::KeepEnd => {
                    let cut = total - max_length;
                    if cut <= p.len() {
                        p = &p[cut..];
                    } else {
                        c = &c[cut - p.len()..];
                        p = &[];
                    }
                }
            }
        }
        let completion_tokens = c.len();
        if p.is_empty() && !c.is_empty() {
            (p, c) = c.split_at(1);
        }
        Self {
            prompt: p,
            completion: c,
            completion_tokens,
        }
    }

    /// Tokens in the row (TRL's `attention_mask` sum).
    pub fn tokens(&self) -> usize {
        self.prompt.len() + self.completion.len()
    }
}

/// Σ log π(completion | prompt) of each sequence, differentiable where the model records
/// gradients, with the states that predicted the completion tokens, sequence by sequence
/// and token by token (for [`token_stats`]). Only real completion tokens go through the LM
/// head: the layout pads every row to the longest completion.
// seqs: n -> (logps (n), states (Σ completion lengths, hidden))
pub fn sequence_logps(model: &Model, seqs: &[Seq], pad: u32) -> Result<(Tensor, Tensor)> {
    let prompts: Vec<&[u32]> = seqs.iter().map(|s| s.prompt).collect();
    let completions: Vec<&[u32]> = seqs.iter().map(|s| s.completion).collect();
    let packed = pack(&prompts, &completions, pad, model.device())?;
    let states = response_states(model, &packed)?; // (n, R, hidden)
    let (n, r, h) = states.dims3()?;
    let device = states.device();
    let m: usize = completions.iter().map(|c| c.len()).sum();
    if m == 0 {
        let none = Tensor::zeros((0, h), states.dtype(), device)?;
        return Ok((Tensor::zeros(n, states.dtype(), device)?, none));
    }
    let mut rows = Vec::with_capacity(m);
    let mut targets = Vec::with_capacity(m);
    // (n, m): row i sums sequence i's tokens.
    let mut owner = vec![0f32; n * m];
    for (i, c) in completions.iter().enumerate() {
        for (j, &t) in c.iter().enumerate() {
            owner[i * m + rows.len()] = 1.0;
            rows.push((i * r + j) as u32);
            targets.push(t);
        }
    }
    let picked = states
        .reshape((n * r, h))?
        .index_select(&Tensor::new(rows.as_slice(), device)?, 0)?;
    let per_token =
        model.token_logprobs(&picked, &Tensor::new(targets.as_slice(), device)?, 1.0)?;
    let owner = Tensor::from_vec(owner, (n, m), device)?.to_dtype(per_token.dtype())?;
    let logps = owner.matmul(&per_token.unsqueeze(1)?)?.squeeze(1)?;
    Ok((logps, picked))
}

/// Where the reference log-probs come from (TRL's rule: `ref_model` if given, else the
/// policy with its adapters disabled for a LoRA policy, else a frozen copy of the initial
/// policy).
pub enum Reference {
    /// The policy itself: with its LoRA adapters disabled (no second copy of the weights), or
    /// as it is, before training starts, to precompute a full fine-tune's reference.
    Policy {
        /// Disable the adapters for the pass.
        adapters_off: bool,
    },
    /// A frozen model: `ref_model`, or a copy of the initial policy.
    Frozen(Box<Model>),
}

impl Reference {
    /// The reference of a run: `ref_model` if given; else the policy with its adapters off
    /// when it is a LoRA policy; else the policy itself when `policy_is_initial` (a fresh full
    /// fine-tune whose reference is only read before training), else a frozen copy of
    /// `model_dir` (the initial policy, also when resuming from a checkpoint).
    pub fn load(
        model_dir: &Path,
        ref_model: Option<&Path>,
        lora: bool,
        policy_is_initial: bool,
    ) -> Result<Self> {
        let dir = match ref_model {
            Some(dir) => dir,
            None if lora => return Ok(Reference::Policy { adapters_off: true }),
            None if policy_is_initial => {
                return Ok(Reference::Policy {
                    adapters_off: false,
                })
            }
            None => model_dir,
        };
        tracing::info!("reference: a frozen copy of {}", dir.display());
        let mut model = Model::load(
            dir,
            &LoadOptions {
                heads: Heads::Lm,
                training: Training::Frozen,
                ..Default::default()
            },
        )?;
        model.keep_frozen_in_kernel_layout()?;
        Ok(Reference::Frozen(Box::new(model)))
    }

    /// Σ log π_ref(completion | prompt) of each sequence, without gradients, `batch`
    /// sequences per forward pass.
    // seqs: n -> n
    pub fn logps(&self, policy: &Model, seqs: &[Seq], pad: u32, batch: usize) -> Result<Vec<f32>> {
        let (model, adapters_off) = match self {
            Reference::Policy { adapters_off } => (policy, *adapters_off),
            Reference::Frozen(m) => (m.as_ref(), false),
        };
        let was = model.set_grad_enabled(false);
        if adapters_off {
            model.set_adapters_enabled(false);
        }
        let out = (|| -> Result<Vec<f32>> {
            let mut out = Vec::with_capacity(seqs.len());
            for chunk in seqs.chunks(batch.max(1)) {
                let (logps, _) = sequence_logps(model, chunk, pad)?;
                out.extend(logps.to_dtype(DType::F32)?.to_vec1::<f32>()?);
            }
            Ok(out)
        })();
        if adapters_off {
            model.set_adapters_enabled(true);
        }
        model.set_grad_enabled(was);
        out
    }
}

/// The policy's logits over one sequence's completion tokens, summed the way TRL averages
/// them: `logits/*` is the mean over tokens of each token's mean logit over the vocabulary,
/// `entropy` the mean per-token entropy, `mean_token_accuracy` the share of tokens that are
/// the argmax.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TokenStats {
    /// Completion tokens scored.
    pub tokens: usize,
    /// Σ over tokens of the mean logit over the vocabulary.
    pub mean_logit: f64,
    /// Σ over tokens of the entropy of the next-token distribution.
    pub entropy: f64,
    /// Tokens that are the logits' argmax.
    pub correct: usize,
}

impl std::ops::AddAssign for TokenStats {
    fn add_assign(&mut self, o: Self) {
        self.tokens += o.tokens;
        self.mean_logit += o.mean_logit;
        self.entropy += o.entropy;
        self.correct += o.correct;
    }
}

/// Rows of logits made at once: a vocabulary of 49k makes 256 rows about 50 MB.
const STATS_ROWS: usize = 256;

/// [`TokenStats`] of each sequence from the states [`sequence_logps`] returned (one per
/// completion token, sequence by sequence), without gradients: the LM head runs once more,
/// in row chunks, since the log-prob op keeps no logits.
// states: (Σ completion lengths, hidden) -> n
pub fn token_stats(model: &Model, states: &Tensor, seqs: &[Seq]) -> Result<Vec<TokenStats>> {
    let mut owner = Vec::new();
    let mut targets = Vec::new();
    for (i, s) in seqs.iter().enumerate() {
        owner.extend(std::iter::repeat_n(i, s.completion.len()));
        targets.extend_from_slice(s.completion);
    }
    let mut out = vec![TokenStats::default(); seqs.len()];
    if owner.is_empty() {
        return Ok(out);
    }
    let was = model.set_grad_enabled(false);
    let result = (|| -> Result<()> {
        let states = states.detach();
        for start in (0..owner.len()).step_by(STATS_ROWS) {
            let len = STATS_ROWS.min(owner.len() - start);
            let logits = model
                .logits(&states.narrow(0, start, len)?)?
                .to_dtype(DType::F32)?;
            let mean = logits.mean(D::Minus1)?.to_vec1::<f32>()?;
            let max = logits.max_keepdim(D::Minus1)?;
            let shifted = logits.broadcast_sub(&max)?;
            let e = shifted.exp()?;
            let z = e.sum_keepdim(D::Minus1)?;
            // H = log Z − Σ p·(x − max), with Z = Σ exp(x − max).
            let p_dot = (e * &shifted)?.sum_keepdim(D::Minus1)?.div(&z)?;
            let entropy = (z.log()? - p_dot)?.squeeze(D::Minus1)?.to_vec1::<f32>()?;
            let argmax = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
            for (k, ((mean, ent), am)) in mean.iter().zip(&entropy).zip(&argmax).enumerate() {
                let at = start + k;
                let s = &mut out[owner[at]];
                s.tokens += 1;
                s.mean_logit += *mean as f64;
                s.entropy += *ent as f64;
                s.correct += (*am == targets[at]) as usize;
            }
        }
        Ok(())
    })();
    model.set_grad_enabled(was);
    result?;
    Ok(out)
}

/// Σ `value` over `of` divided by Σ `tokens` over it (0 with no token, as TRL logs it).
pub(crate) fn per_token(of: &[TokenStats], value: impl Fn(&TokenStats) -> f64) -> f64 {
    let tokens: usize = of.iter().map(|s| s.tokens).sum();
    if tokens == 0 {
        return 0.0;
    }
    of.iter().map(value).sum::<f64>() / tokens as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fit_cuts_like_trls_collators() {
        let p = [1, 2, 3];
        let c = [4, 5, 6, 7];
        let keep = |max, mode| {
            let s = Seq::fit(&p, &c, max, mode);
            (
                s.prompt.to_vec(),
                s.completion.to_vec(),
                s.completion_tokens,
            )
        };
        use TruncationMode::{KeepEnd, KeepStart};
        assert_eq!(keep(10, KeepStart), (vec![1, 2, 3], vec![4, 5, 6, 7], 4));
        assert_eq!(keep(5, KeepStart), (vec![1, 2, 3], vec![4, 5], 2));
        assert_eq!(keep(5, KeepEnd), (vec![3], vec![4, 5, 6, 7], 4));
        // The completion alone is too long: its first kept token becomes the prompt, unscored
        // (TRL's row [5, 6, 7] with completion mask [1, 1, 1] scores 6 and 7).
        assert_eq!(keep(3, KeepEnd), (vec![5], vec![6, 7], 3));
        let s = Seq::fit(&[], &c, 10, KeepStart);
        assert_eq!(
            (s.prompt, s.completion, s.tokens()),
            (&[4][..], &[5, 6, 7][..], 4)
        );
    }
}
