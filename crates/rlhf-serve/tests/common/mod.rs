//! The server in-process on a free loopback port, a fixture model with a chat template, and
//! a small blocking HTTP client.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rlhf_serve::{App, ServeOptions};
use serde_json::Value;

pub fn fixtures() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../../shared/fixtures/models"
    ))
}

/// ChatML, the template SmolLM2 and Qwen2 use.
pub const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + \
    '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt \
    %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// A copy of the fixture model `name` whose tokenizer has a ChatML chat template.
pub fn with_chat_template(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let src = fixtures().join(name);
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.path().join(e.file_name())).unwrap();
    }
    let cfg = dir.path().join("tokenizer_config.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    v["chat_template"] = CHATML.into();
    std::fs::write(&cfg, v.to_string()).unwrap();
    dir
}

/// A running server; stopped when dropped.
pub struct Server {
    pub base: String,
    pub app: Arc<App>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Serves the model at `model` with `max_batch_size` rows and an optional key.
pub fn start(model: &Path, max_batch_size: usize, api_key: Option<&str>) -> Server {
    let mut opts = ServeOptions::new(model.to_path_buf());
    opts.max_batch_size = max_batch_size;
    opts.api_key = api_key.map(str::to_string);
    opts.served_model_name = Some("test-model".into());
    let app = App::load(&opts).unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let served = app.clone();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            addr_tx.send(l.local_addr().unwrap()).unwrap();
            rlhf_serve::serve(served, l, async {
                let _ = stop_rx.await;
            })
            .await
            .unwrap();
        });
    });
    let addr = addr_rx.recv().unwrap();
    Server {
        base: format!("http://{addr}"),
        app,
        stop: Some(stop_tx),
        thread: Some(thread),
    }
}

/// A response read whole.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub content_type: String,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .into()
}

fn read(r: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Reply {
    let mut r = r.expect("request");
    let content_type = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let status = r.status().as_u16();
    let body = r.body_mut().read_to_string().unwrap();
    Reply {
        status,
        content_type,
        body,
    }
}

/// POSTs a raw body (JSON or not) with an optional bearer key.
pub fn post_raw(base: &str, path: &str, body: &str, key: Option<&str>) -> Reply {
    let mut req = agent()
        .post(format!("{base}{path}"))
        .header("Content-Type", "application/json");
    if let Some(k) = key {
        req = req.header("Authorization", &format!("Bearer {k}"));
    }
    read(req.send(body))
}

pub fn post(base: &str, path: &str, body: &Value) -> Reply {
    post_raw(base, path, &body.to_string(), None)
}

pub fn get(base: &str, path: &str, key: Option<&str>) -> Reply {
    let mut req = agent().get(format!("{base}{path}"));
    if let Some(k) = key {
        req = req.header("Authorization", &format!("Bearer {k}"));
    }
    read(req.call())
}

/// The JSON objects of a server-sent event stream, and whether it ended with `[DONE]`.
pub fn events(body: &str) -> (Vec<Value>, bool) {
    let mut out = Vec::new();
    let mut done = false;
    for block in body.split("\n\n").filter(|b| !b.trim().is_empty()) {
        let data = block
            .strip_prefix("data: ")
            .unwrap_or_else(|| panic!("not an event: {block:?}"));
        assert!(!done, "an event after [DONE]: {data}");
        if data == "[DONE]" {
            done = true;
        } else {
            out.push(serde_json::from_str(data).unwrap());
        }
    }
    (out, done)
}
