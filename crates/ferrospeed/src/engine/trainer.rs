//! The engine: owns each block's FlatParam buffers (fp32 master weights, gradients, AdamW moments)
//! and runs one optimizer step: micro-batches, block-wise backward with gradient accumulation,
//! reduction of each block's gradient on the last micro-batch, global-norm clipping, AdamW.
//!
//! This is ZeRO stage 0 (data parallel): every rank holds everything and all-reduces gradients.

use super::block::{Batch, Init, ParamSpec};
use super::blockwise;
use super::error::EngineError;
use super::model::Model;
use crate::comm::{CommExt, Communicator, ReduceOp};
use crate::optim::{clip_coefficient, sum_squares, AdamW};
use crate::rng::Rng;
use crate::shard::FlatParam;
use candle_core::{Device, Tensor, Var};
use std::sync::Arc;

/// Settings of the engine that do not change during a run.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Recompute each block in the backward pass instead of keeping its graph.
    pub checkpointing: bool,
    /// Maximum global gradient norm; 0 disables clipping.
    pub grad_clip: f64,
    pub optimizer: AdamW,
    /// Seed of the parameter initialisation.
    pub seed: u64,
}

/// What one optimizer step measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// Mean loss over the global batch.
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
}

/// One block's buffers. All have the FlatParam's padded length.
struct BlockState {
    flat: FlatParam,
    /// fp32 master weights.
    params: Vec<f32>,
    grads: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
    /// The parameters as candle variables, rebuilt from `params` after each update.
    vars: Vec<Var>,
}

/// The training engine of one rank.
pub struct Engine {
    model: Model,
    comm: Arc<dyn Communicator>,
    blocks: Vec<BlockState>,
    cfg: EngineConfig,
    step: u64,
}

impl Engine {
    /// Initialise every parameter from the seed (the same on every rank, whatever the world size).
    pub fn new(model: Model, comm: Arc<dyn Communicator>, cfg: EngineConfig) -> Result<Self, EngineError> {
        let world = comm.world_size();
        let mut blocks = Vec::with_capacity(model.num_blocks());
        for i in 0..model.num_blocks() {
            let flat = FlatParam::new(model.own_params(i), world);
            let mut params = vec![0f32; flat.padded_numel()];
            for (j, spec) in flat.specs().iter().enumerate() {
                let name = format!("{}.{}", model.block(i).name(), spec.name);
                init_param(&mut params[flat.range(j)], spec, &mut Rng::derive(cfg.seed, &name));
            }
            let n = flat.padded_numel();
            let vars = make_vars(&flat, &params).map_err(EngineError::tensor(model.block(i).name()))?;
            blocks.push(BlockState { flat, params, grads: vec![0.0; n], m: vec![0.0; n], v: vec![0.0; n], vars });
        }
        Ok(Self { model, comm, blocks, cfg, step: 0 })
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Optimizer steps taken so far.
    pub fn steps_done(&self) -> u64 {
        self.step
    }

    /// The slot tensors of every block (what `Block::forward` receives), current weights.
    pub fn slot_tensors(&self) -> Vec<Vec<Tensor>> {
        (0..self.model.num_blocks())
            .map(|i| self.model.slots(i).iter().map(|s| self.blocks[s.block].vars[s.index].as_tensor().clone()).collect())
            .collect()
    }

    /// The fp32 master weights of block `i` (padded flat buffer) and its layout.
    pub fn flat_params(&self, i: usize) -> (&FlatParam, &[f32]) {
        (&self.blocks[i].flat, &self.blocks[i].params)
    }

    /// One optimizer step over this rank's `micro_batches` (its share of the global batch) at `lr`.
    pub fn train_step(&mut self, micro_batches: &[Batch], lr: f64) -> Result<StepStats, EngineError> {
        let accum = micro_batches.len();
        if accum == 0 {
            return Err(EngineError::Unsupported("a step needs at least one micro-batch".into()));
        }
        for b in &mut self.blocks {
            b.grads.fill(0.0);
        }
        let params = self.slot_tensors();
        let mut loss_sum = 0f64;
        for (k, batch) in micro_batches.iter().enumerate() {
            let last = k + 1 == accum;
            let tape = blockwise::forward(&self.model, &params, batch, self.cfg.checkpointing)?;
            let loss = tape.loss.to_dtype(candle_core::DType::F64).and_then(|l| l.to_scalar::<f64>());
            loss_sum += loss.map_err(EngineError::tensor("loss"))?;
            let (model, blocks, comm) = (&self.model, &mut self.blocks, &self.comm);
            blockwise::backward(model, &params, batch, tape, 1.0 / accum as f64, |i, grads| {
                for (slot, grad) in model.slots(i).iter().zip(grads) {
                    if let Some(grad) = grad {
                        let state = &mut blocks[slot.block];
                        let range = state.flat.range(slot.index);
                        add_into(&mut state.grads[range], &grad).map_err(EngineError::tensor(model.block(i).name()))?;
                    }
                }
                // Every later block that uses this block's parameters (tied weights) has run: its
                // gradient is complete, so reduce it now, while the earlier blocks compute.
                if last {
                    comm.all_reduce_slice(&mut blocks[i].grads, ReduceOp::Avg)?;
                }
                Ok(())
            })?;
        }
        let mut loss = [(loss_sum / accum as f64) as f32];
        self.comm.all_reduce_slice(&mut loss, ReduceOp::Avg)?;

        let grad_norm = self.grad_norm();
        let coef = clip_coefficient(grad_norm, self.cfg.grad_clip) as f32;
        self.step += 1;
        let opt = self.cfg.optimizer;
        for (i, b) in self.blocks.iter_mut().enumerate() {
            if coef != 1.0 {
                b.grads.iter_mut().for_each(|g| *g *= coef);
            }
            for (j, spec) in b.flat.specs().iter().enumerate() {
                let r = b.flat.range(j);
                opt.update(&mut b.params[r.clone()], &b.grads[r.clone()], &mut b.m[r.clone()], &mut b.v[r.clone()], lr, self.step, spec.decay);
            }
            b.vars = make_vars(&b.flat, &b.params).map_err(EngineError::tensor(self.model.block(i).name()))?;
        }
        Ok(StepStats { loss: f64::from(loss[0]), grad_norm })
    }

    /// Global gradient norm, summed per shard of the world's layout and then in rank order (see
    /// `optim::clip`), so that sharded stages reproduce it bit for bit.
    fn grad_norm(&self) -> f64 {
        let world = self.comm.world_size();
        let mut total = 0f32;
        for rank in 0..world {
            let partial: f64 = self.blocks.iter().map(|b| sum_squares(&b.grads[b.flat.layout().range(rank)])).sum();
            if rank == 0 {
                total = partial as f32;
            } else {
                total += partial as f32;
            }
        }
        f64::from(total).sqrt()
    }
}

fn init_param(out: &mut [f32], spec: &ParamSpec, rng: &mut Rng) {
    match spec.init {
        Init::Zeros => out.fill(0.0),
        Init::Ones => out.fill(1.0),
        Init::Normal { std } => out.iter_mut().for_each(|x| *x = (rng.normal() * std) as f32),
    }
}

fn make_vars(flat: &FlatParam, params: &[f32]) -> candle_core::Result<Vec<Var>> {
    (0..flat.specs().len())
        .map(|j| Var::from_slice(&params[flat.range(j)], flat.specs()[j].shape.as_slice(), &Device::Cpu))
        .collect()
}

fn add_into(dst: &mut [f32], grad: &Tensor) -> candle_core::Result<()> {
    let g = grad.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?;
    if g.len() != dst.len() {
        return Err(candle_core::Error::Msg(format!("gradient of {} elements for a parameter of {}", g.len(), dst.len())));
    }
    dst.iter_mut().zip(&g).for_each(|(d, s)| *d += s);
    Ok(())
}
