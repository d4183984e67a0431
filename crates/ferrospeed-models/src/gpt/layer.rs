//! A GPT-2 transformer layer: pre-LayerNorm causal self-attention with fused QKV, then a GELU(tanh) MLP
//! of width 4·d, each added to the residual stream. Training runs the fused forward and the
//! hand-written backward of `layer_fused.rs`; the forward composed of candle ops stays for autograd
//! (when a caller differentiates `forward` itself) and as the reference the fused one is tested against.

use crate::ops::causal_softmax::causal_softmax;
use crate::ops::docs::Docs;
use super::layer_fused::{self, LayerSaved};
use crate::ops::composed::layer_norm;
use super::GptConfig;
use ferrospeed::engine::{Batch, Block, Init, ParamGrads, ParamRef, ParamSpec, Saved, Upstream, WeightGrads};
use candle_core::{Result, Tensor};

/// Layer `index` of the model; its residual projections start smaller, by 1/sqrt(2·n_layer) (GPT-2).
#[derive(Debug, Clone)]
pub struct Layer {
    cfg: GptConfig,
    index: usize,
}

impl Layer {
    pub fn new(cfg: GptConfig, index: usize) -> Self {
        Self { cfg, index }
    }
}

/// `x [n, in] · w [in, out] + b [out]`.
fn linear(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    x.matmul(w)?.broadcast_add(b)
}

impl Block for Layer {
    fn name(&self) -> String {
        format!("h.{}", self.index)
    }

    fn params(&self) -> Vec<ParamRef> {
        let d = self.cfg.d_model;
        let std = 0.02;
        let resid_std = 0.02 / (2.0 * self.cfg.n_layer as f64).sqrt();
        let p = |name: &str, shape: &[usize], init: Init, decay: bool| ParamRef::Own(ParamSpec::new(name, shape, init, decay));
        vec![
            p("ln_1.weight", &[d], Init::Ones, false),
            p("ln_1.bias", &[d], Init::Zeros, false),
            p("attn.c_attn.weight", &[d, 3 * d], Init::Normal { std }, true),
            p("attn.c_attn.bias", &[3 * d], Init::Zeros, false),
            p("attn.c_proj.weight", &[d, d], Init::Normal { std: resid_std }, true),
            p("attn.c_proj.bias", &[d], Init::Zeros, false),
            p("ln_2.weight", &[d], Init::Ones, false),
            p("ln_2.bias", &[d], Init::Zeros, false),
            p("mlp.c_fc.weight", &[d, 4 * d], Init::Normal { std }, true),
            p("mlp.c_fc.bias", &[4 * d], Init::Zeros, false),
            p("mlp.c_proj.weight", &[4 * d, d], Init::Normal { std: resid_std }, true),
            p("mlp.c_proj.bias", &[d], Init::Zeros, false),
        ]
    }

    fn forward(&self, p: &[Tensor], x: &[Tensor], batch: &Batch) -> Result<Vec<Tensor>> {
        let x = input(x)?;
        let docs = Docs::of(batch)?;
        if x.track_op() || p.iter().any(Tensor::track_op) {
            return Ok(vec![self.forward_composed(p, x, docs.as_ref())?]);
        }
        Ok(vec![layer_fused::forward(p, x, self.cfg.n_head, docs.as_ref(), false)?.0])
    }

    fn forward_saving(&self, p: &[Tensor], x: &[Tensor], batch: &Batch) -> Result<Option<(Vec<Tensor>, Saved)>> {
        let (y, saved) = layer_fused::forward(p, input(x)?, self.cfg.n_head, Docs::of(batch)?.as_ref(), true)?;
        let saved = saved.ok_or_else(|| candle_core::Error::Msg("layer forward kept nothing".into()))?;
        Ok(Some((vec![y], Box::new(saved))))
    }

    fn backward(&self, p: &[Tensor], saved: Saved, upstream: Upstream<'_>) -> Result<(Vec<Option<Tensor>>, Vec<Option<Tensor>>)> {
        ParamGrads::whole(p.len(), |grads| backward_into(saved, p, upstream, grads))
    }

    fn backward_split(&self, p: &[Tensor], saved: Saved, upstream: Upstream<'_>) -> Result<(WeightGrads, Vec<Option<Tensor>>)> {
        ParamGrads::split(p.len(), |grads| backward_into(saved, p, upstream, grads))
    }

    fn forward_flops_per_token(&self) -> f64 {
        let (d, t) = (self.cfg.d_model as f64, self.cfg.seq_len as f64);
        // QKV, output projection and the MLP (12·d² multiply-adds), plus scores and weighted values.
        2.0 * 12.0 * d * d + 2.0 * 2.0 * t * d
    }
}

fn input(x: &[Tensor]) -> Result<&Tensor> {
    x.first().ok_or_else(|| candle_core::Error::Msg("a transformer layer needs an input".into()))
}

impl Layer {
    /// The forward composed of candle ops (differentiable by autograd).
    fn forward_composed(&self, p: &[Tensor], x: &Tensor, docs: Option<&Docs>) -> Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let (nh, hd) = (self.cfg.n_head, d / self.cfg.n_head);

        // Attention.
        let h = layer_norm(x, &p[0], &p[1])?.reshape((b * t, d))?;
        let qkv = linear(&h, &p[2], &p[3])?; // [b·t, 3d]
        let heads = |i: usize| -> Result<Tensor> {
            qkv.narrow(1, i * d, d)?.reshape((b, t, nh, hd))?.transpose(1, 2)?.contiguous() // [b, nh, t, hd]
        };
        let (q, k, v) = (heads(0)?, heads(1)?, heads(2)?);
        let mut scores = q.matmul(&k.t()?.contiguous()?)?; // [b, nh, t, t]
        if let Some(d) = docs {
            scores = scores.broadcast_add(&d.mask(scores.dtype())?)?;
        }
        let y = causal_softmax(&scores, 1.0 / (hd as f64).sqrt())?.matmul(&v)?; // [b, nh, t, hd]
        let y = y.transpose(1, 2)?.contiguous()?.reshape((b * t, d))?;
        let x = (x + linear(&y, &p[4], &p[5])?.reshape((b, t, d))?)?;

        // MLP.
        let h = layer_norm(&x, &p[6], &p[7])?.reshape((b * t, d))?;
        let h = linear(&h, &p[8], &p[9])?.gelu()?;
        x + linear(&h, &p[10], &p[11])?.reshape((b, t, d))?
    }
}

/// The hand-written backward: the input's gradient, the slots' into `grads`.
fn backward_into(saved: Saved, p: &[Tensor], upstream: Upstream<'_>, grads: &mut ParamGrads) -> Result<Vec<Option<Tensor>>> {
    let g = upstream.grad(0)?;
    let saved = saved.downcast::<LayerSaved>().map_err(|_| candle_core::Error::Msg("layer backward: foreign saved state".into()))?;
    Ok(vec![Some(layer_fused::backward(p, *saved, g, grads)?)])
}
