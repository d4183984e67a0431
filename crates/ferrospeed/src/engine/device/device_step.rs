//! The gradient queries of a step's optimizer phase on a CUDA device: the fp16 overflow check, and
//! the per-shard sums of squares of the global norm — kernels over the device buffers, one small copy
//! back for each (AdamW on the device is each block's own update, `params.rs`). The structure is the
//! host's (`grads.rs`): same shards, same block order. Each answers `None` where the gradients are
//! in host memory.

use super::error::EngineError;
use super::grads::BlockGrads;
use crate::optim::{any_nonfinite, sum_squares_segments};
use candle_core::cuda::CudaDevice;
use std::ops::Range;

/// The device of the gradients, if they live on one.
fn grad_device(grads: &[BlockGrads]) -> Option<CudaDevice> {
    grads.iter().find_map(|g| g.device_store().map(|d| d.device().clone()))
}

/// Whether this rank's reduced gradients hold an infinity or NaN.
pub(super) fn device_overflow(grads: &[BlockGrads]) -> Result<Option<bool>, EngineError> {
    let Some(dev) = grad_device(grads) else { return Ok(None) };
    let views: Vec<_> = grads.iter().filter_map(|g| g.device_reduced()).collect();
    any_nonfinite(&dev, &views).map(Some).map_err(EngineError::tensor("overflow check"))
}

/// For each rank `k`, the sum over blocks (in block order, f64) of the squares of the gradient over
/// `ranges[k][b]` of block `b` (that rank's real elements) — what the host computes, on the GPU.
pub(super) fn device_shard_sums(grads: &[BlockGrads], ranges: &[Vec<Range<usize>>]) -> Result<Option<Vec<f64>>, EngineError> {
    let Some(dev) = grad_device(grads) else { return Ok(None) };
    let blocks = grads.len();
    let mut segments = Vec::new();
    let mut index = vec![None; ranges.len() * blocks];
    for (k, rank_ranges) in ranges.iter().enumerate() {
        for (b, (g, r)) in grads.iter().zip(rank_ranges).enumerate() {
            // A shard may be all padding.
            if r.is_empty() {
                continue;
            }
            let off = g.reduced_offset();
            let view = g.device_reduced().filter(|v| r.start >= off && r.end - off <= v.len());
            let view = view.ok_or_else(|| EngineError::Unsupported(format!("block {b} holds no reduced gradient for {r:?}")))?;
            index[k * blocks + b] = Some(segments.len());
            segments.push(view.slice(r.start - off..r.end - off));
        }
    }
    let sums = sum_squares_segments(&dev, &segments).map_err(EngineError::tensor("gradient norm"))?;
    Ok(Some((0..ranges.len()).map(|k| (0..blocks).map(|b| index[k * blocks + b].map_or(0.0, |s| sums[s])).sum()).collect()))
}
