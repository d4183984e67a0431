//! `[lora]` through `ferrospeed train` on CPU, from a transformers directory: adapters train on the
//! frozen base (stages bitwise, a resumed run bitwise an uninterrupted one), the checkpoint holds the
//! adapters alone, `checkpoint export --adapter` writes a PEFT directory (its config keys, and
//! `base_model.model.…lora_A/B.weight` tensors of PEFT's shapes equal to the checkpoint's), a plain
//! export is refused, and bad `[lora]` settings are one line with nothing written.

mod support;

use std::path::{Path, PathBuf};
use support::*;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../ferrospeed-models/tests/fixtures/hf/gqa_untied")
}


fn config(dir: &Path, lora: &str) -> PathBuf {
    let model = format!("seq_len = 8\ninit_from = \"{}\"\ntokenizer = \"{}\"", fixture().display(), word_tokenizer(dir).display());
    let path = write_config(dir, &model, "steps = 4\nglobal_batch = 4\nmicro_batch = 1\nwarmup = 1\nlr = 1e-2");
    let text = std::fs::read_to_string(&path).unwrap() + &format!("\n[lora]\n{lora}\n");
    std::fs::write(&path, text).unwrap();
    path
}

fn safetensors(path: &Path) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(name, v)| (name, v.shape().to_vec(), v.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[test]
fn adapters_train_resume_and_export_as_a_peft_directory() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "r = 4\nalpha = 8\ntargets = \"all-linear\"");
    let ckpt = dir.path().join("ckpt");
    let ck = |d: &Path| vec![format!("checkpoint.dir={}", d.display()), "checkpoint.every=2".into()];
    let full = train(2, &cfg, &dir.path().join("full"), &[ck(&ckpt), vec!["zero.stage=3".into()]].concat());
    assert!(full.iter().all(|(_, l)| l.is_finite()), "{full:?}");
    let s0 = train(2, &cfg, &dir.path().join("s0"), &[]);
    assert_eq!(bits(&s0), bits(&full), "stage 3 vs stage 0");
    // Resumed from step 2: the adapters from the checkpoint, the base from model.init_from again.
    let root = root_with(&ckpt.join("step-00000002"), &dir.path().join("resume-from"));
    let resumed = train(2, &cfg, &dir.path().join("resumed"), &[format!("checkpoint.dir={}", root.display()), "zero.stage=1".into()]);
    assert_eq!(bits(&resumed), bits(&full[2..]), "resumed vs uninterrupted");
    // A pipeline of two stages (the frozen base split with its blocks) trains the bits of one rank.
    let w1 = train(1, &cfg, &dir.path().join("w1"), &[]);
    let pp2 = train(2, &cfg, &dir.path().join("pp2"), &["parallel.pp=2".into()]);
    assert_eq!(bits(&pp2), bits(&w1), "pp 2 vs one rank");
    let zb = train(2, &cfg, &dir.path().join("pp2-zb"), &["parallel.pp=2".into(), "parallel.pp_schedule=zb".into(), "zero.stage=3".into()]);
    assert_eq!(bits(&zb), bits(&w1), "pp 2 zero-bubble at stage 3 vs one rank");

    // A plain export is refused: the checkpoint is not a model.
    let step = ckpt.join("step-00000004");
    let mut cmd = ferrospeed();
    cmd.args(["checkpoint", "export"]).arg(&step).arg(dir.path().join("plain"));
    let f = run(&mut cmd, std::time::Duration::from_secs(60));
    assert_eq!(f.status.code(), Some(2), "{}", f.stderr);
    assert!(f.stderr.contains("--adapter") && !dir.path().join("plain").exists(), "{}", f.stderr);

    // The PEFT directory.
    let out = dir.path().join("adapter");
    let mut cmd = ferrospeed();
    cmd.args(["checkpoint", "export"]).arg(&step).arg(&out).args(["--adapter", "--dtype", "f32"]);
    let f = run(&mut cmd, std::time::Duration::from_secs(60));
    assert!(f.status.success(), "{}\n{}", f.stdout, f.stderr);
    let conf: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(conf["peft_type"], "LORA");
    assert_eq!(conf["task_type"], "CAUSAL_LM");
    assert_eq!((conf["r"].as_u64(), conf["lora_alpha"].as_f64(), conf["use_rslora"].as_bool()), (Some(4), Some(8.0), Some(false)));
    let targets: Vec<&str> = conf["target_modules"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    assert_eq!(targets, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]);
    assert!(conf["base_model_name_or_path"].as_str().unwrap().ends_with("gqa_untied"), "{conf}");
    let tensors = safetensors(&out.join("adapter_model.safetensors"));
    let hf: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture().join("config.json")).unwrap()).unwrap();
    let (d, layers) = (hf["hidden_size"].as_u64().unwrap() as usize, hf["num_hidden_layers"].as_u64().unwrap() as usize);
    assert_eq!(tensors.len(), 2 * 7 * layers, "{:?}", tensors.iter().map(|t| &t.0).collect::<Vec<_>>());
    let q_a = tensors.iter().find(|t| t.0 == "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight").expect("PEFT's name for layer 0's q_proj A");
    assert_eq!(q_a.1, vec![4, d], "A is [r, in]");
    let down_b = tensors.iter().find(|t| t.0 == "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight").expect("layer 1's down_proj B");
    assert_eq!(down_b.1, vec![d, 4], "B is [out, r]");
    assert!(down_b.2.iter().any(|&x| x != 0.0), "B trained away from zero");
    // Merged into the base: W + s·B·A for each adapted projection (s = alpha / r = 2), the rest as it was.
    let merged = dir.path().join("merged");
    let mut cmd = ferrospeed();
    cmd.args(["checkpoint", "export"]).arg(&step).arg(&merged).arg("--merge");
    let f = run(&mut cmd, std::time::Duration::from_secs(60));
    assert!(f.status.success(), "{}\n{}", f.stdout, f.stderr);
    let base = safetensors(&fixture().join("model.safetensors"));
    let got = safetensors(&merged.join("model.safetensors"));
    assert_eq!(got.iter().map(|t| (&t.0, &t.1)).collect::<Vec<_>>(), base.iter().map(|t| (&t.0, &t.1)).collect::<Vec<_>>(), "the base's tensors, in its dtype (f32)");
    let mut adapted_count = 0;
    for ((name, shape, w), (_, _, m)) in base.iter().zip(&got) {
        let module = name.strip_suffix(".weight").unwrap_or(name);
        let a = tensors.iter().find(|t| t.0 == format!("base_model.model.{module}.lora_A.weight"));
        let b = tensors.iter().find(|t| t.0 == format!("base_model.model.{module}.lora_B.weight"));
        match (a, b) {
            (Some(a), Some(b)) => {
                adapted_count += 1;
                let (out_f, in_f) = (shape[0], shape[1]);
                for o in 0..out_f {
                    for i in 0..in_f {
                        let d: f64 = (0..4).map(|k| f64::from(b.2[o * 4 + k]) * f64::from(a.2[k * in_f + i])).sum();
                        let want = f64::from(w[o * in_f + i]) + 2.0 * d;
                        assert!((f64::from(m[o * in_f + i]) - want).abs() <= 1e-6 + 1e-6 * want.abs(), "{name}[{o}, {i}]");
                    }
                }
            }
            _ => assert_eq!(w, m, "{name} is not adapted: unchanged"),
        }
    }
    assert_eq!(adapted_count, 14, "every projection of both layers merged");
    // generate reads the checkpoint through the merge.
    let mut cmd = ferrospeed();
    cmd.args(["generate", "--model"]).arg(&step).args(["--prompt", "the a of", "--max-tokens", "3"]);
    let f = run(&mut cmd, std::time::Duration::from_secs(60));
    assert!(f.status.success(), "generate: {}\n{}", f.stdout, f.stderr);
    // Tensor for tensor the checkpoint's values (its single-file export under ferrospeed's names).
    let whole = dir.path().join("ck.safetensors");
    ferrospeed::checkpoint::export(&step, &whole, &ferrospeed::accelerator::block_dot_param).unwrap();
    let ours = safetensors(&whole);
    assert_eq!(ours.len(), tensors.len());
    for (name, shape, values) in &ours {
        let peft = format!("base_model.model.model.{name}");
        let t = tensors.iter().find(|t| t.0 == peft).unwrap_or_else(|| panic!("{peft} is missing"));
        assert!(t.1 == *shape && t.2 == *values, "{peft} differs from the checkpoint's {name}");
    }
}

/// `train` refused with exit 2, `needles` in one line of stderr, nothing written.
fn refused(dir: &Path, lora: &str, needles: &[&str]) {
    let cfg = config(dir, lora);
    let track = dir.join("track-refused");
    let f = run(&mut train_command(1, &cfg, &track, &[]), std::time::Duration::from_secs(60));
    assert_eq!(f.status.code(), Some(2), "{lora}: {}\n{}", f.stdout, f.stderr);
    assert!(f.stderr.lines().any(|l| needles.iter().all(|n| l.contains(n))), "{lora}: no line with {needles:?} in:\n{}", f.stderr);
    assert!(!track.exists(), "{lora}: nothing is written");
}

#[test]
fn bad_lora_settings_are_one_line_with_nothing_written() {
    let dir = tempfile::tempdir().unwrap();
    refused(dir.path(), "targets = [\"q_porj\"]", &["lora.targets", "\"q_porj\" matches no module", "self_attn.q_proj"]);
    refused(dir.path(), "r = 0", &["lora.r"]);
    refused(dir.path(), "alpha = -1", &["lora.alpha"]);
    refused(dir.path(), "dropout = 0.1", &["lora.dropout", "not built yet"]);
    refused(dir.path(), "base = \"nf4\"\n[zero]\nstage = 3", &["lora.base", "zero.stage = 3"]);
    // NF4 needs linear weights of whole blocks of 64 values.
    let cfg = write_config(dir.path(), "kind = \"llama\"\nn_layer = 1\nn_head = 2\nd_model = 20\nseq_len = 8", "steps = 1\nglobal_batch = 2\nmicro_batch = 1\nwarmup = 0");
    std::fs::write(&cfg, std::fs::read_to_string(&cfg).unwrap() + "\n[lora]\nbase = \"nf4\"\n").unwrap();
    let track = dir.path().join("track-nf4");
    let f = run(&mut train_command(1, &cfg, &track, &[]), std::time::Duration::from_secs(60));
    assert_eq!(f.status.code(), Some(2), "{}", f.stderr);
    assert!(f.stderr.lines().any(|l| l.contains("lora.base = \"nf4\"") && l.contains("[20, 20]") && l.contains("block of 64")), "{}", f.stderr);
    assert!(!track.exists());
}

#[test]
fn qlora_trains_on_an_nf4_base_from_a_transformers_directory() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "r = 4\nalpha = 8\nbase = \"nf4\"");
    let nf4 = train(2, &cfg, &dir.path().join("nf4"), &["zero.stage=2".into()]);
    let s0 = train(2, &cfg, &dir.path().join("nf4-s0"), &[]);
    assert_eq!(bits(&nf4), bits(&s0), "NF4 base: stage 2 vs stage 0");
    let bf16 = train(2, &cfg, &dir.path().join("bf16"), &["lora.base=bf16".into()]);
    // The first step's loss is the quantised base's: close to the full-precision one; then both train.
    assert!((nf4[0].1 - bf16[0].1).abs() < 0.02 * bf16[0].1, "NF4 {nf4:?} vs the full-precision base {bf16:?}");
    assert!(nf4.iter().all(|(_, l)| l.is_finite()) && nf4[3].1 < nf4[0].1, "{nf4:?}");
    assert_ne!(bits(&nf4), bits(&bf16), "the base is quantised");
}

/// The PEFT fixtures (ferrospeed-models/tests/fixtures/make_peft_fixtures.py).
fn peft_fixture(variant: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../ferrospeed-models/tests/fixtures/peft").join(variant)
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// `target_modules` as the adapted modules of each layer (PEFT writes full names or suffixes).
fn adapted(conf: &serde_json::Value) -> Vec<[bool; 7]> {
    let t: Vec<String> = conf["target_modules"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();
    ferrospeed_models::ops::lora::resolve_targets(2, &t).unwrap()
}

#[test]
fn a_peft_adapter_imports_and_exports_tensor_for_tensor_with_pefts_config_keys() {
    for variant in ["all_linear", "qv_rslora"] {
        let dir = tempfile::tempdir().unwrap();
        let src = peft_fixture(variant);
        let theirs = json(&src.join("adapter_config.json"));
        let targets: Vec<String> = theirs["target_modules"].as_array().unwrap().iter().map(|v| format!("{v}")).collect();
        let lora = format!("r = {}\nalpha = {}\nrslora = {}\ntargets = [{}]", theirs["r"], theirs["lora_alpha"], theirs["use_rslora"], targets.join(", "));
        let cfg = config(dir.path(), &lora);
        std::fs::write(&cfg, std::fs::read_to_string(&cfg).unwrap().replace("steps = 4", "steps = 0").replace("warmup = 1", "warmup = 0").replace("[model]\n", &format!("[model]\nadapter_from = \"{}\"\n", src.display()))).unwrap();
        let ckpt = dir.path().join("ckpt");
        train(1, &cfg, &dir.path().join("track"), &[format!("checkpoint.dir={}", ckpt.display())]);
        let out = dir.path().join("adapter");
        let mut cmd = ferrospeed();
        cmd.args(["checkpoint", "export"]).arg(&ckpt).arg(&out).args(["--adapter", "--dtype", "f32"]);
        let f = run(&mut cmd, std::time::Duration::from_secs(60));
        assert!(f.status.success(), "{}\n{}", f.stdout, f.stderr);
        assert_eq!(safetensors(&out.join("adapter_model.safetensors")), safetensors(&src.join("adapter_model.safetensors")), "{variant}: tensor for tensor");
        let ours = json(&out.join("adapter_config.json"));
        for key in ours.as_object().unwrap().keys() {
            assert!(theirs.get(key).is_some(), "{variant}: {key} is not a key of PEFT's adapter_config.json");
        }
        for key in ["peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "use_rslora", "bias", "fan_in_fan_out", "modules_to_save", "layers_to_transform"] {
            assert!(ours[key] == theirs[key] || ours[key].as_f64().is_some() && ours[key].as_f64() == theirs[key].as_f64(), "{variant}: {key} {} vs PEFT's {}", ours[key], theirs[key]);
        }
        assert_eq!(adapted(&ours), adapted(&theirs), "{variant}: the same modules adapted");
    }
    // An adapter of another rank is refused before anything runs.
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "r = 8\nalpha = 8\ntargets = \"all-linear\"");
    std::fs::write(&cfg, std::fs::read_to_string(&cfg).unwrap().replace("[model]\n", &format!("[model]\nadapter_from = \"{}\"\n", peft_fixture("all_linear").display()))).unwrap();
    let track = dir.path().join("track");
    let f = run(&mut train_command(1, &cfg, &track, &[]), std::time::Duration::from_secs(60));
    assert_eq!(f.status.code(), Some(2), "{}", f.stderr);
    assert!(f.stderr.lines().any(|l| l.contains("model.adapter_from") && l.contains("its r is 4") && l.contains("lora.r = 4")), "{}", f.stderr);
    assert!(!track.exists());
}
