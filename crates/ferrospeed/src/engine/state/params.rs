//! One block's parameters under a strategy: fp32 master weights and optimizer state over the window of
//! the flat buffer this rank updates (all of it, or its shard), and the compute-dtype copy blocks run
//! on — variables kept between uses (stages 0–2), or a shard all-gathered before each use (stage 3).
//! Where the master weights and moments live is the block's `Store` (its tier): host vectors, device
//! memory (`DeviceWindow`) or an NVMe file; for the last two the host vectors are a mirror, filled
//! only on request (checkpoints) and freed when an update makes them stale. `update` steps the block
//! the same way for the trainer whatever the tier.

use super::comm_worker::{CommWorker, Pending};
use super::error::EngineError;
use super::frozen::FrozenParams;
use super::host_buf::HostBuf;
use super::grads::BlockGrads;
use super::model::Model;
use super::offload::{nvme::{NvmeFile, NvmeStore, Pages}, read_now, write_now, staging::{Dest, HostState}, Store, UpdatePass};
use super::{CopyStream, DeviceGather, DeviceShard, DeviceWindow, Nccl, PinnedShard};
use crate::engine::{Init, ParamSpec};
use crate::optim::{GroupSettings, Hyper, Optimizer, ParamGroups};
use crate::rng::Rng;
use crate::shard::{FlatParam, Offload as ParamOffload, OptimizerWindow, ParamPlacement, Publish, Strategy, Tier};
use candle_core::{DType, Device, Var};
use rayon::prelude::*;
use std::ops::Range;
use std::sync::Arc;

/// A gather of a block's compute copy in flight: through the host communicator, or on the device.
pub enum Gather {
    Host(Pending<Result<HostBuf, EngineError>>),
    Device(DeviceGather),
}

impl Gather {
    /// Let it complete without using the result (a prefetched gather every rank issued).
    pub fn complete(self) {
        match self {
            Gather::Host(p) => drop(p.wait()),
            Gather::Device(g) => drop(g.finish()),
        }
    }
}

/// Everything a rank holds of one block's parameters.
pub struct BlockParams {
    pub flat: FlatParam,
    name: String,
    dtype: DType,
    /// Where the variables live (blocks compute there).
    device: Device,
    /// The part of the padded flat buffer this rank's optimizer owns.
    pub window: Range<usize>,
    /// fp32 master weights of `window` (on a CUDA device: the host mirror, empty while stale).
    pub master: Vec<f32>,
    /// The optimizer's state buffers over `window`, one per `Optimizer::state_names` (AdamW: m, v).
    pub state: Vec<Vec<f32>>,
    /// Weight decay and learning-rate scale of each parameter of the block (its group's).
    pub settings: Vec<GroupSettings>,
    /// Where the state is the truth: the host vectors, device memory or a file.
    pub(super) store: Store,
    /// The tier the strategy assigned (on a CPU run the device and host tiers are one `Store::Host`).
    tier: Tier,
    /// `master` and `state` hold the current state (always with `Store::Host`).
    host_fresh: bool,
    /// The compute copy of the window an NVMe update produced, for `start_publish` (the mirror it
    /// came from is gone by then).
    staged: Option<HostBuf>,
    /// The last update already wrote the compute copy into the variables (the host tier's pipeline).
    uploaded: bool,
    /// The block's update takes the host tier's staging pipeline (`offload/staging.rs`).
    staged_update: bool,
    /// Compute-dtype shard of this rank (parameters not resident): what is all-gathered before use.
    shard: Option<Arc<HostBuf>>,
    /// With parameters on NVMe: the file holding `shard` instead (its compute-dtype bits packed in
    /// f32 pages), read ahead of each gather.
    param_file: Option<NvmeFile>,
    /// Variables over the whole block (parameters resident).
    vars: Option<Vec<Var>>,
    /// Stage 3 on a GPU, host or NVMe tier: `shard` in device memory (`zero.offload_params = "none"`).
    dev_shard: Option<DeviceShard>,
    /// The same in page-locked host memory, uploaded before each use (`"cpu"`, one rank).
    pinned: Option<PinnedShard>,
    /// The block's frozen parameters (a flat buffer of their own; empty for most blocks).
    pub frozen: FrozenParams,
    /// The group the block's shards are gathered over when it is not the engine's (an expert
    /// block: its expert-data-parallel group).
    pub(super) group: Option<Arc<CommWorker>>,
}

/// Where a block's collectives run: its own group's thread where it has one (an expert block: its
/// expert-data-parallel group, on the host, never the engine's NCCL communicator, which spans the
/// data-parallel group), else the engine's.
pub(super) fn over_group<'a>(group: Option<&'a CommWorker>, worker: &'a CommWorker, nccl: Option<&'a Nccl>) -> (&'a CommWorker, Option<&'a Nccl>) {
    match group {
        Some(g) => (g, None),
        None => (worker, nccl),
    }
}

/// What every block's set-up shares.
#[derive(Clone, Copy)]
pub struct BlockSetup<'a> {
    pub strategy: Strategy,
    pub rank: usize,
    pub world: usize,
    /// The compute dtype.
    pub dtype: DType,
    pub device: &'a Device,
    pub optimizer: OptimizerSetup<'a>,
    /// The NVMe folder, when a tier is NVMe.
    pub nvme: Option<&'a NvmeStore>,
    /// The stream that uploads page-locked parameter shards (`zero.offload_params = "cpu"` on a GPU).
    pub copies: Option<&'a CopyStream>,
}

/// What one block's update needs of the step.
pub struct StepUpdate<'a> {
    pub optimizer: &'a dyn Optimizer,
    /// The gradient's multiplier: the clipping coefficient over the loss scale.
    pub factor: f32,
    /// The step's learning rate (before each parameter's scale).
    pub lr: f64,
    /// The step, 1-based (bias correction).
    pub t: u64,
}

/// The optimizer over `window` of a block in host memory: every parameter part with its group's
/// settings, the gradient scaled by `up.factor` first.
fn host_update(flat: &FlatParam, window: &Range<usize>, settings: &[GroupSettings], master: &mut [f32], mut state: Vec<&mut [f32]>, grads: &mut [f32], up: &StepUpdate<'_>) {
    if up.factor != 1.0 {
        grads.iter_mut().for_each(|x| *x *= up.factor);
    }
    for (j, part) in flat.params_in(window.clone()) {
        let r = part.start - window.start..part.end - window.start;
        let s = settings[j];
        let mut parts: Vec<&mut [f32]> = state.iter_mut().map(|b| &mut b[r.clone()]).collect();
        let hp = Hyper { lr: up.lr * s.lr_scale, step: up.t, weight_decay: s.weight_decay };
        up.optimizer.update(&mut master[r.clone()], &grads[r], &mut parts, hp);
    }
}

/// An NVMe file's buffer as the master weights and `k` state buffers of `n` elements each.
fn split_state(buf: &mut [f32], n: usize, k: usize) -> (&mut [f32], Vec<&mut [f32]>) {
    let (master, mut rest) = buf.split_at_mut(n);
    let mut state = Vec::with_capacity(k);
    for _ in 0..k {
        let (s, r) = rest.split_at_mut(n);
        state.push(s);
        rest = r;
    }
    (master, state)
}

impl BlockParams {
    /// Block `i` from its initial values (`init_values`: every rank computes the same ones), keeping what
    /// the strategy says this rank holds, its optimizer state on `tier`.
    pub fn from_full(model: &Model, i: usize, full: Vec<f32>, frozen: FrozenParams, setup: &BlockSetup<'_>, tier: Tier) -> Result<Self, EngineError> {
        let BlockSetup { strategy, rank, world, dtype, device, ref optimizer, nvme, copies } = *setup;
        let name = model.block(i).name();
        let flat = FlatParam::new(model.own_params(i), world);
        if full.len() != flat.padded_numel() {
            return Err(EngineError::Unsupported(format!("block {name}: {} initial values for a flat buffer of {}", full.len(), flat.padded_numel())));
        }
        let shard_range = flat.layout().padded_range(rank);
        let window = match strategy.optimizer_window() {
            OptimizerWindow::Shard => shard_range.clone(),
            OptimizerWindow::Whole => 0..full.len(),
        };
        let n = window.len();
        let settings = flat.specs().iter().map(|s| optimizer.groups.resolve(&name, s, optimizer.weight_decay)).collect();
        let mut p = Self {
            flat,
            name,
            dtype,
            device: device.clone(),
            window,
            master: Vec::new(),
            // One zeroed allocation each (`vec![v; k]` would copy the first into the others).
            state: (0..optimizer.num_states).map(|_| vec![0.0; n]).collect(),
            settings,
            shard: None,
            param_file: None,
            vars: None,
            store: Store::Host,
            tier,
            host_fresh: true,
            staged: None,
            uploaded: false,
            staged_update: false,
            dev_shard: None,
            pinned: None,
            frozen,
            group: None,
        };
        match strategy.param_placement() {
            ParamPlacement::Resident => p.vars = Some(p.make_vars(&HostBuf::from_f32(dtype, &full))?),
            ParamPlacement::Gathered => p.shard = Some(Arc::new(HostBuf::from_f32(dtype, &full[shard_range.clone()]))),
        }
        // The master weights: the initial values themselves where the window is the whole block (no
        // copy), else the window's part of them.
        p.master = if p.window.len() == full.len() { full } else { full[p.window.clone()].to_vec() };
        // Host-tier blocks whose variables are resident and whose window is the whole block take
        // the staging pipeline: on a GPU through pinned buffers, on a CPU through host buffers, so
        // that CPU runs test the same steps (AdamW: the pipeline's update is its fused pass).
        // Stage 3: the window is the shard, which the update writes wherever it lives (not in an
        // NVMe file: that tier has its own pass).
        let whole = p.vars.is_some() && p.window.len() == p.flat.padded_numel();
        let shard = p.shard.is_some() && p.window == shard_range;
        // A block with nothing to train (a frozen embedding under LoRA) has nothing to stage.
        p.staged_update = tier == Tier::Host && optimizer.adamw && (whole || shard) && p.flat.numel() > 0;
        match tier {
            // On a CPU run the device is host memory: the state stays in the host vectors.
            Tier::Device if !device.is_cuda() => {}
            Tier::Host => {}
            Tier::Device => {
                // The update writes the variables themselves unless the window is gathered (stages 1–3).
                let compute = (strategy.publish() != Publish::Rebuild).then(|| HostBuf::from_f32(dtype, &p.master));
                if let [m, v] = p.state.as_slice() {
                    // Only AdamW runs on the device (`Engine::new` refuses the others there).
                    if let Some(d) = DeviceWindow::new(device, &p.master, m, v, compute.as_ref()).map_err(EngineError::tensor(p.name.clone()))? {
                        p.store = Store::Device(d);
                    }
                }
            }
            Tier::Nvme => {
                let nvme = nvme.ok_or_else(|| EngineError::Unsupported(format!("block {}: an NVMe tier without zero.nvme_dir", p.name)))?;
                let file = nvme.file(&format!("block-{i:05}.state"), p.file_elems())?;
                p.store = Store::Nvme(Arc::new(file));
                p.write_new_file()?;
                // The compute copy was built from `full` above.
                p.staged = None;
                if strategy.params_on_nvme(tier) {
                    let file = nvme.file(&format!("block-{i:05}.params"), HostBuf::packed_words(dtype, shard_range.len()))?;
                    let shard = p.shard.take().ok_or_else(|| EngineError::Unsupported(format!("block {}: parameters on NVMe need stage 3", p.name)))?;
                    write_shard(&file, &shard)?;
                    p.param_file = Some(file);
                }
            }
        }
        // Stage 3 on a GPU: the shard of a block whose state is not in device memory goes to the
        // device (`zero.offload_params = "none"`: gathered there, uploaded once per step by the
        // publish), or to page-locked memory uploaded before each use (`"cpu"`, one rank).
        if let (Some(shard), false) = (p.shard.clone(), matches!(p.store, Store::Device(_))) {
            match strategy.offload_params {
                ParamOffload::None => {
                    if let Some(d) = DeviceShard::new(device, &shard).map_err(EngineError::tensor(p.name.clone()))? {
                        (p.dev_shard, p.shard) = (Some(d), None);
                    }
                }
                _ => {
                    if let (Some(copies), true) = (copies, shard.len() == p.flat.padded_numel()) {
                        (p.pinned, p.shard) = (Some(copies.pinned(&shard).map_err(EngineError::tensor(p.name.clone()))?), None);
                    }
                }
            }
        }
        p.mark_host_stale();
        Ok(p)
    }

    /// Whether this block's update takes the host tier's staging pipeline: state on the host tier,
    /// variables resident, the window the whole block, AdamW (`offload/staging.rs`).
    pub fn fast_host(&self) -> bool {
        self.staged_update
    }

    /// Elements of the block's NVMe file: master weights and every state buffer over the window.
    pub fn file_elems(&self) -> usize {
        self.window.len() * (1 + self.state.len())
    }

    /// The optimizer step of this block from its reduced gradient in `grads`, wherever the state is:
    /// a kernel on the device, or the CPU optimizer on host memory (an NVMe block's state read by
    /// `pass` and written back behind). Blocks are updated in order.
    pub fn update(&mut self, i: usize, grads: &mut BlockGrads, up: &StepUpdate<'_>, pass: &mut UpdatePass) -> Result<(), EngineError> {
        let window = self.window.clone();
        let n = window.len();
        let k = self.state.len();
        let file = match &self.store {
            Store::Device(_) => return self.device_step(grads, up),
            Store::Host if self.fast_host() => {
                let (Some(staging), Some(opt)) = (pass.staging.as_mut(), up.optimizer.as_adamw()) else {
                    return Err(EngineError::Unsupported(format!("block {}: the host tier's pipeline needs AdamW and the staging buffers", self.name)));
                };
                let name = self.name.clone();
                let dest = match (self.vars.as_deref(), &self.dev_shard, &mut self.pinned, &mut self.shard) {
                    (Some(vars), ..) => Dest::Vars(vars),
                    (None, Some(d), ..) => Dest::Window(d.tensor()),
                    (None, None, Some(p), _) => Dest::Host(p.host_mut().map_err(EngineError::tensor(name))?),
                    (None, None, None, Some(shard)) => Dest::Host(Arc::make_mut(shard).as_bytes_mut()),
                    (None, None, None, None) => return Err(EngineError::Unsupported(format!("block {name} has no compute copy to update"))),
                };
                let [m, v] = self.state.as_mut_slice() else { return Err(EngineError::Unsupported("AdamW has two state buffers".into())) };
                let state = HostState { flat: &self.flat, window: &window, master: &mut self.master, m, v, dtype: self.dtype, dest, settings: &self.settings };
                staging.update(i, opt, state, up.factor, up.lr, up.t)?;
                self.uploaded = true;
                return Ok(());
            }
            Store::Host => {
                let t = std::time::Instant::now();
                let g = grads.host_window(&window)?;
                pass.copied(t);
                let state = self.state.iter_mut().map(Vec::as_mut_slice).collect();
                host_update(&self.flat, &window, &self.settings, &mut self.master, state, g, up);
                grads.release_download();
                return Ok(());
            }
            Store::Nvme(file) => file.clone(),
        };
        let mut pages = pass.take(i)?;
        let t = std::time::Instant::now();
        let g = grads.host_window(&window)?;
        pass.copied(t);
        let (master, state) = split_state(pages.as_f32_mut(), n, k);
        host_update(&self.flat, &window, &self.settings, master, state, g, up);
        grads.release_download();
        self.staged = Some(HostBuf::from_f32(self.dtype, &pages.as_f32()[..n]));
        // The file is the state now: a mirror a checkpoint filled is stale.
        self.mark_host_stale();
        pass.put(&file, pages)
    }

    /// AdamW on the device over this rank's window (`Store::Device`).
    #[cfg(feature = "cuda")]
    fn device_step(&mut self, grads: &mut BlockGrads, up: &StepUpdate<'_>) -> Result<(), EngineError> {
        let Some(opt) = up.optimizer.as_adamw() else {
            return Err(EngineError::Unsupported(format!("the {} optimizer has no CUDA path: use AdamW on the GPU", up.optimizer.name())));
        };
        let grad = grads.device_window(&self.window)?;
        let Some(d) = self.store.device_mut() else { return Err(EngineError::Unsupported(format!("block {} has no device state", self.name))) };
        d.update(opt, &self.flat, &self.window, self.vars.as_deref(), &grad, up.factor, up.lr, up.t, &self.settings).map_err(EngineError::tensor(self.name.clone()))?;
        self.mark_host_stale();
        Ok(())
    }

    #[cfg(not(feature = "cuda"))]
    fn device_step(&mut self, _: &mut BlockGrads, _: &StepUpdate<'_>) -> Result<(), EngineError> {
        Err(EngineError::Unsupported("this build has no CUDA support (the `cuda` feature)".into()))
    }

    fn make_vars(&self, full: &HostBuf) -> Result<Vec<Var>, EngineError> {
        if self.device.is_cuda() {
            // One upload for the block; each variable is then a device copy of its range.
            let all = full.tensor(&self.device).map_err(EngineError::tensor(self.name.clone()))?;
            return self.vars_from_device(&all);
        }
        (0..self.flat.specs().len())
            .map(|j| full.var(self.flat.range(j), &self.flat.specs()[j].shape, &self.device))
            .collect::<candle_core::Result<_>>()
            .map_err(EngineError::tensor(self.name.clone()))
    }

    /// Variables (device copies) over the ranges of `all`, the whole flat buffer on the device.
    fn vars_from_device(&self, all: &candle_core::Tensor) -> Result<Vec<Var>, EngineError> {
        (0..self.flat.specs().len())
            .map(|j| {
                let r = self.flat.range(j);
                Var::from_tensor(&all.narrow(0, r.start, r.len())?.reshape(self.flat.specs()[j].shape.as_slice())?)
            })
            .collect::<candle_core::Result<_>>()
            .map_err(EngineError::tensor(self.name.clone()))
    }

    /// The variables of a finished gather (stage 3 before use, stages 1–2 after publishing).
    pub fn finish_gather(&self, gather: Gather) -> Result<Vec<Var>, EngineError> {
        match gather {
            Gather::Host(p) => self.make_vars(&p.wait()??),
            Gather::Device(g) => self.vars_from_device(&g.finish()?),
        }
    }

    /// Whether gathers of this block run on the device (CUDA with a compute copy, and NCCL unless the
    /// window is the whole block).
    fn gathers_on_device(&self, nccl: Option<&Nccl>) -> bool {
        self.store.device().is_some_and(|d| d.gathers_on_device(nccl.is_some(), self.flat.padded_numel()))
    }

    /// The resident variables (stages 0–2).
    pub fn resident(&self) -> Option<&[Var]> {
        self.vars.as_deref()
    }

    /// Start all-gathering this block's shard (stage 3); `finish_gather` turns the result into variables.
    pub fn start_gather(&self, worker: &CommWorker, nccl: Option<&Nccl>) -> Result<Gather, EngineError> {
        let (worker, nccl) = over_group(self.group.as_deref(), worker, nccl);
        let padded = self.flat.padded_numel();
        if let Some(g) = self.store.device().map(|d| d.start_gather(nccl, padded)).transpose()?.flatten() {
            return Ok(Gather::Device(g));
        }
        if let Some(d) = &self.dev_shard {
            if let Some(g) = d.start_gather(nccl, padded)? {
                return Ok(Gather::Device(g));
            }
            // No NCCL at world > 1: the host path gathers a copy.
            let shard = Arc::new(d.to_host().map_err(EngineError::tensor(self.name.clone()))?);
            return Ok(self.host_gather(worker, move || Ok(shard)));
        }
        if let Some(p) = &self.pinned {
            return Ok(Gather::Device(p.start_upload(padded).map_err(EngineError::tensor(self.name.clone()))?));
        }
        match (&self.shard, &self.param_file) {
            (Some(shard), _) => {
                let shard = shard.clone();
                Ok(self.host_gather(worker, move || Ok(shard)))
            }
            // Read ahead: the file is read on the NVMe reader thread from now, and the communication
            // thread unpacks and gathers it, while the block before this one computes.
            (None, Some(file)) => {
                let reading = file.read(Pages::zeroed(file.elems()));
                let (dtype, n) = (self.dtype, self.window.len());
                Ok(self.host_gather(worker, move || Ok(Arc::new(HostBuf::unpack(dtype, reading.wait()?.as_f32(), n)))))
            }
            (None, None) => Err(EngineError::Unsupported(format!("block {} has no shard to gather", self.name))),
        }
    }

    /// All-gather every rank's shard (from `shard`, called on the communication thread) into the
    /// whole block on the communication thread.
    fn host_gather(&self, worker: &CommWorker, shard: impl FnOnce() -> Result<Arc<HostBuf>, EngineError> + Send + 'static) -> Gather {
        let (dtype, padded) = (self.dtype, self.flat.padded_numel());
        Gather::Host(worker.submit(move |c| {
            let shard = shard()?;
            let mut full = HostBuf::zeros(dtype, padded);
            c.all_gather(shard.as_buf(), full.as_buf_mut())?;
            Ok(full)
        }))
    }

    /// After the optimizer updated `master`: refresh what blocks compute on. Stage 0 rebuilds its
    /// variables from the master weights; stages 1–2 all-gather the updated shards (returned as a
    /// pending collective for `finish_publish`); stage 3 only refreshes its shard.
    /// On a CUDA device the update already wrote the compute copy: stage 0 has nothing left to do,
    /// the others copy the window's compute copy to the host once.
    pub fn start_publish(&mut self, worker: &CommWorker, strategy: Strategy, nccl: Option<&Nccl>) -> Result<Option<Gather>, EngineError> {
        let group = self.group.clone();
        let (worker, nccl) = over_group(group.as_deref(), worker, nccl);
        let publish = strategy.publish();
        if std::mem::take(&mut self.uploaded) || self.store.device().is_some() && publish == Publish::Rebuild {
            return Ok(None);
        }
        if self.gathers_on_device(nccl) {
            if publish == Publish::KeepShard {
                // Stage 3: the updated shard stays on the device, where the gathers read it.
                self.shard = None;
                return Ok(None);
            }
            return Ok(Some(self.start_gather(worker, nccl)?));
        }
        let updated = match &self.store {
            Store::Host => HostBuf::from_f32(self.dtype, &self.master),
            Store::Nvme(_) => self.staged.take().ok_or_else(|| EngineError::Unsupported(format!("block {} was published before its update", self.name)))?,
            Store::Device(d) => d
                .compute_host()
                .map_err(EngineError::tensor(self.name.clone()))?
                .ok_or_else(|| EngineError::Unsupported(format!("block {} has no compute copy on the device", self.name)))?,
        };
        match publish {
            Publish::KeepShard => {
                let name = self.name.clone();
                match (&self.param_file, &mut self.dev_shard, &mut self.pinned) {
                    (Some(file), ..) => write_shard(file, &updated)?,
                    (None, Some(d), _) => d.set(&updated).map_err(EngineError::tensor(name))?,
                    (None, None, Some(p)) => p.set(&updated).map_err(EngineError::tensor(name))?,
                    (None, None, None) => self.shard = Some(Arc::new(updated)),
                }
                Ok(None)
            }
            Publish::Rebuild => {
                self.vars = Some(self.make_vars(&updated)?);
                Ok(None)
            }
            Publish::AllGather => {
                let updated = Arc::new(updated);
                Ok(Some(self.host_gather(worker, move || Ok(updated))))
            }
        }
    }

    pub fn finish_publish(&mut self, gather: Gather) -> Result<(), EngineError> {
        self.vars = Some(self.finish_gather(gather)?);
        Ok(())
    }

    /// Whether `master` and `state` hold the current state.
    pub fn host_fresh(&self) -> bool {
        self.host_fresh
    }

    /// Copy the device state into the host mirror (no-op when it is current).
    pub fn sync_to_host(&mut self) -> Result<(), EngineError> {
        if self.host_fresh {
            return Ok(());
        }
        match &self.store {
            Store::Host => {}
            Store::Device(d) => {
                let [master, m, v] = d.download().map_err(EngineError::tensor(self.name.clone()))?;
                (self.master, self.state) = (master, vec![m, v]);
            }
            Store::Nvme(file) => {
                let pages = read_now(file)?;
                let n = self.window.len();
                let all = pages.as_f32();
                self.master = all[..n].to_vec();
                let k = self.state.len();
                self.state = (0..k).map(|s| all[(s + 1) * n..(s + 2) * n].to_vec()).collect();
            }
        }
        self.host_fresh = true;
        Ok(())
    }

    /// Zeroed, current host buffers over the window for a restore that overwrites all of it: allocated
    /// on a device (where the mirror is freed between uses), cleared on the CPU.
    pub(super) fn host_for_overwrite(&mut self) {
        let n = self.window.len();
        if !matches!(self.store, Store::Host) {
            self.master = vec![0.0; n];
            self.state.iter_mut().for_each(|s| *s = vec![0.0; n]);
        } else {
            self.master.fill(0.0);
            self.state.iter_mut().for_each(|s| s.fill(0.0));
        }
        self.host_fresh = true;
    }

    /// The device or file state changed: free the host mirror (nothing for `Store::Host`, where it
    /// is the state).
    pub(super) fn mark_host_stale(&mut self) {
        if !matches!(self.store, Store::Host) {
            self.master = Vec::new();
            self.state.iter_mut().for_each(|s| *s = Vec::new());
            self.host_fresh = false;
        }
    }

    /// After the host mirror was written (a restore): upload it (or write the file) and rewrite
    /// the compute copy.
    pub fn upload_host(&mut self) -> Result<(), EngineError> {
        match &mut self.store {
            Store::Host => {}
            Store::Device(d) => {
                if let [m, v] = self.state.as_slice() {
                    d.upload(&self.master, m, v, &self.flat, &self.window, self.vars.as_deref())
                        .map_err(EngineError::tensor(self.name.clone()))?;
                }
            }
            Store::Nvme(file) => {
                let file = file.clone();
                write_now(&file, self.file_pages(file.elems()))?;
                self.staged = Some(HostBuf::from_f32(self.dtype, &self.master));
            }
        }
        Ok(())
    }

    /// The NVMe file's contents: master weights, then each state buffer, over the window.
    fn file_pages(&self, elems: usize) -> Pages {
        let n = self.window.len();
        let mut pages = Pages::zeroed(elems);
        let all = pages.as_f32_mut();
        all[..n].copy_from_slice(&self.master);
        for (s, buf) in self.state.iter().enumerate() {
            all[(s + 1) * n..(s + 2) * n].copy_from_slice(buf);
        }
        pages
    }

    /// Fill the NVMe file just created for a new block, whose state buffers are zeros: only the
    /// pages of the master weights are written, as the rest of the new file reads as zeros, so the
    /// first write of a run moves a third of the bytes (AdamW).
    fn write_new_file(&mut self) -> Result<(), EngineError> {
        let Store::Nvme(file) = &self.store else { return self.upload_host() };
        debug_assert!(self.state.iter().all(|b| b.iter().all(|x| x.to_bits() == 0)), "a new block's state is zeros");
        let n = self.window.len();
        let mut pages = Pages::zeroed(n);
        pages.as_f32_mut()[..n].copy_from_slice(&self.master);
        file.write_head(pages, n).wait().map(drop)
    }

    /// Bytes of optimizer state (master weights and every state buffer) and the tier they are on.
    pub fn state_bytes(&self) -> (Tier, usize) {
        (self.tier, self.window.len() * (1 + self.state.len()) * 4)
    }

    /// Bytes of compute-dtype parameters held between steps (variables or shard).
    pub fn param_bytes(&self) -> usize {
        let vars: usize = self.vars.iter().flatten().map(|v| v.elem_count() * v.dtype().size_in_bytes()).sum();
        let device_shard = if self.vars.is_none() { self.store.device().map_or(0, DeviceWindow::compute_bytes) } else { 0 };
        let placed = self.dev_shard.as_ref().map_or(0, DeviceShard::bytes) + self.pinned.as_ref().map_or(0, PinnedShard::bytes);
        vars + placed + self.shard.as_ref().map_or(device_shard, |s| s.bytes())
    }
}

/// Write a compute-dtype parameter shard into its NVMe file (its bits packed in f32 pages).
fn write_shard(file: &NvmeFile, shard: &HostBuf) -> Result<(), EngineError> {
    let mut pages = Pages::zeroed(file.elems());
    shard.pack_into(pages.as_f32_mut());
    write_now(file, pages)
}

/// Block `i`'s initial values over its padded flat buffer: each parameter from its own stream of the seed
/// (named after the block and the parameter), so that blocks can be initialised in any order or in parallel.
pub fn init_values(model: &Model, i: usize, world: usize, seed: u64) -> Vec<f32> {
    let Some(t) = model.tensor_shard(i) else { return draw_values(model, i, model.own_params(i), world, seed) };
    // A block split over a tensor-parallel group: the whole block's values, then this rank's slices,
    // so they are the values of `parallel.tp = 1`.
    let (whole, whole_flat) = (draw_values(model, i, &t.whole, 1, seed), FlatParam::new(&t.whole, 1));
    let flat = FlatParam::new(model.own_params(i), world);
    let mut full = vec![0f32; flat.padded_numel()];
    for (j, spec) in t.whole.iter().enumerate() {
        let slice = crate::parallel::tp_slice(&whole[whole_flat.range(j)], &spec.shape, t.splits[j], t.size, t.rank);
        full[flat.range(j)].copy_from_slice(&slice);
    }
    full
}

/// The same for block `i`'s frozen parameters: a frozen parameter starts where a trainable one of its
/// name would.
pub fn init_frozen_values(model: &Model, i: usize, world: usize, seed: u64) -> Vec<f32> {
    draw_values(model, i, model.frozen_params(i), world, seed)
}

fn draw_values(model: &Model, i: usize, specs: &[ParamSpec], world: usize, seed: u64) -> Vec<f32> {
    let name = model.block(i).name();
    let flat = FlatParam::new(specs, world);
    let mut full = vec![0f32; flat.padded_numel()];
    for (j, spec) in flat.specs().iter().enumerate() {
        init_param(&mut full[flat.range(j)], spec, &mut Rng::derive(seed, &format!("{name}.{}", spec.name)));
    }
    full
}

fn init_param(out: &mut [f32], spec: &ParamSpec, rng: &mut Rng) {
    // Random values are drawn in chunks on every core: each chunk starts its generator where the
    // sequential stream would be (a normal takes two draws, a uniform one), so the values are those
    // of one sequential pass.
    const CHUNK: usize = 1 << 16;
    let mut draw = |draws: u64, f: &(dyn Fn(&mut Rng) -> f32 + Sync)| {
        let start = rng.clone();
        out.par_chunks_mut(CHUNK).enumerate().for_each(|(c, xs)| {
            let mut r = start.skipped((c * CHUNK) as u64 * draws);
            xs.iter_mut().for_each(|x| *x = f(&mut r));
        });
        *rng = start.skipped(out.len() as u64 * draws);
    };
    match spec.init {
        Init::Zeros => out.fill(0.0),
        Init::Ones => out.fill(1.0),
        Init::Const(c) => out.fill(c as f32),
        Init::Normal { std } => draw(2, &|r| (r.normal() * std) as f32),
        Init::NormalMean { mean, std } => draw(2, &|r| (r.normal() * std + mean) as f32),
        Init::Uniform { lo, hi } => draw(1, &|r| (lo + (hi - lo) * r.next_f64()) as f32),
    }
}

/// What `BlockParams` needs of the optimizer: how many state buffers, and each parameter's group.
#[derive(Clone, Copy)]
pub struct OptimizerSetup<'a> {
    /// `Optimizer::state_names().len()`.
    pub num_states: usize,
    /// The optimizer is AdamW (whose fused update the host tier's pipeline runs).
    pub adamw: bool,
    /// The optimizer's weight decay (for parameters that decay and no group overrides).
    pub weight_decay: f64,
    pub groups: &'a ParamGroups,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The chunked, parallel draw gives the values of one sequential pass over the stream, and leaves
    /// the generator where that pass would.
    #[test]
    fn initial_values_drawn_in_parallel_equal_the_sequential_stream() {
        for init in [Init::Normal { std: 0.02 }, Init::NormalMean { mean: 1.0, std: 0.5 }, Init::Uniform { lo: -0.1, hi: 0.3 }] {
            let n = 3 * (1 << 16) + 123;
            let spec = ParamSpec::new("w", &[n], init, true);
            let mut rng = Rng::derive(9, "b.w");
            let mut got = vec![0f32; n];
            init_param(&mut got, &spec, &mut rng);
            let mut seq = Rng::derive(9, "b.w");
            let want: Vec<f32> = (0..n)
                .map(|_| match init {
                    Init::Normal { std } => (seq.normal() * std) as f32,
                    Init::NormalMean { mean, std } => (seq.normal() * std + mean) as f32,
                    Init::Uniform { lo, hi } => (lo + (hi - lo) * seq.next_f64()) as f32,
                    _ => unreachable!(),
                })
                .collect();
            assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "{init:?}");
            assert_eq!(rng.next_u64(), seq.next_u64(), "{init:?}: the generator ends where the sequential pass does");
        }
    }
}
