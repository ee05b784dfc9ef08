//! Rejection sampling and ReST end to end on the tiny fixture Llama, scored by the fixture
//! reward model: a run killed mid-sampling (with a torn last batch on disk) and resumed ends
//! with the same samples, selections and weights as one that never stopped; a round's
//! fine-tuning raises the reward of the next round's samples; ReST's Improve steps keep what
//! their thresholds say.

mod common;

use common::shared;

use std::path::{Path, PathBuf};

use rlhf_train::rejection_sampling::{self, RsConfig};
use rlhf_train::rest::{self, RestConfig};

fn prompts_file(dir: &Path) -> PathBuf {
    let words = [
        "The cat",
        "A dog",
        "Once upon",
        "In the",
        "We saw",
        "She said",
        "It was",
    ];
    let rows: Vec<String> = words
        .iter()
        .map(|w| serde_json::json!({"prompt": w}).to_string())
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
        "model = {model:?}\ntrain_file = {prompts:?}\noutput_dir = {out:?}\n\
         reward_model = {rm:?}\nnum_samples = 4\nmax_new_tokens = 6\n\
         generation_batch_size = 8\nper_device_train_batch_size = 4\n\
         learning_rate = 1e-2\nlr_scheduler_type = \"constant\"\nmax_steps = 4\n\
         save_steps = 2\nlogging_steps = 1\nseed = 5\nreport_to = [\"jsonl\"]\n{extra}\n\
         [lora]\nr = 8\nlora_alpha = 16\ntarget_modules = \"all-linear\"\ntask_type = \"CAUSAL_LM\"\n",
        out = dir.join(out)
    );
    let p = dir.join(format!("{out}.toml"));
    std::fs::write(&p, text).unwrap();
    p
}

fn metrics(out: &Path) -> Vec<serde_json::Map<String, serde_json::Value>> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn f(m: &serde_json::Map<String, serde_json::Value>, k: &str) -> f64 {
    m.get(k)
        .and_then(|v| v.as_f64())
        .unwrap_or_else(|| panic!("no {k} in {m:?}"))
}

#[test]
fn rejection_sampling_resumes_mid_sampling_to_the_same_selection_and_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let extra = "iterations = 2\npool_previous_iterations = true\ntemperature = [1.0, 0.8]";
    let whole = config(tmp.path(), "whole", extra);
    rejection_sampling::run(&whole, &[], None).unwrap();

    // Killed after the first batch of round 1 (prompts 0-1 of 7), the next batch torn mid-line.
    let cut = config(tmp.path(), "cut", extra);
    let mut cfg = RsConfig::load(&cut, &[]).unwrap();
    cfg.stop_after_batches = Some(1);
    let r1 = tmp.path().join("cut/iteration-1/samples.jsonl");
    assert!(rejection_sampling::run_config(cfg.clone(), false).is_err());
    assert_eq!(std::fs::read_to_string(&r1).unwrap().lines().count(), 8);
    let torn = r#"{"prompt_index":2,"sample_index":0,"round":1,"prompt":"Once up"#;
    let mut text = std::fs::read_to_string(&r1).unwrap();
    text.push_str(torn);
    std::fs::write(&r1, text).unwrap();
    // Starting afresh over it is refused; resuming is not.
    cfg.stop_after_batches = None;
    let err = rejection_sampling::run_config(cfg.clone(), false).unwrap_err();
    assert!(err.to_string().contains("--resume"), "{err}");
    rejection_sampling::run_config(cfg, true).unwrap();

    for i in 1..=2 {
        for file in ["samples.jsonl", "selected.jsonl"] {
            let a = std::fs::read_to_string(tmp.path().join(format!("whole/iteration-{i}/{file}")));
            let b = std::fs::read_to_string(tmp.path().join(format!("cut/iteration-{i}/{file}")));
            assert_eq!(a.unwrap(), b.unwrap(), "iteration-{i}/{file}");
        }
    }
    let w = |d: &str| std::fs::read(tmp.path().join(d).join("adapter_model.safetensors")).unwrap();
    assert_eq!(w("whole"), w("cut"), "final adapters differ");
    assert_eq!(w("whole/iteration-1"), w("cut/iteration-1"));

    // One metrics line per round, then the summary; Figure 7's curve is monotone in N.
    let m = metrics(&tmp.path().join("whole"));
    let rounds: Vec<_> = m
        .iter()
        .filter(|r| r.contains_key("rs/max_reward@4"))
        .collect();
    assert_eq!(rounds.len(), 3, "{m:?}");
    for r in &rounds[..2] {
        for n in 1..4 {
            assert!(
                f(r, &format!("rs/max_reward@{}", n + 1)) >= f(r, &format!("rs/max_reward@{n}"))
            );
        }
        assert!(f(r, "rs/max_reward@4") >= f(r, "rs/median_reward@4"));
        assert_eq!(
            f(r, "rs/mean_selected_reward"),
            f(r, "rs/mean_selected_reward")
        );
    }
    // Pooled: round 2's selection is never worse than round 1's, prompt by prompt.
    let sel = |i: usize| {
        rlhf_train::sampling::read_samples(
            &tmp.path()
                .join(format!("whole/iteration-{i}/selected.jsonl")),
        )
        .unwrap()
    };
    let (s1, s2) = (sel(1), sel(2));
    assert_eq!(s1.len(), 7);
    for (a, b) in s1.iter().zip(&s2) {
        assert_eq!(a.prompt_index, b.prompt_index);
        assert!(b.score >= a.score);
    }
    // The fine-tuning on round 1's best raised the reward of round 2's samples.
    assert!(
        f(rounds[1], "rs/mean_reward") > f(rounds[0], "rs/mean_reward"),
        "round 1 {} -> round 2 {}",
        f(rounds[0], "rs/mean_reward"),
        f(rounds[1], "rs/mean_reward")
    );
}

#[test]
fn rest_improve_steps_filter_with_rising_thresholds() {
    let tmp = tempfile::tempdir().unwrap();
    let p = config(
        tmp.path(),
        "rest",
        "grow_steps = 2\nthresholds = [0.5, 0.75]\nthreshold_type = \"quantile\"",
    );
    let cfg = RestConfig::load(&p, &[]).unwrap();
    rest::run_config(cfg, false).unwrap();
    let out = tmp.path().join("rest");
    let m = metrics(&out);
    let steps: Vec<_> = m
        .iter()
        .filter(|r| r.contains_key("rest/kept_fraction"))
        .collect();
    // Two Grow steps × two Improve steps, then the summary line.
    assert_eq!(steps.len(), 5, "{m:?}");
    for s in &steps[..4] {
        let k = f(s, "rest/improve_step");
        let kept = f(s, "rest/kept_fraction");
        // 28 samples: at least half, then at least a quarter (ties may keep more).
        let want = if k == 1.0 { 0.5 } else { 0.25 };
        assert!(kept >= want && kept < want + 0.2, "step {k}: kept {kept}");
        assert!(f(s, "rest/mean_kept_reward") >= f(s, "rest/threshold"));
        assert!(f(s, "rest/mean_kept_reward") >= f(s, "rest/mean_reward"));
    }
    assert!(f(steps[1], "rest/threshold") > f(steps[0], "rest/threshold"));
    for g in 1..=2 {
        for k in 1..=2 {
            let d = out.join(format!("grow-{g}/improve-{k}"));
            assert!(
                d.join("adapter_model.safetensors").exists(),
                "{}",
                d.display()
            );
            let kept = rlhf_train::sampling::read_samples(&d.join("filtered.jsonl")).unwrap();
            let tau = f(steps[(g - 1) * 2 + k - 1], "rest/threshold");
            assert!(kept.iter().all(|s| s.score as f64 >= tau));
        }
    }
    assert!(out.join("adapter_model.safetensors").exists());
}

/// Llama 2's shape as a pipeline: SFT → two reward stages named by `trainer = "reward"` →
/// rejection sampling scored by the helpfulness + safety gate → ReST on the reward stage
/// named last → DPO, in the order written; `[eval]`'s gold and proxy judges run over every round.
#[test]
fn a_pipeline_runs_stages_in_the_order_written() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let demos: Vec<String> = (0..8)
        .map(|i| serde_json::json!({"prompt": format!("Q{i}:"), "completion": " yes"}).to_string())
        .collect();
    std::fs::write(d.join("sft.jsonl"), demos.join("\n")).unwrap();
    let prefs: Vec<String> = (0..8)
        .map(|i| {
            serde_json::json!({"prompt": format!("Q{i}:"), "chosen": " yes", "rejected": " no no"})
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
    let reward = |name: &str| {
        format!(
            "[{name}]\ntrainer = \"reward\"\ntrain_file = \"prefs.jsonl\"\nmax_steps = 2\n\
             per_device_train_batch_size = 4\n[{name}.lora]\nr = 4\nlora_alpha = 8\n\
             task_type = \"SEQ_CLS\"\n"
        )
    };
    let sampling = "train_file = \"prompts.jsonl\"\nnum_samples = 2\nmax_new_tokens = 4\n\
                    max_steps = 1\nper_device_train_batch_size = 4\nlearning_rate = 1e-3\n";
    let cfg = format!(
        "model = {model:?}\noutput_dir = \"out\"\nseed = 1\nlogging_steps = 1\nreport_to = [\"jsonl\"]\n\
         [sft]\ntrain_file = \"sft.jsonl\"\nmax_steps = 2\nper_device_train_batch_size = 4\nlearning_rate = 1e-3\n\
         [sft.lora]\nr = 4\nlora_alpha = 8\ntask_type = \"CAUSAL_LM\"\n\
         {helpfulness}{safety}\
         [rejection_sampling]\n{sampling}iterations = 2\n\
         reward_models = {{ helpfulness = \"helpfulness\", safety = \"safety\" }}\n\
         [rejection_sampling.lora]\nr = 4\nlora_alpha = 8\ntask_type = \"CAUSAL_LM\"\n\
         [rest]\n{sampling}thresholds = [0.5]\nthreshold_type = \"quantile\"\n\
         [rest.lora]\nr = 4\nlora_alpha = 8\ntask_type = \"CAUSAL_LM\"\n\
         [dpo]\ntrain_file = \"prefs.jsonl\"\nmax_steps = 1\nper_device_train_batch_size = 4\n\
         [dpo.lora]\nr = 4\nlora_alpha = 8\ntask_type = \"CAUSAL_LM\"\n\
         [eval]\neval_file = \"prompts.jsonl\"\nmax_new_tokens = 4\nkl_samples = 1\n\
         [eval.judges.gold]\nreward_program = [\"python3\", \"judge.py\"]\n",
        model = shared().join("models/llama-gqa"),
        helpfulness = reward("helpfulness"),
        safety = reward("safety"),
    );
    let path = d.join("pipeline.toml");
    std::fs::write(&path, cfg).unwrap();
    let stages = rlhf_train::pipeline::stage_tables(&path, &[]).unwrap();
    let names: Vec<&str> = stages.stages.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "sft",
            "helpfulness",
            "safety",
            "rejection_sampling",
            "rest",
            "dpo"
        ]
    );
    assert_eq!(
        stages.kinds,
        [
            "sft",
            "reward",
            "reward",
            "rejection_sampling",
            "rest",
            "dpo"
        ]
    );
    let get = |i: usize, k: &str| stages.stages[i].1[k].as_str().unwrap().to_string();
    let out = d.join("out").canonicalize().unwrap_or(d.join("out"));
    let out_s = |s: &str| std::path::absolute(d.join("out").join(s)).unwrap();
    assert_eq!(
        Path::new(&get(1, "model")),
        out_s("sft"),
        "a reward model starts from SFT"
    );
    assert_eq!(Path::new(&get(3, "model")), out_s("sft"));
    assert_eq!(Path::new(&get(4, "model")), out_s("rejection_sampling"));
    // ReST names no scorer: the reward stage written last.
    assert_eq!(Path::new(&get(4, "reward_model")), out_s("safety"));
    assert!(!stages.stages[3].1.contains_key("reward_model"));
    let ev = stages.eval.as_ref().unwrap();
    assert_eq!(Path::new(&get(5, "model")), out_s("rest"));
    assert_eq!(ev.config.model, out_s("dpo"));
    assert_eq!(
        ev.config.baseline_model.as_deref(),
        Some(out_s("sft").as_path())
    );

    let done = rlhf_train::pipeline::run(&path, &[], false).unwrap();
    assert_eq!(done.len(), 7, "{:?}", done.keys().collect::<Vec<_>>());
    let _ = out;
    let rs = d.join("out/rejection_sampling");
    for i in 1..=2 {
        assert!(rs.join(format!("iteration-{i}/selected.jsonl")).exists());
    }
    assert!(done["rejection_sampling"].contains_key("rs/mean_selected_reward"));
    // Every sample keeps the gate's parts; the round logs their means (the gate's share).
    let samples =
        rlhf_train::sampling::read_samples(&rs.join("iteration-1/samples.jsonl")).unwrap();
    for s in &samples {
        let keys: Vec<&str> = s.scores.keys().map(|k| k.as_str()).collect();
        assert_eq!(keys, ["helpfulness", "safety", "safety_gated"]);
        let gated = s.scores["safety_gated"] == 1.0;
        let chosen = if gated { "safety" } else { "helpfulness" };
        assert_eq!(
            s.score, s.scores[chosen],
            "unwhitened: the gated model's score"
        );
    }
    let share = done["rejection_sampling"]["rs/scores_safety_gated"];
    assert!((0.0..=1.0).contains(&share));
    assert!(done["rest"].contains_key("rest/kept_fraction"));
    assert!(done["eval"].contains_key("gold/win_rate"));
}

/// An Improve step whose threshold keeps nothing trains nothing, says so in its metrics
/// (kept 0, no mean of an empty set), and a finished run resumed reads its steps back.
#[test]
fn rest_threshold_that_keeps_nothing_trains_nothing_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let p = config(tmp.path(), "none", "thresholds = [1e9]");
    rest::run_config(RestConfig::load(&p, &[]).unwrap(), false).unwrap();
    let m = metrics(&tmp.path().join("none"));
    assert_eq!(f(&m[0], "rest/kept"), 0.0);
    assert!(!m[0].contains_key("rest/mean_kept_reward"));
    let again = rest::run_config(RestConfig::load(&p, &[]).unwrap(), true).unwrap();
    assert_eq!(again["rest/kept"], 0.0);
}
