//! ferrospeed: a distributed training engine for Rust — collectives, sharding, and (later) the step engine.
//!
//! The crate is organised by concern (see `ARCHITECTURE.md` at the repository root):
//! [`comm`] moves bytes between ranks, [`shard`] says which bytes each rank owns.

#[macro_use]
mod named;

pub mod accelerator;
pub mod checkpoint;
pub mod comm;
pub mod config;
pub mod data;
#[cfg(feature = "cuda")]
pub mod cuda_kernels;
pub mod device;
pub mod engine;
pub mod nn;
pub mod optim;
pub mod parallel;
pub mod precision;
pub mod profile;
pub mod quant;
#[cfg(feature = "cuda")]
pub mod quant_cuda;
pub mod rng;
pub mod shard;
pub mod track;

pub use comm::{CommExt, CommConfig, CommError, Communicator, ReduceOp, WorldInfo};
pub use shard::ShardLayout;
