//! The ZeRO stage and the offload tiers as data: the step schedule asks these questions instead of
//! branching on the stage or the offload setting.

/// ZeRO stage: which of optimizer state (1), gradients (2) and parameters (3) are sharded; 0 is DDP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum ZeroStage {
    /// Stage 0: nothing sharded; every rank holds everything (DDP).
    #[default]
    Zero,
    /// Stage 1: optimizer state (fp32 master weights and moments) sharded.
    One,
    /// Stage 2: optimizer state and reduced gradients sharded.
    Two,
    /// Stage 3: optimizer state, gradients and parameters sharded.
    Three,
}

impl ZeroStage {
    /// The stage written as the integer `n` in TOML.
    pub fn from_int(n: i64) -> Option<Self> {
        match n {
            0 => Some(ZeroStage::Zero),
            1 => Some(ZeroStage::One),
            2 => Some(ZeroStage::Two),
            3 => Some(ZeroStage::Three),
            _ => None,
        }
    }

    /// The stage as its number, as written in TOML.
    pub fn as_int(self) -> u8 {
        match self {
            ZeroStage::Zero => 0,
            ZeroStage::One => 1,
            ZeroStage::Two => 2,
            ZeroStage::Three => 3,
        }
    }
}

impl std::fmt::Display for ZeroStage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.as_int())
    }
}

impl serde::Serialize for ZeroStage {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u8(self.as_int())
    }
}


/// Where state that is not on the accelerator lives (`zero.offload_optimizer`, `zero.offload_params`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Offload {
    /// Nothing offloaded: the state stays where blocks compute.
    #[default]
    None,
    /// Host memory.
    Cpu,
    /// Files under `zero.nvme_dir`.
    Nvme,
}
crate::named_enum!(Offload { None => "none", Cpu => "cpu", Nvme => "nvme" });

/// Where one block's optimizer state (fp32 master weights and moments) or stage-3 parameter shard
/// lives between uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    /// The memory blocks compute in: the GPU's, or the host's on a CPU run.
    Device,
    /// Host memory; on a GPU run the optimizer runs there (all cores) and transfers cross PCIe.
    Host,
    /// Files under `zero.nvme_dir`, read into host memory for each update.
    Nvme,
}

impl Offload {
    /// The tier of state offloaded this way.
    pub fn tier(self) -> Tier {
        match self {
            Offload::None => Tier::Device,
            Offload::Cpu => Tier::Host,
            Offload::Nvme => Tier::Nvme,
        }
    }
}

/// The first block of the run of last blocks whose elements are nearest `ratio` of all (`ratio = 1`:
/// every block).
fn last_run_nearest(numels: &[usize], ratio: f64) -> usize {
    let target = ratio * numels.iter().sum::<usize>() as f64;
    let mut taken = 0usize;
    let mut start = numels.len();
    for (i, &n) in numels.iter().enumerate().rev() {
        // Add the block while that brings the share closer to the target (or it is all).
        if ratio < 1.0 && taken as f64 + n as f64 / 2.0 > target {
            break;
        }
        start = i;
        taken += n;
    }
    start
}

/// How gradients of a block are combined across ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GradReduction {
    /// Every rank gets the whole averaged gradient (stages 0 and 1).
    AllReduce,
    /// Every rank gets the averaged gradient of its shard only (stages 2 and 3).
    ReduceScatter,
}

/// Where a block's compute-dtype parameters live between uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamPlacement {
    /// Every rank keeps the whole block (stages 0–2).
    Resident,
    /// Every rank keeps its shard; the block is all-gathered before each use and released after it
    /// (stage 3).
    Gathered,
}

/// Which part of a block's flat buffer a rank's optimizer (fp32 master weights and state) covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptimizerWindow {
    /// All of it (stage 0).
    Whole,
    /// This rank's shard (stages 1–3).
    Shard,
}

/// How the updated master weights reach the parameters blocks compute on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Publish {
    /// Rebuild the whole block from the whole master copy (stage 0).
    Rebuild,
    /// All-gather every rank's updated shard into the whole block (stages 1–2).
    AllGather,
    /// Keep the updated shard: the block is gathered before its next use anyway (stage 3).
    KeepShard,
}

/// What is sharded and what is offloaded.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Strategy {
    /// The stage.
    pub stage: ZeroStage,
    /// Where the offloaded part of the optimizer state lives.
    pub offload_optimizer: Offload,
    /// The share of the optimizer state (by elements, whole blocks) on the offload tier; the rest
    /// stays on the device (DeepSpeed's Twin-Flow `ratio`). In (0, 1].
    pub offload_ratio: f64,
    /// With `offload_optimizer = Nvme`: the share of the whole optimizer state in NVMe files, in
    /// (0, `offload_ratio`]; the offloaded rest stays in host memory. Equal to `offload_ratio` unless
    /// set by [`Strategy::with_nvme_ratio`].
    pub nvme_ratio: f64,
    /// Where stage-3 parameter shards live between uses.
    pub offload_params: Offload,
}

impl Strategy {
    /// The strategy of `stage`, nothing offloaded.
    pub fn new(stage: ZeroStage) -> Self {
        Self { stage, offload_optimizer: Offload::None, offload_ratio: 1.0, nvme_ratio: 1.0, offload_params: Offload::None }
    }

    /// The same with the optimizer state (`ratio` of it) and the stage-3 parameter shards offloaded.
    pub fn with_offload(self, optimizer: Offload, ratio: f64, params: Offload) -> Self {
        Self { offload_optimizer: optimizer, offload_ratio: ratio, nvme_ratio: ratio, offload_params: params, ..self }
    }

    /// The same with only `nvme_ratio` of the optimizer state (of `offload_ratio` offloaded) in NVMe
    /// files and the offloaded rest in host memory: three tiers, for models whose state fits neither
    /// the host nor the disk alone. Meaningful with `offload_optimizer = Nvme`.
    pub fn with_nvme_ratio(self, nvme_ratio: f64) -> Self {
        Self { nvme_ratio: nvme_ratio.min(self.offload_ratio), ..self }
    }

    /// The tier of each block's optimizer state, from the blocks' sizes (elements of the window each
    /// rank updates). Whole blocks are offloaded, a run of the last ones — their gradients are complete
    /// first in the backward — until the offloaded elements are nearest `offload_ratio` of all;
    /// `offload_ratio = 1` offloads every block. With NVMe, the last of those, nearest `nvme_ratio`
    /// of all, go to files and the others to host memory.
    pub fn optimizer_tiers(self, numels: &[usize]) -> Vec<Tier> {
        let mut tiers = vec![Tier::Device; numels.len()];
        if self.offload_optimizer == Offload::None {
            return tiers;
        }
        let offloaded = last_run_nearest(numels, self.offload_ratio);
        let on_disk = if self.offload_optimizer == Offload::Nvme { last_run_nearest(numels, self.nvme_ratio) } else { numels.len() };
        for (i, tier) in tiers.iter_mut().enumerate().skip(offloaded) {
            *tier = if i >= on_disk { Tier::Nvme } else { Tier::Host };
        }
        tiers
    }

    /// Whether a block whose optimizer state is on `tier` keeps its stage-3 parameter shard in an
    /// NVMe file of its own (`offload_params = Nvme`, the block's state on NVMe) instead of host memory.
    pub fn params_on_nvme(self, tier: Tier) -> bool {
        self.offload_params == Offload::Nvme && tier == Tier::Nvme && self.param_placement() == ParamPlacement::Gathered
    }

    /// The tier of stage-3 parameter shards.
    pub fn param_tier(self) -> Tier {
        self.offload_params.tier()
    }

    fn level(self) -> u8 {
        self.stage.as_int()
    }

    /// Where parameters live between uses.
    pub fn param_placement(self) -> ParamPlacement {
        if self.level() < 3 {
            ParamPlacement::Resident
        } else {
            ParamPlacement::Gathered
        }
    }

    /// What a rank's optimizer covers.
    pub fn optimizer_window(self) -> OptimizerWindow {
        if self.level() >= 1 {
            OptimizerWindow::Shard
        } else {
            OptimizerWindow::Whole
        }
    }

    /// How a block's gradient is reduced once its backward ends on the last micro-batch.
    pub fn grad_reduction(self) -> GradReduction {
        if self.level() >= 2 {
            GradReduction::ReduceScatter
        } else {
            GradReduction::AllReduce
        }
    }

    /// How updated weights are published after the optimizer step.
    pub fn publish(self) -> Publish {
        match (self.param_placement(), self.optimizer_window()) {
            (ParamPlacement::Gathered, _) => Publish::KeepShard,
            (ParamPlacement::Resident, OptimizerWindow::Whole) => Publish::Rebuild,
            (ParamPlacement::Resident, OptimizerWindow::Shard) => Publish::AllGather,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_shard_progressively_more() {
        let s = |n| Strategy::new(ZeroStage::from_int(n).unwrap());
        let table: Vec<_> = (0..4).map(|n| (s(n).param_placement(), s(n).optimizer_window(), s(n).grad_reduction(), s(n).publish())).collect();
        use GradReduction::*;
        use OptimizerWindow::*;
        use ParamPlacement::*;
        use Publish::*;
        assert_eq!(
            table,
            vec![
                (Resident, Whole, AllReduce, Rebuild),
                (Resident, Shard, AllReduce, AllGather),
                (Resident, Shard, ReduceScatter, AllGather),
                (Gathered, Shard, ReduceScatter, KeepShard)
            ]
        );
    }

    #[test]
    fn offload_takes_whole_blocks_from_the_end_nearest_the_ratio() {
        let s = |ratio| Strategy::new(ZeroStage::One).with_offload(Offload::Nvme, ratio, Offload::None);
        use Tier::*;
        let sizes = [40, 10, 10, 30, 10];
        assert_eq!(Strategy::new(ZeroStage::One).optimizer_tiers(&sizes), vec![Device; 5]);
        assert_eq!(s(1.0).optimizer_tiers(&sizes), vec![Nvme; 5]);
        // 50 of 100: 10 + 30 + 10 from the end.
        assert_eq!(s(0.5).optimizer_tiers(&sizes), vec![Device, Device, Nvme, Nvme, Nvme]);
        // 20: the last block (10), then 30 would overshoot by more than half of it.
        assert_eq!(s(0.2).optimizer_tiers(&sizes), vec![Device, Device, Device, Device, Nvme]);
        assert_eq!(s(0.01).optimizer_tiers(&sizes), vec![Device; 5]);
        // Three tiers: 50 offloaded, 20 of them (the last block, nearest) on disk, the rest on the host.
        assert_eq!(s(0.5).with_nvme_ratio(0.2).optimizer_tiers(&sizes), vec![Device, Device, Host, Host, Nvme]);
        assert_eq!(s(1.0).with_nvme_ratio(0.5).optimizer_tiers(&sizes), vec![Host, Host, Nvme, Nvme, Nvme]);
        // The NVMe share cannot exceed the offloaded one; a CPU offload ignores it.
        assert_eq!(s(0.2).with_nvme_ratio(0.9).optimizer_tiers(&sizes), s(0.2).optimizer_tiers(&sizes));
        let cpu = Strategy::new(ZeroStage::One).with_offload(Offload::Cpu, 0.5, Offload::None);
        assert_eq!(cpu.with_nvme_ratio(0.2).optimizer_tiers(&sizes), vec![Device, Device, Host, Host, Host]);
    }
}
