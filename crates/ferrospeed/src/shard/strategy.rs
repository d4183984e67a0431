//! The ZeRO stage as data: the step schedule asks these questions instead of branching on the stage.

pub use crate::config::ZeroStage;

/// How gradients of a block are combined across ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GradReduction {
    /// Every rank gets the whole averaged gradient (stages 0 and 1).
    AllReduce,
    /// Every rank gets the averaged gradient of its shard only (stages 2 and 3).
    ReduceScatter,
}

/// What is sharded, for one ZeRO stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Strategy {
    pub stage: ZeroStage,
}

impl Strategy {
    pub fn new(stage: ZeroStage) -> Self {
        Self { stage }
    }

    fn level(self) -> u8 {
        self.stage.as_int()
    }

    /// Whether every rank keeps the whole parameters of every block between uses (stages 0–2). If not,
    /// a block's parameters are all-gathered before each use and released after it.
    pub fn params_resident(self) -> bool {
        self.level() < 3
    }

    /// Whether fp32 master weights and optimizer moments cover only this rank's shard (stages 1–3).
    pub fn optimizer_sharded(self) -> bool {
        self.level() >= 1
    }

    /// How a block's gradient is reduced once its backward ends on the last micro-batch.
    pub fn grad_reduction(self) -> GradReduction {
        if self.level() >= 2 {
            GradReduction::ReduceScatter
        } else {
            GradReduction::AllReduce
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_shard_progressively_more() {
        let s = |n| Strategy::new(ZeroStage::from_int(n).unwrap());
        let table: Vec<(bool, bool, GradReduction)> =
            (0..4).map(|n| (s(n).params_resident(), s(n).optimizer_sharded(), s(n).grad_reduction())).collect();
        use GradReduction::*;
        assert_eq!(
            table,
            vec![(true, false, AllReduce), (true, true, AllReduce), (true, true, ReduceScatter), (false, true, ReduceScatter)]
        );
    }
}
