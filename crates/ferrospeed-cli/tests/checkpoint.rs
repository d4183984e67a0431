//! Checkpoints end to end: bit-exact resume per stage and in fp16, resharding across world sizes and
//! stages, damaged shards, `meta.json` and `latest`, export and `init_from`. Crash safety: crash.rs.

mod support;

use ferrospeed::checkpoint;
use std::path::Path;
use std::time::Duration;
use support::*;

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
    // At the saving world size, any stage continues bit for bit (stages agree bitwise); at another
    // world size the sums group differently, so only closely.
    for (world, stage) in [(2, 0), (2, 1), (4, 1), (1, 0), (3, 2)] {
        let root = root_with(&saved, &dir.path().join(format!("root-{world}-{stage}")));
        let resumed = train(world, &config, &dir.path().join(format!("w{world}s{stage}")), &[
            format!("zero.stage={stage}"),
            format!("checkpoint.dir={}", root.display()),
        ]);
        assert_eq!(resumed.first().map(|r| r.0), Some(6), "world {world} stage {stage}");
        if world == 2 {
            assert_eq!(bits(&resumed), bits(&whole[5..]), "world 2, stage 3 -> {stage}: resumed losses must be bitwise");
            continue;
        }
        assert_eq!(resumed.len(), 5);
        for ((step, a), (_, b)) in resumed.iter().zip(&whole[5..]) {
            assert!(((a - b) / b).abs() < 1e-5, "world {world} stage {stage} step {step}: {a} vs {b}");
        }
    }
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
        let before = names_in(&ck);
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
        assert_eq!(before, names_in(&ck), "{damage}: nothing written");
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
    let before = names_in(&ck);
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
    assert_eq!(before, names_in(&ck));
    let f = run(ferrospeed().args(["checkpoint", "inspect", &dir.path().join("nothing-here").display().to_string()]), Duration::from_secs(30));
    assert_eq!(f.status.code(), Some(2), "{}", f.stderr);
    assert!(f.stderr.contains("no checkpoint at"), "{}", f.stderr);
}

#[test]
fn fp16_resumes_bit_for_bit_with_the_loss_scaler_state() {
    let dir = tempfile::tempdir().unwrap();
    // The scale grows every 2 good steps and backs off on overflows (measured: 262144, 262144, 524288,
    // 262144, 262144, 131072, …): resuming with a fresh scaler would scale, and skip, differently.
    let config = write_config(
        dir.path(),
        TINY,
        "steps = 12\nglobal_batch = 4\nmicro_batch = 1\nwarmup = 2\nprecision = \"fp16\"\nloss_scale_initial = 262144.0\nloss_scale_growth_interval = 2",
    );
    let ck = dir.path().join("ck");
    let sets = |extra: &str| vec!["zero.stage=2".to_string(), format!("checkpoint.dir={}", ck.display()), extra.to_string()];
    let whole = train(2, &config, &dir.path().join("whole"), &sets("checkpoint.every=5"));
    let scales = |track: &Path| -> Vec<f64> {
        std::fs::read_to_string(track.join("metrics.jsonl")).unwrap().lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss_scale"].as_f64().unwrap())
            .collect()
    };
    let whole_scales = scales(&dir.path().join("whole"));
    let (grows, backs_off) = (whole_scales.windows(2).any(|w| w[1] > w[0]), whole_scales.windows(2).any(|w| w[1] < w[0]));
    assert!(grows && backs_off && whole_scales[5] != 262144.0, "the scale moves, and differs from a fresh one at step 6: {whole_scales:?}");
    let root = root_with(&ck.join(checkpoint::step_dir_name(5)), &dir.path().join("resume-root"));
    let resumed = train(2, &config, &dir.path().join("resumed"), &["zero.stage=2".into(), format!("checkpoint.dir={}", root.display())]);
    assert_eq!(bits(&resumed), bits(&whole[5..]), "fp16 losses after resuming");
    assert_eq!(scales(&dir.path().join("resumed")), whole_scales[5..], "loss scales after resuming");
}

#[test]
fn a_damaged_meta_json_or_latest_fails_the_resume_naming_the_file_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), TINY, "steps = 2\nglobal_batch = 4\nmicro_batch = 2\nwarmup = 1");
    let ck = dir.path().join("ck");
    train(1, &config, &dir.path().join("first"), &[format!("checkpoint.dir={}", ck.display())]);
    let step = ck.join(checkpoint::step_dir_name(2));
    let (meta, latest) = (step.join("meta.json"), ck.join("latest"));
    let (meta_ok, latest_ok) = (std::fs::read(&meta).unwrap(), std::fs::read(&latest).unwrap());
    let half = meta_ok[..meta_ok.len() / 2].to_vec();
    let future = String::from_utf8(meta_ok.clone()).unwrap().replacen("\"format_version\": 1", "\"format_version\": 99", 1).into_bytes();
    assert_ne!(future, meta_ok, "the version field is where the test expects it");
    // (file, damaged bytes, fragments the one-line error must contain)
    let cases: Vec<(&Path, Vec<u8>, Vec<&str>)> = vec![
        (&meta, half, vec!["meta.json", "corrupt"]),
        (&meta, b"".to_vec(), vec!["meta.json", "corrupt"]),
        (&meta, future, vec!["meta.json", "format version 99"]),
        (&latest, b"step-00000007\n".to_vec(), vec!["latest", "step-00000007", "meta.json"]),
        (&latest, b"../../etc\n".to_vec(), vec!["latest", "not a checkpoint folder"]),
        (&latest, b"".to_vec(), vec!["latest", "not a checkpoint folder"]),
    ];
    for (i, (file, bytes, expect)) in cases.into_iter().enumerate() {
        std::fs::write(file, &bytes).unwrap();
        let before = names_in(&ck);
        let f = run(
            ferrospeed().args([
                "train", "--config", &config.display().to_string(),
                "--set", &format!("track.dir={}", dir.path().join(format!("again-{i}")).display()),
                "--set", &format!("checkpoint.dir={}", ck.display()), "--set", "train.steps=4",
            ]),
            Duration::from_secs(60),
        );
        assert!(!f.status.success(), "case {i}: resuming must fail");
        assert_eq!(f.stderr.trim().lines().count(), 1, "case {i}: one line please: {}", f.stderr);
        for fragment in expect {
            assert!(f.stderr.contains(fragment), "case {i}: expected {fragment:?} in {}", f.stderr);
        }
        assert_eq!(before, names_in(&ck), "case {i}: nothing written");
        assert_eq!(std::fs::read(file).unwrap(), bytes, "case {i}: the damaged file is left as it was");
        std::fs::write(&meta, &meta_ok).unwrap();
        std::fs::write(&latest, &latest_ok).unwrap();
    }
    checkpoint::verify(&step).unwrap();
}

#[test]
fn sgd_with_momentum_resumes_bit_for_bit_and_another_optimizer_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), TINY, "steps = 8\nglobal_batch = 8\nmicro_batch = 2\nwarmup = 2\noptimizer = \"sgd\"\nmomentum = 0.9\nlr = 0.3");
    let ck = dir.path().join("ck");
    let sets = |ck: &Path| vec!["zero.stage=2".to_string(), format!("checkpoint.dir={}", ck.display()), "checkpoint.every=4".into()];
    let whole = train(2, &config, &dir.path().join("whole"), &sets(&ck));
    assert!(whole[7].1 < whole[0].1, "SGD trains: {whole:?}");
    let meta = checkpoint::read_meta(&ck.join(checkpoint::step_dir_name(4))).unwrap();
    assert_eq!((meta.optimizer.as_str(), meta.optimizer_state.clone()), ("sgd", vec!["momentum_buffer".to_string()]));
    let root = root_with(&ck.join(checkpoint::step_dir_name(4)), &dir.path().join("root"));
    let resumed = train(2, &config, &dir.path().join("resumed"), &sets(&root));
    assert_eq!(bits(&resumed), bits(&whole[4..]), "the momentum buffer is restored");
    let f = run(&mut train_command(1, &config, &dir.path().join("adamw"), &[format!("checkpoint.dir={}", root.display()), "train.optimizer=\"adamw\"".into()]), Duration::from_secs(60));
    assert!(!f.status.success());
    assert!(f.stderr.contains("holds the state of sgd (momentum_buffer), this run uses adamw"), "{}", f.stderr);
}
