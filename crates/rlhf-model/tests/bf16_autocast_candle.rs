//! bf16 autocast on a CPU without the AVX-512 kernel: `RLHF_GEMM=candle` turns the kernel off
//! for this process (the only test here sets it before any product runs), so every product
//! runs on candle's f32 matmul with its operands rounded first (`frozen::autocast_copy`), and
//! the composed layers run in place of the fused ones. Same reference and tolerance as
//! bf16_autocast.rs.

mod common;

use common::*;
use rlhf_model::gemm::{self, Autocast};

#[test]
fn logits_follow_torch_autocast_on_candle_matmul() {
    // The only test of this binary: nothing has read the environment yet.
    std::env::set_var("RLHF_GEMM", "candle");
    assert!(!gemm::available());
    for arch in ["llama-gqa", "qwen2", "gpt2", "opt"] {
        let (reference, spread) = autocast_reference(arch);
        let f32_logits = golden_logits(arch);
        let bf16_logits = {
            let _ac = Autocast::bf16(true);
            golden_logits(arch)
        };
        let d = masked_max_abs_diff(arch, &bf16_logits, &reference, 512);
        let moved = masked_max_abs_diff(arch, &bf16_logits, &f32_logits, 512);
        eprintln!(
            "{arch} (candle matmul): |bf16 - torch autocast| {d:.4}, |bf16 - f32| {moved:.4}"
        );
        assert!(
            moved > 1e-3,
            "{arch}: autocast did not change the logits ({moved})"
        );
        assert!(
            d <= spread,
            "{arch}: {d} from torch's autocast logits (spread {spread})"
        );
    }
    for arch in ["llama-gqa", "gpt2"] {
        check_long_autocast_logits(arch);
        check_long_autocast_grads(arch);
    }
}
