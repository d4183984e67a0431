//! (feature cuda) The host tier's link on a GPU (`staging.rs` runs the pipeline): gradient windows
//! come down into page-locked buffers and compute copies go up from write-combined page-locked
//! buffers straight into the variables, as asynchronous copies on candle's stream, ordered by CUDA
//! events. Pinning memory is slow: the buffers live as long as the engine.

use super::super::error::EngineError;
use super::staging::Link;
use candle_core::cuda::cudarc::driver::{result, sys, CudaEvent, CudaView, DevicePtr, PinnedHostSlice};
use candle_core::cuda::{CudaDType, CudaDevice};
use candle_core::{DType, Tensor};
use half::{bf16, f16};
use std::ops::Range;

fn cuda(e: impl std::fmt::Display) -> EngineError {
    EngineError::Unsupported(format!("offload transfer: {e}"))
}

/// The pinned buffers of the host tier on a GPU.
pub struct CudaLink {
    dev: CudaDevice,
    /// Page-locked, not write-combined: the CPU reads the gradients.
    grads: Vec<PinnedHostSlice<f32>>,
    /// Page-locked and write-combined: the CPU only writes the compute copies.
    ups: Vec<PinnedHostSlice<u8>>,
    elems: usize,
}

/// Bytes of pinned memory [`CudaLink::new`] takes for windows of `elems` in `dtype`.
pub fn staging_bytes(elems: usize, dtype: DType) -> u64 {
    2 * elems as u64 * (4 + dtype.size_in_bytes() as u64)
}

impl CudaLink {
    /// Two gradient and two upload buffers for windows of up to `elems` elements of `dtype`.
    pub fn new(dev: &CudaDevice, elems: usize, dtype: DType) -> Result<Self, EngineError> {
        let ctx = dev.cuda_stream().context().clone();
        let mut grads = Vec::new();
        let mut ups = Vec::new();
        for _ in 0..2 {
            // SAFETY: the buffers are written by a copy or by the CPU before anything reads them.
            grads.push(unsafe { ctx.alloc_pinned_with_flags::<f32>(elems, 0) }.map_err(cuda)?);
            ups.push(unsafe { ctx.alloc_pinned::<u8>(elems * dtype.size_in_bytes()) }.map_err(cuda)?);
        }
        Ok(Self { dev: dev.clone(), grads, ups, elems })
    }
}

impl Link for CudaLink {
    type Event = CudaEvent;
    type Grad<'g> = CudaView<'g, f32>;

    fn capacity(&self) -> usize {
        self.elems
    }

    fn bytes(&self) -> usize {
        self.grads.iter().map(|g| g.len() * 4).sum::<usize>() + self.ups.iter().map(PinnedHostSlice::len).sum::<usize>()
    }

    fn grad_len(grad: &CudaView<'_, f32>) -> usize {
        grad.len()
    }

    fn download(&mut self, b: usize, j: usize, view: CudaView<'_, f32>) -> Result<CudaEvent, EngineError> {
        let stream = self.dev.cuda_stream();
        let n = view.len();
        // The raw copy of exactly `n` elements (cudarc's `memcpy_dtoh` copies the whole
        // destination's length).
        let dst = &mut self.grads[b].as_mut_slice().map_err(|e| cuda(format!("the pinned gradient buffer: {e}")))?[..n];
        let (src, _sync) = view.device_ptr(&stream);
        // SAFETY: `src` holds `n` f32 on the device; `dst` is pinned and not touched by the CPU
        // until the event below has completed (the pipeline waits for it).
        unsafe { result::memcpy_dtoh_async(dst, src, stream.cu_stream()) }.map_err(|e| cuda(format!("downloading block {j}'s gradient: {e}")))?;
        stream.record_event(None).map_err(cuda)
    }

    fn wait(&self, event: CudaEvent) -> Result<(), EngineError> {
        event.synchronize().map_err(cuda)
    }

    fn buffers(&mut self, b: usize, n: usize, u: usize) -> Result<(&[f32], &mut [u8]), EngineError> {
        let grads = &self.grads[b].as_slice().map_err(cuda)?[..n];
        let up = self.ups[u].as_mut_slice().map_err(cuda)?;
        Ok((grads, up))
    }

    fn upload(&mut self, u: usize, offset: usize, dst: &Tensor, range: Range<usize>) -> Result<(), EngineError> {
        let stream = self.dev.cuda_stream();
        let size = dst.dtype().size_in_bytes();
        let up = &self.ups[u];
        // SAFETY: the pinned buffer outlives the copy (its reuse waits on the pipeline's event).
        let src = unsafe { std::slice::from_raw_parts(up.as_ptr().map_err(cuda)?.add(offset * size), range.len() * size) };
        match dst.dtype() {
            DType::BF16 => upload::<bf16>(dst, range, src, &stream),
            DType::F16 => upload::<f16>(dst, range, src, &stream),
            _ => upload::<f32>(dst, range, src, &stream),
        }
    }

    fn record(&mut self) -> Result<CudaEvent, EngineError> {
        self.dev.cuda_stream().record_event(None).map_err(cuda)
    }
}

/// Copy `src` (bytes of `T`, pinned) into `range` of the tensor's device storage.
fn upload<T: CudaDType + candle_core::cuda::cudarc::driver::DeviceRepr>(dst: &Tensor, range: Range<usize>, src: &[u8], stream: &std::sync::Arc<candle_core::cuda::cudarc::driver::CudaStream>) -> Result<(), EngineError> {
    crate::cuda_kernels::with_tensor_view::<T, _>(dst, range, |_, view| {
        let (ptr, _sync) = view.device_ptr(stream);
        // SAFETY: the view covers `src.len()` bytes of the variable; the copy is ordered on the
        // stream every use of the variable runs on.
        unsafe { result::memcpy_htod_async(ptr as sys::CUdeviceptr, src, stream.cu_stream()) }.map_err(|e| candle_core::Error::Msg(e.to_string()))
    })
    .map_err(|e| cuda(format!("uploading the compute copy: {e}")))
}
