//! Inference for `generate`: GPT-2's forward over new tokens with a key/value cache, composed of candle
//! ops (CPU or GPU, f32), from weights under transformers' GPT-2 names (linear weights `[in, out]`,
//! like its Conv1D). Sampling and the cache are `crate::infer`'s.

use super::GptConfig;
use crate::infer::{load, Generator, KvCache};
use crate::ops::composed::layer_norm;
use candle_core::{Device, Result, Tensor, D};
use ferrospeed::checkpoint::WeightFiles;

/// A GPT ready to generate.
pub struct GptInfer {
    pub cfg: GptConfig,
    wte: Tensor,
    wpe: Tensor,
    /// Per layer: ln_1 w/b, c_attn w/b, c_proj w/b, ln_2 w/b, c_fc w/b, mlp c_proj w/b.
    layers: Vec<Vec<Tensor>>,
    ln_f: (Tensor, Tensor),
    device: Device,
}

const LAYER: [&str; 12] = [
    "ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight", "attn.c_proj.bias",
    "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias",
];

impl GptInfer {
    /// The model `cfg` from `files` (transformers' GPT-2 names), on `device`.
    pub fn load(cfg: GptConfig, files: &mut WeightFiles, device: &Device) -> std::result::Result<Self, String> {
        let mut get = |name: &str| load(files, &format!("transformer.{name}"), device);
        let layers = (0..cfg.n_layer).map(|l| LAYER.iter().map(|p| get(&format!("h.{l}.{p}"))).collect::<std::result::Result<Vec<_>, _>>()).collect::<std::result::Result<Vec<_>, _>>()?;
        Ok(Self { cfg, wte: get("wte.weight")?, wpe: get("wpe.weight")?, layers, ln_f: (get("ln_f.weight")?, get("ln_f.bias")?), device: device.clone() })
    }
}

fn affine(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    x.broadcast_matmul(w)?.broadcast_add(b)
}

impl Generator for GptInfer {
    fn max_len(&self) -> usize {
        self.cfg.seq_len
    }

    fn forward(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Tensor> {
        let (s, p0) = (tokens.len(), cache.len);
        let (d, nh) = (self.cfg.d_model, self.cfg.n_head);
        let hd = d / nh;
        if p0 + s > self.cfg.seq_len {
            candle_core::bail!("generate: {} tokens exceed the model's {} positions", p0 + s, self.cfg.seq_len)
        }
        if cache.layers.is_empty() {
            cache.layers = vec![None; self.cfg.n_layer];
        }
        let ids = Tensor::new(tokens, &self.device)?;
        let mut x = (self.wte.index_select(&ids, 0)? + self.wpe.narrow(0, p0, s)?)?.unsqueeze(0)?;
        let t = p0 + s;
        let mask = if s > 1 {
            let m: Vec<f32> = (0..s).flat_map(|i| (0..t).map(move |j| if j > p0 + i { f32::NEG_INFINITY } else { 0.0 })).collect();
            Some(Tensor::from_vec(m, (1, 1, s, t), &self.device)?)
        } else {
            None
        };
        for (l, w) in self.layers.iter().enumerate() {
            let h = layer_norm(&x, &w[0], &w[1])?;
            let qkv = affine(&h, &w[2], &w[3])?; // [1, s, 3d]
            let heads = |i: usize| -> Result<Tensor> { qkv.narrow(2, i * d, d)?.reshape((1, s, nh, hd))?.transpose(1, 2)?.contiguous() };
            let (q, k, v) = (heads(0)?, heads(1)?, heads(2)?);
            let (k, v) = match cache.layers[l].take() {
                Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
                None => (k, v),
            };
            cache.layers[l] = Some((k.clone(), v.clone()));
            let mut scores = (q.matmul(&k.t()?)? / (hd as f64).sqrt())?;
            if let Some(m) = &mask {
                scores = scores.broadcast_add(m)?;
            }
            let e = scores.broadcast_sub(&scores.max_keepdim(D::Minus1)?)?.exp()?;
            let p = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
            let y = p.matmul(&v)?.transpose(1, 2)?.contiguous()?.reshape((1, s, d))?;
            x = (x + affine(&y, &w[4], &w[5])?)?;
            let h2 = layer_norm(&x, &w[6], &w[7])?;
            x = (&x + affine(&affine(&h2, &w[8], &w[9])?.gelu()?, &w[10], &w[11])?)?;
        }
        cache.len += s;
        let h = layer_norm(&x, &self.ln_f.0, &self.ln_f.1)?;
        h.broadcast_matmul(&self.wte.t()?)?.squeeze(0)
    }
}
