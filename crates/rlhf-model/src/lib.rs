//! `rlhf-model`: decoder-only transformers that load Hugging Face checkpoints, train through
//! candle's autograd (every op here has a backward pass), carry LoRA adapters, and generate.
//!
//! The models (`model`, `llama`, `gpt2`, `opt`, `nn`, `lora`, `weights`) are built from the ops
//! of [`kernels`], which pick a device's kernels or the device-generic forms per call.

pub mod error;
pub mod generate;
pub mod gguf;
pub mod gpt2;
pub mod kernels;
pub mod llama;
pub mod lora;
pub mod model;
pub mod nn;
pub mod ops;
pub mod opt;
pub mod save;
pub mod tokenizer;
pub mod weights;

#[cfg(test)]
mod test_util;

pub use error::{Error, Result};
pub use model::{Batch, Heads, LoadOptions, Model};
pub use weights::Training;
