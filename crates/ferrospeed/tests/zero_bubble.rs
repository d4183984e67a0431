//! The zero-bubble schedule (ZB-H1) through the library API (ranks as threads): blocks whose
//! hand-written backward splits with `ParamGrads` run their input halves and weight halves exactly
//! where each rank's list of actions puts them — the weight work deferred past later input halves —
//! and train the losses and gradient norms of the same model on one rank, bit for bit; autograd
//! blocks (no split) train them too.

mod common;

use candle_core::{Device, Tensor};
use ferrospeed::engine::{Batch, Block, Engine, EngineConfig, Init, Model, ParamGrads, ParamRef, ParamSpec, Saved, Upstream, WeightGrads};
use ferrospeed::nn::{Forward, NnBlock};
use ferrospeed::optim::{AdamW, LrSchedule};
use ferrospeed::parallel::{Op, Schedule, ScheduleKind};
use ferrospeed::rng::Rng;
use ferrospeed::CommConfig;
use std::sync::{Arc, Mutex};

const D: usize = 5;
const MICRO: usize = 6;

type Log = Arc<Mutex<Vec<&'static str>>>;

/// `x · w` with a hand-written backward that logs its halves: `I` when the input half runs, `W`
/// when the weight work does.
struct Linear {
    name: &'static str,
    log: Log,
}

impl Linear {
    fn backward_into(&self, p: &[Tensor], saved: Saved, upstream: Upstream<'_>, grads: &mut ParamGrads) -> candle_core::Result<Vec<Option<Tensor>>> {
        let x = *saved.downcast::<Tensor>().map_err(|_| candle_core::Error::Msg("foreign saved state".into()))?;
        let g = upstream.grad(0)?.clone();
        self.log.lock().unwrap().push("I");
        let log = self.log.clone();
        let first = self.name == "first";
        let gx = g.matmul(&p[0].t()?)?;
        grads.put(move |slots| {
            log.lock().unwrap().push("W");
            slots[0] = Some(x.t()?.matmul(&g)?);
            Ok(())
        })?;
        // The model's first block reads the batch: no input to hand a gradient to.
        Ok(if first { Vec::new() } else { vec![Some(gx)] })
    }

    fn input(&self, inputs: &[Tensor], batch: &Batch) -> candle_core::Result<Tensor> {
        Ok(match inputs.first() {
            Some(x) => x.clone(),
            None => batch.get("x")?.clone(),
        })
    }
}

impl Block for Linear {
    fn name(&self) -> String {
        self.name.into()
    }

    fn params(&self) -> Vec<ParamRef> {
        vec![ParamRef::Own(ParamSpec::new("w", &[D, D], Init::Normal { std: 0.4 }, true))]
    }

    fn forward(&self, p: &[Tensor], inputs: &[Tensor], batch: &Batch) -> candle_core::Result<Vec<Tensor>> {
        Ok(vec![self.input(inputs, batch)?.matmul(&p[0])?])
    }

    fn forward_saving(&self, p: &[Tensor], inputs: &[Tensor], batch: &Batch) -> candle_core::Result<Option<(Vec<Tensor>, Saved)>> {
        let x = self.input(inputs, batch)?;
        Ok(Some((vec![x.matmul(&p[0])?], Box::new(x))))
    }

    fn backward(&self, p: &[Tensor], saved: Saved, upstream: Upstream<'_>) -> candle_core::Result<(Vec<Option<Tensor>>, Vec<Option<Tensor>>)> {
        ParamGrads::whole(1, |g| self.backward_into(p, saved, upstream, g))
    }

    fn backward_split(&self, p: &[Tensor], saved: Saved, upstream: Upstream<'_>) -> candle_core::Result<(WeightGrads, Vec<Option<Tensor>>)> {
        ParamGrads::split(1, |g| self.backward_into(p, saved, upstream, g))
    }
}

/// The squared error of `tanh(x) · u` against the batch's targets (an autograd block).
struct Loss {
    u: Tensor,
}

impl Forward for Loss {
    fn forward(&self, inputs: &[Tensor], batch: &Batch) -> candle_core::Result<Vec<Tensor>> {
        let err = (inputs[0].tanh()?.matmul(&self.u)? - batch.get("y")?)?;
        Ok(vec![err.sqr()?.mean_all()?])
    }
}

/// first (linear) → second (linear) → loss (autograd); the linear blocks log into `log`.
fn model(log: &Log) -> Model {
    let small = candle_nn::Init::Randn { mean: 0.0, stdev: 0.4 };
    let loss = NnBlock::new("loss", move |vb| Ok(Loss { u: vb.get_with_hints((D, 1), "u", small)? })).unwrap();
    Model::new(vec![Box::new(Linear { name: "first", log: log.clone() }), Box::new(Linear { name: "second", log: log.clone() }), Box::new(loss)]).unwrap()
}

fn batches(step: usize) -> Vec<Batch> {
    (0..MICRO)
        .map(|k| {
            let mut rng = Rng::new((step * MICRO + k) as u64);
            let x: Vec<f32> = (0..3 * D).map(|_| rng.normal() as f32).collect();
            let y: Vec<f32> = (0..3).map(|_| rng.normal() as f32).collect();
            Batch::new().with("x", Tensor::from_vec(x, (3, D), &Device::Cpu).unwrap()).with("y", Tensor::from_vec(y, (3, 1), &Device::Cpu).unwrap())
        })
        .collect()
}

fn config() -> EngineConfig {
    let mut cfg = EngineConfig::fp32(false, 1.0, AdamW { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }, 7);
    cfg.accumulation = MICRO;
    cfg.schedule = LrSchedule::constant(5e-2);
    cfg
}

/// (loss bits, grad-norm bits) of 3 steps.
fn train(engine: &mut Engine) -> Vec<(u64, u64)> {
    (0..3).map(|s| engine.train_step(&batches(s)).map(|st| (st.loss.to_bits(), st.grad_norm.to_bits())).unwrap()).collect()
}

#[test]
fn split_backwards_run_where_the_zero_bubble_schedule_puts_them_and_train_one_ranks_bits() {
    let whole = common::run_world(1, &CommConfig::default(), |comm| train(&mut Engine::new(model(&Log::default()), Arc::new(comm), config()).unwrap())).remove(0);
    // first | second, loss: each rank's linear block logs its halves.
    let (schedule, ranges) = (Schedule::new(ScheduleKind::ZeroBubble, 2, 1, MICRO).unwrap(), vec![0..1, 1..3]);
    let runs = common::run_world(2, &CommConfig::default(), |comm| {
        let log = Log::default();
        let (mut engine, ..) = common::pipeline_engine(comm, model(&log), &ranges, schedule.clone(), config());
        let rows = train(&mut engine);
        let log = log.lock().unwrap().clone();
        (rows, log)
    });
    for (rank, (rows, log)) in runs.into_iter().enumerate() {
        assert_eq!(rows, whole, "rank {rank}: (loss bits, grad-norm bits) differ from one rank");
        // The halves in the order of the rank's actions, every step.
        let want: Vec<&str> = schedule.actions[rank]
            .iter()
            .filter_map(|a| match a.op {
                Op::BackwardInput => Some("I"),
                Op::BackwardWeight => Some("W"),
                _ => None,
            })
            .collect();
        assert!(want.windows(2).any(|w| w == ["I", "I"]), "rank {rank}: the schedule defers no weight work: {want:?}");
        assert_eq!(log, want.repeat(3), "rank {rank}: the executor ran the halves out of the schedule's order");
    }
}
