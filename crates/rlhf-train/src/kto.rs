//! Kahneman-Tversky Optimization (Ethayarajh et al. 2024; TRL's `KTOTrainer`): the policy
//! learns from single completions labelled desirable or undesirable, no pairs needed. A
//! completion's implied reward r = log π(y|x) − log π_ref(y|x) is compared with a reference
//! point z₀, the policy's KL from the reference estimated on mismatched pairs of the same batch
//! (each prompt with the previous row's completion, TRL's rotation), clamped at 0 and
//! detached: loss λ_D(1 − σ(β(r − z₀))) for desirable and λ_U(1 − σ(β(z₀ − r))) for
//! undesirable completions, averaged over the batch. The reference is DPO's (see
//! [`crate::reference`]). Metrics carry TRL's names (`kl`, `rewards/chosen`,
//! `rewards/rejected`, `rewards/margins`, `logps/*`, `logits/*`, `entropy`), "chosen" meaning
//! desirable.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use rlhf_data::{KtoExample, TokenizeOptions, TruncationMode, UnpairedPreference};
use rlhf_model::{Heads, Model};
use serde::{Deserialize, Serialize};

use crate::config::{self, TrainingArgs};
use crate::dpo::{disable_dropout, evaluate_batches};
use crate::losses::{kto_loss, kto_reference_point, KtoLossType};
use crate::reference::{per_token, sequence_logps, token_stats, Reference, Seq};
use crate::trainer::{self, MicroOut, Objective, StepScale, Summary};
use crate::{Error, Result};

/// Keys of the KTO trainer beyond the shared ones (TRL's KTOConfig names).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct KtoArgs {
    /// How far the policy may move from the reference: higher β, less deviation.
    pub beta: f64,
    /// "kto" (the paper's loss, with the KL reference point) or "apo_zero_unpaired" (none).
    pub loss_type: KtoLossType,
    /// λ_D, the weight of desirable completions' losses.
    pub desirable_weight: f64,
    /// λ_U, the weight of undesirable completions' losses.
    pub undesirable_weight: f64,
    /// Compute the reference's log-probs (and those of the KL pairs) once before training.
    pub precompute_ref_log_probs: bool,
    /// Rows (each with its KL row) per forward pass when precomputing (default: the train or
    /// eval batch size).
    pub precompute_ref_batch_size: Option<usize>,
    /// A model directory to use as the reference instead of the initial policy.
    pub ref_model: Option<PathBuf>,
    /// Train without dropout (TRL's default): a `[lora]` lora_dropout is set to 0.
    pub disable_dropout: bool,
}

impl Default for KtoArgs {
    fn default() -> Self {
        Self {
            beta: 0.1,
            loss_type: KtoLossType::Kto,
            desirable_weight: 1.0,
            undesirable_weight: 1.0,
            precompute_ref_log_probs: false,
            precompute_ref_batch_size: None,
            ref_model: None,
            disable_dropout: true,
        }
    }
}

/// The keys of [`KtoArgs`].
pub const KTO_KEYS: [&str; 8] = [
    "beta",
    "loss_type",
    "desirable_weight",
    "undesirable_weight",
    "precompute_ref_log_probs",
    "precompute_ref_batch_size",
    "ref_model",
    "disable_dropout",
];

/// Every key a KTO config may hold.
pub fn allowed_keys() -> Vec<&'static str> {
    let mut v = config::TRAINING_KEYS.to_vec();
    v.extend(KTO_KEYS);
    v.push("lora");
    v
}

/// A parsed KTO config.
#[derive(Debug, Clone)]
pub struct KtoConfig {
    /// Shared training arguments.
    pub args: TrainingArgs,
    /// KTO-specific arguments.
    pub kto: KtoArgs,
    /// LoRA, when the `[lora]` table is present (its dropout zeroed by `disable_dropout`).
    pub lora: Option<rlhf_model::lora::LoraConfig>,
}

impl KtoConfig {
    /// Reads `path` with `--set` overrides; relative paths are relative to the file.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        let mut table = config::load_table(path, overrides, &allowed_keys())?;
        if let Some(toml::Value::String(s)) = table.get_mut("ref_model") {
            *s = config::relative_to(path.parent().unwrap_or(Path::new(".")), s);
        }
        Self::from_table(path, table)
    }

    /// Builds the config from a table [`config::load_table`] checked (keys known, paths
    /// resolved); `path` names the file in messages. TRL's KTOConfig defaults apply where the
    /// table is silent: learning_rate 1e-6, max_length 1024, and sequential order
    /// (`shuffle = false`, TRL's `train_sampling_strategy = "sequential"`).
    pub fn from_table(path: &Path, mut table: toml::Table) -> Result<Self> {
        let mut lora = config::take_lora(path, &mut table)?;
        let own = config::take_keys(&mut table, &KTO_KEYS);
        table
            .entry("learning_rate")
            .or_insert(toml::Value::Float(1e-6));
        table
            .entry("shuffle")
            .or_insert(toml::Value::Boolean(false));
        let args: TrainingArgs = config::parse(path, table)?;
        args.validate(path)?;
        let kto: KtoArgs = config::parse(path, own)?;
        kto.check(&args)?;
        disable_dropout(&mut lora, kto.disable_dropout);
        Ok(Self { args, kto, lora })
    }
}

impl KtoArgs {
    /// Whether the loss reads the KL reference point (TRL's `calculate_KL`).
    pub fn uses_kl(&self) -> bool {
        self.loss_type == KtoLossType::Kto
    }

    fn check(&self, args: &TrainingArgs) -> Result<()> {
        if !(self.beta.is_finite() && self.beta > 0.0) {
            return Err(Error::invalid(
                "beta",
                self.beta,
                "a positive number (TRL's default is 0.1)",
            ));
        }
        for (key, w) in [
            ("desirable_weight", self.desirable_weight),
            ("undesirable_weight", self.undesirable_weight),
        ] {
            if !(w.is_finite() && w > 0.0) {
                return Err(Error::invalid(key, w, "a positive weight (default 1.0)"));
            }
        }
        if self.precompute_ref_batch_size == Some(0) {
            return Err(Error::invalid(
                "precompute_ref_batch_size",
                0,
                "at least 1 (or leave it out)",
            ));
        }
        if self.uses_kl() && args.per_device_train_batch_size < 2 {
            return Err(Error::invalid(
                "per_device_train_batch_size",
                args.per_device_train_batch_size,
                "at least 2 for loss_type = \"kto\": the KL reference point pairs each prompt \
                 with another row's completion of the same batch (alone, a row is paired with \
                 its own completion and z₀ is its reward)",
            ));
        }
        if self.uses_kl() && self.precompute_ref_log_probs && args.shuffle {
            return Err(Error::Config(
                "precompute_ref_log_probs = true with loss_type = \"kto\" needs shuffle = false \
                 (TRL's sequential order): the KL pairs are made within each batch, so the \
                 batches must be known before training to precompute their reference log-probs"
                    .into(),
            ));
        }
        Ok(())
    }
}

/// A labelled completion as the trainer holds it: its ids and, once precomputed, the
/// reference's log-probs of it and of its KL pair.
#[derive(Debug, Clone, PartialEq)]
pub struct KtoItem {
    /// The tokenised row.
    pub example: KtoExample,
    /// Σ log π_ref of the completion, when precomputed.
    pub ref_logp: Option<f32>,
    /// Σ log π_ref of the previous row's completion in its batch after this prompt, when
    /// precomputed (batches in file order).
    pub ref_kl_logp: Option<f32>,
}

impl From<KtoExample> for KtoItem {
    fn from(example: KtoExample) -> Self {
        Self {
            example,
            ref_logp: None,
            ref_kl_logp: None,
        }
    }
}

/// The KTO objective: one micro-batch of labelled completions → loss and TRL's metrics.
pub struct KtoObjective {
    /// Padding id.
    pub pad_id: u32,
    /// β, the loss and its weights.
    pub kto: KtoArgs,
    /// The longest row.
    pub max_length: usize,
    /// The reference; `None` once every example carries precomputed log-probs.
    pub reference: Option<Reference>,
}

struct Forward {
    loss: Tensor,
    metrics: Vec<(&'static str, f64)>,
    tokens: usize,
}

impl KtoObjective {
    /// The rows of a batch, and its KL rows: prompt i with completion i − 1 (the first with
    /// the last), TRL's rotation of the completions within a batch.
    fn seqs<'a>(&self, batch: &[&'a KtoItem]) -> (Vec<Seq<'a>>, Vec<Seq<'a>>) {
        let fit = |p: &'a KtoItem, c: &'a KtoItem| {
            Seq::fit(
                &p.example.prompt_ids,
                &c.example.completion_ids,
                self.max_length,
                TruncationMode::KeepStart,
            )
        };
        let n = batch.len();
        let rows = batch.iter().map(|i| fit(i, i)).collect();
        let kl = (0..n)
            .map(|i| fit(batch[i], batch[(i + n - 1) % n]))
            .collect();
        (rows, kl)
    }

    /// The reference's log-probs of the rows and of the KL rows (empty without KL).
    fn ref_logps(
        &self,
        model: &Model,
        batch: &[&KtoItem],
        rows: &[Seq],
        kl: &[Seq],
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        match &self.reference {
            Some(r) => {
                let all: Vec<Seq> = rows.iter().chain(kl).copied().collect();
                let mut lp = r.logps(model, &all, self.pad_id, all.len())?;
                let kl_lp = lp.split_off(rows.len());
                Ok((lp, kl_lp))
            }
            None => {
                let missing = |i: &KtoItem| {
                    Error::Config(format!(
                        "{}: no precomputed reference log-probs and no reference model",
                        i.example.at
                    ))
                };
                let lp = batch
                    .iter()
                    .map(|i| i.ref_logp.ok_or_else(|| missing(i)))
                    .collect::<Result<_>>()?;
                let kl_lp = if kl.is_empty() {
                    Vec::new()
                } else {
                    batch
                        .iter()
                        .map(|i| i.ref_kl_logp.ok_or_else(|| missing(i)))
                        .collect::<Result<_>>()?
                };
                Ok((lp, kl_lp))
            }
        }
    }

    // batch of n rows -> mean loss, TRL's metrics, tokens in the rows
    // `global`: a training step of a data-parallel job, whose reference point spans the
    // ranks.
    fn forward(&self, model: &Model, batch: &[&KtoItem], global: bool) -> Result<Forward> {
        let (rows, kl_rows) = self.seqs(batch);
        let kl_rows = if self.kto.uses_kl() {
            kl_rows
        } else {
            Vec::new()
        };
        let (logps, states) = sequence_logps(model, &rows, self.pad_id)?;
        let device = logps.device().clone();
        // The KL rows only set z₀, which is detached: no graph for them.
        let kl_logps = if kl_rows.is_empty() {
            Vec::new()
        } else {
            Reference::Policy {
                adapters_off: false,
            }
            .logps(model, &kl_rows, self.pad_id, kl_rows.len())?
        };
        let (ref_logps, ref_kl_logps) = self.ref_logps(model, batch, &rows, &kl_rows)?;
        let mut z0 = kto_reference_point(&kl_logps, &ref_kl_logps);
        let world = crate::dist::world();
        if global && world.size() > 1 {
            // The reference point over the whole global batch, as TRL gathers it from every
            // process (the shares are the same size: the mean of the ranks' means).
            let mut v = [z0 / world.size() as f64];
            world.all_reduce_sum_f64(&mut v);
            z0 = v[0];
        }
        let ref_t = Tensor::new(ref_logps.as_slice(), &device)?.to_dtype(logps.dtype())?;
        let logratios = (&logps - ref_t)?;
        let (chosen, rejected): (Vec<usize>, Vec<usize>) =
            (0..batch.len()).partition(|&i| batch[i].example.label);
        let select = |idx: &[usize]| -> Result<Tensor> {
            if idx.is_empty() {
                return Ok(Tensor::zeros(0, logratios.dtype(), &device)?);
            }
            let idx: Vec<u32> = idx.iter().map(|&i| i as u32).collect();
            Ok(logratios.index_select(&Tensor::new(idx.as_slice(), &device)?, 0)?)
        };
        let loss = kto_loss(
            &select(&chosen)?,
            &select(&rejected)?,
            z0,
            self.kto.loss_type,
            self.kto.beta,
            self.kto.desirable_weight,
            self.kto.undesirable_weight,
        )?;

        let lr: Vec<f32> = logratios.detach().to_dtype(DType::F32)?.to_vec1()?;
        let lp: Vec<f32> = logps.detach().to_dtype(DType::F32)?.to_vec1()?;
        let stats = token_stats(model, &states, &rows)?;
        let of = |idx: &[usize]| idx.iter().map(|&i| stats[i]).collect::<Vec<_>>();
        let mean = |idx: &[usize], v: &[f32], scale: f64| {
            idx.iter().map(|&i| scale * v[i] as f64).sum::<f64>() / idx.len() as f64
        };
        let beta = self.kto.beta;
        let mut metrics = vec![("kl", z0), ("entropy", per_token(&stats, |s| s.entropy))];
        let (sc, sr) = (of(&chosen), of(&rejected));
        if sc.iter().any(|s| s.tokens > 0) {
            metrics.push(("logits/chosen", per_token(&sc, |s| s.mean_logit)));
        }
        if sr.iter().any(|s| s.tokens > 0) {
            metrics.push(("logits/rejected", per_token(&sr, |s| s.mean_logit)));
        }
        if !chosen.is_empty() {
            metrics.push(("rewards/chosen", mean(&chosen, &lr, beta)));
            metrics.push(("logps/chosen", mean(&chosen, &lp, 1.0)));
        }
        if !rejected.is_empty() {
            metrics.push(("rewards/rejected", mean(&rejected, &lr, beta)));
            metrics.push(("logps/rejected", mean(&rejected, &lp, 1.0)));
        }
        if !chosen.is_empty() && !rejected.is_empty() {
            metrics.push((
                "rewards/margins",
                mean(&chosen, &lr, beta) - mean(&rejected, &lr, beta),
            ));
        }
        Ok(Forward {
            loss,
            metrics,
            tokens: rows.iter().map(Seq::tokens).sum(),
        })
    }

    /// Fills in every item's reference log-probs over the batches training will form: chunks
    /// of `batch` rows in order (the KL rows pair within them), `forward` rows per pass.
    pub fn precompute(
        &self,
        reference: &Reference,
        policy: &Model,
        items: &mut [KtoItem],
        batch: usize,
        forward: usize,
    ) -> Result<()> {
        let bar = crate::run::progress(items.len().div_ceil(batch.max(1)), 0);
        for chunk in items.chunks_mut(batch.max(1)) {
            let refs: Vec<&KtoItem> = chunk.iter().collect();
            let (rows, kl) = self.seqs(&refs);
            let kl = if self.kto.uses_kl() { kl } else { Vec::new() };
            let all: Vec<Seq> = rows.iter().chain(&kl).copied().collect();
            let lp = reference.logps(policy, &all, self.pad_id, forward)?;
            let n = chunk.len();
            for (i, item) in chunk.iter_mut().enumerate() {
                item.ref_logp = Some(lp[i]);
                item.ref_kl_logp = lp.get(n + i).copied();
            }
            bar.inc(1);
        }
        bar.finish_and_clear();
        Ok(())
    }
}

impl Objective for KtoObjective {
    type Example = KtoItem;

    fn loss(&self, model: &Model, batch: &[&KtoItem], scale: StepScale) -> Result<MicroOut> {
        let f = self.forward(model, batch, true)?;
        Ok(MicroOut {
            loss: (f.loss / scale.micro_batches as f64)?,
            metrics: f.metrics,
            samples: batch.len(),
            tokens: f.tokens,
        })
    }

    /// transformers' `eval_loss` (the mean over rows) and TRL's metrics averaged over batches;
    /// the KL rows pair within each evaluation batch.
    fn evaluate(
        &self,
        model: &Model,
        examples: &[KtoItem],
        batch_size: usize,
    ) -> Result<BTreeMap<String, f64>> {
        evaluate_batches(examples, batch_size, |batch| {
            let f = self.forward(model, batch, false)?;
            let loss = f.loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            Ok((loss, f.metrics))
        })
    }
}

/// Loads and tokenises an unpaired preference file, logging what was skipped or truncated
/// and, as TRL does, whether the weights balance desirable against undesirable rows.
pub fn load_rows(
    path: &Path,
    tok: &rlhf_model::tokenizer::Tokenizer,
    args: &TrainingArgs,
    kto: &KtoArgs,
) -> Result<Vec<KtoItem>> {
    let data = rlhf_data::load::<UnpairedPreference>(
        path,
        &rlhf_data::ReadOptions {
            skip_invalid: args.skip_invalid,
        },
    )?;
    let opts = TokenizeOptions {
        max_length: Some(args.max_length),
        skip_invalid: args.skip_invalid,
        ..Default::default()
    };
    let t = rlhf_data::tokenize_unpaired(tok, &data.records, &opts)?;
    let desirable = t.examples.iter().filter(|e| e.label).count();
    tracing::info!(
        "{}: {}; {desirable} desirable, {} undesirable",
        path.display(),
        t.report,
        t.examples.len() - desirable
    );
    if let Some(advice) = weight_advice(desirable, t.examples.len() - desirable, kto) {
        tracing::warn!("{}: {advice}", path.display());
    }
    Ok(t.examples.into_iter().map(KtoItem::from).collect())
}

/// The paper's advice (eq. 8: λ_D·n_D / (λ_U·n_U) in [1, 4/3]) when neither weight is in the
/// range it gives for this data, as TRL words it; `None` when the data is balanced or a
/// weight fits.
pub fn weight_advice(desirable: usize, undesirable: usize, kto: &KtoArgs) -> Option<String> {
    let (nd, nu) = (desirable.max(1) as f64, undesirable.max(1) as f64);
    if nd == nu {
        return None;
    }
    let round = |x: f64| (x * 100.0).round() / 100.0;
    let d = (
        round(nu * kto.undesirable_weight / nd),
        round(nu * kto.undesirable_weight / nd * 1.33),
    );
    let u = (
        round(nd * kto.desirable_weight / nu / 1.33),
        round(nd * kto.desirable_weight / nu),
    );
    let inside = |(lo, hi): (f64, f64), w: f64| lo <= w && w <= hi;
    if inside(d, kto.desirable_weight) || inside(u, kto.undesirable_weight) {
        return None;
    }
    Some(format!(
        "{desirable} desirable and {undesirable} undesirable rows, but the weights do not \
         balance them; set EITHER desirable_weight in [{}, {}] OR undesirable_weight in [{}, {}] \
         (Ethayarajh et al. 2024, eq. 8)",
        d.0, d.1, u.0, u.1
    ))
}

/// `rlhf kto --config FILE [--set k=v]... [--resume [DIR]]`.
pub fn run(
    config_path: &Path,
    overrides: &[String],
    resume: Option<Option<&Path>>,
) -> Result<Summary> {
    let cfg = KtoConfig::load(config_path, overrides)?;
    let args = &cfg.args;
    // Before anything is written: not into the model, the lock, no other run's checkpoints.
    let inputs: Vec<(&str, &Path)> = cfg
        .kto
        .ref_model
        .iter()
        .map(|p| ("ref_model", p.as_path()))
        .collect();
    let _lock = crate::outdir::prepare_run(args, &inputs, resume.is_some())?;
    let tok = rlhf_model::tokenizer::Tokenizer::from_dir(&args.model)?;
    let mut train_set = load_rows(&args.train_file, &tok, args, &cfg.kto)?;
    let mut eval_set = match &args.eval_file {
        Some(p) => load_rows(p, &tok, args, &cfg.kto)?,
        None => Vec::new(),
    };
    let resume_dir = crate::trainer::resume_dir(&args.output_dir, resume)?;
    let model =
        crate::checkpoint::load_model(args, cfg.lora.as_ref(), Heads::Lm, resume_dir.as_deref())?;
    let (trainable, all) = model.params().counts();
    tracing::info!(
        "policy: {trainable} trainable of {all} parameters ({:.2}%), {} train rows, {} eval rows",
        100.0 * trainable as f64 / all.max(1) as f64,
        train_set.len(),
        eval_set.len()
    );
    let reference = Reference::load(
        &args.model,
        cfg.kto.ref_model.as_deref(),
        cfg.lora.is_some(),
        cfg.kto.precompute_ref_log_probs && resume_dir.is_none(),
    )?;
    let mut objective = KtoObjective {
        pad_id: rlhf_data::pad_id(&tok)?,
        kto: cfg.kto.clone(),
        max_length: args.max_length,
        reference: None,
    };
    if cfg.kto.precompute_ref_log_probs {
        tracing::info!("computing the reference's log-probs of every row once");
        for (set, batch) in [
            (&mut train_set, args.per_device_train_batch_size),
            (&mut eval_set, args.per_device_eval_batch_size),
        ] {
            let forward = 2 * cfg.kto.precompute_ref_batch_size.unwrap_or(batch);
            objective.precompute(&reference, &model, set, batch, forward)?;
        }
        drop(reference);
    } else {
        objective.reference = Some(reference);
    }
    tok.save(&args.output_dir)?;
    trainer::train(
        args,
        &model,
        &objective,
        &train_set,
        &eval_set,
        Heads::Lm,
        resume_dir.as_deref(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_and_checks_are_trls() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("kto.toml");
        std::fs::write(
            &p,
            "model = \"m\"\ntrain_file = \"t.jsonl\"\nper_device_train_batch_size = 4\n",
        )
        .unwrap();
        let cfg = KtoConfig::load(&p, &[]).unwrap();
        assert_eq!(cfg.args.learning_rate, 1e-6);
        assert!(!cfg.args.shuffle, "TRL's KTO samples sequentially");
        assert_eq!(cfg.kto.loss_type, KtoLossType::Kto);
        let set = |kv: &[&str]| {
            KtoConfig::load(&p, &kv.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        };
        let err = set(&["per_device_train_batch_size=1"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("at least 2"), "{err}");
        assert!(set(&[
            "per_device_train_batch_size=1",
            "loss_type=apo_zero_unpaired"
        ])
        .is_ok());
        let err = set(&["precompute_ref_log_probs=true", "shuffle=true"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("shuffle = false"), "{err}");
        assert!(set(&["undesirable_weight=0"]).is_err());
        let err = set(&["desireable_weight=2"]).unwrap_err().to_string();
        assert!(err.contains("`desirable_weight`"), "{err}");
    }

    #[test]
    fn weight_advice_follows_the_papers_range() {
        let kto = KtoArgs::default();
        assert_eq!(weight_advice(10, 10, &kto), None);
        // 10 desirable, 30 undesirable: λ_D in [3, 3.99] or λ_U in [0.25, 0.33].
        let a = weight_advice(10, 30, &kto).unwrap();
        assert!(a.contains("[3, 3.99]") && a.contains("[0.25, 0.33]"), "{a}");
        let ok = KtoArgs {
            desirable_weight: 3.5,
            ..KtoArgs::default()
        };
        assert_eq!(weight_advice(10, 30, &ok), None);
    }

    #[test]
    fn kl_rows_pair_each_prompt_with_the_previous_completion() {
        let at = rlhf_data::Location::line(Path::new("t.jsonl"), 1);
        let item = |p: u32, c: u32| {
            KtoItem::from(KtoExample {
                at: at.clone(),
                prompt_ids: vec![p],
                completion_ids: vec![c, c],
                label: true,
            })
        };
        let items = [item(1, 10), item(2, 20), item(3, 30)];
        let obj = KtoObjective {
            pad_id: 0,
            kto: KtoArgs::default(),
            max_length: 16,
            reference: None,
        };
        let refs: Vec<&KtoItem> = items.iter().collect();
        let (rows, kl) = obj.seqs(&refs);
        let pairs = |s: &[Seq]| -> Vec<(u32, u32)> {
            s.iter().map(|s| (s.prompt[0], s.completion[0])).collect()
        };
        assert_eq!(pairs(&rows), [(1, 10), (2, 20), (3, 30)]);
        // TRL: KL_completion_ids = [c[-1]] + c[:-1].
        assert_eq!(pairs(&kl), [(1, 30), (2, 10), (3, 20)]);
    }
}
