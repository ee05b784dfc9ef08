//! Fused kernels vs their composed references, forward and forward+backward, at the shapes of
//! a 135M-parameter Llama training step (batch 4, seq 128, hidden 576, 9 heads of 64).
//!
//! `cargo bench -p rlhf-model --bench fused` (optionally `-- N` for the number of timed runs).
//! Each cell is the median over N runs after a few warm-up runs.

use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use rlhf_model::kernels::{self, generic};

type R<T> = rlhf_model::Result<T>;

/// (median, min) in ms over n timed runs.
fn time_ms(n: usize, mut f: impl FnMut() -> R<()>) -> R<(f64, f64)> {
    for _ in 0..3 {
        f()?;
    }
    let mut t = Vec::with_capacity(n);
    for _ in 0..n {
        let s = Instant::now();
        f()?;
        t.push(s.elapsed().as_secs_f64() * 1e3);
    }
    t.sort_by(|a, b| a.partial_cmp(b).unwrap());
    Ok((t[n / 2], t[0]))
}

/// One op under test: `run(x, params)` builds the output from variables.
struct Case {
    name: &'static str,
    shape: Vec<usize>,
    /// Trainable parameters besides x (weight, bias), by length.
    params: Vec<usize>,
    /// Constant extra inputs (rope's cos/sin), by shape.
    consts: Vec<Vec<usize>>,
    fused: fn(&Tensor, &[Tensor], &[Tensor]) -> R<Tensor>,
    composed: fn(&Tensor, &[Tensor], &[Tensor]) -> R<Tensor>,
}

fn time_case(c: &Case, n: usize) -> R<[(f64, f64); 4]> {
    let dev = Device::Cpu;
    let x = Var::from_tensor(&Tensor::randn(0f32, 1., c.shape.as_slice(), &dev)?)?;
    let ps: Vec<Var> = c
        .params
        .iter()
        .map(|&h| Var::from_tensor(&(Tensor::randn(0f32, 0.1, h, &dev)? + 1.0)?))
        .collect::<candle_core::Result<_>>()?;
    let pts: Vec<Tensor> = ps.iter().map(|v| v.as_tensor().clone()).collect();
    let cs: Vec<Tensor> = c
        .consts
        .iter()
        .map(|s| Tensor::randn(0f32, 1., s.as_slice(), &dev))
        .collect::<candle_core::Result<_>>()?;
    let mut out = [(0f64, 0f64); 4];
    for (i, f) in [c.composed, c.fused].into_iter().enumerate() {
        out[i] = time_ms(n, || {
            let y = f(x.as_tensor(), &pts, &cs)?;
            std::hint::black_box(&y);
            Ok(())
        })?;
        out[2 + i] = time_ms(n, || {
            let y = f(x.as_tensor(), &pts, &cs)?;
            let g = y.backward()?;
            std::hint::black_box(g.get(x.as_tensor()));
            Ok(())
        })?;
    }
    Ok(out)
}

fn main() -> R<()> {
    // Arguments: a number sets the runs per cell, anything else filters ops by name.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let n: usize = args.iter().find_map(|a| a.parse().ok()).unwrap_or(30);
    let filter: Vec<&String> = args
        .iter()
        .filter(|a| a.parse::<usize>().is_err())
        .collect();
    let cases = [
        Case {
            name: "softmax",
            shape: vec![4, 9, 128, 128],
            params: vec![],
            consts: vec![],
            fused: |x, _, _| kernels::softmax(x),
            composed: |x, _, _| generic::softmax(x),
        },
        Case {
            name: "rms_norm",
            shape: vec![4, 128, 576],
            params: vec![576],
            consts: vec![],
            fused: |x, p, _| kernels::rms_norm(x, &p[0], 1e-5),
            composed: |x, p, _| generic::rms_norm(x, &p[0], 1e-5),
        },
        Case {
            name: "layer_norm",
            shape: vec![4, 128, 576],
            params: vec![576, 576],
            consts: vec![],
            fused: |x, p, _| kernels::layer_norm(x, &p[0], &p[1], 1e-5),
            composed: |x, p, _| generic::layer_norm(x, &p[0], &p[1], 1e-5),
        },
        Case {
            name: "rope",
            shape: vec![4, 9, 128, 64],
            params: vec![],
            consts: vec![vec![4, 1, 128, 64], vec![4, 1, 128, 64]],
            fused: |x, _, c| kernels::rope(x, &c[0], &c[1]),
            composed: |x, _, c| generic::rope(x, &c[0], &c[1]),
        },
    ];
    println!(
        "{n} runs per cell, {} threads (candle pool); each cell: median / min in ms\n",
        candle_core::utils::get_num_threads()
    );
    println!(
        "{:<10} {:<16} | {:>15} {:>15} {:>6} | {:>15} {:>15} {:>6}",
        "op", "shape", "fwd composed", "fwd fused", "x", "f+b composed", "f+b fused", "x"
    );
    println!("{}", "-".repeat(112));
    let cell = |(med, min): (f64, f64)| format!("{med:7.3} / {min:6.3}");
    for c in cases
        .iter()
        .filter(|c| filter.is_empty() || filter.iter().any(|f| c.name.contains(f.as_str())))
    {
        let [fc, ff, bc, bf] = time_case(c, n)?;
        println!(
            "{:<10} {:<16} | {:>15} {:>15} {:>5.1}x | {:>15} {:>15} {:>5.1}x",
            c.name,
            format!("{:?}", c.shape),
            cell(fc),
            cell(ff),
            fc.0 / ff.0,
            cell(bc),
            cell(bf),
            bc.0 / bf.0
        );
    }
    Ok(())
}
