//! Errors of the [`super::Accelerator`]: every failure of the library layers, plus its own.

use std::path::PathBuf;

/// What can go wrong setting up or driving a run through the `Accelerator`.
#[derive(Debug, thiserror::Error)]
pub enum AccelError {
    /// A bad config file, value or batch arithmetic.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// Rank information, the process group or a collective.
    #[error(transparent)]
    Comm(#[from] crate::comm::CommError),
    /// The engine (model definition, tensors, optimizer).
    #[error(transparent)]
    Engine(#[from] crate::engine::EngineError),
    /// Saving, loading or exporting a checkpoint.
    #[error(transparent)]
    Checkpoint(#[from] crate::checkpoint::CheckpointError),
    /// The dataset or its sampling.
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    /// Writing the run's metrics.
    #[error(transparent)]
    Track(#[from] crate::track::TrackError),
    /// `train.device` cannot be honoured.
    #[error("train.device: {0}")]
    Device(String),
    /// Rank 0 could not claim the run directory; every rank stops with its reason.
    #[error("{0}")]
    RunDirRefused(String),
    /// A call that needs `checkpoint.dir`.
    #[error("{what} needs checkpoint.dir: set it in the config or with --set checkpoint.dir=\"DIR\"")]
    NoCheckpointDir {
        /// The call that needs it.
        what: &'static str,
    },
    /// `model.init_from` could not be loaded.
    #[error("model.init_from = {path}: {source}")]
    InitFrom {
        /// The checkpoint's path.
        path: PathBuf,
        /// Why it could not be loaded.
        source: crate::checkpoint::CheckpointError,
    },
    /// `model.adapter_from` could not be loaded.
    #[error("model.adapter_from = {path}: {source}")]
    AdapterFrom {
        /// The adapter directory.
        path: PathBuf,
        /// Why it could not be loaded.
        source: crate::checkpoint::CheckpointError,
    },
    /// The checkpoint `checkpoint.resume` found cannot be resumed by this run.
    #[error("{source}: resume it with the config that saved it, or give this run another checkpoint.dir (or checkpoint.resume = false)")]
    Resume {
        /// Why it cannot.
        source: crate::checkpoint::CheckpointError,
    },
    /// Command-line arguments of a program built on the `Accelerator`.
    #[error("{0}")]
    Args(String),
}

impl AccelError {
    /// Whether the fault is the user's input (config, arguments, data, run directory) rather than the
    /// machine: binaries exit with 2 for these.
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            AccelError::Config(_)
                | AccelError::Device(_)
                | AccelError::RunDirRefused(_)
                | AccelError::NoCheckpointDir { .. }
                | AccelError::InitFrom { .. }
                | AccelError::AdapterFrom { .. }
                | AccelError::Resume { .. }
                | AccelError::Checkpoint(crate::checkpoint::CheckpointError::DiskFull { .. })
                | AccelError::Args(_)
                | AccelError::Data(_)
                | AccelError::Engine(crate::engine::EngineError::Nvme { .. } | crate::engine::EngineError::PinnedBudget { .. })
        )
    }
}
