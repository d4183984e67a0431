//! Collectives, timeouts and failures with ranks as threads (fast; the multi-process versions run
//! through `ferrospeed launch` in the CLI crate's tests).

mod common;

use common::run_world;
use ferrospeed::comm::{reference_reduce, OpKind, TensorCollectives};
use ferrospeed::{CommConfig, CommError, CommExt, Communicator, ReduceOp, ShardLayout};
use std::time::{Duration, Instant};

fn data(rank: usize, n: usize) -> Vec<f32> {
    (0..n).map(|i| ((rank * 7919 + i * 104729) % 1000) as f32 * 0.37 - 150.0 + 1e-3 * rank as f32).collect()
}

#[test]
fn all_reduce_equals_reduce_scatter_then_all_gather_and_the_reference() {
    let cfg = CommConfig::default();
    for world in [1, 2, 3] {
        for n in [0, 1, 2, 5, 1000, 300_001] {
            let out = run_world(world, &cfg, |c| {
                let r = c.rank();
                let mut ar = data(r, n);
                c.all_reduce_slice(&mut ar, ReduceOp::Sum).unwrap();
                let layout = ShardLayout::new(n, world, 1);
                let mut shard = vec![0f32; layout.range(r).len()];
                c.reduce_scatter_slice(&data(r, n), &mut shard, ReduceOp::Sum).unwrap();
                let mut gathered = vec![0f32; n];
                c.all_gather_slice(&shard, &mut gathered).unwrap();
                (ar, gathered)
            });
            let inputs: Vec<Vec<f32>> = (0..world).map(|r| data(r, n)).collect();
            let expected = reference_reduce(&inputs, ReduceOp::Sum);
            for (rank, (ar, rsag)) in out.iter().enumerate() {
                assert_eq!(bits(ar), bits(&expected), "world {world} n {n} rank {rank}: all_reduce");
                assert_eq!(bits(rsag), bits(&expected), "world {world} n {n} rank {rank}: rs+ag");
            }
        }
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn broadcast_from_every_root_and_tensor_wrappers() {
    let out = run_world(3, &CommConfig::default(), |c| {
        let mut results = Vec::new();
        for root in 0..3 {
            let mut v = data(c.rank(), 11);
            c.broadcast_slice(&mut v, root).unwrap();
            results.push(v);
        }
        let t = candle_core::Tensor::from_vec(data(c.rank(), 6), (2, 3), &candle_core::Device::Cpu).unwrap();
        let summed = c.all_reduce_tensor(&t, ReduceOp::Avg).unwrap();
        assert_eq!(summed.dims(), &[2, 3]);
        (results, summed.flatten_all().unwrap().to_vec1::<f32>().unwrap())
    });
    let expected_avg = reference_reduce(&(0..3).map(|r| data(r, 6)).collect::<Vec<_>>(), ReduceOp::Avg);
    for (results, avg) in &out {
        for (root, v) in results.iter().enumerate() {
            assert_eq!(v, &data(root, 11));
        }
        assert_eq!(bits(avg), bits(&expected_avg));
    }
}

#[test]
fn skipped_collective_times_out_naming_the_missing_rank_on_every_waiting_rank() {
    let cfg = CommConfig { timeout: Duration::from_millis(1500), ..CommConfig::default() };
    let t0 = Instant::now();
    // Sequence numbers: #0 is the barrier that ends group formation, #1 the test's barrier.
    let out = run_world(3, &cfg, |c| {
        c.barrier().unwrap();
        if c.rank() == 1 {
            // Skip the all_reduce and stay alive past the others' timeout.
            std::thread::sleep(Duration::from_millis(4000));
            return None;
        }
        let start = Instant::now();
        let mut v = vec![1f32; 10];
        let err = c.all_reduce_slice(&mut v, ReduceOp::Sum).unwrap_err();
        Some((err, start.elapsed(), c.recent_ops()))
    });
    for (rank, res) in out.into_iter().enumerate() {
        let Some((err, waited, recent)) = res else { continue };
        let msg = err.to_string();
        assert!(matches!(err, CommError::Timeout { op: OpKind::AllReduce, seq: 2, .. }), "rank {rank}: {msg}");
        assert_eq!(err.missing_ranks(), &[1], "rank {rank}: {msg}");
        assert!(msg.contains("all_reduce #2") && msg.contains("rank 1 last entered barrier #1"), "{msg}");
        assert!(msg.contains("#1 barrier done"), "flight recorder printed: {msg}");
        assert!(waited < Duration::from_millis(1500) + Duration::from_secs(5), "took {waited:?}");
        assert!(recent.contains("all_reduce f32×10 failed"), "{recent}");
    }
    assert!(t0.elapsed() < Duration::from_secs(20));
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
        assert!(waited < Duration::from_secs(10), "failure must not wait for the timeout: {waited:?}");
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
    let out = run_world(3, &CommConfig::default(), |c| {
        let full = data(c.rank(), 1000);
        let mut a = full.clone();
        c.all_reduce_slice(&mut a, ReduceOp::Sum).unwrap();
        let mut b = full[333..777].to_vec();
        c.all_reduce_slice(&mut b, ReduceOp::Sum).unwrap();
        (a, b)
    });
    for (a, b) in out {
        assert_eq!(bits(&a[333..777]), bits(&b));
    }
}
