//! Rank 0's claim on a job's directories: the locks on `track.dir` and `checkpoint.dir` (held for the
//! whole job, so that a second job pointed at them is refused naming the first), the run directory's
//! tracker, and what the claim added — so that a start that fails before its first step leaves
//! nothing behind, and the corrected command is not refused by the remains of the failed one.

use crate::config::Config;
use crate::track::{Backends, DirLock, Tracker, TrackError, LOCK_FILE};
use std::collections::HashSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// What rank 0 holds of a job's directories.
pub(super) struct Claim {
    locks: Vec<DirLock>,
    /// The run directory, when this start created its run (not a continued one): the entries it
    /// held before (`None`: the directory did not exist).
    fresh: Option<(PathBuf, Option<HashSet<OsString>>)>,
    /// Lock files that existed before this start (left in place when it is abandoned).
    old_lock_files: HashSet<PathBuf>,
}

fn entries(dir: &Path) -> Option<HashSet<OsString>> {
    std::fs::read_dir(dir).ok().map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
}

fn same_dir(a: &Path, b: &Path) -> bool {
    a == b || matches!((a.canonicalize(), b.canonicalize()), (Ok(x), Ok(y)) if x == y)
}

impl Claim {
    /// Lock `track_dir` (when `track`) and `checkpoint.dir`, then open the run directory's tracker
    /// (continued when the run resumes from its checkpoint). Nothing is left of a refused claim.
    pub(super) fn take(cfg: &Config, track_dir: &Path, track: bool, backends: Backends, config_json: &serde_json::Value) -> Result<(Self, Option<Tracker>), TrackError> {
        let mut claim = Claim { locks: Vec::new(), fresh: None, old_lock_files: HashSet::new() };
        let before = entries(track_dir);
        let mut dirs: Vec<(&Path, &str)> = Vec::new();
        if track {
            dirs.push((track_dir, "track.dir"));
        }
        if let Some(ck) = cfg.checkpoint.dir.as_deref() {
            dirs.push((ck, "checkpoint.dir"));
        }
        for (dir, key) in dirs {
            if claim.locks.iter().any(|l| same_dir(l.dir(), dir)) {
                continue;
            }
            if dir.join(LOCK_FILE).exists() {
                claim.old_lock_files.insert(dir.join(LOCK_FILE));
            }
            match DirLock::acquire(dir, key) {
                Ok(lock) => {
                    if let Some(h) = lock.taken_over() {
                        tracing::warn!("{key} = {}: took over the lock of pid {} on host {}, which ended without releasing it", dir.display(), h.pid, h.host);
                    }
                    claim.locks.push(lock);
                }
                Err(e) => {
                    claim.abandon(None);
                    return Err(e);
                }
            }
        }
        if !track {
            return Ok((claim, None));
        }
        // A start that died before its first step left an empty metrics file: nothing of value, and
        // the lock says no job is using it, so this start takes the directory over.
        let metrics = track_dir.join("metrics.jsonl");
        if std::fs::metadata(&metrics).is_ok_and(|m| m.len() == 0) && !track_dir.join("summary.json").exists() {
            let _ = std::fs::remove_file(&metrics);
            for e in std::fs::read_dir(track_dir).into_iter().flatten().flatten() {
                if e.file_name().to_string_lossy().contains("tfevents") {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        let continuing = cfg.checkpoint.resume && cfg.checkpoint.dir.is_some();
        let existed = metrics.exists();
        match Tracker::continue_or_create(track_dir, backends, config_json, continuing) {
            Ok(t) => {
                if !(continuing && existed) {
                    claim.fresh = Some((track_dir.to_path_buf(), before));
                }
                Ok((claim, Some(t)))
            }
            Err(e) => {
                claim.abandon(None);
                Err(e)
            }
        }
    }

    /// The start failed before its first step: remove what it added (a fresh run directory's files,
    /// the directories and lock files it created) and release the locks.
    pub(super) fn abandon(self, tracker: Option<Tracker>) {
        drop(tracker);
        if let Some((dir, before)) = &self.fresh {
            for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let name = e.file_name();
                if name == LOCK_FILE || before.as_ref().is_some_and(|b| b.contains(&name)) {
                    continue;
                }
                let p = e.path();
                let _ = if p.is_dir() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
            }
        }
        for lock in self.locks {
            if self.old_lock_files.contains(&lock.dir().join(LOCK_FILE)) {
                drop(lock);
            } else {
                let created = lock.created_dir();
                lock.release_and_remove(created);
            }
        }
    }
}
