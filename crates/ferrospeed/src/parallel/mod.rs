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
