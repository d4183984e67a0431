//! LayerNorm and RMSNorm that always backpropagate, with candle-nn's constructors' names and hints.
//!
//! Why our own: candle-nn 0.11's `LayerNorm` and `RmsNorm` modules switch, on contiguous input, to
//! fused ops registered without a backward (`apply_op*_no_bwd`; candle issues #2168, #2977, #3011):
//! the norm's weights and every parameter before it then get no gradient, silently. These compute the
//! same function with candle's differentiable ops (`ops::layer_norm_slow`, `ops::rms_norm_slow`), and
//! ask the `VarBuilder` for the same tensors (`weight`, `bias`), so they are drop-in replacements.
//! The engine refuses a parameter that receives no gradient (`EngineError::NoGradient`), which is how
//! a model still using the fused modules finds out.

use candle_core::{Result, Tensor};
use candle_nn::{Module, VarBuilder};

/// Layer normalisation over the last dimension: `(x − mean) / sqrt(var + eps) · weight + bias`.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    /// From its tensors.
    pub fn new(weight: Tensor, bias: Tensor, eps: f64) -> Self {
        Self { weight, bias, eps }
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        candle_nn::ops::layer_norm_slow(x, &self.weight, &self.bias, self.eps as f32)
    }
}

/// RMS normalisation over the last dimension: `x / sqrt(mean(x²) + eps) · weight`.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    /// From its weight.
    pub fn new(weight: Tensor, eps: f64) -> Self {
        Self { weight, eps }
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        candle_nn::ops::rms_norm_slow(x, &self.weight, self.eps as f32)
    }
}

/// `candle_nn::layer_norm(size, eps, vb)` that trains: `weight` (ones) and `bias` (zeros) from `vb`.
pub fn layer_norm(size: usize, eps: f64, vb: VarBuilder) -> Result<LayerNorm> {
    let weight = vb.get_with_hints(size, "weight", candle_nn::init::ONE)?;
    let bias = vb.get_with_hints(size, "bias", candle_nn::init::ZERO)?;
    Ok(LayerNorm::new(weight, bias, eps))
}

/// `candle_nn::rms_norm(size, eps, vb)` that trains: `weight` (ones) from `vb`.
pub fn rms_norm(size: usize, eps: f64, vb: VarBuilder) -> Result<RmsNorm> {
    Ok(RmsNorm::new(vb.get_with_hints(size, "weight", candle_nn::init::ONE)?, eps))
}
