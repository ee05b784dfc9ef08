//! A loaded model: one backbone architecture plus the heads a stage needs (LM, score, value).
//!
//! The score head is transformers' `AutoModelForSequenceClassification` with one label:
//! `score.weight` (1, hidden), no bias, read at the last non-pad token of each row.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use candle_core::{DType, Device, Tensor};

use crate::kernels::KvCache;
use crate::lora::LoraConfig;
use crate::nn::{Linear, Switches};
use crate::weights::{Builder, ParamStore, Training, WeightSource};
use crate::{Error, Result};

/// A decoder without heads: embeddings → blocks → final norm.
pub trait Backbone {
    /// Hidden states of the last layer (after the final norm).
    // ids: (b, t) u32, positions: b rows of t, bias: (b, 1, t, past + t) -> (b, t, hidden)
    fn forward(
        &self,
        ids: &Tensor,
        positions: &[Vec<u32>],
        bias: &Tensor,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor>;
    /// Hidden states of sequences packed into one row without padding (batch 1), laid out
    /// as `packing` says (plain sequences, or prompts shared by their completions), with
    /// the caller's `positions`. The default runs [`forward`](Self::forward) with the
    /// packing's (total × total) bias; a backbone whose attention works per segment
    /// overrides it and builds no such bias.
    // ids: (1, total) u32 -> (1, total, hidden)
    fn forward_packed(
        &self,
        ids: &Tensor,
        positions: &[Vec<u32>],
        packing: &crate::kernels::Packing,
    ) -> Result<Tensor> {
        let bias = crate::kernels::packed_attention_bias(packing, ids.device())?
            .to_dtype(self.embed_weight().dtype())?;
        self.forward(ids, positions, &bias, None)
    }
    /// [`forward_packed`](Self::forward_packed)'s hidden states at the flat row indices
    /// `rows` only, in that order: `(1, rows, hidden)`. A backbone may then skip the work
    /// of its last layer that no kept row reads; the default computes every row and picks.
    // ids: (1, total) u32 -> (1, rows, hidden)
    fn forward_packed_rows(
        &self,
        ids: &Tensor,
        positions: &[Vec<u32>],
        packing: &crate::kernels::Packing,
        rows: &[usize],
    ) -> Result<Tensor> {
        crate::ops::select_rows(&self.forward_packed(ids, positions, packing)?, rows)
    }
    /// Whether [`forward_packed`](Self::forward_packed) skips the blocks off the diagonal,
    /// i.e. packing costs no more attention work than padding.
    fn packs_natively(&self) -> bool {
        false
    }
    /// Keeps the frozen projection weights of the layers the one-op layer runs in the GEMM
    /// kernel's layout ([`crate::nn::Linear::keep_in_kernel_layout`]), handing each replaced
    /// tensor's id and the weight's new form to `replaced` as it goes (which drops the
    /// parameter store's hold on the old tensor, so that only one weight is ever held
    /// twice). The default converts none.
    fn keep_frozen_in_kernel_layout(&mut self, replaced: &mut Replaced<'_>) -> Result<()> {
        let _ = replaced;
        Ok(())
    }
    /// Keeps the frozen f32 weights of the linear layers and the token embedding in bf16
    /// for decoding ([`crate::nn::Linear::keep_in_bf16`]), handing each replaced tensor's id
    /// and its bf16 form to `replaced` as it goes. The default converts none.
    /// `embedding`: the token embedding too (else its lookups stay f32).
    fn keep_frozen_in_bf16(
        &mut self,
        embedding: bool,
        replaced: &mut ReplacedBf16<'_>,
    ) -> Result<()> {
        let _ = (embedding, replaced);
        Ok(())
    }
    /// Number of decoder layers (the KV cache's size).
    fn n_layers(&self) -> usize;
    /// Width of the hidden states.
    fn hidden_size(&self) -> usize;
    /// The token embedding matrix (vocab, hidden), for tied LM heads.
    fn embed_weight(&self) -> &Tensor;
    /// Position ids of a padded batch for a forward without cache. The default counts from
    /// each row's first real token ([`crate::kernels::positions_from_mask`]); OPT overrides it to
    /// give padding the position transformers gives it.
    // mask: (b, t) of 0/1 -> (b, t) positions
    fn positions(&self, mask: &[Vec<u8>]) -> Vec<Vec<u32>> {
        crate::kernels::positions_from_mask(mask)
    }
}

/// What [`Backbone::keep_frozen_in_kernel_layout`] reports each converted weight to.
pub type Replaced<'a> =
    dyn FnMut(candle_core::TensorId, std::rc::Rc<crate::nn::KernelWeight>) -> Result<()> + 'a;

/// What [`Backbone::keep_frozen_in_bf16`] reports each converted weight to.
pub type ReplacedBf16<'a> = dyn FnMut(candle_core::TensorId, Tensor) -> Result<()> + 'a;

/// Shortest prefix worth sharing, in tokens.
const MIN_SHARED: usize = 4;
/// Most sequences sharing one prefix (a segment's attention block grows with its length).
const MAX_BRANCHES: usize = 8;

/// Groups sequences by a common prefix of at least `MIN_SHARED` tokens: `(prefix length,
/// members)` per group, in order of first appearance; every member keeps at least one token
/// past the prefix. A sequence that shares too little starts its own group (prefix: all but
/// its last token).
fn shared_prefixes(seqs: &[Vec<u32>]) -> Vec<(usize, Vec<usize>)> {
    // A prefix every sequence shares (a chat template's system turn) is packed once anyway
    // (the root of `hidden_shared_prompts`): group by what is shared past it.
    let all: Vec<&[u32]> = seqs.iter().map(|s| s.as_slice()).collect();
    let root = common_root(&all, 2);
    let mut groups: Vec<(usize, Vec<usize>)> = Vec::new();
    for (i, s) in seqs.iter().enumerate() {
        let best = groups
            .iter()
            .enumerate()
            .filter(|(_, (_, m))| m.len() < MAX_BRANCHES)
            .map(|(g, (n, m))| (g, (*n).min(lcp(&seqs[m[0]], s)).min(s.len() - 1)))
            .filter(|&(_, n)| n >= root + MIN_SHARED)
            .max_by_key(|&(_, n)| n);
        match best {
            Some((g, n)) => {
                groups[g].0 = n;
                groups[g].1.push(i);
            }
            None => groups.push((s.len() - 1, vec![i])),
        }
    }
    groups
}

/// Where a group of [`Model::hidden_shared_prompts`] lies in the packed row.
#[derive(Clone, Debug, PartialEq)]
pub struct GroupOffsets {
    /// The rows of the root: the first tokens of every prompt, packed once for all groups
    /// (empty when there is none).
    pub root: std::ops::Range<usize>,
    /// Where the prompt's own tokens, past the root, start.
    pub prompt: usize,
    /// Where each completion starts.
    pub completions: Vec<usize>,
}

impl GroupOffsets {
    /// The row of the prompt's token `pos`.
    pub fn prompt_row(&self, pos: usize) -> usize {
        if pos < self.root.len() {
            self.root.start + pos
        } else {
            self.prompt + pos - self.root.len()
        }
    }
}

/// The length of the longest common prefix of `a` and `b`.
fn lcp(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// The longest prefix all of `seqs` share, where worth packing once for all ([`MIN_SHARED`]
/// tokens at least, and at least two sequences); every sequence keeps `keep` tokens past it.
pub(crate) fn common_root(seqs: &[&[u32]], keep: usize) -> usize {
    let Some((first, rest)) = seqs.split_first() else {
        return 0;
    };
    if rest.is_empty() {
        return 0;
    }
    let n = rest.iter().map(|s| lcp(first, s)).min().unwrap_or(0);
    let shortest = seqs.iter().map(|s| s.len()).min().unwrap_or(0);
    let n = n.min(shortest.saturating_sub(keep));
    if n >= MIN_SHARED {
        n
    } else {
        0
    }
}

/// The fields every config.json has that this layer needs, whatever the architecture.
#[derive(Debug, Clone)]
pub struct CommonConfig {
    /// "llama", "mistral", "qwen2", "gpt2", "opt".
    pub model_type: String,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Hidden width.
    pub hidden_size: usize,
    /// Whether the LM head is the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Padding id, used to find the last real token for the score head.
    pub pad_token_id: Option<u32>,
    /// End-of-sequence ids (config.json may hold one or a list).
    pub eos_token_ids: Vec<u32>,
    /// Std of the normal init transformers uses for new heads.
    pub initializer_range: f64,
}

/// Architectures this crate implements, as config.json's `model_type` names them.
pub const SUPPORTED: &str = "llama, mistral, qwen2, smollm (llama), gpt2, opt";

// Built once per load: the size difference between configs costs nothing.
#[allow(clippy::large_enum_variant)]
enum Arch {
    Llama(crate::llama::Config),
    Gpt2(crate::gpt2::Config),
    Opt(crate::opt::Config),
}

fn parse_config(path: &Path, json: &serde_json::Value) -> Result<(Arch, CommonConfig)> {
    let model_type = json
        .get("model_type")
        .and_then(|v| v.as_str())
        .ok_or_else(|| Error::bad_file(path, "no \"model_type\" field"))?
        .to_string();
    let from = |e: serde_json::Error| Error::bad_file(path, format!("{model_type} config: {e}"));
    let arch = match model_type.as_str() {
        "llama" | "mistral" | "qwen2" => {
            Arch::Llama(serde_json::from_value(json.clone()).map_err(from)?)
        }
        "gpt2" => Arch::Gpt2(serde_json::from_value(json.clone()).map_err(from)?),
        "opt" => Arch::Opt(serde_json::from_value(json.clone()).map_err(from)?),
        other => {
            return Err(Error::UnknownModelType {
                path: path.to_path_buf(),
                found: other.to_string(),
                supported: SUPPORTED,
            })
        }
    };
    let ids = |v: Option<&serde_json::Value>| -> Vec<u32> {
        match v {
            Some(serde_json::Value::Number(n)) => {
                n.as_u64().map(|x| vec![x as u32]).unwrap_or_default()
            }
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .filter_map(|x| x.as_u64().map(|x| x as u32))
                .collect(),
            _ => Vec::new(),
        }
    };
    let (vocab_size, hidden_size, tie) = match &arch {
        Arch::Llama(c) => (c.vocab_size, c.hidden_size, c.tie_word_embeddings),
        Arch::Gpt2(c) => (c.vocab_size, c.n_embd, c.tie_word_embeddings),
        // The heads of OPT read word_embed_proj_dim-wide states (after project_out).
        Arch::Opt(c) => (c.vocab_size, c.embed_dim(), c.tie_word_embeddings),
    };
    let common = CommonConfig {
        model_type,
        vocab_size,
        hidden_size,
        tie_word_embeddings: tie,
        pad_token_id: json
            .get("pad_token_id")
            .and_then(|v| v.as_u64())
            .map(|v| v as u32),
        eos_token_ids: ids(json.get("eos_token_id")),
        initializer_range: json
            .get("initializer_range")
            .and_then(|v| v.as_f64())
            .unwrap_or(0.02),
    };
    Ok((arch, common))
}

/// Which heads to build on the backbone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Heads {
    /// The language-modelling head (policies, SFT, generation).
    Lm,
    /// The one-output score head (reward models), loaded or initialised.
    Score,
    /// Both (a policy that also carries a value head read per token).
    LmAndScore,
}

/// How to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Heads to build.
    pub heads: Heads,
    /// What is trainable.
    pub training: Training,
    /// Compute dtype (f32 for training).
    pub dtype: DType,
    /// Device.
    pub device: Device,
    /// Seed for new heads and LoRA A matrices.
    pub seed: u64,
    /// A PEFT adapter directory to apply (its LoRA config is used unless `training` is LoRA).
    pub adapter: Option<PathBuf>,
    /// Whether the score head must come from the checkpoint (or the adapter): set when the
    /// model is loaded to score with, where a new head's random scores would pass for
    /// rewards; a head missing then is an error. Unset (reward training, the default), a
    /// missing head starts N(0, initializer_range) as transformers'
    /// `AutoModelForSequenceClassification` starts one.
    pub require_score_head: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            heads: Heads::Lm,
            training: Training::Frozen,
            dtype: DType::F32,
            device: Device::Cpu,
            seed: 42,
            adapter: None,
            require_score_head: false,
        }
    }
}

/// A model ready for forward passes, training and saving.
pub struct Model {
    /// The raw config.json, kept so saving preserves every field.
    pub raw_config: serde_json::Value,
    /// The fields this layer uses.
    pub config: CommonConfig,
    backbone: Box<dyn Backbone>,
    lm_head: Option<Linear>,
    score: Option<Linear>,
    switches: Rc<Switches>,
    params: ParamStore,
    lora: Option<LoraConfig>,
    dir: PathBuf,
    /// What adapters saved from this model name as their base (`dir`, or the adapter
    /// directory the weights were merged from).
    base_name: PathBuf,
    device: Device,
    dtype: DType,
}

/// A right- or left-padded batch of token ids.
#[derive(Debug, Clone)]
pub struct Batch {
    /// (b, t) token ids, padded.
    pub input_ids: Vec<Vec<u32>>,
    /// (b, t) 1 for real tokens, 0 for padding.
    pub attention_mask: Vec<Vec<u8>>,
}

impl Batch {
    /// Pads sequences to the longest; `left` puts padding first (generation), else last.
    pub fn pad(seqs: &[Vec<u32>], pad_id: u32, left: bool) -> Self {
        let t = seqs.iter().map(|s| s.len()).max().unwrap_or(0);
        let mut input_ids = Vec::with_capacity(seqs.len());
        let mut attention_mask = Vec::with_capacity(seqs.len());
        for s in seqs {
            let n = t - s.len();
            let (mut ids, mut m) = (Vec::with_capacity(t), Vec::with_capacity(t));
            if left {
                ids.extend(std::iter::repeat_n(pad_id, n));
                m.extend(std::iter::repeat_n(0u8, n));
            }
            ids.extend_from_slice(s);
            m.extend(std::iter::repeat_n(1u8, s.len()));
            if !left {
                ids.extend(std::iter::repeat_n(pad_id, n));
                m.extend(std::iter::repeat_n(0u8, n));
            }
            input_ids.push(ids);
            attention_mask.push(m);
        }
        Self {
            input_ids,
            attention_mask,
        }
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    /// Whether the batch has no rows.
    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    /// The ids as a (b, t) u32 tensor.
    pub fn ids_tensor(&self, device: &Device) -> Result<Tensor> {
        let b = self.input_ids.len();
        let t = self.input_ids.first().map(|r| r.len()).unwrap_or(0);
        let flat: Vec<u32> = self.input_ids.iter().flatten().copied().collect();
        Ok(Tensor::from_vec(flat, (b, t), device)?)
    }
}

impl Model {
    /// Loads a Hugging Face model directory. A path that does not exist but looks like a hub
    /// name (`org/model`) gets an error saying how to fetch it: nothing is downloaded here.
    ///
    /// `dir` may also be a PEFT adapter directory (what a LoRA run writes): its adapter is
    /// merged into its base in memory, so one stage's output is the next stage's `model`.
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        Self::load_cached(dir, opts, &mut SourceCache::default())
    }

    /// [`load`](Self::load) sharing base weights through `cache`: models loaded from the same
    /// base directory (a policy and its reward model, say) hold one copy of the frozen weights.
    pub fn load_cached(dir: &Path, opts: &LoadOptions, cache: &mut SourceCache) -> Result<Self> {
        let (config_dir, source) = cache.resolve(dir, &opts.device, opts.dtype)?;
        let mut model = match &opts.adapter {
            // Named as the user gave it (an adapter directory resolves to its base's).
            None if opts.require_score_head
                && opts.heads != Heads::Lm
                && !source.contains("score.weight") =>
            {
                return Err(no_score_head(dir, None));
            }
            None => Self::from_source(&config_dir, source, opts)?,
            Some(adapter) => {
                let mut opts = opts.clone();
                if !matches!(opts.training, Training::Lora(_)) {
                    opts.training = Training::Lora(LoraConfig::from_peft_dir(adapter)?);
                }
                let saved = crate::lora::read_adapter_tensors(adapter, &opts.device)?;
                // An adapter that carries the score head (SEQ_CLS) gives it to the builder,
                // so the head is neither missing nor first initialised at random.
                let mut source = source;
                if opts.heads != Heads::Lm {
                    match saved.get("base_model.model.score.weight") {
                        Some(t) => source.insert("score.weight", t.to_dtype(opts.dtype)?),
                        None if opts.require_score_head && !source.contains("score.weight") => {
                            return Err(no_score_head(dir, Some(adapter)));
                        }
                        None => {}
                    }
                }
                let model = Self::from_source(&config_dir, source, &opts)?;
                model.set_adapter_tensors(adapter, &saved)?;
                // After the shapes (whose error names the tensor): bases that differ where
                // no adapter tensor shows it.
                check_adapter_base(&config_dir, adapter)?;
                model
            }
        };
        model.base_name = dir.to_path_buf();
        Ok(model)
    }

    /// Builds a model from tensors already in memory; `dir` must still hold config.json.
    pub fn from_source(dir: &Path, source: WeightSource, opts: &LoadOptions) -> Result<Self> {
        let cfg_path = check_dir(dir)?.join("config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::MissingFile {
            path: cfg_path.clone(),
            what: "model config",
            hint: format!("{e}; a model directory needs config.json beside its weights"),
        })?;
        let raw: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::bad_file(&cfg_path, e))?;
        Self::from_config(dir, raw, source, opts)
    }

    /// A randomly initialised model for a config.json (benchmarks and tests).
    pub fn random(raw: serde_json::Value, opts: &LoadOptions) -> Result<Self> {
        Self::from_config(
            Path::new("<random init>"),
            raw,
            WeightSource::random(),
            opts,
        )
    }

    /// Builds a model from a parsed config.json and tensors.
    pub fn from_config(
        dir: &Path,
        raw: serde_json::Value,
        source: WeightSource,
        opts: &LoadOptions,
    ) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let (arch, config) = parse_config(&cfg_path, &raw)?;
        let training = match &opts.training {
            Training::Lora(l) => Training::Lora(l.clone().resolved(&config.model_type)?),
            t => t.clone(),
        };
        let lora = match &training {
            Training::Lora(l) => Some(l.clone()),
            _ => None,
        };
        let b = Builder::new(
            source,
            training,
            opts.device.clone(),
            opts.dtype,
            config.initializer_range,
            opts.seed,
        );
        let switches = Rc::new(Switches::default());
        let backbone: Box<dyn Backbone> = match &arch {
            Arch::Llama(c) => Box::new(crate::llama::Llama::load(&b, c, &switches)?),
            Arch::Gpt2(c) => Box::new(crate::gpt2::Gpt2::load(&b, c, &switches)?),
            Arch::Opt(c) => Box::new(crate::opt::Opt::load(&b, c, &switches)?),
        };
        let (v, h) = (config.vocab_size, config.hidden_size);
        let want_lm = matches!(opts.heads, Heads::Lm | Heads::LmAndScore);
        let want_score = matches!(opts.heads, Heads::Score | Heads::LmAndScore);
        let lm_head = if !want_lm {
            None
        } else if config.tie_word_embeddings && !b.contains("lm_head.weight") {
            Some(Linear::from_weight(
                backbone.embed_weight().clone(),
                None,
                &switches,
            ))
        } else {
            Some(Linear::load(&b.pp("lm_head"), h, v, false, &switches)?)
        };
        let score = if want_score {
            let s = b.pp("score");
            if opts.require_score_head && !s.contains("weight") && !b.source().is_random() {
                return Err(no_score_head(dir, None));
            }
            // A causal-LM checkpoint has no score head: start it N(0, initializer_range) as
            // AutoModelForSequenceClassification does.
            let w = s.get_or_init(&[1, h], "weight")?;
            Some(Linear::from_weight(w, None, &switches))
        } else {
            None
        };
        if let Some(l) = &lora {
            let matched = b.matched_modules_to_save();
            for m in &l.modules_to_save {
                if !matched.contains(m) {
                    tracing::warn!(
                        "lora.modules_to_save entry {m:?} matches no module of this model; it \
                         will not be trained or saved (the score head is named \"score\"; \
                         TRL examples that write \"scores\" lose their trained head this way)"
                    );
                }
            }
        }
        let params = b.into_store();
        Ok(Self {
            raw_config: raw,
            config,
            backbone,
            lm_head,
            score,
            switches,
            params,
            lora,
            dir: dir.to_path_buf(),
            base_name: dir.to_path_buf(),
            device: opts.device.clone(),
            dtype: opts.dtype,
        })
    }

    /// What a saved adapter records as `base_model_name_or_path`: the directory the user
    /// named (an adapter directory, when the weights were merged from one).
    pub fn base_name(&self) -> &Path {
        &self.base_name
    }

    /// The directory the model came from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The compute dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Keeps the backbone's frozen projection weights in the GEMM kernel's layout, in place
    /// of the checkpoint's (the same memory): the one-op layer's products then pack less of
    /// them ([`crate::kernels::cpu::gemm::Panels`]). For jobs that train or score without generating
    /// (reward and SFT training): any other path that reads such a weight rebuilds the
    /// row-major tensor, doubling its memory. Returns how many weights were converted.
    pub fn keep_frozen_in_kernel_layout(&mut self) -> Result<usize> {
        let mut n = 0;
        let params = &mut self.params;
        // The store holds the checkpoint's tensor too: until it lets go, the old weight's
        // memory stays beside the panels.
        let mut replace = |old: candle_core::TensorId,
                           kernel: std::rc::Rc<crate::nn::KernelWeight>| {
            n += 1;
            if params.replace_frozen(old, &kernel) {
                Ok(())
            } else {
                Err(Error::Config(format!(
                    "a frozen weight ({kernel:?}) is missing from the parameter store"
                )))
            }
        };
        self.backbone.keep_frozen_in_kernel_layout(&mut replace)?;
        Ok(n)
    }

    /// Keeps the frozen f32 weights of the linear layers (the LM head, tied or not,
    /// included) and the token embedding in bf16, in place of the f32 tensors (which are
    /// dropped, the parameter store's hold included), for a model that only decodes
    /// (`generate`, `serve`): the products read half the bytes per token and compute in f32
    /// ([`crate::kernels::cpu::gemm::matmul_wt_bf16`]). Converted layers have no backward pass and skip the
    /// fused f32 ops; trainable, adapted and GPT-2 Conv1D weights stay f32, and so do
    /// backbones other than the Llama family (GPT-2, OPT). Returns how many tensors were
    /// converted.
    pub fn keep_frozen_in_bf16_for_decoding(&mut self) -> Result<usize> {
        self.keep_frozen_in_bf16(true)
    }

    /// [`Self::keep_frozen_in_bf16_for_decoding`]; without `embedding` the token embedding's
    /// lookups stay f32 (a tied head then gets a bf16 copy of its own).
    fn keep_frozen_in_bf16(&mut self, embedding: bool) -> Result<usize> {
        let mut done: Vec<(candle_core::TensorId, Tensor)> = Vec::new();
        let params = &mut self.params;
        {
            // The store lets go of each f32 tensor as soon as its layer has (so that at most
            // one f32 weight is held beside the bf16 ones while converting).
            let mut note = |old: candle_core::TensorId, new: Tensor| {
                params.replace_frozen_tensor(old, new.clone());
                done.push((old, new));
                Ok(())
            };
            self.backbone.keep_frozen_in_bf16(embedding, &mut note)?;
        }
        if let Some(head) = self.lm_head.as_mut() {
            let tied = head
                .tensor_id()
                .and_then(|id| done.iter().find(|(old, _)| *old == id).cloned());
            match tied {
                // A tied head shares the embedding's bf16 table (and its store entry).
                Some((old, new)) => {
                    head.share_bf16(old, &new);
                }
                None => {
                    if let Some((old, new)) = head.keep_in_bf16()? {
                        params.replace_frozen_tensor(old, new.clone());
                        done.push((old, new));
                    }
                }
            }
        }
        Ok(done.len())
    }

    /// A frozen copy of this model for decoding only (LM head; LoRA adapters merged in), its
    /// linear weights kept in bf16 ([`Self::keep_frozen_in_bf16_for_decoding`], the token
    /// embedding's lookups left in f32): sampling
    /// from a policy that is being trained under bf16 autocast, whose products read their
    /// operands rounded to bf16 anyway, so the copy computes what the policy computes, at
    /// half the bytes per token and on the bf16 kernel. `None` where no weight converts
    /// (backbones other than the Llama family), so the caller samples from the model itself.
    pub fn bf16_decoding_copy(&self) -> Result<Option<Model>> {
        let tensors = self.merged_weights()?;
        let source = WeightSource::from_tensors(tensors, "<policy in memory>");
        let opts = LoadOptions {
            heads: Heads::Lm,
            ..Default::default()
        };
        let mut copy = Self::from_config(
            Path::new("<policy in memory>"),
            self.raw_config.clone(),
            source,
            &opts,
        )?;
        // The embedding stays f32: autocast rounds products' operands, not lookups.
        Ok((copy.keep_frozen_in_bf16(false)? > 0).then_some(copy))
    }

    /// All parameters under their HF/PEFT names.
    pub fn params(&self) -> &ParamStore {
        &self.params
    }

    /// The LoRA configuration, when adapters are attached.
    pub fn lora(&self) -> Option<&LoraConfig> {
        self.lora.as_ref()
    }

    /// Number of decoder layers.
    pub fn n_layers(&self) -> usize {
        self.backbone.n_layers()
    }

    /// Enables/disables the LoRA adapters (disabled = the frozen base model, PPO/DPO's
    /// reference without a second copy of the weights).
    pub fn set_adapters_enabled(&self, on: bool) {
        self.switches.set_adapters_enabled(on)
    }

    /// Train mode turns LoRA dropout on.
    pub fn set_training(&self, on: bool) {
        self.switches.set_training(on)
    }

    /// Turns graph recording on or off (see `Switches::set_grad_enabled`); returns the previous
    /// setting so callers can restore it.
    pub fn set_grad_enabled(&self, on: bool) -> bool {
        let was = self.switches.grad_enabled();
        self.switches.set_grad_enabled(on);
        was
    }

    /// Seeds the dropout masks of the next forward pass (see `Switches::set_dropout_seed`).
    pub fn set_dropout_seed(&self, seed: u64) {
        self.switches.set_dropout_seed(seed)
    }

    /// Hidden states for a padded batch (positions from the mask, causal + padding mask).
    // batch: (b, t) -> (b, t, hidden)
    pub fn hidden(&self, batch: &Batch) -> Result<Tensor> {
        let positions = self.backbone.positions(&batch.attention_mask);
        self.hidden_at(batch, &positions)
    }

    /// Hidden states with explicit position ids (as transformers' `position_ids`). With
    /// `arange` for every row this reproduces transformers' forward on a left-padded batch
    /// without position_ids, whose absolute-position models (GPT-2, OPT aside) then see
    /// shifted positions; [`hidden`](Self::hidden) avoids that.
    // batch: (b, t), positions: b rows of t -> (b, t, hidden)
    pub fn hidden_at(&self, batch: &Batch, positions: &[Vec<u32>]) -> Result<Tensor> {
        let ids = batch.ids_tensor(&self.device)?;
        let t = ids.dim(1)?;
        if t == 0 {
            return Err(no_tokens(batch.len()));
        }
        let bias = crate::kernels::attention_bias(&batch.attention_mask, t, &self.device)?
            .to_dtype(self.dtype)?;
        self.backbone.forward(&ids, positions, &bias, None)
    }

    /// Hidden states of whole sequences packed into one row, without padding: each sequence
    /// attends to itself only (a block-diagonal causal mask) and counts its positions from 0,
    /// so each token's state is the one a padded batch gives it, with no work spent on
    /// padding. Returns the `(1, total, hidden)` states and the sequences' start offsets
    /// followed by the total (`seqs.len() + 1` entries).
    pub fn hidden_packed(&self, seqs: &[Vec<u32>]) -> Result<(Tensor, Vec<usize>)> {
        check_sequences(seqs)?;
        let mut starts = Vec::with_capacity(seqs.len() + 1);
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        for s in seqs {
            starts.push(ids.len());
            ids.extend_from_slice(s);
            let p = self.backbone.positions(&[vec![1u8; s.len()]]);
            positions.extend_from_slice(&p[0]);
        }
        starts.push(ids.len());
        let total = ids.len();
        let ids = Tensor::from_vec(ids, (1, total), &self.device)?;
        let packing = crate::kernels::Packing::sequences(starts);
        let hidden = self.backbone.forward_packed(&ids, &[positions], &packing)?;
        Ok((hidden, packing.starts))
    }

    /// Hidden states of prompts and their completions packed into one row, each prompt
    /// computed once and shared by its completions (see [`crate::kernels::Packing`]): a
    /// completion's tokens see its prompt and itself, and count their positions on from the
    /// prompt's end, so every token's state is the one it has in `prompt + completion` alone.
    /// Returns the `(1, total, hidden)` states and, per group, where its prompt starts and
    /// where each completion starts (empty completions take no room and start where the next
    /// would).
    pub fn hidden_shared_prompts(
        &self,
        groups: &[(&[u32], Vec<&[u32]>)],
    ) -> Result<(Tensor, Vec<GroupOffsets>)> {
        let (ids, positions, packing, offsets) = self.shared_prompts_layout(groups)?;
        let hidden = self.backbone.forward_packed(&ids, &[positions], &packing)?;
        Ok((hidden, offsets))
    }

    /// The packed row [`hidden_shared_prompts`](Self::hidden_shared_prompts) runs: ids
    /// `(1, total)`, positions, the packing and each group's offsets.
    #[allow(clippy::type_complexity)]
    fn shared_prompts_layout(
        &self,
        groups: &[(&[u32], Vec<&[u32]>)],
    ) -> Result<(Tensor, Vec<u32>, crate::kernels::Packing, Vec<GroupOffsets>)> {
        // The prompts' common start, if long enough, is packed once as the root segment,
        // seen by every group; each group keeps a token of its own prompt past it.
        let prompts: Vec<&[u32]> = groups.iter().map(|(p, _)| *p).collect();
        let lr = common_root(&prompts, 1);
        let mut starts = Vec::with_capacity(groups.len() + 2);
        let mut branches = Vec::with_capacity(groups.len() + 1);
        let mut offsets = Vec::with_capacity(groups.len());
        let mut ids = Vec::new();
        let mut positions: Vec<u32> = Vec::new();
        if lr > 0 {
            starts.push(0);
            branches.push(Vec::new());
            ids.extend_from_slice(&prompts[0][..lr]);
            let p = self.backbone.positions(&[vec![1u8; lr]]);
            positions.extend_from_slice(&p[0]);
        }
        for (prompt, completions) in groups {
            let s0 = ids.len();
            starts.push(s0);
            let full: Vec<u8> = vec![1u8; prompt.len()];
            let p = self.backbone.positions(&[full]);
            positions.extend_from_slice(&p[0][lr..]);
            ids.extend_from_slice(&prompt[lr..]);
            let mut own = Vec::new();
            let mut at = Vec::new();
            for c in completions {
                at.push(ids.len());
                if c.is_empty() {
                    continue;
                }
                own.push(ids.len() - s0);
                let full: Vec<u8> = vec![1u8; prompt.len() + c.len()];
                let p = self.backbone.positions(&[full]);
                positions.extend_from_slice(&p[0][prompt.len()..]);
                ids.extend_from_slice(c);
            }
            branches.push(own);
            offsets.push(GroupOffsets {
                root: 0..lr,
                prompt: s0,
                completions: at,
            });
        }
        starts.push(ids.len());
        let total = ids.len();
        if total == 0 {
            return Err(no_tokens(groups.len()));
        }
        let ids = Tensor::from_vec(ids, (1, total), &self.device)?;
        let packing = crate::kernels::Packing {
            starts,
            branches,
            root: lr > 0,
        };
        Ok((ids, positions, packing, offsets))
    }

    /// Reward scores of whole sequences (no padding), computed packed into one row: the same
    /// scores as [`scores`](Self::scores) on the padded batch, read by the same rule.
    /// Sequences that begin alike (a prompt's chosen and rejected answers, its completions)
    /// share one copy of their common prefix ([`hidden_shared_prompts`](Self::hidden_shared_prompts)),
    /// which changes no score.
    // seqs: n sequences -> (n)
    pub fn scores_packed(&self, seqs: &[Vec<u32>]) -> Result<Tensor> {
        if seqs.is_empty() {
            return Ok(Tensor::zeros(0, self.dtype, &self.device)?);
        }
        check_sequences(seqs)?;
        let grouping = shared_prefixes(seqs);
        let groups: Vec<(&[u32], Vec<&[u32]>)> = grouping
            .iter()
            .map(|(n, members)| {
                let first = &seqs[members[0]];
                (
                    &first[..*n],
                    members.iter().map(|&i| &seqs[i][*n..]).collect(),
                )
            })
            .collect();
        let (ids, positions, packing, offsets) = self.shared_prompts_layout(&groups)?;
        let mut idx = vec![0usize; seqs.len()];
        for ((n, members), o) in grouping.iter().zip(&offsets) {
            for (c, &i) in members.iter().enumerate() {
                let pos = self.score_position(&seqs[i], None);
                idx[i] = if pos < *n {
                    o.prompt_row(pos)
                } else {
                    o.completions[c] + pos - n
                };
            }
        }
        // Only the scored rows: the backbone may skip the last layer's work for the rest.
        let rows = self
            .backbone
            .forward_packed_rows(&ids, &[positions], &packing, &idx)?; // (1, n, hidden)
        Ok(self.values(&rows)?.squeeze(0)?)
    }

    /// Whether [`hidden_packed`](Self::hidden_packed) costs no more attention work than a
    /// padded batch (the backbone's attention works per sequence), so callers should pack.
    pub fn packs_natively(&self) -> bool {
        self.backbone.packs_natively()
    }

    /// Reward scores of whole sequences (no padding): packed into one row where the
    /// backbone's attention works per sequence ([`Backbone::packs_natively`]), so no work is
    /// spent on padding, else as a right-padded batch. The same scores either way.
    // seqs: n sequences -> (n)
    pub fn scores_of(&self, seqs: &[Vec<u32>]) -> Result<Tensor> {
        if self.backbone.packs_natively() {
            return self.scores_packed(seqs);
        }
        check_sequences(seqs)?;
        let batch = Batch::pad(seqs, self.config.pad_token_id.unwrap_or(0), false);
        let hidden = self.hidden(&batch)?;
        self.scores(&hidden, &batch)
    }

    /// One step with a KV cache: `key_mask` covers past + new tokens, `positions` the new ones.
    // ids: (b, t) -> hidden (b, t, hidden)
    pub fn hidden_cached(
        &self,
        ids: &Tensor,
        positions: &[Vec<u32>],
        key_mask: &[Vec<u8>],
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let t = ids.dim(1)?;
        if t == 0 {
            return Err(no_tokens(ids.dim(0)?));
        }
        let bias =
            crate::kernels::attention_bias(key_mask, t, &self.device)?.to_dtype(self.dtype)?;
        self.backbone.forward(ids, positions, &bias, Some(cache))
    }

    /// A fresh KV cache for this model.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.backbone.n_layers())
    }

    /// LM logits.
    // hidden: (b, t, h) -> (b, t, vocab)
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let head = self.lm_head.as_ref().ok_or_else(|| {
            Error::Config("this model was loaded without an LM head (Heads::Score)".into())
        })?;
        head.forward(hidden)
    }

    /// log softmax(logits / temperature)[target] at every position, without keeping the
    /// vocabulary-sized logits where the LM head is a frozen plain product
    /// ([`Linear::token_logprobs`]).
    // hidden: (..., h), targets: (...) u32 -> (...)
    pub fn token_logprobs(
        &self,
        hidden: &Tensor,
        targets: &Tensor,
        temperature: f64,
    ) -> Result<Tensor> {
        let head = self.lm_head.as_ref().ok_or_else(|| {
            Error::Config("this model was loaded without an LM head (Heads::Score)".into())
        })?;
        head.token_logprobs(hidden, targets, temperature)
    }

    /// The score head applied at every position (PPO's per-token values).
    // hidden: (b, t, h) -> (b, t)
    pub fn values(&self, hidden: &Tensor) -> Result<Tensor> {
        let head = self.score.as_ref().ok_or_else(|| {
            Error::Config("this model was loaded without a score head (Heads::Score)".into())
        })?;
        Ok(head.forward(hidden)?.squeeze(2)?)
    }

    /// Reward scores, read at the last token that is not the pad id (transformers' rule; with
    /// no pad id, the last token the attention mask keeps).
    // hidden: (b, t, h) -> (b)
    pub fn scores(&self, hidden: &Tensor, batch: &Batch) -> Result<Tensor> {
        // An empty row would be read at a padding token: a score made up, not computed.
        if let Some(i) = batch.attention_mask.iter().position(|m| !m.contains(&1)) {
            return Err(Error::EmptyInput(format!(
                "row {i} of the batch has no tokens, so it has no score; drop empty rows (or \
                 give them text) before scoring"
            )));
        }
        let values = self.values(hidden)?;
        let idx: Vec<u32> = batch
            .input_ids
            .iter()
            .zip(&batch.attention_mask)
            .map(|(ids, m)| self.score_position(ids, Some(m)) as u32)
            .collect();
        let idx = Tensor::new(idx.as_slice(), &self.device)?.unsqueeze(1)?;
        Ok(values.gather(&idx, 1)?.squeeze(1)?)
    }

    /// Where a row's score is read: its last token that is not the pad id (transformers'
    /// rule), or without a pad id its last token the mask keeps (all of an unpadded row).
    fn score_position(&self, ids: &[u32], mask: Option<&[u8]>) -> usize {
        let last = match (self.config.pad_token_id, mask) {
            (Some(pad), _) => ids.iter().rposition(|&i| i != pad),
            (None, Some(m)) => m.iter().rposition(|&x| x != 0),
            (None, None) => ids.len().checked_sub(1),
        };
        last.unwrap_or(0)
    }
}

/// The error for a forward pass over no tokens (`rows` rows of length zero, or no rows).
fn no_tokens(rows: usize) -> Error {
    Error::EmptyInput(if rows == 0 {
        "the batch has no rows and no tokens; a model cannot run on zero tokens".into()
    } else {
        format!(
            "the batch's {rows} sequence(s) have no tokens; a model cannot run on zero tokens: \
             drop empty rows (or give them text) before the forward pass"
        )
    })
}

/// Refuses a list of sequences that holds an empty one (naming it) or none at all.
fn check_sequences(seqs: &[Vec<u32>]) -> Result<()> {
    if let Some(i) = seqs.iter().position(|s| s.is_empty()) {
        return Err(Error::EmptyInput(format!(
            "sequence {i} of {} has no tokens; a model cannot run on zero tokens: drop empty \
             rows (or give them text) before the forward pass",
            seqs.len()
        )));
    }
    Ok(())
}

/// The error for a model loaded to score with that has no trained score head: scoring would
/// read a randomly initialised one.
fn no_score_head(dir: &Path, adapter: Option<&Path>) -> Error {
    let adapter = adapter
        .map(|a| format!(" nor in the adapter {}", a.display()))
        .unwrap_or_default();
    Error::MissingTensor {
        path: dir.to_path_buf(),
        name: "score.weight".into(),
        hint: format!(
            "{adapter}: this is not a reward model (it has no score head), and a new head would \
             give random scores. Train one with `rlhf reward` (its output_dir holds score.weight, \
             or a LoRA adapter with task_type = \"SEQ_CLS\" that saves it) and pass that \
             directory, or a transformers *ForSequenceClassification checkpoint with num_labels = 1"
        ),
    }
}

/// Resolved weight sources by directory, so several models built on one base share its
/// tensors (candle tensors are reference-counted: a clone is not a copy).
#[derive(Default)]
pub struct SourceCache {
    sources: HashMap<PathBuf, (PathBuf, WeightSource)>,
}

impl SourceCache {
    /// The config directory and the weights of `dir`: a Hugging Face directory as it is, or a
    /// PEFT adapter directory merged into its base (`base_model_name_or_path`, itself
    /// resolved the same way, so adapters trained on adapters work).
    pub fn resolve(
        &mut self,
        dir: &Path,
        device: &Device,
        dtype: DType,
    ) -> Result<(PathBuf, WeightSource)> {
        let dir = check_dir(dir)?;
        let key = dir.canonicalize().map_err(|e| Error::io(dir, e))?;
        if let Some(hit) = self.sources.get(&key) {
            return Ok(hit.clone());
        }
        let resolved = if dir.join("adapter_config.json").exists()
            && !dir.join("model.safetensors").exists()
            && !dir.join("model.safetensors.index.json").exists()
        {
            self.merge_adapter(dir, device, dtype)?
        } else {
            (
                dir.to_path_buf(),
                WeightSource::from_dir(dir, device, dtype)?,
            )
        };
        self.sources.insert(key, resolved.clone());
        Ok(resolved)
    }

    fn merge_adapter(
        &mut self,
        dir: &Path,
        device: &Device,
        dtype: DType,
    ) -> Result<(PathBuf, WeightSource)> {
        let cfg_path = dir.join("adapter_config.json");
        let lora = LoraConfig::from_peft_dir(dir)?;
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::bad_file(&cfg_path, e))?;
        let named = json
            .get("base_model_name_or_path")
            .and_then(|v| v.as_str())
            .ok_or_else(|| {
                Error::bad_file(
                    &cfg_path,
                    "no base_model_name_or_path: cannot tell which model this adapter is for",
                )
            })?;
        // As written (absolute, or relative to the working directory), else relative to the
        // adapter directory's parent (a run directory moved with its base beside it).
        let as_named = PathBuf::from(named);
        let beside = dir.parent().unwrap_or(Path::new(".")).join(named);
        let base = if as_named.is_dir() {
            as_named
        } else if beside.is_dir() {
            beside
        } else {
            check_dir(&as_named).map_err(|_| {
                Error::bad_file(
                    &cfg_path,
                    format!(
                        "base_model_name_or_path {named:?} is not a directory here; edit it \
                         to the base model's local path"
                    ),
                )
            })?;
            as_named
        };
        let (config_dir, base_source) = self.resolve(&base, device, dtype)?;
        let heads = if lora.task_type.as_deref() == Some("SEQ_CLS") {
            Heads::Score
        } else {
            Heads::Lm
        };
        let opts = LoadOptions {
            heads,
            training: Training::Lora(lora),
            dtype,
            device: device.clone(),
            ..Default::default()
        };
        // A reward adapter carries its score head; hand it to the builder so it is not first
        // initialised at random (and reported so) only to be overwritten.
        let saved = crate::lora::read_adapter_tensors(dir, device)?;
        let mut with_head = base_source.clone();
        if heads == Heads::Score {
            if let Some(t) = saved.get("base_model.model.score.weight") {
                with_head.insert("score.weight", t.to_dtype(dtype)?);
            }
        }
        let model = Model::from_source(&config_dir, with_head, &opts)?;
        model.set_adapter_tensors(dir, &saved)?;
        let mut merged = base_source;
        for (name, t) in model.merged_weights()? {
            merged.insert(name, t);
        }
        tracing::debug!("merged adapter {} into {}", dir.display(), base.display());
        Ok((config_dir, merged))
    }
}

/// The config.json keys that fix a base model's architecture and size: an adapter trained
/// on a base that differs in one of them does not fit, even where every adapter tensor has
/// the right shape (PEFT's default q_proj/v_proj targets do not see `intermediate_size` or
/// the layer count past the adapted ones). `vocab_size` is left out: a base whose embeddings
/// were resized for new tokens still takes adapters trained before.
const SIZE_KEYS: [&str; 12] = [
    "model_type",
    "hidden_size",
    "n_embd",
    "num_hidden_layers",
    "n_layer",
    "num_attention_heads",
    "n_head",
    "num_key_value_heads",
    "intermediate_size",
    "n_inner",
    "ffn_dim",
    "head_dim",
];

/// Refuses an adapter whose own base (its `base_model_name_or_path`, when that is a local
/// directory) has another architecture or size than the base in `config_dir` it is applied
/// to, naming the key and both values. Where the named base is not here (a hub name, a
/// moved directory) there is nothing to compare, and the tensor shapes are the only check.
fn check_adapter_base(config_dir: &Path, adapter: &Path) -> Result<()> {
    let read = |p: &Path| -> Option<serde_json::Value> {
        serde_json::from_str(&std::fs::read_to_string(p).ok()?).ok()
    };
    // The named base's config.json, through adapters trained on adapters.
    let mut at = adapter.to_path_buf();
    let mut named = None;
    for _ in 0..8 {
        let Some(cfg) = read(&at.join("adapter_config.json")) else {
            break;
        };
        let Some(name) = cfg.get("base_model_name_or_path").and_then(|v| v.as_str()) else {
            return Ok(());
        };
        let as_named = PathBuf::from(name);
        let beside = at.parent().unwrap_or(Path::new(".")).join(name);
        let base = if as_named.is_dir() {
            as_named
        } else if beside.is_dir() {
            beside
        } else {
            return Ok(());
        };
        named.get_or_insert_with(|| name.to_string());
        if base.join("config.json").exists() {
            at = base;
            break;
        }
        at = base;
    }
    let (Some(named), Some(theirs), Some(ours)) = (
        named,
        read(&at.join("config.json")),
        read(&config_dir.join("config.json")),
    ) else {
        return Ok(());
    };
    for key in SIZE_KEYS {
        let (a, b) = (&theirs[key], &ours[key]);
        if !a.is_null() && !b.is_null() && a != b {
            return Err(Error::bad_file(
                adapter.join("adapter_config.json"),
                format!(
                    "this adapter was trained on {named} ({key} = {a}), but the base model it \
                     is applied to ({}) has {key} = {b}: an adapter only fits the base it was \
                     trained on; load it on that base",
                    config_dir.display()
                ),
            ));
        }
    }
    Ok(())
}

/// Whether a path is written like a hub model name (`org/model`): nothing is downloaded, so
/// such a name that is not a local directory gets an error saying how to fetch the files.
pub fn looks_like_hub_name(s: &str) -> bool {
    !s.starts_with('/') && !s.starts_with('.') && s.matches('/').count() == 1 && !s.ends_with('/')
}

/// Refuses hub-style names (nothing is downloaded at run time) and missing directories.
pub fn check_dir(dir: &Path) -> Result<&Path> {
    if dir.is_dir() {
        return Ok(dir);
    }
    let s = dir.to_string_lossy();
    if looks_like_hub_name(&s) {
        return Err(Error::HubName {
            name: s.into_owned(),
        });
    }
    Err(Error::MissingFile {
        path: dir.to_path_buf(),
        what: "model directory",
        hint: "pass a directory holding config.json and model.safetensors".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::shared_prefixes;

    /// Sequences that share at least `MIN_SHARED` tokens group together, at most
    /// `MAX_BRANCHES` a group; every member keeps a token past the prefix; a sequence that
    /// shares too little starts its own group.
    #[test]
    fn sequences_group_by_a_long_enough_common_prefix() {
        let p: Vec<u32> = vec![1, 2, 3, 4, 5];
        let with = |tail: &[u32]| [p.as_slice(), tail].concat();
        let seqs = vec![
            with(&[6, 7]),
            vec![9, 9, 9],
            with(&[8]),
            p[..4].to_vec(), // shares 4 tokens but needs one of its own: a group of its own
            vec![1, 2, 3, 7, 7, 7], // shares only 3
            with(&[6, 9]),
        ];
        let groups = shared_prefixes(&seqs);
        assert_eq!(
            groups,
            vec![(5, vec![0, 2, 5]), (2, vec![1]), (3, vec![3]), (5, vec![4]),]
        );
        for (n, members) in &groups {
            for &i in members {
                assert!(seqs[i].len() > *n && seqs[i][..*n] == seqs[members[0]][..*n]);
            }
        }
        // No group grows past MAX_BRANCHES.
        let many: Vec<Vec<u32>> = (0..20).map(|i| with(&[100 + i])).collect();
        let groups = shared_prefixes(&many);
        assert!(groups.iter().all(|(_, m)| m.len() <= super::MAX_BRANCHES));
        assert_eq!(groups.iter().map(|(_, m)| m.len()).sum::<usize>(), 20);
    }
}
