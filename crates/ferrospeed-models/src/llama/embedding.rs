//! Llama block 0: the token embedding `embed_tokens` `[vocab, d]` (positions are rotary, in the layers),
//! with a hand-written backward (rows added up per token in f32).

use super::LlamaConfig;
use crate::ops::fused::embedding_grad;
use candle_core::{DType, Device, Result, Tensor};
use ferrospeed::engine::{Batch, Block, Init, ParamRef, ParamSpec, Saved, Upstream};
use ferrospeed::profile::{scoped_as, Kind};

/// The token ids, on the device and (for a GPU) on the host.
type EmbSaved = (Tensor, Option<Vec<u32>>);

/// `embed_tokens`; output `[batch, t, d]`.
#[derive(Debug, Clone)]
pub struct Embedding {
    cfg: LlamaConfig,
}

impl Embedding {
    pub fn new(cfg: LlamaConfig) -> Self {
        Self { cfg }
    }
}

impl Block for Embedding {
    fn name(&self) -> String {
        "embed".into()
    }

    fn params(&self) -> Vec<ParamRef> {
        let (v, d) = (self.cfg.vocab_size, self.cfg.d_model);
        vec![ParamRef::Own(ParamSpec::new("embed_tokens.weight", &[v, d], Init::Normal { std: self.cfg.initializer_range }, true))]
    }

    fn forward(&self, params: &[Tensor], _inputs: &[Tensor], batch: &Batch) -> Result<Vec<Tensor>> {
        let tokens = batch.get("tokens")?;
        let (b, t) = tokens.dims2()?;
        scoped_as(Kind::Elementwise, "embedding", || Ok(vec![params[0].index_select(&tokens.flatten_all()?, 0)?.reshape((b, t, self.cfg.d_model))?]))
    }

    fn forward_saving(&self, params: &[Tensor], x: &[Tensor], batch: &Batch) -> Result<Option<(Vec<Tensor>, Saved)>> {
        let tokens = batch.get("tokens")?;
        // The gradient kernel groups positions by token on the host: read the ids while the queue is short.
        let host = match tokens.device() {
            Device::Cpu => None,
            _ => Some(tokens.flatten_all()?.to_dtype(DType::U32)?.to_vec1::<u32>()?),
        };
        let saved: EmbSaved = (tokens.clone(), host);
        Ok(Some((self.forward(params, x, batch)?, Box::new(saved))))
    }

    fn backward(&self, p: &[Tensor], saved: Saved, upstream: Upstream<'_>) -> Result<(Vec<Option<Tensor>>, Vec<Option<Tensor>>)> {
        let g = upstream.grad(0)?;
        let (tokens, host) = *saved.downcast::<EmbSaved>().map_err(|_| candle_core::Error::Msg("embedding backward: foreign saved state".into()))?;
        let (b, t, d) = g.dims3()?;
        let d_wte = scoped_as(Kind::Elementwise, "embedding_backward", || embedding_grad(&g.reshape((b * t, d))?, &tokens, host.as_deref(), p[0].dim(0)?))?;
        Ok((vec![Some(d_wte)], Vec::new()))
    }
}
