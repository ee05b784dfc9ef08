//! The JSONL records reader: any bytes as a training file, read as each record format (pairs
//! and rankings, demonstrations, KTO rows, prompts), strict and skipping bad rows. Errors are
//! fine; a panic is a bug.
#![no_main]

#[path = "scratch.rs"]
mod scratch;

use libfuzzer_sys::fuzz_target;
use rlhf_data::{load, Comparison, Demonstration, PromptRecord, ReadOptions, UnpairedPreference};

fuzz_target!(|data: &[u8]| {
    let path = scratch::file("rows.jsonl", data);
    for skip_invalid in [false, true] {
        let opts = ReadOptions { skip_invalid };
        if let Ok(l) = load::<Comparison>(&path, &opts) {
            for c in &l.records {
                let _ = c.pairs();
            }
        }
        let _ = load::<Demonstration>(&path, &opts);
        let _ = load::<UnpairedPreference>(&path, &opts);
        let _ = load::<PromptRecord>(&path, &opts);
    }
});
