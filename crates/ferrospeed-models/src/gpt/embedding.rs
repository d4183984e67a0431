//! GPT block 0: token embedding plus learned position embedding, with a hand-written backward
//! (row scatter-add into the token table in f32, column sums for positions; for a packed batch, whose
//! positions restart at each document, a scatter-add into the position table too).

use super::GptConfig;
use crate::ops::docs::POSITIONS;
use crate::ops::fused::col_sum;
use crate::ops::lm_head::TokenIds;
use candle_core::{DType, Result, Tensor};
use ferrospeed::engine::{Batch, Block, Init, ParamRef, ParamSpec, Saved, Upstream};
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
        let g = upstream.grad(0)?;
        let (ids, positions) = *saved.downcast::<(TokenIds, Option<TokenIds>)>().map_err(|_| candle_core::Error::Msg("embedding backward: foreign saved state".into()))?;
        let (b, t, d) = g.dims3()?;
        let d_wte = ids.table_grad(g, p[0].dim(0)?)?;
        if let Some(positions) = positions {
            return Ok((vec![Some(d_wte), Some(positions.table_grad(g, p[1].dim(0)?)?)], Vec::new()));
        }
        scoped_as(Kind::Elementwise, "embedding_backward", || {
            let acc = if g.dtype() == DType::F64 { DType::F64 } else { DType::F32 };
            let d_wpe = col_sum(&g.reshape((b, t * d))?)?.reshape((t, d))?;
            let seq = p[1].dim(0)?;
            let d_wpe = if t < seq { Tensor::cat(&[d_wpe, Tensor::zeros((seq - t, d), acc, g.device())?], 0)? } else { d_wpe };
            Ok((vec![Some(d_wte), Some(d_wpe)], Vec::new()))
        })
    }
}
