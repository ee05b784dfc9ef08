//! Tokenise → truncate → collate → sample, on the gpt2 fixture tokenizer: truncation keeps the
//! start and is counted (never a silent drop), batches have TRL's layout, tokenizer failures
//! name their row, and a resumed sampler continues with the same batches.

use std::path::{Path, PathBuf};

use rlhf_data::*;
use rlhf_model::tokenizer::{ChatMessage, Tokenizer};

fn gpt2() -> Tokenizer {
    let dir = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../../shared/fixtures/models/gpt2"
    ));
    Tokenizer::from_dir(&dir).unwrap()
}

fn records<T: Record>(rows: &[serde_json::Value]) -> Vec<T> {
    let raw = rows.iter().enumerate().map(|(i, r)| {
        Ok(RawRow {
            at: Location::line(Path::new("train.jsonl"), i + 1),
            fields: r.as_object().unwrap().clone(),
        })
    });
    from_rows(Path::new("train.jsonl"), raw, &ReadOptions::default())
        .unwrap()
        .records
}

#[test]
fn reward_truncation_keeps_the_start_and_is_counted() {
    let tok = gpt2();
    let long = "This prompt is long enough to fill the whole window by itself.";
    let rows = [
        serde_json::json!({"prompt": "Hi?", "chosen": " Hello there, friend!", "rejected": " No.", "degree": "better"}),
        serde_json::json!({"prompt": long, "chosen": " Yes.", "rejected": " No."}),
        serde_json::json!({"prompt": "Q", "chosen": " a", "rejected": " b"}),
    ];
    let recs: Vec<Comparison> = records(&rows);
    let full = tokenize_comparisons(&tok, &recs, &TokenizeOptions::default()).unwrap();
    assert_eq!(full.report.truncated, 0);
    let max = 8;
    let opts = TokenizeOptions {
        max_length: Some(max),
        margin_table: MarginTable::Large,
        ..Default::default()
    };
    let cut = tokenize_comparisons(&tok, &recs, &opts).unwrap();
    // Nothing is dropped: three pairs in, three out.
    assert_eq!(cut.examples.len(), 3);
    let r = &cut.report;
    assert_eq!(
        (r.examples, r.truncated, r.identical_after_truncation),
        (3, 2, 1)
    );
    assert_eq!(r.longest, full.examples[1].pairs[0].chosen_ids.len());
    for (a, b) in full.examples.iter().zip(&cut.examples) {
        let (a, b) = (&a.pairs[0], &b.pairs[0]);
        assert!(b.chosen_ids.len() <= max && b.rejected_ids.len() <= max);
        assert_eq!(b.chosen_ids[..], a.chosen_ids[..b.chosen_ids.len()]);
        assert_eq!(b.rejected_ids[..], a.rejected_ids[..b.rejected_ids.len()]);
    }
    assert_eq!(cut.examples[0].pairs[0].margin, Some(2.0));
    let shown = r.to_string();
    assert!(shown.contains("2 truncated to max_length 8"), "{shown}");
    assert!(
        shown.contains("1 pairs identical after truncation"),
        "{shown}"
    );
}

#[test]
fn reward_keep_end_cuts_a_long_prompt_and_keeps_both_answers_and_eos() {
    let tok = gpt2();
    let eos = tok.eos_token_id().unwrap();
    let long = "This prompt is long enough to fill the whole window by itself, and then some.";
    let rows = [serde_json::json!({"prompt": long, "chosen": " Yes!", "rejected": " No."})];
    let recs: Vec<Comparison> = records(&rows);
    let full = tokenize_comparisons(&tok, &recs, &TokenizeOptions::default()).unwrap();
    let (fc, fr) = (
        &full.examples[0].pairs[0].chosen_ids,
        &full.examples[0].pairs[0].rejected_ids,
    );
    let max = 10;
    assert!(
        fc.len() > max + 4 && fr.len() > max + 4,
        "the prompt must fill the window"
    );
    let opts = |truncation_mode| TokenizeOptions {
        max_length: Some(max),
        truncation_mode,
        ..Default::default()
    };
    // The start is kept by default: both answers are cut away and the pair carries nothing.
    let start = tokenize_comparisons(&tok, &recs, &opts(TruncationMode::KeepStart)).unwrap();
    assert_eq!(start.report.identical_after_truncation, 1);
    assert!(start.report.to_string().contains("keep_end"));
    let end = tokenize_comparisons(&tok, &recs, &opts(TruncationMode::KeepEnd)).unwrap();
    let p = &end.examples[0].pairs[0];
    assert_eq!((p.chosen_ids.len(), p.rejected_ids.len()), (max, max));
    // The last `max` tokens of each sequence: the answer and its EOS, after the prompt's end.
    assert_eq!(p.chosen_ids[..], fc[fc.len() - max..]);
    assert_eq!(p.rejected_ids[..], fr[fr.len() - max..]);
    assert_eq!(p.chosen_ids.last(), Some(&eos));
    assert_eq!(p.rejected_ids.last(), Some(&eos));
    assert_ne!(p.chosen_ids, p.rejected_ids);
    let answer = |a: &str| tok.encode(&format!("{a}<|endoftext|>"), false).unwrap();
    assert!(p.chosen_ids.ends_with(&answer(" Yes!")));
    assert!(p.rejected_ids.ends_with(&answer(" No.")));
    // What is left of the window holds the prompt's last tokens, not nothing.
    assert!(answer(" Yes!").len() < max && answer(" No.").len() < max);
    let r = &end.report;
    assert_eq!(
        (r.examples, r.truncated, r.identical_after_truncation),
        (1, 1, 0)
    );
}

#[test]
fn sft_truncation_counts_and_drops_examples_without_loss_tokens() {
    let tok = gpt2();
    let rows = [
        serde_json::json!({"prompt": "A fairly long prompt that fills the window", "completion": " ok"}),
        serde_json::json!({"prompt": "Hi?", "completion": " Hello there, my good friend."}),
        serde_json::json!({"text": "short"}),
    ];
    let recs: Vec<Demonstration> = records(&rows);
    let opts = TokenizeOptions {
        max_length: Some(6),
        ..Default::default()
    };
    let out = tokenize_demonstrations(&tok, &recs, &opts).unwrap();
    let r = &out.report;
    assert_eq!((r.examples, r.truncated, r.dropped_no_loss), (2, 2, 1));
    assert_eq!(out.examples[0].at.line, 2);
    let ex = &out.examples[0];
    assert_eq!(ex.input_ids.len(), 6);
    assert_eq!(ex.labels.len(), 6);
    // Prompt tokens are masked, completion tokens are their own ids.
    let n_prompt = tok.encode("Hi?", true).unwrap().len();
    assert!(ex.labels[..n_prompt].iter().all(|&l| l == IGNORE_INDEX));
    assert_eq!(ex.labels[n_prompt], i64::from(ex.input_ids[n_prompt]));
    // A text row ends with EOS and trains on every token.
    let t = &out.examples[1];
    assert_eq!(*t.input_ids.last().unwrap(), tok.eos_token_id().unwrap());
    assert!(t.labels.iter().all(|&l| l >= 0));

    let b = collate_sft(&out.examples, pad_id(&tok).unwrap());
    assert_eq!(b.batch.input_ids[1].len(), 6);
    let pad = tok.pad_token_id().unwrap();
    let n = t.input_ids.len();
    assert!(b.batch.input_ids[1][n..].iter().all(|&x| x == pad));
    assert!(b.labels[1][n..].iter().all(|&l| l == IGNORE_INDEX));
    assert_eq!(
        b.batch.attention_mask[1]
            .iter()
            .filter(|&&m| m == 1)
            .count(),
        n
    );
}

#[test]
fn dpo_truncation_cuts_completions_and_counts() {
    let tok = gpt2();
    let rows = [
        serde_json::json!({"prompt": "Hi?", "chosen": " Hello there, friend!", "rejected": " No."}),
        serde_json::json!({"prompt": "A prompt longer than the window allows", "chosen": " a", "rejected": " b"}),
    ];
    let recs: Vec<Comparison> = records(&rows);
    let opts = TokenizeOptions {
        max_length: Some(7),
        ..Default::default()
    };
    let out = tokenize_dpo(&tok, &recs, &opts).unwrap();
    assert_eq!(
        (
            out.report.examples,
            out.report.truncated,
            out.report.dropped_no_loss
        ),
        (1, 1, 1)
    );
    let e = &out.examples[0];
    assert_eq!(e.prompt_ids.len() + e.chosen_ids.len(), 7);
    let b = collate_dpo(&out.examples, pad_id(&tok).unwrap());
    assert_eq!(b.batch.len(), 2);
    let ones = |m: &Vec<u8>| m.iter().filter(|&&x| x == 1).count();
    assert_eq!(ones(&b.completion_mask[0]), e.chosen_ids.len());
    assert_eq!(ones(&b.completion_mask[1]), e.rejected_ids.len());
}

#[test]
fn dpo_keep_end_leaves_ids_whole_and_counts() {
    let tok = gpt2();
    let rows = [serde_json::json!({
        "prompt": "A prompt longer than the window allows", "chosen": " a", "rejected": " b"
    })];
    let recs: Vec<Comparison> = records(&rows);
    let opts = TokenizeOptions {
        max_length: Some(7),
        truncation_mode: TruncationMode::KeepEnd,
        ..Default::default()
    };
    let out = tokenize_dpo(&tok, &recs, &opts).unwrap();
    let whole = tokenize_dpo(&tok, &recs, &TokenizeOptions::default()).unwrap();
    assert_eq!(
        out.examples, whole.examples,
        "the trainer cuts each row's start"
    );
    assert_eq!((out.report.truncated, out.report.dropped_no_loss), (1, 0));
}

#[test]
fn kto_rows_split_at_the_prompt_and_truncate_like_dpo() {
    let tok = gpt2();
    let rows = [
        serde_json::json!({"prompt": "Hi?", "completion": " Hello there, friend!", "label": true}),
        serde_json::json!({"prompt": "Hi?", "completion": " No.", "label": false}),
        serde_json::json!({"prompt": "A prompt longer than the window allows", "completion": " a", "label": true}),
    ];
    let recs: Vec<UnpairedPreference> = records(&rows);
    let all = tokenize_unpaired(&tok, &recs, &TokenizeOptions::default()).unwrap();
    // The same split as DPO's on the pair these rows unpair.
    let pair: Vec<Comparison> = records(&[serde_json::json!(
        {"prompt": "Hi?", "chosen": " Hello there, friend!", "rejected": " No."}
    )]);
    let dpo = &tokenize_dpo(&tok, &pair, &TokenizeOptions::default())
        .unwrap()
        .examples[0];
    let (c, r) = (&all.examples[0], &all.examples[1]);
    assert_eq!(
        (&c.prompt_ids, &c.completion_ids),
        (&dpo.prompt_ids, &dpo.chosen_ids)
    );
    assert_eq!(&r.completion_ids, &dpo.rejected_ids);
    assert_eq!((c.label, r.label), (true, false));
    assert_eq!(
        *c.completion_ids.last().unwrap(),
        tok.eos_token_id().unwrap(),
        "EOS appended"
    );

    let opts = TokenizeOptions {
        max_length: Some(7),
        ..Default::default()
    };
    let cut = tokenize_unpaired(&tok, &recs, &opts).unwrap();
    assert_eq!(
        (
            cut.report.examples,
            cut.report.truncated,
            cut.report.dropped_no_loss
        ),
        (2, 2, 1),
        "{}",
        cut.report
    );
    for e in &cut.examples {
        assert_eq!(
            e.prompt_ids.len() + e.completion_ids.len(),
            7,
            "the start kept"
        );
    }
}

#[test]
fn reward_batch_has_chosen_rows_then_rejected_rows_and_rankings_expand() {
    let tok = gpt2();
    let rows = [
        serde_json::json!({"prompt": "Q", "chosen": " good", "rejected": " bad", "margin": 1.0}),
        serde_json::json!({"prompt": "R", "responses": [" x", " yy", " zzz"], "ranking": [1, 2, 0]}),
    ];
    let recs: Vec<Comparison> = records(&rows);
    let out = tokenize_comparisons(&tok, &recs, &TokenizeOptions::default()).unwrap();
    assert_eq!(out.examples[1].pairs.len(), 3);
    assert_eq!(out.report.examples, 4);
    let b = collate_reward(&out.examples, pad_id(&tok).unwrap());
    assert_eq!((b.num_pairs, b.batch.len()), (4, 8));
    let unpad = |row: usize| -> Vec<u32> {
        b.batch.input_ids[row]
            .iter()
            .zip(&b.batch.attention_mask[row])
            .filter(|(_, &m)| m == 1)
            .map(|(&t, _)| t)
            .collect()
    };
    let ids = |text: &str| tok.encode(&format!("{text}<|endoftext|>"), true).unwrap();
    assert_eq!(unpad(0), ids("Q good"));
    assert_eq!(unpad(4), ids("Q bad"));
    // Ranking [1, 2, 0]: pairs (1,2), (1,0), (2,0); chosen = better ranked.
    assert_eq!((unpad(1), unpad(5)), (ids("R yy"), ids("R zzz")));
    assert_eq!((unpad(2), unpad(6)), (ids("R yy"), ids("R x")));
    assert_eq!((unpad(3), unpad(7)), (ids("R zzz"), ids("R x")));
    assert_eq!(b.margins, Some(vec![1.0, 0.0, 0.0, 0.0]));
    assert_eq!(b.groups, vec![0..1, 1..4]);
    assert_eq!(b.pair_weights, vec![0.5, 0.5 / 3.0, 0.5 / 3.0, 0.5 / 3.0]);
}

#[test]
fn chat_template_failures_name_the_row_and_can_be_skipped() {
    let mut tok = gpt2();
    tok.set_chat_template(Some(
        "{% for m in messages %}{% if m['role'] == 'bad' %}{{ raise_exception('unknown role bad') }}\
         {% endif %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}\
         {% if add_generation_prompt %}assistant: {% endif %}"
            .to_string(),
    ));
    let rows = [
        serde_json::json!({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}),
        serde_json::json!({"messages": [{"role": "bad", "content": "Hi"}]}),
    ];
    let recs: Vec<Demonstration> = records(&rows);
    let e = tokenize_demonstrations(&tok, &recs, &TokenizeOptions::default()).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.starts_with("train.jsonl:2: ") && msg.contains("unknown role bad"),
        "{msg}"
    );
    let opts = TokenizeOptions {
        skip_invalid: true,
        ..Default::default()
    };
    let out = tokenize_demonstrations(&tok, &recs, &opts).unwrap();
    assert_eq!((out.examples.len(), out.report.skipped), (1, 1));
    // Assistant-only loss: "Yo\n" (what the assistant turn adds) is labelled, "user: Hi\n" and
    // the "assistant: " header are not.
    let ex = &out.examples[0];
    let labelled: Vec<u32> = ex
        .input_ids
        .iter()
        .zip(&ex.labels)
        .filter(|(_, &l)| l != IGNORE_INDEX)
        .map(|(&t, _)| t)
        .collect();
    assert_eq!(tok.decode(&labelled, false).unwrap(), "Yo\n");
    // Without assistant-only loss every token counts, as in TRL's default.
    let all = TokenizeOptions {
        assistant_only_loss: false,
        ..opts
    };
    let out = tokenize_demonstrations(&tok, &recs[..1], &all).unwrap();
    assert!(out.examples[0].labels.iter().all(|&l| l >= 0));
}

#[test]
fn prompts_for_generation() {
    let mut tok = gpt2();
    tok.set_chat_template(Some(
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}\
         {% if add_generation_prompt %}assistant:{% endif %}"
            .to_string(),
    ));
    let ids = prompt_ids(
        &tok,
        &Content::Messages(vec![ChatMessage::new("user", "Hi")]),
    )
    .unwrap();
    assert_eq!(tok.decode(&ids, false).unwrap(), "user: Hi\nassistant:");
    let text = prompt_ids(&tok, &Content::Text("Hi".into())).unwrap();
    let b = collate_prompts(&[ids.clone(), text.clone()], 1);
    // Left padding: both rows end at the right edge.
    assert_eq!(b.input_ids[1][ids.len() - text.len()..], text[..]);
    assert_eq!(b.attention_mask[1][0], 0);
}

#[test]
fn sampler_resumes_with_the_same_next_batches() {
    let (len, bs) = (23, 4);
    let mut run = Sampler::new(len, 1234, true);
    let mut reference = Vec::new();
    let mut saved = None;
    for step in 0..40 {
        if step == 17 {
            // Save as a checkpoint would: through JSON.
            saved = Some(serde_json::to_string(&run.state()).unwrap());
        }
        reference.push(run.next_batch(bs));
    }
    let state: SamplerState = serde_json::from_str(&saved.unwrap()).unwrap();
    assert_eq!((state.epoch, state.index), (2, 20));
    let mut resumed = Sampler::from_state(state, len).unwrap();
    let after: Vec<Vec<usize>> = (17..40).map(|_| resumed.next_batch(bs)).collect();
    assert_eq!(after, reference[17..]);
    assert_eq!(resumed.state(), run.state());

    // Same seed, same order; another seed, another order.
    let mut again = Sampler::new(len, 1234, true);
    assert_eq!(again.next_batch(bs), reference[0]);
    let mut other = Sampler::new(len, 99, true);
    assert_ne!(
        (0..6).map(|_| other.next_batch(bs)).collect::<Vec<_>>(),
        reference[..6]
    );
    // The data changed size: resuming is refused with a reason.
    let e = Sampler::from_state(state, len + 1).unwrap_err().to_string();
    assert!(e.contains("23 examples but the data now has 24"), "{e}");
}
