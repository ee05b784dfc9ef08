//! The Llama family: Llama 2/3 (with llama3 rope scaling), Mistral, Qwen2 (attention biases),
//! SmolLM. Pre-norm decoder with RMSNorm, rotary embeddings in the half-split layout,
//! grouped-query attention and a SwiGLU MLP; tensor names as in transformers'
//! `modeling_llama.py` (`model.layers.N.self_attn.q_proj`, ...).

use std::rc::Rc;

use candle_core::{Device, Tensor};
use serde::Deserialize;

use crate::kernels::KvCache;
use crate::kernels::{LayerParts, Proj};
use crate::nn::{Embedding, Linear, RmsNorm, Switches};
use crate::weights::Builder;
use crate::Result;

/// Rope settings, read from transformers 5's `rope_parameters` or older `rope_theta` +
/// `rope_scaling`.
#[derive(Debug, Clone, Deserialize, Default)]
pub struct RopeParameters {
    /// Base of the rotary frequencies.
    pub rope_theta: Option<f64>,
    /// "default", "linear" or "llama3".
    #[serde(alias = "type")]
    pub rope_type: Option<String>,
    /// Scaling factor (linear, llama3).
    pub factor: Option<f64>,
    /// llama3: low-frequency factor.
    pub low_freq_factor: Option<f64>,
    /// llama3: high-frequency factor.
    pub high_freq_factor: Option<f64>,
    /// llama3: the context length the model was pretrained with.
    pub original_max_position_embeddings: Option<usize>,
}

/// config.json of a Llama-family model (HF field names).
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    /// "llama", "mistral", "qwen2".
    pub model_type: String,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (GQA); defaults to the query heads.
    pub num_key_value_heads: Option<usize>,
    /// Per-head width; defaults to hidden_size / num_attention_heads.
    pub head_dim: Option<usize>,
    /// RMSNorm epsilon.
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// Older configs: top-level theta.
    pub rope_theta: Option<f64>,
    /// Older configs: scaling.
    pub rope_scaling: Option<RopeParameters>,
    /// transformers 5: everything rope in one place.
    pub rope_parameters: Option<RopeParameters>,
    /// Biases on q/k/v/o (Llama's flag; Qwen2 has q/k/v biases without it).
    #[serde(default)]
    pub attention_bias: bool,
    /// Biases in the MLP.
    #[serde(default)]
    pub mlp_bias: bool,
    /// MLP activation.
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Whether the LM head shares the embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_act() -> String {
    "silu".into()
}

impl Config {
    fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }
    fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }
    fn qkv_bias(&self) -> bool {
        self.attention_bias || self.model_type == "qwen2"
    }
    fn rope(&self) -> RopeParameters {
        let mut p = self
            .rope_parameters
            .clone()
            .or_else(|| self.rope_scaling.clone())
            .unwrap_or_default();
        if p.rope_theta.is_none() {
            p.rope_theta = self.rope_theta;
        }
        p
    }

    /// Inverse frequencies of the rotary embedding, llama3 scaling applied.
    pub fn inv_freq(&self) -> Result<Vec<f64>> {
        let p = self.rope();
        let theta = p.rope_theta.unwrap_or(10_000.0);
        let d = self.head_dim();
        let mut inv: Vec<f64> = (0..d / 2)
            .map(|i| 1.0 / theta.powf(2.0 * i as f64 / d as f64))
            .collect();
        match p.rope_type.as_deref().unwrap_or("default") {
            "default" => {}
            "linear" => {
                let f = p.factor.unwrap_or(1.0);
                inv.iter_mut().for_each(|x| *x /= f);
            }
            "llama3" => {
                let factor = p.factor.unwrap_or(8.0);
                let low = p.low_freq_factor.unwrap_or(1.0);
                let high = p.high_freq_factor.unwrap_or(4.0);
                let old_ctx = p.original_max_position_embeddings.unwrap_or(8192) as f64;
                let low_wavelen = old_ctx / low;
                let high_wavelen = old_ctx / high;
                for f in inv.iter_mut() {
                    let wavelen = 2.0 * std::f64::consts::PI / *f;
                    if wavelen > low_wavelen {
                        *f /= factor;
                    } else if wavelen >= high_wavelen {
                        let smooth = (old_ctx / wavelen - low) / (high - low);
                        *f = (1.0 - smooth) * *f / factor + smooth * *f;
                    }
                }
            }
            other => {
                return Err(crate::Error::Config(format!(
                    "rope_type {other:?} is not supported (default, linear, llama3)"
                )))
            }
        }
        Ok(inv)
    }
}

/// cos and sin of the rotary angles for each row's own positions.
// positions: (b, t) -> cos, sin: (b, 1, t, head_dim)
pub fn rope_cos_sin(
    inv_freq: &[f64],
    positions: &[Vec<u32>],
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let b = positions.len();
    let t = positions.first().map(|r| r.len()).unwrap_or(0);
    let half = inv_freq.len();
    let d = half * 2;
    let mut cos = vec![0f32; b * t * d];
    let mut sin = vec![0f32; b * t * d];
    for (bi, row) in positions.iter().enumerate() {
        for (ti, &p) in row.iter().enumerate() {
            let base = (bi * t + ti) * d;
            for (i, f) in inv_freq.iter().enumerate() {
                // transformers computes the angle in f32: match it, or logits drift at 1e-5.
                let angle = (p as f32) * (*f as f32);
                let (s, c) = angle.sin_cos();
                cos[base + i] = c;
                cos[base + i + half] = c;
                sin[base + i] = s;
                sin[base + i + half] = s;
            }
        }
    }
    let cos = Tensor::from_vec(cos, (b, 1, t, d), device)?;
    let sin = Tensor::from_vec(sin, (b, 1, t, d), device)?;
    Ok((cos, sin))
}

struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    n_heads: usize,
    n_kv: usize,
}

impl Attention {
    fn load(b: &Builder, cfg: &Config, sw: &Rc<Switches>) -> Result<Self> {
        let hd = cfg.head_dim();
        let (nh, nkv) = (cfg.num_attention_heads, cfg.kv_heads());
        let bias = cfg.qkv_bias();
        Ok(Self {
            q_proj: Linear::load(&b.pp("q_proj"), cfg.hidden_size, nh * hd, bias, sw)?,
            k_proj: Linear::load(&b.pp("k_proj"), cfg.hidden_size, nkv * hd, bias, sw)?,
            v_proj: Linear::load(&b.pp("v_proj"), cfg.hidden_size, nkv * hd, bias, sw)?,
            o_proj: Linear::load(
                &b.pp("o_proj"),
                nh * hd,
                cfg.hidden_size,
                cfg.attention_bias,
                sw,
            )?,
            n_heads: nh,
            n_kv: nkv,
        })
    }

    // x (normed) and residual: (b, t, h), cos/sin: (b, 1, t, d), bias: (b, 1, t, k)
    // -> residual + attention: (b, t, h)
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        x: &Tensor,
        residual: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        bias: &Tensor,
        segments: Option<&crate::kernels::Packing>,
        cache: Option<(&mut KvCache, usize)>,
    ) -> Result<Tensor> {
        let (q, k, v) = (
            self.q_proj.forward(x)?,
            self.k_proj.forward(x)?,
            self.v_proj.forward(x)?,
        );
        let (nh, nkv) = (self.n_heads, self.n_kv);
        let y = crate::kernels::attention(&q, &k, &v, cos, sin, bias, nh, nkv, segments, cache)?;
        self.o_proj.forward_residual(&y, residual)
    }
}

struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    act: String,
}

impl Mlp {
    fn load(b: &Builder, cfg: &Config, sw: &Rc<Switches>) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            gate_proj: Linear::load(&b.pp("gate_proj"), h, i, cfg.mlp_bias, sw)?,
            up_proj: Linear::load(&b.pp("up_proj"), h, i, cfg.mlp_bias, sw)?,
            down_proj: Linear::load(&b.pp("down_proj"), i, h, cfg.mlp_bias, sw)?,
            act: cfg.hidden_act.clone(),
        })
    }

    // x (normed) and residual: (b, t, h) -> residual + mlp(x)
    fn forward(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        let (gate, up) = (self.gate_proj.forward(x)?, self.up_proj.forward(x)?);
        if matches!(self.act.as_str(), "silu" | "swish") {
            return self
                .down_proj
                .forward_silu_mul_residual(&gate, &up, residual);
        }
        let h = (crate::ops::activation(&self.act, &gate)? * up)?;
        self.down_proj.forward_residual(&h, residual)
    }
}

struct Block {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

impl Block {
    /// q, k, v, o, gate, up and down: the one-op layer's order ([`crate::kernels::decoder_layer`]).
    fn projections(&self) -> [&Linear; 7] {
        let (a, m) = (&self.self_attn, &self.mlp);
        [
            &a.q_proj,
            &a.k_proj,
            &a.v_proj,
            &a.o_proj,
            &m.gate_proj,
            &m.up_proj,
            &m.down_proj,
        ]
    }

    /// [`Self::projections`], mutable.
    fn projections_mut(&mut self) -> [&mut Linear; 7] {
        let (a, m) = (&mut self.self_attn, &mut self.mlp);
        [
            &mut a.q_proj,
            &mut a.k_proj,
            &mut a.v_proj,
            &mut a.o_proj,
            &mut m.gate_proj,
            &mut m.up_proj,
            &mut m.down_proj,
        ]
    }
}

/// The Llama-family decoder (without heads).
pub struct Llama {
    embed_tokens: Embedding,
    layers: Vec<Block>,
    norm: RmsNorm,
    inv_freq: Vec<f64>,
    cfg: Config,
    switches: Rc<Switches>,
}

impl Llama {
    /// Loads `model.*` from the builder's checkpoint.
    pub fn load(b: &Builder, cfg: &Config, sw: &Rc<Switches>) -> Result<Self> {
        let m = b.pp("model");
        let embed_tokens = Embedding::load(&m.pp("embed_tokens"), cfg.vocab_size, cfg.hidden_size)?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let l = m.pp("layers").pp(i);
                Ok(Block {
                    input_layernorm: RmsNorm::load(
                        &l.pp("input_layernorm"),
                        cfg.hidden_size,
                        cfg.rms_norm_eps,
                    )?,
                    self_attn: Attention::load(&l.pp("self_attn"), cfg, sw)?,
                    post_attention_layernorm: RmsNorm::load(
                        &l.pp("post_attention_layernorm"),
                        cfg.hidden_size,
                        cfg.rms_norm_eps,
                    )?,
                    mlp: Mlp::load(&l.pp("mlp"), cfg, sw)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::load(&m.pp("norm"), cfg.hidden_size, cfg.rms_norm_eps)?;
        Ok(Self {
            embed_tokens,
            layers,
            norm,
            inv_freq: cfg.inv_freq()?,
            cfg: cfg.clone(),
            switches: sw.clone(),
        })
    }
}

impl Llama {
    /// The final hidden states, of every row or (with `rows`, flat indices into the batch's
    /// rows) of those rows only, `(1, rows, hidden)`.
    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        ids: &Tensor,
        positions: &[Vec<u32>],
        bias: &Tensor,
        segments: Option<&crate::kernels::Packing>,
        mut cache: Option<&mut KvCache>,
        rows: Option<&[usize]>,
    ) -> Result<Tensor> {
        let mut x = self.embed_tokens.forward(ids)?;
        let (cos, sin) = rope_cos_sin(&self.inv_freq, positions, ids.device())?;
        let (cos, sin) = (cos.to_dtype(x.dtype())?, sin.to_dtype(x.dtype())?);
        let last = self.layers.len().saturating_sub(1);
        let mut selected = false;
        for (i, layer) in self.layers.iter().enumerate() {
            if cache.is_none() {
                // The last layer computes the rows asked for alone, where it can.
                let want = if i == last { rows } else { None };
                if let Some(y) = self.fused_layer(layer, &x, &cos, &sin, bias, segments, want)? {
                    x = y;
                    selected = want.is_some();
                    continue;
                }
            }
            let h = layer.input_layernorm.forward(&x)?;
            let c = cache.as_deref_mut().map(|c| (c, i));
            x = layer
                .self_attn
                .forward(&h, &x, &cos, &sin, bias, segments, c)?;
            let h = layer.post_attention_layernorm.forward(&x)?;
            x = layer.mlp.forward(&h, &x)?;
        }
        if let (Some(rows), false) = (rows, selected) {
            x = crate::ops::select_rows(&x, rows)?;
        }
        self.norm.forward(&x)
    }
}

impl Llama {
    /// A packed row (every row's states, or those of `rows`): the fused attention masks
    /// each segment itself, so no (total × total) bias is built where it runs.
    fn run_packed(
        &self,
        ids: &Tensor,
        positions: &[Vec<u32>],
        packing: &crate::kernels::Packing,
        rows: Option<&[usize]>,
    ) -> Result<Tensor> {
        let dtype = self.embed_tokens.dtype();
        if crate::kernels::cpu::attn::fused_enabled() {
            let placeholder = Tensor::zeros((1, 1, 1, 1), dtype, ids.device())?;
            return self.run(ids, positions, &placeholder, Some(packing), None, rows);
        }
        let bias = crate::kernels::packed_attention_bias(packing, ids.device())?.to_dtype(dtype)?;
        self.run(ids, positions, &bias, None, None, rows)
    }

    /// Whether the MLP's activation is the one the one-op layer computes (silu).
    fn one_op_activation(&self) -> bool {
        matches!(self.cfg.hidden_act.as_str(), "silu" | "swish")
    }

    /// The layer as one op ([`crate::kernels::decoder_layer`]) where it can run.
    #[allow(clippy::too_many_arguments)]
    fn fused_layer(
        &self,
        layer: &Block,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        bias: &Tensor,
        segments: Option<&crate::kernels::Packing>,
        rows: Option<&[usize]>,
    ) -> Result<Option<Tensor>> {
        if !self.one_op_activation() {
            return Ok(None);
        }
        fn proj(l: &Linear) -> Option<Proj<'_>> {
            l.frozen_parts()
        }
        let projs = layer.projections().map(proj);
        if projs.iter().any(Option::is_none) {
            return Ok(None);
        }
        let a = &layer.self_attn;
        let parts = LayerParts {
            norm1: layer.input_layernorm.parts(),
            projs: projs.map(|p| p.expect("checked above")),
            norm2: layer.post_attention_layernorm.parts(),
            heads: (a.n_heads, a.n_kv, self.cfg.head_dim()),
            grad: self.switches.grad_enabled(),
        };
        crate::kernels::decoder_layer(x, &parts, cos, sin, bias, segments, rows)
    }
}

impl crate::model::Backbone for Llama {
    fn keep_frozen_in_kernel_layout(
        &mut self,
        replaced: &mut crate::model::Replaced<'_>,
    ) -> Result<()> {
        // Only layers the one-op layer runs ([`Self::fused_layer`]): every projection must
        // fit, or the layer composes and would rebuild the row-major weights.
        if !self.one_op_activation() {
            return Ok(());
        }
        for l in &mut self.layers {
            if !l.projections().iter().all(|p| p.kernel_layout_fits()) {
                continue;
            }
            for p in l.projections_mut() {
                if let Some((old, kernel)) = p.keep_in_kernel_layout()? {
                    replaced(old, kernel)?;
                }
            }
        }
        Ok(())
    }

    fn keep_frozen_in_bf16(
        &mut self,
        embedding: bool,
        replaced: &mut crate::model::ReplacedBf16<'_>,
    ) -> Result<()> {
        if embedding {
            if let Some((old, new)) = self.embed_tokens.keep_in_bf16()? {
                replaced(old, new)?;
            }
        }
        for l in &mut self.layers {
            for p in l.projections_mut() {
                if let Some((old, new)) = p.keep_in_bf16()? {
                    replaced(old, new)?;
                }
            }
        }
        Ok(())
    }

    fn forward(
        &self,
        ids: &Tensor,
        positions: &[Vec<u32>],
        bias: &Tensor,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        self.run(ids, positions, bias, None, cache, None)
    }

    fn forward_packed(
        &self,
        ids: &Tensor,
        positions: &[Vec<u32>],
        packing: &crate::kernels::Packing,
    ) -> Result<Tensor> {
        self.run_packed(ids, positions, packing, None)
    }

    fn forward_packed_rows(
        &self,
        ids: &Tensor,
        positions: &[Vec<u32>],
        packing: &crate::kernels::Packing,
        rows: &[usize],
    ) -> Result<Tensor> {
        self.run_packed(ids, positions, packing, Some(rows))
    }

    fn packs_natively(&self) -> bool {
        crate::kernels::cpu::attn::fused_enabled()
    }

    fn n_layers(&self) -> usize {
        self.cfg.num_hidden_layers
    }

    fn hidden_size(&self) -> usize {
        self.cfg.hidden_size
    }

    fn embed_weight(&self) -> &Tensor {
        self.embed_tokens.weight()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: serde_json::Value) -> Config {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn llama3_rope_scaling_matches_transformers() {
        // Expected values: transformers 5.23 ROPE_INIT_FUNCTIONS["llama3"] on this config
        // (hidden 256, 4 heads, head_dim 64, theta 5e5, factor 8, low 1, high 4, original 8192),
        // inv_freq at indices 0, 5, 10, 15, 20, 25, 31.
        let cfg = config(serde_json::json!({
            "model_type": "llama", "vocab_size": 10, "hidden_size": 256, "intermediate_size": 8,
            "num_hidden_layers": 1, "num_attention_heads": 4, "head_dim": 64,
            "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
        }));
        let inv = cfg.inv_freq().unwrap();
        let want = [
            (0, 1.0),
            (5, 0.12868738174438477),
            (10, 0.016560440883040428),
            (15, 0.0013718936825171113),
            (20, 3.428102354519069e-05),
            (25, 4.411534519022098e-06),
            (31, 3.76732259610435e-07),
        ];
        for (i, w) in want {
            assert!(
                (inv[i] - w).abs() <= 1e-6 * w,
                "inv_freq[{i}] = {} vs {w}",
                inv[i]
            );
        }
    }

    #[test]
    fn rope_theta_is_read_from_either_place() {
        let base = serde_json::json!({
            "model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8,
            "num_hidden_layers": 1, "num_attention_heads": 1
        });
        let mut old = base.clone();
        old["rope_theta"] = 1e6.into();
        let mut new = base.clone();
        new["rope_parameters"] = serde_json::json!({"rope_theta": 1e6, "rope_type": "default"});
        for c in [old, new] {
            let inv = config(c).inv_freq().unwrap();
            assert!((inv[1] - 1e6f64.powf(-2.0 / 8.0)).abs() < 1e-12);
        }
        // No theta anywhere: Llama's default 1e4.
        let inv = config(base).inv_freq().unwrap();
        assert!((inv[1] - 0.1).abs() < 1e-12);
        // An unknown rope type is an error, not a silent default.
        let mut bad = serde_json::json!({
            "model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8,
            "num_hidden_layers": 1, "num_attention_heads": 1
        });
        bad["rope_scaling"] = serde_json::json!({"type": "yarn", "factor": 4.0});
        assert!(config(bad).inv_freq().is_err());
    }
}
