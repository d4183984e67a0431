//! SmolLM2-135M-Instruct from its GGUF file (`scripts/fetch-smollm2.sh`) against transformers loading
//! the same file (fixtures from `tests/fixtures/make_gguf_fixtures.py`): dequantised weights → logits
//! within 1e-4, the tokenizer built from the GGUF vocabulary on a corpus of Unicode edge cases, and the
//! chat template as `apply_chat_template` renders it. Files of an unsupported architecture or
//! quantisation are refused with one line. The KV cache of `generate` against a full forward.
//!
//! Without the GGUF file the three tests that need it say so and pass, unless
//! `FERROSPEED_REQUIRE_SMOLLM2=1` (set by `.ci/run`, which fetches it) makes its absence a failure.

mod support;

use candle_core::Device;
use ferrospeed::checkpoint::WeightFiles;
use ferrospeed_models::gguf::GgufFile;
use ferrospeed_models::infer::{Generator, KvCache};
use ferrospeed_models::llama::infer::LlamaInfer;
use ferrospeed_models::prepared::{ChatTemplate, Message};
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf").join(name)
}

fn json(name: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(name)).unwrap()).unwrap()
}

/// The SmolLM2 GGUF file, or `None` (with a note) when it has not been fetched.
fn smollm2(test: &str) -> Option<PathBuf> {
    let path = std::env::var_os("FERROSPEED_SMOLLM2")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.models/SmolLM2-135M-Instruct.Q4_1.gguf"));
    if path.is_file() {
        return Some(path);
    }
    assert!(std::env::var("FERROSPEED_REQUIRE_SMOLLM2").is_err(), "{test}: {} is missing: run scripts/fetch-smollm2.sh", path.display());
    support::skip(test, &format!("{} is missing (scripts/fetch-smollm2.sh fetches it)", path.display()));
    None
}

/// The largest difference of `logits` `[t, vocab]` from the fixture's (every `stride`-th logit at its
/// positions).
fn worst_logit(logits: &candle_core::Tensor, want: &serde_json::Value) -> f64 {
    let stride = want["stride"].as_u64().unwrap() as usize;
    let mut worst: f64 = 0.0;
    for (k, p) in want["positions"].as_array().unwrap().iter().enumerate() {
        let row: Vec<f32> = logits.get(p.as_u64().unwrap() as usize).unwrap().to_vec1().unwrap();
        for (j, w) in want["logits"][k].as_array().unwrap().iter().enumerate() {
            worst = worst.max((row[j * stride] as f64 - w.as_f64().unwrap()).abs());
        }
    }
    worst
}

#[test]
fn gguf_logits_match_transformers_loading_the_same_file() {
    let Some(path) = smollm2("gguf_logits_match_transformers_loading_the_same_file") else { return };
    let want = json("logits.json");
    let ids: Vec<u32> = want["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    let cfg = GgufFile::open(&path).unwrap().llama_config(2048).unwrap();
    let c = &want["config"];
    assert_eq!((cfg.n_layer, cfg.d_model, cfg.n_head, cfg.n_kv_head, cfg.d_ff, cfg.vocab_size), (30, 576, 9, 3, 1536, 49152));
    assert_eq!(cfg.rms_norm_eps, c["rms_eps"].as_f64().unwrap());
    assert!(cfg.tie_word_embeddings);
    let mut files = WeightFiles::open(&path).unwrap();
    let model = LlamaInfer::load(cfg, &mut files, &Device::Cpu, 64).unwrap();
    let logits = model.forward(&ids, &mut KvCache::default()).unwrap();
    let mut worst = worst_logit(&logits, &want);
    for (k, p) in want["positions"].as_array().unwrap().iter().enumerate() {
        let row: Vec<f32> = logits.get(p.as_u64().unwrap() as usize).unwrap().to_vec1().unwrap();
        let max = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
        let lse = max + row.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
        worst = worst.max((lse - want["logsumexp"][k].as_f64().unwrap()).abs());
        let mut order: Vec<usize> = (0..row.len()).collect();
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
        let top: Vec<u64> = want["top5"][k].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
        assert_eq!(order[0] as u64, top[0], "position {p}: the most likely token differs");
    }
    eprintln!("largest logit difference against transformers (f64): {worst:e}");
    assert!(worst <= 1e-4, "logits differ from transformers by {worst:e}");
}

/// The same logits from the training blocks, their parameters read under transformers' names (what
/// `model.init_from = FILE.gguf` imports): the model a fine-tune starts from.
#[test]
fn gguf_weights_in_the_training_blocks_give_transformers_logits() {
    let Some(path) = smollm2("gguf_weights_in_the_training_blocks_give_transformers_logits") else { return };
    let want = json("logits.json");
    let ids: Vec<u32> = want["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    let llama = ferrospeed_models::Llama::new(GgufFile::open(&path).unwrap().llama_config(64).unwrap());
    let model = llama.model().unwrap();
    let mut files = WeightFiles::open(&path).unwrap();
    let name_of = ferrospeed_models::llama::HF_NAMES.map;
    let params: Vec<Vec<candle_core::Tensor>> = (0..model.num_blocks())
        .map(|b| {
            model
                .slots(b)
                .iter()
                .map(|s| {
                    let spec = &model.own_params(s.block)[s.index];
                    let name = name_of(&model.block_names()[s.block], &spec.name);
                    let mut v = vec![0f32; spec.shape.iter().product()];
                    let n = v.len();
                    files.read_f32(&name, 0..n, &mut v).unwrap();
                    candle_core::Tensor::from_vec(v, spec.shape.clone(), &Device::Cpu).unwrap()
                })
                .collect()
        })
        .collect();
    let t = ids.len();
    let tokens = candle_core::Tensor::from_vec(ids, (1, t), &Device::Cpu).unwrap();
    let batch = ferrospeed::engine::Batch::tokens(tokens.clone(), tokens);
    let mut x = Vec::new();
    for (b, p) in params.iter().enumerate().take(model.num_blocks() - 1) {
        x = model.block(b).forward(p, &x, &batch).unwrap();
    }
    let logits = ferrospeed_models::llama::Head::new(llama.cfg).logits(params.last().unwrap(), &x[0]).unwrap();
    let worst = worst_logit(&logits, &want);
    eprintln!("training blocks: largest logit difference against transformers (f64): {worst:e}");
    assert!(worst <= 1e-4, "logits differ from transformers by {worst:e}");
}

#[test]
fn gguf_tokenizer_matches_transformers_on_unicode_edge_cases() {
    let Some(path) = smollm2("gguf_tokenizer_matches_transformers_on_unicode_edge_cases") else { return };
    let tok = GgufFile::open(&path).unwrap().tokenizer().unwrap();
    let cases = json("tokenize.json");
    let cases = cases["cases"].as_array().unwrap();
    assert!(cases.len() > 40);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        assert_eq!(tok.encode(text).unwrap(), want, "{text:?}");
    }
    let s = tok.specials();
    assert_eq!(s.eos, Some(("<|im_end|>".to_string(), 2)));
    assert!(s.chat_template.is_some_and(|t| t.contains("im_start")));
}

#[test]
fn chat_template_renders_like_apply_chat_template() {
    let f = json("chat.json");
    let t = ChatTemplate::new(f["template"].as_str().unwrap(), f["bos"].as_str().unwrap(), f["eos"].as_str().unwrap()).unwrap();
    let cases = f["cases"].as_array().unwrap();
    assert!(cases.len() >= 8);
    for case in cases {
        let messages: Vec<Message> = serde_json::from_value(case["messages"].clone()).unwrap();
        let got = t.render(&messages, case["add_generation_prompt"].as_bool().unwrap()).unwrap();
        assert_eq!(got, case["text"].as_str().unwrap(), "{messages:?}");
    }
}

#[test]
fn unsupported_gguf_files_are_refused_in_one_line() {
    for (file, want) in [("bad_arch.gguf", "architecture \"falcon\""), ("bad_quant.gguf", "Q5_0")] {
        let path = fixture(file);
        let e = WeightFiles::open(&path).unwrap_err().to_string();
        assert!(e.contains(want) && e.contains(file) && !e.contains('\n'), "{file}: {e}");
    }
    let e = GgufFile::open(&fixture("bad_arch.gguf")).unwrap().llama_config(16).unwrap_err().to_string();
    assert!(e.contains("only \"llama\""), "{e}");
}

#[test]
fn the_kv_cache_gives_the_logits_of_a_full_forward() {
    use ferrospeed_models::hf::{read_config, HfModel};
    for name in ["gqa_untied", "gpt2"] {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf").join(name);
        let mut files = WeightFiles::open(&dir).unwrap();
        let (model, vocab): (Box<dyn Generator>, usize) = match read_config(&dir, 16).unwrap() {
            HfModel::Llama(c) => (Box::new(LlamaInfer::load(c, &mut files, &Device::Cpu, 16).unwrap()), c.vocab_size),
            HfModel::Gpt(c) => (Box::new(ferrospeed_models::gpt::infer::GptInfer::load(c, &mut files, &Device::Cpu).unwrap()), c.vocab_size),
        };
        kv_cache_matches_full_forward(name, model.as_ref(), vocab as u32);
    }
}

fn kv_cache_matches_full_forward(name: &str, model: &dyn Generator, vocab: u32) {
    let ids: Vec<u32> = (0..12u32).map(|i| (i * 7 + 3) % vocab).collect();
    let full = model.forward(&ids, &mut KvCache::default()).unwrap();
    let mut cache = KvCache::default();
    let mut rows = vec![model.forward(&ids[..5], &mut cache).unwrap()];
    for &t in &ids[5..] {
        rows.push(model.forward(&[t], &mut cache).unwrap());
    }
    let inc = candle_core::Tensor::cat(&rows, 0).unwrap();
    let diff = (full - inc).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(diff < 1e-5, "{name}: cached and full forward differ by {diff}");
    assert_eq!(cache.len(), 12);
}

/// `data prepare` cuts large text files into units tokenized in parallel: with units of 64 bytes the
/// tokens are still those of the whole file (paragraph breaks, trailing spaces, CRLF, Unicode).
#[test]
fn prepared_text_in_small_units_tokenizes_as_the_whole_file() {
    use ferrospeed_models::prepared::{prepare, PrepareOptions};
    use ferrospeed_models::PreparedData;
    let Some(path) = smollm2("prepared_text_in_small_units_tokenizes_as_the_whole_file") else { return };
    let tok = GgufFile::open(&path).unwrap().tokenizer().unwrap();
    let corpus = std::fs::read_to_string(fixture("unicode_corpus.txt")).unwrap();
    let text = format!("{corpus}\nHello.\n\nWorld \nnext line\r\nAnd\n   indented\n\n\nThree\n{corpus}");
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("text.txt");
    std::fs::write(&input, &text).unwrap();
    let mut opts = PrepareOptions::new(vec![input], dir.path().join("out"), &tok);
    opts.chunk_bytes = 64;
    prepare(&opts).unwrap();
    let (tokens, _) = PreparedData::open(&dir.path().join("out")).unwrap().document(0);
    let mut want = tok.encode(&text).unwrap();
    want.push(tok.eos_id().unwrap());
    assert_eq!(tokens.len(), want.len());
    assert_eq!(tokens, want);
}
