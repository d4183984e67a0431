//! A GGUF file (llama.cpp) as a model: the Llama shape from its `llama.*` metadata, its tokenizer
//! built from `tokenizer.ggml.*` (vocabulary, merges, token types) and its chat template. The weights
//! are read by the library (`ferrospeed::checkpoint::gguf`) under transformers' names.
//!
//! The tokenizer is built as transformers' GGUF loader builds it (`GGUFGPTConverter`): byte-level BPE,
//! GPT-2's pre-tokenizer without a prefix space, control tokens (type 3) as special added tokens. For
//! SmolLM2 that differs from the original `tokenizer.json` only in digit splitting after a space before
//! non-ASCII numerals (transformers does the same). Only `tokenizer.ggml.model = "gpt2"` is supported.

use crate::tokenizer::{HfTokenizer, Specials, Tokenizer};
use crate::LlamaConfig;
use candle_core::quantized::gguf_file::{Content, Value};
use ferrospeed::checkpoint::gguf::{check_types, meta_str, meta_usize, read_content};
use serde_json::json;
use std::path::{Path, PathBuf};

/// A GGUF file that cannot be used: one line naming it and why.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct GgufError {
    pub path: PathBuf,
    pub reason: String,
}

/// A GGUF file's metadata.
pub struct GgufFile {
    path: PathBuf,
    content: Content,
}

fn strings(v: Option<&Value>) -> Option<Vec<&str>> {
    v?.to_vec().ok()?.iter().map(|s| s.to_string().ok().map(String::as_str)).collect()
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self, GgufError> {
        let err = |e: ferrospeed::checkpoint::CheckpointError| match e {
            ferrospeed::checkpoint::CheckpointError::Unsupported { reason, .. } => GgufError { path: path.to_path_buf(), reason },
            e => GgufError { path: path.to_path_buf(), reason: e.to_string() },
        };
        let content = read_content(path).map_err(err)?;
        check_types(&content, path).map_err(err)?;
        Ok(Self { path: path.to_path_buf(), content })
    }

    fn err(&self, reason: impl Into<String>) -> GgufError {
        GgufError { path: self.path.clone(), reason: reason.into() }
    }

    fn need(&self, key: &str) -> Result<usize, GgufError> {
        meta_usize(&self.content, key).ok_or_else(|| self.err(format!("has no {key}: is it a complete llama GGUF?")))
    }

    fn f64_or(&self, key: &str, default: f64) -> f64 {
        self.content.metadata.get(key).and_then(|v| v.to_f32().map(f64::from).or_else(|_| v.to_f64()).ok()).unwrap_or(default)
    }

    /// Positions the model was trained for (`llama.context_length`).
    pub fn context_length(&self) -> Option<usize> {
        meta_usize(&self.content, "llama.context_length")
    }

    /// The special tokens' ids under transformers' `config.json` keys (`bos_token_id`, `eos_token_id`,
    /// `pad_token_id`, `unk_token_id`), as its GGUF loader sets them from `tokenizer.ggml.*`.
    pub fn token_ids(&self) -> Vec<(&'static str, usize)> {
        [("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"), ("pad_token_id", "padding_token_id"), ("unk_token_id", "unknown_token_id")]
            .into_iter()
            .filter_map(|(key, gguf)| meta_usize(&self.content, &format!("tokenizer.ggml.{gguf}")).map(|id| (key, id)))
            .collect()
    }

    /// The model's shape, for training `seq_len` positions.
    pub fn llama_config(&self, seq_len: usize) -> Result<LlamaConfig, GgufError> {
        let arch = meta_str(&self.content, "general.architecture").unwrap_or("(none)");
        if arch != "llama" {
            return Err(self.err(format!("has architecture {arch:?}; only \"llama\" GGUF files can be imported (use the model's safetensors directory)")));
        }
        if self.content.tensor_infos.contains_key("rope_freqs.weight") || meta_str(&self.content, "llama.rope.scaling.type").is_some_and(|t| t != "none") {
            return Err(self.err("uses rotary frequency scaling, which GGUF import does not support: use the model's safetensors directory"));
        }
        let (n_layer, d_model, n_head) = (self.need("llama.block_count")?, self.need("llama.embedding_length")?, self.need("llama.attention.head_count")?);
        let n_kv_head = meta_usize(&self.content, "llama.attention.head_count_kv").unwrap_or(n_head);
        let vocab = meta_usize(&self.content, "llama.vocab_size")
            .or_else(|| strings(self.content.metadata.get("tokenizer.ggml.tokens")).map(|t| t.len()))
            .ok_or_else(|| self.err("has neither llama.vocab_size nor tokenizer.ggml.tokens"))?;
        if let Some(ctx) = meta_usize(&self.content, "llama.context_length").filter(|&c| seq_len > c) {
            return Err(self.err(format!("model.seq_len = {seq_len} is longer than its {ctx} positions: use model.seq_len ≤ {ctx}")));
        }
        let head_dim = meta_usize(&self.content, "llama.attention.key_length").unwrap_or(d_model / n_head);
        Ok(LlamaConfig {
            n_layer,
            d_model,
            n_head,
            n_kv_head,
            head_dim,
            d_ff: self.need("llama.feed_forward_length")?,
            vocab_size: vocab,
            seq_len,
            rope_theta: self.f64_or("llama.rope.freq_base", 10_000.0),
            rope_scaling: None,
            // The f32 in the file, widened (as transformers reads it).
            rms_norm_eps: self.f64_or("llama.attention.layer_norm_rms_epsilon", 1e-5),
            tie_word_embeddings: !self.content.tensor_infos.contains_key("output.weight"),
            attention_bias: self.content.tensor_infos.contains_key("blk.0.attn_q.bias"),
            o_proj_bias: self.content.tensor_infos.contains_key("blk.0.attn_output.bias"),
            mlp_bias: self.content.tensor_infos.contains_key("blk.0.ffn_gate.bias"),
            initializer_range: 0.02,
            qk_norm: crate::llama::QkNorm::None,
            moe: None,
        })
    }

    /// The tokenizer of its `tokenizer.ggml.*` metadata, with its special tokens and chat template.
    pub fn tokenizer(&self) -> Result<Tokenizer, GgufError> {
        let model = meta_str(&self.content, "tokenizer.ggml.model").unwrap_or("(none)");
        if model != "gpt2" {
            return Err(self.err(format!("has tokenizer model {model:?}; only byte-level BPE (\"gpt2\") GGUF tokenizers are supported: give model.tokenizer = a tokenizer.json")));
        }
        let tokens = strings(self.content.metadata.get("tokenizer.ggml.tokens")).ok_or_else(|| self.err("has no tokenizer.ggml.tokens"))?;
        let merges = strings(self.content.metadata.get("tokenizer.ggml.merges")).ok_or_else(|| self.err("has no tokenizer.ggml.merges"))?;
        let types: Vec<i64> = self
            .content
            .metadata
            .get("tokenizer.ggml.token_type")
            .and_then(|v| v.to_vec().ok())
            .map(|v| v.iter().map(|t| t.to_i32().map(i64::from).unwrap_or(1)).collect())
            .unwrap_or_default();
        let vocab: serde_json::Map<String, serde_json::Value> = tokens.iter().enumerate().map(|(i, t)| (t.to_string(), json!(i))).collect();
        let added: Vec<serde_json::Value> = types
            .iter()
            .enumerate()
            .filter(|(_, &t)| t == 3 || t == 4)
            .map(|(i, &t)| json!({"id": i, "content": tokens[i], "single_word": false, "lstrip": false, "rstrip": false, "normalized": t == 4, "special": t == 3}))
            .collect();
        let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
        let spec = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": byte_level,
            "post_processor": null,
            "decoder": byte_level,
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "", "end_of_word_suffix": "",
                      "fuse_unk": false, "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": merges},
        });
        let tokenizer: tokenizers::Tokenizer = spec.to_string().parse().map_err(|e| self.err(format!("its tokenizer cannot be built: {e}")))?;
        let token = |key: &str| meta_usize(&self.content, key).and_then(|id| tokens.get(id).map(|t| (t.to_string(), id as u32)));
        let specials = Specials {
            eos: token("tokenizer.ggml.eos_token_id"),
            bos: token("tokenizer.ggml.bos_token_id").map(|b| b.0),
            chat_template: meta_str(&self.content, "tokenizer.chat_template").map(str::to_string),
        };
        Ok(Tokenizer::Hf(Box::new(HfTokenizer { tokenizer, path: self.path.clone(), specials })))
    }
}
