//! Skinny matmul layouts (decode-shaped): x (m, k) times a (n, k) weight, transposed view vs
//! a contiguous (k, n) copy. `cargo run --release -p rlhf-model --example skinny`
use candle_core::{Device, Tensor};

fn main() -> candle_core::Result<()> {
    for (m, k, n) in [
        (16, 576, 1536),
        (16, 1536, 576),
        (16, 576, 576),
        (16, 576, 49152),
        (512, 576, 1536),
    ] {
        let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu)?;
        let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu)?;
        let wt = w.t()?.contiguous()?;
        let reps = if m > 64 { 20 } else { 200 };
        let time = |f: &dyn Fn() -> candle_core::Result<Tensor>| -> candle_core::Result<f64> {
            f()?;
            let t = std::time::Instant::now();
            for _ in 0..reps {
                f()?;
            }
            Ok(t.elapsed().as_secs_f64() / reps as f64 * 1e3)
        };
        let a = time(&|| x.matmul(&w.t()?))?;
        let b = time(&|| x.matmul(&wt))?;
        let c = time(&|| w.matmul(&x.t()?))?;
        println!("m {m} k {k} n {n}: x·wᵀ(view) {a:.3} ms, x·wt(contig) {b:.3} ms, w·xᵀ {c:.3} ms");
    }
    Ok(())
}
