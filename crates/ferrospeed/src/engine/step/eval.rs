//! Evaluation: the loss of a held-out batch with the training step's arithmetic (each micro-batch's
//! loss, their mean, the data-parallel average, a pipeline's last stage handing it to every rank),
//! without gradients and without touching any state — parameters, moments, the step count, the
//! learning-rate schedule, the loss scale — so a run that evaluates trains the same bits as one that
//! does not. Under ZeRO-3 parameters are gathered and released block by block, as in a forward.

use super::block::Batch;
use super::blockwise::{self, ParamSource};
use super::error::EngineError;
use super::sources::{Gathering, Resident};
use super::trainer::{nccl_sync, Engine};
use crate::shard::ParamPlacement;
use candle_core::Tensor;

impl Engine {
    /// The loss of `micro_batches` (this rank's share of one global batch, any number of them): the
    /// mean of their losses, averaged over the data-parallel group, on every rank. In a pipeline
    /// every stage runs its forwards in micro-batch order and the loss is the last stage's. Collective:
    /// every rank of the job calls it with its own share. Not inside a step begun with
    /// [`Engine::forward_backward`].
    pub fn eval_loss(&mut self, micro_batches: &[Batch]) -> Result<f64, EngineError> {
        if micro_batches.is_empty() {
            return Err(EngineError::Unsupported("an evaluation needs at least one micro-batch".into()));
        }
        if self.acc.done > 0 {
            return Err(self.mid_step_error("eval_loss"));
        }
        let losses = match self.pipe.is_some() {
            true => self.pipeline_forwards(micro_batches)?,
            false => self.forwards(micro_batches)?,
        };
        // Reading a loss waits for the device: first let this pass's NCCL gathers finish under the watchdog.
        nccl_sync(self.nccl.as_ref())?;
        self.mean_loss(losses, micro_batches.len())
    }

    /// Each micro-batch's loss through every block, keeping nothing for a backward.
    fn forwards(&mut self, micro_batches: &[Batch]) -> Result<Vec<Tensor>, EngineError> {
        let Self { model, worker, params, cfg, nccl, .. } = self;
        let mut resident = Resident { model, params };
        let mut gathering = Gathering::new(model, params, worker, nccl.as_ref());
        let inner: &mut dyn ParamSource = match cfg.strategy.param_placement() {
            ParamPlacement::Resident => &mut resident,
            ParamPlacement::Gathered => &mut gathering,
        };
        let source = &mut Forwards(inner);
        let mut losses = Vec::with_capacity(micro_batches.len());
        for (k, batch) in micro_batches.iter().enumerate() {
            if k > 0 {
                // The next forward reads its token ids back from the device: let the gathers finish first.
                nccl_sync(nccl.as_ref())?;
            }
            // Checkpointing keeps no graph, only the block inputs, dropped with the tape.
            losses.push(blockwise::forward(model, source, batch, true)?.loss);
        }
        let peak = gathering.peak_bytes;
        self.gathered_peak = self.gathered_peak.max(peak);
        Ok(losses)
    }
}

/// A source for forwards only: no backward follows, so after the last block nothing is fetched
/// ahead (a forward before a backward asks for the last block again, which would keep the head,
/// under ZeRO-3 gathered, through every later micro-batch).
pub(super) struct Forwards<'a>(pub(super) &'a mut dyn ParamSource);

impl ParamSource for Forwards<'_> {
    fn acquire(&mut self, i: usize, next: Option<usize>) -> Result<Vec<Tensor>, EngineError> {
        self.0.acquire(i, next.filter(|&n| n > i))
    }

    fn release(&mut self, i: usize) {
        self.0.release(i)
    }
}
