//! `Block::stacked_runs`: a block whose frozen parameters lie next to each other gets, after its slot
//! tensors, one view per declared run holding exactly their values stacked (at every ZeRO stage, world
//! 1 and 2, and with an NF4 base, dequantised); a run with a trainable parameter gets none, nor does
//! `Engine::slot_tensors`; the step's losses are those of the same block reading its slots only.

mod common;

use candle_core::{Device, Tensor};
use ferrospeed::config::ZeroStage;
use ferrospeed::engine::{Batch, Block, Engine, EngineConfig, Init, Model, ParamRef, ParamSpec};
use ferrospeed::optim::Sgd;
use ferrospeed::shard::Strategy;
use ferrospeed::{CommConfig, Communicator};
use std::ops::Range;
use std::sync::{Arc, Mutex};

/// What one forward received: how many tensors, and whether the views after the slots equal the
/// slots' values stacked, bit for bit.
type Seen = Arc<Mutex<Vec<(usize, bool)>>>;

/// loss = mean((x ⊙ s) · [a; b]ᵀ)² with `a` `[2, 64]` and `b` `[3, 64]` (frozen, or `b` trainable)
/// and `s` `[64]` trainable; `use_views` reads the stacked view where one came.
struct Probe {
    b_frozen: bool,
    use_views: bool,
    seen: Seen,
}

impl Block for Probe {
    fn name(&self) -> String {
        "probe".into()
    }

    fn params(&self) -> Vec<ParamRef> {
        let w = Init::Normal { std: 0.5 };
        let a = ParamRef::Frozen(ParamSpec::new("a", &[2, 64], w, true).as_linear());
        let b = ParamSpec::new("b", &[3, 64], w, true).as_linear();
        let b = if self.b_frozen { ParamRef::Frozen(b) } else { ParamRef::Own(b) };
        vec![a, b, ParamRef::Own(ParamSpec::new("s", &[64], Init::Ones, false))]
    }

    fn stacked_runs(&self) -> Vec<Range<usize>> {
        vec![0..2]
    }

    fn forward(&self, p: &[Tensor], _inputs: &[Tensor], batch: &Batch) -> candle_core::Result<Vec<Tensor>> {
        let stacked = Tensor::cat(&[&p[0], &p[1]], 0)?;
        let same = match p.get(3) {
            Some(v) => v.dims() == stacked.dims() && v.flatten_all()?.to_vec1::<f32>()? == stacked.flatten_all()?.to_vec1::<f32>()?,
            None => false,
        };
        self.seen.lock().unwrap().push((p.len(), same));
        let w = if self.use_views && p.len() > 3 { p[3].clone() } else { stacked };
        let x = batch.get("x")?.broadcast_mul(&p[2])?;
        Ok(vec![x.matmul(&w.t()?)?.sqr()?.mean_all()?])
    }
}

#[derive(Clone, Copy)]
struct Run {
    world: usize,
    stage: ZeroStage,
    nf4: bool,
    b_frozen: bool,
    use_views: bool,
}

/// Three steps of `run`: rank 0's losses, what its forwards saw, and how many slot tensors
/// `Engine::slot_tensors` gave.
fn train(run: Run) -> (Vec<f64>, Vec<(usize, bool)>, usize) {
    let mut rng = ferrospeed::rng::Rng::new(5);
    let x: Vec<f32> = (0..4 * 64).map(|_| rng.normal() as f32).collect();
    let seen: Seen = Arc::default();
    let out = common::run_world(run.world, &CommConfig::default(), |comm| {
        let seen = if comm.rank() == 0 { seen.clone() } else { Arc::default() };
        let model = Model::new(vec![Box::new(Probe { b_frozen: run.b_frozen, use_views: run.use_views, seen })]).unwrap();
        let mut cfg = EngineConfig::fp32(false, 0.0, Sgd { momentum: 0.0, weight_decay: 0.0, nesterov: false }, 9);
        cfg.strategy = Strategy::new(run.stage);
        cfg.frozen_nf4 = run.nf4;
        let mut engine = Engine::new(model, Arc::new(comm), cfg).unwrap();
        let batch = Batch::new().with("x", Tensor::from_vec(x.clone(), (4, 64), &Device::Cpu).unwrap());
        let losses: Vec<f64> = (0..3)
            .map(|_| {
                engine.forward_backward(&batch).unwrap();
                engine.step().unwrap().unwrap().loss
            })
            .collect();
        (losses, engine.slot_tensors().unwrap()[0].len())
    });
    let (losses, slots) = out.into_iter().next().unwrap();
    let seen = seen.lock().unwrap().clone();
    (losses, seen, slots)
}

#[test]
fn adjacent_frozen_parameters_come_as_one_view_and_compute_the_same() {
    let base = Run { world: 1, stage: ZeroStage::Zero, nf4: false, b_frozen: true, use_views: false };
    let (reference, _, _) = train(base);
    for stage in [ZeroStage::Zero, ZeroStage::One, ZeroStage::Two, ZeroStage::Three] {
        for world in [1, 2] {
            let (losses, seen, slots) = train(Run { world, stage, nf4: false, b_frozen: true, use_views: true });
            assert!(!seen.is_empty() && seen.iter().all(|&(n, same)| n == 4 && same), "{stage:?} world {world}: {seen:?}");
            assert_eq!(slots, 3, "slot_tensors gives the slots only");
            let close = losses.iter().zip(&reference).all(|(a, b)| if world == 1 { a.to_bits() == b.to_bits() } else { (a - b).abs() <= 1e-6 * b.abs() });
            assert!(close, "{stage:?} world {world}: {losses:?} vs {reference:?}");
        }
    }
    // An NF4 base: the view holds the dequantised weights, as the slots do.
    let (plain, _, _) = train(Run { nf4: true, use_views: false, ..base });
    let (viewed, seen, _) = train(Run { nf4: true, use_views: true, ..base });
    assert!(!seen.is_empty() && seen.iter().all(|&(n, same)| n == 4 && same), "NF4: {seen:?}");
    assert_eq!(plain.iter().map(|l| l.to_bits()).collect::<Vec<_>>(), viewed.iter().map(|l| l.to_bits()).collect::<Vec<_>>());
    assert_ne!(plain, reference, "NF4 changes the base's values");
}

#[test]
fn a_run_with_a_trainable_parameter_gets_no_view() {
    let (_, seen, slots) = train(Run { world: 1, stage: ZeroStage::Zero, nf4: false, b_frozen: false, use_views: true });
    assert!(!seen.is_empty() && seen.iter().all(|&(n, _)| n == 3), "{seen:?}");
    assert_eq!(slots, 3);
}
