//! `rlhf constitutional` on the tiny llama fixture: the recipe's columns, each turn's prompt
//! (the critique request in the critique turn after the initial answer, the revision request
//! after the critique: checked by regenerating each turn greedily from the conversation
//! built here), the principles drawn by the seed, the SFT and pair files, resumption after a
//! kill mid-write, and config errors; with a chat template too.

use std::path::{Path, PathBuf};

use rlhf_model::tokenizer::{ChatMessage, Tokenizer};
use rlhf_model::{Heads, LoadOptions, Model};
use rlhf_train::constitutional::{self, CaiRow, Constitution, ConstitutionalConfig};
use serde_json::Value;

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
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The fixture's 128 positions hold a short system_chat, two rounds of 4-token turns and these
/// prompts.
fn setup(dir: &Path, model: &Path, extra: &str) -> PathBuf {
    let prompts = write(
        dir,
        "red.jsonl",
        "{\"prompt\": \"Steal?\\nA:\"}\n{\"prompt\": \"Hack?\"}\n{\"prompt\": \"Lie?\"}\n",
    );
    let constitution = write(
        dir,
        "c.json",
        r#"{"constitutions": [
             {"critic": "Harmful?", "revision": "Fix it."},
             {"critic": "Illegal?", "revision": "Redo it."}],
            "system_chat": [[{"role": "user", "content": "Rob?"},
                             {"role": "assistant", "content": "No."}]]}"#,
    );
    write(
        dir,
        "cai.toml",
        &format!(
            "model = {model:?}\ntrain_file = {prompts:?}\nconstitution = {constitution:?}\n\
             output_dir = {out:?}\nrounds = 2\nmax_new_tokens = 4\ntemperature = 0.0\n\
             generation_batch_size = 2\nmax_length = 128\nseed = 3\n{extra}\n",
            out = dir.join("out"),
        ),
    )
}

/// Regenerates each turn of every row greedily from the conversation the row says it had,
/// checking that the loop asked what it says it asked, in that order.
fn check_turns(model_dir: &Path, cfg: &ConstitutionalConfig, rows: &[CaiRow]) {
    let model = Model::load(
        model_dir,
        &LoadOptions {
            heads: Heads::Lm,
            ..Default::default()
        },
    )
    .unwrap();
    let tok = Tokenizer::from_dir(model_dir).unwrap();
    let eos = rlhf_model::generate::eos_ids(&model, &tok);
    let gen = rlhf_model::generate::GenerationConfig {
        max_new_tokens: cfg.max_new_tokens,
        eos_token_ids: eos.clone(),
        pad_token_id: rlhf_data::pad_id(&tok).unwrap(),
        ..Default::default()
    };
    let next = |conv: &[ChatMessage]| -> String {
        let mut ids = constitutional::render(&tok, conv).unwrap();
        // As the loop keeps them: the last max_length − max_new_tokens tokens.
        let keep = cfg.max_length - cfg.max_new_tokens;
        if ids.len() > keep {
            ids.drain(..ids.len() - keep);
        }
        let g = rlhf_model::generate::generate(&model, &[ids], &gen).unwrap();
        let text = rlhf_train::rollout::Decoder::new(&tok, &eos)
            .text(&g[0].completion_ids)
            .unwrap();
        constitutional::cut_turn(&text)
    };
    let c = Constitution::load(&cfg.constitution).unwrap();
    for r in rows {
        let mut conv: Vec<ChatMessage> = c.system_chat.concat();
        conv.push(ChatMessage::new("user", r.init_prompt.clone()));
        assert_eq!(
            next(&conv),
            r.init_response,
            "initial answer of {:?}",
            r.init_prompt
        );
        conv.push(ChatMessage::new("assistant", r.init_response.clone()));
        for round in &r.rounds {
            conv.push(ChatMessage::new("user", round.critic_prompt.clone()));
            assert_eq!(next(&conv), round.critic_response);
            conv.push(ChatMessage::new("assistant", round.critic_response.clone()));
            conv.push(ChatMessage::new("user", round.revision_prompt.clone()));
            assert_eq!(
                constitutional::strip_revision(&next(&conv)),
                round.revision_response
            );
            conv.push(ChatMessage::new(
                "assistant",
                round.revision_response.clone(),
            ));
        }
    }
}

fn run_and_check(model_dir: &Path) {
    let dir = tempfile::tempdir().unwrap();
    let path = setup(dir.path(), model_dir, "");
    let cfg = ConstitutionalConfig::load(&path, &[]).unwrap();
    let summary = constitutional::run(&cfg).unwrap();
    assert_eq!(summary["prompts"], 3.0);
    assert_eq!(summary["rounds"], 2.0);
    let out = dir.path().join("out");
    let raw = read_jsonl(&out.join("constitutional.jsonl"));
    assert_eq!(raw.len(), 3);
    for col in [
        "init_prompt",
        "init_response",
        "critic_prompt",
        "critic_response",
        "revision_prompt",
        "revision_response",
        "messages",
        "chosen",
        "rejected",
    ] {
        assert!(raw[0].get(col).is_some(), "no {col}: {}", raw[0]);
    }
    let rows: Vec<CaiRow> = raw
        .iter()
        .map(|r| serde_json::from_value(r.clone()).unwrap())
        .collect();
    let c = Constitution::load(&cfg.constitution).unwrap();
    for (i, r) in rows.iter().enumerate() {
        assert_eq!(r.rounds.len(), 2);
        for (k, round) in r.rounds.iter().enumerate() {
            let p = constitutional::principle_of(3, i, k + 1, 2);
            assert_eq!(round.principle, p);
            assert_eq!(round.critic_prompt, c.principles[p].critique_request);
            assert_eq!(round.revision_prompt, c.principles[p].revision_request);
        }
        // The top-level columns are the last round's; the conversations hold the prompt and
        // the final revision (chosen, messages) or the initial answer (rejected).
        let last = r.rounds.last().unwrap();
        assert_eq!(r.critic_prompt, last.critic_prompt);
        assert_eq!(r.revision_response, last.revision_response);
        assert_eq!(r.messages[0].content, r.init_prompt);
        assert_eq!(r.chosen[1].content, r.revision_response);
        assert_eq!(r.rejected[1].content, r.init_response);
    }
    assert_eq!(rows[0].init_prompt, "Steal?\nA:");
    assert_eq!(rows[0].prompt, "Steal?\nA:");
    check_turns(model_dir, &cfg, &rows);
    // sft.jsonl: the prompt as given and the revision (a space after a prompt ending "A:").
    let sft = read_jsonl(&out.join("sft.jsonl"));
    assert_eq!(sft.len(), 3);
    assert_eq!(sft[0]["prompt"], "Steal?\nA:");
    assert_eq!(
        sft[0]["completion"].as_str().unwrap(),
        format!(" {}", rows[0].revision_response)
    );
    let demos = rlhf_data::load::<rlhf_data::Demonstration>(
        &out.join("sft.jsonl"),
        &rlhf_data::ReadOptions::default(),
    )
    .unwrap();
    assert_eq!(demos.records.len(), 3);
    // pairs.jsonl: revision chosen, initial answer rejected, where they differ.
    let pairs = read_jsonl(&out.join("pairs.jsonl"));
    let differ = rows
        .iter()
        .filter(|r| {
            r.revision_response.trim() != r.init_response.trim()
                && !r.revision_response.trim().is_empty()
        })
        .count();
    assert_eq!(pairs.len(), differ);
    assert_eq!(summary["pairs"], differ as f64);
    for p in &pairs {
        let r = rows.iter().find(|r| r.prompt == p["prompt"]).unwrap();
        assert_eq!(p["chosen"].as_str().unwrap().trim(), r.revision_response);
        assert_eq!(p["rejected"].as_str().unwrap().trim(), r.init_response);
    }

    // A kill while the second batch was being written: the first batch and a torn line.
    let path_rows = out.join("constitutional.jsonl");
    let text = std::fs::read_to_string(&path_rows).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    std::fs::write(
        &path_rows,
        format!("{}\n{}\n{}", lines[0], lines[1], &lines[2][..10]),
    )
    .unwrap();
    std::fs::remove_file(out.join("sft.jsonl")).unwrap();
    constitutional::run(&cfg).unwrap();
    assert_eq!(std::fs::read_to_string(&path_rows).unwrap(), text);
    assert_eq!(read_jsonl(&out.join("sft.jsonl")), sft);
    // Other settings over it: refused, unless overwrite_output_dir.
    let e = constitutional::run_file(&path, &["seed=4".into()]).unwrap_err();
    assert!(e.to_string().contains("overwrite_output_dir"), "{e}");
    constitutional::run_file(
        &path,
        &["seed=4".into(), "overwrite_output_dir=true".into()],
    )
    .unwrap();
}

/// The fixture has no chat template: the conversation is Bai et al.'s "Human:/Assistant:" text.
#[test]
fn constitution_loop_without_a_chat_template() {
    let tok = Tokenizer::from_dir(&fixture("llama-gqa")).unwrap();
    let ids = constitutional::render(
        &tok,
        &[
            ChatMessage::new("user", "Q"),
            ChatMessage::new("assistant", "A"),
            ChatMessage::new("user", "Critique"),
        ],
    )
    .unwrap();
    assert_eq!(
        tok.decode(&ids, true).unwrap(),
        "\n\nHuman: Q\n\nAssistant: A\n\nHuman: Critique\n\nAssistant:"
    );
    run_and_check(&fixture("llama-gqa"));
}

/// With a chat template, each turn is rendered by it (with the generation prompt).
#[test]
fn constitution_loop_with_a_chat_template() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixture("llama-gqa");
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    let cfg_text = std::fs::read_to_string(src.join("tokenizer_config.json")).unwrap();
    let mut cfg: Value = serde_json::from_str(&cfg_text).unwrap();
    cfg["chat_template"] = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}\
         {% if add_generation_prompt %}<assistant>{% endif %}"
        .into();
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        serde_json::to_string(&cfg).unwrap(),
    )
    .unwrap();
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    let ids = constitutional::render(
        &tok,
        &[
            ChatMessage::new("user", "Q"),
            ChatMessage::new("assistant", "A"),
        ],
    )
    .unwrap();
    assert_eq!(
        tok.decode(&ids, false).unwrap(),
        "<user>Q\n<assistant>A\n<assistant>"
    );
    run_and_check(dir.path());
}

#[test]
fn config_errors_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = setup(dir.path(), &fixture("llama-gqa"), "");
    let err = |set: &[&str]| {
        let s: Vec<String> = set.iter().map(|x| x.to_string()).collect();
        ConstitutionalConfig::load(&path, &s)
            .unwrap_err()
            .to_string()
    };
    let e = err(&["rounds=0"]);
    assert!(
        e.contains("cai.toml") && e.contains("\"rounds\" must be an integer >= 1"),
        "{e}"
    );
    let e = err(&["max_length=4"]);
    assert!(e.contains("\"max_length\""), "{e}");
    let e = err(&["round=2"]);
    assert!(
        e.contains("unknown key `round`") && e.contains("`rounds`"),
        "{e}"
    );
    let e = err(&["constitution=\"\""]);
    assert!(e.contains("`constitution` is required"), "{e}");
    let e = constitutional::run_file(&path, &["constitution=\"nope.json\"".into()])
        .unwrap_err()
        .to_string();
    assert!(e.contains("nope.json"), "{e}");
}
