//! Fused cross-entropy for the head: per-row `logsumexp(x) − x[target]` in one pass with f32 (f64 for
//! f64 inputs) arithmetic, and its backward `(softmax(x) − onehot(target)) · g` in one pass. Composed
//! from candle ops it takes about eight f32 passes over the `[tokens, vocab]` logits, which made the
//! head the largest block of a GPU step (bench/results/gpu-*.md).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, WithDType};

/// Mean cross-entropy of `logits` `[n, vocab]` against `targets` `[n]` (u32), as an f32 scalar (f64
/// for f64 logits).
pub fn fused_cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    cross_entropy_rows_autograd(logits, targets)?.mean_all()
}

/// Per-row losses `[n]` with autograd (for the composed forward and its masked mean).
pub fn cross_entropy_rows_autograd(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    logits.contiguous()?.apply_op2(&targets.contiguous()?, CrossEntropyRows)
}

/// Per-row losses `[n]` without autograd (f32; f64 for f64 logits), for hand-written backward passes.
pub fn cross_entropy_rows(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    logits.contiguous()?.apply_op2_no_bwd(&targets.contiguous()?, &CrossEntropyRows)
}

/// The gradient of `Σ row_grads[i] · loss[i]` with respect to the logits (in their dtype).
pub fn cross_entropy_rows_backward(logits: &Tensor, targets: &Tensor, row_grads: &Tensor) -> Result<Tensor> {
    logits.contiguous()?.apply_op3_no_bwd(&targets.contiguous()?, &row_grads.contiguous()?, &CrossEntropyRowsBackward)
}

struct CrossEntropyRows;
struct CrossEntropyRowsBackward;

fn shape_of(logits: &Layout, targets: &Layout) -> Result<(usize, usize, usize, usize)> {
    let (Some((ls, _)), Some((ts, _))) = (logits.contiguous_offsets(), targets.contiguous_offsets()) else {
        candle_core::bail!("cross entropy: inputs must be contiguous")
    };
    let (n, v) = logits.shape().dims2()?;
    if targets.shape().elem_count() != n {
        candle_core::bail!("cross entropy: {n} rows of logits but {} targets", targets.shape().elem_count())
    }
    Ok((ls, ts, n, v))
}

fn row_stats<T: WithDType>(x: &[T]) -> (f64, f64) {
    let max = x.iter().map(|v| v.to_f64()).fold(f64::NEG_INFINITY, f64::max);
    let sum: f64 = x.iter().map(|v| (v.to_f64() - max).exp()).sum();
    (max, sum)
}

fn losses<T: WithDType>(x: &[T], t: &[u32], v: usize) -> Result<Vec<f64>> {
    x.chunks(v)
        .zip(t)
        .map(|(row, &target)| {
            let target = target as usize;
            if target >= v {
                candle_core::bail!("cross entropy: target {target} is outside the vocabulary of {v}")
            }
            let (max, sum) = row_stats(row);
            Ok(sum.ln() + max - row[target].to_f64())
        })
        .collect()
}

fn grads<T: WithDType>(x: &[T], t: &[u32], g: &[f64], v: usize) -> Vec<T> {
    let mut out = vec![T::zero(); x.len()];
    for ((row, o), (&target, &g)) in x.chunks(v).zip(out.chunks_mut(v)).zip(t.iter().zip(g)) {
        let (max, sum) = row_stats(row);
        for (j, (xv, ov)) in row.iter().zip(o.iter_mut()).enumerate() {
            let p = (xv.to_f64() - max).exp() / sum;
            *ov = T::from_f64((p - if j == target as usize { 1.0 } else { 0.0 }) * g);
        }
    }
    out
}

fn targets_of(s: &CpuStorage, start: usize, n: usize) -> Result<&[u32]> {
    match s {
        CpuStorage::U32(t) => Ok(&t[start..start + n]),
        _ => candle_core::bail!("cross entropy: targets must be u32"),
    }
}

impl CustomOp2 for CrossEntropyRows {
    fn name(&self) -> &'static str {
        "cross-entropy-rows"
    }

    fn cpu_fwd(&self, x: &CpuStorage, xl: &Layout, t: &CpuStorage, tl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (xs, ts, n, v) = shape_of(xl, tl)?;
        let t = targets_of(t, ts, n)?;
        let out = match x {
            CpuStorage::F64(x) => CpuStorage::F64(losses(&x[xs..xs + n * v], t, v)?),
            CpuStorage::F32(x) => CpuStorage::F32(losses(&x[xs..xs + n * v], t, v)?.into_iter().map(|l| l as f32).collect()),
            CpuStorage::BF16(x) => CpuStorage::F32(losses(&x[xs..xs + n * v], t, v)?.into_iter().map(|l| l as f32).collect()),
            CpuStorage::F16(x) => CpuStorage::F32(losses(&x[xs..xs + n * v], t, v)?.into_iter().map(|l| l as f32).collect()),
            other => candle_core::bail!("cross entropy: unsupported dtype {:?}", other.dtype()),
        };
        Ok((out, Shape::from(n)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        t: &candle_core::CudaStorage,
        tl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (xs, ts, n, v) = shape_of(xl, tl)?;
        Ok((cuda::forward(x, xs, t, ts, n, v)?, Shape::from(n)))
    }

    fn bwd(&self, x: &Tensor, t: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(x.apply_op3_no_bwd(t, &grad.contiguous()?, &CrossEntropyRowsBackward)?), None))
    }
}

impl CustomOp3 for CrossEntropyRowsBackward {
    fn name(&self) -> &'static str {
        "cross-entropy-rows-backward"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        t: &CpuStorage,
        tl: &Layout,
        g: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (xs, ts, n, v) = shape_of(xl, tl)?;
        let t = targets_of(t, ts, n)?;
        let gs = gl.start_offset();
        let g: Vec<f64> = match g {
            CpuStorage::F64(g) => g[gs..gs + n].to_vec(),
            CpuStorage::F32(g) => g[gs..gs + n].iter().map(|&v| f64::from(v)).collect(),
            other => candle_core::bail!("cross entropy backward: gradient dtype {:?}", other.dtype()),
        };
        let out = match x {
            CpuStorage::F64(x) => CpuStorage::F64(grads(&x[xs..xs + n * v], t, &g, v)),
            CpuStorage::F32(x) => CpuStorage::F32(grads(&x[xs..xs + n * v], t, &g, v)),
            CpuStorage::BF16(x) => CpuStorage::BF16(grads(&x[xs..xs + n * v], t, &g, v)),
            CpuStorage::F16(x) => CpuStorage::F16(grads(&x[xs..xs + n * v], t, &g, v)),
            other => candle_core::bail!("cross entropy: unsupported dtype {:?}", other.dtype()),
        };
        Ok((out, xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        t: &candle_core::CudaStorage,
        tl: &Layout,
        g: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (xs, ts, n, v) = shape_of(xl, tl)?;
        Ok((cuda::backward(x, xs, t, ts, g, gl.start_offset(), n, v)?, xl.shape().clone()))
    }
}


#[cfg(feature = "cuda")]
mod cuda {
    //! One thread block per row, f32 arithmetic (helpers in `cuda_kernels.rs`).
    use candle_core::backend::BackendStorage;
    use candle_core::cuda::cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg};
    use super::super::cuda_kernels::{compile, launch_err, suffix};
    use candle_core::cuda::CudaDType;
    use candle_core::{CudaStorage, DType, Result};
    use half::{bf16, f16};
    use std::sync::OnceLock;

    const SRC: &str = r#"
// One pass for the row's max and sum of exponentials (online: the sum is rescaled when the max grows),
// combined across the block by rescaling each thread's sum to the block's max.
__device__ float row_logsumexp(float m, float s, float* red, float* mout) {
  float mb = block_max(m, red); float sb = block_sum(m == NEG_INF ? 0.f : s * expf(m - mb), red);
  *mout = mb; return sb; }
// A −∞ logit adds nothing (and would be −∞ − −∞ = NaN while the max is still −∞); a NaN one propagates.
#define ONLINE(v) { float x_ = (v); if (x_ > m) { s = s * expf(m - x_) + 1.f; m = x_; } else if (x_ != NEG_INF) s += expf(x_ - m); }
#define KERNELS(NAME, T, LD, ST) \
extern "C" __global__ void ce_fwd_##NAME(const T* x, const unsigned int* tgt, float* loss, int v) { \
  __shared__ float red[33]; long row = blockIdx.x; const T* xr = x + row * v; float m = NEG_INF, s = 0.f; \
  for (int j = threadIdx.x; j < v; j += blockDim.x) ONLINE(LD(xr[j])) \
  s = row_logsumexp(m, s, red, &m); \
  if (threadIdx.x == 0) loss[row] = logf(s) + m - LD(xr[tgt[row]]); } \
extern "C" __global__ void ce_bwd_##NAME(const T* x, const unsigned int* tgt, const float* g, T* dx, int v) { \
  __shared__ float red[33]; long row = blockIdx.x; const T* xr = x + row * v; T* dr = dx + row * v; float m = NEG_INF, s = 0.f; \
  for (int j = threadIdx.x; j < v; j += blockDim.x) ONLINE(LD(xr[j])) \
  s = row_logsumexp(m, s, red, &m); float inv = 1.f / s, gr = g[row]; unsigned int t = tgt[row]; \
  for (int j = threadIdx.x; j < v; j += blockDim.x) dr[j] = ST((expf(LD(xr[j]) - m) * inv - (j == (int)t ? 1.f : 0.f)) * gr); }
KERNELS(f32, float, ld_f32, st_f32)
KERNELS(bf16, unsigned short, ld_bf16, st_bf16)
KERNELS(f16, unsigned short, ld_f16, st_f16)
"#;

    fn ptx() -> Result<&'static str> {
        static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
        compile(&PTX, SRC, "cross-entropy")
    }

    fn config(rows: usize) -> LaunchConfig {
        LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
    }

    fn run_fwd<T: CudaDType + DeviceRepr>(x: &CudaStorage, xs: usize, t: &CudaStorage, ts: usize, n: usize, v: usize) -> Result<CudaStorage> {
        let dev = x.device().clone();
        let xv = x.as_cuda_slice::<T>()?.slice(xs..xs + n * v);
        let tv = t.as_cuda_slice::<u32>()?.slice(ts..ts + n);
        let loss: CudaSlice<f32> = unsafe { dev.alloc::<f32>(n)? };
        let func = dev.get_or_load_custom_func(&format!("ce_fwd_{}", suffix(x.dtype(), "cross-entropy")?), "ferrospeed_cross_entropy", ptx()?)?;
        let v_i = v as i32;
        let mut b = func.builder();
        b.arg(&xv).arg(&tv).arg(&loss).arg(&v_i);
        unsafe { b.launch(config(n)) }.map_err(launch_err)?;
        Ok(CudaStorage::wrap_cuda_slice(loss, dev))
    }

    pub fn forward(x: &CudaStorage, xs: usize, t: &CudaStorage, ts: usize, n: usize, v: usize) -> Result<CudaStorage> {
        match x.dtype() {
            DType::F32 => run_fwd::<f32>(x, xs, t, ts, n, v),
            DType::BF16 => run_fwd::<bf16>(x, xs, t, ts, n, v),
            DType::F16 => run_fwd::<f16>(x, xs, t, ts, n, v),
            other => candle_core::bail!("cross entropy on CUDA: unsupported dtype {other:?}"),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn run_bwd<T: CudaDType + DeviceRepr>(
        x: &CudaStorage,
        xs: usize,
        t: &CudaStorage,
        ts: usize,
        g: &CudaStorage,
        gs: usize,
        n: usize,
        v: usize,
    ) -> Result<CudaStorage> {
        let dev = x.device().clone();
        let xv = x.as_cuda_slice::<T>()?.slice(xs..xs + n * v);
        let tv = t.as_cuda_slice::<u32>()?.slice(ts..ts + n);
        let gv = g.as_cuda_slice::<f32>()?.slice(gs..gs + n);
        let dx: CudaSlice<T> = unsafe { dev.alloc::<T>(n * v)? };
        let func = dev.get_or_load_custom_func(&format!("ce_bwd_{}", suffix(x.dtype(), "cross-entropy")?), "ferrospeed_cross_entropy", ptx()?)?;
        let v_i = v as i32;
        let mut b = func.builder();
        b.arg(&xv).arg(&tv).arg(&gv).arg(&dx).arg(&v_i);
        unsafe { b.launch(config(n)) }.map_err(launch_err)?;
        Ok(CudaStorage::wrap_cuda_slice(dx, dev))
    }

    #[allow(clippy::too_many_arguments)]
    pub fn backward(x: &CudaStorage, xs: usize, t: &CudaStorage, ts: usize, g: &CudaStorage, gs: usize, n: usize, v: usize) -> Result<CudaStorage> {
        match x.dtype() {
            DType::F32 => run_bwd::<f32>(x, xs, t, ts, g, gs, n, v),
            DType::BF16 => run_bwd::<bf16>(x, xs, t, ts, g, gs, n, v),
            DType::F16 => run_bwd::<f16>(x, xs, t, ts, g, gs, n, v),
            other => candle_core::bail!("cross entropy on CUDA: unsupported dtype {other:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::composed::cross_entropy;
    use candle_core::{DType, Device, Var};
    use ferrospeed::rng::Rng;

    #[test]
    fn matches_the_composed_reference_forward_and_backward() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f64, 2.0, (6, 11), &dev).unwrap()).unwrap();
        let t = Tensor::new(&[0u32, 10, 3, 3, 7, 1], &dev).unwrap();
        let fused = fused_cross_entropy(x.as_tensor(), &t).unwrap();
        let reference = cross_entropy(x.as_tensor(), &t).unwrap();
        let (a, b) = (fused.to_scalar::<f64>().unwrap(), reference.to_scalar::<f64>().unwrap());
        assert!((a - b).abs() < 1e-12, "{a} vs {b}");
        let ga = fused.backward().unwrap();
        let gb = reference.backward().unwrap();
        let d = (ga.get(x.as_tensor()).unwrap() - gb.get(x.as_tensor()).unwrap()).unwrap();
        let diff = d.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
        assert!(diff < 1e-12, "backward differs by {diff}");
        assert!(fused_cross_entropy(x.as_tensor(), &Tensor::new(&[0u32, 11, 0, 0, 0, 0], &dev).unwrap()).is_err());
    }

    #[test]
    fn negative_infinite_logits_add_nothing_and_get_a_zero_gradient() {
        // Masked vocabulary entries (logit −∞): the loss is that of the finite entries alone, and the
        // masked ones get exactly no gradient.
        let (dev, n, v) = (Device::Cpu, 6, 17);
        let mut rng = Rng::new(5);
        let targets: Vec<u32> = (0..n).map(|_| rng.below(v as u64) as u32).collect();
        let mut x: Vec<f64> = (0..n * v).map(|_| 2.0 * rng.normal()).collect();
        for (r, row) in x.chunks_mut(v).enumerate() {
            // Row 0 masks its first entry only (a running max would start at −∞ there); the others a
            // random third of their entries and always the last, never the target.
            for (j, xv) in row.iter_mut().enumerate() {
                let masked = if r == 0 { j == 0 } else { j == v - 1 || rng.below(3) == 0 };
                if masked && j != targets[r] as usize {
                    *xv = f64::NEG_INFINITY;
                }
            }
        }
        assert!(x.chunks(v).all(|row| row.contains(&f64::NEG_INFINITY)), "every row has a masked entry");
        let row_grads: Vec<f64> = (0..n).map(|_| rng.normal()).collect();
        let t = Tensor::from_vec(targets.clone(), n, &dev).unwrap();
        for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-6)] {
            let xt = Tensor::from_vec(x.clone(), (n, v), &dev).unwrap().to_dtype(dtype).unwrap();
            let g = Tensor::from_vec(row_grads.clone(), n, &dev).unwrap().to_dtype(dtype).unwrap();
            let loss: Vec<f64> = cross_entropy_rows(&xt, &t).unwrap().to_dtype(DType::F64).unwrap().to_vec1().unwrap();
            let dx: Vec<f64> = cross_entropy_rows_backward(&xt, &t, &g).unwrap().to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            // The reference in f64 on the values the op sees, over the finite entries only.
            let seen: Vec<f64> = xt.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            for (r, row) in seen.chunks(v).enumerate() {
                let finite: Vec<f64> = row.iter().copied().filter(|xv| xv.is_finite()).collect();
                let max = finite.iter().copied().fold(f64::MIN, f64::max);
                let sum: f64 = finite.iter().map(|xv| (xv - max).exp()).sum();
                let want = max + sum.ln() - row[targets[r] as usize];
                assert!(loss[r].is_finite() && (loss[r] - want).abs() <= tol * want.abs().max(1.0), "{dtype:?} row {r}: loss {} vs {want}", loss[r]);
                for (j, &xv) in row.iter().enumerate() {
                    let got = dx[r * v + j];
                    if xv == f64::NEG_INFINITY {
                        assert!(got == 0.0, "{dtype:?} row {r}: masked logit {j} has gradient {got}");
                    } else {
                        let onehot = if j == targets[r] as usize { 1.0 } else { 0.0 };
                        let want = ((xv - max).exp() / sum - onehot) * row_grads[r];
                        assert!((got - want).abs() <= tol * row_grads[r].abs().max(1.0), "{dtype:?} row {r}: d logit {j} {got} vs {want}");
                    }
                }
            }
        }
    }
}
