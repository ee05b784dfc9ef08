//! bf16 autocast's products with the AVX512_BF16 kernel turned off (`RLHF_BF16_KERNEL=0`, set
//! before any product runs; the only test here): every product then runs on the f32 kernel
//! with its operands rounded as they are packed, as on an AVX-512 CPU without AVX512_BF16.
//! Same checks as bf16_autocast.rs.

mod common;

#[test]
fn products_round_their_operands_on_the_f32_kernel() {
    std::env::set_var("RLHF_BF16_KERNEL", "0");
    assert!(!rlhf_model::kernels::cpu::gemm::bf16_kernel());
    common::autocast_products_round_their_operands();
    for arch in ["llama-gqa", "gpt2"] {
        common::check_long_autocast_logits(arch);
        common::check_long_autocast_grads(arch);
    }
}
