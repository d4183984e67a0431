//! Helpers for tests that drive the `ferrospeed` binary: bounded waits, process liveness, configs
//! and training runs, and listening sockets handed to the binary (no port is probed and raced for).

#![allow(dead_code)]

pub mod power_loss;

use std::io::Read;
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
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

/// A socket listening on a free loopback port, for the store of a process started with [`hand_over`].
pub fn listener() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").expect("binding a loopback port")
}

/// Let `cmd`'s process serve the store on `listener` (`FERROSPEED_STORE_FD`): the port stays bound
/// from now until the test drops the listener, so no other process can take it in between.
pub fn hand_over<'a>(cmd: &'a mut Command, listener: &TcpListener) -> &'a mut Command {
    let fd = listener.as_raw_fd();
    cmd.env("FERROSPEED_STORE_FD", fd.to_string());
    // SAFETY: only fcntl, async-signal-safe, between fork and exec: the child inherits this one socket.
    unsafe {
        cmd.pre_exec(move || {
            let flags = libc::fcntl(fd, libc::F_GETFD);
            if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    };
    cmd
}

/// A port that refuses connections for as long as the returned guard lives: bound, never listening.
pub struct RefusingPort {
    fd: i32,
    pub port: u16,
}

impl RefusingPort {
    pub fn new() -> Self {
        // SAFETY: plain socket calls on a descriptor this struct owns and closes on drop.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
            let mut addr: libc::sockaddr_in = std::mem::zeroed();
            addr.sin_family = libc::AF_INET as libc::sa_family_t;
            addr.sin_addr.s_addr = u32::from_ne_bytes([127, 0, 0, 1]);
            let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            assert_eq!(libc::bind(fd, &addr as *const _ as *const libc::sockaddr, len), 0, "bind: {}", std::io::Error::last_os_error());
            let mut got: libc::sockaddr_in = std::mem::zeroed();
            let mut got_len = len;
            assert_eq!(libc::getsockname(fd, &mut got as *mut _ as *mut libc::sockaddr, &mut got_len), 0);
            Self { fd, port: u16::from_be(got.sin_port) }
        }
    }
}

impl Drop for RefusingPort {
    fn drop(&mut self) {
        unsafe { libc::close(self.fd) };
    }
}

/// The corpus the tests train on (the shipped Rust book).
pub fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/rust-book.txt")
}

/// The tiny model most tests train: 20 steps take about a second.
pub const TINY: &str = "n_layer = 2\nn_head = 2\nd_model = 32\nseq_len = 32";

/// Write `DIR/run.toml` with the `[model]` and `[train]` lines given and the shipped corpus.
pub fn write_config(dir: &Path, model: &str, train: &str) -> PathBuf {
    let text = format!("[model]\n{model}\n\n[data]\npath = \"{}\"\n\n[train]\n{train}\nsample_tokens = 0\n", corpus().display());
    let path = dir.join("run.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Run `train` under `launch` with `nproc` ranks, `--set track.dir=TRACK` and the `--set`s given;
/// panics unless it succeeds. Returns (step, loss) of each line of metrics.jsonl.
pub fn train(nproc: usize, config: &Path, track: &Path, sets: &[String]) -> Vec<(u64, f64)> {
    let f = run(&mut train_command(nproc, config, track, sets), Duration::from_secs(300));
    assert!(f.status.success(), "train {sets:?} failed:\n{}\n{}", f.stdout, f.stderr);
    metrics(track)
}

/// The command [`train`] runs.
pub fn train_command(nproc: usize, config: &Path, track: &Path, sets: &[String]) -> Command {
    let mut cmd = ferrospeed();
    cmd.args(["launch", "--nproc-per-node", &nproc.to_string(), "train", "--config"]).arg(config);
    cmd.arg("--set").arg(format!("track.dir={}", track.display()));
    for s in sets {
        cmd.args(["--set", s]);
    }
    cmd
}

/// (step, loss) of each line of `TRACK/metrics.jsonl`.
pub fn metrics(track: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(track.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap())
        })
        .collect()
}

/// The bits of each (step, loss), for exact comparisons.
pub fn bits(v: &[(u64, f64)]) -> Vec<(u64, u64)> {
    v.iter().map(|(s, l)| (*s, l.to_bits())).collect()
}

/// The names in a folder, sorted (to show that a failed command wrote nothing).
pub fn names_in(dir: &Path) -> Vec<std::ffi::OsString> {
    let mut names: Vec<_> = std::fs::read_dir(dir).unwrap().flatten().map(|e| e.file_name()).collect();
    names.sort();
    names
}

/// A checkpoint root holding only `step_dir` (copied), with `latest` naming it.
pub fn root_with(step_dir: &Path, root: &Path) -> PathBuf {
    let name = step_dir.file_name().unwrap();
    std::fs::create_dir_all(root.join(name)).unwrap();
    for e in std::fs::read_dir(step_dir).unwrap().flatten() {
        std::fs::copy(e.path(), root.join(name).join(e.file_name())).unwrap();
    }
    std::fs::write(root.join("latest"), format!("{}\n", name.to_string_lossy())).unwrap();
    root.to_path_buf()
}

/// Record that `test` did not run (and why): a line on stderr, and one in the file named by
/// `FERROSPEED_SKIP_LOG` when set (`.ci/run` counts them and prints the total at the end).
pub fn skip(test: &str, reason: &str) {
    eprintln!("SKIPPED {test}: {reason}");
    if let Some(log) = std::env::var_os("FERROSPEED_SKIP_LOG") {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(log) {
            let _ = writeln!(f, "{test}\t{reason}");
        }
    }
}

/// The SmolLM2 GGUF file (`scripts/fetch-smollm2.sh`), or `None` after recording the skip. With
/// `FERROSPEED_REQUIRE_SMOLLM2` set (CI) its absence fails the test instead.
#[track_caller]
pub fn smollm2() -> Option<PathBuf> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if path.is_file() {
        return Some(path);
    }
    assert!(std::env::var_os("FERROSPEED_REQUIRE_SMOLLM2").is_none(), "{} is missing: run scripts/fetch-smollm2.sh", path.display());
    let caller = std::panic::Location::caller();
    skip(&format!("{}:{}", caller.file(), caller.line()), &format!("{} is missing (scripts/fetch-smollm2.sh fetches it)", path.display()));
    None
}

/// A word-level tokenizer.json of 40 ids (within the fixture's vocabulary of 64).
pub fn word_tokenizer(dir: &Path) -> PathBuf {
    let vocab: serde_json::Map<String, serde_json::Value> = "the a of to and in is it that for on with as be by this are or not".split(' ').chain(["[UNK]"]).enumerate().map(|(i, w)| (w.to_string(), i.into())).collect();
    let tok = serde_json::json!({"version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": {"type": "Lowercase"},
        "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}});
    let path = dir.join("tokenizer.json");
    std::fs::write(&path, tok.to_string()).unwrap();
    path
}
