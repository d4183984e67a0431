//! The flight recorder: the last few collectives of this rank, printed with every timeout.

use super::buffer::DType;
use super::OpKind;
use std::collections::VecDeque;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

/// How a recorded operation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpStatus {
    Running,
    Done(Duration),
    Failed(String),
}

/// One collective as the recorder saw it.
#[derive(Debug, Clone)]
pub struct OpRecord {
    pub seq: u64,
    pub op: OpKind,
    pub dtype: Option<DType>,
    pub numel: usize,
    pub started: Instant,
    pub status: OpStatus,
}

/// A ring of the last `capacity` operations.
#[derive(Debug)]
pub struct FlightRecorder {
    capacity: usize,
    ring: VecDeque<OpRecord>,
}

impl FlightRecorder {
    pub fn new(capacity: usize) -> Self {
        Self { capacity: capacity.max(1), ring: VecDeque::new() }
    }

    /// Record the start of an operation.
    pub fn start(&mut self, seq: u64, op: OpKind, dtype: Option<DType>, numel: usize) {
        if self.ring.len() == self.capacity {
            self.ring.pop_front();
        }
        self.ring.push_back(OpRecord { seq, op, dtype, numel, started: Instant::now(), status: OpStatus::Running });
    }

    /// Record how the operation `seq` of kind `op` ended (point-to-point batches are numbered apart).
    pub fn finish(&mut self, seq: u64, op: OpKind, result: Result<(), String>) {
        if let Some(rec) = self.ring.iter_mut().rev().find(|r| r.seq == seq && r.op == op) {
            rec.status = match result {
                Ok(()) => OpStatus::Done(rec.started.elapsed()),
                Err(e) => OpStatus::Failed(e),
            };
        }
    }

    /// The records, oldest first.
    pub fn records(&self) -> impl Iterator<Item = &OpRecord> {
        self.ring.iter()
    }

    /// One line per operation, oldest first, e.g. `  #12 all_reduce f32×1000 done in 1.2ms`.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for r in &self.ring {
            let what = match r.dtype {
                Some(d) => format!("{} {d}×{}", r.op, r.numel),
                None => r.op.to_string(),
            };
            let status = match &r.status {
                OpStatus::Running => format!("running for {:.1?}", r.started.elapsed()),
                OpStatus::Done(d) => format!("done in {d:.1?}"),
                OpStatus::Failed(e) => format!("failed: {}", e.lines().next().unwrap_or("")),
            };
            let _ = writeln!(out, "  #{} {what} {status}", r.seq);
        }
        if out.is_empty() {
            out.push_str("  (none)\n");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_last_operations_with_their_outcome() {
        let mut rec = FlightRecorder::new(2);
        rec.start(1, OpKind::Barrier, None, 0);
        rec.finish(1, OpKind::Barrier, Ok(()));
        rec.start(2, OpKind::AllReduce, Some(DType::F32), 10);
        rec.finish(2, OpKind::AllReduce, Ok(()));
        rec.start(3, OpKind::AllGather, Some(DType::Bf16), 7);
        rec.finish(3, OpKind::AllGather, Err("timed out".into()));
        let seqs: Vec<u64> = rec.records().map(|r| r.seq).collect();
        assert_eq!(seqs, vec![2, 3]);
        let text = rec.render();
        assert!(text.contains("#2 all_reduce f32×10 done"), "{text}");
        assert!(text.contains("#3 all_gather bf16×7 failed: timed out"), "{text}");
    }
}
