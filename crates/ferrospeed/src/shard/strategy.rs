//! The ZeRO stage as data: the step schedule asks these questions instead of branching on the stage.

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

/// What is sharded, for one ZeRO stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Strategy {
    /// The stage.
    pub stage: ZeroStage,
}

impl Strategy {
    /// The strategy of `stage`.
    pub fn new(stage: ZeroStage) -> Self {
        Self { stage }
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
}
