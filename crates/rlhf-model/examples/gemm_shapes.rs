//! GFLOP/s of `rlhf_model::kernels::cpu::gemm` against candle's matmul on the products of a 100M-parameter
//! Llama training step (8 × 128 tokens, hidden 768, MLP 2048, vocab 32,000): the forward
//! x·Wᵀ, the backward's grad·W and gradᵀ·x. Beside them, the bf16 products (operands rounded
//! to bf16, f32 sums) on the AVX512_BF16 kernel and, where the CPU has it, on AMX tiles.
//!
//!     cargo run --release -p rlhf-model --example gemm_shapes
//!     GEMM_ROWS=192 GEMM_WEIGHTS=576x576,1536x576,576x1536 cargo run --release -p rlhf-model --example gemm_shapes

use candle_core::{Device, Tensor};
use rlhf_model::kernels::cpu::gemm::{self, MatRef};

fn main() -> candle_core::Result<()> {
    // Other shapes: GEMM_ROWS=192 GEMM_WEIGHTS=576x576,1536x576,576x1536 (out x in).
    let t: usize = std::env::var("GEMM_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    // (rows of W = out features, cols of W = in features)
    let weights: Vec<(usize, usize)> = match std::env::var("GEMM_WEIGHTS") {
        Ok(list) => list
            .split(',')
            .filter_map(|w| {
                let (o, i) = w.split_once('x')?;
                Some((o.parse().ok()?, i.parse().ok()?))
            })
            .collect(),
        Err(_) => vec![(768, 768), (2048, 768), (768, 2048), (32000, 768)],
    };
    for (out, inp) in weights {
        let x = Tensor::randn(0f32, 1.0, (t, inp), &Device::Cpu)?;
        let w = Tensor::randn(0f32, 1.0, (out, inp), &Device::Cpu)?;
        let g = Tensor::randn(0f32, 1.0, (t, out), &Device::Cpu)?;
        let (xv, wv, gv) = (
            x.flatten_all()?.to_vec1::<f32>()?,
            w.flatten_all()?.to_vec1::<f32>()?,
            g.flatten_all()?.to_vec1::<f32>()?,
        );
        let flops = 2.0 * (t * out * inp) as f64;
        let cases: [(&str, MatRef, MatRef, Tensor, Tensor); 3] = [
            (
                "x·Wᵀ",
                MatRef::new(&xv, t, inp, inp, 1),
                MatRef::new(&wv, out, inp, inp, 1).t(),
                x.clone(),
                w.t()?,
            ),
            (
                "grad·W",
                MatRef::new(&gv, t, out, out, 1),
                MatRef::new(&wv, out, inp, inp, 1),
                g.clone(),
                w.clone(),
            ),
            (
                "gradᵀ·x",
                MatRef::new(&gv, t, out, out, 1).t(),
                MatRef::new(&xv, t, inp, inp, 1),
                g.t()?,
                x.clone(),
            ),
        ];
        for (name, a, b, ta, tb) in cases {
            let reps = 5;
            gemm::matmul(a, b);
            let s = std::time::Instant::now();
            for _ in 0..reps {
                gemm::matmul(a, b);
            }
            let ours = flops * reps as f64 / s.elapsed().as_secs_f64() / 1e9;
            ta.matmul(&tb)?;
            let s = std::time::Instant::now();
            for _ in 0..reps {
                ta.matmul(&tb)?;
            }
            let candle = flops * reps as f64 / s.elapsed().as_secs_f64() / 1e9;
            let bf16 = |amx: bool| -> Option<f64> {
                let _off = (!amx).then(gemm::amx::Off::new);
                gemm::matmul_bf16(a, b)?;
                let s = std::time::Instant::now();
                for _ in 0..reps {
                    gemm::matmul_bf16(a, b);
                }
                Some(flops * reps as f64 / s.elapsed().as_secs_f64() / 1e9)
            };
            let show = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:6.1}"));
            let amx = if gemm::amx::available() {
                bf16(true)
            } else {
                None
            };
            println!(
                "W {out}x{inp} {name:8} avx512 {ours:6.1}  candle {candle:6.1}  bf16 {}  amx {} GFLOP/s",
                show(bf16(false)),
                show(amx)
            );
        }
    }
    Ok(())
}
