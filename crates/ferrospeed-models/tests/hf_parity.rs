//! The Llama family and GPT-2 against HuggingFace transformers on CPU, from fixtures made by
//! `fixtures/make_hf_fixtures.py`: tiny random `LlamaForCausalLM`s (grouped and plain K/V heads, tied
//! and untied, Llama 3 rope scaling), a `Qwen2ForCausalLM` (q/k/v biases) and a `GPT2LMHeadModel`.
//! Imported from the directory `save_pretrained` wrote, our blocks give the same logits and loss within
//! 1e-5 and the same gradient for every parameter within 1e-4 (relative to its largest); `generate`'s
//! forward with its key/value cache gives the same logits.

use candle_core::{DType, Device, Tensor, Var};
use ferrospeed::checkpoint::WeightFiles;
use ferrospeed::engine::{blockwise, Batch};
use ferrospeed::engine::Model;
use ferrospeed_models::hf::{read_config, HfModel};
use ferrospeed_models::gpt::infer::GptInfer;
use ferrospeed_models::infer::{Generator, KvCache};
use ferrospeed_models::llama::infer::LlamaInfer;
use ferrospeed_models::{gpt, llama};
use std::path::PathBuf;

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
        let mut cache = KvCache::default();
        let mut got: Vec<f32> = gen.forward(&row[..t / 2], &mut cache).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        for &tok in &row[t / 2..] {
            got.extend(gen.forward(&[tok], &mut cache).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap());
        }
        let d = max_abs(&got, &hf_logits[r * t * vocab..(r + 1) * t * vocab]);
        assert!(d <= 1e-5, "{variant}: generate's logits of row {r} differ from transformers' by {d:e}");
    }

    // Loss and gradients through the engine's block-wise backward (the hand-written one).
    let tape = blockwise::forward(&model, &mut &detached[..], &batch, true).unwrap();
    let loss = tape.loss.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
    let hf_loss = expected["loss"].as_f64().unwrap();
    assert!((loss - hf_loss).abs() <= 1e-5, "{variant}: loss {loss} vs transformers' {hf_loss}");
    let mut grads: Vec<Vec<Vec<f32>>> = (0..model.num_blocks()).map(|b| model.own_params(b).iter().map(|s| vec![0.0; s.numel()]).collect()).collect();
    blockwise::backward(&model, &mut &detached[..], &batch, tape, 1.0, |i, slot_grads| {
        for (src, g) in model.slots(i).iter().zip(slot_grads) {
            if let Some(g) = g {
                let g: Vec<f32> = g.flatten_all().unwrap().to_dtype(DType::F32).unwrap().to_vec1().unwrap();
                grads[src.block][src.index].iter_mut().zip(g).for_each(|(a, b)| *a += b);
            }
        }
        Ok(())
    })
    .unwrap();
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
