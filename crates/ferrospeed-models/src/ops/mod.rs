//! The kernels the model families share: attention (fused, reading q, k, v from the projection's
//! layout), norms, activations, cross-entropy, the embedding gradient and the experts' grouped products. Each has a CPU reference
//! (f64 where it is a reference) and, with the `cuda` feature, CUDA kernels tested against it.
//! `composed` holds the same operations built from candle ops, differentiable by autograd.

pub mod attention;
#[cfg(feature = "cuda")]
mod attention_cuda;
pub(crate) mod causal_softmax;
pub mod composed;
pub(crate) mod cross_entropy;
pub mod docs;
#[cfg(feature = "cuda")]
mod cuda_kernels;
pub mod fused;
#[cfg(feature = "cuda")]
mod fused_cuda;
pub mod grouped;
#[cfg(feature = "cuda")]
mod grouped_cuda;
#[cfg(feature = "cuda")]
mod llama_cuda;
pub mod lm_head;
pub mod lora;
pub mod rms_norm;
pub mod rope;
pub mod ring_attention;
pub mod swiglu;
pub mod vocab_parallel;

pub use causal_softmax::causal_softmax;
pub use cross_entropy::fused_cross_entropy;

use candle_core::{Result, Tensor};
use ferrospeed::profile::{scoped, Kind};

/// `a · b`, marked as matmul work for the step breakdown.
pub(crate) fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    scoped(Kind::Matmul, || a.matmul(b))
}

/// `t` made contiguous, marked as copy work.
pub(crate) fn copy(t: &Tensor) -> Result<Tensor> {
    scoped(Kind::Copy, || t.contiguous())
}

/// A weight gradient `aᵀ · b` as work for `grads` (run at once, or kept for a split backward), its
/// rows split into `parts` (slot, rows).
pub(crate) fn put_matmul_tn(grads: &mut ferrospeed::engine::ParamGrads, parts: Vec<(usize, usize)>, a: &Tensor, b: &Tensor) -> Result<()> {
    let (a, b) = (a.clone(), b.clone());
    grads.put_rows(parts, move || matmul(&a.t()?, &b))
}

/// Stacked biases' gradient, the column sum of their output's gradient `dy`, as work split into `parts`.
pub(crate) fn put_col_sum(grads: &mut ferrospeed::engine::ParamGrads, parts: Vec<(usize, usize)>, dy: &Tensor) -> Result<()> {
    let dy = dy.clone();
    grads.put_rows(parts, move || ferrospeed::profile::scoped_as(Kind::Elementwise, "bias_grad", || fused::col_sum(&dy)))
}
