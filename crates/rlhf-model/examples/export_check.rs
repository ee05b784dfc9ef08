//! Writes what rlhf-model saves (a PEFT adapter with its score head, the merged reward model,
//! and a fully fine-tuned causal LM) for every fixture architecture, with this crate's outputs
//! beside them, so `scripts/check_hf_compat.py` can load them in transformers and PEFT and
//! compare.
//!
//! cargo run --release -p rlhf-model --example export_check -- OUT_DIR

use std::path::PathBuf;

use candle_core::Tensor;
use rlhf_model::lora::{LoraConfig, TargetModules};
use rlhf_model::{Batch, Heads, LoadOptions, Model, Training};

fn main() -> rlhf_model::Result<()> {
    let out = PathBuf::from(
        std::env::args()
            .nth(1)
            .expect("usage: export_check OUT_DIR"),
    );
    let fixtures = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../../shared/fixtures/models"
    ));
    let mut report = serde_json::Map::new();
    for arch in ["llama-gqa", "qwen2", "gpt2", "opt"] {
        let golden: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(fixtures.join(arch).join("golden.json")).unwrap(),
        )
        .unwrap();
        let batch = Batch {
            input_ids: serde_json::from_value(golden["input_ids"].clone()).unwrap(),
            attention_mask: serde_json::from_value(golden["attention_mask"].clone()).unwrap(),
        };
        let perturb = |m: &Model| -> rlhf_model::Result<()> {
            for (i, (_, v)) in m.params().trainable().into_iter().enumerate() {
                let noise = (Tensor::ones_like(v.as_tensor())? * (0.01 * (1 + i % 5) as f64))?;
                v.set(&(v.as_tensor() + noise)?)?;
            }
            Ok(())
        };
        // A LoRA reward model on the causal checkpoint: adapter + score head, and merged.
        let lora = LoraConfig {
            r: 4,
            lora_alpha: 16.0,
            task_type: Some("SEQ_CLS".into()),
            target_modules: Some(TargetModules::One("all-linear".into())),
            ..Default::default()
        };
        let rm = Model::load(
            &fixtures.join(arch),
            &LoadOptions {
                heads: Heads::Score,
                training: Training::Lora(lora),
                ..Default::default()
            },
        )?;
        perturb(&rm)?;
        let scores = rm.scores(&rm.hidden(&batch)?, &batch)?.to_vec1::<f32>()?;
        rm.save_adapter(&out.join(arch).join("adapter"))?;
        rm.save_pretrained(&out.join(arch).join("merged-rm"), Heads::Score)?;
        // A fully fine-tuned causal LM.
        let lm = Model::load(
            &fixtures.join(arch),
            &LoadOptions {
                heads: Heads::Lm,
                training: Training::Full,
                ..Default::default()
            },
        )?;
        perturb(&lm)?;
        let logits = lm.logits(&lm.hidden(&batch)?)?;
        let last: Vec<f32> = logits.narrow(1, 0, 1)?.flatten_all()?.to_vec1()?;
        lm.save_pretrained(&out.join(arch).join("full-lm"), Heads::Lm)?;
        report.insert(
            arch.into(),
            serde_json::json!({"base": fixtures.join(arch), "scores": scores, "first_logits": last,
                                "input_ids": golden["input_ids"], "attention_mask": golden["attention_mask"]}),
        );
    }
    std::fs::write(
        out.join("expected.json"),
        serde_json::to_string(&report).unwrap(),
    )
    .unwrap();
    eprintln!("wrote {}", out.display());
    Ok(())
}
