//! Proving the job's secret on a new connection, both ways, before anything else crosses it.
//!
//! The side that accepted the connection speaks first:
//!
//! ```text
//! acceptor  → connector   MAGIC (8) ‖ nonce_a (32)
//! connector → acceptor    nonce_c (32) ‖ HMAC-SHA256(token, "<context>/connector" ‖ nonce_a ‖ nonce_c)
//! acceptor  → connector   ACCEPTED ‖ HMAC-SHA256(token, "<context>/acceptor" ‖ nonce_a ‖ nonce_c)
//!                         or REFUSED (wrong proof) or FULL (no room for another client)
//! ```
//!
//! Fresh nonces on both sides make a recorded exchange useless later; the labels keep a proof made in one
//! direction (or for the store rather than a peer link) from serving in another. Proofs are compared in
//! constant time (`hmac`'s `verify_slice`). The acceptor reads exactly 64 bytes, by a deadline, and
//! nothing more from a connection that fails: no command of an unauthenticated peer is ever parsed.
//! The secret authenticates connections, it does not encrypt them: like torchrun's store and NCCL's
//! sockets, the network between the hosts is trusted not to be on-path.

use super::error::CommError;
use super::token::{fill_random, RdzvToken, Secret};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Instant;

/// Which kind of connection is being authenticated (part of what the proofs sign).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Context {
    /// A client of the rendezvous store.
    Store,
    /// A link between two ranks of the group.
    Peer,
}

impl Context {
    fn label(self, acceptor: bool) -> &'static [u8] {
        match (self, acceptor) {
            (Self::Store, false) => b"ferrospeed-rdzv-v1/store/connector",
            (Self::Store, true) => b"ferrospeed-rdzv-v1/store/acceptor",
            (Self::Peer, false) => b"ferrospeed-rdzv-v1/peer/connector",
            (Self::Peer, true) => b"ferrospeed-rdzv-v1/peer/acceptor",
        }
    }
}

const MAGIC: &[u8; 8] = b"FSRDZV1\0";
const NONCE: usize = 32;
const PROOF: usize = 32;
const ACCEPTED: u8 = 1;
const REFUSED: u8 = 2;
const FULL: u8 = 3;

/// What an acceptor decides once a connector has proved the secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admission {
    Admit,
    /// The server has as many clients as it takes.
    Full,
}

/// Why an acceptor dropped a connection (it only matters to tests and logs).
#[derive(Debug)]
pub(crate) enum Rejected {
    /// Nothing valid arrived by the deadline, or the connection broke.
    Io(std::io::Error),
    /// The connector does not hold the secret.
    WrongProof,
    /// Proved, but there is no room.
    Full,
}

/// Authenticate the connector at the other end of `conn`; returns once it is admitted.
pub(crate) fn accept(
    conn: &TcpStream,
    token: &RdzvToken,
    ctx: Context,
    deadline: Instant,
    admit: impl FnOnce() -> Admission,
) -> Result<(), Rejected> {
    let mut nonce_a = [0u8; NONCE];
    fill_random(&mut nonce_a).map_err(|e| Rejected::Io(std::io::Error::other(e.to_string())))?;
    let mut hello = Vec::with_capacity(MAGIC.len() + NONCE);
    hello.extend_from_slice(MAGIC);
    hello.extend_from_slice(&nonce_a);
    write_all_until(conn, &hello, deadline).map_err(Rejected::Io)?;
    let mut answer = [0u8; NONCE + PROOF];
    read_exact_until(conn, &mut answer, deadline).map_err(Rejected::Io)?;
    let (nonce_c, proof) = answer.split_at(NONCE);
    if mac(token, ctx.label(false), &nonce_a, nonce_c).verify_slice(proof).is_err() {
        let _ = write_all_until(conn, &[REFUSED], deadline);
        return Err(Rejected::WrongProof);
    }
    if admit() == Admission::Full {
        let _ = write_all_until(conn, &[FULL], deadline);
        return Err(Rejected::Full);
    }
    let mut reply = Vec::with_capacity(1 + PROOF);
    reply.push(ACCEPTED);
    reply.extend_from_slice(&mac(token, ctx.label(true), &nonce_a, nonce_c).finalize().into_bytes());
    write_all_until(conn, &reply, deadline).map_err(Rejected::Io)
}

/// Why a connector could not authenticate.
#[derive(Debug)]
pub(crate) enum ConnectError {
    /// The acceptor closed or stayed silent before its challenge: it may be busy, try again.
    NoChallenge(std::io::Error),
    /// It broke after the challenge.
    Io(std::io::Error),
    /// What answered is not a ferrospeed rendezvous endpoint of this version.
    NotOurs,
    /// It does not take this secret.
    Refused,
    /// It has as many clients as it takes.
    Full,
    /// It accepted, but could not prove it holds the secret itself.
    Impostor,
    /// The secret could not be had (the host's token file).
    Secret(CommError),
}

/// Prove the secret to the acceptor at the other end of `conn` and check its proof; returns the token
/// used (read from the host's file only now, after the challenge, for [`Secret::LocalFile`]).
pub(crate) fn connect(conn: &TcpStream, secret: &Secret, ctx: Context, deadline: Instant) -> Result<RdzvToken, ConnectError> {
    let mut hello = [0u8; MAGIC.len() + NONCE];
    read_exact_until(conn, &mut hello, deadline).map_err(ConnectError::NoChallenge)?;
    let (magic, nonce_a) = hello.split_at(MAGIC.len());
    if magic != MAGIC {
        return Err(ConnectError::NotOurs);
    }
    let token = secret.resolve().map_err(ConnectError::Secret)?;
    let mut nonce_c = [0u8; NONCE];
    fill_random(&mut nonce_c).map_err(ConnectError::Secret)?;
    let mut answer = Vec::with_capacity(NONCE + PROOF);
    answer.extend_from_slice(&nonce_c);
    answer.extend_from_slice(&mac(&token, ctx.label(false), nonce_a, &nonce_c).finalize().into_bytes());
    write_all_until(conn, &answer, deadline).map_err(ConnectError::Io)?;
    let mut status = [0u8; 1];
    read_exact_until(conn, &mut status, deadline).map_err(ConnectError::Io)?;
    match status[0] {
        ACCEPTED => {}
        REFUSED => return Err(ConnectError::Refused),
        FULL => return Err(ConnectError::Full),
        _ => return Err(ConnectError::NotOurs),
    }
    let mut proof = [0u8; PROOF];
    read_exact_until(conn, &mut proof, deadline).map_err(ConnectError::Io)?;
    mac(&token, ctx.label(true), nonce_a, &nonce_c).verify_slice(&proof).map_err(|_| ConnectError::Impostor)?;
    Ok(token)
}

/// The error a connector reports for `e`; `endpoint` names what it connected to ("the rendezvous store
/// at H:P", "rank 2 at H:P").
pub(crate) fn describe(e: ConnectError, endpoint: &str) -> CommError {
    let not_ours = |reason: &str| CommError::NotAuthentic { endpoint: endpoint.into(), reason: reason.into() };
    match e {
        ConnectError::Refused => CommError::TokenRefused { endpoint: endpoint.into() },
        ConnectError::Full => CommError::StoreFull { endpoint: endpoint.into() },
        ConnectError::Impostor => not_ours("its proof of the token is wrong"),
        ConnectError::NotOurs => not_ours("it does not speak ferrospeed's rendezvous protocol v1"),
        ConnectError::NoChallenge(e) | ConnectError::Io(e) => {
            CommError::AuthBroken { endpoint: endpoint.into(), reason: e.to_string() }
        }
        ConnectError::Secret(e) => e,
    }
}

fn mac(token: &RdzvToken, label: &[u8], nonce_a: &[u8], nonce_c: &[u8]) -> Hmac<Sha256> {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(token.key()).expect("HMAC takes a key of any length");
    m.update(label);
    m.update(nonce_a);
    m.update(nonce_c);
    m
}

/// `read_exact` that gives up at `deadline` however slowly the bytes trickle in.
pub(crate) fn read_exact_until(mut conn: &TcpStream, mut buf: &mut [u8], deadline: Instant) -> std::io::Result<()> {
    while !buf.is_empty() {
        conn.set_read_timeout(Some(left(deadline)?))?;
        match conn.read(buf) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => buf = &mut buf[n..],
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `write_all` that gives up at `deadline`.
pub(crate) fn write_all_until(mut conn: &TcpStream, mut buf: &[u8], deadline: Instant) -> std::io::Result<()> {
    while !buf.is_empty() {
        conn.set_write_timeout(Some(left(deadline)?))?;
        match conn.write(buf) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Time left until `deadline`, or a timeout error once it has passed.
fn left(deadline: Instant) -> std::io::Result<std::time::Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "deadline passed"));
    }
    Ok(left)
}
