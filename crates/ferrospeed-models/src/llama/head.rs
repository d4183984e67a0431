//! The last Llama block: final RMSNorm, logits through `lm_head` (or the embedding when tied),
//! cross-entropy; with a hand-written backward (`ops::lm_head`, shared with GPT). Under tensor
//! parallelism the vocabulary matrix is split by rows (vocabulary-parallel, like the tied embedding)
//! and the loss is the vocabulary-parallel cross-entropy; the norm stays whole.

use super::LlamaConfig;
use crate::ops::cross_entropy::cross_entropy_rows_autograd;
use crate::ops::docs::{loss_weighting, LossWeighting};
use crate::ops::lm_head::{head_backward, head_loss_sharded, reduce_rows, HeadLoss};
use crate::ops::vocab_parallel::VocabShard;
use crate::ops::rms_norm::{rms_backward, rms_forward, rms_norm};
use candle_core::{Result, Tensor};
use ferrospeed::engine::{Batch, Block, ContextGroup, Init, ParamGrads, ParamRef, ParamSpec, Saved, TensorGroup, TpSplit, Upstream, WeightGrads};
use ferrospeed::profile::{scoped_as, Kind};
use std::sync::OnceLock;

/// `norm` and the head; slot 1 is `lm_head.weight` `[vocab, d]` or block 0's `embed_tokens.weight`.
#[derive(Debug, Clone)]
pub struct Head {
    cfg: LlamaConfig,
    /// Norm and head frozen (a LoRA base): only the input's gradient is computed.
    frozen: bool,
    /// The tensor-parallel group the vocabulary is split over.
    tp: OnceLock<TensorGroup>,
    /// The context-parallel group: this rank's loss is its chunk's share.
    cp: OnceLock<ContextGroup>,
}

/// What the head's backward needs.
struct HeadSaved {
    x: Tensor,
    rstd: Tensor,
    loss: HeadLoss,
    dims: (usize, usize, usize),
}

impl Head {
    pub fn new(cfg: LlamaConfig) -> Self {
        Self { cfg, frozen: false, tp: OnceLock::new(), cp: OnceLock::new() }
    }

    /// The block with its parameters frozen (the base of LoRA adapters).
    pub fn frozen(cfg: LlamaConfig) -> Self {
        Self { cfg, frozen: true, tp: OnceLock::new(), cp: OnceLock::new() }
    }

    /// Logits `[b·t, vocab]` for the hidden states `x [b, t, d]` (composed ops).
    pub fn logits(&self, params: &[Tensor], x: &Tensor) -> Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        rms_norm(&x.reshape((b * t, d))?, &params[0], self.cfg.rms_norm_eps)?.matmul(&params[1].t()?)
    }

    fn run(&self, p: &[Tensor], x: &Tensor, batch: &Batch) -> Result<(Tensor, HeadSaved)> {
        let (b, t, d) = x.dims3()?;
        let x = x.reshape((b * t, d))?;
        let norm = scoped_as(Kind::Elementwise, "rms_norm", || rms_forward(&x, &p[0], self.cfg.rms_norm_eps))?;
        let shard = self.tp.get().map(|g| VocabShard { lo: g.rank() * p[1].dim(0).unwrap_or(0), group: g.clone() });
        // Under sequence parallelism `x` is this rank's token rows: the logits need all of them.
        let h = match &shard {
            Some(s) => s.group.rows_in(&norm.y)?,
            None => norm.y,
        };
        let (targets, weighting) = self.targets(batch)?;
        let (loss, saved) = head_loss_sharded(h, &p[1], targets, &weighting, shard)?;
        Ok((loss, HeadSaved { x, rstd: norm.rstd, loss: saved, dims: (b, t, d) }))
    }

    /// The targets `[n]` and the loss weighting this rank's rows take: the batch's, or under context
    /// parallelism its chunk's, weighted so that the group's average of the chunks' losses is the
    /// micro-batch's loss (a mask's mean over the whole micro-batch's counted targets).
    fn targets(&self, batch: &Batch) -> Result<(Tensor, LossWeighting)> {
        let targets = batch.get("targets")?;
        let weighting = loss_weighting(batch)?;
        let Some(cp) = self.cp.get() else { return Ok((targets.flatten_all()?, weighting)) };
        let (b, t) = targets.dims2()?;
        let chunk = cp.chunk(t)?;
        let take = |x: &Tensor| -> Result<Tensor> { x.reshape((b, t))?.narrow(1, chunk.start, chunk.len())?.flatten_all() };
        let size = cp.size() as f64;
        let weighting = match weighting {
            // Every chunk holds the same number of rows.
            LossWeighting::Mean => LossWeighting::Mean,
            LossWeighting::Mask(m) => LossWeighting::Weights(take(&m)?.broadcast_div(&m.sum_all()?.maximum(1.0)?)?.affine(size, 0.0)?),
            LossWeighting::Weights(w) => LossWeighting::Weights(take(&w)?.affine(size, 0.0)?),
        };
        Ok((take(targets)?, weighting))
    }

    /// The hand-written backward: the input's gradient, the slots' into `grads`.
    fn backward_into(&self, p: &[Tensor], saved: Saved, upstream: Upstream<'_>, grads: &mut ParamGrads) -> Result<Vec<Option<Tensor>>> {
        let Upstream::Loss(scale) = upstream else { candle_core::bail!("the head is the last block: its output is the loss") };
        let s = *saved.downcast::<HeadSaved>().map_err(|_| candle_core::Error::Msg("head backward: foreign saved state".into()))?;
        if self.frozen {
            grads.freeze([0, 1]);
        }
        let d_h = head_backward(s.loss, &p[1], scale, grads, 1)?;
        let (d_x, d_w) = scoped_as(Kind::Elementwise, "rms_norm_backward", || rms_backward(&d_h, &s.x, &p[0], &s.rstd, None))?;
        grads.set(0, match self.tp.get() {
            Some(g) => g.replicated_grad(&d_w)?,
            None => d_w,
        });
        Ok(vec![Some(d_x.reshape(s.dims)?)])
    }
}

impl Head {
    /// In an MoE model (`inputs`: the hidden state, then each sparse layer's expert selections,
    /// probability sums, z-loss sums and drops): `loss` plus the load-balancing loss weighted by
    /// `router_aux_loss_coef` where it is on and the z-loss weighted by its coefficient, then the
    /// router's statistics (`Block::metrics`); else `loss` alone.
    fn with_moe(&self, loss: Tensor, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        let (Some(m), [x, counts, probs, extras]) = (self.cfg.moe, inputs) else { return Ok(vec![loss]) };
        let (b, t, _) = x.dims3()?;
        let n = b * t;
        // A term that is off still joins the loss, times a zero tensor: every input of an autograd
        // block must reach the loss (the engine refuses one that does not), and candle's autograd
        // prunes `affine(0, 0)`.
        let weighted = |term: Tensor, on: bool, coef: f64| -> Result<Tensor> { if on { term.affine(coef, 0.0) } else { term.broadcast_mul(&term.zeros_like()?) } };
        let aux = weighted(super::moe::aux_loss(counts, probs, n)?, m.aux_loss, m.aux_coef)?;
        let z = weighted(super::moe::z_loss(extras, n)?, m.z_loss_coef > 0.0, m.z_loss_coef)?;
        let extra = (aux + z)?.to_dtype(loss.dtype())?;
        let loss = (loss + extra)?;
        let extras = extras.detach();
        Ok(vec![loss, super::moe::max_load(&counts.detach())?, super::moe::dropped_share(&extras, n, m.top_k)?])
    }

    fn param(&self, spec: ParamSpec) -> ParamRef {
        if self.frozen {
            ParamRef::Frozen(spec)
        } else {
            ParamRef::Own(spec)
        }
    }
}

impl Block for Head {
    fn name(&self) -> String {
        "head".into()
    }

    fn params(&self) -> Vec<ParamRef> {
        let (v, d) = (self.cfg.vocab_size, self.cfg.d_model);
        let head = if self.cfg.tie_word_embeddings {
            ParamRef::Tied { block: 0, name: "embed_tokens.weight".into() }
        } else {
            self.param(ParamSpec::new("lm_head.weight", &[v, d], Init::Normal { std: self.cfg.initializer_range }, true))
        };
        vec![self.param(ParamSpec::new("norm.weight", &[d], Init::Ones, false)), head]
    }

    fn forward(&self, params: &[Tensor], inputs: &[Tensor], batch: &Batch) -> Result<Vec<Tensor>> {
        let x = input(inputs)?;
        if x.track_op() || params.iter().any(Tensor::track_op) || inputs.len() > 1 {
            if self.tp.get().is_some() || self.cp.get().is_some() {
                candle_core::bail!("a head split over a tensor- or context-parallel group runs its hand-written backward, not autograd");
            }
            let rows = cross_entropy_rows_autograd(&self.logits(params, x)?, &batch.get("targets")?.flatten_all()?)?;
            let loss = reduce_rows(&rows, &loss_weighting(batch)?)?.0;
            return self.with_moe(loss, inputs);
        }
        Ok(vec![self.run(params, x, batch)?.0])
    }

    fn forward_saving(&self, params: &[Tensor], x: &[Tensor], batch: &Batch) -> Result<Option<(Vec<Tensor>, Saved)>> {
        // With the load-balancing sums the head is differentiated by autograd.
        if x.len() > 1 {
            return Ok(None);
        }
        let (loss, saved) = self.run(params, input(x)?, batch)?;
        Ok(Some((vec![loss], Box::new(saved))))
    }

    fn backward(&self, p: &[Tensor], saved: Saved, upstream: Upstream<'_>) -> Result<(Vec<Option<Tensor>>, Vec<Option<Tensor>>)> {
        ParamGrads::whole(p.len(), |grads| self.backward_into(p, saved, upstream, grads))
    }

    fn backward_split(&self, p: &[Tensor], saved: Saved, upstream: Upstream<'_>) -> Result<(WeightGrads, Vec<Option<Tensor>>)> {
        ParamGrads::split(p.len(), |grads| self.backward_into(p, saved, upstream, grads))
    }

    fn tensor_plan(&self) -> Vec<TpSplit> {
        vec![TpSplit::Replicated, TpSplit::Rows]
    }

    fn bind_tensors(&self, group: TensorGroup) -> std::result::Result<(), String> {
        let (v, tp) = (self.cfg.vocab_size, group.size());
        if self.cfg.moe.is_some() {
            return Err(format!("tensor parallelism of a mixture-of-experts model is not built yet: set parallel.tp = 1 (parallel.tp = {tp})"));
        }
        if v % tp != 0 {
            return Err(format!("a vocabulary of {v} tokens, which parallel.tp = {tp} does not divide (the head is split by rows): choose a tp that divides it"));
        }
        self.tp.set(group).map_err(|_| "bound to a tensor-parallel group twice".to_string())
    }

    fn bind_context(&self, group: ContextGroup) -> std::result::Result<(), String> {
        if self.cfg.moe.is_some() {
            return Err(format!("context parallelism of a mixture-of-experts model is not built yet: set parallel.cp = 1 (parallel.cp = {})", group.size()));
        }
        self.cp.set(group).map_err(|_| "bound to a context-parallel group twice".to_string())
    }

    fn metrics(&self) -> Vec<String> {
        if self.cfg.moe.is_some() {
            vec!["moe_max_load".into(), "moe_dropped".into()]
        } else {
            Vec::new()
        }
    }

    fn forward_flops_per_token(&self) -> f64 {
        2.0 * (self.cfg.d_model * self.cfg.vocab_size) as f64
    }
}

fn input(x: &[Tensor]) -> Result<&Tensor> {
    x.first().ok_or_else(|| candle_core::Error::Msg("the head needs an input".into()))
}
