//! log p(target) per row of logits as one op with its own backward pass.
//!
//! The composed form, `log_softmax(logits).gather(targets)`, keeps several vocabulary-sized
//! intermediates alive for the backward pass (x − max, its exp, the log-softmax) and its
//! backward makes as many vocabulary-sized passes. With a 49k vocabulary that is about 100 MB
//! per intermediate for 16 completions of 32 tokens. Here the forward keeps nothing but its
//! (rows) output, and the backward writes g·(onehot(target) − softmax(x)) in one pass per row,
//! recomputing the row's log-sum-exp.

use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor, D};

#[cfg(target_arch = "x86_64")]
use crate::fused::use_avx2;
use crate::fused::{exp_f32, hsum, max, simd_fn, L};
use crate::Result;

type CResult<T> = candle_core::Result<T>;

/// log softmax(logits)[target] for every row; differentiable in `logits`.
// logits: (..., vocab), targets: (...) u32 -> (...)
pub fn token_logprobs(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let v = logits.dim(D::Minus1)?;
    if !logits.device().is_cpu() || logits.dtype() != DType::F32 || targets.dtype() != DType::U32 {
        return composed(logits, targets);
    }
    let out_shape = targets.dims().to_vec();
    let rows: usize = out_shape.iter().product();
    let x = logits.reshape((rows, v))?.contiguous()?;
    let t = targets.reshape(rows)?.contiguous()?;
    Ok(x.apply_op2(&t, TokenLogprob)?.reshape(out_shape)?)
}

/// The composed reference: log_softmax, then gather.
pub fn composed(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let lp = crate::ops::log_softmax(logits)?;
    Ok(lp
        .gather(&targets.unsqueeze(D::Minus1)?, D::Minus1)?
        .squeeze(D::Minus1)?)
}

/// log Σ exp(x) of a row, shifted by its max for stability.
fn lse(row: &[f32]) -> f32 {
    let mut out = [0f32];
    lse_into(row, &mut out);
    out[0]
}

// The vectorisable exp of `fused` (about 2e-7 relative error), lanes kept apart for the sum.
simd_fn! {
    fn lse_into(row: &[f32], out: &mut [f32]) {
        let m = max(row);
        if !m.is_finite() {
            out[0] = m;
            return;
        }
        let mut acc = [0f32; L];
        let main = row.len() / L * L;
        for c in row[..main].chunks_exact(L) {
            for j in 0..L {
                acc[j] += exp_f32(c[j] - m);
            }
        }
        let mut s = hsum(acc);
        for &x in &row[main..] {
            s += exp_f32(x - m);
        }
        out[0] = m + s.ln();
    }
}

// d = -g · softmax(row), given the row's log-sum-exp.
simd_fn! {
    fn neg_scaled_softmax(row: &[f32], lse: f32, g: f32, d: &mut [f32]) {
        for (dj, &xj) in d.iter_mut().zip(row) {
            *dj = -g * exp_f32(xj - lse);
        }
    }
}

/// Runs `f(row, out_row)` for every row of `out` (`per_row` values a row) on candle's CPU
/// thread pool, the one its element-wise ops use (no threads are started per call), when the
/// rows hold enough work (`work` input elements a row).
fn par_rows(out: &mut [f32], per_row: usize, work: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    /// Rows written by different workers are disjoint.
    struct Ptr(*mut f32);
    unsafe impl Sync for Ptr {}
    let per_row = per_row.max(1);
    let n_rows = out.len() / per_row;
    if n_rows * work < 1 << 16 || n_rows < 2 {
        for (r, row) in out.chunks_exact_mut(per_row).enumerate() {
            f(r, row);
        }
        return;
    }
    let ptr = Ptr(out.as_mut_ptr());
    candle_core::utils::barrier_pool().execute_chunked(n_rows, |rows| {
        let p = &ptr;
        for r in rows {
            // SAFETY: r < n_rows, so the row is inside `out`, and each row index is handed
            // to exactly one worker.
            let row = unsafe { std::slice::from_raw_parts_mut(p.0.add(r * per_row), per_row) };
            f(r, row);
        }
    });
}

fn data<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> CResult<&'a [f32]> {
    match s {
        CpuStorage::F32(v) if l.is_contiguous() => Ok(&v[l.start_offset()..]),
        _ => bail!("token log-probs: {what} must be contiguous f32"),
    }
}

fn ids<'a>(s: &'a CpuStorage, l: &Layout) -> CResult<&'a [u32]> {
    match s {
        CpuStorage::U32(v) if l.is_contiguous() => Ok(&v[l.start_offset()..]),
        _ => bail!("token log-probs: targets must be contiguous u32"),
    }
}

struct TokenLogprob;

impl CustomOp2 for TokenLogprob {
    fn name(&self) -> &'static str {
        "token-logprob"
    }

    // x: (rows, vocab), t: (rows) -> (rows)
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (rows, v) = l1.shape().dims2()?;
        let (x, t) = (data(s1, l1, "logits")?, ids(s2, l2)?);
        if t.len() < rows {
            bail!(
                "token log-probs: {rows} rows of logits, {} targets",
                t.len()
            )
        }
        if let Some(bad) = t[..rows].iter().find(|&&i| i as usize >= v) {
            bail!("token log-probs: target id {bad} is outside the vocabulary of {v}")
        }
        let mut out = vec![0f32; rows];
        par_rows(&mut out, 1, v, |r, o| {
            let row = &x[r * v..(r + 1) * v];
            o[0] = row[t[r] as usize] - lse(row);
        });
        Ok((CpuStorage::F32(out), Shape::from(rows)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        t: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.contiguous()?;
        Ok((Some(x.apply_op3_no_bwd(t, &g, &TokenLogprobBwd)?), None))
    }
}

struct TokenLogprobBwd;

impl CustomOp3 for TokenLogprobBwd {
    fn name(&self) -> &'static str {
        "token-logprob-bwd"
    }

    // x: (rows, vocab), t: (rows), g: (rows) -> dx: (rows, vocab)
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (rows, v) = l1.shape().dims2()?;
        let (x, t, g) = (data(s1, l1, "logits")?, ids(s2, l2)?, data(s3, l3, "grad")?);
        let mut dx = vec![0f32; rows * v];
        par_rows(&mut dx, v, v, |r, d| {
            let row = &x[r * v..(r + 1) * v];
            let gr = g[r];
            neg_scaled_softmax(row, lse(row), gr, d);
            d[t[r] as usize] += gr;
        });
        Ok((CpuStorage::F32(dx), Shape::from((rows, v))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Values and gradients equal the composed log_softmax + gather.
    #[test]
    fn matches_the_composed_op_in_value_and_gradient() {
        let dev = Device::Cpu;
        // Large enough (rows × vocab ≥ 65,536) to take the threaded path too.
        for (b, t, v) in [(2, 3, 7), (4, 40, 500)] {
            let x =
                Var::from_tensor(&(Tensor::randn(0f32, 3.0, (b, t, v), &dev).unwrap())).unwrap();
            let ids: Vec<u32> = (0..b * t).map(|i| ((i * 7919) % v) as u32).collect();
            let tg = Tensor::from_vec(ids, (b, t), &dev).unwrap();
            let w = Tensor::randn(0f32, 1.0, (b, t), &dev).unwrap();
            let fused = token_logprobs(x.as_tensor(), &tg).unwrap();
            let reference = composed(x.as_tensor(), &tg).unwrap();
            let diff = (&fused - &reference)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(diff < 1e-5, "values differ by {diff}");
            let gf = (fused * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let gr = (reference * &w)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let (a, c) = (
                gf.get(x.as_tensor()).unwrap(),
                gr.get(x.as_tensor()).unwrap(),
            );
            let gdiff = (a - c)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(gdiff < 1e-5, "gradients differ by {gdiff}");
        }
    }

    #[test]
    fn a_target_outside_the_vocabulary_is_an_error() {
        let x = Tensor::zeros((2, 4), DType::F32, &Device::Cpu).unwrap();
        let t = Tensor::new(&[1u32, 9], &Device::Cpu).unwrap();
        let e = token_logprobs(&x, &t).unwrap_err().to_string();
        assert!(e.contains("outside the vocabulary"), "{e}");
    }
}
