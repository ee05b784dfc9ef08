//! What runs a training job, apart from what one step does. A [`Run`] opens the metrics
//! logger and the progress bar, keeps the logging window, stops a run that keeps producing
//! non-finite losses, says when to evaluate and when to save, and writes the summary. The
//! shared loop ([`crate::trainer::train`]) and PPO ([`crate::ppo::PpoTrainer::train`]) both
//! drive one, so their logs, schedules and summaries follow one set of rules:
//!
//! ```text
//! let mut run = Run::open(args, &state.run, epoch, has_eval, show)?;
//! if run.eval_on_start(&state.run) { run.log_eval(&mut state.run, evaluate()?)? }
//! while state.run.global_step < state.run.max_steps {
//!     ... one step (it advances global_step) ...
//!     run.end_step(&mut state.run, report)?;        // guard, window, log, progress
//!     if run.eval_due(&state.run) { run.log_eval(&mut state.run, evaluate()?)? }
//!     if run.save_due(&state.run) { ... write checkpoint-N ... }
//! }
//! run.finish(&state.run, own_summary, evaluate)
//! ```
//!
//! What of it a checkpoint keeps is [`RunState`], flattened into each method's
//! `trainer_state.json`; the rest (window, guard count, timers) starts afresh on resume, as
//! transformers' does.
//!
//! The evaluation schedule ([`EvalSchedule`]) is transformers' `IntervalStrategy`:
//! `eval_strategy = "no" | "steps" | "epoch"`; with "steps", every `eval_steps`, which
//! defaults to `logging_steps`; with "epoch", after the step in which an epoch of the training
//! data ends (for PPO, one pass over the prompt set); `eval_on_start` evaluates once before the
//! first step of a fresh run. A run with evaluation data always ends with an evaluation in its
//! summary, whatever `eval_strategy` says (what `trainer.train(); trainer.evaluate()` gives):
//! the one made after the last step when the schedule made one there, else a new one.

use std::collections::BTreeMap;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::config::TrainingArgs;
use crate::metrics::MetricsLogger;
use crate::{Error, Result};

/// Metrics by name, as logged.
pub type Metrics = BTreeMap<String, f64>;

/// What a finished run reports (also the last line of metrics.jsonl).
pub type Summary = BTreeMap<String, f64>;

/// Steps in a row with a non-finite loss or gradient after which a run stops.
pub const MAX_BAD_STEPS: usize = 5;

/// The part of a run a checkpoint keeps (flattened into `trainer_state.json` beside the
/// method's own state).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RunState {
    /// Steps taken (optimiser steps; PPO steps: rollout + update).
    pub global_step: usize,
    /// Steps the run will take in all.
    pub max_steps: usize,
    /// Steps whose update was skipped (wholly or, for PPO, in part) for a non-finite loss or
    /// gradient.
    pub skipped_steps: usize,
    /// Everything logged so far, as transformers' `log_history`. A non-finite value (a PPO
    /// step whose update was partly skipped logs a NaN loss) is written as JSON `null` and
    /// read back as NaN, so such a checkpoint still resumes.
    #[serde(deserialize_with = "null_as_nan")]
    pub log_history: Vec<BTreeMap<String, f64>>,
}

/// Reads a log history whose non-finite values were written as `null`.
fn null_as_nan<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Vec<BTreeMap<String, f64>>, D::Error> {
    let rows: Vec<BTreeMap<String, Option<f64>>> = serde::Deserialize::deserialize(d)?;
    Ok(rows
        .into_iter()
        .map(|r| {
            r.into_iter()
                .map(|(k, v)| (k, v.unwrap_or(f64::NAN)))
                .collect()
        })
        .collect())
}

impl RunState {
    /// A run of `max_steps` steps, none taken.
    pub fn new(max_steps: usize) -> Self {
        Self {
            global_step: 0,
            max_steps,
            skipped_steps: 0,
            log_history: Vec::new(),
        }
    }
}

/// What one step hands its run.
#[derive(Debug, Default)]
pub struct StepReport {
    /// Averaged over the logging window; a name may come several times in one step (once per
    /// micro-batch, say), each counting once.
    pub mean: Vec<(String, f64)>,
    /// Logged at their latest value (counters, the learning rate, the KL coefficient); a value
    /// stays until a later step reports the name again.
    pub last: Vec<(String, f64)>,
    /// Samples processed (for `train_samples_per_second`).
    pub samples: usize,
    /// Epochs done after the step, as a fraction (logged as `epoch`).
    pub epoch: f64,
    /// The step's update was skipped (in part, for PPO) for a non-finite loss or gradient.
    pub skipped: bool,
}

/// `eval_strategy` with its interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EvalStrategy {
    /// No evaluation during training.
    No,
    /// Every this many steps.
    Steps(usize),
    /// After the step in which an epoch ends.
    Epoch,
}

/// When a run evaluates (see the module docs for the rule).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EvalSchedule {
    /// During training.
    pub strategy: EvalStrategy,
    /// Once before the first step of a fresh run.
    pub on_start: bool,
}

impl EvalSchedule {
    /// The schedule `args` configure: `eval_steps` defaults to `logging_steps`.
    pub fn from_args(args: &TrainingArgs) -> Result<Self> {
        let strategy = match args.eval_strategy.as_str() {
            "no" => EvalStrategy::No,
            "steps" => EvalStrategy::Steps(args.eval_steps.unwrap_or(args.logging_steps).max(1)),
            "epoch" => EvalStrategy::Epoch,
            other => {
                return Err(Error::Config(format!(
                    "eval_strategy = {other:?}: use \"no\", \"steps\" or \"epoch\""
                )))
            }
        };
        Ok(Self {
            strategy,
            on_start: args.eval_on_start,
        })
    }

    /// Whether to evaluate after step `global_step`, in which an epoch ended or not.
    pub fn after_step(&self, global_step: usize, epoch_ended: bool) -> bool {
        match self.strategy {
            EvalStrategy::No => false,
            EvalStrategy::Steps(n) => global_step.is_multiple_of(n),
            EvalStrategy::Epoch => epoch_ended,
        }
    }
}

/// Whether an update with this loss and gradient norm may be applied: a non-finite one is
/// skipped with a warning, so nothing non-finite reaches the weights. [`Run::end_step`] stops
/// the run after [`MAX_BAD_STEPS`] steps in a row with a skipped update.
pub fn finite_update(step: usize, loss: f64, grad_norm: f64) -> bool {
    if loss.is_finite() && grad_norm.is_finite() {
        return true;
    }
    tracing::warn!(
        "step {step}: loss {loss} / grad_norm {grad_norm} is not finite; update skipped"
    );
    false
}

/// Whether the optimiser applied a step's update: one it refused because it would have made a
/// weight non-finite ([`Update::NonFinite`], nothing changed) is skipped with a warning and
/// counted like a non-finite loss.
///
/// [`Update::NonFinite`]: crate::optim::Update::NonFinite
pub fn applied(step: usize, update: crate::optim::Update) -> bool {
    match update {
        crate::optim::Update::Applied => true,
        crate::optim::Update::NonFinite { param } => {
            tracing::warn!(
                "step {step}: the update would make `{param}` non-finite; update rolled back \
                 and skipped"
            );
            false
        }
    }
}

/// The logging window: sums of averaged metrics since the last log, latest values of the
/// others.
#[derive(Default)]
struct Window {
    sums: BTreeMap<String, (f64, usize)>,
    latest: BTreeMap<String, f64>,
}

impl Window {
    fn add(&mut self, report: &StepReport) {
        for (k, v) in &report.mean {
            let e = self.sums.entry(k.clone()).or_insert((0.0, 0));
            e.0 += v;
            e.1 += 1;
        }
        for (k, v) in &report.last {
            self.latest.insert(k.clone(), *v);
        }
        self.latest.insert("epoch".into(), report.epoch);
    }

    /// The window's log line; the sums start again, latest values stay.
    fn take(&mut self) -> Metrics {
        let mut log: Metrics = self.latest.clone();
        for (k, (sum, n)) in std::mem::take(&mut self.sums) {
            log.insert(k, sum / n as f64);
        }
        log
    }
}

/// A training job's logger, progress bar, logging window, non-finite guard, evaluation and
/// save schedules, and summary.
pub struct Run {
    /// Where the run's checkpoints are.
    output_dir: std::path::PathBuf,
    logger: MetricsLogger,
    bar: indicatif::ProgressBar,
    /// Keys of a logged line shown beside the progress bar.
    show: &'static [&'static str],
    logging_steps: usize,
    save_steps: usize,
    schedule: EvalSchedule,
    has_eval: bool,
    started: Instant,
    /// Samples processed since this process started the run.
    samples: usize,
    window: Window,
    consecutive_bad: usize,
    /// Epochs done (fraction) after the last step, and whether an epoch ended in it.
    epoch: f64,
    epoch_ended: bool,
    /// The last evaluation and the step it was made at.
    last_eval: Option<(usize, Metrics)>,
}

impl Run {
    /// Opens the run's logger (continuing metrics.jsonl after `state.global_step` when
    /// resuming) and progress bar. `epoch` is the data's epoch progress before the next step;
    /// `has_eval` whether there is evaluation data; `show` the logged keys the progress bar
    /// shows.
    pub fn open(
        args: &TrainingArgs,
        state: &RunState,
        epoch: f64,
        has_eval: bool,
        show: &'static [&'static str],
    ) -> Result<Self> {
        // Rank 0 of a data-parallel job logs; the others run silent.
        let root = crate::dist::is_root();
        let (logger, bar) = if root {
            std::fs::create_dir_all(&args.output_dir)
                .map_err(|e| Error::io(&args.output_dir, e))?;
            (
                MetricsLogger::open(&args.output_dir, &args.report_to, state.global_step)?,
                progress(state.max_steps, state.global_step),
            )
        } else {
            (MetricsLogger::none(), indicatif::ProgressBar::hidden())
        };
        Ok(Self {
            output_dir: args.output_dir.clone(),
            logger,
            bar,
            show,
            logging_steps: args.logging_steps.max(1),
            save_steps: args.save_steps,
            schedule: EvalSchedule::from_args(args)?,
            has_eval,
            started: Instant::now(),
            samples: 0,
            window: Window::default(),
            consecutive_bad: 0,
            epoch,
            epoch_ended: false,
            last_eval: None,
        })
    }

    /// Whether to evaluate before the first step (`eval_on_start`, a fresh run).
    pub fn eval_on_start(&self, state: &RunState) -> bool {
        self.has_eval && self.schedule.on_start && state.global_step == 0
    }

    /// Takes a finished step: counts a skipped update (and stops the run with
    /// [`Error::Diverged`] after [`MAX_BAD_STEPS`] in a row), adds the step's metrics to the
    /// window, and logs the window every `logging_steps` steps and at the last step. The step
    /// has already advanced `state.global_step`.
    pub fn end_step(&mut self, state: &mut RunState, report: StepReport) -> Result<()> {
        if report.skipped {
            state.skipped_steps += 1;
            self.consecutive_bad += 1;
            if self.consecutive_bad >= MAX_BAD_STEPS {
                // Every checkpoint holds finite weights (a refused update changes nothing).
                let last = match crate::trainer::checkpoints(&self.output_dir).pop() {
                    Some((_, p)) => format!(
                        "the last good checkpoint is {} (resume from it with a lower \
                         learning_rate: --resume {0})",
                        p.display()
                    ),
                    None => format!(
                        "no checkpoint was saved in {} yet",
                        self.output_dir.display()
                    ),
                };
                return Err(Error::Diverged(format!(
                    "{MAX_BAD_STEPS} steps in a row had a non-finite loss, gradient or updated \
                     weight (last at step {}, {} skipped in all); lower learning_rate or check \
                     the data; {last}",
                    state.global_step, state.skipped_steps
                )));
            }
        } else {
            self.consecutive_bad = 0;
        }
        self.epoch_ended = report.epoch.floor() > self.epoch.floor();
        self.epoch = report.epoch;
        self.samples += report.samples;
        self.window.add(&report);
        self.bar.inc(1);
        let gs = state.global_step;
        if gs.is_multiple_of(self.logging_steps) || gs == state.max_steps {
            let log = self.window.take();
            self.bar.set_message(self.shown(&log));
            self.log(state, log)?;
        }
        Ok(())
    }

    /// Whether the schedule evaluates after the step just ended.
    pub fn eval_due(&self, state: &RunState) -> bool {
        self.has_eval
            && state.global_step > 0
            && self
                .schedule
                .after_step(state.global_step, self.epoch_ended)
    }

    /// Logs an evaluation (eval_-prefixed metrics) at the current step, with the epoch.
    pub fn log_eval(&mut self, state: &mut RunState, mut eval: Metrics) -> Result<()> {
        eval.insert("epoch".into(), self.epoch);
        if state.global_step == 0 {
            tracing::info!("before training: {}", eval_line(&eval));
        }
        self.last_eval = Some((state.global_step, eval.clone()));
        self.log(state, eval)
    }

    /// Whether to write `checkpoint-{global_step}` now (every `save_steps`; the last step's
    /// weights go to `output_dir` itself instead).
    pub fn save_due(&self, state: &RunState) -> bool {
        self.save_steps > 0
            && state.global_step.is_multiple_of(self.save_steps)
            && state.global_step < state.max_steps
    }

    /// Ends the run: the summary is transformers' `train_runtime`,
    /// `train_samples_per_second`, `train_steps_per_second` and `skipped_steps`, the method's
    /// own entries (`own`), and, with evaluation data, the final evaluation (the one made at
    /// the last step, else `evaluate()`); written as the last line of metrics.jsonl. Call it
    /// after the final weights are saved.
    pub fn finish(
        mut self,
        state: &RunState,
        own: Summary,
        evaluate: impl FnOnce() -> Result<Metrics>,
    ) -> Result<Summary> {
        self.bar.finish_and_clear();
        let runtime = self.started.elapsed().as_secs_f64();
        let mut summary = Summary::new();
        summary.insert("train_runtime".into(), runtime);
        summary.insert(
            "train_samples_per_second".into(),
            self.samples as f64 / runtime.max(1e-9),
        );
        summary.insert(
            "train_steps_per_second".into(),
            state.global_step as f64 / runtime.max(1e-9),
        );
        summary.insert("skipped_steps".into(), state.skipped_steps as f64);
        summary.extend(own);
        if self.has_eval {
            let eval = match self.last_eval.take() {
                Some((step, eval)) if step == state.global_step => eval,
                _ => {
                    let mut eval = evaluate()?;
                    eval.insert("epoch".into(), self.epoch);
                    eval
                }
            };
            tracing::info!("after training: {}", eval_line(&eval));
            summary.extend(eval);
        }
        self.logger.summary(state.global_step, &summary)?;
        Ok(summary)
    }

    fn log(&mut self, state: &mut RunState, mut metrics: Metrics) -> Result<()> {
        self.logger.log(state.global_step, &metrics)?;
        metrics.insert("step".into(), state.global_step as f64);
        state.log_history.push(metrics);
        Ok(())
    }

    fn shown(&self, log: &Metrics) -> String {
        self.show
            .iter()
            .filter_map(|k| log.get(*k).map(|v| format!("{k} {v:.4}")))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// An evaluation's metrics for a log line, without its timings and epoch.
fn eval_line(eval: &Metrics) -> String {
    eval.iter()
        .filter(|(k, _)| {
            !(k.ends_with("runtime") || k.ends_with("per_second") || k.as_str() == "epoch")
        })
        .map(|(k, v)| format!("{k} {v:.4}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The progress bar on stderr, at `done` of `total` steps.
pub(crate) fn progress(total: usize, done: usize) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(total as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} steps {elapsed_precise} eta {eta} {msg}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_position(done as u64);
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(strategy: &str, eval_steps: Option<usize>, logging_steps: usize) -> TrainingArgs {
        TrainingArgs {
            eval_strategy: strategy.into(),
            eval_steps,
            logging_steps,
            ..Default::default()
        }
    }

    /// transformers' rule: "steps" without `eval_steps` evaluates every `logging_steps`.
    #[test]
    fn eval_steps_default_to_logging_steps() {
        let s = EvalSchedule::from_args(&args("steps", None, 4)).unwrap();
        assert_eq!(s.strategy, EvalStrategy::Steps(4));
        let due: Vec<usize> = (1..=12).filter(|&g| s.after_step(g, false)).collect();
        assert_eq!(due, [4, 8, 12]);
        let s = EvalSchedule::from_args(&args("steps", Some(5), 4)).unwrap();
        assert_eq!(s.strategy, EvalStrategy::Steps(5));
        let s = EvalSchedule::from_args(&args("no", Some(5), 4)).unwrap();
        assert!(!(1..=20).any(|g| s.after_step(g, true)));
    }

    #[test]
    fn epoch_strategy_evaluates_when_an_epoch_ends() {
        let s = EvalSchedule::from_args(&args("epoch", None, 1)).unwrap();
        assert!(s.after_step(3, true));
        assert!(!s.after_step(4, false));
    }

    fn report(mean: &[(&str, f64)], last: &[(&str, f64)], epoch: f64) -> StepReport {
        StepReport {
            mean: mean.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            last: last.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            samples: 1,
            epoch,
            skipped: false,
        }
    }

    /// Means average every entry of the window (a name twice in a step counts twice); latest
    /// values carry over into windows that do not report them.
    #[test]
    fn the_window_averages_means_and_keeps_latest_values() {
        let mut w = Window::default();
        w.add(&report(
            &[("loss", 1.0), ("acc", 0.0), ("acc", 1.0)],
            &[("lr", 0.1), ("grad_norm", 2.0)],
            0.25,
        ));
        w.add(&report(&[("loss", 3.0), ("acc", 1.0)], &[("lr", 0.2)], 0.5));
        let log = w.take();
        assert_eq!(log["loss"], 2.0);
        assert_eq!(log["acc"], 2.0 / 3.0);
        assert_eq!((log["lr"], log["grad_norm"], log["epoch"]), (0.2, 2.0, 0.5));
        w.add(&report(&[], &[("lr", 0.3)], 0.75));
        let log = w.take();
        assert!(!log.contains_key("loss"), "no step reported a loss");
        assert_eq!((log["lr"], log["grad_norm"]), (0.3, 2.0));
    }

    /// Skipped updates are counted; five in a row stop the run, a good step between resets.
    #[test]
    fn the_guard_stops_after_five_bad_steps_in_a_row() {
        let dir = tempfile::tempdir().unwrap();
        let args = TrainingArgs {
            output_dir: dir.path().to_path_buf(),
            report_to: vec!["jsonl".into()],
            logging_steps: 1,
            ..Default::default()
        };
        let mut state = RunState::new(20);
        let mut run = Run::open(&args, &state, 0.0, false, &[]).unwrap();
        let step = |run: &mut Run, state: &mut RunState, bad: bool| {
            state.global_step += 1;
            let mut r = report(&[], &[], 0.0);
            r.skipped = bad;
            run.end_step(state, r)
        };
        for bad in [true, true, true, true, false, true, true, true, true] {
            step(&mut run, &mut state, bad).unwrap();
        }
        assert_eq!(state.skipped_steps, 8);
        let err = step(&mut run, &mut state, true).unwrap_err();
        assert!(err.to_string().contains("non-finite"), "{err}");
        assert!(!finite_update(1, f64::NAN, 1.0) && !finite_update(1, 1.0, f64::INFINITY));
        assert!(finite_update(1, 1.0, 1.0));
    }
}

#[cfg(test)]
mod null_tests {
    use super::*;

    /// A NaN in the log history (a PPO step whose update was partly skipped) is written as
    /// `null` and read back as NaN, also through the trainer state that flattens it, so the
    /// checkpoint still resumes.
    #[test]
    fn a_nan_in_the_log_history_survives_a_checkpoint() {
        let mut st = RunState::new(3);
        st.log_history.push(BTreeMap::from([
            ("loss/policy_avg".to_string(), f64::NAN),
            ("step".to_string(), 1.0),
        ]));
        let json = serde_json::to_string(&st).unwrap();
        assert!(json.contains("null"), "{json}");
        let back: RunState = serde_json::from_str(&json).unwrap();
        assert!(back.log_history[0]["loss/policy_avg"].is_nan());
        assert_eq!(back.log_history[0]["step"], 1.0);
        let state = crate::trainer::TrainerState {
            run: st,
            sampler: rlhf_data::Sampler::new(4, 0, false).state(),
            total_loss: 0.0,
            samples_seen: 0,
            tokens_seen: 0,
            world_size: 1,
        };
        let json = serde_json::to_string(&state).unwrap();
        let back: crate::trainer::TrainerState = serde_json::from_str(&json).unwrap();
        assert!(back.run.log_history[0]["loss/policy_avg"].is_nan());
    }
}
