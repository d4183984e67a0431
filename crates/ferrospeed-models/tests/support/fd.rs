//! What the finite-difference tests share (`gradients.rs`, `packing.rs`): seeded f64 values for every
//! parameter a model's blocks own, the slot tensors of every block built from them, and the loss and
//! its parameter gradients along both paths a block offers — the forward that keeps what its backward
//! needs with the hand-written backward (what the engine runs), and the forward composed of candle ops
//! differentiated by autograd (what a caller differentiating `forward` gets).

use candle_core::{DType, Device, Tensor, Var};
use ferrospeed::engine::{blockwise, Batch, Init, Model, ParamSpec, SlotSource};
use ferrospeed::rng::Rng;

/// Values of every parameter, per block, per own parameter (the trainable ones, then the frozen
/// ones), flattened.
pub type Owned = Vec<Vec<Vec<f64>>>;

/// Block `i`'s parameters in [`Owned`] order: trainable, then frozen.
pub fn specs(model: &Model, i: usize) -> Vec<&ParamSpec> {
    model.own_params(i).iter().chain(model.frozen_params(i)).collect()
}

/// A slot's index in its owner's [`Owned`] entry.
pub fn at(model: &Model, src: SlotSource) -> usize {
    if src.frozen {
        model.own_params(src.block).len() + src.index
    } else {
        src.index
    }
}

/// Random f64 values for every parameter each block owns (not the GPT init: larger, so every path
/// matters): norms' weights about 1, the rest about 0, both with a spread of 0.3.
pub fn random_params(model: &Model) -> Owned {
    let mut rng = Rng::new(42);
    (0..model.num_blocks())
        .map(|i| {
            specs(model, i)
                .into_iter()
                .map(|s| {
                    let base = if s.init == Init::Ones { 1.0 } else { 0.0 };
                    (0..s.numel()).map(|_| base + 0.3 * rng.normal()).collect()
                })
                .collect()
        })
        .collect()
}

/// The owned values as variables (autograd tracks what is computed from them).
pub fn vars(model: &Model, owned: &Owned) -> Vec<Vec<Var>> {
    (0..model.num_blocks())
        .map(|i| specs(model, i).into_iter().zip(&owned[i]).map(|(s, v)| Var::from_slice(v, s.shape.as_slice(), &Device::Cpu).unwrap()).collect())
        .collect()
}

/// Slot tensors of every block from the owned values (the variables' tensors when `vars` is given).
pub fn slots(model: &Model, owned: &Owned, vars: Option<&[Vec<Var>]>) -> Vec<Vec<Tensor>> {
    (0..model.num_blocks())
        .map(|i| {
            model
                .slots(i)
                .iter()
                .map(|&src| match vars {
                    // A frozen parameter is a plain tensor, as the engine hands it over.
                    Some(v) if !src.frozen => v[src.block][at(model, src)].as_tensor().clone(),
                    _ => Tensor::from_slice(&owned[src.block][at(model, src)], model.spec(src).shape.as_slice(), &Device::Cpu).unwrap(),
                })
                .collect()
        })
        .collect()
}

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

/// The loss of the block-wise forward (the blocks' own forward, no autograd).
pub fn loss(model: &Model, owned: &Owned, batch: &Batch) -> f64 {
    let params = slots(model, owned, None);
    scalar(&blockwise::forward(model, &mut &params[..], batch, true).unwrap().loss)
}

/// Analytic gradients of every owned parameter through the block-wise backward (hand-written).
pub fn analytic(model: &Model, owned: &Owned, batch: &Batch, checkpointing: bool) -> Owned {
    let vars = vars(model, owned);
    let params = slots(model, owned, Some(&vars));
    let mut grads: Owned = owned.iter().map(|b| b.iter().map(|p| vec![0.0; p.len()]).collect()).collect();
    let tape = blockwise::forward(model, &mut &params[..], batch, checkpointing).unwrap();
    blockwise::backward(model, &mut &params[..], batch, tape, 1.0, |i, slot_grads| {
        for (&src, g) in model.slots(i).iter().zip(slot_grads) {
            if let Some(g) = g {
                assert!(!src.frozen, "block {}: a gradient computed for a frozen parameter", model.block(i).name());
                let g: Vec<f64> = g.flatten_all().unwrap().to_vec1().unwrap();
                grads[src.block][at(model, src)].iter_mut().zip(g).for_each(|(a, b)| *a += b);
            }
        }
        Ok(())
    })
    .unwrap();
    grads
}

/// The loss of the composed forward (every block's `forward` on variables, which takes the composed
/// path), and the variables it was computed from.
fn composed(model: &Model, owned: &Owned, batch: &Batch) -> (Tensor, Vec<Vec<Var>>) {
    let vars = vars(model, owned);
    let params = slots(model, owned, Some(&vars));
    let mut x: Vec<Tensor> = Vec::new();
    for (i, p) in params.iter().enumerate() {
        x = model.block(i).forward(p, &x, batch).unwrap();
    }
    (x.remove(0), vars)
}

/// The loss of the composed forward.
pub fn composed_loss(model: &Model, owned: &Owned, batch: &Batch) -> f64 {
    scalar(&composed(model, owned, batch).0)
}

/// Gradients of every owned parameter by autograd through the composed forward.
pub fn autograd(model: &Model, owned: &Owned, batch: &Batch) -> Owned {
    let (loss, vars) = composed(model, owned, batch);
    let store = loss.backward().unwrap();
    vars.iter()
        .map(|b| b.iter().map(|v| store.get(v.as_tensor()).map_or_else(|| vec![0.0; v.elem_count()], |g| g.flatten_all().unwrap().to_vec1().unwrap())).collect())
        .collect()
}

/// The central difference of `f` at `x` along element `e`, with step `eps`.
pub fn central(f: impl Fn(&[f64]) -> f64, x: &[f64], e: usize, eps: f64) -> f64 {
    let (mut plus, mut minus) = (x.to_vec(), x.to_vec());
    plus[e] += eps;
    minus[e] -= eps;
    (f(&plus) - f(&minus)) / (2.0 * eps)
}

/// A block input's or output's worth of seeded normal values `[b, t, d]` (f64).
pub fn randn_f64(rng: &mut Rng, shape: (usize, usize, usize)) -> Tensor {
    let n = shape.0 * shape.1 * shape.2;
    Tensor::from_vec((0..n).map(|_| rng.normal()).collect::<Vec<f64>>(), shape, &Device::Cpu).unwrap()
}

/// What an input-gradient test differentiates: a layer's output `y` weighted by `r`, `sum(y · r)`, or
/// the head's output (the loss) itself when there is no `r`.
pub fn weighted_sum(y: &Tensor, r: Option<&Tensor>) -> f64 {
    let y = match r {
        Some(r) => (y * r).unwrap(),
        None => y.clone(),
    };
    y.sum_all().unwrap().to_scalar::<f64>().unwrap()
}
