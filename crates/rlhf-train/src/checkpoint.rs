//! Checkpoints: `output_dir/checkpoint-N/` holding the weights (PEFT adapter, or a full HF
//! model), `optimizer.safetensors` and `trainer_state.json`. A checkpoint is written whole into
//! a hidden temporary directory and renamed into place, so a run killed mid-save leaves the
//! previous checkpoint intact and no half-written one under a real name.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use rlhf_model::{Heads, LoadOptions, Model, Training};

use crate::config::TrainingArgs;
use crate::optim::AdamW;
use crate::trainer::{checkpoints, TrainerState};
use crate::{Error, Result};

/// Writes the model the way the run's output is written: an adapter for LoRA runs, a full HF
/// directory otherwise.
fn save_weights(model: &Model, heads: Heads, dir: &Path) -> Result<()> {
    if model.lora().is_some() {
        model.save_adapter(dir)?;
    } else {
        model.save_pretrained(dir, heads)?;
    }
    Ok(())
}

/// Saves `checkpoint-{global_step}` and prunes to `save_total_limit`.
pub fn save(
    args: &TrainingArgs,
    model: &Model,
    heads: Heads,
    opt: &AdamW,
    state: &TrainerState,
) -> Result<PathBuf> {
    let name = format!("checkpoint-{}", state.global_step);
    let dir = args.output_dir.join(&name);
    let tmp = args.output_dir.join(format!(".{name}.tmp"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    save_weights(model, heads, &tmp)?;
    rlhf_model::save::save_safetensors(&tmp.join("optimizer.safetensors"), &opt.state_tensors()?)?;
    let json = serde_json::to_string_pretty(state).expect("state serialises");
    rlhf_model::save::write_atomic(&tmp.join("trainer_state.json"), json.as_bytes())?;
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    }
    std::fs::rename(&tmp, &dir).map_err(|e| Error::io(&dir, e))?;
    tracing::info!("saved {}", dir.display());
    if let Some(limit) = args.save_total_limit {
        let all = checkpoints(&args.output_dir);
        let excess = all.len().saturating_sub(limit.max(1));
        for (_, old) in all.into_iter().take(excess) {
            std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
        }
    }
    Ok(dir)
}

/// Writes the trained model into `output_dir` itself (what the next stage loads).
pub fn save_final(args: &TrainingArgs, model: &Model, heads: Heads) -> Result<()> {
    save_weights(model, heads, &args.output_dir)?;
    tracing::info!("saved the trained model to {}", args.output_dir.display());
    Ok(())
}

/// The optimiser state of a checkpoint.
pub fn read_optimizer(dir: &Path) -> Result<HashMap<String, Tensor>> {
    let p = dir.join("optimizer.safetensors");
    if !p.exists() {
        return Err(Error::Config(format!(
            "{}: missing; is {} a checkpoint-N directory of this run?",
            p.display(),
            dir.display()
        )));
    }
    candle_core::safetensors::load(&p, &candle_core::Device::Cpu)
        .map_err(|e| Error::Config(format!("{}: {e}", p.display())))
}

/// Loads the model a run trains: the configured model with fresh LoRA adapters or full
/// training, or, when resuming, the checkpoint's weights.
pub fn load_model(
    args: &TrainingArgs,
    lora: Option<&rlhf_model::lora::LoraConfig>,
    heads: Heads,
    resume: Option<&Path>,
) -> Result<Model> {
    let training = match lora {
        Some(l) => Training::Lora(l.clone()),
        None => Training::Full,
    };
    let (dir, adapter) = match (resume, lora) {
        (Some(ckpt), Some(_)) => (args.model.clone(), Some(ckpt.to_path_buf())),
        (Some(ckpt), None) => (ckpt.to_path_buf(), None),
        (None, _) => (args.model.clone(), None),
    };
    Ok(Model::load(
        &dir,
        &LoadOptions {
            heads,
            training,
            seed: args.seed,
            adapter,
            ..Default::default()
        },
    )?)
}
