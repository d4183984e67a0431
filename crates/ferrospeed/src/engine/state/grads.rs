//! One block's gradient: an fp32 accumulator over the whole block while its backward runs, reduced
//! across ranks once complete — all-reduced and kept whole (stages 0–1), or reduce-scattered into this
//! rank's shard and freed (stages 2–3).

use super::comm_worker::{CommWorker, Pending};
use super::error::EngineError;
use super::{device_overflow, device_shard_sums, DeviceGrads, Nccl};
use super::host_buf::{add_tensor_into, HostBuf};
use crate::comm::{CommError, ReduceOp};
use crate::optim::sum_squares;
use crate::shard::{FlatParam, GradReduction};
use candle_core::{DType, Device, Tensor};
use std::ops::Range;
use std::sync::Arc;

/// The gradient buffers of one block.
pub struct BlockGrads {
    padded: usize,
    /// This rank's shard of the padded buffer.
    shard_range: Range<usize>,
    reduction: GradReduction,
    /// Where the buffers live.
    store: GradStore,
    /// The reduced window copied to the host for an optimizer there (device gradients, offloaded
    /// state); freed at the next step.
    downloaded: Vec<f32>,
    /// The group the block reduces over when it is not the engine's (`params::over_group`).
    pub(super) group: Option<Arc<CommWorker>>,
}

/// Where a block's gradient buffers live, and the buffers.
enum GradStore {
    /// Host memory: the accumulator over the whole block (all-reduce strategies keep it across steps;
    /// reduce-scatter strategies allocate it at the block's first backward and free it after the
    /// reduction), and the reduced gradient of this rank's shard (reduce-scatter strategies).
    Host { full: Option<Vec<f32>>, shard: Option<Vec<f32>> },
    /// The same buffers in CUDA memory (`device_grads.rs`).
    Device(DeviceGrads),
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
        let store = match DeviceGrads::new(device).map_err(EngineError::tensor("gradient buffers"))? {
            Some(d) => GradStore::Device(d),
            None => GradStore::Host { full: None, shard: None },
        };
        Ok(Self { padded: flat.padded_numel(), shard_range: s.offset..s.offset + s.padded_len, reduction, store, downloaded: Vec::new(), group: None })
    }

    /// Zero the accumulators for a new step (allocations are kept where the strategy keeps them).
    pub fn begin_step(&mut self) -> Result<(), EngineError> {
        self.downloaded = Vec::new();
        let full = match &mut self.store {
            GradStore::Device(d) => return d.begin_step(self.padded, self.reduction).map_err(EngineError::tensor("gradient buffers")),
            GradStore::Host { full, .. } => full,
        };
        match self.reduction {
            GradReduction::AllReduce => full.get_or_insert_with(Vec::new).clear(),
            GradReduction::ReduceScatter => *full = None,
        }
        if let Some(full) = full {
            full.resize(self.padded, 0.0);
        }
        Ok(())
    }

    /// The host accumulator over the whole block, allocated zeroed if absent.
    fn host_full(full: &mut Option<Vec<f32>>, padded: usize) -> &mut Vec<f32> {
        full.get_or_insert_with(|| vec![0.0; padded])
    }

    /// Add a parameter's gradient (any float dtype) at `range` of the flat buffer.
    pub fn accumulate(&mut self, range: Range<usize>, grad: &Tensor) -> candle_core::Result<()> {
        match &mut self.store {
            GradStore::Device(d) => d.accumulate(self.padded, range, grad),
            GradStore::Host { full, .. } => add_tensor_into(&mut Self::host_full(full, self.padded)[range], grad),
        }
    }

    /// Corrupt the accumulator (for tests of overflow handling).
    pub fn poison(&mut self) -> Result<(), EngineError> {
        match &mut self.store {
            GradStore::Device(d) => d.poison(self.padded).map_err(EngineError::tensor("gradient buffers")),
            GradStore::Host { full, .. } => {
                Self::host_full(full, self.padded)[0] = f32::INFINITY;
                Ok(())
            }
        }
    }

    /// Submit the reduction of the complete accumulator (averaged over ranks, in `dtype`).
    /// With `nccl` (CUDA, one GPU per rank) the reduction runs on the GPUs, on NCCL's stream.
    pub fn start_reduce(&mut self, worker: &CommWorker, nccl: Option<&Nccl>, dtype: DType) -> Result<Pending<Result<Reduced, CommError>>, EngineError> {
        let (worker, nccl) = super::params::over_group(self.group.as_deref(), worker, nccl);
        let (reduction, padded, shard_range) = (self.reduction, self.padded, self.shard_range.clone());
        match &mut self.store {
            GradStore::Device(d) => d.start_reduce(worker, nccl, dtype, padded, reduction, shard_range),
            GradStore::Host { full, .. } => {
                let full = std::mem::take(Self::host_full(full, padded));
                Ok(submit_host_reduce(worker, full, reduction, dtype, shard_range.len()))
            }
        }
    }

    pub fn finish_reduce(&mut self, pending: Pending<Result<Reduced, CommError>>) -> Result<(), EngineError> {
        let reduced = pending.wait()??;
        let (full, shard) = match &mut self.store {
            GradStore::Device(d) => return d.finish_reduce(reduced).map_err(EngineError::tensor("gradient buffers")),
            GradStore::Host { full, shard } => (full, shard),
        };
        match reduced {
            Reduced::InPlace => {}
            Reduced::Full(f) => *full = Some(f),
            Reduced::Shard(s) => {
                *full = None;
                *shard = Some(s);
            }
        }
        Ok(())
    }

    /// The reduced gradient this rank holds in host memory: the whole block, or its shard (empty
    /// where the buffers are on a device).
    pub(super) fn host_reduced(&self) -> &[f32] {
        match (&self.store, self.reduction) {
            (GradStore::Host { full, .. }, GradReduction::AllReduce) => full.as_deref().unwrap_or(&[]),
            (GradStore::Host { shard, .. }, GradReduction::ReduceScatter) => shard.as_deref().unwrap_or(&[]),
            (GradStore::Device(_), _) => &[],
        }
    }

    /// Add the reduced gradients of the other holders of this block over `tie` (tied parameters
    /// held on several pipeline stages): every holder ends with the same sum. Through the host for
    /// gradients in device memory.
    pub(super) fn tie_sum(&mut self, tie: &dyn crate::comm::Communicator) -> Result<(), EngineError> {
        let err = EngineError::tensor("tied gradients");
        let reduction = self.reduction;
        match &mut self.store {
            GradStore::Host { full, shard } => {
                let g = match reduction {
                    GradReduction::AllReduce => full.as_deref_mut(),
                    GradReduction::ReduceScatter => shard.as_deref_mut(),
                };
                tie.all_reduce(crate::comm::BufMut::F32(g.unwrap_or(&mut [])), ReduceOp::Sum)?;
            }
            GradStore::Device(d) => {
                let mut host = d.download_reduced(reduction).map_err(err)?.unwrap_or_default();
                tie.all_reduce(crate::comm::BufMut::F32(&mut host), ReduceOp::Sum)?;
                let reduced = match reduction {
                    GradReduction::AllReduce => Reduced::Full(host),
                    GradReduction::ReduceScatter => Reduced::Shard(host),
                };
                d.finish_reduce(reduced).map_err(EngineError::tensor("tied gradients"))?;
            }
        }
        Ok(())
    }

    /// The reduced gradient over `window` in host memory, for an optimizer that runs there: the
    /// buffer itself, or a copy from the device.
    pub fn host_window(&mut self, window: &Range<usize>) -> Result<&mut [f32], EngineError> {
        let (reduction, padded) = (self.reduction, self.padded);
        match &mut self.store {
            GradStore::Host { full, shard } => Ok(match reduction {
                GradReduction::AllReduce => &mut Self::host_full(full, padded)[window.clone()],
                GradReduction::ReduceScatter => shard.get_or_insert_with(|| vec![0.0; window.len()]),
            }),
            GradStore::Device(d) => {
                self.downloaded = d.download_window(reduction, padded, window).map_err(EngineError::tensor("gradient buffers"))?;
                Ok(&mut self.downloaded)
            }
        }
    }

    /// Free the copy [`BlockGrads::host_window`] made from the device (the update is done with it).
    pub fn release_download(&mut self) {
        self.downloaded = Vec::new();
    }

    /// The device buffers, where the gradients live on a device.
    #[cfg(feature = "cuda")]
    pub(super) fn device_store(&self) -> Option<&DeviceGrads> {
        match &self.store {
            GradStore::Device(d) => Some(d),
            GradStore::Host { .. } => None,
        }
    }

    /// The reduced gradient in device memory (CUDA), if this rank holds one.
    #[cfg(feature = "cuda")]
    pub(super) fn device_reduced(&self) -> Option<candle_core::cuda::cudarc::driver::CudaView<'_, f32>> {
        match &self.store {
            GradStore::Device(d) => d.reduced(self.reduction),
            GradStore::Host { .. } => None,
        }
    }

    /// The reduced gradient over the optimizer's `window`, in device memory (CUDA).
    #[cfg(feature = "cuda")]
    pub(super) fn device_window(&mut self, window: &Range<usize>) -> Result<candle_core::cuda::cudarc::driver::CudaView<'_, f32>, EngineError> {
        let (reduction, padded) = (self.reduction, self.padded);
        match &mut self.store {
            GradStore::Device(d) => d.window(reduction, padded, window).map_err(EngineError::tensor("gradient buffers")),
            GradStore::Host { .. } => Err(EngineError::Unsupported("gradients are not on a CUDA device".into())),
        }
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
        match (&self.store, self.reduction) {
            (GradStore::Device(d), _) => d.persistent_bytes(),
            (GradStore::Host { full, .. }, GradReduction::AllReduce) => full.as_ref().map_or(0, Vec::capacity) * 4,
            (GradStore::Host { shard, .. }, GradReduction::ReduceScatter) => shard.as_ref().map_or(0, Vec::capacity) * 4,
        }
    }
}

/// Whether this rank's reduced gradients (every block's) hold an infinity or NaN, checked where they
/// live: a kernel and one flag copied back on a device, a scan in host memory.
pub(super) fn any_overflow(grads: &[BlockGrads]) -> Result<bool, EngineError> {
    if let Some(found) = device_overflow(grads)? {
        return Ok(found);
    }
    Ok(grads.iter().any(|g| g.host_reduced().iter().any(|x| !x.is_finite())))
}

/// For each rank `k`, the sum over blocks (in block order, f64) of the squares of block `b`'s reduced
/// gradient over `ranges[k][b]` (that rank's real elements of the flat buffer), computed where the
/// gradients live; the same sums either way.
pub(super) fn shard_sums(grads: &[BlockGrads], ranges: &[Vec<Range<usize>>]) -> Result<Vec<f64>, EngineError> {
    if let Some(sums) = device_shard_sums(grads, ranges)? {
        return Ok(sums);
    }
    let sum = |g: &BlockGrads, r: &Range<usize>| {
        // A shard may be all padding.
        if r.is_empty() {
            return 0.0;
        }
        let off = g.reduced_offset();
        sum_squares(&g.host_reduced()[r.start - off..r.end - off])
    };
    Ok(ranges.iter().map(|rank| grads.iter().zip(rank).map(|(g, r)| sum(g, r)).sum()).collect())
}
