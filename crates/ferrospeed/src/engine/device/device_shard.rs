//! (feature cuda) Where a stage-3 block's compute-dtype shard lives on a GPU when its optimizer state
//! is not in device memory (host or NVMe tier; a device-tier block keeps it in its `DeviceWindow`):
//!
//! - [`DeviceShard`] (`zero.offload_params = "none"`): in device memory, refreshed once per step by
//!   the publish (one upload of the updated shard) and gathered on the device like a device-tier
//!   block's — no transfer per use;
//! - [`PinnedShard`] (`zero.offload_params = "cpu"`): in page-locked host memory, uploaded before each
//!   use on a copy stream of its own, started when the gather is (a block ahead: the prefetch), so the
//!   copy overlaps the compute of the block before; the compute stream waits for it by an event.

use super::device_state::{device_gather, DeviceGather, GatherWait};
use super::host_buf::HostBuf;
use crate::comm::nccl::NcclComm;
use crate::comm::CommError;
use candle_core::cuda::cudarc::driver::{result, CudaEvent, CudaStream, DevicePtr, DeviceRepr, PinnedHostSlice};
use candle_core::cuda::CudaDevice;
use candle_core::op::BackpropOp;
use candle_core::{CudaStorage, DType, Device, Result, Storage, Tensor};
use std::sync::{Arc, Mutex};

fn msg(e: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

/// A compute-dtype shard in device memory.
pub struct DeviceShard {
    dev: CudaDevice,
    compute: Tensor,
}

impl DeviceShard {
    /// `shard` uploaded to `device` when it is a CUDA device (`None` on the CPU, where host memory
    /// is the device's).
    pub fn new(device: &Device, shard: &HostBuf) -> Result<Option<Self>> {
        let Device::Cuda(dev) = device else { return Ok(None) };
        Ok(Some(Self { dev: dev.clone(), compute: shard.tensor(device)? }))
    }

    /// Replace the values by the updated shard (the publish of a host-tier block).
    pub fn set(&mut self, shard: &HostBuf) -> Result<()> {
        self.compute = shard.tensor(&Device::Cuda(self.dev.clone()))?;
        Ok(())
    }

    /// The shard's tensor (the host tier's pipeline uploads the updated shard into it).
    pub fn tensor(&self) -> &Tensor {
        &self.compute
    }

    /// The values, on the host (checkpoints of the compute copy, host gathers).
    pub fn to_host(&self) -> Result<HostBuf> {
        HostBuf::from_tensor(&self.compute)
    }

    /// Start gathering every rank's shard into the whole block on the device (see
    /// `DeviceWindow::start_gather`); `None` where the host path must gather (no NCCL at world > 1).
    pub fn start_gather(&self, nccl: Option<&NcclComm>, padded: usize) -> std::result::Result<Option<DeviceGather>, CommError> {
        device_gather(&self.dev, &self.compute, nccl, padded)
    }

    /// Bytes in device memory.
    pub fn bytes(&self) -> usize {
        self.compute.elem_count() * self.compute.dtype().size_in_bytes()
    }
}

/// A compute-dtype shard in page-locked host memory, uploaded for each use.
pub struct PinnedShard {
    dev: CudaDevice,
    /// The copy stream (one per device, shared by the engine's blocks).
    copies: Arc<CudaStream>,
    host: PinnedHostSlice<u8>,
    dtype: DType,
    len: usize,
    /// The last upload from `host`: the CPU must not rewrite it before this has completed.
    in_flight: Mutex<Option<CudaEvent>>,
}

/// The stream page-locked shards are uploaded on (one per engine), beside candle's compute stream.
pub struct CopyStream {
    dev: CudaDevice,
    stream: Arc<CudaStream>,
}

impl CopyStream {
    /// A copy stream on `device` when it is a CUDA device.
    pub fn new(device: &Device) -> Result<Option<Self>> {
        let Device::Cuda(dev) = device else { return Ok(None) };
        let stream = dev.cuda_stream().context().new_stream().map_err(msg)?;
        Ok(Some(Self { dev: dev.clone(), stream }))
    }

    /// `shard` in page-locked memory, uploaded on this stream.
    pub fn pinned(&self, shard: &HostBuf) -> Result<PinnedShard> {
        PinnedShard::new(&self.dev, &self.stream, shard)
    }
}

impl PinnedShard {
    /// `shard` copied into page-locked memory, uploaded on `copies` when used.
    pub fn new(dev: &CudaDevice, copies: &Arc<CudaStream>, shard: &HostBuf) -> Result<Self> {
        let ctx = dev.cuda_stream().context().clone();
        // SAFETY: written below, before any read.
        let mut host = unsafe { ctx.alloc_pinned::<u8>(shard.bytes().max(1)) }.map_err(msg)?;
        host.as_mut_slice().map_err(msg)?[..shard.bytes()].copy_from_slice(shard.as_bytes());
        Ok(Self { dev: dev.clone(), copies: copies.clone(), host, dtype: shard.dtype(), len: shard.len(), in_flight: Mutex::new(None) })
    }

    /// Replace the values by the updated shard, once the last upload from them has completed.
    pub fn set(&mut self, shard: &HostBuf) -> Result<()> {
        if let Some(e) = self.in_flight.get_mut().map_err(msg)?.take() {
            e.synchronize().map_err(msg)?;
        }
        self.host.as_mut_slice().map_err(msg)?[..shard.bytes()].copy_from_slice(shard.as_bytes());
        Ok(())
    }

    /// The page-locked bytes, to be rewritten in place (the host tier's pipeline writes the updated
    /// shard there), once the last upload from them has completed.
    pub fn host_mut(&mut self) -> Result<&mut [u8]> {
        if let Some(e) = self.in_flight.get_mut().map_err(msg)?.take() {
            e.synchronize().map_err(msg)?;
        }
        let n = self.bytes();
        Ok(&mut self.host.as_mut_slice().map_err(msg)?[..n])
    }

    /// Start the upload of the whole block (world 1: the shard is the block) into a new device
    /// buffer on the copy stream, ordered after the buffer's allocation on the compute stream;
    /// finishing the gather makes the compute stream wait for it.
    pub fn start_upload(&self, padded: usize) -> Result<DeviceGather> {
        if self.len != padded {
            candle_core::bail!("a pinned shard of {} uploads a whole block of {padded} only", self.len)
        }
        let full = match self.dtype {
            DType::BF16 => self.upload::<half::bf16>()?,
            DType::F16 => self.upload::<half::f16>()?,
            _ => self.upload::<f32>()?,
        };
        let done = self.copies.record_event(None).map_err(msg)?;
        *self.in_flight.lock().map_err(msg)? = Some(self.copies.record_event(None).map_err(msg)?);
        Ok(DeviceGather::new(full, Some(GatherWait::Copy { event: done, stream: self.dev.cuda_stream() })))
    }

    fn upload<T: candle_core::cuda::CudaDType + DeviceRepr>(&self) -> Result<Tensor> {
        let main = self.dev.cuda_stream();
        // SAFETY: written by the copy below before the compute stream reads it (it waits for the event).
        let buf = unsafe { main.alloc::<T>(self.len) }.map_err(msg)?;
        let allocated = main.record_event(None).map_err(msg)?;
        self.copies.wait(&allocated).map_err(msg)?;
        {
            let (dst, _sync) = buf.device_ptr(&self.copies);
            let src = &self.host.as_slice().map_err(msg)?[..self.bytes()];
            // SAFETY: `dst` holds `src.len()` bytes on the device, allocated before this point of the
            // copy stream; `src` is page-locked and not rewritten until `in_flight` has completed.
            unsafe { result::memcpy_htod_async(dst, src, self.copies.cu_stream()) }.map_err(msg)?;
        }
        let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(buf, self.dev.clone()));
        Ok(Tensor::from_storage(storage, self.len, BackpropOp::none(), false))
    }

    /// Bytes of page-locked host memory.
    pub fn bytes(&self) -> usize {
        self.len * self.dtype.size_in_bytes()
    }
}
