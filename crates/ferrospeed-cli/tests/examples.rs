//! The two shipped examples of the library API (`examples/mlp.rs`, a one-block MLP classifier on
//! synthetic data; `examples/transformer.rs`, a candle-nn transformer of four blocks with a tied head)
//! run as processes under `ferrospeed launch`: world sizes 1, 2 and 3 at ZeRO stages 0–3, bitwise
//! equal across stages at each world size and within 1e-5 across world sizes; resume bit for bit;
//! export of their checkpoints under their own names.

mod support;

use ferrospeed::checkpoint;
use std::path::{Path, PathBuf};
use std::time::Duration;
use support::*;

/// The example binary `name`, built by `cargo test` next to the `ferrospeed` binary.
fn example(name: &str) -> PathBuf {
    let bin = Path::new(env!("CARGO_BIN_EXE_ferrospeed"));
    let path = bin.parent().unwrap().join("examples").join(name);
    assert!(path.is_file(), "{} is missing: `cargo test` builds the examples of ferrospeed-cli", path.display());
    path
}

/// Run example `name` with `nproc` ranks and `--set`s; returns (step, loss) per step.
fn run_example(name: &str, nproc: usize, track: &Path, sets: &[String]) -> Vec<(u64, f64)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut cmd = ferrospeed();
    cmd.current_dir(&root);
    cmd.args(["launch", "--nproc-per-node", &nproc.to_string()]).arg(example(name));
    cmd.arg("--set").arg(format!("track.dir=\"{}\"", track.display()));
    for s in sets {
        cmd.args(["--set", s]);
    }
    let f = run(&mut cmd, Duration::from_secs(300));
    assert!(f.status.success(), "{name} world {nproc} {sets:?} failed:\n{}\n{}", f.stdout, f.stderr);
    metrics(track)
}

fn stages_and_worlds(name: &str, steps: usize) {
    let dir = tempfile::tempdir().unwrap();
    let mut per_world = Vec::new();
    for world in 1..=3 {
        let mut per_stage = Vec::new();
        for stage in 0..=3 {
            let track = dir.path().join(format!("w{world}-s{stage}"));
            let losses = run_example(name, world, &track, &[format!("zero.stage={stage}"), format!("train.steps={steps}")]);
            assert_eq!(losses.len(), steps, "{name} world {world} stage {stage}");
            per_stage.push(losses);
        }
        for (stage, l) in per_stage.iter().enumerate().skip(1) {
            assert_eq!(bits(l), bits(&per_stage[0]), "{name} world {world}: stage {stage} differs from stage 0");
        }
        per_world.push(per_stage.swap_remove(0));
    }
    if name == "mlp" {
        // The held-out score: each rank's count summed by `Accelerator::reduce`, the ranks' shares by
        // `Accelerator::gather` (all of the test set, split by rank).
        for world in 1..=3 {
            let summary: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(dir.path().join(format!("w{world}-s0/summary.json"))).unwrap()).unwrap();
            let scored: Vec<f64> = summary["scored_per_rank"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
            assert_eq!(scored.len(), world, "{summary}");
            assert_eq!(scored.iter().sum::<f64>(), 600.0, "{summary}");
            let correct = summary["correct"].as_f64().unwrap();
            assert!(correct > 300.0 && correct <= 600.0, "world {world}: {correct} of 600 correct (4 classes)");
        }
    }
    let w1 = &per_world[0];
    assert!(w1[steps - 1].1 < w1[0].1, "{name}: the loss falls: {w1:?}");
    for (w, other) in per_world.iter().enumerate().skip(1) {
        for ((step, a), (_, b)) in w1.iter().zip(other) {
            assert!(((a - b) / a).abs() < 1e-5, "{name} world {} step {step}: {a} vs world 1 {b}", w + 1);
        }
    }
}

#[test]
fn mlp_losses_are_bitwise_across_stages_and_agree_across_world_sizes() {
    stages_and_worlds("mlp", 10);
}

#[test]
fn the_transformer_example_runs_as_a_pipeline_and_resumes_at_pp_1() {
    // The same program at pp = 2 (its head tied to the embedding across the stages): the losses of
    // pp = 1 within 1e-6 at each data-parallel size, and a pipeline's checkpoint resumes at pp = 1.
    let dir = tempfile::tempdir().unwrap();
    let steps = "train.steps=6".to_string();
    for dp in [1, 2] {
        let flat = run_example("transformer", dp, &dir.path().join(format!("dp{dp}")), &[steps.clone()]);
        let piped = run_example("transformer", 2 * dp, &dir.path().join(format!("pp2dp{dp}")), &[steps.clone(), "parallel.pp=2".into()]);
        assert_eq!(piped.len(), 6);
        for ((s, a), (_, b)) in piped.iter().zip(&flat) {
            assert!(((a - b) / b).abs() <= 1e-6, "dp {dp} step {s}: pp = 2 {a} vs pp = 1 {b}");
        }
    }
    let ck = dir.path().join("ck");
    let sets = |extra: &[&str]| {
        let mut v = vec![steps.clone(), format!("checkpoint.dir=\"{}\"", ck.display()), "checkpoint.every=3".to_string()];
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let whole = run_example("transformer", 2, &dir.path().join("ck-whole"), &sets(&["parallel.pp=2"]));
    std::fs::write(ck.join("latest"), format!("{}\n", checkpoint::step_dir_name(3))).unwrap();
    let resumed = run_example("transformer", 1, &dir.path().join("ck-resumed"), &sets(&[]));
    let later: Vec<_> = resumed.iter().filter(|(s, _)| *s > 3).collect();
    assert_eq!(later.len(), 3);
    for ((s, a), (_, b)) in later.iter().map(|r| (r.0, r.1)).zip(whole.iter().skip(3)) {
        assert!(((a - b) / b).abs() <= 1e-6, "step {s}: resumed at pp = 1 {a} vs the pipeline's {b}");
    }
}

#[test]
fn transformer_losses_are_bitwise_across_stages_and_agree_across_world_sizes() {
    stages_and_worlds("transformer", 6);
}

#[test]
fn examples_resume_bit_for_bit_and_export_under_their_own_names() {
    let dir = tempfile::tempdir().unwrap();
    for (name, world, stage, tensors) in [("mlp", 2, 2, 6), ("transformer", 3, 3, 2 + 12 * 2 + 2)] {
        let base = dir.path().join(name);
        let ck = base.join("ck");
        let sets = |ck: &Path| vec![format!("zero.stage={stage}"), "train.steps=8".into(), format!("checkpoint.dir=\"{}\"", ck.display()), "checkpoint.every=4".into()];
        let whole = run_example(name, world, &base.join("whole"), &sets(&ck));
        let root = root_with(&ck.join(checkpoint::step_dir_name(4)), &base.join("resume-root"));
        let resumed = run_example(name, world, &base.join("resumed"), &sets(&root));
        assert_eq!(resumed.first().map(|r| r.0), Some(5), "{name}: resumed after step 4");
        assert_eq!(bits(&resumed), bits(&whole[4..]), "{name}: losses after resuming must equal the uninterrupted run");

        let out = base.join("export.safetensors");
        let f = run(ferrospeed().args(["checkpoint", "export"]).arg(&ck).arg(&out), Duration::from_secs(60));
        assert!(f.status.success(), "{name} export: {}\n{}", f.stdout, f.stderr);
        let bytes = std::fs::read(&out).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let names: Vec<String> = st.names().into_iter().map(String::from).collect();
        assert_eq!(names.len(), tensors, "{name}: exported {names:?}");
        let (first, shape) = match name {
            "mlp" => ("mlp.fc1.weight", vec![64, 16]),
            _ => ("embed.wte.weight", vec![256, 48]),
        };
        assert_eq!(st.tensor(first).unwrap().shape(), shape.as_slice(), "{name}: {first}");
        assert!(!names.iter().any(|n| n.contains("lm_head")), "{name}: the tied head weight is stored once, by its owner");
    }
}
