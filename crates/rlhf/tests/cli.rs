//! The CLI contract: `rlhf generate` and `rlhf score` on the fixture checkpoints, JSONL in and
//! out, against transformers' outputs in golden.json.

use std::path::PathBuf;
use std::process::Command;

fn fixtures() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../../shared/fixtures/models"
    ))
}

fn golden(arch: &str) -> serde_json::Value {
    let p = fixtures().join(arch).join("golden.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn rlhf(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_rlhf"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn rows(stdout: &str) -> Vec<serde_json::Value> {
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn generate_greedy_matches_transformers() {
    let g = golden("llama-gqa");
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("prompts.jsonl");
    let lines: Vec<String> = g["greedy"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| serde_json::json!({"prompt": c["prompt"], "id": c["prompt"]}).to_string())
        .collect();
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let model = fixtures().join("llama-gqa");
    let (ok, out, err) = rlhf(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--max-new-tokens",
        "12",
        "--temperature",
        "0",
    ]);
    assert!(ok, "{err}");
    let rows = rows(&out);
    assert_eq!(rows.len(), 2);
    for (row, case) in rows.iter().zip(g["greedy"].as_array().unwrap()) {
        assert_eq!(row["id"], case["prompt"], "input fields are kept");
        // EOS (id 0) may end a row early; the tokens before it must match.
        let got: Vec<u64> = row["completion_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .collect();
        let want: Vec<u64> = case["greedy_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .collect();
        assert_eq!(got[..], want[..got.len()], "greedy tokens");
        assert!(row["completion"].is_string());
    }
}

#[test]
fn sampling_is_seeded_and_writes_the_output_file() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("p.jsonl");
    std::fs::write(&input, "{\"prompt\": \"A reward model\"}\n").unwrap();
    let model = fixtures().join("qwen2");
    let run = |seed: &str, out: &str| {
        let o = dir.path().join(out);
        let (ok, _, err) = rlhf(&[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--input",
            input.to_str().unwrap(),
            "--output",
            o.to_str().unwrap(),
            "--max-new-tokens",
            "16",
            "--temperature",
            "1.0",
            "--top-k",
            "50",
            "--num-return-sequences",
            "3",
            "--seed",
            seed,
        ]);
        assert!(ok, "{err}");
        rows(&std::fs::read_to_string(o).unwrap())
    };
    let a = run("1", "a.jsonl");
    let b = run("1", "b.jsonl");
    let c = run("2", "c.jsonl");
    assert_eq!(a.len(), 3);
    assert_eq!(a, b, "same seed, same samples");
    assert_ne!(a, c, "another seed, other samples");
    assert_eq!(a[2]["sequence_index"], 2);
}

#[test]
fn score_matches_transformers_reward_model() {
    for arch in ["llama-gqa", "qwen2"] {
        let g = golden(arch);
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("texts.jsonl");
        let lines: Vec<String> = g["texts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| serde_json::json!({"text": t}).to_string())
            .collect();
        std::fs::write(&input, lines.join("\n")).unwrap();
        let model = fixtures().join(g["reward_model_dir"].as_str().unwrap());
        let (ok, out, err) = rlhf(&[
            "score",
            "--model",
            model.to_str().unwrap(),
            "--input",
            input.to_str().unwrap(),
        ]);
        assert!(ok, "{err}");
        for (row, want) in rows(&out)
            .iter()
            .zip(g["reward_scores"].as_array().unwrap())
        {
            let d = (row["score"].as_f64().unwrap() - want.as_f64().unwrap()).abs();
            assert!(d < 1e-4, "{arch}: score {} vs {want}", row["score"]);
        }
    }
}

#[test]
fn bad_input_names_file_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("bad.jsonl");
    std::fs::write(&input, "{\"prompt\": \"ok\"}\n{\"prompt\": 3}\n").unwrap();
    let model = fixtures().join("llama-gqa");
    let (ok, _, err) = rlhf(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(
        err.contains("bad.jsonl:2") && err.contains("\"prompt\""),
        "{err}"
    );

    std::fs::write(&input, "{\"prompt\": \"ok\"}\nnot json\n").unwrap();
    let (ok, _, err) = rlhf(&[
        "score",
        "--model",
        model.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(
        err.contains("bad.jsonl:2") && err.contains("not valid JSON"),
        "{err}"
    );

    let (ok, _, err) = rlhf(&[
        "generate",
        "--model",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "--input",
        input.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(err.contains("never downloads"), "{err}");

    // The fixture tokenizers have no chat template: --chat must say so, not crash.
    std::fs::write(&input, "{\"prompt\": \"hi\"}\n").unwrap();
    let (ok, _, err) = rlhf(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--chat",
    ]);
    assert!(!ok);
    assert!(err.contains("chat template"), "{err}");
}

/// `rlhf ppo` runs from a config, prints its summary, and refuses bad configs with the key
/// and a fix: a misspelt key, a missing reward model, an indivisible batch, a hub-style name.
#[test]
fn ppo_runs_and_bad_configs_say_what_to_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    std::fs::write(
        d.join("prompts.jsonl"),
        "{\"prompt\": \"Hello\"}\n{\"prompt\": \"The cat\", \"tags\": [\"safety\"]}\n",
    )
    .unwrap();
    let base = format!(
        "model = {m:?}\ntrain_file = \"prompts.jsonl\"\noutput_dir = \"out\"\nmax_steps = 1\n\
         per_device_train_batch_size = 4\nnum_generations = 2\nresponse_length = 4\n\
         report_to = [\"jsonl\"]\n",
        m = fixtures().join("llama-gqa")
    );
    let write = |name: &str, text: &str| {
        let p = d.join(name);
        std::fs::write(&p, text).unwrap();
        p.to_string_lossy().into_owned()
    };
    let rm = format!("reward_model = {:?}\n", fixtures().join("llama-gqa-reward"));
    let ok = write(
        "ok.toml",
        &format!("{base}{rm}[lora]\nr = 4\nlora_alpha = 8\n"),
    );
    let (success, stdout, stderr) = rlhf(&["ppo", "--config", &ok]);
    assert!(success, "{stderr}");
    let summary: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(summary["episode"], 4.0);
    assert!(d.join("out/adapter_model.safetensors").exists());
    assert!(d.join("out/value_head.safetensors").exists());

    let cases = [
        (format!("{base}{rm}kl_coeff = 0.1\n"), "kl_coef"),
        (base.clone(), "reward_model"),
        (
            format!("{base}{rm}").replace("num_generations = 2", "num_generations = 3"),
            "num_generations",
        ),
        (
            format!("{base}reward_model = \"OpenAssistant/reward-model\"\n"),
            "download",
        ),
    ];
    for (i, (text, expect)) in cases.iter().enumerate() {
        let p = write(&format!("bad{i}.toml"), text);
        let (success, _, stderr) = rlhf(&["ppo", "--config", &p]);
        assert!(!success, "case {i} should fail");
        assert!(
            stderr.contains(expect),
            "case {i}: expected {expect:?} in: {stderr}"
        );
    }
}

/// The 8 TRL fixture pairs as a preference file.
fn pairs_file(dir: &std::path::Path) -> PathBuf {
    let p = fixtures().join("../trl/dpo-llama-gqa-sigmoid.json");
    let fx: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
    let rows: Vec<String> = fx["pairs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.to_string())
        .collect();
    let out = dir.join("pairs.jsonl");
    std::fs::write(&out, rows.join("\n") + "\n").unwrap();
    out
}

fn tensors(p: &std::path::Path) -> std::collections::BTreeMap<String, Vec<f32>> {
    candle_core::safetensors::load(p, &candle_core::Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(k, v)| (k, v.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect()
}

/// `rlhf dpo` trains from a config, and `--resume` from a checkpoint reaches the weights of
/// the uninterrupted run, bit for bit: with LoRA (the reference is the policy with its
/// adapters off) and with full fine-tuning (the reference is reloaded from `model`, not from
/// the checkpoint).
#[test]
fn dpo_runs_and_resumes_to_the_same_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let pairs = pairs_file(d);
    for (name, lora, weights) in [
        (
            "lora",
            "[lora]\nr = 4\nlora_alpha = 8\nlora_dropout = 0.1\ntarget_modules = \"all-linear\"\n",
            "adapter_model.safetensors",
        ),
        ("full", "", "model.safetensors"),
    ] {
        let write = |out: &str| {
            let p = d.join(format!("{name}-{out}.toml"));
            std::fs::write(
                &p,
                format!(
                    "model = {:?}\ntrain_file = {pairs:?}\neval_file = {pairs:?}\n\
                     output_dir = \"{name}-{out}\"\nmax_steps = 4\nper_device_train_batch_size = 2\n\
                     gradient_accumulation_steps = 2\nlearning_rate = 1e-3\nlogging_steps = 1\n\
                     save_steps = 2\nreport_to = [\"jsonl\"]\nseed = 3\nbeta = 0.2\n{lora}",
                    fixtures().join("llama-gqa")
                ),
            )
            .unwrap();
            p.to_string_lossy().into_owned()
        };
        let (ok, stdout, stderr) = rlhf(&["dpo", "--config", &write("a")]);
        assert!(ok, "{stderr}");
        let summary: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
        assert!(
            summary["eval_rewards/margins"].as_f64().unwrap() > 0.0,
            "{summary}"
        );
        assert_eq!(summary["epoch"], 2.0, "4 steps × 2 × 2 pairs over 8 pairs");

        // A second run that stopped after its step-2 checkpoint, then resumed.
        let ckpt = d.join(format!("{name}-a/checkpoint-2"));
        let part = d.join(format!("{name}-b/checkpoint-2"));
        std::fs::create_dir_all(&part).unwrap();
        for e in std::fs::read_dir(&ckpt).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), part.join(e.file_name())).unwrap();
        }
        let (ok, _, stderr) = rlhf(&["dpo", "--config", &write("b"), "--resume"]);
        assert!(ok, "{stderr}");
        let a = tensors(&d.join(format!("{name}-a/{weights}")));
        let b = tensors(&d.join(format!("{name}-b/{weights}")));
        assert_eq!(a.len(), b.len());
        for (k, v) in &a {
            assert_eq!(v, &b[k], "{name}: {k} differs after resume");
        }
    }
}

/// `rlhf kto` trains on labelled rows; a bad row stops it with the file, line, field and fix.
#[test]
fn kto_runs_and_bad_rows_say_what_to_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let rows = [
        r#"{"prompt": "What is 2 plus 2?", "completion": " 4.", "label": true}"#,
        r#"{"prompt": "Say thank you.", "completion": " No.", "label": false}"#,
        r#"{"prompt": "What is Rust?", "completion": " A language.", "label": true}"#,
        r#"{"prompt": "Describe a fox.", "completion": " Lazy dog.", "label": false}"#,
    ];
    std::fs::write(d.join("kto.jsonl"), rows.join("\n") + "\n").unwrap();
    let cfg = d.join("kto.toml");
    std::fs::write(
        &cfg,
        format!(
            "model = {:?}\ntrain_file = \"kto.jsonl\"\noutput_dir = \"out\"\nmax_steps = 2\n\
             per_device_train_batch_size = 4\nlearning_rate = 1e-3\nreport_to = [\"jsonl\"]\n\
             [lora]\nr = 4\nlora_alpha = 8\n",
            fixtures().join("llama-gqa")
        ),
    )
    .unwrap();
    let cfg = cfg.to_string_lossy().into_owned();
    let (ok, stdout, stderr) = rlhf(&["kto", "--config", &cfg]);
    assert!(ok, "{stderr}");
    let summary: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert!(summary["train_loss"].as_f64().unwrap() > 0.0);
    assert!(d.join("out/adapter_model.safetensors").exists());

    std::fs::write(
        d.join("kto.jsonl"),
        format!(
            "{}\n{}\n",
            rows[0], r#"{"prompt": "Hi", "completion": " Yo", "label": "yes"}"#
        ),
    )
    .unwrap();
    let (ok, _, stderr) = rlhf(&["kto", "--config", &cfg]);
    assert!(!ok);
    assert!(
        stderr.contains("kto.jsonl:2: field \"label\" must be true (desirable) or false"),
        "{stderr}"
    );
}
