//! `rlhf serve` driven by the official `openai` Python client (PyPI), non-streaming and
//! streaming, with an API key; the client's answers are compared with the server's own.
//!
//! The client comes from `RLHF_OPENAI_PYTHON`, else `target/pyenv/bin/python` (which
//! `scripts/test.sh` creates with `pip install openai`), else `python3`: the first that can
//! `import openai`. None can: the test fails (it does not skip) and says how to install it.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::{post_raw, start, with_chat_template};
use serde_json::{json, Value};

fn python_with_openai() -> PathBuf {
    let workspace = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."));
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"));
    let candidates: Vec<PathBuf> = std::env::var_os("RLHF_OPENAI_PYTHON")
        .map(PathBuf::from)
        .into_iter()
        .chain([target.join("pyenv/bin/python"), PathBuf::from("python3")])
        .collect();
    for p in &candidates {
        let ok = Command::new(p)
            .args(["-c", "import openai"])
            .output()
            .is_ok_and(|o| o.status.success());
        if ok {
            return p.clone();
        }
    }
    panic!(
        "no Python with the `openai` package among {candidates:?}: run scripts/test.sh (it \
         installs it into target/pyenv), or `python3 -m venv target/pyenv && \
         target/pyenv/bin/pip install openai`, or set RLHF_OPENAI_PYTHON"
    );
}

#[test]
fn the_official_openai_client_talks_to_the_server() {
    let python = python_with_openai();
    let dir = with_chat_template("llama-gqa");
    let key = "test-key-123";
    let server = start(dir.path(), 8, Some(key));
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/openai_client.py");
    let out = Command::new(&python)
        .args([script, &server.base, key, "test-model"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the client script failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Value = serde_json::from_slice(&out.stdout).unwrap();
    eprintln!("openai {}", got["openai_version"]);
    assert_eq!(got["models"], json!(["test-model"]));

    // What the server answers the same requests, read without the client.
    let ask = |path: &str, body: Value| -> Value {
        let r = post_raw(&server.base, path, &body.to_string(), Some(key));
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()
    };
    let messages = json!([{"role": "user", "content": "Tell me about cats."}]);
    let chat = ask(
        "/v1/chat/completions",
        json!({"messages": messages, "max_tokens": 16, "temperature": 0}),
    );
    let want = &chat["choices"][0];
    assert_eq!(got["chat"]["content"], want["message"]["content"]);
    assert_eq!(got["chat"]["role"], "assistant");
    assert_eq!(got["chat"]["finish_reason"], want["finish_reason"]);
    assert_eq!(
        got["chat"]["usage"]["prompt_tokens"],
        chat["usage"]["prompt_tokens"]
    );
    assert_eq!(
        got["chat"]["usage"]["completion_tokens"],
        chat["usage"]["completion_tokens"]
    );
    // Streamed through the client: the same text, in more than one piece.
    let s = &got["chat_stream"];
    assert_eq!(s["content"], want["message"]["content"]);
    assert_eq!(s["finishes"], json!([want["finish_reason"]]));
    assert_eq!(
        s["usage"]["completion_tokens"],
        chat["usage"]["completion_tokens"]
    );
    assert!(s["chunks"].as_u64().unwrap() > 1, "{s}");

    let completion = ask(
        "/v1/completions",
        json!({"prompt": "The cat sat on", "max_tokens": 12, "temperature": 0}),
    );
    assert_eq!(got["completion"]["text"], completion["choices"][0]["text"]);
    assert_eq!(got["completion_stream"], completion["choices"][0]["text"]);

    let judge = ask(
        "/v1/chat/completions",
        json!({"messages": messages, "max_tokens": 1, "temperature": 0, "logprobs": true,
               "top_logprobs": 5}),
    );
    let entry = &judge["choices"][0]["logprobs"]["content"][0];
    assert_eq!(got["judge"]["token"], entry["token"]);
    let top = got["judge"]["top"].as_array().unwrap();
    assert_eq!(top.len(), 5);
    for (t, w) in top.iter().zip(entry["top_logprobs"].as_array().unwrap()) {
        assert_eq!(t[0], w["token"]);
        assert_eq!(t[1], w["logprob"]);
    }

    let errors = &got["errors"];
    assert_eq!(errors["wrong_key"], json!([401, "invalid_api_key"]));
    assert_eq!(errors["bad_temperature"], json!([400, "temperature"]));
    assert_eq!(errors["unknown_model"], json!([404, "model_not_found"]));
}
