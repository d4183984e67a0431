//! A Llama layer: pre-RMSNorm grouped-query self-attention with rotary positions, then a SwiGLU MLP,
//! each added to the residual stream. Training runs the fused forward and the hand-written backward of
//! `layer_fused.rs`; the forward composed of candle ops stays for autograd (a caller differentiating
//! `forward` itself) and as the reference the fused one is tested against.

use super::layer_fused::{self, LayerSaved};
use super::{LlamaConfig, QkNorm, RopeCache};
use crate::ops::causal_softmax;
use crate::ops::docs::Docs;
use super::layer_fused::row_tables;
use crate::ops::lora::{self, Adapter, LayerLora, MODULES};
use crate::ops::rms_norm::rms_norm;
use crate::ops::rope::rope_composed;
use candle_core::{Result, Tensor};
use ferrospeed::engine::{Batch, Block, ContextGroup, Init, ParamGrads, ParamRef, ParamSpec, Saved, TensorGroup, TpSplit, Upstream, WeightGrads};
use std::sync::{Arc, OnceLock};

/// Layer `index` of the model.
#[derive(Debug, Clone)]
pub struct Layer {
    pub(super) cfg: LlamaConfig,
    pub(super) index: usize,
    pub(super) rope: Arc<RopeCache>,
    /// LoRA adapters: the base's parameters are then frozen.
    lora: Option<LayerLora>,
    /// The tensor-parallel group, where the engine split the layer over one.
    tp: OnceLock<TensorGroup>,
    /// The context-parallel group, where each rank holds a chunk of every sequence.
    cp: OnceLock<ContextGroup>,
}

/// Slot positions of the layer's parameters, in `Layer::params` order: the norms and weights, with
/// the biases transformers' config asks for (`attention_bias`: q/k/v and, in Llama, o_proj;
/// `mlp_bias`: gate/up/down) after the weights of their part.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Slots {
    pub input_norm: usize,
    pub q: usize,
    pub k: usize,
    pub v: usize,
    /// The q, k and v biases (three slots from here).
    pub bias: Option<usize>,
    pub o: usize,
    pub o_bias: Option<usize>,
    pub post_norm: usize,
    pub gate: usize,
    pub up: usize,
    pub down: usize,
    /// The gate, up and down biases (three slots from here).
    pub mlp_bias: Option<usize>,
}

impl Slots {
    pub(crate) fn of(cfg: &LlamaConfig) -> Self {
        let qkv_bias = cfg.attention_bias.then_some(4);
        let o = 4 + 3 * usize::from(cfg.attention_bias);
        let o_bias = cfg.o_proj_bias.then_some(o + 1);
        let post_norm = o + 1 + usize::from(cfg.o_proj_bias);
        let (gate, up, down) = (post_norm + 1, post_norm + 2, post_norm + 3);
        Slots { input_norm: 0, q: 1, k: 2, v: 3, bias: qkv_bias, o, o_bias, post_norm, gate, up, down, mlp_bias: cfg.mlp_bias.then_some(down + 1) }
    }

    /// How many slots the base layer has (the adapters' come after them).
    pub(crate) fn base_len(&self) -> usize {
        self.mlp_bias.map_or(self.down + 1, |b| b + 3)
    }
}

/// The adapter slots of each of [`MODULES`] (A, then B, for each adapted module in order, after the
/// base's slots).
pub(crate) fn adapters(cfg: &LlamaConfig, lora: Option<&LayerLora>) -> [Option<Adapter>; 7] {
    let mut out = [None; 7];
    if let Some(l) = lora {
        let mut at = Slots::of(cfg).base_len();
        for m in 0..MODULES.len() {
            if l.targets[m] {
                out[m] = Some(Adapter { a: at });
                at += 2;
            }
        }
    }
    out
}

/// How many slots a layer has: the base's, then two for each adapted module. The step may pass more
/// tensors after them: the stacked views of [`stacked_runs`].
pub(crate) fn slot_count(cfg: &LlamaConfig, lora: Option<&LayerLora>) -> usize {
    Slots::of(cfg).base_len() + lora.map_or(0, |l| 2 * l.targets.iter().filter(|&&on| on).count())
}

/// The slot runs read as one matrix: q, k, v and gate, up (`Block::stacked_runs`).
pub(crate) fn stacked_runs(cfg: &LlamaConfig) -> [std::ops::Range<usize>; 2] {
    let s = Slots::of(cfg);
    [s.q..s.v + 1, s.gate..s.up + 1]
}

/// Each of [`MODULES`]' `(in, out)` features.
pub(crate) fn module_dims(c: &LlamaConfig) -> [(usize, usize); 7] {
    let (d, q, kv, f) = (c.d_model, c.n_head * c.head_dim, c.n_kv_head * c.head_dim, c.d_ff);
    [(d, q), (d, kv), (d, kv), (q, d), (d, f), (d, f), (f, d)]
}

impl Layer {
    pub(crate) fn new(cfg: LlamaConfig, index: usize, rope: Arc<RopeCache>, lora: Option<LayerLora>) -> Self {
        Self { cfg, index, rope, lora, tp: OnceLock::new(), cp: OnceLock::new() }
    }

    /// The tensor-parallel group (a group of one where the layer is whole).
    fn group(&self) -> TensorGroup {
        self.tp.get().cloned().unwrap_or_default()
    }

    /// The context-parallel group (a group of one where the layer holds whole sequences).
    fn context(&self) -> ContextGroup {
        self.cp.get().cloned().unwrap_or_default()
    }

    /// The micro-batch's (batch, sequence) dimensions: the input's, or under sequence parallelism
    /// (where the input holds this rank's token rows) the batch's tokens'.
    fn dims(&self, x: &Tensor, batch: &Batch) -> Result<(usize, usize)> {
        if self.group().sequence_parallel() || self.cp.get().is_some() {
            return batch.get("tokens")?.dims2();
        }
        let (b, t, _) = x.dims3()?;
        Ok((b, t))
    }

    /// The shape this rank computes: under tensor parallelism its share of the query and key/value
    /// heads and of the MLP's width.
    fn local(&self) -> LlamaConfig {
        let tp = self.tp.get().map_or(1, TensorGroup::size);
        LlamaConfig { n_head: self.cfg.n_head / tp, n_kv_head: self.cfg.n_kv_head / tp, d_ff: self.cfg.d_ff / tp, ..self.cfg }
    }

    /// The hand-written backward: the input's gradient, the slots' into `grads`.
    fn backward_into(&self, p: &[Tensor], saved: Saved, upstream: Upstream<'_>, grads: &mut ParamGrads) -> Result<Vec<Option<Tensor>>> {
        let g = upstream.grad(0)?;
        let saved = saved.downcast::<LayerSaved>().map_err(|_| candle_core::Error::Msg("layer backward: foreign saved state".into()))?;
        let (cos, sin) = self.rope.get(&self.cfg, saved.seq_len(), g.device())?;
        Ok(vec![Some(layer_fused::backward(&self.local(), p, *saved, g, (&cos, &sin), self.lora.as_ref(), (&self.group(), &self.context()), grads)?)])
    }
}

impl Block for Layer {
    fn name(&self) -> String {
        format!("layers.{}", self.index)
    }

    fn params(&self) -> Vec<ParamRef> {
        let c = &self.cfg;
        let (d, q, kv, f) = (c.d_model, c.n_head * c.head_dim, c.n_kv_head * c.head_dim, c.d_ff);
        let w = Init::Normal { std: c.initializer_range };
        // With LoRA the base is frozen.
        let p = |name: &str, shape: &[usize], init: Init, decay: bool| {
            let spec = ParamSpec::new(name, shape, init, decay);
            // The projections are linear layers (what an NF4 base quantises).
            let spec = if name.ends_with("_proj.weight") { spec.as_linear() } else { spec };
            if self.lora.is_some() {
                ParamRef::Frozen(spec)
            } else {
                ParamRef::Own(spec)
            }
        };
        let mut params = vec![
            p("input_layernorm.weight", &[d], Init::Ones, false),
            p("self_attn.q_proj.weight", &[q, d], w, true),
            p("self_attn.k_proj.weight", &[kv, d], w, true),
            p("self_attn.v_proj.weight", &[kv, d], w, true),
        ];
        if c.attention_bias {
            params.push(p("self_attn.q_proj.bias", &[q], Init::Zeros, false));
            params.push(p("self_attn.k_proj.bias", &[kv], Init::Zeros, false));
            params.push(p("self_attn.v_proj.bias", &[kv], Init::Zeros, false));
        }
        params.push(p("self_attn.o_proj.weight", &[d, q], w, true));
        if c.o_proj_bias {
            params.push(p("self_attn.o_proj.bias", &[d], Init::Zeros, false));
        }
        params.push(p("post_attention_layernorm.weight", &[d], Init::Ones, false));
        match c.moe.filter(|_| self.sparse()) {
            // The router and the shared expert (the routed experts are the next block, `experts.rs`).
            Some(m) => {
                let (e, s) = (m.num_experts, m.d_shared);
                params.push(p("mlp.gate.weight", &[e, d], w, true));
                if s > 0 {
                    params.extend([
                        p("mlp.shared_expert.gate_proj.weight", &[s, d], w, true),
                        p("mlp.shared_expert.up_proj.weight", &[s, d], w, true),
                        p("mlp.shared_expert.down_proj.weight", &[d, s], w, true),
                        p("mlp.shared_expert_gate.weight", &[1, d], w, true),
                    ]);
                }
            }
            None => {
                params.extend([p("mlp.gate_proj.weight", &[f, d], w, true), p("mlp.up_proj.weight", &[f, d], w, true), p("mlp.down_proj.weight", &[d, f], w, true)]);
                if c.mlp_bias {
                    params.push(p("mlp.gate_proj.bias", &[f], Init::Zeros, false));
                    params.push(p("mlp.up_proj.bias", &[f], Init::Zeros, false));
                    params.push(p("mlp.down_proj.bias", &[d], Init::Zeros, false));
                }
            }
        }
        // Query and key norms after the MLP's slots (the dense layout's positions stay).
        match c.qk_norm {
            QkNorm::None => {}
            QkNorm::PerHead => params.extend([p("self_attn.q_norm.weight", &[c.head_dim], Init::Ones, false), p("self_attn.k_norm.weight", &[c.head_dim], Init::Ones, false)]),
            QkNorm::Full => params.extend([p("self_attn.q_norm.weight", &[q], Init::Ones, false), p("self_attn.k_norm.weight", &[kv], Init::Ones, false)]),
        }
        if let Some(l) = &self.lora {
            // PEFT's initialisation: A Kaiming-uniform (a = √5: U(±1/√in)), B zero.
            for (m, (inp, out)) in module_dims(c).into_iter().enumerate().filter(|&(m, _)| l.targets[m]) {
                let bound = 1.0 / (inp as f64).sqrt();
                let spec = |w: &str, shape: &[usize], init| ParamRef::Own(ParamSpec::new(&format!("{}.{w}.weight", MODULES[m]), shape, init, true));
                params.push(spec("lora_A", &[l.shape.r, inp], Init::Uniform { lo: -bound, hi: bound }));
                params.push(spec("lora_B", &[out, l.shape.r], Init::Zeros));
            }
        }
        params
    }

    fn forward(&self, p: &[Tensor], inputs: &[Tensor], batch: &Batch) -> Result<Vec<Tensor>> {
        let x = input(inputs)?;
        let docs = Docs::of(batch)?;
        if self.composed_only() {
            return self.forward_extended(p, inputs, docs.as_ref());
        }
        if x.track_op() || p.iter().any(Tensor::track_op) {
            if self.tp.get().is_some() || self.cp.get().is_some() {
                candle_core::bail!("a layer split over a tensor- or context-parallel group runs its fused forward and hand-written backward, not autograd");
            }
            return Ok(vec![self.forward_composed(p, x, docs.as_ref())?]);
        }
        let (group, dims) = (self.group(), self.dims(x, batch)?);
        let (cos, sin) = self.rope.get(&self.cfg, dims.1, x.device())?;
        Ok(vec![layer_fused::forward(&self.local(), p, x, dims, (&cos, &sin), docs.as_ref(), self.lora.as_ref(), (&group, &self.context()), false)?.0])
    }

    fn forward_saving(&self, p: &[Tensor], x: &[Tensor], batch: &Batch) -> Result<Option<(Vec<Tensor>, Saved)>> {
        if self.composed_only() {
            return Ok(None);
        }
        let x = input(x)?;
        let (group, dims) = (self.group(), self.dims(x, batch)?);
        let (cos, sin) = self.rope.get(&self.cfg, dims.1, x.device())?;
        let (y, saved) = layer_fused::forward(&self.local(), p, x, dims, (&cos, &sin), Docs::of(batch)?.as_ref(), self.lora.as_ref(), (&group, &self.context()), true)?;
        let saved = saved.ok_or_else(|| candle_core::Error::Msg("layer forward kept nothing".into()))?;
        Ok(Some((vec![y], Box::new(saved))))
    }

    fn backward(&self, p: &[Tensor], saved: Saved, upstream: Upstream<'_>) -> Result<(Vec<Option<Tensor>>, Vec<Option<Tensor>>)> {
        ParamGrads::whole(slot_count(&self.cfg, self.lora.as_ref()), |grads| self.backward_into(p, saved, upstream, grads))
    }

    fn backward_split(&self, p: &[Tensor], saved: Saved, upstream: Upstream<'_>) -> Result<(WeightGrads, Vec<Option<Tensor>>)> {
        ParamGrads::split(slot_count(&self.cfg, self.lora.as_ref()), |grads| self.backward_into(p, saved, upstream, grads))
    }

    /// Megatron's split: q, k, v and gate, up column-parallel (by heads and by the MLP's width, with
    /// their biases), o and down row-parallel (their biases added once, after the sum), norms whole.
    fn tensor_plan(&self) -> Vec<TpSplit> {
        use TpSplit::{Cols, Replicated, Rows};
        let n = self.params().len();
        if self.composed_only() {
            return vec![Replicated; n];
        }
        let (c, s) = (&self.cfg, Slots::of(&self.cfg));
        let mut plan = vec![Replicated; n];
        for i in [s.q, s.k, s.v, s.gate, s.up] {
            plan[i] = Rows;
        }
        for i in [s.o, s.down] {
            plan[i] = Cols;
        }
        if let Some(b0) = s.bias {
            plan[b0..b0 + 3].fill(Rows);
        }
        if let Some(b0) = s.mlp_bias.filter(|_| c.mlp_bias) {
            plan[b0..b0 + 2].fill(Rows);
        }
        plan
    }

    fn bind_tensors(&self, group: TensorGroup) -> std::result::Result<(), String> {
        let (c, tp) = (&self.cfg, group.size());
        if self.composed_only() {
            return Err(format!("tensor parallelism of query/key-norm and mixture-of-experts layers is not built yet: set parallel.tp = 1 (parallel.tp = {tp})"));
        }
        for (what, n) in [("query heads (num_attention_heads)", c.n_head), ("key/value heads (num_key_value_heads)", c.n_kv_head), ("MLP width (intermediate_size)", c.d_ff)] {
            if n % tp != 0 {
                let fits: Vec<usize> = (1..=c.n_kv_head).filter(|d| c.n_head % d == 0 && c.n_kv_head % d == 0 && c.d_ff % d == 0).collect();
                return Err(format!("{n} {what}, which parallel.tp = {tp} does not divide: choose parallel.tp among {fits:?}"));
            }
        }
        self.tp.set(group).map_err(|_| "bound to a tensor-parallel group twice".to_string())
    }

    fn bind_context(&self, group: ContextGroup) -> std::result::Result<(), String> {
        // Under tensor parallelism (bound first) Ulysses spreads this rank's share of the heads.
        let (c, cp) = (&self.local(), group.size());
        if self.composed_only() {
            return Err(format!("context parallelism of query/key-norm and mixture-of-experts layers is not built yet: set parallel.cp = 1 (parallel.cp = {cp})"));
        }
        if self.group().sequence_parallel() {
            return Err(format!("parallel.sp with parallel.cp = {cp} is not built yet: set parallel.sp = false or parallel.cp = 1"));
        }
        for (what, n) in [("query heads (num_attention_heads)", c.n_head), ("key/value heads (num_key_value_heads)", c.n_kv_head)] {
            // Ring attention keeps every head on every rank.
            if n % cp != 0 && !group.ring() {
                let fits: Vec<usize> = (1..=c.n_kv_head).filter(|d| c.n_head % d == 0 && c.n_kv_head % d == 0).collect();
                return Err(format!("{n} {what}, which parallel.cp = {cp} does not divide (Ulysses gives each rank whole heads): choose parallel.cp among {fits:?}, or parallel.cp_kind = \"ring\""));
            }
        }
        self.cp.set(group).map_err(|_| "bound to a context-parallel group twice".to_string())
    }

    fn stacked_runs(&self) -> Vec<std::ops::Range<usize>> {
        if self.composed_only() {
            return Vec::new();
        }
        stacked_runs(&self.cfg).into()
    }

    fn forward_flops_per_token(&self) -> f64 {
        let c = &self.cfg;
        let (d, q, w, f, t) = (c.d_model as f64, (c.n_head * c.head_dim) as f64, c.qkv_width() as f64, c.d_ff as f64, c.seq_len as f64);
        // The adapters: x·Aᵀ and u·Bᵀ for each adapted module.
        let adapters: f64 = self.lora.map_or(0.0, |l| {
            module_dims(c).iter().zip(l.targets).filter(|(_, on)| *on).map(|((i, o), _)| 2.0 * (l.shape.r * (i + o)) as f64).sum()
        });
        // An MoE layer's MLP: the router and the shared expert (the routed experts are a block of their own).
        let mlp = match c.moe.filter(|_| self.sparse()) {
            Some(m) => (m.num_experts + 3 * m.d_shared + usize::from(m.d_shared > 0)) as f64 * d,
            None => 3.0 * d * f,
        };
        // Projections (q, k, v, o) and the MLP (gate, up, down), plus scores and weighted values.
        2.0 * (d * w + q * d + mlp) + 2.0 * 2.0 * t * q + adapters
    }
}

pub(super) fn input(x: &[Tensor]) -> Result<&Tensor> {
    x.first().ok_or_else(|| candle_core::Error::Msg("a transformer layer needs an input".into()))
}

/// `x [n, in] · w[out, in]ᵀ (+ b)`.
pub(super) fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let y = x.matmul(&w.t()?)?;
    match b {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// Causal attention of rotated `q` `[b, nh, t, hd]` over `k`, `v` `[b, nkv, t, hd]` (each K/V head
/// repeated for its query group, as transformers does), inside each document of a packed batch:
/// `[b·t, nh·hd]`.
pub(super) fn composed_attention(q: Tensor, k: Tensor, v: Tensor, docs: Option<&Docs>) -> Result<Tensor> {
    let (b, nh, t, hd) = q.dims4()?;
    let nkv = k.dim(1)?;
    let repeat = |m: Tensor| -> Result<Tensor> {
        if nh == nkv {
            return Ok(m);
        }
        m.unsqueeze(2)?.broadcast_as((b, nkv, nh / nkv, t, hd))?.reshape((b, nh, t, hd))
    };
    let (k, v) = (repeat(k)?, repeat(v)?);
    let mut scores = q.matmul(&k.t()?.contiguous()?)?;
    if let Some(d) = docs {
        scores = scores.broadcast_add(&d.mask(scores.dtype())?)?;
    }
    let y = causal_softmax(&scores, 1.0 / (hd as f64).sqrt())?.matmul(&v)?;
    y.transpose(1, 2)?.contiguous()?.reshape((b * t, nh * hd))
}

impl Layer {
    /// The rotary tables of the composed forward: `[t, hd/2]`, or per token `[b, t, hd/2]` for a
    /// packed batch.
    pub(super) fn composed_rope(&self, b: usize, t: usize, docs: Option<&Docs>, device: &candle_core::Device) -> Result<(Tensor, Tensor)> {
        let (cos, sin) = self.rope.get(&self.cfg, t, device)?;
        match docs {
            Some(_) => {
                let (c, s, _) = row_tables((&cos, &sin), docs, b, t)?;
                Ok((c.reshape((b, t, ()))?, s.reshape((b, t, ()))?))
            }
            None => Ok((cos, sin)),
        }
    }

    /// The forward composed of candle ops (differentiable by autograd), written as transformers'
    /// `LlamaDecoderLayer`: K/V heads repeated for their query groups.
    fn forward_composed(&self, p: &[Tensor], x: &Tensor, docs: Option<&Docs>) -> Result<Tensor> {
        let c = &self.cfg;
        let s = Slots::of(c);
        let (b, t, d) = x.dims3()?;
        let (nh, nkv, hd) = (c.n_head, c.n_kv_head, c.head_dim);
        let (cos, sin) = self.composed_rope(b, t, docs, x.device())?;
        let x = x.reshape((b * t, d))?;
        let ad = adapters(c, self.lora.as_ref());
        let scale = self.lora.map_or(0.0, |l| l.shape.scale());
        // A linear with its adapter, if any: base (and bias) first, then the update, as PEFT adds it.
        let adapted = |m: usize, x: &Tensor, w: &Tensor, bias: Option<&Tensor>| -> Result<Tensor> {
            let y = linear(x, w, bias)?;
            match ad[m] {
                Some(a) => y + lora::composed(x, &p[a.a], &p[a.a + 1], scale)?,
                None => Ok(y),
            }
        };
        let h = rms_norm(&x, &p[s.input_norm], c.rms_norm_eps)?;
        let bias = |i: usize| s.bias.map(|b0| &p[b0 + i]);
        let heads = |m: usize, w: &Tensor, bias: Option<&Tensor>, n: usize| -> Result<Tensor> { adapted(m, &h, w, bias)?.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous() };
        let q = rope_composed(&heads(0, &p[s.q], bias(0), nh)?, &cos, &sin)?;
        let k = rope_composed(&heads(1, &p[s.k], bias(1), nkv)?, &cos, &sin)?;
        let v = heads(2, &p[s.v], bias(2), nkv)?;
        let y = composed_attention(q, k, v, docs)?;
        let x = (x + adapted(3, &y, &p[s.o], s.o_bias.map(|i| &p[i]))?)?;
        let h = rms_norm(&x, &p[s.post_norm], c.rms_norm_eps)?;
        let mlp_bias = |i: usize| s.mlp_bias.map(|b0| &p[b0 + i]);
        let act = (adapted(4, &h, &p[s.gate], mlp_bias(0))?.silu()? * adapted(5, &h, &p[s.up], mlp_bias(1))?)?;
        (x + adapted(6, &act, &p[s.down], mlp_bias(2))?)?.reshape((b, t, d))
    }
}
