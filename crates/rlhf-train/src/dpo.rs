//! Direct Preference Optimization (Rafailov et al. 2023; TRL's `DPOTrainer`): the policy learns
//! from preference pairs directly, its log-ratios to a frozen reference standing in for a
//! reward model: −log σ(β[(log π(y_c|x) − log π_ref(y_c|x)) − (log π(y_r|x) − log π_ref(y_r|x))]),
//! or IPO, hinge or robust DPO ([`DpoLossType`]). The reference is TRL's: `ref_model` if given,
//! else the policy with its LoRA adapters off (no second copy), else a frozen copy of the
//! initial policy; with `precompute_ref_log_probs` its log-probs are computed once before
//! training and no reference is kept. Metrics carry TRL's names (`rewards/chosen`,
//! `rewards/rejected`, `rewards/accuracies`, `rewards/margins`, `logps/*`, `logits/*`,
//! `entropy`, `mean_token_accuracy`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use rlhf_data::{Comparison, DpoExample, TokenizeOptions, TruncationMode};
use rlhf_model::{Heads, Model};
use serde::{Deserialize, Serialize};

use crate::config::{self, TrainingArgs};
use crate::losses::{check_dpo_settings, dpo_loss, DpoLossType};
use crate::reference::{per_token, sequence_logps, token_stats, Reference, Seq};
use crate::trainer::{self, MicroOut, Objective, StepScale, Summary};
use crate::{Error, Result};

/// Keys of the DPO trainer beyond the shared ones (TRL's DPOConfig names).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DpoArgs {
    /// How far the policy may move from the reference: higher β, less deviation (IPO's τ).
    pub beta: f64,
    /// "sigmoid" (DPO), "ipo", "hinge" or "robust".
    pub loss_type: DpoLossType,
    /// Probability ε that a label is flipped: robust DPO's ε, and conservative DPO's for
    /// "sigmoid" (TRL 1.x ignores it for "sigmoid"; 0 gives TRL's loss either way).
    pub label_smoothing: f64,
    /// Compute the reference's log-probs of the whole train (and eval) set once before
    /// training; no reference is kept in memory afterwards.
    pub precompute_ref_log_probs: bool,
    /// Pairs per forward pass when precomputing (default: the train or eval batch size).
    pub precompute_ref_batch_size: Option<usize>,
    /// A model directory to use as the reference instead of the initial policy.
    pub ref_model: Option<PathBuf>,
    /// Which end of an over-long pair survives `max_length`: "keep_start" (TRL's default: the
    /// completions lose their end; pairs whose prompt fills `max_length` are dropped) or
    /// "keep_end" (each row loses its start, the prompt first).
    pub truncation_mode: TruncationMode,
    /// Train without dropout (TRL's default): a `[lora]` lora_dropout is set to 0.
    pub disable_dropout: bool,
    /// RPO (Pang et al. 2024, TRL's `rpo_alpha`): add α × the mean per-token NLL of the chosen
    /// completions to the loss, so pushing a rejected answer down cannot pull the chosen
    /// answers' shared wording down with it. None: plain DPO.
    pub rpo_alpha: Option<f64>,
}

impl Default for DpoArgs {
    fn default() -> Self {
        Self {
            beta: 0.1,
            loss_type: DpoLossType::Sigmoid,
            label_smoothing: 0.0,
            precompute_ref_log_probs: false,
            precompute_ref_batch_size: None,
            ref_model: None,
            truncation_mode: TruncationMode::KeepStart,
            disable_dropout: true,
            rpo_alpha: None,
        }
    }
}

/// The keys of [`DpoArgs`].
pub const DPO_KEYS: [&str; 9] = [
    "beta",
    "loss_type",
    "label_smoothing",
    "precompute_ref_log_probs",
    "precompute_ref_batch_size",
    "ref_model",
    "truncation_mode",
    "disable_dropout",
    "rpo_alpha",
];

/// Every key a DPO config may hold.
pub fn allowed_keys() -> Vec<&'static str> {
    let mut v = config::TRAINING_KEYS.to_vec();
    v.extend(DPO_KEYS);
    v.push("lora");
    v
}

/// A parsed DPO config.
#[derive(Debug, Clone)]
pub struct DpoConfig {
    /// Shared training arguments.
    pub args: TrainingArgs,
    /// DPO-specific arguments.
    pub dpo: DpoArgs,
    /// LoRA, when the `[lora]` table is present (its dropout zeroed by `disable_dropout`).
    pub lora: Option<rlhf_model::lora::LoraConfig>,
}

impl DpoConfig {
    /// Reads `path` with `--set` overrides; relative paths are relative to the file.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        let mut table = config::load_table(path, overrides, &allowed_keys())?;
        if let Some(toml::Value::String(s)) = table.get_mut("ref_model") {
            *s = config::relative_to(path.parent().unwrap_or(Path::new(".")), s);
        }
        Self::from_table(path, table)
    }

    /// Builds the config from a table [`config::load_table`] checked (keys known, paths
    /// resolved); `path` names the file in messages. TRL's DPOConfig defaults apply where the
    /// table is silent (learning_rate 1e-6, max_length 1024).
    pub fn from_table(path: &Path, mut table: toml::Table) -> Result<Self> {
        let mut lora = config::take_lora(path, &mut table)?;
        let own = config::take_keys(&mut table, &DPO_KEYS);
        table
            .entry("learning_rate")
            .or_insert(toml::Value::Float(1e-6));
        let args: TrainingArgs = config::parse(path, table)?;
        args.validate(path)?;
        let dpo: DpoArgs = config::parse(path, own)?;
        check_dpo_settings(dpo.loss_type, dpo.beta, dpo.label_smoothing)?;
        if let Some(a) = dpo.rpo_alpha {
            if !(a.is_finite() && a >= 0.0) {
                return Err(Error::invalid(
                    "rpo_alpha",
                    a,
                    "a number >= 0 (TRL's RPO uses 1.0)",
                ));
            }
        }
        if dpo.precompute_ref_batch_size == Some(0) {
            return Err(Error::invalid(
                "precompute_ref_batch_size",
                0,
                "at least 1 (or leave it out)",
            ));
        }
        disable_dropout(&mut lora, dpo.disable_dropout);
        Ok(Self { args, dpo, lora })
    }
}

/// TRL's `disable_dropout`: LoRA dropout off (the only dropout these models apply).
pub(crate) fn disable_dropout(lora: &mut Option<rlhf_model::lora::LoraConfig>, disable: bool) {
    if let Some(l) = lora.as_mut().filter(|l| disable && l.lora_dropout > 0.0) {
        tracing::info!(
            "disable_dropout = true: lora_dropout {} set to 0 (as TRL does)",
            l.lora_dropout
        );
        l.lora_dropout = 0.0;
    }
}

/// A pair as the trainer holds it: its ids and, once precomputed, the reference's log-probs.
#[derive(Debug, Clone, PartialEq)]
pub struct DpoItem {
    /// The tokenised pair.
    pub pair: DpoExample,
    /// Σ log π_ref of the chosen and of the rejected completion, when precomputed.
    pub ref_logps: Option<[f32; 2]>,
}

impl From<DpoExample> for DpoItem {
    fn from(pair: DpoExample) -> Self {
        Self {
            pair,
            ref_logps: None,
        }
    }
}

/// The DPO objective: one micro-batch of pairs → loss and TRL's metrics.
pub struct DpoObjective {
    /// Padding id.
    pub pad_id: u32,
    /// β, the loss and its smoothing, truncation.
    pub dpo: DpoArgs,
    /// The longest row.
    pub max_length: usize,
    /// The reference; `None` once every example carries precomputed log-probs.
    pub reference: Option<Reference>,
}

/// What one forward over a batch of pairs gives.
struct Forward {
    loss: Tensor,
    metrics: Vec<(&'static str, f64)>,
    tokens: usize,
}

impl DpoObjective {
    /// The chosen rows, then the rejected rows, of a batch (TRL's layout).
    fn seqs<'a>(&self, batch: &[&'a DpoItem]) -> Vec<Seq<'a>> {
        let fit = |c: &'a [u32], p: &'a DpoExample| {
            Seq::fit(&p.prompt_ids, c, self.max_length, self.dpo.truncation_mode)
        };
        let chosen = batch.iter().map(|i| fit(&i.pair.chosen_ids, &i.pair));
        let rejected = batch.iter().map(|i| fit(&i.pair.rejected_ids, &i.pair));
        chosen.chain(rejected).collect()
    }

    /// The reference's log-probs of `seqs` (chosen rows, then rejected): precomputed, or a
    /// pass of the reference.
    fn ref_logps(&self, model: &Model, batch: &[&DpoItem], seqs: &[Seq]) -> Result<Vec<f32>> {
        match &self.reference {
            Some(r) => r.logps(model, seqs, self.pad_id, seqs.len()),
            None => {
                let mut out = vec![0.0; seqs.len()];
                let b = batch.len();
                for (i, item) in batch.iter().enumerate() {
                    let [c, r] = item.ref_logps.ok_or_else(|| {
                        Error::Config(format!(
                            "{}: no precomputed reference log-probs and no reference model",
                            item.pair.at
                        ))
                    })?;
                    out[i] = c;
                    out[b + i] = r;
                }
                Ok(out)
            }
        }
    }

    // batch of B pairs -> mean loss over pairs, TRL's metrics, tokens in the 2B rows
    fn forward(&self, model: &Model, batch: &[&DpoItem]) -> Result<Forward> {
        let b = batch.len();
        let seqs = self.seqs(batch);
        let (logps, states) = sequence_logps(model, &seqs, self.pad_id)?;
        let device = logps.device();
        let ref_logps = self.ref_logps(model, batch, &seqs)?;
        let ref_t = Tensor::new(ref_logps.as_slice(), device)?.to_dtype(logps.dtype())?;
        let logratios = (&logps - ref_t)?;
        let lengths: Vec<f32> = seqs.iter().map(|s| s.completion_tokens as f32).collect();
        let lengths = Tensor::new(lengths.as_slice(), device)?.to_dtype(logps.dtype())?;
        let loss = dpo_loss(
            &logratios.narrow(0, 0, b)?,
            &logratios.narrow(0, b, b)?,
            &lengths.narrow(0, 0, b)?,
            &lengths.narrow(0, b, b)?,
            self.dpo.loss_type,
            self.dpo.beta,
            self.dpo.label_smoothing,
        )?;
        // RPO: the chosen completions' mean per-token NLL, weighted by rpo_alpha.
        let mut extra = Vec::new();
        let loss = match self.dpo.rpo_alpha {
            Some(alpha) => {
                let chosen_tokens: usize = seqs[..b].iter().map(|s| s.completion_tokens).sum();
                let nll = (logps.narrow(0, 0, b)?.sum_all()?.neg()? / chosen_tokens.max(1) as f64)?;
                extra.push((
                    "nll_loss",
                    nll.detach().to_dtype(DType::F64)?.to_scalar::<f64>()?,
                ));
                (loss + (nll * alpha)?)?
            }
            None => loss,
        };

        let beta = self.dpo.beta;
        let lr: Vec<f32> = logratios.detach().to_dtype(DType::F32)?.to_vec1()?;
        let lp: Vec<f32> = logps.detach().to_dtype(DType::F32)?.to_vec1()?;
        let mean = |v: &[f32]| v.iter().map(|&x| x as f64).sum::<f64>() / v.len().max(1) as f64;
        let rewards: Vec<f64> = lr.iter().map(|&x| beta * x as f64).collect();
        let (rc, rr) = rewards.split_at(b);
        let stats = token_stats(model, &states, &seqs)?;
        let (sc, sr) = stats.split_at(b);
        let metrics = vec![
            ("rewards/chosen", rc.iter().sum::<f64>() / b as f64),
            ("rewards/rejected", rr.iter().sum::<f64>() / b as f64),
            (
                "rewards/accuracies",
                rc.iter().zip(rr).filter(|(c, r)| c > r).count() as f64 / b as f64,
            ),
            (
                "rewards/margins",
                rc.iter().zip(rr).map(|(c, r)| c - r).sum::<f64>() / b as f64,
            ),
            ("logps/chosen", mean(&lp[..b])),
            ("logps/rejected", mean(&lp[b..])),
            ("logits/chosen", per_token(sc, |s| s.mean_logit)),
            ("logits/rejected", per_token(sr, |s| s.mean_logit)),
            ("entropy", per_token(&stats, |s| s.entropy)),
            ("mean_token_accuracy", per_token(sc, |s| s.correct as f64)),
        ];
        let metrics = metrics.into_iter().chain(extra).collect();
        Ok(Forward {
            loss,
            metrics,
            tokens: seqs.iter().map(Seq::tokens).sum(),
        })
    }

    /// Fills in every item's reference log-probs, `batch` pairs per forward pass (TRL's
    /// `precompute_ref_log_probs`).
    pub fn precompute(
        &self,
        reference: &Reference,
        policy: &Model,
        items: &mut [DpoItem],
        batch: usize,
    ) -> Result<()> {
        let bar = crate::run::progress(items.len().div_ceil(batch.max(1)), 0);
        for chunk in items.chunks_mut(batch.max(1)) {
            let refs: Vec<&DpoItem> = chunk.iter().collect();
            let seqs = self.seqs(&refs);
            let logps = reference.logps(policy, &seqs, self.pad_id, seqs.len())?;
            let b = chunk.len();
            for (i, item) in chunk.iter_mut().enumerate() {
                item.ref_logps = Some([logps[i], logps[b + i]]);
            }
            bar.inc(1);
        }
        bar.finish_and_clear();
        Ok(())
    }
}

impl Objective for DpoObjective {
    type Example = DpoItem;

    fn loss(&self, model: &Model, batch: &[&DpoItem], scale: StepScale) -> Result<MicroOut> {
        let f = self.forward(model, batch)?;
        // transformers divides a mean loss by the accumulation steps.
        Ok(MicroOut {
            loss: (f.loss / scale.micro_batches as f64)?,
            metrics: f.metrics,
            samples: batch.len(),
            tokens: f.tokens,
        })
    }

    /// transformers' `eval_loss` (the mean over pairs) and TRL's metrics averaged over batches.
    fn evaluate(
        &self,
        model: &Model,
        examples: &[DpoItem],
        batch_size: usize,
    ) -> Result<BTreeMap<String, f64>> {
        evaluate_batches(examples, batch_size, |batch| {
            let f = self.forward(model, batch)?;
            let loss = f.loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            Ok((loss, f.metrics))
        })
    }
}

/// Evaluation as transformers and TRL do it: `loss` is the mean over examples (each batch's
/// mean loss weighted by its size), every other metric the mean of its per-batch values.
pub(crate) fn evaluate_batches<T>(
    examples: &[T],
    batch_size: usize,
    mut forward: impl FnMut(&[&T]) -> Result<(f64, Vec<(&'static str, f64)>)>,
) -> Result<BTreeMap<String, f64>> {
    let mut loss = 0.0;
    let mut sums: BTreeMap<String, (f64, usize)> = BTreeMap::new();
    for chunk in examples.chunks(batch_size.max(1)) {
        let refs: Vec<&T> = chunk.iter().collect();
        let (l, metrics) = forward(&refs)?;
        loss += l * chunk.len() as f64;
        for (k, v) in metrics {
            let e = sums.entry(k.to_string()).or_default();
            e.0 += v;
            e.1 += 1;
        }
    }
    let mut out: BTreeMap<String, f64> = sums
        .into_iter()
        .map(|(k, (s, n))| (k, s / n as f64))
        .collect();
    out.insert("loss".into(), loss / examples.len().max(1) as f64);
    Ok(out)
}

/// Loads and tokenises a preference file into DPO pairs (a ranking gives all its pairs),
/// logging what was skipped or truncated.
pub fn load_pairs(
    path: &Path,
    tok: &rlhf_model::tokenizer::Tokenizer,
    args: &TrainingArgs,
    dpo: &DpoArgs,
) -> Result<Vec<DpoItem>> {
    let data = rlhf_data::load::<Comparison>(
        path,
        &rlhf_data::ReadOptions {
            skip_invalid: args.skip_invalid,
        },
    )?;
    let opts = TokenizeOptions {
        max_length: Some(args.max_length),
        truncation_mode: dpo.truncation_mode,
        skip_invalid: args.skip_invalid,
        ..Default::default()
    };
    let t = rlhf_data::tokenize_dpo(tok, &data.records, &opts)?;
    tracing::info!("{}: {}", path.display(), t.report);
    Ok(t.examples.into_iter().map(DpoItem::from).collect())
}

/// `rlhf dpo --config FILE [--set k=v]... [--resume [DIR]]`.
pub fn run(
    config_path: &Path,
    overrides: &[String],
    resume: Option<Option<&Path>>,
) -> Result<Summary> {
    let cfg = DpoConfig::load(config_path, overrides)?;
    let args = &cfg.args;
    // Before anything is written: not into the model, the lock, no other run's checkpoints.
    let inputs: Vec<(&str, &Path)> = cfg
        .dpo
        .ref_model
        .iter()
        .map(|p| ("ref_model", p.as_path()))
        .collect();
    let _lock = crate::outdir::prepare_run(args, &inputs, resume.is_some())?;
    let tok = rlhf_model::tokenizer::Tokenizer::from_dir(&args.model)?;
    let mut train_set = load_pairs(&args.train_file, &tok, args, &cfg.dpo)?;
    let mut eval_set = match &args.eval_file {
        Some(p) => load_pairs(p, &tok, args, &cfg.dpo)?,
        None => Vec::new(),
    };
    let resume_dir = crate::trainer::resume_dir(&args.output_dir, resume)?;
    let model =
        crate::checkpoint::load_model(args, cfg.lora.as_ref(), Heads::Lm, resume_dir.as_deref())?;
    let (trainable, all) = model.params().counts();
    tracing::info!(
        "policy: {trainable} trainable of {all} parameters ({:.2}%), {} train pairs, {} eval pairs",
        100.0 * trainable as f64 / all.max(1) as f64,
        train_set.len(),
        eval_set.len()
    );
    let reference = Reference::load(
        &args.model,
        cfg.dpo.ref_model.as_deref(),
        cfg.lora.is_some(),
        cfg.dpo.precompute_ref_log_probs && resume_dir.is_none(),
    )?;
    let mut objective = DpoObjective {
        pad_id: rlhf_data::pad_id(&tok)?,
        dpo: cfg.dpo.clone(),
        max_length: args.max_length,
        reference: None,
    };
    if cfg.dpo.precompute_ref_log_probs {
        let size = |b: usize| cfg.dpo.precompute_ref_batch_size.unwrap_or(b);
        tracing::info!("computing the reference's log-probs of every pair once");
        objective.precompute(
            &reference,
            &model,
            &mut train_set,
            size(args.per_device_train_batch_size),
        )?;
        objective.precompute(
            &reference,
            &model,
            &mut eval_set,
            size(args.per_device_eval_batch_size),
        )?;
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
    fn config_names_and_defaults_are_trls() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("dpo.toml");
        std::fs::write(
            &p,
            "model = \"m\"\ntrain_file = \"t.jsonl\"\nref_model = \"ref\"\n[lora]\nr = 4\nlora_dropout = 0.1\n",
        )
        .unwrap();
        let cfg = DpoConfig::load(&p, &[]).unwrap();
        assert_eq!(cfg.args.learning_rate, 1e-6);
        assert_eq!(
            (cfg.dpo.beta, cfg.dpo.loss_type),
            (0.1, DpoLossType::Sigmoid)
        );
        assert_eq!(cfg.dpo.ref_model, Some(dir.path().join("ref")));
        assert_eq!(cfg.lora.unwrap().lora_dropout, 0.0, "disable_dropout");
        let set = |kv: &str| DpoConfig::load(&p, &[kv.to_string()]);
        assert_eq!(
            set("loss_type=ipo").unwrap().dpo.loss_type,
            DpoLossType::Ipo
        );
        assert_eq!(
            set("disable_dropout=false")
                .unwrap()
                .lora
                .unwrap()
                .lora_dropout,
            0.1
        );
        let err = set("loss_type=kto").unwrap_err().to_string();
        assert!(err.contains("kto") && err.contains("sigmoid"), "{err}");
        let err = set("loss_type=robust")
            .and(set("label_smoothing=0.5"))
            .unwrap_err();
        assert!(err.to_string().contains("label_smoothing"), "{err}");
        let err = set("betta=0.2").unwrap_err().to_string();
        assert!(err.contains("`beta`"), "{err}");
    }
}
