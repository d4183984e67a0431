//! The rendezvous store: a small TCP key-value server (set, get, wait-for-key, add) and its client.
//!
//! `ferrospeed launch` serves it on node 0 (like torchrun's agent store); without the launcher, rank 0
//! serves it. Ranks use it to exchange their addresses when the group forms, and to publish which
//! collective each has reached, so a timeout can name the ranks that never arrived.
//!
//! Only members of the job get to say anything: every connection proves it holds the job's secret
//! ([`RdzvToken`], `auth.rs`) before a single command is read, within [`StoreConfig::auth_timeout`].
//! At most [`StoreConfig::max_pending`] connections may be proving it at once (more are closed at the
//! accept, without a thread) and at most [`StoreConfig::max_clients`] stay connected after. A command's
//! key and value are at most [`MAX_KEY`] and [`MAX_VALUE`] bytes, checked before anything is allocated,
//! and once a command has started it must arrive whole within [`StoreConfig::message_timeout`]; between
//! commands a member may stay silent as long as it likes (a `wait` can be long too).

use super::auth::{self, read_exact_until, write_all_until, Admission, ConnectError, Context};
use super::error::CommError;
use super::token::{RdzvToken, Secret};
use std::collections::HashMap;
use std::io::Read;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

const CMD_SET: u8 = 1;
const CMD_GET: u8 = 2;
const CMD_WAIT: u8 = 3;
const CMD_ADD: u8 = 4;
/// The longest key the store takes.
pub const MAX_KEY: usize = 4 << 10;
/// The largest value the store takes: a rendezvous exchanges addresses and one-line messages.
pub const MAX_VALUE: usize = 4 << 20;
/// A `wait` longer than this waits this long.
const MAX_WAIT: Duration = Duration::from_secs(7 * 24 * 3600);
/// Stack of a connection's thread: it only parses, hashes and copies small buffers.
const CONN_STACK: usize = 256 << 10;

/// Who may connect to a [`StoreServer`], and how much of it they may take.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// The job's secret; every connection must prove it holds it.
    pub token: RdzvToken,
    /// Connections that have authenticated, at most; one more is told the store is full.
    pub max_clients: usize,
    /// Connections still authenticating, at most; more are closed as soon as they are accepted.
    pub max_pending: usize,
    /// How long a new connection has to authenticate.
    pub auth_timeout: Duration,
    /// How long the rest of a command may take to arrive once its first byte has, and its reply to leave.
    pub message_timeout: Duration,
}

impl StoreConfig {
    /// Limits for a job of `world_size` ranks: each rank keeps two connections (requests, progress
    /// reports), each launcher of another node one, with room to spare.
    pub fn new(token: RdzvToken, world_size: usize) -> Self {
        Self {
            token,
            max_clients: 3 * world_size + 16,
            max_pending: 64,
            auth_timeout: Duration::from_secs(5),
            message_timeout: Duration::from_secs(30),
        }
    }
}

#[derive(Default)]
struct Table {
    map: Mutex<HashMap<String, Vec<u8>>>,
    changed: Condvar,
}

impl Table {
    fn set(&self, key: String, value: Vec<u8>) {
        lock(&self.map).insert(key, value);
        self.changed.notify_all();
    }

    fn add(&self, key: String, delta: i64) -> i64 {
        let mut map = lock(&self.map);
        let old = map.get(&key).and_then(|v| std::str::from_utf8(v).ok()?.parse::<i64>().ok()).unwrap_or(0);
        let new = old.wrapping_add(delta);
        map.insert(key, new.to_string().into_bytes());
        drop(map);
        self.changed.notify_all();
        new
    }
}

/// What the server's threads share.
struct Shared {
    table: Table,
    cfg: StoreConfig,
    stop: AtomicBool,
    /// Connections authenticating now.
    pending: AtomicUsize,
    /// Connections authenticated and still open.
    clients: AtomicUsize,
}

/// One counted connection of [`Shared::pending`] or [`Shared::clients`], given back when dropped.
struct Slot {
    shared: Arc<Shared>,
    counter: fn(&Shared) -> &AtomicUsize,
}

impl Slot {
    /// A slot of `counter` if fewer than `max` are taken.
    fn take(shared: &Arc<Shared>, counter: fn(&Shared) -> &AtomicUsize, max: usize) -> Option<Self> {
        counter(shared)
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (n < max).then_some(n + 1))
            .ok()
            .map(|_| Self { shared: shared.clone(), counter })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        (self.counter)(&self.shared).fetch_sub(1, Ordering::SeqCst);
    }
}

/// A running store server. Dropping it stops accepting connections.
pub struct StoreServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

/// Environment variable naming an inherited file descriptor of a socket already listening for the
/// store. A supervisor that bound the port itself (the tests do) hands it over, so that no port is
/// probed first and raced for. Taken by the first [`StoreServer::listen`] of the process only.
pub const ENV_STORE_FD: &str = "FERROSPEED_STORE_FD";

impl StoreServer {
    /// Listen on `addr` (`host:port`; port 0 picks a free one) and serve in background threads
    /// ([`StoreServer::listen`], then [`StoreServer::serve`]).
    pub fn bind(addr: &str, cfg: StoreConfig) -> Result<Self, CommError> {
        Self::serve(Self::listen(addr)?, cfg)
    }

    /// A socket listening on `addr`; with `FERROSPEED_STORE_FD` set (see [`ENV_STORE_FD`]), that
    /// inherited socket instead, whose port must be the one `addr` asks for (any, for port 0).
    pub fn listen(addr: &str) -> Result<TcpListener, CommError> {
        match inherited_listener(addr)? {
            Some(l) => Ok(l),
            None => TcpListener::bind(addr).map_err(|source| CommError::Bind { addr: addr.into(), source }),
        }
    }

    /// A socket for a store that ranks on other hosts reach at `master_addr:port`. It listens on the
    /// interface of that address when the address is one of this host's; otherwise (a name that
    /// resolves to a loopback alias here, an address this host does not own, as behind NAT) on every
    /// interface, as torchrun's store always does. `FERROSPEED_STORE_FD` is honoured as by `listen`.
    pub fn listen_for_hosts(master_addr: &str, port: u16) -> Result<TcpListener, CommError> {
        let any = |ip: std::net::IpAddr| if ip.is_ipv6() { format!("[::]:{port}") } else { format!("0.0.0.0:{port}") };
        if let Some(l) = inherited_listener(&any(std::net::Ipv4Addr::UNSPECIFIED.into()))? {
            return Ok(l);
        }
        let ip = resolve(&format!("{master_addr}:{port}"))?.ip();
        if !ip.is_loopback() && !ip.is_unspecified() {
            match TcpListener::bind((ip, port)) {
                Ok(l) => return Ok(l),
                Err(e) if e.kind() == std::io::ErrorKind::AddrNotAvailable => {
                    tracing::debug!("{master_addr} ({ip}) is not an address of this host: the store listens on every interface");
                }
                Err(source) => return Err(CommError::Bind { addr: format!("{ip}:{port}"), source }),
            }
        }
        Self::listen(&any(ip))
    }

    /// Serve on `listener` in background threads, to those who hold `cfg.token`.
    pub fn serve(listener: TcpListener, cfg: StoreConfig) -> Result<Self, CommError> {
        let local = listener.local_addr().map_err(|source| CommError::Bind { addr: "the store's socket".into(), source })?;
        let shared = Arc::new(Shared {
            table: Table::default(),
            cfg,
            stop: AtomicBool::new(false),
            pending: AtomicUsize::new(0),
            clients: AtomicUsize::new(0),
        });
        let shared2 = shared.clone();
        thread::Builder::new()
            .name("store-accept".into())
            .spawn(move || accept_loop(listener, shared2))
            .map_err(|source| CommError::Bind { addr: local.to_string(), source })?;
        Ok(Self { addr: local, shared })
    }

    /// The address the server listens on (with the port it picked).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections open now: (authenticated, still authenticating).
    pub fn connections(&self) -> (usize, usize) {
        (self.shared.clients.load(Ordering::SeqCst), self.shared.pending.load(Ordering::SeqCst))
    }

    /// Read a key directly, without a connection (the serving process's own view).
    pub fn get_local(&self, key: &str) -> Option<Vec<u8>> {
        lock(&self.shared.table.map).get(key).cloned()
    }

    /// Set a key directly, waking clients that wait for it.
    pub fn set_local(&self, key: &str, value: &[u8]) {
        self.shared.table.set(key.to_string(), value.to_vec());
    }

    /// Add to a counter directly; returns the new value.
    pub fn add_local(&self, key: &str, delta: i64) -> i64 {
        self.shared.table.add(key.to_string(), delta)
    }
}

impl Drop for StoreServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept so its thread sees the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
    }
}

/// The listening socket `FERROSPEED_STORE_FD` hands over, if it is set and not taken yet.
fn inherited_listener(addr: &str) -> Result<Option<TcpListener>, CommError> {
    static TAKEN: AtomicBool = AtomicBool::new(false);
    let Ok(value) = std::env::var(ENV_STORE_FD) else { return Ok(None) };
    if TAKEN.swap(true, Ordering::SeqCst) {
        return Ok(None);
    }
    let bad = |reason: String| CommError::BadEnv { var: ENV_STORE_FD.into(), value: value.clone(), reason };
    let fd: i32 = value.trim().parse().map_err(|_| bad("expected a file descriptor number".into()))?;
    // SAFETY: fstat on any integer is harmless; it tells whether the descriptor is an open socket
    // before we take ownership of it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if fd < 0 || unsafe { libc::fstat(fd, &mut st) } != 0 || st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(bad("it is not an open socket of this process".into()));
    }
    use std::os::fd::FromRawFd;
    // SAFETY: the descriptor is an open socket handed to this process for the store, taken once.
    let listener = unsafe { TcpListener::from_raw_fd(fd) };
    // The socket must not leak into the ranks this process starts.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    let local = listener.local_addr().map_err(|e| bad(format!("it is not a TCP socket ({e})")))?;
    let wanted = addr.rsplit_once(':').and_then(|(_, p)| p.parse::<u16>().ok()).unwrap_or(0);
    if wanted != 0 && wanted != local.port() {
        return Err(bad(format!("it listens on port {}, not the port {wanted} asked for", local.port())));
    }
    Ok(Some(listener))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    for conn in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let conn = match conn {
            Ok(c) => c,
            Err(_) => {
                // Out of descriptors, or a connection reset before it was accepted: do not spin.
                thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        // Beyond the limit the connection is closed here (dropped), and no thread is started for it.
        let Some(slot) = Slot::take(&shared, |s| &s.pending, shared.cfg.max_pending) else { continue };
        // If no thread can start, the closure drops: the slot is given back and the connection closed.
        let _ = thread::Builder::new().name("store-conn".into()).stack_size(CONN_STACK).spawn(move || serve_client(conn, slot));
    }
}

/// Authenticate a new connection, then serve its commands until it closes or breaks the protocol.
fn serve_client(conn: TcpStream, pending: Slot) {
    let shared = pending.shared.clone();
    let _ = conn.set_nodelay(true);
    let deadline = Instant::now() + shared.cfg.auth_timeout;
    let mut member = None;
    let admitted = auth::accept(&conn, &shared.cfg.token, Context::Store, deadline, || {
        member = Slot::take(&shared, |s| &s.clients, shared.cfg.max_clients);
        if member.is_some() {
            Admission::Admit
        } else {
            Admission::Full
        }
    });
    drop(pending);
    match admitted {
        // A connection ends when its client goes away or breaks the protocol; the server carries on.
        Ok(()) => {
            let _ = serve_commands(&conn, &shared);
        }
        Err(auth::Rejected::Io(e)) => tracing::debug!("store: dropped {:?} before it authenticated: {e}", conn.peer_addr().ok()),
        Err(why) => tracing::debug!("store: dropped {:?}: {why:?}", conn.peer_addr().ok()),
    }
    drop(member);
}

fn serve_commands(conn: &TcpStream, shared: &Shared) -> std::io::Result<()> {
    let message_timeout = shared.cfg.message_timeout;
    let table = &shared.table;
    loop {
        conn.set_read_timeout(None)?;
        let mut cmd = [0u8; 1];
        match (&*conn).read(&mut cmd) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        if !matches!(cmd[0], CMD_SET | CMD_GET | CMD_WAIT | CMD_ADD) {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "unknown store command"));
        }
        let deadline = Instant::now() + message_timeout;
        let key = String::from_utf8(read_field(conn, MAX_KEY, deadline)?)
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "key is not UTF-8"))?;
        let mut arg = [0u8; 8];
        read_exact_until(conn, &mut arg, deadline)?;
        let arg = u64::from_le_bytes(arg);
        let value = read_field(conn, MAX_VALUE, deadline)?;
        let mut reply = Vec::new();
        match cmd[0] {
            CMD_SET => {
                table.set(key, value);
                reply.push(1);
            }
            CMD_GET => encode_option(&mut reply, lock(&table.map).get(&key)),
            CMD_WAIT => {
                let deadline = Instant::now() + Duration::from_millis(arg).min(MAX_WAIT);
                let mut map = lock(&table.map);
                while !map.contains_key(&key) {
                    let now = Instant::now();
                    if now >= deadline {
                        break;
                    }
                    map = table.changed.wait_timeout(map, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
                }
                encode_option(&mut reply, map.get(&key));
            }
            _ => reply.extend_from_slice(&table.add(key, arg as i64).to_le_bytes()),
        }
        write_all_until(conn, &reply, Instant::now() + message_timeout)?;
    }
}

fn encode_option(reply: &mut Vec<u8>, value: Option<&Vec<u8>>) {
    match value {
        Some(v) => {
            reply.push(1);
            reply.extend_from_slice(&(v.len() as u32).to_le_bytes());
            reply.extend_from_slice(v);
        }
        None => reply.push(0),
    }
}

/// A length-prefixed field of at most `max` bytes, whole by `deadline`. The length is checked before
/// anything is allocated, and the buffer grows only with the bytes that actually arrive.
fn read_field(conn: &TcpStream, max: usize, deadline: Instant) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    read_exact_until(conn, &mut len, deadline)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a store field of {len} bytes is over the limit of {max}"),
        ));
    }
    let mut field = Vec::new();
    let mut chunk = [0u8; 16 << 10];
    while field.len() < len {
        let n = (len - field.len()).min(chunk.len());
        read_exact_until(conn, &mut chunk[..n], deadline)?;
        field.extend_from_slice(&chunk[..n]);
    }
    Ok(field)
}

/// A connection to the store. Methods are safe to call from several threads (one request at a time).
pub struct StoreClient {
    addr: String,
    token: RdzvToken,
    conn: Mutex<TcpStream>,
}

/// Resolve `host:port`, with an error that names the address.
pub fn resolve(addr: &str) -> Result<SocketAddr, CommError> {
    let mut addrs = addr
        .to_socket_addrs()
        .map_err(|e| CommError::BadAddress { addr: addr.into(), reason: e.to_string() })?;
    addrs.next().ok_or_else(|| CommError::BadAddress { addr: addr.into(), reason: "no address found".into() })
}

impl StoreClient {
    /// Connect to `addr` and prove `token`, retrying while it refuses or has no room to answer, for up
    /// to `timeout` (rank 0 may start later). A store that refuses the token fails at once.
    pub fn connect(addr: &str, token: &RdzvToken, timeout: Duration) -> Result<Self, CommError> {
        Self::connect_with(addr, &Secret::Token(token.clone()), timeout)
    }

    pub(crate) fn connect_with(addr: &str, secret: &Secret, timeout: Duration) -> Result<Self, CommError> {
        let sock = resolve(addr)?;
        let start = Instant::now();
        let mut backoff = Duration::from_millis(20);
        loop {
            let left = timeout.saturating_sub(start.elapsed());
            let reason = match TcpStream::connect_timeout(&sock, left.clamp(Duration::from_millis(10), Duration::from_secs(2))) {
                Ok(conn) => {
                    let _ = conn.set_nodelay(true);
                    match auth::connect(&conn, secret, Context::Store, start + timeout) {
                        Ok(token) => return Ok(Self { addr: addr.into(), token, conn: Mutex::new(conn) }),
                        // Closed before its challenge: too many connections were authenticating.
                        Err(ConnectError::NoChallenge(e)) => format!("it closed the connection before authenticating ({e})"),
                        Err(e) => return Err(auth::describe(e, &format!("the rendezvous store at {addr}"))),
                    }
                }
                Err(e) => e.to_string(),
            };
            if start.elapsed() + backoff >= timeout {
                return Err(CommError::StoreUnreachable { addr: addr.into(), waited: start.elapsed(), reason });
            }
            thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_millis(500));
        }
    }

    /// The address this client talks to.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The token this client proved (read from the host's token file, when that is where it was).
    pub(crate) fn token(&self) -> &RdzvToken {
        &self.token
    }

    /// The local address of this connection: the interface through which the store's host is reached,
    /// which is the one other ranks can reach this host through too.
    pub fn local_ip(&self) -> Option<std::net::IpAddr> {
        lock(&self.conn).local_addr().ok().map(|a| a.ip())
    }

    fn request(&self, cmd: u8, key: &str, arg: u64, value: &[u8], io_timeout: Duration) -> Result<Reply, CommError> {
        if key.len() > MAX_KEY || value.len() > MAX_VALUE {
            return Err(CommError::Store {
                addr: self.addr.clone(),
                reason: format!(
                    "a key of {} bytes or a value of {} bytes is more than the store takes ({MAX_KEY} and {MAX_VALUE})",
                    key.len(),
                    value.len()
                ),
            });
        }
        let msg = encode_command(cmd, key, arg, value);
        let conn = lock(&self.conn);
        let deadline = Instant::now() + io_timeout;
        let result = (|| -> std::io::Result<Reply> {
            write_all_until(&conn, &msg, deadline)?;
            match cmd {
                CMD_ADD => {
                    let mut counter = [0u8; 8];
                    read_exact_until(&conn, &mut counter, deadline)?;
                    Ok(Reply::Counter(i64::from_le_bytes(counter)))
                }
                CMD_SET => {
                    let mut ack = [0u8; 1];
                    read_exact_until(&conn, &mut ack, deadline)?;
                    Ok(Reply::Ack)
                }
                _ => {
                    let mut found = [0u8; 1];
                    read_exact_until(&conn, &mut found, deadline)?;
                    Ok(Reply::Value((found[0] == 1).then(|| read_field(&conn, MAX_VALUE, deadline)).transpose()?))
                }
            }
        })();
        result.map_err(|e| {
            // A half-finished exchange leaves the stream out of step: close it so later calls fail cleanly.
            let _ = conn.shutdown(Shutdown::Both);
            CommError::Store { addr: self.addr.clone(), reason: format!("{e} (is the store's host still running?)") }
        })
    }

    /// Set `key` to `value`.
    pub fn set(&self, key: &str, value: &[u8]) -> Result<(), CommError> {
        self.request(CMD_SET, key, 0, value, Duration::from_secs(60)).map(|_| ())
    }

    /// The value of `key`, if set.
    pub fn get(&self, key: &str) -> Result<Option<Vec<u8>>, CommError> {
        match self.request(CMD_GET, key, 0, &[], Duration::from_secs(60))? {
            Reply::Value(v) => Ok(v),
            _ => unreachable!("GET answers with a value"),
        }
    }

    /// Wait up to `timeout` for `key` to be set; `None` if it was not.
    pub fn wait(&self, key: &str, timeout: Duration) -> Result<Option<Vec<u8>>, CommError> {
        let timeout = timeout.min(MAX_WAIT);
        let ms = timeout.as_millis() as u64;
        match self.request(CMD_WAIT, key, ms, &[], timeout + Duration::from_secs(30))? {
            Reply::Value(v) => Ok(v),
            _ => unreachable!("WAIT answers with a value"),
        }
    }

    /// Add `delta` to the integer counter `key` (missing counts as 0); returns the new value.
    pub fn add(&self, key: &str, delta: i64) -> Result<i64, CommError> {
        match self.request(CMD_ADD, key, delta as u64, &[], Duration::from_secs(60))? {
            Reply::Counter(v) => Ok(v),
            _ => unreachable!("ADD answers with a counter"),
        }
    }
}

/// A command as it crosses the wire: `cmd ‖ len ‖ key ‖ arg ‖ len ‖ value`, lengths u32 and arg u64 little-endian.
fn encode_command(cmd: u8, key: &str, arg: u64, value: &[u8]) -> Vec<u8> {
    let mut msg = Vec::with_capacity(17 + key.len() + value.len());
    msg.push(cmd);
    msg.extend_from_slice(&(key.len() as u32).to_le_bytes());
    msg.extend_from_slice(key.as_bytes());
    msg.extend_from_slice(&arg.to_le_bytes());
    msg.extend_from_slice(&(value.len() as u32).to_le_bytes());
    msg.extend_from_slice(value);
    msg
}

enum Reply {
    Ack,
    Value(Option<Vec<u8>>),
    Counter(i64),
}

#[cfg(test)]
#[path = "store_tests.rs"]
mod tests;
