//! RMSNorm (Llama's `x · w / sqrt(mean(x²) + eps)`) as a fused op with its hand-written backward:
//! the forward keeps `1/rms` per row, the backward returns the input gradient with the residual
//! gradient added and the weight gradient. The CPU version computes in f64 and is the reference; the
//! CUDA version is the LayerNorm kernel of `fused_cuda.rs` with the mean and the bias left out.

use super::fused::{f64s, stat_dtype, tensor};
use candle_core::{DType, Result, Tensor};
#[cfg(feature = "cuda")]
use candle_core::Device;

/// A RMSNorm output with what its backward needs: `1/rms` per row (f64 on the CPU, f32 on CUDA).
pub struct RmsOut {
    pub y: Tensor,
    pub rstd: Tensor,
}

/// RMSNorm over the last dimension of `x` `[n, d]` with weight `w` `[d]`.
pub fn rms_forward(x: &Tensor, w: &Tensor, eps: f64) -> Result<RmsOut> {
    let (n, d) = x.dims2()?;
    #[cfg(feature = "cuda")]
    if let Device::Cuda(_) = x.device() {
        let out = super::fused_cuda::norm_forward(&x.contiguous()?, &w.contiguous()?, None, eps, n, d)?;
        return Ok(RmsOut { y: out.y, rstd: out.rstd });
    }
    let (xv, wv) = (f64s(x)?, f64s(w)?);
    let (mut y, mut rstd) = (vec![0.0; n * d], vec![0.0; n]);
    for r in 0..n {
        let row = &xv[r * d..(r + 1) * d];
        let rs = 1.0 / (row.iter().map(|v| v * v).sum::<f64>() / d as f64 + eps).sqrt();
        for j in 0..d {
            y[r * d + j] = row[j] * rs * wv[j];
        }
        rstd[r] = rs;
    }
    Ok(RmsOut { y: tensor(y, &[n, d], x.dtype())?, rstd: tensor(rstd, &[n], DType::F64)? })
}

/// RMSNorm backward: `(dx + residual, dw)` for the output gradient `dy` `[n, d]`.
pub fn rms_backward(dy: &Tensor, x: &Tensor, w: &Tensor, rstd: &Tensor, residual: Option<&Tensor>) -> Result<(Tensor, Tensor)> {
    let (n, d) = x.dims2()?;
    #[cfg(feature = "cuda")]
    if let Device::Cuda(_) = x.device() {
        let residual = residual.map(Tensor::contiguous).transpose()?;
        let zero_mean = Tensor::zeros(n, DType::F32, x.device())?;
        let (dx, dw, _) = super::fused_cuda::norm_backward(&dy.contiguous()?, &x.contiguous()?, &w.contiguous()?, &zero_mean, rstd, residual.as_ref(), true, n, d)?;
        return Ok((dx, dw));
    }
    let (g, xv, wv, rv) = (f64s(dy)?, f64s(x)?, f64s(w)?, f64s(rstd)?);
    let res = residual.map(f64s).transpose()?;
    let (mut dx, mut dw) = (vec![0.0; n * d], vec![0.0; d]);
    for r in 0..n {
        let xhat: Vec<f64> = (0..d).map(|j| xv[r * d + j] * rv[r]).collect();
        let gw: Vec<f64> = (0..d).map(|j| g[r * d + j] * wv[j]).collect();
        let c = gw.iter().zip(&xhat).map(|(g, h)| g * h).sum::<f64>() / d as f64;
        for j in 0..d {
            dx[r * d + j] = rv[r] * (gw[j] - xhat[j] * c) + res.as_ref().map_or(0.0, |v| v[r * d + j]);
            dw[j] += g[r * d + j] * xhat[j];
        }
    }
    Ok((tensor(dx, &[n, d], x.dtype())?, tensor(dw, &[d], stat_dtype(x.dtype()))?))
}

/// RMSNorm composed of candle ops (differentiable by autograd), computed in f32 for half-precision
/// input and cast back, as transformers' `LlamaRMSNorm` does.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let wide = if matches!(dtype, DType::BF16 | DType::F16) { x.to_dtype(DType::F32)? } else { x.clone() };
    let d = wide.dim(candle_core::D::Minus1)?;
    let ms = (wide.sqr()?.sum_keepdim(candle_core::D::Minus1)? / d as f64)?;
    let y = wide.broadcast_div(&(ms + eps)?.sqrt()?)?.to_dtype(dtype)?;
    y.broadcast_mul(w)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::fused::tests::{max_diff, randn};
    use candle_core::{Device, Var};

    #[test]
    fn rms_norm_matches_autograd_of_the_composed_op() {
        let (x, w) = (Var::from_tensor(&randn(&[6, 5], 11)).unwrap(), Var::from_tensor(&randn(&[5], 12)).unwrap());
        let (g, res) = (randn(&[6, 5], 13), randn(&[6, 5], 14));
        let composed = rms_norm(&x, &w, 1e-6).unwrap();
        let grads = (&composed * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let out = rms_forward(&x.detach(), &w.detach(), 1e-6).unwrap();
        assert!(max_diff(&out.y, &composed) < 1e-12);
        let (dx, dw) = rms_backward(&g, &x.detach(), &w.detach(), &out.rstd, Some(&res)).unwrap();
        assert!(max_diff(&dx, &(grads.get(&x).unwrap() + &res).unwrap()) < 1e-12);
        assert!(max_diff(&dw, grads.get(&w).unwrap()) < 1e-12);
    }

    #[test]
    fn rms_norm_backward_matches_finite_differences() {
        let (x, w, g) = (randn(&[3, 4], 15), randn(&[4], 16), randn(&[3, 4], 17));
        let out = rms_forward(&x, &w, 1e-5).unwrap();
        let (dx, _) = rms_backward(&g, &x, &w, &out.rstd, None).unwrap();
        let dx: Vec<f64> = dx.flatten_all().unwrap().to_vec1().unwrap();
        let xv: Vec<f64> = x.flatten_all().unwrap().to_vec1().unwrap();
        let objective = |v: &[f64]| {
            let y = rms_forward(&Tensor::from_slice(v, (3, 4), &Device::Cpu).unwrap(), &w, 1e-5).unwrap().y;
            (y * &g).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap()
        };
        for e in 0..xv.len() {
            let (mut p, mut m) = (xv.clone(), xv.clone());
            p[e] += 1e-6;
            m[e] -= 1e-6;
            let fd = (objective(&p) - objective(&m)) / 2e-6;
            assert!((fd - dx[e]).abs() < 1e-7 * (1.0 + fd.abs()), "x[{e}]: {} vs {fd}", dx[e]);
        }
    }
}
