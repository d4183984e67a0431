//! Which blocks each pipeline stage runs: contiguous runs of the model's blocks, balanced by a cost
//! estimate or given by `parallel.pp_split`.
//!
//! A block's cost is its share of the model's forward FLOPs plus its share of the parameters (what a
//! stage computes, and what it holds with its gradients and optimizer state): an embedding, almost
//! free to compute, still weighs what its table weighs, and a head weighs its matmul over the
//! vocabulary. The split minimises the most expensive stage exactly (a small dynamic programme over
//! the cut points).

use std::ops::Range;

/// A split that cannot be made, with what to change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StageError {
    #[error("{stages} pipeline stages (parallel.pp × pp_virtual) for a model of {blocks} blocks: every stage needs at least one block (lower parallel.pp or pp_virtual)")]
    TooManyStages { stages: usize, blocks: usize },
    #[error(
        "parallel.pp_split = {split:?} has {len} entries for {stages} stages (parallel.pp × pp_virtual): give one block count \
         per stage, first to last (the embedding and the head count as one block each), or remove it to split by cost"
    )]
    SplitLength { split: Vec<usize>, len: usize, stages: usize },
    #[error(
        "parallel.pp_split = {split:?} adds up to {sum} blocks, the model has {blocks} (its layers plus the embedding and the \
         head): make the counts add up to {blocks}, each at least 1"
    )]
    SplitSum { split: Vec<usize>, sum: usize, blocks: usize },
}

/// One block's cost (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BlockCost {
    /// Forward FLOPs per token.
    pub flops: f64,
    /// Parameters it owns.
    pub params: f64,
}

/// The blocks of each of `stages` stages: `pp_split` when given (block counts, first to last),
/// otherwise the split of `costs` whose most expensive stage is cheapest.
pub fn stage_blocks(costs: &[BlockCost], stages: usize, pp_split: &[usize]) -> Result<Vec<Range<usize>>, StageError> {
    let n = costs.len();
    if stages > n || stages == 0 {
        return Err(StageError::TooManyStages { stages, blocks: n });
    }
    if !pp_split.is_empty() {
        if pp_split.len() != stages {
            return Err(StageError::SplitLength { split: pp_split.to_vec(), len: pp_split.len(), stages });
        }
        let sum: usize = pp_split.iter().sum();
        if sum != n || pp_split.contains(&0) {
            return Err(StageError::SplitSum { split: pp_split.to_vec(), sum, blocks: n });
        }
        let mut start = 0;
        return Ok(pp_split
            .iter()
            .map(|&k| {
                start += k;
                start - k..start
            })
            .collect());
    }
    let total = |f: fn(&BlockCost) -> f64| costs.iter().map(f).sum::<f64>();
    let (flops, params) = (total(|c| c.flops), total(|c| c.params));
    let share = |x: f64, of: f64| if of > 0.0 { x / of } else { 0.0 };
    let weight: Vec<f64> = costs.iter().map(|c| share(c.flops, flops) + share(c.params, params)).collect();
    Ok(balanced(&weight, stages))
}

/// Cut `weight` into `stages` non-empty contiguous runs minimising the heaviest run (ties: the
/// earliest cuts).
fn balanced(weight: &[f64], stages: usize) -> Vec<Range<usize>> {
    let n = weight.len();
    let mut prefix = vec![0.0; n + 1];
    for (i, w) in weight.iter().enumerate() {
        prefix[i + 1] = prefix[i] + w;
    }
    let run = |a: usize, b: usize| prefix[b] - prefix[a];
    // best[s][j]: the heaviest run of the best split of the first j blocks into s runs; cut[s][j]
    // where its last run starts.
    let mut best = vec![vec![f64::INFINITY; n + 1]; stages + 1];
    let mut cut = vec![vec![0usize; n + 1]; stages + 1];
    best[0][0] = 0.0;
    for s in 1..=stages {
        for j in s..=n {
            for i in (s - 1)..j {
                let cost = best[s - 1][i].max(run(i, j));
                if cost < best[s][j] {
                    (best[s][j], cut[s][j]) = (cost, i);
                }
            }
        }
    }
    let mut ranges = vec![0..0; stages];
    let mut end = n;
    for s in (1..=stages).rev() {
        let start = cut[s][end];
        ranges[s - 1] = start..end;
        end = start;
    }
    ranges
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uniform(n: usize) -> Vec<BlockCost> {
        vec![BlockCost { flops: 1.0, params: 1.0 }; n]
    }

    #[test]
    fn equal_blocks_split_evenly_and_every_stage_gets_one() {
        assert_eq!(stage_blocks(&uniform(8), 4, &[]).unwrap(), vec![0..2, 2..4, 4..6, 6..8]);
        assert_eq!(stage_blocks(&uniform(3), 3, &[]).unwrap(), vec![0..1, 1..2, 2..3]);
        assert_eq!(stage_blocks(&uniform(5), 1, &[]).unwrap(), vec![0..5]);
    }

    #[test]
    fn a_heavy_head_gets_a_stage_with_fewer_layers() {
        // embedding (no FLOPs, a big table), 6 layers, a head (big matmul, tied: no parameters).
        let mut costs = vec![BlockCost { flops: 0.0, params: 4.0 }];
        costs.extend(vec![BlockCost { flops: 1.0, params: 1.0 }; 6]);
        costs.push(BlockCost { flops: 3.0, params: 0.0 });
        let split = stage_blocks(&costs, 2, &[]).unwrap();
        assert_eq!(split[0].start, 0);
        assert_eq!(split[1].end, 8);
        // The first stage carries the table, the second the head: each gets some layers, and the
        // heaviest stage is no heavier than any other split's.
        let total: Vec<f64> = {
            let f: f64 = costs.iter().map(|c| c.flops).sum();
            let p: f64 = costs.iter().map(|c| c.params).sum();
            costs.iter().map(|c| c.flops / f + c.params / p).collect()
        };
        let heaviest = |cut: usize| total[..cut].iter().sum::<f64>().max(total[cut..].iter().sum());
        let ours = heaviest(split[0].end);
        assert!((1..8).all(|c| ours <= heaviest(c) + 1e-12), "cut at {} is not the best", split[0].end);
    }

    #[test]
    fn a_given_split_is_used_and_bad_ones_are_refused_in_one_line() {
        assert_eq!(stage_blocks(&uniform(6), 2, &[1, 5]).unwrap(), vec![0..1, 1..6]);
        for (split, word) in [(vec![3, 3, 0], "add up"), (vec![2, 2], "entries"), (vec![2, 2, 3], "add up")] {
            let e = stage_blocks(&uniform(6), 3, &split).unwrap_err().to_string();
            assert!(e.contains(word) && !e.contains('\n'), "{e}");
        }
        let e = stage_blocks(&uniform(2), 3, &[]).unwrap_err().to_string();
        assert!(e.contains("lower parallel.pp") && e.contains("3 pipeline stages"), "{e}");
    }
}
