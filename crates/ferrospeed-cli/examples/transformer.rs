//! Bring your own model, part 2: a small GPT-style transformer written with candle-nn layers
//! (`Embedding`, `linear`; LayerNorm from `ferrospeed::nn`, since candle-nn's has no backward on
//! contiguous input), split into blocks (embedding, one block per layer, head with
//! its weight tied to the token embedding), trained on the shipped text one byte per token with the
//! program's own loop through the `Accelerator`.
//!
//! ```sh
//! cargo run --release --example transformer
//! ferrospeed launch --nproc-per-node 2 target/release/examples/transformer --set zero.stage=3
//! ferrospeed launch --nproc-per-node 4 target/release/examples/transformer --set parallel.pp=2
//! ```
//!
//! Each block is the unit ZeRO-3 gathers: with several blocks, only one block's parameters (plus the
//! next one's, prefetched) are whole on a rank at a time. It is also the unit of a pipeline's stages:
//! with `parallel.pp = 2` the same code runs half the blocks on each stage (the head's tied weight on
//! both ends), and `Engine::train_step` runs each step's micro-batches through the schedule.

use anyhow::Result;
use candle_core::{DType, Tensor, D};
use candle_nn::{linear, Embedding, Linear, Module, VarBuilder};
use ferrospeed::accelerator::{config_from_args, Accelerator, Options, PrepareOptions};
use ferrospeed::engine::{Batch, Block, Model};
use ferrospeed::nn::{layer_norm, Forward, LayerNorm, NnBlock, Tie};
use ferrospeed_models::{TextCorpus, TextWindows};
use std::time::Instant;

const CONFIG: &str = r#"
[data]
path = "data/rust-book.txt"

[train]
steps = 30
global_batch = 12
micro_batch = 2
lr = 3e-3
warmup = 3
seed = 11

[track]
tensorboard = false
"#;

const VOCAB: usize = 256;
const SEQ: usize = 32;
const D_MODEL: usize = 48;
const HEADS: usize = 4;
const LAYERS: usize = 2;

/// Token and position embeddings.
struct Embed {
    wte: Embedding,
    wpe: Embedding,
}

impl Forward for Embed {
    fn forward(&self, _inputs: &[Tensor], batch: &Batch) -> candle_core::Result<Vec<Tensor>> {
        let tokens = batch.get("tokens")?;
        let t = tokens.dim(1)?;
        let positions = Tensor::arange(0u32, t as u32, tokens.device())?;
        Ok(vec![self.wte.forward(tokens)?.broadcast_add(&self.wpe.forward(&positions)?)?])
    }
}

/// A pre-LayerNorm transformer layer: causal self-attention, then a GELU MLP.
struct Layer {
    ln1: LayerNorm,
    qkv: Linear,
    proj: Linear,
    ln2: LayerNorm,
    fc: Linear,
    out: Linear,
}

impl Layer {
    fn new(vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            ln1: layer_norm(D_MODEL, 1e-5, vb.pp("ln1"))?,
            qkv: linear(D_MODEL, 3 * D_MODEL, vb.pp("qkv"))?,
            proj: linear(D_MODEL, D_MODEL, vb.pp("proj"))?,
            ln2: layer_norm(D_MODEL, 1e-5, vb.pp("ln2"))?,
            fc: linear(D_MODEL, 4 * D_MODEL, vb.pp("fc"))?,
            out: linear(4 * D_MODEL, D_MODEL, vb.pp("out"))?,
        })
    }

    fn attention(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let hd = d / HEADS;
        let qkv = self.qkv.forward(x)?.reshape((b, t, 3, HEADS, hd))?.permute((2, 0, 3, 1, 4))?; // [3, b, h, t, hd]
        let (q, k, v) = (qkv.get(0)?.contiguous()?, qkv.get(1)?.contiguous()?, qkv.get(2)?.contiguous()?);
        let scores = (q.matmul(&k.t()?)? / (hd as f64).sqrt())?;
        let mask: Vec<f32> = (0..t * t).map(|i| if i % t > i / t { f32::NEG_INFINITY } else { 0.0 }).collect();
        let mask = Tensor::from_vec(mask, (t, t), x.device())?.to_dtype(scores.dtype())?;
        let p = candle_nn::ops::softmax(&scores.broadcast_add(&mask)?, D::Minus1)?;
        let y = p.matmul(&v)?.transpose(1, 2)?.reshape((b, t, d))?;
        self.proj.forward(&y)
    }
}

impl Forward for Layer {
    fn forward(&self, inputs: &[Tensor], _batch: &Batch) -> candle_core::Result<Vec<Tensor>> {
        let x = &inputs[0];
        let x = (x + self.attention(&self.ln1.forward(x)?)?)?;
        let h = self.fc.forward(&self.ln2.forward(&x)?)?.gelu()?;
        Ok(vec![(&x + self.out.forward(&h)?)?])
    }
}

/// The final LayerNorm, the output projection (the token embedding, tied) and the loss.
struct Head {
    ln: LayerNorm,
    lm_head: Linear,
}

impl Forward for Head {
    fn forward(&self, inputs: &[Tensor], batch: &Batch) -> candle_core::Result<Vec<Tensor>> {
        let (b, t, d) = inputs[0].dims3()?;
        let logits = self.lm_head.forward(&self.ln.forward(&inputs[0])?.reshape((b * t, d))?)?;
        let targets = batch.get("targets")?.flatten_all()?;
        Ok(vec![candle_nn::loss::cross_entropy(&logits.to_dtype(DType::F32)?, &targets)?])
    }
}

fn blocks() -> Result<Vec<Box<dyn Block>>> {
    // candle-nn's `embedding` starts at N(0, 1); the token table doubles as the output projection
    // here, so it starts small, as GPT-2's does.
    let small = candle_nn::Init::Randn { mean: 0.0, stdev: 0.02 };
    let mut blocks: Vec<Box<dyn Block>> = vec![Box::new(NnBlock::new("embed", move |vb| {
        let wte = vb.pp("wte").get_with_hints((VOCAB, D_MODEL), "weight", small)?;
        let wpe = vb.pp("wpe").get_with_hints((SEQ, D_MODEL), "weight", small)?;
        Ok(Embed { wte: Embedding::new(wte, D_MODEL), wpe: Embedding::new(wpe, D_MODEL) })
    })?)];
    for l in 0..LAYERS {
        blocks.push(Box::new(NnBlock::new(&format!("h.{l}"), Layer::new)?));
    }
    let tie = Tie { name: "lm_head.weight".into(), owner: 0, owner_name: "wte.weight".into() };
    blocks.push(Box::new(NnBlock::with_ties("head", vec![tie], |vb| {
        Ok(Head { ln: layer_norm(D_MODEL, 1e-5, vb.pp("ln_f"))?, lm_head: Linear::new(vb.pp("lm_head").get((VOCAB, D_MODEL), "weight")?, None) })
    })?));
    Ok(blocks)
}

fn main() -> Result<()> {
    let cfg = config_from_args(CONFIG)?;
    let corpus = TextCorpus::load(&cfg.data.path)?;
    corpus.check_window(SEQ)?;
    let mut acc = Accelerator::new(&cfg, Options { run_name: "transformer".into(), track: true })?;
    let model = Model::new(blocks()?)?;
    let params = model.num_params();
    let optimizer = acc.optimizer_from_config();
    let mut engine = acc.prepare(model, optimizer, PrepareOptions::default())?;
    if acc.is_main_process() {
        println!("transformer: {LAYERS} layers × d {D_MODEL}, {params} parameters, {} rank(s), ZeRO stage {}", acc.world_size(), cfg.zero.stage);
        if let Some(r) = acc.resumed() {
            println!("resumed from {} at step {}", r.path.display(), r.meta.step);
        }
    }
    let windows = TextWindows { corpus: &corpus, seq_len: SEQ };
    let data = acc.data(&windows)?;
    let tokens_per_step = (cfg.train.global_batch * SEQ) as u64;
    let start = engine.steps_done();
    // A whole step at a time: its micro-batches (the accumulation window) in one call, which a
    // pipeline runs through its schedule (`forward_backward` + `step` take them one by one at pp = 1).
    for step in start..cfg.train.steps as u64 {
        let t0 = Instant::now();
        let stats = engine.train_step(&data.micro_batches(step)?)?;
        acc.log_step(&engine, &stats, tokens_per_step, t0.elapsed().as_secs_f64())?;
        if acc.is_main_process() && (engine.steps_done() % 10 == 0 || engine.steps_done() == 1) {
            println!("step {:>3}  loss {:.4}  grad norm {:.3}", engine.steps_done(), stats.loss, stats.grad_norm);
        }
        if acc.checkpoint_due(engine.steps_done()) {
            acc.save_checkpoint(&mut engine)?;
        }
    }
    if acc.config().checkpoint.dir.is_some() && engine.steps_done() > start && !acc.checkpoint_due(engine.steps_done()) {
        acc.save_checkpoint(&mut engine)?;
    }
    if acc.is_main_process() {
        println!("done: {} steps; outputs in {}", engine.steps_done(), acc.track_dir().display());
    }
    acc.finish(&serde_json::json!({ "steps": engine.steps_done() }))?;
    Ok(())
}
