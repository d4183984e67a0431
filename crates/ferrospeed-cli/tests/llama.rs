//! The Llama family through `ferrospeed train` on CPU: bitwise across ZeRO stages 0–3 at world 1, 2
//! and 3, within 1e-5 across world sizes, resume bit for bit; transformers directories (Llama, GPT-2)
//! import and export (sharded, bf16) with the weights unchanged, and transformers loads the export
//! where Python has it; an export writes back its source's config.json key by key (architecture,
//! positions, rope, biases) and tokenizer files byte for byte, and an old checkpoint's recorded config
//! as before; bad model directories are refused in one line with nothing written, by `train` and by
//! `generate`.

mod support;

use std::path::{Path, PathBuf};
use support::*;

const LLAMA: &str = "kind = \"llama\"\nn_layer = 2\nn_head = 4\nn_kv_head = 2\nd_model = 32\nseq_len = 32";
const STEPS: &str = "steps = 6\nglobal_batch = 12\nmicro_batch = 2\nwarmup = 1\nlr = 3e-3";

fn fixture(variant: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../ferrospeed-models/tests/fixtures/hf").join(variant)
}

fn close(a: &[(u64, f64)], b: &[(u64, f64)], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    for ((s, x), (_, y)) in a.iter().zip(b) {
        assert!((x - y).abs() <= 1e-5 * y.abs(), "{what}: step {s} loss {x} vs {y}");
    }
}

#[test]
fn llama_is_bitwise_across_stages_and_close_across_world_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), LLAMA, STEPS);
    let reference = train(1, &config, &dir.path().join("w1s0"), &[]);
    assert!(reference.last().unwrap().1 < reference[0].1, "the loss falls: {reference:?}");
    for stage in 1..=3 {
        let got = train(1, &config, &dir.path().join(format!("w1s{stage}")), &[format!("zero.stage={stage}")]);
        assert_eq!(bits(&got), bits(&reference), "world 1 stage {stage} vs stage 0");
    }
    for world in [2, 3] {
        let base = train(world, &config, &dir.path().join(format!("w{world}s0")), &[]);
        close(&base, &reference, &format!("world {world} vs world 1"));
        for stage in 1..=3 {
            let got = train(world, &config, &dir.path().join(format!("w{world}s{stage}")), &[format!("zero.stage={stage}")]);
            assert_eq!(bits(&got), bits(&base), "world {world} stage {stage} vs stage 0");
        }
    }
}

#[test]
fn llama_resumes_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), LLAMA, STEPS);
    let ckpt = dir.path().join("ckpt");
    let full = train(2, &config, &dir.path().join("full"), &[format!("checkpoint.dir={}", ckpt.display()), "checkpoint.every=3".into(), "zero.stage=3".into()]);
    let root = root_with(&ckpt.join("step-00000003"), &dir.path().join("resume-from"));
    let resumed = train(1, &config, &dir.path().join("resumed"), &[format!("checkpoint.dir={}", root.display()), "zero.stage=1".into()]);
    let resumed_w2 = train(2, &config, &dir.path().join("resumed-w2"), &[format!("checkpoint.dir={}", root_with(&ckpt.join("step-00000003"), &dir.path().join("again")).display())]);
    assert_eq!(bits(&resumed_w2), bits(&full[3..]), "resumed at world 2 vs uninterrupted");
    close(&resumed, &full[3..], "resumed at world 1 vs uninterrupted");
}

/// Every tensor of a safetensors file or directory, as (name, dtype, shape, raw bytes).
fn tensors(path: &Path) -> Vec<(String, String, Vec<usize>, Vec<u8>)> {
    let files: Vec<PathBuf> = if path.is_dir() {
        let mut v: Vec<PathBuf> = std::fs::read_dir(path).unwrap().flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|e| e == "safetensors")).collect();
        v.sort();
        v
    } else {
        vec![path.to_path_buf()]
    };
    let mut out = Vec::new();
    for f in files {
        let bytes = std::fs::read(&f).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        for (name, view) in st.tensors() {
            out.push((name, format!("{:?}", view.dtype()), view.shape().to_vec(), view.data().to_vec()));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Import `init_from`, train 0 steps (save the imported weights as a checkpoint) and export it.
fn import_export(dir: &Path, init_from: &Path, out: &Path, export_args: &[&str]) {
    let model = format!("seq_len = 8\ninit_from = \"{}\"\ntokenizer = \"{}\"", init_from.display(), word_tokenizer(dir).display());
    import_export_model(dir, &model, out, export_args);
}

/// [`import_export`] with the `[model]` keys `model`.
fn import_export_model(dir: &Path, model: &str, out: &Path, export_args: &[&str]) {
    let config = write_config(dir, model, "steps = 0\nglobal_batch = 2\nmicro_batch = 1\nwarmup = 0");
    let ckpt = dir.join(format!("ckpt-{}", out.file_name().unwrap().to_string_lossy()));
    train(2, &config, &dir.join(format!("track-{}", out.file_name().unwrap().to_string_lossy())), &[format!("checkpoint.dir={}", ckpt.display()), "zero.stage=3".into()]);
    let mut cmd = ferrospeed();
    cmd.args(["checkpoint", "export"]).arg(&ckpt).arg(out).args(export_args);
    let f = run(&mut cmd, std::time::Duration::from_secs(60));
    assert!(f.status.success(), "export failed:\n{}\n{}", f.stdout, f.stderr);
}


#[test]
fn a_transformers_directory_imports_and_exports_with_the_weights_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixture("gqa_untied");
    // f32 in, f32 out: the same tensors, bit for bit.
    let f32_out = dir.path().join("f32");
    import_export(dir.path(), &src, &f32_out, &["--dtype", "f32"]);
    assert_eq!(tensors(&f32_out), tensors(&src.join("model.safetensors")));
    for f in ["config.json", "tokenizer.json"] {
        assert!(f32_out.join(f).is_file(), "the export has {f}");
    }
    // Sharded bf16 (shards of 8 KB) with its index, imported again and exported: unchanged.
    let bf16 = dir.path().join("bf16");
    import_export(dir.path(), &f32_out, &bf16, &["--max-shard-gb", "0.000008"]);
    let index: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(bf16.join("model.safetensors.index.json")).unwrap()).unwrap();
    assert!(index["weight_map"].as_object().unwrap().len() == tensors(&src.join("model.safetensors")).len());
    assert!(tensors(&bf16).iter().all(|t| t.1 == "BF16"));
    assert!(std::fs::read_dir(&bf16).unwrap().count() > 4, "several shards");
    let again = dir.path().join("bf16-again");
    import_export(dir.path(), &bf16, &again, &[]);
    assert_eq!(tensors(&again), tensors(&bf16), "a bf16 import exports the same bits");
    // F16 the same way.
    let f16 = dir.path().join("f16");
    import_export(dir.path(), &f32_out, &f16, &["--dtype", "f16"]);
    assert!(tensors(&f16).iter().all(|t| t.1 == "F16"));
    let f16_again = dir.path().join("f16-again");
    import_export(dir.path(), &f16, &f16_again, &["--dtype", "f16"]);
    assert_eq!(tensors(&f16_again), tensors(&f16), "an f16 import exports the same bits");
    // Where transformers is installed, it loads the export and reproduces the fixture's logits.
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ferrospeed-models/tests/fixtures/make_hf_fixtures.py");
    let has_transformers = std::process::Command::new("python3").args(["-c", "import transformers"]).output().is_ok_and(|o| o.status.success());
    if has_transformers {
        let out = std::process::Command::new("python3").arg(&script).arg("--check-export").arg(&f32_out).arg("gqa_untied").output().unwrap();
        assert!(out.status.success(), "transformers on the export:\n{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    } else {
        eprintln!("python3 with transformers not found: the from_pretrained check of the export did not run");
    }
    // A GPT-2 directory the same way (its tied head is not stored, as transformers writes it).
    let gpt2 = dir.path().join("gpt2");
    import_export(dir.path(), &fixture("gpt2"), &gpt2, &["--dtype", "f32"]);
    assert_eq!(tensors(&gpt2), tensors(&fixture("gpt2").join("model.safetensors")));
    if has_transformers {
        let out = std::process::Command::new("python3").arg(&script).arg("--check-export").arg(&gpt2).arg("gpt2").output().unwrap();
        assert!(out.status.success(), "transformers on the GPT-2 export:\n{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }
    // Exporting over a non-empty directory is refused, and leaves it as it was.
    let mut cmd = ferrospeed();
    cmd.args(["checkpoint", "export"]).arg(dir.path().join("ckpt-f32")).arg(&bf16);
    let f = run(&mut cmd, std::time::Duration::from_secs(60));
    assert_eq!(f.status.code(), Some(2), "{}", f.stderr);
    assert!(f.stderr.contains("already exists"), "{}", f.stderr);
}

/// `train` on a model directory refused with exit 2, `needles` in one line of stderr, nothing written.
fn refused(dir: &Path, model_dir: &Path, extra: &str, needles: &[&str]) {
    let config = write_config(dir, &format!("seq_len = 8\ninit_from = \"{}\"{extra}", model_dir.display()), "steps = 1\nglobal_batch = 2\nmicro_batch = 1\nwarmup = 0");
    let track = dir.join("track-refused");
    let f = run(&mut train_command(1, &config, &track, &[]), std::time::Duration::from_secs(60));
    assert_eq!(f.status.code(), Some(2), "{}\n{}", f.stdout, f.stderr);
    assert!(f.stderr.lines().any(|l| needles.iter().all(|n| l.contains(n))), "no line with {needles:?} in:\n{}", f.stderr);
    // One line: the rank's error is the only one it prints (the launcher adds its own two).
    let errors: Vec<&str> = f.stderr.lines().filter(|l| l.contains("error:")).collect();
    assert_eq!(errors.len(), 1, "one error line, got:\n{}", f.stderr);
    assert!(!track.exists(), "nothing is written");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn bad_model_directories_are_refused_in_one_line_with_nothing_written() {
    let dir = tempfile::tempdir().unwrap();
    let tok = word_tokenizer(dir.path());
    let with_tok = format!("\ntokenizer = \"{}\"", tok.display());
    // An architecture we do not train.
    let mamba = dir.path().join("mamba");
    copy_dir(&fixture("gqa_untied"), &mamba);
    let text = std::fs::read_to_string(mamba.join("config.json")).unwrap().replace("LlamaForCausalLM", "MambaForCausalLM");
    std::fs::write(mamba.join("config.json"), text).unwrap();
    refused(dir.path(), &mamba, &with_tok, &["MambaForCausalLM", "config.json"]);
    // A shard the index names is missing.
    let sharded = dir.path().join("sharded");
    copy_dir(&fixture("gqa_untied"), &sharded);
    std::fs::rename(sharded.join("model.safetensors"), sharded.join("model-00001-of-00002.safetensors")).unwrap();
    let index = serde_json::json!({"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors", "lm_head.weight": "model-00002-of-00002.safetensors"}});
    std::fs::write(sharded.join("model.safetensors.index.json"), index.to_string()).unwrap();
    refused(dir.path(), &sharded, &with_tok, &["model-00002-of-00002.safetensors", "missing"]);
    // A tokenizer.json that does not parse.
    let broken = dir.path().join("broken-tokenizer");
    copy_dir(&fixture("gqa_untied"), &broken);
    std::fs::write(broken.join("tokenizer.json"), "{ not json").unwrap();
    refused(dir.path(), &broken, "", &["tokenizer.json", "is not a tokenizer.json"]);
    // Explicit TOML keys that disagree with config.json name the key.
    refused(dir.path(), &fixture("gqa_untied"), &format!("{with_tok}\nn_layer = 3"), &["model.n_layer = 3", "num_hidden_layers = 2"]);
    refused(dir.path(), &fixture("gqa_untied"), &format!("{with_tok}\nn_kv_head = 4"), &["model.n_kv_head = 4", "num_key_value_heads = 2"]);
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

#[test]
fn an_export_writes_back_the_source_config_json_and_tokenizer_files() {
    let dir = tempfile::tempdir().unwrap();
    // (fixture, export dtype): Qwen2 stays Qwen2ForCausalLM; Llama's biases, Llama 3 rope scaling, GPT-2.
    for (variant, dtype, torch) in [("qwen2", "f32", "float32"), ("llama_attention_bias", "f32", "float32"), ("llama_mlp_bias", "f16", "float16"), ("gqa_llama3_rope", "bf16", "bfloat16"), ("gpt2", "bf16", "bfloat16")] {
        // The source: the fixture as transformers saved it, with tokenizer files of its own.
        let src = dir.path().join(format!("src-{variant}"));
        copy_dir(&fixture(variant), &src);
        std::fs::copy(word_tokenizer(dir.path()), src.join("tokenizer.json")).unwrap();
        std::fs::write(src.join("tokenizer_config.json"), "{\"model_max_length\": 64, \"clean_up_tokenization_spaces\": false}\n").unwrap();
        let out = dir.path().join(format!("out-{variant}"));
        import_export_model(dir.path(), &format!("seq_len = 8\ninit_from = \"{}\"", src.display()), &out, &["--dtype", dtype]);
        // config.json key by key: the fixture's (made by transformers) with one difference allowed,
        // the element type of the export under the key the source used (5.x `dtype`).
        let (want, got) = (read_json(&src.join("config.json")), read_json(&out.join("config.json")));
        let keys = |v: &serde_json::Value| v.as_object().unwrap().keys().cloned().collect::<std::collections::BTreeSet<_>>();
        assert_eq!(keys(&got), keys(&want), "{variant}: the keys of config.json");
        for key in keys(&want) {
            let expected = if key == "dtype" { serde_json::json!(torch) } else { want[&key].clone() };
            assert_eq!(got[&key], expected, "{variant}: config.json key {key}");
        }
        for f in ["tokenizer.json", "tokenizer_config.json"] {
            assert_eq!(std::fs::read(out.join(f)).unwrap(), std::fs::read(src.join(f)).unwrap(), "{variant}: {f} as the source's");
        }
        // f32: every tensor, the biases with the rest, bit for bit.
        if dtype == "f32" {
            assert_eq!(tensors(&out), tensors(&src.join("model.safetensors")), "{variant}: tensors");
        }
    }
    let names: Vec<String> = tensors(&dir.path().join("out-llama_mlp_bias")).into_iter().map(|t| t.0).collect();
    for b in ["mlp.gate_proj.bias", "mlp.up_proj.bias", "mlp.down_proj.bias"] {
        assert!(names.contains(&format!("model.layers.1.{b}")), "the f16 export has {b}: {names:?}");
    }
    // transformers loads the f32 bias exports (Qwen2ForCausalLM again, no o_proj.bias missing) and
    // reproduces the fixtures' logits, where Python has it.
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ferrospeed-models/tests/fixtures/make_hf_fixtures.py");
    if std::process::Command::new("python3").args(["-c", "import transformers"]).output().is_ok_and(|o| o.status.success()) {
        for variant in ["llama_attention_bias", "qwen2"] {
            let out = std::process::Command::new("python3").arg(&script).arg("--check-export").arg(dir.path().join(format!("out-{variant}"))).arg(variant).output().unwrap();
            assert!(out.status.success(), "transformers on the {variant} export:\n{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        }
    }
}

#[test]
fn an_old_checkpoint_exports_its_recorded_config_as_before() {
    // Checkpoints from before the source's config.json was recorded hold the model's shape in
    // `run.hf_config` (max_position_embeddings = the training seq_len, `torch_dtype`): exported as it is,
    // the element type set.
    let dir = tempfile::tempdir().unwrap();
    let first = dir.path().join("first");
    import_export(dir.path(), &fixture("gqa_untied"), &first, &["--dtype", "f32"]);
    let ckpt = dir.path().join("ckpt-first");
    let step = std::fs::read_dir(&ckpt).unwrap().flatten().map(|e| e.path()).find(|p| p.file_name().unwrap().to_string_lossy().starts_with("step-")).unwrap();
    let old = serde_json::json!({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 16, "intermediate_size": 32,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 4, "vocab_size": 64, "max_position_embeddings": 8,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "rope_scaling": null, "tie_word_embeddings": false, "attention_bias": false, "mlp_bias": false,
        "hidden_act": "silu", "initializer_range": 0.2, "torch_dtype": "float32", "use_cache": true});
    let mut meta = read_json(&step.join("meta.json"));
    meta["run"]["hf_config"] = old.clone();
    std::fs::write(step.join("meta.json"), serde_json::to_vec_pretty(&meta).unwrap()).unwrap();
    let out = dir.path().join("old-export");
    let f = run(ferrospeed().args(["checkpoint", "export"]).arg(&ckpt).arg(&out), std::time::Duration::from_secs(60));
    assert!(f.status.success(), "{}", f.stderr);
    let mut want = old;
    want["torch_dtype"] = "bfloat16".into();
    assert_eq!(read_json(&out.join("config.json")), want);
}

#[test]
fn generate_refuses_weights_its_config_json_does_not_describe() {
    let dir = tempfile::tempdir().unwrap();
    let generate = |model: &Path| run(ferrospeed().args(["generate", "--device", "cpu", "--max-tokens", "2", "--prompt", "the", "--model"]).arg(model), std::time::Duration::from_secs(60));
    // The fixture with a tokenizer generates.
    let good = dir.path().join("good");
    copy_dir(&fixture("gqa_untied"), &good);
    std::fs::copy(word_tokenizer(dir.path()), good.join("tokenizer.json")).unwrap();
    let f = generate(&good);
    assert!(f.status.success(), "{}", f.stderr);
    // A config.json whose shape the tensors do not have: refused like train, naming the tensor.
    let wrong = dir.path().join("wrong-shape");
    copy_dir(&good, &wrong);
    let text = std::fs::read_to_string(wrong.join("config.json")).unwrap().replace("\"intermediate_size\": 32", "\"intermediate_size\": 48");
    std::fs::write(wrong.join("config.json"), text).unwrap();
    let f = generate(&wrong);
    assert_eq!(f.status.code(), Some(2), "{}", f.stderr);
    assert!(f.stderr.contains("mlp.gate_proj.weight has shape [32, 16] there but [48, 16]"), "{}", f.stderr);
    // Biases the config does not ask for: refused naming the first, not silently dropped.
    let biased = dir.path().join("biased");
    copy_dir(&fixture("llama_attention_bias"), &biased);
    std::fs::copy(word_tokenizer(dir.path()), biased.join("tokenizer.json")).unwrap();
    let text = std::fs::read_to_string(biased.join("config.json")).unwrap().replace("\"attention_bias\": true", "\"attention_bias\": false");
    std::fs::write(biased.join("config.json"), text).unwrap();
    let f = generate(&biased);
    assert_eq!(f.status.code(), Some(2), "{}", f.stderr);
    assert!(f.stderr.contains("model.layers.0.self_attn.") && f.stderr.contains("_proj.bias") && f.stderr.contains("does not use"), "{}", f.stderr);
}
