//! Packed batches: several documents share one row of a micro-batch, each token attending only to the
//! earlier tokens of its own document, with rotary/learned positions counted from the document's start.
//! A batch says so with a `positions` tensor `[b, t]` (u32, 0 at every document start, else the previous
//! position + 1: the kernels rely on document starts never decreasing along a row; the prepared datasets
//! build them so, and other positions are not checked); without it, a row is one sequence (plain causal
//! attention, positions `0..t`), the path every earlier run took.
//!
//! From the positions: `starts[b·t]`, the row index where each token's document begins (`i − pos[i]`),
//! which the fused attention kernels read (a key `j` is visible to query `i` when `starts[i] ≤ j ≤ i`),
//! and for the composed attention an additive mask `[b, 1, t, t]` (0 or −∞). All of it is computed on
//! the batch's device: no copy back to the host per layer.

use candle_core::{DType, Result, Tensor};
use ferrospeed::engine::Batch;

/// Name of the batch tensor with each token's position in its document.
pub const POSITIONS: &str = "positions";
pub use ferrospeed::data::{LOSS_MASK, LOSS_WEIGHTS};

/// The document structure of a packed micro-batch.
#[derive(Debug, Clone)]
pub struct Docs {
    /// `[b, t]` u32.
    positions: Tensor,
    /// `[b·t]` u32: row index of the document start of every token.
    starts: Tensor,
}

impl Docs {
    /// The batch's documents, or `None` for plain rows (no `positions`).
    pub fn of(batch: &Batch) -> Result<Option<Docs>> {
        if !batch.contains(POSITIONS) {
            return Ok(None);
        }
        let positions = batch.get(POSITIONS)?.to_dtype(DType::U32)?;
        let (_, t) = positions.dims2()?;
        let idx = Tensor::arange(0u32, t as u32, positions.device())?.unsqueeze(0)?;
        let starts = idx.broadcast_sub(&positions)?.flatten_all()?;
        Ok(Some(Docs { positions, starts }))
    }

    /// `[b·t]` u32: where each token's document starts in its row.
    pub fn starts(&self) -> &Tensor {
        &self.starts
    }

    /// Rotary tables `[b·t, hd/2]` gathered from `cos`/`sin` `[T, hd/2]` at each token's position (a
    /// table per row, so RoPE of the fused layout runs with `t = b·t`).
    pub fn rope_tables(&self, cos: &Tensor, sin: &Tensor) -> Result<(Tensor, Tensor)> {
        let p = self.positions.flatten_all()?;
        Ok((cos.index_select(&p, 0)?, sin.index_select(&p, 0)?))
    }

    /// The additive mask `[b, 1, t, t]` in `dtype`: 0 where query `i` may see key `j` within its
    /// document (`j ≥ starts[i]`), −∞ before its document; the causal part is the softmax's own.
    pub fn mask(&self, dtype: DType) -> Result<Tensor> {
        let (b, t) = self.positions.dims2()?;
        let keys = Tensor::arange(0u32, t as u32, self.positions.device())?.reshape((1, 1, t))?;
        let starts = self.starts.reshape((b, t, 1))?;
        let visible = keys.broadcast_ge(&starts)?;
        let zero = Tensor::zeros((b, t, t), dtype, self.positions.device())?;
        let ninf = Tensor::full(f32::NEG_INFINITY, (b, t, t), self.positions.device())?.to_dtype(dtype)?;
        visible.where_cond(&zero, &ninf)?.unsqueeze(1)
    }
}

/// How a batch weighs its targets in the loss: the mean of all (no tensor), the mean of those a
/// [`LOSS_MASK`] keeps, or the [`LOSS_WEIGHTS`] the data loader made of a mask (normalised over the
/// global batch).
pub enum LossWeighting {
    Mean,
    Mask(Tensor),
    Weights(Tensor),
}

/// The loss weighting of a batch, its tensor flattened to `[b·t]` f32.
pub fn loss_weighting(batch: &Batch) -> Result<LossWeighting> {
    let flat = |name: &str| -> Result<Tensor> { batch.get(name)?.flatten_all()?.to_dtype(DType::F32) };
    if batch.contains(LOSS_WEIGHTS) {
        return Ok(LossWeighting::Weights(flat(LOSS_WEIGHTS)?));
    }
    if batch.contains(LOSS_MASK) {
        return Ok(LossWeighting::Mask(flat(LOSS_MASK)?));
    }
    Ok(LossWeighting::Mean)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn starts_and_mask_follow_the_positions() {
        // Row 0: documents of 2 and 3 tokens; row 1: one document.
        let pos = Tensor::new(&[[0u32, 1, 0, 1, 2], [0, 1, 2, 3, 4]], &Device::Cpu).unwrap();
        let batch = Batch::new().with(POSITIONS, pos);
        let docs = Docs::of(&batch).unwrap().unwrap();
        assert_eq!(docs.starts().to_vec1::<u32>().unwrap(), vec![0, 0, 2, 2, 2, 0, 0, 0, 0, 0]);
        let m = docs.mask(DType::F32).unwrap().to_vec3::<f32>().ok();
        assert!(m.is_none(), "the mask is 4-d");
        let m = docs.mask(DType::F32).unwrap().squeeze(1).unwrap().to_vec3::<f32>().unwrap();
        assert_eq!(m[0][3], vec![f32::NEG_INFINITY, f32::NEG_INFINITY, 0.0, 0.0, 0.0]);
        assert_eq!(m[0][1][..2], [0.0, 0.0]);
        assert!(m[1].iter().flatten().all(|v| *v == 0.0));
        assert!(Docs::of(&Batch::new()).unwrap().is_none());
    }
}
