//! A block's optimizer state in CUDA memory: fp32 master weights and AdamW moments over this rank's
//! window as `CudaSlice`s (raw buffers: the kernels take sub-ranges of them, and candle's op machinery
//! would add nothing), allocated through candle's `CudaDevice` so that all work stays on its stream;
//! and where the update writes the compute-dtype copy — the block's variables themselves (parameters
//! resident, optimizer not sharded), or a compute-dtype tensor over the window that is gathered.

use super::host_buf::HostBuf;
use crate::comm::nccl::{NcclComm, NcclPending};
use crate::comm::CommError;
use crate::optim::{adamw_update, cast_into, AdamW};
use crate::shard::FlatParam;
use candle_core::cuda::cudarc::driver::{CudaEvent, CudaSlice, CudaStream, CudaView, DeviceRepr};
use std::sync::Arc;
use candle_core::cuda::cudarc::nccl::NcclType;
use candle_core::cuda::{CudaDType, CudaDevice};
use candle_core::op::BackpropOp;
use candle_core::{CudaStorage, DType, Device, Result, Storage, Tensor, Var};
use half::{bf16, f16};
use std::ops::Range;

/// A block's compute copy gathered on the device: every rank's window side by side (the whole padded
/// flat buffer), complete once the compute stream has waited for what fills it: the NCCL all-gather,
/// or the upload of a pinned shard on the copy stream, if there is one.
pub struct DeviceGather {
    full: Tensor,
    pending: Option<GatherWait>,
}

/// What a gathered buffer waits for.
pub enum GatherWait {
    /// An NCCL all-gather writing it.
    Nccl(NcclPending),
    /// A copy on another stream writing it, complete at `event`; `stream` (the compute stream) waits.
    Copy { event: CudaEvent, stream: Arc<CudaStream> },
}

impl GatherWait {
    fn wait(self) -> std::result::Result<(), CommError> {
        match self {
            GatherWait::Nccl(p) => p.wait(),
            GatherWait::Copy { event, stream } => stream.wait(&event).map_err(|e| CommError::Unsupported { what: "a parameter upload".into(), reason: e.to_string() }),
        }
    }
}

impl DeviceGather {
    /// `full`, complete once `pending` is.
    pub fn new(full: Tensor, pending: Option<GatherWait>) -> Self {
        Self { full, pending }
    }

    /// The gathered buffer; later work on the compute stream sees the collective's result.
    pub fn finish(mut self) -> std::result::Result<Tensor, CommError> {
        if let Some(p) = self.pending.take() {
            p.wait()?;
        }
        Ok(self.full.clone())
    }
}

impl Drop for DeviceGather {
    /// Dropped unfinished (an error elsewhere): the buffer is freed in compute-stream order, so that
    /// stream must first wait for the collective still writing it.
    fn drop(&mut self) {
        if let Some(p) = self.pending.take() {
            let _ = p.wait();
        }
    }
}

/// Start gathering every rank's compute copy `compute` into the whole block on the device: `compute`
/// itself when it is the whole block (world 1), else an NCCL all-gather. `None` without NCCL at
/// world > 1 (the host path gathers).
pub fn device_gather(dev: &CudaDevice, compute: &Tensor, nccl: Option<&NcclComm>, padded: usize) -> std::result::Result<Option<DeviceGather>, CommError> {
    if compute.elem_count() == padded {
        return Ok(Some(DeviceGather { full: compute.clone(), pending: None }));
    }
    let Some(nccl) = nccl else { return Ok(None) };
    fn run<T: CudaDType + DeviceRepr + NcclType>(dev: &CudaDevice, nccl: &NcclComm, compute: &Tensor, padded: usize) -> std::result::Result<DeviceGather, CommError> {
        let cuda = |e: candle_core::Error| CommError::Unsupported { what: "a device all-gather".into(), reason: e.to_string() };
        let mut full = unsafe { dev.alloc::<T>(padded) }.map_err(cuda)?;
        let pending = {
            let (storage, layout) = compute.storage_and_layout();
            let Storage::Cuda(cs) = &*storage else { return Err(cuda(candle_core::Error::Msg("the compute copy is not on the GPU".into()))) };
            if layout.start_offset() != 0 || !layout.is_contiguous() {
                return Err(cuda(candle_core::Error::Msg("the compute copy is not a whole contiguous buffer".into())));
            }
            nccl.all_gather(cs.as_cuda_slice::<T>().map_err(cuda)?, &mut full)?
        };
        let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(full, dev.clone()));
        let full = Tensor::from_storage(storage, padded, BackpropOp::none(), false);
        Ok(DeviceGather { full, pending: Some(GatherWait::Nccl(pending)) })
    }
    let gather = match compute.dtype() {
        DType::BF16 => run::<bf16>(dev, nccl, compute, padded)?,
        DType::F16 => run::<f16>(dev, nccl, compute, padded)?,
        _ => run::<f32>(dev, nccl, compute, padded)?,
    };
    Ok(Some(gather))
}

pub struct DeviceWindow {
    dev: CudaDevice,
    master: CudaSlice<f32>,
    m: CudaSlice<f32>,
    v: CudaSlice<f32>,
    /// The compute copy of the window when it is not the variables (sharded optimizer or parameters).
    compute: Option<Tensor>,
}

/// Where the compute copy of `part` (a range of the flat buffer inside `window`) is written: a tensor
/// and the range of it.
fn target<'a>(compute: Option<&'a Tensor>, vars: Option<&'a [Var]>, flat: &FlatParam, window: &Range<usize>, j: usize, part: &Range<usize>) -> Result<(&'a Tensor, Range<usize>)> {
    if let Some(t) = compute {
        return Ok((t, part.start - window.start..part.end - window.start));
    }
    let Some(var) = vars.and_then(|v| v.get(j)) else { candle_core::bail!("no variable for parameter {j} to write the update into") };
    let start = flat.range(j).start;
    Ok((var.as_tensor(), part.start - start..part.end - start))
}

impl DeviceWindow {
    /// Upload a window's state when `device` is a CUDA device (`None` on the CPU). `compute` is the
    /// compute copy of the window when the variables are not written directly.
    pub fn new(device: &Device, master: &[f32], m: &[f32], v: &[f32], compute: Option<&HostBuf>) -> Result<Option<Self>> {
        let Device::Cuda(dev) = device else { return Ok(None) };
        let compute = compute.map(|c| c.tensor(device)).transpose()?;
        Ok(Some(Self { dev: dev.clone(), master: dev.clone_htod(master)?, m: dev.clone_htod(m)?, v: dev.clone_htod(v)?, compute }))
    }

    /// Master weights, m and v, copied to the host.
    pub fn download(&self) -> Result<[Vec<f32>; 3]> {
        Ok([self.dev.clone_dtoh(&self.master)?, self.dev.clone_dtoh(&self.m)?, self.dev.clone_dtoh(&self.v)?])
    }

    /// Replace the state by host values (restoring a checkpoint), and the compute copy with it.
    pub fn upload(&mut self, master: &[f32], m: &[f32], v: &[f32], flat: &FlatParam, window: &Range<usize>, vars: Option<&[Var]>) -> Result<()> {
        for (dst, src) in [(&mut self.master, master), (&mut self.m, m), (&mut self.v, v)] {
            if dst.len() != src.len() {
                candle_core::bail!("restoring {} values into a device window of {}", src.len(), dst.len())
            }
            self.dev.memcpy_htod(src, dst)?;
        }
        match &self.compute {
            Some(c) => cast_into(&self.master.slice(..), c, 0..window.len())?,
            None => {
                for (j, part) in flat.params_in(window.clone()) {
                    let (t, r) = target(None, vars, flat, window, j, &part)?;
                    cast_into(&self.master.slice(part.start - window.start..part.end - window.start), t, r)?;
                }
            }
        }
        Ok(())
    }

    /// The compute copy of the window on the host (one copy), to gather or to keep as the shard.
    pub fn compute_host(&self) -> Result<Option<HostBuf>> {
        self.compute.as_ref().map(HostBuf::from_tensor).transpose()
    }

    /// Start gathering every rank's compute copy into the whole block on the device: the window itself
    /// when it is the whole block (world 1), else an NCCL all-gather. `None` without a compute copy
    /// (stage 0) or without NCCL at world > 1 (the host path gathers).
    pub fn start_gather(&self, nccl: Option<&NcclComm>, padded: usize) -> std::result::Result<Option<DeviceGather>, CommError> {
        match self.compute.as_ref() {
            Some(compute) => device_gather(&self.dev, compute, nccl, padded),
            None => Ok(None),
        }
    }

    /// Whether [`Self::start_gather`] gathers on the device (given NCCL or not) for a block of `padded`.
    pub fn gathers_on_device(&self, nccl: bool, padded: usize) -> bool {
        self.compute.as_ref().is_some_and(|c| nccl || c.elem_count() == padded)
    }

    /// Bytes of the compute copy kept on the device (the shard a stage 3 rank holds).
    pub fn compute_bytes(&self) -> usize {
        self.compute.as_ref().map_or(0, |c| c.elem_count() * c.dtype().size_in_bytes())
    }

    /// AdamW over every parameter part in `window` (decay per parameter), from `grad` (the reduced
    /// gradient over the window) times `factor`; writes the compute copy.
    #[allow(clippy::too_many_arguments)]
    pub fn update(
        &mut self,
        opt: &AdamW,
        flat: &FlatParam,
        window: &Range<usize>,
        vars: Option<&[Var]>,
        grad: &CudaView<'_, f32>,
        factor: f32,
        lr: f64,
        t: u64,
        settings: &[crate::optim::GroupSettings],
    ) -> Result<()> {
        if grad.len() != window.len() {
            candle_core::bail!("a gradient of {} elements for a window of {}", grad.len(), window.len())
        }
        for (j, part) in flat.params_in(window.clone()) {
            let r = part.start - window.start..part.end - window.start;
            let (out, out_range) = target(self.compute.as_ref(), vars, flat, window, j, &part)?;
            let s = settings[j];
            adamw_update(
                opt,
                &mut self.master.slice_mut(r.clone()),
                &mut self.m.slice_mut(r.clone()),
                &mut self.v.slice_mut(r.clone()),
                &grad.slice(r),
                factor,
                out,
                out_range,
                lr * s.lr_scale,
                t,
                s.weight_decay,
            )?;
        }
        Ok(())
    }

}
