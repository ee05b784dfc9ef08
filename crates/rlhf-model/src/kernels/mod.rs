//! The ops the models are built from, each behind one per-device dispatch.
//!
//! Every op here has two forms:
//!
//! - a device's own kernel, where the device has one: [`cpu`] today (AVX-512 products, fused
//!   element-wise ops, the one-op attention core and decoder layer, each with its own backward
//!   pass). A kernel returns `None` for tensors it does not take (a dtype, a shape, a CPU
//!   without AVX-512F) and the op falls back;
//! - a device-generic form ([`generic`]), composed from candle ops that candle differentiates,
//!   which runs wherever candle runs (CUDA included) and is the reference each kernel is tested
//!   against on the CPU (`tests/kernels.rs`, values and gradients).
//!
//! [`Backend::of`] is the one place that picks between them. A CUDA kernel set would be a
//! sibling of [`cpu`] and one more arm there; until then CUDA tensors take the generic forms.
//!
//! Two fusions have no generic form of their own, because the generic form *is* the
//! composition the model writes out: the whole decoder layer ([`decoder_layer`]) and the LM
//! head fused with the log-prob ([`head_token_logprobs`]). They return `None` off their device
//! and the model composes them from the ops below.
//!
//! Nothing in this module reads a model file: the models depend on the kernels, never the
//! other way round.

use std::cell::Cell;

use candle_core::{Device, Tensor};

use crate::Result;

mod autocast;
pub mod cpu;
pub mod generic;
pub(crate) mod kv;
pub(crate) mod mask;

pub use autocast::{autocast_bf16, round_bf16, Autocast};
pub use cpu::layer::{AdapterRef, FrozenRef, LayerParts, Proj};
pub use generic::{repeat_kv, sdpa};
pub use kv::KvCache;
pub use mask::{attention_bias, packed_attention_bias, positions_from_mask, Packing, MASKED};

/// Which form of the ops runs for a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// The CPU kernels ([`cpu`]), falling back to the generic forms where they decline.
    Cpu,
    /// The device-generic forms ([`generic`]): other devices, or the CPU under
    /// [`GenericOnly`].
    Generic,
}

thread_local! {
    static GENERIC_ONLY: Cell<bool> = const { Cell::new(false) };
}

/// Whether `RLHF_KERNELS=generic` asks for the generic forms everywhere: a whole job on the
/// CPU runs what another device runs, for side-by-side checks and measurements.
fn generic_everywhere() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("RLHF_KERNELS").is_ok_and(|v| v == "generic"))
}

impl Backend {
    /// The backend for tensors on `device`.
    pub fn of(device: &Device) -> Backend {
        if GENERIC_ONLY.get() || generic_everywhere() {
            return Backend::Generic;
        }
        match device {
            Device::Cpu => Backend::Cpu,
            _ => Backend::Generic,
        }
    }
}

/// While alive, every op called on this thread takes its generic form, whatever the device:
/// the kernels' reference for tests and side-by-side measurements. Backward passes follow
/// the forward's choice (each form carries its own). Dropping it restores the setting it
/// replaced.
#[must_use = "the generic forms run only while the guard is alive"]
pub struct GenericOnly {
    before: bool,
}

impl GenericOnly {
    /// Turns the device kernels off on this thread until the guard is dropped.
    pub fn new() -> Self {
        GenericOnly {
            before: GENERIC_ONLY.replace(true),
        }
    }
}

impl Default for GenericOnly {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for GenericOnly {
    fn drop(&mut self) {
        GENERIC_ONLY.set(self.before);
    }
}

/// Runs the device kernel where the backend has one and it takes the tensors, else the
/// generic form.
macro_rules! dispatch {
    ($device:expr, cpu: $cpu:expr, generic: $generic:expr $(,)?) => {{
        if Backend::of($device) == Backend::Cpu {
            if let Some(y) = $cpu? {
                return Ok(y);
            }
        }
        $generic
    }};
}

/// Softmax over the last dimension.
// x: (..., n) -> (..., n)
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    dispatch!(x.device(), cpu: cpu::fused::softmax(x), generic: generic::softmax(x))
}

/// softmax(scores · scale + bias) over the last dimension, as attention computes it; `bias`
/// (the additive mask) broadcasts to the shape of `scores` and gets no gradient.
// scores: (b, h, tq, tk), bias: broadcastable, e.g. (b, 1, tq, tk) -> (b, h, tq, tk)
pub fn scaled_masked_softmax(scores: &Tensor, bias: &Tensor, scale: f64) -> Result<Tensor> {
    dispatch!(scores.device(),
        cpu: cpu::fused::scaled_masked_softmax(scores, bias, scale),
        generic: generic::scaled_masked_softmax(scores, bias, scale))
}

/// RMSNorm: x / sqrt(mean(x²) + eps) * weight.
// x: (..., h), weight: (h) -> (..., h)
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    dispatch!(x.device(),
        cpu: cpu::fused::rms_norm(x, weight, eps),
        generic: generic::rms_norm(x, weight, eps))
}

/// LayerNorm with weight and bias.
// x: (..., h), weight/bias: (h) -> (..., h)
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    dispatch!(x.device(),
        cpu: cpu::fused::layer_norm(x, weight, bias, eps),
        generic: generic::layer_norm(x, weight, bias, eps))
}

/// Rotary embedding in the Hugging Face (half-split) layout.
// x: (b, h, t, d), cos/sin: (b|1, 1, t, d) -> (b, h, t, d)
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    dispatch!(x.device(), cpu: cpu::fused::rope(x, cos, sin), generic: generic::rope(x, cos, sin))
}

/// silu(gate) · up (Llama's, Mistral's and Qwen2's MLP), differentiable in both inputs.
// gate, up: (..., n) -> (..., n)
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    dispatch!(gate.device(),
        cpu: cpu::glu::silu_mul(gate, up),
        generic: generic::silu_mul(gate, up))
}

/// (silu(gate)·up)·Wᵀ for a frozen or trainable W.
// gate, up: (m, i), w: (n, i) -> (m, n)
pub fn silu_mul_linear(gate: &Tensor, up: &Tensor, w: &Tensor) -> Result<Tensor> {
    dispatch!(gate.device(),
        cpu: cpu::glu::silu_mul_linear(gate, up, w),
        generic: generic::silu_mul_linear(gate, up, w))
}

/// residual + (silu(gate)·up)·Wᵀ.
// gate, up: (m, i), w: (n, i), residual: (m, n) -> (m, n)
pub fn silu_mul_linear_residual(
    gate: &Tensor,
    up: &Tensor,
    w: &Tensor,
    residual: &Tensor,
) -> Result<Tensor> {
    dispatch!(gate.device(),
        cpu: cpu::glu::silu_mul_linear_residual(gate, up, w, residual),
        generic: generic::silu_mul_linear_residual(gate, up, w, residual))
}

/// log softmax(logits)[target] for every row; differentiable in `logits`.
// logits: (..., vocab), targets: (...) u32 -> (...)
pub fn token_logprobs(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    dispatch!(logits.device(),
        cpu: cpu::logprob::token_logprobs(logits, targets),
        generic: generic::token_logprobs(logits, targets))
}

/// log softmax(h·Wᵀ / temperature)[target] per row for a frozen head W, without the
/// vocabulary-sized logits, where a device kernel runs it ([`cpu::logprob::head_token_logprobs`]);
/// `None` elsewhere: the caller composes the head's product and [`token_logprobs`].
// h: (..., d), w: (vocab, d), targets: (...) u32 -> (...)
pub fn head_token_logprobs(
    h: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    temperature: f64,
    keep_grad: bool,
) -> Result<Option<Tensor>> {
    match Backend::of(h.device()) {
        Backend::Cpu => cpu::logprob::head_token_logprobs(h, w, targets, temperature, keep_grad),
        Backend::Generic => Ok(None),
    }
}

/// `x·Wᵀ` (or `x·W` for GPT-2's Conv1D), with no gradient buffer for a frozen W.
// x: (m, in), w: (out, in) | (in, out) -> (m, out)
pub fn linear(x: &Tensor, w: &Tensor, conv1d: bool) -> Result<Tensor> {
    dispatch!(x.device(),
        cpu: cpu::frozen::linear(x, w, conv1d),
        generic: generic::linear(x, w, conv1d))
}

/// `x·Wᵀ` in f32 for a frozen bf16 W `(out, in)` kept for decoding; no gradient.
// x: (m, in) f32, w: (out, in) bf16 -> (m, out) f32
pub fn linear_bf16(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    dispatch!(x.device(), cpu: cpu::frozen::linear_bf16(x, w), generic: generic::linear_bf16(x, w))
}

/// A LoRA-adapted linear layer, `x·Wᵀ + scale·(x·Aᵀ)·Bᵀ` (`x·W + …` for Conv1D).
// x: (m, in), w: (out, in) | (in, out), a: (r, in), b: (out, r) -> (m, out)
pub fn lora_linear(
    x: &Tensor,
    w: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    conv1d: bool,
) -> Result<Tensor> {
    dispatch!(x.device(),
        cpu: cpu::frozen::lora_linear(x, w, a, b, scale, conv1d),
        generic: generic::lora_linear(x, w, a, b, scale, conv1d))
}

/// `residual + x·Wᵀ` (nn.Linear layout, no bias).
// x: (m, in), w: (out, in), residual: (m, out) -> (m, out)
pub fn linear_residual(x: &Tensor, w: &Tensor, residual: &Tensor) -> Result<Tensor> {
    dispatch!(x.device(),
        cpu: cpu::frozen::linear_residual(x, w, residual),
        generic: generic::linear_residual(x, w, residual))
}

/// Rows of `table` for `ids`; a frozen table gets no gradient buffer.
// table: (n, d), ids: (m) u32 -> (m, d)
pub fn embedding(table: &Tensor, ids: &Tensor) -> Result<Tensor> {
    dispatch!(table.device(),
        cpu: cpu::frozen::embedding(table, ids),
        generic: generic::embedding(table, ids))
}

/// a·b over the last two dimensions, the leading ones equal (attention's q·kᵀ and p·v).
pub fn bmm(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    dispatch!(a.device(), cpu: cpu::frozen::bmm(a, b), generic: generic::bmm(a, b))
}

/// The attention core of the rotary models: rope on q and k, grouped-query attention with an
/// additive bias, read from and written in the projections' `(b, t, heads · d)` layout.
///
/// `cos`/`sin` are the rotary tables of the query positions, `bias` the additive mask; none
/// of the three may carry a gradient of its own. `segments`, for a batch of one row that
/// packs several sequences, holds their layout: each sequence then attends to itself alone
/// (the CPU kernel never reads `bias`, which may be a placeholder; the generic form builds
/// the block-diagonal bias). With a `cache`, keys and values are appended to it.
// q: (b, t, nh·d), k/v: (b, t, nkv·d), cos/sin: (b|1, 1, t, d), bias: (b|1, 1, t, past + t)
// -> (b, t, nh·d)
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
    mut cache: Option<(&mut KvCache, usize)>,
) -> Result<Tensor> {
    if Backend::of(q.device()) == Backend::Cpu {
        let cache = cache.as_mut().map(|(c, l)| (&mut **c, *l));
        let heads = (n_heads, n_kv);
        if let Some(y) = cpu::attn::attention(q, k, v, cos, sin, bias, heads, segments, cache)? {
            return Ok(y);
        }
    }
    generic::attention(q, k, v, cos, sin, bias, n_heads, n_kv, segments, cache)
}

/// A Llama-family decoder layer (x + attention + MLP) as one op where a device kernel runs it
/// ([`cpu::layer`]); `None` elsewhere, and the model composes the layer from the ops above.
/// With `rows`, only those rows of the output are computed, `(1, rows, hidden)`.
// x: (b, t, hidden) -> (b, t, hidden) | (1, rows, hidden)
#[allow(clippy::too_many_arguments)]
pub fn decoder_layer(
    x: &Tensor,
    parts: &LayerParts<'_>,
    cos: &Tensor,
    sin: &Tensor,
    bias: &Tensor,
    segments: Option<&Packing>,
    rows: Option<&[usize]>,
) -> Result<Option<Tensor>> {
    match Backend::of(x.device()) {
        Backend::Cpu => cpu::layer::decoder_layer(x, parts, cos, sin, bias, segments, rows),
        Backend::Generic => Ok(None),
    }
}
