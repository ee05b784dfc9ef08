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
use super::fused::use_avx2;
use super::fused::{exp_f32, hsum, max, simd_fn, L};
use crate::Result;

type CResult<T> = candle_core::Result<T>;

/// log softmax(logits)\[target\] for every row; differentiable in `logits`.
// logits: (..., vocab), targets: (...) u32 -> (...)
pub fn token_logprobs(logits: &Tensor, targets: &Tensor) -> Result<Option<Tensor>> {
    let v = logits.dim(D::Minus1)?;
    if !logits.device().is_cpu() || logits.dtype() != DType::F32 || targets.dtype() != DType::U32 {
        return Ok(None);
    }
    let out_shape = targets.dims().to_vec();
    let rows: usize = out_shape.iter().product();
    let x = logits.reshape((rows, v))?.contiguous()?;
    let t = targets.reshape(rows)?.contiguous()?;
    Ok(Some(x.apply_op2(&t, TokenLogprob)?.reshape(out_shape)?))
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

// ---------------------------------------------------------------------------------------------
// The LM head and the log-prob as one op
// ---------------------------------------------------------------------------------------------

/// Logits a forward chunk may hold at once (bytes): the vocabulary-sized rows are made, used
/// and dropped chunk by chunk.
const HEAD_CHUNK_BYTES: usize = 64 << 20;

/// log softmax(h·Wᵀ / temperature)[target] for every row of hidden states, with a frozen
/// (untracked) head `w`, or `None` where the op does not run (no AVX-512 kernel, not f32 on the
/// CPU, a trainable head): the caller then composes the head and [`token_logprobs`].
///
/// No vocabulary-sized tensor outlives the call. The gradient of row r's log-prob with respect
/// to h_r is (W[target] − softmax·W) / temperature, a `d`-vector, so where `keep_grad` is set
/// the forward computes it from each chunk's probabilities while they are at hand, and the
/// backward only scales it by the incoming gradient. The products are the ones the composed
/// backward would make (the logits, then probabilities · W), moved into the forward.
// h: (..., d), w: (vocab, d), targets: (...) u32 -> (...)
pub fn head_token_logprobs(
    h: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    temperature: f64,
    keep_grad: bool,
) -> Result<Option<Tensor>> {
    let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    if !crate::kernels::cpu::gemm::available()
        || !f32_cpu(h)
        || !f32_cpu(w)
        || w.track_op()
        || w.rank() != 2
        || targets.dtype() != DType::U32
        || temperature <= 0.0
        || h.dim(D::Minus1)? != w.dim(1)?
    {
        return Ok(None);
    }
    let d = w.dim(1)?;
    let out_shape = targets.dims().to_vec();
    let rows: usize = out_shape.iter().product();
    let h2 = h.reshape((rows, d))?.contiguous()?;
    let op = HeadLogprob {
        targets: targets.flatten_all()?.to_vec1::<u32>()?,
        inv_t: (1.0 / temperature) as f32,
        keep_grad: keep_grad && h.track_op(),
        grad: std::sync::Mutex::new(Vec::new()),
    };
    let out = h2.apply_op2(&w.contiguous()?, op)?;
    Ok(Some(out.reshape(out_shape)?))
}

struct HeadLogprob {
    targets: Vec<u32>,
    inv_t: f32,
    keep_grad: bool,
    /// d log p_r / d h_r for every row, (rows, d), written by the forward.
    grad: std::sync::Mutex<Vec<f32>>,
}

// Row scaled in place by s.
simd_fn! {
    fn scale_row(row: &mut [f32], s: f32) {
        for x in row.iter_mut() {
            *x *= s;
        }
    }
}

// Row replaced by exp(row − lse), its softmax given its log-sum-exp.
simd_fn! {
    fn softmax_in_place(row: &mut [f32], lse: f32) {
        for x in row.iter_mut() {
            *x = exp_f32(*x - lse);
        }
    }
}

impl CustomOp2 for HeadLogprob {
    fn name(&self) -> &'static str {
        "head-token-logprob"
    }

    // h: (rows, d), w: (vocab, d) -> (rows)
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (rows, d) = l1.shape().dims2()?;
        let (v, _) = l2.shape().dims2()?;
        let (h, w) = (data(s1, l1, "hidden states")?, data(s2, l2, "LM head")?);
        let t = &self.targets;
        if t.len() != rows {
            bail!("token log-probs: {rows} hidden states, {} targets", t.len())
        }
        if let Some(bad) = t.iter().find(|&&i| i as usize >= v) {
            bail!("token log-probs: target id {bad} is outside the vocabulary of {v}")
        }
        let chunk = (HEAD_CHUNK_BYTES / (v * 4).max(1)).clamp(16, rows.max(16));
        let mut out = vec![0f32; rows];
        let mut grad = if self.keep_grad {
            vec![0f32; rows * d]
        } else {
            Vec::new()
        };
        let wm = super::gemm::MatRef::new(&w[..v * d], v, d, d, 1);
        for r0 in (0..rows).step_by(chunk) {
            let c = chunk.min(rows - r0);
            let hm = super::gemm::MatRef::new(&h[r0 * d..(r0 + c) * d], c, d, d, 1);
            let Some(mut z) = super::gemm::matmul(hm, wm.t()) else {
                bail!("token log-probs: the AVX-512 kernel is not available")
            };
            let inv_t = self.inv_t;
            if inv_t != 1.0 {
                par_rows(&mut z, v, v, |_, row| scale_row(row, inv_t));
            }
            let mut lse_c = vec![0f32; c];
            par_rows(&mut lse_c, 1, v, |r, o| o[0] = lse(&z[r * v..(r + 1) * v]));
            for r in 0..c {
                out[r0 + r] = z[r * v + t[r0 + r] as usize] - lse_c[r];
            }
            if !self.keep_grad {
                continue;
            }
            par_rows(&mut z, v, v, |r, row| softmax_in_place(row, lse_c[r]));
            let pw = super::gemm::matmul(super::gemm::MatRef::new(&z, c, v, v, 1), wm)
                .expect("the kernel ran above");
            for r in 0..c {
                let target = &w[t[r0 + r] as usize * d..][..d];
                let g = &mut grad[(r0 + r) * d..(r0 + r + 1) * d];
                for ((gj, &wj), &pj) in g.iter_mut().zip(target).zip(&pw[r * d..(r + 1) * d]) {
                    *gj = inv_t * (wj - pj);
                }
            }
        }
        *self.grad.lock().expect("not poisoned") = grad;
        Ok((CpuStorage::F32(out), Shape::from(rows)))
    }

    fn bwd(
        &self,
        h: &Tensor,
        _w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let (rows, d) = h.dims2()?;
        let g = grad.to_vec1::<f32>()?;
        let dl = self.grad.lock().expect("not poisoned");
        if dl.len() != rows * d {
            bail!("token log-probs: the forward kept no gradient (keep_grad was off)")
        }
        let mut dh = vec![0f32; rows * d];
        for (r, (out, src)) in dh.chunks_exact_mut(d).zip(dl.chunks_exact(d)).enumerate() {
            for (o, &s) in out.iter_mut().zip(src) {
                *o = g[r] * s;
            }
        }
        Ok((Some(Tensor::from_vec(dh, (rows, d), h.device())?), None))
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
            let fused = token_logprobs(x.as_tensor(), &tg)
                .unwrap()
                .expect("the kernel runs");
            let reference = crate::kernels::generic::token_logprobs(x.as_tensor(), &tg).unwrap();
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

    /// The head + log-prob op equals the composed h·Wᵀ / T, log_softmax, gather, in value and
    /// in the gradient with respect to h, over several chunks and with a temperature.
    #[test]
    fn the_head_op_matches_the_composed_head_in_value_and_gradient() {
        if !crate::kernels::cpu::gemm::available() {
            return;
        }
        let dev = Device::Cpu;
        // 300 rows of a 60,000-word vocabulary span two 64 MB chunks.
        for (n, d, v, temp) in [(5, 8, 11, 1.0), (300, 24, 60_000, 0.7)] {
            let h = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, d), &dev).unwrap()).unwrap();
            let w = Tensor::randn(0f32, 0.5, (v, d), &dev).unwrap();
            let ids: Vec<u32> = (0..n).map(|i| ((i * 7919) % v) as u32).collect();
            let tg = Tensor::from_vec(ids, n, &dev).unwrap();
            let gw = Tensor::randn(0f32, 1.0, n, &dev).unwrap();
            let fused = head_token_logprobs(h.as_tensor(), &w, &tg, temp, true)
                .unwrap()
                .expect("the op runs");
            let logits = (h.as_tensor().matmul(&w.t().unwrap()).unwrap() / temp).unwrap();
            let reference = crate::kernels::generic::token_logprobs(&logits, &tg).unwrap();
            let diff = crate::test_util::max_diff(&fused, &reference);
            assert!(diff < 1e-4, "values differ by {diff}");
            let gf = (fused * &gw)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let gr = (reference * &gw)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let gdiff = crate::test_util::max_diff(
                gf.get(h.as_tensor()).unwrap(),
                gr.get(h.as_tensor()).unwrap(),
            );
            assert!(gdiff < 1e-4, "gradients differ by {gdiff}");
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
