//! Watching the ranks: forward Ctrl-C, stop everyone when one fails, report who failed and how.

use super::guard::Guard;
use super::ranks::{drain_output, signal_group, spawn_rank, LaunchPlan, RankProcess};
use super::NodeStore;
use anyhow::{Context, Result};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::mpsc::{channel, RecvTimeoutError, Sender};
use std::thread;
use std::time::{Duration, Instant};

/// Store key set by the first node whose rank failed, so the other nodes stop their ranks too.
const FAILED_KEY: &str = "ferrospeed/launch/failed";
/// Counter of nodes whose ranks have all ended, so node 0 keeps the store up until then.
const DONE_KEY: &str = "ferrospeed/launch/nodes_done";
/// A rank that exits with code 2 refused its start (bad input, one line): the others are refusing the
/// same input, and rank 0 may be removing what its start added to the run directory. They get this
/// long to exit on their own before SIGTERM, which would cut that clean-up short.
const REFUSED_SETTLE: Duration = Duration::from_secs(5);

enum Event {
    Exited { rank: usize, status: std::io::Result<ExitStatus> },
    Signal(i32),
}

/// The first failure, which decides the exit code and the message.
struct Failure {
    message: String,
    code: u8,
}

/// How one attempt of the job ended.
pub enum Outcome {
    Success,
    /// Ctrl-C or a termination signal reached the launcher.
    Interrupted,
    /// A rank failed (the first failure's message, and the exit code it maps to).
    Failed { message: String, code: u8 },
}

/// Start this node's ranks of `plan` and watch them to the end.
pub fn supervise(plan: &LaunchPlan, store: NodeStore, grace: Duration) -> Result<Outcome> {
    let (tx, rx) = channel();
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])?;
    let signal_tx = tx.clone();
    thread::spawn(move || {
        for sig in signals.forever() {
            if signal_tx.send(Event::Signal(sig)).is_err() {
                return;
            }
        }
    });

    let mut guard = Guard::spawn().context("starting the launch guard process")?;
    let mut running: BTreeMap<usize, RankProcess> = BTreeMap::new();
    let mut output = Vec::new();
    for local in 0..plan.nproc_per_node {
        match spawn_rank(plan, local, guard.fd()) {
            Ok((proc_, child, threads)) => {
                output.extend(threads);
                guard.protect(proc_.pid);
                watch(child, proc_.rank, tx.clone());
                running.insert(proc_.rank, proc_);
            }
            Err(e) => {
                for p in running.values() {
                    signal_group(p.pid, libc::SIGKILL);
                }
                return Err(e);
            }
        }
    }

    let mut failure: Option<Failure> = None;
    let mut interrupted = 0u32;
    let mut kill_at: Option<Instant> = None;
    // When the ranks left after a refused start (code 2) are stopped, if they have not exited by then.
    let mut term_at: Option<Instant> = None;
    let mut last_store_check = Instant::now();
    while !running.is_empty() {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(Event::Exited { rank, status }) => {
                let Some(p) = running.remove(&rank) else { continue };
                // Whatever the rank left behind in its group goes with it.
                signal_group(p.pid, libc::SIGKILL);
                let ok = status.as_ref().is_ok_and(ExitStatus::success);
                // After a forwarded Ctrl-C, ranks save and exit on their own (code 130): that is no failure.
                if !ok && failure.is_none() && kill_at.is_none() && interrupted == 0 {
                    let (how, code) = describe(&status);
                    let message = format!("rank {rank} (pid {}) {how}", p.pid);
                    eprintln!("ferrospeed launch: {message}; stopping the other ranks");
                    if let NodeStore::Join(client) = &store {
                        let _ = client.set(FAILED_KEY, message.as_bytes());
                    } else if let NodeStore::Host(server) = &store {
                        server.set_local(FAILED_KEY, message.as_bytes());
                    }
                    failure = Some(Failure { message, code });
                    if code == 2 {
                        term_at = Some(Instant::now() + REFUSED_SETTLE);
                    } else {
                        stop(&running, libc::SIGTERM, &mut kill_at, grace);
                    }
                }
            }
            Ok(Event::Signal(sig)) => {
                if sig == SIGINT && interrupted == 0 {
                    eprintln!("ferrospeed launch: Ctrl-C: passing it to the ranks (press Ctrl-C again to kill them)");
                    for p in running.values() {
                        signal_group(p.pid, libc::SIGINT);
                    }
                } else if sig == SIGINT {
                    stop(&running, libc::SIGKILL, &mut kill_at, grace);
                } else {
                    stop(&running, libc::SIGTERM, &mut kill_at, grace);
                }
                interrupted += 1;
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
        if term_at.is_some_and(|t| Instant::now() >= t) && kill_at.is_none() {
            stop(&running, libc::SIGTERM, &mut kill_at, grace);
        }
        if kill_at.is_some_and(|t| Instant::now() >= t) {
            for p in running.values() {
                signal_group(p.pid, libc::SIGKILL);
            }
        }
        // Another node's rank failed: stop ours too.
        if failure.is_none() && kill_at.is_none() && last_store_check.elapsed() >= Duration::from_millis(250) {
            last_store_check = Instant::now();
            if let Some(message) = remote_failure(&store) {
                eprintln!("ferrospeed launch: another node reported: {message}; stopping this node's ranks");
                // A refused start elsewhere: this node's ranks are refusing the same input (rank 0 may
                // be cleaning up), so they get the same settle window as on the failing node.
                let refused = message.ends_with("exited with code 2");
                failure = Some(Failure { message, code: if refused { 2 } else { 1 } });
                if refused {
                    term_at = Some(Instant::now() + REFUSED_SETTLE);
                } else {
                    stop(&running, libc::SIGTERM, &mut kill_at, grace);
                }
            }
        }
    }

    guard.release();
    // Every rank has exited and its group was killed, so its pipes are closing: copy what is left.
    drain_output(output, Duration::from_secs(5));
    finish_node(&store, plan, failure.is_some());
    Ok(match failure {
        Some(f) => Outcome::Failed { message: f.message, code: f.code },
        None if interrupted > 0 => Outcome::Interrupted,
        None => Outcome::Success,
    })
}

/// Reap `child` on its own thread and report when it ends.
fn watch(mut child: std::process::Child, rank: usize, tx: Sender<Event>) {
    thread::spawn(move || {
        let status = child.wait();
        let _ = tx.send(Event::Exited { rank, status });
    });
}

fn stop(running: &BTreeMap<usize, RankProcess>, sig: i32, kill_at: &mut Option<Instant>, grace: Duration) {
    for p in running.values() {
        signal_group(p.pid, sig);
    }
    kill_at.get_or_insert_with(|| Instant::now() + grace);
}

fn describe(status: &std::io::Result<ExitStatus>) -> (String, u8) {
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(c), _) => (format!("exited with code {c}"), c.clamp(1, 255) as u8),
            (None, Some(sig)) => (format!("was killed by signal {sig} ({})", signal_name(sig)), (128 + sig).min(255) as u8),
            _ => ("ended abnormally".into(), 1),
        },
        Err(e) => (format!("could not be waited for: {e}"), 1),
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGKILL => "SIGKILL",
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGILL => "SIGILL",
        libc::SIGHUP => "SIGHUP",
        _ => "signal",
    }
}

fn remote_failure(store: &NodeStore) -> Option<String> {
    let value = match store {
        NodeStore::Host(server) => server.get_local(FAILED_KEY),
        NodeStore::Join(client) => client.get(FAILED_KEY).ok().flatten(),
    }?;
    Some(String::from_utf8_lossy(&value).to_string())
}

/// Mark this node done; node 0 keeps serving the store until every node is done (bounded wait).
fn finish_node(store: &NodeStore, plan: &LaunchPlan, failed: bool) {
    match store {
        NodeStore::Join(client) => {
            let _ = client.add(DONE_KEY, 1);
        }
        NodeStore::Host(server) => {
            let done = server.add_local(DONE_KEY, 1);
            if failed || plan.nnodes == 1 || done >= plan.nnodes as i64 {
                return;
            }
            let deadline = Instant::now() + Duration::from_secs(60);
            while Instant::now() < deadline {
                let count = server
                    .get_local(DONE_KEY)
                    .and_then(|v| String::from_utf8_lossy(&v).parse::<i64>().ok())
                    .unwrap_or(0);
                if count >= plan.nnodes as i64 || server.get_local(FAILED_KEY).is_some() {
                    return;
                }
                thread::sleep(Duration::from_millis(100));
            }
        }
    }
}
