//! Shared helpers for the parity tests: fixture paths and golden files.
#![allow(dead_code)]

use std::path::PathBuf;

/// `shared/fixtures/models` beside the repository (CI clones the repo with shared/ beside it).
pub fn fixtures() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../../shared/fixtures/models"
    ))
}

/// The golden.json of one fixture model.
pub fn golden(arch: &str) -> serde_json::Value {
    let p = fixtures().join(arch).join("golden.json");
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap()
}

/// A JSON array of arrays of integers.
pub fn ids2(v: &serde_json::Value) -> Vec<Vec<u32>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        })
        .collect()
}

/// A JSON array of integers.
pub fn ids1(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Flattens a nested JSON array of numbers.
pub fn flat_f32(v: &serde_json::Value, out: &mut Vec<f32>) {
    match v {
        serde_json::Value::Array(a) => a.iter().for_each(|x| flat_f32(x, out)),
        serde_json::Value::Number(n) => out.push(n.as_f64().unwrap() as f32),
        _ => panic!("not a number: {v}"),
    }
}

/// Largest absolute difference of two equal-length slices.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// The logits torch's CPU autocast computes for arch's golden batch
/// (`tests/data/make_bf16_fixtures.py`), and how far they lie from its fp32 logits.
pub fn autocast_reference(arch: &str) -> (Vec<f32>, f32) {
    let p = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/bf16_autocast.json"
    ));
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let case = &v["archs"][arch];
    let mut logits = Vec::new();
    flat_f32(&case["logits_autocast"], &mut logits);
    (
        logits,
        case["max_abs_autocast_vs_f32"].as_f64().unwrap() as f32,
    )
}

/// Max |a - b| over the positions the golden batch's attention mask keeps (vocab `v` wide).
pub fn masked_max_abs_diff(arch: &str, a: &[f32], b: &[f32], v: usize) -> f32 {
    let mask: Vec<u32> = ids2(&golden(arch)["attention_mask"]).concat();
    assert_eq!(a.len(), mask.len() * v);
    assert_eq!(b.len(), a.len());
    let mut d = 0f32;
    for (pos, &m) in mask.iter().enumerate() {
        if m == 1 {
            d = d.max(max_abs_diff(
                &a[pos * v..(pos + 1) * v],
                &b[pos * v..(pos + 1) * v],
            ));
        }
    }
    d
}

/// Logits of arch's golden batch, flat, from a freshly loaded fixture model.
pub fn golden_logits(arch: &str) -> Vec<f32> {
    let g = golden(arch);
    let batch = rlhf_model::Batch {
        input_ids: ids2(&g["input_ids"]),
        attention_mask: ids2(&g["attention_mask"])
            .into_iter()
            .map(|r| r.into_iter().map(|x| x as u8).collect())
            .collect(),
    };
    let model =
        rlhf_model::Model::load(&fixtures().join(arch), &rlhf_model::LoadOptions::default())
            .unwrap();
    let hidden = model.hidden(&batch).unwrap();
    rlhf_model::ops::to_vec_f32(&model.logits(&hidden).unwrap()).unwrap()
}

// bf16 autocast's products (bf16_autocast.rs, bf16_autocast_f32_kernel.rs).

pub fn values(n: usize, seed: u32) -> Vec<f32> {
    // Spread over several binades, so that rounding to bf16 changes most of them.
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(12345);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            ((x % 20_000) as f32 / 10_000.0 - 1.0) * (1.0 + (x >> 28) as f32)
        })
        .collect()
}

pub fn rounded(v: &[f32]) -> Vec<f32> {
    v.iter()
        .map(|&x| half::bf16::from_f32(x).to_f32())
        .collect()
}

/// C = A·B in f64 for row-major A (m × k) and B given by `b(p, j)`, with Σ|a·b| per element.
pub fn exact(
    a: &[f32],
    m: usize,
    k: usize,
    n: usize,
    b: impl Fn(usize, usize) -> f32,
) -> (Vec<f64>, Vec<f64>) {
    let (mut c, mut mag) = (vec![0f64; m * n], vec![0f64; m * n]);
    for i in 0..m {
        for j in 0..n {
            for p in 0..k {
                let t = a[i * k + p] as f64 * b(p, j) as f64;
                c[i * n + j] += t;
                mag[i * n + j] += t.abs();
            }
        }
    }
    (c, mag)
}

/// `got` is the product of the rounded operands (`want`, in f64) up to f32 sums: within
/// 2⁻²⁰ of Σ|a·b| per element (k ≤ 520 sums in f32, any order); and the unrounded product
/// (`plain`) lies outside that band somewhere, so the rounding shows.
pub fn check_rounded(what: &str, got: &[f32], want: &(Vec<f64>, Vec<f64>), plain: &[f64]) {
    let (want, mag) = want;
    let band = |i: usize| mag[i] * 2f64.powi(-20) + 1e-30;
    for (i, &g) in got.iter().enumerate() {
        assert!(
            (g as f64 - want[i]).abs() <= band(i),
            "{what}: element {i}: {g} vs {} (band {})",
            want[i],
            band(i)
        );
    }
    assert!(
        (0..got.len()).any(|i| (got[i] as f64 - plain[i]).abs() > band(i)),
        "{what}: the operands were not rounded"
    );
}

/// Under autocast, each product path computes the product of its operands rounded to bf16,
/// summed in f32 (checked against f64): the streaming path (few rows against Wᵀ), the
/// shared-panel path, the blocked path and, for more than 64 rows on a CPU with AVX512_BF16,
/// the bf16 kernel; strided operands, accumulation, weights kept as panels (x·Wᵀ and grad·W),
/// batched products. Where the f32 kernel runs, the result is also the f32 product of the
/// rounded operands to the bit (same kernel, same order of sums).
pub fn autocast_products_round_their_operands() {
    if !rlhf_model::kernels::cpu::gemm::available() {
        eprintln!("no AVX-512F here: the candle fallback is tested in bf16_autocast_candle.rs");
        return;
    }
    eprintln!("{}", rlhf_model::kernels::cpu::gemm::autocast_kernel());
    for (m, k, n) in [
        (1, 7, 3),
        (5, 70, 40),
        (17, 301, 130),
        (30, 300, 97),
        (100, 300, 200),
        (300, 520, 70),
        (100, 301, 97),
    ] {
        let f32_kernel = m <= 64 || !rlhf_model::kernels::cpu::gemm::bf16_kernel();
        // x·Wᵀ of at most 32 rows streams W's rows as bf16 pairs on the bf16 kernel.
        let f32_kernel_xwt =
            f32_kernel && (m > 32 || !rlhf_model::kernels::cpu::gemm::bf16_kernel());
        let (a, w) = (values(m * k, 2), values(n * k, 3));
        let (ar, wr) = (rounded(&a), rounded(&w));
        // x·Wᵀ with W row-major (B strided: the streaming path for few rows).
        let x_wt = |d: &[f32], wd: &[f32]| {
            rlhf_model::kernels::cpu::gemm::matmul(
                rlhf_model::kernels::cpu::gemm::MatRef::new(d, m, k, k, 1),
                rlhf_model::kernels::cpu::gemm::MatRef::new(wd, n, k, k, 1).t(),
            )
            .unwrap()
        };
        let got = {
            let _ac = rlhf_model::kernels::Autocast::bf16(true);
            x_wt(&a, &w)
        };
        let want = exact(&ar, m, k, n, |p, j| wr[j * k + p]);
        let plain = exact(&a, m, k, n, |p, j| w[j * k + p]).0;
        check_rounded(&format!("x·Wᵀ {m}×{k}×{n}"), &got, &want, &plain);
        if f32_kernel_xwt {
            assert_eq!(
                got,
                x_wt(&ar, &wr),
                "x·Wᵀ {m}×{k}×{n}: not the rounded f32 product"
            );
        }

        // A read transposed (gradᵀ·x, n × k), C accumulated onto a start value.
        let g = values(m * n, 4);
        let start = values(n * k, 5);
        let acc = |gd: &[f32], ad: &[f32]| {
            let mut c = start.clone();
            assert!(rlhf_model::kernels::cpu::gemm::matmul_acc(
                rlhf_model::kernels::cpu::gemm::MatRef::new(gd, m, n, n, 1).t(),
                rlhf_model::kernels::cpu::gemm::MatRef::new(ad, m, k, k, 1),
                &mut c
            ));
            c
        };
        let got = {
            let _ac = rlhf_model::kernels::Autocast::bf16(true);
            acc(&g, &a)
        };
        let (gt, grt): (Vec<f32>, Vec<f32>) = {
            let t = |v: &[f32]| {
                (0..n * m)
                    .map(|q| v[(q % m) * n + q / m])
                    .collect::<Vec<f32>>()
            };
            (t(&g), t(&rounded(&g)))
        };
        // The start value joins the sum (and its magnitude the band).
        let (mut want, mut plain) = (
            exact(&grt, n, m, k, |p, j| ar[p * k + j]),
            exact(&gt, n, m, k, |p, j| a[p * k + j]).0,
        );
        for (i, &s0) in start.iter().enumerate() {
            want.0[i] += s0 as f64;
            want.1[i] += (s0 as f64).abs();
            plain[i] += s0 as f64;
        }
        check_rounded(&format!("gradᵀ·x + C {m}×{k}×{n}"), &got, &want, &plain);

        // A frozen weight kept as panels: x·Wᵀ and grad·W.
        let p = rlhf_model::kernels::cpu::gemm::Panels::new(&w, n, k);
        let got = {
            let _ac = rlhf_model::kernels::Autocast::bf16(true);
            rlhf_model::kernels::cpu::gemm::matmul_wt(
                rlhf_model::kernels::cpu::gemm::MatRef::new(&a, m, k, k, 1),
                &p,
            )
            .unwrap()
        };
        let want = exact(&ar, m, k, n, |q, j| wr[j * k + q]);
        let plain = exact(&a, m, k, n, |q, j| w[j * k + q]).0;
        check_rounded(&format!("panels x·Wᵀ {m}×{k}×{n}"), &got, &want, &plain);
        let got = {
            let _ac = rlhf_model::kernels::Autocast::bf16(true);
            rlhf_model::kernels::cpu::gemm::matmul_w(
                rlhf_model::kernels::cpu::gemm::MatRef::new(&g, m, n, n, 1),
                &p,
            )
            .unwrap()
        };
        let want = exact(&rounded(&g), m, n, k, |q, j| wr[q * k + j]);
        let plain = exact(&g, m, n, k, |q, j| w[q * k + j]).0;
        check_rounded(&format!("panels grad·W {m}×{k}×{n}"), &got, &want, &plain);
        if f32_kernel {
            let pr = rlhf_model::kernels::cpu::gemm::Panels::new(&wr, n, k);
            let bitwise = rlhf_model::kernels::cpu::gemm::matmul_w(
                rlhf_model::kernels::cpu::gemm::MatRef::new(&rounded(&g), m, n, n, 1),
                &pr,
            )
            .unwrap();
            assert_eq!(
                got, bitwise,
                "panels grad·W {m}×{k}×{n}: not the rounded f32 product"
            );
        }
    }
    // A weight kept in bf16 for decoding (`matmul_wt_bf16`): under autocast A is rounded too,
    // so the product is that of the rounded operands, on every path: few rows (the
    // streaming paths, one or two vectors of rows, full and partial tiles of W's rows), more
    // rows (the bf16 kernel reading W's pairs in place, or W widened onto the f32 kernel),
    // odd K, A read through strides.
    for (m, k, n, strided) in [
        (1, 7, 3, false),
        (5, 70, 40, false),
        (8, 577, 131, true),
        (17, 301, 70, false),
        (32, 576, 130, true),
        (100, 301, 97, false),
        (300, 520, 70, true),
    ] {
        let (a, w) = (values(m * k, 8), values(n * k, 9));
        let wb: Vec<half::bf16> = w.iter().map(|&x| half::bf16::from_f32(x)).collect();
        let (ar, wr) = (rounded(&a), rounded(&w));
        // Strided: A stored transposed (k × m) and read as its transpose.
        let at: Vec<f32> = (0..k * m).map(|q| a[(q % m) * k + q / m]).collect();
        let got = {
            let _ac = rlhf_model::kernels::Autocast::bf16(true);
            let view = if strided {
                rlhf_model::kernels::cpu::gemm::MatRef::new(&at, k, m, m, 1).t()
            } else {
                rlhf_model::kernels::cpu::gemm::MatRef::new(&a, m, k, k, 1)
            };
            rlhf_model::kernels::cpu::gemm::matmul_wt_bf16(view, &wb, n, k)
        };
        let want = exact(&ar, m, k, n, |p, j| wr[j * k + p]);
        let plain = exact(&a, m, k, n, |p, j| wr[j * k + p]).0;
        check_rounded(
            &format!("bf16 W x·Wᵀ {m}×{k}×{n} strided={strided}"),
            &got,
            &want,
            &plain,
        );
        // Without autocast: A as it is, the products in f32.
        let f32_product = rlhf_model::kernels::cpu::gemm::matmul_wt_bf16(
            rlhf_model::kernels::cpu::gemm::MatRef::new(&a, m, k, k, 1),
            &wb,
            n,
            k,
        );
        let (want, mag) = exact(&a, m, k, n, |p, j| wr[j * k + p]);
        for (i, &g) in f32_product.iter().enumerate() {
            assert!(
                (g as f64 - want[i]).abs() <= mag[i] * 2f64.powi(-20) + 1e-30,
                "bf16 W without autocast {m}×{k}×{n}: element {i}"
            );
        }
    }
    // A frozen weight kept in bf16 for a `bf16 = true` run (`Bf16Weight`): x·Wᵀ (few rows
    // streamed, more packed) and grad·W, new and accumulated, odd sizes, against the f64
    // product of the rounded operands.
    if rlhf_model::kernels::cpu::gemm::bf16_available() {
        for (m, k, n) in [
            (1, 7, 3),
            (17, 301, 70),
            (30, 64, 33),
            (100, 301, 97),
            (300, 520, 70),
        ] {
            let (x, w, g) = (values(m * k, 11), values(n * k, 12), values(m * n, 13));
            let bw = rlhf_model::kernels::cpu::gemm::Bf16Weight::new(&w, n, k);
            let wr = rounded(&w);
            assert_eq!(
                bw.to_f32(),
                wr,
                "Bf16Weight keeps W rounded to nearest even"
            );
            let _ac = rlhf_model::kernels::Autocast::bf16(true);
            let got = bw
                .product(
                    rlhf_model::kernels::cpu::gemm::MatRef::new(&x, m, k, k, 1),
                    true,
                    None,
                )
                .unwrap()
                .unwrap();
            let want = exact(&rounded(&x), m, k, n, |p, j| wr[j * k + p]);
            let plain = exact(&x, m, k, n, |p, j| wr[j * k + p]).0;
            check_rounded(&format!("Bf16Weight x·Wᵀ {m}×{k}×{n}"), &got, &want, &plain);
            let got = bw
                .product(
                    rlhf_model::kernels::cpu::gemm::MatRef::new(&g, m, n, n, 1),
                    false,
                    None,
                )
                .unwrap()
                .unwrap();
            let want = exact(&rounded(&g), m, n, k, |q, j| wr[q * k + j]);
            let plain = exact(&g, m, n, k, |q, j| wr[q * k + j]).0;
            check_rounded(
                &format!("Bf16Weight grad·W {m}×{k}×{n}"),
                &got,
                &want,
                &plain,
            );
            // Accumulated onto a start value.
            let start = values(m * k, 14);
            let mut c = start.clone();
            assert!(bw
                .product(
                    rlhf_model::kernels::cpu::gemm::MatRef::new(&g, m, n, n, 1),
                    false,
                    Some(&mut c)
                )
                .unwrap()
                .is_none());
            let (mut want, mut plain) = (want, plain);
            for (i, &s0) in start.iter().enumerate() {
                want.0[i] += s0 as f64;
                want.1[i] += (s0 as f64).abs();
                plain[i] += s0 as f64;
            }
            check_rounded(
                &format!("Bf16Weight grad·W + C {m}×{k}×{n}"),
                &c,
                &want,
                &plain,
            );
        }
    }
    // Batched (attention's q·kᵀ), and the switch restores what it replaced.
    let (q, kk) = (values(3 * 9 * 16, 6), values(3 * 11 * 16, 7));
    let bm = |qd: &[f32], kd: &[f32]| {
        rlhf_model::kernels::cpu::gemm::batched_matmul(
            rlhf_model::kernels::cpu::gemm::MatRef::new(qd, 9, 16, 16, 1),
            9 * 16,
            rlhf_model::kernels::cpu::gemm::MatRef::new(kd, 11, 16, 16, 1).t(),
            11 * 16,
            3,
        )
        .unwrap()
    };
    let want = bm(&rounded(&q), &rounded(&kk));
    let got = {
        let _ac = rlhf_model::kernels::Autocast::bf16(true);
        {
            let _off = rlhf_model::kernels::Autocast::bf16(false);
            assert!(!rlhf_model::kernels::autocast_bf16());
        }
        assert!(rlhf_model::kernels::autocast_bf16());
        bm(&q, &kk)
    };
    assert!(!rlhf_model::kernels::autocast_bf16());
    assert_eq!(got, want, "batched");
}

/// The long case of `bf16_autocast.json` (one 80-token sequence, so that attention's products
/// have more than 64 rows): checks arch's logits of positions 64.. under autocast against
/// torch's autocast logits, within torch's own autocast-to-fp32 spread, and that autocast
/// changed them.
pub fn check_long_autocast_logits(arch: &str) {
    let p = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/bf16_autocast.json"
    ));
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    let case = &v["long"][arch];
    let ids = ids2(&case["input_ids"]);
    let from = case["from"].as_u64().unwrap() as usize;
    let spread = case["max_abs_autocast_vs_f32"].as_f64().unwrap() as f32;
    let mut want = Vec::new();
    flat_f32(&case["logits_autocast"], &mut want);
    let batch = rlhf_model::Batch {
        attention_mask: ids.iter().map(|r| vec![1u8; r.len()]).collect(),
        input_ids: ids,
    };
    let model =
        rlhf_model::Model::load(&fixtures().join(arch), &rlhf_model::LoadOptions::default())
            .unwrap();
    let tail = |m: &rlhf_model::Model| -> Vec<f32> {
        let logits = m.logits(&m.hidden(&batch).unwrap()).unwrap();
        let all = rlhf_model::ops::to_vec_f32(&logits).unwrap();
        all[from * 512..].to_vec()
    };
    let f32_logits = tail(&model);
    let bf16_logits = {
        let _ac = rlhf_model::kernels::Autocast::bf16(true);
        tail(&model)
    };
    let d = max_abs_diff(&bf16_logits, &want);
    let moved = max_abs_diff(&bf16_logits, &f32_logits);
    assert_follows_torch(&format!("{arch} (80 tokens)"), d, moved, spread);
}

/// That logits under autocast lie `d` from torch's autocast logits, within torch's own
/// autocast-to-fp32 `spread`, and `moved` from our f32 logits (autocast changed them).
pub fn assert_follows_torch(what: &str, d: f32, moved: f32, spread: f32) {
    eprintln!(
        "{what}: |bf16 - torch autocast| {d:.4} (spread {spread:.4}), |bf16 - f32| {moved:.4}"
    );
    assert!(
        moved > 1e-3,
        "{what}: autocast did not change the logits ({moved})"
    );
    assert!(
        d <= spread,
        "{what}: {d} from torch's autocast logits (spread {spread})"
    );
}

/// The golden batch of each fixture architecture under autocast against torch's autocast
/// logits ([`assert_follows_torch`], over the positions the attention mask keeps).
pub fn check_autocast_logits() {
    for arch in ["llama-gqa", "qwen2", "gpt2", "opt"] {
        let (reference, spread) = autocast_reference(arch);
        let f32_logits = golden_logits(arch);
        let bf16_logits = {
            let _ac = rlhf_model::kernels::Autocast::bf16(true);
            golden_logits(arch)
        };
        let d = masked_max_abs_diff(arch, &bf16_logits, &reference, 512);
        let moved = masked_max_abs_diff(arch, &bf16_logits, &f32_logits, 512);
        assert_follows_torch(arch, d, moved, spread);
    }
}
/// One training step's gradients on the long case's 80-token sequence (full fine-tuning,
/// next-token loss), under autocast and in f32: their relative L2 distance over all trainable
/// weights must stay within 1.5× torch's own (its autocast against its fp32, from the same
/// fixture: bf16's noise on this random model, 4-6%; a wrongly packed operand in any backward
/// product gives ~100%), and autocast must change them.
pub fn check_long_autocast_grads(arch: &str) {
    let p = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/bf16_autocast.json"
    ));
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    let ids = ids2(&v["long"][arch]["input_ids"]);
    let torch_rel = v["long"][arch]["grad_rel_autocast_vs_f32"]
        .as_f64()
        .unwrap();
    let t = ids[0].len();
    let labels: Vec<i64> = (0..t)
        .map(|j| {
            if j + 1 < t {
                ids[0][j + 1] as i64
            } else {
                -100
            }
        })
        .collect();
    let batch = rlhf_model::Batch {
        attention_mask: vec![vec![1u8; t]],
        input_ids: ids,
    };
    let model = rlhf_model::Model::load(
        &fixtures().join(arch),
        &rlhf_model::LoadOptions {
            training: rlhf_model::Training::Full,
            ..Default::default()
        },
    )
    .unwrap();
    let grads = |m: &rlhf_model::Model| -> Vec<f32> {
        let logits = m.logits(&m.hidden(&batch).unwrap()).unwrap();
        let logits = logits.reshape((t, 512)).unwrap();
        let loss = rlhf_model::ops::cross_entropy(&logits, &labels).unwrap();
        let g = loss.backward().unwrap();
        let mut out = Vec::new();
        for (_, var) in m.params().trainable() {
            if let Some(gr) = g.get(var.as_tensor()) {
                out.extend(rlhf_model::ops::to_vec_f32(gr).unwrap());
            }
        }
        out
    };
    model.set_training(true);
    let g32 = grads(&model);
    let g16 = {
        let _ac = rlhf_model::kernels::Autocast::bf16(true);
        grads(&model)
    };
    assert_eq!(g32.len(), g16.len());
    let norm = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let diff: Vec<f32> = g32.iter().zip(&g16).map(|(a, b)| a - b).collect();
    let rel = norm(&diff) / norm(&g32);
    eprintln!(
        "{arch} (80 tokens): |grad bf16 - grad f32| / |grad f32| = {rel:.4} (torch's own {torch_rel:.4})"
    );
    assert!(rel > 1e-4, "{arch}: autocast did not change the gradients");
    assert!(
        rel <= 1.5 * torch_rel,
        "{arch}: bf16 gradients {rel} away from f32's (torch's own autocast: {torch_rel})"
    );
}
