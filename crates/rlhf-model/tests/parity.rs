//! Parity with transformers on the tiny fixture checkpoints (../shared/fixtures/models):
//! logits of every position and reward scores within 1e-4.

mod common;

use common::*;
use rlhf_model::{Batch, Heads, LoadOptions, Model};

fn check_logits_and_scores(arch: &str) {
    let g = golden(arch);
    let batch = Batch {
        input_ids: ids2(&g["input_ids"]),
        attention_mask: ids2(&g["attention_mask"])
            .into_iter()
            .map(|r| r.into_iter().map(|x| x as u8).collect())
            .collect(),
    };
    let model = Model::load(&fixtures().join(arch), &LoadOptions::default()).unwrap();
    let hidden = model.hidden(&batch).unwrap();
    let logits = model.logits(&hidden).unwrap();
    let got = rlhf_model::ops::to_vec_f32(&logits).unwrap();
    let mut want = Vec::new();
    flat_f32(&g["logits"], &mut want);
    let d = max_abs_diff(&got, &want);
    assert!(d < 1e-4, "{arch}: logits differ from transformers by {d}");

    let rm_dir = fixtures().join(g["reward_model_dir"].as_str().unwrap());
    let rm = Model::load(
        &rm_dir,
        &LoadOptions {
            heads: Heads::Score,
            ..Default::default()
        },
    )
    .unwrap();
    let h = rm.hidden(&batch).unwrap();
    let scores = rlhf_model::ops::to_vec_f32(&rm.scores(&h, &batch).unwrap()).unwrap();
    let mut want = Vec::new();
    flat_f32(&g["reward_scores"], &mut want);
    let d = max_abs_diff(&scores, &want);
    assert!(d < 1e-4, "{arch}: scores {scores:?} vs transformers {want:?}");
}

#[test]
fn llama_gqa_matches_transformers() {
    check_logits_and_scores("llama-gqa");
}

#[test]
fn qwen2_matches_transformers() {
    check_logits_and_scores("qwen2");
}
