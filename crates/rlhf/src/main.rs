//! `rlhf`: one binary, one subcommand per RLHF stage. Data goes to stdout or `--output`; logs
//! and progress go to stderr.

use clap::{Parser, Subcommand};

mod cmd;
mod jsonl;

// candle allocates and frees a tensor per op; glibc malloc returns big blocks to the kernel
// each time (mmap/munmap), which cost more than the math. mimalloc keeps them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "rlhf",
    version,
    about = "RLHF in Rust: SFT, reward models, PPO, DPO and more"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Benchmark the model core (training steps, generation); prints JSON lines.
    Bench {
        #[command(subcommand)]
        what: cmd::bench::Bench,
    },
    /// Convert a checkpoint into a Hugging Face directory.
    Convert {
        #[command(subcommand)]
        what: cmd::convert::Convert,
    },
    /// Judge a policy against a baseline on held-out prompts (win rates, KL; eval.json).
    Eval(cmd::eval::Args),
    /// Human feedback: the labelling web app and its SQLite database (serve, import,
    /// generate, export, user).
    Feedback {
        #[command(subcommand)]
        what: cmd::feedback::Feedback,
    },
    /// Generate completions for prompts (JSONL in, JSONL out).
    Generate(cmd::generate::Args),
    /// Score prompt/response pairs with a reward model (JSONL in, JSONL out).
    Score(cmd::score::Args),
    /// An OpenAI-compatible server (chat, completions, reward scores) with continuous
    /// batching.
    Serve(cmd::serve::Args),
    /// Supervised fine-tuning on demonstrations (loss on completions only).
    Sft(cmd::train::Args),
    /// Train a reward model on preference pairs or rankings.
    Reward(cmd::train::Args),
    /// Optimise a policy with PPO against a reward model (InstructGPT step 3, Llama 2 gate).
    Ppo(cmd::train::Args),
    /// Llama 2's iterative rejection sampling: best of K samples per prompt, then SFT on them.
    RejectionSampling(cmd::train::Args),
    /// ReST: Grow (sample, score) then Improve (SFT on rising-threshold subsets), repeated.
    Rest(cmd::train::Args),
    /// HIR: sample, relabel each output with the instruction it followed, then train with
    /// SFT plus a contrastive term, repeated.
    Hir(cmd::train::Args),
    /// Direct Preference Optimization on preference pairs (no reward model; also IPO, hinge,
    /// robust DPO).
    Dpo(cmd::train::Args),
    /// Kahneman-Tversky Optimization on completions labelled desirable or undesirable.
    Kto(cmd::train::Args),
    /// RLAIF: an AI judge (a local model or an OpenAI-compatible endpoint) labels
    /// preference pairs, both orders asked; writes pairs for reward/DPO training.
    LabelAi(cmd::ai_feedback::Args),
    /// Constitutional AI: answer red-team prompts, critique and revise by principles; writes
    /// revisions for SFT and (revision, initial) pairs for DPO.
    Constitutional(cmd::ai_feedback::Args),
    /// The InstructGPT pipeline: SFT → reward model → PPO, each stage feeding the next.
    Pipeline(cmd::train::PipelineArgs),
    /// A run directory as one self-contained report.html with plots.
    Report(cmd::report::Args),
}

/// mimalloc's `purge_delay` option (mimalloc v3's `mi_option_e`).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn main() -> std::process::ExitCode {
    // Never hand freed memory back to the OS: candle frees and reallocates tensors of the same
    // sizes every step, and each purge made the kernel zero the pages again on the next touch
    // (28% of a PPO step, measured with perf; BENCHMARKS.md). Peak RSS is unchanged.
    // MIMALLOC_PURGE_DELAY in the environment still wins.
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets a process-wide allocator option before any thread is started.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    }
    // No transparent huge pages: where the kernel compacts memory on a huge-page fault (THP
    // `defrag=madvise`, Debian's default), mimalloc's MADV_HUGEPAGE made first touches of
    // fresh memory stall in compaction once another large process had run: 2.7-3.1 s of
    // system time in a 30-step reward job against 0.3-0.6 s without, and 7.2-8.4 against
    // 9.5-9.9 pairs/s (BENCHMARKS.md). mimalloc has madvised its first arena before `main`
    // runs, so its own option comes too late; the process-wide switch does not.
    // MIMALLOC_ALLOW_THP=1 keeps them.
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_none_or(|v| v != "1") {
        // SAFETY: prctl with PR_SET_THP_DISABLE takes plain integers and touches no memory of
        // ours; on kernels without it the call fails and nothing changes.
        unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    }
    // candle asks for its thread count on every matmul, and without RAYON_NUM_THREADS that
    // means reading /proc/cpuinfo (num_cpus::get_physical) each time: a visible share of a
    // LoRA step made of many small products. Decide once, before any thread starts.
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = candle_core::utils::get_num_threads();
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    // A data-parallel job: started by mpirun (or Slurm), every rank runs this same program.
    let launched = rlhf_train::dist::launched_size().filter(|&n| n > 1);
    #[cfg(feature = "mpi")]
    let _universe = match launched {
        Some(_) => match rlhf_train::dist::mpi::init() {
            Some((universe, world)) => {
                // With NCCL, the gradients go over the GPUs; MPI only starts the job.
                #[cfg(feature = "nccl")]
                let world = match rlhf_train::dist::nccl::Nccl::new(world) {
                    Ok(nccl) => nccl,
                    Err((world, e)) => {
                        eprintln!("error: NCCL could not be started: {e}");
                        // The other ranks may be waiting in NCCL's set-up: end the whole job.
                        rlhf_train::dist::Collective::abort(&world, 1)
                    }
                };
                rlhf_train::dist::install(std::rc::Rc::new(world));
                Some(universe)
            }
            None => {
                eprintln!("error: MPI could not be initialised (was it already?)");
                return std::process::ExitCode::FAILURE;
            }
        },
        None => None,
    };
    #[cfg(not(feature = "mpi"))]
    if let Some(n) = launched {
        eprintln!(
            "error: started as one of {n} ranks (mpirun or Slurm), but this rlhf was built \
             without MPI: build it with `cargo build --release -p rlhf --features mpi` \
             (Open MPI: Debian's libopenmpi-dev openmpi-bin libclang-dev)"
        );
        return std::process::ExitCode::FAILURE;
    }
    let world = rlhf_train::dist::world();
    // Rank 0 reports progress; the other ranks only warnings (RLHF_LOG still wins).
    let level = if world.rank() == 0 { "info" } else { "warn" };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RLHF_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level)),
        )
        .with_target(false)
        .without_time()
        .init();
    if world.size() > 1 {
        tracing::info!(
            "data parallel over {}: {} ranks, each with its share of every batch",
            world.name(),
            world.size()
        );
    }
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Bench { what } => cmd::bench::run(what),
        Command::Convert { what } => cmd::convert::run(what),
        Command::Eval(a) => cmd::eval::run(a),
        Command::Feedback { what } => cmd::feedback::run(what),
        Command::Generate(a) => cmd::generate::run(a),
        Command::Score(a) => cmd::score::run(a),
        Command::Serve(a) => cmd::serve::run(a),
        Command::Sft(a) => cmd::train::sft(a),
        Command::Reward(a) => cmd::train::reward(a),
        Command::Ppo(a) => cmd::train::ppo(a),
        Command::RejectionSampling(a) => cmd::train::rejection_sampling(a),
        Command::Rest(a) => cmd::train::rest(a),
        Command::Hir(a) => cmd::train::hir(a),
        Command::Dpo(a) => cmd::train::dpo(a),
        Command::Kto(a) => cmd::train::kto(a),
        Command::LabelAi(a) => cmd::ai_feedback::label_ai(a),
        Command::Constitutional(a) => cmd::ai_feedback::constitutional(a),
        Command::Pipeline(a) => cmd::train::pipeline(a),
        Command::Report(a) => cmd::report::run(a),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", describe(&e));
            if world.size() > 1 {
                // The other ranks may be waiting in a collective: end the whole job.
                eprintln!(
                    "error: rank {} of {} failed; ending the job",
                    world.rank(),
                    world.size()
                );
                world.abort(1);
            }
            std::process::ExitCode::FAILURE
        }
    }
}

/// The error and its causes, each cause once: most of our errors already quote their source
/// in their own message (`path: reason`), and anyhow's `{:#}` would print it again.
fn describe(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !out.contains(&c) {
            out.push_str(": ");
            out.push_str(&c);
        }
    }
    out
}
