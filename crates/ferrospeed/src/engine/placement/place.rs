//! Where a rank's state goes (the apply function of ZeRO and offload): for each block of the model,
//! the window of master weights and optimizer state this rank owns over its data-parallel group and
//! the tier it lives on (device, host, NVMe), checked against the offload's folder and buffer budget
//! before anything large is allocated, and the resources those tiers need (NVMe files, staging
//! buffers, the parameter copy stream). The engine builds its buffers from the answer; nothing here
//! allocates a parameter.

use super::error::EngineError;
use super::host_buf::HostBuf;
use super::model::Model;
use super::offload::{BlockNeed, Offload};
use super::trainer::EngineConfig;
use super::CopyStream;
use crate::shard::{FlatParam, OptimizerWindow, ParamPlacement, Tier};

/// What [`place`] decided for a rank.
pub(super) struct Placement {
    /// The tier of each block's optimizer state.
    pub tiers: Vec<Tier>,
    /// The offload tiers' resources.
    pub offload: Offload,
    /// The stream page-locked stage-3 shards go up on (`zero.offload_params = "cpu"` on a GPU).
    pub copies: Option<CopyStream>,
}

/// Place `model`'s state for data-parallel rank `rank` of `world` under `cfg`'s strategy.
pub(super) fn place(model: &Model, cfg: &EngineConfig, rank: usize, world: usize) -> Result<Placement, EngineError> {
    let dtype = cfg.precision.compute_dtype();
    let num_states = cfg.optimizer.state_names().len();
    let names = model.block_names();
    let flats: Vec<FlatParam> = (0..model.num_blocks()).map(|i| FlatParam::new(model.own_params(i), world)).collect();
    let windows: Vec<usize> = flats
        .iter()
        .map(|flat| match cfg.strategy.optimizer_window() {
            OptimizerWindow::Whole => flat.padded_numel(),
            OptimizerWindow::Shard => flat.layout().shard(rank).padded_len,
        })
        .collect();
    let tiers = cfg.strategy.optimizer_tiers(&windows);
    // Stage-3 shards of NVMe-tier blocks in files of their own (`zero.offload_params = "nvme"`).
    let param_file = |i: usize| cfg.strategy.params_on_nvme(tiers[i]);
    // Host-tier blocks whose window is the whole block and whose variables stay resident, or
    // whose window is their stage-3 shard, go through staging buffers straight into their
    // compute copy (`BlockParams::fast_host`): pinned on a GPU, plain host buffers on a CPU run.
    let adamw = cfg.optimizer.as_adamw().is_some();
    let staged = |i: usize| {
        adamw
            && tiers[i] == Tier::Host
            && match cfg.strategy.param_placement() {
                ParamPlacement::Resident => windows[i] == flats[i].padded_numel(),
                ParamPlacement::Gathered => !param_file(i),
            }
    };
    let needs: Vec<BlockNeed<'_>> = (0..model.num_blocks())
        .map(|i| BlockNeed {
            name: &names[i],
            tier: tiers[i],
            file_elems: windows[i] * (1 + num_states),
            param_file_elems: if param_file(i) { HostBuf::packed_words(dtype, windows[i]) } else { 0 },
            staged_elems: if staged(i) { windows[i] } else { 0 },
        })
        .collect();
    let offload = Offload::new(&cfg.offload, rank, &needs, &cfg.device, dtype)?;
    let copies = if cfg.strategy.param_placement() == ParamPlacement::Gathered && cfg.strategy.offload_params != crate::shard::Offload::None {
        CopyStream::new(&cfg.device).map_err(EngineError::tensor("the parameter copy stream"))?
    } else {
        None
    };
    Ok(Placement { tiers, offload, copies })
}
