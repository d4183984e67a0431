//! transformers' `LlamaForCausalLM` parameter names for export and `init_from`
//! (`model.embed_tokens.weight`, `model.layers.0.self_attn.q_proj.weight`, `model.norm.weight`,
//! `lm_head.weight`). Our layouts are theirs, so names are the only difference.

/// The names of the Llama family for the `Accelerator` (export and `model.init_from`).
pub const HF_NAMES: ferrospeed::accelerator::ParamNames = ferrospeed::accelerator::ParamNames { tag: "hf-llama", map: hf_name };

/// The transformers name of parameter `param` of block `block`.
pub fn hf_name(block: &str, param: &str) -> String {
    match (block, param) {
        ("head", "lm_head.weight") => param.to_string(),
        ("embed" | "head", _) => format!("model.{param}"),
        _ => format!("model.{block}.{param}"),
    }
}
