//! Errors of run tracking: each names the path involved and what to do about it.

use std::path::PathBuf;

/// Everything that can go wrong while writing a run's outputs.
#[derive(Debug, thiserror::Error)]
pub enum TrackError {
    #[error(
        "{dir} already holds a run (metrics.jsonl exists); choose another track.dir or move the old run away (the same config with checkpoint.resume = true continues it)"
    )]
    RunExists { dir: PathBuf },

    #[error("{key} = {dir} is in use by another job ({holder}): wait for that job to end, or give this one another {key}")]
    Locked { key: String, dir: PathBuf, holder: String },

    #[error("cannot create directory {path}: {source}; check that the parent is writable")]
    CreateDir { path: PathBuf, source: std::io::Error },

    #[error("cannot create {path}: {source}; check that the directory is writable")]
    CreateFile { path: PathBuf, source: std::io::Error },

    #[error("cannot write {path}: {source}; check free disk space and permissions")]
    Write { path: PathBuf, source: std::io::Error },

    #[error("cannot encode JSON for {path}: {source}; the value must be representable as JSON")]
    Json { path: PathBuf, source: serde_json::Error },

    #[error("{dir} holds no metrics (no metrics.jsonl with a step in it): give a run directory, the track.dir of a run")]
    NoMetrics { dir: PathBuf },

    #[error("{path}: none of its {lines} lines is a metrics row (line {first} is not): give the track.dir of a run whose metrics.jsonl is intact")]
    CorruptMetrics { path: PathBuf, lines: usize, first: usize },

    #[error("cannot draw the plot: {message}")]
    Plot { message: String },
}
