//! The last GPT block: final LayerNorm, logits through the token embedding (tied), cross-entropy; with
//! a hand-written backward (the logits are the largest tensor of a step: one pass each way).

use super::GptConfig;
use crate::ops::composed::layer_norm;
use crate::ops::cross_entropy::cross_entropy_rows_autograd;
use crate::ops::docs::loss_weighting;
use crate::ops::fused::{ln_backward, ln_forward};
use crate::ops::lm_head::{head_backward, head_loss, reduce_rows, HeadLoss};
use candle_core::{Result, Tensor};
use ferrospeed::engine::{Batch, Block, Init, ParamGrads, ParamRef, ParamSpec, Saved, Upstream, WeightGrads};
use ferrospeed::profile::{scoped_as, Kind};

/// `ln_f` and the head; its slot 2 is block 0's `wte`.
#[derive(Debug, Clone)]
pub struct Head {
    cfg: GptConfig,
}

/// What the head's backward needs.
struct HeadSaved {
    x: Tensor,
    stats: (Tensor, Tensor),
    loss: HeadLoss,
    /// The input's shape `(b, t, d)`.
    dims: (usize, usize, usize),
}

impl Head {
    pub fn new(cfg: GptConfig) -> Self {
        Self { cfg }
    }

    /// Logits `[b·t, vocab]` for the hidden states `x [b, t, d]`.
    pub fn logits(&self, params: &[Tensor], x: &Tensor) -> Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let h = layer_norm(x, &params[0], &params[1])?.reshape((b * t, d))?;
        h.matmul(&params[2].t()?)
    }

    fn run(&self, p: &[Tensor], x: &Tensor, batch: &Batch) -> Result<(Tensor, HeadSaved)> {
        let (b, t, d) = x.dims3()?;
        let x = x.reshape((b * t, d))?;
        let ln = scoped_as(Kind::Elementwise, "layer_norm", || ln_forward(&x, &p[0], &p[1]))?;
        let (loss, saved) = head_loss(ln.y, &p[2], batch.get("targets")?.flatten_all()?, &loss_weighting(batch)?)?;
        Ok((loss, HeadSaved { x, stats: (ln.mean, ln.rstd), loss: saved, dims: (b, t, d) }))
    }

    /// The hand-written backward: the input's gradient, the slots' into `grads`.
    fn backward_into(&self, p: &[Tensor], saved: Saved, upstream: Upstream<'_>, grads: &mut ParamGrads) -> Result<Vec<Option<Tensor>>> {
        let Upstream::Loss(scale) = upstream else { candle_core::bail!("the head is the last block: its output is the loss") };
        let s = *saved.downcast::<HeadSaved>().map_err(|_| candle_core::Error::Msg("head backward: foreign saved state".into()))?;
        let d_h = head_backward(s.loss, &p[2], scale, grads, 2)?;
        let (d_x, d_w, d_b) = scoped_as(Kind::Elementwise, "layer_norm_backward", || ln_backward(&d_h, &s.x, &p[0], &s.stats.0, &s.stats.1, None))?;
        grads.set(0, d_w);
        grads.set(1, d_b);
        Ok(vec![Some(d_x.reshape(s.dims)?)])
    }
}

impl Block for Head {
    fn name(&self) -> String {
        "head".into()
    }

    fn params(&self) -> Vec<ParamRef> {
        let d = self.cfg.d_model;
        vec![
            ParamRef::Own(ParamSpec::new("ln_f.weight", &[d], Init::Ones, false)),
            ParamRef::Own(ParamSpec::new("ln_f.bias", &[d], Init::Zeros, false)),
            ParamRef::Tied { block: 0, name: "wte".into() },
        ]
    }

    fn forward(&self, params: &[Tensor], x: &[Tensor], batch: &Batch) -> Result<Vec<Tensor>> {
        let x = input(x)?;
        if x.track_op() || params.iter().any(Tensor::track_op) {
            let rows = cross_entropy_rows_autograd(&self.logits(params, x)?, &batch.get("targets")?.flatten_all()?)?;
            return Ok(vec![reduce_rows(&rows, &loss_weighting(batch)?)?.0]);
        }
        Ok(vec![self.run(params, x, batch)?.0])
    }

    fn forward_saving(&self, params: &[Tensor], x: &[Tensor], batch: &Batch) -> Result<Option<(Vec<Tensor>, Saved)>> {
        let (loss, saved) = self.run(params, input(x)?, batch)?;
        Ok(Some((vec![loss], Box::new(saved))))
    }

    fn backward(&self, p: &[Tensor], saved: Saved, upstream: Upstream<'_>) -> Result<(Vec<Option<Tensor>>, Vec<Option<Tensor>>)> {
        ParamGrads::whole(p.len(), |grads| self.backward_into(p, saved, upstream, grads))
    }

    fn backward_split(&self, p: &[Tensor], saved: Saved, upstream: Upstream<'_>) -> Result<(WeightGrads, Vec<Option<Tensor>>)> {
        ParamGrads::split(p.len(), |grads| self.backward_into(p, saved, upstream, grads))
    }

    fn forward_flops_per_token(&self) -> f64 {
        2.0 * (self.cfg.d_model * self.cfg.vocab_size) as f64
    }
}

fn input(x: &[Tensor]) -> Result<&Tensor> {
    x.first().ok_or_else(|| candle_core::Error::Msg("the head needs an input".into()))
}
