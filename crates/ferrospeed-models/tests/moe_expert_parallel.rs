//! Expert parallelism on CPU ranks (threads over TCP): a Qwen2-MoE-like model (a dense layer, sparse
//! layers with a shared expert, the load-balancing and z losses on) at ep ∈ {1, 2, 4} over 4 ranks
//! (and ep 2 over 2). Each rank's expert blocks hold ep-th of the experts; routed rows travel by
//! all_to_all. Against ep = 1 at the same world: the first step's loss is bitwise equal (each run of
//! rows meets the same weights in the same arithmetic), later ones within 1e-6 (an expert's gradient
//! sums the rows of its expert group's ranks in one accumulator, then over the expert-data-parallel
//! group, where ep = 1 sums each rank's then over all; the rounding differs). At each ep, ZeRO stages
//! 0–3 give bitwise equal losses; checkpoints resume across ep (bitwise at the same ep and world, within
//! 1e-6 across); a router sending every token to two experts (one rank's at ep 2, the others idle)
//! neither hangs nor diverges from ep = 1; offloaded optimizer state and parameters change nothing.

mod support;

use candle_core::Device;
use ferrospeed::comm::run_local_world;
use ferrospeed::engine::{EngineConfig, OffloadSettings};
use ferrospeed::optim::LrSchedule;
use ferrospeed::shard::Offload;
use ferrospeed::precision::Precision;
use ferrospeed::{CommConfig, Communicator};
use ferrospeed_models::{BatchSampler, Llama, LlamaConfig};
use std::path::Path;
use std::sync::Arc;
use support::bits;

const STEPS: usize = 4;

fn cfg() -> LlamaConfig {
    support::tiny_moe(true, 1e-3)
}

/// One run: `world` ranks, expert groups of `ep`, ZeRO `stage`; steps `from..to` (after loading
/// `resume`), a checkpoint under `save` at the end; `collapsed`: every router weight zero (every token
/// to experts 0 and 1 at the first step). Rank 0's losses.
#[allow(clippy::too_many_arguments)]
fn train(world: usize, ep: usize, stage: u8, collapsed: bool, from: usize, to: usize, resume: Option<&Path>, save: Option<&Path>) -> Vec<f64> {
    run(world, ep, stage, collapsed, from, to, resume, save).0
}

/// [`train`]'s losses and gradient norms.
#[allow(clippy::too_many_arguments)]
fn run(world: usize, ep: usize, stage: u8, collapsed: bool, from: usize, to: usize, resume: Option<&Path>, save: Option<&Path>) -> (Vec<f64>, Vec<f64>) {
    run_with(world, ep, stage, collapsed, from, to, resume, save, &|_| {})
}

/// [`run`] with the engine's settings changed by `tweak` (offload).
#[allow(clippy::too_many_arguments)]
fn run_with(world: usize, ep: usize, stage: u8, collapsed: bool, from: usize, to: usize, resume: Option<&Path>, save: Option<&Path>, tweak: &(dyn Fn(&mut EngineConfig) + Sync)) -> (Vec<f64>, Vec<f64>) {
    let corpus = support::corpus("Experts on other ranks take the tokens routed to them. ", 40);
    run_local_world(world, &CommConfig::default(), |comm| {
        let rank = comm.rank();
        let mut engine_cfg = support::engine_config(stage, Precision::Fp32, false, 5);
        tweak(&mut engine_cfg);
        let model = Llama::new(cfg()).model().unwrap();
        let mut engine = support::engine_with_ep(model, Arc::new(comm), ep, engine_cfg).unwrap();
        // Each expert block holds its share of the experts: two parameters an expert.
        let m = engine.model();
        let held: Vec<usize> = (0..m.num_blocks()).filter(|&b| m.block(b).experts() > 0).map(|b| m.own_params(b).len() / 2).collect();
        assert!(!held.is_empty() && held.iter().all(|&h| h == 4 / ep), "ep {ep}: experts held {held:?}");
        if collapsed {
            // The routers zero, every other value as drawn.
            let current: Vec<Vec<f32>> = engine.windows().unwrap().iter().map(|w| w.master.to_vec()).collect();
            let mut k = 0;
            engine
                .overwrite_blocks(0, None, |w| -> Result<(), ferrospeed::engine::EngineError> {
                    w.master.copy_from_slice(&current[k]);
                    for (j, part) in w.flat.params_in(w.window.clone()) {
                        if w.flat.specs()[j].name == "mlp.gate.weight" {
                            part.for_each(|i| w.master[i - w.window.start] = 0.0);
                        }
                    }
                    k += 1;
                    Ok(())
                })
                .unwrap();
        }
        if let Some(dir) = resume {
            ferrospeed::checkpoint::load_into(&mut engine, dir).unwrap();
        }
        let sampler = BatchSampler { seed: 11, seq_len: 16, micro_batch: 1, accumulation: 8 / world, world_size: world, rank };
        let schedule = LrSchedule { lr: 1e-2, min_lr: 1e-3, warmup: 1, total: STEPS };
        let stats: Vec<_> = (from..to).map(|s| engine.train_step_at(&support::batches(&sampler, &corpus, s, &Device::Cpu), schedule.at(s)).unwrap()).collect();
        if let Some(dir) = save {
            let req = ferrospeed::checkpoint::SaveRequest { root: dir, samples: 0, keep: 1, keep_best: false, run: serde_json::Value::Null };
            ferrospeed::checkpoint::save(&mut engine, &req).unwrap();
        }
        (stats.iter().map(|s| s.loss).collect(), stats.iter().map(|s| s.grad_norm).collect())
    })
    .unwrap()
    .remove(0)
}

fn close(a: &[f64], b: &[f64], tol: f64) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= tol * y.abs())
}

#[test]
fn expert_parallel_losses_match_ep_1_and_are_bitwise_across_stages() {
    for (world, eps) in [(4, &[2usize, 4][..]), (2, &[2][..])] {
        let (base, base_norms) = run(world, 1, 0, false, 0, STEPS, None, None);
        assert!(base.iter().all(|l| l.is_finite()) && base.last() < base.first(), "{base:?}");
        for &ep in eps {
            let (ref0, norms) = run(world, ep, 0, false, 0, STEPS, None, None);
            assert_eq!(ref0[0].to_bits(), base[0].to_bits(), "world {world} ep {ep}: the first step's loss {} vs ep 1's {}", ref0[0], base[0]);
            assert!(close(&ref0, &base, 1e-6), "world {world} ep {ep} {ref0:?} vs ep 1 {base:?}");
            // The gradient's scale, which AdamW's update hides: its norm every step.
            assert!(close(&norms, &base_norms, 1e-5), "world {world} ep {ep}: gradient norms {norms:?} vs ep 1 {base_norms:?}");
            for stage in 1..=3 {
                assert_eq!(bits(&train(world, ep, stage, false, 0, STEPS, None, None)), bits(&ref0), "world {world} ep {ep} stage {stage} vs stage 0");
            }
        }
    }
}

#[test]
fn expert_parallel_checkpoints_resume_across_ep() {
    let whole = train(4, 2, 2, false, 0, STEPS, None, None);
    let dir = tempfile::tempdir().unwrap();
    train(4, 2, 2, false, 0, 2, None, Some(dir.path()));
    let latest = ferrospeed::checkpoint::latest(dir.path()).unwrap().unwrap();
    assert_eq!(bits(&train(4, 2, 3, false, 2, STEPS, Some(&latest), None)), bits(&whole[2..]), "resumed at ep 2, stage 3");
    for (world, ep) in [(4, 4), (4, 1), (2, 2), (1, 1)] {
        let resumed = train(world, ep, 0, false, 2, STEPS, Some(&latest), None);
        assert!(close(&resumed, &whole[2..], 1e-6), "resumed at world {world} ep {ep}: {resumed:?} vs {whole:?}");
    }
    // And from ep 1 into ep 4.
    let dir1 = tempfile::tempdir().unwrap();
    let whole1 = train(4, 1, 1, false, 0, STEPS, None, None);
    train(4, 1, 1, false, 0, 2, None, Some(dir1.path()));
    let latest1 = ferrospeed::checkpoint::latest(dir1.path()).unwrap().unwrap();
    let resumed = train(4, 4, 1, false, 2, STEPS, Some(&latest1), None);
    assert!(close(&resumed, &whole1[2..], 1e-6), "ep 1 resumed at ep 4: {resumed:?} vs {whole1:?}");
}

#[test]
fn a_router_sending_every_token_to_one_ranks_experts_neither_hangs_nor_diverges() {
    let (base, base_norms) = run(4, 1, 0, true, 0, STEPS, None, None);
    assert!(base.iter().all(|l| l.is_finite()), "{base:?}");
    for (ep, stage) in [(2, 0), (2, 3), (4, 2)] {
        let (got, norms) = run(4, ep, stage, true, 0, STEPS, None, None);
        assert!(close(&got, &base, 1e-6), "collapsed router, ep {ep} stage {stage}: {got:?} vs ep 1 {base:?}");
        assert!(close(&norms, &base_norms, 1e-5), "collapsed router, ep {ep} stage {stage}: gradient norms {norms:?} vs ep 1 {base_norms:?}");
    }
}

#[test]
fn an_expert_group_that_does_not_divide_the_experts_is_refused() {
    let errors = run_local_world(3, &CommConfig::default(), |comm| {
        let model = Llama::new(cfg()).model().unwrap();
        support::engine_with_ep(model, Arc::new(comm), 3, support::engine_config(0, Precision::Fp32, false, 5)).err().map(|e| e.to_string())
    })
    .unwrap();
    for e in errors {
        let e = e.expect("refused");
        assert!(e.contains("4 experts, which parallel.ep = 3 does not divide") && e.contains("[1, 2, 4]"), "{e}");
    }
}

/// Expert blocks are blocks like any other to the offload: the optimizer state in host memory or NVMe
/// files and stage-3 parameter shards in host memory give the losses of the same expert-parallel run
/// without offload, bit for bit.
#[test]
fn expert_parallel_with_offloaded_state_and_parameters_trains_bitwise_alike() {
    let plain = train(4, 2, 3, false, 0, STEPS, None, None);
    let dir = tempfile::tempdir().unwrap();
    for (optimizer, params, nvme_ratio) in [(Offload::Cpu, Offload::None, None), (Offload::Nvme, Offload::Cpu, Some(0.5))] {
        let nvme = dir.path().to_path_buf();
        let tweak = move |c: &mut EngineConfig| {
            c.strategy = c.strategy.with_offload(optimizer, 1.0, params);
            if let Some(q) = nvme_ratio {
                c.strategy = c.strategy.with_nvme_ratio(q);
            }
            c.offload = OffloadSettings { nvme_dir: Some(nvme.clone()), pinned_budget: 0 };
        };
        let (got, _) = run_with(4, 2, 3, false, 0, STEPS, None, None, &tweak);
        assert_eq!(bits(&got), bits(&plain), "ep 2 stage 3, optimizer {optimizer:?} (NVMe share {nvme_ratio:?}), parameters {params:?}: {got:?} vs {plain:?}");
    }
}

/// bf16, the GPU's precision, on the CPU: routers, experts and the load-balancing sums mix bf16
/// activations with f32 statistics. It trains at ep 1 and ep 2, alike within bf16's rounding.
#[test]
fn moe_trains_in_bf16_at_ep_1_and_2() {
    let bf16 = |c: &mut EngineConfig| c.precision = Precision::Bf16;
    let base = run_with(2, 1, 0, false, 0, STEPS, None, None, &bf16).0;
    assert!(base.iter().all(|l| l.is_finite()) && base.last() < base.first(), "{base:?}");
    let ep2 = run_with(2, 2, 0, false, 0, STEPS, None, None, &bf16).0;
    assert!(close(&ep2, &base, 2e-2), "bf16 ep 2 {ep2:?} vs ep 1 {base:?}");
}
