//! The training loop every trainer shares, visible in one place:
//! batch → forward → loss → backward (× gradient_accumulation_steps) → clip → step → log →
//! eval → checkpoint. A trainer supplies only its [`Objective`]: how a micro-batch becomes a
//! loss and metrics, and how to evaluate. What runs the job around the step (logging window,
//! non-finite guard, evaluation and save schedules, summary) is a [`Run`], shared with PPO.
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
use crate::optim::{clip_grad_norm, AdamW};
pub use crate::run::Summary;
use crate::run::{Run, RunState, StepReport};
use crate::scheduler::LrScheduler;
use crate::{Error, Result};

/// How one optimiser step's micro-batches are weighted.
#[derive(Debug, Clone, Copy)]
pub struct StepScale {
    /// Micro-batches in this optimiser step, over all ranks of a data-parallel job (each
    /// rank's share of a micro-batch counts as one: a loss averaged over a micro-batch and
    /// divided by this sums, over the ranks, to the global batch's average).
    pub micro_batches: usize,
    /// Loss items (e.g. labelled tokens) over all micro-batches of the step (all ranks'), for
    /// objectives that normalise by it as transformers does with `num_items_in_batch`.
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
    /// Steps, skipped steps and the logged history ([`RunState`]).
    #[serde(flatten)]
    pub run: RunState,
    /// Position of the data order.
    pub sampler: SamplerState,
    /// Sum of step losses so far (for `train_loss`).
    pub total_loss: f64,
    /// Samples processed.
    pub samples_seen: usize,
    /// Tokens processed.
    pub tokens_seen: usize,
    /// Ranks of the data-parallel job that wrote it (1: one process; absent in older
    /// checkpoints, which one process wrote).
    #[serde(default = "one")]
    pub world_size: usize,
}

fn one() -> usize {
    1
}

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

/// The checkpoint a command's `--resume` names: none without the flag, the given directory,
/// or (a bare `--resume`) the newest in `output_dir`.
pub fn resume_dir(output_dir: &Path, resume: Option<Option<&Path>>) -> Result<Option<PathBuf>> {
    resume
        .map(|given| resolve_resume(output_dir, given))
        .transpose()
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
/// resuming); `resume` is that checkpoint, for the optimiser and the loop state. Logging,
/// evaluation, checkpoints and the summary are the [`Run`]'s.
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
            run: RunState::new(max_steps),
            sampler: Sampler::new(train_set.len(), args.seed, args.shuffle).state(),
            total_loss: 0.0,
            samples_seen: 0,
            tokens_seen: 0,
            world_size: 1,
        },
    };
    let mut sampler = Sampler::from_state(state.sampler, train_set.len())
        .map_err(|e| Error::Config(e.to_string()))?;
    let world = crate::dist::world();
    let (rank, ranks) = (world.rank(), world.size());
    if resume.is_some() && state.world_size != ranks {
        return Err(Error::Resume(format!(
            "the checkpoint was written by a job of {} ranks and this one has {ranks}: resume \
             at the same world size (the data order and batch shares depend on it)",
            state.world_size
        )));
    }
    state.world_size = ranks;
    // Seconds spent in the gradients' all-reduce, how many, its floats, and seconds spent
    // waiting for the slowest rank before it.
    let mut comm = (0f64, 0usize, 0usize, 0f64);
    // Rank 0 evaluates (and logs); the others go on to the next step's collectives.
    let evaluate = || {
        if rank == 0 {
            run_eval(objective, model, eval_set, args.per_device_eval_batch_size)
        } else {
            Ok(BTreeMap::new())
        }
    };
    let mut run = Run::open(
        args,
        &state.run,
        sampler.epoch_progress(),
        !eval_set.is_empty(),
        &["loss"],
    )?;
    if run.eval_on_start(&state.run) {
        run.log_eval(&mut state.run, evaluate()?)?;
    }

    while state.run.global_step < max_steps {
        let step = state.run.global_step;
        // Global micro-batches (every rank draws the same ones), then this rank's share.
        let global: Vec<Vec<usize>> = (0..args.gradient_accumulation_steps)
            .map(|_| {
                even_batch(
                    sampler.next_batch(args.per_device_train_batch_size * ranks),
                    args.per_device_train_batch_size * ranks,
                    ranks,
                )
            })
            .collect();
        let scale = StepScale {
            micro_batches: global.len() * ranks,
            step_items: global
                .iter()
                .flatten()
                .map(|&i| objective.items(&train_set[i]))
                .sum(),
        };
        let micro: Vec<Vec<usize>> = global
            .iter()
            .map(|g| g[crate::dist::share(g.len(), rank, ranks)].to_vec())
            .collect();
        model.set_training(true);
        let mut grads: Option<GradStore> = None;
        let mut step_loss = 0.0;
        let mut step_tokens = 0usize;
        let mut report = StepReport::default();
        for (k, idx) in micro.iter().enumerate() {
            model.set_dropout_seed(mix(args.seed, step as u64, k as u64));
            let batch: Vec<&O::Example> = idx.iter().map(|&i| &train_set[i]).collect();
            let out = objective.loss(model, &batch, scale)?;
            step_loss += out
                .loss
                .to_dtype(candle_core::DType::F64)?
                .to_scalar::<f64>()?;
            report
                .mean
                .extend(out.metrics.into_iter().map(|(k, v)| (k.to_string(), v)));
            report.samples += out.samples;
            step_tokens += out.tokens;
            let g = out.loss.backward()?;
            grads = Some(match grads {
                None => g,
                Some(acc) => accumulate(acc, g, &params)?,
            });
        }
        model.set_training(false);
        let mut grads = grads.expect("at least one micro-batch");
        if ranks > 1 {
            // Sum the gradients, the loss and the counts over the ranks; average the metrics
            // (every rank's share is the same size).
            // The barrier first, so that the log can tell waiting for the slowest rank from
            // the all-reduce itself.
            let t = Instant::now();
            world.barrier();
            comm.3 += t.elapsed().as_secs_f64();
            let t = Instant::now();
            let floats = all_reduce_grads(world.as_ref(), &mut grads, &params)?;
            comm.0 += t.elapsed().as_secs_f64();
            comm.1 += 1;
            comm.2 = floats;
            let mut v = vec![step_loss, report.samples as f64, step_tokens as f64];
            world.all_reduce_sum_f64(&mut v);
            step_loss = v[0];
            report.samples = v[1].round() as usize;
            step_tokens = v[2].round() as usize;
            crate::dist::reduce_metrics(world.as_ref(), &mut report.mean);
        }
        state.samples_seen += report.samples;
        state.tokens_seen += step_tokens;
        let grad_norm = clip_grad_norm(&mut grads, &params, args.max_grad_norm)?;
        state.sampler = sampler.state();
        state.run.global_step += 1;
        let gs = state.run.global_step;
        // A non-finite loss or gradient skips the update; an update that would make a weight
        // non-finite is refused by the optimiser (nothing changes) and skipped the same way.
        if crate::run::finite_update(gs, step_loss, grad_norm)
            && crate::run::applied(gs, opt.step(&grads, scheduler.lr_at(step))?)
        {
            state.total_loss += step_loss;
            report.mean.push(("loss".into(), step_loss));
            report.last.push(("grad_norm".into(), grad_norm));
        } else {
            // Nothing of a skipped step is averaged into the log.
            report.mean.clear();
            report.skipped = true;
        }
        // transformers 5 logs the rate the update of this step used.
        report
            .last
            .push(("learning_rate".into(), scheduler.logged_lr(gs)));
        report
            .last
            .push(("num_tokens".into(), state.tokens_seen as f64));
        report.epoch = sampler.epoch_progress();
        run.end_step(&mut state.run, report)?;
        if run.eval_due(&state.run) {
            run.log_eval(&mut state.run, evaluate()?)?;
        }
        if run.save_due(&state.run) {
            crate::checkpoint::save(args, model, heads, &opt, &state)?;
        }
    }

    if comm.1 > 0 {
        tracing::info!(
            "gradient all-reduce over {} ranks: {:.2} ms per step on average ({} floats, \
             {:.1} MB, copies in and out included), after {:.2} ms waiting for the slowest rank",
            ranks,
            1e3 * comm.0 / comm.1 as f64,
            comm.2,
            comm.2 as f64 * 4.0 / 1e6,
            1e3 * comm.3 / comm.1 as f64
        );
    }
    // The final model, then the summary with transformers' names.
    crate::checkpoint::save_final(args, model, heads)?;
    let good = (state.run.global_step - state.run.skipped_steps).max(1) as f64;
    let own = Summary::from([
        ("train_loss".to_string(), state.total_loss / good),
        ("epoch".to_string(), sampler.epoch_progress()),
    ]);
    run.finish(&state.run, own, evaluate)
}

/// A global batch of a data-parallel job made whole: the last batch of an epoch, when
/// shorter than `want`, is filled by repeating its own examples from its start (accelerate's
/// `even_batches`), so that every rank gets the same number. One process keeps it as it is.
pub(crate) fn even_batch(mut batch: Vec<usize>, want: usize, ranks: usize) -> Vec<usize> {
    if ranks > 1 && !batch.is_empty() {
        let n = batch.len();
        for i in n..want {
            batch.push(batch[i % n]);
        }
    }
    batch
}

/// Sums every trainable parameter's gradient over the ranks, in place (one all-reduce over
/// all of them, flattened in parameter order; a parameter without a gradient counts as zeros).
/// Returns the number of floats reduced.
pub(crate) fn all_reduce_grads(
    world: &dyn crate::dist::Collective,
    grads: &mut GradStore,
    params: &[(String, candle_core::Var)],
) -> Result<usize> {
    let mut flat: Vec<f32> = Vec::new();
    for (_, v) in params {
        match grads.get(v.as_tensor()) {
            Some(g) => flat.extend(
                g.to_dtype(candle_core::DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?,
            ),
            None => flat.extend(std::iter::repeat_n(0f32, v.elem_count())),
        }
    }
    world.all_reduce_sum_f32(&mut flat);
    let mut at = 0;
    for (_, v) in params {
        let t = v.as_tensor();
        let n = t.elem_count();
        let g =
            Tensor::from_slice(&flat[at..at + n], t.shape(), t.device())?.to_dtype(t.dtype())?;
        grads.insert(t, g);
        at += n;
    }
    Ok(flat.len())
}

/// The objective's evaluation, eval_-prefixed, with its timing.
fn run_eval<O: Objective>(
    objective: &O,
    model: &Model,
    eval_set: &[O::Example],
    batch_size: usize,
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
    Ok(out)
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
