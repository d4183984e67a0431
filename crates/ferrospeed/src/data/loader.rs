//! [`DataLoader`]: a dataset with its sampler and device; yields this rank's micro-batches of each
//! step, already on the rank's device. For a dataset that counts the targets of its samples
//! ([`Dataset::counted_targets`]) the loss mask becomes weights `mask · M / N`: `N` counted targets in
//! the step's whole global batch (every rank computes it from the sampler, no communication), `M`
//! micro-batches in it; the engine averages the `M` micro-batch losses, so the step's loss is the mean
//! over all `N`.

use super::{DataError, Dataset, Sampler, LOSS_MASK, LOSS_WEIGHTS};
use crate::engine::Batch;
use candle_core::Device;
use std::sync::Mutex;

/// This rank's view of a dataset: which samples, collated how, on which device.
pub struct DataLoader<'a, D: Dataset + ?Sized> {
    dataset: &'a D,
    sampler: Sampler,
    device: Device,
    steps: u64,
    /// Counted targets of the last step asked for.
    counted: Mutex<Option<(u64, f64)>>,
}

impl<'a, D: Dataset + ?Sized> DataLoader<'a, D> {
    /// A loader of `dataset` through `sampler` for `steps` optimizer steps, batches moved to `device`.
    pub fn new(dataset: &'a D, sampler: Sampler, device: Device, steps: u64) -> Self {
        Self { dataset, sampler, device, steps, counted: Mutex::new(None) }
    }

    /// The optimizer steps (batches) it yields.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// The sampler (which indices each rank takes).
    pub fn sampler(&self) -> &Sampler {
        &self.sampler
    }

    /// This rank's micro-batches of step `step` (0-based), on the device.
    pub fn micro_batches(&self, step: u64) -> Result<Vec<Batch>, DataError> {
        (0..self.sampler.accumulation).map(|k| self.micro_batch(step, k)).collect()
    }

    /// Micro-batch `k` of step `step`, on the device.
    pub fn micro_batch(&self, step: u64, k: usize) -> Result<Batch, DataError> {
        let indices = self.sampler.indices(step, k);
        let mut batch = self.dataset.collate(&indices)?;
        if batch.contains(LOSS_MASK) && indices.first().is_some_and(|&i| self.dataset.counted_targets(i).is_some()) {
            let n = self.counted_in_step(step);
            let m = (self.sampler.accumulation * self.sampler.world_size) as f64;
            let err = |e| DataError::Engine(crate::engine::EngineError::from_candle("weighting the loss mask".into(), e));
            let weights = batch.get(LOSS_MASK).and_then(|t| t.affine(if n > 0.0 { m / n } else { 0.0 }, 0.0)).map_err(err)?;
            batch = batch.without(LOSS_MASK).with(LOSS_WEIGHTS, weights);
        }
        if matches!(self.device, Device::Cpu) {
            return Ok(batch);
        }
        batch.to_device(&self.device).map_err(|e| DataError::Engine(crate::engine::EngineError::from_candle("moving a batch to the device".into(), e)))
    }

    /// The targets that count in step `step`'s loss, over its whole global batch, for datasets that
    /// count them ([`Dataset::counted_targets`]); `None` for the others (every target counts).
    pub fn counted_targets(&self, step: u64) -> Option<f64> {
        self.dataset.counted_targets(self.sampler.index(step, 0))?;
        Some(self.counted_in_step(step))
    }

    /// The counted targets of step `step`'s whole global batch.
    fn counted_in_step(&self, step: u64) -> f64 {
        let mut cache = self.counted.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((s, n)) = *cache {
            if s == step {
                return n;
            }
        }
        let n: f64 = (0..self.sampler.global_batch()).map(|g| self.dataset.counted_targets(self.sampler.index(step, g)).unwrap_or(0.0)).sum();
        *cache = Some((step, n));
        n
    }

    /// Every micro-batch from step `start` (e.g. `engine.steps_done()` after a resume) to the last step.
    pub fn from_step(&self, start: u64) -> MicroBatches<'_, 'a, D> {
        MicroBatches { loader: self, step: start, k: 0 }
    }
}

impl<'l, 'a, D: Dataset + ?Sized> IntoIterator for &'l DataLoader<'a, D> {
    type Item = Result<Batch, DataError>;
    type IntoIter = MicroBatches<'l, 'a, D>;

    /// Every micro-batch of every step, from the first.
    fn into_iter(self) -> Self::IntoIter {
        self.from_step(0)
    }
}

/// The iterator of [`DataLoader::from_step`]: micro-batches in step order.
pub struct MicroBatches<'l, 'a, D: Dataset + ?Sized> {
    loader: &'l DataLoader<'a, D>,
    step: u64,
    k: usize,
}

impl<D: Dataset + ?Sized> Iterator for MicroBatches<'_, '_, D> {
    type Item = Result<Batch, DataError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.step >= self.loader.steps {
            return None;
        }
        let item = self.loader.micro_batch(self.step, self.k);
        self.k += 1;
        if self.k == self.loader.sampler.accumulation {
            (self.step, self.k) = (self.step + 1, 0);
        }
        Some(item)
    }
}
