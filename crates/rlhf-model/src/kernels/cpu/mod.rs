//! The CPU's kernels: an AVX-512 GEMM with a bf16 variant ([`gemm`]), fused element-wise ops
//! ([`fused`], [`glu`]), the log-prob of a row of logits or of an LM head ([`logprob`]), the
//! frozen-weight products ([`frozen`]), the one-op attention core ([`attn`]) and decoder layer
//! ([`layer`]), each with its own backward pass.
//!
//! Each entry point returns `None` where it does not take the tensors (not on the CPU, a
//! dtype or shape it does not handle, a CPU without AVX-512F where the kernel needs it);
//! [`crate::kernels`] then runs the generic form. The kernels read one another and nothing
//! of the models.

pub mod attn;
pub mod frozen;
pub mod fused;
pub mod gemm;
pub mod glu;
pub mod layer;
pub mod logprob;
