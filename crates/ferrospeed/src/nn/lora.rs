//! LoRA for blocks written with candle-nn: [`lora_linear`] builds a linear layer plus its adapters
//! (`lora_A.weight` `[r, in]`, Kaiming-uniform as PEFT starts it, and `lora_B.weight` `[out, r]`, zero)
//! from the same `VarBuilder`, and [`super::NnBlock::train_only`] freezes the rest of the block, which
//! the engine then keeps as a frozen base (no gradient, no optimizer state).

use candle_core::{Module, Result, Tensor};
use candle_nn::{Init, Linear, VarBuilder};

/// A linear layer with a LoRA update: `y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ`, `s = alpha / r`.
#[derive(Debug, Clone)]
pub struct LoraLinear {
    base: Linear,
    a: Linear,
    b: Linear,
    scale: f64,
}

/// A linear layer of `in_dim → out_dim` (weight and bias, as `candle_nn::linear`) with adapters of rank
/// `r` scaled by `alpha / r`.
pub fn lora_linear(in_dim: usize, out_dim: usize, r: usize, alpha: f64, vb: VarBuilder) -> Result<LoraLinear> {
    let base = candle_nn::linear(in_dim, out_dim, vb.clone())?;
    adapters(base, in_dim, out_dim, r, alpha, vb)
}

/// The same without a bias (as `candle_nn::linear_no_bias`).
pub fn lora_linear_no_bias(in_dim: usize, out_dim: usize, r: usize, alpha: f64, vb: VarBuilder) -> Result<LoraLinear> {
    let base = candle_nn::linear_no_bias(in_dim, out_dim, vb.clone())?;
    adapters(base, in_dim, out_dim, r, alpha, vb)
}

fn adapters(base: Linear, in_dim: usize, out_dim: usize, r: usize, alpha: f64, vb: VarBuilder) -> Result<LoraLinear> {
    if r == 0 {
        candle_core::bail!("a LoRA rank of 0: use r ≥ 1");
    }
    // PEFT's start: A Kaiming-uniform with a = √5 (U(±1/√in)), B zero, so the layer starts as its base.
    let bound = 1.0 / (in_dim as f64).sqrt();
    let a = vb.get_with_hints((r, in_dim), "lora_A.weight", Init::Uniform { lo: -bound, up: bound })?;
    let b = vb.get_with_hints((out_dim, r), "lora_B.weight", Init::Const(0.0))?;
    Ok(LoraLinear { base, a: Linear::new(a, None), b: Linear::new(b, None), scale: alpha / r as f64 })
}

impl Module for LoraLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // The base's output first, then the update, as PEFT adds it.
        self.base.forward(x)? + self.b.forward(&self.a.forward(x)?)?.affine(self.scale, 0.0)?
    }
}
