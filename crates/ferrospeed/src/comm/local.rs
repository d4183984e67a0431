//! A world of ranks as threads of one process, each with its own TCP links and a private store (with a
//! token of its own): for tests and examples that need several ranks without launching processes.

use super::env::{EnvSource, WorldInfo};
use super::store::{StoreConfig, StoreServer};
use super::token::RdzvToken;
use super::tcp::TcpCommunicator;
use super::{CommConfig, CommError};

/// Run `f(communicator)` on `world_size` threads forming one group; results in rank order.
/// A rank's panic is re-raised here after the others finish.
pub fn run_local_world<R: Send>(
    world_size: usize,
    cfg: &CommConfig,
    f: impl Fn(TcpCommunicator) -> R + Sync,
) -> Result<Vec<R>, CommError> {
    let token = RdzvToken::generate()?;
    let server = StoreServer::bind("127.0.0.1:0", StoreConfig::new(token.clone(), world_size))?;
    let port = server.local_addr().port();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..world_size)
            .map(|rank| {
                let (f, token) = (&f, token.clone());
                s.spawn(move || {
                    let info = WorldInfo {
                        rank,
                        world_size,
                        local_rank: rank,
                        local_world_size: world_size,
                        master_addr: "127.0.0.1".into(),
                        master_port: port,
                        agent_store: true,
                        source: EnvSource::Torchrun,
                        token: Some(token),
                    };
                    TcpCommunicator::connect(&info, cfg).map(f)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
            .collect()
    })
}
