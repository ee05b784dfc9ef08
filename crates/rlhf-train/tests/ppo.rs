//! PPO end to end on the tiny fixture Llama: a policy learns a reward it can earn (a rule that
//! pays for one target string) while the KL to its reference stays bounded; a run stopped at a
//! checkpoint and resumed ends at the same weights; the reward model path runs through
//! `rlhf_train::ppo::run` with the Llama 2 gate of two reward models.

mod common;

use common::shared;

use std::path::{Path, PathBuf};

use rlhf_model::model::SourceCache;
use rlhf_train::ppo::{Completions, PpoConfig, PpoTrainer, Scorer};

fn prompts_file(dir: &Path) -> PathBuf {
    let words = [
        "The cat",
        "A dog",
        "Once upon",
        "In the",
        "We saw",
        "She said",
        "It was",
        "They ran",
    ];
    let rows: Vec<String> = words
        .iter()
        .enumerate()
        .map(|(i, w)| {
            if i % 4 == 3 {
                serde_json::json!({"prompt": w, "tags": ["safety"]}).to_string()
            } else {
                serde_json::json!({"prompt": w}).to_string()
            }
        })
        .collect();
    let p = dir.join("prompts.jsonl");
    std::fs::write(&p, rows.join("\n") + "\n").unwrap();
    p
}

fn config(dir: &Path, out: &str, extra: &str) -> PathBuf {
    let model = shared().join("models/llama-gqa");
    let rm = shared().join("models/llama-gqa-reward");
    let prompts = prompts_file(dir);
    let text = format!(
        "model = {model:?}\ntrain_file = {prompts:?}\neval_file = {prompts:?}\n\
         output_dir = {out:?}\nreward_model = {rm:?}\n\
         per_device_train_batch_size = 8\ngradient_accumulation_steps = 1\n\
         num_generations = 2\nresponse_length = 8\ntemperature = 1.0\n\
         num_ppo_epochs = 2\nnum_mini_batches = 2\nlearning_rate = 3e-3\n\
         lr_scheduler_type = \"constant\"\nkl_coef = 0.05\nlogging_steps = 1\n\
         seed = 3\neval_prompts = 4\n{extra}\n\
         [lora]\nr = 8\nlora_alpha = 16\ntarget_modules = \"all-linear\"\ntask_type = \"CAUSAL_LM\"\n",
        out = dir.join(out)
    );
    let p = dir.join(format!("{out}.toml"));
    std::fs::write(&p, text).unwrap();
    p
}

/// Pays the share of completion tokens that belong to `targets`.
struct TargetRule {
    targets: Vec<u32>,
}

impl Scorer for TargetRule {
    fn score(
        &mut self,
        batch: &Completions,
        _metrics: &mut Vec<(String, f64)>,
    ) -> rlhf_train::Result<Vec<f32>> {
        Ok(batch
            .ids
            .iter()
            .map(|c| {
                c.iter().filter(|t| self.targets.contains(t)).count() as f32 / c.len().max(1) as f32
            })
            .collect())
    }
}

/// A target the base model samples now and then (about one completion in ten): the decoded
/// text of a frequent sampled token, so the reward is sparse but reachable.
fn targets() -> Vec<u32> {
    const K: usize = 16;
    use rlhf_model::generate::{generate, GenerationConfig};
    let dir = shared().join("models/llama-gqa");
    let tok = rlhf_model::tokenizer::Tokenizer::from_dir(&dir).unwrap();
    let model = rlhf_model::Model::load(&dir, &Default::default()).unwrap();
    let prompts: Vec<Vec<u32>> = ["The cat", "A dog", "Once upon", "In the"]
        .iter()
        .map(|p| tok.encode(p, true).unwrap())
        .collect();
    let mut counts = std::collections::HashMap::<u32, usize>::new();
    for seed in 0..8 {
        let cfg = GenerationConfig {
            max_new_tokens: 8,
            temperature: 1.0,
            seed,
            ..Default::default()
        };
        for g in generate(&model, &prompts, &cfg).unwrap() {
            for id in g.completion_ids {
                *counts.entry(id).or_default() += 1;
            }
        }
    }
    let mut by: Vec<(usize, u32)> = counts.into_iter().map(|(id, n)| (n, id)).collect();
    by.sort_unstable_by(|a, b| b.cmp(a));
    let set: Vec<u32> = by.iter().take(K).map(|&(_, id)| id).collect();
    let n: usize = by.iter().take(K).map(|&(n, _)| n).sum();
    eprintln!("target tokens {set:?}: {n} of 256 sampled tokens");
    set
}

fn mean_of(
    history: &[std::collections::BTreeMap<String, f64>],
    key: &str,
    range: std::ops::Range<usize>,
) -> f64 {
    let v: Vec<f64> = history
        .iter()
        .filter(|h| {
            h.get("step")
                .is_some_and(|s| range.contains(&(*s as usize)))
        })
        .filter_map(|h| h.get(key).copied())
        .collect();
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

#[test]
fn ppo_learns_a_rule_reward_with_bounded_kl() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg_path = config(tmp.path(), "learn", "max_steps = 40\nsave_steps = 0\n");
    // 8 prompts × 4 completions a step, 2 mini-batches of 16, 2 PPO epochs.
    let sets = [
        "per_device_train_batch_size=16".to_string(),
        "num_generations=4".to_string(),
    ];
    let cfg = PpoConfig::load(&cfg_path, &sets).unwrap();
    let mut rule = TargetRule { targets: targets() };
    let mut cache = SourceCache::default();
    let mut tr = PpoTrainer::new(cfg, &mut rule, &mut cache, None).unwrap();
    tr.train().unwrap();
    let h = &tr.state().run.log_history;
    let early = mean_of(h, "objective/scores", 1..6);
    let late = mean_of(h, "objective/scores", 36..41);
    let kl_late = mean_of(h, "objective/kl", 36..41);
    eprintln!("mean score {early:.3} -> {late:.3}, KL {kl_late:.3} nats");
    assert!(
        late > early + 0.06 && late > 1.5 * early,
        "the mean score went from {early} to {late} only"
    );
    assert!(kl_late < 8.0, "KL to the reference grew to {kl_late} nats");
    for key in [
        "objective/kl",
        "objective/entropy",
        "objective/non_score_reward",
        "objective/rlhf_reward",
        "policy/clipfrac_avg",
        "policy/approxkl_avg",
        "loss/policy_avg",
        "loss/value_avg",
        "val/clipfrac_avg",
        "val/ratio",
        "completions/mean_length",
        "time/step",
        "time/generation",
        "time/scoring",
        "time/training",
        "time/tokens_per_second",
    ] {
        assert!(h.iter().any(|r| r.contains_key(key)), "no {key} logged");
    }
}

fn tensors(p: &Path) -> std::collections::BTreeMap<String, Vec<f32>> {
    candle_core::safetensors::load(p, &candle_core::Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(k, v)| (k, v.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect()
}

/// Stopped after the step-2 checkpoint and resumed, a run ends at the weights, value head and
/// logged metrics of the run that never stopped (TRL's PPO cannot resume at all).
#[test]
fn ppo_resumes_exactly_with_the_llama2_gate_and_ptx() {
    let tmp = tempfile::tempdir().unwrap();
    // PPO-ptx demonstrations, so the resumed run must also continue their order exactly.
    let demos: Vec<String> = (0..6)
        .map(|i| serde_json::json!({"prompt": format!("Q{i}:"), "completion": " fine"}).to_string())
        .collect();
    std::fs::write(tmp.path().join("demos.jsonl"), demos.join("\n")).unwrap();
    let gate = format!(
        "max_steps = 4\nsave_steps = 2\nkl_estimator = \"k3\"\n\
         ptx_file = \"demos.jsonl\"\nptx_coef = 0.5\n\
         adap_kl_ctrl = true\ntarget = 1.0\nhorizon = 100\nmissing_eos_penalty = 1.0\n\
         whiten_rewards = true\nscore_clip = 5.0\n\
         [reward_models]\nhelpfulness = {rm:?}\nsafety = {rm2:?}\n\
         [llama2]\nsafety_threshold = 0.5\n",
        rm = shared().join("models/llama-gqa-reward"),
        rm2 = shared().join("models/qwen2-reward"),
    );
    let full_cfg = config(tmp.path(), "full", &gate);
    // The config names one reward model by default; drop it for the Llama 2 pair.
    let strip = |p: &Path| {
        let t = std::fs::read_to_string(p).unwrap();
        let t: String = t
            .lines()
            .filter(|l| !l.starts_with("reward_model ="))
            .map(|l| format!("{l}\n"))
            .collect();
        std::fs::write(p, t).unwrap();
    };
    strip(&full_cfg);
    let summary = rlhf_train::ppo::run(&full_cfg, &[], None).unwrap();
    assert_eq!(summary["episode"], 64.0, "4 steps × 16 completions");
    let full = tmp.path().join("full");
    assert!(full.join("adapter_model.safetensors").exists());
    assert!(full.join("value_head.safetensors").exists());
    assert!(full
        .join("checkpoint-2")
        .join("optimizer.safetensors")
        .exists());
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(full.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(rows
        .iter()
        .any(|r| r.get("objective/safety_gated").is_some()));
    assert!(rows.iter().any(|r| r.get("loss/ptx_avg").is_some()));

    // The same run killed after checkpoint-2: copy it alone and resume.
    let part = tmp.path().join("part");
    let ck = part.join("checkpoint-2");
    std::fs::create_dir_all(&ck).unwrap();
    for e in std::fs::read_dir(full.join("checkpoint-2")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), ck.join(e.file_name())).unwrap();
    }
    let part_cfg = config(tmp.path(), "part", &gate);
    strip(&part_cfg);
    rlhf_train::ppo::run(&part_cfg, &[], Some(None)).unwrap();
    for f in ["adapter_model.safetensors", "value_head.safetensors"] {
        let (a, b) = (tensors(&full.join(f)), tensors(&part.join(f)));
        assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
        for (k, v) in &a {
            assert_eq!(v, &b[k], "{f}: {k} differs after resume");
        }
    }
}

/// The whole pipeline on the tiny Llama: SFT (LoRA) → reward model (LoRA on the SFT adapter,
/// merged in memory) → PPO (LoRA on SFT, scored by the reward adapter) → `[eval]` (PPO vs SFT
/// by a gold program and the reward stage's model, and both over every PPO checkpoint), then
/// `--resume` skips every finished stage.
#[test]
fn pipeline_chains_sft_reward_and_ppo() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let demos: Vec<String> = (0..8)
        .map(|i| serde_json::json!({"prompt": format!("Q{i}:"), "completion": " yes"}).to_string())
        .collect();
    std::fs::write(d.join("sft.jsonl"), demos.join("\n")).unwrap();
    let prefs: Vec<String> = (0..8)
        .map(|i| {
            serde_json::json!({"prompt": format!("Q{i}:"), "chosen": " yes", "rejected": " no no",
                               "degree": "better"})
            .to_string()
        })
        .collect();
    std::fs::write(d.join("prefs.jsonl"), prefs.join("\n")).unwrap();
    prompts_file(d);
    std::fs::write(
        d.join("judge.py"),
        "import json, sys\nfor l in sys.stdin:\n    \
         print(json.dumps({\"score\": len(json.loads(l)[\"completion\"])}), flush=True)\n",
    )
    .unwrap();
    let cfg = format!(
        "model = {model:?}\noutput_dir = \"out\"\nseed = 1\nlogging_steps = 1\nreport_to = [\"jsonl\"]\n\
         [sft]\ntrain_file = \"sft.jsonl\"\nmax_steps = 2\nper_device_train_batch_size = 4\nlearning_rate = 1e-3\n\
         [sft.lora]\nr = 4\nlora_alpha = 8\ntask_type = \"CAUSAL_LM\"\n\
         [reward]\ntrain_file = \"prefs.jsonl\"\neval_file = \"prefs.jsonl\"\nmax_steps = 2\n\
         per_device_train_batch_size = 4\n\
         [reward.lora]\nr = 4\nlora_alpha = 8\ntask_type = \"SEQ_CLS\"\n\
         [ppo]\ntrain_file = \"prompts.jsonl\"\neval_file = \"prompts.jsonl\"\neval_prompts = 2\n\
         max_steps = 2\nper_device_train_batch_size = 4\nnum_generations = 2\nresponse_length = 4\n\
         learning_rate = 1e-3\nsave_steps = 1\n\
         [ppo.lora]\nr = 4\nlora_alpha = 8\ntask_type = \"CAUSAL_LM\"\n\
         [eval]\nmax_new_tokens = 4\nkl_samples = 1\ngold_proxy = true\n\
         [eval.judges.gold]\nreward_program = [\"python3\", \"judge.py\"]\n",
        model = shared().join("models/llama-gqa"),
    );
    let path = d.join("pipeline.toml");
    std::fs::write(&path, cfg).unwrap();
    let done = rlhf_train::pipeline::run(&path, &[], false).unwrap();
    assert_eq!(
        done.keys().collect::<Vec<_>>(),
        ["eval", "ppo", "reward", "sft"],
        "every stage ran"
    );
    let out = d.join("out");
    for k in [
        "gold/win_rate",
        "proxy/win_rate",
        "gold/policy_mean",
        "kl_k1",
        "kl_k3",
    ] {
        assert!(done["eval"].contains_key(k), "eval summary lacks {k}");
    }
    let eval: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("eval/eval.json")).unwrap())
            .unwrap();
    assert_eq!(eval["n_prompts"], 8);
    assert!(eval["baseline"].as_str().unwrap().ends_with("sft"));
    // Gold and proxy at the start (the SFT policy, KL 0), checkpoint-1 and the final policy.
    let curve: Vec<serde_json::Value> = std::fs::read_to_string(out.join("eval/gold_proxy.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let steps: Vec<u64> = curve.iter().map(|r| r["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, [0, 1, 2]);
    assert_eq!(curve[0]["kl_k1"], 0.0);
    assert!(curve
        .iter()
        .all(|r| r["gold"].is_number() && r["proxy"].is_number()));
    // Each stage's adapter names the previous stage's output as its base.
    let base_of = |s: &str| -> String {
        let v: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.join(s).join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        v["base_model_name_or_path"].as_str().unwrap().to_string()
    };
    let sft = out.join("sft").canonicalize().unwrap();
    assert_eq!(base_of("reward"), sft.to_string_lossy());
    assert_eq!(base_of("ppo"), sft.to_string_lossy());
    assert!(done["reward"].contains_key("eval_accuracy"));
    assert!(done["ppo"].contains_key("eval_objective/scores"));
    let report = rlhf_train::pipeline::report(&out.join("ppo"), 2).unwrap();
    assert!(report.contains("before PPO"), "{report}");
    // The PPO policy loads as a model (the adapter chain merged) and generates.
    let policy = rlhf_model::Model::load(&out.join("ppo"), &Default::default()).unwrap();
    let g = rlhf_model::generate::generate(
        &policy,
        &[vec![5, 6]],
        &rlhf_model::generate::GenerationConfig::default(),
    )
    .unwrap();
    assert_eq!(g[0].completion_ids.len(), 64);
    // Resume with every stage done runs nothing again.
    let again = rlhf_train::pipeline::run(&path, &[], true).unwrap();
    for stage in ["sft", "reward", "ppo", "eval"] {
        let (a, b) = (&again[stage], &done[stage]);
        assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
        for (k, v) in b {
            assert!(
                (a[k] - v).abs() <= 1e-9 * v.abs().max(1.0),
                "{stage}: {k} was rerun"
            );
        }
    }
}

/// Steps with an evaluation row in metrics.jsonl (summary excluded) and the
/// `eval_step{N}.jsonl` files written.
fn evals(out: &Path) -> (Vec<u64>, Vec<u64>) {
    let rows: Vec<u64> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r.get("eval_objective/scores").is_some() && r.get("train_runtime").is_none())
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    let mut files: Vec<u64> = std::fs::read_dir(out)
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            name.strip_prefix("eval_step")?
                .strip_suffix(".jsonl")?
                .parse()
                .ok()
        })
        .collect();
    files.sort();
    (rows, files)
}

/// PPO evaluates on the shared Run's schedule: "steps" without `eval_steps` every
/// `logging_steps` (it never evaluated mid-run before), `eval_on_start = false` skips the
/// evaluation before training (it always ran), and "epoch" evaluates after each pass over
/// the prompts (8 prompts, 4 a step: steps 2 and 4; it was ignored). The final evaluation is
/// the last step's when the schedule made one there, written once.
#[test]
fn ppo_follows_the_shared_eval_schedule() {
    let tmp = tempfile::tempdir().unwrap();
    let fast = "max_steps = 4\nsave_steps = 0\nreport_to = [\"jsonl\"]\n";
    // (output, --set, steps with an eval row, eval_step{N}.jsonl written)
    type Case<'a> = (&'a str, &'a [&'a str], &'a [u64], &'a [u64]);
    let cases: [Case; 3] = [
        (
            "steps",
            &["eval_strategy=steps", "logging_steps=2"],
            &[0, 2, 4],
            &[0, 2, 4],
        ),
        (
            "nostart",
            &["eval_strategy=steps", "eval_steps=3", "eval_on_start=false"],
            &[3],
            &[3, 4],
        ),
        ("epoch", &["eval_strategy=epoch"], &[0, 2, 4], &[0, 2, 4]),
    ];
    for (name, sets, rows, files) in cases {
        let cfg = config(tmp.path(), name, fast);
        let mut sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        sets.extend(["num_ppo_epochs=1".into(), "num_mini_batches=1".into()]);
        let summary = rlhf_train::ppo::run(&cfg, &sets, None).unwrap();
        assert!(summary.contains_key("eval_objective/scores"), "{name}");
        let (r, f) = evals(&tmp.path().join(name));
        assert_eq!((r.as_slice(), f.as_slice()), (rows, files), "{name}");
    }
}
