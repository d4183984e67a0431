//! What a model is to the engine: a sequence of blocks, each with parameters it declares and a forward;
//! the batch blocks read (named tensors) and what flows between blocks (a list of tensors).
//!
//! Blocks never see ranks, shards or strategies (invariant 1): they receive their parameters as
//! tensors and compute. The engine decides where those tensors come from.

use super::error::EngineError;
use candle_core::{Device, Tensor};
use std::collections::BTreeMap;

pub use crate::parallel::{ContextGroup, ExpertGroup, TensorGroup, TpSplit};
pub use crate::shard::{Init, ParamRef, ParamSpec};

/// The inputs of one micro-batch (or one sample, before collation): named tensors of any dtype and
/// shape — token ids, labels, masks, features, images.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    tensors: BTreeMap<String, Tensor>,
}

impl Batch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// The language-model batch: `tokens` and next-token `targets`, both `[batch, seq]` u32.
    pub fn tokens(tokens: Tensor, targets: Tensor) -> Self {
        Self::new().with("tokens", tokens).with("targets", targets)
    }

    /// This batch with `tensor` under `name` (replacing one of that name).
    pub fn with(mut self, name: &str, tensor: Tensor) -> Self {
        self.insert(name, tensor);
        self
    }

    /// Put `tensor` under `name` (replacing one of that name).
    pub fn insert(&mut self, name: &str, tensor: Tensor) {
        self.tensors.insert(name.to_string(), tensor);
    }

    /// The tensor named `name`. A missing one is an error naming it and the tensors there are, as a
    /// candle error (blocks use `?`) that the engine turns back into [`EngineError::MissingInput`].
    pub fn get(&self, name: &str) -> candle_core::Result<&Tensor> {
        self.tensors.get(name).ok_or_else(|| {
            let err = EngineError::MissingInput { name: name.to_string(), present: self.names().join(", ") };
            candle_core::Error::WrappedContext { wrapped: Box::new(err), context: format!("batch tensor `{name}`") }
        })
    }

    /// This batch without the tensor named `name` (if it was there).
    pub fn without(mut self, name: &str) -> Self {
        self.tensors.remove(name);
        self
    }

    /// Whether a tensor named `name` is there.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The tensors' names, sorted.
    pub fn names(&self) -> Vec<String> {
        self.tensors.keys().cloned().collect()
    }

    /// Every (name, tensor), sorted by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.tensors.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// The number of rows: the first dimension of the first tensor (0 for an empty batch).
    pub fn rows(&self) -> usize {
        self.tensors.values().next().and_then(|t| t.dims().first().copied()).unwrap_or(0)
    }

    /// The same tensors on `device`.
    pub fn to_device(&self, device: &Device) -> candle_core::Result<Batch> {
        let mut out = Batch::new();
        for (name, t) in &self.tensors {
            out.insert(name, t.to_device(device)?);
        }
        Ok(out)
    }

    /// Samples stacked along a new first dimension, tensor by tensor: every sample must hold the same
    /// names with the same shapes and dtypes.
    pub fn stack(samples: &[Batch]) -> Result<Batch, EngineError> {
        let Some(first) = samples.first() else { return Ok(Batch::new()) };
        let mut out = Batch::new();
        for name in first.tensors.keys() {
            let mut parts = Vec::with_capacity(samples.len());
            for (i, s) in samples.iter().enumerate() {
                let t = s.tensors.get(name).ok_or_else(|| EngineError::MissingInput {
                    name: name.clone(),
                    present: format!("{} (sample {i} of the micro-batch)", s.names().join(", ")),
                })?;
                parts.push(t);
            }
            out.insert(name, Tensor::stack(&parts, 0).map_err(EngineError::tensor(format!("collating `{name}`")))?);
        }
        if let Some((i, s)) = samples.iter().enumerate().find(|(_, s)| s.tensors.len() != first.tensors.len()) {
            return Err(EngineError::Model(format!(
                "sample {i} of a micro-batch holds [{}] but sample 0 holds [{}]: every sample needs the same tensors",
                s.names().join(", "),
                first.names().join(", ")
            )));
        }
        Ok(out)
    }
}

/// A piece of a model with its own parameters: the unit of gathering, checkpointing and offload.
///
/// Data flows between blocks as a list of tensors: the first block receives none, each next block
/// the previous one's outputs (e.g. hidden state plus a mask), and the last block returns exactly one
/// tensor, the scalar loss. Gradients flow back through the floating-point ones.
pub trait Block: Send + Sync {
    /// A short name for messages and checkpoints, e.g. `h.3`.
    fn name(&self) -> String;

    /// The block's parameter slots, in the order `forward` receives them.
    fn params(&self) -> Vec<ParamRef>;

    /// Compute the block from its parameter slots, the previous block's outputs (`inputs`, empty for
    /// the first block) and the batch.
    fn forward(&self, params: &[Tensor], inputs: &[Tensor], batch: &Batch) -> candle_core::Result<Vec<Tensor>>;

    /// Runs of consecutive slots the block reads as one matrix, their parameters stacked along the
    /// first dimension (a Llama layer's q, k, v weights, and gate, up). Where every run's parameters
    /// are frozen and lie next to each other in the engine's buffer (a LoRA base), the engine passes
    /// after the slot tensors one view per run, in order, to the forward and backward of a training
    /// step, so the block need not copy them together; otherwise only the slot tensors come (and
    /// always outside a step, e.g. [`Engine::slot_tensors`](super::Engine::slot_tensors)).
    fn stacked_runs(&self) -> Vec<std::ops::Range<usize>> {
        Vec::new()
    }

    /// The last block only: names of scalars it returns after the loss, statistics of the step (e.g.
    /// an MoE router's load); the engine averages them over the micro-batches and the data-parallel
    /// group into [`StepStats::metrics`](super::StepStats::metrics) (in a pipeline: the last stage's, on every rank). None by default.
    fn metrics(&self) -> Vec<String> {
        Vec::new()
    }

    /// Expert blocks (a mixture of experts' routed experts): how many experts the block's own
    /// parameters hold, expert after expert, each with the same parameters (0, the default: not an
    /// expert block). Under expert parallelism (`parallel.ep > 1`) each rank of an expert group holds
    /// a contiguous, equal share of them ([`ExpertGroup::local_experts`]): the forward and backward
    /// receive that share's parameter slots only, and reach the others' through the group.
    fn experts(&self) -> usize {
        0
    }

    /// Expert blocks: the engine's handle on the block's expert-parallel group, given once before the
    /// first forward. A block never given one holds every expert.
    fn bind_experts(&self, _group: ExpertGroup) {}

    /// Tensor parallelism (`parallel.tp > 1`): how each of [`Block::params`]' slots splits over the
    /// tensor-parallel group, one entry per slot (a tied slot's entry must be its owner's). Empty, the
    /// default: the block is not split, every rank of the group computes it whole (correct for any
    /// block: its inputs and parameters are the same on each).
    fn tensor_plan(&self) -> Vec<TpSplit> {
        Vec::new()
    }

    /// Tensor parallelism: the engine's handle on the tensor-parallel group, given once before the
    /// first forward to a block with a [`Block::tensor_plan`]. From then on the block receives its
    /// slices of the split parameters and makes the all-reduces its arithmetic needs through the
    /// group, the same ones on every rank. An error (one line: what does not divide, and what would)
    /// refuses the group's size.
    fn bind_tensors(&self, _group: TensorGroup) -> Result<(), String> {
        Ok(())
    }

    /// Context parallelism (`parallel.cp > 1`): the engine's handle on the context-parallel group,
    /// given once before the first forward to every block. From then on each rank of the group
    /// receives the whole micro-batch and computes its chunk of the sequence
    /// ([`ContextGroup::chunk`]): the first block takes its chunk of the inputs, blocks exchange
    /// through the group what crosses chunks (attention), and the last block returns this chunk's
    /// share of the loss (the engine averages the group's). The default refuses: a block must be
    /// written for it.
    fn bind_context(&self, group: ContextGroup) -> Result<(), String> {
        Err(format!("block {} cannot split its sequence over parallel.cp = {} ranks: set parallel.cp = 1", self.name(), group.size()))
    }

    /// Forward FLOPs per token (for MFU), counting a multiply-add as 2.
    fn forward_flops_per_token(&self) -> f64 {
        0.0
    }

    /// Blocks with a hand-written backward run their forward here and return, with the outputs, what
    /// [`Block::backward`] needs. `None` (the default) means candle's autograd differentiates
    /// [`Block::forward`]. Both forwards must compute the same outputs.
    fn forward_saving(&self, _params: &[Tensor], _inputs: &[Tensor], _batch: &Batch) -> candle_core::Result<Option<(Vec<Tensor>, Saved)>> {
        Ok(None)
    }

    /// The hand-written backward: the gradients of the parameter slots (in slot order; `None` where a
    /// slot does not influence the outputs) and of the inputs (one entry per input, `None` where it
    /// has none), given the gradients of the outputs.
    fn backward(&self, _params: &[Tensor], _saved: Saved, _upstream: Upstream<'_>) -> candle_core::Result<(Vec<Option<Tensor>>, Vec<Option<Tensor>>)> {
        candle_core::bail!("block {} has no hand-written backward", self.name())
    }

    /// The hand-written backward split for zero-bubble pipelines (`parallel.pp_schedule = "zb"`): the
    /// input gradients now, and the parameter gradients as work run later. Blocks whose backward
    /// builds its gradients with [`ParamGrads`](super::ParamGrads) return `ParamGrads::split` of it
    /// here. The default runs [`Block::backward`] whole and hands its parameter gradients over
    /// finished: correct, with nothing left to fill the pipeline's idle time.
    fn backward_split(&self, params: &[Tensor], saved: Saved, upstream: Upstream<'_>) -> candle_core::Result<(super::WeightGrads, Vec<Option<Tensor>>)> {
        let (slots, inputs) = self.backward(params, saved, upstream)?;
        Ok((super::WeightGrads::ready(slots), inputs))
    }
}

/// What a block's forward keeps for its hand-written backward.
pub type Saved = Box<dyn std::any::Any + Send>;

/// The gradient flowing into a block's outputs.
#[derive(Debug, Clone, Copy)]
pub enum Upstream<'a> {
    /// The block's output is the loss; its gradient is this scale (e.g. 1/accumulation steps).
    Loss(f64),
    /// The gradients of the block's outputs, one per output (`None` where an output gets none).
    Grads(&'a [Option<Tensor>]),
}

impl<'a> Upstream<'a> {
    /// The gradient of output `i`, for blocks that expect one: an error otherwise.
    pub fn grad(&self, i: usize) -> candle_core::Result<&'a Tensor> {
        match self {
            Upstream::Grads(g) => match g.get(i) {
                Some(Some(t)) => Ok(t),
                _ => candle_core::bail!("no gradient for output {i} of the block"),
            },
            Upstream::Loss(_) => candle_core::bail!("this block is not the last one: its output is not the loss"),
        }
    }
}
