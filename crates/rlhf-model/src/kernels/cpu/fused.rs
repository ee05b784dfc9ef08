//! Kernels for the element-wise hot spots, each with a backward pass.
//!
//! Every entry point here has a generic form in [`crate::kernels::generic`], built from ops
//! candle differentiates; tests check values and gradients of the two against each other.
//!
//! The fused versions are candle custom ops (`CustomOp1/2/3`) whose `bwd` is itself a fused
//! custom op, so one forward and one backward each make a single allocation and a few passes
//! over each row while it sits in L1, instead of the 4-8 full-size temporaries of the composed
//! graph. They run on the CPU in f32: f16/bf16 inputs are converted to f32 and back (so the row
//! statistics are f32 too), anything else (f64, other devices, unusual shapes) takes the
//! composed path. Rows are split over candle's own CPU thread pool
//! ([`candle_core::utils::barrier_pool`]), the one its element-wise ops use.
//!
//! Gradients of custom ops are first order only (the backward ops have no backward).

use std::ops::Range;

use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor, D,
};

use crate::Result;

type CResult<T> = candle_core::Result<T>;

// ---------------------------------------------------------------------------------------------
// Entry points: `None` where the kernels do not take the tensors (the dispatch in
// [`crate::kernels`] then runs the generic form)
// ---------------------------------------------------------------------------------------------

/// Softmax over the last dimension.
// x: (..., n) -> (..., n)
pub fn softmax(x: &Tensor) -> Result<Option<Tensor>> {
    if x.rank() == 0 || !x.device().is_cpu() {
        return Ok(None);
    }
    Ok(match x.dtype() {
        DType::F32 => Some(unit_stride(x)?.apply_op1(Softmax)?),
        DType::F16 | DType::BF16 => {
            let y = unit_stride(&x.to_dtype(DType::F32)?)?.apply_op1(Softmax)?;
            Some(y.to_dtype(x.dtype())?)
        }
        _ => None,
    })
}

/// softmax(scores · scale + bias) over the last dimension; `bias` broadcasts to the shape of
/// `scores` and gets no gradient.
// scores: (b, h, tq, tk), bias: broadcastable, e.g. (b, 1, tq, tk) -> (b, h, tq, tk)
pub fn scaled_masked_softmax(scores: &Tensor, bias: &Tensor, scale: f64) -> Result<Option<Tensor>> {
    if scores.rank() == 0
        || !scores.device().is_cpu()
        || scores.dtype() != DType::F32
        || bias.dtype() != DType::F32
        || bias.track_op()
    {
        return Ok(None);
    }
    let bias = unit_stride(&bias.broadcast_as(scores.shape())?)?;
    let op = ScaledMaskedSoftmax {
        scale: scale as f32,
    };
    Ok(Some(unit_stride(scores)?.apply_op2(&bias, op)?))
}

/// RMSNorm: x / sqrt(mean(x²) + eps) * weight.
// x: (..., h), weight: (h) -> (..., h)
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Option<Tensor>> {
    if !fusable(&[x, weight]) || x.rank() == 0 || weight.dims() != [x.dim(D::Minus1)?] {
        return Ok(None);
    }
    let op = RmsNorm { eps: eps as f32 };
    Ok(Some(match x.dtype() {
        DType::F32 => unit_stride(x)?.apply_op2(&unit_stride(weight)?, op)?,
        _ => {
            let (x32, w32) = (x.to_dtype(DType::F32)?, weight.to_dtype(DType::F32)?);
            let y = unit_stride(&x32)?.apply_op2(&unit_stride(&w32)?, op)?;
            y.to_dtype(x.dtype())?
        }
    }))
}

/// LayerNorm with weight and bias.
// x: (..., h), weight/bias: (h) -> (..., h)
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Option<Tensor>> {
    if !fusable(&[x, weight, bias])
        || x.rank() == 0
        || weight.dims() != [x.dim(D::Minus1)?]
        || bias.dims() != weight.dims()
    {
        return Ok(None);
    }
    let op = LayerNorm { eps: eps as f32 };
    Ok(Some(match x.dtype() {
        DType::F32 => unit_stride(x)?.apply_op3(&unit_stride(weight)?, &unit_stride(bias)?, op)?,
        _ => {
            let x32 = unit_stride(&x.to_dtype(DType::F32)?)?;
            let w32 = unit_stride(&weight.to_dtype(DType::F32)?)?;
            let b32 = unit_stride(&bias.to_dtype(DType::F32)?)?;
            x32.apply_op3(&w32, &b32, op)?.to_dtype(x.dtype())?
        }
    }))
}

/// Rotary embedding (HF half-split layout).
///
/// The gradient flows to `x` only; where `cos` or `sin` carry gradients themselves, the kernel
/// declines so that theirs are not dropped.
// x: (b, h, t, d), cos/sin: (b, 1, t, d) -> (b, h, t, d)
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Option<Tensor>> {
    let ok = fusable(&[x, cos, sin])
        && !cos.track_op()
        && !sin.track_op()
        && x.rank() == 4
        && cos.rank() == 4
        && cos.dims() == sin.dims()
        && {
            let (b, _, t, d) = x.dims4()?;
            let (cb, one, ct, cd) = cos.dims4()?;
            (cb == b || cb == 1) && one == 1 && ct == t && cd == d && d % 2 == 0
        };
    if !ok {
        return Ok(None);
    }
    Ok(Some(match x.dtype() {
        DType::F32 => unit_stride(x)?.apply_op3(&unit_stride(cos)?, &unit_stride(sin)?, Rope)?,
        _ => {
            let x32 = unit_stride(&x.to_dtype(DType::F32)?)?;
            let c32 = unit_stride(&cos.to_dtype(DType::F32)?)?;
            let s32 = unit_stride(&sin.to_dtype(DType::F32)?)?;
            x32.apply_op3(&c32, &s32, Rope)?.to_dtype(x.dtype())?
        }
    }))
}

/// Whether the fused kernels can take these tensors: all on the CPU, all f32 or all the same
/// half type (converted to f32 around the kernel).
fn fusable(ts: &[&Tensor]) -> bool {
    let dt = ts[0].dtype();
    matches!(dt, DType::F32 | DType::F16 | DType::BF16)
        && ts.iter().all(|t| t.device().is_cpu() && t.dtype() == dt)
}

/// The kernels read each row (last dimension) as a slice: any layout whose last dimension has
/// stride 1 works as is (a transposed (b, t, h, d) -> (b, h, t, d) view, a broadcast batch);
/// anything else is copied first.
fn unit_stride(t: &Tensor) -> CResult<Tensor> {
    let n = t.dims().last().copied().unwrap_or(1);
    if n <= 1 || t.stride().last() == Some(&1) {
        Ok(t.clone())
    } else {
        t.contiguous()
    }
}

// ---------------------------------------------------------------------------------------------
// Row access and threading
// ---------------------------------------------------------------------------------------------

/// Where each row (the last dimension) of a tensor starts in its storage.
struct Rows {
    /// Row length (the last dimension).
    n: usize,
    /// Number of rows (product of the other dimensions).
    count: usize,
    start: usize,
    /// `None` for a contiguous layout (rows at `start + r * n`).
    starts: Option<Vec<usize>>,
}

impl Rows {
    fn new(layout: &Layout) -> CResult<Self> {
        let dims = layout.dims();
        let strides = layout.stride();
        let Some((&n, outer)) = dims.split_last() else {
            bail!("fused kernels need at least one dimension")
        };
        if n > 1 && strides[dims.len() - 1] != 1 {
            bail!("fused kernels need a unit stride on the last dimension")
        }
        let count: usize = outer.iter().product();
        let start = layout.start_offset();
        if layout.is_contiguous() {
            return Ok(Rows {
                n,
                count,
                start,
                starts: None,
            });
        }
        // Odometer over the outer dimensions, row-major.
        let mut starts = Vec::with_capacity(count);
        let mut idx = vec![0usize; outer.len()];
        let mut off = start;
        for _ in 0..count {
            starts.push(off);
            for d in (0..outer.len()).rev() {
                idx[d] += 1;
                off += strides[d];
                if idx[d] < outer[d] {
                    break;
                }
                off -= strides[d] * outer[d];
                idx[d] = 0;
            }
        }
        Ok(Rows {
            n,
            count,
            start,
            starts: Some(starts),
        })
    }

    #[inline(always)]
    fn row<'a>(&self, data: &'a [f32], r: usize) -> &'a [f32] {
        let s = match &self.starts {
            None => self.start + r * self.n,
            Some(v) => v[r],
        };
        &data[s..s + self.n]
    }
}

fn f32_data<'a>(s: &'a CpuStorage, what: &str) -> CResult<&'a [f32]> {
    match s {
        CpuStorage::F32(v) => Ok(v),
        other => bail!(
            "fused {what}: expected f32, got {:?}",
            candle_core::backend::BackendStorage::dtype(other)
        ),
    }
}

/// A raw output pointer shared by the workers; each writes disjoint rows.
#[derive(Clone, Copy)]
pub(crate) struct Out(*mut f32);
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    /// # Safety
    /// `start + n` is within the allocation and no other thread touches these elements.
    #[inline(always)]
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn row<'a>(self, start: usize, n: usize) -> &'a mut [f32] {
        std::slice::from_raw_parts_mut(self.0.add(start), n)
    }

    /// The start of a buffer the caller lends to the workers, each of which writes its own
    /// elements only.
    pub(crate) fn of(buf: &mut [f32]) -> Out {
        Out(buf.as_mut_ptr())
    }

    /// The same buffer from element `offset` on.
    ///
    /// # Safety
    /// `offset` is within the allocation.
    #[inline(always)]
    pub(crate) unsafe fn offset(self, offset: usize) -> Out {
        Out(self.0.add(offset))
    }

    /// The address of element `offset`, for kernels that write through a raw pointer.
    ///
    /// # Safety
    /// `offset` is within the allocation.
    #[inline(always)]
    pub(crate) unsafe fn at(self, offset: usize) -> *mut f32 {
        self.0.add(offset)
    }
}

/// An output buffer every element of which the kernel writes.
pub(crate) struct OutBuf(Vec<f32>);

impl OutBuf {
    pub(crate) fn new(len: usize) -> Self {
        OutBuf(Vec::with_capacity(len))
    }
    pub(crate) fn ptr(&mut self) -> Out {
        Out(self.0.as_mut_ptr())
    }
    /// # Safety
    /// All `len` elements have been written.
    pub(crate) unsafe fn finish(mut self, len: usize) -> Vec<f32> {
        self.0.set_len(len);
        self.0
    }
}

/// Below this many elements a single thread is faster than waking the pool.
const PAR_MIN_ELEMS: usize = 64 * 1024;
/// Elements per work unit: enough to amortise dispatch, small enough to balance.
const UNIT_ELEMS: usize = 16 * 1024;

fn rows_per_unit(n: usize) -> usize {
    (UNIT_ELEMS / n.max(1)).max(1)
}

fn n_units(count: usize, n: usize) -> usize {
    count.div_ceil(rows_per_unit(n))
}

/// Runs `f(unit, rows)` over all rows in fixed units (the split into units depends on the shape
/// only, so reductions over units are deterministic), on candle's CPU pool when large enough.
pub(crate) fn par_units(count: usize, n: usize, f: impl Fn(usize, Range<usize>) + Sync) {
    let rpu = rows_per_unit(n);
    let units = count.div_ceil(rpu);
    let run = |us: Range<usize>| {
        for u in us {
            f(u, u * rpu..((u + 1) * rpu).min(count))
        }
    };
    if count * n < PAR_MIN_ELEMS || units < 2 {
        run(0..units)
    } else {
        candle_core::utils::barrier_pool().execute_chunked(units, run)
    }
}

/// Sums per-unit partial rows (`units` rows of `n`) in unit order into `dst`.
fn reduce_partials(partials: &[f32], n: usize, dst: &mut [f32]) {
    dst.fill(0.0);
    for p in partials.chunks_exact(n.max(1)) {
        for (d, v) in dst.iter_mut().zip(p) {
            *d += v;
        }
    }
}

/// Tests set this to run the baseline (non-AVX2) build of the kernels.
#[cfg(test)]
static FORCE_BASELINE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

#[cfg(target_arch = "x86_64")]
#[inline]
pub(crate) fn use_avx2() -> bool {
    #[cfg(test)]
    if FORCE_BASELINE.load(std::sync::atomic::Ordering::Relaxed) {
        return false;
    }
    std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
}

/// Compiles the body twice, once for the baseline target and once with AVX2+FMA, and picks at
/// run time (the row helpers below are `inline(always)` so they take the caller's features).
macro_rules! simd_fn {
    (fn $name:ident($($a:ident: $t:ty),* $(,)?) $body:block) => {
        #[allow(clippy::too_many_arguments)]
        fn $name($($a: $t),*) {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn imp($($a: $t),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx2($($a: $t),*) {
                    imp($($a),*)
                }
                if use_avx2() {
                    // SAFETY: the CPU has the features `avx2` was compiled for.
                    return unsafe { avx2($($a),*) };
                }
            }
            imp($($a),*)
        }
    };
}

pub(crate) use simd_fn;

// ---------------------------------------------------------------------------------------------
// Row kernels (vectorisable: independent lanes, no branches in the inner loops)
// ---------------------------------------------------------------------------------------------

/// Accumulator lanes for reductions: lets the compiler keep several vector registers busy.
pub(crate) const L: usize = 16;

#[inline(always)]
pub(crate) fn hsum(acc: [f32; L]) -> f32 {
    let mut h = [0f32; L / 2];
    for j in 0..L / 2 {
        h[j] = acc[j] + acc[j + L / 2];
    }
    let mut q = [0f32; L / 4];
    for j in 0..L / 4 {
        q[j] = h[j] + h[j + L / 4];
    }
    q.iter().sum()
}

#[inline(always)]
fn sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; L];
    let c = x.chunks_exact(L);
    let r = c.remainder();
    for c in c {
        for j in 0..L {
            acc[j] += c[j];
        }
    }
    r.iter().fold(hsum(acc), |s, v| s + v)
}

#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; L];
    let (ca, cb) = (a.chunks_exact(L), b.chunks_exact(L));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (a, b) in ca.zip(cb) {
        for j in 0..L {
            acc[j] += a[j] * b[j];
        }
    }
    ra.iter().zip(rb).fold(hsum(acc), |s, (a, b)| s + a * b)
}

/// sum((x - c)²)
#[inline(always)]
fn sum_sq_centered(x: &[f32], c: f32) -> f32 {
    let mut acc = [0f32; L];
    let ch = x.chunks_exact(L);
    let r = ch.remainder();
    for x in ch {
        for j in 0..L {
            let d = x[j] - c;
            acc[j] += d * d;
        }
    }
    r.iter().fold(hsum(acc), |s, v| s + (v - c) * (v - c))
}

/// sum(a * b * c)
#[inline(always)]
fn dot3(a: &[f32], b: &[f32], c: &[f32]) -> f32 {
    let mut acc = [0f32; L];
    let (ca, cb, cc) = (a.chunks_exact(L), b.chunks_exact(L), c.chunks_exact(L));
    let (ra, rb, rc) = (ca.remainder(), cb.remainder(), cc.remainder());
    for ((a, b), c) in ca.zip(cb).zip(cc) {
        for j in 0..L {
            acc[j] += a[j] * b[j] * c[j];
        }
    }
    let mut s = hsum(acc);
    for i in 0..ra.len() {
        s += ra[i] * rb[i] * rc[i];
    }
    s
}

#[inline(always)]
pub(crate) fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; L];
    let c = x.chunks_exact(L);
    let r = c.remainder();
    for c in c {
        for j in 0..L {
            acc[j] = acc[j].max(c[j]);
        }
    }
    r.iter().fold(
        acc.iter().fold(f32::NEG_INFINITY, |m, v| m.max(*v)),
        |m, v| m.max(*v),
    )
}

/// exp for softmax (x <= 0 after the max shift; larger x saturate at e^88.37): Cephes' expf
/// range reduction and polynomial, branch-free so loops over it vectorise. Relative error about
/// 2e-7; results below e^-86 flush to 0 (NaN stays NaN). The cut sits above
/// ln(f32::MIN_POSITIVE) = -87.34 so that no lane ever computes a subnormal: on Intel cores
/// each one costs a microcode assist of ~100 cycles, and masked attention scores (bias
/// f32::MIN) hit this on every masked element (43% of the masked softmax's time).
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const LO: f32 = -86.0; // e^LO · (p ≥ 0.7) stays above f32::MIN_POSITIVE
    const HI: f32 = 88.376_26; // keeps the exponent at most 127
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
    let xc = x.clamp(LO, HI);
    let t = xc * std::f32::consts::LOG2_E + MAGIC;
    let k = t - MAGIC;
    let ki = (t.to_bits() as i32).wrapping_sub(0x4B40_0000);
    // r = x - k ln2, with ln2 split so k * LN2_HI is exact.
    let r = xc - k * 0.693_359_4 - k * -2.121_944_4e-4;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    let y = y * f32::from_bits(((ki + 127) as u32) << 23);
    let y = if x < LO { 0.0 } else { y };
    if x.is_nan() {
        x
    } else {
        y
    }
}

// y = exp(scale · x − m), returning Σ y. Lane accumulators keep the loop vectorised (one
// running sum made attention's softmax scalar: 3.5% of a PPO step).
#[inline(always)]
pub(crate) fn scaled_exp_sum(x: &[f32], scale: f32, m: f32, y: &mut [f32]) -> f32 {
    let mut acc = [0f32; L];
    let main = x.len() / L * L;
    for (x, y) in x[..main].chunks_exact(L).zip(y[..main].chunks_exact_mut(L)) {
        for j in 0..L {
            let e = exp_f32(scale * x[j] - m);
            y[j] = e;
            acc[j] += e;
        }
    }
    let mut s = hsum(acc);
    for (x, y) in x[main..].iter().zip(&mut y[main..]) {
        let e = exp_f32(scale * x - m);
        *y = e;
        s += e;
    }
    s
}

#[inline(always)]
fn softmax_row(x: &[f32], y: &mut [f32]) {
    let m = max(x);
    let mut acc = [0f32; L];
    let main = x.len() / L * L;
    for (x, y) in x[..main].chunks_exact(L).zip(y[..main].chunks_exact_mut(L)) {
        for j in 0..L {
            let e = exp_f32(x[j] - m);
            y[j] = e;
            acc[j] += e;
        }
    }
    let mut s = hsum(acc);
    for (x, y) in x[main..].iter().zip(&mut y[main..]) {
        let e = exp_f32(x - m);
        *y = e;
        s += e;
    }
    let inv = 1.0 / s;
    for y in y.iter_mut() {
        *y *= inv;
    }
}

// dx = scale * y * (dy - sum(dy * y))  (scale: of the softmax's input, 1 for a plain softmax)
#[inline(always)]
fn softmax_bwd_row(y: &[f32], dy: &[f32], scale: f32, dx: &mut [f32]) {
    let s = dot(y, dy);
    for ((dx, y), dy) in dx.iter_mut().zip(y).zip(dy) {
        *dx = scale * y * (dy - s);
    }
}

// y = softmax(scale * x + b). The logits are recomputed in the exp pass rather than stored
// and re-read: read-only inputs and a write-only output keep the loop vectorised.
#[inline(always)]
pub(crate) fn scaled_masked_softmax_row(x: &[f32], b: &[f32], scale: f32, y: &mut [f32]) {
    let mut mx = [f32::NEG_INFINITY; L];
    let main = x.len() / L * L;
    for (x, b) in x[..main].chunks_exact(L).zip(b[..main].chunks_exact(L)) {
        for j in 0..L {
            mx[j] = mx[j].max(scale * x[j] + b[j]);
        }
    }
    let mut m = max(&mx);
    for (x, b) in x[main..].iter().zip(&b[main..]) {
        m = m.max(scale * x + b);
    }
    let mut acc = [0f32; L];
    let chunks = x[..main].chunks_exact(L).zip(b[..main].chunks_exact(L));
    for ((x, b), y) in chunks.zip(y[..main].chunks_exact_mut(L)) {
        for j in 0..L {
            let e = exp_f32(scale * x[j] + b[j] - m);
            y[j] = e;
            acc[j] += e;
        }
    }
    let mut s = hsum(acc);
    for ((x, b), y) in x[main..].iter().zip(&b[main..]).zip(&mut y[main..]) {
        let e = exp_f32(scale * x + b - m);
        *y = e;
        s += e;
    }
    let inv = 1.0 / s;
    for y in y.iter_mut() {
        *y *= inv;
    }
}

#[inline(always)]
fn rms_inv(x: &[f32], eps: f32) -> f32 {
    1.0 / (sum_sq_centered(x, 0.0) / x.len() as f32 + eps).sqrt()
}

#[inline(always)]
fn rms_norm_row(x: &[f32], w: &[f32], eps: f32, y: &mut [f32]) {
    let inv = rms_inv(x, eps);
    for ((y, x), w) in y.iter_mut().zip(x).zip(w) {
        *y = x * inv * w;
    }
}

// With x̂ = x·inv and g = dy·w: dx = inv·(g − x̂·mean(g·x̂)), dw += dy·x̂.
#[inline(always)]
fn rms_norm_bwd_row(
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    eps: f32,
    dx: &mut [f32],
    dw: Option<&mut [f32]>,
) {
    let inv = rms_inv(x, eps);
    let c = dot3(dy, w, x) * inv * inv / x.len() as f32;
    for (((dx, x), w), dy) in dx.iter_mut().zip(x).zip(w).zip(dy) {
        *dx = inv * (dy * w - x * c);
    }
    if let Some(dw) = dw {
        for ((dw, x), dy) in dw.iter_mut().zip(x).zip(dy) {
            *dw += dy * (x * inv);
        }
    }
}

#[inline(always)]
fn ln_stats(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = sum(x) / n;
    let inv = 1.0 / (sum_sq_centered(x, mean) / n + eps).sqrt();
    (mean, inv)
}

#[inline(always)]
fn layer_norm_row(x: &[f32], w: &[f32], b: &[f32], eps: f32, y: &mut [f32]) {
    let (mean, inv) = ln_stats(x, eps);
    for (((y, x), w), b) in y.iter_mut().zip(x).zip(w).zip(b) {
        *y = (x - mean) * inv * w + b;
    }
}

// With x̂ = (x − mean)·inv and g = dy·w: dx = inv·(g − mean(g) − x̂·mean(g·x̂)),
// dw += dy·x̂, db += dy.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn layer_norm_bwd_row(
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    eps: f32,
    dx: &mut [f32],
    dwb: Option<(&mut [f32], &mut [f32])>,
) {
    let n = x.len() as f32;
    let (mean, inv) = ln_stats(x, eps);
    let mut acc_g = [0f32; L];
    let mut acc_gx = [0f32; L];
    let main = x.len() / L * L;
    for ((x, w), dy) in x[..main]
        .chunks_exact(L)
        .zip(w[..main].chunks_exact(L))
        .zip(dy[..main].chunks_exact(L))
    {
        for j in 0..L {
            let g = dy[j] * w[j];
            acc_g[j] += g;
            acc_gx[j] += g * (x[j] - mean);
        }
    }
    let (mut sg, mut sgx) = (hsum(acc_g), hsum(acc_gx));
    for i in main..x.len() {
        let g = dy[i] * w[i];
        sg += g;
        sgx += g * (x[i] - mean);
    }
    let mg = sg / n;
    let mgx = sgx * inv / n;
    for (((dx, x), w), dy) in dx.iter_mut().zip(x).zip(w).zip(dy) {
        *dx = inv * (dy * w - mg - (x - mean) * inv * mgx);
    }
    if let Some((dw, db)) = dwb {
        for (((dw, db), x), dy) in dw.iter_mut().zip(db.iter_mut()).zip(x).zip(dy) {
            *dw += dy * ((x - mean) * inv);
            *db += dy;
        }
    }
}

// out = x·cos + rotate_half(x)·sin, rotate_half(x) = cat(−x2, x1)
#[inline(always)]
pub(crate) fn rope_row(x: &[f32], c: &[f32], s: &[f32], y: &mut [f32]) {
    let h = x.len() / 2;
    let (x1, x2) = x.split_at(h);
    let (c1, c2) = c.split_at(h);
    let (s1, s2) = s.split_at(h);
    let (y1, y2) = y.split_at_mut(h);
    for i in 0..h {
        y1[i] = x1[i] * c1[i] - x2[i] * s1[i];
        y2[i] = x2[i] * c2[i] + x1[i] * s2[i];
    }
}

// dx = dy·cos + rotate_half_transpose(dy·sin), rotate_half_transpose(g) = cat(g2, −g1)
#[inline(always)]
pub(crate) fn rope_bwd_row(g: &[f32], c: &[f32], s: &[f32], dx: &mut [f32]) {
    let h = g.len() / 2;
    let (g1, g2) = g.split_at(h);
    let (c1, c2) = c.split_at(h);
    let (s1, s2) = s.split_at(h);
    let (d1, d2) = dx.split_at_mut(h);
    for i in 0..h {
        d1[i] = g1[i] * c1[i] + g2[i] * s2[i];
        d2[i] = g2[i] * c2[i] - g1[i] * s1[i];
    }
}

// ---------------------------------------------------------------------------------------------
// Unit kernels (a range of rows each), dispatched on the CPU's features
// ---------------------------------------------------------------------------------------------

simd_fn! {
    fn softmax_rows(x: &[f32], xr: &Rows, out: Out, rows: Range<usize>) {
        let n = xr.n;
        for r in rows {
            // SAFETY: row r of the contiguous output belongs to this unit only.
            let y = unsafe { out.row(r * n, n) };
            softmax_row(xr.row(x, r), y);
        }
    }
}

simd_fn! {
    fn softmax_bwd_rows(
        y: &[f32],
        yr: &Rows,
        dy: &[f32],
        dyr: &Rows,
        scale: f32,
        out: Out,
        rows: Range<usize>,
    ) {
        let n = yr.n;
        for r in rows {
            // SAFETY: as in softmax_rows.
            let dx = unsafe { out.row(r * n, n) };
            softmax_bwd_row(yr.row(y, r), dyr.row(dy, r), scale, dx);
        }
    }
}

simd_fn! {
    fn scaled_masked_softmax_rows(
        x: &[f32],
        xr: &Rows,
        b: &[f32],
        br: &Rows,
        scale: f32,
        out: Out,
        rows: Range<usize>,
    ) {
        let n = xr.n;
        for r in rows {
            // SAFETY: as in softmax_rows.
            let y = unsafe { out.row(r * n, n) };
            scaled_masked_softmax_row(xr.row(x, r), br.row(b, r), scale, y);
        }
    }
}

simd_fn! {
    fn rms_norm_rows(x: &[f32], xr: &Rows, w: &[f32], eps: f32, out: Out, rows: Range<usize>) {
        let n = xr.n;
        for r in rows {
            // SAFETY: as in softmax_rows.
            let y = unsafe { out.row(r * n, n) };
            rms_norm_row(xr.row(x, r), w, eps, y);
        }
    }
}

/// A copy of `x`, made over the pool.
pub(crate) fn par_copy(x: &[f32]) -> Vec<f32> {
    let mut buf = OutBuf::new(x.len());
    let out = buf.ptr();
    par_units(x.len(), 1, |_, r| {
        // SAFETY: units cover disjoint ranges of the output.
        unsafe { out.row(r.start, r.len()) }.copy_from_slice(&x[r]);
    });
    // SAFETY: the units covered every element.
    unsafe { buf.finish(x.len()) }
}

/// RMSNorm of the `x.len() / n` rows of a contiguous buffer, over the pool.
pub(crate) fn rms_norm_vec(x: &[f32], w: &[f32], n: usize, eps: f32) -> Vec<f32> {
    let xr = Rows {
        n,
        count: x.len() / n,
        start: 0,
        starts: None,
    };
    let mut buf = OutBuf::new(x.len());
    let out = buf.ptr();
    par_units(xr.count, n, |_, rows| {
        rms_norm_rows(x, &xr, w, eps, out, rows)
    });
    // SAFETY: every row was written.
    unsafe { buf.finish(x.len()) }
}

/// dx += the gradient RMSNorm (with a frozen weight) sends its input for the output gradient
/// `dy`, row by row over the pool.
pub(crate) fn rms_norm_bwd_acc(
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    n: usize,
    eps: f32,
    dx: &mut [f32],
) {
    assert!(x.len() == dy.len() && x.len() == dx.len() && w.len() == n);
    let out = Out::of(dx);
    par_units(x.len() / n, n, |_, rows| {
        rms_norm_bwd_acc_rows(x, w, dy, n, eps, out, rows)
    });
}

simd_fn! {
    fn rms_norm_bwd_acc_rows(
        x: &[f32], w: &[f32], dy: &[f32], n: usize, eps: f32, out: Out, rows: Range<usize>,
    ) {
        for r in rows {
            let span = r * n..(r + 1) * n;
            // SAFETY: each unit owns its rows.
            let dx = unsafe { out.row(r * n, n) };
            let (x, dy) = (&x[span.clone()], &dy[span]);
            let inv = rms_inv(x, eps);
            let c = dot3(dy, w, x) * inv * inv / n as f32;
            for (((dx, x), w), dy) in dx.iter_mut().zip(x).zip(w).zip(dy) {
                *dx += inv * (dy * w - x * c);
            }
        }
    }
}

simd_fn! {
    fn rms_norm_bwd_rows(
        x: &[f32], xr: &Rows, w: &[f32], dy: &[f32], dyr: &Rows, eps: f32,
        out: Out, partial: Option<Out>, unit: usize, rows: Range<usize>,
    ) {
        let n = xr.n;
        // SAFETY: each unit owns its partial row.
        let mut dw = partial.map(|p| unsafe { p.row(unit * n, n) });
        if let Some(dw) = dw.as_deref_mut() {
            dw.fill(0.0);
        }
        for r in rows {
            // SAFETY: as in softmax_rows.
            let dx = unsafe { out.row(r * n, n) };
            rms_norm_bwd_row(xr.row(x, r), w, dyr.row(dy, r), eps, dx, dw.as_deref_mut());
        }
    }
}

simd_fn! {
    fn layer_norm_rows(x: &[f32], xr: &Rows, w: &[f32], b: &[f32], eps: f32, out: Out, rows: Range<usize>) {
        let n = xr.n;
        for r in rows {
            // SAFETY: as in softmax_rows.
            let y = unsafe { out.row(r * n, n) };
            layer_norm_row(xr.row(x, r), w, b, eps, y);
        }
    }
}

simd_fn! {
    fn layer_norm_bwd_rows(
        x: &[f32], xr: &Rows, w: &[f32], dy: &[f32], dyr: &Rows, eps: f32,
        out: Out, partial: Option<Out>, unit: usize, rows: Range<usize>,
    ) {
        let n = xr.n;
        // SAFETY: each unit owns its two partial rows (dw, db).
        let mut dwb = partial.map(|p| unsafe { (p.row(2 * unit * n, n), p.row((2 * unit + 1) * n, n)) });
        if let Some((dw, db)) = dwb.as_mut() {
            dw.fill(0.0);
            db.fill(0.0);
        }
        for r in rows {
            // SAFETY: as in softmax_rows.
            let dx = unsafe { out.row(r * n, n) };
            let dwb = dwb.as_mut().map(|(a, b)| (&mut **a, &mut **b));
            layer_norm_bwd_row(xr.row(x, r), w, dyr.row(dy, r), eps, dx, dwb);
        }
    }
}

/// Geometry of a rope call: x rows are (b, h, t), cos/sin rows are (cb, t) with cb = b or 1.
#[derive(Clone, Copy)]
struct RopeDims {
    h: usize,
    t: usize,
    cos_batched: bool,
}

impl RopeDims {
    fn new(x: &Layout, cos: &Layout, sin: &Layout) -> CResult<Self> {
        let (xd, cd) = (x.dims(), cos.dims());
        let ok = xd.len() == 4
            && cd.len() == 4
            && cos.dims() == sin.dims()
            && (cd[0] == xd[0] || cd[0] == 1)
            && cd[1] == 1
            && cd[2] == xd[2]
            && cd[3] == xd[3]
            && xd[3] % 2 == 0;
        if !ok {
            bail!(
                "fused rope: x {xd:?} and cos/sin {cd:?} {:?} do not match (b,h,t,d) / (b,1,t,d)",
                sin.dims()
            )
        }
        Ok(RopeDims {
            h: xd[1],
            t: xd[2],
            cos_batched: cd[0] != 1,
        })
    }

    #[inline(always)]
    fn cos_row(&self, r: usize) -> usize {
        let ti = r % self.t;
        if self.cos_batched {
            r / (self.h * self.t) * self.t + ti
        } else {
            ti
        }
    }
}

simd_fn! {
    fn rope_rows(
        x: &[f32], xr: &Rows, c: &[f32], cr: &Rows, s: &[f32], sr: &Rows, g: RopeDims,
        bwd: bool, out: Out, rows: Range<usize>,
    ) {
        let n = xr.n;
        for r in rows {
            let cs = g.cos_row(r);
            // SAFETY: as in softmax_rows.
            let y = unsafe { out.row(r * n, n) };
            if bwd {
                rope_bwd_row(xr.row(x, r), cr.row(c, cs), sr.row(s, cs), y);
            } else {
                rope_row(xr.row(x, r), cr.row(c, cs), sr.row(s, cs), y);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Custom ops
// ---------------------------------------------------------------------------------------------

struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "fused-softmax-last-dim"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let x = f32_data(s, "softmax")?;
        let xr = Rows::new(l)?;
        let len = xr.count * xr.n;
        let mut buf = OutBuf::new(len);
        let out = buf.ptr();
        par_units(xr.count, xr.n, |_, rows| softmax_rows(x, &xr, out, rows));
        // SAFETY: every row was written.
        let y = unsafe { buf.finish(len) };
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, dy: &Tensor) -> CResult<Option<Tensor>> {
        Ok(Some(y.apply_op2_no_bwd(
            &unit_stride(dy)?,
            &SoftmaxBwd { scale: 1.0 },
        )?))
    }
}

/// softmax(scale · x + bias); the bias (broadcast to x's shape) gets no gradient.
struct ScaledMaskedSoftmax {
    scale: f32,
}

impl CustomOp2 for ScaledMaskedSoftmax {
    fn name(&self) -> &'static str {
        "fused-scaled-masked-softmax"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (x, b) = (f32_data(s1, "softmax")?, f32_data(s2, "softmax bias")?);
        let (xr, br) = (Rows::new(l1)?, Rows::new(l2)?);
        if l1.dims() != l2.dims() {
            bail!(
                "fused softmax: scores {:?} and bias {:?} differ",
                l1.dims(),
                l2.dims()
            )
        }
        let len = xr.count * xr.n;
        let mut buf = OutBuf::new(len);
        let out = buf.ptr();
        let scale = self.scale;
        par_units(xr.count, xr.n, |_, rows| {
            scaled_masked_softmax_rows(x, &xr, b, &br, scale, out, rows)
        });
        // SAFETY: every row was written.
        let y = unsafe { buf.finish(len) };
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _bias: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let scale = self.scale;
        let dx = y.apply_op2_no_bwd(&unit_stride(dy)?, &SoftmaxBwd { scale })?;
        Ok((Some(dx), None))
    }
}

struct SoftmaxBwd {
    scale: f32,
}

impl CustomOp2 for SoftmaxBwd {
    fn name(&self) -> &'static str {
        "fused-softmax-last-dim-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (y, dy) = (f32_data(s1, "softmax bwd")?, f32_data(s2, "softmax bwd")?);
        let (yr, dyr) = (Rows::new(l1)?, Rows::new(l2)?);
        if l1.dims() != l2.dims() {
            bail!(
                "fused softmax bwd: shapes {:?} and {:?} differ",
                l1.dims(),
                l2.dims()
            )
        }
        let len = yr.count * yr.n;
        let mut buf = OutBuf::new(len);
        let out = buf.ptr();
        let scale = self.scale;
        par_units(yr.count, yr.n, |_, rows| {
            softmax_bwd_rows(y, &yr, dy, &dyr, scale, out, rows)
        });
        // SAFETY: every row was written.
        let dx = unsafe { buf.finish(len) };
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// Checks that `w` is a single row of length n and returns it.
fn weight_row<'a>(s: &'a CpuStorage, l: &Layout, n: usize, what: &str) -> CResult<&'a [f32]> {
    let w = f32_data(s, what)?;
    let wr = Rows::new(l)?;
    if l.dims() != [n] {
        bail!("fused {what}: weight shape {:?}, expected [{n}]", l.dims())
    }
    Ok(wr.row(w, 0))
}

struct RmsNorm {
    eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let x = f32_data(s1, "rms_norm")?;
        let xr = Rows::new(l1)?;
        let w = weight_row(s2, l2, xr.n, "rms_norm")?;
        let len = xr.count * xr.n;
        let mut buf = OutBuf::new(len);
        let out = buf.ptr();
        par_units(xr.count, xr.n, |_, rows| {
            rms_norm_rows(x, &xr, w, self.eps, out, rows)
        });
        // SAFETY: every row was written.
        let y = unsafe { buf.finish(len) };
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let need_dw = w.track_op();
        let op = RmsNormBwd {
            eps: self.eps,
            need_dw,
        };
        let packed = x.apply_op3_no_bwd(w, &unit_stride(dy)?, &op)?;
        let h = w.elem_count();
        let rows = x.elem_count() / h.max(1);
        let dx = packed.narrow(0, 0, rows)?.reshape(x.shape())?;
        let dw = if need_dw {
            Some(packed.narrow(0, rows, 1)?.reshape(h)?)
        } else {
            None
        };
        Ok((Some(dx), dw))
    }
}

/// (x, w, dy) -> (rows [+ 1], h): dx, then dw when asked for.
struct RmsNormBwd {
    eps: f32,
    need_dw: bool,
}

impl CustomOp3 for RmsNormBwd {
    fn name(&self) -> &'static str {
        "fused-rms-norm-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let x = f32_data(s1, "rms_norm bwd")?;
        let xr = Rows::new(l1)?;
        let w = weight_row(s2, l2, xr.n, "rms_norm bwd")?;
        let dy = f32_data(s3, "rms_norm bwd")?;
        let dyr = Rows::new(l3)?;
        if l1.dims() != l3.dims() {
            bail!(
                "fused rms_norm bwd: shapes {:?} and {:?} differ",
                l1.dims(),
                l3.dims()
            )
        }
        let (n, count) = (xr.n, xr.count);
        let extra = usize::from(self.need_dw);
        let len = (count + extra) * n;
        let mut buf = OutBuf::new(len);
        let out = buf.ptr();
        let mut partials = vec![
            0f32;
            if self.need_dw {
                n_units(count, n) * n
            } else {
                0
            }
        ];
        let part = self.need_dw.then_some(Out(partials.as_mut_ptr()));
        par_units(count, n, |u, rows| {
            rms_norm_bwd_rows(x, &xr, w, dy, &dyr, self.eps, out, part, u, rows)
        });
        if self.need_dw {
            // SAFETY: the last row is written here, after the workers are done.
            reduce_partials(&partials, n, unsafe { out.row(count * n, n) });
        }
        // SAFETY: every row was written.
        let v = unsafe { buf.finish(len) };
        Ok((CpuStorage::F32(v), Shape::from((count + extra, n))))
    }
}

struct LayerNorm {
    eps: f32,
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let x = f32_data(s1, "layer_norm")?;
        let xr = Rows::new(l1)?;
        let w = weight_row(s2, l2, xr.n, "layer_norm")?;
        let b = weight_row(s3, l3, xr.n, "layer_norm")?;
        let len = xr.count * xr.n;
        let mut buf = OutBuf::new(len);
        let out = buf.ptr();
        par_units(xr.count, xr.n, |_, rows| {
            layer_norm_rows(x, &xr, w, b, self.eps, out, rows)
        });
        // SAFETY: every row was written.
        let y = unsafe { buf.finish(len) };
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (need_dw, need_db) = (w.track_op(), b.track_op());
        let op = LayerNormBwd {
            eps: self.eps,
            need_dwb: need_dw || need_db,
        };
        let packed = x.apply_op3_no_bwd(w, &unit_stride(dy)?, &op)?;
        let h = w.elem_count();
        let rows = x.elem_count() / h.max(1);
        let dx = packed.narrow(0, 0, rows)?.reshape(x.shape())?;
        let dw = if need_dw {
            Some(packed.narrow(0, rows, 1)?.reshape(h)?)
        } else {
            None
        };
        let db = if need_db {
            Some(packed.narrow(0, rows + 1, 1)?.reshape(h)?)
        } else {
            None
        };
        Ok((Some(dx), dw, db))
    }
}

/// (x, w, dy) -> (rows [+ 2], h): dx, then dw and db when asked for.
struct LayerNormBwd {
    eps: f32,
    need_dwb: bool,
}

impl CustomOp3 for LayerNormBwd {
    fn name(&self) -> &'static str {
        "fused-layer-norm-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let x = f32_data(s1, "layer_norm bwd")?;
        let xr = Rows::new(l1)?;
        let w = weight_row(s2, l2, xr.n, "layer_norm bwd")?;
        let dy = f32_data(s3, "layer_norm bwd")?;
        let dyr = Rows::new(l3)?;
        if l1.dims() != l3.dims() {
            bail!(
                "fused layer_norm bwd: shapes {:?} and {:?} differ",
                l1.dims(),
                l3.dims()
            )
        }
        let (n, count) = (xr.n, xr.count);
        let extra = if self.need_dwb { 2 } else { 0 };
        let len = (count + extra) * n;
        let mut buf = OutBuf::new(len);
        let out = buf.ptr();
        let units = n_units(count, n);
        let mut partials = vec![0f32; if self.need_dwb { 2 * units * n } else { 0 }];
        let part = self.need_dwb.then_some(Out(partials.as_mut_ptr()));
        par_units(count, n, |u, rows| {
            layer_norm_bwd_rows(x, &xr, w, dy, &dyr, self.eps, out, part, u, rows)
        });
        if self.need_dwb {
            // Partials are [dw_u, db_u] per unit; reduce each in unit order.
            let (mut dw, mut db) = (vec![0f32; n], vec![0f32; n]);
            for p in partials.chunks_exact(2 * n.max(1)) {
                let (pw, pb) = p.split_at(n);
                dw.iter_mut().zip(pw).for_each(|(d, v)| *d += v);
                db.iter_mut().zip(pb).for_each(|(d, v)| *d += v);
            }
            // SAFETY: the last two rows are written here, after the workers are done.
            unsafe {
                out.row(count * n, n).copy_from_slice(&dw);
                out.row((count + 1) * n, n).copy_from_slice(&db);
            }
        }
        // SAFETY: every row was written.
        let v = unsafe { buf.finish(len) };
        Ok((CpuStorage::F32(v), Shape::from((count + extra, n))))
    }
}

struct Rope;

fn rope_cpu(
    bwd: bool,
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
    s3: &CpuStorage,
    l3: &Layout,
) -> CResult<(CpuStorage, Shape)> {
    let g = RopeDims::new(l1, l2, l3)?;
    let (x, c, s) = (
        f32_data(s1, "rope")?,
        f32_data(s2, "rope")?,
        f32_data(s3, "rope")?,
    );
    let (xr, cr, sr) = (Rows::new(l1)?, Rows::new(l2)?, Rows::new(l3)?);
    let len = xr.count * xr.n;
    let mut buf = OutBuf::new(len);
    let out = buf.ptr();
    par_units(xr.count, xr.n, |_, rows| {
        rope_rows(x, &xr, c, &cr, s, &sr, g, bwd, out, rows)
    });
    // SAFETY: every row was written.
    let y = unsafe { buf.finish(len) };
    Ok((CpuStorage::F32(y), l1.shape().clone()))
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "fused-rope"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        rope_cpu(false, s1, l1, s2, l2, s3, l3)
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dx = unit_stride(dy)?.apply_op3_no_bwd(cos, sin, &RopeBwd)?;
        Ok((Some(dx), None, None))
    }
}

/// (dy, cos, sin) -> dx.
struct RopeBwd;

impl CustomOp3 for RopeBwd {
    fn name(&self) -> &'static str {
        "fused-rope-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        rope_cpu(true, s1, l1, s2, l2, s3, l3)
    }
}

#[cfg(test)]
mod tests;
