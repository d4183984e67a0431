//! Starting rank processes: environment, process groups, parent-death signal, prefixed output.

use anyhow::{Context, Result};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread;

/// Everything needed to start this node's ranks.
#[derive(Debug, Clone)]
pub struct LaunchPlan {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub nproc_per_node: usize,
    pub nnodes: usize,
    pub node_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
    pub rdzv_timeout: f64,
    pub collective_timeout: Option<f64>,
    /// Restarts before this attempt (`TORCHELASTIC_RESTART_COUNT` of the ranks).
    pub restart: usize,
    /// The attempt's rendezvous secret, given to the ranks as `FERROSPEED_RDZV_TOKEN`.
    pub token: ferrospeed::comm::RdzvToken,
}

impl LaunchPlan {
    pub fn world_size(&self) -> usize {
        self.nproc_per_node * self.nnodes
    }

    pub fn global_rank(&self, local_rank: usize) -> usize {
        self.node_rank * self.nproc_per_node + local_rank
    }
}

/// A started rank. Its pid is also its process-group id (each rank leads its own group, so signals
/// reach everything it started, and a Ctrl-C in the terminal reaches only the launcher).
pub struct RankProcess {
    pub rank: usize,
    pub pid: i32,
}

/// The threads copying a rank's output; joined before the launcher exits so no last line is lost.
pub type OutputThreads = Vec<thread::JoinHandle<()>>;

/// Start local rank `local_rank`; its stdout and stderr are copied line by line with a `[rankN]: ` prefix.
pub fn spawn_rank(plan: &LaunchPlan, local_rank: usize, guard_fd: Option<std::os::fd::RawFd>) -> Result<(RankProcess, Child, OutputThreads)> {
    let rank = plan.global_rank(local_rank);
    let mut cmd = Command::new(&plan.program);
    cmd.args(&plan.args)
        .env("RANK", rank.to_string())
        .env("WORLD_SIZE", plan.world_size().to_string())
        .env("LOCAL_RANK", local_rank.to_string())
        .env("LOCAL_WORLD_SIZE", plan.nproc_per_node.to_string())
        .env("GROUP_RANK", plan.node_rank.to_string())
        .env("MASTER_ADDR", &plan.master_addr)
        .env("MASTER_PORT", plan.master_port.to_string())
        .env("TORCHELASTIC_RESTART_COUNT", plan.restart.to_string())
        .env(ferrospeed::comm::ENV_AGENT_STORE, "1")
        // In the environment, which only this user can read (/proc/PID/environ), never in the arguments.
        .env(ferrospeed::comm::ENV_RDZV_TOKEN, plan.token.expose())
        // The store's socket handed to this launcher is the launcher's, never a rank's.
        .env_remove(ferrospeed::comm::store::ENV_STORE_FD)
        .env(ferrospeed::comm::ENV_RDZV_TIMEOUT, plan.rdzv_timeout.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // Ranks share the machine's cores (torchrun does the same with OMP_NUM_THREADS).
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let cores = thread::available_parallelism().map_or(1, |n| n.get());
        cmd.env("RAYON_NUM_THREADS", (cores / plan.nproc_per_node).max(1).to_string());
    }
    // NCCL (2.22+) connects ranks lazily, inside the first collective that needs a connection: a host
    // call that waits for the peer with no timeout, so one hung rank would block the others before the
    // engine's NCCL watchdog (which polls issued collectives) could see anything. Connecting while the
    // communicator forms keeps every later collective call non-blocking on the host.
    if std::env::var_os("NCCL_RUNTIME_CONNECT").is_none() {
        cmd.env("NCCL_RUNTIME_CONNECT", "0");
    }
    if let Some(t) = plan.collective_timeout {
        cmd.env(ferrospeed::comm::ENV_TIMEOUT, t.to_string());
    }
    let launcher_pid = std::process::id() as i32;
    // SAFETY: only async-signal-safe libc calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setpgid(0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // If the launcher dies, even by SIGKILL, the kernel kills the rank: nothing outlives the job.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() != launcher_pid {
                libc::_exit(1); // the launcher died before the line above took effect
            }
            // Tell the guard about this process group before the rank can start anything: were the
            // launcher killed between this fork and its own `protect`, the rank's children would
            // otherwise outlive it (the kernel's death signal reaches the rank only).
            if let Some(fd) = guard_fd {
                super::guard::announce(fd, libc::getpid());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().with_context(|| format!("starting rank {rank}: {}", plan.program.display()))?;
    let pid = child.id() as i32;
    let mut threads = Vec::new();
    if let Some(out) = child.stdout.take() {
        threads.extend(forward_lines(out, rank, false));
    }
    if let Some(err) = child.stderr.take() {
        threads.extend(forward_lines(err, rank, true));
    }
    Ok((RankProcess { rank, pid }, child, threads))
}

/// Copy lines from a rank's pipe to ours with the rank as prefix (bytes, so non-UTF-8 survives).
fn forward_lines(pipe: impl Read + Send + 'static, rank: usize, to_stderr: bool) -> Option<thread::JoinHandle<()>> {
    let spawned = thread::Builder::new().name(format!("rank{rank}-output")).spawn(move || {
        let mut reader = BufReader::new(pipe);
        let mut line = Vec::new();
        let prefix = format!("[rank{rank}]: ");
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    if !line.ends_with(b"\n") {
                        line.push(b'\n');
                    }
                    let mut buf = Vec::with_capacity(prefix.len() + line.len());
                    buf.extend_from_slice(prefix.as_bytes());
                    buf.extend_from_slice(&line);
                    // One write per line keeps lines of different ranks from interleaving.
                    let _ = if to_stderr {
                        std::io::stderr().lock().write_all(&buf)
                    } else {
                        let mut out = std::io::stdout().lock();
                        out.write_all(&buf).and_then(|()| out.flush())
                    };
                }
            }
        }
    });
    match spawned {
        Ok(handle) => Some(handle),
        Err(e) => {
            tracing::warn!("cannot forward output of rank {rank}: {e}");
            None
        }
    }
}

/// Wait for the output threads to copy what the ranks wrote, for at most `limit` (a process that
/// escaped its group could hold a pipe open).
pub fn drain_output(threads: OutputThreads, limit: std::time::Duration) {
    let deadline = std::time::Instant::now() + limit;
    for t in threads {
        while !t.is_finished() && std::time::Instant::now() < deadline {
            thread::sleep(std::time::Duration::from_millis(5));
        }
        if t.is_finished() {
            let _ = t.join();
        }
    }
}

/// Send `sig` to the process group of `pid` (the rank and everything it started).
pub fn signal_group(pid: i32, sig: i32) {
    // SAFETY: killpg has no memory-safety preconditions; errors (already gone) are fine to ignore.
    unsafe {
        libc::killpg(pid, sig);
    }
}
