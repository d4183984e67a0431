//! The narrow handle an expert block communicates through (invariant 1): its rank and size in the
//! expert-parallel group, which experts it holds, and the two exchanges expert parallelism needs —
//! counts (each rank tells every other how many rows it sends it) and rows (uneven all_to_all).
//! Every rank calls them in the same order whatever the routing: a rank that routes nothing to a
//! peer still sends it a count of zero (no hang, invariant 2).

use crate::comm::{CommExt, Communicator};
use candle_core::Tensor;
use std::ops::Range;
use std::sync::Arc;

/// An expert block's view of its expert-parallel group (`parallel.ep` consecutive ranks of a
/// data-parallel group). Without expert parallelism it is a group of one: every exchange is a copy.
#[derive(Clone)]
pub struct ExpertGroup {
    comm: Option<Arc<dyn Communicator>>,
}

impl std::fmt::Debug for ExpertGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ExpertGroup(rank {} of {})", self.rank(), self.size())
    }
}

impl Default for ExpertGroup {
    fn default() -> Self {
        Self::single()
    }
}

impl ExpertGroup {
    /// A group of one rank holding every expert.
    pub fn single() -> Self {
        Self { comm: None }
    }

    /// The group of `comm`'s ranks.
    pub fn new(comm: Arc<dyn Communicator>) -> Self {
        Self { comm: Some(comm) }
    }

    /// This rank's index in the group.
    pub fn rank(&self) -> usize {
        self.comm.as_ref().map_or(0, |c| c.rank())
    }

    /// Ranks in the group.
    pub fn size(&self) -> usize {
        self.comm.as_ref().map_or(1, |c| c.world_size())
    }

    /// The experts of `total` rank `rank` holds: a contiguous, equal share.
    pub fn experts_of(&self, rank: usize, total: usize) -> Range<usize> {
        let per = total / self.size();
        rank * per..(rank + 1) * per
    }

    /// The experts of `total` this rank holds.
    pub fn local_experts(&self, total: usize) -> Range<usize> {
        self.experts_of(self.rank(), total)
    }

    /// Every rank sends rank `p` the `per` counts at `counts[p·per..(p+1)·per]` and receives, in the
    /// same layout, the `per` counts each rank sent it.
    pub fn exchange_counts(&self, counts: &[usize]) -> candle_core::Result<Vec<usize>> {
        let Some(comm) = &self.comm else { return Ok(counts.to_vec()) };
        let n = self.size();
        if counts.len() % n != 0 {
            candle_core::bail!("{} counts for an expert group of {n}", counts.len());
        }
        let per = counts.len() / n;
        // Counts travel as f32: exact below 2^24 rows, far above what one rank routes.
        let send: Vec<f32> = counts.iter().map(|&c| c as f32).collect();
        let mut recv = vec![0f32; counts.len()];
        comm.all_to_all_slice(&send, &vec![per; n], &mut recv, &vec![per; n]).map_err(wrap)?;
        Ok(recv.into_iter().map(|c| c as usize).collect())
    }

    /// Rows of `rows` (`[m, d]`): the first `send[0]` to rank 0, the next `send[1]` to rank 1, …;
    /// returns the rows received, `recv[p]` from rank `p` in rank order, as `[Σ recv, d]` of the same
    /// dtype on the same device. Rows travel as f32 (exact for bf16 and f16).
    pub fn exchange_rows(&self, rows: &Tensor, send: &[usize], recv: &[usize]) -> candle_core::Result<Tensor> {
        let Some(comm) = &self.comm else { return Ok(rows.clone()) };
        let (m, d) = rows.dims2()?;
        if send.iter().sum::<usize>() != m {
            candle_core::bail!("{m} rows to send but the counts add up to {}", send.iter().sum::<usize>());
        }
        let (dtype, device) = (rows.dtype(), rows.device().clone());
        let input: Vec<f32> = super::host_f32(rows)?;
        let total: usize = recv.iter().sum();
        let mut output = vec![0f32; total * d];
        let scale = |c: &[usize]| c.iter().map(|&r| r * d).collect::<Vec<_>>();
        comm.all_to_all_slice(&input, &scale(send), &mut output, &scale(recv)).map_err(wrap)?;
        super::from_host(output, (total, d), dtype, &device)
    }
}

fn wrap(e: crate::comm::CommError) -> candle_core::Error {
    candle_core::Error::Msg(format!("expert parallelism: {e}"))
}
