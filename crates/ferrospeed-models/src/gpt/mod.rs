//! The GPT-2 family as blocks: token+position embedding, N pre-LayerNorm transformer layers, and a
//! final LayerNorm with a head tied to the token embedding and the cross-entropy loss.
//!
//! Parameter names and shapes follow HuggingFace's GPT-2 (`transformer.h.N.attn.c_attn.weight` …);
//! linear weights are stored `[in, out]` like its Conv1D, so `x · W` needs no transpose and export is a
//! renaming.

mod embedding;
mod generate;
pub mod infer;
mod head;
mod layer;
mod layer_fused;
mod names;

pub use embedding::Embedding;
pub use head::Head;
pub use layer::Layer;
pub use names::{hf_name, HF_NAMES};

use ferrospeed::engine::{Block, EngineError, Model};

/// The shape of a GPT model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GptConfig {
    pub n_layer: usize,
    pub n_head: usize,
    pub d_model: usize,
    pub seq_len: usize,
    pub vocab_size: usize,
}

/// A GPT model's blocks (stateless: parameters come from the engine).
#[derive(Debug, Clone)]
pub struct Gpt {
    pub cfg: GptConfig,
}

impl Gpt {
    pub fn new(cfg: GptConfig) -> Self {
        Self { cfg }
    }

    /// The blocks in order: embedding, `n_layer` layers, head.
    pub fn blocks(&self) -> Vec<Box<dyn Block>> {
        let mut blocks: Vec<Box<dyn Block>> = vec![Box::new(Embedding::new(self.cfg))];
        for l in 0..self.cfg.n_layer {
            blocks.push(Box::new(Layer::new(self.cfg, l)));
        }
        blocks.push(Box::new(Head::new(self.cfg)));
        blocks
    }

    /// The model as the engine sees it.
    pub fn model(&self) -> Result<Model, EngineError> {
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
    fn gpt2_small_has_124m_parameters() {
        let gpt = Gpt::new(GptConfig { n_layer: 12, n_head: 12, d_model: 768, seq_len: 1024, vocab_size: 50257 });
        assert_eq!(gpt.model().unwrap().num_params(), 124_439_808);
    }
}
