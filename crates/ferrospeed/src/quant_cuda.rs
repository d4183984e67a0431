//! (feature cuda) NF4 dequantisation on the GPU: a quantised weight (`super::quant::Nf4`) kept in device
//! memory (codes, 8-bit absmax, second-level scales: half a byte a weight) and expanded to the compute
//! dtype by one kernel just before a matmul reads it, with the CPU reference's arithmetic (`_rn`
//! intrinsics, no fused multiply-add) so the two give the same bits (tests/gpu_lora.rs).

use crate::cuda_kernels::{compile, elementwise, launch_err, suffix};
use crate::quant::{dynamic_map, Nf4};
use candle_core::cuda::cudarc::driver::{CudaFunction, CudaSlice, CudaViewMut, DeviceRepr, PushKernelArg, ValidAsZeroBits};
use candle_core::cuda::{CudaDType, CudaDevice};
use candle_core::op::BackpropOp;
use candle_core::{CudaStorage, DType, Result, Storage, Tensor};
use std::ops::Range;
use std::sync::OnceLock;

const SRC: &str = r#"
__constant__ float NF4[16] = { -1.000000000e+00f, -6.961928010e-01f, -5.250730515e-01f, -3.949174881e-01f, -2.844413817e-01f, -1.847734302e-01f, -9.105003625e-02f, 0.000000000e+00f, 7.958029956e-02f, 1.609302014e-01f, 2.461123019e-01f, 3.379152417e-01f, 4.407098293e-01f, 5.626170039e-01f, 7.229568362e-01f, 1.000000000e+00f };
#define NF4_KERNEL(NAME, T, ST) \
extern "C" __global__ void nf4_dequant_##NAME(T* out, const unsigned char* packed, const unsigned char* qabsmax, const float* absmax2, const float* dyn, float offset, long n) { \
  __shared__ float code[16]; \
  if (threadIdx.x < 16) code[threadIdx.x] = NF4[threadIdx.x]; \
  __syncthreads(); \
  GRID_STRIDE(i, n) { \
    unsigned char byte = packed[i >> 1]; \
    int c = (i & 1) ? (byte & 15) : (byte >> 4); \
    long blk = i >> 6; \
    float am = __fadd_rn(__fmul_rn(dyn[qabsmax[blk]], absmax2[blk >> 8]), offset); \
    out[i] = ST(__fmul_rn(code[c], am)); } } \
extern "C" __global__ void nf4_dequant8_##NAME(T* out, const unsigned int* packed, const unsigned char* qabsmax, const float* absmax2, const float* dyn, float offset, long n8) { \
  __shared__ float code[16]; \
  if (threadIdx.x < 16) code[threadIdx.x] = NF4[threadIdx.x]; \
  __syncthreads(); \
  GRID_STRIDE(i, n8) { \
    unsigned int w = packed[i]; \
    long blk = i >> 3; \
    float am = __fadd_rn(__fmul_rn(dyn[qabsmax[blk]], absmax2[blk >> 8]), offset); \
    union { T v[8]; uint4 u[sizeof(T) / 2]; } pk; \
    for (int k = 0; k < 4; k++) { \
      unsigned int byte = (w >> (8 * k)) & 255u; \
      pk.v[2 * k] = ST(__fmul_rn(code[byte >> 4], am)); \
      pk.v[2 * k + 1] = ST(__fmul_rn(code[byte & 15u], am)); } \
    uint4* o = (uint4*)(out + 8 * i); \
    for (int q = 0; q < (int)(sizeof(T) / 2); q++) o[q] = pk.u[q]; } }
NF4_KERNEL(f32, float, st_f32)
NF4_KERNEL(bf16, unsigned short, st_bf16)
NF4_KERNEL(f16, unsigned short, st_f16)
"#;

/// A quantised weight in device memory.
pub struct DeviceNf4 {
    dev: CudaDevice,
    len: usize,
    packed: CudaSlice<u8>,
    qabsmax: CudaSlice<u8>,
    absmax2: CudaSlice<f32>,
    dynamic: CudaSlice<f32>,
    offset: f32,
}

impl DeviceNf4 {
    /// Upload `q` to `dev`.
    pub fn new(dev: &CudaDevice, q: &Nf4) -> Result<Self> {
        Ok(Self {
            dev: dev.clone(),
            len: q.len,
            packed: dev.clone_htod(&q.packed)?,
            qabsmax: dev.clone_htod(&q.qabsmax)?,
            absmax2: dev.clone_htod(&q.absmax2)?,
            dynamic: dev.clone_htod(&dynamic_map())?,
            offset: q.offset,
        })
    }

    /// Bytes of device memory it holds.
    pub fn bytes(&self) -> usize {
        self.packed.len() + self.qabsmax.len() + 4 * (self.absmax2.len() + self.dynamic.len())
    }

    /// Launch a kernel into `out` (its `len` elements, starting `at` elements into its buffer): eight
    /// values a thread with 16-byte stores where `len` and `at` are multiples of 8, one a thread
    /// otherwise; the same arithmetic either way.
    fn run_into<T: DeviceRepr>(&self, funcs: &(CudaFunction, CudaFunction), out: &mut CudaViewMut<'_, T>, at: usize) -> Result<()> {
        if out.len() != self.len {
            candle_core::bail!("NF4 dequantisation of {} values into {}", self.len, out.len())
        }
        let stream = self.dev.cuda_stream();
        if self.len % 8 == 0 && at % 8 == 0 {
            let n8 = (self.len / 8) as i64;
            let mut b = stream.launch_builder(&funcs.1);
            b.arg(out).arg(&self.packed).arg(&self.qabsmax).arg(&self.absmax2).arg(&self.dynamic).arg(&self.offset).arg(&n8);
            unsafe { b.launch(elementwise(self.len / 8)) }.map_err(launch_err)?;
            return Ok(());
        }
        let n = self.len as i64;
        let mut b = stream.launch_builder(&funcs.0);
        b.arg(out).arg(&self.packed).arg(&self.qabsmax).arg(&self.absmax2).arg(&self.dynamic).arg(&self.offset).arg(&n);
        unsafe { b.launch(elementwise(self.len)) }.map_err(launch_err)?;
        Ok(())
    }

    /// The weight in `dtype` (f32, bf16 or f16) with `shape`: a new device tensor.
    pub fn dequantize(&self, dtype: DType, shape: &[usize]) -> Result<Tensor> {
        assemble(&self.dev, dtype, self.len, &[], &[(0, self)])?.reshape(shape)
    }
}

/// The dequantisation kernels for `dtype`: one value a thread, and eight.
fn kernels(dev: &CudaDevice, dtype: DType) -> Result<(CudaFunction, CudaFunction)> {
    static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    let ptx = compile(&PTX, SRC, "NF4")?;
    let sfx = suffix(dtype, "NF4 dequantisation")?;
    let load = |name: String| dev.get_or_load_custom_func(&name, "ferrospeed_nf4", ptx).map(|f| f.into_cuda_function());
    Ok((load(format!("nf4_dequant_{sfx}"))?, load(format!("nf4_dequant8_{sfx}"))?))
}

/// A new buffer of `len` elements of `dtype` (f32, bf16 or f16) on `dev`: each dense tensor
/// `(offset, tensor)` of `dense` (contiguous, of `dtype`) copied to its offset and each NF4 weight of
/// `quantized` dequantised to its offset, one kernel each (a LoRA block's frozen base for one use,
/// so that adjacent weights are one matrix without a copy). What neither covers is zeroed.
pub fn assemble(dev: &CudaDevice, dtype: DType, len: usize, dense: &[(usize, &Tensor)], quantized: &[(usize, &DeviceNf4)]) -> Result<Tensor> {
    fn typed<T: DeviceRepr + CudaDType + ValidAsZeroBits>(dev: &CudaDevice, dtype: DType, len: usize, dense: &[(usize, &Tensor)], quantized: &[(usize, &DeviceNf4)]) -> Result<Tensor> {
        let funcs = kernels(dev, dtype)?;
        let stream = dev.cuda_stream();
        // Every element is written below: by a copy, a kernel, or the zeroing of the gaps.
        let mut out = unsafe { dev.alloc::<T>(len)? };
        let mut covered: Vec<Range<usize>> = Vec::new();
        for &(at, t) in dense {
            let n = t.elem_count();
            if t.dtype() != dtype || at + n > len {
                candle_core::bail!("assembling a {dtype:?} buffer of {len}: a {:?} tensor of {n} at {at}", t.dtype())
            }
            let t = t.contiguous()?;
            let (storage, layout) = t.storage_and_layout();
            let Storage::Cuda(cs) = &*storage else { candle_core::bail!("expected a CUDA tensor, found one on {:?}", t.device()) };
            let off = layout.start_offset();
            stream.memcpy_dtod(&cs.as_cuda_slice::<T>()?.slice(off..off + n), &mut out.slice_mut(at..at + n)).map_err(launch_err)?;
            covered.push(at..at + n);
        }
        for &(at, q) in quantized {
            if at + q.len > len {
                candle_core::bail!("assembling a buffer of {len}: an NF4 weight of {} at {at}", q.len)
            }
            q.run_into(&funcs, &mut out.slice_mut(at..at + q.len), at)?;
            covered.push(at..at + q.len);
        }
        covered.sort_by_key(|r| r.start);
        let mut at = 0;
        for r in covered.iter().cloned().chain(std::iter::once(len..len)) {
            if r.start > at {
                stream.memset_zeros(&mut out.slice_mut(at..r.start)).map_err(launch_err)?;
            }
            at = at.max(r.end);
        }
        let storage = CudaStorage::wrap_cuda_slice(out, dev.clone());
        Ok(Tensor::from_storage(Storage::Cuda(storage), len, BackpropOp::none(), false))
    }
    match dtype {
        DType::BF16 => typed::<half::bf16>(dev, dtype, len, dense, quantized),
        DType::F16 => typed::<half::f16>(dev, dtype, len, dense, quantized),
        DType::F32 => typed::<f32>(dev, dtype, len, dense, quantized),
        other => candle_core::bail!("NF4 dequantisation to {other:?}: f32, bf16 or f16"),
    }
}
