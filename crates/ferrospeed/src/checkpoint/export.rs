//! Export: stream a sharded checkpoint block by block into one consolidated safetensors file with the
//! model's conventional names; and the reverse, initialising an engine from such a file.
//!
//! Memory stays at about one block: the header is computed from `meta.json`, then each block's master
//! weights are assembled from the rank files and written before the next block is read.

use super::error::CheckpointError;
use super::load::{read_meta, verify};
use super::safetensors_io::{f32_bytes, f32_header, read_f32_range, read_header};
use crate::engine::Engine;
use std::io::Write;
use std::path::Path;

/// Maps `(block, parameter)` to the exported name.
pub type NameMap<'a> = &'a dyn Fn(&str, &str) -> String;

/// What an export wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportStats {
    pub tensors: usize,
    pub bytes: u64,
    /// The largest block assembled in memory, in bytes.
    pub largest_block_bytes: usize,
}

/// Write the master weights of checkpoint `dir` to `out` (written to a temporary file, then renamed).
pub fn export(dir: &Path, out: &Path, name_of: NameMap<'_>) -> Result<ExportStats, CheckpointError> {
    verify(dir)?;
    let meta = read_meta(dir)?;
    let entries: Vec<(String, Vec<usize>)> =
        meta.blocks.iter().flat_map(|b| b.params.iter().map(|p| (name_of(&b.name, &p.name), p.shape.clone()))).collect();
    let header = f32_header(&entries)?;
    let tmp = out.with_extension("safetensors.partial");
    let io = |e| CheckpointError::io(&tmp, e);
    let mut writer = std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(io)?);
    writer.write_all(&header).map_err(io)?;
    let mut files = super::load::RankFiles::new(dir, &meta);
    let mut largest = 0;
    for (b, block) in meta.blocks.iter().enumerate() {
        let mut flat = vec![0f32; block.numel];
        files.read(b, 0, 0, &mut flat)?;
        largest = largest.max(flat.len() * 4);
        for p in &block.params {
            let n: usize = p.shape.iter().product();
            writer.write_all(f32_bytes(&flat[p.offset..p.offset + n])).map_err(io)?;
        }
    }
    let file = writer.into_inner().map_err(|e| CheckpointError::io(&tmp, e.into_error()))?;
    file.sync_all().map_err(io)?;
    let bytes = file.metadata().map_err(io)?.len();
    std::fs::rename(&tmp, out).map_err(|e| CheckpointError::io(out, e))?;
    Ok(ExportStats { tensors: entries.len(), bytes, largest_block_bytes: largest })
}

/// Initialise `engine`'s master weights from a consolidated file (moments zero, step 0). Every rank
/// calls this and reads only its window of each parameter.
pub fn load_consolidated(engine: &mut Engine, path: &Path, name_of: NameMap<'_>) -> Result<(), CheckpointError> {
    let mut file = std::fs::File::open(path).map_err(|e| CheckpointError::io(path, e))?;
    let header = read_header(&mut file, path)?;
    for mut w in engine.windows_mut()? {
        w.state.iter_mut().for_each(|s| s.fill(0.0));
        w.master.fill(0.0);
        for (j, part) in w.flat.params_in(w.window.clone()) {
            let spec = &w.flat.specs()[j];
            let name = name_of(w.block, &spec.name);
            let info = header.tensors.get(&name).ok_or_else(|| CheckpointError::Mismatch {
                path: path.to_path_buf(),
                reason: format!("it has no tensor {name} (parameter {}.{})", w.block, spec.name),
            })?;
            if info.shape != spec.shape {
                return Err(CheckpointError::Mismatch {
                    path: path.to_path_buf(),
                    reason: format!("{name} has shape {:?} in the file but {:?} in this model", info.shape, spec.shape),
                });
            }
            let start = w.flat.range(j).start;
            let dst = &mut w.master[part.start - w.window.start..part.end - w.window.start];
            read_f32_range(&mut file, path, &header, &name, part.start - start..part.end - start, dst)?;
        }
    }
    engine.finish_restore(0, None)?;
    Ok(())
}
