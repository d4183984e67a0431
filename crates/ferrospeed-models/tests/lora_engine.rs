//! LoRA through the engine, ranks as threads: the frozen base is a placement like the others — losses
//! bitwise equal across ZeRO stages 0–3 (fp32 and bf16) and with the optimizer offloaded, world 1 vs 2
//! within 1e-5, the base bitwise unchanged after training while the adapters move, gradients and
//! optimizer state for the adapters alone, and a resumed run bitwise an uninterrupted one (the
//! checkpoint holds the adapters; the base comes back from its source).

mod support;

use candle_core::Device;
use ferrospeed::comm::run_local_world;
use ferrospeed::engine::{Batch, Engine, EngineConfig, MemoryReport, Model};
use ferrospeed::optim::LrSchedule;
use ferrospeed::precision::Precision;
use ferrospeed::shard::Offload;
use ferrospeed::{CommConfig, Communicator};
use ferrospeed_models::llama::LlamaLora;
use ferrospeed_models::ops::lora::{resolve_targets, LoraShape};
use ferrospeed_models::{BatchSampler, Llama, LlamaConfig, TextCorpus};
use std::path::Path;
use std::sync::Arc;
use support::{bits, bits32};

const STEPS: usize = 4;

fn cfg() -> LlamaConfig {
    LlamaConfig { tie_word_embeddings: true, ..LlamaConfig::tiny(2, 32, 4, 2, 256, 16) }
}

fn model() -> Model {
    let targets = resolve_targets(2, &["all-linear".to_string()]).unwrap();
    Llama::with_lora(cfg(), LlamaLora { shape: LoraShape { r: 4, alpha: 8.0, rslora: false }, targets }).unwrap().model().unwrap()
}

fn corpus() -> TextCorpus {
    support::corpus("Adapters train; the base stays exactly where it was. Every rank issues the same collectives. ", 40)
}

#[derive(Clone, Copy, Debug)]
struct Run {
    world: usize,
    stage: u8,
    precision: Precision,
    offload: Offload,
}

fn config(run: Run) -> EngineConfig {
    let mut c = support::engine_config(run.stage, run.precision, false, 7);
    c.strategy.offload_optimizer = run.offload;
    c
}

fn batches(sampler: &BatchSampler, corpus: &TextCorpus, step: usize) -> Vec<Batch> {
    support::batches(sampler, corpus, step, &Device::Cpu)
}

/// What one rank saw: the losses of steps `from..to`, its frozen values before and after, its
/// adapters' master weights after, and its memory report.
struct Seen {
    losses: Vec<f64>,
    frozen_before: Vec<Vec<u32>>,
    frozen_after: Vec<Vec<u32>>,
    master_after: Vec<Vec<u32>>,
    memory: MemoryReport,
}

fn frozen(engine: &Engine) -> Vec<Vec<u32>> {
    (0..engine.model().num_blocks()).map(|i| bits32(&engine.frozen_values(i).unwrap().1)).collect()
}

/// Train steps `from..to` (after loading `resume`, if given), then call `finish` on each rank's engine.
fn train(run: Run, from: usize, to: usize, resume: Option<&Path>, finish: impl Fn(&mut Engine) + Sync) -> Vec<Seen> {
    let corpus = corpus();
    run_local_world(run.world, &CommConfig::default(), |comm| {
        let rank = comm.rank();
        let mut engine = Engine::new(model(), Arc::new(comm), config(run)).unwrap();
        if let Some(dir) = resume {
            ferrospeed::checkpoint::load_into(&mut engine, dir).unwrap();
        }
        let frozen_before = frozen(&engine);
        // A global batch of 2 at any world size.
        let sampler = BatchSampler { seed: 7, seq_len: 16, micro_batch: 1, accumulation: 2 / run.world, world_size: run.world, rank };
        let schedule = LrSchedule { lr: 1e-2, min_lr: 1e-3, warmup: 1, total: STEPS };
        let mut losses = Vec::new();
        for step in from..to {
            losses.push(engine.train_step_at(&batches(&sampler, &corpus, step), schedule.at(step)).unwrap().loss);
        }
        let memory = engine.memory();
        let master_after = (0..engine.model().num_blocks()).map(|i| bits32(engine.master(i).1)).collect();
        finish(&mut engine);
        Seen { losses, frozen_before, frozen_after: frozen(&engine), master_after, memory }
    })
    .unwrap()
}

const FP32: Run = Run { world: 1, stage: 0, precision: Precision::Fp32, offload: Offload::None };

#[test]
fn stages_offload_and_world_sizes_agree_and_the_base_never_moves() {
    let reference = train(FP32, 0, STEPS, None, |_| {});
    let r0 = &reference[0];
    assert!(r0.losses.iter().all(|l| l.is_finite()) && r0.losses[STEPS - 1] < r0.losses[0], "the adapters learn: {:?}", r0.losses);
    assert_eq!(r0.frozen_after, r0.frozen_before, "training changed the frozen base");
    assert!(r0.frozen_before.iter().map(Vec::len).sum::<usize>() >= model().num_frozen_params());
    // The adapters moved: B starts at zero and is not zero now.
    assert!(r0.master_after.iter().flatten().any(|&b| b != 0), "the adapters did not train");
    for world in [1, 2] {
        let base = train(Run { world, ..FP32 }, 0, STEPS, None, |_| {});
        if world == 2 {
            for (a, b) in base[0].losses.iter().zip(&r0.losses) {
                assert!((a - b).abs() <= 1e-5 * b.abs(), "world 2 vs 1: {a} vs {b}");
            }
        }
        for stage in 1..=3u8 {
            for offload in [Offload::None, Offload::Cpu] {
                let run = Run { world, stage, offload, ..FP32 };
                let got = train(run, 0, STEPS, None, |_| {});
                assert_eq!(bits(&got[0].losses), bits(&base[0].losses), "{run:?} vs stage 0");
                for (r, s) in got.iter().enumerate() {
                    assert_eq!(s.frozen_after, s.frozen_before, "{run:?} rank {r}: training changed the frozen base");
                }
            }
        }
    }
    // bf16: the base rounded once to the compute dtype, stages still bitwise.
    let bf = |stage| train(Run { stage, world: 2, precision: Precision::Bf16, ..FP32 }, 0, STEPS, None, |_| {});
    let (s0, s3) = (bf(0), bf(3));
    assert_eq!(bits(&s0[0].losses), bits(&s3[0].losses), "bf16 stage 3 vs 0");
    assert_eq!(s3[1].frozen_after, s3[1].frozen_before);
}

#[test]
fn gradients_and_optimizer_state_are_the_adapters_alone() {
    let model = model();
    let (trainable, frozen) = (model.num_params(), model.num_frozen_params());
    assert!(trainable > 0 && frozen > 5 * trainable, "{trainable} trainable, {frozen} frozen");
    let m = &train(FP32, 0, 1, None, |_| {})[0].memory;
    // fp32 gradients and master weights (padded per block) for the adapters; the base in the compute dtype.
    assert!(m.grads >= 4 * trainable && m.grads < 4 * trainable + 4 * 64 * model.num_blocks(), "{m:?}");
    assert!(m.frozen >= 4 * frozen && m.frozen < 4 * frozen + 4 * 64 * model.num_blocks(), "{m:?}");
    let m3 = &train(Run { world: 2, stage: 3, ..FP32 }, 0, 1, None, |_| {})[1].memory;
    assert!(m3.frozen < m.frozen * 6 / 10, "stage 3 shards the base: {} of {}", m3.frozen, m.frozen);
}

#[test]
fn a_resumed_run_is_bitwise_an_uninterrupted_one() {
    let ck = tempfile::tempdir().unwrap();
    for run in [FP32, Run { world: 2, stage: 3, ..FP32 }] {
        let whole = train(run, 0, STEPS, None, |_| {});
        let dir = std::sync::Mutex::new(None);
        train(run, 0, 2, None, |engine| {
            let req = ferrospeed::checkpoint::SaveRequest { root: ck.path(), samples: 0, keep: 1, keep_best: false, run: serde_json::Value::Null };
            let d = ferrospeed::checkpoint::save(engine, &req).unwrap();
            *dir.lock().unwrap() = Some(d);
        });
        let dir = dir.into_inner().unwrap().unwrap();
        // The checkpoint holds the adapters: its blocks' layouts cover the trainable parameters alone.
        let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("meta.json")).unwrap()).unwrap();
        let text = meta.to_string();
        assert!(text.contains("lora_A") && !text.contains("q_proj.weight\""), "{run:?}: the checkpoint names {text}");
        let resumed = train(run, 2, STEPS, Some(&dir), |_| {});
        assert_eq!(bits(&resumed[0].losses), bits(&whole[0].losses[2..]), "{run:?}: resumed vs uninterrupted");
        assert_eq!(resumed[0].master_after, whole[0].master_after, "{run:?}");
    }
}

/// QLoRA: the base's linear weights in NF4, dequantised at each use.
#[test]
fn an_nf4_base_computes_with_its_dequantised_weights_in_half_a_byte_a_weight() {
    let nf4 = |stage: u8, world: usize| {
        let corpus = corpus();
        run_local_world(world, &CommConfig::default(), move |comm| {
            let rank = comm.rank();
            let mut c = config(Run { world, stage, ..FP32 });
            c.frozen_nf4 = true;
            let mut engine = Engine::new(model(), Arc::new(comm), c).unwrap();
            let before = frozen(&engine);
            let sampler = BatchSampler { seed: 7, seq_len: 16, micro_batch: 1, accumulation: 2 / world, world_size: world, rank };
            let schedule = LrSchedule { lr: 1e-2, min_lr: 1e-3, warmup: 1, total: STEPS };
            let losses: Vec<f64> = (0..STEPS).map(|s| engine.train_step_at(&batches(&sampler, &corpus, s), schedule.at(s)).unwrap().loss).collect();
            // The dequantised base, as blocks compute with it, per block.
            let dequantised: Vec<Vec<f32>> = (0..engine.model().num_blocks()).map(|i| engine.frozen_values(i).unwrap().1).collect();
            (losses, before == frozen(&engine), dequantised, engine.memory())
        })
        .unwrap()
    };
    let s0 = nf4(0, 1);
    let (losses, unchanged, dequantised, memory) = &s0[0];
    assert!(*unchanged && losses.iter().all(|l| l.is_finite()), "{losses:?}");
    let dense = &train(FP32, 0, 1, None, |_| {})[0].memory;
    // The linear weights at 4 bits and a byte of scale per 64 values (plus the 256-blocks' f32 scales),
    // the rest as it was.
    let m = model();
    let linear: usize = (0..m.num_blocks()).flat_map(|b| m.frozen_params(b).to_vec()).filter(|s| s.linear).map(|s| s.numel()).sum();
    let want = dense.frozen - 4 * linear + linear / 2 + linear / 64;
    assert!(memory.frozen >= want && memory.frozen <= want + linear / 64, "NF4 holds {} bytes of base, fp32 {} ({linear} linear values)", memory.frozen, dense.frozen);
    for (stage, world) in [(1, 1), (2, 1), (0, 2), (2, 2)] {
        let got = nf4(stage, world);
        let close = got[0].0.iter().zip(losses).all(|(a, b)| if world == 1 { a.to_bits() == b.to_bits() } else { (a - b).abs() <= 1e-5 * b.abs() });
        assert!(close, "NF4 stage {stage} world {world}: {:?} vs {losses:?}", got[0].0);
    }
    // The same run on a dense base holding the dequantised values: the same bits.
    let corpus = corpus();
    let reference = run_local_world(1, &CommConfig::default(), |comm| {
        let mut engine = Engine::new(model(), Arc::new(comm), config(FP32)).unwrap();
        let names = engine.model().block_names().to_vec();
        engine
            .overwrite_frozen(|w| -> Result<(), ferrospeed::engine::EngineError> {
                let i = names.iter().position(|n| n == w.block).unwrap();
                w.values.copy_from_slice(&dequantised[i]);
                Ok(())
            })
            .unwrap();
        let sampler = BatchSampler { seed: 7, seq_len: 16, micro_batch: 1, accumulation: 2, world_size: 1, rank: 0 };
        let schedule = LrSchedule { lr: 1e-2, min_lr: 1e-3, warmup: 1, total: STEPS };
        (0..STEPS).map(|s| engine.train_step_at(&batches(&sampler, &corpus, s), schedule.at(s)).unwrap().loss).collect::<Vec<f64>>()
    })
    .unwrap();
    assert_eq!(bits(&reference[0]), bits(losses), "NF4 base vs a dense base of its dequantised values");
    // Far from the undequantised base: the quantisation is real.
    let plain = &train(FP32, 0, STEPS, None, |_| {})[0].losses;
    assert!(plain.iter().zip(losses).any(|(a, b)| a != b));
}
