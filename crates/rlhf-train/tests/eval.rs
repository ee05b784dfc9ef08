//! `rlhf eval` end to end on the tiny llama fixture: answers generated and judged by a reward
//! program, a reward model and a pairwise LLM judge; eval.json's columns; KL of a policy
//! against itself; a baseline read from a file; generations kept when a judge fails.

use std::path::{Path, PathBuf};

use rlhf_train::eval::{self, EvalConfig};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../../shared/fixtures/models"
    ))
    .join(name)
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// Six prompts and a judge program scoring an answer by its length in characters.
fn setup(dir: &Path) -> (PathBuf, PathBuf) {
    let prompts = write(
        dir,
        "prompts.jsonl",
        "{\"prompt\": \"a b c\"}\n{\"prompt\": \"d e\"}\n{\"prompt\": \"f g h i\"}\n\
         {\"prompt\": \"j\"}\n{\"prompt\": \"k l\"}\n{\"prompt\": \"m n o\"}\n",
    );
    let judge = write(
        dir,
        "judge.py",
        "import json, sys\n\
         for line in sys.stdin:\n\
         \x20   row = json.loads(line)\n\
         \x20   print(json.dumps({\"score\": len(row[\"completion\"])}), flush=True)\n",
    );
    (prompts, judge)
}

fn config(dir: &Path, extra: &str) -> EvalConfig {
    let (prompts, judge) = setup(dir);
    let text = format!(
        "model = {model:?}\neval_file = {prompts:?}\noutput_dir = {out:?}\n\
         max_new_tokens = 6\nper_device_eval_batch_size = 4\n{extra}\n\
         [judges.length]\nreward_program = [\"python3\", {judge:?}]\n",
        model = fixture("llama-gqa"),
        out = dir.join("out"),
    );
    let path = write(dir, "eval.toml", &text);
    EvalConfig::load(&path, &[]).unwrap()
}

/// The policy against itself: every answer ties, so win_rate is ½, nobody wins, the length
/// controlled rate is ½ too, and KL(policy ‖ itself) is 0 up to the float error between the
/// sampler's log-probs and a full forward pass.
#[test]
fn a_policy_against_itself_ties_everywhere_with_zero_kl() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(
        dir.path(),
        &format!(
            "baseline_model = {:?}\nkl_samples = 3",
            fixture("llama-gqa")
        ),
    );
    cfg.judges.insert(
        "rm".into(),
        eval::JudgeSpec {
            scorer: rlhf_train::scoring::ScorerSpec {
                reward_model: Some(fixture("llama-gqa-reward")),
                ..Default::default()
            },
            ..Default::default()
        },
    );
    cfg.judges.insert(
        "llm".into(),
        eval::JudgeSpec {
            judge_model: Some(fixture("llama-gqa")),
            // The fixture reads 128 positions: the default template does not fit.
            judge_template: Some("Q {prompt} A {response_1} B {response_2} Best=".into()),
            ..Default::default()
        },
    );
    let report = eval::run(&cfg).unwrap();
    assert_eq!(report.n_prompts, 6);
    assert_eq!(report.rows.len(), 6);
    for name in ["length", "rm", "llm"] {
        let j = &report.judges[name];
        let r = &j.rates;
        assert_eq!(
            (r.n_wins, r.n_wins_base, r.n_draws, r.n_total),
            (0, 0, 6, 6),
            "{name}"
        );
        assert_eq!(r.win_rate, 0.5, "{name}");
        assert!(r.llama2_win_rate.is_none(), "{name}");
        assert!((r.length_controlled_winrate - 0.5).abs() < 1e-9, "{name}");
    }
    assert_eq!(report.judges["length"].kind, "scorer");
    assert_eq!(report.judges["llm"].kind, "pairwise");
    let length = &report.judges["length"];
    assert_eq!(length.policy_mean, length.baseline_mean);
    let kl = report.kl.expect("a reference model is given");
    assert_eq!(kl.samples, 18);
    assert!(kl.k1.abs() < 1e-3 && kl.k3.abs() < 1e-3, "{kl:?}");

    // eval.json holds every row with both answers and each judge's scores and verdicts.
    let text = std::fs::read_to_string(dir.path().join("out/eval.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let row = &v["rows"][0];
    assert_eq!(row["prompt"], "a b c");
    assert_eq!(row["policy"], row["baseline"]);
    let len = row["policy"].as_str().unwrap().chars().count() as f64;
    assert_eq!(row["scores"]["length"]["policy"].as_f64(), Some(len));
    assert_eq!(row["verdicts"]["length"], "tie");
    for key in [
        "win_rate",
        "standard_error",
        "n_wins",
        "n_wins_base",
        "n_draws",
        "n_total",
        "avg_length",
        "length_controlled_winrate",
    ] {
        assert!(v["judges"]["length"].get(key).is_some(), "{key}");
    }
}

/// A baseline file with longer answers for some prompts: the length judge counts those as
/// the baseline's wins and the rest as the policy's; a prompt missing from the file is an
/// error naming it.
#[test]
fn a_baseline_file_is_matched_by_prompt() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), "kl_samples = 0");
    let long = "x".repeat(500);
    let rows: Vec<String> = ["a b c", "d e", "f g h i", "j", "k l", "m n o"]
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let c = if i < 2 { long.as_str() } else { "" };
            serde_json::json!({"prompt": p, "completion": c}).to_string()
        })
        .collect();
    let file = write(dir.path(), "base.jsonl", &(rows.join("\n") + "\n"));
    cfg.baseline_file = Some(file.clone());
    let report = eval::run(&cfg).unwrap();
    let r = &report.judges["length"].rates;
    assert_eq!(r.n_wins_base, 2);
    assert_eq!(r.n_wins + r.n_draws, 4);
    assert!(report.kl.is_none());

    write(dir.path(), "base.jsonl", &(rows[..5].join("\n") + "\n"));
    std::fs::remove_file(dir.path().join("out/generations.json")).unwrap();
    let err = eval::run(&cfg).unwrap_err().to_string();
    assert!(
        err.contains("no answer for the prompt") && err.contains("m n o"),
        "{err}"
    );
}

/// A judge that crashes fails the run with the program's error, and the answers generated
/// before it are kept: a rerun with a working judge reads them back.
#[test]
fn answers_survive_a_failing_judge() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(
        dir.path(),
        &format!(
            "baseline_model = {:?}\nkl_samples = 0",
            fixture("llama-gqa")
        ),
    );
    let good = cfg.judges["length"].clone();
    let bad = write(
        dir.path(),
        "bad.sh",
        "#!/bin/sh\nread line\necho oops >&2\nexit 3\n",
    );
    cfg.judges.get_mut("length").unwrap().scorer.reward_program =
        Some(vec!["sh".into(), bad.display().to_string()]);
    let err = eval::run(&cfg).unwrap_err().to_string();
    assert!(err.contains("exit status: 3"), "{err}");
    let kept = dir.path().join("out/generations.json");
    assert!(kept.exists());
    let before = std::fs::metadata(&kept).unwrap().modified().unwrap();
    cfg.judges.insert("length".into(), good);
    let report = eval::run(&cfg).unwrap();
    assert_eq!(report.n_prompts, 6);
    assert_eq!(
        std::fs::metadata(&kept).unwrap().modified().unwrap(),
        before,
        "the answers were generated again"
    );
}

/// Settings that cannot make an evaluation are refused with the key named.
#[test]
fn bad_settings_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "");
    let err = eval::run(&cfg).unwrap_err().to_string();
    assert!(
        err.contains("baseline_model") && err.contains("baseline_file"),
        "{err}"
    );
    let path = write(
        dir.path(),
        "typo.toml",
        "model = \"m\"\neval_file = \"p\"\n[judges.x]\nreward_modle = \"r\"\n",
    );
    let err = EvalConfig::load(&path, &[]).unwrap_err().to_string();
    assert!(err.contains("reward_modle"), "{err}");
}
