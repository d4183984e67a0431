//! `ferrospeed bench-adamw`: the CPU AdamW (the optimizer an offloaded run steps on the host) over all
//! cores, against this host's memory bandwidth measured in the same process (STREAM-like copy and
//! triad over buffers of the same size), as one JSON line. AdamW moves 28 bytes per parameter (reads
//! parameter, gradient and both moments; writes parameter and moments), so its floor is the bandwidth.

use anyhow::Result;
use clap::Args;
use ferrospeed::optim::AdamW;
use rayon::prelude::*;
use std::process::ExitCode;
use std::time::Instant;

#[derive(Args, Debug)]
pub struct BenchAdamwArgs {
    /// Parameters updated per step (f32; four buffers of this many are allocated)
    #[arg(long, default_value_t = 500_000_000)]
    pub params: usize,
    /// Timed steps (after one untimed)
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
}

const CHUNK: usize = 1 << 16;

/// Median seconds of `runs` calls of `f`, after one untimed call.
fn median_secs(runs: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut t: Vec<f64> = (0..runs.max(1))
        .map(|_| {
            let t0 = Instant::now();
            f();
            t0.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

/// Buffers of `n` f32 filled in parallel (touched, so pages are resident before timing).
fn filled(n: usize, value: impl Fn(usize) -> f32 + Sync) -> Vec<f32> {
    let mut v = vec![0f32; n];
    v.par_chunks_mut(CHUNK).enumerate().for_each(|(c, s)| s.iter_mut().enumerate().for_each(|(i, x)| *x = value(c * CHUNK + i)));
    v
}

pub fn run(args: BenchAdamwArgs) -> Result<ExitCode> {
    let n = args.params;
    let hash = |i: usize| ((i.wrapping_mul(2_654_435_761) % 2001) as f32 - 1000.0) * 1e-3;
    let (mut p, g, mut m, mut v) = (filled(n, hash), filled(n, |i| hash(i + 7) * 0.1), filled(n, |_| 0.0), filled(n, |_| 0.0));
    let adamw = AdamW { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };
    let mut t = 0u64;
    let adam_s = median_secs(args.steps, || {
        t += 1;
        adamw.update_decayed(&mut p, &g, &mut m, &mut v, 1e-4, t, 0.1);
    });
    // Bandwidth over the same amount of memory: copy (1 read + 1 write stream) and triad (2 + 1).
    let (src, mut dst) = (filled(n, hash), filled(n, |_| 0.0));
    let copy_s = median_secs(args.steps, || dst.par_chunks_mut(CHUNK).zip(src.par_chunks(CHUNK)).for_each(|(d, s)| d.copy_from_slice(s)));
    let triad_s = median_secs(args.steps, || {
        dst.par_chunks_mut(CHUNK).zip(src.par_chunks(CHUNK)).zip(g.par_chunks(CHUNK)).for_each(|((d, a), b)| {
            d.iter_mut().zip(a).zip(b).for_each(|((d, a), b)| *d = a + 0.5 * b);
        })
    });
    let gb = |bytes_per_elem: f64, secs: f64| (n as f64 * bytes_per_elem / secs / 1e9 * 10.0).round() / 10.0;
    let line = serde_json::json!({
        "bench": "cpu_adamw",
        "threads": rayon::current_num_threads(),
        "params": n,
        "adamw_ms": (adam_s * 1e4).round() / 10.0,
        "adamw_gparams_s": (n as f64 / adam_s / 1e9 * 1000.0).round() / 1000.0,
        "adamw_gb_s": gb(28.0, adam_s),
        "copy_gb_s": gb(8.0, copy_s),
        "triad_gb_s": gb(12.0, triad_s),
        "adamw_of_copy": (gb(28.0, adam_s) / gb(8.0, copy_s) * 1000.0).round() / 1000.0,
        // Keep the result observable, so the update cannot be optimised away.
        "checksum": p.iter().step_by(n / 1000 + 1).map(|&x| x as f64).sum::<f64>() + dst[n / 2] as f64,
    });
    println!("{line}");
    Ok(ExitCode::SUCCESS)
}
