//! The losses of the trainers, each a short function findable by name (as in TRL).

use candle_core::{DType, Tensor};

use rlhf_model::Model;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// log σ(x), stable for large |x|: x − max(x, 0) − log(1 + exp(−|x|)).
///
/// Written so that its gradient, σ(−x), is right at x = 0 too, where DPO's first step puts
/// every pair (the policy is its reference): candle's backward takes relu′(0) = abs′(0) = 1,
/// which gives 1 − 1 + ½ here, but 1.5 for the form −(max(−x, 0) + log(1 + exp(−|x|))).
// x: any shape -> same shape
pub fn log_sigmoid(x: &Tensor) -> Result<Tensor> {
    let softplus = (x.abs()?.neg()?.exp()? + 1.0)?.log()?;
    Ok(((x - x.relu()?)? - softplus)?)
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

/// DPO's loss variants, by TRL's `loss_type` names. Each is a function of the log-ratio
/// margin Δ = (log π(y_c|x) − log π_ref(y_c|x)) − (log π(y_r|x) − log π_ref(y_r|x)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DpoLossType {
    /// −log σ(βΔ) (Rafailov et al. 2023); with `label_smoothing` ε, conservative DPO:
    /// −(1−ε) log σ(βΔ) − ε log σ(−βΔ).
    #[default]
    Sigmoid,
    /// IPO (Azar et al. 2023, eq. 17): ((Δ_c/|y_c| − Δ_r/|y_r|) − 1/(2β))², each side's
    /// log-ratio averaged over its completion tokens, as TRL (and the IPO authors) do.
    Ipo,
    /// SLiC's hinge: max(0, 1 − βΔ).
    Hinge,
    /// Robust DPO (Chowdhury et al. 2024): [−(1−ε) log σ(βΔ) + ε log σ(−βΔ)] / (1 − 2ε), an
    /// unbiased loss when each label is flipped with probability ε.
    Robust,
}

/// The mean DPO loss over pairs.
// chosen_logratios, rejected_logratios: (pairs) log π − log π_ref summed over each completion;
// chosen_tokens, rejected_tokens: (pairs) completion lengths, read by IPO only -> scalar
pub fn dpo_loss(
    chosen_logratios: &Tensor,
    rejected_logratios: &Tensor,
    chosen_tokens: &Tensor,
    rejected_tokens: &Tensor,
    loss_type: DpoLossType,
    beta: f64,
    label_smoothing: f64,
) -> Result<Tensor> {
    let delta = (chosen_logratios - rejected_logratios)?;
    let eps = label_smoothing;
    let per_pair = match loss_type {
        DpoLossType::Sigmoid => {
            let clean = log_sigmoid(&(&delta * beta)?)?.neg()?;
            if eps == 0.0 {
                clean
            } else {
                let flipped = log_sigmoid(&(&delta * -beta)?)?.neg()?;
                ((clean * (1.0 - eps))? + (flipped * eps)?)?
            }
        }
        DpoLossType::Ipo => {
            let c = chosen_logratios.div(&chosen_tokens.clamp(1.0, f64::MAX)?)?;
            let r = rejected_logratios.div(&rejected_tokens.clamp(1.0, f64::MAX)?)?;
            ((c - r)? - 1.0 / (2.0 * beta))?.sqr()?
        }
        DpoLossType::Hinge => ((&delta * -beta)? + 1.0)?.relu()?,
        DpoLossType::Robust => {
            let clean = (log_sigmoid(&(&delta * beta)?)? * -(1.0 - eps))?;
            let flipped = (log_sigmoid(&(&delta * -beta)?)? * eps)?;
            ((clean + flipped)? / (1.0 - 2.0 * eps))?
        }
    };
    Ok(per_pair.mean_all()?)
}

/// Checks `beta` and `label_smoothing` for a DPO loss (the ranges the formulas need).
pub fn check_dpo_settings(loss_type: DpoLossType, beta: f64, label_smoothing: f64) -> Result<()> {
    if !(beta.is_finite() && beta > 0.0) {
        return Err(Error::invalid(
            "beta",
            beta,
            "a positive number (TRL's default is 0.1)",
        ));
    }
    if !(0.0..0.5).contains(&label_smoothing) {
        return Err(Error::invalid(
            "label_smoothing",
            label_smoothing,
            "a probability of a flipped label in [0, 0.5)",
        ));
    }
    if label_smoothing > 0.0 && matches!(loss_type, DpoLossType::Ipo | DpoLossType::Hinge) {
        return Err(Error::invalid(
            "label_smoothing",
            label_smoothing,
            "0 for loss_type ipo and hinge, which have no smoothed form (use sigmoid or robust)",
        ));
    }
    Ok(())
}

/// KTO's loss variants (TRL's KTOConfig `loss_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KtoLossType {
    /// Ethayarajh et al. 2024, eq. 7, with the KL reference point z₀.
    #[default]
    Kto,
    /// APO-zero's unpaired form (D'Oosterlinck et al. 2024): no reference point.
    ApoZeroUnpaired,
}

/// KTO's reference point z₀: the policy's KL from the reference estimated on mismatched
/// (prompt, completion) pairs, max(0, mean(log π(y'|x) − log π_ref(y'|x))). It is a plain
/// number, so no gradient flows through it (the paper detaches it).
// kl_logps, ref_kl_logps: (rows) -> z₀
pub fn kto_reference_point(kl_logps: &[f32], ref_kl_logps: &[f32]) -> f64 {
    if kl_logps.is_empty() {
        return 0.0;
    }
    let sum: f64 = kl_logps
        .iter()
        .zip(ref_kl_logps)
        .map(|(&a, &b)| (a - b) as f64)
        .sum();
    (sum / kl_logps.len() as f64).max(0.0)
}

/// The mean KTO loss over a batch's desirable and undesirable completions: the paper's
/// E[λ_y − v(x, y)] with v = λ_D σ(β(r − z₀)) for desirable and λ_U σ(β(z₀ − r)) for
/// undesirable completions, r = log π(y|x) − log π_ref(y|x). APO-zero-unpaired uses
/// 1 − σ(βr) and σ(βr) instead.
// chosen_logratios: (n_desirable), rejected_logratios: (n_undesirable) -> scalar
pub fn kto_loss(
    chosen_logratios: &Tensor,
    rejected_logratios: &Tensor,
    kl: f64,
    loss_type: KtoLossType,
    beta: f64,
    desirable_weight: f64,
    undesirable_weight: f64,
) -> Result<Tensor> {
    let n = chosen_logratios.elem_count() + rejected_logratios.elem_count();
    let sum = |t: Tensor| -> Result<Tensor> { Ok(t.sum_all()?) };
    let mut total = Tensor::zeros((), chosen_logratios.dtype(), chosen_logratios.device())?;
    if chosen_logratios.elem_count() > 0 {
        let x = match loss_type {
            KtoLossType::Kto => ((chosen_logratios - kl)? * beta)?,
            KtoLossType::ApoZeroUnpaired => (chosen_logratios * beta)?,
        };
        let losses = (sigmoid(&x)?.neg()? + 1.0)?;
        total = (total + (sum(losses)? * desirable_weight)?)?;
    }
    if rejected_logratios.elem_count() > 0 {
        let losses = match loss_type {
            KtoLossType::Kto => {
                (sigmoid(&((rejected_logratios.neg()? + kl)? * beta)?)?.neg()? + 1.0)?
            }
            KtoLossType::ApoZeroUnpaired => sigmoid(&(rejected_logratios * beta)?)?,
        };
        total = (total + (sum(losses)? * undesirable_weight)?)?;
    }
    Ok((total / n.max(1) as f64)?)
}

/// σ(x) = exp(log σ(x)), differentiable and stable for large |x|.
fn sigmoid(x: &Tensor) -> Result<Tensor> {
    Ok(log_sigmoid(x)?.exp()?)
}

/// HIR's contrastive instruction-following loss (Zhang et al. 2023): row i holds
/// s_ij, the score of output i under candidate instruction j, and `targets[i]` is the
/// instruction output i was relabelled with. The loss is the mean over rows of the
/// cross-entropy of softmax_j(s_ij) against that instruction: −log(exp(s_ii) / Σ_j exp(s_ij)),
/// so an output becomes likelier under its own instruction than under the others.
/// d loss / d s_ij = (softmax_j(s_i·) − 1[j = targets[i]]) / n.
// scores: (n, c), targets: n indices into c -> scalar
pub fn hir_contrastive_loss(scores: &Tensor, targets: &[usize]) -> Result<Tensor> {
    let (n, c) = scores.dims2()?;
    if targets.len() != n || targets.iter().any(|&t| t >= c) {
        return Err(Error::Config(format!(
            "hir_contrastive_loss: {n} targets in 0..{c} needed for {n} rows, found {targets:?}"
        )));
    }
    // log-softmax over candidates; the max is a constant shift, so no gradient flows through it.
    let max = scores.max_keepdim(1)?.detach();
    let lse = (scores.broadcast_sub(&max)?.exp()?.sum_keepdim(1)?.log()? + max)?;
    let logp = scores.broadcast_sub(&lse)?;
    let mut onehot = vec![0f32; n * c];
    for (i, &t) in targets.iter().enumerate() {
        onehot[i * c + t] = 1.0;
    }
    let onehot = Tensor::from_vec(onehot, (n, c), scores.device())?.to_dtype(scores.dtype())?;
    Ok(((logp * onehot)?.sum_all()?.neg()? / n.max(1) as f64)?)
}

/// The mean entropy of next-token distributions, −Σ_v p_v log p_v per row averaged over rows
/// (HIR's entropy regulariser, which the loss subtracts). dH/dl_v = −p_v (log p_v + H).
// logits: (rows, vocab) -> scalar
pub fn mean_token_entropy(logits: &Tensor) -> Result<Tensor> {
    let rows = logits.dim(0)?;
    let max = logits.max_keepdim(1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(1)?.log()?;
    let logp = shifted.broadcast_sub(&lse)?;
    let h = (logp.exp()? * &logp)?.sum_all()?.neg()?;
    Ok((h / rows.max(1) as f64)?)
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
    let nll = rlhf_model::kernels::token_logprobs(&picked_rows, &targets)?
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
    fn log_sigmoid_gradient_is_sigmoid_of_minus_x_at_zero_too() {
        let x = candle_core::Var::new(&[-100f64, -2.0, 0.0, 3.0, 100.0], &Device::Cpu).unwrap();
        let g = log_sigmoid(&x)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let got = g.get(&x).unwrap().to_vec1::<f64>().unwrap();
        for (&x, g) in [-100f64, -2.0, 0.0, 3.0, 100.0].iter().zip(got) {
            let want = 1.0 / (1.0 + x.exp());
            assert!(
                (g - want).abs() < 1e-12,
                "d/dx log σ({x}) = {g}, want {want}"
            );
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

    /// The loss and d loss / d (chosen, rejected) log-ratios of one DPO variant.
    fn dpo_case(loss_type: DpoLossType, eps: f64) -> (f64, Vec<f64>, Vec<f64>) {
        let d = Device::Cpu;
        let c = candle_core::Var::new(&[1.5f64, -0.4, 2.0], &d).unwrap();
        let r = candle_core::Var::new(&[-0.5f64, 0.3, 2.5], &d).unwrap();
        let tc = Tensor::new(&[3f64, 2.0, 5.0], &d).unwrap();
        let tr = Tensor::new(&[4f64, 1.0, 2.0], &d).unwrap();
        let loss = dpo_loss(&c, &r, &tc, &tr, loss_type, 0.1, eps).unwrap();
        let g = loss.backward().unwrap();
        let grad = |v: &candle_core::Var| g.get(v).unwrap().to_vec1::<f64>().unwrap();
        (loss.to_scalar::<f64>().unwrap(), grad(&c), grad(&r))
    }

    fn close(got: &[f64], want: &[f64], what: &str) {
        for (g, w) in got.iter().zip(want) {
            assert!(
                (g - w).abs() < 1e-12 * w.abs().max(1.0),
                "{what}: {got:?} vs {want:?}"
            );
        }
    }

    // Hand-worked with β = 0.1 on Δ = c − r = (2.0, −0.7, −0.5), written out with Python's
    // math module from each loss's formula and its derivative, e.g. sigmoid:
    // L = mean(−log σ(βΔ)), dL/dc_i = −β σ(−βΔ_i) / n, dL/dr_i = −dL/dc_i.
    #[test]
    fn dpo_losses_and_gradients_match_their_formulas() {
        let cases = [
            (
                DpoLossType::Sigmoid,
                0.0,
                0.681786024314525,
                [
                    -0.015005533422917406,
                    -0.017249761922212992,
                    -0.017083246549473678,
                ],
            ),
            // Conservative DPO: −(1−ε) log σ(βΔ) − ε log σ(−βΔ), ε = 0.1.
            (
                DpoLossType::Sigmoid,
                0.1,
                0.6844526909811918,
                [
                    -0.011672200089584072,
                    -0.01391642858887966,
                    -0.013749913216140346,
                ],
            ),
            // Robust DPO: [−(1−ε) log σ(βΔ) + ε log σ(−βΔ)] / (1 − 2ε).
            (
                DpoLossType::Robust,
                0.1,
                0.6784526909811918,
                [
                    -0.019172200089584073,
                    -0.021416428588879658,
                    -0.021249913216140347,
                ],
            ),
            (DpoLossType::Hinge, 0.0, 0.9733333333333333, [-0.1 / 3.0; 3]),
        ];
        for (lt, eps, want, dc) in cases {
            let (l, gc, gr) = dpo_case(lt, eps);
            close(&[l], &[want], &format!("{lt:?} ε={eps} loss"));
            close(&gc, &dc, &format!("{lt:?} ε={eps} d/dchosen"));
            let neg: Vec<f64> = dc.iter().map(|x| -x).collect();
            close(&gr, &neg, &format!("{lt:?} ε={eps} d/drejected"));
        }
        // Robust with ε = 0 is plain DPO.
        close(
            &[dpo_case(DpoLossType::Robust, 0.0).0],
            &[dpo_case(DpoLossType::Sigmoid, 0.0).0],
            "robust ε=0",
        );
        // IPO: per-token log-ratios; ((c/|c| − r/|r|) − 1/(2β))², d/dc = 2(·)/|c| / n.
        let (l, gc, gr) = dpo_case(DpoLossType::Ipo, 0.0);
        close(&[l], &[27.871041666666667], "ipo loss");
        close(
            &gc,
            &[
                -0.9722222222222222,
                -1.8333333333333333,
                -0.7799999999999999,
            ],
            "ipo d/dc",
        );
        close(
            &gr,
            &[0.7291666666666666, 3.6666666666666665, 1.95],
            "ipo d/dr",
        );
    }

    #[test]
    fn dpo_settings_are_checked() {
        assert!(check_dpo_settings(DpoLossType::Robust, 0.1, 0.5).is_err());
        assert!(check_dpo_settings(DpoLossType::Ipo, 0.1, 0.1).is_err());
        assert!(check_dpo_settings(DpoLossType::Sigmoid, 0.0, 0.0).is_err());
        assert!(check_dpo_settings(DpoLossType::Sigmoid, 0.1, 0.1).is_ok());
    }

    // Hand-worked from the paper's form (Ethayarajh et al. 2024, eq. 7-8): L = E[λ_y − v(x, y)],
    // v = λ_D σ(β(r − z₀)) for desirable, λ_U σ(β(z₀ − r)) for undesirable completions, with
    // β = 0.1, λ_D = 1.5, λ_U = 0.8 and z₀ = max(0, mean of the mismatched pairs' log-ratios).
    #[test]
    fn kto_loss_matches_the_paper() {
        let d = Device::Cpu;
        let z0 = kto_reference_point(
            &[-10.0, -12.5, -9.0, -11.0, -8.0],
            &[-10.4, -12.0, -9.9, -11.2, -8.1],
        );
        assert!((z0 - 0.22).abs() < 1e-6, "{z0}");
        // The KL estimate is clamped at 0 (a policy cannot be closer than the reference itself).
        assert_eq!(kto_reference_point(&[-10.0, -9.0], &[-9.0, -9.5]), 0.0);
        assert_eq!(kto_reference_point(&[], &[]), 0.0);
        let z0 = 0.21999999999999992; // the f64 value Python's mean gives, f32 inputs aside
        let c = candle_core::Var::new(&[0.8f64, -0.3], &d).unwrap();
        let r = candle_core::Var::new(&[0.2f64, -1.1, 0.5], &d).unwrap();
        let loss = kto_loss(&c, &r, z0, KtoLossType::Kto, 0.1, 1.5, 0.8).unwrap();
        close(
            &[loss.to_scalar::<f64>().unwrap()],
            &[0.5353179205618456],
            "kto loss",
        );
        let g = loss.backward().unwrap();
        close(
            &g.get(&c).unwrap().to_vec1::<f64>().unwrap(),
            &[-0.007493696034720406, -0.007494932284005049],
            "kto d/dchosen",
        );
        close(
            &g.get(&r).unwrap().to_vec1::<f64>().unwrap(),
            &[
                0.003999996000002667,
                0.0039826264746795495,
                0.003999216102431291,
            ],
            "kto d/drejected",
        );
        let apo = kto_loss(&c, &r, z0, KtoLossType::ApoZeroUnpaired, 0.1, 1.5, 0.8).unwrap();
        close(
            &[apo.to_scalar::<f64>().unwrap()],
            &[0.5346570172952502],
            "apo_zero_unpaired",
        );
        // A batch with one kind only averages over what it has.
        let none = Tensor::zeros(0, DType::F64, &d).unwrap();
        let only = kto_loss(&c, &none, 0.0, KtoLossType::Kto, 0.1, 1.0, 1.0).unwrap();
        let want = (1.0 - 1.0 / (1.0 + (-0.08f64).exp()) + 1.0 - 1.0 / (1.0 + 0.03f64.exp())) / 2.0;
        close(
            &[only.to_scalar::<f64>().unwrap()],
            &[want],
            "desirable only",
        );
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

    // Hand-worked with Python's math module: L = mean_i (log Σ_j exp s_ij − s_i,t_i), and
    // dL/ds_ij = (softmax_j(s_i·) − 1[j = t_i]) / n.
    #[test]
    fn hir_contrastive_loss_and_gradient_match_the_formula() {
        let d = Device::Cpu;
        let s = candle_core::Var::new(&[[-1.2f64, -2.0, -0.5], [-3.0, -0.7, -1.1]], &d).unwrap();
        let loss = hir_contrastive_loss(&s, &[0, 1]).unwrap();
        close(
            &[loss.to_scalar::<f64>().unwrap()],
            &[0.9067326993369317],
            "hir contrastive loss",
        );
        let g = loss.backward().unwrap();
        let g = g.get(&s).unwrap().to_vec2::<f64>().unwrap();
        close(
            &g[0],
            &[-0.3556199225383073, 0.0648741506450266, 0.2907457718932807],
            "d/ds row 0",
        );
        close(
            &g[1],
            &[
                0.028312447500286723,
                -0.21760648288977724,
                0.18929403538949058,
            ],
            "d/ds row 1",
        );
        // One candidate: the output's own instruction is certain, the loss 0.
        let one = Tensor::new(&[[-4.0f64], [-0.1]], &d).unwrap();
        close(
            &[hir_contrastive_loss(&one, &[0, 0])
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()],
            &[0.0],
            "one candidate",
        );
        // Shifting a row by a constant changes nothing (a softmax over that row).
        let shifted = Tensor::new(&[[98.8f64, 98.0, 99.5], [-3.0, -0.7, -1.1]], &d).unwrap();
        close(
            &[hir_contrastive_loss(&shifted, &[0, 1])
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()],
            &[0.9067326993369317],
            "shifted row",
        );
        assert!(hir_contrastive_loss(&one, &[0, 1]).is_err());
        assert!(hir_contrastive_loss(&one, &[0]).is_err());
    }

    // H = −Σ p log p per row, averaged; dH/dl_v = −p_v (log p_v + H) / rows (Python's math).
    #[test]
    fn token_entropy_and_gradient_match_the_formula() {
        let d = Device::Cpu;
        let l = candle_core::Var::new(&[[0.5f64, -1.0, 2.0], [0.0, 0.0, 0.0]], &d).unwrap();
        let h = mean_token_entropy(&l).unwrap();
        close(
            &[h.to_scalar::<f64>().unwrap()],
            &[0.8600984466736921],
            "entropy",
        );
        // A uniform row's entropy is ln 3.
        let uniform = Tensor::zeros((1, 3), DType::F64, &d).unwrap();
        close(
            &[mean_token_entropy(&uniform)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()],
            &[3f64.ln()],
            "uniform",
        );
        let g = h.backward().unwrap();
        let g = g.get(&l).unwrap().to_vec2::<f64>().unwrap();
        close(
            &g[0],
            &[
                0.09813866546323456,
                0.05123212609458029,
                -0.14937079155781485,
            ],
            "dH/dl row 0",
        );
        for x in &g[1] {
            assert!(x.abs() < 1e-12, "the uniform row is a maximum: {x}");
        }
    }
}
