//! The Llama layer of the architectures the fused kernels do not cover yet, composed of candle ops
//! and differentiated by autograd: query/key norms (Qwen3: per head; OLMoE: over the projection,
//! both before RoPE) and mixture-of-experts MLPs (`moe.rs`: the router and shared expert here, the
//! routed experts in the next block, `experts.rs`). In an MoE model every layer passes, besides
//! the hidden state, each sparse layer's selections and probability sums of the experts (`[L, E]`, f32,
//! a row a sparse layer) and its z-loss sum and dropped tokens (`[L, 2]`) to the next block; the head
//! turns them into the load-balancing and z losses (where they are on) and the router's statistics.

use super::layer::{composed_attention, input, linear, Layer, Slots};
use super::{moe, QkNorm};
use crate::ops::docs::Docs;
use crate::ops::rms_norm::rms_norm;
use crate::ops::rope::rope_composed;
use candle_core::{DType, Result, Tensor};

impl Layer {
    /// Whether this layer has experts.
    pub(super) fn sparse(&self) -> bool {
        self.cfg.is_sparse(self.index)
    }

    /// Whether the layer runs only composed of candle ops (query/key norms, experts, or the
    /// load-balancing sums passing through it).
    pub(super) fn composed_only(&self) -> bool {
        self.cfg.qk_norm != QkNorm::None || self.cfg.moe.is_some()
    }

    /// The first slot after the MLP's (where the query and key norms are).
    fn mlp_end(&self, s: &Slots) -> usize {
        match self.cfg.moe.filter(|_| self.sparse()) {
            Some(m) => s.post_norm + 2 + if m.d_shared > 0 { 4 } else { 0 },
            None => s.base_len(),
        }
    }

    /// The forward on `inputs` (the hidden state `[b, t, d]`, then in an MoE model the experts'
    /// selections and probability sums): the same outputs.
    pub(super) fn forward_extended(&self, p: &[Tensor], inputs: &[Tensor], docs: Option<&Docs>) -> Result<Vec<Tensor>> {
        let c = &self.cfg;
        let s = Slots::of(c);
        let x = input(inputs)?;
        let (b, t, d) = x.dims3()?;
        let (nh, nkv, hd, eps) = (c.n_head, c.n_kv_head, c.head_dim, c.rms_norm_eps);
        let (cos, sin) = self.composed_rope(b, t, docs, x.device())?;
        let x = x.reshape((b * t, d))?;
        let h = rms_norm(&x, &p[s.input_norm], eps)?;
        let bias = |i: usize| s.bias.map(|b0| &p[b0 + i]);
        let (q, k, v) = (linear(&h, &p[s.q], bias(0))?, linear(&h, &p[s.k], bias(1))?, linear(&h, &p[s.v], bias(2))?);
        let qk = self.mlp_end(&s);
        let (q, k) = match c.qk_norm {
            QkNorm::None => (q, k),
            QkNorm::Full => (rms_norm(&q, &p[qk], eps)?, rms_norm(&k, &p[qk + 1], eps)?),
            QkNorm::PerHead => {
                let per_head = |y: &Tensor, w: &Tensor, n: usize| rms_norm(&y.reshape((b * t * n, hd))?, w, eps)?.reshape((b * t, n * hd));
                (per_head(&q, &p[qk], nh)?, per_head(&k, &p[qk + 1], nkv)?)
            }
        };
        let heads = |y: &Tensor, n: usize| -> Result<Tensor> { y.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous() };
        let q = rope_composed(&heads(&q, nh)?, &cos, &sin)?;
        let k = rope_composed(&heads(&k, nkv)?, &cos, &sin)?;
        let v = heads(&v, nkv)?;
        let y = composed_attention(q, k, v, docs)?;
        let x = (x + linear(&y, &p[s.o], s.o_bias.map(|i| &p[i]))?)?;
        let h = rms_norm(&x, &p[s.post_norm], eps)?;
        let mut sums = None;
        let mut routed = None;
        let mlp = match c.moe.filter(|_| self.sparse()) {
            Some(m) => {
                let at = s.post_norm + 1;
                let shared = (m.d_shared > 0).then(|| [&p[at + 1], &p[at + 2], &p[at + 3], &p[at + 4]]);
                let r = moe::route(&m, &moe::RouterParams { router: &p[at], shared }, &h)?;
                sums = Some((r.counts, r.prob_sums, r.extras));
                // The selections as f32 (exact: an expert's index), so they cross a pipeline stage.
                routed = Some([h, r.experts.to_dtype(DType::F32)?, r.weights]);
                r.shared
            }
            None => {
                let mlp_bias = |i: usize| s.mlp_bias.map(|b0| &p[b0 + i]);
                let act = (linear(&h, &p[s.gate], mlp_bias(0))?.silu()? * linear(&h, &p[s.up], mlp_bias(1))?)?;
                Some(linear(&act, &p[s.down], mlp_bias(2))?)
            }
        };
        let out = match mlp {
            Some(y) => (x + y)?,
            None => x,
        }
        .reshape((b, t, d))?;
        let Some(m) = c.moe else { return Ok(vec![out]) };
        // The sparse layers' selections and probabilities `[L, E]` and their z-loss sums and drops
        // `[L, 2]`, a row each: from the block before, or zeros at the first layer; this layer's row added.
        let layers = m.sparse_layers(c.n_layer);
        let (counts, probs, extras) = match inputs {
            [_, counts, probs, extras, ..] => (counts.clone(), probs.clone(), extras.clone()),
            _ => {
                let zeros = Tensor::zeros((layers, m.num_experts), DType::F32, out.device())?;
                (zeros.clone(), zeros, Tensor::zeros((layers, 2), DType::F32, out.device())?)
            }
        };
        let (counts, probs, extras) = match sums {
            Some((cs, ps, xs)) => {
                let row = (0..self.index).filter(|&i| c.is_sparse(i)).count();
                let place = |v: Tensor| -> Result<Tensor> {
                    let width = v.dim(0)?;
                    let v = v.unsqueeze(0)?;
                    let mut parts = Vec::with_capacity(3);
                    if row > 0 {
                        parts.push(Tensor::zeros((row, width), DType::F32, out.device())?);
                    }
                    parts.push(v);
                    if row + 1 < layers {
                        parts.push(Tensor::zeros((layers - row - 1, width), DType::F32, out.device())?);
                    }
                    Tensor::cat(&parts, 0)
                };
                ((counts + place(cs)?)?, (probs + place(ps)?)?, (extras + place(xs)?)?)
            }
            None => (counts, probs, extras),
        };
        // A sparse layer hands its routed experts (the next block) the experts' input, each token's
        // k experts and their weights.
        Ok(match routed {
            Some([h, experts, weights]) => vec![out, h, experts, weights, counts, probs, extras],
            None => vec![out, counts, probs, extras],
        })
    }
}
