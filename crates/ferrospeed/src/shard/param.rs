//! What the engine knows of a parameter before it has values: name, shape, how it starts, and
//! whether weight decay applies. Blocks declare these (or a `VarBuilder` discovers them, `nn.rs`);
//! `FlatParam` lays them out; the engine draws their initial values.

/// How a parameter starts. Values are drawn from the run's seed and the parameter's name, never
/// from a global RNG, so they are the same at any world size, stage and order of initialisation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// All zeros.
    Zeros,
    /// All ones.
    Ones,
    /// Every element equal to this value.
    Const(f64),
    /// Normal with mean 0 and standard deviation `std`.
    Normal {
        /// Standard deviation.
        std: f64,
    },
    /// Normal with mean `mean` and standard deviation `std`.
    NormalMean {
        /// Mean.
        mean: f64,
        /// Standard deviation.
        std: f64,
    },
    /// Uniform in `[lo, hi)`.
    Uniform {
        /// Lower bound (inclusive).
        lo: f64,
        /// Upper bound (exclusive).
        hi: f64,
    },
}

/// A parameter a block owns.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamSpec {
    /// Name inside the block, e.g. `attn.c_attn.weight`.
    pub name: String,
    /// Shape, outermost dimension first.
    pub shape: Vec<usize>,
    /// How its values start.
    pub init: Init,
    /// Whether weight decay applies (by convention not to biases and norms).
    pub decay: bool,
    /// A linear layer's weight `[out, in]`: what a frozen base stores in 4 bits with
    /// `lora.base = "nf4"` (QLoRA quantises the linear layers; embeddings, norms and the head stay).
    pub linear: bool,
}

impl ParamSpec {
    /// A parameter named `name` (unique within its block).
    pub fn new(name: &str, shape: &[usize], init: Init, decay: bool) -> Self {
        Self { name: name.to_string(), shape: shape.to_vec(), init, decay, linear: false }
    }

    /// The same parameter, marked a linear layer's weight (see [`ParamSpec::linear`]).
    pub fn as_linear(mut self) -> Self {
        self.linear = true;
        self
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A parameter slot of a block: one it owns, one it owns frozen, or one owned by an earlier block
/// (tied weights, such as GPT-2's head sharing the token embedding).
#[derive(Debug, Clone, PartialEq)]
pub enum ParamRef {
    /// A parameter of this block.
    Own(ParamSpec),
    /// A parameter of this block that never trains (a LoRA base weight): it gets no gradient and no
    /// optimizer state, and lives in the compute dtype in a flat buffer of its own (never sharing
    /// one with trainable parameters), sharded at stage 3 like the trainable ones. Its values come
    /// from the seed like an `Own` parameter of the same name, or from an import.
    Frozen(ParamSpec),
    /// Parameter `name` of block `block` (an earlier block, by index).
    Tied {
        /// Index of the owning block in the model.
        block: usize,
        /// The parameter's name inside the owning block.
        name: String,
    },
}
