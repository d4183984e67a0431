//! NCCL tests (feature `cuda`; need two GPUs, run by bench/gpu_run.sh on a multi-GPU machine): every
//! collective on device buffers against the expected values in f32 and bf16, and a rank that stops
//! issuing collectives makes the other's `sync` fail within the timeout instead of hanging.
#![cfg(feature = "cuda")]

use candle_core::cuda::cudarc::driver::CudaSlice;
use candle_core::cuda::CudaDevice;
use ferrospeed::comm::nccl::NcclComm;
use ferrospeed::comm::{run_local_world, CommConfig, Communicator};
use half::bf16;
use std::time::{Duration, Instant};

fn gpus() -> usize {
    let n = ferrospeed::device::gpu_count();
    if n < 2 {
        eprintln!("{n} GPU(s): NCCL tests need 2, skipped");
    }
    n
}

fn cuda(ordinal: usize) -> CudaDevice {
    match candle_core::Device::new_cuda(ordinal).unwrap() {
        candle_core::Device::Cuda(d) => d,
        _ => unreachable!(),
    }
}

fn upload<T: candle_core::cuda::cudarc::driver::DeviceRepr>(dev: &CudaDevice, v: &[T]) -> CudaSlice<T> {
    dev.cuda_stream().clone_htod(v).unwrap()
}

fn download<T: candle_core::cuda::cudarc::driver::DeviceRepr + Clone + Default>(dev: &CudaDevice, s: &CudaSlice<T>) -> Vec<T> {
    dev.cuda_stream().clone_dtoh(s).unwrap()
}

#[test]
fn collectives_on_two_gpus() {
    if gpus() < 2 {
        return;
    }
    let cfg = CommConfig { timeout: Duration::from_secs(60), ..CommConfig::default() };
    run_local_world(2, &cfg, |group| {
        let rank = group.rank();
        let dev = cuda(rank);
        let nccl = NcclComm::new(&group, &dev, Duration::from_secs(60)).unwrap();
        let n = 1000;
        // all_reduce: average of rank-dependent values.
        let mut buf = upload(&dev, &(0..n).map(|i| (i * (rank + 1)) as f32).collect::<Vec<_>>());
        let p = nccl.all_reduce_avg(&mut buf).unwrap();
        nccl.wait(p).unwrap();
        nccl.sync().unwrap();
        let got = download(&dev, &buf);
        assert!(got.iter().enumerate().all(|(i, &v)| v == i as f32 * 1.5), "all_reduce on rank {rank}");
        // reduce_scatter: each rank gets its half of the average.
        let input = upload(&dev, &(0..2 * n).map(|i| (i + rank) as f32).collect::<Vec<_>>());
        let mut out = upload(&dev, &vec![0f32; n]);
        let p = nccl.reduce_scatter_avg(&input, &mut out).unwrap();
        nccl.wait(p).unwrap();
        let got = download(&dev, &out);
        assert!(got.iter().enumerate().all(|(i, &v)| v == (rank * n + i) as f32 + 0.5), "reduce_scatter on rank {rank}");
        // all_gather in bf16.
        let mine = upload(&dev, &vec![bf16::from_f32(rank as f32 + 1.0); n]);
        let mut all = upload(&dev, &vec![bf16::ZERO; 2 * n]);
        let p = nccl.all_gather(&mine, &mut all).unwrap();
        nccl.wait(p).unwrap();
        let got = download(&dev, &all);
        assert!(got[..n].iter().all(|v| v.to_f32() == 1.0) && got[n..].iter().all(|v| v.to_f32() == 2.0), "all_gather on rank {rank}");
        nccl.sync().unwrap();
    })
    .unwrap();
}

// Known failure, H200 x2 with NCCL 2.28.9 (2026-11-23): the waiting rank hung instead of failing after
// its 3 s timeout (killed by the harness after 60 s). Likely cause: NCCL's lazy connection setup, a
// blocking host call inside the first all_reduce, where the watchdog cannot act; `ferrospeed launch`
// now sets NCCL_RUNTIME_CONNECT=0 for its ranks and this test does the same. Not yet re-run on two GPUs
// (bench/gpu_multi.sh runs it with `--ignored`).
#[test]
#[ignore = "hung on NCCL 2.28.9 (lazy connection); re-run on two GPUs with --ignored"]
fn z_a_missing_rank_times_out_instead_of_hanging() {
    if gpus() < 2 {
        return;
    }
    // As `ferrospeed launch` does for its ranks (this test runs alone: --test-threads 1).
    std::env::set_var("NCCL_RUNTIME_CONNECT", "0");
    let cfg = CommConfig { timeout: Duration::from_secs(60), ..CommConfig::default() };
    let results = run_local_world(2, &cfg, |group| {
        let rank = group.rank();
        let dev = cuda(rank);
        let nccl = NcclComm::new(&group, &dev, Duration::from_secs(3)).unwrap();
        if rank == 1 {
            return None; // never joins the all_reduce
        }
        let mut buf = upload(&dev, &vec![1f32; 1 << 20]);
        let t0 = Instant::now();
        let p = nccl.all_reduce_avg(&mut buf).unwrap();
        let _ = nccl.wait(p);
        let e = nccl.sync().expect_err("the all_reduce cannot complete");
        Some((t0.elapsed(), e.to_string()))
    })
    .unwrap();
    let (waited, msg) = results[0].clone().unwrap();
    eprintln!("rank 0 after {waited:?}: {msg}");
    assert!(waited < Duration::from_secs(20), "took {waited:?}");
    assert!(msg.contains("all_reduce #1") && msg.contains("timed out"), "{msg}");
}
