//! A block's gradient buffers in CUDA memory: the f32 accumulator (slot gradients added by a kernel,
//! no host copy) and the reduced shard. Reductions across ranks run with NCCL on the GPUs when each
//! rank has its own GPU (in f32, the inputs rounded to the reduce dtype), otherwise through the host
//! collectives with one copy of the block each way; at world size 1 they stay on the device (rounded
//! to the reduce dtype in place, which is all a one-rank reduction does).

use super::comm_worker::{CommWorker, Pending};
use super::error::EngineError;
use super::grads::{submit_host_reduce, Reduced};
use crate::comm::nccl::{NcclComm, NcclPending};
use crate::comm::CommError;
use crate::cuda_kernels::{accumulate, round_through};
use crate::shard::GradReduction;
use candle_core::cuda::cudarc::driver::{CudaSlice, CudaView};
use candle_core::cuda::CudaDevice;
use candle_core::{DType, Device, Result, Tensor};
use std::ops::Range;

pub struct DeviceGrads {
    dev: CudaDevice,
    /// Accumulator over the padded flat buffer (kept across steps by all-reduce strategies).
    full: Option<CudaSlice<f32>>,
    /// The reduced shard (reduce-scatter strategies).
    shard: Option<CudaSlice<f32>>,
    /// An NCCL reduction in flight, and the accumulator it reads (freed once it is done).
    in_flight: Option<(NcclPending, Option<CudaSlice<f32>>)>,
}

impl Drop for DeviceGrads {
    /// A reduction still in flight (a step abandoned on an error): its buffers are freed in compute-stream
    /// order, so that stream first waits for it.
    fn drop(&mut self) {
        if let Some((p, input)) = self.in_flight.take() {
            let _ = p.wait();
            drop(input);
        }
    }
}

impl DeviceGrads {
    /// Buffers on `device` when it is a CUDA device; `None` for the CPU.
    pub fn new(device: &Device) -> Result<Option<Self>> {
        match device {
            Device::Cuda(dev) => Ok(Some(Self { dev: dev.clone(), full: None, shard: None, in_flight: None })),
            _ => Ok(None),
        }
    }

    fn full_mut(&mut self, padded: usize) -> Result<&mut CudaSlice<f32>> {
        if self.full.is_none() {
            self.full = Some(self.dev.alloc_zeros::<f32>(padded)?);
        }
        Ok(self.full.as_mut().expect("allocated above"))
    }

    pub fn begin_step(&mut self, padded: usize, reduction: GradReduction) -> Result<()> {
        match reduction {
            GradReduction::AllReduce => match &mut self.full {
                Some(full) => self.dev.cuda_stream().memset_zeros(full).map_err(|e| candle_core::Error::Msg(e.to_string())),
                None => self.full_mut(padded).map(|_| ()),
            },
            GradReduction::ReduceScatter => {
                self.full = None;
                Ok(())
            }
        }
    }

    pub fn accumulate(&mut self, padded: usize, range: Range<usize>, grad: &Tensor) -> Result<()> {
        let full = self.full_mut(padded)?;
        if range.end > full.len() {
            candle_core::bail!("gradient range {range:?} outside a flat buffer of {}", full.len())
        }
        accumulate(&mut full.slice_mut(range), grad)
    }

    pub fn poison(&mut self, padded: usize) -> Result<()> {
        let dev = self.dev.clone();
        let full = self.full_mut(padded)?;
        dev.memcpy_htod(&[f32::INFINITY], &mut full.slice_mut(0..1))
    }

    pub fn start_reduce(
        &mut self,
        worker: &CommWorker,
        nccl: Option<&NcclComm>,
        dtype: DType,
        padded: usize,
        reduction: GradReduction,
        shard_range: Range<usize>,
    ) -> std::result::Result<Pending<std::result::Result<Reduced, CommError>>, EngineError> {
        let err = EngineError::tensor("gradient reduction");
        self.full_mut(padded).map_err(err)?;
        if worker.world_size() == 1 && shard_range.len() == padded {
            let mut full = self.full.take().expect("allocated above");
            round_through(&self.dev, &mut full, dtype).map_err(EngineError::tensor("gradient reduction"))?;
            match reduction {
                GradReduction::AllReduce => self.full = Some(full),
                GradReduction::ReduceScatter => self.shard = Some(full),
            }
            return Ok(Pending::ready(Ok(Reduced::InPlace)));
        }
        if let Some(nccl) = nccl {
            let mut full = self.full.take().expect("allocated above");
            if dtype != DType::F32 {
                round_through(&self.dev, &mut full, dtype).map_err(EngineError::tensor("gradient reduction"))?;
            }
            match reduction {
                GradReduction::AllReduce => {
                    let p = nccl.all_reduce_avg(&mut full)?;
                    self.full = Some(full);
                    self.in_flight = Some((p, None));
                }
                GradReduction::ReduceScatter => {
                    let mut shard = self.dev.alloc_zeros::<f32>(shard_range.len()).map_err(EngineError::tensor("gradient reduction"))?;
                    let p = nccl.reduce_scatter_avg(&full, &mut shard)?;
                    self.shard = Some(shard);
                    self.in_flight = Some((p, Some(full)));
                }
            }
            return Ok(Pending::ready(Ok(Reduced::InPlace)));
        }
        let full = self.full.as_ref().expect("allocated above");
        let host = self.dev.clone_dtoh(full).map_err(EngineError::tensor("gradient reduction"))?;
        if reduction == GradReduction::ReduceScatter {
            self.full = None;
        }
        Ok(submit_host_reduce(worker, host, reduction, dtype, shard_range.len()))
    }

    pub fn finish_reduce(&mut self, reduced: Reduced) -> Result<()> {
        match reduced {
            Reduced::InPlace => {
                if let Some((p, input)) = self.in_flight.take() {
                    p.wait().map_err(|e| candle_core::Error::Msg(e.to_string()))?;
                    // Freed in stream order on the compute stream, which now waits for the collective.
                    drop(input);
                }
                Ok(())
            }
            Reduced::Full(host) => match &mut self.full {
                Some(full) if full.len() == host.len() => self.dev.memcpy_htod(&host, full),
                _ => {
                    self.full = Some(self.dev.clone_htod(&host)?);
                    Ok(())
                }
            },
            Reduced::Shard(host) => {
                self.full = None;
                self.shard = Some(self.dev.clone_htod(&host)?);
                Ok(())
            }
        }
    }

    /// The reduced gradient this rank holds (whole block or shard), if any.
    pub fn reduced(&self, reduction: GradReduction) -> Option<CudaView<'_, f32>> {
        match reduction {
            GradReduction::AllReduce => self.full.as_ref().map(|f| f.slice(..)),
            GradReduction::ReduceScatter => self.shard.as_ref().map(|s| s.slice(..)),
        }
    }

    /// The reduced gradient over the optimizer's `window` (zeros where this rank holds none).
    pub fn window(&mut self, reduction: GradReduction, padded: usize, window: &Range<usize>) -> Result<CudaView<'_, f32>> {
        match reduction {
            GradReduction::AllReduce => Ok(self.full_mut(padded)?.slice(window.clone())),
            GradReduction::ReduceScatter => {
                if self.shard.as_ref().is_none_or(|s| s.len() != window.len()) {
                    self.shard = Some(self.dev.alloc_zeros::<f32>(window.len())?);
                }
                Ok(self.shard.as_ref().expect("allocated above").slice(..))
            }
        }
    }

    /// The reduced gradient this rank holds, copied to the host (`None` before any reduction).
    pub fn download_reduced(&self, reduction: GradReduction) -> Result<Option<Vec<f32>>> {
        self.reduced(reduction).map(|v| self.dev.clone_dtoh(&v)).transpose()
    }

    /// The reduced gradient over `window`, copied to the host (for an optimizer running there).
    pub fn download_window(&mut self, reduction: GradReduction, padded: usize, window: &Range<usize>) -> Result<Vec<f32>> {
        let dev = self.dev.clone();
        let view = self.window(reduction, padded, window)?;
        dev.clone_dtoh(&view)
    }

    pub fn device(&self) -> &CudaDevice {
        &self.dev
    }

    /// Bytes kept between steps.
    pub fn persistent_bytes(&self) -> usize {
        (self.full.as_ref().map_or(0, CudaSlice::len) + self.shard.as_ref().map_or(0, CudaSlice::len)) * 4
    }
}
