//! The memory a run will need per rank, before anything is allocated: device, host and NVMe bytes
//! from the same arithmetic the engine allocates by (flat buffers padded for the world, optimizer
//! windows, each block's state tier from the `Strategy`), plus the activations and buffers a step
//! adds — the model family describes its activations (`ActivationProfile`), this file the rest.
//!
//! What each term counts, and why (checked against measured peaks in `bench/results/`):
//! - parameters: the compute-dtype variables (stages 0–2), or the rank's shards (stage 3: every
//!   block's on a GPU unless `zero.offload_params` moves those of offloaded blocks off it);
//!   stages 1–2 keep a compute copy of a device-tier window besides the variables (the all-gather's
//!   source);
//! - gradients: the fp32 accumulators (whole at stages 0–1; at 2–3 the shard, plus the whole
//!   accumulators while micro-batches accumulate, or two blocks' at accumulation 1);
//! - optimizer state on the device tier: master weights and moments over the window;
//! - activations: all blocks' saved tensors, or with recomputation the boundaries and the larger of
//!   one block's and the loss's; stage 3 without recomputation keeps every gathered block for the
//!   backward, with it two (the current one and the prefetch);
//! - host: the offloaded state, the staging buffers (two of the largest host-tier window in f32 and
//!   compute dtype, for host-tier blocks at stage 3 or whose window is the whole block; pinned on a GPU), the NVMe buffers (three of the largest NVMe file) and the compute copies
//!   NVMe updates leave for the publish, one gradient window copied down, the initialisation's
//!   values (as many blocks at once as there are threads), and the process itself.

use super::model::Model;
use crate::shard::{FlatParam, OptimizerWindow, ParamPlacement, Strategy, Tier};

/// What a model's blocks keep for the backward, in bytes, at one micro-batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ActivationProfile {
    /// Every block's saved tensors and the loss's logits (no activation checkpointing).
    pub kept: u64,
    /// The block boundaries and the larger of one block's saved tensors and the logits
    /// (activation checkpointing).
    pub recomputed: u64,
}

/// How a run is set up, for [`estimate`].
#[derive(Debug, Clone, Copy)]
pub struct EstimatePlan {
    /// Stage and offload tiers.
    pub strategy: Strategy,
    /// Ranks.
    pub world: usize,
    /// Bytes of the compute dtype (2 for bf16/f16, 4 for fp32).
    pub compute_bytes: usize,
    /// Optimizer state buffers per parameter (AdamW: 2).
    pub num_states: usize,
    /// Micro-batches per step on a rank.
    pub accumulation: usize,
    /// Activation checkpointing (recompute each block in the backward).
    pub checkpointing: bool,
    /// Blocks compute on a GPU (else the device is host memory).
    pub on_gpu: bool,
    /// What the model's blocks keep at one micro-batch.
    pub activations: ActivationProfile,
    /// Threads drawing initial values at once (blocks in memory together at start).
    pub init_threads: usize,
    /// Expert-parallel ranks (`parallel.ep`; 1: none): each expert block ([`Block::experts`](crate::engine::Block::experts))
    /// holds `1/ep` of its experts, sharded over `world / ep` ranks.
    pub ep: usize,
    /// Tensor-parallel ranks (`parallel.tp`; 1: none): each block with a tensor plan holds its slices
    /// ([`Model::tensor_splits`]), sharded over `world`, the data-parallel size.
    pub tp: usize,
}

/// Bytes per rank, by where they live and what they are.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct MemoryEstimate {
    /// Peak GPU memory (0 on a CPU run, where it is all host memory).
    pub device: u64,
    /// Peak host memory (resident).
    pub host: u64,
    /// Files under `zero.nvme_dir`.
    pub nvme: u64,
    /// Compute-dtype parameters (and copies) where blocks compute.
    pub params: u64,
    /// Gradient accumulators at their peak.
    pub grads: u64,
    /// Optimizer state where blocks compute.
    pub state: u64,
    /// Optimizer state offloaded to host memory.
    pub offloaded_host: u64,
    /// Activations (and stage-3 gathered parameters) at their peak.
    pub activations: u64,
    /// Pinned transfer and NVMe buffers.
    pub buffers: u64,
}

/// Host memory of the process before any model state (binary, libraries; with CUDA its host side).
const HOST_BASE_GPU: u64 = 512 << 20;
const HOST_BASE_CPU: u64 = 64 << 20;
/// The initialisation holds each drawn block about one and a half times (values, then the window
/// copy and compute copies made from them).
const INIT_COPIES_X2: u64 = 3;

/// The memory `model` needs per rank under `plan` (rank 0; every rank's shards are equally long).
pub fn estimate(model: &Model, plan: &EstimatePlan) -> MemoryEstimate {
    let w = plan.world.max(1);
    let (c, k) = (plan.compute_bytes as u64, plan.num_states as u64);
    // An expert block under expert parallelism: its share of the experts over its expert-data-parallel group.
    let ep = plan.ep.max(1);
    // A block split by tensor parallelism: its slices.
    let tp = plan.tp.max(1);
    let splits = if tp > 1 { model.tensor_splits() } else { vec![None; model.num_blocks()] };
    let flat_of = |i: usize| {
        let own = model.own_params(i);
        match (model.block(i).experts(), &splits[i]) {
            (e, _) if ep > 1 && e > 0 => FlatParam::new(&own[..own.len() / ep], (w / ep).max(1)),
            (_, Some(split)) => {
                let local: Vec<_> = own.iter().zip(split).map(|(p, s)| crate::shard::ParamSpec { shape: s.local_shape(&p.shape, tp).unwrap_or_else(|| p.shape.clone()), ..p.clone() }).collect();
                FlatParam::new(&local, w)
            }
            _ => FlatParam::new(own, w),
        }
    };
    let flats: Vec<FlatParam> = (0..model.num_blocks()).map(flat_of).collect();
    let padded: Vec<u64> = flats.iter().map(|f| f.padded_numel() as u64).collect();
    let windows: Vec<u64> = flats
        .iter()
        .map(|f| match plan.strategy.optimizer_window() {
            OptimizerWindow::Whole => f.padded_numel() as u64,
            OptimizerWindow::Shard => f.layout().shard(0).padded_len as u64,
        })
        .collect();
    let tiers = plan.strategy.optimizer_tiers(&windows.iter().map(|&x| x as usize).collect::<Vec<_>>());
    let on = |tier: Tier| windows.iter().zip(&tiers).filter(move |(_, &t)| t == tier).map(|(&x, _)| x);
    let sum = |v: &[u64]| v.iter().sum::<u64>();
    let max = |v: &[u64]| v.iter().copied().max().unwrap_or(0);
    let stage = plan.strategy.stage.as_int();
    let gathered = plan.strategy.param_placement() == ParamPlacement::Gathered;
    // On a CPU run the device and host tiers are the same memory.
    let device_tier: u64 = on(Tier::Device).sum::<u64>() + if plan.on_gpu { 0 } else { on(Tier::Host).sum() };

    // Stage 3 on a GPU keeps every block's shard in device memory unless `zero.offload_params`
    // puts those of offloaded blocks in host memory or files.
    let shards_on_device = plan.on_gpu && gathered && plan.strategy.offload_params == crate::shard::Offload::None;
    let offloaded_windows: u64 = if shards_on_device { on(Tier::Host).sum::<u64>() + on(Tier::Nvme).sum::<u64>() } else { 0 };
    // Frozen parameters (a LoRA base): compute dtype only, whole or this rank's shard.
    let frozen: Vec<u64> = (0..model.num_blocks()).map(|i| FlatParam::new(model.frozen_params(i), w).padded_numel() as u64).collect();
    let frozen_held = if gathered { sum(&frozen) / w as u64 } else { sum(&frozen) } * c;
    let params = if gathered { (device_tier + offloaded_windows) * c } else { sum(&padded) * c } + if plan.on_gpu && (1..=2).contains(&stage) { device_tier * c } else { 0 } + frozen_held;
    let grads = if stage <= 1 {
        sum(&padded) * 4
    } else {
        sum(&windows) * 4 + if w == 1 { 0 } else if plan.accumulation > 1 { sum(&padded) * 4 } else { 2 * max(&padded) * 4 }
    };
    let state = device_tier * 4 * (1 + k);
    let gathers = match (gathered, plan.checkpointing) {
        (false, _) => 0,
        (true, false) => (sum(&padded) + sum(&frozen)) * c,
        (true, true) => 2 * padded.iter().zip(&frozen).map(|(p, f)| p + f).max().unwrap_or(0) * c,
    };
    let activations = if plan.checkpointing { plan.activations.recomputed } else { plan.activations.kept } + gathers;

    let host_tier: u64 = if plan.on_gpu { on(Tier::Host).sum() } else { 0 };
    // Host-tier and NVMe-tier stage-3 shards stay in host memory between uses; with parameters on
    // NVMe, those of NVMe-tier blocks are in files instead (in the compute dtype).
    let params_on_nvme = plan.strategy.params_on_nvme(Tier::Nvme);
    let nvme_tier: u64 = on(Tier::Nvme).sum();
    let host_shards = if !gathered || shards_on_device { 0 } else if params_on_nvme { host_tier } else { host_tier + nvme_tier };
    let offloaded_host = host_tier * 4 * (1 + k) + host_shards * c;
    // Files are whole pages of f32.
    let file_bytes = |elems: u64| elems.div_ceil(1024) * 4096;
    let nvme_files: Vec<u64> = on(Tier::Nvme).map(|x| file_bytes(x * (1 + k))).collect();
    let param_files: u64 = if params_on_nvme { on(Tier::Nvme).map(|x| file_bytes((x * c).div_ceil(4))).sum() } else { 0 };
    let nvme = sum(&nvme_files) + param_files;
    // The host tier's staging buffers (pinned on a GPU, plain host memory on a CPU run).
    // Every host-tier block at stage 3 (its window is its shard); at stages 0–2 where the window is
    // the whole block.
    let fast_host = gathered || stage == 0 || w == 1;
    let pinned = if fast_host { 2 * windows.iter().zip(&tiers).filter(|(_, &t)| t == Tier::Host).map(|(&x, _)| x).max().unwrap_or(0) * (4 + c) } else { 0 };
    // An NVMe block's compute copy waits in host memory for the publish; off the pinned path, a
    // GPU run copies one block's gradient window down at a time.
    let staged: u64 = on(Tier::Nvme).map(|x| x * c).sum();
    // Blocks off the pinned path: NVMe ones, and host ones where the pinned path does not apply.
    let host_path = |t: Tier| plan.on_gpu && (t == Tier::Nvme || t == Tier::Host && !fast_host);
    // Each stage-3 shard of an NVMe-tier block goes up to the device once per step from a host copy
    // (host-tier ones go up from the staging buffers).
    let staged = staged + if shards_on_device && on(Tier::Nvme).next().is_some() { max(&windows) * c } else { 0 };
    let download = windows.iter().zip(&tiers).filter(|(_, &t)| host_path(t)).map(|(&x, _)| x * 4).max().unwrap_or(0);
    // Stages 1–2 publish host-path blocks by host all-gathers, all submitted before any finishes.
    let host_path_padded: u64 = if (1..=2).contains(&stage) { padded.iter().zip(&tiers).filter(|(_, &t)| host_path(t)).map(|(&p, _)| p * c).sum() } else { 0 };
    let buffers = pinned + 3 * max(&nvme_files) + staged + download + host_path_padded;
    let mut largest = padded.clone();
    largest.sort_unstable_by(|a, b| b.cmp(a));
    let init: u64 = largest.iter().take(plan.init_threads.max(1)).sum::<u64>() * 4 * INIT_COPIES_X2 / 2;

    let on_device = params + grads + state + activations;
    let (device, host) = if plan.on_gpu {
        (on_device, HOST_BASE_GPU + (offloaded_host + buffers).max(init))
    } else {
        (0, HOST_BASE_CPU + on_device + offloaded_host + buffers + init)
    };
    MemoryEstimate { device, host, nvme, params, grads, state, offloaded_host, activations, buffers }
}
