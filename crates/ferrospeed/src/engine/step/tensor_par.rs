//! Tensor parallelism as the engine sees it. Each rank's blocks hold their slices of the split
//! parameters ([`Model::shard_tensors`]); ZeRO, gathers and gradient reductions run over the
//! data-parallel group as before (a slice is a block's own parameters to them). What changes is what
//! spans the tensor-parallel group too: the gradient norm (a split parameter's slices are different
//! numbers on each rank, a replicated one's the same: counted once, on tensor-parallel rank 0) and the
//! fp16 overflow check, both over the world's communication thread.

use super::comm_worker::CommWorker;
use super::error::EngineError;
use super::grads;
use super::model::Model;
use super::state::{CheckpointPlan, TensorLayout};
use crate::shard::FlatParam;
use super::trainer::{Engine, EngineConfig};
use crate::comm::{CommExt, ReduceOp};
use crate::parallel::{TensorGroup, TpSplit};
use std::ops::Range;
use std::sync::Arc;

/// Tensor parallelism, where it is on.
pub(super) struct Tensors {
    /// The world's communication thread (the engine's own is the data-parallel group's).
    pub(super) world: Arc<CommWorker>,
    /// This rank's index in its tensor-parallel group.
    pub(super) rank: usize,
}

impl Engine {
    /// As [`Engine::with_worker`], with tensor parallelism: every block that declares a
    /// [`Block::tensor_plan`](super::Block::tensor_plan) keeps this rank's slices of `group` (its
    /// tensor-parallel group, `parallel.tp` adjacent ranks) and communicates through it; `worker` is
    /// the data-parallel group's communication thread (ZeRO and the gradient reductions run there),
    /// `world` the world's.
    pub fn with_tensors(mut model: Model, worker: Arc<CommWorker>, world: Arc<CommWorker>, group: TensorGroup, cfg: EngineConfig) -> Result<Self, EngineError> {
        if group.size() * worker.world_size() != world.world_size() {
            return Err(EngineError::Unsupported(format!(
                "a tensor-parallel group of {} ranks and a data-parallel group of {} for a world of {}",
                group.size(),
                worker.world_size(),
                world.world_size()
            )));
        }
        model.shard_tensors(&group)?;
        let rank = group.rank();
        let mut engine = Self::build(model, worker, None, cfg)?;
        engine.tensor = Some(Tensors { world, rank });
        Ok(engine)
    }

    /// The checkpoint of an engine split by tensor parallelism ([`TensorLayout`]): every block whole
    /// in `blocks` (the names, shapes and offsets of `parallel.tp = 1`), each split block's files
    /// holding their slices' windows. World rank `r` is data-parallel rank `r / tp` and
    /// tensor-parallel rank `r % tp` (tensor-parallel ranks are adjacent in the mesh).
    pub(super) fn tensor_checkpoint_plan(&self) -> Option<CheckpointPlan> {
        let t = self.tensor.as_ref()?;
        let (dp, dp_rank) = (self.worker.world_size(), self.worker.rank());
        let world = t.world.world_size();
        let tp = world / dp;
        let m = &self.model;
        let blocks: Vec<(String, FlatParam)> = self
            .params
            .iter()
            .enumerate()
            .map(|(i, p)| (m.block_names()[i].clone(), m.tensor_shard(i).map_or_else(|| p.flat.clone(), |s| FlatParam::new(&s.whole, dp))))
            .collect();
        let splits: Vec<Option<Vec<TpSplit>>> = (0..blocks.len()).map(|i| m.tensor_shard(i).map(|s| s.splits.clone())).collect();
        let files = (0..world)
            .map(|r| {
                self.params
                    .iter()
                    .zip(&splits)
                    .map(|(p, split)| if split.is_some() || r % tp == 0 { p.flat.layout().range(r / tp) } else { 0..0 })
                    .collect()
            })
            .collect();
        Some(CheckpointPlan {
            local: splits.iter().enumerate().map(|(i, s)| (i, s.is_some() || t.rank == 0)).collect(),
            placement: vec![(dp_rank, 0); blocks.len()],
            blocks,
            files,
            tensor: Some(TensorLayout { tp, file_tp_rank: (0..world).map(|r| r % tp).collect(), splits }),
        })
    }

    /// Whether the blocks are split over a tensor-parallel group.
    pub fn tensor_parallel(&self) -> bool {
        self.tensor.is_some()
    }

    /// The squared gradient norm under tensor parallelism: each rank sums the squares of its
    /// data-parallel shard of what it counts (the split parameters' slices; the replicated ones on
    /// tensor-parallel rank 0 only), one all-reduce over the world adds them. `None` without it.
    pub(super) fn tensor_norm_squared(&self) -> Result<Option<f32>, EngineError> {
        let Some(t) = &self.tensor else { return Ok(None) };
        let rank = self.worker.rank();
        // Per block, the ranges of the flat buffer this rank counts.
        let pieces: Vec<Vec<Range<usize>>> = self
            .params
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let shard = p.flat.layout().range(rank);
                let counted: Vec<Range<usize>> = match self.model.tensor_shard(i) {
                    Some(s) => (0..s.splits.len()).filter(|&j| s.splits[j] != TpSplit::Replicated || t.rank == 0).map(|j| p.flat.range(j)).collect(),
                    None if t.rank == 0 => vec![0..p.flat.numel()],
                    None => Vec::new(),
                };
                counted.into_iter().map(|r| r.start.max(shard.start)..r.end.min(shard.end)).filter(|r| r.start < r.end).collect()
            })
            .collect();
        // `shard_sums` adds one range per block per entry: the k-th piece of every block in entry k.
        let entries = pieces.iter().map(Vec::len).max().unwrap_or(0);
        let table: Vec<Vec<Range<usize>>> = (0..entries).map(|k| pieces.iter().map(|b| b.get(k).cloned().unwrap_or(0..0)).collect()).collect();
        let mine = grads::shard_sums(&self.grads, &table)?.iter().sum::<f64>() as f32;
        let total = t.world.run(move |c| {
            let mut s = [mine];
            c.all_reduce_slice(&mut s, ReduceOp::Sum).map(|()| s[0])
        })??;
        Ok(Some(total))
    }
}
