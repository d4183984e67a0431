//! Helpers shared by this crate's integration tests: a world of ranks as threads, and the GPU skip protocol.
// Each test binary compiles this module and uses only part of it (comm_threads the world, gpu_* the probes).
#![allow(dead_code)]

use ferrospeed::comm::{run_local_world, TcpCommunicator};
use ferrospeed::engine::{cut_for_stage, CommWorker, Engine, EngineConfig, Model, PipelineStage, StageCut};
use ferrospeed::parallel::{Axis, Mesh, MeshComms, Schedule};
use ferrospeed::{CommConfig, Communicator};
use std::sync::Arc;

/// Run `f(communicator)` on `world_size` threads forming one group; results in rank order.
pub fn run_world<R: Send>(world_size: usize, cfg: &CommConfig, f: impl Fn(TcpCommunicator) -> R + Sync) -> Vec<R> {
    run_local_world(world_size, cfg, f).expect("forming the local world")
}

/// The engine of this rank (`comm`'s) in a pipeline of all the world's ranks (dp = 1) running
/// `schedule` over the stages `ranges` of `model`, and the tied blocks and the ranks holding them.
pub fn pipeline_engine(comm: TcpCommunicator, model: Model, ranges: &[std::ops::Range<usize>], schedule: Schedule, cfg: EngineConfig) -> (Engine, Vec<usize>, Vec<usize>) {
    let (rank, pp) = (comm.rank(), comm.world_size());
    let world: Arc<dyn Communicator> = Arc::new(comm);
    let mesh = Mesh::new(pp, pp, 1, 1, 1).unwrap();
    let comms = MeshComms::new(world.clone(), mesh).unwrap();
    let StageCut { model: cut, owner_stage, tied, tie_stages, whole, metrics } = cut_for_stage(model, ranges, rank, pp).unwrap();
    let tie: Option<Arc<dyn Communicator>> = (!tie_stages.is_empty()).then(|| Arc::from(world.split("tie", &[tie_stages.clone()]).unwrap()));
    let stage = PipelineStage {
        rank,
        schedule,
        p2p: comms.get(Axis::Pp).clone(),
        tie,
        world: Arc::new(CommWorker::spawn(world.clone())),
        owner_stage,
        tied: tied.clone(),
        whole,
        ranks: (0..pp).map(|r| (mesh.coords(r).pp, mesh.coords(r).dp)).collect(),
        metrics,
    };
    let dp = Arc::new(CommWorker::spawn(comms.get(Axis::Dp).clone()));
    (Engine::with_pipeline(cut, dp, stage, cfg).unwrap(), tied, tie_stages)
}

/// The one line a GPU test prints when it cannot run; the GPU scripts (bench/gpu_*.sh) count these
/// lines and fail when `needs` is at most the number of GPUs the machine has.
#[cfg(feature = "cuda")]
fn report_skip(test: &str, needs: usize, reason: &str) {
    eprintln!("GPU-TEST-SKIPPED needs={needs} test={test}: {reason}");
}

/// The number of CUDA devices, or why there are none. Without a driver cudarc panics when it loads
/// libcuda, so the probe runs under `catch_unwind`: a missing driver is "no GPU", not a failure.
#[cfg(feature = "cuda")]
fn probe_gpus() -> Result<usize, String> {
    use candle_core::cuda::cudarc::driver::CudaContext;
    match std::panic::catch_unwind(CudaContext::device_count) {
        Ok(Ok(n)) => Ok(n.max(0) as usize),
        Ok(Err(e)) => Err(format!("counting CUDA devices failed ({e})")),
        Err(_) => Err("the CUDA driver could not be loaded".into()),
    }
}

/// CUDA device 0 for a single-GPU test, or `None` after printing the skip line (`needs=1`).
#[cfg(feature = "cuda")]
pub fn gpu_or_skip(test: &str) -> Option<candle_core::cuda::CudaDevice> {
    use candle_core::Device;
    match std::panic::catch_unwind(|| Device::new_cuda(0)) {
        Ok(Ok(Device::Cuda(d))) => Some(d),
        other => {
            let why = match other {
                Ok(Err(e)) => format!("no usable CUDA device ({e})"),
                Err(_) => "the CUDA driver could not be loaded".into(),
                Ok(Ok(_)) => "device 0 is not a CUDA device".into(),
            };
            report_skip(test, 1, &why);
            None
        }
    }
}

/// Whether at least `needs` CUDA devices are present; when not, prints the skip line and returns false.
#[cfg(feature = "cuda")]
pub fn gpus_or_skip(test: &str, needs: usize) -> bool {
    match probe_gpus() {
        Ok(n) if n >= needs => true,
        Ok(n) => {
            report_skip(test, needs, &format!("{n} CUDA device(s) found"));
            false
        }
        Err(why) => {
            report_skip(test, needs, &why);
            false
        }
    }
}

/// The candle-nn tests' batch: `x` `[8, 6]` of seeded normal values, classes `y` `[8]` in 0..3.
pub fn mlp_batch() -> ferrospeed::engine::Batch {
    let mut rng = ferrospeed::rng::Rng::new(3);
    let x: Vec<f32> = (0..8 * 6).map(|_| rng.normal() as f32).collect();
    let y: Vec<u32> = (0..8).map(|i| (i % 3) as u32).collect();
    let dev = candle_core::Device::Cpu;
    ferrospeed::engine::Batch::new().with("x", candle_core::Tensor::from_vec(x, (8, 6), &dev).unwrap()).with("y", candle_core::Tensor::from_vec(y, 8, &dev).unwrap())
}
