//! The `Accelerator`: one entry point for a user's own training program, in the spirit of
//! HuggingFace Accelerate. From the same config file (and `--set` overrides) as `ferrospeed train`, it
//! finds this rank in the launcher's (torchrun's, Slurm's, Open MPI's) environment, forms the process
//! group, picks the device, claims the run directory, and then:
//!
//! - [`Accelerator::prepare`] turns the user's [`Model`] and optimizer into an [`Engine`] with the
//!   configured ZeRO stage, precision, accumulation, clipping and schedule (resuming from
//!   `checkpoint.dir` when asked): this is the only translation of the config into the engine's;
//! - [`Accelerator::data`] shards any [`Dataset`] over the ranks, deterministically, batches on the
//!   rank's device;
//! - [`Accelerator::log`], [`Accelerator::reduce`], [`Accelerator::gather`],
//!   [`Accelerator::save_checkpoint`], [`Accelerator::wait_for_everyone`] do the rest.
//!
//! ```no_run
//! # use ferrospeed::accelerator::{Accelerator, PrepareOptions};
//! # fn run(cfg: &ferrospeed::config::Config, model: ferrospeed::engine::Model, dataset: &dyn ferrospeed::data::Dataset) -> Result<(), ferrospeed::accelerator::AccelError> {
//! let mut acc = Accelerator::from_config(cfg)?;
//! let optimizer = acc.optimizer_from_config();
//! let mut engine = acc.prepare(model, optimizer, PrepareOptions::default())?;
//! let data = acc.data(dataset)?;
//! for batch in data.from_step(engine.steps_done()) {
//!     engine.forward_backward(&batch?)?;
//!     if let Some(stats) = engine.step()? {
//!         acc.log_step(&engine, &stats, 0, 0.0)?;
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! Every collective it issues goes through the engine's communication thread, so a program's own
//! collectives (metrics, barriers) and the engine's keep one order on every rank (invariant 2).

#![warn(missing_docs)]

mod args;
mod claim;
mod error;

pub use args::config_from_args;
pub use error::AccelError;

use crate::checkpoint::{self, Meta, SaveRequest};
use crate::comm::TensorCollectives;
use crate::comm::TcpCommunicator;
use crate::config::{Config, OptimizerKind, ReduceDtype};
use crate::data::{DataLoader, Dataset, Sampler, Sampling};
use crate::engine::{cut_for_stage, StageCut, CommWorker, Engine, EngineConfig, Model, OffloadSettings, PipelineStage, StepStats};
use crate::parallel::{stage_blocks, Axis, MeshComms, Schedule, ScheduleKind};
use crate::optim::{AdamW, LrSchedule, Optimizer, ParamGroups, Sgd};
use crate::precision::{LossScalerConfig, Precision};
use crate::track::{fresh_run_dir, StepMetrics, Tracker};
use claim::Claim;
use crate::{CommConfig, CommExt, ReduceOp, WorldInfo};
use candle_core::{DType, Device, Tensor};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// How a run's parameters are named outside the engine (checkpoint export, `model.init_from`).
#[derive(Debug, Clone, Copy)]
pub struct ParamNames {
    /// Recorded in checkpoints, so `ferrospeed checkpoint export` picks the same names later.
    pub tag: &'static str,
    /// `(block, parameter)` → name.
    pub map: fn(&str, &str) -> String,
    /// Open weight files for import: [`checkpoint::WeightFiles::open`], plus whatever layouts of the
    /// family's own the files may use (e.g. per-expert tensors for fused experts).
    pub open: fn(&Path) -> Result<checkpoint::WeightFiles, checkpoint::CheckpointError>,
}

impl ParamNames {
    /// `block.parameter`, e.g. `mlp.fc1.weight`: for models of the user's own.
    pub const BLOCK: ParamNames = ParamNames { tag: "block", map: block_dot_param, open: checkpoint::WeightFiles::open };
}

impl Default for ParamNames {
    fn default() -> Self {
        Self::BLOCK
    }
}

/// `block.param`.
pub fn block_dot_param(block: &str, param: &str) -> String {
    format!("{block}.{param}")
}

/// Choices of [`Accelerator::prepare`] besides the model and optimizer.
#[derive(Debug, Clone, Default)]
pub struct PrepareOptions {
    /// Weight decay and learning-rate scale per parameter.
    pub groups: ParamGroups,
    /// The parameters' outside names.
    pub names: ParamNames,
    /// What `model.init_from` fills: every parameter, or the frozen ones alone (the base of an adapter).
    pub init_from: checkpoint::ImportScope,
}

/// Choices of [`Accelerator::new`].
#[derive(Debug, Clone)]
pub struct Options {
    /// Names the fresh run directory (`runs/<name>-<time>/`) when `track.dir` is not set.
    pub run_name: String,
    /// Claim a run directory for metrics (off for benchmarks: nothing is written).
    pub track: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self { run_name: "run".into(), track: true }
    }
}

/// The key of [`Accelerator::record`] under which a checkpoint keeps its step's metrics row.
pub const CHECKPOINT_ROW: &str = "metrics_row";

/// What [`Accelerator::prepare`] resumed from.
#[derive(Debug, Clone)]
pub struct Resumed {
    /// The checkpoint folder.
    pub path: PathBuf,
    /// Its `meta.json`.
    pub meta: Meta,
}

/// One rank's handle on a distributed run (see the module documentation).
pub struct Accelerator {
    cfg: Config,
    world: WorldInfo,
    accumulation: usize,
    device: Device,
    worker: Arc<CommWorker>,
    tracker: Option<Tracker>,
    track_dir: PathBuf,
    names: ParamNames,
    resumed: Option<Resumed>,
    /// Extra entries of every checkpoint's `meta.json` `run` record (see [`Accelerator::record`]).
    extra_run: serde_json::Map<String, serde_json::Value>,
    import: Option<ImportReport>,
    /// Rank 0's locks on the job's directories and what this start added to them.
    claim: Option<Claim>,
    /// The mesh's groups, where `[parallel]` turns on more than data parallelism.
    parallel: Option<Parallel>,
    /// What `prepare` built of the pipeline, in one line.
    parallel_plan: Option<String>,
    /// A step was logged, a checkpoint saved or the run finished: the start succeeded, and a
    /// failure from now on keeps the run directory.
    started: std::sync::atomic::AtomicBool,
}

/// The groups of a mesh beyond data parallelism, and the schedule of its pipeline.
struct Parallel {
    comms: MeshComms,
    /// The data-parallel group's communication thread (the engine's collectives).
    dp: Arc<CommWorker>,
    /// The pipeline's schedule (`None`: no pipeline, expert parallelism alone).
    schedule: Option<Schedule>,
}

/// What `prepare` measured of importing `model.init_from` on this rank.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct ImportReport {
    /// Wall time of the import.
    pub seconds: f64,
    /// Bytes read and the largest block state held.
    pub stats: checkpoint::ImportStats,
    /// How far the peak resident memory rose above what the process held when the import began
    /// (`None` where the peak cannot be reset).
    pub host_growth_bytes: Option<u64>,
}

impl Accelerator {
    /// Set up this rank from `cfg` with the default [`Options`].
    pub fn from_config(cfg: &Config) -> Result<Self, AccelError> {
        Self::new(cfg, Options::default())
    }

    /// Set up this rank: rank and world from the environment (a single process without one), the batch
    /// arithmetic, the device (`train.device`, GPU `LOCAL_RANK`), the process group, and on rank 0 the
    /// locks on `track.dir` and `checkpoint.dir` and the run directory — refused on every rank if
    /// another job holds them or the directory already holds another run, before anything is trained.
    /// A start that fails before its first step (the `Accelerator` dropped before a step is logged
    /// or a checkpoint saved) removes what it added to them.
    pub fn new(cfg: &Config, options: Options) -> Result<Self, AccelError> {
        let world = WorldInfo::from_env()?;
        let mesh = cfg.mesh(world.world_size)?;
        let accumulation = cfg.accumulation_steps(mesh.size(Axis::Dp))?;
        let schedule = match cfg.parallel.pp {
            1 => None,
            pp => Some(Schedule::new(ScheduleKind::from(cfg.parallel.pp_schedule), pp, cfg.parallel.pp_virtual, accumulation).map_err(|e| crate::config::ConfigError::NotBuilt(e.to_string()))?),
        };
        let device = crate::device::select(cfg.train.device, world.local_rank).map_err(AccelError::Device)?;
        let comm: Arc<dyn crate::Communicator> = Arc::new(TcpCommunicator::connect(&world, &CommConfig::from_env()?)?);
        // The mesh's groups are split from the world before anything else uses it.
        let parallel = match schedule.is_some() || cfg.parallel.ep > 1 || cfg.parallel.tp > 1 || cfg.parallel.cp > 1 {
            false => None,
            true => {
                let comms = MeshComms::new(comm.clone(), mesh)?;
                let dp = Arc::new(CommWorker::spawn(comms.get(Axis::Dp).clone()));
                Some(Parallel { comms, dp, schedule })
            }
        };
        let worker = Arc::new(CommWorker::spawn(comm));
        let track_dir = cfg.track.dir.clone().unwrap_or_else(|| fresh_run_dir(Path::new("runs"), &options.run_name));
        let mut tracker = None;
        let mut claim = None;
        let mut refusal = None;
        if world.rank == 0 {
            let config_json = serde_json::to_value(cfg).map_err(|e| AccelError::RunDirRefused(format!("serialising the config: {e}")))?;
            // A run that resumes from its checkpoint continues its own directory (the same command
            // run again); anything else gets a directory of its own.
            // Where MLflow logs may come from the environment (MLFLOW_TRACKING_URI): read on rank 0,
            // and a bad value refused like a run directory, on every rank.
            let taken = cfg.track.outputs().map_err(|e| e.to_string()).and_then(|outputs| Claim::take(cfg, &track_dir, options.track, outputs, &config_json).map_err(|e| e.to_string()));
            match taken {
                Ok((c, t)) => (claim, tracker) = (Some(c), t),
                Err(e) => refusal = Some(e),
            }
        }
        // Every rank learns rank 0's reason (the launcher may report any rank's exit first): its
        // length, then its bytes, as exact small integers in f32 sums over zeros.
        let mine = refusal.clone().unwrap_or_default().into_bytes();
        let reason = worker.run(move |c| -> Result<Option<String>, crate::CommError> {
            let mut len = [mine.len() as f32];
            c.all_reduce_slice(&mut len, ReduceOp::Max)?;
            if len[0] == 0.0 {
                return Ok(None);
            }
            let mut bytes: Vec<f32> = (0..len[0] as usize).map(|i| mine.get(i).map_or(0.0, |&b| f32::from(b))).collect();
            c.all_reduce_slice(&mut bytes, ReduceOp::Sum)?;
            Ok(Some(String::from_utf8_lossy(&bytes.iter().map(|&b| b as u8).collect::<Vec<u8>>()).into_owned()))
        })??;
        let acc = Self { cfg: cfg.clone(), world, accumulation, device, worker, tracker, track_dir, names: ParamNames::BLOCK, resumed: None, extra_run: serde_json::Map::new(), import: None, claim, parallel, parallel_plan: None, started: false.into() };
        match reason {
            Some(reason) => Err(AccelError::RunDirRefused(reason)),
            None => Ok(acc),
        }
    }

    /// The optimizer `train.optimizer` names, with the config's hyper-parameters.
    pub fn optimizer_from_config(&self) -> Arc<dyn Optimizer> {
        let t = &self.cfg.train;
        match t.optimizer {
            OptimizerKind::AdamW => Arc::new(AdamW { beta1: t.beta1, beta2: t.beta2, eps: t.eps, weight_decay: t.weight_decay }),
            OptimizerKind::Sgd => Arc::new(Sgd { momentum: t.momentum, weight_decay: t.weight_decay, nesterov: false }),
        }
    }

    /// The engine's settings from the config: the one place the config becomes an [`EngineConfig`].
    pub fn engine_config(&self, optimizer: Arc<dyn Optimizer>, groups: ParamGroups) -> EngineConfig {
        let t = &self.cfg.train;
        let z = &self.cfg.zero;
        EngineConfig {
            checkpointing: t.activation_checkpointing,
            grad_clip: t.grad_clip,
            optimizer,
            param_groups: groups,
            seed: t.seed,
            strategy: z.strategy(),
            offload: OffloadSettings { nvme_dir: z.nvme_dir.clone(), pinned_budget: z.pinned_budget_mb * 1_000_000 },
            precision: t.precision,
            reduce_dtype: match t.grad_reduce_dtype {
                ReduceDtype::Fp32 => DType::F32,
                ReduceDtype::Compute => t.precision.compute_dtype(),
            },
            loss_scaler: (t.precision == Precision::Fp16).then_some(LossScalerConfig {
                initial: t.loss_scale_initial,
                growth_interval: t.loss_scale_growth_interval as u64,
                backoff: t.loss_scale_backoff,
                min: t.loss_scale_min,
            }),
            device: self.device.clone(),
            accumulation: self.accumulation,
            schedule: LrSchedule { lr: t.lr, min_lr: t.min_lr, warmup: t.warmup, total: t.steps },
            frozen_nf4: self.cfg.lora.as_ref().is_some_and(|l| l.base == crate::config::LoraBase::Nf4),
        }
    }

    /// The engine for `model` and `optimizer`: parameters initialised from `train.seed` (or
    /// `model.init_from`, named by `options.names`), then, with `checkpoint.resume` and a checkpoint
    /// in `checkpoint.dir`, its state (at any world size and stage). Every rank calls this.
    pub fn prepare(&mut self, model: Model, optimizer: Arc<dyn Optimizer>, options: PrepareOptions) -> Result<Engine, AccelError> {
        let cfg = self.engine_config(optimizer, options.groups);
        let mut engine = match &self.parallel {
            None => Engine::with_worker(model, self.worker.clone(), cfg)?,
            // Tensor parallelism (alone with data parallelism, so far).
            Some(par) if par.comms.mesh().size(Axis::Tp) > 1 && par.schedule.is_none() => {
                let tp = par.comms.mesh().size(Axis::Tp);
                let group = crate::parallel::TensorGroup::new(par.comms.get(Axis::Tp).clone()).with_sequence_parallel(self.cfg.parallel.sp);
                let cp = par.comms.mesh().size(Axis::Cp);
                let engine = if cp > 1 {
                    // Tensor and context parallelism: ZeRO and reductions over the data × context ranks.
                    let ring = self.cfg.parallel.cp_kind == crate::config::ContextKind::Ring;
                    let context = crate::parallel::ContextGroup::new(par.comms.get(Axis::Cp).clone()).with_ring(ring);
                    let dp_cp = Arc::new(CommWorker::spawn(par.comms.get(Axis::DpCp).clone()));
                    Engine::with_tensors_and_context(model, dp_cp, self.worker.clone(), group, context, cfg)?
                } else {
                    Engine::with_tensors(model, par.dp.clone(), self.worker.clone(), group, cfg)?
                };
                let m = engine.model();
                let split = (0..m.num_blocks()).filter(|&b| m.tensor_shard(b).is_some()).count();
                self.parallel_plan = Some(format!(
                    "tensor parallelism{}: {split} of {} blocks split over groups of {tp} ranks, ZeRO and gradient reductions over the {} data-parallel rank(s){}",
                    if self.cfg.parallel.sp { " with sequence parallelism" } else { "" },
                    m.num_blocks(),
                    par.comms.mesh().size(Axis::Dp),
                    if cp > 1 { format!(", each sequence split over {cp} context-parallel ranks") } else { String::new() }
                ));
                engine
            }
            // Context parallelism (alone with data parallelism, so far: the data × context-parallel
            // group is the world).
            Some(par) if par.comms.mesh().size(Axis::Cp) > 1 => {
                let cp = par.comms.mesh().size(Axis::Cp);
                let ring = self.cfg.parallel.cp_kind == crate::config::ContextKind::Ring;
                let group = crate::parallel::ContextGroup::new(par.comms.get(Axis::Cp).clone()).with_ring(ring);
                let engine = Engine::with_context(model, self.worker.clone(), group, cfg)?;
                self.parallel_plan = Some(format!(
                    "context parallelism ({}): each sequence split over groups of {cp} ranks, ZeRO and gradient reductions over all {} ranks",
                    if ring { "ring attention" } else { "Ulysses" },
                    self.world.world_size
                ));
                engine
            }
            // Expert parallelism without a pipeline: the data-parallel group is the world.
            Some(par) if par.schedule.is_none() => {
                let group = crate::parallel::ExpertGroup::new(par.comms.get(Axis::Ep).clone());
                let edp = Arc::new(CommWorker::spawn(par.comms.get(Axis::Edp).clone()));
                let engine = Engine::with_experts(model, self.worker.clone(), group, edp, cfg)?;
                let m = engine.model();
                let blocks: Vec<usize> = (0..m.num_blocks()).filter(|&b| m.block(b).experts() > 0).collect();
                let (ep, edp) = (par.comms.mesh().size(Axis::Ep), par.comms.mesh().size(Axis::Edp));
                let experts = blocks.first().map_or(0, |&b| m.block(b).experts());
                self.parallel_plan = Some(format!(
                    "expert parallelism: {} expert blocks of {experts} experts, {} on each rank of expert groups of {ep}, reduced over the {edp} rank(s) holding the same",
                    blocks.len(),
                    experts / ep
                ));
                engine
            }
            Some(par) => {
                let (engine, plan) = self.pipeline_engine(par, model, cfg)?;
                self.parallel_plan = Some(plan);
                engine
            }
        };
        self.names = options.names;
        if let Some(path) = &self.cfg.model.init_from {
            let t0 = std::time::Instant::now();
            let measured = crate::track::reset_peak_rss();
            let rss_before = crate::track::rss_bytes();
            let stats = (options.names.open)(path)
                .and_then(|files| checkpoint::load_consolidated_from(&mut engine, files, path, &options.names.map, options.init_from))
                .map_err(|source| AccelError::InitFrom { path: path.clone(), source })?;
            let host_growth_bytes = measured.then(|| crate::track::peak_rss_bytes().saturating_sub(rss_before));
            self.import = Some(ImportReport { seconds: t0.elapsed().as_secs_f64(), stats, host_growth_bytes });
        }
        // A PEFT adapter over that base: its tensors are `base_model.model.<outside name>`.
        if let Some(dir) = &self.cfg.model.adapter_from {
            let names = options.names.map;
            let peft = move |block: &str, param: &str| format!("base_model.model.{}", names(block, param));
            checkpoint::load_consolidated(&mut engine, &dir.join("adapter_model.safetensors"), &peft, checkpoint::ImportScope::Trainable)
                .map_err(|source| AccelError::AdapterFrom { path: dir.clone(), source })?;
        }
        if let (Some(dir), true) = (&self.cfg.checkpoint.dir, self.cfg.checkpoint.resume) {
            if let Some(found) = checkpoint::latest(dir)? {
                let meta = checkpoint::load_into(&mut engine, &found).map_err(|e| match e {
                    e @ (checkpoint::CheckpointError::Mismatch { .. } | checkpoint::CheckpointError::Corrupt { .. } | checkpoint::CheckpointError::Checksum { .. }) => AccelError::Resume { source: e },
                    e => e.into(),
                })?;
                self.resumed = Some(Resumed { path: found, meta });
            }
        }
        // A continued run directory keeps the rows of the steps the run continues from (and gets
        // the checkpoint's own row back if the run died before writing it).
        if let Some(t) = self.tracker.as_mut() {
            let step = self.resumed.as_ref().map_or(0, |r| r.meta.step);
            let row = self.resumed.as_ref().and_then(|r| r.meta.run.get(CHECKPOINT_ROW)).and_then(|v| match v {
                // The row's own text (see `record_checkpoint_row`): the line comes back as written.
                serde_json::Value::String(line) => Some(line.clone()),
                // Checkpoints of earlier versions hold the row as an object.
                other => serde_json::to_string(other).ok(),
            });
            t.rewind(step, row.as_deref())?;
        }
        Ok(engine)
    }

    /// This rank's stage of the pipeline (the apply function of pipeline parallelism): the blocks
    /// of every stage by cost (or `parallel.pp_split`), this stage's cut of `model`, the tie group.
    fn pipeline_engine(&self, par: &Parallel, model: Model, cfg: EngineConfig) -> Result<(Engine, String), AccelError> {
        let mesh = par.comms.mesh();
        let rank = mesh.coords(self.world.rank).pp;
        let pp = mesh.size(Axis::Pp);
        let schedule = par.schedule.as_ref().ok_or_else(|| crate::config::ConfigError::NotBuilt("a pipeline without a schedule".into()))?;
        let ranges = stage_blocks(&model.stage_costs(), pp * schedule.virtual_stages, &self.cfg.parallel.pp_split).map_err(|e| crate::config::ConfigError::NotBuilt(e.to_string()))?;
        let tp = mesh.size(Axis::Tp);
        let splits = model.tensor_splits();
        let StageCut { model: cut, owner_stage, tied, tie_stages, whole, metrics } = cut_for_stage(model, &ranges, rank, pp)?;
        // The tie group of each pipeline: its ranks at the stages holding tied parameters (a split
        // of the world, so every rank takes part; the others form groups of one).
        let tie = if tie_stages.is_empty() {
            None
        } else {
            let mut groups = Vec::new();
            for g in mesh.groups(Axis::Pp) {
                groups.push(tie_stages.iter().map(|&s| g[s]).collect::<Vec<_>>());
                groups.extend((0..g.len()).filter(|s| !tie_stages.contains(s)).map(|s| vec![g[s]]));
            }
            let split = self.worker.run(move |c| c.split("tie", &groups))??;
            Some(Arc::<dyn crate::Communicator>::from(split))
        };
        let ranks = (0..mesh.world()).map(|r| (mesh.coords(r).pp, mesh.coords(r).dp)).collect();
        let stage = PipelineStage { rank, schedule: schedule.clone(), p2p: par.comms.get(Axis::Pp).clone(), tie, world: self.worker.clone(), owner_stage, tied, whole, ranks, metrics };
        let plan = format!(
            "pipeline: {} stages of blocks {:?}, schedule {} over {} micro-batches (analytic bubble {:.1}%){}",
            ranges.len(),
            ranges,
            schedule.kind.name(),
            schedule.micro,
            100.0 * schedule.analytic_bubble(crate::parallel::Costs::UNIT),
            if tp > 1 { format!(", each stage split over tensor-parallel groups of {tp}{}", if self.cfg.parallel.sp { " with sequence parallelism" } else { "" }) } else { String::new() }
        );
        if tp > 1 {
            let group = crate::parallel::TensorGroup::new(par.comms.get(Axis::Tp).clone()).with_sequence_parallel(self.cfg.parallel.sp);
            return Ok((Engine::with_pipeline_tensors(cut, par.dp.clone(), stage, group, splits, cfg)?, plan));
        }
        Ok((Engine::with_pipeline(cut, par.dp.clone(), stage, cfg)?, plan))
    }

    /// The pipeline or expert parallelism [`Accelerator::prepare`] built, in one line (stages and
    /// their blocks, the schedule, its analytic bubble; the experts each rank holds); `None` without either.
    pub fn parallel_plan(&self) -> Option<&str> {
        self.parallel_plan.as_deref()
    }

    /// What importing `model.init_from` read, held and took on this rank, if it was imported.
    pub fn import_report(&self) -> Option<&ImportReport> {
        self.import.as_ref()
    }

    /// The checkpoint [`Accelerator::prepare`] resumed from, if any.
    ///
    /// (A program that records its step's metrics under [`CHECKPOINT_ROW`] before each save gets the
    /// row back in a continued run directory when it died between the save and the row.)
    pub fn resumed(&self) -> Option<&Resumed> {
        self.resumed.as_ref()
    }

    /// This rank's loader of `dataset`: which samples each micro-batch of each step holds (the same
    /// global batch at any world size), collated, on this rank's device. A dataset sampled in epochs
    /// must hold at least one global batch.
    pub fn data<'a, D: Dataset + ?Sized>(&self, dataset: &'a D) -> Result<DataLoader<'a, D>, AccelError> {
        let t = &self.cfg.train;
        // Data parallelism is over the data-parallel group: every stage of a pipeline reads its
        // group's micro-batches.
        let (dp, dp_rank) = self.data_parallel_coords();
        let sampler = Sampler::new(t.seed, dataset.sampling(), t.micro_batch, self.accumulation, dp, dp_rank, dataset.len())?;
        Ok(DataLoader::new(dataset, sampler, self.device.clone(), t.steps as u64))
    }

    /// A loader of held-out `dataset` for [`Engine::eval_loss`]: its samples in index order, in
    /// `batches` global batches of `train.global_batch` (0: every whole one), each rank its
    /// data-parallel share, every stage of a pipeline the same. The evaluated samples, and so the
    /// loss, are the same at any world size. Refused when the dataset holds no whole global batch.
    pub fn eval_data<'a, D: Dataset + ?Sized>(&self, dataset: &'a D, batches: usize) -> Result<DataLoader<'a, D>, AccelError> {
        let t = &self.cfg.train;
        let (dp, dp_rank) = self.data_parallel_coords();
        let sampler = Sampler::new(t.seed, Sampling::Epochs { shuffle: false }, t.micro_batch, self.accumulation, dp, dp_rank, dataset.len())?;
        let whole = (dataset.len() / sampler.global_batch()) as u64;
        let n = if batches == 0 { whole } else { (batches as u64).min(whole) };
        Ok(DataLoader::new(dataset, sampler, self.device.clone(), n))
    }

    /// The data-parallel group's size and this rank's place in it.
    fn data_parallel_coords(&self) -> (usize, usize) {
        match &self.parallel {
            None => (self.world.world_size, self.world.rank),
            Some(par) => (par.comms.mesh().size(Axis::Dp), par.comms.mesh().coords(self.world.rank).dp),
        }
    }

    /// Append one step's metrics to the run (rank 0; a no-op elsewhere).
    pub fn log(&mut self, metrics: &StepMetrics) -> Result<(), AccelError> {
        self.started.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = &mut self.tracker {
            t.log(metrics)?;
        }
        Ok(())
    }

    /// Log what [`Engine::step`] measured, with `tokens_per_step` tokens (0 when not counted) in
    /// `seconds`.
    pub fn log_step(&mut self, engine: &Engine, stats: &StepStats, tokens_per_step: u64, seconds: f64) -> Result<(), AccelError> {
        let step = engine.steps_done();
        let m = StepMetrics {
            step,
            loss: stats.loss,
            lr: stats.lr,
            grad_norm: stats.grad_norm,
            tokens: tokens_per_step * step,
            tokens_per_s: if seconds > 0.0 { tokens_per_step as f64 / seconds } else { 0.0 },
            mfu: None,
            step_ms: seconds * 1e3,
            peak_mem_bytes: crate::track::peak_rss_bytes(),
            loss_scale: stats.loss_scale,
            eval_loss: None,
            // The model's statistics (`Block::metrics`), e.g. an MoE router's load.
            extra: stats.metrics.iter().map(|(k, v)| (k.clone(), (*v).into())).collect(),
        };
        self.log(&m)
    }

    /// End a run stopped by a signal before its last step (no summary: the same command continues
    /// it; an MLflow server's run is marked KILLED).
    pub fn interrupted(mut self) {
        // A step was trained (the interrupt comes at a step's end): what the run wrote stays.
        self.started.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.tracker.take() {
            t.interrupted();
        }
    }

    /// Finish the run's outputs with `summary` (rank 0 writes `summary.json`).
    pub fn finish(mut self, summary: &serde_json::Value) -> Result<(), AccelError> {
        self.started.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.tracker.take() {
            t.finish(summary)?;
        }
        Ok(())
    }

    /// `t` reduced over every rank by `op` (f32, bf16 or f16, any device; e.g. a metric). A collective.
    pub fn reduce(&self, t: &Tensor, op: ReduceOp) -> Result<Tensor, AccelError> {
        let host = self.to_host(t)?;
        let out = self.worker.run(move |c| c.all_reduce_tensor(&host, op))??;
        self.back(out, t)
    }

    /// Every rank's `t` (all of one shape) concatenated along the first dimension in rank order. A
    /// collective.
    pub fn gather(&self, t: &Tensor) -> Result<Tensor, AccelError> {
        let host = self.to_host(t)?;
        let world = self.world.world_size;
        let numel = host.elem_count() * world;
        let flat = self.worker.run(move |c| c.all_gather_tensor(&host, numel))??;
        let mut dims = t.dims().to_vec();
        if dims.is_empty() {
            dims.push(1);
        }
        dims[0] *= world;
        let out = flat.reshape(dims).map_err(|e| crate::engine::EngineError::from_candle("gather".into(), e))?;
        self.back(out, t)
    }

    fn to_host(&self, t: &Tensor) -> Result<Tensor, AccelError> {
        let host = t.to_device(&Device::Cpu).and_then(|h| if h.dtype().is_float() { Ok(h) } else { h.to_dtype(DType::F32) });
        host.map_err(|e| crate::engine::EngineError::from_candle("a tensor to reduce".into(), e).into())
    }

    fn back(&self, out: Tensor, like: &Tensor) -> Result<Tensor, AccelError> {
        out.to_dtype(like.dtype())
            .and_then(|o| o.to_device(like.device()))
            .map_err(|e| crate::engine::EngineError::from_candle("a reduced tensor".into(), e).into())
    }

    /// Record `row`, the metrics of the step about to be saved, in every checkpoint from now (under
    /// [`CHECKPOINT_ROW`], as its JSON line): a run that dies between the save and its row gets the
    /// row back, byte for byte, when it continues.
    pub fn record_checkpoint_row(&mut self, row: &StepMetrics) -> Result<(), AccelError> {
        let line = serde_json::to_string(row).map_err(|source| crate::track::TrackError::Json { path: self.track_dir.join("metrics.jsonl"), source })?;
        self.record(CHECKPOINT_ROW, serde_json::Value::String(line));
        Ok(())
    }

    /// Record `value` under `key` in the `run` section of every checkpoint's `meta.json` (what an
    /// export needs later, e.g. the model's resolved `config.json` and its tokenizer).
    pub fn record(&mut self, key: &str, value: serde_json::Value) {
        self.extra_run.insert(key.to_string(), value);
    }

    /// Wait until every rank gets here.
    pub fn wait_for_everyone(&self) -> Result<(), AccelError> {
        Ok(self.worker.run(|c| c.barrier())??)
    }

    /// Save `engine`'s state in `checkpoint.dir` (a collective; crash-safe, see `checkpoint/`). Returns
    /// the checkpoint folder.
    pub fn save_checkpoint(&self, engine: &mut Engine) -> Result<PathBuf, AccelError> {
        self.started.store(true, std::sync::atomic::Ordering::Relaxed);
        let root = self.cfg.checkpoint.dir.as_deref().ok_or(AccelError::NoCheckpointDir { what: "save_checkpoint" })?;
        let mut run = serde_json::to_value(&self.cfg).unwrap_or_default();
        // The held-out loss of this step's recorded row, which `checkpoint.keep_best` ranks by.
        let eval_loss = self.extra_run.get(CHECKPOINT_ROW).and_then(|v| v.as_str()).and_then(|l| serde_json::from_str::<StepMetrics>(l).ok()).filter(|m| m.step == engine.steps_done()).and_then(|m| m.eval_loss);
        if let serde_json::Value::Object(m) = &mut run {
            m.insert("param_names".into(), self.names.tag.into());
            m.extend(self.extra_run.clone());
            m.insert("eval_loss".into(), eval_loss.into());
        }
        let req = SaveRequest { root, samples: engine.steps_done() * self.cfg.train.global_batch as u64, keep: self.cfg.checkpoint.keep, keep_best: self.cfg.checkpoint.keep_best, run };
        Ok(checkpoint::save(engine, &req)?)
    }

    /// Whether `checkpoint.every` asks for a checkpoint after `steps_done` steps.
    pub fn checkpoint_due(&self, steps_done: u64) -> bool {
        let every = self.cfg.checkpoint.every as u64;
        self.cfg.checkpoint.dir.is_some() && every > 0 && steps_done % every == 0
    }

    /// Whether this is rank 0 (the one that prints and writes the run's files).
    pub fn is_main_process(&self) -> bool {
        self.world.rank == 0
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.world.rank
    }

    /// Number of ranks.
    pub fn world_size(&self) -> usize {
        self.world.world_size
    }

    /// The rank's place in the job (local rank, node, store).
    pub fn world(&self) -> &WorldInfo {
        &self.world
    }

    /// Where this rank computes.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The run's config.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Ranks of the data-parallel group (the world, but in a mesh: `world / (pp · tp · cp)`).
    pub fn data_parallel_size(&self) -> usize {
        self.parallel.as_ref().map_or(self.world.world_size, |p| p.comms.mesh().size(Axis::Dp))
    }

    /// This rank's place in the data-parallel group (its rank, but in a mesh: every stage of a
    /// pipeline has the same, and reads the same micro-batches).
    pub fn data_parallel_rank(&self) -> usize {
        self.parallel.as_ref().map_or(self.world.rank, |p| p.comms.mesh().coords(self.world.rank).dp)
    }

    /// Micro-batches per rank per optimizer step (`global_batch / (micro_batch × data-parallel size)`).
    pub fn accumulation(&self) -> usize {
        self.accumulation
    }

    /// The run directory (metrics, TensorBoard, config, summary).
    pub fn track_dir(&self) -> &Path {
        &self.track_dir
    }

    /// The communication thread every collective of this rank goes through.
    pub fn comm(&self) -> &CommWorker {
        &self.worker
    }

    /// The run's tracker (rank 0 only).
    pub fn tracker(&self) -> Option<&Tracker> {
        self.tracker.as_ref()
    }
}

impl Drop for Accelerator {
    /// A start that failed before its first step leaves nothing behind (see [`Accelerator::new`]);
    /// otherwise the locks are released.
    fn drop(&mut self) {
        if let Some(claim) = self.claim.take() {
            if *self.started.get_mut() {
                drop(self.tracker.take());
                drop(claim);
            } else {
                claim.abandon(self.tracker.take());
            }
        }
    }
}
