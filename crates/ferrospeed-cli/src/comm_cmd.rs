//! `ferrospeed comm check` and `ferrospeed comm bench`: is the group's communication correct, and how fast.
//!
//! Both join the group described by the environment (`ferrospeed launch`, torchrun, Slurm, Open MPI).
//! `check` compares every collective, on every dtype, with a single-process reference bit for bit;
//! `bench` reports all_reduce bus bandwidth like nccl-tests (`busbw = bytes/time × 2(W−1)/W`).

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use ferrospeed::comm::{reference_reduce, Element, TcpCommunicator};
use ferrospeed::{CommConfig, CommExt, Communicator, ReduceOp, ShardLayout, WorldInfo};
use half::{bf16, f16};
use std::process::ExitCode;
use std::time::{Duration, Instant};

#[derive(Subcommand, Debug)]
pub enum CommCommand {
    /// Run every collective on f32, bf16 and f16 and compare with a single-process reference, bit for bit
    Check(CheckArgs),
    /// Measure all_reduce bus bandwidth over a range of message sizes
    Bench(BenchArgs),
}

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// Buffer sizes in elements (sizes that do not divide by the world size are the interesting ones)
    #[arg(long, value_delimiter = ',', default_value = "0,1,2,3,5,7,64,1000,4097,300001")]
    pub sizes: Vec<usize>,
    /// Seed of the test data
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Seconds a collective may wait before failing
    #[arg(long)]
    pub timeout: Option<f64>,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Message sizes in bytes
    #[arg(long, value_delimiter = ',', default_value = "4096,65536,1048576,4194304,16777216,67108864")]
    pub sizes: Vec<usize>,
    /// Timed iterations per size [default: enough for about half a second]
    #[arg(long)]
    pub iters: Option<usize>,
    /// Untimed iterations per size
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
}

pub fn run(cmd: CommCommand) -> Result<ExitCode> {
    let world = WorldInfo::from_env().context("reading the rank environment")?;
    let mut cfg = CommConfig::from_env()?;
    if let CommCommand::Check(CheckArgs { timeout: Some(t), .. }) = &cmd {
        cfg.timeout = Duration::from_secs_f64(*t);
    }
    let comm = TcpCommunicator::connect(&world, &cfg).context("forming the process group")?;
    match cmd {
        CommCommand::Check(args) => check(&comm, &args),
        CommCommand::Bench(args) => bench(&comm, &args),
    }
}

/// Deterministic test values, different per rank, size and dtype, rounded to the dtype.
fn values<T: Element>(seed: u64, rank: usize, n: usize) -> Vec<T> {
    let mut state = seed ^ (rank as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (n as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
    (0..n)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            let unit = (z >> 40) as f32 / (1u64 << 24) as f32; // [0, 1)
            T::from_f32((unit - 0.5) * 16.0)
        })
        .collect()
}

/// FNV-1a over the bytes of results, so repeated runs can be compared with one number.
struct Digest(u64);

impl Digest {
    fn add<T: Element>(&mut self, v: &[T]) {
        for b in bytemuck_bytes(v) {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x100_0000_01B3);
        }
    }
}

fn bytemuck_bytes<T: Element>(v: &[T]) -> &[u8] {
    // Element is Pod, so viewing it as bytes is sound.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

struct Tally {
    checks: usize,
    failures: Vec<String>,
    digest: Digest,
}

impl Tally {
    fn compare<T: Element>(&mut self, what: impl Fn() -> String, got: &[T], expected: &[T]) {
        self.checks += 1;
        self.digest.add(got);
        if bytemuck_bytes(got) != bytemuck_bytes(expected) {
            let first = (0..got.len().min(expected.len())).find(|i| bytemuck_bytes(&got[*i..=*i]) != bytemuck_bytes(&expected[*i..=*i]));
            self.failures.push(match first {
                Some(i) => format!("{}: element {i} is {} but the reference is {}", what(), got[i].to_f32(), expected[i].to_f32()),
                None => format!("{}: length {} but the reference has {}", what(), got.len(), expected.len()),
            });
        }
    }
}

fn check_dtype<T: Element>(comm: &TcpCommunicator, args: &CheckArgs, tally: &mut Tally) -> Result<()> {
    let (rank, world) = (comm.rank(), comm.world_size());
    let dt = T::DTYPE;
    for &n in &args.sizes {
        let inputs: Vec<Vec<T>> = (0..world).map(|r| values(args.seed, r, n)).collect();
        let layout = ShardLayout::new(n, world, 1);
        let mine = layout.range(rank);
        for op in [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max] {
            let expected = reference_reduce(&inputs, op);
            let mut all_reduced = inputs[rank].clone();
            comm.all_reduce_slice(&mut all_reduced, op)?;
            tally.compare(|| format!("all_reduce {op:?} {dt} n={n}"), &all_reduced, &expected);

            let mut shard = vec![T::default(); mine.len()];
            comm.reduce_scatter_slice(&inputs[rank], &mut shard, op)?;
            tally.compare(|| format!("reduce_scatter {op:?} {dt} n={n}"), &shard, &expected[mine.clone()]);

            let mut gathered = vec![T::default(); n];
            comm.all_gather_slice(&shard, &mut gathered)?;
            tally.compare(|| format!("reduce_scatter+all_gather vs all_reduce {op:?} {dt} n={n}"), &gathered, &all_reduced);
        }
        // all_gather of every rank's own piece rebuilds a buffer made of each rank's data.
        let expected: Vec<T> = (0..world).flat_map(|r| inputs[r][layout.range(r)].to_vec()).collect();
        let mut gathered = vec![T::default(); n];
        comm.all_gather_slice(&inputs[rank][mine.clone()], &mut gathered)?;
        tally.compare(|| format!("all_gather {dt} n={n}"), &gathered, &expected);

        let root = n % world;
        let mut buf = inputs[rank].clone();
        comm.broadcast_slice(&mut buf, root)?;
        tally.compare(|| format!("broadcast from rank {root} {dt} n={n}"), &buf, &inputs[root]);
    }
    comm.barrier()?;
    Ok(())
}

fn check(comm: &TcpCommunicator, args: &CheckArgs) -> Result<ExitCode> {
    let mut tally = Tally { checks: 0, failures: Vec::new(), digest: Digest(0xCBF2_9CE4_8422_2325) };
    check_dtype::<f32>(comm, args, &mut tally)?;
    check_dtype::<bf16>(comm, args, &mut tally)?;
    check_dtype::<f16>(comm, args, &mut tally)?;
    for f in tally.failures.iter().take(10) {
        eprintln!("MISMATCH on rank {}: {f}", comm.rank());
    }
    let mut worst = [tally.failures.len() as f32];
    comm.all_reduce_slice(&mut worst, ReduceOp::Max)?;
    println!("rank {} digest {:016x}", comm.rank(), tally.digest.0);
    if comm.rank() == 0 {
        if worst[0] == 0.0 {
            println!("comm check: {} checks on {} ranks: all passed", tally.checks, comm.world_size());
        } else {
            println!("comm check: FAILED on {} ranks: up to {} mismatches on one rank", comm.world_size(), worst[0]);
        }
    }
    Ok(if worst[0] == 0.0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

fn bench(comm: &TcpCommunicator, args: &BenchArgs) -> Result<ExitCode> {
    let world = comm.world_size();
    if comm.rank() == 0 {
        println!("all_reduce f32, {world} ranks (busbw = algbw × 2(W−1)/W)");
        println!("| bytes | iters | time (us) | algbw (GB/s) | busbw (GB/s) |");
        println!("|---:|---:|---:|---:|---:|");
    }
    for &bytes in &args.sizes {
        let mut buf = vec![1f32; (bytes / 4).max(1)];
        let t = Instant::now();
        for _ in 0..args.warmup.max(1) {
            comm.all_reduce_slice(&mut buf, ReduceOp::Sum)?;
        }
        // Every rank must run the same number of iterations: agree on the slowest warm-up.
        let mut per_iter = [t.elapsed().as_secs_f32() / args.warmup.max(1) as f32];
        comm.all_reduce_slice(&mut per_iter, ReduceOp::Max)?;
        let iters = args.iters.unwrap_or_else(|| ((0.5 / per_iter[0].max(1e-6)) as usize).clamp(3, 1000));
        comm.barrier()?;
        let t = Instant::now();
        for _ in 0..iters {
            comm.all_reduce_slice(&mut buf, ReduceOp::Sum)?;
        }
        let mut secs = [t.elapsed().as_secs_f32() / iters as f32];
        comm.all_reduce_slice(&mut secs, ReduceOp::Max)?;
        let bytes = buf.len() * 4;
        let algbw = bytes as f64 / f64::from(secs[0]) / 1e9;
        let busbw = algbw * 2.0 * (world - 1) as f64 / world as f64;
        if comm.rank() == 0 {
            println!("| {bytes} | {iters} | {:.1} | {algbw:.3} | {busbw:.3} |", secs[0] * 1e6);
        }
    }
    Ok(ExitCode::SUCCESS)
}
