//! The Llama family and GPT-2 against HuggingFace transformers on CPU, from fixtures made by
//! `fixtures/make_hf_fixtures.py`: tiny random `LlamaForCausalLM`s (grouped and plain K/V heads, tied
//! and untied, Llama 3 rope scaling, `attention_bias` (q/k/v and o_proj biases), `mlp_bias`), a
//! `Qwen2ForCausalLM` (q/k/v biases) and a `GPT2LMHeadModel`.
//! Imported from the directory `save_pretrained` wrote, our blocks give the same logits and loss within
//! 1e-5 and the same gradient for every parameter within 1e-4 (relative to its largest); `generate`'s
//! forward with its key/value cache gives the same logits. An import uses every tensor of the files:
//! one the model would not use is refused by name, known buffers (`rotary_emb.inv_freq`) are a warning.

use candle_core::{Device, Tensor, Var};
use ferrospeed::checkpoint::WeightFiles;
use ferrospeed::engine::Batch;
use ferrospeed::engine::Model;
use ferrospeed_models::hf::{read_config, HfModel};
use ferrospeed_models::gpt::infer::GptInfer;
use ferrospeed_models::infer::Generator;
use ferrospeed_models::llama::infer::LlamaInfer;
use ferrospeed_models::{gpt, llama};
use std::path::PathBuf;

mod support;

fn fixture(variant: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf").join(variant)
}

fn read_all(files: &mut WeightFiles, name: &str) -> (Vec<f32>, Vec<usize>) {
    let shape = files.info(name).unwrap_or_else(|| panic!("fixture has no {name}")).shape.clone();
    let mut v = vec![0f32; shape.iter().product()];
    files.read_f32(name, 0..v.len(), &mut v).unwrap();
    (v, shape)
}

fn ids(v: &serde_json::Value) -> Tensor {
    let rows: Vec<Vec<u32>> = v.as_array().unwrap().iter().map(|r| r.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()).collect();
    Tensor::new(rows, &Device::Cpu).unwrap()
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn check(variant: &str) {
    let dir = fixture(variant);
    // The family's model, names and logits (the head's composed forward on the last hidden states).
    type Logits = Box<dyn Fn(&[Tensor], &Tensor) -> Tensor>;
    let (model, hf_name, logits_of): (Model, fn(&str, &str) -> String, Logits) = match read_config(&dir, 8).unwrap() {
        HfModel::Llama(cfg) => (llama::Llama::new(cfg).model().unwrap(), llama::hf_name, Box::new(move |p, x| llama::Head::new(cfg).logits(p, x).unwrap())),
        HfModel::Gpt(cfg) => (gpt::Gpt::new(cfg).model().unwrap(), gpt::hf_name, Box::new(move |p, x| gpt::Head::new(cfg).logits(p, x).unwrap())),
    };
    let mut weights = WeightFiles::open(&dir).unwrap();
    let vars: Vec<Vec<Var>> = (0..model.num_blocks())
        .map(|b| {
            model.own_params(b).iter().map(|s| {
                let (v, shape) = read_all(&mut weights, &hf_name(&model.block_names()[b], &s.name));
                assert_eq!(shape, s.shape, "{variant}: {}", s.name);
                Var::from_slice(&v, shape.as_slice(), &Device::Cpu).unwrap()
            }).collect()
        })
        .collect();
    let slots: Vec<Vec<Tensor>> = (0..model.num_blocks()).map(|b| model.slots(b).iter().map(|src| vars[src.block][src.index].as_tensor().clone()).collect()).collect();
    let expected: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let batch = Batch::tokens(ids(&expected["tokens"]), ids(&expected["targets"]));
    let mut want = WeightFiles::open(&dir.join("expected.safetensors")).unwrap();

    // Logits: the blocks' forward up to the head, then its logits.
    let detached: Vec<Vec<Tensor>> = slots.iter().map(|b| b.iter().map(Tensor::detach).collect()).collect();
    let mut x = Vec::new();
    for b in 0..model.num_blocks() - 1 {
        x = model.block(b).forward(&detached[b], &x, &batch).unwrap();
    }
    let logits: Vec<f32> = logits_of(&detached[model.num_blocks() - 1], &x[0]).flatten_all().unwrap().to_vec1().unwrap();
    let (hf_logits, _) = read_all(&mut want, "logits");
    let diff = max_abs(&logits, &hf_logits);
    assert!(diff <= 1e-5, "{variant}: logits differ from transformers' by {diff:e}");

    // `generate`'s forward (composed ops and a key/value cache, prompt then one token at a time) on
    // each row gives the same logits.
    let tokens = ids(&expected["tokens"]);
    let (rows, t) = tokens.dims2().unwrap();
    let mut files = WeightFiles::open(&dir).unwrap();
    let gen: Box<dyn Generator> = match read_config(&dir, t).unwrap() {
        HfModel::Llama(c) => Box::new(LlamaInfer::load(c, &mut files, &Device::Cpu, t).unwrap()),
        HfModel::Gpt(c) => Box::new(GptInfer::load(c, &mut files, &Device::Cpu).unwrap()),
    };
    let vocab = hf_logits.len() / (rows * t);
    for r in 0..rows {
        let row: Vec<u32> = tokens.get(r).unwrap().to_vec1().unwrap();
        let got = support::cached_logits(gen.as_ref(), &row);
        let d = max_abs(&got, &hf_logits[r * t * vocab..(r + 1) * t * vocab]);
        assert!(d <= 1e-5, "{variant}: generate's logits of row {r} differ from transformers' by {d:e}");
    }

    // Loss and gradients through the engine's block-wise backward (the hand-written one).
    let (loss, grads) = support::loss_and_grads(&model, &detached, &batch, true);
    let hf_loss = expected["loss"].as_f64().unwrap();
    assert!((loss - hf_loss).abs() <= 1e-5, "{variant}: loss {loss} vs transformers' {hf_loss}");
    let mut checked = 0;
    for b in 0..model.num_blocks() {
        for (p, s) in model.own_params(b).iter().enumerate() {
            let name = hf_name(&model.block_names()[b], &s.name);
            let (hf, _) = read_all(&mut want, &format!("grad.{name}"));
            let scale = hf.iter().map(|v| v.abs()).fold(0.0, f32::max).max(1e-12);
            let rel = max_abs(&grads[b][p], &hf) / scale;
            assert!(rel <= 1e-4, "{variant}: gradient of {name} differs from transformers' by {rel:e} of its largest element");
            checked += 1;
        }
    }
    // Every parameter transformers has was compared (a tied head has none of its own there either).
    assert_eq!(checked, want.names().filter(|n| n.starts_with("grad.")).count(), "{variant}");
    eprintln!("{variant}: logits within {diff:e}, loss within {:e}", (loss - hf_loss).abs());
}

#[test]
fn grouped_kv_heads_untied_match_transformers() {
    check("gqa_untied");
}

#[test]
fn plain_kv_heads_tied_embedding_match_transformers() {
    check("mha_tied");
}

#[test]
fn llama3_rope_scaling_matches_transformers() {
    check("gqa_llama3_rope");
}

#[test]
fn llama_attention_bias_on_q_k_v_and_o_proj_matches_transformers() {
    check("llama_attention_bias");
}

#[test]
fn llama_mlp_bias_on_gate_up_and_down_matches_transformers() {
    check("llama_mlp_bias");
}

#[test]
fn qwen2_with_qkv_biases_matches_transformers() {
    check("qwen2");
}

#[test]
fn a_gpt2_directory_matches_transformers() {
    check("gpt2");
}

#[test]
fn a_byte_level_bpe_tokenizer_json_encodes_as_the_tokenizers_library_does() {
    // GPT-2's kind of tokenizer (byte-level BPE), trained small by the fixture script, on texts with
    // accents, CJK, emoji with joiners, combining marks, right-to-left script, tabs and runs of spaces.
    let dir = fixture("bpe");
    let tok = ferrospeed_models::Tokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
    assert_eq!(tok.vocab_size(), 400);
    let cases: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let cases = cases.as_array().unwrap();
    assert!(cases.len() >= 7);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let ids = tok.encode(text).unwrap();
        assert_eq!(ids, want, "ids of {text:?}");
        assert_eq!(tok.decode(&ids).unwrap(), case["decoded"].as_str().unwrap(), "decoding {text:?}");
    }
}

/// A safetensors file of f32 tensors.
fn write_safetensors(path: &std::path::Path, tensors: &[(String, Vec<usize>, Vec<f32>)]) {
    let mut header = serde_json::Map::new();
    let mut offset = 0;
    for (name, shape, data) in tensors {
        header.insert(name.clone(), serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + 4 * data.len()]}));
        offset += 4 * data.len();
    }
    let mut json = serde_json::Value::Object(header).to_string().into_bytes();
    json.resize(json.len().div_ceil(8) * 8, b' ');
    let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
    bytes.extend(json);
    for (_, _, data) in tensors {
        bytes.extend(data.iter().flat_map(|v| v.to_le_bytes()));
    }
    std::fs::write(path, bytes).unwrap();
}

/// A copy of fixture `variant` with `extra` tensors added to its weights.
fn fixture_with(variant: &str, extra: &[(&str, Vec<usize>)], into: &std::path::Path) -> PathBuf {
    let src = fixture(variant);
    let dir = into.join(variant);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let mut files = WeightFiles::open(&src).unwrap();
    let names: Vec<String> = files.names().map(str::to_string).collect();
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = names.iter().map(|n| { let (v, s) = read_all(&mut files, n); (n.clone(), s, v) }).collect();
    for (name, shape) in extra {
        tensors.push((name.to_string(), shape.clone(), vec![0.5; shape.iter().product()]));
    }
    write_safetensors(&dir.join("model.safetensors"), &tensors);
    dir
}

fn family_of(dir: &std::path::Path) -> ferrospeed_models::Family {
    match read_config(dir, 8).unwrap() {
        HfModel::Llama(c) => ferrospeed_models::Family::Llama(llama::Llama::new(c)),
        HfModel::Gpt(c) => ferrospeed_models::Family::Gpt(gpt::Gpt::new(c)),
    }
}

#[test]
fn an_import_uses_every_tensor_or_names_the_one_it_would_drop() {
    let tmp = tempfile::tempdir().unwrap();
    // A word-level tokenizer of 3 ids (within the fixtures' vocabulary of 64).
    let tok_path = tmp.path().join("tokenizer.json");
    let spec = serde_json::json!({"version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": {"[UNK]": 0, "a": 1, "b": 2}, "unk_token": "[UNK]"}});
    std::fs::write(&tok_path, spec.to_string()).unwrap();
    let tok = ferrospeed_models::Tokenizer::from_file(&tok_path).unwrap();
    // Every fixture as transformers saved it: nothing left over, no warning.
    for v in ["gqa_untied", "mha_tied", "qwen2", "llama_attention_bias", "llama_mlp_bias", "gpt2"] {
        assert_eq!(family_of(&fixture(v)).check_inputs(Some(&fixture(v)), &tok, "model.init_from").unwrap(), None, "{v}");
    }
    // o_proj biases in the files of a config without attention_bias (what a Llama with attention_bias
    // read as one without would silently drop): refused, naming the first.
    let biased = fixture_with("gqa_untied", &[("model.layers.0.self_attn.o_proj.bias", vec![16]), ("model.layers.1.self_attn.o_proj.bias", vec![16])], tmp.path());
    let e = family_of(&biased).check_inputs(Some(&biased), &tok, "model.init_from").unwrap_err();
    assert!(e.contains("model.layers.0.self_attn.o_proj.bias") && e.contains("and 1 more") && e.contains("does not use") && e.contains("attention_bias"), "{e}");
    assert!(!e.contains('\n'), "one line: {e}");
    // The bias fixtures' own biases are all used: dropping mlp_bias from the config leaves them over.
    let no_mlp = tmp.path().join("no_mlp_bias");
    std::fs::create_dir_all(&no_mlp).unwrap();
    std::fs::copy(fixture("llama_mlp_bias").join("model.safetensors"), no_mlp.join("model.safetensors")).unwrap();
    let text = std::fs::read_to_string(fixture("llama_mlp_bias").join("config.json")).unwrap().replace("\"mlp_bias\": true", "\"mlp_bias\": false");
    std::fs::write(no_mlp.join("config.json"), text).unwrap();
    let e = family_of(&no_mlp).check_inputs(Some(&no_mlp), &tok, "model.init_from").unwrap_err();
    assert!(e.contains("mlp.down_proj.bias") || e.contains("mlp.gate_proj.bias"), "{e}");
    // Buffers transformers does not load either: one warning line, the import goes on.
    let inv_freq = fixture_with("mha_tied", &[("model.layers.0.self_attn.rotary_emb.inv_freq", vec![2]), ("model.layers.1.self_attn.rotary_emb.inv_freq", vec![2])], tmp.path());
    let w = family_of(&inv_freq).check_inputs(Some(&inv_freq), &tok, "model.init_from").unwrap().expect("a warning");
    assert!(w.contains("model.layers.0.self_attn.rotary_emb.inv_freq") && w.contains("and 1 more") && !w.contains('\n'), "{w}");
    let gpt = fixture_with("gpt2", &[("transformer.h.0.attn.bias", vec![1, 1, 16, 16]), ("transformer.h.0.attn.masked_bias", vec![1])], tmp.path());
    let w = family_of(&gpt).check_inputs(Some(&gpt), &tok, "model.init_from").unwrap().expect("a warning");
    assert!(w.contains("transformer.h.0.attn.bias") && w.contains("GPT-2"), "{w}");
    // A tied model's file that also stores the head (as some save it): ignored with a warning, as
    // transformers ties it on load; an untied model must use its own head, so nothing to ignore there.
    let tied_head = fixture_with("mha_tied", &[("lm_head.weight", vec![64, 16])], tmp.path().join("tied").as_path());
    let w = family_of(&tied_head).check_inputs(Some(&tied_head), &tok, "model.init_from").unwrap().expect("a warning");
    assert!(w.contains("lm_head.weight") && w.contains("tie_word_embeddings"), "{w}");
    // GPT-2 holds no tensor it would not use either.
    let odd = fixture_with("gpt2", &[("transformer.h.0.attn.c_extra.weight", vec![4])], tmp.path().join("odd").as_path());
    let e = family_of(&odd).check_inputs(Some(&odd), &tok, "model.init_from").unwrap_err();
    assert!(e.contains("transformer.h.0.attn.c_extra.weight"), "{e}");
}
