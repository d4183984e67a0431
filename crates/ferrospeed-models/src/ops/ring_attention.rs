//! Ring attention (context parallelism, `parallel.cp_kind = "ring"`): each rank of a context-parallel
//! group holds a chunk of every sequence with all of its heads; the key/value chunks travel round the
//! ring (each rank sends what it holds to the next and receives from the previous, `cp − 1` times),
//! and each rank attends its queries to every chunk at or before its own, merging the partial
//! results by their log-sum-exp (the online softmax of FlashAttention). The backward passes the
//! chunks round again with their key/value gradient accumulators, which come home after `cp` passes.
//! Causality and packed documents are masks over global positions (a key counts for a query at or
//! after it, inside the query's document); chunks after a rank's own are never computed.
//!
//! In f32 composed ops (the CPU reference; the GPU runs the same through candle): each partial is
//! `softmax(q·kᵀ/√d + mask)` with its log-sum-exp, masked scores at −1e30 (finite, so a row with no
//! key in one chunk merges to nothing rather than NaN; every row has its own key in its own chunk).

use candle_core::{DType, Device, Result, Tensor, D};
use ferrospeed::engine::ContextGroup;

/// A masked score: finite, far below any real one.
const MASKED: f32 = -1e30;

/// What the backward needs: this rank's queries, keys and values (`[b, h, tl, hd]`, heads split),
/// the output and each row's log-sum-exp over every chunk, and the document starts.
pub struct RingSaved {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    y: Tensor,
    lse: Tensor,
    starts: Option<Vec<u32>>,
    dims: Dims,
}

#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    tl: usize,
    nh: usize,
    nkv: usize,
    hd: usize,
}

/// Attention of this rank's chunk of rotated `qkv` (`[b·tl, (nh + 2·nkv)·hd]`, the projection's
/// layout) over the whole sequence's keys before it: the output `[b·tl, nh·hd]`. `starts` (packed
/// batches): each token's document start in its row, for the whole `[b·t]` batch.
#[allow(clippy::too_many_arguments)]
pub fn ring_forward(qkv: &Tensor, b: usize, tl: usize, nh: usize, nkv: usize, hd: usize, starts: Option<&Tensor>, cp: &ContextGroup) -> Result<(Tensor, RingSaved)> {
    let dims = Dims { b, tl, nh, nkv, hd };
    let dtype = qkv.dtype();
    let qkv = qkv.to_dtype(DType::F32)?;
    let heads = |from: usize, h: usize| -> Result<Tensor> { qkv.narrow(1, from * hd, h * hd)?.reshape((b, tl, h, hd))?.transpose(1, 2)?.contiguous() };
    let (q, k, v) = (heads(0, nh)?, heads(nh, nkv)?, heads(nh + nkv, nkv)?);
    let starts: Option<Vec<u32>> = starts.map(|s| s.to_dtype(DType::U32)?.to_vec1()).transpose()?;
    let (r, n) = (cp.rank(), cp.size());
    let mut acc: Option<(Tensor, Tensor)> = None;
    let mut kv = vec![k.clone(), v.clone()];
    for step in 0..n {
        let src = (r + n - step) % n;
        if src <= r {
            let mask = mask(dims, r, src, starts.as_deref(), q.device())?;
            let (y, lse) = partial(&q, &kv[0], &kv[1], &mask, hd)?;
            acc = Some(match acc {
                None => (y, lse),
                Some((ya, la)) => merge(&ya, &la, &y, &lse)?,
            });
        }
        if step + 1 < n {
            kv = cp.ring_pass(&kv)?;
        }
    }
    let (y, lse) = acc.ok_or_else(|| candle_core::Error::Msg("ring attention: no chunk".into()))?;
    let out = y.transpose(1, 2)?.contiguous()?.reshape((b * tl, nh * hd))?.to_dtype(dtype)?;
    Ok((out, RingSaved { q, k, v, y, lse, starts, dims }))
}

/// The gradient of the chunk's `qkv` (projection layout, its dtype) for the output's gradient `d_y`
/// `[b·tl, nh·hd]`.
pub fn ring_backward(s: RingSaved, d_y: &Tensor, cp: &ContextGroup) -> Result<Tensor> {
    let Dims { b, tl, nh, nkv, hd } = s.dims;
    let dtype = d_y.dtype();
    let dy = d_y.to_dtype(DType::F32)?.reshape((b, tl, nh, hd))?.transpose(1, 2)?.contiguous()?;
    // D_i = Σ_j dy_ij · y_ij: the softmax backward's row term.
    let dd = (&dy * &s.y)?.sum_keepdim(D::Minus1)?;
    let scale = 1.0 / (hd as f64).sqrt();
    let (r, n) = (cp.rank(), cp.size());
    let mut dq = s.q.zeros_like()?;
    let mut ring = vec![s.k.clone(), s.v.clone(), s.k.zeros_like()?, s.v.zeros_like()?];
    for step in 0..n {
        let src = (r + n - step) % n;
        if src <= r {
            let mask = mask(s.dims, r, src, s.starts.as_deref(), s.q.device())?;
            let (k, v) = (repeat(&ring[0], nh)?, repeat(&ring[1], nh)?);
            let p = (s.q.matmul(&k.t()?)?.affine(scale, 0.0)?.broadcast_add(&mask)?.broadcast_sub(&s.lse))?.exp()?;
            let dv = p.t()?.matmul(&dy)?;
            let ds = (&p * dy.matmul(&v.t()?)?.broadcast_sub(&dd)?)?;
            dq = (dq + ds.matmul(&k)?.affine(scale, 0.0)?)?;
            let dk = ds.t()?.matmul(&s.q)?.affine(scale, 0.0)?;
            ring[2] = (&ring[2] + group_sum(&dk, nkv)?)?;
            ring[3] = (&ring[3] + group_sum(&dv, nkv)?)?;
        }
        // `n` passes: after the last one each chunk's gradients are back with its owner.
        ring = cp.ring_pass(&ring)?;
    }
    let layout = |x: &Tensor, h: usize| -> Result<Tensor> { x.transpose(1, 2)?.contiguous()?.reshape((b * tl, h * hd)) };
    Tensor::cat(&[layout(&dq, nh)?, layout(&ring[2], nkv)?, layout(&ring[3], nkv)?], 1)?.to_dtype(dtype)
}

/// Key/value heads `[b, nkv, tl, hd]` repeated for their query groups: `[b, nh, tl, hd]`.
fn repeat(x: &Tensor, nh: usize) -> Result<Tensor> {
    let (b, nkv, tl, hd) = x.dims4()?;
    if nh == nkv {
        return Ok(x.clone());
    }
    x.unsqueeze(2)?.broadcast_as((b, nkv, nh / nkv, tl, hd))?.reshape((b, nh, tl, hd))
}

/// The gradients of repeated key/value heads summed over each query group: `[b, nkv, tl, hd]`.
fn group_sum(x: &Tensor, nkv: usize) -> Result<Tensor> {
    let (b, nh, tl, hd) = x.dims4()?;
    x.reshape((b, nkv, nh / nkv, tl, hd))?.sum(2)
}

/// The additive mask `[b, 1, tl, tl]` of query chunk `qc`'s rows over key chunk `kc`'s: a key counts
/// at or before its query's position, inside its document.
fn mask(d: Dims, qc: usize, kc: usize, starts: Option<&[u32]>, device: &Device) -> Result<Tensor> {
    let (b, tl) = (d.b, d.tl);
    let t = starts.map_or(0, |s| s.len() / b);
    let mut m = vec![0f32; b * tl * tl];
    for bi in 0..b {
        for i in 0..tl {
            let qi = qc * tl + i;
            let first = starts.map_or(0, |s| s[bi * t + qi] as usize);
            for j in 0..tl {
                let kj = kc * tl + j;
                if kj > qi || kj < first {
                    m[(bi * tl + i) * tl + j] = MASKED;
                }
            }
        }
    }
    Tensor::from_vec(m, (b, 1, tl, tl), &Device::Cpu)?.to_device(device)
}

/// Softmax attention of `q` over one chunk's `k`, `v` under `mask`: the output and each row's
/// log-sum-exp (`[b, nh, tl, 1]`).
fn partial(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, hd: usize) -> Result<(Tensor, Tensor)> {
    let nh = q.dim(1)?;
    let (k, v) = (repeat(k, nh)?, repeat(v, nh)?);
    let s = q.matmul(&k.t()?)?.affine(1.0 / (hd as f64).sqrt(), 0.0)?.broadcast_add(mask)?;
    let m = s.max_keepdim(D::Minus1)?;
    let lse = (m.clone() + s.broadcast_sub(&m)?.exp()?.sum_keepdim(D::Minus1)?.log()?)?;
    let p = s.broadcast_sub(&lse)?.exp()?;
    Ok((p.matmul(&v)?, lse))
}

/// Two partial results of the same queries over disjoint keys, merged.
fn merge(ya: &Tensor, la: &Tensor, yb: &Tensor, lb: &Tensor) -> Result<(Tensor, Tensor)> {
    let m = la.maximum(lb)?;
    let lse = (&m + ((la - &m)?.exp()? + (lb - &m)?.exp()?)?.log()?)?;
    let y = (ya.broadcast_mul(&(la - &lse)?.exp()?)? + yb.broadcast_mul(&(lb - &lse)?.exp()?)?)?;
    Ok((y, lse))
}
