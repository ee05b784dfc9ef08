//! `rlhf label-ai` against a real `rlhf serve` on the tiny llama fixture (with a chat template):
//! every pair's outcome equals what the served model's own full next-token distribution says
//! the endpoint judge must read (P("1") against P("2") where either is among the top 20
//! tokens, else an unparsed answer), and a rerun asks the server nothing.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rlhf_model::tokenizer::{ChatMessage, Tokenizer};
use rlhf_model::{Batch, Heads, LoadOptions, Model};
use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../../shared/fixtures/models"
    ))
    .join(name)
}

/// The llama fixture with a chat template (chat completions need one), its weights changed
/// so that "1" and "2" are among its most likely next tokens: with random weights they are
/// almost never among the top 20 an endpoint lists, and every answer would be unparsed. Every
/// embedding gets a large first coordinate, which then dominates the residual stream and its
/// norms, so the final hidden state's first coordinate is about the same for every input; the
/// (tied) output rows of "1" and "2" get a little more of it than every other token's. The
/// rest of the distribution still depends on the input.
fn chat_model(dir: &Path) -> PathBuf {
    let src = fixture("llama-gqa");
    let out = dir.join("model");
    std::fs::create_dir_all(&out).unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(src.join(f), out.join(f)).unwrap();
    }
    let tok = Tokenizer::from_dir(&src).unwrap();
    let dev = candle_core::Device::Cpu;
    let mut w = candle_core::safetensors::load(src.join("model.safetensors"), &dev).unwrap();
    let g0 = w["model.norm.weight"].to_vec1::<f32>().unwrap()[0];
    let mut emb: Vec<Vec<f32>> = w["model.embed_tokens.weight"].to_vec2().unwrap();
    for row in emb.iter_mut() {
        row[0] += 200.0;
    }
    for (digit, extra) in [("1", 1.0f32), ("2", 0.8)] {
        let id = tok.token_to_id(digit).unwrap() as usize;
        emb[id][0] += extra * g0.signum();
    }
    let flat: Vec<f32> = emb.concat();
    w.insert(
        "model.embed_tokens.weight".into(),
        candle_core::Tensor::from_vec(flat, (emb.len(), emb[0].len()), &dev).unwrap(),
    );
    candle_core::safetensors::save(&w, out.join("model.safetensors")).unwrap();
    let text = std::fs::read_to_string(src.join("tokenizer_config.json")).unwrap();
    let mut cfg: Value = serde_json::from_str(&text).unwrap();
    cfg["chat_template"] = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}\
         {% if add_generation_prompt %}<assistant>{% endif %}"
        .into();
    std::fs::write(
        out.join("tokenizer_config.json"),
        serde_json::to_string(&cfg).unwrap(),
    )
    .unwrap();
    out
}

struct Served(Child);

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve(model: &Path, log: &Path) -> (Served, String) {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(env!("CARGO_BIN_EXE_rlhf"))
        .args(["serve", "--model"])
        .arg(model)
        .args(["--bind", &format!("127.0.0.1:{port}")])
        .args(["--served-model-name", "fixture"])
        // The judge's probabilities are checked against a direct f32 forward pass below.
        .args(["--dtype", "f32"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    let served = Served(child);
    let base = format!("http://127.0.0.1:{port}/v1");
    let deadline = Instant::now() + Duration::from_secs(60);
    while ureq::get(&format!("{base}/models")).call().is_err() {
        assert!(
            Instant::now() < deadline,
            "rlhf serve did not come up: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    (served, base)
}

/// What the endpoint judge must read for one query: from the served model's full next-token
/// distribution, the top 20, then label-ai's rule (a missing digit takes the smallest listed
/// probability). `None`: neither digit listed.
fn expected_p_first(model: &Model, tok: &Tokenizer, query: &str) -> Option<f64> {
    let text = tok
        .apply_chat_template(&[ChatMessage::new("user", query)], true)
        .unwrap();
    let ids = tok.encode(&text, false).unwrap();
    let hidden = model.hidden(&Batch::pad(&[ids], 0, true)).unwrap();
    let t = hidden.dim(1).unwrap();
    let logits: Vec<f32> = model
        .logits(&hidden.narrow(1, t - 1, 1).unwrap())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = max
        + logits
            .iter()
            .map(|&x| (x as f64 - max).exp())
            .sum::<f64>()
            .ln();
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    let top = &order[..20];
    let prob = |i: usize| (logits[i] as f64 - lse).exp();
    let smallest = prob(top[19]);
    let digit = |d: &str| {
        let sum: f64 = top
            .iter()
            .filter(|&&i| tok.decode(&[i as u32], false).unwrap().trim() == d)
            .map(|&i| prob(i))
            .sum();
        (sum > 0.0).then_some(sum)
    };
    match (digit("1"), digit("2")) {
        (None, None) => None,
        (a, b) => {
            let (a, b) = (a.unwrap_or(smallest), b.unwrap_or(smallest));
            Some(a / (a + b))
        }
    }
}

#[test]
fn label_ai_with_rlhf_serve_as_the_judge() {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = chat_model(dir.path());
    let (_server, url) = serve(&model_dir, &dir.path().join("serve.log"));
    let pairs: Vec<(&str, &str, &str)> = (0..12)
        .map(|i| {
            [
                ("2+2?", "4", "five"),
                ("Hi.", "Hello!", "hi"),
                ("Sky?", "blue", "green"),
                ("Name a fruit.", "apple", "car"),
                ("1+1?", "2", "3"),
                ("Cat?", "meow", "woof"),
            ][i % 6]
        })
        .enumerate()
        .map(|(i, (p, a, b))| {
            // Distinct prompts, so every pair is asked.
            let p: &'static str = Box::leak(format!("{p} ({i})").into_boxed_str());
            (p, a, b)
        })
        .collect();
    let input = dir.path().join("in.jsonl");
    std::fs::write(
        &input,
        pairs
            .iter()
            .map(|(p, a, b)| {
                serde_json::json!({"prompt": p, "chosen": a, "rejected": b}).to_string() + "\n"
            })
            .collect::<String>(),
    )
    .unwrap();
    let cfg = dir.path().join("label.toml");
    std::fs::write(
        &cfg,
        format!(
            "input_file = {input:?}\noutput_dir = {out:?}\njudge_url = {url:?}\n\
             judge_model = \"fixture\"\njudge_template = \"{{prompt}}|{{response_1}}|{{response_2}}|=\"\n\
             preamble = \"\"\njudge_top_logprobs = 20\njudge_batch_size = 4\n",
            out = dir.path().join("out"),
        ),
    )
    .unwrap();
    let label = || {
        let out = Command::new(env!("CARGO_BIN_EXE_rlhf"))
            .args(["label-ai", "--config"])
            .arg(&cfg)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let line = String::from_utf8(out.stdout).unwrap();
        serde_json::from_str::<Value>(line.trim()).unwrap()
    };
    let summary = label();

    // What each pair must come to, from the model itself.
    let model = Model::load(
        &model_dir,
        &LoadOptions {
            heads: Heads::Lm,
            ..Default::default()
        },
    )
    .unwrap();
    let tok = Tokenizer::from_dir(&model_dir).unwrap();
    let query = |p: &str, a: &str, b: &str| format!("{p}|{a}|{b}|=");
    let out = dir.path().join("out");
    let rows: Vec<Value> = ["pairs.jsonl", "ties.jsonl"]
        .iter()
        .flat_map(|f| {
            std::fs::read_to_string(out.join(f))
                .unwrap_or_default()
                .lines()
                .map(|l| serde_json::from_str::<Value>(l).unwrap())
                .collect::<Vec<_>>()
        })
        .collect();
    let mut unparsed = 0;
    for (p, a, b) in &pairs {
        let first = expected_p_first(&model, &tok, &query(p, a, b));
        let second = expected_p_first(&model, &tok, &query(p, b, a));
        let (Some(x), Some(y)) = (first, second) else {
            unparsed += 1;
            assert!(
                rows.iter().all(|r| r["prompt"] != *p),
                "{p} should be unparsed"
            );
            continue;
        };
        // P(a better) in each order, and the row's chosen side.
        let (pa_first, pa_second) = (x, 1.0 - y);
        let mean = 0.5 * (pa_first + pa_second);
        let r = rows.iter().find(|r| r["prompt"] == *p).expect("a row");
        // Within float noise of a tie (the judge favours whichever answer it sees first, in
        // both orders, by the same amount) either side may be chosen: the server's batched
        // products and this direct forward pass differ in the last bits.
        let a_chosen = if (mean - 0.5).abs() < 1e-3 {
            r["chosen"] == *a
        } else {
            mean >= 0.5
        };
        let (want_chosen, want) = if a_chosen {
            (*a, [pa_first, pa_second])
        } else {
            (*b, [1.0 - pa_second, 1.0 - pa_first])
        };
        assert_eq!(r["chosen"], want_chosen, "{r}");
        for k in 0..2 {
            let got = r["judge_probs"][k].as_f64().unwrap();
            assert!((got - want[k]).abs() < 1e-3, "{r}: expected {want:?}");
        }
    }
    assert_eq!(summary["unparsed"].as_f64().unwrap() as usize, unparsed);
    eprintln!("{unparsed} of {} pairs unparsed", pairs.len());
    assert!(
        unparsed < pairs.len(),
        "every pair unparsed: nothing was compared"
    );
    assert_eq!(summary["queries_asked"], 24.0);
    // The rerun asks the server nothing.
    let again = label();
    assert_eq!(again["queries_asked"], 0.0);
    assert_eq!(again["queries_cached"], 24.0);
}
