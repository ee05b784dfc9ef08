//! DPO runs beyond the parity fixtures: rows cut to their end (`truncation_mode =
//! "keep_end"`, each row losing its own prompt start) and a LoRA policy whose reference is
//! itself with the adapters off, in the loop or precomputed, logging the same numbers.

mod common;

use common::shared;

use std::path::{Path, PathBuf};

fn fixture() -> serde_json::Value {
    serde_json::from_str(
        &std::fs::read_to_string(shared().join("trl/dpo-llama-gqa-sigmoid.json")).unwrap(),
    )
    .unwrap()
}

fn config(dir: &Path, out: &str, extra: &str) -> PathBuf {
    let rows: Vec<String> = fixture()["pairs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.to_string())
        .collect();
    let data = dir.join("pairs.jsonl");
    std::fs::write(&data, rows.join("\n") + "\n").unwrap();
    let text = format!(
        "model = {:?}\ntrain_file = {data:?}\noutput_dir = {:?}\nmax_steps = 4\n\
         per_device_train_batch_size = 4\nlearning_rate = 1e-2\nlr_scheduler_type = \"constant\"\n\
         logging_steps = 1\nsave_steps = 0\nreport_to = [\"jsonl\"]\nshuffle = false\n{extra}\n\
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
fn keep_end_cuts_each_row_from_its_start() {
    let tmp = tempfile::tempdir().unwrap();
    let max = 12usize;
    let cfg = config(
        tmp.path(),
        "end",
        &format!("max_length = {max}\ntruncation_mode = \"keep_end\""),
    );
    rlhf_train::dpo::run(&cfg, &[], None).unwrap();
    let lines = logs(&tmp.path().join("end"));
    // TRL's attention-mask count: every row of the first 4 pairs cut to its last 12 tokens.
    let t = &fixture()["tokenized"];
    let len = |k: &str, i: usize| t[k][i].as_array().unwrap().len();
    let want: usize = (0..4)
        .map(|i| {
            let p = len("prompt_ids", i);
            (p + len("chosen_ids", i)).min(max) + (p + len("rejected_ids", i)).min(max)
        })
        .sum();
    assert!(want < 139, "the cut must bite: {want}");
    assert_eq!(lines[0]["num_tokens"].as_f64().unwrap() as usize, want);
    assert!((lines[0]["loss"].as_f64().unwrap() - std::f64::consts::LN_2).abs() < 1e-6);
    assert!(
        lines[3]["rewards/margins"].as_f64().unwrap() > 0.0,
        "{}",
        lines[3]
    );
}

#[test]
fn lora_reference_in_the_loop_or_precomputed_logs_the_same() {
    let tmp = tempfile::tempdir().unwrap();
    for (out, extra) in [("loop", ""), ("pre", "precompute_ref_log_probs = true")] {
        rlhf_train::dpo::run(&config(tmp.path(), out, extra), &[], None).unwrap();
    }
    let (a, b) = (
        logs(&tmp.path().join("loop")),
        logs(&tmp.path().join("pre")),
    );
    assert_eq!(a.len(), b.len());
    // Step 1: the adapters start at zero, so the policy is its reference.
    assert_eq!(a[0]["rewards/margins"].as_f64().unwrap(), 0.0);
    assert!(a[3]["rewards/margins"].as_f64().unwrap() > 0.0);
    for (x, y) in a.iter().zip(&b) {
        for (k, v) in x.as_object().unwrap() {
            if k.contains("runtime") || k.contains("per_second") {
                continue;
            }
            let (v, w) = (v.as_f64().unwrap(), y[k].as_f64().unwrap());
            assert!(
                (v - w).abs() <= 1e-5 * v.abs().max(1.0),
                "step {}: {k} {v} in the loop vs {w} precomputed",
                x["step"]
            );
        }
    }
}

/// RPO (`rpo_alpha`): the step-1 loss is DPO's (ln 2: every pair at zero margin) plus α times
/// the chosen completions' mean per-token NLL, which is logged as `nll_loss` and equals
/// −logps/chosen summed over the batch over its chosen tokens.
#[test]
fn rpo_alpha_adds_the_chosen_nll() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), "rpo", "rpo_alpha = 0.5");
    rlhf_train::dpo::run(&cfg, &[], None).unwrap();
    let first = &logs(&tmp.path().join("rpo"))[0];
    let nll = first["nll_loss"].as_f64().unwrap();
    let loss = first["loss"].as_f64().unwrap();
    assert!(nll > 0.0);
    assert!(
        (loss - (std::f64::consts::LN_2 + 0.5 * nll)).abs() < 1e-4,
        "loss {loss}, nll {nll}"
    );
    // The NLL per token from the logged sums: the first 4 pairs' chosen completions.
    let fx = fixture();
    let chosen_tokens: usize = fx["tokenized"]["chosen_ids"].as_array().unwrap()[..4]
        .iter()
        .map(|c| c.as_array().unwrap().len())
        .sum();
    let logps_chosen = first["logps/chosen"].as_f64().unwrap(); // mean over the 4 pairs
    let want = -logps_chosen * 4.0 / chosen_tokens as f64;
    assert!(
        (nll - want).abs() < 1e-4 * want.abs(),
        "nll {nll} vs {want}"
    );
    // Plain DPO logs no nll_loss.
    let plain = config(tmp.path(), "plain", "");
    rlhf_train::dpo::run(&plain, &[], None).unwrap();
    assert!(logs(&tmp.path().join("plain"))[0].get("nll_loss").is_none());
}
