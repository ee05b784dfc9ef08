//! The report in a real browser: headless Chromium opens report.html from disk with the
//! network switched off, every plot decodes (the page's own script counts them into
//! `data-plots`), a `<script>` inside a prompt stays text, and a screenshot is kept under the
//! target dir for a person to look at.
//!
//! Needs Debian's `chromium` (`apt-get install chromium chromium-driver`, which
//! `scripts/test.sh` does); without it this test fails rather than passing unseen.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

fn chromium() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for name in ["chromium", "chromium-browser"] {
        if let Some(p) = std::env::split_paths(&path)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
        {
            return p;
        }
    }
    panic!(
        "chromium is not installed, so the report cannot be checked in a browser: run \
         `apt-get install chromium chromium-driver` (or scripts/test.sh, which installs them)"
    );
}

/// Runs headless Chromium on `url` with `args`, no network, a fresh profile; returns stdout.
fn run_chromium(url: &str, args: &[String], tmp: &Path) -> String {
    let profile = tempfile::tempdir_in(tmp).unwrap();
    let out = tmp.join("chromium.stdout");
    let err = tmp.join("chromium.stderr");
    let mut child = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .arg(url)
        .stdin(Stdio::null())
        // Files, not pipes: the DOM of a page with inlined PNGs is megabytes, and a full
        // pipe would stall Chromium while we wait for it.
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .expect("start chromium");
    let deadline = Instant::now() + Duration::from_secs(90);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium {args:?} did not finish in 90 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let stderr = std::fs::read_to_string(&err).unwrap_or_default();
    assert!(
        status.success(),
        "chromium {args:?} failed ({status}):\n{stderr}"
    );
    std::fs::read_to_string(&out).unwrap()
}

fn write_jsonl(path: &Path, rows: &[serde_json::Value]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(path, text).unwrap();
}

const PAYLOAD: &str = "<script>document.body.dataset.pwned = 'script'</script>";

/// A pipeline output dir: reward and PPO metrics, eval.json with two scorers and a pairwise
/// judge, gold_proxy.jsonl.
fn synthetic_run(dir: &Path) {
    let mut reward: Vec<_> = (1..=12)
        .map(|s| {
            let mut r = json!({"step": s, "loss": 0.7 - 0.03 * s as f64, "learning_rate": 1e-5,
                               "epoch": s as f64 / 12.0});
            if s % 4 == 0 {
                r["eval_loss"] = json!(0.72 - 0.025 * s as f64);
                r["eval_accuracy"] = json!(0.5 + 0.03 * s as f64);
            }
            r
        })
        .collect();
    reward.push(json!({"step": 12, "train_runtime": 9.5, "train_loss": 0.52}));
    write_jsonl(&dir.join("reward/metrics.jsonl"), &reward);
    let mut ppo: Vec<_> = (1..=20)
        .map(|s| {
            let s = s as f64;
            json!({"step": s, "objective/kl": 0.05 * s, "objective/scores": 0.1 * s,
                   "objective/rlhf_reward": 0.1 * s - 0.005 * s, "learning_rate": 1e-6})
        })
        .collect();
    ppo.push(json!({"step": 20, "train_runtime": 30.0}));
    write_jsonl(&dir.join("ppo/metrics.jsonl"), &ppo);
    let rows: Vec<_> = (0..8)
        .map(|i| {
            let prompt = if i == 0 {
                format!("Question: what does {PAYLOAD} do?\nAnswer:")
            } else {
                format!("Question: name {i} fruits.\nAnswer:")
            };
            json!({"prompt": prompt,
                   "policy": format!(" {i} apples <img src=x onerror=\"document.body.dataset.pwned='img'\">"),
                   "baseline": " apples",
                   "scores": {"gold": {"policy": (i % 2) as f64, "baseline": 0.0},
                              "proxy": {"policy": 1.0 + i as f64 * 0.2, "baseline": 0.5}},
                   "verdicts": {"gold": if i % 2 == 1 { "policy" } else { "tie" },
                                "proxy": "policy", "judge_model": "baseline"}})
        })
        .collect();
    let judge = |kind: &str| {
        let mut j = json!({"kind": kind, "win_rate": 0.71, "standard_error": 0.05, "n_wins": 5,
                           "n_wins_base": 1, "n_draws": 2, "n_total": 8, "avg_length": 20.5,
                           "length_controlled_winrate": 0.69, "llama2_win_rate": 0.77});
        if kind == "scorer" {
            for (k, v) in [
                ("policy_mean", 0.8),
                ("policy_median", 1.0),
                ("baseline_mean", 0.3),
                ("baseline_median", 0.0),
            ] {
                j[k] = json!(v);
            }
        }
        j
    };
    let eval = json!({"policy": "/runs/x/ppo", "baseline": "/runs/x/sft", "n_prompts": 8,
                      "judges": {"gold": judge("scorer"), "proxy": judge("scorer"),
                                 "judge_model": judge("pairwise")},
                      "kl": {"k1": 1.23, "k3": 0.98, "samples": 128}, "rows": rows});
    std::fs::create_dir_all(dir.join("eval")).unwrap();
    std::fs::write(dir.join("eval/eval.json"), eval.to_string()).unwrap();
    let gp: Vec<_> = [(0, 0.0, 0.1, 0.1), (10, 0.5, 0.9, 0.4), (20, 1.2, 1.4, 0.3)]
        .iter()
        .map(|&(step, kl, proxy, gold)| {
            json!({"checkpoint": format!("checkpoint-{step}"), "step": step, "kl_k1": kl,
                   "kl_k3": kl * 0.8, "proxy": proxy, "gold": gold})
        })
        .collect();
    write_jsonl(&dir.join("eval/gold_proxy.jsonl"), &gp);
}

#[test]
fn report_renders_in_chromium() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("pipeline");
    synthetic_run(&run);
    let out = tmp.path().join("report");
    let page = rlhf_report::write_report(&run, &out).unwrap();
    let pngs = std::fs::read_dir(&out)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "png")
        })
        .count();
    // reward: loss, eval_loss, eval_accuracy, learning_rate; ppo: 4 curves; 2 eval
    // histograms; gold/proxy.
    assert_eq!(pngs, 11);
    let url = format!("file://{}", page.canonicalize().unwrap().display());

    let dom = run_chromium(&url, &["--dump-dom".into()], tmp.path());
    let plots = dom
        .split("data-plots=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .unwrap_or_else(|| panic!("the page's script did not set data-plots on <body>"));
    assert_eq!(
        plots,
        format!("{pngs}/{pngs}"),
        "plots decoded / plots on the page"
    );
    // The payloads stayed text: nothing set data-pwned, and the only script is the page's.
    assert!(!dom.contains("data-pwned"), "a payload ran");
    assert_eq!(dom.matches("<script").count(), 1);
    assert!(dom.contains("&lt;script&gt;document.body.dataset.pwned"));
    assert_eq!(dom.matches("<img").count(), pngs);

    let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("report.png");
    let _ = std::fs::remove_file(&shot);
    run_chromium(
        &url,
        &[
            format!("--screenshot={}", shot.display()),
            "--window-size=1280,2400".into(),
        ],
        tmp.path(),
    );
    let png = std::fs::read(&shot).expect("chromium wrote no screenshot");
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let dim = |at: usize| u32::from_be_bytes(png[at..at + 4].try_into().unwrap());
    assert_eq!((dim(16), dim(20)), (1280, 2400), "screenshot size");
    println!("screenshot of the report: {}", shot.display());
}
