//! GGUF files (llama.cpp's format) as a weight source for `model.init_from`: candle's GGUF reader and
//! dequantisation (`candle_core::quantized`), presented under transformers' names so the import is the
//! same as from safetensors. Only what is tested against transformers' own GGUF loader is accepted:
//! the `llama` architecture, tensors in F32, F16, BF16, Q4_0, Q4_1 or Q8_0.
//!
//! transformers' mapping (`modeling_gguf_pytorch_utils.py`): `token_embd` → `model.embed_tokens`,
//! `blk.N.attn_norm` → `model.layers.N.input_layernorm`, `attn_q/k/v/output` → `self_attn.q/k/v/o_proj`,
//! `ffn_norm` → `post_attention_layernorm`, `ffn_gate/up/down` → `mlp.gate/up/down_proj` (their
//! `.bias` likewise), `output_norm` → `model.norm`, `output` → `lm_head` (absent: tied embeddings);
//! any other tensor keeps its GGUF name, so an import that would not use it is refused. llama.cpp's converter
//! permutes the rows of q and k for its interleaved rotary layout; reading undoes it: row
//! `h·hd + s·hd/2 + j` of transformers' matrix is row `h·hd + 2j + s` of the file's (heads of q:
//! `llama.attention.head_count`, of k: `head_count_kv`).

use super::error::CheckpointError;
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::GgmlDType;
use candle_core::Device;
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

/// The tensor types that can be imported.
pub const SUPPORTED: [GgmlDType; 6] = [GgmlDType::F32, GgmlDType::F16, GgmlDType::BF16, GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0];

/// A tensor under its transformers name: the file's name, its `[rows, cols]` shape, and for q/k the
/// number of heads whose rows are un-permuted.
#[derive(Debug, Clone)]
pub(crate) struct Mapped {
    pub gguf: String,
    pub shape: Vec<usize>,
    pub heads: Option<usize>,
}

/// An opened GGUF file (metadata and tensor table read).
pub struct GgufWeights {
    path: PathBuf,
    file: File,
    content: Content,
    pub(crate) tensors: BTreeMap<String, Mapped>,
    /// The last tensor dequantised (ranks read a tensor in several ranges).
    cache: Option<(String, Vec<f32>)>,
}

impl std::fmt::Debug for GgufWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GgufWeights({}, {} tensors)", self.path.display(), self.tensors.len())
    }
}

/// Read a GGUF file's metadata and tensor table (no tensor data).
pub fn read_content(path: &Path) -> Result<Content, CheckpointError> {
    let mut file = File::open(path).map_err(|e| CheckpointError::io(path, e))?;
    Content::read(&mut file).map_err(|e| {
        let e = crate::engine::candle_message(&e);
        let hint = if e.contains("dtype") { "; F32, F16, BF16, Q4_0, Q4_1 and Q8_0 can be imported" } else { "" };
        CheckpointError::corrupt(path, &format!("is not a GGUF file this build can read ({e}){hint}"))
    })
}

/// Every tensor of `content` in a type that can be imported (the first other one, by name, is named).
pub fn check_types(content: &Content, path: &Path) -> Result<(), CheckpointError> {
    let mut bad: Vec<(&String, GgmlDType)> = content.tensor_infos.iter().filter(|(_, t)| !SUPPORTED.contains(&t.ggml_dtype)).map(|(n, t)| (n, t.ggml_dtype)).collect();
    bad.sort_by(|a, b| a.0.cmp(b.0));
    match bad.first() {
        Some((name, dtype)) => Err(CheckpointError::Unsupported {
            path: path.to_path_buf(),
            reason: format!("tensor {name} is quantised as {dtype:?}; F32, F16, BF16, Q4_0, Q4_1 and Q8_0 can be imported: requantise it (llama.cpp's llama-quantize) or use the safetensors model"),
        }),
        None => Ok(()),
    }
}

/// A metadata value as an unsigned integer.
pub fn meta_usize(c: &Content, key: &str) -> Option<usize> {
    match c.metadata.get(key)? {
        Value::U8(v) => Some(*v as usize),
        Value::U16(v) => Some(*v as usize),
        Value::U32(v) => Some(*v as usize),
        Value::U64(v) => Some(*v as usize),
        Value::I32(v) if *v >= 0 => Some(*v as usize),
        Value::I64(v) if *v >= 0 => Some(*v as usize),
        _ => None,
    }
}

/// A metadata value as a string.
pub fn meta_str<'a>(c: &'a Content, key: &str) -> Option<&'a str> {
    c.metadata.get(key)?.to_string().ok().map(String::as_str)
}

fn hf_name(gguf: &str) -> Option<String> {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.into());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let hf = match part {
        "attn_norm.weight" => "input_layernorm.weight",
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_q.bias" => "self_attn.q_proj.bias",
        "attn_k.bias" => "self_attn.k_proj.bias",
        "attn_v.bias" => "self_attn.v_proj.bias",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "attn_output.bias" => "self_attn.o_proj.bias",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        "ffn_gate.bias" => "mlp.gate_proj.bias",
        "ffn_up.bias" => "mlp.up_proj.bias",
        "ffn_down.bias" => "mlp.down_proj.bias",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}"))
}

impl GgufWeights {
    /// Open `path`: the architecture and every tensor's type are checked here, before any import.
    pub fn open(path: &Path) -> Result<Self, CheckpointError> {
        let content = read_content(path)?;
        let arch = meta_str(&content, "general.architecture").unwrap_or("(none)");
        if arch != "llama" {
            return Err(CheckpointError::Unsupported { path: path.to_path_buf(), reason: format!("has architecture {arch:?}; only \"llama\" GGUF files can be imported (use the model's safetensors directory)") });
        }
        check_types(&content, path)?;
        let heads = meta_usize(&content, "llama.attention.head_count");
        let kv_heads = meta_usize(&content, "llama.attention.head_count_kv").or(heads);
        let mut tensors = BTreeMap::new();
        for (name, info) in &content.tensor_infos {
            // A tensor without a transformers name stays under its own, so that an import sees it
            // and can refuse a file whose tensors it would not all use.
            let hf = hf_name(name).unwrap_or_else(|| name.clone());
            let h = if name.ends_with("attn_q.weight") || name.ends_with("attn_q.bias") {
                heads
            } else if name.ends_with("attn_k.weight") || name.ends_with("attn_k.bias") {
                kv_heads
            } else {
                None
            };
            tensors.insert(hf, Mapped { gguf: name.clone(), shape: info.shape.dims().to_vec(), heads: h });
        }
        let file = File::open(path).map_err(|e| CheckpointError::io(path, e))?;
        Ok(Self { path: path.to_path_buf(), file, content, tensors, cache: None })
    }

    /// Tensor `name` (transformers' name) dequantised to f32, in transformers' layout.
    pub(crate) fn tensor(&mut self, name: &str) -> Result<&[f32], CheckpointError> {
        if self.cache.as_ref().is_none_or(|(n, _)| n != name) {
            let m = self.tensors.get(name).ok_or_else(|| CheckpointError::Format(format!("no tensor {name}")))?.clone();
            let q = self.content.tensor(&mut self.file, &m.gguf, &Device::Cpu).map_err(|e| CheckpointError::corrupt(&self.path, &format!("tensor {}: {} (the file is cut short or damaged: fetch it again)", m.gguf, crate::engine::candle_message(&e))))?;
            let values = q
                .dequantize(&Device::Cpu)
                .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
                .map_err(|e| CheckpointError::corrupt(&self.path, &format!("tensor {}: {} (the file is cut short or damaged: fetch it again)", m.gguf, crate::engine::candle_message(&e))))?;
            let values = match m.heads {
                Some(h) => unpermute(&values, &m.shape, h),
                None => values,
            };
            self.cache = Some((name.to_string(), values));
        }
        Ok(&self.cache.as_ref().expect("filled above").1)
    }
}

/// Undo llama.cpp's q/k row permutation for `heads` heads (see the module docs).
fn unpermute(values: &[f32], shape: &[usize], heads: usize) -> Vec<f32> {
    let rows = shape[0];
    let cols: usize = shape[1..].iter().product::<usize>().max(1);
    let hd = rows / heads;
    let half = hd / 2;
    let mut out = vec![0f32; values.len()];
    for h in 0..heads {
        for s in 0..2 {
            for j in 0..half {
                let (dst, src) = (h * hd + s * half + j, h * hd + 2 * j + s);
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&values[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn unpermute_inverts_llama_cpp_permutation() {
        // llama.cpp: w.reshape(n, 2, hd/2, cols).swapaxes(1, 2): file row h·hd + 2j + s holds row h·hd + s·hd/2 + j.
        let (heads, hd, cols) = (2, 4, 1);
        let hf: Vec<f32> = (0..heads * hd).map(|r| r as f32).collect();
        let mut file = vec![0f32; hf.len()];
        for h in 0..heads {
            for s in 0..2 {
                for j in 0..hd / 2 {
                    file[h * hd + 2 * j + s] = hf[h * hd + s * hd / 2 + j];
                }
            }
        }
        assert_eq!(super::unpermute(&file, &[heads * hd, cols], heads), hf);
    }
}
