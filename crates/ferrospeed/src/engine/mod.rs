//! The step engine: blocks, their flat parameters, forward/backward over blocks, reduction and update.

mod block;
pub mod blockwise;
mod comm_worker;
mod error;
mod grads;
mod host_buf;
mod memory;
mod model;
mod params;
mod sources;
mod state;
mod trainer;

pub use block::{Batch, Block, Init, ParamRef, ParamSpec, Saved, Upstream};
pub use comm_worker::{CommWorker, Pending};
pub use error::EngineError;
pub use host_buf::HostBuf;
pub use memory::MemoryReport;
pub use model::{Model, SlotSource};
pub use state::{WindowMut, WindowRef};
pub use trainer::{Engine, EngineConfig, StepStats, StepTimes};
