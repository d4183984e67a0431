//! GPT block 0: token embedding plus learned position embedding, with a hand-written backward
//! (row scatter-add into the token table in f32, column sums for positions; for a packed batch, whose
//! positions restart at each document, a scatter-add into the position table too).

use super::GptConfig;
use crate::ops::docs::POSITIONS;
use crate::ops::fused::col_sum;
use crate::ops::lm_head::TokenIds;
use candle_core::{DType, Result, Tensor};
use ferrospeed::engine::{Batch, Block, Init, ParamGrads, ParamRef, ParamSpec, Saved, Upstream, WeightGrads};
use ferrospeed::profile::{scoped_as, Kind};

/// `wte` `[vocab, d]` and `wpe` `[seq_len, d]`; output `[batch, t, d]`.
#[derive(Debug, Clone)]
pub struct Embedding {
    cfg: GptConfig,
}

impl Embedding {
    pub fn new(cfg: GptConfig) -> Self {
        Self { cfg }
    }
}

impl Block for Embedding {
    fn name(&self) -> String {
        "embed".into()
    }

    fn params(&self) -> Vec<ParamRef> {
        let (v, t, d) = (self.cfg.vocab_size, self.cfg.seq_len, self.cfg.d_model);
        vec![
            ParamRef::Own(ParamSpec::new("wte", &[v, d], Init::Normal { std: 0.02 }, true)),
            ParamRef::Own(ParamSpec::new("wpe", &[t, d], Init::Normal { std: 0.02 }, true)),
        ]
    }

    fn forward(&self, params: &[Tensor], _inputs: &[Tensor], batch: &Batch) -> Result<Vec<Tensor>> {
        let (wte, wpe) = (&params[0], &params[1]);
        let tokens = batch.get("tokens")?;
        let (b, t) = tokens.dims2()?;
        scoped_as(Kind::Elementwise, "embedding", || {
            let tok = wte.index_select(&tokens.flatten_all()?, 0)?.reshape((b, t, self.cfg.d_model))?;
            if batch.contains(POSITIONS) {
                let pos = wpe.index_select(&batch.get(POSITIONS)?.flatten_all()?, 0)?.reshape((b, t, self.cfg.d_model))?;
                return Ok(vec![(tok + pos)?]);
            }
            Ok(vec![tok.broadcast_add(&wpe.narrow(0, 0, t)?)?])
        })
    }

    fn forward_saving(&self, params: &[Tensor], x: &[Tensor], batch: &Batch) -> Result<Option<(Vec<Tensor>, Saved)>> {
        let ids = TokenIds::new(batch.get("tokens")?)?;
        let positions = if batch.contains(POSITIONS) { Some(TokenIds::new(batch.get(POSITIONS)?)?) } else { None };
        Ok(Some((self.forward(params, x, batch)?, Box::new((ids, positions)))))
    }

    fn backward(&self, p: &[Tensor], saved: Saved, upstream: Upstream<'_>) -> Result<(Vec<Option<Tensor>>, Vec<Option<Tensor>>)> {
        ParamGrads::whole(p.len(), |grads| backward_into(saved, p, upstream, grads))
    }

    fn backward_split(&self, p: &[Tensor], saved: Saved, upstream: Upstream<'_>) -> Result<(WeightGrads, Vec<Option<Tensor>>)> {
        ParamGrads::split(p.len(), |grads| backward_into(saved, p, upstream, grads))
    }
}

/// The backward has no input gradient (the inputs are token ids): it is all parameter work.
fn backward_into(saved: Saved, p: &[Tensor], upstream: Upstream<'_>, grads: &mut ParamGrads) -> Result<Vec<Option<Tensor>>> {
    let (ids, positions) = *saved.downcast::<(TokenIds, Option<TokenIds>)>().map_err(|_| candle_core::Error::Msg("embedding backward: foreign saved state".into()))?;
    let (g, vocab, seq) = (upstream.grad(0)?.clone(), p[0].dim(0)?, p[1].dim(0)?);
    grads.put(move |slots| {
        let (b, t, d) = g.dims3()?;
        slots[0] = Some(ids.table_grad(&g, vocab)?);
        slots[1] = Some(match positions {
            Some(positions) => positions.table_grad(&g, seq)?,
            None => scoped_as(Kind::Elementwise, "embedding_backward", || {
                let acc = if g.dtype() == DType::F64 { DType::F64 } else { DType::F32 };
                let d_wpe = col_sum(&g.reshape((b, t * d))?)?.reshape((t, d))?;
                if t < seq {
                    Tensor::cat(&[d_wpe, Tensor::zeros((seq - t, d), acc, g.device())?], 0)
                } else {
                    Ok(d_wpe)
                }
            })?,
        });
        Ok(())
    })?;
    Ok(Vec::new())
}
