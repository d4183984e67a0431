//! Resuming with the identical command: a run that died continues in its own run directory from
//! its last checkpoint, the rows after that checkpoint are dropped and computed again (metrics and
//! TensorBoard), and running the command once more says there is nothing left to train.

mod support;

use std::path::Path;
use std::time::Duration;
use support::*;

/// Steps in every TensorBoard event file of `track` (the file-version record has none).
fn tensorboard_steps(track: &Path) -> Vec<u64> {
    let mut steps = Vec::new();
    for e in std::fs::read_dir(track).unwrap().flatten() {
        if !e.file_name().to_string_lossy().contains("tfevents") {
            continue;
        }
        let bytes = std::fs::read(e.path()).unwrap();
        let mut pos = 0;
        while pos + 12 <= bytes.len() {
            let len = u64::from_le_bytes(bytes[pos..pos + 8].try_into().unwrap()) as usize;
            let data = &bytes[pos + 12..pos + 12 + len];
            // Event field 2 (step) is a varint after the 9-byte wall time (tag 0x09 + 8 bytes).
            if data.len() > 10 && data[9] == 0x10 {
                let (mut v, mut shift, mut i) = (0u64, 0, 10);
                loop {
                    v |= u64::from(data[i] & 0x7f) << shift;
                    if data[i] & 0x80 == 0 {
                        break;
                    }
                    shift += 7;
                    i += 1;
                }
                if data.windows(4).any(|w| w == b"loss") {
                    steps.push(v);
                }
            }
            pos += 12 + len + 4;
        }
    }
    steps.sort_unstable();
    steps
}

#[test]
fn the_identical_command_continues_a_run_that_died_and_then_has_nothing_to_train() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), TINY, "steps = 8\nglobal_batch = 4\nmicro_batch = 2\nwarmup = 2");
    let sets = |ck: &Path| vec![format!("checkpoint.dir={}", ck.display()), "checkpoint.every=2".to_string(), "checkpoint.resume=true".to_string()];
    let whole = train(2, &config, &dir.path().join("whole"), &sets(&dir.path().join("ck-whole")));
    assert_eq!(whole.iter().map(|r| r.0).collect::<Vec<_>>(), (1..=8).collect::<Vec<u64>>());

    let track = dir.path().join("run");
    let ck = dir.path().join("ck");
    // The first attempt dies while saving step 6: rows 1-5 are written (a row follows its step's
    // save), `latest` is step 4.
    let f = run(train_command(2, &config, &track, &sets(&ck)).env("FERROSPEED_FAULT", "shards-written@6@1"), Duration::from_secs(120));
    assert!(!f.status.success(), "the run must die: {}", f.stdout);
    let died: Vec<u64> = metrics(&track).iter().map(|r| r.0).collect();
    assert_eq!(died, (1..=5).collect::<Vec<u64>>(), "rows of the run that died");

    // The identical command continues it: steps 5-8 again, no row twice, the losses bitwise.
    let f = run(&mut train_command(2, &config, &track, &sets(&ck)), Duration::from_secs(120));
    assert!(f.status.success(), "{}", f.stderr);
    assert!(f.stdout.contains("resumed from") && f.stdout.contains("at step 4"), "{}", f.stdout);
    let rows = metrics(&track);
    assert_eq!(bits(&rows), bits(&whole), "the continued run's metrics equal the uninterrupted run's");
    assert_eq!(tensorboard_steps(&track), (1..=8).collect::<Vec<u64>>(), "TensorBoard has every step once");
    assert!(track.join("summary.json").is_file());

    // Once more: nothing to train, nothing changed.
    let before = std::fs::read(track.join("metrics.jsonl")).unwrap();
    let f = run(&mut train_command(2, &config, &track, &sets(&ck)), Duration::from_secs(120));
    assert!(f.status.success(), "{}", f.stderr);
    assert!(f.stdout.contains("already at step 8 of 8: nothing to train"), "{}", f.stdout);
    assert!(!f.stdout.contains("done:"), "{}", f.stdout);
    assert_eq!(std::fs::read(track.join("metrics.jsonl")).unwrap(), before);

    // `runs` lists both runs as finished, with their steps and final loss.
    let f = run(ferrospeed().args(["runs", &dir.path().display().to_string()]), Duration::from_secs(30));
    assert!(f.status.success(), "{}", f.stderr);
    let line = |name: &str| f.stdout.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("{name} in {}", f.stdout)).to_string();
    for name in ["run ", "whole "] {
        let l = line(name);
        assert!(l.contains("8/8") && l.contains("finished") && l.contains(&format!("{:.4}", whole[7].1)), "{l}");
    }

    // Training longer with the same command but more steps continues the same directory.
    let mut longer = sets(&ck);
    longer.push("train.steps=10".into());
    let f = run(&mut train_command(2, &config, &track, &longer), Duration::from_secs(120));
    assert!(f.status.success(), "{}", f.stderr);
    assert_eq!(metrics(&track).iter().map(|r| r.0).collect::<Vec<_>>(), (1..=10).collect::<Vec<u64>>());
}

#[test]
fn a_run_that_dies_between_a_checkpoint_and_its_row_gets_the_row_back() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), TINY, "steps = 6\nglobal_batch = 4\nmicro_batch = 2\nwarmup = 2");
    let sets = |ck: &Path| vec![format!("checkpoint.dir={}", ck.display()), "checkpoint.every=2".to_string()];
    let whole = train(2, &config, &dir.path().join("whole"), &sets(&dir.path().join("ck-whole")));
    let track = dir.path().join("run");
    let ck = dir.path().join("ck");
    // Rank 0 dies once `latest` names step 4, before step 4's row is written (found by the soak).
    let f = run(train_command(2, &config, &track, &sets(&ck)).env("FERROSPEED_FAULT", "after-latest@4@0"), Duration::from_secs(120));
    assert!(!f.status.success());
    assert_eq!(metrics(&track).iter().map(|r| r.0).collect::<Vec<_>>(), [1, 2, 3]);
    let f = run(&mut train_command(2, &config, &track, &sets(&ck)), Duration::from_secs(120));
    assert!(f.status.success() && f.stdout.contains("at step 4"), "{}", f.stderr);
    assert_eq!(bits(&metrics(&track)), bits(&whole), "every step once, step 4 from the checkpoint");
}

#[test]
fn resume_without_a_checkpoint_says_so_and_another_config_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), TINY, "steps = 2\nglobal_batch = 4\nmicro_batch = 2\nwarmup = 1");
    let track = dir.path().join("run");
    let ck = dir.path().join("ck");
    let sets = vec![format!("checkpoint.dir={}", ck.display()), "checkpoint.resume=true".to_string()];
    let f = run(&mut train_command(1, &config, &track, &sets), Duration::from_secs(120));
    assert!(f.status.success(), "{}", f.stderr);
    assert!(f.stdout.contains(&format!("no checkpoint in {} yet: starting at step 0", ck.display())), "{}", f.stdout);
    // The same directory with another config is another run: refused, untouched.
    let before = std::fs::read(track.join("metrics.jsonl")).unwrap();
    let mut other = sets.clone();
    other.push("train.lr=1e-2".into());
    let f = run(&mut train_command(1, &config, &track, &other), Duration::from_secs(120));
    assert_eq!(f.status.code(), Some(2), "{}", f.stderr);
    assert!(f.stderr.contains("already holds a run"), "{}", f.stderr);
    assert_eq!(std::fs::read(track.join("metrics.jsonl")).unwrap(), before);
}

#[test]
fn max_restarts_survives_two_rank_deaths_and_ends_with_the_uninterrupted_losses() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), TINY, "steps = 8\nglobal_batch = 4\nmicro_batch = 2\nwarmup = 2");
    let sets = |ck: &Path| vec![format!("checkpoint.dir={}", ck.display()), "checkpoint.every=2".to_string()];
    let whole = train(2, &config, &dir.path().join("whole"), &sets(&dir.path().join("ck-whole")));
    // Rank 1 dies saving step 4 in the first attempt, rank 0 saving step 6 in the second.
    let faults = "shards-written@4@1@0,shards-written@6@0@1";
    let launch = |restarts: usize, name: &str| {
        let track = dir.path().join(name);
        let mut cmd = ferrospeed();
        cmd.args(["launch", "--nproc-per-node", "2", "--max-restarts", &restarts.to_string(), "train", "--config"]).arg(&config);
        cmd.arg("--set").arg(format!("track.dir={}", track.display()));
        for s in sets(&dir.path().join(format!("ck-{name}"))) {
            cmd.args(["--set", &s]);
        }
        (run(cmd.env("FERROSPEED_FAULT", faults), Duration::from_secs(180)), track)
    };
    let (f, track) = launch(2, "restarted");
    assert!(f.status.success(), "{}", f.stderr);
    for said in ["restart 1 of 2: rank 1", "restart 2 of 2: rank 0", "2 restart(s): 1. rank 1"] {
        assert!(f.stderr.contains(said), "{said:?} in\n{}", f.stderr);
    }
    assert_eq!(bits(&metrics(&track)), bits(&whole), "losses equal the uninterrupted run's, every step once");

    // One restart is not enough for two deaths: the launcher gives up, naming the last one.
    let (f, _) = launch(1, "gave-up");
    assert!(!f.status.success());
    assert!(f.stderr.contains("restart 1 of 1: rank 1") && f.stderr.contains("failed: rank 0"), "{}", f.stderr);
}
