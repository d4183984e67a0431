//! `plot.png`: `train` leaves one in the run directory and names it in the summary; `ferrospeed plot`
//! redraws one run (the same bytes), overlays several, and refuses a directory without metrics.

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
