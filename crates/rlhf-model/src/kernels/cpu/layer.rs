//! A Llama-family decoder layer as one op with a backward pass of its own.
//!
//! Built from the per-projection ops, a layer is about fifteen graph nodes, and candle's
//! backward pass gives every input of every node a zero-filled buffer and then adds the
//! gradient into it (`GradStore::or_insert` and `add`): for a 188-row reward step that was
//! about a tenth of the step, half of it on one thread while the other waited. Here the
//! layer's inputs are the residual stream and its adapters' weights, packed into one flat
//! tensor, so the graph has one node per layer; the backward pass chains the same kernels
//! (frozen products on [`gemm`], [`super::attn`]'s fused attention, the fused RMSNorm and
//! silu·up) with the residual gradients accumulated in place and the three input gradients
//! of q, k and v summed by the products themselves.
//!
//! The layer keeps what its backward pass reads (the normed inputs, q, k, v, the attention
//! output, the mid-layer residual, gate and up) inside the op, as the composed graph keeps
//! them in its nodes, and only when an input carries a gradient. For short sequences it also
//! keeps the attention probabilities (heads × len × (root + len) per sequence: a few MB for a
//! batch of short ones), which the composed attention op computes again in its backward pass.
//!
//! Runs for layers whose projections have frozen weights without bias (adapters allowed,
//! without dropout while training), a silu MLP, f32 on a CPU with AVX-512F, and no KV cache;
//! elsewhere the model composes the layer from the ops of [`crate::kernels`]. `RLHF_LAYER_OP=0` turns it off
//! for side-by-side runs.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};

use super::attn::{data, with_data, Core};
use super::gemm::{self, MatRef};
use crate::Result;

type CResult<T> = candle_core::Result<T>;

#[cfg(test)]
thread_local! {
    /// Set by tests to run the composed layers on this thread, for side-by-side checks.
    static COMPOSED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the one-op layer runs (unless `RLHF_LAYER_OP=0`).
pub fn enabled() -> bool {
    #[cfg(test)]
    if COMPOSED.get() {
        return false;
    }
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| gemm::available() && !std::env::var("RLHF_LAYER_OP").is_ok_and(|v| v == "0"))
}

/// A frozen projection weight as the one-op layer reads it.
#[derive(Clone, Copy)]
pub enum FrozenRef<'a> {
    /// (out, in), row-major.
    Rows(&'a Tensor),
    /// The f32 kernel's panels.
    Panels(&'a Arc<gemm::Panels>),
    /// Rounded to bf16 (a `bf16 = true` run's frozen weight).
    Bf16(&'a Arc<gemm::Bf16Weight>),
}

/// A LoRA adapter as the one-op layer reads it: y += scale · (x·Aᵀ)·Bᵀ.
#[derive(Clone, Copy)]
pub struct AdapterRef<'a> {
    /// (r, in).
    pub a: &'a Tensor,
    /// (out, r).
    pub b: &'a Tensor,
    pub scale: f64,
}

/// One projection of the layer: its frozen (out, in) weight and its active adapter.
pub struct Proj<'a> {
    pub w: FrozenRef<'a>,
    pub lora: Option<AdapterRef<'a>>,
}

/// What a decoder layer is made of, borrowed from the model.
pub struct LayerParts<'a> {
    /// input_layernorm's weight and epsilon.
    pub norm1: (&'a Tensor, f64),
    /// q, k, v, o, gate, up and down, in that order.
    pub projs: [Proj<'a>; 7],
    /// post_attention_layernorm's weight and epsilon.
    pub norm2: (&'a Tensor, f64),
    /// Query heads, key/value heads, head dimension.
    pub heads: (usize, usize, usize),
    /// Whether the graph is recorded (off: the output is detached and nothing is kept).
    pub grad: bool,
}

const Q: usize = 0;
const K: usize = 1;
const V: usize = 2;
const O: usize = 3;
const GATE: usize = 4;
const UP: usize = 5;
const DOWN: usize = 6;

/// x + attention + MLP for x `(b, t, hidden)`, as one op; `None` where it cannot run (the
/// caller composes the layer).
///
/// With `rows` (flat indices into the `b · t` rows), only those rows of the output are
/// computed and returned, `(1, rows, hidden)`: every row still gives its keys and values,
/// but the attention output projection, the MLP and their backward passes run on the rows
/// asked for alone (the last layer of a reward model, read at one token per sequence).
#[allow(clippy::too_many_arguments)]
pub fn decoder_layer(
    x: &Tensor,
    parts: &LayerParts<'_>,
    cos: &Tensor,
    sin: &Tensor,
    bias: &Tensor,
    segments: Option<&crate::kernels::Packing>,
    rows: Option<&[usize]>,
) -> Result<Option<Tensor>> {
    let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    if !enabled() || !f32_cpu(x) || x.rank() != 3 {
        return Ok(None);
    }
    let (b, t, h) = x.dims3()?;
    let (nh, nkv, d) = parts.heads;
    let (n1, n2) = (parts.norm1.0, parts.norm2.0);
    let frozen = |t: &Tensor| f32_cpu(t) && !t.track_op();
    if !frozen(n1) || !frozen(n2) || n1.dims() != [h] || n2.dims() != [h] {
        return Ok(None);
    }
    let inter = match parts.projs[GATE].w {
        FrozenRef::Rows(w) => w.dim(0)?,
        FrozenRef::Panels(w) => w.out(),
        FrozenRef::Bf16(w) => w.out(),
    };
    let shapes = [
        (nh * d, h),
        (nkv * d, h),
        (nkv * d, h),
        (h, nh * d),
        (inter, h),
        (inter, h),
        (h, inter),
    ];
    let mut pieces = Vec::new();
    let mut slots = [None; 7];
    let mut at = 0;
    for (i, (p, &(n, k))) in parts.projs.iter().zip(&shapes).enumerate() {
        let fits = match p.w {
            FrozenRef::Rows(w) => frozen(w) && w.dims() == [n, k],
            FrozenRef::Panels(w) => (w.out(), w.inp()) == (n, k),
            FrozenRef::Bf16(w) => (w.out(), w.inp()) == (n, k),
        };
        if !fits {
            return Ok(None);
        }
        if let Some(l) = p.lora {
            let r = l.a.dim(0)?;
            if !f32_cpu(l.a) || !f32_cpu(l.b) || l.a.dims() != [r, k] || l.b.dims() != [n, r] {
                return Ok(None);
            }
            pieces.push(l.a.flatten_all()?);
            pieces.push(l.b.flatten_all()?);
            slots[i] = Some(Slot {
                a: at,
                b: at + r * k,
                r,
                scale: l.scale as f32,
            });
            at += r * k + n * r;
        }
    }
    if rows.is_some_and(|r| r.iter().any(|&i| i >= b * t)) {
        return Ok(None);
    }
    let Some(core) = Core::new((b, t), (nh, nkv, d), cos, sin, bias, segments)? else {
        return Ok(None);
    };
    let flat = if pieces.is_empty() {
        Tensor::zeros(0, DType::F32, x.device())?
    } else {
        Tensor::cat(&pieces, 0)?
    };
    let op = Layer {
        m: b * t,
        rows: rows.map(<[usize]>::to_vec),
        h,
        core,
        norm1: (n1.detach().contiguous()?, parts.norm1.1 as f32),
        norm2: (n2.detach().contiguous()?, parts.norm2.1 as f32),
        w: parts
            .projs
            .iter()
            .map(|p| {
                Ok(match p.w {
                    FrozenRef::Rows(w) => Weight::Rows(w.detach().contiguous()?),
                    FrozenRef::Panels(w) => Weight::Panels(w.clone()),
                    FrozenRef::Bf16(w) => Weight::Bf16(w.clone()),
                })
            })
            .collect::<CResult<Vec<_>>>()?,
        slots,
        keep: parts.grad && (x.track_op() || flat.track_op()),
        saved: Mutex::new(None),
    };
    let mut y = x.reshape((b * t, h))?.contiguous()?.apply_op2(&flat, op)?;
    if !parts.grad {
        y = y.detach();
    }
    Ok(Some(match rows {
        Some(r) => y.reshape((1, r.len(), h))?,
        None => y.reshape((b, t, h))?,
    }))
}

/// What [`Layer::back`] does with a projection's input gradient.
enum InputGrad<'a> {
    /// Not wanted (the first layer's input, from a frozen embedding).
    Skip,
    /// Into a new buffer.
    New,
    /// Added to this buffer.
    Add(&'a mut [f32]),
}

/// A projection's frozen weight, held by the op: row-major, or the GEMM kernel's panels.
enum Weight {
    Rows(Tensor),
    Panels(std::sync::Arc<gemm::Panels>),
    /// Rounded to bf16 (`bf16 = true`): products on the bf16 kernel.
    Bf16(std::sync::Arc<gemm::Bf16Weight>),
}

impl Weight {
    /// (out, in).
    fn dims(&self) -> (usize, usize) {
        match self {
            Weight::Rows(w) => {
                let d = w.dims();
                (d[0], d[1])
            }
            Weight::Panels(w) => (w.out(), w.inp()),
            Weight::Bf16(w) => (w.out(), w.inp()),
        }
    }

    /// a·Wᵀ (`wt`, a the layer's input rows) or a·W (a an output gradient), into a new
    /// buffer it returns, or, with `acc`, added to `acc`.
    fn product(
        &self,
        a: MatRef<'_>,
        wt: bool,
        acc: Option<&mut [f32]>,
    ) -> CResult<Option<Vec<f32>>> {
        let (n, k) = self.dims();
        let out = match (self, acc) {
            (Weight::Rows(w), acc) => with_data(w, "weight", |w| {
                let w = MatRef::new(w, n, k, k, 1);
                let b = if wt { w.t() } else { w };
                Ok(match acc {
                    Some(c) => gemm::matmul_acc(a, b, c).then_some(None),
                    None => gemm::matmul(a, b).map(Some),
                })
            })?,
            (Weight::Panels(w), Some(c)) => {
                let done = if wt {
                    gemm::matmul_wt_acc(a, w, c)
                } else {
                    gemm::matmul_w_acc(a, w, c)
                };
                done.then_some(None)
            }
            (Weight::Panels(w), None) => if wt {
                gemm::matmul_wt(a, w)
            } else {
                gemm::matmul_w(a, w)
            }
            .map(Some),
            (Weight::Bf16(w), acc) => w.product(a, wt, acc),
        };
        Ok(out.expect("AVX-512F checked"))
    }
}

/// Where a projection's adapter lies in the flat adapter tensor: A `(r, in)` at `a`, B
/// `(out, r)` at `b`, both row-major.
#[derive(Clone, Copy)]
struct Slot {
    a: usize,
    b: usize,
    r: usize,
    scale: f32,
}

struct Layer {
    m: usize,
    /// The rows the output keeps (all `m` when `None`).
    rows: Option<Vec<usize>>,
    h: usize,
    core: Core,
    norm1: (Tensor, f32),
    norm2: (Tensor, f32),
    /// q, k, v, o, gate, up, down: (out, in) each.
    w: Vec<Weight>,
    slots: [Option<Slot>; 7],
    /// Whether the backward pass will run (an input carries a gradient).
    keep: bool,
    saved: Mutex<Option<Saved>>,
}

/// The activations the backward pass reads (`h1`, `y` and `h2` only where a projection that
/// reads them carries an adapter: empty otherwise). From `y` on, the output's rows only.
struct Saved {
    h1: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    /// The attention probabilities, per segment and head, where they are small enough to
    /// keep (see [`Core::forward`]).
    probs: Option<Vec<f32>>,
    y: Vec<f32>,
    x2: Vec<f32>,
    h2: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
}

impl Layer {
    /// (out, in) of projection `i`.
    fn dims(&self, i: usize) -> (usize, usize) {
        self.w[i].dims()
    }

    /// x·Wᵀ (+ s·(x·Aᵀ)·Bᵀ) of projection `i` for input rows `x`.
    fn project(&self, i: usize, x: &[f32], lora: &[f32]) -> CResult<Vec<f32>> {
        let k = self.dims(i).1;
        let xm = MatRef::new(x, x.len() / k, k, k, 1);
        let mut y = self.w[i]
            .product(xm, true, None)?
            .expect("a new buffer was asked for");
        self.add_adapter(i, xm, lora, &mut y);
        Ok(y)
    }

    /// out += x·Wᵀ (+ s·(x·Aᵀ)·Bᵀ) of projection `i`.
    fn project_acc(&self, i: usize, x: &[f32], lora: &[f32], out: &mut [f32]) -> CResult<()> {
        let k = self.dims(i).1;
        let xm = MatRef::new(x, x.len() / k, k, k, 1);
        self.w[i].product(xm, true, Some(out))?;
        self.add_adapter(i, xm, lora, out);
        Ok(())
    }

    fn add_adapter(&self, i: usize, xm: MatRef<'_>, lora: &[f32], out: &mut [f32]) {
        let Some(s) = self.slots[i] else { return };
        let (n, k) = self.dims(i);
        let (a, b) = (
            MatRef::new(&lora[s.a..], s.r, k, k, 1),
            MatRef::new(&lora[s.b..], n, s.r, s.r, 1),
        );
        let mut xa = gemm::matmul(xm, a.t()).expect("AVX-512F checked");
        xa.iter_mut().for_each(|v| *v *= s.scale);
        gemm::matmul_acc(MatRef::new(&xa, xa.len() / s.r, s.r, s.r, 1), b.t(), out);
    }

    /// Backward through projection `i` for output gradient `dy` and input `x`: writes the
    /// adapter's dA and dB into `dlora`, and the input gradient dy·W (+ s·dy·B·A) as `dx`
    /// asks: into a new buffer it returns, added to a buffer, or not at all.
    fn back(
        &self,
        i: usize,
        dy: &[f32],
        x: &[f32],
        lora: &[f32],
        dlora: &mut [f32],
        dx: InputGrad<'_>,
    ) -> CResult<Option<Vec<f32>>> {
        let (n, k) = self.dims(i);
        let m = dy.len() / n;
        let gm = MatRef::new(dy, m, n, n, 1);
        // s·dy·B, (m, r): what the adapter passes back to x through A.
        let gb = self.slots[i].map(|s| {
            let (a, b) = (
                MatRef::new(&lora[s.a..], s.r, k, k, 1),
                MatRef::new(&lora[s.b..], n, s.r, s.r, 1),
            );
            let xm = MatRef::new(x, m, k, k, 1);
            let (gb, da, db) = super::frozen::lora_grads(xm, a, b, gm, s.scale);
            dlora[s.a..s.a + da.len()].copy_from_slice(&da);
            dlora[s.b..s.b + db.len()].copy_from_slice(&db);
            (gb, s)
        });
        let add_adapter = |dx: &mut [f32]| {
            if let Some((gb, s)) = &gb {
                let a = MatRef::new(&lora[s.a..], s.r, k, k, 1);
                gemm::matmul_acc(MatRef::new(gb, m, s.r, s.r, 1), a, dx);
            }
        };
        match dx {
            InputGrad::Skip => Ok(None),
            InputGrad::New => {
                let mut dx = self.w[i]
                    .product(gm, false, None)?
                    .expect("a new buffer was asked for");
                add_adapter(&mut dx);
                Ok(Some(dx))
            }
            InputGrad::Add(dx) => {
                self.w[i].product(gm, false, Some(dx))?;
                add_adapter(dx);
                Ok(None)
            }
        }
    }

    fn forward(&self, x: &[f32], lora: &[f32]) -> CResult<Vec<f32>> {
        let h = self.h;
        let h1 = with_data(&self.norm1.0, "input_layernorm", |w| {
            Ok(super::fused::rms_norm_vec(x, w, h, self.norm1.1))
        })?;
        let q = self.project(Q, &h1, lora)?;
        let k = self.project(K, &h1, lora)?;
        let v = self.project(V, &h1, lora)?;
        let (y, probs) = self.core.forward(&q, &k, &v, self.keep)?;
        let (y, mut x2) = match &self.rows {
            Some(rows) => (gather(&y, rows, self.dims(O).1), gather(x, rows, h)),
            None => (y, super::fused::par_copy(x)),
        };
        self.project_acc(O, &y, lora, &mut x2)?;
        let h2 = with_data(&self.norm2.0, "post_attention_layernorm", |w| {
            Ok(super::fused::rms_norm_vec(&x2, w, h, self.norm2.1))
        })?;
        let gate = self.project(GATE, &h2, lora)?;
        let up = self.project(UP, &h2, lora)?;
        let act = super::glu::silu_mul_vec(&gate, &up);
        let mut out = super::fused::par_copy(&x2);
        self.project_acc(DOWN, &act, lora, &mut out)?;
        if self.keep {
            // The normed inputs and the attention output are read back only for the
            // adapters' gradients.
            let used = |i: &[usize], t: Vec<f32>| {
                if i.iter().any(|&i| self.slots[i].is_some()) {
                    t
                } else {
                    Vec::new()
                }
            };
            let saved = Saved {
                h1: used(&[Q, K, V], h1),
                q,
                k,
                v,
                probs,
                y: used(&[O], y),
                x2,
                h2: used(&[GATE, UP], h2),
                gate,
                up,
            };
            *self.saved.lock().expect("layer state poisoned") = Some(saved);
        }
        Ok(out)
    }

    /// (dx when wanted, d adapters) for the output gradient `dout`.
    fn backward(
        &self,
        x: &[f32],
        lora: &[f32],
        dout: &[f32],
        want_dx: bool,
    ) -> CResult<(Option<Vec<f32>>, Vec<f32>)> {
        let guard = self.saved.lock().expect("layer state poisoned");
        let Some(s) = guard.as_ref() else {
            candle_core::bail!("decoder layer: backward without a recorded forward pass")
        };
        let h = self.h;
        let mut dlora = vec![0f32; lora.len()];
        // MLP: out = x2 + (silu(gate)·up)·Wdᵀ.
        let act = if self.slots[DOWN].is_some() {
            super::glu::silu_mul_vec(&s.gate, &s.up)
        } else {
            Vec::new()
        };
        let dact = self.back(DOWN, dout, &act, lora, &mut dlora, InputGrad::New)?;
        let dact = dact.expect("asked for");
        let (dg, du) = super::glu::silu_mul_bwd_vec(&s.gate, &s.up, &dact);
        drop(dact);
        let dh2 = self.back(GATE, &dg, &s.h2, lora, &mut dlora, InputGrad::New)?;
        let mut dh2 = dh2.expect("asked for");
        self.back(UP, &du, &s.h2, lora, &mut dlora, InputGrad::Add(&mut dh2))?;
        let mut dx2 = super::fused::par_copy(dout);
        with_data(&self.norm2.0, "post_attention_layernorm", |w| {
            super::fused::rms_norm_bwd_acc(&s.x2, w, &dh2, h, self.norm2.1, &mut dx2);
            Ok(())
        })?;
        // Attention: x2 = x + attention(q, k, v)·Woᵀ.
        let width = self.dims(O).1;
        let dy = self.back(O, &dx2, &s.y, lora, &mut dlora, InputGrad::New)?;
        let mut dy = dy.expect("asked for");
        if let Some(rows) = &self.rows {
            dy = scatter(&dy, rows, width, self.m);
            dx2 = scatter(&dx2, rows, h, self.m);
        }
        let (dq, dk, dv) = self
            .core
            .backward(&s.q, &s.k, &s.v, &dy, s.probs.as_deref())?;
        drop(dy);
        let mut dh1: Option<Vec<f32>> = None;
        for (i, g) in [(Q, &dq), (K, &dk), (V, &dv)] {
            let dx = match (&mut dh1, want_dx) {
                (_, false) => InputGrad::Skip,
                (None, true) => InputGrad::New,
                (Some(acc), true) => InputGrad::Add(acc.as_mut_slice()),
            };
            if let Some(new) = self.back(i, g, &s.h1, lora, &mut dlora, dx)? {
                dh1 = Some(new);
            }
        }
        let dx = match dh1 {
            Some(dh1) => {
                let mut dx = dx2;
                with_data(&self.norm1.0, "input_layernorm", |w| {
                    super::fused::rms_norm_bwd_acc(x, w, &dh1, h, self.norm1.1, &mut dx);
                    Ok(())
                })?;
                Some(dx)
            }
            None => None,
        };
        Ok((dx, dlora))
    }
}

/// Rows `rows` of a `(·, width)` buffer, in that order.
fn gather(x: &[f32], rows: &[usize], width: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows.len() * width);
    for &r in rows {
        out.extend_from_slice(&x[r * width..(r + 1) * width]);
    }
    out
}

/// The `(m, width)` buffer whose rows `rows` are the rows of `x` (summed where a row repeats)
/// and whose other rows are zero: the gradient of [`gather`].
fn scatter(x: &[f32], rows: &[usize], width: usize, m: usize) -> Vec<f32> {
    let mut out = vec![0f32; m * width];
    for (i, &r) in rows.iter().enumerate() {
        for (o, v) in out[r * width..(r + 1) * width]
            .iter_mut()
            .zip(&x[i * width..(i + 1) * width])
        {
            *o += v;
        }
    }
    out
}

impl CustomOp2 for Layer {
    fn name(&self) -> &'static str {
        "decoder-layer"
    }

    // x: (m, h), adapters: (total,) -> (m, h)
    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ls: &CpuStorage,
        ll: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (x, lora) = (data(xs, xl, "x")?, data(ls, ll, "adapters")?);
        if xl.dims() != [self.m, self.h] {
            candle_core::bail!(
                "decoder layer: x {:?} for ({}, {})",
                xl.dims(),
                self.m,
                self.h
            )
        }
        let out = self.forward(x, lora)?;
        let n_out = self.rows.as_ref().map_or(self.m, Vec::len);
        Ok((CpuStorage::F32(out), Shape::from((n_out, self.h))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        lora: &Tensor,
        _out: &Tensor,
        dout: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let dout = dout.contiguous()?;
        let want_dx = x.track_op();
        let (dx, dlora) = with_data(x, "x", |xd| {
            with_data(lora, "adapters", |ld| {
                with_data(&dout, "grad", |gd| self.backward(xd, ld, gd, want_dx))
            })
        })?;
        let dev = x.device();
        Ok((
            dx.map(|v| Tensor::from_vec(v, x.shape(), dev))
                .transpose()?,
            lora.track_op()
                .then(|| Tensor::from_vec(dlora, lora.shape(), dev))
                .transpose()?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lora::{LoraConfig, TargetModules};
    use crate::{Batch, Heads, LoadOptions, Model, Training};

    /// The fixture with adapters on `targets` (PEFT's default, q and v, without).
    fn model(targets: Option<&str>) -> Model {
        let dir = std::path::PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../../shared/fixtures/models/llama-gqa"
        ));
        let cfg = LoraConfig {
            r: 4,
            lora_alpha: 8.0,
            target_modules: targets.map(|t| TargetModules::One(t.into())),
            task_type: Some("SEQ_CLS".into()),
            ..Default::default()
        };
        let model = Model::load(
            &dir,
            &LoadOptions {
                heads: Heads::Score,
                training: Training::Lora(cfg),
                ..Default::default()
            },
        )
        .unwrap();
        // B starts at zero; give every adapter a non-zero B so that A's gradient is not zero.
        for (i, (name, var)) in model.params().trainable().into_iter().enumerate() {
            if name.ends_with("lora_B.weight") {
                let n = var.as_tensor().elem_count();
                let v: Vec<f32> = crate::test_util::values(n, i as u32)
                    .into_iter()
                    .map(|x| 0.2 * x)
                    .collect();
                var.set(&Tensor::from_vec(v, var.as_tensor().shape(), var.device()).unwrap())
                    .unwrap();
            }
        }
        model
    }

    /// The hidden states and the gradient of Σ w ⊙ hidden for every trainable tensor, with
    /// the one-op layers or the composed ones.
    fn run(
        model: &Model,
        composed: bool,
        hidden: &dyn Fn(&Model) -> Tensor,
    ) -> (Vec<f32>, Vec<(String, Vec<f32>)>) {
        COMPOSED.set(composed);
        let h = hidden(model);
        COMPOSED.set(false);
        let w = Tensor::from_vec(
            crate::test_util::values(h.elem_count(), 7),
            h.shape(),
            h.device(),
        )
        .unwrap();
        let grads = (&h * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let g = model
            .params()
            .trainable()
            .into_iter()
            .filter_map(|(name, var)| {
                let g = grads.get(var.as_tensor())?;
                Some((name, crate::ops::to_vec_f32(g).unwrap()))
            })
            .collect();
        (crate::ops::to_vec_f32(&h).unwrap(), g)
    }

    fn assert_close(what: &str, a: &[f32], b: &[f32]) {
        assert_eq!(a.len(), b.len(), "{what}: lengths");
        let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-3);
        let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(
            diff <= 1e-4 * scale,
            "{what}: max diff {diff} (scale {scale})"
        );
    }

    fn same_as_composed(targets: Option<&str>, hidden: &dyn Fn(&Model) -> Tensor) {
        if !enabled() {
            return;
        }
        let model = model(targets);
        let (h_op, g_op) = run(&model, false, hidden);
        let (h_ref, g_ref) = run(&model, true, hidden);
        assert_close("output", &h_op, &h_ref);
        let names: Vec<&String> = g_ref.iter().map(|(n, _)| n).collect();
        assert_eq!(
            g_op.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            names,
            "the same tensors get gradients"
        );
        // Every targeted projection of every layer carries an adapter, both A and B.
        let lora = names.iter().filter(|n| n.contains("lora_")).count();
        let per_layer = if targets.is_some() { 14 } else { 4 };
        assert!(lora >= per_layer, "only {lora} adapter tensors");
        for ((name, a), (_, b)) in g_op.iter().zip(&g_ref) {
            assert!(b.iter().any(|x| *x != 0.0), "{name}: zero gradient");
            assert_close(name, a, b);
        }
    }

    #[test]
    fn the_one_op_layer_matches_the_composed_layer_on_a_padded_batch() {
        let batch = Batch {
            input_ids: vec![vec![0, 0, 5, 9, 3, 7], vec![4, 8, 15, 16, 23, 42]],
            attention_mask: vec![vec![0, 0, 1, 1, 1, 1], vec![1; 6]],
        };
        same_as_composed(Some("all-linear"), &|m| m.hidden(&batch).unwrap());
    }

    #[test]
    fn the_one_op_layer_matches_the_composed_layer_on_shared_prompts_with_a_root() {
        let (p1, p2) = ([3u32, 1, 4, 1, 5, 9, 2], [3u32, 1, 4, 1, 6, 6]);
        let groups: Vec<(&[u32], Vec<&[u32]>)> = vec![
            (&p1, vec![&[7, 7, 8][..], &[2, 9][..]]),
            (&p2, vec![&[5, 3, 5, 8][..], &[1][..]]),
        ];
        same_as_composed(Some("all-linear"), &|m| {
            m.hidden_shared_prompts(&groups).unwrap().0
        });
        // PEFT's default targets (q and v): the layer keeps only what their gradients read.
        same_as_composed(None, &|m| m.hidden_shared_prompts(&groups).unwrap().0);
    }

    #[test]
    fn weights_kept_in_the_kernel_layout_give_the_same_layer_and_the_same_parameters() {
        if !enabled() {
            return;
        }
        let seqs: Vec<Vec<u32>> = vec![
            vec![3, 1, 4, 1, 5, 9, 2, 6],
            vec![3, 1, 4, 1, 5, 9, 8],
            vec![7, 7, 2, 9, 4],
        ];
        let hidden = |m: &Model| {
            m.hidden_shared_prompts(&[
                (&seqs[0][..4], vec![&seqs[0][4..], &seqs[1][4..]]),
                (&seqs[2][..2], vec![&seqs[2][2..]]),
            ])
            .unwrap()
            .0
        };
        for targets in [Some("all-linear"), None] {
            let mut model = model(targets);
            let (h_rows, g_rows) = run(&model, false, &hidden);
            let counts = model.params().counts();
            let merged = model.merged_weights().unwrap();
            let layers = model.n_layers();
            assert_eq!(model.keep_frozen_in_kernel_layout().unwrap(), 7 * layers);
            let kept = model
                .params()
                .iter()
                .filter(|(_, p)| matches!(p, crate::weights::Param::Kernel(_)))
                .count();
            assert_eq!(
                kept,
                7 * layers,
                "the store holds the panels, not the old tensors"
            );
            // Converting twice converts nothing more.
            assert_eq!(model.keep_frozen_in_kernel_layout().unwrap(), 0);
            let (h_panels, g_panels) = run(&model, false, &hidden);
            assert_close("output", &h_panels, &h_rows);
            assert_eq!(g_panels.len(), g_rows.len());
            for ((name, a), (_, b)) in g_panels.iter().zip(&g_rows) {
                assert_close(name, a, b);
            }
            // Paths that read the row-major tensors get them back as they were.
            assert_eq!(model.params().counts(), counts);
            let again = model.merged_weights().unwrap();
            for (name, t) in &merged {
                let (a, b) = (
                    crate::ops::to_vec_f32(t).unwrap(),
                    crate::ops::to_vec_f32(&again[name]).unwrap(),
                );
                assert_eq!(a, b, "{name}");
            }
            let (h_composed, _) = run(&model, true, &hidden);
            assert_close("composed output", &h_composed, &h_rows);
        }
    }

    #[test]
    fn only_layers_the_one_op_layer_runs_get_kernel_layout_weights() {
        if !enabled() {
            return;
        }
        let load = |name: &str, dropout: f64| {
            let dir = std::path::PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../../shared/fixtures/models/"
            ))
            .join(name);
            let cfg = LoraConfig {
                r: 4,
                lora_alpha: 8.0,
                lora_dropout: dropout,
                task_type: Some("SEQ_CLS".into()),
                ..Default::default()
            };
            let options = LoadOptions {
                heads: Heads::Score,
                training: Training::Lora(cfg),
                ..Default::default()
            };
            Model::load(&dir, &options).unwrap()
        };
        // Adapter dropout sends a training forward to the composed layer, and Qwen2's q, k
        // and v carry a bias, which the one-op layer does not take: either would rebuild
        // the row-major weights on every layer, holding them twice.
        assert_eq!(
            load("llama-gqa", 0.1)
                .keep_frozen_in_kernel_layout()
                .unwrap(),
            0
        );
        assert_eq!(
            load("qwen2", 0.0).keep_frozen_in_kernel_layout().unwrap(),
            0
        );
        let mut plain = load("llama-gqa", 0.0);
        assert_eq!(
            plain.keep_frozen_in_kernel_layout().unwrap(),
            7 * plain.n_layers()
        );
    }

    #[test]
    fn scatter_is_the_adjoint_of_gather_with_repeated_rows() {
        let (m, w) = (5, 3);
        let rows = [3, 0, 3, 4];
        let x = crate::test_util::values(m * w, 1);
        let y = crate::test_util::values(rows.len() * w, 2);
        let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(a, b)| a * b).sum::<f32>();
        let (lhs, rhs) = (
            dot(&gather(&x, &rows, w), &y),
            dot(&x, &scatter(&y, &rows, w, m)),
        );
        assert!((lhs - rhs).abs() < 1e-5, "{lhs} vs {rhs}");
    }

    #[test]
    fn the_last_layer_computes_only_the_scored_rows_and_scores_as_the_composed_model() {
        // Shared prompts, repeated sequences, and sequences that end inside others'.
        let seqs: Vec<Vec<u32>> = vec![
            vec![3, 1, 4, 1, 5, 9, 2, 6],
            vec![3, 1, 4, 1, 5, 9, 8],
            vec![3, 1, 4, 1, 5, 9, 2, 6],
            vec![3, 1, 4, 1, 5],
            vec![3, 1, 4, 1, 5],
            vec![7, 7, 2, 9, 4],
        ];
        for targets in [Some("all-linear"), None] {
            same_as_composed(targets, &|m| m.scores_packed(&seqs).unwrap());
        }
    }
}
