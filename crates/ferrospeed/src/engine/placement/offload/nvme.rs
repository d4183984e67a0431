//! Optimizer state in files under `zero.nvme_dir`: one file per block and rank holding its master
//! weights and moments, read whole before the block's update and written back after it, with
//! `O_DIRECT` (page-aligned buffers, lengths and offsets) so the page cache neither doubles the host
//! memory nor hides the disk's speed. Reads and writes run on two threads of their own, so the
//! update pass reads the next blocks ahead and writes the last ones behind (`pass.rs`).
//!
//! Written by hand rather than with an io_uring crate: two blocking threads keep one read and one
//! write in flight, which is what a block-at-a-time pipeline can use, and `pread`/`pwrite` need no
//! kernel feature; the bandwidth reached is measured and reported (`IoStats`).

use super::super::error::EngineError;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender};
use std::sync::Arc;
use std::time::Instant;

/// Elements of f32 in one aligned page.
pub const PAGE_ELEMS: usize = 1024;
/// Alignment and granularity of every direct transfer.
pub const PAGE_BYTES: usize = PAGE_ELEMS * 4;

/// One 4096-byte, 4096-aligned page: a `Vec` of them is a buffer `O_DIRECT` accepts.
#[derive(Clone, Copy)]
#[repr(C, align(4096))]
pub struct Page([f32; PAGE_ELEMS]);

/// A page-aligned host buffer of f32.
pub struct Pages(Vec<Page>);

impl Pages {
    /// Zeroed pages holding at least `elems` f32.
    pub fn zeroed(elems: usize) -> Self {
        Pages(vec![Page([0.0; PAGE_ELEMS]); elems.div_ceil(PAGE_ELEMS)])
    }

    /// Capacity in f32.
    pub fn elems(&self) -> usize {
        self.0.len() * PAGE_ELEMS
    }

    /// The buffer as f32.
    pub fn as_f32_mut(&mut self) -> &mut [f32] {
        // SAFETY: `Page` is `repr(C)` over `[f32; PAGE_ELEMS]`, so the pages are contiguous f32.
        unsafe { std::slice::from_raw_parts_mut(self.0.as_mut_ptr().cast::<f32>(), self.elems()) }
    }

    /// The buffer as f32.
    pub fn as_f32(&self) -> &[f32] {
        // SAFETY: as in `as_f32_mut`.
        unsafe { std::slice::from_raw_parts(self.0.as_ptr().cast::<f32>(), self.elems()) }
    }

    fn as_bytes(&self) -> &[u8] {
        // SAFETY: any f32 is four initialised bytes.
        unsafe { std::slice::from_raw_parts(self.0.as_ptr().cast::<u8>(), self.0.len() * PAGE_BYTES) }
    }

    fn as_bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: any four bytes are an f32 (a NaN pattern at worst, which the next write replaces).
        unsafe { std::slice::from_raw_parts_mut(self.0.as_mut_ptr().cast::<u8>(), self.0.len() * PAGE_BYTES) }
    }
}

/// Bytes moved and seconds spent, per direction (for the reported disk bandwidth).
#[derive(Default)]
pub struct IoStats {
    read_bytes: AtomicU64,
    read_nanos: AtomicU64,
    write_bytes: AtomicU64,
    write_nanos: AtomicU64,
}

/// A snapshot of `IoStats`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct DiskTraffic {
    /// Bytes read from the state files.
    pub read_bytes: u64,
    /// Seconds the reader thread spent reading.
    pub read_secs: f64,
    /// Bytes written.
    pub write_bytes: u64,
    /// Seconds the writer thread spent writing.
    pub write_secs: f64,
    /// Whether the files are opened with `O_DIRECT` (false where the file system refuses it).
    pub direct: bool,
}

impl DiskTraffic {
    /// Read bandwidth in GB/s (10⁹ bytes), 0 before any read.
    pub fn read_gbps(&self) -> f64 {
        if self.read_secs > 0.0 { self.read_bytes as f64 / self.read_secs / 1e9 } else { 0.0 }
    }

    /// Write bandwidth in GB/s.
    pub fn write_gbps(&self) -> f64 {
        if self.write_secs > 0.0 { self.write_bytes as f64 / self.write_secs / 1e9 } else { 0.0 }
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// A transfer in flight; `wait` hands the buffer back.
pub struct IoPending(Receiver<std::io::Result<Pages>>, PathBuf);

impl IoPending {
    /// Wait for the transfer; the buffer comes back either way it ends well.
    pub fn wait(self) -> Result<Pages, EngineError> {
        let path = self.1;
        match self.0.recv() {
            Ok(Ok(pages)) => Ok(pages),
            Ok(Err(e)) => Err(EngineError::Nvme { path, reason: e.to_string() }),
            Err(_) => Err(EngineError::Nvme { path, reason: "the I/O thread stopped".into() }),
        }
    }
}

/// This rank's folder of state files, and the two I/O threads.
pub struct NvmeStore {
    dir: PathBuf,
    reader: Sender<Job>,
    writer: Sender<Job>,
    stats: Arc<IoStats>,
    direct: bool,
}

fn spawn_io(name: &str) -> Sender<Job> {
    let (tx, rx) = channel::<Job>();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            for job in rx {
                job();
            }
        })
        .expect("spawning an I/O thread");
    tx
}

impl NvmeStore {
    /// Claim `<root>/ferrospeed-<host>-<pid>-rank<rank>/` for `bytes` of state: `root` must exist,
    /// be writable and have room (every local rank's share). Folders of this host's earlier runs
    /// whose process is gone are removed first.
    pub fn create(root: &Path, rank: usize, bytes: u64) -> Result<Self, EngineError> {
        let bad = |reason: String| EngineError::Nvme { path: root.to_path_buf(), reason };
        if !root.is_dir() {
            return Err(bad("zero.nvme_dir does not exist or is not a directory: create it, or set zero.nvme_dir to a folder on a fast local disk".into()));
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default().trim().to_string();
        remove_stale(root, &host);
        let local_ranks: u64 = std::env::var("LOCAL_WORLD_SIZE").ok().and_then(|v| v.parse().ok()).unwrap_or(1);
        let free = crate::device::disk_free_bytes(root).map_err(|e| bad(format!("cannot read its free space: {e}")))?;
        if free < bytes.saturating_mul(local_ranks) {
            return Err(bad(format!(
                "has {:.2} GB free; the offloaded state needs {:.2} GB ({} rank(s) of this node × {:.2} GB): free space, choose another disk, or lower zero.offload_ratio",
                free as f64 / 1e9,
                (bytes * local_ranks) as f64 / 1e9,
                local_ranks,
                bytes as f64 / 1e9
            )));
        }
        let dir = root.join(format!("ferrospeed-{host}-{}-rank{rank}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| bad(format!("is not writable ({e}): choose a folder this user can write, or fix its permissions")))?;
        // Whether the file system takes O_DIRECT (tmpfs and some overlay file systems refuse it).
        let probe = dir.join("probe");
        let direct = OpenOptions::new().write(true).create(true).truncate(true).custom_flags(libc::O_DIRECT).open(&probe).is_ok();
        let _ = std::fs::remove_file(&probe);
        if !direct {
            tracing::warn!("{} refuses O_DIRECT: the offloaded state goes through the page cache", root.display());
        }
        Ok(Self { dir, reader: spawn_io("nvme-read"), writer: spawn_io("nvme-write"), stats: Arc::default(), direct })
    }

    /// A state file of `elems` f32 (page-rounded) named `name`, created at its full size, its space
    /// reserved: it reads as zeros until written (`NvmeFile::write_head` relies on it).
    pub fn file(&self, name: &str, elems: usize) -> Result<NvmeFile, EngineError> {
        let path = self.dir.join(name);
        let mut opts = OpenOptions::new();
        opts.read(true).write(true).create(true).truncate(true);
        if self.direct {
            opts.custom_flags(libc::O_DIRECT);
        }
        let file = opts.open(&path).map_err(|e| EngineError::Nvme { path: path.clone(), reason: e.to_string() })?;
        let pages = elems.div_ceil(PAGE_ELEMS);
        reserve(&file, (pages * PAGE_BYTES) as u64).map_err(|e| EngineError::Nvme {
            path: path.clone(),
            reason: match e.raw_os_error() {
                Some(libc::ENOSPC) => "the disk is full: free space on it, choose another zero.nvme_dir, or lower zero.offload_ratio".into(),
                _ => e.to_string(),
            },
        })?;
        Ok(NvmeFile { file: Arc::new(file), path, pages, reader: self.reader.clone(), writer: self.writer.clone(), stats: self.stats.clone() })
    }

    /// What the disk has moved so far.
    pub fn traffic(&self) -> DiskTraffic {
        let s = &self.stats;
        DiskTraffic {
            read_bytes: s.read_bytes.load(Ordering::Relaxed),
            read_secs: s.read_nanos.load(Ordering::Relaxed) as f64 * 1e-9,
            write_bytes: s.write_bytes.load(Ordering::Relaxed),
            write_secs: s.write_nanos.load(Ordering::Relaxed) as f64 * 1e-9,
            direct: self.direct,
        }
    }
}

impl Drop for NvmeStore {
    /// The files are scratch (checkpoints hold the state that lasts): remove them.
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Remove `ferrospeed-<host>-<pid>-rank*` folders of this host whose process no longer runs.
fn remove_stale(root: &Path, host: &str) {
    let Ok(entries) = std::fs::read_dir(root) else { return };
    let prefix = format!("ferrospeed-{host}-");
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(&prefix) else { continue };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else { continue };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Give `file` its `len` bytes as space reserved on the disk that reads as zeros (`fallocate`), so
/// that a disk filling up later cannot fail a write-back in the middle of a run, and nothing needs
/// writing yet; where the file system cannot reserve, a sparse file of that length.
fn reserve(file: &File, len: u64) -> std::io::Result<()> {
    // SAFETY: a system call on a descriptor `file` keeps open; no memory is passed.
    if unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len as libc::off_t) } == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EOPNOTSUPP) => file.set_len(len),
        _ => Err(e),
    }
}

/// One block's state file.
pub struct NvmeFile {
    file: Arc<File>,
    path: PathBuf,
    pages: usize,
    reader: Sender<Job>,
    writer: Sender<Job>,
    stats: Arc<IoStats>,
}

impl NvmeFile {
    /// Elements the file holds (a whole number of pages).
    pub fn elems(&self) -> usize {
        self.pages * PAGE_ELEMS
    }

    fn submit(&self, write: bool, mut pages: Pages, len_pages: usize) -> IoPending {
        let (tx, rx) = sync_channel(1);
        let (file, stats, len) = (self.file.clone(), self.stats.clone(), len_pages.min(self.pages) * PAGE_BYTES);
        let job: Job = Box::new(move || {
            let t0 = Instant::now();
            let result = if pages.as_bytes().len() < len {
                Err(std::io::Error::other("a buffer smaller than the file"))
            } else if write {
                file.write_all_at(&pages.as_bytes()[..len], 0)
            } else {
                file.read_exact_at(&mut pages.as_bytes_mut()[..len], 0)
            };
            let nanos = t0.elapsed().as_nanos() as u64;
            let (b, n) = if write { (&stats.write_bytes, &stats.write_nanos) } else { (&stats.read_bytes, &stats.read_nanos) };
            b.fetch_add(len as u64, Ordering::Relaxed);
            n.fetch_add(nanos, Ordering::Relaxed);
            let _ = tx.send(result.map(|()| pages));
        });
        let queue = if write { &self.writer } else { &self.reader };
        if queue.send(job).is_err() {
            let (tx, rx) = sync_channel(1);
            let _ = tx.send(Err(std::io::Error::other("the I/O thread stopped")));
            return IoPending(rx, self.path.clone());
        }
        IoPending(rx, self.path.clone())
    }

    /// Start reading the whole file into `pages` (at least `elems()` long).
    pub fn read(&self, pages: Pages) -> IoPending {
        self.submit(false, pages, self.pages)
    }

    /// Start writing `pages` over the whole file.
    pub fn write(&self, pages: Pages) -> IoPending {
        self.submit(true, pages, self.pages)
    }

    /// Start writing the pages of `pages` that hold its first `elems` f32, leaving the rest of the
    /// file as it is: on a file just created (reserved, read as zeros) the rest must be zeros.
    pub fn write_head(&self, pages: Pages, elems: usize) -> IoPending {
        self.submit(true, pages, elems.div_ceil(PAGE_ELEMS))
    }
}
