//! Mixture-of-experts models through the engine, ranks as threads: a Qwen2-MoE-like model (a dense
//! layer, sparse layers with a shared expert, the load-balancing loss on) gives losses bitwise equal
//! across ZeRO stages 0–3 at world 1 and at world 2, world 2 within 1e-5 of world 1, a resumed run
//! bitwise the uninterrupted one; and a router that sends every token to the same two experts (the
//! others get none) trains at every stage and world size alike, without a hang, its load statistic
//! (`moe_max_load`: the busiest expert's tokens over the mean) 2 at the first step.

mod support;

use candle_core::Device;
use ferrospeed::comm::run_local_world;
use ferrospeed::engine::{Engine, Model};
use ferrospeed::optim::LrSchedule;
use ferrospeed::precision::Precision;
use ferrospeed::{CommConfig, Communicator};
use ferrospeed_models::{BatchSampler, Llama, LlamaConfig};
use std::path::Path;
use std::sync::Arc;
use support::bits;

const STEPS: usize = 4;

fn cfg() -> LlamaConfig {
    support::tiny_moe(false, 0.0)
}

fn model() -> Model {
    Llama::new(cfg()).model().unwrap()
}

/// Rank 0's losses of steps `from..to` at `world` and `stage` (after loading `resume`), saving a
/// checkpoint under `save` at the end; `collapsed`: every router weight zero (at the first step every
/// token goes to experts 0 and 1, none to 2 and 3).
fn train(world: usize, stage: u8, collapsed: bool, from: usize, to: usize, resume: Option<&Path>, save: Option<&Path>) -> Vec<f64> {
    run(world, stage, collapsed, from, to, resume, save).0
}

/// [`train`]'s losses and the router's load statistic (`moe_max_load`) of each step.
#[allow(clippy::too_many_arguments)]
fn run(world: usize, stage: u8, collapsed: bool, from: usize, to: usize, resume: Option<&Path>, save: Option<&Path>) -> (Vec<f64>, Vec<f64>) {
    let corpus = support::corpus("Experts take the tokens routed to them; the others wait. ", 40);
    run_local_world(world, &CommConfig::default(), |comm| {
        let rank = comm.rank();
        let mut engine = Engine::new(model(), Arc::new(comm), support::engine_config(stage, Precision::Fp32, false, 5)).unwrap();
        if collapsed {
            // The routers zero: every expert equally likely, so every token goes to experts 0 and 1 (ties
            // go to the lower expert) and experts 2 and 3 get none; every other value as drawn.
            let model = engine.model();
            let names = model.block_names().to_vec();
            let slots = engine.slot_tensors().unwrap();
            let own: Vec<Vec<Vec<f32>>> = (0..names.len())
                .map(|b| {
                    let m = engine.model();
                    (0..m.own_params(b).len())
                        .map(|j| {
                            let k = m.slots(b).iter().position(|s| s.block == b && s.index == j && !s.frozen).unwrap();
                            slots[b][k].flatten_all().unwrap().to_vec1::<f32>().unwrap()
                        })
                        .collect()
                })
                .collect();
            engine
                .overwrite_blocks(0, None, |w| -> Result<(), ferrospeed::engine::EngineError> {
                    let b = names.iter().position(|n| n == w.block).unwrap();
                    for (j, part) in w.flat.params_in(w.window.clone()) {
                        let (spec, start) = (&w.flat.specs()[j], w.flat.range(j).start);
                        for i in part {
                            let v = own[b][j][i - start];
                            w.master[i - w.window.start] = if spec.name == "mlp.gate.weight" { 0.0 } else { v };
                        }
                    }
                    Ok(())
                })
                .unwrap();
        }
        if let Some(dir) = resume {
            ferrospeed::checkpoint::load_into(&mut engine, dir).unwrap();
        }
        let sampler = BatchSampler { seed: 11, seq_len: 16, micro_batch: 1, accumulation: 4 / world, world_size: world, rank };
        let schedule = LrSchedule { lr: 1e-2, min_lr: 1e-3, warmup: 1, total: STEPS };
        let stats: Vec<_> = (from..to).map(|s| engine.train_step_at(&support::batches(&sampler, &corpus, s, &Device::Cpu), schedule.at(s)).unwrap()).collect();
        let losses: Vec<f64> = stats.iter().map(|s| s.loss).collect();
        // The router's load statistic, every step.
        let loads: Vec<f64> = stats.iter().map(|s| s.metrics.iter().find(|(n, _)| n == "moe_max_load").map(|m| m.1).unwrap_or(f64::NAN)).collect();

        if let Some(dir) = save {
            let req = ferrospeed::checkpoint::SaveRequest { root: dir, samples: 0, keep: 1, keep_best: false, run: serde_json::Value::Null };
            ferrospeed::checkpoint::save(&mut engine, &req).unwrap();
        }
        (losses, loads)
    })
    .unwrap()
    .remove(0)
}

#[test]
fn moe_losses_are_bitwise_across_stages_and_close_across_world_sizes() {
    let w1 = train(1, 0, false, 0, STEPS, None, None);
    assert!(w1.iter().all(|l| l.is_finite()) && w1.last() < w1.first(), "{w1:?}");
    for world in [1, 2] {
        let base = if world == 1 { w1.clone() } else { train(2, 0, false, 0, STEPS, None, None) };
        for stage in 1..=3 {
            assert_eq!(bits(&train(world, stage, false, 0, STEPS, None, None)), bits(&base), "world {world} stage {stage} vs stage 0");
        }
        assert!(base.iter().zip(&w1).all(|(a, b)| (a - b).abs() <= 1e-5 * b.abs()), "world {world} {base:?} vs world 1 {w1:?}");
    }
}

#[test]
fn a_moe_run_resumes_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let whole = train(2, 3, false, 0, STEPS, None, None);
    train(2, 3, false, 0, 2, None, Some(dir.path()));
    let latest = ferrospeed::checkpoint::latest(dir.path()).unwrap().unwrap();
    let resumed = train(1, 1, false, 2, STEPS, Some(&latest), None);
    assert!(resumed.iter().zip(&whole[2..]).all(|(a, b)| (a - b).abs() <= 1e-5 * b.abs()), "resumed at world 1 {resumed:?} vs {whole:?}");
    let resumed2 = train(2, 0, false, 2, STEPS, Some(&latest), None);
    assert_eq!(bits(&resumed2), bits(&whole[2..]), "resumed at world 2 stage 0 vs uninterrupted stage 3");
}

#[test]
fn a_router_sending_every_token_to_the_same_experts_trains_alike_everywhere() {
    let (w1, loads) = run(1, 0, true, 0, STEPS, None, None);
    assert!(w1.iter().all(|l| l.is_finite()), "{w1:?}");
    // The first step: two of four experts take every token, twice their even share.
    assert_eq!(loads[0], 2.0, "{loads:?}");
    for (world, stage) in [(1, 3), (2, 0), (2, 3)] {
        let (got, got_loads) = run(world, stage, true, 0, STEPS, None, None);
        assert!(got.iter().zip(&w1).all(|(a, b)| (a - b).abs() <= 1e-5 * b.abs()), "world {world} stage {stage}: {got:?} vs {w1:?}");
        assert!(got_loads.iter().zip(&loads).all(|(a, b)| (a - b).abs() <= 1e-5 * b), "world {world} stage {stage}: loads {got_loads:?} vs {loads:?}");
    }
    // A router as drawn spreads the tokens more evenly than the collapsed one.
    let (_, drawn) = run(1, 0, false, 0, 1, None, None);
    assert!(drawn[0] >= 1.0 && drawn[0] < 2.0, "{drawn:?}");
}
