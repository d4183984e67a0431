//! The differentiable pieces the model families need, composed from candle-core ops (so autograd covers them):
//! layer norm, causal softmax attention scores, cross-entropy.
//!
//! With bf16/f16 compute, these reductions run in f32 and cast back (as PyTorch's autocast does):
//! sums of many half-precision terms lose too much.

use candle_core::{DType, Device, Result, Tensor, D};

/// `x` in f32 when it is a half type (the result's dtype is then restored by the caller).
fn widen(x: &Tensor) -> Result<Tensor> {
    match x.dtype() {
        DType::BF16 | DType::F16 => x.to_dtype(DType::F32),
        _ => Ok(x.clone()),
    }
}

/// LayerNorm over the last dimension with weight and bias, epsilon 1e-5 (GPT-2's).
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let dtype = x.dtype();
    let (x, weight, bias) = (widen(x)?, widen(weight)?, widen(bias)?);
    let mean = x.mean_keepdim(D::Minus1)?;
    let centered = x.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centered.broadcast_div(&(var + 1e-5)?.sqrt()?)?;
    normed.broadcast_mul(&weight)?.broadcast_add(&bias)?.to_dtype(dtype)
}

/// Softmax over the last dimension. The max is detached: softmax does not depend on the shift, so its
/// gradient through the max is zero anyway.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = widen(x)?;
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?.to_dtype(dtype)
}

/// `[t, t]` additive mask: 0 on and below the diagonal, −∞ above (no attending to the future).
pub fn causal_mask(t: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..t).flat_map(|i| (0..t).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 })).collect();
    Tensor::from_vec(mask, (t, t), device)?.to_dtype(dtype)
}

/// Mean cross-entropy of `logits` `[n, vocab]` against `targets` `[n]` (u32).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let logits = widen(logits)?;
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let log_sum = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let log_probs = shifted.broadcast_sub(&log_sum)?;
    let picked = log_probs.gather(&targets.unsqueeze(1)?, 1)?;
    picked.mean_all()?.neg()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cross_entropy_of_uniform_logits_is_log_vocab() {
        let logits = Tensor::zeros((3, 8), DType::F64, &Device::Cpu).unwrap();
        let targets = Tensor::new(&[1u32, 5, 7], &Device::Cpu).unwrap();
        let ce = cross_entropy(&logits, &targets).unwrap().to_scalar::<f64>().unwrap();
        assert!((ce - 8f64.ln()).abs() < 1e-12);
    }

    #[test]
    fn softmax_rows_sum_to_one_and_mask_hides_the_future() {
        let x = Tensor::new(&[[1.0f64, 2.0, 3.0], [0.5, 0.5, 9.0], [-1.0, 0.0, 1.0]], &Device::Cpu).unwrap();
        let masked = x.broadcast_add(&causal_mask(3, DType::F64, &Device::Cpu).unwrap()).unwrap();
        let s = softmax_last_dim(&masked).unwrap().to_vec2::<f64>().unwrap();
        assert_eq!(s[0], vec![1.0, 0.0, 0.0]);
        assert_eq!(s[1][2], 0.0);
        for row in s {
            assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        }
    }

    #[test]
    fn layer_norm_normalises() {
        let x = Tensor::new(&[[1.0f64, 2.0, 3.0, 6.0]], &Device::Cpu).unwrap();
        let w = Tensor::ones(4, DType::F64, &Device::Cpu).unwrap();
        let b = Tensor::zeros(4, DType::F64, &Device::Cpu).unwrap();
        let y = layer_norm(&x, &w, &b).unwrap().to_vec2::<f64>().unwrap();
        let mean: f64 = y[0].iter().sum::<f64>() / 4.0;
        let var: f64 = y[0].iter().map(|v| (v - mean).powi(2)).sum::<f64>() / 4.0;
        assert!(mean.abs() < 1e-12 && (var - 1.0).abs() < 1e-4);
    }
}
