//! `rlhf-train`: losses, the AdamW optimiser and learning-rate schedulers, the training loop
//! (accumulation, clipping, eval, logging, checkpoints, resume) and one module per trainer.

pub mod metrics;
pub mod tensorboard;
