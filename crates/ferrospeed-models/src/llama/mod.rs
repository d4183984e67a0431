//! The Llama family as blocks (Llama 2/3, Mistral, Qwen2, SmolLM: one architecture, different sizes):
//! token embedding, N pre-RMSNorm layers (grouped-query attention with rotary positions, SwiGLU MLP),
//! and a final RMSNorm with the LM head (its own matrix, or tied to the embedding) and the loss.
//!
//! Parameter names, shapes and layouts are transformers' `LlamaForCausalLM` (`model.layers.N.self_attn.
//! q_proj.weight` …, linear weights `[out, in]`), so import and export are a renaming and nothing else.

mod embedding;
mod experts;
mod head;
pub mod infer;
mod layer;
mod layer_fused;
mod layer_moe;
pub mod mlp_tiled;
pub mod moe;
mod names;

pub use embedding::Embedding;
pub use head::Head;
pub use layer::Layer;
pub use moe::MoeConfig;
pub use names::{expert_views, hf_name, open_weights, ExpertLayout, HF_NAMES};

use crate::ops::lora::{LayerLora, LoraShape};
use crate::ops::rope::{inv_freq, tables, Llama3Scaling};
use candle_core::{Device, Result, Tensor};
use ferrospeed::engine::{Block, EngineError, Model};
use std::sync::{Arc, Mutex};

/// The shape and hyper-parameters of a Llama-family model (transformers' `LlamaConfig` names in brackets).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct LlamaConfig {
    /// Layers (`num_hidden_layers`).
    pub n_layer: usize,
    /// Width of the residual stream (`hidden_size`).
    pub d_model: usize,
    /// Query heads (`num_attention_heads`).
    pub n_head: usize,
    /// Key/value heads (`num_key_value_heads`); fewer than `n_head` is grouped-query attention.
    pub n_kv_head: usize,
    /// Per-head width (`head_dim`, usually `d_model / n_head`).
    pub head_dim: usize,
    /// Width of the MLP (`intermediate_size`).
    pub d_ff: usize,
    /// Vocabulary (`vocab_size`).
    pub vocab_size: usize,
    /// Training sequence length (positions the rotary tables cover).
    pub seq_len: usize,
    /// `rope_theta`.
    pub rope_theta: f64,
    /// Llama 3's frequency scaling (`rope_scaling` with `rope_type = "llama3"`).
    pub rope_scaling: Option<Llama3Scaling>,
    /// `rms_norm_eps`.
    pub rms_norm_eps: f64,
    /// The head reuses the embedding matrix (`tie_word_embeddings`).
    pub tie_word_embeddings: bool,
    /// Biases on the q, k and v projections (Llama's `attention_bias`; Qwen2 always has them).
    pub attention_bias: bool,
    /// A bias on the output projection `o_proj` (Llama's `attention_bias` gives it with q/k/v; Qwen2 has none).
    pub o_proj_bias: bool,
    /// Biases on the MLP's gate, up and down projections (`mlp_bias`).
    pub mlp_bias: bool,
    /// Standard deviation of the random initialisation (`initializer_range`).
    pub initializer_range: f64,
    /// RMSNorms on the queries and keys before RoPE (Qwen3: per head; OLMoE: over the projection).
    pub qk_norm: QkNorm,
    /// Experts in the MLPs of some layers (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE).
    pub moe: Option<MoeConfig>,
}

/// Where a layer normalises its queries and keys (`self_attn.q_norm`, `self_attn.k_norm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum QkNorm {
    None,
    /// Each head's `head_dim` values (Qwen3): weights `[head_dim]`.
    PerHead,
    /// The whole projection (OLMoE): weights `[n_head·head_dim]` and `[n_kv_head·head_dim]`.
    Full,
}

impl LlamaConfig {
    /// A small model for tests and examples: `n_layer` × `d_model` with `n_head` heads (`n_kv_head`
    /// key/value heads), an MLP of about 8/3·d, Llama 2's defaults otherwise.
    pub fn tiny(n_layer: usize, d_model: usize, n_head: usize, n_kv_head: usize, vocab_size: usize, seq_len: usize) -> Self {
        Self {
            n_layer,
            d_model,
            n_head,
            n_kv_head,
            head_dim: d_model / n_head,
            d_ff: (8 * d_model / 3).div_ceil(8) * 8,
            vocab_size,
            seq_len,
            rope_theta: 10_000.0,
            rope_scaling: None,
            rms_norm_eps: 1e-5,
            tie_word_embeddings: false,
            attention_bias: false,
            o_proj_bias: false,
            mlp_bias: false,
            initializer_range: 0.02,
            qk_norm: QkNorm::None,
            moe: None,
        }
    }

    /// Whether layer `i` has experts.
    pub fn is_sparse(&self, i: usize) -> bool {
        self.moe.is_some_and(|m| m.is_sparse(i))
    }

    /// Width of the fused q, k, v projection: `(n_head + 2·n_kv_head)·head_dim`.
    pub fn qkv_width(&self) -> usize {
        (self.n_head + 2 * self.n_kv_head) * self.head_dim
    }
}

/// The rotary tables, built once per sequence length and device and shared by the layers.
#[derive(Debug, Default)]
pub(crate) struct RopeCache {
    tables: Mutex<Vec<(usize, String, Tensor, Tensor)>>,
}

impl RopeCache {
    /// `cos`, `sin` `[t, head_dim/2]` (f32) on `device`.
    pub(crate) fn get(&self, cfg: &LlamaConfig, t: usize, device: &Device) -> Result<(Tensor, Tensor)> {
        let key = format!("{:?}", device.location());
        let mut cache = self.tables.lock().map_err(|_| candle_core::Error::Msg("rope cache poisoned".into()))?;
        if let Some((_, _, c, s)) = cache.iter().find(|(tt, k, _, _)| *tt == t && *k == key) {
            return Ok((c.clone(), s.clone()));
        }
        let (c, s) = tables(&inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling), t, device)?;
        cache.push((t, key, c.clone(), s.clone()));
        Ok((c, s))
    }
}

/// LoRA adapters on a Llama model: their rank and scale, and which modules of each layer they adapt.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaLora {
    /// Rank and scale.
    pub shape: LoraShape,
    /// For each layer, one flag per [`crate::ops::lora::MODULES`] entry.
    pub targets: Vec<[bool; 7]>,
}

/// A Llama model's blocks (stateless: parameters come from the engine).
#[derive(Debug, Clone)]
pub struct Llama {
    pub cfg: LlamaConfig,
    rope: Arc<RopeCache>,
    /// LoRA adapters: every parameter of the base is then frozen.
    lora: Option<LlamaLora>,
}

impl Llama {
    pub fn new(cfg: LlamaConfig) -> Self {
        Self { cfg, rope: Arc::default(), lora: None }
    }

    /// The model with LoRA adapters (`lora.targets` has one entry per layer); the base is frozen.
    pub fn with_lora(cfg: LlamaConfig, lora: LlamaLora) -> std::result::Result<Self, EngineError> {
        if lora.targets.len() != cfg.n_layer || lora.shape.r == 0 {
            return Err(EngineError::Model(format!("LoRA of rank {} over {} layers for a model of {}", lora.shape.r, lora.targets.len(), cfg.n_layer)));
        }
        Ok(Self { cfg, rope: Arc::default(), lora: Some(lora) })
    }

    /// The adapters, if any.
    pub fn lora(&self) -> Option<&LlamaLora> {
        self.lora.as_ref()
    }

    /// The blocks in order: embedding, `n_layer` layers (each sparse one followed by its routed
    /// experts' block), head.
    pub fn blocks(&self) -> Vec<Box<dyn Block>> {
        let frozen = self.lora.is_some();
        let mut blocks: Vec<Box<dyn Block>> = vec![Box::new(if frozen { Embedding::frozen(self.cfg) } else { Embedding::new(self.cfg) })];
        for l in 0..self.cfg.n_layer {
            let lora = self.lora.as_ref().map(|a| LayerLora { shape: a.shape, targets: a.targets[l] });
            blocks.push(Box::new(Layer::new(self.cfg, l, self.rope.clone(), lora)));
            if self.cfg.is_sparse(l) {
                blocks.push(Box::new(experts::Experts::new(self.cfg, l)));
            }
        }
        blocks.push(Box::new(if frozen { Head::frozen(self.cfg) } else { Head::new(self.cfg) }));
        blocks
    }

    /// The model as the engine sees it.
    pub fn model(&self) -> std::result::Result<Model, EngineError> {
        Model::new(self.blocks())
    }

    /// Training FLOPs per token (forward + backward = 3 × forward), for MFU.
    pub fn train_flops_per_token(&self) -> f64 {
        3.0 * self.blocks().iter().map(|b| b.forward_flops_per_token()).sum::<f64>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama_3_2_1b_has_its_parameter_count() {
        // Llama-3.2-1B: 16 layers, d 2048, 32 heads, 8 KV heads, MLP 8192, vocabulary 128256, tied.
        let cfg = LlamaConfig { d_ff: 8192, head_dim: 64, tie_word_embeddings: true, ..LlamaConfig::tiny(16, 2048, 32, 8, 128_256, 2048) };
        assert_eq!(Llama::new(cfg).model().unwrap().num_params(), 1_235_814_400);
    }
}
