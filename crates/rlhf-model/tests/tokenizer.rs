//! Tokenizer parity with transformers: ids against the golden fixtures, chat templates against
//! strings Jinja2 renders in transformers' environment, save/load round trips, and errors.

use std::path::{Path, PathBuf};

use rlhf_model::tokenizer::{ChatMessage, Tokenizer};
use rlhf_model::Error;
use serde_json::{json, Value as Json};

const MODELS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../../shared/fixtures/models"
);
const ARCHS: [&str; 4] = ["llama-gqa", "qwen2", "gpt2", "opt"];

/// SmolLM2-Instruct's chat template (ChatML with a default system prompt).
const SMOL_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Llama-2-chat's template: `raise_exception`, slicing, `.strip()`, `bos_token`/`eos_token`.
const LLAMA2_TEMPLATE: &str = "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}";

/// Zephyr's multi-line template: only correct with trim_blocks and lstrip_blocks.
const ZEPHYR_TEMPLATE: &str = "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}";

/// Python-isms templates rely on: string and dict methods, `tojson` with its options,
/// `{% generation %}`, `namespace`, and how Python prints None, booleans and floats.
const PYCOMPAT_TEMPLATE: &str = "{%- set ns = namespace(n=0) -%}\n{% for m in messages %}\n    {% generation %}{{ m.role.title() }}: {{ m['content'].strip() }}{% endgeneration %}\n\n    {% set ns.n = ns.n + 1 %}\n{% endfor %}\n{{ messages | tojson }}\n{{ {'a': [1, 2.5, none, true], 'b': {'c': '<x>'}, 'e': []} | tojson(indent=2) }}\n{{ messages[0].content.split() | tojson }} {{ messages[0].content.split(',', 1) | tojson }} {{ messages[0].content.rsplit(None, 1) | tojson }}\n{{ messages[0].get('missing', 'dflt') }} {{ messages[0].get('role') }} {{ messages[0].get('nope') }}\n{% for k, v in messages[0].items() %}{{ k }}={{ v | length }};{% endfor %}\n\n{{ messages[1].content.startswith(('x', 'Tell')) }} {{ messages[1].content.endswith('!') }} {{ none }} {{ ns.n }} {{ 0.5 }} {{ 1e-7 }} {{ 3 / 2 }}\n{{ bos_token is defined }} {{ tools is none }} {{ '  a  '.rstrip() }}| {{ 'A-b c'.lower().upper() }} {{ 'x'.join(['1', '2']) }} {{ 'abcabc'.replace('b', 'B', 1) }} {{ 'h\u{e9}llo w\u{f6}rld'.find('w') }} {{ \"they're bill's\".title() }} {{ 'xxhixx'.strip('x') }}\n{{ {'k': '\u{e9}\\n\"q\"\\u0001'} | tojson }} {{ {'k': '\u{e9}'} | tojson(ensure_ascii=true) }} {{ [1, 2] | tojson(separators=(',', ':')) }} {{ {'b': 1, 'a': 2} | tojson(sort_keys=true) }}\n";

fn models() -> PathBuf {
    let dir = PathBuf::from(MODELS);
    assert!(
        dir.is_dir(),
        "{MODELS} not found: the tests need shared/ checked out beside the repository"
    );
    dir
}

fn read_json(path: &Path) -> Json {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn ids(v: &Json) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn msgs(pairs: &[(&str, &str)]) -> Vec<ChatMessage> {
    pairs
        .iter()
        .map(|(r, c)| ChatMessage::new(*r, *c))
        .collect()
}

/// A directory with the fixture's tokenizer.json (optionally edited) and the given config.
fn dir_with(config: Option<Json>, edit_tokenizer: impl FnOnce(&mut Json)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut tok = read_json(&models().join("llama-gqa/tokenizer.json"));
    edit_tokenizer(&mut tok);
    std::fs::write(dir.path().join("tokenizer.json"), tok.to_string()).unwrap();
    if let Some(config) = config {
        std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
    }
    dir
}

fn with_template(template: &str, bos: &str, eos: &str) -> (tempfile::TempDir, Tokenizer) {
    let config = json!({"bos_token": bos, "eos_token": eos, "chat_template": template});
    let dir = dir_with(Some(config), |_| {});
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    (dir, tok)
}

#[test]
fn fixture_ids_match_transformers() {
    for arch in ARCHS {
        let dir = models().join(arch);
        let tok = Tokenizer::from_dir(&dir).unwrap();
        let golden = read_json(&dir.join("golden.json"));

        assert_eq!(tok.pad_token(), Some("<|pad|>"), "{arch}");
        assert_eq!(tok.pad_token_id(), Some(1), "{arch}");
        assert_eq!(tok.eos_token_id(), Some(0), "{arch}");
        assert_eq!(tok.bos_token_id(), Some(0), "{arch}");
        assert_eq!(tok.pad_or_eos_token_id(), Some(1), "{arch}");

        let texts: Vec<&str> = golden["texts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap())
            .collect();
        let mut expected = Vec::new();
        for (i, text) in texts.iter().enumerate() {
            let row = ids(&golden["input_ids"][i]);
            let mask = ids(&golden["attention_mask"][i]);
            // Right padding: ones, then zeros, and every masked position holds the pad id.
            let len = mask.iter().filter(|&&m| m == 1).count();
            assert!(
                mask[..len].iter().all(|&m| m == 1),
                "{arch}: not right-padded"
            );
            assert!(
                row[len..].iter().all(|&id| id == 1),
                "{arch}: pad id is not 1"
            );
            let want = row[..len].to_vec();
            // transformers encoded with add_special_tokens=True; this tokenizer's ByteLevel
            // post-processor adds nothing, so both settings give the same ids.
            assert_eq!(tok.encode(text, true).unwrap(), want, "{arch}: {text:?}");
            assert_eq!(tok.encode(text, false).unwrap(), want, "{arch}: {text:?}");
            assert_eq!(tok.decode(&want, false).unwrap(), *text, "{arch}");
            expected.push(want);
        }
        assert_eq!(tok.encode_batch(&texts, true).unwrap(), expected, "{arch}");
        // The second text is one token shorter, so the golden batch shows a padded position.
        assert!(
            expected[0].len() != expected[1].len(),
            "{arch}: nothing was padded"
        );

        for (i, g) in golden["greedy"].as_array().unwrap().iter().enumerate() {
            let prompt = g["prompt"].as_str().unwrap();
            let want = ids(&g["prompt_ids"]);
            assert_eq!(
                tok.encode(prompt, true).unwrap(),
                want,
                "{arch}: {prompt:?}"
            );
            // The left-padded batch holds the same ids after its padding.
            let batch = &golden["greedy_left_padded_batch"];
            let row = ids(&batch["input_ids"][i]);
            assert_eq!(row[row.len() - want.len()..], want[..], "{arch}");
        }

        // len(tokenizer) in transformers: the distinct tokens of vocab and added tokens.
        let json = read_json(&dir.join("tokenizer.json"));
        let mut all: Vec<&str> = json["model"]["vocab"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        all.extend(
            json["added_tokens"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["content"].as_str().unwrap()),
        );
        all.sort_unstable();
        all.dedup();
        assert_eq!(tok.vocab_size(), all.len(), "{arch}");
        assert_eq!(tok.model_max_length(), None, "{arch}: 1e30 means no limit");
    }
}

#[test]
fn decode_skips_special_tokens() {
    let tok = Tokenizer::from_dir(&models().join("gpt2")).unwrap();
    let mut ids = tok.encode("What is 12 plus 30?", true).unwrap();
    ids.push(tok.eos_token_id().unwrap());
    assert_eq!(
        tok.decode(&ids, false).unwrap(),
        "What is 12 plus 30?<|endoftext|>"
    );
    assert_eq!(tok.decode(&ids, true).unwrap(), "What is 12 plus 30?");
}

#[test]
fn add_special_tokens_applies_the_post_processor() {
    // A Llama-style post-processor that prepends BOS (here `<|endoftext|>`, id 0).
    let bos_template = json!({
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}},
                   {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}},
                 {"Sequence": {"id": "A", "type_id": 0}},
                 {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [0], "tokens": ["<|endoftext|>"]}}
    });
    let config = json!({"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"});
    let dir = dir_with(Some(config), |t| t["post_processor"] = bos_template);
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    let plain = tok.encode("The quick brown", false).unwrap();
    assert_eq!(plain, [288, 431, 462]);
    assert_eq!(
        tok.encode("The quick brown", true).unwrap(),
        [0, 288, 431, 462]
    );
    // A rendered chat already holding the BOS text gets a second BOS with add_special_tokens.
    assert_eq!(
        tok.encode("<|endoftext|>The quick brown", true).unwrap(),
        [0, 0, 288, 431, 462]
    );
    assert_eq!(
        tok.encode("<|endoftext|>The quick brown", false).unwrap(),
        [0, 288, 431, 462]
    );
}

#[test]
fn padding_and_truncation_in_tokenizer_json_are_ignored() {
    // transformers resets both on every call; only the pad token survives, as a default.
    let dir = dir_with(Some(json!({"eos_token": "<|endoftext|>"})), |t| {
        t["truncation"] =
            json!({"direction": "Right", "max_length": 2, "strategy": "LongestFirst", "stride": 0});
        t["padding"] = json!({"strategy": {"Fixed": 16}, "direction": "Right", "pad_to_multiple_of": null,
                              "pad_id": 1, "pad_type_id": 0, "pad_token": "<|pad|>"});
    });
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(
        tok.encode("The quick brown", true).unwrap(),
        [288, 431, 462]
    );
    assert_eq!(tok.pad_token(), Some("<|pad|>"));
    assert_eq!(tok.pad_token_id(), Some(1));
}

/// The fingerprint tells tokenizers that encode alike from ones that do not: the policy and
/// reward fixtures (tokenizer.json differs only in stored padding) share it; another chat
/// template, EOS token or vocabulary changes it.
#[test]
fn fingerprints_compare_what_encodes_and_decodes() {
    let policy = Tokenizer::from_dir(&models().join("llama-gqa")).unwrap();
    let reward = Tokenizer::from_dir(&models().join("llama-gqa-reward")).unwrap();
    assert_ne!(
        std::fs::read(models().join("llama-gqa/tokenizer.json")).unwrap(),
        std::fs::read(models().join("llama-gqa-reward/tokenizer.json")).unwrap(),
        "the files differ (padding)"
    );
    assert_eq!(policy.fingerprint(), reward.fingerprint());
    let again = Tokenizer::from_dir(&models().join("llama-gqa")).unwrap();
    assert_eq!(policy.fingerprint(), again.fingerprint());

    let mut templated = policy.clone();
    templated.set_chat_template(Some(SMOL_TEMPLATE.into()));
    assert_ne!(policy.fingerprint(), templated.fingerprint());
    let (_d, other_eos) = with_template(SMOL_TEMPLATE, "<|endoftext|>", "<|pad|>");
    assert_ne!(templated.fingerprint(), other_eos.fingerprint());
    let fewer_merges = dir_with(Some(json!({"eos_token": "<|endoftext|>"})), |t| {
        t["model"]["merges"].as_array_mut().unwrap().pop();
    });
    let fewer_merges = Tokenizer::from_dir(fewer_merges.path()).unwrap();
    let same_config = dir_with(Some(json!({"eos_token": "<|endoftext|>"})), |_| {});
    let same_config = Tokenizer::from_dir(same_config.path()).unwrap();
    assert_ne!(fewer_merges.fingerprint(), same_config.fingerprint());
}

#[test]
fn special_tokens_from_added_token_objects_and_special_tokens_map() {
    // No added_tokens_decoder: transformers 5 takes its legacy path, where
    // special_tokens_map.json overrides the config.
    let config = json!({
        "bos_token": {"__type": "AddedToken", "content": "<|endoftext|>", "lstrip": false},
        "eos_token": "<|pad|>",
        "model_max_length": 2048,
    });
    let dir = dir_with(Some(config.clone()), |_| {});
    std::fs::write(
        dir.path().join("special_tokens_map.json"),
        json!({"eos_token": {"content": "<|endoftext|>"}}).to_string(),
    )
    .unwrap();
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(tok.bos_token(), Some("<|endoftext|>"));
    assert_eq!(tok.eos_token(), Some("<|endoftext|>"));
    assert_eq!(tok.pad_token_id(), None);
    assert_eq!(tok.pad_or_eos_token_id(), Some(0));
    assert_eq!(tok.model_max_length(), Some(2048));

    // With added_tokens_decoder the config is authoritative and the map is ignored.
    let mut config = config;
    config["added_tokens_decoder"] = json!({});
    std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(tok.eos_token(), Some("<|pad|>"));
    assert_eq!(tok.eos_token_id(), Some(1));
}

#[test]
fn chatml_template_matches_transformers() {
    let (_dir, tok) = with_template(SMOL_TEMPLATE, "<|im_start|>", "<|im_end|>");
    // Expected strings in these template tests: transformers 5.23's
    // `apply_chat_template(messages, tokenize=False, add_generation_prompt=...)` (Jinja2 3.1.6)
    // with the same template and special tokens, run once and pasted here.
    let out = tok
        .apply_chat_template(&msgs(&[("user", "What is 2+2?")]), true)
        .unwrap();
    assert_eq!(
        out,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    );
    let out = tok
        .apply_chat_template(
            &msgs(&[
                ("system", "Be brief."),
                ("user", "Hi"),
                ("assistant", "Hello!"),
            ]),
            false,
        )
        .unwrap();
    assert_eq!(
        out,
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
    );
}

#[test]
fn llama2_template_strips_and_raises() {
    let (_dir, tok) = with_template(LLAMA2_TEMPLATE, "<s>", "</s>");
    let chat = msgs(&[
        ("system", "You are terse."),
        ("user", "  Hello  "),
        ("assistant", " Hi there. "),
        ("user", "Bye"),
    ]);
    // From transformers 5.23 (see chatml_template_matches_transformers).
    assert_eq!(
        tok.apply_chat_template(&chat, false).unwrap(),
        "<s>[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\n  Hello [/INST] Hi there. </s><s>[INST] Bye [/INST]"
    );
    let err = tok
        .apply_chat_template(&msgs(&[("user", "a"), ("user", "b")]), false)
        .unwrap_err();
    assert!(matches!(err, Error::Tokenizer(_)), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("raised an exception: Conversation roles must alternate user/assistant/user/assistant/..."),
        "{msg}"
    );
}

#[test]
fn zephyr_template_trims_blocks() {
    let (_dir, tok) = with_template(ZEPHYR_TEMPLATE, "<s>", "</s>");
    let chat = msgs(&[
        ("system", "You are a friendly chatbot."),
        ("user", "How many helicopters can a human eat?"),
    ]);
    // From transformers 5.23; without trim_blocks/lstrip_blocks every block tag would leave a
    // newline behind.
    assert_eq!(
        tok.apply_chat_template(&chat, true).unwrap(),
        "<|system|>\nYou are a friendly chatbot.</s>\n<|user|>\nHow many helicopters can a human eat?</s>\n<|assistant|>\n"
    );
}

#[test]
fn python_methods_and_tojson_match_jinja2() {
    let (_dir, tok) = with_template(PYCOMPAT_TEMPLATE, "<s>", "</s>");
    let chat = msgs(&[
        ("user", "  a, b <c> \u{fc} \"q\"  "),
        ("assistant", "Tell me more!"),
    ]);
    // From transformers 5.23 (its AssistantTracker renders `{% generation %}` as its body).
    let want = concat!(
        "User: a, b <c> \u{fc} \"q\"\nAssistant: Tell me more!\n",
        "[{\"role\": \"user\", \"content\": \"  a, b <c> \u{fc} \\\"q\\\"  \"}, {\"role\": \"assistant\", \"content\": \"Tell me more!\"}]\n",
        "{\n  \"a\": [\n    1,\n    2.5,\n    null,\n    true\n  ],\n  \"b\": {\n    \"c\": \"<x>\"\n  },\n  \"e\": []\n}\n",
        "[\"a,\", \"b\", \"<c>\", \"\u{fc}\", \"\\\"q\\\"\"] [\"  a\", \" b <c> \u{fc} \\\"q\\\"  \"] [\"  a, b <c> \u{fc}\", \"\\\"q\\\"\"]\n",
        "dflt user None\n",
        "role=4;content=18;\n",
        "True True None 2 0.5 1e-07 1.5\n",
        "True True   a| A-B C 1x2 aBcabc 6 They'Re Bill'S hi\n",
        "{\"k\": \"\u{e9}\\n\\\"q\\\"\\u0001\"} {\"k\": \"\\u00e9\"} [1,2] {\"a\": 2, \"b\": 1}",
    );
    assert_eq!(tok.apply_chat_template(&chat, false).unwrap(), want);
}

#[test]
fn strftime_now_renders_a_date() {
    let (_dir, tok) = with_template("{{ strftime_now('%d %b %Y') }}", "<s>", "</s>");
    let out = tok.apply_chat_template(&[], false).unwrap();
    let parts: Vec<&str> = out.split(' ').collect();
    assert_eq!(parts.len(), 3, "{out}");
    assert!(
        parts[0].len() == 2 && parts[0].chars().all(|c| c.is_ascii_digit()),
        "{out}"
    );
    assert!(parts[2].parse::<u32>().unwrap() >= 2025, "{out}");
}

#[test]
fn template_sources_and_precedence() {
    // A list of named templates: "default" is the one used.
    let config = json!({"eos_token": "<|endoftext|>", "chat_template": [
        {"name": "default", "template": "D{{ eos_token }}"},
        {"name": "tool_use", "template": "T"},
    ]});
    let dir = dir_with(Some(config), |_| {});
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(
        tok.apply_chat_template(&[], false).unwrap(),
        "D<|endoftext|>"
    );

    // chat_template.jinja (transformers 5) wins over the config.
    std::fs::write(
        dir.path().join("chat_template.jinja"),
        "J{{ messages[0].content }}",
    )
    .unwrap();
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(tok.chat_template(), Some("J{{ messages[0].content }}"));
    let chat = msgs(&[("user", "x")]);
    assert_eq!(tok.apply_chat_template(&chat, false).unwrap(), "Jx");

    // No template at all: a clear error, not an empty string.
    let tok = Tokenizer::from_dir(&models().join("opt")).unwrap();
    assert_eq!(tok.chat_template(), None);
    let err = tok
        .apply_chat_template(&chat, true)
        .unwrap_err()
        .to_string();
    assert!(err.contains("no chat template"), "{err}");

    // A template that does not compile still loads; rendering reports where it came from.
    let (dir, tok) = with_template("{% for %}", "<s>", "</s>");
    assert_eq!(
        tok.encode("The quick brown", true).unwrap(),
        [288, 431, 462]
    );
    let err = tok
        .apply_chat_template(&chat, true)
        .unwrap_err()
        .to_string();
    assert!(err.contains("does not compile"), "{err}");
    assert!(err.contains("tokenizer_config.json"), "{err}");
    drop(dir);
}

#[test]
fn save_round_trip_keeps_ids_tokens_and_template() {
    let src = dir_with(
        Some(json!({
            "bos_token": {"content": "<|endoftext|>", "special": true},
            "eos_token": "<|endoftext|>",
            "pad_token": "<|pad|>",
            "model_max_length": 4096,
            "add_bos_token": false,
            "clean_up_tokenization_spaces": false,
            "custom_field": {"kept": [1, 2]},
            "tokenizer_class": "GPT2Tokenizer",
        })),
        |_| {},
    );
    let mut tok = Tokenizer::from_dir(src.path()).unwrap();
    tok.set_chat_template(Some(SMOL_TEMPLATE.to_string()));
    let out = tempfile::tempdir().unwrap();
    let saved = out.path().join("nested/checkpoint");
    tok.save(&saved).unwrap();

    let mut files: Vec<String> = std::fs::read_dir(&saved)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    files.sort();
    assert_eq!(
        files,
        ["tokenizer.json", "tokenizer_config.json"],
        "temporary files left behind"
    );

    let back = Tokenizer::from_dir(&saved).unwrap();
    let texts = [
        "Human feedback teaches a language model.",
        "What is 12 plus 30?",
        "<|pad|>x",
    ];
    for text in texts {
        assert_eq!(
            back.encode(text, true).unwrap(),
            tok.encode(text, true).unwrap()
        );
    }
    assert_eq!(back.vocab_size(), tok.vocab_size());
    assert_eq!(back.bos_token(), Some("<|endoftext|>"));
    assert_eq!(back.eos_token_id(), Some(0));
    assert_eq!(back.pad_token_id(), Some(1));
    assert_eq!(back.model_max_length(), Some(4096));
    assert_eq!(back.chat_template(), Some(SMOL_TEMPLATE));
    let chat = msgs(&[("user", "Hi")]);
    assert_eq!(
        back.apply_chat_template(&chat, true).unwrap(),
        tok.apply_chat_template(&chat, true).unwrap()
    );

    // What transformers reads: a fast tokenizer class, tokens as strings, unknown fields kept.
    let config = read_json(&saved.join("tokenizer_config.json"));
    assert_eq!(config["tokenizer_class"], "PreTrainedTokenizerFast");
    assert_eq!(config["bos_token"], "<|endoftext|>");
    assert_eq!(config["pad_token"], "<|pad|>");
    assert_eq!(config["chat_template"], SMOL_TEMPLATE);
    assert_eq!(config["add_bos_token"], false);
    assert_eq!(config["custom_field"], json!({"kept": [1, 2]}));
    assert_eq!(config["added_tokens_decoder"]["1"]["content"], "<|pad|>");
    assert_eq!(config["added_tokens_decoder"]["1"]["special"], true);
}

#[test]
fn save_rewrites_stale_files_and_keeps_the_no_limit_length() {
    let mut tok = Tokenizer::from_dir(&models().join("qwen2")).unwrap();
    let out = tempfile::tempdir().unwrap();
    // chat_template.jinja would win over the config on load: save must not leave a stale one.
    std::fs::write(out.path().join("chat_template.jinja"), "stale").unwrap();
    tok.set_chat_template(Some("fresh".into()));
    tok.save(out.path()).unwrap();
    let back = Tokenizer::from_dir(out.path()).unwrap();
    assert_eq!(back.chat_template(), Some("fresh"));
    // transformers' int(1e30) "no limit" stays the integer Python wrote, not a float `1e30`.
    let text = std::fs::read_to_string(out.path().join("tokenizer_config.json")).unwrap();
    assert!(
        text.contains("\"model_max_length\": 1000000000000000019884624838656,"),
        "{text}"
    );
    assert!(text.ends_with("}\n"));
}

#[test]
fn missing_tokenizer_json_says_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tokenizer_config.json"), "{}").unwrap();
    let err = Tokenizer::from_dir(dir.path()).unwrap_err();
    let Error::MissingFile { path, .. } = &err else {
        panic!("expected MissingFile, got {err:?}");
    };
    assert_eq!(path, &dir.path().join("tokenizer.json"));
    let msg = err.to_string();
    assert!(
        msg.contains(&dir.path().join("tokenizer.json").display().to_string()),
        "{msg}"
    );
    assert!(
        msg.contains("save_pretrained") && msg.contains("rlhf convert gguf"),
        "{msg}"
    );

    // Only a SentencePiece model: the hint gives the one-line conversion.
    std::fs::write(dir.path().join("tokenizer.model"), b"").unwrap();
    let msg = Tokenizer::from_dir(dir.path()).unwrap_err().to_string();
    assert!(
        msg.contains("SentencePiece") && msg.contains("AutoTokenizer"),
        "{msg}"
    );

    let err = Tokenizer::from_dir(Path::new("HuggingFaceTB/SmolLM2-135M-Instruct")).unwrap_err();
    assert!(matches!(err, Error::HubName { .. }), "{err:?}");
}

#[test]
fn malformed_tokenizer_config_names_the_file() {
    let dir = dir_with(None, |_| {});
    let config = dir.path().join("tokenizer_config.json");
    std::fs::write(&config, "{\"bos_token\": \"<s>\",").unwrap();
    let err = Tokenizer::from_dir(dir.path()).unwrap_err();
    let Error::BadFile { path, msg } = &err else {
        panic!("expected BadFile, got {err:?}");
    };
    assert_eq!(path, &config);
    assert!(msg.contains("line 1"), "{msg}");
    assert!(err.to_string().contains("tokenizer_config.json"));

    // A field of the wrong type is named too.
    std::fs::write(&config, "{\"eos_token\": 5}").unwrap();
    let msg = Tokenizer::from_dir(dir.path()).unwrap_err().to_string();
    assert!(
        msg.contains("tokenizer_config.json") && msg.contains("\"eos_token\""),
        "{msg}"
    );

    // A broken tokenizer.json names its file.
    std::fs::write(&config, "{}").unwrap();
    std::fs::write(dir.path().join("tokenizer.json"), "{\"model\": 1}").unwrap();
    let msg = Tokenizer::from_dir(dir.path()).unwrap_err().to_string();
    assert!(msg.contains("tokenizer.json"), "{msg}");
}

#[test]
fn missing_special_tokens_are_added_like_transformers() {
    // transformers 5.23 loads this config with len(tokenizer) == 484 and unk_token_id == 483.
    let config = json!({"eos_token": "<|endoftext|>", "unk_token": "<unk>"});
    let dir = dir_with(Some(config), |_| {});
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(tok.vocab_size(), 484);
    assert_eq!(tok.token_to_id("<unk>"), Some(483));
    assert_eq!(tok.encode("x<unk> y", true).unwrap(), [89, 483, 222, 90]);
}

/// A tokenizer.json cargo fuzz found (fuzz/tokenizer) on which the `tokenizers` crate panics
/// inside its decoder's deserialiser: loading it is an error naming the file.
#[test]
fn a_tokenizer_json_that_panics_the_parser_is_an_error() {
    let crash = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz_crashes/tokenizer-decoder-panic.bin");
    let bytes = std::fs::read(&crash).unwrap();
    // The fuzz target's first byte chose "the rest is tokenizer.json".
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tokenizer.json"), &bytes[1..]).unwrap();
    let e = match rlhf_model::tokenizer::Tokenizer::from_dir(dir.path()) {
        Ok(_) => panic!("a broken tokenizer.json is not a tokenizer"),
        Err(e) => e.to_string(),
    };
    assert!(
        e.contains("tokenizer.json") && e.contains("can read"),
        "{e}"
    );
}
