//! Tests of the rendezvous store (`store.rs`): authentication, limits, commands.
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
