//! `rlhf bench`: times the model core (full training steps, greedy generation) on shapes that
//! `bench/model/torch_*.py` reproduce with PyTorch, and prints one JSON line per run.
//!
//! Both sides read the same presets and make their inputs with the same formula, so the two
//! JSON lines can be compared field by field (`bench/model/run.sh` does).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_nn::optim::{AdamW, Optimizer, ParamsAdamW};
use rlhf_model::generate::{generate, GenerationConfig};
use rlhf_model::{Batch, Heads, LoadOptions, Model, Training};
use serde_json::{json, Value};

/// `rlhf bench` subcommands.
#[derive(clap::Subcommand)]
pub enum Bench {
    /// Time full training steps (forward, loss, backward, AdamW) of a random-initialised Llama.
    Train(TrainArgs),
    /// Time greedy generation with a KV cache from a model directory.
    Generate(GenerateArgs),
    /// GFLOP/s of candle's f32 and bf16 matmul and of rlhf-model's AVX-512 kernels (f32, bf16) on
    /// n×n matrices (the ceiling of training).
    Matmul(MatmulArgs),
    /// Time best-of-K sampling as rejection sampling runs it: K samples per prompt, generated in
    /// batches with the KV cache and shared prompt prefill, decoded and scored by a reward model.
    BestOfN(BestOfNArgs),
    /// Time the gradient all-reduce of a data-parallel job (run it under `mpirun -np N`): a sum
    /// of `--floats` f32 over the ranks, after a barrier, so no rank's lateness is counted.
    AllReduce(AllReduceArgs),
}

/// Options of `rlhf bench all-reduce`.
#[derive(clap::Args)]
pub struct AllReduceArgs {
    /// Floats summed (the LoRA reward job's gradients: 922,176).
    #[arg(long, default_value_t = 922_176)]
    floats: usize,
    /// Timed repetitions (after 3 untimed).
    #[arg(long, default_value_t = 50)]
    reps: usize,
}

fn all_reduce_bench(a: AllReduceArgs) -> Result<()> {
    let world = rlhf_train::dist::world();
    let mut buf = vec![1f32; a.floats];
    let mut secs = Vec::new();
    for rep in 0..a.reps + 3 {
        world.barrier();
        let t0 = Instant::now();
        world.all_reduce_sum_f32(&mut buf);
        if rep >= 3 {
            secs.push(t0.elapsed().as_secs_f64());
        }
    }
    // Every rank took part in every sum.
    let want = (world.size() as f32).powi(a.reps as i32 + 3);
    if want.is_finite() && (buf[0] - want).abs() > 1e-3 * want {
        bail!("all-reduce: {} where {want} was expected", buf[0]);
    }
    if world.rank() == 0 {
        let med = median(&secs);
        println!(
            "{}",
            json!({
                "job": "all_reduce", "engine": world.name(), "ranks": world.size(),
                "floats": a.floats, "mb": r1(a.floats as f64 * 4.0 / 1e6),
                "median_ms": r4(1e3 * med),
                "gb_per_s": r4(a.floats as f64 * 4.0 / med / 1e9),
            })
        );
    }
    Ok(())
}

/// Options of `rlhf bench best-of-n` (`bench/sampling/hf_best_of_n.py` is the transformers side).
#[derive(clap::Args)]
pub struct BestOfNArgs {
    /// The policy (an HF directory).
    #[arg(long)]
    model: PathBuf,
    /// The reward model (an HF sequence-classification directory).
    #[arg(long)]
    reward_model: PathBuf,
    /// Prompts: JSONL `{"prompt"}` or `{"messages"}`; the first --prompts rows are used.
    #[arg(long)]
    prompts_file: PathBuf,
    /// Prompts sampled.
    #[arg(long, default_value_t = 16)]
    prompts: usize,
    /// K: samples per prompt.
    #[arg(long, default_value_t = 8)]
    num_samples: usize,
    /// New tokens per sample (EOS ignored, so every sample has exactly this many).
    #[arg(long, default_value_t = 32)]
    max_new_tokens: usize,
    /// Samples per generation batch.
    #[arg(long, default_value_t = 32)]
    generation_batch_size: usize,
    /// Samples per reward-model forward.
    #[arg(long, default_value_t = 32)]
    score_batch_size: usize,
    /// Timed repetitions (after one untimed).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// As a `bf16 = true` run samples and scores: bf16 autocast, the frozen policy and
    /// reward model kept in bf16.
    #[arg(long)]
    bf16: bool,
}

fn best_of_n_bench(a: BestOfNArgs) -> Result<()> {
    use rlhf_train::sampling::{sample_and_score, Policy, Round, SamplingArgs, Temperature};
    let dir = tempfile_dir()?;
    let _autocast = rlhf_model::kernels::Autocast::bf16(a.bf16);
    let args = rlhf_train::config::TrainingArgs {
        model: a.model.clone(),
        max_length: 1024,
        ..Default::default()
    };
    let mut policy = Policy::frozen(&args)?;
    // Every sample runs to max_new_tokens, as the transformers side's min_new_tokens forces.
    policy.eos_ids.clear();
    let (mut records, mut ids) = policy.prompts(&a.prompts_file, a.max_new_tokens)?;
    if records.len() < a.prompts {
        bail!(
            "{}: {} prompts, fewer than --prompts {}",
            a.prompts_file.display(),
            records.len(),
            a.prompts
        );
    }
    records.truncate(a.prompts);
    ids.truncate(a.prompts);
    let spec = rlhf_train::scoring::ScorerSpec {
        reward_model: Some(a.reward_model.clone()),
        batch_size: a.score_batch_size,
        ..Default::default()
    };
    let mut scorer = spec.load(&mut Default::default())?;
    let sampling = SamplingArgs {
        num_samples: a.num_samples,
        temperature: Temperature::One(1.0),
        max_new_tokens: a.max_new_tokens,
        generation_batch_size: a.generation_batch_size,
        ..Default::default()
    };
    let mut secs = Vec::new();
    let mut mean_score = 0.0;
    for rep in 0..=a.reps {
        let path = dir.join(format!("rep{rep}/samples.jsonl"));
        let t0 = Instant::now();
        let samples = sample_and_score(
            &policy,
            scorer.as_mut(),
            &records,
            &ids,
            &Round {
                round: rep + 1,
                args: &sampling,
                seed: 0,
                stop_after_batches: None,
            },
            &path,
        )?;
        let s = t0.elapsed().as_secs_f64();
        if rep > 0 {
            secs.push(s);
        }
        mean_score = samples.iter().map(|x| x.score as f64).sum::<f64>() / samples.len() as f64;
    }
    let _ = std::fs::remove_dir_all(&dir);
    let med = median(&secs);
    let n = a.prompts * a.num_samples;
    println!(
        "{}",
        json!({
            "impl": "rlhf-rs", "job": "best_of_n", "prompts": a.prompts, "num_samples": a.num_samples,
            "max_new_tokens": a.max_new_tokens, "generation_batch_size": a.generation_batch_size,
            "bf16": a.bf16,
            "threads": candle_core::utils::get_num_threads(),
            "median_seconds": r4(med), "seconds": secs.iter().map(|x| r4(*x)).collect::<Vec<_>>(),
            "samples_scored_per_second": r4(n as f64 / med),
            "new_tokens_per_second": r1((n * a.max_new_tokens) as f64 / med),
            "mean_score": r4(mean_score),
            "peak_rss_mb": r1(peak_rss_mb()),
        })
    );
    Ok(())
}

/// A fresh scratch directory under the system's temporary directory.
fn tempfile_dir() -> Result<PathBuf> {
    let d = std::env::temp_dir().join(format!("rlhf-bench-{}", std::process::id()));
    std::fs::create_dir_all(&d).with_context(|| d.display().to_string())?;
    Ok(d)
}

/// Options of `rlhf bench matmul`.
#[derive(clap::Args)]
pub struct MatmulArgs {
    /// Matrix size.
    #[arg(long, default_value_t = 2048)]
    n: usize,
    /// Timed repetitions (after one untimed).
    #[arg(long, default_value_t = 5)]
    reps: usize,
}

fn matmul_bench(a: MatmulArgs) -> Result<()> {
    use candle_core::{DType, Device, Tensor};
    use rlhf_model::kernels::cpu::gemm;
    for dtype in [DType::F32, DType::BF16] {
        let x = Tensor::randn(0f32, 1.0, (a.n, a.n), &Device::Cpu)?.to_dtype(dtype)?;
        let y = Tensor::randn(0f32, 1.0, (a.n, a.n), &Device::Cpu)?.to_dtype(dtype)?;
        x.matmul(&y)?;
        let t = std::time::Instant::now();
        for _ in 0..a.reps {
            x.matmul(&y)?;
        }
        let secs = t.elapsed().as_secs_f64() / a.reps as f64;
        println!(
            "{}",
            json!({
                "impl": "rlhf-rs (candle)", "job": "matmul", "dtype": format!("{dtype:?}").to_lowercase(),
                "n": a.n, "threads": candle_core::utils::get_num_threads(),
                "gflops": r4(2.0 * (a.n as f64).powi(3) / secs / 1e9),
            })
        );
    }
    // The AVX-512 kernel the linear layers use (rlhf_model::kernels::cpu::gemm), on the same matrices.
    let x: Vec<f32> = Tensor::randn(0f32, 1.0, a.n * a.n, &Device::Cpu)?.to_vec1()?;
    let y: Vec<f32> = Tensor::randn(0f32, 1.0, a.n * a.n, &Device::Cpu)?.to_vec1()?;
    let (xm, ym) = (
        gemm::MatRef::new(&x, a.n, a.n, a.n, 1),
        gemm::MatRef::new(&y, a.n, a.n, a.n, 1),
    );
    // The f32 kernel, then its bf16 variant (operands rounded to bf16, f32 sums; AVX512_BF16);
    // each is skipped where the CPU lacks it.
    type Kernel = fn(gemm::MatRef<'_>, gemm::MatRef<'_>) -> Option<Vec<f32>>;
    let kernels: [(&str, &str, Kernel); 2] = [
        ("rlhf-rs (avx512 kernel)", "f32", gemm::matmul),
        ("rlhf-rs (avx512-bf16 kernel)", "bf16", gemm::matmul_bf16),
    ];
    for (name, dtype, kernel) in kernels {
        if kernel(xm, ym).is_none() {
            continue;
        }
        let t = std::time::Instant::now();
        for _ in 0..a.reps {
            kernel(xm, ym);
        }
        let secs = t.elapsed().as_secs_f64() / a.reps as f64;
        println!(
            "{}",
            json!({
                "impl": name, "job": "matmul", "dtype": dtype,
                "n": a.n, "threads": candle_core::utils::get_num_threads(),
                "gflops": r4(2.0 * (a.n as f64).powi(3) / secs / 1e9),
            })
        );
    }
    Ok(())
}

/// Options of `rlhf bench train`.
#[derive(clap::Args)]
pub struct TrainArgs {
    /// Model shape: smollm2-135m, llama-100m, llama-8m or tiny.
    #[arg(long, default_value = "smollm2-135m")]
    config: String,
    /// Rows per batch.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Tokens per row.
    #[arg(long, default_value_t = 128)]
    seq: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Untimed steps first (allocator and thread-pool warm-up).
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Worker threads (sets RAYON_NUM_THREADS; default: candle's choice).
    #[arg(long)]
    threads: Option<usize>,
    /// Seed of the init and of the token batches.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// AdamW implementation: "rlhf" (rlhf-train's, what `rlhf sft` and `rlhf reward` use) or
    /// "candle-nn" (candle_nn::optim::AdamW, a dozen allocating tensor ops per parameter).
    #[arg(long, default_value = "rlhf")]
    optimizer: String,
    /// bf16 autocast for every product of the step, as a config's `bf16 = true`.
    #[arg(long)]
    bf16: bool,
}

/// The optimiser under test; both get lr 1e-4, betas (0.9, 0.999), eps 1e-8, no decay.
enum Opt {
    Rlhf(rlhf_train::optim::AdamW),
    CandleNn(AdamW),
}

impl Opt {
    fn step(&mut self, grads: &candle_core::backprop::GradStore) -> Result<()> {
        match self {
            Opt::Rlhf(o) => {
                // A refused (non-finite) update changes nothing; the benchmark times it all
                // the same.
                let _ = o.step(grads, 1e-4)?;
            }
            Opt::CandleNn(o) => o.step(grads)?,
        }
        Ok(())
    }
}

/// Options of `rlhf bench generate`.
#[derive(clap::Args)]
pub struct GenerateArgs {
    /// Model directory (Hugging Face format).
    #[arg(long)]
    model: PathBuf,
    /// Prompts in all.
    #[arg(long, default_value_t = 8)]
    prompts: usize,
    /// Prompts per generate call.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Tokens per prompt (all prompts have this length, so there is no padding).
    #[arg(long, default_value_t = 32)]
    prompt_len: usize,
    /// Tokens generated per prompt (no EOS stop, so always exactly this many).
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Worker threads (sets RAYON_NUM_THREADS; default: candle's choice).
    #[arg(long)]
    threads: Option<usize>,
    /// Dtype of the frozen linear weights (as `rlhf generate --dtype`; f32 here by default,
    /// so that earlier figures keep their meaning).
    #[arg(long, value_enum, default_value_t = super::generate::WeightDtype::F32)]
    dtype: super::generate::WeightDtype,
    /// bf16 autocast (`bf16 = true`'s products: activations rounded to bf16 too, f32 sums;
    /// with `--dtype bf16`, the AVX512_BF16 kernel reads the bf16 weights in place).
    #[arg(long)]
    bf16: bool,
}

/// Runs `rlhf bench`.
pub fn run(b: Bench) -> Result<()> {
    match b {
        Bench::Train(a) => train(a),
        Bench::Generate(a) => generate_bench(a),
        Bench::Matmul(a) => matmul_bench(a),
        Bench::BestOfN(a) => best_of_n_bench(a),
        Bench::AllReduce(a) => all_reduce_bench(a),
    }
}

/// The config.json of a preset; `bench/model/torch_train.py` holds the same table.
pub fn preset(name: &str) -> Result<Value> {
    // (hidden, intermediate, layers, heads, kv heads, vocab)
    let (h, i, l, nh, nkv, v) = match name {
        // SmolLM2-135M's shape: 134.5M parameters with the tied embedding.
        "smollm2-135m" => (576, 1536, 30, 9, 3, 49152),
        // A wider, shallower ~100M Llama (Llama-2 vocabulary).
        "llama-100m" => (768, 2048, 12, 12, 4, 32000),
        // Near the 8.4M-parameter Llama of the reference figures (not its exact shape).
        "llama-8m" => (256, 688, 8, 8, 4, 8192),
        // Smoke test: seconds in debug builds.
        "tiny" => (64, 172, 2, 4, 2, 512),
        other => bail!("unknown --config {other:?} (smollm2-135m, llama-100m, llama-8m, tiny)"),
    };
    Ok(json!({
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": h,
        "intermediate_size": i,
        "num_hidden_layers": l,
        "num_attention_heads": nh,
        "num_key_value_heads": nkv,
        "vocab_size": v,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": true,
        "initializer_range": 0.02,
    }))
}

/// Sets the worker count before the first op builds rayon's pool (it reads the variable once).
fn set_threads(n: Option<usize>) {
    if let Some(n) = n {
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
}

/// Peak resident set size of this process in MiB (VmHWM), 0 where /proc is missing.
pub fn peak_rss_mb() -> f64 {
    let Ok(s) = std::fs::read_to_string("/proc/self/status") else {
        return 0.0;
    };
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// A tiny seeded generator for token batches (rand is not a dependency of this crate, and the
/// benchmark needs nothing better than uniform-ish ids).
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Rounds for the JSON line: timings to 0.1 ms, rates to 0.1.
fn r4(x: f64) -> f64 {
    (x * 1e4).round() / 1e4
}
fn r1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn train(a: TrainArgs) -> Result<()> {
    set_threads(a.threads);
    if a.batch == 0 || a.seq < 2 || a.steps == 0 {
        bail!("--batch and --steps must be at least 1, --seq at least 2");
    }
    let cfg = preset(&a.config)?;
    let vocab = cfg["vocab_size"].as_u64().context("preset vocab")? as u32;
    let model = Model::random(
        cfg,
        &LoadOptions {
            heads: Heads::Lm,
            training: Training::Full,
            seed: a.seed,
            ..Default::default()
        },
    )?;
    let (_, params) = model.params().counts();
    let named = model.params().trainable();
    let mut opt = match a.optimizer.as_str() {
        "rlhf" => Opt::Rlhf(rlhf_train::optim::AdamW::new(named, 0.9, 0.999, 1e-8, 0.0)?),
        "candle-nn" => Opt::CandleNn(AdamW::new(
            named.into_iter().map(|(_, v)| v).collect(),
            ParamsAdamW {
                lr: 1e-4,
                weight_decay: 0.0,
                ..Default::default()
            },
        )?),
        other => bail!("unknown --optimizer {other:?} (rlhf, candle-nn)"),
    };
    let _precision = rlhf_model::kernels::Autocast::bf16(a.bf16);
    if a.bf16 {
        tracing::info!("{}", rlhf_model::kernels::cpu::gemm::autocast_kernel());
    }
    let mut rng = SplitMix64(a.seed);
    // Next-token labels without a copy of the logits: each row's last position has no target.
    let labels: Vec<i64> = (0..a.batch)
        .flat_map(|_| (0..a.seq).map(|j| if j + 1 == a.seq { -100 } else { 0 }))
        .collect();

    let (mut fwd, mut bwd, mut upd, mut total) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut last_loss = f32::NAN;
    for step in 0..a.warmup + a.steps {
        let ids: Vec<Vec<u32>> = (0..a.batch)
            .map(|_| {
                (0..a.seq)
                    .map(|_| (rng.next() % vocab as u64) as u32)
                    .collect()
            })
            .collect();
        let mut lab = labels.clone();
        for (r, row) in ids.iter().enumerate() {
            for j in 0..a.seq - 1 {
                lab[r * a.seq + j] = row[j + 1] as i64;
            }
        }
        let batch = Batch::pad(&ids, 0, false);
        let t0 = Instant::now();
        let hidden = model.hidden(&batch)?;
        let logits = model.logits(&hidden)?;
        let logits = logits.reshape((a.batch * a.seq, vocab as usize))?;
        let loss = rlhf_model::ops::cross_entropy(&logits, &lab)?;
        // Reading the loss is what a training loop logs; it also ends the forward pass.
        last_loss = loss.to_scalar::<f32>()?;
        let t1 = Instant::now();
        let grads = loss.backward()?;
        let t2 = Instant::now();
        opt.step(&grads)?;
        let t3 = Instant::now();
        drop(grads);
        if step >= a.warmup {
            fwd.push((t1 - t0).as_secs_f64());
            bwd.push((t2 - t1).as_secs_f64());
            upd.push((t3 - t2).as_secs_f64());
            total.push((t3 - t0).as_secs_f64());
        }
        tracing::info!(
            "step {step}{}: {:.3}s (loss {last_loss:.4})",
            if step < a.warmup { " (warm-up)" } else { "" },
            (t3 - t0).as_secs_f64()
        );
    }
    let step_s = median(&total);
    let line = json!({
        "impl": "rlhf-rs",
        "job": "train",
        "config": a.config,
        "params": params,
        "batch": a.batch,
        "seq": a.seq,
        "steps": a.steps,
        "optimizer": a.optimizer,
        "bf16": a.bf16,
        "threads": candle_core::utils::get_num_threads(),
        "step_s_median": r4(step_s),
        "forward_s_median": r4(median(&fwd)),
        "backward_s_median": r4(median(&bwd)),
        "optimizer_s_median": r4(median(&upd)),
        "tokens_per_s": r1((a.batch * a.seq) as f64 / step_s),
        "loss": r4(last_loss as f64),
        "peak_rss_mb": r1(peak_rss_mb()),
    });
    println!("{line}");
    Ok(())
}

/// The prompt ids both benchmarks use: a fixed formula, so the PyTorch side can make the same
/// ones without sharing a random generator (and the greedy outputs can be compared).
pub fn bench_prompt(row: usize, len: usize, vocab: usize) -> Vec<u32> {
    (0..len)
        .map(|j| (1 + (row * 7919 + j * 104_729) % (vocab - 1)) as u32)
        .collect()
}

fn generate_bench(a: GenerateArgs) -> Result<()> {
    set_threads(a.threads);
    if a.prompts == 0 || a.batch == 0 || a.prompt_len == 0 || a.max_new_tokens == 0 {
        bail!("--prompts, --batch, --prompt-len and --max-new-tokens must be at least 1");
    }
    let _autocast = rlhf_model::kernels::Autocast::bf16(a.bf16);
    let mut model = Model::load(&a.model, &LoadOptions::default())?;
    super::generate::apply_weight_dtype(&mut model, a.dtype)?;
    let vocab = model.config.vocab_size;
    let prompts: Vec<Vec<u32>> = (0..a.prompts)
        .map(|r| bench_prompt(r, a.prompt_len, vocab))
        .collect();
    let cfg = GenerationConfig {
        max_new_tokens: a.max_new_tokens,
        // Empty: every row makes exactly max_new_tokens, whatever the model predicts.
        eos_token_ids: Vec::new(),
        pad_token_id: model.config.pad_token_id.unwrap_or(0),
        ..Default::default()
    };
    // Warm-up: one short call, so thread-pool start-up and first allocations are not timed.
    generate(
        &model,
        &prompts[..a.batch.min(a.prompts)],
        &GenerationConfig {
            max_new_tokens: 2,
            ..cfg.clone()
        },
    )?;
    let mut secs = Vec::new();
    let mut first = Vec::new();
    // FNV-1a over every completion's ids: two builds or kernels gave the same greedy tokens
    // where their digests agree.
    let mut digest: u64 = 0xcbf2_9ce4_8422_2325;
    for chunk in prompts.chunks(a.batch) {
        let t0 = Instant::now();
        let out = generate(&model, chunk, &cfg)?;
        secs.push(t0.elapsed().as_secs_f64());
        if first.is_empty() {
            first = out[0].completion_ids.iter().take(8).copied().collect();
        }
        for id in out.iter().flat_map(|o| o.completion_ids.iter()) {
            digest = (digest ^ u64::from(*id)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    let total: f64 = secs.iter().sum();
    let new_tokens = a.prompts * a.max_new_tokens;
    let line = json!({
        "impl": "rlhf-rs",
        "job": "generate",
        "model": a.model.display().to_string(),
        "prompts": a.prompts,
        "batch": a.batch,
        "prompt_len": a.prompt_len,
        "max_new_tokens": a.max_new_tokens,
        "dtype": format!("{:?}", a.dtype).to_lowercase(),
        "bf16_autocast": a.bf16,
        "threads": candle_core::utils::get_num_threads(),
        "total_s": r4(total),
        "new_tokens_per_s": r1(new_tokens as f64 / total),
        "first_ids": first,
        "ids_digest": format!("{digest:016x}"),
        "peak_rss_mb": r1(peak_rss_mb()),
    });
    println!("{line}");
    Ok(())
}
