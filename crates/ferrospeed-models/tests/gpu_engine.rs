//! The engine with device-resident optimizer state on a GPU: every ZeRO stage, at world sizes 1 and
//! 2 (ranks as threads sharing GPU 0), fp32 and bf16, bitwise against stage 0 and close to the CPU;
//! and a checkpoint saved and resumed on the GPU, bitwise against an uninterrupted run. Where no GPU
//! can be used each test prints the skip line of the GPU scripts and returns.
#![cfg(feature = "cuda")]

mod support;

use candle_core::Device;
use ferrospeed::checkpoint::{self, SaveRequest};
use ferrospeed::comm::run_local_world;
use ferrospeed::engine::{Engine, OffloadSettings};
use ferrospeed::shard::Offload;
use ferrospeed::optim::LrSchedule;
use ferrospeed::precision::Precision;
use ferrospeed::{CommConfig, Communicator};
use ferrospeed_models::{BatchSampler, Gpt, GptConfig};
use std::sync::Arc;
use support::{batches, bits, gpu_or_skip};

const CFG: GptConfig = GptConfig { n_layer: 2, n_head: 2, d_model: 64, seq_len: 32, vocab_size: 256 };
const STEPS: usize = 6;

/// Rank 0's losses over `steps`; `ckpt` `(dir, false)` saves a checkpoint in `dir` after them,
/// `(dir, true)` loads the latest one of `dir` before them.
fn train(world: usize, stage: u8, precision: Precision, on_gpu: bool, steps: std::ops::Range<usize>, ckpt: Option<(&std::path::Path, bool)>) -> Vec<f64> {
    train_offloaded(world, stage, precision, on_gpu, steps, ckpt, None)
}

/// [`train`] with the optimizer state offloaded (`tier`, `ratio`, NVMe ratio, the NVMe folder, and
/// where stage-3 parameter shards go).
fn train_offloaded(
    world: usize,
    stage: u8,
    precision: Precision,
    on_gpu: bool,
    steps: std::ops::Range<usize>,
    ckpt: Option<(&std::path::Path, bool)>,
    offload: Option<(Offload, f64, f64, &std::path::Path, Offload)>,
) -> Vec<f64> {
    let corpus = support::corpus("Parameters live in flat buffers; candle sees copies. ", 60);
    let out = run_local_world(world, &CommConfig::default(), |comm| {
        let rank = comm.rank();
        let mut cfg = support::engine_config(stage, precision, true, 3);
        cfg.grad_clip = 0.5;
        cfg.device = if on_gpu { Device::new_cuda(0).unwrap() } else { Device::Cpu };
        if let Some((tier, ratio, nvme_ratio, dir, params)) = offload {
            cfg.strategy = cfg.strategy.with_offload(tier, ratio, params).with_nvme_ratio(nvme_ratio);
            cfg.offload = OffloadSettings { nvme_dir: Some(dir.to_path_buf()), pinned_budget: 0 };
        }
        let mut engine = Engine::new(Gpt::new(CFG).model().unwrap(), Arc::new(comm), cfg).unwrap();
        if let Some((dir, true)) = ckpt {
            checkpoint::load_into(&mut engine, &checkpoint::latest(dir).unwrap().unwrap()).unwrap();
        }
        let sampler = BatchSampler { seed: 3, seq_len: CFG.seq_len, micro_batch: 2, accumulation: 2, world_size: world, rank };
        let schedule = LrSchedule { lr: 3e-3, min_lr: 3e-4, warmup: 2, total: STEPS };
        let mut losses = Vec::new();
        let dev = engine.config().device.clone();
        for step in steps.clone() {
            losses.push(engine.train_step_at(&batches(&sampler, &corpus, step, &dev), schedule.at(step)).unwrap().loss);
        }
        if let Some((dir, false)) = ckpt {
            checkpoint::save(&mut engine, &SaveRequest { root: dir, samples: 0, keep: 2, keep_best: false, run: serde_json::Value::Null }).unwrap();
        }
        losses
    })
    .unwrap();
    out.into_iter().next().unwrap()
}

/// Prints the largest relative difference of the losses, which the GPU log keeps as the measurement.
fn report(what: &str, got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "{what}");
    let worst = got.iter().zip(want).map(|(a, b)| ((a - b) / b).abs()).fold(0.0, f64::max);
    eprintln!("{what}: max relative loss difference {worst:e} (bitwise: {})", bits(got) == bits(want));
    worst
}

fn assert_close(what: &str, got: &[f64], want: &[f64], tol: f64) {
    let worst = report(what, got, want);
    assert!(worst <= tol, "{what}: {got:?} vs {want:?}: {worst:e} > {tol:e}");
}

fn assert_bitwise(what: &str, got: &[f64], want: &[f64]) {
    report(what, got, want);
    assert_eq!(bits(got), bits(want), "{what}: not bitwise identical: {got:?} vs {want:?}");
}

#[test]
fn every_stage_trains_on_the_gpu_like_stage_0_and_the_cpu() {
    if gpu_or_skip("every_stage_trains_on_the_gpu_like_stage_0_and_the_cpu").is_none() {
        return;
    }
    for precision in [Precision::Fp32, Precision::Bf16] {
        for world in [1, 2] {
            let reference = train(world, 0, precision, true, 0..STEPS, None);
            assert!(reference[STEPS - 1] < reference[0], "the loss falls on the GPU: {reference:?}");
            // The stages differ only in where state lives and how gradients are reduced, in the same
            // order: the same bits (measured bitwise at every stage, precision and world size).
            for stage in 1..=3 {
                let losses = train(world, stage, precision, true, 0..STEPS, None);
                assert_bitwise(&format!("{precision:?} world {world}: stage {stage} vs 0 on the GPU"), &losses, &reference);
            }
            let cpu = train(world, 0, precision, false, 0..STEPS, None);
            // Measured: fp32 2.1e-7 (world 1) and 0 (world 2); bf16 9.7e-5 and 1.05e-4.
            let tol = if precision == Precision::Fp32 { 1e-6 } else { 5e-4 };
            assert_close(&format!("{precision:?} world {world}: GPU vs CPU"), &reference, &cpu, tol);
        }
    }
}

#[test]
fn offloaded_optimizer_state_trains_on_the_gpu_bitwise_like_the_device_state() {
    if gpu_or_skip("offloaded_optimizer_state_trains_on_the_gpu_bitwise_like_the_device_state").is_none() {
        return;
    }
    let nvme = tempfile::tempdir().unwrap();
    for precision in [Precision::Fp32, Precision::Bf16] {
        // Stage 0 and 1 on one rank take the pinned pipeline into the variables; stage 3 and two
        // ranks the general host path. The CPU AdamW and the kernel share their arithmetic. At
        // stage 3 the shards of offloaded blocks stay on the GPU, or (parameter offload) go to
        // page-locked memory uploaded on the copy stream (one rank) or to host memory / NVMe files.
        for (world, stage) in [(1, 0), (1, 1), (1, 3), (2, 2), (2, 3)] {
            let reference = train(world, stage, precision, true, 0..STEPS, None);
            // The fourth: three tiers (device, host, NVMe).
            let mut runs = vec![(Offload::Cpu, 1.0, 1.0, Offload::None), (Offload::Cpu, 0.5, 0.5, Offload::None), (Offload::Nvme, 1.0, 1.0, Offload::None), (Offload::Nvme, 0.8, 0.4, Offload::None)];
            if stage == 3 {
                runs.extend([(Offload::Cpu, 1.0, 1.0, Offload::Cpu), (Offload::Nvme, 1.0, 1.0, Offload::Nvme)]);
            }
            for (tier, ratio, q, params) in runs {
                let got = train_offloaded(world, stage, precision, true, 0..STEPS, None, Some((tier, ratio, q, nvme.path(), params)));
                assert_bitwise(&format!("{precision:?} world {world} stage {stage} {tier} ratio {ratio} nvme {q} params {params} vs device state"), &got, &reference);
            }
        }
    }
}

#[test]
fn a_checkpoint_resumes_on_the_gpu() {
    if gpu_or_skip("a_checkpoint_resumes_on_the_gpu").is_none() {
        return;
    }
    for (world, stage) in [(1, 0), (2, 2), (2, 3)] {
        let dir = tempfile::tempdir().unwrap();
        let whole = train(world, stage, Precision::Fp32, true, 0..STEPS, None);
        let first = train(world, stage, Precision::Fp32, true, 0..3, Some((dir.path(), false)));
        let rest = train(world, stage, Precision::Fp32, true, 3..STEPS, Some((dir.path(), true)));
        let resumed: Vec<f64> = first.into_iter().chain(rest).collect();
        assert_bitwise(&format!("world {world} stage {stage}: resumed vs uninterrupted on the GPU"), &resumed, &whole);
    }
}
