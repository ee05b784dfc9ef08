//! The device-generic forms of the ops: composed from candle ops that candle differentiates,
//! so they run on every device candle runs on and carry candle's own backward passes.
//!
//! They are what CUDA tensors run today, and the reference every device kernel is tested
//! against on the CPU (`tests/kernels.rs`, values and gradients, under
//! [`super::GenericOnly`]). The ops that are compositions of other ops (attention, the
//! LoRA product, the residual and MLP fusions) call those through the dispatch, so that
//! where a CPU kernel declines a fusion its parts still run on the CPU's kernels; under
//! [`super::GenericOnly`] and on other devices every part is generic.
//!
//! candle's fast ops (`softmax_last_dim`, `rms_norm`, `layer_norm`, `rope`) have no backward
//! pass (gradients stop at them without an error), so none of them is used here.

use candle_core::{DType, Tensor, D};

use super::{autocast_bf16, KvCache, Packing};
use crate::Result;

/// Softmax over the last dimension: exp(x - max) / sum.
// x: (..., n) -> (..., n)
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    // The max only shifts for stability; its gradient cancels exactly, so detach it.
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let s = e.sum_keepdim(D::Minus1)?;
    Ok(e.broadcast_div(&s)?)
}

/// Log-softmax over the last dimension, stable.
// x: (..., n) -> (..., n)
pub fn log_softmax(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&lse)?)
}

/// Scale, add the bias, softmax.
// scores: (b, h, tq, tk), bias: broadcastable -> (b, h, tq, tk)
pub fn scaled_masked_softmax(scores: &Tensor, bias: &Tensor, scale: f64) -> Result<Tensor> {
    super::softmax(&(scores * scale)?.broadcast_add(bias)?)
}

/// RMSNorm: x / sqrt(mean(x²) + eps) * weight.
// x: (..., h), weight: (h) -> (..., h)
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    let inv = (ms + eps)?.sqrt()?.recip()?;
    Ok(x.broadcast_mul(&inv)?.broadcast_mul(weight)?)
}

/// LayerNorm with weight and bias.
// x: (..., h), weight/bias: (h) -> (..., h)
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let inv = (var + eps)?.sqrt()?.recip()?;
    Ok(xc
        .broadcast_mul(&inv)?
        .broadcast_mul(weight)?
        .broadcast_add(bias)?)
}

/// Rotates pairs (x1, x2) -> (-x2, x1) across the two halves of the last dimension.
// x: (b, h, t, d) -> (b, h, t, d)
fn rotate_half(x: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    Ok(Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?)
}

/// Rotary embedding in the Hugging Face (half-split) layout: x·cos + rotate_half(x)·sin.
// x: (b, h, t, d), cos/sin: (b|1, 1, t, d) -> (b, h, t, d)
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    Ok(x.broadcast_mul(cos)?
        .add(&rotate_half(x)?.broadcast_mul(sin)?)?)
}

/// silu(gate) · up.
// gate, up: (..., n) -> (..., n)
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    Ok((gate.silu()? * up)?)
}

/// (silu(gate)·up)·Wᵀ.
// gate, up: (m, i), w: (n, i) -> (m, n)
pub fn silu_mul_linear(gate: &Tensor, up: &Tensor, w: &Tensor) -> Result<Tensor> {
    super::linear(&super::silu_mul(gate, up)?, w, false)
}

/// residual + (silu(gate)·up)·Wᵀ.
// gate, up: (m, i), w: (n, i), residual: (m, n) -> (m, n)
pub fn silu_mul_linear_residual(
    gate: &Tensor,
    up: &Tensor,
    w: &Tensor,
    residual: &Tensor,
) -> Result<Tensor> {
    Ok((residual + silu_mul_linear(gate, up, w)?)?)
}

/// log_softmax(logits), then the targets' entries.
// logits: (..., vocab), targets: (...) u32 -> (...)
pub fn token_logprobs(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let lp = log_softmax(logits)?;
    Ok(lp
        .gather(&targets.unsqueeze(D::Minus1)?, D::Minus1)?
        .squeeze(D::Minus1)?)
}

/// `t` rounded to bf16 values (still f32) under bf16 autocast, `t` itself otherwise.
/// Differentiable: the gradient passes through rounded, as it leaves a bf16 product under
/// torch's autocast.
fn autocast(t: &Tensor) -> Result<Tensor> {
    Ok(if autocast_bf16() && t.dtype() == DType::F32 {
        t.to_dtype(DType::BF16)?.to_dtype(DType::F32)?
    } else {
        t.clone()
    })
}

/// a·b, on operands rounded to bf16 under autocast.
fn product(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok(autocast(a)?.matmul(&autocast(b)?)?)
}

/// `x·Wᵀ` (or `x·W` for Conv1D). candle's backward computes W's gradient too (discarded for
/// a frozen W): the cost the CPU kernel saves.
// x: (m, in), w: (out, in) | (in, out) -> (m, out)
pub fn linear(x: &Tensor, w: &Tensor, conv1d: bool) -> Result<Tensor> {
    let wt = if conv1d { w.clone() } else { w.t()? };
    product(x, &wt)
}

/// `x·Wᵀ` in f32 for a bf16 W; no gradient (the result is a new leaf, as on the CPU).
// x: (m, in) f32, w: (out, in) bf16 -> (m, out) f32
pub fn linear_bf16(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let w = w.detach().to_dtype(DType::F32)?;
    Ok(x.detach().to_dtype(DType::F32)?.matmul(&w.t()?)?)
}

/// `x·Wᵀ + scale·(x·Aᵀ)·Bᵀ` (`x·W + …` for Conv1D).
// x: (m, in), w: (out, in) | (in, out), a: (r, in), b: (out, r) -> (m, out)
pub fn lora_linear(
    x: &Tensor,
    w: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    conv1d: bool,
) -> Result<Tensor> {
    let delta = super::linear(&super::linear(x, a, false)?, b, false)?;
    Ok((super::linear(x, w, conv1d)? + (delta * scale)?)?)
}

/// `residual + x·Wᵀ`.
// x: (m, in), w: (out, in), residual: (m, out) -> (m, out)
pub fn linear_residual(x: &Tensor, w: &Tensor, residual: &Tensor) -> Result<Tensor> {
    Ok((residual + super::linear(x, w, false)?)?)
}

/// Rows of `table` for `ids`.
// table: (n, d), ids: (m) u32 -> (m, d)
pub fn embedding(table: &Tensor, ids: &Tensor) -> Result<Tensor> {
    Ok(table.index_select(ids, 0)?)
}

/// a·b over the last two dimensions.
pub fn bmm(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    product(a, b)
}

/// Repeats key/value heads for grouped-query attention.
// x: (b, kv_heads, t, d) -> (b, kv_heads * n_rep, t, d)
pub fn repeat_kv(x: &Tensor, n_rep: usize) -> Result<Tensor> {
    if n_rep == 1 {
        return Ok(x.clone());
    }
    let (b, h, t, d) = x.dims4()?;
    Ok(x.unsqueeze(2)?
        .broadcast_as((b, h, n_rep, t, d))?
        .reshape((b, h * n_rep, t, d))?)
}

/// Scaled dot-product attention with an additive bias.
// q: (b, h, tq, d), k/v: (b, h, tk, d), bias: (b, 1, tq, tk) -> (b, h, tq, d)
pub fn sdpa(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor, scale: f64) -> Result<Tensor> {
    let probs = super::scaled_masked_softmax(&super::bmm(q, &k.t()?)?, bias, scale)?;
    super::bmm(&probs, v)
}

/// The rotary attention core ([`super::attention`]): heads split out, rope, the cache
/// appended to, grouped heads repeated, [`sdpa`]; a packed row gets its block-diagonal bias.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    bias: &Tensor,
    n_heads: usize,
    n_kv: usize,
    segments: Option<&Packing>,
    cache: Option<(&mut KvCache, usize)>,
) -> Result<Tensor> {
    let dense;
    let bias = match segments {
        Some(packing) => {
            dense = super::packed_attention_bias(packing, q.device())?.to_dtype(q.dtype())?;
            &dense
        }
        None => bias,
    };
    let (b, t, width) = q.dims3()?;
    let d = width / n_heads;
    let heads = |y: &Tensor, n: usize| -> Result<Tensor> {
        Ok(y.reshape((b, t, n, d))?.transpose(1, 2)?.contiguous()?)
    };
    let q = super::rope(&heads(q, n_heads)?, cos, sin)?;
    let k = super::rope(&heads(k, n_kv)?, cos, sin)?;
    let v = heads(v, n_kv)?;
    let (k, v) = match cache {
        Some((c, layer)) => c.append(layer, &k, &v)?,
        None => (k, v),
    };
    let rep = n_heads / n_kv;
    let (k, v) = (repeat_kv(&k, rep)?, repeat_kv(&v, rep)?);
    let y = sdpa(&q, &k, &v, bias, 1.0 / (d as f64).sqrt())?;
    Ok(y.transpose(1, 2)?.reshape((b, t, n_heads * d))?)
}
