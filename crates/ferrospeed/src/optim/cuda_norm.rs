//! Gradient statistics on CUDA: sums of squares of many ranges (f64, deterministic two-pass
//! reduction: a fixed grid writes fixed partials, one block per range adds them in a fixed tree; no
//! float atomics, so every run gives the same bits) and the fp16 overflow check (any non-finite).

use crate::cuda_kernels::{compile, elementwise, launch_err};
use candle_core::cuda::cudarc::driver::{CudaSlice, CudaView, LaunchConfig, PushKernelArg};
use candle_core::cuda::CudaDevice;
use candle_core::Result;
use std::sync::OnceLock;

/// Blocks of the first pass, per range (= partial sums per range, = threads of the second pass).
const PARTIALS: usize = 256;

const SRC: &str = r#"
extern "C" __global__ void sumsq_partial(const float* x, long n, double* partial) {
  __shared__ double red[33]; double s = 0.0;
  GRID_STRIDE(i, n) { double d = (double)x[i]; s = __dadd_rn(s, __dmul_rn(d, d)); }
  s = block_sum_f64(s, red);
  if (threadIdx.x == 0) partial[blockIdx.x] = s; }
extern "C" __global__ void sumsq_final(const double* partial, int per, double* out) {
  __shared__ double red[33]; const double* p = partial + (long)blockIdx.x * per; double s = 0.0;
  for (int j = threadIdx.x; j < per; j += blockDim.x) s = __dadd_rn(s, p[j]);
  s = block_sum_f64(s, red);
  if (threadIdx.x == 0) out[blockIdx.x] = s; }
extern "C" __global__ void nonfinite(const float* x, long n, unsigned int* flag) {
  GRID_STRIDE(i, n) if ((__float_as_uint(x[i]) & 0x7f800000u) == 0x7f800000u) *flag = 1u; }
"#;

const MODULE: &str = "ferrospeed_norm";

fn ptx() -> Result<&'static str> {
    static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    compile(&PTX, SRC, "gradient norm")
}

/// The sum of squares of each range, accumulated in f64 (exact squares, rounded sums), as the host's
/// `sum_squares` does, in another (fixed) order. One synchronising copy for all of them.
pub fn sum_squares_segments(dev: &CudaDevice, segments: &[CudaView<'_, f32>]) -> Result<Vec<f64>> {
    if segments.is_empty() {
        return Ok(Vec::new());
    }
    let mut partials: CudaSlice<f64> = dev.alloc_zeros(segments.len() * PARTIALS)?;
    let first = LaunchConfig { grid_dim: (PARTIALS as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let func = dev.get_or_load_custom_func("sumsq_partial", MODULE, ptx()?)?;
    for (s, seg) in segments.iter().enumerate() {
        if seg.is_empty() {
            continue; // its partials stay zero
        }
        let n = seg.len() as i64;
        let mut out = partials.slice_mut(s * PARTIALS..(s + 1) * PARTIALS);
        let mut b = func.builder();
        b.arg(seg).arg(&n).arg(&mut out);
        unsafe { b.launch(first) }.map_err(launch_err)?;
    }
    let mut sums: CudaSlice<f64> = dev.alloc_zeros(segments.len())?;
    let func = dev.get_or_load_custom_func("sumsq_final", MODULE, ptx()?)?;
    let per = PARTIALS as i32;
    let second = LaunchConfig { grid_dim: (segments.len() as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let mut b = func.builder();
    b.arg(&partials).arg(&per).arg(&mut sums);
    unsafe { b.launch(second) }.map_err(launch_err)?;
    dev.clone_dtoh(&sums)
}

/// Whether any element of any range is infinite or NaN (one synchronising copy for all of them).
pub fn any_nonfinite(dev: &CudaDevice, segments: &[CudaView<'_, f32>]) -> Result<bool> {
    let mut flag: CudaSlice<u32> = dev.alloc_zeros(1)?;
    let func = dev.get_or_load_custom_func("nonfinite", MODULE, ptx()?)?;
    for seg in segments.iter().filter(|s| !s.is_empty()) {
        let n = seg.len() as i64;
        let mut b = func.builder();
        b.arg(seg).arg(&n).arg(&mut flag);
        unsafe { b.launch(elementwise(seg.len())) }.map_err(launch_err)?;
    }
    Ok(dev.clone_dtoh(&flag)?[0] != 0)
}
