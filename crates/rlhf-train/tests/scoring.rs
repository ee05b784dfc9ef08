//! A reward model that shares the policy's tokenizer reads generated ids directly: the same
//! ids (so the same scores) as decoding and re-tokenising wherever the generated ids are the
//! tokenizer's own encoding of their text, for text prompts and chat templates alike; other
//! tokenizers and templates that rewrite the answer go through text.

use std::path::{Path, PathBuf};

use rlhf_data::PromptRecord;
use rlhf_model::model::SourceCache;
use rlhf_model::tokenizer::Tokenizer;
use rlhf_train::rollout::Decoder;
use rlhf_train::scoring::{Completions, IdSource, RewardModel};

fn models() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../../shared/fixtures/models"
    ))
}

fn records(dir: &Path, rows: &[serde_json::Value]) -> Vec<PromptRecord> {
    let p = dir.join("prompts.jsonl");
    let text: Vec<String> = rows.iter().map(|r| r.to_string()).collect();
    std::fs::write(&p, text.join("\n")).unwrap();
    rlhf_data::load::<PromptRecord>(&p, &Default::default())
        .unwrap()
        .records
}

/// A copy of a fixture model directory whose tokenizer config carries `template`.
fn with_template(dir: &Path, name: &str, template: &str) -> PathBuf {
    let out = dir.join(name);
    std::fs::create_dir_all(&out).unwrap();
    for e in std::fs::read_dir(models().join(name)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), out.join(e.file_name())).unwrap();
    }
    let cfg = out.join("tokenizer_config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    v["chat_template"] = template.into();
    std::fs::write(&cfg, v.to_string()).unwrap();
    out
}

struct Case {
    records: Vec<PromptRecord>,
    ids: Vec<Vec<u32>>,
}

impl Case {
    /// Scores through the generated ids and through their text; returns both input ids and
    /// both score lists.
    #[allow(clippy::type_complexity)]
    fn both(
        &self,
        rm: &RewardModel,
        policy: &Tokenizer,
    ) -> ((Vec<Vec<u32>>, Vec<f32>), (Vec<Vec<u32>>, Vec<f32>)) {
        let eos = [policy.eos_token_id().unwrap()];
        let texts = Decoder::new(policy, &eos).texts(&self.ids).unwrap();
        let prompts: Vec<&PromptRecord> = self.records.iter().collect();
        let batch = |source| Completions {
            prompts: &prompts,
            texts: &texts,
            ids: &self.ids,
            source,
        };
        let direct = batch(Some(IdSource {
            tokenizer: policy,
            eos_ids: &eos,
        }));
        let text = batch(None);
        (
            (rm.input_ids(&direct).unwrap(), rm.score(&direct).unwrap()),
            (rm.input_ids(&text).unwrap(), rm.score(&text).unwrap()),
        )
    }
}

/// A token whose text the tokenizer encodes as that one token, and the same text spelt in
/// two tokens (what sampling can produce): `(whole, pieces)`.
fn split_spelling(tok: &Tokenizer) -> (Vec<u32>, Vec<u32>) {
    for id in 0..tok.vocab_size() as u32 {
        let text = tok.decode(&[id], true).unwrap();
        let Some((cut, _)) = text.char_indices().nth(1) else {
            continue;
        };
        if text.contains('\u{FFFD}') || tok.encode(&text, false).unwrap() != [id] {
            continue;
        }
        let pieces: Vec<u32> = [&text[..cut], &text[cut..]]
            .iter()
            .flat_map(|t| tok.encode(t, false).unwrap())
            .collect();
        if pieces.len() == 2 && tok.decode(&pieces, true).unwrap() == text {
            return (vec![id], pieces);
        }
    }
    panic!("no token of the fixture splits in two");
}

/// Answers as the tokenizer encodes their text (with and without the EOS that ended them).
fn canonical(tok: &Tokenizer) -> Vec<Vec<u32>> {
    let eos = tok.eos_token_id().unwrap();
    [
        " sat on the mat.",
        " barked twice",
        " a time there was",
        " morning",
    ]
    .iter()
    .enumerate()
    .map(|(i, t)| {
        let mut ids = tok.encode(t, false).unwrap();
        if i % 2 == 0 {
            ids.push(eos);
        }
        ids
    })
    .collect()
}

#[test]
fn generated_ids_score_as_their_text_for_text_prompts() {
    let tmp = tempfile::tempdir().unwrap();
    let policy = Tokenizer::from_dir(&models().join("llama-gqa")).unwrap();
    let rm = RewardModel::load(
        &models().join("llama-gqa-reward"),
        3,
        &mut SourceCache::default(),
    )
    .unwrap();
    let rows: Vec<serde_json::Value> = ["The cat", "A dog", "Once upon", "In the"]
        .iter()
        .map(|p| serde_json::json!({ "prompt": p }))
        .collect();
    let case = Case {
        records: records(tmp.path(), &rows),
        ids: canonical(&policy),
    };
    let ((direct_ids, direct), (text_ids, text)) = case.both(&rm, &policy);
    assert_eq!(direct_ids, text_ids);
    assert_eq!(direct, text, "same ids, same scores to the bit");
    // The reward trainer's layout: the prompt, the answer, one EOS.
    let eos = policy.eos_token_id().unwrap();
    assert_eq!(direct_ids[1].last(), Some(&eos));
    assert_eq!(
        direct_ids[0].iter().filter(|&&t| t == eos).count(),
        1,
        "the generated EOS is not doubled"
    );

    // A sampled spelling the tokenizer would not produce (a token in two pieces): the
    // shortcut reads the policy's own tokens, the text path re-tokenises them whole.
    let (whole, pieces) = split_spelling(&policy);
    let split = Case {
        records: case.records[..1].to_vec(),
        ids: vec![pieces.clone()],
    };
    let ((direct_ids, _), (text_ids, _)) = split.both(&rm, &policy);
    let p = policy.encode("The cat", true).unwrap();
    assert_eq!(direct_ids[0], [p.clone(), pieces, vec![eos]].concat());
    assert_eq!(text_ids[0], [p, whole, vec![eos]].concat());
}

/// ChatML-like template over the fixture's tokens (the fixture vocabulary has no
/// <|im_start|>): the prompt with the generation prompt is where the answer starts.
const TEMPLATE: &str = "{% for m in messages %}{{ m['role'] + ':\\n' + m['content'] + '<|endoftext|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ 'assistant:\\n' }}{% endif %}";

/// Strips the answer (as Llama 2's template does): its text cannot be laid out from ids.
const STRIPPING: &str = "{% for m in messages %}{{ m['role'] + ': ' + m['content'].strip() + '<|endoftext|>' }}{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}";

#[test]
fn generated_ids_score_as_their_text_through_a_chat_template() {
    let tmp = tempfile::tempdir().unwrap();
    let rows: Vec<serde_json::Value> = ["Tell me about cats", "A dog?", "Once upon", "Hi"]
        .iter()
        .map(|p| serde_json::json!({ "messages": [{"role": "user", "content": p}] }))
        .collect();
    for (template, direct_expected) in [(TEMPLATE, true), (STRIPPING, false)] {
        let dir = with_template(tmp.path(), "llama-gqa-reward", template);
        let policy_dir = with_template(tmp.path(), "llama-gqa", template);
        let policy = Tokenizer::from_dir(&policy_dir).unwrap();
        let rm = RewardModel::load(&dir, 4, &mut SourceCache::default()).unwrap();
        let case = Case {
            records: records(tmp.path(), &rows),
            ids: canonical(&policy)
                .into_iter()
                .map(|mut ids| {
                    // A chat answer ends in the template's end token, not "\n".
                    if ids.last() != policy.eos_token_id().as_ref() {
                        ids.push(policy.eos_token_id().unwrap());
                    }
                    ids
                })
                .collect(),
        };
        let ((direct_ids, direct), (text_ids, text)) = case.both(&rm, &policy);
        assert_eq!(direct_ids, text_ids, "{template}");
        assert_eq!(direct, text, "{template}");
        // Whether the ids were read directly shows when they are not canonical.
        let (_, pieces) = split_spelling(&policy);
        let split = Case {
            records: case.records[..1].to_vec(),
            ids: vec![pieces.clone()],
        };
        let ((d, _), (t, _)) = split.both(&rm, &policy);
        assert_eq!(d != t, direct_expected, "{template}");
    }
}

/// Another tokenizer (here: the same files with a chat template the policy lacks) means the
/// ids are re-tokenised from text.
#[test]
fn another_tokenizer_goes_through_text() {
    let tmp = tempfile::tempdir().unwrap();
    let policy = Tokenizer::from_dir(&models().join("llama-gqa")).unwrap();
    let dir = with_template(tmp.path(), "llama-gqa-reward", TEMPLATE);
    let rm = RewardModel::load(&dir, 4, &mut SourceCache::default()).unwrap();
    let (_, pieces) = split_spelling(&policy);
    let case = Case {
        records: records(tmp.path(), &[serde_json::json!({"prompt": "The cat"})]),
        ids: vec![pieces],
    };
    let ((d, _), (t, _)) = case.both(&rm, &policy);
    assert_eq!(d, t);
}

/// A tiny random policy samples stray bytes and special tokens, which text cannot carry:
/// decoding turns a lone byte into U+FFFD and drops special tokens, so re-tokenising gives
/// the reward model other tokens. Read directly, the reward model sees what was sampled.
#[test]
fn sampled_bytes_reach_the_reward_model_unchanged() {
    use rlhf_model::generate::{generate, GenerationConfig};
    let tmp = tempfile::tempdir().unwrap();
    let policy = Tokenizer::from_dir(&models().join("llama-gqa")).unwrap();
    let model = rlhf_model::Model::load(&models().join("llama-gqa"), &Default::default()).unwrap();
    let rm = RewardModel::load(
        &models().join("llama-gqa-reward"),
        8,
        &mut SourceCache::default(),
    )
    .unwrap();
    let words = ["The cat", "A dog", "Once upon", "In the"];
    let rows: Vec<serde_json::Value> = words
        .iter()
        .map(|p| serde_json::json!({ "prompt": p }))
        .collect();
    let prompts: Vec<Vec<u32>> = words
        .iter()
        .map(|w| policy.encode(w, true).unwrap())
        .collect();
    let eos = policy.eos_token_id().unwrap();
    let cfg = GenerationConfig {
        max_new_tokens: 8,
        temperature: 1.0,
        seed: 3,
        eos_token_ids: vec![eos],
        ..Default::default()
    };
    let gens = generate(&model, &prompts, &cfg).unwrap();
    let case = Case {
        records: records(tmp.path(), &rows),
        ids: gens.into_iter().map(|g| g.completion_ids).collect(),
    };
    let ((direct, _), (text, _)) = case.both(&rm, &policy);
    for (i, (d, p)) in direct.iter().zip(&prompts).enumerate() {
        let body = case.ids[i].strip_suffix(&[eos]).unwrap_or(&case.ids[i]);
        assert_eq!(d, &[p.as_slice(), body, &[eos]].concat(), "row {i}");
    }
    let lossy = direct.iter().zip(&text).filter(|(d, t)| d != t).count();
    assert!(lossy > 0, "some sampled row does not survive decoding");
}
