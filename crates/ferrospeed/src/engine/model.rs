//! A model as the engine sees it: blocks, their own parameters, and where each slot's tensor lives.

use super::block::{Block, ContextGroup, ExpertGroup, ParamRef, ParamSpec, TensorGroup, TpSplit};
use super::error::EngineError;

/// Where a block's parameter slot lives: in `block`'s own parameters (or its frozen ones), at `index`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotSource {
    /// Index of the block that owns the parameter.
    pub block: usize,
    /// Index of the parameter among that block's own (trainable) parameters, or its frozen ones.
    pub index: usize,
    /// The parameter is frozen ([`ParamRef::Frozen`]): no gradient, no optimizer state.
    pub frozen: bool,
}

/// What a pipeline rank holds of a model (see [`Model::cut`]).
pub struct StageModel {
    /// The ghosts, then the blocks of each of the rank's stages.
    pub model: Model,
    /// How many ghosts come first.
    pub ghosts: usize,
    /// The blocks of each of the rank's stages, in `model`'s indices.
    pub runs: Vec<std::ops::Range<usize>>,
    /// Each block's index in the whole model.
    pub original: Vec<usize>,
}

/// A sequence of blocks with resolved parameter slots.
pub struct Model {
    blocks: Vec<Box<dyn Block>>,
    /// Parameters each block owns, in declaration order.
    own: Vec<Vec<ParamSpec>>,
    /// Frozen parameters each block owns, in declaration order.
    frozen: Vec<Vec<ParamSpec>>,
    /// For each block, where each of its slots comes from.
    slots: Vec<Vec<SlotSource>>,
    names: Vec<String>,
    /// For each block sharded over an expert group ([`Model::shard_experts`]): the whole of it.
    experts: Vec<Option<ExpertShard>>,
    /// For each block split over a tensor-parallel group ([`Model::shard_tensors`]): the whole of it.
    tensors: Vec<Option<TensorShard>>,
}

/// What a block split over a tensor-parallel group keeps of the whole block: its own parameters'
/// whole shapes and how each splits (initial values, checkpoints and imports address whole
/// parameters, whatever `parallel.tp`).
#[derive(Debug, Clone)]
pub struct TensorShard {
    /// The whole block's own parameters.
    pub whole: Vec<ParamSpec>,
    /// How each own parameter splits.
    pub splits: Vec<TpSplit>,
    /// This rank's index in the tensor-parallel group.
    pub rank: usize,
    /// The tensor-parallel group's size.
    pub size: usize,
}

/// What an expert block sharded over an expert group keeps of the whole block (checkpoints and
/// imports address the whole block, whatever `parallel.ep`).
#[derive(Debug, Clone)]
pub struct ExpertShard {
    /// The whole block's own parameters, every expert's.
    pub whole: Vec<ParamSpec>,
    /// Where this rank's share starts in the whole block's flat buffer (elements).
    pub offset: usize,
}

impl Model {
    /// Resolve the blocks' slots. A tied slot must name a parameter of an earlier block, so that the
    /// owner's gradient is complete once the backward pass (which runs in reverse) reaches the owner.
    pub fn new(blocks: Vec<Box<dyn Block>>) -> Result<Self, EngineError> {
        let mut own = Vec::with_capacity(blocks.len());
        let mut frozen = Vec::with_capacity(blocks.len());
        let mut slots = Vec::with_capacity(blocks.len());
        for (i, block) in blocks.iter().enumerate() {
            let mut mine: Vec<ParamSpec> = Vec::new();
            let mut cold: Vec<ParamSpec> = Vec::new();
            let mut sources = Vec::new();
            for slot in block.params() {
                let (spec, is_frozen) = match slot {
                    ParamRef::Own(spec) => (spec, false),
                    ParamRef::Frozen(spec) => (spec, true),
                    ParamRef::Tied { block: owner, name } => {
                        let find = |specs: Option<&Vec<ParamSpec>>| specs.and_then(|s| s.iter().position(|s| s.name == name));
                        let found = (owner < i).then(|| match find(own.get(owner)) {
                            Some(index) => Some(SlotSource { block: owner, index, frozen: false }),
                            None => find(frozen.get(owner)).map(|index| SlotSource { block: owner, index, frozen: true }),
                        });
                        let Some(source) = found.flatten() else {
                            return Err(EngineError::BadTie { block: block.name(), owner, name });
                        };
                        sources.push(source);
                        continue;
                    }
                };
                if mine.iter().chain(&cold).any(|s| s.name == spec.name) {
                    return Err(EngineError::DuplicateParam { block: block.name(), name: spec.name });
                }
                let list = if is_frozen { &mut cold } else { &mut mine };
                sources.push(SlotSource { block: i, index: list.len(), frozen: is_frozen });
                list.push(spec);
            }
            own.push(mine);
            frozen.push(cold);
            slots.push(sources);
        }
        let names: Vec<String> = blocks.iter().map(|b| b.name()).collect();
        if let Some(dup) = names.iter().enumerate().find(|(i, n)| names[..*i].contains(n)) {
            return Err(EngineError::Model(format!("two blocks are named {}", dup.1)));
        }
        let experts = vec![None; blocks.len()];
        let tensors = vec![None; blocks.len()];
        Ok(Self { blocks, own, frozen, slots, names, experts, tensors })
    }

    /// Keep of every expert block ([`Block::experts`]) only the share of `group`'s rank: its own
    /// parameters become that share's (a contiguous run of whole experts, so a contiguous range of
    /// the whole block's flat buffer), and the block gets the group's handle. Refused where the
    /// group's size does not divide a block's experts, or an expert block has frozen or tied slots.
    pub fn shard_experts(&mut self, group: &ExpertGroup) -> Result<(), EngineError> {
        let size = group.size();
        for i in 0..self.blocks.len() {
            let count = self.blocks[i].experts();
            if count == 0 {
                continue;
            }
            let name = &self.names[i];
            let own = &self.own[i];
            if count % size != 0 {
                let divisors: Vec<usize> = (1..=count).filter(|d| count % d == 0).collect();
                return Err(EngineError::Model(format!(
                    "block {name} has {count} experts, which parallel.ep = {size} does not divide: choose ep among {divisors:?} (and dividing the data-parallel size)"
                )));
            }
            let mine = self.slots[i].iter().enumerate().all(|(j, s)| *s == SlotSource { block: i, index: j, frozen: false });
            if !self.frozen[i].is_empty() || !mine || own.len() % count != 0 || own.is_empty() {
                return Err(EngineError::Model(format!("expert block {name} must own all its slots, trainable, the same parameters for each of its {count} experts")));
            }
            let per = own.len() / count;
            if (0..own.len()).any(|j| own[j].shape != own[j % per].shape) {
                return Err(EngineError::Model(format!("the experts of block {name} have parameters of different shapes")));
            }
            if let Some(user) = (0..self.blocks.len()).find(|&b| b != i && self.slots[b].iter().any(|s| s.block == i)) {
                return Err(EngineError::Model(format!("block {} uses a parameter of expert block {name}: expert parameters cannot be tied", self.names[user])));
            }
            let local = group.local_experts(count);
            let keep = local.start * per..local.end * per;
            let offset = own[..keep.start].iter().map(ParamSpec::numel).sum();
            let mine = own[keep.clone()].to_vec();
            let whole = std::mem::replace(&mut self.own[i], mine);
            self.slots[i] = (0..keep.len()).map(|index| SlotSource { block: i, index, frozen: false }).collect();
            self.experts[i] = Some(ExpertShard { whole, offset });
            self.blocks[i].bind_experts(group.clone());
        }
        Ok(())
    }

    /// Split every block that declares a [`Block::tensor_plan`] over `group` (the apply function of
    /// tensor parallelism): its own parameters become this rank's slices, and the block gets the
    /// group's handle. Blocks without a plan stay whole on every rank. Refused where the group's size
    /// does not divide a split dimension (the block's own message says which sizes would), where a
    /// split block has frozen parameters (LoRA under tensor parallelism is not built), where a tied
    /// slot would split otherwise than its owner, or where no block declares a plan.
    pub fn shard_tensors(&mut self, group: &TensorGroup) -> Result<(), EngineError> {
        let tp = group.size();
        if tp == 1 {
            return Ok(());
        }
        for i in 0..self.blocks.len() {
            let plan = self.blocks[i].tensor_plan();
            if plan.is_empty() {
                continue;
            }
            let name = self.names[i].clone();
            if plan.len() != self.slots[i].len() {
                return Err(EngineError::Model(format!("block {name} plans {} splits for its {} parameter slots", plan.len(), self.slots[i].len())));
            }
            if !self.frozen[i].is_empty() {
                return Err(EngineError::Unsupported(format!("block {name} has frozen parameters (LoRA), which parallel.tp = {tp} cannot split yet: set parallel.tp = 1")));
            }
            let mut splits = vec![TpSplit::Replicated; self.own[i].len()];
            for (slot, &split) in self.slots[i].iter().zip(&plan) {
                if slot.block == i {
                    splits[slot.index] = split;
                    continue;
                }
                let owner = self.tensors[slot.block].as_ref().map_or(TpSplit::Replicated, |t| t.splits[slot.index]);
                if owner != split {
                    return Err(EngineError::Model(format!("block {name} splits a parameter it shares with block {} as {split:?}, its owner as {owner:?}", self.names[slot.block])));
                }
            }
            self.blocks[i].bind_tensors(group.clone()).map_err(|e| EngineError::Unsupported(format!("block {name}: {e}")))?;
            let mut local = Vec::with_capacity(splits.len());
            for (spec, split) in self.own[i].iter().zip(&splits) {
                let Some(shape) = split.local_shape(&spec.shape, tp) else {
                    return Err(EngineError::Unsupported(format!(
                        "parameter {} of block {name} has shape {:?}, which parallel.tp = {tp} cannot split by {split:?}: choose a tp that divides it",
                        spec.name, spec.shape
                    )));
                };
                local.push(ParamSpec { shape, ..spec.clone() });
            }
            let whole = std::mem::replace(&mut self.own[i], local);
            self.tensors[i] = Some(TensorShard { whole, splits, rank: group.rank(), size: tp });
        }
        if self.tensors.iter().all(Option::is_none) {
            return Err(EngineError::Unsupported(format!(
                "parallel.tp = {tp} splits blocks that say how (Block::tensor_plan), and no block of this model does: set parallel.tp = 1"
            )));
        }
        Ok(())
    }

    /// Give every block the context-parallel group's handle (the apply function of context
    /// parallelism: parameters stay whole, each rank computes its chunk of every sequence). Refused
    /// where a block cannot split its sequence (its own one-line reason).
    pub fn bind_context(&mut self, group: &ContextGroup) -> Result<(), EngineError> {
        if group.size() == 1 {
            return Ok(());
        }
        for (block, name) in self.blocks.iter().zip(&self.names) {
            block.bind_context(group.clone()).map_err(|e| EngineError::Unsupported(format!("block {name}: {e}")))?;
        }
        Ok(())
    }

    /// How each block's own parameters would split over a tensor-parallel group (from its
    /// [`Block::tensor_plan`]; `None` for a block without one): what a pipeline's stages record of
    /// the blocks they do not hold.
    pub fn tensor_splits(&self) -> Vec<Option<Vec<TpSplit>>> {
        (0..self.blocks.len())
            .map(|i| {
                let plan = self.blocks[i].tensor_plan();
                if plan.is_empty() || plan.len() != self.slots[i].len() {
                    return None;
                }
                let mut own = vec![TpSplit::Replicated; self.own[i].len()];
                for (slot, split) in self.slots[i].iter().zip(plan) {
                    if slot.block == i && !slot.frozen {
                        own[slot.index] = split;
                    }
                }
                Some(own)
            })
            .collect()
    }

    /// Block `i`'s whole, where it is split over a tensor-parallel group.
    pub fn tensor_shard(&self, i: usize) -> Option<&TensorShard> {
        self.tensors[i].as_ref()
    }

    /// Block `i`'s whole, where it is an expert block sharded over an expert group.
    pub fn expert_shard(&self, i: usize) -> Option<&ExpertShard> {
        self.experts[i].as_ref()
    }

    /// Number of blocks.
    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Block `i`, in model order.
    pub fn block(&self, i: usize) -> &dyn Block {
        self.blocks[i].as_ref()
    }

    /// The blocks' names, in order.
    pub fn block_names(&self) -> &[String] {
        &self.names
    }

    /// Parameters block `i` owns.
    pub fn own_params(&self, i: usize) -> &[ParamSpec] {
        &self.own[i]
    }

    /// Frozen parameters block `i` owns ([`ParamRef::Frozen`]).
    pub fn frozen_params(&self, i: usize) -> &[ParamSpec] {
        &self.frozen[i]
    }

    /// The spec of the parameter a slot names.
    pub fn spec(&self, slot: SlotSource) -> &ParamSpec {
        if slot.frozen {
            &self.frozen[slot.block][slot.index]
        } else {
            &self.own[slot.block][slot.index]
        }
    }

    /// Whether any block has frozen parameters.
    pub fn has_frozen(&self) -> bool {
        self.frozen.iter().any(|f| !f.is_empty())
    }

    /// Number of frozen parameters.
    pub fn num_frozen_params(&self) -> usize {
        self.frozen.iter().flatten().map(ParamSpec::numel).sum()
    }

    /// Where each slot of block `i` comes from.
    pub fn slots(&self, i: usize) -> &[SlotSource] {
        &self.slots[i]
    }

    /// Total number of trainable parameters (tied ones counted once).
    pub fn num_params(&self) -> usize {
        self.own.iter().flatten().map(ParamSpec::numel).sum()
    }

    /// The part of the model a pipeline rank holds: the blocks of its stages (`chunks`, in order: one
    /// range, or several with virtual stages), after the owners of the tied parameters they use that
    /// none of its stages holds (their "ghosts": held whole so the tied copy starts from the owner's
    /// values and takes the owner's steps, never run). Names stay the model's, so initial values,
    /// checkpoints and imports see the same blocks.
    pub fn cut(self, chunks: &[std::ops::Range<usize>]) -> Result<StageModel, EngineError> {
        let n = self.num_blocks();
        let held = |b: usize| chunks.iter().any(|c| c.contains(&b));
        if chunks.iter().any(|c| c.is_empty() || c.end > n) {
            return Err(EngineError::Model(format!("blocks {chunks:?} of a model of {n} blocks")));
        }
        let mut ghosts: Vec<usize> =
            chunks.iter().flat_map(|c| c.clone()).flat_map(|i| self.slots[i].iter().map(|s| s.block)).filter(|&b| !held(b)).collect();
        ghosts.sort_unstable();
        ghosts.dedup();
        let original: Vec<usize> = ghosts.iter().copied().chain(chunks.iter().flat_map(|c| c.clone())).collect();
        let new_index = |b: usize| original.iter().position(|&o| o == b);
        let mut taken: Vec<Option<Box<dyn Block>>> = self.blocks.into_iter().map(Some).collect();
        if self.experts.iter().any(Option::is_some) {
            return Err(EngineError::Unsupported("a pipeline of a model sharded over expert groups is not built yet: set parallel.ep = 1 or parallel.pp = 1".into()));
        }
        if self.tensors.iter().any(Option::is_some) {
            return Err(EngineError::Unsupported("a pipeline is cut before its stages are split over tensor-parallel groups".into()));
        }
        let mut out = Model { blocks: Vec::new(), own: Vec::new(), frozen: Vec::new(), slots: Vec::new(), names: Vec::new(), experts: Vec::new(), tensors: Vec::new() };
        for &o in &original {
            out.blocks.push(taken[o].take().ok_or_else(|| EngineError::Model(format!("block {o} taken twice")))?);
            out.own.push(self.own[o].clone());
            out.frozen.push(self.frozen[o].clone());
            out.names.push(self.names[o].clone());
            out.experts.push(None);
            out.tensors.push(None);
            // A ghost never runs: its own parameters are all it keeps (its tied slots may point
            // at blocks this rank does not hold).
            let ghost = !held(o);
            let slots = self.slots[o].iter().filter(|s| !ghost || s.block == o).map(|s| new_index(s.block).map(|block| SlotSource { block, ..*s }));
            out.slots.push(slots.collect::<Option<Vec<_>>>().ok_or_else(|| EngineError::Model(format!("block {} uses a block outside its stage", self.names[o])))?);
        }
        let mut start = ghosts.len();
        let runs = chunks
            .iter()
            .map(|c| {
                start += c.len();
                start - c.len()..start
            })
            .collect();
        Ok(StageModel { model: out, ghosts: ghosts.len(), runs, original })
    }

    /// What each block costs a pipeline stage (its forward FLOPs per token and its own parameters),
    /// for [`crate::parallel::stage_blocks`].
    pub fn stage_costs(&self) -> Vec<crate::parallel::BlockCost> {
        (0..self.num_blocks())
            .map(|i| crate::parallel::BlockCost { flops: self.block(i).forward_flops_per_token(), params: self.own[i].iter().chain(&self.frozen[i]).map(|p| p.numel() as f64).sum() })
            .collect()
    }

    /// Forward FLOPs per token of the whole model.
    pub fn forward_flops_per_token(&self) -> f64 {
        self.blocks.iter().map(|b| b.forward_flops_per_token()).sum()
    }
}
