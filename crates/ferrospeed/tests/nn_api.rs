//! The library API on models written with candle-nn layers, in one process:
//! - trained through ferrospeed (world 1) it gives the losses of the same model trained by plain candle
//!   (an MLP; a CNN with conv2d and RMSNorm; LayerNorm)
//!   with candle-nn's optimizers: bitwise with SGD (the same arithmetic), within 1e-5 with AdamW;
//! - several tensors flow between blocks (hidden state plus a mask), gradients through the float ones,
//!   equal to the same model as one block;
//! - parameter groups: a learning-rate scale of 0 freezes a parameter, weight decay applies per group;
//! - a parameter autograd never reaches (candle-nn's fused LayerNorm) is refused, naming the fix;
//! - misuse is a typed error naming the problem: a parameter created twice, a batch without a tensor a
//!   block asks for, a tie to a later block, a dataset smaller than one global batch.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{linear, Linear, Module, Optimizer as _, VarBuilder, VarMap};
use ferrospeed::data::{DataError, Sampler, Sampling};
use ferrospeed::engine::{Batch, Block, Engine, EngineConfig, EngineError, Model, ParamRef};
use ferrospeed::nn::{Forward, NnBlock, Tie};
use ferrospeed::optim::{AdamW, LrSchedule, Optimizer, ParamGroup, ParamGroups, Sgd};
use ferrospeed::rng::Rng;
use ferrospeed::CommConfig;
use std::sync::Arc;

struct Mlp {
    fc1: Linear,
    fc2: Linear,
}

impl Mlp {
    fn new(vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self { fc1: linear(6, 12, vb.pp("fc1"))?, fc2: linear(12, 3, vb.pp("fc2"))? })
    }

    fn loss(&self, batch: &Batch) -> candle_core::Result<Tensor> {
        let logits = self.fc2.forward(&self.fc1.forward(batch.get("x")?)?.tanh()?)?;
        candle_nn::loss::cross_entropy(&logits, batch.get("y")?)
    }
}

impl Forward for Mlp {
    fn forward(&self, _inputs: &[Tensor], batch: &Batch) -> candle_core::Result<Vec<Tensor>> {
        Ok(vec![self.loss(batch)?])
    }
}

fn batch() -> Batch {
    common::mlp_batch()
}

fn engine_cfg(optimizer: Arc<dyn Optimizer>, lr: f64, groups: ParamGroups) -> EngineConfig {
    let mut cfg = EngineConfig::fp32(false, 0.0, AdamW { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }, 5);
    cfg.optimizer = optimizer;
    cfg.param_groups = groups;
    cfg.schedule = LrSchedule::constant(lr);
    cfg
}

/// One engine on one rank (a world of one thread).
fn with_engine<R: Send>(model: impl Fn() -> Model + Sync, cfg: EngineConfig, f: impl Fn(&mut Engine) -> R + Sync) -> R {
    let mut out = common::run_world(1, &CommConfig::default(), |comm| {
        let mut engine = Engine::new(model(), Arc::new(comm), cfg.clone()).unwrap();
        f(&mut engine)
    });
    out.remove(0)
}

fn mlp_model() -> Model {
    Model::new(vec![Box::new(NnBlock::new("mlp", Mlp::new).unwrap())]).unwrap()
}

/// What `steps` steps through ferrospeed (one rank) did.
struct Trained {
    /// The initial weights, by parameter name (of the single block).
    initial: Vec<(String, Tensor)>,
    losses: Vec<f32>,
    /// The weights after training, in slot order.
    after: Vec<Tensor>,
}

fn train_ferrospeed(model: impl Fn() -> Model + Sync, cfg: EngineConfig, b: &Batch, steps: usize) -> Trained {
    with_engine(model, cfg, |engine| {
        let names: Vec<String> = engine.model().own_params(0).iter().map(|p| p.name.clone()).collect();
        let initial = names.into_iter().zip(engine.slot_tensors().unwrap().remove(0)).collect();
        let losses = (0..steps)
            .map(|_| {
                engine.forward_backward(b).unwrap();
                engine.step().unwrap().expect("accumulation 1: every call steps").loss as f32
            })
            .collect();
        Trained { initial, losses, after: engine.slot_tensors().unwrap().remove(0) }
    })
}

/// The same model in plain candle (VarMap, a candle-nn optimizer made by `optimizer` from the
/// variables) from the same initial weights: the loss of each of `steps` steps.
fn train_candle<M, O: candle_nn::Optimizer>(
    initial: &[(String, Tensor)],
    build: impl FnOnce(VarBuilder) -> candle_core::Result<M>,
    loss: impl Fn(&M) -> candle_core::Result<Tensor>,
    optimizer: impl FnOnce(Vec<Var>) -> O,
    steps: usize,
) -> Vec<f32> {
    let map = VarMap::new();
    let model = build(VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu)).unwrap();
    for (name, value) in initial {
        map.data().lock().unwrap()[name].set(value).unwrap();
    }
    let mut opt = optimizer(map.all_vars());
    (0..steps)
        .map(|_| {
            let l = loss(&model).unwrap();
            opt.backward_step(&l).unwrap();
            l.to_scalar::<f32>().unwrap()
        })
        .collect()
}

fn bits32(v: &[f32]) -> Vec<u32> {
    v.iter().map(|l| l.to_bits()).collect()
}

#[test]
fn sgd_through_ferrospeed_equals_plain_candle_bit_for_bit() {
    let b = batch();
    let ours = train_ferrospeed(mlp_model, engine_cfg(Arc::new(Sgd::default()), 0.1, ParamGroups::default()), &b, 10);
    let theirs = train_candle(&ours.initial, Mlp::new, |m| m.loss(&b), |vars| candle_nn::SGD::new(vars, 0.1).unwrap(), 10);
    let ours = ours.losses;
    assert!(ours[9] < ours[0], "the loss falls: {ours:?}");
    assert_eq!(bits32(&ours), bits32(&theirs), "{ours:?} vs {theirs:?}");
}

/// A small CNN: candle-nn's conv2d, RMSNorm over channels (ferrospeed's: candle-nn's has no backward on
/// contiguous input), a candle-nn linear head.
struct Cnn {
    conv: candle_nn::Conv2d,
    norm: ferrospeed::nn::RmsNorm,
    head: Linear,
}

impl Cnn {
    fn new(vb: VarBuilder) -> candle_core::Result<Self> {
        let conv_cfg = candle_nn::Conv2dConfig { padding: 1, ..Default::default() };
        Ok(Self { conv: candle_nn::conv2d(2, 4, 3, conv_cfg, vb.pp("conv"))?, norm: ferrospeed::nn::rms_norm(4, 1e-5, vb.pp("norm"))?, head: linear(4 * 5 * 5, 3, vb.pp("head"))? })
    }

    fn loss(&self, batch: &Batch) -> candle_core::Result<Tensor> {
        let h = self.conv.forward(batch.get("image")?)?.relu()?; // [b, 4, 5, 5]
        let h = self.norm.forward(&h.permute((0, 2, 3, 1))?)?.flatten_from(1)?; // channels last, normed
        candle_nn::loss::cross_entropy(&self.head.forward(&h)?, batch.get("y")?)
    }
}

impl Forward for Cnn {
    fn forward(&self, _inputs: &[Tensor], batch: &Batch) -> candle_core::Result<Vec<Tensor>> {
        Ok(vec![self.loss(batch)?])
    }
}

#[test]
fn conv2d_and_rms_norm_blocks_train_as_in_plain_candle_bit_for_bit() {
    let mut rng = Rng::new(9);
    let image: Vec<f32> = (0..8 * 2 * 5 * 5).map(|_| rng.normal() as f32).collect();
    let b = Batch::new().with("image", Tensor::from_vec(image, (8, 2, 5, 5), &Device::Cpu).unwrap()).with("y", batch().get("y").unwrap().clone());
    let model = || Model::new(vec![Box::new(NnBlock::new("cnn", Cnn::new).unwrap())]).unwrap();
    let ours = train_ferrospeed(model, engine_cfg(Arc::new(Sgd::default()), 0.05, ParamGroups::default()), &b, 5);
    let specs: Vec<(String, Vec<usize>)> = ours.initial.iter().map(|(n, t)| (n.clone(), t.dims().to_vec())).collect();
    assert_eq!(
        specs,
        [("conv.weight", vec![4, 2, 3, 3]), ("conv.bias", vec![4]), ("norm.weight", vec![4]), ("head.weight", vec![3, 100]), ("head.bias", vec![3])]
            .map(|(n, s)| (n.to_string(), s))
    );
    let theirs = train_candle(&ours.initial, Cnn::new, |m| m.loss(&b), |vars| candle_nn::SGD::new(vars, 0.05).unwrap(), 5);
    let ours = ours.losses;
    assert!(ours[4] < ours[0], "{ours:?}");
    assert_eq!(bits32(&ours), bits32(&theirs), "{ours:?} vs {theirs:?}");
}

/// Linear → LayerNorm → linear, with candle-nn's LayerNorm (`fused`) or ferrospeed's.
struct Normed {
    fc: Linear,
    ln: Box<dyn Module + Send + Sync>,
    out: Linear,
}

impl Normed {
    fn new(vb: VarBuilder, fused: bool) -> candle_core::Result<Self> {
        let ln: Box<dyn Module + Send + Sync> = if fused {
            Box::new(candle_nn::layer_norm(12, 1e-5, vb.pp("ln"))?)
        } else {
            Box::new(ferrospeed::nn::layer_norm(12, 1e-5, vb.pp("ln"))?)
        };
        Ok(Self { fc: linear(6, 12, vb.pp("fc"))?, ln, out: linear(12, 3, vb.pp("out"))? })
    }

    fn loss(&self, batch: &Batch) -> candle_core::Result<Tensor> {
        let h = self.ln.forward(&self.fc.forward(batch.get("x")?)?)?;
        candle_nn::loss::cross_entropy(&self.out.forward(&h)?, batch.get("y")?)
    }
}

impl Forward for Normed {
    fn forward(&self, _inputs: &[Tensor], batch: &Batch) -> candle_core::Result<Vec<Tensor>> {
        Ok(vec![self.loss(batch)?])
    }
}

#[test]
fn a_parameter_autograd_never_reaches_is_refused_and_ferrospeeds_layer_norm_trains() {
    // candle-nn's LayerNorm on contiguous input has no backward: its weights and fc would never train.
    let fused = || Model::new(vec![Box::new(NnBlock::new("m", |vb| Normed::new(vb, true)).unwrap())]).unwrap();
    let err = with_engine(fused, engine_cfg(Arc::new(Sgd::default()), 0.1, ParamGroups::default()), |engine| engine.forward_backward(&batch()).unwrap_err());
    assert!(matches!(&err, EngineError::NoGradient { block, what } if block == "m" && what.contains("m.ln.weight")), "{err}");
    assert!(err.to_string().contains("ferrospeed::nn::layer_norm"), "the message names the fix: {err}");
    // ferrospeed's LayerNorm: every parameter trains, as in plain candle with the same layer (bitwise, SGD).
    let ours = || Model::new(vec![Box::new(NnBlock::new("m", |vb| Normed::new(vb, false)).unwrap())]).unwrap();
    let b = batch();
    let trained = train_ferrospeed(ours, engine_cfg(Arc::new(Sgd::default()), 0.1, ParamGroups::default()), &b, 5);
    let names: Vec<&str> = trained.initial.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["ln.weight", "ln.bias", "fc.weight", "fc.bias", "out.weight", "out.bias"], "in the order the code asks");
    let ln_w = trained.after[0].to_vec1::<f32>().unwrap();
    assert!(ln_w.iter().any(|w| *w != 1.0), "the LayerNorm weight trained: {ln_w:?}");
    let theirs = train_candle(&trained.initial, |vb| Normed::new(vb, false), |m| m.loss(&b), |vars| candle_nn::SGD::new(vars, 0.1).unwrap(), 5);
    assert_eq!(bits32(&trained.losses), bits32(&theirs), "{:?} vs {theirs:?}", trained.losses);
}

#[test]
fn adamw_through_ferrospeed_equals_plain_candle_within_1e_5() {
    // candle-nn's AdamW decays every parameter: one group of all of them does the same here.
    let groups = ParamGroups { groups: vec![ParamGroup::new("*").weight_decay(0.05)] };
    let adamw = AdamW { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.05 };
    let b = batch();
    let ours = train_ferrospeed(mlp_model, engine_cfg(Arc::new(adamw), 0.01, groups), &b, 10);
    let params = candle_nn::ParamsAdamW { lr: 0.01, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.05 };
    let theirs = train_candle(&ours.initial, Mlp::new, |m| m.loss(&b), |vars| candle_nn::AdamW::new(vars, params).unwrap(), 10);
    let ours = ours.losses;
    assert!(ours[9] < ours[0], "the loss falls: {ours:?}");
    for (step, (a, b)) in ours.iter().zip(&theirs).enumerate() {
        assert!(((a - b) / b).abs() < 1e-5, "step {}: ferrospeed {a} vs candle {b}", step + 1);
    }
}

#[test]
fn a_learning_rate_scale_of_zero_freezes_a_parameter_group() {
    let groups = ParamGroups { groups: vec![ParamGroup::new("mlp.fc1.*").lr_scale(0.0)] };
    let (before, after) = with_engine(mlp_model, engine_cfg(Arc::new(Sgd::default()), 0.1, groups), |engine| {
        let before = engine.slot_tensors().unwrap().remove(0);
        for _ in 0..3 {
            engine.forward_backward(&batch()).unwrap();
            engine.step().unwrap();
        }
        (before, engine.slot_tensors().unwrap().remove(0))
    });
    let same = |i: usize| before[i].flatten_all().unwrap().to_vec1::<f32>().unwrap() == after[i].flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(same(0) && same(1), "fc1 is frozen");
    assert!(!same(2) && !same(3), "fc2 trains");
}

/// A hidden state and a mask (u8) flow from block `a` to block `b`; the mask zeroes some rows.
struct Masked {
    fc: Linear,
}

impl Masked {
    fn hidden_and_mask(&self, batch: &Batch) -> candle_core::Result<(Tensor, Tensor)> {
        Ok((self.fc.forward(batch.get("x")?)?.tanh()?, batch.get("mask")?.clone()))
    }
}

struct First(Masked);
struct Second(Mlp2);
struct Mlp2 {
    out: Linear,
}

impl Mlp2 {
    fn loss(&self, h: &Tensor, mask: &Tensor, batch: &Batch) -> candle_core::Result<Tensor> {
        let h = h.broadcast_mul(&mask.to_dtype(h.dtype())?.unsqueeze(1)?)?;
        candle_nn::loss::cross_entropy(&self.out.forward(&h)?, batch.get("y")?)
    }
}

impl Forward for First {
    fn forward(&self, _inputs: &[Tensor], batch: &Batch) -> candle_core::Result<Vec<Tensor>> {
        let (h, m) = self.0.hidden_and_mask(batch)?;
        Ok(vec![h, m])
    }
}

impl Forward for Second {
    fn forward(&self, inputs: &[Tensor], batch: &Batch) -> candle_core::Result<Vec<Tensor>> {
        Ok(vec![self.0.loss(&inputs[0], &inputs[1], batch)?])
    }
}

struct Whole(Masked, Mlp2);

impl Forward for Whole {
    fn forward(&self, _inputs: &[Tensor], batch: &Batch) -> candle_core::Result<Vec<Tensor>> {
        let (h, m) = self.0.hidden_and_mask(batch)?;
        Ok(vec![self.1.loss(&h, &m, batch)?])
    }
}

#[test]
fn several_tensors_flow_between_blocks_with_the_gradients_of_one_block() {
    fn masked(vb: VarBuilder) -> candle_core::Result<Masked> {
        Ok(Masked { fc: linear(6, 12, vb.pp("fc"))? })
    }
    fn out(vb: VarBuilder) -> candle_core::Result<Mlp2> {
        Ok(Mlp2 { out: linear(12, 3, vb.pp("out"))? })
    }
    let two = move || {
        let a = NnBlock::new("a", move |vb| Ok(First(masked(vb)?))).unwrap();
        let b = NnBlock::new("b", move |vb| Ok(Second(out(vb)?))).unwrap();
        Model::new(vec![Box::new(a), Box::new(b)]).unwrap()
    };
    let mask = Tensor::from_vec(vec![1u8, 1, 0, 1, 0, 1, 1, 1], 8, &Device::Cpu).unwrap();
    let b = batch().with("mask", mask);
    let lr = 0.5;
    let flat = |ts: Vec<Vec<Tensor>>| -> Vec<Vec<f32>> { ts.into_iter().flatten().map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap()).collect() };
    // One SGD step of the two-block model: the gradient is (before − after) / lr.
    let (before, after) = with_engine(two, engine_cfg(Arc::new(Sgd::default()), lr, ParamGroups::default()), |engine| {
        let before = flat(engine.slot_tensors().unwrap());
        engine.forward_backward(&b).unwrap();
        engine.step().unwrap();
        (before, flat(engine.slot_tensors().unwrap()))
    });
    assert_eq!(before.len(), 4);
    // The same computation as one block, differentiated by candle directly from the same weights.
    let whole = NnBlock::new("w", move |vb| Ok(Whole(masked(vb.pp("a"))?, out(vb.pp("b"))?))).unwrap();
    let names: Vec<&str> = whole.own_params().iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["a.fc.weight", "a.fc.bias", "b.out.weight", "b.out.bias"]);
    let shapes: [&[usize]; 4] = [&[12, 6], &[12], &[3, 12], &[3]];
    let vars: Vec<Var> = before.iter().zip(shapes).map(|(v, s)| Var::from_vec(v.clone(), s, &Device::Cpu).unwrap()).collect();
    let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let grads = whole.forward(&tensors, &[], &b).unwrap().remove(0).backward().unwrap();
    for (i, v) in vars.iter().enumerate() {
        let want = grads.get(v.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let got: Vec<f32> = before[i].iter().zip(&after[i]).map(|(s, e)| (s - e) / lr as f32).collect();
        assert!(want.iter().any(|w| *w != 0.0), "parameter {i} has a gradient");
        for (a, w) in got.iter().zip(&want) {
            assert!((a - w).abs() <= 1e-5 * (1.0 + w.abs()), "parameter {i}: two blocks {a} vs one block {w}");
        }
    }
}

#[test]
fn a_parameter_created_twice_is_a_typed_error() {
    let err = NnBlock::new("twice", |vb: VarBuilder| -> candle_core::Result<Mlp> { Ok(Mlp { fc1: linear(6, 12, vb.pp("fc"))?, fc2: linear(12, 3, vb.pp("fc"))? }) }).unwrap_err();
    assert!(matches!(&err, EngineError::DuplicateParam { block, name } if block == "twice" && name == "fc.weight"), "{err}");
    assert!(err.to_string().contains("vb.pp"), "the message names the fix: {err}");
}

#[test]
fn a_batch_without_a_tensor_a_block_asks_for_is_a_typed_error() {
    let err = with_engine(mlp_model, engine_cfg(Arc::new(Sgd::default()), 0.1, ParamGroups::default()), |engine| {
        let b = Batch::new().with("x", batch().get("x").unwrap().clone());
        engine.forward_backward(&b).unwrap_err().to_string()
    });
    assert!(err.contains("no tensor `y`") && err.contains("it holds: x"), "{err}");
    let typed = with_engine(mlp_model, engine_cfg(Arc::new(Sgd::default()), 0.1, ParamGroups::default()), |engine| {
        matches!(engine.forward_backward(&Batch::new()), Err(EngineError::MissingInput { ref name, .. }) if name == "x")
    });
    assert!(typed, "EngineError::MissingInput names the tensor");
}

#[test]
fn a_tie_to_a_later_block_is_a_typed_error() {
    let tie = Tie { name: "fc1.weight".into(), owner: 1, owner_name: "fc1.weight".into() };
    let first = NnBlock::with_ties("first", vec![tie], Mlp::new).unwrap();
    assert!(first.params().iter().any(|p| matches!(p, ParamRef::Tied { block: 1, .. })));
    let second = NnBlock::new("second", Mlp::new).unwrap();
    let err = Model::new(vec![Box::new(first), Box::new(second)]).err().expect("a tie to a later block must be refused");
    assert!(matches!(&err, EngineError::BadTie { block, owner: 1, .. } if block == "first"), "{err}");
    assert!(err.to_string().contains("earlier block"), "{err}");
}

#[test]
fn a_dataset_smaller_than_one_global_batch_is_a_typed_error() {
    let err = Sampler::new(1, Sampling::Epochs { shuffle: true }, 4, 2, 3, 0, 20).unwrap_err();
    assert!(matches!(err, DataError::TooSmall { len: 20, global_batch: 24 }), "{err}");
}
