//! transformers model directories: `config.json` read into our model configs (both the 4.x keys
//! `rope_theta` / `rope_scaling` and 5.x's `rope_parameters`) and written back for export, and the
//! files an export carries along (tokenizer).

use crate::gpt::GptConfig;
use crate::llama::LlamaConfig;
use crate::ops::rope::Llama3Scaling;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// What a `config.json` describes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum HfModel {
    Llama(LlamaConfig),
    Gpt(GptConfig),
}

/// Errors reading a model directory; each names the file and the fix.
#[derive(Debug, thiserror::Error)]
pub enum HfError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path} is not valid JSON: {reason}")]
    Json { path: PathBuf, reason: String },
    #[error("{path} describes a {arch} model, which ferrospeed cannot train; supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, GPT2LMHeadModel")]
    Unsupported { path: PathBuf, arch: String },
    #[error("{path} has no usable `{key}`: {reason}")]
    Key { path: PathBuf, key: String, reason: String },
}

/// Files of a model directory an export copies next to the weights when present.
pub const TOKENIZER_FILES: &[&str] = &["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json", "vocab.json", "merges.txt"];

/// Read `dir/config.json`; `seq_len` is the training sequence length (not a property of the weights).
pub fn read_config(dir: &Path, seq_len: usize) -> Result<HfModel, HfError> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|source| HfError::Read { path: path.clone(), source })?;
    let v: Value = serde_json::from_str(&text).map_err(|e| HfError::Json { path: path.clone(), reason: e.to_string() })?;
    let arch = v["architectures"][0].as_str().map(str::to_string).or_else(|| v["model_type"].as_str().map(str::to_string)).unwrap_or_else(|| "unnamed".into());
    let key = |k: &str, reason: &str| HfError::Key { path: path.clone(), key: k.into(), reason: reason.into() };
    let int = |k: &str| v[k].as_u64().map(|x| x as usize).ok_or_else(|| key(k, "expected a positive integer"));
    match arch.as_str() {
        "LlamaForCausalLM" | "MistralForCausalLM" | "Qwen2ForCausalLM" | "llama" | "mistral" | "qwen2" => {
            let (d, nh) = (int("hidden_size")?, int("num_attention_heads")?);
            if let Some(w) = v["sliding_window"].as_u64() {
                let used = v["use_sliding_window"].as_bool().unwrap_or(arch.starts_with("Mistral") || arch == "mistral");
                if used && (w as usize) < seq_len {
                    return Err(key("sliding_window", &format!("{w} is shorter than model.seq_len = {seq_len}; sliding-window attention is not supported, use model.seq_len ≤ {w}")));
                }
            }
            let rope = v.get("rope_parameters").filter(|r| r.is_object()).unwrap_or(&v);
            let theta = rope["rope_theta"].as_f64().or_else(|| v["rope_theta"].as_f64()).unwrap_or(10_000.0);
            let scaling_obj = if v.get("rope_parameters").is_some_and(Value::is_object) { Some(rope) } else { v.get("rope_scaling").filter(|s| s.is_object()) };
            let rope_scaling = match scaling_obj {
                None => None,
                Some(s) => match s["rope_type"].as_str().or_else(|| s["type"].as_str()).unwrap_or("default") {
                    "default" => None,
                    "llama3" => {
                        let f = |k: &str| s[k].as_f64().ok_or_else(|| key(&format!("rope_scaling.{k}"), "expected a number"));
                        Some(Llama3Scaling {
                            factor: f("factor")?,
                            low_freq_factor: f("low_freq_factor")?,
                            high_freq_factor: f("high_freq_factor")?,
                            original_max_position_embeddings: f("original_max_position_embeddings")? as usize,
                        })
                    }
                    other => return Err(key("rope_scaling", &format!("rope_type \"{other}\" is not supported (\"default\" and \"llama3\" are)"))),
                },
            };
            let attention_bias = v["attention_bias"].as_bool().unwrap_or(arch.starts_with("Qwen2") || arch == "qwen2");
            Ok(HfModel::Llama(LlamaConfig {
                n_layer: int("num_hidden_layers")?,
                d_model: d,
                n_head: nh,
                n_kv_head: v["num_key_value_heads"].as_u64().map_or(nh, |x| x as usize),
                head_dim: v["head_dim"].as_u64().map_or(d / nh.max(1), |x| x as usize),
                d_ff: int("intermediate_size")?,
                vocab_size: int("vocab_size")?,
                seq_len,
                rope_theta: theta,
                rope_scaling,
                rms_norm_eps: v["rms_norm_eps"].as_f64().unwrap_or(1e-6),
                tie_word_embeddings: v["tie_word_embeddings"].as_bool().unwrap_or(false),
                attention_bias,
                initializer_range: v["initializer_range"].as_f64().unwrap_or(0.02),
            }))
        }
        "GPT2LMHeadModel" | "gpt2" => Ok(HfModel::Gpt(GptConfig {
            n_layer: int("n_layer")?,
            n_head: int("n_head")?,
            d_model: int("n_embd")?,
            seq_len: int("n_positions")?,
            vocab_size: int("vocab_size")?,
        })),
        _ => Err(HfError::Unsupported { path, arch }),
    }
}

/// A `config.json` transformers 4.x and 5.x read as `LlamaForCausalLM`, for weights of `dtype`
/// (`"bfloat16"`, `"float16"`, `"float32"`).
pub fn llama_config_json(c: &LlamaConfig, dtype: &str) -> Value {
    let rope_scaling = c.rope_scaling.map(|s| {
        json!({"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor, "high_freq_factor": s.high_freq_factor,
               "original_max_position_embeddings": s.original_max_position_embeddings})
    });
    json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": c.d_model,
        "intermediate_size": c.d_ff,
        "num_hidden_layers": c.n_layer,
        "num_attention_heads": c.n_head,
        "num_key_value_heads": c.n_kv_head,
        "head_dim": c.head_dim,
        "vocab_size": c.vocab_size,
        "max_position_embeddings": c.rope_scaling.map_or(c.seq_len, |s| s.original_max_position_embeddings).max(c.seq_len),
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "rope_scaling": rope_scaling,
        "tie_word_embeddings": c.tie_word_embeddings,
        "attention_bias": c.attention_bias,
        "mlp_bias": false,
        "hidden_act": "silu",
        "initializer_range": c.initializer_range,
        "torch_dtype": dtype,
        "use_cache": true,
    })
}

/// A GPT-2 `config.json` (`GPT2LMHeadModel`).
pub fn gpt_config_json(c: &GptConfig, dtype: &str) -> Value {
    json!({
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "n_layer": c.n_layer, "n_head": c.n_head, "n_embd": c.d_model, "n_positions": c.seq_len, "n_ctx": c.seq_len,
        "vocab_size": c.vocab_size, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
        "tie_word_embeddings": true, "torch_dtype": dtype,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, v: Value) {
        std::fs::write(dir.join("config.json"), v.to_string()).unwrap();
    }

    #[test]
    fn reads_both_rope_layouts_and_writes_what_it_reads() {
        let dir = tempfile::tempdir().unwrap();
        let base = json!({"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100, "rms_norm_eps": 1e-5, "tie_word_embeddings": true});
        let scaling = json!({"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        let mut v4 = base.clone();
        v4["rope_theta"] = json!(500000.0);
        v4["rope_scaling"] = scaling.clone();
        let mut v5 = base.clone();
        let mut params = scaling.clone();
        params["rope_theta"] = json!(500000.0);
        v5["rope_parameters"] = params;
        write(dir.path(), v4);
        let a = read_config(dir.path(), 32).unwrap();
        write(dir.path(), v5);
        let b = read_config(dir.path(), 32).unwrap();
        assert_eq!(a, b);
        let HfModel::Llama(c) = a else { panic!("not llama") };
        assert_eq!((c.n_kv_head, c.head_dim, c.rope_theta, c.rope_scaling.unwrap().factor), (2, 16, 500000.0, 32.0));
        write(dir.path(), llama_config_json(&c, "float32"));
        assert_eq!(read_config(dir.path(), 32).unwrap(), HfModel::Llama(c));
    }

    #[test]
    fn unsupported_architectures_are_named() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), json!({"architectures": ["MambaForCausalLM"], "hidden_size": 8}));
        let e = read_config(dir.path(), 8).unwrap_err().to_string();
        assert!(e.contains("MambaForCausalLM") && e.contains("config.json") && e.contains("LlamaForCausalLM"), "{e}");
    }
}
