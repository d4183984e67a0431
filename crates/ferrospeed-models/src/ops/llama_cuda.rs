//! CUDA kernels of the Llama ops (NVRTC, f32 arithmetic): SwiGLU forward and backward, and RoPE on the
//! q and k heads of a fused projection (forward and inverse): 16 bytes a thread where the layout allows,
//! else one thread per element.

use super::cuda_kernels::{compile, dispatch, launch_err, suffix};
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
// Vectorised: 16 bytes (W elements) a thread, rows on the grid's y dimension (strided), so no division per
// element. Used when the columns split into whole vectors and the buffers start on 16-byte boundaries.
#define VKERNELS(NAME, T, LD, ST) \
extern "C" __global__ void swiglu_vfwd_##NAME(const T* gu, T* y, long n, int f) { \
  const int W = 16 / sizeof(T); int j = (blockIdx.x * blockDim.x + threadIdx.x) * W; if (j >= f) return; \
  for (long r = blockIdx.y; r < n; r += gridDim.y) { \
    uint4 gv = *(const uint4*)(gu + r * 2 * f + j), uv = *(const uint4*)(gu + r * 2 * f + f + j), ov; \
    const T* gp = (const T*)&gv; const T* up = (const T*)&uv; T* op = (T*)&ov; \
    _Pragma("unroll") for (int e = 0; e < W; e++) { float g = LD(gp[e]); op[e] = ST(g * sigm(g) * LD(up[e])); } \
    *(uint4*)(y + r * f + j) = ov; } } \
extern "C" __global__ void swiglu_vbwd_##NAME(const T* gu, const T* dy, T* d, long n, int f) { \
  const int W = 16 / sizeof(T); int j = (blockIdx.x * blockDim.x + threadIdx.x) * W; if (j >= f) return; \
  for (long r = blockIdx.y; r < n; r += gridDim.y) { \
    uint4 gv = *(const uint4*)(gu + r * 2 * f + j), uv = *(const uint4*)(gu + r * 2 * f + f + j), yv = *(const uint4*)(dy + r * f + j), dg, du; \
    const T* gp = (const T*)&gv; const T* up = (const T*)&uv; const T* yp = (const T*)&yv; T* gq = (T*)&dg; T* uq = (T*)&du; \
    _Pragma("unroll") for (int e = 0; e < W; e++) { \
      float g = LD(gp[e]), u = LD(up[e]), gy = LD(yp[e]), s = sigm(g); \
      gq[e] = ST(gy * u * s * (1.f + g * (1.f - s))); uq[e] = ST(gy * g * s); } \
    *(uint4*)(d + r * 2 * f + j) = dg; *(uint4*)(d + r * 2 * f + f + j) = du; } } \
extern "C" __global__ void rope_v_##NAME(const T* x, T* y, const float* cos, const float* sin, long n, int t, int heads, int all, int hd, float sign) { \
  const int W = 16 / sizeof(T); int half = hd / 2, per = half / W; \
  int k = blockIdx.x * blockDim.x + threadIdx.x; if (k >= all * per) return; \
  int h = k / per, i = (k % per) * W; \
  for (long r = blockIdx.y; r < n; r += gridDim.y) { \
    long at = r * (long)all * hd + (long)h * hd + i; \
    uint4 av = *(const uint4*)(x + at), bv = *(const uint4*)(x + at + half); \
    if (h >= heads) { *(uint4*)(y + at) = av; *(uint4*)(y + at + half) = bv; continue; } \
    const T* ap = (const T*)&av; const T* bp = (const T*)&bv; uint4 o1, o2; T* p1 = (T*)&o1; T* p2 = (T*)&o2; \
    const float* cr = cos + (r % t) * half + i; const float* sr = sin + (r % t) * half + i; \
    _Pragma("unroll") for (int e = 0; e < W; e++) { \
      float a = LD(ap[e]), b = LD(bp[e]), c = cr[e], s = sign * sr[e]; p1[e] = ST(a * c - b * s); p2[e] = ST(b * c + a * s); } \
    *(uint4*)(y + at) = o1; *(uint4*)(y + at + half) = o2; } }
VKERNELS(f32, float, ld_f32, st_f32)
VKERNELS(bf16, unsigned short, ld_bf16, st_bf16)
VKERNELS(f16, unsigned short, ld_f16, st_f16)
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

/// `per_row` threads over each of `rows` rows (rows strided over the grid's y dimension).
fn grid_rows(per_row: usize, rows: usize) -> LaunchConfig {
    let threads = per_row.clamp(32, 256);
    LaunchConfig { grid_dim: (per_row.div_ceil(threads) as u32, rows.min(65_535) as u32, 1), block_dim: (threads as u32, 1, 1), shared_mem_bytes: 0 }
}

/// Whether every tensor starts on a 16-byte boundary (the vectorised kernels load 16 bytes at a time).
fn aligned16<T>(ts: &[&Tensor]) -> bool {
    ts.iter().all(|t| (t.layout().start_offset() * std::mem::size_of::<T>()) % 16 == 0)
}

/// SwiGLU of `gu` `[n, 2f]` (`dy` `None`), or its gradient for `dy` `[n, f]`.
pub fn swiglu(gu: &Tensor, dy: Option<&Tensor>, n: usize, f: usize) -> Result<Tensor> {
    fn run<T: CudaDType + DeviceRepr>(gu: &Tensor, dy: Option<&Tensor>, n: usize, f: usize) -> Result<Tensor> {
        let w = 16 / std::mem::size_of::<T>();
        let vec = f % w == 0 && aligned16::<T>(&[gu]) && dy.is_none_or(|d| aligned16::<T>(&[d]));
        let what = match (dy.is_some(), vec) {
            (false, false) => "swiglu_fwd",
            (true, false) => "swiglu_bwd",
            (false, true) => "swiglu_vfwd",
            (true, true) => "swiglu_vbwd",
        };
        let cfg = if vec { grid_rows(f / w, n) } else { grid(n * f) };
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
                    unsafe { l.launch(cfg) }.map_err(launch_err)?;
                    Ok(wrap(y, dev, &[n, f]))
                }
                Some(dy) => view::<T, _>(dy, |_, dv| {
                    let d = unsafe { dev.alloc::<T>(n * 2 * f)? };
                    let mut l = stream.launch_builder(&kernel);
                    l.arg(&gv).arg(&dv).arg(&d).arg(&n_i).arg(&f_i);
                    unsafe { l.launch(cfg) }.map_err(launch_err)?;
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
        let vw = 16 / std::mem::size_of::<T>();
        let vec = (hd / 2) % vw == 0 && aligned16::<T>(&[qkv]);
        let name = format!("{}_{}", if vec { "rope_v" } else { "rope" }, suffix(qkv.dtype(), "rope")?);
        let (cos, sin) = (cos.to_dtype(DType::F32)?.contiguous()?, sin.to_dtype(DType::F32)?.contiguous()?);
        view::<T, _>(qkv, |dev, xv| {
            view::<f32, _>(&cos, |_, cv| {
                view::<f32, _>(&sin, |_, sv| {
                    let y = unsafe { dev.alloc::<T>(n * w)? };
                    let (n_i, t_i, heads, w_i, hd_i) = (n as i64, t as i32, (nh + nkv) as i32, w as i32, hd as i32);
                    let sign: f32 = if inverse { -1.0 } else { 1.0 };
                    let kernel = func(dev, &name)?;
                    let stream = dev.cuda_stream();
                    let mut l = stream.launch_builder(&kernel);
                    let all = (nh + 2 * nkv) as i32;
                    if vec {
                        l.arg(&xv).arg(&y).arg(&cv).arg(&sv).arg(&n_i).arg(&t_i).arg(&heads).arg(&all).arg(&hd_i).arg(&sign);
                        unsafe { l.launch(grid_rows(all as usize * hd / 2 / vw, n)) }.map_err(launch_err)?;
                    } else {
                        l.arg(&xv).arg(&y).arg(&cv).arg(&sv).arg(&n_i).arg(&t_i).arg(&heads).arg(&w_i).arg(&hd_i).arg(&sign);
                        unsafe { l.launch(grid(n * w)) }.map_err(launch_err)?;
                    }
                    Ok(wrap(y, dev, &[n, w]))
                })
            })
        })
    }
    dispatch!(qkv.dtype(), "rope", run(qkv, cos, sin, t, nh, nkv, hd, inverse))
}
