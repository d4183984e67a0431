//! LoRA on a model written with candle-nn: `lora_linear` layers in an `NnBlock` that trains only its
//! adapters (`train_only("*lora_*")`). The adapted model starts as its base (B = 0: the loss of plain
//! `candle_nn::linear` layers on the same weights, bit for bit); trained through ferrospeed with SGD it
//! gives plain candle's losses with only the adapters in the optimizer, bit for bit; the base's
//! weights come out unchanged, and only the adapters get gradients; a pattern matching nothing is a
//! typed error naming the parameters.

mod common;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Linear, Optimizer as _, VarBuilder, VarMap};
use ferrospeed::engine::{Batch, Engine, EngineConfig, EngineError, Model};
use ferrospeed::nn::{lora_linear, Forward, LoraLinear, NnBlock};
use ferrospeed::optim::{LrSchedule, Sgd};
use ferrospeed::CommConfig;
use std::sync::Arc;

struct Adapted {
    fc1: LoraLinear,
    fc2: LoraLinear,
}

impl Adapted {
    fn new(vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self { fc1: lora_linear(6, 12, 2, 4.0, vb.pp("fc1"))?, fc2: lora_linear(12, 3, 2, 4.0, vb.pp("fc2"))? })
    }
    fn loss(&self, batch: &Batch) -> candle_core::Result<Tensor> {
        let logits = self.fc2.forward(&self.fc1.forward(batch.get("x")?)?.tanh()?)?;
        candle_nn::loss::cross_entropy(&logits, batch.get("y")?)
    }
}

impl Forward for Adapted {
    fn forward(&self, _inputs: &[Tensor], batch: &Batch) -> candle_core::Result<Vec<Tensor>> {
        Ok(vec![self.loss(batch)?])
    }
}

fn batch() -> Batch {
    common::mlp_batch()
}

fn model() -> Model {
    Model::new(vec![Box::new(NnBlock::new("mlp", Adapted::new).unwrap().train_only("*lora_*").unwrap())]).unwrap()
}

#[test]
fn lora_linear_trains_only_its_adapters_as_plain_candle_does() {
    let b = batch();
    let mut cfg = EngineConfig::fp32(false, 0.0, Sgd { momentum: 0.0, weight_decay: 0.0, nesterov: false }, 5);
    cfg.schedule = LrSchedule::constant(0.5);
    let out = common::run_world(1, &CommConfig::default(), |comm| {
        let mut engine = Engine::new(model(), Arc::new(comm), cfg.clone()).unwrap();
        let m = engine.model();
        let names: Vec<String> = m.slots(0).iter().map(|&s| m.spec(s).name.clone()).collect();
        assert!(m.own_params(0).iter().all(|p| p.name.contains("lora_")) && m.frozen_params(0).len() == 4, "{names:?}");
        let before = engine.slot_tensors().unwrap().remove(0);
        let losses: Vec<f32> = (0..4)
            .map(|_| {
                engine.forward_backward(&b).unwrap();
                engine.step().unwrap().unwrap().loss as f32
            })
            .collect();
        let grads = engine.memory().grads;
        (names, before, losses, engine.slot_tensors().unwrap().remove(0), grads)
    })
    .remove(0);
    let (names, before, losses, after, grads) = out;
    let value = |set: &[Tensor], n: &str| set[names.iter().position(|x| x == n).unwrap()].clone();
    // The base did not move; B did.
    for n in ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"] {
        let (x, y) = (value(&before, n).flatten_all().unwrap().to_vec1::<f32>().unwrap(), value(&after, n).flatten_all().unwrap().to_vec1::<f32>().unwrap());
        assert_eq!(x, y, "{n} is frozen");
    }
    assert!(value(&after, "fc2.lora_B.weight").abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 0.0);
    // Gradients for the adapters alone (fp32, padded to the shard alignment of 64).
    let adapters = 2 * 6 + 12 * 2 + 2 * 12 + 3 * 2;
    assert!(grads >= 4 * adapters && grads < 4 * (adapters + 64), "{grads} bytes of gradients");

    // Plain candle: the same initial weights, only the adapters in the optimizer.
    let map = VarMap::new();
    let plain = Adapted::new(VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu)).unwrap();
    for (n, t) in names.iter().zip(&before) {
        map.data().lock().unwrap()[n].set(t).unwrap();
    }
    let data = map.data().lock().unwrap();
    let trainable: Vec<_> = names.iter().filter(|n| n.contains("lora_")).map(|n| data[n].clone()).collect();
    drop(data);
    // B = 0: the loss of plain linear layers on the base weights.
    let base = |n: &str| value(&before, n);
    let (l1, l2) = (Linear::new(base("fc1.weight"), Some(base("fc1.bias"))), Linear::new(base("fc2.weight"), Some(base("fc2.bias"))));
    let unadapted = candle_nn::loss::cross_entropy(&l2.forward(&l1.forward(b.get("x").unwrap()).unwrap().tanh().unwrap()).unwrap(), b.get("y").unwrap()).unwrap();
    assert_eq!(unadapted.to_scalar::<f32>().unwrap().to_bits(), losses[0].to_bits(), "B = 0: the base's loss");
    let mut opt = candle_nn::SGD::new(trainable, 0.5).unwrap();
    let want: Vec<f32> = (0..4)
        .map(|_| {
            let l = plain.loss(&b).unwrap();
            opt.backward_step(&l).unwrap();
            l.to_scalar::<f32>().unwrap()
        })
        .collect();
    assert_eq!(losses.iter().map(|l| l.to_bits()).collect::<Vec<_>>(), want.iter().map(|l| l.to_bits()).collect::<Vec<_>>(), "ferrospeed {losses:?} vs candle {want:?}");
}

#[test]
fn a_pattern_that_matches_nothing_names_the_parameters() {
    let e = NnBlock::new("mlp", Adapted::new).unwrap().train_only("*lora_C*").unwrap_err();
    assert!(matches!(&e, EngineError::Model(m) if m.contains("`*lora_C*` matches none") && m.contains("fc1.lora_A.weight")), "{e}");
}
