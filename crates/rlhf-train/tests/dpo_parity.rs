//! Parity with TRL 1.16's DPOTrainer (../shared/fixtures/trl/dpo-*.json): the same token ids,
//! and over 3 steps (AdamW lr 1e-3, constant schedule, batch 4, max_grad_norm 1, no shuffling,
//! full fine-tuning with a frozen copy of the initial policy as reference) the same loss,
//! grad_norm and every metric TRL logged, within the fixtures' README tolerance (1e-3
//! relative). Each case runs twice: with the reference model in the loop and with its
//! log-probs precomputed, which must log the same numbers.

mod common;

use common::shared;

use std::collections::BTreeMap;
use std::path::Path;

use rlhf_data::{Comparison, TokenizeOptions};
use rlhf_model::{Heads, LoadOptions, Model, Training};
use rlhf_train::config::TrainingArgs;
use rlhf_train::dpo::{DpoArgs, DpoItem, DpoObjective};
use rlhf_train::losses::DpoLossType;
use rlhf_train::reference::Reference;

fn ids(v: &serde_json::Value) -> Vec<Vec<u32>> {
    serde_json::from_value(v.clone()).unwrap()
}

/// Trains 3 steps as TRL did and returns the logged lines (metrics.jsonl).
fn train(fx: &serde_json::Value, dir: &Path, precompute: bool) -> Vec<serde_json::Value> {
    let model_dir = shared()
        .join("models")
        .join(fx["model_dir"].as_str().unwrap());
    let tok = rlhf_model::tokenizer::Tokenizer::from_dir(&model_dir).unwrap();
    let train_file = dir.join("pairs.jsonl");
    let rows: Vec<String> = fx["pairs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.to_string())
        .collect();
    std::fs::write(&train_file, rows.join("\n")).unwrap();

    // 1. The same token ids (DPOConfig(max_length=64) cuts none of these pairs).
    let data = rlhf_data::load::<Comparison>(&train_file, &Default::default()).unwrap();
    let opts = TokenizeOptions {
        max_length: Some(64),
        ..Default::default()
    };
    let pairs = rlhf_data::tokenize_dpo(&tok, &data.records, &opts)
        .unwrap()
        .examples;
    let t = &fx["tokenized"];
    let got = |f: fn(&rlhf_data::DpoExample) -> &Vec<u32>| -> Vec<Vec<u32>> {
        pairs.iter().map(|p| f(p).clone()).collect()
    };
    assert_eq!(got(|p| &p.prompt_ids), ids(&t["prompt_ids"]), "prompt ids");
    assert_eq!(got(|p| &p.chosen_ids), ids(&t["chosen_ids"]), "chosen ids");
    assert_eq!(
        got(|p| &p.rejected_ids),
        ids(&t["rejected_ids"]),
        "rejected ids"
    );

    // 2. Three steps of the shared loop with TRL's settings.
    let s = &fx["settings"];
    let out = dir.join(if precompute { "pre" } else { "loop" });
    let args = TrainingArgs {
        model: model_dir.clone(),
        train_file: train_file.clone(),
        output_dir: out.clone(),
        max_steps: s["max_steps"].as_i64().unwrap(),
        per_device_train_batch_size: s["per_device_train_batch_size"].as_u64().unwrap() as usize,
        learning_rate: s["learning_rate"].as_f64().unwrap(),
        lr_scheduler_type: s["lr_scheduler_type"].as_str().unwrap().into(),
        weight_decay: s["weight_decay"].as_f64().unwrap(),
        max_grad_norm: s["max_grad_norm"].as_f64().unwrap(),
        logging_steps: s["logging_steps"].as_u64().unwrap() as usize,
        save_steps: 0,
        report_to: vec!["jsonl".into()],
        seed: s["seed"].as_u64().unwrap(),
        max_length: 64,
        shuffle: s["train_sampling_strategy"] != "sequential",
        ..Default::default()
    };
    let policy = Model::load(
        &model_dir,
        &LoadOptions {
            heads: Heads::Lm,
            training: Training::Full,
            ..Default::default()
        },
    )
    .unwrap();
    let loss_type = match fx["loss_type"].as_str().unwrap() {
        "sigmoid" => DpoLossType::Sigmoid,
        "ipo" => DpoLossType::Ipo,
        other => panic!("fixture loss_type {other}"),
    };
    let mut objective = DpoObjective {
        pad_id: rlhf_data::pad_id(&tok).unwrap(),
        dpo: DpoArgs {
            beta: fx["beta"].as_f64().unwrap(),
            loss_type,
            precompute_ref_log_probs: precompute,
            ..Default::default()
        },
        max_length: 64,
        reference: None,
    };
    let mut items: Vec<DpoItem> = pairs.into_iter().map(DpoItem::from).collect();
    if precompute {
        // Before training, the policy is its own reference: no copy is loaded.
        let r = Reference::load(&model_dir, None, false, true).unwrap();
        assert!(matches!(
            r,
            Reference::Policy {
                adapters_off: false
            }
        ));
        objective.precompute(&r, &policy, &mut items, 4).unwrap();
    } else {
        let r = Reference::load(&model_dir, None, false, false).unwrap();
        assert!(matches!(r, Reference::Frozen(_)));
        objective.reference = Some(r);
    }
    rlhf_train::trainer::train(&args, &policy, &objective, &items, &[], Heads::Lm, None).unwrap();
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Runs one fixture; returns the largest relative error of each logged key over the steps.
fn check(name: &str) -> BTreeMap<String, f64> {
    let fx: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(shared().join("trl").join(name)).unwrap())
            .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let in_loop = train(&fx, tmp.path(), false);
    let pre = train(&fx, tmp.path(), true);
    let mut worst: BTreeMap<String, f64> = BTreeMap::new();
    let mut worst_abs: BTreeMap<String, f64> = BTreeMap::new();
    for (i, want) in fx["steps"].as_array().unwrap().iter().enumerate() {
        for (key, w) in want.as_object().unwrap() {
            if key == "step" {
                continue;
            }
            let w = w.as_f64().unwrap();
            for (how, logs) in [("in-loop reference", &in_loop), ("precomputed", &pre)] {
                let g = logs[i][key]
                    .as_f64()
                    .unwrap_or_else(|| panic!("{name}: step {} logs no {key}", i + 1));
                // Relative to the value. A reward is β·(log π − log π_ref), a difference of
                // two sums of about −70 that both sides compute in f32, whose last bits also
                // steer Adam's first update (≈ ±lr·sign(g) for every weight, whatever |g|):
                // it is measured against β·|logps|·1e-3 where it is smaller than that (the
                // rewards of step 1 are 0, the policy being its reference), i.e. the
                // log-ratios must agree to 1e-6 of the log-probs, about 8 ulps of f32.
                let logps = want["logps/chosen"].as_f64().unwrap().abs();
                let beta = fx["beta"].as_f64().unwrap();
                let floor = if key.starts_with("rewards/") && key != "rewards/accuracies" {
                    1e-3 * beta * logps
                } else {
                    1e-3
                };
                let scale = w.abs().max(floor);
                let err = (g - w).abs() / scale;
                assert!(
                    err <= 1e-3,
                    "{name} ({how}) step {}: {key} {g} vs TRL {w}",
                    i + 1
                );
                let e = worst.entry(key.clone()).or_default();
                *e = e.max(err);
                let e = worst_abs.entry(key.clone()).or_default();
                *e = e.max((g - w).abs());
            }
        }
    }
    eprintln!("{name}: largest relative error per key: {worst:?}");
    eprintln!("{name}: largest absolute error per key: {worst_abs:?}");
    worst
}

#[test]
fn dpo_llama_gqa_sigmoid() {
    check("dpo-llama-gqa-sigmoid.json");
}

#[test]
fn dpo_llama_gqa_ipo() {
    check("dpo-llama-gqa-ipo.json");
}

#[test]
fn dpo_gpt2_sigmoid() {
    check("dpo-gpt2-sigmoid.json");
}

#[test]
fn dpo_gpt2_ipo() {
    check("dpo-gpt2-ipo.json");
}
