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
}

impl EngineError {
    pub(crate) fn tensor(block: impl Into<String>) -> impl FnOnce(candle_core::Error) -> Self {
        let block = block.into();
        move |source| Self::Tensor { block, source }
    }
}
