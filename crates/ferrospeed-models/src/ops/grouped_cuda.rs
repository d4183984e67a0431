//! The grouped products of `grouped.rs` on CUDA: one cuBLAS grouped GEMM (`cublasGemmGroupedBatchedEx`,
//! CUDA 12.5+; f32 accumulation) for every run of rows with its own weight. cudarc's safe wrapper passes
//! the arrays of matrix pointers from host memory, where cuBLAS reads them on the device: here they are
//! uploaded first (one small copy a call). Row-major `[r, c]` matrices are cuBLAS's column-major
//! `[c, r]`, so each product is computed transposed (`Cᵀ = op(B)ᵀ·op(A)ᵀ`).

use super::grouped::Form;
use candle_core::backend::BackendStorage;
use candle_core::cuda::cudarc::cublas::sys;
use candle_core::cuda::cudarc::driver::{CudaSlice, DevicePtr, DeviceRepr};
use candle_core::cuda::{CudaDType, CudaDevice};
use candle_core::op::BackpropOp;
use candle_core::{CudaStorage, DType, Result, Storage, Tensor};
use half::{bf16, f16};
use std::ffi::{c_int, c_void};

/// One product `C = op(A)·op(B)` in cuBLAS's column-major terms (`m × n`, inner `k`).
struct Problem {
    m: usize,
    n: usize,
    k: usize,
    ta: bool,
    tb: bool,
    lda: usize,
    ldb: usize,
    ldc: usize,
    a: u64,
    b: u64,
    c: u64,
}

/// The device address of element `at` of contiguous CUDA tensor `t`.
fn address<T: CudaDType + DeviceRepr>(t: &Tensor, at: usize) -> Result<u64> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(s) = &*storage else { candle_core::bail!("grouped product: expected a CUDA tensor") };
    let Some((start, _)) = layout.contiguous_offsets() else { candle_core::bail!("grouped product: expected a contiguous tensor") };
    let stream = s.device().cuda_stream();
    // One stream per device: the address stays valid while `t` lives, whatever the guard records.
    let (ptr, _guard) = s.as_cuda_slice::<T>()?.device_ptr(&stream);
    Ok(ptr + ((start + at) * std::mem::size_of::<T>()) as u64)
}

fn cuda_type(dtype: DType) -> Result<sys::cudaDataType_t> {
    Ok(match dtype {
        DType::BF16 => sys::cudaDataType_t::CUDA_R_16BF,
        DType::F16 => sys::cudaDataType_t::CUDA_R_16F,
        DType::F32 => sys::cudaDataType_t::CUDA_R_32F,
        other => candle_core::bail!("grouped product on CUDA: unsupported dtype {other:?}"),
    })
}

/// Run `problems` (each its own group) as one grouped GEMM on `dev`'s stream.
fn run(dev: &CudaDevice, dtype: DType, problems: &[Problem]) -> Result<()> {
    if problems.is_empty() {
        return Ok(());
    }
    let count = problems.len();
    let op = |t: bool| if t { sys::cublasOperation_t::CUBLAS_OP_T } else { sys::cublasOperation_t::CUBLAS_OP_N };
    let ta: Vec<_> = problems.iter().map(|p| op(p.ta)).collect();
    let tb: Vec<_> = problems.iter().map(|p| op(p.tb)).collect();
    let int = |f: &dyn Fn(&Problem) -> usize| -> Vec<c_int> { problems.iter().map(|p| f(p) as c_int).collect() };
    let (m, n, k) = (int(&|p| p.m), int(&|p| p.n), int(&|p| p.k));
    let (lda, ldb, ldc) = (int(&|p| p.lda), int(&|p| p.ldb), int(&|p| p.ldc));
    let (alpha, beta, sizes) = (vec![1f32; count], vec![0f32; count], vec![1 as c_int; count]);
    let stream = dev.cuda_stream();
    let pointers: Vec<u64> = problems.iter().map(|p| p.a).chain(problems.iter().map(|p| p.b)).chain(problems.iter().map(|p| p.c)).collect();
    let on_device: CudaSlice<u64> = stream.clone_htod(&pointers).map_err(|e| candle_core::Error::Msg(format!("grouped product: {e}")))?;
    let (base, _guard) = on_device.device_ptr(&stream);
    let word = std::mem::size_of::<u64>() as u64;
    let ty = cuda_type(dtype)?;
    let blas = dev.cublas_handle();
    let status = unsafe {
        sys::cublasGemmGroupedBatchedEx(
            *blas.handle(),
            ta.as_ptr(),
            tb.as_ptr(),
            m.as_ptr(),
            n.as_ptr(),
            k.as_ptr(),
            alpha.as_ptr() as *const c_void,
            base as *const *const c_void,
            ty,
            lda.as_ptr(),
            (base + word * count as u64) as *const *const c_void,
            ty,
            ldb.as_ptr(),
            beta.as_ptr() as *const c_void,
            (base + 2 * word * count as u64) as *const *mut c_void,
            ty,
            ldc.as_ptr(),
            count as c_int,
            sizes.as_ptr(),
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
        )
    };
    if status != sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
        candle_core::bail!("cublasGemmGroupedBatchedEx failed: {status:?}");
    }
    // The pointer array is freed in stream order (after the launch that reads it), its host copy
    // was staged by the upload: nothing to wait for.
    Ok(())
}

fn output<T: CudaDType + DeviceRepr>(dev: &CudaDevice, shape: &[usize]) -> Result<Tensor> {
    // Every element is written (beta = 0: cuBLAS never reads C).
    let s: CudaSlice<T> = unsafe { dev.alloc::<T>(shape.iter().product())? };
    Ok(Tensor::from_storage(Storage::Cuda(CudaStorage::wrap_cuda_slice(s, dev.clone())), shape, BackpropOp::none(), false))
}

fn device(t: &Tensor) -> Result<CudaDevice> {
    match t.device() {
        candle_core::Device::Cuda(d) => Ok(d.clone()),
        _ => candle_core::bail!("grouped product: expected a CUDA tensor"),
    }
}

/// `grouped::grouped_matmul` on CUDA (`x` contiguous).
pub fn matmul(x: &Tensor, weights: &[Tensor], lens: &[usize], form: Form) -> Result<Tensor> {
    fn go<T: CudaDType + DeviceRepr>(x: &Tensor, weights: &[Tensor], lens: &[usize], form: Form) -> Result<Tensor> {
        let (rows, k) = x.dims2()?;
        let dev = device(x)?;
        let weights: Vec<Tensor> = weights.iter().map(|w| w.contiguous()).collect::<Result<_>>()?;
        let n = match (weights.first(), form) {
            (Some(w), Form::Transposed) => w.dim(0)?,
            (Some(w), Form::Plain) => w.dim(1)?,
            (None, _) => 0,
        };
        let out = output::<T>(&dev, &[rows, n])?;
        let mut problems = Vec::new();
        let mut at = 0;
        for (w, &len) in weights.iter().zip(lens) {
            if len > 0 {
                // Row-major Y = X·Wᵀ (W [n, k]) is column-major Yᵀ = op(W)·Xᵀ, op = T; X·W (W [k, n]): op = N.
                let (ta, lda) = match form {
                    Form::Transposed => (true, k),
                    Form::Plain => (false, n),
                };
                problems.push(Problem { m: n, n: len, k, ta, tb: false, lda, ldb: k, ldc: n, a: address::<T>(w, 0)?, b: address::<T>(x, at * k)?, c: address::<T>(&out, at * n)? });
            }
            at += len;
        }
        run(&dev, x.dtype(), &problems)?;
        Ok(out)
    }
    match x.dtype() {
        DType::F32 => go::<f32>(x, weights, lens, form),
        DType::BF16 => go::<bf16>(x, weights, lens, form),
        DType::F16 => go::<f16>(x, weights, lens, form),
        other => candle_core::bail!("grouped product on CUDA: unsupported dtype {other:?}"),
    }
}

/// `grouped::grouped_weight_grad` on CUDA (`a`, `b` contiguous).
pub fn weight_grad(a: &Tensor, b: &Tensor, lens: &[usize]) -> Result<Vec<Option<Tensor>>> {
    fn go<T: CudaDType + DeviceRepr>(a: &Tensor, b: &Tensor, lens: &[usize]) -> Result<Vec<Option<Tensor>>> {
        let (p, q) = (a.dim(1)?, b.dim(1)?);
        let dev = device(a)?;
        let used: Vec<usize> = (0..lens.len()).filter(|&i| lens[i] > 0).collect();
        let out = output::<T>(&dev, &[used.len().max(1), p, q])?;
        let mut problems = Vec::with_capacity(used.len());
        let starts: Vec<usize> = lens.iter().scan(0, |s, &l| {
            let at = *s;
            *s += l;
            Some(at)
        }).collect();
        for (slot, &i) in used.iter().enumerate() {
            // Row-major G = Aᵢᵀ·Bᵢ [p, q] is column-major Gᵀ [q, p] = Bᵢ(col-major [q, len])·op(Aᵢ), op = T.
            problems.push(Problem { m: q, n: p, k: lens[i], ta: false, tb: true, lda: q, ldb: p, ldc: q, a: address::<T>(b, starts[i] * q)?, b: address::<T>(a, starts[i] * p)?, c: address::<T>(&out, slot * p * q)? });
        }
        run(&dev, a.dtype(), &problems)?;
        let mut grads = vec![None; lens.len()];
        for (slot, &i) in used.iter().enumerate() {
            grads[i] = Some(out.get(slot)?);
        }
        Ok(grads)
    }
    match a.dtype() {
        DType::F32 => go::<f32>(a, b, lens),
        DType::BF16 => go::<bf16>(a, b, lens),
        DType::F16 => go::<f16>(a, b, lens),
        other => candle_core::bail!("grouped product on CUDA: unsupported dtype {other:?}"),
    }
}
