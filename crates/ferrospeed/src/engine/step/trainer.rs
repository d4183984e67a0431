//! The engine: one optimizer step over micro-batches — block-wise forward and backward with gradient
//! accumulation, each block's gradient reduced as soon as it is complete on the last micro-batch
//! (overlapping the remaining backward), fp16 overflow handling, global-norm clipping, AdamW on the
//! window of master weights this rank owns, and publishing the updated parameters.
//!
//! The ZeRO stage is not branched on here: `Strategy` says whether parameters are resident, how
//! gradients are reduced and whether the optimizer is sharded, and the buffers follow.

use super::block::{Batch, ExpertGroup};
use super::blockwise::{self, ParamSource};
use super::comm_worker::{CommWorker, Pending};
use super::grads::Reduced;
use crate::comm::CommError;
use super::error::EngineError;
use super::grads::{self, BlockGrads};
use super::memory::MemoryReport;
use super::model::Model;
use super::offload::{Offload, OffloadSettings, UpdatePass};
use super::frozen::FrozenParams;
use super::params::{init_frozen_values, init_values, BlockParams, BlockSetup, Gather, OptimizerSetup, StepUpdate};
use super::sources::{Gathering, Resident};
use crate::comm::{CommExt, Communicator, ReduceOp};
use crate::profile::{self, Kind};
use crate::optim::{clip_coefficient, LrSchedule, Optimizer, ParamGroups};
use crate::precision::{LossScaler, LossScalerConfig, Precision, ScaleDecision, ScalerState};
use crate::shard::{GradReduction, ParamPlacement, Strategy, Tier};
use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;
use std::sync::Arc;
use std::time::Instant;

/// Settings of the engine that do not change during a run.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Recompute each block in the backward pass instead of keeping its graph.
    pub checkpointing: bool,
    /// Maximum global gradient norm; 0 disables clipping.
    pub grad_clip: f64,
    /// The optimizer (AdamW, SGD or a user's own elementwise one).
    pub optimizer: Arc<dyn Optimizer>,
    /// Weight decay and learning-rate scale per parameter (default: decay where the spec says so).
    pub param_groups: ParamGroups,
    /// Seed of the parameter initialisation.
    pub seed: u64,
    /// The ZeRO stage and offload tiers: what is sharded over the ranks, and what is offloaded.
    pub strategy: Strategy,
    /// The offload's folder and buffer budget.
    pub offload: OffloadSettings,
    /// The dtype blocks compute in (fp32, bf16, or fp16 with loss scaling).
    pub precision: Precision,
    /// dtype gradients are reduced in (F32, or the compute dtype).
    pub reduce_dtype: DType,
    /// Dynamic loss scaling (fp16).
    pub loss_scaler: Option<LossScalerConfig>,
    /// Where blocks compute (the CPU, or a CUDA device). On a CUDA device the optimizer state and
    /// the gradient accumulators live in device memory too.
    pub device: Device,
    /// Micro-batches per optimizer step on this rank, for [`Engine::forward_backward`] +
    /// [`Engine::step`] (`train_step` takes them all at once instead).
    pub accumulation: usize,
    /// The learning rate of each step, for [`Engine::step`].
    pub schedule: LrSchedule,
    /// Frozen linear weights ([`crate::engine::ParamSpec::linear`]) kept in NF4 with double
    /// quantisation (QLoRA, `lora.base = "nf4"`), dequantised to the compute dtype at each use.
    pub frozen_nf4: bool,
}

impl EngineConfig {
    /// fp32, stage 0, no loss scaling.
    pub fn fp32(checkpointing: bool, grad_clip: f64, optimizer: impl Optimizer + 'static, seed: u64) -> Self {
        Self {
            checkpointing,
            grad_clip,
            optimizer: Arc::new(optimizer),
            param_groups: ParamGroups::default(),
            seed,
            strategy: Strategy::new(crate::config::ZeroStage::Zero),
            offload: OffloadSettings::default(),
            precision: Precision::Fp32,
            reduce_dtype: DType::F32,
            loss_scaler: None,
            device: Device::Cpu,
            accumulation: 1,
            schedule: LrSchedule::constant(1e-3),
            frozen_nf4: false,
        }
    }
}

/// Where the time of a step went, by phase, in seconds (host clock; device work that a phase waits
/// for is counted in it).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepTimes {
    /// Forward and backward of every micro-batch, gradient accumulation included.
    pub forward_backward: f64,
    /// Waiting for gradient reductions still running after the backward.
    pub reduce_wait: f64,
    /// Overflow check, norm, clipping and AdamW.
    pub optimizer: f64,
    /// Rebuilding compute parameters (and all-gathers at stages 1–2).
    pub publish: f64,
    /// Within `optimizer`: the host waiting for transfers between device and host memory (offloaded
    /// state) — the part of them no CPU update hid.
    pub transfer_wait: f64,
    /// Within `optimizer`: the host waiting for NVMe reads and writes — the part no update hid.
    pub disk_wait: f64,
    /// Within `forward_backward`, a pipeline stage waiting for the activations or gradients of
    /// the stages beside it: its share of the pipeline's bubble.
    pub pipeline_wait: f64,
    /// Within `forward_backward`, a pipeline stage's compute by action, waits excluded: forwards,
    /// backwards (whole, or their input halves under `zb`) and weight halves (`zb`).
    pub pipeline_compute: PipelineCompute,
}

/// A pipeline stage's seconds of compute in a step by kind of action (see [`StepTimes`]).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PipelineCompute {
    /// Forward actions.
    pub forward: f64,
    /// Backward actions: whole, or their input halves (`zb`).
    pub backward: f64,
    /// Weight halves (`zb`).
    pub weight: f64,
}

/// What one optimizer step measured.
#[derive(Debug, Clone, PartialEq)]
pub struct StepStats {
    /// Mean loss over the global batch.
    pub loss: f64,
    /// Global gradient norm before clipping (after unscaling); NaN when the step was skipped.
    pub grad_norm: f64,
    /// The step was skipped on every rank because fp16 gradients overflowed.
    pub skipped: bool,
    /// The loss scale used for this step (fp16).
    pub loss_scale: Option<f64>,
    /// The learning rate of this step.
    pub lr: f64,
    /// Where the step's time went.
    pub times: StepTimes,
    /// The last block's statistics (`Block::metrics`): name and mean over the step's micro-batches
    /// and the data-parallel group (in a pipeline: the last stage's).
    pub metrics: Vec<(String, f64)>,
}

/// The training engine of one rank.
pub struct Engine {
    pub(super) model: Model,
    pub(super) worker: Arc<CommWorker>,
    pub(super) params: Vec<BlockParams>,
    pub(super) grads: Vec<BlockGrads>,
    pub(super) scaler: Option<LossScaler>,
    pub(super) cfg: EngineConfig,
    pub(super) step: u64,
    inject_overflow: bool,
    pub(super) gathered_peak: usize,
    /// NCCL over the ranks' GPUs (CUDA, one GPU per rank): gradient reductions run there.
    pub(super) nccl: Option<super::Nccl>,
    /// The offload tiers' resources (NVMe folder, buffers).
    offload: Offload,
    /// The optimizer step being accumulated.
    pub(super) acc: Accumulating,
    /// The pipeline stage this engine runs, if any (`None`: the whole model).
    pub(super) pipe: Option<Box<super::pipeline::Pipe>>,
    /// Expert parallelism, if on.
    pub(super) experts: Option<Experts>,
    /// Tensor parallelism, if on.
    pub(super) tensor: Option<super::tensor_par::Tensors>,
}

/// Expert parallelism as the engine sees it: the expert blocks' own group (their shards are
/// gathered and their gradients reduced over the ranks holding the same experts) and the expert
/// groups' size.
pub(super) struct Experts {
    /// The expert-data-parallel group's communication thread.
    pub(super) edp: Arc<CommWorker>,
    /// The expert group's size (`parallel.ep`).
    pub(super) ep: usize,
}

/// What the micro-batches of the current optimizer step have left for [`Engine::step`].
#[derive(Default)]
pub(super) struct Accumulating {
    /// Micro-batches run so far.
    pub(super) done: usize,
    /// Their losses (read once the step's collectives are known to be done; a pipeline's last
    /// stage's only).
    pub(super) losses: Vec<Tensor>,
    /// Their statistics (`Block::metrics`), one list per micro-batch.
    pub(super) metrics: Vec<Vec<Tensor>>,
    /// Gradient reductions started on the last micro-batch.
    pub(super) pending: Vec<(usize, Pending<Result<Reduced, CommError>>)>,
    /// The loss scale of this step (fp16).
    pub(super) loss_scale: Option<f64>,
    /// Seconds of forward and backward so far.
    pub(super) seconds: f64,
    /// Of them, seconds a pipeline stage waited for its neighbours.
    pub(super) pipeline_wait: f64,
    /// And seconds it computed, by kind of action.
    pub(super) pipeline_compute: PipelineCompute,
}

impl Engine {
    /// Initialise every parameter from the seed (the same values on every rank, at any world size and
    /// stage); each rank keeps what the strategy says it holds.
    pub fn new(model: Model, comm: Arc<dyn Communicator>, cfg: EngineConfig) -> Result<Self, EngineError> {
        Self::with_worker(model, Arc::new(CommWorker::spawn(comm)), cfg)
    }

    /// As [`Engine::new`], issuing collectives on an existing communication thread (the
    /// `Accelerator`'s), so that its collectives and the engine's keep one order.
    pub fn with_worker(model: Model, worker: Arc<CommWorker>, cfg: EngineConfig) -> Result<Self, EngineError> {
        Self::build(model, worker, None, cfg)
    }

    /// As [`Engine::with_worker`], with expert parallelism: every expert block ([`Block::experts`](super::Block::experts))
    /// keeps the share of the experts of this rank of `group` (its expert-parallel group, `parallel.ep`
    /// consecutive ranks of the data-parallel group), and is gathered, reduced and sharded by ZeRO over
    /// `edp` (the ranks of the data-parallel group holding the same experts) instead of the data-parallel
    /// group (through the communication thread on the host; never NCCL, which spans the data-parallel group).
    pub fn with_experts(mut model: Model, worker: Arc<CommWorker>, group: ExpertGroup, edp: Arc<CommWorker>, cfg: EngineConfig) -> Result<Self, EngineError> {
        if group.size() * edp.world_size() != worker.world_size() {
            return Err(EngineError::Unsupported(format!(
                "an expert group of {} ranks and an expert-data-parallel group of {} for a data-parallel group of {}",
                group.size(),
                edp.world_size(),
                worker.world_size()
            )));
        }
        if group.size() > 1 && (0..model.num_blocks()).all(|b| model.block(b).experts() == 0) {
            return Err(EngineError::Unsupported(format!(
                "parallel.ep = {} spreads the experts of a mixture-of-experts model, and this model has none: set parallel.ep = 1",
                group.size()
            )));
        }
        model.shard_experts(&group)?;
        let experts = Experts { edp, ep: group.size() };
        Self::build(model, worker, Some(experts), cfg)
    }

    pub(super) fn build(model: Model, worker: Arc<CommWorker>, experts: Option<Experts>, cfg: EngineConfig) -> Result<Self, EngineError> {
        let (rank, world) = (worker.rank(), worker.world_size());
        let dtype = cfg.precision.compute_dtype();
        if cfg.device.is_cuda() && cfg.optimizer.as_adamw().is_none() {
            return Err(EngineError::Unsupported(format!(
                "the {} optimizer runs on the CPU only so far: use AdamW with a CUDA device, or train.device = \"cpu\"",
                cfg.optimizer.name()
            )));
        }
        // Where each block's state goes, checked (NVMe folder, buffer budget) before anything large
        // is allocated.
        let super::placement::Placement { tiers, offload, copies } = super::placement::place(&model, &cfg, rank, world)?;
        let optimizer = OptimizerSetup {
            num_states: cfg.optimizer.state_names().len(),
            adamw: cfg.optimizer.as_adamw().is_some(),
            weight_decay: cfg.optimizer.weight_decay(),
            groups: &cfg.param_groups,
        };
        let setup = BlockSetup { strategy: cfg.strategy, rank, world, dtype, device: &cfg.device, optimizer, nvme: offload.nvme.as_ref(), copies: copies.as_ref() };
        // An expert block's rank and world: in its expert-data-parallel group.
        let group_of = |i: usize| match (&experts, model.expert_shard(i)) {
            (Some(e), Some(_)) => (e.edp.rank(), e.edp.world_size()),
            _ => (rank, world),
        };
        let mut params = Vec::with_capacity(model.num_blocks());
        let mut grads = Vec::with_capacity(model.num_blocks());
        // Drawing the initial values is most of the start-up (1.5B normal samples: a minute on one core):
        // blocks are drawn in parallel, as many at a time as there are threads (bounding the host memory),
        // then set up in order. Each parameter has its own random stream: the values do not change.
        let blocks: Vec<usize> = (0..model.num_blocks()).collect();
        for chunk in blocks.chunks(rayon::current_num_threads().max(1)) {
            let values: Vec<(Vec<f32>, Vec<f32>)> =
                chunk.par_iter().map(|&i| (init_values(&model, i, group_of(i).1, cfg.seed), init_frozen_values(&model, i, group_of(i).1, cfg.seed))).collect();
            for (&i, (full, cold)) in chunk.iter().zip(values) {
                let (rank, world) = group_of(i);
                let frozen = FrozenParams::new(&model, i, &cold, cfg.strategy, rank, world, dtype, &cfg.device, cfg.frozen_nf4)?;
                let mut p = BlockParams::from_full(&model, i, full, frozen, &BlockSetup { rank, world, ..setup }, tiers[i])?;
                let mut g = BlockGrads::new(&p.flat, rank, cfg.strategy.grad_reduction(), &cfg.device)?;
                if let (Some(e), Some(_)) = (&experts, model.expert_shard(i)) {
                    p.group = Some(e.edp.clone());
                    g.group = Some(e.edp.clone());
                }
                grads.push(g);
                params.push(p);
            }
        }
        let scaler = cfg.loss_scaler.map(LossScaler::new);
        let nccl = make_nccl(worker.communicator(), &cfg.device)?;
        Ok(Self { model, worker, params, grads, scaler, cfg, step: 0, inject_overflow: false, gathered_peak: 0, nccl, offload, acc: Accumulating::default(), pipe: None, experts, tensor: None })
    }

    /// The model being trained.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The communication thread: collectives outside the engine go through it too, so that every
    /// collective of this rank is issued in one order.
    pub fn comm(&self) -> &CommWorker {
        self.world_worker()
    }

    /// A shared handle on the communication thread (what the `Accelerator` issues its collectives on).
    pub fn comm_handle(&self) -> Arc<CommWorker> {
        self.world_worker().clone()
    }

    /// The world's communication thread: the engine's own, but in a pipeline or under tensor
    /// parallelism (whose engine issues on its data-parallel group's).
    fn world_worker(&self) -> &Arc<CommWorker> {
        match (&self.pipe, &self.tensor) {
            (Some(p), _) => &p.world,
            (None, Some(t)) => &t.world,
            (None, None) => &self.worker,
        }
    }

    /// The data-parallel group's communication thread: the engine's own collectives (gradient
    /// reductions, gathers) run there. The world's ([`Engine::comm`]) but in a pipeline.
    pub fn data_parallel_comm(&self) -> &CommWorker {
        &self.worker
    }

    /// Optimizer steps taken so far (skipped steps included).
    pub fn steps_done(&self) -> u64 {
        self.step
    }

    /// Make this rank's next gradient reduction see an infinity (tests of fp16 overflow handling).
    #[doc(hidden)]
    pub fn inject_overflow(&mut self) {
        self.inject_overflow = true;
    }

    /// The fp32 master weights this rank holds for block `i`, and their offset in the flat buffer. On a
    /// CUDA device this is the host copy: empty unless [`Engine::sync_to_host`] ran since the last step.
    pub fn master(&self, i: usize) -> (usize, &[f32]) {
        (self.params[i].window.start, &self.params[i].master)
    }

    /// Every block's slot tensors with the current weights. With sharded parameters this gathers every
    /// block: call it on every rank.
    pub fn slot_tensors(&self) -> Result<Vec<Vec<Tensor>>, EngineError> {
        if self.cfg.strategy.param_placement() == ParamPlacement::Resident {
            let src = Resident { model: &self.model, params: &self.params };
            (0..self.model.num_blocks()).map(|i| src.slot_tensors(i)).collect()
        } else {
            Gathering::new(&self.model, &self.params, &self.worker, self.nccl.as_ref()).all_slot_tensors()
        }
    }

    /// Bytes held by this rank, per kind (see [`MemoryReport`]).
    pub fn memory(&self) -> MemoryReport {
        let on = |tier: Tier| self.params.iter().filter(move |p| p.state_bytes().0 == tier);
        let device_windows: usize = on(Tier::Device).map(|p| p.window.len() * 4).sum();
        MemoryReport {
            params: self.params.iter().map(BlockParams::param_bytes).sum(),
            frozen: self.params.iter().map(|p| p.frozen.bytes()).sum(),
            grads: self.grads.iter().map(BlockGrads::persistent_bytes).sum(),
            master: device_windows,
            moments: device_windows * self.cfg.optimizer.state_names().len(),
            offloaded_host: on(Tier::Host).map(|p| p.state_bytes().1).sum(),
            offloaded_nvme: on(Tier::Nvme).map(|p| p.state_bytes().1).sum(),
            gathered_peak: self.gathered_peak,
            staging: self.offload.staging_bytes(),
        }
    }

    /// The tier of each block's optimizer state, in block order.
    pub fn state_tiers(&self) -> Vec<Tier> {
        self.params.iter().map(|p| p.state_bytes().0).collect()
    }

    /// What the NVMe tier has read and written so far, and how fast (`None` without one).
    pub fn disk_traffic(&self) -> Option<super::offload::nvme::DiskTraffic> {
        self.offload.traffic()
    }

    pub(crate) fn blocks_state(&self) -> impl Iterator<Item = (&str, &BlockParams)> {
        self.model.block_names().iter().map(String::as_str).zip(&self.params)
    }

    pub(crate) fn blocks_state_mut(&mut self) -> impl Iterator<Item = (&str, &mut BlockParams)> {
        self.model.block_names().iter().map(String::as_str).zip(&mut self.params)
    }

    pub(crate) fn set_progress(&mut self, steps_done: u64, scaler: Option<ScalerState>) {
        self.step = steps_done;
        if let (Some(s), Some(state)) = (&mut self.scaler, scaler) {
            s.restore(state);
        }
    }

    pub(crate) fn republish(&mut self) -> Result<(), EngineError> {
        self.publish()
    }

    /// The loss scaler's state (fp16), for checkpoints.
    pub fn scaler_state(&self) -> Option<ScalerState> {
        self.scaler.as_ref().map(LossScaler::state)
    }

    /// The configuration the engine runs with.
    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// One optimizer step over this rank's `micro_batches` (its share of the global batch: the
    /// accumulation window) at the schedule's learning rate. In a pipeline, the schedule runs them.
    pub fn train_step(&mut self, micro_batches: &[Batch]) -> Result<StepStats, EngineError> {
        let lr = self.next_lr();
        self.train_step_at(micro_batches, lr)
    }

    /// [`Engine::train_step`] at learning rate `lr`.
    pub fn train_step_at(&mut self, micro_batches: &[Batch], lr: f64) -> Result<StepStats, EngineError> {
        if micro_batches.is_empty() {
            return Err(EngineError::Unsupported("a step needs at least one micro-batch".into()));
        }
        if self.acc.done > 0 {
            return Err(self.mid_step_error("train_step"));
        }
        if self.pipe.is_some() {
            self.pipeline_micro_batches(micro_batches)?;
        } else {
            for (k, batch) in micro_batches.iter().enumerate() {
                self.run_micro_batch(batch, k, micro_batches.len())?;
            }
        }
        self.finish_step(lr)
    }

    /// Forward and backward of one micro-batch of the current optimizer step (of
    /// `EngineConfig::accumulation`); on the last one, each block's gradient reduction starts as soon as
    /// its backward ends. Returns this micro-batch's loss (a scalar tensor on the device: reading it
    /// waits for the device). Call [`Engine::step`] after each micro-batch.
    pub fn forward_backward(&mut self, batch: &Batch) -> Result<Tensor, EngineError> {
        if self.pipe.is_some() {
            return Err(EngineError::Unsupported(
                "forward_backward runs one micro-batch, a pipeline runs a step's at once: call Engine::train_step(&micro_batches)".into(),
            ));
        }
        let accum = self.cfg.accumulation.max(1);
        if self.acc.done == accum {
            return Err(EngineError::Unsupported(format!(
                "forward_backward after the {accum} micro-batch(es) of a step: call Engine::step first"
            )));
        }
        let k = self.acc.done;
        self.run_micro_batch(batch, k, accum)?;
        Ok(self.acc.losses[k].clone())
    }

    /// After [`Engine::forward_backward`]: once the step's `accumulation` micro-batches have run, the
    /// optimizer step at the schedule's learning rate (`Some` with what it measured); before that,
    /// nothing (`None`), so a loop may call it after every micro-batch.
    pub fn step(&mut self) -> Result<Option<StepStats>, EngineError> {
        if self.acc.done < self.cfg.accumulation.max(1) {
            return Ok(None);
        }
        let lr = self.cfg.schedule.at(self.step as usize);
        self.finish_step(lr).map(Some)
    }

    /// The learning rate [`Engine::step`] uses for the next step.
    pub fn next_lr(&self) -> f64 {
        self.cfg.schedule.at(self.step as usize)
    }

    pub(super) fn mid_step_error(&self, what: &str) -> EngineError {
        EngineError::Unsupported(format!(
            "{what} in the middle of a step ({} of {} micro-batches run): finish it with forward_backward and step",
            self.acc.done,
            self.cfg.accumulation
        ))
    }

    /// The optimizer step once every micro-batch ran: wait for the reductions, fp16 overflow check,
    /// norm, clipping, update, publish.
    fn finish_step(&mut self, lr: f64) -> Result<StepStats, EngineError> {
        let mut times = StepTimes::default();
        let loss_scale = self.acc.loss_scale;
        let (loss, metrics) = self.finish_reductions(&mut times)?;
        self.step += 1;
        let t_opt = Instant::now();

        let local = match &self.scaler {
            None => false,
            Some(_) => grads::any_overflow(&self.grads)?,
        };
        let world = self.world_worker().clone();
        if let Some(scaler) = &mut self.scaler {
            let overflow = world.run(move |c| {
                let mut flag = [if local { 1f32 } else { 0.0 }];
                c.all_reduce_slice(&mut flag, ReduceOp::Max).map(|()| flag[0] > 0.0)
            })??;
            let decision = scaler.update(overflow, self.step).map_err(|e| EngineError::Unsupported(e.to_string()))?;
            if decision == ScaleDecision::Skip {
                times.optimizer = t_opt.elapsed().as_secs_f64();
                return Ok(StepStats { loss, grad_norm: f64::NAN, skipped: true, loss_scale, lr, times, metrics });
            }
        }

        // Gradients are still multiplied by the loss scale: take it out of the norm and the update.
        let scale = loss_scale.unwrap_or(1.0);
        let grad_norm = profile::scoped_as(Kind::Optimizer, "grad_norm", || self.grad_norm_scaled())? / scale;
        let factor = (clip_coefficient(grad_norm, self.cfg.grad_clip) / scale) as f32;
        let opt = self.cfg.optimizer.clone();
        let up = StepUpdate { optimizer: opt.as_ref(), factor, lr, t: self.step };
        let _adamw = profile::span_as(Kind::Optimizer, "adamw");
        // Every block updates where its state lives (device, host or NVMe); NVMe state is read ahead
        // and written behind by the pass.
        let Self { params, grads, offload, .. } = self;
        let mut pass = UpdatePass::new(offload, params.iter().map(|p| &p.store));
        for i in 0..params.len() {
            pass.before_block(params, grads)?;
            params[i].update(i, &mut grads[i], &up, &mut pass)?;
        }
        let waits = pass.finish()?;
        drop(_adamw);
        times.optimizer = t_opt.elapsed().as_secs_f64();
        times.transfer_wait = waits.transfer.as_secs_f64();
        times.disk_wait = waits.disk.as_secs_f64();
        let t_pub = Instant::now();
        profile::scoped_as(Kind::Optimizer, "publish", || self.publish())?;
        times.publish = t_pub.elapsed().as_secs_f64();
        Ok(StepStats { loss, grad_norm, skipped: false, loss_scale, lr, times, metrics })
    }

    /// Micro-batch `k` of `accum`: forward and backward, its gradients accumulated; on the last one
    /// each block's gradient reduction is started on the communication thread.
    fn run_micro_batch(&mut self, batch: &Batch, k: usize, accum: usize) -> Result<(), EngineError> {
        let last = k + 1 == accum;
        let t0 = Instant::now();
        if k == 0 {
            self.begin_accumulation()?;
        }
        let loss_scale = self.acc.loss_scale.unwrap_or(1.0);
        let Self { model, worker, params, grads, cfg, inject_overflow, nccl, acc, .. } = self;
        let mut resident = Resident { model, params };
        let mut gathering = Gathering::new(model, params, worker, nccl.as_ref());
        let source: &mut dyn ParamSource = match cfg.strategy.param_placement() {
            ParamPlacement::Resident => &mut resident,
            ParamPlacement::Gathered => &mut gathering,
        };
        if k > 0 {
            // The next forward reads its token ids back from the device (the embedding): first let the
            // previous micro-batch's NCCL gathers finish under the watchdog.
            nccl_sync(nccl.as_ref())?;
        }
        let tape = blockwise::forward(model, source, batch, cfg.checkpointing)?;
        // Losses are read after the step's collectives are known to be done (`finish_reductions`):
        // reading one waits for the device, whose stream may be waiting for an NCCL gather, with no timeout.
        acc.losses.push(tape.loss.clone());
        acc.metrics.push(tape.metrics.clone());
        let pending = &mut acc.pending;
        blockwise::backward(model, source, batch, tape, loss_scale / accum as f64, |i, slot_grads| {
            add_slot_grads(model, params, grads, i, slot_grads)?;
            // Every later block that uses this block's parameters (tied weights) has run, so the
            // gradient is complete: reduce it on the communication thread while earlier blocks compute.
            if last {
                if i == 0 && std::mem::take(inject_overflow) {
                    grads[i].poison()?;
                }
                pending.push((i, grads[i].start_reduce(worker, nccl.as_ref(), cfg.reduce_dtype)?));
            }
            Ok(())
        })?;
        self.gathered_peak = self.gathered_peak.max(gathering.peak_bytes);
        drop(gathering);
        self.acc.done += 1;
        self.acc.seconds += t0.elapsed().as_secs_f64();
        Ok(())
    }

    /// A new optimizer step: its loss scale, zeroed accumulators.
    pub(super) fn begin_accumulation(&mut self) -> Result<(), EngineError> {
        self.acc = Accumulating { loss_scale: self.scaler.as_ref().map(LossScaler::scale), ..Accumulating::default() };
        self.grads.iter_mut().try_for_each(BlockGrads::begin_step)
    }

    /// Wait for the step's gradient reductions; returns the mean loss over the global batch and the
    /// last block's statistics.
    fn finish_reductions(&mut self, times: &mut StepTimes) -> Result<(f64, Vec<(String, f64)>), EngineError> {
        let acc = std::mem::take(&mut self.acc);
        let accum = acc.done;
        times.forward_backward = acc.seconds;
        times.pipeline_wait = acc.pipeline_wait;
        times.pipeline_compute = acc.pipeline_compute;
        let t_wait = Instant::now();
        let _wait = profile::span_as(Kind::Communication, "reduce_wait");
        for (i, p) in acc.pending {
            self.grads[i].finish_reduce(p)?;
        }
        // NCCL never times out by itself: wait here, with the group's timeout, for every reduction.
        nccl_sync(self.nccl.as_ref())?;
        self.pipeline_ties()?;
        drop(_wait);
        times.reduce_wait = t_wait.elapsed().as_secs_f64();
        let metrics = self.mean_metrics(acc.metrics)?;
        Ok((self.mean_loss(acc.losses, accum)?, metrics))
    }

    /// The last block's statistics over the step: each one's mean over the micro-batches, averaged
    /// over the data-parallel group (one collective, where the model declares any); in a pipeline
    /// the last stage's, handed to every rank (one more).
    fn mean_metrics(&self, per_micro: Vec<Vec<Tensor>>) -> Result<Vec<(String, f64)>, EngineError> {
        let names = match &self.pipe {
            Some(p) => p.metrics.clone(),
            None => self.model.block(self.model.num_blocks() - 1).metrics(),
        };
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let mut sums = vec![0f64; names.len()];
        for m in &per_micro {
            for (s, t) in sums.iter_mut().zip(m) {
                *s += t.to_dtype(DType::F64).and_then(|t| t.to_scalar::<f64>()).map_err(EngineError::tensor("metric"))?;
            }
        }
        let local: Vec<f32> = sums.iter().map(|s| (s / per_micro.len().max(1) as f64) as f32).collect();
        // Other stages of a pipeline hold none: zeros, for the same collectives.
        let local = if local.len() == names.len() { local } else { vec![0f32; names.len()] };
        let mean = self.worker.run(move |c| {
            let mut v = local;
            c.all_reduce_slice(&mut v, ReduceOp::Avg).map(|()| v)
        })??;
        let mean = self.pipeline_metrics(mean)?;
        Ok(names.into_iter().zip(mean).map(|(n, v)| (n, f64::from(v))).collect())
    }

    /// The step's loss from this rank's micro-batch losses (`accum` of them; a pipeline's other stages
    /// have none): their mean, averaged over the data-parallel group (in f32), then handed from the last
    /// stage of a pipeline to every rank.
    pub(super) fn mean_loss(&self, losses: Vec<Tensor>, accum: usize) -> Result<f64, EngineError> {
        let mut loss_sum = 0f64;
        for l in losses {
            loss_sum += l.to_dtype(DType::F64).and_then(|l| l.to_scalar::<f64>()).map_err(EngineError::tensor("loss"))?;
        }
        let local = (loss_sum / accum as f64) as f32;
        let loss = self.worker.run(move |c| {
            let mut l = [local];
            c.all_reduce_slice(&mut l, ReduceOp::Avg).map(|()| l[0])
        })??;
        Ok(f64::from(self.pipeline_loss(loss)?))
    }

    /// Global norm of the (still loss-scaled) gradients: squares summed per shard of the world's
    /// layout, shard sums added in rank order in f32 — computed locally where every rank holds whole
    /// gradients, with one all-reduce where each holds a shard, and bitwise the same either way.
    fn grad_norm_scaled(&self) -> Result<f64, EngineError> {
        if let Some(squared) = self.tensor_norm_squared()? {
            return Ok(f64::from(squared).sqrt());
        }
        let world = self.worker.world_size();
        // With expert parallelism no rank holds every expert: each sums its own shard, as under
        // reduce-scatter, an expert block's in its expert-data-parallel layout.
        let own_shard = self.experts.is_some() || self.cfg.strategy.grad_reduction() == GradReduction::ReduceScatter;
        let ranks: Vec<usize> = if own_shard { vec![self.worker.rank()] } else { (0..world).collect() };
        let sums = match self.pipeline_shard_sums(&ranks)? {
            Some(sums) => sums,
            None => {
                // The real (unpadded) elements of each rank's shard, per block.
                let rank_in = |i: usize, r: usize| match (&self.experts, self.model.expert_shard(i)) {
                    (Some(e), Some(_)) => e.edp.rank(),
                    _ => r,
                };
                let ranges: Vec<Vec<_>> = ranks.iter().map(|&r| self.params.iter().enumerate().map(|(i, p)| p.flat.layout().range(rank_in(i, r))).collect()).collect();
                grads::shard_sums(&self.grads, &ranges)?
            }
        };
        let total = if own_shard {
            let mine = sums[0] as f32;
            self.worker.run(move |c| {
                let mut s = [mine];
                c.all_reduce_slice(&mut s, ReduceOp::Sum).map(|()| s[0])
            })??
        } else {
            sums[1..].iter().fold(sums[0] as f32, |acc, &s| acc + s as f32)
        };
        Ok(f64::from(total).sqrt())
    }

    /// Refresh the parameters blocks compute on from the updated master weights; stages 1–2 gather
    /// every block's updated shards, all submitted before any is awaited.
    fn publish(&mut self) -> Result<(), EngineError> {
        let strategy = self.cfg.strategy;
        let nccl = self.nccl.as_ref();
        let mut pending = Vec::new();
        for (i, p) in self.params.iter_mut().enumerate() {
            match p.start_publish(&self.worker, strategy, nccl)? {
                // Device gathers finish at once (the compute stream waits, not the host), so only one
                // block's gathered buffer is alive next to the variables it replaces.
                Some(gather @ Gather::Device(_)) => p.finish_publish(gather)?,
                // Host gathers queue on the communication thread; the uploads overlap the later ones.
                Some(gather) => pending.push((i, gather)),
                None => {}
            }
        }
        for (i, gather) in pending {
            self.params[i].finish_publish(gather)?;
        }
        // The next step's first host read waits for the device: let the gathers finish under the watchdog.
        nccl_sync(nccl)
    }
}

/// Add block `i`'s slot gradients (`None` where a slot did not influence the loss) into the fp32
/// accumulators of the blocks that own them (itself, or the owner of a tied slot). A frozen slot has
/// no accumulator: whatever a block computed for it is dropped.
pub(super) fn add_slot_grads(model: &Model, params: &[BlockParams], grads: &mut [BlockGrads], i: usize, slot_grads: Vec<Option<Tensor>>) -> Result<(), EngineError> {
    for (slot, grad) in model.slots(i).iter().zip(slot_grads) {
        if let (Some(grad), false) = (grad, slot.frozen) {
            let range = params[slot.block].flat.range(slot.index);
            profile::scoped_as(Kind::Elementwise, "grad_accumulate", || grads[slot.block].accumulate(range, &grad)).map_err(EngineError::tensor(model.block(i).name()))?;
        }
    }
    Ok(())
}

/// Wait, with the group's timeout, for every NCCL collective issued so far (no-op without NCCL).
pub(super) fn nccl_sync(nccl: Option<&super::Nccl>) -> Result<(), EngineError> {
    match nccl {
        Some(n) => Ok(n.sync()?),
        None => Ok(()),
    }
}

/// NCCL over the group's GPUs when [`crate::device::use_nccl`] says so (a collective on every rank).
#[cfg(feature = "cuda")]
fn make_nccl(comm: &dyn Communicator, device: &Device) -> Result<Option<super::Nccl>, EngineError> {
    match device {
        Device::Cuda(d) if crate::device::use_nccl(device, comm.world_size()) => {
            // NCCL refuses two ranks on one GPU: every rank learns every rank's (host, GPU) first.
            let ordinal = match candle_core::backend::BackendDevice::location(d) {
                candle_core::DeviceLocation::Cuda { gpu_id } => gpu_id,
                _ => 0,
            };
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
            let host = host.trim().bytes().fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b))) % (1 << 16);
            // Exact in f32: below 2^24.
            let key = (host * 256 + (ordinal as u32 % 256)) as f32;
            let mut keys = vec![0f32; comm.world_size()];
            comm.all_gather_slice(&[key], &mut keys)?;
            let mut sorted = keys.clone();
            sorted.sort_by(f32::total_cmp);
            if sorted.windows(2).any(|w| w[0] == w[1]) {
                tracing::warn!("ranks share a GPU: gradients are reduced through the host, not NCCL");
                return Ok(None);
            }
            let timeout = crate::CommConfig::from_env()?.timeout;
            Ok(Some(super::Nccl::new(comm, d, timeout)?))
        }
        _ => Ok(None),
    }
}

#[cfg(not(feature = "cuda"))]
fn make_nccl(_: &dyn Communicator, _: &Device) -> Result<Option<super::Nccl>, EngineError> {
    Ok(None)
}
