//! The shared NVRTC helpers (header-less prelude with block reductions and f32/bf16/f16 loads and stores,
//! one-time compilation, dtype suffixes, launch errors) live in the engine crate; the GPT kernels use them.

pub use ferrospeed::cuda_kernels::{compile, compile_for, compute_capability, launch_err, suffix};
