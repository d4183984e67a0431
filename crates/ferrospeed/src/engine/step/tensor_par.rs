//! Tensor parallelism as the engine sees it. Each rank's blocks hold their slices of the split
//! parameters ([`Model::shard_tensors`]); ZeRO, gathers and gradient reductions run over the
//! data-parallel group as before (a slice is a block's own parameters to them). What changes is what
//! spans the tensor-parallel group too: the gradient norm (a split parameter's slices are different
//! numbers on each rank, a replicated one's the same: counted once, on tensor-parallel rank 0) and the
//! fp16 overflow check, both over the world's communication thread.
//! Context parallelism's constructors live here too (alone, and with tensor parallelism): its
//! parameters are whole, so only the group the engine reduces over changes.

use super::comm_worker::CommWorker;
use super::error::EngineError;
use super::grads;
use super::block::ParamSpec;
use super::model::{Model, StageModel};
use super::state::{CheckpointPlan, TensorLayout};
use crate::shard::FlatParam;
use super::trainer::{Engine, EngineConfig};
use crate::comm::{CommExt, ReduceOp};
use crate::parallel::{ContextGroup, TensorGroup, TpSplit};
use std::ops::Range;
use std::sync::Arc;

/// Tensor parallelism, where it is on.
pub(super) struct Tensors {
    /// The world's communication thread (the engine's own is the data-parallel group's).
    pub(super) world: Arc<CommWorker>,
    /// This rank's index in its tensor-parallel group, and the group's size.
    pub(super) rank: usize,
    pub(super) size: usize,
    /// In a pipeline: how each block of the whole model splits (its own parameters'), for the
    /// checkpoint's record of the blocks other stages hold.
    pub(super) whole_splits: Option<Vec<Option<Vec<TpSplit>>>>,
}

impl Engine {
    /// As [`Engine::with_worker`], with tensor parallelism: every block that declares a
    /// [`Block::tensor_plan`](super::Block::tensor_plan) keeps this rank's slices of `group` (its
    /// tensor-parallel group, `parallel.tp` adjacent ranks) and communicates through it; `worker` is
    /// the data-parallel group's communication thread (ZeRO and the gradient reductions run there),
    /// `world` the world's.
    pub fn with_tensors(model: Model, worker: Arc<CommWorker>, world: Arc<CommWorker>, group: TensorGroup, cfg: EngineConfig) -> Result<Self, EngineError> {
        Self::split_engine(model, worker, world, group, None, cfg)
    }

    /// As [`Engine::with_tensors`], each sequence split over `context` too (tensor and context
    /// parallelism together): the blocks are split over `group`, then given `context`; `worker` is the
    /// data × context-parallel group's communication thread (ZeRO and reductions span it).
    pub fn with_tensors_and_context(model: Model, worker: Arc<CommWorker>, world: Arc<CommWorker>, group: TensorGroup, context: ContextGroup, cfg: EngineConfig) -> Result<Self, EngineError> {
        Self::split_engine(model, worker, world, group, Some(context), cfg)
    }

    /// As [`Engine::with_worker`], with context parallelism: every block gets `group` (its
    /// context-parallel group) and computes its chunk of each sequence; `worker` is the
    /// data × context-parallel group's (parameters, ZeRO and gradient reductions span it: each rank's
    /// gradient is its chunk's, the average over the group the whole sequence's).
    pub fn with_context(mut model: Model, worker: Arc<CommWorker>, group: ContextGroup, cfg: EngineConfig) -> Result<Self, EngineError> {
        model.bind_context(&group)?;
        Self::build(model, worker, None, cfg)
    }

    fn split_engine(mut model: Model, worker: Arc<CommWorker>, world: Arc<CommWorker>, group: TensorGroup, context: Option<ContextGroup>, cfg: EngineConfig) -> Result<Self, EngineError> {
        if group.size() * worker.world_size() != world.world_size() {
            return Err(EngineError::Unsupported(format!(
                "a tensor-parallel group of {} ranks and a data(-and-context)-parallel group of {} for a world of {}",
                group.size(),
                worker.world_size(),
                world.world_size()
            )));
        }
        model.shard_tensors(&group)?;
        if let Some(context) = &context {
            model.bind_context(context)?;
        }
        let mut engine = Self::build(model, worker, None, cfg)?;
        engine.tensor = Some(Tensors { world, rank: group.rank(), size: group.size(), whole_splits: None });
        Ok(engine)
    }

    /// As [`Engine::with_pipeline`], each stage's blocks split over `group` as in
    /// [`Engine::with_tensors`] (3D parallelism: pipeline stages of tensor-parallel groups, data
    /// parallel over the rest). `splits` is [`Model::tensor_splits`] of the whole model, taken before
    /// the cut.
    pub fn with_pipeline_tensors(mut cut: StageModel, dp: Arc<CommWorker>, stage: super::PipelineStage, group: TensorGroup, splits: Vec<Option<Vec<TpSplit>>>, cfg: EngineConfig) -> Result<Self, EngineError> {
        cut.model.shard_tensors(&group)?;
        let world = stage.world.clone();
        let mut engine = Self::with_pipeline(cut, dp, stage, cfg)?;
        engine.tensor = Some(Tensors { world, rank: group.rank(), size: group.size(), whole_splits: Some(splits) });
        Ok(engine)
    }

    /// The checkpoint of an engine split by tensor parallelism ([`TensorLayout`]): every block of the
    /// whole model whole in `blocks` (the names, shapes and offsets of `parallel.tp = 1`), each split
    /// block's files holding their slices' windows, a block that is not split saved by the files of
    /// tensor-parallel rank 0; in a pipeline each block by the ranks of its stage. World rank `r` is
    /// tensor-parallel rank `r % tp` (tensor-parallel ranks are adjacent in the mesh).
    pub(super) fn tensor_checkpoint_plan(&self) -> Option<CheckpointPlan> {
        let t = self.tensor.as_ref()?;
        let (dp, dp_rank, tp) = (self.worker.world_size(), self.worker.rank(), t.size);
        let world = t.world.world_size();
        let m = &self.model;
        // The whole model's blocks and how each splits; which world ranks save each (and as which
        // data-parallel rank); where each block of this engine is in the whole model.
        let (whole, splits, local): (Vec<(String, Vec<ParamSpec>)>, Vec<Option<Vec<TpSplit>>>, Vec<(usize, bool)>) = match (&self.pipe, &t.whole_splits) {
            (Some(pipe), Some(splits)) => {
                let local = pipe.original().iter().enumerate().map(|(i, &o)| (o, i >= pipe.ghosts() && (splits[o].is_some() || t.rank == 0))).collect();
                (pipe.whole().to_vec(), splits.clone(), local)
            }
            _ => {
                let whole = (0..m.num_blocks()).map(|i| (m.block_names()[i].clone(), m.tensor_shard(i).map_or_else(|| m.own_params(i).to_vec(), |s| s.whole.clone()))).collect();
                let splits: Vec<Option<Vec<TpSplit>>> = (0..m.num_blocks()).map(|i| m.tensor_shard(i).map(|s| s.splits.clone())).collect();
                let local = splits.iter().enumerate().map(|(i, s)| (i, s.is_some() || t.rank == 0)).collect();
                (whole, splits, local)
            }
        };
        let holder = |r: usize, b: usize| match &self.pipe {
            Some(pipe) => pipe.holder(r, b),
            None => Some(r / tp),
        };
        let local_flats: Vec<FlatParam> = whole
            .iter()
            .zip(&splits)
            .map(|((_, specs), split)| match split {
                Some(s) => FlatParam::new(&specs.iter().zip(s).map(|(p, s)| ParamSpec { shape: s.local_shape(&p.shape, tp).unwrap_or_default(), ..p.clone() }).collect::<Vec<_>>(), dp),
                None => FlatParam::new(specs, dp),
            })
            .collect();
        let files = (0..world)
            .map(|r| {
                (0..whole.len())
                    .map(|b| match holder(r, b) {
                        Some(d) if splits[b].is_some() || r % tp == 0 => local_flats[b].layout().range(d),
                        _ => 0..0,
                    })
                    .collect()
            })
            .collect();
        Some(CheckpointPlan {
            placement: vec![(dp_rank, 0); local.len()],
            local,
            blocks: whole.iter().map(|(n, specs)| (n.clone(), FlatParam::new(specs, dp))).collect(),
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
        // A pipeline's ghosts hold another stage's blocks (counted there).
        let ghosts = self.pipe.as_ref().map_or(0, |p| p.ghosts());
        let pieces: Vec<Vec<Range<usize>>> = self
            .params
            .iter()
            .enumerate()
            .map(|(i, p)| {
                if i < ghosts {
                    return Vec::new();
                }
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
