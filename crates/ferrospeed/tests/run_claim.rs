//! The `Accelerator`'s claim on a job's directories, in one process: a second job on the same
//! `track.dir` or `checkpoint.dir` is refused naming the first; a start that fails before its first
//! step leaves nothing behind; and a row rebuilt from a checkpoint is the row as it was written.

use candle_core::Tensor;
use candle_nn::{linear, Linear, Module, VarBuilder};
use ferrospeed::accelerator::{AccelError, Accelerator, Options, PrepareOptions};
use ferrospeed::config::Config;
use ferrospeed::engine::{Batch, Model};
use ferrospeed::nn::{Forward, NnBlock};
use ferrospeed::track::StepMetrics;
use std::path::Path;

struct Tiny {
    fc: Linear,
}

impl Forward for Tiny {
    fn forward(&self, _inputs: &[Tensor], batch: &Batch) -> candle_core::Result<Vec<Tensor>> {
        Ok(vec![self.fc.forward(batch.get("x")?)?.sqr()?.mean_all()?])
    }
}

fn model() -> Model {
    Model::new(vec![Box::new(NnBlock::new("tiny", |vb: VarBuilder| Ok(Tiny { fc: linear(4, 2, vb.pp("fc"))? })).unwrap())]).unwrap()
}

fn config(track: &Path, ck: &Path) -> Config {
    let text = format!(
        "[train]\nsteps = 4\nglobal_batch = 2\nmicro_batch = 2\n\n[track]\ndir = \"{}\"\ntensorboard = true\n\n[checkpoint]\ndir = \"{}\"\n",
        track.display(),
        ck.display()
    );
    Config::from_toml_str_for_program(&text, "test", &[]).unwrap()
}

fn row(step: u64, loss: f64, lr: f64) -> StepMetrics {
    StepMetrics { step, loss, lr, grad_norm: 0.5, tokens: 0, tokens_per_s: 0.0, mfu: None, step_ms: 1.0, peak_mem_bytes: 0, loss_scale: None, eval_loss: None, extra: Default::default() }
}

fn refusal(r: Result<Accelerator, AccelError>) -> String {
    match r {
        Ok(_) => panic!("the second job must be refused"),
        Err(e) => {
            assert!(e.is_usage(), "a refusal is bad input (exit 2): {e}");
            e.to_string()
        }
    }
}

#[test]
fn a_second_job_on_the_same_directories_is_refused_naming_the_first() {
    let base = tempfile::tempdir().unwrap();
    let (track, ck) = (base.path().join("run"), base.path().join("ck"));
    let mut first = Accelerator::new(&config(&track, &ck), Options::default()).unwrap();
    first.log(&row(1, 2.0, 0.1)).unwrap();
    let before = std::fs::read(track.join("metrics.jsonl")).unwrap();
    let holder = format!("pid {}", std::process::id());

    let msg = refusal(Accelerator::new(&config(&track, &base.path().join("ck2")), Options::default()));
    assert!(msg.contains("track.dir") && msg.contains(&track.display().to_string()) && msg.contains(&holder), "{msg}");
    let msg = refusal(Accelerator::new(&config(&base.path().join("run2"), &ck), Options::default()));
    assert!(msg.contains("checkpoint.dir") && msg.contains(&ck.display().to_string()) && msg.contains(&holder), "{msg}");
    assert!(!base.path().join("run2").exists() && !base.path().join("ck2").exists(), "a refused job leaves nothing");
    assert_eq!(std::fs::read(track.join("metrics.jsonl")).unwrap(), before, "the first job's metrics are untouched");

    // Released when the first job ends: the directories can be used again (here: continued).
    first.finish(&serde_json::json!({})).unwrap();
    let _again = Accelerator::new(&config(&track, &ck), Options::default()).unwrap();
}

#[test]
fn a_start_that_fails_before_its_first_step_leaves_nothing_behind() {
    let base = tempfile::tempdir().unwrap();
    let (track, ck) = (base.path().join("a/run"), base.path().join("ck"));
    // An existing, empty track.dir stays; what the start added goes.
    std::fs::create_dir_all(base.path().join("kept")).unwrap();
    std::fs::write(base.path().join("kept/notes.txt"), b"mine").unwrap();
    for track in [track.clone(), base.path().join("kept")] {
        let acc = Accelerator::new(&config(&track, &ck), Options::default()).unwrap();
        assert!(track.join("metrics.jsonl").is_file() && track.join("config.json").is_file());
        drop(acc); // e.g. `prepare` or the data check failed
        assert!(!ck.exists(), "checkpoint.dir, created by the start, is gone");
        assert!(!track.join("metrics.jsonl").exists() && !track.join("config.json").exists(), "{}", track.display());
    }
    assert!(!base.path().join("a").exists(), "nor the parents the start created");
    let left: Vec<_> = std::fs::read_dir(base.path().join("kept")).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(left, ["notes.txt"]);

    // A start that died before its first step (no cleanup: killed) does not block the next one.
    let acc = Accelerator::new(&config(&track, &ck), Options::default()).unwrap();
    std::mem::forget(acc); // what a kill leaves: the files and a lock file naming this process…
    let dead = r#"{"host":"elsewhere","pid":4000000,"since":1}"#;
    for dir in [&track, &ck] {
        // …whose lock a dead process no longer holds.
        let lock = dir.join(ferrospeed::track::LOCK_FILE);
        std::fs::remove_file(&lock).unwrap();
        std::fs::write(&lock, dead).unwrap();
    }
    let mut acc = Accelerator::new(&config(&track, &ck), Options::default()).unwrap();
    acc.log(&row(1, 1.0, 0.1)).unwrap();
    drop(acc);
    assert_eq!(std::fs::read_to_string(track.join("metrics.jsonl")).unwrap().lines().count(), 1, "a started run keeps its directory");
}

#[test]
fn a_row_rebuilt_from_a_checkpoint_is_the_row_as_written() {
    let base = tempfile::tempdir().unwrap();
    let (track, ck) = (base.path().join("run"), base.path().join("ck"));
    // Values that JSON parsing without full precision reads back one ulp off.
    let rows = [row(1, 10.317529449369799, 0.41976141852037996), row(2, 11.828288335594435, 3.9512434809257844)];
    let mut acc = Accelerator::new(&config(&track, &ck), Options::default()).unwrap();
    let mut engine = acc.prepare(model(), acc.optimizer_from_config(), PrepareOptions::default()).unwrap();
    acc.log(&rows[0]).unwrap();
    let written = std::fs::read_to_string(track.join("metrics.jsonl")).unwrap();
    // Step 2's checkpoint with its row, then the job dies before writing the row.
    let b = Batch::new().with("x", Tensor::ones((2, 4), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap());
    engine.forward_backward(&b).unwrap();
    engine.step().unwrap();
    engine.forward_backward(&b).unwrap();
    engine.step().unwrap();
    acc.record_checkpoint_row(&rows[1]).unwrap();
    acc.save_checkpoint(&mut engine).unwrap();
    drop((engine, acc));

    let mut acc = Accelerator::new(&config(&track, &ck), Options::default()).unwrap();
    let engine = acc.prepare(model(), acc.optimizer_from_config(), PrepareOptions::default()).unwrap();
    assert_eq!(engine.steps_done(), 2);
    let text = std::fs::read_to_string(track.join("metrics.jsonl")).unwrap();
    let want = format!("{written}{}\n", serde_json::to_string(&rows[1]).unwrap());
    assert_eq!(text, want, "the rows, byte for byte");
}
