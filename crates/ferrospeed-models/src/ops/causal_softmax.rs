//! Fused causal softmax for attention: `softmax(scale · s + causal mask)` over the last dimension in one
//! pass with f32 arithmetic inside, and its backward in one pass. Composed from candle ops the same
//! thing takes about ten strided kernels over the `[batch, heads, t, t]` scores (scale, mask, widen,
//! max, subtract, exp, sum, divide, narrow), which dominated a GPU step (bench/results/gpu-*.md).
//!
//! The CPU kernels are the reference (in f64); the CUDA kernels are compiled with NVRTC on first use.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor, WithDType};

/// Causal softmax over the last dimension of `scores` `[…, t, t]`: row `i` of each `t × t` matrix
/// attends to columns `0..=i`.
pub fn causal_softmax(scores: &Tensor, scale: f64) -> Result<Tensor> {
    scores.contiguous()?.apply_op1(CausalSoftmax { scale })
}

/// The forward without autograd (for hand-written backward passes).
pub fn causal_softmax_forward(scores: &Tensor, scale: f64) -> Result<Tensor> {
    scores.contiguous()?.apply_op1_no_bwd(&CausalSoftmax { scale })
}

/// The gradient with respect to the scores, given the probabilities `y` and their gradient `dy`.
pub fn causal_softmax_backward(y: &Tensor, dy: &Tensor, scale: f64) -> Result<Tensor> {
    y.contiguous()?.apply_op2_no_bwd(&dy.contiguous()?, &CausalSoftmaxBackward { scale })
}

struct CausalSoftmax {
    scale: f64,
}

struct CausalSoftmaxBackward {
    scale: f64,
}

/// Rows and row length of a contiguous `[…, t, t]` layout.
fn rows(layout: &Layout, op: &str) -> Result<(usize, usize, usize)> {
    let Some((start, _)) = layout.contiguous_offsets() else {
        candle_core::bail!("{op}: input must be contiguous")
    };
    let dims = layout.dims();
    let t = *dims.last().unwrap_or(&0);
    if dims.len() < 2 || dims[dims.len() - 2] != t {
        candle_core::bail!("{op}: expects [..., t, t], got {dims:?}")
    }
    Ok((start, layout.shape().elem_count() / t.max(1), t))
}

fn forward_rows<T: WithDType>(x: &[T], t: usize, scale: f64) -> Vec<T> {
    let mut y = vec![T::zero(); x.len()];
    for (r, (xr, yr)) in x.chunks(t).zip(y.chunks_mut(t)).enumerate() {
        let i = r % t;
        let max = xr[..=i].iter().map(|v| v.to_f64() * scale).fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = xr[..=i].iter().map(|v| (v.to_f64() * scale - max).exp()).sum();
        for j in 0..=i {
            yr[j] = T::from_f64((xr[j].to_f64() * scale - max).exp() / sum);
        }
    }
    y
}

fn backward_rows<T: WithDType>(y: &[T], dy: &[T], t: usize, scale: f64) -> Vec<T> {
    let mut dx = vec![T::zero(); y.len()];
    for (r, ((yr, gr), dr)) in y.chunks(t).zip(dy.chunks(t)).zip(dx.chunks_mut(t)).enumerate() {
        let i = r % t;
        let dot: f64 = (0..=i).map(|j| yr[j].to_f64() * gr[j].to_f64()).sum();
        for j in 0..=i {
            dr[j] = T::from_f64(scale * yr[j].to_f64() * (gr[j].to_f64() - dot));
        }
    }
    dx
}

macro_rules! per_dtype {
    ($storage:expr, $v:ident => $body:expr) => {
        match $storage {
            CpuStorage::F32($v) => CpuStorage::F32($body),
            CpuStorage::F64($v) => CpuStorage::F64($body),
            CpuStorage::BF16($v) => CpuStorage::BF16($body),
            CpuStorage::F16($v) => CpuStorage::F16($body),
            other => candle_core::bail!("causal softmax: unsupported dtype {:?}", candle_core::backend::BackendStorage::dtype(other)),
        }
    };
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal-softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (start, n, t) = rows(layout, self.name())?;
        let out = per_dtype!(storage, v => forward_rows(&v[start..start + n * t], t, self.scale));
        Ok((out, layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, storage: &candle_core::CudaStorage, layout: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        let (start, n, t) = rows(layout, self.name())?;
        Ok((cuda::forward(storage, start, n, t, self.scale as f32)?, layout.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(res.apply_op2_no_bwd(&grad_res.contiguous()?, &CausalSoftmaxBackward { scale: self.scale })?))
    }
}

impl CustomOp2 for CausalSoftmaxBackward {
    fn name(&self) -> &'static str {
        "causal-softmax-backward"
    }

    fn cpu_fwd(&self, y: &CpuStorage, yl: &Layout, dy: &CpuStorage, dyl: &Layout) -> Result<(CpuStorage, Shape)> {
        let ((ys, n, t), (gs, _, _)) = (rows(yl, self.name())?, rows(dyl, self.name())?);
        let scale = self.scale;
        let out = match (y, dy) {
            (CpuStorage::F32(y), CpuStorage::F32(g)) => CpuStorage::F32(backward_rows(&y[ys..ys + n * t], &g[gs..gs + n * t], t, scale)),
            (CpuStorage::F64(y), CpuStorage::F64(g)) => CpuStorage::F64(backward_rows(&y[ys..ys + n * t], &g[gs..gs + n * t], t, scale)),
            (CpuStorage::BF16(y), CpuStorage::BF16(g)) => CpuStorage::BF16(backward_rows(&y[ys..ys + n * t], &g[gs..gs + n * t], t, scale)),
            (CpuStorage::F16(y), CpuStorage::F16(g)) => CpuStorage::F16(backward_rows(&y[ys..ys + n * t], &g[gs..gs + n * t], t, scale)),
            _ => candle_core::bail!("causal softmax backward: mismatched or unsupported dtypes"),
        };
        Ok((out, yl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        y: &candle_core::CudaStorage,
        yl: &Layout,
        dy: &candle_core::CudaStorage,
        dyl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let ((ys, n, t), (gs, _, _)) = (rows(yl, self.name())?, rows(dyl, self.name())?);
        Ok((cuda::backward(y, ys, dy, gs, n, t, self.scale as f32)?, yl.shape().clone()))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    //! The CUDA kernels: one thread block per row, f32 arithmetic (helpers in `cuda_kernels.rs`).
    use candle_core::cuda::cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg};
    use super::super::cuda_kernels::{compile, launch_err, suffix};
    use candle_core::cuda::CudaDType;
    use candle_core::backend::BackendStorage;
    use candle_core::{CudaStorage, DType, Result};
    use half::{bf16, f16};
    use std::sync::OnceLock;

    const SRC: &str = r#"
#define KERNELS(NAME, T, LD, ST) \
extern "C" __global__ void causal_softmax_##NAME(const T* x, T* y, int t, float scale) { \
  __shared__ float red[33]; long row = blockIdx.x; int i = (int)(row % t); \
  const T* xr = x + row * t; T* yr = y + row * t; float m = NEG_INF; \
  for (int j = threadIdx.x; j <= i; j += blockDim.x) m = fmaxf(m, LD(xr[j]) * scale); \
  m = block_max(m, red); float s = 0.f; \
  for (int j = threadIdx.x; j <= i; j += blockDim.x) s += expf(LD(xr[j]) * scale - m); \
  s = block_sum(s, red); float inv = 1.f / s; \
  for (int j = threadIdx.x; j < t; j += blockDim.x) yr[j] = ST(j <= i ? expf(LD(xr[j]) * scale - m) * inv : 0.f); } \
extern "C" __global__ void causal_softmax_bwd_##NAME(const T* y, const T* dy, T* dx, int t, float scale) { \
  __shared__ float red[33]; long row = blockIdx.x; int i = (int)(row % t); \
  const T* yr = y + row * t; const T* gr = dy + row * t; T* dr = dx + row * t; float d = 0.f; \
  for (int j = threadIdx.x; j <= i; j += blockDim.x) d += LD(yr[j]) * LD(gr[j]); \
  d = block_sum(d, red); \
  for (int j = threadIdx.x; j < t; j += blockDim.x) dr[j] = ST(j <= i ? scale * LD(yr[j]) * (LD(gr[j]) - d) : 0.f); }
KERNELS(f32, float, ld_f32, st_f32)
KERNELS(bf16, unsigned short, ld_bf16, st_bf16)
KERNELS(f16, unsigned short, ld_f16, st_f16)
"#;

    fn ptx() -> Result<&'static str> {
        static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
        compile(&PTX, SRC, "causal softmax")
    }

    fn config(rows: usize, t: usize) -> LaunchConfig {
        let threads = t.next_multiple_of(32).clamp(32, 256) as u32;
        LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 }
    }

    fn run_fwd<T: CudaDType + DeviceRepr>(s: &CudaStorage, start: usize, rows: usize, t: usize, scale: f32) -> Result<CudaStorage> {
        let dev = s.device().clone();
        let x = s.as_cuda_slice::<T>()?.slice(start..start + rows * t);
        let y: CudaSlice<T> = unsafe { dev.alloc::<T>(rows * t)? };
        let func = dev.get_or_load_custom_func(&format!("causal_softmax_{}", suffix(s.dtype(), "causal softmax")?), "ferrospeed_causal_softmax", ptx()?)?;
        let t_i = t as i32;
        let mut b = func.builder();
        b.arg(&x).arg(&y).arg(&t_i).arg(&scale);
        unsafe { b.launch(config(rows, t)) }.map_err(launch_err)?;
        Ok(CudaStorage::wrap_cuda_slice(y, dev))
    }

    pub fn forward(s: &CudaStorage, start: usize, rows: usize, t: usize, scale: f32) -> Result<CudaStorage> {
        match s.dtype() {
            DType::F32 => run_fwd::<f32>(s, start, rows, t, scale),
            DType::BF16 => run_fwd::<bf16>(s, start, rows, t, scale),
            DType::F16 => run_fwd::<f16>(s, start, rows, t, scale),
            other => candle_core::bail!("causal softmax on CUDA: unsupported dtype {other:?}"),
        }
    }

    fn run_bwd<T: CudaDType + DeviceRepr>(
        y: &CudaStorage,
        ys: usize,
        dy: &CudaStorage,
        gs: usize,
        rows: usize,
        t: usize,
        scale: f32,
    ) -> Result<CudaStorage> {
        let dev = y.device().clone();
        let yv = y.as_cuda_slice::<T>()?.slice(ys..ys + rows * t);
        let gv = dy.as_cuda_slice::<T>()?.slice(gs..gs + rows * t);
        let dx: CudaSlice<T> = unsafe { dev.alloc::<T>(rows * t)? };
        let func = dev.get_or_load_custom_func(&format!("causal_softmax_bwd_{}", suffix(y.dtype(), "causal softmax")?), "ferrospeed_causal_softmax", ptx()?)?;
        let t_i = t as i32;
        let mut b = func.builder();
        b.arg(&yv).arg(&gv).arg(&dx).arg(&t_i).arg(&scale);
        unsafe { b.launch(config(rows, t)) }.map_err(launch_err)?;
        Ok(CudaStorage::wrap_cuda_slice(dx, dev))
    }

    pub fn backward(y: &CudaStorage, ys: usize, dy: &CudaStorage, gs: usize, rows: usize, t: usize, scale: f32) -> Result<CudaStorage> {
        if y.dtype() != dy.dtype() {
            candle_core::bail!("causal softmax backward: dtypes differ")
        }
        match y.dtype() {
            DType::F32 => run_bwd::<f32>(y, ys, dy, gs, rows, t, scale),
            DType::BF16 => run_bwd::<bf16>(y, ys, dy, gs, rows, t, scale),
            DType::F16 => run_bwd::<f16>(y, ys, dy, gs, rows, t, scale),
            other => candle_core::bail!("causal softmax on CUDA: unsupported dtype {other:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::composed::{causal_mask, softmax_last_dim};
    use candle_core::{DType, Device, Var};

    #[test]
    fn matches_the_composed_reference_forward_and_backward() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&(Tensor::randn(0f64, 1.0, (2, 3, 5, 5), &dev).unwrap())).unwrap();
        let g = Tensor::randn(0f64, 1.0, (2, 3, 5, 5), &dev).unwrap();
        let scale = 0.37;
        let fused = causal_softmax(x.as_tensor(), scale).unwrap();
        let reference =
            softmax_last_dim(&(x.as_tensor() * scale).unwrap().broadcast_add(&causal_mask(5, DType::F64, &dev).unwrap()).unwrap()).unwrap();
        let diff = (&fused - &reference).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
        assert!(diff < 1e-12, "forward differs by {diff}");
        let gf = (fused * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let gr = (reference * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let d = (gf.get(x.as_tensor()).unwrap() - gr.get(x.as_tensor()).unwrap()).unwrap();
        let diff = d.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
        assert!(diff < 1e-12, "backward differs by {diff}");
    }
}
