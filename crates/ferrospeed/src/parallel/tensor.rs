//! Tensor parallelism's two halves: the plan (how each parameter of a block splits over the
//! tensor-parallel group, as data: [`TpSplit`], and the arithmetic of a split: shapes and the element
//! ranges of a slice) and the narrow handle a block communicates through inside its forward and
//! backward ([`TensorGroup`]: its rank and size and an all-reduce of a tensor). Model code sees the
//! handle, never the mesh (invariant 1): every rank of the group calls the same all-reduces in the
//! same order, whatever it holds.

use crate::comm::{CommExt, Communicator, ReduceOp};
use candle_core::Tensor;
use std::ops::Range;
use std::sync::Arc;

/// How one parameter splits over a tensor-parallel group of `tp` ranks (Megatron's column- and
/// row-parallel linear layers, with transformers' `[out, in]` weights).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TpSplit {
    /// Every rank holds all of it (norms, a row-parallel layer's bias).
    Replicated,
    /// The first dimension in `tp` equal contiguous parts: a column-parallel weight `[out, in]`
    /// (each rank computes `out / tp` outputs) and its bias, a vocabulary-parallel embedding or head.
    Rows,
    /// The second dimension in `tp` equal parts: a row-parallel weight `[out, in]` (each rank reads
    /// `in / tp` inputs and produces a partial sum of every output).
    Cols,
}

impl TpSplit {
    /// The name a checkpoint's `meta.json` records.
    pub fn name(self) -> &'static str {
        match self {
            TpSplit::Replicated => "replicated",
            TpSplit::Rows => "rows",
            TpSplit::Cols => "cols",
        }
    }

    /// The split a name of [`TpSplit::name`] records.
    pub fn from_name(name: &str) -> Option<Self> {
        [TpSplit::Replicated, TpSplit::Rows, TpSplit::Cols].into_iter().find(|s| s.name() == name)
    }

    /// The dimension the split cuts, if any.
    pub fn dim(self) -> Option<usize> {
        match self {
            TpSplit::Replicated => None,
            TpSplit::Rows => Some(0),
            TpSplit::Cols => Some(1),
        }
    }

    /// The shape of one rank's slice of a parameter of `shape`; `None` where `tp` does not divide the
    /// split dimension (or the parameter has no such dimension).
    pub fn local_shape(self, shape: &[usize], tp: usize) -> Option<Vec<usize>> {
        let Some(d) = self.dim() else { return Some(shape.to_vec()) };
        let n = *shape.get(d)?;
        if tp == 0 || n % tp != 0 {
            return None;
        }
        let mut local = shape.to_vec();
        local[d] = n / tp;
        Some(local)
    }

    /// The element ranges of the whole parameter (row-major, `shape`) that rank `rank` of `tp` holds,
    /// in the order its slice lays them out: one range for `Rows` and `Replicated`, one per row of the
    /// whole for `Cols`. The caller checked the split with [`TpSplit::local_shape`].
    pub fn ranges(self, shape: &[usize], tp: usize, rank: usize) -> Vec<Range<usize>> {
        let numel: usize = shape.iter().product();
        match self {
            TpSplit::Replicated => vec![0..numel],
            TpSplit::Rows => {
                let part = numel / tp;
                vec![rank * part..(rank + 1) * part]
            }
            TpSplit::Cols => {
                let cols: usize = shape[1..].iter().product();
                let inner: usize = shape[2..].iter().product();
                let part = shape[1] / tp * inner;
                (0..shape[0]).map(|r| r * cols + rank * part..r * cols + (rank + 1) * part).collect()
            }
        }
    }
}

/// Where elements `local` of rank `rank`'s slice (offsets in the slice) lie in the whole parameter:
/// `(whole range, offset in local)` pieces in order, covering `local` exactly.
pub fn whole_pieces(split: TpSplit, shape: &[usize], tp: usize, rank: usize, local: Range<usize>) -> Vec<(Range<usize>, usize)> {
    let mut out = Vec::new();
    let mut at = 0;
    for r in split.ranges(shape, tp, rank) {
        let (lo, hi) = (at.max(local.start), (at + r.len()).min(local.end));
        if lo < hi {
            out.push((r.start + lo - at..r.start + hi - at, lo));
        }
        at += r.len();
        if at >= local.end {
            break;
        }
    }
    out
}

/// The inverse of [`whole_pieces`]: the part of the whole parameter's elements `whole` that rank
/// `rank`'s slice holds, as `(range in the slice, offset from whole.start)` pieces in order.
pub fn local_pieces(split: TpSplit, shape: &[usize], tp: usize, rank: usize, whole: Range<usize>) -> Vec<(Range<usize>, usize)> {
    let clip = |r: Range<usize>, local_start: usize| -> Option<(Range<usize>, usize)> {
        let (lo, hi) = (r.start.max(whole.start), r.end.min(whole.end));
        (lo < hi).then(|| (local_start + lo - r.start..local_start + hi - r.start, lo - whole.start))
    };
    match split {
        TpSplit::Replicated | TpSplit::Rows => {
            let r = split.ranges(shape, tp, rank).remove(0);
            clip(r, 0).into_iter().collect()
        }
        TpSplit::Cols => {
            let cols: usize = shape[1..].iter().product();
            let part = cols / tp;
            if whole.is_empty() || cols == 0 {
                return Vec::new();
            }
            (whole.start / cols..=(whole.end - 1) / cols).filter_map(|row| clip(row * cols + rank * part..row * cols + (rank + 1) * part, row * part)).collect()
        }
    }
}

/// Rank `rank`'s slice of `whole` (a parameter of `shape`, row-major) under `split`.
pub fn tp_slice(whole: &[f32], shape: &[usize], split: TpSplit, tp: usize, rank: usize) -> Vec<f32> {
    split.ranges(shape, tp, rank).into_iter().flat_map(|r| whole[r].iter().copied()).collect()
}

/// The whole parameter from every rank's slice (`slices[r]`, rank order): the inverse of [`tp_slice`].
pub fn tp_assemble(slices: &[&[f32]], shape: &[usize], split: TpSplit) -> Vec<f32> {
    let tp = slices.len();
    if split == TpSplit::Replicated {
        return slices[0].to_vec();
    }
    let mut whole = vec![0f32; shape.iter().product()];
    for (rank, slice) in slices.iter().enumerate() {
        let mut at = 0;
        for r in split.ranges(shape, tp, rank) {
            let len = r.len();
            whole[r].copy_from_slice(&slice[at..at + len]);
            at += len;
        }
    }
    whole
}

/// A block's view of its tensor-parallel group (`parallel.tp` adjacent ranks). Without tensor
/// parallelism it is a group of one: every all-reduce returns its input.
///
/// With sequence parallelism (`parallel.sp`) the activations between the split parts of a layer are
/// themselves split: each rank holds its `1/tp` of the token rows (rank order, rows of the flattened
/// `[b·t, d]`), gathers them all before a column-parallel product ([`TensorGroup::rows_in`]) and
/// reduce-scatters a row-parallel product's partial sums back to its rows ([`TensorGroup::rows_out`])
/// where tensor parallelism alone all-reduces them; the norms between run on the rank's rows, so a
/// norm weight's gradient is a partial sum ([`TensorGroup::replicated_grad`] adds it up).
#[derive(Clone, Default)]
pub struct TensorGroup {
    comm: Option<Arc<dyn Communicator>>,
    sequence: bool,
}

impl std::fmt::Debug for TensorGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TensorGroup(rank {} of {}{})", self.rank(), self.size(), if self.sequence { ", sequence parallel" } else { "" })
    }
}

impl TensorGroup {
    /// A group of one rank holding every parameter whole.
    pub fn single() -> Self {
        Self { comm: None, sequence: false }
    }

    /// The group of `comm`'s ranks.
    pub fn new(comm: Arc<dyn Communicator>) -> Self {
        Self { comm: Some(comm), sequence: false }
    }

    /// The same group with sequence parallelism on or off.
    pub fn with_sequence_parallel(mut self, on: bool) -> Self {
        self.sequence = on && self.size() > 1;
        self
    }

    /// Whether activations between the split parts of a layer are split by token rows.
    pub fn sequence_parallel(&self) -> bool {
        self.sequence
    }

    /// The rows of `n` this rank holds under sequence parallelism (all of them without), or an error
    /// naming the sizes where the group does not divide them.
    pub fn local_rows(&self, n: usize) -> candle_core::Result<usize> {
        if !self.sequence {
            return Ok(n);
        }
        if n % self.size() != 0 {
            candle_core::bail!("parallel.sp splits the {n} token rows of a micro-batch (micro_batch × seq_len) over parallel.tp = {} ranks, which does not divide them: choose a seq_len or micro_batch that tp divides", self.size());
        }
        Ok(n / self.size())
    }

    /// The input of a column-parallel product from this rank's rows `[m, d]`: every rank's rows in
    /// rank order `[m·tp, d]` under sequence parallelism (an all-gather), else `x` itself.
    pub fn rows_in(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let Some(comm) = self.comm.as_ref().filter(|_| self.sequence) else { return Ok(x.clone()) };
        let (m, d) = x.dims2()?;
        let (dtype, device) = (x.dtype(), x.device().clone());
        let mine: Vec<f32> = super::host_f32(x)?;
        let mut all = vec![0f32; mine.len() * self.size()];
        comm.all_gather_slice(&mine, &mut all).map_err(|e| candle_core::Error::Msg(format!("sequence parallelism: {e}")))?;
        super::from_host(all, (m * self.size(), d), dtype, &device)
    }

    /// The output of a row-parallel product (partial sums `[n, d]` on each rank): this rank's rows of
    /// their sum `[n/tp, d]` under sequence parallelism (a reduce-scatter, in rank order), else the
    /// whole sum (an all-reduce).
    pub fn rows_out(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let Some(comm) = self.comm.as_ref().filter(|_| self.sequence) else { return self.sum(x) };
        let (n, d) = x.dims2()?;
        let m = self.local_rows(n)?;
        let (dtype, device) = (x.dtype(), x.device().clone());
        let all: Vec<f32> = super::host_f32(x)?;
        let mut mine = vec![0f32; m * d];
        comm.reduce_scatter_slice(&all, &mut mine, ReduceOp::Sum).map_err(|e| candle_core::Error::Msg(format!("sequence parallelism: {e}")))?;
        super::from_host(mine, (m, d), dtype, &device)
    }

    /// The gradient of a parameter every rank holds whole, computed on this rank's rows: summed over
    /// the group under sequence parallelism (each rank saw its rows only), else as it is.
    pub fn replicated_grad(&self, g: &Tensor) -> candle_core::Result<Tensor> {
        if self.sequence {
            self.sum(g)
        } else {
            Ok(g.clone())
        }
    }

    /// This rank's index in the group.
    pub fn rank(&self) -> usize {
        self.comm.as_ref().map_or(0, |c| c.rank())
    }

    /// Ranks in the group.
    pub fn size(&self) -> usize {
        self.comm.as_ref().map_or(1, |c| c.world_size())
    }

    /// `x` reduced element-wise over the group (`Sum`: in rank order, accumulated in f32; `Max`), of
    /// `x`'s shape, dtype and device. Values travel as f32 through the host: the CPU backend's
    /// arithmetic, the reference the tests compare against.
    pub fn all_reduce(&self, x: &Tensor, op: ReduceOp) -> candle_core::Result<Tensor> {
        let Some(comm) = self.comm.as_ref().filter(|c| c.world_size() > 1) else { return Ok(x.clone()) };
        let (dtype, device, shape) = (x.dtype(), x.device().clone(), x.shape().clone());
        let mut v: Vec<f32> = super::host_f32(x)?;
        comm.all_reduce_slice(&mut v, op).map_err(|e| candle_core::Error::Msg(format!("tensor parallelism: {e}")))?;
        super::from_host(v, shape, dtype, &device)
    }

    /// The sum of `x` over the group (see [`TensorGroup::all_reduce`]).
    pub fn sum(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.all_reduce(x, ReduceOp::Sum)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_cover_the_whole_once_and_assemble_back() {
        let shape = [6, 4];
        let whole: Vec<f32> = (0..24).map(|i| i as f32).collect();
        for split in [TpSplit::Rows, TpSplit::Cols, TpSplit::Replicated] {
            for tp in [1, 2] {
                let slices: Vec<Vec<f32>> = (0..tp).map(|r| tp_slice(&whole, &shape, split, tp, r)).collect();
                let local = split.local_shape(&shape, tp).unwrap();
                assert!(slices.iter().all(|s| s.len() == local.iter().product::<usize>()));
                let refs: Vec<&[f32]> = slices.iter().map(Vec::as_slice).collect();
                assert_eq!(tp_assemble(&refs, &shape, split), whole, "{split:?} tp {tp}");
            }
        }
        // Rank 1 of 2 of a row-parallel [6, 4]: columns 2 and 3 of every row.
        assert_eq!(tp_slice(&whole, &shape, TpSplit::Cols, 2, 1)[..4], [2.0, 3.0, 6.0, 7.0]);
        assert_eq!(TpSplit::Rows.local_shape(&[6, 4], 4), None);
        // Elements 3..7 of that slice: the second column of row 1, then rows 2 and 3, then row 4's first.
        assert_eq!(whole_pieces(TpSplit::Cols, &shape, 2, 1, 3..7), vec![(7..8, 3), (10..12, 4), (14..15, 6)]);
        assert_eq!(whole_pieces(TpSplit::Rows, &shape, 2, 1, 2..5), vec![(14..17, 2)]);
        // Both ways agree on every range of every rank's slice.
        for split in [TpSplit::Rows, TpSplit::Cols, TpSplit::Replicated] {
            for rank in 0..2 {
                for (lo, hi) in [(0, 24), (5, 19), (7, 8), (12, 12)] {
                    let mut from_local = vec![None; 24];
                    for (w, at) in whole_pieces(split, &shape, 2, rank, 0..split.local_shape(&shape, 2).unwrap().iter().product()) {
                        w.clone().enumerate().for_each(|(k, x)| from_local[x] = Some(at + k));
                    }
                    let mut got = Vec::new();
                    for (l, off) in local_pieces(split, &shape, 2, rank, lo..hi) {
                        l.enumerate().for_each(|(k, li)| got.push((lo + off + k, li)));
                    }
                    let want: Vec<(usize, usize)> = (lo..hi).filter_map(|x| from_local[x].map(|li| (x, li))).collect();
                    assert_eq!(got, want, "{split:?} rank {rank} {lo}..{hi}");
                }
            }
        }
        assert_eq!(TpSplit::Cols.local_shape(&[6], 2), None);
    }
}
