//! `ferrospeed config`'s questionnaire driven through a pseudo-terminal: defaults and typed answers
//! (the optimizer state split between host memory and NVMe files),
//! bad answers asked again with the schema's message, and a written config that validates and trains;
//! without a terminal it points to `--defaults`.

mod support;

use rexpect::reader::Options;
use rexpect::session::{spawn_with_options, PtySession};
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use support::*;

/// Waits for `prompt`, then types `keys` (`\r` is Enter, `j` moves a selection down).
fn answer(p: &mut PtySession, prompt: &str, keys: &str) {
    p.exp_string(prompt).unwrap_or_else(|e| panic!("waiting for {prompt:?}: {e}"));
    p.send(keys).unwrap();
    p.flush().unwrap();
}

fn wizard(dir: &Path, out: &Path) -> PtySession {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferrospeed"));
    // No --data: the default answer, data/rust-book.txt, does not exist in `dir`. Questions before
    // the data's must not be blamed for it.
    cmd.args(["config", "--out"]).arg(out).current_dir(dir);
    spawn_with_options(cmd, Options::new().timeout_ms(Some(60_000)).strip_ansi_escape_codes(true)).unwrap()
}

#[test]
fn the_questionnaire_writes_a_config_that_trains() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("wizard.toml");
    let ckpt = dir.path().join("ck");
    let mut p = wizard(dir.path(), &out);
    answer(&mut p, "Where does it train?", "\r");
    answer(&mut p, "Processes per node", "\r");
    answer(&mut p, "Nodes (machines)", "\r");
    answer(&mut p, "ZeRO stage", "j\r");
    // Three tiers: 80% offloaded, of the whole 40% in files on disk, the rest in host memory.
    let nvme = dir.path().join("nvme");
    std::fs::create_dir(&nvme).unwrap();
    answer(&mut p, "Optimizer state offload", "jj\r");
    answer(&mut p, "Folder for the optimizer state files", &format!("{}\r", nvme.display()));
    answer(&mut p, "Share of the optimizer state offloaded", "0.8\r");
    answer(&mut p, "Share of the whole optimizer state in NVMe files", "0.9\r");
    answer(&mut p, "zero.nvme_ratio = 0.9 must be in (0, zero.offload_ratio = 0.8]", "0.4\r");
    answer(&mut p, "Precision", "\r");
    answer(&mut p, "Activation checkpointing", "\r");
    answer(&mut p, "Model", "\r");
    answer(&mut p, "Sequence length", "32\r");
    answer(&mut p, "Training data", "\r");
    answer(&mut p, "data.path = \"data/rust-book.txt\" does not exist", &format!("{}\r", corpus().display()));
    // A bad answer is refused with the schema's one-line message and asked again.
    answer(&mut p, "Global batch", "0\r");
    answer(&mut p, "train.global_batch = 0 is out of range", "4\r");
    // One the world cannot split: the batch arithmetic's message.
    answer(&mut p, "Micro-batch", "3\r");
    answer(&mut p, "is not divisible by train.micro_batch (3)", "2\r");
    // (rexpect reads bytes as Latin-1: the expected text stays ASCII around the "×".)
    p.exp_string("gradient accumulation steps = global batch / (micro-batch ").unwrap();
    p.exp_string("= 4 / (2 ").unwrap();
    p.exp_string("1) = 2\r\n").unwrap();
    answer(&mut p, "Optimizer steps", "3\r");
    answer(&mut p, "Save checkpoints", "\r");
    answer(&mut p, "Checkpoint folder", &format!("{}\r", ckpt.display()));
    answer(&mut p, "Steps between checkpoints", "\r");
    p.exp_string("memory per rank (estimate,").unwrap();
    p.exp_string(&format!("ferrospeed launch --nproc-per-node 1 train --config {}", out.display())).unwrap();
    p.exp_eof().unwrap();
    let status = format!("{:?}", p.process().wait().unwrap());
    assert!(status.ends_with(", 0)"), "exit: {status}");

    let cfg = ferrospeed::config::Config::load(&out, &[]).expect("the written config validates");
    assert_eq!((cfg.train.global_batch, cfg.train.micro_batch, cfg.train.steps, cfg.model.seq_len), (4, 2, 3, 32));
    assert_eq!(cfg.zero.stage.as_int(), 1);
    assert_eq!((cfg.zero.offload_optimizer, cfg.zero.offload_ratio, cfg.zero.nvme_ratio), (ferrospeed::config::Offload::Nvme, 0.8, Some(0.4)));
    assert_eq!(cfg.zero.nvme_dir.as_deref(), Some(nvme.as_path()));
    assert_eq!(cfg.checkpoint.dir.as_deref(), Some(ckpt.as_path()));
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(text.starts_with("# ferrospeed run configuration, written by `ferrospeed config`."), "{text}");
    assert!(text.contains("= 2 at 1 rank(s)"), "the accumulation is explained:\n{text}");
    // It trains, as written (but for the run directory, into this test's folder).
    let rows = train(1, &out, &dir.path().join("t"), &[]);
    assert_eq!(rows.iter().map(|r| r.0).collect::<Vec<_>>(), [1, 2, 3]);
    assert!(ckpt.join("latest").is_file(), "checkpoints go where the answer said");

    // The file is not replaced without --force, before any question.
    let f = run(ferrospeed().arg("config").arg("--out").arg(&out), Duration::from_secs(30));
    assert_eq!(f.status.code(), Some(2), "{}", f.stderr);
    assert!(f.stderr.contains("exists") && f.stderr.contains("--force"), "{}", f.stderr);
}

#[test]
fn with_several_ranks_it_asks_for_pipeline_stages_and_the_config_trains_as_a_pipeline() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("pipe.toml");
    let mut p = wizard(dir.path(), &out);
    answer(&mut p, "Where does it train?", "\r");
    answer(&mut p, "Processes per node", "4\r");
    answer(&mut p, "Nodes (machines)", "\r");
    // Stages that do not divide the ranks: the mesh's one-line message, asked again.
    answer(&mut p, "Pipeline stages (parallel.pp", "3\r");
    answer(&mut p, "world size 4 does not split into pp", "2\r");
    answer(&mut p, "ZeRO stage", "\r");
    answer(&mut p, "Optimizer state offload", "\r");
    answer(&mut p, "Precision", "\r");
    answer(&mut p, "Activation checkpointing", "\r");
    answer(&mut p, "Model", "\r");
    answer(&mut p, "Sequence length", "32\r");
    answer(&mut p, "Training data", &format!("{}\r", corpus().display()));
    answer(&mut p, "Global batch", "8\r");
    answer(&mut p, "Micro-batch", "2\r");
    // 8 / (2 × 2 data-parallel ranks): the pipeline's ranks do not split the batch.
    p.exp_string("= 8 / (2 ").unwrap();
    p.exp_string("2) = 2\r\n").unwrap();
    answer(&mut p, "Optimizer steps", "2\r");
    answer(&mut p, "Save checkpoints", "n\r");
    p.exp_string("memory per rank (estimate,").unwrap();
    p.exp_string("ferrospeed launch --nproc-per-node 4 train --config").unwrap();
    p.exp_eof().unwrap();
    let cfg = ferrospeed::config::Config::load(&out, &[]).expect("the written config validates");
    assert_eq!((cfg.parallel.pp, cfg.train.global_batch, cfg.train.micro_batch), (2, 8, 2));
    assert_eq!(cfg.accumulation_steps(cfg.mesh(4).unwrap().size(ferrospeed::parallel::Axis::Dp)).unwrap(), 2);
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(text.contains("= 2 at 2 data-parallel of 4 rank(s)") && text.contains("\n[parallel]"), "{text}");
    let rows = train(4, &out, &dir.path().join("t"), &[]);
    assert_eq!(rows.iter().map(|r| r.0).collect::<Vec<_>>(), [1, 2]);
}

#[test]
fn without_a_terminal_it_points_to_defaults_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.toml");
    let f = run(ferrospeed().arg("config").arg("--out").arg(&out), Duration::from_secs(30));
    assert_eq!(f.status.code(), Some(2), "{}", f.stderr);
    assert_eq!(f.stderr.trim().lines().count(), 1, "{}", f.stderr);
    assert!(f.stderr.contains("terminal") && f.stderr.contains("--defaults"), "{}", f.stderr);
    assert!(!out.exists());
}
