//! Datasets and which samples each rank trains on: the [`Dataset`] trait (indexed samples of named
//! tensors) and the [`Sampler`], which deterministically shards every global batch over the ranks.
//!
//! Sample `g` of the global batch of step `s` is dataset index `Sampler::index(s, g)`, a function of the
//! seed only; rank `r` takes, for micro-batch `k`, the samples `(k·W + r)·m .. (k·W + r + 1)·m`
//! (W ranks, micro-batch m). The ranks' samples are disjoint and together always the same global
//! batch, whatever W and the accumulation: the basis of the world-size invariance of the losses.

#![warn(missing_docs)]

mod loader;
mod subset;

pub use loader::{DataLoader, MicroBatches};
pub use subset::{held_out, Subset};

use crate::engine::{Batch, EngineError};
use crate::rng::Rng;
use std::sync::Mutex;

/// Errors of datasets and sampling.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A dataset with fewer samples than one global batch, sampled in epochs.
    #[error("the dataset has {len} samples, fewer than one global batch of {global_batch}: use more data or a smaller train.global_batch")]
    TooSmall {
        /// Number of samples in the dataset.
        len: usize,
        /// Samples in one global batch.
        global_batch: usize,
    },
    /// A dataset's own failure (reading a file, decoding a sample).
    #[error("sample {index}: {reason}")]
    Sample {
        /// The sample's index in the dataset.
        index: usize,
        /// What went wrong.
        reason: String,
    },
    /// Collating or moving a batch.
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// How global-batch positions map to dataset indices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sampling {
    /// Each sample drawn independently from `(seed, step, position)`, with replacement (random
    /// windows of a text corpus).
    WithReplacement,
    /// Epochs over the dataset, each in an order drawn from `(seed, epoch)` (`shuffle`) or in index
    /// order; the last incomplete global batch of an epoch is dropped.
    Epochs {
        /// Shuffle each epoch.
        shuffle: bool,
    },
}

/// Samples a model trains on, by index. A sample is a [`Batch`] of named tensors without the batch
/// dimension; [`Dataset::collate`] stacks samples into a micro-batch.
pub trait Dataset: Send + Sync {
    /// Number of samples.
    fn len(&self) -> usize;

    /// Whether the dataset has no sample.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sample `index` (`< len()`), on the CPU.
    fn get(&self, index: usize) -> Result<Batch, DataError>;

    /// The micro-batch of samples `indices`, each tensor stacked along a new first dimension. Datasets
    /// that can build a batch faster than sample by sample override this.
    fn collate(&self, indices: &[usize]) -> Result<Batch, DataError> {
        let samples: Vec<Batch> = indices.iter().map(|&i| self.get(i)).collect::<Result<_, _>>()?;
        Ok(Batch::stack(&samples)?)
    }

    /// How samples are drawn (default: shuffled epochs).
    fn sampling(&self) -> Sampling {
        Sampling::Epochs { shuffle: true }
    }

    /// For datasets whose samples carry a [`LOSS_MASK`]: how many of sample `index`'s targets count in
    /// the loss. When it is given, the [`DataLoader`] turns the mask into [`LOSS_WEIGHTS`] that make the
    /// step's loss the mean over every counted target of the whole global batch, whatever the
    /// micro-batch size, accumulation or world size (a per-micro-batch mean would weigh a short reply
    /// in a small micro-batch as much as a long one). Default: `None` (the mask's own per-micro-batch mean).
    fn counted_targets(&self, index: usize) -> Option<f64> {
        let _ = index;
        None
    }
}

/// Batch tensor (f32, 1 or 0 per target) of the targets that count in the loss; a model's loss is then
/// the mean over the micro-batch's counted targets.
pub const LOSS_MASK: &str = "loss_mask";
/// Batch tensor (f32 per target) of each target's weight in the loss, the loss being `Σ weight · loss`:
/// what the [`DataLoader`] makes of a [`LOSS_MASK`] when the dataset counts its targets.
pub const LOSS_WEIGHTS: &str = "loss_weights";

/// Which dataset indices a rank trains on at each step.
#[derive(Debug)]
pub struct Sampler {
    /// Seed of the order.
    pub seed: u64,
    /// How indices are drawn.
    pub sampling: Sampling,
    /// Samples per rank per micro-batch.
    pub micro_batch: usize,
    /// Micro-batches per rank per step.
    pub accumulation: usize,
    /// Ranks.
    pub world_size: usize,
    /// This rank.
    pub rank: usize,
    /// Samples in the dataset.
    pub len: usize,
    /// The permutation of the epoch last asked for (shuffled epochs).
    order: Mutex<Option<(u64, Vec<usize>)>>,
}

impl Sampler {
    /// A sampler over `len` samples; epochs need at least one global batch.
    pub fn new(seed: u64, sampling: Sampling, micro_batch: usize, accumulation: usize, world_size: usize, rank: usize, len: usize) -> Result<Self, DataError> {
        let s = Self { seed, sampling, micro_batch, accumulation, world_size, rank, len, order: Mutex::new(None) };
        if matches!(sampling, Sampling::Epochs { .. }) && len < s.global_batch() {
            return Err(DataError::TooSmall { len, global_batch: s.global_batch() });
        }
        if len == 0 {
            return Err(DataError::TooSmall { len, global_batch: s.global_batch() });
        }
        Ok(s)
    }

    /// Samples per optimizer step, all ranks together.
    pub fn global_batch(&self) -> usize {
        self.micro_batch * self.accumulation * self.world_size
    }

    /// Global-batch positions of micro-batch `k` of this rank.
    pub fn positions(&self, k: usize) -> std::ops::Range<usize> {
        let start = (k * self.world_size + self.rank) * self.micro_batch;
        start..start + self.micro_batch
    }

    /// The dataset index of position `g` of the global batch of step `step`.
    pub fn index(&self, step: u64, g: usize) -> usize {
        match self.sampling {
            Sampling::WithReplacement => Rng::derive(self.seed, &format!("data/{step}/{g}")).below(self.len as u64) as usize,
            Sampling::Epochs { shuffle } => {
                let global = self.global_batch() as u64;
                let per_epoch = self.len as u64 / global * global;
                let pos = step * global + g as u64;
                let (epoch, within) = (pos / per_epoch, (pos % per_epoch) as usize);
                if !shuffle {
                    return within;
                }
                let mut order = self.order.lock().unwrap_or_else(|e| e.into_inner());
                if order.as_ref().map(|(e, _)| *e) != Some(epoch) {
                    *order = Some((epoch, permutation(self.len, &mut Rng::derive(self.seed, &format!("epoch/{epoch}")))));
                }
                order.as_ref().map_or(within, |(_, p)| p[within])
            }
        }
    }

    /// This rank's dataset indices for micro-batch `k` of step `step`.
    pub fn indices(&self, step: u64, k: usize) -> Vec<usize> {
        self.positions(k).map(|g| self.index(step, g)).collect()
    }
}

/// A uniformly random permutation of `0..n` (Fisher–Yates).
fn permutation(n: usize, rng: &mut Rng) -> Vec<usize> {
    let mut p: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        p.swap(i, j);
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn global(world: usize, micro: usize, accum: usize, sampling: Sampling, step: u64) -> Vec<usize> {
        let mut all = Vec::new();
        for rank in 0..world {
            let s = Sampler::new(5, sampling, micro, accum, world, rank, 50).unwrap();
            for k in 0..accum {
                all.extend(s.indices(step, k));
            }
        }
        all.sort();
        all
    }

    #[test]
    fn the_global_batch_does_not_depend_on_world_size_or_accumulation() {
        for sampling in [Sampling::WithReplacement, Sampling::Epochs { shuffle: true }, Sampling::Epochs { shuffle: false }] {
            for step in [0, 3, 7] {
                let reference = global(1, 12, 1, sampling, step);
                for (w, m, a) in [(2, 6, 1), (3, 2, 2), (4, 1, 3), (1, 4, 3)] {
                    assert_eq!(global(w, m, a, sampling, step), reference, "{sampling:?} step {step} W={w} m={m} a={a}");
                }
            }
        }
    }

    #[test]
    fn an_epoch_visits_every_kept_sample_once_and_epochs_differ() {
        let s = Sampler::new(1, Sampling::Epochs { shuffle: true }, 10, 1, 1, 0, 50).unwrap();
        let epoch = |e: u64| -> Vec<usize> { (e * 5..e * 5 + 5).flat_map(|step| s.indices(step, 0)).collect() };
        let mut first = epoch(0);
        let second = epoch(1);
        assert_ne!(first, second);
        first.sort();
        assert_eq!(first, (0..50).collect::<Vec<_>>());
    }

    #[test]
    fn a_dataset_smaller_than_one_global_batch_is_refused() {
        let err = Sampler::new(1, Sampling::Epochs { shuffle: true }, 4, 2, 2, 0, 15).unwrap_err();
        assert!(matches!(err, DataError::TooSmall { len: 15, global_batch: 16 }), "{err}");
        assert!(err.to_string().contains("train.global_batch"), "{err}");
    }
}
