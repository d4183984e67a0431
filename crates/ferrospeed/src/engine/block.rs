//! What a model is to the engine: a sequence of blocks, each with parameters it declares and a forward.
//!
//! Blocks never see ranks, shards or strategies (invariant 1): they receive their parameters as
//! tensors and compute. The engine decides where those tensors come from.

use candle_core::Tensor;

/// The inputs every block may use: token ids and next-token targets, both `[batch, seq]` u32.
#[derive(Debug, Clone)]
pub struct Batch {
    pub tokens: Tensor,
    pub targets: Tensor,
}

/// How a parameter starts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    Zeros,
    Ones,
    Normal { std: f64 },
}

/// A parameter a block owns.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamSpec {
    /// Name inside the block, e.g. `attn.c_attn.weight`.
    pub name: String,
    pub shape: Vec<usize>,
    pub init: Init,
    /// Whether AdamW's weight decay applies (not to biases and norms).
    pub decay: bool,
}

impl ParamSpec {
    pub fn new(name: &str, shape: &[usize], init: Init, decay: bool) -> Self {
        Self { name: name.to_string(), shape: shape.to_vec(), init, decay }
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A parameter slot of a block: one it owns, or one owned by an earlier block (tied weights, such as
/// GPT-2's head sharing the token embedding).
#[derive(Debug, Clone, PartialEq)]
pub enum ParamRef {
    Own(ParamSpec),
    Tied { block: usize, name: String },
}

/// A piece of a model with its own parameters: the unit of gathering, checkpointing and offload.
pub trait Block: Send + Sync {
    /// A short name for messages and checkpoints, e.g. `h.3`.
    fn name(&self) -> String;

    /// The block's parameter slots, in the order `forward` receives them.
    fn params(&self) -> Vec<ParamRef>;

    /// Compute the block. `x` is the previous block's output (`None` for the first block); the last
    /// block returns the scalar loss.
    fn forward(&self, params: &[Tensor], x: Option<&Tensor>, batch: &Batch) -> candle_core::Result<Tensor>;

    /// Forward FLOPs per token (for MFU), counting a multiply-add as 2.
    fn forward_flops_per_token(&self) -> f64 {
        0.0
    }

    /// Blocks with a hand-written backward run their forward here and return, with the output, what
    /// [`Block::backward`] needs. `None` (the default) means candle's autograd differentiates
    /// [`Block::forward`]. Both forwards must compute the same output.
    fn forward_saving(&self, _params: &[Tensor], _x: Option<&Tensor>, _batch: &Batch) -> candle_core::Result<Option<(Tensor, Saved)>> {
        Ok(None)
    }

    /// The hand-written backward: the gradients of the parameter slots (in slot order; `None` where a
    /// slot does not influence the output) and of the input (`None` for the first block), given the
    /// gradient of the output.
    fn backward(&self, _params: &[Tensor], _saved: Saved, _upstream: Upstream<'_>) -> candle_core::Result<(Vec<Option<Tensor>>, Option<Tensor>)> {
        candle_core::bail!("block {} has no hand-written backward", self.name())
    }
}

/// What a block's forward keeps for its hand-written backward.
pub type Saved = Box<dyn std::any::Any + Send>;

/// The gradient flowing into a block's output.
#[derive(Debug, Clone, Copy)]
pub enum Upstream<'a> {
    /// The block's output is the loss; its gradient is this scale (e.g. 1/accumulation steps).
    Loss(f64),
    /// The gradient of the block's output, shaped like it.
    Grad(&'a Tensor),
}
