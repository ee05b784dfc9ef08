//! Shared helpers for the parity tests: fixture paths and golden files.
#![allow(dead_code)]

use std::path::PathBuf;

/// `shared/fixtures/models` beside the repository (CI clones the repo with shared/ beside it).
pub fn fixtures() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../../shared/fixtures/models"
    ))
}

/// The golden.json of one fixture model.
pub fn golden(arch: &str) -> serde_json::Value {
    let p = fixtures().join(arch).join("golden.json");
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap()
}

/// A JSON array of arrays of integers.
pub fn ids2(v: &serde_json::Value) -> Vec<Vec<u32>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        })
        .collect()
}

/// A JSON array of integers.
pub fn ids1(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Flattens a nested JSON array of numbers.
pub fn flat_f32(v: &serde_json::Value, out: &mut Vec<f32>) {
    match v {
        serde_json::Value::Array(a) => a.iter().for_each(|x| flat_f32(x, out)),
        serde_json::Value::Number(n) => out.push(n.as_f64().unwrap() as f32),
        _ => panic!("not a number: {v}"),
    }
}

/// Largest absolute difference of two equal-length slices.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// The logits torch's CPU autocast computes for arch's golden batch
/// (`tests/data/make_bf16_fixtures.py`), and how far they lie from its fp32 logits.
pub fn autocast_reference(arch: &str) -> (Vec<f32>, f32) {
    let p = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/bf16_autocast.json"
    ));
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let case = &v["archs"][arch];
    let mut logits = Vec::new();
    flat_f32(&case["logits_autocast"], &mut logits);
    (
        logits,
        case["max_abs_autocast_vs_f32"].as_f64().unwrap() as f32,
    )
}

/// Max |a - b| over the positions the golden batch's attention mask keeps (vocab `v` wide).
pub fn masked_max_abs_diff(arch: &str, a: &[f32], b: &[f32], v: usize) -> f32 {
    let mask: Vec<u32> = ids2(&golden(arch)["attention_mask"]).concat();
    assert_eq!(a.len(), mask.len() * v);
    assert_eq!(b.len(), a.len());
    let mut d = 0f32;
    for (pos, &m) in mask.iter().enumerate() {
        if m == 1 {
            d = d.max(max_abs_diff(
                &a[pos * v..(pos + 1) * v],
                &b[pos * v..(pos + 1) * v],
            ));
        }
    }
    d
}

/// Logits of arch's golden batch, flat, from a freshly loaded fixture model.
pub fn golden_logits(arch: &str) -> Vec<f32> {
    let g = golden(arch);
    let batch = rlhf_model::Batch {
        input_ids: ids2(&g["input_ids"]),
        attention_mask: ids2(&g["attention_mask"])
            .into_iter()
            .map(|r| r.into_iter().map(|x| x as u8).collect())
            .collect(),
    };
    let model =
        rlhf_model::Model::load(&fixtures().join(arch), &rlhf_model::LoadOptions::default())
            .unwrap();
    let hidden = model.hidden(&batch).unwrap();
    rlhf_model::ops::to_vec_f32(&model.logits(&hidden).unwrap()).unwrap()
}
