//! The file-system steps of a checkpoint save, one function each: create, write, sync, rename,
//! exchange, remove — and the named phases of the save protocol between them.
//!
//! Keeping every step here makes the protocol checkable. With the `fault-injection` feature (the
//! CLI's test builds turn it on), `FERROSPEED_FS_TRACE=FILE` appends each step to FILE as one line
//! (`pid`, operation, path, argument; tab-separated), so a test can replay a save under a power-loss
//! model, and `FERROSPEED_FAULT=PHASE@STEP[@RANK]` aborts the process at a phase of the save of step
//! STEP (on rank RANK only, when given), as a crash would. Without the feature both are compiled out.

use super::error::CheckpointError;
use std::fs::{self, File};
use std::io::Write;
use std::path::Path;

/// Named moments of a save, in the order they happen (see `save.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SavePhase {
    /// This rank's shard file is written and synced; `meta.json` is not.
    ShardsWritten,
    /// `meta.json` is written and synced; the temporary folder is not synced yet.
    MetaWritten,
    /// The temporary folder is synced and about to be renamed into place.
    BeforeRename,
    /// The folder has its final name; its parent is not synced yet.
    AfterRename,
    /// The new `latest` is written beside the old one, not yet renamed over it.
    BeforeLatest,
    /// `latest` names the new checkpoint; its folder is not synced yet.
    AfterLatest,
    /// An old checkpoint is renamed away and about to be deleted.
    Pruning,
}

impl SavePhase {
    pub const ALL: [SavePhase; 7] = [
        Self::ShardsWritten,
        Self::MetaWritten,
        Self::BeforeRename,
        Self::AfterRename,
        Self::BeforeLatest,
        Self::AfterLatest,
        Self::Pruning,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::ShardsWritten => "shards-written",
            Self::MetaWritten => "meta-written",
            Self::BeforeRename => "before-rename",
            Self::AfterRename => "after-rename",
            Self::BeforeLatest => "before-latest",
            Self::AfterLatest => "after-latest",
            Self::Pruning => "pruning",
        }
    }
}

/// Create `path` and its missing parents.
pub(crate) fn create_dir_all(path: &Path) -> Result<(), CheckpointError> {
    fs::create_dir_all(path).map_err(|e| CheckpointError::io(path, e))?;
    trace("mkdir-all", path, "");
    Ok(())
}

pub(crate) fn create_dir(path: &Path) -> Result<(), CheckpointError> {
    fs::create_dir(path).map_err(|e| CheckpointError::io(path, e))?;
    trace("mkdir", path, "");
    Ok(())
}

/// Create (or truncate) a file to write into; [`sync_file`] makes its contents durable.
pub(crate) fn create_file(path: &Path) -> Result<File, CheckpointError> {
    let f = File::create(path).map_err(|e| CheckpointError::io(path, e))?;
    trace("create", path, "");
    Ok(f)
}

pub(crate) fn sync_file(file: &File, path: &Path) -> Result<(), CheckpointError> {
    file.sync_all().map_err(|e| CheckpointError::io(path, e))?;
    trace("fsync", path, "");
    Ok(())
}

/// Write `bytes` to a new file at `path` and sync it. Short text contents go into the trace (the
/// name `latest` holds, for the power-loss checker).
pub(crate) fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    let shown = match std::str::from_utf8(bytes) {
        Ok(s) if s.len() <= 64 && !s.trim().contains(['\t', '\n']) => s.trim(),
        _ => "",
    };
    let mut f = File::create(path).map_err(|e| CheckpointError::io(path, e))?;
    trace("create", path, shown);
    f.write_all(bytes).map_err(|e| CheckpointError::io(path, e))?;
    sync_file(&f, path)
}

/// Make the entries of directory `dir` (files created, renamed or removed in it) durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), CheckpointError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| CheckpointError::io(dir, e))?;
    trace("fsync-dir", dir, "");
    Ok(())
}

pub(crate) fn rename(from: &Path, to: &Path) -> Result<(), CheckpointError> {
    fs::rename(from, to).map_err(|e| CheckpointError::io(to, e))?;
    trace("rename", from, &to.display().to_string());
    Ok(())
}

/// Swap two existing paths atomically (Linux `renameat2(RENAME_EXCHANGE)`). `Ok(false)` where the
/// system or file system cannot, so the caller falls back to two renames.
pub(crate) fn exchange(a: &Path, b: &Path) -> Result<bool, CheckpointError> {
    #[cfg(target_os = "linux")]
    {
        use std::ffi::CString;
        use std::os::unix::ffi::OsStrExt;
        let c = |p: &Path| CString::new(p.as_os_str().as_bytes()).map_err(|_| CheckpointError::Format(format!("{} has a NUL byte", p.display())));
        let (ca, cb) = (c(a)?, c(b)?);
        // SAFETY: both are valid NUL-terminated paths; AT_FDCWD resolves them like `rename`.
        let rc = unsafe { libc::renameat2(libc::AT_FDCWD, ca.as_ptr(), libc::AT_FDCWD, cb.as_ptr(), libc::RENAME_EXCHANGE) };
        if rc == 0 {
            trace("exchange", a, &b.display().to_string());
            return Ok(true);
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP) => Ok(false),
            _ => Err(CheckpointError::io(b, e)),
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (a, b);
        Ok(false)
    }
}

/// Remove a folder and everything in it (temporary, retired or pruned folders only).
pub(crate) fn remove_dir_all(path: &Path) -> std::io::Result<()> {
    trace("remove", path, "");
    fs::remove_dir_all(path)
}

/// The test hook: abort here if `FERROSPEED_FAULT` names this phase of this step's save (and rank,
/// and launch attempt: `PHASE@STEP[@RANK[@RESTART]]`, several separated by commas; RESTART is the
/// launcher's `TORCHELASTIC_RESTART_COUNT`).
#[cfg(feature = "fault-injection")]
pub(crate) fn fault_point(phase: SavePhase, step: u64, rank: usize) {
    fault(phase.as_str(), "save phase ", step, rank);
}

/// [`fault_point`] at a named point outside a save (`mid-schedule`: a pipeline stage halfway
/// through a step's actions).
#[cfg(feature = "fault-injection")]
pub(crate) fn fault_at(point: &str, step: u64, rank: usize) {
    fault(point, "", step, rank);
}

#[cfg(feature = "fault-injection")]
fn fault(point: &str, kind: &str, step: u64, rank: usize) {
    let Ok(specs) = std::env::var("FERROSPEED_FAULT") else { return };
    let restart: u64 = std::env::var("TORCHELASTIC_RESTART_COUNT").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
    let matches = specs.split(',').any(|spec| {
        let mut parts = spec.split('@');
        parts.next() == Some(point)
            && parts.next().is_none_or(|s| s.parse() == Ok(step))
            && parts.next().is_none_or(|r| r.parse() == Ok(rank))
            && parts.next().is_none_or(|a| a.parse() == Ok(restart))
    });
    if matches {
        eprintln!("fault injected: rank {rank} aborts at {kind}{point} of step {step}");
        std::process::abort();
    }
}

/// The test hook for a full disk: `FERROSPEED_FAULT=enospc@STEP[@RANK]` makes this rank's write of
/// the checkpoint of STEP fail as a full disk does (ENOSPC).
#[cfg(feature = "fault-injection")]
pub(crate) fn injected_enospc(step: u64, rank: usize) -> Option<std::io::Error> {
    let specs = std::env::var("FERROSPEED_FAULT").ok()?;
    let hit = specs.split(',').any(|spec| {
        let mut parts = spec.split('@');
        parts.next() == Some("enospc") && parts.next().is_none_or(|s| s.parse() == Ok(step)) && parts.next().is_none_or(|r| r.parse() == Ok(rank))
    });
    hit.then(|| std::io::Error::from_raw_os_error(libc::ENOSPC))
}

#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub(crate) fn injected_enospc(_step: u64, _rank: usize) -> Option<std::io::Error> {
    None
}

#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub(crate) fn fault_point(_phase: SavePhase, _step: u64, _rank: usize) {}

#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub(crate) fn fault_at(_point: &str, _step: u64, _rank: usize) {}

#[cfg(feature = "fault-injection")]
fn trace(op: &str, path: &Path, arg: &str) {
    let Some(file) = std::env::var_os("FERROSPEED_FS_TRACE") else { return };
    let line = format!("{}\t{op}\t{}\t{arg}\n", std::process::id(), path.display());
    // One write per line on an O_APPEND file: lines of several ranks never interleave.
    if let Ok(mut f) = fs::OpenOptions::new().create(true).append(true).open(file) {
        let _ = f.write_all(line.as_bytes());
    }
}

#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
fn trace(_op: &str, _path: &Path, _arg: &str) {}
