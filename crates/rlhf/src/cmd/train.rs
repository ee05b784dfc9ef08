//! `rlhf sft|reward --config FILE.toml [--set key=value]... [--resume [DIR]]`.

use std::path::PathBuf;

use anyhow::Result;

/// Options every training command takes.
#[derive(clap::Args)]
pub struct Args {
    /// TOML config, keys named like transformers' TrainingArguments / TRL's configs.
    #[arg(long)]
    config: PathBuf,
    /// Override a config key (`--set learning_rate=1e-4`, `--set lora.r=8`); repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Continue from a checkpoint: the given checkpoint-N directory, or the newest in output_dir.
    #[arg(long, num_args = 0..=1, default_missing_value = "")]
    resume: Option<PathBuf>,
}

impl Args {
    fn resume(&self) -> Option<Option<&std::path::Path>> {
        self.resume.as_deref().map(|p| {
            if p.as_os_str().is_empty() {
                None
            } else {
                Some(p)
            }
        })
    }
}

/// The run's summary (the last line of metrics.jsonl) as one JSON line on stdout, for scripts.
fn print_summary(summary: &std::collections::BTreeMap<String, f64>) {
    println!(
        "{}",
        serde_json::to_string(summary).expect("numbers serialise")
    );
}

/// `rlhf reward`.
pub fn reward(a: Args) -> Result<()> {
    let s = rlhf_train::reward::run(&a.config, &a.set, a.resume())?;
    print_summary(&s);
    Ok(())
}

/// `rlhf sft`.
pub fn sft(a: Args) -> Result<()> {
    let s = rlhf_train::sft::run(&a.config, &a.set, a.resume())?;
    print_summary(&s);
    Ok(())
}

/// `rlhf ppo`.
pub fn ppo(a: Args) -> Result<()> {
    let s = rlhf_train::ppo::run(&a.config, &a.set, a.resume())?;
    print_summary(&s);
    Ok(())
}

/// Options of `rlhf pipeline`.
#[derive(clap::Args)]
pub struct PipelineArgs {
    /// TOML config: shared keys and one table per stage ([sft], [reward], [ppo]).
    #[arg(long)]
    config: PathBuf,
    /// Override a key (`--set ppo.max_steps=10`, `--set seed=1`); repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Skip the stages an earlier run finished and resume the interrupted one.
    #[arg(long)]
    resume: bool,
}

/// `rlhf pipeline`: SFT → reward model → PPO; prints each stage's summary as a JSON line and,
/// on stderr, the held-out answers before and after PPO.
pub fn pipeline(a: PipelineArgs) -> Result<()> {
    let done = rlhf_train::pipeline::run(&a.config, &a.set, a.resume)?;
    println!(
        "{}",
        serde_json::to_string(&done).expect("numbers serialise")
    );
    let stages = rlhf_train::pipeline::stage_tables(&a.config, &a.set)?;
    if let Some(dir) = stages.output_of("ppo") {
        eprintln!("\n{}", rlhf_train::pipeline::report(&dir, 3)?);
    }
    Ok(())
}
