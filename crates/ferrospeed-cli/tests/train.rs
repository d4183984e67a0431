//! `ferrospeed train` end to end: parity across world sizes, bitwise repeats, bad configs, run safety.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;
use support::*;

/// The tiny model with 20 steps.
fn tiny_config(dir: &Path) -> PathBuf {
    write_config(dir, TINY, "steps = 20\nglobal_batch = 8\nmicro_batch = 2\nlr = 3e-3\nwarmup = 2")
}

/// Train under `launch` with `nproc` ranks and `--set`s; returns the per-step losses.
fn losses(nproc: usize, config: &Path, track: &Path, sets: &[&str]) -> Vec<f64> {
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    train(nproc, config, track, &sets).into_iter().map(|(_, loss)| loss).collect()
}

#[test]
fn world_sizes_1_2_4_agree_and_repeats_are_bitwise() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_config(dir.path());
    let w1 = losses(1, &config, &dir.path().join("w1"), &[]);
    let w2 = losses(2, &config, &dir.path().join("w2"), &[]);
    let w4 = losses(4, &config, &dir.path().join("w4"), &[]);
    assert_eq!(w1.len(), 20);
    for (name, other) in [("world 2", &w2), ("world 4", &w4)] {
        for (step, (a, b)) in w1.iter().zip(other.iter()).enumerate() {
            assert!(((a - b) / a).abs() < 1e-5, "{name} step {}: {a} vs {b}", step + 1);
        }
    }
    assert!(w1[19] < w1[0] - 0.5, "the loss falls: {w1:?}");
    let again = losses(2, &config, &dir.path().join("w2-again"), &[]);
    let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&w2), bits(&again), "two runs at world size 2 must be bitwise identical");
}

#[test]
fn outputs_are_complete_and_an_earlier_run_is_never_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_config(dir.path());
    let track = dir.path().join("run");
    losses(1, &config, &track, &["train.steps=3", "train.sample_tokens=20"]);
    for file in ["metrics.jsonl", "config.json", "summary.json"] {
        assert!(track.join(file).is_file(), "{file} missing");
    }
    assert!(std::fs::read_dir(&track).unwrap().flatten().any(|e| e.file_name().to_string_lossy().starts_with("events.out.tfevents")));
    let line = std::fs::read_to_string(track.join("metrics.jsonl")).unwrap().lines().next().unwrap().to_string();
    let m: serde_json::Value = serde_json::from_str(&line).unwrap();
    for key in ["step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "mfu", "step_ms", "peak_mem_bytes"] {
        assert!(m.get(key).is_some(), "metrics.jsonl lacks {key}: {line}");
    }
    let before = std::fs::read(track.join("metrics.jsonl")).unwrap();
    let f = run(
        ferrospeed().args(["train", "--config", &config.display().to_string(), "--set", &format!("track.dir={}", track.display())]),
        Duration::from_secs(60),
    );
    assert_eq!(f.status.code(), Some(2), "{}", f.stderr);
    assert!(f.stderr.contains("already") && f.stderr.contains("track.dir"), "{}", f.stderr);
    assert_eq!(std::fs::read(track.join("metrics.jsonl")).unwrap(), before, "the earlier run is untouched");
}

#[test]
fn bad_configs_are_one_line_exit_2_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let good = std::fs::read_to_string(tiny_config(dir.path())).unwrap();
    let track = dir.path().join("never");
    // (edit of the good config, --set overrides, fragments the message must contain)
    let cases: Vec<(String, Vec<&str>, Vec<&str>)> = vec![
        (good.replace("steps = 20", "stpes = 20"), vec![], vec!["train.stpes", "did you mean"]),
        (good.replace("[train]", "[trian]"), vec![], vec!["trian"]),
        (good.replace("steps = 20", "steps = \"ten\""), vec![], vec!["train.steps", "integer"]),
        (good.replace("steps = 20", "steps = -3"), vec![], vec!["train.steps"]),
        (good.replace("micro_batch = 2", "micro_batch = 0"), vec![], vec!["train.micro_batch"]),
        (good.replace("n_head = 2", "n_head = 3"), vec![], vec!["model.n_head", "model.d_model"]),
        (good.replace("d_model = 32", "d_model = 0"), vec![], vec!["model.d_model"]),
        (good.replace("[data]\npath", "[data]\npth"), vec![], vec!["data.pth"]),
        (good.replace("rust-book.txt", "no-such-file.txt"), vec![], vec!["data.path", "does not exist"]),
        (good.replace("global_batch = 8", "global_batch = 9"), vec![], vec!["train.global_batch", "train.micro_batch"]),
        (good.replace("[model]\n", "[model_]\n"), vec![], vec!["model"]),
        (good.replace("lr = 3e-3", "lr = -1.0"), vec![], vec!["train.lr"]),
        (good.replace("warmup = 2", "warmup = 50"), vec![], vec!["train.warmup"]),
        (good.clone() + "\n[zero]\nstage = 7\n", vec![], vec!["zero.stage"]),
        (good.clone() + "precision = \"fp8\"\n", vec![], vec!["train.precision", "fp32"]),
        (good.replace("[model]\n", "[model]\nvocab = \"gpt2\"\n"), vec![], vec!["model.vocab", "bytes"]),
        (good.replace("n_layer = 2", "n_layer = 2 = 3"), vec![], vec!["tiny.toml"]),
        (good.clone(), vec!["--set", "train.steps"], vec!["--set", "train.steps=50"]),
        (good.clone(), vec!["--set", "train.stepz=5"], vec!["train.stepz", "did you mean"]),
        (good.clone(), vec!["--set", "model.seq_len=0"], vec!["model.seq_len"]),
        (good.clone() + "\n[zero]\noffload_optimizer = \"cpu\"\noffload_ratio = 1.5\n", vec![], vec!["zero.offload_ratio", "(0, 1]"]),
        (good.clone() + "\n[zero]\noffload_optimizer = \"cpu\"\noffload_ratio = 0\n", vec![], vec!["zero.offload_ratio", "(0, 1]"]),
        (good.clone() + "\n[zero]\nstage = 2\noffload_params = \"cpu\"\n", vec![], vec!["zero.offload_params", "zero.stage = 3"]),
        (good.clone() + "\n[zero]\nstage = 3\noffload_params = \"cpu\"\n", vec![], vec!["zero.offload_params", "whole optimizer state offloaded"]),
        (good.clone() + "\n[zero]\noffload_optimizer = \"nvme\"\nnvme_dir = \"/no/such/disk\"\n", vec![], vec!["zero.nvme_dir", "/no/such/disk", "does not exist"]),
        (good.clone() + "\n[zero]\noffload_optimizer = \"nvme\"\nnvme_dir = \"/proc\"\n", vec![], vec!["zero.nvme_dir", "/proc", "is not writable"]),
        (
            good.replace("n_layer = 2", "n_layer = 400").replace("n_head = 2", "n_head = 128").replace("d_model = 32", "d_model = 16384"),
            vec![],
            vec!["this run needs about", "GiB of host memory", "is free", "estimate-memory"],
        ),
    ];
    for (i, (text, overrides, expect)) in cases.iter().enumerate() {
        let path = dir.path().join("tiny.toml");
        std::fs::write(&path, text).unwrap();
        let mut args = vec!["train".to_string(), "--config".into(), path.display().to_string()];
        args.extend(["--set".to_string(), format!("track.dir={}", track.display())]);
        args.extend(overrides.iter().map(|s| s.to_string()));
        let f = run(ferrospeed().args(&args), Duration::from_secs(60));
        assert_eq!(f.status.code(), Some(2), "case {i} ({expect:?}): {}", f.stderr);
        assert_eq!(f.stderr.trim().lines().count(), 1, "case {i}: one line please: {}", f.stderr);
        for fragment in expect {
            assert!(f.stderr.contains(fragment), "case {i}: expected {fragment:?} in: {}", f.stderr);
        }
        assert!(!track.exists(), "case {i}: a bad config must write nothing");
    }
}

#[test]
fn batch_arithmetic_that_fails_only_for_the_world_size_stops_the_launch_with_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_config(dir.path());
    let track = dir.path().join("never");
    let f = run(
        ferrospeed().args([
            "launch", "--nproc-per-node", "3", "train", "--config", &config.display().to_string(),
            "--set", &format!("track.dir={}", track.display()),
        ]),
        Duration::from_secs(60),
    );
    assert_eq!(f.status.code(), Some(2), "{}", f.stderr);
    assert!(f.stderr.contains("train.global_batch = 8") && f.stderr.contains("world size (3)"), "{}", f.stderr);
    assert!(!track.exists());
}

#[test]
fn zero_stages_give_identical_losses_across_processes_and_precisions_run() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_config(dir.path());
    let reference = losses(2, &config, &dir.path().join("s0"), &["train.steps=8"]);
    for stage in 1..=3 {
        let set = format!("zero.stage={stage}");
        let got = losses(2, &config, &dir.path().join(format!("s{stage}")), &["train.steps=8", &set]);
        let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&got), bits(&reference), "stage {stage} vs stage 0");
    }
    let fp16 = dir.path().join("fp16");
    losses(2, &config, &fp16, &["train.steps=8", "zero.stage=3", "train.precision=fp16"]);
    let first: serde_json::Value =
        serde_json::from_str(std::fs::read_to_string(fp16.join("metrics.jsonl")).unwrap().lines().next().unwrap()).unwrap();
    assert_eq!(first["loss_scale"].as_f64(), Some(65536.0), "fp16 metrics show the loss scale: {first}");
    assert!(first["mem_params_bytes"].as_u64().unwrap() > 0, "step 1 reports memory: {first}");
}

#[test]
fn bench_adamw_prints_its_measurements() {
    let mut cmd = support::ferrospeed();
    cmd.args(["bench-adamw", "--params", "100000", "--steps", "1"]);
    let f = support::run(&mut cmd, std::time::Duration::from_secs(60));
    assert!(f.status.success(), "{}", f.stderr);
    let v: serde_json::Value = serde_json::from_str(f.stdout.trim()).unwrap();
    for key in ["adamw_gparams_s", "adamw_gb_s", "copy_gb_s", "triad_gb_s"] {
        assert!(v[key].as_f64().is_some_and(|x| x > 0.0), "{key} in {v}");
    }
    assert_eq!(v["params"], 100000);
}

#[test]
fn binary_data_is_refused_naming_the_file_and_one_window_of_text_is_enough() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::write(data.join("a.txt"), "Plain text, enough of it to train on. ".repeat(20)).unwrap();
    // A compiled program: not UTF-8.
    let binary: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    std::fs::write(data.join("b.bin"), &binary).unwrap();
    let config = write_config(dir.path(), TINY, "steps = 2\nglobal_batch = 2\nmicro_batch = 1\nwarmup = 1");
    let data_set = format!("data.path={}", data.display());
    let f = run(&mut train_command(1, &config, &dir.path().join("refused"), &[data_set.clone()]), Duration::from_secs(60));
    assert_eq!(f.status.code(), Some(2), "{}", f.stderr);
    assert!(f.stderr.contains("b.bin") && f.stderr.contains("is not text") && f.stderr.contains("data.allow_binary"), "{}", f.stderr);
    assert!(!dir.path().join("refused").exists(), "nothing written");
    let f = run(&mut train_command(1, &config, &dir.path().join("allowed"), &[data_set, "data.allow_binary=true".into()]), Duration::from_secs(60));
    assert!(f.status.success(), "{}", f.stderr);
    assert!(f.stderr.contains("b.bin is not text"), "a warning names the file: {}", f.stderr);

    // Mostly control bytes, though valid UTF-8.
    let control = dir.path().join("control.txt");
    std::fs::write(&control, "\u{1}\u{2}\u{3}\u{4}abc\u{5}\u{6}".repeat(100)).unwrap();
    let f = run(&mut train_command(1, &config, &dir.path().join("c"), &[format!("data.path={}", control.display())]), Duration::from_secs(60));
    assert_eq!(f.status.code(), Some(2), "{}", f.stderr);
    assert!(f.stderr.contains("control bytes"), "{}", f.stderr);

    // TINY has seq_len 32: 33 bytes are exactly one window; 32 are refused with the right count.
    for (len, ok) in [(33usize, true), (32, false)] {
        let file = dir.path().join(format!("w{len}.txt"));
        std::fs::write(&file, "x".repeat(len)).unwrap();
        let f = run(&mut train_command(1, &config, &dir.path().join(format!("t{len}")), &[format!("data.path={}", file.display())]), Duration::from_secs(60));
        if ok {
            assert!(f.status.success(), "{len} bytes: {}", f.stderr);
        } else {
            assert_eq!(f.status.code(), Some(2), "{len} bytes: {}", f.stderr);
            assert!(f.stderr.contains("32 tokens, fewer than one window of model.seq_len + 1 = 33 tokens"), "{}", f.stderr);
        }
    }
}

#[test]
fn config_defaults_writes_a_commented_config_that_validates_and_trains() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run.toml");
    let corpus = corpus();
    let args = |extra: &[&str]| {
        let mut v = vec!["config".to_string(), "--defaults".into(), "--out".into(), out.display().to_string(), "--data".into(), corpus.display().to_string()];
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let f = run(ferrospeed().args(args(&[])), Duration::from_secs(30));
    assert!(f.status.success(), "{}", f.stderr);
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(text.lines().filter(|l| l.contains('#')).count() >= 20, "commented:\n{text}");
    for section in ["[model]", "[data]", "[train]", "[zero]", "[checkpoint]", "[track]"] {
        assert!(text.contains(section), "{section}");
    }
    ferrospeed::config::Config::load(&out, &[]).expect("the written config validates");
    // It trains (shortened, into this test's folders).
    let sets = [format!("track.dir={}", dir.path().join("t").display()), format!("checkpoint.dir={}", dir.path().join("ck").display()), "train.steps=2".into(), "train.warmup=1".into()];
    let rows = train(1, &out, &dir.path().join("t"), &sets);
    assert_eq!(rows.len(), 2);
    // An existing file is not replaced without --force.
    let f = run(ferrospeed().args(args(&[])), Duration::from_secs(30));
    assert_eq!(f.status.code(), Some(2));
    assert!(f.stderr.contains("exists") && f.stderr.contains("--force"), "{}", f.stderr);
    assert!(run(ferrospeed().args(args(&["--force"])), Duration::from_secs(30)).status.success());
    // Bad data is refused before anything is written.
    let other = dir.path().join("other.toml");
    let f = run(ferrospeed().args(["config", "--defaults", "--out", &other.display().to_string(), "--data", "/no/such/text"]), Duration::from_secs(30));
    assert_eq!(f.status.code(), Some(2), "{}", f.stderr);
    assert!(f.stderr.contains("data.path") && !other.exists(), "{}", f.stderr);
}
