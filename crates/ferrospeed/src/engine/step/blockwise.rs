//! Forward and backward over blocks: keep block-boundary activations, recompute a block for its
//! backward when activation checkpointing is on, and backpropagate one block at a time.
//!
//! Blocks with a hand-written backward (`Block::forward_saving`/`Block::backward`) keep what it needs
//! and run it. For the others, with block output `y` and upstream gradient `g`, `sum(y · g).backward()`
//! gives exactly the parameter and input gradients of one full backward (checked on CPU and H100; the
//! tests of `tests/gradients.rs` hold it); the block input is a fresh `Var`, so each backward touches only its own block's graph.

use super::block::{Batch, Saved, Upstream};
use super::error::EngineError;
use super::param_grads::WeightGrads;
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
    /// Its autograd graph: the inputs as variables (floating-point ones), the outputs.
    Graph { inputs: Vec<Option<Var>>, outputs: Vec<Tensor>, params: Vec<Tensor> },
    /// What its hand-written backward needs, and its parameters where they were acquired for the
    /// backward (a recomputed block). A forward keeps none: the backward acquires them again, so that
    /// a gathered (stage 3) or dequantised (NF4) block's parameters do not stay alive between its
    /// forward and its backward.
    Manual { saved: Saved, params: Option<Vec<Tensor>> },
}

/// What the forward pass of a run of blocks leaves for their backward pass.
pub struct SpanTape {
    /// The first block it ran.
    first: usize,
    /// Each block's inputs, detached (empty for the model's first block), from `first` on.
    inputs: Vec<Vec<Tensor>>,
    /// Without checkpointing: each block's graph.
    kept: Vec<Option<Kept>>,
}

/// What the forward pass of the whole model leaves for the backward pass.
pub struct Tape {
    span: SpanTape,
    /// The last block's output: the scalar loss.
    pub loss: Tensor,
    /// And the statistics it returned after the loss (`Block::metrics`), detached.
    pub metrics: Vec<Tensor>,
}

/// Run every block on the parameters `source` provides (variables, for training); the last block
/// returns the scalar loss.
///
/// With `checkpointing`, blocks run on detached parameters and keep no graph; only the boundary
/// activations stay. Without it, each block's graph is kept for the backward pass.
pub fn forward(model: &Model, source: &mut dyn ParamSource, batch: &Batch, checkpointing: bool) -> Result<Tape, EngineError> {
    let n = model.num_blocks();
    if n == 0 {
        return Err(EngineError::Model("a model needs at least one block".into()));
    }
    let (span, outputs) = forward_span(model, source, batch, checkpointing, 0..n, Vec::new())?;
    let (loss, metrics) = loss_and_metrics(model, n - 1, outputs)?;
    Ok(Tape { span, loss, metrics })
}

/// The forward of `blocks` (a pipeline stage's), from `input` (what the block before them returned,
/// detached; nothing for the model's first block). Returns the tape and the last block's outputs.
pub fn forward_span(
    model: &Model,
    source: &mut dyn ParamSource,
    batch: &Batch,
    checkpointing: bool,
    blocks: std::ops::Range<usize>,
    input: Vec<Tensor>,
) -> Result<(SpanTape, Vec<Tensor>), EngineError> {
    let (first, n) = (blocks.start, blocks.end);
    let mut inputs = Vec::with_capacity(blocks.len());
    let mut kept = Vec::with_capacity(blocks.len());
    let mut x: Vec<Tensor> = input;
    for i in blocks {
        let block = model.block(i);
        // After the last block, the backward pass starts again from it.
        let next = if i + 1 < n { Some(i + 1) } else { Some(i) };
        let params = source.acquire(i, next)?;
        let err = || EngineError::tensor(block.name());
        let y = if checkpointing {
            let detached: Vec<Tensor> = params.iter().map(Tensor::detach).collect();
            kept.push(None);
            block.forward(&detached, &x, batch).map_err(err())?
        } else if let Some((y, saved)) = block.forward_saving(&detach_all(&params), &x, batch).map_err(err())? {
            kept.push(Some(Kept::Manual { saved, params: None }));
            y
        } else {
            let (vars, outputs) = run_tracked(model, i, &params, &x, batch)?;
            kept.push(Some(Kept::Graph { inputs: vars, outputs: outputs.clone(), params }));
            outputs
        };
        source.release(i);
        inputs.push(std::mem::take(&mut x));
        x = y.iter().map(Tensor::detach).collect();
    }
    Ok((SpanTape { first, inputs, kept }, x))
}

/// The output of block `last` as the scalar loss, or the error saying what it returned instead.
pub fn scalar_loss(model: &Model, last: usize, x: Vec<Tensor>) -> Result<Tensor, EngineError> {
    loss_and_metrics(model, last, x).map(|(loss, _)| loss)
}

/// The output of block `last` as the scalar loss and the statistics it declares after it
/// (`Block::metrics`, detached), or the error saying what it returned instead.
pub fn loss_and_metrics(model: &Model, last: usize, mut x: Vec<Tensor>) -> Result<(Tensor, Vec<Tensor>), EngineError> {
    let block = model.block(last);
    let extra = block.metrics().len();
    let metrics: Vec<Tensor> = if extra > 0 && x.len() == 1 + extra { x.split_off(1).iter().map(Tensor::detach).collect() } else { Vec::new() };
    Ok((one_scalar(block.name(), x, extra)?, metrics))
}

fn one_scalar(last: String, x: Vec<Tensor>, extra: usize) -> Result<Tensor, EngineError> {
    let loss = match x.as_slice() {
        [loss] if loss.rank() == 0 => loss.clone(),
        [loss] if loss.elem_count() == 1 => loss.reshape(()).map_err(EngineError::tensor(last))?,
        _ => {
            return Err(EngineError::Model(format!(
                "the last block, {last}, returned {} tensor(s) of shapes {:?}: it must return exactly one, the scalar loss{}",
                x.len(),
                x.iter().map(|t| t.dims().to_vec()).collect::<Vec<_>>(),
                if extra > 0 { format!(", then the {extra} metric(s) it declares") } else { String::new() }
            )))
        }
    };
    Ok(loss)
}

fn detach_all(params: &[Tensor]) -> Vec<Tensor> {
    params.iter().map(Tensor::detach).collect()
}

/// Run block `i` with its floating-point inputs as fresh variables, keeping the graph.
fn run_tracked(
    model: &Model,
    i: usize,
    params: &[Tensor],
    x: &[Tensor],
    batch: &Batch,
) -> Result<(Vec<Option<Var>>, Vec<Tensor>), EngineError> {
    let block = model.block(i);
    let err = || EngineError::tensor(block.name());
    let vars: Vec<Option<Var>> =
        x.iter().map(|t| if t.dtype().is_float() { Var::from_tensor(t).map(Some) } else { Ok(None) }).collect::<Result<_, _>>().map_err(err())?;
    let tracked: Vec<Tensor> = vars.iter().zip(x).map(|(v, t)| v.as_ref().map_or_else(|| t.clone(), |v| v.as_tensor().clone())).collect();
    let y = block.forward(params, &tracked, batch).map_err(err())?;
    Ok((vars, y))
}

/// Backpropagate from the loss, block by block in reverse. The loss is multiplied by `loss_scale`
/// (e.g. 1/accumulation steps). After each block, `on_block(i, grads)` receives the gradients of its
/// slots (`None` where a slot did not influence the loss), so the caller can reduce them while later
/// blocks compute.
pub fn backward(
    model: &Model,
    source: &mut dyn ParamSource,
    batch: &Batch,
    tape: Tape,
    loss_scale: f64,
    on_block: impl FnMut(usize, Vec<Option<Tensor>>) -> Result<(), EngineError>,
) -> Result<(), EngineError> {
    backward_span(model, source, batch, tape.span, None, loss_scale, on_block).map(drop)
}

/// The backward of the blocks `tape` ran, from `upstream` (the gradients of their last block's
/// outputs, from the stage after them) or, with `None`, from the loss their last block returned
/// (multiplied by `loss_scale`). Returns the gradients of the span's input (`None` for integer
/// tensors), for the stage before it.
pub fn backward_span(
    model: &Model,
    source: &mut dyn ParamSource,
    batch: &Batch,
    tape: SpanTape,
    upstream: Option<Vec<Option<Tensor>>>,
    loss_scale: f64,
    mut on_block: impl FnMut(usize, Vec<Option<Tensor>>) -> Result<(), EngineError>,
) -> Result<Vec<Option<Tensor>>, EngineError> {
    backward_blocks(model, source, batch, tape, upstream, loss_scale, false, |i, work| on_block(i, slot_grads(model, i, work)?))
}

/// The parameter-gradient work a split backward left, block by block in the order to run it.
pub type WeightTape = Vec<(usize, WeightGrads)>;

/// The input half of [`backward_span`] (a zero-bubble schedule's `I` action): the gradients of the
/// span's input now, and each block's parameter-gradient work for [`weight_span`]. Blocks without a
/// split backward ([`Block::backward_split`](super::block::Block::backward_split)'s default, and
/// autograd blocks) compute theirs here whole.
pub fn backward_span_input(
    model: &Model,
    source: &mut dyn ParamSource,
    batch: &Batch,
    tape: SpanTape,
    upstream: Option<Vec<Option<Tensor>>>,
    loss_scale: f64,
) -> Result<(Vec<Option<Tensor>>, WeightTape), EngineError> {
    let mut work = Vec::new();
    let grad_in = backward_blocks(model, source, batch, tape, upstream, loss_scale, true, |i, w| {
        work.push((i, w));
        Ok(())
    })?;
    Ok((grad_in, work))
}

/// The weight half (the `W` action): run each block's parameter-gradient work, handing its slot
/// gradients to `on_block` in the order [`backward_span`] would.
pub fn weight_span(model: &Model, work: WeightTape, mut on_block: impl FnMut(usize, Vec<Option<Tensor>>) -> Result<(), EngineError>) -> Result<(), EngineError> {
    for (i, w) in work {
        on_block(i, slot_grads(model, i, w)?)?;
    }
    Ok(())
}

/// Block `i`'s slot gradients from its work, one per slot.
fn slot_grads(model: &Model, i: usize, work: WeightGrads) -> Result<Vec<Option<Tensor>>, EngineError> {
    let name = model.block(i).name();
    let grads = work.compute().map_err(EngineError::tensor(name.clone()))?;
    let slots = model.slots(i).len();
    if grads.len() != slots {
        return Err(EngineError::Model(format!("block {name}: backward returned {} parameter gradients for {slots} parameter slots", grads.len())));
    }
    Ok(grads)
}

#[allow(clippy::too_many_arguments)]
fn backward_blocks(
    model: &Model,
    source: &mut dyn ParamSource,
    batch: &Batch,
    mut tape: SpanTape,
    upstream: Option<Vec<Option<Tensor>>>,
    loss_scale: f64,
    split: bool,
    mut on_block: impl FnMut(usize, WeightGrads) -> Result<(), EngineError>,
) -> Result<Vec<Option<Tensor>>, EngineError> {
    // The gradients of the current block's outputs; `None` while at the last block (the loss).
    let mut grad_out: Option<Vec<Option<Tensor>>> = upstream;
    let first = tape.first;
    for i in (first..first + tape.inputs.len()).rev() {
        let block = model.block(i);
        let err = || EngineError::tensor(block.name());
        let kept = match tape.kept[i - first].take() {
            Some(k) => k,
            None => {
                let params = source.acquire(i, i.checked_sub(1).filter(|&p| p >= first))?;
                let x = &tape.inputs[i - first];
                match block.forward_saving(&detach_all(&params), x, batch).map_err(err())? {
                    Some((_, saved)) => Kept::Manual { saved, params: Some(params) },
                    None => {
                        let (inputs, outputs) = run_tracked(model, i, &params, x, batch)?;
                        Kept::Graph { inputs, outputs, params }
                    }
                }
            }
        };
        let num_inputs = tape.inputs[i - first].len();
        let work = match kept {
            Kept::Manual { saved, params } => {
                let params = match params {
                    Some(p) => p,
                    None => source.acquire(i, i.checked_sub(1).filter(|&p| p >= first))?,
                };
                let upstream = match &grad_out {
                    None => Upstream::Loss(loss_scale),
                    Some(g) => Upstream::Grads(g),
                };
                let detached = detach_all(&params);
                let (work, grad_in) = if split {
                    block.backward_split(&detached, saved, upstream).map_err(err())?
                } else {
                    let (slots, grad_in) = block.backward(&detached, saved, upstream).map_err(err())?;
                    (WeightGrads::ready(slots), grad_in)
                };
                if grad_in.len() != num_inputs {
                    return Err(EngineError::Model(format!(
                        "block {}: backward returned {} input gradients for {} inputs",
                        block.name(),
                        grad_in.len(),
                        num_inputs
                    )));
                }
                grad_out = Some(grad_in.into_iter().map(|g| g.map(|t| t.detach())).collect());
                work
            }
            Kept::Graph { inputs, outputs, params } => {
                let target = match &grad_out {
                    None => Some(outputs[0].affine(loss_scale, 0.0).map_err(err())?),
                    Some(g) => seed(&outputs, g).map_err(err())?,
                };
                let Some(target) = target else {
                    // No output carries a gradient: nothing upstream depends on this block.
                    source.release(i);
                    on_block(i, WeightGrads::ready(vec![None; model.slots(i).len()]))?;
                    grad_out = Some(vec![None; num_inputs]);
                    continue;
                };
                let grads = target.backward().map_err(err())?;
                // A parameter or input autograd never reached is refused rather than trained as frozen
                // (as PyTorch's DDP refuses unused parameters): see `EngineError::NoGradient`.
                // The slots' gradients (stacked views after them, `Block::stacked_runs`, are frozen).
                let mut slot_grads = Vec::with_capacity(model.slots(i).len());
                for (p, &src) in params.iter().zip(model.slots(i)) {
                    if src.frozen {
                        slot_grads.push(None);
                        continue;
                    }
                    let Some(g) = grads.get(p) else {
                        let name = &model.spec(src).name;
                        let what = format!("parameter `{}.{name}`", model.block_names()[src.block]);
                        return Err(EngineError::NoGradient { block: block.name(), what });
                    };
                    slot_grads.push(Some(g.clone()));
                }
                let mut grad_in = Vec::with_capacity(inputs.len());
                for (k, v) in inputs.iter().enumerate() {
                    grad_in.push(match v {
                        // Detached: candle leaves a variable's gradient with the history of the ops
                        // that made it (here the next block's weights), and the block before would
                        // otherwise backpropagate through it into them — wrong where they are its
                        // own (tied), wasted work everywhere else.
                        Some(v) => match grads.get(v.as_tensor()) {
                            Some(g) => Some(g.detach()),
                            None => return Err(EngineError::NoGradient { block: block.name(), what: format!("its input {k} (from the block before)") }),
                        },
                        None => None,
                    });
                }
                grad_out = Some(grad_in);
                WeightGrads::ready(slot_grads)
            }
        };
        source.release(i);
        on_block(i, work)?;
    }
    Ok(grad_out.unwrap_or_default())
}

/// `Σ_k sum(y_k · g_k)` over the outputs that receive a gradient (`None` when none does): its
/// gradient with respect to anything is that of the block's outputs weighted by theirs.
fn seed(outputs: &[Tensor], grads: &[Option<Tensor>]) -> candle_core::Result<Option<Tensor>> {
    let mut total: Option<Tensor> = None;
    for (y, g) in outputs.iter().zip(grads) {
        let Some(g) = g else { continue };
        let term = (y * g)?.sum_all()?;
        total = Some(match total {
            None => term,
            Some(t) if t.dtype() == term.dtype() => (t + term)?,
            // Outputs of several dtypes (bf16 activations beside f32 statistics): added in f32.
            Some(t) => (t.to_dtype(candle_core::DType::F32)? + term.to_dtype(candle_core::DType::F32)?)?,
        });
    }
    Ok(total)
}
