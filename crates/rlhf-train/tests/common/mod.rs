//! What the trainer tests share: the fixture folder and the TRL fixture pairs as a data file.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// `../shared/fixtures` beside the repository (CI clones the repo with shared/ beside it).
pub fn shared() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../../shared/fixtures"
    ))
}

/// A TRL trajectory fixture, `shared/fixtures/trl/NAME`.
pub fn trl_fixture(name: &str) -> serde_json::Value {
    let p = shared().join("trl").join(name);
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

/// The `pairs` of the TRL fixture `name` as `dir/pairs.jsonl`, one JSON object per line.
pub fn pairs_file_of(dir: &Path, name: &str) -> PathBuf {
    let rows: Vec<String> = trl_fixture(name)["pairs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.to_string())
        .collect();
    let p = dir.join("pairs.jsonl");
    std::fs::write(&p, rows.join("\n") + "\n").unwrap();
    p
}

/// The 8 pairs of the reward fixture (`trl/reward-llama-gqa.json`) as `dir/pairs.jsonl`.
pub fn pairs_file(dir: &Path) -> PathBuf {
    pairs_file_of(dir, "reward-llama-gqa.json")
}
