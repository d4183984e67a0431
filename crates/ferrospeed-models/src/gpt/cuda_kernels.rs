//! What our NVRTC-compiled CUDA kernels share: block reductions and f32/bf16/f16 loads and stores
//! written without headers (bit manipulation and PTX `cvt`), one-time compilation, launch helpers.

use candle_core::cuda::cudarc;
use candle_core::{DType, Result};
use std::sync::OnceLock;

/// Device functions every kernel source starts with.
const PRELUDE: &str = r#"
#define NEG_INF __int_as_float(0xff800000)
__device__ float warp_max(float v) { for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o)); return v; }
__device__ float warp_sum(float v) { for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o); return v; }
__device__ float block_max(float v, float* red) {
  v = warp_max(v); int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
  if (lane == 0) red[w] = v; __syncthreads();
  if (w == 0) { v = lane < nw ? red[lane] : NEG_INF; v = warp_max(v); if (lane == 0) red[32] = v; }
  __syncthreads(); v = red[32]; __syncthreads(); return v; }
__device__ float block_sum(float v, float* red) {
  v = warp_sum(v); int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
  if (lane == 0) red[w] = v; __syncthreads();
  if (w == 0) { v = lane < nw ? red[lane] : 0.f; v = warp_sum(v); if (lane == 0) red[32] = v; }
  __syncthreads(); v = red[32]; __syncthreads(); return v; }
__device__ float ld_bf16(unsigned short x) { return __uint_as_float(((unsigned int)x) << 16); }
__device__ unsigned short st_bf16(float f) {
  unsigned int u = __float_as_uint(f);
  if ((u & 0x7fffffff) > 0x7f800000) return 0x7fc0;
  u += 0x7fff + ((u >> 16) & 1); return (unsigned short)(u >> 16); }
__device__ float ld_f16(unsigned short h) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f; }
__device__ unsigned short st_f16(float f) { unsigned short h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h; }
__device__ float ld_f32(float x) { return x; }
__device__ float st_f32(float f) { return f; }
"#;

/// Compile `PRELUDE + src` once per process into `cache`; `what` names the kernels in errors.
pub fn compile(cache: &'static OnceLock<std::result::Result<String, String>>, src: &str, what: &str) -> Result<&'static str> {
    cache
        .get_or_init(|| cudarc::nvrtc::compile_ptx(format!("{PRELUDE}{src}")).map(|p| p.to_src()).map_err(|e| e.to_string()))
        .as_deref()
        .map_err(|e| candle_core::Error::Msg(format!("compiling the {what} kernels with NVRTC: {e}")))
}

/// The kernel name suffix of a dtype (each source instantiates f32, bf16 and f16).
pub fn suffix(dtype: DType, what: &str) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        other => candle_core::bail!("{what} on CUDA: unsupported dtype {other:?}"),
    })
}

pub fn launch_err(e: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}
