//! `rlhf-model`: decoder-only transformers that load Hugging Face checkpoints, train through
//! candle's autograd (every op here has a backward pass), carry LoRA adapters, and generate.

pub mod attn;
pub mod block;
pub mod error;
pub mod frozen;
pub mod fused;
pub mod gemm;
pub mod generate;
pub mod gguf;
pub mod glu;
pub mod gpt2;
pub mod llama;
pub mod logprob;
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
