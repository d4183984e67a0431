//! Cross-entropy over logits split by vocabulary over a tensor-parallel group (Megatron's
//! vocabulary-parallel cross-entropy): each rank holds the logits of its `vocab / tp` consecutive
//! tokens, and three all-reduces of one number a row (the maximum, the sum of exponentials, the
//! target's logit, which one rank holds) give every rank each row's loss over the whole vocabulary —
//! the `[tokens × vocabulary]` logits are never gathered. The backward needs the rows' log-sum-exp
//! again (two of the all-reduces) and no communication beyond it: each rank's gradient is its own
//! columns'. In f32 composed ops; [`VocabShard::single`] runs the same arithmetic on whole logits
//! (the reference the tests compare the fused kernels' and the split ones' against).

use candle_core::{DType, Device, Result, Tensor, D};
use ferrospeed::comm::ReduceOp;
use ferrospeed::engine::TensorGroup;

/// This rank's part of the vocabulary: its group and the first token id of its columns.
#[derive(Debug, Clone)]
pub struct VocabShard {
    pub group: TensorGroup,
    pub lo: usize,
}

impl VocabShard {
    /// The whole vocabulary on one rank.
    pub fn single() -> Self {
        Self { group: TensorGroup::single(), lo: 0 }
    }

    /// Each of the token ids `ids` (any shape, `n` of them) as an index among this rank's `cols`
    /// tokens (0 for another rank's) `[n, 1]` u32, and 1 where this rank holds it `[n, 1]` f32. Every
    /// rank holds every id: one outside the vocabulary (`what`, for the message) fails on each alike,
    /// before any collective.
    pub fn local_ids(&self, ids: &Tensor, cols: usize, what: &str) -> Result<(Tensor, Tensor)> {
        let device = ids.device().clone();
        let ids: Vec<u32> = ids.flatten_all()?.to_dtype(DType::U32)?.to_vec1()?;
        let vocab = cols * self.group.size();
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            candle_core::bail!("{what} {bad} is outside the vocabulary of {vocab}: the tokenizer and the model's vocab_size disagree");
        }
        let lo = self.lo as u32;
        let held = |id: u32| id >= lo && id < lo + cols as u32;
        let local: Vec<u32> = ids.iter().map(|&id| if held(id) { id - lo } else { 0 }).collect();
        let mask: Vec<f32> = ids.iter().map(|&id| f32::from(u8::from(held(id)))).collect();
        let n = ids.len();
        Ok((Tensor::from_vec(local, (n, 1), &Device::Cpu)?.to_device(&device)?, Tensor::from_vec(mask, (n, 1), &Device::Cpu)?.to_device(&device)?))
    }

    /// Each row's log-sum-exp over the whole vocabulary `[n, 1]` f32, from this rank's logits `l` (f32).
    fn log_sum_exp(&self, l: &Tensor) -> Result<Tensor> {
        let max = self.group.all_reduce(&l.max_keepdim(D::Minus1)?, ReduceOp::Max)?;
        let sum = self.group.sum(&l.broadcast_sub(&max)?.exp()?.sum_keepdim(D::Minus1)?)?;
        max + sum.log()?
    }

    /// The loss of each row `[n]` (f32) for this rank's logits `[n, vocab / tp]` and the targets
    /// (`n` token ids of the whole vocabulary).
    pub fn rows(&self, logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let l = logits.to_dtype(DType::F32)?.contiguous()?;
        let lse = self.log_sum_exp(&l)?;
        let (local, held) = self.local_ids(targets, l.dim(1)?, "cross entropy: target")?;
        let picked = self.group.sum(&(l.gather(&local, 1)? * held)?)?;
        (lse - picked)?.squeeze(1)
    }

    /// The gradient of this rank's logits (their dtype) for the rows' gradients `row_grads` `[n]`:
    /// `(softmax − one-hot) · g`, over this rank's columns.
    pub fn rows_backward(&self, logits: &Tensor, targets: &Tensor, row_grads: &Tensor) -> Result<Tensor> {
        let l = logits.to_dtype(DType::F32)?.contiguous()?;
        let lse = self.log_sum_exp(&l)?;
        let (local, held) = self.local_ids(targets, l.dim(1)?, "cross entropy: target")?;
        let onehot = l.zeros_like()?.scatter_add(&local, &held, 1)?;
        let g = row_grads.to_dtype(DType::F32)?.unsqueeze(1)?;
        (l.broadcast_sub(&lse)?.exp()? - onehot)?.broadcast_mul(&g)?.to_dtype(logits.dtype())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::cross_entropy::{cross_entropy_rows, cross_entropy_rows_backward};
    use ferrospeed::comm::{run_local_world, CommConfig};
    use std::sync::Arc;

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        let mut rng = ferrospeed::rng::Rng::new(seed);
        Tensor::from_vec((0..shape.iter().product()).map(|_| (rng.normal() * 3.0) as f32).collect::<Vec<f32>>(), shape, &Device::Cpu).unwrap()
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap()
    }

    /// Split over 1, 2 and 4 ranks (threads over TCP), each row's loss and each logit's gradient equal
    /// the fused whole-vocabulary kernels' (f64 inside) within 1e-5, targets in every rank's columns.
    #[test]
    fn split_vocabulary_cross_entropy_matches_the_whole_one() {
        let (n, v) = (9, 24);
        let logits = randn(&[n, v], 3);
        let targets = Tensor::from_vec((0..n as u32).map(|i| (i * 5 + 2) % v as u32).collect::<Vec<u32>>(), n, &Device::Cpu).unwrap();
        let g = randn(&[n], 4);
        let want_rows = values(&cross_entropy_rows(&logits, &targets).unwrap());
        let want_grad = values(&cross_entropy_rows_backward(&logits, &targets, &g).unwrap());
        for tp in [1, 2, 4] {
            let got = run_local_world(tp, &CommConfig::default(), |comm| {
                let group = if tp == 1 { TensorGroup::single() } else { TensorGroup::new(Arc::new(comm)) };
                let cols = v / tp;
                let shard = VocabShard { lo: group.rank() * cols, group };
                let mine = logits.narrow(1, shard.lo, cols).unwrap();
                // A target outside the vocabulary fails on every rank alike (before any collective).
                let bad = Tensor::from_vec(vec![v as u32; n], n, &Device::Cpu).unwrap();
                let outside = shard.rows(&mine, &bad).unwrap_err().to_string();
                (values(&shard.rows(&mine, &targets).unwrap()), values(&shard.rows_backward(&mine, &targets, &g).unwrap()), outside)
            })
            .unwrap();
            for (rank, (rows, grad, outside)) in got.iter().enumerate() {
                assert!(outside.contains(&format!("target {v} is outside the vocabulary of {v}")), "tp {tp} rank {rank}: {outside}");
                assert!(rows.iter().zip(&want_rows).all(|(a, b)| (a - b).abs() <= 1e-5 * b.abs().max(1.0)), "tp {tp} rank {rank}: rows {rows:?} vs {want_rows:?}");
                let cols = v / tp;
                for r in 0..n {
                    for c in 0..cols {
                        let (a, b) = (grad[r * cols + c], want_grad[r * v + rank * cols + c]);
                        assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "tp {tp} rank {rank} row {r} col {c}: {a} vs {b}");
                    }
                }
            }
        }
    }
}
