//! The training loop every trainer shares, visible in one place:
//! batch → forward → loss → backward (× gradient_accumulation_steps) → clip → step → log →
//! eval → checkpoint. A trainer supplies only its [`Objective`]: how a micro-batch becomes a
//! loss and metrics, and how to evaluate.
//!
//! Runs are repeatable (seeded order and dropout) and resumable: a checkpoint holds the
//! weights (adapter or full model), the optimiser state, the data order's position and the
//! logged history, so `--resume` continues to the same weights an uninterrupted run reaches.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::Tensor;
use rlhf_data::{Sampler, SamplerState};
use rlhf_model::{Heads, Model};
use serde::{Deserialize, Serialize};

use crate::config::TrainingArgs;
use crate::metrics::MetricsLogger;
use crate::optim::{clip_grad_norm, AdamW};
use crate::scheduler::LrScheduler;
use crate::{Error, Result};

/// How one optimiser step's micro-batches are weighted.
#[derive(Debug, Clone, Copy)]
pub struct StepScale {
    /// Micro-batches in this optimiser step.
    pub micro_batches: usize,
    /// Loss items (e.g. labelled tokens) over all micro-batches of the step, for objectives
    /// that normalise by it as transformers does with `num_items_in_batch`.
    pub step_items: usize,
}

/// What one micro-batch produced.
pub struct MicroOut {
    /// The loss to differentiate, already scaled so the step's micro-batch losses sum to the
    /// step loss.
    pub loss: Tensor,
    /// Metrics averaged over the logging window (TRL's names: `accuracy`, `margin`, ...).
    pub metrics: Vec<(&'static str, f64)>,
    /// Units of throughput (pairs for the reward trainer, sequences otherwise).
    pub samples: usize,
    /// Non-pad tokens processed.
    pub tokens: usize,
}

/// A trainer's part of the loop.
pub trait Objective {
    /// One element of the training set (a sequence, or a pair group).
    type Example;

    /// Loss items of an example (see [`StepScale::step_items`]); 1 by default.
    fn items(&self, _ex: &Self::Example) -> usize {
        1
    }

    /// Forward and loss of one micro-batch.
    fn loss(&self, model: &Model, batch: &[&Self::Example], scale: StepScale) -> Result<MicroOut>;

    /// Metrics over an evaluation set, unprefixed (`loss`, `accuracy`, ...); the loop adds
    /// `eval_`.
    fn evaluate(
        &self,
        model: &Model,
        examples: &[Self::Example],
        batch_size: usize,
    ) -> Result<BTreeMap<String, f64>>;
}

/// Everything the loop needs to continue where it stopped, saved as trainer_state.json.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainerState {
    /// Optimiser steps taken.
    pub global_step: usize,
    /// Steps the run will take in all.
    pub max_steps: usize,
    /// Position of the data order.
    pub sampler: SamplerState,
    /// Sum of step losses so far (for `train_loss`).
    pub total_loss: f64,
    /// Steps skipped for a non-finite loss or gradient.
    pub skipped_steps: usize,
    /// Samples and tokens processed.
    pub samples_seen: usize,
    /// Tokens processed.
    pub tokens_seen: usize,
    /// Everything logged so far, as transformers' `log_history`.
    pub log_history: Vec<BTreeMap<String, f64>>,
}

/// What a finished run reports (also the last line of metrics.jsonl).
pub type Summary = BTreeMap<String, f64>;

/// The number of optimiser steps a run takes (transformers' rule: `max_steps` if set, else
/// ceil(epochs × floor(batches per epoch / accumulation))).
pub fn total_steps(args: &TrainingArgs, n_examples: usize) -> usize {
    if args.max_steps > 0 {
        return args.max_steps as usize;
    }
    let batches = n_examples.div_ceil(args.per_device_train_batch_size);
    let per_epoch = (batches / args.gradient_accumulation_steps).max(1);
    (args.num_train_epochs * per_epoch as f64).ceil() as usize
}

/// The checkpoints in `output_dir`, oldest first.
pub fn checkpoints(output_dir: &Path) -> Vec<(usize, PathBuf)> {
    let mut v: Vec<(usize, PathBuf)> = std::fs::read_dir(output_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix("checkpoint-")?.parse().ok()?;
            e.path()
                .join("trainer_state.json")
                .exists()
                .then(|| (step, e.path()))
        })
        .collect();
    v.sort();
    v
}

/// `--resume` with no directory: the newest checkpoint in `output_dir`.
pub fn resolve_resume(output_dir: &Path, given: Option<&Path>) -> Result<PathBuf> {
    match given {
        Some(p) => Ok(p.to_path_buf()),
        None => checkpoints(output_dir)
            .pop()
            .map(|(_, p)| p)
            .ok_or_else(|| {
                Error::Config(format!(
                    "--resume: no checkpoint-N directory with trainer_state.json in {}",
                    output_dir.display()
                ))
            }),
    }
}

/// The loop. `model` must already hold the weights to start from (the checkpoint's, when
/// resuming); `resume` is that checkpoint, for the optimiser and the loop state.
pub fn train<O: Objective>(
    args: &TrainingArgs,
    model: &Model,
    objective: &O,
    train_set: &[O::Example],
    eval_set: &[O::Example],
    heads: Heads,
    resume: Option<&Path>,
) -> Result<Summary> {
    if train_set.is_empty() {
        return Err(Error::Config(format!(
            "{}: no training examples left after validation",
            args.train_file.display()
        )));
    }
    let params = model.params().trainable();
    if params.is_empty() {
        return Err(Error::Config(
            "the model has no trainable parameters".into(),
        ));
    }
    let max_steps = total_steps(args, train_set.len());
    let warmup = if args.warmup_steps > 0 {
        args.warmup_steps
    } else {
        (args.warmup_ratio * max_steps as f64).ceil() as usize
    };
    let scheduler = LrScheduler::new(
        &args.lr_scheduler_type,
        args.learning_rate,
        warmup,
        max_steps,
    )?;
    let mut opt = optimizer(args, params.clone())?;
    let mut state = match resume {
        Some(dir) => {
            let st = read_state(dir)?;
            opt.load_state(crate::checkpoint::read_optimizer(dir)?)?;
            st
        }
        None => TrainerState {
            global_step: 0,
            max_steps,
            sampler: Sampler::new(train_set.len(), args.seed, args.shuffle).state(),
            total_loss: 0.0,
            skipped_steps: 0,
            samples_seen: 0,
            tokens_seen: 0,
            log_history: Vec::new(),
        },
    };
    let mut sampler = Sampler::from_state(state.sampler, train_set.len())
        .map_err(|e| Error::Config(e.to_string()))?;
    std::fs::create_dir_all(&args.output_dir).map_err(|e| Error::io(&args.output_dir, e))?;
    let mut logger = MetricsLogger::open(&args.output_dir, &args.report_to, state.global_step)?;

    if args.eval_on_start && resume.is_none() && !eval_set.is_empty() {
        let ev = run_eval(
            objective,
            model,
            eval_set,
            args.per_device_eval_batch_size,
            &sampler,
        )?;
        let show: Vec<String> = ev
            .iter()
            .filter(|(k, _)| matches!(k.as_str(), "eval_loss" | "eval_accuracy"))
            .map(|(k, v)| format!("{k} {v:.4}"))
            .collect();
        tracing::info!("before training: {}", show.join(", "));
        logger.log(0, &ev)?;
        let mut ev = ev;
        ev.insert("step".into(), 0.0);
        state.log_history.push(ev);
    }
    let bar = progress(max_steps, state.global_step);
    let started = Instant::now();
    let samples_at_start = state.samples_seen;
    let eval_every = args.eval_steps.unwrap_or(args.logging_steps).max(1);
    // Logging window: summed step losses and metric sums since the last log.
    let mut window_loss = 0.0;
    let mut window_steps = 0usize;
    let mut window_metrics: BTreeMap<&'static str, (f64, usize)> = BTreeMap::new();
    let mut last_grad_norm = f64::NAN;
    let mut consecutive_bad = 0usize;

    while state.global_step < max_steps {
        let step = state.global_step;
        let micro: Vec<Vec<usize>> = (0..args.gradient_accumulation_steps)
            .map(|_| sampler.next_batch(args.per_device_train_batch_size))
            .collect();
        let scale = StepScale {
            micro_batches: micro.len(),
            step_items: micro
                .iter()
                .flatten()
                .map(|&i| objective.items(&train_set[i]))
                .sum(),
        };
        model.set_training(true);
        let mut grads: Option<GradStore> = None;
        let mut step_loss = 0.0;
        let mut step_metrics = Vec::new();
        for (k, idx) in micro.iter().enumerate() {
            model.set_dropout_seed(mix(args.seed, step as u64, k as u64));
            let batch: Vec<&O::Example> = idx.iter().map(|&i| &train_set[i]).collect();
            let out = objective.loss(model, &batch, scale)?;
            step_loss += out
                .loss
                .to_dtype(candle_core::DType::F64)?
                .to_scalar::<f64>()?;
            step_metrics.extend(out.metrics);
            state.samples_seen += out.samples;
            state.tokens_seen += out.tokens;
            let g = out.loss.backward()?;
            grads = Some(match grads {
                None => g,
                Some(acc) => accumulate(acc, g, &params)?,
            });
        }
        model.set_training(false);
        let mut grads = grads.expect("at least one micro-batch");
        let grad_norm = clip_grad_norm(&mut grads, &params, args.max_grad_norm)?;
        state.sampler = sampler.state();
        state.global_step += 1;
        if !step_loss.is_finite() || !grad_norm.is_finite() {
            // Never let NaN/inf into the weights: skip the update, say so, stop if it persists.
            state.skipped_steps += 1;
            consecutive_bad += 1;
            tracing::warn!(
                "step {}: loss {step_loss} / grad_norm {grad_norm} is not finite; update skipped \
                 ({} skipped so far)",
                state.global_step,
                state.skipped_steps
            );
            if consecutive_bad >= 5 {
                return Err(Error::Diverged(format!(
                    "5 steps in a row had a non-finite loss or gradient (last at step {}); \
                     lower learning_rate or check the data; the last good checkpoint is kept",
                    state.global_step
                )));
            }
        } else {
            consecutive_bad = 0;
            opt.step(&grads, scheduler.lr_at(step))?;
            state.total_loss += step_loss;
            window_loss += step_loss;
            window_steps += 1;
            last_grad_norm = grad_norm;
            for (k, v) in step_metrics {
                let e = window_metrics.entry(k).or_insert((0.0, 0));
                e.0 += v;
                e.1 += 1;
            }
        }
        bar.inc(1);
        let gs = state.global_step;
        if gs % args.logging_steps == 0 || gs == max_steps {
            let mut log = BTreeMap::new();
            if window_steps > 0 {
                log.insert("loss".to_string(), window_loss / window_steps as f64);
            }
            log.insert("grad_norm".into(), last_grad_norm);
            // transformers 5 logs the rate the update of this step used.
            log.insert("learning_rate".into(), scheduler.logged_lr(gs));
            for (k, (sum, n)) in &window_metrics {
                log.insert((*k).to_string(), sum / *n as f64);
            }
            log.insert("num_tokens".into(), state.tokens_seen as f64);
            log.insert("epoch".into(), epoch_of(&sampler));
            bar.set_message(format!(
                "loss {:.4}",
                log.get("loss").copied().unwrap_or(f64::NAN)
            ));
            logger.log(gs, &log)?;
            log.insert("step".into(), gs as f64);
            state.log_history.push(log);
            window_loss = 0.0;
            window_steps = 0;
            window_metrics.clear();
        }
        if args.eval_strategy == "steps" && gs % eval_every == 0 && !eval_set.is_empty() {
            let ev = run_eval(
                objective,
                model,
                eval_set,
                args.per_device_eval_batch_size,
                &sampler,
            )?;
            logger.log(gs, &ev)?;
            let mut ev = ev;
            ev.insert("step".into(), gs as f64);
            state.log_history.push(ev);
        }
        if args.save_steps > 0 && gs % args.save_steps == 0 && gs < max_steps {
            crate::checkpoint::save(args, model, heads, &opt, &state)?;
        }
    }
    bar.finish_and_clear();

    // The final model, then the summary with transformers' names.
    crate::checkpoint::save_final(args, model, heads)?;
    let runtime = started.elapsed().as_secs_f64();
    let mut summary = Summary::new();
    summary.insert("train_runtime".into(), runtime);
    let samples = (state.samples_seen - samples_at_start) as f64;
    summary.insert(
        "train_samples_per_second".into(),
        samples / runtime.max(1e-9),
    );
    let steps_run = state.global_step as f64;
    summary.insert(
        "train_steps_per_second".into(),
        steps_run / runtime.max(1e-9),
    );
    let good = (state.global_step - state.skipped_steps).max(1) as f64;
    summary.insert("train_loss".into(), state.total_loss / good);
    summary.insert("epoch".into(), epoch_of(&sampler));
    summary.insert("skipped_steps".into(), state.skipped_steps as f64);
    // A run given an eval_file always ends with its eval_* in the summary (what a user reads
    // after `trainer.train(); trainer.evaluate()`), whatever eval_strategy says for mid-run.
    if !eval_set.is_empty() {
        let ev = run_eval(
            objective,
            model,
            eval_set,
            args.per_device_eval_batch_size,
            &sampler,
        )?;
        summary.extend(ev);
    }
    logger.summary(state.global_step, &summary)?;
    Ok(summary)
}

fn run_eval<O: Objective>(
    objective: &O,
    model: &Model,
    eval_set: &[O::Example],
    batch_size: usize,
    sampler: &Sampler,
) -> Result<BTreeMap<String, f64>> {
    model.set_training(false);
    let started = Instant::now();
    let was = model.set_grad_enabled(false);
    let m = objective.evaluate(model, eval_set, batch_size);
    model.set_grad_enabled(was);
    let m = m?;
    let mut out: BTreeMap<String, f64> = m
        .into_iter()
        .map(|(k, v)| (format!("eval_{k}"), v))
        .collect();
    let secs = started.elapsed().as_secs_f64();
    out.insert("eval_runtime".into(), secs);
    out.insert(
        "eval_samples_per_second".into(),
        eval_set.len() as f64 / secs.max(1e-9),
    );
    out.insert("epoch".into(), epoch_of(sampler));
    Ok(out)
}

fn epoch_of(sampler: &Sampler) -> f64 {
    sampler.epoch_progress()
}

/// The configured AdamW (`adam_beta1/2`, `adam_epsilon`, `weight_decay`) over `params`.
pub(crate) fn optimizer(
    args: &TrainingArgs,
    params: Vec<(String, candle_core::Var)>,
) -> Result<AdamW> {
    AdamW::new(
        params,
        args.adam_beta1,
        args.adam_beta2,
        args.adam_epsilon,
        args.weight_decay,
    )
}

/// Adds the gradients of `g` to `acc` for every trainable parameter.
pub(crate) fn accumulate(
    mut acc: GradStore,
    g: GradStore,
    params: &[(String, candle_core::Var)],
) -> Result<GradStore> {
    for (_, v) in params {
        let t = v.as_tensor();
        match (acc.get(t), g.get(t)) {
            (Some(a), Some(b)) => {
                let sum = (a + b)?;
                acc.insert(t, sum);
            }
            (None, Some(b)) => {
                acc.insert(t, b.clone());
            }
            _ => {}
        }
    }
    Ok(acc)
}

/// Seed of a micro-batch's dropout masks: a pure function of (seed, step, micro-batch).
pub(crate) fn mix(seed: u64, step: u64, micro: u64) -> u64 {
    let mut x =
        seed ^ step.wrapping_mul(0xD1B5_4A32_D192_ED03) ^ micro.wrapping_mul(0x8CB9_2BA7_2F3D_8DD7);
    x ^= x >> 31;
    x = x.wrapping_mul(0x7FB5_D329_728E_A185);
    x ^ (x >> 27)
}

fn read_state(dir: &Path) -> Result<TrainerState> {
    crate::checkpoint::read_json(&dir.join("trainer_state.json"))
}

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
