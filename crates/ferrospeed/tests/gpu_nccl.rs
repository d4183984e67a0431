//! NCCL tests (feature `cuda`; need two GPUs, run by bench/gpu_run.sh on a multi-GPU machine): every
//! collective on device buffers against expected values computed here from seeded inputs (f32 and
//! bf16), and a rank that stops issuing collectives makes the other's `sync` fail within the timeout
//! instead of hanging. With fewer GPUs each test prints the `GPU-TEST-SKIPPED needs=2` line and returns.
#![cfg(feature = "cuda")]

mod common;

use candle_core::cuda::cudarc::driver::CudaSlice;
use candle_core::cuda::CudaDevice;
use common::gpus_or_skip;
use ferrospeed::comm::nccl::NcclComm;
use ferrospeed::comm::{run_local_world, CommConfig, Communicator};
use ferrospeed::rng::Rng;
use half::bf16;
use std::time::{Duration, Instant};

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

/// A rank's seeded input: normals of mixed scale, so that every rank can compute every rank's input.
fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..n).map(|_| (r.normal() * [0.01, 1.0, 100.0][r.below(3) as usize]) as f32).collect()
}

/// The average of two ranks' values as NCCL computes it, bit for bit: whether it pre-multiplies each
/// input by 1/2 or divides the sum by 2, halving is exact (no value here is near the subnormals), and
/// one addition of two values does not depend on their order.
fn avg2(a: &[f32], b: &[f32]) -> Vec<f32> {
    a.iter().zip(b).map(|(x, y)| (x + y) / 2.0).collect()
}

/// `None` when bitwise equal, else how many elements differ and the first of them.
fn differences<T: Copy + std::fmt::Debug>(what: &str, got: &[T], want: &[T], bits: impl Fn(T) -> u32) -> Option<String> {
    let bad: Vec<usize> = (0..want.len()).filter(|&i| got.get(i).map(|&g| bits(g)) != Some(bits(want[i]))).collect();
    let &first = bad.first()?;
    Some(format!("{what}: {} of {} elements differ; first at {first}: got {:?}, expected {:?}", bad.len(), want.len(), got.get(first), want[first]))
}

#[test]
fn collectives_on_two_gpus() {
    if !gpus_or_skip("collectives_on_two_gpus", 2) {
        return;
    }
    let cfg = CommConfig { timeout: Duration::from_secs(60), ..CommConfig::default() };
    let n = 1000;
    // Seeds per rank and collective; both ranks rebuild both inputs to know the expected values.
    let reduce_in = |rank: usize| random(n, 100 + rank as u64);
    let scatter_in = |rank: usize| random(2 * n, 200 + rank as u64);
    let gather_in = |rank: usize| random(n, 300 + rank as u64).into_iter().map(bf16::from_f32).collect::<Vec<_>>();
    let failures = run_local_world(2, &cfg, |group| {
        let rank = group.rank();
        let dev = cuda(rank);
        let nccl = NcclComm::new(&group, &dev, Duration::from_secs(60)).unwrap();
        // Mismatches are collected, not asserted here, so both ranks issue every collective.
        let mut failures = Vec::new();
        let f32_bits = |x: f32| x.to_bits();
        // all_reduce: the average over both ranks.
        let mut buf = upload(&dev, &reduce_in(rank));
        let p = nccl.all_reduce_avg(&mut buf).unwrap();
        nccl.wait(p).unwrap();
        nccl.sync().unwrap();
        let want = avg2(&reduce_in(0), &reduce_in(1));
        failures.extend(differences(&format!("all_reduce on rank {rank}"), &download(&dev, &buf), &want, f32_bits));
        // reduce_scatter: each rank gets its half of the average.
        let input = upload(&dev, &scatter_in(rank));
        let mut out = upload(&dev, &vec![0f32; n]);
        let p = nccl.reduce_scatter_avg(&input, &mut out).unwrap();
        nccl.wait(p).unwrap();
        let want = avg2(&scatter_in(0)[rank * n..(rank + 1) * n], &scatter_in(1)[rank * n..(rank + 1) * n]);
        failures.extend(differences(&format!("reduce_scatter on rank {rank}"), &download(&dev, &out), &want, f32_bits));
        // all_gather in bf16: rank 0's values, then rank 1's.
        let mine = upload(&dev, &gather_in(rank));
        let mut all = upload(&dev, &vec![bf16::ZERO; 2 * n]);
        let p = nccl.all_gather(&mine, &mut all).unwrap();
        nccl.wait(p).unwrap();
        let want: Vec<bf16> = gather_in(0).into_iter().chain(gather_in(1)).collect();
        failures.extend(differences(&format!("all_gather on rank {rank}"), &download(&dev, &all), &want, |x: bf16| u32::from(x.to_bits())));
        nccl.sync().unwrap();
        failures
    })
    .unwrap();
    let failures: Vec<String> = failures.into_iter().flatten().collect();
    assert!(failures.is_empty(), "NCCL results differ from the expected values:\n{}", failures.join("\n"));
}

// Known failure, H200 x2 with NCCL 2.28.9 (2026-11-23): the waiting rank hung instead of failing after
// its 3 s timeout (killed by the harness after 60 s). Likely cause: NCCL's lazy connection setup, a
// blocking host call inside the first all_reduce, where the watchdog cannot act; `ferrospeed launch`
// now sets NCCL_RUNTIME_CONNECT=0 for its ranks and this test does the same. Not yet re-run on two GPUs
// (bench/gpu_multi.sh runs it with `--ignored`).
#[test]
#[ignore = "hung on NCCL 2.28.9 (lazy connection); re-run on two GPUs with --ignored"]
fn z_a_missing_rank_times_out_instead_of_hanging() {
    if !gpus_or_skip("z_a_missing_rank_times_out_instead_of_hanging", 2) {
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
    // Generous against the 3 s timeout on a loaded machine; a hang is stopped by the harness at 60 s.
    assert!(waited < Duration::from_secs(30), "took {waited:?}");
    assert!(msg.contains("all_reduce #1") && msg.contains("timed out"), "{msg}");
}
