//! Generated ids as text: released as it becomes final, cut at stop strings, and each
//! token's own text and bytes for log-probability answers.

use rlhf_model::tokenizer::Tokenizer;

use crate::Result;

/// The text of one generated sequence, released piece by piece as tokens arrive.
///
/// A token's text is released only once the whole sequence decodes to complete UTF-8
/// characters (a byte-level token may hold half a character: the decoder then ends in
/// U+FFFD, and the next token completes it), and never while the text ends with what could
/// be the start of a stop string. The whole sequence is decoded each time and the new text
/// is what lies past what was released: decoding a token alone can differ from decoding it
/// in context (leading spaces, merged bytes).
pub struct TextStream {
    stop: Vec<String>,
    ids: Vec<u32>,
    /// `ids` decoded, as of the last push (the next push's text before its token).
    decoded: String,
    /// Bytes of the decoded text released so far.
    sent: usize,
    /// Characters of the decoded text before the last token (its `text_offset`).
    offset: usize,
    stopped: bool,
}

/// What one token added.
#[derive(Debug, Default, PartialEq)]
pub struct Delta {
    /// Text now final.
    pub text: String,
    /// Whether the text reached a stop string (which is cut off, with everything after it).
    pub stopped: bool,
}

impl TextStream {
    /// A sequence that ends at the first of `stop` (none empty).
    pub fn new(stop: Vec<String>) -> Self {
        TextStream {
            stop,
            ids: Vec::new(),
            decoded: String::new(),
            sent: 0,
            offset: 0,
            stopped: false,
        }
    }

    /// Adds a generated token; special tokens (EOS) decode to nothing.
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<Delta> {
        if self.stopped {
            return Ok(Delta {
                stopped: true,
                ..Delta::default()
            });
        }
        self.offset = self.decoded.chars().count();
        self.ids.push(id);
        self.decoded = tok.decode(&self.ids, true)?;
        let text = self.decoded.as_str();
        let from = floor_boundary(text, self.sent);
        // A stop string may begin in text held back earlier, never in text released.
        let longest = self.stop.iter().map(|s| s.len()).max().unwrap_or(0);
        let search = floor_boundary(text, from.saturating_sub(longest));
        let hit = self
            .stop
            .iter()
            .filter_map(|s| text[search..].find(s.as_str()).map(|i| search + i))
            .min();
        if let Some(at) = hit {
            self.stopped = true;
            let out = text.get(from..at.max(from)).unwrap_or("").to_string();
            self.sent = at.max(from);
            return Ok(Delta {
                text: out,
                stopped: true,
            });
        }
        if text.ends_with('\u{FFFD}') {
            return Ok(Delta::default());
        }
        let hold = self
            .stop
            .iter()
            .map(|s| partial_suffix(text, s))
            .max()
            .unwrap_or(0);
        let end = text.len() - hold;
        if end <= from {
            return Ok(Delta::default());
        }
        self.sent = end;
        Ok(Delta {
            text: text[from..end].to_string(),
            stopped: false,
        })
    }

    /// The text still held back once the sequence has ended without a stop string.
    pub fn finish(&mut self) -> String {
        if self.stopped {
            return String::new();
        }
        let text = &self.decoded;
        let from = floor_boundary(text, self.sent);
        self.sent = text.len();
        text[from..].to_string()
    }

    /// Characters of text before the last pushed token (OpenAI's `text_offset`).
    pub fn offset(&self) -> usize {
        self.offset
    }
}

/// The largest char boundary of `s` at or below `i`.
fn floor_boundary(s: &str, i: usize) -> usize {
    let mut i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// Length of the longest proper prefix of `stop` that `text` ends with.
fn partial_suffix(text: &str, stop: &str) -> usize {
    (1..stop.len())
        .rev()
        .find(|&k| stop.is_char_boundary(k) && text.ends_with(&stop[..k]))
        .unwrap_or(0)
}

/// Each token's own text and bytes, for log-probability answers (`token`, `bytes`).
pub struct TokenTexts {
    /// For byte-level vocabularies (GPT-2 style), the byte each vocabulary character
    /// stands for: a token's exact bytes, even half a UTF-8 character.
    byte_of: Option<std::collections::HashMap<char, u8>>,
}

impl TokenTexts {
    /// Reads how `tok` maps token strings to bytes.
    pub fn new(tok: &Tokenizer) -> Self {
        let byte_level = matches!(
            tok.inner().get_decoder(),
            Some(tokenizers::DecoderWrapper::ByteLevel(_))
        );
        TokenTexts {
            byte_of: byte_level.then(|| {
                bytes_to_unicode()
                    .into_iter()
                    .enumerate()
                    .map(|(b, c)| (c, b as u8))
                    .collect()
            }),
        }
    }

    /// The token's text (decoded alone, special tokens kept) and its bytes.
    pub fn get(&self, tok: &Tokenizer, id: u32) -> (String, Vec<u8>) {
        let text = tok.decode(&[id], false).unwrap_or_default();
        let exact = match (&self.byte_of, tok.id_to_token(id)) {
            (Some(map), Some(piece)) if !is_added(tok, id) => {
                piece.chars().map(|c| map.get(&c).copied()).collect()
            }
            _ => None,
        };
        let bytes = exact.unwrap_or_else(|| text.as_bytes().to_vec());
        (text, bytes)
    }
}

fn is_added(tok: &Tokenizer, id: u32) -> bool {
    tok.inner().get_added_tokens_decoder().contains_key(&id)
}

/// GPT-2's table of the printable character standing for each byte in byte-level BPE
/// vocabularies: printable Latin-1 bytes stand for themselves, the rest for 256 + n in
/// byte order.
fn bytes_to_unicode() -> Vec<char> {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    let mut n = 0;
    (0..256u32)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).expect("Latin-1")
            } else {
                n += 1;
                char::from_u32(255 + n).expect("a char")
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_to_unicode_is_gpt2s_table() {
        let t = bytes_to_unicode();
        assert_eq!(t[b' ' as usize], 'Ġ');
        assert_eq!(t[b'\n' as usize], 'Ċ');
        assert_eq!(t[b'a' as usize], 'a');
        assert_eq!(t[0], 'Ā');
        let distinct: std::collections::HashSet<_> = t.iter().collect();
        assert_eq!(distinct.len(), 256);
    }

    #[test]
    fn partial_stop_suffixes() {
        assert_eq!(partial_suffix("hello wor", "world"), 3);
        assert_eq!(partial_suffix("hello", "world"), 0);
        // The whole stop string is a hit, not a partial one.
        assert_eq!(partial_suffix("a world", "world"), 0);
        assert_eq!(partial_suffix("x é", "éa"), 2);
        assert_eq!(floor_boundary("é", 1), 0);
    }
}
