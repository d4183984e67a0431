//! Helpers for tests that run a world of ranks as threads of one process.

use ferrospeed::comm::{run_local_world, TcpCommunicator};
use ferrospeed::CommConfig;

/// Run `f(communicator)` on `world_size` threads forming one group; results in rank order.
pub fn run_world<R: Send>(world_size: usize, cfg: &CommConfig, f: impl Fn(TcpCommunicator) -> R + Sync) -> Vec<R> {
    run_local_world(world_size, cfg, f).expect("forming the local world")
}
