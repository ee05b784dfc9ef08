//! The pieces of PPO, each a formula: ragged mean/variance and whitening (TRL's `masked_mean`,
//! `masked_var`, `masked_whiten`), generalised advantage estimation, the per-token KL estimators
//! k1/k2/k3, Ziegler et al.'s adaptive KL controller, the clipped policy and value losses of
//! TRL's `PPOTrainer`, and Llama 2's combination of a helpfulness and a safety reward.
//!
//! Rollouts on the host are *ragged*: each row holds exactly the valid response tokens of one
//! completion (no padding). The two losses work on padded `(rows, T)` tensors with a 0/1 mask.

use candle_core::{DType, Tensor};

/// Mean over every element of every row (TRL `masked_mean`). 0.0 for no elements.
pub fn ragged_mean(x: &[Vec<f32>]) -> f64 {
    let n: usize = x.iter().map(Vec::len).sum();
    if n == 0 {
        return 0.0;
    }
    x.iter().flatten().map(|&v| v as f64).sum::<f64>() / n as f64
}

/// Variance over every element of every row. `unbiased` applies Bessel's correction n/(n-1)
/// as TRL's `masked_var` does by default. Returns 0.0 for no elements, and also for a single
/// element when `unbiased` (where TRL would divide by zero).
pub fn ragged_var(x: &[Vec<f32>], unbiased: bool) -> f64 {
    let n: usize = x.iter().map(Vec::len).sum();
    if n == 0 || (unbiased && n < 2) {
        return 0.0;
    }
    let mean = ragged_mean(x);
    let var = x
        .iter()
        .flatten()
        .map(|&v| (v as f64 - mean).powi(2))
        .sum::<f64>()
        / n as f64;
    if unbiased {
        var * n as f64 / (n as f64 - 1.0)
    } else {
        var
    }
}

/// TRL's `masked_whiten` over all elements of all rows: (x − mean) / sqrt(var_unbiased + 1e-8);
/// when `!shift_mean` the mean is added back. The row structure is kept.
pub fn whiten(x: &[Vec<f32>], shift_mean: bool) -> Vec<Vec<f32>> {
    let flat: Vec<f32> = x.iter().flatten().copied().collect();
    let mut white = whiten_flat(&flat, shift_mean).into_iter();
    x.iter()
        .map(|row| white.by_ref().take(row.len()).collect())
        .collect()
}

/// Whitening of a flat slice (one value per sequence, e.g. Llama 2's whiten(logit(R_c)) across
/// the batch), with the same formula as [`whiten`].
pub fn whiten_flat(x: &[f32], shift_mean: bool) -> Vec<f32> {
    let rows = [x.to_vec()];
    let mean = ragged_mean(&rows);
    let scale = 1.0 / (ragged_var(&rows, true) + 1e-8).sqrt();
    let shift = if shift_mean { 0.0 } else { mean };
    x.iter()
        .map(|&v| ((v as f64 - mean) * scale + shift) as f32)
        .collect()
}

/// Generalised advantage estimation per row (TRL `PPOTrainer`): for t from last to first,
/// next_value = values[t+1], or 0.0 after the row's last token; δ_t = r_t + γ·next_value − v_t;
/// a_t = δ_t + γ·λ·a_{t+1}; returns = advantages + values. Computes in f64 internally.
/// Returns `(advantages, returns)`, ragged like the inputs.
///
/// Panics if `rewards` and `values` differ in number of rows or in any row's length (a
/// programming error of the caller).
pub fn gae(
    rewards: &[Vec<f32>],
    values: &[Vec<f32>],
    gamma: f64,
    lam: f64,
) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
    assert_eq!(
        rewards.len(),
        values.len(),
        "gae: rewards and values differ in rows"
    );
    let mut advantages = Vec::with_capacity(rewards.len());
    let mut returns = Vec::with_capacity(rewards.len());
    for (i, (r, v)) in rewards.iter().zip(values).enumerate() {
        assert_eq!(
            r.len(),
            v.len(),
            "gae: row {i}: rewards and values differ in length"
        );
        let mut adv = vec![0.0f64; r.len()];
        let mut last = 0.0f64;
        for t in (0..r.len()).rev() {
            let next_value = v.get(t + 1).map_or(0.0, |&x| x as f64);
            let delta = r[t] as f64 + gamma * next_value - v[t] as f64;
            last = delta + gamma * lam * last;
            adv[t] = last;
        }
        returns.push(
            adv.iter()
                .zip(v)
                .map(|(a, &v)| (a + v as f64) as f32)
                .collect(),
        );
        advantages.push(adv.into_iter().map(|a| a as f32).collect());
    }
    (advantages, returns)
}

/// Estimators of KL(π ‖ π_ref) per token from logp = log π(token) and ref_logp = log π_ref(token),
/// for tokens sampled from π (Schulman, <http://joschu.net/blog/kl-approx.html>):
/// k1 = logp − ref_logp (unbiased, can be negative); k2 = ½(logp − ref_logp)² (biased, ≥ 0);
/// k3 = (r − 1) − log r with r = exp(ref_logp − logp) (unbiased, ≥ 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KlEstimator {
    /// logp − ref_logp.
    K1,
    /// ½(logp − ref_logp)².
    K2,
    /// (r − 1) − log r, r = exp(ref_logp − logp).
    K3,
}

impl KlEstimator {
    /// The estimator's value for one token; computed in f64 (k3 as expm1(d) − d with
    /// d = ref_logp − logp = log r, which is the same quantity without cancellation near r = 1).
    pub fn per_token(self, logp: f32, ref_logp: f32) -> f32 {
        let d = logp as f64 - ref_logp as f64;
        let k = match self {
            KlEstimator::K1 => d,
            KlEstimator::K2 => 0.5 * d * d,
            KlEstimator::K3 => (-d).exp_m1() + d,
        };
        k as f32
    }
}

impl std::str::FromStr for KlEstimator {
    type Err = String;

    /// Parses "k1", "k2" or "k3" (ASCII case-insensitive).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "k1" => Ok(KlEstimator::K1),
            "k2" => Ok(KlEstimator::K2),
            "k3" => Ok(KlEstimator::K3),
            _ => Err(format!(
                "unknown KL estimator {s:?}: expected one of k1, k2, k3"
            )),
        }
    }
}

/// Ziegler et al. 2019's adaptive KL controller (TRL's `AdaptiveKLController`): the KL
/// coefficient `value` is steered so that the observed KL tracks `target` over `horizon` steps.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdaptiveKl {
    /// The current KL coefficient β.
    pub value: f64,
    /// The KL the controller aims for.
    pub target: f64,
    /// How many steps (samples) the proportional correction is spread over.
    pub horizon: f64,
}

impl AdaptiveKl {
    /// proportional_error = clip(current_kl / target − 1, −0.2, 0.2);
    /// value *= 1 + proportional_error · n_steps / horizon.
    pub fn update(&mut self, current_kl: f64, n_steps: usize) {
        let proportional_error = (current_kl / self.target - 1.0).clamp(-0.2, 0.2);
        self.value *= 1.0 + proportional_error * n_steps as f64 / self.horizon;
    }
}

/// What the clipped surrogate reports, all over valid tokens.
#[derive(Debug, Clone, Copy, Default)]
pub struct PolicyStats {
    /// Fraction of valid tokens where the clipped term was chosen (l2 > l1).
    pub clipfrac: f64,
    /// ½ · mean((new_logp − old_logp)²).
    pub approxkl: f64,
    /// Mean of the probability ratio.
    pub ratio_mean: f64,
    /// Unbiased variance of the probability ratio (as TRL's `masked_var`).
    pub ratio_var: f64,
}

/// Σ(x·mask) / max(Σmask, 1): masked mean of a tensor that keeps the graph; 0 for no valid token.
// x, mask: (rows, T) -> scalar
fn masked_mean(x: &Tensor, mask: &Tensor, n_valid: f64) -> candle_core::Result<Tensor> {
    (x * mask)?.sum_all()? / n_valid.max(1.0)
}

/// Values of the valid tokens of a (detached) tensor, as one ragged row for the host statistics.
// x, mask: (rows, T) -> n_valid values
fn valid_values(x: &Tensor, mask: &[f32]) -> candle_core::Result<Vec<f32>> {
    let x = x
        .detach()
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    Ok(x.into_iter()
        .zip(mask)
        .filter(|(_, &m)| m > 0.0)
        .map(|(v, _)| v)
        .collect())
}

/// PPO's clipped policy loss (TRL) on padded tensors with `mask` 1.0 for valid tokens and 0.0
/// for padding: ratio = exp(new_logp − old_logp); l1 = −adv·ratio;
/// l2 = −adv·clamp(ratio, 1 − cliprange, 1 + cliprange); loss = masked_mean(max(l1, l2)), the mean
/// over all valid tokens of the batch, a scalar that backpropagates into `new_logp` (through l1
/// where it is chosen, ties included; clipped tokens give no gradient). With no valid token the
/// loss is 0. Padding values must be finite (they are multiplied by 0).
///
/// The statistics are computed on detached values in f64: clipfrac = masked_mean(l2 > l1),
/// approxkl = ½·masked_mean((new_logp − old_logp)²), ratio mean and unbiased ratio variance.
// new_logp, old_logp, advantages, mask: (rows, T) -> (scalar loss, stats)
pub fn clipped_policy_loss(
    new_logp: &Tensor,
    old_logp: &Tensor,
    advantages: &Tensor,
    mask: &Tensor,
    cliprange: f64,
) -> candle_core::Result<(Tensor, PolicyStats)> {
    let dtype = new_logp.dtype();
    let mask = mask.to_dtype(dtype)?;
    let mask_host = mask.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let n_valid = mask_host.iter().map(|&m| m as f64).sum::<f64>();
    // Zeroing the padded log-ratio keeps exp() there at 1 whatever the padding holds.
    let logratio = ((new_logp - old_logp.to_dtype(dtype)?)? * &mask)?; // (rows, T)
    let ratio = logratio.exp()?; // (rows, T)
    let neg_adv = advantages.to_dtype(dtype)?.neg()?; // (rows, T)
    let l1 = (&neg_adv * &ratio)?;
    let l2 = (&neg_adv * ratio.clamp(1.0 - cliprange, 1.0 + cliprange)?)?;
    let clipped = l2.gt(&l1)?; // (rows, T) u8
    let loss = masked_mean(&clipped.where_cond(&l2, &l1)?, &mask, n_valid)?;

    let clipped_host = valid_values(&clipped.to_dtype(DType::F32)?, &mask_host)?;
    let logratio_host = valid_values(&logratio, &mask_host)?;
    let ratio_host = [valid_values(&ratio, &mask_host)?];
    let n = n_valid.max(1.0);
    let stats = PolicyStats {
        clipfrac: clipped_host.iter().map(|&c| c as f64).sum::<f64>() / n,
        approxkl: 0.5
            * logratio_host
                .iter()
                .map(|&d| (d as f64).powi(2))
                .sum::<f64>()
            / n,
        ratio_mean: ragged_mean(&ratio_host),
        ratio_var: ragged_var(&ratio_host, true),
    };
    Ok((loss, stats))
}

/// PPO's clipped value loss (TRL): vclip = old_values + clamp(vpred − old_values, −c, c);
/// loss = ½·masked_mean(max((vpred − returns)², (vclip − returns)²)), a scalar that
/// backpropagates into `vpred` (0 with no valid token); also returns
/// clipfrac = masked_mean((vclip − returns)² > (vpred − returns)²), computed detached.
// vpred, old_values, returns, mask: (rows, T) -> (scalar loss, clipfrac)
pub fn clipped_value_loss(
    vpred: &Tensor,
    old_values: &Tensor,
    returns: &Tensor,
    mask: &Tensor,
    cliprange_value: f64,
) -> candle_core::Result<(Tensor, f64)> {
    let dtype = vpred.dtype();
    let mask = mask.to_dtype(dtype)?;
    let mask_host = mask.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let n_valid = mask_host.iter().map(|&m| m as f64).sum::<f64>();
    let old_values = old_values.to_dtype(dtype)?;
    let returns = returns.to_dtype(dtype)?;
    let delta = (vpred - &old_values)?.clamp(-cliprange_value, cliprange_value)?;
    let vclip = (&old_values + delta)?; // (rows, T)
    let f1 = (vpred - &returns)?.sqr()?;
    let f2 = (vclip - &returns)?.sqr()?;
    let clipped = f2.gt(&f1)?; // (rows, T) u8
    let loss = (masked_mean(&clipped.where_cond(&f2, &f1)?, &mask, n_valid)? * 0.5)?;
    let clipped_host = valid_values(&clipped.to_dtype(DType::F32)?, &mask_host)?;
    let clipfrac = clipped_host.iter().map(|&c| c as f64).sum::<f64>() / n_valid.max(1.0);
    Ok((loss, clipfrac))
}

/// Llama 2's combination of a helpfulness and a safety reward model (Touvron et al. 2023,
/// §3.2.2): with p = sigmoid(raw score), R_c = p_safety if the prompt is tagged as a safety
/// prompt or p_safety < `threshold` (0.15 in the paper), else p_helpful. Returns logit(R_c) per
/// sequence and whether safety was chosen. Since logit(sigmoid(s)) = s, logit(R_c) is the raw
/// score of the chosen model, returned as is (no round trip, no precision loss). The caller
/// whitens the result across the batch with [`whiten_flat`].
///
/// Panics if the three slices differ in length (a programming error of the caller).
pub fn llama2_combine(
    helpful: &[f32],
    safety: &[f32],
    is_safety_prompt: &[bool],
    threshold: f64,
) -> (Vec<f32>, Vec<bool>) {
    assert_eq!(
        helpful.len(),
        safety.len(),
        "llama2_combine: helpful and safety differ in length"
    );
    assert_eq!(
        helpful.len(),
        is_safety_prompt.len(),
        "llama2_combine: scores and is_safety_prompt differ in length"
    );
    helpful
        .iter()
        .zip(safety)
        .zip(is_safety_prompt)
        .map(|((&h, &s), &tagged)| {
            let p_safety = 1.0 / (1.0 + (-(s as f64)).exp());
            let use_safety = tagged || p_safety < threshold;
            (if use_safety { s } else { h }, use_safety)
        })
        .unzip()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn close(a: f64, b: f64, tol: f64) {
        assert!((a - b).abs() <= tol, "{a} != {b} (tol {tol})");
    }
    fn scalar(t: &Tensor) -> f64 {
        t.to_scalar::<f32>().unwrap() as f64
    }
    fn grad_of(loss: &Tensor, x: &Var) -> Vec<Vec<f32>> {
        let grads = loss.backward().unwrap();
        grads.get(x.as_tensor()).unwrap().to_vec2::<f32>().unwrap()
    }
    fn close_rows(a: &[Vec<f32>], b: &[&[f64]], tol: f64) {
        assert_eq!(a.len(), b.len());
        for (ra, rb) in a.iter().zip(b) {
            assert_eq!(ra.len(), rb.len());
            ra.iter()
                .zip(rb.iter())
                .for_each(|(&x, &y)| close(x as f64, y, tol));
        }
    }

    // Expected numbers are worked out by hand in the comments and cross-checked with a short
    // numpy transcription of TRL's formulas (written for these tests, quoted where used):
    //   def masked_mean(x, m): return (x*m).sum()/m.sum()
    //   def masked_var(x, m, unbiased=True):
    //       mu = masked_mean(x, m); v = masked_mean((x-mu)**2, m)
    //       if unbiased: n = m.sum(); v = v*n/(n-1)
    //       return v
    //   def masked_whiten(x, m, shift_mean=True):
    //       mu, v = masked_mean(x, m), masked_var(x, m); w = (x-mu)/np.sqrt(v+1e-8)
    //       return w if shift_mean else w+mu

    #[test]
    fn mean_var_whiten_match_trl() {
        // rows [[1,2,3],[4]]: mean 2.5; deviations ±1.5, ±0.5: Σd² = 5; population 5/4,
        // unbiased 5/3; sqrt(5/3 + 1e-8) = 1.2909944526. numpy masked_whiten ->
        // [-1.1618950004, -0.3872983335, 0.3872983335, 1.1618950004]; + 2.5 when !shift_mean.
        const W: [f64; 4] = [-1.1618950004, -0.3872983335, 0.3872983335, 1.1618950004];
        let x = vec![vec![1.0, 2.0, 3.0], vec![4.0]];
        close(ragged_mean(&x), 2.5, 1e-12);
        close(ragged_var(&x, false), 1.25, 1e-12);
        close(ragged_var(&x, true), 5.0 / 3.0, 1e-12);
        close_rows(&whiten(&x, true), &[&W[..3], &W[3..]], 1e-6);
        let shifted: Vec<f64> = W.iter().map(|w| w + 2.5).collect();
        close_rows(&whiten(&x, false), &[&shifted[..3], &shifted[3..]], 1e-6);
        close_rows(&[whiten_flat(&[1.0, 2.0, 3.0, 4.0], true)], &[&W], 1e-6);
        close_rows(
            &[whiten_flat(&[1.0, 2.0, 3.0, 4.0], false)],
            &[&shifted],
            1e-6,
        );
        // Degenerate sizes: documented 0.0.
        assert_eq!(ragged_mean(&[]), 0.0);
        assert_eq!(ragged_var(&[vec![3.0]], true), 0.0);
        assert_eq!(ragged_var(&[vec![3.0]], false), 0.0);
    }

    #[test]
    fn gae_ragged_rows_gamma1_lam095() {
        // Row A r=[0,0,1], v=[.5,.6,.7]: t=2 δ=1+0-.7=.3, a=.3; t=1 δ=0+.7-.6=.1, a=.1+.95·.3=.385;
        // t=0 δ=0+.6-.5=.1, a=.1+.95·.385=.46575; returns a+v = [.96575,.985,1].
        // Row B r=[2], v=[.3]: δ=2-.3=1.7, return 2. (numpy TRL-style loop gives the same.)
        let (adv, ret) = gae(
            &[vec![0.0, 0.0, 1.0], vec![2.0]],
            &[vec![0.5, 0.6, 0.7], vec![0.3]],
            1.0,
            0.95,
        );
        close_rows(&adv, &[&[0.46575, 0.385, 0.3], &[1.7]], 1e-6);
        close_rows(&ret, &[&[0.96575, 0.985, 1.0], &[2.0]], 1e-6);
    }

    #[test]
    fn gae_lam1_is_discounted_return_minus_value() {
        // λ=1: a_t = G_t − v_t. r=[1,0,2], γ=.9: G2=2, G1=.9·2=1.8, G0=1+.9·1.8=2.62;
        // v=[.5,-.2,.4] -> a=[2.12, 2.0, 1.6]; returns = G.
        let (adv, ret) = gae(&[vec![1.0, 0.0, 2.0]], &[vec![0.5, -0.2, 0.4]], 0.9, 1.0);
        close_rows(&adv, &[&[2.12, 2.0, 1.6]], 1e-6);
        close_rows(&ret, &[&[2.62, 1.8, 2.0]], 1e-6);
    }

    #[test]
    #[should_panic(expected = "differ in length")]
    fn gae_rejects_mismatched_rows() {
        gae(&[vec![1.0, 2.0]], &[vec![1.0]], 1.0, 1.0);
    }

    #[test]
    fn kl_estimators() {
        use KlEstimator::*;
        // logp=-1, ref=-1.5: d=.5; k1=.5; k2=.125; r=exp(-.5)=.6065306597, k3=(r-1)+.5=.1065306597.
        close(K1.per_token(-1.0, -1.5) as f64, 0.5, 1e-7);
        close(K2.per_token(-1.0, -1.5) as f64, 0.125, 1e-7);
        close(K3.per_token(-1.0, -1.5) as f64, 0.10653065971263342, 1e-7);
        // logp=-2, ref=-1: k1=-1 (negative), k2=.5, r=e, k3=e-1-1=.7182818285 (≥ 0).
        close(K1.per_token(-2.0, -1.0) as f64, -1.0, 1e-7);
        close(K2.per_token(-2.0, -1.0) as f64, 0.5, 1e-7);
        close(K3.per_token(-2.0, -1.0) as f64, 0.7182818284590451, 1e-6);
        for (a, b) in [(-0.3, -0.3), (-5.0, -0.01), (-0.01, -5.0), (-1.0, -1.0001)] {
            assert!(K3.per_token(a, b) >= 0.0);
            assert!(K2.per_token(a, b) >= 0.0);
        }
        assert_eq!(K3.per_token(-0.7, -0.7), 0.0);
        assert_eq!("k3".parse::<KlEstimator>(), Ok(K3));
        assert_eq!("K1".parse::<KlEstimator>(), Ok(K1));
        assert!("k4"
            .parse::<KlEstimator>()
            .unwrap_err()
            .contains("k1, k2, k3"));
        assert_eq!(serde_json::to_string(&K2).unwrap(), "\"k2\"");
    }

    #[test]
    fn adaptive_kl_updates_and_clips() {
        let after = |kl: f64| {
            let mut c = AdaptiveKl {
                value: 0.1,
                target: 6.0,
                horizon: 10000.0,
            };
            c.update(kl, 256);
            c.value
        };
        // 6.6/6-1 = .1; mult = 1+.1·256/10000 = 1.00256 -> .100256.
        close(after(6.6), 0.100256, 1e-12);
        // 12/6-1 = 1 -> clipped to .2; mult 1.00512 -> .100512.
        close(after(12.0), 0.100512, 1e-12);
        // 0/6-1 = -1 -> clipped to -.2; mult .99488 -> .099488.
        close(after(0.0), 0.099488, 1e-12);
    }

    /// (rows=2, T=3) batch; the last token of row 1 is padding with wild values.
    fn policy_batch(dev: &Device) -> (Var, Tensor, Tensor, Tensor) {
        let old = [[-1.0f32, -2.0, -0.5], [-1.2, -0.7, -3.0]];
        let dl = [[0.1f32, 0.5, -0.5], [-0.3, 0.2, 5.0]];
        let new: Vec<f32> = (0..6)
            .map(|i| old[i / 3][i % 3] + dl[i / 3][i % 3])
            .collect();
        let new = Var::from_tensor(&Tensor::from_vec(new, (2, 3), dev).unwrap()).unwrap();
        let old = Tensor::new(&old, dev).unwrap();
        let adv = Tensor::new(&[[1.0f32, 2.0, -1.0], [0.5, -1.5, 100.0]], dev).unwrap();
        let mask = Tensor::new(&[[1.0f32, 1.0, 1.0], [1.0, 1.0, 0.0]], dev).unwrap();
        (new, old, adv, mask)
    }

    #[test]
    fn clipped_policy_loss_values_and_gradient() {
        // cliprange .2. Per valid token (ratio = e^Δ; l1 = -A·ratio; l2 = -A·clip(ratio,.8,1.2)):
        //  Δ=.1,  A=1:    ratio 1.1051709181, l1=l2=-1.1051709181, unclipped
        //  Δ=.5,  A=2:    ratio 1.6487212707, l1=-3.2974425, l2=-2.4 -> -2.4, clipped
        //  Δ=-.5, A=-1:   ratio 0.6065306597, l1=.6065306597, l2=.8 -> .8, clipped
        //  Δ=-.3, A=.5:   ratio 0.7408182207, l1=-.3704091103, l2=-.4 -> l1, unclipped
        //  Δ=.2,  A=-1.5: ratio 1.2214027582, l1=1.8321041373, l2=1.8 -> l1, unclipped
        // loss = (-1.1051709181-2.4+.8-.3704091103+1.8321041373)/5 = -.2486951782;
        // clipfrac 2/5; approxkl = .5·(.01+.25+.25+.09+.04)/5 = .064;
        // numpy (old, dl, adv, m: the arrays of policy_batch):
        //   new = old+dl; ratio = np.exp(new-old); l1 = -adv*ratio; l2 = -adv*np.clip(ratio,.8,1.2)
        //   masked_mean(np.maximum(l1,l2), m) = -0.2486951782352503
        //   masked_mean(ratio, m) = 1.0645287654660593; masked_var(ratio, m) = 0.17052322475062298
        //   np.where(l2>l1, 0, -adv*ratio)*m/m.sum() gives the gradient below.
        // Gradient: -A·ratio/5 on unclipped tokens, 0 on clipped and padding:
        //  [[-.2210341836, 0, 0], [-.0740818221, .3664208274, 0]].
        let dev = Device::Cpu;
        let (new, old, adv, mask) = policy_batch(&dev);
        let (loss, stats) = clipped_policy_loss(new.as_tensor(), &old, &adv, &mask, 0.2).unwrap();
        close(scalar(&loss), -0.2486951782352503, 1e-6);
        close(stats.clipfrac, 0.4, 1e-12);
        close(stats.approxkl, 0.064, 1e-6);
        close(stats.ratio_mean, 1.0645287654660593, 1e-6);
        close(stats.ratio_var, 0.17052322475062298, 1e-6);
        close_rows(
            &grad_of(&loss, &new),
            &[
                &[-0.2210341836, 0.0, 0.0],
                &[-0.0740818221, 0.3664208274, 0.0],
            ],
            1e-6,
        );
    }

    #[test]
    fn clipped_policy_loss_empty_mask_is_zero() {
        let dev = Device::Cpu;
        let (new, old, adv, _) = policy_batch(&dev);
        let mask = Tensor::zeros((2, 3), DType::F32, &dev).unwrap();
        let (loss, stats) = clipped_policy_loss(new.as_tensor(), &old, &adv, &mask, 0.2).unwrap();
        assert_eq!(scalar(&loss), 0.0);
        assert_eq!(stats.clipfrac, 0.0);
    }

    #[test]
    fn clipped_value_loss_values() {
        // c = .2; vclip = old + clip(vpred-old, -.2, .2); f1=(vpred-R)², f2=(vclip-R)²:
        //  vpred 1,  old .5,  R 1.5: vclip .7,  f1 .25, f2 .64  -> .64, clipped
        //  vpred 0,  old .3,  R -1:  vclip .1,  f1 1,   f2 1.21 -> 1.21, clipped
        //  vpred 2,  old 1,   R 0:   vclip 1.2, f1 4,   f2 1.44 -> 4
        //  vpred .5, old .45, R 0:   vclip .5,  f1 .25, f2 .25  -> .25
        //  (padding vpred 9 ignored). loss = .5·(.64+1.21+4+.25)/4 = .7625; clipfrac 2/4.
        let dev = Device::Cpu;
        let vpred = Var::new(&[[1.0f32, 0.0, 2.0], [0.5, 9.0, 0.0]], &dev).unwrap();
        let old = Tensor::new(&[[0.5f32, 0.3, 1.0], [0.45, 0.0, 0.0]], &dev).unwrap();
        let ret = Tensor::new(&[[1.5f32, -1.0, 0.0], [0.0, 0.0, 0.0]], &dev).unwrap();
        let mask = Tensor::new(&[[1.0f32, 1.0, 1.0], [1.0, 0.0, 0.0]], &dev).unwrap();
        let (loss, clipfrac) =
            clipped_value_loss(vpred.as_tensor(), &old, &ret, &mask, 0.2).unwrap();
        close(scalar(&loss), 0.7625, 1e-6);
        close(clipfrac, 0.5, 1e-12);
        // d loss/d vpred = (vpred-R)/4 where f1 is chosen, 0 where the clipped term is (its vclip
        // is constant in vpred there) or padding: [[0, 0, .5], [.125, 0, 0]].
        close_rows(
            &grad_of(&loss, &vpred),
            &[&[0.0, 0.0, 0.5], &[0.125, 0.0, 0.0]],
            1e-6,
        );
    }

    #[test]
    fn llama2_combine_picks_safety_or_helpful() {
        // Row 0: tagged safety -> safety score 3.0. Row 1: sigmoid(-2) = .1192 < .15 -> safety -2.0.
        // Row 2: sigmoid(1) = .7311 >= .15, untagged -> helpful .5.
        let (r, s) = llama2_combine(
            &[1.0, 2.0, 0.5],
            &[3.0, -2.0, 1.0],
            &[true, false, false],
            0.15,
        );
        assert_eq!(r, vec![3.0, -2.0, 0.5]);
        assert_eq!(s, vec![true, true, false]);
    }
}
