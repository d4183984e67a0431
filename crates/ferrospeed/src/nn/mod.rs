//! Blocks written with candle-nn layers: a block's layers are built from a `VarBuilder` that the
//! engine backs with its own parameters, so `candle_nn::linear`, `embedding`, `layer_norm`,
//! `rms_norm`, `conv2d` … work unchanged, and the parameter list (names, shapes, initialisation,
//! weight decay) is discovered by running that same construction code once — never declared twice.
//!
//! How: [`NnBlock::new`] runs the user's `build(vb)` with a recording backend, which notes every
//! `vb.get(shape, name)` (and answers with zeros that take no memory). In the forward, `build(vb)` runs
//! again with a backend that serves the engine's tensors (variables, gathered shards) by those names;
//! building candle-nn layers only stores tensors, so this costs nothing next to the compute.
//!
//! Norms: use [`layer_norm`] and [`rms_norm`] from here, not candle-nn's, whose modules take a fused
//! path without a backward on contiguous input (see `norm.rs`).

#![warn(missing_docs)]

mod backend;
mod lora;
mod norm;

pub use lora::{lora_linear, lora_linear_no_bias, LoraLinear};
pub use norm::{layer_norm, rms_norm, LayerNorm, RmsNorm};

use crate::engine::{Batch, Block, EngineError, ParamRef, ParamSpec};
use backend::{Recorder, Server};
use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use std::collections::HashMap;
use std::sync::Arc;

/// The forward of a block built with candle-nn layers: the previous block's outputs (empty for the
/// first block) and the batch in; outputs out (the last block returns the scalar loss).
pub trait Forward: Send + Sync {
    /// Compute the block's outputs.
    fn forward(&self, inputs: &[Tensor], batch: &Batch) -> Result<Vec<Tensor>>;
}

type Build = dyn Fn(VarBuilder) -> Result<Box<dyn Forward>> + Send + Sync;

/// A parameter this block uses from an earlier block (tied weights).
#[derive(Debug, Clone, PartialEq)]
pub struct Tie {
    /// The name the block's code asks its `VarBuilder` for, e.g. `lm_head.weight`.
    pub name: String,
    /// Index of the owning block in the model.
    pub owner: usize,
    /// The parameter's name inside the owner, e.g. `wte.weight`.
    pub owner_name: String,
}

/// A [`Block`] whose layers come from candle-nn through a `VarBuilder`. Cloning is cheap (the
/// construction code is shared): keep a clone to rebuild the layers on trained weights (evaluation).
#[derive(Clone)]
pub struct NnBlock {
    name: String,
    build: Arc<Build>,
    slots: Vec<ParamRef>,
    /// Slot index of every name the code asks for.
    index: HashMap<String, usize>,
    shapes: Vec<Vec<usize>>,
    flops: f64,
}

impl std::fmt::Debug for NnBlock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NnBlock").field("name", &self.name).field("slots", &self.slots).finish()
    }
}

impl NnBlock {
    /// A block named `name` whose layers `build` creates from a `VarBuilder`. `build` runs once here to
    /// discover the parameters; asking for one name twice is an error ([`EngineError::DuplicateParam`]).
    pub fn new<M, F>(name: &str, build: F) -> std::result::Result<Self, EngineError>
    where
        M: Forward + 'static,
        F: Fn(VarBuilder) -> Result<M> + Send + Sync + 'static,
    {
        Self::with_ties(name, Vec::new(), build)
    }

    /// As [`NnBlock::new`], with parameters taken from earlier blocks instead of owned: each `Tie`
    /// names what the code asks for and where it lives.
    pub fn with_ties<M, F>(name: &str, ties: Vec<Tie>, build: F) -> std::result::Result<Self, EngineError>
    where
        M: Forward + 'static,
        F: Fn(VarBuilder) -> Result<M> + Send + Sync + 'static,
    {
        let build: Arc<Build> = Arc::new(move |vb| build(vb).map(|m| Box::new(m) as Box<dyn Forward>));
        let recorder = Recorder::default();
        let vb = VarBuilder::from_backend(Box::new(recorder.clone()), DType::F32, Device::Cpu);
        let built = build(vb);
        let seen = recorder.take();
        if let Some(dup) = seen.duplicate {
            return Err(EngineError::DuplicateParam { block: name.to_string(), name: dup });
        }
        built.map_err(|e| EngineError::Model(format!("building block {name} from its VarBuilder: {e}")))?;
        let mut slots = Vec::with_capacity(seen.params.len());
        let mut index = HashMap::new();
        let mut shapes = Vec::new();
        for spec in seen.params {
            index.insert(spec.name.clone(), slots.len());
            shapes.push(spec.shape.clone());
            match ties.iter().find(|t| t.name == spec.name) {
                Some(t) => slots.push(ParamRef::Tied { block: t.owner, name: t.owner_name.clone() }),
                None => slots.push(ParamRef::Own(spec)),
            }
        }
        if let Some(t) = ties.iter().find(|t| !index.contains_key(&t.name)) {
            return Err(EngineError::Model(format!(
                "block {name} ties `{}` to block {}'s `{}`, but its code never asks its VarBuilder for `{}`",
                t.name, t.owner, t.owner_name, t.name
            )));
        }
        Ok(Self { name: name.to_string(), build, slots, index, shapes, flops: 0.0 })
    }

    /// This block with every parameter it owns whose name does not match `pattern` (a glob, e.g.
    /// `"*lora_*"`) frozen: the engine keeps those as a base that never trains (no gradient, no
    /// optimizer state). A pattern that matches none of them is an error listing their names.
    pub fn train_only(self, pattern: &str) -> std::result::Result<Self, EngineError> {
        self.freeze_where(pattern, |m| !m)
    }

    /// This block with every parameter it owns whose name matches `pattern` frozen (see
    /// [`NnBlock::train_only`]).
    pub fn freeze(self, pattern: &str) -> std::result::Result<Self, EngineError> {
        self.freeze_where(pattern, |m| m)
    }

    fn freeze_where(mut self, pattern: &str, frozen: impl Fn(bool) -> bool) -> std::result::Result<Self, EngineError> {
        let owned = || self.slots.iter().filter_map(|s| match s {
            ParamRef::Own(p) | ParamRef::Frozen(p) => Some(p.name.clone()),
            ParamRef::Tied { .. } => None,
        });
        if !owned().any(|n| crate::optim::glob(pattern, &n)) {
            let names: Vec<String> = owned().collect();
            return Err(EngineError::Model(format!("block {}: `{pattern}` matches none of its parameters ({})", self.name, names.join(", "))));
        }
        for slot in &mut self.slots {
            if let ParamRef::Own(p) = slot {
                if frozen(crate::optim::glob(pattern, &p.name)) {
                    *slot = ParamRef::Frozen(p.clone());
                }
            }
        }
        Ok(self)
    }

    /// This block with its forward FLOPs per token (for MFU), a multiply-add counting 2.
    pub fn with_flops_per_token(mut self, flops: f64) -> Self {
        self.flops = flops;
        self
    }

    /// The parameters this block owns, as discovered.
    pub fn own_params(&self) -> Vec<&ParamSpec> {
        self.slots.iter().filter_map(|s| if let ParamRef::Own(p) = s { Some(p) } else { None }).collect()
    }

    /// The layers built on `params` (the slot tensors, in slot order).
    pub fn layers(&self, params: &[Tensor]) -> Result<Box<dyn Forward>> {
        (self.build)(self.var_builder(params)?)
    }

    /// A `VarBuilder` serving `params` (the block's slot tensors, e.g. from `Engine::slot_tensors`)
    /// under the names the construction code asks for: build the user's own layer type on trained
    /// weights with it (evaluation, generation).
    pub fn var_builder(&self, params: &[Tensor]) -> Result<VarBuilder<'static>> {
        let Some(first) = params.first() else {
            return Ok(VarBuilder::from_backend(Box::new(Server::empty()), DType::F32, Device::Cpu));
        };
        let server = Server::new(&self.name, &self.index, &self.shapes, params)?;
        Ok(VarBuilder::from_backend(Box::new(server), first.dtype(), first.device().clone()))
    }
}

impl Block for NnBlock {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn params(&self) -> Vec<ParamRef> {
        self.slots.clone()
    }

    fn forward(&self, params: &[Tensor], inputs: &[Tensor], batch: &Batch) -> Result<Vec<Tensor>> {
        self.layers(params)?.forward(inputs, batch)
    }

    fn forward_flops_per_token(&self) -> f64 {
        self.flops
    }
}
