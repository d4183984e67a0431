//! Collective communication: the [`Communicator`] trait, its TCP (CPU) backend, and the rendezvous store.
//!
//! Every rank issues the same collectives in the same order. Each collective gets a sequence number,
//! a timeout, and an entry in a flight recorder, so a hang becomes an error that names the operation and
//! the ranks that have not arrived. Reductions sum in rank order (0, 1, …, W−1) in f32, whatever the
//! chunking, so `all_reduce` and `reduce_scatter` + `all_gather` agree bit for bit and runs repeat exactly.

mod auth;
mod buffer;
mod config;
mod element;
mod env;
mod error;
mod local;
#[cfg(feature = "cuda")]
pub mod nccl;
mod recorder;
mod reduce;
pub mod store;
mod tcp;
mod tcp_ops;
mod tcp_p2p;
mod tensor;
mod token;
mod wire;

pub use buffer::{Buf, BufMut, DType};
pub use config::{CommConfig, ENV_RDZV_TIMEOUT, ENV_TIMEOUT};
pub use element::Element;
pub use env::{EnvSource, WorldInfo, ENV_AGENT_STORE};
pub use error::CommError;
pub use local::run_local_world;
pub use reduce::reference_reduce;
pub use recorder::{FlightRecorder, OpRecord, OpStatus};
pub use tcp::{GroupInfo, TcpCommunicator};
pub use tensor::TensorCollectives;
pub use token::{RdzvToken, ENV_RDZV_TOKEN};

use std::fmt;

/// How contributions of the ranks are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    /// Sum in rank order, accumulated in f32.
    Sum,
    /// Sum in rank order, then divided by the world size.
    Avg,
    /// Maximum; NaN wins, so an overflow anywhere is seen everywhere.
    Max,
}

/// The kind of a collective, as recorded and reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum OpKind {
    AllReduce = 1,
    ReduceScatter = 2,
    AllGather = 3,
    Broadcast = 4,
    Barrier = 5,
    /// A batch of point-to-point sends and receives.
    SendRecv = 6,
    AllToAll = 7,
}

impl OpKind {
    pub(crate) fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::AllReduce,
            2 => Self::ReduceScatter,
            3 => Self::AllGather,
            4 => Self::Broadcast,
            5 => Self::Barrier,
            6 => Self::SendRecv,
            7 => Self::AllToAll,
            _ => return None,
        })
    }

    /// The name users see in errors and logs.
    pub fn name(self) -> &'static str {
        match self {
            Self::AllReduce => "all_reduce",
            Self::ReduceScatter => "reduce_scatter",
            Self::AllGather => "all_gather",
            Self::Broadcast => "broadcast",
            Self::Barrier => "barrier",
            Self::SendRecv => "send_recv",
            Self::AllToAll => "all_to_all",
        }
    }
}

impl fmt::Display for OpKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One half of a point-to-point transfer in a [`Communicator::send_recv`] batch. `peer` is a rank of
/// the communicator's group.
#[derive(Debug)]
pub enum P2p<'a> {
    Send { peer: usize, buf: Buf<'a> },
    Recv { peer: usize, buf: BufMut<'a> },
}

/// Collectives over a fixed group of ranks.
///
/// Buffers are split over ranks by [`crate::ShardLayout`] with `align = 1`: rank `r` owns
/// `ShardLayout::new(n, world_size, 1).range(r)`. `reduce_scatter` leaves rank `r` with the reduced
/// elements of its range; `all_gather` places rank `r`'s input at its range of the output.
/// All ranks must call the same collectives in the same order with the same sizes and dtypes.
/// Ranks are the group's (`0..world_size`); errors name ranks in world terms and name the group.
pub trait Communicator: Send + Sync {
    /// This process's rank, `0..world_size`.
    fn rank(&self) -> usize;
    /// Number of ranks in the group.
    fn world_size(&self) -> usize;
    /// Reduce `buf` over all ranks in place.
    fn all_reduce(&self, buf: BufMut<'_>, op: ReduceOp) -> Result<(), CommError>;
    /// Reduce `input` (full length) over all ranks; `output` receives this rank's range of the result.
    fn reduce_scatter(&self, input: Buf<'_>, output: BufMut<'_>, op: ReduceOp) -> Result<(), CommError>;
    /// Gather every rank's `input` (its range of `output`) into `output` on every rank.
    fn all_gather(&self, input: Buf<'_>, output: BufMut<'_>) -> Result<(), CommError>;
    /// Copy `buf` of rank `root` into `buf` of every rank.
    fn broadcast(&self, buf: BufMut<'_>, root: usize) -> Result<(), CommError>;
    /// Return once every rank has entered the barrier.
    fn barrier(&self) -> Result<(), CommError>;
    /// The flight recorder's last operations, one per line, oldest first.
    fn recent_ops(&self) -> String;
    /// Run a batch of sends and receives with peers of this group, all progressing together (NCCL's
    /// grouped `ncclSend`/`ncclRecv`): as long as each send has its receive in the peer's batch, no
    /// order in which ranks post their batches can deadlock. For each ordered pair of ranks, the k-th
    /// message sent is the k-th received; its dtype and length must match (else
    /// [`CommError::Desync`]). Only the ranks named take part; a peer that never posts its half is
    /// named in a [`CommError::Timeout`] with what it is doing instead.
    fn send_recv(&self, ops: Vec<P2p<'_>>) -> Result<(), CommError>;
    /// Every rank sends `send_counts[p]` consecutive elements of `input` (in rank order) to rank `p`
    /// and receives `recv_counts[p]` from it into `output` (in rank order): uneven splits, as expert
    /// and context parallelism need. `recv_counts[p]` on this rank must equal `send_counts[this]` on `p`.
    fn all_to_all(&self, input: Buf<'_>, send_counts: &[usize], output: BufMut<'_>, recv_counts: &[usize]) -> Result<(), CommError>;
    /// Form sub-groups: `groups` partitions this group's ranks; this rank gets the one holding it,
    /// named `<axis><index>`, with its own connections, sequence numbers and recorder. A collective
    /// over this group (same arguments on every rank).
    fn split(&self, axis: &str, groups: &[Vec<usize>]) -> Result<Box<dyn Communicator>, CommError>;
    /// Which ranks of the world this group holds, and its name.
    fn group(&self) -> &GroupInfo;
}

/// Typed conveniences over any [`Communicator`] (the trait itself stays object-safe).
pub trait CommExt: Communicator {
    fn all_reduce_slice<T: Element>(&self, buf: &mut [T], op: ReduceOp) -> Result<(), CommError> {
        self.all_reduce(T::buf_mut(buf), op)
    }
    fn reduce_scatter_slice<T: Element>(&self, input: &[T], output: &mut [T], op: ReduceOp) -> Result<(), CommError> {
        self.reduce_scatter(T::buf(input), T::buf_mut(output), op)
    }
    fn all_gather_slice<T: Element>(&self, input: &[T], output: &mut [T]) -> Result<(), CommError> {
        self.all_gather(T::buf(input), T::buf_mut(output))
    }
    fn broadcast_slice<T: Element>(&self, buf: &mut [T], root: usize) -> Result<(), CommError> {
        self.broadcast(T::buf_mut(buf), root)
    }
    fn all_to_all_slice<T: Element>(&self, input: &[T], send_counts: &[usize], output: &mut [T], recv_counts: &[usize]) -> Result<(), CommError> {
        self.all_to_all(T::buf(input), send_counts, T::buf_mut(output), recv_counts)
    }
}

impl<C: Communicator + ?Sized> CommExt for C {}
