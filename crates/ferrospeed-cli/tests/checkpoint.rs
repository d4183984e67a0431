//! Checkpoints end to end: bit-exact resume per stage, resharding across world sizes and stages,
//! crash safety under SIGKILL, corruption detection, export and `init_from`.

mod support;

use ferrospeed::checkpoint;
use std::path::{Path, PathBuf};
use std::time::Duration;
use support::*;

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/rust-book.txt")
}

fn write_config(dir: &Path, model: &str, train: &str) -> PathBuf {
    let text = format!("[model]\n{model}\n\n[data]\npath = \"{}\"\n\n[train]\n{train}\nsample_tokens = 0\n", corpus().display());
    let path = dir.join("run.toml");
    std::fs::write(&path, text).unwrap();
    path
}

const TINY: &str = "n_layer = 2\nn_head = 2\nd_model = 32\nseq_len = 32";

/// Run `train` (under `launch` with `nproc` ranks); returns (step, loss) of each line of metrics.jsonl.
fn train(nproc: usize, config: &Path, track: &Path, sets: &[String]) -> Vec<(u64, f64)> {
    let nproc_s = nproc.to_string();
    let config_s = config.display().to_string();
    let track_s = format!("track.dir={}", track.display());
    let mut args = vec!["launch", "--nproc-per-node", &nproc_s, "train", "--config", &config_s, "--set", &track_s];
    for s in sets {
        args.extend(["--set", s.as_str()]);
    }
    let f = run(ferrospeed().args(&args), Duration::from_secs(300));
    assert!(f.status.success(), "train {sets:?} failed:\n{}\n{}", f.stdout, f.stderr);
    std::fs::read_to_string(track.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap())
        })
        .collect()
}

/// A checkpoint root holding only `step_dir` (copied), with `latest` naming it.
fn root_with(step_dir: &Path, root: &Path) -> PathBuf {
    let name = step_dir.file_name().unwrap();
    std::fs::create_dir_all(root.join(name)).unwrap();
    for e in std::fs::read_dir(step_dir).unwrap().flatten() {
        std::fs::copy(e.path(), root.join(name).join(e.file_name())).unwrap();
    }
    std::fs::write(root.join("latest"), format!("{}\n", name.to_string_lossy())).unwrap();
    root.to_path_buf()
}

#[test]
fn resume_continues_bit_for_bit_at_every_stage() {
    let dir = tempfile::tempdir().unwrap();
    // 2 ranks, micro-batch 2, global batch 8: accumulation 2.
    let config = write_config(dir.path(), TINY, "steps = 8\nglobal_batch = 8\nmicro_batch = 2\nwarmup = 2");
    for stage in 0..=3 {
        let base = dir.path().join(format!("s{stage}"));
        let ck = base.join("ck");
        let sets = |extra: &[String]| {
            let mut v = vec![format!("zero.stage={stage}"), format!("checkpoint.dir={}", ck.display()), "checkpoint.every=4".into()];
            v.extend_from_slice(extra);
            v
        };
        let whole = train(2, &config, &base.join("whole"), &sets(&[]));
        // Resume from the step-4 checkpoint in a fresh root.
        let root = root_with(&ck.join(checkpoint::step_dir_name(4)), &base.join("resume-root"));
        let resumed = train(2, &config, &base.join("resumed"), &[
            format!("zero.stage={stage}"),
            format!("checkpoint.dir={}", root.display()),
        ]);
        assert_eq!(resumed.first().map(|r| r.0), Some(5), "stage {stage}: resumed after step 4");
        let bits = |v: &[(u64, f64)]| v.iter().map(|(s, l)| (*s, l.to_bits())).collect::<Vec<_>>();
        assert_eq!(bits(&resumed), bits(&whole[4..]), "stage {stage}: losses after resuming must equal the uninterrupted run");
    }
}

#[test]
fn a_checkpoint_resumes_at_other_world_sizes_and_stages() {
    let dir = tempfile::tempdir().unwrap();
    // Global batch 12 divides for 1, 2, 3 and 4 ranks with micro-batch 1.
    let config = write_config(dir.path(), TINY, "steps = 10\nglobal_batch = 12\nmicro_batch = 1\nwarmup = 2");
    let ck = dir.path().join("ck");
    let whole = train(2, &config, &dir.path().join("whole"), &[
        "zero.stage=3".into(),
        format!("checkpoint.dir={}", ck.display()),
        "checkpoint.every=5".into(),
    ]);
    let saved = ck.join(checkpoint::step_dir_name(5));
    for (world, stage) in [(4, 1), (1, 0), (3, 2)] {
        let root = root_with(&saved, &dir.path().join(format!("root-{world}-{stage}")));
        let resumed = train(world, &config, &dir.path().join(format!("w{world}s{stage}")), &[
            format!("zero.stage={stage}"),
            format!("checkpoint.dir={}", root.display()),
        ]);
        assert_eq!(resumed.len(), 5);
        for ((step, a), (_, b)) in resumed.iter().zip(&whole[5..]) {
            assert!(((a - b) / b).abs() < 1e-5, "world {world} stage {stage} step {step}: {a} vs {b}");
        }
    }
}

#[test]
fn sigkill_during_saves_never_leaves_latest_pointing_at_a_broken_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    // Large state, tiny batches: most of the time goes to writing checkpoints.
    let config = write_config(
        dir.path(),
        "n_layer = 4\nn_head = 4\nd_model = 384\nseq_len = 16",
        "steps = 100000\nglobal_batch = 1\nmicro_batch = 1\nwarmup = 1",
    );
    let ck = dir.path().join("ck");
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    let mut kills = 0;
    let mut mid_save = 0;
    for i in 0..24 {
        let track = dir.path().join(format!("t{i}"));
        let child = start(ferrospeed().args([
            "train", "--config", &config.display().to_string(),
            "--set", &format!("track.dir={}", track.display()),
            "--set", &format!("checkpoint.dir={}", ck.display()),
            "--set", "checkpoint.every=1", "--set", "checkpoint.keep=2",
        ]));
        // Once the run is past start-up (it logged a step, and every step saves), kill it at a
        // random moment: on a slow machine too, most kills land in the step/save loop.
        let metrics = track.join("metrics.jsonl");
        let t0 = std::time::Instant::now();
        while std::fs::read_to_string(&metrics).map_or(true, |m| m.is_empty()) && t0.elapsed() < Duration::from_secs(60) {
            std::thread::sleep(Duration::from_millis(5));
        }
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        std::thread::sleep(Duration::from_millis(rng % 400));
        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
        let _ = finish(child, Duration::from_secs(20));
        kills += 1;
        // A leftover temporary folder means the kill landed in the middle of a save.
        let tmp_left = std::fs::read_dir(&ck).into_iter().flatten().flatten().any(|e| e.file_name().to_string_lossy().starts_with(".tmp-"));
        mid_save += usize::from(tmp_left);
        if let Some(latest) = checkpoint::latest(&ck).unwrap_or_else(|e| panic!("kill {i}: latest is broken: {e}")) {
            checkpoint::verify(&latest).unwrap_or_else(|e| panic!("kill {i}: {e}"));
        }
        // Every folder that looks like a checkpoint is a complete one.
        for (_, path) in checkpoint::list_checkpoints(&ck) {
            checkpoint::verify(&path).unwrap_or_else(|e| panic!("kill {i}: {} is visible but broken: {e}", path.display()));
        }
    }
    eprintln!("{mid_save} of {kills} kills landed during a save");
    assert!(kills >= 20);
    assert!(mid_save >= 2, "only {mid_save} of {kills} kills landed during a save: the test proves too little");
    let latest = checkpoint::latest(&ck).unwrap().expect("some checkpoint survived");
    assert!(checkpoint::read_meta(&latest).unwrap().step >= 2, "training progressed across kills");
}

#[test]
fn a_corrupt_or_truncated_shard_fails_the_load_naming_the_file_and_overwrites_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), TINY, "steps = 3\nglobal_batch = 4\nmicro_batch = 2\nwarmup = 1");
    let ck = dir.path().join("ck");
    train(2, &config, &dir.path().join("first"), &[format!("checkpoint.dir={}", ck.display())]);
    let latest = checkpoint::latest(&ck).unwrap().unwrap();
    let file = latest.join("rank-00001-of-00002.safetensors");
    let original = std::fs::read(&file).unwrap();
    for damage in ["flip", "truncate"] {
        let mut bytes = original.clone();
        match damage {
            "flip" => {
                let i = bytes.len() - 17;
                bytes[i] ^= 0x40;
            }
            _ => bytes.truncate(bytes.len() - 100),
        }
        std::fs::write(&file, &bytes).unwrap();
        let before: Vec<_> = std::fs::read_dir(&ck).unwrap().flatten().map(|e| e.file_name()).collect();
        let f = run(
            ferrospeed().args([
                "launch", "--nproc-per-node", "2", "train", "--config", &config.display().to_string(),
                "--set", &format!("track.dir={}", dir.path().join(format!("again-{damage}")).display()),
                "--set", &format!("checkpoint.dir={}", ck.display()), "--set", "train.steps=6",
            ]),
            Duration::from_secs(60),
        );
        assert!(!f.status.success(), "{damage}: loading must fail");
        assert!(f.stderr.contains("rank-00001-of-00002.safetensors") && f.stderr.contains("checksum"), "{damage}: {}", f.stderr);
        let after: Vec<_> = std::fs::read_dir(&ck).unwrap().flatten().map(|e| e.file_name()).collect();
        assert_eq!(before, after, "{damage}: nothing written");
        assert_eq!(std::fs::read(&file).unwrap(), bytes, "{damage}: the damaged file is left as it was");
    }
    std::fs::write(&file, &original).unwrap();
    checkpoint::verify(&latest).unwrap();
}

#[test]
fn export_then_init_from_starts_from_the_same_weights() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), TINY, "steps = 5\nglobal_batch = 4\nmicro_batch = 2\nwarmup = 1");
    let ck = dir.path().join("ck");
    let trained = train(2, &config, &dir.path().join("first"), &["zero.stage=3".into(), format!("checkpoint.dir={}", ck.display())]);
    let out = dir.path().join("model.safetensors");
    let f = run(ferrospeed().args(["checkpoint", "export", &ck.display().to_string(), &out.display().to_string()]), Duration::from_secs(60));
    assert!(f.status.success(), "{}", f.stderr);
    let bytes = std::fs::read(&out).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.tensor("transformer.h.1.attn.c_attn.weight").unwrap().shape(), &[32, 96]);
    assert_eq!(st.tensor("transformer.wte.weight").unwrap().shape(), &[256, 32]);
    // A fine-tuning run from the export starts where training ended, not from scratch.
    let tuned = train(1, &config, &dir.path().join("tuned"), &[format!("model.init_from={}", out.display()), "train.steps=1".into()]);
    assert!(tuned[0].1 < trained[0].1 - 0.3, "init_from loss {} vs fresh {}", tuned[0].1, trained[0].1);
}

#[test]
fn ctrl_c_saves_at_the_next_step_boundary_and_the_run_resumes_from_there() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), TINY, "steps = 100000\nglobal_batch = 4\nmicro_batch = 2\nwarmup = 1");
    let ck = dir.path().join("ck");
    let track = dir.path().join("first");
    let child = start(ferrospeed().args([
        "launch", "--nproc-per-node", "2", "train", "--config", &config.display().to_string(),
        "--set", &format!("track.dir={}", track.display()),
        "--set", &format!("checkpoint.dir={}", ck.display()),
    ]));
    // Wait until a few steps are logged, then press Ctrl-C.
    let metrics = track.join("metrics.jsonl");
    let t0 = std::time::Instant::now();
    while std::fs::read_to_string(&metrics).map_or(0, |m| m.lines().count()) < 3 {
        assert!(t0.elapsed() < Duration::from_secs(60), "training did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let f = finish(child, Duration::from_secs(60));
    assert_eq!(f.status.code(), Some(130), "{}", f.stderr);
    assert!(f.stderr.contains("checkpoint saved"), "{}", f.stderr);
    let done = std::fs::read_to_string(&metrics).unwrap().lines().count() as u64;
    let latest = checkpoint::latest(&ck).unwrap().expect("a checkpoint was saved on Ctrl-C");
    assert_eq!(checkpoint::verify(&latest).unwrap().step, done, "saved at the step boundary after the last logged step");
    let resumed = train(2, &config, &dir.path().join("second"), &[format!("checkpoint.dir={}", ck.display()), format!("train.steps={}", done + 2)]);
    assert_eq!(resumed.first().map(|r| r.0), Some(done + 1));
}

#[test]
fn resuming_a_different_model_names_the_parameter_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), TINY, "steps = 2\nglobal_batch = 4\nmicro_batch = 2\nwarmup = 1");
    let ck = dir.path().join("ck");
    train(1, &config, &dir.path().join("first"), &[format!("checkpoint.dir={}", ck.display())]);
    let before: Vec<_> = std::fs::read_dir(&ck).unwrap().flatten().map(|e| e.file_name()).collect();
    let f = run(
        ferrospeed().args([
            "train", "--config", &config.display().to_string(),
            "--set", &format!("track.dir={}", dir.path().join("second").display()),
            "--set", &format!("checkpoint.dir={}", ck.display()),
            "--set", "model.d_model=64", "--set", "train.steps=4",
        ]),
        Duration::from_secs(60),
    );
    assert!(!f.status.success());
    assert!(f.stderr.contains("does not fit this model") && f.stderr.contains("wte") && f.stderr.contains("[256, 32]"), "{}", f.stderr);
    let after: Vec<_> = std::fs::read_dir(&ck).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(before, after);
    let f = run(ferrospeed().args(["checkpoint", "inspect", &dir.path().join("nothing-here").display().to_string()]), Duration::from_secs(30));
    assert_eq!(f.status.code(), Some(2), "{}", f.stderr);
    assert!(f.stderr.contains("no checkpoint at"), "{}", f.stderr);
}
