//! A job's directories: a second job pointed at them is refused at once, naming the first; a run
//! that died past its last checkpoint gets its ending from the same command; a start that is
//! refused or fails leaves nothing behind (exit 2, one line); a save that finds the disk full
//! removes what it wrote and says how much it needs.

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use support::*;

fn one_line_exit_2(f: &Finished, what: &str) {
    assert_eq!(f.status.code(), Some(2), "{what}: {}\n{}", f.stdout, f.stderr);
    assert_eq!(f.stderr.trim().lines().count(), 1, "{what}: one line please: {}", f.stderr);
}

fn ck_sets(ck: &Path, every: usize) -> Vec<String> {
    vec![format!("checkpoint.dir={}", ck.display()), format!("checkpoint.every={every}")]
}

fn single(config: &Path, track: &Path, sets: &[String]) -> Finished {
    let mut cmd = ferrospeed();
    cmd.args(["train", "--config"]).arg(config).arg("--set").arg(format!("track.dir={}", track.display()));
    for s in sets {
        cmd.args(["--set", s]);
    }
    run(&mut cmd, Duration::from_secs(120))
}

/// Entries of `dir` whose names start with `.tmp-`.
fn temporaries(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir).map(|d| d.flatten().map(|e| e.path()).filter(|p| p.file_name().unwrap().to_string_lossy().starts_with(".tmp-")).collect()).unwrap_or_default()
}

#[test]
fn a_second_launch_into_the_same_directories_is_refused_at_once_naming_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), TINY, "steps = 150\nglobal_batch = 4\nmicro_batch = 2\nwarmup = 2");
    let (track, ck) = (dir.path().join("run"), dir.path().join("ck"));
    let first = start(&mut train_command(2, &config, &track, &ck_sets(&ck, 50)));
    let t0 = Instant::now();
    while std::fs::read_to_string(track.join("metrics.jsonl")).map_or(0, |t| t.lines().count()) < 2 {
        assert!(t0.elapsed() < Duration::from_secs(120), "the first job did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The identical command (it would continue the run), and another run into the same checkpoints.
    for (what, track2) in [("the same command", track.clone()), ("another track.dir", dir.path().join("other"))] {
        let second = run(&mut train_command(2, &config, &track2, &ck_sets(&ck, 50)), Duration::from_secs(60));
        eprintln!("{what}: refused in {:.2} s", second.elapsed.as_secs_f64());
        assert_eq!(second.status.code(), Some(2), "{what}: {}\n{}", second.stdout, second.stderr);
        assert!(second.elapsed < Duration::from_secs(3), "{what}: refused at once, not after {:?}", second.elapsed);
        let line = second.stderr.lines().find(|l| l.contains("in use by another job")).unwrap_or_else(|| panic!("{what}: {}", second.stderr));
        // The holder: rank 0 of the first job, alive, on this host.
        let pid: i32 = line.split("(pid ").nth(1).and_then(|r| r.split(' ').next()).and_then(|p| p.parse().ok()).unwrap_or_else(|| panic!("{line}"));
        assert!(alive(pid) && std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap().contains("train"), "{line}");
        if track2 != track {
            assert!(!track2.exists(), "{what}: the refused job left its run directory behind");
        }
    }
    let f = finish(first, Duration::from_secs(300));
    assert!(f.status.success(), "{}\n{}", f.stdout, f.stderr);
    let steps: Vec<u64> = metrics(&track).iter().map(|r| r.0).collect();
    assert_eq!(steps, (1..=150).collect::<Vec<u64>>(), "the first job's metrics are complete");
    assert!(f.stdout.contains("done: 150 steps"), "{}", f.stdout);
}

#[test]
fn a_run_that_died_past_its_last_checkpoint_gets_its_ending_from_the_same_command() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), TINY, "steps = 8\nglobal_batch = 4\nmicro_batch = 2\nwarmup = 2");
    let whole = train(2, &config, &dir.path().join("whole"), &ck_sets(&dir.path().join("ck-whole"), 4));
    let (track, ck) = (dir.path().join("run"), dir.path().join("ck"));
    // Rank 0 dies once the last checkpoint (step 8) is in place: no row 8, no summary, no plot.
    let f = run(train_command(2, &config, &track, &ck_sets(&ck, 4)).env("FERROSPEED_FAULT", "after-latest@8@0"), Duration::from_secs(120));
    assert!(!f.status.success());
    assert!(!track.join("summary.json").exists() && !track.join("plot.png").exists());
    let f = run(&mut train_command(2, &config, &track, &ck_sets(&ck, 4)), Duration::from_secs(120));
    assert!(f.status.success(), "{}", f.stderr);
    assert!(f.stdout.contains("already at step 8 of 8: finishing the run's outputs"), "{}", f.stdout);
    assert_eq!(bits(&metrics(&track)), bits(&whole), "row 8 from the checkpoint");
    let summary: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(track.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["final_loss"].as_f64().map(f64::to_bits), Some(whole[7].1.to_bits()), "{summary}");
    assert_eq!(summary["first_loss"].as_f64().map(f64::to_bits), Some(whole[0].1.to_bits()), "{summary}");
    assert!(track.join("plot.png").is_file() && summary["plot"].is_string(), "{summary}");
    let listed = run(ferrospeed().args(["runs", &dir.path().display().to_string()]), Duration::from_secs(30));
    let line = listed.stdout.lines().find(|l| l.starts_with("run ")).unwrap_or_else(|| panic!("{}", listed.stdout)).to_string();
    assert!(line.contains("finished"), "{line}");
    // Once ended, the same command has nothing left to do.
    let f = run(&mut train_command(2, &config, &track, &ck_sets(&ck, 4)), Duration::from_secs(120));
    assert!(f.status.success() && f.stdout.contains("nothing to train"), "{}", f.stdout);
}

#[test]
fn a_checkpoint_of_another_shape_is_refused_in_one_line_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), TINY, "steps = 2\nglobal_batch = 4\nmicro_batch = 2\nwarmup = 1");
    let ck = dir.path().join("ck");
    let f = single(&config, &dir.path().join("small"), &ck_sets(&ck, 2));
    assert!(f.status.success(), "{}", f.stderr);
    let before = names_in(&ck);
    let track = dir.path().join("wide");
    let mut sets = ck_sets(&ck, 2);
    sets.push("model.d_model=64".into());
    let f = single(&config, &track, &sets);
    one_line_exit_2(&f, "another shape");
    assert!(f.stderr.contains("does not fit this model"), "{}", f.stderr);
    assert!(!track.exists(), "no run directory is left");
    assert_eq!(names_in(&ck), before, "the checkpoints are untouched");
    // The corrected command runs into the same directory.
    let f = single(&config, &track, &[format!("checkpoint.dir={}", dir.path().join("ck2").display())]);
    assert!(f.status.success(), "{}", f.stderr);
}

#[test]
fn a_truncated_gguf_file_is_refused_in_one_line_and_leaves_nothing() {
    let Some(gguf) = smollm2() else { return };
    let dir = tempfile::tempdir().unwrap();
    // Its header and tensor table, without most of the tensors' data.
    let bytes = std::fs::read(&gguf).unwrap();
    let cut = dir.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() / 3]).unwrap();
    let config = write_config(dir.path(), &format!("init_from = \"{}\"\nseq_len = 16", cut.display()), "steps = 1\nwarmup = 0\nglobal_batch = 2\nmicro_batch = 2");
    let track = dir.path().join("track");
    let f = single(&config, &track, &[]);
    one_line_exit_2(&f, "truncated GGUF");
    assert!(f.stderr.contains("cut.gguf"), "{}", f.stderr);
    assert!(!track.exists(), "no run directory is left");
}

#[test]
fn a_full_disk_during_a_save_removes_its_files_and_says_what_it_needs() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), TINY, "steps = 6\nglobal_batch = 4\nmicro_batch = 2\nwarmup = 1");
    let (track, ck) = (dir.path().join("run"), dir.path().join("ck"));
    // The save of step 4 finds the disk full on rank 1 (the save of step 2 went through).
    let f = run(train_command(2, &config, &track, &ck_sets(&ck, 2)).env("FERROSPEED_FAULT", "enospc@4@1"), Duration::from_secs(120));
    assert_eq!(f.status.code(), Some(2), "a full disk is the user's to fix: {}\n{}", f.stdout, f.stderr);
    assert!(!f.stderr.contains("restart"), "{}", f.stderr);
    let line = f.stderr.lines().find(|l| l.contains("has no room")).unwrap_or_else(|| panic!("{}", f.stderr));
    assert!(line.contains(&format!("checkpoint.dir = {}", ck.display())) && line.contains("step 4") && line.contains("MB are free") && line.contains("larger disk"), "{line}");
    assert!(temporaries(&ck).is_empty(), "the failed save left {:?}", temporaries(&ck));
    assert_eq!(std::fs::read_to_string(ck.join("latest")).unwrap().trim(), "step-00000002", "the last complete checkpoint stays");
}

#[test]
fn a_disk_too_small_for_a_checkpoint_is_refused_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    // A real file system of 64 KiB (root can mount one; elsewhere this test is recorded as skipped).
    let small = dir.path().join("small");
    std::fs::create_dir(&small).unwrap();
    let mounted = std::process::Command::new("mount").args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"]).arg(&small).status().is_ok_and(|s| s.success());
    if !mounted {
        skip("a_disk_too_small_for_a_checkpoint_is_refused_before_anything_is_written", "cannot mount a small tmpfs (needs root)");
        return;
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _guard = Unmount(small.clone());
    let config = write_config(dir.path(), TINY, "steps = 2\nglobal_batch = 4\nmicro_batch = 2\nwarmup = 1");
    let ck = small.join("ck");
    let f = single(&config, &dir.path().join("run"), &ck_sets(&ck, 2));
    assert_eq!(f.status.code(), Some(2), "{}\n{}", f.stdout, f.stderr);
    let line = f.stderr.lines().find(|l| l.contains("has no room")).unwrap_or_else(|| panic!("{}", f.stderr));
    assert!(line.contains("needs about") && line.contains("MB are free"), "{line}");
    assert!(temporaries(&ck).is_empty() && !ck.join("latest").exists());
}
