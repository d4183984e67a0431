//! Offload against no offload, with ranks as threads on the CPU: the optimizer state in host memory
//! or NVMe files (all of it, or half), at stages 1–3, world 1 and 2, gives bitwise the losses of the
//! same run without offload; the state really is on the tier asked for (files on disk while the
//! engine lives, none after), stage-3 parameter shards too; a bad folder or budget is one error
//! before anything is written.

mod support;

use candle_core::Device;
use ferrospeed::comm::run_local_world;
use ferrospeed::engine::{Engine, EngineConfig, EngineError, MemoryReport, OffloadSettings};
use ferrospeed::optim::LrSchedule;
use ferrospeed::precision::Precision;
use ferrospeed::shard::{Offload, Tier};
use ferrospeed::{CommConfig, Communicator};
use ferrospeed_models::{BatchSampler, Gpt, GptConfig, TextCorpus};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use support::bits;

const CFG: GptConfig = GptConfig { n_layer: 3, n_head: 2, d_model: 32, seq_len: 16, vocab_size: 256 };
const STEPS: usize = 8;

fn corpus() -> TextCorpus {
    support::corpus("Offloaded state is read ahead, updated on every core and written behind. ", 40)
}

#[derive(Clone, Copy, Debug)]
struct Run {
    world: usize,
    stage: u8,
    precision: Precision,
    optimizer: Offload,
    ratio: f64,
    params: Offload,
    /// The share of the state in NVMe files (the offloaded rest in host memory); `None`: all of it.
    nvme_ratio: Option<f64>,
}

fn config(run: Run, nvme: &Path) -> EngineConfig {
    let mut cfg = support::engine_config(run.stage, run.precision, true, 5);
    cfg.strategy = cfg.strategy.with_offload(run.optimizer, run.ratio, run.params);
    if let Some(q) = run.nvme_ratio {
        cfg.strategy = cfg.strategy.with_nvme_ratio(q);
    }
    cfg.offload = OffloadSettings { nvme_dir: Some(nvme.to_path_buf()), pinned_budget: 0 };
    cfg
}

/// What a run shows: rank 0's losses, each rank's memory report and tiers, and whether NVMe files
/// existed during the run.
struct Outcome {
    losses: Vec<f64>,
    memory: Vec<MemoryReport>,
    tiers: Vec<Vec<Tier>>,
    files_during: usize,
    disk_read: u64,
    /// Seconds the update passes waited on the disk, all ranks and steps.
    disk_wait: f64,
    /// Parameter-shard files (`*.params`) during the run, and their bytes (every rank's).
    param_files: usize,
    param_bytes: u64,
}

/// Every rank trains `STEPS` steps of `run` (calling `after_step` after each), then reports `finish`
/// of its engine and its losses.
fn run_engine<T: Send>(run: Run, nvme: &Path, after_step: impl Fn(&mut Engine, usize) + Sync, finish: impl Fn(&mut Engine) -> T + Sync) -> Vec<(Vec<f64>, f64, T)> {
    let corpus = corpus();
    run_local_world(run.world, &CommConfig::default(), |comm| {
        let rank = comm.rank();
        let mut engine = Engine::new(Gpt::new(CFG).model().unwrap(), Arc::new(comm), config(run, nvme)).unwrap();
        let sampler = BatchSampler { seed: 5, seq_len: CFG.seq_len, micro_batch: 1, accumulation: 2, world_size: run.world, rank };
        let schedule = LrSchedule { lr: 3e-3, min_lr: 3e-4, warmup: 2, total: STEPS };
        let (mut losses, mut waited) = (Vec::new(), 0.0);
        for step in 0..STEPS {
            let batches = support::batches(&sampler, &corpus, step, &Device::Cpu);
            let stats = engine.train_step_at(&batches, schedule.at(step)).unwrap();
            losses.push(stats.loss);
            waited += stats.times.disk_wait;
            after_step(&mut engine, step);
        }
        (losses, waited, finish(&mut engine))
    })
    .unwrap()
}

fn train(run: Run, nvme: &Path) -> Outcome {
    // Ranks are threads sharing one folder: count between two barriers, so that no rank has dropped
    // its engine (and removed its files) while another counts.
    let barrier = |engine: &Engine| engine.comm().run(|c| c.barrier()).unwrap().unwrap();
    let files = |engine: &mut Engine| {
        barrier(engine);
        let paths = walk(nvme);
        let params: Vec<_> = paths.iter().filter(|p| p.extension().is_some_and(|e| e == "params")).collect();
        let param_bytes = params.iter().map(|p| std::fs::metadata(p).unwrap().len()).sum::<u64>();
        barrier(engine);
        (paths.len(), (params.len(), param_bytes), engine.disk_traffic().map_or(0, |t| t.read_bytes))
    };
    let out: Vec<_> = run_engine(run, nvme, |_, _| {}, |engine| (engine.memory(), engine.state_tiers(), files(engine)))
        .into_iter()
        .map(|(losses, w, (m, t, (f, (pf, pb), r)))| (losses, m, t, f, r, w, pf, pb))
        .collect();
    Outcome {
        losses: out[0].0.clone(),
        memory: out.iter().map(|o| o.1).collect(),
        tiers: out.iter().map(|o| o.2.clone()).collect(),
        files_during: out[0].3,
        disk_read: out.iter().map(|o| o.4).sum(),
        disk_wait: out.iter().map(|o| o.5).sum(),
        param_files: out[0].6,
        param_bytes: out[0].7,
    }
}

fn count_files(dir: &Path) -> usize {
    walk(dir).len()
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn offloaded_optimizer_state_gives_bitwise_the_losses_of_no_offload() {
    let nvme = tempfile::tempdir().unwrap();
    for world in [1, 2] {
        for stage in 1..=3 {
            let base = Run { world, stage, precision: Precision::Fp32, optimizer: Offload::None, ratio: 1.0, params: Offload::None, nvme_ratio: None };
            let reference = train(base, nvme.path());
            assert!(reference.losses[STEPS - 1] < reference.losses[0], "the loss falls");
            assert!(reference.tiers.iter().flatten().all(|&t| t == Tier::Device));
            // Parameter offload (stage 3) needs the whole optimizer state offloaded.
            let param_offload: &[(Offload, f64, Offload)] = if stage == 3 { &[(Offload::Cpu, 1.0, Offload::Cpu), (Offload::Nvme, 1.0, Offload::Nvme)] } else { &[] };
            let plain = [(Offload::Cpu, 1.0, Offload::None), (Offload::Cpu, 0.5, Offload::None), (Offload::Nvme, 1.0, Offload::None), (Offload::Nvme, 0.5, Offload::None)];
            for &(optimizer, ratio, params) in plain.iter().chain(param_offload) {
                let run = Run { optimizer, ratio, params, ..base };
                let got = train(run, nvme.path());
                assert_eq!(bits(&got.losses), bits(&reference.losses), "{run:?} vs no offload");
                let tier = optimizer.tier();
                for (rank, tiers) in got.tiers.iter().enumerate() {
                    let offloaded = tiers.iter().filter(|&&t| t == tier).count();
                    if ratio == 1.0 {
                        assert_eq!(offloaded, tiers.len(), "{run:?} rank {rank}: every block offloaded");
                    } else {
                        assert!(offloaded > 0 && offloaded < tiers.len(), "{run:?} rank {rank}: some blocks offloaded, not all: {tiers:?}");
                        // The offloaded share is near the ratio (whole blocks).
                        let m = got.memory[rank];
                        let off = (m.offloaded_host + m.offloaded_nvme) as f64;
                        let share = off / (off + (m.master + m.moments) as f64);
                        assert!((share - 0.5).abs() < 0.3, "{run:?} rank {rank}: offloaded share {share}");
                    }
                }
                let m = got.memory[0];
                match optimizer {
                    Offload::Nvme => {
                        assert!(m.offloaded_nvme > 0 && m.offloaded_host == 0, "{run:?}: {m:?}");
                        assert!(got.files_during > 0, "{run:?}: state files exist while the engine runs");
                        assert!(got.disk_read > 0, "{run:?}: the state was read back from disk");
                    }
                    _ => {
                        assert!(m.offloaded_host > 0 && m.offloaded_nvme == 0, "{run:?}: {m:?}");
                        assert_eq!(got.disk_wait, 0.0, "{run:?}: no disk, no wait on it");
                        // Blocks whose window is the whole block and whose parameters stay resident,
                        // and stage-3 blocks (the window is the shard), take the staging pipeline of a
                        // GPU run (copied out and back), on the CPU too.
                        let staged = world == 1 && stage <= 2 || stage == 3;
                        assert_eq!(m.staging > 0, staged, "{run:?}: staging buffers {m:?}");
                    }
                }
                if params != Offload::None {
                    // Between uses a stage-3 shard is in host memory, or only in its file.
                    let in_memory = got.memory.iter().map(|m| m.params).sum::<usize>();
                    assert_eq!(in_memory == 0, params == Offload::Nvme, "{run:?}: {in_memory} bytes of parameters in memory");
                    if params == Offload::Nvme {
                        assert!(got.param_files > 0 && 2 * got.param_files == got.files_during, "{run:?}: a parameter file beside each state file: {} of {}", got.param_files, got.files_during);
                    }
                }
                assert_eq!(count_files(nvme.path()), 0, "{run:?}: the engine removes its state files when dropped");
            }
        }
    }
}

#[test]
fn offload_is_bitwise_in_fp16_and_bf16_and_with_parameter_offload() {
    let nvme = tempfile::tempdir().unwrap();
    let fp32_files = train(Run { world: 2, stage: 3, precision: Precision::Fp32, optimizer: Offload::Nvme, ratio: 1.0, params: Offload::Nvme, nvme_ratio: None }, nvme.path()).param_bytes;
    for precision in [Precision::Bf16, Precision::Fp16] {
        let base = Run { world: 2, stage: 3, precision, optimizer: Offload::None, ratio: 1.0, params: Offload::None, nvme_ratio: None };
        let reference = train(base, nvme.path());
        for (optimizer, params) in [(Offload::Nvme, Offload::None), (Offload::Cpu, Offload::Cpu), (Offload::Nvme, Offload::Nvme)] {
            let run = Run { optimizer, params, ..base };
            let got = train(run, nvme.path());
            assert_eq!(bits(&got.losses), bits(&reference.losses), "{run:?}");
            if params == Offload::Nvme {
                // The shard is stored in the compute dtype: about half the bytes of fp32's (whole pages).
                assert!(got.param_bytes > 0 && 10 * got.param_bytes <= 6 * fp32_files, "{run:?}: {} bytes of parameter files, fp32 {fp32_files}", got.param_bytes);
            }
        }
    }
}

/// Every block's master weights and state, as bits.
fn state_bits(engine: &mut Engine) -> Vec<Vec<u32>> {
    engine.sync_to_host().unwrap();
    engine.windows().unwrap().iter().map(|w| std::iter::once(w.master).chain(w.state.iter().copied()).flat_map(|b| b.iter().map(|x| x.to_bits())).collect()).collect()
}

/// Every block's master weights and state after `STEPS` steps, read the way a checkpoint reads
/// them, with a read in the middle too (a save at step 3 fills the host mirror).
fn final_state(run: Run, nvme: &Path) -> Vec<Vec<u32>> {
    let mid_read = |engine: &mut Engine, step: usize| {
        if step == 2 {
            engine.sync_to_host().unwrap();
            assert!(!engine.windows().unwrap().is_empty());
        }
    };
    run_engine(run, nvme, mid_read, state_bits).into_iter().next().unwrap().2
}

#[test]
fn a_checkpoint_read_after_more_steps_sees_the_offloaded_state_of_now() {
    let nvme = tempfile::tempdir().unwrap();
    let base = Run { world: 1, stage: 1, precision: Precision::Fp32, optimizer: Offload::None, ratio: 1.0, params: Offload::None, nvme_ratio: None };
    let reference = final_state(base, nvme.path());
    for (optimizer, ratio) in [(Offload::Nvme, 1.0), (Offload::Nvme, 0.5), (Offload::Cpu, 1.0)] {
        assert!(final_state(Run { optimizer, ratio, ..base }, nvme.path()) == reference, "{optimizer} {ratio}: the state read after the last step differs");
    }
}

#[test]
fn three_tiers_device_host_and_nvme_give_bitwise_the_losses_and_state_of_no_offload() {
    let nvme = tempfile::tempdir().unwrap();
    for (world, stage) in [(1, 1), (2, 2), (2, 3)] {
        let base = Run { world, stage, precision: Precision::Fp32, optimizer: Offload::None, ratio: 1.0, params: Offload::None, nvme_ratio: None };
        let reference = train(base, nvme.path());
        for (ratio, q) in [(0.8, 0.4), (1.0, 0.5)] {
            let run = Run { optimizer: Offload::Nvme, ratio, nvme_ratio: Some(q), ..base };
            let got = train(run, nvme.path());
            assert_eq!(bits(&got.losses), bits(&reference.losses), "{run:?} vs no offload");
            for tiers in &got.tiers {
                let has = |t: Tier| tiers.contains(&t);
                assert!(has(Tier::Host) && has(Tier::Nvme) && has(Tier::Device) == (ratio < 1.0), "{run:?}: {tiers:?}");
                // The NVMe blocks are the last ones; host blocks come before them.
                assert!(tiers.windows(2).all(|w| (w[0], w[1]) != (Tier::Nvme, Tier::Host)), "{run:?}: {tiers:?}");
            }
            let m = got.memory[0];
            assert!(m.offloaded_host > 0 && m.offloaded_nvme > 0 && got.disk_read > 0, "{run:?}: {m:?}");
        }
    }
    let base = Run { world: 1, stage: 1, precision: Precision::Fp32, optimizer: Offload::None, ratio: 1.0, params: Offload::None, nvme_ratio: None };
    let three = Run { optimizer: Offload::Nvme, ratio: 0.8, nvme_ratio: Some(0.4), ..base };
    assert!(final_state(three, nvme.path()) == final_state(base, nvme.path()), "the state read after the last step differs");
}

/// A checkpoint of state in NVMe files is read and written one block at a time: after the save no
/// block keeps a host copy, and the checkpoint restores the exact state into a plain engine (and back).
#[test]
fn checkpoints_stream_offloaded_state_block_by_block_and_restore_it_exactly() {
    let nvme = tempfile::tempdir().unwrap();
    let ck = tempfile::tempdir().unwrap();
    let base = Run { world: 1, stage: 1, precision: Precision::Fp32, optimizer: Offload::None, ratio: 1.0, params: Offload::None, nvme_ratio: None };
    let reference = final_state(base, nvme.path());
    let three = Run { optimizer: Offload::Nvme, ratio: 0.8, nvme_ratio: Some(0.4), ..base };
    let saved = run_engine(three, nvme.path(), |_, _| {}, |engine| {
        let dir = ferrospeed::checkpoint::save(engine, &ferrospeed::checkpoint::SaveRequest { root: ck.path(), samples: 0, keep: 1, keep_best: false, run: serde_json::Value::Null }).unwrap();
        let err = engine.windows().err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("sync_to_host"), "off-host blocks keep no host copy after the save: {err:?}");
        dir
    });
    let dir = saved.into_iter().next().unwrap().2;
    for into in [base, three] {
        let loaded = run_local_world(1, &CommConfig::default(), |comm| {
            let mut engine = Engine::new(Gpt::new(CFG).model().unwrap(), Arc::new(comm), config(into, nvme.path())).unwrap();
            ferrospeed::checkpoint::load_into(&mut engine, &dir).unwrap();
            assert_eq!(engine.steps_done(), STEPS as u64);
            state_bits(&mut engine)
        })
        .unwrap();
        assert!(loaded[0] == reference, "{into:?}: the restored state differs from the saved one");
    }
}

fn engine_error(run: Run, settings: OffloadSettings) -> EngineError {
    let out = run_local_world(1, &CommConfig::default(), |comm| {
        let mut cfg = config(run, Path::new("/"));
        cfg.offload = settings.clone();
        Engine::new(Gpt::new(CFG).model().unwrap(), Arc::new(comm), cfg).err()
    })
    .unwrap();
    out.into_iter().next().unwrap().expect("the engine refuses")
}

#[test]
fn a_bad_nvme_folder_or_budget_is_one_error_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let run = Run { world: 1, stage: 1, precision: Precision::Fp32, optimizer: Offload::Nvme, ratio: 1.0, params: Offload::None, nvme_ratio: None };
    let missing = dir.path().join("no-such-disk");
    let e = engine_error(run, OffloadSettings { nvme_dir: Some(missing.clone()), pinned_budget: 0 });
    let msg = e.to_string();
    assert!(matches!(e, EngineError::Nvme { .. }) && msg.contains("does not exist") && msg.contains("no-such-disk"), "{msg}");
    assert!(!missing.exists());

    // A budget below one block's buffers names the block and the size that would do.
    let e = engine_error(run, OffloadSettings { nvme_dir: Some(dir.path().to_path_buf()), pinned_budget: 4096 });
    let msg = e.to_string();
    assert!(matches!(e, EngineError::PinnedBudget { .. }) && msg.contains("zero.pinned_budget_mb") && msg.contains("block "), "{msg}");
    assert!(!msg.contains('\n'));
    assert_eq!(count_files(dir.path()), 0, "nothing written");

    // A disk too small for the state: a model of some 1.3 T parameters is refused before any
    // allocation, with the sizes and the settings to change.
    let huge = GptConfig { n_layer: 400, n_head: 128, d_model: 16384, seq_len: 16, vocab_size: 256 };
    let out = run_local_world(1, &CommConfig::default(), |comm| {
        let mut cfg = config(run, dir.path());
        cfg.offload.nvme_dir = Some(dir.path().to_path_buf());
        Engine::new(Gpt::new(huge).model().unwrap(), Arc::new(comm), cfg).err()
    })
    .unwrap();
    let msg = out[0].as_ref().expect("refused").to_string();
    assert!(msg.contains("GB free") && msg.contains("zero.offload_ratio"), "{msg}");
    assert_eq!(count_files(dir.path()), 0, "nothing written");

    // A file where the folder should be.
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let e = engine_error(run, OffloadSettings { nvme_dir: Some(file), pinned_budget: 0 });
    assert!(e.to_string().contains("not a directory"), "{e}");
}

/// A new run's NVMe files get only their master weights written: the moments are zeros, which the
/// files' reserved, unwritten space already reads as. Their whole size is reserved on the disk all the
/// same (a disk filling up later cannot fail a write-back). The training after it is bitwise that of
/// no offload.
#[test]
fn a_new_runs_state_files_are_written_master_weights_only() {
    let nvme = tempfile::tempdir().unwrap();
    let run = Run { world: 1, stage: 1, precision: Precision::Fp32, optimizer: Offload::Nvme, ratio: 1.0, params: Offload::None, nvme_ratio: None };
    let (written, files) = run_local_world(1, &CommConfig::default(), |comm| {
        let engine = Engine::new(Gpt::new(CFG).model().unwrap(), Arc::new(comm), config(run, nvme.path())).unwrap();
        let mut files = 0;
        for path in walk(nvme.path()) {
            let m = std::fs::metadata(&path).unwrap();
            assert!(m.blocks() * 512 >= m.len(), "{}: {} bytes reserved of {}", path.display(), m.blocks() * 512, m.len());
            files += m.len();
        }
        (engine.disk_traffic().unwrap().write_bytes, files)
    })
    .unwrap()[0];
    // Master weights and two moments: about a third of each file (whole pages) is written.
    assert!(written > 0 && 2 * written < files, "{written} bytes written of {files}");
    let base = Run { optimizer: Offload::None, ..run };
    assert_eq!(bits(&train(run, nvme.path()).losses), bits(&train(base, nvme.path()).losses));
}
