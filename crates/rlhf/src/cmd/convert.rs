//! `rlhf convert gguf FILE OUT_DIR`.

use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;

/// Conversions.
#[derive(Subcommand)]
pub enum Convert {
    /// Dequantise a llama-architecture GGUF into a Hugging Face directory.
    Gguf {
        /// The .gguf file.
        file: PathBuf,
        /// Output directory (config.json, model.safetensors, tokenizer files).
        out_dir: PathBuf,
        /// Weight dtype: f32 or bf16.
        #[arg(long, default_value = "f32")]
        dtype: String,
    },
}

/// Runs a conversion.
pub fn run(c: Convert) -> Result<()> {
    match c {
        Convert::Gguf {
            file,
            out_dir,
            dtype,
        } => {
            let dtype = match dtype.as_str() {
                "f32" | "float32" => candle_core::DType::F32,
                "bf16" | "bfloat16" => candle_core::DType::BF16,
                other => anyhow::bail!("--dtype {other:?}: use f32 or bf16"),
            };
            let r = rlhf_model::gguf::convert_gguf(&file, &out_dir, dtype)?;
            tracing::info!(
                "converted {} ({}, {} tensors, vocab {}) to {} as {:?}",
                file.display(),
                r.architecture,
                r.tensors,
                r.vocab_size,
                r.out_dir.display(),
                r.dtype
            );
            Ok(())
        }
    }
}
