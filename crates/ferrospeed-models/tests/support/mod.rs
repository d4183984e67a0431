//! What the GPT test files share: a corpus, the batches of one sampler step, bit patterns of losses,
//! the engine configuration they train with, an engine with expert groups, seeded random tensors, and
//! (feature `cuda`) the GPU probe that follows the skip protocol the GPU scripts count.
#![allow(dead_code)]

pub mod fd;

use candle_core::{Device, Tensor};
use ferrospeed::config::ZeroStage;
use ferrospeed::engine::{Batch, EngineConfig};
use ferrospeed::optim::AdamW;
use ferrospeed::precision::{LossScalerConfig, Precision};
use ferrospeed::rng::Rng;
use ferrospeed::shard::Strategy;
use ferrospeed_models::{BatchSampler, TextCorpus};

/// Whether the gradients `got` match `want` (each `w0 − w1` of one SGD step at a learning rate of 1):
/// within `tol` of the largest, plus the rounding of `w1` (two ulps of the largest weight of `w0`, the
/// measurement's own error). An error naming the gap where not, or where `want` is all zero.
pub fn gradients_match(want: &[f32], got: &[f32], w0: &[f32], tol: f32) -> Result<(), String> {
    let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
    let ulp = w0.iter().fold(0f32, |m, x| m.max(x.abs())) * f32::EPSILON;
    let worst = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    if scale == 0.0 || got.len() != want.len() {
        return Err(format!("no gradient to compare ({} values, largest {scale})", want.len()));
    }
    if worst > tol * scale + 2.0 * ulp {
        return Err(format!("off by {worst} (largest {scale})"));
    }
    Ok(())
}

/// The engine of one rank of `comm`'s world for `model` split over tensor-parallel groups of `tp`
/// and each sequence over context-parallel groups of `cp` (`ring`: ring attention), data parallel over
/// the rest; and this rank's (data-parallel rank, data-parallel size).
pub fn engine_with_tp_cp(model: ferrospeed::engine::Model, comm: std::sync::Arc<dyn ferrospeed::Communicator>, tp: usize, cp: usize, ring: bool, cfg: EngineConfig) -> Result<(ferrospeed::engine::Engine, (usize, usize)), ferrospeed::engine::EngineError> {
    use ferrospeed::engine::{CommWorker, ContextGroup, Engine, TensorGroup};
    use ferrospeed::parallel::{Axis, Mesh, MeshComms};
    use std::sync::Arc;
    let world = comm.world_size();
    let mesh = Mesh::new(world, 1, tp, cp, 1).map_err(|e| ferrospeed::engine::EngineError::Model(e.to_string()))?;
    let c = mesh.coords(comm.rank());
    let comms = MeshComms::new(comm.clone(), mesh)?;
    let (group, context) = (TensorGroup::new(comms.get(Axis::Tp).clone()), ContextGroup::new(comms.get(Axis::Cp).clone()).with_ring(ring));
    let dp_cp = Arc::new(CommWorker::spawn(comms.get(Axis::DpCp).clone()));
    let engine = Engine::with_tensors_and_context(model, dp_cp, Arc::new(CommWorker::spawn(comm)), group, context, cfg)?;
    Ok((engine, (c.dp, world / (tp * cp))))
}

/// The engine of one rank of `comm`'s world for `model`, each sequence split over context-parallel
/// groups of `cp` adjacent ranks (`cp = 1`: a plain engine; `ring`: ring attention, else Ulysses),
/// data parallel over the rest; and this
/// rank's (data-parallel rank, data-parallel size).
pub fn engine_with_cp(model: ferrospeed::engine::Model, comm: std::sync::Arc<dyn ferrospeed::Communicator>, cp: usize, ring: bool, cfg: EngineConfig) -> Result<(ferrospeed::engine::Engine, (usize, usize)), ferrospeed::engine::EngineError> {
    use ferrospeed::engine::{CommWorker, ContextGroup, Engine};
    use ferrospeed::parallel::{Axis, Mesh, MeshComms};
    use std::sync::Arc;
    let (world, rank) = (comm.world_size(), comm.rank());
    if cp == 1 {
        return Ok((Engine::new(model, comm, cfg)?, (rank, world)));
    }
    let mesh = Mesh::new(world, 1, 1, cp, 1).map_err(|e| ferrospeed::engine::EngineError::Model(e.to_string()))?;
    let c = mesh.coords(rank);
    let comms = MeshComms::new(comm.clone(), mesh)?;
    let group = ContextGroup::new(comms.get(Axis::Cp).clone()).with_ring(ring);
    let engine = Engine::with_context(model, Arc::new(CommWorker::spawn(comm)), group, cfg)?;
    Ok((engine, (c.dp, world / cp)))
}

/// The engine of one rank of `comm`'s world for `model`, its blocks split over tensor-parallel groups
/// of `tp` adjacent ranks (`tp = 1`: a plain engine; `sp`: with sequence parallelism), data parallel
/// over the rest; and this rank's
/// (data-parallel rank, data-parallel size, tensor-parallel rank).
pub fn engine_with_tp(model: ferrospeed::engine::Model, comm: std::sync::Arc<dyn ferrospeed::Communicator>, tp: usize, sp: bool, cfg: EngineConfig) -> Result<(ferrospeed::engine::Engine, (usize, usize, usize)), ferrospeed::engine::EngineError> {
    use ferrospeed::engine::{CommWorker, Engine, TensorGroup};
    use ferrospeed::parallel::{Axis, Mesh, MeshComms};
    use std::sync::Arc;
    let (world, rank) = (comm.world_size(), comm.rank());
    if tp == 1 {
        return Ok((Engine::new(model, comm, cfg)?, (rank, world, 0)));
    }
    let mesh = Mesh::new(world, 1, tp, 1, 1).map_err(|e| ferrospeed::engine::EngineError::Model(e.to_string()))?;
    let c = mesh.coords(rank);
    let comms = MeshComms::new(comm.clone(), mesh)?;
    let group = TensorGroup::new(comms.get(Axis::Tp).clone()).with_sequence_parallel(sp);
    let dp = Arc::new(CommWorker::spawn(comms.get(Axis::Dp).clone()));
    let engine = Engine::with_tensors(model, dp, Arc::new(CommWorker::spawn(comm)), group, cfg)?;
    Ok((engine, (c.dp, world / tp, c.tp)))
}

/// The engine of one rank of `comm`'s world for `model`, with expert groups of `ep` ranks (`ep = 1`:
/// a plain engine).
pub fn engine_with_ep(model: ferrospeed::engine::Model, comm: std::sync::Arc<dyn ferrospeed::Communicator>, ep: usize, cfg: EngineConfig) -> Result<ferrospeed::engine::Engine, ferrospeed::engine::EngineError> {
    use ferrospeed::engine::{CommWorker, Engine, ExpertGroup};
    use ferrospeed::parallel::{Axis, Mesh, MeshComms};
    use std::sync::Arc;
    if ep == 1 {
        return Engine::new(model, comm, cfg);
    }
    let world = comm.world_size();
    let mesh = MeshComms::new(comm.clone(), Mesh::new(world, 1, 1, 1, ep).map_err(|e| ferrospeed::engine::EngineError::Model(e.to_string()))?)?;
    let group = ExpertGroup::new(mesh.get(Axis::Ep).clone());
    let edp = Arc::new(CommWorker::spawn(mesh.get(Axis::Edp).clone()));
    Engine::with_experts(model, Arc::new(CommWorker::spawn(comm)), group, edp, cfg)
}

/// `gen`'s logits for every position of `row` as `generate` computes them: the first half as the
/// prompt, then one token at a time against the key/value cache.
pub fn cached_logits(gen: &dyn ferrospeed_models::infer::Generator, row: &[u32]) -> Vec<f32> {
    let mut cache = ferrospeed_models::infer::KvCache::default();
    let t = row.len();
    let mut got: Vec<f32> = gen.forward(&row[..t / 2], &mut cache).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    for &tok in &row[t / 2..] {
        got.extend(gen.forward(&[tok], &mut cache).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap());
    }
    got
}

/// The small Qwen2-MoE-like model the engine tests of mixtures of experts train: 3 layers of width 32,
/// the first dense, 4 experts of width 24 (top 2) and a shared expert of 32 in the others, the
/// load-balancing loss on; `norm_topk_prob` and the z-loss as given.
pub fn tiny_moe(norm_topk_prob: bool, z_loss_coef: f64) -> ferrospeed_models::LlamaConfig {
    use ferrospeed_models::llama::MoeConfig;
    let moe = MoeConfig { num_experts: 4, top_k: 2, d_expert: 24, norm_topk_prob, d_shared: 32, sparse_step: 1, first_dense: 0, mlp_only: 0b1, aux_coef: 0.05, aux_loss: true, z_loss_coef, capacity_factor: None };
    ferrospeed_models::LlamaConfig { moe: Some(moe), ..ferrospeed_models::LlamaConfig::tiny(3, 32, 4, 2, 256, 16) }
}

/// The optimizer every engine test trains with.
pub const ADAMW: AdamW = AdamW { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };

/// A byte corpus of `sentence` repeated `times` times (long enough for many distinct windows).
pub fn corpus(sentence: &str, times: usize) -> TextCorpus {
    TextCorpus::from_bytes(sentence.repeat(times).into_bytes())
}

/// The micro-batches of `sampler` at `step`, as `[micro_batch, seq_len]` tensors on `device`.
pub fn batches(sampler: &BatchSampler, corpus: &TextCorpus, step: usize, device: &Device) -> Vec<Batch> {
    let shape = (sampler.micro_batch, sampler.seq_len);
    sampler
        .micro_batches(corpus, step as u64)
        .into_iter()
        .map(|mb| Batch::tokens(Tensor::from_vec(mb.tokens, shape, device).unwrap(), Tensor::from_vec(mb.targets, shape, device).unwrap()))
        .collect()
}

/// The bit patterns of `v`, so that `assert_eq!` on them means bitwise identical.
pub fn bits(v: &[f64]) -> Vec<u64> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// The bit patterns of f32 values (master weights).
pub fn bits32(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// The engine configuration of the tests: AdamW as above, clipping at 1, ZeRO `stage`, `precision`
/// (fp16 with a dynamic loss scale starting at 1024), on the CPU. Callers change the rest.
pub fn engine_config(stage: u8, precision: Precision, checkpointing: bool, seed: u64) -> EngineConfig {
    let mut cfg = EngineConfig::fp32(checkpointing, 1.0, ADAMW, seed);
    cfg.strategy = Strategy::new(ZeroStage::from_int(stage.into()).unwrap());
    cfg.precision = precision;
    if precision == Precision::Fp16 {
        cfg.loss_scaler = Some(LossScalerConfig { initial: 1024.0, growth_interval: 1000, backoff: 0.5, min: 1.0 });
    }
    cfg
}

/// An f32 CPU tensor of normal values with standard deviation `std`, from `seed`.
pub fn randn(shape: &[usize], seed: u64, std: f64) -> Tensor {
    let mut rng = Rng::new(seed);
    let v: Vec<f32> = (0..shape.iter().product()).map(|_| (rng.normal() * std) as f32).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// A u32 CPU tensor of values uniform in `0..below` (token ids, targets), from `seed`.
pub fn random_ids(shape: &[usize], seed: u64, below: u32) -> Tensor {
    let mut rng = Rng::new(seed);
    let v: Vec<u32> = (0..shape.iter().product()).map(|_| rng.below(below.into()) as u32).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// Record that `test` did not run (and why): a line on stderr, and one in the file named by
/// `FERROSPEED_SKIP_LOG` when set (`.ci/run` counts them and prints the total at the end).
pub fn skip(test: &str, reason: &str) {
    eprintln!("SKIPPED {test}: {reason}");
    if let Some(log) = std::env::var_os("FERROSPEED_SKIP_LOG") {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(log) {
            let _ = writeln!(f, "{test}\t{reason}");
        }
    }
}

/// GPU 0, or `None` after printing the one line the GPU scripts count:
/// `GPU-TEST-SKIPPED needs=1 test=<test>: <reason>`. Without a driver cudarc panics while loading
/// libcuda; that counts as "no GPU" too, so the probe catches the panic.
#[cfg(feature = "cuda")]
pub fn gpu_or_skip(test: &str) -> Option<Device> {
    let why = match std::panic::catch_unwind(|| Device::new_cuda(0)) {
        Ok(Ok(device)) => return Some(device),
        Ok(Err(e)) => e.to_string().replace('\n', " "),
        Err(_) => "the CUDA driver could not be loaded".to_string(),
    };
    eprintln!("GPU-TEST-SKIPPED needs=1 test={test}: no usable CUDA device ({why})");
    None
}

/// The loss of `batch` through the block-wise forward (with `checkpointing`, recomputed for the
/// backward) and every trainable parameter's gradient, by block and parameter (`own_params` order).
pub fn loss_and_grads(model: &ferrospeed::engine::Model, slots: &[Vec<Tensor>], batch: &Batch, checkpointing: bool) -> (f64, Vec<Vec<Vec<f32>>>) {
    use ferrospeed::engine::blockwise;
    let tape = blockwise::forward(model, &mut &slots[..], batch, checkpointing).unwrap();
    let loss = tape.loss.to_dtype(candle_core::DType::F64).unwrap().to_scalar::<f64>().unwrap();
    let mut grads: Vec<Vec<Vec<f32>>> = (0..model.num_blocks()).map(|b| model.own_params(b).iter().map(|s| vec![0.0; s.numel()]).collect()).collect();
    blockwise::backward(model, &mut &slots[..], batch, tape, 1.0, |i, slot_grads| {
        for (src, g) in model.slots(i).iter().zip(slot_grads) {
            if let Some(g) = g {
                let g: Vec<f32> = g.flatten_all().unwrap().to_dtype(candle_core::DType::F32).unwrap().to_vec1().unwrap();
                grads[src.block][src.index].iter_mut().zip(g).for_each(|(a, b)| *a += b);
            }
        }
        Ok(())
    })
    .unwrap();
    (loss, grads)
}
