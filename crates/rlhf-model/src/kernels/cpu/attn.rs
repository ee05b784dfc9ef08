//! The attention core of the rotary models as one op: rope on q and k, grouped-query attention
//! with an additive bias, y = softmax(scale · q·kᵀ + bias)·v, read from and written in the
//! linear layers' `(b, t, heads · d)` layout, with a backward pass of its own.
//!
//! Composed from candle ops, the same computation is about twenty graph nodes per layer
//! (reshapes, transposes and their copies, rope, repeat_kv's broadcast, two batched products,
//! the softmax), and candle's backward allocates, zeroes and adds a gradient buffer for the
//! inputs of every one of them. Here the whole core is one node. Its backward recomputes each
//! head's probabilities from q and k (a t × t × d product, a few percent of the layer's work)
//! instead of keeping them, so no scores or probabilities stay alive between the passes.
//!
//! The forward pass shares heads `(batch, head)` out over candle's CPU pool; the backward pass
//! shares out key/value groups `(batch, kv head)`, so each unit owns the key and value
//! gradients it accumulates over the query heads of its group. Within a unit the products run
//! on [`gemm`]'s kernel on one thread.
//!
//! Used for full-sequence forwards (training, scoring, reference log-probs). Decoding with a
//! KV cache has a forward-only variant (`cached`) that writes keys (after rope) and values
//! into the cache's own growing buffers in place, instead of concatenating tensors each step.

use std::cell::RefCell;

use candle_core::{
    bail, CpuStorage, CustomOp3, DType, Layout, Result as CResult, Shape, Storage, Tensor,
};

use super::fused::use_avx2;
use super::fused::{
    dot, max, rope_bwd_row, rope_row, scaled_masked_softmax_row, simd_fn, Out, OutBuf,
};
use super::gemm::{self, MatRef};
use crate::kernels::{KvCache, Packing};
use crate::Result;

/// Attention over the outputs of the q/k/v projections ([`crate::kernels::attention`]), or
/// `None` where neither form here runs it: the whole-sequence op without a cache, the
/// in-place decoding step (`cached`) with one; not on a CPU with AVX-512F, other dtypes,
/// shapes that do not fit, or `RLHF_ATTN=composed`.
///
/// `segments`, for a batch of one row that packs several sequences (see
/// [`Model::hidden_packed`](crate::Model::hidden_packed)), holds their start offsets and the
/// row's length. Each sequence then attends causally to itself alone: the fused op applies
/// that mask itself and never reads `bias` (which may be a placeholder), so no
/// (total × total) mask is ever built.
// q: (b, t, nh·d), k/v: (b, t, nkv·d), cos/sin: (b|1, 1, t, d), bias: (b|1, 1, t, past + t)
// -> (b, t, nh·d)
#[allow(clippy::too_many_arguments)]
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    bias: &Tensor,
    (n_heads, n_kv): (usize, usize),
    segments: Option<&Packing>,
    cache: Option<(&mut KvCache, usize)>,
) -> Result<Option<Tensor>> {
    if !fused_enabled() {
        return Ok(None);
    }
    match cache {
        None => match Geometry::of(q, k, v, cos, sin, bias, n_heads, n_kv, segments)? {
            Some(g) => Ok(Some(fused(q, k, v, cos, sin, bias, g)?)),
            None => Ok(None),
        },
        Some((c, layer)) if segments.is_none() && ![q, k, v].iter().any(|t| t.track_op()) => {
            cached(q, k, v, cos, sin, bias, n_heads, n_kv, c, layer)
        }
        Some(_) => Ok(None),
    }
}

/// Whether the fused op runs: on CPUs with AVX-512F (elsewhere candle's matmul beats the
/// fallback loop), unless `RLHF_ATTN=composed` asks for the composed path (for side-by-side
/// measurements).
pub fn fused_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        gemm::available() && !std::env::var("RLHF_ATTN").is_ok_and(|v| v == "composed")
    })
}

// ---------------------------------------------------------------------------------------------
// Decoding with a KV cache (no gradients)
// ---------------------------------------------------------------------------------------------

/// The f32 data of a contiguous CPU storage.
fn cpu_data<'a>(s: &'a Storage, l: &Layout, what: &str) -> CResult<&'a [f32]> {
    match s {
        Storage::Cpu(c) => data(c, l, what),
        _ => bail!("fused kernel: {what} is not on the CPU"),
    }
}

/// Attention for decoding: this call's keys (after rope) and values are written into the
/// cache's own buffers in place ([`crate::kernels::kv::RawKv`], grown by doubling), and each
/// (row, head) attends over all cached positions, with the bias masking padding and the
/// future. `None` where it cannot run (the layer holds the generic form's tensors, the
/// shapes or dtypes do not fit); the generic form then runs. Nothing here is differentiable:
/// the caller checks that no input carries a gradient.
#[allow(clippy::too_many_arguments)]
fn cached(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    bias: &Tensor,
    nh: usize,
    nkv: usize,
    cache: &mut KvCache,
    layer: usize,
) -> Result<Option<Tensor>> {
    let f32_cpu = |t: &&Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    if ![q, k, v, cos, sin, bias].iter().all(f32_cpu)
        || q.rank() != 3
        || cos.rank() != 4
        || bias.rank() != 4
        || nh == 0
        || nkv == 0
        || !nh.is_multiple_of(nkv)
    {
        return Ok(None);
    }
    let (b, t, qw) = q.dims3()?;
    let d = qw / nh;
    let (cb, c1, ct, cd) = cos.dims4()?;
    let (bb, b1, bt, total) = bias.dims4()?;
    let Some(slot) = cache.raw_slot(layer) else {
        return Ok(None);
    };
    let past = slot.as_ref().map_or(0, |r| r.len);
    let fits = d > 0
        && d.is_multiple_of(2)
        && qw == nh * d
        && k.dims() == [b, t, nkv * d]
        && v.dims() == [b, t, nkv * d]
        && sin.dims() == cos.dims()
        && (cb == b || cb == 1)
        && (c1, ct, cd) == (1, t, d)
        && (bb == b || bb == 1)
        && (b1, bt) == (1, t)
        && total == past + t
        && slot
            .as_ref()
            .is_none_or(|r| (r.b, r.nkv, r.d) == (b, nkv, d));
    if !fits {
        return Ok(None);
    }
    let raw = slot.get_or_insert_with(|| crate::kernels::kv::RawKv::new(b, nkv, d));
    raw.reserve(total);
    let (qc, kc, vc) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let (cosc, sinc, biasc) = (cos.contiguous()?, sin.contiguous()?, bias.contiguous()?);
    let ((sq, lq), (sk, lk), (sv, lv)) = (
        qc.storage_and_layout(),
        kc.storage_and_layout(),
        vc.storage_and_layout(),
    );
    let ((sc, lc), (ss, ls), (sb, lb)) = (
        cosc.storage_and_layout(),
        sinc.storage_and_layout(),
        biasc.storage_and_layout(),
    );
    let (qd, kd, vd) = (
        cpu_data(&sq, lq, "q")?,
        cpu_data(&sk, lk, "k")?,
        cpu_data(&sv, lv, "v")?,
    );
    let cosd = cpu_data(&sc, lc, "cos")?;
    let sind = cpu_data(&ss, ls, "sin")?;
    let biasd = cpu_data(&sb, lb, "bias")?;
    let cos_row = |bi: usize, ti: usize| ((if cb == 1 { 0 } else { bi }) * t + ti) * d;
    let cap = raw.cap;
    for bi in 0..b {
        for ti in 0..t {
            let c = cos_row(bi, ti);
            let (cr, sr) = (&cosd[c..c + d], &sind[c..c + d]);
            for g in 0..nkv {
                let src = ((bi * t + ti) * nkv + g) * d;
                let dst = ((bi * nkv + g) * cap + past + ti) * d;
                rope_row(&kd[src..src + d], cr, sr, &mut raw.k[dst..dst + d]);
                raw.v[dst..dst + d].copy_from_slice(&vd[src..src + d]);
            }
        }
    }
    raw.len = total;
    let (kcache, vcache) = (&raw.k[..], &raw.v[..]);
    let scale = 1.0 / (d as f32).sqrt();
    let len = b * t * nh * d;
    let mut buf = OutBuf::new(len);
    let out = buf.ptr();
    par(b * nh, |u| {
        let (bi, h) = (u / nh, u % nh);
        let blk = (bi * nkv + h / (nh / nkv)) * cap * d;
        SCRATCH.with_borrow_mut(|scratch| {
            let [qh, s, p] = carve(scratch, [t * d, t * total, t * total]);
            for ti in 0..t {
                let c = cos_row(bi, ti);
                let src = ((bi * t + ti) * nh + h) * d;
                let (cr, sr) = (&cosd[c..c + d], &sind[c..c + d]);
                rope_row(&qd[src..src + d], cr, sr, &mut qh[ti * d..(ti + 1) * d]);
            }
            let (kb, vb) = (&kcache[blk..][..total * d], &vcache[blk..][..total * d]);
            let brow = if bb == 1 { 0 } else { bi * t };
            let bias_rows = &biasd[brow * total..][..t * total];
            if t <= DECODE_ROWS {
                // A few query rows: dot products and weighted sums straight over the cache,
                // where the product kernel would pack the cache first.
                for i in 0..t {
                    // SAFETY: this unit owns head h of row bi's t rows: columns h·d..h·d+d.
                    let y = unsafe { out.row((bi * t + i) * nh * d + h * d, d) };
                    let br = &bias_rows[i * total..][..total];
                    let (si, pi) = (&mut s[i * total..][..total], &mut p[i * total..][..total]);
                    decode_row(&qh[i * d..(i + 1) * d], kb, vb, br, scale, si, pi, y);
                }
                return;
            }
            let qm = MatRef::new(qh, t, d, d, 1);
            let km = MatRef::new(kb, total, d, d, 1);
            // SAFETY: s holds t × total floats and is this thread's own.
            unsafe { gemm::matmul_into(qm, km.t(), s.as_mut_ptr(), total, false) };
            for i in 0..t {
                let br = &bias_rows[i * total..][..total];
                let (x, y) = (&s[i * total..(i + 1) * total], &mut p[i * total..][..total]);
                scaled_masked_softmax_row(x, br, scale, y);
            }
            let pm = MatRef::new(p, t, total, total, 1);
            let vm = MatRef::new(vb, total, d, d, 1);
            // SAFETY: this unit owns head h of row bi's t rows: columns h·d..h·d+d.
            unsafe { gemm::matmul_into(pm, vm, out.at(bi * t * nh * d + h * d), nh * d, false) };
        })
    });
    // SAFETY: every (row, head) unit wrote its d columns of its t rows.
    let y = unsafe { buf.finish(len) };
    Ok(Some(Tensor::from_vec(y, (b, t, nh * d), q.device())?))
}

/// Query rows up to which [`cached`] works on the cache directly rather than through the
/// product kernel (decoding steps have one).
const DECODE_ROWS: usize = 4;

simd_fn! {
    // One query row over `total` cached positions: s = q·kⱼ, p = softmax(scale·s + bias),
    // y = Σ pⱼ vⱼ.
    fn decode_row(q: &[f32], k: &[f32], v: &[f32], bias: &[f32], scale: f32, s: &mut [f32],
                  p: &mut [f32], y: &mut [f32]) {
        let d = q.len();
        for (sj, kj) in s.iter_mut().zip(k.chunks_exact(d)) {
            *sj = dot(q, kj);
        }
        scaled_masked_softmax_row(s, bias, scale, p);
        y.fill(0.0);
        for (&pj, vj) in p.iter().zip(v.chunks_exact(d)) {
            for (yi, &vi) in y.iter_mut().zip(vj) {
                *yi += pj * vi;
            }
        }
    }
}

/// The shape of one fused call.
#[derive(Clone, Debug)]
struct Geometry {
    nh: usize,
    nkv: usize,
    d: usize,
    scale: f32,
    /// The sequences attention runs within: the rows of a padded batch, or the sequences
    /// packed into one row.
    segments: Vec<Segment>,
    /// Per packed segment, where its branches start (see [`crate::kernels::Packing`]); empty
    /// for plain sequences and for the rows of a padded batch.
    branches: Vec<Vec<usize>>,
}

/// One sequence: queries and keys are its own tokens only.
#[derive(Clone, Copy, Debug)]
struct Segment {
    /// Its first token among the `b · t` rows of q, k and v.
    row: usize,
    len: usize,
    /// Its first row of cos/sin.
    cos_row: usize,
    /// Where its (len × len) block of the bias starts and the bias's row stride; `None` for
    /// a packed sequence, which is masked causally without a bias.
    bias: Option<(usize, usize)>,
    /// Its entry in [`Geometry::branches`].
    index: usize,
    /// The rows of a root segment it sees whole before its own (see
    /// [`crate::kernels::Packing::root`]), as a segment; `None` for most.
    root: Option<Root>,
}

/// The root rows a segment sees: where they start among the rows and among cos/sin.
#[derive(Clone, Copy, Debug)]
struct Root {
    row: usize,
    len: usize,
    cos_row: usize,
}

impl Root {
    fn segment(self) -> Segment {
        Segment {
            row: self.row,
            len: self.len,
            cos_row: self.cos_row,
            bias: None,
            index: 0,
            root: None,
        }
    }
}

impl Segment {
    /// Root rows seen before the segment's own (0 without a root).
    fn lr(&self) -> usize {
        self.root.map_or(0, |r| r.len)
    }
}

impl Geometry {
    /// The geometry when the fused op can take these tensors, `None` when it cannot.
    #[allow(clippy::too_many_arguments)]
    fn of(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        bias: &Tensor,
        nh: usize,
        nkv: usize,
        segments: Option<&Packing>,
    ) -> Result<Option<Self>> {
        if ![q, k, v]
            .iter()
            .all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
            || q.rank() != 3
            || k.rank() != 3
            || v.rank() != 3
        {
            return Ok(None);
        }
        let dims = |t: &Tensor| -> Result<[usize; 3]> {
            let (a, b, c) = t.dims3()?;
            Ok([a, b, c])
        };
        Self::shaped(
            dims(q)?,
            dims(k)?,
            dims(v)?,
            cos,
            sin,
            bias,
            nh,
            nkv,
            segments,
        )
    }

    /// [`Geometry::of`] for q, k and v of these `(b, t, width)` shapes, not yet computed.
    #[allow(clippy::too_many_arguments)]
    fn shaped(
        qd: [usize; 3],
        kd: [usize; 3],
        vd: [usize; 3],
        cos: &Tensor,
        sin: &Tensor,
        bias: &Tensor,
        nh: usize,
        nkv: usize,
        segments: Option<&Packing>,
    ) -> Result<Option<Self>> {
        let all = [cos, sin];
        let bias_ok = segments.is_some()
            || (bias.device().is_cpu()
                && bias.dtype() == DType::F32
                && !bias.track_op()
                && bias.rank() == 4);
        if !all
            .iter()
            .all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
            || !bias_ok
            || cos.track_op()
            || sin.track_op()
            || cos.rank() != 4
            || nh == 0
            || nkv == 0
            || !nh.is_multiple_of(nkv)
        {
            return Ok(None);
        }
        let [b, t, qw] = qd;
        let d = qw / nh;
        let (cb, c1, ct, cd) = cos.dims4()?;
        let (bb, b1, bt, bk) = match segments {
            Some(_) => (1, 1, t, t),
            None => bias.dims4()?,
        };
        let ok = d > 0
            && d.is_multiple_of(2)
            && qw == nh * d
            && kd == [b, t, nkv * d]
            && vd == [b, t, nkv * d]
            && sin.dims() == cos.dims()
            && (cb == b || cb == 1)
            && (c1, ct, cd) == (1, t, d)
            && (bb == b || bb == 1)
            && (b1, bt, bk) == (1, t, t);
        if !ok {
            return Ok(None);
        }
        let (segments, branches) = match segments {
            Some(packing) => {
                if b != 1 || packing.len() != t || !packing.is_valid() {
                    return Ok(None);
                }
                let segments = packing
                    .starts
                    .windows(2)
                    .enumerate()
                    .map(|(index, w)| {
                        let r = packing.root_of(index);
                        Segment {
                            row: w[0],
                            len: w[1] - w[0],
                            cos_row: w[0],
                            bias: None,
                            index,
                            root: (!r.is_empty()).then_some(Root {
                                row: r.start,
                                len: r.len(),
                                cos_row: r.start,
                            }),
                        }
                    })
                    .collect();
                (segments, packing.branches.clone())
            }
            None => {
                let segments = (0..b)
                    .map(|bi| Segment {
                        row: bi * t,
                        len: t,
                        cos_row: if cb == 1 { 0 } else { bi * t },
                        bias: Some((if bb == 1 { 0 } else { bi * t * t }, t)),
                        index: bi,
                        root: None,
                    })
                    .collect();
                (segments, vec![Vec::new(); b])
            }
        };
        Ok(Some(Geometry {
            nh,
            nkv,
            d,
            scale: 1.0 / (d as f32).sqrt(),
            segments,
            branches,
        }))
    }

    fn rep(&self) -> usize {
        self.nh / self.nkv
    }

    /// Where segment `i`'s probabilities start in a buffer of [`probs_len`](Self::probs_len):
    /// `nh` blocks of (len × (root + len)), head after head.
    fn probs_at(&self, i: usize) -> usize {
        self.segments[..i]
            .iter()
            .map(|s| self.nh * s.len * (s.lr() + s.len))
            .sum()
    }

    /// The probabilities of every head of every segment.
    fn probs_len(&self) -> usize {
        self.probs_at(self.segments.len())
    }

    /// Tokens in all (q rows).
    fn rows(&self) -> usize {
        self.segments.last().map_or(0, |s| s.row + s.len)
    }
}

/// The fused attention for q, k and v held as plain `(b · t, width)` buffers, for ops that
/// run a whole decoder layer themselves ([`super::layer`]).
pub(crate) struct Core(Attn);

impl Core {
    /// The core for q `(b, t, nh · d)` and k, v `(b, t, nkv · d)` (with the tables and mask
    /// [`attention`] takes); `None` where the fused op cannot run.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        (b, t): (usize, usize),
        (nh, nkv, d): (usize, usize, usize),
        cos: &Tensor,
        sin: &Tensor,
        bias: &Tensor,
        segments: Option<&Packing>,
    ) -> Result<Option<Self>> {
        if !fused_enabled() {
            return Ok(None);
        }
        let (qd, kvd) = ([b, t, nh * d], [b, t, nkv * d]);
        let Some(g) = Geometry::shaped(qd, kvd, kvd, cos, sin, bias, nh, nkv, segments)? else {
            return Ok(None);
        };
        Ok(Some(Core(Attn::new(g, cos, sin, bias)?)))
    }

    /// y = attention(q, k, v), `(b · t, nh · d)`, and, with `keep`, the attention
    /// probabilities, which [`Core::backward`] then reads instead of computing them again.
    /// They are kept only while they are no larger than four times q (on average at most
    /// 4·d keys per query): beyond that, as for long sequences, recomputing them is cheaper
    /// than holding t² floats per head for every layer.
    pub(crate) fn forward(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        keep: bool,
    ) -> CResult<(Vec<f32>, Option<Vec<f32>>)> {
        let g = &self.0.g;
        let mut probs = (keep && g.probs_len() <= 4 * q.len()).then(|| vec![0f32; g.probs_len()]);
        let y = self
            .0
            .with_tables(|tab| Ok(forward(g, q, k, v, tab, probs.as_deref_mut())))?;
        Ok((y, probs))
    }

    /// (dq, dk, dv) for the output gradient `dy`, with the probabilities the forward pass
    /// kept, or recomputing them.
    pub(crate) fn backward(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        dy: &[f32],
        probs: Option<&[f32]>,
    ) -> CResult<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let g = &self.0.g;
        if probs.is_some_and(|p| p.len() != g.probs_len()) {
            bail!(
                "fused attention: {:?} probabilities for {}",
                probs.map(<[f32]>::len),
                g.probs_len()
            )
        }
        self.0
            .with_tables(|tab| Ok(backward(g, q, k, v, dy, tab, probs)))
    }
}

fn fused(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    bias: &Tensor,
    g: Geometry,
) -> Result<Tensor> {
    let op = Attn::new(g, cos, sin, bias)?;
    Ok(q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)?)
}

struct Attn {
    g: Geometry,
    cos: Tensor,
    sin: Tensor,
    /// `None` when every segment is masked causally (packed sequences).
    bias: Option<Tensor>,
}

/// The f32 data of a contiguous CPU tensor, from its first element.
pub(crate) fn data<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> CResult<&'a [f32]> {
    match s {
        CpuStorage::F32(v) if l.is_contiguous() => {
            Ok(&v[l.start_offset()..l.start_offset() + l.shape().elem_count()])
        }
        CpuStorage::F32(_) => bail!("fused kernel: {what} is not contiguous"),
        other => bail!(
            "fused kernel: {what} is {:?}, expected f32",
            candle_core::backend::BackendStorage::dtype(other)
        ),
    }
}

/// Runs `f` with the f32 data of a (contiguous CPU) tensor.
pub(crate) fn with_data<R>(
    t: &Tensor,
    what: &str,
    f: impl FnOnce(&[f32]) -> CResult<R>,
) -> CResult<R> {
    let (s, l) = t.storage_and_layout();
    match &*s {
        Storage::Cpu(c) => f(data(c, l, what)?),
        _ => bail!("fused kernel: {what} is not on the CPU"),
    }
}

/// The rotary tables and mask, borrowed for one pass.
#[derive(Clone, Copy)]
struct Tables<'a> {
    cos: &'a [f32],
    sin: &'a [f32],
    bias: &'a [f32],
}

impl Attn {
    fn new(g: Geometry, cos: &Tensor, sin: &Tensor, bias: &Tensor) -> Result<Self> {
        let packed = g.segments.iter().all(|s| s.bias.is_none());
        Ok(Attn {
            g,
            cos: cos.detach().contiguous()?,
            sin: sin.detach().contiguous()?,
            bias: if packed {
                None
            } else {
                Some(bias.detach().contiguous()?)
            },
        })
    }

    fn with_tables<R>(&self, f: impl FnOnce(Tables<'_>) -> CResult<R>) -> CResult<R> {
        with_data(&self.cos, "cos", |cos| {
            with_data(&self.sin, "sin", |sin| match &self.bias {
                Some(b) => with_data(b, "bias", |bias| f(Tables { cos, sin, bias })),
                None => f(Tables {
                    cos,
                    sin,
                    bias: &[],
                }),
            })
        })
    }
}

impl CustomOp3 for Attn {
    fn name(&self) -> &'static str {
        "fused-attention"
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
        let (q, k, v) = (data(s1, l1, "q")?, data(s2, l2, "k")?, data(s3, l3, "v")?);
        let g = &self.g;
        if g.rows() * g.nh * g.d != q.len() {
            bail!(
                "fused attention: q {:?} does not match its geometry",
                l1.dims()
            )
        }
        let y = self.with_tables(|tab| Ok(forward(g, q, k, v, tab, None)))?;
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = &self.g;
        let dy = dy.contiguous()?;
        let (dq, dk, dv) = with_data(q, "q", |qd| {
            with_data(k, "k", |kd| {
                with_data(v, "v", |vd| {
                    with_data(&dy, "grad", |dyd| {
                        self.with_tables(|tab| Ok(backward(g, qd, kd, vd, dyd, tab, None)))
                    })
                })
            })
        })?;
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, q.shape(), dev)?),
            Some(Tensor::from_vec(dk, k.shape(), dev)?),
            Some(Tensor::from_vec(dv, v.shape(), dev)?),
        ))
    }
}

thread_local! {
    /// Per-thread scratch for one unit: rotated q and k heads, scores, probabilities.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f(unit)` for every unit, on candle's pool when there is more than one.
fn par(units: usize, f: impl Fn(usize) + Sync) {
    let run = |r: std::ops::Range<usize>| r.for_each(&f);
    if units <= 1 {
        run(0..units)
    } else {
        candle_core::utils::barrier_pool().execute_chunked(units, run)
    }
}

/// With `probs`, each head's probabilities are kept there (see [`Geometry::probs_at`]).
fn forward(
    g: &Geometry,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    tab: Tables<'_>,
    probs: Option<&mut [f32]>,
) -> Vec<f32> {
    let len = g.rows() * g.nh * g.d;
    let mut buf = OutBuf::new(len);
    let out = buf.ptr();
    let starts: Vec<usize> = (0..g.segments.len()).map(|i| g.probs_at(i)).collect();
    let keep = probs.map(Out::of);
    par(g.segments.len() * g.nh, |u| {
        let (si, h) = (u / g.nh, u % g.nh);
        let seg = &g.segments[si];
        let block = seg.len * (seg.lr() + seg.len);
        // SAFETY: each (segment, head) owns its block of the probabilities.
        let kept = keep.map(|o| unsafe { o.row(starts[si] + h * block, block) });
        SCRATCH.with_borrow_mut(|s| head_forward(g, seg, q, k, v, &tab, out, h, s, kept))
    });
    // SAFETY: the segments cover every row, and every head wrote its d columns of them.
    unsafe { buf.finish(len) }
}

/// Splits the scratch into `n` buffers of the given lengths.
fn carve<'a, const N: usize>(s: &'a mut Vec<f32>, lens: [usize; N]) -> [&'a mut [f32]; N] {
    let total: usize = lens.iter().sum();
    if s.len() < total {
        s.resize(total, 0.0);
    }
    let mut rest: &'a mut [f32] = &mut s[..];
    lens.map(|n| {
        let (head, tail) = std::mem::take(&mut rest).split_at_mut(n);
        rest = tail;
        head
    })
}

simd_fn! {
    // Rotates head `h` (of `n`) of the segment's rows of x, (rows, n·d), into dst, (len, d).
    fn rope_head(d: usize, seg: &Segment, x: &[f32], n: usize, h: usize, tab: &Tables<'_>,
                 dst: &mut [f32]) {
        for ti in 0..seg.len {
            let c = (seg.cos_row + ti) * d;
            let src = &x[(seg.row + ti) * n * d + h * d..][..d];
            rope_row(src, &tab.cos[c..c + d], &tab.sin[c..c + d], &mut dst[ti * d..(ti + 1) * d]);
        }
    }
}

simd_fn! {
    // p = softmax(scale · s + bias) row by row over the segment's block of the bias, or,
    // without a bias, over each row's causal prefix (the rest of the row 0).
    fn softmax_head(seg: &Segment, branches: &[usize], scale: f32, s: &[f32], tab: &Tables<'_>,
                    p: &mut [f32]) {
        // Rows of w keys: the root's (all seen), then the segment's own.
        let (t, lr) = (seg.len, seg.lr());
        let w = lr + t;
        for i in 0..t {
            let (x, y) = (&s[i * w..(i + 1) * w], &mut p[i * w..(i + 1) * w]);
            match seg.bias {
                Some((off, stride)) => {
                    let br = off + i * stride;
                    scaled_masked_softmax_row(x, &tab.bias[br..br + t], scale, y);
                }
                None => {
                    let (lo, hi) = crate::kernels::mask::hidden_keys(branches, i);
                    let end = lr + i;
                    scaled_softmax_gap(&x[..=end], lr + lo, lr + hi.max(lo), scale, &mut y[..=end]);
                    y[end + 1..].fill(0.0);
                }
            }
        }
    }
}

// y = softmax(scale · x) over x without its keys lo..hi (another branch's; an empty range
// for a plain causal row), which get 0.
#[inline(always)]
fn scaled_softmax_gap(x: &[f32], lo: usize, hi: usize, scale: f32, y: &mut [f32]) {
    let m = scale * max(&x[..lo]).max(max(&x[hi..]));
    let sum = super::fused::scaled_exp_sum(&x[..lo], scale, m, &mut y[..lo])
        + super::fused::scaled_exp_sum(&x[hi..], scale, m, &mut y[hi..]);
    y[lo..hi].fill(0.0);
    let inv = 1.0 / sum;
    y.iter_mut().for_each(|y| *y *= inv);
}

simd_fn! {
    // dp becomes the gradient of the scores: scale · p · (dp − rowsum(dp · p)).
    fn softmax_bwd_head(p: &[f32], dp: &mut [f32], t: usize, scale: f32) {
        for (p, dp) in p.chunks_exact(t).zip(dp.chunks_exact_mut(t)) {
            let s = dot(p, dp);
            for (d, p) in dp.iter_mut().zip(p) {
                *d = scale * p * (*d - s);
            }
        }
    }
}

simd_fn! {
    // Writes rows of `src`, (len, d), through the inverse rotation into head `h` (of `n`) of
    // the segment's rows of `out`, (rows, n·d).
    fn unrope_head(d: usize, seg: &Segment, src: &[f32], n: usize, h: usize, tab: &Tables<'_>,
                   out: Out) {
        for ti in 0..seg.len {
            let c = (seg.cos_row + ti) * d;
            // SAFETY: this unit owns head h of the segment's rows in `out`.
            let dst = unsafe { out.row((seg.row + ti) * n * d + h * d, d) };
            rope_bwd_row(&src[ti * d..(ti + 1) * d], &tab.cos[c..c + d], &tab.sin[c..c + d], dst);
        }
    }
}

/// The segment's rows `(len, d)` of head `h` (of `n`) in a `(rows, n·d)` buffer.
fn head_view<'a>(d: usize, seg: &Segment, x: &'a [f32], n: usize, h: usize) -> MatRef<'a> {
    MatRef::new(&x[seg.row * n * d + h * d..], seg.len, d, n * d, 1)
}

#[allow(clippy::too_many_arguments)]
fn head_forward(
    g: &Geometry,
    seg: &Segment,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    tab: &Tables<'_>,
    out: Out,
    h: usize,
    scratch: &mut Vec<f32>,
    kept: Option<&mut [f32]>,
) {
    let (t, d, lr) = (seg.len, g.d, seg.lr());
    // Keys: the root's rows (if any), then the segment's own.
    let w = lr + t;
    let kv = h / g.rep();
    let vlen = if lr > 0 { w * d } else { 0 };
    let [qh, kh, vh, s, scratch_p] = carve(scratch, [t * d, w * d, vlen, t * w, t * w]);
    let p = match kept {
        Some(k) => k,
        None => scratch_p,
    };
    rope_head(d, seg, q, g.nh, h, tab, qh);
    rope_keys(g, seg, k, kv, tab, kh);
    let qm = MatRef::new(qh, t, d, d, 1);
    let km = MatRef::new(kh, w, d, d, 1);
    // SAFETY: s holds t × w floats and is this thread's own.
    unsafe { gemm::matmul_into(qm, km.t(), s.as_mut_ptr(), w, false) };
    softmax_head(seg, &g.branches[seg.index], g.scale, s, tab, p);
    let pm = MatRef::new(p, t, w, w, 1);
    let vm = values_of(g, seg, v, kv, vh);
    // SAFETY: this unit owns head h of the segment's rows: columns h·d..h·d+d.
    unsafe {
        let y = out.at(seg.row * g.nh * d + h * d);
        gemm::matmul_into(pm, vm, y, g.nh * d, false);
    }
}

/// Head `kv` of the keys a segment's queries see, rotated, into `dst` ((root + own) × d).
fn rope_keys(g: &Geometry, seg: &Segment, k: &[f32], kv: usize, tab: &Tables<'_>, dst: &mut [f32]) {
    let (d, lr) = (g.d, seg.lr());
    if let Some(r) = seg.root {
        rope_head(d, &r.segment(), k, g.nkv, kv, tab, &mut dst[..lr * d]);
    }
    rope_head(d, seg, k, g.nkv, kv, tab, &mut dst[lr * d..]);
}

/// Head `kv` of the values a segment's queries see: a view of its own rows, or with a root
/// the root's rows and its own copied into `buf` ((root + own) × d).
fn values_of<'a>(
    g: &Geometry,
    seg: &Segment,
    v: &'a [f32],
    kv: usize,
    buf: &'a mut [f32],
) -> MatRef<'a> {
    let d = g.d;
    let Some(r) = seg.root else {
        return head_view(d, seg, v, g.nkv, kv);
    };
    let rows = (r.row..r.row + r.len).chain(seg.row..seg.row + seg.len);
    for (i, row) in rows.enumerate() {
        let src = row * g.nkv * d + kv * d;
        buf[i * d..(i + 1) * d].copy_from_slice(&v[src..src + d]);
    }
    MatRef::new(buf, r.len + seg.len, d, d, 1)
}

/// With `probs` (the forward pass's), the probabilities are read there, not recomputed.
fn backward(
    g: &Geometry,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dy: &[f32],
    tab: Tables<'_>,
    probs: Option<&[f32]>,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (qlen, kvlen) = (g.rows() * g.nh * g.d, g.rows() * g.nkv * g.d);
    let (mut dq, mut dk, mut dv) = (OutBuf::new(qlen), OutBuf::new(kvlen), OutBuf::new(kvlen));
    // What each segment with a root adds to the root's key and value gradients, in blocks of
    // (root rows, nkv · d), summed into them once every unit is done.
    let width = g.nkv * g.d;
    let mut side_at = Vec::with_capacity(g.segments.len());
    let mut side_len = 0;
    for seg in &g.segments {
        side_at.push(side_len);
        side_len += seg.lr() * width;
    }
    let (mut side_k, mut side_v) = (vec![0f32; side_len], vec![0f32; side_len]);
    let outs = (dq.ptr(), dk.ptr(), dv.ptr());
    let sides = (Out::of(&mut side_k), Out::of(&mut side_v));
    par(g.segments.len() * g.nkv, |u| {
        let seg = &g.segments[u / g.nkv];
        // SAFETY: the segment's block lies inside the side buffers.
        let at = side_at[u / g.nkv];
        let side = unsafe { (sides.0.offset(at), sides.1.offset(at)) };
        let seg_probs = probs.map(|p| &p[g.probs_at(u / g.nkv)..]);
        SCRATCH.with_borrow_mut(|s| {
            group_backward(
                g,
                seg,
                q,
                k,
                v,
                dy,
                &tab,
                outs,
                side,
                u % g.nkv,
                s,
                seg_probs,
            )
        })
    });
    // SAFETY: every group wrote its kv head of dk and dv and its query heads of dq, over
    // every row of its segment, and the segments cover every row.
    let (dq, mut dk, mut dv) = unsafe { (dq.finish(qlen), dk.finish(kvlen), dv.finish(kvlen)) };
    for (seg, &at) in g.segments.iter().zip(&side_at) {
        if let Some(r) = seg.root {
            let n = r.len * width;
            let dst = r.row * width..r.row * width + n;
            for (x, y) in dk[dst.clone()].iter_mut().zip(&side_k[at..at + n]) {
                *x += y;
            }
            for (x, y) in dv[dst].iter_mut().zip(&side_v[at..at + n]) {
                *x += y;
            }
        }
    }
    (dq, dk, dv)
}

/// The gradients of key/value head `kv` of one segment and of its query heads.
#[allow(clippy::too_many_arguments)]
fn group_backward(
    g: &Geometry,
    seg: &Segment,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dy: &[f32],
    tab: &Tables<'_>,
    (dq, dk, dv): (Out, Out, Out),
    (side_k, side_v): (Out, Out),
    kv: usize,
    scratch: &mut Vec<f32>,
    probs: Option<&[f32]>,
) {
    let (t, d, lr) = (seg.len, g.d, seg.lr());
    let w = lr + t;
    let vlen = if lr > 0 { w * d } else { 0 };
    let [qh, kh, vh, s, p, tmp, dk_acc] =
        carve(scratch, [t * d, w * d, vlen, t * w, t * w, t * d, w * d]);
    rope_keys(g, seg, k, kv, tab, kh);
    let km = MatRef::new(kh, w, d, d, 1);
    let vm = values_of(g, seg, v, kv, vh);
    for (i, h) in (kv * g.rep()..(kv + 1) * g.rep()).enumerate() {
        let acc = i > 0;
        rope_head(d, seg, q, g.nh, h, tab, qh);
        let qm = MatRef::new(qh, t, d, d, 1);
        let p: &[f32] = match probs {
            Some(all) => &all[h * t * w..(h + 1) * t * w],
            None => {
                // SAFETY: the scratch buffers are this thread's.
                unsafe { gemm::matmul_into(qm, km.t(), s.as_mut_ptr(), w, false) };
                softmax_head(seg, &g.branches[seg.index], g.scale, s, tab, p);
                p
            }
        };
        // SAFETY (the products below): the scratch buffers are this thread's; dv's head kv
        // of the segment's rows, and of its block of the side buffers, belong to this unit.
        let dym = head_view(d, seg, dy, g.nh, h);
        let own = MatRef::new(&p[lr..], t, t, w, 1);
        unsafe {
            let dvp = dv.at(seg.row * g.nkv * d + kv * d);
            gemm::matmul_into(own.t(), dym, dvp, g.nkv * d, acc);
            if lr > 0 {
                let root = MatRef::new(p, t, lr, w, 1);
                gemm::matmul_into(root.t(), dym, side_v.at(kv * d), g.nkv * d, acc);
            }
            gemm::matmul_into(dym, vm.t(), s.as_mut_ptr(), w, false);
        }
        softmax_bwd_head(p, s, w, g.scale);
        let dsm = MatRef::new(s, t, w, w, 1);
        unsafe {
            gemm::matmul_into(dsm, km, tmp.as_mut_ptr(), d, false);
            gemm::matmul_into(dsm.t(), qm, dk_acc.as_mut_ptr(), d, acc);
        }
        unrope_head(d, seg, tmp, g.nh, h, tab, dq);
    }
    unrope_head(d, seg, &dk_acc[lr * d..], g.nkv, kv, tab, dk);
    if let Some(r) = seg.root {
        // The root's rows, rotated back at the root's positions, into this segment's block.
        let block = Segment {
            row: 0,
            ..r.segment()
        };
        unrope_head(d, &block, &dk_acc[..lr * d], g.nkv, kv, tab, side_k);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::generic;
    use crate::test_util::{max_diff, values};
    use candle_core::{Device, Var};

    /// Rotary tables for the given positions (one row per batch item).
    fn tables(pos: &[Vec<u32>], d: usize) -> (Tensor, Tensor) {
        let (b, t) = (pos.len(), pos[0].len());
        let (mut c, mut s) = (vec![0f32; b * t * d], vec![0f32; b * t * d]);
        for (bi, row) in pos.iter().enumerate() {
            for (ti, &p) in row.iter().enumerate() {
                for i in 0..d / 2 {
                    let f = p as f32 / 10000f32.powf(2.0 * i as f32 / d as f32);
                    let base = (bi * t + ti) * d;
                    c[base + i] = f.cos();
                    c[base + i + d / 2] = f.cos();
                    s[base + i] = f.sin();
                    s[base + i + d / 2] = f.sin();
                }
            }
        }
        let dev = Device::Cpu;
        (
            Tensor::from_vec(c, (b, 1, t, d), &dev).unwrap(),
            Tensor::from_vec(s, (b, 1, t, d), &dev).unwrap(),
        )
    }

    /// The fused op and the composed path agree on outputs and on the gradients of q, k and v,
    /// with grouped heads, a left-padded row and lengths that cross the kernel's tile edges.
    #[test]
    fn fused_attention_matches_the_composed_path_forward_and_backward() {
        let dev = Device::Cpu;
        for &(b, t, nh, nkv, d) in &[(2, 13, 4, 2, 8), (2, 40, 3, 1, 16), (1, 70, 2, 2, 64)] {
            // Row 0 is left-padded by 3, the others are full.
            let mask: Vec<Vec<u8>> = (0..b)
                .map(|bi| (0..t).map(|j| u8::from(bi != 0 || j >= 3)).collect())
                .collect();
            let bias = crate::kernels::attention_bias(&mask, t, &dev).unwrap();
            let pos = crate::kernels::positions_from_mask(&mask);
            let (cos, sin) = tables(&pos, d);
            let q = Var::from_vec(values(b * t * nh * d, 1), (b, t, nh * d), &dev).unwrap();
            let k = Var::from_vec(values(b * t * nkv * d, 2), (b, t, nkv * d), &dev).unwrap();
            let v = Var::from_vec(values(b * t * nkv * d, 3), (b, t, nkv * d), &dev).unwrap();
            let w = Tensor::from_vec(values(b * t * nh * d, 4), (b, t, nh * d), &dev).unwrap();
            let g = Geometry::of(&q, &k, &v, &cos, &sin, &bias, nh, nkv, None)
                .unwrap()
                .expect("fusable");
            let fused_y = fused(&q, &k, &v, &cos, &sin, &bias, g).unwrap();
            let ref_y =
                generic::attention(&q, &k, &v, &cos, &sin, &bias, nh, nkv, None, None).unwrap();
            let dy = max_diff(&fused_y, &ref_y);
            assert!(dy < 1e-5, "({b},{t},{nh},{nkv},{d}) outputs differ by {dy}");
            let gf = (fused_y * &w)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let gr = (ref_y * &w).unwrap().sum_all().unwrap().backward().unwrap();
            for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
                let (a, r) = (gf.get(x).expect("fused grad"), gr.get(x).expect("ref grad"));
                let scale = r
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                let diff = max_diff(a, r);
                assert!(
                    scale > 0.0 && diff <= 1e-5 * (1.0 + scale),
                    "({b},{t},{nh},{nkv},{d}) d{name} differs by {diff} (scale {scale})"
                );
            }
        }
    }

    /// One attention step with fresh q, k, v through the cached path and through the composed
    /// path, each on its own cache: the largest difference of their outputs.
    fn step_both(
        (fused_cache, ref_cache): (&mut KvCache, &mut KvCache),
        (b, t, nh, nkv, d): (usize, usize, usize, usize, usize),
        cos: &Tensor,
        sin: &Tensor,
        bias: &Tensor,
        seed: u32,
    ) -> f32 {
        let dev = Device::Cpu;
        let x = |n: usize, s: u32| {
            Tensor::from_vec(values(b * t * n * d, seed + s), (b, t, n * d), &dev).unwrap()
        };
        let (q, k, v) = (x(nh, 1), x(nkv, 2), x(nkv, 3));
        let y = cached(&q, &k, &v, cos, sin, bias, nh, nkv, fused_cache, 0)
            .unwrap()
            .expect("the cached path runs");
        let r = generic::attention(
            &q,
            &k,
            &v,
            cos,
            sin,
            bias,
            nh,
            nkv,
            None,
            Some((ref_cache, 0)),
        )
        .unwrap();
        max_diff(&y, &r)
    }

    /// Decoding through the cache's own buffers equals the composed path with its
    /// concatenated tensors: a left-padded prefill of 7 (or 40: the product-kernel branch), then
    /// steps of one token (the direct branch) past the buffer's first capacity, then a step on
    /// a cache whose rows were re-selected.
    #[test]
    fn cached_decoding_matches_the_composed_path() {
        if !fused_enabled() {
            return;
        }
        let dev = Device::Cpu;
        for &(b, t0, nh, nkv, d) in &[(2, 7, 4, 2, 8), (3, 40, 3, 1, 16)] {
            let (mut fused_cache, mut ref_cache) = (KvCache::new(1), KvCache::new(1));
            let mut mask: Vec<Vec<u8>> = (0..b)
                .map(|bi| (0..t0).map(|j| u8::from(bi != 0 || j >= 2)).collect())
                .collect();
            let mut pos = crate::kernels::positions_from_mask(&mask);
            let mut t = t0;
            for step in 0..30 {
                let total = mask[0].len();
                let bias = crate::kernels::attention_bias(&mask, t, &dev).unwrap();
                let (cos, sin) = tables(&pos, d);
                let seed = 10 * step as u32;
                let caches = (&mut fused_cache, &mut ref_cache);
                let diff = step_both(caches, (b, t, nh, nkv, d), &cos, &sin, &bias, seed);
                assert!(diff < 1e-5, "({b},{t0},{nh},{nkv},{d}) step {step}: {diff}");
                assert_eq!(fused_cache.len(), total);
                t = 1;
                for (bi, (m, p)) in mask.iter_mut().zip(pos.iter_mut()).enumerate() {
                    m.push(u8::from(step % 5 != 3 || bi == 0));
                    *p = vec![p.last().unwrap() + 1];
                }
            }
            // Keep rows (last, first): both caches reorder alike.
            let keep = Tensor::new(&[b as u32 - 1, 0], &dev).unwrap();
            fused_cache.select_rows(&keep).unwrap();
            ref_cache.select_rows(&keep).unwrap();
            let mask = vec![mask[b - 1].clone(), mask[0].clone()];
            let pos = vec![pos[b - 1].clone(), pos[0].clone()];
            let bias = crate::kernels::attention_bias(&mask, 1, &dev).unwrap();
            let (cos, sin) = tables(&pos, d);
            let caches = (&mut fused_cache, &mut ref_cache);
            let diff = step_both(caches, (2, 1, nh, nkv, d), &cos, &sin, &bias, 900);
            assert!(diff < 1e-5, "after select_rows: {diff}");
        }
    }

    #[test]
    fn shapes_it_cannot_take_go_to_the_composed_path() {
        let dev = Device::Cpu;
        let (b, t, d) = (1, 4, 6);
        let (cos, sin) = tables(&[vec![0, 1, 2, 3]], d);
        let bias = crate::kernels::attention_bias(&[vec![1; t]], t, &dev).unwrap();
        let x = Tensor::zeros((b, t, 2 * d), DType::F32, &dev).unwrap();
        // Three query heads over two kv heads: not grouped evenly.
        assert!(Geometry::of(&x, &x, &x, &cos, &sin, &bias, 3, 2, None)
            .unwrap()
            .is_none());
        // A bias for a cached past (t + 2 keys).
        let past = crate::kernels::attention_bias(&[vec![1; t + 2]], t, &dev).unwrap();
        assert!(Geometry::of(&x, &x, &x, &cos, &sin, &past, 2, 2, None)
            .unwrap()
            .is_none());
        // f64 inputs.
        let x64 = x.to_dtype(DType::F64).unwrap();
        assert!(
            Geometry::of(&x64, &x64, &x64, &cos, &sin, &bias, 2, 2, None)
                .unwrap()
                .is_none()
        );
        assert!(Geometry::of(&x, &x, &x, &cos, &sin, &bias, 2, 2, None)
            .unwrap()
            .is_some());
    }

    /// Sequences packed into one row give, token for token, what each gives alone, in value
    /// and in gradient; the composed path with the packed bias agrees too.
    #[test]
    fn packed_sequences_attend_within_themselves_only() {
        let dev = Device::Cpu;
        let (nh, nkv, d) = (4, 2, 16);
        let lens = [5usize, 17, 40];
        let starts: Vec<usize> = std::iter::once(0)
            .chain(lens.iter().scan(0, |acc, l| {
                *acc += l;
                Some(*acc)
            }))
            .collect();
        let total = *starts.last().unwrap();
        let pos: Vec<u32> = lens.iter().flat_map(|&l| 0..l as u32).collect();
        let (cos, sin) = tables(&[pos], d);
        let starts = crate::kernels::Packing::sequences(starts);
        let bias = crate::kernels::packed_attention_bias(&starts, &dev).unwrap();
        let q = Var::from_vec(values(total * nh * d, 1), (1, total, nh * d), &dev).unwrap();
        let k = Var::from_vec(values(total * nkv * d, 2), (1, total, nkv * d), &dev).unwrap();
        let v = Var::from_vec(values(total * nkv * d, 3), (1, total, nkv * d), &dev).unwrap();
        let w = Tensor::from_vec(values(total * nh * d, 4), (1, total, nh * d), &dev).unwrap();
        let g = Geometry::of(&q, &k, &v, &cos, &sin, &bias, nh, nkv, Some(&starts))
            .unwrap()
            .expect("fusable");
        assert_eq!(g.segments.len(), 3);
        let y = fused(&q, &k, &v, &cos, &sin, &bias, g).unwrap();
        let composed =
            generic::attention(&q, &k, &v, &cos, &sin, &bias, nh, nkv, None, None).unwrap();
        assert!(max_diff(&y, &composed) < 1e-5);
        // Through the public entry with a placeholder bias: the fused op (or, where it cannot
        // run, the composed path with the bias built from the segments) gives the same.
        let placeholder = Tensor::zeros((1, 1, 1, 1), DType::F32, &dev).unwrap();
        let via = crate::kernels::attention(
            &q,
            &k,
            &v,
            &cos,
            &sin,
            &placeholder,
            nh,
            nkv,
            Some(&starts),
            None,
        );
        assert!(max_diff(&via.unwrap(), &composed) < 1e-5);
        let grads = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
        for (i, &l) in lens.iter().enumerate() {
            let s0 = starts.starts[i];
            let part = |x: &Tensor| x.narrow(1, s0, l).unwrap().contiguous().unwrap();
            let (qs, ks, vs) = (
                Var::from_tensor(&part(&q)).unwrap(),
                Var::from_tensor(&part(&k)).unwrap(),
                Var::from_tensor(&part(&v)).unwrap(),
            );
            let (c1, s1) = (
                part(&cos.squeeze(1).unwrap()),
                part(&sin.squeeze(1).unwrap()),
            );
            let (c1, s1) = (c1.unsqueeze(1).unwrap(), s1.unsqueeze(1).unwrap());
            let b1 = crate::kernels::attention_bias(&[vec![1u8; l]], l, &dev).unwrap();
            let alone =
                generic::attention(&qs, &ks, &vs, &c1, &s1, &b1, nh, nkv, None, None).unwrap();
            let diff = max_diff(&part(&y), &alone);
            assert!(diff < 1e-5, "sequence {i}: outputs differ by {diff}");
            let ga = (&alone * part(&w))
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for (name, whole, one) in [("q", &q, &qs), ("k", &k, &ks), ("v", &v, &vs)] {
                let packed = part(grads.get(whole).unwrap());
                let diff = max_diff(&packed, ga.get(one).unwrap());
                assert!(diff < 1e-5, "sequence {i}: d{name} differs by {diff}");
            }
        }
    }

    /// A root seen by every segment ([R], [P, B1, B2], [S]): the fused op agrees with the
    /// composed path on the dense bias, in value and in the gradients of q, k and v (the
    /// root's key and value gradients summed over every segment that sees it); the bias lets
    /// a branch see the root, its prompt and itself only.
    #[test]
    fn a_root_is_seen_by_every_segment_as_the_dense_bias_says() {
        let dev = Device::Cpu;
        let (nh, nkv, d) = (4, 2, 16);
        let (r, p, b1, b2, plain) = (5usize, 4usize, 6usize, 3usize, 7usize);
        let total = r + p + b1 + b2 + plain;
        let packing = crate::kernels::Packing {
            starts: vec![0, r, r + p + b1 + b2, total],
            branches: vec![Vec::new(), vec![p, p + b1], Vec::new()],
            root: true,
        };
        assert!(packing.is_valid());
        let pos: Vec<u32> = (0..r + p + b1)
            .chain(r + p..r + p + b2)
            .chain(r..r + plain)
            .map(|x| x as u32)
            .collect();
        let (cos, sin) = tables(&[pos], d);
        let bias = crate::kernels::packed_attention_bias(&packing, &dev).unwrap();
        let dense: Vec<Vec<f32>> = bias
            .squeeze(0)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2()
            .unwrap();
        let seen =
            |i: usize| -> Vec<usize> { (0..total).filter(|&j| dense[i][j] == 0.0).collect() };
        // The second branch's first token: the root, the prompt, itself.
        let b2_row = r + p + b1;
        assert_eq!(seen(b2_row), (0..r + p).chain([b2_row]).collect::<Vec<_>>());
        // The plain segment's second token: the root and its own first two.
        let s_row = r + p + b1 + b2 + 1;
        assert_eq!(
            seen(s_row),
            (0..r).chain([s_row - 1, s_row]).collect::<Vec<_>>()
        );
        // A root row: its causal prefix only.
        assert_eq!(seen(2), vec![0, 1, 2]);
        let q = Var::from_vec(values(total * nh * d, 21), (1, total, nh * d), &dev).unwrap();
        let k = Var::from_vec(values(total * nkv * d, 22), (1, total, nkv * d), &dev).unwrap();
        let v = Var::from_vec(values(total * nkv * d, 23), (1, total, nkv * d), &dev).unwrap();
        let w = Tensor::from_vec(values(total * nh * d, 24), (1, total, nh * d), &dev).unwrap();
        let g = Geometry::of(&q, &k, &v, &cos, &sin, &bias, nh, nkv, Some(&packing))
            .unwrap()
            .expect("fusable");
        let y = fused(&q, &k, &v, &cos, &sin, &bias, g).unwrap();
        let composed =
            generic::attention(&q, &k, &v, &cos, &sin, &bias, nh, nkv, None, None).unwrap();
        let diff = max_diff(&y, &composed);
        assert!(diff < 1e-5, "outputs differ by {diff}");
        let gf = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let gc = (&composed * &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
            let diff = max_diff(gf.get(x).unwrap(), gc.get(x).unwrap());
            assert!(diff < 1e-5, "d{name} differs by {diff}");
        }
    }

    /// A prompt shared by its completions ([P, B1, B2], then a plain sequence): each
    /// completion's tokens give what `prompt + completion` gives alone, in value and in
    /// gradient (summed over the completions for the shared prompt), and the fused op agrees
    /// with the composed path on the dense bias.
    #[test]
    fn shared_prompts_give_each_completion_what_it_gives_alone() {
        let dev = Device::Cpu;
        let (nh, nkv, d) = (4, 2, 16);
        let (p, b1, b2, plain) = (6usize, 5usize, 7usize, 9usize);
        let total = p + b1 + b2 + plain;
        let packing = crate::kernels::Packing {
            starts: vec![0, p + b1 + b2, total],
            branches: vec![vec![p, p + b1], Vec::new()],
            root: false,
        };
        assert!(packing.is_valid());
        let pos: Vec<u32> = (0..p + b1)
            .chain(p..p + b2)
            .chain(0..plain)
            .map(|x| x as u32)
            .collect();
        let (cos, sin) = tables(&[pos], d);
        let bias = crate::kernels::packed_attention_bias(&packing, &dev).unwrap();
        // The second completion's first token sees the prompt and itself only.
        let row: Vec<f32> = bias
            .squeeze(0)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .get(p + b1)
            .unwrap()
            .to_vec1()
            .unwrap();
        let seen: Vec<usize> = (0..total).filter(|&j| row[j] == 0.0).collect();
        assert_eq!(seen, (0..p).chain([p + b1]).collect::<Vec<_>>());
        let q = Var::from_vec(values(total * nh * d, 11), (1, total, nh * d), &dev).unwrap();
        let k = Var::from_vec(values(total * nkv * d, 12), (1, total, nkv * d), &dev).unwrap();
        let v = Var::from_vec(values(total * nkv * d, 13), (1, total, nkv * d), &dev).unwrap();
        let w = Tensor::from_vec(values(total * nh * d, 14), (1, total, nh * d), &dev).unwrap();
        let g = Geometry::of(&q, &k, &v, &cos, &sin, &bias, nh, nkv, Some(&packing))
            .unwrap()
            .expect("fusable");
        let y = fused(&q, &k, &v, &cos, &sin, &bias, g).unwrap();
        let composed =
            generic::attention(&q, &k, &v, &cos, &sin, &bias, nh, nkv, None, None).unwrap();
        assert!(max_diff(&y, &composed) < 1e-5);
        let grads = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
        // Alone: prompt + completion c, rows gathered from the packed tensors.
        let mut prompt_grads: Vec<Option<Tensor>> = vec![None, None, None];
        for (start, len) in [(p, b1), (p + b1, b2)] {
            let idx: Vec<u32> = (0..p).chain(start..start + len).map(|x| x as u32).collect();
            let n = idx.len();
            let idx = Tensor::new(idx.as_slice(), &dev).unwrap();
            let pick = |x: &Tensor| x.index_select(&idx, 1).unwrap().contiguous().unwrap();
            let (qs, ks, vs) = (
                Var::from_tensor(&pick(&q)).unwrap(),
                Var::from_tensor(&pick(&k)).unwrap(),
                Var::from_tensor(&pick(&v)).unwrap(),
            );
            let c1 = pick(&cos.squeeze(1).unwrap()).unsqueeze(1).unwrap();
            let s1 = pick(&sin.squeeze(1).unwrap()).unsqueeze(1).unwrap();
            let b1m = crate::kernels::attention_bias(&[vec![1u8; n]], n, &dev).unwrap();
            let alone =
                generic::attention(&qs, &ks, &vs, &c1, &s1, &b1m, nh, nkv, None, None).unwrap();
            let ours = y.narrow(1, start, len).unwrap();
            let diff = max_diff(&ours, &alone.narrow(1, p, len).unwrap());
            assert!(
                diff < 1e-5,
                "completion at {start}: outputs differ by {diff}"
            );
            // Weights: the completion's own rows as packed; the prompt's rows once, shared.
            let wc = pick(&w);
            let ga = (&alone * &wc)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for (i, (name, whole, one)) in [("q", &q, &qs), ("k", &k, &ks), ("v", &v, &vs)]
                .into_iter()
                .enumerate()
            {
                let mine = ga.get(one).unwrap();
                let packed = grads.get(whole).unwrap().narrow(1, start, len).unwrap();
                let diff = max_diff(&packed, &mine.narrow(1, p, len).unwrap());
                assert!(
                    diff < 1e-5,
                    "completion at {start}: d{name} differs by {diff}"
                );
                let pg = mine.narrow(1, 0, p).unwrap();
                prompt_grads[i] = Some(match prompt_grads[i].take() {
                    None => pg,
                    Some(a) => (a + pg).unwrap(),
                });
            }
        }
        // The prompt's gradient is the sum over its completions, minus the prompt rows'
        // own output counted twice: with w on the prompt rows, each alone-run counts them
        // once, the packed run once, so subtract one alone-run of the prompt by itself.
        let idx = Tensor::new((0..p as u32).collect::<Vec<_>>().as_slice(), &dev).unwrap();
        let pick = |x: &Tensor| x.index_select(&idx, 1).unwrap().contiguous().unwrap();
        let (qs, ks, vs) = (
            Var::from_tensor(&pick(&q)).unwrap(),
            Var::from_tensor(&pick(&k)).unwrap(),
            Var::from_tensor(&pick(&v)).unwrap(),
        );
        let c1 = pick(&cos.squeeze(1).unwrap()).unsqueeze(1).unwrap();
        let s1 = pick(&sin.squeeze(1).unwrap()).unsqueeze(1).unwrap();
        let bp = crate::kernels::attention_bias(&[vec![1u8; p]], p, &dev).unwrap();
        let alone = generic::attention(&qs, &ks, &vs, &c1, &s1, &bp, nh, nkv, None, None).unwrap();
        let ga = (&alone * pick(&w))
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (i, (name, whole, one)) in [("q", &q, &qs), ("k", &k, &ks), ("v", &v, &vs)]
            .into_iter()
            .enumerate()
        {
            let want = (prompt_grads[i].take().unwrap() - ga.get(one).unwrap()).unwrap();
            let packed = grads.get(whole).unwrap().narrow(1, 0, p).unwrap();
            let diff = max_diff(&packed, &want);
            assert!(diff < 1e-5, "prompt: d{name} differs by {diff}");
        }
    }
}
