//! GPT block 0: token embedding plus learned position embedding.

use super::GptConfig;
use ferrospeed::engine::{Batch, Block, Init, ParamRef, ParamSpec};
use candle_core::{Result, Tensor};

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

    fn forward(&self, params: &[Tensor], _x: Option<&Tensor>, batch: &Batch) -> Result<Tensor> {
        let (wte, wpe) = (&params[0], &params[1]);
        let (b, t) = batch.tokens.dims2()?;
        let tok = wte.index_select(&batch.tokens.flatten_all()?, 0)?.reshape((b, t, self.cfg.d_model))?;
        tok.broadcast_add(&wpe.narrow(0, 0, t)?)
    }
}
