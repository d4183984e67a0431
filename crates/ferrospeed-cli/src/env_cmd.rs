//! `ferrospeed env`: what a bug report needs — version, features, machine, GPUs, driver, CUDA, NCCL,
//! and where each GPU library was loaded from.

use anyhow::Result;
use std::process::ExitCode;

pub fn run() -> Result<ExitCode> {
    println!("ferrospeed {}", env!("CARGO_PKG_VERSION"));
    println!("features: {}", if cfg!(feature = "cuda") { "cuda" } else { "(none: CPU only)" });
    if let Ok(v) = std::fs::read_to_string("/proc/version") {
        println!("os: {}", v.split_whitespace().take(3).collect::<Vec<_>>().join(" "));
    }
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| c.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string()))
        .unwrap_or_default();
    println!("cpu: {} cores, {cpu}", std::thread::available_parallelism().map_or(0, |n| n.get()));
    gpus();
    let libs = loaded_libraries();
    if !libs.is_empty() {
        println!("libraries loaded:");
        for l in libs {
            println!("  {l}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(feature = "cuda")]
fn gpus() {
    use candle_core::cuda::cudarc::driver::{sys, CudaContext};
    let mut version = 0i32;
    // SAFETY: a plain driver query.
    let driver = unsafe { sys::cuDriverGetVersion(&mut version) };
    if driver == sys::CUresult::CUDA_SUCCESS {
        println!("cuda driver api: {}.{}", version / 1000, (version % 1000) / 10);
    }
    match CudaContext::device_count() {
        Ok(n) => {
            println!("gpus: {n}");
            for i in 0..n.max(0) as usize {
                match CudaContext::new(i) {
                    Ok(ctx) => println!(
                        "  {i}: {} (compute capability {:?}, {:.1} GiB)",
                        ctx.name().unwrap_or_default(),
                        ctx.compute_capability().unwrap_or((0, 0)),
                        ctx.total_mem().unwrap_or(0) as f64 / (1u64 << 30) as f64
                    ),
                    Err(e) => println!("  {i}: cannot open: {e}"),
                }
            }
        }
        Err(e) => println!("gpus: none usable ({e})"),
    }
}

#[cfg(not(feature = "cuda"))]
fn gpus() {
    println!("gpus: not compiled in (build with --features cuda)");
}

/// Paths of the CUDA-family shared libraries mapped into this process.
fn loaded_libraries() -> Vec<String> {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let mut libs: Vec<String> = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .filter(|p| ["libcuda", "libcublas", "libnccl", "libnvrtc", "libcurand", "libcudart"].iter().any(|n| p.contains(n)))
        .map(str::to_string)
        .collect();
    libs.sort();
    libs.dedup();
    libs
}
