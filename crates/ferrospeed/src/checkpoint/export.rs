//! Export: stream a sharded checkpoint block by block into one consolidated safetensors file with the
//! model's conventional names; and the reverse, initialising an engine from such a file.
//!
//! Memory stays at about one block: the header is computed from `meta.json`, then each block's master
//! weights are assembled from the rank files and written before the next block is read.

use super::error::CheckpointError;
use super::load::{read_meta, verify};
use super::safetensors_io::{f32_bytes, f32_header, header};
use super::weights::{WeightDtype, WeightFiles};
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

/// What a transformers-style export writes besides the weights.
pub struct DirExport<'a> {
    /// Outside names of the parameters.
    pub name_of: NameMap<'a>,
    /// Element type of the written tensors.
    pub dtype: WeightDtype,
    /// Largest shard file, in bytes of tensor data (a tensor larger than this gets a shard alone).
    pub max_shard_bytes: u64,
    /// Other files of the directory (`config.json`, tokenizer files): name and contents.
    pub files: Vec<(String, Vec<u8>)>,
    /// The weights file's name when there is one (`model.safetensors` when `None`; a PEFT adapter's
    /// is `adapter_model.safetensors`).
    pub single_file: Option<&'a str>,
    /// How a block's parameters are written where not each as itself: the layout of the source
    /// where it splits or fuses what the model holds (experts: per-expert gate and up weights, or
    /// transformers 5's fused `[E, 2f, d]`).
    pub regroup: Option<Regroup<'a>>,
}

/// One tensor an export writes and where its values come from: pieces of its block's parameters
/// (index among them, element range in it), laid end to end.
#[derive(Debug, Clone, PartialEq)]
pub struct Written {
    /// The tensor's name in the directory.
    pub name: String,
    /// Its shape.
    pub shape: Vec<usize>,
    /// Its values: (parameter index in the block, element range of that parameter), in order.
    pub pieces: Vec<(usize, std::ops::Range<usize>)>,
}

/// Given a block's parameters (outside name and shape, in order), the tensors they are written as;
/// `None` writes each as itself.
pub type Regroup<'a> = &'a dyn Fn(&[(String, Vec<usize>)]) -> Option<Vec<Written>>;

/// Write the master weights of checkpoint `dir` as a directory transformers' `from_pretrained` loads:
/// `model.safetensors`, or `model-0000k-of-0000n.safetensors` shards of at most `max_shard_bytes`
/// with `model.safetensors.index.json`, plus `opts.files`. Streams block by block (about one block in
/// memory); everything is written into a temporary directory beside `out`, synced, then renamed, so
/// `out` appears complete or not at all. An existing non-empty `out` is refused.
pub fn export_dir(dir: &Path, out: &Path, opts: &DirExport<'_>) -> Result<ExportStats, CheckpointError> {
    verify(dir)?;
    let meta = read_meta(dir)?;
    // Each tensor written and where it lies: its block and the ranges of the block's flat buffer
    // it is made of.
    let mut tensors: Vec<(String, Vec<usize>)> = Vec::new();
    let mut places: Vec<(usize, Vec<std::ops::Range<usize>>)> = Vec::new();
    for (b, block) in meta.blocks.iter().enumerate() {
        let params: Vec<(String, Vec<usize>)> = block.params.iter().map(|p| ((opts.name_of)(&block.name, &p.name), p.shape.clone())).collect();
        let written = opts.regroup.and_then(|f| f(&params)).unwrap_or_else(|| {
            params.iter().enumerate().map(|(j, (name, shape))| Written { name: name.clone(), shape: shape.clone(), pieces: vec![(j, 0..shape.iter().product())] }).collect()
        });
        for w in written {
            let mut ranges = Vec::with_capacity(w.pieces.len());
            for (j, r) in &w.pieces {
                let p = block.params.get(*j).ok_or_else(|| CheckpointError::Format(format!("{}: parameter {j} of block {}, which has {}", w.name, block.name, block.params.len())))?;
                if r.end > p.shape.iter().product() {
                    return Err(CheckpointError::Format(format!("{}: elements {r:?} of {}.{} {:?}", w.name, block.name, p.name, p.shape)));
                }
                ranges.push(p.offset + r.start..p.offset + r.end);
            }
            let n: usize = ranges.iter().map(|r| r.len()).sum();
            if n != w.shape.iter().product::<usize>() {
                return Err(CheckpointError::Format(format!("{} {:?} written from {n} elements", w.name, w.shape)));
            }
            places.push((b, ranges));
            tensors.push((w.name, w.shape));
        }
    }
    let mut files = super::load::RankFiles::new(dir, &meta);
    let mut current: Option<(usize, Vec<f32>)> = None;
    let mut largest = 0;
    let mut stats = write_dir(out, &tensors, opts, |t, values| {
        let (b, ranges) = &places[t];
        let b = *b;
        if current.as_ref().map(|c| c.0) != Some(b) {
            let mut flat = vec![0f32; meta.blocks[b].numel];
            files.read(b, 0, 0, &mut flat)?;
            largest = largest.max(flat.len() * 4);
            current = Some((b, flat));
        }
        if let Some((_, flat)) = &current {
            let mut at = 0;
            for r in ranges {
                values[at..at + r.len()].copy_from_slice(&flat[r.clone()]);
                at += r.len();
            }
        }
        Ok(())
    })?;
    stats.largest_block_bytes = largest;
    Ok(stats)
}

/// Write `tensors` (name and shape, in order) as a transformers model directory at `out`, as
/// [`export_dir`] lays it out; `fill(t, values)` gives tensor `t`'s values in f32, in order.
pub fn write_dir(out: &Path, tensors: &[(String, Vec<usize>)], opts: &DirExport<'_>, mut fill: impl FnMut(usize, &mut [f32]) -> Result<(), CheckpointError>) -> Result<ExportStats, CheckpointError> {
    if out.exists() && std::fs::read_dir(out).map_or(true, |mut d| d.next().is_some()) {
        return Err(CheckpointError::Exists { path: out.to_path_buf() });
    }
    let size = opts.dtype.size() as u64;
    // Shards: consecutive tensors in export order, each shard at most max_shard_bytes.
    let mut shards: Vec<Vec<(String, Vec<usize>)>> = vec![Vec::new()];
    let mut shard_of = Vec::with_capacity(tensors.len());
    let mut used = 0u64;
    for (name, shape) in tensors {
        let bytes = shape.iter().product::<usize>() as u64 * size;
        if used > 0 && used + bytes > opts.max_shard_bytes {
            shards.push(Vec::new());
            used = 0;
        }
        if let Some(s) = shards.last_mut() {
            s.push((name.clone(), shape.clone()));
        }
        shard_of.push(shards.len() - 1);
        used += bytes;
    }
    let n = shards.len();
    let shard_name = |k: usize| if n == 1 { opts.single_file.unwrap_or(super::weights::SINGLE).to_string() } else { format!("model-{:05}-of-{n:05}.safetensors", k + 1) };
    let name = out.file_name().map_or_else(|| "export".into(), |f| f.to_string_lossy().into_owned());
    let tmp = out.with_file_name(format!(".{name}.partial"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| CheckpointError::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| CheckpointError::io(&tmp, e))?;
    let write_file = |name: &str, bytes: &[u8]| -> Result<(), CheckpointError> {
        let path = tmp.join(name);
        let mut f = std::fs::File::create(&path).map_err(|e| CheckpointError::io(&path, e))?;
        f.write_all(bytes).map_err(|e| CheckpointError::io(&path, e))?;
        f.sync_all().map_err(|e| CheckpointError::io(&path, e))
    };
    let (mut total, mut count) = (0u64, 0usize);
    let mut weight_map = serde_json::Map::new();
    let mut current: Option<(usize, std::io::BufWriter<std::fs::File>, std::path::PathBuf)> = None;
    let mut bytes = Vec::new();
    for (t, (tensor, shape)) in tensors.iter().enumerate() {
        let k = shard_of[t];
        if current.as_ref().map(|c| c.0) != Some(k) {
            if let Some((_, w, path)) = current.take() {
                finish_shard(w, &path)?;
            }
            let path = tmp.join(shard_name(k));
            let io = |e| CheckpointError::io(&path, e);
            let mut w = std::io::BufWriter::new(std::fs::File::create(&path).map_err(io)?);
            let h = header(&shards[k], opts.dtype.name(), size as usize, Some(serde_json::json!({"format": "pt"})))?;
            w.write_all(&h).map_err(io)?;
            current = Some((k, w, path));
        }
        let mut values = vec![0f32; shape.iter().product()];
        fill(t, &mut values)?;
        bytes.clear();
        opts.dtype.encode(&values, &mut bytes);
        if let Some((_, w, path)) = current.as_mut() {
            w.write_all(&bytes).map_err(|e| CheckpointError::io(path, e))?;
        }
        weight_map.insert(tensor.clone(), shard_name(k).into());
        total += bytes.len() as u64;
        count += 1;
    }
    if let Some((_, w, path)) = current.take() {
        finish_shard(w, &path)?;
    }
    if n > 1 {
        let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        let text = serde_json::to_vec_pretty(&index).map_err(|e| CheckpointError::Format(e.to_string()))?;
        write_file(super::weights::INDEX, &text)?;
    }
    for (name, contents) in &opts.files {
        write_file(name, contents)?;
    }
    std::fs::File::open(&tmp).and_then(|d| d.sync_all()).map_err(|e| CheckpointError::io(&tmp, e))?;
    if out.exists() {
        // An empty directory the user made: replaced by the complete export.
        std::fs::remove_dir(out).map_err(|e| CheckpointError::io(out, e))?;
    }
    std::fs::rename(&tmp, out).map_err(|e| CheckpointError::io(out, e))?;
    Ok(ExportStats { tensors: count, bytes: total, largest_block_bytes: 0 })
}

fn finish_shard(w: std::io::BufWriter<std::fs::File>, path: &Path) -> Result<(), CheckpointError> {
    let file = w.into_inner().map_err(|e| CheckpointError::io(path, e.into_error()))?;
    file.sync_all().map_err(|e| CheckpointError::io(path, e))
}

/// What an import read and held.
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize)]
pub struct ImportStats {
    /// Bytes read from the weight files by this rank.
    pub bytes_read: u64,
    /// The largest block state this rank holds (master weights and optimizer state of its window), in
    /// bytes: on a GPU the host holds one block at a time, at most this much.
    pub largest_block_bytes: usize,
}

/// Initialise `engine`'s parameters (those `scope` names) from weight files (moments zero, step 0): one safetensors
/// file, or a directory as transformers writes it (`model.safetensors` or a sharded index), in F32,
/// BF16 or F16. Every rank calls this and reads only its window of each parameter, block by block
/// (on a GPU each block goes to the device before the next is read).
pub fn load_consolidated(engine: &mut Engine, path: &Path, name_of: NameMap<'_>, scope: ImportScope) -> Result<ImportStats, CheckpointError> {
    load_consolidated_from(engine, WeightFiles::open(path)?, path, name_of, scope)
}

/// [`load_consolidated`] from weight files already open (`path`: where they are, for messages), e.g.
/// with tensors a family presents in its own layout ([`WeightFiles::concat`]).
pub fn load_consolidated_from(engine: &mut Engine, mut files: WeightFiles, path: &Path, name_of: NameMap<'_>, scope: ImportScope) -> Result<ImportStats, CheckpointError> {
    let mut stats = ImportStats::default();
    // Blocks split over a tensor-parallel group read their slices of the whole tensors.
    let m = engine.model();
    let split: std::collections::HashMap<String, crate::engine::TensorShard> =
        (0..m.num_blocks()).filter_map(|i| m.tensor_shard(i).map(|t| (m.block_names()[i].clone(), t.clone()))).collect();
    if scope != ImportScope::Frozen {
        engine.overwrite_blocks(0, None, |w| -> Result<(), CheckpointError> {
            stats.largest_block_bytes = stats.largest_block_bytes.max(w.master.len() * 4 * (1 + w.state.len()));
            read_window(&mut files, path, name_of, w.block, w.flat, split.get(w.block), w.window, w.master, &mut stats)
        })?;
    }
    if scope != ImportScope::Trainable {
        engine.overwrite_frozen(|w| read_window(&mut files, path, name_of, w.block, w.flat, None, w.window, w.values, &mut stats))?;
    }
    Ok(stats)
}

/// Which parameters an import fills.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ImportScope {
    /// Every parameter, trainable and frozen (a model's weights).
    #[default]
    All,
    /// The frozen ones alone (the base of an adapter, whose own tensors the file does not hold): the
    /// trainable ones keep their initial values.
    Frozen,
    /// The trainable ones alone (an adapter over a base already loaded).
    Trainable,
}

/// Read `window` of a block's flat buffer (`flat`) from the weight files into `dst`, parameter by
/// parameter; a block split over a tensor-parallel group (`split`) reads its slices of the whole tensors.
#[allow(clippy::too_many_arguments)]
fn read_window(files: &mut WeightFiles, path: &Path, name_of: NameMap<'_>, block: &str, flat: &crate::shard::FlatParam, split: Option<&crate::engine::TensorShard>, window: std::ops::Range<usize>, dst: &mut [f32], stats: &mut ImportStats) -> Result<(), CheckpointError> {
    for (j, part) in flat.params_in(window.clone()) {
        let spec = split.map_or(&flat.specs()[j], |t| &t.whole[j]);
        let name = name_of(block, &spec.name);
        let info = files.info(&name).ok_or_else(|| CheckpointError::Mismatch {
            path: path.to_path_buf(),
            reason: format!("it has no tensor {name} (parameter {block}.{})", spec.name),
        })?;
        if info.shape != spec.shape {
            return Err(CheckpointError::Mismatch {
                path: path.to_path_buf(),
                reason: format!("{name} has shape {:?} in the file but {:?} in this model", info.shape, spec.shape),
            });
        }
        stats.bytes_read += (part.len() * info.dtype.size()) as u64;
        let start = flat.range(j).start;
        let local = part.start - start..part.end - start;
        let out = &mut dst[part.start - window.start..part.end - window.start];
        match split {
            None => files.read_f32(&name, local, out)?,
            Some(t) => {
                for (whole, at) in crate::parallel::whole_pieces(t.splits[j], &spec.shape, t.size, t.rank, local.clone()) {
                    let o = at - local.start;
                    files.read_f32(&name, whole.clone(), &mut out[o..o + whole.len()])?;
                }
            }
        }
    }
    Ok(())
}
