//! LoRA on a GPU (ranks as threads sharing GPU 0): the frozen base on the device, bf16 losses bitwise
//! across ZeRO stages 0–3 at world 1 and 2, fp32 close to the CPU, the base unchanged after training;
//! NF4 dequantised as on the CPU, alone and into a block's assembled buffer.
//! Where no GPU can be used each test prints the skip line of the GPU scripts and returns.
#![cfg(feature = "cuda")]

mod support;

use candle_core::Device;
use ferrospeed::comm::run_local_world;
use ferrospeed::engine::{Engine, Model};
use ferrospeed::optim::LrSchedule;
use ferrospeed::precision::Precision;
use ferrospeed::{CommConfig, Communicator};
use ferrospeed_models::llama::LlamaLora;
use ferrospeed_models::ops::lora::{resolve_targets, LoraShape};
use ferrospeed_models::{BatchSampler, Llama, LlamaConfig};
use std::sync::Arc;
use support::{batches, bits, bits32, gpu_or_skip};

const STEPS: usize = 4;

fn model() -> Model {
    let cfg = LlamaConfig { tie_word_embeddings: true, ..LlamaConfig::tiny(2, 128, 4, 2, 256, 64) };
    let targets = resolve_targets(2, &["all-linear".to_string()]).unwrap();
    Llama::with_lora(cfg, LlamaLora { shape: LoraShape { r: 8, alpha: 16.0, rslora: false }, targets }).unwrap().model().unwrap()
}

/// Rank 0's losses, and whether every rank's frozen base came out of training as it went in.
fn train(world: usize, stage: u8, precision: Precision, device: &Device) -> (Vec<f64>, bool) {
    train_base(world, stage, precision, device, false)
}

/// [`train`] with the base in NF4 (`nf4`) or the compute dtype.
fn train_base(world: usize, stage: u8, precision: Precision, device: &Device, nf4: bool) -> (Vec<f64>, bool) {
    let corpus = support::corpus("The base is frozen on the device; the adapters train. ", 60);
    let out = run_local_world(world, &CommConfig::default(), |comm| {
        let rank = comm.rank();
        let mut cfg = support::engine_config(stage, precision, false, 3);
        cfg.device = device.clone();
        cfg.frozen_nf4 = nf4;
        let mut engine = Engine::new(model(), Arc::new(comm), cfg).unwrap();
        let frozen = |e: &Engine| (0..e.model().num_blocks()).map(|i| bits32(&e.frozen_values(i).unwrap().1)).collect::<Vec<_>>();
        let before = frozen(&engine);
        let sampler = BatchSampler { seed: 3, seq_len: 64, micro_batch: 2, accumulation: 2 / world, world_size: world, rank };
        let schedule = LrSchedule { lr: 1e-2, min_lr: 1e-3, warmup: 1, total: STEPS };
        let losses: Vec<f64> = (0..STEPS).map(|s| engine.train_step_at(&batches(&sampler, &corpus, s, device), schedule.at(s)).unwrap().loss).collect();
        (losses, frozen(&engine) == before)
    })
    .unwrap();
    (out[0].0.clone(), out.iter().all(|o| o.1))
}

#[test]
fn lora_trains_on_the_gpu_bitwise_across_stages_and_close_to_the_cpu() {
    let Some(gpu) = gpu_or_skip("lora_trains_on_the_gpu_bitwise_across_stages_and_close_to_the_cpu") else { return };
    for world in [1, 2] {
        let (base, same) = train(world, 0, Precision::Bf16, &gpu);
        assert!(same && base.iter().all(|l| l.is_finite()), "world {world}: {base:?}");
        for stage in 1..=3u8 {
            let (got, same) = train(world, stage, Precision::Bf16, &gpu);
            assert_eq!(bits(&got), bits(&base), "bf16 world {world} stage {stage} vs stage 0 on the GPU");
            assert!(same, "world {world} stage {stage}: training changed the frozen base");
        }
    }
    let (gpu32, _) = train(1, 0, Precision::Fp32, &gpu);
    let (cpu32, _) = train(1, 0, Precision::Fp32, &Device::Cpu);
    for (g, c) in gpu32.iter().zip(&cpu32) {
        assert!((g - c).abs() <= 1e-4 * c.abs(), "fp32 GPU vs CPU: {gpu32:?} vs {cpu32:?}");
    }
    eprintln!("lora on the GPU: fp32 {gpu32:?}, CPU {cpu32:?}");
}

#[test]
fn nf4_dequantises_on_the_gpu_as_on_the_cpu_and_qlora_trains_there() {
    let Some(gpu) = gpu_or_skip("nf4_dequantises_on_the_gpu_as_on_the_cpu_and_qlora_trains_there") else { return };
    let cuda = gpu.as_cuda_device().unwrap().clone();
    let mut rng = ferrospeed::rng::Rng::new(4);
    let x: Vec<f32> = (0..64 * 300 + 32).map(|_| (0.05 * rng.normal()) as f32).collect();
    let q = ferrospeed::quant::quantize(&x);
    let mut want = vec![0f32; x.len()];
    ferrospeed::quant::dequantize(&q, &mut want);
    let d = ferrospeed::quant_cuda::DeviceNf4::new(&cuda, &q).unwrap();
    let got32: Vec<f32> = d.dequantize(candle_core::DType::F32, &[x.len()]).unwrap().to_vec1().unwrap();
    assert_eq!(bits32(&got32), bits32(&want), "f32 dequantisation, GPU vs CPU");
    let got16: Vec<f32> = d.dequantize(candle_core::DType::BF16, &[x.len()]).unwrap().to_dtype(candle_core::DType::F32).unwrap().to_vec1().unwrap();
    let want16: Vec<f32> = want.iter().map(|v| half::bf16::from_f32(*v).to_f32()).collect();
    assert_eq!(bits32(&got16), bits32(&want16), "bf16 dequantisation, GPU vs CPU");
    // A block's buffer assembled: a dense tensor at 0, a gap, the NF4 weight after it (eight values a
    // thread), then a short weight of 1,001 values at an odd offset (one a thread), a padded tail.
    let dense: Vec<f32> = (0..100).map(|i| i as f32 * 0.25).collect();
    let dense_t = candle_core::Tensor::from_vec(dense.clone(), 100, &gpu).unwrap().to_dtype(candle_core::DType::BF16).unwrap();
    let q2 = ferrospeed::quant::quantize(&x[..1001]);
    let mut want2 = vec![0f32; 1001];
    ferrospeed::quant::dequantize(&q2, &mut want2);
    let d2 = ferrospeed::quant_cuda::DeviceNf4::new(&cuda, &q2).unwrap();
    let at2 = 128 + x.len() + 3;
    let len = at2 + 1001 + 7;
    let all = ferrospeed::quant_cuda::assemble(&cuda, candle_core::DType::BF16, len, &[(0, &dense_t)], &[(128, &d), (at2, &d2)]).unwrap();
    let all: Vec<f32> = all.to_dtype(candle_core::DType::F32).unwrap().to_vec1().unwrap();
    let mut expect = vec![0f32; len];
    expect[..100].copy_from_slice(&dense);
    expect[128..128 + x.len()].copy_from_slice(&want16);
    for (e, w) in expect[at2..at2 + 1001].iter_mut().zip(&want2) {
        *e = half::bf16::from_f32(*w).to_f32();
    }
    assert_eq!(bits32(&all), bits32(&expect), "assembled bf16 buffer: dense part, zeroed gaps, dequantised weights");
    // QLoRA on the GPU: bf16 stages 0 and 2 bitwise, fp32 close to the CPU's NF4 run.
    let (s0, same) = train_base(1, 0, Precision::Bf16, &gpu, true);
    let (s2, _) = train_base(1, 2, Precision::Bf16, &gpu, true);
    assert!(same && s0.iter().all(|l| l.is_finite()), "{s0:?}");
    assert_eq!(bits(&s2), bits(&s0), "NF4 base, bf16 stage 2 vs 0 on the GPU");
    let (g32, _) = train_base(1, 0, Precision::Fp32, &gpu, true);
    let (c32, _) = train_base(1, 0, Precision::Fp32, &Device::Cpu, true);
    for (g, c) in g32.iter().zip(&c32) {
        assert!((g - c).abs() <= 1e-4 * c.abs(), "NF4 fp32 GPU vs CPU: {g32:?} vs {c32:?}");
    }
}
