//! Saving models as transformers writes them, and LoRA adapters as PEFT writes them.
//!
//! Every file is written to a temporary name in the target directory, fsynced, renamed into
//! place, and the directory fsynced ([`rename_durable`]), so a crash or power loss never leaves
//! a half-written checkpoint under the real name nor loses a finished one.

use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;

use crate::model::{Heads, Model};
use crate::weights::Param;
use crate::{Error, Result};

/// Tokenizer and generation files copied next to saved weights when the source has them.
const COMPANION_FILES: [&str; 5] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
];

/// Writes `bytes` to `path` atomically and durably: a temporary file in the same directory,
/// fsynced, renamed over `path`, then the directory fsynced ([`rename_durable`]). A crash
/// leaves the old file or the new one, never a half-written or lost one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    if let Err(e) = std::fs::write(&tmp, bytes) {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(&tmp, e));
    }
    rename_durable(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// Puts a finished temporary file or directory `tmp` in place as `path`, durably: `tmp` is
/// fsynced (a directory's files must be synced already, as [`write_atomic`] leaves them),
/// renamed over `path`, and `path`'s directory fsynced so that the rename itself survives a
/// power loss. Every checkpoint and model write ends here.
pub fn rename_durable(tmp: &Path, path: &Path) -> Result<()> {
    sync(tmp)?;
    std::fs::rename(tmp, path).map_err(|e| Error::io(path, e))?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    sync(parent)
}

/// fsync of a file or directory.
fn sync(path: &Path) -> Result<()> {
    #[cfg(test)]
    tests::SYNCED.with(|s| s.borrow_mut().push(path.to_path_buf()));
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    match f.sync_all() {
        Ok(()) => Ok(()),
        // Some filesystems cannot fsync a directory; the rename stays atomic there.
        Err(e) if path.is_dir() && e.kind() == std::io::ErrorKind::InvalidInput => Ok(()),
        Err(e) => Err(Error::io(path, e)),
    }
}

/// Writes tensors as a safetensors file, atomically and durably (as [`write_atomic`]).
pub fn save_safetensors(path: &Path, tensors: &HashMap<String, Tensor>) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("model.safetensors");
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let contiguous: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.contiguous()?)))
        .collect::<Result<_>>()?;
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    let views: Vec<(String, Tensor)> = contiguous.into_iter().collect();
    safetensors::tensor::serialize_to_file(
        views.iter().map(|(k, t)| (k.as_str(), t)),
        Some(meta),
        &tmp,
    )
    .map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::bad_file(&tmp, format!("cannot write safetensors: {e}"))
    })?;
    rename_durable(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// The transformers class-name prefix of a model_type.
fn class_prefix(model_type: &str) -> &'static str {
    match model_type {
        "mistral" => "Mistral",
        "qwen2" => "Qwen2",
        "gpt2" => "GPT2",
        "opt" => "OPT",
        _ => "Llama",
    }
}

impl Model {
    /// The base weights with every LoRA adapter folded in (W += scale·B·A), under HF names.
    pub fn merged_weights(&self) -> Result<HashMap<String, Tensor>> {
        let mut out: HashMap<String, Tensor> = HashMap::new();
        let mut adapters: Vec<(String, Tensor, Tensor)> = Vec::new();
        for (name, p) in self.params().iter() {
            if let Some(module) = name
                .strip_prefix("base_model.model.")
                .and_then(|n| n.strip_suffix(".lora_A.weight"))
            {
                let b_name = format!("base_model.model.{module}.lora_B.weight");
                let b = self
                    .params()
                    .get(&b_name)
                    .ok_or_else(|| Error::Config(format!("{b_name} missing beside {name}")))?;
                adapters.push((module.to_string(), p.tensor().detach(), b.tensor().detach()));
            } else if !name.contains(".lora_B.") {
                out.insert(name.clone(), p.tensor().detach());
            }
        }
        let scale = self.lora().map(|l| l.scale()).unwrap_or(1.0);
        let conv1d = self.config.model_type == "gpt2";
        for (module, a, b) in adapters {
            let wname = format!("{module}.weight");
            let w = out
                .get(&wname)
                .ok_or_else(|| Error::Config(format!("adapter for {module} has no base weight")))?;
            let delta = (b.matmul(&a)? * scale)?; // (out, in)
                                                  // GPT-2's Conv1D stores (in, out).
            let delta = if conv1d { delta.t()? } else { delta };
            out.insert(wname, (w + delta)?);
        }
        Ok(out)
    }

    /// Saves a Hugging Face directory transformers loads as it is: config.json (architecture
    /// set from `heads`), model.safetensors with adapters merged, and the tokenizer and
    /// generation files of the source directory.
    pub fn save_pretrained(&self, dir: &Path, heads: Heads) -> Result<()> {
        let mut weights = self.merged_weights()?;
        if self.config.tie_word_embeddings {
            weights.remove("lm_head.weight");
        }
        if heads == Heads::Lm {
            weights.remove("score.weight");
        }
        let mut cfg = self.raw_config.clone();
        let prefix = class_prefix(&self.config.model_type);
        let obj = cfg
            .as_object_mut()
            .ok_or_else(|| Error::Config("config.json is not an object".into()))?;
        let class = match heads {
            Heads::Score => {
                obj.insert("num_labels".into(), 1.into());
                obj.insert("id2label".into(), serde_json::json!({"0": "LABEL_0"}));
                obj.insert("label2id".into(), serde_json::json!({"LABEL_0": 0}));
                format!("{prefix}ForSequenceClassification")
            }
            _ => format!("{prefix}ForCausalLM"),
        };
        obj.insert("architectures".into(), serde_json::json!([class]));
        let dtype = format!("{:?}", self.dtype()).to_lowercase();
        let dtype = match dtype.as_str() {
            "f32" => "float32",
            "bf16" => "bfloat16",
            "f16" => "float16",
            _ => "float32",
        };
        obj.insert("torch_dtype".into(), dtype.into());
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        save_safetensors(&dir.join("model.safetensors"), &weights)?;
        let text = serde_json::to_string_pretty(&cfg).expect("json value serialises");
        write_atomic(&dir.join("config.json"), text.as_bytes())?;
        self.copy_companions(dir)
    }

    /// Saves the LoRA adapter as PEFT does: adapter_config.json and adapter_model.safetensors
    /// with `base_model.model.*.lora_{A,B}.weight` and the `modules_to_save` weights.
    pub fn save_adapter(&self, dir: &Path) -> Result<()> {
        let lora = self
            .lora()
            .ok_or_else(|| Error::Config("this model has no LoRA adapter to save".into()))?;
        let mut tensors = HashMap::new();
        for (name, p) in self.params().iter() {
            if let Param::Trainable(v) = p {
                let key = if name.starts_with("base_model.model.") {
                    name.clone()
                } else {
                    format!("base_model.model.{name}")
                };
                tensors.insert(key, v.as_tensor().detach());
            }
        }
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        save_safetensors(&dir.join("adapter_model.safetensors"), &tensors)?;
        // An absolute path, so the adapter finds its base from any working directory.
        let base = self
            .base_name()
            .canonicalize()
            .unwrap_or_else(|_| self.base_name().to_path_buf());
        let cfg = lora.to_peft_json(&base.to_string_lossy());
        let text = serde_json::to_string_pretty(&cfg).expect("json value serialises");
        write_atomic(&dir.join("adapter_config.json"), text.as_bytes())?;
        self.copy_companions(dir)
    }

    /// Overwrites adapter (and modules_to_save) values with those saved in `dir`.
    pub fn load_adapter_weights(&self, dir: &Path) -> Result<()> {
        let saved = crate::lora::read_adapter_tensors(dir, self.device())?;
        self.set_adapter_tensors(dir, &saved)
    }

    /// [`load_adapter_weights`](Self::load_adapter_weights) from tensors already read from
    /// `dir`'s adapter file (named for error messages).
    pub fn set_adapter_tensors(&self, dir: &Path, saved: &HashMap<String, Tensor>) -> Result<()> {
        let path = dir.join("adapter_model.safetensors");
        let mut used = 0;
        for (name, p) in self.params().iter() {
            let Param::Trainable(var) = p else { continue };
            let key = if name.starts_with("base_model.model.") {
                name.clone()
            } else {
                format!("base_model.model.{name}")
            };
            let t = saved.get(&key).ok_or_else(|| Error::MissingTensor {
                path: path.clone(),
                name: key.clone(),
                hint: " (was the adapter trained with other target_modules or modules_to_save?)"
                    .into(),
            })?;
            if t.dims() != var.dims() {
                return Err(Error::bad_file(
                    &path,
                    format!(
                        "tensor {key:?} has shape {:?}, but the base model it is applied to \
                         ({}) needs {:?}: the adapter was trained on a base of another size; \
                         load it on that base (its adapter_config.json names it as \
                         base_model_name_or_path)",
                        t.dims(),
                        self.dir().display(),
                        var.dims()
                    ),
                ));
            }
            var.set(&t.to_dtype(var.dtype())?)?;
            used += 1;
        }
        if used != saved.len() {
            let mine: Vec<String> = self
                .params()
                .trainable()
                .into_iter()
                .map(|(n, _)| n)
                .collect();
            let extra: Vec<&String> = saved
                .keys()
                .filter(|k| {
                    !mine
                        .iter()
                        .any(|m| *k == m || **k == format!("base_model.model.{m}"))
                })
                .take(3)
                .collect();
            return Err(Error::bad_file(
                &path,
                format!("holds tensors this model has no place for, e.g. {extra:?}"),
            ));
        }
        Ok(())
    }

    fn copy_companions(&self, dir: &Path) -> Result<()> {
        if self.dir() == dir {
            return Ok(());
        }
        for f in COMPANION_FILES {
            let src = self.dir().join(f);
            if src.exists() {
                let bytes = std::fs::read(&src).map_err(|e| Error::io(&src, e))?;
                write_atomic(&dir.join(f), &bytes)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::path::PathBuf;

    thread_local! {
        /// Paths fsynced on this thread, in order.
        pub(super) static SYNCED: RefCell<Vec<PathBuf>> = const { RefCell::new(Vec::new()) };
    }

    fn synced() -> Vec<PathBuf> {
        SYNCED.with(|s| std::mem::take(&mut *s.borrow_mut()))
    }

    /// A file write is durable: the temporary file is fsynced before the rename and the
    /// directory after it; nothing temporary is left.
    #[test]
    fn writes_fsync_the_file_then_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.json");
        synced();
        write_atomic(&p, b"{}").unwrap();
        let s = synced();
        assert_eq!(s.len(), 2, "{s:?}");
        assert_eq!(s[0].parent(), Some(dir.path()));
        assert!(s[0]
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with(".a.json.tmp"));
        assert_eq!(s[1], dir.path());
        assert_eq!(std::fs::read(&p).unwrap(), b"{}");

        let t = HashMap::from([(
            "w".to_string(),
            Tensor::new(&[1f32, 2.0], &candle_core::Device::Cpu).unwrap(),
        )]);
        let st = dir.path().join("m.safetensors");
        save_safetensors(&st, &t).unwrap();
        let s = synced();
        assert_eq!(s.len(), 2, "{s:?}");
        assert_eq!(s[1], dir.path());
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.contains("tmp")), "{names:?}");
    }
}
