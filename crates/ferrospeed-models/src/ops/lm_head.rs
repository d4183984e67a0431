//! What the model families' last blocks share: logits of the normalised hidden states through the
//! vocabulary matrix (`[vocab, d]`, the head's own or the tied embedding), the per-row cross-entropy
//! and its mean, and the backward of all three (the logits are the largest tensor of a step: one pass
//! each way), plus the token-embedding gradient that block 0 of both families computes.
//!
//! With a loss mask (a batch's `loss_mask`, 1 for targets that count: an assistant's reply, not the
//! prompt or padding) the loss is the mean over the counted targets of the micro-batch; with loss
//! weights (what the data loader makes of a mask: normalised over the global batch) their weighted sum.
//! Either way every other row has weight exactly 0, in the loss and in the gradient.
//!
//! Under tensor parallelism the matrix is this rank's rows of the vocabulary ([`VocabShard`]): the
//! logits are its columns, the loss of each row comes from the vocabulary-parallel cross-entropy, and
//! the hidden states' gradient is summed over the group.

use super::cross_entropy::{cross_entropy_rows, cross_entropy_rows_backward};
use super::docs::LossWeighting;
use super::fused::embedding_grad;
use super::vocab_parallel::VocabShard;
use candle_core::{DType, Device, Result, Tensor};
use ferrospeed::engine::ParamGrads;
use ferrospeed::profile::{scoped, scoped_as, Kind};

/// What [`head_backward`] needs of [`head_loss`].
pub struct HeadLoss {
    h: Tensor,
    /// The logits, where they were computed whole; chunked, each chunk's are computed again.
    logits: Option<Tensor>,
    targets: Tensor,
    rows: Tensor,
    /// Each row's weight in the loss, with a loss mask.
    weights: Option<Tensor>,
    /// Rows a chunk of logits holds.
    chunk: usize,
    /// This rank's part of the vocabulary, where it is split over a tensor-parallel group.
    shard: Option<VocabShard>,
}

/// Logits of more elements than this are never held whole: the loss and its backward run over chunks
/// of rows (`[chunk, vocab]` each), the backward computing each chunk's logits again (one more
/// `h·wᵀ`, about a third of the head's FLOPs, so not below this). Every shape benchmarked so far keeps
/// its logits whole (the largest, Llama-1B at 4 × 2048 tokens, 2^30 elements); long context (32K
/// tokens and more with a 128K vocabulary: 8 GB of bf16 logits and as much of their gradient) is chunked.
pub const MAX_LOGITS: usize = 1 << 31;

/// Rows of a chunk of logits over a vocabulary of `vocab` for `n` rows: all of them up to
/// [`MAX_LOGITS`] elements, else chunks of at most 2^25 elements.
pub fn chunk_rows(n: usize, vocab: usize) -> usize {
    if let Some(rows) = forced_chunk_rows() {
        return rows.min(n.max(1));
    }
    rule_chunk_rows(n, vocab)
}

/// [`chunk_rows`] without the environment's override.
fn rule_chunk_rows(n: usize, vocab: usize) -> usize {
    if n * vocab <= MAX_LOGITS {
        n
    } else {
        ((1usize << 25) / vocab.max(1)).max(1)
    }
}

/// `FERROSPEED_LOGITS_CHUNK_ROWS=N` (N > 0): logits in chunks of N rows whatever their size, e.g. to
/// measure what chunking saves at a length [`chunk_rows`] keeps whole (`bench/gpu_long.sh`); read once.
fn forced_chunk_rows() -> Option<usize> {
    static ROWS: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    *ROWS.get_or_init(|| std::env::var("FERROSPEED_LOGITS_CHUNK_ROWS").ok().and_then(|v| v.trim().parse().ok()).filter(|&n: &usize| n > 0))
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
    head_loss_sharded(h, w, targets, weighting, None)
}

/// [`head_loss`] with `w` this rank's rows of the vocabulary (`shard`), or all of them (`None`).
pub fn head_loss_sharded(h: Tensor, w: &Tensor, targets: Tensor, weighting: &LossWeighting, shard: Option<VocabShard>) -> Result<(Tensor, HeadLoss)> {
    // Split over a tensor-parallel group every rank must chunk alike (each chunk is a collective):
    // by the rule alone, never by a variable of one rank's environment.
    let chunk = if shard.is_some() { rule_chunk_rows(h.dim(0)?, w.dim(0)?) } else { chunk_rows(h.dim(0)?, w.dim(0)?) };
    head_loss_chunked(h, w, targets, weighting, chunk, shard)
}

/// Each row's loss of `logits` (this rank's columns, under `shard`).
fn loss_rows(logits: &Tensor, targets: &Tensor, shard: Option<&VocabShard>) -> Result<Tensor> {
    scoped_as(Kind::Elementwise, "cross_entropy", || match shard {
        Some(s) => s.rows(logits, targets),
        None => cross_entropy_rows(logits, targets),
    })
}

/// The logits' gradient for the rows' gradients.
fn loss_rows_backward(logits: &Tensor, targets: &Tensor, row_grads: &Tensor, shard: Option<&VocabShard>) -> Result<Tensor> {
    scoped_as(Kind::Elementwise, "cross_entropy_backward", || match shard {
        Some(s) => s.rows_backward(logits, targets, row_grads),
        None => cross_entropy_rows_backward(logits, targets, row_grads),
    })
}

/// [`head_loss_sharded`] with logits of `chunk` rows at a time (all rows: held whole for the backward).
pub fn head_loss_chunked(h: Tensor, w: &Tensor, targets: Tensor, weighting: &LossWeighting, chunk: usize, shard: Option<VocabShard>) -> Result<(Tensor, HeadLoss)> {
    let n = h.dim(0)?;
    let chunk = chunk.clamp(1, n.max(1));
    let (logits, rows) = if chunk >= n {
        let logits = scoped(Kind::Matmul, || h.matmul(&w.t()?))?;
        let rows = loss_rows(&logits, &targets, shard.as_ref())?;
        (Some(logits), rows)
    } else {
        let mut parts = Vec::with_capacity(n.div_ceil(chunk));
        for at in (0..n).step_by(chunk) {
            let len = chunk.min(n - at);
            let logits = scoped(Kind::Matmul, || h.narrow(0, at, len)?.matmul(&w.t()?))?;
            parts.push(loss_rows(&logits, &targets.narrow(0, at, len)?, shard.as_ref())?);
        }
        (None, Tensor::cat(&parts, 0)?)
    };
    let (loss, weights) = scoped_as(Kind::Elementwise, "cross_entropy", || reduce_rows(&rows, weighting))?;
    Ok((loss, HeadLoss { h, logits, targets, rows, weights, chunk, shard }))
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
    let shard = s.shard.as_ref();
    let d_h = match s.logits {
        None => chunked_backward(&s.h, w, &s.targets, &row_grads, s.chunk, shard, grads, slot)?,
        Some(logits) => {
            let d_logits = loss_rows_backward(&logits, &s.targets, &row_grads, shard)?;
            drop(logits);
            let (dl, h) = (d_logits.clone(), s.h.clone());
            grads.put_rows(vec![(slot, 0)], move || scoped(Kind::Matmul, || dl.t()?.matmul(&h)))?;
            scoped(Kind::Matmul, || d_logits.matmul(w))?
        }
    };
    // Each rank's columns give a partial sum of every row's gradient: summed (under sequence
    // parallelism, each rank keeps its rows of the sum).
    match shard {
        Some(s) => s.group.rows_out(&d_h),
        None => Ok(d_h),
    }
}

/// The backward over chunks of `chunk` rows: each chunk's logits again, their gradient, its share of
/// `d_h` and of the vocabulary matrix's gradient (added chunk by chunk in f32 and handed over in f32;
/// not computed when the matrix is frozen).
#[allow(clippy::too_many_arguments)]
fn chunked_backward(h: &Tensor, w: &Tensor, targets: &Tensor, row_grads: &Tensor, chunk: usize, shard: Option<&VocabShard>, grads: &mut ParamGrads, slot: usize) -> Result<Tensor> {
    let n = h.dim(0)?;
    let want_w = !grads.is_frozen(slot);
    let mut d_w: Option<Tensor> = None;
    let mut d_h = Vec::with_capacity(n.div_ceil(chunk));
    for at in (0..n).step_by(chunk) {
        let len = chunk.min(n - at);
        let hc = h.narrow(0, at, len)?;
        let logits = scoped(Kind::Matmul, || hc.matmul(&w.t()?))?;
        let d_logits = loss_rows_backward(&logits, &targets.narrow(0, at, len)?, &row_grads.narrow(0, at, len)?, shard)?;
        drop(logits);
        if want_w {
            let part = scoped(Kind::Matmul, || d_logits.t()?.matmul(&hc))?.to_dtype(DType::F32)?;
            d_w = Some(match d_w.take() {
                Some(acc) => (acc + part)?,
                None => part,
            });
        }
        d_h.push(scoped(Kind::Matmul, || d_logits.matmul(w))?);
    }
    if let Some(d_w) = d_w {
        // In f32: the engine's accumulator takes any float dtype.
        grads.put_rows(vec![(slot, 0)], move || Ok(d_w))?;
    }
    Tensor::cat(&d_h, 0)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        let mut rng = ferrospeed::rng::Rng::new(seed);
        Tensor::from_vec((0..shape.iter().product()).map(|_| rng.normal() as f32).collect::<Vec<f32>>(), shape, &Device::Cpu).unwrap()
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap()
    }

    /// Loss, `d_h` and the vocabulary matrix's gradient of the head over chunks of `chunk` rows.
    fn run(chunk: usize, weighting: &LossWeighting) -> (f32, Vec<f32>, Vec<f32>) {
        let (n, d, v) = (10, 8, 13);
        let (h, w) = (randn(&[n, d], 1), randn(&[v, d], 2).affine(0.3, 0.0).unwrap());
        let targets = Tensor::from_vec((0..n as u32).map(|i| (i * 7) % v as u32).collect::<Vec<u32>>(), n, &Device::Cpu).unwrap();
        let (loss, saved) = head_loss_chunked(h, &w, targets, weighting, chunk, None).unwrap();
        let (slots, d_h) = ParamGrads::whole(1, |g| Ok(vec![Some(head_backward(saved, &w, 0.5, g, 0)?)])).unwrap();
        (loss.to_scalar::<f32>().unwrap(), values(d_h[0].as_ref().unwrap()), values(slots[0].as_ref().unwrap()))
    }

    fn close(a: &[f32], b: &[f32]) -> bool {
        let scale = b.iter().map(|x| x.abs()).fold(0.0, f32::max);
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= 1e-6 * scale.max(1.0))
    }

    /// Chunks of 3, 4 and 1 rows (the last chunk short) give the whole logits' loss and gradients, with
    /// and without a loss mask; a vocabulary matrix that is frozen gets no gradient and costs no product.
    #[test]
    fn chunked_logits_give_the_whole_logits_loss_and_gradients() {
        let mask = LossWeighting::Mask(Tensor::from_vec((0..10).map(|i| (i % 3 != 0) as u32 as f32).collect::<Vec<f32>>(), 10, &Device::Cpu).unwrap());
        for weighting in [LossWeighting::Mean, mask] {
            let whole = run(10, &weighting);
            for chunk in [3, 4, 1] {
                let got = run(chunk, &weighting);
                assert!((got.0 - whole.0).abs() <= 1e-6 * whole.0.abs(), "chunk {chunk}: loss {} vs {}", got.0, whole.0);
                assert!(close(&got.1, &whole.1) && close(&got.2, &whole.2), "chunk {chunk}: gradients differ");
            }
        }
        // Frozen (a LoRA base's head): d_h alone.
        let (h, w) = (randn(&[10, 8], 1), randn(&[13, 8], 2));
        let targets = Tensor::from_vec((0..10u32).collect::<Vec<u32>>(), 10, &Device::Cpu).unwrap();
        let (_, saved) = head_loss_chunked(h, &w, targets, &LossWeighting::Mean, 3, None).unwrap();
        let (slots, d_h) = ParamGrads::whole(1, |g| {
            g.freeze([0]);
            Ok(vec![Some(head_backward(saved, &w, 1.0, g, 0)?)])
        })
        .unwrap();
        assert!(slots[0].is_none() && d_h[0].is_some());
        assert_eq!(chunk_rows(8192, 128_256), 8192, "the shapes benchmarked so far keep their logits whole");
        assert_eq!(chunk_rows(16 * 1024, 50_304), 16 * 1024, "GPT-2 at 16 × 1024 too");
        assert_eq!(chunk_rows(32 * 1024, 128_256), 261, "long context: chunks of at most 2^25 logits");
    }

    /// The vocabulary split over 2 ranks (threads over TCP), logits whole or in chunks of 3 rows, with a
    /// loss mask: the loss and `d_h` of the whole head on every rank, and each rank's rows of the
    /// matrix's gradient.
    #[test]
    fn a_vocabulary_split_over_ranks_gives_the_whole_heads_loss_and_gradients() {
        use super::super::vocab_parallel::VocabShard;
        use ferrospeed::comm::{run_local_world, CommConfig};
        use ferrospeed::engine::TensorGroup;
        let (n, d, v) = (10, 8, 14);
        let (h, w) = (randn(&[n, d], 1), randn(&[v, d], 2).affine(0.3, 0.0).unwrap());
        let targets = Tensor::from_vec((0..n as u32).map(|i| (i * 5) % v as u32).collect::<Vec<u32>>(), n, &Device::Cpu).unwrap();
        let mask = || LossWeighting::Mask(Tensor::from_vec((0..n).map(|i| (i % 3 != 0) as u32 as f32).collect::<Vec<f32>>(), n, &Device::Cpu).unwrap());
        let head = |w: &Tensor, chunk: usize, shard: Option<VocabShard>| {
            let (loss, saved) = head_loss_chunked(h.clone(), w, targets.clone(), &mask(), chunk, shard).unwrap();
            let (slots, d_h) = ParamGrads::whole(1, |g| Ok(vec![Some(head_backward(saved, w, 0.5, g, 0)?)])).unwrap();
            (loss.to_scalar::<f32>().unwrap(), values(d_h[0].as_ref().unwrap()), values(slots[0].as_ref().unwrap()))
        };
        let whole = head(&w, n, None);
        for chunk in [n, 3] {
            let got = run_local_world(2, &CommConfig::default(), |comm| {
                let group = TensorGroup::new(std::sync::Arc::new(comm));
                let lo = group.rank() * v / 2;
                head(&w.narrow(0, lo, v / 2).unwrap(), chunk, Some(VocabShard { group, lo }))
            })
            .unwrap();
            for (rank, (loss, d_h, d_w)) in got.iter().enumerate() {
                assert!((loss - whole.0).abs() <= 1e-6 * whole.0.abs(), "chunk {chunk} rank {rank}: loss {loss} vs {}", whole.0);
                assert!(close(d_h, &whole.1), "chunk {chunk} rank {rank}: d_h differs");
                assert!(close(d_w, &whole.2[rank * v / 2 * d..(rank + 1) * v / 2 * d]), "chunk {chunk} rank {rank}: the matrix's gradient differs");
            }
        }
    }
}
