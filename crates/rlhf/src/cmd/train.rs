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
