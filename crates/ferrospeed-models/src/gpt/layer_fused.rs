//! The transformer layer's forward on fused ops, keeping what its hand-written backward needs, and
//! that backward. Every op is marked with the kind of work it is (`ferrospeed::profile`), which is
//! what a GPU step's time breakdown is made of.

use crate::ops::attention::{attention_backward, attention_forward, fused_attention_available};
use crate::ops::causal_softmax::{causal_softmax_backward, causal_softmax_forward};
use crate::ops::docs::Docs;
use crate::ops::fused::{bias_add, bias_gelu, bias_gelu_backward, bias_residual, ln_backward, ln_forward};
use crate::ops::{copy, matmul, put_col_sum, put_matmul_tn};
use candle_core::{Result, Tensor};
use ferrospeed::engine::ParamGrads;
use ferrospeed::profile::{scoped_as, Kind};

/// What the backward needs of one layer's forward (`n = b·t` rows).
pub struct LayerSaved {
    /// Input `[n, d]` and its LayerNorm statistics and output.
    x: Tensor,
    ln1: (Tensor, Tensor),
    h1: Tensor,
    attn: AttnSaved,
    /// Attention output with heads merged `[n, d]`, before the output projection.
    y: Tensor,
    /// Residual stream after attention `[n, d]`, its LayerNorm statistics and output.
    x2: Tensor,
    ln2: (Tensor, Tensor),
    h2: Tensor,
    /// MLP pre-activation without bias `[n, 4d]` and the GELU output.
    fc: Tensor,
    act: Tensor,
    dims: (usize, usize, usize, usize),
    /// The documents of a packed batch.
    docs: Option<Docs>,
}

/// What the attention's backward needs: the fused kernels recompute the probabilities from `qkv` and the
/// log-sum-exp of each row; the composed path keeps the heads `[b, nh, t, hd]` and the probabilities
/// `[b, nh, t, t]`.
enum AttnSaved {
    Fused { qkv: Tensor, lse: Tensor },
    Composed { q: Tensor, k: Tensor, v: Tensor, p: Tensor },
}

/// The layer on `x` `[b, t, d]` with heads `nh`; parameters in slot order (see `Layer::params`). With
/// `docs` (a packed batch) attention stays inside each document.
pub fn forward(p: &[Tensor], x: &Tensor, nh: usize, docs: Option<&Docs>, save: bool) -> Result<(Tensor, Option<LayerSaved>)> {
    let (b, t, d) = x.dims3()?;
    let (n, hd) = (b * t, d / nh);
    let x = x.reshape((n, d))?;
    let ew = Kind::Elementwise;

    // Attention.
    let ln1 = scoped_as(ew, "layer_norm", || ln_forward(&x, &p[0], &p[1]))?;
    let qkv = matmul(&ln1.y, &p[2])?;
    let qkv = scoped_as(ew, "bias_add", || bias_add(&qkv, &p[3]))?;
    let (attn, y) = if fused_attention_available(&qkv, hd) {
        let out = scoped_as(Kind::Attention, "attention_forward", || attention_forward(&qkv, b, t, nh, nh, docs.map(Docs::starts)))?;
        (AttnSaved::Fused { qkv, lse: out.lse }, out.y)
    } else {
        let heads = |i: usize| -> Result<Tensor> { copy(&qkv.narrow(1, i * d, d)?.reshape((b, t, nh, hd))?.transpose(1, 2)?) };
        let (q, k, v) = (heads(0)?, heads(1)?, heads(2)?);
        let (probs, y) = scoped_as(Kind::Attention, "attention_forward", || -> Result<_> {
            let mut scores = q.matmul(&k.t()?)?;
            if let Some(d) = docs {
                scores = scores.broadcast_add(&d.mask(scores.dtype())?)?;
            }
            let probs = causal_softmax_forward(&scores, 1.0 / (hd as f64).sqrt())?;
            let y = probs.matmul(&v)?;
            Ok((probs, y))
        })?;
        (AttnSaved::Composed { q, k, v, p: probs }, copy(&y.transpose(1, 2)?)?.reshape((n, d))?)
    };
    let proj = matmul(&y, &p[4])?;
    let x2 = scoped_as(ew, "bias_residual", || bias_residual(&x, &proj, &p[5]))?;

    // MLP.
    let ln2 = scoped_as(ew, "layer_norm", || ln_forward(&x2, &p[6], &p[7]))?;
    let fc = matmul(&ln2.y, &p[8])?;
    let act = scoped_as(ew, "bias_gelu", || bias_gelu(&fc, &p[9]))?;
    let out = matmul(&act, &p[10])?;
    let out = scoped_as(ew, "bias_residual", || bias_residual(&x2, &out, &p[11]))?.reshape((b, t, d))?;
    let saved = save.then(|| LayerSaved {
        x,
        ln1: (ln1.mean, ln1.rstd),
        h1: ln1.y,
        attn,
        y,
        x2,
        ln2: (ln2.mean, ln2.rstd),
        h2: ln2.y,
        fc,
        act,
        dims: (b, t, nh, hd),
        docs: docs.cloned(),
    });
    Ok((out, saved))
}

/// The gradient of the input for the output gradient `g`; the parameter slots' gradients go to
/// `grads` (the weight matmuls and bias sums as work: at once for the whole backward, later for a
/// split one).
pub fn backward(p: &[Tensor], s: LayerSaved, g: &Tensor, grads: &mut ParamGrads) -> Result<Tensor> {
    let (b, t, nh, hd) = s.dims;
    let (n, d) = (b * t, nh * hd);
    let g = g.reshape((n, d))?;
    let ew = Kind::Elementwise;
    let tr = |m: &Tensor| m.t();
    let all = |slot: usize| vec![(slot, usize::MAX)];

    // MLP: out = x2 + act·W_proj + b_proj, act = gelu(h2·W_fc + b_fc), h2 = ln_2(x2).
    put_col_sum(grads, all(11), &g)?;
    put_matmul_tn(grads, all(10), &s.act, &g)?;
    let d_act = matmul(&g, &tr(&p[10])?)?;
    let d_fc = scoped_as(ew, "bias_gelu_backward", || bias_gelu_backward(&d_act, &s.fc, &p[9]))?;
    drop(d_act);
    put_col_sum(grads, all(9), &d_fc)?;
    put_matmul_tn(grads, all(8), &s.h2, &d_fc)?;
    let d_h2 = matmul(&d_fc, &tr(&p[8])?)?;
    drop(d_fc);
    let (d_x2, d_ln2w, d_ln2b) = scoped_as(ew, "layer_norm_backward", || ln_backward(&d_h2, &s.x2, &p[6], &s.ln2.0, &s.ln2.1, Some(&g)))?;
    grads.set(6, d_ln2w);
    grads.set(7, d_ln2b);

    // Attention: x2 = x + y·W_o + b_o, y = softmax(q·kᵀ·scale)·v, qkv = h1·W_qkv + b_qkv, h1 = ln_1(x).
    put_col_sum(grads, all(5), &d_x2)?;
    put_matmul_tn(grads, all(4), &s.y, &d_x2)?;
    let d_y = matmul(&d_x2, &tr(&p[4])?)?;
    let d_qkv = match s.attn {
        AttnSaved::Fused { qkv, lse } => scoped_as(Kind::Attention, "attention_backward", || attention_backward(&qkv, &s.y, &lse, &d_y, b, t, nh, nh, s.docs.as_ref().map(Docs::starts)))?,
        AttnSaved::Composed { q, k, v, p: probs } => {
            let d_y = copy(&d_y.reshape((b, t, nh, hd))?.transpose(1, 2)?)?;
            let (d_q, d_k, d_v) = scoped_as(Kind::Attention, "attention_backward", || -> Result<_> {
                let d_p = d_y.matmul(&v.t()?)?;
                let d_v = probs.t()?.matmul(&d_y)?;
                let d_s = causal_softmax_backward(&probs, &d_p, 1.0 / (hd as f64).sqrt())?;
                drop(d_p);
                Ok((d_s.matmul(&k)?, d_s.t()?.matmul(&q)?, d_v))
            })?;
            scoped_as(Kind::Copy, "merge_qkv_grads", || Tensor::cat(&[d_q.transpose(1, 2)?, d_k.transpose(1, 2)?, d_v.transpose(1, 2)?], 2))?.reshape((n, 3 * d))?
        }
    };
    put_col_sum(grads, all(3), &d_qkv)?;
    put_matmul_tn(grads, all(2), &s.h1, &d_qkv)?;
    let d_h1 = matmul(&d_qkv, &tr(&p[2])?)?;
    let (d_x, d_ln1w, d_ln1b) = scoped_as(ew, "layer_norm_backward", || ln_backward(&d_h1, &s.x, &p[0], &s.ln1.0, &s.ln1.1, Some(&d_x2)))?;
    grads.set(0, d_ln1w);
    grads.set(1, d_ln1b);
    d_x.reshape((b, t, d))
}
