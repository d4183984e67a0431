//! The guard: a tiny helper process that kills every rank's process group if the launcher itself dies.
//!
//! Ranks get `PR_SET_PDEATHSIG`, but that reaches only the rank process, not what it started. The
//! launcher writes each rank's process-group id to the guard's stdin; if the stream ends without the
//! word `done` (the launcher was killed, even by SIGKILL), the guard kills those groups.

use std::io::{BufRead, Write};
use std::os::unix::process::CommandExt;
use std::process::{Child, ChildStdin, Command, ExitCode, Stdio};

/// The hidden subcommand that runs the guard.
pub const GUARD_COMMAND: &str = "__launch-guard";

/// The launcher's handle on its guard.
pub struct Guard {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl Guard {
    pub fn spawn() -> std::io::Result<Self> {
        let exe = std::env::current_exe()?;
        let mut cmd = Command::new(exe);
        cmd.arg(GUARD_COMMAND).stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::inherit());
        // Its own process group, so a Ctrl-C in the terminal does not end it early.
        // SAFETY: setpgid is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| if libc::setpgid(0, 0) == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) });
        }
        let mut child = cmd.spawn()?;
        let stdin = child.stdin.take();
        Ok(Self { child, stdin })
    }

    /// The write end of the guard's pipe, for ranks to announce themselves before they exec
    /// ([`announce`]).
    pub fn fd(&self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        self.stdin.as_ref().map(AsRawFd::as_raw_fd)
    }

    /// Tell the guard about a rank's process group.
    pub fn protect(&mut self, pgid: i32) {
        if let Some(s) = &mut self.stdin {
            let _ = writeln!(s, "{pgid}").and_then(|()| s.flush());
        }
    }

    /// The ranks are gone: let the guard exit without killing anything.
    pub fn release(mut self) {
        if let Some(mut s) = self.stdin.take() {
            let _ = writeln!(s, "done");
        }
        let _ = self.child.wait();
    }
}

/// Write `pgid` and a newline to the guard's pipe `fd`, from a forked child before exec: only
/// async-signal-safe work (digits formatted on the stack, one `write` of fewer than `PIPE_BUF`
/// bytes, which the pipe keeps whole beside other ranks' lines).
pub fn announce(fd: std::os::fd::RawFd, pgid: i32) {
    let mut buf = [0u8; 16];
    let mut end = buf.len();
    end -= 1;
    buf[end] = b'\n';
    let mut v = pgid.unsigned_abs();
    loop {
        end -= 1;
        buf[end] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    // SAFETY: `buf[end..]` is initialised; write is async-signal-safe. A failed write (the guard
    // gone) leaves the launcher's own `protect` as before.
    unsafe {
        libc::write(fd, buf[end..].as_ptr().cast(), buf.len() - end);
    }
}

/// Body of the guard process.
pub fn run() -> ExitCode {
    let mut groups = Vec::new();
    for line in std::io::stdin().lock().lines() {
        match line {
            Ok(l) if l.trim() == "done" => return ExitCode::SUCCESS,
            Ok(l) => groups.extend(l.trim().parse::<i32>().ok().filter(|p| *p > 1)),
            Err(_) => break,
        }
    }
    for pgid in groups {
        // SAFETY: killpg has no memory-safety preconditions.
        unsafe {
            libc::killpg(pgid, libc::SIGKILL);
        }
    }
    ExitCode::SUCCESS
}
