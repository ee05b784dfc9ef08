//! ReST, Reinforced Self-Training (Gulcehre et al. 2023): a **Grow** step samples N
//! completions per prompt from the current policy and scores them; **Improve** steps then
//! filter that data with rising thresholds τ1 < τ2 < … and fine-tune with the SFT loss, each
//! Improve step starting from the previous one's weights, so the policy is trained on ever
//! better subsets of the same samples. The next Grow step samples from the last Improve
//! step's policy.
//!
//! `thresholds` are reward values (`threshold_type = "value"`, the paper's setting with a
//! reward model scaled to [0, 1]) or quantiles of each Grow step's scores
//! (`threshold_type = "quantile"`, for a reward model of unknown scale: 0.5 keeps the better
//! half). `output_dir/grow-g/` holds `samples.jsonl`; `output_dir/grow-g/improve-k/` the
//! step's `filtered.jsonl`, policy and SFT logs; `output_dir` the final policy and
//! `metrics.jsonl` with one line per Improve step (`rest/threshold`, `rest/kept_fraction`,
//! `rest/mean_kept_reward`, and the Grow step's reward statistics).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::{self, TrainingArgs};
use crate::rejection_sampling::{parse_sampling_method, sampling_method_keys};
use crate::sampling::{self, Round, Sample, SamplingArgs, Steps};
use crate::scoring::ScorerSpec;
use crate::trainer::Summary;
use crate::{Error, Result};

/// ReST's own keys.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct RestArgs {
    /// Grow steps (each followed by one Improve step per threshold).
    pub grow_steps: usize,
    /// τ1 < τ2 < …: one Improve step each.
    pub thresholds: Vec<f64>,
    /// "value" (reward values) or "quantile" (of each Grow step's scores, in [0, 1)).
    pub threshold_type: String,
}

impl Default for RestArgs {
    fn default() -> Self {
        Self {
            grow_steps: 1,
            thresholds: Vec::new(),
            threshold_type: "value".into(),
        }
    }
}

const REST_KEYS: &[&str] = &["grow_steps", "thresholds", "threshold_type"];

impl RestArgs {
    fn validate(&self) -> std::result::Result<(), String> {
        if self.grow_steps == 0 {
            return Err("\"grow_steps\" must be at least 1, found 0".into());
        }
        if self.thresholds.is_empty() {
            return Err(
                "\"thresholds\" must be rising reward thresholds, one Improve step each \
                 (e.g. [0.0, 0.5, 1.0], or with threshold_type = \"quantile\" [0.5, 0.7, 0.9]), \
                 found none"
                    .into(),
            );
        }
        if let Some(x) = self.thresholds.iter().find(|x| !x.is_finite()) {
            return Err(format!("\"thresholds\" must be finite numbers, found {x}"));
        }
        if self.thresholds.windows(2).any(|w| w[1] <= w[0]) {
            return Err(format!(
                "\"thresholds\" must rise (ReST's τ1 < τ2 < …), found {:?}",
                self.thresholds
            ));
        }
        match self.threshold_type.as_str() {
            "value" => Ok(()),
            "quantile" => match self.thresholds.iter().find(|&&q| !(0.0..1.0).contains(&q)) {
                Some(q) => Err(format!(
                    "\"thresholds\" must be quantiles in [0, 1) with threshold_type = \
                     \"quantile\" (1 would keep nothing), found {q}"
                )),
                None => Ok(()),
            },
            other => Err(format!(
                "\"threshold_type\" must be \"value\" or \"quantile\", found {other:?}"
            )),
        }
    }
}

/// A parsed ReST config.
#[derive(Debug, Clone)]
pub struct RestConfig {
    /// Shared training arguments (`train_file` holds the prompts; the optimiser keys drive
    /// each Improve step).
    pub args: TrainingArgs,
    /// How the Grow steps sample (`num_samples` is the paper's N).
    pub sampling: SamplingArgs,
    /// Grow steps and thresholds.
    pub rest: RestArgs,
    /// What scores the samples.
    pub scorer: ScorerSpec,
    /// LoRA on the policy, carried from step to step.
    pub lora: Option<rlhf_model::lora::LoraConfig>,
}

impl RestConfig {
    /// Reads `path` with `--set` overrides.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        let mut table = config::load_table(path, overrides, &sampling_method_keys(REST_KEYS))?;
        Self::from_table(path, &mut table)
    }

    /// Builds the config from an already checked table (a pipeline stage).
    pub fn from_table(path: &Path, table: &mut toml::Table) -> Result<Self> {
        let (args, sampling, own, scorer, lora) = parse_sampling_method(path, table, REST_KEYS)?;
        let rest: RestArgs = config::parse(path, own)?;
        rest.validate()
            .map_err(|m| Error::Config(format!("{}: {m}", path.display())))?;
        Ok(Self {
            args,
            sampling,
            rest,
            scorer,
            lora,
        })
    }
}

/// The reward a threshold stands for: itself, or that quantile of `scores` (linear
/// interpolation, numpy's default).
pub fn threshold_value(threshold: f64, kind: &str, scores: &[f32]) -> f64 {
    if kind != "quantile" {
        return threshold;
    }
    let mut v: Vec<f64> = scores
        .iter()
        .filter(|x| x.is_finite())
        .map(|&x| x as f64)
        .collect();
    if v.is_empty() {
        return f64::INFINITY;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let pos = threshold * (v.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    v[lo] + (v[hi] - v[lo]) * (pos - lo as f64)
}

/// The samples scoring at least `tau` (finite scores only), in file order.
pub fn filter(samples: &[Sample], tau: f64) -> Vec<&Sample> {
    samples
        .iter()
        .filter(|s| s.score.is_finite() && s.score as f64 >= tau)
        .collect()
}

fn grow_dir(out: &Path, g: usize) -> PathBuf {
    out.join(format!("grow-{g}"))
}

fn improve_dir(out: &Path, g: usize, k: usize) -> PathBuf {
    grow_dir(out, g).join(format!("improve-{k}"))
}

/// `rlhf rest --config FILE [--set k=v]... [--resume]`.
pub fn run(
    config_path: &Path,
    overrides: &[String],
    resume: Option<Option<&Path>>,
) -> Result<Summary> {
    let cfg = RestConfig::load(config_path, overrides)?;
    run_config(cfg, resume.is_some())
}

/// Runs a parsed config; `resume` continues the steps already in `output_dir`.
pub fn run_config(cfg: RestConfig, resume: bool) -> Result<Summary> {
    // Before anything is written: not into the model, the lock, no other run's rounds.
    let _lock = crate::outdir::prepare_run(&cfg.args, &[], resume)?;
    let out = cfg.args.output_dir.clone();
    let n_improve = cfg.rest.thresholds.len();
    // Every (grow, improve) step in order.
    let steps: Vec<(usize, usize)> = (1..=cfg.rest.grow_steps)
        .flat_map(|g| (1..=n_improve).map(move |k| (g, k)))
        .collect();
    let dirs: Vec<PathBuf> = steps
        .iter()
        .map(|&(g, k)| improve_dir(&out, g, k))
        .collect();
    let mut run = Steps::open(
        &cfg.args,
        cfg.lora.as_ref(),
        &cfg.scorer,
        &cfg.sampling,
        &dirs,
        resume,
    )?;
    let mut grown: Option<(usize, Vec<Sample>)> = None;
    for (n, &(g, k)) in steps.iter().enumerate().skip(run.done) {
        if grown.as_ref().is_none_or(|(at, _)| *at != g) {
            tracing::info!(
                "grow {g}/{}: {} samples for each of {} prompts",
                cfg.rest.grow_steps,
                cfg.sampling.num_samples,
                run.prompts.len()
            );
            let samples = run.sample(
                &Round {
                    round: g,
                    args: &cfg.sampling,
                    seed: cfg.args.seed,
                    stop_after_batches: None,
                },
                &grow_dir(&out, g).join("samples.jsonl"),
            )?;
            grown = Some((g, samples));
        }
        let samples = &grown.as_ref().expect("grown above").1;
        let dir = &dirs[n];
        let scores: Vec<f32> = samples.iter().map(|s| s.score).collect();
        let tau = threshold_value(
            cfg.rest.thresholds[k - 1],
            &cfg.rest.threshold_type,
            &scores,
        );
        let kept = filter(samples, tau);
        sampling::write_samples(&dir.join("filtered.jsonl"), kept.iter().copied())?;
        let mut m = sampling::sample_metrics(samples, "rest");
        m.insert("rest/grow_step".into(), g as f64);
        m.insert("rest/improve_step".into(), k as f64);
        m.insert("rest/threshold".into(), tau);
        m.insert(
            "rest/kept_fraction".into(),
            kept.len() as f64 / samples.len().max(1) as f64,
        );
        m.insert("rest/kept".into(), kept.len() as f64);
        if kept.is_empty() {
            tracing::warn!(
                "grow {g} improve {k}: no sample reaches the threshold {tau:.4}; the step \
                 trains nothing (lower `thresholds`, or use threshold_type = \"quantile\")"
            );
            run.policy.save(dir)?;
        } else {
            let mean_kept = kept.iter().map(|s| s.score as f64).sum::<f64>() / kept.len() as f64;
            m.insert("rest/mean_kept_reward".into(), mean_kept);
            tracing::info!(
                "grow {g} improve {k}: threshold {tau:.4} keeps {} of {} samples (mean reward \
                 {mean_kept:.4})",
                kept.len(),
                samples.len()
            );
            let sft = run.sft(dir, &kept)?;
            m.insert("rest/sft_train_loss".into(), sft["train_loss"]);
            m.insert("rest/sft_train_runtime".into(), sft["train_runtime"]);
        }
        run.finish(n + 1, dir, m)?;
    }
    run.close(steps.len(), Summary::new())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::tests::sample;

    #[test]
    fn thresholds_filter_by_value_or_quantile() {
        let s: Vec<Sample> = [0.1, 0.9, 0.5, f32::NAN, 0.7]
            .iter()
            .enumerate()
            .map(|(i, &x)| sample(i, 0, 1, x))
            .collect();
        let idx = |v: Vec<&Sample>| v.iter().map(|x| x.prompt_index).collect::<Vec<_>>();
        assert_eq!(idx(filter(&s, 0.5)), vec![1, 2, 4]);
        assert_eq!(idx(filter(&s, 0.8)), vec![1]);
        assert!(filter(&s, 2.0).is_empty());
        let scores: Vec<f32> = s.iter().map(|x| x.score).collect();
        // Finite scores sorted: 0.1 0.5 0.7 0.9; numpy.quantile(.., 0.5) = 0.6.
        assert!((threshold_value(0.5, "quantile", &scores) - 0.6).abs() < 1e-6);
        assert!((threshold_value(0.0, "quantile", &scores) - 0.1).abs() < 1e-6);
        assert_eq!(threshold_value(0.3, "value", &scores), 0.3);
    }

    #[test]
    fn thresholds_must_rise() {
        let a = |t: Vec<f64>, kind: &str| RestArgs {
            grow_steps: 1,
            thresholds: t,
            threshold_type: kind.into(),
        };
        assert!(a(vec![0.1, 0.5], "value").validate().is_ok());
        assert!(a(vec![0.5, 0.5], "value").validate().is_err());
        assert!(a(vec![], "value").validate().is_err());
        assert!(a(vec![0.5, 1.0], "quantile").validate().is_err());
        assert!(a(vec![0.5], "median").validate().is_err());
    }
}
