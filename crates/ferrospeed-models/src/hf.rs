//! transformers model directories: `config.json` read into our model configs (both the 4.x keys
//! `rope_theta` / `rope_scaling` and 5.x's `rope_parameters`) and written back for export, and the
//! files an export carries along (tokenizer).

use crate::gpt::GptConfig;
use crate::llama::{LlamaConfig, MoeConfig, QkNorm};
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
    #[error("{path} describes a {arch} model, which ferrospeed cannot train; supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, MixtralForCausalLM, Qwen2MoeForCausalLM, Qwen3MoeForCausalLM, OlmoeForCausalLM, GPT2LMHeadModel")]
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
        "LlamaForCausalLM" | "MistralForCausalLM" | "Qwen2ForCausalLM" | "llama" | "mistral" | "qwen2" | "Qwen3ForCausalLM" | "qwen3" | "MixtralForCausalLM"
        | "mixtral" | "Qwen2MoeForCausalLM" | "qwen2_moe" | "Qwen3MoeForCausalLM" | "qwen3_moe" | "OlmoeForCausalLM" | "olmoe" => {
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
            // Which projections have biases, as transformers builds each architecture: Llama's
            // `attention_bias` gives q, k, v and o_proj theirs and `mlp_bias` gate, up and down; Qwen2
            // always has q/k/v biases and no others; Mistral has none (it ignores both keys).
            let family = Arch::of(&arch);
            let (qwen2, mistral) = (family == Arch::Qwen2 || family == Arch::Qwen2Moe, family == Arch::Mistral || family == Arch::Mixtral);
            let llama_bias = |k: &str| -> Result<bool, HfError> {
                match &v[k] {
                    Value::Null => Ok(false),
                    b => b.as_bool().ok_or_else(|| key(k, "expected true or false")),
                }
            };
            let (attention_bias, o_proj_bias, mlp_bias) = match (qwen2, mistral) {
                (true, _) => (true, false, false),
                (_, true) => (false, false, false),
                // Qwen3 and OLMoE: `attention_bias` on q/k/v and o_proj alike, no MLP biases.
                _ if matches!(family, Arch::Qwen3 | Arch::Qwen3Moe | Arch::Olmoe) => (llama_bias("attention_bias")?, llama_bias("attention_bias")?, false),
                _ => (llama_bias("attention_bias")?, llama_bias("attention_bias")?, llama_bias("mlp_bias")?),
            };
            if !v["clip_qkv"].is_null() {
                return Err(key("clip_qkv", "clipping q/k/v is not supported: use a model without it"));
            }
            let qk_norm = match family {
                Arch::Qwen3 | Arch::Qwen3Moe => QkNorm::PerHead,
                Arch::Olmoe => QkNorm::Full,
                _ => QkNorm::None,
            };
            let moe = moe_config(&v, family, &key)?;
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
                o_proj_bias,
                mlp_bias,
                initializer_range: v["initializer_range"].as_f64().unwrap_or(0.02),
                qk_norm,
                moe,
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

/// The architectures of the Llama family, as their configs differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arch {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    Mixtral,
    Qwen2Moe,
    Qwen3Moe,
    Olmoe,
}

impl Arch {
    fn of(arch: &str) -> Self {
        match arch {
            "MistralForCausalLM" | "mistral" => Self::Mistral,
            "Qwen2ForCausalLM" | "qwen2" => Self::Qwen2,
            "Qwen3ForCausalLM" | "qwen3" => Self::Qwen3,
            "MixtralForCausalLM" | "mixtral" => Self::Mixtral,
            "Qwen2MoeForCausalLM" | "qwen2_moe" => Self::Qwen2Moe,
            "Qwen3MoeForCausalLM" | "qwen3_moe" => Self::Qwen3Moe,
            "OlmoeForCausalLM" | "olmoe" => Self::Olmoe,
            _ => Self::Llama,
        }
    }
}

/// The experts of an MoE architecture's config (`None` for the dense ones).
fn moe_config(v: &Value, arch: Arch, key: &dyn Fn(&str, &str) -> HfError) -> Result<Option<MoeConfig>, HfError> {
    if !matches!(arch, Arch::Mixtral | Arch::Qwen2Moe | Arch::Qwen3Moe | Arch::Olmoe) {
        return Ok(None);
    }
    let int = |k: &str| v[k].as_u64().map(|x| x as usize).ok_or_else(|| key(k, "expected a positive integer"));
    let num_experts = v["num_local_experts"].as_u64().or_else(|| v["num_experts"].as_u64()).map(|x| x as usize).ok_or_else(|| key("num_experts", "expected a positive integer"))?;
    let qwen = matches!(arch, Arch::Qwen2Moe | Arch::Qwen3Moe);
    let d_expert = if qwen { int("moe_intermediate_size")? } else { int("intermediate_size")? };
    let mut mlp_only = 0u128;
    for l in v["mlp_only_layers"].as_array().into_iter().flatten() {
        let l = l.as_u64().filter(|&l| l < 128).ok_or_else(|| key("mlp_only_layers", "expected layer indices below 128"))?;
        mlp_only |= 1u128 << l;
    }
    if v["router_jitter_noise"].as_f64().is_some_and(|j| j > 0.0) {
        return Err(key("router_jitter_noise", "router jitter is not supported: set it to 0"));
    }
    let top_k = int("num_experts_per_tok")?;
    if top_k == 0 || top_k > num_experts {
        return Err(key("num_experts_per_tok", &format!("{top_k} experts a token of {num_experts}")));
    }
    Ok(Some(MoeConfig {
        num_experts,
        top_k,
        d_expert,
        norm_topk_prob: arch == Arch::Mixtral || v["norm_topk_prob"].as_bool().unwrap_or(false),
        d_shared: if arch == Arch::Qwen2Moe { v["shared_expert_intermediate_size"].as_u64().unwrap_or(0) as usize } else { 0 },
        sparse_step: if qwen { v["decoder_sparse_step"].as_u64().unwrap_or(1).max(1) as usize } else { 1 },
        first_dense: v["first_k_dense_replace"].as_u64().unwrap_or(0) as usize,
        mlp_only,
        aux_coef: v["router_aux_loss_coef"].as_f64().unwrap_or(0.001),
        aux_loss: v["output_router_logits"].as_bool().unwrap_or(false),
        z_loss_coef: 0.0,
        capacity_factor: None,
    }))
}

/// A `config.json` transformers 4.x and 5.x read as this model, for weights of `dtype` (`"bfloat16"`,
/// `"float16"`, `"float32"`) and `max_positions` positions (`max_position_embeddings`: the source's
/// context, or the training `seq_len` of a model trained from scratch). `LlamaForCausalLM`, or
/// `Qwen2ForCausalLM` for biases on q/k/v alone (Llama's `attention_bias` includes o_proj's).
pub fn llama_config_json(c: &LlamaConfig, dtype: &str, max_positions: usize) -> Value {
    let rope_scaling = c.rope_scaling.map(|s| {
        json!({"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor, "high_freq_factor": s.high_freq_factor,
               "original_max_position_embeddings": s.original_max_position_embeddings})
    });
    let qwen2 = c.attention_bias && !c.o_proj_bias && !c.mlp_bias;
    let (arch, model_type) = if qwen2 { ("Qwen2ForCausalLM", "qwen2") } else { ("LlamaForCausalLM", "llama") };
    json!({
        "architectures": [arch],
        "model_type": model_type,
        "hidden_size": c.d_model,
        "intermediate_size": c.d_ff,
        "num_hidden_layers": c.n_layer,
        "num_attention_heads": c.n_head,
        "num_key_value_heads": c.n_kv_head,
        "head_dim": c.head_dim,
        "vocab_size": c.vocab_size,
        "max_position_embeddings": max_positions,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "rope_scaling": rope_scaling,
        "tie_word_embeddings": c.tie_word_embeddings,
        "attention_bias": c.attention_bias || c.o_proj_bias,
        "mlp_bias": c.mlp_bias,
        "hidden_act": "silu",
        "attention_dropout": 0.0,
        "pretraining_tp": 1,
        "initializer_range": c.initializer_range,
        "torch_dtype": dtype,
        "use_cache": true,
    })
}

/// Set the element type of an exported `config.json`: transformers 5.x's `dtype` where the config has
/// it, else 4.x's `torch_dtype` (which 5.x reads too).
pub fn set_dtype(config: &mut Value, dtype: &str) {
    let key = if config.get("dtype").is_some() { "dtype" } else { "torch_dtype" };
    config[key] = dtype.into();
}

/// A model directory's `config.json` as it is, every key kept (what an export of a model started from
/// it writes back).
pub fn source_config(dir: &Path) -> Result<Value, HfError> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|source| HfError::Read { path: path.clone(), source })?;
    serde_json::from_str(&text).map_err(|e| HfError::Json { path, reason: e.to_string() })
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
        write(dir.path(), llama_config_json(&c, "float32", 8192));
        assert_eq!(read_config(dir.path(), 32).unwrap(), HfModel::Llama(c));
    }

    #[test]
    fn biases_follow_each_architecture_and_survive_a_written_config() {
        let dir = tempfile::tempdir().unwrap();
        let base = json!({"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 100});
        let flags = |arch: &str, extra: Value| {
            let mut v = base.clone();
            v["architectures"] = json!([arch]);
            extra.as_object().unwrap().iter().for_each(|(k, x)| v[k] = x.clone());
            write(dir.path(), v);
            match read_config(dir.path(), 32).unwrap() {
                HfModel::Llama(c) => (c.attention_bias, c.o_proj_bias, c.mlp_bias),
                HfModel::Gpt(_) => panic!("not llama"),
            }
        };
        // transformers' LlamaAttention: attention_bias on q, k, v and o; LlamaMLP: mlp_bias on all three.
        assert_eq!(flags("LlamaForCausalLM", json!({"attention_bias": true})), (true, true, false));
        assert_eq!(flags("LlamaForCausalLM", json!({"mlp_bias": true})), (false, false, true));
        assert_eq!(flags("LlamaForCausalLM", json!({})), (false, false, false));
        // Qwen2: q/k/v always, nothing else; Mistral: none, whatever the keys say.
        assert_eq!(flags("Qwen2ForCausalLM", json!({"mlp_bias": true})), (true, false, false));
        assert_eq!(flags("MistralForCausalLM", json!({"attention_bias": true, "mlp_bias": true})), (false, false, false));
        let mut bad = base.clone();
        bad["architectures"] = json!(["LlamaForCausalLM"]);
        bad["mlp_bias"] = json!("yes");
        write(dir.path(), bad);
        assert!(read_config(dir.path(), 32).unwrap_err().to_string().contains("mlp_bias"));
        // Written for a model without a source config.json (a GGUF file's), read back the same, under
        // the architecture that has those biases.
        let c = LlamaConfig::tiny(2, 64, 4, 2, 100, 32);
        for (attention_bias, o_proj_bias, mlp_bias, arch) in [(true, true, true, "LlamaForCausalLM"), (true, false, false, "Qwen2ForCausalLM"), (false, false, true, "LlamaForCausalLM")] {
            let c = LlamaConfig { attention_bias, o_proj_bias, mlp_bias, ..c };
            let v = llama_config_json(&c, "bfloat16", 4096);
            assert_eq!((v["architectures"][0].as_str(), v["max_position_embeddings"].as_u64()), (Some(arch), Some(4096)));
            write(dir.path(), v);
            assert_eq!(read_config(dir.path(), 32).unwrap(), HfModel::Llama(c), "{arch}");
        }
    }

    #[test]
    fn unsupported_architectures_are_named() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), json!({"architectures": ["MambaForCausalLM"], "hidden_size": 8}));
        let e = read_config(dir.path(), 8).unwrap_err().to_string();
        assert!(e.contains("MambaForCausalLM") && e.contains("config.json") && e.contains("LlamaForCausalLM"), "{e}");
    }
}
