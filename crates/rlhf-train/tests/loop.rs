//! The shared training loop end to end on a fixture model: exact resume, checkpoint pruning,
//! TensorBoard files that parse back, metrics.jsonl, divergence handling, and SFT learning.

mod common;

use common::{pairs_file, shared};

use std::path::{Path, PathBuf};

fn write_config(dir: &Path, out: &str, extra: &str) -> PathBuf {
    let model = shared().join("models/llama-gqa");
    let train = pairs_file(dir);
    let cfg = format!(
        "model = {model:?}\ntrain_file = {train:?}\neval_file = {train:?}\noutput_dir = {out:?}\n\
         max_steps = 6\nper_device_train_batch_size = 2\ngradient_accumulation_steps = 2\n\
         learning_rate = 5e-3\nlr_scheduler_type = \"linear\"\nwarmup_steps = 2\nweight_decay = 0.01\n\
         logging_steps = 1\neval_strategy = \"steps\"\neval_steps = 3\nsave_steps = 2\nsave_total_limit = 2\nseed = 7\n{extra}\n\
         [lora]\nr = 4\nlora_alpha = 8\nlora_dropout = 0.1\ntarget_modules = \"all-linear\"\ntask_type = \"SEQ_CLS\"\n",
        out = dir.join(out)
    );
    let p = dir.join(format!("{out}.toml"));
    std::fs::write(&p, cfg).unwrap();
    p
}

fn tensors(p: &Path) -> std::collections::HashMap<String, Vec<f32>> {
    candle_core::safetensors::load(p, &candle_core::Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(k, v)| (k, v.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect()
}

#[test]
fn resume_reaches_the_same_weights_and_logs_parse_back() {
    let tmp = tempfile::tempdir().unwrap();
    let full = write_config(tmp.path(), "full", "");
    let summary = rlhf_train::reward::run(&full, &[], None).unwrap();
    let out = tmp.path().join("full");
    assert_eq!(
        summary["epoch"], 3.0,
        "6 steps × 2 micro-batches × 2 pairs over 8 pairs"
    );
    assert!(
        summary.contains_key("eval_accuracy") && summary.contains_key("train_samples_per_second")
    );

    // save_total_limit = 2 keeps the two newest of checkpoint-2 and -4 (6 is the final save).
    let ckpts: Vec<usize> = rlhf_train::trainer::checkpoints(&out)
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(ckpts, vec![2, 4]);

    // A second run stopped after its step-4 checkpoint, then resumed, ends at the same weights.
    let part = tmp.path().join("part");
    std::fs::create_dir_all(&part).unwrap();
    let src = out.join("checkpoint-4");
    let dst = part.join("checkpoint-4");
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    let resumed = write_config(tmp.path(), "part", "");
    rlhf_train::reward::run(&resumed, &[], Some(None)).unwrap();
    let a = tensors(&out.join("adapter_model.safetensors"));
    let b = tensors(&part.join("adapter_model.safetensors"));
    assert_eq!(a.len(), b.len());
    for (k, v) in &a {
        assert_eq!(v, &b[k], "{k} differs after resume");
    }
    // The resumed run's metrics.jsonl continues at step 5, and its last line summarises.
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(part.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[0]["step"], 5);
    assert!(lines.last().unwrap().get("train_runtime").is_some());

    // TensorBoard files parse back with transformers' tags and the logged values.
    let runs: Vec<PathBuf> = walk(&out.join("runs"));
    let events = runs
        .iter()
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("events.out.tfevents")
        })
        .unwrap();
    let scalars = rlhf_train::tensorboard::read_scalars(events).unwrap();
    let full_lines: Vec<serde_json::Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let loss1 = full_lines
        .iter()
        .find(|l| l["step"] == 1 && l.get("loss").is_some())
        .unwrap()["loss"]
        .as_f64()
        .unwrap();
    let tb_loss1 = scalars
        .iter()
        .find(|(s, t, _)| *s == 1 && t == "train/loss")
        .unwrap()
        .2;
    assert!((tb_loss1 as f64 - loss1).abs() < 1e-6);
    assert!(scalars
        .iter()
        .any(|(s, t, _)| *s == 3 && t == "eval/accuracy"));
    for tag in [
        "train/grad_norm",
        "train/learning_rate",
        "train/accuracy",
        "train/margin",
    ] {
        assert!(scalars.iter().any(|(_, t, _)| t == tag), "{tag} missing");
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        if e.path().is_dir() {
            out.extend(walk(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out
}

#[test]
fn divergence_stops_without_saving_poisoned_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write_config(tmp.path(), "nan", "max_grad_norm = 0.0");
    let err = rlhf_train::reward::run(
        &cfg,
        &[
            "learning_rate=1e30".into(),
            "save_steps=0".into(),
            "max_steps=20".into(),
        ],
        None,
    )
    .unwrap_err();
    assert!(err.to_string().contains("non-finite"), "{err}");
    assert!(
        !tmp.path().join("nan/adapter_model.safetensors").exists(),
        "no final model after divergence"
    );
}

#[test]
fn sft_learns_its_demonstrations() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("demos.jsonl");
    let rows: Vec<String> = (0..8)
        .map(|i| {
            serde_json::json!({"prompt": format!("Q{i}: say yes."), "completion": " yes yes yes."})
                .to_string()
        })
        .collect();
    std::fs::write(&data, rows.join("\n")).unwrap();
    let cfg = tmp.path().join("sft.toml");
    std::fs::write(
        &cfg,
        format!(
            "model = {:?}\ntrain_file = {data:?}\neval_file = {data:?}\noutput_dir = {:?}\nmax_steps = 12\n\
             per_device_train_batch_size = 4\nlearning_rate = 1e-2\nlr_scheduler_type = \"constant\"\n\
             logging_steps = 4\neval_strategy = \"no\"\nsave_steps = 0\nreport_to = [\"jsonl\"]\neval_on_start = true\n",
            shared().join("models/qwen2"),
            tmp.path().join("out")
        ),
    )
    .unwrap();
    let before = {
        let c = rlhf_train::sft::SftConfig::load(&cfg, &[]).unwrap();
        let tok = rlhf_model::tokenizer::Tokenizer::from_dir(&c.args.model).unwrap();
        let ex = rlhf_train::sft::load_examples(&c.args.train_file, &tok, &c.args, &c.sft).unwrap();
        // Completion-only: the prompt tokens carry no label.
        assert!(ex[0].labels.iter().take(3).all(|&l| l == -100));
        let model = rlhf_model::Model::load(&c.args.model, &Default::default()).unwrap();
        let obj = rlhf_train::sft::SftObjective { pad_id: 1 };
        use rlhf_train::trainer::Objective;
        obj.evaluate(&model, &ex, 8).unwrap()["loss"]
    };
    let s = rlhf_train::sft::run(
        &cfg,
        &["eval_strategy=steps".into(), "eval_steps=12".into()],
        None,
    )
    .unwrap();
    assert!(
        s["eval_loss"] < 0.5 * before,
        "eval loss {} vs {before} before",
        s["eval_loss"]
    );
    assert!(
        tmp.path().join("out/model.safetensors").exists(),
        "full fine-tune saves an HF dir"
    );
}

/// The steps at which metrics.jsonl has an evaluation row (the summary line excluded).
fn eval_rows(out: &Path, key: &str) -> Vec<u64> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r.get(key).is_some() && r.get("train_runtime").is_none())
        .map(|r| r["step"].as_u64().unwrap())
        .collect()
}

/// `eval_strategy = "epoch"` evaluates after the step that ends each epoch (8 pairs, 2 per
/// step: steps 4 and 8 of 10), and the summary reuses none of them (step 10 ends no epoch).
/// Before the shared Run, the loop accepted "epoch" and never evaluated.
#[test]
fn epoch_strategy_evaluates_at_each_epoch_end() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write_config(tmp.path(), "epochs", "");
    let sets = [
        "eval_strategy=epoch".to_string(),
        "max_steps=10".into(),
        "gradient_accumulation_steps=1".into(),
        "save_steps=0".into(),
        "report_to=[\"jsonl\"]".into(),
    ];
    let summary = rlhf_train::reward::run(&cfg, &sets, None).unwrap();
    let out = tmp.path().join("epochs");
    assert_eq!(eval_rows(&out, "eval_accuracy"), [4, 8]);
    assert!(summary.contains_key("eval_accuracy"));
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let at4 = rows
        .iter()
        .find(|r| r["step"] == 4 && r.get("eval_accuracy").is_some())
        .unwrap();
    assert_eq!(at4["epoch"], 1.0);
}

/// "steps" without `eval_steps` evaluates every `logging_steps` (transformers' default), and
/// `eval_steps = 0` is refused rather than read as 1.
#[test]
fn eval_steps_default_to_logging_steps_and_zero_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write_config(tmp.path(), "every", "");
    // write_config sets eval_steps = 3; drop it.
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, text.replace("eval_steps = 3\n", "")).unwrap();
    let sets = [
        "logging_steps=2".to_string(),
        "max_steps=5".into(),
        "save_steps=0".into(),
        "report_to=[\"jsonl\"]".into(),
    ];
    rlhf_train::reward::run(&cfg, &sets, None).unwrap();
    assert_eq!(
        eval_rows(&tmp.path().join("every"), "eval_accuracy"),
        [2, 4]
    );
    let err = rlhf_train::reward::run(&cfg, &["eval_steps=0".to_string()], None).unwrap_err();
    assert!(err.to_string().contains("eval_steps"), "{err}");
}
