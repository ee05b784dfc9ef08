//! bf16 autocast on a CPU without the AVX-512 kernel: `RLHF_GEMM=candle` turns the kernel off
//! for this process (the only test here sets it before any product runs), so every product
//! runs on candle's f32 matmul with its operands rounded first (`frozen::autocast_copy`), and
//! the composed layers run in place of the fused ones. Same reference and tolerance as
//! bf16_autocast.rs.

mod common;

use common::*;
use rlhf_model::kernels::cpu::gemm;

#[test]
fn logits_follow_torch_autocast_on_candle_matmul() {
    // The only test of this binary: nothing has read the environment yet.
    std::env::set_var("RLHF_GEMM", "candle");
    assert!(!gemm::available());
    check_autocast_logits();
    for arch in ["llama-gqa", "gpt2"] {
        check_long_autocast_logits(arch);
        check_long_autocast_grads(arch);
    }
}
