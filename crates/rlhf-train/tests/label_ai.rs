//! `rlhf label-ai` (RLAIF) end to end: a local judge on the tiny llama fixture checked against
//! a direct forward pass in both orders; an OpenAI-compatible judge served by a real HTTP
//! server started here (std's TcpListener) that answers with well-formed log-probs, garbage, a
//! 500 before succeeding, or too late; the cache (a rerun asks nothing), resumption after a
//! failure with no labelled row lost, ties, position bias, human agreement, config errors, and
//! the pipeline's wiring of label_ai and constitutional stages.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rlhf_model::{Heads, LoadOptions, Model};
use rlhf_train::label_ai::{self, LabelAiConfig};
use serde_json::{json, Value};

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

fn read_jsonl(p: &Path) -> Vec<Value> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Four pairs; the file's "chosen" is the judge's choice in rows 1, 2 and 4 (the "good" one),
/// not in row 3.
const PAIRS: &str = concat!(
    r#"{"prompt": "q1", "chosen": "a good answer", "rejected": "a bad one", "degree": "better", "id": 1}"#,
    "\n",
    r#"{"prompt": "q2", "chosen": "good", "rejected": "bad"}"#,
    "\n",
    r#"{"prompt": "q3", "chosen": "bad again", "rejected": "good again"}"#,
    "\n",
    r#"{"prompt": "q4", "response_1": "bad four", "response_2": "good four"}"#,
    "\n"
);

/// The human labels of the same pairs: row 3's "chosen" is the bad one, as in PAIRS.
const HUMAN: &str = concat!(
    r#"{"prompt": "q1", "chosen": "a good answer", "rejected": "a bad one"}"#,
    "\n",
    r#"{"prompt": "q2", "chosen": "good", "rejected": "bad"}"#,
    "\n",
    r#"{"prompt": "q3", "chosen": "bad again", "rejected": "good again"}"#,
    "\n",
    r#"{"prompt": "q4", "chosen": "good four", "rejected": "bad four"}"#,
    "\n"
);

/// How the test server answers one request.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// P("1") = 0.8 when response 1 holds "good", else 0.2; `bias` added to P("1").
    Good,
    /// Not JSON.
    Garbage,
    /// 500 once, then as `Good`.
    FailOnce,
    /// Sleeps 2 s, then as `Good`.
    Slow,
    /// The first position always wins: P("1") = 0.9.
    FirstPosition,
    /// Top tokens without "1" or "2".
    NoDigits,
}

/// Decides the server's answer from the query text.
type ModeFn = Arc<Mutex<Box<dyn Fn(&str) -> Mode + Send>>>;

/// A chat-completions server on 127.0.0.1: each request's body and headers are recorded, and
/// `mode_for` (by the query text) decides the answer.
struct Server {
    url: String,
    requests: Arc<AtomicUsize>,
    bodies: Arc<Mutex<Vec<(Value, String)>>>,
    mode: ModeFn,
}

impl Server {
    fn start(mode: impl Fn(&str) -> Mode + Send + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/v1", listener.local_addr().unwrap());
        let requests = Arc::new(AtomicUsize::new(0));
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let mode: ModeFn = Arc::new(Mutex::new(Box::new(mode)));
        let failed_once = Arc::new(AtomicUsize::new(0));
        let (r, b, m) = (requests.clone(), bodies.clone(), mode.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let (r, b, m, f) = (r.clone(), b.clone(), m.clone(), failed_once.clone());
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(stream.try_clone().unwrap());
                    let mut len = 0usize;
                    let mut headers = String::new();
                    loop {
                        let mut line = String::new();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap();
                        }
                        headers.push_str(&line);
                    }
                    let mut body = vec![0u8; len];
                    reader.read_exact(&mut body).unwrap();
                    let body: Value = serde_json::from_slice(&body).unwrap();
                    r.fetch_add(1, Ordering::SeqCst);
                    let query = body["messages"][0]["content"].as_str().unwrap().to_string();
                    b.lock().unwrap().push((body, headers));
                    let mode = (m.lock().unwrap())(&query);
                    let (status, text) = answer(mode, &query, &f);
                    let reply = format!(
                        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n\
                         Content-Length: {}\r\nConnection: close\r\n\r\n{text}",
                        text.len()
                    );
                    let _ = stream.write_all(reply.as_bytes());
                });
            }
        });
        Self {
            url,
            requests,
            bodies,
            mode,
        }
    }

    fn count(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    fn set_mode(&self, mode: impl Fn(&str) -> Mode + Send + 'static) {
        *self.mode.lock().unwrap() = Box::new(mode);
    }
}

fn completion(top: &[(&str, f64)]) -> String {
    let top: Vec<Value> = top
        .iter()
        .map(|(t, p)| json!({"token": t, "logprob": p.ln()}))
        .collect();
    json!({"id": "x", "object": "chat.completion", "choices": [{"index": 0,
        "message": {"role": "assistant", "content": top[0]["token"]},
        "logprobs": {"content": [{"token": top[0]["token"], "logprob": top[0]["logprob"],
                                  "top_logprobs": top}]},
        "finish_reason": "length"}]})
    .to_string()
}

fn answer(mode: Mode, query: &str, failed_once: &AtomicUsize) -> (u16, String) {
    // The template below puts response 1 between "A: " and "\nB: ".
    let first = query
        .rsplit("A: ")
        .next()
        .and_then(|s| s.split("\nB: ").next())
        .unwrap_or("");
    let good_first = first.contains("good");
    match mode {
        Mode::Garbage => (200, "<html>proxy error</html>".into()),
        Mode::FailOnce if failed_once.fetch_add(1, Ordering::SeqCst) == 0 => {
            (500, "{\"error\": \"overloaded\"}".into())
        }
        Mode::Slow => {
            std::thread::sleep(Duration::from_secs(2));
            answer(Mode::Good, query, failed_once)
        }
        Mode::FirstPosition => (200, completion(&[("1", 0.9), ("2", 0.1)])),
        Mode::NoDigits => (200, completion(&[("Response", 0.7), ("The", 0.2)])),
        Mode::Good | Mode::FailOnce => {
            let p1 = if good_first { 0.8 } else { 0.2 };
            // 5% on another token: normalised, P("1") is p1 again.
            let top = [("1", 0.95 * p1), (" 2", 0.95 * (1.0 - p1)), ("x", 0.05)];
            (200, completion(&top))
        }
    }
}

fn endpoint_config(dir: &Path, url: &str, extra: &str) -> PathBuf {
    let input = write(dir, "in.jsonl", PAIRS);
    let human = write(dir, "human.jsonl", HUMAN);
    write(
        dir,
        "label.toml",
        &format!(
            "input_file = {input:?}\nhuman_labels_file = {human:?}\noutput_dir = {out:?}\n\
             judge_url = {url:?}\njudge_model = \"judge-m\"\njudge_api_key_env = \"LABEL_AI_TEST_KEY\"\n\
             judge_template = \"Q: {{prompt}}\\nA: {{response_1}}\\nB: {{response_2}}\\nPreferred=\"\n\
             preamble = \"\"\njudge_top_logprobs = 5\njudge_backoff_s = 0.01\n{extra}\n",
            out = dir.join("out"),
        ),
    )
}

fn run(cfg: &Path) -> rlhf_train::Result<label_ai::LabelReport> {
    std::env::set_var("LABEL_AI_TEST_KEY", "sk-test");
    label_ai::run_file(cfg, &["judge_batch_size=2".into()])
}

/// Well-formed answers: the pairs are labelled by the judge (row 3 flipped), with judge_prob
/// and both orders' probabilities; the requests carry RLAIF's settings and the key; agreement
/// with the file's labels is 3 of 4; a rerun makes zero requests and writes the same rows.
#[test]
fn endpoint_labels_pairs_and_a_rerun_asks_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(|_| Mode::Good);
    let cfg = endpoint_config(dir.path(), &server.url, "");
    let report = run(&cfg).unwrap();
    assert_eq!(server.count(), 8, "both orders of 4 pairs");
    assert_eq!((report.rows, report.labelled, report.ties), (4, 4, 0));
    assert_eq!(report.position_consistency, 1.0);
    assert_eq!(report.queries_asked, 8);
    let h = report.human.as_ref().unwrap();
    assert_eq!((h.matched, h.ties), (4, 0));
    assert!((h.agreement - 0.75).abs() < 1e-12, "{}", h.agreement);
    let out = dir.path().join("out");
    let rows = read_jsonl(&out.join("pairs.jsonl"));
    assert_eq!(rows.len(), 4);
    for r in &rows {
        assert!(r["chosen"].as_str().unwrap().contains("good"), "{r}");
        assert!(r["rejected"].as_str().unwrap().contains("bad"), "{r}");
        // P(chosen) = 0.8 in both orders (" 2" counts as "2").
        let p = 0.8;
        assert!((r["judge_prob"].as_f64().unwrap() - p).abs() < 1e-9, "{r}");
        assert!((r["judge_probs"][0].as_f64().unwrap() - p).abs() < 1e-9);
        assert!((r["judge_probs"][1].as_f64().unwrap() - p).abs() < 1e-9);
        assert!(r.get("tie").is_none() && r.get("degree").is_none());
    }
    assert_eq!(rows[0]["id"], 1, "other fields are carried over");
    assert_eq!(rows[3]["prompt"], "q4");
    // The request: RLAIF's settings, the model, the key, the query as the template renders it.
    let (body, headers) = server.bodies.lock().unwrap()[0].clone();
    assert_eq!(body["model"], "judge-m");
    assert_eq!(body["max_tokens"], 1);
    assert_eq!(body["temperature"], 0.0);
    assert_eq!(body["logprobs"], true);
    assert_eq!(body["top_logprobs"], 5);
    assert!(headers.contains("Bearer sk-test"), "{headers}");
    let queries: Vec<String> = server
        .bodies
        .lock()
        .unwrap()
        .iter()
        .map(|(b, _)| b["messages"][0]["content"].as_str().unwrap().to_string())
        .collect();
    assert!(queries.contains(&"Q: q1\nA: a good answer\nB: a bad one\nPreferred=".to_string()));
    assert!(queries.contains(&"Q: q1\nA: a bad one\nB: a good answer\nPreferred=".to_string()));
    // The output trains the reward model and DPO as it is.
    let data = rlhf_data::load::<rlhf_data::Comparison>(
        &out.join("pairs.jsonl"),
        &rlhf_data::ReadOptions::default(),
    )
    .unwrap();
    assert_eq!(data.records.len(), 4);
    // A rerun: every answer from the cache, the same rows.
    let again = run(&cfg).unwrap();
    assert_eq!(server.count(), 8, "the rerun asked the server again");
    assert_eq!((again.queries_asked, again.queries_cached), (0, 8));
    assert_eq!(read_jsonl(&out.join("pairs.jsonl")), rows);
}

/// Garbage from the endpoint for one pair: an error naming its row; the rows before it are in
/// pairs.jsonl and their answers in the cache; once the endpoint is mended, the rerun asks only
/// for the pairs not yet answered and ends with all four.
#[test]
fn garbage_is_a_clear_error_and_a_rerun_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(|q| {
        if q.contains("Q: q3") {
            Mode::Garbage
        } else {
            Mode::Good
        }
    });
    let cfg = endpoint_config(dir.path(), &server.url, "judge_concurrency = 1");
    let err = run(&cfg).unwrap_err().to_string();
    assert!(err.contains("in.jsonl:3"), "{err}");
    assert!(
        err.contains("not a chat completion") && err.contains("proxy error"),
        "{err}"
    );
    assert!(err.contains("rerun to resume"), "{err}");
    let out = dir.path().join("out");
    assert_eq!(
        read_jsonl(&out.join("pairs.jsonl")).len(),
        2,
        "rows 1-2 kept"
    );
    let cached = read_jsonl(&out.join("judge_cache.jsonl")).len();
    assert_eq!(cached, 4, "both orders of rows 1-2");
    let asked_before = server.count();
    server.set_mode(|_| Mode::Good);
    let report = run(&cfg).unwrap();
    assert_eq!(report.labelled, 4);
    assert_eq!(report.queries_cached, 4);
    assert_eq!(server.count() - asked_before, 4, "only rows 3-4 asked");
}

/// A 500 is retried (with backoff) and then succeeds.
#[test]
fn a_server_error_is_retried() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(|_| Mode::FailOnce);
    let cfg = endpoint_config(
        dir.path(),
        &server.url,
        "judge_max_retries = 2\njudge_concurrency = 1",
    );
    let report = run(&cfg).unwrap();
    assert_eq!(report.labelled, 4);
    assert_eq!(server.count(), 9, "8 queries and one retry");
}

/// A judge slower than judge_timeout_s: after its retries, an error naming the row and the
/// timeout; nothing written for it.
#[test]
fn a_timeout_is_an_error_naming_the_row() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(|q| {
        if q.contains("Q: q2") {
            Mode::Slow
        } else {
            Mode::Good
        }
    });
    let cfg = endpoint_config(
        dir.path(),
        &server.url,
        "judge_timeout_s = 0.3\njudge_max_retries = 1\njudge_concurrency = 1",
    );
    let started = std::time::Instant::now();
    std::env::set_var("LABEL_AI_TEST_KEY", "sk-test");
    let err = label_ai::run_file(&cfg, &["judge_batch_size=1".into()])
        .unwrap_err()
        .to_string();
    assert!(err.contains("in.jsonl:2"), "{err}");
    assert!(
        err.contains("judge_timeout_s = 0.3") && err.contains("after 2 tries"),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    let rows = read_jsonl(&dir.path().join("out/pairs.jsonl"));
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["prompt"], "q1");
}

/// A judge that always prefers the first position: every pair's two orders cancel to ½ (ties,
/// kept out of pairs.jsonl, in ties.jsonl), position consistency 0, mean P(first) 0.9. Pairs
/// under tie_threshold dropped with drop_ties; answers without a digit counted as unparsed.
#[test]
fn position_bias_ties_and_unparsed_answers() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(|_| Mode::FirstPosition);
    let cfg = endpoint_config(dir.path(), &server.url, "");
    let r = run(&cfg).unwrap();
    assert_eq!((r.labelled, r.ties), (0, 4));
    assert_eq!(r.position_consistency, 0.0);
    assert!((r.mean_p_first - 0.9).abs() < 1e-9, "{}", r.mean_p_first);
    let out = dir.path().join("out");
    assert_eq!(read_jsonl(&out.join("pairs.jsonl")).len(), 0);
    let ties = read_jsonl(&out.join("ties.jsonl"));
    assert_eq!(ties.len(), 4);
    assert_eq!(ties[0]["tie"], true);
    assert!((ties[0]["judge_prob"].as_f64().unwrap() - 0.5).abs() < 1e-12);

    // Row 1 answered without a digit; the others confident (0.8) but under a threshold of 0.4.
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(|q| {
        if q.contains("Q: q1") {
            Mode::NoDigits
        } else {
            Mode::Good
        }
    });
    let cfg = endpoint_config(
        dir.path(),
        &server.url,
        "tie_threshold = 0.4\ndrop_ties = true",
    );
    let r = run(&cfg).unwrap();
    assert_eq!(r.unparsed, 1);
    assert!(
        r.unparsed_examples[0].contains("in.jsonl:1"),
        "{:?}",
        r.unparsed_examples
    );
    // |0.8 - ½| = 0.3 < 0.4: all three parsed pairs are ties, dropped.
    assert_eq!((r.labelled, r.ties, r.dropped), (0, 3, 3));
    assert!(!dir.path().join("out/ties.jsonl").exists());
    let h = r.human.unwrap();
    assert_eq!((h.matched, h.ties), (3, 3));
    assert!((h.agreement_ties_half - 0.5).abs() < 1e-12);
}

/// The local judge (tiny llama) against a direct forward pass: each output row's two
/// probabilities are P("1") / (P("1") + P("2")) of the query in each order, read from the
/// log-probs of the tokens "1" and "2" after the rendered query (preamble and few-shot
/// exemplar included), computed here through the rollout's log-prob path instead of the
/// judge's.
#[test]
fn local_judge_matches_a_direct_forward_pass() {
    let dir = tempfile::tempdir().unwrap();
    let input = write(
        dir.path(),
        "in.jsonl",
        concat!(
            r#"{"prompt": "2+2?", "chosen": "4", "rejected": "five"}"#,
            "\n",
            r#"{"prompt": "Hi.", "response_1": "Hello there!", "response_2": "hi"}"#,
            "\n",
            r#"{"prompt": "Sky?", "responses": ["blue", "The sky is green."]}"#,
            "\n"
        ),
    );
    let cfg = write(
        dir.path(),
        "label.toml",
        &format!(
            "input_file = {input:?}\noutput_dir = {out:?}\njudge_model_path = {m:?}\n\
             judge_template = \"{{prompt}}|{{response_1}}|{{response_2}}|=\"\n\
             preamble = \"Pick.\"\njudge_batch_size = 2\n\
             [[few_shot]]\nprompt = \"x\"\nresponse_1 = \"y\"\nresponse_2 = \"z\"\npreferred = 2\n",
            out = dir.path().join("out"),
            m = fixture("llama-gqa"),
        ),
    );
    let report = label_ai::run_file(&cfg, &[]).unwrap();
    assert_eq!(report.rows, 3);
    assert_eq!(report.labelled + report.ties, 3);
    let model = Model::load(
        &fixture("llama-gqa"),
        &LoadOptions {
            heads: Heads::Lm,
            ..Default::default()
        },
    )
    .unwrap();
    let tok = rlhf_model::tokenizer::Tokenizer::from_dir(&fixture("llama-gqa")).unwrap();
    let pad = rlhf_data::pad_id(&tok).unwrap();
    // P(first better) of one rendered query, from log P("1") and log P("2").
    let p_first = |prompt: &str, a: &str, b: &str| -> f64 {
        let text = format!("Pick.\n\nx|y|z|=2\n\n{prompt}|{a}|{b}|=");
        let ids = tok.encode(&text, true).unwrap();
        let one = tok.encode(&format!("{text}1"), true).unwrap()[ids.len()];
        let two = tok.encode(&format!("{text}2"), true).unwrap()[ids.len()];
        let lp = rlhf_train::rollout::response_logprobs_no_grad(
            &model,
            false,
            &[ids.clone(), ids],
            &[vec![one], vec![two]],
            1.0,
            pad,
            2,
        )
        .unwrap();
        let (l1, l2) = (lp[0][0] as f64, lp[1][0] as f64);
        1.0 / (1.0 + (l2 - l1).exp())
    };
    let out = dir.path().join("out");
    let rows: Vec<Value> = read_jsonl(&out.join("pairs.jsonl"))
        .into_iter()
        .chain(read_jsonl(&out.join("ties.jsonl")))
        .collect();
    assert_eq!(rows.len(), 3);
    for r in rows {
        let (p, c, rj) = (
            r["prompt"].as_str().unwrap(),
            r["chosen"].as_str().unwrap(),
            r["rejected"].as_str().unwrap(),
        );
        let shown_first = p_first(p, c, rj);
        let shown_second = 1.0 - p_first(p, rj, c);
        let got = [
            r["judge_probs"][0].as_f64().unwrap(),
            r["judge_probs"][1].as_f64().unwrap(),
        ];
        assert!((got[0] - shown_first).abs() < 1e-4, "{r}: {shown_first}");
        assert!((got[1] - shown_second).abs() < 1e-4, "{r}: {shown_second}");
        let mean = 0.5 * (shown_first + shown_second);
        assert!(
            mean >= 0.5 - 1e-9,
            "chosen is the side the mean prefers: {r}"
        );
        assert!((r["judge_prob"].as_f64().unwrap() - mean).abs() < 1e-4);
    }
    // A rerun reads the answers back instead of running the model.
    let again = label_ai::run_file(&cfg, &[]).unwrap();
    assert_eq!((again.queries_asked, again.queries_cached), (0, 6));
}

/// Bad settings are errors that name the file and the key.
#[test]
fn config_errors_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let base = "input_file = \"in.jsonl\"\noutput_dir = \"out\"\n";
    let check = |body: &str, want: &[&str]| {
        let p = write(dir.path(), "c.toml", body);
        let e = LabelAiConfig::load(&p, &[]).unwrap_err().to_string();
        for w in want {
            assert!(e.contains(w), "{body:?}: {e}");
        }
        assert!(e.contains("c.toml"), "{e}");
    };
    check(base, &["no judge"]);
    check(
        &format!("{base}judge_model_path = \"m\"\njudge_url = \"http://x\"\njudge_model = \"j\""),
        &["not both"],
    );
    check(&format!("{base}judge_url = \"http://x\""), &["judge_model"]);
    check(
        &format!("{base}judge_model_path = \"m\"\ntie_threshold = 0.7"),
        &["\"tie_threshold\" must be a number in [0, 0.5], found 0.7"],
    );
    check(
        &format!("{base}judge_model_path = \"m\"\njudge_top_logprobs = 50"),
        &["\"judge_top_logprobs\""],
    );
    check(
        &format!("{base}judge_model_path = \"m\"\ntie_treshold = 0.1"),
        &["unknown key `tie_treshold`", "`tie_threshold`"],
    );
    check(
        &format!(
            "{base}judge_model_path = \"m\"\n[[few_shot]]\nprompt = \"p\"\nresponse_1 = \"a\"\n\
             response_2 = \"b\"\npreferred = 3\n"
        ),
        &["few_shot[0].preferred", "1 or 2"],
    );
    check(
        &format!("{base}judge_model_path = \"m\"\njudge_template = \"{{prompt}} {{response_1}}\""),
        &["{response_2}"],
    );
    check(
        "prompt_file = \"p.jsonl\"\noutput_dir = \"o\"\njudge_model_path = \"m\"\n",
        &["needs `model`"],
    );
    check(
        "output_dir = \"o\"\njudge_model_path = \"m\"\n",
        &["nothing to label"],
    );
    // A URL this build cannot reach fails before any work.
    let p = write(
        dir.path(),
        "c.toml",
        &format!("{base}judge_url = \"https://api.example.com/v1\"\njudge_model = \"j\""),
    );
    write(dir.path(), "in.jsonl", PAIRS);
    let e = label_ai::run_file(&p, &[]).unwrap_err().to_string();
    assert!(e.contains("http:// only"), "{e}");
}

/// A pipeline's label_ai stage gets no `model` (it labels given pairs) and only its own shared
/// keys; the reward stage after it trains on its pairs; constitutional → sft → dpo trains the
/// sft stage on the revisions and dpo on the pairs.
#[test]
fn pipeline_stages_use_the_ai_feedback_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "p.toml",
        "model = \"m\"\noutput_dir = \"runs\"\nlogging_steps = 3\nseed = 7\n\
         [label_ai]\ninput_file = \"pairs.jsonl\"\njudge_model_path = \"judge\"\n\
         [reward]\nmax_steps = 1\n\
         [constitutional]\ntrain_file = \"red.jsonl\"\nconstitution = \"c.json\"\n\
         [sft]\nmax_steps = 1\n[dpo]\nmax_steps = 1\n",
    );
    let stages = rlhf_train::pipeline::stage_tables(&p, &[]).unwrap();
    let get = |name: &str, key: &str| -> Option<String> {
        let (_, t) = stages.stages.iter().find(|(n, _)| n == name).unwrap();
        t.get(key).and_then(|v| v.as_str()).map(str::to_string)
    };
    let out = |s: &str| stages.output_dir.join(s);
    assert_eq!(get("label_ai", "model"), None);
    let (_, la) = stages.stages.iter().find(|(n, _)| n == "label_ai").unwrap();
    assert!(la.get("logging_steps").is_none(), "not a label_ai key");
    assert_eq!(la.get("seed").and_then(|v| v.as_integer()), Some(7));
    assert!(get("label_ai", "input_file")
        .unwrap()
        .ends_with("pairs.jsonl"));
    assert_eq!(
        get("reward", "train_file").map(PathBuf::from),
        Some(out("label_ai").join("pairs.jsonl"))
    );
    assert!(get("constitutional", "model").unwrap().ends_with("/m"));
    assert_eq!(
        get("sft", "train_file").map(PathBuf::from),
        Some(out("constitutional").join("sft.jsonl"))
    );
    assert_eq!(
        get("dpo", "train_file").map(PathBuf::from),
        Some(out("constitutional").join("pairs.jsonl"))
    );
    assert_eq!(
        get("dpo", "model").map(PathBuf::from),
        Some(out("sft")),
        "dpo starts from the SL-CAI policy"
    );
}

/// RL-CAI's preference data: the policy (tiny llama) samples two answers per prompt, and each
/// pair is judged with its drawn principle's `preference` text as the preamble; the samples
/// are kept, so a rerun samples and asks nothing.
#[test]
fn policy_samples_judged_by_drawn_principles() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(|_| Mode::Good);
    let prompts = write(
        dir.path(),
        "prompts.jsonl",
        "{\"prompt\": \"a b\"}\n{\"prompt\": \"c d\"}\n{\"prompt\": \"e f\"}\n{\"prompt\": \"g\"}\n",
    );
    let constitution = write(
        dir.path(),
        "c.json",
        r#"[{"critic": "C1", "revision": "R1", "preference": "Which is kinder?"},
            {"critic": "C2", "revision": "R2", "preference": "Which is safer?"}]"#,
    );
    let cfg = write(
        dir.path(),
        "label.toml",
        &format!(
            "model = {m:?}\nprompt_file = {prompts:?}\nconstitution = {constitution:?}\n\
             output_dir = {out:?}\nmax_new_tokens = 4\nseed = 5\njudge_url = {url:?}\n\
             judge_model = \"j\"\njudge_template = \"Q: {{prompt}}\\nA: {{response_1}}\\nB: {{response_2}}\\nPreferred=\"\n",
            m = fixture("llama-gqa"),
            out = dir.path().join("out"),
            url = server.url,
        ),
    );
    let r = label_ai::run_file(&cfg, &[]).unwrap();
    assert_eq!(r.rows, 4);
    assert_eq!(server.count(), 8);
    assert!(dir.path().join("out/samples.json").is_file());
    let want = ["Which is kinder?", "Which is safer?"];
    for (b, _) in server.bodies.lock().unwrap().iter() {
        let q = b["messages"][0]["content"].as_str().unwrap();
        let row: usize = ["Q: a b\n", "Q: c d\n", "Q: e f\n", "Q: g\n"]
            .iter()
            .position(|p| q.contains(p))
            .unwrap();
        let p = want[label_ai::principle_index(5, row, 2)];
        assert!(
            q.starts_with(&format!("{p}\n\n")),
            "{q:?} should start with {p:?}"
        );
    }
    let rows: Vec<Value> = ["pairs.jsonl", "ties.jsonl"]
        .iter()
        .flat_map(|f| read_jsonl(&dir.path().join("out").join(f)))
        .collect();
    assert_eq!(rows.len(), 4);
    assert!(rows
        .iter()
        .all(|r| r["chosen"].is_string() && r["rejected"].is_string()));
    let again = label_ai::run_file(&cfg, &[]).unwrap();
    assert_eq!((again.queries_asked, server.count()), (0, 8));
}

/// A conversation's two samples are labelled as assistant turns, so the pairs file is TRL's
/// conversational format throughout and DPO reads it (a string answer beside a message-list
/// prompt is refused by the loader).
#[test]
fn conversational_prompts_give_conversational_pairs() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(|_| Mode::Good);
    let prompts = write(
        dir.path(),
        "prompts.jsonl",
        "{\"messages\": [{\"role\": \"user\", \"content\": \"a b\"}]}\n\
         {\"messages\": [{\"role\": \"user\", \"content\": \"c d\"}]}\n",
    );
    let cfg = write(
        dir.path(),
        "label.toml",
        &format!(
            "model = {m:?}\nprompt_file = {prompts:?}\noutput_dir = {out:?}\nmax_new_tokens = 4\n\
             seed = 5\njudge_url = {url:?}\njudge_model = \"j\"\n",
            m = chat_fixture(dir.path()),
            out = dir.path().join("out"),
            url = server.url,
        ),
    );
    let r = label_ai::run_file(&cfg, &[]).unwrap();
    assert_eq!(r.rows, 2);
    let out = dir.path().join("out");
    let rows: Vec<Value> = ["pairs.jsonl", "ties.jsonl"]
        .iter()
        .flat_map(|f| read_jsonl(&out.join(f)))
        .collect();
    assert_eq!(rows.len(), 2);
    for row in &rows {
        assert!(row["prompt"].is_array(), "{row}");
        for k in ["chosen", "rejected"] {
            assert_eq!(row[k][0]["role"], "assistant", "{row}");
            assert!(row[k][0]["content"].is_string(), "{row}");
        }
    }
    // This fake judge calls every pair a tie; the rows have the pairs' shape all the same,
    // and that shape is what the preference loader must take.
    let all: String = rows.iter().map(|r| format!("{r}\n")).collect();
    let all = write(dir.path(), "all.jsonl", &all);
    let data =
        rlhf_data::load::<rlhf_data::Comparison>(&all, &rlhf_data::ReadOptions::default()).unwrap();
    assert_eq!(data.records.len(), 2);
}

/// The llama fixture with a chat template (the fixtures have none).
fn chat_fixture(dir: &Path) -> PathBuf {
    let src = fixture("llama-gqa");
    let out = dir.join("chat-model");
    std::fs::create_dir_all(&out).unwrap();
    for f in std::fs::read_dir(&src).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, out.join(f.file_name().unwrap())).unwrap();
    }
    let cfg_path = out.join("tokenizer_config.json");
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap_or("{}".into())).unwrap();
    cfg["chat_template"] = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}\
         {% if add_generation_prompt %}<assistant>{% endif %}"
        .into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    out
}

/// A pipeline with no reward model (AI labels → DPO) evaluates by the judges its `[eval]`
/// names and adds no empty "proxy" judge (which `rlhf eval` refuses); asking for gold_proxy
/// there is an error that says what to add.
#[test]
fn a_pipeline_without_a_reward_model_has_no_proxy_judge() {
    let dir = tempfile::tempdir().unwrap();
    let body = "model = \"m\"\noutput_dir = \"runs\"\n\
         [label_ai]\ninput_file = \"pairs.jsonl\"\njudge_model_path = \"judge\"\n\
         [dpo]\nmax_steps = 1\n\
         [eval]\neval_file = \"e.jsonl\"\n\
         [eval.judges.gold]\nreward_program = [\"python3\", \"judge.py\"]\n";
    let p = write(dir.path(), "p.toml", body);
    let stages = rlhf_train::pipeline::stage_tables(&p, &[]).unwrap();
    let ev = stages.eval.expect("an [eval]");
    let judges: Vec<&String> = ev.config.judges.keys().collect();
    assert_eq!(judges, ["gold"]);
    let p = write(
        dir.path(),
        "q.toml",
        &body.replace("[eval]\n", "[eval]\ngold_proxy = true\n"),
    );
    let e = rlhf_train::pipeline::stage_tables(&p, &[])
        .err()
        .expect("gold_proxy without a proxy is refused")
        .to_string();
    assert!(e.contains("[eval.judges.proxy]"), "{e}");
}
