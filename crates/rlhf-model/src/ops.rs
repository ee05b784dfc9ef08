//! Differentiable building blocks.
//!
//! candle's fast ops (`softmax_last_dim`, `rms_norm`, `layer_norm`, `rope`) have no backward
//! pass: gradients stop at them without an error. Everything here is either composed from ops
//! that candle differentiates, or (see [`crate::fused`]) a fused kernel with its own backward.

use candle_core::{DType, Device, Tensor, D};

use crate::Result;

/// Softmax over the last dimension, differentiable.
// x: (..., n) -> (..., n)
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    crate::fused::softmax_last_dim(x)
}

/// Log-softmax over the last dimension, differentiable and stable.
// x: (..., n) -> (..., n)
pub fn log_softmax(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&lse)?)
}

/// RMSNorm as Llama computes it: x / sqrt(mean(x²) + eps) * weight.
// x: (..., h), weight: (h) -> (..., h)
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    crate::fused::rms_norm(x, weight, eps)
}

/// LayerNorm with affine weight and bias.
// x: (..., h), weight/bias: (h) -> (..., h)
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    crate::fused::layer_norm(x, weight, bias, eps)
}

/// GPT-2's "gelu_new": the tanh approximation of GELU.
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    // candle's Gelu unary op is the tanh approximation and has a backward pass.
    Ok(x.gelu()?)
}

/// Applies the activation named in a config.json.
pub fn activation(name: &str, x: &Tensor) -> Result<Tensor> {
    Ok(match name {
        "silu" | "swish" => x.silu()?,
        "relu" => x.relu()?,
        "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => x.gelu()?,
        "gelu" => x.gelu_erf()?,
        other => {
            return Err(crate::Error::Config(format!(
                "activation function {other:?} is not supported (silu, relu, gelu, gelu_new)"
            )))
        }
    })
}

/// Rotates pairs (x1, x2) -> (-x2, x1) across the two halves of the last dimension.
// x: (b, h, t, d) -> (b, h, t, d)
fn rotate_half(x: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    Ok(Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?)
}

/// Rotary embedding in the Hugging Face (half-split) layout.
// x: (b, h, t, d), cos/sin: (b, 1, t, d) -> (b, h, t, d)
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    crate::fused::rope(x, cos, sin).or_else(|_| {
        Ok(x.broadcast_mul(cos)?
            .add(&rotate_half(x)?.broadcast_mul(sin)?)?)
    })
}

/// The composed (unfused) rotary embedding, the reference the fused kernel is tested against.
pub fn apply_rope_composed(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    Ok(x.broadcast_mul(cos)?
        .add(&rotate_half(x)?.broadcast_mul(sin)?)?)
}

/// Additive attention bias: 0 where query i may see key j, a large negative number elsewhere.
///
/// Key j is visible to query i when j is not padding and j <= past_len + i (causal). A query
/// row with no visible key (a left-pad position) gets all zeros, which keeps softmax finite;
/// its output is never used.
// key_mask: (b, past_len + t) of 0/1 -> (b, 1, t, past_len + t)
pub fn attention_bias(key_mask: &[Vec<u8>], t: usize, device: &Device) -> Result<Tensor> {
    let b = key_mask.len();
    let k = key_mask.first().map(|r| r.len()).unwrap_or(0);
    let past = k - t;
    let mut v = vec![0f32; b * t * k];
    for (bi, row) in key_mask.iter().enumerate() {
        for i in 0..t {
            let base = (bi * t + i) * k;
            let mut any = false;
            for j in 0..k {
                let ok = row[j] != 0 && j <= past + i;
                any |= ok;
                v[base + j] = if ok { 0.0 } else { MASKED };
            }
            if !any {
                v[base..base + k].fill(0.0);
            }
        }
    }
    Ok(Tensor::from_vec(v, (b, 1, t, k), device)?)
}

/// Sequences packed into one row (a batch of one), without padding.
///
/// Each segment is a causal sequence, or a shared prefix followed by branches: a prompt and
/// its completions, laid out `[prompt, completion 1, completion 2, …]`. Every token sees the
/// earlier tokens of its own segment, except that a branch's tokens do not see the other
/// branches. Positions are the caller's: a branch's count on from the end of its prefix.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Packing {
    /// Where each segment starts, then the total length (`segments + 1` entries).
    pub starts: Vec<usize>,
    /// Per segment, where its branches start, as offsets from the segment's start,
    /// ascending; the first one ends the shared prefix. Empty for a plain sequence.
    pub branches: Vec<Vec<usize>>,
    /// A root: a plain segment (no branches, no root of its own) that every other segment
    /// sees whole before its own tokens, as a prefix common to all of them (a chat
    /// template's system turn). Only segment 0 can be the root; `false` when there is none.
    pub root: bool,
}

impl Packing {
    /// Plain causal sequences starting at `starts` (then the total).
    pub fn sequences(starts: Vec<usize>) -> Self {
        let n = starts.len().saturating_sub(1);
        Packing {
            starts,
            branches: vec![Vec::new(); n],
            root: false,
        }
    }

    /// The rows of the root segment that segment `s` sees before its own: `0..0` for the
    /// root itself and where there is no root.
    pub fn root_of(&self, s: usize) -> std::ops::Range<usize> {
        if self.root && s > 0 {
            self.starts[0]..self.starts[1]
        } else {
            0..0
        }
    }

    /// Total tokens.
    pub fn len(&self) -> usize {
        self.starts.last().copied().unwrap_or(0)
    }

    /// Whether it packs no tokens.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether every segment and branch is non-empty and in order.
    pub fn is_valid(&self) -> bool {
        self.starts.first() == Some(&0)
            && self.starts.windows(2).all(|w| w[0] < w[1])
            && self.branches.len() + 1 == self.starts.len()
            && self
                .branches
                .iter()
                .zip(self.starts.windows(2))
                .all(|(b, w)| {
                    b.windows(2).all(|x| x[0] < x[1]) && b.last().is_none_or(|&l| l < w[1] - w[0])
                })
            && (!self.root || self.branches.first().is_some_and(|b| b.is_empty()))
    }

    /// The keys `[lo, hi)` that query `i` (an offset in segment `s`) may not see besides the
    /// future: the branches before its own; empty for the prefix and the first branch.
    pub fn hidden_keys(&self, s: usize, i: usize) -> (usize, usize) {
        hidden_keys(&self.branches[s], i)
    }
}

/// [`Packing::hidden_keys`] from a segment's branch offsets.
#[inline(always)]
pub(crate) fn hidden_keys(branches: &[usize], i: usize) -> (usize, usize) {
    let Some(&prefix) = branches.first() else {
        return (0, 0);
    };
    let own = branches.iter().rev().find(|&&b| b <= i).copied();
    match own {
        Some(b) if i >= prefix => (prefix, b),
        _ => (0, 0),
    }
}

/// The additive bias of a [`Packing`]: `(1, 1, total, total)`, 0 where a token may look.
pub fn packed_attention_bias(packing: &Packing, device: &Device) -> Result<Tensor> {
    let total = packing.len();
    let mut v = vec![MASKED; total * total];
    for (s, w) in packing.starts.windows(2).enumerate() {
        let root = packing.root_of(s);
        for i in w[0]..w[1] {
            v[i * total + root.start..i * total + root.end].fill(0.0);
            v[i * total + w[0]..=i * total + i].fill(0.0);
            let (lo, hi) = packing.hidden_keys(s, i - w[0]);
            v[i * total + w[0] + lo..i * total + w[0] + hi].fill(MASKED);
        }
    }
    Ok(Tensor::from_vec(v, (1, 1, total, total), device)?)
}

/// What masked scores get: finite, so that fully masked rows stay free of NaN.
pub const MASKED: f32 = -1e9;

/// Position ids from an attention mask: each row counts from its first real token, so a
/// left-padded row sees the positions its unpadded twin sees (transformers' `generate` rule)
/// and a right-padded row keeps `arange` (transformers' forward default), padding included.
/// Leading pads get 0; their outputs are never used.
// mask: (b, t) of 0/1 -> (b, t) positions
pub fn positions_from_mask(mask: &[Vec<u8>]) -> Vec<Vec<u32>> {
    mask.iter()
        .map(|row| {
            let lead = row.iter().take_while(|&&m| m == 0).count();
            (0..row.len())
                .map(|j| j.saturating_sub(lead) as u32)
                .collect()
        })
        .collect()
}

/// Cross-entropy of `logits` against `labels`, ignoring label -100, averaged over the rest.
// logits: (n, vocab), labels: (n) i64 -> scalar
pub fn cross_entropy(logits: &Tensor, labels: &[i64]) -> Result<Tensor> {
    let n = labels.len();
    let keep: Vec<u32> = (0..n as u32)
        .filter(|&i| labels[i as usize] != -100)
        .collect();
    let targets: Vec<u32> = keep.iter().map(|&i| labels[i as usize] as u32).collect();
    let device = logits.device();
    let rows = if keep.len() == n {
        logits.clone()
    } else {
        logits.index_select(&Tensor::new(keep.as_slice(), device)?, 0)?
    };
    // The fused log-prob op: no vocabulary-sized intermediates, a one-pass backward.
    let tgt = Tensor::new(targets.as_slice(), device)?;
    let picked = crate::logprob::token_logprobs(&rows, &tgt)?;
    Ok(picked.mean(0)?.neg()?)
}

/// Converts a float tensor to f32 on the CPU, flattened (for tests and outputs).
pub fn to_vec_f32(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

/// Rows `rows` (flat indices over the first two dimensions) of `x`, in that order:
/// `(b, t, h)` -> `(1, rows, h)`.
pub fn select_rows(x: &Tensor, rows: &[usize]) -> Result<Tensor> {
    let (b, t, h) = x.dims3()?;
    let idx: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
    let idx = Tensor::new(idx.as_slice(), x.device())?;
    Ok(x.reshape((b * t, h))?.index_select(&idx, 0)?.unsqueeze(0)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A prompt of 3 and branches of 2 and 3: prompt rows and the first branch hide nothing
    /// but the future; the second branch hides the first; a plain segment hides nothing.
    #[test]
    fn branches_hide_each_other_and_nothing_else() {
        let packing = Packing {
            starts: vec![0, 8, 12],
            branches: vec![vec![3, 5], Vec::new()],
            root: false,
        };
        assert!(packing.is_valid());
        let none = (0, 0);
        // An empty range hides nothing, wherever it starts.
        let hidden_of = |s: usize, i: usize| match packing.hidden_keys(s, i) {
            (lo, hi) if lo >= hi => none,
            range => range,
        };
        let hidden: Vec<(usize, usize)> = (0..8).map(|i| hidden_of(0, i)).collect();
        assert_eq!(
            hidden,
            vec![none, none, none, none, none, (3, 5), (3, 5), (3, 5)]
        );
        assert_eq!(hidden_of(1, 3), none);
        let bad = Packing {
            starts: vec![0, 4],
            branches: vec![vec![2, 4]],
            root: false,
        };
        assert!(
            !bad.is_valid(),
            "a branch starting at the segment's end is empty"
        );
        assert!(
            !Packing::sequences(vec![0, 3, 3]).is_valid(),
            "an empty segment"
        );
    }
}
