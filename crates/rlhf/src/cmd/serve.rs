//! `rlhf serve`: an OpenAI-compatible server for a model directory.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Result};

/// Options of `rlhf serve`.
#[derive(clap::Args)]
pub struct Args {
    /// Model directory (Hugging Face format, or a PEFT adapter directory over its base). A
    /// reward model (a score head) serves /v1/score; any other model chat and completions.
    #[arg(long)]
    model: PathBuf,
    /// PEFT LoRA adapter directory to apply.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Address to listen on; anything but loopback needs --api-key-env.
    #[arg(long, default_value = "127.0.0.1:8000")]
    bind: SocketAddr,
    /// Name of an environment variable holding the API key that requests must carry
    /// (`Authorization: Bearer KEY`).
    #[arg(long, value_name = "VAR")]
    api_key_env: Option<String>,
    /// Requests decoded together at most; more wait for a free row.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=1024))]
    max_batch_size: u32,
    /// The model's name in requests and /v1/models (default: the model directory's name).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Dtype of a language model's frozen linear weights while decoding (as `rlhf generate
    /// --dtype`): bf16 (half the bytes read per token, products in f32) or f32. A reward
    /// model's weights stay f32.
    #[arg(long, value_enum, default_value_t = super::generate::WeightDtype::Bf16)]
    dtype: super::generate::WeightDtype,
}

/// Runs `rlhf serve` until Ctrl-C.
pub fn run(a: Args) -> Result<()> {
    let api_key = match &a.api_key_env {
        None => None,
        Some(var) => match std::env::var(var) {
            Ok(k) if !k.is_empty() => Some(k),
            _ => bail!("--api-key-env {var}: the environment variable {var} is not set or empty"),
        },
    };
    let mut opts = rlhf_serve::ServeOptions::new(a.model);
    opts.adapter = a.adapter;
    opts.bind = a.bind;
    opts.api_key = api_key;
    opts.max_batch_size = a.max_batch_size as usize;
    opts.served_model_name = a.served_model_name;
    opts.bf16_weights = a.dtype.is_bf16();
    Ok(rlhf_serve::run(opts)?)
}
