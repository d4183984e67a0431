//! The engine on the GPT model in one process: activation checkpointing changes no bit, and gradient
//! accumulation matches a bigger micro-batch.

mod support;

use candle_core::Device;
use ferrospeed::comm::TcpCommunicator;
use ferrospeed::engine::Engine;
use ferrospeed::optim::LrSchedule;
use ferrospeed::precision::Precision;
use ferrospeed::{CommConfig, WorldInfo};
use ferrospeed_models::{BatchSampler, Gpt, GptConfig};
use std::sync::Arc;
use support::{batches, bits};

const CFG: GptConfig = GptConfig { n_layer: 2, n_head: 2, d_model: 32, seq_len: 16, vocab_size: 256 };

/// Per-step losses of `steps` steps at world size 1 with the given micro-batch and accumulation.
fn losses(micro: usize, accumulation: usize, checkpointing: bool, steps: usize) -> Vec<f64> {
    let comm = Arc::new(TcpCommunicator::connect(&WorldInfo::single(), &CommConfig::default()).unwrap());
    let cfg = support::engine_config(0, Precision::Fp32, checkpointing, 5);
    let mut engine = Engine::new(Gpt::new(CFG).model().unwrap(), comm, cfg).unwrap();
    let sampler = BatchSampler { seed: 5, seq_len: CFG.seq_len, micro_batch: micro, accumulation, world_size: 1, rank: 0 };
    let schedule = LrSchedule { lr: 3e-3, min_lr: 3e-4, warmup: 2, total: steps };
    let corpus = support::corpus("Ownership is Rust's most unique feature and has deep implications for the rest of the language. ", 40);
    (0..steps).map(|step| engine.train_step_at(&batches(&sampler, &corpus, step, &Device::Cpu), schedule.at(step)).unwrap().loss).collect()
}

#[test]
fn activation_checkpointing_gives_bitwise_identical_losses() {
    let on = losses(2, 2, true, 6);
    let off = losses(2, 2, false, 6);
    assert_eq!(bits(&on), bits(&off));
    assert!(on[5] < on[0], "the loss falls: {on:?}");
}

#[test]
fn accumulating_four_micro_batches_of_one_matches_one_of_four() {
    let one_by_four = losses(4, 1, true, 8);
    let four_by_one = losses(1, 4, true, 8);
    for (step, (a, b)) in one_by_four.iter().zip(&four_by_one).enumerate() {
        assert!(((a - b) / a).abs() < 1e-5, "step {step}: {a} vs {b}");
    }
}
