//! Inference for `generate`: a Llama's forward over new tokens with a key/value cache, composed of
//! candle ops (CPU or GPU, f32), from weights under transformers' names (a model directory, a
//! safetensors file, a GGUF file through the library's [`WeightFiles`]; experts as `open_weights`
//! presents them): query/key norms and mixtures of experts (routed as training routes them) included.
//!
//! Training's blocks recompute the whole sequence; here each new token attends to the cached keys and
//! values of the earlier ones, so a token costs one pass over the weights, not a pass over the context.
//! Sampling and the cache are `crate::infer`'s.

use super::LlamaConfig;
use crate::ops::rms_norm::rms_norm;
use crate::ops::rope::{inv_freq, rope_composed, tables};
use candle_core::{DType, Device, Result, Tensor, D};
use crate::infer::{load, Generator, KvCache};
use ferrospeed::checkpoint::WeightFiles;

struct LayerWeights {
    input_norm: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Option<(Tensor, Tensor, Tensor)>,
    o: Tensor,
    o_bias: Option<Tensor>,
    post_norm: Tensor,
    /// The query and key norms (Qwen3: per head; OLMoE: over the projection).
    qk_norm: Option<(Tensor, Tensor)>,
    mlp: Mlp,
}

/// A layer's MLP: dense, or a router with its experts (and a shared expert).
enum Mlp {
    Dense {
        gate: Tensor,
        up: Tensor,
        down: Tensor,
        /// gate, up, down biases.
        bias: Option<(Tensor, Tensor, Tensor)>,
    },
    Sparse {
        router: Tensor,
        /// Each expert's gate/up `[2f, d]` and down `[d, f]`.
        experts: Vec<(Tensor, Tensor)>,
        /// The shared expert's gate, up, down and gate weight.
        shared: Option<[Tensor; 4]>,
    },
}

/// A Llama ready to generate.
pub struct LlamaInfer {
    pub cfg: LlamaConfig,
    embed: Tensor,
    layers: Vec<LayerWeights>,
    norm: Tensor,
    head: Tensor,
    cos: Tensor,
    sin: Tensor,
    device: Device,
}

fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    x.broadcast_matmul(&w.t()?)
}

/// `x·wᵀ (+ b)`.
fn linear_b(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let y = linear(x, w)?;
    match b {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

impl LlamaInfer {
    /// The model `cfg` from `files` (transformers' names), on `device`, for contexts up to `max_len`.
    pub fn load(cfg: LlamaConfig, files: &mut WeightFiles, device: &Device, max_len: usize) -> std::result::Result<Self, String> {
        let get = |files: &mut WeightFiles, name: &str| load(files, name, device);
        let mut layers = Vec::with_capacity(cfg.n_layer);
        for l in 0..cfg.n_layer {
            let p = |s: &str| format!("model.layers.{l}.{s}");
            let bias = if cfg.attention_bias {
                Some((get(files, &p("self_attn.q_proj.bias"))?, get(files, &p("self_attn.k_proj.bias"))?, get(files, &p("self_attn.v_proj.bias"))?))
            } else {
                None
            };
            let o_bias = if cfg.o_proj_bias { Some(get(files, &p("self_attn.o_proj.bias"))?) } else { None };
            let mlp = match cfg.moe.filter(|_| cfg.is_sparse(l)) {
                // Experts under our names: `files` presents either layout as them (`open_weights`).
                Some(m) => Mlp::Sparse {
                    router: get(files, &p("mlp.gate.weight"))?,
                    experts: (0..m.num_experts)
                        .map(|e| Ok((get(files, &p(&format!("mlp.experts.{e}.gate_up_proj")))?, get(files, &p(&format!("mlp.experts.{e}.down_proj")))?)))
                        .collect::<std::result::Result<_, String>>()?,
                    shared: if m.d_shared > 0 {
                        Some([
                            get(files, &p("mlp.shared_expert.gate_proj.weight"))?,
                            get(files, &p("mlp.shared_expert.up_proj.weight"))?,
                            get(files, &p("mlp.shared_expert.down_proj.weight"))?,
                            get(files, &p("mlp.shared_expert_gate.weight"))?,
                        ])
                    } else {
                        None
                    },
                },
                None => Mlp::Dense {
                    gate: get(files, &p("mlp.gate_proj.weight"))?,
                    up: get(files, &p("mlp.up_proj.weight"))?,
                    down: get(files, &p("mlp.down_proj.weight"))?,
                    bias: if cfg.mlp_bias {
                        Some((get(files, &p("mlp.gate_proj.bias"))?, get(files, &p("mlp.up_proj.bias"))?, get(files, &p("mlp.down_proj.bias"))?))
                    } else {
                        None
                    },
                },
            };
            let qk_norm = match cfg.qk_norm {
                super::QkNorm::None => None,
                _ => Some((get(files, &p("self_attn.q_norm.weight"))?, get(files, &p("self_attn.k_norm.weight"))?)),
            };
            layers.push(LayerWeights {
                input_norm: get(files, &p("input_layernorm.weight"))?,
                q: get(files, &p("self_attn.q_proj.weight"))?,
                k: get(files, &p("self_attn.k_proj.weight"))?,
                v: get(files, &p("self_attn.v_proj.weight"))?,
                bias,
                o: get(files, &p("self_attn.o_proj.weight"))?,
                o_bias,
                post_norm: get(files, &p("post_attention_layernorm.weight"))?,
                qk_norm,
                mlp,
            });
        }
        let embed = get(files, "model.embed_tokens.weight")?;
        let head = if cfg.tie_word_embeddings { embed.clone() } else { get(files, "lm_head.weight")? };
        let norm = get(files, "model.norm.weight")?;
        let (cos, sin) = tables(&inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling), max_len, device).map_err(|e| e.to_string())?;
        Ok(Self { cfg, embed, layers, norm, head, cos, sin, device: device.clone() })
    }

}

impl LlamaInfer {
    /// A layer's MLP on `h` `[1, s, d]`; experts as training routes them (`moe::route`, dropless:
    /// no capacity at inference), each expert's SwiGLU once over all the tokens routed to it.
    fn mlp(&self, mlp: &Mlp, h: &Tensor) -> Result<Tensor> {
        match mlp {
            Mlp::Dense { gate, up, down, bias } => {
                let b = bias.as_ref();
                let act = (linear_b(h, gate, b.map(|b| &b.0))?.silu()? * linear_b(h, up, b.map(|b| &b.1))?)?;
                linear_b(&act, down, b.map(|b| &b.2))
            }
            Mlp::Sparse { router, experts, shared } => {
                let Some(m) = self.cfg.moe else { candle_core::bail!("experts in a model without [moe]") };
                let m = super::MoeConfig { capacity_factor: None, ..m };
                let (_, s, d) = h.dims3()?;
                let flat = h.reshape((s, d))?;
                let shared = shared.as_ref().map(|[g, u, dn, gw]| [g, u, dn, gw]);
                let r = super::moe::route(&m, &super::moe::RouterParams { router, shared }, &flat)?;
                let weights = r.weights.flatten_all()?;
                // Each expert over the tokens routed to it (in token order), weighted, added in.
                let k = m.top_k;
                let mut routed: Vec<(Vec<u32>, Vec<u32>)> = vec![(Vec::new(), Vec::new()); experts.len()];
                for (i, row) in r.experts.to_vec2::<u32>()?.iter().enumerate() {
                    for (j, &e) in row.iter().enumerate() {
                        routed[e as usize].0.push(i as u32);
                        routed[e as usize].1.push((i * k + j) as u32);
                    }
                }
                let mut y = match r.shared {
                    Some(shared) => shared,
                    None => flat.zeros_like()?,
                };
                for ((gu, dn), (tokens, slots)) in experts.iter().zip(routed) {
                    if tokens.is_empty() {
                        continue;
                    }
                    let (n, f) = (tokens.len(), dn.dim(1)?);
                    let tokens = Tensor::from_vec(tokens, n, &self.device)?;
                    let w = weights.index_select(&Tensor::from_vec(slots, n, &self.device)?, 0)?.reshape((n, 1))?;
                    let out = super::moe::swiglu(&flat.index_select(&tokens, 0)?, &gu.narrow(0, 0, f)?, &gu.narrow(0, f, f)?, dn)?;
                    y = y.index_add(&tokens, &out.broadcast_mul(&w)?, 0)?;
                }
                y.reshape((1, s, d))
            }
        }
    }
}

impl Generator for LlamaInfer {
    fn max_len(&self) -> usize {
        self.cos.dims()[0]
    }

    fn forward(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Tensor> {
        let c = &self.cfg;
        let (s, p0) = (tokens.len(), cache.len);
        if p0 + s > self.cos.dim(0)? {
            candle_core::bail!("generate: {} tokens exceed the context of {}", p0 + s, self.cos.dim(0)?)
        }
        if cache.layers.is_empty() {
            cache.layers = vec![None; c.n_layer];
        }
        let (nh, nkv, hd) = (c.n_head, c.n_kv_head, c.head_dim);
        let ids = Tensor::new(tokens, &self.device)?;
        let mut x = self.embed.index_select(&ids, 0)?.unsqueeze(0)?; // [1, s, d]
        let (cos, sin) = (self.cos.narrow(0, p0, s)?, self.sin.narrow(0, p0, s)?);
        // Query i (position p0 + i) sees keys 0 ..= p0 + i.
        let mask = if s > 1 {
            let m: Vec<f32> = (0..s).flat_map(|i| (0..p0 + s).map(move |j| if j > p0 + i { f32::NEG_INFINITY } else { 0.0 })).collect();
            Some(Tensor::from_vec(m, (1, 1, s, p0 + s), &self.device)?)
        } else {
            None
        };
        for (l, w) in self.layers.iter().enumerate() {
            let h = rms_norm(&x, &w.input_norm, c.rms_norm_eps)?;
            // The query and key norms before RoPE: per head (Qwen3) or over the projection (OLMoE).
            let normed = |y: Tensor, norm: Option<&Tensor>, n: usize| -> Result<Tensor> {
                match (norm, c.qk_norm) {
                    (Some(nw), super::QkNorm::PerHead) => rms_norm(&y.reshape((1, s, n, hd))?, nw, c.rms_norm_eps)?.reshape((1, s, n * hd)),
                    (Some(nw), super::QkNorm::Full) => rms_norm(&y, nw, c.rms_norm_eps),
                    _ => Ok(y),
                }
            };
            let heads = |y: Tensor, n: usize| -> Result<Tensor> { y.reshape((1, s, n, hd))?.transpose(1, 2)?.contiguous() };
            let b = w.bias.as_ref();
            let qn = w.qk_norm.as_ref();
            let q = rope_composed(&heads(normed(linear_b(&h, &w.q, b.map(|b| &b.0))?, qn.map(|n| &n.0), nh)?, nh)?, &cos, &sin)?;
            let k = rope_composed(&heads(normed(linear_b(&h, &w.k, b.map(|b| &b.1))?, qn.map(|n| &n.1), nkv)?, nkv)?, &cos, &sin)?;
            let proj = |wt: &Tensor, b: Option<&Tensor>, n: usize| -> Result<Tensor> { heads(linear_b(&h, wt, b)?, n) };
            let v = proj(&w.v, b.map(|b| &b.2), nkv)?;
            let (k, v) = match cache.layers[l].take() {
                Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
                None => (k, v),
            };
            cache.layers[l] = Some((k.clone(), v.clone()));
            let t = p0 + s;
            // Grouped query heads: [1, nkv, g·s, hd] against [1, nkv, t, hd].
            let g = nh / nkv;
            let qg = q.reshape((1, nkv, g * s, hd))?;
            let mut scores = (qg.matmul(&k.t()?)? / (hd as f64).sqrt())?.reshape((1, nh, s, t))?;
            if let Some(m) = &mask {
                scores = scores.broadcast_add(m)?;
            }
            let max = scores.max_keepdim(D::Minus1)?;
            let e = scores.broadcast_sub(&max)?.exp()?;
            let p = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
            let y = p.reshape((1, nkv, g * s, t))?.matmul(&v)?.reshape((1, nh, s, hd))?;
            let y = y.transpose(1, 2)?.contiguous()?.reshape((1, s, nh * hd))?;
            x = (x + linear_b(&y, &w.o, w.o_bias.as_ref())?)?;
            let h2 = rms_norm(&x, &w.post_norm, c.rms_norm_eps)?;
            x = (x + self.mlp(&w.mlp, &h2)?)?;
        }
        cache.len += s;
        let h = rms_norm(&x, &self.norm, c.rms_norm_eps)?;
        linear(&h, &self.head)?.squeeze(0)?.to_dtype(DType::F32)
    }
}

