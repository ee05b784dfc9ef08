//! Tests of the export: every format and aggregation on a small database, the Label Studio
//! round trip through the importer, agreement per kind, atomic writes.

use super::*;
use crate::import::{import_file, ImportOptions};
use crate::store::NewItem;
use rlhf_data::{Comparison, Demonstration, ReadOptions, UnpairedPreference};

fn notes(tags: &[&str]) -> Notes {
    Notes {
        comment: None,
        tags: tags.iter().map(|t| t.to_string()).collect(),
    }
}

fn pair(choice: Choice, degree: Option<Degree>, safety: Vec<Option<Safety>>) -> Label {
    Label::Pairwise {
        choice,
        degree,
        safety,
        notes: Notes::default(),
    }
}

fn rank(groups: &[&[usize]]) -> Label {
    Label::Rank {
        ranking: groups.iter().map(|g| g.to_vec()).collect(),
        notes: Notes::default(),
    }
}

fn single(thumb: Thumb, rewrite: Option<&str>) -> Label {
    Label::Single {
        thumb,
        rewrite: rewrite.map(str::to_string),
        notes: Notes::default(),
    }
}

fn item(prompt: Value, answers: &[&str], meta: Value) -> NewItem {
    NewItem {
        prompt,
        meta: meta.as_object().cloned().unwrap_or_default(),
        candidates: answers.iter().map(|a| json!(a)).collect(),
    }
}

/// A database with one project of each kind and two annotators, ann and bob.
struct Db {
    _dir: tempfile::TempDir,
    store: Store,
    ann: i64,
    bob: i64,
    pairwise: Vec<i64>,
    rank: Vec<i64>,
    single: Vec<i64>,
    demo: Vec<i64>,
}

fn db() -> Db {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(&dir.path().join("f.sqlite")).unwrap();
    let ann = store.add_user("ann", None, false).unwrap().0.id;
    let bob = store.add_user("bob", None, false).unwrap().0.id;
    let p = store.ensure_project("pw", Kind::Pairwise, Some(2)).unwrap();
    let pairwise = store
        .add_items(
            &p,
            &[
                // The input's own "chosen"/"safety" must not leak into the export.
                item(
                    json!("Q0"),
                    &["A0", "B0"],
                    json!({"tags": ["x"], "source": "s0", "safety": "junk", "chosen": "old"}),
                ),
                item(json!("Q1"), &["A1", "B1"], json!({})),
                item(json!("Q2"), &["A2", "B2"], json!({})),
            ],
        )
        .unwrap();
    let r = store.ensure_project("rk", Kind::Rank, Some(2)).unwrap();
    let rank = store
        .add_items(
            &r,
            &[item(json!("R0"), &["r0", "r1", "r2", "r3"], json!({}))],
        )
        .unwrap();
    let s = store.ensure_project("sg", Kind::Single, Some(2)).unwrap();
    let single = store
        .add_items(
            &s,
            &[
                item(json!("S0"), &["s0"], json!({})),
                item(
                    json!([{"role": "user", "content": "S1"}]),
                    &["s1"],
                    json!({}),
                ),
            ],
        )
        .unwrap();
    let d = store.ensure_project("dm", Kind::Demo, None).unwrap();
    let demo = store
        .add_items(&d, &[item(json!("D0"), &[], json!({"tags": "t"}))])
        .unwrap();
    Db {
        _dir: dir,
        store,
        ann,
        bob,
        pairwise,
        rank,
        single,
        demo,
    }
}

fn run(db: &mut Db, format: Format, aggregate: Aggregate) -> (Vec<Value>, ExportReport) {
    export(
        &mut db.store,
        &ExportOptions {
            format,
            aggregate,
            project: None,
        },
    )
    .unwrap()
}

/// Labels everything: see each test for what the labels say.
fn labelled() -> Db {
    let mut d = db();
    let (ann, bob) = (d.ann, d.bob);
    let s = &mut d.store;
    let (safe, unsafe_) = (Some(Safety::Safe), Some(Safety::Unsafe));
    // Q0: both prefer B; ann "better", bob "slightly": a tie of degrees goes to the weaker.
    let mut l = pair(Choice::B, Some(Degree::Better), vec![unsafe_, safe]);
    if let Label::Pairwise { notes, .. } = &mut l {
        *notes = notes_with_comment(&["privacy"], "A leaks");
    }
    s.submit(d.pairwise[0], ann, &l, Some(1500)).unwrap();
    let l = pair(Choice::B, Some(Degree::SlightlyBetter), vec![None, safe]);
    s.submit(d.pairwise[0], bob, &l, Some(2500)).unwrap();
    // Q1: a tie and a both_bad: no majority, nothing preferred.
    s.submit(d.pairwise[1], ann, &pair(Choice::Tie, None, vec![]), None)
        .unwrap();
    let l = pair(Choice::BothBad, None, vec![]);
    s.submit(d.pairwise[1], bob, &l, None).unwrap();
    // Q2: a vs b: no majority.
    s.submit(d.pairwise[2], ann, &pair(Choice::A, None, vec![]), None)
        .unwrap();
    s.submit(d.pairwise[2], bob, &pair(Choice::B, None, vec![]), None)
        .unwrap();
    // R0: ann r2 > {r0, r3}, r1 unranked; bob r0 > r2 > r1 > r3.
    s.submit(d.rank[0], ann, &rank(&[&[2], &[0, 3]]), None)
        .unwrap();
    s.submit(d.rank[0], bob, &rank(&[&[0], &[2], &[1], &[3]]), None)
        .unwrap();
    // S0: ann down with a rewrite, bob up. S1 (a message-list prompt): both down.
    s.submit(
        d.single[0],
        ann,
        &single(Thumb::Down, Some("better s0")),
        None,
    )
    .unwrap();
    s.submit(d.single[0], bob, &single(Thumb::Up, None), None)
        .unwrap();
    s.submit(d.single[1], ann, &single(Thumb::Down, None), None)
        .unwrap();
    s.submit(d.single[1], bob, &single(Thumb::Down, None), None)
        .unwrap();
    let demo = Label::Demo {
        text: "a demo".into(),
        notes: notes(&["written"]),
    };
    s.submit(d.demo[0], ann, &demo, Some(60_000)).unwrap();
    d
}

fn notes_with_comment(tags: &[&str], comment: &str) -> Notes {
    Notes {
        comment: Some(comment.into()),
        ..notes(tags)
    }
}

/// Writes `rows` and reads them back as the trainers do.
fn load_back<T: rlhf_data::Record>(rows: &[Value], dir: &Path) -> Vec<T> {
    let p = dir.join("rows.jsonl");
    write_rows(rows, Format::Pairs, &p).unwrap();
    rlhf_data::load::<T>(&p, &ReadOptions::default())
        .unwrap()
        .records
}

fn left(report: &ExportReport, reason: &str) -> usize {
    report
        .left_out
        .iter()
        .find(|(r, _)| r == reason)
        .map_or(0, |(_, n)| *n)
}

#[test]
fn names_parse_and_kinds_are_checked() {
    for f in Format::ALL {
        assert_eq!(Format::parse(f.as_str()).unwrap(), f);
    }
    assert_eq!(Format::parse("Label-Studio").unwrap(), Format::LabelStudio);
    let e = Format::parse("csv").unwrap_err().to_string();
    assert!(
        e.contains("use pairs, rankings, sft, kto, labelstudio or labels"),
        "{e}"
    );
    assert_eq!(Aggregate::parse("majority").unwrap(), Aggregate::Majority);
    assert!(Aggregate::parse("mean").is_err());

    let mut d = db();
    let mut opts = ExportOptions {
        format: Format::Pairs,
        aggregate: Aggregate::None,
        project: Some("dm".into()),
    };
    let e = export(&mut d.store, &opts).unwrap_err().to_string();
    assert!(
        e.contains("project \"dm\" is a demo project, which --format pairs cannot hold; use --format sft, labels"),
        "{e}"
    );
    opts.project = Some("nope".into());
    let e = export(&mut d.store, &opts).unwrap_err().to_string();
    assert!(
        e.contains("no project \"nope\"; the projects are \"pw\" (pairwise)"),
        "{e}"
    );
    opts.format = Format::LabelStudio;
    opts.aggregate = Aggregate::Majority;
    let e = export(&mut d.store, &opts).unwrap_err().to_string();
    assert!(e.contains("without --aggregate majority"), "{e}");
    // Nothing labelled yet: no rows, no error.
    let (rows, report) = run(&mut d, Format::Pairs, Aggregate::None);
    assert!(rows.is_empty() && report.labels_read == 0);
}

#[test]
fn pairs_per_annotator() {
    let mut d = labelled();
    let (rows, report) = run(&mut d, Format::Pairs, Aggregate::None);
    // Q0: 2, Q2: 2, R0: ann 2 + bob 6, S0: ann's rewrite.
    assert_eq!(rows.len(), 13, "{rows:#?}");
    assert_eq!(report.rows, 13);
    assert_eq!(report.labels_read, 6 + 2 + 4);
    assert_eq!(left(&report, TIE), 1);
    assert_eq!(left(&report, BOTH_BAD), 1);
    assert_eq!(left(&report, NO_REWRITE), 3, "bob's S0 and both S1 thumbs");
    let q0 = &rows[0];
    assert_eq!(q0["prompt"], "Q0");
    assert_eq!(
        (&q0["chosen"], &q0["rejected"]),
        (&json!("B0"), &json!("A0"))
    );
    assert_eq!(q0["degree"], "better");
    assert_eq!(
        q0["safety"],
        json!({"chosen": "safe", "rejected": "unsafe"})
    );
    assert_eq!(q0["annotator"], "ann");
    assert_eq!(q0["lead_time"], 1.5);
    assert_eq!(q0["comment"], "A leaks");
    assert_eq!(q0["tags"], json!(["x", "privacy"]));
    assert_eq!(q0["source"], "s0");
    assert_eq!(q0["item_id"], d.pairwise[0]);
    // Bob judged only one answer's safety: no safety field.
    assert!(rows[1].get("safety").is_none());
    assert_eq!(rows[1]["degree"], "slightly_better");
    // Rank: ann's r2 > {r0, r3} gives 2 pairs, no pair for the tie or the unranked r1.
    let ann_rank: Vec<(String, String)> = rows
        .iter()
        .filter(|r| r["prompt"] == "R0" && r["annotator"] == "ann")
        .map(|r| (r["chosen"].to_string(), r["rejected"].to_string()))
        .collect();
    assert_eq!(
        ann_rank,
        [
            ("\"r2\"".into(), "\"r0\"".into()),
            ("\"r2\"".into(), "\"r3\"".into())
        ]
    );
    let rewrite = rows.iter().find(|r| r["prompt"] == "S0").unwrap();
    assert_eq!(
        (&rewrite["chosen"], &rewrite["rejected"]),
        (&json!("better s0"), &json!("s0"))
    );
    // The trainers read every row, as pairs with the degree and safety.
    let back: Vec<Comparison> = load_back(&rows, d._dir.path());
    assert_eq!(back.len(), 13);
    let Comparison::Pair(p) = &back[0] else {
        panic!()
    };
    assert_eq!(p.degree, Some(Degree::Better));
    assert_eq!(p.safety.map(|s| s.chosen), Some(Safety::Safe));
}

#[test]
fn pairs_and_rankings_by_majority() {
    let mut d = labelled();
    let (rows, report) = run(&mut d, Format::Pairs, Aggregate::Majority);
    let q0 = &rows[0];
    assert_eq!(
        (&q0["chosen"], &q0["rejected"]),
        (&json!("B0"), &json!("A0"))
    );
    assert_eq!(
        q0["degree"], "slightly_better",
        "a tie of degrees goes to the weaker"
    );
    // B: safe twice; A: unsafe once (bob did not judge it).
    assert_eq!(
        q0["safety"],
        json!({"chosen": "safe", "rejected": "unsafe"})
    );
    assert_eq!(q0["annotators"], json!(["ann", "bob"]));
    assert_eq!(q0["agreement"], 1.0);
    assert_eq!(q0["lead_time"], 2.0);
    assert!(q0.get("annotator").is_none() && q0.get("comment").is_none());
    assert_eq!(
        left(&report, NO_MAJORITY),
        2,
        "Q1 (tie vs both_bad), Q2 (a vs b)"
    );
    // Borda: r0 (1 + 0) / 2 = 0.5, r2 (0 + 1) / 2 = 0.5, r1 2, r3 (1 + 3) / 2 = 2:
    // {r0, r2} > {r1, r3}: 4 pairs.
    let r0: Vec<&Value> = rows.iter().filter(|r| r["prompt"] == "R0").collect();
    assert_eq!(r0.len(), 4);
    // Of the annotators' judgements on those pairs (ann: r2>r3, r0=r3 → 1 of 2;
    // bob: 4 of 4), 5 of 6 agree.
    assert!((r0[0]["agreement"].as_f64().unwrap() - 5.0 / 6.0).abs() < 1e-12);

    let (rows, _) = run(&mut d, Format::Rankings, Aggregate::Majority);
    let r = rows.iter().find(|r| r["prompt"] == "R0").unwrap();
    assert_eq!(r["responses"], json!(["r0", "r1", "r2", "r3"]));
    assert_eq!(r["ranking"], json!([[0, 2], [1, 3]]));
    let q0 = rows.iter().find(|r| r["prompt"] == "Q0").unwrap();
    assert_eq!(q0["ranking"], json!([1, 0]));
    let back: Vec<Comparison> = load_back(&rows, d._dir.path());
    assert_eq!(back.iter().map(Comparison::num_pairs).sum::<usize>(), 1 + 4);
}

#[test]
fn rankings_reduce_partial_rankings_and_nest_ties() {
    let mut d = labelled();
    let (rows, report) = run(&mut d, Format::Rankings, Aggregate::None);
    let ann = rows
        .iter()
        .find(|r| r["prompt"] == "R0" && r["annotator"] == "ann")
        .unwrap();
    // r1 is unranked: dropped, and r2, r3 re-indexed to 1, 2.
    assert_eq!(ann["responses"], json!(["r0", "r2", "r3"]));
    assert_eq!(ann["ranking"], json!([[1], [0, 2]]));
    let bob = rows
        .iter()
        .find(|r| r["prompt"] == "R0" && r["annotator"] == "bob")
        .unwrap();
    assert_eq!(bob["ranking"], json!([0, 2, 1, 3]));
    // Pairwise a/b as rankings of two; the tie and both_bad left out.
    assert_eq!(rows.len(), 2 + 2 + 2);
    assert_eq!(left(&report, TIE) + left(&report, BOTH_BAD), 2);
    let back: Vec<Comparison> = load_back(&rows, d._dir.path());
    let pairs: usize = back.iter().map(Comparison::num_pairs).sum();
    assert_eq!(pairs, 4 + 2 + 6);
}

#[test]
fn sft_and_kto_rows() {
    let mut d = labelled();
    let (rows, report) = run(&mut d, Format::Sft, Aggregate::None);
    let got: Vec<(Value, Value)> = rows
        .iter()
        .map(|r| (r["prompt"].clone(), r["completion"].clone()))
        .collect();
    assert_eq!(
        got,
        [
            (json!("S0"), json!("better s0")),
            (json!("S0"), json!("s0")),
            (json!("D0"), json!("a demo")),
        ]
    );
    assert_eq!(rows[2]["tags"], json!(["t", "written"]));
    assert_eq!(rows[2]["lead_time"], 60.0);
    assert_eq!(left(&report, DOWN_NO_REWRITE), 2);
    let back: Vec<Demonstration> = load_back(&rows, d._dir.path());
    assert_eq!(back.len(), 3);

    let (rows, _) = run(&mut d, Format::Kto, Aggregate::None);
    let got: Vec<(String, Value, bool)> = rows
        .iter()
        .map(|r| {
            (
                r["annotator"].as_str().unwrap().to_string(),
                r["completion"].clone(),
                r["label"].as_bool().unwrap(),
            )
        })
        .collect();
    let msg = |s: &str| json!([{"role": "assistant", "content": s}]);
    assert_eq!(
        got,
        [
            ("ann".into(), json!("B0"), true),
            ("ann".into(), json!("A0"), false),
            ("bob".into(), json!("B0"), true),
            ("bob".into(), json!("A0"), false),
            // Q1: ann's tie is left out; bob's both_bad: both undesirable.
            ("bob".into(), json!("A1"), false),
            ("bob".into(), json!("B1"), false),
            ("ann".into(), json!("A2"), true),
            ("ann".into(), json!("B2"), false),
            ("bob".into(), json!("B2"), true),
            ("bob".into(), json!("A2"), false),
            ("ann".into(), json!("better s0"), true),
            ("ann".into(), json!("s0"), false),
            ("bob".into(), json!("s0"), true),
            // A message-list prompt: its text answer written as an assistant message.
            ("ann".into(), msg("s1"), false),
            ("bob".into(), msg("s1"), false),
        ]
    );
    let back: Vec<UnpairedPreference> = load_back(&rows, d._dir.path());
    assert_eq!(back.len(), rows.len());

    // By majority: S0's thumbs tie (no row, but ann's rewrite is kept), S1 down.
    let (rows, report) = run(&mut d, Format::Kto, Aggregate::Majority);
    let singles: Vec<&Value> = rows
        .iter()
        .filter(|r| r["prompt"] != "Q0" && r["prompt"] != "Q1" && r["prompt"] != "Q2")
        .collect();
    assert_eq!(singles.len(), 2);
    assert_eq!(singles[0]["completion"], "better s0");
    assert_eq!(singles[0]["annotator"], "ann");
    assert_eq!(singles[1]["label"], false);
    assert_eq!(singles[1]["agreement"], 1.0);
    // Q0: b by both; Q1, Q2 and S0 have no majority.
    assert_eq!(rows.len() - singles.len(), 2);
    assert_eq!(left(&report, NO_MAJORITY), 3);
}

#[test]
fn labels_export_every_label_raw() {
    let mut d = labelled();
    let (rows, report) = run(&mut d, Format::Labels, Aggregate::None);
    assert_eq!(rows.len(), report.labels_read);
    assert_eq!(rows.len(), 13);
    let r = &rows[0];
    assert_eq!(
        (&r["project"], &r["kind"]),
        (&json!("pw"), &json!("pairwise"))
    );
    assert_eq!(r["candidates"], json!(["A0", "B0"]));
    let ids: Vec<i64> = rows
        .iter()
        .map(|r| r["label_id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, (1..=13).collect::<Vec<_>>());
    assert_eq!(r["label"]["choice"], "b");
    assert_eq!(r["label"]["safety"], json!(["unsafe", "safe"]));
    assert!(r["created_at"].as_str().unwrap().ends_with('Z'));
    let demo = rows.iter().find(|r| r["kind"] == "demo").unwrap();
    assert_eq!(demo["label"]["text"], "a demo");
}

#[test]
fn label_studio_export_imports_back_as_the_same_labels() {
    let mut d = labelled();
    let (rows, report) = run(&mut d, Format::LabelStudio, Aggregate::None);
    // Q0 (two annotations) and Q2 (two); Q1's tie and both_bad have no side.
    assert_eq!(rows.len(), 2);
    assert_eq!(left(&report, LS_NO_SIDE), 2);
    let t = &rows[0];
    assert_eq!(t["id"], d.pairwise[0]);
    assert_eq!(t["data"]["answer1"], "A0");
    assert_eq!(t["data"]["source"], "s0");
    assert!(t["data"].get("chosen").is_none());
    let a = &t["annotations"][0];
    assert_eq!(a["completed_by"], "ann");
    assert_eq!(a["result"][0]["value"]["selected"], "right");
    assert_eq!(a["result"][1]["value"]["choices"], json!(["Better"]));
    assert_eq!(a["lead_time"], 1.5);

    let out = d._dir.path().join("ls.json");
    write_rows(&rows, Format::LabelStudio, &out).unwrap();
    assert!(std::fs::read_to_string(&out).unwrap().starts_with('['));
    let mut back = Store::open(&d._dir.path().join("back.sqlite")).unwrap();
    let imported = import_file(
        &mut back,
        &out,
        &ImportOptions {
            project: "ls".into(),
            kind: Some(Kind::Pairwise),
            annotators_per_item: Some(2),
        },
    )
    .unwrap();
    assert_eq!((imported.items, imported.labels), (2, 4));
    let key = |l: &StoredLabel, s: &Store| {
        let item = s.item(l.item_id).unwrap().unwrap();
        let Label::Pairwise { choice, degree, .. } = &l.label else {
            panic!()
        };
        (
            item.prompt,
            l.user.trim_start_matches("labelstudio:").to_string(),
            *choice,
            *degree,
            l.lead_time_ms,
        )
    };
    let original: Vec<_> = d
        .store
        .labels(d.store.project("pw").unwrap().unwrap().id)
        .unwrap()
        .iter()
        .filter(|l| {
            matches!(
                l.label,
                Label::Pairwise {
                    choice: Choice::A | Choice::B,
                    ..
                }
            )
        })
        .map(|l| key(l, &d.store))
        .collect();
    let again: Vec<_> = back
        .labels(imported.project.id)
        .unwrap()
        .iter()
        .map(|l| key(l, &back))
        .collect();
    assert_eq!(original, again);
    // Exporting the imported project gives the same tasks' labels again.
    let (rows2, _) = export(
        &mut back,
        &ExportOptions {
            format: Format::LabelStudio,
            aggregate: Aggregate::None,
            project: Some("ls".into()),
        },
    )
    .unwrap();
    let choices = |rows: &[Value]| -> Vec<Value> {
        rows.iter()
            .flat_map(|t| t["annotations"].as_array().unwrap().clone())
            .map(|a| a["result"].clone())
            .collect()
    };
    assert_eq!(choices(&rows), choices(&rows2));
}

#[test]
fn agreement_per_kind() {
    let d = labelled();
    let s = &d.store;
    let labels = |name: &str| s.labels(s.project(name).unwrap().unwrap().id).unwrap();
    let pw = project_agreement(Kind::Pairwise, &labels("pw")).unwrap();
    assert_eq!((pw.items, pw.labels, pw.annotators), (3, 6, 2));
    assert!((pw.observed - 1.0 / 3.0).abs() < 1e-12);
    assert!(pw.cohen_kappa.is_some());
    let sg = project_agreement(Kind::Single, &labels("sg")).unwrap();
    assert!((sg.observed - 0.5).abs() < 1e-12);
    let rk = project_agreement(Kind::Rank, &labels("rk")).unwrap();
    assert_eq!((rk.items, rk.labels, rk.annotators), (1, 2, 2));
    assert!(rk.cohen_kappa.is_none() && rk.fleiss_kappa.is_none());
    // Units r0 (1, 0), r2 (0, 1), r3 (1, 3) (r1: bob only): the same values as the
    // interval alpha computes directly.
    let direct = agreement::krippendorff_alpha_interval(&[
        vec![(d.ann, 1.0), (d.bob, 0.0)],
        vec![(d.bob, 2.0)],
        vec![(d.ann, 0.0), (d.bob, 1.0)],
        vec![(d.ann, 1.0), (d.bob, 3.0)],
    ]);
    assert_eq!(rk.krippendorff_alpha, direct);
    // n = 6 values, D_o = (2 + 2 + 8) / 6 = 2, D_e = 2·6·6 / 30 = 2.4: alpha = 1/6.
    assert!((rk.krippendorff_alpha.unwrap() - 1.0 / 6.0).abs() < 1e-12);
    assert_eq!(rk.observed, 0.0);
    assert!(project_agreement(Kind::Demo, &labels("dm")).is_none());
}

#[test]
fn write_rows_replaces_the_file_whole() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("sub/out.jsonl");
    write_rows(&[json!({"a": 1}), json!({"b": 2})], Format::Sft, &out).unwrap();
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        "{\"a\":1}\n{\"b\":2}\n"
    );
    write_rows(&[json!({"c": 3})], Format::Sft, &out).unwrap();
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "{\"c\":3}\n");
    let names: Vec<_> = std::fs::read_dir(dir.path().join("sub"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["out.jsonl"], "no temporary file left");
    let e = write_rows(&[], Format::Sft, Path::new("/")).unwrap_err();
    assert!(e.to_string().contains("must be a file name"), "{e}");
}

#[test]
fn degrees_majority_prefers_the_weaker_on_ties() {
    use Degree::*;
    assert_eq!(
        most_common_degree(&[Better, SlightlyBetter]),
        Some(SlightlyBetter)
    );
    assert_eq!(
        most_common_degree(&[Better, Better, NegligiblyBetter]),
        Some(Better)
    );
    assert_eq!(most_common_degree(&[]), None);
}
