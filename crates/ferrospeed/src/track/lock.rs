//! Exclusive locks on a job's directories (`track.dir`, `checkpoint.dir`): rank 0 holds one for the
//! whole job, so a second job pointed at the same directories is refused at once, naming the first,
//! instead of both writing into them.
//!
//! The lock is `flock(2)` on `<dir>/.ferrospeed.lock`: the kernel releases it when its holder dies,
//! however it dies, so a crashed job never leaves a lock that needs clearing by hand. The file holds
//! the holder's host, pid and start time (one JSON line) for the refusal's message; a job that takes
//! over a file still naming another process (one that died holding it) says so in one line. The file
//! itself stays (emptied on release): deleting a lock file races with a process that has opened it.

use super::TrackError;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// The lock file's name inside a locked directory.
pub const LOCK_FILE: &str = ".ferrospeed.lock";

/// Who holds (or last held) a directory's lock.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LockHolder {
    /// Host name of the holder.
    pub host: String,
    /// Its process id.
    pub pid: u32,
    /// When it took the lock, seconds since the Unix epoch.
    pub since: u64,
}

impl LockHolder {
    fn me() -> Self {
        Self { host: host_name(), pid: std::process::id(), since: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()) }
    }
}

impl std::fmt::Display for LockHolder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ago = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()).saturating_sub(self.since);
        write!(f, "pid {} on host {}, holding it for {} s", self.pid, self.host, ago)
    }
}

/// This machine's host name (empty where it cannot be read).
fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is writable for its length; gethostname writes a NUL-terminated name into it.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return String::new();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// An exclusive lock on a directory, held until dropped.
#[derive(Debug)]
pub struct DirLock {
    file: File,
    dir: PathBuf,
    /// The holder recorded in the file when this lock was taken, if it was another process (which
    /// died holding it: the kernel released its lock).
    taken_over: Option<LockHolder>,
    /// Whether taking the lock created the directory.
    created_dir: bool,
    /// The outermost directory taking the lock created (`dir` or one of its parents).
    first_created: Option<PathBuf>,
}

impl DirLock {
    /// Lock `dir` (created if missing) for this process, or say who holds it. `key` names the
    /// setting the directory comes from (`track.dir`), for the messages.
    pub fn acquire(dir: &Path, key: &str) -> Result<Self, TrackError> {
        let created_dir = !dir.exists();
        let first_created = dir.ancestors().take_while(|a| !a.as_os_str().is_empty() && !a.exists()).last().map(Path::to_path_buf);
        std::fs::create_dir_all(dir).map_err(|source| TrackError::CreateDir { path: dir.to_path_buf(), source })?;
        let path = dir.join(LOCK_FILE);
        // The file may be replaced between our open and our flock (a job that cleans up after a
        // failed start removes it): the lock counts only if the path still names the file we locked.
        for _ in 0..8 {
            let mut file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(|source| TrackError::CreateFile { path: path.clone(), source })?;
            // SAFETY: a valid open descriptor; flock has no memory effects.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
                let err = std::io::Error::last_os_error();
                if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                    let holder = read_holder(&mut file);
                    return Err(TrackError::Locked { key: key.to_string(), dir: dir.to_path_buf(), holder: holder.map_or_else(|| "another process".into(), |h| h.to_string()) });
                }
                // A file system without locks (some network and FUSE mounts): go on unlocked.
                tracing::warn!("{key} = {}: cannot lock {} ({err}); a second job pointed at it would not be refused", dir.display(), path.display());
            }
            let same = match (file.metadata(), std::fs::metadata(&path)) {
                (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
                _ => false,
            };
            if !same {
                continue;
            }
            let me = LockHolder::me();
            let taken_over = read_holder(&mut file).filter(|h| *h != me && !(h.pid == me.pid && h.host == me.host));
            let line = serde_json::to_string(&me).map_err(|source| TrackError::Json { path: path.clone(), source })?;
            let write = file.set_len(0).and_then(|()| file.seek(SeekFrom::Start(0))).and_then(|_| file.write_all(format!("{line}\n").as_bytes()));
            write.map_err(|source| TrackError::Write { path: path.clone(), source })?;
            return Ok(Self { file, dir: dir.to_path_buf(), taken_over, created_dir, first_created });
        }
        Err(TrackError::Locked { key: key.to_string(), dir: dir.to_path_buf(), holder: "another process that keeps replacing its lock file".into() })
    }

    /// The process that held this directory's lock before and died holding it, if any.
    pub fn taken_over(&self) -> Option<&LockHolder> {
        self.taken_over.as_ref()
    }

    /// The locked directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether taking the lock created the directory.
    pub fn created_dir(&self) -> bool {
        self.created_dir
    }

    /// Release the lock and remove the lock file (a start that failed leaves nothing behind); with
    /// `remove_dirs`, also the directories taking the lock created, those that are empty.
    pub fn release_and_remove(self, remove_dirs: bool) {
        let path = self.dir.join(LOCK_FILE);
        // Removed while still locked: a process that opened the old file and locks it after us
        // sees that the path no longer names it, and starts over.
        let _ = std::fs::remove_file(&path);
        let (dir, first) = (self.dir.clone(), self.first_created.clone());
        drop(self);
        if let (true, Some(first)) = (remove_dirs, first) {
            for d in dir.ancestors() {
                if std::fs::remove_dir(d).is_err() || d == first {
                    break;
                }
            }
        }
    }
}

impl Drop for DirLock {
    fn drop(&mut self) {
        // Released: the file no longer names a holder (closing the descriptor drops the lock).
        let _ = self.file.set_len(0);
    }
}

fn read_holder(file: &mut File) -> Option<LockHolder> {
    let mut text = String::new();
    file.seek(SeekFrom::Start(0)).ok()?;
    file.read_to_string(&mut text).ok()?;
    serde_json::from_str(text.trim()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_is_refused_naming_the_holder_and_released_on_drop() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("run");
        let first = DirLock::acquire(&dir, "track.dir").unwrap();
        assert!(first.created_dir() && first.taken_over().is_none());
        // flock locks belong to the open file: a second open in this process conflicts like another job.
        let err = DirLock::acquire(&dir, "track.dir").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("track.dir") && msg.contains(&dir.display().to_string()), "{msg}");
        assert!(msg.contains(&format!("pid {}", std::process::id())) && msg.contains(&host_name()), "{msg}");
        assert!(!msg.contains('\n'), "one line: {msg}");
        drop(first);
        assert_eq!(std::fs::read_to_string(dir.join(LOCK_FILE)).unwrap(), "", "released: no holder named");
        let again = DirLock::acquire(&dir, "track.dir").unwrap();
        assert!(again.taken_over().is_none() && !again.created_dir());
    }

    #[test]
    fn the_lock_of_a_dead_holder_is_taken_over_with_its_name() {
        let base = tempfile::tempdir().unwrap();
        // What a process killed while holding the lock leaves: its line in an unlocked file.
        let dead = LockHolder { host: "node7".into(), pid: 4_000_000, since: 1 };
        std::fs::write(base.path().join(LOCK_FILE), serde_json::to_string(&dead).unwrap()).unwrap();
        let lock = DirLock::acquire(base.path(), "checkpoint.dir").unwrap();
        assert_eq!(lock.taken_over(), Some(&dead));
        let now: LockHolder = serde_json::from_str(std::fs::read_to_string(base.path().join(LOCK_FILE)).unwrap().trim()).unwrap();
        assert_eq!(now.pid, std::process::id());
    }

    #[test]
    fn release_and_remove_leaves_nothing_of_a_directory_it_created() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("a/b");
        let lock = DirLock::acquire(&dir, "checkpoint.dir").unwrap();
        lock.release_and_remove(true);
        assert!(!base.path().join("a").exists(), "the directories it created");
        assert!(base.path().exists());
        // A directory with other files is kept, only the lock file goes.
        let lock = DirLock::acquire(base.path(), "track.dir").unwrap();
        std::fs::write(base.path().join("x"), b"1").unwrap();
        lock.release_and_remove(true);
        assert!(base.path().join("x").exists() && !base.path().join(LOCK_FILE).exists());
    }
}
