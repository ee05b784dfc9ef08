//! What the model layer does with input it cannot run on: a clear error, never a panic and
//! never a made-up number (issue #18). Zero-length sequences, a reward model without a score
//! head, an adapter saved for a base of another size.

mod common;

use common::*;
use rlhf_model::lora::LoraConfig;
use rlhf_model::{Batch, Heads, LoadOptions, Model, Training};

const ARCHS: [&str; 4] = ["llama-gqa", "qwen2", "gpt2", "opt"];

fn reward_model(arch: &str) -> Model {
    Model::load(
        &fixtures().join(format!("{arch}-reward")),
        &LoadOptions {
            heads: Heads::Score,
            ..Default::default()
        },
    )
    .unwrap()
}

/// A forward pass on a sequence of no tokens is an error that says so, in every
/// architecture (the Llama family panicked in the attention, GPT-2 and OPT failed with an
/// internal "gather invalid index"); scores of a batch holding an empty row are refused
/// (the row used to get the score of a padding token).
#[test]
fn empty_sequences_are_errors_not_panics() {
    for arch in ARCHS {
        let m = reward_model(arch);
        let pad = m.config.pad_token_id.unwrap_or(0);
        let empty = Batch::pad(&[vec![]], pad, false);
        let e = m.hidden(&empty).err().unwrap().to_string();
        assert!(e.contains("no tokens"), "{arch}: {e}");
        let e = m.hidden_at(&empty, &[vec![]]).err().unwrap().to_string();
        assert!(e.contains("no tokens"), "{arch}: {e}");
        let mut cache = m.new_cache();
        let ids = empty.ids_tensor(m.device()).unwrap();
        let e = m
            .hidden_cached(&ids, &[vec![]], &[vec![]], &mut cache)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("no tokens"), "{arch}: {e}");

        let mixed = Batch::pad(&[vec![5, 6, 7], vec![]], pad, false);
        let h = m.hidden(&mixed).unwrap();
        let e = m.scores(&h, &mixed).err().unwrap().to_string();
        assert!(
            e.contains("row 1") && e.contains("no tokens"),
            "{arch}: {e}"
        );
        for seqs in [vec![vec![]], vec![vec![5, 6], vec![]]] {
            let e = m.scores_of(&seqs).err().unwrap().to_string();
            assert!(e.contains("no tokens"), "{arch}: {e}");
        }
        let e = m
            .hidden_packed(&[vec![3], vec![]])
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("sequence 1") && e.contains("no tokens"),
            "{arch}: {e}"
        );

        let lm = Model::load(&fixtures().join(arch), &LoadOptions::default()).unwrap();
        let cfg = rlhf_model::generate::GenerationConfig {
            max_new_tokens: 2,
            ..Default::default()
        };
        let e = rlhf_model::generate::generate(&lm, &[vec![4, 5], vec![]], &cfg)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("prompt 1") && e.contains("no tokens"),
            "{arch}: {e}"
        );
    }
}

/// Loading a model as a reward model to score with (`require_score_head`) refuses a
/// checkpoint without `score.weight` and says how to get one; reward training (the default)
/// still starts a new head.
#[test]
fn scoring_needs_a_trained_score_head() {
    let strict = LoadOptions {
        heads: Heads::Score,
        require_score_head: true,
        ..Default::default()
    };
    for arch in ARCHS {
        let e = Model::load(&fixtures().join(arch), &strict)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("score.weight") && e.contains("rlhf reward"),
            "{arch}: {e}"
        );
        Model::load(&fixtures().join(format!("{arch}-reward")), &strict).unwrap();
        // Reward training: a new head, as AutoModelForSequenceClassification starts one.
        let m = Model::load(
            &fixtures().join(arch),
            &LoadOptions {
                heads: Heads::Score,
                training: Training::Full,
                ..Default::default()
            },
        )
        .unwrap();
        assert!(m.params().get("score.weight").is_some());
    }

    // A LoRA adapter that carries the head (SEQ_CLS) makes a base without one a reward model;
    // one that does not (CAUSAL_LM) does not.
    let base = fixtures().join("llama-gqa");
    for (task, ok) in [("SEQ_CLS", true), ("CAUSAL_LM", false)] {
        let lora = LoraConfig {
            r: 2,
            task_type: Some(task.into()),
            ..Default::default()
        };
        let m = Model::load(
            &base,
            &LoadOptions {
                heads: if ok { Heads::Score } else { Heads::Lm },
                training: Training::Lora(lora),
                ..Default::default()
            },
        )
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        m.save_adapter(dir.path()).unwrap();
        let with_adapter = LoadOptions {
            adapter: Some(dir.path().to_path_buf()),
            ..strict.clone()
        };
        let r = Model::load(&base, &with_adapter);
        assert_eq!(r.is_ok(), ok, "{task} adapter beside the base");
        if let Err(e) = r {
            assert!(e.to_string().contains("score.weight"), "{e}");
        }
        // The adapter directory itself as the model (merged into its base).
        let r = Model::load(dir.path(), &strict);
        assert_eq!(r.is_ok(), ok, "{task} adapter directory as the model");
        if let Err(e) = r {
            assert!(e.to_string().contains("score.weight"), "{e}");
        }
    }
}

/// A base model like `llama-gqa` with `changes` made to its config, saved to a directory.
fn other_base(changes: &[(&str, usize)]) -> tempfile::TempDir {
    let mut cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("llama-gqa/config.json")).unwrap(),
    )
    .unwrap();
    for (k, v) in changes {
        cfg[*k] = (*v).into();
    }
    let m = Model::random(cfg, &LoadOptions::default()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    m.save_pretrained(dir.path(), Heads::Lm).unwrap();
    dir
}

/// Points an adapter's `base_model_name_or_path` at `base`.
fn rebase(adapter: &std::path::Path, base: &std::path::Path) {
    let cfg_path = adapter.join("adapter_config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["base_model_name_or_path"] = base.to_str().unwrap().into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
}

/// An adapter trained on one base, applied to a base of another size, fails: with the
/// tensor's name and both shapes where the shapes differ, whether given as `adapter` or as
/// the model directory (whose `base_model_name_or_path` names the other base); with the
/// config key and both values where every adapter tensor fits but the bases differ (another
/// `intermediate_size` leaves q_proj and v_proj, PEFT's default targets, the same shape).
#[test]
fn an_adapter_for_another_size_is_refused() {
    let lora = LoraConfig {
        r: 4,
        ..Default::default()
    };
    let m = Model::load(
        &fixtures().join("llama-gqa"),
        &LoadOptions {
            training: Training::Lora(lora),
            ..Default::default()
        },
    )
    .unwrap();
    let adapter = tempfile::tempdir().unwrap();
    m.save_adapter(adapter.path()).unwrap();
    let with_adapter = LoadOptions {
        adapter: Some(adapter.path().to_path_buf()),
        ..Default::default()
    };

    let narrower = other_base(&[("hidden_size", 32), ("head_dim", 8)]);
    let e = Model::load(narrower.path(), &with_adapter)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("lora_A.weight") && e.contains("[4, 64]") && e.contains("[4, 32]"),
        "{e}"
    );

    let wider_mlp = other_base(&[("intermediate_size", 128)]);
    let e = Model::load(wider_mlp.path(), &with_adapter)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("intermediate_size") && e.contains("160") && e.contains("128"),
        "{e}"
    );
    // The same adapter on its own base still loads.
    Model::load(&fixtures().join("llama-gqa"), &with_adapter).unwrap();

    rebase(adapter.path(), narrower.path());
    let e = Model::load(adapter.path(), &LoadOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("lora_A.weight") && e.contains("[4, 64]") && e.contains("[4, 32]"),
        "{e}"
    );
}
