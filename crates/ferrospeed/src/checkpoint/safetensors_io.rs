//! Reading and writing the safetensors format ourselves, because checkpoints need what the crate's
//! whole-buffer API does not give: writing a header before the data exists (streaming export) and
//! reading byte ranges of one tensor (resharding) without loading the file.
//!
//! Format: u64 little-endian header length N, N bytes of JSON `{name: {dtype, shape, data_offsets}}`
//! (padded with spaces to 8 bytes), then the data; offsets are relative to the end of the header.

use super::error::CheckpointError;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::Path;

/// One tensor's entry in the header.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorInfo {
    pub dtype: String,
    pub shape: Vec<usize>,
    pub data_offsets: (usize, usize),
}

/// A parsed header: where the data starts in the file, and each tensor's entry.
#[derive(Debug, Clone)]
pub struct Header {
    pub data_start: u64,
    pub tensors: BTreeMap<String, TensorInfo>,
}

/// Build the header bytes for f32 tensors `(name, shape)` laid out back to back in the given order.
pub fn f32_header(tensors: &[(String, Vec<usize>)]) -> Result<Vec<u8>, CheckpointError> {
    header(tensors, "F32", 4, None)
}

/// The header for tensors of one element type (`dtype` its safetensors name, `size` its bytes) laid out
/// back to back, with an optional `__metadata__` map.
pub fn header(tensors: &[(String, Vec<usize>)], dtype: &str, size: usize, metadata: Option<serde_json::Value>) -> Result<Vec<u8>, CheckpointError> {
    let mut map = serde_json::Map::new();
    if let Some(m) = metadata {
        map.insert("__metadata__".into(), m);
    }
    let mut offset = 0usize;
    for (name, shape) in tensors {
        let bytes = shape.iter().product::<usize>() * size;
        let info = TensorInfo { dtype: dtype.into(), shape: shape.clone(), data_offsets: (offset, offset + bytes) };
        map.insert(name.clone(), serde_json::to_value(info).map_err(|e| CheckpointError::Format(e.to_string()))?);
        offset += bytes;
    }
    let mut json = serde_json::to_vec(&map).map_err(|e| CheckpointError::Format(e.to_string()))?;
    while (json.len() + 8) % 8 != 0 {
        json.push(b' ');
    }
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&json);
    Ok(out)
}

/// A safetensors file of f32 tensors written as their data comes: the header first (every name and
/// shape is known before any value), then each tensor's values in order, so that no more than one
/// tensor needs to be in memory at a time. The file is synced by [`F32Writer::finish`].
pub struct F32Writer {
    path: std::path::PathBuf,
    file: std::io::BufWriter<File>,
    layout: Vec<(String, Vec<usize>)>,
    /// The next tensor to write.
    next: usize,
}

impl F32Writer {
    /// Create `path` (replacing it) for the tensors of `layout`, in that order.
    pub fn create(path: &Path, layout: Vec<(String, Vec<usize>)>) -> Result<Self, CheckpointError> {
        let mut file = std::io::BufWriter::new(super::durable::create_file(path)?);
        file.write_all(&f32_header(&layout)?).map_err(|e| CheckpointError::io(path, e))?;
        Ok(Self { path: path.to_path_buf(), file, layout, next: 0 })
    }

    /// The values of the next tensor, which must have its shape's number of elements.
    pub fn push(&mut self, data: &[f32]) -> Result<(), CheckpointError> {
        let (name, shape) = self.layout.get(self.next).ok_or_else(|| CheckpointError::Format(format!("{}: more tensors than its header lists", self.path.display())))?;
        if data.len() != shape.iter().product::<usize>() {
            return Err(CheckpointError::Format(format!("{}: tensor {name} has {} values for shape {shape:?}", self.path.display(), data.len())));
        }
        self.file.write_all(f32_bytes(data)).map_err(|e| CheckpointError::io(&self.path, e))?;
        self.next += 1;
        Ok(())
    }

    /// Check that every tensor was written, flush and sync the file.
    pub fn finish(self) -> Result<(), CheckpointError> {
        if self.next != self.layout.len() {
            return Err(CheckpointError::Format(format!("{}: {} of {} tensors written", self.path.display(), self.next, self.layout.len())));
        }
        let file = self.file.into_inner().map_err(|e| CheckpointError::io(&self.path, e.into_error()))?;
        super::durable::sync_file(&file, &self.path)
    }
}

/// The bytes of an f32 slice (little-endian hosts; see `wire.rs` of the collectives).
pub fn f32_bytes(data: &[f32]) -> &[u8] {
    bytemuck::cast_slice(data)
}

/// Read and check the header of a safetensors file.
pub fn read_header(file: &mut File, path: &Path) -> Result<Header, CheckpointError> {
    let io = |e| CheckpointError::io(path, e);
    let file_len = file.metadata().map_err(io)?.len();
    let mut n = [0u8; 8];
    file.seek(SeekFrom::Start(0)).map_err(io)?;
    file.read_exact(&mut n).map_err(|_| CheckpointError::corrupt(path, "shorter than a safetensors header"))?;
    let n = u64::from_le_bytes(n);
    if n > 100 << 20 || 8 + n > file_len {
        return Err(CheckpointError::corrupt(path, &format!("header length {n} does not fit a file of {file_len} bytes")));
    }
    let mut json = vec![0u8; n as usize];
    file.read_exact(&mut json).map_err(io)?;
    let raw: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(&json).map_err(|e| CheckpointError::corrupt(path, &format!("header is not valid JSON: {e}")))?;
    let mut tensors = BTreeMap::new();
    for (name, value) in raw {
        if name == "__metadata__" {
            continue;
        }
        let info: TensorInfo =
            serde_json::from_value(value).map_err(|e| CheckpointError::corrupt(path, &format!("entry {name}: {e}")))?;
        if 8 + n + info.data_offsets.1 as u64 > file_len || info.data_offsets.0 > info.data_offsets.1 {
            return Err(CheckpointError::corrupt(path, &format!("tensor {name} lies beyond the end of the file (truncated?)")));
        }
        tensors.insert(name, info);
    }
    Ok(Header { data_start: 8 + n, tensors })
}

/// Read elements `range` of the f32 tensor `name` into `out`.
pub fn read_f32_range(file: &mut File, path: &Path, header: &Header, name: &str, range: Range<usize>, out: &mut [f32]) -> Result<(), CheckpointError> {
    let info = header
        .tensors
        .get(name)
        .ok_or_else(|| CheckpointError::corrupt(path, &format!("has no tensor {name}")))?;
    if info.dtype != "F32" {
        return Err(CheckpointError::corrupt(path, &format!("tensor {name} is {}, expected F32", info.dtype)));
    }
    let numel = (info.data_offsets.1 - info.data_offsets.0) / 4;
    if range.end > numel || out.len() != range.len() {
        return Err(CheckpointError::corrupt(path, &format!("tensor {name} has {numel} elements, elements {range:?} requested")));
    }
    let start = header.data_start + (info.data_offsets.0 + range.start * 4) as u64;
    file.seek(SeekFrom::Start(start)).map_err(|e| CheckpointError::io(path, e))?;
    file.read_exact(bytemuck::cast_slice_mut(out)).map_err(|e| CheckpointError::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_f32_file(path: &Path, tensors: &[(String, Vec<usize>, &[f32])]) -> Result<(), CheckpointError> {
        let mut w = F32Writer::create(path, tensors.iter().map(|(n, s, _)| (n.clone(), s.clone())).collect())?;
        tensors.iter().try_for_each(|(_, _, data)| w.push(data))?;
        w.finish()
    }

    #[test]
    fn the_streaming_writer_refuses_values_that_do_not_match_its_header() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        let layout = vec![("a".to_string(), vec![2, 2]), ("b".to_string(), vec![3])];
        let mut w = F32Writer::create(&path, layout.clone()).unwrap();
        assert!(w.push(&[1.0; 3]).unwrap_err().to_string().contains("tensor a has 3 values for shape [2, 2]"));
        w.push(&[1.0; 4]).unwrap();
        assert!(w.finish().unwrap_err().to_string().contains("1 of 2 tensors written"));
        let mut w = F32Writer::create(&path, layout).unwrap();
        w.push(&[1.0; 4]).unwrap();
        w.push(&[2.0; 3]).unwrap();
        assert!(w.push(&[0.0]).unwrap_err().to_string().contains("more tensors than its header lists"));
        w.finish().unwrap();
        let mut f = File::open(&path).unwrap();
        let h = read_header(&mut f, &path).unwrap();
        let mut b = [0f32; 3];
        read_f32_range(&mut f, &path, &h, "b", 0..3, &mut b).unwrap();
        assert_eq!(b, [2.0; 3]);
    }

    #[test]
    fn round_trip_and_ranges() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        let a: Vec<f32> = (0..10).map(|i| i as f32).collect();
        let b = vec![7.5f32; 3];
        write_f32_file(&path, &[("a".into(), vec![2, 5], &a), ("empty".into(), vec![0], &[]), ("b".into(), vec![3], &b)]).unwrap();
        let mut f = File::open(&path).unwrap();
        let h = read_header(&mut f, &path).unwrap();
        assert_eq!(h.data_start % 8, 0);
        assert_eq!(h.tensors["a"].shape, vec![2, 5]);
        let mut out = vec![0f32; 4];
        read_f32_range(&mut f, &path, &h, "a", 3..7, &mut out).unwrap();
        assert_eq!(out, vec![3.0, 4.0, 5.0, 6.0]);
        let mut out = vec![0f32; 3];
        read_f32_range(&mut f, &path, &h, "b", 0..3, &mut out).unwrap();
        assert_eq!(out, b);
        // The candle/safetensors crate reads what we wrote.
        let bytes = std::fs::read(&path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.tensor("b").unwrap().shape(), &[3]);
    }

    #[test]
    fn truncation_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        write_f32_file(&path, &[("a".into(), vec![100], &[1.0; 100])]).unwrap();
        let len = std::fs::metadata(&path).unwrap().len();
        std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(len - 8).unwrap();
        let err = read_header(&mut File::open(&path).unwrap(), &path).unwrap_err();
        assert!(err.to_string().contains("t.safetensors") && err.to_string().contains("truncated"), "{err}");
    }
}
