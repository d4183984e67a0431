//! Optimizers and schedules over flat f32 buffers.

mod adamw;
mod clip;
mod schedule;

pub use adamw::AdamW;
pub use clip::{clip_coefficient, sum_squares};
pub use schedule::LrSchedule;
