//! The engine on the GPT model in one process: activation checkpointing changes no bit, and gradient
//! accumulation matches a bigger micro-batch.

use candle_core::{Device, Tensor};
use ferrospeed::comm::TcpCommunicator;
use ferrospeed::engine::{Batch, Engine, EngineConfig};
use ferrospeed::optim::{AdamW, LrSchedule};
use ferrospeed::{CommConfig, WorldInfo};
use ferrospeed_models::{BatchSampler, Gpt, GptConfig, TextCorpus};
use std::sync::Arc;

const CFG: GptConfig = GptConfig { n_layer: 2, n_head: 2, d_model: 32, seq_len: 16, vocab_size: 256 };

fn corpus() -> TextCorpus {
    let text = "Ownership is Rust's most unique feature and has deep implications for the rest of the language. ";
    TextCorpus::from_bytes(text.repeat(40).into_bytes())
}

/// Per-step losses of `steps` steps at world size 1 with the given micro-batch and accumulation.
fn losses(micro: usize, accumulation: usize, checkpointing: bool, steps: usize) -> Vec<f64> {
    let comm = Arc::new(TcpCommunicator::connect(&WorldInfo::single(), &CommConfig::default()).unwrap());
    let cfg = EngineConfig::fp32(checkpointing, 1.0, AdamW { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 }, 5);
    let mut engine = Engine::new(Gpt::new(CFG).model().unwrap(), comm, cfg).unwrap();
    let sampler = BatchSampler { seed: 5, seq_len: CFG.seq_len, micro_batch: micro, accumulation, world_size: 1, rank: 0 };
    let schedule = LrSchedule { lr: 3e-3, min_lr: 3e-4, warmup: 2, total: steps };
    let corpus = corpus();
    (0..steps)
        .map(|step| {
            let batches: Vec<Batch> = sampler
                .micro_batches(&corpus, step as u64)
                .into_iter()
                .map(|mb| Batch {
                    tokens: Tensor::from_vec(mb.tokens, (micro, CFG.seq_len), &Device::Cpu).unwrap(),
                    targets: Tensor::from_vec(mb.targets, (micro, CFG.seq_len), &Device::Cpu).unwrap(),
                })
                .collect();
            engine.train_step(&batches, schedule.at(step)).unwrap().loss
        })
        .collect()
}

#[test]
fn activation_checkpointing_gives_bitwise_identical_losses() {
    let on = losses(2, 2, true, 6);
    let off = losses(2, 2, false, 6);
    assert_eq!(on.iter().map(|l| l.to_bits()).collect::<Vec<_>>(), off.iter().map(|l| l.to_bits()).collect::<Vec<_>>());
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
