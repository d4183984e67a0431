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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::thread;
use std::time::{Duration, Instant};

const HANDSHAKE_MAGIC: u32 = 0xFE55_0A11;
const KEY_PREFIX: &str = "ferrospeed/";
/// How long a connection to this rank's listening socket has to prove the job's secret and say who it is.
const PEER_AUTH_TIMEOUT: Duration = Duration::from_secs(5);

/// A group of ranks connected pairwise over TCP; the CPU backend and the reference for all others.
///
/// The world is formed by [`TcpCommunicator::connect`]; [`TcpCommunicator::split`] forms sub-groups
/// (one per mesh axis) with connections, sequence numbers, flight recorder and progress keys of
/// their own, so a group's collectives never wait behind another group's.
pub struct TcpCommunicator {
    /// This rank's index in the group.
    pub(crate) rank: usize,
    /// Ranks in the group.
    pub(crate) world_size: usize,
    /// One connection per peer; `None` at this rank's own index.
    pub(crate) peers: Vec<Option<TcpStream>>,
    pub(crate) cfg: CommConfig,
    pub(crate) group: GroupInfo,
    state: Mutex<OpState>,
    /// Collectives hold it exclusively, point-to-point batches shared: a send and a receive on other
    /// threads may run at once (a pipeline stage's sender and its compute thread), a collective
    /// never interleaves its bytes with theirs.
    traffic: RwLock<()>,
    /// Per peer, whose turn it is on each direction (receive, send) of its connection: batches that
    /// send to (or receive from) one peer take turns in the order their messages were numbered.
    links: Vec<[LinkTurn; 2]>,
    store: Option<Arc<StoreClient>>,
    /// The connection the progress reporters of this group and its sub-groups publish through.
    reporter_store: Option<Arc<StoreClient>>,
    reporter: Option<ProgressReporter>,
    /// Sub-groups split from this group so far: part of their store keys, the same on every rank.
    splits: AtomicU64,
    // Dropped before the server (fields drop in order): the file goes while the port is still ours.
    _token_file: Option<LocalTokenFile>,
    _server: Option<StoreServer>,
}

struct OpState {
    next_seq: u64,
    /// Point-to-point messages sent to / received from each peer so far (their sequence numbers).
    sent: Vec<u64>,
    received: Vec<u64>,
    next_p2p: u64,
    poisoned: Option<String>,
    recorder: FlightRecorder,
}

/// Which ranks of the world a group holds, and its name in errors and store keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupInfo {
    name: String,
    /// World rank of each group rank.
    members: Vec<usize>,
    /// Prefix of this group's keys in the rendezvous store.
    prefix: String,
}

impl GroupInfo {
    fn world(size: usize) -> Self {
        Self { name: "world".into(), members: (0..size).collect(), prefix: KEY_PREFIX.into() }
    }

    /// The group's name: `world`, or the axis and index a split gave it (`pp0`, `dp3`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// World rank of each group rank, in group-rank order.
    pub fn members(&self) -> &[usize] {
        &self.members
    }

    /// The world rank of group rank `r`.
    pub fn world_rank(&self, r: usize) -> usize {
        self.members.get(r).copied().unwrap_or(r)
    }

    /// How errors name the group: `the world`, or `group dp1 (world ranks [1, 3])`.
    pub fn describe(&self) -> String {
        if self.name == "world" {
            "the world".into()
        } else {
            format!("group {} (world ranks {:?})", self.name, self.members)
        }
    }
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

/// How an operation is numbered: collectives by the group's sequence, point-to-point batches by
/// their own (only the ranks involved take part, so they cannot use the group's).
pub(crate) enum Numbering {
    Collective,
    /// A batch of sends and receives: the peers' message counts in and out, advanced on success.
    P2p { sends: Vec<(usize, u64)>, recvs: Vec<(usize, u64)> },
}

/// One direction of a connection: the number of the next message to go through it.
#[derive(Default)]
struct LinkTurn {
    next: Mutex<u64>,
    turned: Condvar,
}

/// A batch's turn on one direction of a connection (see [`TcpCommunicator::take_turn`]).
pub(crate) struct Turn<'a> {
    link: &'a LinkTurn,
    after: u64,
}

/// The turn of a direction whose last batch failed part-way (its bytes may stop mid-message).
const BROKEN: u64 = u64::MAX;

impl Turn<'_> {
    /// This batch failed on the direction: no later batch may use it.
    pub(crate) fn break_link(&mut self) {
        self.after = BROKEN;
    }
}

impl Drop for Turn<'_> {
    /// The next batch's turn, or the direction broken for every later one.
    fn drop(&mut self) {
        *self.link.next.lock().unwrap_or_else(|p| p.into_inner()) = self.after;
        self.link.turned.notify_all();
    }
}

/// The first message numbers of a point-to-point batch, per peer, handed to its body.
pub(crate) struct P2pBase {
    pub sent: Vec<u64>,
    pub received: Vec<u64>,
}

impl TcpCommunicator {
    fn unconnected(group: GroupInfo, rank: usize, cfg: &CommConfig) -> Self {
        let world_size = group.members.len();
        Self {
            rank,
            world_size,
            peers: (0..world_size).map(|_| None).collect(),
            cfg: cfg.clone(),
            group,
            state: Mutex::new(OpState {
                next_seq: 0,
                sent: vec![0; world_size],
                received: vec![0; world_size],
                next_p2p: 0,
                poisoned: None,
                recorder: FlightRecorder::new(cfg.recorder_len),
            }),
            traffic: RwLock::new(()),
            links: (0..world_size).map(|_| [LinkTurn::default(), LinkTurn::default()]).collect(),
            store: None,
            reporter_store: None,
            reporter: None,
            splits: AtomicU64::new(0),
            _token_file: None,
            _server: None,
        }
    }

    /// Form the group described by `world` (usually [`WorldInfo::from_env`]).
    ///
    /// Rank 0 serves the store unless the launcher does (`agent_store`). Every rank publishes a
    /// listening address, connects to the lower ranks and accepts the higher ones, then all ranks
    /// run a barrier. Every connection, to the store and between ranks, first proves the job's secret
    /// both ways (`Secret::for_world` says where it comes from). Fails with a clear error if any step
    /// exceeds `cfg.rendezvous_timeout`.
    pub fn connect(world: &WorldInfo, cfg: &CommConfig) -> Result<Self, CommError> {
        let (rank, world_size) = (world.rank, world.world_size);
        let mut comm = Self::unconnected(GroupInfo::world(world_size), rank, cfg);
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
        let store = Arc::new(StoreClient::connect_with(&world.store_addr(), &secret, cfg.rendezvous_timeout)?);
        comm.form_mesh(&store, start)?;
        let token = store.token().clone();
        let left = cfg.rendezvous_timeout.checked_sub(start.elapsed()).ok_or_else(|| CommError::RendezvousTimeout {
            rank,
            waited: start.elapsed(),
            what: "the store".into(),
        })?;
        let reporter_store = Arc::new(StoreClient::connect(&world.store_addr(), &token, left)?);
        comm.finish_forming(store, reporter_store, start)?;
        Ok(comm)
    }

    /// Form sub-groups of this group: `groups` partitions its ranks (group ranks, each exactly once;
    /// a sub-group's ranks are numbered in the order listed), and this rank joins the one holding it,
    /// named `<axis><index>`. A collective over this group: every rank calls it with the same
    /// arguments, in the same order as its other collectives.
    pub fn split(&self, axis: &str, groups: &[Vec<usize>]) -> Result<TcpCommunicator, CommError> {
        let invalid = |reason: String| CommError::Split { group: self.group.describe(), axis: axis.to_string(), reason };
        if axis.is_empty() || !axis.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(invalid("the axis name must be letters, digits or '_'".into()));
        }
        let mut seen = vec![false; self.world_size];
        for g in groups {
            if g.is_empty() {
                return Err(invalid("a group is empty".into()));
            }
            for &r in g {
                if r >= self.world_size {
                    return Err(invalid(format!("rank {r} is not in this group of {}", self.world_size)));
                }
                if std::mem::replace(&mut seen[r], true) {
                    return Err(invalid(format!("rank {r} is in two groups")));
                }
            }
        }
        if let Some(r) = seen.iter().position(|s| !s) {
            return Err(invalid(format!("rank {r} is in no group; the groups must cover every rank once")));
        }
        let n = self.splits.fetch_add(1, Ordering::Relaxed);
        let (index, mine) = groups.iter().enumerate().find(|(_, g)| g.contains(&self.rank)).expect("every rank is in a group");
        let info = GroupInfo {
            name: format!("{axis}{index}"),
            members: mine.iter().map(|&r| self.group.world_rank(r)).collect(),
            prefix: format!("{}s{n}/{axis}{index}/", self.group.prefix),
        };
        let rank = mine.iter().position(|&r| r == self.rank).expect("the rank is in its group");
        let mut comm = Self::unconnected(info, rank, &self.cfg);
        if mine.len() == 1 {
            return Ok(comm);
        }
        let (Some(store), Some(reporter_store)) = (&self.store, &self.reporter_store) else {
            return Err(invalid("this group has no rendezvous store to form sub-groups through".into()));
        };
        let start = Instant::now();
        comm.form_mesh(store, start)?;
        comm.finish_forming(store.clone(), reporter_store.clone(), start)?;
        Ok(comm)
    }

    /// Who this group is: its name and its members' world ranks.
    pub fn group(&self) -> &GroupInfo {
        &self.group
    }

    /// Publish this rank's listening address under the group's keys, connect to every lower rank
    /// and accept every higher one, each connection proving the job's secret both ways.
    fn form_mesh(&mut self, store: &StoreClient, start: Instant) -> Result<(), CommError> {
        let (rank, world_size, cfg) = (self.rank, self.world_size, self.cfg.clone());
        let token = store.token().clone();
        let prefix = self.group.prefix.clone();
        let group = self.group.clone();
        let me = group.world_rank(rank);
        let left = |what: &str| {
            cfg.rendezvous_timeout.checked_sub(start.elapsed()).ok_or_else(|| CommError::RendezvousTimeout {
                rank: me,
                waited: start.elapsed(),
                what: what.to_string(),
            })
        };

        let ip = store.local_ip().unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
        let listener = TcpListener::bind((ip, 0)).map_err(|source| CommError::Bind { addr: format!("{ip}:0"), source })?;
        let my_addr = listener.local_addr().map_err(|e| io_err(me, "reading the listening address", e))?;
        store.set(&format!("{prefix}addr/{rank}"), my_addr.to_string().as_bytes())?;

        // Connect to every lower rank; their listen backlog accepts us even before they call accept.
        for peer in 0..rank {
            let key = format!("{prefix}addr/{peer}");
            let wpeer = group.world_rank(peer);
            let addr = store.wait(&key, left("addresses")?)?.ok_or_else(|| CommError::RendezvousTimeout {
                rank: me,
                waited: start.elapsed(),
                what: format!("rank {wpeer} to publish its address in {} (is it running?)", group.describe()),
            })?;
            let addr = String::from_utf8_lossy(&addr).to_string();
            let mut stream =
                TcpStream::connect(&addr).map_err(|e| io_err(me, &format!("connecting to rank {wpeer} at {addr}"), e))?;
            auth::connect(&stream, &Secret::Token(token.clone()), Context::Peer, start + cfg.rendezvous_timeout)
                .map_err(|e| auth::describe(e, &format!("rank {wpeer} at {addr}")))?;
            let mut hello = Vec::with_capacity(12);
            hello.extend_from_slice(&HANDSHAKE_MAGIC.to_le_bytes());
            hello.extend_from_slice(&(rank as u32).to_le_bytes());
            hello.extend_from_slice(&(world_size as u32).to_le_bytes());
            stream.write_all(&hello).map_err(|e| io_err(me, &format!("greeting rank {wpeer}"), e))?;
            self.peers[peer] = Some(configure(stream, me)?);
        }
        // Accept every higher rank.
        listener.set_nonblocking(true).map_err(|e| io_err(me, "configuring the listener", e))?;
        let mut pending = world_size - 1 - rank;
        while pending > 0 {
            match listener.accept() {
                Ok((stream, _)) => {
                    stream.set_nonblocking(false).map_err(|e| io_err(me, "configuring a connection", e))?;
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
                    if magic != HANDSHAKE_MAGIC || peer <= rank || peer >= world_size || self.peers[peer].is_some() {
                        continue;
                    }
                    if theirs != world_size {
                        return Err(CommError::BadEnv {
                            var: "WORLD_SIZE".into(),
                            value: theirs.to_string(),
                            reason: format!(
                                "rank {} says {} has {theirs} ranks, rank {me} says {world_size}",
                                group.world_rank(peer),
                                group.describe()
                            ),
                        });
                    }
                    self.peers[peer] = Some(configure(stream, me)?);
                    pending -= 1;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if start.elapsed() >= cfg.rendezvous_timeout {
                        let missing: Vec<usize> =
                            (rank + 1..world_size).filter(|p| self.peers[*p].is_none()).map(|p| group.world_rank(p)).collect();
                        return Err(CommError::RendezvousTimeout {
                            rank: me,
                            waited: start.elapsed(),
                            what: format!("ranks {missing:?} to connect in {} (are they running?)", group.describe()),
                        });
                    }
                    thread::sleep(Duration::from_millis(2));
                }
                Err(e) => return Err(io_err(me, "accepting connections", e)),
            }
        }
        Ok(())
    }

    /// Start reporting progress and run the first barrier within the rendezvous deadline.
    fn finish_forming(&mut self, store: Arc<StoreClient>, reporter_store: Arc<StoreClient>, start: Instant) -> Result<(), CommError> {
        self.reporter = Some(ProgressReporter::spawn(reporter_store.clone(), format!("{}progress/{}", self.group.prefix, self.rank)));
        self.reporter_store = Some(reporter_store);
        self.store = Some(store);
        // Everyone is connected to everyone once this returns.
        let left = self.cfg.rendezvous_timeout.checked_sub(start.elapsed()).ok_or_else(|| CommError::RendezvousTimeout {
            rank: self.group.world_rank(self.rank),
            waited: start.elapsed(),
            what: "the first barrier".into(),
        })?;
        let saved = std::mem::replace(&mut self.cfg.timeout, left);
        super::Communicator::barrier(self)?;
        self.cfg.timeout = saved;
        Ok(())
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
        self.execute(op, dtype, numel, Numbering::Collective, |ctx, _| body(ctx))
    }

    /// Run an operation numbered by `numbering` (see [`Numbering`]); `body` gets the point-to-point
    /// message numbers of the peers it names (empty for a collective).
    pub(crate) fn execute(
        &self,
        op: OpKind,
        dtype: Option<DType>,
        numel: usize,
        numbering: Numbering,
        body: impl FnOnce(&OpCtx<'_>, &P2pBase),
    ) -> Result<(), CommError> {
        // A collective owns every connection; point-to-point batches share them (see `traffic`),
        // their message numbers reserved up front so that the state lock is not held while they wait.
        let (_shared, _exclusive);
        match numbering {
            Numbering::Collective => _exclusive = Some(self.traffic.write().unwrap_or_else(|p| p.into_inner())),
            Numbering::P2p { .. } => _shared = Some(self.traffic.read().unwrap_or_else(|p| p.into_inner())),
        }
        let mut state = self.lock_state();
        if let Some(first) = &state.poisoned {
            return Err(CommError::Poisoned { rank: self.group.world_rank(self.rank), first: first.clone() });
        }
        let base = P2pBase { sent: state.sent.clone(), received: state.received.clone() };
        let seq = match &numbering {
            Numbering::Collective => {
                let seq = state.next_seq;
                state.next_seq += 1;
                if let Some(r) = &self.reporter {
                    r.entered(seq, op);
                }
                seq
            }
            Numbering::P2p { sends, recvs } => {
                for &(peer, n) in sends {
                    state.sent[peer] += n;
                }
                for &(peer, n) in recvs {
                    state.received[peer] += n;
                }
                state.next_p2p += 1;
                state.next_p2p - 1
            }
        };
        state.recorder.start(seq, op, dtype, numel);
        let started = Instant::now();
        let ctx = OpCtx { comm: self, seq, op, dtype, deadline: started + self.cfg.timeout, failure: Mutex::new(None) };
        if matches!(numbering, Numbering::P2p { .. }) {
            drop(state);
            body(&ctx, &base);
            state = self.lock_state();
        } else {
            body(&ctx, &base);
        }
        let failure = ctx.failure.into_inner().unwrap_or_else(|p| p.into_inner());
        let Some(link) = failure else {
            state.recorder.finish(seq, op, Ok(()));
            return Ok(());
        };
        if link.closes_links() {
            self.shutdown_links();
        }
        state.recorder.finish(seq, op, Err(self.short_reason(&link)));
        let err = self.describe_failure(link, op, seq, started.elapsed(), state.recorder.render());
        let first_line = err.to_string().lines().next().unwrap_or_default().to_string();
        if let Some(store) = &self.store {
            let _ = store.set(&format!("{}abort/{}", self.group.prefix, self.rank), first_line.as_bytes());
        }
        state.poisoned = Some(first_line);
        Err(err)
    }

    /// Wait (until `deadline`) for the turn of the batch whose messages on one direction of the
    /// connection to `peer` (`send`: this rank writes) are numbered `first..first + n`; the turn
    /// passes on when the guard drops.
    pub(crate) fn take_turn(&self, peer: usize, send: bool, first: u64, n: u64, deadline: Instant) -> Result<Turn<'_>, LinkError> {
        let link = &self.links[peer][usize::from(send)];
        let mut next = link.next.lock().unwrap_or_else(|p| p.into_inner());
        while *next != first {
            if *next == BROKEN {
                return Err(LinkError::Internal(format!(
                    "an earlier batch on the connection to rank {} failed part-way: the group is unusable",
                    self.group.world_rank(peer)
                )));
            }
            let left = deadline.checked_duration_since(Instant::now()).filter(|d| !d.is_zero()).ok_or(LinkError::Timeout { peer })?;
            next = link.turned.wait_timeout(next, left).unwrap_or_else(|p| p.into_inner()).0;
        }
        Ok(Turn { link, after: first + n })
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
        let (rank, group) = (self.group.world_rank(self.rank), self.group.describe());
        match link {
            LinkError::Timeout { peer } => self.timeout_error(op, seq, waited, vec![peer], recent),
            LinkError::Closed { peer, reason } => {
                // If the peer gave up on this collective because of a timeout, this rank is waiting on
                // the same missing ranks: report the timeout, not the side effect.
                let cause = self.abort_reason(peer);
                let wpeer = self.group.world_rank(peer);
                match cause {
                    Some(c) if c.contains(" timed out ") => self.timeout_error(op, seq, waited, vec![], recent),
                    Some(c) => CommError::PeerLost { rank, peer: wpeer, group, op, seq, reason: format!("{reason}; rank {wpeer} reported: {c}") },
                    None => CommError::PeerLost { rank, peer: wpeer, group, op, seq, reason },
                }
            }
            LinkError::Desync { peer, got, expected } => {
                CommError::Desync { rank, peer: self.group.world_rank(peer), group, got, expected }
            }
            LinkError::Internal(reason) => {
                CommError::Io { rank, what: format!("{op} #{seq} of {group}"), source: std::io::Error::other(reason) }
            }
        }
    }

    fn abort_reason(&self, peer: usize) -> Option<String> {
        let store = self.store.as_ref()?;
        // The peer publishes its reason just before closing; give it a moment to land.
        for _ in 0..10 {
            if let Ok(Some(v)) = store.get(&format!("{}abort/{peer}", self.group.prefix)) {
                return Some(String::from_utf8_lossy(&v).to_string());
            }
            thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// What `peer` (a group rank) last entered, from its progress key: `(seq, op)`, or `None` if it
    /// entered nothing; `Err` if the store could not be asked.
    fn progress_of(&self, store: &StoreClient, peer: usize) -> Result<Option<(u64, String)>, CommError> {
        let v = store.get(&format!("{}progress/{peer}", self.group.prefix))?;
        // The value is "<seq> <op>", e.g. "11 all_reduce".
        let text = v.map(|v| String::from_utf8_lossy(&v).to_string());
        Ok(text.as_deref().and_then(|t| t.split_once(' ')).and_then(|(s, o)| Some((s.parse::<u64>().ok()?, o.to_string()))))
    }

    /// Ask the store which ranks have not entered collective `seq` (for a point-to-point batch: what
    /// the silent peer is doing instead). Ranks are named in world terms.
    fn timeout_error(&self, op: OpKind, seq: u64, waited: Duration, stalled: Vec<usize>, recent: String) -> CommError {
        let world_of = |v: &[usize]| v.iter().map(|&p| self.group.world_rank(p)).collect::<Vec<_>>();
        let mut missing = Vec::new();
        let mut notes = Vec::new();
        let mut store_error = None;
        let asked: Vec<usize> = if op == OpKind::SendRecv {
            stalled.clone()
        } else {
            (0..self.world_size).filter(|p| *p != self.rank).collect()
        };
        if let Some(store) = &self.store {
            for peer in asked {
                let wpeer = self.group.world_rank(peer);
                match self.progress_of(store, peer) {
                    Ok(reached) => {
                        let behind = op == OpKind::SendRecv || reached.as_ref().is_none_or(|(s, _)| *s < seq);
                        if behind {
                            missing.push(wpeer);
                            notes.push(match reached {
                                Some((s, o)) => format!("rank {wpeer} last entered {o} #{s}"),
                                None => format!("rank {wpeer} has entered no collective"),
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
        let stalled = world_of(&stalled);
        let detail = if let Some(e) = store_error {
            missing = stalled.clone();
            format!("no data from ranks {stalled:?}; could not ask the store which ranks arrived ({e})")
        } else if op == OpKind::SendRecv {
            missing = stalled.clone();
            let notes = if notes.is_empty() { String::new() } else { format!(" ({})", notes.join("; ")) };
            format!("ranks {stalled:?} did not post the matching send or receive{notes}")
        } else if missing.is_empty() {
            format!("every rank entered it, but data from ranks {stalled:?} did not arrive in time (slow network or a stalled peer)")
        } else {
            format!("ranks {missing:?} have not arrived ({})", notes.join("; "))
        };
        CommError::Timeout {
            rank: self.group.world_rank(self.rank),
            group: self.group.describe(),
            op,
            seq,
            waited,
            missing,
            detail,
            recent,
        }
    }

    fn short_reason(&self, link: &LinkError) -> String {
        let w = |p: &usize| self.group.world_rank(*p);
        match link {
            LinkError::Timeout { peer } => format!("timed out waiting for rank {}", w(peer)),
            LinkError::Closed { peer, reason } => format!("connection to rank {} lost: {reason}", w(peer)),
            LinkError::Desync { peer, got, .. } => format!("rank {} sent {got}", w(peer)),
            LinkError::Internal(r) => r.clone(),
        }
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
    fn spawn(store: Arc<StoreClient>, key: String) -> Self {
        let shared = Arc::new((Mutex::new(Progress::default()), Condvar::new()));
        let s = shared.clone();
        let spawned = thread::Builder::new().name("comm-progress".into()).spawn(move || {
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
