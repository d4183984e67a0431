//! Bring your own model, part 1: an MLP classifier written with candle-nn layers, trained on a
//! synthetic dataset generated in code, with the program's own training loop — through ferrospeed's
//! `Accelerator`, so the same binary runs on one process, under `ferrospeed launch --nproc-per-node N`,
//! and at any ZeRO stage (`--set zero.stage=3`), with checkpoints and resume.
//!
//! ```sh
//! cargo run --release --example mlp
//! ferrospeed launch --nproc-per-node 2 target/release/examples/mlp --set zero.stage=3
//! ```
//!
//! The whole model is one block (`NnBlock`): that is how a user starts. Splitting it into several
//! blocks is what buys memory at stage 3 (one block's parameters gathered at a time), not a condition.

use anyhow::Result;
use candle_core::{DType, Device, Tensor, D};
use candle_nn::{linear, Linear, Module, VarBuilder};
use ferrospeed::accelerator::{config_from_args, Accelerator, Options, PrepareOptions};
use ferrospeed::data::{DataError, Dataset};
use ferrospeed::engine::{Batch, Model};
use ferrospeed::nn::{Forward, NnBlock};
use ferrospeed::rng::Rng;
use ferrospeed::ReduceOp;
use std::time::Instant;

/// The defaults; `--config FILE` replaces them, `--set key=value` overrides either.
const CONFIG: &str = r#"
[train]
steps = 40
global_batch = 48
micro_batch = 8
lr = 1e-2
warmup = 4
weight_decay = 0.01
seed = 7

[track]
tensorboard = false
"#;

const FEATURES: usize = 16;
const CLASSES: usize = 4;

/// Gaussian blobs: sample `i` belongs to class `i % 4`, its features are the class's centre plus noise,
/// all drawn from the seed and the index (so every rank sees the same dataset).
struct Blobs {
    len: usize,
    offset: usize,
    centres: Vec<Vec<f32>>,
}

impl Blobs {
    fn new(len: usize, offset: usize) -> Self {
        let mut rng = Rng::derive(1, "blobs/centres");
        let centres = (0..CLASSES).map(|_| (0..FEATURES).map(|_| (rng.normal() * 1.5) as f32).collect()).collect();
        Self { len, offset, centres }
    }

    fn sample(&self, index: usize) -> (Vec<f32>, u32) {
        let i = index + self.offset;
        let class = i % CLASSES;
        let mut rng = Rng::derive(1, &format!("blobs/{i}"));
        let x = self.centres[class].iter().map(|c| c + (rng.normal() * 1.2) as f32).collect();
        (x, class as u32)
    }
}

impl Dataset for Blobs {
    fn len(&self) -> usize {
        self.len
    }

    fn get(&self, index: usize) -> Result<Batch, DataError> {
        let (x, label) = self.sample(index);
        let err = |e: candle_core::Error| DataError::Sample { index, reason: e.to_string() };
        Ok(Batch::new()
            .with("features", Tensor::from_vec(x, FEATURES, &Device::Cpu).map_err(err)?)
            .with("labels", Tensor::new(label, &Device::Cpu).map_err(err)?))
    }
}

/// Three linear layers with ReLU between them.
struct Mlp {
    fc1: Linear,
    fc2: Linear,
    out: Linear,
}

impl Mlp {
    fn new(vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self { fc1: linear(FEATURES, 64, vb.pp("fc1"))?, fc2: linear(64, 64, vb.pp("fc2"))?, out: linear(64, CLASSES, vb.pp("out"))? })
    }

    fn logits(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.out.forward(&self.fc2.forward(&self.fc1.forward(x)?.relu()?)?.relu()?)
    }
}

impl Forward for Mlp {
    fn forward(&self, _inputs: &[Tensor], batch: &Batch) -> candle_core::Result<Vec<Tensor>> {
        let logits = self.logits(&batch.get("features")?.to_dtype(self.fc1.weight().dtype())?)?;
        Ok(vec![candle_nn::loss::cross_entropy(&logits.to_dtype(DType::F32)?, batch.get("labels")?)?])
    }
}

fn main() -> Result<()> {
    let cfg = config_from_args(CONFIG)?;
    let mut acc = Accelerator::new(&cfg, Options { run_name: "mlp".into(), track: true })?;
    let block = NnBlock::new("mlp", Mlp::new)?;
    let eval_block = block.clone();
    let optimizer = acc.optimizer_from_config();
    let mut engine = acc.prepare(Model::new(vec![Box::new(block)])?, optimizer, PrepareOptions::default())?;
    if let (Some(r), true) = (acc.resumed(), acc.is_main_process()) {
        println!("resumed from {} at step {}", r.path.display(), r.meta.step);
    }
    let train = Blobs::new(4096, 0);
    let data = acc.data(&train)?;
    let start = engine.steps_done();
    let mut t0 = Instant::now();
    for batch in data.from_step(engine.steps_done()) {
        engine.forward_backward(&batch?)?;
        if let Some(stats) = engine.step()? {
            acc.log_step(&engine, &stats, 0, t0.elapsed().as_secs_f64())?;
            if acc.is_main_process() && (engine.steps_done() % 10 == 0 || engine.steps_done() == 1) {
                println!("step {:>3}  loss {:.4}  lr {:.2e}", engine.steps_done(), stats.loss, stats.lr);
            }
            if acc.checkpoint_due(engine.steps_done()) {
                acc.save_checkpoint(&mut engine)?;
            }
            t0 = Instant::now();
        }
    }
    if acc.config().checkpoint.dir.is_some() && engine.steps_done() > start && !acc.checkpoint_due(engine.steps_done()) {
        acc.save_checkpoint(&mut engine)?;
    }
    // Held-out accuracy: each rank scores its share of the test set, the counts are summed over ranks.
    acc.wait_for_everyone()?;
    let params = engine.slot_tensors()?;
    let mlp = Mlp::new(eval_block.var_builder(&params[0])?)?;
    let test = Blobs::new(600, 1 << 20);
    let mine: Vec<usize> = (acc.rank()..test.len()).step_by(acc.world_size()).collect();
    let batch = test.collate(&mine)?;
    let x = batch.get("features")?.to_device(acc.device())?.to_dtype(params[0][0].dtype())?;
    let predicted = mlp.logits(&x)?.argmax(D::Minus1)?.to_device(&Device::Cpu)?;
    let correct = predicted.eq(batch.get("labels")?)?.to_dtype(DType::F32)?.sum_all()?;
    let correct = acc.reduce(&correct, ReduceOp::Sum)?.to_scalar::<f32>()?;
    let scored = acc.gather(&Tensor::new(&[mine.len() as f32], &Device::Cpu)?)?.to_vec1::<f32>()?;
    if acc.is_main_process() {
        println!("held-out accuracy {:.1}% ({correct} of {}); outputs in {}", 100.0 * correct as f64 / test.len() as f64, test.len(), acc.track_dir().display());
    }
    let summary = serde_json::json!({ "steps": engine.steps_done(), "correct": correct, "scored_per_rank": scored });
    acc.finish(&summary)?;
    Ok(())
}
