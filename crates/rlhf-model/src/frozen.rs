//! Ops that skip the gradient of frozen weights.
//!
//! candle's backward pass computes the gradient of *every* input of a tracked op, tracked or
//! not: `x.matmul(w)` with a frozen `w` still pays for `xᵀ·grad` and a zero-filled buffer for
//! it, and an embedding lookup into a frozen table still scatters into a table-sized buffer.
//! With LoRA nearly every weight is frozen, so that is most of the backward pass. The ops here
//! compute the forward with candle's own kernels and, in their backward, return a gradient for
//! a weight only when the weight is tracked (a `Var`, or the result of tracked ops).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};

use crate::{gemm, Result};

/// Up to this many rows, `LinearOp` computes (W·xᵀ)ᵀ instead of x·Wᵀ (on CPUs without the
/// AVX-512 kernel, which handles few rows itself).
const SKINNY_ROWS: usize = 64;

/// y = x·Wᵀ (nn.Linear layout) or y = x·W (Conv1D layout).
struct LinearOp {
    /// W is stored (in, out), GPT-2's Conv1D.
    conv1d: bool,
}

impl CustomOp2 for LinearOp {
    fn name(&self) -> &'static str {
        "frozen-aware-linear"
    }

    // x: (m, k), w: (n, k) or (k, n) -> (m, n)
    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, k) = (xl.dims()[0], xl.dims()[1]);
        let wt = if self.conv1d {
            wl.clone()
        } else {
            wl.transpose(0, 1)?
        };
        if let Some(y) = avx512_matmul(x, xl, w, &wt) {
            return Ok((y, Shape::from((m, wt.dims()[1]))));
        }
        if !self.conv1d && m <= SKINNY_ROWS {
            if let (CpuStorage::F32(_), CpuStorage::F32(_)) = (x, w) {
                // Few rows (decoding): yᵀ = W·xᵀ streams the weight once without packing it,
                // 1.6-1.8× faster here than x·Wᵀ for m = 16 (examples/skinny.rs).
                let n = wl.dims()[0];
                let yt = w.matmul(x, (1, n, m, k), wl, &xl.transpose(0, 1)?)?;
                let CpuStorage::F32(yt) = yt else {
                    unreachable!("f32 matmul gives f32")
                };
                let mut y = vec![0f32; m * n];
                for (j, col) in yt.chunks_exact(m).enumerate() {
                    for (i, v) in col.iter().enumerate() {
                        y[i * n + j] = *v;
                    }
                }
                return Ok((CpuStorage::F32(y), Shape::from((m, n))));
            }
        }
        let n = wt.dims()[1];
        let y = x.matmul(w, (1, m, n, k), xl, &wt)?;
        Ok((y, Shape::from((m, n))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // grad: (m, n)
        let dx = if !x.track_op() {
            None
        } else if self.conv1d {
            Some(matmul(grad, &w.t()?)?)
        } else {
            Some(matmul(grad, w)?)
        };
        let dw = if !w.track_op() {
            None
        } else if self.conv1d {
            Some(matmul(&x.t()?, grad)?)
        } else {
            Some(matmul(&grad.t()?, x)?)
        };
        Ok((dx, dw))
    }
}

/// `x·Wᵀ` (or `x·W` for Conv1D) without a gradient for a frozen W.
// x: (m, in), w: (out, in) | (in, out) -> (m, out)
pub fn linear(x: &Tensor, w: &Tensor, conv1d: bool) -> Result<Tensor> {
    if !x.device().is_cpu() {
        // Plain ops run on every device.
        let wt = if conv1d { w.clone() } else { w.t()? };
        return Ok(x.matmul(&wt)?);
    }
    Ok(x.contiguous()?.apply_op2(w, LinearOp { conv1d })?)
}

/// a·b with the AVX-512 kernel, where the CPU has one and both are 2-D f32.
fn avx512_matmul(a: &CpuStorage, al: &Layout, b: &CpuStorage, bl: &Layout) -> Option<CpuStorage> {
    if al.dims().len() != 2 || bl.dims().len() != 2 {
        return None;
    }
    let ((a, _, _), (b, _, _)) = (batch_view(a, al)?, batch_view(b, bl)?);
    gemm::matmul(a, b).map(CpuStorage::F32)
}

/// Untracked 2-D product (the backward pass's own products), on the AVX-512 kernel where it
/// runs.
struct MatMulOp;

impl CustomOp2 for MatMulOp {
    fn name(&self) -> &'static str {
        "avx512-matmul"
    }

    fn cpu_fwd(
        &self,
        a: &CpuStorage,
        al: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, k, n) = (al.dims()[0], al.dims()[1], bl.dims()[1]);
        if let Some(c) = avx512_matmul(a, al, b, bl) {
            return Ok((c, Shape::from((m, n))));
        }
        Ok((a.matmul(b, (1, m, n, k), al, bl)?, Shape::from((m, n))))
    }
}

/// a·b for 2-D tensors, without a backward pass of its own.
pub fn matmul(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    if !a.device().is_cpu() {
        return a.matmul(b);
    }
    a.apply_op2_no_bwd(b, &MatMulOp)
}

/// Embedding lookup that scatters no gradient into a frozen table.
struct EmbeddingOp;

impl CustomOp2 for EmbeddingOp {
    fn name(&self) -> &'static str {
        "frozen-aware-embedding"
    }

    // table: (n, d), ids: (m) -> (m, d)
    fn cpu_fwd(
        &self,
        table: &CpuStorage,
        tl: &Layout,
        ids: &CpuStorage,
        il: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = table.index_select(ids, tl, il, 0)?;
        Ok((out, Shape::from((il.dims()[0], tl.dims()[1]))))
    }

    fn bwd(
        &self,
        table: &Tensor,
        ids: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        if !table.track_op() {
            return Ok((None, None));
        }
        let zeros = table.zeros_like()?;
        Ok((Some(zeros.index_add(ids, grad, 0)?), None))
    }
}

/// Rows of `table` for `ids`; a frozen table gets no gradient buffer.
// table: (n, d), ids: (m) u32 -> (m, d)
pub fn embedding(table: &Tensor, ids: &Tensor) -> Result<Tensor> {
    if !table.device().is_cpu() || table.track_op() {
        return Ok(table.index_select(ids, 0)?);
    }
    Ok(table.apply_op2(&ids.contiguous()?, EmbeddingOp)?)
}

/// A tensor of shape (..., rows, cols) as `batch` strided matrices `step` elements apart, when
/// its leading dimensions collapse into one.
fn batch_view<'a>(s: &'a CpuStorage, l: &Layout) -> Option<(gemm::MatRef<'a>, usize, usize)> {
    let CpuStorage::F32(data) = s else {
        return None;
    };
    let (dims, strides) = (l.dims(), l.stride());
    let r = dims.len();
    if r < 2 {
        return None;
    }
    let (lead, lead_st) = (&dims[..r - 2], &strides[..r - 2]);
    for d in 0..lead.len().saturating_sub(1) {
        if lead_st[d] != lead_st[d + 1] * lead[d + 1] {
            return None;
        }
    }
    let batch: usize = lead.iter().product();
    let step = lead_st.last().copied().unwrap_or(0);
    let view = gemm::MatRef::new(
        &data[l.start_offset()..],
        dims[r - 2],
        dims[r - 1],
        strides[r - 2],
        strides[r - 1],
    );
    // The last matrix must lie inside the buffer too.
    if batch > 0 {
        gemm::MatRef::new(
            data.get(l.start_offset() + (batch - 1) * step..)?,
            dims[r - 2],
            dims[r - 1],
            strides[r - 2],
            strides[r - 1],
        );
    }
    Some((view, step, batch))
}

/// Batched product of (..., m, k) and (..., k, n) with the same leading dimensions.
struct BmmOp;

impl CustomOp2 for BmmOp {
    fn name(&self) -> &'static str {
        "avx512-batched-matmul"
    }

    fn cpu_fwd(
        &self,
        a: &CpuStorage,
        al: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (ad, bd) = (al.dims(), bl.dims());
        let r = ad.len();
        let (m, k, n) = (ad[r - 2], ad[r - 1], bd[r - 1]);
        let mut out = ad[..r - 2].to_vec();
        out.extend([m, n]);
        if let (Some((av, ast, batch)), Some((bv, bst, _))) = (batch_view(a, al), batch_view(b, bl))
        {
            if let Some(c) = gemm::batched_matmul(av, ast, bv, bst, batch) {
                return Ok((CpuStorage::F32(c), Shape::from(out)));
            }
        }
        let batch: usize = ad[..r - 2].iter().product();
        Ok((a.matmul(b, (batch, m, n, k), al, bl)?, Shape::from(out)))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _c: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let da = if a.track_op() {
            Some(grad.apply_op2_no_bwd(&b.t()?, &BmmOp)?)
        } else {
            None
        };
        let db = if b.track_op() {
            Some(a.t()?.apply_op2_no_bwd(grad, &BmmOp)?)
        } else {
            None
        };
        Ok((da, db))
    }
}

/// a·b over the last two dimensions, the leading ones equal (attention's q·kᵀ and p·v), on
/// the AVX-512 kernel one product per thread-pool unit, with its backward on the same kernel.
pub fn bmm(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let r = a.rank();
    let same_lead = r >= 3 && b.rank() == r && a.dims()[..r - 2] == b.dims()[..r - 2];
    if !a.device().is_cpu() || !same_lead || !gemm::available() {
        return Ok(a.matmul(b)?);
    }
    Ok(a.apply_op2(b, BmmOp)?)
}
