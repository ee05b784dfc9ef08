//! Parity with TRL 1.16's RewardTrainer (../shared/fixtures/trl/reward-*.json): the same
//! token ids, the same per-step loss, grad_norm, accuracy and margin, and the same scores
//! after 3 steps (AdamW lr 1e-3, constant schedule, batch 4, max_grad_norm 1, no shuffling).

mod common;

use common::shared;

use std::path::Path;

use rlhf_data::{Comparison, TokenizeOptions};
use rlhf_model::{Batch, Heads, LoadOptions, Model, Training};
use rlhf_train::config::TrainingArgs;
use rlhf_train::reward::RewardObjective;

fn check(name: &str) {
    let fx: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(shared().join("trl").join(name)).unwrap())
            .unwrap();
    let model_dir = shared()
        .join("models")
        .join(fx["model_dir"].as_str().unwrap());
    let tok = rlhf_model::tokenizer::Tokenizer::from_dir(&model_dir).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let train_file = tmp.path().join("pairs.jsonl");
    let rows: Vec<String> = fx["pairs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.to_string())
        .collect();
    std::fs::write(&train_file, rows.join("\n")).unwrap();

    // 1. The same token ids.
    let data = rlhf_data::load::<Comparison>(&train_file, &Default::default()).unwrap();
    let groups = rlhf_data::tokenize_comparisons(&tok, &data.records, &TokenizeOptions::default())
        .unwrap()
        .examples;
    let chosen: Vec<Vec<u32>> = groups
        .iter()
        .map(|g| g.pairs[0].chosen_ids.clone())
        .collect();
    let want: Vec<Vec<u32>> =
        serde_json::from_value(fx["tokenized"]["chosen_ids"].clone()).unwrap();
    assert_eq!(chosen, want, "{name}: chosen ids");

    // 2. Three steps of the shared loop with TRL's settings.
    let s = &fx["settings"];
    let args = TrainingArgs {
        model: model_dir.clone(),
        train_file: train_file.clone(),
        output_dir: tmp.path().join("out"),
        max_steps: s["max_steps"].as_i64().unwrap(),
        per_device_train_batch_size: s["per_device_train_batch_size"].as_u64().unwrap() as usize,
        learning_rate: s["learning_rate"].as_f64().unwrap(),
        lr_scheduler_type: "constant".into(),
        weight_decay: 0.0,
        max_grad_norm: 1.0,
        logging_steps: 1,
        save_steps: 0,
        report_to: vec!["jsonl".into()],
        shuffle: false,
        ..Default::default()
    };
    let model = Model::load(
        &model_dir,
        &LoadOptions {
            heads: Heads::Score,
            training: Training::Full,
            ..Default::default()
        },
    )
    .unwrap();
    let objective = RewardObjective {
        pad_id: rlhf_data::pad_id(&tok).unwrap(),
        center_rewards_coefficient: None,
    };
    rlhf_train::trainer::train(&args, &model, &objective, &groups, &[], Heads::Score, None)
        .unwrap();
    let logs: Vec<serde_json::Value> =
        std::fs::read_to_string(args.output_dir.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
    for (i, want) in fx["steps"].as_array().unwrap().iter().enumerate() {
        let got = &logs[i];
        for key in [
            "loss",
            "grad_norm",
            "accuracy",
            "margin",
            "mean_reward",
            "min_reward",
            "max_reward",
            "learning_rate",
            "num_tokens",
            "epoch",
        ] {
            let (g, w) = (got[key].as_f64().unwrap(), want[key].as_f64().unwrap());
            assert!(
                (g - w).abs() <= 1e-3 * w.abs().max(1e-3),
                "{name} step {}: {key} {g} vs TRL {w}",
                i + 1
            );
        }
    }
    // 3. Scores after training. The fixture's eval batch is left-padded and transformers ran it
    // without position_ids, i.e. with positions 0..T for every row, pads included. With the
    // same positions we match it exactly.
    let batch = Batch {
        input_ids: serde_json::from_value(fx["eval_input_ids"].clone()).unwrap(),
        attention_mask: serde_json::from_value(fx["eval_attention_mask"].clone()).unwrap(),
    };
    let t = batch.input_ids[0].len() as u32;
    let arange: Vec<Vec<u32>> = batch.input_ids.iter().map(|_| (0..t).collect()).collect();
    let hf_scores = model
        .scores(&model.hidden_at(&batch, &arange).unwrap(), &batch)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    for (g, w) in hf_scores
        .iter()
        .zip(fx["scores_after_training"].as_array().unwrap())
    {
        let w = w.as_f64().unwrap() as f32;
        assert!(
            (g - w).abs() <= 1e-3 * w.abs().max(1e-2),
            "{name}: score {g} vs TRL {w}"
        );
    }
    // Where we disagree, on purpose: for an absolute-position model (GPT-2) those shifted
    // positions change a left-padded row's score. Our default positions count from each row's
    // first real token, so a row scores the same padded or alone; transformers' does not.
    let scores = model
        .scores(&model.hidden(&batch).unwrap(), &batch)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let row0: Vec<u32> = batch.input_ids[0]
        .iter()
        .zip(&batch.attention_mask[0])
        .filter(|(_, &m)| m == 1)
        .map(|(&i, _)| i)
        .collect();
    let alone = Batch::pad(&[row0], 1, false);
    let alone_score = model
        .scores(&model.hidden(&alone).unwrap(), &alone)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()[0];
    assert!(
        (scores[0] - alone_score).abs() < 1e-5,
        "{name}: padded {} vs alone {alone_score}",
        scores[0]
    );
    assert!(
        (scores[1] - hf_scores[1]).abs() < 1e-5,
        "{name}: the unpadded row agrees either way"
    );
    if fx["model_dir"].as_str().unwrap().starts_with("gpt2") {
        assert!(
            (hf_scores[0] - alone_score).abs() > 1e-3,
            "{name}: transformers' left-padded GPT-2 score differs from the unpadded one"
        );
    }
    // The output directory loads as a reward model.
    let out = Model::load(
        Path::new(&args.output_dir),
        &LoadOptions {
            heads: Heads::Score,
            ..Default::default()
        },
    )
    .unwrap();
    let again = out
        .scores(&out.hidden(&batch).unwrap(), &batch)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(again, scores);
}

#[test]
fn reward_llama_gqa() {
    check("reward-llama-gqa.json");
}

#[test]
fn reward_llama_gqa_margin() {
    check("reward-llama-gqa-margin.json");
}

#[test]
fn reward_gpt2() {
    check("reward-gpt2.json");
}

#[test]
fn reward_gpt2_margin() {
    check("reward-gpt2-margin.json");
}
