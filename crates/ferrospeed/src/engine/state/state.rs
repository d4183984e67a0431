//! The engine's optimizer state as checkpoints see it: per block, the window of the flat buffer this
//! rank owns with its master weights and optimizer state; and restoring it (then republishing parameters).
//! On a CUDA device (or in NVMe files) the state lives elsewhere: [`Engine::sync_to_host`] copies it
//! into the host mirror that `windows` reads, and `finish_restore` uploads what `windows_mut` wrote.
//! Checkpoints use the streaming forms, [`Engine::read_blocks`] and [`Engine::overwrite_blocks`],
//! which mirror one block at a time: a model whose state does not fit host memory still saves and
//! resumes.

use super::error::EngineError;
use super::trainer::Engine;
use crate::precision::ScalerState;
use crate::shard::FlatParam;
use std::ops::Range;

/// One block's optimizer state held by this rank.
pub struct WindowRef<'a> {
    /// The block's name.
    pub block: &'a str,
    /// The layout of the block's flat buffer.
    pub flat: &'a FlatParam,
    /// Range of the padded flat buffer covered by `master` and `state`.
    pub window: Range<usize>,
    /// fp32 master weights of the window.
    pub master: &'a [f32],
    /// One buffer per `Optimizer::state_names`.
    pub state: Vec<&'a [f32]>,
}

/// One block's frozen parameters held by this rank, to overwrite (an import of the base they are).
pub struct FrozenMut<'a> {
    /// The block's name.
    pub block: &'a str,
    /// The layout of the block's frozen flat buffer.
    pub flat: &'a FlatParam,
    /// Range of the padded frozen buffer covered by `values`.
    pub window: Range<usize>,
    /// The values (f32; rounded to the compute dtype when stored).
    pub values: &'a mut [f32],
}

/// Where one block's optimizer state lies, without the state (readable at any time).
pub struct BlockLayout<'a> {
    /// The block's name.
    pub block: &'a str,
    /// The layout of the block's flat buffer.
    pub flat: &'a FlatParam,
    /// Range of the padded flat buffer this rank's state covers.
    pub window: Range<usize>,
}

/// The same, writable.
pub struct WindowMut<'a> {
    /// The block's name.
    pub block: &'a str,
    /// The layout of the block's flat buffer.
    pub flat: &'a FlatParam,
    /// Range of the padded flat buffer covered by `master` and `state`.
    pub window: Range<usize>,
    /// fp32 master weights of the window.
    pub master: &'a mut [f32],
    /// One buffer per `Optimizer::state_names`.
    pub state: Vec<&'a mut [f32]>,
}

/// How a checkpoint lays out the whole model's state over the ranks' files, and this rank's part:
/// the same at `pp = 1` as the engine's own layouts; in a pipeline, every stage's blocks, each held
/// by the files of its stage's ranks.
pub struct CheckpointPlan {
    /// Every block of the whole model: its name and its flat layout over the data-parallel group.
    pub blocks: Vec<(String, FlatParam)>,
    /// For each rank of the world (a file), the range of each block's flat buffer it holds (empty
    /// for blocks of other stages).
    pub files: Vec<Vec<Range<usize>>>,
    /// For each block of this engine: its index in `blocks`, and whether this rank saves it (a
    /// ghost's state is its owner's).
    pub local: Vec<(usize, bool)>,
    /// For each block of this engine: this rank's shard in the block's own layout (its
    /// data-parallel rank; an expert block's: its expert-data-parallel rank), and where the engine's
    /// flat buffer of the block starts in the whole block's (0; an expert block's: its share's offset).
    pub placement: Vec<(usize, usize)>,
    /// Under tensor parallelism, how the files hold the split blocks.
    pub tensor: Option<TensorLayout>,
}

/// How a checkpoint of an engine split by tensor parallelism lays out its split blocks: each file
/// holds the window (in `files`) of its tensor-parallel rank's slices, a flat buffer of the block's
/// parameters in their slice shapes; a block that is not split is whole in the files of
/// tensor-parallel rank 0 (the others hold the same values and save none of it).
pub struct TensorLayout {
    /// The tensor-parallel group's size.
    pub tp: usize,
    /// Each file's (world rank's) rank in its tensor-parallel group.
    pub file_tp_rank: Vec<usize>,
    /// For each block of `blocks`: how each of its parameters splits, where the block is split.
    pub splits: Vec<Option<Vec<crate::parallel::TpSplit>>>,
}

impl Engine {
    /// The layout of a checkpoint of this engine (see [`CheckpointPlan`]).
    pub fn checkpoint_plan(&self) -> CheckpointPlan {
        // Tensor parallelism's plan covers a pipeline of split stages too.
        if let Some(plan) = self.tensor_checkpoint_plan() {
            return plan;
        }
        if let Some(plan) = self.pipeline_checkpoint_plan() {
            return plan;
        }
        let world = self.worker.world_size();
        if let Some(e) = &self.experts {
            return self.expert_checkpoint_plan(e);
        }
        let blocks: Vec<(String, FlatParam)> = self.blocks_state().map(|(n, p)| (n.to_string(), p.flat.clone())).collect();
        let files = (0..world).map(|r| blocks.iter().map(|(_, f)| f.layout().range(r)).collect()).collect();
        let placement = vec![(self.worker.rank(), 0); blocks.len()];
        CheckpointPlan { local: (0..blocks.len()).map(|i| (i, true)).collect(), blocks, files, placement, tensor: None }
    }

    /// The checkpoint of an engine with expert parallelism: every expert block whole, each rank's
    /// file holding its expert-data-parallel shard of its share of the experts (data-parallel rank
    /// `r` is rank `r % ep` of its expert group and `r / ep` of its expert-data-parallel group).
    fn expert_checkpoint_plan(&self, e: &super::trainer::Experts) -> CheckpointPlan {
        let world = self.worker.world_size();
        let mut blocks = Vec::with_capacity(self.params.len());
        let mut placement = Vec::with_capacity(self.params.len());
        for (i, (name, p)) in self.blocks_state().enumerate() {
            match self.model.expert_shard(i) {
                Some(shard) => {
                    blocks.push((name.to_string(), FlatParam::new(&shard.whole, world)));
                    placement.push((e.edp.rank(), shard.offset));
                }
                None => {
                    blocks.push((name.to_string(), p.flat.clone()));
                    placement.push((self.worker.rank(), 0));
                }
            }
        }
        let files = (0..world)
            .map(|r| {
                (0..blocks.len())
                    .map(|i| match self.model.expert_shard(i) {
                        Some(_) => {
                            let flat = &self.params[i].flat;
                            let (base, s) = ((r % e.ep) * flat.numel(), flat.layout().range(r / e.ep));
                            base + s.start..base + s.end
                        }
                        None => blocks[i].1.layout().range(r),
                    })
                    .collect()
            })
            .collect();
        CheckpointPlan { local: (0..blocks.len()).map(|i| (i, true)).collect(), blocks, files, placement, tensor: None }
    }

    /// Copy the optimizer state from the device into host memory (a no-op on the CPU, or when the
    /// host copy is current). Needed before [`Engine::windows`] and [`Engine::master`] on a GPU.
    pub fn sync_to_host(&mut self) -> Result<(), EngineError> {
        self.blocks_state_mut().try_for_each(|(_, p)| p.sync_to_host())
    }

    /// Every block's state held by this rank, in block order. On a CUDA device, call
    /// [`Engine::sync_to_host`] first: without it this is an error (the host copy is stale).
    pub fn windows(&self) -> Result<Vec<WindowRef<'_>>, EngineError> {
        if let Some((name, _)) = self.blocks_state().find(|(_, p)| !p.host_fresh()) {
            return Err(EngineError::Unsupported(format!(
                "the optimizer state of block {name} is on the device: call Engine::sync_to_host before reading it"
            )));
        }
        Ok(self
            .blocks_state()
            .map(|(name, p)| WindowRef {
                block: name,
                flat: &p.flat,
                window: p.window.clone(),
                master: &p.master,
                state: p.state.iter().map(Vec::as_slice).collect(),
            })
            .collect())
    }

    /// Every block's layout, in block order: what [`Engine::windows`] would cover, without reading
    /// any state.
    pub fn layouts(&self) -> Vec<BlockLayout<'_>> {
        self.blocks_state().map(|(name, p)| BlockLayout { block: name, flat: &p.flat, window: p.window.clone() }).collect()
    }

    /// Read every block's state in block order, one block at a time: each is copied to the host (from
    /// the device or its file) for `read`, and its copy freed after unless it was current before. Host
    /// memory holds one block's state at a time, never the model's.
    pub fn read_blocks<E: From<EngineError>>(&mut self, mut read: impl FnMut(WindowRef<'_>) -> Result<(), E>) -> Result<(), E> {
        for (name, p) in self.blocks_state_mut() {
            let mirrored = p.host_fresh();
            p.sync_to_host()?;
            read(WindowRef { block: name, flat: &p.flat, window: p.window.clone(), master: &p.master, state: p.state.iter().map(Vec::as_slice).collect() })?;
            if !mirrored {
                p.mark_host_stale();
            }
        }
        Ok(())
    }

    /// Every block's state, writable (current values: on a CUDA device they are copied to the host
    /// first). After writing, call [`Engine::finish_restore`].
    pub fn windows_mut(&mut self) -> Result<Vec<WindowMut<'_>>, EngineError> {
        self.sync_to_host()?;
        Ok(self
            .blocks_state_mut()
            .map(|(name, p)| WindowMut {
                block: name,
                flat: &p.flat,
                window: p.window.clone(),
                master: &mut p.master,
                state: p.state.iter_mut().map(Vec::as_mut_slice).collect(),
            })
            .collect())
    }

    /// Overwrite every block's state, one block at a time (an import, or a checkpoint's restore):
    /// `fill` writes the block's master weights and optimizer state (zeroed first). Off the host (a
    /// GPU, NVMe) each block is uploaded or written and its host copy freed before the next, so host
    /// memory holds one block's state at a time, never the model's. Then the step count becomes
    /// `steps_done`, the loss scaler `scaler` (if given), and the compute copies are rebuilt, as
    /// [`Engine::finish_restore`] does.
    pub fn overwrite_blocks<E: From<EngineError>>(&mut self, steps_done: u64, scaler: Option<ScalerState>, mut fill: impl FnMut(WindowMut<'_>) -> Result<(), E>) -> Result<(), E> {
        for (name, p) in self.blocks_state_mut() {
            p.host_for_overwrite();
            fill(WindowMut { block: name, flat: &p.flat, window: p.window.clone(), master: &mut p.master, state: p.state.iter_mut().map(Vec::as_mut_slice).collect() })?;
            p.upload_host()?;
            p.mark_host_stale();
        }
        self.set_progress(steps_done, scaler);
        Ok(self.republish()?)
    }

    /// Overwrite every block's frozen parameters ([`crate::engine::ParamRef::Frozen`]) this rank holds,
    /// one block at a time: `fill` writes their values over the window (zeroed first). Blocks without
    /// frozen parameters are skipped.
    pub fn overwrite_frozen<E: From<EngineError>>(&mut self, mut fill: impl FnMut(FrozenMut<'_>) -> Result<(), E>) -> Result<(), E> {
        for (name, p) in self.blocks_state_mut() {
            if p.frozen.is_empty() {
                continue;
            }
            let window = p.frozen.window();
            let mut values = vec![0f32; window.len()];
            fill(FrozenMut { block: name, flat: &p.frozen.flat, window, values: &mut values })?;
            p.frozen.set(&values)?;
        }
        Ok(())
    }

    /// Block `i`'s frozen parameters this rank holds: the offset of its window in the block's frozen
    /// flat buffer, and the values (the compute dtype's, widened to f32).
    pub fn frozen_values(&self, i: usize) -> Result<(usize, Vec<f32>), EngineError> {
        let f = &self.params[i].frozen;
        Ok((f.window().start, f.values()?))
    }

    /// Adopt restored state: the step count (schedule, bias correction), the loss scaler, and the
    /// parameters blocks compute on, rebuilt from the master weights (a collective at stages 1–2). On
    /// a CUDA device the host state is uploaded first.
    pub fn finish_restore(&mut self, steps_done: u64, scaler: Option<ScalerState>) -> Result<(), EngineError> {
        self.blocks_state_mut().try_for_each(|(_, p)| p.upload_host())?;
        self.set_progress(steps_done, scaler);
        self.republish()
    }
}
