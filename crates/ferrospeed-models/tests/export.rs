//! Export round trip: a sharded checkpoint exported to one safetensors file and loaded with
//! `load_consolidated` gives back the master weights bit for bit, at another world size and stage.

mod support;

use candle_core::Device;
use ferrospeed::checkpoint::{self, SaveRequest};
use ferrospeed::comm::run_local_world;
use ferrospeed::engine::{Engine, EngineConfig};
use ferrospeed::precision::Precision;
use ferrospeed::{CommConfig, Communicator};
use ferrospeed_models::gpt::hf_name;
use ferrospeed_models::{BatchSampler, Gpt, GptConfig};
use std::sync::Arc;
use support::{batches, bits32};

const CFG: GptConfig = GptConfig { n_layer: 2, n_head: 2, d_model: 32, seq_len: 16, vocab_size: 256 };

fn config(stage: u8) -> EngineConfig {
    support::engine_config(stage, Precision::Fp32, true, 3)
}

/// Every block's master weights over the whole flat buffer (real elements), gathered from all ranks.
fn full_masters(engines: &[(usize, Vec<(usize, Vec<f32>)>)], numels: &[usize]) -> Vec<Vec<f32>> {
    let mut out: Vec<Vec<f32>> = numels.iter().map(|n| vec![f32::NAN; *n]).collect();
    for (_, blocks) in engines {
        for (b, (offset, master)) in blocks.iter().enumerate() {
            for (i, v) in master.iter().enumerate() {
                if offset + i < numels[b] {
                    out[b][offset + i] = *v;
                }
            }
        }
    }
    out
}

#[test]
fn export_and_load_consolidated_round_trip_bit_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("ck");
    let corpus = support::corpus("Fearless concurrency is a goal of Rust. ", 50);
    // Train 3 steps on 2 ranks at stage 3 and save.
    let trained = run_local_world(2, &CommConfig::default(), |comm| {
        let rank = comm.rank();
        let mut engine = Engine::new(Gpt::new(CFG).model().unwrap(), Arc::new(comm), config(3)).unwrap();
        let sampler = BatchSampler { seed: 3, seq_len: 16, micro_batch: 2, accumulation: 1, world_size: 2, rank };
        for step in 0..3 {
            engine.train_step_at(&batches(&sampler, &corpus, step, &Device::Cpu), 1e-3).unwrap();
        }
        checkpoint::save(&mut engine, &SaveRequest { root: &root, samples: 12, keep: 2, keep_best: false, run: serde_json::Value::Null }).unwrap();
        (rank, (0..4).map(|b| (engine.master(b).0, engine.master(b).1.to_vec())).collect::<Vec<_>>())
    })
    .unwrap();
    let out = dir.path().join("model.safetensors");
    let stats = checkpoint::export(&checkpoint::latest(&root).unwrap().unwrap(), &out, &hf_name).unwrap();
    assert_eq!(stats.tensors, 4 + 2 * 12);
    // Load it on 3 ranks at stage 1.
    let loaded = run_local_world(3, &CommConfig::default(), |comm| {
        let rank = comm.rank();
        let mut engine = Engine::new(Gpt::new(CFG).model().unwrap(), Arc::new(comm), config(1)).unwrap();
        checkpoint::load_consolidated(&mut engine, &out, &hf_name, checkpoint::ImportScope::All).unwrap();
        (rank, (0..4).map(|b| (engine.master(b).0, engine.master(b).1.to_vec())).collect::<Vec<_>>())
    })
    .unwrap();
    let model = Gpt::new(CFG).model().unwrap();
    let numels: Vec<usize> = (0..4).map(|b| model.own_params(b).iter().map(|p| p.numel()).sum()).collect();
    let (a, b) = (full_masters(&trained, &numels), full_masters(&loaded, &numels));
    for (block, (x, y)) in a.iter().zip(&b).enumerate() {
        assert_eq!(bits32(x), bits32(y), "block {block}");
    }
}
