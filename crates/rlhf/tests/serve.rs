//! `rlhf serve` as a user runs it: the key from the environment variable named by
//! `--api-key-env`, loopback unless a key is given, and a refusal that says why.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../../shared/fixtures/models"
    ))
    .join(name)
}

struct Served(Child);

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn status(url: &str, key: Option<&str>) -> Option<u16> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut req = agent.get(url);
    if let Some(k) = key {
        req = req.header("Authorization", &format!("Bearer {k}"));
    }
    req.call().ok().map(|r| r.status().as_u16())
}

#[test]
fn serves_with_the_key_from_the_environment() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let log = tempfile::NamedTempFile::new().unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_rlhf"))
        .args(["serve", "--model"])
        .arg(fixture("llama-gqa"))
        .args(["--bind", &format!("127.0.0.1:{port}")])
        .args([
            "--api-key-env",
            "RLHF_TEST_SERVE_KEY",
            "--max-batch-size",
            "4",
        ])
        .env("RLHF_TEST_SERVE_KEY", "k-123")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log.reopen().unwrap())
        .spawn()
        .unwrap();
    let _served = Served(child);
    let url = format!("http://127.0.0.1:{port}/v1/models");
    let deadline = Instant::now() + Duration::from_secs(60);
    let got = loop {
        if let Some(s) = status(&url, Some("k-123")) {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "rlhf serve did not come up: {}",
            std::fs::read_to_string(log.path()).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(got, 200);
    assert_eq!(status(&url, None), Some(401));
    assert_eq!(status(&url, Some("k-12")), Some(401));
    // The key never appears in the log.
    let text = std::fs::read_to_string(log.path()).unwrap();
    assert!(
        text.contains("serving") && text.contains("llama-gqa"),
        "{text}"
    );
    assert!(!text.contains("k-123"), "{text}");
}

#[test]
fn refuses_other_addresses_without_a_key_and_an_unset_key_variable() {
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_rlhf"))
            .args(["serve", "--model"])
            .arg(fixture("llama-gqa"))
            .args(args)
            .env_remove("RLHF_TEST_UNSET_KEY")
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, err) = run(&["--bind", "0.0.0.0:0"]);
    assert!(!ok);
    assert!(
        err.contains("without an API key") && err.contains("--api-key-env"),
        "{err}"
    );
    let (ok, err) = run(&["--api-key-env", "RLHF_TEST_UNSET_KEY"]);
    assert!(!ok);
    assert!(
        err.contains("RLHF_TEST_UNSET_KEY") && err.contains("not set"),
        "{err}"
    );
}
