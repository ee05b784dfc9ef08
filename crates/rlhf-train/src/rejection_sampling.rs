//! Llama 2's iterative rejection sampling (Touvron et al. 2023, §3.2.3): each round samples K
//! completions per prompt from the current policy, scores them (a reward model, Llama 2's
//! helpfulness + safety pair, a reward program, or a weighted sum: [`ScorerSpec`]), keeps the
//! best, and fine-tunes the policy on what it kept (the shared loop, loss on completions).
//! Round i samples from round i−1's policy (RLHF-V1..VN). With `pool_previous_iterations`,
//! the best sample of every earlier round competes for a prompt too: Llama 2's fix for the
//! regressions it saw when a round only used its own samples.
//!
//! `output_dir/iteration-i/` holds `samples.jsonl` (every sample with its score),
//! `selected.jsonl`, the round's policy and its SFT logs; `output_dir` itself gets the final
//! policy and `metrics.jsonl` with one line per round (`rs/max_reward@N` and
//! `rs/median_reward@N` for N = 1..K: Llama 2's Figure 7; `rs/mean_selected_reward`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::{self, TrainingArgs};
use crate::sampling::{self, Round, Sample, SamplingArgs, Steps};
use crate::scoring::ScorerSpec;
use crate::trainer::Summary;
use crate::{Error, Result};

/// Rejection sampling's own keys.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct RsArgs {
    /// Rounds of sample → select → fine-tune.
    pub iterations: usize,
    /// Let the best sample of earlier rounds compete with this round's for each prompt.
    pub pool_previous_iterations: bool,
}

impl Default for RsArgs {
    fn default() -> Self {
        Self {
            iterations: 1,
            pool_previous_iterations: false,
        }
    }
}

const RS_KEYS: &[&str] = &["iterations", "pool_previous_iterations"];

/// A parsed rejection-sampling config.
#[derive(Debug, Clone)]
pub struct RsConfig {
    /// Shared training arguments (`train_file` holds the prompts; the optimiser keys drive
    /// each round's fine-tuning).
    pub args: TrainingArgs,
    /// How completions are sampled.
    pub sampling: SamplingArgs,
    /// Rounds and pooling.
    pub rs: RsArgs,
    /// What scores the samples.
    pub scorer: ScorerSpec,
    /// LoRA on the policy; each round continues the previous round's adapter.
    pub lora: Option<rlhf_model::lora::LoraConfig>,
    /// Tests of resumption: stop sampling after this many batches (not a config key).
    pub stop_after_batches: Option<usize>,
}

/// The keys a sampling method's config may hold beyond its own.
pub(crate) fn sampling_method_keys(own: &[&'static str]) -> Vec<&'static str> {
    let mut allowed = config::TRAINING_KEYS.to_vec();
    allowed.extend(sampling::SAMPLING_KEYS);
    allowed.extend(crate::scoring::SCORER_KEYS);
    allowed.extend(own);
    allowed.push("lora");
    allowed
}

/// Splits a sampling method's table into its parts; SFT's defaults (learning_rate 2e-5)
/// where the file is silent.
pub(crate) fn parse_sampling_method(
    path: &Path,
    table: &mut toml::Table,
    own_keys: &[&str],
) -> Result<(
    TrainingArgs,
    SamplingArgs,
    toml::Table,
    ScorerSpec,
    Option<rlhf_model::lora::LoraConfig>,
)> {
    let lora = config::take_lora(path, table)?;
    let base = path.parent().unwrap_or(Path::new("."));
    let own = config::take_keys(table, own_keys);
    let samp = config::take_keys(table, sampling::SAMPLING_KEYS);
    let mut scoring = config::take_keys(table, crate::scoring::SCORER_KEYS);
    crate::scoring::resolve_scorer_paths(base, &mut scoring);
    // The gate's whitening is PPO's: it makes a score depend on the batch it was computed
    // in, and sampling compares scores across batches and rounds.
    let whiten = scoring
        .get("llama2")
        .and_then(|g| g.get("whiten"))
        .and_then(|w| w.as_bool());
    if whiten == Some(true) {
        return Err(Error::Config(format!(
            "{}: [llama2] whiten = true: rejection sampling and ReST compare raw scores \
             across batches and rounds, which whitening per batch would make incomparable; \
             remove the key",
            path.display()
        )));
    }
    table
        .entry("learning_rate")
        .or_insert(toml::Value::Float(2e-5));
    let args: TrainingArgs = config::parse(path, table.clone())?;
    args.validate(path)?;
    let sampling: SamplingArgs = config::parse(path, samp)?;
    let mut scorer: ScorerSpec = config::parse(path, scoring)?;
    scorer.batch_size = args.per_device_eval_batch_size;
    scorer.llama2.whiten = false;
    let bad = |m: String| Error::Config(format!("{}: {m}", path.display()));
    scorer.validate().map_err(bad)?;
    sampling.validate(path)?;
    Ok((args, sampling, own, scorer, lora))
}

impl RsConfig {
    /// Reads `path` with `--set` overrides.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        let mut table = config::load_table(path, overrides, &sampling_method_keys(RS_KEYS))?;
        Self::from_table(path, &mut table)
    }

    /// Builds the config from an already checked table (a pipeline stage).
    pub fn from_table(path: &Path, table: &mut toml::Table) -> Result<Self> {
        let (args, sampling, own, scorer, lora) = parse_sampling_method(path, table, RS_KEYS)?;
        let rs: RsArgs = config::parse(path, own)?;
        if rs.iterations == 0 {
            return Err(Error::Config(format!(
                "{}: \"iterations\" must be at least 1, found 0",
                path.display()
            )));
        }
        Ok(Self {
            args,
            sampling,
            rs,
            scorer,
            lora,
            stop_after_batches: None,
        })
    }
}

/// For each prompt, its best sample this round (the first of equal scores), unless the
/// `pool` (the best of earlier rounds) holds one that scores strictly higher. Samples with
/// a non-finite score never win. In prompt order.
pub fn select(current: &[Sample], pool: &[Sample]) -> Vec<Sample> {
    let pooled: BTreeMap<usize, &Sample> = pool.iter().map(|s| (s.prompt_index, s)).collect();
    let mut out = Vec::new();
    for (p, group) in sampling::by_prompt(current) {
        let mut best: Option<&Sample> = None;
        for s in group {
            if s.score.is_finite() && best.is_none_or(|b| s.score > b.score) {
                best = Some(s);
            }
        }
        if let Some(old) = pooled.get(&p) {
            if old.score.is_finite() && best.is_none_or(|b| old.score > b.score) {
                best = Some(old);
            }
        }
        match best {
            Some(b) => out.push(b.clone()),
            None => tracing::warn!("prompt {p}: no sample has a finite score; none selected"),
        }
    }
    out
}

/// `output_dir/iteration-{i}`.
pub fn round_dir(output_dir: &Path, round: usize) -> PathBuf {
    output_dir.join(format!("iteration-{round}"))
}

/// `rlhf rejection-sampling --config FILE [--set k=v]... [--resume]`.
pub fn run(
    config_path: &Path,
    overrides: &[String],
    resume: Option<Option<&Path>>,
) -> Result<Summary> {
    let cfg = RsConfig::load(config_path, overrides)?;
    run_config(cfg, resume.is_some())
}

/// Runs a parsed config; `resume` continues the rounds already in `output_dir` (sampling
/// after its last whole batch, fine-tuning from its newest checkpoint).
pub fn run_config(cfg: RsConfig, resume: bool) -> Result<Summary> {
    // Before anything is written: not into the model, the lock, no other run's rounds.
    let _lock = crate::outdir::prepare_run(&cfg.args, &[], resume)?;
    let out = cfg.args.output_dir.clone();
    let iters = cfg.rs.iterations;
    let dirs: Vec<PathBuf> = (1..=iters).map(|i| round_dir(&out, i)).collect();
    let mut run = Steps::open(
        &cfg.args,
        cfg.lora.as_ref(),
        &cfg.scorer,
        &cfg.sampling,
        &dirs,
        resume,
    )?;
    for i in run.done + 1..=iters {
        let dir = &dirs[i - 1];
        let temperature = cfg.sampling.temperature.of_round(i);
        tracing::info!(
            "round {i}/{iters}: {} samples for each of {} prompts at temperature {temperature}",
            cfg.sampling.num_samples,
            run.prompts.len()
        );
        let samples = run.sample(
            &Round {
                round: i,
                args: &cfg.sampling,
                seed: cfg.args.seed,
                stop_after_batches: cfg.stop_after_batches,
            },
            &dir.join("samples.jsonl"),
        )?;
        let pool = if cfg.rs.pool_previous_iterations && i > 1 {
            sampling::read_samples(&dirs[i - 2].join("selected.jsonl"))?
        } else {
            Vec::new()
        };
        let selected = select(&samples, &pool);
        sampling::write_samples(&dir.join("selected.jsonl"), &selected)?;
        let mut m = sampling::sample_metrics(&samples, "rs");
        let n_sel = selected.len().max(1) as f64;
        m.insert(
            "rs/mean_selected_reward".into(),
            selected.iter().map(|s| s.score as f64).sum::<f64>() / n_sel,
        );
        m.insert(
            "rs/selected_from_earlier_rounds".into(),
            selected.iter().filter(|s| s.round != i).count() as f64 / n_sel,
        );
        m.insert("rs/temperature".into(), temperature);
        tracing::info!(
            "round {i}: mean reward {:.4}, best of {} {:.4}, selected {:.4}",
            m["rs/mean_reward"],
            cfg.sampling.num_samples,
            m[&format!("rs/max_reward@{}", cfg.sampling.num_samples)],
            m["rs/mean_selected_reward"]
        );
        let chosen: Vec<&Sample> = selected.iter().collect();
        let sft = run.sft(dir, &chosen)?;
        m.insert("rs/sft_train_loss".into(), sft["train_loss"]);
        m.insert("rs/sft_train_runtime".into(), sft["train_runtime"]);
        run.finish(i, dir, m)?;
    }
    run.close(
        iters,
        Summary::from([("iterations".to_string(), iters as f64)]),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::tests::sample;

    #[test]
    fn the_best_sample_of_each_prompt_is_selected() {
        let cur = vec![
            sample(0, 0, 2, 1.0),
            sample(0, 1, 2, 3.0),
            sample(0, 2, 2, 3.0), // a tie: the first wins
            sample(1, 0, 2, f32::NAN),
            sample(1, 1, 2, -2.0),
            sample(2, 0, 2, f32::NAN),
        ];
        let s = select(&cur, &[]);
        assert_eq!(s.len(), 2, "prompt 2 has no finite score");
        assert_eq!((s[0].prompt_index, s[0].sample_index), (0, 1));
        assert_eq!((s[1].prompt_index, s[1].sample_index), (1, 1));
    }

    #[test]
    fn pooling_keeps_an_earlier_round_only_when_strictly_better() {
        let cur = vec![
            sample(0, 0, 2, 1.0),
            sample(0, 1, 2, 2.0),
            sample(1, 0, 2, 5.0),
            sample(2, 0, 2, 0.5),
        ];
        let pool = vec![
            sample(0, 3, 1, 4.0),           // beats round 2's best
            sample(1, 0, 1, 5.0),           // ties: this round's wins
            sample(2, 1, 1, f32::INFINITY), // never selected
        ];
        let s = select(&cur, &pool);
        let got: Vec<(usize, usize, usize)> = s
            .iter()
            .map(|x| (x.prompt_index, x.round, x.sample_index))
            .collect();
        assert_eq!(got, vec![(0, 1, 3), (1, 2, 0), (2, 2, 0)]);
        // Without a pool, round 2's own best.
        assert_eq!(select(&cur, &[])[0].sample_index, 1);
    }
}
