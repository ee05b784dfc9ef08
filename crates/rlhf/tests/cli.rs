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
    // The reader training uses (rlhf_data::read_rows), so the same message; the input is
    // checked before the model (this one has no score head) is loaded.
    assert!(
        err.contains("bad.jsonl:2") && err.contains("not a JSON object"),
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

/// A copy of a fixture model in `dir`, with `template` as its chat template when given.
fn model_copy(dir: &std::path::Path, name: &str, template: Option<&str>) -> PathBuf {
    let out = dir.join(name);
    std::fs::create_dir_all(&out).unwrap();
    for e in std::fs::read_dir(fixtures().join(name)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), out.join(e.file_name())).unwrap();
    }
    if let Some(t) = template {
        std::fs::write(out.join("chat_template.jinja"), t).unwrap();
    }
    out
}

/// A chat template that renders an empty conversation as nothing (no BOS, no header).
const BARE_TEMPLATE: &str = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}\
                             {% if add_generation_prompt %}<|assistant|>{% endif %}";

/// `rlhf score` and `rlhf generate` refuse a row with nothing to run on, naming the file,
/// line and field, before any model work: an empty `text`, an empty `messages` list, an
/// empty row among good ones (it used to get a made-up score, or panic in the attention).
/// An empty `prompt` that the chat template turns into tokens is a prompt: it generates.
#[test]
fn score_and_generate_refuse_empty_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    for arch in ["llama-gqa", "gpt2", "opt"] {
        let rm = model_copy(d, &format!("{arch}-reward"), Some(BARE_TEMPLATE));
        let lm = model_copy(d, arch, Some(BARE_TEMPLATE));
        let input = d.join("rows.jsonl");
        let cases: [(&str, &str, &str, &str); 5] = [
            ("score", "{\"text\": \"\"}\n", "rows.jsonl:1", "\"text\""),
            (
                "score",
                "{\"text\": \"hello\"}\n{\"text\": \"\"}\n",
                "rows.jsonl:2",
                "\"text\"",
            ),
            (
                "score",
                "{\"messages\": []}\n",
                "rows.jsonl:1",
                "\"messages\"",
            ),
            (
                "generate",
                "{\"prompt\": \"hi\"}\n\n{\"prompt\": \"\"}\n",
                "rows.jsonl:3",
                "\"prompt\"",
            ),
            (
                "generate",
                "{\"messages\": []}\n",
                "rows.jsonl:1",
                "\"messages\"",
            ),
        ];
        for (cmd, text, at, field) in cases {
            std::fs::write(&input, text).unwrap();
            let model = if cmd == "score" { &rm } else { &lm };
            let (ok, out, err) = rlhf(
                &[
                    cmd,
                    "--model",
                    model.to_str().unwrap(),
                    "--input",
                    input.to_str().unwrap(),
                    "--max-new-tokens",
                    "2",
                ][..if cmd == "score" { 5 } else { 7 }],
            );
            assert!(!ok, "{arch} {cmd} {text:?} should fail: {out}");
            assert!(
                err.contains(at) && err.contains(field) && err.contains("empty"),
                "{arch} {cmd} {text:?}: {err}"
            );
            assert!(!err.contains("panicked"), "{err}");
        }
        // With --chat the template gives an empty prompt tokens: that generates.
        std::fs::write(&input, "{\"prompt\": \"\"}\n").unwrap();
        let (ok, out, err) = rlhf(&[
            "generate",
            "--model",
            lm.to_str().unwrap(),
            "--input",
            input.to_str().unwrap(),
            "--max-new-tokens",
            "2",
            "--chat",
        ]);
        assert!(ok, "{arch}: {err}");
        assert_eq!(rows(&out).len(), 1);
    }
}

/// `rlhf score` on a reward model whose weights are not finite fails, naming the row, instead
/// of writing `"score": null` and exiting 0.
#[test]
fn score_refuses_non_finite_scores() {
    let tmp = tempfile::tempdir().unwrap();
    let rm = model_copy(tmp.path(), "llama-gqa-reward", None);
    let weights = rm.join("model.safetensors");
    let mut t = candle_core::safetensors::load(&weights, &candle_core::Device::Cpu).unwrap();
    let w = t["score.weight"].clone();
    t.insert("score.weight".into(), (w * f64::NAN).unwrap());
    std::fs::remove_file(&weights).unwrap();
    candle_core::safetensors::save(&t, &weights).unwrap();
    let input = tmp.path().join("t.jsonl");
    std::fs::write(&input, "{\"text\": \"hello\"}\n").unwrap();
    let (ok, out, err) = rlhf(&[
        "score",
        "--model",
        rm.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
    ]);
    assert!(!ok, "should fail, wrote: {out}");
    assert!(
        err.contains("t.jsonl:1") && err.contains("not finite"),
        "{err}"
    );
}

/// A model without a score head is not a reward model: `rlhf score` and PPO's
/// `reward_model` refuse it, saying what is missing and how to get one, instead of scoring
/// with a randomly initialised head.
#[test]
fn a_model_without_a_score_head_is_not_a_reward_model() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let base = fixtures().join("llama-gqa");
    let input = d.join("t.jsonl");
    std::fs::write(&input, "{\"text\": \"hello\"}\n").unwrap();
    let (ok, out, err) = rlhf(&[
        "score",
        "--model",
        base.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
    ]);
    assert!(!ok, "should fail, wrote: {out}");
    assert!(
        err.contains("score.weight") && err.contains("rlhf reward"),
        "{err}"
    );

    std::fs::write(d.join("prompts.jsonl"), "{\"prompt\": \"Hello\"}\n").unwrap();
    let cfg = d.join("ppo.toml");
    std::fs::write(
        &cfg,
        format!(
            "model = {base:?}\nreward_model = {base:?}\ntrain_file = \"prompts.jsonl\"\n\
             output_dir = \"out\"\nmax_steps = 1\nper_device_train_batch_size = 2\n\
             num_generations = 2\nresponse_length = 4\nreport_to = [\"jsonl\"]\n"
        ),
    )
    .unwrap();
    let (ok, _, err) = rlhf(&["ppo", "--config", cfg.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        err.contains("score.weight") && err.contains("rlhf reward"),
        "{err}"
    );
}

/// A LoRA reward run saves the score head it trains: `task_type` left out means SEQ_CLS (the
/// adapter holds `score.weight` and scores with `rlhf score`); a task type that saves no
/// head (CAUSAL_LM) is refused before training, naming the key.
#[test]
fn lora_reward_runs_save_their_score_head() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let pairs = pairs_file(d);
    let write = |name: &str, task: &str| {
        let p = d.join(format!("{name}.toml"));
        std::fs::write(
            &p,
            format!(
                "model = {:?}\ntrain_file = {pairs:?}\noutput_dir = \"{name}\"\nmax_steps = 1\n\
                 per_device_train_batch_size = 2\nreport_to = [\"jsonl\"]\n[lora]\nr = 2\n{task}",
                fixtures().join("llama-gqa")
            ),
        )
        .unwrap();
        p.to_string_lossy().into_owned()
    };
    let (ok, _, err) = rlhf(&[
        "reward",
        "--config",
        &write("causal", "task_type = \"CAUSAL_LM\"\n"),
    ]);
    assert!(!ok);
    assert!(
        err.contains("lora.task_type") && err.contains("SEQ_CLS"),
        "{err}"
    );
    assert!(!d.join("causal/adapter_model.safetensors").exists());

    let (ok, _, err) = rlhf(&["reward", "--config", &write("default", "")]);
    assert!(ok, "{err}");
    let out = d.join("default");
    assert!(tensors(&out.join("adapter_model.safetensors"))
        .contains_key("base_model.model.score.weight"));
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["task_type"], "SEQ_CLS");
    let input = d.join("t.jsonl");
    std::fs::write(&input, "{\"text\": \"hello\"}\n").unwrap();
    let (ok, stdout, err) = rlhf(&[
        "score",
        "--model",
        out.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(rows(&stdout)[0]["score"].is_f64());
}

/// `score` and `generate` read JSONL as training does: a byte-order mark and CRLF line ends
/// are fine, and the messages name file:line alike.
#[test]
fn score_and_generate_read_bom_and_crlf() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("win.jsonl");
    std::fs::write(
        &input,
        "\u{feff}{\"prompt\": \"Hello\", \"text\": \"Hello\"}\r\n{\"prompt\": \"The cat\", \"text\": \"The cat\"}\r\n",
    )
    .unwrap();
    let (ok, out, err) = rlhf(&[
        "score",
        "--model",
        fixtures().join("llama-gqa-reward").to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert_eq!(rows(&out).len(), 2);
    let (ok, out, err) = rlhf(&[
        "generate",
        "--model",
        fixtures().join("llama-gqa").to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--max-new-tokens",
        "2",
    ]);
    assert!(ok, "{err}");
    assert_eq!(rows(&out).len(), 2);
}

/// The documented bare `--resume` (no directory) takes the newest checkpoint in output_dir,
/// for `sft`, `reward` and `ppo`: with none there it says so (clap does not ask for a
/// value), and with one it resumes after it (the step it saved is not trained, so not logged,
/// again).
#[test]
fn bare_resume_takes_the_newest_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let pairs = pairs_file(d);
    std::fs::write(
        d.join("sft.jsonl"),
        "{\"prompt\": \"Hello\", \"completion\": \" world\"}\n\
         {\"prompt\": \"The cat\", \"completion\": \" sat\"}\n",
    )
    .unwrap();
    std::fs::write(
        d.join("prompts.jsonl"),
        "{\"prompt\": \"Hello\"}\n{\"prompt\": \"The cat\"}\n",
    )
    .unwrap();
    let model = fixtures().join("llama-gqa");
    let rm = fixtures().join("llama-gqa-reward");
    for (cmd, extra) in [
        ("sft", "train_file = \"sft.jsonl\"\n".to_string()),
        ("reward", format!("train_file = {pairs:?}\n")),
        (
            "ppo",
            format!(
                "train_file = \"prompts.jsonl\"\nreward_model = {rm:?}\nnum_generations = 2\n\
                 response_length = 4\n"
            ),
        ),
    ] {
        let write = |out: &str| {
            let p = d.join(format!("{cmd}-{out}.toml"));
            std::fs::write(
                &p,
                format!(
                    "model = {model:?}\noutput_dir = \"{cmd}-{out}\"\nmax_steps = 2\n\
                     per_device_train_batch_size = 2\nlogging_steps = 1\nsave_steps = 1\n\
                     report_to = [\"jsonl\"]\n{extra}[lora]\nr = 2\n"
                ),
            )
            .unwrap();
            p.to_string_lossy().into_owned()
        };
        let (ok, _, err) = rlhf(&[cmd, "--config", &write("a"), "--resume"]);
        assert!(!ok, "{cmd}: nothing to resume from");
        assert!(err.contains("no checkpoint-N directory"), "{cmd}: {err}");

        let (ok, _, err) = rlhf(&[cmd, "--config", &write("a")]);
        assert!(ok, "{cmd}: {err}");
        let ckpt = d.join(format!("{cmd}-a/checkpoint-1"));
        let part = d.join(format!("{cmd}-b/checkpoint-1"));
        std::fs::create_dir_all(&part).unwrap();
        for e in std::fs::read_dir(&ckpt).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), part.join(e.file_name())).unwrap();
        }
        // The flag last, and first: either way it takes no value.
        let (ok, _, err) = rlhf(&[cmd, "--resume", "--config", &write("b")]);
        assert!(ok, "{cmd}: {err}");
        let steps: Vec<u64> = std::fs::read_to_string(d.join(format!("{cmd}-b/metrics.jsonl")))
            .unwrap()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["step"].as_u64())
            .collect();
        assert!(
            steps.contains(&2) && !steps.contains(&1),
            "{cmd}: resumed after step 1, logged steps {steps:?}"
        );
    }
}

#[test]
fn a_missing_config_says_so_once() {
    let (ok, _, stderr) = rlhf(&["sft", "--config", "/nonexistent/config.toml"]);
    assert!(!ok);
    assert!(stderr.contains("/nonexistent/config.toml"), "{stderr}");
    assert_eq!(
        stderr.matches("No such file or directory").count(),
        1,
        "{stderr}"
    );
}

#[test]
fn generation_settings_are_checked_naming_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("p.jsonl");
    std::fs::write(&input, "{\"prompt\": \"Hello\"}\n").unwrap();
    let model = fixtures().join("llama-gqa");
    for (flag, value, key) in [
        (
            "--temperature",
            "NaN",
            "\"temperature\" must be a finite number >= 0",
        ),
        (
            "--temperature",
            "-0.5",
            "\"temperature\" must be a finite number >= 0",
        ),
        ("--top-p", "0", "\"top_p\" must be a number in (0, 1]"),
    ] {
        let arg = format!("{flag}={value}");
        let (ok, _, stderr) = rlhf(&[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--input",
            input.to_str().unwrap(),
            &arg,
        ]);
        assert!(!ok, "{flag} {value}");
        assert!(stderr.contains(key), "{flag} {value}: {stderr}");
    }
}

#[test]
fn output_never_overwrites_an_input() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("p.jsonl");
    let row = "{\"prompt\": \"Hello\", \"response\": \" there\"}\n";
    std::fs::write(&input, row).unwrap();
    // The same file by another name, too.
    let other_name = tmp.path().join("sub/../p.jsonl");
    std::fs::create_dir_all(tmp.path().join("sub")).unwrap();
    for (cmd, model) in [("generate", "llama-gqa"), ("score", "llama-gqa-reward")] {
        let (ok, _, stderr) = rlhf(&[
            cmd,
            "--model",
            fixtures().join(model).to_str().unwrap(),
            "--input",
            input.to_str().unwrap(),
            "--output",
            other_name.to_str().unwrap(),
        ]);
        assert!(!ok, "{cmd}");
        assert!(stderr.contains("is the input file"), "{cmd}: {stderr}");
        assert_eq!(
            std::fs::read_to_string(&input).unwrap(),
            row,
            "{cmd} touched its input"
        );
    }
}
