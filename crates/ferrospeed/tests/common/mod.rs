//! Helpers for tests that run a world of ranks as threads of one process, each with its own TCP links.

use ferrospeed::comm::store::StoreServer;
use ferrospeed::comm::{EnvSource, TcpCommunicator};
use ferrospeed::{CommConfig, WorldInfo};

/// Run `f(rank, communicator)` on `world_size` threads forming one group; results in rank order.
pub fn run_world<R: Send>(world_size: usize, cfg: &CommConfig, f: impl Fn(TcpCommunicator) -> R + Sync) -> Vec<R> {
    let server = StoreServer::bind("127.0.0.1:0").expect("store");
    let port = server.local_addr().port();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..world_size)
            .map(|rank| {
                let f = &f;
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
                    };
                    f(TcpCommunicator::connect(&info, cfg).expect("connect"))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("rank thread panicked")).collect()
    })
}
