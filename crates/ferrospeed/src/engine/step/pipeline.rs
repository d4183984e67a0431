//! Pipeline parallelism in the engine: a stage holds a contiguous run of the model's blocks (and the
//! owners of tied parameters they use, as ghosts), and one executor runs its rank's list of actions
//! from a [`Schedule`]: a forward receives the previous stage's outputs and sends its own on, a
//! backward receives the gradients of its outputs and sends those of its inputs back. Sends go
//! through a sender thread (`pipe_wire.rs`), receives wait, so the schedule's order is the only
//! order there is.
//!
//! Under a zero-bubble schedule a backward is two actions: the input half (`I`) sends the gradients
//! of the stage's inputs back and keeps each block's parameter work (`blockwise::backward_span_input`),
//! the weight half (`W`) runs it later, where the stage would otherwise wait.
//!
//! The arithmetic is the whole model's: a stage's backwards (or weight halves) run in micro-batch
//! order and each block's gradient is accumulated and reduced (over the stage's data-parallel group)
//! exactly as at `pp = 1`; the loss is the last stage's, averaged over its data-parallel group and handed to every
//! rank; the gradient norm adds the same per-block, per-shard sums in the same order. Tied
//! parameters are the exception: their two ends' gradients are each accumulated over the
//! micro-batches and then summed over the tie group (as Megatron sums the embedding group), where
//! `pp = 1` interleaves them micro-batch by micro-batch — equal to rounding, not bitwise.

use super::block::Batch;
use super::blockwise::{self, ParamSource};
use super::comm_worker::CommWorker;
use super::error::EngineError;
use super::grads;
use super::model::{Model, StageModel};
use super::pipe_wire::{self, Flow, Sender};
use super::sources::{Gathering, Resident};
use super::trainer::Engine;
use crate::comm::{Buf, BufMut, CommExt, Communicator, ReduceOp};
use crate::parallel::{Op, Schedule};
use crate::profile::{self, Kind};
use crate::shard::{FlatParam, ParamPlacement};
use super::block::ParamSpec;
use candle_core::Tensor;
use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

/// A rank's place in a pipeline, for [`Engine::with_pipeline`].
pub struct PipelineStage {
    /// This rank's place in the pipeline (its rank in `p2p`): it runs stages `rank`, `rank + pp`, …
    pub rank: usize,
    /// The schedule every rank runs (its `micro` is the accumulation, its `virtual_stages` the
    /// stages a rank holds).
    pub schedule: Schedule,
    /// The pipeline group: its ranks in pipeline order.
    pub p2p: Arc<dyn Communicator>,
    /// The tie group (the pipeline ranks holding tied parameters, at this rank's data-parallel
    /// coordinates), where there are ties across ranks.
    pub tie: Option<Arc<dyn Communicator>>,
    /// The whole job's communication thread (what `Engine::comm` issues on).
    pub world: Arc<CommWorker>,
    /// The stage that owns each block of the whole model (stage `s` runs on pipeline rank `s % pp`).
    pub owner_stage: Vec<usize>,
    /// Blocks of the whole model whose parameters are held on more than one stage (their gradients
    /// are summed over `tie`).
    pub tied: Vec<usize>,
    /// Every block of the whole model: its name and parameters (what a checkpoint records).
    pub whole: Vec<(String, Vec<ParamSpec>)>,
    /// (pipeline rank, data-parallel rank) of every rank of the world (whose file holds what).
    pub ranks: Vec<(usize, usize)>,
    /// The names of the statistics the model's last block returns (`Block::metrics`, [`StageCut::metrics`]).
    pub metrics: Vec<String>,
}

/// The cut of a model for one rank of a pipeline (the apply function of pipeline parallelism):
/// `ranges` are every stage's blocks (see [`crate::parallel::stage_blocks`]), stage `s` on pipeline
/// rank `s % pp`. Returns the rank's part, the stage owning each block, the blocks held on several
/// ranks (tied parameters) and the pipeline ranks holding them.
pub fn cut_for_stage(model: Model, ranges: &[Range<usize>], rank: usize, pp: usize) -> Result<StageCut, EngineError> {
    let n = model.num_blocks();
    let whole = (0..n).map(|i| (model.block_names()[i].clone(), model.own_params(i).to_vec())).collect();
    let mut owner_stage = vec![0; n];
    for (s, r) in ranges.iter().enumerate() {
        owner_stage[r.clone()].iter_mut().for_each(|o| *o = s);
    }
    // For each owner block used on another rank: the ranks holding it.
    let mut holders: HashMap<usize, Vec<usize>> = HashMap::new();
    for (s, r) in ranges.iter().enumerate() {
        for i in r.clone() {
            for src in model.slots(i) {
                let owner = owner_stage[src.block] % pp;
                if owner != s % pp {
                    let h = holders.entry(src.block).or_insert_with(|| vec![owner]);
                    if !h.contains(&(s % pp)) {
                        h.push(s % pp);
                    }
                }
            }
        }
    }
    let mut tied: Vec<usize> = holders.keys().copied().collect();
    tied.sort_unstable();
    let mut tie_stages: Vec<usize> = Vec::new();
    for b in &tied {
        let mut h = holders[b].clone();
        h.sort_unstable();
        if !tie_stages.is_empty() && tie_stages != h {
            return Err(EngineError::Unsupported(format!(
                "tied parameters held on pipeline ranks {tie_stages:?} and on ranks {h:?}: one set of ranks per pipeline is supported; change parallel.pp_split"
            )));
        }
        tie_stages = h;
    }
    let chunks: Vec<Range<usize>> = ranges.iter().skip(rank).step_by(pp).cloned().collect();
    let metrics = model.block(n - 1).metrics();
    let cut = model.cut(&chunks)?;
    Ok(StageCut { model: cut, owner_stage, tied, tie_stages, whole, metrics })
}

/// What [`cut_for_stage`] gives a stage.
pub struct StageCut {
    /// The stage's blocks, after its ghosts.
    pub model: StageModel,
    /// The stage that owns each block of the whole model.
    pub owner_stage: Vec<usize>,
    /// The blocks held on several stages (tied parameters), in the whole model's indices.
    pub tied: Vec<usize>,
    /// The pipeline ranks holding them (empty without ties across ranks).
    pub tie_stages: Vec<usize>,
    /// Every block of the whole model: name and parameters.
    pub whole: Vec<(String, Vec<ParamSpec>)>,
    /// The names of the statistics the model's last block returns (`Block::metrics`).
    pub metrics: Vec<String>,
}

/// What the engine keeps of its place in the pipeline.
pub(super) struct Pipe {
    /// This rank in the pipeline group, and the group's size.
    rank: usize,
    ranks_in_pipe: usize,
    /// Stages over all ranks (`pp · pp_virtual`).
    stages: usize,
    actions: Vec<crate::parallel::Action>,
    micro: usize,
    p2p: Arc<dyn Communicator>,
    sender: Sender,
    /// Messages received before the action that wanted them (a neighbour sent them earlier).
    mailbox: HashMap<(usize, Flow, usize, usize), Vec<Option<Tensor>>>,
    tie: Option<Arc<dyn Communicator>>,
    pub(super) world: Arc<CommWorker>,
    /// How many ghosts come first in the stage model.
    ghosts: usize,
    /// The blocks of each of this rank's stages (`rank`, `rank + pp`, …), in the stage model's indices.
    runs: Vec<Range<usize>>,
    /// The whole model's index of each block of the stage model.
    original: Vec<usize>,
    owner_stage: Vec<usize>,
    /// Blocks of the stage model whose gradients are summed over `tie`, in the whole model's order.
    tied: Vec<usize>,
    whole: Vec<(String, Vec<ParamSpec>)>,
    ranks: Vec<(usize, usize)>,
    /// The names of the last block's statistics (every rank knows them; the last stage computes them).
    pub(super) metrics: Vec<String>,
    /// A step failed part-way: messages, sends and reductions of it may be left, so no other step runs.
    failed: Option<String>,
}

impl Pipe {
    pub(super) fn new(cut: &StageModel, p: PipelineStage) -> Result<Self, EngineError> {
        let n = p.p2p.world_size();
        let v = p.schedule.virtual_stages;
        if p.rank >= n || p.schedule.ranks != n || cut.runs.len() != v {
            return Err(EngineError::Unsupported(format!(
                "a pipeline of {n} rank(s) holding {} stage(s) each, with a schedule for {} rank(s) × {v} virtual stage(s)",
                cut.runs.len(),
                p.schedule.ranks
            )));
        }
        // In the whole model's order on every rank of the tie group (one all-reduce each, in the same
        // order everywhere): a rank's ghosts come first in its stage model, its own tied blocks after.
        let mut tied: Vec<usize> = (0..cut.original.len()).filter(|&i| p.tied.contains(&cut.original[i])).collect();
        tied.sort_by_key(|&i| cut.original[i]);
        if !tied.is_empty() && p.tie.is_none() {
            return Err(EngineError::Unsupported("a stage with tied parameters needs the tie group".into()));
        }
        Ok(Self {
            rank: p.rank,
            ranks_in_pipe: n,
            stages: n * v,
            actions: p.schedule.actions[p.rank].clone(),
            micro: p.schedule.micro,
            sender: Sender::spawn(p.p2p.clone()),
            mailbox: HashMap::new(),
            p2p: p.p2p,
            tie: p.tie,
            world: p.world,
            ghosts: cut.ghosts,
            runs: cut.runs.clone(),
            original: cut.original.clone(),
            owner_stage: p.owner_stage,
            tied,
            whole: p.whole,
            ranks: p.ranks,
            metrics: p.metrics,
            failed: None,
        })
    }

    /// Whether this rank holds the last stage (the loss).
    pub(super) fn is_last(&self) -> bool {
        self.rank + 1 == self.ranks_in_pipe
    }

    /// The pipeline rank that runs `stage`.
    fn rank_of(&self, stage: usize) -> usize {
        stage % self.ranks_in_pipe
    }

    /// How many ghosts come first in the stage model.
    pub(super) fn ghosts(&self) -> usize {
        self.ghosts
    }

    /// The whole model's index of each block of the stage model.
    pub(super) fn original(&self) -> &[usize] {
        &self.original
    }

    /// Every block of the whole model: its name and parameters.
    pub(super) fn whole(&self) -> &[(String, Vec<ParamSpec>)] {
        &self.whole
    }

    /// Whether world rank `r` saves block `b` of the whole model (its stage owns it): its
    /// data-parallel rank if so.
    pub(super) fn holder(&self, r: usize, b: usize) -> Option<usize> {
        let (stage_rank, dp) = self.ranks[r];
        (self.rank_of(self.owner_stage[b]) == stage_rank).then_some(dp)
    }

    /// The stage model's blocks of `stage` (one of this rank's).
    fn run_of(&self, stage: usize) -> Range<usize> {
        self.runs[stage / self.ranks_in_pipe].clone()
    }

    /// The inputs of (`stage`, micro-batch `k`): the previous stage's outputs.
    fn receive_inputs(&mut self, stage: usize, k: usize, device: &candle_core::Device) -> Result<Vec<Tensor>, EngineError> {
        let got = profile::scoped_as(Kind::Communication, "pipe_recv", || self.receive(stage - 1, Flow::Activations, stage, k, device))?;
        got.into_iter().map(|t| t.ok_or_else(|| EngineError::Model("a stage boundary lost a tensor".into()))).collect()
    }

    /// What the rank of `from_stage` sent for `stage` (`flow` of micro-batch `micro`): from the
    /// mailbox, or received now, keeping what arrives first for the actions that want it.
    fn receive(&mut self, from_stage: usize, flow: Flow, stage: usize, micro: usize, device: &candle_core::Device) -> Result<Vec<Option<Tensor>>, EngineError> {
        let peer = self.rank_of(from_stage);
        loop {
            if let Some(t) = self.mailbox.remove(&(peer, flow, stage, micro)) {
                return Ok(t);
            }
            let (tag, tensors) = pipe_wire::receive(self.p2p.as_ref(), peer, device)?;
            self.mailbox.insert((peer, tag.flow, tag.stage, tag.micro), tensors);
        }
    }
}

impl Engine {
    /// The engine of one pipeline stage: `cut` (from [`cut_for_stage`]) on the stage's
    /// data-parallel group's communication thread `dp`, in the pipeline `stage`. Runs whole steps
    /// with [`Engine::train_step`].
    pub fn with_pipeline(cut: StageModel, dp: Arc<CommWorker>, stage: PipelineStage, cfg: super::EngineConfig) -> Result<Self, EngineError> {
        let pipe = Pipe::new(&cut, stage)?;
        if cfg.accumulation != pipe.micro {
            return Err(EngineError::Unsupported(format!("the schedule has {} micro-batches, the step {}", pipe.micro, cfg.accumulation)));
        }
        let mut engine = Self::with_worker(cut.model, dp, cfg)?;
        engine.pipe = Some(Box::new(pipe));
        Ok(engine)
    }

    /// A checkpoint's layout in a pipeline: every block of the whole model over the data-parallel
    /// group, held by the files of its stage's ranks; the ghosts are not saved (their owner's are).
    pub(super) fn pipeline_checkpoint_plan(&self) -> Option<super::state::CheckpointPlan> {
        let pipe = self.pipe.as_ref()?;
        let dp = self.worker.world_size();
        let blocks: Vec<(String, FlatParam)> = pipe.whole.iter().map(|(n, specs)| (n.clone(), FlatParam::new(specs, dp))).collect();
        let files = pipe
            .ranks
            .iter()
            .map(|&(r, d)| blocks.iter().enumerate().map(|(b, (_, f))| if pipe.rank_of(pipe.owner_stage[b]) == r { f.layout().range(d) } else { 0..0 }).collect())
            .collect();
        let local = pipe.original.iter().enumerate().map(|(i, &o)| (o, i >= pipe.ghosts)).collect();
        let placement = vec![(self.worker.rank(), 0); pipe.original.len()];
        Some(super::state::CheckpointPlan { blocks, files, local, placement, tensor: None })
    }

    /// Whether the engine runs one stage of a pipeline.
    pub fn is_pipeline(&self) -> bool {
        self.pipe.is_some()
    }

    /// One step of the schedule over `micro_batches` (every stage gets the same ones: the first
    /// reads the inputs, the last the targets).
    pub(super) fn pipeline_micro_batches(&mut self, micro_batches: &[Batch]) -> Result<(), EngineError> {
        let t0 = Instant::now();
        self.with_pipe(|engine, pipe| engine.run_schedule(pipe, micro_batches))?;
        self.acc.seconds += t0.elapsed().as_secs_f64();
        Ok(())
    }

    /// An evaluation's forwards (`Engine::eval_loss`): the last stage's losses of `micro_batches`.
    pub(super) fn pipeline_forwards(&mut self, micro_batches: &[Batch]) -> Result<Vec<Tensor>, EngineError> {
        self.with_pipe(|engine, pipe| engine.run_forwards(pipe, micro_batches))
    }

    /// `f` on the pipeline, which a failure part-way leaves refusing every later pass (messages,
    /// sends and reductions of the failed one may be left).
    fn with_pipe<T>(&mut self, f: impl FnOnce(&mut Self, &mut Pipe) -> Result<T, EngineError>) -> Result<T, EngineError> {
        let mut pipe = self.pipe.take().ok_or_else(|| EngineError::Unsupported("not a pipeline stage".into()))?;
        if let Some(first) = &pipe.failed {
            let e = EngineError::Unsupported(format!("an earlier step of this pipeline failed part-way ({first}): restart the run (it resumes from its checkpoint)"));
            self.pipe = Some(pipe);
            return Err(e);
        }
        let result = f(self, &mut pipe);
        if let Err(e) = &result {
            pipe.failed = Some(e.to_string().lines().next().unwrap_or_default().to_string());
        }
        self.pipe = Some(pipe);
        result
    }

    /// Each micro-batch in order through each of this rank's stages in order, keeping nothing for a
    /// backward; sends never block, so the ranks cannot wait on each other in a cycle.
    fn run_forwards(&mut self, pipe: &mut Pipe, batches: &[Batch]) -> Result<Vec<Tensor>, EngineError> {
        let device = self.cfg.device.clone();
        let last_stage = pipe.stages - 1;
        let stages: Vec<usize> = (0..pipe.runs.len()).map(|c| c * pipe.ranks_in_pipe + pipe.rank).collect();
        let mut losses = Vec::new();
        for (k, batch) in batches.iter().enumerate() {
            for &stage in &stages {
                let run = pipe.run_of(stage);
                let input = if stage == 0 { Vec::new() } else { pipe.receive_inputs(stage, k, &device)? };
                let Self { model, worker, params, cfg, nccl, .. } = self;
                let mut resident = Resident { model, params };
                let mut gathering = Gathering::new(model, params, worker, nccl.as_ref());
                let source: &mut dyn ParamSource = match cfg.strategy.param_placement() {
                    ParamPlacement::Resident => &mut resident,
                    ParamPlacement::Gathered => &mut gathering,
                };
                let (_, out) = blockwise::forward_span(model, &mut super::eval::Forwards(source), batch, true, run.clone(), input)?;
                if stage == last_stage {
                    losses.push(blockwise::scalar_loss(model, run.end - 1, out)?);
                } else {
                    super::trainer::nccl_sync(nccl.as_ref())?;
                    let outs: Vec<Option<Tensor>> = out.into_iter().map(Some).collect();
                    pipe.sender.post(pipe_wire::pack(pipe.rank_of(stage + 1), Flow::Activations, stage + 1, k, &outs)?)?;
                }
                let peak = gathering.peak_bytes;
                self.gathered_peak = self.gathered_peak.max(peak);
            }
        }
        pipe.sender.flush()?;
        if !pipe.mailbox.is_empty() {
            return Err(EngineError::Unsupported(format!("{} message(s) from other stages were never used: the ranks evaluate different batches", pipe.mailbox.len())));
        }
        Ok(losses)
    }

    fn run_schedule(&mut self, pipe: &mut Pipe, batches: &[Batch]) -> Result<(), EngineError> {
        let m = pipe.micro;
        if batches.len() != m {
            return Err(EngineError::Unsupported(format!("the pipeline's schedule takes {m} micro-batches a step, train_step got {}", batches.len())));
        }
        self.begin_accumulation()?;
        let loss_scale = self.acc.loss_scale.unwrap_or(1.0) / m as f64;
        let device = self.cfg.device.clone();
        let mut tapes = HashMap::new();
        let mut weights: HashMap<(usize, usize), blockwise::WeightTape> = HashMap::new();
        let mut losses: Vec<Option<Tensor>> = vec![None; m];
        let mut metrics: Vec<Vec<Tensor>> = vec![Vec::new(); m];
        let last_stage = pipe.stages - 1;
        let world_rank = pipe.world.rank();
        for (a, action) in pipe.actions.clone().into_iter().enumerate() {
            if a == pipe.actions.len() / 2 {
                crate::checkpoint::fault_at("mid-schedule", self.step + 1, world_rank);
            }
            let (k, stage) = (action.micro, action.stage);
            let run = pipe.run_of(stage);
            let batch = &batches[k];
            let Self { model, worker, params, grads, cfg, nccl, acc, .. } = self;
            let mut resident = Resident { model, params };
            let mut gathering = Gathering::new(model, params, worker, nccl.as_ref());
            let source: &mut dyn ParamSource = match cfg.strategy.param_placement() {
                ParamPlacement::Resident => &mut resident,
                ParamPlacement::Gathered => &mut gathering,
            };
            // Each stage's backwards (or weight halves) run in micro-batch order: the last one completes
            // its blocks' gradients, which are reduced as they finish.
            let last = k + 1 == m;
            let pending = &mut acc.pending;
            let accumulate = |i: usize, slot_grads: Vec<Option<Tensor>>| -> Result<(), EngineError> {
                super::trainer::add_slot_grads(model, params, grads, i, slot_grads)?;
                if last {
                    pending.push((i, grads[i].start_reduce(worker, nccl.as_ref(), cfg.reduce_dtype)?));
                }
                Ok(())
            };
            match action.op {
                Op::Forward => {
                    let input = if stage == 0 {
                        Vec::new()
                    } else {
                        let t = Instant::now();
                        let got = pipe.receive_inputs(stage, k, &device)?;
                        acc.pipeline_wait += t.elapsed().as_secs_f64();
                        got
                    };
                    let t = Instant::now();
                    let (tape, out) = blockwise::forward_span(model, source, batch, cfg.checkpointing, run.clone(), input)?;
                    acc.pipeline_compute.forward += t.elapsed().as_secs_f64();
                    if stage == last_stage {
                        let (loss, stats) = blockwise::loss_and_metrics(model, run.end - 1, out)?;
                        losses[k] = Some(loss);
                        metrics[k] = stats;
                    } else {
                        let outs: Vec<Option<Tensor>> = out.into_iter().map(Some).collect();
                        // Copying the outputs to the host waits for the device, which may wait for this
                        // action's NCCL gathers: let them finish under the watchdog first.
                        super::trainer::nccl_sync(nccl.as_ref())?;
                        let to = pipe.rank_of(stage + 1);
                        pipe.sender.post(pipe_wire::pack(to, Flow::Activations, stage + 1, k, &outs)?)?;
                    }
                    tapes.insert((stage, k), tape);
                }
                Op::Backward | Op::BackwardInput => {
                    let tape = tapes.remove(&(stage, k)).ok_or_else(|| EngineError::Unsupported(format!("the schedule runs the backward of stage {stage}, micro-batch {k} before its forward")))?;
                    let upstream = if stage == last_stage {
                        None
                    } else {
                        let t = Instant::now();
                        let got = profile::scoped_as(Kind::Communication, "pipe_recv", || pipe.receive(stage + 1, Flow::Gradients, stage, k, &device))?;
                        acc.pipeline_wait += t.elapsed().as_secs_f64();
                        Some(got)
                    };
                    let t = Instant::now();
                    let grad_in = if action.op == Op::Backward {
                        blockwise::backward_span(model, source, batch, tape, upstream, loss_scale, accumulate)?
                    } else {
                        // The input half: the stage before waits for it; the weight half runs later.
                        let (grad_in, work) = blockwise::backward_span_input(model, source, batch, tape, upstream, loss_scale)?;
                        weights.insert((stage, k), work);
                        grad_in
                    };
                    acc.pipeline_compute.backward += t.elapsed().as_secs_f64();
                    if stage > 0 {
                        super::trainer::nccl_sync(nccl.as_ref())?;
                        let to = pipe.rank_of(stage - 1);
                        pipe.sender.post(pipe_wire::pack(to, Flow::Gradients, stage - 1, k, &grad_in)?)?;
                    }
                }
                Op::BackwardWeight => {
                    let work = weights.remove(&(stage, k)).ok_or_else(|| EngineError::Unsupported(format!("the schedule runs the weight gradient of stage {stage}, micro-batch {k} before its input gradient")))?;
                    let t = Instant::now();
                    blockwise::weight_span(model, work, accumulate)?;
                    acc.pipeline_compute.weight += t.elapsed().as_secs_f64();
                }
            }
            self.gathered_peak = self.gathered_peak.max(gathering.peak_bytes);
        }
        // The ghosts' gradients are complete once every stage of the rank is done.
        for g in 0..pipe.ghosts {
            let p = self.grads[g].start_reduce(&self.worker, self.nccl.as_ref(), self.cfg.reduce_dtype)?;
            self.acc.pending.push((g, p));
        }
        let t = Instant::now();
        pipe.sender.flush()?;
        self.acc.pipeline_wait += t.elapsed().as_secs_f64();
        if !tapes.is_empty() || !weights.is_empty() {
            return Err(EngineError::Unsupported(format!("the schedule left {} forward(s) without their backward and {} backward(s) without their weight half", tapes.len(), weights.len())));
        }
        if !pipe.mailbox.is_empty() {
            return Err(EngineError::Unsupported(format!("{} message(s) from other stages were never used: the ranks run different schedules", pipe.mailbox.len())));
        }
        self.acc.losses = losses.into_iter().flatten().collect();
        // The last stage's statistics (`Block::metrics`), one list per micro-batch.
        self.acc.metrics = if pipe.is_last() { metrics } else { Vec::new() };
        self.acc.done = m;
        Ok(())
    }

    /// After the data-parallel reductions: tied parameters' gradients summed over the tie group.
    pub(super) fn pipeline_ties(&mut self) -> Result<(), EngineError> {
        let Some(pipe) = self.pipe.as_ref() else { return Ok(()) };
        let Some(tie) = pipe.tie.as_ref() else { return Ok(()) };
        for &b in &pipe.tied {
            self.grads[b].tie_sum(tie.as_ref())?;
        }
        Ok(())
    }

    /// The mean loss of the step: the last stage's, averaged over its data-parallel group, on every
    /// rank (the other stages add zeros).
    /// The last stage's statistics (means over its data-parallel group) on every rank of the
    /// pipeline; as they are without one.
    pub(super) fn pipeline_metrics(&self, dp_mean: Vec<f32>) -> Result<Vec<f32>, EngineError> {
        let Some(pipe) = self.pipe.as_ref() else { return Ok(dp_mean) };
        let mut v = if pipe.is_last() { dp_mean } else { vec![0f32; dp_mean.len()] };
        pipe.p2p.all_reduce_slice(&mut v, ReduceOp::Sum)?;
        Ok(v)
    }

    pub(super) fn pipeline_loss(&self, dp_mean: f32) -> Result<f32, EngineError> {
        let Some(pipe) = self.pipe.as_ref() else { return Ok(dp_mean) };
        let mut l = [if pipe.is_last() { dp_mean } else { 0.0 }];
        pipe.p2p.all_reduce_slice(&mut l, ReduceOp::Sum)?;
        Ok(l[0])
    }

    /// The per-rank sums of squares of the whole model's gradients, as `grads::shard_sums` gives
    /// them at `pp = 1`: each stage's per-block, per-shard sums (its ghosts left out), exchanged
    /// bit for bit over the pipeline group and added in block order.
    pub(super) fn pipeline_shard_sums(&self, ranks: &[usize]) -> Result<Option<Vec<f64>>, EngineError> {
        let Some(pipe) = self.pipe.as_ref() else { return Ok(None) };
        let blocks = pipe.owner_stage.len();
        // table[r][b] for this stage's own blocks; zeros elsewhere.
        let mut mine = vec![0f64; ranks.len() * blocks];
        for i in pipe.ghosts..pipe.original.len() {
            let ranges: Vec<Vec<Range<usize>>> = ranks.iter().map(|&r| vec![self.params[i].flat.layout().range(r)]).collect();
            let sums = grads::shard_sums(std::slice::from_ref(&self.grads[i]), &ranges)?;
            for (ri, s) in sums.into_iter().enumerate() {
                mine[ri * blocks + pipe.original[i]] = s;
            }
        }
        // f64 bits as pairs of f32 words: an all-gather moves bytes, never rounds them.
        let words: Vec<f32> = mine.iter().flat_map(|x| {
            let b = x.to_bits();
            [f32::from_bits(b as u32), f32::from_bits((b >> 32) as u32)]
        }).collect();
        let mut all = vec![0f32; words.len() * pipe.ranks_in_pipe];
        pipe.p2p.all_gather(Buf::F32(&words), BufMut::F32(&mut all))?;
        let value = |s: usize, k: usize| {
            let w = &all[s * words.len() + 2 * k..];
            f64::from_bits(u64::from(w[0].to_bits()) | (u64::from(w[1].to_bits()) << 32))
        };
        Ok(Some(
            (0..ranks.len())
                .map(|ri| (0..blocks).map(|b| value(pipe.rank_of(pipe.owner_stage[b]), ri * blocks + b)).sum::<f64>())
                .collect(),
        ))
    }

}
