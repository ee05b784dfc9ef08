//! Reward programs ("verifiable rewards"): any command that reads completions as JSON lines
//! on stdin and answers each with a score on stdout, used as a [`Scorer`] beside or instead of
//! reward models (`reward_program = ["python3", "judge.py"]`).
//!
//! The protocol, one batch at a time:
//! - the program is started once per run, in the current directory, and kept running; it is
//!   fed every batch on the same stdin and must answer rows in the order they came;
//! - each row is one line `{"prompt": ..., "completion": "...", ...}`: `prompt` is the prompt
//!   row's text, or its messages list (`[{"role", "content"}, ...]`) for a conversation,
//!   `completion` the generated text (without the EOS that ended it), and every other field
//!   of the prompt row comes along as it was (`tags`, a reference `answer`, ...);
//! - for each row the program prints one line: `{"score": 1.0}`, or `{"scores": {"format":
//!   1.0, "correct": 0.0}}`, whose sum is the score and whose keys' batch means are logged as
//!   `objective/scores_<name>`; other keys on the line are ignored; scores must be finite;
//! - it must flush after each batch's answers (Python programs run with
//!   `PYTHONUNBUFFERED=1`); logs go to stderr, whose last lines errors quote;
//! - stdin closing is the signal to exit.
//!
//! A program that exits, hangs past `reward_program_timeout` seconds on a batch, or prints a
//! line that is not a score stops the run with an error naming the row (file:line) it was
//! answering; it is killed (with anything it started) and nothing is retried, so the run's
//! checkpoints stay the last word.
//!
//! In a config file, an argument naming a file that exists relative to the config file's
//! directory (`judge.py`, `./judge.sh`) is made absolute when the config is loaded
//! ([`resolve_program_args`]); a bare command name (`python3`) is looked up on `PATH`.

use std::collections::{BTreeMap, VecDeque};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rlhf_data::{Content, PromptRecord};
use serde_json::{Map, Value};

use crate::scoring::{Completions, Scorer};
use crate::{Error, Result};

/// Lines of the program's stderr kept for error messages.
const STDERR_LINES: usize = 20;
/// Characters of an offending stdout line quoted in an error.
const QUOTE_CHARS: usize = 200;
/// What a valid answer looks like, for error messages.
const VALID: &str = "each row needs one line like {\"score\": 1.0} or {\"scores\": {\"name\": \
                     1.0}} (finite numbers; print logs to stderr)";

/// A running reward program (see the module docs for the protocol).
pub struct RewardProgram {
    argv: Vec<String>,
    timeout: Duration,
    running: Option<Running>,
    /// Batches sent since construction, for error messages.
    batches: usize,
    /// The last batch's per-key scores (empty where a row gave a plain `score`).
    sub_scores: Vec<BTreeMap<String, f32>>,
}

/// The child process and the threads that feed and drain it.
struct Running {
    child: Child,
    /// Batches for the writer thread; dropping it closes the program's stdin.
    to_stdin: Option<Sender<Vec<u8>>>,
    /// The program's stdout, a line at a time; disconnected at EOF.
    lines: Receiver<String>,
    stderr_tail: Arc<Mutex<VecDeque<String>>>,
    stderr_reader: JoinHandle<()>,
}

impl RewardProgram {
    /// Starts `argv` (command and arguments) with `timeout` per batch.
    pub fn start(argv: &[String], timeout: Duration) -> Result<Self> {
        if argv.is_empty() || argv[0].is_empty() {
            return Err(Error::Config(
                "reward_program is empty: give the command and its arguments, e.g. \
                 [\"python3\", \"judge.py\"]"
                    .into(),
            ));
        }
        let mut me = Self {
            argv: argv.to_vec(),
            timeout,
            running: None,
            batches: 0,
            sub_scores: Vec::new(),
        };
        // Started now so a misspelt command fails before the first rollout, not after it.
        me.running = Some(me.spawn()?);
        Ok(me)
    }

    /// The command line, for messages.
    pub fn command(&self) -> String {
        self.argv
            .iter()
            .map(|a| {
                if a.is_empty() || a.contains(char::is_whitespace) {
                    format!("{a:?}")
                } else {
                    a.clone()
                }
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn spawn(&self) -> Result<Running> {
        let mut cmd = Command::new(&self.argv[0]);
        cmd.args(&self.argv[1..])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Python block-buffers a piped stdout, which would hold answers back forever.
            .env("PYTHONUNBUFFERED", "1");
        #[cfg(unix)]
        {
            // Its own process group, so a kill reaches whatever the program started too.
            use std::os::unix::process::CommandExt;
            cmd.process_group(0);
        }
        let mut child = cmd.spawn().map_err(|e| {
            Error::Config(format!(
                "reward_program: cannot start `{}`: {e}",
                self.command()
            ))
        })?;
        tracing::info!("started reward program `{}`", self.command());
        let mut stdin = child.stdin.take().expect("stdin is piped");
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        // A writer thread, so a program that stops reading cannot block us past the timeout.
        let (to_stdin, batches) = mpsc::channel::<Vec<u8>>();
        std::thread::spawn(move || {
            for buf in batches {
                if stdin.write_all(&buf).and_then(|_| stdin.flush()).is_err() {
                    break; // it exited or closed stdin; the reader reports that
                }
            }
        });
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(stdout);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match r.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&buf).trim_end().to_string();
                        if tx.send(line).is_err() {
                            break;
                        }
                    }
                }
            }
        });
        let stderr_tail = Arc::new(Mutex::new(VecDeque::new()));
        let tail = stderr_tail.clone();
        let stderr_reader = std::thread::spawn(move || {
            let mut r = BufReader::new(stderr);
            let mut buf = Vec::new();
            while matches!(r.read_until(b'\n', &mut buf), Ok(n) if n > 0) {
                let line = String::from_utf8_lossy(&buf).trim_end().to_string();
                buf.clear();
                tracing::debug!(target: "reward_program", "{line}");
                let mut t = tail.lock().unwrap_or_else(|e| e.into_inner());
                if t.len() == STDERR_LINES {
                    t.pop_front();
                }
                t.push_back(line);
            }
        });
        Ok(Running {
            child,
            to_stdin: Some(to_stdin),
            lines,
            stderr_tail,
            stderr_reader,
        })
    }

    /// Scores rows that already hold `prompt`, `completion` and any extra fields (see
    /// [`program_row`]); errors name a row by its place in the batch.
    pub fn score_rows(&mut self, rows: &[Value]) -> Result<Vec<f32>> {
        self.score_rows_at(rows, &[])
    }

    /// [`Self::score_rows`], with `at[i]` (e.g. the prompt row's file:line) naming row `i` in
    /// errors; `at` may be empty.
    pub fn score_rows_at(&mut self, rows: &[Value], at: &[String]) -> Result<Vec<f32>> {
        self.sub_scores.clear();
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        self.batches += 1;
        let batch = self.batches;
        let name = |i: usize| {
            let place = format!("row {} of {} in batch {batch}", i + 1, rows.len());
            match at.get(i) {
                Some(a) => format!("{place} ({a})"),
                None => place,
            }
        };
        if self.running.is_none() {
            // Only after an earlier error, which the caller chose to carry on from.
            self.running = Some(self.spawn()?);
        }
        let leftover = self
            .running
            .as_ref()
            .expect("started above")
            .lines
            .try_recv();
        // A line already waiting answers nothing sent: the previous batch got too many.
        if let Ok(line) = leftover {
            let problem = format!(
                "printed `{}` after answering every row of the previous batch, before {} \
                 was sent: one line per row, {VALID}",
                quote(&line),
                name(0)
            );
            return Err(self.fail(problem));
        }
        let mut buf = Vec::new();
        for row in rows {
            serde_json::to_writer(&mut buf, row).expect("a JSON value serialises");
            buf.push(b'\n');
        }
        // A send error means the program is gone; reading its answers says how.
        let _ = self
            .running
            .as_ref()
            .expect("started above")
            .to_stdin
            .as_ref()
            .expect("open while running")
            .send(buf);
        let deadline = Instant::now() + self.timeout;
        let mut scores = Vec::with_capacity(rows.len());
        let mut subs = Vec::with_capacity(rows.len());
        for i in 0..rows.len() {
            let run = self.running.as_mut().expect("started above");
            let wait = deadline.saturating_duration_since(Instant::now());
            match run.lines.recv_timeout(wait) {
                Ok(line) => match parse_answer(&line) {
                    Ok((s, parts)) => {
                        scores.push(s);
                        subs.push(parts);
                    }
                    Err(why) => {
                        let problem = format!(
                            "answered {} with `{}`: {why}; {VALID}",
                            name(i),
                            quote(&line)
                        );
                        return Err(self.fail(problem));
                    }
                },
                Err(RecvTimeoutError::Timeout) => {
                    let problem = format!(
                        "gave no answer for {} within {} s (reward_program_timeout); it was \
                         killed",
                        name(i),
                        self.timeout.as_secs_f64()
                    );
                    return Err(self.fail(problem));
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let status = exit_status(&mut run.child);
                    let problem = format!("{status} before answering {}", name(i));
                    return Err(self.fail(problem));
                }
            }
        }
        self.sub_scores = subs;
        Ok(scores)
    }

    /// The per-key scores of the last batch's rows (empty where a row gave a plain `score`).
    pub fn sub_scores(&self) -> &[BTreeMap<String, f32>] {
        &self.sub_scores
    }

    /// Each key's mean over the last batch's rows that gave it.
    pub fn sub_score_means(&self) -> BTreeMap<String, f64> {
        let mut sums: BTreeMap<String, (f64, usize)> = BTreeMap::new();
        for parts in &self.sub_scores {
            for (k, &v) in parts {
                let e = sums.entry(k.clone()).or_default();
                e.0 += v as f64;
                e.1 += 1;
            }
        }
        sums.into_iter()
            .map(|(k, (s, n))| (k, s / n as f64))
            .collect()
    }

    /// Kills the program and builds the error, with the end of its stderr.
    fn fail(&mut self, mut problem: String) -> Error {
        if let Some(mut run) = self.running.take() {
            kill(&mut run.child);
            // The stderr pipe closes when the program dies (unless something it started
            // holds it, which the group kill ends); give the reader a moment to drain it.
            let until = Instant::now() + Duration::from_secs(1);
            while !run.stderr_reader.is_finished() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(5));
            }
            let tail = run.stderr_tail.lock().unwrap_or_else(|e| e.into_inner());
            if tail.is_empty() {
                problem.push_str("; it wrote nothing to stderr");
            } else {
                problem.push_str("; its stderr ended with:");
                for l in tail.iter() {
                    problem.push_str("\n    ");
                    problem.push_str(l);
                }
            }
        }
        Error::RewardProgram {
            command: self.command(),
            problem,
        }
    }
}

impl Drop for RewardProgram {
    fn drop(&mut self) {
        let Some(mut run) = self.running.take() else {
            return;
        };
        // Closing stdin asks it to exit; a program that does not within a second is killed.
        drop(run.to_stdin.take());
        let until = Instant::now() + Duration::from_secs(1);
        loop {
            match run.child.try_wait() {
                Ok(Some(_)) | Err(_) => return,
                Ok(None) if Instant::now() >= until => break,
                Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
        tracing::warn!(
            "reward program `{}` did not exit when its stdin closed; killed",
            self.command()
        );
        kill(&mut run.child);
    }
}

/// Kills the program and everything in its process group, and reaps it.
fn kill(child: &mut Child) {
    if let Ok(Some(_)) = child.try_wait() {
        return; // exited and reaped: its pid may already name another process
    }
    #[cfg(unix)]
    {
        // SAFETY: kill(2) takes plain integers and touches no memory of ours. The child is
        // not reaped yet, so its pid (its process group's id since spawn) still names it.
        unsafe {
            libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL);
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// How the program ended after closing its stdout: its exit status, waiting a little for it.
fn exit_status(child: &mut Child) -> String {
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return format!("exited ({status})"),
            Ok(None) if Instant::now() < until => std::thread::sleep(Duration::from_millis(5)),
            Ok(None) => return "closed its stdout without exiting (killed)".into(),
            Err(e) => return format!("ended (its status is unknown: {e})"),
        }
    }
}

/// The first characters of a line, for quoting.
fn quote(line: &str) -> String {
    if line.chars().count() > QUOTE_CHARS {
        format!("{}…", line.chars().take(QUOTE_CHARS).collect::<String>())
    } else {
        line.to_string()
    }
}

/// One answer: `{"score": x}` or `{"scores": {name: x, ...}}` (the score is their sum).
/// On error, why the line is not one.
fn parse_answer(line: &str) -> std::result::Result<(f32, BTreeMap<String, f32>), String> {
    let v: Value = match serde_json::from_str(line) {
        Ok(v) => v,
        Err(_) if line.contains("NaN") || line.contains("Infinity") => {
            return Err("scores must be finite numbers".into())
        }
        Err(e) if line.trim().is_empty() => return Err(format!("an empty line ({e})")),
        Err(e) => return Err(format!("not JSON ({e})")),
    };
    let Value::Object(o) = v else {
        return Err("not a JSON object".into());
    };
    let finite = |key: &str, x: &Value| -> std::result::Result<f32, String> {
        match x.as_f64() {
            Some(f) if (f as f32).is_finite() => Ok(f as f32),
            Some(f) => Err(format!("`{key}` = {f:e} is not a finite f32")),
            None => Err(format!("`{key}` is {x}, not a number")),
        }
    };
    match (o.get("score"), o.get("scores")) {
        (Some(_), Some(_)) => Err("it has both `score` and `scores`; give one".into()),
        (Some(s), None) => Ok((finite("score", s)?, BTreeMap::new())),
        (None, Some(Value::Object(parts))) if !parts.is_empty() => {
            let mut out = BTreeMap::new();
            for (k, x) in parts {
                out.insert(k.clone(), finite(&format!("scores.{k}"), x)?);
            }
            let sum = out.values().sum::<f32>();
            if !sum.is_finite() {
                return Err("the sum of `scores` is not finite".into());
            }
            Ok((sum, out))
        }
        (None, Some(_)) => Err("`scores` must be a non-empty object of numbers".into()),
        (None, None) => Err("it has no `score` or `scores`".into()),
    }
}

/// The line a program receives for one completion: `prompt` (the text, or the messages
/// list), `completion`, and every other field of the prompt row (`messages` is what
/// `prompt` already holds for a conversation; a `completion` field of the row is replaced).
pub fn program_row(record: &PromptRecord, completion: &str) -> Value {
    let mut row = Map::new();
    for (k, v) in &record.row {
        if !matches!(k.as_str(), "prompt" | "messages" | "completion") {
            row.insert(k.clone(), v.clone());
        }
    }
    let prompt = match &record.prompt {
        Content::Text(t) => Value::String(t.clone()),
        Content::Messages(m) => serde_json::to_value(m).expect("messages serialise"),
    };
    row.insert("prompt".into(), prompt);
    row.insert("completion".into(), Value::String(completion.to_string()));
    Value::Object(row)
}

impl Scorer for RewardProgram {
    fn score(&mut self, batch: &Completions, metrics: &mut Vec<(String, f64)>) -> Result<Vec<f32>> {
        let rows: Vec<Value> = batch
            .prompts
            .iter()
            .zip(batch.texts)
            .map(|(p, t)| program_row(p, t))
            .collect();
        let at: Vec<String> = batch.prompts.iter().map(|p| p.at.to_string()).collect();
        let scores = self.score_rows_at(&rows, &at)?;
        for (k, mean) in self.sub_score_means() {
            metrics.push((format!("objective/scores_{k}"), mean));
        }
        Ok(scores)
    }
}

/// Makes the arguments of a config's `reward_program` list that name existing files
/// relative to `base` (the config file's directory) absolute, so the program finds them
/// from any working directory. The command itself is changed only when it is a path
/// (`./judge.sh`); a bare name (`python3`) is looked up on `PATH`.
pub fn resolve_program_args(base: &Path, v: &mut toml::Value) {
    let toml::Value::Array(args) = v else { return };
    for (i, a) in args.iter_mut().enumerate() {
        let toml::Value::String(s) = a else { continue };
        let p = Path::new(s.as_str());
        if s.is_empty() || p.is_absolute() || (i == 0 && !s.contains('/')) {
            continue;
        }
        let joined = base.join(p);
        if joined.is_file() {
            if let Ok(abs) = std::path::absolute(&joined) {
                *s = abs.to_string_lossy().into_owned();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_parse_to_a_score_and_its_parts() {
        assert_eq!(
            parse_answer(r#"{"score": 2.5}"#).unwrap(),
            (2.5, BTreeMap::new())
        );
        assert_eq!(parse_answer(r#"{"score": 3, "why": "ok"}"#).unwrap().0, 3.0);
        let (s, parts) = parse_answer(r#"{"scores": {"format": 1.0, "correct": 0.5}}"#).unwrap();
        assert_eq!(s, 1.5);
        assert_eq!(parts["format"], 1.0);
        assert_eq!(parts["correct"], 0.5);
    }

    #[test]
    fn malformed_answers_say_why() {
        for (line, why) in [
            ("hello", "not JSON"),
            ("", "empty line"),
            (r#"{"score": NaN}"#, "finite"),
            (r#"{"score": Infinity}"#, "finite"),
            (r#"{"score": 1e39}"#, "finite"),
            (r#"{"score": "1.0"}"#, "not a number"),
            (r#"{"scores": {}}"#, "non-empty"),
            (r#"{"scores": {"a": null}}"#, "scores.a"),
            (r#"{"score": 1, "scores": {"a": 1}}"#, "both"),
            (r#"{"reward": 1}"#, "no `score`"),
            ("[1.0]", "not a JSON object"),
        ] {
            let e = parse_answer(line).unwrap_err();
            assert!(e.contains(why), "{line:?}: {e}");
        }
    }

    #[test]
    fn rows_carry_the_prompt_rows_other_fields() {
        let rec = PromptRecord {
            at: rlhf_data::Location::line(Path::new("p.jsonl"), 3),
            prompt: Content::Messages(vec![rlhf_model::tokenizer::ChatMessage::new(
                "user", "2+2?",
            )]),
            tags: vec![],
            row: serde_json::json!({"messages": [{"role": "user", "content": "2+2?"}],
                                    "answer": "4", "completion": "old"})
            .as_object()
            .unwrap()
            .clone(),
        };
        let row = program_row(&rec, "4");
        assert_eq!(row["completion"], "4");
        assert_eq!(row["answer"], "4");
        assert_eq!(row["prompt"][0]["content"], "2+2?");
        assert!(row.get("messages").is_none());
    }

    #[test]
    fn file_arguments_become_absolute() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("judge.py"), "").unwrap();
        std::fs::write(tmp.path().join("run.sh"), "").unwrap();
        let mut v = toml::Value::Array(
            ["python3", "judge.py", "--strict", "./run.sh"]
                .map(|s| toml::Value::String(s.into()))
                .to_vec(),
        );
        resolve_program_args(tmp.path(), &mut v);
        let got: Vec<&str> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_str().unwrap())
            .collect();
        assert_eq!(got[0], "python3");
        assert_eq!(Path::new(got[1]), tmp.path().join("judge.py"));
        assert_eq!(got[2], "--strict");
        assert_eq!(Path::new(got[3]), tmp.path().join("./run.sh"));
        let mut cmd = toml::Value::Array(vec![toml::Value::String("./run.sh".into())]);
        resolve_program_args(tmp.path(), &mut cmd);
        let first = cmd.as_array().unwrap()[0].as_str().unwrap();
        assert!(Path::new(first).is_absolute(), "{first}");
    }
}
