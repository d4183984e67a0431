//! Parallelism beyond data parallelism: the device [`Mesh`] and the communicator of each of its groups.

mod context;
mod experts;
mod groups;
mod mesh;
mod schedule;
mod stages;
mod tensor;

pub use context::ContextGroup;
pub use experts::ExpertGroup;
pub use groups::MeshComms;
pub use mesh::{Axis, Coords, Mesh, MeshError};
pub use schedule::{Action, Costs, Op, Schedule, ScheduleError, ScheduleKind, Timeline};
pub use stages::{stage_blocks, BlockCost, StageError};
pub use tensor::{local_pieces, tp_assemble, tp_slice, whole_pieces, TensorGroup, TpSplit};

/// A tensor's values as f32 on the host: what the handles' host collectives move (exact for bf16 and
/// f16).
pub(crate) fn host_f32(x: &candle_core::Tensor) -> candle_core::Result<Vec<f32>> {
    x.to_dtype(candle_core::DType::F32)?.to_device(&candle_core::Device::Cpu)?.flatten_all()?.to_vec1()
}

/// Host f32 values back as a tensor of `shape` in `dtype` on `device`.
pub(crate) fn from_host(v: Vec<f32>, shape: impl Into<candle_core::Shape>, dtype: candle_core::DType, device: &candle_core::Device) -> candle_core::Result<candle_core::Tensor> {
    candle_core::Tensor::from_vec(v, shape, &candle_core::Device::Cpu)?.to_dtype(dtype)?.to_device(device)
}
