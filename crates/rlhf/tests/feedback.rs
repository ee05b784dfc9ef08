//! `rlhf feedback` end to end with the real binary: `kill -9` of the server under load loses no
//! acknowledged label; an annotator in headless Chromium (driven over WebDriver by
//! chromedriver) labels a pair, ranks four answers and gives a thumbs-down with a rewrite using
//! the keyboard, and the export trains a reward model on a tiny fixture.
//!
//! Needs Debian's `chromium` and `chromium-driver` (scripts/test.sh installs them); without
//! them the browser test fails rather than passing unseen.

#[path = "../../rlhf-feedback/tests/client/mod.rs"]
mod client;

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use client::Client;
use fantoccini::{ClientBuilder, Locator};
use rlhf_feedback::label::{Choice, Label, Thumb};
use rlhf_feedback::store::{NewItem, Store};
use rlhf_feedback::Kind;
use serde_json::{json, Map, Value};

const PASSWORD: &str = "correct horse battery";

fn fixtures() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../../shared/fixtures/models"
    ))
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `rlhf feedback serve` on a free port; returns the child and its base URL once it answers.
fn serve(db: &Path, log: &Path) -> (Child, String) {
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_rlhf"))
        .args(["feedback", "serve", "--db"])
        .arg(db)
        .args(["--bind", &format!("127.0.0.1:{port}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut probe = Client::new(&base);
    while probe.try_get("/login").is_err() {
        assert!(
            Instant::now() < deadline,
            "the server did not come up: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (child, base)
}

fn items(n: usize, answers: usize) -> Vec<NewItem> {
    (0..n)
        .map(|i| NewItem {
            prompt: json!(format!("Question {i}: what is {i} plus {i}?")),
            meta: Map::new(),
            candidates: (0..answers)
                .map(|j| Value::from(format!("Answer {j}: {}", i + i + j)))
                .collect(),
        })
        .collect()
}

#[test]
fn kill_9_under_load_loses_no_acknowledged_label() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("feedback.sqlite");
    let mut store = Store::open(&db).unwrap();
    let names: Vec<String> = (0..10).map(|i| format!("a{i}")).collect();
    for n in &names {
        store.add_user(n, Some(PASSWORD), false).unwrap();
    }
    let p = store.ensure_project("p", Kind::Pairwise, Some(1)).unwrap();
    store.add_items(&p, &items(2000, 2)).unwrap();
    drop(store);
    let log = tmp.path().join("serve.log");
    let (mut child, base) = serve(&db, &log);

    let acked_total = Arc::new(AtomicUsize::new(0));
    let ready = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = names
        .iter()
        .map(|name| {
            let (base, name, pid) = (base.clone(), name.clone(), p.id);
            let (acked_total, ready) = (acked_total.clone(), ready.clone());
            std::thread::spawn(move || {
                let mut c = Client::new(&base);
                assert_eq!(c.login(&name, PASSWORD).status, 303);
                let csrf = c.csrf();
                ready.fetch_add(1, Ordering::SeqCst);
                let mut acked = Vec::new();
                // Until the server dies: every 303 is an acknowledged label.
                while let Ok(r) = c.try_get(&format!("/p/{pid}")) {
                    let Some(item) = r.location else { break };
                    match c.try_post(&item, &[("csrf", &csrf), ("choice", "b")]) {
                        Ok(r) if r.status == 303 => {
                            let id: i64 = item.rsplit('/').next().unwrap().parse().unwrap();
                            acked.push((name.clone(), id));
                            acked_total.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(r) => panic!("status {}: {}", r.status, r.body),
                        Err(_) => break,
                    }
                }
                acked
            })
        })
        .collect();
    // Kill while submissions are in flight, once a good number have landed.
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked_total.load(Ordering::SeqCst) < 300 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(ready.load(Ordering::SeqCst), names.len());
    child.kill().unwrap(); // SIGKILL, while the annotators keep submitting
    child.wait().unwrap();
    let acked: Vec<(String, i64)> = workers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    assert!(acked.len() >= 300, "{} acknowledged", acked.len());

    // Restart: every acknowledged label is there, once, and labelling goes on.
    let (mut child, base) = serve(&db, &log);
    let store = Store::open(&db).unwrap();
    let labels = store.labels(p.id).unwrap();
    let stored: BTreeSet<(String, i64)> =
        labels.iter().map(|l| (l.user.clone(), l.item_id)).collect();
    assert_eq!(stored.len(), labels.len(), "a label was doubled");
    for a in &acked {
        assert!(stored.contains(a), "acknowledged label {a:?} was lost");
    }
    // At most the requests in flight at the kill (one per annotator) landed unacknowledged.
    assert!(labels.len() <= acked.len() + names.len());
    let mut c = Client::new(&base);
    assert_eq!(c.login("a0", PASSWORD).status, 303);
    let csrf = c.csrf();
    let item = c.get(&format!("/p/{}", p.id)).location.unwrap();
    assert_eq!(
        c.post(&item, &[("csrf", &csrf), ("choice", "a")]).status,
        303
    );
    child.kill().unwrap();
    child.wait().unwrap();
}

/// chromedriver on a free port, killed when dropped.
struct Driver {
    child: Child,
    url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn chromedriver(log: &Path) -> Driver {
    let exe = ["chromedriver", "/usr/lib/chromium/chromedriver"]
        .into_iter()
        .find(|e| {
            Command::new(e)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .expect(
            "chromedriver is not installed, so the labelling app cannot be tested in a \
             browser: run `apt-get install chromium chromium-driver` (scripts/test.sh does)",
        );
    let port = free_port();
    let child = Command::new(exe)
        .arg(format!("--port={port}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let mut probe = Client::new(&url);
    let deadline = Instant::now() + Duration::from_secs(30);
    while probe.try_get("/status").is_err() {
        assert!(Instant::now() < deadline, "chromedriver did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    Driver { child, url }
}

fn rlhf(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_rlhf"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn an_annotator_labels_with_the_keyboard_in_chromium_and_the_export_trains() {
    let tmp = tempfile::tempdir().unwrap();
    let shots = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("feedback-browser");
    std::fs::create_dir_all(&shots).unwrap();
    let db = tmp.path().join("feedback.sqlite");
    let mut store = Store::open(&db).unwrap();
    store.add_user("ann", Some(PASSWORD), false).unwrap();
    let pw = store.ensure_project("pairs", Kind::Pairwise, None).unwrap();
    let mut long = items(1, 2);
    // A long answer, to see it wrap on a phone-sized screen.
    long[0].candidates[1] = Value::from(
        "A long answer that goes on. ".repeat(40)
            + "https://example.invalid/averyveryveryveryveryveryveryveryverylongword",
    );
    store.add_items(&pw, &long).unwrap();
    let rk = store.ensure_project("ranks", Kind::Rank, None).unwrap();
    store.add_items(&rk, &items(1, 4)).unwrap();
    let sg = store.ensure_project("single", Kind::Single, None).unwrap();
    store.add_items(&sg, &items(1, 1)).unwrap();
    drop(store);
    let (mut server, base) = serve(&db, &tmp.path().join("serve.log"));
    let driver = chromedriver(&tmp.path().join("chromedriver.log"));

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let resources = rt.block_on(async {
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": "/usr/bin/chromium",
                "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                         "--no-first-run", "--disable-background-networking",
                         "--disable-component-update", "--disable-sync",
                         "--window-size=1200,900"]
            }),
        );
        let b = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&driver.url)
            .await
            .expect("a chromium session through chromedriver");
        let shot = |name: &'static str| {
            let b = b.clone();
            let shots = shots.clone();
            async move {
                let png = b.screenshot().await.unwrap();
                std::fs::write(shots.join(format!("{name}.png")), png).unwrap();
            }
        };
        let keys = |k: &'static str| {
            let b = b.clone();
            async move {
                b.find(Locator::Css("body"))
                    .await
                    .unwrap()
                    .send_keys(k)
                    .await
                    .unwrap();
            }
        };
        let wait_text = |text: &'static str| {
            let b = b.clone();
            async move {
                let deadline = Instant::now() + Duration::from_secs(20);
                loop {
                    let src = b.source().await.unwrap();
                    if src.contains(text) {
                        return;
                    }
                    assert!(
                        Instant::now() < deadline,
                        "page never showed {text:?}:\n{src}"
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        let enter = "\u{e007}";
        let escape = "\u{e00c}";

        // Sign in.
        b.goto(&format!("{base}/login")).await.unwrap();
        b.find(Locator::Css("#name"))
            .await
            .unwrap()
            .send_keys("ann")
            .await
            .unwrap();
        b.find(Locator::Css("#password"))
            .await
            .unwrap()
            .send_keys(PASSWORD)
            .await
            .unwrap();
        b.find(Locator::Css("#signin"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        wait_text("Projects").await;
        shot("1-projects").await;

        // A pair: B is better, by "better"; B's safety cycled to unsafe; Enter saves.
        b.goto(&format!("{base}/p/{}", pw.id)).await.unwrap();
        wait_text("Which is better?").await;
        keys("b").await;
        keys("2").await;
        keys("c").await;
        keys("c").await;
        shot("2-pairwise").await;
        // On a phone-sized screen the long answer wraps: nothing scrolls sideways.
        b.set_window_size(390, 844).await.unwrap();
        let overflow = b
            .execute(
                "return document.documentElement.scrollWidth - window.innerWidth;",
                vec![],
            )
            .await
            .unwrap();
        shot("2-pairwise-phone").await;
        assert!(
            overflow.as_f64().unwrap() <= 0.0,
            "sideways scroll of {overflow} px"
        );
        b.set_window_size(1200, 900).await.unwrap();
        keys(enter).await;
        wait_text("All done").await;

        // Four answers ranked: 3, then 1 tied with 4, then 2.
        b.goto(&format!("{base}/p/{}", rk.id)).await.unwrap();
        wait_text("Press answer numbers").await;
        for k in ["3", "1", "=", "4", "2"] {
            keys(k).await;
        }
        let order = b
            .find(Locator::Css("#rank-order"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert_eq!(order, "Order: 3 > 1 = 4 > 2");
        shot("3-rank").await;
        keys(enter).await;
        wait_text("All done").await;

        // A thumbs-down with a rewrite.
        b.goto(&format!("{base}/p/{}", sg.id)).await.unwrap();
        wait_text("Is this answer acceptable?").await;
        keys("d").await;
        keys("r").await;
        b.find(Locator::Css("#rewrite"))
            .await
            .unwrap()
            .send_keys("Zero plus zero is 0.")
            .await
            .unwrap();
        shot("4-single").await;
        b.find(Locator::Css("#rewrite"))
            .await
            .unwrap()
            .send_keys(escape)
            .await
            .unwrap();
        keys(enter).await;
        wait_text("All done").await;

        // Every resource the pages loaded came from this server.
        b.goto(&format!("{base}/p/{}/mine", pw.id)).await.unwrap();
        let res = b
            .execute(
                "return performance.getEntriesByType('resource').map(e => e.name)\
                 .concat([location.href]);",
                vec![],
            )
            .await
            .unwrap();
        shot("5-mine").await;
        b.close().await.unwrap();
        res
    });
    for r in resources.as_array().unwrap() {
        assert!(
            r.as_str().unwrap().starts_with(&base),
            "outside request: {r}"
        );
    }

    let store = Store::open(&db).unwrap();
    match &store.labels(pw.id).unwrap()[..] {
        [l] => match &l.label {
            Label::Pairwise {
                choice,
                degree,
                safety,
                ..
            } => {
                assert_eq!(*choice, Choice::B);
                assert_eq!(*degree, Some(rlhf_data::Degree::Better));
                assert_eq!(safety, &vec![None, Some(rlhf_data::Safety::Unsafe)]);
                assert!(
                    l.lead_time_ms.is_some_and(|t| t > 0),
                    "{:?}",
                    l.lead_time_ms
                );
            }
            other => panic!("{other:?}"),
        },
        other => panic!("{other:?}"),
    }
    match &store.labels(rk.id).unwrap()[0].label {
        Label::Rank { ranking, .. } => assert_eq!(ranking, &vec![vec![2], vec![0, 3], vec![1]]),
        other => panic!("{other:?}"),
    }
    match &store.labels(sg.id).unwrap()[0].label {
        Label::Single { thumb, rewrite, .. } => {
            assert_eq!(*thumb, Thumb::Down);
            assert_eq!(rewrite.as_deref(), Some("Zero plus zero is 0."));
        }
        other => panic!("{other:?}"),
    }
    server.kill().unwrap();
    server.wait().unwrap();

    // The export trains a reward model: 1 pair + 5 from the ranking + 1 from the rewrite.
    let pairs = tmp.path().join("pairs.jsonl");
    let (ok, _, stderr) = rlhf(&[
        "feedback",
        "export",
        "--db",
        db.to_str().unwrap(),
        "--format",
        "pairs",
        "--output",
        pairs.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    let rows = std::fs::read_to_string(&pairs).unwrap();
    assert_eq!(rows.lines().count(), 7, "{rows}");
    let cfg = tmp.path().join("reward.toml");
    std::fs::write(
        &cfg,
        format!(
            "model = {:?}\ntrain_file = \"pairs.jsonl\"\noutput_dir = \"rm\"\nmax_steps = 3\n\
             per_device_train_batch_size = 2\nlearning_rate = 1e-3\nreport_to = [\"jsonl\"]\n",
            fixtures().join("llama-gqa")
        ),
    )
    .unwrap();
    let (ok, stdout, stderr) = rlhf(&["reward", "--config", cfg.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    let summary: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert!(
        summary["train_loss"].as_f64().unwrap().is_finite(),
        "{summary}"
    );
    assert!(tmp.path().join("rm").exists());
}

#[test]
fn import_generate_users_and_label_studio_round_trip_through_the_cli() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let db = d.join("f.sqlite");
    let db_s = db.to_str().unwrap();
    // Prompts only: answers come from the model.
    std::fs::write(
        d.join("prompts.jsonl"),
        "{\"prompt\": \"What is 2 plus 2?\", \"tags\": [\"math\"]}\n{\"prompt\": \"Name a colour.\"}\n",
    )
    .unwrap();
    let (ok, _, stderr) = rlhf(&[
        "feedback",
        "import",
        "--db",
        db_s,
        "--project",
        "gen",
        "--kind",
        "pairwise",
        "--annotators-per-item",
        "2",
        d.join("prompts.jsonl").to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    assert!(stderr.contains("2 item(s) have no answers yet"), "{stderr}");
    let model = fixtures().join("llama-gqa");
    let (ok, _, stderr) = rlhf(&[
        "feedback",
        "generate",
        "--db",
        db_s,
        "--project",
        "gen",
        "--model",
        model.to_str().unwrap(),
        "--max-new-tokens",
        "6",
    ]);
    assert!(ok, "{stderr}");
    let store = Store::open(&db).unwrap();
    let p = store.project("gen").unwrap().unwrap();
    assert_eq!(p.annotators_per_item, 2);
    for id in store.item_ids(p.id).unwrap() {
        let item = store.item(id).unwrap().unwrap();
        assert_eq!(item.candidates.len(), 2);
        assert!(item.candidates[0].origin.starts_with("generate:"));
    }
    assert_eq!(
        store
            .item(store.item_ids(p.id).unwrap()[0])
            .unwrap()
            .unwrap()
            .meta["tags"],
        json!(["math"])
    );
    // A second run has nothing left to do.
    let (ok, _, stderr) = rlhf(&[
        "feedback",
        "generate",
        "--db",
        db_s,
        "--project",
        "gen",
        "--model",
        model.to_str().unwrap(),
    ]);
    assert!(ok && stderr.contains("has answers already"), "{stderr}");

    // The notebooks' Label Studio task list, then an account from the CLI.
    std::fs::write(
        d.join("tasks.json"),
        r#"[{"prompt": "Capital of France?", "answer1": "Paris.", "answer2": "Lyon."},
            {"prompt": "2+2?", "answer1": "5", "answer2": "4"}]"#,
    )
    .unwrap();
    let (ok, _, stderr) = rlhf(&[
        "feedback",
        "import",
        "--db",
        db_s,
        "--project",
        "ls",
        d.join("tasks.json").to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    assert!(
        stderr.contains("2 item(s)") && stderr.contains("pairwise"),
        "{stderr}"
    );
    let (ok, stdout, stderr) = rlhf(&["feedback", "user", "add", "--db", db_s, "bea"]);
    assert!(ok, "{stderr}");
    let token = stdout.trim().to_string();
    assert_eq!(token.len(), 64);
    let mut store = Store::open(&db).unwrap();
    let bea = store
        .login_token(&token)
        .unwrap()
        .expect("the printed token logs in");
    let ls = store.project("ls").unwrap().unwrap();
    let ids = store.item_ids(ls.id).unwrap();
    let pick = |choice| Label::Pairwise {
        choice,
        degree: Some(rlhf_data::Degree::SignificantlyBetter),
        safety: vec![],
        notes: Default::default(),
    };
    store
        .submit(ids[0], bea.id, &pick(Choice::A), Some(2500))
        .unwrap();
    store
        .submit(ids[1], bea.id, &pick(Choice::B), None)
        .unwrap();
    drop(store);
    // Export as Label Studio, import that into a new project: the same choices come back.
    let out = d.join("ls-export.json");
    let (ok, _, stderr) = rlhf(&[
        "feedback",
        "export",
        "--db",
        db_s,
        "--project",
        "ls",
        "--format",
        "labelstudio",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    let exported: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(exported.as_array().unwrap().len(), 2);
    assert_eq!(
        exported[0]["annotations"][0]["result"][0]["value"]["selected"],
        json!("left")
    );
    let (ok, _, stderr) = rlhf(&[
        "feedback",
        "import",
        "--db",
        db_s,
        "--project",
        "ls-again",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    assert!(stderr.contains("2 label(s)"), "{stderr}");
    let store = Store::open(&db).unwrap();
    let again = store.project("ls-again").unwrap().unwrap();
    let labels = store.labels(again.id).unwrap();
    let choices: Vec<_> = labels
        .iter()
        .map(|l| match &l.label {
            Label::Pairwise { choice, degree, .. } => (*choice, *degree),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        choices,
        vec![
            (Choice::A, Some(rlhf_data::Degree::SignificantlyBetter)),
            (Choice::B, Some(rlhf_data::Degree::SignificantlyBetter))
        ]
    );
    assert_eq!(labels[0].lead_time_ms, Some(2500));

    // Bad input names the file and the row.
    std::fs::write(
        d.join("bad.jsonl"),
        "{\"prompt\": \"ok\"}\n{\"chosen\": \"x\"}\n",
    )
    .unwrap();
    let (ok, _, stderr) = rlhf(&[
        "feedback",
        "import",
        "--db",
        db_s,
        "--project",
        "bad",
        d.join("bad.jsonl").to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(
        stderr.contains("bad.jsonl:2: has no \"prompt\""),
        "{stderr}"
    );
    let (ok, _, stderr) = rlhf(&[
        "feedback", "export", "--db", db_s, "--format", "csv", "--output", "x",
    ]);
    assert!(!ok && stderr.contains("unknown export format"), "{stderr}");
}
