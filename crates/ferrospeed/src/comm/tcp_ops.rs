//! The collective algorithms of the TCP backend.
//!
//! Two primitives carry everything:
//! - `exchange`: send given slices to given peers and receive given slices from given peers, with one
//!   thread per incoming link and the calling thread sending. `all_gather`, broadcast's scatter, and
//!   `barrier` (empty messages) are exchanges.
//! - `reduce_into_own`: every peer sends this rank the piece it owns; the calling thread folds the
//!   pieces in rank order, segment by segment, as they arrive (so summing overlaps receiving).
//! `all_reduce` is `reduce_into_own` then `exchange` of the reduced pieces: bit for bit the same as
//! `reduce_scatter` followed by `all_gather`, since both fold in rank order.

use super::buffer::{Buf, BufMut};
use super::element::Element;
use super::error::CommError;
use super::reduce;
use super::tcp::{GroupInfo, LinkError, OpCtx, TcpCommunicator};
use super::wire::{Header, HEADER_LEN};
use super::{Communicator, OpKind, P2p, ReduceOp};
use crate::shard::ShardLayout;
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::mpsc::sync_channel;
use std::thread;
use std::time::{Duration, Instant};

/// Bytes per pipelined segment: large enough to amortise system calls, small enough to overlap.
const SEGMENT_BYTES: usize = 1 << 20;

fn segment_len<T>() -> usize {
    (SEGMENT_BYTES / std::mem::size_of::<T>()).max(1)
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

impl OpCtx<'_> {
    fn stream(&self, peer: usize) -> Result<&TcpStream, LinkError> {
        self.comm.peers[peer].as_ref().ok_or_else(|| LinkError::Internal(format!("no connection to rank {peer}")))
    }

    fn remaining(&self, peer: usize) -> Result<Duration, LinkError> {
        self.deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or(LinkError::Timeout { peer })
    }

    pub(super) fn write(&self, peer: usize, mut bytes: &[u8]) -> Result<(), LinkError> {
        let mut s = self.stream(peer)?;
        while !bytes.is_empty() {
            s.set_write_timeout(Some(self.remaining(peer)?)).map_err(|e| LinkError::Internal(e.to_string()))?;
            match s.write(bytes) {
                Ok(0) => return Err(LinkError::Closed { peer, reason: "connection closed".into() }),
                Ok(n) => bytes = &bytes[n..],
                Err(e) if e.kind() == ErrorKind::Interrupted || is_timeout(&e) => continue,
                Err(e) => return Err(LinkError::Closed { peer, reason: e.to_string() }),
            }
        }
        Ok(())
    }

    pub(super) fn read(&self, peer: usize, mut buf: &mut [u8]) -> Result<(), LinkError> {
        let mut s = self.stream(peer)?;
        while !buf.is_empty() {
            s.set_read_timeout(Some(self.remaining(peer)?)).map_err(|e| LinkError::Internal(e.to_string()))?;
            match s.read(buf) {
                Ok(0) => return Err(LinkError::Closed { peer, reason: "connection closed by the peer".into() }),
                Ok(n) => buf = &mut buf[n..],
                Err(e) if e.kind() == ErrorKind::Interrupted || is_timeout(&e) => continue,
                Err(e) => return Err(LinkError::Closed { peer, reason: e.to_string() }),
            }
        }
        Ok(())
    }

    fn header(&self, phase: u8, numel: usize) -> Header {
        Header { seq: self.seq, op: self.op, phase, dtype: self.dtype, numel: numel as u64 }
    }

    /// Read the next header from `peer` and check it is the message this rank expects.
    fn expect_header(&self, peer: usize, phase: u8, numel: usize) -> Result<(), LinkError> {
        self.expect(peer, self.header(phase, numel))
    }

    /// Read the next header from `peer` and check it is `expected`.
    pub(super) fn expect(&self, peer: usize, expected: Header) -> Result<(), LinkError> {
        let mut b = [0u8; HEADER_LEN];
        self.read(peer, &mut b)?;
        match Header::read(&mut &b[..]) {
            Ok(got) if got == expected => Ok(()),
            Ok(got) => Err(LinkError::Desync { peer, got: got.describe(), expected: expected.describe() }),
            Err(_) => Err(LinkError::Desync {
                peer,
                got: "bytes that are not a collective header".into(),
                expected: expected.describe(),
            }),
        }
    }

    /// Send each `(peer, data)`: all headers first, then the payloads one segment at a time, round
    /// robin, so every receiving peer makes progress together.
    fn send_segmented<T: Element>(&self, phase: u8, sends: &[(usize, &[T])]) -> Result<(), LinkError> {
        for (peer, data) in sends {
            self.write(*peer, &self.header(phase, data.len()).encode())?;
        }
        let seg = segment_len::<T>();
        let longest = sends.iter().map(|(_, d)| d.len()).max().unwrap_or(0);
        let mut off = 0;
        while off < longest {
            for (peer, data) in sends {
                if off < data.len() {
                    let end = (off + seg).min(data.len());
                    self.write(*peer, bytemuck::cast_slice(&data[off..end]))?;
                }
            }
            off += seg;
        }
        Ok(())
    }
}

/// Send `sends` and fill `recvs`, concurrently. Failures are recorded in `ctx`.
fn exchange<T: Element>(ctx: &OpCtx<'_>, phase: u8, sends: &[(usize, &[T])], recvs: Vec<(usize, &mut [T])>) {
    thread::scope(|s| {
        for (peer, out) in recvs {
            s.spawn(move || {
                let received = ctx.expect_header(peer, phase, out.len()).and_then(|()| ctx.read(peer, bytemuck::cast_slice_mut(out)));
                if let Err(e) = received {
                    ctx.fail(e);
                }
            });
        }
        if let Err(e) = ctx.send_segmented(phase, sends) {
            ctx.fail(e);
        }
    });
}

/// Every peer `p` gets `sends[p]`; this rank receives every peer's piece for `own` and leaves in `own`
/// the reduction of all ranks' pieces (its own included), folded in rank order.
fn reduce_into_own<T: Element>(ctx: &OpCtx<'_>, phase: u8, sends: &[(usize, &[T])], own: &mut [T], op: ReduceOp) {
    let (rank, world) = (ctx.comm.rank, ctx.comm.world_size);
    if world == 1 {
        // One contribution: the fold is the identity (x → f32 → x, and x / 1 = x), bit for bit.
        return;
    }
    let n = own.len();
    let seg = segment_len::<T>();
    thread::scope(|s| {
        let mut inbox = Vec::with_capacity(world);
        for peer in 0..world {
            if peer == rank {
                inbox.push(None);
                continue;
            }
            // Two segments of slack per link: enough to keep data flowing, bounded in memory.
            let (tx, rx) = sync_channel::<Vec<T>>(2);
            inbox.push(Some(rx));
            s.spawn(move || {
                let received = (|| {
                    ctx.expect_header(peer, phase, n)?;
                    let mut off = 0;
                    while off < n {
                        let end = (off + seg).min(n);
                        let mut piece = vec![T::zeroed(); end - off];
                        ctx.read(peer, bytemuck::cast_slice_mut(&mut piece))?;
                        if tx.send(piece).is_err() {
                            return Ok(()); // the reducer stopped because of another failure
                        }
                        off = end;
                    }
                    Ok(())
                })();
                if let Err(e) = received {
                    ctx.fail(e);
                }
            });
        }
        s.spawn(move || {
            if let Err(e) = ctx.send_segmented(phase, sends) {
                ctx.fail(e);
            }
        });
        let mut acc = vec![0f32; seg.min(n)];
        let mut off = 0;
        'segments: while off < n {
            let end = (off + seg).min(n);
            let acc = &mut acc[..end - off];
            for (peer, rx) in inbox.iter().enumerate() {
                let received;
                let piece: &[T] = match rx {
                    None => &own[off..end],
                    Some(rx) => match rx.recv() {
                        Ok(p) => {
                            received = p;
                            &received
                        }
                        Err(_) => break 'segments, // the receiving thread recorded why
                    },
                };
                if peer == 0 {
                    reduce::init(acc, piece);
                } else {
                    reduce::fold(acc, piece, op);
                }
            }
            reduce::finish(acc, &mut own[off..end], op, world);
            off = end;
        }
        // Dropping the inbox unblocks receivers still trying to hand over segments.
        drop(inbox);
    });
}

/// Split `buf` into the per-rank pieces of `layout` (align 1, so the pieces tile the buffer).
fn split_by_rank<'a, T>(mut buf: &'a mut [T], layout: &ShardLayout) -> Vec<&'a mut [T]> {
    let mut pieces = Vec::with_capacity(layout.world_size());
    for rank in 0..layout.world_size() {
        let (head, tail) = std::mem::take(&mut buf).split_at_mut(layout.range(rank).len());
        pieces.push(head);
        buf = tail;
    }
    pieces
}

/// The pieces for the other ranks, starting after `rank` so that ranks do not all send to rank 0 first.
fn others<'a, T>(pieces: Vec<&'a mut [T]>, rank: usize) -> Vec<(usize, &'a mut [T])> {
    let world = pieces.len();
    let mut indexed: Vec<(usize, &mut [T])> = pieces.into_iter().enumerate().filter(|(p, _)| *p != rank).collect();
    indexed.sort_by_key(|(p, _)| (p + world - rank) % world);
    indexed
}

fn shared<'a, T>(pieces: Vec<(usize, &'a mut [T])>) -> Vec<(usize, &'a [T])> {
    pieces.into_iter().map(|(p, s)| (p, &*s)).collect()
}

fn peers_of(rank: usize, world: usize) -> impl Iterator<Item = usize> {
    (1..world).map(move |i| (rank + i) % world)
}

impl TcpCommunicator {
    fn all_reduce_typed<T: Element>(&self, buf: &mut [T], op: ReduceOp) -> Result<(), CommError> {
        let (rank, world) = (self.rank, self.world_size);
        let layout = ShardLayout::new(buf.len(), world, 1);
        self.run_op(OpKind::AllReduce, Some(T::DTYPE), buf.len(), |ctx| {
            let mut pieces = split_by_rank(&mut *buf, &layout);
            let own = std::mem::take(&mut pieces[rank]);
            reduce_into_own(ctx, 0, &shared(others(pieces, rank)), own, op);
            if ctx.failed() {
                return;
            }
            let mut pieces = split_by_rank(&mut *buf, &layout);
            let own: &[T] = &*std::mem::take(&mut pieces[rank]);
            let sends: Vec<(usize, &[T])> = peers_of(rank, world).map(|p| (p, own)).collect();
            exchange(ctx, 1, &sends, others(pieces, rank));
        })
    }

    fn reduce_scatter_typed<T: Element>(&self, input: &[T], output: &mut [T], op: ReduceOp) -> Result<(), CommError> {
        let (rank, world) = (self.rank, self.world_size);
        let layout = ShardLayout::new(input.len(), world, 1);
        let mine = layout.range(rank);
        if output.len() != mine.len() {
            return Err(CommError::InvalidArgument {
                op: OpKind::ReduceScatter,
                reason: format!(
                    "rank {rank} owns {} of the {} input elements (ShardLayout with align 1) but the output holds {}",
                    mine.len(),
                    input.len(),
                    output.len()
                ),
            });
        }
        output.copy_from_slice(&input[mine]);
        let sends: Vec<(usize, &[T])> = peers_of(rank, world).map(|p| (p, &input[layout.range(p)])).collect();
        self.run_op(OpKind::ReduceScatter, Some(T::DTYPE), input.len(), |ctx| {
            reduce_into_own(ctx, 0, &sends, output, op);
        })
    }

    fn all_gather_typed<T: Element>(&self, input: &[T], output: &mut [T]) -> Result<(), CommError> {
        let (rank, world) = (self.rank, self.world_size);
        let layout = ShardLayout::new(output.len(), world, 1);
        let mine = layout.range(rank);
        if input.len() != mine.len() {
            return Err(CommError::InvalidArgument {
                op: OpKind::AllGather,
                reason: format!(
                    "rank {rank} owns {} of the {} output elements (ShardLayout with align 1) but its input holds {}",
                    mine.len(),
                    output.len(),
                    input.len()
                ),
            });
        }
        output[mine].copy_from_slice(input);
        self.run_op(OpKind::AllGather, Some(T::DTYPE), output.len(), |ctx| {
            let sends: Vec<(usize, &[T])> = peers_of(rank, world).map(|p| (p, input)).collect();
            exchange(ctx, 0, &sends, others(split_by_rank(output, &layout), rank));
        })
    }

    /// Scatter from the root, then all-gather among the ranks: every link carries about `n/W`, so the
    /// root sends `n` in total instead of `(W−1)·n`.
    fn broadcast_typed<T: Element>(&self, buf: &mut [T], root: usize) -> Result<(), CommError> {
        let (rank, world) = (self.rank, self.world_size);
        if root >= world {
            return Err(CommError::InvalidArgument {
                op: OpKind::Broadcast,
                reason: format!("root {root} is not a rank of this world of {world}"),
            });
        }
        let layout = ShardLayout::new(buf.len(), world, 1);
        self.run_op(OpKind::Broadcast, Some(T::DTYPE), buf.len(), |ctx| {
            // Phase 0: the root sends each rank its piece.
            let mut pieces = split_by_rank(&mut *buf, &layout);
            if rank == root {
                exchange::<T>(ctx, 0, &shared(others(pieces, rank)), Vec::new());
            } else {
                exchange::<T>(ctx, 0, &[], vec![(root, std::mem::take(&mut pieces[rank]))]);
            }
            if ctx.failed() {
                return;
            }
            // Phase 1: every rank sends its piece to every non-root rank (the root has them all).
            let mut pieces = split_by_rank(&mut *buf, &layout);
            let own: &[T] = &*std::mem::take(&mut pieces[rank]);
            let sends: Vec<(usize, &[T])> = peers_of(rank, world).filter(|p| *p != root).map(|p| (p, own)).collect();
            let recvs = if rank == root { Vec::new() } else { others(pieces, rank) };
            exchange(ctx, 1, &sends, recvs);
        })
    }
}

impl TcpCommunicator {
    fn all_to_all_typed<T: Element>(&self, input: &[T], send_counts: &[usize], output: &mut [T], recv_counts: &[usize]) -> Result<(), CommError> {
        let (rank, world) = (self.rank, self.world_size);
        let invalid = |reason: String| CommError::InvalidArgument { op: OpKind::AllToAll, reason };
        if send_counts.len() != world || recv_counts.len() != world {
            return Err(invalid(format!(
                "{} send counts and {} receive counts for a group of {world}: give one count per rank",
                send_counts.len(),
                recv_counts.len()
            )));
        }
        let (sent, received) = (send_counts.iter().sum::<usize>(), recv_counts.iter().sum::<usize>());
        if sent != input.len() || received != output.len() {
            return Err(invalid(format!(
                "the send counts add up to {sent} for an input of {}, the receive counts to {received} for an output of {}",
                input.len(),
                output.len()
            )));
        }
        if send_counts[rank] != recv_counts[rank] {
            return Err(invalid(format!(
                "rank {} sends itself {} elements but expects {} from itself",
                self.group.world_rank(rank),
                send_counts[rank],
                recv_counts[rank]
            )));
        }
        let mut ins: Vec<&[T]> = Vec::with_capacity(world);
        let mut rest = input;
        for &n in send_counts {
            let (head, tail) = rest.split_at(n);
            ins.push(head);
            rest = tail;
        }
        let mut outs: Vec<&mut [T]> = Vec::with_capacity(world);
        let mut rest = output;
        for &n in recv_counts {
            let (head, tail) = std::mem::take(&mut rest).split_at_mut(n);
            outs.push(head);
            rest = tail;
        }
        outs[rank].copy_from_slice(ins[rank]);
        let sends: Vec<(usize, &[T])> = peers_of(rank, world).map(|p| (p, ins[p])).collect();
        self.run_op(OpKind::AllToAll, Some(T::DTYPE), input.len(), |ctx| {
            exchange(ctx, 0, &sends, others(outs, rank));
        })
    }
}

impl Communicator for TcpCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce(&self, buf: BufMut<'_>, op: ReduceOp) -> Result<(), CommError> {
        match buf {
            BufMut::F32(b) => self.all_reduce_typed(b, op),
            BufMut::Bf16(b) => self.all_reduce_typed(b, op),
            BufMut::F16(b) => self.all_reduce_typed(b, op),
        }
    }

    fn reduce_scatter(&self, input: Buf<'_>, output: BufMut<'_>, op: ReduceOp) -> Result<(), CommError> {
        match (input, output) {
            (Buf::F32(i), BufMut::F32(o)) => self.reduce_scatter_typed(i, o, op),
            (Buf::Bf16(i), BufMut::Bf16(o)) => self.reduce_scatter_typed(i, o, op),
            (Buf::F16(i), BufMut::F16(o)) => self.reduce_scatter_typed(i, o, op),
            (i, o) => Err(dtype_mismatch(OpKind::ReduceScatter, i, &o)),
        }
    }

    fn all_gather(&self, input: Buf<'_>, output: BufMut<'_>) -> Result<(), CommError> {
        match (input, output) {
            (Buf::F32(i), BufMut::F32(o)) => self.all_gather_typed(i, o),
            (Buf::Bf16(i), BufMut::Bf16(o)) => self.all_gather_typed(i, o),
            (Buf::F16(i), BufMut::F16(o)) => self.all_gather_typed(i, o),
            (i, o) => Err(dtype_mismatch(OpKind::AllGather, i, &o)),
        }
    }

    fn broadcast(&self, buf: BufMut<'_>, root: usize) -> Result<(), CommError> {
        match buf {
            BufMut::F32(b) => self.broadcast_typed(b, root),
            BufMut::Bf16(b) => self.broadcast_typed(b, root),
            BufMut::F16(b) => self.broadcast_typed(b, root),
        }
    }

    fn barrier(&self) -> Result<(), CommError> {
        let (rank, world) = (self.rank, self.world_size);
        self.run_op(OpKind::Barrier, None, 0, |ctx| {
            let sends: Vec<(usize, &[f32])> = peers_of(rank, world).map(|p| (p, &[][..])).collect();
            let recvs: Vec<(usize, &mut [f32])> = peers_of(rank, world).map(|p| (p, &mut [][..])).collect();
            exchange(ctx, 0, &sends, recvs);
        })
    }

    fn recent_ops(&self) -> String {
        self.render_recorder()
    }

    fn send_recv(&self, ops: Vec<P2p<'_>>) -> Result<(), CommError> {
        self.send_recv_batch(ops)
    }

    fn all_to_all(&self, input: Buf<'_>, send_counts: &[usize], output: BufMut<'_>, recv_counts: &[usize]) -> Result<(), CommError> {
        match (input, output) {
            (Buf::F32(i), BufMut::F32(o)) => self.all_to_all_typed(i, send_counts, o, recv_counts),
            (Buf::Bf16(i), BufMut::Bf16(o)) => self.all_to_all_typed(i, send_counts, o, recv_counts),
            (Buf::F16(i), BufMut::F16(o)) => self.all_to_all_typed(i, send_counts, o, recv_counts),
            (i, o) => Err(dtype_mismatch(OpKind::AllToAll, i, &o)),
        }
    }

    fn split(&self, axis: &str, groups: &[Vec<usize>]) -> Result<Box<dyn Communicator>, CommError> {
        Ok(Box::new(TcpCommunicator::split(self, axis, groups)?))
    }

    fn group(&self) -> &GroupInfo {
        &self.group
    }
}

fn dtype_mismatch(op: OpKind, input: Buf<'_>, output: &BufMut<'_>) -> CommError {
    CommError::InvalidArgument {
        op,
        reason: format!("input is {} but output is {}; both must have the same dtype", input.dtype(), output.dtype()),
    }
}
