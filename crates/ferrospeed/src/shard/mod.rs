//! Sharding: which part of a flat buffer each rank owns.

mod flat;
mod layout;

pub use flat::{FlatParam, SHARD_ALIGN};
pub use layout::{Shard, ShardLayout};
