//! The TCP backend: forming a full mesh of connections through the store, and the bookkeeping around
//! each collective (sequence numbers, deadlines, flight recorder, progress reports, failure handling).
//!
//! The algorithms themselves are in `tcp_ops.rs`. Every pair of ranks shares one connection; each
//! collective moves `(W−1)/W` of the buffer in and out of every rank, like a ring, but sends each
//! piece straight to its owner so sums can run in rank order.

use super::buffer::DType;
use super::config::CommConfig;
use super::env::WorldInfo;
use super::error::CommError;
use super::auth::{self, read_exact_until, Admission, Context};
use super::recorder::FlightRecorder;
use super::store::{StoreClient, StoreConfig, StoreServer};
use super::token::{LocalTokenFile, RdzvToken, Secret};
use super::OpKind;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

const HANDSHAKE_MAGIC: u32 = 0xFE55_0A11;
const KEY_PREFIX: &str = "ferrospeed/";
/// How long a connection to this rank's listening socket has to prove the job's secret and say who it is.
const PEER_AUTH_TIMEOUT: Duration = Duration::from_secs(5);

/// A group of ranks connected pairwise over TCP; the CPU backend and the reference for all others.
pub struct TcpCommunicator {
    pub(crate) rank: usize,
    pub(crate) world_size: usize,
    /// One connection per peer; `None` at this rank's own index.
    pub(crate) peers: Vec<Option<TcpStream>>,
    pub(crate) cfg: CommConfig,
    state: Mutex<OpState>,
    store: Option<StoreClient>,
    reporter: Option<ProgressReporter>,
    // Dropped before the server (fields drop in order): the file goes while the port is still ours.
    _token_file: Option<LocalTokenFile>,
    _server: Option<StoreServer>,
}

struct OpState {
    next_seq: u64,
    poisoned: Option<String>,
    recorder: FlightRecorder,
}

/// Why one link of a collective failed; turned into a [`CommError`] with context by `run_op`.
#[derive(Debug)]
pub(crate) enum LinkError {
    Timeout { peer: usize },
    Closed { peer: usize, reason: String },
    Desync { peer: usize, got: String, expected: String },
    Internal(String),
}

impl LinkError {
    /// Fatal errors are propagated at once by closing every connection; timeouts are not, so that
    /// every waiting rank reaches its own deadline and reports which ranks are missing.
    fn closes_links(&self) -> bool {
        !matches!(self, Self::Timeout { .. })
    }
}

/// Context of the collective in progress, shared by its threads.
pub(crate) struct OpCtx<'a> {
    pub comm: &'a TcpCommunicator,
    pub seq: u64,
    pub op: OpKind,
    pub dtype: Option<DType>,
    pub deadline: Instant,
    /// The first failure of any thread of this collective: the root cause that gets reported.
    failure: Mutex<Option<LinkError>>,
}

impl OpCtx<'_> {
    /// Record a failure. A fatal one closes every link so that no thread of this rank, and no peer,
    /// waits for data that will never come.
    pub fn fail(&self, e: LinkError) {
        if e.closes_links() {
            self.comm.shutdown_links();
        }
        let mut first = self.failure.lock().unwrap_or_else(|p| p.into_inner());
        if first.is_none() {
            *first = Some(e);
        }
    }

    /// Whether any thread of this collective has failed.
    pub fn failed(&self) -> bool {
        self.failure.lock().unwrap_or_else(|p| p.into_inner()).is_some()
    }
}

impl TcpCommunicator {
    /// Form the group described by `world` (usually [`WorldInfo::from_env`]).
    ///
    /// Rank 0 serves the store unless the launcher does (`agent_store`). Every rank publishes a
    /// listening address, connects to the lower ranks and accepts the higher ones, then all ranks
    /// run a barrier. Every connection, to the store and between ranks, first proves the job's secret
    /// both ways (`Secret::for_world` says where it comes from). Fails with a clear error if any step
    /// exceeds `cfg.rendezvous_timeout`.
    pub fn connect(world: &WorldInfo, cfg: &CommConfig) -> Result<Self, CommError> {
        let (rank, world_size) = (world.rank, world.world_size);
        let mut comm = Self {
            rank,
            world_size,
            peers: (0..world_size).map(|_| None).collect(),
            cfg: cfg.clone(),
            state: Mutex::new(OpState { next_seq: 0, poisoned: None, recorder: FlightRecorder::new(cfg.recorder_len) }),
            store: None,
            reporter: None,
            _token_file: None,
            _server: None,
        };
        if world_size == 1 {
            return Ok(comm);
        }
        let start = Instant::now();
        let mut secret = Secret::for_world(world)?;
        if rank == 0 && !world.agent_store {
            // Across nodes the store must be reachable from other hosts; on one node, keep it local.
            let listener = if world.local_world_size < world_size {
                StoreServer::listen_for_hosts(&world.master_addr, world.master_port)?
            } else {
                StoreServer::listen(&world.store_addr())?
            };
            let token = match &secret {
                Secret::Token(token) => token.clone(),
                Secret::LocalFile { dir, port } => {
                    // Written before the store answers anyone: a rank reads it once challenged.
                    let token = RdzvToken::generate()?;
                    comm._token_file = Some(LocalTokenFile::create(dir, *port, &token)?);
                    token
                }
            };
            comm._server = Some(StoreServer::serve(listener, StoreConfig::new(token.clone(), world_size))?);
            secret = Secret::Token(token);
        }
        let store = StoreClient::connect_with(&world.store_addr(), &secret, cfg.rendezvous_timeout)?;
        let token = store.token().clone();
        let left = |what: &str| {
            cfg.rendezvous_timeout.checked_sub(start.elapsed()).ok_or_else(|| CommError::RendezvousTimeout {
                rank,
                waited: start.elapsed(),
                what: what.to_string(),
            })
        };

        let ip = store.local_ip().unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
        let listener = TcpListener::bind((ip, 0)).map_err(|source| CommError::Bind { addr: format!("{ip}:0"), source })?;
        let my_addr = listener.local_addr().map_err(|e| io_err(rank, "reading the listening address", e))?;
        store.set(&format!("{KEY_PREFIX}addr/{rank}"), my_addr.to_string().as_bytes())?;

        // Connect to every lower rank; their listen backlog accepts us even before they call accept.
        for peer in 0..rank {
            let key = format!("{KEY_PREFIX}addr/{peer}");
            let addr = store.wait(&key, left("addresses")?)?.ok_or_else(|| CommError::RendezvousTimeout {
                rank,
                waited: start.elapsed(),
                what: format!("rank {peer} to publish its address (is it running?)"),
            })?;
            let addr = String::from_utf8_lossy(&addr).to_string();
            let mut stream = TcpStream::connect(&addr).map_err(|e| io_err(rank, &format!("connecting to rank {peer} at {addr}"), e))?;
            auth::connect(&stream, &Secret::Token(token.clone()), Context::Peer, start + cfg.rendezvous_timeout)
                .map_err(|e| auth::describe(e, &format!("rank {peer} at {addr}")))?;
            let mut hello = Vec::with_capacity(12);
            hello.extend_from_slice(&HANDSHAKE_MAGIC.to_le_bytes());
            hello.extend_from_slice(&(rank as u32).to_le_bytes());
            hello.extend_from_slice(&(world_size as u32).to_le_bytes());
            stream.write_all(&hello).map_err(|e| io_err(rank, &format!("greeting rank {peer}"), e))?;
            comm.peers[peer] = Some(configure(stream, rank)?);
        }
        // Accept every higher rank.
        listener.set_nonblocking(true).map_err(|e| io_err(rank, "configuring the listener", e))?;
        let mut pending = world_size - 1 - rank;
        while pending > 0 {
            match listener.accept() {
                Ok((stream, _)) => {
                    stream.set_nonblocking(false).map_err(|e| io_err(rank, "configuring a connection", e))?;
                    let deadline = (Instant::now() + PEER_AUTH_TIMEOUT).min(start + cfg.rendezvous_timeout);
                    let mut hello = [0u8; 12];
                    let ours = auth::accept(&stream, &token, Context::Peer, deadline, || Admission::Admit).is_ok()
                        && read_exact_until(&stream, &mut hello, deadline).is_ok();
                    if !ours {
                        continue; // not one of ours (a port scanner, a stale client, no token): ignore it
                    }
                    let magic = u32::from_le_bytes(hello[0..4].try_into().expect("4 bytes"));
                    let peer = u32::from_le_bytes(hello[4..8].try_into().expect("4 bytes")) as usize;
                    let theirs = u32::from_le_bytes(hello[8..12].try_into().expect("4 bytes")) as usize;
                    if magic != HANDSHAKE_MAGIC || peer <= rank || peer >= world_size || comm.peers[peer].is_some() {
                        continue;
                    }
                    if theirs != world_size {
                        return Err(CommError::BadEnv {
                            var: "WORLD_SIZE".into(),
                            value: theirs.to_string(),
                            reason: format!("rank {peer} says the world has {theirs} ranks, rank {rank} says {world_size}"),
                        });
                    }
                    comm.peers[peer] = Some(configure(stream, rank)?);
                    pending -= 1;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if start.elapsed() >= cfg.rendezvous_timeout {
                        let missing: Vec<usize> = (rank + 1..world_size).filter(|p| comm.peers[*p].is_none()).collect();
                        return Err(CommError::RendezvousTimeout {
                            rank,
                            waited: start.elapsed(),
                            what: format!("ranks {missing:?} to connect (are they running?)"),
                        });
                    }
                    thread::sleep(Duration::from_millis(2));
                }
                Err(e) => return Err(io_err(rank, "accepting connections", e)),
            }
        }
        let reporter_store = StoreClient::connect(&world.store_addr(), &token, left("the store")?)?;
        comm.reporter = Some(ProgressReporter::spawn(reporter_store, rank));
        comm.store = Some(store);
        // Everyone is connected to everyone once this returns.
        let saved = std::mem::replace(&mut comm.cfg.timeout, left("the first barrier")?);
        super::Communicator::barrier(&comm)?;
        comm.cfg.timeout = saved;
        Ok(comm)
    }

    fn lock_state(&self) -> MutexGuard<'_, OpState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Run one collective: assign its sequence number, record it, enforce its deadline, and turn a
    /// failure into an error that names the operation and the ranks involved.
    pub(crate) fn run_op(
        &self,
        op: OpKind,
        dtype: Option<DType>,
        numel: usize,
        body: impl FnOnce(&OpCtx<'_>),
    ) -> Result<(), CommError> {
        let mut state = self.lock_state();
        if let Some(first) = &state.poisoned {
            return Err(CommError::Poisoned { rank: self.rank, first: first.clone() });
        }
        let seq = state.next_seq;
        state.next_seq += 1;
        state.recorder.start(seq, op, dtype, numel);
        if let Some(r) = &self.reporter {
            r.entered(seq, op);
        }
        let started = Instant::now();
        let ctx = OpCtx { comm: self, seq, op, dtype, deadline: started + self.cfg.timeout, failure: Mutex::new(None) };
        body(&ctx);
        let failure = ctx.failure.into_inner().unwrap_or_else(|p| p.into_inner());
        let Some(link) = failure else {
            state.recorder.finish(seq, Ok(()));
            return Ok(());
        };
        if link.closes_links() {
            self.shutdown_links();
        }
        state.recorder.finish(seq, Err(short_reason(&link)));
        let err = self.describe_failure(link, op, seq, started.elapsed(), state.recorder.render());
        let first_line = err.to_string().lines().next().unwrap_or_default().to_string();
        if let Some(store) = &self.store {
            let _ = store.set(&format!("{KEY_PREFIX}abort/{}", self.rank), first_line.as_bytes());
        }
        state.poisoned = Some(first_line);
        Err(err)
    }

    pub(crate) fn render_recorder(&self) -> String {
        self.lock_state().recorder.render()
    }

    pub(crate) fn shutdown_links(&self) {
        for s in self.peers.iter().flatten() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    fn describe_failure(&self, link: LinkError, op: OpKind, seq: u64, waited: Duration, recent: String) -> CommError {
        let rank = self.rank;
        match link {
            LinkError::Timeout { peer } => self.timeout_error(op, seq, waited, vec![peer], recent),
            LinkError::Closed { peer, reason } => {
                // If the peer gave up on this collective because of a timeout, this rank is waiting on
                // the same missing ranks: report the timeout, not the side effect.
                let cause = self.abort_reason(peer);
                match cause {
                    Some(c) if c.contains(" timed out ") => self.timeout_error(op, seq, waited, vec![], recent),
                    Some(c) => CommError::PeerLost { rank, peer, op, seq, reason: format!("{reason}; rank {peer} reported: {c}") },
                    None => CommError::PeerLost { rank, peer, op, seq, reason },
                }
            }
            LinkError::Desync { peer, got, expected } => CommError::Desync { rank, peer, got, expected },
            LinkError::Internal(reason) => CommError::Io { rank, what: format!("{op} #{seq}"), source: std::io::Error::other(reason) },
        }
    }

    fn abort_reason(&self, peer: usize) -> Option<String> {
        let store = self.store.as_ref()?;
        // The peer publishes its reason just before closing; give it a moment to land.
        for _ in 0..10 {
            if let Ok(Some(v)) = store.get(&format!("{KEY_PREFIX}abort/{peer}")) {
                return Some(String::from_utf8_lossy(&v).to_string());
            }
            thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Ask the store which ranks have not entered collective `seq`.
    fn timeout_error(&self, op: OpKind, seq: u64, waited: Duration, stalled: Vec<usize>, recent: String) -> CommError {
        let mut missing = Vec::new();
        let mut notes = Vec::new();
        let mut store_error = None;
        if let Some(store) = &self.store {
            for peer in (0..self.world_size).filter(|p| *p != self.rank) {
                match store.get(&format!("{KEY_PREFIX}progress/{peer}")) {
                    Ok(v) => {
                        // The value is "<seq> <op>", e.g. "11 all_reduce".
                        let text = v.map(|v| String::from_utf8_lossy(&v).to_string());
                        let parsed = text.as_deref().and_then(|t| t.split_once(' '));
                        let reached = parsed.and_then(|(s, _)| s.parse::<u64>().ok());
                        if reached.is_none_or(|s| s < seq) {
                            missing.push(peer);
                            notes.push(match parsed {
                                Some((s, o)) => format!("rank {peer} last entered {o} #{s}"),
                                None => format!("rank {peer} has entered no collective"),
                            });
                        }
                    }
                    Err(e) => {
                        store_error = Some(e.to_string());
                        break;
                    }
                }
            }
        }
        let detail = if let Some(e) = store_error {
            missing = stalled.clone();
            format!("no data from ranks {stalled:?}; could not ask the store which ranks arrived ({e})")
        } else if missing.is_empty() {
            format!("every rank entered it, but data from ranks {stalled:?} did not arrive in time (slow network or a stalled peer)")
        } else {
            format!("ranks {missing:?} have not arrived ({})", notes.join("; "))
        };
        CommError::Timeout { rank: self.rank, op, seq, waited, missing, detail, recent }
    }
}

impl Drop for TcpCommunicator {
    fn drop(&mut self) {
        self.shutdown_links();
    }
}

fn configure(stream: TcpStream, rank: usize) -> Result<TcpStream, CommError> {
    stream.set_nodelay(true).map_err(|e| io_err(rank, "configuring a connection", e))?;
    Ok(stream)
}

fn io_err(rank: usize, what: &str, source: std::io::Error) -> CommError {
    CommError::Io { rank, what: what.to_string(), source }
}

fn short_reason(link: &LinkError) -> String {
    match link {
        LinkError::Timeout { peer } => format!("timed out waiting for rank {peer}"),
        LinkError::Closed { peer, reason } => format!("connection to rank {peer} lost: {reason}"),
        LinkError::Desync { peer, got, .. } => format!("rank {peer} sent {got}"),
        LinkError::Internal(r) => r.clone(),
    }
}

/// Publishes, from a background thread, the last collective this rank entered, so a rank that times
/// out can tell which ranks never arrived. The hot path only updates a mutex.
struct ProgressReporter {
    shared: Arc<(Mutex<Progress>, Condvar)>,
}

#[derive(Default)]
struct Progress {
    latest: Option<(u64, OpKind)>,
    dirty: bool,
    stop: bool,
}

impl ProgressReporter {
    fn spawn(store: StoreClient, rank: usize) -> Self {
        let shared = Arc::new((Mutex::new(Progress::default()), Condvar::new()));
        let s = shared.clone();
        let spawned = thread::Builder::new().name("comm-progress".into()).spawn(move || {
            let key = format!("{KEY_PREFIX}progress/{rank}");
            loop {
                let (lock, cv) = &*s;
                let mut p = lock.lock().unwrap_or_else(|e| e.into_inner());
                while !p.dirty && !p.stop {
                    p = cv.wait(p).unwrap_or_else(|e| e.into_inner());
                }
                if p.stop {
                    return;
                }
                p.dirty = false;
                let Some((seq, op)) = p.latest else { continue };
                drop(p);
                // The store only serves diagnostics now; if it is gone, stop reporting quietly.
                if store.set(&key, format!("{seq} {op}").as_bytes()).is_err() {
                    return;
                }
            }
        });
        if spawned.is_err() {
            tracing::warn!("could not start the progress reporter thread; timeouts will not name missing ranks");
        }
        Self { shared }
    }

    fn entered(&self, seq: u64, op: OpKind) {
        let (lock, cv) = &*self.shared;
        let mut p = lock.lock().unwrap_or_else(|e| e.into_inner());
        p.latest = Some((seq, op));
        p.dirty = true;
        cv.notify_one();
    }
}

impl Drop for ProgressReporter {
    fn drop(&mut self) {
        let (lock, cv) = &*self.shared;
        lock.lock().unwrap_or_else(|e| e.into_inner()).stop = true;
        cv.notify_one();
    }
}
