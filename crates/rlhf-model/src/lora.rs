//! LoRA configured like PEFT's `LoraConfig`, saved and loaded in PEFT's file format.
//!
//! An adapter directory holds `adapter_config.json` and `adapter_model.safetensors` with
//! tensors named `base_model.model.<module>.lora_A.weight` / `lora_B.weight`, and the
//! `modules_to_save` weights (e.g. the score head) as `base_model.model.score.weight`, which
//! is what `PeftModel.from_pretrained` reads.

use std::collections::HashMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Which modules get adapters: a list of names, a regex string, or "all-linear".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    /// Module names, each matching a module whose path ends with it.
    List(Vec<String>),
    /// "all-linear" or a regex matched against the full module path.
    One(String),
}

/// PEFT's LoraConfig fields, with PEFT's defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoraConfig {
    /// Rank of the update.
    pub r: usize,
    /// Scale numerator: the update is multiplied by lora_alpha / r.
    pub lora_alpha: f64,
    /// Dropout on the adapter input during training.
    pub lora_dropout: f64,
    /// Modules to adapt; None means PEFT's default for the architecture.
    pub target_modules: Option<TargetModules>,
    /// "none" is the only bias mode supported (PEFT's default).
    pub bias: String,
    /// "CAUSAL_LM" or "SEQ_CLS" (the latter also saves the score head, as PEFT does).
    pub task_type: Option<String>,
    /// Modules trained in full and saved with the adapter (the score head for reward models).
    pub modules_to_save: Vec<String>,
    /// rsLoRA: scale by lora_alpha / sqrt(r).
    pub use_rslora: bool,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            r: 8,
            lora_alpha: 8.0,
            lora_dropout: 0.0,
            target_modules: None,
            bias: "none".into(),
            task_type: None,
            modules_to_save: Vec::new(),
            use_rslora: false,
        }
    }
}

/// Linear layers that are never adapted by "all-linear": the output heads.
const HEADS: [&str; 3] = ["lm_head", "score", "v_head"];

impl LoraConfig {
    /// The multiplier of the adapter's output.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f64).sqrt()
        } else {
            self.lora_alpha / self.r as f64
        }
    }

    /// Checks values and fills what PEFT fills: default targets for the architecture and,
    /// for SEQ_CLS, the score head in modules_to_save.
    pub fn resolved(mut self, model_type: &str) -> Result<Self> {
        // The one message shape of config checks: "key" must be WHAT, found VALUE.
        if self.r == 0 {
            return Err(Error::Config(
                "\"lora.r\" must be at least 1, found 0".into(),
            ));
        }
        if !(self.lora_alpha.is_finite() && self.lora_alpha > 0.0) {
            return Err(Error::Config(format!(
                "\"lora.lora_alpha\" must be a finite number > 0, found {}",
                self.lora_alpha
            )));
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return Err(Error::Config(format!(
                "\"lora.lora_dropout\" must be a number in [0, 1), found {}",
                self.lora_dropout
            )));
        }
        if self.bias != "none" {
            return Err(Error::Config(format!(
                "lora.bias = {:?} is not supported; use \"none\" (PEFT's default)",
                self.bias
            )));
        }
        if self.target_modules.is_none() {
            let defaults: &[&str] = match model_type {
                "gpt2" => &["c_attn"],
                _ => &["q_proj", "v_proj"],
            };
            self.target_modules = Some(TargetModules::List(
                defaults.iter().map(|s| s.to_string()).collect(),
            ));
        }
        if self.task_type.as_deref() == Some("SEQ_CLS")
            && !self.modules_to_save.iter().any(|m| m == "score")
        {
            // PEFT's PeftModelForSequenceClassification adds the classifier head itself.
            self.modules_to_save.push("score".into());
        }
        Ok(self)
    }

    /// Whether the linear layer at `path` gets an adapter.
    pub fn targets(&self, path: &str) -> bool {
        let last = path.rsplit('.').next().unwrap_or(path);
        if HEADS.contains(&last) || self.modules_to_save.iter().any(|m| m == last) {
            return false;
        }
        match &self.target_modules {
            None => false,
            Some(TargetModules::List(names)) => names
                .iter()
                .any(|n| path == n || path.ends_with(&format!(".{n}"))),
            Some(TargetModules::One(s)) if s == "all-linear" => true,
            Some(TargetModules::One(s)) => regex_full_match(s, path),
        }
    }

    /// Writes `adapter_config.json` as PEFT writes it.
    pub fn to_peft_json(&self, base_model: &str) -> serde_json::Value {
        let targets = match &self.target_modules {
            Some(TargetModules::List(v)) => serde_json::json!(v),
            Some(TargetModules::One(s)) => serde_json::json!(s),
            None => serde_json::Value::Null,
        };
        serde_json::json!({
            "peft_type": "LORA",
            "task_type": self.task_type,
            "base_model_name_or_path": base_model,
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "lora_dropout": self.lora_dropout,
            "target_modules": targets,
            "bias": self.bias,
            "modules_to_save": if self.modules_to_save.is_empty() { serde_json::Value::Null } else { serde_json::json!(self.modules_to_save) },
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "use_rslora": self.use_rslora,
            "use_dora": false,
            "layers_to_transform": null,
            "layers_pattern": null,
            "rank_pattern": {},
            "alpha_pattern": {},
            "revision": null,
        })
    }

    /// Reads `adapter_config.json` written by PEFT (unknown PEFT fields are ignored).
    pub fn from_peft_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::MissingFile {
            path: path.clone(),
            what: "PEFT adapter config",
            hint: format!(
                "{e}; an adapter directory holds adapter_config.json and adapter_model.safetensors"
            ),
        })?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::bad_file(&path, e))?;
        if let Some(t) = v.get("peft_type").and_then(|t| t.as_str()) {
            if t != "LORA" {
                return Err(Error::bad_file(
                    &path,
                    format!("peft_type {t:?} is not supported; only LORA"),
                ));
            }
        }
        if v.get("use_dora").and_then(|d| d.as_bool()) == Some(true) {
            return Err(Error::bad_file(
                &path,
                "DoRA adapters (use_dora = true) are not supported",
            ));
        }
        let get_f = |k: &str, d: f64| v.get(k).and_then(|x| x.as_f64()).unwrap_or(d);
        let target_modules = match v.get("target_modules") {
            Some(serde_json::Value::Array(a)) => Some(TargetModules::List(
                a.iter()
                    .filter_map(|s| s.as_str().map(String::from))
                    .collect(),
            )),
            Some(serde_json::Value::String(s)) => Some(TargetModules::One(s.clone())),
            _ => None,
        };
        Ok(Self {
            r: v.get("r").and_then(|x| x.as_u64()).unwrap_or(8) as usize,
            lora_alpha: get_f("lora_alpha", 8.0),
            lora_dropout: get_f("lora_dropout", 0.0),
            target_modules,
            bias: v
                .get("bias")
                .and_then(|x| x.as_str())
                .unwrap_or("none")
                .to_string(),
            task_type: v
                .get("task_type")
                .and_then(|x| x.as_str())
                .map(String::from),
            modules_to_save: v
                .get("modules_to_save")
                .and_then(|x| x.as_array())
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default(),
            use_rslora: v
                .get("use_rslora")
                .and_then(|x| x.as_bool())
                .unwrap_or(false),
        })
    }
}

/// The PEFT state-dict prefix of a module: `base_model.model.<path>`.
pub fn peft_module_name(path: &str) -> String {
    format!("base_model.model.{path}")
}

/// Normalises a tensor name from an adapter file: drops PEFT's adapter name (`.default`) and
/// the `modules_to_save` wrapper, so names match what this crate records.
pub fn normalize_adapter_key(key: &str) -> String {
    key.replace(".lora_A.default.", ".lora_A.")
        .replace(".lora_B.default.", ".lora_B.")
        .replace(".modules_to_save.default.", ".")
        .replace(".modules_to_save.", ".")
}

/// Full-match of a (simple) regex as PEFT's `re.fullmatch(target_modules, key)`.
fn regex_full_match(pattern: &str, path: &str) -> bool {
    // PEFT's regex form is rare and mostly alternations like `.*(q_proj|v_proj)`; a full
    // regex engine is not pulled in for it. Support `.*` prefixes and `(a|b)` alternations.
    let p = pattern.trim_start_matches('^').trim_end_matches('$');
    if let Some(rest) = p.strip_prefix(".*") {
        let alts = rest
            .trim_start_matches("\\.")
            .trim_start_matches('(')
            .trim_end_matches(')');
        return alts.split('|').any(|a| path.ends_with(a));
    }
    let alts = p.trim_start_matches('(').trim_end_matches(')');
    alts.split('|').any(|a| a == path)
}

/// Reads adapter tensors (names normalised, the `base_model.model.` prefix kept).
pub fn read_adapter_tensors(
    dir: &Path,
    device: &candle_core::Device,
) -> Result<HashMap<String, candle_core::Tensor>> {
    let path = dir.join("adapter_model.safetensors");
    if !path.exists() {
        return Err(Error::MissingFile {
            path,
            what: "PEFT adapter weights",
            hint: "an adapter saved as adapter_model.bin must be re-saved with safe_serialization=True".into(),
        });
    }
    let loaded = candle_core::safetensors::load(&path, device)
        .map_err(|e| Error::bad_file(&path, format!("cannot read safetensors: {e}")))?;
    Ok(loaded
        .into_iter()
        .map(|(k, v)| (normalize_adapter_key(&k), v))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_values_name_the_key() {
        for (cfg, key) in [
            (
                LoraConfig {
                    r: 0,
                    ..Default::default()
                },
                "\"lora.r\"",
            ),
            (
                LoraConfig {
                    lora_alpha: f64::NAN,
                    ..Default::default()
                },
                "\"lora.lora_alpha\"",
            ),
            (
                LoraConfig {
                    lora_alpha: 0.0,
                    ..Default::default()
                },
                "\"lora.lora_alpha\"",
            ),
            (
                LoraConfig {
                    lora_dropout: 1.0,
                    ..Default::default()
                },
                "\"lora.lora_dropout\"",
            ),
            (
                LoraConfig {
                    lora_dropout: f64::NAN,
                    ..Default::default()
                },
                "\"lora.lora_dropout\"",
            ),
        ] {
            let e = cfg.resolved("llama").unwrap_err().to_string();
            assert!(e.contains(key) && e.contains("must be"), "{e}");
        }
    }

    #[test]
    fn targets_match_like_peft() {
        let cfg = LoraConfig {
            target_modules: Some(TargetModules::List(vec!["q_proj".into(), "v_proj".into()])),
            ..Default::default()
        };
        assert!(cfg.targets("model.layers.0.self_attn.q_proj"));
        assert!(!cfg.targets("model.layers.0.self_attn.k_proj"));
        assert!(!cfg.targets("model.layers.0.self_attn.xq_proj"));
        let all = LoraConfig {
            target_modules: Some(TargetModules::One("all-linear".into())),
            ..Default::default()
        };
        assert!(all.targets("model.layers.0.mlp.down_proj"));
        assert!(!all.targets("lm_head"));
        assert!(!all.targets("score"));
        let re = LoraConfig {
            target_modules: Some(TargetModules::One(".*(q_proj|v_proj)".into())),
            ..Default::default()
        };
        assert!(re.targets("model.layers.1.self_attn.v_proj"));
        assert!(!re.targets("model.layers.1.mlp.up_proj"));
    }

    #[test]
    fn seq_cls_saves_the_score_head_and_scale_follows_alpha() {
        let cfg = LoraConfig {
            r: 16,
            lora_alpha: 16.0,
            task_type: Some("SEQ_CLS".into()),
            modules_to_save: vec!["scores".into()],
            ..Default::default()
        }
        .resolved("llama")
        .unwrap();
        assert_eq!(
            cfg.modules_to_save,
            vec!["scores".to_string(), "score".to_string()]
        );
        assert_eq!(cfg.scale(), 1.0);
        assert_eq!(
            cfg.target_modules,
            Some(TargetModules::List(vec!["q_proj".into(), "v_proj".into()]))
        );
    }

    #[test]
    fn adapter_keys_normalise() {
        assert_eq!(
            normalize_adapter_key("base_model.model.score.modules_to_save.default.weight"),
            "base_model.model.score.weight"
        );
        assert_eq!(
            normalize_adapter_key(
                "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
            ),
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
        );
    }
}
