//! Every CPU kernel against the device-generic form of its op (the path CUDA tensors take),
//! in value and in the gradient of every input that carries one.
//!
//! Op by op, the kernel is called directly (and must run: `None` fails the test) and the
//! generic form through the dispatch under [`GenericOnly`]; then whole models, forward and
//! backward and KV-cache decoding, with and without the guard.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::*;
use rlhf_model::generate::{generate, GenerationConfig};
use rlhf_model::kernels::{self, cpu, Backend, GenericOnly, KvCache, Packing};
use rlhf_model::lora::{LoraConfig, TargetModules};
use rlhf_model::{Batch, Heads, LoadOptions, Model, Training};

type R = rlhf_model::Result<Tensor>;

fn var(shape: &[usize], seed: u32, scale: f32) -> Var {
    let n = shape.iter().product();
    let v: Vec<f32> = values(n, seed).into_iter().map(|x| x * scale).collect();
    Var::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn tensor(shape: &[usize], seed: u32, scale: f32) -> Tensor {
    var(shape, seed, scale).as_tensor().detach()
}

/// The largest |a − b| over the largest |b| (at least 1).
fn rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
    let m = b.abs().unwrap().max_all().unwrap();
    d.to_scalar::<f32>().unwrap() / m.to_scalar::<f32>().unwrap().max(1.0)
}

/// Runs `kernel` (the CPU kernel, which must take the inputs) and `op` (the dispatched op)
/// under [`GenericOnly`], on the same inputs; compares the outputs and, through a fixed
/// weighting of the output, the gradients of every `Var` in `inputs`.
fn check(
    what: &str,
    inputs: &[&Var],
    kernel: impl Fn() -> rlhf_model::Result<Option<Tensor>>,
    op: impl Fn() -> R,
    tol: f32,
) {
    let y = kernel()
        .unwrap()
        .unwrap_or_else(|| panic!("{what}: the CPU kernel did not run"));
    let w = tensor(y.dims(), 99, 1.0);
    let grads = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
    let (yg, grads_g) = {
        let _generic = GenericOnly::new();
        assert_eq!(Backend::of(&Device::Cpu), Backend::Generic);
        let yg = op().unwrap();
        let g = (&yg * &w).unwrap().sum_all().unwrap().backward().unwrap();
        (yg, g)
    };
    let d = rel_diff(&y, &yg);
    assert!(d < tol, "{what}: outputs differ by {d} (relative)");
    for (i, x) in inputs.iter().enumerate() {
        let (a, b) = (grads.get(x.as_tensor()), grads_g.get(x.as_tensor()));
        let (a, b) = (
            a.unwrap_or_else(|| panic!("{what}: input {i} got no gradient from the kernel")),
            b.unwrap_or_else(|| panic!("{what}: input {i} got no gradient from the generic form")),
        );
        let d = rel_diff(a, b);
        assert!(
            d < tol,
            "{what}: gradients of input {i} differ by {d} (relative)"
        );
    }
}

/// The kernels that need AVX-512F skip (with a line saying so) on CPUs without it.
fn avx512() -> bool {
    let on = cpu::gemm::available();
    if !on {
        eprintln!("no AVX-512F here: the product kernels are not compared");
    }
    on
}

#[test]
fn element_wise_kernels_match_their_generic_forms() {
    let x = var(&[3, 5, 37], 1, 3.0);
    check(
        "softmax",
        &[&x],
        || cpu::fused::softmax(&x),
        || kernels::softmax(&x),
        1e-5,
    );
    let scores = var(&[2, 3, 5, 7], 2, 3.0);
    let bias =
        kernels::attention_bias(&[vec![0, 1, 1, 1, 1, 1, 1], vec![1; 7]], 5, &Device::Cpu).unwrap();
    check(
        "scaled_masked_softmax",
        &[&scores],
        || cpu::fused::scaled_masked_softmax(&scores, &bias, 0.3),
        || kernels::scaled_masked_softmax(&scores, &bias, 0.3),
        1e-5,
    );
    let w = var(&[37], 3, 1.0);
    check(
        "rms_norm",
        &[&x, &w],
        || cpu::fused::rms_norm(&x, &w, 1e-5),
        || kernels::rms_norm(&x, &w, 1e-5),
        1e-5,
    );
    let b = var(&[37], 4, 1.0);
    check(
        "layer_norm",
        &[&x, &w, &b],
        || cpu::fused::layer_norm(&x, &w, &b, 1e-5),
        || kernels::layer_norm(&x, &w, &b, 1e-5),
        1e-5,
    );
    let q = var(&[2, 3, 5, 8], 5, 1.0);
    let (cos, sin) = (tensor(&[2, 1, 5, 8], 6, 1.0), tensor(&[2, 1, 5, 8], 7, 1.0));
    check(
        "rope",
        &[&q],
        || cpu::fused::rope(&q, &cos, &sin),
        || kernels::rope(&q, &cos, &sin),
        1e-5,
    );
    let (g, u) = (var(&[6, 40], 8, 4.0), var(&[6, 40], 9, 1.0));
    check(
        "silu_mul",
        &[&g, &u],
        || cpu::glu::silu_mul(&g, &u),
        || kernels::silu_mul(&g, &u),
        1e-5,
    );
    let logits = var(&[2, 4, 50], 10, 3.0);
    let targets = Tensor::new(&[[1u32, 7, 49, 0], [3, 3, 20, 11]], &Device::Cpu).unwrap();
    check(
        "token_logprobs",
        &[&logits],
        || cpu::logprob::token_logprobs(&logits, &targets),
        || kernels::token_logprobs(&logits, &targets),
        1e-5,
    );
    let table = tensor(&[20, 6], 11, 1.0);
    let ids = Tensor::new(&[3u32, 0, 19, 3], &Device::Cpu).unwrap();
    check(
        "embedding (frozen table)",
        &[],
        || cpu::frozen::embedding(&table, &ids),
        || kernels::embedding(&table, &ids),
        1e-7,
    );
}

#[test]
fn product_kernels_match_their_generic_forms() {
    if !avx512() {
        return;
    }
    let (m, k, n, r) = (70, 48, 40, 4);
    let x = var(&[m, k], 1, 1.0);
    let w_frozen = tensor(&[n, k], 2, 0.2);
    let w = var(&[n, k], 2, 0.2);
    for (name, wt) in [("frozen W", &w_frozen), ("trainable W", w.as_tensor())] {
        check(
            &format!("linear, {name}"),
            &[&x],
            || cpu::frozen::linear(&x, wt, false),
            || kernels::linear(&x, wt, false),
            1e-5,
        );
    }
    check(
        "linear, trainable W's gradient",
        &[&x, &w],
        || cpu::frozen::linear(&x, &w, false),
        || kernels::linear(&x, &w, false),
        1e-5,
    );
    let w_conv = tensor(&[k, n], 3, 0.2);
    check(
        "linear, Conv1D layout",
        &[&x],
        || cpu::frozen::linear(&x, &w_conv, true),
        || kernels::linear(&x, &w_conv, true),
        1e-5,
    );
    let (a, b) = (var(&[r, k], 4, 0.3), var(&[n, r], 5, 0.3));
    check(
        "lora_linear",
        &[&x, &a, &b],
        || cpu::frozen::lora_linear(&x, &w_frozen, &a, &b, 2.0, false),
        || kernels::lora_linear(&x, &w_frozen, &a, &b, 2.0, false),
        1e-5,
    );
    let b_conv = var(&[n, r], 6, 0.3);
    check(
        "lora_linear, Conv1D layout",
        &[&x, &a, &b_conv],
        || cpu::frozen::lora_linear(&x, &w_conv, &a, &b_conv, 0.5, true),
        || kernels::lora_linear(&x, &w_conv, &a, &b_conv, 0.5, true),
        1e-5,
    );
    let res = var(&[m, n], 7, 1.0);
    check(
        "linear_residual",
        &[&x, &res],
        || cpu::frozen::linear_residual(&x, &w_frozen, &res),
        || kernels::linear_residual(&x, &w_frozen, &res),
        1e-5,
    );
    let (g, u) = (var(&[m, k], 8, 3.0), var(&[m, k], 9, 1.0));
    check(
        "silu_mul_linear",
        &[&g, &u],
        || cpu::glu::silu_mul_linear(&g, &u, &w_frozen),
        || kernels::silu_mul_linear(&g, &u, &w_frozen),
        1e-5,
    );
    check(
        "silu_mul_linear_residual",
        &[&g, &u, &res],
        || cpu::glu::silu_mul_linear_residual(&g, &u, &w_frozen, &res),
        || kernels::silu_mul_linear_residual(&g, &u, &w_frozen, &res),
        1e-5,
    );
    let (qa, kb) = (var(&[2, 3, 9, 16], 10, 1.0), var(&[2, 3, 16, 11], 11, 1.0));
    check(
        "bmm",
        &[&qa, &kb],
        || cpu::frozen::bmm(&qa, &kb),
        || kernels::bmm(&qa, &kb),
        1e-5,
    );
    // The bf16 decoding weight: no gradient; the kernel sums bf16 × f32 products in f32.
    let wb = w_frozen.to_dtype(DType::BF16).unwrap();
    let xd = x.as_tensor().detach();
    let y = cpu::frozen::linear_bf16(&xd, &wb)
        .unwrap()
        .expect("the kernel runs");
    let yg = {
        let _generic = GenericOnly::new();
        kernels::linear_bf16(&xd, &wb).unwrap()
    };
    let d = rel_diff(&y, &yg);
    assert!(d < 1e-5, "linear_bf16: outputs differ by {d}");
    // The LM head fused with the log-prob has no generic op of its own: its generic form is
    // the head's product and token_logprobs, which is what a model composes.
    let h = var(&[6, k], 12, 1.0);
    let head = tensor(&[n, k], 13, 0.5);
    let targets = Tensor::new(&[0u32, 5, 39, 7, 7, 20], &Device::Cpu).unwrap();
    check(
        "head_token_logprobs",
        &[&h],
        || cpu::logprob::head_token_logprobs(&h, &head, &targets, 0.7, true),
        || {
            assert!(kernels::head_token_logprobs(&h, &head, &targets, 0.7, true)?.is_none());
            let logits = (kernels::linear(&h, &head, false)? / 0.7)?;
            kernels::token_logprobs(&logits, &targets)
        },
        1e-5,
    );
}

#[test]
fn the_attention_kernels_match_the_generic_attention() {
    if !avx512() {
        return;
    }
    let dev = Device::Cpu;
    let (b, t, nh, nkv, d) = (2, 6, 4, 2, 8);
    let q = var(&[b, t, nh * d], 1, 1.0);
    let k = var(&[b, t, nkv * d], 2, 1.0);
    let v = var(&[b, t, nkv * d], 3, 1.0);
    let mask = vec![vec![0, 0, 1, 1, 1, 1], vec![1; t]];
    let bias = kernels::attention_bias(&mask, t, &dev).unwrap();
    let pos = kernels::positions_from_mask(&mask);
    let (cos, sin) = rotary(&pos, d);
    check(
        "attention",
        &[&q, &k, &v],
        || cpu::attn::attention(&q, &k, &v, &cos, &sin, &bias, (nh, nkv), None, None),
        || kernels::attention(&q, &k, &v, &cos, &sin, &bias, nh, nkv, None, None),
        1e-5,
    );
    // Two sequences packed in one row: the kernel never reads the (placeholder) bias; the
    // generic form builds the block-diagonal one.
    let packing = Packing::sequences(vec![0, 5, 12]);
    let (qp, kp, vp) = (
        var(&[1, 12, nh * d], 4, 1.0),
        var(&[1, 12, nkv * d], 5, 1.0),
        var(&[1, 12, nkv * d], 6, 1.0),
    );
    let ppos = vec![(0..5).chain(0..7).collect::<Vec<u32>>()];
    let (pc, ps) = rotary(&ppos, d);
    let placeholder = Tensor::zeros((1, 1, 1, 1), DType::F32, &dev).unwrap();
    check(
        "attention over a packed row",
        &[&qp, &kp, &vp],
        || {
            let heads = (nh, nkv);
            cpu::attn::attention(
                &qp,
                &kp,
                &vp,
                &pc,
                &ps,
                &placeholder,
                heads,
                Some(&packing),
                None,
            )
        },
        || {
            let (s, p) = (Some(&packing), &placeholder);
            kernels::attention(&qp, &kp, &vp, &pc, &ps, p, nh, nkv, s, None)
        },
        1e-5,
    );
    // Decoding: a prefill of t and one step, through the cache's own buffers (the kernel)
    // and through the generic form's concatenated tensors.
    let (mut kc, mut gc) = (KvCache::new(1), KvCache::new(1));
    // One call through each cache: the kernel's raw buffers, the generic form's tensors.
    let through_both = |qkv: [&Tensor; 3],
                        tables: (&Tensor, &Tensor),
                        bias: &Tensor,
                        kc: &mut KvCache,
                        gc: &mut KvCache| {
        let ([q, k, v], (cos, sin)) = (qkv, tables);
        let y = cpu::attn::attention(q, k, v, cos, sin, bias, (nh, nkv), None, Some((kc, 0)))
            .unwrap()
            .expect("the cached kernel runs");
        let _generic = GenericOnly::new();
        let yg = kernels::attention(q, k, v, cos, sin, bias, nh, nkv, None, Some((gc, 0)));
        rel_diff(&y, &yg.unwrap())
    };
    let detached = [&q, &k, &v].map(|x| x.as_tensor().detach());
    let prefill = through_both(
        [&detached[0], &detached[1], &detached[2]],
        (&cos, &sin),
        &bias,
        &mut kc,
        &mut gc,
    );
    assert!(
        prefill < 1e-5,
        "prefill through the cache differs by {prefill}"
    );
    let step: Vec<Vec<u8>> = mask.iter().map(|r| [r.as_slice(), &[1]].concat()).collect();
    let sbias = kernels::attention_bias(&step, 1, &dev).unwrap();
    let spos: Vec<Vec<u32>> = kernels::positions_from_mask(&step)
        .into_iter()
        .map(|r| vec![r[t]])
        .collect();
    let (sc, ss) = rotary(&spos, d);
    let (q1, k1, v1) = (
        tensor(&[b, 1, nh * d], 7, 1.0),
        tensor(&[b, 1, nkv * d], 8, 1.0),
        tensor(&[b, 1, nkv * d], 9, 1.0),
    );
    let one = through_both([&q1, &k1, &v1], (&sc, &ss), &sbias, &mut kc, &mut gc);
    assert!(
        one < 1e-5,
        "a decoding step through the cache differs by {one}"
    );
    assert_eq!((kc.len(), gc.len()), (t + 1, t + 1));
}

/// Rotary tables `(b, 1, t, d)` for the given positions (base 10000).
fn rotary(pos: &[Vec<u32>], d: usize) -> (Tensor, Tensor) {
    let (b, t) = (pos.len(), pos[0].len());
    let (mut c, mut s) = (vec![0f32; b * t * d], vec![0f32; b * t * d]);
    for (bi, row) in pos.iter().enumerate() {
        for (ti, &p) in row.iter().enumerate() {
            for i in 0..d / 2 {
                let f = p as f32 / 10000f32.powf(2.0 * i as f32 / d as f32);
                let at = (bi * t + ti) * d;
                (c[at + i], c[at + i + d / 2]) = (f.cos(), f.cos());
                (s[at + i], s[at + i + d / 2]) = (f.sin(), f.sin());
            }
        }
    }
    let dev = Device::Cpu;
    (
        Tensor::from_vec(c, (b, 1, t, d), &dev).unwrap(),
        Tensor::from_vec(s, (b, 1, t, d), &dev).unwrap(),
    )
}

/// A whole model with LoRA adapters, once on the CPU kernels (the one-op decoder layer and
/// the fused LM-head log-prob included, where the architecture takes them) and once on the
/// generic forms alone: the log-probs and scores, every adapter's gradient, and greedy
/// decoding through the KV cache agree.
fn whole_model_matches(arch: &str) {
    let cfg = LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        target_modules: Some(TargetModules::One("all-linear".into())),
        ..Default::default()
    };
    let opts = LoadOptions {
        heads: Heads::LmAndScore,
        training: Training::Lora(cfg),
        dtype: DType::F32,
        ..Default::default()
    };
    let mut model = Model::load(&fixtures().join(arch), &opts).unwrap();
    model.keep_frozen_in_kernel_layout().unwrap();
    for (i, (name, var)) in model.params().trainable().into_iter().enumerate() {
        if name.ends_with("lora_B.weight") {
            let n = var.as_tensor().elem_count();
            let t = Tensor::from_vec(values(n, 40 + i as u32), var.shape(), &Device::Cpu);
            var.set(&(t.unwrap() * 0.05).unwrap()).unwrap();
        }
    }
    let g = golden(arch);
    let batch = Batch {
        input_ids: ids2(&g["input_ids"]),
        attention_mask: ids2(&g["attention_mask"])
            .into_iter()
            .map(|r| r.into_iter().map(|x| x as u8).collect())
            .collect(),
    };
    let run = || {
        let hidden = model.hidden(&batch).unwrap();
        let (b, t, _) = hidden.dims3().unwrap();
        let next: Vec<u32> = batch
            .input_ids
            .iter()
            .flat_map(|r| r[1..].to_vec())
            .collect();
        let targets = Tensor::from_vec(next, (b, t - 1), &Device::Cpu).unwrap();
        let lp = model
            .token_logprobs(&hidden.narrow(1, 0, t - 1).unwrap(), &targets, 1.0)
            .unwrap();
        let scores = model.scores(&hidden, &batch).unwrap();
        let loss = (lp.sum_all().unwrap() + scores.sum_all().unwrap()).unwrap();
        let grads = loss.backward().unwrap();
        let grads: Vec<(String, Tensor)> = model
            .params()
            .trainable()
            .into_iter()
            .map(|(n, v)| {
                (
                    n.clone(),
                    grads.get(v.as_tensor()).expect("a gradient").clone(),
                )
            })
            .collect();
        let cfg = GenerationConfig {
            max_new_tokens: 6,
            ..Default::default()
        };
        let prompts = vec![
            batch.input_ids[0][..3].to_vec(),
            batch.input_ids[1][..5].to_vec(),
        ];
        let gen = generate(&model, &prompts, &cfg).unwrap();
        (lp, scores, grads, gen)
    };
    let (lp, scores, grads, gen) = run();
    let (lp_g, scores_g, grads_g, gen_g) = {
        let _generic = GenericOnly::new();
        run()
    };
    let d = rel_diff(&lp, &lp_g);
    assert!(d < 1e-4, "{arch}: log-probs differ by {d}");
    let d = rel_diff(&scores, &scores_g);
    assert!(d < 1e-4, "{arch}: scores differ by {d}");
    assert!(
        grads.len() >= 8,
        "{arch}: only {} trainable tensors",
        grads.len()
    );
    for ((name, a), (_, b)) in grads.iter().zip(&grads_g) {
        let d = rel_diff(a, b);
        assert!(d < 1e-3, "{arch}: gradient of {name} differs by {d}");
    }
    let ids = |g: &[rlhf_model::generate::Generation]| -> Vec<Vec<u32>> {
        g.iter().map(|x| x.completion_ids.clone()).collect()
    };
    assert_eq!(ids(&gen), ids(&gen_g), "{arch}: greedy decoding differs");
}

#[test]
fn a_llama_model_runs_the_same_on_the_generic_forms() {
    whole_model_matches("llama-gqa");
}

#[test]
fn a_qwen2_model_runs_the_same_on_the_generic_forms() {
    whole_model_matches("qwen2");
}

#[test]
fn a_gpt2_model_runs_the_same_on_the_generic_forms() {
    whole_model_matches("gpt2");
}

#[test]
fn an_opt_model_runs_the_same_on_the_generic_forms() {
    whole_model_matches("opt");
}
