//! The gated MLP's element-wise step, silu(gate) · up, fused with its backward pass.
//!
//! Composed from candle ops, the step is two full-size temporaries forward (silu, then the
//! product) and, backward, the product's two gradients plus silu's own chain of element-wise
//! ops, each with its zero-filled gradient buffer: about ten passes over an
//! (tokens × intermediate) tensor per layer. Fused, the forward is one pass and the backward
//! one pass that writes both gradients into one allocation.

use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};

#[cfg(target_arch = "x86_64")]
use crate::fused::use_avx2;
use crate::fused::{exp_f32, par_units, simd_fn, OutBuf};
use crate::Result;

type CResult<T> = candle_core::Result<T>;

/// silu(gate) · up (Llama's, Mistral's and Qwen2's MLP), differentiable in both inputs.
// gate, up: (..., n) -> (..., n)
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let fusable = gate.device().is_cpu()
        && gate.dtype() == candle_core::DType::F32
        && up.dtype() == candle_core::DType::F32
        && gate.dims() == up.dims();
    if !fusable {
        return silu_mul_composed(gate, up);
    }
    Ok(gate.contiguous()?.apply_op2(&up.contiguous()?, SiluMul)?)
}

/// The composed reference: candle's silu and product.
pub fn silu_mul_composed(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    Ok((gate.silu()? * up)?)
}

fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> CResult<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        bail!("fused silu·up: {what} is not f32")
    };
    let Some((a, b)) = l.contiguous_offsets() else {
        bail!("fused silu·up: {what} is not contiguous")
    };
    Ok(&v[a..b])
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
        let len = g.len();
        let mut buf = OutBuf::new(len);
        let out = buf.ptr();
        // The tensors as `len` rows of one element: fused.rs's units and thread pool.
        par_units(len, 1, |_, r| {
            // SAFETY: units are disjoint and inside the buffer.
            let dst = unsafe { out.row(r.start, r.len()) };
            silu_mul_range(&g[r.clone()], &u[r], dst);
        });
        // SAFETY: every element was written.
        let y = unsafe { buf.finish(len) };
        Ok((CpuStorage::F32(y), gl.shape().clone()))
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
        let fused = silu_mul(g.as_tensor(), u.as_tensor())?;
        let composed = silu_mul_composed(g.as_tensor(), u.as_tensor())?;
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
}
