//! Errors of the training engine.

use crate::comm::CommError;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("model definition: {0}")]
    Model(String),
    #[error("tensor computation in block {block}: {source}")]
    Tensor { block: String, source: candle_core::Error },
    #[error(transparent)]
    Comm(#[from] CommError),
    #[error("{0}")]
    Unsupported(String),
    /// A block's code created two parameters of one name.
    #[error("block {block} creates parameter `{name}` twice: give each layer its own prefix (vb.pp(\"…\")), or tie the second use to the first")]
    DuplicateParam { block: String, name: String },
    /// A tied parameter slot that does not name a parameter of an earlier block.
    #[error("block {block} ties to `{name}` of block {owner}, which is not a parameter of an earlier block: tie the later use to the earlier owner (the backward runs in reverse, so the owner must come first)")]
    BadTie { block: String, owner: usize, name: String },
    /// A block asked the batch for a tensor it does not hold.
    #[error("the batch has no tensor `{name}` (it holds: {present}); add it to the dataset's samples or fix the name the block asks for")]
    MissingInput { name: String, present: String },
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
