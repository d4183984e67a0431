//! Llama block 0: the token embedding `embed_tokens` `[vocab, d]` (positions are rotary, in the layers),
//! with a hand-written backward (rows added up per token in f32). Under tensor parallelism the table
//! is vocabulary-parallel: each rank holds `vocab / tp` consecutive rows, looks up the tokens that
//! fall in them (zero rows for the others), and the group sums the lookups (with sequence
//! parallelism: each rank keeps its token rows of the sum).

use super::LlamaConfig;
use crate::ops::lm_head::TokenIds;
use crate::ops::vocab_parallel::VocabShard;
use candle_core::{DType, Result, Tensor};
use ferrospeed::engine::{Batch, Block, ContextGroup, Init, ParamGrads, ParamRef, ParamSpec, Saved, TensorGroup, TpSplit, Upstream, WeightGrads};
use ferrospeed::profile::{scoped_as, Kind};
use std::sync::OnceLock;

/// `embed_tokens`; output `[batch, t, d]`.
#[derive(Debug, Clone)]
pub struct Embedding {
    cfg: LlamaConfig,
    /// The table is frozen (a LoRA base): the backward has nothing to do.
    frozen: bool,
    /// The tensor-parallel group the table's rows are split over.
    tp: OnceLock<TensorGroup>,
    /// The context-parallel group: this rank looks up its chunk of each sequence.
    cp: OnceLock<ContextGroup>,
}

/// What the backward needs: the token ids (this rank's rows' indices under tensor parallelism) and
/// which tokens this rank's rows hold (`[n, 1]`, 1 or 0; `None` without tensor parallelism).
struct EmbeddingSaved {
    ids: TokenIds,
    mask: Option<Tensor>,
}

impl Embedding {
    pub fn new(cfg: LlamaConfig) -> Self {
        Self { cfg, frozen: false, tp: OnceLock::new(), cp: OnceLock::new() }
    }

    /// The block with its parameters frozen (the base of LoRA adapters).
    pub fn frozen(cfg: LlamaConfig) -> Self {
        Self { cfg, frozen: true, tp: OnceLock::new(), cp: OnceLock::new() }
    }

    /// The tokens as indices into this rank's `rows` rows of the table (0 where a token is another
    /// rank's) and the mask of the ones it holds `[n, 1]` in `dtype`; the tokens themselves and no
    /// mask where the table is whole.
    fn local_tokens(&self, tokens: &Tensor, rows: usize, dtype: DType) -> Result<(Tensor, Option<Tensor>)> {
        let Some(group) = self.tp.get() else { return Ok((tokens.clone(), None)) };
        let shard = VocabShard { group: group.clone(), lo: group.rank() * rows };
        let (local, held) = shard.local_ids(tokens, rows, "token id")?;
        Ok((local.reshape(tokens.shape())?, Some(held.to_dtype(dtype)?)))
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

    fn forward(&self, params: &[Tensor], x: &[Tensor], batch: &Batch) -> Result<Vec<Tensor>> {
        Ok(self.run(params, x, batch, false)?.0)
    }

    fn forward_saving(&self, params: &[Tensor], x: &[Tensor], batch: &Batch) -> Result<Option<(Vec<Tensor>, Saved)>> {
        let (y, saved) = self.run(params, x, batch, true)?;
        Ok(saved.map(|s| (y, Box::new(s) as Saved)))
    }

    fn tensor_plan(&self) -> Vec<TpSplit> {
        vec![TpSplit::Rows]
    }

    fn bind_tensors(&self, group: TensorGroup) -> std::result::Result<(), String> {
        let (v, tp) = (self.cfg.vocab_size, group.size());
        if v % tp != 0 {
            return Err(format!("a vocabulary of {v} tokens, which parallel.tp = {tp} does not divide (the embedding and head are split by rows): choose a tp that divides it"));
        }
        self.tp.set(group).map_err(|_| "bound to a tensor-parallel group twice".to_string())
    }

    fn bind_context(&self, group: ContextGroup) -> std::result::Result<(), String> {
        self.cp.set(group).map_err(|_| "bound to a context-parallel group twice".to_string())
    }

    fn backward(&self, p: &[Tensor], saved: Saved, upstream: Upstream<'_>) -> Result<(Vec<Option<Tensor>>, Vec<Option<Tensor>>)> {
        ParamGrads::whole(p.len(), |grads| self.backward_into(saved, p, upstream, grads))
    }

    fn backward_split(&self, p: &[Tensor], saved: Saved, upstream: Upstream<'_>) -> Result<(WeightGrads, Vec<Option<Tensor>>)> {
        ParamGrads::split(p.len(), |grads| self.backward_into(saved, p, upstream, grads))
    }
}

impl Embedding {
    /// The lookup (summed over the tensor-parallel group where the table is split) and what the
    /// backward needs.
    fn run(&self, params: &[Tensor], _inputs: &[Tensor], batch: &Batch, save: bool) -> Result<(Vec<Tensor>, Option<EmbeddingSaved>)> {
        let mut tokens = batch.get("tokens")?.clone();
        if let Some(cp) = self.cp.get() {
            let chunk = cp.chunk(tokens.dim(1)?)?;
            tokens = tokens.narrow(1, chunk.start, chunk.len())?;
        }
        let tokens = &tokens;
        let (b, t) = tokens.dims2()?;
        let (ids, mask) = self.local_tokens(tokens, params[0].dim(0)?, params[0].dtype())?;
        let mut y = scoped_as(Kind::Elementwise, "embedding", || params[0].index_select(&ids.flatten_all()?, 0))?;
        let d = self.cfg.d_model;
        let mut shape = (b, t, d);
        if let (Some(m), Some(group)) = (&mask, self.tp.get()) {
            // The sum over the group: whole, or under sequence parallelism this rank's token rows.
            y = group.rows_out(&y.broadcast_mul(m)?)?;
            shape = super::layer_fused::hidden_shape(group, b, t, d);
        }
        let saved = if save { Some(EmbeddingSaved { ids: TokenIds::new(&ids)?, mask }) } else { None };
        Ok((vec![y.reshape(shape)?], saved))
    }

    /// The backward has no input gradient (the inputs are token ids): it is all parameter work, none of
    /// it run for a frozen table.
    fn backward_into(&self, saved: Saved, p: &[Tensor], upstream: Upstream<'_>, grads: &mut ParamGrads) -> Result<Vec<Option<Tensor>>> {
        if self.frozen {
            grads.freeze([0]);
        }
        let s = saved.downcast::<EmbeddingSaved>().map_err(|_| candle_core::Error::Msg("embedding backward: foreign saved state".into()))?;
        let (mut g, vocab) = (upstream.grad(0)?.clone(), p[0].dim(0)?);
        // Another rank's tokens add nothing to this rank's rows.
        if let (Some(m), Some(group)) = (&s.mask, self.tp.get()) {
            // Every token's gradient (this rank's rows of them under sequence parallelism, gathered).
            let d = g.dim(2)?;
            let all = group.rows_in(&g.reshape((g.elem_count() / d, d))?)?;
            let n = all.dim(0)?;
            g = all.broadcast_mul(&m.to_dtype(g.dtype())?)?.reshape((1, n, d))?;
        }
        let ids = s.ids;
        grads.put_rows(vec![(0, vocab)], move || ids.table_grad(&g, vocab))?;
        Ok(Vec::new())
    }
}
