//! Reward programs: small `sh` and `python3` scripts written by each test answer (or fail to
//! answer) JSON-line rows; errors must name the row (file:line) and the failure. Then PPO
//! with a reward program alone, and weighted beside a reward model.

mod common;

use common::shared;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rlhf_data::{PromptRecord, ReadOptions};
use rlhf_train::program::RewardProgram;
use rlhf_train::scoring::{Completions, Scorer};

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn argv(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// Four prompt rows on lines 1, 3, 4 and 5 (line 2 is blank), each with an `answer` field.
fn records(dir: &Path) -> Vec<PromptRecord> {
    let p = write(
        dir,
        "prompts.jsonl",
        "{\"prompt\": \"2+2=\", \"answer\": \"4\"}\n\n\
         {\"prompt\": \"3+3=\", \"answer\": \"6\", \"tags\": [\"math\"]}\n\
         {\"messages\": [{\"role\": \"user\", \"content\": \"1+1?\"}], \"answer\": \"2\"}\n\
         {\"prompt\": \"5+5=\", \"answer\": \"10\"}\n",
    );
    rlhf_data::load::<PromptRecord>(&p, &ReadOptions::default())
        .unwrap()
        .records
}

/// What a scorer pushes beside its scores.
type Metrics = Vec<(String, f64)>;

/// Scores `texts` (one per record) through the `Scorer` interface.
fn score(
    program: &mut RewardProgram,
    recs: &[PromptRecord],
    texts: &[&str],
) -> rlhf_train::Result<(Vec<f32>, Metrics)> {
    let prompts: Vec<&PromptRecord> = recs.iter().collect();
    let texts: Vec<String> = texts.iter().map(|s| s.to_string()).collect();
    let ids = vec![Vec::new(); texts.len()];
    let mut metrics = Vec::new();
    let s = program.score(
        &Completions {
            prompts: &prompts,
            texts: &texts,
            ids: &ids,
            source: None,
        },
        &mut metrics,
    )?;
    Ok((s, metrics))
}

/// score = len(completion) + 100 if it equals the row's `answer`; logs its pid per row and
/// writes `closed` when its stdin ends.
const JUDGE: &str = r#"
import json, os, sys
log, closed = sys.argv[1], sys.argv[2]
for line in sys.stdin:
    row = json.loads(line)
    s = len(row["completion"]) + (100 if row["completion"] == row.get("answer") else 0)
    with open(log, "a") as f:
        f.write(json.dumps({"pid": os.getpid(), "row": row, "score": s}) + "\n")
    print(json.dumps({"score": s}))
open(closed, "w").write("bye")
"#;

#[test]
fn a_program_is_started_once_and_answers_rows_in_order() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let recs = records(d);
    let judge = write(d, "judge.py", JUDGE);
    let (log, closed) = (d.join("log.jsonl"), d.join("closed"));
    let mut p = RewardProgram::start(
        &argv(&[
            "python3",
            judge.to_str().unwrap(),
            log.to_str().unwrap(),
            closed.to_str().unwrap(),
        ]),
        Duration::from_secs(30),
    )
    .unwrap();
    let (s, metrics) = score(&mut p, &recs, &["4", "six", "2", "1000"]).unwrap();
    assert_eq!(s, [101.0, 3.0, 101.0, 4.0]);
    assert!(metrics.is_empty(), "plain scores log no parts: {metrics:?}");
    // A second batch goes to the same process; rows without records are named by place.
    let rows = vec![
        serde_json::json!({"prompt": "x", "completion": "abc"}),
        serde_json::json!({"prompt": "y", "completion": "z", "answer": "z"}),
    ];
    assert_eq!(p.score_rows(&rows).unwrap(), [3.0, 101.0]);
    drop(p);
    assert!(closed.exists(), "the program saw its stdin close");
    let logged: Vec<serde_json::Value> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(logged.len(), 6);
    assert!(
        logged.iter().all(|r| r["pid"] == logged[0]["pid"]),
        "one process for every batch"
    );
    // The row carries the prompt (text, or the messages list) and the prompt row's fields.
    assert_eq!(logged[0]["row"]["prompt"], "2+2=");
    assert_eq!(logged[1]["row"]["tags"], serde_json::json!(["math"]));
    assert_eq!(logged[2]["row"]["prompt"][0]["content"], "1+1?");
    assert!(logged[2]["row"].get("messages").is_none());
}

#[test]
fn sub_scores_sum_and_each_key_is_logged() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let recs = records(d);
    let judge = write(
        d,
        "parts.py",
        "import json, sys\nfor line in sys.stdin:\n    c = json.loads(line)[\"completion\"]\n    \
         print(json.dumps({\"scores\": {\"length\": len(c), \"bonus\": 0.5}, \"why\": \"ok\"}))\n",
    );
    let mut p = RewardProgram::start(
        &argv(&["python3", judge.to_str().unwrap()]),
        Duration::from_secs(30),
    )
    .unwrap();
    let (s, metrics) = score(&mut p, &recs, &["a", "bb", "ccc", "dddd"]).unwrap();
    assert_eq!(s, [1.5, 2.5, 3.5, 4.5]);
    let m: std::collections::BTreeMap<String, f64> = metrics.into_iter().collect();
    assert_eq!(m["objective/scores_length"], 2.5);
    assert_eq!(m["objective/scores_bonus"], 0.5);
    assert_eq!(p.sub_scores()[3]["length"], 4.0);
}

#[test]
fn a_crash_mid_batch_names_the_row_the_exit_status_and_stderr() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let recs = records(d);
    let sh = write(
        d,
        "crash.sh",
        "read a; echo '{\"score\": 1}'\nread b; echo '{\"score\": 2}'\n\
         echo 'Traceback: boom, out of patience' >&2\nexit 3\n",
    );
    let mut p = RewardProgram::start(
        &argv(&["sh", sh.to_str().unwrap()]),
        Duration::from_secs(30),
    )
    .unwrap();
    let e = score(&mut p, &recs, &["a", "b", "c", "d"])
        .unwrap_err()
        .to_string();
    eprintln!("{e}");
    // The third row is the fourth line of the file (line 2 is blank).
    for want in [
        "crash.sh",
        "exit status: 3",
        "row 3 of 4 in batch 1",
        "prompts.jsonl:4",
        "boom, out of patience",
    ] {
        assert!(e.contains(want), "{want:?} not in: {e}");
    }
}

#[test]
fn a_hang_times_out_naming_the_row_and_kills_what_the_program_started() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let recs = records(d);
    let pid_file = d.join("sleep.pid");
    let sh = write(
        d,
        "hang.sh",
        &format!(
            "read a; echo '{{\"score\": 1}}'\nsleep 60 & echo $! > {pid:?}\nwait\n",
            pid = pid_file
        ),
    );
    let mut p =
        RewardProgram::start(&argv(&["sh", sh.to_str().unwrap()]), Duration::from_secs(1)).unwrap();
    let t = Instant::now();
    let e = score(&mut p, &recs, &["a", "b"]).unwrap_err().to_string();
    eprintln!("{e}");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    for want in [
        "no answer for row 2 of 2 in batch 1",
        "prompts.jsonl:3",
        "within 1 s",
        "reward_program_timeout",
        "killed",
    ] {
        assert!(e.contains(want), "{want:?} not in: {e}");
    }
    // The `sleep` the script started went with it (its whole process group was killed).
    let pid = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .to_string();
    let stat = Path::new("/proc").join(&pid).join("stat");
    let gone = || {
        std::fs::read_to_string(&stat)
            .map(|s| {
                s.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            })
            .unwrap_or(true)
    };
    let until = Instant::now() + Duration::from_secs(5);
    while !gone() && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(gone(), "sleep {pid} still runs");
}

#[test]
fn garbage_and_non_finite_answers_quote_the_line_and_name_the_row() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let recs = records(d);
    for (name, answer, want) in [
        ("garbage", "loading model weights...", "not JSON"),
        ("nan", "{\"score\": NaN}", "scores must be finite numbers"),
        (
            "inf",
            "{\"scores\": {\"a\": 1e39}}",
            "`scores.a` = 1e39 is not a finite f32",
        ),
    ] {
        let sh = write(
            d,
            &format!("{name}.sh"),
            &format!(
                "read a; echo '{{\"score\": 0.5}}'\nread b; echo '{answer}'\ncat > /dev/null\n"
            ),
        );
        let mut p = RewardProgram::start(
            &argv(&["sh", sh.to_str().unwrap()]),
            Duration::from_secs(30),
        )
        .unwrap();
        let e = score(&mut p, &recs[..3], &["a", "b", "c"])
            .unwrap_err()
            .to_string();
        eprintln!("{e}");
        for w in [
            answer,
            want,
            "row 2 of 3 in batch 1",
            "prompts.jsonl:3",
            "{\"score\": 1.0}",
        ] {
            assert!(e.contains(w), "{name}: {w:?} not in: {e}");
        }
    }
}

#[test]
fn a_command_that_cannot_start_is_a_config_error() {
    let e = RewardProgram::start(
        &argv(&["/nonexistent/judge-xyz", "a"]),
        Duration::from_secs(1),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        e.contains("reward_program") && e.contains("/nonexistent/judge-xyz"),
        "{e}"
    );
}

// ---------------------------------------------------------------------------------------------
// PPO with a reward program

/// 8 prompts with an `answer` field, every fourth tagged `safety`.
fn ppo_prompts(dir: &Path) -> PathBuf {
    let rows: Vec<String> = [
        "The cat",
        "A dog",
        "Once upon",
        "In the",
        "We saw",
        "She said",
        "It was",
        "They ran",
    ]
    .iter()
    .enumerate()
    .map(|(i, w)| {
        let mut r = serde_json::json!({"prompt": w, "answer": format!("a{i}")});
        if i % 4 == 3 {
            r["tags"] = serde_json::json!(["safety"]);
        }
        r.to_string()
    })
    .collect();
    write(dir, "prompts.jsonl", &(rows.join("\n") + "\n"))
}

/// Scores len(completion), logging each row and score to `argv[1]`.
const LEN_JUDGE: &str = r#"
import json, sys
for line in sys.stdin:
    row = json.loads(line)
    s = float(len(row["completion"]))
    with open(sys.argv[1], "a") as f:
        f.write(json.dumps({"row": row, "score": s}) + "\n")
    print(json.dumps({"scores": {"length": s, "bonus": 0.25}}))
"#;

/// A 2-step PPO config: 16 completions a step (8 prompts × 2), scored by `judge.py`
/// (named relative to the config file) and whatever `extra` adds.
fn ppo_config(dir: &Path, extra: &str) -> (PathBuf, PathBuf) {
    let prompts = ppo_prompts(dir);
    write(dir, "judge.py", LEN_JUDGE);
    let log = dir.join("judged.jsonl");
    let text = format!(
        "model = {model:?}\ntrain_file = {prompts:?}\noutput_dir = {out:?}\n\
         reward_program = [\"python3\", \"judge.py\", {log:?}]\n\
         per_device_train_batch_size = 8\nnum_generations = 2\nnum_mini_batches = 2\n\
         response_length = 6\ntemperature = 1.0\nnum_ppo_epochs = 1\nlearning_rate = 1e-3\n\
         max_steps = 2\nsave_steps = 0\nlogging_steps = 1\nseed = 5\nreport_to = [\"jsonl\"]\n\
         {extra}\n\
         [lora]\nr = 4\nlora_alpha = 8\ntarget_modules = \"all-linear\"\ntask_type = \"CAUSAL_LM\"\n",
        model = shared().join("models/llama-gqa"),
        out = dir.join("out"),
    );
    (write(dir, "ppo.toml", &text), log)
}

fn jsonl(p: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The logged metrics of each step (metrics.jsonl rows holding `objective/scores`).
fn step_metrics(out: &Path) -> Vec<serde_json::Value> {
    jsonl(&out.join("metrics.jsonl"))
        .into_iter()
        .filter(|r| r.get("objective/scores").is_some())
        .collect()
}

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * b.abs().max(1.0)
}

#[test]
fn ppo_runs_on_a_reward_program_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let (cfg, log) = ppo_config(tmp.path(), "");
    let summary = rlhf_train::ppo::run(&cfg, &[], None).unwrap();
    assert_eq!(summary["episode"], 32.0, "2 steps × 16 completions");
    let judged = jsonl(&log);
    assert_eq!(judged.len(), 32);
    // The program saw the prompt row's own fields.
    assert!(judged.iter().all(|r| r["row"]["answer"].is_string()));
    assert!(judged
        .iter()
        .any(|r| r["row"]["tags"] == serde_json::json!(["safety"])));
    let steps = step_metrics(&tmp.path().join("out"));
    assert_eq!(steps.len(), 2);
    for (k, m) in steps.iter().enumerate() {
        let lens: Vec<f64> = judged[16 * k..16 * (k + 1)]
            .iter()
            .map(|r| r["score"].as_f64().unwrap())
            .collect();
        let mean = lens.iter().sum::<f64>() / 16.0;
        let got = m["objective/scores"].as_f64().unwrap();
        assert!(
            close(got, mean + 0.25, 1e-6),
            "step {}: {got} vs {}",
            k + 1,
            mean + 0.25
        );
        assert!(close(
            m["objective/scores_length"].as_f64().unwrap(),
            mean,
            1e-6
        ));
        assert!(close(
            m["objective/scores_bonus"].as_f64().unwrap(),
            0.25,
            1e-6
        ));
    }
    assert!(tmp.path().join("out/value_head.safetensors").exists());
}

#[test]
fn ppo_sums_a_reward_model_and_a_program_with_reward_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    // The fixture reward model with a chat template the policy's tokenizer lacks: another
    // tokenizer, so it scores the completions' text, as the program does, and the test can
    // recompute its scores from the program's log (with the policy's own tokenizer it would
    // read the generated ids, which the log does not hold).
    let rm_dir = d.join("rm");
    std::fs::create_dir_all(&rm_dir).unwrap();
    for e in std::fs::read_dir(shared().join("models/llama-gqa-reward")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), rm_dir.join(e.file_name())).unwrap();
    }
    let tc = rm_dir.join("tokenizer_config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&tc).unwrap()).unwrap();
    v["chat_template"] = "{{ messages[0]['content'] }}".into();
    std::fs::write(&tc, v.to_string()).unwrap();
    let prompts = d.join("prompts.jsonl");
    let extra = format!(
        "reward_model = {rm_dir:?}\nreward_weights = [3.0, 0.5]\nreward_program_timeout = 120\n\
         eval_file = {prompts:?}\neval_prompts = 2\n"
    );
    let (cfg, log) = ppo_config(d, &extra);
    rlhf_train::ppo::run(&cfg, &[], None).unwrap();
    let judged = jsonl(&log);
    // 2 eval rows before training, 2 × 16 rollout rows, 2 eval rows after.
    assert_eq!(judged.len(), 36);
    let mut cache = rlhf_model::model::SourceCache::default();
    let rm = rlhf_train::scoring::RewardModel::load(&rm_dir, 8, &mut cache).unwrap();
    let rm_score = |r: &serde_json::Value| -> f64 {
        let p = rlhf_data::Content::Text(r["row"]["prompt"].as_str().unwrap().to_string());
        let c = r["row"]["completion"].as_str().unwrap().to_string();
        rm.score_texts(&[&p], &[c]).unwrap()[0] as f64
    };
    // The program's own score is the sum of its parts: length + 0.25.
    let combined =
        |r: &serde_json::Value| 3.0 * rm_score(r) + 0.5 * (r["score"].as_f64().unwrap() + 0.25);
    let steps = step_metrics(&d.join("out"));
    assert_eq!(steps.len(), 2);
    for (k, m) in steps.iter().enumerate() {
        let rows = &judged[2 + 16 * k..2 + 16 * (k + 1)];
        let want = rows.iter().map(combined).sum::<f64>() / 16.0;
        let got = m["objective/scores"].as_f64().unwrap();
        eprintln!(
            "step {}: objective/scores {got} (3 × reward model + 0.5 × program)",
            k + 1
        );
        assert!(close(got, want, 1e-4), "step {}: {got} vs {want}", k + 1);
        let rm_mean = rows.iter().map(rm_score).sum::<f64>() / 16.0;
        eprintln!("  reward model mean {rm_mean}");
        let prog_mean = rows
            .iter()
            .map(|r| r["score"].as_f64().unwrap() + 0.25)
            .sum::<f64>()
            / 16.0;
        assert!(close(
            m["objective/scores_reward_model"].as_f64().unwrap(),
            rm_mean,
            1e-4
        ));
        assert!(close(
            m["objective/scores_reward_program"].as_f64().unwrap(),
            prog_mean,
            1e-6
        ));
    }
    // Evaluation scores through the same sum.
    let eval0 = jsonl(&d.join("out/eval_step0.jsonl"));
    for (e, r) in eval0.iter().zip(&judged[..2]) {
        assert_eq!(e["completion"], r["row"]["completion"]);
        let got = e["score"].as_f64().unwrap();
        assert!(
            close(got, combined(r), 1e-4),
            "eval: {got} vs {}",
            combined(r)
        );
    }
}

#[test]
fn reward_weights_must_match_the_reward_sources() {
    let tmp = tempfile::tempdir().unwrap();
    let rm = shared().join("models/llama-gqa-reward");
    for (extra, want) in [
        (
            format!("reward_model = {rm:?}\nreward_weights = [1.0]\n"),
            "2 reward sources (reward_model, reward_program)",
        ),
        (
            "reward_weights = [1.0, 2.0]\n".to_string(),
            "1 reward sources (reward_program)",
        ),
        (
            "reward_program_timeout = 0\n".to_string(),
            "reward_program_timeout",
        ),
    ] {
        let (cfg, _) = ppo_config(tmp.path(), &extra);
        let e = rlhf_train::ppo::PpoConfig::load(&cfg, &[])
            .unwrap_err()
            .to_string();
        eprintln!("{e}");
        assert!(
            e.contains(want) && e.contains("ppo.toml"),
            "{want:?} not in: {e}"
        );
        if want.contains("sources") {
            assert!(e.contains("`reward_weights`"), "{e}");
        }
    }
    // The program's file argument was made absolute against the config's directory.
    let (cfg, _) = ppo_config(tmp.path(), "");
    let c = rlhf_train::ppo::PpoConfig::load(&cfg, &[]).unwrap();
    let argv = c.scorer.reward_program.unwrap();
    assert_eq!(Path::new(&argv[1]), tmp.path().join("judge.py"));
    assert_eq!(argv[0], "python3");
}

/// The pipeline writes each stage's config elsewhere, so the program's file arguments are
/// made absolute against the pipeline config's directory.
#[test]
fn the_pipeline_makes_program_arguments_absolute() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    write(d, "judge.py", LEN_JUDGE);
    let path = write(
        d,
        "pipeline.toml",
        "model = \"m\"\noutput_dir = \"out\"\n[sft]\n[reward]\n\
         [ppo]\nreward_program = [\"python3\", \"judge.py\", \"--strict\"]\n",
    );
    let stages = rlhf_train::pipeline::stage_tables(&path, &[]).unwrap();
    let ppo = &stages.stages.iter().find(|(n, _)| n == "ppo").unwrap().1;
    let argv: Vec<&str> = ppo["reward_program"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(argv[0], "python3");
    assert_eq!(Path::new(argv[1]), d.join("judge.py"));
    assert_eq!(argv[2], "--strict");
}
