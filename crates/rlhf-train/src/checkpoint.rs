//! Checkpoints: `output_dir/checkpoint-N/` holding the weights (PEFT adapter, or a full HF
//! model), `optimizer.safetensors` and `trainer_state.json`. A checkpoint is written whole into
//! a hidden temporary directory (each file fsynced) and renamed into place, the directory and
//! `output_dir` fsynced ([`rlhf_model::save::rename_durable`]), so a run killed mid-save, or a
//! power loss, leaves the previous checkpoint intact and no half-written one under a real name.

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
pub fn save_weights(model: &Model, heads: Heads, dir: &Path) -> Result<()> {
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
    let dir = args
        .output_dir
        .join(format!("checkpoint-{}", state.run.global_step));
    if !crate::dist::is_root() {
        // Rank 0 writes the job's checkpoints; the weights are the same on every rank.
        return Ok(dir);
    }
    write_checkpoint(
        &args.output_dir,
        state.run.global_step,
        args.save_total_limit,
        |tmp| {
            save_weights(model, heads, tmp)?;
            save_optimizer(tmp, opt)?;
            write_json(&tmp.join("trainer_state.json"), state)
        },
    )
}

/// Writes `output_dir/checkpoint-{step}`: `fill` writes the files into a hidden temporary
/// directory, which is then renamed into place; older checkpoints beyond `limit` are deleted.
pub fn write_checkpoint(
    output_dir: &Path,
    step: usize,
    limit: Option<usize>,
    fill: impl FnOnce(&Path) -> Result<()>,
) -> Result<PathBuf> {
    let name = format!("checkpoint-{step}");
    let dir = output_dir.join(&name);
    let tmp = output_dir.join(format!(".{name}.tmp"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    fill(&tmp)?;
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    }
    // Every file in `tmp` was fsynced as it was written; the directory itself, the rename and
    // `output_dir` are synced here, so a finished checkpoint survives a power loss.
    rlhf_model::save::rename_durable(&tmp, &dir)?;
    tracing::info!("saved {}", dir.display());
    if let Some(limit) = limit {
        let all = checkpoints(output_dir);
        let excess = all.len().saturating_sub(limit.max(1));
        for (_, old) in all.into_iter().take(excess) {
            std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
        }
    }
    Ok(dir)
}

/// Writes the optimiser state as `optimizer.safetensors` in `dir`.
pub fn save_optimizer(dir: &Path, opt: &AdamW) -> Result<()> {
    rlhf_model::save::save_safetensors(&dir.join("optimizer.safetensors"), &opt.state_tensors()?)?;
    Ok(())
}

/// Writes `value` as pretty JSON, atomically.
pub fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<()> {
    let json = serde_json::to_string_pretty(value).expect("state serialises");
    rlhf_model::save::write_atomic(path, json.as_bytes())?;
    Ok(())
}

/// Reads a JSON file written by [`write_json`].
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
}

/// Writes the trained model into `output_dir` itself (what the next stage loads).
pub fn save_final(args: &TrainingArgs, model: &Model, heads: Heads) -> Result<()> {
    let world = crate::dist::world();
    if world.rank() == 0 {
        save_weights(model, heads, &args.output_dir)?;
        tracing::info!("saved the trained model to {}", args.output_dir.display());
    }
    // A next stage reads it on every rank.
    world.barrier();
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
/// training, or, when resuming, the checkpoint's weights. The frozen projection weights are
/// kept in the GEMM kernel's layout ([`Model::keep_frozen_in_kernel_layout`]): the reward and
/// SFT trainers that call this never generate.
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
    let mut model = Model::load(
        &dir,
        &LoadOptions {
            heads,
            training,
            seed: args.seed,
            adapter,
            ..Default::default()
        },
    )?;
    let packed = model.keep_frozen_in_kernel_layout()?;
    tracing::debug!("{packed} frozen weights kept in the GEMM kernel's layout");
    Ok(model)
}
