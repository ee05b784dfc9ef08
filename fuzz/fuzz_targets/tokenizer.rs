//! The tokenizer and chat-template loader: the first byte picks what the rest is: a
//! `tokenizer_config.json` (with its Jinja chat template, rendered for a short conversation)
//! beside a real `tokenizer.json`, or a `tokenizer.json` itself. Errors are fine; a panic is a
//! bug.
#![no_main]

#[path = "scratch.rs"]
mod scratch;

use libfuzzer_sys::fuzz_target;
use rlhf_model::tokenizer::{ChatMessage, Tokenizer};

/// The fixture tokenizer that the config inputs are paired with.
const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../shared/fixtures/models/llama-gqa/tokenizer.json"
);

fuzz_target!(|data: &[u8]| {
    // libfuzzer-sys aborts in its panic hook, before any `catch_unwind` runs; the tokenizer
    // loader catches the `tokenizers` crate's own panics on malformed files and returns an
    // error, so use the default hook. A panic that escapes the loader still aborts the run
    // (libfuzzer-sys checks each input's result).
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let _ = std::panic::take_hook();
    });
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let dir = scratch::dir().join("tok");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    if which % 2 == 0 {
        std::fs::copy(FIXTURE, dir.join("tokenizer.json")).unwrap();
        std::fs::write(dir.join("tokenizer_config.json"), rest).unwrap();
    } else {
        std::fs::write(dir.join("tokenizer.json"), rest).unwrap();
    }
    if let Ok(tok) = Tokenizer::from_dir(&dir) {
        let chat = [
            ChatMessage::new("system", "Be brief."),
            ChatMessage::new("user", "Hi <b>there</b> {{ x }}"),
            ChatMessage::new("assistant", "Hello."),
        ];
        for add in [false, true] {
            if let Ok(text) = tok.apply_chat_template(&chat, add) {
                let _ = tok.encode(&text, false);
            }
        }
        let _ = tok.encode("héllo wörld 🙂", true);
    }
});
