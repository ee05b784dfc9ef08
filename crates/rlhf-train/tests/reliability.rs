//! Issue #18, the training side: the `output_dir` lock, fresh runs over an older run's
//! checkpoints, a run writing into its own model, non-finite weights after a step, and
//! config values checked for range and finiteness with one message shape.

mod common;

use common::{pairs_file, shared};

use std::path::{Path, PathBuf};

/// A reward config (LoRA, 4 steps, a checkpoint every 2) on `model`, writing to `out`.
fn config(dir: &Path, model: &Path, out: &Path, extra: &str) -> PathBuf {
    let train = pairs_file(dir);
    let cfg = format!(
        "model = {model:?}\ntrain_file = {train:?}\noutput_dir = {out:?}\n\
         max_steps = 4\nper_device_train_batch_size = 2\nlearning_rate = 5e-3\n\
         logging_steps = 1\nsave_steps = 2\nseed = 7\nreport_to = [\"jsonl\"]\n{extra}\n\
         [lora]\nr = 4\nlora_alpha = 8\ntarget_modules = \"all-linear\"\ntask_type = \"SEQ_CLS\"\n"
    );
    let p = dir.join("c.toml");
    std::fs::write(&p, cfg).unwrap();
    p
}

fn model() -> PathBuf {
    shared().join("models/llama-gqa")
}

fn host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

/// A second run into a directory whose lock a live process holds fails at once, naming the
/// holder; a lock left by a dead process is taken over; the lock is gone after the run.
#[test]
fn the_output_dir_lock_refuses_a_second_run_and_takes_over_a_stale_one() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let lock = out.join(".rlhf.lock");
    // A live holder: this test process's parent.
    let live = std::os::unix::process::parent_id();
    std::fs::write(
        &lock,
        format!("{{\"pid\": {live}, \"host\": {:?}}}\n", host()),
    )
    .unwrap();
    let cfg = config(tmp.path(), &model(), &out, "");
    let err = rlhf_train::reward::run(&cfg, &[], None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!("pid {live}")) && err.contains(&host()) && err.contains(".rlhf.lock"),
        "{err}"
    );
    assert!(
        !out.join("metrics.jsonl").exists(),
        "nothing written: {err}"
    );

    // A dead holder: a child that has exited.
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    std::fs::write(
        &lock,
        format!("{{\"pid\": {dead}, \"host\": {:?}}}\n", host()),
    )
    .unwrap();
    rlhf_train::reward::run(&cfg, &[], None).unwrap();
    assert!(!lock.exists(), "the lock is released at exit");
    assert!(out.join("adapter_model.safetensors").exists());
}

/// A fresh run into a directory holding another run's checkpoints refuses; with
/// `overwrite_output_dir = true` the old checkpoints are removed first; `--resume` continues.
#[test]
fn a_fresh_run_over_old_checkpoints_needs_overwrite_output_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let cfg = config(tmp.path(), &model(), &out, "");
    rlhf_train::reward::run(&cfg, &["max_steps=6".into()], None).unwrap();
    assert!(out.join("checkpoint-4").exists());

    let err = rlhf_train::reward::run(&cfg, &[], None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("checkpoint-")
            && err.contains("overwrite_output_dir")
            && err.contains("--resume"),
        "{err}"
    );
    assert!(out.join("checkpoint-4").exists(), "nothing removed: {err}");

    rlhf_train::reward::run(&cfg, &["overwrite_output_dir=true".into()], None).unwrap();
    let steps: Vec<usize> = rlhf_train::trainer::checkpoints(&out)
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(steps, vec![2], "the old run's checkpoint-4 is gone");
    // --resume still resolves to the newest checkpoint, of this run.
    rlhf_train::reward::run(&cfg, &[], Some(None)).unwrap();
}

/// `output_dir` equal to the model directory, or inside it, is refused before anything is
/// written.
#[test]
fn a_run_never_writes_into_its_own_model() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("model");
    std::fs::create_dir_all(&m).unwrap();
    for e in std::fs::read_dir(model()).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), m.join(e.file_name())).unwrap();
    }
    let before: Vec<String> = {
        let mut v: Vec<String> = std::fs::read_dir(&m)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    for out in [m.clone(), m.join("run"), m.join(".")] {
        let cfg = config(tmp.path(), &m, &out, "");
        let err = rlhf_train::reward::run(&cfg, &[], None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("output_dir") && err.contains("model"),
            "{}: {err}",
            out.display()
        );
    }
    let mut after: Vec<String> = std::fs::read_dir(&m)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    after.sort();
    assert_eq!(before, after, "the model directory is untouched");
}

fn finite_tensors(p: &Path) -> bool {
    candle_core::safetensors::load(p, &candle_core::Device::Cpu)
        .unwrap()
        .values()
        .all(|t| {
            t.flatten_all()
                .unwrap()
                .to_dtype(candle_core::DType::F32)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .all(|x| x.is_finite())
        })
}

/// A learning rate that overflows f32 makes every update non-finite: each is rolled back and
/// counted, the run stops with an error naming the last good checkpoint, and no weights on
/// disk are non-finite.
#[test]
fn an_update_that_overflows_is_rolled_back_and_stops_the_run() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let cfg = config(tmp.path(), &model(), &out, "warmup_steps = 2\n");
    let sets = ["max_steps=20".to_string(), "learning_rate=1e38".into()];
    let err = rlhf_train::reward::run(&cfg, &sets, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("non-finite"), "{err}");
    let last = rlhf_train::trainer::checkpoints(&out).pop().unwrap().1;
    assert!(
        err.contains(&last.display().to_string()),
        "names the last good checkpoint {}: {err}",
        last.display()
    );
    assert!(
        !out.join("adapter_model.safetensors").exists(),
        "no final model"
    );
    for (_, c) in rlhf_train::trainer::checkpoints(&out) {
        assert!(
            finite_tensors(&c.join("adapter_model.safetensors")),
            "{}",
            c.display()
        );
    }
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(last.join("trainer_state.json")).unwrap())
            .unwrap();
    assert!(state["skipped_steps"].as_u64().unwrap() >= 1, "{state}");
}

/// Numeric keys are checked for range and finiteness where the config is read, with one
/// message shape naming the file and the key.
#[test]
fn numeric_keys_are_checked_with_one_message_shape() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let cfg = config(tmp.path(), &model(), &out, "");
    let name = cfg.display().to_string();
    let cases: &[(&str, &str)] = &[
        (
            "num_train_epochs=nan",
            "\"num_train_epochs\" must be a finite number > 0, found NaN",
        ),
        (
            "num_train_epochs=inf",
            "\"num_train_epochs\" must be a finite number > 0, found inf",
        ),
        (
            "max_length=0",
            "\"max_length\" must be an integer >= 1, found 0",
        ),
        (
            "learning_rate=-1.0",
            "\"learning_rate\" must be a finite number >= 0, found -1",
        ),
        (
            "max_grad_norm=nan",
            "\"max_grad_norm\" must be a finite number >= 0, found NaN",
        ),
        (
            "warmup_ratio=1.5",
            "\"warmup_ratio\" must be a number in [0, 1], found 1.5",
        ),
        (
            "adam_beta2=1.0",
            "\"adam_beta2\" must be a number in [0, 1), found 1",
        ),
        (
            "per_device_eval_batch_size=0",
            "\"per_device_eval_batch_size\" must be an integer >= 1, found 0",
        ),
        (
            "max_steps=-2",
            "\"max_steps\" must be -1 or an integer >= 1, found -2",
        ),
    ];
    for (set, want) in cases {
        let err = rlhf_train::reward::run(&cfg, &[set.to_string()], None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!("{name}: {want}")),
            "--set {set}: {err}"
        );
    }
    assert!(!out.exists(), "nothing is written for a bad config");
}
