//! Gradients reach every trainable parameter, and autograd agrees with finite differences.
//!
//! This is the trap candle-transformers' models fall into: their fast ops have no backward
//! pass, so most parameters silently get no gradient while the loss still falls.

mod common;

use candle_core::{DType, Tensor};
use common::*;
use rlhf_model::lora::{LoraConfig, TargetModules};
use rlhf_model::weights::Param;
use rlhf_model::{Batch, Heads, LoadOptions, Model, Training};

fn golden_batch(arch: &str) -> Batch {
    let g = golden(arch);
    Batch {
        input_ids: ids2(&g["input_ids"]),
        attention_mask: ids2(&g["attention_mask"])
            .into_iter()
            .map(|r| r.into_iter().map(|x| x as u8).collect())
            .collect(),
    }
}

/// Next-token cross-entropy plus the score of each row: touches the LM head and the score head.
fn loss(model: &Model, batch: &Batch) -> Tensor {
    let hidden = model.hidden(batch).unwrap();
    let logits = model.logits(&hidden).unwrap();
    let (b, t, v) = logits.dims3().unwrap();
    let mut labels = Vec::new();
    for r in 0..b {
        for i in 0..t {
            let next = if i + 1 < t && batch.attention_mask[r][i + 1] == 1 {
                batch.input_ids[r][i + 1] as i64
            } else {
                -100
            };
            labels.push(next);
        }
    }
    let logits = logits
        .reshape((b * t, v))
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let ce = rlhf_model::ops::cross_entropy(&logits, &labels).unwrap();
    let scores = model
        .scores(&hidden, batch)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    (ce + scores.sum_all().unwrap()).unwrap()
}

fn load(arch: &str, training: Training, dtype: DType) -> Model {
    Model::load(
        &fixtures().join(arch),
        &LoadOptions {
            heads: Heads::LmAndScore,
            training,
            dtype,
            ..Default::default()
        },
    )
    .unwrap()
}

fn every_parameter_gets_a_gradient(arch: &str) {
    let model = load(arch, Training::Full, DType::F32);
    let batch = golden_batch(arch);
    let grads = loss(&model, &batch).backward().unwrap();
    let trainable = model.params().trainable();
    assert!(
        trainable.len() > 10,
        "{arch}: only {} trainable tensors",
        trainable.len()
    );
    let mut missing = Vec::new();
    for (name, var) in &trainable {
        match grads.get(var.as_tensor()) {
            Some(g)
                if g.abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
                    > 0.0 => {}
            _ => missing.push(name.clone()),
        }
    }
    assert!(missing.is_empty(), "{arch}: no gradient for {missing:?}");
}

/// Central differences in f64 on a few elements of a few parameters.
fn autograd_matches_finite_differences(arch: &str) {
    let model = load(arch, Training::Full, DType::F64);
    let batch = golden_batch(arch);
    let grads = loss(&model, &batch).backward().unwrap();
    let trainable = model.params().trainable();
    let picks = [
        0usize,
        trainable.len() / 3,
        trainable.len() / 2,
        trainable.len() - 1,
    ];
    for &p in &picks {
        let (name, var) = &trainable[p];
        let g = grads
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let orig = var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let shape = var.as_tensor().shape().clone();
        for &k in &[0usize, orig.len() / 2, orig.len() - 1] {
            let eps = 1e-5;
            let at = |delta: f64| {
                let mut v = orig.clone();
                v[k] += delta;
                var.set(&Tensor::from_vec(v, shape.clone(), var.device()).unwrap())
                    .unwrap();
                loss(&model, &batch).to_scalar::<f64>().unwrap()
            };
            let fd = (at(eps) - at(-eps)) / (2.0 * eps);
            var.set(&Tensor::from_vec(orig.clone(), shape.clone(), var.device()).unwrap())
                .unwrap();
            let tol = 1e-6 + 1e-4 * fd.abs().max(g[k].abs());
            assert!(
                (fd - g[k]).abs() < tol,
                "{arch}: {name}[{k}] autograd {} vs finite difference {fd}",
                g[k]
            );
        }
    }
}

/// With LoRA only adapters and modules_to_save train; the base gets no gradient at all, and
/// disabling adapters gives back the base model's outputs exactly.
fn lora_trains_only_adapters(arch: &str) {
    let cfg = LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        target_modules: Some(TargetModules::One("all-linear".into())),
        task_type: Some("SEQ_CLS".into()),
        ..Default::default()
    };
    let model = load(arch, Training::Lora(cfg), DType::F32);
    let batch = golden_batch(arch);
    let base = rlhf_model::ops::to_vec_f32(&model.logits(&model.hidden(&batch).unwrap()).unwrap())
        .unwrap();
    // B starts at zero (the adapted model equals the base); move it so A gets a gradient too.
    for (name, var) in model.params().trainable() {
        if name.ends_with("lora_B.weight") {
            let t = (Tensor::ones_like(var.as_tensor()).unwrap() * 0.05).unwrap();
            var.set(&t).unwrap();
        }
    }
    let grads = loss(&model, &batch).backward().unwrap();
    let mut n_lora = 0;
    for (name, p) in model.params().iter() {
        match p {
            Param::Trainable(v) => {
                assert!(
                    name.contains("lora_") || name == "score.weight",
                    "{arch}: {name} should be frozen"
                );
                n_lora += name.contains("lora_") as usize;
                let g = grads
                    .get(v.as_tensor())
                    .unwrap_or_else(|| panic!("{arch}: no grad for {name}"));
                assert!(
                    g.abs()
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap()
                        > 0.0,
                    "{arch}: zero grad for {name}"
                );
            }
            Param::Frozen(t) => assert!(
                grads.get(t).is_none(),
                "{arch}: frozen {name} got a gradient"
            ),
            // Kept in the kernel's layout: no tensor of the graph at all.
            Param::Kernel(_) => {}
        }
    }
    assert!(n_lora >= 2 * 4, "{arch}: only {n_lora} LoRA tensors");
    let adapted =
        rlhf_model::ops::to_vec_f32(&model.logits(&model.hidden(&batch).unwrap()).unwrap())
            .unwrap();
    assert!(
        max_abs_diff(&adapted, &base) > 1e-3,
        "{arch}: adapters change nothing"
    );
    // Without graph recording the outputs are the same and keep no graph alive.
    model.set_grad_enabled(false);
    let h = model.hidden(&batch).unwrap();
    let logits = model.logits(&h).unwrap();
    assert!(
        !logits.track_op(),
        "{arch}: no-grad forward still records a graph"
    );
    assert_eq!(
        max_abs_diff(&rlhf_model::ops::to_vec_f32(&logits).unwrap(), &adapted),
        0.0
    );
    model.set_grad_enabled(true);
    model.set_adapters_enabled(false);
    let off = rlhf_model::ops::to_vec_f32(&model.logits(&model.hidden(&batch).unwrap()).unwrap())
        .unwrap();
    assert_eq!(
        max_abs_diff(&off, &base),
        0.0,
        "{arch}: disabled adapters differ from base"
    );
}

macro_rules! grad_tests {
    ($($name:ident => $arch:expr),*) => {$(
        mod $name {
            #[test]
            fn every_parameter_gets_a_gradient() { super::every_parameter_gets_a_gradient($arch) }
            #[test]
            fn autograd_matches_finite_differences() { super::autograd_matches_finite_differences($arch) }
            #[test]
            fn lora_trains_only_adapters() { super::lora_trains_only_adapters($arch) }
        }
    )*};
}

grad_tests!(llama_gqa => "llama-gqa", qwen2 => "qwen2", gpt2 => "gpt2", opt => "opt");
