//! `Engine::eval_loss` through the library API (ranks as threads): the loss of a batch equals the
//! loss a training step reports for it, bit for bit; evaluating changes nothing (a run that evaluates
//! between steps trains the bits of one that does not); a ZeRO-3 world of 2 and a 2-stage pipeline
//! evaluate the same batch to the same loss as one rank.

mod common;

use candle_core::{Device, Tensor};
use ferrospeed::config::ZeroStage;
use ferrospeed::engine::{Batch, Engine, EngineConfig, Model};
use ferrospeed::nn::{Forward, NnBlock};
use ferrospeed::optim::{AdamW, LrSchedule};
use ferrospeed::parallel::{Schedule, ScheduleKind};
use ferrospeed::rng::Rng;
use ferrospeed::shard::Strategy;
use ferrospeed::{CommConfig, Communicator};
use std::sync::Arc;

const D: usize = 6;

/// `tanh(x · w)`.
struct Mix {
    w: Tensor,
}

impl Forward for Mix {
    fn forward(&self, inputs: &[Tensor], batch: &Batch) -> candle_core::Result<Vec<Tensor>> {
        let x = match inputs.first() {
            Some(x) => x.clone(),
            None => batch.get("x")?.clone(),
        };
        Ok(vec![x.matmul(&self.w)?.tanh()?])
    }
}

/// The squared error of `x · u` against the batch's targets.
struct Loss {
    u: Tensor,
}

impl Forward for Loss {
    fn forward(&self, inputs: &[Tensor], batch: &Batch) -> candle_core::Result<Vec<Tensor>> {
        Ok(vec![(inputs[0].matmul(&self.u)? - batch.get("y")?)?.sqr()?.mean_all()?])
    }
}

fn model() -> Model {
    let small = candle_nn::Init::Randn { mean: 0.0, stdev: 0.4 };
    let mix = |name: &str| NnBlock::new(name, move |vb| Ok(Mix { w: vb.get_with_hints((D, D), "w", small)? })).unwrap();
    let loss = NnBlock::new("loss", move |vb| Ok(Loss { u: vb.get_with_hints((D, 1), "u", small)? })).unwrap();
    Model::new(vec![Box::new(mix("a")), Box::new(mix("b")), Box::new(loss)]).unwrap()
}

/// Micro-batch `k` of batch `step` (3 samples).
fn micro(step: usize, k: usize) -> Batch {
    let mut rng = Rng::new((step * 16 + k) as u64);
    let x: Vec<f32> = (0..3 * D).map(|_| rng.normal() as f32).collect();
    let y: Vec<f32> = (0..3).map(|_| rng.normal() as f32).collect();
    Batch::new().with("x", Tensor::from_vec(x, (3, D), &Device::Cpu).unwrap()).with("y", Tensor::from_vec(y, (3, 1), &Device::Cpu).unwrap())
}

/// Rank `rank` of `ranks`' share of 4 micro-batches.
fn share(step: usize, rank: usize, ranks: usize) -> Vec<Batch> {
    (0..4).filter(|k| k % ranks == rank).map(|k| micro(step, k)).collect()
}

fn config(accumulation: usize, stage: ZeroStage) -> EngineConfig {
    let mut cfg = EngineConfig::fp32(false, 1.0, AdamW { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1 }, 7);
    cfg.accumulation = accumulation;
    cfg.schedule = LrSchedule::constant(5e-2);
    cfg.strategy = Strategy::new(stage);
    cfg
}

/// Three steps; with `eval`, the loss of held-out batch 100 before each: (eval, train loss, grad norm) bits.
fn train(engine: &mut Engine, rank: usize, ranks: usize, eval: bool) -> Vec<(u64, u64, u64)> {
    (0..3)
        .map(|s| {
            let e = if eval { engine.eval_loss(&share(100, rank, ranks)).unwrap().to_bits() } else { 0 };
            let st = engine.train_step(&share(s, rank, ranks)).unwrap();
            (e, st.loss.to_bits(), st.grad_norm.to_bits())
        })
        .collect()
}

#[test]
fn eval_loss_is_the_steps_loss_and_changes_nothing() {
    let run = |eval| common::run_world(1, &CommConfig::default(), |comm| train(&mut Engine::new(model(), Arc::new(comm), config(4, ZeroStage::Zero)).unwrap(), 0, 1, eval)).remove(0);
    let (with, without) = (run(true), run(false));
    // The same training bits with evaluations between the steps.
    let strip = |r: &[(u64, u64, u64)]| r.iter().map(|x| (x.1, x.2)).collect::<Vec<_>>();
    assert_eq!(strip(&with), strip(&without), "evaluating changed the training");
    // The eval loss of a batch is the loss a step reports for it, before the step's update.
    let reported = common::run_world(1, &CommConfig::default(), |comm| {
        let mut engine = Engine::new(model(), Arc::new(comm), config(4, ZeroStage::Zero)).unwrap();
        let e = engine.eval_loss(&share(0, 0, 1)).unwrap();
        (e, engine.train_step(&share(0, 0, 1)).unwrap().loss)
    })
    .remove(0);
    assert_eq!(reported.0.to_bits(), reported.1.to_bits(), "eval {} vs step {}", reported.0, reported.1);
}

#[test]
fn a_zero_3_world_and_a_pipeline_evaluate_one_ranks_losses() {
    let one = common::run_world(1, &CommConfig::default(), |comm| train(&mut Engine::new(model(), Arc::new(comm), config(4, ZeroStage::Zero)).unwrap(), 0, 1, true)).remove(0);
    let eval = |rows: &[(u64, u64, u64)]| rows.iter().map(|r| f64::from_bits(r.0)).collect::<Vec<_>>();
    let zero3 = common::run_world(2, &CommConfig::default(), |comm| {
        let rank = comm.rank();
        train(&mut Engine::new(model(), Arc::new(comm), config(2, ZeroStage::Three)).unwrap(), rank, 2, true)
    });
    for (rank, rows) in zero3.iter().enumerate() {
        for (a, b) in eval(rows).iter().zip(eval(&one)) {
            assert!((a - b).abs() <= 1e-6 * b.abs(), "ZeRO-3 world 2, rank {rank}: eval {a} vs one rank {b}");
        }
    }
    // Two stages (a | b, loss), every rank reading every micro-batch: the loss bits of one rank.
    let piped = common::run_world(2, &CommConfig::default(), |comm| {
        let (mut engine, ..) = common::pipeline_engine(comm, model(), &[0..1, 1..3], Schedule::new(ScheduleKind::OneFOneB, 2, 1, 4).unwrap(), config(4, ZeroStage::Zero));
        train(&mut engine, 0, 1, true)
    });
    for (rank, rows) in piped.iter().enumerate() {
        assert_eq!(rows, &one, "pipeline rank {rank}: (eval, loss, grad-norm) bits differ from one rank");
    }
}
