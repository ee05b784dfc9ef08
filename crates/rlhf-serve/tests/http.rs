//! The HTTP API on the fixture models: OpenAI's shapes, streaming, log-probabilities against
//! the model's own log-softmax, reward scores against the model's own scores, the API key,
//! and OpenAI-shaped errors that name the field.

mod common;

use common::{events, get, post, post_raw, start, with_chat_template};
use rlhf_model::tokenizer::{ChatMessage, Tokenizer};
use rlhf_model::{Batch, Heads, LoadOptions, Model};
use serde_json::{json, Value};

const CHAT: &str = "/v1/chat/completions";
const COMPLETIONS: &str = "/v1/completions";

fn chat_body(extra: Value) -> Value {
    let mut body = json!({
        "model": "test-model",
        "messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "Say something about cats."}],
        "max_tokens": 20,
        "temperature": 0,
    });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

/// Checks an error response: the status, OpenAI's shape, and the field it names.
fn assert_error(r: &common::Reply, status: u16, param: Option<&str>) {
    assert_eq!(r.status, status, "{}", r.body);
    let e = &r.json()["error"];
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{}",
        r.body
    );
    assert!(e["type"].is_string(), "{}", r.body);
    if let Some(p) = param {
        assert_eq!(e["param"], p, "{}", r.body);
    }
}

#[test]
fn chat_and_completions_answer_in_openais_shape_and_streams_add_up() {
    let dir = with_chat_template("llama-gqa");
    let server = start(dir.path(), 8, None);
    let base = &server.base;

    let models = get(base, "/v1/models", None).json();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "test-model");
    assert_eq!(get(base, "/v1/models/test-model", None).status, 200);

    let r = post(base, CHAT, &chat_body(json!({})));
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(v["model"], "test-model");
    let c = &v["choices"][0];
    assert_eq!(c["message"]["role"], "assistant");
    let text = c["message"]["content"].as_str().unwrap().to_string();
    let finish = c["finish_reason"].as_str().unwrap().to_string();
    assert!(finish == "stop" || finish == "length", "{finish}");
    let usage = &v["usage"];
    let completion_tokens = usage["completion_tokens"].as_u64().unwrap();
    assert!((1..=20).contains(&completion_tokens));
    if finish == "length" {
        assert_eq!(completion_tokens, 20);
    }
    // The prompt is the chat template's rendering.
    let tok = &server.app.tokenizer;
    let msgs = [
        ChatMessage::new("system", "Be brief."),
        ChatMessage::new("user", "Say something about cats."),
    ];
    let prompt = tok
        .encode(&tok.apply_chat_template(&msgs, true).unwrap(), false)
        .unwrap();
    assert_eq!(usage["prompt_tokens"], prompt.len());
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        prompt.len() as u64 + completion_tokens
    );

    // Streamed: a role chunk, content chunks that concatenate to the same text, the finish
    // reason, the usage chunk asked for, then [DONE].
    let r = post(
        base,
        CHAT,
        &chat_body(json!({"stream": true, "stream_options": {"include_usage": true}})),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        r.content_type.starts_with("text/event-stream"),
        "{}",
        r.content_type
    );
    let (chunks, done) = events(&r.body);
    assert!(done, "no [DONE]: {}", r.body);
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let mut streamed = String::new();
    let mut finishes = Vec::new();
    for ch in &chunks {
        assert_eq!(ch["object"], "chat.completion.chunk");
        assert_eq!(ch["id"], chunks[0]["id"]);
        for c in ch["choices"].as_array().unwrap() {
            streamed.push_str(c["delta"]["content"].as_str().unwrap_or(""));
            if let Some(f) = c["finish_reason"].as_str() {
                finishes.push(f.to_string());
            }
        }
    }
    assert_eq!(streamed, text);
    assert_eq!(finishes, [finish.as_str()]);
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"]["completion_tokens"], completion_tokens);

    // Completions: a prompt list gives one choice per prompt, each as it is alone.
    let one = |p: &str, stream: bool| {
        post(
            base,
            COMPLETIONS,
            &json!({"model": "test-model", "prompt": p, "max_tokens": 12, "temperature": 0,
                    "stream": stream}),
        )
    };
    let a = one("The cat sat", false).json();
    let b = one("Once upon a time there was", false).json();
    assert_eq!(a["object"], "text_completion");
    let r = post(
        base,
        COMPLETIONS,
        &json!({"prompt": ["The cat sat", "Once upon a time there was"], "max_tokens": 12,
                "temperature": 0}),
    )
    .json();
    assert_eq!(r["choices"][0]["text"], a["choices"][0]["text"]);
    assert_eq!(r["choices"][1]["text"], b["choices"][0]["text"]);
    assert_eq!(r["choices"][1]["index"], 1);
    assert_eq!(
        r["usage"]["prompt_tokens"].as_u64().unwrap(),
        a["usage"]["prompt_tokens"].as_u64().unwrap()
            + b["usage"]["prompt_tokens"].as_u64().unwrap()
    );
    let s = one("The cat sat", true);
    let (chunks, done) = events(&s.body);
    assert!(done);
    let streamed: String = chunks
        .iter()
        .flat_map(|c| c["choices"].as_array().unwrap().clone())
        .map(|c| c["text"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(streamed, a["choices"][0]["text"].as_str().unwrap());

    // Token ids as the prompt, and n choices: seeded sampling gives the same choices again,
    // and the choices of one request differ from each other.
    let ids = tok.encode("The cat sat", true).unwrap();
    let by_ids = post(
        base,
        COMPLETIONS,
        &json!({"prompt": ids, "max_tokens": 12, "temperature": 0}),
    )
    .json();
    assert_eq!(by_ids["choices"][0]["text"], a["choices"][0]["text"]);
    let sampled = json!({"prompt": "The cat", "max_tokens": 16, "temperature": 1.0, "n": 3,
                         "seed": 42});
    let s1 = post(base, COMPLETIONS, &sampled).json();
    let s2 = post(base, COMPLETIONS, &sampled).json();
    assert_eq!(s1["choices"], s2["choices"]);
    let texts: Vec<&str> = (0..3)
        .map(|i| s1["choices"][i]["text"].as_str().unwrap())
        .collect();
    assert!(texts[0] != texts[1] || texts[1] != texts[2], "{texts:?}");
}

/// A stop string ends the text before it, streamed or not, and the finish reason is "stop".
#[test]
fn stop_strings_cut_the_text_streamed_or_not() {
    let dir = with_chat_template("llama-gqa");
    let server = start(dir.path(), 8, None);
    let base = &server.base;
    let body = |extra: Value| {
        let mut b = json!({"prompt": "The cat sat on the", "max_tokens": 40, "temperature": 0,
                           "ignore_eos": true});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    let full = post(base, COMPLETIONS, &body(json!({}))).json()["choices"][0]["text"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(full.chars().count() > 12, "{full:?}");
    // A stop string from the middle of the text (three characters after its sixth).
    let start: usize = full.char_indices().nth(6).unwrap().0;
    let end: usize = full
        .char_indices()
        .nth(9)
        .map(|c| c.0)
        .unwrap_or(full.len());
    let stop = &full[start..end];
    let want = &full[..full.find(stop).unwrap()];
    for stream in [false, true] {
        let r = post(
            base,
            COMPLETIONS,
            &body(json!({"stop": ["never appears", stop], "stream": stream})),
        );
        let (text, finish) = if stream {
            let (chunks, done) = events(&r.body);
            assert!(done);
            let cs: Vec<Value> = chunks
                .iter()
                .flat_map(|c| c["choices"].as_array().unwrap().clone())
                .collect();
            let text: String = cs.iter().map(|c| c["text"].as_str().unwrap()).collect();
            let finish = cs
                .iter()
                .find_map(|c| c["finish_reason"].as_str().map(str::to_string));
            (text, finish.unwrap())
        } else {
            let v = r.json();
            (
                v["choices"][0]["text"].as_str().unwrap().to_string(),
                v["choices"][0]["finish_reason"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            )
        };
        assert_eq!(text, want, "stream {stream}, stop {stop:?}");
        assert_eq!(finish, "stop");
    }
}

/// log_softmax of the model's logits, by a full forward pass over prompt + completion
/// without a cache: (token, logprob) of the k best at each completion position.
fn reference_logprobs(
    model: &Model,
    tok: &Tokenizer,
    prompt: &[u32],
    k: usize,
) -> Vec<Vec<(String, f32)>> {
    let mut ids = prompt.to_vec();
    let mut out = Vec::new();
    for _ in 0..3 {
        let batch = Batch::pad(&[ids.clone()], 0, false);
        let hidden = model.hidden(&batch).unwrap();
        let logits = model.logits(&hidden).unwrap();
        let lp = rlhf_model::kernels::generic::log_softmax(&logits.squeeze(0).unwrap()).unwrap();
        let row: Vec<f32> = lp.get(ids.len() - 1).unwrap().to_vec1().unwrap();
        let mut order: Vec<usize> = (0..row.len()).collect();
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
        out.push(
            order[..k]
                .iter()
                .map(|&i| (tok.decode(&[i as u32], false).unwrap(), row[i]))
                .collect(),
        );
        ids.push(order[0] as u32);
    }
    out
}

#[test]
fn logprobs_are_the_models_log_softmax() {
    let dir = with_chat_template("llama-gqa");
    let server = start(dir.path(), 8, None);
    let base = &server.base;
    let tok = &server.app.tokenizer;
    let model = Model::load(dir.path(), &LoadOptions::default()).unwrap();
    let msgs = [ChatMessage::new("user", "Which is better, 1 or 2?")];
    let prompt = tok
        .encode(&tok.apply_chat_template(&msgs, true).unwrap(), false)
        .unwrap();
    let want = reference_logprobs(&model, tok, &prompt, 5);
    // The judge's request: one token, greedy, five alternatives. Temperature and top_p do
    // not change log-probabilities (they are the model's own distribution).
    for (max_tokens, extra) in [
        (1, json!({})),
        (3, json!({"top_p": 0.5})),
        (3, json!({"temperature": 0.7, "seed": 1})),
    ] {
        let mut body = json!({"messages": [{"role": "user", "content": "Which is better, 1 or 2?"}],
                              "max_tokens": max_tokens, "temperature": 0, "logprobs": true,
                              "top_logprobs": 5});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let v = post(base, CHAT, &body).json();
        let content = v["choices"][0]["logprobs"]["content"]
            .as_array()
            .unwrap()
            .clone();
        assert_eq!(content.len(), max_tokens, "{v}");
        // Sampled, the path leaves the greedy reference after the first token.
        let sampled = extra.get("temperature").is_some();
        for (pos, entry) in content.iter().enumerate().take(if sampled { 1 } else { 3 }) {
            let top = entry["top_logprobs"].as_array().unwrap();
            assert_eq!(top.len(), 5);
            for (j, t) in top.iter().enumerate() {
                let (s, lp) = &want[pos][j];
                assert_eq!(t["token"], s.as_str(), "position {pos}, rank {j}");
                let got = t["logprob"].as_f64().unwrap() as f32;
                assert!(
                    (got - lp).abs() < 1e-4,
                    "position {pos}, rank {j}: {got} vs {lp}"
                );
                let bytes: Vec<u8> = t["bytes"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|b| b.as_u64().unwrap() as u8)
                    .collect();
                if !s.contains('\u{FFFD}') {
                    assert_eq!(bytes, s.as_bytes());
                }
            }
            if !sampled {
                // Greedy: the chosen token is the best one.
                assert_eq!(entry["token"], top[0]["token"]);
                assert_eq!(entry["logprob"], top[0]["logprob"]);
            }
        }
    }
    // Completions' shape: tokens, token_logprobs, top_logprobs as {token: logprob}, offsets.
    let v = post(
        base,
        COMPLETIONS,
        &json!({"prompt": prompt, "max_tokens": 3, "temperature": 0, "logprobs": 2}),
    )
    .json();
    let lp = &v["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), 3);
    for pos in 0..3 {
        let (s, l) = &want[pos][0];
        assert_eq!(lp["tokens"][pos], s.as_str());
        assert!((lp["token_logprobs"][pos].as_f64().unwrap() as f32 - l).abs() < 1e-4);
        let top = lp["top_logprobs"][pos].as_object().unwrap();
        assert!(top.len() <= 2 && !top.is_empty());
        assert!((top[s.as_str()].as_f64().unwrap() as f32 - l).abs() < 1e-4);
    }
    assert_eq!(lp["text_offset"][0], 0);
}

#[test]
fn score_gives_the_reward_models_own_scores() {
    let dir = common::fixtures().join("llama-gqa-reward");
    let server = start(&dir, 8, None);
    let base = &server.base;
    let tok = Tokenizer::from_dir(&dir).unwrap();
    let eos = tok.eos_token().unwrap().to_string();
    let pad = tok.pad_token().unwrap().to_string();
    let queries = [
        "Question: what is 2+2? Answer: 4".to_string(),
        "A much longer text that goes on about nothing in particular for a while.".to_string(),
        format!("Short{eos}"),
    ];
    let r = post(base, "/v1/score", &json!({"query": queries}));
    assert_eq!(r.status, 200, "{}", r.body);
    let rewards: Vec<f32> = r.json()["rewards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    // Directly: text + EOS, as the reward trainer builds a text row, through the padded
    // forward `rlhf score` runs.
    let model = Model::load(
        &dir,
        &LoadOptions {
            heads: Heads::Score,
            require_score_head: true,
            ..Default::default()
        },
    )
    .unwrap();
    let seqs: Vec<Vec<u32>> = queries
        .iter()
        .map(|q| {
            let q = q.strip_suffix(&eos).unwrap_or(q);
            tok.encode(&format!("{q}{eos}"), true).unwrap()
        })
        .collect();
    let batch = Batch::pad(&seqs, model.config.pad_token_id.unwrap_or(0), false);
    let want: Vec<f32> = model
        .scores(&model.hidden(&batch).unwrap(), &batch)
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(rewards.len(), 3);
    for (g, w) in rewards.iter().zip(&want) {
        assert!((g - w).abs() < 1e-4, "{rewards:?} vs {want:?}");
    }
    // OpenRLHF's policy sends decoded sequences with their padding and EOS: stripped.
    let padded = format!("{pad}{pad}{}{eos}{pad}{pad}", queries[0]);
    let r = post(
        base,
        "/v1/score",
        &json!({"query": [padded], "prompts": ["x"], "labels": [""]}),
    );
    let got = r.json()["rewards"][0].as_f64().unwrap() as f32;
    assert!((got - want[0]).abs() < 1e-4, "{got} vs {}", want[0]);
    // A reward model has no chat; a language model no score.
    assert_error(&post(base, CHAT, &chat_body(json!({}))), 400, None);
    assert_error(
        &post(base, "/v1/score", &json!({"query": []})),
        400,
        Some("query"),
    );
    assert_error(
        &post(base, "/v1/score", &json!({"query": [3]})),
        400,
        Some("query[0]"),
    );
    let lm = start(&common::fixtures().join("llama-gqa"), 8, None);
    assert_error(
        &post(&lm.base, "/v1/score", &json!({"query": ["a"]})),
        400,
        None,
    );
}

#[test]
fn the_api_key_is_required_when_set() {
    let dir = with_chat_template("llama-gqa");
    let server = start(dir.path(), 8, Some("s3cret-key"));
    let base = &server.base;
    let body = chat_body(json!({"max_tokens": 2})).to_string();
    for key in [
        None,
        Some("wrong"),
        Some("s3cret-kex"),
        Some("s3cret-key-and-more"),
    ] {
        let r = post_raw(base, CHAT, &body, key);
        assert_error(&r, 401, None);
        assert_eq!(r.json()["error"]["code"], "invalid_api_key");
        assert_eq!(get(base, "/v1/models", key).status, 401);
    }
    assert_eq!(post_raw(base, CHAT, &body, Some("s3cret-key")).status, 200);
    assert_eq!(get(base, "/v1/models", Some("s3cret-key")).status, 200);
    // Off loopback without a key: refused before anything loads.
    let mut opts = rlhf_serve::ServeOptions::new(dir.path().to_path_buf());
    opts.bind = "0.0.0.0:8000".parse().unwrap();
    let e = rlhf_serve::App::load(&opts)
        .err()
        .expect("refused")
        .to_string();
    assert!(
        e.contains("without an API key") && e.contains("--api-key-env"),
        "{e}"
    );
    opts.api_key = Some("k".into());
    opts.check().unwrap();
}

#[test]
fn bad_requests_get_openai_shaped_errors_naming_the_field() {
    let dir = with_chat_template("llama-gqa");
    let server = start(dir.path(), 8, None);
    let base = &server.base;
    assert_error(&post_raw(base, CHAT, "{not json", None), 400, None);
    assert_error(&post_raw(base, CHAT, "[1, 2]", None), 400, None);
    for (extra, field) in [
        (json!({"temperature": "hot"}), "temperature"),
        (json!({"temperature": 3}), "temperature"),
        (json!({"top_p": 0}), "top_p"),
        (json!({"max_tokens": 0}), "max_tokens"),
        (json!({"max_tokens": 1000}), "max_tokens"),
        (json!({"n": 0}), "n"),
        (json!({"stop": [1]}), "stop"),
        (json!({"stop": ""}), "stop"),
        (json!({"seed": "x"}), "seed"),
        (json!({"top_logprobs": 3}), "top_logprobs"),
        (
            json!({"logprobs": true, "top_logprobs": 21}),
            "top_logprobs",
        ),
        (json!({"presence_penalty": 0.5}), "presence_penalty"),
        (
            json!({"stream_options": {"include_usage": true}}),
            "stream_options",
        ),
        (json!({"frobnicate": 1}), "frobnicate"),
        (json!({"messages": "hi"}), "messages"),
        (json!({"messages": []}), "messages"),
        (json!({"messages": [{"content": "hi"}]}), "messages[0].role"),
        (
            json!({"messages": [{"role": "user", "content": 5}]}),
            "messages[0].content",
        ),
    ] {
        let r = post(base, CHAT, &chat_body(extra.clone()));
        assert_error(&r, 400, Some(field));
        let msg = r.json()["error"]["message"].as_str().unwrap().to_string();
        assert!(
            msg.contains(field.split('[').next().unwrap()),
            "{extra}: {msg}"
        );
    }
    let mut no_messages = chat_body(json!({}));
    no_messages.as_object_mut().unwrap().remove("messages");
    assert_error(&post(base, CHAT, &no_messages), 400, Some("messages"));
    for (body, field) in [
        (json!({"max_tokens": 2}), "prompt"),
        (json!({"prompt": 5}), "prompt"),
        (json!({"prompt": [1, 99999]}), "prompt"),
        (json!({"prompt": ["a", {}]}), "prompt[1]"),
        (json!({"prompt": "a", "logprobs": true}), "logprobs"),
        (json!({"prompt": "a", "echo": true}), "echo"),
    ] {
        assert_error(&post(base, COMPLETIONS, &body), 400, Some(field));
    }
    let r = post(base, CHAT, &chat_body(json!({"model": "gpt-4"})));
    assert_error(&r, 404, Some("model"));
    assert_eq!(r.json()["error"]["code"], "model_not_found");
    assert_error(&get(base, "/v1/nothing", None), 404, None);
    assert_error(&get(base, CHAT, None), 405, None);
    // A tokenizer without a chat template: chat is refused, naming the messages.
    let plain = start(&common::fixtures().join("llama-gqa"), 8, None);
    let r = post(&plain.base, CHAT, &chat_body(json!({})));
    assert_error(&r, 400, Some("messages"));
    assert!(r.body.contains("chat template"), "{}", r.body);
}
