//! CUDA kernels of `fused.rs` (NVRTC, f32 arithmetic): LayerNorm forward/backward one thread block
//! per row, column sums in two deterministic passes (per-chunk partials, then chunks in order),
//! bias + GELU forward/backward elementwise.

use super::cuda_kernels::{compile, dispatch, launch_err, suffix};
use super::fused::{LnOut, LN_EPS};
use candle_core::backend::BackendStorage;
use candle_core::op::BackpropOp;
use candle_core::cuda::cudarc::driver::{CudaFunction, CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda::{CudaDType, CudaDevice};
use candle_core::{CudaStorage, DType, Result, Storage, Tensor};
use half::{bf16, f16};
use std::sync::OnceLock;

const SRC: &str = r#"
__device__ float gelu_t(float u) { return tanhf(0.7978845608028654f * (u + 0.044715f * u * u * u)); }
// mode 0: gelu(u); 1: y·gelu'(u); 2: u; 3: y + u (u = h + b), see BiasOp.
__device__ __forceinline__ float bias_elem(int mode, float u, float y) {
  if (mode == 2) return u;
  if (mode == 3) return y + u;
  float t = gelu_t(u);
  if (mode == 0) return 0.5f * u * (1.f + t);
  return y * (0.5f * (1.f + t) + 0.5f * u * (1.f - t * t) * 0.7978845608028654f * (1.f + 3.f * 0.044715f * u * u)); }
#define KERNELS(NAME, T, LD, ST) \
extern "C" __global__ void ln_fwd_##NAME(const T* x, const T* w, const T* b, T* y, float* mean, float* rstd, int d, float eps, int rms) { \
  __shared__ float red[33]; long row = blockIdx.x; const T* xr = x + row * d; T* yr = y + row * d; \
  float m = 0.f; if (!rms) { float s = 0.f; for (int j = threadIdx.x; j < d; j += blockDim.x) s += LD(xr[j]); m = block_sum(s, red) / d; } \
  float v = 0.f; \
  for (int j = threadIdx.x; j < d; j += blockDim.x) { float c = LD(xr[j]) - m; v += c * c; } \
  float rs = rsqrtf(block_sum(v, red) / d + eps); \
  for (int j = threadIdx.x; j < d; j += blockDim.x) yr[j] = ST((LD(xr[j]) - m) * rs * LD(w[j]) + (rms ? 0.f : LD(b[j]))); \
  if (threadIdx.x == 0) { mean[row] = m; rstd[row] = rs; } } \
extern "C" __global__ void ln_bwd_##NAME(const T* dy, const T* x, const T* w, const float* mean, const float* rstd, const T* res, T* dx, int d, int has_res, int rms) { \
  __shared__ float red[33]; long row = blockIdx.x; const T* g = dy + row * d; const T* xr = x + row * d; \
  float m = mean[row], rs = rstd[row], a = 0.f, c = 0.f; \
  for (int j = threadIdx.x; j < d; j += blockDim.x) { float gw = LD(g[j]) * LD(w[j]); a += gw; c += gw * (LD(xr[j]) - m) * rs; } \
  a = rms ? 0.f : block_sum(a, red) / d; c = block_sum(c, red) / d; \
  for (int j = threadIdx.x; j < d; j += blockDim.x) { \
    float xh = (LD(xr[j]) - m) * rs; float v = rs * (LD(g[j]) * LD(w[j]) - a - xh * c); \
    if (has_res) v += LD(res[row * d + j]); dx[row * d + j] = ST(v); } } \
extern "C" __global__ void col_part_##NAME(const T* g, const T* x, const float* mean, const float* rstd, float* pw, float* pb, int n, int d, int chunk, int has_x) { \
  __shared__ float sw[8][33]; __shared__ float sb[8][33]; \
  int col = blockIdx.x * 32 + threadIdx.x; int r0 = blockIdx.y * chunk; int r1 = min(n, r0 + chunk); float aw = 0.f, ab = 0.f; \
  if (col < d) for (int r = r0 + threadIdx.y; r < r1; r += 8) { float v = LD(g[(long)r * d + col]); ab += v; \
    if (has_x) aw += v * (LD(x[(long)r * d + col]) - mean[r]) * rstd[r]; } \
  sw[threadIdx.y][threadIdx.x] = aw; sb[threadIdx.y][threadIdx.x] = ab; __syncthreads(); \
  if (threadIdx.y == 0 && col < d) { float w = 0.f, b = 0.f; \
    for (int i = 0; i < 8; i++) { w += sw[i][threadIdx.x]; b += sb[i][threadIdx.x]; } \
    pb[(long)blockIdx.y * d + col] = b; if (has_x) pw[(long)blockIdx.y * d + col] = w; } } \
extern "C" __global__ void bias_gelu_##NAME(const T* h, const T* b, const T* dy, T* out, long n, int k, int mode) { \
  for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) \
    out[i] = ST(bias_elem(mode, LD(h[i]) + LD(b[i % k]), mode & 1 ? LD(dy[i]) : 0.f)); } \
extern "C" __global__ void bias_vec_##NAME(const T* h, const T* b, const T* dy, T* out, long nv, int k, int mode) { \
  const int W = 16 / sizeof(T); \
  for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < nv; i += (long)gridDim.x * blockDim.x) { \
    int col = (int)((i * W) % k); uint4 hv = ((const uint4*)h)[i], gv = make_uint4(0, 0, 0, 0), ov; \
    if (mode & 1) gv = ((const uint4*)dy)[i]; \
    const T* hp = (const T*)&hv; const T* gp = (const T*)&gv; T* op = (T*)&ov; \
    _Pragma("unroll") for (int e = 0; e < W; e++) op[e] = ST(bias_elem(mode, LD(hp[e]) + LD(b[col + e]), LD(gp[e]))); \
    ((uint4*)out)[i] = ov; } } \
extern "C" __global__ void emb_grad_##NAME(const T* g, const unsigned int* order, const unsigned int* group_tok, const unsigned int* group_start, float* out, int d) { \
  int col = blockIdx.y * blockDim.x + threadIdx.x; if (col >= d) return; \
  unsigned int a = group_start[blockIdx.x], z = group_start[blockIdx.x + 1]; float s = 0.f; \
  for (unsigned int i = a; i < z; i++) s += LD(g[(long)order[i] * d + col]); \
  out[(long)group_tok[blockIdx.x] * d + col] = s; }
KERNELS(f32, float, ld_f32, st_f32)
KERNELS(bf16, unsigned short, ld_bf16, st_bf16)
KERNELS(f16, unsigned short, ld_f16, st_f16)
extern "C" __global__ void col_final(const float* part, float* out, int chunks, int d) {
  int col = blockIdx.x * blockDim.x + threadIdx.x;
  if (col < d) { float s = 0.f; for (int c = 0; c < chunks; c++) s += part[(long)c * d + col]; out[col] = s; } }
"#;

const MODULE: &str = "ferrospeed_fused";

fn func(dev: &CudaDevice, name: &str) -> Result<CudaFunction> {
    static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    Ok(dev.get_or_load_custom_func(name, MODULE, compile(&PTX, SRC, "fused GPT")?)?.into_cuda_function())
}

/// A contiguous tensor's device buffer (from its start offset), with its device.
pub(super) fn view<T: CudaDType + DeviceRepr, R>(t: &Tensor, f: impl FnOnce(&CudaDevice, CudaView<'_, T>) -> Result<R>) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(s) = &*storage else { candle_core::bail!("fused op: expected a CUDA tensor") };
    let Some((start, end)) = layout.contiguous_offsets() else { candle_core::bail!("fused op: expected a contiguous tensor") };
    f(s.device(), s.as_cuda_slice::<T>()?.slice(start..end))
}

pub(super) fn wrap<T: CudaDType + DeviceRepr>(s: CudaSlice<T>, dev: &CudaDevice, shape: &[usize]) -> Tensor {
    Tensor::from_storage(Storage::Cuda(CudaStorage::wrap_cuda_slice(s, dev.clone())), shape, BackpropOp::none(), false)
}

fn rows(n: usize, threads: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: (n as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 }
}

pub fn ln_forward(x: &Tensor, w: &Tensor, b: &Tensor, n: usize, d: usize) -> Result<LnOut> {
    norm_forward(x, w, Some(b), LN_EPS, n, d)
}

/// LayerNorm (with a bias) or RMSNorm (`b` `None`: no mean subtracted, no bias) over rows of `x`.
pub fn norm_forward(x: &Tensor, w: &Tensor, b: Option<&Tensor>, eps: f64, n: usize, d: usize) -> Result<LnOut> {
    fn run<T: CudaDType + DeviceRepr>(x: &Tensor, w: &Tensor, b: Option<&Tensor>, eps: f64, n: usize, d: usize) -> Result<LnOut> {
        let rms = i32::from(b.is_none());
        // RMSNorm has no bias: the kernel never reads its placeholder.
        let b = b.unwrap_or(w);
        let name = format!("ln_fwd_{}", suffix(x.dtype(), "layer norm")?);
        view::<T, _>(x, |dev, xv| {
            view::<T, _>(w, |_, wv| {
                view::<T, _>(b, |_, bv| {
                    let y = unsafe { dev.alloc::<T>(n * d)? };
                    let (mean, rstd) = unsafe { (dev.alloc::<f32>(n)?, dev.alloc::<f32>(n)?) };
                    let (d_i, eps) = (d as i32, eps as f32);
                    let f = func(dev, &name)?;
                    let stream = dev.cuda_stream();
                    let mut l = stream.launch_builder(&f);
                    l.arg(&xv).arg(&wv).arg(&bv).arg(&y).arg(&mean).arg(&rstd).arg(&d_i).arg(&eps).arg(&rms);
                    unsafe { l.launch(rows(n, 256)) }.map_err(launch_err)?;
                    Ok(LnOut { y: wrap(y, dev, &[n, d]), mean: wrap(mean, dev, &[n]), rstd: wrap(rstd, dev, &[n]) })
                })
            })
        })
    }
    let mut out = dispatch!(x.dtype(), "layer norm", run(x, w, b, eps, n, d))?;
    if b.is_none() {
        // The kernel leaves the mean unwritten when it subtracts none.
        out.mean = Tensor::zeros(n, DType::F32, x.device())?;
    }
    Ok(out)
}

/// Column sums of `g` `[n, d]` (and of `g · x̂` when `x` with its statistics is given), in f32.
fn col_sums<T: CudaDType + DeviceRepr>(g: &Tensor, x: Option<(&Tensor, &Tensor, &Tensor)>, n: usize, d: usize) -> Result<(Option<Tensor>, Tensor)> {
    const CHUNK: usize = 64;
    let chunks = n.div_ceil(CHUNK).max(1);
    let name = format!("col_part_{}", suffix(g.dtype(), "column sums")?);
    let has_x = i32::from(x.is_some());
    // Without `x`, its arguments are placeholders the kernel never reads.
    let (xt, mt, rt) = match x {
        Some(x) => x,
        None => {
            let z = Tensor::zeros(1, DType::F32, g.device())?;
            return col_sums_with::<T>(g, (g, &z, &z), 0, n, d, chunks, CHUNK, &name);
        }
    };
    col_sums_with::<T>(g, (xt, mt, rt), has_x, n, d, chunks, CHUNK, &name)
}

#[allow(clippy::too_many_arguments)]
fn col_sums_with<T: CudaDType + DeviceRepr>(
    g: &Tensor,
    (x, mean, rstd): (&Tensor, &Tensor, &Tensor),
    has_x: i32,
    n: usize,
    d: usize,
    chunks: usize,
    chunk: usize,
    name: &str,
) -> Result<(Option<Tensor>, Tensor)> {
    view::<T, _>(g, |dev, gv| {
        view::<T, _>(x, |_, xv| {
            view::<f32, _>(mean, |_, mv| {
                view::<f32, _>(rstd, |_, rv| {
                    let pw = dev.alloc_zeros::<f32>(if has_x == 1 { chunks * d } else { 1 })?;
                    let pb = dev.alloc_zeros::<f32>(chunks * d)?;
                    let (n_i, d_i, c_i) = (n as i32, d as i32, chunk as i32);
                    let f = func(dev, name)?;
                    let stream = dev.cuda_stream();
                    let mut l = stream.launch_builder(&f);
                    l.arg(&gv).arg(&xv).arg(&mv).arg(&rv).arg(&pw).arg(&pb).arg(&n_i).arg(&d_i).arg(&c_i).arg(&has_x);
                    let cfg = LaunchConfig { grid_dim: (d.div_ceil(32) as u32, chunks as u32, 1), block_dim: (32, 8, 1), shared_mem_bytes: 0 };
                    unsafe { l.launch(cfg) }.map_err(launch_err)?;
                    let finish = |part: &CudaSlice<f32>| -> Result<Tensor> {
                        let o = unsafe { dev.alloc::<f32>(d)? };
                        let f = func(dev, "col_final")?;
                        let ch = chunks as i32;
                        let stream = dev.cuda_stream();
                    let mut l = stream.launch_builder(&f);
                        l.arg(part).arg(&o).arg(&ch).arg(&d_i);
                        let cfg = LaunchConfig { grid_dim: (d.div_ceil(256) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
                        unsafe { l.launch(cfg) }.map_err(launch_err)?;
                        Ok(wrap(o, dev, &[d]))
                    };
                    let db = finish(&pb)?;
                    let dw = if has_x == 1 { Some(finish(&pw)?) } else { None };
                    Ok((dw, db))
                })
            })
        })
    })
}

pub fn col_sum(x: &Tensor, n: usize, d: usize) -> Result<Tensor> {
    let (_, db) = dispatch!(x.dtype(), "column sums", col_sums(x, None, n, d))?;
    Ok(db)
}

#[allow(clippy::too_many_arguments)]
pub fn ln_backward(dy: &Tensor, x: &Tensor, w: &Tensor, mean: &Tensor, rstd: &Tensor, res: Option<&Tensor>, n: usize, d: usize) -> Result<(Tensor, Tensor, Tensor)> {
    norm_backward(dy, x, w, mean, rstd, res, false, n, d)
}

/// The backward of [`norm_forward`]: `(dx + res, dw, db)` (`db` of a RMSNorm is the unused column sum).
#[allow(clippy::too_many_arguments)]
pub fn norm_backward(dy: &Tensor, x: &Tensor, w: &Tensor, mean: &Tensor, rstd: &Tensor, res: Option<&Tensor>, rms: bool, n: usize, d: usize) -> Result<(Tensor, Tensor, Tensor)> {
    #[allow(clippy::too_many_arguments)]
    fn run<T: CudaDType + DeviceRepr>(dy: &Tensor, x: &Tensor, w: &Tensor, mean: &Tensor, rstd: &Tensor, res: Option<&Tensor>, rms: i32, n: usize, d: usize) -> Result<Tensor> {
        let name = format!("ln_bwd_{}", suffix(x.dtype(), "layer norm")?);
        let has_res = i32::from(res.is_some());
        let res = res.unwrap_or(dy);
        view::<T, _>(dy, |dev, gv| {
            view::<T, _>(x, |_, xv| {
                view::<T, _>(w, |_, wv| {
                    view::<f32, _>(mean, |_, mv| {
                        view::<f32, _>(rstd, |_, rv| {
                            view::<T, _>(res, |_, resv| {
                                let dx = unsafe { dev.alloc::<T>(n * d)? };
                                let d_i = d as i32;
                                let f = func(dev, &name)?;
                                let stream = dev.cuda_stream();
                    let mut l = stream.launch_builder(&f);
                                l.arg(&gv).arg(&xv).arg(&wv).arg(&mv).arg(&rv).arg(&resv).arg(&dx).arg(&d_i).arg(&has_res).arg(&rms);
                                unsafe { l.launch(rows(n, 256)) }.map_err(launch_err)?;
                                Ok(wrap(dx, dev, &[n, d]))
                            })
                        })
                    })
                })
            })
        })
    }
    let dx = dispatch!(x.dtype(), "layer norm backward", run(dy, x, w, mean, rstd, res, i32::from(rms), n, d))?;
    let (dw, db) = dispatch!(x.dtype(), "layer norm backward", col_sums(dy, Some((x, mean, rstd)), n, d))?;
    let dw = dw.ok_or_else(|| candle_core::Error::Msg("layer norm backward: no weight gradient".into()))?;
    Ok((dx, dw, db))
}

/// What the elementwise bias kernel computes from `h`, the row bias `b` and a second input `y`.
#[derive(Clone, Copy)]
pub enum BiasOp {
    /// `gelu(h + b)`.
    Gelu = 0,
    /// `y · gelu'(h + b)` (`y` the output gradient).
    GeluBackward = 1,
    /// `h + b`.
    Add = 2,
    /// `y + h + b` (`y` the residual stream).
    AddResidual = 3,
}

/// One elementwise pass of `op` over `h` `[n, k]` with the bias `b` `[k]`.
pub fn bias_op(op: BiasOp, h: &Tensor, b: &Tensor, y: Option<&Tensor>, n: usize, k: usize) -> Result<Tensor> {
    fn run<T: CudaDType + DeviceRepr>(h: &Tensor, b: &Tensor, dy: Option<&Tensor>, n: usize, k: usize, mode: i32) -> Result<Tensor> {
        let dy = dy.unwrap_or(h);
        view::<T, _>(h, |dev, hv| {
            view::<T, _>(b, |_, bv| {
                view::<T, _>(dy, |_, gv| {
                    let out = unsafe { dev.alloc::<T>(n * k)? };
                    // 16 bytes a thread where rows are whole vectors and the inputs start on a 16-byte boundary.
                    let w = 16 / std::mem::size_of::<T>();
                    let aligned = |t: &Tensor| (t.layout().start_offset() * std::mem::size_of::<T>()) % 16 == 0;
                    let vec = k % w == 0 && aligned(h) && aligned(dy);
                    let (kernel, items) = if vec { ("bias_vec", n * k / w) } else { ("bias_gelu", n * k) };
                    let name = format!("{kernel}_{}", suffix(h.dtype(), "bias ops")?);
                    let (items_i, k_i) = (items as i64, k as i32);
                    let f = func(dev, &name)?;
                    let stream = dev.cuda_stream();
                    let mut l = stream.launch_builder(&f);
                    l.arg(&hv).arg(&bv).arg(&gv).arg(&out).arg(&items_i).arg(&k_i).arg(&mode);
                    let blocks = items.div_ceil(256).min(65_535 * 8) as u32;
                    let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
                    unsafe { l.launch(cfg) }.map_err(launch_err)?;
                    Ok(wrap(out, dev, &[n, k]))
                })
            })
        })
    }
    let mode = op as i32;
    dispatch!(h.dtype(), "bias ops", run(h, b, y, n, k, mode))
}

/// The token table's gradient `[vocab, d]` (f32): the rows of `g` `[n, d]` summed per token of `tokens`
/// (`n`, on the host), each token's rows in position order, so that the sums repeat bit for bit.
pub fn embedding_grad(g: &Tensor, tokens: &[u32], vocab: usize) -> Result<Tensor> {
    fn run<T: CudaDType + DeviceRepr>(g: &Tensor, tokens: &[u32], vocab: usize) -> Result<Tensor> {
        let (n, d) = g.dims2()?;
        let mut order: Vec<u32> = (0..n as u32).collect();
        order.sort_by_key(|&i| tokens[i as usize]);
        let (mut group_tok, mut group_start) = (Vec::new(), Vec::new());
        for (i, &pos) in order.iter().enumerate() {
            let tok = tokens[pos as usize];
            if group_tok.last() != Some(&tok) {
                group_tok.push(tok);
                group_start.push(i as u32);
            }
        }
        group_start.push(n as u32);
        view::<T, _>(g, |dev, gv| {
            let stream = dev.cuda_stream();
            let out = dev.alloc_zeros::<f32>(vocab * d)?;
            if !group_tok.is_empty() {
                let (order, tok, start) = (stream.clone_htod(&order).map_err(launch_err)?, stream.clone_htod(&group_tok).map_err(launch_err)?, stream.clone_htod(&group_start).map_err(launch_err)?);
                let f = func(dev, &format!("emb_grad_{}", suffix(g.dtype(), "embedding gradient")?))?;
                let mut l = stream.launch_builder(&f);
                let d_i = d as i32;
                l.arg(&gv).arg(&order).arg(&tok).arg(&start).arg(&out).arg(&d_i);
                let cfg = LaunchConfig { grid_dim: (group_tok.len() as u32, d.div_ceil(256) as u32, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
                unsafe { l.launch(cfg) }.map_err(launch_err)?;
            }
            Ok(wrap(out, dev, &[vocab, d]))
        })
    }
    if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
        candle_core::bail!("embedding gradient: token {bad} is outside the vocabulary of {vocab}")
    }
    dispatch!(g.dtype(), "embedding gradient", run(g, tokens, vocab))
}
