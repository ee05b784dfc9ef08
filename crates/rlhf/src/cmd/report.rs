//! `rlhf report`: a run directory as one self-contained report.html with its plots.

use std::path::PathBuf;

use anyhow::Result;

/// Options of `rlhf report`.
#[derive(clap::Args)]
pub struct Args {
    /// A training run's output_dir, an `rlhf eval` output or a pipeline's output_dir.
    run_dir: PathBuf,
    /// Where report.html and the PNGs go (default: RUN_DIR).
    #[arg(long)]
    output: Option<PathBuf>,
}

/// Writes the report and prints its path on stdout.
pub fn run(a: Args) -> Result<()> {
    let out = a.output.as_deref().unwrap_or(&a.run_dir);
    let page = rlhf_report::write_report(&a.run_dir, out)?;
    println!("{}", page.display());
    Ok(())
}
