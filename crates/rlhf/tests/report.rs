//! `rlhf report`: a run directory in, report.html and its PNGs out; a missing one is an error.

use std::process::Command;

#[test]
fn report_writes_page_and_plots() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    std::fs::create_dir_all(&run).unwrap();
    std::fs::write(
        run.join("metrics.jsonl"),
        "{\"step\":1,\"loss\":2.0}\n{\"step\":2,\"loss\":1.0}\n{\"step\":2,\"train_runtime\":1.0}\n",
    )
    .unwrap();
    let out = tmp.path().join("out");
    let o = Command::new(env!("CARGO_BIN_EXE_rlhf"))
        .args([
            "report",
            run.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let page = out.join("report.html");
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        page.to_str().unwrap()
    );
    let html = std::fs::read_to_string(&page).unwrap();
    assert_eq!(html.matches("<img ").count(), 1);
    assert!(out.join("run-loss.png").is_file());

    // Without --output the report goes into the run directory.
    let o = Command::new(env!("CARGO_BIN_EXE_rlhf"))
        .args(["report", run.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success());
    assert!(run.join("report.html").is_file());

    let o = Command::new(env!("CARGO_BIN_EXE_rlhf"))
        .args(["report", tmp.path().join("missing").to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("not a directory"));
}
