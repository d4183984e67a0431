//! The last GPT block: final LayerNorm, logits through the token embedding (tied), cross-entropy.

use super::cross_entropy::fused_cross_entropy;
use super::ops::layer_norm;
use super::GptConfig;
use ferrospeed::engine::{Batch, Block, Init, ParamRef, ParamSpec};
use candle_core::{Result, Tensor};

/// `ln_f` and the head; its slot 2 is block 0's `wte`.
#[derive(Debug, Clone)]
pub struct Head {
    cfg: GptConfig,
}

impl Head {
    pub fn new(cfg: GptConfig) -> Self {
        Self { cfg }
    }

    /// Logits `[b·t, vocab]` for the hidden states `x [b, t, d]`.
    pub fn logits(&self, params: &[Tensor], x: &Tensor) -> Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let h = layer_norm(x, &params[0], &params[1])?.reshape((b * t, d))?;
        h.matmul(&params[2].t()?)
    }
}

impl Block for Head {
    fn name(&self) -> String {
        "head".into()
    }

    fn params(&self) -> Vec<ParamRef> {
        let d = self.cfg.d_model;
        vec![
            ParamRef::Own(ParamSpec::new("ln_f.weight", &[d], Init::Ones, false)),
            ParamRef::Own(ParamSpec::new("ln_f.bias", &[d], Init::Zeros, false)),
            ParamRef::Tied { block: 0, name: "wte".into() },
        ]
    }

    fn forward(&self, params: &[Tensor], x: Option<&Tensor>, batch: &Batch) -> Result<Tensor> {
        let x = x.ok_or_else(|| candle_core::Error::Msg("the head needs an input".into()))?;
        fused_cross_entropy(&self.logits(params, x)?, &batch.targets.flatten_all()?)
    }

    fn forward_flops_per_token(&self) -> f64 {
        2.0 * (self.cfg.d_model * self.cfg.vocab_size) as f64
    }
}
