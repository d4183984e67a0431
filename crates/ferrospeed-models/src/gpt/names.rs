//! HuggingFace GPT-2 parameter names for export and `init_from` (`transformer.h.0.attn.c_attn.weight` …).
//! Our linear weights are stored `[in, out]` like HF's Conv1D, so names are the only difference.

/// HuggingFace GPT-2 names for the `Accelerator` (export and `model.init_from`).
pub const HF_NAMES: ferrospeed::accelerator::ParamNames = ferrospeed::accelerator::ParamNames { tag: "hf-gpt2", map: hf_name, open: ferrospeed::checkpoint::WeightFiles::open };

/// The HuggingFace name of parameter `param` of block `block`.
pub fn hf_name(block: &str, param: &str) -> String {
    match block {
        "embed" => format!("transformer.{param}.weight"),
        "head" => format!("transformer.{param}"),
        _ => format!("transformer.{block}.{param}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpt::{Gpt, GptConfig};

    #[test]
    fn names_and_shapes_match_huggingface_gpt2() {
        let gpt = Gpt::new(GptConfig { n_layer: 12, n_head: 12, d_model: 768, seq_len: 1024, vocab_size: 50257 });
        let model = gpt.model().unwrap();
        let mut exported = std::collections::BTreeMap::new();
        for b in 0..model.num_blocks() {
            for p in model.own_params(b) {
                exported.insert(hf_name(&model.block_names()[b], &p.name), p.shape.clone());
            }
        }
        // GPT2LMHeadModel's state dict (lm_head.weight is tied to transformer.wte.weight and not stored).
        let mut expected = std::collections::BTreeMap::new();
        expected.insert("transformer.wte.weight".to_string(), vec![50257, 768]);
        expected.insert("transformer.wpe.weight".to_string(), vec![1024, 768]);
        expected.insert("transformer.ln_f.weight".to_string(), vec![768]);
        expected.insert("transformer.ln_f.bias".to_string(), vec![768]);
        for l in 0..12 {
            for (suffix, shape) in [
                ("ln_1.weight", vec![768]),
                ("ln_1.bias", vec![768]),
                ("attn.c_attn.weight", vec![768, 2304]),
                ("attn.c_attn.bias", vec![2304]),
                ("attn.c_proj.weight", vec![768, 768]),
                ("attn.c_proj.bias", vec![768]),
                ("ln_2.weight", vec![768]),
                ("ln_2.bias", vec![768]),
                ("mlp.c_fc.weight", vec![768, 3072]),
                ("mlp.c_fc.bias", vec![3072]),
                ("mlp.c_proj.weight", vec![3072, 768]),
                ("mlp.c_proj.bias", vec![768]),
            ] {
                expected.insert(format!("transformer.h.{l}.{suffix}"), shape);
            }
        }
        assert_eq!(exported.len(), 148);
        assert_eq!(exported, expected);
    }
}
