//! The report's sections in page order, each drawing its charts and writing its HTML, or a
//! note saying what is missing and which command makes it.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use crate::data::{self, Eval, Scored};
use crate::html::{self, Page, Pair};
use crate::plot::{self, tick};
use crate::{Found, Result};

/// How many prompts the side-by-side view shows per source.
const SHOW_ANSWERS: usize = 20;

/// A report being assembled: the page, where its PNGs go, and the names already taken.
pub struct Report {
    run_dir: PathBuf,
    out_dir: PathBuf,
    page: Page,
    nav: Vec<(&'static str, &'static str)>,
    names: HashSet<String>,
}

/// An eval.json that parsed, with the label of its directory.
pub type LoadedEval = (String, Eval);

impl Report {
    /// A report on `run_dir` writing into `out_dir`.
    pub fn new(run_dir: &Path, out_dir: &Path) -> Self {
        let title = run_dir
            .canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| run_dir.display().to_string());
        Self {
            run_dir: run_dir.to_path_buf(),
            out_dir: out_dir.to_path_buf(),
            page: Page::new(&format!("RLHF report: {title}")),
            nav: Vec::new(),
            names: HashSet::new(),
        }
    }

    /// `path` relative to the run directory, for display.
    fn rel(&self, path: &Path) -> String {
        path.strip_prefix(&self.run_dir)
            .unwrap_or(path)
            .display()
            .to_string()
    }

    /// A fresh PNG path in the output directory named after `parts` (file-name safe, and
    /// unique: `objective/kl` and `objective_kl` must not overwrite each other).
    fn png(&mut self, parts: &[&str]) -> PathBuf {
        let stem: String = parts
            .join("-")
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let mut name = format!("{stem}.png");
        let mut i = 2;
        while !self.names.insert(name.clone()) {
            name = format!("{stem}-{i}.png");
            i += 1;
        }
        self.out_dir.join(name)
    }

    fn section(&mut self, id: &'static str, title: &'static str) {
        self.nav.push((id, title));
        self.page.section(id, title);
    }

    /// Where the report came from and what it found.
    pub fn header(&mut self, found: &Found) {
        let list = |v: Vec<String>| {
            if v.is_empty() {
                "none".into()
            } else {
                v.join(", ")
            }
        };
        let rows = vec![
            ("run directory".into(), self.run_dir.display().to_string()),
            (
                "training runs".into(),
                list(found.metrics.iter().map(|(s, _)| s.clone()).collect()),
            ),
            (
                "evaluations".into(),
                list(found.evals.iter().map(|(_, p)| self.rel(p)).collect()),
            ),
            (
                "gold/proxy runs".into(),
                list(found.gold_proxy.iter().map(|(_, p)| self.rel(p)).collect()),
            ),
        ];
        html::kv_table(&mut self.page, &rows);
    }

    /// One small chart per metric, grouped per stage, with each run's summary.
    pub fn training(&mut self, runs: &[(String, PathBuf)]) -> Result<()> {
        self.section("training", "Training curves");
        if runs.is_empty() {
            self.page.note(
                "No metrics.jsonl here or in a stage subdirectory: no training curves. \
                 Trainers write one into their output_dir when report_to includes jsonl.",
            );
        }
        for (stage, path) in runs {
            self.page.h3(&format!("{stage} ({})", self.rel(path)));
            let m = match data::read_metrics(path) {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!("{e}");
                    self.page
                        .note(&format!("cannot read {}: {e}", self.rel(path)));
                    continue;
                }
            };
            if let Some(s) = &m.summary {
                let rows: Vec<(String, String)> = s
                    .iter()
                    .map(|(k, v)| {
                        let shown = match v.as_f64() {
                            Some(x) => tick(x),
                            None => v.as_str().map_or_else(|| v.to_string(), str::to_string),
                        };
                        (k.clone(), shown)
                    })
                    .collect();
                html::kv_table(&mut self.page, &rows);
            }
            if m.series.is_empty() {
                self.page.note("No numeric metrics logged at a step.");
                continue;
            }
            if m.skipped_lines > 0 {
                self.page.note(&format!(
                    "{} line(s) were not JSON objects and were skipped.",
                    m.skipped_lines
                ));
            }
            self.page.grid_start();
            for (metric, pts) in &m.series {
                let png = self.png(&[stage, metric]);
                plot::line_chart(&png, &format!("{stage}: {metric}"), pts)?;
                self.page
                    .figure(&png, &format!("{stage} {metric}"), plot::SMALL)?;
            }
            self.page.grid_end();
        }
        Ok(())
    }

    /// The eval table per eval.json; returns those that parsed, for the later sections.
    pub fn evaluation(&mut self, evals: &[(String, PathBuf)]) -> Vec<LoadedEval> {
        self.section("eval", "Evaluation");
        if evals.is_empty() {
            self.page.note(
                "No eval.json here or in eval/: run `rlhf eval` (or give the pipeline an \
                 [eval] stage) for win rates against the baseline.",
            );
        }
        let mut loaded = Vec::new();
        for (label, path) in evals {
            self.page.h3(&self.rel(path));
            let parsed = data::read(path)
                .map_err(|e| e.to_string())
                .and_then(|t| data::parse_eval(&t).map_err(|e| format!("{}: {e}", path.display())));
            let e = match parsed {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!("cannot read {e}");
                    self.page.note(&format!("cannot read {e}"));
                    continue;
                }
            };
            let mut meta = vec![];
            for (k, v) in [("policy", &e.policy), ("baseline", &e.baseline)] {
                if let Some(v) = v {
                    meta.push((k.to_string(), v.clone()));
                }
            }
            if let Some(n) = e.n_prompts {
                meta.push(("prompts".into(), n.to_string()));
            }
            if let Some(kl) = &e.kl {
                let f = |k: &str| kl.get(k).and_then(|v| v.as_f64());
                let samples = kl.get("samples").and_then(|v| v.as_u64());
                meta.push((
                    "KL".into(),
                    format!(
                        "k1 = {}, k3 = {}{}",
                        html::num(f("k1"), 4),
                        html::num(f("k3"), 4),
                        samples.map_or(String::new(), |s| format!(" over {s} samples"))
                    ),
                ));
            }
            html::kv_table(&mut self.page, &meta);
            if e.judges.is_empty() {
                self.page.note("eval.json has no judges.");
            } else {
                html::judges_table(&mut self.page, &e.judges);
                self.page.raw(
                    "<p class=\"muted\">Rates are percentages; losses are the baseline's \
                     wins (n_wins_base). Hover a header for its key in eval.json.</p>\n",
                );
            }
            loaded.push((label.clone(), e));
        }
        loaded
    }

    /// Histograms of the policy's vs the baseline's scores per scorer judge, and of PPO's
    /// held-out scores at its first vs last evaluation.
    pub fn distributions(
        &mut self,
        evals: &[LoadedEval],
        ppo: &[(String, Vec<(u64, PathBuf)>)],
    ) -> Result<()> {
        self.section("distributions", "Reward distributions");
        let mut drawn = false;
        for (label, e) in evals {
            let scorers: Vec<&str> = e
                .judges
                .iter()
                .filter(|j| j.is_scorer())
                .map(|j| j.name.as_str())
                .collect();
            let mut started = false;
            for judge in scorers {
                let (mut pol, mut base) = (Vec::new(), Vec::new());
                for r in &e.rows {
                    if let Some((_, p, b)) = r.scores.iter().find(|(j, _, _)| j == judge) {
                        pol.extend(*p);
                        base.extend(*b);
                    }
                }
                if pol.is_empty() && base.is_empty() {
                    continue;
                }
                if !started {
                    self.page.h3(&format!("{label}: policy vs baseline"));
                    self.page.grid_start();
                    started = true;
                }
                let png = self.png(&[label, "hist", judge]);
                plot::histogram(
                    &png,
                    &format!("{judge} scores"),
                    &[("baseline", &base), ("policy", &pol)],
                )?;
                self.page
                    .figure(&png, &format!("{judge} score histogram"), plot::SMALL)?;
                drawn = true;
            }
            if started {
                self.page.grid_end();
            }
        }
        for (stage, steps) in ppo {
            let (first, last) = (&steps[0], &steps[steps.len() - 1]);
            let mut series: Vec<(String, Vec<f64>)> = Vec::new();
            for (step, path) in if first.0 == last.0 {
                vec![first]
            } else {
                vec![first, last]
            } {
                match data::read_scored(path) {
                    Ok(rows) => series.push((
                        format!("step {step}"),
                        rows.iter().filter_map(|r| r.score).collect(),
                    )),
                    Err(e) => self.page.note(&format!("cannot read {e}")),
                }
            }
            if series.iter().all(|(_, v)| v.is_empty()) {
                continue;
            }
            self.page.h3(&format!(
                "{stage}: held-out reward, first vs last evaluation"
            ));
            self.page.grid_start();
            let png = self.png(&[stage, "hist", "eval_steps"]);
            let refs: Vec<(&str, &[f64])> = series
                .iter()
                .map(|(n, v)| (n.as_str(), v.as_slice()))
                .collect();
            plot::histogram(&png, &format!("{stage} reward model scores"), &refs)?;
            self.page
                .figure(&png, &format!("{stage} score histogram"), plot::SMALL)?;
            self.page.grid_end();
            drawn = true;
        }
        if !drawn {
            self.page.note(
                "No per-answer scores: eval.json rows with scorer judges or PPO's \
                 eval_step{N}.jsonl (give [ppo] an eval_file) give these histograms.",
            );
        }
        Ok(())
    }

    /// Gold and proxy mean scores against KL per PPO checkpoint.
    pub fn gold_proxy(&mut self, files: &[(String, PathBuf)]) -> Result<()> {
        self.section("gold-proxy", "Gold and proxy vs KL");
        if files.is_empty() {
            self.page.note(
                "No gold_proxy.jsonl: the pipeline writes it into its eval directory when \
                 it scores PPO checkpoints with both a gold and a proxy reward.",
            );
        }
        for (label, path) in files {
            let rows = match data::read(path) {
                Ok(t) => data::parse_gold_proxy(&t),
                Err(e) => {
                    self.page.note(&format!("cannot read {e}"));
                    continue;
                }
            };
            self.page.h3(&self.rel(path));
            if rows.is_empty() {
                self.page.note("gold_proxy.jsonl has no complete rows.");
                continue;
            }
            let png = self.png(&[label, "gold_proxy_kl"]);
            plot::gold_proxy(&png, &rows)?;
            // The numbers beside the chart.
            self.page.grid_start();
            self.page
                .figure(&png, "gold and proxy score vs KL", plot::WIDE)?;
            let mut h = String::from(
                "<table><tr><th>step</th><th>KL k1</th><th>proxy</th><th>gold</th></tr>",
            );
            for r in &rows {
                h.push_str(&format!(
                    "<tr><td>{}</td><td>{:.4}</td><td>{:.4}</td><td>{:.4}</td></tr>",
                    r.step, r.kl_k1, r.proxy, r.gold
                ));
            }
            h.push_str("</table>\n");
            self.page.raw(&h);
            self.page.grid_end();
        }
        Ok(())
    }

    /// The first prompts' answers side by side: baseline vs policy from eval.json, and PPO's
    /// first vs last held-out answers.
    pub fn answers(&mut self, evals: &[LoadedEval], ppo: &[(String, Vec<(u64, PathBuf)>)]) {
        self.section("answers", "Answers side by side");
        let mut shown = false;
        for (label, e) in evals.iter().filter(|(_, e)| !e.rows.is_empty()) {
            self.page.h3(&format!(
                "{label}: baseline vs policy (first {} of {})",
                e.rows.len().min(SHOW_ANSWERS),
                e.rows.len()
            ));
            let scores = |r: &data::EvalRow, policy: bool| {
                r.scores
                    .iter()
                    .filter_map(|(j, p, b)| {
                        let v = if policy { *p } else { *b };
                        v.map(|v| format!("{j} {}", tick(v)))
                    })
                    .collect::<Vec<_>>()
                    .join(" · ")
            };
            let pairs: Vec<Pair> = e
                .rows
                .iter()
                .take(SHOW_ANSWERS)
                .map(|r| Pair {
                    prompt: &r.prompt,
                    left: ("baseline", &r.baseline, scores(r, false)),
                    right: ("policy", &r.policy, scores(r, true)),
                    verdicts: &r.verdicts,
                })
                .collect();
            html::pairs(&mut self.page, &pairs);
            shown = true;
        }
        for (stage, steps) in ppo.iter().filter(|(_, s)| s.len() >= 2) {
            let (a, b) = (&steps[0], &steps[steps.len() - 1]);
            let (Ok(first), Ok(last)) = (data::read_scored(&a.1), data::read_scored(&b.1)) else {
                continue;
            };
            let n = first.len().min(last.len());
            self.page.h3(&format!(
                "{stage}: held-out answers at step {} vs step {} (first {} of {n})",
                a.0,
                b.0,
                n.min(SHOW_ANSWERS)
            ));
            let score = |s: &Scored| {
                s.score
                    .map_or(String::new(), |v| format!("score {}", tick(v)))
            };
            let (la, lb) = (format!("step {}", a.0), format!("step {}", b.0));
            let pairs: Vec<Pair> = first
                .iter()
                .zip(&last)
                .take(SHOW_ANSWERS)
                .map(|(x, y)| Pair {
                    prompt: &x.prompt,
                    left: (&la, &x.completion, score(x)),
                    right: (&lb, &y.completion, score(y)),
                    verdicts: &[],
                })
                .collect();
            html::pairs(&mut self.page, &pairs);
            shown = true;
        }
        if !shown {
            self.page.note(
                "No answers to compare: eval.json rows or two or more PPO eval_step{N}.jsonl \
                 files give them.",
            );
        }
    }

    /// The finished page and how many plots it holds.
    pub fn finish(self) -> (String, usize) {
        let n = self.page.images();
        let nav: Vec<(&str, &str)> = self.nav.to_vec();
        (self.page.finish(&nav), n)
    }
}
