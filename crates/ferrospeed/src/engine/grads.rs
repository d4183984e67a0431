//! One block's gradient: an fp32 accumulator over the whole block while its backward runs, reduced
//! across ranks once complete — all-reduced and kept whole (stages 0–1), or reduce-scattered into this
//! rank's shard and freed (stages 2–3).

use super::comm_worker::{CommWorker, Pending};
use super::error::EngineError;
use super::host_buf::{add_tensor_into, HostBuf};
use crate::comm::{CommError, ReduceOp};
use crate::shard::{FlatParam, GradReduction};
use candle_core::{DType, Tensor};
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
}

/// What a finished reduction hands back.
pub enum Reduced {
    Full(Vec<f32>),
    Shard(Vec<f32>),
}

impl BlockGrads {
    pub fn new(flat: &FlatParam, rank: usize, reduction: GradReduction) -> Self {
        let s = flat.layout().shard(rank);
        Self { padded: flat.padded_numel(), shard_range: s.offset..s.offset + s.padded_len, reduction, full: None, shard: None }
    }

    /// Zero the accumulators for a new step (allocations are kept where the strategy keeps them).
    pub fn begin_step(&mut self) {
        match self.reduction {
            GradReduction::AllReduce => self.full.get_or_insert_with(Vec::new).clear(),
            GradReduction::ReduceScatter => self.full = None,
        }
        if let Some(full) = &mut self.full {
            full.resize(self.padded, 0.0);
        }
    }

    fn full_mut(&mut self) -> &mut Vec<f32> {
        let padded = self.padded;
        self.full.get_or_insert_with(|| vec![0.0; padded])
    }

    /// Add a parameter's gradient (any float dtype) at `range` of the flat buffer.
    pub fn accumulate(&mut self, range: Range<usize>, grad: &Tensor) -> candle_core::Result<()> {
        add_tensor_into(&mut self.full_mut()[range], grad)
    }

    /// Corrupt the accumulator (for tests of overflow handling).
    pub fn poison(&mut self) {
        self.full_mut()[0] = f32::INFINITY;
    }

    /// Submit the reduction of the complete accumulator (averaged over ranks, in `dtype`).
    pub fn start_reduce(&mut self, worker: &CommWorker, dtype: DType) -> Pending<Result<Reduced, CommError>> {
        let full = std::mem::take(self.full_mut());
        let shard_len = self.shard_range.len();
        match self.reduction {
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

    pub fn finish_reduce(&mut self, pending: Pending<Result<Reduced, CommError>>) -> Result<(), EngineError> {
        match pending.wait()?? {
            Reduced::Full(full) => self.full = Some(full),
            Reduced::Shard(shard) => {
                self.full = None;
                self.shard = Some(shard);
            }
        }
        Ok(())
    }

    /// The reduced gradient this rank holds: the whole block, or its shard.
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

    /// Offset in the flat buffer of `reduced()[0]`.
    pub fn reduced_offset(&self) -> usize {
        match self.reduction {
            GradReduction::AllReduce => 0,
            GradReduction::ReduceScatter => self.shard_range.start,
        }
    }

    /// Bytes kept between steps.
    pub fn persistent_bytes(&self) -> usize {
        match self.reduction {
            GradReduction::AllReduce => self.full.as_ref().map_or(0, Vec::capacity) * 4,
            GradReduction::ReduceScatter => self.shard.as_ref().map_or(0, Vec::capacity) * 4,
        }
    }
}
