//! SmolLM2-135M-Instruct from its GGUF file (`scripts/fetch-smollm2.sh`) against transformers loading
//! the same file (fixtures from `tests/fixtures/make_gguf_fixtures.py`): dequantised weights → logits
//! within 1e-4, the tokenizer built from the GGUF vocabulary on a corpus of Unicode edge cases, and the
//! chat template as `apply_chat_template` renders it, and a chat prepared for training as SFT trains on
//! it (transformers' assistant token masks, no EOS appended, as TRL). Files of an unsupported architecture or
//! quantisation are refused with one line. The KV cache of `generate` against a full forward, and
//! greedy generation against the argmax of a full forward at every step, stopping at its stop token.
//!
//! Without the GGUF file the tests that need it say so and pass, unless
//! `FERROSPEED_REQUIRE_SMOLLM2=1` (set by `.ci/run`, which fetches it) makes its absence a failure.

mod support;

use candle_core::Device;
use ferrospeed::checkpoint::WeightFiles;
use ferrospeed_models::gguf::GgufFile;
use ferrospeed::rng::Rng;
use ferrospeed_models::infer::{Generator, KvCache, Sampler};
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
    for name in ["gqa_untied", "gpt2"] {
        let (model, vocab) = generator(&hf_fixture(name), 16);
        kv_cache_matches_full_forward(name, model.as_ref(), vocab as u32);
    }
}

/// The transformers fixture `name` (`tests/fixtures/hf`).
fn hf_fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf").join(name)
}

/// The model in `dir` (a transformers directory) as a generator for contexts of `max_len`, and its
/// vocabulary size.
fn generator(dir: &Path, max_len: usize) -> (Box<dyn Generator>, usize) {
    use ferrospeed_models::hf::{read_config, HfModel};
    let mut files = WeightFiles::open(dir).unwrap();
    match read_config(dir, max_len).unwrap() {
        HfModel::Llama(c) => (Box::new(LlamaInfer::load(c, &mut files, &Device::Cpu, max_len).unwrap()), c.vocab_size),
        HfModel::Gpt(c) => (Box::new(ferrospeed_models::gpt::infer::GptInfer::load(c, &mut files, &Device::Cpu).unwrap()), c.vocab_size),
    }
}

/// A copy of fixture `name` with seeded random weights of spread `std` (norm weights about 1): the
/// GPT-2 fixture's own initialisation is so small that greedy decoding repeats one token.
fn randomised(name: &str, std: f64, seed: u64) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(hf_fixture(name).join("config.json"), dir.path().join("config.json")).unwrap();
    let weights = candle_core::safetensors::load(hf_fixture(name).join("model.safetensors"), &Device::Cpu).unwrap();
    let mut rng = Rng::new(seed);
    // In name order: the map's own order changes from run to run, and with it every drawn value.
    let mut weights: Vec<(String, candle_core::Tensor)> = weights.into_iter().collect();
    weights.sort_by(|a, b| a.0.cmp(&b.0));
    let random: std::collections::HashMap<String, candle_core::Tensor> = weights
        .into_iter()
        .map(|(n, t)| {
            let base = if n.contains("ln") && n.ends_with("weight") { 1.0 } else { 0.0 };
            let v: Vec<f32> = (0..t.elem_count()).map(|_| (base + std * rng.normal()) as f32).collect();
            (n, candle_core::Tensor::from_vec(v, t.shape(), &Device::Cpu).unwrap())
        })
        .collect();
    candle_core::safetensors::save(&random, dir.path().join("model.safetensors")).unwrap();
    dir
}

/// The models the generation tests run: Llama fixtures (grouped and plain K/V heads, Qwen2's biases)
/// and GPT-2 with random weights, as (name, generator, vocabulary size).
fn generators(max_len: usize) -> Vec<(&'static str, Box<dyn Generator>, usize)> {
    let mut out: Vec<_> = ["gqa_untied", "mha_tied", "qwen2"].into_iter().map(|n| {
        let (g, v) = generator(&hf_fixture(n), max_len);
        (n, g, v)
    }).collect();
    // Random weights often settle on one repeated token, which would tell these tests little: the
    // first seed (from a fixed list, so always the same one) whose greedy continuation of the tests'
    // prompt changes token at least three times.
    let (g, v) = (17..49)
        .find_map(|seed| {
            let dir = randomised("gpt2", 0.5, seed);
            let (g, v) = generator(dir.path(), max_len);
            let prompt: Vec<u32> = (0..5u32).map(|i| (i * 7 + 3) % v as u32).collect();
            let (out, _) = g.generate(&prompt, 12, None, &mut greedy()).unwrap();
            (out.windows(2).filter(|w| w[0] != w[1]).count() >= 3).then_some((g, v))
        })
        .expect("a seed of 17..49 whose GPT-2 does not repeat one token");
    out.push(("gpt2 (random weights)", g, v));
    out
}

fn greedy() -> Sampler {
    Sampler::new(0.0, 1.0, Rng::new(0)).unwrap()
}

/// The most likely next token after `ids`, from a forward over all of them with a fresh cache.
fn argmax_of_full_forward(model: &dyn Generator, ids: &[u32]) -> u32 {
    let row: Vec<f32> = model.forward(ids, &mut KvCache::default()).unwrap().get(ids.len() - 1).unwrap().to_vec1().unwrap();
    (0..row.len()).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap() as u32
}

#[test]
fn greedy_generation_is_the_argmax_of_a_full_forward_at_every_step() {
    for (name, model, vocab) in generators(32) {
        let prompt: Vec<u32> = (0..5u32).map(|i| (i * 7 + 3) % vocab as u32).collect();
        let (out, _) = model.generate(&prompt, 10, None, &mut greedy()).unwrap();
        assert_eq!(out.len(), 10, "{name}: as many tokens as asked when nothing stops them");
        for k in 0..out.len() {
            let seen = [&prompt[..], &out[..k]].concat();
            assert_eq!(out[k], argmax_of_full_forward(model.as_ref(), &seen), "{name}: token {k} of {out:?}");
        }
        assert!(out.iter().any(|&t| t != out[0]), "{name}: a continuation of one repeated token tells little: {out:?}");
    }
}

#[test]
fn generation_stops_after_its_stop_token() {
    for (name, model, vocab) in generators(32) {
        let prompt: Vec<u32> = (0..5u32).map(|i| (i * 7 + 3) % vocab as u32).collect();
        let (free, _) = model.generate(&prompt, 12, None, &mut greedy()).unwrap();
        // The first token that was not generated before it: stopping at it ends the output there.
        let k = (1..free.len()).find(|&k| !free[..k].contains(&free[k])).unwrap_or_else(|| panic!("{name}: {free:?}"));
        let (stopped, _) = model.generate(&prompt, 12, Some(free[k]), &mut greedy()).unwrap();
        assert_eq!(stopped, free[..=k], "{name}: the output ends with the stop token {}", free[k]);
        // A stop token the model never produces stops nothing.
        let never = (0..vocab as u32).find(|t| !free.contains(t)).unwrap();
        assert_eq!(model.generate(&prompt, 12, Some(never), &mut greedy()).unwrap().0, free, "{name}");
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

#[test]
fn a_prepared_chat_is_what_sft_trains_on() {
    // transformers' apply_chat_template(return_assistant_tokens_mask=True) with SmolLM2's template given
    // {% generation %} markers where TRL's ChatML training templates have them (chat_masks.json): the
    // rendered conversation's ids, nothing appended (TRL adds no EOS to conversations), and 1 on each
    // reply with its <|im_end|> and newline.
    let Some(path) = smollm2("a_prepared_chat_is_what_sft_trains_on") else { return };
    let tok = GgufFile::open(&path).unwrap().tokenizer().unwrap();
    let f = json("chat_masks.json");
    let cases = f["cases"].as_array().unwrap();
    assert!(cases.len() >= 2);
    let dir = tempfile::tempdir().unwrap();
    let lines: String = cases.iter().map(|c| serde_json::json!({"messages": c["messages"]}).to_string() + "\n").collect();
    let input = dir.path().join("chat.jsonl");
    std::fs::write(&input, lines).unwrap();
    let out = dir.path().join("prepared");
    ferrospeed_models::prepared::prepare(&ferrospeed_models::prepared::PrepareOptions::new(vec![input], out.clone(), &tok)).unwrap();
    let data = ferrospeed_models::PreparedData::open(&out).unwrap();
    assert_eq!(data.documents(), cases.len());
    for (i, case) in cases.iter().enumerate() {
        let ids: Vec<u32> = case["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let mask: Vec<u8> = case["assistant_masks"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u8).collect();
        let (got_ids, got_mask) = data.document(i);
        assert_eq!(got_ids, ids, "case {i}: tokens");
        assert_eq!(got_mask, mask, "case {i}: loss mask");
        // The end: <|im_end|> and the template's newline once, both in the loss.
        let (n, eos) = (got_ids.len(), tok.eos_id().unwrap());
        assert_eq!((got_ids[n - 2], tok.decode(&got_ids[n - 1..]).unwrap().as_str(), &got_mask[n - 2..]), (eos, "\n", &[1u8, 1][..]), "case {i}");
    }
}

#[test]
fn an_export_of_a_gguf_model_writes_the_config_json_transformers_writes() {
    // config.json: transformers' save_pretrained of the model it loads from the GGUF. Ours must have
    // every key with the same value; the differences allowed are the element type (the export's own),
    // `transformers_version`, `_model_name_or_path`, and rope_theta at the top level (transformers 4.x's
    // layout, which 5.x reads) for 5.x's `rope_parameters` of the default rope.
    let Some(path) = smollm2("an_export_of_a_gguf_model_writes_the_config_json_transformers_writes") else { return };
    let c = GgufFile::open(&path).unwrap().llama_config(256).unwrap();
    let ours = ferrospeed_models::Family::Llama(ferrospeed_models::Llama::new(c)).export_config(Some(&path), "bfloat16").unwrap();
    let theirs = json("config.json");
    assert_eq!(ours["max_position_embeddings"], 8192, "the GGUF's context, not model.seq_len");
    assert_eq!(ours["torch_dtype"], "bfloat16");
    for (key, want) in theirs.as_object().unwrap() {
        match key.as_str() {
            "_model_name_or_path" | "transformers_version" | "dtype" | "torch_dtype" => {}
            "rope_parameters" => {
                assert_eq!(want["rope_type"], "default");
                assert_eq!(ours["rope_theta"], want["rope_theta"], "rope_theta");
                assert!(ours["rope_scaling"].is_null(), "{}", ours["rope_scaling"]);
            }
            _ => assert_eq!(&ours[key.as_str()], want, "config.json key {key}"),
        }
    }
}
