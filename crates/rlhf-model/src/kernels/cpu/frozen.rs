//! Ops that skip the gradient of frozen weights.
//!
//! candle's backward pass computes the gradient of *every* input of a tracked op, tracked or
//! not: `x.matmul(w)` with a frozen `w` still pays for `xᵀ·grad` and a zero-filled buffer for
//! it, and an embedding lookup into a frozen table still scatters into a table-sized buffer.
//! With LoRA nearly every weight is frozen, so that is most of the backward pass. The ops here
//! compute the forward with candle's own kernels and, in their backward, return a gradient for
//! a weight only when the weight is tracked (a `Var`, or the result of tracked ops).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};

use super::gemm;
use crate::kernels::{autocast_bf16, round_bf16};
use crate::Result;

/// Up to this many rows, `LinearOp` computes (W·xᵀ)ᵀ instead of x·Wᵀ (on CPUs without the
/// AVX-512 kernel, which handles few rows itself).
const SKINNY_ROWS: usize = 64;

/// Under bf16 autocast ([`crate::kernels::Autocast`]) on a CPU without the AVX-512 kernel (which
/// rounds as it packs): a contiguous copy of an f32 operand with its values rounded to bf16,
/// for candle's own matmul. `None` otherwise (the operand is used as it is).
fn autocast_copy(s: &CpuStorage, l: &Layout) -> Option<(CpuStorage, Layout)> {
    if !autocast_bf16() || gemm::available() {
        return None;
    }
    let CpuStorage::F32(v) = s else { return None };
    let data: Vec<f32> = match l.contiguous_offsets() {
        Some((a, b)) => v[a..b].iter().map(|&x| round_bf16(x)).collect(),
        None => {
            // Row-major walk over the view's indices.
            let (dims, stride) = (l.dims(), l.stride());
            let n: usize = dims.iter().product();
            let mut idx = vec![0usize; dims.len()];
            let mut out = Vec::with_capacity(n);
            for _ in 0..n {
                let at: usize =
                    l.start_offset() + idx.iter().zip(stride).map(|(i, s)| i * s).sum::<usize>();
                out.push(round_bf16(v[at]));
                for d in (0..dims.len()).rev() {
                    idx[d] += 1;
                    if idx[d] < dims[d] {
                        break;
                    }
                    idx[d] = 0;
                }
            }
            out
        }
    };
    Some((CpuStorage::F32(data), Layout::contiguous(l.shape())))
}

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
        let (rx, rw) = (autocast_copy(x, xl), autocast_copy(w, wl));
        let (x, xl) = rx.as_ref().map_or((x, xl), |(s, l)| (s, l));
        let (w, wl) = rw.as_ref().map_or((w, wl), |(s, l)| (s, l));
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
pub fn linear(x: &Tensor, w: &Tensor, conv1d: bool) -> Result<Option<Tensor>> {
    if !x.device().is_cpu() || !w.device().is_cpu() {
        return Ok(None);
    }
    Ok(Some(x.contiguous()?.apply_op2(w, LinearOp { conv1d })?))
}

/// `x·Wᵀ` for a frozen bf16 W `(out, in)` kept for decoding, in f32
/// ([`gemm::matmul_wt_bf16`]); no gradient (the result is a new leaf); `None` off the CPU.
// x: (m, in) f32, w: (out, in) bf16 -> (m, out) f32
pub fn linear_bf16(x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    if !x.device().is_cpu() || !w.device().is_cpu() {
        return Ok(None);
    }
    let (m, k) = x.dims2()?;
    let (n, kw) = w.dims2()?;
    if k != kw || w.dtype() != DType::BF16 {
        return Err(crate::Error::Config(format!(
            "linear_bf16: x {:?} against a {:?} weight {:?}",
            x.dims(),
            w.dtype(),
            w.dims()
        )));
    }
    let x = x.to_dtype(DType::F32)?.contiguous()?;
    let w = w.contiguous()?;
    let y = {
        let (xs, xl) = x.storage_and_layout();
        let (ws, wl) = w.storage_and_layout();
        match (&*xs, &*ws) {
            (
                candle_core::Storage::Cpu(CpuStorage::F32(xd)),
                candle_core::Storage::Cpu(CpuStorage::BF16(wd)),
            ) => {
                let xd = &xd[xl.start_offset()..xl.start_offset() + m * k];
                let wd = &wd[wl.start_offset()..wl.start_offset() + n * k];
                gemm::matmul_wt_bf16(gemm::MatRef::new(xd, m, k, k, 1), wd, n, k)
            }
            _ => return Ok(None),
        }
    };
    Ok(Some(Tensor::from_vec(y, (m, n), x.device())?))
}

/// y = x·Wᵀ + scale·(x·Aᵀ)·Bᵀ, a LoRA-adapted linear layer with a frozen W, as one op: the
/// composed form is six graph nodes, four of them holding an output-sized tensor until the
/// backward pass, and its rank-r products go to candle's matmul. The backward pass recomputes
/// x·Aᵀ (r columns) instead of keeping it.
struct LoraLinearOp {
    /// The frozen base weight, (out, in), or (in, out) for Conv1D.
    w: Tensor,
    conv1d: bool,
    scale: f32,
}

/// Shapes of one LoRA product.
#[derive(Clone, Copy)]
struct LoraDims {
    m: usize,
    k: usize,
    n: usize,
    r: usize,
}

impl LoraLinearOp {
    /// W as an (out, in) matrix, whichever way it is stored.
    fn w_mat<'a>(&self, w: &'a [f32], d: LoraDims) -> gemm::MatRef<'a> {
        if self.conv1d {
            gemm::MatRef::new(w, d.n, d.k, 1, d.n)
        } else {
            gemm::MatRef::new(w, d.n, d.k, d.k, 1)
        }
    }

    fn dims(&self, xl: &Layout, al: &Layout, bl: &Layout) -> candle_core::Result<LoraDims> {
        let (m, k) = (xl.dims()[0], xl.dims()[1]);
        let (r, ak) = (al.dims()[0], al.dims()[1]);
        let (n, br) = (bl.dims()[0], bl.dims()[1]);
        let wd = self.w.dims();
        let w_ok = if self.conv1d {
            wd == [k, n]
        } else {
            wd == [n, k]
        };
        if ak != k || br != r || !w_ok {
            candle_core::bail!(
                "lora linear: x {:?}, A {:?}, B {:?} and W {wd:?} do not fit",
                xl.dims(),
                al.dims(),
                bl.dims()
            )
        }
        Ok(LoraDims { m, k, n, r })
    }
}

impl candle_core::CustomOp3 for LoraLinearOp {
    fn name(&self) -> &'static str {
        "lora-linear"
    }

    // x: (m, in), a: (r, in), b: (out, r) -> (m, out)
    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        as_: &CpuStorage,
        al: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        use super::attn::{data, with_data};
        let dm = self.dims(xl, al, bl)?;
        let (x, a, b) = (
            data(xs, xl, "x")?,
            data(as_, al, "lora_A")?,
            data(bs, bl, "lora_B")?,
        );
        let xm = gemm::MatRef::new(x, dm.m, dm.k, dm.k, 1);
        let am = gemm::MatRef::new(a, dm.r, dm.k, dm.k, 1);
        let bm = gemm::MatRef::new(b, dm.n, dm.r, dm.r, 1);
        let mut y = with_data(&self.w, "W", |w| {
            gemm::matmul(xm, self.w_mat(w, dm).t())
                .ok_or_else(|| candle_core::Error::Msg("lora linear needs AVX-512F".into()))
        })?;
        let mut xa = gemm::matmul(xm, am.t()).expect("AVX-512F checked above");
        xa.iter_mut().for_each(|v| *v *= self.scale);
        let xam = gemm::MatRef::new(&xa, dm.m, dm.r, dm.r, 1);
        // SAFETY: y holds m rows of n; one thread.
        unsafe { gemm::matmul_into(xam, bm.t(), y.as_mut_ptr(), dm.n, true) };
        Ok((CpuStorage::F32(y), Shape::from((dm.m, dm.n))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        use super::attn::with_data;
        let dy = dy.contiguous()?;
        let dm = self.dims(x.layout(), a.layout(), b.layout())?;
        let want_dx = x.track_op();
        let (dx, da, db) = with_data(x, "x", |x| {
            with_data(a, "lora_A", |a| {
                with_data(b, "lora_B", |b| {
                    with_data(&dy, "grad", |g| {
                        with_data(&self.w, "W", |w| {
                            Ok(self.backward(dm, x, a, b, g, w, want_dx))
                        })
                    })
                })
            })
        })?;
        let dev = x.device();
        Ok((
            dx.map(|v| Tensor::from_vec(v, (dm.m, dm.k), dev))
                .transpose()?,
            Some(Tensor::from_vec(da, (dm.r, dm.k), dev)?),
            Some(Tensor::from_vec(db, (dm.n, dm.r), dev)?),
        ))
    }
}

impl LoraLinearOp {
    // -> (dx (m, k) when wanted, dA (r, k), dB (n, r))
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        dm: LoraDims,
        x: &[f32],
        a: &[f32],
        b: &[f32],
        g: &[f32],
        w: &[f32],
        want_dx: bool,
    ) -> (Option<Vec<f32>>, Vec<f32>, Vec<f32>) {
        let LoraDims { m, k, n, r } = dm;
        let xm = gemm::MatRef::new(x, m, k, k, 1);
        let am = gemm::MatRef::new(a, r, k, k, 1);
        let bm = gemm::MatRef::new(b, n, r, r, 1);
        let gm = gemm::MatRef::new(g, m, n, n, 1);
        let (gb, da, db) = lora_grads(xm, am, bm, gm, self.scale);
        let gbm = gemm::MatRef::new(&gb, m, r, r, 1);
        let product = |p: gemm::MatRef<'_>, q: gemm::MatRef<'_>| {
            gemm::matmul(p, q).expect("the forward pass ran on the AVX-512 kernel")
        };
        // dx = dy·W + (s·dy·B)·A
        let dx = want_dx.then(|| {
            let mut dx = product(gm, self.w_mat(w, dm));
            // SAFETY: dx holds m rows of k; one thread.
            unsafe { gemm::matmul_into(gbm, am, dx.as_mut_ptr(), k, true) };
            dx
        });
        (dx, da, db)
    }
}

/// The gradients of a LoRA update `s·(x·Aᵀ)·Bᵀ` for its output gradient `g` (m, n), with x
/// (m, k), A (r, k) and B (n, r): `(s·g·B (m, r), dA (r, k), dB (n, r))`. The first is what
/// the adapter adds to x's gradient through A (`+= (s·g·B)·A`). Needs AVX-512F.
pub(crate) fn lora_grads(
    x: gemm::MatRef<'_>,
    a: gemm::MatRef<'_>,
    b: gemm::MatRef<'_>,
    g: gemm::MatRef<'_>,
    scale: f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let product =
        |p: gemm::MatRef<'_>, q: gemm::MatRef<'_>| gemm::matmul(p, q).expect("AVX-512F checked");
    let (m, r) = (x.rows(), a.rows());
    // s·x·Aᵀ and s·g·B, (m, r) each.
    let mut xa = product(x, a.t());
    let mut gb = product(g, b);
    xa.iter_mut().chain(gb.iter_mut()).for_each(|v| *v *= scale);
    // dA = (s·g·B)ᵀ·x, dB = gᵀ·(s·x·Aᵀ)
    let da = product(gemm::MatRef::new(&gb, m, r, r, 1).t(), x);
    let db = product(g.t(), gemm::MatRef::new(&xa, m, r, r, 1));
    (gb, da, db)
}

/// A LoRA-adapted linear layer, `x·Wᵀ + scale·(x·Aᵀ)·Bᵀ` (`x·W + …` for Conv1D), as one op
/// with its own backward; `None` where it cannot run (no AVX-512F, not f32 on the CPU, or a W
/// that carries a gradient), and the caller composes it from candle ops.
// x: (m, in), w: (out, in) | (in, out), a: (r, in), b: (out, r) -> (m, out)
pub fn lora_linear(
    x: &Tensor,
    w: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    conv1d: bool,
) -> Result<Option<Tensor>> {
    let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == candle_core::DType::F32;
    if !gemm::available()
        || w.track_op()
        || ![x, w, a, b].into_iter().all(f32_cpu)
        || x.rank() != 2
        || w.rank() != 2
        || a.rank() != 2
        || b.rank() != 2
    {
        return Ok(None);
    }
    let op = LoraLinearOp {
        w: w.detach().contiguous()?,
        conv1d,
        scale: scale as f32,
    };
    Ok(Some(x.contiguous()?.apply_op3(
        &a.contiguous()?,
        &b.contiguous()?,
        op,
    )?))
}

/// residual + x·Wᵀ, a linear layer and the residual add after it as one op, so the layer's
/// output is not kept beside the sum for the backward pass.
struct LinearResidualOp;

impl candle_core::CustomOp3 for LinearResidualOp {
    fn name(&self) -> &'static str {
        "linear-residual"
    }

    // x: (m, k), w: (n, k), residual: (m, n) -> (m, n)
    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        rs: &CpuStorage,
        rl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, n) = (xl.dims()[0], wl.dims()[0]);
        if rl.dims() != [m, n] {
            candle_core::bail!("linear + residual: residual {:?} for ({m}, {n})", rl.dims())
        }
        let Some(CpuStorage::F32(mut y)) = avx512_matmul(xs, xl, ws, &wl.transpose(0, 1)?) else {
            candle_core::bail!("linear + residual needs AVX-512F and f32")
        };
        let r = super::attn::data(rs, rl, "residual")?;
        super::glu::add_into(&mut y, r);
        Ok((CpuStorage::F32(y), Shape::from((m, n))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        residual: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dx = x.track_op().then(|| matmul(dy, w)).transpose()?;
        let dw = w.track_op().then(|| matmul(&dy.t()?, x)).transpose()?;
        Ok((dx, dw, residual.track_op().then(|| dy.clone())))
    }
}

/// `residual + x·Wᵀ` as one op (nn.Linear layout, no bias); `None` where it cannot run, and the
/// caller composes it.
// x: (m, in), w: (out, in), residual: (m, out) -> (m, out)
pub fn linear_residual(x: &Tensor, w: &Tensor, residual: &Tensor) -> Result<Option<Tensor>> {
    let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == candle_core::DType::F32;
    if !gemm::available()
        || ![x, w, residual].into_iter().all(f32_cpu)
        || x.rank() != 2
        || w.rank() != 2
        || w.dim(1)? != x.dim(1)?
        || residual.dims() != [x.dim(0)?, w.dim(0)?]
    {
        return Ok(None);
    }
    Ok(Some(x.contiguous()?.apply_op3(
        w,
        &residual.contiguous()?,
        LinearResidualOp,
    )?))
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
        let (ra, rb) = (autocast_copy(a, al), autocast_copy(b, bl));
        let (a, al) = ra.as_ref().map_or((a, al), |(s, l)| (s, l));
        let (b, bl) = rb.as_ref().map_or((b, bl), |(s, l)| (s, l));
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
/// `None` off the CPU and for a trainable table (candle's own lookup gives it its gradient).
pub fn embedding(table: &Tensor, ids: &Tensor) -> Result<Option<Tensor>> {
    if !table.device().is_cpu() || table.track_op() {
        return Ok(None);
    }
    Ok(Some(table.apply_op2(&ids.contiguous()?, EmbeddingOp)?))
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
        let (ra, rb) = (autocast_copy(a, al), autocast_copy(b, bl));
        let (a, al) = ra.as_ref().map_or((a, al), |(s, l)| (s, l));
        let (b, bl) = rb.as_ref().map_or((b, bl), |(s, l)| (s, l));
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
pub fn bmm(a: &Tensor, b: &Tensor) -> Result<Option<Tensor>> {
    let r = a.rank();
    let same_lead = r >= 3 && b.rank() == r && a.dims()[..r - 2] == b.dims()[..r - 2];
    if !a.device().is_cpu() || !same_lead || !gemm::available() {
        return Ok(None);
    }
    Ok(Some(a.apply_op2(b, BmmOp)?))
}

#[cfg(test)]
mod lora_tests {
    use super::*;
    use crate::test_util::{max_diff, values};
    use candle_core::{Device, Var};

    /// The fused op against the composed x·Wᵀ + s·(x·Aᵀ)·Bᵀ: outputs and the gradients of x,
    /// A and B (B non-zero, so every term is exercised), in both weight layouts.
    #[test]
    fn lora_linear_matches_the_composed_layer() {
        if !gemm::available() {
            eprintln!("skipped: no AVX-512F, Linear composes the adapter from candle ops");
            return;
        }
        let dev = Device::Cpu;
        let (m, k, n, r, s) = (37, 48, 70, 8, 2.0);
        for conv1d in [false, true] {
            let x = Var::from_vec(values(m * k, 1), (m, k), &dev).unwrap();
            let wshape = if conv1d { (k, n) } else { (n, k) };
            let w = Tensor::from_vec(values(n * k, 2), wshape, &dev).unwrap();
            let a = Var::from_vec(values(r * k, 3), (r, k), &dev).unwrap();
            let b = Var::from_vec(values(n * r, 4), (n, r), &dev).unwrap();
            let probe = Tensor::from_vec(values(m * n, 5), (m, n), &dev).unwrap();
            let fused = lora_linear(&x, &w, &a, &b, s, conv1d)
                .unwrap()
                .expect("fused");
            let wt = if conv1d { w.clone() } else { w.t().unwrap() };
            let delta = x
                .matmul(&a.t().unwrap())
                .unwrap()
                .matmul(&b.t().unwrap())
                .unwrap();
            let composed = (x.matmul(&wt).unwrap() + (delta * s).unwrap()).unwrap();
            let d = max_diff(&fused, &composed);
            assert!(d < 1e-4, "conv1d={conv1d}: outputs differ by {d}");
            let gf = (fused * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let gc = (composed * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for (name, v) in [("x", &x), ("A", &a), ("B", &b)] {
                let d = max_diff(gf.get(v).unwrap(), gc.get(v).unwrap());
                assert!(d < 1e-3, "conv1d={conv1d}: d{name} differs by {d}");
            }
        }
    }

    /// residual + x·Wᵀ as one op against the composed sum, with W trainable: the output and
    /// the gradients of x, W and the residual.
    #[test]
    fn linear_residual_matches_the_composed_sum() {
        if !gemm::available() {
            eprintln!("skipped: no AVX-512F, Linear composes the sum from candle ops");
            return;
        }
        let dev = Device::Cpu;
        let (m, k, n) = (29, 40, 53);
        let x = Var::from_vec(values(m * k, 1), (m, k), &dev).unwrap();
        let w = Var::from_vec(values(n * k, 2), (n, k), &dev).unwrap();
        let r = Var::from_vec(values(m * n, 3), (m, n), &dev).unwrap();
        let probe = Tensor::from_vec(values(m * n, 4), (m, n), &dev).unwrap();
        let fused = linear_residual(&x, &w, &r).unwrap().expect("fused");
        let composed = (r.as_tensor() + x.matmul(&w.t().unwrap()).unwrap()).unwrap();
        assert!(max_diff(&fused, &composed) < 1e-4);
        let gf = (fused * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gc = (composed * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (name, v) in [("x", &x), ("W", &w), ("residual", &r)] {
            let d = max_diff(gf.get(v).unwrap(), gc.get(v).unwrap());
            assert!(d < 1e-3, "d{name} differs by {d}");
        }
    }

    #[test]
    fn a_trainable_base_weight_is_left_to_the_composed_layer() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((2, 4), candle_core::DType::F32, &dev).unwrap();
        let w = Var::zeros((3, 4), candle_core::DType::F32, &dev).unwrap();
        let a = Tensor::zeros((2, 4), candle_core::DType::F32, &dev).unwrap();
        let b = Tensor::zeros((3, 2), candle_core::DType::F32, &dev).unwrap();
        assert!(lora_linear(&x, &w, &a, &b, 1.0, false).unwrap().is_none());
    }
}
