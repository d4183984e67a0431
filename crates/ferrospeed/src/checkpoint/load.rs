//! Loading a checkpoint into an engine of any world size and stage: each rank reads, from the files of
//! the saving ranks, the byte ranges its own window needs, after verifying those files' checksums.
//! Blocks saved split by tensor parallelism are addressed like whole ones (elements of the whole
//! block's flat buffer): each file's slices are mapped back to the whole parameters, so a checkpoint
//! resumes at any `parallel.tp`, and an engine split at any tp reads its slices of whole blocks.

use super::error::CheckpointError;
use super::format::*;
use super::safetensors_io::{read_f32_range, read_header, Header};
use crate::engine::Engine;
use crate::parallel::{local_pieces, whole_pieces, TpSplit};
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

/// The checkpoint `<root>/latest` names, if any. A `latest` that names a missing or incomplete
/// checkpoint is an error, not a fresh start: something removed what it pointed to.
pub fn latest(root: &Path) -> Result<Option<PathBuf>, CheckpointError> {
    let path = root.join(LATEST);
    let name = match std::fs::read_to_string(&path) {
        Ok(n) => n.trim().to_string(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(CheckpointError::io(&path, e)),
    };
    if parse_step_dir(&name).is_none() {
        return Err(CheckpointError::corrupt(&path, &format!("names {name:?}, which is not a checkpoint folder")));
    }
    let dir = root.join(&name);
    if !dir.join(META).is_file() {
        return Err(CheckpointError::NotFound { path: dir, reason: format!("{} names it but it has no {META}", path.display()) });
    }
    Ok(Some(dir))
}

/// A checkpoint folder, or a root whose `latest` names one.
pub fn resolve(path: &Path) -> Result<PathBuf, CheckpointError> {
    if path.join(META).is_file() {
        return Ok(path.to_path_buf());
    }
    latest(path)?.ok_or_else(|| CheckpointError::NotFound {
        path: path.to_path_buf(),
        reason: format!("neither {META} nor {LATEST} is there"),
    })
}

pub fn read_meta(dir: &Path) -> Result<Meta, CheckpointError> {
    let path = dir.join(META);
    let bytes = std::fs::read(&path).map_err(|e| CheckpointError::io(&path, e))?;
    let meta: Meta = serde_json::from_slice(&bytes).map_err(|e| CheckpointError::corrupt(&path, &e.to_string()))?;
    let split = meta.blocks.iter().any(|b| b.tp > 1);
    if meta.format_version != if split { FORMAT_VERSION_SPLIT } else { FORMAT_VERSION } {
        return Err(CheckpointError::corrupt(
            &path,
            &format!("format version {} with{} blocks split by tensor parallelism (this build reads {FORMAT_VERSION}, and {FORMAT_VERSION_SPLIT} with split blocks)", meta.format_version, if split { "" } else { "out" }),
        ));
    }
    if meta.files.len() != meta.world_size || meta.files.iter().any(|f| f.windows.len() != meta.blocks.len()) {
        return Err(CheckpointError::corrupt(&path, "the file list does not match the world size and blocks"));
    }
    Ok(meta)
}

/// Check one rank file against the checksum and size in `meta.json`.
pub fn verify_file(dir: &Path, file: &FileMeta) -> Result<(), CheckpointError> {
    let path = dir.join(&file.name);
    let (crc, bytes) = super::format::file_crc(&path).map_err(|e| CheckpointError::io(&path, e))?;
    if crc != file.crc32c || bytes != file.bytes {
        return Err(CheckpointError::Checksum { path, expected: file.crc32c, actual: crc, bytes, expected_bytes: file.bytes });
    }
    Ok(())
}

/// Read `meta.json` and verify every file of the checkpoint.
pub fn verify(dir: &Path) -> Result<Meta, CheckpointError> {
    let meta = read_meta(dir)?;
    for f in &meta.files {
        verify_file(dir, f)?;
    }
    Ok(meta)
}

/// Rank files opened on demand, each verified before its first read.
pub(crate) struct RankFiles<'a> {
    dir: &'a Path,
    meta: &'a Meta,
    open: HashMap<usize, (File, Header, PathBuf)>,
}

impl<'a> RankFiles<'a> {
    pub(crate) fn new(dir: &'a Path, meta: &'a Meta) -> Self {
        Self { dir, meta, open: HashMap::new() }
    }

    /// Read elements `[start, end)` of block `b`'s flat buffer (tensor `kind`: 0 master, then the
    /// optimizer's state buffers in `Meta::optimizer_state` order) into `out`, from whichever rank
    /// files hold them.
    pub(crate) fn read(&mut self, b: usize, kind: usize, start: usize, out: &mut [f32]) -> Result<(), CheckpointError> {
        if self.meta.blocks[b].tp > 1 {
            return self.read_split(b, kind, start, out);
        }
        let end = start + out.len();
        for fi in 0..self.meta.files.len() {
            let (o, len) = self.meta.files[fi].windows[b];
            let (lo, hi) = (start.max(o), end.min(o + len));
            if lo < hi {
                self.read_file(fi, b, kind, lo - o..hi - o, &mut out[lo - start..hi - start])?;
            }
        }
        Ok(())
    }

    /// Elements `range` of file `fi`'s part of block `b` (tensor `kind`), after verifying the file.
    fn read_file(&mut self, fi: usize, b: usize, kind: usize, range: std::ops::Range<usize>, out: &mut [f32]) -> Result<(), CheckpointError> {
        if !self.open.contains_key(&fi) {
            let file = &self.meta.files[fi];
            verify_file(self.dir, file)?;
            let path = self.dir.join(&file.name);
            let mut f = File::open(&path).map_err(|e| CheckpointError::io(&path, e))?;
            let header = read_header(&mut f, &path)?;
            self.open.insert(fi, (f, header, path));
        }
        let (f, header, path) = self.open.get_mut(&fi).expect("opened above");
        let name = &tensor_names(&self.meta.blocks[b].name, &self.meta.optimizer_state)[kind];
        read_f32_range(f, path, header, name, range, out)
    }

    /// [`RankFiles::read`] of a block saved split over tensor-parallel groups: for each parameter the
    /// range touches, the part each file's slice holds (a replicated parameter from the files of
    /// tensor-parallel rank 0), within the file's window of its slices' flat buffer.
    fn read_split(&mut self, b: usize, kind: usize, start: usize, out: &mut [f32]) -> Result<(), CheckpointError> {
        let block = &self.meta.blocks[b];
        let (tp, end) = (block.tp, start + out.len());
        let corrupt = |reason: String| CheckpointError::Corrupt { path: self.dir.join(META), reason };
        if block.splits.len() != block.params.len() {
            return Err(corrupt(format!("block {} lists {} splits for {} parameters", block.name, block.splits.len(), block.params.len())));
        }
        let mut pieces = Vec::new();
        let mut local_start = 0;
        for (p, name) in block.params.iter().zip(&block.splits) {
            let split = TpSplit::from_name(name).ok_or_else(|| corrupt(format!("block {} has a parameter split as {name:?}", block.name)))?;
            let numel: usize = p.shape.iter().product();
            let local_numel = split.local_shape(&p.shape, tp).ok_or_else(|| corrupt(format!("{}.{} of shape {:?} split {name} over {tp}", block.name, p.name, p.shape)))?.iter().product::<usize>();
            let rel = start.max(p.offset).saturating_sub(p.offset)..end.min(p.offset + numel).saturating_sub(p.offset);
            if rel.start < rel.end {
                for (fi, file) in self.meta.files.iter().enumerate() {
                    let (o, len) = file.windows[b];
                    if len == 0 || (split == TpSplit::Replicated && file.tp_rank != 0) {
                        continue;
                    }
                    for (l, off) in local_pieces(split, &p.shape, tp, file.tp_rank, rel.clone()) {
                        let (lo, hi) = ((local_start + l.start).max(o), (local_start + l.end).min(o + len));
                        if lo < hi {
                            let at = p.offset + rel.start + off + (lo - local_start - l.start) - start;
                            pieces.push((fi, lo - o..hi - o, at));
                        }
                    }
                }
            }
            local_start += local_numel;
        }
        for (fi, range, at) in pieces {
            let n = range.len();
            self.read_file(fi, b, kind, range, &mut out[at..at + n])?;
        }
        Ok(())
    }
}

/// Load the checkpoint in `dir` into `engine` (any world size, any stage). Every rank calls this.
pub fn load_into(engine: &mut Engine, dir: &Path) -> Result<Meta, CheckpointError> {
    let meta = read_meta(dir)?;
    check_model(engine, &meta, dir)?;
    let mut files = RankFiles::new(dir, &meta);
    // Each block of this engine is a block of the checkpoint (a pipeline stage holds some of them,
    // and its ghosts take their owners' state).
    let plan = engine.checkpoint_plan();
    let blocks: Vec<usize> = plan.local.iter().map(|&(b, _)| b).collect();
    // Where each of the engine's flat buffers starts in the checkpoint's block (an expert block's share).
    let offsets: Vec<usize> = plan.placement.iter().map(|&(_, o)| o).collect();
    // Block by block: a state larger than host memory (on the GPU, or NVMe) still resumes.
    let mut k = 0;
    // This engine's split blocks (tensor parallelism): their slices of the whole parameters.
    let m = engine.model();
    let shards: Vec<Option<crate::engine::TensorShard>> = (0..m.num_blocks()).map(|i| m.tensor_shard(i).cloned()).collect();
    let whole: Vec<crate::shard::FlatParam> = plan.blocks.iter().map(|(_, f)| f.clone()).collect();
    engine.overwrite_blocks(meta.step, meta.loss_scaler, |w| -> Result<(), CheckpointError> {
        let (b, offset) = (blocks[k], offsets[k]);
        let real_end = w.window.end.min(w.flat.numel());
        for (kind, dst) in std::iter::once(w.master).chain(w.state).enumerate() {
            // Zeroed by overwrite_blocks: the padding stays zero.
            if w.window.start >= real_end {
                continue;
            }
            match &shards[k] {
                None => files.read(b, kind, offset + w.window.start, &mut dst[..real_end - w.window.start])?,
                Some(t) => {
                    for (j, part) in w.flat.params_in(w.window.clone()) {
                        let local = w.flat.range(j).start;
                        for (piece, at) in whole_pieces(t.splits[j], &t.whole[j].shape, t.size, t.rank, part.start - local..part.end - local) {
                            let o = part.start - w.window.start + at - (part.start - local);
                            files.read(b, kind, whole[b].range(j).start + piece.start, &mut dst[o..o + piece.len()])?;
                        }
                    }
                }
            }
        }
        k += 1;
        Ok(())
    })?;
    Ok(meta)
}

fn check_model(engine: &Engine, meta: &Meta, dir: &Path) -> Result<(), CheckpointError> {
    let mismatch = |reason: String| CheckpointError::Mismatch { path: dir.to_path_buf(), reason };
    let state = super::save::state_names(engine);
    if meta.optimizer != engine.config().optimizer.name() || meta.optimizer_state != state {
        return Err(mismatch(format!(
            "it holds the state of {} ({}), this run uses {} ({}): train with the checkpoint's optimizer, or start from its weights with model.init_from after `ferrospeed checkpoint export`",
            meta.optimizer,
            meta.optimizer_state.join(", "),
            engine.config().optimizer.name(),
            state.join(", ")
        )));
    }
    let plan = engine.checkpoint_plan();
    if plan.blocks.len() != meta.blocks.len() {
        return Err(mismatch(format!("it has {} blocks, this model {}", meta.blocks.len(), plan.blocks.len())));
    }
    for ((name, flat), b) in plan.blocks.iter().zip(&meta.blocks) {
        if *name != b.name {
            return Err(mismatch(format!("block {} of the checkpoint is where this model has {}", b.name, name)));
        }
        let specs = flat.specs();
        if specs.len() != b.params.len() {
            return Err(mismatch(format!("block {} has {} parameters, this model's {}", b.name, b.params.len(), specs.len())));
        }
        for (j, (s, p)) in specs.iter().zip(&b.params).enumerate() {
            if s.name != p.name || s.shape != p.shape || flat.range(j).start != p.offset {
                return Err(mismatch(format!(
                    "parameter {}.{} has shape {:?} in the checkpoint but {}.{} has shape {:?} in this model",
                    b.name, p.name, p.shape, name, s.name, s.shape
                )));
            }
        }
    }
    Ok(())
}
