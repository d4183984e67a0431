//! The checkpoint layout on disk: `<root>/step-NNNNNN/` with `meta.json` and one safetensors file per
//! rank holding that rank's shard of every block's fp32 master weights and optimizer state.
//!
//! Shards follow `ShardLayout(numel, world, 64)` of the saving world, whatever the stage, so a
//! checkpoint holds the state once. Elements are addressed by their offset in the block's flat
//! buffer, which does not depend on the world size: loading reads the byte ranges a rank needs.

use crate::precision::ScalerState;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The format of checkpoints whose blocks are all whole.
pub const FORMAT_VERSION: u32 = 1;
/// The format of checkpoints with blocks split by tensor parallelism (`BlockMeta::tp > 1`): their files'
/// windows are in slice coordinates, which builds before it would misread, so they refuse it.
pub const FORMAT_VERSION_SPLIT: u32 = 2;
/// File that names the newest complete checkpoint.
pub const LATEST: &str = "latest";
pub const META: &str = "meta.json";

/// `meta.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Meta {
    pub format_version: u32,
    /// Optimizer steps done.
    pub step: u64,
    /// Training sequences consumed (all ranks).
    pub samples: u64,
    pub world_size: usize,
    pub zero_stage: u8,
    pub precision: String,
    pub loss_scaler: Option<ScalerState>,
    /// The optimizer whose state the files hold (checkpoints before this field: AdamW).
    #[serde(default = "adamw")]
    pub optimizer: String,
    /// Its state buffers, in file order after `master`.
    #[serde(default = "adamw_state")]
    pub optimizer_state: Vec<String>,
    pub blocks: Vec<BlockMeta>,
    pub files: Vec<FileMeta>,
    /// What the trainer wants back on resume (configuration, model shape); not read by the engine.
    pub run: serde_json::Value,
}

/// A block's parameters: names, shapes and offsets in its flat buffer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BlockMeta {
    pub name: String,
    pub numel: usize,
    pub params: Vec<ParamMeta>,
    /// A block saved split over tensor-parallel groups of `tp` ranks: each file holds its slice's
    /// window (`FileMeta::windows`, in the flat buffer of its `FileMeta::tp_rank`'s slices, laid out
    /// like the whole block's with each parameter's slice shape), and how each parameter splits
    /// (`TpSplit::name`). 1 and none: the block whole, windows in its own flat buffer.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub tp: usize,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub splits: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParamMeta {
    pub name: String,
    pub shape: Vec<usize>,
    pub offset: usize,
}

/// One rank's file: its checksum and, per block, the flat range `[offset, offset + len)` it holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileMeta {
    pub name: String,
    pub rank: usize,
    pub bytes: u64,
    pub crc32c: u32,
    pub windows: Vec<(usize, usize)>,
    /// The file's rank in its tensor-parallel group (the slices its split blocks hold).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub tp_rank: usize,
}

fn one() -> usize {
    1
}

fn is_one(v: &usize) -> bool {
    *v == 1
}

fn is_zero(v: &usize) -> bool {
    *v == 0
}

/// The tensors of a block in a rank file: `master`, then the optimizer's state buffers by name
/// (AdamW: `exp_avg`, `exp_avg_sq`; SGD with momentum: `momentum_buffer`).
pub fn tensor_names(block: &str, state_names: &[String]) -> Vec<String> {
    std::iter::once(format!("{block}/master")).chain(state_names.iter().map(|s| format!("{block}/{s}"))).collect()
}

fn adamw() -> String {
    "adamw".into()
}

fn adamw_state() -> Vec<String> {
    vec!["exp_avg".into(), "exp_avg_sq".into()]
}

pub fn rank_file_name(rank: usize, world: usize) -> String {
    format!("rank-{rank:05}-of-{world:05}.safetensors")
}

pub fn step_dir_name(step: u64) -> String {
    format!("step-{step:08}")
}

/// The step of a `step-NNNNNNNN` directory name.
pub fn parse_step_dir(name: &str) -> Option<u64> {
    name.strip_prefix("step-")?.parse().ok()
}

/// Complete checkpoints under `root`, oldest first (temporary folders are never listed).
pub fn list_checkpoints(root: &Path) -> Vec<(u64, PathBuf)> {
    let mut found: Vec<(u64, PathBuf)> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((parse_step_dir(&e.file_name().to_string_lossy())?, e.path())))
        .collect();
    found.sort();
    found
}

/// crc32c of a whole file, streamed.
pub fn file_crc(path: &Path) -> std::io::Result<(u32, u64)> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    let (mut crc, mut len) = (0u32, 0u64);
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok((crc, len));
        }
        crc = crc32c::crc32c_append(crc, &buf[..n]);
        len += n as u64;
    }
}
