//! The engine with device-resident optimizer state on a GPU: every ZeRO stage, at world sizes 1 and
//! 2 (ranks as threads sharing GPU 0), fp32 and bf16, against stage 0 and against the CPU; and a
//! checkpoint saved and resumed on the GPU. Skipped, with a message, where no GPU can be used.
#![cfg(feature = "cuda")]

use candle_core::{Device, Tensor};
use ferrospeed::checkpoint::{self, SaveRequest};
use ferrospeed::comm::run_local_world;
use ferrospeed::config::ZeroStage;
use ferrospeed::engine::{Batch, Engine, EngineConfig};
use ferrospeed::optim::{AdamW, LrSchedule};
use ferrospeed::precision::Precision;
use ferrospeed::shard::Strategy;
use ferrospeed::{CommConfig, Communicator};
use ferrospeed_models::{BatchSampler, Gpt, GptConfig, TextCorpus};
use std::sync::Arc;

const CFG: GptConfig = GptConfig { n_layer: 2, n_head: 2, d_model: 64, seq_len: 32, vocab_size: 256 };
const STEPS: usize = 6;

fn gpu() -> Option<Device> {
    match std::panic::catch_unwind(|| Device::new_cuda(0)) {
        Ok(Ok(d)) => Some(d),
        _ => {
            eprintln!("skipping the GPU engine tests: no usable CUDA device");
            None
        }
    }
}

fn corpus() -> TextCorpus {
    TextCorpus::from_bytes("Parameters live in flat buffers; candle sees copies. ".repeat(60).into_bytes())
}

/// Rank 0's losses over `range` of steps; `save_at` saves a checkpoint after that many steps,
/// `resume` loads the latest one first.
fn train(world: usize, stage: u8, precision: Precision, on_gpu: bool, steps: std::ops::Range<usize>, ckpt: Option<(&std::path::Path, bool)>) -> Vec<f64> {
    let corpus = corpus();
    let out = run_local_world(world, &CommConfig::default(), |comm| {
        let rank = comm.rank();
        let mut cfg = EngineConfig::fp32(true, 0.5, AdamW { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 }, 3);
        cfg.strategy = Strategy::new(ZeroStage::from_int(stage.into()).unwrap());
        cfg.precision = precision;
        cfg.device = if on_gpu { Device::new_cuda(0).unwrap() } else { Device::Cpu };
        let mut engine = Engine::new(Gpt::new(CFG).model().unwrap(), Arc::new(comm), cfg).unwrap();
        if let Some((dir, true)) = ckpt {
            checkpoint::load_into(&mut engine, &checkpoint::latest(dir).unwrap().unwrap()).unwrap();
        }
        let sampler = BatchSampler { seed: 3, seq_len: CFG.seq_len, micro_batch: 2, accumulation: 2, world_size: world, rank };
        let schedule = LrSchedule { lr: 3e-3, min_lr: 3e-4, warmup: 2, total: STEPS };
        let mut losses = Vec::new();
        let dev = engine.config().device.clone();
        for step in steps.clone() {
            let batches: Vec<Batch> = sampler
                .micro_batches(&corpus, step as u64)
                .into_iter()
                .map(|mb| Batch {
                    tokens: Tensor::from_vec(mb.tokens, (2, CFG.seq_len), &dev).unwrap(),
                    targets: Tensor::from_vec(mb.targets, (2, CFG.seq_len), &dev).unwrap(),
                })
                .collect();
            losses.push(engine.train_step(&batches, schedule.at(step)).unwrap().loss);
        }
        if let Some((dir, false)) = ckpt {
            checkpoint::save(&mut engine, &SaveRequest { root: dir, samples: 0, keep: 2, run: serde_json::Value::Null }).unwrap();
        }
        losses
    })
    .unwrap();
    out.into_iter().next().unwrap()
}

fn report(what: &str, got: &[f64], want: &[f64], tol: f64) {
    let worst = got.iter().zip(want).map(|(a, b)| ((a - b) / b).abs()).fold(0.0, f64::max);
    let bitwise = got.iter().zip(want).all(|(a, b)| a.to_bits() == b.to_bits());
    eprintln!("{what}: max relative loss difference {worst:e} (bitwise: {bitwise})");
    assert!(worst <= tol, "{what}: {got:?} vs {want:?}");
}

#[test]
fn every_stage_trains_on_the_gpu_like_stage_0_and_the_cpu() {
    if gpu().is_none() {
        return;
    }
    for precision in [Precision::Fp32, Precision::Bf16] {
        for world in [1, 2] {
            let reference = train(world, 0, precision, true, 0..STEPS, None);
            assert!(reference[STEPS - 1] < reference[0], "the loss falls on the GPU: {reference:?}");
            for stage in 1..=3 {
                let losses = train(world, stage, precision, true, 0..STEPS, None);
                report(&format!("{precision:?} world {world}: stage {stage} vs 0 on the GPU"), &losses, &reference, 1e-6);
            }
            let cpu = train(world, 0, precision, false, 0..STEPS, None);
            let tol = if precision == Precision::Fp32 { 1e-4 } else { 2e-2 };
            report(&format!("{precision:?} world {world}: GPU vs CPU"), &reference, &cpu, tol);
        }
    }
}

#[test]
fn a_checkpoint_resumes_on_the_gpu() {
    if gpu().is_none() {
        return;
    }
    for (world, stage) in [(1, 0), (2, 2), (2, 3)] {
        let dir = tempfile::tempdir().unwrap();
        let whole = train(world, stage, Precision::Fp32, true, 0..STEPS, None);
        let first = train(world, stage, Precision::Fp32, true, 0..3, Some((dir.path(), false)));
        let rest = train(world, stage, Precision::Fp32, true, 3..STEPS, Some((dir.path(), true)));
        let resumed: Vec<f64> = first.into_iter().chain(rest).collect();
        report(&format!("world {world} stage {stage}: resumed vs uninterrupted on the GPU"), &resumed, &whole, 1e-6);
    }
}
