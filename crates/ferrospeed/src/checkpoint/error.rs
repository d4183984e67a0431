//! Errors of checkpoint saving, loading and export: each names the file and what to do.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error(
        "{path} fails its checksum: crc32c {actual:08x}, {bytes} bytes; meta.json records crc32c {expected:08x}, \
         {expected_bytes} bytes. The file was damaged after it was written: resume from an earlier checkpoint"
    )]
    Checksum { path: PathBuf, expected: u32, actual: u32, bytes: u64, expected_bytes: u64 },
    #[error("checkpoint {path} does not fit this model: {reason}")]
    Mismatch { path: PathBuf, reason: String },
    #[error("no checkpoint at {path}: {reason}")]
    NotFound { path: PathBuf, reason: String },
    #[error("{path} already exists and is not empty: export into a new directory, or remove it first")]
    Exists { path: PathBuf },
    /// A well-formed file this build cannot import (a GGUF architecture or quantisation).
    #[error("{path}: {reason}")]
    Unsupported { path: PathBuf, reason: String },
    #[error("checkpoint format: {0}")]
    Format(String),
    /// The disk of `checkpoint.dir` cannot hold the checkpoint.
    #[error(
        "checkpoint.dir = {dir} has no room for the checkpoint of step {step}: it needs about {needed_mb} MB and {free_mb} MB are free; \
         free space there, lower checkpoint.keep, or point checkpoint.dir at a larger disk (nothing of it was kept)"
    )]
    DiskFull { dir: PathBuf, step: u64, needed_mb: u64, free_mb: u64 },
    #[error(transparent)]
    Engine(#[from] crate::engine::EngineError),
}

impl CheckpointError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io { path: path.to_path_buf(), source }
    }

    pub(crate) fn corrupt(path: &Path, reason: &str) -> Self {
        Self::Corrupt { path: path.to_path_buf(), reason: reason.to_string() }
    }
}
