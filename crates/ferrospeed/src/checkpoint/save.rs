//! Saving a checkpoint, collectively: every rank writes its shard into a temporary folder; rank 0
//! writes `meta.json` with every file's checksum, renames the folder into place, then replaces
//! `latest` — each step synced, so a checkpoint is either complete and verified, or invisible.
//!
//! The file-system steps and the named phases between them are in `durable.rs`; the CLI's tests
//! replay their trace under a power-loss model and abort a save at every phase.

use super::durable::{self, fault_point, SavePhase};
use super::error::CheckpointError;
use super::format::*;
use super::safetensors_io::F32Writer;
use crate::comm::{CommExt, CommError};
use crate::engine::Engine;
use std::path::{Path, PathBuf};

/// What to save, besides the engine's state.
pub struct SaveRequest<'a> {
    pub root: &'a Path,
    pub samples: u64,
    /// Complete checkpoints to keep (the oldest are removed); at least 1.
    pub keep: usize,
    /// Also keep the checkpoint whose `run.eval_loss` is the lowest, and name it in [`BEST`].
    pub keep_best: bool,
    pub run: serde_json::Value,
}

/// The file naming the checkpoint with the lowest held-out loss (`checkpoint.keep_best`).
pub const BEST: &str = "best";

/// Save the engine's state under `req.root`; every rank must call this. Returns the checkpoint folder.
/// State on a GPU or in NVMe files is read block by block, never all of it into host memory.
/// A save that fails leaves nothing: its temporary folder is removed; a disk too small for it is
/// [`CheckpointError::DiskFull`], checked before anything is written and when a write finds it full.
pub fn save(engine: &mut Engine, req: &SaveRequest<'_>) -> Result<PathBuf, CheckpointError> {
    let (rank, world) = (engine.comm().rank(), engine.comm().world_size());
    let step = engine.steps_done();
    let final_dir = req.root.join(step_dir_name(step));
    let tmp = req.root.join(format!(".tmp-{}", step_dir_name(step)));
    let needed = checkpoint_bytes(engine);
    let full = |free: u64| CheckpointError::DiskFull { dir: req.root.to_path_buf(), step, needed_mb: needed.div_ceil(1_000_000), free_mb: free / 1_000_000 };
    // Rank 0 prepares the temporary folder (a stale one from a crash is only ever garbage), once it
    // knows the disk can hold the checkpoint beside the ones it keeps.
    let prepared = if rank == 0 {
        durable::create_dir_all(req.root)
            .and_then(|()| if tmp.exists() { durable::remove_dir_all(&tmp).map_err(|e| CheckpointError::io(&tmp, e)) } else { Ok(()) })
            .and_then(|()| match crate::device::disk_free_bytes(req.root) {
                Ok(free) if free < needed => Err(full(free)),
                _ => Ok(()),
            })
            .and_then(|()| durable::create_dir(&tmp))
    } else {
        Ok(())
    };
    let saved = agree(engine, prepared.is_ok()).and(prepared).and_then(|()| save_into(engine, req, &tmp, &final_dir, rank, world));
    match saved {
        Ok(()) => Ok(final_dir),
        Err(e) => {
            // Every rank is past its writes here (each failure is agreed on before anyone returns):
            // rank 0 removes what the save wrote.
            if rank == 0 && tmp.exists() {
                let _ = durable::remove_dir_all(&tmp);
            }
            Err(if is_disk_full(&e) { full(crate::device::disk_free_bytes(req.root).unwrap_or(0)) } else { e })
        }
    }
}

/// Sizes that stand for a rank's failure to write its file in the exchange of (crc, size).
const FAILED: u64 = u64::MAX;
const DISK_FULL: u64 = u64::MAX - 1;

/// Whether `e` is a write that found the disk (or the user's quota) full.
fn is_disk_full(e: &CheckpointError) -> bool {
    matches!(e, CheckpointError::Io { source, .. } if matches!(source.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)))
}

/// Bytes of a checkpoint of `engine` over every rank: the master weights and optimizer state of
/// every parameter (headers and `meta.json` are small beside them; a page each is allowed).
fn checkpoint_bytes(engine: &Engine) -> u64 {
    let per_elem = 4 * (1 + state_names(engine).len()) as u64;
    let world = engine.comm().world_size() as u64;
    engine.checkpoint_plan().blocks.iter().map(|(_, f)| f.numel() as u64 * per_elem).sum::<u64>() + (world + 1) * 64 * 1024
}

/// The save after the temporary folder exists: every rank's file, then rank 0 publishes.
fn save_into(engine: &mut Engine, req: &SaveRequest<'_>, tmp: &Path, final_dir: &Path, rank: usize, world: usize) -> Result<(), CheckpointError> {
    let step = engine.steps_done();
    // A failure to read the state (from the device or a file) is this rank's write failing: every
    // rank learns of it below, and nothing is published.
    let written = match durable::injected_enospc(step, rank) {
        Some(e) => Err(CheckpointError::io(&tmp.join(rank_file_name(rank, world)), e)),
        None => write_rank_file(engine, tmp, rank, world),
    };
    let engine = &*engine;
    if written.is_ok() {
        fault_point(SavePhase::ShardsWritten, step, rank);
    }
    let (crc, bytes) = match &written {
        Ok(v) => *v,
        Err(e) if is_disk_full(e) => (0, DISK_FULL),
        Err(_) => (0, FAILED),
    };
    // Every rank's (crc, size) to rank 0, as exact 16-bit pieces in f32; size FAILED or DISK_FULL
    // marks a failure.
    let pieces = encode(crc, bytes);
    let all = engine
        .comm()
        .run(move |c| {
            let mut out = vec![0f32; 6 * c.world_size()];
            c.all_gather_slice(&pieces, &mut out).map(|()| out)
        })?
        .map_err(comm_err)?;
    written?;
    let files: Vec<(u32, u64)> = all.chunks(6).map(decode).collect();
    // A full disk on any rank is every rank's answer (the launcher may report any rank's exit).
    if let Some(r) = files.iter().position(|(_, b)| *b == DISK_FULL) {
        return Err(CheckpointError::io(&tmp.join(rank_file_name(r, world)), std::io::Error::from_raw_os_error(libc::ENOSPC)));
    }
    if let Some(r) = files.iter().position(|(_, b)| *b == FAILED) {
        return Err(CheckpointError::Format(format!("rank {r} could not write its checkpoint file; nothing was published")));
    }
    let published = if rank == 0 { publish(engine, req, tmp, final_dir, &files) } else { Ok(()) };
    agree(engine, published.is_ok())?;
    published
}

/// This rank's file: each block's shard read and written in turn, so that host memory holds one
/// block's state at a time (its state may be on the GPU or on NVMe, larger than the host).
fn write_rank_file(engine: &mut Engine, dir: &Path, rank: usize, world: usize) -> Result<(u32, u64), CheckpointError> {
    let names = state_names(engine);
    let plan = engine.checkpoint_plan();
    // This rank's shard of a block in the saving group's layout (the data-parallel rank's), real
    // elements only, relative to the window this rank holds.
    let local = |k: usize, flat: &crate::shard::FlatParam, window: &std::ops::Range<usize>| {
        let r = flat.layout().range(plan.placement[k].0);
        r.start.saturating_sub(window.start)..r.end.saturating_sub(window.start)
    };
    let mut layout = Vec::new();
    for (k, (b, &(_, saved))) in engine.layouts().into_iter().zip(&plan.local).enumerate() {
        if saved {
            let n = local(k, b.flat, &b.window).len();
            layout.extend(tensor_names(b.block, &names).into_iter().map(|name| (name, vec![n])));
        }
    }
    let path = dir.join(rank_file_name(rank, world));
    let mut file = F32Writer::create(&path, layout)?;
    let mut k = 0;
    engine.read_blocks(|w| -> Result<(), CheckpointError> {
        let saved = plan.local[k].1;
        k += 1;
        if !saved {
            return Ok(());
        }
        let local = local(k - 1, w.flat, &w.window);
        std::iter::once(w.master).chain(w.state.iter().copied()).try_for_each(|data| file.push(&data[local.clone()]))
    })?;
    file.finish()?;
    file_crc(&path).map_err(|e| CheckpointError::io(&path, e))
}

fn publish(engine: &Engine, req: &SaveRequest<'_>, tmp: &Path, final_dir: &Path, files: &[(u32, u64)]) -> Result<(), CheckpointError> {
    let world = files.len();
    let plan = engine.checkpoint_plan();
    let cfg = engine.config();
    let split_of = |b: usize| plan.tensor.as_ref().and_then(|t| t.splits[b].as_ref());
    let meta = Meta {
        // Split blocks' windows are in slice coordinates: a version older builds refuse.
        format_version: if plan.tensor.as_ref().is_some_and(|t| t.splits.iter().any(Option::is_some)) { FORMAT_VERSION_SPLIT } else { FORMAT_VERSION },
        step: engine.steps_done(),
        samples: req.samples,
        world_size: world,
        zero_stage: cfg.strategy.stage.as_int(),
        precision: cfg.precision.to_string(),
        loss_scaler: engine.scaler_state(),
        optimizer: cfg.optimizer.name().to_string(),
        optimizer_state: state_names(engine),
        blocks: plan
            .blocks
            .iter()
            .enumerate()
            .map(|(b, (name, flat))| BlockMeta {
                tp: split_of(b).map_or(1, |_| plan.tensor.as_ref().map_or(1, |t| t.tp)),
                splits: split_of(b).map_or_else(Vec::new, |s| s.iter().map(|x| x.name().to_string()).collect()),
                name: name.clone(),
                numel: flat.numel(),
                params: flat
                    .specs()
                    .iter()
                    .enumerate()
                    .map(|(j, s)| ParamMeta { name: s.name.clone(), shape: s.shape.clone(), offset: flat.range(j).start })
                    .collect(),
            })
            .collect(),
        files: files
            .iter()
            .enumerate()
            .map(|(r, (crc, bytes))| FileMeta {
                name: rank_file_name(r, world),
                rank: r,
                bytes: *bytes,
                crc32c: *crc,
                windows: plan.files[r].iter().map(|w| (w.start, w.len())).collect(),
                tp_rank: plan.tensor.as_ref().map_or(0, |t| t.file_tp_rank[r]),
            })
            .collect(),
        run: req.run.clone(),
    };
    let meta_path = tmp.join(META);
    let json = serde_json::to_vec_pretty(&meta).map_err(|e| CheckpointError::Format(e.to_string()))?;
    durable::write_synced(&meta_path, &json)?;
    fault_point(SavePhase::MetaWritten, meta.step, 0);
    durable::sync_dir(tmp)?;
    fault_point(SavePhase::BeforeRename, meta.step, 0);
    move_into_place(req.root, tmp, final_dir, meta.step)?;
    fault_point(SavePhase::AfterRename, meta.step, 0);
    durable::sync_dir(req.root)?;
    let latest_tmp = req.root.join(".latest.tmp");
    durable::write_synced(&latest_tmp, format!("{}\n", step_dir_name(meta.step)).as_bytes())?;
    fault_point(SavePhase::BeforeLatest, meta.step, 0);
    durable::rename(&latest_tmp, &req.root.join(LATEST))?;
    fault_point(SavePhase::AfterLatest, meta.step, 0);
    durable::sync_dir(req.root)?;
    let best = if req.keep_best { mark_best(req.root, meta.step)? } else { None };
    prune(req.root, req.keep.max(1), meta.step, best)
}

/// The step of the complete checkpoint with the lowest `run.eval_loss` in its `meta.json` (the
/// earliest of equals; none after `current`, which another run may have left), named in [`BEST`]
/// (written like `latest`: synced, then renamed into place).
fn mark_best(root: &Path, current: u64) -> Result<Option<u64>, CheckpointError> {
    let score = |dir: &Path| -> Option<f64> {
        let meta: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join(META)).ok()?).ok()?;
        meta["run"]["eval_loss"].as_f64().filter(|l| l.is_finite())
    };
    let best = list_checkpoints(root).into_iter().filter(|(step, _)| *step <= current).filter_map(|(step, dir)| score(&dir).map(|s| (step, s))).fold(None, |b: Option<(u64, f64)>, (step, s)| match b {
        Some((_, bs)) if bs <= s => b,
        _ => Some((step, s)),
    });
    let Some((step, _)) = best else { return Ok(None) };
    let tmp = root.join(".best.tmp");
    durable::write_synced(&tmp, format!("{}\n", step_dir_name(step)).as_bytes())?;
    durable::rename(&tmp, &root.join(BEST))?;
    durable::sync_dir(root)?;
    Ok(Some(step))
}

/// Rename the synced temporary folder to its final name. If that name is taken (the same step saved
/// again, e.g. by a new run into the same folder), the two are swapped atomically where the system
/// can (Linux: ext4, xfs, btrfs, tmpfs), so `latest` never names a missing folder. Elsewhere the old
/// one is retired first, which leaves a moment in which a crash could leave `latest` naming a missing
/// folder (loading then says so). The old copy is deleted only after the swap is durable, so a crash
/// never shows it half-deleted.
fn move_into_place(root: &Path, tmp: &Path, final_dir: &Path, step: u64) -> Result<(), CheckpointError> {
    if !final_dir.exists() {
        return durable::rename(tmp, final_dir);
    }
    let old = if durable::exchange(tmp, final_dir)? {
        tmp.to_path_buf()
    } else {
        let retired = root.join(format!(".old-{}", step_dir_name(step)));
        if retired.exists() {
            durable::remove_dir_all(&retired).map_err(|e| CheckpointError::io(&retired, e))?;
        }
        durable::rename(final_dir, &retired)?;
        durable::rename(tmp, final_dir)?;
        retired
    };
    durable::sync_dir(root)?;
    let _ = durable::remove_dir_all(&old);
    Ok(())
}

/// Remove the oldest complete checkpoints beyond `keep` (never `current`): renamed away first and the
/// rename made durable, so a half-deleted folder is never taken for a checkpoint, even after a crash.
fn prune(root: &Path, keep: usize, current: u64, best: Option<u64>) -> Result<(), CheckpointError> {
    // The best one, when it is not among the `keep` latest, is kept beside them.
    let mut all = list_checkpoints(root);
    if let Some(b) = best.filter(|b| all.iter().rev().take(keep).all(|(step, _)| step != b)) {
        all.retain(|(step, _)| *step != b);
    }
    let excess = all.len().saturating_sub(keep);
    let mut doomed = Vec::new();
    for (step, path) in all.into_iter().take(excess) {
        if step == current {
            continue;
        }
        let to = root.join(format!(".del-{}", step_dir_name(step)));
        if to.exists() {
            let _ = durable::remove_dir_all(&to);
        }
        if durable::rename(&path, &to).is_ok() {
            doomed.push(to);
        }
    }
    if doomed.is_empty() {
        return Ok(());
    }
    durable::sync_dir(root)?;
    fault_point(SavePhase::Pruning, current, 0);
    for path in doomed {
        let _ = durable::remove_dir_all(&path);
    }
    Ok(())
}

/// All ranks learn whether every rank succeeded (so none waits in a collective for a failed peer).
fn agree(engine: &Engine, ok: bool) -> Result<(), CheckpointError> {
    let all_ok = engine
        .comm()
        .run(move |c| {
            let mut flag = [if ok { 0f32 } else { 1.0 }];
            c.all_reduce_slice(&mut flag, crate::comm::ReduceOp::Max).map(|()| flag[0] == 0.0)
        })?
        .map_err(comm_err)?;
    if all_ok || !ok {
        Ok(())
    } else {
        Err(CheckpointError::Format("another rank failed while saving the checkpoint; nothing was published".into()))
    }
}

fn comm_err(e: CommError) -> CheckpointError {
    CheckpointError::Engine(e.into())
}

fn encode(crc: u32, bytes: u64) -> [f32; 6] {
    let parts = [crc & 0xFFFF, crc >> 16, (bytes & 0xFFFF) as u32, ((bytes >> 16) & 0xFFFF) as u32, ((bytes >> 32) & 0xFFFF) as u32, (bytes >> 48) as u32];
    parts.map(|p| p as f32)
}

fn decode(p: &[f32]) -> (u32, u64) {
    let u = |i: usize| p[i] as u64;
    ((u(0) | (u(1) << 16)) as u32, u(2) | (u(3) << 16) | (u(4) << 32) | (u(5) << 48))
}

#[cfg(test)]
mod tests {
    #[test]
    fn checksum_and_size_survive_the_f32_encoding() {
        for (crc, bytes) in [(0u32, 0u64), (u32::MAX, u64::MAX), (0xDEAD_BEEF, 123_456_789_012)] {
            assert_eq!(super::decode(&super::encode(crc, bytes)), (crc, bytes));
        }
    }
}

/// The engine's optimizer state names, as checkpoints record them.
pub(crate) fn state_names(engine: &Engine) -> Vec<String> {
    engine.config().optimizer.state_names().iter().map(|s| s.to_string()).collect()
}
