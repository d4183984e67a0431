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
mod tests {
    use super::*;
    use std::io::Write;

    const FAILED: &str = "ferrospeed/launch/failed";

    fn token() -> RdzvToken {
        RdzvToken::generate().unwrap()
    }

    /// A store on a free loopback port with the limits `tune` sets; its address and token.
    fn store(tune: impl FnOnce(&mut StoreConfig)) -> (StoreServer, String, RdzvToken) {
        let t = token();
        let mut cfg = StoreConfig::new(t.clone(), 2);
        tune(&mut cfg);
        let server = StoreServer::bind("127.0.0.1:0", cfg).unwrap();
        let addr = server.local_addr().to_string();
        (server, addr, t)
    }

    fn client(addr: &str, t: &RdzvToken) -> StoreClient {
        StoreClient::connect(addr, t, Duration::from_secs(10)).unwrap()
    }

    /// Read from `conn` until the server closes it; how long that took, and what came before.
    fn until_closed(conn: &TcpStream, limit: Duration) -> (Duration, Vec<u8>) {
        let (took, got, closed) = read_until_closed(conn, limit);
        assert!(closed, "the server kept the connection open for {limit:?} (received {got:?})");
        (took, got)
    }

    /// What `conn` receives until the server closes it or `limit` passes, and whether it closed.
    fn read_until_closed(mut conn: &TcpStream, limit: Duration) -> (Duration, Vec<u8>, bool) {
        let start = Instant::now();
        conn.set_read_timeout(Some(limit)).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match conn.read(&mut buf) {
                Ok(0) => return (start.elapsed(), got, true),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    return (start.elapsed(), got, false)
                }
                // Reset: the server closed with our bytes unread.
                Err(_) => return (start.elapsed(), got, true),
            }
        }
    }

    /// Wait until `cond` holds, up to 10 s.
    fn eventually(what: &str, cond: impl Fn() -> bool) {
        let start = Instant::now();
        while !cond() {
            assert!(start.elapsed() < Duration::from_secs(10), "{what}");
            thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn set_get_wait_add() {
        let (server, addr, t) = store(|_| {});
        let a = client(&addr, &t);
        let b = client(&addr, &t);
        assert_eq!(a.get("k").unwrap(), None);
        a.set("k", b"v1").unwrap();
        assert_eq!(b.get("k").unwrap().as_deref(), Some(&b"v1"[..]));
        assert_eq!(a.add("n", 2).unwrap(), 2);
        assert_eq!(b.add("n", 3).unwrap(), 5);
        assert_eq!(server.get_local("n").as_deref(), Some(&b"5"[..]));
        // wait returns as soon as another client sets the key
        let waiter = thread::spawn(move || b.wait("later", Duration::from_secs(10)).unwrap());
        thread::sleep(Duration::from_millis(100));
        a.set("later", b"x").unwrap();
        assert_eq!(waiter.join().unwrap().as_deref(), Some(&b"x"[..]));
        // and gives up after its timeout
        let t = Instant::now();
        assert_eq!(a.wait("never", Duration::from_millis(200)).unwrap(), None);
        assert!(t.elapsed() >= Duration::from_millis(190));
    }

    #[test]
    fn a_wrong_token_is_refused_before_any_command_is_read() {
        let (server, addr, t) = store(|_| {});
        // A well-formed SET of the failure key, sent as the old protocol took it (no handshake)...
        let forged = encode_command(CMD_SET, FAILED, 0, b"rank 1 (pid 1) exited with code 1");
        let raw = TcpStream::connect(&addr).unwrap();
        (&raw).write_all(&forged).unwrap();
        until_closed(&raw, Duration::from_secs(10));
        // ...and after a made-up answer to the challenge.
        let raw = TcpStream::connect(&addr).unwrap();
        let mut challenge = [0u8; 40];
        (&raw).read_exact(&mut challenge).unwrap();
        assert_eq!(&challenge[..8], b"FSRDZV1\0");
        (&raw).write_all(&[[7u8; 64].as_slice(), &forged].concat()).unwrap();
        let (_, got, closed) = read_until_closed(&raw, Duration::from_secs(5));
        assert_eq!(server.get_local(FAILED), None, "a forged command was carried out");
        // REFUSED, then closed (a reset for the unread SET may overtake the REFUSED byte).
        assert!(closed && got.len() <= 1 && got.iter().all(|b| *b == 2), "got {got:?}, closed {closed}");
        // Our own client, with another job's token: one line naming the fix.
        let err = StoreClient::connect(&addr, &token(), Duration::from_secs(10)).err().unwrap();
        assert!(matches!(err, CommError::TokenRefused { .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains(&addr) && msg.contains("--rdzv-token") && msg.lines().count() == 1, "{msg}");
        // The members' store carries on.
        let c = client(&addr, &t);
        c.set(FAILED, b"member").unwrap();
        assert_eq!(server.get_local(FAILED).as_deref(), Some(&b"member"[..]));
    }

    #[test]
    fn a_server_that_cannot_prove_the_token_is_not_trusted() {
        // It challenges and says "accepted", but its own proof is made up.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let fake = thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            conn.write_all(b"FSRDZV1\0").unwrap();
            conn.write_all(&[9u8; 32]).unwrap();
            let mut answer = [0u8; 64];
            conn.read_exact(&mut answer).unwrap();
            conn.write_all(&[1u8]).unwrap();
            conn.write_all(&[0u8; 32]).unwrap();
            let _ = conn.read(&mut answer);
        });
        let err = StoreClient::connect(&addr, &token(), Duration::from_secs(10)).err().unwrap();
        assert!(matches!(err, CommError::NotAuthentic { .. }), "{err}");
        assert!(err.to_string().contains("MASTER_PORT"), "{err}");
        fake.join().unwrap();
    }

    #[test]
    fn an_oversized_length_claim_is_refused_without_waiting_for_its_bytes() {
        let (server, addr, t) = store(|_| {});
        let claim = 60u32 << 20;
        for field in ["key", "value"] {
            let c = client(&addr, &t);
            let conn = c.conn.lock().unwrap();
            // The header alone: the server must refuse at the length, not wait for 60 MB.
            let mut header = vec![CMD_SET];
            if field == "key" {
                header.extend_from_slice(&claim.to_le_bytes());
            } else {
                header.extend_from_slice(&3u32.to_le_bytes());
                header.extend_from_slice(b"big");
                header.extend_from_slice(&0u64.to_le_bytes());
                header.extend_from_slice(&claim.to_le_bytes());
            }
            (&*conn).write_all(&header).unwrap();
            let (took, got) = until_closed(&conn, Duration::from_secs(5));
            assert!(got.is_empty() && took < Duration::from_secs(5), "{field}: closed after {took:?}, got {got:?}");
        }
        assert_eq!(server.get_local("big"), None);
        eventually("the refused clients' slots are given back", || server.connections() == (0, 0));
        // Our client says so before sending anything.
        let c = client(&addr, &t);
        let err = c.set("big", &vec![0u8; MAX_VALUE + 1]).unwrap_err().to_string();
        assert!(err.contains("more than the store takes"), "{err}");
        c.set("small", b"ok").unwrap();
    }

    #[test]
    fn connections_beyond_the_limits_are_closed_at_once_and_members_get_in_after() {
        let (server, addr, t) = store(|cfg| {
            cfg.max_pending = 4;
            cfg.max_clients = 2;
            cfg.auth_timeout = Duration::from_secs(60);
        });
        let idle: Vec<TcpStream> = (0..4).map(|_| TcpStream::connect(&addr).unwrap()).collect();
        eventually("four connections authenticate", || server.connections() == (0, 4));
        // A fifth is closed without a challenge (and without a thread: the count stays at four).
        let fifth = TcpStream::connect(&addr).unwrap();
        let (took, got) = until_closed(&fifth, Duration::from_secs(5));
        assert!(got.is_empty(), "{got:?} after {took:?}");
        assert_eq!(server.connections(), (0, 4));
        // A member arriving now is turned away too, retries, and gets in once the idle ones go.
        let (addr2, t2) = (addr.clone(), t.clone());
        let member = thread::spawn(move || StoreClient::connect(&addr2, &t2, Duration::from_secs(30)));
        thread::sleep(Duration::from_millis(300));
        drop(idle);
        let member = member.join().unwrap().unwrap();
        member.set("a", b"1").unwrap();
        // Authenticated clients have a limit of their own.
        let _second = client(&addr, &t);
        let err = StoreClient::connect(&addr, &t, Duration::from_secs(10)).err().unwrap();
        assert!(matches!(err, CommError::StoreFull { .. }), "{err}");
        eventually("two clients stay, none authenticating", || server.connections() == (2, 0));
    }

    #[test]
    fn a_connection_has_until_the_auth_timeout_however_slowly_it_sends() {
        let (server, addr, t) = store(|cfg| {
            cfg.auth_timeout = Duration::from_millis(500);
            cfg.message_timeout = Duration::from_millis(500);
        });
        // Silent after the challenge.
        let silent = TcpStream::connect(&addr).unwrap();
        let (took, got) = until_closed(&silent, Duration::from_secs(10));
        assert_eq!(got.len(), 40, "the challenge only");
        assert!(took >= Duration::from_millis(400) && took < Duration::from_secs(5), "closed after {took:?}");
        // One byte every 100 ms does not keep it open past the deadline.
        let slow = TcpStream::connect(&addr).unwrap();
        let writer = slow.try_clone().unwrap();
        let dripping = thread::spawn(move || {
            for _ in 0..63 {
                thread::sleep(Duration::from_millis(100));
                if (&writer).write_all(&[0]).is_err() {
                    return;
                }
            }
        });
        let (took, _) = until_closed(&slow, Duration::from_secs(10));
        assert!(took < Duration::from_secs(3), "a trickle kept it open for {took:?}");
        dripping.join().unwrap();
        // A member may stay silent far longer between commands, and wait past the message timeout.
        let c = client(&addr, &t);
        thread::sleep(Duration::from_millis(1200));
        let setter = client(&addr, &t);
        let later = thread::spawn(move || {
            thread::sleep(Duration::from_millis(900));
            setter.set("late", b"x").unwrap();
        });
        assert_eq!(c.wait("late", Duration::from_secs(10)).unwrap().as_deref(), Some(&b"x"[..]));
        later.join().unwrap();
        // But a command that stops halfway is dropped after the message timeout.
        let conn = c.conn.lock().unwrap();
        (&*conn).write_all(&[CMD_SET, 10, 0]).unwrap();
        let (took, _) = until_closed(&conn, Duration::from_secs(10));
        assert!(took >= Duration::from_millis(400) && took < Duration::from_secs(5), "closed after {took:?}");
        drop(conn);
        eventually("every slot is given back", || server.connections() == (0, 0));
    }

    /// A loopback socket bound to a port but not listening: connections are refused, and no other
    /// process can take the port while it lives (no bind-then-drop race).
    fn bound_not_listening() -> (std::os::fd::OwnedFd, u16) {
        use std::os::fd::FromRawFd;
        // SAFETY: plain socket calls on a descriptor owned by the returned OwnedFd.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            assert!(fd >= 0);
            let owned = std::os::fd::OwnedFd::from_raw_fd(fd);
            let mut addr: libc::sockaddr_in = std::mem::zeroed();
            addr.sin_family = libc::AF_INET as libc::sa_family_t;
            addr.sin_addr.s_addr = u32::from_ne_bytes([127, 0, 0, 1]);
            let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            assert_eq!(libc::bind(fd, &addr as *const _ as *const libc::sockaddr, len), 0);
            assert_eq!(libc::getsockname(fd, &mut addr as *mut _ as *mut libc::sockaddr, &mut len), 0);
            (owned, u16::from_be(addr.sin_port))
        }
    }

    #[test]
    fn unreachable_store_is_a_clear_error_after_the_timeout() {
        let (_refusing, port) = bound_not_listening();
        let err = StoreClient::connect(&format!("127.0.0.1:{port}"), &token(), Duration::from_millis(500)).err().unwrap();
        let msg = err.to_string();
        assert!(matches!(err, CommError::StoreUnreachable { .. }), "{msg}");
        assert!(msg.contains(&port.to_string()) && msg.contains("MASTER_ADDR"), "{msg}");
    }

    #[test]
    fn client_retries_until_the_server_starts() {
        use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
        // The port refuses until the server starts listening on that same socket.
        let (socket, port) = bound_not_listening();
        let addr = format!("127.0.0.1:{port}");
        let t = token();
        let t2 = t.clone();
        let server = thread::spawn(move || {
            thread::sleep(Duration::from_millis(300));
            assert_eq!(unsafe { libc::listen(socket.as_raw_fd(), 128) }, 0);
            // SAFETY: the descriptor moves from the OwnedFd into the listener.
            let listener = unsafe { TcpListener::from_raw_fd(socket.into_raw_fd()) };
            StoreServer::serve(listener, StoreConfig::new(t2, 1)).unwrap()
        });
        let c = StoreClient::connect(&addr, &t, Duration::from_secs(60)).unwrap();
        let _server = server.join().unwrap();
        c.set("a", b"b").unwrap();
        assert_eq!(c.get("a").unwrap().as_deref(), Some(&b"b"[..]));
    }

    #[test]
    fn a_client_in_the_backlog_waits_for_the_challenge_and_reads_the_host_token_then() {
        // The listener exists before the token file does (a socket handed over, or a slow rank 0):
        // the client connects into the backlog and must not read the file before the store answers.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let addr = format!("127.0.0.1:{port}");
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("tokens");
        let secret = Secret::LocalFile { dir: dir.clone(), port };
        let member = thread::spawn(move || StoreClient::connect_with(&addr, &secret, Duration::from_secs(30)));
        thread::sleep(Duration::from_millis(300));
        let t = token();
        let _file = super::super::token::LocalTokenFile::create(&dir, port, &t).unwrap();
        let server = StoreServer::serve(listener, StoreConfig::new(t.clone(), 2)).unwrap();
        let c = member.join().unwrap().unwrap();
        assert_eq!(c.token(), &t);
        c.set("x", b"y").unwrap();
        assert_eq!(server.get_local("x").as_deref(), Some(&b"y"[..]));
    }

    #[test]
    fn a_store_for_several_hosts_listens_on_the_master_addresss_interface_when_it_is_this_hosts() {
        let ip = |l: TcpListener| l.local_addr().unwrap().ip();
        // A loopback alias, or an address that is not this host's (behind NAT): every interface.
        assert!(ip(StoreServer::listen_for_hosts("127.0.0.1", 0).unwrap()).is_unspecified());
        assert!(ip(StoreServer::listen_for_hosts("203.0.113.254", 0).unwrap()).is_unspecified());
        // One of this host's own addresses (the one its default route leaves by, if it has one).
        let probe = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        match probe.connect("203.0.113.254:9").and_then(|()| probe.local_addr()) {
            Ok(own) if !own.ip().is_loopback() => {
                assert_eq!(ip(StoreServer::listen_for_hosts(&own.ip().to_string(), 0).unwrap()), own.ip());
            }
            _ => eprintln!("no route off this host: only loopback and foreign addresses checked"),
        }
    }

    #[test]
    fn unresolvable_host_names_the_address() {
        let err = StoreClient::connect("no-such-host.invalid:1234", &token(), Duration::from_secs(1)).err().unwrap();
        assert!(err.to_string().contains("no-such-host.invalid:1234"), "{err}");
    }
}
