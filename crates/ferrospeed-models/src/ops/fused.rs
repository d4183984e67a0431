//! Fused ops of the hand-written GPT backward: LayerNorm forward (keeping mean and 1/std) and backward
//! (input gradient with the residual gradient added, weight and bias gradients), bias + GELU(tanh)
//! forward and backward, and column sums (bias gradients). No autograd: the callers differentiate.
//!
//! The CPU versions compute in f64 and are the reference; the CUDA versions (`fused_cuda.rs`) compute
//! in f32. Per-row statistics are f64 on the CPU and f32 on CUDA; weight and bias gradients are f32
//! (f64 for f64 inputs). Column sums reduce in a fixed order on both devices (no atomics).

use candle_core::{DType, Device, Result, Tensor};

pub use super::causal_softmax::{causal_softmax_backward, causal_softmax_forward};
pub use super::cross_entropy::{cross_entropy_rows, cross_entropy_rows_backward};

/// LayerNorm epsilon (GPT-2's).
pub const LN_EPS: f64 = 1e-5;

/// A LayerNorm output with what its backward needs.
pub struct LnOut {
    pub y: Tensor,
    pub mean: Tensor,
    pub rstd: Tensor,
}

pub(crate) fn f64s(t: &Tensor) -> Result<Vec<f64>> {
    t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()
}

pub(crate) fn tensor(v: Vec<f64>, shape: &[usize], dtype: DType) -> Result<Tensor> {
    Tensor::from_vec(v, shape, &Device::Cpu)?.to_dtype(dtype)
}

/// The dtype of f32-or-better results (weight/bias gradients, statistics) for inputs of `dtype`.
pub(crate) fn stat_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// LayerNorm over the last dimension of `x` `[n, d]`.
pub fn ln_forward(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<LnOut> {
    let (n, d) = x.dims2()?;
    #[cfg(feature = "cuda")]
    if let Device::Cuda(_) = x.device() {
        return super::fused_cuda::ln_forward(&x.contiguous()?, &w.contiguous()?, &b.contiguous()?, n, d);
    }
    let (xv, wv, bv) = (f64s(x)?, f64s(w)?, f64s(b)?);
    let (mut y, mut mean, mut rstd) = (vec![0.0; n * d], vec![0.0; n], vec![0.0; n]);
    for r in 0..n {
        let row = &xv[r * d..(r + 1) * d];
        let m = row.iter().sum::<f64>() / d as f64;
        let var = row.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / d as f64;
        let rs = 1.0 / (var + LN_EPS).sqrt();
        for j in 0..d {
            y[r * d + j] = (row[j] - m) * rs * wv[j] + bv[j];
        }
        (mean[r], rstd[r]) = (m, rs);
    }
    Ok(LnOut { y: tensor(y, &[n, d], x.dtype())?, mean: tensor(mean, &[n], DType::F64)?, rstd: tensor(rstd, &[n], DType::F64)? })
}

/// LayerNorm backward: `(dx + residual, dw, db)` for the output gradient `dy` `[n, d]`.
pub fn ln_backward(dy: &Tensor, x: &Tensor, w: &Tensor, mean: &Tensor, rstd: &Tensor, residual: Option<&Tensor>) -> Result<(Tensor, Tensor, Tensor)> {
    let (n, d) = x.dims2()?;
    #[cfg(feature = "cuda")]
    if let Device::Cuda(_) = x.device() {
        let residual = residual.map(Tensor::contiguous).transpose()?;
        return super::fused_cuda::ln_backward(&dy.contiguous()?, &x.contiguous()?, &w.contiguous()?, mean, rstd, residual.as_ref(), n, d);
    }
    let (g, xv, wv, mv, rv) = (f64s(dy)?, f64s(x)?, f64s(w)?, f64s(mean)?, f64s(rstd)?);
    let res = residual.map(f64s).transpose()?;
    let (mut dx, mut dw, mut db) = (vec![0.0; n * d], vec![0.0; d], vec![0.0; d]);
    for r in 0..n {
        let xhat: Vec<f64> = (0..d).map(|j| (xv[r * d + j] - mv[r]) * rv[r]).collect();
        let gw: Vec<f64> = (0..d).map(|j| g[r * d + j] * wv[j]).collect();
        let a = gw.iter().sum::<f64>() / d as f64;
        let c = gw.iter().zip(&xhat).map(|(g, h)| g * h).sum::<f64>() / d as f64;
        for j in 0..d {
            dx[r * d + j] = rv[r] * (gw[j] - a - xhat[j] * c) + res.as_ref().map_or(0.0, |v| v[r * d + j]);
            dw[j] += g[r * d + j] * xhat[j];
            db[j] += g[r * d + j];
        }
    }
    let sd = stat_dtype(x.dtype());
    Ok((tensor(dx, &[n, d], x.dtype())?, tensor(dw, &[d], sd)?, tensor(db, &[d], sd)?))
}

/// `0.5·u·(1 + tanh(√(2/π)·(u + 0.044715·u³)))` and its derivative.
fn gelu(u: f64) -> (f64, f64) {
    let c = (2.0 / std::f64::consts::PI).sqrt();
    let t = (c * (u + 0.044715 * u * u * u)).tanh();
    (0.5 * u * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * u * (1.0 - t * t) * c * (1.0 + 3.0 * 0.044715 * u * u))
}

/// `gelu(h + b)` for `h` `[n, k]` and the bias `b` `[k]`.
pub fn bias_gelu(h: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (n, k) = h.dims2()?;
    #[cfg(feature = "cuda")]
    if let Device::Cuda(_) = h.device() {
        return super::fused_cuda::bias_op(super::fused_cuda::BiasOp::Gelu, &h.contiguous()?, &b.contiguous()?, None, n, k);
    }
    let (hv, bv) = (f64s(h)?, f64s(b)?);
    let y = hv.iter().enumerate().map(|(i, v)| gelu(v + bv[i % k]).0).collect();
    tensor(y, &[n, k], h.dtype())
}

/// The gradient of `gelu(h + b)` with respect to `h` for the output gradient `dy`.
pub fn bias_gelu_backward(dy: &Tensor, h: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (n, k) = h.dims2()?;
    #[cfg(feature = "cuda")]
    if let Device::Cuda(_) = h.device() {
        return super::fused_cuda::bias_op(super::fused_cuda::BiasOp::GeluBackward, &h.contiguous()?, &b.contiguous()?, Some(&dy.contiguous()?), n, k);
    }
    let (g, hv, bv) = (f64s(dy)?, f64s(h)?, f64s(b)?);
    let dx = hv.iter().enumerate().map(|(i, v)| g[i] * gelu(v + bv[i % k]).1).collect();
    tensor(dx, &[n, k], h.dtype())
}

/// `h + b` for `h` `[n, k]` and the bias `b` `[k]` (one pass on CUDA; candle's broadcast add elsewhere).
pub fn bias_add(h: &Tensor, b: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(_) = h.device() {
        let (n, k) = h.dims2()?;
        return super::fused_cuda::bias_op(super::fused_cuda::BiasOp::Add, &h.contiguous()?, &b.contiguous()?, None, n, k);
    }
    h.broadcast_add(b)
}

/// `x + h + b`: a residual `x` plus a projection `h` `[n, k]` with its bias `b` `[k]`.
pub fn bias_residual(x: &Tensor, h: &Tensor, b: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(_) = h.device() {
        let (n, k) = h.dims2()?;
        return super::fused_cuda::bias_op(super::fused_cuda::BiasOp::AddResidual, &h.contiguous()?, &b.contiguous()?, Some(&x.contiguous()?), n, k);
    }
    x + h.broadcast_add(b)?
}

/// The token table's gradient `[vocab, d]`: the rows of `g` `[n, d]` added up per token (`tokens`, `n`
/// ids), in f32 (f64 for f64). On CUDA `host_tokens` (the same ids, on the host) lets one kernel sum each
/// token's rows in position order: repeatable bit for bit, unlike scattered atomic adds.
pub fn embedding_grad(g: &Tensor, tokens: &Tensor, host_tokens: Option<&[u32]>, vocab: usize) -> Result<Tensor> {
    let d = g.dim(1)?;
    #[cfg(feature = "cuda")]
    if let (Device::Cuda(_), Some(host), false) = (g.device(), host_tokens, g.dtype() == DType::F64) {
        return super::fused_cuda::embedding_grad(&g.contiguous()?, host, vocab);
    }
    let _ = host_tokens;
    let acc = stat_dtype(g.dtype());
    Tensor::zeros((vocab, d), acc, g.device())?.index_add(&tokens.flatten_all()?, &g.to_dtype(acc)?, 0)
}

/// Column sums of `x` `[n, k]` (bias gradients), in f32 (f64 for f64 input).
pub fn col_sum(x: &Tensor) -> Result<Tensor> {
    let (n, k) = x.dims2()?;
    #[cfg(feature = "cuda")]
    if let Device::Cuda(_) = x.device() {
        return super::fused_cuda::col_sum(&x.contiguous()?, n, k);
    }
    let v = f64s(x)?;
    let mut s = vec![0.0; k];
    for r in 0..n {
        s.iter_mut().zip(&v[r * k..(r + 1) * k]).for_each(|(a, b)| *a += b);
    }
    tensor(s, &[k], stat_dtype(x.dtype()))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::ops::composed::layer_norm;
    use candle_core::Var;

    /// Standard normal f64 values from `seed` (test inputs).
    pub(crate) fn randn(shape: &[usize], seed: u64) -> Tensor {
        let mut rng = ferrospeed::rng::Rng::new(seed);
        let v: Vec<f64> = (0..shape.iter().product()).map(|_| rng.normal()).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// Largest absolute difference (f64 tensors).
    pub(crate) fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap()
    }

    #[test]
    fn layer_norm_matches_autograd_of_the_composed_op() {
        let (x, w, b) = (Var::from_tensor(&randn(&[6, 5], 1)).unwrap(), Var::from_tensor(&randn(&[5], 2)).unwrap(), Var::from_tensor(&randn(&[5], 3)).unwrap());
        let (g, res) = (randn(&[6, 5], 4), randn(&[6, 5], 5));
        let composed = layer_norm(&x, &w, &b).unwrap();
        let grads = (&composed * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let out = ln_forward(&x.detach(), &w.detach(), &b.detach()).unwrap();
        assert!(max_diff(&out.y, &composed) < 1e-12);
        let (dx, dw, db) = ln_backward(&g, &x.detach(), &w.detach(), &out.mean, &out.rstd, Some(&res)).unwrap();
        assert!(max_diff(&dx, &(grads.get(&x).unwrap() + &res).unwrap()) < 1e-12);
        assert!(max_diff(&dw, grads.get(&w).unwrap()) < 1e-12);
        assert!(max_diff(&db, grads.get(&b).unwrap()) < 1e-12);
    }

    #[test]
    fn bias_gelu_matches_the_composed_op_and_finite_differences() {
        let (h, b, g) = (randn(&[4, 7], 6), randn(&[7], 7), randn(&[4, 7], 8));
        let composed = h.broadcast_add(&b).unwrap().gelu().unwrap();
        assert!(max_diff(&bias_gelu(&h, &b).unwrap(), &composed) < 1e-12);
        // candle's own GELU backward rounds its constants to six digits: check ours against central
        // differences of the forward instead.
        let eps = 1e-6;
        let f = |shift: f64| bias_gelu(&h.affine(1.0, shift).unwrap(), &b).unwrap();
        let numeric = ((f(eps) - f(-eps)).unwrap().affine(0.5 / eps, 0.0).unwrap() * &g).unwrap();
        assert!(max_diff(&bias_gelu_backward(&g, &h, &b).unwrap(), &numeric) < 1e-8);
    }

    #[test]
    fn column_sums() {
        let x = randn(&[9, 3], 9);
        assert!(max_diff(&col_sum(&x).unwrap(), &x.sum(0).unwrap()) < 1e-12);
    }
}
