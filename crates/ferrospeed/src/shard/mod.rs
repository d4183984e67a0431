//! Sharding: which part of a flat buffer each rank owns.

mod layout;

pub use layout::{Shard, ShardLayout};
