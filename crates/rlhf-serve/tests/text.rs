//! Streaming text on a real byte-level tokenizer: characters split over several tokens are
//! released whole, and a stop string split over tokens is never released in part.

mod common;

use rlhf_model::tokenizer::Tokenizer;
use rlhf_serve::text::{TextStream, TokenTexts};

#[test]
fn multibyte_characters_are_released_whole() {
    let tok = Tokenizer::from_dir(&common::fixtures().join("llama-gqa")).unwrap();
    let text = "héllo wörld, 日本語 and 🦀 crabs";
    let ids = tok.encode(text, false).unwrap();
    // The fixture's small vocabulary spells these characters byte by byte.
    let split = ids
        .iter()
        .filter(|&&id| tok.decode(&[id], false).unwrap().contains('\u{FFFD}'))
        .count();
    assert!(split >= 4, "no character is split over tokens: {ids:?}");
    let mut s = TextStream::new(Vec::new());
    let mut out = String::new();
    for &id in &ids {
        let d = s.push(&tok, id).unwrap();
        assert!(
            !d.text.contains('\u{FFFD}'),
            "released half a character: {:?}",
            d.text
        );
        assert!(!d.stopped);
        out.push_str(&d.text);
    }
    out.push_str(&s.finish());
    assert_eq!(out, text);
    // Each token's bytes, concatenated, are the text's bytes.
    let texts = TokenTexts::new(&tok);
    let bytes: Vec<u8> = ids.iter().flat_map(|&id| texts.get(&tok, id).1).collect();
    assert_eq!(bytes, text.as_bytes());
}

#[test]
fn stop_strings_are_never_released_in_part() {
    let tok = Tokenizer::from_dir(&common::fixtures().join("llama-gqa")).unwrap();
    let text = "one two three END four";
    let ids = tok.encode(text, false).unwrap();
    let mut s = TextStream::new(vec!["END".into(), "zzz".into()]);
    let mut out = String::new();
    let mut stopped_at = None;
    for (i, &id) in ids.iter().enumerate() {
        let d = s.push(&tok, id).unwrap();
        out.push_str(&d.text);
        assert!(
            !out.contains('E'),
            "part of the stop string released: {out:?}"
        );
        if d.stopped {
            stopped_at = Some(i);
            break;
        }
    }
    assert!(stopped_at.is_some(), "the stop string was not seen");
    assert_eq!(out, "one two three ");
    assert_eq!(s.finish(), "");
    // Without the stop string arriving, held-back text comes out at the end.
    let ids = tok.encode("ends with EN", false).unwrap();
    let mut s = TextStream::new(vec!["END".into()]);
    let mut out = String::new();
    for &id in &ids {
        out.push_str(&s.push(&tok, id).unwrap().text);
    }
    assert_eq!(out, "ends with ");
    out.push_str(&s.finish());
    assert_eq!(out, "ends with EN");
}
