//! Kernels for the element-wise hot spots, each with a backward pass.
//!
//! Every function here has a composed reference built from ops candle differentiates; tests
//! check values and gradients of the two against each other.

use candle_core::{Tensor, D};

use crate::Result;

/// Softmax over the last dimension.
// x: (..., n) -> (..., n)
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    softmax_composed(x)
}

/// The composed softmax: exp(x - max) / sum.
pub fn softmax_composed(x: &Tensor) -> Result<Tensor> {
    // The max only shifts for stability; its gradient cancels exactly, so detach it.
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let s = e.sum_keepdim(D::Minus1)?;
    Ok(e.broadcast_div(&s)?)
}

/// RMSNorm: x / sqrt(mean(x²) + eps) * weight.
// x: (..., h), weight: (h) -> (..., h)
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    rms_norm_composed(x, weight, eps)
}

/// The composed RMSNorm.
pub fn rms_norm_composed(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    let inv = (ms + eps)?.sqrt()?.recip()?;
    Ok(x.broadcast_mul(&inv)?.broadcast_mul(weight)?)
}

/// LayerNorm with weight and bias.
// x: (..., h), weight/bias: (h) -> (..., h)
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    layer_norm_composed(x, weight, bias, eps)
}

/// The composed LayerNorm.
pub fn layer_norm_composed(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let inv = (var + eps)?.sqrt()?.recip()?;
    Ok(xc
        .broadcast_mul(&inv)?
        .broadcast_mul(weight)?
        .broadcast_add(bias)?)
}

/// Rotary embedding (HF half-split layout).
// x: (b, h, t, d), cos/sin: (b, 1, t, d) -> (b, h, t, d)
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    crate::ops::apply_rope_composed(x, cos, sin)
}
