//! Mixture-of-experts MLPs for the Llama family (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE), as
//! transformers 5 computes them: the router's logits `h·Wᵣᵀ`, their softmax in f32, the top-k
//! experts of each token (their probabilities renormalised where `norm_topk_prob` says, as Mixtral
//! always does) — composed of candle ops in the sparse layer, differentiated by autograd — then each
//! expert a SwiGLU over the tokens routed to it, weighted by the token's probability (the experts'
//! block, `experts.rs`, whose experts expert parallelism spreads over ranks); a shared expert gated
//! by `sigmoid(h·w_gᵀ)` (Qwen2-MoE) added to every token. Dropless: every token reaches its k
//! experts (the routing is read to the host to group the tokens), unless a capacity is set.
//!
//! The load-balancing loss (transformers' `load_balancing_loss_func`: `E · Σₑ fₑ · Pₑ` over the router
//! logits of every sparse layer concatenated) is not separable by layer, so each sparse layer writes its
//! selection counts and probability sums `[E]` into its row of two `[L, E]` tensors that travel with
//! the hidden state from block to block, and the head turns them into the loss (and the router's load
//! statistic, `moe_max_load`).

use candle_core::{DType, Result, Tensor};

/// The mixture-of-experts part of a Llama-family config.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct MoeConfig {
    /// Routed experts per sparse layer (`num_local_experts` / `num_experts`).
    pub num_experts: usize,
    /// Experts per token (`num_experts_per_tok`).
    pub top_k: usize,
    /// Width of each expert's SwiGLU (`moe_intermediate_size`, Mixtral and OLMoE: `intermediate_size`).
    pub d_expert: usize,
    /// Renormalise the top-k probabilities to sum to 1 (`norm_topk_prob`; Mixtral always does).
    pub norm_topk_prob: bool,
    /// Width of the shared expert (`shared_expert_intermediate_size`; 0: none).
    pub d_shared: usize,
    /// Every `sparse_step`-th layer is sparse (`decoder_sparse_step`: layer `i` when `(i + 1) % step == 0`).
    pub sparse_step: usize,
    /// The first layers stay dense (`first_k_dense_replace`).
    pub first_dense: usize,
    /// Layers that stay dense (`mlp_only_layers`), one bit each.
    pub mlp_only: u128,
    /// Weight of the load-balancing loss (`router_aux_loss_coef`).
    pub aux_coef: f64,
    /// Add the load-balancing loss to the loss (`moe.aux_loss`; transformers: `output_router_logits`).
    pub aux_loss: bool,
    /// Weight of the router z-loss (`moe.z_loss_coef`, ST-MoE: the mean over every sparse layer's
    /// tokens of `logsumexp(router logits)²`); 0: none.
    pub z_loss_coef: f64,
    /// Tokens an expert takes at most, `⌈factor · n · k / E⌉` of a layer's `n` (`moe.capacity_factor`):
    /// the ones routed to it after that, in token order, are dropped for it (their residual passes).
    /// `None`: dropless.
    pub capacity_factor: Option<f64>,
}

impl MoeConfig {
    /// Whether layer `i` has experts (else a dense MLP of the config's `d_ff`).
    pub fn is_sparse(&self, i: usize) -> bool {
        i >= self.first_dense && (i >= 128 || self.mlp_only & (1u128 << i) == 0) && (i + 1) % self.sparse_step.max(1) == 0
    }

    /// How many of `n_layer` layers are sparse.
    pub fn sparse_layers(&self, n_layer: usize) -> usize {
        (0..n_layer).filter(|&i| self.is_sparse(i)).count()
    }
}

/// A sparse layer's router and shared expert (the routed experts are a block of their own,
/// `experts.rs`).
pub struct RouterParams<'a> {
    /// `[E, d]`.
    pub router: &'a Tensor,
    /// The shared expert's gate `[s, d]`, up `[s, d]`, down `[d, s]` and gate weight `[1, d]`.
    pub shared: Option<[&'a Tensor; 4]>,
}

/// What a sparse layer's router decides for its `n` tokens, and its terms of the load-balancing loss.
pub struct Routing {
    /// Each token's k experts, best first (`[n, k]` u32; `E` where the capacity dropped the pair).
    pub experts: Tensor,
    /// Their weights (`[n, k]`, the hidden state's dtype; the renormalised probabilities where the
    /// config says), with the router's gradient.
    pub weights: Tensor,
    /// The gated shared expert's output `[n, d]` (Qwen2-MoE), if any.
    pub shared: Option<Tensor>,
    /// Each expert's selections `[E]` (no gradient).
    pub counts: Tensor,
    /// Each expert's probability sum `[E]`.
    pub prob_sums: Tensor,
    /// `Σ_tokens logsumexp(logits)²` (the z-loss's sum) and the token-expert pairs dropped by the
    /// capacity, `[2]`: the first with a gradient, the second without.
    pub extras: Tensor,
}

pub(super) fn swiglu(x: &Tensor, gate: &Tensor, up: &Tensor, down: &Tensor) -> Result<Tensor> {
    (x.matmul(&gate.t()?)?.silu()? * x.matmul(&up.t()?)?)?.matmul(&down.t()?)
}

/// The router of a sparse layer on `h` `[n, d]`: logits `h·Wᵣᵀ`, their softmax in f32, each token's
/// top k (ties: the lower expert, as torch.topk on CPU), renormalised where `norm_topk_prob` says;
/// with a capacity, the pairs past it dropped per expert in token order; the shared expert.
pub fn route(cfg: &MoeConfig, p: &RouterParams<'_>, h: &Tensor) -> Result<Routing> {
    let n = h.dim(0)?;
    let (e_count, k) = (cfg.num_experts, cfg.top_k);
    let logits = h.matmul(&p.router.t()?)?.to_dtype(DType::F32)?;
    let probs = crate::ops::composed::softmax_last_dim(&logits)?;
    let rows: Vec<Vec<f32>> = probs.to_vec2()?;
    let mut experts: Vec<Vec<u32>> = rows
        .iter()
        .map(|r| {
            let mut order: Vec<u32> = (0..e_count as u32).collect();
            order.sort_by(|&a, &b| r[b as usize].total_cmp(&r[a as usize]).then(a.cmp(&b)));
            order.truncate(k);
            order
        })
        .collect();
    let flat: Vec<u32> = experts.iter().enumerate().flat_map(|(i, ex)| ex.iter().map(move |&e| (i * e_count) as u32 + e)).collect();
    let flat_t = Tensor::from_vec(flat, n * k, h.device())?;
    let mut weights = probs.flatten_all()?.index_select(&flat_t, 0)?.reshape((n, k))?;
    if cfg.norm_topk_prob {
        weights = weights.broadcast_div(&weights.sum_keepdim(1)?)?;
    }
    let weights = weights.to_dtype(h.dtype())?;
    let mut counts = vec![0f32; e_count];
    for ex in &experts {
        for &e in ex {
            counts[e as usize] += 1.0;
        }
    }
    // The capacity: each expert keeps its first `c` pairs in token order; later ones are marked `E`.
    let mut dropped = 0usize;
    if let Some(c) = cfg.capacity_factor.map(|f| (f * (n * k) as f64 / e_count as f64).ceil() as usize) {
        let mut taken = vec![0usize; e_count];
        for ex in experts.iter_mut() {
            for e in ex.iter_mut() {
                taken[*e as usize] += 1;
                if taken[*e as usize] > c {
                    *e = e_count as u32;
                    dropped += 1;
                }
            }
        }
    }
    let shared = match p.shared {
        Some([g, u, dn, gate]) => Some(swiglu(h, g, u, dn)?.broadcast_mul(&sigmoid(&h.matmul(&gate.t()?)?)?)?),
        None => None,
    };
    let counts = Tensor::from_vec(counts, e_count, h.device())?;
    // logsumexp of each token's logits, the max shifted out (and detached: it cancels).
    let max = logits.max_keepdim(1)?.detach();
    let lse = (logits.broadcast_sub(&max)?.exp()?.sum_keepdim(1)?.log()? + &max)?;
    let extras = Tensor::cat(&[lse.sqr()?.sum_all()?.reshape(1)?, Tensor::new(&[dropped as f32], h.device())?], 0)?;
    let experts = Tensor::new(experts, h.device())?;
    Ok(Routing { experts, weights, shared, counts, prob_sums: probs.sum(0)?, extras })
}

/// The load-balancing loss from each sparse layer's selections and probability sums (`[L, E]`) over
/// `n` tokens a layer: `E · Σₑ (Σₗ countsₗₑ / (L·n)) · (Σₗ probsₗₑ / (L·n))`, as transformers computes it
/// over all layers' router logits concatenated.
pub fn aux_loss(counts: &Tensor, prob_sums: &Tensor, n: usize) -> Result<Tensor> {
    let (layers, experts) = counts.dims2()?;
    let rows = (layers * n) as f64;
    (counts.sum(0)? * prob_sums.sum(0)?)?.sum_all()?.affine(experts as f64 / (rows * rows), 0.0)
}

/// The router z-loss from each sparse layer's `[Σ logsumexp², dropped]` (`[L, 2]`) over `n` tokens a
/// layer: the mean of `logsumexp²` over all of them.
pub fn z_loss(extras: &Tensor, n: usize) -> Result<Tensor> {
    let layers = extras.dim(0)?;
    extras.narrow(1, 0, 1)?.sum_all()?.affine(1.0 / (layers * n) as f64, 0.0)
}

/// The share of token-expert pairs the capacity dropped, over every sparse layer (`[L, 2]` extras,
/// `n` tokens a layer, `k` experts a token).
pub fn dropped_share(extras: &Tensor, n: usize, k: usize) -> Result<Tensor> {
    let layers = extras.dim(0)?;
    extras.narrow(1, 1, 1)?.sum_all()?.affine(1.0 / (layers * n * k) as f64, 0.0)
}

/// The router's load statistic: in each sparse layer the selections of the busiest expert over their
/// mean (1 is even), averaged over the layers.
pub fn max_load(counts: &Tensor) -> Result<Tensor> {
    counts.max(1)?.broadcast_div(&counts.mean(1)?.maximum(1e-12)?)?.mean_all()
}

/// `1 / (1 + e^(−x))`.
pub(super) fn sigmoid(x: &Tensor) -> Result<Tensor> {
    (x.neg()?.exp()? + 1.0)?.recip()
}
