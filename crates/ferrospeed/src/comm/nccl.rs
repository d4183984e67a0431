//! NCCL collectives on device buffers (feature `cuda`): one NCCL communicator per rank, on its own
//! CUDA stream. Each collective first waits (on the device) for the work already queued on the
//! compute stream, and hands back an event that the compute stream waits on before using the result,
//! so reductions run while later blocks compute. The unique id goes from rank 0 to the others over
//! the host group (whose connections the rendezvous store formed).
//!
//! Sub-groups: an `NcclComm` is formed over any host group, so the NCCL communicator of a mesh axis
//! is `NcclComm::new(&tcp_group, …)` on the group [`super::TcpCommunicator::split`] formed (a fresh
//! unique id per group rather than `ncclCommSplit`: cudarc's `Comm` cannot wrap a split handle, and
//! the host group exists anyway for the id and for timeouts that name ranks).
//!
//! NCCL itself never times out: a rank that stops issuing collectives leaves the others spinning in a
//! kernel. [`NcclComm::sync`] therefore polls every outstanding collective with the group's timeout,
//! aborts the communicator when one does not finish, and names the operation; a rank that dies is
//! caught by the launcher, which stops the whole job.

use super::{CommError, CommExt, Communicator, OpKind};
use candle_core::cuda::cudarc::driver::sys::CUevent_flags;
use candle_core::cuda::cudarc::driver::{CudaEvent, CudaSlice, CudaStream, CudaView, CudaViewMut};
use candle_core::cuda::cudarc::nccl::{Comm, Id, NcclType, ReduceOp};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A collective queued on the NCCL stream.
pub struct NcclPending {
    event: CudaEvent,
    compute: Arc<CudaStream>,
    op: OpKind,
    seq: u64,
}

impl NcclPending {
    /// Make the compute stream wait (on the device) for the collective; its result may be used from
    /// now on (the host does not block).
    pub fn wait(self) -> Result<(), CommError> {
        self.compute.wait(&self.event).map_err(|e| CommError::Unsupported { what: format!("NCCL {} #{} wait", self.op, self.seq), reason: format!("{e:?}") })
    }
}

/// Run `f`'s NCCL calls as one group (`ncclGroupStart` … `ncclGroupEnd`): issued together, so
/// sends and receives to several peers cannot wait on each other's order. The group is closed even
/// when a call fails.
fn grouped(f: impl FnOnce() -> Result<(), String>) -> Result<(), String> {
    use candle_core::cuda::cudarc::nccl::result::{group_end, group_start};
    group_start().map_err(|e| format!("{e:?}"))?;
    let r = f();
    let end = group_end().map(|_| ()).map_err(|e| format!("{e:?}"));
    r.and(end)
}

/// One half of a point-to-point transfer in an [`NcclComm::send_recv`] batch.
pub enum NcclP2p<'a, T> {
    Send { peer: usize, buf: CudaView<'a, T> },
    Recv { peer: usize, buf: CudaViewMut<'a, T> },
}

/// NCCL over this rank's GPU.
pub struct NcclComm {
    /// Taken (and so aborted, by its drop) when a collective times out.
    comm: Mutex<Option<Comm>>,
    rank: usize,
    world: usize,
    /// This rank in world terms, and how errors name the group (from the host group).
    world_rank: usize,
    group: String,
    compute: Arc<CudaStream>,
    stream: Arc<CudaStream>,
    timeout: Duration,
    /// Collectives issued and not yet known to be complete: (op, sequence number, event).
    outstanding: Mutex<Vec<(OpKind, u64, CudaEvent)>>,
    seq: Mutex<u64>,
}

// The NCCL communicator is used from one thread at a time (the engine's), guarded by the mutexes above.
unsafe impl Send for NcclComm {}
unsafe impl Sync for NcclComm {}

fn err(rank: usize, what: &str, e: impl std::fmt::Debug) -> CommError {
    CommError::Unsupported { what: format!("NCCL {what} on rank {rank}"), reason: format!("{e:?}") }
}

impl NcclComm {
    /// Form the NCCL communicator of `group`'s ranks on `device` (a collective over `group`).
    pub fn new(group: &dyn Communicator, device: &candle_core::CudaDevice, timeout: Duration) -> Result<Self, CommError> {
        let (rank, world) = (group.rank(), group.world_size());
        let mut words = [0u32; 32];
        if rank == 0 {
            let id = Id::new().map_err(|e| err(rank, "unique id", e))?;
            for (i, w) in words.iter_mut().enumerate() {
                let b = &id.internal()[i * 4..i * 4 + 4];
                *w = u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8]);
            }
        }
        // The id's bytes travel as f32 bit patterns: broadcast copies them unchanged.
        let mut buf: Vec<f32> = words.iter().map(|&w| f32::from_bits(w)).collect();
        group.broadcast_slice(&mut buf, 0)?;
        let mut internal = [0 as std::ffi::c_char; 128];
        for (i, v) in buf.iter().enumerate() {
            for (j, b) in v.to_bits().to_le_bytes().into_iter().enumerate() {
                internal[i * 4 + j] = b as std::ffi::c_char;
            }
        }
        let compute = device.cuda_stream();
        // NCCL takes the device from the thread's current context.
        compute.context().bind_to_thread().map_err(|e| err(rank, "context", e))?;
        let stream = compute.fork().map_err(|e| err(rank, "stream", e))?;
        let comm = Comm::from_rank(stream.clone(), rank, world, Id::uninit(internal)).map_err(|e| err(rank, "init", e))?;
        Ok(Self {
            comm: Mutex::new(Some(comm)),
            rank,
            world,
            world_rank: group.group().world_rank(rank),
            group: group.group().describe(),
            compute,
            stream,
            timeout,
            outstanding: Mutex::new(Vec::new()),
            seq: Mutex::new(0),
        })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world_size(&self) -> usize {
        self.world
    }

    /// Order the NCCL stream after the compute stream's queued work, run `f` on it, and record its end.
    fn issue(&self, op: OpKind, f: impl FnOnce(&Comm) -> Result<(), String>) -> Result<NcclPending, CommError> {
        let rank = self.rank();
        let ready = self.compute.record_event(None).map_err(|e| err(rank, "event", e))?;
        self.stream.wait(&ready).map_err(|e| err(rank, "stream wait", e))?;
        {
            let comm = self.comm.lock().unwrap_or_else(|p| p.into_inner());
            let comm = comm.as_ref().ok_or_else(|| CommError::Poisoned { rank, first: "an NCCL collective timed out earlier".into() })?;
            f(comm).map_err(|e| err(rank, &op.to_string(), e))?;
        }
        let seq = {
            let mut s = self.seq.lock().unwrap_or_else(|p| p.into_inner());
            *s += 1;
            *s
        };
        let done = self.stream.record_event(Some(CUevent_flags::CU_EVENT_DISABLE_TIMING)).map_err(|e| err(rank, "event", e))?;
        let watch = self.stream.record_event(Some(CUevent_flags::CU_EVENT_DISABLE_TIMING)).map_err(|e| err(rank, "event", e))?;
        self.outstanding.lock().unwrap_or_else(|p| p.into_inner()).push((op, seq, watch));
        Ok(NcclPending { event: done, compute: self.compute.clone(), op, seq })
    }

    /// Average `buf` over the ranks in place.
    pub fn all_reduce_avg<T: NcclType>(&self, buf: &mut CudaSlice<T>) -> Result<NcclPending, CommError> {
        self.issue(OpKind::AllReduce, |c| c.all_reduce_in_place(buf, &ReduceOp::Avg).map(|_| ()).map_err(|e| format!("{e:?}")))
    }

    /// Average `input` (whole buffer) over the ranks; `output` receives this rank's equal share.
    pub fn reduce_scatter_avg<T: NcclType>(&self, input: &CudaSlice<T>, output: &mut CudaSlice<T>) -> Result<NcclPending, CommError> {
        if input.len() != output.len() * self.world_size() {
            return Err(CommError::InvalidArgument { op: OpKind::ReduceScatter, reason: format!("{} elements do not split into {} shards of {}", input.len(), self.world_size(), output.len()) });
        }
        self.issue(OpKind::ReduceScatter, |c| c.reduce_scatter(input, output, &ReduceOp::Avg).map(|_| ()).map_err(|e| format!("{e:?}")))
    }

    /// Every rank's `input` into its share of `output`.
    pub fn all_gather<T: NcclType>(&self, input: &CudaSlice<T>, output: &mut CudaSlice<T>) -> Result<NcclPending, CommError> {
        if output.len() != input.len() * self.world_size() {
            return Err(CommError::InvalidArgument { op: OpKind::AllGather, reason: format!("{} elements are not {} shards of {}", output.len(), self.world_size(), input.len()) });
        }
        self.issue(OpKind::AllGather, |c| c.all_gather(input, output).map(|_| ()).map_err(|e| format!("{e:?}")))
    }

    /// A batch of sends and receives with peers of this group, grouped (`ncclGroupStart`/`End`) so
    /// that no posting order deadlocks; per pair, messages match in order, as on TCP.
    pub fn send_recv<T: NcclType>(&self, ops: Vec<NcclP2p<'_, T>>) -> Result<NcclPending, CommError> {
        for op in &ops {
            let peer = match op {
                NcclP2p::Send { peer, .. } | NcclP2p::Recv { peer, .. } => *peer,
            };
            if peer >= self.world || peer == self.rank {
                return Err(CommError::InvalidArgument { op: OpKind::SendRecv, reason: format!("peer {peer} is not another rank of {}", self.group) });
            }
        }
        self.issue(OpKind::SendRecv, |c| {
            grouped(|| {
                for mut op in ops {
                    match &mut op {
                        NcclP2p::Send { peer, buf } => c.send(buf, *peer as i32).map_err(|e| format!("{e:?}"))?,
                        NcclP2p::Recv { peer, buf } => c.recv(buf, *peer as i32).map(|_| ()).map_err(|e| format!("{e:?}"))?,
                    }
                }
                Ok(())
            })
        })
    }

    /// [`super::Communicator::all_to_all`] on device buffers: `send_counts[p]` elements of `input` (in
    /// rank order) to rank `p`, `recv_counts[p]` from it into `output`; one grouped send/receive per peer.
    pub fn all_to_all<T: NcclType>(&self, input: &CudaSlice<T>, send_counts: &[usize], output: &mut CudaSlice<T>, recv_counts: &[usize]) -> Result<NcclPending, CommError> {
        let w = self.world;
        if send_counts.len() != w || recv_counts.len() != w || send_counts.iter().sum::<usize>() != input.len() || recv_counts.iter().sum::<usize>() != output.len() {
            return Err(CommError::InvalidArgument {
                op: OpKind::AllToAll,
                reason: format!("counts {send_counts:?} / {recv_counts:?} do not fit {w} ranks, an input of {} and an output of {}", input.len(), output.len()),
            });
        }
        let offsets = |c: &[usize]| c.iter().scan(0, |o, n| (*o += n, *o - n).1.into()).collect::<Vec<usize>>();
        let (so, ro) = (offsets(send_counts), offsets(recv_counts));
        self.issue(OpKind::AllToAll, |c| {
            grouped(|| {
                for p in (0..w).filter(|&p| send_counts[p] > 0) {
                    c.send(&input.slice(so[p]..so[p] + send_counts[p]), p as i32).map_err(|e| format!("{e:?}"))?;
                }
                for p in (0..w).filter(|&p| recv_counts[p] > 0) {
                    c.recv(&mut output.slice_mut(ro[p]..ro[p] + recv_counts[p]), p as i32).map(|_| ()).map_err(|e| format!("{e:?}"))?;
                }
                Ok(())
            })
        })
    }

    /// Make the compute stream wait (on the device) for `p`; its result may be used from now on.
    pub fn wait(&self, p: NcclPending) -> Result<(), CommError> {
        p.wait()
    }

    /// Block until every collective issued so far has completed on this GPU, or fail (and abort
    /// NCCL) after the timeout, naming the first collective still running.
    pub fn sync(&self) -> Result<(), CommError> {
        let rank = self.rank();
        let t0 = Instant::now();
        let mut pending = std::mem::take(&mut *self.outstanding.lock().unwrap_or_else(|p| p.into_inner()));
        while let Some((op, seq, event)) = pending.first() {
            match event.try_is_complete() {
                Ok(true) => {
                    pending.remove(0);
                }
                Ok(false) if t0.elapsed() < self.timeout => std::thread::sleep(Duration::from_micros(200)),
                Ok(false) => {
                    // Dropping cudarc's communicator aborts it, which also ends the spinning kernels.
                    drop(self.comm.lock().unwrap_or_else(|p| p.into_inner()).take());
                    return Err(CommError::Timeout {
                        rank: self.world_rank,
                        group: self.group.clone(),
                        op: *op,
                        seq: *seq,
                        waited: t0.elapsed(),
                        missing: Vec::new(),
                        detail: "the NCCL collective did not complete: another rank stopped issuing collectives or hung \
                                 (NCCL was aborted on this rank)"
                            .into(),
                        recent: String::new(),
                    });
                }
                Err(e) => return Err(err(rank, &format!("{op} #{seq}"), e)),
            }
        }
        Ok(())
    }
}
