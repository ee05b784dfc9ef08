//! GPT-2 (and DistilGPT-2, and GPT-2-shaped fine-tunes): a pre-LayerNorm decoder with learned
//! absolute positions (`wpe`), a fused `c_attn` projection producing q, k and v, a `gelu_new`
//! MLP of width `n_inner` (4 × `n_embd` by default), and an LM head tied to the token
//! embedding `wte`. Linear layers are OpenAI's Conv1D, whose weights are stored transposed,
//! (in, out). Reference: transformers' `modeling_gpt2.py` (`GPT2Model`, `GPT2Attention`);
//! tensor names are `transformer.h.N.attn.c_attn`, ..., or without the `transformer.` prefix in
//! the original OpenAI checkpoints (`wte.weight`, `h.0.ln_1.weight`, ...).

use std::rc::Rc;

use candle_core::Tensor;
use serde::Deserialize;

use crate::kernels::{sdpa, KvCache};
use crate::nn::{Embedding, LayerNorm, Linear, Switches};
use crate::weights::Builder;
use crate::{Error, Result};

/// config.json of a GPT-2 model (HF field names).
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Model width.
    pub n_embd: usize,
    /// Number of decoder blocks.
    pub n_layer: usize,
    /// Attention heads.
    pub n_head: usize,
    /// Rows of the position table: the longest sequence the model accepts.
    pub n_positions: usize,
    /// MLP width; `null` means 4 × n_embd.
    pub n_inner: Option<usize>,
    /// MLP activation.
    #[serde(default = "default_act")]
    pub activation_function: String,
    /// LayerNorm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    /// Divide attention scores by sqrt(head_dim).
    #[serde(default = "yes")]
    pub scale_attn_weights: bool,
    /// Also divide attention scores of layer i by i + 1 (Mistral/Stanford CRFM GPT-2s).
    #[serde(default)]
    pub scale_attn_by_inverse_layer_idx: bool,
    /// Whether the LM head is `wte` (GPT-2 always ties unless told otherwise).
    #[serde(default = "yes")]
    pub tie_word_embeddings: bool,
}

fn default_act() -> String {
    "gelu_new".into()
}
fn default_eps() -> f64 {
    1e-5
}
fn yes() -> bool {
    true
}

impl Config {
    fn head_dim(&self) -> usize {
        self.n_embd / self.n_head
    }
    fn inner(&self) -> usize {
        self.n_inner.unwrap_or(4 * self.n_embd)
    }
}

struct Attention {
    c_attn: Linear,
    c_proj: Linear,
    n_heads: usize,
    head_dim: usize,
    scale: f64,
}

impl Attention {
    fn load(b: &Builder, cfg: &Config, layer: usize, sw: &Rc<Switches>) -> Result<Self> {
        let h = cfg.n_embd;
        let mut scale = 1.0;
        if cfg.scale_attn_weights {
            scale /= (cfg.head_dim() as f64).sqrt();
        }
        if cfg.scale_attn_by_inverse_layer_idx {
            scale /= (layer + 1) as f64;
        }
        Ok(Self {
            c_attn: Linear::load_conv1d(&b.pp("c_attn"), h, 3 * h, sw)?,
            c_proj: Linear::load_conv1d(&b.pp("c_proj"), h, h, sw)?,
            n_heads: cfg.n_head,
            head_dim: cfg.head_dim(),
            scale,
        })
    }

    // x: (b, t, h), bias: (b, 1, t, k) -> (b, t, h)
    fn forward(
        &self,
        x: &Tensor,
        bias: &Tensor,
        cache: Option<(&mut KvCache, usize)>,
    ) -> Result<Tensor> {
        let (b, t, h) = x.dims3()?;
        let qkv = self.c_attn.forward(x)?;
        // c_attn's output is [q | k | v] along the last dimension, each n_embd wide.
        let heads = |i: usize| -> Result<Tensor> {
            Ok(qkv
                .narrow(2, i * h, h)?
                .reshape((b, t, self.n_heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let (q, k, v) = (heads(0)?, heads(1)?, heads(2)?);
        let (k, v) = match cache {
            Some((c, layer)) => c.append(layer, &k, &v)?,
            None => (k, v),
        };
        let y = sdpa(&q, &k, &v, bias, self.scale)?;
        let y = y.transpose(1, 2)?.reshape((b, t, h))?;
        self.c_proj.forward(&y)
    }
}

struct Mlp {
    c_fc: Linear,
    c_proj: Linear,
    act: String,
}

impl Mlp {
    fn load(b: &Builder, cfg: &Config, sw: &Rc<Switches>) -> Result<Self> {
        let (h, i) = (cfg.n_embd, cfg.inner());
        Ok(Self {
            c_fc: Linear::load_conv1d(&b.pp("c_fc"), h, i, sw)?,
            c_proj: Linear::load_conv1d(&b.pp("c_proj"), i, h, sw)?,
            act: cfg.activation_function.clone(),
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = crate::ops::activation(&self.act, &self.c_fc.forward(x)?)?;
        self.c_proj.forward(&h)
    }
}

struct Block {
    ln_1: LayerNorm,
    attn: Attention,
    ln_2: LayerNorm,
    mlp: Mlp,
}

/// The GPT-2 decoder (without heads).
pub struct Gpt2 {
    wte: Embedding,
    wpe: Embedding,
    h: Vec<Block>,
    ln_f: LayerNorm,
    cfg: Config,
}

impl Gpt2 {
    /// Loads `transformer.*` (or the unprefixed names of the original OpenAI checkpoints).
    pub fn load(b: &Builder, cfg: &Config, sw: &Rc<Switches>) -> Result<Self> {
        if !cfg.n_embd.is_multiple_of(cfg.n_head) {
            return Err(Error::Config(format!(
                "gpt2: n_embd {} is not a multiple of n_head {}",
                cfg.n_embd, cfg.n_head
            )));
        }
        // GPT2LMHeadModel / GPT2ForSequenceClassification save under `transformer.`; the
        // original `gpt2` upload (a bare GPT2Model) has no prefix. Anything else falls through
        // to the prefixed names, so a missing tensor is reported under its usual name.
        let m = if !b.contains("transformer.wte.weight") && b.contains("wte.weight") {
            b.clone()
        } else {
            b.pp("transformer")
        };
        let eps = cfg.layer_norm_epsilon;
        let wte = Embedding::load(&m.pp("wte"), cfg.vocab_size, cfg.n_embd)?;
        let wpe = Embedding::load(&m.pp("wpe"), cfg.n_positions, cfg.n_embd)?;
        let h = (0..cfg.n_layer)
            .map(|i| {
                let l = m.pp("h").pp(i);
                Ok(Block {
                    ln_1: LayerNorm::load(&l.pp("ln_1"), cfg.n_embd, eps)?,
                    attn: Attention::load(&l.pp("attn"), cfg, i, sw)?,
                    ln_2: LayerNorm::load(&l.pp("ln_2"), cfg.n_embd, eps)?,
                    mlp: Mlp::load(&l.pp("mlp"), cfg, sw)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let ln_f = LayerNorm::load(&m.pp("ln_f"), cfg.n_embd, eps)?;
        Ok(Self {
            wte,
            wpe,
            h,
            ln_f,
            cfg: cfg.clone(),
        })
    }
}

/// Position ids as a (b, t) tensor of `wpe` rows; errors (instead of an out-of-range lookup)
/// when a sequence outgrows the table.
fn position_rows(
    positions: &[Vec<u32>],
    table_rows: usize,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let b = positions.len();
    let t = positions.first().map(|r| r.len()).unwrap_or(0);
    let flat: Vec<u32> = positions.iter().flatten().copied().collect();
    if let Some(&p) = flat.iter().find(|&&p| p as usize >= table_rows) {
        return Err(Error::Config(format!(
            "gpt2: position {p} is beyond the model's n_positions = {table_rows}; truncate the input"
        )));
    }
    Ok(Tensor::from_vec(flat, (b, t), device)?)
}

impl crate::model::Backbone for Gpt2 {
    fn forward(
        &self,
        ids: &Tensor,
        positions: &[Vec<u32>],
        bias: &Tensor,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let pos = position_rows(positions, self.cfg.n_positions, ids.device())?;
        let mut x = (self.wte.forward(ids)? + self.wpe.forward(&pos)?)?;
        for (i, block) in self.h.iter().enumerate() {
            let c = cache.as_deref_mut().map(|c| (c, i));
            let a = block.attn.forward(&block.ln_1.forward(&x)?, bias, c)?;
            x = (x + a)?;
            let m = block.mlp.forward(&block.ln_2.forward(&x)?)?;
            x = (x + m)?;
        }
        self.ln_f.forward(&x)
    }

    fn n_layers(&self) -> usize {
        self.cfg.n_layer
    }

    fn hidden_size(&self) -> usize {
        self.cfg.n_embd
    }

    fn embed_weight(&self) -> &Tensor {
        self.wte.weight()
    }
}

#[cfg(test)]
mod tests {
    use crate::model::{Batch, Heads, LoadOptions, Model};
    use crate::{Error, Training};

    fn tiny(training: Training) -> Model {
        let cfg = serde_json::json!({
            "model_type": "gpt2",
            "vocab_size": 50,
            "n_embd": 32,
            "n_layer": 2,
            "n_head": 4,
            "n_positions": 8,
            "n_inner": null,
            "scale_attn_by_inverse_layer_idx": true,
            "pad_token_id": 0,
        });
        let opts = LoadOptions {
            heads: Heads::LmAndScore,
            training,
            ..Default::default()
        };
        Model::random(cfg, &opts).unwrap()
    }

    /// Every weight (the Conv1D matrices, the fused c_attn split, `wpe`) receives a gradient.
    #[test]
    fn every_parameter_gets_a_gradient() {
        let model = tiny(Training::Full);
        let batch = Batch::pad(&[vec![3, 4, 5, 6], vec![7, 8]], 0, false);
        let h = model.hidden(&batch).unwrap();
        assert_eq!(h.dims(), &[2, 4, 32]);
        let lm = model.logits(&h).unwrap().sqr().unwrap().mean_all().unwrap();
        let score = model.scores(&h, &batch).unwrap().sum_all().unwrap();
        let grads = (lm + score).unwrap().backward().unwrap();
        let trainable = model.params().trainable();
        assert!(trainable
            .iter()
            .any(|(n, _)| n == "transformer.h.1.attn.c_attn.weight"));
        for (name, var) in &trainable {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient"));
            let norm = g
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(norm > 0.0, "{name}: zero gradient");
        }
    }

    #[test]
    fn input_longer_than_n_positions_is_an_error() {
        let model = tiny(Training::Frozen);
        let batch = Batch::pad(&[(1..=9).collect()], 0, false);
        match model.hidden(&batch) {
            Err(Error::Config(msg)) => assert!(msg.contains("n_positions"), "{msg}"),
            Err(e) => panic!("expected a config error, got {e}"),
            Ok(_) => panic!("9 tokens through 8 positions"),
        }
    }
}
