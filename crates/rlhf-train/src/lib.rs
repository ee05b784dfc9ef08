//! `rlhf-train`: losses, the AdamW optimiser and learning-rate schedulers, the training loop
//! (accumulation, clipping, eval, logging, checkpoints, resume) and one module per trainer.

pub mod checkpoint;
pub mod config;
pub mod constitutional;
pub mod dist;
pub mod dpo;
pub mod error;
pub mod eval;
pub mod hir;
pub mod judge;
pub mod judge_endpoint;
pub mod kto;
pub mod label_ai;
pub mod losses;
pub mod metrics;
pub mod optim;
pub mod outdir;
pub mod pipeline;
pub mod ppo;
pub mod program;
pub mod reference;
pub mod rejection_sampling;
pub mod rest;
pub mod reward;
pub mod rl;
pub mod rollout;
pub mod run;
pub mod sampling;
pub mod scheduler;
pub mod scoring;
pub mod sft;
pub mod stats;
pub mod tensorboard;
pub mod trainer;

pub use error::{Error, Result};
