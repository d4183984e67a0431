//! Optimizers and schedules over flat f32 buffers (host slices, or CUDA buffers with the `cuda` feature).

#![warn(missing_docs)]

mod adamw;
mod clip;
#[cfg(feature = "cuda")]
mod cuda_adamw;
#[cfg(feature = "cuda")]
mod cuda_norm;
mod groups;
mod optimizer;
mod schedule;

pub use adamw::{AdamW, AdamWCoefficients, ComputeElem};
pub use clip::{clip_coefficient, sum_squares};
#[cfg(feature = "cuda")]
pub use cuda_adamw::{adamw_update, cast_into};
#[cfg(feature = "cuda")]
pub use cuda_norm::{any_nonfinite, sum_squares_segments};
pub use groups::{glob, GroupSettings, ParamGroup, ParamGroups};
pub use optimizer::{Hyper, Optimizer, Sgd};
pub use schedule::LrSchedule;
