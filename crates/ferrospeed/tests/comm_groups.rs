//! Sub-groups of the device mesh, point-to-point batches and all-to-all on the TCP backend, against
//! plain references computed here from every rank's inputs, at worlds 1–8 and every mesh shape.

mod common;

use common::run_world;
use ferrospeed::comm::{Element, OpKind, P2p, TcpCommunicator};
use ferrospeed::parallel::{Axis, Mesh, MeshComms};
use ferrospeed::{CommConfig, CommError, CommExt, Communicator, ReduceOp};
use half::{bf16, f16};
use std::sync::Arc;
use std::time::Duration;

/// A value owned by `rank`, element `i`, tagged by `salt`: exact in bf16 and f16 (small integers).
fn value(rank: usize, i: usize, salt: usize) -> f32 {
    ((rank * 7 + i * 3 + salt) % 23) as f32 - 11.0
}

fn values<T: Element>(rank: usize, n: usize, salt: usize) -> Vec<T> {
    (0..n).map(|i| T::from_f32(value(rank, i, salt))).collect()
}

/// The documented sum: members' contributions folded in group-rank order in f32, rounded once.
fn sum_reference<T: Element>(members: &[usize], n: usize, salt: usize) -> Vec<T> {
    (0..n)
        .map(|i| {
            let mut acc = 0f32;
            for &r in members {
                acc += T::from_f32(value(r, i, salt)).to_f32();
            }
            T::from_f32(acc)
        })
        .collect()
}

fn bits<T: Element>(v: &[T]) -> Vec<u8> {
    bytemuck::cast_slice(v).to_vec()
}

/// In `comm` (the group of `axis` holding `world_rank`): an all-reduce, an all-gather and a
/// broadcast of `T`, each checked against the reference for the members the mesh says it has.
fn check_group<T: Element>(mesh: &Mesh, axis: Axis, comm: &dyn Communicator, world_rank: usize, salt: usize) -> Result<(), String> {
    let (members, index) = mesh.group_of(axis, world_rank);
    let what = format!("{mesh} {axis} rank {world_rank} ({})", std::any::type_name::<T>());
    if comm.group().members() != members.as_slice() || comm.rank() != index || comm.world_size() != members.len() {
        return Err(format!("{what}: group {:?} rank {} of {}, mesh says {members:?} index {index}", comm.group().members(), comm.rank(), comm.world_size()));
    }
    let n = 5 + salt % 4;
    let mut buf = values::<T>(world_rank, n, salt);
    comm.all_reduce_slice(&mut buf, ReduceOp::Sum).map_err(|e| format!("{what}: {e}"))?;
    if bits(&buf) != bits(&sum_reference::<T>(&members, n, salt)) {
        return Err(format!("{what}: all_reduce differs"));
    }
    let mut gathered = vec![T::zeroed(); n * members.len()];
    comm.all_gather_slice(&values::<T>(world_rank, n, salt + 1), &mut gathered).map_err(|e| format!("{what}: {e}"))?;
    let want: Vec<T> = members.iter().flat_map(|&r| values::<T>(r, n, salt + 1)).collect();
    if bits(&gathered) != bits(&want) {
        return Err(format!("{what}: all_gather differs"));
    }
    let root = members.len() - 1;
    let mut b = if index == root { values::<T>(world_rank, n, salt + 2) } else { vec![T::zeroed(); n] };
    comm.broadcast_slice(&mut b, root).map_err(|e| format!("{what}: {e}"))?;
    if bits(&b) != bits(&values::<T>(members[root], n, salt + 2)) {
        return Err(format!("{what}: broadcast differs"));
    }
    Ok(())
}

#[test]
fn every_group_of_every_mesh_at_worlds_1_to_8_runs_collectives_like_the_reference() {
    let cfg = CommConfig { timeout: Duration::from_secs(60), ..CommConfig::default() };
    for world in 1..=8 {
        // Each shape on fresh threads would form the world again; form it once per world size
        // and split it for every shape instead (splits are cheap and must not disturb each other).
        let shapes = Mesh::every(world);
        let out = run_world(world, &cfg, |c| {
            let rank = c.rank();
            let world_comm: Arc<dyn Communicator> = Arc::new(c);
            let mut errors = Vec::new();
            for (s, mesh) in shapes.iter().enumerate() {
                let comms = match MeshComms::new(world_comm.clone(), *mesh) {
                    Ok(c) => c,
                    Err(e) => return vec![format!("{mesh}: {e}")],
                };
                for (a, axis) in Axis::ALL.into_iter().enumerate() {
                    let comm = comms.get(axis).as_ref();
                    let checked = match (s + a) % 3 {
                        0 => check_group::<f32>(mesh, axis, comm, rank, s + a),
                        1 => check_group::<bf16>(mesh, axis, comm, rank, s + a),
                        _ => check_group::<f16>(mesh, axis, comm, rank, s + a),
                    };
                    errors.extend(checked.err());
                }
                // The world still works between (and after) the groups' collectives.
                let mut one = vec![1f32];
                if let Err(e) = world_comm.all_reduce_slice(&mut one, ReduceOp::Sum) {
                    errors.push(format!("{mesh}: world all_reduce: {e}"));
                } else if one[0] != world as f32 {
                    errors.push(format!("{mesh}: world all_reduce gave {}", one[0]));
                }
            }
            errors
        });
        let errors: Vec<String> = out.into_iter().flatten().collect();
        assert!(errors.is_empty(), "world {world}: {} shapes, failures:\n{}", shapes.len(), errors.join("\n"));
    }
}

/// What rank `from` sends rank `to` as its `k`-th message of length `n`.
fn message<T: Element>(from: usize, to: usize, k: usize, n: usize) -> Vec<T> {
    values::<T>(from, n, 100 + to * 13 + k * 5)
}

#[test]
fn send_recv_batches_deliver_in_order_with_mixed_dtypes_at_worlds_2_to_8() {
    let cfg = CommConfig { timeout: Duration::from_secs(60), ..CommConfig::default() };
    for world in 2..=8 {
        let out = run_world(world, &cfg, |c| {
            let (rank, w) = (c.rank(), c.world_size());
            let (next, prev) = ((rank + 1) % w, (rank + w - 1) % w);
            // Two rounds, so the per-pair message numbers advance across batches; in each, an f32 and a
            // bf16 message to the next rank (uneven lengths) and the matching receives from the previous,
            // posted receive-first on odd ranks and send-first on even ones.
            for round in 0..2 {
                let (n1, n2) = (3 + round + rank, 1 + 2 * rank);
                let (p1, p2) = (3 + round + prev, 1 + 2 * prev);
                let a: Vec<f32> = message(rank, next, 2 * round, n1);
                let b: Vec<bf16> = message(rank, next, 2 * round + 1, n2);
                let mut ra = vec![0f32; p1];
                let mut rb = vec![bf16::ZERO; p2];
                let sends = vec![P2p::Send { peer: next, buf: f32::buf(&a) }, P2p::Send { peer: next, buf: bf16::buf(&b) }];
                let recvs = vec![P2p::Recv { peer: prev, buf: f32::buf_mut(&mut ra) }, P2p::Recv { peer: prev, buf: bf16::buf_mut(&mut rb) }];
                let ops = if rank % 2 == 1 { recvs.into_iter().chain(sends).collect() } else { sends.into_iter().chain(recvs).collect() };
                c.send_recv(ops).map_err(|e| format!("rank {rank} round {round}: {e}"))?;
                if bits(&ra) != bits(&message::<f32>(prev, rank, 2 * round, p1)) || bits(&rb) != bits(&message::<bf16>(prev, rank, 2 * round + 1, p2)) {
                    return Err(format!("rank {rank} round {round}: received the wrong data"));
                }
            }
            Ok(())
        });
        for r in out {
            r.unwrap_or_else(|e| panic!("world {world}: {e}"));
        }
    }
}

#[test]
fn a_cycle_of_large_sends_posted_before_receives_does_not_deadlock() {
    // Each rank sends 8 MiB to the next and receives from the previous. Sent one after the other
    // with blocking writes and no reader, this fills every socket buffer and hangs; a batch does not.
    let cfg = CommConfig { timeout: Duration::from_secs(60), ..CommConfig::default() };
    let n = 2 << 20;
    let out = run_world(3, &cfg, |c| {
        let (rank, w) = (c.rank(), c.world_size());
        let data: Vec<f16> = message(rank, (rank + 1) % w, 0, n);
        let mut got = vec![f16::ZERO; n];
        let prev = (rank + w - 1) % w;
        c.send_recv(vec![P2p::Send { peer: (rank + 1) % w, buf: f16::buf(&data) }, P2p::Recv { peer: prev, buf: f16::buf_mut(&mut got) }])
            .map_err(|e| e.to_string())?;
        if bits(&got) != bits(&message::<f16>(prev, rank, 0, n)) {
            return Err(format!("rank {rank}: wrong data"));
        }
        Ok(())
    });
    for r in out {
        r.unwrap();
    }
}

#[test]
fn a_send_on_one_thread_and_a_receive_on_another_run_at_once() {
    // A pipeline stage hands its sends to a sender thread and receives on its compute thread. Two
    // ranks each send 16 MiB to the other from a second thread while the first receives: if a batch
    // held the group for its whole length, both senders would fill the socket buffers with nobody
    // reading, and both receives would wait behind them until the timeout.
    let cfg = CommConfig { timeout: Duration::from_secs(30), ..CommConfig::default() };
    let n = 4 << 20;
    let out = run_world(2, &cfg, |c| {
        let rank = c.rank();
        let peer = 1 - rank;
        let comm = Arc::new(c);
        let sender = {
            let comm = comm.clone();
            std::thread::spawn(move || -> Result<(), String> {
                // Two batches to the same peer in a row, then a third: their order is their numbering.
                for k in 0..3 {
                    let data: Vec<f32> = message(rank, peer, k, n / (k + 1));
                    comm.send_recv(vec![P2p::Send { peer, buf: f32::buf(&data) }]).map_err(|e| e.to_string())?;
                }
                Ok(())
            })
        };
        for k in 0..3 {
            let mut got = vec![0f32; n / (k + 1)];
            comm.send_recv(vec![P2p::Recv { peer, buf: f32::buf_mut(&mut got) }]).map_err(|e| e.to_string())?;
            if bits(&got) != bits(&message::<f32>(peer, rank, k, n / (k + 1))) {
                return Err(format!("rank {rank}: message {k} wrong"));
            }
        }
        sender.join().map_err(|_| "sender panicked".to_string())?
    });
    for r in out {
        r.unwrap();
    }
}

/// Elements rank `from` sends rank `to` in the all-to-all: uneven, sometimes none.
fn count(from: usize, to: usize) -> usize {
    (from * 3 + to * 5) % 4
}

fn check_all_to_all<T: Element>(comm: &dyn Communicator, salt: usize) -> Result<(), String> {
    let members = comm.group().members().to_vec();
    let (me, w) = (comm.rank(), comm.world_size());
    // Counts and data are those of the members' world ranks, so every group shape gets different ones.
    let send_counts: Vec<usize> = (0..w).map(|p| count(members[me], members[p])).collect();
    let recv_counts: Vec<usize> = (0..w).map(|p| count(members[p], members[me])).collect();
    let input: Vec<T> = (0..w).flat_map(|p| values::<T>(members[me], send_counts[p], salt + members[p])).collect();
    let mut output = vec![T::zeroed(); recv_counts.iter().sum()];
    comm.all_to_all_slice(&input, &send_counts, &mut output, &recv_counts).map_err(|e| format!("rank {}: {e}", members[me]))?;
    let want: Vec<T> = (0..w).flat_map(|p| values::<T>(members[p], recv_counts[p], salt + members[me])).collect();
    if bits(&output) != bits(&want) {
        return Err(format!("rank {} of {:?}: all_to_all differs", members[me], members));
    }
    Ok(())
}

#[test]
fn all_to_all_with_uneven_splits_matches_the_reference_in_the_world_and_in_groups() {
    let cfg = CommConfig { timeout: Duration::from_secs(60), ..CommConfig::default() };
    for world in 1..=8 {
        let shapes = Mesh::every(world);
        let out = run_world(world, &cfg, |c| {
            let mut errors = Vec::new();
            errors.extend(check_all_to_all::<f32>(&c, 1).err());
            errors.extend(check_all_to_all::<bf16>(&c, 2).err());
            errors.extend(check_all_to_all::<f16>(&c, 3).err());
            let world_comm: Arc<dyn Communicator> = Arc::new(c);
            for mesh in &shapes {
                let comms = MeshComms::new(world_comm.clone(), *mesh).map_err(|e| e.to_string());
                let comms = match comms {
                    Ok(c) => c,
                    Err(e) => return vec![e],
                };
                for axis in [Axis::Ep, Axis::Cp, Axis::Tp] {
                    errors.extend(check_all_to_all::<bf16>(comms.get(axis).as_ref(), 7).err().map(|e| format!("{mesh} {axis}: {e}")));
                }
            }
            errors
        });
        let errors: Vec<String> = out.into_iter().flatten().collect();
        assert!(errors.is_empty(), "world {world}:\n{}", errors.join("\n"));
    }
}

#[test]
fn a_rank_missing_from_a_group_collective_is_named_in_world_terms_with_its_group() {
    let cfg = CommConfig { timeout: Duration::from_millis(1500), ..CommConfig::default() };
    let mesh = Mesh::new(4, 2, 1, 1, 1).unwrap();
    assert_eq!(mesh.groups(Axis::Pp), vec![vec![0, 2], vec![1, 3]]);
    let out = run_world(4, &cfg, |c: TcpCommunicator| {
        // The pipeline groups of pp = 2 × dp = 2, split under the name "dp" to check the name is the given one.
        let split = c.split("dp", &mesh.groups(Axis::Pp)).unwrap();
        let rank = c.rank();
        if rank == 3 {
            // Stays in the world but skips its group's all-reduce; waits until rank 1 has its error.
            std::thread::sleep(Duration::from_secs(4));
            return None;
        }
        let mut v = vec![1f32; 4];
        let r = split.all_reduce_slice(&mut v, ReduceOp::Sum);
        Some((rank, r))
    });
    let (_, err) = out.into_iter().flatten().find(|(r, _)| *r == 1).expect("rank 1 ran");
    let err = err.expect_err("rank 1 must time out");
    let msg = err.to_string();
    assert!(matches!(err, CommError::Timeout { op: OpKind::AllReduce, rank: 1, .. }), "{msg}");
    assert_eq!(err.missing_ranks(), &[3], "{msg}");
    assert!(msg.contains("group dp1 (world ranks [1, 3])") && msg.contains("rank 3 last entered barrier"), "{msg}");
}

#[test]
fn a_peer_that_never_sends_is_named_and_a_size_mismatch_is_a_desync() {
    let cfg = CommConfig { timeout: Duration::from_millis(1500), ..CommConfig::default() };
    let out = run_world(3, &cfg, |c| {
        let rank = c.rank();
        let mut got = vec![0f32; 4];
        match rank {
            // Rank 0 waits for rank 2, which is in a collective-free sleep.
            0 => Some(c.send_recv(vec![P2p::Recv { peer: 2, buf: f32::buf_mut(&mut got) }])),
            2 => {
                std::thread::sleep(Duration::from_secs(4));
                None
            }
            _ => None,
        }
    });
    let err = out[0].as_ref().unwrap().as_ref().expect_err("rank 0 must time out");
    let msg = err.to_string();
    assert!(matches!(err, CommError::Timeout { op: OpKind::SendRecv, .. }), "{msg}");
    assert_eq!(err.missing_ranks(), &[2], "{msg}");
    assert!(msg.contains("send_recv #0 of the world") && msg.contains("ranks [2] did not post the matching send or receive"), "{msg}");

    let cfg = CommConfig { timeout: Duration::from_secs(30), ..CommConfig::default() };
    let out = run_world(2, &cfg, |c| {
        if c.rank() == 0 {
            let data = vec![1f32; 5];
            c.send_recv(vec![P2p::Send { peer: 1, buf: f32::buf(&data) }]).err()
        } else {
            let mut got = vec![0f32; 6];
            c.send_recv(vec![P2p::Recv { peer: 0, buf: f32::buf_mut(&mut got) }]).err()
        }
    });
    let msg = out[1].as_ref().expect("the receiver sees the mismatch").to_string();
    assert!(msg.contains("rank 0 sent send_recv #0 (f32×5)") && msg.contains("send_recv #0 (f32×6)"), "{msg}");
}

#[test]
fn bad_splits_and_bad_peers_are_typed_errors() {
    let cfg = CommConfig::default();
    let out = run_world(2, &cfg, |c| {
        let overlap = c.split("dp", &[vec![0, 1], vec![1]]).err().map(|e| e.to_string());
        let missing = c.split("dp", &[vec![0]]).err().map(|e| e.to_string());
        let own = c.send_recv(vec![P2p::Send { peer: c.rank(), buf: f32::buf(&[1.0]) }]).err().map(|e| e.to_string());
        let far = c.send_recv(vec![P2p::Send { peer: 5, buf: f32::buf(&[1.0]) }]).err().map(|e| e.to_string());
        let counts = c.all_to_all_slice(&[1f32; 3], &[1, 1], &mut [0f32; 3], &[1, 2]).err().map(|e| e.to_string());
        [overlap, missing, own, far, counts]
    });
    let [overlap, missing, own, far, counts] = &out[0];
    assert!(overlap.as_deref().unwrap().contains("rank 1 is in two groups"), "{overlap:?}");
    assert!(missing.as_deref().unwrap().contains("rank 1 is in no group"), "{missing:?}");
    assert!(own.as_deref().unwrap().contains("this rank itself"), "{own:?}");
    assert!(far.as_deref().unwrap().contains("not a rank of the group"), "{far:?}");
    assert!(counts.as_deref().unwrap().contains("send counts add up to 2 for an input of 3"), "{counts:?}");
}
