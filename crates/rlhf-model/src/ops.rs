//! Model-level helpers over the kernels ([`crate::kernels`]): activations by their config
//! names, the LM loss, row selection.

use candle_core::{DType, Tensor};

use crate::Result;

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
    let picked = crate::kernels::token_logprobs(&rows, &tgt)?;
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
