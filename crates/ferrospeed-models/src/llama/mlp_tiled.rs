//! The Llama MLP over tiles of token rows, for long context: past [`MAX_MLP`] elements of the
//! gate/up projection (`[rows, 2·d_ff]`: 128K tokens of Llama-8B are 3.7 G elements, 7.5 GB in bf16,
//! and the SwiGLU output half that again) the forward runs the MLP a tile of rows at a time and keeps
//! neither, and the backward computes each tile's gate/up and SwiGLU again, adding the weight
//! gradients tile by tile in f32 (ALST's tiled MLP). Every benchmarked shape stays whole (the largest,
//! Llama-8B at 16 × 1024 rows, is 470 M elements). Tiles are independent rows, so the output is the
//! whole MLP's; the weight gradients differ from it by the order of the tile sums.

use crate::ops::fused::bias_add;
use crate::ops::matmul;
use crate::ops::swiglu::{swiglu, swiglu_backward};
use candle_core::{DType, Result, Tensor};
use ferrospeed::engine::ParamGrads;
use ferrospeed::profile::{scoped_as, Kind};
use std::cell::Cell;

/// Gate/up elements past which the MLP runs in tiles.
pub const MAX_MLP: usize = 1 << 30;

thread_local! {
    static FORCED: Cell<Option<usize>> = const { Cell::new(None) };
}

/// Run this thread's MLPs in tiles of `rows` rows whatever their size (`None`: by [`tile_rows`]'s
/// rule): what the tests compare tiled and whole MLPs with.
#[doc(hidden)]
pub fn force_tile_rows(rows: Option<usize>) {
    FORCED.with(|f| f.set(rows));
}

/// Rows of a tile of an MLP of width `f` over `n` rows: all of them up to [`MAX_MLP`] gate/up
/// elements, else tiles of at most 2^27.
pub fn tile_rows(n: usize, f: usize) -> usize {
    if let Some(rows) = FORCED.with(Cell::get) {
        return rows.clamp(1, n.max(1));
    }
    if n * 2 * f <= MAX_MLP {
        n
    } else {
        ((1usize << 27) / (2 * f).max(1)).max(1)
    }
}

/// One tile's gate/up projection (with its bias) and SwiGLU output.
fn gate_up(h: &Tensor, w_gu: &Tensor, b_gu: Option<&Tensor>) -> Result<(Tensor, Tensor)> {
    let mut gu = matmul(h, &w_gu.t()?)?;
    if let Some(b) = b_gu {
        gu = scoped_as(Kind::Elementwise, "bias_add", || bias_add(&gu, b))?;
    }
    let act = scoped_as(Kind::Elementwise, "swiglu", || swiglu(&gu))?;
    Ok((gu, act))
}

/// The MLP's output before the down projection's bias (`[n, d]`; under tensor parallelism this rank's
/// partial sums) of the normalised rows `h` `[n, d]`, `tile` rows at a time.
pub fn forward(h: &Tensor, w_gu: &Tensor, b_gu: Option<&Tensor>, w_down: &Tensor, tile: usize) -> Result<Tensor> {
    let n = h.dim(0)?;
    let mut out = Vec::with_capacity(n.div_ceil(tile));
    for at in (0..n).step_by(tile) {
        let (_, act) = gate_up(&h.narrow(0, at, tile.min(n - at))?, w_gu, b_gu)?;
        out.push(matmul(&act, &w_down.t()?)?);
    }
    Tensor::cat(&out, 0)
}

/// Where the MLP's parameters sit among a layer's slots.
pub struct MlpSlots {
    pub gate: usize,
    pub up: usize,
    pub down: usize,
    /// The gate and up biases (two slots from here), where the config has them.
    pub bias: Option<usize>,
}

/// The gradient of the normalised rows (`[n, d]`, before any sum over a tensor-parallel group) for
/// the output gradient `g` `[n, d]`; the weights' (and gate/up biases') gradients go to `grads`, in
/// f32, summed over the tiles. (The down projection's bias is the caller's: a column sum of `g`.)
#[allow(clippy::too_many_arguments)]
pub fn backward(g: &Tensor, h: &Tensor, w_gu: &Tensor, b_gu: Option<&Tensor>, w_down: &Tensor, tile: usize, slots: &MlpSlots, grads: &mut ParamGrads) -> Result<Tensor> {
    let n = h.dim(0)?;
    let f = w_down.dim(1)?;
    let add = |acc: Option<Tensor>, part: Tensor| -> Result<Option<Tensor>> {
        let part = part.to_dtype(DType::F32)?;
        Ok(Some(match acc {
            Some(a) => (a + part)?,
            None => part,
        }))
    };
    let (mut d_down, mut d_gu_w, mut d_gu_b) = (None, None, None);
    let mut d_h = Vec::with_capacity(n.div_ceil(tile));
    for at in (0..n).step_by(tile) {
        let len = tile.min(n - at);
        let (ht, gt) = (h.narrow(0, at, len)?, g.narrow(0, at, len)?);
        let (gu, act) = gate_up(&ht, w_gu, b_gu)?;
        d_down = add(d_down, matmul(&gt.t()?, &act)?)?;
        let d_act = matmul(&gt, w_down)?;
        let d_gu = scoped_as(Kind::Elementwise, "swiglu_backward", || swiglu_backward(&gu, &d_act))?;
        if slots.bias.is_some() {
            d_gu_b = add(d_gu_b, d_gu.to_dtype(DType::F32)?.sum(0)?)?;
        }
        d_gu_w = add(d_gu_w, matmul(&d_gu.t()?, &ht)?)?;
        d_h.push(matmul(&d_gu, w_gu)?);
    }
    let (Some(d_down), Some(d_gu_w)) = (d_down, d_gu_w) else { candle_core::bail!("a tiled MLP over no rows") };
    grads.set(slots.down, d_down);
    grads.set(slots.gate, d_gu_w.narrow(0, 0, f)?);
    grads.set(slots.up, d_gu_w.narrow(0, f, f)?);
    if let (Some(b0), Some(db)) = (slots.bias, d_gu_b) {
        grads.set(b0, db.narrow(0, 0, f)?);
        grads.set(b0 + 1, db.narrow(0, f, f)?);
    }
    Tensor::cat(&d_h, 0)
}
