//! PPO against a reward model (InstructGPT step 3; TRL's `PPOTrainer`), with the Llama 2
//! combination of a helpfulness and a safety reward model, reward programs (verifiable
//! rewards, alone or weighted beside a reward model: [`ScorerSpec`]) and InstructGPT's PPO-ptx.
//!
//! One PPO step, in the order of the algorithm box:
//! 1. **rollout**: sample prompts, generate `num_generations` completions each with the policy;
//! 2. **evaluate the rollout** (no gradients): the policy's log-probs and values, the frozen
//!    reference's log-probs (the adapter-disabled forward for LoRA policies, a second model
//!    otherwise), the score of each completion (reward model(s) and/or reward program);
//! 3. **rewards**: −β·KL per token, the score added at the last token (after the missing-EOS
//!    penalty and clipping), optionally whitened;
//! 4. **advantages**: GAE(γ, λ), whitened; returns = advantages + values;
//! 5. **update**: `num_ppo_epochs` passes over shuffled mini-batches, each an optimiser step
//!    over `gradient_accumulation_steps` micro-batches of the clipped policy loss +
//!    `vf_coef`·clipped value loss (+ `ptx_coef`·the SFT loss on `ptx_file`);
//! 6. the adaptive KL controller, metrics (TRL's names), checkpoints.
//!
//! The value head is a `Linear(hidden, 1)` on the policy's last hidden state (TRL's
//! `AutoModelForCausalLMWithValueHead`, saved as `value_head.safetensors` with its
//! `v_head.summary.*` names), initialised from the reward model's score head as InstructGPT
//! initialises its value function from the reward model (at zero when only a reward program
//! scores). Runs resume exactly: generation and shuffling seeds are functions of (seed, step),
//! and a checkpoint holds the adapter, the value head, the optimiser, the KL coefficient and
//! the prompt order.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var, D};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rlhf_data::{PromptRecord, Sampler, SamplerState, SftExample};
use rlhf_model::model::SourceCache;
use rlhf_model::tokenizer::Tokenizer;
use rlhf_model::{Heads, LoadOptions, Model, Training};
use serde::{Deserialize, Serialize};

use crate::config::{self, TrainingArgs};
use crate::optim::{clip_grad_norm, AdamW};
use crate::rl::{self, AdaptiveKl, KlEstimator};
pub use crate::rollout::load_prompts;
use crate::rollout::{pack, padded, response_logprobs, Decoder, Reference, Sampling};
use crate::run::{Run, RunState, StepReport, Summary};
use crate::scheduler::LrScheduler;
pub use crate::scoring::{
    Completions, IdSource, Llama2Gate, ModelScorer, RewardModel, RewardModels, Scorer, ScorerSpec,
};
use crate::trainer::{accumulate, mix};
use crate::{Error, Result};

/// The PPO keys beyond the shared training ones and the scorer's ([`ScorerSpec`]), named as
/// TRL's PPOConfig names them (and, for what it no longer has, as its older versions did:
/// `adap_kl_ctrl`, `target`, `horizon`, `score_clip`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct PpoArgs {
    /// New tokens per completion at most.
    pub response_length: usize,
    /// Completions per prompt; `per_device_train_batch_size` counts completions.
    pub num_generations: usize,
    /// Sampling temperature of rollouts (log-probs are taken at this temperature too).
    pub temperature: f64,
    /// Top-k filtering of rollouts (0: none).
    pub top_k: usize,
    /// Top-p filtering of rollouts (1.0: none).
    pub top_p: f64,
    /// Passes over each rollout batch.
    pub num_ppo_epochs: usize,
    /// Mini-batches (optimiser steps) per pass.
    pub num_mini_batches: usize,
    /// β of the per-token KL penalty (the initial β with `adap_kl_ctrl`).
    pub kl_coef: f64,
    /// "k1" (logπ − logπ_ref, TRL's default) or "k3" (unbiased, non-negative); "k2" too.
    pub kl_estimator: KlEstimator,
    /// Adapt β towards `target` KL (Ziegler et al. 2019).
    pub adap_kl_ctrl: bool,
    /// Target KL (nats per completion) of the adaptive controller.
    pub target: f64,
    /// Horizon of the adaptive controller.
    pub horizon: f64,
    /// PPO's policy ratio clip.
    pub cliprange: f64,
    /// PPO's value clip.
    pub cliprange_value: f64,
    /// Weight of the value loss.
    pub vf_coef: f64,
    /// GAE discount.
    pub gamma: f64,
    /// GAE λ.
    pub lam: f64,
    /// Whiten the per-token rewards before GAE.
    pub whiten_rewards: bool,
    /// Clip scores to [−score_clip, score_clip].
    pub score_clip: Option<f64>,
    /// Subtracted from the score of a completion that ends without EOS.
    pub missing_eos_penalty: Option<f64>,
    /// Demonstrations for PPO-ptx (InstructGPT): their LM loss is added with `ptx_coef`.
    pub ptx_file: Option<PathBuf>,
    /// γ of PPO-ptx.
    pub ptx_coef: f64,
    /// "reward_model" (copy the reward model's score head; zeros when there is none) or
    /// "zeros".
    pub value_head_init: String,
    /// Evaluation prompts (greedy) scored on `eval_file` at most this many.
    pub eval_prompts: usize,
    /// Rows per generation batch and per no-grad reference forward (TRL's name). Decoding
    /// reads every weight once per token for the whole batch, so bigger is faster.
    pub local_rollout_forward_batch_size: usize,
}

impl PpoArgs {
    /// Checks every numeric key for range and finiteness; the message names `path` (the config
    /// file) and the key.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let k = config::Knobs::new(path);
        k.at_least("response_length", self.response_length, 1)?;
        k.at_least("num_generations", self.num_generations, 1)?;
        k.positive("temperature", self.temperature)?;
        k.open_closed("top_p", self.top_p, 0.0, 1.0)?;
        k.at_least("num_ppo_epochs", self.num_ppo_epochs, 1)?;
        k.at_least("num_mini_batches", self.num_mini_batches, 1)?;
        k.non_negative("kl_coef", self.kl_coef)?;
        k.positive("target", self.target)?;
        k.positive("horizon", self.horizon)?;
        k.positive("cliprange", self.cliprange)?;
        k.positive("cliprange_value", self.cliprange_value)?;
        k.non_negative("vf_coef", self.vf_coef)?;
        k.closed("gamma", self.gamma, 0.0, 1.0)?;
        k.closed("lam", self.lam, 0.0, 1.0)?;
        if let Some(c) = self.score_clip {
            k.positive("score_clip", c)?;
        }
        if let Some(p) = self.missing_eos_penalty {
            k.finite("missing_eos_penalty", p)?;
        }
        k.non_negative("ptx_coef", self.ptx_coef)?;
        k.at_least(
            "local_rollout_forward_batch_size",
            self.local_rollout_forward_batch_size,
            1,
        )?;
        Ok(())
    }

    pub fn sampling(&self) -> Sampling {
        Sampling {
            max_new_tokens: self.response_length,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
        }
    }
}

impl Default for PpoArgs {
    fn default() -> Self {
        Self {
            response_length: 53,
            num_generations: 1,
            temperature: 0.7,
            top_k: 0,
            top_p: 1.0,
            num_ppo_epochs: 4,
            num_mini_batches: 1,
            kl_coef: 0.05,
            kl_estimator: KlEstimator::K1,
            adap_kl_ctrl: false,
            target: 6.0,
            horizon: 10000.0,
            cliprange: 0.2,
            cliprange_value: 0.2,
            vf_coef: 0.1,
            gamma: 1.0,
            lam: 0.95,
            whiten_rewards: false,
            score_clip: None,
            missing_eos_penalty: None,
            ptx_file: None,
            ptx_coef: 0.0,
            value_head_init: "reward_model".into(),
            eval_prompts: 64,
            local_rollout_forward_batch_size: 64,
        }
    }
}

/// PPO's own keys. How completions are scored is read from [`crate::scoring::SCORER_KEYS`]:
/// `reward_model`, or `reward_models` with `[llama2]`, and/or `reward_program`, summed with
/// `reward_weights` (reward model first, then the program), `reward_program_timeout`.
const PPO_KEYS: &[&str] = &[
    "response_length",
    "num_generations",
    "temperature",
    "top_k",
    "top_p",
    "num_ppo_epochs",
    "num_mini_batches",
    "kl_coef",
    "kl_estimator",
    "adap_kl_ctrl",
    "target",
    "horizon",
    "cliprange",
    "cliprange_value",
    "vf_coef",
    "gamma",
    "lam",
    "whiten_rewards",
    "score_clip",
    "missing_eos_penalty",
    "ptx_file",
    "ptx_coef",
    "value_head_init",
    "eval_prompts",
    "local_rollout_forward_batch_size",
];

/// A parsed PPO config.
#[derive(Debug, Clone)]
pub struct PpoConfig {
    /// Shared training arguments (`train_file` holds the prompts).
    pub args: TrainingArgs,
    /// PPO's own.
    pub ppo: PpoArgs,
    /// The reward model(s) and/or reward program that score completions.
    pub scorer: ScorerSpec,
    /// LoRA on the policy (the reference is then the adapter-disabled forward).
    pub lora: Option<rlhf_model::lora::LoraConfig>,
}

impl PpoConfig {
    /// Reads `path` with `--set` overrides. Where the file is silent: learning_rate 3e-6
    /// (TRL's PPOConfig), per_device_train_batch_size 8, logging_steps 1, eval_on_start true.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        let mut allowed = config::TRAINING_KEYS.to_vec();
        allowed.extend(PPO_KEYS);
        allowed.extend(crate::scoring::SCORER_KEYS);
        allowed.push("lora");
        let mut table = config::load_table(path, overrides, &allowed)?;
        Self::from_table(path, &mut table)
    }

    /// Builds the config from an already checked table (the pipeline's `[ppo]` section).
    pub fn from_table(path: &Path, table: &mut toml::Table) -> Result<Self> {
        let lora = config::take_lora(path, table)?;
        let base = path.parent().unwrap_or(Path::new("."));
        let own = config::take_keys(table, PPO_KEYS);
        let mut scoring = config::take_keys(table, crate::scoring::SCORER_KEYS);
        crate::scoring::resolve_scorer_paths(base, &mut scoring);
        table
            .entry("learning_rate")
            .or_insert(toml::Value::Float(3e-6));
        table
            .entry("logging_steps")
            .or_insert(toml::Value::Integer(1));
        // PPO's evaluation before the first step is what "before PPO" is measured against
        // (`rlhf pipeline`'s report, eval_step0.jsonl): on unless the config turns it off.
        table
            .entry("eval_on_start")
            .or_insert(toml::Value::Boolean(true));
        let args: TrainingArgs = config::parse(path, table.clone())?;
        args.validate(path)?;
        let ppo: PpoArgs = config::parse(path, own)?;
        let mut scorer: ScorerSpec = config::parse(path, scoring)?;
        scorer.batch_size = args.per_device_eval_batch_size;
        let bad = |m: String| Err(Error::Config(format!("{}: {m}", path.display())));
        if let Err(m) = scorer.validate() {
            return bad(m);
        }
        ppo.validate(path)?;
        let per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps;
        if !per_step.is_multiple_of(ppo.num_generations) {
            return bad(format!(
                "per_device_train_batch_size × gradient_accumulation_steps = {per_step} \
                 completions per mini-batch is not a multiple of num_generations = {}",
                ppo.num_generations
            ));
        }
        if !matches!(ppo.value_head_init.as_str(), "reward_model" | "zeros") {
            return bad(format!(
                "value_head_init = {:?}: use \"reward_model\" or \"zeros\"",
                ppo.value_head_init
            ));
        }
        Ok(Self {
            args,
            ppo,
            scorer,
            lora,
        })
    }

    /// Completions per PPO step (TRL's local batch size).
    pub fn completions_per_step(&self) -> usize {
        self.args.per_device_train_batch_size
            * self.args.gradient_accumulation_steps
            * self.ppo.num_mini_batches
    }
}

// ---------------------------------------------------------------------------------------------
// The policy and its value head

/// `Linear(hidden, 1)` on the policy's last hidden state.
pub struct ValueHead {
    weight: Var,
    bias: Var,
}

/// TRL's names for the value head's tensors.
const V_WEIGHT: &str = "v_head.summary.weight";
const V_BIAS: &str = "v_head.summary.bias";

impl ValueHead {
    /// A head from `weight` (1, hidden) (zeros if None) and a zero bias.
    pub fn new(weight: Option<Tensor>, hidden: usize, device: &Device) -> Result<Self> {
        let w = match weight {
            Some(w) if w.dims() == [1, hidden] => w.to_dtype(DType::F32)?,
            Some(w) => {
                tracing::warn!(
                    "the reward model's score head is {:?}, the policy's hidden size {hidden}: \
                     the value head starts at zero instead",
                    w.dims()
                );
                Tensor::zeros((1, hidden), DType::F32, device)?
            }
            None => Tensor::zeros((1, hidden), DType::F32, device)?,
        };
        Ok(Self {
            weight: Var::from_tensor(&w)?,
            bias: Var::zeros(1, DType::F32, device)?,
        })
    }

    /// Values of every position.
    // hidden: (b, t, h) -> (b, t)
    pub fn forward(&self, hidden: &Tensor) -> Result<Tensor> {
        let w = self.weight.as_tensor().squeeze(0)?; // (h)
        let v = hidden.broadcast_mul(&w)?.sum(D::Minus1)?;
        Ok(v.broadcast_add(self.bias.as_tensor())?)
    }

    /// The trainable tensors, under TRL's names.
    pub fn params(&self) -> Vec<(String, Var)> {
        vec![
            (V_WEIGHT.into(), self.weight.clone()),
            (V_BIAS.into(), self.bias.clone()),
        ]
    }

    /// Writes `value_head.safetensors`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let t: HashMap<String, Tensor> = self
            .params()
            .into_iter()
            .map(|(n, v)| (n, v.as_tensor().detach()))
            .collect();
        rlhf_model::save::save_safetensors(&dir.join("value_head.safetensors"), &t)?;
        Ok(())
    }

    /// Restores from `value_head.safetensors`.
    pub fn load_into(&self, dir: &Path) -> Result<()> {
        let p = dir.join("value_head.safetensors");
        let t = candle_core::safetensors::load(&p, self.weight.device())
            .map_err(|e| Error::Config(format!("{}: {e}", p.display())))?;
        for (name, var) in self.params() {
            let x = t
                .get(&name)
                .ok_or_else(|| Error::Config(format!("{}: no tensor {name}", p.display())))?;
            var.set(x)?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// The trainer

/// The loop's state, saved as trainer_state.json in each checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PpoState {
    /// PPO steps done (rollout + update), skipped steps and the logged history
    /// ([`RunState`]).
    #[serde(flatten)]
    pub run: RunState,
    /// Prompt order position.
    pub sampler: SamplerState,
    /// Demonstration order position (PPO-ptx).
    pub ptx_sampler: Option<SamplerState>,
    /// The KL coefficient now (changes with `adap_kl_ctrl`).
    pub kl_coef: f64,
    /// Completions generated so far (TRL's `episode`).
    pub episodes: usize,
    /// Ranks of the data-parallel job that wrote it (absent in older checkpoints: 1).
    #[serde(default = "one")]
    pub world_size: usize,
}

fn one() -> usize {
    1
}

/// One rollout batch after scoring and advantage estimation (ragged rows: response tokens).
struct Rollout {
    prompts: Vec<Vec<u32>>,
    responses: Vec<Vec<u32>>,
    logprobs: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    advantages: Vec<Vec<f32>>,
    returns: Vec<Vec<f32>>,
}

/// Everything a PPO run holds.
pub struct PpoTrainer<'a> {
    cfg: PpoConfig,
    policy: Model,
    /// The frozen reference when the policy is fully fine-tuned (LoRA uses the
    /// adapter-disabled policy).
    reference: Option<Model>,
    value_head: ValueHead,
    tok: Tokenizer,
    pad_id: u32,
    eos_ids: Vec<u32>,
    scorer: &'a mut dyn Scorer,
    prompts: Vec<PromptRecord>,
    prompt_ids: Vec<Vec<u32>>,
    eval_prompts: Vec<PromptRecord>,
    eval_ids: Vec<Vec<u32>>,
    ptx: Vec<SftExample>,
    opt: AdamW,
    params: Vec<(String, Var)>,
    scheduler: LrScheduler,
    state: PpoState,
    sampler: Sampler,
    ptx_sampler: Option<Sampler>,
}

/// The metrics of one PPO step, TRL's names.
type StepMetrics = BTreeMap<String, f64>;

impl<'a> PpoTrainer<'a> {
    /// Builds the trainer: loads the policy (LoRA or full), its reference, the prompts and the
    /// value head, and restores a checkpoint when `resume` is given.
    pub fn new(
        cfg: PpoConfig,
        scorer: &'a mut dyn Scorer,
        cache: &mut SourceCache,
        resume: Option<&Path>,
    ) -> Result<Self> {
        let args = &cfg.args;
        let tok = Tokenizer::from_dir(&args.model)?;
        let pad_id = rlhf_data::pad_id(&tok)?;
        let (training, adapter) = match (&cfg.lora, resume) {
            (Some(l), Some(dir)) => (Training::Lora(l.clone()), Some(dir.to_path_buf())),
            (Some(l), None) => (Training::Lora(l.clone()), None),
            (None, _) => (Training::Full, None),
        };
        let model_dir = match (&cfg.lora, resume) {
            (None, Some(dir)) => dir.to_path_buf(),
            _ => args.model.clone(),
        };
        let policy = Model::load_cached(
            &model_dir,
            &LoadOptions {
                heads: Heads::Lm,
                training,
                seed: args.seed,
                adapter,
                ..Default::default()
            },
            cache,
        )?;
        let reference = if cfg.lora.is_some() {
            None
        } else {
            tracing::info!("full fine-tuning: loading a frozen copy of the policy as reference");
            Some(Model::load_cached(
                &args.model,
                &LoadOptions::default(),
                cache,
            )?)
        };
        let init = if cfg.ppo.value_head_init == "reward_model" {
            let w = scorer.value_head_init();
            if w.is_none() {
                tracing::info!(
                    "no reward model to copy a score head from: the value head starts at zero"
                );
            }
            w
        } else {
            None
        };
        let value_head = ValueHead::new(init, policy.config.hidden_size, policy.device())?;
        let eos_ids = rlhf_model::generate::eos_ids(&policy, &tok);
        if eos_ids.is_empty() {
            tracing::warn!(
                "the model names no EOS token: every completion runs to response_length"
            );
        }
        let max_prompt = args
            .max_length
            .saturating_sub(cfg.ppo.response_length)
            .max(1);
        let (prompts, prompt_ids) =
            load_prompts(&args.train_file, &tok, args.skip_invalid, max_prompt)?;
        if prompts.is_empty() {
            return Err(Error::Config(format!(
                "{}: no prompts",
                args.train_file.display()
            )));
        }
        let (mut eval_prompts, mut eval_ids) = match &args.eval_file {
            Some(p) => load_prompts(p, &tok, args.skip_invalid, max_prompt)?,
            None => (Vec::new(), Vec::new()),
        };
        eval_prompts.truncate(cfg.ppo.eval_prompts);
        eval_ids.truncate(cfg.ppo.eval_prompts);
        let ptx = match &cfg.ppo.ptx_file {
            Some(p) if cfg.ppo.ptx_coef != 0.0 => {
                crate::sft::load_examples(p, &tok, args, &crate::sft::SftArgs::default())?
            }
            _ => Vec::new(),
        };
        let mut params = policy.params().trainable();
        params.extend(value_head.params());
        let opt = crate::trainer::optimizer(args, params.clone())?;
        // Over all ranks of a data-parallel job (TRL's batch_size = local × world size).
        let prompts_per_step =
            cfg.completions_per_step() / cfg.ppo.num_generations * crate::dist::world().size();
        let max_steps = if args.max_steps > 0 {
            args.max_steps as usize
        } else {
            ((args.num_train_epochs * prompts.len() as f64) / prompts_per_step as f64).ceil()
                as usize
        }
        .max(1);
        let warmup =
            crate::scheduler::warmup_steps(args.warmup_steps as f64, args.warmup_ratio, max_steps);
        let scheduler = LrScheduler::new(
            &args.lr_scheduler_type,
            args.learning_rate,
            warmup,
            max_steps,
        )?;
        let ptx_sampler = (!ptx.is_empty()).then(|| Sampler::new(ptx.len(), args.seed, true));
        let mut me = Self {
            state: PpoState {
                run: RunState::new(max_steps),
                sampler: Sampler::new(prompts.len(), args.seed, args.shuffle).state(),
                ptx_sampler: ptx_sampler.as_ref().map(|s| s.state()),
                kl_coef: cfg.ppo.kl_coef,
                episodes: 0,
                world_size: crate::dist::world().size(),
            },
            sampler: Sampler::new(prompts.len(), args.seed, args.shuffle),
            ptx_sampler,
            cfg,
            policy,
            reference,
            value_head,
            tok,
            pad_id,
            eos_ids,
            scorer,
            prompts,
            prompt_ids,
            eval_prompts,
            eval_ids,
            ptx,
            opt,
            params,
            scheduler,
        };
        if let Some(dir) = resume {
            me.restore(dir)?;
        }
        Ok(me)
    }

    fn restore(&mut self, dir: &Path) -> Result<()> {
        let state: PpoState = crate::checkpoint::read_json(&dir.join("trainer_state.json"))?;
        self.value_head.load_into(dir)?;
        self.opt
            .load_state(crate::checkpoint::read_optimizer(dir)?)?;
        self.sampler = Sampler::from_state(state.sampler, self.prompts.len())
            .map_err(|e| Error::Config(e.to_string()))?;
        if let (Some(s), false) = (&state.ptx_sampler, self.ptx.is_empty()) {
            self.ptx_sampler = Some(
                Sampler::from_state(*s, self.ptx.len())
                    .map_err(|e| Error::Config(e.to_string()))?,
            );
        }
        let ranks = crate::dist::world().size();
        if state.world_size != ranks {
            return Err(Error::Resume(format!(
                "{}: written by a job of {} ranks and this one has {ranks}: resume at the \
                 same world size (the prompt order and shares depend on it)",
                dir.display(),
                state.world_size
            )));
        }
        self.state = state;
        tracing::info!(
            "resumed from {} at step {}",
            dir.display(),
            self.state.run.global_step
        );
        Ok(())
    }

    /// The policy being trained.
    pub fn policy(&self) -> &Model {
        &self.policy
    }

    /// The run's state.
    pub fn state(&self) -> &PpoState {
        &self.state
    }

    /// The completion text scorers read: without the EOS that ended it.
    fn decoder(&self) -> Decoder<'_> {
        Decoder::new(&self.tok, &self.eos_ids)
    }

    /// Runs the whole training; returns the summary (the last line of metrics.jsonl). The
    /// [`Run`] logs, evaluates (an epoch of `eval_strategy = "epoch"` is one pass over the
    /// prompts) and saves; this loop holds only the PPO step.
    pub fn train(&mut self) -> Result<Summary> {
        let args = self.cfg.args.clone();
        let mut run = Run::open(
            &args,
            &self.state.run,
            self.sampler.epoch_progress(),
            !self.eval_prompts.is_empty(),
            &["objective/scores", "objective/kl"],
        )?;
        if crate::dist::is_root() {
            self.tok.save(&args.output_dir)?;
        }
        if run.eval_on_start(&self.state.run) {
            let ev = self.evaluate(0)?;
            run.log_eval(&mut self.state.run, ev)?;
        }
        while self.state.run.global_step < self.state.run.max_steps {
            let report = self.step_report()?;
            run.end_step(&mut self.state.run, report)?;
            if run.eval_due(&self.state.run) {
                let ev = self.evaluate(self.state.run.global_step)?;
                run.log_eval(&mut self.state.run, ev)?;
            }
            if run.save_due(&self.state.run) {
                self.save_checkpoint()?;
            }
        }
        self.save_final(&args.output_dir)?;
        let mut own = Summary::new();
        own.insert("episode".into(), self.state.episodes as f64);
        for key in ["objective/scores", "objective/kl"] {
            let vals: Vec<f64> = self
                .state
                .run
                .log_history
                .iter()
                .filter_map(|h| h.get(key).copied())
                .collect();
            if let (Some(first), Some(last)) = (vals.first(), vals.last()) {
                own.insert(format!("{key}_first"), *first);
                own.insert(format!("{key}_last"), *last);
            }
        }
        let state = self.state.run.clone();
        run.finish(&state, own, || self.evaluate(state.global_step))
    }

    /// One PPO step: rollout → score → advantages → update. Returns its metrics (TRL's
    /// names); a step whose update was skipped, wholly or in part, for a non-finite loss or
    /// gradient logs `loss/policy_avg` as NaN and counts in `skipped_steps`.
    pub fn step(&mut self) -> Result<StepMetrics> {
        let (m, skipped) = self.ppo_step()?;
        if skipped {
            self.state.run.skipped_steps += 1;
        }
        Ok(m)
    }

    /// A step for the [`Run`]: counters, β and the learning rate are logged at their latest
    /// value, the rest averaged over the logging window.
    fn step_report(&mut self) -> Result<StepReport> {
        const LATEST: [&str; 3] = ["episode", "objective/kl_coef", "learning_rate"];
        let episodes = self.state.episodes;
        let (m, skipped) = self.ppo_step()?;
        let mut report = StepReport {
            samples: self.state.episodes - episodes,
            epoch: self.sampler.epoch_progress(),
            skipped,
            ..Default::default()
        };
        for (k, v) in m {
            if LATEST.contains(&k.as_str()) {
                report.last.push((k, v));
            } else if k != "epoch" {
                report.mean.push((k, v));
            }
        }
        Ok(report)
    }

    /// One PPO step and whether its update was skipped (in part).
    fn ppo_step(&mut self) -> Result<(StepMetrics, bool)> {
        let step = self.state.run.global_step;
        let ppo = self.cfg.ppo.clone();
        let args = self.cfg.args.clone();
        let t_step = Instant::now();
        let mut m = StepMetrics::new();

        // 1. Rollout: prompts × num_generations completions, sampled in micro-batches. In a
        //    data-parallel job every rank draws the same global prompts and generates its
        //    share, each generation batch seeded by its place in the global rollout.
        let world = crate::dist::world();
        let (rank, ranks) = (world.rank(), world.size());
        let n_prompts = self.cfg.completions_per_step() / ppo.num_generations;
        let global = crate::trainer::even_batch(
            self.sampler.next_batch(n_prompts * ranks),
            n_prompts * ranks,
            ranks,
        );
        let picked = global[crate::dist::share(global.len(), rank, ranks)].to_vec();
        let chunk = ppo.local_rollout_forward_batch_size.max(1);
        let first_chunk = rank * (n_prompts * ppo.num_generations).div_ceil(chunk);
        let rows: Vec<usize> = picked
            .iter()
            .flat_map(|&i| std::iter::repeat_n(i, ppo.num_generations))
            .collect();
        let prompts: Vec<Vec<u32>> = rows.iter().map(|&i| self.prompt_ids[i].clone()).collect();
        let t_gen = Instant::now();
        // Generation also yields what the no-grad policy pass of TRL recomputes: the log-prob
        // of each sampled token (temperature-scaled, before top-k/top-p) and the hidden state
        // that predicted it, which the value head reads. One forward pass saved per step.
        let (gens, states) = crate::rollout::generate_batched_with_states(
            &self.policy,
            &prompts,
            &ppo.sampling().config(&self.eos_ids, self.pad_id, 0),
            ppo.local_rollout_forward_batch_size,
            |k| mix(args.seed, step as u64, 1_000 + (first_chunk + k) as u64),
        )?;
        let gen_secs = t_gen.elapsed().as_secs_f64();
        let responses: Vec<Vec<u32>> = gens.iter().map(|g| g.completion_ids.clone()).collect();
        let finished: Vec<bool> = gens.iter().map(|g| g.finished).collect();
        let lens: Vec<usize> = responses.iter().map(|r| r.len()).collect();
        // A completion of zero tokens cannot happen (max_new_tokens ≥ 1), but guard the packing.
        if lens.contains(&0) {
            return Err(Error::Config(
                "a rollout produced an empty completion".into(),
            ));
        }

        // 2. Evaluate the rollout without gradients: the values of the states generation
        //    saw, the reference's log-probs (adapters off), then the scores.
        let t_fwd = Instant::now();
        let logprobs: Vec<Vec<f32>> = gens.into_iter().map(|g| g.logprobs).collect();
        let values: Vec<Vec<f32>> = states
            .iter()
            .map(|h| -> Result<Vec<f32>> {
                let v = self
                    .value_head
                    .forward(&h.to_dtype(DType::F32)?.unsqueeze(0)?)?;
                Ok(v.squeeze(0)?.detach().to_vec1::<f32>()?)
            })
            .collect::<Result<_>>()?;
        drop(states);
        let ref_logprobs = Reference::of(&self.policy, self.reference.as_ref()).logprobs(
            &prompts,
            &responses,
            ppo.temperature,
            self.pad_id,
            ppo.local_rollout_forward_batch_size,
        )?;
        let fwd_secs = t_fwd.elapsed().as_secs_f64();

        let t_score = Instant::now();
        let texts = self.decoder().texts(&responses)?;
        let records: Vec<&PromptRecord> = rows.iter().map(|&i| &self.prompts[i]).collect();
        let mut extra = Vec::new();
        let raw_scores = self.scorer.score(
            &Completions {
                prompts: &records,
                texts: &texts,
                ids: &responses,
                source: Some(IdSource {
                    tokenizer: &self.tok,
                    eos_ids: &self.eos_ids,
                }),
            },
            &mut extra,
        )?;
        let score_secs = t_score.elapsed().as_secs_f64();
        // Every rank's rollout on every rank: from here on each computes the same global
        // rewards, whitening, advantages, KL controller and metrics.
        let (prompts, responses, logprobs, values, ref_logprobs, raw_scores, finished, extra) =
            if ranks > 1 {
                let w = world.as_ref();
                let mut mean = extra;
                crate::dist::reduce_metrics(w, &mut mean);
                let col = |v: Vec<f32>| v.into_iter().map(|x| vec![x]).collect::<Vec<_>>();
                let uncol = |v: Vec<Vec<f32>>| v.into_iter().map(|x| x[0]).collect::<Vec<f32>>();
                let fin: Vec<f32> = finished.iter().map(|&f| f32::from(u8::from(f))).collect();
                (
                    crate::dist::all_gather_ids(w, &prompts),
                    crate::dist::all_gather_ids(w, &responses),
                    crate::dist::all_gather_rows(w, &logprobs),
                    crate::dist::all_gather_rows(w, &values),
                    crate::dist::all_gather_rows(w, &ref_logprobs),
                    uncol(crate::dist::all_gather_rows(w, &col(raw_scores))),
                    uncol(crate::dist::all_gather_rows(w, &col(fin)))
                        .into_iter()
                        .map(|f| f > 0.5)
                        .collect::<Vec<bool>>(),
                    mean,
                )
            } else {
                (
                    prompts,
                    responses,
                    logprobs,
                    values,
                    ref_logprobs,
                    raw_scores,
                    finished,
                    extra,
                )
            };
        let lens: Vec<usize> = responses.iter().map(|r| r.len()).collect();
        let mut scores = raw_scores.clone();
        if let Some(p) = ppo.missing_eos_penalty {
            for (s, &f) in scores.iter_mut().zip(&finished) {
                if !f {
                    *s -= p as f32;
                }
            }
        }
        if let Some(c) = ppo.score_clip {
            for s in &mut scores {
                *s = s.clamp(-c as f32, c as f32);
            }
        }

        // 3. Rewards: −β·KL per token, the score at the last token.
        let beta = self.state.kl_coef;
        let kl: Vec<Vec<f32>> = logprobs
            .iter()
            .zip(&ref_logprobs)
            .map(|(a, b)| {
                a.iter()
                    .zip(b)
                    .map(|(&x, &y)| ppo.kl_estimator.per_token(x, y))
                    .collect()
            })
            .collect();
        let mut rewards: Vec<Vec<f32>> = kl
            .iter()
            .map(|row| row.iter().map(|&k| -(beta as f32) * k).collect())
            .collect();
        let non_score: Vec<f64> = rewards
            .iter()
            .map(|r| r.iter().map(|&x| x as f64).sum())
            .collect();
        for (r, &s) in rewards.iter_mut().zip(&scores) {
            if let Some(last) = r.last_mut() {
                *last += s;
            }
        }
        if ppo.whiten_rewards {
            rewards = rl::whiten(&rewards, false);
        }

        // 4. Advantages: GAE, whitened.
        let (advantages, returns) = rl::gae(&rewards, &values, ppo.gamma, ppo.lam);
        let advantages = rl::whiten(&advantages, true);
        let rollout = Rollout {
            prompts,
            responses,
            logprobs,
            values,
            advantages,
            returns,
        };

        // 5. Update.
        let t_train = Instant::now();
        let (upd, skipped) = self.update(&rollout, step)?;
        let train_secs = t_train.elapsed().as_secs_f64() + fwd_secs;

        // 6. Bookkeeping: KL controller, metrics.
        let n = rollout.responses.len() as f64;
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        let kl_sums: Vec<f64> = kl
            .iter()
            .map(|r| r.iter().map(|&x| x as f64).sum())
            .collect();
        let mean_kl = mean(&kl_sums);
        if ppo.adap_kl_ctrl {
            let mut c = AdaptiveKl {
                value: self.state.kl_coef,
                target: ppo.target,
                horizon: ppo.horizon,
            };
            c.update(mean_kl, rollout.responses.len());
            self.state.kl_coef = c.value;
        }
        let entropy: Vec<f64> = rollout
            .logprobs
            .iter()
            .map(|r| -r.iter().map(|&x| x as f64).sum::<f64>())
            .collect();
        let scores_f: Vec<f64> = scores.iter().map(|&x| x as f64).collect();
        let tokens: usize = lens.iter().sum();
        m.insert("objective/kl".into(), mean_kl);
        m.insert("objective/entropy".into(), mean(&entropy));
        m.insert("objective/non_score_reward".into(), mean(&non_score));
        m.insert("objective/scores".into(), mean(&scores_f));
        m.insert(
            "objective/rlhf_reward".into(),
            mean(&scores_f) + mean(&non_score),
        );
        m.insert("objective/kl_coef".into(), beta);
        for (k, v) in extra {
            m.insert(k, v);
        }
        m.insert("completions/mean_length".into(), tokens as f64 / n);
        m.insert(
            "completions/clipped_ratio".into(),
            finished.iter().filter(|&&f| !f).count() as f64 / n,
        );
        m.insert(
            "val/num_eos_tokens".into(),
            finished.iter().filter(|&&f| f).count() as f64,
        );
        m.extend(upd);
        m.insert("learning_rate".into(), self.scheduler.lr_at(step));
        self.state.episodes += rollout.responses.len();
        m.insert("episode".into(), self.state.episodes as f64);
        m.insert("epoch".into(), self.sampler.epoch_progress());
        let step_secs = t_step.elapsed().as_secs_f64();
        m.insert("time/step".into(), step_secs);
        m.insert("time/generation".into(), gen_secs);
        m.insert("time/scoring".into(), score_secs);
        m.insert("time/training".into(), train_secs);
        m.insert("time/reference".into(), fwd_secs);
        m.insert(
            "time/generation_tokens_per_second".into(),
            tokens as f64 / gen_secs.max(1e-9),
        );
        m.insert(
            "time/tokens_per_second".into(),
            tokens as f64 / step_secs.max(1e-9),
        );
        self.state.sampler = self.sampler.state();
        self.state.ptx_sampler = self.ptx_sampler.as_ref().map(|s| s.state());
        self.state.run.global_step += 1;
        Ok((m, skipped))
    }

    /// `num_ppo_epochs` passes of shuffled mini-batches over the rollout; also whether a
    /// mini-batch's update was skipped for a non-finite loss or gradient.
    fn update(&mut self, ro: &Rollout, step: usize) -> Result<(StepMetrics, bool)> {
        let ppo = &self.cfg.ppo;
        let args = &self.cfg.args;
        let device = self.policy.device().clone();
        let n = ro.responses.len();
        let mb_size = (n / ppo.num_mini_batches).max(1);
        // A data-parallel job's micro-batch is global (`per_device_train_batch_size` per
        // rank); each rank runs its share, its token-mean losses and metrics weighted by its
        // share of the micro-batch's response tokens, so that the sums over the ranks are the
        // global micro-batch's means.
        let world = crate::dist::world();
        let (rank, ranks) = (world.rank(), world.size());
        let micro = args.per_device_train_batch_size.max(1) * ranks;
        let lr = self.scheduler.lr_at(step);
        let mut acc: BTreeMap<&'static str, (f64, usize)> = BTreeMap::new();
        let mut add = |k: &'static str, v: f64| {
            let e = acc.entry(k).or_insert((0.0, 0));
            e.0 += v;
            e.1 += 1;
        };
        let mut norms: Vec<f64> = Vec::new();
        let mut skipped = false;
        for epoch in 0..ppo.num_ppo_epochs {
            let mut order: Vec<usize> = (0..n).collect();
            let mut rng =
                rand::rngs::StdRng::seed_from_u64(mix(args.seed, step as u64, epoch as u64));
            order.shuffle(&mut rng);
            for mb in order.chunks(mb_size) {
                let micro_batches: Vec<&[usize]> = mb.chunks(micro).collect();
                let k = micro_batches.len() as f64;
                let mut grads: Option<GradStore> = None;
                let mut loss_sum = 0.0;
                for global in micro_batches {
                    let idx = &global[crate::dist::share(global.len(), rank, ranks)];
                    let tokens = |ix: &[usize]| -> f64 {
                        ix.iter().map(|&i| ro.responses[i].len() as f64).sum()
                    };
                    let w = tokens(idx) / tokens(global).max(1.0);
                    if idx.is_empty() {
                        return Err(Error::Config(format!(
                            "a micro-batch of {} completions cannot be shared out over {ranks} \
                             ranks: make the rollout (per_device_train_batch_size × \
                             gradient_accumulation_steps × num_mini_batches) a multiple of \
                             per_device_train_batch_size on every rank",
                            global.len()
                        )));
                    }
                    let pr: Vec<&[u32]> = idx.iter().map(|&i| ro.prompts[i].as_slice()).collect();
                    let re: Vec<&[u32]> = idx.iter().map(|&i| ro.responses[i].as_slice()).collect();
                    let packed = pack(&pr, &re, self.pad_id, &device)?;
                    let width = packed.response_len;
                    fn sel<'v>(v: &'v [Vec<f32>], idx: &[usize]) -> Vec<&'v Vec<f32>> {
                        idx.iter().map(|&i| &v[i]).collect()
                    }
                    let old_logp = padded(&sel(&ro.logprobs, idx), width, &device)?;
                    let old_values = padded(&sel(&ro.values, idx), width, &device)?;
                    let adv = padded(&sel(&ro.advantages, idx), width, &device)?;
                    let ret = padded(&sel(&ro.returns, idx), width, &device)?;
                    let (logp, states) = response_logprobs(&self.policy, &packed, ppo.temperature)?;
                    let vpred = self.value_head.forward(&states.to_dtype(DType::F32)?)?;
                    let (pg_loss, ps) = rl::clipped_policy_loss(
                        &logp,
                        &old_logp,
                        &adv,
                        &packed.mask,
                        ppo.cliprange,
                    )?;
                    let (vf_loss, vf_clipfrac) = rl::clipped_value_loss(
                        &vpred,
                        &old_values,
                        &ret,
                        &packed.mask,
                        ppo.cliprange_value,
                    )?;
                    let mut loss = ((&pg_loss + (&vf_loss * ppo.vf_coef)?)? * w)?;
                    if let Some(s) = self.ptx_sampler.as_mut() {
                        // The same global draw on every rank, shared out (weighted by
                        // examples: the demonstrations' token counts are not balanced).
                        let all = s.next_batch(global.len());
                        let mine = &all[crate::dist::share(all.len(), rank, ranks)];
                        let ex: Vec<&SftExample> = mine.iter().map(|&i| &self.ptx[i]).collect();
                        let wx = ex.len() as f64 / all.len().max(1) as f64;
                        let ptx_loss = ptx_nll(&self.policy, &ex, self.pad_id)?;
                        add("loss/ptx_avg", scalar(&ptx_loss)? * wx);
                        loss = (loss + (ptx_loss * (ppo.ptx_coef * wx))?)?;
                    }
                    let loss = (loss / k)?;
                    loss_sum += scalar(&loss)?;
                    add("loss/policy_avg", scalar(&pg_loss)? * w);
                    add("loss/value_avg", scalar(&vf_loss)? * w);
                    add("policy/clipfrac_avg", ps.clipfrac * w);
                    add("policy/approxkl_avg", ps.approxkl * w);
                    add("val/clipfrac_avg", vf_clipfrac * w);
                    add("val/ratio", ps.ratio_mean * w);
                    // A variance does not add up over shares: each rank's, weighted.
                    add("val/ratio_var", ps.ratio_var * w);
                    let g = loss.backward()?;
                    grads = Some(match grads {
                        None => g,
                        Some(a) => accumulate(a, g, &self.params)?,
                    });
                }
                let mut grads = grads.expect("a mini-batch has a micro-batch");
                if ranks > 1 {
                    crate::trainer::all_reduce_grads(world.as_ref(), &mut grads, &self.params)?;
                    let mut l = [loss_sum];
                    world.all_reduce_sum_f64(&mut l);
                    loss_sum = l[0];
                }
                let norm = clip_grad_norm(&mut grads, &self.params, args.max_grad_norm)?;
                if !crate::run::finite_update(step + 1, loss_sum, norm) {
                    skipped = true;
                    continue;
                }
                if !crate::run::applied(step + 1, self.opt.step(&grads, lr)?) {
                    skipped = true;
                    continue;
                }
                norms.push(norm);
            }
        }
        if ranks > 1 {
            // Each key's weighted shares summed over the ranks (every rank added the same keys
            // the same number of times).
            let mut sums: Vec<f64> = acc.values().map(|(s, _)| *s).collect();
            world.all_reduce_sum_f64(&mut sums);
            for ((_, (s, _)), g) in acc.iter_mut().zip(sums) {
                *s = g;
            }
        }
        let mut out: StepMetrics = acc
            .into_iter()
            .map(|(k, (s, c))| (k.to_string(), s / c as f64))
            .collect();
        if !norms.is_empty() {
            // The same on every rank (after the all-reduce): not summed.
            out.insert(
                "grad_norm".into(),
                norms.iter().sum::<f64>() / norms.len() as f64,
            );
        }
        if skipped {
            out.insert("loss/policy_avg".into(), f64::NAN);
        }
        Ok((out, skipped))
    }

    /// Greedy completions for the eval prompts, scored; written to `eval_step{N}.jsonl`.
    pub fn evaluate(&mut self, step: usize) -> Result<StepMetrics> {
        // A data-parallel job shares the prompts out: each rank answers and scores its share,
        // rank 0 gathers them, writes the file and reports.
        let world = crate::dist::world();
        let (rank, ranks) = (world.rank(), world.size());
        let share = crate::dist::share(self.eval_ids.len(), rank, ranks);
        let started = Instant::now();
        let bs = self.cfg.args.per_device_eval_batch_size.max(1);
        let gens = crate::rollout::generate_batched(
            &self.policy,
            &self.eval_ids[share.clone()],
            &self
                .cfg
                .ppo
                .sampling()
                .greedy()
                .config(&self.eos_ids, self.pad_id, 0),
            bs,
            |_| 0,
        )?;
        let ids: Vec<Vec<u32>> = gens.into_iter().map(|g| g.completion_ids).collect();
        let texts = self.decoder().texts(&ids)?;
        let records: Vec<&PromptRecord> = self.eval_prompts[share].iter().collect();
        let mut extra = Vec::new();
        let scores = self.scorer.score(
            &Completions {
                prompts: &records,
                texts: &texts,
                ids: &ids,
                source: Some(IdSource {
                    tokenizer: &self.tok,
                    eos_ids: &self.eos_ids,
                }),
            },
            &mut extra,
        )?;
        let (ids, texts, scores) = if ranks > 1 {
            let w = world.as_ref();
            let ids = crate::dist::all_gather_ids(w, &ids);
            let scores: Vec<Vec<f32>> = scores.iter().map(|&x| vec![x]).collect();
            let scores: Vec<f32> = crate::dist::all_gather_rows(w, &scores)
                .into_iter()
                .map(|x| x[0])
                .collect();
            if rank != 0 {
                return Ok(StepMetrics::new());
            }
            let texts = self.decoder().texts(&ids)?;
            (ids, texts, scores)
        } else {
            (ids, texts, scores)
        };
        let lens: Vec<f64> = ids.iter().map(|x| x.len() as f64).collect();
        let path = self
            .cfg
            .args
            .output_dir
            .join(format!("eval_step{step}.jsonl"));
        let mut out = String::new();
        for ((r, t), s) in self.eval_prompts.iter().zip(&texts).zip(&scores) {
            let mut row = r.row.clone();
            row.insert("completion".into(), t.clone().into());
            row.insert("score".into(), (*s as f64).into());
            out.push_str(&serde_json::Value::Object(row).to_string());
            out.push('\n');
        }
        rlhf_model::save::write_atomic(&path, out.as_bytes())?;
        let n = scores.len().max(1) as f64;
        let mut m = StepMetrics::new();
        m.insert(
            "eval_objective/scores".into(),
            scores.iter().map(|&x| x as f64).sum::<f64>() / n,
        );
        m.insert(
            "eval_completions/mean_length".into(),
            lens.iter().sum::<f64>() / n,
        );
        m.insert("eval_runtime".into(), started.elapsed().as_secs_f64());
        Ok(m)
    }

    fn save_weights(&self, dir: &Path) -> Result<()> {
        crate::checkpoint::save_weights(&self.policy, Heads::Lm, dir)?;
        self.value_head.save(dir)
    }

    /// Writes `checkpoint-{step}`: weights, value head, optimiser, state.
    pub fn save_checkpoint(&self) -> Result<PathBuf> {
        let args = &self.cfg.args;
        if !crate::dist::is_root() {
            // Rank 0 writes; every rank holds the same weights.
            return Ok(args
                .output_dir
                .join(format!("checkpoint-{}", self.state.run.global_step)));
        }
        crate::checkpoint::write_checkpoint(
            &args.output_dir,
            self.state.run.global_step,
            args.save_total_limit,
            |tmp| {
                self.save_weights(tmp)?;
                crate::checkpoint::save_optimizer(tmp, &self.opt)?;
                crate::checkpoint::write_json(&tmp.join("trainer_state.json"), &self.state)
            },
        )
    }

    fn save_final(&self, dir: &Path) -> Result<()> {
        let world = crate::dist::world();
        if world.rank() == 0 {
            self.save_weights(dir)?;
            tracing::info!("saved the trained policy to {}", dir.display());
        }
        world.barrier();
        Ok(())
    }
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

/// Mean next-token NLL of demonstrations on their labelled tokens (PPO-ptx's term).
fn ptx_nll(model: &Model, examples: &[&SftExample], pad: u32) -> Result<Tensor> {
    let b = rlhf_data::collate_sft(examples.iter().copied(), pad);
    let hidden = model.hidden(&b.batch)?;
    let labels: Vec<Vec<i64>> = b
        .labels
        .iter()
        .map(|l| {
            let mut v: Vec<i64> = l.iter().skip(1).copied().collect();
            v.push(rlhf_data::IGNORE_INDEX);
            v
        })
        .collect();
    let (sum, n) = crate::losses::hidden_nll_sum(model, &hidden, &labels)?;
    Ok((sum / n.max(1) as f64)?)
}

/// `rlhf ppo --config FILE [--set k=v]... [--resume [DIR]]`.
pub fn run(
    config_path: &Path,
    overrides: &[String],
    resume: Option<Option<&Path>>,
) -> Result<Summary> {
    let cfg = PpoConfig::load(config_path, overrides)?;
    run_config(cfg, resume)
}

/// Runs a parsed config (also the pipeline's third stage).
pub fn run_config(cfg: PpoConfig, resume: Option<Option<&Path>>) -> Result<Summary> {
    // Before anything is written: not into a model, the lock, no other run's checkpoints.
    let inputs: Vec<(&str, &Path)> = cfg
        .scorer
        .reward_model
        .iter()
        .map(|p| ("reward_model", p.as_path()))
        .collect();
    let _lock = crate::outdir::prepare_run(&cfg.args, &inputs, resume.is_some())?;
    let resume_dir = crate::trainer::resume_dir(&cfg.args.output_dir, resume)?;
    let mut cache = SourceCache::default();
    let mut scorer = cfg.scorer.load(&mut cache)?;
    let mut trainer = PpoTrainer::new(cfg, scorer.as_mut(), &mut cache, resume_dir.as_deref())?;
    trainer.train()
}

#[cfg(test)]
mod tests {
    use rlhf_model::generate::{generate_with_states, GenerationConfig};

    use super::*;

    fn fixture(name: &str) -> PathBuf {
        PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../../shared/fixtures/models"
        ))
        .join(name)
    }

    /// One plain gradient step on the clipped loss raises the log-prob of a completion with
    /// a positive advantage and lowers that of one with a negative advantage.
    #[test]
    fn a_policy_step_follows_the_advantage() {
        let lora: rlhf_model::lora::LoraConfig = serde_json::from_value(serde_json::json!({
            "r": 4, "lora_alpha": 8, "target_modules": "all-linear", "task_type": "CAUSAL_LM"
        }))
        .unwrap();
        let model = Model::load(
            &fixture("llama-gqa"),
            &LoadOptions {
                training: Training::Lora(lora),
                ..Default::default()
            },
        )
        .unwrap();
        let prompts: Vec<&[u32]> = vec![&[5, 6, 7], &[8, 9]];
        let responses: Vec<&[u32]> = vec![&[10, 11, 12], &[13, 14]];
        let packed = pack(&prompts, &responses, 1, &Device::Cpu).unwrap();
        let sums = |m: &Model| -> Vec<f32> {
            let (lp, _) = response_logprobs(m, &packed, 1.0).unwrap();
            let lp = (lp * &packed.mask).unwrap();
            lp.sum(1).unwrap().to_vec1::<f32>().unwrap()
        };
        let before = sums(&model);
        for _ in 0..3 {
            let (lp, _) = response_logprobs(&model, &packed, 1.0).unwrap();
            let adv = Tensor::new(&[[1f32, 1., 1.], [-1., -1., 0.]], &Device::Cpu).unwrap();
            let (loss, _) =
                rl::clipped_policy_loss(&lp, &lp.detach(), &adv, &packed.mask, 0.2).unwrap();
            let g = loss.backward().unwrap();
            for (_, v) in model.params().trainable() {
                if let Some(gr) = g.get(v.as_tensor()) {
                    v.set(&(v.as_tensor() - (gr * 0.5).unwrap()).unwrap())
                        .unwrap();
                }
            }
        }
        let after = sums(&model);
        assert!(after[0] > before[0] + 1e-3, "{before:?} -> {after:?}");
        assert!(after[1] < before[1] - 1e-3, "{before:?} -> {after:?}");
    }

    /// The log-probs and value-head inputs kept from generation equal what a full forward
    /// pass over prompt + completion computes (TRL recomputes them; this saves the pass).
    #[test]
    fn generation_states_match_a_full_forward() {
        let model = Model::load(&fixture("qwen2"), &LoadOptions::default()).unwrap();
        let prompts = vec![vec![5u32, 6, 7, 8], vec![9u32, 10]];
        let cfg = GenerationConfig {
            max_new_tokens: 6,
            temperature: 0.8,
            seed: 1,
            ..Default::default()
        };
        let (gens, states) = generate_with_states(&model, &prompts, &cfg).unwrap();
        let vh = ValueHead::new(
            Some(Tensor::randn(0f32, 1.0, (1, model.config.hidden_size), &Device::Cpu).unwrap()),
            model.config.hidden_size,
            &Device::Cpu,
        )
        .unwrap();
        let pr: Vec<&[u32]> = prompts.iter().map(|p| p.as_slice()).collect();
        let re: Vec<&[u32]> = gens.iter().map(|g| g.completion_ids.as_slice()).collect();
        let packed = pack(&pr, &re, 1, &Device::Cpu).unwrap();
        let (lp, h) = response_logprobs(&model, &packed, 0.8).unwrap();
        let lp: Vec<Vec<f32>> = lp.to_vec2().unwrap();
        let v: Vec<Vec<f32>> = vh.forward(&h).unwrap().to_vec2().unwrap();
        for (i, g) in gens.iter().enumerate() {
            let from_states: Vec<f32> = vh
                .forward(&states[i].unsqueeze(0).unwrap())
                .unwrap()
                .squeeze(0)
                .unwrap()
                .to_vec1()
                .unwrap();
            for j in 0..g.completion_ids.len() {
                assert!((g.logprobs[j] - lp[i][j]).abs() < 1e-4, "logprob {i},{j}");
                assert!((from_states[j] - v[i][j]).abs() < 1e-4, "value {i},{j}");
            }
        }
    }
}
