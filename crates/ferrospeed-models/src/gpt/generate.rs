//! Sampling text from a GPT with the engine's current parameters (for the end-of-run sample).

use super::{Embedding, Gpt, Head, Layer};
use ferrospeed::engine::{Batch, Block};
use ferrospeed::rng::Rng;
use candle_core::{Result, Tensor};

impl Gpt {
    /// Continue `prompt` by `n` tokens, sampling with `temperature` (0 = greedy). `params` are the
    /// engine's slot tensors, one list per block. The context is cut to the last `seq_len` tokens.
    pub fn generate(&self, params: &[Vec<Tensor>], prompt: &[u32], n: usize, temperature: f64, rng: &mut Rng) -> Result<Vec<u32>> {
        let device = params[0][0].device().clone();
        let mut tokens = prompt.to_vec();
        let head = Head::new(self.cfg);
        for _ in 0..n {
            let start = tokens.len().saturating_sub(self.cfg.seq_len);
            let ctx = &tokens[start..];
            let ids = Tensor::new(ctx, &device)?.unsqueeze(0)?;
            let batch = Batch::tokens(ids.clone(), ids);
            let mut x = Embedding::new(self.cfg).forward(&params[0], &[], &batch)?;
            for l in 0..self.cfg.n_layer {
                x = Layer::new(self.cfg, l).forward(&params[1 + l], &x, &batch)?;
            }
            let logits = head.logits(&params[self.cfg.n_layer + 1], &x[0])?;
            let last: Vec<f32> = logits.get(ctx.len() - 1)?.to_dtype(candle_core::DType::F32)?.to_vec1()?;
            tokens.push(sample(&last, temperature, rng));
        }
        Ok(tokens[prompt.len()..].to_vec())
    }
}

fn sample(logits: &[f32], temperature: f64, rng: &mut Rng) -> u32 {
    let argmax = logits.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(i, _)| i);
    if temperature <= 0.0 {
        return argmax as u32;
    }
    let max = logits[argmax] as f64;
    let weights: Vec<f64> = logits.iter().map(|&l| ((l as f64 - max) / temperature).exp()).collect();
    let mut r = rng.next_f64() * weights.iter().sum::<f64>();
    for (i, w) in weights.iter().enumerate() {
        r -= w;
        if r <= 0.0 {
            return i as u32;
        }
    }
    argmax as u32
}

