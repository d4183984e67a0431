//! What the model families' last blocks share: logits of the normalised hidden states through the
//! vocabulary matrix (`[vocab, d]`, the head's own or the tied embedding), the per-row cross-entropy
//! and its mean, and the backward of all three (the logits are the largest tensor of a step: one pass
//! each way), plus the token-embedding gradient that block 0 of both families computes.
//!
//! With a loss mask (a batch's `loss_mask`, 1 for targets that count: an assistant's reply, not the
//! prompt or padding) the loss is the mean over the counted targets of the micro-batch; with loss
//! weights (what the data loader makes of a mask: normalised over the global batch) their weighted sum.
//! Either way every other row has weight exactly 0, in the loss and in the gradient.

use super::cross_entropy::{cross_entropy_rows, cross_entropy_rows_backward};
use super::docs::LossWeighting;
use super::fused::embedding_grad;
use candle_core::{DType, Device, Result, Tensor};
use ferrospeed::engine::ParamGrads;
use ferrospeed::profile::{scoped, scoped_as, Kind};

/// What [`head_backward`] needs of [`head_loss`].
pub struct HeadLoss {
    h: Tensor,
    logits: Tensor,
    targets: Tensor,
    rows: Tensor,
    /// Each row's weight in the loss, with a loss mask.
    weights: Option<Tensor>,
}

/// The loss of per-row losses `rows` `[n]` under `weighting` (their mean; the mean over the rows a mask
/// keeps, 0 when there is none; or their weighted sum), and the rows' weights in it.
pub fn reduce_rows(rows: &Tensor, weighting: &LossWeighting) -> Result<(Tensor, Option<Tensor>)> {
    let weights = match weighting {
        LossWeighting::Mean => return Ok((rows.mean_all()?, None)),
        LossWeighting::Mask(mask) => {
            let mask = mask.to_dtype(rows.dtype())?;
            mask.broadcast_div(&mask.sum_all()?.maximum(1.0)?)?
        }
        LossWeighting::Weights(w) => w.to_dtype(rows.dtype())?,
    };
    Ok(((rows * &weights)?.sum_all()?, Some(weights)))
}

/// The cross-entropy of `h` `[n, d]` · `w`ᵀ against `targets` (`n` ids) under `weighting`, and what its
/// backward needs.
pub fn head_loss(h: Tensor, w: &Tensor, targets: Tensor, weighting: &LossWeighting) -> Result<(Tensor, HeadLoss)> {
    let logits = scoped(Kind::Matmul, || h.matmul(&w.t()?))?;
    let rows = scoped_as(Kind::Elementwise, "cross_entropy", || cross_entropy_rows(&logits, &targets))?;
    let (loss, weights) = scoped_as(Kind::Elementwise, "cross_entropy", || reduce_rows(&rows, weighting))?;
    Ok((loss, HeadLoss { h, logits, targets, rows, weights }))
}

/// The gradient `d_h` of `scale` × the loss of [`head_loss`]; the vocabulary matrix's gradient goes
/// to slot `slot` of `grads` (as work: at once, or later for a split backward).
pub fn head_backward(s: HeadLoss, w: &Tensor, scale: f64, grads: &mut ParamGrads, slot: usize) -> Result<Tensor> {
    let n = s.targets.elem_count();
    // The loss is the mean over rows: each row's loss has weight scale / n (or its masked weight).
    let row_grads = match &s.weights {
        None => s.rows.ones_like()?.affine(scale / n as f64, 0.0)?,
        Some(w) => w.affine(scale, 0.0)?,
    };
    let d_logits = scoped_as(Kind::Elementwise, "cross_entropy_backward", || cross_entropy_rows_backward(&s.logits, &s.targets, &row_grads))?;
    drop(s.logits);
    let (dl, h) = (d_logits.clone(), s.h);
    grads.put_rows(vec![(slot, 0)], move || scoped(Kind::Matmul, || dl.t()?.matmul(&h)))?;
    scoped(Kind::Matmul, || d_logits.matmul(w))
}

/// The token ids of a batch as the embedding's backward needs them: on the device, and (for a GPU) on
/// the host, read during the forward while the device queue is short (the step's first block).
pub struct TokenIds {
    tokens: Tensor,
    host: Option<Vec<u32>>,
}

impl TokenIds {
    pub fn new(tokens: &Tensor) -> Result<Self> {
        let host = match tokens.device() {
            Device::Cpu => None,
            _ => Some(tokens.flatten_all()?.to_dtype(DType::U32)?.to_vec1::<u32>()?),
        };
        Ok(Self { tokens: tokens.clone(), host })
    }

    /// The gradient of the token table `[vocab, d]` for the output gradient `g` `[b, t, d]`.
    pub fn table_grad(&self, g: &Tensor, vocab: usize) -> Result<Tensor> {
        let (b, t, d) = g.dims3()?;
        scoped_as(Kind::Elementwise, "embedding_backward", || embedding_grad(&g.reshape((b * t, d))?, &self.tokens, self.host.as_deref(), vocab))
    }
}
