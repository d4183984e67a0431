//! The step engine: blocks, their flat parameters, forward/backward over blocks, reduction and update.

mod block;
pub mod blockwise;
mod error;
mod model;
mod trainer;

pub use block::{Batch, Block, Init, ParamRef, ParamSpec};
pub use error::EngineError;
pub use model::{Model, SlotSource};
pub use trainer::{Engine, EngineConfig, StepStats};
