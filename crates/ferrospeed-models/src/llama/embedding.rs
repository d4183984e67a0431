//! Llama block 0: the token embedding `embed_tokens` `[vocab, d]` (positions are rotary, in the layers),
//! with a hand-written backward (rows added up per token in f32).

use super::LlamaConfig;
use crate::ops::lm_head::TokenIds;
use candle_core::{Result, Tensor};
use ferrospeed::engine::{Batch, Block, Init, ParamGrads, ParamRef, ParamSpec, Saved, Upstream, WeightGrads};
use ferrospeed::profile::{scoped_as, Kind};

/// `embed_tokens`; output `[batch, t, d]`.
#[derive(Debug, Clone)]
pub struct Embedding {
    cfg: LlamaConfig,
    /// The table is frozen (a LoRA base): the backward has nothing to do.
    frozen: bool,
}

impl Embedding {
    pub fn new(cfg: LlamaConfig) -> Self {
        Self { cfg, frozen: false }
    }

    /// The block with its parameters frozen (the base of LoRA adapters).
    pub fn frozen(cfg: LlamaConfig) -> Self {
        Self { cfg, frozen: true }
    }
}

impl Block for Embedding {
    fn name(&self) -> String {
        "embed".into()
    }

    fn params(&self) -> Vec<ParamRef> {
        let (v, d) = (self.cfg.vocab_size, self.cfg.d_model);
        let spec = ParamSpec::new("embed_tokens.weight", &[v, d], Init::Normal { std: self.cfg.initializer_range }, true);
        vec![if self.frozen { ParamRef::Frozen(spec) } else { ParamRef::Own(spec) }]
    }

    fn forward(&self, params: &[Tensor], _inputs: &[Tensor], batch: &Batch) -> Result<Vec<Tensor>> {
        let tokens = batch.get("tokens")?;
        let (b, t) = tokens.dims2()?;
        scoped_as(Kind::Elementwise, "embedding", || Ok(vec![params[0].index_select(&tokens.flatten_all()?, 0)?.reshape((b, t, self.cfg.d_model))?]))
    }

    fn forward_saving(&self, params: &[Tensor], x: &[Tensor], batch: &Batch) -> Result<Option<(Vec<Tensor>, Saved)>> {
        let ids = TokenIds::new(batch.get("tokens")?)?;
        Ok(Some((self.forward(params, x, batch)?, Box::new(ids))))
    }

    fn backward(&self, p: &[Tensor], saved: Saved, upstream: Upstream<'_>) -> Result<(Vec<Option<Tensor>>, Vec<Option<Tensor>>)> {
        ParamGrads::whole(p.len(), |grads| self.backward_into(saved, p, upstream, grads))
    }

    fn backward_split(&self, p: &[Tensor], saved: Saved, upstream: Upstream<'_>) -> Result<(WeightGrads, Vec<Option<Tensor>>)> {
        ParamGrads::split(p.len(), |grads| self.backward_into(saved, p, upstream, grads))
    }
}

impl Embedding {
    /// The backward has no input gradient (the inputs are token ids): it is all parameter work, none of
    /// it run for a frozen table.
    fn backward_into(&self, saved: Saved, p: &[Tensor], upstream: Upstream<'_>, grads: &mut ParamGrads) -> Result<Vec<Option<Tensor>>> {
        if self.frozen {
            grads.freeze([0]);
        }
        let ids = saved.downcast::<TokenIds>().map_err(|_| candle_core::Error::Msg("embedding backward: foreign saved state".into()))?;
        let (g, vocab) = (upstream.grad(0)?.clone(), p[0].dim(0)?);
        grads.put_rows(vec![(0, vocab)], move || ids.table_grad(&g, vocab))?;
        Ok(Vec::new())
    }
}
