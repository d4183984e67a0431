//! The step engine: blocks, their flat parameters, forward/backward over blocks, reduction and update.

#![warn(missing_docs)]

// The folder groups the files by concern; the modules stay one flat namespace (`super::params`, …):
// step/ runs a step (the schedule of forwards, backwards and the update), state/ holds what a rank
// owns (parameters, gradients, their checkpoint view), placement/ decides where it lives (ZeRO
// windows, offload tiers, the memory estimate), device/ keeps it in GPU memory (feature `cuda`).
mod block;
mod error;
mod memory;
mod model;
mod param_grads;

#[path = "step/blockwise.rs"]
pub mod blockwise;
#[path = "step/comm_worker.rs"]
mod comm_worker;
#[path = "step/eval.rs"]
mod eval;
#[path = "step/pipe_wire.rs"]
mod pipe_wire;
#[path = "step/pipeline.rs"]
mod pipeline;
#[path = "step/sources.rs"]
mod sources;
#[path = "step/tensor_par.rs"]
mod tensor_par;
#[path = "step/trainer.rs"]
mod trainer;

#[path = "state/frozen.rs"]
mod frozen;
#[path = "state/grads.rs"]
mod grads;
#[path = "state/host_buf.rs"]
mod host_buf;
#[path = "state/params.rs"]
mod params;
#[path = "state/state.rs"]
mod state;

#[path = "placement/estimate.rs"]
mod estimate;
#[path = "placement/offload/mod.rs"]
mod offload;
#[path = "placement/place.rs"]
mod placement;

#[cfg(feature = "cuda")]
#[path = "device/device_grads.rs"]
mod device_grads;
#[cfg(feature = "cuda")]
#[path = "device/device_shard.rs"]
mod device_shard;
#[cfg(feature = "cuda")]
#[path = "device/device_state.rs"]
mod device_state;
#[cfg(feature = "cuda")]
#[path = "device/device_step.rs"]
mod device_step;
#[cfg(not(feature = "cuda"))]
#[path = "device/device_stub.rs"]
mod device_stub;

pub use block::{Batch, Block, ContextGroup, ExpertGroup, Init, ParamRef, ParamSpec, Saved, TensorGroup, TpSplit, Upstream};
pub use param_grads::{ParamGrads, WeightGrads};
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
pub use model::{ExpertShard, Model, SlotSource, StageModel, TensorShard};
pub use pipeline::{cut_for_stage, PipelineStage, StageCut};
pub use offload::nvme::DiskTraffic;
pub use offload::OffloadSettings;
pub use state::{CheckpointPlan, FrozenMut, TensorLayout, WindowMut, WindowRef};
pub use trainer::{Engine, EngineConfig, PipelineCompute, StepStats, StepTimes};
