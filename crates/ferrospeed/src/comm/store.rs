//! The rendezvous store: a small TCP key-value server (set, get, wait-for-key, add) and its client.
//!
//! `ferrospeed launch` serves it on node 0 (like torchrun's agent store); without the launcher, rank 0
//! serves it. Ranks use it to exchange their addresses when the group forms, and to publish which
//! collective each has reached, so a timeout can name the ranks that never arrived.

use super::error::CommError;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

const CMD_SET: u8 = 1;
const CMD_GET: u8 = 2;
const CMD_WAIT: u8 = 3;
const CMD_ADD: u8 = 4;
const MAX_FIELD: u32 = 64 << 20;

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

/// A running store server. Dropping it stops accepting connections.
pub struct StoreServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    table: Arc<Table>,
}

/// Environment variable naming an inherited file descriptor of a socket already listening for the
/// store. A supervisor that bound the port itself (the tests do) hands it over, so that no port is
/// probed first and raced for. Taken by the first [`StoreServer::bind`] of the process only.
pub const ENV_STORE_FD: &str = "FERROSPEED_STORE_FD";

impl StoreServer {
    /// Listen on `addr` (`host:port`; port 0 picks a free one) and serve in background threads. With
    /// `FERROSPEED_STORE_FD` set (see [`ENV_STORE_FD`]), serve on that inherited socket instead; its
    /// port must be the one `addr` asks for (any, for port 0).
    pub fn bind(addr: &str) -> Result<Self, CommError> {
        let listener = match inherited_listener(addr)? {
            Some(l) => l,
            None => TcpListener::bind(addr).map_err(|source| CommError::Bind { addr: addr.into(), source })?,
        };
        Self::serve(listener, addr)
    }

    fn serve(listener: TcpListener, addr: &str) -> Result<Self, CommError> {
        let local = listener.local_addr().map_err(|source| CommError::Bind { addr: addr.into(), source })?;
        let stop = Arc::new(AtomicBool::new(false));
        let table = Arc::new(Table::default());
        let (stop2, table2) = (stop.clone(), table.clone());
        thread::Builder::new()
            .name("store-accept".into())
            .spawn(move || accept_loop(listener, stop2, table2))
            .map_err(|source| CommError::Bind { addr: addr.into(), source })?;
        Ok(Self { addr: local, stop, table })
    }

    /// The address the server listens on (with the port it picked).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Read a key directly, without a connection (the serving process's own view).
    pub fn get_local(&self, key: &str) -> Option<Vec<u8>> {
        lock(&self.table.map).get(key).cloned()
    }

    /// Set a key directly, waking clients that wait for it.
    pub fn set_local(&self, key: &str, value: &[u8]) {
        self.table.set(key.to_string(), value.to_vec());
    }

    /// Add to a counter directly; returns the new value.
    pub fn add_local(&self, key: &str, delta: i64) -> i64 {
        self.table.add(key.to_string(), delta)
    }
}

impl Drop for StoreServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
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

fn accept_loop(listener: TcpListener, stop: Arc<AtomicBool>, table: Arc<Table>) {
    for conn in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(conn) = conn else { continue };
        let table = table.clone();
        let _ = thread::Builder::new().name("store-conn".into()).spawn(move || {
            let _ = conn.set_nodelay(true);
            // A connection ends when its client goes away or sends garbage; the server carries on.
            let _ = serve_connection(conn, &table);
        });
    }
}

fn serve_connection(mut conn: TcpStream, table: &Table) -> std::io::Result<()> {
    loop {
        let mut cmd = [0u8; 1];
        if conn.read(&mut cmd)? == 0 {
            return Ok(());
        }
        let key = String::from_utf8(read_field(&mut conn)?)
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "key is not UTF-8"))?;
        let arg = read_u64(&mut conn)?;
        let value = read_field(&mut conn)?;
        let mut reply = Vec::new();
        match cmd[0] {
            CMD_SET => {
                table.set(key, value);
                reply.push(1);
            }
            CMD_GET => encode_option(&mut reply, lock(&table.map).get(&key)),
            CMD_WAIT => {
                let deadline = Instant::now() + Duration::from_millis(arg);
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
            CMD_ADD => reply.extend_from_slice(&table.add(key, arg as i64).to_le_bytes()),
            _ => return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "unknown store command")),
        }
        conn.write_all(&reply)?;
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

fn read_u64(r: &mut impl Read) -> std::io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

fn read_field(r: &mut impl Read) -> std::io::Result<Vec<u8>> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    let len = u32::from_le_bytes(b);
    if len > MAX_FIELD {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "store field too large"));
    }
    let mut v = vec![0u8; len as usize];
    r.read_exact(&mut v)?;
    Ok(v)
}

/// A connection to the store. Methods are safe to call from several threads (one request at a time).
pub struct StoreClient {
    addr: String,
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
    /// Connect to `addr`, retrying while it refuses for up to `timeout` (rank 0 may start later).
    pub fn connect(addr: &str, timeout: Duration) -> Result<Self, CommError> {
        let sock = resolve(addr)?;
        let start = Instant::now();
        let mut backoff = Duration::from_millis(20);
        loop {
            let left = timeout.saturating_sub(start.elapsed());
            match TcpStream::connect_timeout(&sock, left.clamp(Duration::from_millis(10), Duration::from_secs(2))) {
                Ok(conn) => {
                    let _ = conn.set_nodelay(true);
                    return Ok(Self { addr: addr.into(), conn: Mutex::new(conn) });
                }
                Err(e) if start.elapsed() + backoff >= timeout => {
                    return Err(CommError::StoreUnreachable {
                        addr: addr.into(),
                        waited: start.elapsed(),
                        reason: e.to_string(),
                    })
                }
                Err(_) => {
                    thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_millis(500));
                }
            }
        }
    }

    /// The address this client talks to.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The local address of this connection: the interface through which the store's host is reached,
    /// which is the one other ranks can reach this host through too.
    pub fn local_ip(&self) -> Option<std::net::IpAddr> {
        lock(&self.conn).local_addr().ok().map(|a| a.ip())
    }

    fn request(&self, cmd: u8, key: &str, arg: u64, value: &[u8], io_timeout: Duration) -> Result<Reply, CommError> {
        let mut msg = Vec::with_capacity(17 + key.len() + value.len());
        msg.push(cmd);
        msg.extend_from_slice(&(key.len() as u32).to_le_bytes());
        msg.extend_from_slice(key.as_bytes());
        msg.extend_from_slice(&arg.to_le_bytes());
        msg.extend_from_slice(&(value.len() as u32).to_le_bytes());
        msg.extend_from_slice(value);
        let mut conn = lock(&self.conn);
        let result = (|| -> std::io::Result<Reply> {
            conn.set_read_timeout(Some(io_timeout))?;
            conn.set_write_timeout(Some(io_timeout))?;
            conn.write_all(&msg)?;
            match cmd {
                CMD_ADD => Ok(Reply::Counter(read_u64(&mut *conn)? as i64)),
                CMD_SET => {
                    let mut ack = [0u8; 1];
                    conn.read_exact(&mut ack)?;
                    Ok(Reply::Ack)
                }
                _ => {
                    let mut found = [0u8; 1];
                    conn.read_exact(&mut found)?;
                    Ok(Reply::Value((found[0] == 1).then(|| read_field(&mut *conn)).transpose()?))
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
        let ms = timeout.as_millis().min(u64::MAX as u128) as u64;
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

enum Reply {
    Ack,
    Value(Option<Vec<u8>>),
    Counter(i64),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_get_wait_add() {
        let server = StoreServer::bind("127.0.0.1:0").unwrap();
        let addr = server.local_addr().to_string();
        let a = StoreClient::connect(&addr, Duration::from_secs(5)).unwrap();
        let b = StoreClient::connect(&addr, Duration::from_secs(5)).unwrap();
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
        let err = StoreClient::connect(&format!("127.0.0.1:{port}"), Duration::from_millis(500)).err().unwrap();
        let msg = err.to_string();
        assert!(matches!(err, CommError::StoreUnreachable { .. }), "{msg}");
        assert!(msg.contains(&port.to_string()) && msg.contains("MASTER_ADDR"), "{msg}");
    }

    #[test]
    fn client_retries_until_the_server_starts() {
        use std::os::fd::{AsRawFd, IntoRawFd, FromRawFd};
        // The port refuses until the server starts listening on that same socket.
        let (socket, port) = bound_not_listening();
        let addr = format!("127.0.0.1:{port}");
        let addr2 = addr.clone();
        let server = thread::spawn(move || {
            thread::sleep(Duration::from_millis(300));
            assert_eq!(unsafe { libc::listen(socket.as_raw_fd(), 128) }, 0);
            // SAFETY: the descriptor moves from the OwnedFd into the listener.
            let listener = unsafe { TcpListener::from_raw_fd(socket.into_raw_fd()) };
            StoreServer::serve(listener, &addr2).unwrap()
        });
        let c = StoreClient::connect(&addr, Duration::from_secs(60)).unwrap();
        let _server = server.join().unwrap();
        c.set("a", b"b").unwrap();
        assert_eq!(c.get("a").unwrap().as_deref(), Some(&b"b"[..]));
    }

    #[test]
    fn unresolvable_host_names_the_address() {
        let err = StoreClient::connect("no-such-host.invalid:1234", Duration::from_secs(1)).err().unwrap();
        assert!(err.to_string().contains("no-such-host.invalid:1234"), "{err}");
    }
}
