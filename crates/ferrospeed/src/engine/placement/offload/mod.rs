//! Where each block's optimizer state lives (`Store`: device memory, host memory, or an NVMe file),
//! how the engine's offload is set up (the NVMe folder, the transfer-buffer budget), and the update
//! pass that steps every block in order whatever its tier, reading NVMe state ahead and writing it
//! behind. The trainer asks a block to update; it never branches on where the state is.

#[cfg(feature = "cuda")]
pub mod host_cuda;
pub mod nvme;
pub mod staging;

use super::error::EngineError;
use super::grads::BlockGrads;
use super::params::BlockParams;
use super::DeviceWindow;
use crate::shard::Tier;
use nvme::{DiskTraffic, IoPending, NvmeFile, NvmeStore, Pages};
use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Offload settings that are not part of the strategy (paths and budgets).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OffloadSettings {
    /// Folder of the NVMe tier's files (required when a tier is NVMe).
    pub nvme_dir: Option<PathBuf>,
    /// Bytes of host memory for transfer and NVMe buffers; 0 lets the engine size them (three
    /// buffers of the largest offloaded block: one read ahead, one updated, one written behind).
    pub pinned_budget: u64,
}

/// Where one block's optimizer state is the truth. The block's host vectors (`master`, `state`) are
/// that state for `Host`, and a mirror filled on request for the other two.
pub enum Store {
    /// Host memory: the CPU optimizer updates it (on a GPU run the gradient comes down and the
    /// compute copy goes up).
    Host,
    /// Device memory (CUDA): the fused kernel updates it there.
    Device(DeviceWindow),
    /// A file: read, updated in host memory, written back.
    Nvme(Arc<NvmeFile>),
}

impl Store {
    /// The device window, when the state is in device memory.
    pub fn device(&self) -> Option<&DeviceWindow> {
        match self {
            Store::Device(d) => Some(d),
            _ => None,
        }
    }

    /// The same, writable.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub fn device_mut(&mut self) -> Option<&mut DeviceWindow> {
        match self {
            Store::Device(d) => Some(d),
            _ => None,
        }
    }
}

/// The staging buffers of the host tier's pipeline (`staging.rs`), on the link of the run's device.
pub enum HostStaging {
    Cpu(staging::Staging<staging::HostLink>),
    #[cfg(feature = "cuda")]
    Cuda(staging::Staging<host_cuda::CudaLink>),
}

/// One update pass's use of the [`HostStaging`].
pub enum StagingPass<'a> {
    Cpu(staging::StagingPass<'a, staging::HostLink>),
    #[cfg(feature = "cuda")]
    Cuda(staging::StagingPass<'a, host_cuda::CudaLink>),
}

impl StagingPass<'_> {
    /// Update block `i` through the pipeline (see [`staging::StagingPass::update`]).
    pub fn update(&mut self, i: usize, opt: &crate::optim::AdamW, s: staging::HostState<'_>, factor: f32, lr: f64, t: u64) -> Result<(), EngineError> {
        match self {
            StagingPass::Cpu(p) => p.update(i, opt, s, factor, lr, t),
            #[cfg(feature = "cuda")]
            StagingPass::Cuda(p) => p.update(i, opt, s, factor, lr, t),
        }
    }

    fn finish(self) -> Result<Duration, EngineError> {
        match self {
            StagingPass::Cpu(p) => p.finish(),
            #[cfg(feature = "cuda")]
            StagingPass::Cuda(p) => p.finish(),
        }
    }
}

/// The engine's offload resources: the NVMe folder (when a tier is NVMe), the number of
/// block-sized NVMe buffers the budget allows, and the staging buffers of the host tier.
pub struct Offload {
    pub nvme: Option<NvmeStore>,
    /// Buffers of `buffer_elems` f32 the update pass may hold at once.
    pub buffers: usize,
    pub buffer_elems: usize,
    pub host: Option<HostStaging>,
}

/// One block's need of the offload tiers, for [`Offload::new`].
pub struct BlockNeed<'a> {
    pub name: &'a str,
    pub tier: Tier,
    /// Elements of the block's NVMe file (master weights and state over its window).
    pub file_elems: usize,
    /// Elements of its parameter-shard file (stage-3 parameters on NVMe), 0 for none.
    pub param_file_elems: usize,
    /// Elements the host tier's staging buffers must hold for this block (blocks whose window is
    /// the whole block), 0 otherwise.
    pub staged_elems: usize,
}

impl Offload {
    /// Check the settings against what the blocks need and claim the NVMe folder — before anything
    /// large is allocated, so a bad setting costs nothing.
    /// `device` is where blocks compute and `dtype` their compute dtype (the host tier's pinned
    /// buffers on a GPU).
    pub fn new(settings: &OffloadSettings, rank: usize, needs: &[BlockNeed<'_>], device: &candle_core::Device, dtype: candle_core::DType) -> Result<Self, EngineError> {
        let staged = needs.iter().filter(|b| b.staged_elems > 0).max_by_key(|b| b.staged_elems);
        let host = match (staged, device) {
            #[cfg(feature = "cuda")]
            (Some(b), candle_core::Device::Cuda(dev)) => {
                let bytes = host_cuda::staging_bytes(b.staged_elems, dtype);
                if settings.pinned_budget != 0 && settings.pinned_budget < bytes {
                    return Err(EngineError::PinnedBudget { budget_mb: settings.pinned_budget / 1_000_000, block: b.name.to_string(), needed_mb: bytes.div_ceil(1_000_000) });
                }
                Some(HostStaging::Cuda(staging::Staging::new(host_cuda::CudaLink::new(dev, b.staged_elems, dtype)?)))
            }
            (Some(b), _) => Some(HostStaging::Cpu(staging::Staging::new(staging::HostLink::new(b.staged_elems, dtype)))),
            (None, _) => None,
        };
        let nvme_blocks: Vec<&BlockNeed<'_>> = needs.iter().filter(|b| b.tier == Tier::Nvme).collect();
        let Some(largest) = nvme_blocks.iter().max_by_key(|b| b.file_elems) else {
            return Ok(Self { nvme: None, buffers: 0, buffer_elems: 0, host });
        };
        let buffer_elems = largest.file_elems.div_ceil(nvme::PAGE_ELEMS) * nvme::PAGE_ELEMS;
        let buffer_bytes = buffer_elems as u64 * 4;
        let buffers = match settings.pinned_budget {
            0 => 3,
            budget if budget < buffer_bytes => {
                return Err(EngineError::PinnedBudget {
                    budget_mb: budget / 1_000_000,
                    block: largest.name.to_string(),
                    needed_mb: buffer_bytes.div_ceil(1_000_000),
                })
            }
            budget => ((budget / buffer_bytes) as usize).min(3),
        };
        let root = settings.nvme_dir.as_ref().ok_or_else(|| EngineError::Nvme {
            path: PathBuf::new(),
            reason: "is not set: set zero.nvme_dir to a folder on a fast local disk".into(),
        })?;
        let pages = |elems: usize| (elems.div_ceil(nvme::PAGE_ELEMS) * nvme::PAGE_BYTES) as u64;
        let bytes: u64 = nvme_blocks.iter().map(|b| pages(b.file_elems) + pages(b.param_file_elems)).sum();
        Ok(Self {
            nvme: Some(NvmeStore::create(root, rank, bytes)?),
            buffers,
            buffer_elems,
            host,
        })
    }

    /// Bytes of the host tier's staging buffers.
    pub fn staging_bytes(&self) -> usize {
        match &self.host {
            Some(HostStaging::Cpu(s)) => s.bytes(),
            #[cfg(feature = "cuda")]
            Some(HostStaging::Cuda(s)) => s.bytes(),
            None => 0,
        }
    }

    /// What the NVMe tier has moved so far (`None` without one).
    pub fn traffic(&self) -> Option<DiskTraffic> {
        self.nvme.as_ref().map(NvmeStore::traffic)
    }
}

/// One optimizer step's pass over the blocks, in block order: NVMe blocks are read ahead into the
/// pass's buffers and written behind, at most `Offload::buffers` at a time; host-tier blocks'
/// gradients are staged ahead of their update (`staging.rs`).
pub struct UpdatePass<'a> {
    pub staging: Option<StagingPass<'a>>,
    /// NVMe blocks in update order, and their files.
    queue: Vec<(usize, Arc<NvmeFile>)>,
    /// Next entry of `queue` to start reading.
    next_read: usize,
    reads: VecDeque<(usize, IoPending)>,
    writes: VecDeque<IoPending>,
    free: Vec<Pages>,
    made: usize,
    buffers: usize,
    buffer_elems: usize,
    waits: PassWaits,
}

/// How long an update pass waited on what it moves: the exposed part of its transfers.
#[derive(Debug, Clone, Copy, Default)]
pub struct PassWaits {
    /// Device↔host copies (the pinned pipeline's events, the host path's synchronous copies).
    pub transfer: Duration,
    /// NVMe reads and writes.
    pub disk: Duration,
}

/// `io`'s buffer, the time waited for it added to `waited`.
fn timed(waited: &mut Duration, io: IoPending) -> Result<Pages, EngineError> {
    let t = Instant::now();
    let pages = io.wait();
    *waited += t.elapsed();
    pages
}

impl<'a> UpdatePass<'a> {
    /// A pass over the blocks whose stores are `stores` (in block order); starts the first reads.
    pub fn new<'s>(offload: &'a mut Offload, stores: impl Iterator<Item = &'s Store>) -> Self {
        let queue = stores.enumerate().filter_map(|(i, s)| if let Store::Nvme(f) = s { Some((i, f.clone())) } else { None }).collect();
        let staging = offload.host.as_mut().map(|h| match h {
            HostStaging::Cpu(s) => StagingPass::Cpu(staging::StagingPass::new(s)),
            #[cfg(feature = "cuda")]
            HostStaging::Cuda(s) => StagingPass::Cuda(staging::StagingPass::new(s)),
        });
        let mut pass = Self {
            staging,
            queue,
            next_read: 0,
            reads: VecDeque::new(),
            writes: VecDeque::new(),
            free: Vec::new(),
            made: 0,
            buffers: offload.buffers.max(1),
            buffer_elems: offload.buffer_elems,
            waits: PassWaits::default(),
        };
        pass.read_ahead();
        pass
    }

    /// Before the next block's update: queue the downloads of the coming host-tier gradients.
    pub fn before_block(&mut self, params: &[BlockParams], grads: &[BlockGrads]) -> Result<(), EngineError> {
        match &mut self.staging {
            Some(StagingPass::Cpu(d)) => d.download_ahead(params.len(), |j| params[j].fast_host().then(|| grads[j].host_reduced())),
            #[cfg(feature = "cuda")]
            Some(StagingPass::Cuda(d)) => d.download_ahead(params.len(), |j| if params[j].fast_host() { grads[j].device_reduced() } else { None }),
            None => Ok(()),
        }
    }

    /// A buffer without waiting, if the budget has one.
    fn try_buffer(&mut self) -> Option<Pages> {
        if let Some(p) = self.free.pop() {
            return Some(p);
        }
        (self.made < self.buffers).then(|| {
            self.made += 1;
            Pages::zeroed(self.buffer_elems)
        })
    }

    /// Start reads of the next blocks while buffers are free.
    fn read_ahead(&mut self) {
        while self.next_read < self.queue.len() {
            let Some(pages) = self.try_buffer() else { break };
            let (i, file) = &self.queue[self.next_read];
            self.reads.push_back((*i, file.read(pages)));
            self.next_read += 1;
        }
    }

    /// Block `i`'s state, read from its file (waiting for the read, or for a write to free a buffer).
    pub fn take(&mut self, i: usize) -> Result<Pages, EngineError> {
        if self.reads.is_empty() {
            let pages = match self.try_buffer() {
                Some(p) => p,
                None => timed(&mut self.waits.disk, self.writes.pop_front().ok_or_else(|| EngineError::Unsupported("the update pass has no buffer".into()))?)?,
            };
            let (j, file) = self.queue.get(self.next_read).ok_or_else(|| EngineError::Unsupported(format!("block {i} is not on the NVMe tier")))?;
            self.reads.push_back((*j, file.read(pages)));
            self.next_read += 1;
        }
        let (j, read) = self.reads.pop_front().expect("a read was queued above");
        if j != i {
            return Err(EngineError::Unsupported(format!("the update pass read block {j} where block {i} comes next")));
        }
        timed(&mut self.waits.disk, read)
    }

    /// Write block `i`'s updated state back (behind: the pass goes on), then read further ahead.
    pub fn put(&mut self, file: &NvmeFile, pages: Pages) -> Result<(), EngineError> {
        self.writes.push_back(file.write(pages));
        // Reclaim finished writes' buffers only when a read needs one: keep at most one write waiting.
        while self.writes.len() > 1 {
            let done = timed(&mut self.waits.disk, self.writes.pop_front().expect("checked"))?;
            self.free.push(done);
        }
        self.read_ahead();
        Ok(())
    }

    /// A synchronous device↔host copy of the host path, `since` it started.
    pub fn copied(&mut self, since: Instant) {
        self.waits.transfer += since.elapsed();
    }

    /// Wait for every write: the files hold the step's state when this returns. What the pass
    /// waited for, in all.
    pub fn finish(mut self) -> Result<PassWaits, EngineError> {
        if let Some(d) = self.staging.take() {
            self.waits.transfer += d.finish()?;
        }
        for (_, r) in std::mem::take(&mut self.reads) {
            timed(&mut self.waits.disk, r)?;
        }
        for w in std::mem::take(&mut self.writes) {
            timed(&mut self.waits.disk, w)?;
        }
        Ok(self.waits)
    }
}

impl Drop for UpdatePass<'_> {
    /// A pass abandoned on an error still lets its transfers end (their buffers are the pass's).
    fn drop(&mut self) {
        for (_, r) in self.reads.drain(..) {
            let _ = r.wait();
        }
        for w in self.writes.drain(..) {
            let _ = w.wait();
        }
    }
}

/// Read a block's whole file now (checkpoints, restores), into a fresh buffer.
pub fn read_now(file: &NvmeFile) -> Result<Pages, EngineError> {
    file.read(Pages::zeroed(file.elems())).wait()
}

/// Write a block's whole file now, waiting for it.
pub fn write_now(file: &NvmeFile, pages: Pages) -> Result<(), EngineError> {
    file.write(pages).wait().map(drop)
}
