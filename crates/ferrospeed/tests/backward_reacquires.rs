//! A block with a hand-written backward keeps no parameters between its forward and its backward: the
//! backward acquires them again, so a gathered (ZeRO-3) or dequantised (NF4) block's parameters are
//! not alive all through the step. Seen from the block: the tensors its backward gets are new ones
//! there, the same ones where parameters are resident; the losses do not change.

mod common;

use candle_core::{Device, Tensor, TensorId};
use ferrospeed::config::ZeroStage;
use ferrospeed::engine::{Batch, Block, Engine, EngineConfig, Init, Model, ParamGrads, ParamRef, ParamSpec, Saved, Upstream};
use ferrospeed::optim::Sgd;
use ferrospeed::shard::Strategy;
use ferrospeed::{CommConfig, Communicator};
use std::sync::{Arc, Mutex};

/// The ids of the tensors a forward got and then its backward.
type Seen = Arc<Mutex<Vec<(Vec<TensorId>, Vec<TensorId>)>>>;

/// Two of these make the model: the first computes h = (x ⊙ s)·aᵀ with `a` `[64, 64]` from the
/// batch's x, the last loss = mean(((h ⊙ s)·aᵀ)²) with `a` `[2, 64]`; `a` frozen, `s` `[64]`
/// trainable; backward by hand. The first records the ids of the tensors it got.
struct Lin {
    last: bool,
    seen: Seen,
}

struct Kept {
    x: Tensor,
    y: Tensor,
    ids: Vec<TensorId>,
}

impl Lin {
    fn input<'a>(&self, inputs: &'a [Tensor], batch: &'a Batch) -> candle_core::Result<&'a Tensor> {
        if self.last {
            inputs.first().ok_or_else(|| candle_core::Error::Msg("no input".into()))
        } else {
            batch.get("x")
        }
    }
}

impl Block for Lin {
    fn name(&self) -> String {
        if self.last { "last" } else { "first" }.into()
    }

    fn params(&self) -> Vec<ParamRef> {
        let out = if self.last { 2 } else { 64 };
        vec![
            ParamRef::Frozen(ParamSpec::new("a", &[out, 64], Init::Normal { std: 0.2 }, true).as_linear()),
            ParamRef::Own(ParamSpec::new("s", &[64], Init::Ones, false)),
        ]
    }

    fn forward(&self, p: &[Tensor], inputs: &[Tensor], batch: &Batch) -> candle_core::Result<Vec<Tensor>> {
        Ok(self.forward_saving(p, inputs, batch)?.map(|(y, _)| y).unwrap_or_default())
    }

    fn forward_saving(&self, p: &[Tensor], inputs: &[Tensor], batch: &Batch) -> candle_core::Result<Option<(Vec<Tensor>, Saved)>> {
        let x = self.input(inputs, batch)?.clone();
        let y = x.broadcast_mul(&p[1])?.matmul(&p[0].t()?)?;
        let out = if self.last { y.sqr()?.mean_all()? } else { y.clone() };
        Ok(Some((vec![out], Box::new(Kept { x, y, ids: p.iter().map(Tensor::id).collect() }))))
    }

    fn backward(&self, p: &[Tensor], saved: Saved, upstream: Upstream<'_>) -> candle_core::Result<(Vec<Option<Tensor>>, Vec<Option<Tensor>>)> {
        let k = saved.downcast::<Kept>().map_err(|_| candle_core::Error::Msg("foreign saved state".into()))?;
        if !self.last {
            self.seen.lock().unwrap().push((k.ids.clone(), p.iter().map(Tensor::id).collect()));
        }
        let dy = match upstream {
            Upstream::Loss(scale) => k.y.affine(2.0 * scale / k.y.elem_count() as f64, 0.0)?,
            Upstream::Grads(_) => upstream.grad(0)?.clone(),
        };
        let last = self.last;
        ParamGrads::whole(2, |grads| {
            grads.freeze(0..1);
            let dxs = dy.matmul(&p[0])?;
            grads.set(1, (&dxs * &k.x)?.sum(0)?);
            Ok(if last { vec![Some(dxs.broadcast_mul(&p[1])?)] } else { Vec::new() })
        })
    }
}

/// Three steps: rank 0's losses, and for each backward of the first block whether it got a new tensor
/// for the frozen `a` (the trainable `s` comes detached, a new tensor each time, wherever it lives).
fn train(world: usize, stage: ZeroStage, nf4: bool) -> (Vec<f64>, Vec<bool>) {
    let mut rng = ferrospeed::rng::Rng::new(5);
    let x: Vec<f32> = (0..4 * 64).map(|_| rng.normal() as f32).collect();
    let seen: Seen = Arc::default();
    let out = common::run_world(world, &CommConfig::default(), |comm| {
        let seen = if comm.rank() == 0 { seen.clone() } else { Arc::default() };
        let model = Model::new(vec![Box::new(Lin { last: false, seen }), Box::new(Lin { last: true, seen: Arc::default() })]).unwrap();
        let mut cfg = EngineConfig::fp32(false, 0.0, Sgd { momentum: 0.0, weight_decay: 0.0, nesterov: false }, 9);
        cfg.strategy = Strategy::new(stage);
        cfg.frozen_nf4 = nf4;
        let mut engine = Engine::new(model, Arc::new(comm), cfg).unwrap();
        let batch = Batch::new().with("x", Tensor::from_vec(x.clone(), (4, 64), &Device::Cpu).unwrap());
        (0..3)
            .map(|_| {
                engine.forward_backward(&batch).unwrap();
                engine.step().unwrap().unwrap().loss
            })
            .collect::<Vec<f64>>()
    });
    let seen = seen.lock().unwrap().iter().map(|(f, b)| f[0] != b[0]).collect();
    (out.into_iter().next().unwrap(), seen)
}

#[test]
fn the_backward_gets_its_parameters_anew_where_they_are_gathered_or_dequantised() {
    let (reference, resident) = train(1, ZeroStage::Zero, false);
    assert!(resident.len() == 3 && resident.iter().all(|&new| !new), "resident parameters are the same tensors: {resident:?}");
    for world in [1, 2] {
        let (losses, seen) = train(world, ZeroStage::Three, false);
        assert!(seen.len() == 3 && seen.iter().all(|&new| new), "stage 3 world {world} gathers again for the backward: {seen:?}");
        let close = losses.iter().zip(&reference).all(|(a, b)| if world == 1 { a.to_bits() == b.to_bits() } else { (a - b).abs() <= 1e-6 * b.abs() });
        assert!(close, "stage 3 world {world}: {losses:?} vs {reference:?}");
    }
    let (nf4_0, seen) = train(1, ZeroStage::Zero, true);
    assert!(seen.len() == 3 && seen.iter().all(|&new| new), "an NF4 weight is dequantised again for the backward: {seen:?}");
    let (nf4_2, _) = train(1, ZeroStage::Two, true);
    assert_eq!(nf4_0.iter().map(|l| l.to_bits()).collect::<Vec<_>>(), nf4_2.iter().map(|l| l.to_bits()).collect::<Vec<_>>());
}
