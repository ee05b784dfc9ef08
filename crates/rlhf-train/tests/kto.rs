//! KTO end to end on a fixture model with LoRA (the reference is the policy with its adapters
//! off): the first step's loss is the paper's value where the policy is its reference
//! (r = z₀ = 0, so λ_y(1 − σ(0)) = λ_y/2 per row), training raises desirable and lowers
//! undesirable rewards, and precomputed reference log-probs log the same numbers as the
//! reference in the loop.

mod common;

use common::shared;

use std::path::{Path, PathBuf};

/// The 8 TRL fixture pairs as 16 unpaired rows, chosen rows (true) then rejected rows
/// (false), as TRL's `unpair_preference_dataset` orders them.
fn rows_file(dir: &Path) -> PathBuf {
    let fx: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(shared().join("trl/dpo-llama-gqa-sigmoid.json")).unwrap(),
    )
    .unwrap();
    let pairs = fx["pairs"].as_array().unwrap();
    let mut rows = Vec::new();
    for (key, label) in [("chosen", true), ("rejected", false)] {
        for p in pairs {
            rows.push(
                serde_json::json!({"prompt": p["prompt"], "completion": p[key], "label": label})
                    .to_string(),
            );
        }
    }
    let p = dir.join("kto.jsonl");
    std::fs::write(&p, rows.join("\n") + "\n").unwrap();
    p
}

fn config(dir: &Path, out: &str, extra: &str) -> PathBuf {
    let data = rows_file(dir);
    let text = format!(
        "model = {:?}\ntrain_file = {data:?}\neval_file = {data:?}\noutput_dir = {:?}\n\
         max_steps = 8\nper_device_train_batch_size = 4\nper_device_eval_batch_size = 4\n\
         learning_rate = 2e-2\nlr_scheduler_type = \"constant\"\nlogging_steps = 1\n\
         save_steps = 0\nreport_to = [\"jsonl\"]\ndesirable_weight = 1.5\n{extra}\n\
         [lora]\nr = 4\nlora_alpha = 8\ntarget_modules = \"all-linear\"\n",
        shared().join("models/llama-gqa"),
        dir.join(out)
    );
    let p = dir.join(format!("{out}.toml"));
    std::fs::write(&p, text).unwrap();
    p
}

fn logs(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn kto_learns_from_labels_and_precomputing_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let summary = rlhf_train::kto::run(&config(tmp.path(), "loop", ""), &[], None).unwrap();
    let lines = logs(&tmp.path().join("loop"));
    let step = |n: u64| {
        lines
            .iter()
            .find(|l| l["step"] == n && l.get("loss").is_some())
            .unwrap()
    };

    // Step 1: the first 4 rows are desirable, λ_D = 1.5: loss 1.5·(1 − σ(0)) = 0.75.
    let first = step(1);
    let f = |k: &str| first[k].as_f64().unwrap_or_else(|| panic!("no {k}"));
    assert!((f("loss") - 0.75).abs() < 1e-6, "{first}");
    assert!(
        f("rewards/chosen").abs() < 1e-6 && f("kl").abs() < 1e-6,
        "{first}"
    );
    assert!(
        first.get("rewards/rejected").is_none(),
        "no undesirable row in batch 1"
    );
    assert!(f("logps/chosen") < 0.0 && f("entropy") > 0.0 && f("num_tokens") > 0.0);
    // Step 3 (rows 9-12, all undesirable): λ_U = 1, and the KL point is in play.
    let third = step(3);
    assert!(third.get("rewards/chosen").is_none() && third.get("rewards/rejected").is_some());

    // Training pulls desirable completions up and undesirable ones down.
    let (dc, dr) = (
        summary["eval_rewards/chosen"],
        summary["eval_rewards/rejected"],
    );
    assert!(
        dc > 0.0 && dr < 0.0,
        "eval rewards chosen {dc}, rejected {dr}"
    );
    assert!(summary.contains_key("eval_kl") && summary.contains_key("eval_logits/chosen"));
    // TRL logs a margin only for batches holding both kinds; these eval batches hold one.
    assert!(!summary.contains_key("eval_rewards/margins"));

    // The same run with the reference's log-probs computed once first logs the same numbers.
    rlhf_train::kto::run(
        &config(tmp.path(), "pre", "precompute_ref_log_probs = true"),
        &[],
        None,
    )
    .unwrap();
    let pre = logs(&tmp.path().join("pre"));
    for (a, b) in lines.iter().zip(&pre) {
        for (k, v) in a.as_object().unwrap() {
            if k.contains("runtime") || k.contains("per_second") {
                continue;
            }
            let (x, y) = (v.as_f64().unwrap(), b[k].as_f64().unwrap());
            assert!(
                (x - y).abs() <= 1e-5 * x.abs().max(1.0),
                "step {}: {k} {x} in the loop vs {y} precomputed",
                a["step"]
            );
        }
    }
}
