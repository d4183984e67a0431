//! Pipeline parallelism through the library API alone (ranks as threads): a candle-nn model whose
//! tied parameters cross ranks both ways — block `a`'s weight used by the next block, block `b`'s by
//! the one after — under interleaved 1F1B with two stages a rank, under 1F1B and ZB-H1, against the same
//! model on one rank, with and without activation checkpointing. Each rank holds the other's tied
//! block as a ghost: the tie sums must pair the same blocks on both ranks. One rank must not
//! backpropagate through the history of the gradient a block hands down (candle leaves a variable's
//! gradient attached to the ops that made it): with `c` tied to `b`'s weight, that history ran into
//! `b`'s own weight and doubled part of its gradient at pp = 1 before `backward_span` detached it.

mod common;

use candle_core::{Device, Tensor};
use ferrospeed::engine::{Batch, Engine, EngineConfig, Model};
use ferrospeed::nn::{Forward, NnBlock, Tie};
use ferrospeed::optim::{AdamW, LrSchedule};
use ferrospeed::parallel::{Schedule, ScheduleKind};
use ferrospeed::rng::Rng;
use ferrospeed::CommConfig;
use std::sync::Arc;

const D: usize = 6;

/// `tanh(x · w (+ x · t))`: an owned weight, and optionally a tied one.
struct Mix {
    w: Option<Tensor>,
    t: Option<Tensor>,
}

impl Forward for Mix {
    fn forward(&self, inputs: &[Tensor], batch: &Batch) -> candle_core::Result<Vec<Tensor>> {
        let x = match inputs.first() {
            Some(x) => x.clone(),
            None => batch.get("x")?.clone(),
        };
        let mut y: Option<Tensor> = None;
        for w in [&self.w, &self.t].into_iter().flatten() {
            let term = x.matmul(w)?;
            y = Some(match y {
                None => term,
                Some(y) => (y + term)?,
            });
        }
        Ok(vec![y.expect("a weight").tanh()?])
    }
}

/// The squared error of `x · u` against the batch's targets.
struct Loss {
    u: Tensor,
}

impl Forward for Loss {
    fn forward(&self, inputs: &[Tensor], batch: &Batch) -> candle_core::Result<Vec<Tensor>> {
        let err = (inputs[0].matmul(&self.u)? - batch.get("y")?)?;
        Ok(vec![err.sqr()?.mean_all()?])
    }
}

/// a (owns w) → b (owns w, uses a.w) → c (uses b.w) → loss.
fn model() -> Model {
    let small = candle_nn::Init::Randn { mean: 0.0, stdev: 0.4 };
    let own = move |vb: &candle_nn::VarBuilder| vb.get_with_hints((D, D), "w", small);
    let a = NnBlock::new("a", move |vb| Ok(Mix { w: Some(own(&vb)?), t: None })).unwrap();
    let tie_a = Tie { name: "t".into(), owner: 0, owner_name: "w".into() };
    let b = NnBlock::with_ties("b", vec![tie_a], move |vb| Ok(Mix { w: Some(own(&vb)?), t: Some(vb.get((D, D), "t")?) })).unwrap();
    let tie_b = Tie { name: "t".into(), owner: 1, owner_name: "w".into() };
    let c = NnBlock::with_ties("c", vec![tie_b], |vb| Ok(Mix { w: None, t: Some(vb.get((D, D), "t")?) })).unwrap();
    let loss = NnBlock::new("loss", move |vb| Ok(Loss { u: vb.get_with_hints((D, 1), "u", small)? })).unwrap();
    Model::new(vec![Box::new(a), Box::new(b), Box::new(c), Box::new(loss)]).unwrap()
}

fn batches(step: usize) -> Vec<Batch> {
    (0..4)
        .map(|k| {
            let mut rng = Rng::new((step * 4 + k) as u64);
            let x: Vec<f32> = (0..3 * D).map(|_| rng.normal() as f32).collect();
            let y: Vec<f32> = (0..3).map(|_| rng.normal() as f32).collect();
            Batch::new().with("x", Tensor::from_vec(x, (3, D), &Device::Cpu).unwrap()).with("y", Tensor::from_vec(y, (3, 1), &Device::Cpu).unwrap())
        })
        .collect()
}

fn config(checkpointing: bool) -> EngineConfig {
    let mut cfg = EngineConfig::fp32(checkpointing, 1.0, AdamW { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }, 7);
    cfg.accumulation = 4;
    cfg.schedule = LrSchedule::constant(5e-2);
    cfg
}

/// Losses and gradient norms of 4 steps.
fn train(engine: &mut Engine) -> Vec<(f64, f64)> {
    (0..4).map(|s| engine.train_step(&batches(s)).map(|st| (st.loss, st.grad_norm)).unwrap()).collect()
}


/// Four steps of `model()` on a pipeline of two ranks under `kind` with `v` stages a rank over
/// `ranges`, on every rank.
fn pipelined(kind: ScheduleKind, v: usize, ranges: Vec<std::ops::Range<usize>>, tied_on_both: bool, checkpointing: bool) -> Vec<Vec<(f64, f64)>> {
    common::run_world(2, &CommConfig::default(), |comm| {
        let (mut engine, tied, tie_stages) = common::pipeline_engine(comm, model(), &ranges, Schedule::new(kind, 2, v, 4).unwrap(), config(checkpointing));
        if tied_on_both {
            assert_eq!((tied, tie_stages), (vec![0, 1], vec![0, 1]), "a and b are each held on both ranks");
        }
        train(&mut engine)
    })
}

#[test]
fn ties_crossing_ranks_both_ways_are_summed_pairwise_and_match_one_rank() {
    for checkpointing in [false, true] {
        let whole = common::run_world(1, &CommConfig::default(), |comm| train(&mut Engine::new(model(), Arc::new(comm), config(checkpointing)).unwrap())).remove(0);
        let runs = [
            // Four stages of one block, two a rank: a and c on rank 0, b and loss on rank 1; each rank
            // holds the other's tied block as a ghost.
            ("interleaved", pipelined(ScheduleKind::Interleaved, 2, vec![0..1, 1..2, 2..3, 3..4], true, checkpointing)),
            // a, b | c, loss: c's tied weight is b's, one block before it (the case where the
            // gradient handed down must not carry the history of c's ops into b's own weight).
            ("1f1b", pipelined(ScheduleKind::OneFOneB, 1, vec![0..2, 2..4], false, checkpointing)),
            // The same under ZB-H1: autograd blocks do not split, their weight halves hand over
            // gradients computed with the input halves.
            ("zb", pipelined(ScheduleKind::ZeroBubble, 1, vec![0..2, 2..4], false, checkpointing)),
        ];
        for (what, piped) in runs {
            for rows in &piped {
                for (s, ((l, n), (wl, wn))) in rows.iter().zip(&whole).enumerate() {
                    // Tied gradients are summed once a step, not interleaved by micro-batch: rounding only.
                    assert!(
                        (l - wl).abs() <= 1e-6 * wl.abs() && (n - wn).abs() <= 1e-6 * wn.abs(),
                        "{what}, checkpointing {checkpointing}, step {s}: pipeline {l}, {n} vs one rank {wl}, {wn}"
                    );
                }
            }
        }
    }
}
