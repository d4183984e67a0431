//! Run outputs: `metrics.jsonl`, `config.json`/`summary.json`, a TensorBoard event file, `plot.png`, and progress display.
//!
//! Code map:
//! - `metrics.rs`: [`StepMetrics`], the one record per optimizer step that every output is built from.
//! - `run_dir.rs`: choosing a fresh run directory and writing its JSON files.
//! - `tracker.rs`: [`Tracker`], which owns a run directory and appends metrics to it.
//! - `tensorboard.rs`: [`TensorBoardWriter`], a dependency-free TensorBoard event file writer.
//! - `csv.rs`, `mlflow.rs`: `metrics.csv`, and an MLflow file store in `mlruns/`.
//! - `mlflow_server.rs`: [`ServerRun`], a run on an MLflow tracking server, logged from a background
//!   thread that never holds up training; `mlflow_rest.rs`: the REST calls it makes.
//! - `plot.rs`: [`plot_runs`], `plot.png` of one or several runs from their `metrics.jsonl`.
//! - `progress.rs`: [`Progress`], a progress bar on a terminal, plain lines otherwise.
//! - `lock.rs`: [`DirLock`], the job's exclusive lock on `track.dir` and `checkpoint.dir`.
//!
//! Invariant: a run directory belongs to one run. A directory that already holds `metrics.jsonl` is
//! refused before anything is written, so an earlier run's outputs cannot be overwritten or mixed with
//! a new one — unless the run resumes from its own checkpoint (`checkpoint.resume`), which continues
//! it: rows after the checkpoint's step are dropped and computed again, none duplicated or lost.
//! This module knows nothing of ranks: the caller decides that only rank 0 tracks.

mod csv;
mod error;
mod lock;
mod metrics;
mod mlflow;
mod mlflow_rest;
mod mlflow_server;
mod plot;
mod progress;
mod run_dir;
mod tensorboard;
mod tracker;

#[cfg(test)]
mod event_reader;
#[cfg(test)]
mod mlflow_tests;

pub use error::TrackError;
pub use lock::{DirLock, LockHolder, LOCK_FILE};
pub use metrics::{peak_rss_bytes, reset_peak_rss, rss_bytes, MetricsLines, StepMetrics};
pub use plot::{plot_runs, render_png, RunSeries, PLOT_SIZE};
pub use progress::Progress;
pub use run_dir::fresh_run_dir;
pub use tensorboard::TensorBoardWriter;
pub use mlflow_server::{MlflowServer, RunEnd, ServerRun};
pub use tracker::{Backends, MlflowTarget, Tracker};
