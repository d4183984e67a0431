//! The optimizer phase of a step on a CUDA device: the fp16 overflow check, and the per-shard sums
//! of squares of the global norm — kernels over the device buffers, one small copy back for each
//! (AdamW on the device is each block's own update, `params.rs`). The structure is the host's (`trainer.rs`): same shards, same block order.

use super::error::EngineError;
use super::trainer::Engine;
use crate::optim::{any_nonfinite, sum_squares_segments};
use candle_core::cuda::CudaDevice;

impl Engine {
    fn grad_device(&self) -> Option<CudaDevice> {
        self.grads.iter().find_map(|g| g.dev.as_ref().map(|d| d.device().clone()))
    }

    /// Whether this rank's reduced gradients hold an infinity or NaN.
    pub(super) fn device_overflow(&self) -> Result<bool, EngineError> {
        let Some(dev) = self.grad_device() else { return Ok(false) };
        let views: Vec<_> = self.grads.iter().filter_map(|g| g.device_reduced()).collect();
        any_nonfinite(&dev, &views).map_err(EngineError::tensor("overflow check"))
    }

    /// For each of `ranks`, the sum over blocks (in block order, f64) of the squares of the real
    /// elements of that rank's shard — what the host's `shard_sum` computes, the ranges on the GPU.
    pub(super) fn device_shard_sums(&self, ranks: &[usize]) -> Result<Vec<f64>, EngineError> {
        let Some(dev) = self.grad_device() else { return Err(EngineError::Unsupported("gradients are not on a CUDA device".into())) };
        let blocks = self.grads.len();
        let mut segments = Vec::new();
        let mut index = vec![None; ranks.len() * blocks];
        for (k, &rank) in ranks.iter().enumerate() {
            for (b, (g, p)) in self.grads.iter().zip(&self.params).enumerate() {
                // The real (unpadded) elements of `rank`'s shard; a shard may be all padding.
                let r = p.flat.layout().range(rank);
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
        Ok((0..ranks.len()).map(|k| (0..blocks).map(|b| index[k * blocks + b].map_or(0.0, |s| sums[s])).sum()).collect())
    }
}
