//! [`Subset`]: some of a dataset's samples, re-indexed from 0; [`held_out`] picks the samples a run
//! keeps back for evaluation, by its seed alone (the same at any world size).

use super::{DataError, Dataset, Sampling};
use crate::engine::Batch;
use crate::rng::Rng;

/// The samples `indices` of `inner`, as a dataset of their own (sample `i` is `inner`'s `indices[i]`).
pub struct Subset<'a, D: Dataset + ?Sized> {
    inner: &'a D,
    indices: Vec<usize>,
}

impl<'a, D: Dataset + ?Sized> Subset<'a, D> {
    /// `inner` restricted to `indices` (each `< inner.len()`).
    pub fn new(inner: &'a D, indices: Vec<usize>) -> Self {
        Self { inner, indices }
    }

    /// The underlying indices, in order.
    pub fn indices(&self) -> &[usize] {
        &self.indices
    }
}

impl<D: Dataset + ?Sized> Dataset for Subset<'_, D> {
    fn len(&self) -> usize {
        self.indices.len()
    }

    fn get(&self, index: usize) -> Result<Batch, DataError> {
        self.inner.get(self.indices[index])
    }

    fn collate(&self, indices: &[usize]) -> Result<Batch, DataError> {
        self.inner.collate(&indices.iter().map(|&i| self.indices[i]).collect::<Vec<_>>())
    }

    fn sampling(&self) -> Sampling {
        self.inner.sampling()
    }

    fn counted_targets(&self, index: usize) -> Option<f64> {
        self.inner.counted_targets(self.indices[index])
    }
}

/// Of `len` samples, the `fraction` held out (rounded up, at least one when `fraction > 0`) and the
/// rest, each in index order: a permutation drawn from `seed` decides, so the split depends on the
/// seed and the data only.
pub fn held_out(len: usize, fraction: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
    let n = if fraction > 0.0 { ((len as f64 * fraction).ceil() as usize).clamp(1, len) } else { 0 };
    let mut order: Vec<usize> = (0..len).collect();
    let mut rng = Rng::derive(seed, "data/held_out");
    for i in (1..len).rev() {
        order.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let (mut eval, mut train) = (order[..n].to_vec(), order[n..].to_vec());
    eval.sort_unstable();
    train.sort_unstable();
    (train, eval)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Numbers(usize);

    impl Dataset for Numbers {
        fn len(&self) -> usize {
            self.0
        }
        fn get(&self, index: usize) -> Result<Batch, DataError> {
            let t = candle_core::Tensor::new(&[index as u32], &candle_core::Device::Cpu).map_err(|e| DataError::Sample { index, reason: e.to_string() })?;
            Ok(Batch::new().with("i", t))
        }
        fn counted_targets(&self, index: usize) -> Option<f64> {
            Some(index as f64)
        }
    }

    #[test]
    fn held_out_samples_are_disjoint_from_the_rest_and_fixed_by_the_seed() {
        let (train, eval) = held_out(100, 0.1, 7);
        assert_eq!((train.len(), eval.len()), (90, 10));
        let mut all: Vec<usize> = train.iter().chain(&eval).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..100).collect::<Vec<_>>());
        assert_eq!(held_out(100, 0.1, 7), (train, eval.clone()));
        assert_ne!(held_out(100, 0.1, 8).1, eval, "another seed holds out other samples");
        assert_eq!(held_out(5, 0.01, 1).1.len(), 1, "a positive fraction holds out at least one");
        assert_eq!(held_out(5, 0.0, 1).1.len(), 0);
    }

    #[test]
    fn a_subset_reads_its_samples_through_the_dataset() {
        let data = Numbers(10);
        let s = Subset::new(&data, vec![3, 7, 9]);
        assert_eq!(s.len(), 3);
        let b = s.collate(&[2, 0]).unwrap();
        assert_eq!(b.get("i").unwrap().flatten_all().unwrap().to_vec1::<u32>().unwrap(), vec![9, 3]);
        assert_eq!(s.counted_targets(1), Some(7.0));
    }
}
