//! Pipeline schedules as data: for each rank of a pipeline group, the ordered list of compute actions
//! (forward, backward, or backward split into input and weight gradients) one executor runs, and a
//! simulator that checks a schedule and measures its bubble.
//!
//! Stages are placed in a loop: with `p` ranks and `v` virtual stages per rank, stage `s` runs on
//! rank `s % p` (rank `r` holds stages `r, r + p, …`; torchtitan's "loop" placement). The
//! activation of (stage `s`, micro-batch `i`) goes to the owner of `s + 1`, its gradient back. A
//! send never blocks the sender (the executor hands it to the link's sender); a receive waits. So a
//! schedule cannot deadlock exactly when the graph of program order and data dependencies has no
//! cycle, which [`Schedule::simulate`] checks while it times the actions.
//!
//! - `gpipe`: every forward, then every backward (memory: all micro-batches' activations).
//! - `1f1b`: `p − 1 − r` forwards to fill the pipe, then one forward and one backward in turn; at most
//!   `p − r` micro-batches in flight. Bubble `(p − 1)/m` of the ideal time.
//! - `interleaved`: Megatron's interleaved 1F1B over `v` virtual stages per rank (`m` a multiple of
//!   `p`); bubble `(p − 1)/(v·m)`.
//! - `zb`: ZB-H1 (arXiv 2401.10241): the backward split into the input gradient (on the critical
//!   path) and the weight gradient (filling the bubbles), at most `p + 1` micro-batches held on a
//!   rank (1F1B: `p`); bubble `(p − 1)(F + B − 2W)` instead of `(p − 1)(F + B)`.

use std::fmt;

/// Which schedule (`parallel.pp_schedule`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScheduleKind {
    Gpipe,
    OneFOneB,
    Interleaved,
    ZeroBubble,
}

impl ScheduleKind {
    /// The name in configs (`"gpipe"`, `"1f1b"`, `"interleaved"`, `"zb"`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Gpipe => "gpipe",
            Self::OneFOneB => "1f1b",
            Self::Interleaved => "interleaved",
            Self::ZeroBubble => "zb",
        }
    }
}

/// What an action computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// The forward of a stage on a micro-batch (the last stage's also computes the loss).
    Forward,
    /// The whole backward: input and weight gradients.
    Backward,
    /// The input gradient only (what the previous stage waits for).
    BackwardInput,
    /// The weight gradient only, after the stage's `BackwardInput` of the same micro-batch.
    BackwardWeight,
}

/// One action of a rank's list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Action {
    pub op: Op,
    pub stage: usize,
    pub micro: usize,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let op = match self.op {
            Op::Forward => "F",
            Op::Backward => "B",
            Op::BackwardInput => "I",
            Op::BackwardWeight => "W",
        };
        write!(f, "{op}{}.{}", self.stage, self.micro)
    }
}

/// A schedule that cannot be built or run, with what to change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    #[error(
        "{micro} micro-batches for {stages} pipeline stages: a pipeline needs at least one micro-batch per stage \
         (raise train.global_batch / train.micro_batch to {stages} or more, or lower parallel.pp)"
    )]
    TooFewMicroBatches { micro: usize, stages: usize },
    #[error(
        "the interleaved schedule needs the micro-batches ({micro}) to be a multiple of parallel.pp = {ranks}: \
         change train.global_batch / train.micro_batch, or use pp_schedule = \"1f1b\""
    )]
    InterleavedMicro { micro: usize, ranks: usize },
    #[error("parallel.pp_virtual = {virtual_stages} needs pp_schedule = \"interleaved\" (the other schedules run one stage per rank)")]
    Virtual { virtual_stages: usize },
    #[error("parallel.pp = 0 or pp_virtual = 0: both must be at least 1")]
    Zero,
    #[error("the schedule deadlocks: {0}")]
    Deadlock(String),
    #[error("the schedule is malformed: {0}")]
    Malformed(String),
}

/// A pipeline schedule: each rank's actions, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    pub kind: ScheduleKind,
    /// Ranks of the pipeline group (`parallel.pp`).
    pub ranks: usize,
    /// Stages per rank (`parallel.pp_virtual`; 1 but for `interleaved`).
    pub virtual_stages: usize,
    /// Micro-batches per step (the accumulation steps).
    pub micro: usize,
    /// `actions[r]`: what rank `r` runs, in order.
    pub actions: Vec<Vec<Action>>,
}

/// Relative costs of the actions, for [`Schedule::simulate`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Costs {
    pub forward: f64,
    /// The input-gradient half of a backward.
    pub backward_input: f64,
    /// The weight-gradient half.
    pub backward_weight: f64,
}

impl Costs {
    /// The usual ratio: forward 1, each half of the backward 1 (a backward costs two forwards).
    pub const UNIT: Costs = Costs { forward: 1.0, backward_input: 1.0, backward_weight: 1.0 };

    fn of(&self, op: Op) -> f64 {
        match op {
            Op::Forward => self.forward,
            Op::Backward => self.backward_input + self.backward_weight,
            Op::BackwardInput => self.backward_input,
            Op::BackwardWeight => self.backward_weight,
        }
    }
}

/// What [`Schedule::simulate`] measured.
#[derive(Debug, Clone, PartialEq)]
pub struct Timeline {
    /// When the last action of any rank ends.
    pub makespan: f64,
    /// Per rank: time spent computing.
    pub busy: Vec<f64>,
    /// Per rank: the start and end of each action, in its list's order.
    pub spans: Vec<Vec<(f64, f64)>>,
    /// Per rank: the most micro-batches whose activations it held at once (forwards whose weight
    /// gradient, or whole backward, had not run yet).
    pub peak_in_flight: Vec<usize>,
}

impl Timeline {
    /// Idle time over busy time, averaged over ranks: the bubble as the analytic formulas give it.
    pub fn bubble(&self) -> f64 {
        let n = self.busy.len() as f64;
        self.busy.iter().map(|b| (self.makespan - b) / b).sum::<f64>() / n
    }
}

impl Schedule {
    /// The schedule `kind` for `ranks` pipeline ranks, `virtual_stages` stages each and `micro`
    /// micro-batches.
    pub fn new(kind: ScheduleKind, ranks: usize, virtual_stages: usize, micro: usize) -> Result<Self, ScheduleError> {
        if ranks == 0 || virtual_stages == 0 {
            return Err(ScheduleError::Zero);
        }
        if virtual_stages > 1 && kind != ScheduleKind::Interleaved {
            return Err(ScheduleError::Virtual { virtual_stages });
        }
        if micro < ranks {
            return Err(ScheduleError::TooFewMicroBatches { micro, stages: ranks });
        }
        if kind == ScheduleKind::Interleaved && micro % ranks != 0 {
            return Err(ScheduleError::InterleavedMicro { micro, ranks });
        }
        let actions = (0..ranks)
            .map(|r| match kind {
                ScheduleKind::Gpipe => gpipe(r, micro),
                ScheduleKind::OneFOneB => one_f_one_b(r, ranks, micro),
                ScheduleKind::Interleaved => interleaved(r, ranks, virtual_stages, micro),
                ScheduleKind::ZeroBubble => Vec::new(),
            })
            .collect();
        let mut s = Self { kind, ranks, virtual_stages, micro, actions };
        if kind == ScheduleKind::ZeroBubble {
            s.actions = zero_bubble(ranks, micro);
        }
        s.simulate(Costs::UNIT)?;
        Ok(s)
    }

    /// Stages in all: `ranks · virtual_stages`.
    pub fn stages(&self) -> usize {
        self.ranks * self.virtual_stages
    }

    /// The rank that runs `stage`.
    pub fn rank_of(&self, stage: usize) -> usize {
        stage % self.ranks
    }

    /// The bubble the analytic formula gives for this schedule at `costs` (idle over busy time):
    /// `(p − 1)/m` for GPipe and 1F1B, `(p − 1)/(v·m)` interleaved, `(p − 1)(F + B − 2W)/(m(F + B))` ZB-H1.
    pub fn analytic_bubble(&self, costs: Costs) -> f64 {
        let (p, m, v) = (self.ranks as f64, self.micro as f64, self.virtual_stages as f64);
        let (f, b, w) = (costs.forward, costs.backward_input + costs.backward_weight, costs.backward_weight);
        match self.kind {
            ScheduleKind::Gpipe | ScheduleKind::OneFOneB => (p - 1.0) / m,
            ScheduleKind::Interleaved => (p - 1.0) / (v * m),
            ScheduleKind::ZeroBubble => (p - 1.0) * (f + b - 2.0 * w).max(0.0) / (m * (f + b)),
        }
    }

    /// Run the schedule on a model of the machine: each action takes its cost, a receive waits for
    /// the send, sends never wait. Checks that every (stage, micro-batch) runs each of its parts
    /// exactly once, on the rank that owns the stage, after what it needs — else the cycle that would
    /// deadlock the executor, or what is missing.
    pub fn simulate(&self, costs: Costs) -> Result<Timeline, ScheduleError> {
        use std::collections::HashMap;
        let stages = self.stages();
        let split = self.actions.iter().flatten().any(|a| matches!(a.op, Op::BackwardInput | Op::BackwardWeight));
        // Check ownership and completeness.
        let mut seen: HashMap<Action, usize> = HashMap::new();
        for (r, list) in self.actions.iter().enumerate() {
            for a in list {
                if a.stage >= stages || a.micro >= self.micro || self.rank_of(a.stage) != r {
                    return Err(ScheduleError::Malformed(format!("rank {r} runs {a}, which is not its action")));
                }
                *seen.entry(*a).or_default() += 1;
            }
        }
        let ops: &[Op] = if split { &[Op::Forward, Op::BackwardInput, Op::BackwardWeight] } else { &[Op::Forward, Op::Backward] };
        for s in 0..stages {
            for i in 0..self.micro {
                for &op in ops {
                    let a = Action { op, stage: s, micro: i };
                    match seen.get(&a) {
                        Some(1) => {}
                        Some(n) => return Err(ScheduleError::Malformed(format!("{a} runs {n} times"))),
                        None => return Err(ScheduleError::Malformed(format!("{a} never runs"))),
                    }
                }
            }
        }
        // When each action ends, once it has run.
        let mut done: HashMap<Action, f64> = HashMap::new();
        let mut next = vec![0usize; self.ranks];
        let mut clock = vec![0.0f64; self.ranks];
        let mut busy = vec![0.0f64; self.ranks];
        let mut spans: Vec<Vec<(f64, f64)>> = vec![Vec::new(); self.ranks];
        let mut in_flight = vec![0usize; self.ranks];
        let mut peak = vec![0usize; self.ranks];
        let backward = |s: usize, i: usize| if split { Action { op: Op::BackwardInput, stage: s, micro: i } } else { Action { op: Op::Backward, stage: s, micro: i } };
        loop {
            let mut progressed = false;
            for r in 0..self.ranks {
                while let Some(a) = self.actions[r].get(next[r]).copied() {
                    let needs: Vec<Action> = match a.op {
                        Op::Forward if a.stage > 0 => vec![Action { op: Op::Forward, stage: a.stage - 1, micro: a.micro }],
                        Op::Forward => vec![],
                        Op::Backward | Op::BackwardInput => {
                            let mut n = vec![Action { op: Op::Forward, stage: a.stage, micro: a.micro }];
                            if a.stage + 1 < stages {
                                n.push(backward(a.stage + 1, a.micro));
                            }
                            n
                        }
                        Op::BackwardWeight => vec![Action { op: Op::BackwardInput, stage: a.stage, micro: a.micro }],
                    };
                    let Some(ready) = needs.iter().map(|n| done.get(n).copied()).try_fold(clock[r], |t, d| d.map(|d| t.max(d))) else { break };
                    let end = ready + costs.of(a.op);
                    spans[r].push((ready, end));
                    busy[r] += costs.of(a.op);
                    clock[r] = end;
                    done.insert(a, end);
                    match a.op {
                        Op::Forward => {
                            in_flight[r] += 1;
                            peak[r] = peak[r].max(in_flight[r]);
                        }
                        Op::Backward | Op::BackwardWeight => in_flight[r] -= 1,
                        Op::BackwardInput => {}
                    }
                    next[r] += 1;
                    progressed = true;
                }
            }
            if next.iter().zip(&self.actions).all(|(n, l)| *n == l.len()) {
                break;
            }
            if !progressed {
                let stuck: Vec<String> = (0..self.ranks)
                    .filter_map(|r| self.actions[r].get(next[r]).map(|a| format!("rank {r} waits at {a}")))
                    .collect();
                return Err(ScheduleError::Deadlock(stuck.join("; ")));
            }
        }
        let makespan = clock.iter().copied().fold(0.0, f64::max);
        Ok(Timeline { makespan, busy, spans, peak_in_flight: peak })
    }
}

fn f(stage: usize, micro: usize) -> Action {
    Action { op: Op::Forward, stage, micro }
}

fn b(stage: usize, micro: usize) -> Action {
    Action { op: Op::Backward, stage, micro }
}

fn gpipe(r: usize, m: usize) -> Vec<Action> {
    (0..m).map(|i| f(r, i)).chain((0..m).map(|i| b(r, i))).collect()
}

fn one_f_one_b(r: usize, p: usize, m: usize) -> Vec<Action> {
    let warmup = (p - 1 - r).min(m);
    let mut out: Vec<Action> = (0..warmup).map(|i| f(r, i)).collect();
    for i in 0..m - warmup {
        out.push(f(r, warmup + i));
        out.push(b(r, i));
    }
    out.extend((m - warmup..m).map(|i| b(r, i)));
    out
}

/// Megatron's interleaved 1F1B (`forward_backward_pipelining_with_interleaving`): forwards walk the
/// rank's chunks in groups of `p` micro-batches, backwards the chunks in reverse.
fn interleaved(r: usize, p: usize, v: usize, m: usize) -> Vec<Action> {
    let total = m * v;
    let unit = |k: usize, forward: bool| {
        let group = k / p;
        let chunk = if forward { group % v } else { v - 1 - group % v };
        let micro = (k / (p * v)) * p + k % p;
        let stage = chunk * p + r;
        if forward {
            f(stage, micro)
        } else {
            b(stage, micro)
        }
    };
    let warmup = ((p - r - 1) * 2 + (v - 1) * p).min(total);
    let mut out: Vec<Action> = (0..warmup).map(|k| unit(k, true)).collect();
    for k in 0..total - warmup {
        out.push(unit(warmup + k, true));
        out.push(unit(k, false));
    }
    out.extend((total - warmup..total).map(|k| unit(k, false)));
    out
}

/// ZB-H1 by list scheduling on the unit-cost model: each rank runs, whenever it is free, the first
/// ready of: the input gradient of its oldest micro-batch, a forward (while fewer than `p − r`
/// micro-batches wait for their input gradient, 1F1B's limit, and the rank holds at most `p + 1`),
/// a weight gradient (which fills what would be idle).
fn zero_bubble(p: usize, m: usize) -> Vec<Vec<Action>> {
    use std::collections::{HashMap, VecDeque};
    let input = |s: usize, i: usize| Action { op: Op::BackwardInput, stage: s, micro: i };
    let weight = |s: usize, i: usize| Action { op: Op::BackwardWeight, stage: s, micro: i };
    let costs = Costs::UNIT;
    let mut done: HashMap<Action, f64> = HashMap::new();
    let mut out: Vec<Vec<Action>> = vec![Vec::new(); p];
    let mut clock = vec![0.0f64; p];
    let mut next_f = vec![0usize; p];
    let mut next_i = vec![0usize; p];
    let mut pending_w: Vec<VecDeque<usize>> = vec![VecDeque::new(); p];
    let mut in_flight = vec![0usize; p];
    let total = 3 * p * m;
    while done.len() < total {
        // The rank that can start an action earliest goes next (ties: the lower rank).
        let mut best: Option<(f64, usize, Action)> = None;
        for r in 0..p {
            let ready = |a: Action| -> Option<f64> {
                let needs = match a.op {
                    Op::Forward if a.stage > 0 => vec![f(a.stage - 1, a.micro)],
                    Op::Forward => vec![],
                    Op::BackwardInput if a.stage + 1 < p => vec![f(a.stage, a.micro), input(a.stage + 1, a.micro)],
                    Op::BackwardInput => vec![f(a.stage, a.micro)],
                    _ => vec![input(a.stage, a.micro)],
                };
                needs.iter().try_fold(clock[r], |t, n| done.get(n).map(|d| t.max(*d)))
            };
            let mut candidates = Vec::new();
            if next_i[r] < next_f[r] {
                candidates.push(input(r, next_i[r]));
            }
            // No rank holds more than p + 1 micro-batches (1F1B's first stage holds p): the later
            // stages defer their weight gradients so the input gradients, the critical path, go
            // first; with a cap of p the first stage must run a weight gradient where a forward
            // belongs, and the bubble grows from (p − 1)(F + B − 2W) towards 1F1B's.
            if next_f[r] < m && next_f[r] - next_i[r] < p - r && in_flight[r] < p + 1 {
                candidates.push(f(r, next_f[r]));
            }
            if let Some(&i) = pending_w[r].front() {
                candidates.push(weight(r, i));
            }
            // The earliest start; among equal starts, the order above (I, F, W).
            let pick = candidates.into_iter().filter_map(|a| ready(a).map(|t| (t, a))).min_by(|x, y| x.0.partial_cmp(&y.0).expect("finite"));
            if let Some((t, a)) = pick {
                if best.is_none_or(|(bt, _, _)| t < bt) {
                    best = Some((t, r, a));
                }
            }
        }
        let Some((t, r, a)) = best else { break };
        let end = t + costs.of(a.op);
        clock[r] = end;
        done.insert(a, end);
        out[r].push(a);
        match a.op {
            Op::Forward => {
                next_f[r] += 1;
                in_flight[r] += 1;
            }
            Op::BackwardInput => {
                next_i[r] += 1;
                pending_w[r].push_back(a.micro);
            }
            _ => {
                pending_w[r].pop_front();
                in_flight[r] -= 1;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const KINDS: [ScheduleKind; 4] = [ScheduleKind::Gpipe, ScheduleKind::OneFOneB, ScheduleKind::Interleaved, ScheduleKind::ZeroBubble];

    #[test]
    fn every_schedule_runs_every_part_once_without_deadlock() {
        for kind in KINDS {
            for p in 1..=4 {
                for v in if kind == ScheduleKind::Interleaved { vec![1, 2, 3] } else { vec![1] } {
                    for m in p..=3 * p + 1 {
                        if kind == ScheduleKind::Interleaved && m % p != 0 {
                            assert!(matches!(Schedule::new(kind, p, v, m), Err(ScheduleError::InterleavedMicro { .. })));
                            continue;
                        }
                        let s = Schedule::new(kind, p, v, m).unwrap_or_else(|e| panic!("{} p={p} v={v} m={m}: {e}", kind.name()));
                        s.simulate(Costs::UNIT).unwrap();
                        s.simulate(Costs { forward: 1.0, backward_input: 1.5, backward_weight: 0.5 }).unwrap();
                    }
                }
            }
        }
    }

    #[test]
    fn one_f_one_b_holds_at_most_p_minus_r_micro_batches_and_gpipe_all() {
        let (p, m) = (4, 8);
        let t = Schedule::new(ScheduleKind::OneFOneB, p, 1, m).unwrap().simulate(Costs::UNIT).unwrap();
        assert_eq!(t.peak_in_flight, vec![4, 3, 2, 1]);
        let t = Schedule::new(ScheduleKind::Gpipe, p, 1, m).unwrap().simulate(Costs::UNIT).unwrap();
        assert_eq!(t.peak_in_flight, vec![8; 4]);
        // ZB-H1: at most p + 1 micro-batches on any rank (those past their input gradient hold only
        // what the weight gradient needs).
        let t = Schedule::new(ScheduleKind::ZeroBubble, p, 1, m).unwrap().simulate(Costs::UNIT).unwrap();
        assert!(t.peak_in_flight.iter().all(|&n| n <= p + 1), "{:?}", t.peak_in_flight);
    }

    #[test]
    fn simulated_bubbles_are_the_analytic_ones() {
        for (kind, v) in [(ScheduleKind::Gpipe, 1), (ScheduleKind::OneFOneB, 1), (ScheduleKind::Interleaved, 2), (ScheduleKind::ZeroBubble, 1)] {
            for (p, m) in [(2, 4), (4, 8), (4, 16)] {
                let s = Schedule::new(kind, p, v, m).unwrap();
                let got = s.simulate(Costs::UNIT).unwrap().bubble();
                let want = s.analytic_bubble(Costs::UNIT);
                assert!((got - want).abs() <= 0.05 * want.max(1e-9) + 1e-9, "{} p={p} v={v} m={m}: simulated {got}, analytic {want}", kind.name());
            }
        }
        // Zero bubble beats 1F1B, which interleaving beats.
        let b = |k, v| Schedule::new(k, 4, v, 8).unwrap().simulate(Costs::UNIT).unwrap().bubble();
        assert!(b(ScheduleKind::ZeroBubble, 1) < b(ScheduleKind::Interleaved, 2) && b(ScheduleKind::Interleaved, 2) < b(ScheduleKind::OneFOneB, 1));
    }

    #[test]
    fn a_schedule_that_would_deadlock_or_skip_work_is_refused() {
        let mut s = Schedule::new(ScheduleKind::OneFOneB, 2, 1, 2).unwrap();
        // Rank 0 runs its backwards before its forwards: it waits for rank 1, which waits for it.
        s.actions[0].reverse();
        let e = s.simulate(Costs::UNIT).unwrap_err();
        assert!(matches!(e, ScheduleError::Deadlock(_)) && e.to_string().contains("rank 0 waits at B0.1"), "{e}");
        let mut s = Schedule::new(ScheduleKind::OneFOneB, 2, 1, 2).unwrap();
        s.actions[1].pop();
        assert!(s.simulate(Costs::UNIT).unwrap_err().to_string().contains("B1.1 never runs"));
        let e = Schedule::new(ScheduleKind::OneFOneB, 4, 1, 3).unwrap_err().to_string();
        assert!(e.contains("3 micro-batches for 4 pipeline stages"), "{e}");
        assert!(matches!(Schedule::new(ScheduleKind::OneFOneB, 2, 2, 4), Err(ScheduleError::Virtual { .. })));
    }
}
