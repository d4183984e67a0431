//! The shared NVRTC helpers (header-less prelude with block reductions and f32/bf16/f16 loads and stores,
//! one-time compilation, dtype suffixes, launch errors) live in the engine crate; the GPT kernels use them.

pub use ferrospeed::cuda_kernels::{compile, compile_for, compute_capability, launch_err, suffix};

/// `$f::<T>(args)` for the element type `T` of `$dtype` (f32, bf16, f16), or an error naming `$what`.
/// The call site imports `DType`, `bf16` and `f16`.
macro_rules! dispatch {
    ($dtype:expr, $what:expr, $f:ident($($arg:expr),*)) => {
        match $dtype {
            DType::F32 => $f::<f32>($($arg),*),
            DType::BF16 => $f::<bf16>($($arg),*),
            DType::F16 => $f::<f16>($($arg),*),
            other => candle_core::bail!("{} on CUDA: unsupported dtype {other:?}", $what),
        }
    };
}
pub(crate) use dispatch;
