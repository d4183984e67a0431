//! The Llama layer's forward on fused ops, keeping what its hand-written backward needs, and that
//! backward. q, k and v come from one matmul against the three weights stacked `[(nh + 2·nkv)·hd, d]`
//! (and gate and up from one against `[2·f, d]`); RoPE rotates q and k in that layout, and the fused
//! attention reads grouped K/V heads from it directly. Biases (q/k/v, o_proj, gate/up/down, as the
//! config has them) are added by the fused bias kernels and their gradients are column sums. Ops are
//! marked with their kind of work (`ferrospeed::profile`) for the GPU step breakdown.
//!
//! Under tensor parallelism the same code runs on one rank's slices (`c` is then the rank's share:
//! `n_head / tp` query heads, `n_kv_head / tp` key/value heads, `d_ff / tp`; q/k/v and gate/up are
//! column-parallel, o and down row-parallel): the output projections' partial sums are added over the
//! group before their bias and the residual (forward), and the gradients of the normalised inputs
//! before the norms' backward — Megatron's four all-reduces a layer. With sequence parallelism the
//! input and output are this rank's token rows: each norm runs on them, its output is gathered before
//! the column-parallel product ([`TensorGroup::rows_in`]) and the row-parallel product's partial sums
//! are reduce-scattered back to the rank's rows ([`TensorGroup::rows_out`]); the backward mirrors it,
//! and the norms' weight gradients (from the rank's rows) are summed over the group.
//!
//! Under context parallelism (DeepSpeed-Ulysses) the layer holds a chunk of every sequence: the
//! projections and the MLP run on its rows; an all-to-all turns the q/k/v projection into the whole
//! sequence's rows of `1/cp` of the heads ([`ContextGroup::seq_to_heads`]), attention and RoPE run
//! there, and another turns the attention output back into the chunk's rows of every head (the
//! backward: the same two exchanges the other way). Under ring attention the layer keeps every head
//! of its chunk: RoPE at the chunk's positions, then `ops::ring_attention` passes the key/value
//! chunks round the group.

use super::layer::{adapters, slot_count, stacked_runs, Slots};
use super::mlp_tiled;
use super::LlamaConfig;
use crate::ops::lora::{self, Adapter, LayerLora, Part};
use crate::ops::attention::{attention_backward, attention_forward, fused_attention_available};
use crate::ops::ring_attention::{ring_backward, ring_forward, RingSaved};
use crate::ops::causal_softmax::{causal_softmax_backward, causal_softmax_forward};
use crate::ops::docs::Docs;
use crate::ops::fused::{bias_add, bias_residual};
use crate::ops::rms_norm::{rms_backward, rms_forward};
use crate::ops::rope::rope_qkv;
use crate::ops::swiglu::{swiglu, swiglu_backward};
use crate::ops::{copy, matmul, put_col_sum, put_matmul_tn};
use candle_core::{Result, Tensor};
use ferrospeed::engine::{ContextGroup, ParamGrads, TensorGroup};
use ferrospeed::profile::{scoped_as, Kind};

/// What the backward needs of one layer's forward (`n = b·t` rows).
pub struct LayerSaved {
    /// Input `[n, d]`, its 1/rms and the normalised input.
    x: Tensor,
    rstd1: Tensor,
    h1: Tensor,
    attn: AttnSaved,
    /// Attention output `[n, nh·hd]`, before the output projection (this rank's rows).
    y: Tensor,
    /// The same as attention computed it: under context parallelism the whole sequence's rows of
    /// this rank's heads.
    y_heads: Tensor,
    /// Residual stream after attention `[n, d]`, its 1/rms and the normalised stream.
    x2: Tensor,
    rstd2: Tensor,
    h2: Tensor,
    /// Gate and up projections `[n, 2f]` and the SwiGLU output `[n, f]`; neither where the MLP ran
    /// in tiles of `tile` rows (`mlp_tiled.rs`: computed again in the backward).
    gu: Option<Tensor>,
    act: Option<Tensor>,
    tile: usize,
    dims: (usize, usize),
    /// The documents of a packed batch.
    docs: Option<Docs>,
    /// What LoRA's backward needs of each projection (q/k/v, o, gate/up, down) that has adapters.
    lora: [Option<lora::Kept>; 4],
}

/// The adapted parts of a layer's four projections (q/k/v, o, gate/up, down), with their widths.
fn lora_parts(c: &LlamaConfig, ad: &[Option<Adapter>; 7]) -> [Vec<Part>; 4] {
    let (d, q, kv, f) = (c.d_model, c.n_head * c.head_dim, c.n_kv_head * c.head_dim, c.d_ff);
    [vec![(ad[0], q), (ad[1], kv), (ad[2], kv)], vec![(ad[3], d)], vec![(ad[4], f), (ad[5], f)], vec![(ad[6], d)]]
}

/// Add LoRA's update of a projection of `x` to its output `y` (keeping what its backward needs).
fn add_lora(y: Tensor, x: &Tensor, p: &[Tensor], parts: &[Part], scale: f64, kept: &mut Option<lora::Kept>) -> Result<Tensor> {
    match lora::delta(x, p, parts, scale)? {
        Some((d, k)) => {
            *kept = Some(k);
            y + d
        }
        None => Ok(y),
    }
}

/// The input gradient of a projection: the base's, plus LoRA's where the projection is adapted.
#[allow(clippy::too_many_arguments)]
fn with_lora(base: Tensor, grads: &mut ParamGrads, p: &[Tensor], parts: &[Part], kept: &Option<lora::Kept>, g: &Tensor, x: &Tensor, scale: f64) -> Result<Tensor> {
    match kept {
        Some(k) => base + lora::backward(grads, p, parts, k, g, x, scale)?,
        None => Ok(base),
    }
}

impl LayerSaved {
    /// The sequence length of the forward.
    pub fn seq_len(&self) -> usize {
        self.dims.1
    }
}

/// The fused kernels recompute the probabilities from the rotated `qkv` and each row's log-sum-exp;
/// the composed path keeps the heads (`q` grouped `[b, nkv, g·t, hd]`, `k`, `v` `[b, nkv, t, hd]`) and
/// the probabilities `[b, nh, t, t]`.
enum AttnSaved {
    Fused { qkv: Tensor, lse: Tensor },
    /// Ring attention (context parallelism): its own saved state.
    Ring(RingSaved),
    Composed { q: Tensor, k: Tensor, v: Tensor, p: Tensor },
}

/// Weights stacked along their output dimension (rows), as one matrix `[Σ out, in]`.
fn stack(ws: &[&Tensor]) -> Result<Tensor> {
    scoped_as(Kind::Copy, "stack_weights", || Tensor::cat(ws, 0))
}

/// The weights of run `run` of `stacked_runs` (0: q/k/v, 1: gate/up) as one matrix: the engine's view
/// where it passed one after the slots (a frozen base), else stacked here.
fn stacked(c: &LlamaConfig, p: &[Tensor], lora: Option<&LayerLora>, run: usize) -> Result<Tensor> {
    if let Some(w) = p.get(slot_count(c, lora) + run) {
        return Ok(w.clone());
    }
    let ws: Vec<&Tensor> = stacked_runs(c)[run].clone().map(|j| &p[j]).collect();
    stack(&ws)
}

/// Rotary tables for the rows of a batch and the period they repeat with: `[t, hd/2]` and `t` for plain
/// rows, gathered `[b·t, hd/2]` at each token's position and `b·t` for a packed batch.
pub(crate) fn row_tables(rope: (&Tensor, &Tensor), docs: Option<&Docs>, b: usize, t: usize) -> Result<(Tensor, Tensor, usize)> {
    match docs {
        Some(d) => {
            let (c, s) = d.rope_tables(rope.0, rope.1)?;
            Ok((c, s, b * t))
        }
        None => Ok((rope.0.clone(), rope.1.clone(), t)),
    }
}

/// The rotary tables attention's rows take ([`row_tables`]): under ring attention those of this
/// rank's chunk of every sample (its global positions).
fn attention_tables(rope: (&Tensor, &Tensor), docs: Option<&Docs>, b: usize, t: usize, cp: &ContextGroup) -> Result<(Tensor, Tensor, usize)> {
    let (cos, sin, period) = row_tables(rope, docs, b, t)?;
    if !cp.ring() {
        return Ok((cos, sin, period));
    }
    let chunk = cp.chunk(t)?;
    let tl = chunk.len();
    match docs {
        None => Ok((cos.narrow(0, chunk.start, tl)?, sin.narrow(0, chunk.start, tl)?, tl)),
        Some(_) => {
            let pick = |x: &Tensor| -> Result<Tensor> { x.reshape((b, t, ()))?.narrow(1, chunk.start, tl)?.contiguous()?.reshape((b * tl, ())) };
            Ok((pick(&cos)?, pick(&sin)?, b * tl))
        }
    }
}

/// The layer on `x` `[b, t, d]`; parameters in slot order (see `Layer::params`). With `docs` (a packed
/// batch) positions restart and attention stays inside each document.
#[allow(clippy::too_many_arguments)]
pub fn forward(c: &LlamaConfig, p: &[Tensor], x: &Tensor, (b, t): (usize, usize), rope: (&Tensor, &Tensor), docs: Option<&Docs>, lora: Option<&LayerLora>, (tp, cp): (&TensorGroup, &ContextGroup), save: bool) -> Result<(Tensor, Option<LayerSaved>)> {
    let s = Slots::of(c);
    let parts = lora_parts(c, &adapters(c, lora));
    let scale = lora.map_or(0.0, |l| l.shape.scale());
    let mut kept: [Option<lora::Kept>; 4] = Default::default();
    let (n, d) = (b * t, x.dim(2)?);
    let (nh, nkv, hd) = (c.n_head, c.n_kv_head, c.head_dim);
    let x = x.reshape((tp.local_rows(n / cp.size())?, d))?;
    let ew = Kind::Elementwise;

    // Attention.
    let norm1 = scoped_as(ew, "rms_norm", || rms_forward(&x, &p[s.input_norm], c.rms_norm_eps))?;
    let h1 = tp.rows_in(&norm1.y)?;
    let w_qkv = stacked(c, p, lora, 0)?;
    let mut qkv = matmul(&h1, &w_qkv.t()?)?;
    if let Some(b0) = s.bias {
        let bias = stack(&[&p[b0], &p[b0 + 1], &p[b0 + 2]])?;
        qkv = scoped_as(ew, "bias_add", || bias_add(&qkv, &bias))?;
    }
    let qkv = add_lora(qkv, &h1, p, &parts[0], scale, &mut kept[0])?;
    // Under context parallelism, Ulysses: the whole sequence, this rank's heads; ring: this rank's
    // chunk, every head.
    let ring = cp.ring();
    let (qkv, nh, nkv) = if ring { (qkv, nh, nkv) } else { (cp.seq_to_heads(&qkv, b, &[nh * hd, nkv * hd, nkv * hd])?, nh / cp.size(), nkv / cp.size()) };
    let (cos, sin, period) = attention_tables(rope, docs, b, t, cp)?;
    let qkv = scoped_as(ew, "rope", || rope_qkv(&qkv, &cos, &sin, period, nh, nkv, false))?;
    let (attn, y) = if ring {
        let (y, saved) = scoped_as(Kind::Attention, "ring_attention_forward", || ring_forward(&qkv, b, t / cp.size(), nh, nkv, hd, docs.map(Docs::starts), cp))?;
        (AttnSaved::Ring(saved), y)
    } else if fused_attention_available(&qkv, hd) {
        let out = scoped_as(Kind::Attention, "attention_forward", || attention_forward(&qkv, b, t, nh, nkv, docs.map(Docs::starts)))?;
        (AttnSaved::Fused { qkv, lse: out.lse }, out.y)
    } else {
        composed_attention(&qkv, b, t, nh, nkv, hd, docs)?
    };
    let y_heads = y;
    let y = if ring { y_heads.clone() } else { cp.heads_to_seq(&y_heads, b, &[c.n_head * hd])? };
    let proj = tp.rows_out(&add_lora(matmul(&y, &p[s.o].t()?)?, &y, p, &parts[1], scale, &mut kept[1])?)?;
    let x2 = match s.o_bias {
        Some(i) => scoped_as(ew, "bias_residual", || bias_residual(&x, &proj, &p[i]))?,
        None => (&x + proj)?,
    };

    // MLP.
    let norm2 = scoped_as(ew, "rms_norm", || rms_forward(&x2, &p[s.post_norm], c.rms_norm_eps))?;
    let h2 = tp.rows_in(&norm2.y)?;
    let w_gu = stacked(c, p, lora, 1)?;
    let b_gu = s.mlp_bias.map(|b0| stack(&[&p[b0], &p[b0 + 1]])).transpose()?;
    // Long context: the MLP a tile of rows at a time, keeping neither gate/up nor SwiGLU's output.
    let tile = mlp_tiled::tile_rows(h2.dim(0)?, c.d_ff);
    let (gu, act, down) = if lora.is_none() && tile < h2.dim(0)? {
        (None, None, mlp_tiled::forward(&h2, &w_gu, b_gu.as_ref(), &p[s.down], tile)?)
    } else {
        let mut gu = matmul(&h2, &w_gu.t()?)?;
        if let Some(bias) = &b_gu {
            gu = scoped_as(ew, "bias_add", || bias_add(&gu, bias))?;
        }
        let gu = add_lora(gu, &h2, p, &parts[2], scale, &mut kept[2])?;
        let act = scoped_as(ew, "swiglu", || swiglu(&gu))?;
        let down = add_lora(matmul(&act, &p[s.down].t()?)?, &act, p, &parts[3], scale, &mut kept[3])?;
        (Some(gu), Some(act), down)
    };
    let down = tp.rows_out(&down)?;
    let out = match s.mlp_bias {
        Some(b0) => scoped_as(ew, "bias_residual", || bias_residual(&x2, &down, &p[b0 + 2]))?,
        None => (&x2 + down)?,
    }
    .reshape(hidden_shape(tp, b, t / cp.size(), d))?;
    // The normalised inputs are kept as this rank's rows (gathered again in the backward under
    // sequence parallelism, as Megatron does: the saving is what sp is for).
    drop((h1, h2));
    let saved = save.then(|| LayerSaved { x, rstd1: norm1.rstd, h1: norm1.y, attn, y, y_heads, x2, rstd2: norm2.rstd, h2: norm2.y, gu, act, tile, dims: (b, t), docs: docs.cloned(), lora: kept });
    Ok((out, saved))
}

/// Attention of the rotated `qkv` with candle matmuls and the fused causal softmax; a key/value head
/// serves its query group through a reshape (`[b, nkv, g·t, hd]`), not copies.
fn composed_attention(qkv: &Tensor, b: usize, t: usize, nh: usize, nkv: usize, hd: usize, docs: Option<&Docs>) -> Result<(AttnSaved, Tensor)> {
    let heads = |from: usize, h: usize| -> Result<Tensor> { copy(&qkv.narrow(1, from * hd, h * hd)?.reshape((b, t, h, hd))?.transpose(1, 2)?) };
    let q = heads(0, nh)?.reshape((b, nkv, nh / nkv * t, hd))?;
    let (k, v) = (heads(nh, nkv)?, heads(nh + nkv, nkv)?);
    let (probs, y) = scoped_as(Kind::Attention, "attention_forward", || -> Result<_> {
        let mut scores = q.matmul(&k.t()?)?.reshape((b, nh, t, t))?;
        if let Some(d) = docs {
            scores = scores.broadcast_add(&d.mask(scores.dtype())?)?;
        }
        let probs = causal_softmax_forward(&scores, 1.0 / (hd as f64).sqrt())?;
        let y = probs.reshape((b, nkv, nh / nkv * t, t))?.matmul(&v)?.reshape((b, nh, t, hd))?;
        Ok((probs, y))
    })?;
    let y = copy(&y.transpose(1, 2)?)?.reshape((b * t, nh * hd))?;
    Ok((AttnSaved::Composed { q, k, v, p: probs }, y))
}

/// The gradient of the input for the output gradient `g` `[b, t, d]`; the parameter slots' gradients go
/// to `grads` (the weight matmuls and bias sums as work: at once for the whole backward, later for a
/// split one).
/// With LoRA the base's slots are frozen: only the adapters' gradients are computed.
#[allow(clippy::too_many_arguments)]
pub fn backward(c: &LlamaConfig, p: &[Tensor], sv: LayerSaved, g: &Tensor, rope: (&Tensor, &Tensor), lora: Option<&LayerLora>, (tp, cp): (&TensorGroup, &ContextGroup), grads: &mut ParamGrads) -> Result<Tensor> {
    let s = Slots::of(c);
    let parts = lora_parts(c, &adapters(c, lora));
    let scale = lora.map_or(0.0, |l| l.shape.scale());
    if lora.is_some() {
        grads.freeze(0..s.base_len());
    }
    let (b, t) = sv.dims;
    let (n, d, nh, nkv, hd, f) = (b * t, c.d_model, c.n_head, c.n_kv_head, c.head_dim, c.d_ff);
    // The residual stream's gradient on this rank's rows, and all of them for the products.
    let g_rows = g.reshape((tp.local_rows(n / cp.size())?, d))?;
    let g = tp.rows_in(&g_rows)?;
    let ew = Kind::Elementwise;

    // MLP: out = x2 + act·W_downᵀ (+ b_down), act = swiglu(h2·[W_gate; W_up]ᵀ (+ [b_gate; b_up])), h2 = rms(x2).
    // A bias's gradient is the column sum of its output's gradient.
    if let Some(b0) = s.mlp_bias {
        put_col_sum(grads, vec![(b0 + 2, d)], &g)?;
    }
    let h2 = tp.rows_in(&sv.h2)?;
    let w_gu = stacked(c, p, lora, 1)?;
    let d_h2 = match (&sv.gu, &sv.act) {
        (Some(gu), Some(act)) => {
            put_matmul_tn(grads, vec![(s.down, d)], &g, act)?;
            let d_act = with_lora(matmul(&g, &p[s.down])?, grads, p, &parts[3], &sv.lora[3], &g, act, scale)?;
            let d_gu = scoped_as(ew, "swiglu_backward", || swiglu_backward(gu, &d_act))?;
            drop(d_act);
            if let Some(b0) = s.mlp_bias {
                put_col_sum(grads, vec![(b0, f), (b0 + 1, f)], &d_gu)?;
            }
            put_matmul_tn(grads, vec![(s.gate, f), (s.up, f)], &d_gu, &h2)?;
            with_lora(matmul(&d_gu, &w_gu)?, grads, p, &parts[2], &sv.lora[2], &d_gu, &h2, scale)?
        }
        _ => {
            let b_gu = s.mlp_bias.map(|b0| stack(&[&p[b0], &p[b0 + 1]])).transpose()?;
            let slots = mlp_tiled::MlpSlots { gate: s.gate, up: s.up, down: s.down, bias: s.mlp_bias };
            mlp_tiled::backward(&g, &h2, &w_gu, b_gu.as_ref(), &p[s.down], sv.tile, &slots, grads)?
        }
    };
    let d_h2 = tp.rows_out(&d_h2)?;
    drop(w_gu);
    let (d_x2, d_post) = scoped_as(ew, "rms_norm_backward", || rms_backward(&d_h2, &sv.x2, &p[s.post_norm], &sv.rstd2, Some(&g_rows)))?;
    grads.set(s.post_norm, tp.replicated_grad(&d_post)?);
    let (d_x2_rows, d_x2) = (d_x2.clone(), tp.rows_in(&d_x2)?);

    // Attention: x2 = x + y·W_oᵀ (+ b_o), y = attention(rope(h1·W_qkvᵀ + b)), h1 = rms(x).
    put_matmul_tn(grads, vec![(s.o, d)], &d_x2, &sv.y)?;
    if let Some(i) = s.o_bias {
        put_col_sum(grads, vec![(i, d)], &d_x2)?;
    }
    let d_y = with_lora(matmul(&d_x2, &p[s.o])?, grads, p, &parts[1], &sv.lora[1], &d_x2, &sv.y, scale)?;
    let ring = cp.ring();
    let (d_y, nh, nkv) = if ring { (d_y, nh, nkv) } else { (cp.seq_to_heads(&d_y, b, &[nh * hd])?, nh / cp.size(), nkv / cp.size()) };
    let d_qkv = match sv.attn {
        AttnSaved::Ring(saved) => scoped_as(Kind::Attention, "ring_attention_backward", || ring_backward(saved, &d_y, cp))?,
        AttnSaved::Fused { qkv, lse } => scoped_as(Kind::Attention, "attention_backward", || attention_backward(&qkv, &sv.y_heads, &lse, &d_y, b, t, nh, nkv, sv.docs.as_ref().map(Docs::starts)))?,
        AttnSaved::Composed { q, k, v, p: probs } => {
            let gt = nh / nkv * t;
            let d_y = copy(&d_y.reshape((b, t, nh, hd))?.transpose(1, 2)?)?.reshape((b, nkv, gt, hd))?;
            let (d_q, d_k, d_v) = scoped_as(Kind::Attention, "attention_backward", || -> Result<_> {
                let d_p = d_y.matmul(&v.t()?)?.reshape((b, nh, t, t))?;
                let pg = probs.reshape((b, nkv, gt, t))?;
                let d_v = pg.t()?.matmul(&d_y)?;
                let d_s = causal_softmax_backward(&probs, &d_p, 1.0 / (hd as f64).sqrt())?.reshape((b, nkv, gt, t))?;
                drop(d_p);
                Ok((d_s.matmul(&k)?.reshape((b, nh, t, hd))?, d_s.t()?.matmul(&q)?, d_v))
            })?;
            scoped_as(Kind::Copy, "merge_qkv_grads", || Tensor::cat(&[d_q.transpose(1, 2)?, d_k.transpose(1, 2)?, d_v.transpose(1, 2)?], 2))?.reshape((n, (nh + 2 * nkv) * hd))?
        }
    };
    let (cos, sin, period) = attention_tables(rope, sv.docs.as_ref(), b, t, cp)?;
    let d_qkv = scoped_as(ew, "rope_backward", || rope_qkv(&d_qkv, &cos, &sin, period, nh, nkv, true))?;
    let (q_w, kv_w) = (c.n_head * hd, c.n_kv_head * hd);
    let d_qkv = if ring { d_qkv } else { cp.heads_to_seq(&d_qkv, b, &[q_w, kv_w, kv_w])? };
    if let Some(b0) = s.bias {
        put_col_sum(grads, vec![(b0, q_w), (b0 + 1, kv_w), (b0 + 2, kv_w)], &d_qkv)?;
    }
    let h1 = tp.rows_in(&sv.h1)?;
    put_matmul_tn(grads, vec![(s.q, q_w), (s.k, kv_w), (s.v, kv_w)], &d_qkv, &h1)?;
    let w_qkv = stacked(c, p, lora, 0)?;
    let d_h1 = tp.rows_out(&with_lora(matmul(&d_qkv, &w_qkv)?, grads, p, &parts[0], &sv.lora[0], &d_qkv, &h1, scale)?)?;
    let (d_x, d_in) = scoped_as(ew, "rms_norm_backward", || rms_backward(&d_h1, &sv.x, &p[s.input_norm], &sv.rstd1, Some(&d_x2_rows)))?;
    grads.set(s.input_norm, tp.replicated_grad(&d_in)?);
    d_x.reshape(hidden_shape(tp, b, t / cp.size(), d))
}

/// The shape of the hidden state between blocks: `[b, t, d]`, or this rank's token rows `[1, b·t/tp, d]`
/// under sequence parallelism.
pub(crate) fn hidden_shape(tp: &TensorGroup, b: usize, t: usize, d: usize) -> (usize, usize, usize) {
    if tp.sequence_parallel() {
        (1, b * t / tp.size(), d)
    } else {
        (b, t, d)
    }
}
