//! Human feedback to training, end to end on the tiny fixture Llama: a feedback database built
//! through the store (a pairwise, a rank, a single-answer and a demonstration project, two
//! annotators) is exported in each format and trained on by the real trainers (`reward` on
//! pairs and on rankings with ties, `sft`, `kto`), every exported row becoming a training row;
//! and `rlhf pipeline` trains a reward stage straight from the database.

mod common;

use common::shared;

use std::path::{Path, PathBuf};

use rlhf_data::{Degree, Safety};
use rlhf_feedback::export::{export, write_rows, Aggregate, ExportOptions, ExportReport, Format};
use rlhf_feedback::label::{Choice, Notes, Thumb};
use rlhf_feedback::store::NewItem;
use rlhf_feedback::{Kind, Label, Store};
use serde_json::{json, Value};

fn model() -> PathBuf {
    shared().join("models/llama-gqa")
}

fn items(prompts: &[String], answers: &[&[&str]]) -> Vec<NewItem> {
    prompts
        .iter()
        .zip(answers.iter().cycle())
        .map(|(p, a)| NewItem {
            prompt: json!(p),
            meta: json!({"tags": ["fixture"]}).as_object().cloned().unwrap(),
            candidates: a.iter().map(|t| json!(t)).collect(),
        })
        .collect()
}

fn pairwise(choice: Choice, degree: Option<Degree>, safety: Vec<Option<Safety>>) -> Label {
    Label::Pairwise {
        choice,
        degree,
        safety,
        notes: Notes::default(),
    }
}

/// A feedback database with one project of each kind, labelled by ann and bob.
fn feedback_db(path: &Path) {
    let mut s = Store::open(path).unwrap();
    let ann = s.add_user("ann", None, false).unwrap().0.id;
    let bob = s.add_user("bob", None, false).unwrap().0.id;
    let users = [ann, bob];

    // Pairwise: 6 items; ann prefers A with a degree, bob mostly agrees, with a tie, a both_bad
    // and safety labels on some.
    let p = s.ensure_project("pw", Kind::Pairwise, Some(2)).unwrap();
    let prompts: Vec<String> = (0..6).map(|i| format!("Q{i}:")).collect();
    let ids = s
        .add_items(&p, &items(&prompts, &[&[" yes", " no no"]]))
        .unwrap();
    let safe = vec![Some(Safety::Safe), Some(Safety::Unsafe)];
    for (i, &id) in ids.iter().enumerate() {
        let a = pairwise(Choice::A, Some(Degree::Better), safe.clone());
        s.submit(id, ann, &a, Some(1000 + i as i64)).unwrap();
        let b = match i {
            0 => pairwise(Choice::Tie, None, vec![]),
            1 => pairwise(Choice::BothBad, None, vec![]),
            2 => pairwise(Choice::B, Some(Degree::SlightlyBetter), vec![None, None]),
            _ => pairwise(Choice::A, Some(Degree::SignificantlyBetter), vec![]),
        };
        s.submit(id, bob, &b, None).unwrap();
    }

    // Rank: 3 items of 4 answers; ties and a partial ranking.
    let r = s.ensure_project("rk", Kind::Rank, Some(2)).unwrap();
    let prompts: Vec<String> = (0..3).map(|i| format!("R{i}:")).collect();
    let ids = s
        .add_items(&r, &items(&prompts, &[&[" a", " bb", " ccc", " dddd"]]))
        .unwrap();
    let rankings: [&[&[usize]]; 2] = [&[&[0], &[1, 2], &[3]], &[&[2], &[0]]];
    for &id in &ids {
        for (who, groups) in users.iter().zip(rankings) {
            let l = Label::Rank {
                ranking: groups.iter().map(|g| g.to_vec()).collect(),
                notes: Notes::default(),
            };
            s.submit(id, *who, &l, None).unwrap();
        }
    }

    // Single answers: 4 items; thumbs up and down, rewrites.
    let g = s.ensure_project("sg", Kind::Single, Some(2)).unwrap();
    let prompts: Vec<String> = (0..4).map(|i| format!("S{i}:")).collect();
    let ids = s.add_items(&g, &items(&prompts, &[&[" maybe"]])).unwrap();
    for (i, &id) in ids.iter().enumerate() {
        let up = Label::Single {
            thumb: Thumb::Up,
            rewrite: None,
            notes: Notes::default(),
        };
        let down = Label::Single {
            thumb: Thumb::Down,
            rewrite: (i % 2 == 0).then(|| " yes indeed".to_string()),
            notes: Notes::default(),
        };
        s.submit(id, ann, &up, None).unwrap();
        s.submit(id, bob, &down, None).unwrap();
    }

    // Demonstrations: 4 items, one per annotator each.
    let d = s.ensure_project("dm", Kind::Demo, Some(2)).unwrap();
    let prompts: Vec<String> = (0..4).map(|i| format!("D{i}:")).collect();
    let ids = s.add_items(&d, &items(&prompts, &[&[]])).unwrap();
    for &id in &ids {
        for who in users {
            let l = Label::Demo {
                text: " here it is".into(),
                notes: Notes::default(),
            };
            s.submit(id, who, &l, None).unwrap();
        }
    }
}

fn exported(db: &Path, dir: &Path, format: Format) -> (PathBuf, Vec<Value>, ExportReport) {
    let mut store = Store::open(db).unwrap();
    let (rows, report) = export(
        &mut store,
        &ExportOptions {
            format,
            aggregate: Aggregate::None,
            project: None,
        },
    )
    .unwrap();
    let out = dir.join(format!("feedback-{format}.jsonl"));
    write_rows(&rows, format, &out).unwrap();
    (out, rows, report)
}

/// A trainer config on the tiny Llama with LoRA.
fn config(dir: &Path, name: &str, data: &Path, task: &str, extra: &str) -> PathBuf {
    let text = format!(
        "model = {:?}\ntrain_file = {data:?}\noutput_dir = {:?}\nmax_steps = 3\n\
         per_device_train_batch_size = 4\nlearning_rate = 1e-3\nlr_scheduler_type = \"constant\"\n\
         logging_steps = 1\nsave_steps = 0\nreport_to = [\"jsonl\"]\nseed = 5\n{extra}\n\
         [lora]\nr = 4\nlora_alpha = 8\ntarget_modules = \"all-linear\"\ntask_type = {task:?}\n",
        model(),
        dir.join(name)
    );
    let p = dir.join(format!("{name}.toml"));
    std::fs::write(&p, text).unwrap();
    p
}

/// The run's loss is finite, and it logged a loss at each of its `steps` steps.
fn trained(summary: &rlhf_train::trainer::Summary, out: &Path, steps: usize) {
    let loss = summary["train_loss"];
    assert!(
        loss.is_finite() && loss > 0.0,
        "{}: train_loss {loss}",
        out.display()
    );
    let logged = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|r| {
            r.get("loss")
                .is_some_and(|l| l.as_f64().is_some_and(f64::is_finite))
        })
        .count();
    assert_eq!(logged, steps, "{}: steps with a finite loss", out.display());
}

#[test]
fn every_export_format_trains_with_its_trainer() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let db = dir.join("feedback.sqlite");
    feedback_db(&db);
    let tok = rlhf_model::tokenizer::Tokenizer::from_dir(&model()).unwrap();

    // Pairs: pairwise a/b (ann 6, bob 4: his tie and both_bad give none), each rank label's
    // cross-group pairs (ann 1×2 + 1×1 + 2×1 = 5, bob 1 per item), rewrites (2).
    let (pairs, rows, report) = exported(&db, dir, Format::Pairs);
    assert_eq!(rows.len(), 10 + 3 * (5 + 1) + 2, "{report}");
    assert_eq!(report.labels_read, 12 + 6 + 8);
    let degrees = rows.iter().filter(|r| r.get("degree").is_some()).count();
    assert_eq!(degrees, 10);
    let safety = rows.iter().filter(|r| r.get("safety").is_some()).count();
    assert_eq!(safety, 6, "only ann judged both answers' safety");
    let cfg = config(dir, "reward-pairs", &pairs, "SEQ_CLS", "");
    let c = rlhf_train::reward::RewardConfig::load(&cfg, &[]).unwrap();
    let groups = rlhf_train::reward::load_groups(&pairs, &tok, &c.args, &c.reward).unwrap();
    assert_eq!(groups.len(), rows.len(), "every exported pair trains");
    let summary = rlhf_train::reward::run(&cfg, &[], None).unwrap();
    trained(&summary, &dir.join("reward-pairs"), 3);

    // Rankings with ties and a partial ranking (bob's ranks 2 of 4 answers), and pairwise a/b
    // as rankings of two.
    let (rankings, rows, _) = exported(&db, dir, Format::Rankings);
    assert_eq!(rows.len(), 10 + 6);
    let ann_rank = rows
        .iter()
        .find(|r| r["prompt"] == "R0:" && r["annotator"] == "ann")
        .unwrap();
    assert_eq!(ann_rank["ranking"], json!([[0], [1, 2], [3]]));
    let bob_rank = rows
        .iter()
        .find(|r| r["prompt"] == "R0:" && r["annotator"] == "bob")
        .unwrap();
    assert_eq!(bob_rank["responses"], json!([" a", " ccc"]));
    assert_eq!(bob_rank["ranking"], json!([1, 0]));
    let cfg = config(dir, "reward-rankings", &rankings, "SEQ_CLS", "");
    let c = rlhf_train::reward::RewardConfig::load(&cfg, &[]).unwrap();
    let groups = rlhf_train::reward::load_groups(&rankings, &tok, &c.args, &c.reward).unwrap();
    assert_eq!(groups.len(), rows.len(), "every exported ranking trains");
    let pairs_in_groups: usize = groups.iter().map(|g| g.pairs.len()).sum();
    assert_eq!(pairs_in_groups, 10 + 3 * (5 + 1), "ties give no pair");
    let summary = rlhf_train::reward::run(&cfg, &[], None).unwrap();
    trained(&summary, &dir.join("reward-rankings"), 3);

    // SFT: 8 demonstrations, 4 thumbs-up answers, 2 rewrites.
    let (sft, rows, _) = exported(&db, dir, Format::Sft);
    assert_eq!(rows.len(), 8 + 4 + 2);
    let cfg = config(dir, "sft", &sft, "CAUSAL_LM", "");
    let c = rlhf_train::sft::SftConfig::load(&cfg, &[]).unwrap();
    let examples = rlhf_train::sft::load_examples(&sft, &tok, &c.args, &c.sft).unwrap();
    assert_eq!(
        examples.len(),
        rows.len(),
        "every exported demonstration trains"
    );
    let summary = rlhf_train::sft::run(&cfg, &[], None).unwrap();
    trained(&summary, &dir.join("sft"), 3);

    // KTO: pairwise a/b as a desirable and an undesirable row (10 × 2), both_bad as two
    // undesirable rows, the tie left out; 8 thumbs and 2 rewrites.
    let (kto, rows, report) = exported(&db, dir, Format::Kto);
    assert_eq!(rows.len(), 20 + 2 + 8 + 2, "{report}");
    assert_eq!(
        report.left_out,
        [("tie (no answer preferred)".to_string(), 1)]
    );
    let desirable = rows.iter().filter(|r| r["label"] == true).count();
    assert_eq!(desirable, 10 + 4 + 2);
    let cfg = config(dir, "kto", &kto, "CAUSAL_LM", "");
    let c = rlhf_train::kto::KtoConfig::load(&cfg, &[]).unwrap();
    let kto_rows = rlhf_train::kto::load_rows(&kto, &tok, &c.args, &c.kto).unwrap();
    assert_eq!(kto_rows.len(), rows.len(), "every exported KTO row trains");
    let summary = rlhf_train::kto::run(&cfg, &[], None).unwrap();
    trained(&summary, &dir.join("kto"), 3);

    // By majority the pairs are one per agreeing item (Q3-Q5 with a; Q0-Q2 split) and one
    // Borda ranking per rank item, plus the rewrites: they train too.
    let mut store = Store::open(&db).unwrap();
    let (rows, report) = export(
        &mut store,
        &ExportOptions {
            format: Format::Pairs,
            aggregate: Aggregate::Majority,
            project: Some("pw".into()),
        },
    )
    .unwrap();
    assert_eq!(rows.len(), 3, "{report}");
    assert!(rows.iter().all(|r| r["agreement"] == 1.0));
    // Ann "better", bob "significantly better": the weaker of the tied degrees.
    assert!(rows.iter().all(|r| r["degree"] == "better"));
}

/// `rlhf pipeline` with a reward stage whose train_file is the feedback database: the stage
/// exports it into its output directory and trains on that file.
#[test]
fn a_pipeline_stage_trains_from_a_feedback_database() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    feedback_db(&d.join("labels.sqlite"));
    let cfg = format!(
        "model = {model:?}\noutput_dir = \"out\"\nseed = 1\nlogging_steps = 1\n\
         report_to = [\"jsonl\"]\n\
         [reward]\ntrain_file = \"labels.sqlite\"\nfeedback_project = \"pw\"\n\
         feedback_aggregate = \"majority\"\nmax_steps = 2\nper_device_train_batch_size = 2\n\
         save_steps = 1\n\
         [reward.lora]\nr = 4\nlora_alpha = 8\ntask_type = \"SEQ_CLS\"\n",
        model = model(),
    );
    let path = d.join("pipeline.toml");
    std::fs::write(&path, &cfg).unwrap();
    let done = rlhf_train::pipeline::run(&path, &[], false).unwrap();
    trained(&done["reward"], &d.join("out/reward"), 2);
    let out = d.join("out");
    let export = out.join("reward/feedback-pairs.jsonl");
    let rows: Vec<Value> = std::fs::read_to_string(&export)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 3, "the majority pairs of project pw");
    // The stage's config names the exported file and none of the feedback keys.
    let stage: toml::Table = std::fs::read_to_string(out.join("reward.toml"))
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(
        stage["train_file"].as_str().unwrap(),
        export.to_string_lossy()
    );
    assert!(!stage.contains_key("feedback_project") && !stage.contains_key("feedback_aggregate"));

    // Settings are checked before anything runs, naming the stage and key (into another
    // output_dir: `out` holds the run above, which a fresh run may not overwrite).
    let fresh = cfg.replace("output_dir = \"out\"", "output_dir = \"bad-out\"");
    let bad = fresh.replace("\"majority\"", "\"mean\"");
    std::fs::write(&path, bad).unwrap();
    let e = rlhf_train::pipeline::run(&path, &[], false)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("[reward] feedback_aggregate") && e.contains("use none"),
        "{e}"
    );
    let bad = fresh.replace("\"pw\"", "\"dm\"");
    std::fs::write(&path, bad).unwrap();
    let e = rlhf_train::pipeline::run(&path, &[], false)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("labels.sqlite") && e.contains("use --format sft"),
        "{e}"
    );
    let bad = fresh.replace("\"labels.sqlite\"", "\"prefs.jsonl\"");
    std::fs::write(&path, bad).unwrap();
    let e = rlhf_train::pipeline::run(&path, &[], false)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("[reward] feedback_project: is for a stage whose train_file is a feedback"),
        "{e}"
    );
    let bad = fresh.replace("\"labels.sqlite\"", "\"missing.db\"");
    std::fs::write(&path, bad).unwrap();
    let e = rlhf_train::pipeline::run(&path, &[], false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing.db: no such feedback database"), "{e}");
}
