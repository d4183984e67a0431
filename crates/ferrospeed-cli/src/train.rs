//! `ferrospeed train --config FILE [--set key=value …]`: the built-in trainer for the GPT family.
//!
//! Order matters for "bad input loses nothing": the config, the batch arithmetic and the data are
//! checked before anything is written; the run directory is created by rank 0 only after the group
//! formed, and every rank learns whether that worked, so all ranks exit together.

use crate::usage::usage_error;
use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use clap::Args;
use ferrospeed::checkpoint::{self, SaveRequest};
use ferrospeed::comm::TcpCommunicator;
use ferrospeed::config::{Config, Offload, Precision, ReduceDtype};
use ferrospeed::engine::{Batch, Engine, EngineConfig};
use ferrospeed::optim::{AdamW, LrSchedule};
use ferrospeed::precision::LossScalerConfig;
use ferrospeed::shard::Strategy;
use ferrospeed::rng::Rng;
use ferrospeed::track::{fresh_run_dir, Progress, StepMetrics, Tracker};
use ferrospeed::{CommConfig, CommExt, Communicator, ReduceOp, WorldInfo};
use ferrospeed_models::data::MicroBatch;
use ferrospeed_models::gpt::hf_name;
use ferrospeed_models::{BatchSampler, ByteTokenizer, Gpt, GptConfig, TextCorpus};
use std::sync::atomic::{AtomicBool, Ordering};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// The run's TOML configuration (see examples/)
    #[arg(long)]
    pub config: PathBuf,
    /// Override a configuration key, e.g. --set train.steps=50 (repeatable)
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
}

pub fn run(args: TrainArgs) -> Result<ExitCode> {
    let cfg = Config::load(&args.config, &args.overrides).map_err(|e| usage_error(e.to_string()))?;
    reject_unimplemented(&cfg)?;
    let world = WorldInfo::from_env().map_err(|e| usage_error(e.to_string()))?;
    let accumulation = cfg.accumulation_steps(world.world_size).map_err(|e| usage_error(e.to_string()))?;
    let corpus = TextCorpus::load(&cfg.data.path).map_err(|e| usage_error(e.to_string()))?;
    corpus.check_window(cfg.model.seq_len).map_err(|e| usage_error(e.to_string()))?;
    let track_dir = match &cfg.track.dir {
        Some(d) => d.clone(),
        None => fresh_run_dir(Path::new("runs"), &config_stem(&args.config)),
    };

    let device = ferrospeed::device::select(cfg.train.device, world.local_rank).map_err(usage_error)?;
    let comm = Arc::new(TcpCommunicator::connect(&world, &CommConfig::from_env()?).context("forming the process group")?);
    let (rank, world_size) = (comm.rank(), comm.world_size());
    // Rank 0 creates the run directory; a refusal (an earlier run is there) ends every rank the same way.
    let mut tracker = None;
    let mut refusal = None;
    if rank == 0 {
        let config_json = serde_json::to_value(&cfg).context("serialising the config")?;
        match Tracker::create(&track_dir, cfg.track.tensorboard, &config_json) {
            Ok(t) => tracker = Some(t),
            Err(e) => refusal = Some(e.to_string()),
        }
    }
    let mut refused = [if refusal.is_some() { 1f32 } else { 0.0 }];
    comm.all_reduce_slice(&mut refused, ReduceOp::Max)?;
    if refused[0] > 0.0 {
        return Err(usage_error(refusal.unwrap_or_else(|| "rank 0 could not create the run directory".into())));
    }

    let gpt = Gpt::new(GptConfig {
        n_layer: cfg.model.n_layer,
        n_head: cfg.model.n_head,
        d_model: cfg.model.d_model,
        seq_len: cfg.model.seq_len,
        vocab_size: ByteTokenizer::VOCAB_SIZE,
    });
    let t = &cfg.train;
    let engine_cfg = EngineConfig {
        checkpointing: t.activation_checkpointing,
        grad_clip: t.grad_clip,
        optimizer: Arc::new(AdamW { beta1: t.beta1, beta2: t.beta2, eps: t.eps, weight_decay: t.weight_decay }),
        param_groups: Default::default(),
        seed: t.seed,
        strategy: Strategy::new(cfg.zero.stage),
        precision: t.precision,
        reduce_dtype: match t.grad_reduce_dtype {
            ReduceDtype::Fp32 => candle_core::DType::F32,
            ReduceDtype::Compute => t.precision.compute_dtype(),
        },
        loss_scaler: (t.precision == Precision::Fp16).then_some(LossScalerConfig {
            initial: t.loss_scale_initial,
            growth_interval: t.loss_scale_growth_interval as u64,
            backoff: t.loss_scale_backoff,
            min: t.loss_scale_min,
        }),
        device: device.clone(),
    };
    let mut engine = Engine::new(gpt.model()?, comm.clone(), engine_cfg)?;
    if let Some(path) = &cfg.model.init_from {
        checkpoint::load_consolidated(&mut engine, path, &hf_name)
            .map_err(|e| usage_error(format!("model.init_from: {e}")))?;
    }
    let ckpt_dir = cfg.checkpoint.dir.clone();
    if let (Some(dir), true) = (&ckpt_dir, cfg.checkpoint.resume) {
        if let Some(found) = checkpoint::latest(dir)? {
            let meta = checkpoint::load_into(&mut engine, &found).with_context(|| format!("resuming from {}", found.display()))?;
            if rank == 0 {
                println!(
                    "resumed from {} at step {} (saved by {} rank(s) at ZeRO stage {})",
                    found.display(),
                    meta.step,
                    meta.world_size,
                    meta.zero_stage
                );
            }
        }
    }
    let start_step = engine.steps_done() as usize;
    let interrupted = watch_interrupts()?;
    let run_json = serde_json::to_value(&cfg).context("serialising the config")?;
    let sampler = BatchSampler {
        seed: t.seed,
        seq_len: cfg.model.seq_len,
        micro_batch: t.micro_batch,
        accumulation,
        world_size,
        rank,
    };
    let schedule = LrSchedule { lr: t.lr, min_lr: t.min_lr, warmup: t.warmup, total: t.steps };
    let tokens_per_step = (t.global_batch * cfg.model.seq_len) as u64;
    if rank == 0 {
        println!(
            "ferrospeed train: GPT {} layers × d {} ({:.2}M parameters) on {} rank(s), ZeRO stage {}, {}; global batch {} = micro-batch {} × {} rank(s) × {} accumulation; {} steps; outputs in {}",
            cfg.model.n_layer,
            cfg.model.d_model,
            engine.model().num_params() as f64 / 1e6,
            world_size,
            cfg.zero.stage.as_int(),
            t.precision,
            t.global_batch,
            t.micro_batch,
            world_size,
            accumulation,
            t.steps,
            track_dir.display()
        );
    }

    let mut progress = (rank == 0).then(|| Progress::new(t.steps as u64, std::io::stdout().is_terminal(), 1));
    let started = Instant::now();
    let mut first_loss = None;
    let mut last_loss = f64::NAN;
    let mut last_saved = (start_step > 0).then_some(start_step);
    let mut stopped_at = None;
    for step in start_step..t.steps {
        let t0 = Instant::now();
        let batches = to_batches(sampler.micro_batches(&corpus, step as u64), t.micro_batch, cfg.model.seq_len, &device)?;
        let lr = schedule.at(step);
        let stats = engine.train_step(&batches, lr)?;
        if !stats.skipped && !stats.loss.is_finite() {
            anyhow::bail!("the loss became {} at step {}; lower train.lr or raise train.warmup", stats.loss, step + 1);
        }
        let secs = t0.elapsed().as_secs_f64();
        first_loss.get_or_insert(stats.loss);
        last_loss = stats.loss;
        if let (Some(tracker), Some(progress)) = (tracker.as_mut(), progress.as_mut()) {
            let m = StepMetrics {
                step: step as u64 + 1,
                loss: stats.loss,
                lr,
                grad_norm: stats.grad_norm,
                tokens: tokens_per_step * (step as u64 + 1),
                tokens_per_s: tokens_per_step as f64 / secs,
                mfu: None,
                step_ms: secs * 1e3,
                peak_mem_bytes: peak_rss_bytes(),
                loss_scale: stats.loss_scale,
                extra: step_extras(&engine, step, stats.skipped, &device),
            };
            tracker.log(&m)?;
            progress.update(&m);
        }
        // Ranks agree on stopping, so that all of them save (a collective) at the same step.
        let stop = any_rank(&engine, interrupted.load(Ordering::SeqCst))?;
        let done = step + 1;
        let periodic = cfg.checkpoint.every > 0 && done % cfg.checkpoint.every == 0;
        if let Some(dir) = &ckpt_dir {
            if periodic || (stop && cfg.checkpoint.save_on_interrupt) {
                save_checkpoint(&mut engine, dir, &cfg, &run_json, rank)?;
                last_saved = Some(done);
            }
        }
        if stop {
            stopped_at = Some(done);
            break;
        }
    }
    if let Some(step) = stopped_at {
        if rank == 0 {
            match (&ckpt_dir, last_saved == Some(step)) {
                (Some(dir), true) => eprintln!("interrupted after step {step}: checkpoint saved in {}; run the same command to resume", dir.display()),
                _ => eprintln!("interrupted after step {step}; no checkpoint saved (set checkpoint.dir to keep progress)"),
            }
        }
        return Ok(ExitCode::from(130));
    }
    if let Some(dir) = &ckpt_dir {
        if last_saved != Some(t.steps) && start_step < t.steps {
            save_checkpoint(&mut engine, dir, &cfg, &run_json, rank)?;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    // Every rank's peak resident memory, for the summary (MB as f32 is exact enough).
    let my_peak = (peak_rss_bytes() / (1 << 20)) as f32;
    let peaks = engine.comm().run(move |c| {
        let mut all = vec![0f32; c.world_size()];
        c.all_gather_slice(&[my_peak], &mut all).map(|()| all)
    })??;
    let peak_bytes: Vec<u64> = peaks.iter().map(|mb| (*mb as u64) << 20).collect();

    // With sharded parameters, gathering them for the sample is a collective: every rank takes part.
    let sample_params = if t.sample_tokens > 0 { Some(engine.slot_tensors()?) } else { None };
    if let (Some(tracker), Some(progress)) = (tracker, progress) {
        let first = first_loss.unwrap_or(f64::NAN);
        let tok_s = (tokens_per_step * (t.steps - start_step.min(t.steps)) as u64) as f64 / elapsed;
        let sample = match &sample_params {
            Some(params) => sample_text(&gpt, params, t.sample_tokens, t.seed)?,
            None => String::new(),
        };
        let peak_text: Vec<String> = peaks.iter().map(|mb| format!("{mb:.0}")).collect();
        progress.finish(&format!(
            "done: {} steps in {elapsed:.1} s, loss {first:.4} → {last_loss:.4}, {tok_s:.0} tokens/s, peak memory per rank {} MB; outputs in {}",
            t.steps,
            peak_text.join("/"),
            tracker.dir().display()
        ));
        if !sample.is_empty() {
            println!("sample:\n{sample}");
        }
        tracker.finish(&serde_json::json!({
            "steps": t.steps,
            "world_size": world_size,
            "seconds": elapsed,
            "first_loss": first,
            "final_loss": last_loss,
            "tokens_per_s": tok_s,
            "sample": sample,
            "memory": engine.memory(),
            "peak_rss_bytes": peak_bytes,
        }))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// SIGINT/SIGTERM set a flag checked at step boundaries; a second signal exits at once (code 130).
fn watch_interrupts() -> Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(sig, 130, flag.clone())?;
        signal_hook::flag::register(sig, flag.clone())?;
    }
    Ok(flag)
}

/// Whether any rank has `local` set (one tiny all-reduce).
fn any_rank(engine: &Engine, local: bool) -> Result<bool> {
    Ok(engine.comm().run(move |c| {
        let mut flag = [if local { 1f32 } else { 0.0 }];
        c.all_reduce_slice(&mut flag, ReduceOp::Max).map(|()| flag[0] > 0.0)
    })??)
}

fn save_checkpoint(engine: &mut Engine, dir: &Path, cfg: &Config, run: &serde_json::Value, rank: usize) -> Result<()> {
    let t0 = Instant::now();
    let req = SaveRequest {
        root: dir,
        samples: engine.steps_done() * cfg.train.global_batch as u64,
        keep: cfg.checkpoint.keep,
        run: run.clone(),
    };
    let saved = checkpoint::save(engine, &req).with_context(|| format!("saving a checkpoint in {}", dir.display()))?;
    if rank == 0 {
        tracing::info!("saved {} in {:.2} s", saved.display(), t0.elapsed().as_secs_f64());
    }
    Ok(())
}

/// Features the config accepts but this build cannot run yet: say so instead of ignoring them.
fn reject_unimplemented(cfg: &Config) -> Result<()> {
    let refuse = |what: String| Err(usage_error(what));
    if cfg.zero.offload_optimizer != Offload::None || cfg.zero.offload_params != Offload::None {
        return refuse("zero.offload_optimizer / zero.offload_params are not available yet: use \"none\"".into());
    }
    Ok(())
}

fn config_stem(path: &Path) -> String {
    path.file_stem().map_or_else(|| "run".into(), |s| s.to_string_lossy().into_owned())
}

fn to_batches(micro_batches: Vec<MicroBatch>, micro: usize, seq_len: usize, device: &Device) -> Result<Vec<Batch>> {
    micro_batches
        .into_iter()
        .map(|mb| {
            Ok(Batch::tokens(Tensor::from_vec(mb.tokens, (micro, seq_len), device)?, Tensor::from_vec(mb.targets, (micro, seq_len), device)?))
        })
        .collect()
}



/// Per-step extras in metrics.jsonl: skipped fp16 steps, and the memory accounting at step 1.
fn step_extras(engine: &Engine, step: usize, skipped: bool, device: &Device) -> std::collections::BTreeMap<String, serde_json::Value> {
    let mut extra = std::collections::BTreeMap::new();
    if let Some(peak) = ferrospeed::device::peak_device_bytes(device) {
        extra.insert("peak_gpu_mem_bytes".into(), peak.into());
    }
    if skipped {
        extra.insert("skipped".into(), serde_json::Value::Bool(true));
    }
    if step == 0 {
        if let Ok(serde_json::Value::Object(mem)) = serde_json::to_value(engine.memory()) {
            for (k, v) in mem {
                extra.insert(format!("mem_{k}_bytes"), v);
            }
        }
    }
    extra
}

fn sample_text(gpt: &Gpt, params: &[Vec<Tensor>], n: usize, seed: u64) -> Result<String> {
    let tok = ByteTokenizer;
    let prompt = tok.encode("The ");
    let mut rng = Rng::derive(seed, "sample");
    let out = gpt.generate(params, &prompt, n, 0.8, &mut rng)?;
    Ok(format!("The {}", tok.decode(&out)))
}

/// Peak resident memory of this process (Linux `VmHWM`), 0 where unknown.
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok()))
        .map_or(0, |kb| kb * 1024)
}
