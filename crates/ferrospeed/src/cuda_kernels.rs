//! What all our NVRTC kernels share (the model kernels in ferrospeed-models too) (header-less prelude, one-time compilation, launch shapes,
//! writable views of tensor storage), and the gradient kernels: accumulate into f32, round in place.
//!
//! Device buffers are `CudaSlice`s allocated through candle's `CudaDevice`, so every kernel, copy and
//! candle op runs on candle's one stream, in program order: no events are needed between them.

use candle_core::cuda::cudarc::driver::{CudaSlice, CudaView, CudaViewMut, DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda::{CudaDType, CudaDevice};
use candle_core::{DType, Result, Storage, Tensor};
use half::{bf16, f16};
use std::ops::Range;
use std::sync::OnceLock;

/// Device functions every kernel source starts with (no headers: NVRTC has no CUDA include path here).
/// Arithmetic goes through the `_rn` intrinsics where it must match the CPU: they are never fused
/// into FMAs nor replaced by fast approximations.
pub const PRELUDE: &str = r#"
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
__device__ double warp_sum_f64(double v) { for (int o = 16; o > 0; o >>= 1) v = __dadd_rn(v, __shfl_xor_sync(0xffffffff, v, o)); return v; }
__device__ double block_sum_f64(double v, double* red) {
  v = warp_sum_f64(v); int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
  if (lane == 0) red[w] = v; __syncthreads();
  if (w == 0) { v = lane < nw ? red[lane] : 0.0; v = warp_sum_f64(v); if (lane == 0) red[32] = v; }
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
#define GRID_STRIDE(i, n) for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < (n); i += (long)gridDim.x * blockDim.x)
"#;

/// Compile `PRELUDE + src` once per process into `cache`; `what` names the kernels in errors.
pub fn compile(cache: &'static OnceLock<std::result::Result<String, String>>, src: &str, what: &str) -> Result<&'static str> {
    compile_for(cache, src, what, None)
}

/// [`compile`] for a virtual architecture (`"compute_80"` for kernels that need tensor-core `mma.sync` on
/// bf16); `None` is NVRTC's default.
pub fn compile_for(cache: &'static OnceLock<std::result::Result<String, String>>, src: &str, what: &str, arch: Option<&'static str>) -> Result<&'static str> {
    use candle_core::cuda::cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};
    cache
        .get_or_init(|| {
            let opts = CompileOptions { arch, ..Default::default() };
            compile_ptx_with_opts(format!("{PRELUDE}{src}"), opts).map(|p| p.to_src()).map_err(|e| e.to_string())
        })
        .as_deref()
        .map_err(|e| candle_core::Error::Msg(format!("compiling the {what} kernels with NVRTC: {e}")))
}

/// The compute capability `(major, minor)` of a CUDA device.
pub fn compute_capability(dev: &CudaDevice) -> Result<(i32, i32)> {
    dev.cuda_stream().context().compute_capability().map_err(launch_err)
}

/// The kernel name suffix of a dtype (sources instantiate f32, bf16 and f16).
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

/// 256 threads per block, grid-stride loops over at most 4096 blocks.
pub(crate) fn elementwise(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(256).clamp(1, 4096) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

/// Run `f` on the device memory of elements `range` of contiguous tensor `t`, typed `T`.
///
/// The view comes from a read lock on the storage, yet kernels write through it (the compute copy of
/// the parameters is updated in place). That is sound here: the lock only guards the host-side
/// `Storage` value, which is not changed; the write is a kernel on candle's single stream, so it is
/// ordered after every earlier use of the tensor and before every later one.
pub(crate) fn with_tensor_view<T: CudaDType + DeviceRepr, R>(t: &Tensor, range: Range<usize>, f: impl FnOnce(&CudaDevice, &CudaView<T>) -> Result<R>) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(cs) = &*storage else { candle_core::bail!("expected a CUDA tensor, found one on {:?}", t.device()) };
    if !layout.is_contiguous() || range.end > t.elem_count() {
        candle_core::bail!("a kernel output must be a contiguous tensor covering {range:?} (it has {} elements)", t.elem_count())
    }
    let off = layout.start_offset();
    let view = cs.as_cuda_slice::<T>()?.slice(off + range.start..off + range.end);
    f(&cs.device, &view)
}

/// The CUDA device of a tensor.
pub fn device_of(t: &Tensor) -> Result<CudaDevice> {
    Ok(t.device().as_cuda_device()?.clone())
}

const GRAD_SRC: &str = r#"
#define GRAD_KERNELS(NAME, T, LD, ST) \
extern "C" __global__ void acc_add_##NAME(float* acc, const T* g, long n) { GRID_STRIDE(i, n) acc[i] = __fadd_rn(acc[i], LD(g[i])); } \
extern "C" __global__ void round_##NAME(float* x, long n) { GRID_STRIDE(i, n) x[i] = LD(ST(x[i])); }
GRAD_KERNELS(f32, float, ld_f32, st_f32)
GRAD_KERNELS(bf16, unsigned short, ld_bf16, st_bf16)
GRAD_KERNELS(f16, unsigned short, ld_f16, st_f16)
"#;

fn grad_ptx() -> Result<&'static str> {
    static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    compile(&PTX, GRAD_SRC, "gradient")
}

/// `acc += grad` elementwise (`grad`: any float dtype, converted exactly to f32 like the host path).
pub fn accumulate(acc: &mut CudaViewMut<'_, f32>, grad: &Tensor) -> Result<()> {
    let grad = match grad.dtype() {
        DType::F32 | DType::BF16 | DType::F16 => grad.flatten_all()?.contiguous()?,
        _ => grad.flatten_all()?.to_dtype(DType::F32)?,
    };
    let n = grad.elem_count();
    if n != acc.len() {
        candle_core::bail!("gradient of {n} elements for a parameter of {}", acc.len())
    }
    fn run<T: CudaDType + DeviceRepr>(acc: &mut CudaViewMut<'_, f32>, g: &Tensor, n: usize) -> Result<()> {
        with_tensor_view::<T, _>(g, 0..n, |dev, gv| {
            let name = format!("acc_add_{}", suffix(g.dtype(), "gradient accumulation")?);
            let func = dev.get_or_load_custom_func(&name, "ferrospeed_grads", grad_ptx()?)?;
            let n = n as i64;
            let mut b = func.builder();
            b.arg(acc).arg(gv).arg(&n);
            unsafe { b.launch(elementwise(n as usize)) }.map(|_| ()).map_err(launch_err)
        })
    }
    match grad.dtype() {
        DType::BF16 => run::<bf16>(acc, &grad, n),
        DType::F16 => run::<f16>(acc, &grad, n),
        _ => run::<f32>(acc, &grad, n),
    }
}

/// Round every element to `dtype` and back to f32 in place (what reducing in `dtype` does to a
/// gradient when there is only one rank); a no-op for f32.
pub fn round_through(dev: &CudaDevice, x: &mut CudaSlice<f32>, dtype: DType) -> Result<()> {
    if dtype == DType::F32 || x.is_empty() {
        return Ok(());
    }
    let name = format!("round_{}", suffix(dtype, "gradient rounding")?);
    let func = dev.get_or_load_custom_func(&name, "ferrospeed_grads", grad_ptx()?)?;
    let n = x.len() as i64;
    let mut b = func.builder();
    b.arg(x).arg(&n);
    unsafe { b.launch(elementwise(n as usize)) }.map(|_| ()).map_err(launch_err)
}
