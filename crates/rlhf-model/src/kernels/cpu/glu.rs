//! The gated MLP's element-wise step, silu(gate) · up, fused with its backward pass.
//!
//! Composed from candle ops, the step is two full-size temporaries forward (silu, then the
//! product) and, backward, the product's two gradients plus silu's own chain of element-wise
//! ops, each with its zero-filled gradient buffer: about ten passes over an
//! (tokens × intermediate) tensor per layer. Fused, the forward is one pass and the backward
//! one pass that writes both gradients into one allocation.

use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};

#[cfg(target_arch = "x86_64")]
use super::fused::use_avx2;
use super::fused::{exp_f32, par_units, simd_fn, OutBuf};
use crate::Result;

type CResult<T> = candle_core::Result<T>;

/// silu(gate) · up (Llama's, Mistral's and Qwen2's MLP), differentiable in both inputs;
/// `None` unless both are f32 on the CPU and of one shape.
// gate, up: (..., n) -> (..., n)
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Option<Tensor>> {
    let fusable = gate.device().is_cpu()
        && gate.dtype() == candle_core::DType::F32
        && up.dtype() == candle_core::DType::F32
        && gate.dims() == up.dims();
    if !fusable {
        return Ok(None);
    }
    Ok(Some(
        gate.contiguous()?.apply_op2(&up.contiguous()?, SiluMul)?,
    ))
}

fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> CResult<&'a [f32]> {
    super::attn::data(s, l, what)
}

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp_f32(-x))
}

simd_fn! {
    fn silu_mul_range(g: &[f32], u: &[f32], y: &mut [f32]) {
        for ((y, g), u) in y.iter_mut().zip(g).zip(u) {
            *y = g * sigmoid(*g) * u;
        }
    }
}

// y = g σ(g) u:  du = dy g σ(g),  dg = dy u σ(g) (1 + g (1 − σ(g)))
simd_fn! {
    fn silu_mul_bwd_range(g: &[f32], u: &[f32], dy: &[f32], dg: &mut [f32], du: &mut [f32]) {
        for ((((dg, du), g), u), dy) in dg.iter_mut().zip(du.iter_mut()).zip(g).zip(u).zip(dy) {
            let s = sigmoid(*g);
            *du = dy * g * s;
            *dg = dy * u * s * (1.0 + g * (1.0 - s));
        }
    }
}

struct SiluMul;

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "fused-silu-mul"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (g, u) = (
            contiguous_f32(gs, gl, "gate")?,
            contiguous_f32(us, ul, "up")?,
        );
        if g.len() != u.len() {
            bail!("fused silu·up: {} and {} elements", g.len(), u.len())
        }
        Ok((CpuStorage::F32(silu_mul_vec(g, u)), gl.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        // Both gradients in one (2, ...) tensor; each is a view of its half.
        let both = gate.apply_op3_no_bwd(up, &dy.contiguous()?, &SiluMulBwd)?;
        let dg = gate.track_op().then(|| both.get(0)).transpose()?;
        let du = up.track_op().then(|| both.get(1)).transpose()?;
        Ok((dg, du))
    }
}

/// (silu(gate)·up)·Wᵀ, the Llama MLP's down projection fused with its activation, for a W
/// without an adapter: silu(gate)·up, as wide as the MLP, is never kept for the backward pass
/// (recomputed there instead, one element-wise pass) — the widest activation of the layer.
struct SiluMulLinear;

impl CustomOp3 for SiluMulLinear {
    fn name(&self) -> &'static str {
        "fused-silu-mul-linear"
    }

    // gate, up: (m, i), w: (n, i) -> (m, n)
    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (g, u) = (
            contiguous_f32(gs, gl, "gate")?,
            contiguous_f32(us, ul, "up")?,
        );
        let w = contiguous_f32(ws, wl, "down_proj weight")?;
        let (m, i) = (gl.dims()[0], gl.dims()[1]);
        let n = wl.dims()[0];
        if gl.dims() != ul.dims() || wl.dims() != [n, i] {
            bail!(
                "fused silu·up·Wᵀ: gate {:?}, up {:?}, W {:?}",
                gl.dims(),
                ul.dims(),
                wl.dims()
            )
        }
        let h = silu_mul_vec(g, u);
        let hm = super::gemm::MatRef::new(&h, m, i, i, 1);
        let wt = super::gemm::MatRef::new(w, n, i, i, 1).t();
        let y = super::gemm::matmul(hm, wt)
            .ok_or_else(|| candle_core::Error::Msg("fused silu·up·Wᵀ needs AVX-512F".into()))?;
        Ok((CpuStorage::F32(y), Shape::from((m, n))))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let dh = super::frozen::matmul(&dy, w)?;
        let both = gate.apply_op3_no_bwd(up, &dh, &SiluMulBwd)?;
        let dg = gate.track_op().then(|| both.get(0)).transpose()?;
        let du = up.track_op().then(|| both.get(1)).transpose()?;
        let dw = if w.track_op() {
            let h = gate.apply_op2_no_bwd(up, &SiluMul)?;
            Some(super::frozen::matmul(&dy.t()?, &h)?)
        } else {
            None
        };
        Ok((dg, du, dw))
    }
}

/// residual + (silu(gate)·up)·Wᵀ for a frozen W (held by the op): the MLP's down projection
/// and the residual add after it as one op, so neither silu(gate)·up nor the projection's
/// output is kept for the backward pass.
struct SiluMulLinearResidual {
    w: Tensor,
}

impl CustomOp3 for SiluMulLinearResidual {
    fn name(&self) -> &'static str {
        "fused-silu-mul-linear-residual"
    }

    // gate, up: (m, i), residual: (m, n) -> (m, n)
    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
        rs: &CpuStorage,
        rl: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (ws, wl) = self.w.storage_and_layout();
        let candle_core::Storage::Cpu(ws) = &*ws else {
            bail!("fused silu·up·Wᵀ: W is not on the CPU")
        };
        let (y, shape) = SiluMulLinear.cpu_fwd(gs, gl, us, ul, ws, wl)?;
        let CpuStorage::F32(mut y) = y else {
            unreachable!("f32 in, f32 out")
        };
        let r = contiguous_f32(rs, rl, "residual")?;
        if rl.dims() != shape.dims() {
            bail!(
                "fused silu·up·Wᵀ: residual {:?}, output {shape:?}",
                rl.dims()
            )
        }
        add_into(&mut y, r);
        Ok((CpuStorage::F32(y), shape))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        residual: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dg, du, _) = SiluMulLinear.bwd(gate, up, &self.w, y, dy)?;
        Ok((dg, du, residual.track_op().then(|| dy.clone())))
    }
}

simd_fn! {
    fn add_range(y: &mut [f32], r: &[f32]) {
        for (y, r) in y.iter_mut().zip(r) {
            *y += r;
        }
    }
}

/// y += r, over the pool.
pub(crate) fn add_into(y: &mut [f32], r: &[f32]) {
    let out = super::fused::Out::of(y);
    par_units(y.len(), 1, |_, range| {
        // SAFETY: units cover disjoint ranges of y.
        let dst = unsafe { out.row(range.start, range.len()) };
        add_range(dst, &r[range]);
    });
}

/// residual + (silu(gate)·up)·Wᵀ as one op for a frozen W; `None` where it cannot run (a
/// trainable W among the reasons), and the caller composes it.
// gate, up: (m, i), w: (n, i), residual: (m, n) -> (m, n)
pub fn silu_mul_linear_residual(
    gate: &Tensor,
    up: &Tensor,
    w: &Tensor,
    residual: &Tensor,
) -> Result<Option<Tensor>> {
    let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == candle_core::DType::F32;
    if !crate::kernels::cpu::gemm::available()
        || w.track_op()
        || ![gate, up, w, residual].into_iter().all(f32_cpu)
        || gate.rank() != 2
        || w.rank() != 2
        || gate.dims() != up.dims()
        || w.dim(1)? != gate.dim(1)?
        || residual.dims() != [gate.dim(0)?, w.dim(0)?]
    {
        return Ok(None);
    }
    let op = SiluMulLinearResidual { w: w.contiguous()? };
    Ok(Some(gate.contiguous()?.apply_op3(
        &up.contiguous()?,
        &residual.contiguous()?,
        op,
    )?))
}

/// silu(gate)·up into a new buffer.
pub(crate) fn silu_mul_vec(g: &[f32], u: &[f32]) -> Vec<f32> {
    let len = g.len();
    let mut buf = OutBuf::new(len);
    let out = buf.ptr();
    // The tensors as `len` rows of one element: fused.rs's units and thread pool.
    par_units(len, 1, |_, r| {
        // SAFETY: units cover disjoint ranges of the output.
        let dst = unsafe { out.row(r.start, r.len()) };
        silu_mul_range(&g[r.clone()], &u[r], dst);
    });
    // SAFETY: the units covered every element.
    unsafe { buf.finish(len) }
}

/// (silu(gate)·up)·Wᵀ as one op (see [`SiluMulLinear`]); `None` where it cannot run (not f32
/// on the CPU, no AVX-512F, shapes other than (m, i) · (n, i)ᵀ), and the caller composes it.
// gate, up: (m, i), w: (n, i) -> (m, n)
pub fn silu_mul_linear(gate: &Tensor, up: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == candle_core::DType::F32;
    if !crate::kernels::cpu::gemm::available()
        || ![gate, up, w].into_iter().all(f32_cpu)
        || gate.rank() != 2
        || w.rank() != 2
        || gate.dims() != up.dims()
        || w.dim(1)? != gate.dim(1)?
    {
        return Ok(None);
    }
    Ok(Some(gate.contiguous()?.apply_op3(
        &up.contiguous()?,
        &w.contiguous()?,
        SiluMulLinear,
    )?))
}

/// The gradients of silu(gate)·up for the output gradient `dy`: (d gate, d up).
pub(crate) fn silu_mul_bwd_vec(g: &[f32], u: &[f32], dy: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let len = g.len();
    assert!(u.len() == len && dy.len() == len);
    let (mut dg, mut du) = (OutBuf::new(len), OutBuf::new(len));
    let (og, ou) = (dg.ptr(), du.ptr());
    par_units(len, 1, |_, r| {
        // SAFETY: units cover disjoint ranges of both outputs.
        let (dg, du) = unsafe { (og.row(r.start, r.len()), ou.row(r.start, r.len())) };
        silu_mul_bwd_range(&g[r.clone()], &u[r.clone()], &dy[r], dg, du);
    });
    // SAFETY: the units covered every element of both.
    unsafe { (dg.finish(len), du.finish(len)) }
}

struct SiluMulBwd;

impl CustomOp3 for SiluMulBwd {
    fn name(&self) -> &'static str {
        "fused-silu-mul-bwd"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
        ds: &CpuStorage,
        dl: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let g = contiguous_f32(gs, gl, "gate")?;
        let u = contiguous_f32(us, ul, "up")?;
        let dy = contiguous_f32(ds, dl, "gradient")?;
        if g.len() != u.len() || g.len() != dy.len() {
            bail!("fused silu·up bwd: element counts differ")
        }
        let len = g.len();
        let mut buf = OutBuf::new(2 * len);
        let out = buf.ptr();
        par_units(len, 1, |_, r| {
            // SAFETY: the two halves' ranges are disjoint and inside the buffer.
            let dg = unsafe { out.row(r.start, r.len()) };
            let du = unsafe { out.row(len + r.start, r.len()) };
            silu_mul_bwd_range(&g[r.clone()], &u[r.clone()], &dy[r], dg, du);
        });
        // SAFETY: every element of both halves was written.
        let both = unsafe { buf.finish(2 * len) };
        let mut dims = vec![2];
        dims.extend_from_slice(gl.dims());
        Ok((CpuStorage::F32(both), Shape::from(dims)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn matches_the_composed_op_in_value_and_gradient() -> Result<()> {
        let dev = Device::Cpu;
        // 3 × 50,000 elements: several pool chunks, and gate values far into both tails.
        let g = Var::from_tensor(&(Tensor::randn(0f32, 4.0, (3, 50_000), &dev)?))?;
        let u = Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 50_000), &dev)?)?;
        let w = Tensor::randn(0f32, 1.0, (3, 50_000), &dev)?;
        let fused = silu_mul(g.as_tensor(), u.as_tensor())?.expect("the kernel runs");
        let composed = crate::kernels::generic::silu_mul(g.as_tensor(), u.as_tensor())?;
        let diff = (&fused - &composed)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "forward differs by {diff}");
        let gf = (fused * &w)?.sum_all()?.backward()?;
        let gc = (composed * &w)?.sum_all()?.backward()?;
        for v in [&g, &u] {
            let (a, b) = (gf.get(v).expect("grad"), gc.get(v).expect("grad"));
            let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
            let scale = b.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff <= 1e-5 * scale.max(1.0), "gradient differs by {diff}");
        }
        Ok(())
    }

    /// residual + (silu(gate)·up)·Wᵀ with a frozen W against the composed sum: the output
    /// and the gradients of gate, up and the residual.
    #[test]
    fn down_projection_with_residual_matches_the_composed_sum() -> Result<()> {
        if !crate::kernels::cpu::gemm::available() {
            eprintln!("skipped: no AVX-512F, the MLP composes the sum from candle ops");
            return Ok(());
        }
        let dev = Device::Cpu;
        let g = Var::from_tensor(&Tensor::randn(0f32, 2.0, (23, 64), &dev)?)?;
        let u = Var::from_tensor(&Tensor::randn(0f32, 1.0, (23, 64), &dev)?)?;
        let w = Tensor::randn(0f32, 0.1, (40, 64), &dev)?;
        let r = Var::from_tensor(&Tensor::randn(0f32, 1.0, (23, 40), &dev)?)?;
        let probe = Tensor::randn(0f32, 1.0, (23, 40), &dev)?;
        let fused = silu_mul_linear_residual(&g, &u, &w, &r)?.expect("fusable");
        let composed =
            (r.as_tensor() + crate::kernels::generic::silu_mul(&g, &u)?.matmul(&w.t()?)?)?;
        let diff = |a: &Tensor, b: &Tensor| -> Result<f32> {
            Ok((a - b)?.abs()?.max_all()?.to_scalar::<f32>()?)
        };
        assert!(diff(&fused, &composed)? < 1e-4);
        let gf = (fused * &probe)?.sum_all()?.backward()?;
        let gc = (composed * &probe)?.sum_all()?.backward()?;
        for (name, v) in [("gate", &g), ("up", &u), ("residual", &r)] {
            let d = diff(
                gf.get(v).expect("fused grad"),
                gc.get(v).expect("composed grad"),
            )?;
            assert!(d < 1e-3, "d{name} differs by {d}");
        }
        // A trainable W is left to the composed path (its gradient needs W as an argument).
        let wv = Var::from_tensor(&w)?;
        assert!(silu_mul_linear_residual(&g, &u, &wv, &r)?.is_none());
        Ok(())
    }

    /// The fused down projection against silu(gate)·up followed by x·Wᵀ: the output and the
    /// gradients of gate, up and (trainable) W.
    #[test]
    fn down_projection_matches_the_composed_layer() -> Result<()> {
        if !crate::kernels::cpu::gemm::available() {
            eprintln!("skipped: no AVX-512F, the MLP composes the product from candle ops");
            return Ok(());
        }
        let dev = Device::Cpu;
        let g = Var::from_tensor(&Tensor::randn(0f32, 2.0, (37, 96), &dev)?)?;
        let u = Var::from_tensor(&Tensor::randn(0f32, 1.0, (37, 96), &dev)?)?;
        let w = Var::from_tensor(&Tensor::randn(0f32, 0.1, (50, 96), &dev)?)?;
        let probe = Tensor::randn(0f32, 1.0, (37, 50), &dev)?;
        let fused = silu_mul_linear(&g, &u, &w)?.expect("fusable");
        let composed = crate::kernels::generic::silu_mul(&g, &u)?.matmul(&w.t()?)?;
        let diff = |a: &Tensor, b: &Tensor| -> Result<f32> {
            Ok((a - b)?.abs()?.max_all()?.to_scalar::<f32>()?)
        };
        assert!(diff(&fused, &composed)? < 1e-4);
        let gf = (fused * &probe)?.sum_all()?.backward()?;
        let gc = (composed * &probe)?.sum_all()?.backward()?;
        for (name, v) in [("gate", &g), ("up", &u), ("W", &w)] {
            let d = diff(
                gf.get(v).expect("fused grad"),
                gc.get(v).expect("composed grad"),
            )?;
            assert!(d < 1e-3, "d{name} differs by {d}");
        }
        Ok(())
    }
}
