//! Errors of the training engine.

use crate::comm::CommError;

/// What can go wrong defining a model or running the engine's steps.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A model that cannot be built or run as defined (no blocks, two blocks of one name, a block
    /// its `VarBuilder` could not build).
    #[error("model definition: {0}")]
    Model(String),
    /// A candle operation of a block's forward or backward pass failed.
    #[error("tensor computation in block {block}: {}", candle_message(source))]
    Tensor {
        /// The block's name.
        block: String,
        /// The candle error.
        source: candle_core::Error,
    },
    /// A collective or the process group failed.
    #[error(transparent)]
    Comm(#[from] CommError),
    /// A request the engine cannot serve in its current set-up or state (e.g. a step without
    /// micro-batches, or an optimizer without a CUDA path on the GPU).
    #[error("{0}")]
    Unsupported(String),
    /// A block's code created two parameters of one name.
    #[error("block {block} creates parameter `{name}` twice: give each layer its own prefix (vb.pp(\"…\")), or tie the second use to the first")]
    DuplicateParam {
        /// The block's name.
        block: String,
        /// The parameter's name.
        name: String,
    },
    /// A tied parameter slot that does not name a parameter of an earlier block.
    #[error("block {block} ties to `{name}` of block {owner}, which is not a parameter of an earlier block: tie the later use to the earlier owner (the backward runs in reverse, so the owner must come first)")]
    BadTie {
        /// The name of the block that ties.
        block: String,
        /// Index of the block the tie names as owner.
        owner: usize,
        /// The tied parameter's name.
        name: String,
    },
    /// Autograd gave no gradient to a parameter slot or a floating-point input of a block.
    #[error("block {block}: {what} received no gradient, so it (and everything before it) would train as if frozen; candle-nn's LayerNorm, RmsNorm and softmax_last_dim take a fused path with no backward on contiguous input (candle issues #2168, #2977): use ferrospeed::nn::layer_norm / rms_norm and candle_nn::ops::softmax; a parameter the loss never uses cannot be trained: remove it")]
    NoGradient {
        /// The block's name.
        block: String,
        /// Which parameter or input.
        what: String,
    },
    /// The NVMe offload folder cannot serve (missing, not writable, too small) or a transfer failed.
    #[error("zero.nvme_dir {}: {reason}", path.display())]
    Nvme {
        /// The folder or file.
        path: std::path::PathBuf,
        /// What is wrong, and the fix.
        reason: String,
    },
    /// `zero.pinned_budget_mb` cannot hold the transfer buffers of one block.
    #[error("zero.pinned_budget_mb = {budget_mb} is smaller than block {block}'s offload buffers ({needed_mb} MB): set it to at least {needed_mb}, or 0 to let the engine size them")]
    PinnedBudget {
        /// The budget set.
        budget_mb: u64,
        /// The largest block.
        block: String,
        /// What one block's buffers need, in MB (rounded up).
        needed_mb: u64,
    },
    /// A block asked the batch for a tensor it does not hold.
    #[error("the batch has no tensor `{name}` (it holds: {present}); add it to the dataset's samples or fix the name the block asks for")]
    MissingInput {
        /// The tensor's name.
        name: String,
        /// The names of the tensors the batch holds, comma-separated.
        present: String,
    },
}

/// A candle error as one line: without the backtrace candle attaches when `RUST_BACKTRACE` is set,
/// its context and cause joined.
pub fn candle_message(e: &candle_core::Error) -> String {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => candle_message(inner),
        other => other.to_string().lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join("; "),
    }
}

impl EngineError {
    pub(crate) fn tensor(block: impl Into<String>) -> impl FnOnce(candle_core::Error) -> Self {
        let block = block.into();
        move |source| Self::from_candle(block, source)
    }

    /// A candle error of `block`, unwrapping the engine errors blocks raise through candle (a missing
    /// batch tensor) so callers can match on them.
    pub fn from_candle(block: String, source: candle_core::Error) -> Self {
        let mut inner = &source;
        loop {
            match inner {
                candle_core::Error::Context { inner: i, .. }
                | candle_core::Error::WithBacktrace { inner: i, .. }
                | candle_core::Error::WithPath { inner: i, .. } => inner = i,
                _ => break,
            }
        }
        if let candle_core::Error::WrappedContext { wrapped, .. } = inner {
            if let Some(EngineError::MissingInput { name, present }) = wrapped.downcast_ref::<EngineError>() {
                return Self::MissingInput { name: name.clone(), present: present.clone() };
            }
        }
        Self::Tensor { block, source }
    }
}
