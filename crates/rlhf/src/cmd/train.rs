//! `rlhf TRAINER --config FILE.toml [--set key=value]... [--resume [DIR]]` for each trainer.

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
    // A String, not a PathBuf: clap's path parser refuses the empty value that a bare
    // `--resume` stands for.
    #[arg(long, value_name = "DIR", num_args = 0..=1, default_missing_value = "")]
    resume: Option<String>,
}

impl Args {
    fn resume(&self) -> Option<Option<&std::path::Path>> {
        self.resume
            .as_deref()
            .map(|p| (!p.is_empty()).then(|| std::path::Path::new(p)))
    }
}

/// The run's summary (the last line of metrics.jsonl) as one JSON line on stdout, for scripts.
fn print_summary(summary: &std::collections::BTreeMap<String, f64>) {
    // Rank 0 of a data-parallel job speaks for it.
    if !rlhf_train::dist::is_root() {
        return;
    }
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

/// `rlhf rejection-sampling`.
pub fn rejection_sampling(a: Args) -> Result<()> {
    let s = rlhf_train::rejection_sampling::run(&a.config, &a.set, a.resume())?;
    print_summary(&s);
    Ok(())
}

/// `rlhf rest`.
pub fn rest(a: Args) -> Result<()> {
    let s = rlhf_train::rest::run(&a.config, &a.set, a.resume())?;
    print_summary(&s);
    Ok(())
}

/// `rlhf hir`.
pub fn hir(a: Args) -> Result<()> {
    let s = rlhf_train::hir::run(&a.config, &a.set, a.resume())?;
    print_summary(&s);
    Ok(())
}

/// `rlhf ppo`.
pub fn ppo(a: Args) -> Result<()> {
    let s = rlhf_train::ppo::run(&a.config, &a.set, a.resume())?;
    print_summary(&s);
    Ok(())
}

/// `rlhf dpo`.
pub fn dpo(a: Args) -> Result<()> {
    let s = rlhf_train::dpo::run(&a.config, &a.set, a.resume())?;
    print_summary(&s);
    Ok(())
}

/// `rlhf kto`.
pub fn kto(a: Args) -> Result<()> {
    let s = rlhf_train::kto::run(&a.config, &a.set, a.resume())?;
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

/// `rlhf pipeline`: SFT → reward model → PPO (→ eval); prints each stage's summary as a JSON
/// line and, on stderr, the eval table (or, without `[eval]`, PPO's held-out answers before
/// and after); writes `report.html` into the pipeline's output_dir.
pub fn pipeline(a: PipelineArgs) -> Result<()> {
    let done = rlhf_train::pipeline::run(&a.config, &a.set, a.resume)?;
    println!(
        "{}",
        serde_json::to_string(&done).expect("numbers serialise")
    );
    let stages = rlhf_train::pipeline::stage_tables(&a.config, &a.set)?;
    match &stages.eval {
        Some(ev) => {
            let path = ev.config.output_dir.join("eval.json");
            let text = std::fs::read_to_string(&path)?;
            let report: serde_json::Value = serde_json::from_str(&text)?;
            eprintln!(
                "\nrlhf eval ({}):\n{}",
                path.display(),
                summary_table(&report)
            );
        }
        None => {
            if let Some(dir) = stages.output_of("ppo") {
                eprintln!("\n{}", rlhf_train::pipeline::report(&dir, 3)?);
            }
        }
    }
    let page = rlhf_report::write_report(&stages.output_dir, &stages.output_dir)?;
    eprintln!("report: {}", page.display());
    Ok(())
}

/// Each judge's line of an eval.json, for the terminal.
fn summary_table(report: &serde_json::Value) -> String {
    let mut out = String::new();
    let num = |v: &serde_json::Value| v.as_f64().map_or("-".into(), |x| format!("{x:.3}"));
    if let Some(judges) = report["judges"].as_object() {
        for (name, j) in judges {
            out.push_str(&format!(
                "  {name}: policy mean {} vs baseline {}; wins {} losses {} ties {}; Llama 2 \
                 win rate {}, win_rate {} (LC {})\n",
                num(&j["policy_mean"]),
                num(&j["baseline_mean"]),
                j["n_wins"],
                j["n_wins_base"],
                j["n_draws"],
                num(&j["llama2_win_rate"]),
                num(&j["win_rate"]),
                num(&j["length_controlled_winrate"]),
            ));
        }
    }
    if report["kl"].is_object() {
        out.push_str(&format!(
            "  KL(policy || reference): k1 {}, k3 {}\n",
            num(&report["kl"]["k1"]),
            num(&report["kl"]["k3"])
        ));
    }
    out
}
