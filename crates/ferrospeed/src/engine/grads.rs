//! One block's gradient: an fp32 accumulator over the whole block while its backward runs, reduced
//! across ranks once complete — all-reduced and kept whole (stages 0–1), or reduce-scattered into this
//! rank's shard and freed (stages 2–3).

use super::comm_worker::{CommWorker, Pending};
use super::error::EngineError;
use super::{DeviceGrads, Nccl};
use super::host_buf::{add_tensor_into, HostBuf};
use crate::comm::{CommError, ReduceOp};
use crate::shard::{FlatParam, GradReduction};
use candle_core::{DType, Device, Tensor};
use std::ops::Range;

/// The gradient buffers of one block.
pub struct BlockGrads {
    padded: usize,
    /// This rank's shard of the padded buffer.
    shard_range: Range<usize>,
    reduction: GradReduction,
    /// Accumulator over the whole block. All-reduce strategies keep it across steps; reduce-scatter
    /// strategies allocate it at the block's first backward and free it after the reduction.
    full: Option<Vec<f32>>,
    /// The reduced gradient of this rank's shard (reduce-scatter strategies).
    shard: Option<Vec<f32>>,
    /// On a CUDA device the same buffers live there instead (`full` and `shard` stay empty).
    pub(super) dev: Option<DeviceGrads>,
    /// The reduced window copied to the host for an optimizer there (device gradients, offloaded
    /// state); freed at the next step.
    downloaded: Vec<f32>,
}

/// What a finished reduction hands back.
pub enum Reduced {
    Full(Vec<f32>),
    Shard(Vec<f32>),
    /// Reduced where it was (one rank, device buffers): nothing to adopt.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    InPlace,
}

/// Reduce `full` across ranks on the communication thread: all-reduced whole, or reduce-scattered
/// into this rank's `shard_len` elements (averaged, in `dtype`).
pub(super) fn submit_host_reduce(
    worker: &CommWorker,
    full: Vec<f32>,
    reduction: GradReduction,
    dtype: DType,
    shard_len: usize,
) -> Pending<Result<Reduced, CommError>> {
    match reduction {
        GradReduction::AllReduce => worker.submit(move |c| {
            let mut full = full;
            if dtype == DType::F32 {
                c.all_reduce(crate::comm::BufMut::F32(&mut full), ReduceOp::Avg)?;
            } else {
                let mut low = HostBuf::from_f32(dtype, &full);
                c.all_reduce(low.as_buf_mut(), ReduceOp::Avg)?;
                full = low.to_f32();
            }
            Ok(Reduced::Full(full))
        }),
        GradReduction::ReduceScatter => worker.submit(move |c| {
            if dtype == DType::F32 {
                let mut shard = vec![0f32; shard_len];
                c.reduce_scatter(crate::comm::Buf::F32(&full), crate::comm::BufMut::F32(&mut shard), ReduceOp::Avg)?;
                Ok(Reduced::Shard(shard))
            } else {
                let low = HostBuf::from_f32(dtype, &full);
                drop(full);
                let mut shard = HostBuf::zeros(dtype, shard_len);
                c.reduce_scatter(low.as_buf(), shard.as_buf_mut(), ReduceOp::Avg)?;
                Ok(Reduced::Shard(shard.to_f32()))
            }
        }),
    }
}

impl BlockGrads {
    /// Buffers on `device`: host memory for the CPU, device memory for a CUDA device.
    pub fn new(flat: &FlatParam, rank: usize, reduction: GradReduction, device: &Device) -> Result<Self, EngineError> {
        let s = flat.layout().shard(rank);
        let dev = DeviceGrads::new(device).map_err(EngineError::tensor("gradient buffers"))?;
        Ok(Self { padded: flat.padded_numel(), shard_range: s.offset..s.offset + s.padded_len, reduction, full: None, shard: None, dev, downloaded: Vec::new() })
    }

    /// Zero the accumulators for a new step (allocations are kept where the strategy keeps them).
    pub fn begin_step(&mut self) -> Result<(), EngineError> {
        self.downloaded = Vec::new();
        if let Some(d) = &mut self.dev {
            return d.begin_step(self.padded, self.reduction).map_err(EngineError::tensor("gradient buffers"));
        }
        match self.reduction {
            GradReduction::AllReduce => self.full.get_or_insert_with(Vec::new).clear(),
            GradReduction::ReduceScatter => self.full = None,
        }
        if let Some(full) = &mut self.full {
            full.resize(self.padded, 0.0);
        }
        Ok(())
    }

    fn full_mut(&mut self) -> &mut Vec<f32> {
        let padded = self.padded;
        self.full.get_or_insert_with(|| vec![0.0; padded])
    }

    /// Add a parameter's gradient (any float dtype) at `range` of the flat buffer.
    pub fn accumulate(&mut self, range: Range<usize>, grad: &Tensor) -> candle_core::Result<()> {
        if let Some(d) = &mut self.dev {
            return d.accumulate(self.padded, range, grad);
        }
        add_tensor_into(&mut self.full_mut()[range], grad)
    }

    /// Corrupt the accumulator (for tests of overflow handling).
    pub fn poison(&mut self) -> Result<(), EngineError> {
        if let Some(d) = &mut self.dev {
            return d.poison(self.padded).map_err(EngineError::tensor("gradient buffers"));
        }
        self.full_mut()[0] = f32::INFINITY;
        Ok(())
    }

    /// Submit the reduction of the complete accumulator (averaged over ranks, in `dtype`).
    /// With `nccl` (CUDA, one GPU per rank) the reduction runs on the GPUs, on NCCL's stream.
    pub fn start_reduce(&mut self, worker: &CommWorker, nccl: Option<&Nccl>, dtype: DType) -> Result<Pending<Result<Reduced, CommError>>, EngineError> {
        let (reduction, padded, shard_range) = (self.reduction, self.padded, self.shard_range.clone());
        if let Some(d) = &mut self.dev {
            return d.start_reduce(worker, nccl, dtype, padded, reduction, shard_range);
        }
        let full = std::mem::take(self.full_mut());
        Ok(submit_host_reduce(worker, full, reduction, dtype, shard_range.len()))
    }

    pub fn finish_reduce(&mut self, pending: Pending<Result<Reduced, CommError>>) -> Result<(), EngineError> {
        let reduced = pending.wait()??;
        if let Some(d) = &mut self.dev {
            return d.finish_reduce(reduced).map_err(EngineError::tensor("gradient buffers"));
        }
        match reduced {
            Reduced::InPlace => {}
            Reduced::Full(full) => self.full = Some(full),
            Reduced::Shard(shard) => {
                self.full = None;
                self.shard = Some(shard);
            }
        }
        Ok(())
    }

    /// The reduced gradient this rank holds: the whole block, or its shard (host buffers only).
    pub fn reduced(&self) -> &[f32] {
        match self.reduction {
            GradReduction::AllReduce => self.full.as_deref().unwrap_or(&[]),
            GradReduction::ReduceScatter => self.shard.as_deref().unwrap_or(&[]),
        }
    }

    /// The reduced gradient over `window` of the flat buffer (the optimizer's window).
    pub fn window(&mut self, window: &Range<usize>) -> &mut [f32] {
        match self.reduction {
            GradReduction::AllReduce => &mut self.full_mut()[window.clone()],
            GradReduction::ReduceScatter => {
                let len = window.len();
                self.shard.get_or_insert_with(|| vec![0.0; len])
            }
        }
    }

    /// The reduced gradient over `window` in host memory, for an optimizer that runs there: the
    /// buffer itself, or a copy from the device.
    pub fn host_window(&mut self, window: &Range<usize>) -> Result<&mut [f32], EngineError> {
        let (reduction, padded) = (self.reduction, self.padded);
        match &mut self.dev {
            None => Ok(self.window(window)),
            Some(d) => {
                self.downloaded = d.download_window(reduction, padded, window).map_err(EngineError::tensor("gradient buffers"))?;
                Ok(&mut self.downloaded)
            }
        }
    }

    /// Free the copy [`BlockGrads::host_window`] made from the device (the update is done with it).
    pub fn release_download(&mut self) {
        self.downloaded = Vec::new();
    }

    /// The reduced gradient in device memory (CUDA), if this rank holds one.
    #[cfg(feature = "cuda")]
    pub(super) fn device_reduced(&self) -> Option<candle_core::cuda::cudarc::driver::CudaView<'_, f32>> {
        self.dev.as_ref().and_then(|d| d.reduced(self.reduction))
    }

    /// The reduced gradient over the optimizer's `window`, in device memory (CUDA).
    #[cfg(feature = "cuda")]
    pub(super) fn device_window(&mut self, window: &Range<usize>) -> Result<candle_core::cuda::cudarc::driver::CudaView<'_, f32>, EngineError> {
        let (reduction, padded) = (self.reduction, self.padded);
        let d = self.dev.as_mut().ok_or_else(|| EngineError::Unsupported("gradients are not on a CUDA device".into()))?;
        d.window(reduction, padded, window).map_err(EngineError::tensor("gradient buffers"))
    }

    /// Offset in the flat buffer of `reduced()[0]`.
    pub fn reduced_offset(&self) -> usize {
        match self.reduction {
            GradReduction::AllReduce => 0,
            GradReduction::ReduceScatter => self.shard_range.start,
        }
    }

    /// Bytes kept between steps.
    pub fn persistent_bytes(&self) -> usize {
        if let Some(d) = &self.dev {
            return d.persistent_bytes();
        }
        match self.reduction {
            GradReduction::AllReduce => self.full.as_ref().map_or(0, Vec::capacity) * 4,
            GradReduction::ReduceScatter => self.shard.as_ref().map_or(0, Vec::capacity) * 4,
        }
    }
}
