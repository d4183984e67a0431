//! Point-to-point batches on the TCP backend: each peer's sends and receives on a thread of their
//! own, so a batch progresses with every peer at once and no posting order can deadlock.
//!
//! A batch holds the group's connections shared (a collective holds them alone), so batches on other
//! threads (a pipeline stage's sender beside its receives) run at once; batches that use one
//! direction of one connection take turns in the order their messages were numbered.
//!
//! Messages are numbered per ordered pair of ranks (not by the group's collective sequence, which
//! ranks outside the batch do not advance); the receiver checks each header's number, dtype and
//! length, so a batch that does not match its peer's is a [`CommError::Desync`], never mixed data.

use super::buffer::{Buf, BufMut, DType};
use super::error::CommError;
use super::tcp::{Numbering, TcpCommunicator};
use super::wire::Header;
use super::{OpKind, P2p};
use std::thread;

impl TcpCommunicator {
    pub(crate) fn send_recv_batch(&self, ops: Vec<P2p<'_>>) -> Result<(), CommError> {
        let world = self.world_size;
        let mut sends: Vec<Vec<Buf<'_>>> = (0..world).map(|_| Vec::new()).collect();
        let mut recvs: Vec<Vec<BufMut<'_>>> = (0..world).map(|_| Vec::new()).collect();
        let mut dtypes: Vec<DType> = Vec::new();
        let mut numel = 0;
        for op in ops {
            let peer = match &op {
                P2p::Send { peer, .. } | P2p::Recv { peer, .. } => *peer,
            };
            if peer >= world || peer == self.rank {
                return Err(CommError::InvalidArgument {
                    op: OpKind::SendRecv,
                    reason: format!(
                        "peer {peer} is {} (this is rank {} of {}, a group of {world})",
                        if peer == self.rank { "this rank itself" } else { "not a rank of the group" },
                        self.rank,
                        self.group.describe()
                    ),
                });
            }
            match op {
                P2p::Send { peer, buf } => {
                    (dtypes.push(buf.dtype()), numel += buf.len());
                    sends[peer].push(buf);
                }
                P2p::Recv { peer, buf } => {
                    (dtypes.push(buf.dtype()), numel += buf.len());
                    recvs[peer].push(buf);
                }
            }
        }
        if sends.iter().all(Vec::is_empty) && recvs.iter().all(Vec::is_empty) {
            return Ok(());
        }
        let dtype = dtypes.first().copied().filter(|d| dtypes.iter().all(|x| x == d));
        let numbering = Numbering::P2p {
            sends: sends.iter().enumerate().map(|(p, v)| (p, v.len() as u64)).collect(),
            recvs: recvs.iter().enumerate().map(|(p, v)| (p, v.len() as u64)).collect(),
        };
        let header = |seq: u64, dtype: DType, numel: usize| Header { seq, op: OpKind::SendRecv, phase: 0, dtype: Some(dtype), numel: numel as u64 };
        self.execute(OpKind::SendRecv, dtype, numel, numbering, |ctx, base| {
            thread::scope(|s| {
                for (peer, bufs) in recvs.into_iter().enumerate().filter(|(_, v)| !v.is_empty()) {
                    let first = base.received[peer];
                    s.spawn(move || {
                        let mut turn = match ctx.comm.take_turn(peer, false, first, bufs.len() as u64, ctx.deadline) {
                            Ok(t) => t,
                            Err(e) => return ctx.fail(e),
                        };
                        for (i, mut buf) in bufs.into_iter().enumerate() {
                            let got = ctx
                                .expect(peer, header(first + i as u64, buf.dtype(), buf.len()))
                                .and_then(|()| ctx.read(peer, buf.bytes_mut()));
                            if let Err(e) = got {
                                turn.break_link();
                                return ctx.fail(e);
                            }
                        }
                    });
                }
                for (peer, bufs) in sends.into_iter().enumerate().filter(|(_, v)| !v.is_empty()) {
                    let first = base.sent[peer];
                    s.spawn(move || {
                        let mut turn = match ctx.comm.take_turn(peer, true, first, bufs.len() as u64, ctx.deadline) {
                            Ok(t) => t,
                            Err(e) => return ctx.fail(e),
                        };
                        for (i, buf) in bufs.into_iter().enumerate() {
                            let sent = ctx
                                .write(peer, &header(first + i as u64, buf.dtype(), buf.len()).encode())
                                .and_then(|()| ctx.write(peer, buf.bytes()));
                            if let Err(e) = sent {
                                turn.break_link();
                                return ctx.fail(e);
                            }
                        }
                    });
                }
            });
        })
    }
}
