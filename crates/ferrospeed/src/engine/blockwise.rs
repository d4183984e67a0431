//! Forward and backward over blocks: keep block-boundary activations, recompute a block for its
//! backward when activation checkpointing is on, and backpropagate one block at a time.
//!
//! Blocks with a hand-written backward (`Block::forward_saving`/`Block::backward`) keep what it needs
//! and run it. For the others, with block output `y` and upstream gradient `g`, `sum(y · g).backward()`
//! gives exactly the parameter and input gradients of one full backward (checked on CPU and H100, see
//! DESIGN.md); the block input is a fresh `Var`, so each backward touches only its own block's graph.

use super::block::{Batch, Saved, Upstream};
use super::error::EngineError;
use super::model::Model;
use candle_core::{Tensor, Var};

/// Where blocks get their parameters: resident variables, or shards gathered on demand (stage 3).
pub trait ParamSource {
    /// The slot tensors of block `i`. `next` is the block that will be asked for after it, so its
    /// parameters can be fetched while block `i` computes.
    fn acquire(&mut self, i: usize, next: Option<usize>) -> Result<Vec<Tensor>, EngineError>;
    /// Block `i` is done for now; its gathered parameters may be released.
    fn release(&mut self, i: usize);
}

/// Parameters given up front, one list of slot tensors per block (tests, generation, stages 0–2).
impl ParamSource for &[Vec<Tensor>] {
    fn acquire(&mut self, i: usize, _next: Option<usize>) -> Result<Vec<Tensor>, EngineError> {
        Ok(self[i].clone())
    }
    fn release(&mut self, _i: usize) {}
}

/// What the forward pass keeps of a block when activation checkpointing is off.
enum Kept {
    /// Its autograd graph.
    Graph { input: Option<Var>, output: Tensor, params: Vec<Tensor> },
    /// What its hand-written backward needs.
    Manual { saved: Saved, params: Vec<Tensor> },
}

/// What the forward pass leaves for the backward pass.
pub struct Tape {
    /// Each block's input activation, detached (`None` for the first block).
    inputs: Vec<Option<Tensor>>,
    /// Without checkpointing: each block's graph.
    kept: Vec<Option<Kept>>,
    /// The last block's output: the scalar loss.
    pub loss: Tensor,
}

/// Run every block on the parameters `source` provides (variables, for training).
///
/// With `checkpointing`, blocks run on detached parameters and keep no graph; only the boundary
/// activations stay. Without it, each block's graph is kept for the backward pass.
pub fn forward(model: &Model, source: &mut dyn ParamSource, batch: &Batch, checkpointing: bool) -> Result<Tape, EngineError> {
    let n = model.num_blocks();
    let mut inputs = Vec::with_capacity(n);
    let mut kept = Vec::with_capacity(n);
    let mut x: Option<Tensor> = None;
    for i in 0..n {
        let block = model.block(i);
        // After the last block, the backward pass starts again from it (when it recomputes).
        let next = if i + 1 < n { Some(i + 1) } else { checkpointing.then_some(i) };
        let params = source.acquire(i, next)?;
        let err = || EngineError::tensor(block.name());
        let y = if checkpointing {
            let detached: Vec<Tensor> = params.iter().map(Tensor::detach).collect();
            kept.push(None);
            block.forward(&detached, x.as_ref(), batch).map_err(err())?
        } else if let Some((y, saved)) = block.forward_saving(&detach_all(&params), x.as_ref(), batch).map_err(err())? {
            kept.push(Some(Kept::Manual { saved, params }));
            y
        } else {
            let (input, output) = run_tracked(model, i, &params, x.as_ref(), batch)?;
            kept.push(Some(Kept::Graph { input, output: output.clone(), params }));
            output
        };
        source.release(i);
        inputs.push(x.take());
        x = Some(y.detach());
    }
    let loss = x.ok_or_else(|| EngineError::Model("a model needs at least one block".into()))?;
    Ok(Tape { inputs, kept, loss })
}

fn detach_all(params: &[Tensor]) -> Vec<Tensor> {
    params.iter().map(Tensor::detach).collect()
}

/// Run block `i` with its input as a fresh variable, keeping the graph.
fn run_tracked(
    model: &Model,
    i: usize,
    params: &[Tensor],
    x: Option<&Tensor>,
    batch: &Batch,
) -> Result<(Option<Var>, Tensor), EngineError> {
    let block = model.block(i);
    let err = || EngineError::tensor(block.name());
    let xv = x.map(Var::from_tensor).transpose().map_err(err())?;
    let y = block.forward(params, xv.as_ref().map(Var::as_tensor), batch).map_err(err())?;
    Ok((xv, y))
}

/// Backpropagate from the loss, block by block in reverse. The loss is multiplied by `loss_scale`
/// (e.g. 1/accumulation steps). After each block, `on_block(i, grads)` receives the gradients of its
/// slots (`None` where a slot did not influence the loss), so the caller can reduce them while later
/// blocks compute.
pub fn backward(
    model: &Model,
    source: &mut dyn ParamSource,
    batch: &Batch,
    mut tape: Tape,
    loss_scale: f64,
    mut on_block: impl FnMut(usize, Vec<Option<Tensor>>) -> Result<(), EngineError>,
) -> Result<(), EngineError> {
    let mut grad_out: Option<Tensor> = None;
    for i in (0..model.num_blocks()).rev() {
        let block = model.block(i);
        let err = || EngineError::tensor(block.name());
        let kept = match tape.kept[i].take() {
            Some(k) => k,
            None => {
                let params = source.acquire(i, i.checked_sub(1))?;
                let x = tape.inputs[i].as_ref();
                match block.forward_saving(&detach_all(&params), x, batch).map_err(err())? {
                    Some((_, saved)) => Kept::Manual { saved, params },
                    None => {
                        let (input, output) = run_tracked(model, i, &params, x, batch)?;
                        Kept::Graph { input, output, params }
                    }
                }
            }
        };
        let slot_grads = match kept {
            Kept::Manual { saved, params } => {
                let upstream = match &grad_out {
                    None => Upstream::Loss(loss_scale),
                    Some(g) => Upstream::Grad(g),
                };
                let (slot_grads, grad_in) = block.backward(&detach_all(&params), saved, upstream).map_err(err())?;
                if slot_grads.len() != params.len() {
                    return Err(EngineError::Model(format!(
                        "block {}: backward returned {} gradients for {} parameter slots",
                        block.name(),
                        slot_grads.len(),
                        params.len()
                    )));
                }
                grad_out = grad_in;
                slot_grads
            }
            Kept::Graph { input: xv, output: y, params } => {
                let target = match &grad_out {
                    None => y.affine(loss_scale, 0.0).map_err(err())?,
                    Some(g) => (y * g).and_then(|t| t.sum_all()).map_err(err())?,
                };
                let grads = target.backward().map_err(err())?;
                let slot_grads = params.iter().map(|p| grads.get(p).cloned()).collect();
                grad_out = match xv {
                    Some(v) => Some(match grads.get(v.as_tensor()) {
                        Some(g) => g.clone(),
                        None => v.as_tensor().zeros_like().map_err(err())?,
                    }),
                    None => None,
                };
                slot_grads
            }
        };
        source.release(i);
        on_block(i, slot_grads)?;
    }
    Ok(())
}
