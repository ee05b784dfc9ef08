//! Saving and loading: HF directories, PEFT adapters, merged adapters, and the errors a user
//! sees for broken directories.

mod common;

use candle_core::{DType, Tensor};
use common::*;
use rlhf_model::lora::{LoraConfig, TargetModules};
use rlhf_model::{Batch, Error, Heads, LoadOptions, Model, Training};

fn batch(arch: &str) -> Batch {
    let g = golden(arch);
    Batch {
        input_ids: ids2(&g["input_ids"]),
        attention_mask: ids2(&g["attention_mask"])
            .into_iter()
            .map(|r| r.into_iter().map(|x| x as u8).collect())
            .collect(),
    }
}

fn outputs(m: &Model, b: &Batch) -> (Vec<f32>, Vec<f32>) {
    let h = m.hidden(b).unwrap();
    (
        rlhf_model::ops::to_vec_f32(&m.logits(&h).unwrap()).unwrap(),
        rlhf_model::ops::to_vec_f32(&m.scores(&h, b).unwrap()).unwrap(),
    )
}

fn opts(heads: Heads, training: Training) -> LoadOptions {
    LoadOptions {
        heads,
        training,
        ..Default::default()
    }
}

/// Moves every trainable tensor a little so a round trip that drops or zeroes one shows up.
fn perturb(m: &Model) {
    for (i, (_, v)) in m.params().trainable().into_iter().enumerate() {
        let noise =
            (Tensor::ones_like(v.as_tensor()).unwrap() * (0.01 * (1 + i % 5) as f64)).unwrap();
        v.set(&(v.as_tensor() + noise).unwrap()).unwrap();
    }
}

#[test]
fn full_model_round_trips_as_a_reward_model() {
    let arch = "llama-gqa";
    let m = Model::load(
        &fixtures().join(arch),
        &opts(Heads::LmAndScore, Training::Full),
    )
    .unwrap();
    perturb(&m);
    let b = batch(arch);
    let (logits, scores) = outputs(&m, &b);
    let dir = tempfile::tempdir().unwrap();
    m.save_pretrained(dir.path(), Heads::Score).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["architectures"][0], "LlamaForSequenceClassification");
    assert_eq!(cfg["num_labels"], 1);
    assert!(
        dir.path().join("tokenizer.json").exists(),
        "tokenizer copied"
    );
    let back = Model::load(dir.path(), &opts(Heads::LmAndScore, Training::Frozen)).unwrap();
    let (l2, s2) = outputs(&back, &b);
    assert_eq!(max_abs_diff(&logits, &l2), 0.0);
    assert_eq!(max_abs_diff(&scores, &s2), 0.0);
    // Tied embeddings: no separate lm_head tensor is written.
    let names = rlhf_model::weights::WeightSource::from_dir(
        dir.path(),
        &candle_core::Device::Cpu,
        DType::F32,
    )
    .unwrap();
    assert!(!names.contains("lm_head.weight"));
    assert!(names.contains("score.weight"));
}

#[test]
fn lora_adapter_round_trips_and_merges() {
    for arch in ["llama-gqa", "qwen2"] {
        let lora = LoraConfig {
            r: 4,
            lora_alpha: 16.0,
            task_type: Some("SEQ_CLS".into()),
            target_modules: Some(TargetModules::List(vec![
                "q_proj".into(),
                "v_proj".into(),
                "down_proj".into(),
            ])),
            ..Default::default()
        };
        let base = fixtures().join(arch);
        let m = Model::load(&base, &opts(Heads::Score, Training::Lora(lora))).unwrap();
        perturb(&m);
        let b = batch(arch);
        let h = m.hidden(&b).unwrap();
        let scores = rlhf_model::ops::to_vec_f32(&m.scores(&h, &b).unwrap()).unwrap();

        let adapter = tempfile::tempdir().unwrap();
        m.save_adapter(adapter.path()).unwrap();
        let cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(adapter.path().join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(cfg["peft_type"], "LORA");
        assert_eq!(cfg["modules_to_save"][0], "score");
        let saved = candle_core::safetensors::load(
            adapter.path().join("adapter_model.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        assert!(
            saved.contains_key("base_model.model.score.weight"),
            "{:?}",
            saved.keys()
        );
        assert!(
            saved.contains_key("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
        );
        assert!(saved.contains_key("base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"));
        assert_eq!(saved.len(), 2 * 3 * 2 + 1);

        let back = Model::load(
            &base,
            &LoadOptions {
                heads: Heads::Score,
                adapter: Some(adapter.path().to_path_buf()),
                ..Default::default()
            },
        )
        .unwrap();
        let h2 = back.hidden(&b).unwrap();
        let s2 = rlhf_model::ops::to_vec_f32(&back.scores(&h2, &b).unwrap()).unwrap();
        assert_eq!(
            max_abs_diff(&scores, &s2),
            0.0,
            "{arch}: adapter round trip"
        );

        let merged = tempfile::tempdir().unwrap();
        m.save_pretrained(merged.path(), Heads::Score).unwrap();
        let mm = Model::load(merged.path(), &opts(Heads::Score, Training::Frozen)).unwrap();
        let h3 = mm.hidden(&b).unwrap();
        let s3 = rlhf_model::ops::to_vec_f32(&mm.scores(&h3, &b).unwrap()).unwrap();
        assert!(
            max_abs_diff(&scores, &s3) < 1e-5,
            "{arch}: merged {s3:?} vs adapted {scores:?}"
        );
    }
}

fn copy_fixture(arch: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(fixtures().join(arch)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.path().join(e.file_name())).unwrap();
    }
    dir
}

#[test]
fn broken_directories_give_errors_that_name_the_problem() {
    let o = LoadOptions::default();
    let err = Model::load(
        std::path::Path::new("HuggingFaceTB/SmolLM2-135M-Instruct"),
        &o,
    )
    .err()
    .unwrap();
    assert!(matches!(err, Error::HubName { .. }), "{err}");
    assert!(err.to_string().contains("never downloads"), "{err}");

    let d = copy_fixture("llama-gqa");
    std::fs::remove_file(d.path().join("config.json")).unwrap();
    let err = Model::load(d.path(), &o).err().unwrap();
    assert!(err.to_string().contains("config.json"), "{err}");

    let d = copy_fixture("llama-gqa");
    let cfg = std::fs::read_to_string(d.path().join("config.json")).unwrap();
    std::fs::write(
        d.path().join("config.json"),
        cfg.replace("\"llama\"", "\"mamba\""),
    )
    .unwrap();
    let err = Model::load(d.path(), &o).err().unwrap();
    assert!(
        matches!(&err, Error::UnknownModelType { found, .. } if found == "mamba"),
        "{err}"
    );

    let d = copy_fixture("llama-gqa");
    std::fs::write(
        d.path().join("config.json"),
        cfg.replace("\"intermediate_size\": 160", "\"intermediate_size\": 128"),
    )
    .unwrap();
    let err = Model::load(d.path(), &o).err().unwrap();
    match &err {
        Error::ShapeMismatch {
            name,
            expected,
            found,
            ..
        } => {
            assert_eq!(name, "model.layers.0.mlp.gate_proj.weight");
            assert_eq!(
                (expected.clone(), found.clone()),
                (vec![128, 64], vec![160, 64])
            );
        }
        _ => panic!("expected a shape error, got {err}"),
    }

    let d = copy_fixture("llama-gqa");
    std::fs::remove_file(d.path().join("model.safetensors")).unwrap();
    let err = Model::load(d.path(), &o).err().unwrap();
    assert!(err.to_string().contains("model.safetensors"), "{err}");
}

#[test]
fn sharded_checkpoints_load() {
    let d = copy_fixture("qwen2");
    let all = candle_core::safetensors::load(
        d.path().join("model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let mut names: Vec<&String> = all.keys().collect();
    names.sort();
    let (a, b) = names.split_at(names.len() / 2);
    let mut map = serde_json::Map::new();
    for (shard, part) in [
        ("model-00001-of-00002.safetensors", a),
        ("model-00002-of-00002.safetensors", b),
    ] {
        let t: std::collections::HashMap<String, Tensor> = part
            .iter()
            .map(|n| ((*n).clone(), all[*n].clone()))
            .collect();
        candle_core::safetensors::save(&t, d.path().join(shard)).unwrap();
        for n in part {
            map.insert((*n).clone(), shard.into());
        }
    }
    std::fs::remove_file(d.path().join("model.safetensors")).unwrap();
    std::fs::write(
        d.path().join("model.safetensors.index.json"),
        serde_json::json!({"metadata": {}, "weight_map": map}).to_string(),
    )
    .unwrap();
    let b = batch("qwen2");
    let sharded = Model::load(d.path(), &LoadOptions::default()).unwrap();
    let whole = Model::load(&fixtures().join("qwen2"), &LoadOptions::default()).unwrap();
    let logits = |m: &Model| {
        rlhf_model::ops::to_vec_f32(&m.logits(&m.hidden(&b).unwrap()).unwrap()).unwrap()
    };
    assert_eq!(max_abs_diff(&logits(&sharded), &logits(&whole)), 0.0);
}
