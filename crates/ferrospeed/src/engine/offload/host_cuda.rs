//! (feature cuda) The host tier of a GPU run, pipelined over blocks on candle's stream: a block's
//! reduced gradient window comes down into pinned memory while the block before it is updated; the
//! CPU AdamW (all cores) updates the host state and writes the compute copy into a second pinned
//! buffer, which goes up straight into the block's variables while the next block is updated.
//! Two buffers of each kind, sized for the largest such block, live as long as the engine (pinning
//! memory is slow); events order their reuse.
//!
//! Which blocks take this path (`BlockParams::fast_host`): state on the host tier, variables resident
//! and the window the whole block (stage 0, or stages 1–2 on one rank). Others take the general
//! host path: a plain copy down, and the compute copy published through the host.

use super::super::error::EngineError;
use crate::optim::{AdamW, ComputeElem};
use crate::shard::FlatParam;
use candle_core::cuda::cudarc::driver::{result, sys, CudaEvent, CudaView, DevicePtr, PinnedHostSlice};
use candle_core::cuda::{CudaDType, CudaDevice};
use candle_core::{DType, Var};
use half::{bf16, f16};
use std::collections::VecDeque;
use std::ops::Range;

fn cuda(e: impl std::fmt::Display) -> EngineError {
    EngineError::Unsupported(format!("offload transfer: {e}"))
}

/// The pinned buffers of the host tier.
pub struct HostStaging {
    dev: CudaDevice,
    /// Page-locked, not write-combined: the CPU reads the gradients.
    grads: Vec<PinnedHostSlice<f32>>,
    /// Page-locked and write-combined: the CPU only writes the compute copies.
    ups: Vec<PinnedHostSlice<u8>>,
    /// The upload last issued from each `ups` buffer.
    up_done: Vec<Option<CudaEvent>>,
    next_up: usize,
    elems: usize,
}

/// Bytes of pinned memory [`HostStaging::new`] takes for windows of `elems` in `dtype`.
pub fn staging_bytes(elems: usize, dtype: DType) -> u64 {
    2 * elems as u64 * (4 + dtype.size_in_bytes() as u64)
}

impl HostStaging {
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
        Ok(Self { dev: dev.clone(), grads, ups, up_done: vec![None, None], next_up: 0, elems })
    }
}

/// One step's use of the staging: downloads queued ahead, in block order.
pub struct DevicePass<'a> {
    staging: &'a mut HostStaging,
    /// Downloads in flight: block, buffer, the event after the copy.
    downs: VecDeque<(usize, usize, CudaEvent)>,
    free: Vec<usize>,
    /// The next block to consider for a download.
    next: usize,
    /// Time the host waited on copy events.
    waited: std::time::Duration,
}

impl<'a> DevicePass<'a> {
    pub fn new(staging: &'a mut HostStaging) -> Self {
        Self { staging, downs: VecDeque::new(), free: vec![1, 0], next: 0, waited: std::time::Duration::ZERO }
    }

    /// Queue the downloads of the next fast-path blocks (`grad(j)`: block j's reduced gradient window
    /// on the device, `None` when j does not take this path) while buffers are free.
    pub fn download_ahead<'g>(&mut self, num_blocks: usize, mut grad: impl FnMut(usize) -> Option<CudaView<'g, f32>>) -> Result<(), EngineError> {
        while self.next < num_blocks && !self.free.is_empty() {
            let j = self.next;
            self.next += 1;
            let Some(view) = grad(j) else { continue };
            if view.len() > self.staging.elems {
                return Err(cuda(format!("block {j}'s window of {} exceeds the staging of {}", view.len(), self.staging.elems)));
            }
            let b = self.free.pop().expect("checked");
            let stream = self.staging.dev.cuda_stream();
            let n = view.len();
            // The raw copy of exactly `n` elements (cudarc's `memcpy_dtoh` copies the whole
            // destination's length).
            let dst = &mut self.staging.grads[b].as_mut_slice().map_err(|e| cuda(format!("the pinned gradient buffer: {e}")))?[..n];
            let (src, _sync) = view.device_ptr(&stream);
            // SAFETY: `src` holds `n` f32 on the device; `dst` is pinned and not touched by the CPU
            // until the event below has completed.
            unsafe { result::memcpy_dtoh_async(dst, src, stream.cu_stream()) }.map_err(|e| cuda(format!("downloading block {j}'s gradient: {e}")))?;
            let done = stream.record_event(None).map_err(cuda)?;
            self.downs.push_back((j, b, done));
        }
        Ok(())
    }

    /// Update block `i` (its download queued by [`Self::download_ahead`]): AdamW over the host state
    /// from the downloaded gradient, the compute copy written into the block's variables.
    #[allow(clippy::too_many_arguments)]
    pub fn update(
        &mut self,
        i: usize,
        opt: &AdamW,
        flat: &FlatParam,
        window: &Range<usize>,
        master: &mut [f32],
        m: &mut [f32],
        v: &mut [f32],
        vars: &[Var],
        settings: &[crate::optim::GroupSettings],
        factor: f32,
        lr: f64,
        t: u64,
    ) -> Result<(), EngineError> {
        let (j, b, down) = self.downs.pop_front().ok_or_else(|| cuda(format!("no gradient download queued for block {i}")))?;
        if j != i {
            return Err(cuda(format!("the download queued is block {j}'s, block {i} comes next")));
        }
        let n = window.len();
        let u = self.staging.next_up;
        self.staging.next_up = 1 - u;
        let waiting = std::time::Instant::now();
        if let Some(e) = self.staging.up_done[u].take() {
            e.synchronize().map_err(cuda)?;
        }
        let dtype = vars.first().map_or(DType::F32, |v| v.dtype());
        {
            down.synchronize().map_err(|e| cuda(format!("waiting for block {i}'s gradient: {e}")))?;
            self.waited += waiting.elapsed();
            let grads = &self.staging.grads[b].as_slice().map_err(cuda)?[..n];
            let up = self.staging.ups[u].as_mut_slice().map_err(cuda)?;
            match dtype {
                DType::BF16 => fused::<bf16>(opt, flat, window, settings, master, m, v, grads, up, factor, lr, t),
                DType::F16 => fused::<f16>(opt, flat, window, settings, master, m, v, grads, up, factor, lr, t),
                _ => fused::<f32>(opt, flat, window, settings, master, m, v, grads, up, factor, lr, t),
            }
        }
        self.free.push(b);
        let stream = self.staging.dev.cuda_stream();
        let size = dtype.size_in_bytes();
        let up = &self.staging.ups[u];
        for (k, part) in flat.params_in(window.clone()) {
            let var = &vars[k];
            let start = flat.range(k).start;
            let dst = part.start - start..part.end - start;
            let src_off = (part.start - window.start) * size;
            // SAFETY: the pinned buffer outlives the copy (its reuse waits on `up_done`).
            let src = unsafe { std::slice::from_raw_parts(up.as_ptr().map_err(cuda)?.add(src_off), part.len() * size) };
            match dtype {
                DType::BF16 => upload::<bf16>(var, dst, src, &stream)?,
                DType::F16 => upload::<f16>(var, dst, src, &stream)?,
                _ => upload::<f32>(var, dst, src, &stream)?,
            }
        }
        self.staging.up_done[u] = Some(stream.record_event(None).map_err(cuda)?);
        Ok(())
    }

    /// Wait for the uploads, so that nothing the CPU writes next overlaps them; the time the pass
    /// waited on copies, in all.
    pub fn finish(self) -> Result<std::time::Duration, EngineError> {
        let t = std::time::Instant::now();
        for e in self.staging.up_done.iter_mut().filter_map(Option::take) {
            e.synchronize().map_err(cuda)?;
        }
        Ok(self.waited + t.elapsed())
    }
}

/// AdamW over each parameter part of the window, the compute copy into `up` (bytes of `T`).
#[allow(clippy::too_many_arguments)]
fn fused<T: ComputeElem>(
    opt: &AdamW,
    flat: &FlatParam,
    window: &Range<usize>,
    settings: &[crate::optim::GroupSettings],
    master: &mut [f32],
    m: &mut [f32],
    v: &mut [f32],
    grads: &[f32],
    up: &mut [u8],
    factor: f32,
    lr: f64,
    t: u64,
) {
    // SAFETY: pinned memory is page-aligned and holds at least `window.len()` elements of `T`.
    let out = unsafe { std::slice::from_raw_parts_mut(up.as_mut_ptr().cast::<T>(), window.len()) };
    for (k, part) in flat.params_in(window.clone()) {
        let r = part.start - window.start..part.end - window.start;
        let s = settings[k];
        opt.update_fused(&mut master[r.clone()], &grads[r.clone()], &mut m[r.clone()], &mut v[r.clone()], factor, lr * s.lr_scale, t, s.weight_decay, &mut out[r]);
    }
}

/// Copy `src` (bytes of `T`, pinned) into `range` of the variable's device storage.
fn upload<T: CudaDType + candle_core::cuda::cudarc::driver::DeviceRepr>(var: &Var, range: Range<usize>, src: &[u8], stream: &std::sync::Arc<candle_core::cuda::cudarc::driver::CudaStream>) -> Result<(), EngineError> {
    crate::cuda_kernels::with_tensor_view::<T, _>(var.as_tensor(), range, |_, view| {
        let (ptr, _sync) = view.device_ptr(stream);
        // SAFETY: the view covers `src.len()` bytes of the variable; the copy is ordered on the
        // stream every use of the variable runs on.
        unsafe { result::memcpy_htod_async(ptr as sys::CUdeviceptr, src, stream.cu_stream()) }.map_err(|e| candle_core::Error::Msg(e.to_string()))
    })
    .map_err(|e| cuda(format!("uploading the compute copy: {e}")))
}
