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
    eprintln!("{arch}: max |logits - transformers| = {d:e}");
    assert!(d < 1e-4, "{arch}: logits differ from transformers by {d}");

    // The same sequences packed into one row without padding: the logits of every real
    // position match too.
    let seqs: Vec<Vec<u32>> = batch
        .input_ids
        .iter()
        .zip(&batch.attention_mask)
        .map(|(ids, m)| {
            ids.iter()
                .zip(m)
                .filter(|(_, &m)| m == 1)
                .map(|(&i, _)| i)
                .collect()
        })
        .collect();
    let (packed, starts) = model.hidden_packed(&seqs).unwrap();
    let packed = rlhf_model::ops::to_vec_f32(&model.logits(&packed).unwrap()).unwrap();
    let t = batch.input_ids[0].len();
    let vocab = got.len() / (batch.len() * t);
    let mut worst = 0f32;
    for (bi, s) in seqs.iter().enumerate() {
        let (m, s0) = (&batch.attention_mask[bi], starts[bi]);
        let real: Vec<usize> = (0..t).filter(|&j| m[j] == 1).collect();
        assert_eq!(real.len(), s.len());
        for (i, &j) in real.iter().enumerate() {
            let a = &packed[(s0 + i) * vocab..(s0 + i + 1) * vocab];
            let b = &want[(bi * t + j) * vocab..(bi * t + j + 1) * vocab];
            worst = worst.max(max_abs_diff(a, b));
        }
    }
    eprintln!("{arch}: max |packed logits - transformers| = {worst:e}");
    assert!(
        worst < 1e-4,
        "{arch}: packed logits differ from transformers by {worst}"
    );

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
    eprintln!("{arch}: max |scores - transformers| = {d:e}");
    assert!(
        d < 1e-4,
        "{arch}: scores {scores:?} vs transformers {want:?}"
    );
    let packed = rlhf_model::ops::to_vec_f32(&rm.scores_packed(&seqs).unwrap()).unwrap();
    let d = max_abs_diff(&packed, &want);
    eprintln!("{arch}: max |packed scores - transformers| = {d:e}");
    assert!(
        d < 1e-4,
        "{arch}: packed scores {packed:?} vs transformers {want:?}"
    );

    // Sequences that begin alike share their prefix when packed: the scores stay those of
    // the padded batch. Two answers to row 0's text, row 1 itself, and a prefix of row 0.
    let (a, b) = (&seqs[0], &seqs[1]);
    assert!(a.len() >= 7, "{arch}: fixture rows are long enough");
    let mut alt = a[..a.len() - 2].to_vec();
    alt.extend_from_slice(&b[..2]);
    let alike = vec![a.clone(), b.clone(), alt, a[..a.len() - 1].to_vec()];
    let pad = rm.config.pad_token_id.unwrap_or(0);
    let packed_as_padded = |seqs: &[Vec<u32>], what: &str| {
        let padded = rlhf_model::Batch::pad(seqs, pad, false);
        let h = rm.hidden(&padded).unwrap();
        let want = rlhf_model::ops::to_vec_f32(&rm.scores(&h, &padded).unwrap()).unwrap();
        let got = rlhf_model::ops::to_vec_f32(&rm.scores_packed(seqs).unwrap()).unwrap();
        let d = max_abs_diff(&got, &want);
        assert!(d < 1e-5, "{arch}: {what} scores {got:?} vs padded {want:?}");
    };
    packed_as_padded(&alike, "shared-prefix");

    // Every sequence starts with the same five tokens (as a chat template's system turn
    // does), packed once as the root; two prompts past it, each with two answers.
    let root = &a[..5];
    let cat = |parts: &[&[u32]]| -> Vec<u32> { parts.concat() };
    let rooted = vec![
        cat(&[root, &a[1..5], &a[5..7]]),
        cat(&[root, &a[1..5], &a[..2]]),
        cat(&[root, &a[2..6], &a[3..5]]),
        cat(&[root, &a[2..6], &a[4..7]]),
    ];
    packed_as_padded(&rooted, "shared-root");
}

#[test]
fn llama_gqa_matches_transformers() {
    check_logits_and_scores("llama-gqa");
}

#[test]
fn qwen2_matches_transformers() {
    check_logits_and_scores("qwen2");
}

#[test]
fn gpt2_matches_transformers() {
    check_logits_and_scores("gpt2");
}

/// The original OpenAI `gpt2` upload is a bare GPT2Model: `wte.weight`, `h.0.ln_1.weight`, ...
/// without the `transformer.` prefix. The same weights under those names give the same logits.
#[test]
fn gpt2_unprefixed_checkpoint_matches_transformers() {
    use rlhf_model::weights::WeightSource;
    let g = golden("gpt2");
    let dir = fixtures().join("gpt2");
    let tensors =
        candle_core::safetensors::load(dir.join("model.safetensors"), &candle_core::Device::Cpu)
            .unwrap()
            .into_iter()
            .map(|(name, t)| (name.trim_start_matches("transformer.").to_string(), t))
            .collect();
    let source = WeightSource::from_tensors(tensors, dir.join("model.safetensors"));
    assert!(source.contains("wte.weight") && !source.contains("transformer.wte.weight"));
    let model = Model::from_source(&dir, source, &LoadOptions::default()).unwrap();
    let batch = Batch {
        input_ids: ids2(&g["input_ids"]),
        attention_mask: ids2(&g["attention_mask"])
            .into_iter()
            .map(|r| r.into_iter().map(|x| x as u8).collect())
            .collect(),
    };
    let logits = model.logits(&model.hidden(&batch).unwrap()).unwrap();
    let got = rlhf_model::ops::to_vec_f32(&logits).unwrap();
    let mut want = Vec::new();
    flat_f32(&g["logits"], &mut want);
    let d = max_abs_diff(&got, &want);
    assert!(
        d < 1e-4,
        "unprefixed gpt2: logits differ from transformers by {d}"
    );
}

/// Includes the logits at row 2's right-padding position, which depend on the position OPT
/// gives padding (transformers' -1, row 1 of the table).
#[test]
fn opt_matches_transformers() {
    check_logits_and_scores("opt");
}

fn check_greedy(arch: &str) {
    use rlhf_model::generate::{generate, GenerationConfig};
    let g = golden(arch);
    let model = Model::load(&fixtures().join(arch), &LoadOptions::default()).unwrap();
    let cfg = GenerationConfig {
        max_new_tokens: 12,
        pad_token_id: model.config.pad_token_id.unwrap_or(0),
        ..Default::default()
    };
    let mut prompts = Vec::new();
    let mut wants = Vec::new();
    for case in g["greedy"].as_array().unwrap() {
        let prompt = ids1(&case["prompt_ids"]);
        let want = ids1(&case["greedy_ids"]);
        let got = generate(&model, std::slice::from_ref(&prompt), &cfg).unwrap();
        assert_eq!(
            got[0].completion_ids, want,
            "{arch}: unbatched greedy tokens"
        );
        prompts.push(prompt);
        wants.push(want);
    }
    // The left-padded batch transformers built must give the same tokens per row.
    let lp = &g["greedy_left_padded_batch"];
    let mask = ids2(&lp["attention_mask"]);
    let ids = ids2(&lp["input_ids"]);
    let unpadded: Vec<Vec<u32>> = ids
        .iter()
        .zip(&mask)
        .map(|(r, m)| {
            r.iter()
                .zip(m)
                .filter(|(_, &m)| m == 1)
                .map(|(&i, _)| i)
                .collect()
        })
        .collect();
    assert_eq!(
        unpadded, prompts,
        "{arch}: golden batch rows are the prompts"
    );
    let got = generate(&model, &unpadded, &cfg).unwrap();
    for (r, want) in ids2(&lp["greedy_ids"]).iter().enumerate() {
        assert_eq!(
            &got[r].completion_ids, want,
            "{arch}: left-padded batch row {r}"
        );
        assert_eq!(want, &wants[r]);
    }
}

#[test]
fn llama_gqa_greedy_matches_transformers() {
    check_greedy("llama-gqa");
}

#[test]
fn qwen2_greedy_matches_transformers() {
    check_greedy("qwen2");
}

#[test]
fn gpt2_greedy_matches_transformers() {
    check_greedy("gpt2");
}

#[test]
fn opt_greedy_matches_transformers() {
    check_greedy("opt");
}

/// Prompts of different lengths, one of them twice: every row of the left-padded batch must
/// generate what it generates alone (the fixtures' own batch has equal lengths, so this is
/// the real check).
fn check_left_padding(arch: &str) {
    use rlhf_model::generate::{generate, GenerationConfig};
    let g = golden(arch);
    let model = Model::load(&fixtures().join(arch), &LoadOptions::default()).unwrap();
    let cfg = GenerationConfig {
        max_new_tokens: 12,
        pad_token_id: model.config.pad_token_id.unwrap_or(0),
        ..Default::default()
    };
    let cases = g["greedy"].as_array().unwrap();
    let short = ids1(&cases[0]["prompt_ids"]);
    let mut long = ids1(&cases[1]["prompt_ids"]);
    long.extend(ids1(&cases[1]["greedy_ids"])[..5].iter());
    // The short prompt twice: its prompt pass runs once and its cache is copied to both
    // rows (generate's shared prefill), which must not change what either row generates.
    let prompts = vec![short.clone(), long, short];
    let batched = generate(&model, &prompts, &cfg).unwrap();
    for (r, p) in prompts.iter().enumerate() {
        let alone = generate(&model, std::slice::from_ref(p), &cfg).unwrap();
        assert_eq!(
            batched[r].completion_ids, alone[0].completion_ids,
            "{arch}: row {r}"
        );
        for (a, b) in batched[r].logprobs.iter().zip(&alone[0].logprobs) {
            assert!((a - b).abs() < 1e-4, "{arch}: row {r} logprob {a} vs {b}");
        }
    }
    // The long row continues the golden greedy sequence it was cut from.
    let want = ids1(&cases[1]["greedy_ids"]);
    assert_eq!(
        batched[1].completion_ids[..7],
        want[5..],
        "{arch}: continuation"
    );

    // Every prompt starts with the same five tokens (as a chat template's system turn):
    // generate's prompt pass runs them once and lays their cache into each row, under left
    // padding of three different widths and a repeated prompt.
    let root = &prompts[1][..5];
    let rooted: Vec<Vec<u32>> = vec![
        [root, &prompts[0]].concat(),
        prompts[1].clone(),
        [root, &prompts[0]].concat(),
        [root, &prompts[0][..1]].concat(),
    ];
    let batched = generate(&model, &rooted, &cfg).unwrap();
    for (r, p) in rooted.iter().enumerate() {
        let alone = generate(&model, std::slice::from_ref(p), &cfg).unwrap();
        assert_eq!(
            batched[r].completion_ids, alone[0].completion_ids,
            "{arch}: rooted row {r}"
        );
        for (a, b) in batched[r].logprobs.iter().zip(&alone[0].logprobs) {
            assert!(
                (a - b).abs() < 1e-4,
                "{arch}: rooted row {r} logprob {a} vs {b}"
            );
        }
    }
}

#[test]
fn llama_gqa_left_padded_generation_matches_unbatched() {
    check_left_padding("llama-gqa");
}

#[test]
fn qwen2_left_padded_generation_matches_unbatched() {
    check_left_padding("qwen2");
}

#[test]
fn gpt2_left_padded_generation_matches_unbatched() {
    check_left_padding("gpt2");
}

#[test]
fn opt_left_padded_generation_matches_unbatched() {
    check_left_padding("opt");
}
