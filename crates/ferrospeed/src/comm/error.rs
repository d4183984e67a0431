//! Errors of the communication layer: each names the operation, the ranks and what to do.

use super::OpKind;
use std::time::Duration;

/// Everything that can go wrong while forming a group or running a collective.
#[derive(Debug, thiserror::Error)]
pub enum CommError {
    #[error("environment variable {var}={value:?} is invalid: {reason}")]
    BadEnv { var: String, value: String, reason: String },

    #[error("cannot resolve address {addr:?}: {reason}")]
    BadAddress { addr: String, reason: String },

    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: String, source: std::io::Error },

    #[error(
        "cannot reach the rendezvous store at {addr} after {waited:.1?}: {reason}; start rank 0 (or node 0's \
         launcher) first and check MASTER_ADDR/MASTER_PORT"
    )]
    StoreUnreachable { addr: String, waited: Duration, reason: String },

    #[error("rendezvous store at {addr}: {reason}")]
    Store { addr: String, reason: String },

    #[error(
        "{endpoint} refused this process's rendezvous token: give every node the same --rdzv-token (or \
         FERROSPEED_RDZV_TOKEN, --rdzv-token-file)"
    )]
    TokenRefused { endpoint: String },

    #[error(
        "{endpoint} does not hold this job's rendezvous token ({reason}): is another job on that address? check \
         MASTER_ADDR/MASTER_PORT and that every node has the same --rdzv-token"
    )]
    NotAuthentic { endpoint: String, reason: String },

    #[error("{endpoint} has as many clients as it takes: is another job using MASTER_PORT?")]
    StoreFull { endpoint: String },

    #[error("authenticating with {endpoint} broke off: {reason}")]
    AuthBroken { endpoint: String, reason: String },

    #[error("no rendezvous token: {reason}")]
    MissingToken { reason: String },

    #[error("the rendezvous token from {origin} is unusable: {reason}")]
    BadToken { origin: String, reason: String },

    #[error("rendezvous token file {path}: {reason}")]
    TokenFile { path: std::path::PathBuf, reason: String },

    #[error("the operating system's random source failed: {reason}")]
    Random { reason: String },

    #[error("rendezvous timed out on rank {rank} after {waited:.1?} waiting for {what}")]
    RendezvousTimeout { rank: usize, waited: Duration, what: String },

    #[error(
        "{op} #{seq} of {group} timed out on rank {rank} after {waited:.1?}: {detail}\nlast operations on rank {rank}:\n{recent}"
    )]
    Timeout {
        /// This rank, in world terms (as every rank below).
        rank: usize,
        /// The group the operation ran in: `the world` or `group dp1 (world ranks [1, 3])`.
        group: String,
        op: OpKind,
        seq: u64,
        waited: Duration,
        /// Ranks that had not entered this collective when the timeout fired (from the store).
        missing: Vec<usize>,
        detail: String,
        recent: String,
    },

    #[error(
        "{op} #{seq} of {group} on rank {rank}: connection to rank {peer} lost ({reason}); did rank {peer} exit or crash?"
    )]
    PeerLost { rank: usize, peer: usize, group: String, op: OpKind, seq: u64, reason: String },

    #[error(
        "collective mismatch in {group} on rank {rank}: rank {peer} sent {got} while this rank is in {expected}; \
         every rank must issue the same collectives in the same order with the same sizes (and the same \
         sends and receives)"
    )]
    Desync { rank: usize, peer: usize, group: String, got: String, expected: String },

    #[error("cannot split {group} along {axis:?}: {reason}")]
    Split { group: String, axis: String, reason: String },

    #[error("invalid arguments to {op}: {reason}")]
    InvalidArgument { op: OpKind, reason: String },

    #[error("{what} is not supported by this communicator: {reason}")]
    Unsupported { what: String, reason: String },

    #[error("communicator on rank {rank} is unusable after an earlier failure: {first}")]
    Poisoned { rank: usize, first: String },

    #[error("I/O error on rank {rank} during {what}: {source}")]
    Io { rank: usize, what: String, source: std::io::Error },
}

impl CommError {
    /// The ranks a timeout found missing (empty for other errors).
    pub fn missing_ranks(&self) -> &[usize] {
        match self {
            Self::Timeout { missing, .. } => missing,
            _ => &[],
        }
    }
}
