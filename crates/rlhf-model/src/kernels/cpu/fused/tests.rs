//! Tests of the fused kernels against their generic forms, in value and gradient.

use super::*;
use crate::kernels::{self, generic};
use candle_core::{Device, Var};

type TResult = std::result::Result<(), Box<dyn std::error::Error>>;

fn randn(shape: &[usize], seed: u64) -> candle_core::Result<Tensor> {
    // Deterministic pseudo-random normals (Box-Muller over a splitmix64 stream).
    let n: usize = shape.iter().product();
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1);
    let mut next = || {
        s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    };
    let v: Vec<f32> = (0..n)
        .map(|_| {
            let (u1, u2) = (next().max(1e-12), next());
            ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
}

fn max_diff(a: &Tensor, b: &Tensor) -> candle_core::Result<f32> {
    assert_eq!(a.dims(), b.dims());
    (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
}

fn assert_close(what: &str, a: &Tensor, b: &Tensor, tol: f32) -> TResult {
    let d = max_diff(a, b)?;
    assert!(d <= tol, "{what}: max |diff| = {d:e} > {tol:e}");
    Ok(())
}

/// Shapes every op is checked on: (..., n) with odd sizes and a lane remainder.
const SHAPES: &[&[usize]] = &[&[7], &[3, 17], &[2, 3, 5, 8], &[4, 33], &[2, 70, 128]];

/// How a test input is laid out when it reaches the op. A `Var` always owns contiguous
/// storage, so the transposes are applied to the variable inside the graph.
#[derive(Clone, Copy, Debug)]
enum View {
    Contiguous,
    /// Last two dims transposed: last stride != 1, the wrapper copies it first.
    LastTransposed,
    /// First two dims transposed: non-contiguous but rows intact, read in place.
    OuterTransposed,
}

impl View {
    fn apply(self, t: &Tensor) -> candle_core::Result<Tensor> {
        let r = t.rank();
        let v = match self {
            View::Contiguous => t.clone(),
            View::LastTransposed => t.transpose(r - 2, r - 1)?,
            View::OuterTransposed => t.transpose(0, 1)?,
        };
        match self {
            View::Contiguous => assert!(v.is_contiguous()),
            View::LastTransposed => assert!(v.stride()[r - 1] != 1),
            View::OuterTransposed => assert!(!v.is_contiguous() && v.stride()[r - 1] == 1),
        }
        Ok(v)
    }
}

/// The inputs each op is checked on, as (variable contents, view giving `shape`), values
/// `randn * scale + shift`.
fn inputs(
    shape: &[usize],
    seed: u64,
    scale: f64,
    shift: f64,
) -> candle_core::Result<Vec<(Tensor, View)>> {
    let r = shape.len();
    let mut v = vec![(randn(shape, seed)?.affine(scale, shift)?, View::Contiguous)];
    if r >= 2 && shape[r - 2] > 1 && shape[r - 1] > 1 {
        let mut s = shape.to_vec();
        s.swap(r - 2, r - 1);
        v.push((
            randn(&s, seed + 1)?.affine(scale, shift)?,
            View::LastTransposed,
        ));
    }
    if r >= 3 && shape[0] > 1 && shape[1] > 1 {
        let mut s = shape.to_vec();
        s.swap(0, 1);
        v.push((
            randn(&s, seed + 7)?.affine(scale, shift)?,
            View::OuterTransposed,
        ));
    }
    Ok(v)
}

#[test]
fn softmax_matches_composed() -> TResult {
    for (i, &shape) in SHAPES.iter().enumerate() {
        let seed = i as u64 * 10;
        for (x0, view) in inputs(shape, seed, 3.0, 0.0)? {
            let r = randn(shape, seed + 2)?;
            let x = Var::from_tensor(&x0)?;
            let y = kernels::softmax(&view.apply(x.as_tensor())?)?;
            let g = (&y * &r)?.sum_all()?.backward()?;
            let dx = g.get(x.as_tensor()).expect("no gradient for x");

            let xr = Var::from_tensor(&x0)?;
            let yr = generic::softmax(&view.apply(xr.as_tensor())?)?;
            let gr = (&yr * &r)?.sum_all()?.backward()?;
            let dxr = gr.get(xr.as_tensor()).unwrap();

            assert_close(&format!("softmax {shape:?} {view:?} value"), &y, &yr, 1e-5)?;
            assert_close(&format!("softmax {shape:?} {view:?} grad"), dx, dxr, 1e-4)?;
        }
    }
    Ok(())
}

#[test]
fn scaled_masked_softmax_matches_composed() -> TResult {
    // A causal mask with left padding, broadcast over 3 heads; rows of odd length.
    let (b, h, t) = (2, 3, 19);
    let x0 = randn(&[b, h, t, t], 7)?;
    let mut bias = vec![0f32; b * t * t];
    for bi in 0..b {
        for q in 0..t {
            for k in 0..t {
                if k > q || (bi == 1 && k < 4) {
                    bias[(bi * t + q) * t + k] = f32::MIN;
                }
            }
        }
    }
    let bias = Tensor::from_vec(bias, (b, 1, t, t), &Device::Cpu)?;
    let r = randn(&[b, h, t, t], 8)?;
    let x = Var::from_tensor(&x0)?;
    let y = kernels::scaled_masked_softmax(x.as_tensor(), &bias, 0.125)?;
    let g = (&y * &r)?.sum_all()?.backward()?;
    let xr = Var::from_tensor(&x0)?;
    let yr = generic::scaled_masked_softmax(xr.as_tensor(), &bias, 0.125)?;
    let gr = (&yr * &r)?.sum_all()?.backward()?;
    assert_close("scaled masked softmax value", &y, &yr, 1e-6)?;
    let (dx, dxr) = (
        g.get(x.as_tensor()).unwrap(),
        gr.get(xr.as_tensor()).unwrap(),
    );
    assert_close("scaled masked softmax grad", dx, dxr, 1e-6)?;
    Ok(())
}

#[test]
fn softmax_edge_values() -> TResult {
    // Large masked values, -inf, and a large spread.
    let x = Tensor::new(
        &[[0f32, -1e9, 3.0, f32::NEG_INFINITY, -100.0, 50.0, -50.0, 1.0]],
        &Device::Cpu,
    )?;
    let y = kernels::softmax(&x)?;
    let yr = generic::softmax(&x)?;
    assert_close("softmax edge", &y, &yr, 1e-6)?;
    let total: f32 = y.sum_all()?.to_scalar()?;
    assert!((total - 1.0).abs() < 1e-6);
    // exp itself, over the range softmax uses.
    for i in 0..2000 {
        let v = -(i as f32) * 0.05;
        let (a, b) = (exp_f32(v), v.exp());
        assert!(
            (a - b).abs() <= 3e-7 * b + 4.5e-38, // below e^-86 (4.4e-38) flushes to 0
            "exp({v}) = {a}, expected {b}"
        );
    }
    Ok(())
}

#[test]
fn rms_norm_matches_composed() -> TResult {
    for (i, &shape) in SHAPES.iter().enumerate() {
        let seed = 100 + i as u64 * 10;
        let h = *shape.last().unwrap();
        for (x0, view) in inputs(shape, seed, 1.0, 0.0)? {
            let w0 = (randn(&[h], seed + 3)? + 1.0)?;
            let r = randn(shape, seed + 2)?;
            let (x, w) = (Var::from_tensor(&x0)?, Var::from_tensor(&w0)?);
            let y = kernels::rms_norm(&view.apply(x.as_tensor())?, w.as_tensor(), 1e-5)?;
            let g = (&y * &r)?.sum_all()?.backward()?;

            let (xr, wr) = (Var::from_tensor(&x0)?, Var::from_tensor(&w0)?);
            let yr = generic::rms_norm(&view.apply(xr.as_tensor())?, wr.as_tensor(), 1e-5)?;
            let gr = (&yr * &r)?.sum_all()?.backward()?;

            assert_close(&format!("rms_norm {shape:?} {view:?} value"), &y, &yr, 1e-5)?;
            let (dx, dxr) = (
                g.get(x.as_tensor()).unwrap(),
                gr.get(xr.as_tensor()).unwrap(),
            );
            assert_close(&format!("rms_norm {shape:?} {view:?} dx"), dx, dxr, 1e-4)?;
            let (dw, dwr) = (
                g.get(w.as_tensor()).unwrap(),
                gr.get(wr.as_tensor()).unwrap(),
            );
            assert_close(&format!("rms_norm {shape:?} {view:?} dw"), dw, dwr, 1e-4)?;
        }
    }
    Ok(())
}

#[test]
fn rms_norm_large_is_parallel_and_matches() -> TResult {
    // Big enough to be split over the thread pool and into several dw partials.
    let (x0, w0, r) = (
        randn(&[4, 128, 576], 7)?,
        randn(&[576], 8)?,
        randn(&[4, 128, 576], 9)?,
    );
    let (x, w) = (Var::from_tensor(&x0)?, Var::from_tensor(&w0)?);
    let g = (kernels::rms_norm(x.as_tensor(), w.as_tensor(), 1e-6)? * &r)?
        .sum_all()?
        .backward()?;
    let (xr, wr) = (Var::from_tensor(&x0)?, Var::from_tensor(&w0)?);
    let gr = (generic::rms_norm(xr.as_tensor(), wr.as_tensor(), 1e-6)? * &r)?
        .sum_all()?
        .backward()?;
    assert_close(
        "rms dx",
        g.get(x.as_tensor()).unwrap(),
        gr.get(xr.as_tensor()).unwrap(),
        1e-4,
    )?;
    // dw sums 512 rows: compare relative to its scale.
    let (dw, dwr) = (
        g.get(w.as_tensor()).unwrap(),
        gr.get(wr.as_tensor()).unwrap(),
    );
    let scale = dwr.abs()?.max(0)?.to_scalar::<f32>()?.max(1.0);
    assert!(max_diff(dw, dwr)? <= 1e-4 * scale);
    Ok(())
}

#[test]
fn rms_norm_finite_differences() -> TResult {
    // Finite differences in f64 on the f32 kernel are noisy; use a small problem and a
    // central difference with a step that keeps the f32 rounding error well below 1e-2.
    let (x0, w0, r) = (
        randn(&[3, 6], 21)?,
        (randn(&[6], 22)? + 1.0)?,
        randn(&[3, 6], 23)?,
    );
    let eps = 1e-5;
    let loss = |x: &Tensor, w: &Tensor| -> candle_core::Result<f64> {
        let y = kernels::rms_norm(x, w, eps).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        (y * &r)?
            .sum_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()
    };
    let (x, w) = (Var::from_tensor(&x0)?, Var::from_tensor(&w0)?);
    let y = kernels::rms_norm(x.as_tensor(), w.as_tensor(), eps)?;
    let g = (y * &r)?.sum_all()?.backward()?;
    let dx: Vec<f32> = g.get(x.as_tensor()).unwrap().flatten_all()?.to_vec1()?;
    let dw: Vec<f32> = g.get(w.as_tensor()).unwrap().to_vec1()?;
    let h = 1e-2f32;
    let bump = |t: &Tensor, i: usize, d: f32| -> candle_core::Result<Tensor> {
        let mut v: Vec<f32> = t.flatten_all()?.to_vec1()?;
        v[i] += d;
        Tensor::from_vec(v, t.shape(), t.device())
    };
    for i in [0usize, 5, 7, 17] {
        let fd =
            (loss(&bump(&x0, i, h)?, &w0)? - loss(&bump(&x0, i, -h)?, &w0)?) / (2.0 * h as f64);
        assert!(
            (fd - dx[i] as f64).abs() < 2e-3 * (1.0 + fd.abs()),
            "dx[{i}]: fd {fd} vs {}",
            dx[i]
        );
    }
    for i in [0usize, 3, 5] {
        let fd =
            (loss(&x0, &bump(&w0, i, h)?)? - loss(&x0, &bump(&w0, i, -h)?)?) / (2.0 * h as f64);
        assert!(
            (fd - dw[i] as f64).abs() < 2e-3 * (1.0 + fd.abs()),
            "dw[{i}]: fd {fd} vs {}",
            dw[i]
        );
    }
    Ok(())
}

#[test]
fn rms_norm_frozen_weight_and_half() -> TResult {
    // Weight a plain tensor (no gradient): x still gets its gradient.
    let (x0, w0, r) = (
        randn(&[5, 24], 31)?,
        randn(&[24], 32)?,
        randn(&[5, 24], 33)?,
    );
    let x = Var::from_tensor(&x0)?;
    let g = (kernels::rms_norm(x.as_tensor(), &w0, 1e-5)? * &r)?
        .sum_all()?
        .backward()?;
    let xr = Var::from_tensor(&x0)?;
    let gr = (generic::rms_norm(xr.as_tensor(), &w0, 1e-5)? * &r)?
        .sum_all()?
        .backward()?;
    assert_close(
        "frozen w dx",
        g.get(x.as_tensor()).unwrap(),
        gr.get(xr.as_tensor()).unwrap(),
        1e-4,
    )?;
    // bf16 goes through f32 and comes back as bf16.
    let xb = x0.to_dtype(DType::BF16)?;
    let yb = kernels::rms_norm(&xb, &w0.to_dtype(DType::BF16)?, 1e-5)?;
    assert_eq!(yb.dtype(), DType::BF16);
    let yr = generic::rms_norm(&x0, &w0, 1e-5)?;
    assert_close("bf16", &yb.to_dtype(DType::F32)?, &yr, 0.1)?;
    // ... and its gradients still reach x and weight (through the dtype conversions).
    let (xv, wv) = (
        Var::from_tensor(&xb)?,
        Var::from_tensor(&w0.to_dtype(DType::BF16)?)?,
    );
    let rb = r.to_dtype(DType::BF16)?;
    let g = (kernels::rms_norm(xv.as_tensor(), wv.as_tensor(), 1e-5)? * &rb)?
        .sum_all()?
        .backward()?;
    let (x32, w32) = (Var::from_tensor(&x0)?, Var::from_tensor(&w0)?);
    let gr = (generic::rms_norm(x32.as_tensor(), w32.as_tensor(), 1e-5)? * &r)?
        .sum_all()?
        .backward()?;
    for (name, a, b) in [("dx", &xv, &x32), ("dw", &wv, &w32)] {
        let d = g
            .get(a.as_tensor())
            .expect("bf16 gradient")
            .to_dtype(DType::F32)?;
        let dr = gr.get(b.as_tensor()).unwrap();
        let scale = dr.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert!(max_diff(&d, dr)? <= 0.05 * scale, "bf16 {name}");
    }
    Ok(())
}

#[test]
fn layer_norm_matches_composed() -> TResult {
    for (i, &shape) in SHAPES.iter().enumerate() {
        let seed = 200 + i as u64 * 10;
        let h = *shape.last().unwrap();
        for (x0, view) in inputs(shape, seed, 1.0, 0.5)? {
            let (w0, b0) = ((randn(&[h], seed + 3)? + 1.0)?, randn(&[h], seed + 4)?);
            let r = randn(shape, seed + 2)?;
            let (x, w, b) = (
                Var::from_tensor(&x0)?,
                Var::from_tensor(&w0)?,
                Var::from_tensor(&b0)?,
            );
            let y = kernels::layer_norm(
                &view.apply(x.as_tensor())?,
                w.as_tensor(),
                b.as_tensor(),
                1e-5,
            )?;
            let g = (&y * &r)?.sum_all()?.backward()?;

            let (xr, wr, br) = (
                Var::from_tensor(&x0)?,
                Var::from_tensor(&w0)?,
                Var::from_tensor(&b0)?,
            );
            let yr = generic::layer_norm(
                &view.apply(xr.as_tensor())?,
                wr.as_tensor(),
                br.as_tensor(),
                1e-5,
            )?;
            let gr = (&yr * &r)?.sum_all()?.backward()?;

            assert_close(
                &format!("layer_norm {shape:?} {view:?} value"),
                &y,
                &yr,
                1e-5,
            )?;
            for (name, a, b) in [("dx", &x, &xr), ("dw", &w, &wr), ("db", &b, &br)] {
                let (d, dr) = (
                    g.get(a.as_tensor()).unwrap(),
                    gr.get(b.as_tensor()).unwrap(),
                );
                assert_close(
                    &format!("layer_norm {shape:?} {view:?} {name}"),
                    d,
                    dr,
                    1e-4,
                )?;
            }
        }
    }
    Ok(())
}

#[test]
fn rope_matches_composed() -> TResult {
    let cases: &[(&[usize], bool)] = &[
        (&[2, 3, 5, 8], true),
        (&[1, 2, 4, 6], true),
        (&[2, 4, 9, 64], true),
        (&[3, 2, 7, 32], false), // cos/sin shared over the batch: (1, 1, t, d)
    ];
    for (i, &(shape, batched)) in cases.iter().enumerate() {
        let (b, h, t, d) = (shape[0], shape[1], shape[2], shape[3]);
        let seed = 300 + i as u64 * 10;
        let cb = if batched { b } else { 1 };
        let ang = randn(&[cb, 1, t, d], seed + 5)?;
        let (cos, sin) = (ang.cos()?, ang.sin()?);
        // Contiguous, and the attention layout: (b, t, h, d) transposed to (b, h, t, d).
        let x_c = randn(shape, seed)?;
        let x_t = randn(&[b, t, h, d], seed + 1)?;
        for (x0, transposed) in [(x_c, false), (x_t, true)] {
            let view = |x: &Var| -> candle_core::Result<Tensor> {
                let x = x.as_tensor();
                if transposed {
                    let v = x.transpose(1, 2)?;
                    assert!(!v.is_contiguous());
                    Ok(v)
                } else {
                    Ok(x.clone())
                }
            };
            let r = randn(shape, seed + 2)?;
            let x = Var::from_tensor(&x0)?;
            let y = kernels::rope(&view(&x)?, &cos, &sin)?;
            let g = (&y * &r)?.sum_all()?.backward()?;
            let xr = Var::from_tensor(&x0)?;
            let yr = generic::rope(&view(&xr)?, &cos, &sin)?;
            let gr = (&yr * &r)?.sum_all()?.backward()?;
            assert_close(
                &format!("rope {shape:?} transposed={transposed} value"),
                &y,
                &yr,
                1e-5,
            )?;
            let (dx, dxr) = (
                g.get(x.as_tensor()).unwrap(),
                gr.get(xr.as_tensor()).unwrap(),
            );
            assert_close(
                &format!("rope {shape:?} transposed={transposed} dx"),
                dx,
                dxr,
                1e-4,
            )?;
        }
    }
    Ok(())
}

#[test]
fn baseline_build_of_the_kernels_matches() -> TResult {
    // The same checks on the kernels compiled without AVX2 (other tests running meanwhile
    // may take this path too, which they pass as well).
    FORCE_BASELINE.store(true, std::sync::atomic::Ordering::Relaxed);
    let r = (|| -> TResult {
        softmax_matches_composed()?;
        softmax_edge_values()?;
        rms_norm_matches_composed()?;
        layer_norm_matches_composed()?;
        rope_matches_composed()
    })();
    FORCE_BASELINE.store(false, std::sync::atomic::Ordering::Relaxed);
    r
}

#[test]
fn non_unit_stride_gradient_is_handled() -> TResult {
    // A per-row weight on out.sum(-1) hands the op a gradient with stride 0 on the last
    // dimension; x itself has a non-unit last stride (transposed).
    let x0 = randn(&[6, 4], 41)?;
    let w0 = randn(&[6], 42)?;
    let r = randn(&[4, 1], 43)?;
    let run = |f: &dyn Fn(&Tensor, &Tensor) -> Result<Tensor>| -> candle_core::Result<(Tensor, Tensor, Option<Tensor>)> {
        let (x, w) = (Var::from_tensor(&x0)?, Var::from_tensor(&w0)?);
        let y = f(&x.as_tensor().t()?, w.as_tensor()).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let g = y.sum_keepdim(1)?.broadcast_mul(&r)?.sum_all()?.backward()?;
        Ok((y, g.get(x.as_tensor()).unwrap().clone(), g.get(w.as_tensor()).cloned()))
    };
    let (y, dx, dw) = run(&|x, w| kernels::rms_norm(x, w, 1e-5))?;
    let (yr, dxr, dwr) = run(&|x, w| generic::rms_norm(x, w, 1e-5))?;
    assert_close("rms strided value", &y, &yr, 1e-5)?;
    assert_close("rms strided dx", &dx, &dxr, 1e-4)?;
    assert_close("rms strided dw", &dw.unwrap(), &dwr.unwrap(), 1e-4)?;
    let (y, dx, _) = run(&|x, _| kernels::softmax(&(x * 2.0)?))?;
    let (yr, dxr, _) = run(&|x, _| generic::softmax(&(x * 2.0)?))?;
    assert_close("softmax strided value", &y, &yr, 1e-5)?;
    assert_close("softmax strided dx", &dx, &dxr, 1e-4)?;
    Ok(())
}
