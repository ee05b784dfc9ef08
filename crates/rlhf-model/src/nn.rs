//! Layers: linear (with an optional LoRA adapter), embedding, norms.

use std::cell::{Cell, OnceCell};
use std::rc::Rc;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::kernels::{AdapterRef, FrozenRef, Proj};
use crate::lora::LoraConfig;
use crate::weights::{Builder, Training};
use crate::Result;

/// Switches shared by every layer of one model for the forward pass.
#[derive(Debug, Default)]
pub struct Switches {
    /// When false, LoRA layers compute the base model only: the frozen reference of PPO/DPO.
    adapters_disabled: Cell<bool>,
    /// When true, LoRA dropout is active.
    training: Cell<bool>,
    /// Seed of the current micro-batch's dropout masks (set by the trainer each micro-batch).
    dropout_seed: Cell<u64>,
    /// Dropout calls since the seed was set: each call gets its own stream.
    dropout_calls: Cell<u64>,
    /// When true, layer outputs are detached: no graph is kept (evaluation, generation).
    grad_disabled: Cell<bool>,
}

impl Switches {
    /// Whether adapters take part in the forward pass.
    pub fn adapters_enabled(&self) -> bool {
        !self.adapters_disabled.get()
    }
    /// Enables or disables every adapter of the model.
    pub fn set_adapters_enabled(&self, on: bool) {
        self.adapters_disabled.set(!on)
    }
    /// Whether forward passes record the graph for a backward pass.
    pub fn grad_enabled(&self) -> bool {
        !self.grad_disabled.get()
    }
    /// Turns graph recording off (evaluation, generation) or back on. candle has no global
    /// no-grad mode: with trainable parameters every forward keeps its whole graph, i.e. every
    /// activation, alive until the output is dropped.
    pub fn set_grad_enabled(&self, on: bool) {
        self.grad_disabled.set(!on)
    }
    /// Whether dropout is active.
    pub fn training(&self) -> bool {
        self.training.get()
    }
    /// Turns dropout on (train) or off (eval).
    pub fn set_training(&self, on: bool) {
        self.training.set(on)
    }

    /// Seeds the dropout masks of the next forward pass. Masks are a pure function of this
    /// seed and the call order, so a resumed run draws exactly the masks the first run did.
    pub fn set_dropout_seed(&self, seed: u64) {
        self.dropout_seed.set(seed);
        self.dropout_calls.set(0);
    }

    /// Inverted dropout with a mask drawn from the current seed.
    // x: any shape -> same shape
    pub fn dropout(&self, x: &Tensor, p: f64) -> Result<Tensor> {
        use rand::{Rng, SeedableRng};
        let call = self.dropout_calls.get();
        self.dropout_calls.set(call + 1);
        let seed = self.dropout_seed.get() ^ call.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let keep = 1.0 / (1.0 - p);
        let mask: Vec<f32> = (0..x.elem_count())
            .map(|_| {
                if rng.random::<f64>() < p {
                    0.0
                } else {
                    keep as f32
                }
            })
            .collect();
        let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
        Ok((x * mask)?)
    }
}

/// The LoRA part of a linear layer: y += scale * dropout(x) Aᵀ Bᵀ.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    /// (r, in), PEFT's `lora_A.weight`.
    pub a: Tensor,
    /// (out, r), PEFT's `lora_B.weight`.
    pub b: Tensor,
    /// lora_alpha / r (or / sqrt(r) with rsLoRA).
    pub scale: f64,
    /// Dropout probability on the adapter's input.
    pub dropout: f64,
}

/// A frozen weight kept in the GEMM kernel's layout ([`crate::kernels::cpu::gemm::Panels`]) in place of
/// the checkpoint's tensor, shared by its layer and the model's parameter store. Paths other
/// than the one-op layer read [`KernelWeight::tensor`], which rebuilds the row-major tensor
/// on first use and keeps it (doubling this weight's memory from then on).
pub struct KernelWeight {
    form: KernelForm,
    rows: OnceCell<Tensor>,
}

/// How a [`KernelWeight`] is held.
enum KernelForm {
    /// The f32 kernel's panels.
    Panels(Arc<crate::kernels::cpu::gemm::Panels>),
    /// Rounded to bf16, for a `bf16 = true` run on AVX512_BF16 (whose products read it
    /// rounded anyway): half the memory, and the bf16 kernel reads its pairs in place.
    Bf16(Arc<crate::kernels::cpu::gemm::Bf16Weight>),
}

impl KernelWeight {
    fn dims(&self) -> (usize, usize) {
        match &self.form {
            KernelForm::Panels(p) => (p.out(), p.inp()),
            KernelForm::Bf16(w) => (w.out(), w.inp()),
        }
    }

    /// The (out, in) tensor, row-major (a bf16 weight's rounded values).
    pub fn tensor(&self) -> &Tensor {
        self.rows.get_or_init(|| {
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| {
                tracing::warn!(
                    "a weight kept in the GEMM kernel's layout is read row-major by another \
                     path: rebuilding it, which holds it twice in memory from now on"
                )
            });
            let rows = match &self.form {
                KernelForm::Panels(p) => p.to_row_major(),
                KernelForm::Bf16(w) => w.to_f32(),
            };
            Tensor::from_vec(rows, self.dims(), &Device::Cpu)
                .expect("out · in floats make an (out, in) tensor")
        })
    }

    /// Its number of elements (out · in), without rebuilding the tensor.
    pub fn elem_count(&self) -> usize {
        let (out, inp) = self.dims();
        out * inp
    }

    /// Whether it is held in bf16.
    pub fn is_bf16(&self) -> bool {
        matches!(self.form, KernelForm::Bf16(_))
    }
}

impl std::fmt::Debug for KernelWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (out, inp) = self.dims();
        let kind = if self.is_bf16() { ", bf16" } else { "" };
        write!(f, "KernelWeight({out} x {inp}{kind})")
    }
}

/// A linear layer's weight: the checkpoint's tensor, or a frozen one kept in the kernel's
/// layout ([`Linear::keep_in_kernel_layout`]).
#[derive(Debug, Clone)]
enum Weight {
    Tensor(Tensor),
    Kernel(Rc<KernelWeight>),
    /// A frozen weight kept in bf16 for decoding ([`Linear::keep_in_bf16`]): (out, in),
    /// row-major, products in f32.
    Bf16(Tensor),
}

/// A linear layer over a frozen or trainable weight, optionally carrying a LoRA adapter.
#[derive(Debug, Clone)]
pub struct Linear {
    /// (out, in) for nn.Linear; (in, out) for GPT-2's Conv1D (`conv1d` = true).
    weight: Weight,
    bias: Option<Tensor>,
    conv1d: bool,
    lora: Option<LoraAdapter>,
    switches: Rc<Switches>,
}

impl Linear {
    /// Loads `{path}.weight` (and `.bias`), attaching a LoRA adapter when the config targets it.
    pub fn load(
        b: &Builder,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        switches: &Rc<Switches>,
    ) -> Result<Self> {
        Self::load_inner(b, in_dim, out_dim, bias, false, switches)
    }

    /// Loads a GPT-2 Conv1D: the weight is stored transposed, (in, out).
    pub fn load_conv1d(
        b: &Builder,
        in_dim: usize,
        out_dim: usize,
        switches: &Rc<Switches>,
    ) -> Result<Self> {
        Self::load_inner(b, in_dim, out_dim, true, true, switches)
    }

    fn load_inner(
        b: &Builder,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        conv1d: bool,
        switches: &Rc<Switches>,
    ) -> Result<Self> {
        let shape = if conv1d {
            [in_dim, out_dim]
        } else {
            [out_dim, in_dim]
        };
        let weight = b.get(&shape, "weight")?;
        let bias = if bias {
            Some(b.get(&[out_dim], "bias")?)
        } else {
            None
        };
        let lora = match b.training() {
            Training::Lora(cfg) if cfg.targets(b.path()) => {
                Some(new_adapter(b, cfg, in_dim, out_dim)?)
            }
            _ => None,
        };
        Ok(Self {
            weight: Weight::Tensor(weight),
            bias,
            conv1d,
            lora,
            switches: switches.clone(),
        })
    }

    /// A linear layer from tensors already at hand (tied heads).
    pub fn from_weight(weight: Tensor, bias: Option<Tensor>, switches: &Rc<Switches>) -> Self {
        Self {
            weight: Weight::Tensor(weight),
            bias,
            conv1d: false,
            lora: None,
            switches: switches.clone(),
        }
    }

    /// The weight as stored in the checkpoint. After [`Self::keep_in_kernel_layout`] it is
    /// rebuilt from the panels on first use, and kept; after [`Self::keep_in_bf16`] it is the
    /// bf16 tensor.
    pub fn weight(&self) -> &Tensor {
        match &self.weight {
            Weight::Tensor(t) | Weight::Bf16(t) => t,
            Weight::Kernel(k) => k.tensor(),
        }
    }

    /// Whether the weight is kept in bf16 for decoding ([`Self::keep_in_bf16`]).
    pub fn is_bf16_for_decoding(&self) -> bool {
        matches!(self.weight, Weight::Bf16(_))
    }

    /// Whether [`Self::keep_in_bf16`] would convert this weight: frozen, f32, (out, in) on the
    /// CPU (nn.Linear layout), without an adapter.
    fn bf16_fits(&self) -> bool {
        matches!(&self.weight, Weight::Tensor(w)
            if w.rank() == 2 && w.dtype() == DType::F32 && w.device().is_cpu() && !w.track_op())
            && !self.conv1d
            && self.lora.is_none()
    }

    /// Keeps the weight in bf16 (rounded to nearest even) in place of the f32 tensor, for a
    /// model that only decodes: the products read half the bytes and compute in f32
    /// ([`crate::kernels::linear_bf16`]); they have no backward pass. Returns the replaced
    /// tensor's id and the bf16 tensor, or `None` where the weight stays as it is (trainable,
    /// adapted, Conv1D, in the kernel's layout, or not f32).
    pub(crate) fn keep_in_bf16(&mut self) -> Result<Option<(candle_core::TensorId, Tensor)>> {
        if !self.bf16_fits() {
            return Ok(None);
        }
        let Weight::Tensor(w) = &self.weight else {
            return Ok(None);
        };
        let (id, new) = (w.id(), w.to_dtype(DType::BF16)?.contiguous()?);
        self.weight = Weight::Bf16(new.clone());
        Ok(Some((id, new)))
    }

    /// Takes `new` (a bf16 tensor already made from the same weight, a tied head's) where the
    /// weight is the tensor `old` and [`Self::keep_in_bf16`] would convert it.
    pub(crate) fn share_bf16(&mut self, old: candle_core::TensorId, new: &Tensor) -> bool {
        let same = matches!(&self.weight, Weight::Tensor(w) if w.id() == old);
        if same && self.bf16_fits() && new.dtype() == DType::BF16 {
            self.weight = Weight::Bf16(new.clone());
            return true;
        }
        false
    }

    /// The tensor's id while the weight is the checkpoint's f32 tensor.
    pub(crate) fn tensor_id(&self) -> Option<candle_core::TensorId> {
        match &self.weight {
            Weight::Tensor(t) => Some(t.id()),
            _ => None,
        }
    }

    /// Whether [`Self::keep_in_kernel_layout`] would convert this weight: one the one-op
    /// layer takes ([`Self::frozen_parts`]: frozen, nn.Linear, no bias), still row-major, f32
    /// on the CPU, without adapter dropout at all (a training forward with it composes the
    /// layer), where that layer runs ([`crate::kernels::cpu::layer::enabled`]).
    pub(crate) fn kernel_layout_fits(&self) -> bool {
        let row_major_f32 = matches!(
            self.frozen_parts(),
            Some(Proj { w: FrozenRef::Rows(w), .. })
                if w.rank() == 2 && w.dtype() == DType::F32 && w.device().is_cpu()
        );
        row_major_f32
            && self.lora.as_ref().is_none_or(|l| l.dropout == 0.0)
            && crate::kernels::cpu::layer::enabled()
    }

    /// Keeps the weight in the GEMM kernel's layout ([`KernelWeight`]) in place of the
    /// checkpoint's tensor, where [`Self::kernel_layout_fits`]: the same memory once the
    /// model's parameter store holds the same [`KernelWeight`] (see
    /// [`crate::Model::keep_frozen_in_kernel_layout`]), and the one-op layer's products pack
    /// less. Returns the replaced tensor's id and the weight's new form, or `None` where the
    /// weight stays as it is. Only for layers the one-op layer will run: any other forward
    /// rebuilds the row-major tensor.
    pub(crate) fn keep_in_kernel_layout(
        &mut self,
    ) -> Result<Option<(candle_core::TensorId, Rc<KernelWeight>)>> {
        if !self.kernel_layout_fits() {
            return Ok(None);
        }
        let Weight::Tensor(w) = &self.weight else {
            return Ok(None);
        };
        let (out, inp) = w.dims2()?;
        let w = w.contiguous()?;
        // Under bf16 autocast on AVX512_BF16 (a `bf16 = true` run) every product reads the
        // weight rounded: keep it rounded, in bf16.
        let bf16 = crate::kernels::autocast_bf16() && crate::kernels::cpu::gemm::bf16_kernel();
        let form = crate::kernels::cpu::attn::with_data(&w, "weight", |d| {
            Ok(if bf16 {
                KernelForm::Bf16(Arc::new(crate::kernels::cpu::gemm::Bf16Weight::new(
                    d, out, inp,
                )))
            } else {
                KernelForm::Panels(Arc::new(crate::kernels::cpu::gemm::Panels::new(
                    d, out, inp,
                )))
            })
        })?;
        let kernel = Rc::new(KernelWeight {
            form,
            rows: OnceCell::new(),
        });
        let Weight::Tensor(old) =
            std::mem::replace(&mut self.weight, Weight::Kernel(kernel.clone()))
        else {
            unreachable!("matched above")
        };
        let id = old.id();
        Ok(Some((id, kernel)))
    }

    /// The adapter, if any.
    pub fn lora(&self) -> Option<&LoraAdapter> {
        self.lora.as_ref()
    }

    /// The frozen (out, in) weight and the active adapter, for ops that run a whole layer
    /// ([`crate::kernels::decoder_layer`]); `None` where the layer has a bias, a Conv1D or trainable weight, or
    /// an adapter dropout to apply.
    pub(crate) fn frozen_parts(&self) -> Option<Proj<'_>> {
        let w = match &self.weight {
            Weight::Tensor(t) => FrozenRef::Rows(t),
            Weight::Kernel(k) => match &k.form {
                KernelForm::Panels(p) => FrozenRef::Panels(p),
                KernelForm::Bf16(w) => FrozenRef::Bf16(w),
            },
            // The one-op layer and the fused products read f32 weights only.
            Weight::Bf16(_) => return None,
        };
        if self.bias.is_some() || self.conv1d || matches!(w, FrozenRef::Rows(t) if t.track_op()) {
            return None;
        }
        let lora = self
            .lora
            .as_ref()
            .filter(|_| self.switches.adapters_enabled());
        if lora.is_some_and(|l| self.switches.training() && l.dropout > 0.0) {
            return None;
        }
        let lora = lora.map(|l| AdapterRef {
            a: &l.a,
            b: &l.b,
            scale: l.scale,
        });
        Some(Proj { w, lora })
    }

    // x: (..., in) -> (..., out)
    /// y = x Wᵀ + b (+ the adapter's update when adapters are enabled).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let in_dim = dims[dims.len() - 1];
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let x2 = x.reshape((rows, in_dim))?;
        if let Weight::Bf16(w) = &self.weight {
            // No adapter (see `bf16_fits`), no gradient.
            let mut y = crate::kernels::linear_bf16(&x2, w)?;
            if let Some(bias) = &self.bias {
                y = y.broadcast_add(bias)?;
            }
            let mut out_shape = dims;
            *out_shape.last_mut().expect("x has at least one dim") = y.dim(1)?;
            return Ok(y.reshape(out_shape)?);
        }
        let lora = self
            .lora
            .as_ref()
            .filter(|_| self.switches.adapters_enabled());
        let dropout = lora.is_some_and(|l| self.switches.training() && l.dropout > 0.0);
        let mut y = match lora {
            Some(l) if !dropout => {
                crate::kernels::lora_linear(&x2, self.weight(), &l.a, &l.b, l.scale, self.conv1d)?
            }
            _ => crate::kernels::linear(&x2, self.weight(), self.conv1d)?,
        };
        if let Some(bias) = &self.bias {
            y = y.broadcast_add(bias)?;
        }
        if let Some(l) = lora.filter(|_| dropout) {
            // The adapter's products on dropped-out inputs, on the same ops as the base's.
            let xin = self.switches.dropout(&x2, l.dropout)?;
            let xa = crate::kernels::linear(&xin, &l.a, false)?;
            let delta = crate::kernels::linear(&xa, &l.b, false)?;
            y = (y + (delta * l.scale)?)?;
        }
        if !self.switches.grad_enabled() {
            // Cut the graph here: what feeds this layer can be freed as soon as it is used.
            y = y.detach();
        }
        let out_dim = y.dim(1)?;
        let mut out_shape = dims;
        *out_shape.last_mut().expect("x has at least one dim") = out_dim;
        Ok(y.reshape(out_shape)?)
    }
}

impl Linear {
    /// `forward(silu(gate)·up)` (the Llama MLP's down projection and its activation), as one
    /// op ([`crate::kernels::silu_mul_linear`]) where the layer has no active adapter and no
    /// bias; composed otherwise.
    // gate, up: (..., in) -> (..., out)
    pub fn forward_silu_mul(&self, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        if self.plain() {
            let (g2, u2) = (rows2(gate)?, rows2(up)?);
            let y = crate::kernels::silu_mul_linear(&g2, &u2, self.weight())?;
            return self.finish(y, gate.dims());
        }
        self.forward(&crate::kernels::silu_mul(gate, up)?)
    }

    /// `residual + forward_silu_mul(gate, up)`: with a frozen W, one op that keeps neither the
    /// MLP-wide activation nor the projection's output for the backward pass.
    // gate, up: (..., in), residual: (..., out) -> (..., out)
    pub fn forward_silu_mul_residual(
        &self,
        gate: &Tensor,
        up: &Tensor,
        residual: &Tensor,
    ) -> Result<Tensor> {
        if self.plain() {
            let (g2, u2, r2) = (rows2(gate)?, rows2(up)?, rows2(residual)?);
            let y = crate::kernels::silu_mul_linear_residual(&g2, &u2, self.weight(), &r2)?;
            return self.finish(y, gate.dims());
        }
        Ok((residual + self.forward_silu_mul(gate, up)?)?)
    }

    /// `residual + forward(x)`: one op where the layer has no active adapter and no bias, so
    /// the layer's output is not kept beside the sum.
    // x: (..., in), residual: (..., out) -> (..., out)
    pub fn forward_residual(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        if self.plain() {
            let (x2, r2) = (rows2(x)?, rows2(residual)?);
            let y = crate::kernels::linear_residual(&x2, self.weight(), &r2)?;
            return self.finish(y, x.dims());
        }
        Ok((residual + self.forward(x)?)?)
    }

    /// log softmax(x·Wᵀ / temperature)[target] per row, for an LM head: one op without the
    /// vocabulary-sized logits where the layer is a frozen plain product (see
    /// [`crate::kernels::head_token_logprobs`]), otherwise the forward and
    /// [`crate::kernels::token_logprobs`].
    // x: (..., in), targets: (...) u32 -> (...)
    pub fn token_logprobs(&self, x: &Tensor, targets: &Tensor, temperature: f64) -> Result<Tensor> {
        if self.plain() {
            let keep = self.switches.grad_enabled();
            if let Some(lp) =
                crate::kernels::head_token_logprobs(x, self.weight(), targets, temperature, keep)?
            {
                return Ok(if keep { lp } else { lp.detach() });
            }
        }
        let logits = self.forward(x)?.to_dtype(DType::F32)?;
        let scaled = if temperature > 0.0 && (temperature - 1.0).abs() > 1e-12 {
            (logits / temperature)?
        } else {
            logits
        };
        crate::kernels::token_logprobs(&scaled, targets)
    }

    /// No adapter in use, no bias, nn.Linear layout: the fused ops' case.
    fn plain(&self) -> bool {
        !matches!(self.weight, Weight::Bf16(_))
            && self.bias.is_none()
            && !self.conv1d
            && (self.lora.is_none() || !self.switches.adapters_enabled())
    }

    /// A fused op's (rows, out) result: detached without gradients, in the input's shape.
    fn finish(&self, mut y: Tensor, in_dims: &[usize]) -> Result<Tensor> {
        if !self.switches.grad_enabled() {
            y = y.detach();
        }
        let mut out_shape = in_dims.to_vec();
        *out_shape.last_mut().expect("at least one dim") = y.dim(1)?;
        Ok(y.reshape(out_shape)?)
    }
}

/// A tensor as (rows, last dim).
fn rows2(x: &Tensor) -> Result<Tensor> {
    let dims = x.dims();
    let last = dims[dims.len() - 1];
    Ok(x.reshape((x.elem_count() / last.max(1), last))?)
}

fn new_adapter(
    b: &Builder,
    cfg: &LoraConfig,
    in_dim: usize,
    out_dim: usize,
) -> Result<LoraAdapter> {
    // PEFT's init: A ~ kaiming_uniform(a=√5) = U(-1/√in, 1/√in), B = 0, so the adapted model
    // starts exactly at the base model.
    let bound = 1.0 / (in_dim as f64).sqrt();
    let a = b.uniform(&[cfg.r, in_dim], bound)?;
    let bz = Tensor::zeros((out_dim, cfg.r), b.dtype(), b.device())?;
    let base = crate::lora::peft_module_name(b.path());
    let a = b.new_trainable(format!("{base}.lora_A.weight"), a)?;
    let bm = b.new_trainable(format!("{base}.lora_B.weight"), bz)?;
    Ok(LoraAdapter {
        a,
        b: bm,
        scale: cfg.scale(),
        dropout: cfg.lora_dropout,
    })
}

/// A token (or position) embedding table.
#[derive(Debug, Clone)]
pub struct Embedding {
    weight: Tensor,
    /// Kept in bf16 for decoding ([`Embedding::keep_in_bf16`]): rows widened to f32 on lookup.
    bf16: bool,
}

impl Embedding {
    /// Loads `{path}.weight` of shape (n, dim).
    pub fn load(b: &Builder, n: usize, dim: usize) -> Result<Self> {
        Ok(Self {
            weight: b.get(&[n, dim], "weight")?,
            bf16: false,
        })
    }

    /// The dtype of the rows it returns (f32 for a table kept in bf16 for decoding).
    pub fn dtype(&self) -> DType {
        if self.bf16 {
            DType::F32
        } else {
            self.weight.dtype()
        }
    }

    /// Keeps a frozen f32 table in bf16 (see [`Linear::keep_in_bf16`]); lookups widen the rows
    /// back to f32, exactly. Returns the replaced tensor's id and the bf16 table.
    pub(crate) fn keep_in_bf16(&mut self) -> Result<Option<(candle_core::TensorId, Tensor)>> {
        let w = &self.weight;
        if self.bf16 || w.dtype() != DType::F32 || !w.device().is_cpu() || w.track_op() {
            return Ok(None);
        }
        let (id, new) = (w.id(), w.to_dtype(DType::BF16)?.contiguous()?);
        self.weight = new.clone();
        self.bf16 = true;
        Ok(Some((id, new)))
    }

    /// The table, (n, dim).
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    // ids: (b, t) u32 -> (b, t, dim)
    /// Looks rows up; differentiable with respect to the table.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let (bsz, t) = ids.dims2()?;
        let flat = ids.flatten_all()?;
        let rows = if self.bf16 {
            self.weight.index_select(&flat, 0)?.to_dtype(DType::F32)?
        } else {
            crate::kernels::embedding(&self.weight, &flat)?
        };
        Ok(rows.reshape((bsz, t, self.weight.dim(1)?))?)
    }
}

/// Llama's RMSNorm.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    /// Loads `{path}.weight`.
    pub fn load(b: &Builder, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: b.get(&[dim], "weight")?,
            eps,
        })
    }
    // x: (..., h) -> (..., h)
    /// Normalises the last dimension.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        crate::kernels::rms_norm(x, &self.weight, self.eps)
    }

    /// The weight and epsilon.
    pub(crate) fn parts(&self) -> (&Tensor, f64) {
        (&self.weight, self.eps)
    }
}

/// LayerNorm with weight and bias (GPT-2, OPT).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    /// Loads `{path}.weight` and `{path}.bias`.
    pub fn load(b: &Builder, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: b.get(&[dim], "weight")?,
            bias: b.get(&[dim], "bias")?,
            eps,
        })
    }
    // x: (..., h) -> (..., h)
    /// Normalises the last dimension.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        crate::kernels::layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}
