//! Weight files as transformers writes them: one `.safetensors` file, or a directory holding
//! `model.safetensors` or a sharded `model.safetensors.index.json` (its `weight_map` names the shard of
//! every tensor). Tensors are read by element ranges, converted from F32, BF16 or F16 to f32 on the
//! way, so a rank reads only the bytes its own window needs and never holds a whole tensor it does not
//! own (`load_consolidated`). A `.gguf` file (llama.cpp) is read through [`super::gguf`]: dequantised
//! a tensor at a time, under transformers' names.

use super::error::CheckpointError;
use super::safetensors_io::{read_header, Header, TensorInfo};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::ops::Range;
use std::path::{Path, PathBuf};

/// The index file of a sharded checkpoint.
pub const INDEX: &str = "model.safetensors.index.json";
/// The single file of an unsharded checkpoint.
pub const SINGLE: &str = "model.safetensors";

/// The element types a weight file may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightDtype {
    F32,
    Bf16,
    F16,
}

impl WeightDtype {
    /// The safetensors name (`"F32"`, `"BF16"`, `"F16"`).
    pub fn name(self) -> &'static str {
        match self {
            WeightDtype::F32 => "F32",
            WeightDtype::Bf16 => "BF16",
            WeightDtype::F16 => "F16",
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            WeightDtype::F32 => 4,
            WeightDtype::Bf16 | WeightDtype::F16 => 2,
        }
    }

    fn parse(name: &str) -> Option<Self> {
        [WeightDtype::F32, WeightDtype::Bf16, WeightDtype::F16].into_iter().find(|d| d.name() == name)
    }

    /// `values` encoded in this type, little-endian (rounding to nearest even).
    pub fn encode(self, values: &[f32], out: &mut Vec<u8>) {
        match self {
            WeightDtype::F32 => out.extend_from_slice(bytemuck::cast_slice(values)),
            WeightDtype::Bf16 => values.iter().for_each(|v| out.extend_from_slice(&half::bf16::from_f32(*v).to_le_bytes())),
            WeightDtype::F16 => values.iter().for_each(|v| out.extend_from_slice(&half::f16::from_f32(*v).to_le_bytes())),
        }
    }
}

/// One tensor of a weight set: its file and header entry.
#[derive(Debug, Clone)]
pub struct WeightInfo {
    pub file: usize,
    pub dtype: WeightDtype,
    pub shape: Vec<usize>,
    data_start: u64,
}

/// An opened set of weight files (headers read, data not).
#[derive(Debug)]
pub struct WeightFiles {
    paths: Vec<PathBuf>,
    files: Vec<File>,
    tensors: BTreeMap<String, WeightInfo>,
    gguf: Option<super::gguf::GgufWeights>,
    /// Tensors made of pieces of others laid end to end (`WeightFiles::concat`, `WeightFiles::slice`):
    /// each piece's tensor and element range, in order.
    views: BTreeMap<String, Vec<(String, Range<usize>)>>,
}

#[derive(serde::Deserialize)]
struct Index {
    weight_map: BTreeMap<String, String>,
}

impl WeightFiles {
    /// Open a `.safetensors` file, or a directory with `model.safetensors` or `model.safetensors.index.json`.
    /// Every shard the index names must exist; headers are checked against the file sizes.
    pub fn open(path: &Path) -> Result<Self, CheckpointError> {
        if path.extension().is_some_and(|e| e == "gguf") && path.is_file() {
            let g = super::gguf::GgufWeights::open(path)?;
            let tensors = g.tensors.iter().map(|(n, m)| (n.clone(), WeightInfo { file: 0, dtype: WeightDtype::F32, shape: m.shape.clone(), data_start: 0 })).collect();
            return Ok(Self { paths: vec![path.to_path_buf()], files: Vec::new(), tensors, gguf: Some(g), views: BTreeMap::new() });
        }
        if !path.is_dir() {
            return Self::from_files(vec![path.to_path_buf()], None);
        }
        let index = path.join(INDEX);
        if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|e| CheckpointError::io(&index, e))?;
            let parsed: Index = serde_json::from_str(&text).map_err(|e| CheckpointError::corrupt(&index, &format!("is not a safetensors index: {e}")))?;
            let mut shards: Vec<String> = parsed.weight_map.values().cloned().collect();
            shards.sort();
            shards.dedup();
            for shard in &shards {
                if !path.join(shard).is_file() {
                    return Err(CheckpointError::NotFound {
                        path: path.join(shard),
                        reason: format!("{INDEX} names this shard but it is missing: copy it into {}", path.display()),
                    });
                }
            }
            return Self::from_files(shards.iter().map(|s| path.join(s)).collect(), Some((&index, &parsed.weight_map)));
        }
        let single = path.join(SINGLE);
        if single.is_file() {
            return Self::from_files(vec![single], None);
        }
        Err(CheckpointError::NotFound { path: path.to_path_buf(), reason: format!("it has neither {SINGLE} nor {INDEX}") })
    }

    fn from_files(paths: Vec<PathBuf>, index: Option<(&Path, &BTreeMap<String, String>)>) -> Result<Self, CheckpointError> {
        let mut files = Vec::with_capacity(paths.len());
        let mut tensors = BTreeMap::new();
        for (i, path) in paths.iter().enumerate() {
            let mut file = File::open(path).map_err(|e| CheckpointError::io(path, e))?;
            let header: Header = read_header(&mut file, path)?;
            for (name, info) in header.tensors {
                let TensorInfo { dtype, shape, data_offsets } = info;
                let dtype = WeightDtype::parse(&dtype)
                    .ok_or_else(|| CheckpointError::corrupt(path, &format!("tensor {name} is {dtype}; F32, BF16 and F16 can be imported")))?;
                let numel: usize = shape.iter().product();
                if data_offsets.1 - data_offsets.0 != numel * dtype.size() {
                    return Err(CheckpointError::corrupt(path, &format!("tensor {name}: {} bytes for shape {shape:?} of {}", data_offsets.1 - data_offsets.0, dtype.name())));
                }
                tensors.insert(name, WeightInfo { file: i, dtype, shape, data_start: header.data_start + data_offsets.0 as u64 });
            }
            files.push(file);
        }
        if let Some((index, map)) = index {
            for (name, shard) in map {
                let found = tensors.get(name).map(|t| paths[t.file].file_name() == Some(std::ffi::OsStr::new(shard)));
                if found != Some(true) {
                    return Err(CheckpointError::corrupt(index, &format!("maps {name} to {shard}, which does not hold it")));
                }
            }
        }
        Ok(Self { paths, files, tensors, gguf: None, views: BTreeMap::new() })
    }

    /// Present tensors `parts` (of one dtype), laid end to end, as one tensor `name` of `shape`: a
    /// layout the files split where the model keeps one tensor (e.g. a Hub checkpoint's per-expert
    /// gate and up weights of one expert's fused `[2f, d]`). The parts are then no longer listed by
    /// [`WeightFiles::names`]; reading `name` reads them.
    pub fn concat(&mut self, name: &str, parts: Vec<String>, shape: Vec<usize>) -> Result<(), CheckpointError> {
        let mut pieces = Vec::with_capacity(parts.len());
        for part in parts {
            let info = self.tensors.get(&part).ok_or_else(|| CheckpointError::Format(format!("{name}: no tensor {part} to build it from")))?;
            let n = info.shape.iter().product::<usize>();
            pieces.push((part, 0..n));
        }
        self.view(name, pieces, shape)
    }

    /// Present elements `range` of tensor `source` as a tensor `name` of `shape`: a layout the files
    /// fuse where the model keeps several tensors (e.g. one expert of transformers 5's fused
    /// `[E, 2f, d]` experts). A tensor some slice is taken of is no longer listed by [`WeightFiles::names`].
    pub fn slice(&mut self, name: &str, source: &str, range: Range<usize>, shape: Vec<usize>) -> Result<(), CheckpointError> {
        let info = self.tensors.get(source).ok_or_else(|| CheckpointError::Format(format!("{name}: no tensor {source} to take it from")))?;
        let n = info.shape.iter().product::<usize>();
        if range.end > n {
            return Err(CheckpointError::Format(format!("{name}: elements {range:?} of {source}, which has {n}")));
        }
        self.view(name, vec![(source.to_string(), range)], shape)
    }

    fn view(&mut self, name: &str, pieces: Vec<(String, Range<usize>)>, shape: Vec<usize>) -> Result<(), CheckpointError> {
        let mut numel = 0;
        let mut first: Option<&WeightInfo> = None;
        for (part, range) in &pieces {
            let info = self.tensors.get(part).ok_or_else(|| CheckpointError::Format(format!("{name}: no tensor {part} to build it from")))?;
            if first.is_some_and(|f| f.dtype != info.dtype) {
                return Err(CheckpointError::Format(format!("{name}: its parts have different dtypes ({part} is {})", info.dtype.name())));
            }
            first = first.or(Some(info));
            numel += range.len();
        }
        let Some(first) = first else { return Err(CheckpointError::Format(format!("{name}: no parts"))) };
        if numel != shape.iter().product::<usize>() {
            return Err(CheckpointError::Format(format!("{name}: its parts hold {numel} elements, not a {shape:?} tensor's")));
        }
        let info = WeightInfo { file: first.file, dtype: first.dtype, shape, data_start: u64::MAX };
        self.tensors.insert(name.to_string(), info);
        self.views.insert(name.to_string(), pieces);
        Ok(())
    }

    /// The tensor `name`, if present.
    pub fn info(&self, name: &str) -> Option<&WeightInfo> {
        self.tensors.get(name)
    }

    /// Every tensor's name, sorted (those [`WeightFiles::concat`] and [`WeightFiles::slice`] build
    /// others from as the others).
    pub fn names(&self) -> impl Iterator<Item = &str> {
        let parts: std::collections::BTreeSet<&str> = self.parts().collect();
        self.tensors.keys().map(String::as_str).filter(move |n| !parts.contains(n))
    }

    /// The names of the tensors [`WeightFiles::concat`] and [`WeightFiles::slice`] present as others.
    pub fn parts(&self) -> impl Iterator<Item = &str> {
        self.views.values().flatten().map(|(n, _)| n.as_str())
    }

    /// Elements `range` of tensor `name`, as f32, into `out`.
    pub fn read_f32(&mut self, name: &str, range: Range<usize>, out: &mut [f32]) -> Result<(), CheckpointError> {
        if let Some(pieces) = self.views.get(name).cloned() {
            // Each piece's share of the range, in order.
            let (mut at, mut done) = (0, 0);
            for (part, piece) in pieces {
                let n = piece.len();
                let (lo, hi) = (range.start.max(at), range.end.min(at + n));
                if lo < hi {
                    self.read_f32(&part, piece.start + lo - at..piece.start + hi - at, &mut out[done..done + (hi - lo)])?;
                    done += hi - lo;
                }
                at += n;
            }
            return if done == range.len() { Ok(()) } else { Err(CheckpointError::Format(format!("tensor {name}: elements {range:?} requested of {at}"))) };
        }
        let info = self.tensors.get(name).ok_or_else(|| CheckpointError::Format(format!("no tensor {name}")))?;
        let path = &self.paths[info.file];
        let numel: usize = info.shape.iter().product();
        if range.end > numel || out.len() != range.len() {
            return Err(CheckpointError::corrupt(path, &format!("tensor {name} has {numel} elements, elements {range:?} requested")));
        }
        if let Some(g) = self.gguf.as_mut() {
            out.copy_from_slice(&g.tensor(name)?[range]);
            return Ok(());
        }
        let size = info.dtype.size();
        let file = &mut self.files[info.file];
        file.seek(SeekFrom::Start(info.data_start + (range.start * size) as u64)).map_err(|e| CheckpointError::io(path, e))?;
        match info.dtype {
            WeightDtype::F32 => file.read_exact(bytemuck::cast_slice_mut(out)).map_err(|e| CheckpointError::io(path, e)),
            WeightDtype::Bf16 | WeightDtype::F16 => {
                // Converted in chunks: the staging buffer stays small whatever the range.
                let mut buf = vec![0u8; 2 * out.len().min(1 << 20)];
                for chunk in out.chunks_mut(1 << 20) {
                    let bytes = &mut buf[..2 * chunk.len()];
                    file.read_exact(bytes).map_err(|e| CheckpointError::io(path, e))?;
                    for (o, b) in chunk.iter_mut().zip(bytes.chunks_exact(2)) {
                        let bits = u16::from_le_bytes([b[0], b[1]]);
                        *o = if info.dtype == WeightDtype::Bf16 { half::bf16::from_bits(bits).to_f32() } else { half::f16::from_bits(bits).to_f32() };
                    }
                }
                Ok(())
            }
        }
    }
}
