//! GGUF import: a llama-architecture GGUF (as llama.cpp writes it) becomes a Hugging Face
//! directory that transformers loads as `LlamaForCausalLM` (or `Qwen2ForCausalLM` for qwen2).
//!
//! Tensors are dequantised with candle's quantized module (F32, F16, BF16, Q4_0, Q4_1, Q5_0,
//! Q5_1, Q8_0 and the K-quants) and written as `model.safetensors` in f32, bf16 or f16.
//! llama.cpp's converter permutes the rows of the llama Q and K projections (weights and biases)
//! into its interleaved rotary layout; they are permuted back here, or the model produces
//! fluent-looking garbage. qwen2 uses llama.cpp's NEOX rotary layout, so its Q/K are stored as
//! transformers has them and are left alone. The tokenizer (byte-level BPE,
//! `tokenizer.ggml.model = "gpt2"`), its pre-tokenizer split and the chat template are rebuilt
//! from the metadata; SentencePiece (`"llama"`) vocabularies are refused with a clear error.
//!
//! Everything is prepared in memory before the first file is written, and every file is written
//! to a temporary name in `out_dir` and renamed, so a failed conversion leaves no half-written
//! file under a real name.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, TensorInfo, Value};
use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value as Json};

use crate::save::{save_safetensors, write_atomic};
use crate::{Error, Result};

/// What a conversion did (for the CLI to print).
#[derive(Debug, Clone)]
pub struct ConvertReport {
    /// `general.architecture` of the GGUF file.
    pub architecture: String,
    /// Tensors written to model.safetensors.
    pub tensors: usize,
    /// Rows of the embedding matrix (config.json's `vocab_size`).
    pub vocab_size: usize,
    /// The directory written.
    pub out_dir: PathBuf,
    /// The weights' dtype.
    pub dtype: DType,
}

/// The GGUF architectures that convert, for error messages.
const SUPPORTED_ARCHS: &str = "llama, mistral, qwen2";

/// How a GGUF architecture maps onto transformers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    /// `llama`/`mistral`: `LlamaForCausalLM`; llama.cpp permuted the Q/K rows.
    Llama,
    /// `qwen2`: `Qwen2ForCausalLM` (q/k/v biases); NEOX rotary, Q/K rows as transformers has them.
    Qwen2,
}

impl Family {
    fn of(arch: &str) -> Option<Family> {
        match arch {
            "llama" | "mistral" => Some(Family::Llama),
            "qwen2" => Some(Family::Qwen2),
            _ => None,
        }
    }
    fn permuted_qk(self) -> bool {
        self == Family::Llama
    }
}

/// That tensor `name` has elements, whole blocks of its type, and bytes inside the file, all
/// computed without overflow.
fn check_tensor_extent(
    path: &Path,
    name: &str,
    info: &TensorInfo,
    content: &Content,
    file_len: u64,
) -> Result<()> {
    let dims = info.shape.dims();
    let bad = |why: String| {
        Err(Error::bad_file(
            path,
            format!("tensor {name:?} ({dims:?}): {why}"),
        ))
    };
    let Some(elems) = dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d)) else {
        return bad("more elements than memory holds".into());
    };
    if elems == 0 {
        return bad("no elements".into());
    }
    let (block, type_size) = (info.ggml_dtype.block_size(), info.ggml_dtype.type_size());
    if elems % block != 0 {
        return bad(format!(
            "{elems} elements are not whole blocks of {block} ({:?})",
            info.ggml_dtype
        ));
    }
    let end = (elems / block)
        .checked_mul(type_size)
        .and_then(|bytes| u64::try_from(bytes).ok())
        .and_then(|bytes| {
            content
                .tensor_data_offset
                .checked_add(info.offset)?
                .checked_add(bytes)
        });
    match end {
        Some(end) if end <= file_len => Ok(()),
        _ => bad(format!(
            "its data would end past the end of the file ({file_len} bytes): the file is \
             truncated or damaged"
        )),
    }
}

/// Converts `gguf_path` into a Hugging Face directory at `out_dir` with weights in `dtype`
/// (F32 or BF16; F16 is accepted too): config.json, generation_config.json, model.safetensors,
/// tokenizer.json and tokenizer_config.json.
pub fn convert_gguf(gguf_path: &Path, out_dir: &Path, dtype: DType) -> Result<ConvertReport> {
    if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
        return Err(Error::Config(format!(
            "GGUF conversion writes f32, bf16 or f16 weights, not {dtype:?}"
        )));
    }
    let file = File::open(gguf_path).map_err(|e| Error::io(gguf_path, e))?;
    let file_len = file.metadata().map_err(|e| Error::io(gguf_path, e))?.len();
    // Content::read does tens of thousands of small reads (one per vocabulary string).
    let mut reader = BufReader::new(file);
    let content = match Content::read(&mut reader) {
        Ok(c) => c,
        Err(e) => return Err(unreadable(gguf_path, e)),
    };
    let arch = match content.metadata.get("general.architecture") {
        Some(Value::String(s)) => s.clone(),
        _ => {
            return Err(Error::bad_file(
                gguf_path,
                "no general.architecture in the GGUF metadata",
            ))
        }
    };
    let family = Family::of(&arch).ok_or_else(|| {
        Error::bad_file(
            gguf_path,
            format!(
                "general.architecture is {arch:?}; only llama-architecture GGUF files convert \
                 ({SUPPORTED_ARCHS})"
            ),
        )
    })?;
    let meta = Meta {
        md: &content.metadata,
        path: gguf_path,
        arch: arch.clone(),
    };
    let hp = Hparams::read(&meta, &content)?;

    // The tokenizer first: it is cheap, and an unsupported one should fail before the slow part.
    let tok = build_tokenizer(&meta, hp.context)?;

    let device = Device::Cpu;
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let mut rope_freqs: Option<Vec<f32>> = None;
    for name in names {
        // Checked before candle reads it: candle multiplies the sizes unchecked, and turns an
        // empty tensor's byte buffer into a typed slice from a dangling pointer (undefined
        // behaviour); both found by fuzz/gguf.
        check_tensor_extent(
            gguf_path,
            name,
            &content.tensor_infos[name],
            &content,
            file_len,
        )?;
        let read = |reader: &mut BufReader<File>| -> Result<Tensor> {
            let q = content
                .tensor(reader, name, &device)
                .map_err(|e| Error::bad_file(gguf_path, format!("tensor {name:?}: {e}")))?;
            q.dequantize(&device).map_err(|e| {
                Error::bad_file(
                    gguf_path,
                    format!(
                        "tensor {name:?} ({:?}) cannot be dequantised: {e}",
                        q.dtype()
                    ),
                )
            })
        };
        // llama.cpp's Llama 3.1+ rope scaling: per-frequency divisors, not a weight.
        if name == "rope_freqs.weight" {
            rope_freqs = Some(read(&mut reader)?.flatten_all()?.to_vec1::<f32>()?);
            continue;
        }
        let hf = hf_name(name).ok_or_else(|| {
            Error::bad_file(
                gguf_path,
                format!("tensor {name:?} has no Hugging Face counterpart in a {arch} model"),
            )
        })?;
        let found = content.tensor_infos[name].shape.dims().to_vec();
        if let Some(expected) = hp.expected_shape(&hf) {
            if found != expected {
                return Err(Error::bad_file(
                    gguf_path,
                    format!(
                        "tensor {name:?} has shape {found:?}; the metadata ({arch}.*) implies \
                         {expected:?}"
                    ),
                ));
            }
        }
        let t = read(&mut reader)?;
        let t = match (family.permuted_qk(), qk_role(name)) {
            (true, Some(QK::Q)) => unpermute(&t, hp.n_head)?,
            (true, Some(QK::K)) => unpermute(&t, hp.n_kv)?,
            _ => t,
        };
        tensors.insert(hf, t.to_dtype(dtype)?);
    }

    let embed = tensors
        .get("model.embed_tokens.weight")
        .ok_or_else(|| Error::MissingTensor {
            path: gguf_path.to_path_buf(),
            name: "token_embd.weight".into(),
            hint: String::new(),
        })?;
    let vocab_size = embed.dim(0)?;
    if tok.n_tokens != vocab_size {
        tracing::warn!(
            "{}: the tokenizer has {} tokens but the embedding has {vocab_size} rows",
            gguf_path.display(),
            tok.n_tokens
        );
    }
    // No output.weight: llama.cpp drops the LM head when it is the embedding.
    let tie = !tensors.contains_key("lm_head.weight");
    let q_bias = tensors.contains_key("model.layers.0.self_attn.q_proj.bias");
    if family == Family::Llama && q_bias {
        // LlamaForCausalLM has one switch for q/k/v/o biases; a GGUF with q/k/v biases only
        // gets zero o_proj biases, which is what the missing bias means.
        for l in 0..hp.n_layers {
            tensors
                .entry(format!("model.layers.{l}.self_attn.o_proj.bias"))
                .or_insert(Tensor::zeros(hp.hidden, dtype, &device)?);
        }
    }
    let rope_scaling = rope_scaling(&meta, &hp, rope_freqs.as_deref())?;
    let config = hf_config(
        family,
        &hp,
        &tok,
        vocab_size,
        tie,
        q_bias,
        rope_scaling,
        dtype,
    );

    std::fs::create_dir_all(out_dir).map_err(|e| Error::io(out_dir, e))?;
    write_atomic(&out_dir.join("tokenizer.json"), tok.json.as_bytes())?;
    write_json(&out_dir.join("tokenizer_config.json"), &tok.config)?;
    write_json(&out_dir.join("generation_config.json"), &tok.generation)?;
    write_json(&out_dir.join("config.json"), &config)?;
    let n_tensors = tensors.len();
    save_safetensors(&out_dir.join("model.safetensors"), &tensors)?;
    Ok(ConvertReport {
        architecture: arch,
        tensors: n_tensors,
        vocab_size,
        out_dir: out_dir.to_path_buf(),
        dtype,
    })
}

/// Un-permutes the rows of a llama.cpp Q or K projection (weight `(n_heads * head_dim, in)` or
/// bias `(n_heads * head_dim,)`) back to transformers' layout.
///
/// llama.cpp's converter stores `w.reshape(n_heads, 2, head_dim / 2, in).swapaxes(1, 2)`, which
/// interleaves the two rotary halves of each head; this is the inverse, the same as
/// transformers' GGUF loader (`reshape(n_heads, head_dim / 2, 2, in).swapaxes(1, 2)`). Use the
/// query heads for Q and the key/value heads for K.
pub fn unpermute(w: &Tensor, n_heads: usize) -> Result<Tensor> {
    reorder_rows(w, n_heads, true)
}

/// llama.cpp's permutation (the inverse of [`unpermute`]), for tests and round trips.
pub fn permute(w: &Tensor, n_heads: usize) -> Result<Tensor> {
    reorder_rows(w, n_heads, false)
}

fn reorder_rows(w: &Tensor, n_heads: usize, inverse: bool) -> Result<Tensor> {
    let dims = w.dims().to_vec();
    let rows = dims.first().copied().unwrap_or(0);
    if n_heads == 0 || rows % (2 * n_heads) != 0 {
        return Err(Error::Config(format!(
            "cannot reorder {rows} rows as {n_heads} rotary heads of even width"
        )));
    }
    let cols: usize = dims[1..].iter().product();
    let head_dim = rows / n_heads;
    // Rows of one head are (half, pair) in llama.cpp's layout and (pair, half) in HF's.
    let (a, b) = if inverse {
        (head_dim / 2, 2)
    } else {
        (2, head_dim / 2)
    };
    Ok(w.reshape((n_heads, a, b, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)?)
}

enum QK {
    Q,
    K,
}

/// Whether a GGUF tensor is a Q or K projection (weight or bias), which llama.cpp permutes.
fn qk_role(name: &str) -> Option<QK> {
    let (_, tail) = name.strip_prefix("blk.")?.split_once('.')?;
    match tail {
        "attn_q.weight" | "attn_q.bias" => Some(QK::Q),
        "attn_k.weight" | "attn_k.bias" => Some(QK::K),
        _ => None,
    }
}

/// The Hugging Face name of a GGUF tensor, or None when it has none.
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
    let (layer, tail) = name.strip_prefix("blk.")?.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = tail.rsplit_once('.')?;
    if kind != "weight" && kind != "bias" {
        return None;
    }
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

/// Typed access to the GGUF metadata; every error names the file and the key.
struct Meta<'a> {
    md: &'a HashMap<String, Value>,
    path: &'a Path,
    arch: String,
}

impl Meta<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.md.get(key)
    }
    /// `{arch}.{key}`: the hyperparameters are namespaced by architecture.
    fn arch_key(&self, key: &str) -> String {
        format!("{}.{key}", self.arch)
    }
    fn wrong_type(&self, key: &str, want: &str) -> Error {
        Error::bad_file(
            self.path,
            format!("metadata {key} should be {want}, found {:?}", self.get(key)),
        )
    }
    fn uint(&self, key: &str) -> Result<Option<u64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => value_u64(v)
                .map(Some)
                .ok_or_else(|| self.wrong_type(key, "a non-negative integer")),
        }
    }
    fn need_uint(&self, key: &str) -> Result<usize> {
        self.uint(key)?
            .map(|v| v as usize)
            .ok_or_else(|| Error::bad_file(self.path, format!("metadata {key} is missing")))
    }
    fn float(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => value_f64(v)
                .map(Some)
                .ok_or_else(|| self.wrong_type(key, "a number")),
        }
    }
    fn string(&self, key: &str) -> Option<&str> {
        match self.get(key) {
            Some(Value::String(s)) => Some(s),
            _ => None,
        }
    }
    fn flag(&self, key: &str) -> Option<bool> {
        match self.get(key) {
            Some(Value::Bool(b)) => Some(*b),
            _ => None,
        }
    }
    fn array(&self, key: &str) -> Result<&[Value]> {
        match self.get(key) {
            Some(Value::Array(a)) => Ok(a),
            Some(_) => Err(self.wrong_type(key, "an array")),
            None => Err(Error::bad_file(
                self.path,
                format!("metadata {key} is missing"),
            )),
        }
    }
}

fn value_u64(v: &Value) -> Option<u64> {
    match *v {
        Value::U8(x) => Some(x.into()),
        Value::U16(x) => Some(x.into()),
        Value::U32(x) => Some(x.into()),
        Value::U64(x) => Some(x),
        Value::I8(x) => u64::try_from(x).ok(),
        Value::I16(x) => u64::try_from(x).ok(),
        Value::I32(x) => u64::try_from(x).ok(),
        Value::I64(x) => u64::try_from(x).ok(),
        _ => None,
    }
}

fn value_f64(v: &Value) -> Option<f64> {
    match *v {
        // GGUF stores most floats as f32: take the shortest decimal that round-trips, so an
        // epsilon of 1e-5 is written as 1e-05 and not 9.999999747378752e-06.
        Value::F32(x) => Some(format!("{x}").parse().unwrap_or(f64::from(x))),
        Value::F64(x) => Some(x),
        _ => value_u64(v).map(|x| x as f64),
    }
}

/// The hyperparameters of a llama-family GGUF.
struct Hparams {
    n_layers: usize,
    hidden: usize,
    ffn: usize,
    n_head: usize,
    n_kv: usize,
    head_dim: usize,
    vocab: usize,
    context: usize,
    eps: f64,
    theta: f64,
}

impl Hparams {
    fn read(meta: &Meta, content: &Content) -> Result<Hparams> {
        let k = |key: &str| meta.arch_key(key);
        let n_head = meta.need_uint(&k("attention.head_count"))?;
        let n_kv = meta
            .uint(&k("attention.head_count_kv"))?
            .map_or(n_head, |v| v as usize);
        let hidden = meta.need_uint(&k("embedding_length"))?;
        if n_head == 0 || n_kv == 0 || n_head % n_kv != 0 {
            return Err(Error::bad_file(
                meta.path,
                format!("{n_head} attention heads cannot share {n_kv} key/value heads"),
            ));
        }
        let dims = |name: &str| {
            content
                .tensor_infos
                .get(name)
                .map(|i| i.shape.dims().to_vec())
        };
        // key_length when the model sets it; otherwise Q's rows tell (head_dim need not be
        // hidden / heads).
        let head_dim = match meta.uint(&k("attention.key_length"))? {
            Some(v) => v as usize,
            None => match dims("blk.0.attn_q.weight") {
                // (A tensor with no dimensions tells nothing: found by fuzz/gguf.)
                Some(d) if d.first().is_some_and(|&r| r % n_head == 0) => d[0] / n_head,
                _ => hidden / n_head,
            },
        };
        if let Some(rope_dim) = meta.uint(&k("rope.dimension_count"))? {
            if rope_dim as usize != head_dim {
                return Err(Error::bad_file(
                    meta.path,
                    format!(
                        "rotary embedding covers {rope_dim} of {head_dim} head dimensions; \
                         partial rotary has no LlamaConfig equivalent"
                    ),
                ));
            }
        }
        let vocab = dims("token_embd.weight").map_or(0, |d| d.first().copied().unwrap_or(0));
        Ok(Hparams {
            n_layers: meta.need_uint(&k("block_count"))?,
            hidden,
            ffn: meta.need_uint(&k("feed_forward_length"))?,
            n_head,
            n_kv,
            head_dim,
            vocab,
            // llama.cpp always writes it; 2048 is what Llama 1 had.
            context: meta
                .uint(&k("context_length"))?
                .map_or(2048, |v| v as usize),
            eps: meta
                .float(&k("attention.layer_norm_rms_epsilon"))?
                .unwrap_or(1e-5),
            theta: meta.float(&k("rope.freq_base"))?.unwrap_or(10_000.0),
        })
    }

    /// The shape transformers expects for an HF tensor name, from the metadata alone.
    fn expected_shape(&self, hf: &str) -> Option<Vec<usize>> {
        let (q, kv, h) = (
            self.n_head * self.head_dim,
            self.n_kv * self.head_dim,
            self.hidden,
        );
        match hf {
            "model.embed_tokens.weight" | "lm_head.weight" => return Some(vec![self.vocab, h]),
            "model.norm.weight" => return Some(vec![h]),
            _ => {}
        }
        let rest = hf.strip_prefix("model.layers.")?;
        let (layer, tail) = rest.split_once('.')?;
        if layer.parse::<usize>().ok()? >= self.n_layers {
            // A layer past block_count: no shape is right.
            return Some(vec![]);
        }
        Some(match tail {
            "self_attn.q_proj.weight" => vec![q, h],
            "self_attn.k_proj.weight" | "self_attn.v_proj.weight" => vec![kv, h],
            "self_attn.o_proj.weight" => vec![h, q],
            "self_attn.q_proj.bias" => vec![q],
            "self_attn.k_proj.bias" | "self_attn.v_proj.bias" => vec![kv],
            "self_attn.o_proj.bias" => vec![h],
            "mlp.gate_proj.weight" | "mlp.up_proj.weight" => vec![self.ffn, h],
            "mlp.down_proj.weight" => vec![h, self.ffn],
            "input_layernorm.weight" | "post_attention_layernorm.weight" => vec![h],
            _ => return None,
        })
    }
}

/// config.json's `rope_scaling`, from `{arch}.rope.scaling.*` metadata or a `rope_freqs` tensor.
fn rope_scaling(meta: &Meta, hp: &Hparams, rope_freqs: Option<&[f32]>) -> Result<Option<Json>> {
    if let Some(freqs) = rope_freqs {
        if freqs.iter().all(|&f| f == 1.0) {
            return Ok(None);
        }
        return llama3_rope_scaling(freqs, hp.theta, hp.head_dim)
            .map(Some)
            .ok_or_else(|| {
                Error::bad_file(
                    meta.path,
                    "rope_freqs.weight holds per-frequency rope factors that match no llama3 \
                     rope scaling (factor, low/high frequency factors, original context); \
                     config.json cannot express them",
                )
            });
    }
    let kind = meta.string(&meta.arch_key("rope.scaling.type"));
    let factor = meta.float(&meta.arch_key("rope.scaling.factor"))?;
    let original = meta.uint(&meta.arch_key("rope.scaling.original_context_length"))?;
    Ok(match (kind, factor) {
        (None | Some("none"), _) => None,
        (Some(_), Some(1.0)) => None,
        (Some("linear"), Some(f)) => Some(json!({"rope_type": "linear", "factor": f})),
        (Some("yarn"), Some(f)) => Some(json!({
            "rope_type": "yarn", "factor": f, "original_max_position_embeddings": original,
        })),
        (Some(other), _) => {
            return Err(Error::bad_file(
                meta.path,
                format!(
                    "metadata {} = {other:?} (factor {factor:?}) is not a rope scaling this \
                     converter knows (linear, yarn)",
                    meta.arch_key("rope.scaling.type")
                ),
            ))
        }
    })
}

/// Recovers transformers' llama3 `rope_scaling` from llama.cpp's `rope_freqs` (the divisor of
/// each rotary frequency), by trying the parameter sets Llama 3.x models use; None if none
/// reproduces the tensor.
fn llama3_rope_scaling(freqs: &[f32], theta: f64, head_dim: usize) -> Option<Json> {
    if freqs.len() != head_dim / 2 {
        return None;
    }
    let factor = f64::from(freqs.iter().copied().fold(f32::MIN, f32::max));
    for old_ctx in [8192.0, 4096.0, 2048.0, 16384.0, 32768.0] {
        for (low, high) in [(1.0, 4.0), (1.0, 2.0), (2.0, 4.0), (1.0, 8.0)] {
            let fits = freqs.iter().enumerate().all(|(i, &got)| {
                let inv = 1.0 / theta.powf(2.0 * i as f64 / head_dim as f64);
                let want = llama3_divisor(inv, factor, low, high, old_ctx);
                (want - f64::from(got)).abs() <= 1e-4 * want
            });
            if fits {
                return Some(json!({
                    "rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                    "high_freq_factor": high, "original_max_position_embeddings": old_ctx as u64,
                }));
            }
        }
    }
    None
}

/// How much llama3 scaling divides one rotary frequency by (transformers' formula).
fn llama3_divisor(inv_freq: f64, factor: f64, low: f64, high: f64, old_ctx: f64) -> f64 {
    let wavelen = 2.0 * std::f64::consts::PI / inv_freq;
    if wavelen < old_ctx / high {
        1.0
    } else if wavelen > old_ctx / low {
        factor
    } else {
        let smooth = (old_ctx / wavelen - low) / (high - low);
        1.0 / ((1.0 - smooth) / factor + smooth)
    }
}

/// config.json for transformers.
#[allow(clippy::too_many_arguments)]
fn hf_config(
    family: Family,
    hp: &Hparams,
    tok: &TokenizerFiles,
    vocab_size: usize,
    tie: bool,
    q_bias: bool,
    rope_scaling: Option<Json>,
    dtype: DType,
) -> Json {
    let (model_type, class) = match family {
        Family::Llama => ("llama", "LlamaForCausalLM"),
        Family::Qwen2 => ("qwen2", "Qwen2ForCausalLM"),
    };
    let mut c = json!({
        "architectures": [class],
        "model_type": model_type,
        "vocab_size": vocab_size,
        "hidden_size": hp.hidden,
        "intermediate_size": hp.ffn,
        "num_hidden_layers": hp.n_layers,
        "num_attention_heads": hp.n_head,
        "num_key_value_heads": hp.n_kv,
        "head_dim": hp.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": hp.context,
        "rms_norm_eps": hp.eps,
        "rope_theta": hp.theta,
        "rope_scaling": rope_scaling,
        "tie_word_embeddings": tie,
        "bos_token_id": tok.bos,
        "eos_token_id": tok.eos,
        "pad_token_id": tok.pad,
        "torch_dtype": match dtype {
            DType::BF16 => "bfloat16",
            DType::F16 => "float16",
            _ => "float32",
        },
        "initializer_range": 0.02,
        "use_cache": true,
    });
    match family {
        // Qwen2 always has q/k/v biases and no attention_bias switch.
        Family::Qwen2 => {
            c["use_sliding_window"] = json!(false);
            c["max_window_layers"] = json!(hp.n_layers);
        }
        Family::Llama => {
            c["attention_bias"] = json!(q_bias);
            c["mlp_bias"] = json!(false);
        }
    }
    c
}

fn write_json(path: &Path, v: &Json) -> Result<()> {
    let text = serde_json::to_string_pretty(v).expect("a JSON value serialises");
    write_atomic(path, text.as_bytes())
}

/// The tokenizer files, ready to write.
struct TokenizerFiles {
    json: String,
    config: Json,
    generation: Json,
    n_tokens: usize,
    bos: Option<u32>,
    eos: Option<u32>,
    pad: Option<u32>,
}

/// GPT-2's split, which HF's `ByteLevel` pre-tokenizer applies itself with `use_regex: true`.
/// llama.cpp: `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)`.
const GPT2_PRE: &[&str] = &["gpt2", "mpt", "olmo", "jais", "trillion"];
/// llama.cpp runs `\p{N}` (each digit alone) before GPT-2's split for these; their HF
/// tokenizer.json files (SmolLM, StarCoder, ...) do it with a `Digits` pre-tokenizer.
const DIGITS_PRE: &[&str] = &[
    "smollm",
    "starcoder",
    "refact",
    "command-r",
    "codeshell",
    "exaone",
    "minerva",
];
/// Llama 3's split (HF tokenizer.json and llama.cpp alike): digits in runs of up to three.
const LLAMA3_PRE: &[&str] = &[
    "llama3",
    "llama-v3",
    "llama-bpe",
    "falcon3",
    "smaug-bpe",
    "dbrx",
];
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's split: as Llama 3's, but each digit alone; its tokenizer.json also normalises to NFC.
const QWEN2_PRE: &[&str] = &["qwen2", "stablelm2"];
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Rebuilds tokenizer.json, tokenizer_config.json and generation_config.json from the metadata.
fn build_tokenizer(meta: &Meta, context: usize) -> Result<TokenizerFiles> {
    let model = meta.string("tokenizer.ggml.model").unwrap_or("");
    if model != "gpt2" {
        return Err(Error::bad_file(
            meta.path,
            format!(
                "tokenizer.ggml.model is {model:?}; only byte-level BPE (\"gpt2\") tokenizers \
                 convert so far (\"llama\" is SentencePiece)"
            ),
        ));
    }
    let tokens: Vec<String> = meta
        .array("tokenizer.ggml.tokens")?
        .iter()
        .map(|v| match v {
            Value::String(s) => Ok(s.clone()),
            _ => Err(meta.wrong_type("tokenizer.ggml.tokens", "an array of strings")),
        })
        .collect::<Result<_>>()?;
    // Token types: 1 normal, 3 control (special), 4 user-defined (added, not special).
    let types: Vec<i64> = match meta.get("tokenizer.ggml.token_type") {
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| match *v {
                Value::I32(t) => t.into(),
                _ => value_u64(v).map_or(1, |t| t as i64),
            })
            .collect(),
        _ => vec![1; tokens.len()],
    };
    let merges: Vec<Json> = meta
        .array("tokenizer.ggml.merges")?
        .iter()
        .map(|v| match v {
            // Byte-level tokens never contain a space (it is `Ġ`), so the first one separates.
            Value::String(m) => m.split_once(' ').map(|(a, b)| json!([a, b])),
            _ => None,
        })
        .collect::<Option<_>>()
        .ok_or_else(|| meta.wrong_type("tokenizer.ggml.merges", "strings \"left right\""))?;

    let mut vocab = serde_json::Map::new();
    for (i, t) in tokens.iter().enumerate() {
        if vocab.insert(t.clone(), json!(i)).is_some() {
            return Err(Error::bad_file(
                meta.path,
                format!("tokenizer.ggml.tokens holds {t:?} twice; a BPE vocabulary cannot"),
            ));
        }
    }
    let added: Vec<Json> = tokens
        .iter()
        .zip(&types)
        .enumerate()
        .filter(|(_, (_, ty))| matches!(ty, 3 | 4))
        .map(|(i, (t, ty))| {
            json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": *ty == 4, "special": *ty == 3})
        })
        .collect();

    let pre_name = meta.string("tokenizer.ggml.pre").unwrap_or("default");
    let byte_level = |use_regex: bool| {
        json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
               "use_regex": use_regex})
    };
    let split = |regex: &str| {
        json!({"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated",
               "invert": false})
    };
    let seq = |a: Json, b: Json| json!({"type": "Sequence", "pretokenizers": [a, b]});
    let (pre, normalizer, ignore_merges) = if GPT2_PRE.contains(&pre_name) {
        (byte_level(true), Json::Null, false)
    } else if DIGITS_PRE.contains(&pre_name) {
        let digits = json!({"type": "Digits", "individual_digits": true});
        (seq(digits, byte_level(true)), Json::Null, false)
    } else if LLAMA3_PRE.contains(&pre_name) {
        // llama.cpp sets ignore_merges for these, as Llama 3's tokenizer.json does.
        (
            seq(split(LLAMA3_REGEX), byte_level(false)),
            Json::Null,
            true,
        )
    } else if QWEN2_PRE.contains(&pre_name) {
        let nfc = json!({"type": "NFC"});
        (seq(split(QWEN2_REGEX), byte_level(false)), nfc, false)
    } else if pre_name == "default" {
        // The converter did not recognise the tokenizer either; transformers' GGUF loader uses
        // GPT-2's split here too.
        tracing::warn!(
            "{}: tokenizer.ggml.pre is \"default\" (unknown to llama.cpp's converter); using \
             GPT-2's byte-level split, which may tokenise some text differently from the original",
            meta.path.display()
        );
        (byte_level(true), Json::Null, false)
    } else {
        return Err(Error::bad_file(
            meta.path,
            format!(
                "tokenizer.ggml.pre is {pre_name:?}, a pre-tokenizer this converter does not \
                 reproduce (known: {}, {}, {}, {}); converting anyway would tokenise differently \
                 from the original",
                GPT2_PRE.join(", "),
                DIGITS_PRE.join(", "),
                LLAMA3_PRE.join(", "),
                QWEN2_PRE.join(", ")
            ),
        ));
    };

    let id = |key: &str| -> Result<Option<u32>> {
        match meta.uint(key)? {
            Some(i) if (i as usize) < tokens.len() => Ok(Some(i as u32)),
            Some(i) => Err(Error::bad_file(
                meta.path,
                format!("metadata {key} = {i} is past the {} tokens", tokens.len()),
            )),
            None => Ok(None),
        }
    };
    let bos = id("tokenizer.ggml.bos_token_id")?;
    let eos = id("tokenizer.ggml.eos_token_id")?;
    let pad = id("tokenizer.ggml.padding_token_id")?;
    let unk = id("tokenizer.ggml.unknown_token_id")?;
    let text = |i: Option<u32>| i.map(|i| tokens[i as usize].clone());
    let add_bos = meta.flag("tokenizer.ggml.add_bos_token").unwrap_or(false);
    let add_eos = meta.flag("tokenizer.ggml.add_eos_token").unwrap_or(false);

    let byte_level_post = json!({"type": "ByteLevel", "add_prefix_space": true,
                                 "trim_offsets": false, "use_regex": true});
    // PreTrainedTokenizerFast adds BOS/EOS only through the post-processor (Llama 3's
    // tokenizer.json has this TemplateProcessing).
    let first = bos.filter(|_| add_bos);
    let last = eos.filter(|_| add_eos);
    let post = if first.is_none() && last.is_none() {
        byte_level_post
    } else {
        let piece = |seq: &str, type_id: u32| -> Vec<Json> {
            let special =
                |i: u32| json!({"SpecialToken": {"id": tokens[i as usize], "type_id": type_id}});
            let mut v: Vec<Json> = first.map(special).into_iter().collect();
            v.push(json!({"Sequence": {"id": seq, "type_id": type_id}}));
            v.extend(last.map(special));
            v
        };
        let mut pair = piece("A", 0);
        pair.extend(piece("B", 1));
        let specials: serde_json::Map<String, Json> = first
            .into_iter()
            .chain(last)
            .map(|i| {
                let t = &tokens[i as usize];
                (t.clone(), json!({"id": t, "ids": [i], "tokens": [t]}))
            })
            .collect();
        let template = json!({"type": "TemplateProcessing", "single": piece("A", 0),
                              "pair": pair, "special_tokens": specials});
        json!({"type": "Sequence", "processors": [byte_level_post, template]})
    };

    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": pre,
        "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true,
                    "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
                  "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": false, "byte_fallback": false, "ignore_merges": ignore_merges,
                  "vocab": vocab, "merges": merges},
    });
    let json_text = serde_json::to_string(&tokenizer).expect("a JSON value serialises");
    // What transformers and rlhf-model load must load here first.
    tokenizers::Tokenizer::from_bytes(json_text.as_bytes()).map_err(|e| {
        Error::Tokenizer(format!(
            "the tokenizer rebuilt from {} does not load: {e}",
            meta.path.display()
        ))
    })?;

    let mut config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": text(bos),
        "eos_token": text(eos),
        "pad_token": text(pad),
        "unk_token": text(unk),
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": false,
        "model_max_length": context,
    });
    if let Some(t) = meta.string("tokenizer.chat_template") {
        config["chat_template"] = json!(t);
    }
    // Chat models end a turn with EOT (Llama 3's <|eot_id|>) or EOM, not only EOS: generation
    // must stop on all of them, as the HF generation_config.json lists them.
    let mut stops: Vec<u32> = eos.into_iter().collect();
    for key in ["tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"] {
        if let Some(i) = id(key)? {
            if !stops.contains(&i) {
                stops.push(i);
            }
        }
    }
    let eos_json = match stops.as_slice() {
        [] => Json::Null,
        [one] => json!(one),
        many => json!(many),
    };
    let generation = json!({"bos_token_id": bos, "eos_token_id": eos_json, "pad_token_id": pad});
    Ok(TokenizerFiles {
        json: json_text,
        config,
        generation,
        n_tokens: tokens.len(),
        bos,
        eos,
        pad,
    })
}

/// The error for a file candle cannot read. candle reports an unknown tensor type without the
/// tensor's name, so the header is walked here to name it.
fn unreadable(path: &Path, e: candle_core::Error) -> Error {
    if e.to_string().contains("unknown dtype") {
        if let Ok(Some((name, ty))) = first_unknown_dtype(path) {
            return Error::bad_file(
                path,
                format!(
                    "tensor {name:?} is stored as {} (ggml type {ty}), which candle cannot \
                     dequantise; use a GGUF quantised as F32, F16, BF16, Q4_0, Q4_1, Q5_0, \
                     Q5_1, Q8_0 or Q2_K..Q6_K",
                    ggml_type_name(ty)
                ),
            );
        }
    }
    Error::bad_file(path, format!("not a readable GGUF file: {e}"))
}

/// The ggml tensor types candle reads (`GgmlDType::from_u32`).
fn candle_reads(ty: u32) -> bool {
    matches!(ty, 0..=3 | 6..=15 | 30)
}

fn ggml_type_name(ty: u32) -> &'static str {
    const NAMES: [&str; 40] = [
        "F32",
        "F16",
        "Q4_0",
        "Q4_1",
        "Q4_2",
        "Q4_3",
        "Q5_0",
        "Q5_1",
        "Q8_0",
        "Q8_1",
        "Q2_K",
        "Q3_K",
        "Q4_K",
        "Q5_K",
        "Q6_K",
        "Q8_K",
        "IQ2_XXS",
        "IQ2_XS",
        "IQ3_XXS",
        "IQ1_S",
        "IQ4_NL",
        "IQ3_S",
        "IQ2_S",
        "IQ4_XS",
        "I8",
        "I16",
        "I32",
        "I64",
        "F64",
        "IQ1_M",
        "BF16",
        "Q4_0_4_4",
        "Q4_0_4_8",
        "Q4_0_8_8",
        "TQ1_0",
        "TQ2_0",
        "IQ4_NL_4_4",
        "IQ4_NL_4_8",
        "IQ4_NL_8_8",
        "MXFP4",
    ];
    NAMES.get(ty as usize).copied().unwrap_or("an unknown type")
}

fn read_u32(r: &mut impl Read) -> std::io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

fn read_u64(r: &mut impl Read) -> std::io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

fn invalid(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string())
}

/// Skips one metadata value of GGUF type `ty`.
fn skip_value(r: &mut BufReader<File>, ty: u32) -> std::io::Result<()> {
    let size: u64 = match ty {
        0 | 1 | 7 => 1,    // u8, i8, bool
        2 | 3 => 2,        // u16, i16
        4..=6 => 4,        // u32, i32, f32
        10..=12 => 8,      // u64, i64, f64
        8 => read_u64(r)?, // string: length, bytes
        9 => {
            // array: item type, count, items
            let inner = read_u32(r)?;
            for _ in 0..read_u64(r)? {
                skip_value(r, inner)?;
            }
            0
        }
        _ => return Err(invalid("unknown metadata type")),
    };
    r.seek_relative(i64::try_from(size).map_err(|_| invalid("huge value"))?)
}

/// Walks a GGUF v2/v3 header and returns the first tensor whose type candle cannot read.
fn first_unknown_dtype(path: &Path) -> std::io::Result<Option<(String, u32)>> {
    let mut r = BufReader::new(File::open(path)?);
    if read_u32(&mut r)? != 0x4655_4747 || !matches!(read_u32(&mut r)?, 2 | 3) {
        return Ok(None);
    }
    let n_tensors = read_u64(&mut r)?;
    let n_kv = read_u64(&mut r)?;
    for _ in 0..n_kv {
        skip_value(&mut r, 8)?; // the key, a string
        let ty = read_u32(&mut r)?;
        skip_value(&mut r, ty)?;
    }
    for _ in 0..n_tensors {
        let name_len = read_u64(&mut r)?;
        if name_len > 1 << 16 {
            return Err(invalid("tensor name too long"));
        }
        let mut name = vec![0u8; name_len as usize];
        r.read_exact(&mut name)?;
        let n_dims = read_u32(&mut r)?;
        r.seek(SeekFrom::Current(8 * i64::from(n_dims)))?;
        let ty = read_u32(&mut r)?;
        read_u64(&mut r)?; // data offset
        if !candle_reads(ty) {
            return Ok(Some((String::from_utf8_lossy(&name).into_owned(), ty)));
        }
    }
    Ok(None)
}
