//! The step engine: blocks, their flat parameters, forward/backward over blocks, reduction and update.

#![warn(missing_docs)]

mod block;
pub mod blockwise;
mod comm_worker;
#[cfg(feature = "cuda")]
mod device_grads;
#[cfg(feature = "cuda")]
mod device_shard;
#[cfg(feature = "cuda")]
mod device_state;
#[cfg(feature = "cuda")]
mod device_step;
#[cfg(not(feature = "cuda"))]
mod device_stub;
mod error;
mod estimate;
mod grads;
mod host_buf;
mod memory;
mod model;
mod offload;
mod params;
mod placement;
mod pipe_wire;
mod pipeline;
mod sources;
mod state;
mod trainer;

pub use block::{Batch, Block, Init, ParamRef, ParamSpec, Saved, Upstream};
#[cfg(feature = "cuda")]
use device_grads::DeviceGrads;
#[cfg(feature = "cuda")]
use device_shard::{CopyStream, DeviceShard, PinnedShard};
#[cfg(feature = "cuda")]
use device_state::{DeviceGather, DeviceWindow};
#[cfg(feature = "cuda")]
use device_step::{device_overflow, device_shard_sums};
#[cfg(not(feature = "cuda"))]
use device_stub::{device_overflow, device_shard_sums, CopyStream, DeviceGather, DeviceGrads, DeviceShard, DeviceWindow, Nccl, PinnedShard};
#[cfg(feature = "cuda")]
use crate::comm::nccl::NcclComm as Nccl;

pub use comm_worker::{CommWorker, Pending};
pub use error::{candle_message, EngineError};
pub use estimate::{estimate, ActivationProfile, EstimatePlan, MemoryEstimate};
pub use host_buf::HostBuf;
pub use memory::MemoryReport;
pub use model::{Model, SlotSource, StageModel};
pub use pipeline::{cut_for_stage, PipelineStage, StageCut};
pub use offload::nvme::DiskTraffic;
pub use offload::OffloadSettings;
pub use state::{CheckpointPlan, WindowMut, WindowRef};
pub use trainer::{Engine, EngineConfig, StepStats, StepTimes};
