//! The losses of the trainers, each a short function findable by name (as in TRL).

use candle_core::{DType, Tensor};

use rlhf_model::Model;

use crate::Result;

/// log σ(x), stable for large |x|: -(max(-x, 0) + log(1 + exp(-|x|))).
// x: any shape -> same shape
pub fn log_sigmoid(x: &Tensor) -> Result<Tensor> {
    let softplus_neg = (x.neg()?.relu()? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?)?;
    Ok(softplus_neg.neg()?)
}

/// What the reward loss reports, with TRL's metric names.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RewardStats {
    /// Fraction of pairs with r_chosen > r_rejected.
    pub accuracy: f64,
    /// Mean of r_chosen - r_rejected.
    pub margin: f64,
    /// Mean of all rewards (chosen and rejected).
    pub mean_reward: f64,
    /// Smallest reward in the batch.
    pub min_reward: f64,
    /// Largest reward in the batch.
    pub max_reward: f64,
}

/// The pairwise ranking loss of InstructGPT / Llama 2: −log σ(r_c − r_r − margin), averaged over
/// pairs (or weighted: InstructGPT weighs each prompt's K-choose-2 pairs as one element), plus
/// `center_rewards_coefficient`·mean((r_c + r_r)²) when set (TRL's centring term).
// chosen, rejected, margin, weights: (pairs) -> scalar loss
pub fn reward_loss(
    chosen: &Tensor,
    rejected: &Tensor,
    margin: Option<&Tensor>,
    weights: Option<&Tensor>,
    center_rewards_coefficient: Option<f64>,
) -> Result<(Tensor, RewardStats)> {
    let diff = (chosen - rejected)?;
    let logits = match margin {
        Some(m) => (&diff - m)?,
        None => diff.clone(),
    };
    let per_pair = log_sigmoid(&logits)?;
    let mut loss = match weights {
        Some(w) => (per_pair * w)?.sum_all()?.neg()?,
        None => per_pair.mean_all()?.neg()?,
    };
    if let Some(c) = center_rewards_coefficient {
        let centre = (chosen + rejected)?.sqr()?.mean_all()?;
        loss = (loss + (centre * c)?)?;
    }
    let c = chosen.detach().to_dtype(DType::F32)?.to_vec1::<f32>()?;
    let r = rejected.detach().to_dtype(DType::F32)?.to_vec1::<f32>()?;
    let n = c.len().max(1) as f64;
    let all: Vec<f32> = c.iter().chain(&r).copied().collect();
    let stats = RewardStats {
        accuracy: c.iter().zip(&r).filter(|(a, b)| a > b).count() as f64 / n,
        margin: c.iter().zip(&r).map(|(a, b)| (a - b) as f64).sum::<f64>() / n,
        mean_reward: all.iter().map(|&x| x as f64).sum::<f64>() / all.len().max(1) as f64,
        min_reward: all.iter().copied().fold(f32::INFINITY, f32::min) as f64,
        max_reward: all.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64,
    };
    Ok((loss, stats))
}

/// Sum of next-token cross-entropy over labelled positions (labels −100 are ignored) and the
/// number of labelled tokens. Callers divide by the token count of the whole optimiser step,
/// as transformers does with `num_items_in_batch`, so accumulation does not reweight rows.
// logits: (b, t, vocab), labels: b rows of t (already aligned: labels[i] is predicted at i) -> (scalar sum, count)
pub fn token_nll_sum(logits: &Tensor, labels: &[Vec<i64>]) -> Result<(Tensor, usize)> {
    let (b, t, v) = logits.dims3()?;
    let device = logits.device();
    let Some((rows, targets)) = labelled(labels, t, device)? else {
        return Ok((Tensor::zeros((), logits.dtype(), device)?, 0));
    };
    let n = targets.dim(0)?;
    let picked_rows = logits.reshape((b * t, v))?.index_select(&rows, 0)?;
    let nll = rlhf_model::logprob::token_logprobs(&picked_rows, &targets)?
        .sum_all()?
        .neg()?;
    Ok((nll, n))
}

/// [`token_nll_sum`] from the hidden states: only the labelled positions go through the
/// model's LM head, and where the head is frozen its logits are never kept
/// ([`Model::token_logprobs`]).
// hidden: (b, t, h), labels: b rows of t -> (scalar sum, count)
pub fn hidden_nll_sum(
    model: &Model,
    hidden: &Tensor,
    labels: &[Vec<i64>],
) -> Result<(Tensor, usize)> {
    let (b, t, h) = hidden.dims3()?;
    let device = hidden.device();
    let Some((rows, targets)) = labelled(labels, t, device)? else {
        return Ok((Tensor::zeros((), DType::F32, device)?, 0));
    };
    let n = targets.dim(0)?;
    let picked = hidden.reshape((b * t, h))?.index_select(&rows, 0)?;
    let nll = model
        .token_logprobs(&picked, &targets, 1.0)?
        .sum_all()?
        .neg()?;
    Ok((nll, n))
}

/// The flat (b·t) positions that carry a label, and their labels; `None` when none does.
fn labelled(
    labels: &[Vec<i64>],
    t: usize,
    device: &candle_core::Device,
) -> Result<Option<(Tensor, Tensor)>> {
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    for (bi, row) in labels.iter().enumerate() {
        for (ti, &l) in row.iter().enumerate().take(t) {
            if l != -100 {
                rows.push((bi * t + ti) as u32);
                targets.push(l as u32);
            }
        }
    }
    if rows.is_empty() {
        return Ok(None);
    }
    Ok(Some((
        Tensor::new(rows.as_slice(), device)?,
        Tensor::new(targets.as_slice(), device)?,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn log_sigmoid_is_stable_and_exact() {
        let x = Tensor::new(&[-100f32, -2.0, 0.0, 3.0, 100.0], &Device::Cpu).unwrap();
        let got = log_sigmoid(&x).unwrap().to_vec1::<f32>().unwrap();
        // torch.nn.functional.logsigmoid(torch.tensor([-100., -2., 0., 3., 100.]))
        let want = [
            -100.0f32,
            -2.126928,
            -std::f32::consts::LN_2,
            -0.04858735,
            0.0,
        ];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-5, "{g} vs {w}");
        }
    }

    #[test]
    fn reward_loss_matches_the_formula() {
        let d = Device::Cpu;
        let c = Tensor::new(&[1.0f32, 0.5, -0.2], &d).unwrap();
        let r = Tensor::new(&[0.0f32, 0.7, -1.0], &d).unwrap();
        let m = Tensor::new(&[1.0f32, 0.0, 1.0 / 3.0], &d).unwrap();
        let (loss, s) = reward_loss(&c, &r, Some(&m), None, Some(0.01)).unwrap();
        let w = Tensor::new(&[1.0f32 / 3.0; 3], &d).unwrap();
        let (lw, _) = reward_loss(&c, &r, Some(&m), Some(&w), Some(0.01)).unwrap();
        assert!((lw.to_scalar::<f32>().unwrap() - loss.to_scalar::<f32>().unwrap()).abs() < 1e-6);
        // torch: -F.logsigmoid(c - r - m).mean() + 0.01 * ((c + r) ** 2).mean() = 0.6722928285598755
        let l = loss.to_scalar::<f32>().unwrap();
        assert!((l as f64 - 0.672_292_828_559_875_5).abs() < 1e-6, "{l}");
        assert!((s.accuracy - 2.0 / 3.0).abs() < 1e-12);
        assert!((s.margin - 1.6 / 3.0).abs() < 1e-6);
        assert_eq!((s.min_reward, s.max_reward), (-1.0, 1.0));
    }

    #[test]
    fn nll_ignores_minus_100() {
        let d = Device::Cpu;
        // Two positions, vocab 2, uniform logits: each labelled token costs ln 2.
        let logits = Tensor::zeros((1, 2, 2), DType::F32, &d).unwrap();
        let (sum, n) = token_nll_sum(&logits, &[vec![-100, 1]]).unwrap();
        assert_eq!(n, 1);
        assert!((sum.to_scalar::<f32>().unwrap() - std::f32::consts::LN_2).abs() < 1e-6);
    }
}
