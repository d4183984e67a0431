//! Collectives, timeouts and failures with ranks as threads (fast; the multi-process versions run
//! through `ferrospeed launch` in the CLI crate's tests).

mod common;

use common::run_world;
use ferrospeed::comm::{Element, OpKind, TcpCommunicator, TensorCollectives};
use ferrospeed::rng::Rng;
use ferrospeed::{CommConfig, CommError, CommExt, Communicator, ReduceOp, ShardLayout};
use half::{bf16, f16};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// An element type under test, converted with `half` directly rather than through the crate's
/// `Element` impls, so the reference below shares no code with the backend.
trait Ty: Element + std::fmt::Debug {
    const NAME: &'static str;
    /// Magnitude of the values that cancel across ranks: large enough that f32 absorbs `SMALL` next to it
    /// (f16 holds at most 65504, hence 1e4 there).
    const BIG: f64;
    const SMALL: f64;
    fn widen(self) -> f32;
    fn round(x: f32) -> Self;
    fn bits(self) -> u32;
}

impl Ty for f32 {
    const NAME: &'static str = "f32";
    const BIG: f64 = 1e8;
    const SMALL: f64 = 1.0;
    fn widen(self) -> f32 {
        self
    }
    fn round(x: f32) -> Self {
        x
    }
    fn bits(self) -> u32 {
        self.to_bits()
    }
}

impl Ty for bf16 {
    const NAME: &'static str = "bf16";
    const BIG: f64 = 1e8;
    const SMALL: f64 = 1.0;
    fn widen(self) -> f32 {
        bf16::to_f32(self)
    }
    fn round(x: f32) -> Self {
        bf16::from_f32(x)
    }
    fn bits(self) -> u32 {
        u32::from(self.to_bits())
    }
}

impl Ty for f16 {
    const NAME: &'static str = "f16";
    const BIG: f64 = 1e4;
    const SMALL: f64 = 1e-4;
    fn widen(self) -> f32 {
        f16::to_f32(self)
    }
    fn round(x: f32) -> Self {
        f16::from_f32(x)
    }
    fn bits(self) -> u32 {
        u32::from(self.to_bits())
    }
}

/// The documented reduction written out: for each element, `acc = x[order[0]]` in f32, then `acc ∘ x[r]`
/// for the remaining ranks of `order` (+ for Sum and Avg; max with NaN winning for Max), `/ world` for Avg,
/// rounded once to `T`. The collectives' contract is `order = 0, 1, …, W−1`.
fn reference<T: Ty>(inputs: &[Vec<T>], op: ReduceOp, order: &[usize]) -> Vec<T> {
    let n = inputs.first().map_or(0, Vec::len);
    (0..n)
        .map(|i| {
            let mut acc = inputs[order[0]][i].widen();
            for &r in &order[1..] {
                let x = inputs[r][i].widen();
                acc = match op {
                    ReduceOp::Sum | ReduceOp::Avg => acc + x,
                    ReduceOp::Max if acc.is_nan() || x.is_nan() => f32::NAN,
                    ReduceOp::Max => {
                        if x > acc {
                            x
                        } else {
                            acc
                        }
                    }
                };
            }
            if op == ReduceOp::Avg {
                acc /= order.len() as f32;
            }
            T::round(acc)
        })
        .collect()
}

/// One input per rank, seeded. On about half the elements one rank holds `+B` and another `−B` with
/// small values elsewhere, so a sum depends on when the two meet (`1e8 + 1 − 1e8` is 0 in f32,
/// `1e8 − 1e8 + 1` is 1); the others mix magnitudes 1, 1e4 and 1e8 (scaled per type); about one
/// element in 64 has a NaN on one rank, which must win a Max.
fn inputs<T: Ty>(world: usize, n: usize, seed: u64) -> Vec<Vec<T>> {
    let mut rng = Rng::new(seed);
    let mut x: Vec<Vec<T>> = (0..world).map(|_| Vec::with_capacity(n)).collect();
    for _ in 0..n {
        let mut column: Vec<f32> = (0..world)
            .map(|_| {
                let scale = [T::SMALL, (T::SMALL * T::BIG).sqrt(), T::BIG][rng.below(3) as usize];
                (rng.normal() * scale) as f32
            })
            .collect();
        if world >= 2 && rng.below(2) == 0 {
            let plus = rng.below(world as u64) as usize;
            let minus = (plus + 1 + rng.below(world as u64 - 1) as usize) % world;
            let big = T::round((T::BIG * (1.0 + rng.next_f64())) as f32).widen();
            for (r, v) in column.iter_mut().enumerate() {
                *v = if r == plus { big } else if r == minus { -big } else { (rng.normal() * T::SMALL) as f32 };
            }
        }
        if rng.below(64) == 0 {
            column[rng.below(world as u64) as usize] = f32::NAN;
        }
        for (rank, v) in x.iter_mut().zip(column) {
            rank.push(T::round(v));
        }
    }
    x
}

/// Bitwise equal, except that any NaN equals any NaN (the payload of a NaN is not part of the contract).
fn same<T: Ty>(a: T, b: T) -> bool {
    a.bits() == b.bits() || (a.widen().is_nan() && b.widen().is_nan())
}

/// `None` when `got` equals `want` element for element, else a description of the differences.
fn differences<T: Ty>(got: &[T], want: &[T]) -> Option<String> {
    if got.len() != want.len() {
        return Some(format!("{} elements, expected {}", got.len(), want.len()));
    }
    let bad: Vec<usize> = (0..got.len()).filter(|&i| !same(got[i], want[i])).collect();
    let &first = bad.first()?;
    Some(format!("{} of {} elements differ; first at {first}: got {:?}, expected {:?}", bad.len(), got.len(), got[first], want[first]))
}

/// Inputs and expected results of one (world, size, dtype).
struct Case<T> {
    inputs: Vec<Vec<T>>,
    reduced: [(ReduceOp, Vec<T>); 3],
    /// Every rank's own range of its own input, side by side: what `all_gather` of those ranges gives.
    gathered: Vec<T>,
}

impl<T: Ty> Case<T> {
    fn new(world: usize, n: usize, seed: u64) -> Self {
        let inputs = inputs::<T>(world, n, seed);
        let order: Vec<usize> = (0..world).collect();
        let reduced = [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max].map(|op| (op, reference(&inputs, op, &order)));
        let layout = ShardLayout::new(n, world, 1);
        let gathered = (0..world).flat_map(|r| inputs[r][layout.range(r)].to_vec()).collect();
        Self { inputs, reduced, gathered }
    }
}

/// Run every collective of `cases` on this rank; returns the mismatches instead of panicking, so that
/// all ranks keep issuing the same collectives and the report names every wrong one.
fn check_rank<T: Ty>(c: &TcpCommunicator, cases: &[Case<T>]) -> Vec<String> {
    let (rank, world) = (c.rank(), c.world_size());
    let mut failures = Vec::new();
    for case in cases {
        let input = &case.inputs[rank];
        let n = input.len();
        let mine = ShardLayout::new(n, world, 1).range(rank);
        let mut check = |what: String, got: &[T], want: &[T]| {
            if let Some(d) = differences(got, want) {
                failures.push(format!("{} world {world} n {n} rank {rank} {what}: {d}", T::NAME));
            }
        };
        for (op, want) in &case.reduced {
            let mut buf = input.clone();
            c.all_reduce_slice(&mut buf, *op).unwrap();
            check(format!("all_reduce {op:?}"), &buf, want);
            let mut shard = vec![T::default(); mine.len()];
            c.reduce_scatter_slice(input, &mut shard, *op).unwrap();
            check(format!("reduce_scatter {op:?}"), &shard, &want[mine.clone()]);
            let mut full = vec![T::default(); n];
            c.all_gather_slice(&shard, &mut full).unwrap();
            check(format!("reduce_scatter {op:?} then all_gather"), &full, want);
        }
        let mut gathered = vec![T::default(); n];
        c.all_gather_slice(&input[mine.clone()], &mut gathered).unwrap();
        check("all_gather".into(), &gathered, &case.gathered);
        for root in 0..world {
            let mut buf = input.clone();
            c.broadcast_slice(&mut buf, root).unwrap();
            check(format!("broadcast from {root}"), &buf, &case.inputs[root]);
        }
    }
    failures
}

/// How many elements the sum over `order` gives differently from the sum in rank order.
fn order_sensitivity<T: Ty>(inputs: &[Vec<T>], order: &[usize]) -> usize {
    let forward = reference(inputs, ReduceOp::Sum, &(0..inputs.len()).collect::<Vec<_>>());
    let other = reference(inputs, ReduceOp::Sum, order);
    forward.iter().zip(&other).filter(|(a, b)| !same(**a, **b)).count()
}

fn assert_data_tells_orders_apart<T: Ty>(world: usize, case: &Case<T>) {
    // Two contributions commute exactly in IEEE arithmetic, so only three or more ranks have an order.
    if world < 3 {
        return;
    }
    let reverse: Vec<usize> = (0..world).rev().collect();
    // The last rank folding its own contribution first, then the others in rank order.
    let owner_first: Vec<usize> = std::iter::once(world - 1).chain(0..world - 1).collect();
    for order in [reverse, owner_first] {
        let n = order_sensitivity(&case.inputs, &order);
        assert!(n > 0, "{} world {world}: the data gives the same sums in order {order:?}; the test could not fail", T::NAME);
    }
}

#[test]
fn collectives_match_a_plain_rank_order_reference_bit_for_bit() {
    let sizes = [0, 1, 2, 7, 1001, 300_007];
    for world in 1..=4 {
        let seed = |n: usize, dtype: u64| 1000 * world as u64 + 10 * n as u64 + dtype;
        let f32s: Vec<Case<f32>> = sizes.iter().map(|&n| Case::new(world, n, seed(n, 1))).collect();
        let bf16s: Vec<Case<bf16>> = sizes.iter().map(|&n| Case::new(world, n, seed(n, 2))).collect();
        let f16s: Vec<Case<f16>> = sizes.iter().map(|&n| Case::new(world, n, seed(n, 3))).collect();
        assert_data_tells_orders_apart(world, f32s.last().unwrap());
        assert_data_tells_orders_apart(world, bf16s.last().unwrap());
        assert_data_tells_orders_apart(world, f16s.last().unwrap());
        let out = run_world(world, &CommConfig::default(), |c| {
            let mut failures = check_rank(&c, &f32s);
            failures.extend(check_rank(&c, &bf16s));
            failures.extend(check_rank(&c, &f16s));
            failures
        });
        let failures: Vec<String> = out.into_iter().flatten().collect();
        assert!(failures.is_empty(), "{} mismatches against the rank-order reference:\n{}", failures.len(), failures.join("\n"));
    }
}

#[test]
fn all_reduce_tensor_keeps_the_shape_and_matches_the_reference() {
    let inputs = inputs::<f32>(3, 6, 77);
    let out = run_world(3, &CommConfig::default(), |c| {
        let t = candle_core::Tensor::from_vec(inputs[c.rank()].clone(), (2, 3), &candle_core::Device::Cpu).unwrap();
        let avg = c.all_reduce_tensor(&t, ReduceOp::Avg).unwrap();
        (avg.dims().to_vec(), avg.flatten_all().unwrap().to_vec1::<f32>().unwrap())
    });
    let expected = reference(&inputs, ReduceOp::Avg, &[0, 1, 2]);
    for (rank, (dims, avg)) in out.iter().enumerate() {
        assert_eq!(dims, &[2, 3], "rank {rank}");
        assert_eq!(differences(avg, &expected), None, "rank {rank}");
    }
}

/// Ranks that have finished waiting on the skipped collective, and the condition they signal.
struct Arrivals {
    count: Mutex<usize>,
    changed: Condvar,
}

impl Arrivals {
    /// Count this rank in, then wait (up to `deadline`) until `expected` ranks are in; false on the deadline.
    fn arrive_and_wait(&self, arriving: bool, expected: usize, deadline: Duration) -> bool {
        let mut count = self.count.lock().unwrap();
        if arriving {
            *count += 1;
            self.changed.notify_all();
        }
        let (count, _) = self.changed.wait_timeout_while(count, deadline, |c| *c < expected).unwrap();
        *count >= expected
    }
}

#[test]
fn skipped_collective_times_out_naming_the_missing_rank_on_every_waiting_rank() {
    let cfg = CommConfig { timeout: Duration::from_millis(1500), ..CommConfig::default() };
    // The skipping rank stays alive until both waiting ranks have their error (so what they see is the
    // timeout, not a closed link); the waiting ranks also wait for each other before closing theirs.
    let arrivals = Arrivals { count: Mutex::new(0), changed: Condvar::new() };
    let generous = Duration::from_secs(60);
    // Sequence numbers: #0 is the barrier that ends group formation, #1 the test's barrier.
    let out = run_world(3, &cfg, |c| {
        c.barrier().unwrap();
        if c.rank() == 1 {
            let released = arrivals.arrive_and_wait(false, 2, generous);
            return Err(released);
        }
        let start = Instant::now();
        let mut v = vec![1f32; 10];
        let err = c.all_reduce_slice(&mut v, ReduceOp::Sum).unwrap_err();
        let waited = start.elapsed();
        arrivals.arrive_and_wait(true, 2, generous);
        Ok((err, waited, c.recent_ops()))
    });
    for (rank, res) in out.into_iter().enumerate() {
        let (err, waited, recent) = match res {
            Ok(r) => r,
            Err(released) => {
                assert!(released, "rank {rank}: the waiting ranks did not return within {generous:?}");
                continue;
            }
        };
        let msg = err.to_string();
        assert!(matches!(err, CommError::Timeout { op: OpKind::AllReduce, seq: 2, .. }), "rank {rank}: {msg}");
        assert_eq!(err.missing_ranks(), &[1], "rank {rank}: {msg}");
        assert!(msg.contains("all_reduce #2") && msg.contains("rank 1 last entered barrier #1"), "{msg}");
        assert!(msg.contains("#1 barrier done"), "flight recorder printed: {msg}");
        // Tells the 1.5 s timeout apart from waiting on the skipping rank (released only after this).
        assert!(waited < Duration::from_secs(30), "rank {rank} took {waited:?}");
        assert!(recent.contains("all_reduce f32×10 failed"), "{recent}");
    }
}

#[test]
fn a_rank_that_leaves_is_named_at_once_and_the_communicator_stays_failed() {
    let cfg = CommConfig { timeout: Duration::from_secs(60), ..CommConfig::default() };
    let out = run_world(3, &cfg, |c| {
        c.barrier().unwrap();
        if c.rank() == 2 {
            drop(c); // closes its links, like a crashed process
            return None;
        }
        let start = Instant::now();
        let mut v = vec![1f32; 100_000];
        let err = c.all_reduce_slice(&mut v, ReduceOp::Sum).unwrap_err();
        let again = c.barrier().unwrap_err();
        Some((err, start.elapsed(), again))
    });
    for res in out.into_iter().flatten() {
        let (err, waited, again) = res;
        // Half the 60 s timeout: generous on a loaded machine, yet a wait for the timeout cannot pass.
        assert!(waited < Duration::from_secs(30), "failure must not wait for the timeout: {waited:?}");
        let msg = err.to_string();
        assert!(msg.contains("rank 2") || msg.contains("rank 0") || msg.contains("rank 1"), "{msg}");
        assert!(matches!(again, CommError::Poisoned { .. }), "{again}");
    }
}

#[test]
fn mismatched_collectives_are_reported_not_mixed() {
    let cfg = CommConfig { timeout: Duration::from_secs(10), ..CommConfig::default() };
    let out = run_world(2, &cfg, |c| {
        if c.rank() == 0 {
            let mut v = vec![1f32; 8];
            c.all_reduce_slice(&mut v, ReduceOp::Sum).err()
        } else {
            let mut v = vec![0f32; 8];
            c.broadcast_slice(&mut v, 0).err()
        }
    });
    for err in out {
        let msg = err.expect("must fail").to_string();
        assert!(msg.contains("collective mismatch") || msg.contains("connection to rank"), "{msg}");
    }
}

#[test]
fn bad_arguments_are_typed_errors() {
    let out = run_world(2, &CommConfig::default(), |c| {
        let mut small = vec![0f32; 1];
        let e1 = c.reduce_scatter_slice(&[1f32; 10], &mut small, ReduceOp::Sum).unwrap_err();
        let e2 = c.broadcast_slice(&mut [0f32; 3], 5).unwrap_err();
        // The group is still usable after argument errors: nothing was sent.
        c.barrier().unwrap();
        (e1.to_string(), e2.to_string())
    });
    assert!(out[0].0.contains("owns 5 of the 10"), "{}", out[0].0);
    assert!(out[0].1.contains("root 5"), "{}", out[0].1);
}

#[test]
fn sums_do_not_depend_on_chunking() {
    // The same values reduced as one buffer and as a sub-range must give the same bits: the fold
    // order is by rank, not by chunk.
    let inputs = inputs::<f32>(3, 1000, 5);
    let out = run_world(3, &CommConfig::default(), |c| {
        let full = inputs[c.rank()].clone();
        let mut a = full.clone();
        c.all_reduce_slice(&mut a, ReduceOp::Sum).unwrap();
        let mut b = full[333..777].to_vec();
        c.all_reduce_slice(&mut b, ReduceOp::Sum).unwrap();
        (a, b)
    });
    for (a, b) in out {
        assert_eq!(differences(&a[333..777], &b), None);
    }
}

#[test]
fn a_stranger_claiming_a_ranks_place_on_a_link_is_ignored() {
    use ferrospeed::comm::store::{StoreClient, StoreConfig, StoreServer};
    use ferrospeed::comm::{EnvSource, RdzvToken};
    use ferrospeed::WorldInfo;
    use std::io::Write;
    let token = RdzvToken::generate().unwrap();
    let server = StoreServer::bind("127.0.0.1:0", StoreConfig::new(token.clone(), 2)).unwrap();
    let port = server.local_addr().port();
    let world = |rank| WorldInfo {
        rank,
        world_size: 2,
        local_rank: rank,
        local_world_size: 2,
        master_addr: "127.0.0.1".into(),
        master_port: port,
        agent_store: true,
        source: EnvSource::Torchrun,
        token: Some(token.clone()),
    };
    let cfg = CommConfig { timeout: Duration::from_secs(20), rendezvous_timeout: Duration::from_secs(60), ..CommConfig::default() };
    let sum = |c: TcpCommunicator| {
        let mut v = [c.rank() as f32 + 1.0];
        c.all_reduce_slice(&mut v, ReduceOp::Sum).map(|()| v[0])
    };
    std::thread::scope(|s| {
        let rank0 = s.spawn(|| TcpCommunicator::connect(&world(0), &cfg).and_then(sum));
        // Rank 0 now listens for rank 1: a stranger gets there first with the greeting rank 1 would
        // send (magic, rank 1, world 2), padded to the length of an answer to the challenge.
        let watcher = StoreClient::connect(&server.local_addr().to_string(), &token, Duration::from_secs(10)).unwrap();
        let addr = watcher.wait("ferrospeed/addr/0", Duration::from_secs(60)).unwrap().expect("rank 0 publishes its address");
        let stranger = std::net::TcpStream::connect(String::from_utf8(addr).unwrap()).unwrap();
        let mut hello = Vec::new();
        for word in [0xFE55_0A11u32, 1, 2] {
            hello.extend_from_slice(&word.to_le_bytes());
        }
        hello.resize(64, 0);
        (&stranger).write_all(&hello).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        let rank1 = s.spawn(|| TcpCommunicator::connect(&world(1), &cfg).and_then(sum));
        let (r0, r1) = (rank0.join().unwrap(), rank1.join().unwrap());
        assert_eq!((r0.unwrap(), r1.unwrap()), (3.0, 3.0), "the real rank 1 joined, not the stranger");
    });
}
