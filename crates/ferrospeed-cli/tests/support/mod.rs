//! Helpers for tests that drive the `ferrospeed` binary: bounded waits, process liveness, free ports.

#![allow(dead_code)]

use std::io::Read;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

pub fn ferrospeed() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ferrospeed"))
}

pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

/// Start `cmd` with captured output.
pub fn start(cmd: &mut Command) -> Child {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn ferrospeed")
}

/// Wait for `child` at most `limit`; a hang kills it and fails the test instead of stalling CI.
pub fn finish(mut child: Child, limit: Duration) -> Finished {
    let start = Instant::now();
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_t = thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_t = thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("command did not finish within {limit:?}");
        }
        thread::sleep(Duration::from_millis(20));
    };
    let elapsed = start.elapsed();
    Finished { status, stdout: out_t.join().unwrap(), stderr: err_t.join().unwrap(), elapsed }
}

pub fn run(cmd: &mut Command, limit: Duration) -> Finished {
    finish(start(cmd), limit)
}

/// Whether `pid` is a live process (a zombie waiting to be reaped counts as gone).
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            // The state follows the parenthesised command name.
            let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.trim_start().chars().next());
            !matches!(state, Some('Z') | Some('X') | None)
        }
        Err(_) => false,
    }
}

/// Wait until no pid in `pids` is alive, up to `limit`; returns the survivors.
pub fn survivors(pids: &[i32], limit: Duration) -> Vec<i32> {
    let start = Instant::now();
    loop {
        let left: Vec<i32> = pids.iter().copied().filter(|p| alive(*p)).collect();
        if left.is_empty() || start.elapsed() > limit {
            return left;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Read every `pid.*` file in `dir` (written by the rank scripts).
pub fn pids_in(dir: &std::path::Path) -> Vec<i32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        if entry.file_name().to_string_lossy().starts_with("pid.") {
            if let Ok(text) = std::fs::read_to_string(entry.path()) {
                pids.extend(text.split_whitespace().filter_map(|p| p.parse::<i32>().ok()));
            }
        }
    }
    pids
}

/// Wait until `dir` holds at least `n` files named `pid.*` with content.
pub fn wait_for_pid_files(dir: &std::path::Path, n: usize, limit: Duration) {
    let start = Instant::now();
    while pids_in(dir).len() < n {
        assert!(start.elapsed() < limit, "ranks did not start within {limit:?}");
        thread::sleep(Duration::from_millis(20));
    }
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}
