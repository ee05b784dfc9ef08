//! `rlhf eval --config FILE.toml [--set key=value]...`, or the same settings as flags.

use std::path::PathBuf;

use anyhow::{bail, Result};
use rlhf_train::eval::{EvalConfig, JudgeSpec};

/// Options of `rlhf eval`: a config file, flags, or both (flags win).
#[derive(clap::Args)]
pub struct Args {
    /// TOML config (`model`, `baseline_model` or `baseline_file`, `eval_file`, `[judges.NAME]`).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override a config key (`--set num_prompts=16`); repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// The policy (an HF or PEFT adapter directory).
    #[arg(long)]
    model: Option<PathBuf>,
    /// The baseline model.
    #[arg(long)]
    baseline_model: Option<PathBuf>,
    /// The baseline's answers: JSONL `{"prompt", "completion"}`.
    #[arg(long)]
    baseline_file: Option<PathBuf>,
    /// Held-out prompts (JSONL `{"prompt"}` or `{"messages"}`).
    #[arg(long)]
    eval_file: Option<PathBuf>,
    /// Where eval.json goes.
    #[arg(long)]
    output_dir: Option<PathBuf>,
    /// A reward model as the judge named "reward_model".
    #[arg(long)]
    reward_model: Option<PathBuf>,
    /// A reward program as the judge named "reward_program" (`--reward-program python3 judge.py`).
    #[arg(long, num_args = 1.., value_name = "ARGV")]
    reward_program: Option<Vec<String>>,
    /// A local LLM as the pairwise judge named "judge_model".
    #[arg(long)]
    judge_model: Option<PathBuf>,
}

/// Runs `rlhf eval`: prints the table on stderr and eval.json's summary (no rows) on stdout.
pub fn run(a: Args) -> Result<()> {
    let mut cfg = match &a.config {
        Some(path) => EvalConfig::load(path, &a.set)?,
        None => {
            if !a.set.is_empty() {
                bail!("--set needs --config; give the settings as flags instead");
            }
            EvalConfig {
                output_dir: PathBuf::from("eval"),
                ..Default::default()
            }
        }
    };
    let set = |slot: &mut Option<PathBuf>, v: &Option<PathBuf>| {
        if v.is_some() {
            *slot = v.clone();
        }
    };
    if let Some(m) = &a.model {
        cfg.model = m.clone();
    }
    set(&mut cfg.baseline_model, &a.baseline_model);
    set(&mut cfg.baseline_file, &a.baseline_file);
    if a.baseline_file.is_some() && a.baseline_model.is_none() {
        cfg.baseline_model = None;
    }
    if let Some(f) = &a.eval_file {
        cfg.eval_file = f.clone();
    }
    if let Some(o) = &a.output_dir {
        cfg.output_dir = o.clone();
    }
    if let Some(rm) = &a.reward_model {
        let mut j = JudgeSpec::default();
        j.scorer.reward_model = Some(rm.clone());
        cfg.judges.insert("reward_model".into(), j);
    }
    if let Some(argv) = &a.reward_program {
        let mut j = JudgeSpec::default();
        j.scorer.reward_program = Some(argv.clone());
        cfg.judges.insert("reward_program".into(), j);
    }
    if let Some(dir) = &a.judge_model {
        let j = JudgeSpec {
            judge_model: Some(dir.clone()),
            ..Default::default()
        };
        cfg.judges.insert("judge_model".into(), j);
    }
    cfg.check()?;
    let report = rlhf_train::eval::run(&cfg)?;
    eprintln!("\n{}", rlhf_train::eval::table(&report));
    let mut summary = serde_json::to_value(&report)?;
    if let Some(m) = summary.as_object_mut() {
        m.remove("rows");
    }
    println!("{summary}");
    Ok(())
}
