//! CUDA kernels of the Llama ops (NVRTC, f32 arithmetic): SwiGLU forward and backward, and RoPE on the
//! q and k heads of a fused projection (forward and inverse), one thread per element.

use super::cuda_kernels::{compile, launch_err, suffix};
use super::fused_cuda::{view, wrap};
use candle_core::cuda::cudarc::driver::{CudaFunction, DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda::{CudaDType, CudaDevice};
use candle_core::{DType, Result, Tensor};
use half::{bf16, f16};
use std::sync::OnceLock;

const SRC: &str = r#"
__device__ __forceinline__ float sigm(float x) { return 1.f / (1.f + __expf(-x)); }
#define KERNELS(NAME, T, LD, ST) \
extern "C" __global__ void swiglu_fwd_##NAME(const T* gu, T* y, long n, int f) { \
  for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n * f; i += (long)gridDim.x * blockDim.x) { \
    long r = i / f; int j = i % f; float g = LD(gu[r * 2 * f + j]), u = LD(gu[r * 2 * f + f + j]); \
    y[i] = ST(g * sigm(g) * u); } } \
extern "C" __global__ void swiglu_bwd_##NAME(const T* gu, const T* dy, T* d, long n, int f) { \
  for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n * f; i += (long)gridDim.x * blockDim.x) { \
    long r = i / f; int j = i % f; float g = LD(gu[r * 2 * f + j]), u = LD(gu[r * 2 * f + f + j]), gy = LD(dy[i]); \
    float s = sigm(g); d[r * 2 * f + j] = ST(gy * u * s * (1.f + g * (1.f - s))); d[r * 2 * f + f + j] = ST(gy * g * s); } } \
extern "C" __global__ void rope_##NAME(const T* x, T* y, const float* cos, const float* sin, long n, int t, int heads, int w, int hd, float sign) { \
  int half = hd / 2; \
  for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n * w; i += (long)gridDim.x * blockDim.x) { \
    long r = i / w; int col = i % w; \
    if (col >= heads * hd) { y[i] = x[i]; continue; } \
    int j = col % hd, k = j % half; long p = (r % t) * half + k; float c = cos[p], s = sign * sin[p]; \
    float a = LD(x[i]); \
    y[i] = ST(j < half ? a * c - LD(x[i + half]) * s : a * c + LD(x[i - half]) * s); } }
KERNELS(f32, float, ld_f32, st_f32)
KERNELS(bf16, unsigned short, ld_bf16, st_bf16)
KERNELS(f16, unsigned short, ld_f16, st_f16)
"#;

const MODULE: &str = "ferrospeed_llama";

fn func(dev: &CudaDevice, name: &str) -> Result<CudaFunction> {
    static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    Ok(dev.get_or_load_custom_func(name, MODULE, compile(&PTX, SRC, "Llama ops")?)?.into_cuda_function())
}

fn grid(items: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (items.div_ceil(256).min(65_535 * 8) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

macro_rules! dispatch {
    ($dtype:expr, $what:expr, $f:ident($($arg:expr),*)) => {
        match $dtype {
            DType::F32 => $f::<f32>($($arg),*),
            DType::BF16 => $f::<bf16>($($arg),*),
            DType::F16 => $f::<f16>($($arg),*),
            other => candle_core::bail!("{} on CUDA: unsupported dtype {other:?}", $what),
        }
    };
}

/// SwiGLU of `gu` `[n, 2f]` (`dy` `None`), or its gradient for `dy` `[n, f]`.
pub fn swiglu(gu: &Tensor, dy: Option<&Tensor>, n: usize, f: usize) -> Result<Tensor> {
    fn run<T: CudaDType + DeviceRepr>(gu: &Tensor, dy: Option<&Tensor>, n: usize, f: usize) -> Result<Tensor> {
        let what = if dy.is_some() { "swiglu_bwd" } else { "swiglu_fwd" };
        let name = format!("{what}_{}", suffix(gu.dtype(), "swiglu")?);
        view::<T, _>(gu, |dev, gv| {
            let (n_i, f_i) = (n as i64, f as i32);
            let kernel = func(dev, &name)?;
            let stream = dev.cuda_stream();
            match dy {
                None => {
                    let y = unsafe { dev.alloc::<T>(n * f)? };
                    let mut l = stream.launch_builder(&kernel);
                    l.arg(&gv).arg(&y).arg(&n_i).arg(&f_i);
                    unsafe { l.launch(grid(n * f)) }.map_err(launch_err)?;
                    Ok(wrap(y, dev, &[n, f]))
                }
                Some(dy) => view::<T, _>(dy, |_, dv| {
                    let d = unsafe { dev.alloc::<T>(n * 2 * f)? };
                    let mut l = stream.launch_builder(&kernel);
                    l.arg(&gv).arg(&dv).arg(&d).arg(&n_i).arg(&f_i);
                    unsafe { l.launch(grid(n * f)) }.map_err(launch_err)?;
                    Ok(wrap(d, dev, &[n, 2 * f]))
                }),
            }
        })
    }
    dispatch!(gu.dtype(), "swiglu", run(gu, dy, n, f))
}

/// RoPE on the q and k heads of `qkv` `[n, (nh + 2·nkv)·hd]`; `inverse` rotates back.
#[allow(clippy::too_many_arguments)]
pub fn rope(qkv: &Tensor, cos: &Tensor, sin: &Tensor, t: usize, nh: usize, nkv: usize, hd: usize, inverse: bool) -> Result<Tensor> {
    #[allow(clippy::too_many_arguments)]
    fn run<T: CudaDType + DeviceRepr>(qkv: &Tensor, cos: &Tensor, sin: &Tensor, t: usize, nh: usize, nkv: usize, hd: usize, inverse: bool) -> Result<Tensor> {
        let (n, w) = qkv.dims2()?;
        let name = format!("rope_{}", suffix(qkv.dtype(), "rope")?);
        let (cos, sin) = (cos.to_dtype(DType::F32)?, sin.to_dtype(DType::F32)?);
        view::<T, _>(qkv, |dev, xv| {
            view::<f32, _>(&cos, |_, cv| {
                view::<f32, _>(&sin, |_, sv| {
                    let y = unsafe { dev.alloc::<T>(n * w)? };
                    let (n_i, t_i, heads, w_i, hd_i) = (n as i64, t as i32, (nh + nkv) as i32, w as i32, hd as i32);
                    let sign: f32 = if inverse { -1.0 } else { 1.0 };
                    let kernel = func(dev, &name)?;
                    let stream = dev.cuda_stream();
                    let mut l = stream.launch_builder(&kernel);
                    l.arg(&xv).arg(&y).arg(&cv).arg(&sv).arg(&n_i).arg(&t_i).arg(&heads).arg(&w_i).arg(&hd_i).arg(&sign);
                    unsafe { l.launch(grid(n * w)) }.map_err(launch_err)?;
                    Ok(wrap(y, dev, &[n, w]))
                })
            })
        })
    }
    dispatch!(qkv.dtype(), "rope", run(qkv, cos, sin, t, nh, nkv, hd, inverse))
}
