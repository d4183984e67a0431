//! The routed experts of a sparse layer as a block of their own (`layers.N.mlp.experts`), so that
//! expert parallelism can spread them over ranks: each expert's parameters are `E.gate_up_proj`
//! `[2f, d]` (gate rows, then up) and `E.down_proj` `[d, f]`, expert after expert, so a rank's share
//! of the experts is one contiguous range of the block. The layer before it routes (`moe::route`) and
//! passes the hidden state with its shared expert added, the normed input of the experts, each
//! token's k experts (as f32, so they cross a pipeline stage like any activation) and their weights.
//!
//! This block sends each routed row to the rank holding its expert (one exchange of counts, one of
//! rows), regroups the rows it got into runs of one (expert, source rank), runs the SwiGLU of every run
//! as two grouped products (`ops::grouped`: one cuBLAS grouped GEMM each on a GPU) around the SwiGLU
//! kernel, sends the outputs back, and adds them weighted into the hidden state. Its backward is
//! written by hand (the exchanges sit between autograd's graphs): the outputs' gradients travel the
//! forward's way, the inputs' gradients back. Without an expert group it holds every expert and the
//! exchanges are copies; each run's arithmetic is the same, so one rank computes what several do.
//! Under expert parallelism an expert's gradient sums the rows of its group's `ep` ranks; the block
//! averages it over them, as the engine's reduction averages each rank's over the data-parallel group.

use super::LlamaConfig;
use crate::ops::grouped::{grouped_matmul, grouped_weight_grad, Form};
use ferrospeed::engine::{Batch, Block, ExpertGroup, Init, ParamRef, ParamSpec, Saved, Upstream};
use candle_core::{Result, Tensor};
use std::sync::OnceLock;

/// The routed experts of sparse layer `index`.
#[derive(Debug)]
pub(crate) struct Experts {
    cfg: LlamaConfig,
    index: usize,
    group: OnceLock<ExpertGroup>,
}

/// What the forward keeps for the backward.
struct ExpertsSaved {
    /// Each routed pair's token and its slot in the `[n, k]` weights, in the order rows were sent.
    tokens: Tensor,
    slots: Tensor,
    /// Rows sent to each rank, and received from each.
    send: Vec<usize>,
    recv: Vec<usize>,
    /// The received rows' runs of one (local expert, source).
    runs: Runs,
    /// The experts' inputs and gate/up products (in runs), the outputs sent back, the pairs' weights.
    rows: Tensor,
    gate_up: Tensor,
    outputs: Tensor,
    weights: Tensor,
    /// `[b, t, d]` and the weights' `[n, k]`.
    shape: (usize, usize, usize),
    k: usize,
}

/// The received rows regrouped for the grouped products: runs of one (local expert, source rank),
/// experts in order and each expert's sources in rank order (the order received is by source, then
/// expert). With one rank the two orders are the same.
struct Runs {
    /// Rows of each run, and its local expert.
    lens: Vec<usize>,
    expert: Vec<usize>,
    /// The received rows in run order, and back (`None`: the same order).
    order: Option<(Tensor, Tensor)>,
}

impl Runs {
    /// `counts[source · experts + e]` rows came from `source` for local expert `e`.
    fn new(counts: &[usize], experts: usize, dev: &candle_core::Device) -> Result<Self> {
        let sources = counts.len() / experts.max(1);
        let starts: Vec<usize> = counts.iter().scan(0, |at, &c| {
            let s = *at;
            *at += c;
            Some(s)
        }).collect();
        let (mut lens, mut expert, mut order) = (Vec::new(), Vec::new(), Vec::new());
        for e in 0..experts {
            for src in 0..sources {
                let i = src * experts + e;
                lens.push(counts[i]);
                expert.push(e);
                // With one source the runs are the order received: no permutation to build.
                if sources > 1 {
                    order.extend((starts[i]..starts[i] + counts[i]).map(|r| r as u32));
                }
            }
        }
        let order = if sources > 1 {
            let mut back = vec![0u32; order.len()];
            for (at, &r) in order.iter().enumerate() {
                back[r as usize] = at as u32;
            }
            let n = order.len();
            Some((Tensor::from_vec(order, n, dev)?, Tensor::from_vec(back, n, dev)?))
        } else {
            None
        };
        Ok(Self { lens, expert, order })
    }

    /// Rows in received order → run order.
    fn to_runs(&self, rows: &Tensor) -> Result<Tensor> {
        match &self.order {
            Some((to, _)) => rows.index_select(to, 0),
            None => Ok(rows.clone()),
        }
    }

    /// Rows in run order → received order.
    fn from_runs(&self, rows: &Tensor) -> Result<Tensor> {
        match &self.order {
            Some((_, back)) => rows.index_select(back, 0),
            None => Ok(rows.clone()),
        }
    }

    /// Each run's expert's parameter `which` (0: gate/up, 1: down) of the local slots `p`.
    fn weights(&self, p: &[Tensor], which: usize) -> Vec<Tensor> {
        self.expert.iter().map(|&e| p[2 * e + which].clone()).collect()
    }
}

impl Experts {
    pub(crate) fn new(cfg: LlamaConfig, index: usize) -> Self {
        Self { cfg, index, group: OnceLock::new() }
    }

    fn group(&self) -> ExpertGroup {
        self.group.get().cloned().unwrap_or_default()
    }

    fn moe(&self) -> Result<super::MoeConfig> {
        self.cfg.moe.ok_or_else(|| candle_core::Error::Msg("experts of a model without [moe]".into()))
    }

    fn run(&self, p: &[Tensor], inputs: &[Tensor]) -> Result<(Vec<Tensor>, ExpertsSaved)> {
        let m = self.moe()?;
        let [x, h, selected, weights, rest @ ..] = inputs else { candle_core::bail!("the experts of layer {} take the layer's 7 outputs, got {}", self.index, inputs.len()) };
        let (b, t, d) = x.dims3()?;
        let (n, k) = selected.dims2()?;
        let total = m.num_experts;
        let g = self.group();
        let local = g.local_experts(total);
        // The routed pairs grouped by expert, in token order (dropped pairs are marked `total`).
        let mut routed: Vec<Vec<(u32, u32)>> = vec![Vec::new(); total];
        for (i, row) in selected.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>()?.iter().enumerate() {
            for (j, &e) in row.iter().enumerate() {
                if let Some(r) = routed.get_mut(e as usize) {
                    r.push((i as u32, (i * k + j) as u32));
                }
            }
        }
        let per_expert: Vec<usize> = routed.iter().map(Vec::len).collect();
        let send: Vec<usize> = (0..g.size()).map(|r| g.experts_of(r, total).map(|e| per_expert[e]).sum()).collect();
        let recv_counts = g.exchange_counts(&per_expert)?;
        let recv: Vec<usize> = recv_counts.chunks(local.len()).map(|c| c.iter().sum()).collect();
        let pairs: Vec<(u32, u32)> = routed.into_iter().flatten().collect();
        let dev = x.device();
        let tokens = Tensor::from_vec(pairs.iter().map(|p| p.0).collect::<Vec<u32>>(), pairs.len(), dev)?;
        let slots = Tensor::from_vec(pairs.iter().map(|p| p.1).collect::<Vec<u32>>(), pairs.len(), dev)?;
        let rows = g.exchange_rows(&h.index_select(&tokens, 0)?, &send, &recv)?;
        // The rows in runs of one (local expert, source rank), experts in order, each expert's sources
        // in rank order: a grouped product, each run with its expert's weights.
        let runs = Runs::new(&recv_counts, local.len(), dev)?;
        let xs = runs.to_runs(&rows)?;
        let h1 = grouped_matmul(&xs, &runs.weights(p, 0), &runs.lens, Form::Transposed)?;
        let act = crate::ops::swiglu::swiglu(&h1)?;
        let outputs = runs.from_runs(&grouped_matmul(&act, &runs.weights(p, 1), &runs.lens, Form::Transposed)?)?;
        let back = g.exchange_rows(&outputs, &recv, &send)?;
        let weights = weights.flatten_all()?.index_select(&slots, 0)?;
        let y = h.zeros_like()?.index_add(&tokens, &back.broadcast_mul(&weights.unsqueeze(1)?)?, 0)?;
        let out = (x + y.reshape((b, t, d))?)?;
        let saved = ExpertsSaved { tokens, slots, send, recv, runs, rows: xs, gate_up: h1, outputs: back, weights, shape: (b, t, d), k };
        debug_assert_eq!(n, b * t);
        Ok((std::iter::once(out).chain(rest.iter().cloned()).collect(), saved))
    }
}

impl Block for Experts {
    fn name(&self) -> String {
        format!("layers.{}.mlp.experts", self.index)
    }

    fn params(&self) -> Vec<ParamRef> {
        let Some(m) = self.cfg.moe else { return Vec::new() };
        let (d, f) = (self.cfg.d_model, m.d_expert);
        let w = Init::Normal { std: self.cfg.initializer_range };
        (0..m.num_experts)
            .flat_map(|e| {
                [
                    ParamRef::Own(ParamSpec::new(&format!("{e}.gate_up_proj"), &[2 * f, d], w, true).as_linear()),
                    ParamRef::Own(ParamSpec::new(&format!("{e}.down_proj"), &[d, f], w, true).as_linear()),
                ]
            })
            .collect()
    }

    fn experts(&self) -> usize {
        self.cfg.moe.map_or(0, |m| m.num_experts)
    }

    fn bind_experts(&self, group: ExpertGroup) {
        let _ = self.group.set(group);
    }

    fn forward(&self, p: &[Tensor], inputs: &[Tensor], _batch: &Batch) -> Result<Vec<Tensor>> {
        Ok(self.run(p, inputs)?.0)
    }

    fn forward_saving(&self, p: &[Tensor], inputs: &[Tensor], _batch: &Batch) -> Result<Option<(Vec<Tensor>, Saved)>> {
        let (out, saved) = self.run(p, inputs)?;
        Ok(Some((out, Box::new(saved))))
    }

    fn backward(&self, p: &[Tensor], saved: Saved, upstream: Upstream<'_>) -> Result<(Vec<Option<Tensor>>, Vec<Option<Tensor>>)> {
        let s = saved.downcast::<ExpertsSaved>().map_err(|_| candle_core::Error::Msg("experts backward: foreign saved state".into()))?;
        let g = self.group();
        let go = upstream.grad(0)?;
        let (b, t, d) = s.shape;
        let n = b * t;
        // The weights' gradient, and the outputs' sent back the forward's way.
        let gy = go.reshape((n, d))?.index_select(&s.tokens, 0)?;
        let d_weights = (&gy * &s.outputs)?.sum(1)?;
        let d_weights = Tensor::zeros(n * s.k, d_weights.dtype(), go.device())?.index_add(&s.slots, &d_weights, 0)?.reshape((n, s.k))?;
        let d_outputs = s.runs.to_runs(&g.exchange_rows(&gy.broadcast_mul(&s.weights.unsqueeze(1)?)?, &s.send, &s.recv)?)?;
        let (gu, dn) = (s.runs.weights(p, 0), s.runs.weights(p, 1));
        let act = crate::ops::swiglu::swiglu(&s.gate_up)?;
        let d_act = grouped_matmul(&d_outputs, &dn, &s.runs.lens, Form::Plain)?;
        let d_down = grouped_weight_grad(&d_outputs, &act, &s.runs.lens)?;
        let d_gate_up = crate::ops::swiglu::swiglu_backward(&s.gate_up, &d_act)?;
        let d_gu = grouped_weight_grad(&d_gate_up, &s.rows, &s.runs.lens)?;
        let d_rows = s.runs.from_runs(&grouped_matmul(&d_gate_up, &gu, &s.runs.lens, Form::Plain)?)?;
        // Each expert's gradient: its runs' added in source order.
        let mut slots: Vec<Option<Tensor>> = vec![None; p.len()];
        for (run, (dgu, ddown)) in d_gu.into_iter().zip(d_down).enumerate() {
            let e = s.runs.expert[run];
            for (slot, grad) in [(2 * e, dgu), (2 * e + 1, ddown)] {
                let Some(grad) = grad else { continue };
                slots[slot] = Some(match slots[slot].take() {
                    Some(acc) => (acc + grad)?,
                    None => grad,
                });
            }
        }
        // An expert's gradient sums the tokens of every rank of its group: averaged over them, as the
        // data-parallel average averages each rank's (exact for groups of a power of two).
        if g.size() > 1 {
            let scale = 1.0 / g.size() as f64;
            for grad in slots.iter_mut().flatten() {
                *grad = grad.affine(scale, 0.0)?;
            }
        }
        let d_rows = g.exchange_rows(&d_rows, &s.recv, &s.send)?;
        let dh = Tensor::zeros((n, d), go.dtype(), go.device())?.index_add(&s.tokens, &d_rows, 0)?;
        // The router's sums travel through unchanged: so do their gradients.
        let passed = |i: usize| match upstream {
            Upstream::Grads(gr) => gr.get(i).cloned().flatten(),
            Upstream::Loss(_) => None,
        };
        let inputs = vec![Some(go.clone()), Some(dh), None, Some(d_weights), passed(1), passed(2), passed(3)];
        Ok((slots, inputs))
    }

    fn forward_flops_per_token(&self) -> f64 {
        self.cfg.moe.map_or(0.0, |m| 2.0 * (m.top_k * 3 * m.d_expert * self.cfg.d_model) as f64)
    }
}
