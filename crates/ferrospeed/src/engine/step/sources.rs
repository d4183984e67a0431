//! The two ways blocks get parameters: resident variables (stages 0–2), or shards all-gathered just
//! before use and released after it, with the next block's gather already running (stage 3).

use super::blockwise::ParamSource;
use super::comm_worker::CommWorker;
use super::error::EngineError;
use super::model::Model;
use super::comm_worker::Pending;
use super::host_buf::HostBuf;
use super::frozen::FrozenSet;
use super::params::{BlockParams, Gather};
use super::Nccl;
use candle_core::{Tensor, Var};
use std::collections::{BTreeSet, HashMap};

/// Blocks whose parameters block `i` uses: itself and the owners of its tied slots.
fn owners(model: &Model, i: usize) -> BTreeSet<usize> {
    model.slots(i).iter().map(|s| s.block).collect()
}

/// Block `i`'s slot tensors, from each owner's trainable and frozen tensors (`tensors_of(block)`).
fn slot_tensors(model: &Model, i: usize, tensors_of: impl Fn(usize) -> Option<(Vec<Tensor>, FrozenSet)>) -> Result<Vec<Tensor>, EngineError> {
    let mut out = Vec::with_capacity(model.slots(i).len());
    for s in model.slots(i) {
        let (own, frozen) = tensors_of(s.block).ok_or_else(|| EngineError::Unsupported(format!("parameters of block {} are not available", s.block)))?;
        out.push(if s.frozen { &frozen.each } else { &own }[s.index].clone());
    }
    Ok(out)
}

/// What a step's block gets: its slot tensors, then, where every run of `Block::stacked_runs` is
/// frozen parameters lying next to each other in one owner's buffer, one view per run.
fn step_tensors(model: &Model, i: usize, tensors_of: impl Fn(usize) -> Option<(Vec<Tensor>, FrozenSet)>) -> Result<Vec<Tensor>, EngineError> {
    let mut out = slot_tensors(model, i, &tensors_of)?;
    let runs = model.block(i).stacked_runs();
    let slots = model.slots(i);
    let stacked: Option<Vec<Tensor>> = runs
        .iter()
        .map(|run| {
            let first = slots.get(run.start)?;
            let consecutive = run.clone().enumerate().all(|(k, j)| slots.get(j).is_some_and(|s| s.frozen && s.block == first.block && s.index == first.index + k));
            consecutive.then(|| tensors_of(first.block)?.1.stacked(first.index..first.index + run.len())).flatten()
        })
        .collect();
    out.extend(stacked.unwrap_or_default());
    Ok(out)
}

/// A block's gathered trainable variables and frozen tensors as slot tensors.
fn gathered((vars, frozen): &(Vec<Var>, FrozenSet)) -> (Vec<Tensor>, FrozenSet) {
    (vars.iter().map(|v| v.as_tensor().clone()).collect(), frozen.clone())
}

/// Stages 0–2: every block's variables are always there.
pub struct Resident<'a> {
    pub model: &'a Model,
    pub params: &'a [BlockParams],
}

impl Resident<'_> {
    /// Block `i`'s tensors: its slots' (`stacks`: then the views of its stacked runs, for a step).
    fn tensors(&self, i: usize, stacks: bool) -> Result<Vec<Tensor>, EngineError> {
        // Frozen tensors first (an NF4 base is dequantised here, and may fail).
        let mut frozen: HashMap<usize, FrozenSet> = HashMap::new();
        for b in owners(self.model, i) {
            if !self.params[b].frozen.is_empty() {
                frozen.insert(b, self.params[b].frozen.resident_tensors()?.unwrap_or_default());
            }
        }
        let of = |b: usize| {
            let p = &self.params[b];
            p.resident().map(|v| (v.iter().map(|v| v.as_tensor().clone()).collect(), frozen.get(&b).cloned().unwrap_or_default()))
        };
        if stacks {
            step_tensors(self.model, i, of)
        } else {
            slot_tensors(self.model, i, of)
        }
    }

    /// Block `i`'s slot tensors.
    pub fn slot_tensors(&self, i: usize) -> Result<Vec<Tensor>, EngineError> {
        self.tensors(i, false)
    }
}

impl ParamSource for Resident<'_> {
    fn acquire(&mut self, i: usize, _next: Option<usize>) -> Result<Vec<Tensor>, EngineError> {
        self.tensors(i, true)
    }

    fn release(&mut self, _i: usize) {}
}

/// Stage 3: gather on demand, prefetch the next block, release what the next block does not need.
pub struct Gathering<'a> {
    pub model: &'a Model,
    pub params: &'a [BlockParams],
    pub worker: &'a CommWorker,
    /// NCCL when the ranks have one GPU each: shards are then gathered on the devices.
    nccl: Option<&'a Nccl>,
    /// Gathered blocks: their trainable variables and frozen tensors.
    ready: HashMap<usize, (Vec<Var>, FrozenSet)>,
    pending: HashMap<usize, (Gather, Option<Pending<Result<HostBuf, EngineError>>>)>,
    /// Owners needed by the block announced as next, kept across `release`.
    upcoming: BTreeSet<usize>,
    /// Largest number of bytes of gathered parameters alive at once.
    pub peak_bytes: usize,
}

impl<'a> Gathering<'a> {
    pub fn new(model: &'a Model, params: &'a [BlockParams], worker: &'a CommWorker, nccl: Option<&'a Nccl>) -> Self {
        Self { model, params, worker, nccl, ready: HashMap::new(), pending: HashMap::new(), upcoming: BTreeSet::new(), peak_bytes: 0 }
    }

    fn ensure(&mut self, block: usize) -> Result<(), EngineError> {
        if self.ready.contains_key(&block) {
            return Ok(());
        }
        let (pending, frozen) = match self.pending.remove(&block) {
            Some(p) => p,
            None => self.start(block)?,
        };
        let p = &self.params[block];
        let got = crate::profile::scoped_as(crate::profile::Kind::Communication, "param_gather", || Ok::<_, EngineError>((p.finish_gather(pending)?, p.frozen.finish_gather(frozen)?)))?;
        self.ready.insert(block, got);
        let bytes: usize = self
            .ready
            .values()
            .flat_map(|(v, f)| v.iter().map(|v| v.as_tensor()).chain(&f.each))
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum();
        self.peak_bytes = self.peak_bytes.max(bytes);
        Ok(())
    }

    /// Start gathering block `b`'s trainable and frozen shards.
    fn start(&self, b: usize) -> Result<(Gather, Option<Pending<Result<HostBuf, EngineError>>>), EngineError> {
        let p = &self.params[b];
        Ok((p.start_gather(self.worker, self.nccl)?, p.frozen.start_gather(self.worker)))
    }

    /// Gather every block (e.g. to generate text); a collective on every rank.
    pub fn all_slot_tensors(&mut self) -> Result<Vec<Vec<Tensor>>, EngineError> {
        for b in 0..self.model.num_blocks() {
            self.ensure(b)?;
        }
        (0..self.model.num_blocks())
            .map(|i| slot_tensors(self.model, i, |b| self.ready.get(&b).map(gathered)))
            .collect()
    }
}

impl ParamSource for Gathering<'_> {
    fn acquire(&mut self, i: usize, next: Option<usize>) -> Result<Vec<Tensor>, EngineError> {
        for owner in owners(self.model, i) {
            self.ensure(owner)?;
        }
        // Start the next block's gathers now: they run on the communication thread while `i` computes.
        self.upcoming = next.map(|n| owners(self.model, n)).unwrap_or_default();
        for owner in self.upcoming.clone() {
            if !self.ready.contains_key(&owner) && !self.pending.contains_key(&owner) {
                let pending = self.start(owner)?;
                self.pending.insert(owner, pending);
            }
        }
        step_tensors(self.model, i, |b| self.ready.get(&b).map(gathered))
    }

    fn release(&mut self, i: usize) {
        for owner in owners(self.model, i) {
            if !self.upcoming.contains(&owner) {
                self.ready.remove(&owner);
            }
        }
    }
}

impl Drop for Gathering<'_> {
    fn drop(&mut self) {
        // A gather that was prefetched but never used must still complete on this rank, since the
        // other ranks run it too; waiting keeps the worker's queue and the peers in step.
        for (_, (p, frozen)) in self.pending.drain() {
            p.complete();
            if let Some(f) = frozen {
                drop(f.wait());
            }
        }
    }
}
