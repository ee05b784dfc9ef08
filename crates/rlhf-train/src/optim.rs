//! AdamW with torch.optim.AdamW's exact semantics, and global-norm gradient clipping as
//! `torch.nn.utils.clip_grad_norm_` does it.
//!
//! The update runs as one pass over plain f32 buffers per parameter (the moments live on the
//! CPU as `Vec<f32>`) instead of a dozen tensor ops that each allocate: on the CPU the
//! element-wise work, not the math, is what costs.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};

use crate::{Error, Result};

struct Slot {
    name: String,
    var: Var,
    exp_avg: Vec<f32>,
    exp_avg_sq: Vec<f32>,
    decay: bool,
}

/// AdamW over named parameters.
pub struct AdamW {
    slots: Vec<Slot>,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
    step: u64,
}

/// transformers' Trainer decays every weight but biases and norm weights.
fn decays(name: &str) -> bool {
    let n = name.to_lowercase();
    !(n.ends_with(".bias") || n.contains("norm") || n.contains("ln_"))
}

impl AdamW {
    /// An optimiser over `params` (name, var) with zeroed moments.
    pub fn new(
        params: Vec<(String, Var)>,
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
    ) -> Result<Self> {
        let slots = params
            .into_iter()
            .map(|(name, var)| {
                let n = var.elem_count();
                Slot {
                    decay: decays(&name),
                    name,
                    var,
                    exp_avg: vec![0.0; n],
                    exp_avg_sq: vec![0.0; n],
                }
            })
            .collect();
        Ok(Self {
            slots,
            beta1,
            beta2,
            eps,
            weight_decay,
            step: 0,
        })
    }

    /// Optimiser steps taken.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// One update with learning rate `lr`; parameters without a gradient are left alone.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.step += 1;
        let t = self.step as i32;
        let bc1 = 1.0 - self.beta1.powi(t);
        let bc2 = 1.0 - self.beta2.powi(t);
        let step_size = lr / bc1;
        let bc2_sqrt = bc2.sqrt();
        let (b1, b2) = (self.beta1 as f32, self.beta2 as f32);
        for slot in &mut self.slots {
            let Some(g) = grads.get(slot.var.as_tensor()) else {
                continue;
            };
            let shape = slot.var.shape().clone();
            let dtype = slot.var.dtype();
            let device = slot.var.device().clone();
            let g: Vec<f32> = g.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            let mut p: Vec<f32> = slot
                .var
                .as_tensor()
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1()?;
            let decay = if slot.decay {
                1.0 - lr * self.weight_decay
            } else {
                1.0
            };
            for i in 0..p.len() {
                // torch: p *= 1 - lr*wd; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g²;
                // p -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps)
                let gi = g[i];
                let m = b1 * slot.exp_avg[i] + (1.0 - b1) * gi;
                let v = b2 * slot.exp_avg_sq[i] + (1.0 - b2) * gi * gi;
                slot.exp_avg[i] = m;
                slot.exp_avg_sq[i] = v;
                let denom = (v as f64).sqrt() / bc2_sqrt + self.eps;
                p[i] = ((p[i] as f64) * decay - step_size * (m as f64) / denom) as f32;
            }
            let new = Tensor::from_vec(p, shape, &device)?.to_dtype(dtype)?;
            slot.var.set(&new)?;
        }
        Ok(())
    }

    /// The moments and step count, for `optimizer.safetensors`.
    pub fn state_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for s in &self.slots {
            let shape = s.var.shape().clone();
            out.insert(
                format!("{}.exp_avg", s.name),
                Tensor::from_vec(s.exp_avg.clone(), shape.clone(), &Device::Cpu)?,
            );
            out.insert(
                format!("{}.exp_avg_sq", s.name),
                Tensor::from_vec(s.exp_avg_sq.clone(), shape, &Device::Cpu)?,
            );
        }
        out.insert(
            "step".into(),
            Tensor::new(&[self.step as i64], &Device::Cpu)?,
        );
        Ok(out)
    }

    /// Restores what [`state_tensors`](Self::state_tensors) saved.
    pub fn load_state(&mut self, mut tensors: HashMap<String, Tensor>) -> Result<()> {
        let step = tensors
            .remove("step")
            .ok_or_else(|| Error::Resume("optimizer state has no `step`".into()))?;
        self.step = step.to_vec1::<i64>()?[0] as u64;
        for s in &mut self.slots {
            for (suffix, buf) in [
                ("exp_avg", &mut s.exp_avg),
                ("exp_avg_sq", &mut s.exp_avg_sq),
            ] {
                let key = format!("{}.{suffix}", s.name);
                let t = tensors.remove(&key).ok_or_else(|| {
                    Error::Resume(format!(
                        "optimizer state has no {key}: the checkpoint was written for other trainable parameters (LoRA settings changed?)"
                    ))
                })?;
                if t.elem_count() != buf.len() {
                    return Err(Error::Resume(format!(
                        "optimizer state {key} has {} values, the parameter {}",
                        t.elem_count(),
                        buf.len()
                    )));
                }
                *buf = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            }
        }
        Ok(())
    }
}

/// Scales all gradients so their global 2-norm is at most `max_norm` (torch's
/// clip_grad_norm_, factor max_norm / (norm + 1e-6)); returns the norm before clipping, what
/// transformers logs as `grad_norm`. A non-finite norm is returned unscaled: the caller skips
/// the step.
pub fn clip_grad_norm(
    grads: &mut GradStore,
    params: &[(String, Var)],
    max_norm: f64,
) -> Result<f64> {
    let mut total = 0.0f64;
    for (_, v) in params {
        if let Some(g) = grads.get(v.as_tensor()) {
            total += g
                .to_dtype(DType::F64)?
                .sqr()?
                .sum_all()?
                .to_scalar::<f64>()?;
        }
    }
    let norm = total.sqrt();
    if !norm.is_finite() || max_norm <= 0.0 {
        return Ok(norm);
    }
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        for (_, v) in params {
            let t = v.as_tensor();
            if let Some(g) = grads.get(t) {
                let scaled = (g * coef)?;
                grads.insert(t, scaled);
            }
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(steps: &[[Vec<f32>; 2]], opt: &mut AdamW, vars: &[Var]) {
        for g in steps {
            // A GradStore comes only from backward: build one whose grads are exactly g
            // (loss = sum(p * g) has gradient g).
            let loss = (vars[0]
                .as_tensor()
                .mul(&Tensor::new(g[0].as_slice(), &Device::Cpu).unwrap())
                .unwrap()
                .sum_all()
                .unwrap()
                + vars[1]
                    .as_tensor()
                    .flatten_all()
                    .unwrap()
                    .mul(&Tensor::new(g[1].as_slice(), &Device::Cpu).unwrap())
                    .unwrap()
                    .sum_all()
                    .unwrap())
            .unwrap();
            let grads = loss.backward().unwrap();
            opt.step(&grads, 1e-2).unwrap();
        }
    }

    fn fresh() -> (Vec<Var>, AdamW) {
        let a = Var::new(&[0.5f32, -1.0, 2.0], &Device::Cpu).unwrap();
        let b = Var::new(&[[0.1f32, 0.2], [0.3, -0.4]], &Device::Cpu).unwrap();
        let opt = AdamW::new(
            vec![
                ("a.weight".into(), a.clone()),
                ("b.weight".into(), b.clone()),
            ],
            0.9,
            0.999,
            1e-8,
            0.1,
        )
        .unwrap();
        (vec![a, b], opt)
    }

    fn grads() -> Vec<[Vec<f32>; 2]> {
        vec![
            [vec![0.1, -0.2, 0.3], vec![1.0, -1.0, 0.5, 0.0]],
            [vec![-0.3, 0.2, 0.1], vec![0.2, 0.1, -0.5, 2.0]],
            [vec![0.05, 0.05, -0.05], vec![0.0, 0.3, 0.3, 0.0]],
        ]
    }

    /// Expected: torch.optim.AdamW([a, b], lr=1e-2, betas=(0.9, 0.999), eps=1e-8,
    /// weight_decay=0.1) after three steps with these gradients (torch 2.15).
    #[test]
    fn matches_torch_adamw() {
        let (vars, mut opt) = fresh();
        run(&grads(), &mut opt, &vars);
        let want_a = [
            0.4962334632873535f64,
            -0.9890623092651367,
            1.9696722030639648,
        ];
        let want_b = [
            0.07549038529396057f64,
            0.21786168217658997,
            0.28752458095550537,
            -0.4119873642921448,
        ];
        let got_a = vars[0].as_tensor().to_vec1::<f32>().unwrap();
        let got_b = vars[1]
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (g, w) in got_a.iter().chain(&got_b).zip(want_a.iter().chain(&want_b)) {
            assert!((*g as f64 - w).abs() < 1e-6, "{g} vs {w}");
        }
    }

    #[test]
    fn resumed_state_continues_bit_identically() {
        let g = grads();
        let (vars, mut opt) = fresh();
        run(&g, &mut opt, &vars);
        run(&g, &mut opt, &vars);
        let (vars2, mut opt2) = fresh();
        run(&g, &mut opt2, &vars2);
        let state = opt2.state_tensors().unwrap();
        let params: Vec<(String, Var)> = vec![
            ("a.weight".into(), vars2[0].clone()),
            ("b.weight".into(), vars2[1].clone()),
        ];
        let mut opt3 = AdamW::new(params, 0.9, 0.999, 1e-8, 0.1).unwrap();
        opt3.load_state(state).unwrap();
        run(&g, &mut opt3, &vars2);
        for (x, y) in vars.iter().zip(&vars2) {
            let a = x
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let b = y
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert_eq!(a, b);
        }
    }

    #[test]
    fn no_decay_for_biases_and_norms() {
        assert!(decays("model.layers.0.mlp.up_proj.weight"));
        assert!(!decays("model.layers.0.input_layernorm.weight"));
        assert!(!decays("transformer.h.0.ln_1.weight"));
        assert!(!decays("model.layers.0.self_attn.q_proj.bias"));
    }

    #[test]
    fn clipping_scales_to_max_norm_and_reports_the_norm() {
        let a = Var::new(&[3.0f32, 4.0], &Device::Cpu).unwrap();
        let loss = a
            .as_tensor()
            .mul(&Tensor::new(&[3.0f32, 4.0], &Device::Cpu).unwrap())
            .unwrap()
            .sum_all()
            .unwrap();
        let mut grads = loss.backward().unwrap();
        let params = vec![("a".to_string(), a.clone())];
        let n = clip_grad_norm(&mut grads, &params, 1.0).unwrap();
        assert!((n - 5.0).abs() < 1e-9);
        let g = grads.get(a.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        assert!(
            (g[0] - 0.6).abs() < 1e-6 && (g[1] - 0.8).abs() < 1e-6,
            "{g:?}"
        );
    }
}
