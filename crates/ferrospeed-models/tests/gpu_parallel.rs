//! Tensor and context parallelism on one GPU (ranks as threads sharing GPU 0, their collectives
//! through the host): a Llama with head dimension 32, packed documents with a loss mask, against one
//! rank on the same GPU — fp32 (composed attention) within 1e-5 for tp 2, tp 2 with sp, Ulysses and
//! ring at cp 2; bf16, where Ulysses runs the fused attention kernels over each rank's heads of the
//! whole sequence and tp over its heads' share, within 1e-2 (bf16's rounding of the partial sums);
//! ring attention in bf16 within 1e-2 too (its partials run composed in f32). Where no GPU can be
//! used the test prints the skip line of the GPU scripts and returns.
#![cfg(feature = "cuda")]

mod support;

use candle_core::{Device, Tensor};
use ferrospeed::comm::run_local_world;
use ferrospeed::engine::Batch;
use ferrospeed::optim::LrSchedule;
use ferrospeed::precision::Precision;
use ferrospeed::CommConfig;
use ferrospeed_models::{BatchSampler, Llama, LlamaConfig, TextCorpus};
use std::sync::Arc;
use support::gpu_or_skip;

const STEPS: usize = 3;

fn cfg() -> LlamaConfig {
    LlamaConfig::tiny(2, 128, 4, 4, 256, 64)
}

/// Packed documents (positions restart every 24 tokens) with every third target masked.
fn packed(sampler: &BatchSampler, corpus: &TextCorpus, step: usize, device: &Device) -> Vec<Batch> {
    support::batches(sampler, corpus, step, device)
        .into_iter()
        .map(|b| {
            let t = sampler.seq_len;
            let positions: Vec<u32> = (0..sampler.micro_batch).flat_map(|_| (0..t as u32).map(|j| j % 24)).collect();
            let mask: Vec<f32> = (0..sampler.micro_batch * t).map(|j| if j % 3 == 0 { 0.0 } else { 1.0 }).collect();
            b.with("positions", Tensor::from_vec(positions, (sampler.micro_batch, t), device).unwrap())
                .with("loss_mask", Tensor::from_vec(mask, (sampler.micro_batch, t), device).unwrap())
        })
        .collect()
}

/// What splits the model over 2 ranks sharing the GPU.
#[derive(Clone, Copy, Debug)]
enum Split {
    One,
    Tp { sp: bool },
    Cp { ring: bool },
}

fn train(split: Split, precision: Precision, gpu: &Device) -> Vec<f64> {
    let corpus = support::corpus("Ranks sharing one GPU split the layers and the sequences. ", 60);
    let world = if matches!(split, Split::One) { 1 } else { 2 };
    run_local_world(world, &CommConfig::default(), |comm| {
        let mut c = support::engine_config(0, precision, false, 5);
        c.device = gpu.clone();
        let model = Llama::new(cfg()).model().unwrap();
        let comm: Arc<dyn ferrospeed::Communicator> = Arc::new(comm);
        let mut engine = match split {
            Split::One => ferrospeed::engine::Engine::new(model, comm, c).unwrap(),
            Split::Tp { sp } => support::engine_with_tp(model, comm, 2, sp, c).unwrap().0,
            Split::Cp { ring } => support::engine_with_cp(model, comm, 2, ring, c).unwrap().0,
        };
        let sampler = BatchSampler { seed: 3, seq_len: 64, micro_batch: 2, accumulation: 2, world_size: 1, rank: 0 };
        let schedule = LrSchedule { lr: 1e-2, min_lr: 1e-3, warmup: 1, total: STEPS };
        (0..STEPS).map(|s| engine.train_step_at(&packed(&sampler, &corpus, s, gpu), schedule.at(s)).unwrap().loss).collect::<Vec<f64>>()
    })
    .unwrap()
    .remove(0)
}

#[test]
fn tensor_and_context_parallel_ranks_sharing_the_gpu_train_like_one_rank() {
    let Some(gpu) = gpu_or_skip("tensor_and_context_parallel_ranks_sharing_the_gpu_train_like_one_rank") else { return };
    let splits = [Split::Tp { sp: false }, Split::Tp { sp: true }, Split::Cp { ring: false }, Split::Cp { ring: true }];
    for (precision, tol) in [(Precision::Fp32, 1e-5), (Precision::Bf16, 1e-2)] {
        let base = train(Split::One, precision, &gpu);
        assert!(base.iter().all(|l| l.is_finite()) && base.last() < base.first(), "{precision:?}: {base:?}");
        for split in splits {
            let got = train(split, precision, &gpu);
            let ok = got.iter().zip(&base).all(|(a, b)| (a - b).abs() <= tol * b.abs());
            assert!(ok, "{precision:?} {split:?} on the GPU {got:?} vs one rank {base:?}");
            eprintln!("{precision:?} {split:?}: {got:?} vs one rank {base:?}");
        }
    }
}
