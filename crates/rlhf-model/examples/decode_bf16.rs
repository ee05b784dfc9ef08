//! Weight bandwidth of x·Wᵀ on a bf16 W under bf16 autocast with few rows of x (decoding),
//! on SmolLM2-135M's shapes (q/o 576², gate/up 1536×576, down 576×1536, the 49,152-row
//! LM head): the time per product and W's bytes read per second.
//!
//!     cargo run --release -p rlhf-model --example decode_bf16

use std::time::Instant;

use rlhf_model::kernels::cpu::gemm::{self, MatRef};

fn main() {
    if !gemm::bf16_kernel() {
        eprintln!("this CPU has no AVX512_BF16: the products run on the f32 paths");
    }
    let _autocast = rlhf_model::kernels::Autocast::bf16(true);
    for m in [1usize, 4, 8, 16] {
        for (n, k) in [(576usize, 576usize), (1536, 576), (576, 1536), (49152, 576)] {
            let a: Vec<f32> = (0..m * k).map(|i| (i * 7 % 13) as f32 * 0.01).collect();
            let w: Vec<half::bf16> = (0..n * k)
                .map(|i| half::bf16::from_f32((i * 5 % 11) as f32 * 0.01))
                .collect();
            let reps = (200_000_000 / (n * k)).max(3);
            let am = MatRef::new(&a, m, k, k, 1);
            std::hint::black_box(gemm::matmul_wt_bf16(am, &w, n, k));
            let mut best = f64::MAX;
            for _ in 0..3 {
                let t = Instant::now();
                for _ in 0..reps {
                    std::hint::black_box(gemm::matmul_wt_bf16(am, &w, n, k));
                }
                best = best.min(t.elapsed().as_secs_f64() / reps as f64);
            }
            let gbs = (n * k * 2) as f64 / best / 1e9;
            println!(
                "m={m:2} {n:5}x{k:4}: {:8.1} us {gbs:6.1} GB/s of W",
                best * 1e6
            );
        }
    }
}
