//! `rlhf report`: a run directory as one self-contained `report.html` (plots inlined as
//! PNG data URIs, no network requests) with the PNGs beside it.
//!
//! A run directory is a training run (`metrics.jsonl`, maybe PPO's `eval_step{N}.jsonl`),
//! an `rlhf eval` output (`eval.json`), or a pipeline output whose subdirectories (`sft/`,
//! `reward/`, `ppo/`, `eval/`, ...) hold those files. The report shows whatever is there:
//! training curves per stage, the eval table and KL, reward distributions, gold and proxy
//! scores against KL, and answers side by side; a missing part is a note on the page.

mod canvas;
mod data;
mod html;
mod plot;
mod sections;

use std::path::{Path, PathBuf};

pub use data::{parse_metrics, Metrics};

/// What can stop a report.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The run directory is missing or is a file.
    #[error(
        "{}: not a directory; give a run directory (a training run with metrics.jsonl, an \
         `rlhf eval` output with eval.json, or a pipeline output with sft/, reward/, ppo/, eval/)",
        .0.display()
    )]
    NotADir(PathBuf),
    /// The run directory holds nothing the report can show.
    #[error(
        "{}: nothing to report: no metrics.jsonl, eval.json, gold_proxy.jsonl or \
         eval_step*.jsonl in it or in its subdirectories",
        .0.display()
    )]
    Empty(PathBuf),
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// plotters could not draw or encode a chart.
    #[error("{}: cannot draw the chart: {message}", path.display())]
    Plot {
        /// The PNG being written.
        path: PathBuf,
        /// plotters' error.
        message: String,
    },
}

/// This crate's result.
pub type Result<T> = std::result::Result<T, Error>;

/// The report's file name in the output directory.
pub const REPORT_FILE: &str = "report.html";

/// Stage directories in pipeline order; others follow by name.
const STAGE_ORDER: [&str; 10] = [
    "sft",
    "reward",
    "ppo",
    "dpo",
    "kto",
    "rejection_sampling",
    "rest",
    "hir",
    "eval",
    "eval_sft",
];

/// The files a run directory holds, each with the label of the directory it came from.
#[derive(Debug, Default)]
struct Found {
    /// `(stage, metrics.jsonl)`.
    metrics: Vec<(String, PathBuf)>,
    /// `(stage, [(step, eval_step{N}.jsonl)])`, for stages with at least one.
    ppo_evals: Vec<(String, Vec<(u64, PathBuf)>)>,
    /// `(label, eval.json)`.
    evals: Vec<(String, PathBuf)>,
    /// `(label, gold_proxy.jsonl)`.
    gold_proxy: Vec<(String, PathBuf)>,
}

impl Found {
    fn is_empty(&self) -> bool {
        self.metrics.is_empty()
            && self.ppo_evals.is_empty()
            && self.evals.is_empty()
            && self.gold_proxy.is_empty()
    }
}

/// Looks in `run_dir` itself and its immediate subdirectories (a pipeline's stages).
fn discover(run_dir: &Path) -> Result<Found> {
    let io = |source| Error::Io {
        path: run_dir.to_path_buf(),
        source,
    };
    let mut subdirs: Vec<(String, PathBuf)> = std::fs::read_dir(run_dir)
        .map_err(io)?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
        .collect();
    subdirs.sort_by_key(|(name, _)| {
        let rank = STAGE_ORDER.iter().position(|s| s == name);
        (rank.unwrap_or(STAGE_ORDER.len()), name.clone())
    });
    let own = run_dir
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "run".into());
    let mut found = Found::default();
    for (label, dir) in std::iter::once((own, run_dir.to_path_buf())).chain(subdirs) {
        let metrics = dir.join("metrics.jsonl");
        if metrics.is_file() {
            found.metrics.push((label.clone(), metrics));
        }
        let steps = data::eval_steps(&dir);
        if !steps.is_empty() {
            found.ppo_evals.push((label.clone(), steps));
        }
        let eval = dir.join("eval.json");
        if eval.is_file() {
            found.evals.push((label.clone(), eval));
        }
        let gp = dir.join("gold_proxy.jsonl");
        if gp.is_file() {
            found.gold_proxy.push((label, gp));
        }
    }
    Ok(found)
}

/// Writes `out_dir/report.html` and its PNGs for the run in `run_dir`; returns the page's
/// path. Parts the run lacks are notes on the page; an unreadable part is a note too (and a
/// warning), so one bad file does not cost the rest of the report.
pub fn write_report(run_dir: &Path, out_dir: &Path) -> Result<PathBuf> {
    if !run_dir.is_dir() {
        return Err(Error::NotADir(run_dir.to_path_buf()));
    }
    let found = discover(run_dir)?;
    if found.is_empty() {
        return Err(Error::Empty(run_dir.to_path_buf()));
    }
    std::fs::create_dir_all(out_dir).map_err(|source| Error::Io {
        path: out_dir.to_path_buf(),
        source,
    })?;
    let mut r = sections::Report::new(run_dir, out_dir);
    r.header(&found);
    r.training(&found.metrics)?;
    let evals = r.evaluation(&found.evals);
    r.distributions(&evals, &found.ppo_evals)?;
    r.gold_proxy(&found.gold_proxy)?;
    r.answers(&evals, &found.ppo_evals);
    let (html, n) = r.finish();
    let path = out_dir.join(REPORT_FILE);
    std::fs::write(&path, html).map_err(|source| Error::Io {
        path: path.clone(),
        source,
    })?;
    tracing::info!("{}: report with {n} plots", path.display());
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, text: &str) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    fn pngs(dir: &Path) -> usize {
        std::fs::read_dir(dir)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .path()
                    .extension()
                    .is_some_and(|x| x == "png")
            })
            .count()
    }

    /// Every `src=`, `href=` and CSS `url(` of the page, with its value.
    fn links(html: &str) -> Vec<String> {
        let mut out = Vec::new();
        for pat in ["src=\"", "href=\"", "src='", "href='", "url("] {
            let mut rest = html;
            while let Some(i) = rest.find(pat) {
                rest = &rest[i + pat.len()..];
                out.push(rest.chars().take(40).collect());
            }
        }
        out
    }

    #[test]
    fn missing_or_empty_dir_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let e = write_report(&tmp.path().join("nope"), tmp.path()).unwrap_err();
        assert!(matches!(e, Error::NotADir(_)), "{e}");
        // A pipeline dir whose stages wrote nothing yet.
        std::fs::create_dir_all(tmp.path().join("empty/sft")).unwrap();
        let e = write_report(&tmp.path().join("empty"), &tmp.path().join("out")).unwrap_err();
        assert!(matches!(e, Error::Empty(_)), "{e}");
        assert!(e.to_string().contains("nothing to report"));
    }

    #[test]
    fn single_run_only_some_parts() {
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path().join("my-sft");
        write(
            &run.join("metrics.jsonl"),
            "{\"step\":1,\"loss\":2.0,\"learning_rate\":1e-5}\n\
             {\"step\":2,\"loss\":1.5,\"learning_rate\":2e-5,\"eval_loss\":1.7}\n\
             {\"step\":2,\"train_runtime\":3.5,\"train_loss\":1.75}\n",
        );
        let out = tmp.path().join("out");
        let page = write_report(&run, &out).unwrap();
        assert_eq!(page, out.join(REPORT_FILE));
        let html = std::fs::read_to_string(&page).unwrap();
        // One chart per metric: loss, eval_loss, learning_rate.
        assert_eq!(pngs(&out), 3);
        assert_eq!(html.matches("<img ").count(), 3);
        assert!(html.contains("my-sft"));
        assert!(html.contains("train_runtime"));
        // The parts this run lacks are notes, not errors.
        assert!(html.contains("No eval.json"), "{html}");
        assert!(html.contains("No gold_proxy.jsonl"));
        assert!(html.contains("data-plots") || html.contains("dataset.plots"));
    }

    #[test]
    fn pipeline_with_broken_eval_still_reports() {
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path().join("pipe");
        write(
            &run.join("reward/metrics.jsonl"),
            "{\"step\":1,\"loss\":0.7,\"eval_accuracy\":0.6}\n",
        );
        write(&run.join("eval/eval.json"), "{not json");
        write(
            &run.join("eval/gold_proxy.jsonl"),
            "{\"checkpoint\":\"checkpoint-0\",\"step\":0,\"kl_k1\":0.0,\"kl_k3\":0.0,\"proxy\":0.1,\"gold\":0.2}\n\
             {\"checkpoint\":\"checkpoint-10\",\"step\":10,\"kl_k1\":0.8,\"kl_k3\":0.6,\"proxy\":1.4,\"gold\":0.7}\n",
        );
        write(
            &run.join("ppo/eval_step0.jsonl"),
            "{\"prompt\":\"q\",\"completion\":\"a\",\"score\":0.1}\n",
        );
        write(
            &run.join("ppo/eval_step10.jsonl"),
            "{\"prompt\":\"q\",\"completion\":\"b\",\"score\":0.9}\n",
        );
        let html = std::fs::read_to_string(write_report(&run, &run).unwrap()).unwrap();
        // reward: 2 curves; ppo: 1 histogram (first vs last); gold/proxy: 1.
        assert_eq!(pngs(&run), 4);
        assert!(
            html.contains("cannot read"),
            "the broken eval.json is named"
        );
        // With no eval rows, PPO's first and last held-out answers are the side-by-side.
        assert!(
            html.contains("held-out answers at step 0 vs step 10"),
            "{html}"
        );
        assert!(!html.contains("No per-answer scores"));
    }

    #[test]
    fn page_asks_the_network_for_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path().join("run");
        write(
            &run.join("metrics.jsonl"),
            "{\"step\":1,\"loss\":2.0}\n{\"step\":2,\"loss\":1.0}\n",
        );
        write(
            &run.join("eval.json"),
            r#"{"policy":"p","baseline":"b","judges":{"gold":{"kind":"scorer","win_rate":0.5}},
               "rows":[{"prompt":"see https://example.com <img src=\"http://x/y.png\">",
                        "policy":"a","baseline":"b","scores":{"gold":{"policy":1,"baseline":0}},
                        "verdicts":{"gold":"policy"}}]}"#,
        );
        let html = std::fs::read_to_string(write_report(&run, &run).unwrap()).unwrap();
        let links = links(&html);
        assert!(!links.is_empty());
        for l in &links {
            assert!(
                l.starts_with("data:") || l.starts_with('#'),
                "a reference outside the page: {l}"
            );
        }
        // The prompt's URL and markup are text, not an element.
        assert!(html.contains("&lt;img src=&quot;http://x/y.png&quot;&gt;"));
        assert!(!html.contains("<link") && !html.contains("@import"));
    }
}
