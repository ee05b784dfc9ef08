//! GGUF import: a llama-architecture GGUF (as llama.cpp writes it) becomes a Hugging Face
//! directory transformers loads as `LlamaForCausalLM`.
//!
//! Tensors are dequantised with candle's quantized module (F32, F16, Q8_0, Q4_0, Q4_1, Q4_K,
//! Q6_K and the rest candle reads). llama.cpp's converter permutes the rows of the Q and K
//! projections into its rotary layout; they are permuted back here, or the model produces
//! fluent-looking garbage. The tokenizer (byte-level BPE, `tokenizer.ggml.model = "gpt2"`) and
//! the chat template are rebuilt from the metadata.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{DType, Device, Tensor};
use serde_json::json;

use crate::save::{save_safetensors, write_atomic};
use crate::{Error, Result};

/// What a conversion did.
#[derive(Debug, Clone)]
pub struct ConvertReport {
    /// `general.architecture`.
    pub architecture: String,
    /// Tensors written.
    pub tensors: usize,
    /// Tokens in the vocabulary.
    pub vocab_size: usize,
    /// The directory written.
    pub out_dir: PathBuf,
    /// The weights' dtype.
    pub dtype: DType,
}

struct Meta<'a> {
    content: &'a Content,
    path: &'a Path,
    arch: String,
}

impl Meta<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }
    fn arch_key(&self, key: &str) -> Option<&Value> {
        self.get(&format!("{}.{key}", self.arch))
    }
    fn need_u64(&self, key: &str) -> Result<u64> {
        let v = self.arch_key(key).ok_or_else(|| {
            Error::bad_file(
                self.path,
                format!("metadata {}.{key} is missing", self.arch),
            )
        })?;
        v.to_u64()
            .or_else(|_| v.to_u32().map(u64::from))
            .map_err(|e| Error::bad_file(self.path, format!("metadata {}.{key}: {e}", self.arch)))
    }
    fn f64_or(&self, key: &str, default: f64) -> f64 {
        self.arch_key(key)
            .and_then(|v| v.to_f32().map(f64::from).or_else(|_| v.to_f64()).ok())
            .unwrap_or(default)
    }
    fn u32_of(&self, key: &str) -> Option<u32> {
        self.get(key).and_then(|v| v.to_u32().ok())
    }
    fn str_of(&self, key: &str) -> Option<&str> {
        self.get(key)
            .and_then(|v| v.to_string().ok())
            .map(|s| s.as_str())
    }
}

/// Converts `gguf_path` into an HF directory at `out_dir` with weights in `dtype` (F32 or BF16).
pub fn convert_gguf(gguf_path: &Path, out_dir: &Path, dtype: DType) -> Result<ConvertReport> {
    if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
        return Err(Error::Config(format!(
            "GGUF conversion writes f32, bf16 or f16, not {dtype:?}"
        )));
    }
    let mut file = File::open(gguf_path).map_err(|e| Error::io(gguf_path, e))?;
    let content = Content::read(&mut file)
        .map_err(|e| Error::bad_file(gguf_path, format!("not a readable GGUF file: {e}")))?;
    let arch = content
        .metadata
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .unwrap_or_default();
    if !matches!(arch.as_str(), "llama" | "mistral" | "qwen2") {
        return Err(Error::bad_file(
            gguf_path,
            format!("general.architecture is {arch:?}; only llama-architecture GGUF files (llama, mistral, qwen2) convert"),
        ));
    }
    let meta = Meta {
        content: &content,
        path: gguf_path,
        arch: arch.clone(),
    };
    let n_layers = meta.need_u64("block_count")? as usize;
    let hidden = meta.need_u64("embedding_length")? as usize;
    let n_head = meta.need_u64("attention.head_count")? as usize;
    let n_kv = meta
        .need_u64("attention.head_count_kv")
        .unwrap_or(n_head as u64) as usize;

    let device = Device::Cpu;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for name in content.tensor_infos.keys() {
        let hf = hf_name(name).ok_or_else(|| {
            Error::bad_file(
                gguf_path,
                format!("tensor {name:?} has no Hugging Face counterpart in a llama model"),
            )
        })?;
        let q = content
            .tensor(&mut file, name, &device)
            .map_err(|e| Error::bad_file(gguf_path, format!("tensor {name:?}: {e}")))?;
        let t = q.dequantize(&device).map_err(|e| {
            Error::bad_file(
                gguf_path,
                format!(
                    "tensor {name:?} ({:?}) cannot be dequantised: {e}",
                    q.dtype()
                ),
            )
        })?;
        let t = if name.ends_with("attn_q.weight") {
            unpermute(&t, n_head)?
        } else if name.ends_with("attn_k.weight") {
            unpermute(&t, n_kv)?
        } else {
            t
        };
        tensors.insert(hf, t.to_dtype(dtype)?);
    }
    let tie = !tensors.contains_key("lm_head.weight");
    let embed = tensors
        .get("model.embed_tokens.weight")
        .ok_or_else(|| Error::bad_file(gguf_path, "no token_embd.weight tensor"))?;
    let vocab_size = embed.dim(0)?;
    if embed.dim(1)? != hidden {
        return Err(Error::bad_file(
            gguf_path,
            format!(
                "token_embd has width {} but embedding_length is {hidden}",
                embed.dim(1)?
            ),
        ));
    }

    std::fs::create_dir_all(out_dir).map_err(|e| Error::io(out_dir, e))?;
    let n_tensors = tensors.len();
    save_safetensors(&out_dir.join("model.safetensors"), &tensors)?;

    let bos = meta.u32_of("tokenizer.ggml.bos_token_id");
    let eos = meta.u32_of("tokenizer.ggml.eos_token_id");
    let pad = meta.u32_of("tokenizer.ggml.padding_token_id");
    let dtype_name = match dtype {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => "float32",
    };
    let head_dim = hidden / n_head;
    let config = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": meta.need_u64("feed_forward_length")?,
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": meta.need_u64("context_length").unwrap_or(2048),
        "rms_norm_eps": meta.f64_or("attention.layer_norm_rms_epsilon", 1e-5),
        "rope_theta": meta.f64_or("rope.freq_base", 10000.0),
        "attention_bias": tensors.contains_key("model.layers.0.self_attn.q_proj.bias") && arch != "qwen2",
        "mlp_bias": false,
        "tie_word_embeddings": tie,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "torch_dtype": dtype_name,
        "initializer_range": 0.02,
    });
    write_json(&out_dir.join("config.json"), &config)?;
    write_json(
        &out_dir.join("generation_config.json"),
        &json!({"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad}),
    )?;
    let tokens = write_tokenizer(&meta, out_dir)?;
    if tokens != vocab_size {
        tracing::warn!("the tokenizer has {tokens} tokens but the embedding has {vocab_size} rows");
    }
    Ok(ConvertReport {
        architecture: arch,
        tensors: n_tensors,
        vocab_size,
        out_dir: out_dir.to_path_buf(),
        dtype,
    })
}

/// llama.cpp stores Q/K rows as reshape(n, hd/2, 2, in); transformers wants reshape(n, 2, hd/2, in).
// w: (n_heads * head_dim, in) -> same shape, rows reordered
pub fn unpermute(w: &Tensor, n_heads: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let hd = rows / n_heads;
    Ok(w.reshape((n_heads, hd / 2, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))?)
}

/// llama.cpp's permutation (the inverse of [`unpermute`]), for tests and round trips.
pub fn permute(w: &Tensor, n_heads: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let hd = rows / n_heads;
    Ok(w.reshape((n_heads, 2, hd / 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))?)
}

/// The HF name of a GGUF tensor.
fn hf_name(name: &str) -> Option<String> {
    let fixed = match name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, tail) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = tail.rsplit_once('.')?;
    let hf = match module {
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    write_atomic(
        path,
        serde_json::to_string_pretty(v)
            .expect("json serialises")
            .as_bytes(),
    )
}

/// Rebuilds tokenizer.json and tokenizer_config.json; returns the number of tokens.
fn write_tokenizer(meta: &Meta, out_dir: &Path) -> Result<usize> {
    let model = meta.str_of("tokenizer.ggml.model").unwrap_or("");
    if model != "gpt2" {
        return Err(Error::bad_file(
            meta.path,
            format!("tokenizer.ggml.model is {model:?}; only byte-level BPE (\"gpt2\") tokenizers convert so far"),
        ));
    }
    let list = |key: &str| -> Result<&Vec<Value>> {
        meta.get(key)
            .and_then(|v| v.to_vec().ok())
            .ok_or_else(|| Error::bad_file(meta.path, format!("metadata {key} is missing")))
    };
    let tokens: Vec<String> = list("tokenizer.ggml.tokens")?
        .iter()
        .map(|v| v.to_string().cloned().unwrap_or_default())
        .collect();
    let types: Vec<i32> = meta
        .get("tokenizer.ggml.token_type")
        .and_then(|v| v.to_vec().ok())
        .map(|v| v.iter().map(|t| t.to_i32().unwrap_or(1)).collect())
        .unwrap_or_else(|| vec![1; tokens.len()]);
    let merges: Vec<serde_json::Value> = list("tokenizer.ggml.merges")?
        .iter()
        .filter_map(|v| v.to_string().ok())
        .filter_map(|m| m.split_once(' ').map(|(a, b)| json!([a, b])))
        .collect();
    let vocab: serde_json::Map<String, serde_json::Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    // Token type 3 is CONTROL (special); 4 is USER_DEFINED (added, not special).
    let added: Vec<serde_json::Value> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| matches!(types.get(*i), Some(3) | Some(4)))
        .map(|(i, t)| {
            json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": types[i] == 4, "special": types[i] == 3})
        })
        .collect();
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    // llama.cpp's "smollm" pre-tokenizer splits digits one by one before GPT-2's regex, which
    // is what SmolLM's own tokenizer.json does with a Digits pre-tokenizer.
    let pre = match meta.str_of("tokenizer.ggml.pre").unwrap_or("default") {
        "smollm" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level]}),
        "gpt2" | "default" => byte_level,
        other => {
            tracing::warn!("tokenizer.ggml.pre = {other:?} is not known here; using GPT-2's byte-level split, which may tokenise some text differently from the original");
            byte_level
        }
    };
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre,
        "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": vocab, "merges": merges},
    });
    let text = serde_json::to_string(&tokenizer).expect("json serialises");
    // Check it loads before writing it.
    tokenizers::Tokenizer::from_bytes(text.as_bytes())
        .map_err(|e| Error::Tokenizer(format!("rebuilt tokenizer does not load: {e}")))?;
    write_atomic(&out_dir.join("tokenizer.json"), text.as_bytes())?;
    let name = |key: &str| {
        meta.u32_of(key)
            .and_then(|i| tokens.get(i as usize).cloned())
    };
    let mut cfg = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": name("tokenizer.ggml.bos_token_id"),
        "eos_token": name("tokenizer.ggml.eos_token_id"),
        "pad_token": name("tokenizer.ggml.padding_token_id"),
        "unk_token": name("tokenizer.ggml.unknown_token_id"),
        "add_bos_token": meta.get("tokenizer.ggml.add_bos_token").and_then(|v| v.to_bool().ok()).unwrap_or(false),
        "clean_up_tokenization_spaces": false,
        "model_max_length": meta.need_u64("context_length").unwrap_or(2048),
    });
    if let Some(t) = meta.str_of("tokenizer.chat_template") {
        cfg["chat_template"] = json!(t);
    }
    write_json(&out_dir.join("tokenizer_config.json"), &cfg)?;
    Ok(tokens.len())
}
