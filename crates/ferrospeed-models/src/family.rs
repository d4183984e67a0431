//! A run's model from its `[model]` config: the family and shape from the TOML keys, or from
//! `init_from`'s `config.json` (keys given in the TOML must then agree with it), and its tokenizer
//! (`model.tokenizer`, else the model directory's `tokenizer.json`, else `bytes`). `init_from` may
//! also be a llama GGUF file: its metadata gives the shape and its vocabulary the tokenizer.

use crate::hf::{read_config, HfError, HfModel};
use crate::tokenizer::{Tokenizer, TokenizerError};
use crate::{Gpt, GptConfig, Llama, LlamaConfig};
use ferrospeed::accelerator::ParamNames;
use ferrospeed::config::{ModelConfig, ModelKind};
use ferrospeed::engine::{ActivationProfile, EngineError, Model};
use std::path::Path;

/// Why a `[model]` section cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum FamilyError {
    #[error(transparent)]
    Hf(#[from] HfError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Gguf(#[from] crate::gguf::GgufError),
    #[error("model.{key} = {value} does not match {hf_key} = {file_value} in {path}: remove model.{key} (config.json sets it), or point model.init_from at a model of that shape")]
    Mismatch { key: String, value: String, hf_key: String, file_value: String, path: String },
    #[error("model.{key} is missing: add it under [model], or set model.init_from to a HuggingFace model directory")]
    Missing { key: String },
    #[error("{0}")]
    Lora(String),
    /// `[moe]` for a model it does not apply to.
    #[error("{0}")]
    Moe(String),
    #[error("model.seq_len = {seq_len} is longer than the {positions} positions of {path}: use model.seq_len ≤ {positions}")]
    TooLong { seq_len: usize, positions: usize, path: String },
}

/// Tensors a model file may hold that the model does not use, and why that is harmless: buffers
/// transformers recomputes or ignores on load (matched as name suffixes).
pub const HARMLESS: &[(&str, &str)] = &[
    (".rotary_emb.inv_freq", "rotary frequencies, recomputed from the config as transformers does"),
    (".attn.bias", "GPT-2's causal-mask buffer, which transformers does not load"),
    (".attn.masked_bias", "GPT-2's mask fill value, which transformers does not load"),
];

/// A model of one of the built-in families.
#[derive(Debug, Clone)]
pub enum Family {
    Gpt(Gpt),
    Llama(Llama),
}

impl Family {
    /// The model `m` describes, and its tokenizer.
    pub fn from_config(m: &ModelConfig) -> Result<(Family, Tokenizer), FamilyError> {
        if let Some(path) = m.init_from.as_deref().filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "gguf")) {
            let file = crate::gguf::GgufFile::open(path)?;
            let c = file.llama_config(m.seq_len)?;
            if let Some(k) = m.kind.filter(|k| *k != ModelKind::Llama) {
                return Err(FamilyError::Mismatch { key: "kind".into(), value: format!("\"{k}\""), hf_key: "general.architecture".into(), file_value: "\"llama\"".into(), path: path.display().to_string() });
            }
            check_llama(m, &c, &path.display().to_string())?;
            let tokenizer = match &m.tokenizer {
                Some(t) => Tokenizer::from_file(t)?,
                None => file.tokenizer()?,
            };
            return Ok((Family::Llama(Llama::new(c)), tokenizer));
        }
        let dir = m.init_from.as_deref().filter(|p| p.is_dir());
        let file = m.tokenizer.clone().or_else(|| dir.map(|d| d.join("tokenizer.json")).filter(|p| p.is_file()));
        let tokenizer = match file {
            Some(path) => Tokenizer::from_file(&path)?,
            None => Tokenizer::Bytes,
        };
        let family = match dir {
            Some(dir) => from_dir(m, dir)?,
            None => from_keys(m, tokenizer.vocab_size())?,
        };
        Ok((family, tokenizer))
    }

    /// The model and tokenizer of a run: `[model]`, with `[lora]`'s adapters when the config has them.
    pub fn for_run(cfg: &ferrospeed::config::Config) -> Result<(Family, Tokenizer), FamilyError> {
        let (mut family, tokenizer) = Self::from_config(&cfg.model)?;
        if let Some(settings) = &cfg.moe {
            match &mut family {
                Family::Llama(l) if l.cfg.moe.is_some() => {
                    let m = l.cfg.moe.as_mut().expect("checked");
                    m.aux_loss = settings.aux_loss;
                    m.aux_coef = settings.aux_loss_coef.unwrap_or(m.aux_coef);
                    m.z_loss_coef = settings.z_loss_coef;
                    m.capacity_factor = settings.capacity_factor;
                }
                _ => return Err(FamilyError::Moe("[moe] is for mixture-of-experts models (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE), and this model has no experts: remove [moe]".into())),
            }
        }
        // Expert parallelism spreads experts: a model must have them, in a number the groups divide.
        let ep = cfg.parallel.ep;
        if ep > 1 {
            let experts = match &family {
                Family::Llama(l) => l.cfg.moe.map_or(0, |m| m.num_experts),
                Family::Gpt(_) => 0,
            };
            if experts == 0 {
                return Err(FamilyError::Moe(format!("parallel.ep = {ep} spreads the experts of a mixture-of-experts model, and this model has none: set parallel.ep = 1")));
            }
            if experts % ep != 0 {
                let divisors: Vec<usize> = (1..=experts).filter(|d| experts % d == 0).collect();
                return Err(FamilyError::Moe(format!("parallel.ep = {ep} does not divide the model's {experts} experts: choose ep among {divisors:?} (and dividing the data-parallel size)")));
            }
        }
        match &cfg.lora {
            Some(l) => Ok((family.with_lora(l)?, tokenizer)),
            None => Ok((family, tokenizer)),
        }
    }

    /// This model with LoRA adapters on a frozen base (the Llama family).
    pub fn with_lora(self, lora: &ferrospeed::config::LoraConfig) -> Result<Family, FamilyError> {
        match self {
            Family::Gpt(_) => Err(FamilyError::Lora("[lora] is built for the Llama family (Llama, Mistral, Qwen2, SmolLM); a GPT-2 model trains every weight: remove [lora]".into())),
            Family::Llama(l) if l.cfg.moe.is_some() || l.cfg.qk_norm != crate::llama::QkNorm::None => Err(FamilyError::Lora(
                "[lora] on mixture-of-experts or query/key-norm models (Mixtral, Qwen2-MoE, Qwen3, Qwen3-MoE, OLMoE) is not built yet: remove [lora] to train every weight".into(),
            )),
            Family::Llama(l) => {
                let targets = crate::ops::lora::resolve_targets(l.cfg.n_layer, &lora.targets).map_err(FamilyError::Lora)?;
                let shape = crate::ops::lora::LoraShape { r: lora.r, alpha: lora.alpha, rslora: lora.rslora };
                let adapted = Llama::with_lora(l.cfg, crate::llama::LlamaLora { shape, targets }).map_err(|e| FamilyError::Lora(e.to_string()))?;
                if lora.base == ferrospeed::config::LoraBase::Nf4 {
                    // NF4 quantises each linear weight in blocks of 64 values.
                    let model = adapted.model().map_err(|e| FamilyError::Lora(e.to_string()))?;
                    let bad = (0..model.num_blocks()).find_map(|b| {
                        model.frozen_params(b).iter().find(|s| s.linear && s.numel() % ferrospeed::quant::BLOCK != 0).map(|s| (model.block_names()[b].clone(), s.clone()))
                    });
                    if let Some((block, spec)) = bad {
                        return Err(FamilyError::Lora(format!(
                            "lora.base = \"nf4\": model.{block}.{} has shape {:?}, whose {} values are not a multiple of NF4's block of {}: use lora.base = \"bf16\"",
                            spec.name,
                            spec.shape,
                            spec.numel(),
                            ferrospeed::quant::BLOCK
                        )));
                    }
                }
                Ok(Family::Llama(adapted))
            }
        }
    }

    /// The LoRA adapters, if any.
    pub fn lora(&self) -> Option<&crate::llama::LlamaLora> {
        match self {
            Family::Gpt(_) => None,
            Family::Llama(l) => l.lora(),
        }
    }

    /// What the blocks keep for the backward at `micro_batch` sequences of `seq_len` in a compute
    /// dtype of `compute_bytes`, from what the fused layers save (`layer_fused.rs`): GPT-2 16·d values
    /// a token per layer (input, two norms, q/k/v, attention output, residual, MLP pre- and post-GELU);
    /// Llama 5·d + q/k/v width + 3·d_ff (input, two norms, attention output, residual, q/k/v, gate/up,
    /// SwiGLU; past `mlp_tiled::MAX_MLP` neither of the last two, one tile's alive instead). fp32 takes
    /// the composed attention, which also keeps the t × t probabilities. The loss holds the logits in
    /// f32 (a chunk of them at long context).
    pub fn activations(&self, micro_batch: usize, seq_len: usize, compute_bytes: usize) -> ActivationProfile {
        let (n_layer, d, n_head, vocab, per_token) = match self {
            Family::Gpt(g) => (g.cfg.n_layer, g.cfg.d_model, g.cfg.n_head, g.cfg.vocab_size, 16 * g.cfg.d_model),
            Family::Llama(l) => {
                let c = &l.cfg;
                let qkv = (c.n_head + 2 * c.n_kv_head) * c.head_dim;
                // A tiled MLP (long context) keeps neither gate/up nor SwiGLU's output.
                let mlp = if crate::llama::mlp_tiled::tile_rows(micro_batch * seq_len, c.d_ff) < micro_batch * seq_len { 0 } else { 3 * c.d_ff };
                (c.n_layer, c.d_model, c.n_head, c.vocab_size, 5 * c.d_model + qkv + mlp)
            }
        };
        let (tokens, cb) = ((micro_batch * seq_len) as u64, compute_bytes as u64);
        let probs = if compute_bytes == 4 { (micro_batch * n_head * seq_len * seq_len * 4) as u64 } else { 0 };
        // A tiled MLP's one tile of gate/up and SwiGLU output, alive while it runs.
        let tile = match self {
            Family::Llama(l) => {
                let rows = crate::llama::mlp_tiled::tile_rows(tokens as usize, l.cfg.d_ff);
                if (rows as u64) < tokens { rows as u64 * 3 * l.cfg.d_ff as u64 * cb } else { 0 }
            }
            Family::Gpt(_) => 0,
        };
        let layer = tokens * per_token as u64 * cb + probs;
        // Whole, or one chunk of rows at long context (`ops::lm_head::chunk_rows`).
        let logits = crate::ops::lm_head::chunk_rows(tokens as usize, vocab) as u64 * vocab as u64 * 4;
        let boundaries = tokens * (n_layer as u64 + 1) * d as u64 * cb;
        ActivationProfile { kept: n_layer as u64 * layer + logits + tile, recomputed: boundaries + (layer + tile).max(logits) }
    }

    pub fn model(&self) -> Result<Model, EngineError> {
        match self {
            Family::Gpt(g) => g.model(),
            Family::Llama(l) => l.model(),
        }
    }

    /// transformers' parameter names for this family.
    pub fn names(&self) -> ParamNames {
        match self {
            Family::Gpt(_) => crate::gpt::HF_NAMES,
            Family::Llama(_) => crate::llama::HF_NAMES,
        }
    }

    /// One line for the start of a run: "Llama 16 layers × d 2048, 32 heads (8 key/value)".
    pub fn describe(&self) -> String {
        match self {
            Family::Gpt(g) => format!("GPT {} layers × d {}", g.cfg.n_layer, g.cfg.d_model),
            Family::Llama(l) => format!("Llama {} layers × d {}, {} heads ({} key/value)", l.cfg.n_layer, l.cfg.d_model, l.cfg.n_head, l.cfg.n_kv_head),
        }
    }

    /// Training FLOPs per token.
    pub fn train_flops_per_token(&self) -> f64 {
        match self {
            Family::Gpt(g) => g.train_flops_per_token(),
            Family::Llama(l) => l.train_flops_per_token(),
        }
    }

    /// Check before anything runs that `path` (a model directory, safetensors or GGUF file) holds
    /// every parameter of this model with its shape and nothing else, and that `tokenizer`'s ids fit
    /// the vocabulary. A tensor the model would not use is an error naming it, except buffers that
    /// transformers does not load either ([`HARMLESS`]): those come back as one warning line.
    /// Messages name the path as `named = PATH` (`named`: how the user gave it, e.g. `model.init_from`).
    pub fn check_inputs(&self, init_from: Option<&Path>, tokenizer: &Tokenizer, named: &str) -> Result<Option<String>, String> {
        let vocab = match self {
            Family::Gpt(g) => g.cfg.vocab_size,
            Family::Llama(l) => l.cfg.vocab_size,
        };
        if tokenizer.vocab_size() > vocab {
            return Err(format!(
                "the tokenizer has {} ids but the model's vocabulary only {vocab}: use the model's own tokenizer (model.tokenizer)",
                tokenizer.vocab_size()
            ));
        }
        let Some(path) = init_from else { return Ok(None) };
        let files = (self.names().open)(path).map_err(|e| e.to_string())?;
        let model = self.model().map_err(|e| e.to_string())?;
        let name_of = self.names().map;
        let mut used = std::collections::BTreeSet::new();
        // With adapters the file is their base: it holds the frozen parameters, not the adapters.
        let base = |b| if model.has_frozen() { model.frozen_params(b) } else { model.own_params(b) };
        for b in 0..model.num_blocks() {
            for spec in base(b) {
                let name = name_of(&model.block_names()[b], &spec.name);
                used.insert(name.clone());
                match files.info(&name) {
                    None => return Err(format!("{named} = {}: it has no tensor {name}; is it a model of this family?", path.display())),
                    Some(info) if info.shape != spec.shape => {
                        return Err(format!("{named} = {}: {name} has shape {:?} there but {:?} in this model", path.display(), info.shape, spec.shape))
                    }
                    Some(_) => {}
                }
            }
        }
        // A tied head's own copy (some files store it beside the embedding): transformers ties it
        // to the embedding on load and ignores the stored one; so do we.
        let tied = matches!(self, Family::Llama(l) if l.cfg.tie_word_embeddings);
        let harmless = |name: &str| -> Option<&'static str> {
            if tied && name == "lm_head.weight" {
                return Some("the head is tied to the embedding (tie_word_embeddings = true), so transformers ignores it too");
            }
            HARMLESS.iter().find(|(suffix, _)| name.ends_with(suffix)).map(|h| h.1)
        };
        let (mut ignored, mut unused) = (Vec::new(), Vec::new());
        for name in files.names().filter(|n| !used.contains(*n)) {
            match harmless(name) {
                Some(_) => ignored.push(name),
                None => unused.push(name),
            }
        }
        if let Some(first) = unused.first() {
            let more = if unused.len() > 1 { format!(" (and {} more)", unused.len() - 1) } else { String::new() };
            return Err(format!(
                "{named} = {}: it has a tensor {first}{more} that this model does not use, so its weights would be silently dropped; is config.json right for these weights (attention_bias, mlp_bias, tie_word_embeddings)?",
                path.display()
            ));
        }
        Ok(ignored.first().map(|first| {
            let why = harmless(first).unwrap_or("");
            let more = if ignored.len() > 1 { format!(" and {} more like it", ignored.len() - 1) } else { String::new() };
            format!("{named} = {}: ignoring {first}{more} ({why})", path.display())
        }))
    }

    /// The `config.json` an export of this model writes, for weights of `dtype`: a model started from
    /// a transformers directory gets that directory's own `config.json` back, every key as it was
    /// (architecture, `max_position_embeddings`, rope settings, keys ferrospeed does not read); one
    /// from a GGUF file what transformers makes of it (`max_position_embeddings` its
    /// `llama.context_length`); one trained from scratch its shape, with the positions it was trained
    /// on (`model.seq_len`).
    pub fn export_config(&self, init_from: Option<&Path>, dtype: &str) -> Result<serde_json::Value, FamilyError> {
        let mut config = match (self, init_from) {
            (_, Some(dir)) if dir.is_dir() => crate::hf::source_config(dir)?,
            (Family::Llama(l), Some(file)) if file.extension().is_some_and(|e| e == "gguf") => {
                let gguf = crate::gguf::GgufFile::open(file)?;
                let positions = gguf.context_length().unwrap_or(l.cfg.seq_len);
                let mut config = crate::hf::llama_config_json(&l.cfg, dtype, positions.max(l.cfg.seq_len));
                for (key, id) in gguf.token_ids() {
                    config[key] = id.into();
                }
                config
            }
            _ => self.config_json(dtype),
        };
        crate::hf::set_dtype(&mut config, dtype);
        Ok(config)
    }

    /// The `config.json` of an export in `dtype` (`"bfloat16"`, `"float16"`, `"float32"`).
    pub fn config_json(&self, dtype: &str) -> serde_json::Value {
        match self {
            Family::Gpt(g) => crate::hf::gpt_config_json(&g.cfg, dtype),
            Family::Llama(l) => crate::hf::llama_config_json(&l.cfg, dtype, l.cfg.seq_len),
        }
    }
}

fn from_keys(m: &ModelConfig, vocab_size: usize) -> Result<Family, FamilyError> {
    let need = |v: Option<usize>, key: &str| v.ok_or_else(|| FamilyError::Missing { key: key.into() });
    let (n_layer, n_head, d_model) = (need(m.n_layer, "n_layer")?, need(m.n_head, "n_head")?, need(m.d_model, "d_model")?);
    Ok(match m.kind_or_default() {
        ModelKind::Gpt => Family::Gpt(Gpt::new(GptConfig { n_layer, n_head, d_model, seq_len: m.seq_len, vocab_size })),
        ModelKind::Llama => {
            let base = LlamaConfig::tiny(n_layer, d_model, n_head, m.n_kv_head.unwrap_or(n_head), vocab_size, m.seq_len);
            Family::Llama(Llama::new(LlamaConfig {
                d_ff: m.d_ff.unwrap_or(base.d_ff),
                rope_theta: m.rope_theta.unwrap_or(base.rope_theta),
                tie_word_embeddings: m.tie_embeddings.unwrap_or(false),
                ..base
            }))
        }
    })
}

fn from_dir(m: &ModelConfig, dir: &Path) -> Result<Family, FamilyError> {
    let path = dir.join("config.json").display().to_string();
    let hf = read_config(dir, m.seq_len)?;
    let mismatch = |key: &str, value: String, hf_key: &str, file_value: String| FamilyError::Mismatch { key: key.into(), value, hf_key: hf_key.into(), file_value, path: path.clone() };
    let check = |key: &str, given: Option<usize>, hf_key: &str, actual: usize| match given {
        Some(v) if v != actual => Err(mismatch(key, v.to_string(), hf_key, actual.to_string())),
        _ => Ok(()),
    };
    let kind = match hf {
        HfModel::Gpt(_) => ModelKind::Gpt,
        HfModel::Llama(_) => ModelKind::Llama,
    };
    if let Some(k) = m.kind.filter(|k| *k != kind) {
        return Err(mismatch("kind", format!("\"{k}\""), "architectures", format!("\"{kind}\"")));
    }
    match hf {
        HfModel::Llama(c) => {
            check_llama(m, &c, &path)?;
            Ok(Family::Llama(Llama::new(c)))
        }
        HfModel::Gpt(c) => {
            check("n_layer", m.n_layer, "n_layer", c.n_layer)?;
            check("n_head", m.n_head, "n_head", c.n_head)?;
            check("d_model", m.d_model, "n_embd", c.d_model)?;
            if m.seq_len > c.seq_len {
                return Err(FamilyError::TooLong { seq_len: m.seq_len, positions: c.seq_len, path: path.clone() });
            }
            Ok(Family::Gpt(Gpt::new(c)))
        }
    }
}

/// Keys given under `[model]` must agree with the Llama shape `c` read from `path`.
fn check_llama(m: &ModelConfig, c: &LlamaConfig, path: &str) -> Result<(), FamilyError> {
    let mismatch = |key: &str, value: String, hf_key: &str, file_value: String| FamilyError::Mismatch { key: key.into(), value, hf_key: hf_key.into(), file_value, path: path.into() };
    let check = |key: &str, given: Option<usize>, hf_key: &str, actual: usize| match given {
        Some(v) if v != actual => Err(mismatch(key, v.to_string(), hf_key, actual.to_string())),
        _ => Ok(()),
    };
    check("n_layer", m.n_layer, "num_hidden_layers", c.n_layer)?;
    check("n_head", m.n_head, "num_attention_heads", c.n_head)?;
    check("d_model", m.d_model, "hidden_size", c.d_model)?;
    check("n_kv_head", m.n_kv_head, "num_key_value_heads", c.n_kv_head)?;
    check("d_ff", m.d_ff, "intermediate_size", c.d_ff)?;
    if let Some(t) = m.rope_theta.filter(|t| *t != c.rope_theta) {
        return Err(mismatch("rope_theta", t.to_string(), "rope_theta", c.rope_theta.to_string()));
    }
    if let Some(t) = m.tie_embeddings.filter(|t| *t != c.tie_word_embeddings) {
        return Err(mismatch("tie_embeddings", t.to_string(), "tie_word_embeddings", c.tie_word_embeddings.to_string()));
    }
    Ok(())
}
