//! SwiGLU, the Llama MLP's activation: `silu(gate) · up` over the gate and up projections computed by
//! one matmul (`gu` `[n, 2f]`, gate columns first), and its backward (`[n, 2f]` again). The CPU version
//! computes in f64 and is the reference; CUDA runs one elementwise kernel each way (`llama_cuda.rs`).

use super::fused::{f64s, tensor};
use candle_core::{Result, Tensor};
#[cfg(feature = "cuda")]
use candle_core::Device;

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// `silu(gu[:, :f]) · gu[:, f:]` `[n, f]`.
pub fn swiglu(gu: &Tensor) -> Result<Tensor> {
    let (n, f2) = gu.dims2()?;
    let f = f2 / 2;
    #[cfg(feature = "cuda")]
    if let Device::Cuda(_) = gu.device() {
        return super::llama_cuda::swiglu(&gu.contiguous()?, None, n, f);
    }
    let v = f64s(gu)?;
    let mut y = vec![0.0; n * f];
    for r in 0..n {
        for j in 0..f {
            let (g, u) = (v[r * f2 + j], v[r * f2 + f + j]);
            y[r * f + j] = g * sigmoid(g) * u;
        }
    }
    tensor(y, &[n, f], gu.dtype())
}

/// The gradient `[n, 2f]` of [`swiglu`] with respect to `gu` for the output gradient `dy` `[n, f]`.
pub fn swiglu_backward(gu: &Tensor, dy: &Tensor) -> Result<Tensor> {
    let (n, f2) = gu.dims2()?;
    let f = f2 / 2;
    #[cfg(feature = "cuda")]
    if let Device::Cuda(_) = gu.device() {
        return super::llama_cuda::swiglu(&gu.contiguous()?, Some(&dy.contiguous()?), n, f);
    }
    let (v, g) = (f64s(gu)?, f64s(dy)?);
    let mut d = vec![0.0; n * f2];
    for r in 0..n {
        for j in 0..f {
            let (x, u, gy) = (v[r * f2 + j], v[r * f2 + f + j], g[r * f + j]);
            let s = sigmoid(x);
            d[r * f2 + j] = gy * u * s * (1.0 + x * (1.0 - s));
            d[r * f2 + f + j] = gy * x * s;
        }
    }
    tensor(d, &[n, f2], gu.dtype())
}

/// SwiGLU composed of candle ops (differentiable by autograd).
pub fn swiglu_composed(gu: &Tensor) -> Result<Tensor> {
    let f = gu.dim(1)? / 2;
    candle_core::Tensor::silu(&gu.narrow(1, 0, f)?)?.mul(&gu.narrow(1, f, f)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::fused::tests::{max_diff, randn};
    use candle_core::Var;

    #[test]
    fn swiglu_matches_autograd_of_the_composed_op() {
        let gu = Var::from_tensor(&randn(&[4, 6], 21)).unwrap();
        let g = randn(&[4, 3], 22);
        let composed = swiglu_composed(&gu).unwrap();
        assert!(max_diff(&swiglu(&gu.detach()).unwrap(), &composed) < 1e-12);
        let grads = (&composed * &g).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(max_diff(&swiglu_backward(&gu.detach(), &g).unwrap(), grads.get(&gu).unwrap()) < 1e-12);
    }
}
