//! Checkpoints: atomic sharded saves, bit-exact resume at any world size and stage, consolidated export.

mod durable;
mod error;
mod export;
mod format;
pub mod gguf;
mod load;
mod safetensors_io;
mod save;
mod weights;

pub use durable::SavePhase;
pub(crate) use durable::fault_at;
pub use error::CheckpointError;
pub use export::{export, export_dir, load_consolidated, load_consolidated_from, write_dir, DirExport, ExportStats, ImportScope, ImportStats, NameMap, Regroup, Written};
pub use format::{list_checkpoints, step_dir_name, BlockMeta, FileMeta, Meta, ParamMeta, FORMAT_VERSION, FORMAT_VERSION_SPLIT, LATEST, META};
pub use load::{latest, load_into, read_meta, resolve, verify, verify_file};
pub use save::{save, SaveRequest, BEST};
pub use weights::{WeightDtype, WeightFiles, WeightInfo, INDEX, SINGLE};
