//! Grouped matrix products, the experts' matmuls: rows in consecutive runs, each run multiplied by a
//! weight of its own (`grouped_matmul`: `x_i·w_iᵀ` or `x_i·w_i`), and each run's weight gradient
//! (`grouped_weight_grad`: `a_iᵀ·b_i`). On CUDA one cuBLAS grouped GEMM (`grouped_cuda.rs`) runs every
//! run at once; elsewhere a candle matmul per run, which is the reference the GPU tests compare with.

#[cfg(feature = "cuda")]
use candle_core::Device;
use candle_core::{Result, Tensor};

/// How a run's rows meet its weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// `x·wᵀ`, `w` `[n, k]` (a linear layer's weight).
    Transposed,
    /// `x·w`, `w` `[k, n]`.
    Plain,
}

fn out_width(w: &Tensor, form: Form) -> Result<usize> {
    let (a, b) = w.dims2()?;
    Ok(if form == Form::Transposed { a } else { b })
}

/// `x` `[R, k]` in runs of `lens` rows (in order, summing to `R`), run `i` multiplied by `weights[i]`:
/// `[R, n]`.
pub fn grouped_matmul(x: &Tensor, weights: &[Tensor], lens: &[usize], form: Form) -> Result<Tensor> {
    check(x, lens, weights.len())?;
    #[cfg(feature = "cuda")]
    if let Device::Cuda(_) = x.device() {
        return super::grouped_cuda::matmul(&x.contiguous()?, weights, lens, form);
    }
    grouped_matmul_reference(x, weights, lens, form)
}

/// [`grouped_matmul`] as one candle matmul per run.
pub fn grouped_matmul_reference(x: &Tensor, weights: &[Tensor], lens: &[usize], form: Form) -> Result<Tensor> {
    check(x, lens, weights.len())?;
    let n = match weights.first() {
        Some(w) => out_width(w, form)?,
        None => 0,
    };
    let mut outs = Vec::new();
    let mut at = 0;
    for (w, &len) in weights.iter().zip(lens) {
        if len > 0 {
            let xr = x.narrow(0, at, len)?;
            outs.push(match form {
                Form::Transposed => xr.matmul(&w.t()?)?,
                Form::Plain => xr.matmul(w)?,
            });
        }
        at += len;
    }
    if outs.is_empty() {
        return Tensor::zeros((0, n), x.dtype(), x.device());
    }
    Tensor::cat(&outs, 0)
}

/// For each run of `lens` rows of `a` `[R, p]` and `b` `[R, q]`: `a_iᵀ·b_i` `[p, q]` (`None` for an
/// empty run).
pub fn grouped_weight_grad(a: &Tensor, b: &Tensor, lens: &[usize]) -> Result<Vec<Option<Tensor>>> {
    check(a, lens, lens.len())?;
    check(b, lens, lens.len())?;
    #[cfg(feature = "cuda")]
    if let Device::Cuda(_) = a.device() {
        return super::grouped_cuda::weight_grad(&a.contiguous()?, &b.contiguous()?, lens);
    }
    grouped_weight_grad_reference(a, b, lens)
}

/// [`grouped_weight_grad`] as one candle matmul per run.
pub fn grouped_weight_grad_reference(a: &Tensor, b: &Tensor, lens: &[usize]) -> Result<Vec<Option<Tensor>>> {
    let mut at = 0;
    let mut out = Vec::with_capacity(lens.len());
    for &len in lens {
        out.push(if len > 0 { Some(a.narrow(0, at, len)?.t()?.matmul(&b.narrow(0, at, len)?)?) } else { None });
        at += len;
    }
    Ok(out)
}

fn check(x: &Tensor, lens: &[usize], groups: usize) -> Result<()> {
    let rows = x.dim(0)?;
    if lens.len() != groups || lens.iter().sum::<usize>() != rows {
        candle_core::bail!("grouped product: {} runs of {} rows in all for {groups} weights and {rows} rows", lens.len(), lens.iter().sum::<usize>());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn runs_meet_their_own_weights() {
        let dev = Device::Cpu;
        let x = Tensor::arange(0f32, 24.0, &dev).unwrap().reshape((6, 4)).unwrap();
        let w: Vec<Tensor> = (0..3).map(|i| Tensor::arange(i as f32, i as f32 + 8.0, &dev).unwrap().reshape((2, 4)).unwrap()).collect();
        let lens = [2, 0, 4];
        let y = grouped_matmul(&x, &w, &lens, Form::Transposed).unwrap();
        assert_eq!(y.dims(), &[6, 2]);
        let want = Tensor::cat(&[x.narrow(0, 0, 2).unwrap().matmul(&w[0].t().unwrap()).unwrap(), x.narrow(0, 2, 4).unwrap().matmul(&w[2].t().unwrap()).unwrap()], 0).unwrap();
        assert_eq!(y.to_vec2::<f32>().unwrap(), want.to_vec2::<f32>().unwrap());
        let g = grouped_weight_grad(&x, &y, &lens).unwrap();
        assert!(g[1].is_none());
        assert_eq!(g[2].as_ref().unwrap().to_vec2::<f32>().unwrap(), x.narrow(0, 2, 4).unwrap().t().unwrap().matmul(&y.narrow(0, 2, 4).unwrap()).unwrap().to_vec2::<f32>().unwrap());
        assert!(grouped_matmul(&x, &w, &[2, 2], Form::Plain).is_err());
    }
}
