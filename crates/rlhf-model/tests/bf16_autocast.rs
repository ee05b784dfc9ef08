//! bf16 autocast (`bf16 = true`, issue #20): every product reads its operands rounded to bf16
//! and sums in f32, as torch's CPU autocast runs a matmul.
//!
//! The switch is process-wide ([`kernels::Autocast`]), so these tests keep to this binary and
//! take turns (`TURN`): a product of another test must not change precision under it.

mod common;

use std::sync::Mutex;

use common::*;
use rlhf_model::kernels;

static TURN: Mutex<()> = Mutex::new(());

/// `round_bf16` is round-to-nearest-even, as `half` (and torch) convert: on values, ties, the
/// largest floats (which round to infinity), infinities, and NaNs (which stay NaN).
#[test]
fn rounding_is_nearest_even() {
    let mut xs = values(4096, 1);
    xs.extend([
        0.0,
        -0.0,
        1.0 + 1.0 / 256.0,
        1.0 + 3.0 / 256.0,
        f32::MAX,
        f32::MIN_POSITIVE,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::from_bits(0x3F80_8000),
        f32::from_bits(0x3F81_8000),
    ]);
    for &x in &xs {
        let want = half::bf16::from_f32(x).to_f32();
        assert_eq!(kernels::round_bf16(x).to_bits(), want.to_bits(), "{x:e}");
    }
    for bits in [0x7FC0_0000u32, 0x7F80_0001, 0xFFFF_FFFF, 0x7FFF_FFFF] {
        assert!(
            kernels::round_bf16(f32::from_bits(bits)).is_nan(),
            "{bits:#x}"
        );
    }
}

#[test]
fn products_round_their_operands() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    autocast_products_round_their_operands();
}

/// The logits of every architecture under autocast lie as close to torch's autocast logits
/// as torch's own fp32 logits do, or closer; and they are not the f32 logits.
///
/// The tolerance is the reference's own spread: torch's autocast also rounds every product's
/// output, RoPE and the attention probabilities to bf16, which this implementation (products
/// only, as the issue asks) does not, so the two cannot agree to fp32 precision; a bf16
/// implementation should agree with torch's autocast at least as well as exact fp32 does.
#[test]
fn logits_follow_torch_autocast() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    check_autocast_logits();
}

/// An 80-token sequence: attention's products have more than 64 rows (the bf16 kernel where
/// the CPU has AVX512_BF16), fused attention (llama-gqa) and composed (gpt2).
#[test]
fn long_sequence_logits_follow_torch_autocast() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    for arch in ["llama-gqa", "gpt2"] {
        check_long_autocast_logits(arch);
        check_long_autocast_grads(arch);
    }
}

/// Sampling under `bf16 = true` decodes from `Model::bf16_decoding_copy` (weights kept in
/// bf16, read in place by the bf16 kernel): for a fully trained policy it computes what the
/// policy itself computes under autocast (the same rounded operands; only the order of f32
/// sums differs), so greedy decoding gives the same tokens. For a LoRA policy the adapters
/// are merged before the weights are rounded, so the copy's log-probabilities follow the
/// adapted policy's (within bf16 rounding), not the base's.
#[test]
fn the_bf16_decoding_copy_decodes_as_the_policy_does_under_autocast() {
    use rlhf_model::generate::{generate, GenerationConfig};
    use rlhf_model::lora::LoraConfig;
    use rlhf_model::{LoadOptions, Model, Training};
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let dir = fixtures().join("llama-gqa");
    let prompts: Vec<Vec<u32>> = (0..5u32)
        .map(|r| {
            (0..6 + 3 * r)
                .map(|i| (7 * i + 13 * r + 1) % 90 + 3)
                .collect()
        })
        .collect();
    let cfg = GenerationConfig {
        max_new_tokens: 10,
        ..Default::default()
    };
    let _ac = kernels::Autocast::bf16(true);

    let full = Model::load(
        &dir,
        &LoadOptions {
            training: Training::Full,
            ..Default::default()
        },
    )
    .unwrap();
    let copy = full
        .bf16_decoding_copy()
        .unwrap()
        .expect("a llama converts");
    let (want, got) = (
        generate(&full, &prompts, &cfg).unwrap(),
        generate(&copy, &prompts, &cfg).unwrap(),
    );
    let exact = {
        let _off = kernels::Autocast::bf16(false);
        generate(&full, &prompts, &cfg).unwrap()
    };
    let (mut d_copy, mut d_autocast) = (0f32, 0f32);
    for (i, ((g, w), e)) in got.iter().zip(&want).zip(&exact).enumerate() {
        assert_eq!(g.completion_ids, w.completion_ids, "row {i}");
        for ((a, b), c) in g.logprobs.iter().zip(&w.logprobs).zip(&e.logprobs) {
            d_copy = d_copy.max((a - b).abs());
            d_autocast = d_autocast.max((b - c).abs());
        }
    }
    eprintln!(
        "log-probs: copy vs policy under autocast {d_copy:.2e}; autocast vs f32 {d_autocast:.2e}"
    );
    // The same products but for the order of f32 sums; and autocast did change them.
    assert!(d_copy <= 1e-4, "copy vs policy {d_copy}");
    assert!(d_autocast > 1e-3, "autocast vs f32 {d_autocast}");

    // LoRA with non-zero adapters (B starts at zero; give it values).
    let lora = Model::load(
        &dir,
        &LoadOptions {
            training: Training::Lora(LoraConfig {
                r: 4,
                lora_alpha: 16.0,
                ..Default::default()
            }),
            ..Default::default()
        },
    )
    .unwrap();
    // Deterministic values (candle's randn is not seeded), a different run per module.
    for (i, (name, p)) in lora.params().iter().enumerate() {
        if let (true, rlhf_model::weights::Param::Trainable(v)) = (name.contains("lora_B"), p) {
            let b: Vec<f32> = values(v.elem_count(), 100 + i as u32)
                .iter()
                .map(|x| 0.5 * x)
                .collect();
            let t = candle_core::Tensor::from_vec(b, v.shape(), v.device()).unwrap();
            v.set(&t).unwrap();
        }
    }
    let base = Model::load(&dir, &LoadOptions::default()).unwrap();
    let copy = lora
        .bf16_decoding_copy()
        .unwrap()
        .expect("a llama converts");
    let one = |m: &Model| -> Vec<f32> {
        generate(
            m,
            &prompts,
            &GenerationConfig {
                max_new_tokens: 1,
                ..cfg.clone()
            },
        )
        .unwrap()
        .iter()
        .map(|g| g.logprobs[0])
        .collect()
    };
    let (adapted, merged, plain) = (one(&lora), one(&copy), one(&base));
    let exact = {
        let _off = kernels::Autocast::bf16(false);
        one(&lora)
    };
    let dist = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max)
    };
    eprintln!(
        "first log-prob: copy vs adapted policy {:.2e}, adapted under autocast vs in f32 {:.2e}, \
         adapted vs base {:.2e}",
        dist(&merged, &adapted),
        dist(&adapted, &exact),
        dist(&adapted, &plain)
    );
    // Merging before rounding is one more bf16 rounding of the same size as autocast's own: the
    // copy lies within twice autocast's distance from f32 of the adapted policy, the adapters'
    // effect is larger than that, and the copy lies nearer the adapted policy than the base.
    let bound = 2.0 * dist(&adapted, &exact);
    assert!(
        dist(&merged, &adapted) <= bound,
        "copy vs adapted beyond {bound}"
    );
    assert!(
        dist(&adapted, &plain) > bound,
        "the adapters changed too little"
    );
    assert!(
        dist(&merged, &adapted) < dist(&merged, &plain),
        "the copy decodes nearer the base than the adapted policy"
    );
}
