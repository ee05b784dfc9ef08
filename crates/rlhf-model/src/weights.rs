//! Where a model's tensors come from and where its parameters go.
//!
//! A [`WeightSource`] holds a checkpoint's tensors by their Hugging Face names. A [`Builder`]
//! walks the module tree with the same names (`b.pp("model").pp("layers").pp(0)`), so the
//! loading code *is* the name map. Every tensor it hands out is recorded in a [`ParamStore`]
//! under its HF name: frozen ones as plain tensors (no gradient is ever computed for them),
//! trainable ones as candle `Var`s, which the optimiser updates in place.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use candle_core::{DType, Device, Tensor, Var};

use crate::lora::LoraConfig;
use crate::{Error, Result};

/// A checkpoint's tensors, by name, with the file they came from (for error messages).
#[derive(Debug, Clone)]
pub struct WeightSource {
    tensors: HashMap<String, Tensor>,
    path: PathBuf,
}

impl WeightSource {
    /// Reads `model.safetensors`, or every shard named by `model.safetensors.index.json`.
    pub fn from_dir(dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let mut tensors = HashMap::new();
        let path = if single.exists() {
            load_file(&single, device, dtype, &mut tensors)?;
            single
        } else if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
            let json: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| Error::bad_file(&index, e))?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::bad_file(&index, "no \"weight_map\" object"))?;
            let mut shards: Vec<&str> = map.values().filter_map(|v| v.as_str()).collect();
            shards.sort_unstable();
            shards.dedup();
            for shard in shards {
                // A shard is a file beside the index: a name such as "../x" or "/etc/x" would
                // read outside the model directory.
                let plain = std::path::Path::new(shard)
                    .file_name()
                    .is_some_and(|f| f == std::ffi::OsStr::new(shard));
                if !plain {
                    return Err(Error::bad_file(
                        &index,
                        format!(
                            "weight_map names the shard {shard:?}; shards must be file names in \
                             the model directory (like model-00001-of-00002.safetensors)"
                        ),
                    ));
                }
                let p = dir.join(shard);
                if !p.exists() {
                    return Err(Error::MissingFile {
                        path: p,
                        what: "a shard named in model.safetensors.index.json",
                        hint: "copy every shard of the checkpoint into the directory".into(),
                    });
                }
                load_file(&p, device, dtype, &mut tensors)?;
            }
            index
        } else if dir.join("pytorch_model.bin").exists() {
            return Err(Error::MissingFile {
                path: single,
                what: "weights in safetensors format",
                hint: "only pytorch_model.bin is there; convert it once with transformers: \
                       `AutoModel.from_pretrained(DIR).save_pretrained(DIR, safe_serialization=True)`"
                    .into(),
            });
        } else {
            return Err(Error::MissingFile {
                path: single,
                what: "model weights",
                hint: "expected model.safetensors or model.safetensors.index.json with its shards"
                    .into(),
            });
        };
        Ok(Self { tensors, path })
    }

    /// A source with no tensors whose every request is initialised at random (1-D weights to
    /// ones, biases to zeros, matrices N(0, initializer_range)): fresh models for benchmarks
    /// and tests.
    pub fn random() -> Self {
        Self {
            tensors: HashMap::new(),
            path: PathBuf::from("<random init>"),
        }
    }

    /// Whether this is the [`random`](Self::random) source.
    pub fn is_random(&self) -> bool {
        self.tensors.is_empty() && self.path.as_os_str() == "<random init>"
    }

    /// Builds a source from tensors in memory (tests, GGUF conversion).
    pub fn from_tensors(tensors: HashMap<String, Tensor>, path: impl Into<PathBuf>) -> Self {
        Self {
            tensors,
            path: path.into(),
        }
    }

    /// Adds or replaces a tensor (e.g. a head initialised from another model).
    pub fn insert(&mut self, name: impl Into<String>, t: Tensor) {
        self.tensors.insert(name.into(), t);
    }

    /// The tensor `name` as stored, if present (no shape check).
    pub fn tensor(&self, name: &str) -> Option<&Tensor> {
        self.tensors.get(name)
    }

    /// The file the tensors came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether a tensor of this name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The tensor `name`, checked against the shape the config implies.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.tensors.get(name).ok_or_else(|| Error::MissingTensor {
            path: self.path.clone(),
            name: name.to_string(),
            hint: self.near_miss(name),
        })?;
        if t.dims() != shape {
            return Err(Error::ShapeMismatch {
                path: self.path.clone(),
                name: name.to_string(),
                expected: shape.to_vec(),
                found: t.dims().to_vec(),
            });
        }
        Ok(t.clone())
    }

    /// Names of all tensors, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.tensors.keys().map(|s| s.as_str()).collect();
        v.sort_unstable();
        v
    }

    fn near_miss(&self, name: &str) -> String {
        let last = name.rsplit('.').nth(1).unwrap_or(name);
        let similar: Vec<&str> = self
            .names()
            .into_iter()
            .filter(|n| n.contains(last))
            .take(3)
            .collect();
        if similar.is_empty() {
            String::new()
        } else {
            format!(" (similar names present: {})", similar.join(", "))
        }
    }
}

/// Reads a safetensors file one tensor at a time, straight into each tensor's own buffer: the
/// file is never held in memory whole, so loading peaks at the model's size plus one tensor
/// rather than twice the model's size (candle's `safetensors::load` reads the whole file
/// first).
fn load_file(
    path: &Path,
    device: &Device,
    dtype: DType,
    out: &mut HashMap<String, Tensor>,
) -> Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    let bad = |msg: String| Error::bad_file(path, msg);
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let file_len = f.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut len8 = [0u8; 8];
    f.read_exact(&mut len8)
        .map_err(|_| bad("not a safetensors file: shorter than its 8-byte header length".into()))?;
    let n = u64::from_le_bytes(len8);
    if n > 100 << 20 || 8 + n > file_len {
        return Err(bad(format!(
            "not a safetensors file: header length {n} does not fit the file ({file_len} bytes)"
        )));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(|e| Error::io(path, e))?;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header)
        .map_err(|e| bad(format!("cannot read safetensors header: {e}")))?;
    let data_start = 8 + n;
    let data_len = file_len - data_start;
    for (name, info) in &header {
        if name == "__metadata__" {
            continue;
        }
        let field = |k: &str| {
            info.get(k)
                .ok_or_else(|| bad(format!("tensor {name}: header has no {k:?}")))
        };
        let dt = match field("dtype")?.as_str().unwrap_or("") {
            "F32" => DType::F32,
            "F16" => DType::F16,
            "BF16" => DType::BF16,
            "F64" => DType::F64,
            "I64" => DType::I64,
            "U32" => DType::U32,
            "U8" | "BOOL" => DType::U8,
            other => {
                return Err(bad(format!(
                    "tensor {name}: dtype {other:?} is not supported (F32, F16, BF16, F64, I64, \
                     U32, U8)"
                )))
            }
        };
        let nums = |v: &serde_json::Value| -> Option<Vec<u64>> {
            v.as_array()?.iter().map(|x| x.as_u64()).collect()
        };
        let shape: Vec<usize> = nums(field("shape")?)
            .ok_or_else(|| bad(format!("tensor {name}: shape is not a list of sizes")))?
            .into_iter()
            .map(|x| x as usize)
            .collect();
        let offsets = nums(field("data_offsets")?)
            .filter(|o| o.len() == 2)
            .ok_or_else(|| bad(format!("tensor {name}: data_offsets is not [start, end]")))?;
        let (start, end) = (offsets[0], offsets[1]);
        let numel: usize = shape.iter().product();
        let bytes = (numel * dt.size_in_bytes()) as u64;
        if start > end || end > data_len || end - start != bytes {
            return Err(bad(format!(
                "tensor {name}: data_offsets [{start}, {end}] do not hold {shape:?} {dt:?} \
                 ({bytes} bytes) within the file's {data_len} bytes of data"
            )));
        }
        f.seek(SeekFrom::Start(data_start + start))
            .map_err(|e| Error::io(path, e))?;
        let t = if dt == DType::F32 && cfg!(target_endian = "little") {
            // Read straight into the f32 buffer the tensor will own.
            let mut v = vec![0f32; numel];
            // SAFETY: any byte pattern is a valid f32; the slice covers exactly v's elements.
            let raw =
                unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), numel * 4) };
            f.read_exact(raw).map_err(|e| Error::io(path, e))?;
            Tensor::from_vec(v, shape, device)?
        } else {
            let mut raw = vec![0u8; bytes as usize];
            f.read_exact(&mut raw).map_err(|e| Error::io(path, e))?;
            Tensor::from_raw_buffer(&raw, dt, &shape, device)?
        };
        let t = if t.dtype().is_float() && t.dtype() != dtype {
            t.to_dtype(dtype)?
        } else {
            t
        };
        out.insert(name.clone(), t);
    }
    Ok(())
}

/// One named parameter: a frozen tensor, or a trainable `Var`.
#[derive(Debug, Clone)]
pub enum Param {
    /// Never receives a gradient.
    Frozen(Tensor),
    /// Updated by the optimiser.
    Trainable(Var),
    /// Frozen, kept in the GEMM kernel's layout (shared with its layer).
    Kernel(std::rc::Rc<crate::nn::KernelWeight>),
}

impl Param {
    /// The tensor view (shares storage with the `Var` when trainable).
    pub fn tensor(&self) -> &Tensor {
        match self {
            Param::Frozen(t) => t,
            Param::Trainable(v) => v.as_tensor(),
            Param::Kernel(k) => k.tensor(),
        }
    }

    /// Its number of elements (without rebuilding a kernel-layout weight).
    pub fn elem_count(&self) -> usize {
        match self {
            Param::Kernel(k) => k.elem_count(),
            p => p.tensor().elem_count(),
        }
    }
}

/// Every parameter of a model under its Hugging Face (or PEFT) name.
#[derive(Debug, Default)]
pub struct ParamStore {
    params: BTreeMap<String, Param>,
}

impl ParamStore {
    /// Records a parameter.
    pub fn insert(&mut self, name: String, p: Param) {
        self.params.insert(name, p);
    }

    /// All parameters, sorted by name.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Param)> {
        self.params.iter()
    }

    /// The parameter `name`.
    pub fn get(&self, name: &str) -> Option<&Param> {
        self.params.get(name)
    }

    /// Replaces the frozen parameter whose tensor has id `old` with its kernel-layout form;
    /// returns whether one was found.
    pub(crate) fn replace_frozen(
        &mut self,
        old: candle_core::TensorId,
        kernel: &std::rc::Rc<crate::nn::KernelWeight>,
    ) -> bool {
        for p in self.params.values_mut() {
            if matches!(p, Param::Frozen(t) if t.id() == old) {
                *p = Param::Kernel(kernel.clone());
                return true;
            }
        }
        false
    }

    /// Replaces the frozen parameter whose tensor has id `old` with `new` (its bf16 form for
    /// decoding); returns whether one was found.
    pub(crate) fn replace_frozen_tensor(
        &mut self,
        old: candle_core::TensorId,
        new: Tensor,
    ) -> bool {
        for p in self.params.values_mut() {
            if matches!(p, Param::Frozen(t) if t.id() == old) {
                *p = Param::Frozen(new);
                return true;
            }
        }
        false
    }

    /// The trainable parameters, sorted by name: what the optimiser owns.
    pub fn trainable(&self) -> Vec<(String, Var)> {
        self.params
            .iter()
            .filter_map(|(n, p)| match p {
                Param::Trainable(v) => Some((n.clone(), v.clone())),
                Param::Frozen(_) | Param::Kernel(_) => None,
            })
            .collect()
    }

    /// Number of scalar values in trainable / all parameters.
    pub fn counts(&self) -> (usize, usize) {
        let mut trainable = 0;
        let mut all = 0;
        for p in self.params.values() {
            let n = p.elem_count();
            all += n;
            if matches!(p, Param::Trainable(_)) {
                trainable += n;
            }
        }
        (trainable, all)
    }
}

/// What becomes trainable when a model is built.
#[derive(Debug, Clone, Default)]
pub enum Training {
    /// Inference only: nothing is a `Var`.
    #[default]
    Frozen,
    /// Full fine-tuning: every weight is a `Var`.
    Full,
    /// LoRA: adapter matrices and `modules_to_save` are `Var`s, the base stays frozen.
    Lora(LoraConfig),
}

struct Shared {
    source: WeightSource,
    store: RefCell<ParamStore>,
    training: Training,
    device: Device,
    dtype: DType,
    /// Heads missing from the checkpoint are initialised N(0, init_std), as transformers does.
    init_std: f64,
    rng: RefCell<rand::rngs::StdRng>,
    /// Names of modules_to_save entries that matched a module.
    matched_saves: RefCell<Vec<String>>,
}

/// Walks the module tree, handing out tensors by path and recording them as parameters.
#[derive(Clone)]
pub struct Builder {
    shared: Rc<Shared>,
    prefix: String,
}

impl Builder {
    /// A builder over `source`; `seed` drives initialisation of missing heads and LoRA A.
    pub fn new(
        source: WeightSource,
        training: Training,
        device: Device,
        dtype: DType,
        init_std: f64,
        seed: u64,
    ) -> Self {
        use rand::SeedableRng;
        Self {
            shared: Rc::new(Shared {
                source,
                store: RefCell::new(ParamStore::default()),
                training,
                device,
                dtype,
                init_std,
                rng: RefCell::new(rand::rngs::StdRng::seed_from_u64(seed)),
                matched_saves: RefCell::new(Vec::new()),
            }),
            prefix: String::new(),
        }
    }

    /// The builder one level down: `pp("layers").pp(3)`.
    pub fn pp(&self, name: impl std::fmt::Display) -> Self {
        let prefix = if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{}", self.prefix, name)
        };
        Self {
            shared: self.shared.clone(),
            prefix,
        }
    }

    /// This module's full dotted path.
    pub fn path(&self) -> &str {
        &self.prefix
    }

    /// The device tensors live on.
    pub fn device(&self) -> &Device {
        &self.shared.device
    }

    /// The compute dtype.
    pub fn dtype(&self) -> DType {
        self.shared.dtype
    }

    /// The training mode.
    pub fn training(&self) -> &Training {
        &self.shared.training
    }

    /// The source's file, for messages.
    pub fn source(&self) -> &WeightSource {
        &self.shared.source
    }

    fn full_name(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{}", self.prefix, name)
        }
    }

    /// Whether the checkpoint has `name` under this path (a random source has everything
    /// but a separate LM head when embeddings are tied, decided by the config).
    pub fn contains(&self, name: &str) -> bool {
        self.shared.source.contains(&self.full_name(name))
    }

    /// A base-model weight: trainable only in full fine-tuning, or when this module is in
    /// LoRA's `modules_to_save`.
    pub fn get(&self, shape: &[usize], name: &str) -> Result<Tensor> {
        let full = self.full_name(name);
        let t = if self.shared.source.is_random() {
            match (shape.len(), name) {
                (1, "weight") => Tensor::ones(shape, self.shared.dtype, &self.shared.device)?,
                (_, "bias") => Tensor::zeros(shape, self.shared.dtype, &self.shared.device)?,
                _ => self.randn(shape, self.shared.init_std)?,
            }
        } else {
            self.shared.source.get(&full, shape)?
        };
        let trainable = match &self.shared.training {
            Training::Frozen => false,
            Training::Full => true,
            Training::Lora(cfg) => self.in_modules_to_save(cfg),
        };
        self.record(full, t, trainable)
    }

    /// Like [`get`](Self::get), but a tensor absent from the checkpoint is initialised
    /// N(0, init_std) (a new score or value head on a causal-LM checkpoint).
    pub fn get_or_init(&self, shape: &[usize], name: &str) -> Result<Tensor> {
        let full = self.full_name(name);
        if self.shared.source.contains(&full) || self.shared.source.is_random() {
            return self.get(shape, name);
        }
        tracing::info!(
            "{full} not in the checkpoint: initialised N(0, {})",
            self.shared.init_std
        );
        let t = self.randn(shape, self.shared.init_std)?;
        let trainable = match &self.shared.training {
            Training::Frozen => false,
            Training::Full => true,
            Training::Lora(cfg) => self.in_modules_to_save(cfg),
        };
        self.record(full, t, trainable)
    }

    /// A new trainable tensor that is not part of the base checkpoint (LoRA A/B).
    pub fn new_trainable(&self, name: String, t: Tensor) -> Result<Tensor> {
        self.record(name, t, true)
    }

    /// Normal(0, std) values from the builder's seeded generator.
    pub fn randn(&self, shape: &[usize], std: f64) -> Result<Tensor> {
        use rand::Rng;
        let n: usize = shape.iter().product();
        let mut rng = self.shared.rng.borrow_mut();
        let v: Vec<f32> = (0..n)
            .map(|_| {
                // Box-Muller: rand 0.9 has no normal distribution without rand_distr.
                let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
                let u2: f64 = rng.random::<f64>();
                ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos() * std) as f32
            })
            .collect();
        Ok(Tensor::from_vec(v, shape, &self.shared.device)?.to_dtype(self.shared.dtype)?)
    }

    /// Uniform(-bound, bound) values from the builder's seeded generator.
    pub fn uniform(&self, shape: &[usize], bound: f64) -> Result<Tensor> {
        use rand::Rng;
        let n: usize = shape.iter().product();
        let mut rng = self.shared.rng.borrow_mut();
        let v: Vec<f32> = (0..n)
            .map(|_| rng.random_range(-bound..bound) as f32)
            .collect();
        Ok(Tensor::from_vec(v, shape, &self.shared.device)?.to_dtype(self.shared.dtype)?)
    }

    fn record(&self, name: String, t: Tensor, trainable: bool) -> Result<Tensor> {
        let param = if trainable {
            Param::Trainable(Var::from_tensor(&t)?)
        } else {
            Param::Frozen(t)
        };
        let tensor = param.tensor().clone();
        self.shared.store.borrow_mut().insert(name, param);
        Ok(tensor)
    }

    /// Whether this module's path is one of LoRA's `modules_to_save` (matched like PEFT:
    /// the module name or its last component).
    fn in_modules_to_save(&self, cfg: &LoraConfig) -> bool {
        let module = &self.prefix;
        let hit = cfg
            .modules_to_save
            .iter()
            .find(|m| module == *m || module.ends_with(&format!(".{m}")));
        if let Some(m) = hit {
            let mut seen = self.shared.matched_saves.borrow_mut();
            if !seen.contains(m) {
                seen.push(m.clone());
            }
            true
        } else {
            false
        }
    }

    /// The modules_to_save entries that matched some module.
    pub fn matched_modules_to_save(&self) -> Vec<String> {
        self.shared.matched_saves.borrow().clone()
    }

    /// Takes the parameters recorded so far (called once, when the model is complete).
    pub fn into_store(self) -> ParamStore {
        std::mem::take(&mut *self.shared.store.borrow_mut())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_shards_outside_the_directory_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let model = tmp.path().join("model");
        std::fs::create_dir_all(&model).unwrap();
        for shard in [
            "../secret.safetensors",
            "/etc/passwd",
            "sub/x.safetensors",
            "..",
        ] {
            std::fs::write(
                model.join("model.safetensors.index.json"),
                serde_json::json!({"weight_map": {"a": shard}}).to_string(),
            )
            .unwrap();
            let e = WeightSource::from_dir(&model, &Device::Cpu, DType::F32)
                .unwrap_err()
                .to_string();
            assert!(e.contains("shards must be file names"), "{shard}: {e}");
        }
    }

    fn saved(dir: &Path) -> (PathBuf, HashMap<String, Tensor>) {
        let dev = Device::Cpu;
        let vals: Vec<f32> = (0..24).map(|i| i as f32 * 0.25 - 3.0).collect();
        let mut ts = HashMap::new();
        ts.insert(
            "a.weight".to_string(),
            Tensor::from_vec(vals.clone(), (4, 6), &dev).unwrap(),
        );
        ts.insert(
            "b.weight".to_string(),
            Tensor::from_vec(vals[..6].to_vec(), 6, &dev)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap(),
        );
        ts.insert("ids".to_string(), Tensor::new(&[3u32, 1, 4], &dev).unwrap());
        let path = dir.join("model.safetensors");
        candle_core::safetensors::save(&ts, &path).unwrap();
        (path, ts)
    }

    #[test]
    fn reads_each_tensor_as_saved_and_converts_floats() {
        let dir = tempfile::tempdir().unwrap();
        let (path, ts) = saved(dir.path());
        let mut out = HashMap::new();
        load_file(&path, &Device::Cpu, DType::F32, &mut out).unwrap();
        assert_eq!(out.len(), 3);
        for (name, want) in &ts {
            let got = &out[name];
            assert_eq!(got.dims(), want.dims(), "{name}");
            let want = want.to_dtype(got.dtype()).unwrap();
            let d = (got.to_dtype(DType::F64).unwrap() - want.to_dtype(DType::F64).unwrap())
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            assert_eq!(d, 0.0, "{name}");
        }
        assert_eq!(out["b.weight"].dtype(), DType::F32);
        assert_eq!(out["ids"].dtype(), DType::U32);
    }

    #[test]
    fn a_truncated_or_foreign_file_is_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _) = saved(dir.path());
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 10]).unwrap();
        let err = load_file(&path, &Device::Cpu, DType::F32, &mut HashMap::new())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("model.safetensors") && err.contains("data_offsets"),
            "{err}"
        );
        std::fs::write(&path, b"{\"not\": \"safetensors\"}").unwrap();
        let err = load_file(&path, &Device::Cpu, DType::F32, &mut HashMap::new())
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a safetensors file"), "{err}");
    }
}
