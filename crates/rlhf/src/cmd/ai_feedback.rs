//! `rlhf label-ai` (RLAIF) and `rlhf constitutional` (Constitutional AI's SL stage): AI
//! feedback in place of human labels. A rerun continues where an interrupted one stopped
//! (label-ai from its judge cache, constitutional after its last whole batch).

use std::path::PathBuf;

use anyhow::Result;

/// Options of the AI-feedback commands.
#[derive(clap::Args)]
pub struct Args {
    /// TOML config (docs/ai_feedback.md lists the keys).
    #[arg(long)]
    config: PathBuf,
    /// Override a config key (`--set tie_threshold=0.1`); repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

/// `rlhf label-ai`: prints the report on stderr and its numbers as one JSON line on stdout.
pub fn label_ai(a: Args) -> Result<()> {
    let report = rlhf_train::label_ai::run_file(&a.config, &a.set)?;
    eprint!("{}", report.table());
    println!("{}", serde_json::to_string(&report.summary())?);
    Ok(())
}

/// `rlhf constitutional`: prints the summary as one JSON line on stdout.
pub fn constitutional(a: Args) -> Result<()> {
    let summary = rlhf_train::constitutional::run_file(&a.config, &a.set)?;
    println!("{}", serde_json::to_string(&summary)?);
    Ok(())
}
