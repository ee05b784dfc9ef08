//! `rlhf constitutional` as a command: the tiny llama fixture answers, critiques and revises;
//! the summary is one JSON line on stdout and the three files are written; a bad key fails
//! with the file and the closest key.

use std::path::PathBuf;
use std::process::Command;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../../shared/fixtures/models"
    ))
    .join(name)
}

#[test]
fn constitutional_command_writes_its_files() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(
        d.join("red.jsonl"),
        "{\"prompt\": \"Steal?\"}\n{\"prompt\": \"Hack?\"}\n",
    )
    .unwrap();
    std::fs::write(
        d.join("c.json"),
        r#"[{"critic": "Harmful?", "revision": "Fix it."}]"#,
    )
    .unwrap();
    let cfg = d.join("cai.toml");
    std::fs::write(
        &cfg,
        format!(
            "model = {:?}\ntrain_file = \"red.jsonl\"\nconstitution = \"c.json\"\n\
             output_dir = \"out\"\nmax_new_tokens = 3\nmax_length = 128\n",
            fixture("llama-gqa")
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_rlhf"))
        .args(["constitutional", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value =
        serde_json::from_str(String::from_utf8(out.stdout).unwrap().trim()).unwrap();
    assert_eq!(summary["prompts"], 2.0);
    for f in [
        "constitutional.jsonl",
        "sft.jsonl",
        "pairs.jsonl",
        "constitutional.json",
    ] {
        assert!(d.join("out").join(f).is_file(), "no {f}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_rlhf"))
        .args(["constitutional", "--config"])
        .arg(&cfg)
        .args(["--set", "round=2"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cai.toml") && err.contains("`rounds`"),
        "{err}"
    );
}
