//! Decoding with the frozen weights kept in bf16 (`Model::keep_frozen_in_bf16_for_decoding`):
//! the same tokens as an f32 model whose weights were rounded to bf16, and no f32 copy left.

mod common;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::{fixtures, golden, ids1};
use rlhf_model::generate::{generate, GenerationConfig};
use rlhf_model::{LoadOptions, Model};

/// A copy of a fixture whose matrices (embedding, projections, head) are rounded to bf16
/// and kept in f32; norms and biases stay as they are, as the conversion keeps them.
fn rounded_copy(arch: &str, dir: &Path) {
    let src = fixtures().join(arch);
    for e in std::fs::read_dir(&src).unwrap() {
        let p = e.unwrap().path();
        if p.file_name().unwrap() != "model.safetensors" {
            std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
        }
    }
    let tensors = candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(n, t)| {
            let t = if t.dtype() == DType::F32 && t.rank() == 2 {
                t.to_dtype(DType::BF16)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap()
            } else {
                t
            };
            (n, t)
        })
        .collect::<std::collections::HashMap<String, Tensor>>();
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
}

/// Prompts from the fixture's golden cases, lengthened so that the batch's prompt pass has
/// more than 32 rows (the chunked product) and decoding at most 32 (the streaming one).
fn prompts(arch: &str) -> Vec<Vec<u32>> {
    let g = golden(arch);
    g["greedy"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let p = ids1(&c["prompt_ids"]);
            p.iter().cycle().take(20 + 3 * i).copied().collect()
        })
        .collect()
}

fn same_greedy_tokens_as_the_rounded_f32_model(arch: &str, converted: usize) {
    let tmp = tempfile::tempdir().unwrap();
    rounded_copy(arch, tmp.path());
    let reference = Model::load(tmp.path(), &LoadOptions::default()).unwrap();
    let mut model = Model::load(&fixtures().join(arch), &LoadOptions::default()).unwrap();
    assert_eq!(model.keep_frozen_in_bf16_for_decoding().unwrap(), converted);
    // Idempotent: nothing is left to convert.
    assert_eq!(model.keep_frozen_in_bf16_for_decoding().unwrap(), 0);
    let cfg = GenerationConfig {
        max_new_tokens: 12,
        pad_token_id: model.config.pad_token_id.unwrap_or(0),
        ..Default::default()
    };
    let prompts = prompts(arch);
    let rows: usize = prompts.iter().map(Vec::len).max().unwrap() * prompts.len();
    assert!(
        rows > 32 && prompts.len() <= 32,
        "{arch}: {rows} prompt rows"
    );
    let want = generate(&reference, &prompts, &cfg).unwrap();
    let got = generate(&model, &prompts, &cfg).unwrap();
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(
            g.completion_ids, w.completion_ids,
            "{arch}: row {i}'s tokens"
        );
        for (a, b) in g.logprobs.iter().zip(&w.logprobs) {
            // Same weights, same f32 arithmetic; only the order of a few sums may differ.
            assert!((a - b).abs() <= 1e-4, "{arch}: row {i}: logprob {a} vs {b}");
        }
    }
    // One prompt alone (one decoding row) gives the same tokens too.
    let one = generate(&model, &prompts[..1], &cfg).unwrap();
    assert_eq!(one[0].completion_ids, want[0].completion_ids);
}

#[test]
fn bf16_decoding_generates_what_the_rounded_f32_model_generates() {
    // llama-gqa: 2 layers × 7 projections, and the embedding (shared by the tied head).
    same_greedy_tokens_as_the_rounded_f32_model("llama-gqa", 1 + 2 * 7);
    // qwen2: biased q/k/v projections (the bias stays f32).
    let layers = Model::load(&fixtures().join("qwen2"), &LoadOptions::default())
        .unwrap()
        .n_layers();
    let tied = golden_tied("qwen2");
    same_greedy_tokens_as_the_rounded_f32_model("qwen2", 1 + layers * 7 + usize::from(!tied));
}

fn golden_tied(arch: &str) -> bool {
    let text = std::fs::read_to_string(fixtures().join(arch).join("config.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["tie_word_embeddings"].as_bool().unwrap_or(true)
}

#[test]
fn no_f32_copy_of_a_converted_weight_is_left() {
    let mut model = Model::load(&fixtures().join("llama-gqa"), &LoadOptions::default()).unwrap();
    let f32_bytes = |m: &Model| -> usize {
        m.params()
            .iter()
            .filter(|(_, p)| p.tensor().dtype() == DType::F32)
            .map(|(_, p)| p.elem_count() * 4)
            .sum()
    };
    let before = f32_bytes(&model);
    model.keep_frozen_in_bf16_for_decoding().unwrap();
    for (name, p) in model.params().iter() {
        let want = if name.ends_with("norm.weight") {
            DType::F32
        } else {
            DType::BF16
        };
        assert_eq!(p.tensor().dtype(), want, "{name}");
    }
    // What stays f32 is the norms' weights alone: (2 per layer + the final one) × hidden.
    assert_eq!(f32_bytes(&model), (2 * 2 + 1) * 64 * 4);
    assert!(before > 100 * f32_bytes(&model));
    // The layers and the tied head hold the same bf16 tensors as the store.
    let embed = model
        .params()
        .get("model.embed_tokens.weight")
        .unwrap()
        .tensor();
    assert_eq!(embed.dtype(), DType::BF16);
}
