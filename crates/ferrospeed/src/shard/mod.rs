//! Sharding: which part of a flat buffer each rank owns.

#![warn(missing_docs)]

mod flat;
mod layout;
mod param;
mod strategy;

pub use flat::{FlatParam, SHARD_ALIGN};
pub use layout::{Shard, ShardLayout};
pub use param::{Init, ParamRef, ParamSpec};
pub use strategy::{GradReduction, Offload, OptimizerWindow, ParamPlacement, Publish, Strategy, Tier, ZeroStage};
