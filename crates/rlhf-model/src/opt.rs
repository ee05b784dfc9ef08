//! OPT (Meta's Open Pre-trained Transformers, 125m to 66b): a decoder with learned absolute
//! positions whose table is offset by 2 (`embed_positions` has max_position_embeddings + 2
//! rows, a fairseq legacy), ReLU MLPs (`fc1`, `fc2`), biases everywhere, and LayerNorm before
//! (`do_layer_norm_before`, most sizes) or after (opt-350m) each sub-block. When
//! `word_embed_proj_dim` differs from `hidden_size` (opt-350m), tokens are embedded at the
//! narrower width and `project_in` / `project_out` convert at the ends of the stack, so the LM
//! head (tied to `embed_tokens`) and the score head read `word_embed_proj_dim`-wide states.
//! Reference: transformers' `modeling_opt.py` (`OPTDecoder`, `OPTLearnedPositionalEmbedding`);
//! tensor names `model.decoder.layers.N.self_attn.q_proj`, ...
//!
//! Positions: transformers derives them from the attention mask (`cumsum(mask) * mask - 1`),
//! so a padding token gets position -1, i.e. row 1 of the table. [`Opt`] overrides
//! [`Backbone::positions`](crate::model::Backbone::positions) to match (padding reported as
//! [`PAD_POSITION`]): the logits transformers computes at right-padding positions depend on it.

use std::rc::Rc;

use candle_core::Tensor;
use serde::Deserialize;

use crate::kernels::{sdpa, KvCache};
use crate::nn::{Embedding, LayerNorm, Linear, Switches};
use crate::weights::Builder;
use crate::{Error, Result};

/// Rows the position table has before position 0 (fairseq reserved them for padding).
const OFFSET: u32 = 2;

/// The logical position OPT gives a padding token: transformers' -1, which the offset maps to
/// row 1 of `embed_positions`.
pub const PAD_POSITION: u32 = u32::MAX;

/// config.json of an OPT model (HF field names).
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Width of the decoder layers.
    pub hidden_size: usize,
    /// MLP width.
    pub ffn_dim: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads.
    pub num_attention_heads: usize,
    /// Longest sequence (the position table has 2 more rows).
    pub max_position_embeddings: usize,
    /// Width of the token embedding and of the heads; defaults to hidden_size.
    pub word_embed_proj_dim: Option<usize>,
    /// Pre-norm (true) or post-norm (false, opt-350m).
    #[serde(default = "yes")]
    pub do_layer_norm_before: bool,
    /// Checkpoints fine-tuned before transformers 4.20.1 have no final LayerNorm.
    #[serde(default, rename = "_remove_final_layer_norm")]
    pub remove_final_layer_norm: bool,
    /// Biases on every linear layer of the blocks.
    #[serde(default = "yes")]
    pub enable_bias: bool,
    /// LayerNorms with weight and bias (the only kind this crate loads).
    #[serde(default = "yes")]
    pub layer_norm_elementwise_affine: bool,
    /// MLP activation.
    #[serde(default = "default_act")]
    pub activation_function: String,
    /// Whether the LM head is `embed_tokens`.
    #[serde(default = "yes")]
    pub tie_word_embeddings: bool,
}

fn yes() -> bool {
    true
}
fn default_act() -> String {
    "relu".into()
}

/// OPT's LayerNorms use PyTorch's default epsilon; config.json has no field for it.
const LN_EPS: f64 = 1e-5;

impl Config {
    /// The width the token embedding and the heads see.
    pub fn embed_dim(&self) -> usize {
        self.word_embed_proj_dim.unwrap_or(self.hidden_size)
    }
    fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
    fn has_final_layer_norm(&self) -> bool {
        self.do_layer_norm_before && !self.remove_final_layer_norm
    }
}

struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    n_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn load(b: &Builder, cfg: &Config, sw: &Rc<Switches>) -> Result<Self> {
        let (h, bias) = (cfg.hidden_size, cfg.enable_bias);
        Ok(Self {
            q_proj: Linear::load(&b.pp("q_proj"), h, h, bias, sw)?,
            k_proj: Linear::load(&b.pp("k_proj"), h, h, bias, sw)?,
            v_proj: Linear::load(&b.pp("v_proj"), h, h, bias, sw)?,
            out_proj: Linear::load(&b.pp("out_proj"), h, h, bias, sw)?,
            n_heads: cfg.num_attention_heads,
            head_dim: cfg.head_dim(),
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
        let heads = |y: Tensor| -> Result<Tensor> {
            Ok(y.reshape((b, t, self.n_heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        // transformers scales the queries before the product (not the scores after it); same
        // order here, so rounding matches.
        let q = heads((self.q_proj.forward(x)? * (self.head_dim as f64).powf(-0.5))?)?;
        let k = heads(self.k_proj.forward(x)?)?;
        let v = heads(self.v_proj.forward(x)?)?;
        let (k, v) = match cache {
            Some((c, layer)) => c.append(layer, &k, &v)?,
            None => (k, v),
        };
        let y = sdpa(&q, &k, &v, bias, 1.0)?;
        let y = y.transpose(1, 2)?.reshape((b, t, h))?;
        self.out_proj.forward(&y)
    }
}

struct Layer {
    self_attn_layer_norm: LayerNorm,
    self_attn: Attention,
    final_layer_norm: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

/// The OPT decoder (without heads).
pub struct Opt {
    embed_tokens: Embedding,
    embed_positions: Embedding,
    project_in: Option<Linear>,
    layers: Vec<Layer>,
    final_layer_norm: Option<LayerNorm>,
    project_out: Option<Linear>,
    cfg: Config,
}

impl Opt {
    /// Loads `model.decoder.*` (or `decoder.*`, as a bare `OPTModel` saves it).
    pub fn load(b: &Builder, cfg: &Config, sw: &Rc<Switches>) -> Result<Self> {
        if !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads) {
            return Err(Error::Config(format!(
                "opt: hidden_size {} is not a multiple of num_attention_heads {}",
                cfg.hidden_size, cfg.num_attention_heads
            )));
        }
        if !cfg.layer_norm_elementwise_affine {
            return Err(Error::Config(
                "opt: layer_norm_elementwise_affine = false is not supported".into(),
            ));
        }
        let d = if !b.contains("model.decoder.embed_tokens.weight")
            && b.contains("decoder.embed_tokens.weight")
        {
            b.pp("decoder")
        } else {
            b.pp("model").pp("decoder")
        };
        let (h, e) = (cfg.hidden_size, cfg.embed_dim());
        let narrow = e != h;
        let embed_tokens = Embedding::load(&d.pp("embed_tokens"), cfg.vocab_size, e)?;
        let embed_positions = Embedding::load(
            &d.pp("embed_positions"),
            cfg.max_position_embeddings + OFFSET as usize,
            h,
        )?;
        let project_in = if narrow {
            Some(Linear::load(&d.pp("project_in"), e, h, false, sw)?)
        } else {
            None
        };
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let l = d.pp("layers").pp(i);
                Ok(Layer {
                    self_attn_layer_norm: LayerNorm::load(
                        &l.pp("self_attn_layer_norm"),
                        h,
                        LN_EPS,
                    )?,
                    self_attn: Attention::load(&l.pp("self_attn"), cfg, sw)?,
                    final_layer_norm: LayerNorm::load(&l.pp("final_layer_norm"), h, LN_EPS)?,
                    fc1: Linear::load(&l.pp("fc1"), h, cfg.ffn_dim, cfg.enable_bias, sw)?,
                    fc2: Linear::load(&l.pp("fc2"), cfg.ffn_dim, h, cfg.enable_bias, sw)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        // Post-norm models (opt-350m) end on a layer's own norm; transformers builds no final
        // LayerNorm for them even when the checkpoint carries one.
        let final_layer_norm = if cfg.has_final_layer_norm() {
            Some(LayerNorm::load(&d.pp("final_layer_norm"), h, LN_EPS)?)
        } else {
            None
        };
        let project_out = if narrow {
            Some(Linear::load(&d.pp("project_out"), h, e, false, sw)?)
        } else {
            None
        };
        Ok(Self {
            embed_tokens,
            embed_positions,
            project_in,
            layers,
            final_layer_norm,
            project_out,
            cfg: cfg.clone(),
        })
    }

    /// Rows of `embed_positions` for logical positions ([`PAD_POSITION`] → row 1).
    // positions: b rows of t -> (b, t) u32
    fn position_rows(
        &self,
        positions: &[Vec<u32>],
        device: &candle_core::Device,
    ) -> Result<Tensor> {
        let b = positions.len();
        let t = positions.first().map(|r| r.len()).unwrap_or(0);
        let max = self.cfg.max_position_embeddings;
        let mut flat = Vec::with_capacity(b * t);
        for &p in positions.iter().flatten() {
            if p == PAD_POSITION {
                flat.push(OFFSET - 1);
            } else if (p as usize) < max {
                flat.push(p + OFFSET);
            } else {
                return Err(Error::Config(format!(
                    "opt: position {p} is beyond max_position_embeddings = {max}; truncate the input"
                )));
            }
        }
        Ok(Tensor::from_vec(flat, (b, t), device)?)
    }
}

impl crate::model::Backbone for Opt {
    fn forward(
        &self,
        ids: &Tensor,
        positions: &[Vec<u32>],
        bias: &Tensor,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let mut x = self.embed_tokens.forward(ids)?;
        if let Some(p) = &self.project_in {
            x = p.forward(&x)?;
        }
        let pos = self.position_rows(positions, ids.device())?;
        x = (x + self.embed_positions.forward(&pos)?)?;
        let pre = self.cfg.do_layer_norm_before;
        for (i, l) in self.layers.iter().enumerate() {
            let c = cache.as_deref_mut().map(|c| (c, i));
            let h = if pre {
                l.self_attn_layer_norm.forward(&x)?
            } else {
                x.clone()
            };
            x = (x + l.self_attn.forward(&h, bias, c)?)?;
            if !pre {
                x = l.self_attn_layer_norm.forward(&x)?;
            }
            let h = if pre {
                l.final_layer_norm.forward(&x)?
            } else {
                x.clone()
            };
            let h = crate::ops::activation(&self.cfg.activation_function, &l.fc1.forward(&h)?)?;
            x = (x + l.fc2.forward(&h)?)?;
            if !pre {
                x = l.final_layer_norm.forward(&x)?;
            }
        }
        if let Some(n) = &self.final_layer_norm {
            x = n.forward(&x)?;
        }
        if let Some(p) = &self.project_out {
            x = p.forward(&x)?;
        }
        Ok(x)
    }

    /// transformers' rule: each real token counts the real tokens up to it, minus one;
    /// padding gets [`PAD_POSITION`] (transformers' -1, the table's row 1).
    fn positions(&self, mask: &[Vec<u8>]) -> Vec<Vec<u32>> {
        mask.iter()
            .map(|row| {
                let mut seen = 0u32;
                row.iter()
                    .map(|&m| {
                        if m == 0 {
                            PAD_POSITION
                        } else {
                            seen += 1;
                            seen - 1
                        }
                    })
                    .collect()
            })
            .collect()
    }

    fn n_layers(&self) -> usize {
        self.cfg.num_hidden_layers
    }

    /// The width the heads see: `word_embed_proj_dim` (after `project_out`).
    fn hidden_size(&self) -> usize {
        self.cfg.embed_dim()
    }

    fn embed_weight(&self) -> &Tensor {
        self.embed_tokens.weight()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::path::Path;

    use candle_core::{Device, Tensor};

    use super::PAD_POSITION;
    use crate::model::{Batch, Heads, LoadOptions, Model};
    use crate::weights::WeightSource;
    use crate::Error;

    const VOCAB: usize = 40;
    const HIDDEN: usize = 32;
    const EMBED: usize = 16;
    const FFN: usize = 48;
    const LAYERS: usize = 2;
    const MAX_POS: usize = 16;

    /// A config.json shaped like opt-350m: narrower embeddings and post-norm layers.
    fn config_json() -> serde_json::Value {
        serde_json::json!({
            "model_type": "opt",
            "vocab_size": VOCAB,
            "hidden_size": HIDDEN,
            "ffn_dim": FFN,
            "num_hidden_layers": LAYERS,
            "num_attention_heads": 4,
            "max_position_embeddings": MAX_POS,
            "word_embed_proj_dim": EMBED,
            "do_layer_norm_before": false,
            "pad_token_id": 1,
            "eos_token_id": 2,
        })
    }

    fn write_config(dir: &Path) {
        std::fs::write(dir.join("config.json"), config_json().to_string()).unwrap();
    }

    /// Random tensors under the names and shapes of an OPTForCausalLM checkpoint.
    fn random_tensors() -> HashMap<String, Tensor> {
        let mut t = HashMap::new();
        let mut put = |name: String, shape: &[usize]| {
            let v = Tensor::randn(0f32, 0.2, shape, &Device::Cpu).unwrap();
            t.insert(name, v);
        };
        let d = "model.decoder";
        put(format!("{d}.embed_tokens.weight"), &[VOCAB, EMBED]);
        put(
            format!("{d}.embed_positions.weight"),
            &[MAX_POS + 2, HIDDEN],
        );
        put(format!("{d}.project_in.weight"), &[HIDDEN, EMBED]);
        put(format!("{d}.project_out.weight"), &[EMBED, HIDDEN]);
        for i in 0..LAYERS {
            let l = format!("{d}.layers.{i}");
            for p in ["q_proj", "k_proj", "v_proj", "out_proj"] {
                put(format!("{l}.self_attn.{p}.weight"), &[HIDDEN, HIDDEN]);
                put(format!("{l}.self_attn.{p}.bias"), &[HIDDEN]);
            }
            for n in ["self_attn_layer_norm", "final_layer_norm"] {
                put(format!("{l}.{n}.weight"), &[HIDDEN]);
                put(format!("{l}.{n}.bias"), &[HIDDEN]);
            }
            put(format!("{l}.fc1.weight"), &[FFN, HIDDEN]);
            put(format!("{l}.fc1.bias"), &[FFN]);
            put(format!("{l}.fc2.weight"), &[HIDDEN, FFN]);
            put(format!("{l}.fc2.bias"), &[HIDDEN]);
        }
        t
    }

    fn build(dir: &Path, tensors: HashMap<String, Tensor>) -> crate::Result<Model> {
        let source = WeightSource::from_tensors(tensors, dir.join("model.safetensors"));
        let opts = LoadOptions {
            heads: Heads::LmAndScore,
            ..Default::default()
        };
        Model::from_source(dir, source, &opts)
    }

    #[test]
    fn projected_post_norm_opt_runs_with_head_width_embed_dim() {
        let dir = tempfile::tempdir().unwrap();
        write_config(dir.path());
        let model = build(dir.path(), random_tensors()).unwrap();
        assert_eq!(
            model.config.hidden_size, EMBED,
            "heads see word_embed_proj_dim"
        );
        let score = model
            .params()
            .get("score.weight")
            .expect("score head initialised");
        assert_eq!(score.tensor().dims(), &[1, EMBED]);

        let batch = Batch::pad(&[vec![5, 6, 7, 8, 9], vec![10, 11, 12]], 1, false);
        let hidden = model.hidden(&batch).unwrap();
        assert_eq!(hidden.dims(), &[2, 5, EMBED]);
        let logits = model.logits(&hidden).unwrap();
        assert_eq!(logits.dims(), &[2, 5, VOCAB]);
        let scores = model.scores(&hidden, &batch).unwrap();
        assert_eq!(scores.dims(), &[2]);
        let all = crate::ops::to_vec_f32(&logits).unwrap();
        assert!(all.iter().all(|x| x.is_finite()));

        // Padding cannot change a real token's output: a left-padded row equals its twin.
        let alone = Batch::pad(&[vec![10, 11, 12]], 1, false);
        let left = Batch::pad(&[vec![5, 6, 7, 8, 9], vec![10, 11, 12]], 1, true);
        let h_alone = crate::ops::to_vec_f32(&model.hidden(&alone).unwrap()).unwrap();
        let h_left = model.hidden(&left).unwrap();
        let h_left =
            crate::ops::to_vec_f32(&h_left.get(1).unwrap().narrow(0, 2, 3).unwrap()).unwrap();
        let d = h_alone
            .iter()
            .zip(&h_left)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(d < 1e-5, "left padding changed real outputs by {d}");
    }

    /// Every weight, project_in / project_out and the position table included, receives a
    /// gradient through the post-norm layers.
    #[test]
    fn every_parameter_gets_a_gradient() {
        let opts = LoadOptions {
            heads: Heads::LmAndScore,
            training: crate::Training::Full,
            ..Default::default()
        };
        let model = Model::random(config_json(), &opts).unwrap();
        let batch = Batch::pad(&[vec![3, 4, 5, 6], vec![7, 8]], 1, false);
        let h = model.hidden(&batch).unwrap();
        let lm = model.logits(&h).unwrap().sqr().unwrap().mean_all().unwrap();
        let score = model.scores(&h, &batch).unwrap().sum_all().unwrap();
        let grads = (lm + score).unwrap().backward().unwrap();
        let trainable = model.params().trainable();
        assert!(trainable
            .iter()
            .any(|(n, _)| n == "model.decoder.project_in.weight"));
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
    fn padding_gets_position_minus_one_as_in_transformers() {
        use crate::model::Backbone;
        let cfg: super::Config = serde_json::from_value(config_json()).unwrap();
        let b = crate::weights::Builder::new(
            WeightSource::from_tensors(random_tensors(), "random"),
            crate::Training::Frozen,
            Device::Cpu,
            candle_core::DType::F32,
            0.02,
            0,
        );
        let opt = super::Opt::load(&b, &cfg, &std::rc::Rc::default()).unwrap();
        let p = PAD_POSITION;
        let right = Batch::pad(&[vec![5, 6, 7], vec![10]], 1, false);
        assert_eq!(
            opt.positions(&right.attention_mask),
            vec![vec![0, 1, 2], vec![0, p, p]]
        );
        let left = Batch::pad(&[vec![5, 6, 7], vec![10]], 1, true);
        assert_eq!(
            opt.positions(&left.attention_mask),
            vec![vec![0, 1, 2], vec![p, p, 0]]
        );
        // Padding reads row 1 of the table, real position i row i + 2.
        let rows = opt.position_rows(&[vec![0, p, 3]], &Device::Cpu).unwrap();
        assert_eq!(rows.to_vec2::<u32>().unwrap(), vec![vec![2, 1, 5]]);
        assert!(opt
            .position_rows(&[vec![MAX_POS as u32]], &Device::Cpu)
            .is_err());
    }

    #[test]
    fn wrong_shape_names_the_tensor() {
        let dir = tempfile::tempdir().unwrap();
        write_config(dir.path());
        let mut tensors = random_tensors();
        let name = "model.decoder.layers.1.fc1.weight";
        tensors.insert(
            name.into(),
            Tensor::zeros((FFN, HIDDEN + 1), candle_core::DType::F32, &Device::Cpu).unwrap(),
        );
        match build(dir.path(), tensors) {
            Err(Error::ShapeMismatch {
                name: n,
                expected,
                found,
                ..
            }) => {
                assert_eq!(n, name);
                assert_eq!(expected, vec![FFN, HIDDEN]);
                assert_eq!(found, vec![FFN, HIDDEN + 1]);
            }
            Err(e) => panic!("expected ShapeMismatch, got {e}"),
            Ok(_) => panic!("a wrong-shaped {name} was accepted"),
        }
    }
}
