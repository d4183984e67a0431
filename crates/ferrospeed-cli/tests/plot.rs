//! `plot.png`: `train` leaves one in the run directory and names it in the summary; `ferrospeed plot`
//! redraws one run (the same bytes), overlays several, and refuses a directory without metrics; lines
//! of `metrics.jsonl` that are not rows are named in one warning by `plot` and `runs`.

mod support;

use std::path::Path;
use std::time::Duration;
use support::*;

/// Width and height from the PNG's IHDR chunk (the first chunk, right after the 8-byte signature).
fn png_size(path: &Path) -> (u32, u32) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{} is not a PNG", path.display());
    assert_eq!(&bytes[12..16], b"IHDR");
    let be = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap());
    (be(16), be(20))
}

fn summary(track: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(track.join("summary.json")).unwrap()).unwrap()
}

fn plot(args: &[&Path], out: Option<&Path>) -> Finished {
    let mut cmd = ferrospeed();
    cmd.arg("plot").args(args);
    if let Some(out) = out {
        cmd.arg("--out").arg(out);
    }
    run(&mut cmd, Duration::from_secs(60))
}

#[test]
fn train_writes_plot_png_and_plot_redraws_and_overlays_runs() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), TINY, "steps = 4\nglobal_batch = 4\nmicro_batch = 2\nlr = 3e-3\nwarmup = 1");
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let f = run(&mut train_command(1, &config, &a, &[]), Duration::from_secs(120));
    assert!(f.status.success(), "{}", f.stderr);
    let png = a.join("plot.png");
    assert_eq!(png_size(&png), (1500, 900));
    assert_eq!(summary(&a)["plot"].as_str(), Some(png.display().to_string().as_str()));
    assert!(f.stdout.lines().any(|l| l.contains("done:") && l.contains(&format!("plot {}", png.display()))), "{}", f.stdout);
    // Other losses (another learning rate): another picture.
    train(1, &config, &b, &["train.lr=1e-2".into()]);
    assert_ne!(metrics(&a), metrics(&b));
    let from_train = std::fs::read(&png).unwrap();
    assert_ne!(std::fs::read(b.join("plot.png")).unwrap(), from_train);

    // `plot RUN` redraws RUN/plot.png from the same rows: the same bytes.
    std::fs::remove_file(&png).unwrap();
    let f = plot(&[&a], None);
    assert!(f.status.success(), "{}", f.stderr);
    assert_eq!(std::fs::read(&png).unwrap(), from_train);
    // Two runs overlaid into --out: a picture of the same size unlike either.
    let both = dir.path().join("both.png");
    let f = plot(&[&a, &b], Some(&both));
    assert!(f.status.success(), "{}", f.stderr);
    assert!(f.stdout.contains("a (4 steps), b (4 steps)"), "{}", f.stdout);
    assert_eq!(png_size(&both), (1500, 900));
    let overlaid = std::fs::read(&both).unwrap();
    assert!(overlaid != from_train && overlaid != std::fs::read(b.join("plot.png")).unwrap());
    // Several runs without --out: one line asking for it, nothing written.
    let f = plot(&[&a, &b], None);
    assert_eq!(f.status.code(), Some(2), "{}", f.stderr);
    assert_eq!(f.stderr.trim().lines().count(), 1, "{}", f.stderr);
    assert!(f.stderr.contains("--out"), "{}", f.stderr);
    assert_eq!(std::fs::read(&png).unwrap(), from_train);
}

#[test]
fn a_directory_without_metrics_is_one_line_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("not-a-run");
    std::fs::create_dir(&empty).unwrap();
    for target in [empty.clone(), dir.path().join("missing")] {
        let f = plot(&[&target], None);
        assert_eq!(f.status.code(), Some(2), "{}", f.stderr);
        assert_eq!(f.stderr.trim().lines().count(), 1, "{}", f.stderr);
        assert!(f.stderr.contains(&target.display().to_string()) && f.stderr.contains("metrics.jsonl"), "{}", f.stderr);
    }
    assert!(names_in(&empty).is_empty(), "nothing written");
}

#[test]
fn a_plot_that_cannot_be_written_is_a_warning_and_the_run_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), TINY, "steps = 2\nglobal_batch = 2\nmicro_batch = 2\nwarmup = 1");
    let track = dir.path().join("run");
    // A folder in the plot's place: the rename onto it fails.
    std::fs::create_dir_all(track.join("plot.png/occupied")).unwrap();
    let f = run(&mut train_command(1, &config, &track, &[]), Duration::from_secs(120));
    assert!(f.status.success(), "{}", f.stderr);
    let warnings: Vec<&str> = f.stderr.lines().filter(|l| l.contains("plot")).collect();
    assert_eq!(warnings.len(), 1, "{}", f.stderr);
    assert!(warnings[0].contains("warning: no plot of this run:") && warnings[0].contains("plot.png"), "{}", f.stderr);
    assert!(summary(&track)["plot"].is_null());
    assert_eq!(metrics(&track).len(), 2);
}

#[test]
fn lines_of_metrics_that_are_not_rows_are_named_by_plot_and_runs() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), TINY, "steps = 4\nglobal_batch = 2\nmicro_batch = 2\nwarmup = 1");
    let track = dir.path().join("run");
    train(1, &config, &track, &[]);
    let path = track.join("metrics.jsonl");
    let rows: Vec<String> = std::fs::read_to_string(&path).unwrap().lines().map(String::from).collect();
    assert_eq!(rows.len(), 4);
    // Not JSON (line 2), a row without its loss (line 4), a torn last line (line 7).
    let mut no_loss: serde_json::Value = serde_json::from_str(&rows[2]).unwrap();
    no_loss.as_object_mut().unwrap().remove("loss");
    let text = [rows[0].clone(), "<<<<<<< HEAD".into(), rows[1].clone(), no_loss.to_string(), rows[2].clone(), rows[3].clone(), rows[3][..20].to_string()].join("\n");
    std::fs::write(&path, text).unwrap();
    let warning = format!("warning: {}: 3 lines are not metrics rows and skipped (lines 2, 4, 7)", path.display());

    // `plot` draws the four good rows and says which lines it skipped, in one line.
    let out = dir.path().join("run.png");
    let f = plot(&[&track], Some(&out));
    assert!(f.status.success(), "{}", f.stderr);
    assert_eq!(f.stderr.trim(), warning);
    assert!(f.stdout.contains("run (4 steps)"), "{}", f.stdout);
    assert_eq!(png_size(&out), (1500, 900));

    // `runs` shows the run from its good rows, with the same warning.
    let f = run(ferrospeed().args(["runs"]).arg(dir.path()), Duration::from_secs(30));
    assert!(f.status.success(), "{}", f.stderr);
    assert_eq!(f.stderr.trim(), warning);
    let line = f.stdout.lines().find(|l| l.starts_with("run ")).unwrap_or_else(|| panic!("{}", f.stdout));
    assert!(line.contains("4/4") && line.contains("finished"), "{line}");

    // No good row left: `plot` refuses in one line naming the file; nothing is written.
    std::fs::write(&path, "not a row\n{\"step\": 1}\n").unwrap();
    std::fs::remove_file(&out).unwrap();
    let f = plot(&[&track], Some(&out));
    assert_eq!(f.status.code(), Some(2), "{}", f.stderr);
    assert_eq!(f.stderr.trim().lines().count(), 1, "{}", f.stderr);
    assert!(f.stderr.contains(&path.display().to_string()) && f.stderr.contains("none of its 2 lines is a metrics row"), "{}", f.stderr);
    assert!(!out.exists());
}
