//! Reading files into records: every format parses, bad rows give file:line:field messages,
//! `skip_invalid` counts them, rankings expand to their pairs, and Parquet files (written here
//! with the parquet crate, and by pyarrow in tests/data) read like JSONL.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rlhf_data::*;
use rlhf_model::tokenizer::ChatMessage;

fn write(dir: &Path, name: &str, lines: &[&str]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, lines.join("\n") + "\n").unwrap();
    p
}

fn strict() -> ReadOptions {
    ReadOptions::default()
}

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

#[test]
fn demonstration_formats_parse() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "sft.jsonl",
        &[
            r#"{"prompt": "Hi?", "completion": " Hello!", "id": 7}"#,
            r#"{"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello!"}]}"#,
            r#"{"text": "Just text."}"#,
            r#"{"prompt": [{"role": "user", "content": "Hi?"}], "completion": [{"role": "assistant", "content": "Yo"}]}"#,
        ],
    );
    let got = load::<Demonstration>(&p, &strict()).unwrap();
    assert_eq!(got.report.rows, 4);
    let bodies: Vec<_> = got.records.iter().map(|d| d.body.clone()).collect();
    assert_eq!(
        bodies[0],
        DemonstrationBody::PromptCompletion {
            prompt: Content::Text("Hi?".into()),
            completion: Content::Text(" Hello!".into())
        }
    );
    assert_eq!(
        bodies[1],
        DemonstrationBody::Messages(vec![
            ChatMessage::new("user", "Hi?"),
            ChatMessage::new("assistant", "Hello!")
        ])
    );
    assert_eq!(bodies[2], DemonstrationBody::Text("Just text.".into()));
    assert!(matches!(
        &bodies[3],
        DemonstrationBody::PromptCompletion { prompt: Content::Messages(p), .. } if p.len() == 1
    ));
    assert_eq!(got.records[2].at.line, 3);
}

#[test]
fn preference_formats_parse() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "pref.jsonl",
        &[
            r#"{"prompt": "Q", "chosen": " a", "rejected": " b", "margin": 2.5}"#,
            r#"{"prompt": "Q", "chosen": " a", "rejected": " b", "degree": "slightly_better", "safety": {"chosen": "safe", "rejected": "unsafe"}}"#,
            r#"{"chosen": "Q a", "rejected": "Q b", "safety": ["safe", "safe"]}"#,
            r#"{"prompt": [{"role": "user", "content": "Q"}], "chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]}"#,
            r#"{"chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "a"}], "rejected": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "b"}]}"#,
            r#"{"prompt": "Q", "responses": ["r0", "r1", "r2"], "ranking": [2, 0, 1]}"#,
        ],
    );
    let got = load::<Comparison>(&p, &strict()).unwrap().records;
    let pair = |i: usize| match &got[i] {
        Comparison::Pair(p) => p.clone(),
        other => panic!("row {i} is {other:?}"),
    };
    assert_eq!(pair(0).margin(MarginTable::Small), Some(2.5));
    let p1 = pair(1);
    assert_eq!(p1.degree, Some(Degree::SlightlyBetter));
    assert_eq!(p1.margin(MarginTable::Small), Some(1.0 / 3.0));
    assert_eq!(p1.margin(MarginTable::Large), Some(1.0));
    assert_eq!(
        p1.safety,
        Some(PairSafety {
            chosen: Safety::Safe,
            rejected: Safety::Unsafe
        })
    );
    let p2 = pair(2);
    assert_eq!((&p2.prompt, p2.margin(MarginTable::Small)), (&None, None));
    assert!(pair(3).chosen.is_conversational() && pair(3).prompt.is_some());
    assert!(pair(4).prompt.is_none() && pair(4).rejected.is_conversational());
    assert!(matches!(&got[5], Comparison::Ranking(r) if r.responses.len() == 3));
}

#[test]
fn prompt_formats_parse() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "prompts.jsonl",
        &[
            r#"{"prompt": "Tell me a joke.", "tags": ["safety"], "source": "x"}"#,
            r#"{"messages": [{"role": "user", "content": "Hi"}]}"#,
        ],
    );
    let got = load::<PromptRecord>(&p, &strict()).unwrap().records;
    assert_eq!(got[0].prompt, Content::Text("Tell me a joke.".into()));
    assert_eq!(got[0].tags, ["safety"]);
    assert_eq!(got[0].row["source"], "x");
    assert_eq!(
        got[1].prompt,
        Content::Messages(vec![ChatMessage::new("user", "Hi")])
    );
    assert!(got[1].tags.is_empty());
}

/// The message of the first error loading `lines` as `T`.
fn first_error<T: Record + std::fmt::Debug>(lines: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "train.jsonl", lines);
    let e = load::<T>(&p, &strict()).unwrap_err().to_string();
    // Show messages relative to the file name, as a user who typed `train.jsonl` sees them.
    e.replace(&format!("{}/", dir.path().display()), "")
}

#[test]
fn malformed_rows_name_file_line_and_field() {
    let ok = r#"{"prompt": "p", "chosen": "a", "rejected": "b"}"#;
    assert_eq!(
        first_error::<Comparison>(&[ok, ok, r#"{"prompt": "p", "rejected": "b"}"#]),
        "train.jsonl:3: field \"chosen\" is missing; preference rows look like {\"prompt\", \
         \"chosen\", \"rejected\"} (optional \"margin\" or \"degree\", and \"safety\"), {\"chosen\", \
         \"rejected\"} with the prompt inside both, or {\"prompt\", \"responses\": [...], \
         \"ranking\": [indices, best first]}"
    );
    let cases: &[(&str, &str)] = &[
        (
            r#"{"prompt": "p", "chosen": 3, "rejected": "b"}"#,
            "train.jsonl:1: field \"chosen\" must be a string or a list of messages, found a number (3)",
        ),
        (
            r#"{"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"}"#,
            "train.jsonl:1: field \"margin\" must be a number, found a string (\"big\")",
        ),
        (
            r#"{"prompt": "p", "chosen": "a", "rejected": "b", "degree": "much_better"}"#,
            "train.jsonl:1: field \"degree\" is \"much_better\"; it must be one of significantly_better, \
             better, slightly_better or negligibly_better",
        ),
        (
            r#"{"prompt": "p", "chosen": [{"role": "assistant"}], "rejected": [{"role": "assistant", "content": "b"}]}"#,
            "train.jsonl:1: field \"chosen[0].content\" is missing; messages look like",
        ),
        (
            r#"{"prompt": "p", "responses": ["a", "b", "c"], "ranking": [0, 0, 1]}"#,
            "train.jsonl:1: field \"ranking\" lists response 0 twice",
        ),
        (
            r#"{"prompt": "p", "responses": ["a", "b"], "ranking": [0, 2]}"#,
            "train.jsonl:1: field \"ranking[1]\" is 2; it must be an index into \"responses\" (0 to 1)",
        ),
        (
            r#"{"prompt": "p", "responses": ["a", "b", "c"], "ranking": [1, 0]}"#,
            "train.jsonl:1: field \"ranking\" ranks 2 of the 3 responses",
        ),
        (
            r#"{"prompt": "p", "chosen": "a", "rejected": "b", "safety": {"chosen": "ok", "rejected": "safe"}}"#,
            "train.jsonl:1: field \"safety.chosen\" is a string (\"ok\"); it must be \"safe\" or \"unsafe\"",
        ),
        (
            r#"{"input": "p", "output": "a"}"#,
            "train.jsonl:1: a row with fields {\"input\", \"output\"} is not a preference row",
        ),
        (
            r#"{"prompt": "p", "completion": "a"}"#,
            "train.jsonl:1: a row with fields {\"completion\", \"prompt\"} is not a preference row; \
             it looks like a demonstration row",
        ),
        (
            r#"{"prompt": "p", "chosen": "a""#,
            "train.jsonl:1: not a JSON object (EOF while parsing an object",
        ),
    ];
    for (line, want) in cases {
        let got = first_error::<Comparison>(&[line]);
        assert!(got.starts_with(want), "\n got: {got}\nwant: {want}...");
    }
    let got = first_error::<Demonstration>(&[r#"{"prompt": "p"}"#]);
    assert!(
        got.starts_with(
            "train.jsonl:1: field \"completion\" is missing; demonstration rows look like"
        ),
        "{got}"
    );
    let got = first_error::<Demonstration>(&[r#"{"prompt": "p", "chosen": "a", "rejected": "b"}"#]);
    assert!(got.contains("it looks like a preference row"), "{got}");
    let got = first_error::<Demonstration>(&[
        r#"{"prompt": "p", "completion": [{"role": "assistant", "content": "a"}]}"#,
    ]);
    assert!(
        got.starts_with(
            "train.jsonl:1: field \"completion\" must be a string like the row's other text \
             fields, found a list of messages"
        ),
        "{got}"
    );
    let got = first_error::<PromptRecord>(&[r#"{"prompt": "p", "tags": [1]}"#]);
    assert!(
        got.starts_with("train.jsonl:1: field \"tags[0]\" must be a string"),
        "{got}"
    );
}

#[test]
fn skip_invalid_counts_bad_rows_and_keeps_reasons() {
    let dir = tempfile::tempdir().unwrap();
    let ok = r#"{"prompt": "p", "chosen": "a", "rejected": "b"}"#;
    let mut lines = vec![ok, "{not json", ok, r#"{"prompt": "p", "chosen": "a"}"#, ""];
    lines.extend(std::iter::repeat_n(r#"{"chosen": 1, "rejected": "b"}"#, 6));
    lines.push(ok);
    let p = write(dir.path(), "train.jsonl", &lines);

    let e = load::<Comparison>(&p, &strict()).unwrap_err();
    assert!(
        e.to_string().contains("train.jsonl:2: not a JSON object"),
        "{e}"
    );

    let got = load::<Comparison>(&p, &ReadOptions { skip_invalid: true }).unwrap();
    assert_eq!(got.records.len(), 3);
    let r = &got.report;
    assert_eq!((r.rows, r.skipped), (11, 8));
    assert_eq!(r.reasons.len(), 5);
    assert!(r.reasons[0].contains("train.jsonl:2: not a JSON object"));
    assert!(r.reasons[1].contains("train.jsonl:4: field \"rejected\" is missing"));
    assert!(r.reasons[2].contains("train.jsonl:6: field \"chosen\" must be"));
    // The blank line 5 is neither a row nor an error; numbering still follows the file.
    assert_eq!(got.records[2].at().line, 12);
    let shown = r.to_string();
    assert!(
        shown.contains("11 rows, 3 used, 8 skipped as invalid"),
        "{shown}"
    );

    // All rows invalid: an error even when skipping, with the first reason.
    let p = write(dir.path(), "bad.jsonl", &[r#"{"x": 1}"#, r#"{"y": 2}"#]);
    let e = load::<Comparison>(&p, &ReadOptions { skip_invalid: true })
        .unwrap_err()
        .to_string();
    assert!(e.contains("no usable rows; all 2 rows were invalid"), "{e}");
    // An empty file is an error too.
    let p = write(dir.path(), "empty.jsonl", &[]);
    assert!(matches!(
        load::<Demonstration>(&p, &strict()),
        Err(Error::Empty { .. })
    ));
    // File-level errors are never skipped.
    assert!(matches!(
        load::<Demonstration>(
            &dir.path().join("missing.jsonl"),
            &ReadOptions { skip_invalid: true }
        ),
        Err(Error::Io { .. })
    ));
}

#[test]
fn ranking_expands_to_all_pairs_better_first() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "rank.jsonl",
        &[r#"{"prompt": "Q", "responses": ["r0", "r1", "r2", "r3"], "ranking": [2, 0, 3, 1]}"#],
    );
    let c = load::<Comparison>(&p, &strict()).unwrap().records.remove(0);
    let Comparison::Ranking(r) = &c else { panic!() };
    // K = 4: 6 pairs, each (better, worse) by ranking position.
    assert_eq!(
        r.index_pairs(),
        [(2, 0), (2, 3), (2, 1), (0, 3), (0, 1), (3, 1)]
    );
    let pairs = c.pairs();
    assert_eq!(pairs.len(), 6);
    assert_eq!(c.num_pairs(), 6);
    let text = |c: &Content| match c {
        Content::Text(s) => s.clone(),
        _ => panic!(),
    };
    let got: Vec<(String, String)> = pairs
        .iter()
        .map(|p| (text(&p.chosen), text(&p.rejected)))
        .collect();
    assert_eq!(got[0], ("r2".to_string(), "r0".to_string()));
    assert_eq!(got[5], ("r3".to_string(), "r1".to_string()));
    for p in &pairs {
        assert_eq!(p.prompt, Some(Content::Text("Q".into())));
        let (b, w) = (text(&p.chosen), text(&p.rejected));
        let pos = |s: &str| {
            r.ranking
                .iter()
                .position(|g| g.iter().any(|&i| format!("r{i}") == s))
                .unwrap()
        };
        assert!(pos(&b) < pos(&w), "{b} must rank above {w}");
    }
    // The flat form reads as groups of one.
    assert_eq!(r.ranking, [vec![2], vec![0], vec![3], vec![1]]);
}

#[test]
fn tied_and_partial_rankings_give_pairs_across_groups_only() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "rank.jsonl",
        &[
            // r1 best; r0 and r2 tied below it: 2 pairs, none between r0 and r2.
            r#"{"prompt": "Q", "responses": ["r0", "r1", "r2"], "ranking": [[1], [0, 2]]}"#,
            // Mixed form, partial: r3 is unranked and in no pair; r0 > {r2, r4} > r1.
            r#"{"prompt": "Q", "responses": ["r0", "r1", "r2", "r3", "r4"], "ranking": [0, [2, 4], [1]]}"#,
            // Grouped form with groups of one: the same as the flat form.
            r#"{"prompt": "Q", "responses": ["r0", "r1", "r2"], "ranking": [[2], [0], [1]]}"#,
            // A partial ranking of two of four answers.
            r#"{"prompt": "Q", "responses": ["r0", "r1", "r2", "r3"], "ranking": [[3], 1]}"#,
        ],
    );
    let got = load::<Comparison>(&p, &strict()).unwrap().records;
    let ranking = |i: usize| match &got[i] {
        Comparison::Ranking(r) => r.clone(),
        other => panic!("row {i} is {other:?}"),
    };
    let r = ranking(0);
    assert_eq!(r.ranking, [vec![1], vec![0, 2]]);
    assert_eq!(r.index_pairs(), [(1, 0), (1, 2)]);
    assert_eq!(got[0].num_pairs(), 2);
    let r = ranking(1);
    assert_eq!(r.ranking, [vec![0], vec![2, 4], vec![1]]);
    assert_eq!(r.index_pairs(), [(0, 2), (0, 4), (0, 1), (2, 1), (4, 1)]);
    assert_eq!(got[1].num_pairs(), 5);
    assert!(r.index_pairs().iter().all(|&(b, w)| b != 3 && w != 3));
    assert_eq!(ranking(2).index_pairs(), [(2, 0), (2, 1), (0, 1)]);
    assert_eq!(ranking(3).index_pairs(), [(3, 1)]);
    for c in &got {
        assert_eq!(c.pairs().len(), c.num_pairs());
    }
    let Comparison::Ranking(r) = &got[0] else {
        unreachable!()
    };
    let pairs = r.to_pairs();
    assert_eq!(pairs[1].chosen, Content::Text("r1".into()));
    assert_eq!(pairs[1].rejected, Content::Text("r2".into()));
}

#[test]
fn bad_grouped_rankings_name_file_line_and_field() {
    let cases: &[(&str, &str)] = &[
        (
            r#"{"prompt": "p", "responses": ["a", "b", "c"], "ranking": [[0, 1, 2]]}"#,
            "train.jsonl:1: field \"ranking\" has 1 group(s); a ranking needs at least two groups, \
             best first (answers in one group are tied and give no pair)",
        ),
        (
            r#"{"prompt": "p", "responses": ["a", "b", "c"], "ranking": [[0], []]}"#,
            "train.jsonl:1: field \"ranking[1]\" is an empty group; a group lists one or more tied \
             indices, or is left out",
        ),
        (
            r#"{"prompt": "p", "responses": ["a", "b", "c"], "ranking": [[0], [1, 3]]}"#,
            "train.jsonl:1: field \"ranking[1][1]\" is 3; it must be an index into \"responses\" (0 to 2)",
        ),
        (
            r#"{"prompt": "p", "responses": ["a", "b", "c"], "ranking": [[0], "b"]}"#,
            "train.jsonl:1: field \"ranking[1]\" is \"b\"; it must be an index into \"responses\" (0 to 2)",
        ),
        (
            r#"{"prompt": "p", "responses": ["a", "b", "c"], "ranking": [[0, 1], [1]]}"#,
            "train.jsonl:1: field \"ranking\" lists response 1 twice; give each answer once, tied \
             answers in one group: [[1], [0, 2]]",
        ),
        (
            r#"{"prompt": "p", "responses": ["a", "b", "c"], "ranking": [0, [0, 1]]}"#,
            "train.jsonl:1: field \"ranking\" lists response 0 twice",
        ),
        (
            r#"{"prompt": "p", "responses": ["a", "b", "c"], "ranking": [[-1], [1]]}"#,
            "train.jsonl:1: field \"ranking[0][0]\" is -1; it must be an index",
        ),
    ];
    for (line, want) in cases {
        let got = first_error::<Comparison>(&[line]);
        assert!(got.starts_with(want), "\n got: {got}\nwant: {want}...");
    }
    // Errors on a later line name that line.
    let ok = r#"{"prompt": "p", "responses": ["a", "b"], "ranking": [[1], [0]]}"#;
    let got = first_error::<Comparison>(&[
        ok,
        ok,
        r#"{"prompt": "p", "responses": ["a", "b"], "ranking": [[1, 0]]}"#,
    ]);
    assert!(
        got.starts_with("train.jsonl:3: field \"ranking\" has 1 group(s)"),
        "{got}"
    );
    // The flat form keeps its rules: every response once, no partial ranking.
    let got = first_error::<Comparison>(&[
        r#"{"prompt": "p", "responses": ["a", "b", "c"], "ranking": [1, 0]}"#,
    ]);
    assert!(got.starts_with("train.jsonl:1: field \"ranking\" ranks 2 of the 3 responses; it must list every index 0..3 once, best first"), "{got}");
}

#[test]
fn llama2_margin_tables() {
    let levels = [
        ("significantly_better", 1.0, 3.0),
        ("better", 2.0 / 3.0, 2.0),
        ("slightly_better", 1.0 / 3.0, 1.0),
        ("negligibly_better", 0.0, 0.0),
    ];
    for (name, small, large) in levels {
        let d = Degree::parse(name).unwrap();
        assert_eq!(d.margin(MarginTable::Small), small as f32, "{name}");
        assert_eq!(d.margin(MarginTable::Large), large as f32, "{name}");
    }
    // The table is selectable from config text.
    let t: MarginTable = serde_json::from_str("\"large\"").unwrap();
    assert_eq!(t, MarginTable::Large);
    assert_eq!(MarginTable::default(), MarginTable::Small);
}

#[test]
fn parquet_written_by_the_parquet_crate_reads_like_jsonl() {
    use parquet::basic::Compression;
    use parquet::data_type::{ByteArray, ByteArrayType, DoubleType};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use parquet::schema::parser::parse_message_type;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("train.parquet");
    let schema = parse_message_type(
        "message schema {
            REQUIRED BINARY prompt (UTF8);
            REQUIRED BINARY chosen (UTF8);
            REQUIRED BINARY rejected (UTF8);
            OPTIONAL DOUBLE margin;
        }",
    )
    .unwrap();
    let props = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .build();
    let mut writer = SerializedFileWriter::new(
        File::create(&path).unwrap(),
        Arc::new(schema),
        Arc::new(props),
    )
    .unwrap();
    // Two row groups, so row numbers must continue across groups.
    let groups: [[[&str; 2]; 3]; 2] = [
        [["Q1", "Q2"], [" a1", " a2"], [" b1", " b2"]],
        [["Q3", "Q4"], [" a3", " a4"], [" b3", " b4"]],
    ];
    for (g, cols) in groups.iter().enumerate() {
        let mut rg = writer.next_row_group().unwrap();
        for strings in cols {
            let mut col = rg.next_column().unwrap().unwrap();
            let values: Vec<ByteArray> = strings.iter().map(|s| ByteArray::from(*s)).collect();
            col.typed::<ByteArrayType>()
                .write_batch(&values, None, None)
                .unwrap();
            col.close().unwrap();
        }
        let mut col = rg.next_column().unwrap().unwrap();
        // Row 2 of each group has no margin (definition level 0).
        col.typed::<DoubleType>()
            .write_batch(&[0.5 + g as f64], Some(&[1, 0]), None)
            .unwrap();
        col.close().unwrap();
        rg.close().unwrap();
    }
    writer.close().unwrap();

    let rows = read_rows(&path).unwrap();
    assert_eq!(rows.len(), 4);
    assert_eq!(rows[2].at.line, 3);
    assert_eq!(rows[2].at.unit, Unit::Row);
    assert_eq!(rows[2].fields["prompt"], "Q3");
    assert_eq!(rows[1].fields["margin"], serde_json::Value::Null);

    let got = load::<Comparison>(&path, &strict()).unwrap().records;
    let margins: Vec<Option<f32>> = got
        .iter()
        .map(|c| match c {
            Comparison::Pair(p) => p.margin(MarginTable::Small),
            _ => panic!(),
        })
        .collect();
    assert_eq!(margins, [Some(0.5), None, Some(1.5), None]);
    assert!(got[3].at().to_string().ends_with("train.parquet: row 4"));
}

#[test]
fn parquet_written_by_pyarrow_with_nested_messages() {
    let path = data("conversational.parquet");
    let got = load::<Comparison>(&path, &strict()).unwrap().records;
    assert_eq!(got.len(), 2);
    let Comparison::Pair(p0) = &got[0] else {
        panic!()
    };
    assert_eq!(
        p0.prompt,
        Some(Content::Messages(vec![ChatMessage::new("user", "Hi?")]))
    );
    assert_eq!(
        p0.chosen,
        Content::Messages(vec![ChatMessage::new("assistant", "Hello!")])
    );
    assert_eq!(p0.degree, Some(Degree::SignificantlyBetter));
    assert_eq!(p0.margin(MarginTable::Large), Some(3.0));
    assert_eq!(
        p0.safety,
        Some(PairSafety {
            chosen: Safety::Safe,
            rejected: Safety::Unsafe
        })
    );
    let Comparison::Pair(p1) = &got[1] else {
        panic!()
    };
    assert_eq!((p1.margin, p1.degree, p1.safety), (Some(0.25), None, None));
    let Some(Content::Messages(m)) = &p1.prompt else {
        panic!()
    };
    assert_eq!(m[0], ChatMessage::new("system", "Be kind."));
}

#[test]
fn unsupported_parquet_codec_says_how_to_rewrite() {
    let e = read_rows(&data("zstd.parquet")).unwrap_err().to_string();
    assert!(e.contains("zstd"), "{e}");
    assert!(e.contains("compression=\"snappy\""), "{e}");
}

#[test]
fn unpaired_rows_parse_and_bad_ones_say_what_to_fix() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "kto.jsonl",
        &[
            r#"{"prompt": "Hi?", "completion": " Hello!", "label": true}"#,
            r#"{"prompt": [{"role": "user", "content": "Hi?"}], "completion": [{"role": "assistant", "content": "No."}], "label": false}"#,
        ],
    );
    let got = load::<UnpairedPreference>(&p, &strict()).unwrap();
    assert_eq!(got.records.len(), 2);
    assert!(got.records[0].label && !got.records[1].label);
    assert!(got.records[1].completion.is_conversational());

    let cases = [
        (
            r#"{"prompt": "Hi?", "completion": " Hello!", "label": 1}"#,
            "kto.jsonl:1: field \"label\" must be true (desirable) or false (undesirable), found",
        ),
        (
            r#"{"prompt": "Hi?", "completion": " Hello!"}"#,
            "kto.jsonl:1: field \"label\" is missing; unpaired preference rows look like",
        ),
        (
            r#"{"prompt": "Hi?", "chosen": " a", "rejected": " b"}"#,
            "it looks like a preference pair; split each pair into two rows",
        ),
        (
            r#"{"prompt": "Hi?", "completion": [{"role": "assistant", "content": "a"}], "label": true}"#,
            "kto.jsonl:1: field \"completion\" must be a string like the row's other text fields",
        ),
        (
            r#"{"text": "Hi?"}"#,
            "is not a KTO row; unpaired preference rows look like",
        ),
    ];
    for (row, want) in cases {
        let p = write(dir.path(), "kto.jsonl", &[row]);
        let e = load::<UnpairedPreference>(&p, &strict())
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "{row}: {e}");
    }
}
