//! GFLOP/s of `rlhf_model::kernels::cpu::gemm` on the frozen products of a LoRA step through a whole
//! SmolLM2-135M-shaped stack (30 layers: q 576², k and v 192×576, o 576², gate and up
//! 1536×576, down 576×1536; 424 MB of f32 weights, more than the caches hold), so that each
//! weight comes from memory as it does in training, unlike `gemm_shapes`, which repeats one
//! product on a weight the caches keep. Forward x·Wᵀ and backward grad·W, median of 5 sweeps.
//!
//!     cargo run --release -p rlhf-model --example gemm_model
//!     GEMM_ROWS=640 GEMM_LAYERS=30 cargo run --release -p rlhf-model --example gemm_model

use rlhf_model::kernels::cpu::gemm::{self, MatRef};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let rows = env("GEMM_ROWS", 188);
    let layers = env("GEMM_LAYERS", 30);
    let shapes = [
        (576, 576),
        (192, 576),
        (192, 576),
        (576, 576),
        (1536, 576),
        (1536, 576),
        (576, 1536),
    ];
    let fill = |n: usize, seed: usize| -> Vec<f32> {
        (0..n)
            .map(|i| (((i * 2654435761 + seed * 40503) % 2001) as f32 - 1000.0) / 1000.0)
            .collect()
    };
    let weights: Vec<((usize, usize), Vec<f32>)> = (0..layers)
        .flat_map(|l| shapes.iter().enumerate().map(move |(j, &s)| (l, j, s)))
        .map(|(l, j, (o, i))| ((o, i), fill(o * i, l * 7 + j)))
        .collect();
    // GEMM_PANELS=1: the weights kept as `gemm::Panels` (the originals dropped).
    let panels: Option<Vec<gemm::Panels>> = (env("GEMM_PANELS", 0) == 1).then(|| {
        weights
            .iter()
            .map(|((o, i), w)| gemm::Panels::new(w, *o, *i))
            .collect()
    });
    let weights: Vec<((usize, usize), Vec<f32>)> = match panels {
        Some(_) => weights.into_iter().map(|(s, _)| (s, Vec::new())).collect(),
        None => weights,
    };
    let x = fill(rows * 1536, 1);
    let g = fill(rows * 1536, 2);
    let flops: f64 = weights
        .iter()
        .map(|((o, i), _)| 2.0 * (rows * o * i) as f64)
        .sum();
    let mut fwd = Vec::new();
    let mut bwd = Vec::new();
    for _ in 0..6 {
        let s = std::time::Instant::now();
        for (l, ((o, i), w)) in weights.iter().enumerate() {
            let a = MatRef::new(&x, rows, *i, *i, 1);
            match &panels {
                Some(p) => std::hint::black_box(gemm::matmul_wt(a, &p[l])),
                None => std::hint::black_box(gemm::matmul(a, MatRef::new(w, *o, *i, *i, 1).t())),
            };
        }
        fwd.push(flops / s.elapsed().as_secs_f64() / 1e9);
        let s = std::time::Instant::now();
        for (l, ((o, i), w)) in weights.iter().enumerate().rev() {
            let a = MatRef::new(&g, rows, *o, *o, 1);
            match &panels {
                Some(p) => std::hint::black_box(gemm::matmul_w(a, &p[l])),
                None => std::hint::black_box(gemm::matmul(a, MatRef::new(w, *o, *i, *i, 1))),
            };
        }
        bwd.push(flops / s.elapsed().as_secs_f64() / 1e9);
    }
    let median = |v: &mut Vec<f64>| {
        v.remove(0); // the first sweep warms up the pool and the buffers
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "rows {rows}, {layers} layers: x·Wᵀ {:.1} GFLOP/s, grad·W {:.1} GFLOP/s",
        median(&mut fwd),
        median(&mut bwd)
    );
}
