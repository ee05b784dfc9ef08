//! Token ids identical to TRL 1.16's own dataset preparation.
//!
//! - `shared/fixtures/trl/reward-*.json`: RewardTrainer's `chosen_ids`/`rejected_ids` for 8
//!   plain-text pairs (EOS appended), and `dpo-*.json`: DPOTrainer's prompt/chosen/rejected ids.
//! - `tests/data/trl_cases.json` (made by `tests/data/make_trl_fixtures.py` with TRL itself):
//!   conversational reward pairs (explicit and implicit prompt), SFT prompt-completion (text and
//!   conversational), text and `messages` rows (assistant-only loss through `{% generation %}`),
//!   DPO conversational and implicit-prompt rows; half of them with a tokenizer whose
//!   post-processor adds BOS, which shows where TRL encodes with and without special tokens.

use std::path::{Path, PathBuf};

use rlhf_data::*;
use rlhf_model::tokenizer::Tokenizer;
use serde_json::Value;

/// `shared/` beside the repository (CI clones the repo with shared/ beside it).
fn shared() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../../shared/fixtures"
    ))
}

fn read_json(p: &Path) -> Value {
    let text = std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap()
}

fn ids(v: &Value) -> Vec<Vec<u32>> {
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

fn labels(v: &Value) -> Vec<Vec<i64>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_i64().unwrap())
                .collect()
        })
        .collect()
}

/// Rows as records, through the same parser the files go through.
fn parse<T: Record>(rows: &Value) -> Vec<T> {
    let raw = rows.as_array().unwrap().iter().enumerate().map(|(i, r)| {
        Ok(RawRow {
            at: Location::line(Path::new("fixture.jsonl"), i + 1),
            fields: r.as_object().unwrap().clone(),
        })
    });
    from_rows(Path::new("fixture.jsonl"), raw, &ReadOptions::default())
        .unwrap()
        .records
}

fn fixture_files(prefix: &str) -> Vec<PathBuf> {
    let dir = shared().join("trl");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_str().unwrap();
            name.starts_with(prefix) && name.ends_with(".json")
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no {prefix}*.json in {}", dir.display());
    files
}

#[test]
fn reward_pairs_match_trl_fixtures() {
    for file in fixture_files("reward-") {
        let f = read_json(&file);
        let tok = Tokenizer::from_dir(
            &shared()
                .join("models")
                .join(f["model_dir"].as_str().unwrap()),
        )
        .unwrap();
        let records: Vec<Comparison> = parse(&f["pairs"]);
        let out = tokenize_comparisons(&tok, &records, &TokenizeOptions::default()).unwrap();
        let pairs: Vec<&RewardPair> = out.examples.iter().flat_map(|g| &g.pairs).collect();
        let chosen: Vec<Vec<u32>> = pairs.iter().map(|p| p.chosen_ids.clone()).collect();
        let rejected: Vec<Vec<u32>> = pairs.iter().map(|p| p.rejected_ids.clone()).collect();
        assert_eq!(
            chosen,
            ids(&f["tokenized"]["chosen_ids"]),
            "{}",
            file.display()
        );
        assert_eq!(
            rejected,
            ids(&f["tokenized"]["rejected_ids"]),
            "{}",
            file.display()
        );
        // The margin column reaches the batch as TRL's collator passes it on.
        let want: Vec<Option<f32>> = f["pairs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.get("margin").map(|m| m.as_f64().unwrap() as f32))
            .collect();
        let got: Vec<Option<f32>> = pairs.iter().map(|p| p.margin).collect();
        assert_eq!(got, want, "{}", file.display());
        assert_eq!(out.report.truncated, 0);
    }
}

#[test]
fn dpo_pairs_match_trl_fixtures() {
    for file in fixture_files("dpo-") {
        let f = read_json(&file);
        let tok = Tokenizer::from_dir(
            &shared()
                .join("models")
                .join(f["model_dir"].as_str().unwrap()),
        )
        .unwrap();
        let records: Vec<Comparison> = parse(&f["pairs"]);
        let out = tokenize_dpo(&tok, &records, &TokenizeOptions::default()).unwrap();
        check_dpo(&out.examples, &f["tokenized"], &file.display().to_string());
    }
}

fn check_dpo(examples: &[DpoExample], want: &Value, what: &str) {
    let col =
        |f: fn(&DpoExample) -> &Vec<u32>| examples.iter().map(|e| f(e).clone()).collect::<Vec<_>>();
    assert_eq!(col(|e| &e.prompt_ids), ids(&want["prompt_ids"]), "{what}");
    assert_eq!(col(|e| &e.chosen_ids), ids(&want["chosen_ids"]), "{what}");
    assert_eq!(
        col(|e| &e.rejected_ids),
        ids(&want["rejected_ids"]),
        "{what}"
    );
}

/// The fixture tokenizer of trl_cases.json: gpt2's with the chat template, and for "bos" the
/// BOS-adding post-processor, written to a temporary directory as the generator did.
fn case_tokenizer(doc: &Value, variant: &str, dir: &Path) -> Tokenizer {
    let src = shared()
        .join("models")
        .join(doc["base_tokenizer"].as_str().unwrap());
    let mut tj = read_json(&src.join("tokenizer.json"));
    if variant == "bos" {
        tj["post_processor"] = doc["bos_post_processor"].clone();
    }
    let mut cfg = read_json(&src.join("tokenizer_config.json"));
    cfg["chat_template"] = doc["chat_template"].clone();
    let d = dir.join(variant);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("tokenizer.json"), tj.to_string()).unwrap();
    std::fs::write(d.join("tokenizer_config.json"), cfg.to_string()).unwrap();
    Tokenizer::from_dir(&d).unwrap()
}

#[test]
fn generated_trl_cases_match() {
    let doc = read_json(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/trl_cases.json"));
    let tmp = tempfile::tempdir().unwrap();
    let mut checked = 0;
    for (n, case) in doc["cases"].as_array().unwrap().iter().enumerate() {
        let tok = case_tokenizer(&doc, case["tokenizer"].as_str().unwrap(), tmp.path());
        let want = &case["expected"];
        let what = format!("case {n}: {} {}", case["trainer"], case["rows"]);
        match case["trainer"].as_str().unwrap() {
            "reward" => {
                let records: Vec<Comparison> = parse(&case["rows"]);
                let out =
                    tokenize_comparisons(&tok, &records, &TokenizeOptions::default()).unwrap();
                let pairs: Vec<&RewardPair> = out.examples.iter().flat_map(|g| &g.pairs).collect();
                let c: Vec<Vec<u32>> = pairs.iter().map(|p| p.chosen_ids.clone()).collect();
                let r: Vec<Vec<u32>> = pairs.iter().map(|p| p.rejected_ids.clone()).collect();
                assert_eq!(c, ids(&want["chosen_ids"]), "{what}");
                assert_eq!(r, ids(&want["rejected_ids"]), "{what}");
            }
            "sft" => {
                let records: Vec<Demonstration> = parse(&case["rows"]);
                let opts = TokenizeOptions {
                    assistant_only_loss: case["config"]["assistant_only_loss"]
                        .as_bool()
                        .unwrap_or(false),
                    ..Default::default()
                };
                let out = tokenize_demonstrations(&tok, &records, &opts).unwrap();
                let got_ids: Vec<Vec<u32>> =
                    out.examples.iter().map(|e| e.input_ids.clone()).collect();
                let got_labels: Vec<Vec<i64>> =
                    out.examples.iter().map(|e| e.labels.clone()).collect();
                assert_eq!(got_ids, ids(&want["input_ids"]), "{what}");
                assert_eq!(got_labels, labels(&want["labels"]), "{what}");
            }
            "dpo" => {
                let records: Vec<Comparison> = parse(&case["rows"]);
                let out = tokenize_dpo(&tok, &records, &TokenizeOptions::default()).unwrap();
                check_dpo(&out.examples, want, &what);
            }
            other => panic!("unknown trainer {other}"),
        }
        checked += 1;
    }
    assert_eq!(checked, 10);
}
