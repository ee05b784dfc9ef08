//! Training metrics sinks: `metrics.jsonl` (one JSON object per logging event, the raw keys the
//! transformers Trainer keeps in `state.log_history`) and TensorBoard (tags rewritten as
//! transformers' `TensorBoardCallback` does: `loss` → `train/loss`, `eval_loss` → `eval/loss`).
//! [`MetricsLogger`] sends each event to the sinks chosen by `report_to`.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::tensorboard::{default_run_dir, TbWriter};

/// The metrics file's name in `output_dir`.
pub const METRICS_FILE: &str = "metrics.jsonl";

/// Appends one JSON object per line to a metrics file, flushing after each line.
#[derive(Debug)]
pub struct JsonlWriter {
    path: PathBuf,
    file: File,
}

impl JsonlWriter {
    /// Opens `path` for appending (creating it and its parent dirs), so a resumed run continues
    /// the same file; see [`JsonlWriter::resume`] to drop lines past the checkpoint first.
    pub fn open(path: impl AsRef<Path>) -> io::Result<Self> {
        let path = path.as_ref().to_path_buf();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir).map_err(|e| with_path(e, dir, "cannot create dir"))?;
        }
        let file = OpenOptions::new()
            .append(true)
            .create(true)
            .open(&path)
            .map_err(|e| with_path(e, &path, "cannot open metrics file"))?;
        let mut w = Self { path, file };
        // After a killed run the file may end mid-line; start on a fresh line so the next
        // object is not glued to the fragment.
        let ends_mid_line = fs::read(&w.path)
            .map_err(|e| with_path(e, &w.path, "cannot read metrics file"))?
            .last()
            .is_some_and(|&b| b != b'\n');
        if ends_mid_line {
            w.write_line("\n")?;
        }
        Ok(w)
    }

    /// Opens `path` for a run resumed from the checkpoint at `step` (0: a fresh run): lines
    /// logged after that step by an interrupted run are dropped, since those steps will be
    /// logged again (transformers likewise restores `log_history` from the checkpoint). A line
    /// that is not JSON (the cut last line of a killed run) is dropped too; JSON lines without
    /// a `step` are kept.
    pub fn resume(path: impl AsRef<Path>, step: usize) -> io::Result<Self> {
        let path = path.as_ref();
        match fs::read_to_string(path) {
            Ok(text) => {
                let mut kept = String::with_capacity(text.len());
                for (i, line) in text.lines().enumerate() {
                    let Ok(v) = serde_json::from_str::<Value>(line) else {
                        if !line.trim().is_empty() {
                            tracing::warn!("{}:{}: not JSON; dropped", path.display(), i + 1);
                        }
                        continue;
                    };
                    if v.get("step")
                        .and_then(Value::as_u64)
                        .is_none_or(|s| s <= step as u64)
                    {
                        kept.push_str(line);
                        kept.push('\n');
                    }
                }
                // Write, fsync, rename: a crash here cannot lose the whole history.
                rlhf_model::save::write_atomic(path, kept.as_bytes())
                    .map_err(|e| io::Error::other(e.to_string()))?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(with_path(e, path, "cannot read metrics file")),
        }
        Self::open(path)
    }

    /// The file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `{"step": step, <metrics>...}`: exactly the given keys, names unchanged. A
    /// `step` key in `metrics` is ignored (the argument is the step). Non-finite values are
    /// written as `null`, since JSON has no NaN or infinity and strict parsers (serde_json, jq)
    /// reject Python's `NaN`.
    pub fn log(&mut self, step: usize, metrics: &BTreeMap<String, f64>) -> io::Result<()> {
        // Built by hand rather than through `serde_json::Map`, whose key order depends on the
        // `preserve_order` feature some other crate may switch on: `step` always comes first.
        let mut line = format!("{{\"step\":{step}");
        for (k, &v) in metrics.iter().filter(|(k, _)| k.as_str() != "step") {
            let key = serde_json::to_string(k).map_err(io::Error::other)?;
            // `From<f64>` maps non-finite values to Null.
            line.push_str(&format!(",{key}:{}", Value::from(v)));
        }
        line.push_str("}\n");
        self.write_line(&line)
    }

    /// Writes any JSON object as one line, e.g. a final summary with string fields.
    pub fn write_object(&mut self, obj: &Map<String, Value>) -> io::Result<()> {
        let mut line = serde_json::to_string(obj).map_err(io::Error::other)?;
        line.push('\n');
        self.write_line(&line)
    }

    fn write_line(&mut self, line: &str) -> io::Result<()> {
        // One write per line, so a killed run leaves at most a cut last line.
        self.file
            .write_all(line.as_bytes())
            .and_then(|()| self.file.flush())
            .map_err(|e| with_path(e, &self.path, "cannot write metrics"))
    }
}

/// The TensorBoard tag for a Trainer log key, as transformers' `rewrite_logs`:
/// `eval_x` → `eval/x`, `test_x` → `test/x`, anything else → `train/x`.
pub fn tensorboard_tag(key: &str) -> String {
    if let Some(rest) = key.strip_prefix("eval_") {
        format!("eval/{rest}")
    } else if let Some(rest) = key.strip_prefix("test_") {
        format!("test/{rest}")
    } else {
        format!("train/{key}")
    }
}

/// Which sinks `report_to` selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReportTo {
    /// Write TensorBoard event files.
    pub tensorboard: bool,
    /// Write `metrics.jsonl`.
    pub jsonl: bool,
}

impl ReportTo {
    /// Parses a `report_to` list: `"tensorboard"`, `"jsonl"`, `"all"` (both) or `"none"` (no
    /// sinks; an empty list means the same). `"none"` with another entry is rejected as
    /// contradictory, as transformers rejects it.
    pub fn parse<S: AsRef<str>>(report_to: &[S]) -> io::Result<Self> {
        let mut out = Self::default();
        let mut none = false;
        for r in report_to {
            match r.as_ref() {
                "tensorboard" => out.tensorboard = true,
                "jsonl" => out.jsonl = true,
                "all" => {
                    out.tensorboard = true;
                    out.jsonl = true;
                }
                "none" => none = true,
                other => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!(
                        "report_to {other:?}: use \"tensorboard\", \"jsonl\", \"all\" or \"none\""
                    ),
                    ))
                }
            }
        }
        if none && (out.tensorboard || out.jsonl) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "report_to: \"none\" cannot be combined with other sinks",
            ));
        }
        Ok(out)
    }
}

/// Sends each logging event to the chosen sinks.
#[derive(Debug, Default)]
pub struct MetricsLogger {
    tensorboard: Option<TbWriter>,
    jsonl: Option<JsonlWriter>,
}

impl MetricsLogger {
    /// Opens the sinks `report_to` selects: a new event file in `tb_dir` (e.g.
    /// [`crate::tensorboard::default_run_dir`]) and/or `jsonl_path` (e.g.
    /// `{output_dir}/metrics.jsonl`, appended to). Paths of unselected sinks are not touched.
    pub fn new<S: AsRef<str>>(
        report_to: &[S],
        tb_dir: impl AsRef<Path>,
        jsonl_path: impl AsRef<Path>,
    ) -> io::Result<Self> {
        let sinks = ReportTo::parse(report_to)?;
        Ok(Self {
            tensorboard: sinks
                .tensorboard
                .then(|| TbWriter::create(tb_dir))
                .transpose()?,
            jsonl: sinks
                .jsonl
                .then(|| JsonlWriter::open(jsonl_path))
                .transpose()?,
        })
    }

    /// Opens the sinks `report_to` selects the way the trainer lays out `output_dir`: event
    /// files in [`default_run_dir`] (`{output_dir}/runs/{stamp}_{host}`, a new run dir per
    /// launch, as transformers) and `{output_dir}/metrics.jsonl` via [`JsonlWriter::resume`]
    /// at `resume_step` (0 for a fresh run), so the file holds exactly this run's history.
    /// A logger that writes nothing (the ranks of a data-parallel job other than rank 0).
    pub fn none() -> Self {
        Self {
            tensorboard: None,
            jsonl: None,
        }
    }

    pub fn open<S: AsRef<str>>(
        output_dir: impl AsRef<Path>,
        report_to: &[S],
        resume_step: usize,
    ) -> io::Result<Self> {
        let sinks = ReportTo::parse(report_to)?;
        let out = output_dir.as_ref();
        Ok(Self {
            tensorboard: sinks
                .tensorboard
                .then(|| TbWriter::create(default_run_dir(out)))
                .transpose()?,
            jsonl: sinks
                .jsonl
                .then(|| JsonlWriter::resume(out.join(METRICS_FILE), resume_step))
                .transpose()?,
        })
    }

    /// Combines sinks opened by the caller.
    pub fn from_sinks(tensorboard: Option<TbWriter>, jsonl: Option<JsonlWriter>) -> Self {
        Self { tensorboard, jsonl }
    }

    /// Logs one event at global step `step`: `metrics` go to `metrics.jsonl` under their raw
    /// names (`loss`, `learning_rate`, `epoch`, `eval_loss`, ...) and to TensorBoard as one
    /// event under [`tensorboard_tag`] names (`train/loss`, ..., `eval/loss`).
    pub fn log(&mut self, step: usize, metrics: &BTreeMap<String, f64>) -> io::Result<()> {
        if let Some(jsonl) = &mut self.jsonl {
            jsonl.log(step, metrics)?;
        }
        if let Some(tb) = &mut self.tensorboard {
            // `step` is the x axis, not a series: transformers does not log it as a scalar.
            let values: Vec<(String, f32)> = metrics
                .iter()
                .filter(|(k, _)| k.as_str() != "step")
                .map(|(k, &v)| (tensorboard_tag(k), v as f32))
                .collect();
            if !values.is_empty() {
                tb.add_scalars(step as i64, &values)?;
            }
        }
        Ok(())
    }

    /// Logs the end-of-training summary (`train_runtime`, `train_samples_per_second`,
    /// `train_loss`, ...): the last line of `metrics.jsonl`, and in TensorBoard
    /// `train/train_runtime` etc., as transformers' final `Trainer.log` does.
    pub fn summary(&mut self, step: usize, summary: &BTreeMap<String, f64>) -> io::Result<()> {
        self.log(step, summary)
    }

    /// Logs text to TensorBoard only (transformers logs the arguments as `args` and the model
    /// config as `model_config` at step 0); a no-op without the TensorBoard sink.
    pub fn log_text(&mut self, tag: &str, text: &str, step: usize) -> io::Result<()> {
        match &mut self.tensorboard {
            Some(tb) => tb.add_text(tag, text, step as i64),
            None => Ok(()),
        }
    }

    /// Flushes both sinks (each log call already does).
    pub fn flush(&mut self) -> io::Result<()> {
        if let Some(tb) = &mut self.tensorboard {
            tb.flush()?;
        }
        if let Some(j) = &mut self.jsonl {
            j.file
                .flush()
                .map_err(|e| with_path(e, &j.path, "cannot flush"))?;
        }
        Ok(())
    }

    /// The TensorBoard writer, if that sink is on.
    pub fn tensorboard(&self) -> Option<&TbWriter> {
        self.tensorboard.as_ref()
    }

    /// The JSONL writer, if that sink is on.
    pub fn jsonl(&self) -> Option<&JsonlWriter> {
        self.jsonl.as_ref()
    }

    /// The JSONL writer, mutably, for [`JsonlWriter::write_object`] summaries.
    pub fn jsonl_mut(&mut self) -> Option<&mut JsonlWriter> {
        self.jsonl.as_mut()
    }
}

fn with_path(e: io::Error, path: &Path, what: &str) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensorboard::read_scalars;

    fn m(pairs: &[(&str, f64)]) -> BTreeMap<String, f64> {
        pairs.iter().map(|&(k, v)| (k.to_string(), v)).collect()
    }

    fn lines(path: &Path) -> Vec<Value> {
        fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn tags_follow_transformers_rewrite_logs() {
        assert_eq!(tensorboard_tag("loss"), "train/loss");
        assert_eq!(tensorboard_tag("learning_rate"), "train/learning_rate");
        assert_eq!(tensorboard_tag("epoch"), "train/epoch");
        assert_eq!(tensorboard_tag("eval_loss"), "eval/loss");
        assert_eq!(tensorboard_tag("eval_accuracy"), "eval/accuracy");
        assert_eq!(tensorboard_tag("test_loss"), "test/loss");
        // Only a leading prefix counts; transformers' summary keys stay under train/.
        assert_eq!(tensorboard_tag("train_runtime"), "train/train_runtime");
        assert_eq!(tensorboard_tag("rewards/chosen"), "train/rewards/chosen");
        assert_eq!(
            tensorboard_tag("eval_rewards/margins"),
            "eval/rewards/margins"
        );
    }

    #[test]
    fn report_to_parsing() {
        let p = |v: &[&str]| ReportTo::parse(v);
        let both = ReportTo {
            tensorboard: true,
            jsonl: true,
        };
        assert_eq!(p(&["all"]).unwrap(), both);
        assert_eq!(p(&["tensorboard", "jsonl"]).unwrap(), both);
        assert_eq!(p(&["none"]).unwrap(), ReportTo::default());
        assert_eq!(p(&[]).unwrap(), ReportTo::default());
        assert_eq!(
            p(&["jsonl"]).unwrap(),
            ReportTo {
                tensorboard: false,
                jsonl: true
            }
        );
        let e = p(&["wandb"]).unwrap_err().to_string();
        assert!(e.contains("\"wandb\""), "{e}");
        assert!(p(&["none", "jsonl"]).is_err());
    }

    #[test]
    fn jsonl_lines_have_exactly_the_given_keys() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("sub/metrics.jsonl");
        let mut w = JsonlWriter::open(&path).unwrap();
        w.log(
            10,
            &m(&[("loss", 0.5), ("learning_rate", 1e-5), ("epoch", 0.25)]),
        )
        .unwrap();
        w.log(20, &m(&[("eval_loss", f64::NAN), ("step", 999.0)]))
            .unwrap();
        // Read before drop: each line must already be in the file.
        let got = lines(&path);
        assert_eq!(
            got[0],
            serde_json::json!({"step": 10, "loss": 0.5, "learning_rate": 1e-5, "epoch": 0.25})
        );
        assert_eq!(got[1], serde_json::json!({"step": 20, "eval_loss": null}));
        assert_eq!(got.len(), 2);
        // `step` comes first so `head metrics.jsonl` reads naturally.
        assert!(fs::read_to_string(&path)
            .unwrap()
            .starts_with("{\"step\":10,"));
        drop(w);
        // Reopening appends, on a fresh line even after a cut one.
        fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"step\": 2")
            .unwrap();
        JsonlWriter::open(&path)
            .unwrap()
            .log(30, &m(&[("loss", 0.25)]))
            .unwrap();
        let text = fs::read_to_string(&path).unwrap();
        assert!(
            text.ends_with("{\"step\": 2\n{\"step\":30,\"loss\":0.25}\n"),
            "{text}"
        );
    }

    #[test]
    fn resume_drops_lines_after_the_checkpoint() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("metrics.jsonl");
        let mut w = JsonlWriter::open(&path).unwrap();
        for step in [10, 20, 30, 40] {
            w.log(step, &m(&[("loss", step as f64)])).unwrap();
        }
        drop(w);
        // A killed run's cut last line.
        fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"step\": 41, \"lo")
            .unwrap();
        let mut w = JsonlWriter::resume(&path, 20).unwrap();
        w.log(30, &m(&[("loss", -1.0)])).unwrap();
        let steps: Vec<_> = lines(&path)
            .iter()
            .map(|v| (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap()))
            .collect();
        assert_eq!(steps, vec![(10, 10.0), (20, 20.0), (30, -1.0)]);
        // A fresh run with no file yet.
        let fresh = tmp.path().join("new.jsonl");
        JsonlWriter::resume(&fresh, 5).unwrap();
        assert!(fresh.exists());
    }

    #[test]
    fn logger_sends_raw_keys_to_jsonl_and_rewritten_tags_to_tensorboard() {
        let tmp = tempfile::tempdir().unwrap();
        let tb_dir = tmp.path().join("runs/r1");
        let jsonl = tmp.path().join("metrics.jsonl");
        let mut log = MetricsLogger::new(&["all"], &tb_dir, &jsonl).unwrap();
        log.log_text("args", "{\"lr\": 1e-5}", 0).unwrap();
        log.log(
            5,
            &m(&[("loss", 1.5), ("learning_rate", 2e-5), ("epoch", 0.5)]),
        )
        .unwrap();
        log.log(5, &m(&[("eval_loss", 1.25), ("eval_accuracy", 0.75)]))
            .unwrap();
        let tb = log.tensorboard().unwrap().path().to_path_buf();
        assert!(tb.starts_with(&tb_dir));
        let mut got = read_scalars(&tb).unwrap();
        got.sort_by(|a, b| a.1.cmp(&b.1));
        assert_eq!(
            got,
            vec![
                (5, "eval/accuracy".into(), 0.75),
                (5, "eval/loss".into(), 1.25),
                (5, "train/epoch".into(), 0.5),
                (5, "train/learning_rate".into(), 2e-5),
                (5, "train/loss".into(), 1.5),
            ]
        );
        let got = lines(&jsonl);
        assert_eq!(
            got,
            vec![
                serde_json::json!({"step": 5, "epoch": 0.5, "learning_rate": 2e-5, "loss": 1.5}),
                serde_json::json!({"step": 5, "eval_accuracy": 0.75, "eval_loss": 1.25}),
            ]
        );
    }

    #[test]
    fn open_lays_out_output_dir_and_resume_truncates_jsonl() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path();
        let report_to = vec!["tensorboard".to_string(), "jsonl".to_string()];
        let mut log = MetricsLogger::open(out, &report_to, 0).unwrap();
        for step in [1, 2, 3] {
            log.log(step, &m(&[("loss", step as f64)])).unwrap();
        }
        let tb = log.tensorboard().unwrap().path().to_path_buf();
        assert_eq!(tb.parent().unwrap().parent().unwrap(), out.join("runs"));
        assert_eq!(log.jsonl().unwrap().path(), out.join(METRICS_FILE));
        drop(log);
        // Resumed from checkpoint-2: step 3 is dropped and logged again, then the summary.
        let mut log = MetricsLogger::open(out, &report_to, 2).unwrap();
        log.log(3, &m(&[("loss", 0.5)])).unwrap();
        log.summary(3, &m(&[("train_runtime", 12.0), ("train_loss", 1.0)]))
            .unwrap();
        let got = lines(&out.join(METRICS_FILE));
        assert_eq!(got.len(), 4, "{got:?}");
        assert_eq!(got[2], serde_json::json!({"step": 3, "loss": 0.5}));
        assert_eq!(
            got[3],
            serde_json::json!({"step": 3, "train_loss": 1.0, "train_runtime": 12.0})
        );
        let scalars = read_scalars(log.tensorboard().unwrap().path()).unwrap();
        assert!(scalars.contains(&(3, "train/train_runtime".into(), 12.0)));
        // A fresh run (resume step 0) starts the file over.
        drop(log);
        MetricsLogger::open(out, &report_to, 0).unwrap();
        assert!(lines(&out.join(METRICS_FILE)).is_empty());
    }

    #[test]
    fn unselected_sinks_write_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let tb_dir = tmp.path().join("runs");
        let jsonl = tmp.path().join("metrics.jsonl");
        let mut log = MetricsLogger::new(&["jsonl"], &tb_dir, &jsonl).unwrap();
        log.log(1, &m(&[("loss", 1.0)])).unwrap();
        log.log_text("args", "x", 0).unwrap();
        assert!(!tb_dir.exists());
        assert_eq!(lines(&jsonl).len(), 1);
        let mut none = MetricsLogger::new(&["none"], &tb_dir, tmp.path().join("n.jsonl")).unwrap();
        none.log(1, &m(&[("loss", 1.0)])).unwrap();
        assert!(!tb_dir.exists());
        assert!(!tmp.path().join("n.jsonl").exists());
    }
}
