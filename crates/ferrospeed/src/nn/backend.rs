//! The two `VarBuilder` backends behind [`super::NnBlock`]: one that records what the construction code
//! asks for (discovery), one that serves the engine's tensors by those names (every forward).

use crate::engine::{Init, ParamSpec};
use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::init::{FanInOut, NormalOrUniform};
use candle_nn::var_builder::SimpleBackend;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// What discovery saw.
#[derive(Debug, Default)]
pub struct Seen {
    pub params: Vec<ParamSpec>,
    /// The first name asked for twice.
    pub duplicate: Option<String>,
}

/// Records every parameter the code creates (shared: the `VarBuilder` owns one handle).
#[derive(Debug, Default, Clone)]
pub struct Recorder {
    seen: Arc<Mutex<Seen>>,
}

impl Recorder {
    pub fn take(&self) -> Seen {
        std::mem::take(&mut *self.seen.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// Our initialisation for candle-nn's hint on a parameter of `shape`.
pub fn init_of(hint: candle_nn::Init, shape: &Shape) -> Init {
    match hint {
        candle_nn::Init::Const(c) if c == 0.0 => Init::Zeros,
        candle_nn::Init::Const(c) if c == 1.0 => Init::Ones,
        candle_nn::Init::Const(c) => Init::Const(c),
        candle_nn::Init::Randn { mean, stdev } if mean == 0.0 => Init::Normal { std: stdev },
        candle_nn::Init::Randn { mean, stdev } => Init::NormalMean { mean, std: stdev },
        candle_nn::Init::Uniform { lo, up } => Init::Uniform { lo, hi: up },
        candle_nn::Init::Kaiming { dist, fan, non_linearity } => {
            let fan = match fan {
                FanInOut::FanIn => FanInOut::FanIn.for_shape(shape),
                FanInOut::FanOut => FanInOut::FanOut.for_shape(shape),
            };
            let std = non_linearity.gain() / (fan.max(1) as f64).sqrt();
            match dist {
                NormalOrUniform::Uniform => Init::Uniform { lo: -(3f64.sqrt()) * std, hi: 3f64.sqrt() * std },
                NormalOrUniform::Normal => Init::Normal { std },
            }
        }
    }
}

impl SimpleBackend for Recorder {
    fn get(&self, s: Shape, name: &str, h: candle_nn::Init, _dtype: DType, _dev: &Device) -> Result<Tensor> {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.params.iter().any(|p| p.name == name) {
            seen.duplicate.get_or_insert_with(|| name.to_string());
            candle_core::bail!("parameter `{name}` is created twice");
        }
        // Weights (matrices, kernels, embeddings) decay; biases and norm scales (vectors) do not.
        let decay = s.rank() >= 2;
        seen.params.push(ParamSpec::new(name, s.dims(), init_of(h, &s), decay));
        // A zero-strided view: the construction code can keep or reshape it, nothing is allocated.
        Tensor::zeros((), DType::F32, &Device::Cpu)?.broadcast_as(s)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> Result<Tensor> {
        candle_core::bail!("`{name}`: a block's VarBuilder creates parameters, so it needs their shapes (use vb.get(shape, name))")
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        false
    }
}

/// Serves the slot tensors by name.
pub struct Server {
    by_name: HashMap<String, Tensor>,
    block: String,
}

impl Server {
    pub fn empty() -> Self {
        Self { by_name: HashMap::new(), block: String::new() }
    }

    pub fn new(block: &str, index: &HashMap<String, usize>, shapes: &[Vec<usize>], params: &[Tensor]) -> Result<Self> {
        if params.len() != shapes.len() {
            candle_core::bail!("block {block}: {} parameter tensors for {} parameters", params.len(), shapes.len())
        }
        let by_name = index.iter().map(|(name, &i)| (name.clone(), params[i].clone())).collect();
        Ok(Self { by_name, block: block.to_string() })
    }
}

impl SimpleBackend for Server {
    fn get(&self, s: Shape, name: &str, _h: candle_nn::Init, dtype: DType, _dev: &Device) -> Result<Tensor> {
        let t = self.get_unchecked(name, dtype, _dev)?;
        if t.shape() != &s {
            candle_core::bail!("block {}: parameter `{name}` has shape {:?} but the code asks for {:?}", self.block, t.dims(), s.dims())
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, _dev: &Device) -> Result<Tensor> {
        let Some(t) = self.by_name.get(name) else {
            candle_core::bail!(
                "block {}: its code asks for `{name}`, which it did not create when the model was built (the construction must not depend on data)",
                self.block
            )
        };
        if t.dtype() == dtype {
            Ok(t.clone())
        } else {
            t.to_dtype(dtype)
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }
}
