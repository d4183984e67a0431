//! Crash safety of checkpoint saves, by construction: every file-system step of real saves replayed
//! under a power-loss model; a rank aborted at every named phase of a save at world sizes 1 and 2,
//! after which `latest` verifies and resuming gives the uninterrupted run's losses bit for bit; and,
//! as a soak, SIGKILLs at random moments.

mod support;

use ferrospeed::checkpoint::{self, SavePhase};
use std::path::Path;
use std::time::Duration;
use support::power_loss::Model;
use support::*;

const TRAIN: &str = "steps = 6\nglobal_batch = 4\nmicro_batch = 1\nwarmup = 1";

fn ck_sets(ck: &Path, extra: &[&str]) -> Vec<String> {
    let mut v = vec![format!("checkpoint.dir={}", ck.display()), "checkpoint.every=2".into()];
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

#[test]
fn real_saves_survive_a_power_loss_after_any_file_system_step() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), TINY, TRAIN);
    for world in [1, 2] {
        let ck = dir.path().join(format!("ck{world}"));
        let trace = dir.path().join(format!("trace{world}"));
        let traced = |track: &str, extra: &[&str]| {
            let mut cmd = train_command(world, &config, &dir.path().join(format!("{track}{world}")), &ck_sets(&ck, extra));
            let f = run(cmd.env("FERROSPEED_FS_TRACE", &trace), Duration::from_secs(300));
            assert!(f.status.success(), "world {world} {track}: {}", f.stderr);
        };
        // Three saves and pruning, then a fresh run into the same folder: it saves steps that exist
        // already, so each replaces a complete checkpoint.
        traced("first", &["checkpoint.keep=2"]);
        traced("again", &["checkpoint.keep=2", "checkpoint.resume=false"]);
        let text = std::fs::read_to_string(&trace).unwrap();
        let model = Model::check_trace(&ck, &text).unwrap_or_else(|v| panic!("world {world}: after `{}`: {}", v.after, v.problem));
        // The trace is the real thing: six saves by `world` ranks, each of its files synced.
        let count = |op: &str, what: &str| text.lines().filter(|l| l.split('\t').nth(1) == Some(op) && l.contains(what)).count();
        assert_eq!(count("fsync", "rank-"), 6 * world, "world {world}: every rank file synced once per save");
        assert_eq!(count("fsync", "meta.json"), 6);
        let placed = text.lines().filter(|l| matches!(l.split('\t').nth(1), Some("rename" | "exchange")) && l.split('\t').nth(3).is_some_and(|to| to.contains("/step-"))).count();
        assert_eq!(placed, 6, "world {world}: six folders moved into place:\n{text}");
        assert!(count("remove", "step-") >= 2, "world {world}: pruning and replacing remove old folders:\n{text}");
        assert_eq!(model.durable_latest().as_deref(), Some("step-00000006"), "world {world}");
        assert_eq!(model.durable_checkpoints(), ["step-00000004", "step-00000006"], "world {world}");
        checkpoint::verify(&checkpoint::latest(&ck).unwrap().unwrap()).unwrap();
    }
}

/// The trace of saves of steps 2 and 4 and the pruning of step 2, as the protocol should write it,
/// without the step that `skip` names.
fn protocol_trace(skip: &str) -> String {
    let mut lines = vec!["1\tmkdir-all\t/ck\t".to_string()];
    for step in [2, 4] {
        let tmp = format!("/ck/.tmp-step-{step}");
        lines.push(format!("1\tmkdir\t{tmp}\t"));
        for file in ["rank-00000-of-00001.safetensors", "meta.json"] {
            lines.push(format!("1\tcreate\t{tmp}/{file}\t"));
            if skip != "file sync" {
                lines.push(format!("1\tfsync\t{tmp}/{file}\t"));
            }
        }
        if skip != "folder sync" {
            lines.push(format!("1\tfsync-dir\t{tmp}\t"));
        }
        lines.push(format!("1\trename\t{tmp}\t/ck/step-{step}"));
        if skip != "root sync" {
            lines.push("1\tfsync-dir\t/ck\t".into());
        }
        lines.push(format!("1\tcreate\t/ck/.latest.tmp\tstep-{step}"));
        if skip != "latest sync" {
            lines.push("1\tfsync\t/ck/.latest.tmp\t".into());
        }
        lines.push("1\trename\t/ck/.latest.tmp\t/ck/latest".into());
        lines.push("1\tfsync-dir\t/ck\t".into());
    }
    // Pruning step 2: renamed away, that rename synced, then removed.
    lines.push("1\trename\t/ck/step-2\t/ck/.del-step-2".into());
    if skip != "sync before removal" {
        lines.push("1\tfsync-dir\t/ck\t".into());
    }
    lines.push("1\tremove\t/ck/.del-step-2\t".into());
    lines.join("\n")
}

#[test]
fn the_power_loss_model_catches_every_missing_sync() {
    let root = Path::new("/ck");
    let model = Model::check_trace(root, &protocol_trace("")).unwrap_or_else(|v| panic!("{v:?}"));
    assert_eq!(model.durable_latest().as_deref(), Some("step-4"));
    assert_eq!(model.durable_checkpoints(), ["step-4"]);
    for skip in ["file sync", "folder sync", "root sync", "latest sync", "sync before removal"] {
        let v = Model::check_trace(root, &protocol_trace(skip)).map(|_| ());
        let v = v.expect_err(&format!("skipping the {skip} must be caught"));
        eprintln!("without the {skip}: after `{}`: {}", v.after, v.problem);
    }
}

/// The phases each run aborts at, with the rank that aborts and the step `latest` must name after.
fn fault(phase: SavePhase, world: usize) -> (String, usize, u64) {
    let rank = if phase == SavePhase::ShardsWritten { world - 1 } else { 0 };
    let survives = matches!(phase, SavePhase::AfterLatest | SavePhase::Pruning);
    (format!("{}@4@{rank}", phase.as_str()), rank, if survives { 4 } else { 2 })
}

#[test]
fn an_abort_at_every_phase_of_a_save_leaves_a_verified_latest_and_resumes_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), TINY, TRAIN);
    for world in [1, 2] {
        let whole = train(world, &config, &dir.path().join(format!("whole{world}")), &ck_sets(&dir.path().join(format!("ref{world}")), &["checkpoint.keep=1"]));
        assert_eq!(whole.len(), 6);
        for phase in SavePhase::ALL {
            let what = format!("world {world}, {}", phase.as_str());
            let (spec, rank, expect) = fault(phase, world);
            let ck = dir.path().join(format!("ck{world}-{}", phase.as_str()));
            let mut cmd = train_command(world, &config, &dir.path().join(format!("t{world}-{}", phase.as_str())), &ck_sets(&ck, &["checkpoint.keep=1"]));
            let f = run(cmd.env("FERROSPEED_FAULT", &spec), Duration::from_secs(300));
            assert!(!f.status.success(), "{what}: the run must die");
            let said = format!("fault injected: rank {rank} aborts at save phase {} of step 4", phase.as_str());
            assert!(f.stderr.contains(&said), "{what}: expected {said:?} in\n{}", f.stderr);
            let latest = checkpoint::latest(&ck).unwrap_or_else(|e| panic!("{what}: {e}")).unwrap_or_else(|| panic!("{what}: no latest"));
            assert_eq!(checkpoint::verify(&latest).unwrap_or_else(|e| panic!("{what}: {e}")).step, expect, "{what}");
            for (_, path) in checkpoint::list_checkpoints(&ck) {
                checkpoint::verify(&path).unwrap_or_else(|e| panic!("{what}: {} is visible but broken: {e}", path.display()));
            }
            let resumed = train(world, &config, &dir.path().join(format!("r{world}-{}", phase.as_str())), &ck_sets(&ck, &["checkpoint.keep=1"]));
            assert_eq!(resumed.first().map(|r| r.0), Some(expect + 1), "{what}");
            assert_eq!(bits(&resumed), bits(&whole[expect as usize..]), "{what}: resumed losses differ from the uninterrupted run");
        }
    }
}

#[test]
fn sigkill_at_random_moments_never_leaves_latest_pointing_at_a_broken_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    // Large state, tiny batches: most of the time goes to writing checkpoints.
    let config = write_config(dir.path(), "n_layer = 4\nn_head = 4\nd_model = 384\nseq_len = 16", "steps = 100000\nglobal_batch = 1\nmicro_batch = 1\nwarmup = 1");
    let ck = dir.path().join("ck");
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    let mut mid_save = 0;
    let kills = 24;
    for i in 0..kills {
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
        while std::fs::read_to_string(&metrics).map_or(true, |m| m.is_empty()) && t0.elapsed() < Duration::from_secs(120) {
            std::thread::sleep(Duration::from_millis(5));
        }
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        std::thread::sleep(Duration::from_millis(rng % 400));
        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
        let _ = finish(child, Duration::from_secs(20));
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
    assert!(mid_save >= 2, "only {mid_save} of {kills} kills landed during a save: the test proves too little");
    let latest = checkpoint::latest(&ck).unwrap().expect("some checkpoint survived");
    assert!(checkpoint::read_meta(&latest).unwrap().step >= 2, "training progressed across kills");
}
