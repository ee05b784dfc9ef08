//! The statistics `rlhf eval` reports: per-prompt verdicts, AlpacaEval's win-rate columns
//! (win rate, its standard error, counts, average length, the length-controlled win rate),
//! Llama 2's ties-dropped win rate, per-scorer mean and median, and Schulman's k1/k3 estimates
//! of KL(π ‖ π_ref) from per-token log-probs.
//!
//! Win rates are fractions in [0, 1], not AlpacaEval's percentages. Statistics that are
//! undefined for the input (a win rate of no prompts, a standard error of one) are NaN, which
//! serde_json writes as `null`.

use serde::{Deserialize, Serialize};

use crate::rl::KlEstimator;

/// Which answer of a pair a judge preferred.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// The policy's answer is better.
    Policy,
    /// The baseline's answer is better.
    Baseline,
    /// Neither is better.
    Tie,
}

impl Verdict {
    /// AlpacaEval's per-prompt preference for the policy in [0, 1]: 1, 0 or ½ for a tie.
    pub fn preference(self) -> f64 {
        match self {
            Verdict::Policy => 1.0,
            Verdict::Baseline => 0.0,
            Verdict::Tie => 0.5,
        }
    }
}

/// The verdict of a scorer: the higher score wins, scores within `tie_tolerance` of each other
/// tie. A NaN score (a reward program that failed on the row) counts as a tie rather than
/// silently as a loss for one side.
pub fn verdict_from_scores(policy: f64, baseline: f64, tie_tolerance: f64) -> Verdict {
    let diff = policy - baseline;
    if diff.is_nan() || diff.abs() <= tie_tolerance {
        Verdict::Tie
    } else if diff > 0.0 {
        Verdict::Policy
    } else {
        Verdict::Baseline
    }
}

/// AlpacaEval's leaderboard columns for one judge (eval.json's key names), plus Llama 2's
/// win rate.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WinRates {
    /// Mean per-prompt preference, ties counting ½.
    pub win_rate: f64,
    /// Standard error of that mean: sample std (n − 1) / √n, as pandas' `.sem()`; NaN for n < 2.
    pub standard_error: f64,
    /// Prompts the policy won.
    pub n_wins: usize,
    /// Prompts the baseline won.
    pub n_wins_base: usize,
    /// Ties.
    pub n_draws: usize,
    /// Prompts judged.
    pub n_total: usize,
    /// Mean length of the policy's completions, in characters.
    pub avg_length: f64,
    /// The win rate a logistic model of the preferences predicts at zero length difference
    /// (see [`length_controlled_fit`]).
    pub length_controlled_winrate: f64,
    /// wins / (wins + losses), ties dropped (Llama 2's convention); `None` when every prompt
    /// tied.
    pub llama2_win_rate: Option<f64>,
}

/// The win-rate columns of one judge's verdicts. `policy_lens` and `baseline_lens` are the
/// completions' lengths in characters (`str::chars().count()`, as AlpacaEval's `str.len()`),
/// one per verdict.
///
/// Panics if the three slices differ in length (a bug in the caller).
pub fn win_rates(verdicts: &[Verdict], policy_lens: &[usize], baseline_lens: &[usize]) -> WinRates {
    assert_eq!(
        verdicts.len(),
        policy_lens.len(),
        "win_rates: verdicts and policy lengths differ in number"
    );
    assert_eq!(
        verdicts.len(),
        baseline_lens.len(),
        "win_rates: verdicts and baseline lengths differ in number"
    );
    let count = |v: Verdict| verdicts.iter().filter(|&&x| x == v).count();
    let (n_wins, n_wins_base, n_draws) = (
        count(Verdict::Policy),
        count(Verdict::Baseline),
        count(Verdict::Tie),
    );
    let prefs: Vec<f64> = verdicts.iter().map(|v| v.preference()).collect();
    let lens: Vec<f64> = policy_lens.iter().map(|&l| l as f64).collect();
    let delta: Vec<f64> = policy_lens
        .iter()
        .zip(baseline_lens)
        .map(|(&p, &b)| p as f64 - b as f64)
        .collect();
    let decided = n_wins + n_wins_base;
    WinRates {
        win_rate: mean(&prefs),
        standard_error: sample_std(&prefs) / (prefs.len() as f64).sqrt(),
        n_wins,
        n_wins_base,
        n_draws,
        n_total: verdicts.len(),
        avg_length: mean(&lens),
        length_controlled_winrate: length_controlled_fit(&prefs, &delta).winrate,
        llama2_win_rate: (decided > 0).then(|| n_wins as f64 / decided as f64),
    }
}

/// L2 penalty on the length coefficient φ (not on θ). Without it φ has no finite maximum
/// likelihood when the length difference separates wins from losses (the policy wins exactly
/// when it is longer), and Newton's method would run φ to infinity. 0.01 is negligible
/// against the likelihood's curvature once there are more than a handful of prompts, and of
/// the order of AlpacaEval's own penalty (L1 with C = 100, i.e. 0.01·|w|).
pub const LC_PHI_PENALTY: f64 = 0.01;

/// The fitted length-controlled model of one judge's preferences.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LengthFit {
    /// The intercept: the policy's log-odds of winning at zero length difference.
    pub theta: f64,
    /// The coefficient of tanh(Δ / σ_Δ).
    pub phi: f64,
    /// σ(θ): the length-controlled win rate.
    pub winrate: f64,
    /// Newton iterations taken.
    pub iterations: usize,
}

/// AlpacaEval 2's length-controlled win rate, for one pairwise comparison.
///
/// Fits P(policy preferred) = σ(θ + φ·tanh(Δ/σ_Δ)) to the per-prompt preferences `prefs`
/// (1, ½, 0, or any value in [0, 1]) by maximum likelihood with fractional labels (the
/// cross-entropy −p·log P − (1 − p)·log(1 − P), which is what AlpacaEval's duplicated-rows,
/// weighted `LogisticRegression` minimises), where Δ = policy length − baseline length and
/// σ_Δ is the sample std (n − 1, pandas' `.std()`) of Δ over prompts (the feature is 0 when
/// σ_Δ is 0 or undefined). The length-controlled win rate is the model's prediction at Δ = 0,
/// σ(θ).
///
/// Kept from AlpacaEval (`alpaca_eval/metrics/glm_winrate.py`): the feature tanh(Δ/σ_Δ), the
/// fractional-label likelihood, and reading the win rate off the fit at zero length difference.
/// Simplified: AlpacaEval's GLM also has an instruction-difficulty term whose coefficient is
/// fitted jointly across many models on the same 805 instructions (and data from two "gamed"
/// verbose/concise baselines as a regulariser); one pairwise comparison cannot estimate it,
/// so the intercept θ stands alone. AlpacaEval fits with an L1 penalty chosen by 5-fold
/// cross-validation (liblinear); here a fixed L2 penalty [`LC_PHI_PENALTY`] on φ only, and
/// Newton's method (IRLS) with step halving. AlpacaEval's Δ is baseline − model; ours is
/// policy − baseline, which only flips φ's sign.
///
/// When every preference is 1 (or every one 0) θ has no finite optimum; the win rate is then
/// that value, 1 (or 0), whatever the lengths. NaN for no prompts.
///
/// Panics if `prefs` and `delta` differ in length.
pub fn length_controlled_fit(prefs: &[f64], delta: &[f64]) -> LengthFit {
    assert_eq!(
        prefs.len(),
        delta.len(),
        "length_controlled_fit: preferences and length differences differ in number"
    );
    // logit of the win rate: ±∞ for 1 and 0, NaN for no prompts.
    let degenerate = |w: f64| LengthFit {
        theta: (w / (1.0 - w)).ln(),
        phi: 0.0,
        winrate: w,
        iterations: 0,
    };
    if prefs.is_empty() {
        return degenerate(f64::NAN);
    }
    if prefs.iter().all(|&p| p == 1.0) || prefs.iter().all(|&p| p == 0.0) {
        return degenerate(prefs[0]);
    }
    let sd = sample_std(delta);
    let x: Vec<f64> = if sd > 0.0 {
        delta.iter().map(|d| (d / sd).tanh()).collect()
    } else {
        vec![0.0; delta.len()]
    };
    let (mut theta, mut phi) = (0.0f64, 0.0f64);
    let mut loss = lc_loss(prefs, &x, theta, phi);
    let mut iterations = 0;
    for _ in 0..100 {
        iterations += 1;
        // Gradient and Hessian of the penalised cross-entropy in (θ, φ).
        let (mut g0, mut g1, mut h00, mut h01, mut h11) =
            (0.0, LC_PHI_PENALTY * phi, 0.0, 0.0, 0.0);
        for (&p, &xi) in prefs.iter().zip(&x) {
            let q = sigmoid(theta + phi * xi);
            let w = q * (1.0 - q);
            g0 += q - p;
            g1 += (q - p) * xi;
            h00 += w;
            h01 += w * xi;
            h11 += w * xi * xi;
        }
        h11 += LC_PHI_PENALTY;
        let det = h00 * h11 - h01 * h01;
        if det.is_nan() || det <= 0.0 {
            break;
        }
        let step0 = (h11 * g0 - h01 * g1) / det;
        let step1 = (h00 * g1 - h01 * g0) / det;
        // The loss is convex, but a full Newton step from far away can overshoot: halve it
        // until the loss does not grow.
        let mut t = 1.0;
        let (mut next_theta, mut next_phi, mut next_loss);
        loop {
            next_theta = theta - t * step0;
            next_phi = phi - t * step1;
            next_loss = lc_loss(prefs, &x, next_theta, next_phi);
            if next_loss <= loss || t < 1e-10 {
                break;
            }
            t *= 0.5;
        }
        let moved = (next_theta - theta).abs().max((next_phi - phi).abs());
        (theta, phi, loss) = (next_theta, next_phi, next_loss);
        if moved < 1e-12 {
            break;
        }
    }
    LengthFit {
        theta,
        phi,
        winrate: sigmoid(theta),
        iterations,
    }
}

/// Σ −p·log σ(z) − (1 − p)·log σ(−z) + ½λφ², z = θ + φx; log σ through softplus so that
/// confident fits do not round to log 0.
fn lc_loss(prefs: &[f64], x: &[f64], theta: f64, phi: f64) -> f64 {
    let ce: f64 = prefs
        .iter()
        .zip(x)
        .map(|(&p, &xi)| {
            let z = theta + phi * xi;
            p * softplus(-z) + (1.0 - p) * softplus(z)
        })
        .sum();
    ce + 0.5 * LC_PHI_PENALTY * phi * phi
}

/// log(1 + eᶻ) without overflow.
fn softplus(z: f64) -> f64 {
    z.max(0.0) + (-z.abs()).exp().ln_1p()
}

fn sigmoid(z: f64) -> f64 {
    1.0 / (1.0 + (-z).exp())
}

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len() as f64
}

/// Sample standard deviation (n − 1); NaN for fewer than two values, as pandas.
fn sample_std(xs: &[f64]) -> f64 {
    if xs.len() < 2 {
        return f64::NAN;
    }
    let m = mean(xs);
    (xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (xs.len() - 1) as f64).sqrt()
}

/// Mean and median of a scorer's scores (the median of an even count is the mean of the two
/// middle values); (NaN, NaN) for none.
pub fn mean_median(xs: &[f64]) -> (f64, f64) {
    if xs.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let mut sorted = xs.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    let median = if n % 2 == 1 {
        sorted[n / 2]
    } else {
        0.5 * (sorted[n / 2 - 1] + sorted[n / 2])
    };
    (mean(xs), median)
}

/// Estimates of KL(π ‖ π_ref) per completion from completions sampled from π: `logprobs` and
/// `ref_logprobs` hold, per completion, log π and log π_ref of each of its tokens. Returns the
/// mean over completions of the per-completion sums of Schulman's k1 = log π − log π_ref
/// (unbiased, can be negative) and k3 = eʳ − 1 − r with r = log π_ref − log π (unbiased,
/// ≥ 0), the per-token values being [`KlEstimator::per_token`]'s. (NaN, NaN) for no
/// completions.
///
/// Panics if the two differ in number of completions or in any completion's length.
pub fn kl_estimates(logprobs: &[Vec<f32>], ref_logprobs: &[Vec<f32>]) -> (f64, f64) {
    assert_eq!(
        logprobs.len(),
        ref_logprobs.len(),
        "kl_estimates: logprobs and ref_logprobs differ in completions"
    );
    let (mut k1, mut k3) = (0.0f64, 0.0f64);
    for (i, (lp, rlp)) in logprobs.iter().zip(ref_logprobs).enumerate() {
        assert_eq!(
            lp.len(),
            rlp.len(),
            "kl_estimates: completion {i}: logprobs and ref_logprobs differ in length"
        );
        for (&a, &b) in lp.iter().zip(rlp) {
            k1 += KlEstimator::K1.per_token(a, b) as f64;
            k3 += KlEstimator::K3.per_token(a, b) as f64;
        }
    }
    let n = logprobs.len() as f64;
    (k1 / n, k3 / n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol
    }

    #[test]
    fn verdicts_from_scores_respect_the_tolerance_and_nan() {
        assert_eq!(verdict_from_scores(1.0, 0.0, 0.0), Verdict::Policy);
        assert_eq!(verdict_from_scores(0.0, 1.0, 0.0), Verdict::Baseline);
        assert_eq!(verdict_from_scores(1.0, 1.0, 0.0), Verdict::Tie);
        assert_eq!(verdict_from_scores(1.05, 1.0, 0.1), Verdict::Tie);
        assert_eq!(verdict_from_scores(1.0, 1.05, 0.1), Verdict::Tie);
        assert_eq!(verdict_from_scores(1.2, 1.0, 0.1), Verdict::Policy);
        assert_eq!(verdict_from_scores(f64::NAN, 1.0, 0.1), Verdict::Tie);
        assert_eq!(
            serde_json::to_string(&[Verdict::Policy, Verdict::Baseline, Verdict::Tie]).unwrap(),
            r#"["policy","baseline","tie"]"#
        );
    }

    /// 3 wins, 1 loss, 1 tie; equal lengths.
    /// Preferences 1, 1, 1, 0, ½: win rate 3.5/5 = 0.7. Deviations .3, .3, .3, −.7, −.2;
    /// squares sum to .27 + .49 + .04 = .80; sample variance .80/4 = .2; std √.2; SE √.2/√5
    /// = √.04 = 0.2. Llama 2: 3/(3+1) = 0.75. Average length (10+20+30+40+50)/5 = 30.
    /// With equal lengths the feature is 0, so σ(θ) is the mean preference: LC = 0.7.
    #[test]
    fn three_wins_one_loss_one_tie() {
        use Verdict::*;
        let v = [Policy, Policy, Policy, Baseline, Tie];
        let lens = [10, 20, 30, 40, 50];
        let w = win_rates(&v, &lens, &lens);
        assert!(close(w.win_rate, 0.7, 1e-12), "{w:?}");
        assert!(close(w.standard_error, 0.2, 1e-12), "{w:?}");
        assert_eq!(
            (w.n_wins, w.n_wins_base, w.n_draws, w.n_total),
            (3, 1, 1, 5)
        );
        assert!(close(w.avg_length, 30.0, 1e-12));
        assert!(close(w.llama2_win_rate.unwrap(), 0.75, 1e-12));
        assert!(close(w.length_controlled_winrate, 0.7, 1e-9), "{w:?}");
        // θ = logit(0.7) = ln(7/3) = 0.8472978603872037.
        let prefs: Vec<f64> = v.iter().map(|v| v.preference()).collect();
        let fit = length_controlled_fit(&prefs, &[0.0; 5]);
        assert!(close(fit.theta, (7.0f64 / 3.0).ln(), 1e-9), "{fit:?}");
        assert_eq!(fit.phi, 0.0);
        let json = serde_json::to_value(&w).unwrap();
        for key in [
            "win_rate",
            "standard_error",
            "n_wins",
            "n_wins_base",
            "n_draws",
            "n_total",
            "avg_length",
            "length_controlled_winrate",
            "llama2_win_rate",
        ] {
            assert!(
                json.get(key).is_some(),
                "eval.json key {key} missing: {json}"
            );
        }
    }

    /// All ties: Llama 2's rate is undefined; win rate ½, SE 0, LC ½. One prompt: SE is NaN
    /// (pandas' `.sem()` of one value), serialised as null.
    #[test]
    fn degenerate_inputs() {
        let w = win_rates(&[Verdict::Tie; 4], &[1, 2, 3, 4], &[4, 3, 2, 1]);
        assert_eq!(w.llama2_win_rate, None);
        assert!(close(w.win_rate, 0.5, 1e-12));
        assert!(close(w.standard_error, 0.0, 1e-12));
        assert!(close(w.length_controlled_winrate, 0.5, 1e-9), "{w:?}");
        let one = win_rates(&[Verdict::Policy], &[5], &[3]);
        assert!(one.standard_error.is_nan());
        assert_eq!(one.length_controlled_winrate, 1.0);
        let json = serde_json::to_value(&one).unwrap();
        assert!(json["standard_error"].is_null());
        let all_lost = win_rates(&[Verdict::Baseline; 3], &[1, 9, 4], &[5, 5, 5]);
        assert_eq!(all_lost.length_controlled_winrate, 0.0);
        assert_eq!(all_lost.llama2_win_rate, Some(0.0));
    }

    /// Equal lengths: LC is exactly the logistic of the fitted intercept, which is the plain
    /// win rate, whatever the verdicts.
    #[test]
    fn equal_lengths_give_the_plain_win_rate() {
        use Verdict::*;
        let v = [Policy, Baseline, Baseline, Tie, Policy, Baseline, Tie];
        let lens = [7, 70, 700, 5, 50, 500, 1];
        let w = win_rates(&v, &lens, &lens);
        assert!(close(w.win_rate, 3.0 / 7.0, 1e-12));
        assert!(
            close(w.length_controlled_winrate, w.win_rate, 1e-9),
            "{w:?}"
        );
    }

    /// Case A of the reference below: mixed verdicts and lengths.
    /// prefs 1, 0, ½, 1, 1, 0, 1, ½; Δ = 20, −20, 0, 100, 50, −40, −10, 10 (σ_Δ = 44.0576).
    /// Reference (scipy 1.17 BFGS with the analytic gradient, |∇| < 2e-10, on the same
    /// penalised objective: Σ p·softplus(−z) + (1−p)·softplus(z) + 0.005·φ², z = θ + φ·tanh(Δ/σ_Δ)):
    /// θ = 0.4871180868, φ = 3.9362567655, σ(θ) = 0.6194272926.
    #[test]
    fn lc_fit_matches_an_independent_optimiser() {
        use Verdict::*;
        let v = [Policy, Baseline, Tie, Policy, Policy, Baseline, Policy, Tie];
        let pl = [120, 80, 100, 200, 150, 60, 90, 110];
        let bl = [100; 8];
        let prefs: Vec<f64> = v.iter().map(|v| v.preference()).collect();
        let delta: Vec<f64> = pl.iter().map(|&p| p as f64 - 100.0).collect();
        let fit = length_controlled_fit(&prefs, &delta);
        assert!(close(fit.theta, 0.4871180868, 1e-7), "{fit:?}");
        assert!(close(fit.phi, 3.9362567655, 1e-7), "{fit:?}");
        assert!(fit.iterations < 20, "{fit:?}");
        let w = win_rates(&v, &pl, &bl);
        assert!(
            close(w.length_controlled_winrate, 0.6194272926, 1e-8),
            "{w:?}"
        );
        assert!(close(w.win_rate, 0.625, 1e-12));
    }

    /// The policy wins exactly when it is the longer answer (6 longer wins, 2 shorter losses):
    /// the length term explains the wins, so the length-controlled win rate falls below the
    /// raw 0.75. The data are separable, so φ is held finite by the penalty only.
    /// Reference (scipy as above): θ = 0.7609991779, φ = 8.0778577080, σ(θ) = 0.6815706268.
    #[test]
    fn wins_only_when_longer_lower_the_lc_win_rate() {
        use Verdict::*;
        let v = [
            Policy, Policy, Policy, Policy, Policy, Policy, Baseline, Baseline,
        ];
        let pl = [130, 110, 150, 105, 160, 140, 70, 90];
        let bl = [100; 8];
        let w = win_rates(&v, &pl, &bl);
        assert!(close(w.win_rate, 0.75, 1e-12));
        assert!(w.length_controlled_winrate < w.win_rate - 0.05, "{w:?}");
        assert!(
            close(w.length_controlled_winrate, 0.6815706268, 1e-8),
            "{w:?}"
        );
        let prefs: Vec<f64> = v.iter().map(|v| v.preference()).collect();
        let delta: Vec<f64> = pl.iter().map(|&p| p as f64 - 100.0).collect();
        let fit = length_controlled_fit(&prefs, &delta);
        assert!(close(fit.theta, 0.7609991779, 1e-7), "{fit:?}");
        assert!(close(fit.phi, 8.0778577080, 1e-6), "{fit:?}");
    }

    #[test]
    fn mean_and_median() {
        let (m, med) = mean_median(&[3.0, 1.0, 2.0]);
        assert!(close(m, 2.0, 1e-12) && close(med, 2.0, 1e-12));
        let (m, med) = mean_median(&[4.0, 1.0, 10.0, 2.0]);
        assert!(close(m, 4.25, 1e-12) && close(med, 3.0, 1e-12), "{m} {med}");
        assert!(mean_median(&[]).0.is_nan());
    }

    /// Two completions: (logπ, logπ_ref) = (−1, −2), (−0.5, −0.5) and (−2, −1).
    /// k1 per token: 1, 0 | −1 → sums 1 and −1 → mean 0.
    /// k3 per token with r = logπ_ref − logπ: r = −1 → e⁻¹ − 1 + 1 = 0.36787944;
    /// r = 0 → 0 | r = 1 → e − 1 − 1 = 0.71828183 → mean (0.36787944 + 0.71828183)/2
    /// = 0.54308063.
    #[test]
    fn kl_estimates_by_hand() {
        let lp = vec![vec![-1.0f32, -0.5], vec![-2.0]];
        let rlp = vec![vec![-2.0f32, -0.5], vec![-1.0]];
        let (k1, k3) = kl_estimates(&lp, &rlp);
        assert!(close(k1, 0.0, 1e-6), "{k1}");
        assert!(close(k3, 0.54308063, 1e-6), "{k3}");
        let (k1, k3) = kl_estimates(&[], &[]);
        assert!(k1.is_nan() && k3.is_nan());
    }

    /// Completions of 3 tokens drawn i.i.d. from p; both estimators are unbiased for
    /// 3·KL(p ‖ q), so their means land within 4 standard errors of it.
    #[test]
    fn kl_estimates_are_unbiased_for_categoricals() {
        let p = [0.5f64, 0.25, 0.15, 0.1];
        let q = [0.25f64, 0.25, 0.25, 0.25];
        let exact: f64 = 3.0 * p.iter().zip(&q).map(|(p, q)| p * (p / q).ln()).sum::<f64>();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let n = 20_000;
        let (mut lp, mut rlp) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for _ in 0..n {
            let (mut a, mut b) = (Vec::new(), Vec::new());
            for _ in 0..3 {
                let u: f64 = rng.random();
                let mut acc = 0.0;
                let k = p
                    .iter()
                    .position(|&pk| {
                        acc += pk;
                        u < acc
                    })
                    .unwrap_or(p.len() - 1);
                a.push(p[k].ln() as f32);
                b.push(q[k].ln() as f32);
            }
            lp.push(a);
            rlp.push(b);
        }
        let (k1, k3) = kl_estimates(&lp, &rlp);
        // Standard errors from the per-completion sums, computed here from the formulas.
        let se = |f: &dyn Fn(f64, f64) -> f64| {
            let sums: Vec<f64> = lp
                .iter()
                .zip(&rlp)
                .map(|(a, b)| a.iter().zip(b).map(|(&x, &y)| f(x as f64, y as f64)).sum())
                .collect();
            sample_std(&sums) / (n as f64).sqrt()
        };
        let se1 = se(&|l, r| l - r);
        let se3 = se(&|l, r| (r - l).exp() - 1.0 - (r - l));
        assert!(se1 > 0.0 && se3 > 0.0);
        assert!((k1 - exact).abs() < 4.0 * se1, "k1 {k1} vs {exact} ± {se1}");
        assert!((k3 - exact).abs() < 4.0 * se3, "k3 {k3} vs {exact} ± {se3}");
    }
}
