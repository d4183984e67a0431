//! `ferrospeed train --config FILE [--set key=value …]`: the built-in trainer for the GPT and Llama families, a
//! program on the library's `Accelerator` like any user's (no private path into the engine).
//!
//! Order matters for "bad input loses nothing": the config and the data are checked before anything
//! is written; the `Accelerator` checks the batch arithmetic, forms the group, and only then has rank 0
//! claim the run directory, telling every rank whether that worked, so all ranks exit together.

use crate::usage::usage_error;
use anyhow::Result;
use candle_core::{Device, Tensor};
use clap::Args;
use ferrospeed::accelerator::{AccelError, Accelerator, Options, PrepareOptions};
use ferrospeed::config::Config;
use ferrospeed::engine::Engine;
use ferrospeed::rng::Rng;
use ferrospeed::track::{peak_rss_bytes, Progress, StepMetrics};
use ferrospeed::{CommExt, ReduceOp};
use ferrospeed::data::Dataset;
use crate::train_data::{self, Samples, TrainData};
use ferrospeed_models::{ByteTokenizer, Family, Gpt, Tokenizer};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
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
    let (family, tokenizer) = Family::for_run(&cfg).map_err(|e| usage_error(e.to_string()))?;
    let ignored = family.check_inputs(cfg.model.init_from.as_deref(), &tokenizer, "model.init_from").map_err(usage_error)?;
    if let (Some(dir), Some(lora)) = (&cfg.model.adapter_from, &cfg.lora) {
        crate::lora_export::check_adapter(dir, &family, lora).map_err(usage_error)?;
    }
    let model = family.model()?;
    // Before anything is allocated or written: does the config fit this machine?
    let world = ferrospeed::WorldInfo::from_env()?;
    if let Some(note) = ignored.filter(|_| world.rank == 0) {
        eprintln!("warning: {note}");
    }
    let device = ferrospeed::device::select(cfg.train.device, world.local_rank).map_err(usage_error)?;
    let estimate = crate::estimate_cmd::check_fits(&cfg, &family, &model, &device, &world)?;
    let oom = |phase: &'static str| move |e| crate::estimate_cmd::out_of_memory(e, phase, &estimate);
    drop(device);
    let (source, eval_source) = train_data::load(&cfg, &tokenizer)?;
    let samples = Samples::of(&source, &cfg)?;
    let eval_samples = eval_source.as_ref().map(|e| Samples::of(e, &cfg)).transpose()?;
    let (train_subset, eval_set) = train_data::split(&cfg, &samples, eval_samples.as_ref())?;
    let dataset: &dyn Dataset = match &train_subset {
        Some(s) => s.as_ref(),
        None => samples.dataset(),
    };
    // Epochs of prepared data need one global batch of samples; say so before anything is written.
    if matches!(source, TrainData::Prepared(_)) && dataset.len() < cfg.train.global_batch {
        return Err(usage_error(format!(
            "data.path = {} gives {} samples ({}), fewer than one global batch of {}: prepare more data, or lower train.global_batch{}",
            cfg.data.path.display(),
            dataset.len(),
            if cfg.data.packing { "packed windows of model.seq_len" } else { "documents" },
            cfg.train.global_batch,
            if cfg.data.packing { " or model.seq_len" } else { "" }
        )));
    }
    let mut acc = Accelerator::new(&cfg, Options { run_name: config_stem(&args.config), track: true }).map_err(accel_error)?;
    let (rank, world_size, device) = (acc.rank(), acc.world_size(), acc.device().clone());
    // What `checkpoint export` needs to write a transformers directory later: the source's own
    // config.json (every key), or the shape of a model from a GGUF file or from scratch.
    let mut hf_config = family.export_config(cfg.model.init_from.as_deref(), "float32").map_err(|e| usage_error(e.to_string()))?;
    // The special tokens' ids where the config names none, so that transformers' generate stops where ours does.
    let specials = tokenizer.specials();
    let unset = |c: &serde_json::Value, k: &str| c.get(k).is_none_or(serde_json::Value::is_null);
    if let Some((_, id)) = specials.eos.filter(|_| unset(&hf_config, "eos_token_id")) {
        hf_config["eos_token_id"] = id.into();
    }
    if let Some(id) = specials.bos.as_deref().and_then(|b| tokenizer.token_id(b)).filter(|_| unset(&hf_config, "bos_token_id")) {
        hf_config["bos_token_id"] = id.into();
    }
    acc.record("hf_config", hf_config);
    if let Some(lora) = crate::lora_export::record(&family, &cfg) {
        acc.record(crate::lora_export::LORA_KEY, lora);
    }
    if let Some(path) = tokenizer_files(&acc, &tokenizer)? {
        acc.record("tokenizer", path.canonicalize().unwrap_or_else(|_| path.to_path_buf()).display().to_string().into());
    }
    if let TrainData::Prepared(d) = &source {
        acc.record("data", serde_json::json!({"path": d.dir().display().to_string(), "hash": d.index.hash, "packing": cfg.data.packing, "documents": d.index.documents}));
    }
    if let Some(dir) = cfg.model.init_from.as_deref().filter(|p| p.is_dir()) {
        acc.record("init_from_dir", dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf()).display().to_string().into());
        // Experts stored one by one (a Hub checkpoint): `checkpoint export` writes them so again.
        if let Some(layout) = ferrospeed_models::llama::open_weights(dir).ok().and_then(|f| ferrospeed_models::llama::ExpertLayout::of(&f)) {
            acc.record("expert_layout", layout.name().into());
        }
    }

    let optimizer = acc.optimizer_from_config();
    let num_params = model.num_params();
    // With adapters, model.init_from is their base: it fills the frozen parameters alone.
    let init_from = if family.lora().is_some() { ferrospeed::checkpoint::ImportScope::Frozen } else { ferrospeed::checkpoint::ImportScope::All };
    let mut engine = acc.prepare(model, optimizer, PrepareOptions { names: family.names(), init_from, ..PrepareOptions::default() }).map_err(accel_error)?;
    if let Some(r) = acc.import_report() {
        // Every rank: what each read and held (the launcher prefixes the rank).
        let mb = |b: u64| b as f64 / 1e6;
        println!(
            "import: {:.1} MB read in {:.1} s; host memory +{} during the import; largest block state {:.1} MB",
            mb(r.stats.bytes_read),
            r.seconds,
            r.host_growth_bytes.map_or_else(|| "unknown".into(), |g| format!("{:.1} MB", mb(g))),
            mb(r.stats.largest_block_bytes as u64)
        );
    }
    // The data position is the step: resuming on other data would silently change what is trained on.
    if let (Some(r), TrainData::Prepared(d)) = (acc.resumed(), &source) {
        let saved = r.meta.run.get("data").and_then(|v| v.get("hash")).and_then(|h| h.as_str());
        if saved.is_some_and(|h| h != d.index.hash) {
            return Err(usage_error(format!(
                "{} was saved while training on other data than data.path = {} (content hash {} there, {} now): point data.path at the data it was trained on, or start a new checkpoint.dir",
                r.path.display(),
                d.dir().display(),
                &saved.unwrap_or_default()[..12.min(saved.unwrap_or_default().len())],
                &d.index.hash[..12]
            )));
        }
    }
    // The held-out data decides what is trained on (data.eval_split of prepared data) and what early
    // stopping compares: a checkpoint continues only with the same.
    let eval_data = serde_json::json!({"path": cfg.data.eval_path.as_ref().map(|p| p.display().to_string()), "split": cfg.data.eval_split, "seed": cfg.train.seed});
    if let Some(saved) = acc.resumed().and_then(|r| r.meta.run.get("eval_data").cloned()).filter(|s| *s != eval_data) {
        return Err(usage_error(format!(
            "{} was saved with other held-out data ({saved}) than this run's ({eval_data}): use the same data.eval_path, data.eval_split and train.seed, or start a new checkpoint.dir",
            acc.resumed().map(|r| r.path.display().to_string()).unwrap_or_default()
        )));
    }
    acc.record("eval_data", eval_data);
    if let (Some(plan), true) = (acc.parallel_plan(), acc.is_main_process()) {
        println!("{plan}");
    }
    if let (Some(r), true) = (acc.resumed(), acc.is_main_process()) {
        println!(
            "resumed from {} at step {} (saved by {} rank(s) at ZeRO stage {})",
            r.path.display(),
            r.meta.step,
            r.meta.world_size,
            r.meta.zero_stage
        );
    }
    if let (None, Some(dir), true, true) = (acc.resumed(), &cfg.checkpoint.dir, cfg.checkpoint.resume, acc.is_main_process()) {
        println!("no checkpoint in {} yet: starting at step 0", dir.display());
    }
    let start_step = engine.steps_done() as usize;
    // What early stopping knew at the checkpoint: the best held-out loss, the evaluations since, and
    // whether the run had stopped there.
    let saved_run = |key: &str| acc.resumed().and_then(|r| r.meta.run.get(key).cloned());
    let mut best_eval = saved_run("eval_best").and_then(|v| v.as_f64());
    let mut bad_evals = saved_run("eval_bad").and_then(|v| v.as_u64()).unwrap_or(0) as usize;
    let early_stop_step = saved_run("early_stopped_at").and_then(|v| v.as_u64());
    // Carried into every later checkpoint, also those saved before this attempt's first evaluation.
    acc.record("eval_best", best_eval.into());
    acc.record("eval_bad", bad_evals.into());
    // The run ends where it stopped early, unless the config no longer stops it there.
    let patience = cfg.train.early_stopping_patience;
    let stopped_early = early_stop_step.filter(|&s| s == start_step as u64 && patience > 0 && bad_evals >= patience);
    if let Some(s) = stopped_early {
        acc.record("early_stopped_at", s.into());
    }
    let end = stopped_early.map_or(cfg.train.steps, |s| s as usize);
    if start_step >= end && cfg.train.steps > 0 {
        // A run that died after its last checkpoint and before its ending (summary, sample, plot)
        // gets its ending now; a finished one has nothing left to do.
        let unfinished = any_rank(&engine, acc.tracker().is_some_and(|t| !t.finished()))?;
        if acc.is_main_process() {
            let why = match stopped_early {
                Some(s) => format!("the run stopped early at step {s} (train.early_stopping_patience = {patience})"),
                None => format!("already at step {start_step} of {}", cfg.train.steps),
            };
            match unfinished {
                true => println!("{why}: finishing the run's outputs (summary, plot)"),
                false if stopped_early.is_some() => println!("{why}: nothing to train (raise train.early_stopping_patience, or set it to 0, to train on)"),
                false => println!("{why}: nothing to train (raise train.steps to train longer)"),
            }
        }
        if !unfinished {
            return Ok(ExitCode::SUCCESS);
        }
    }
    let interrupted = watch_interrupts()?;
    let data = acc.data(dataset).map_err(accel_error)?;
    let eval = eval_set.as_ref().map(|e| acc.eval_data(e.as_ref(), cfg.train.eval_batches)).transpose().map_err(accel_error)?;
    let t = &cfg.train;
    let tokens_per_step = (t.global_batch * cfg.model.seq_len) as u64;
    if rank == 0 {
        println!(
            "ferrospeed train: {} ({:.2}M parameters) on {} rank(s){}, ZeRO stage {}, {}; global batch {} = micro-batch {} × {} {}rank(s) × {} accumulation; {} steps; outputs in {}",
            family.describe(),
            num_params as f64 / 1e6,
            world_size,
            match cfg.parallel.pp {
                1 => String::new(),
                pp => format!(" (a pipeline of {pp} stages × {} data-parallel)", acc.data_parallel_size()),
            },
            cfg.zero.stage.as_int(),
            t.precision,
            t.global_batch,
            t.micro_batch,
            acc.data_parallel_size(),
            if cfg.parallel.pp > 1 { "data-parallel " } else { "" },
            acc.accumulation(),
            t.steps,
            acc.track_dir().display()
        );
    }

    if let (Some(e), 0) = (&eval, rank) {
        let samples = e.steps() as usize * t.global_batch;
        let when = if t.eval_every > 0 { format!("every {} steps and after the last", t.eval_every) } else { "after the last step".into() };
        println!("evaluating on {} global batch(es) of held-out data ({samples} samples) {when}", e.steps());
    }

    let mut progress = (rank == 0).then(|| Progress::new(t.steps as u64, std::io::stdout().is_terminal(), 1));
    let started = Instant::now();
    let mut first_loss = None;
    let mut last_loss = f64::NAN;
    let mut last_saved = (start_step > 0).then_some(start_step);
    let mut stopped_at = None;
    let mut ended_at = end;
    let mut last_row = None;
    for step in start_step..end {
        let t0 = Instant::now();
        let batches = data.micro_batches(step as u64).map_err(|e| accel_error(e.into()))?;
        let stats = engine.train_step(&batches).map_err(oom("training step"))?;
        if !stats.skipped && !stats.loss.is_finite() {
            anyhow::bail!("the loss became {} at step {}; lower train.lr or raise train.warmup", stats.loss, step + 1);
        }
        let secs = t0.elapsed().as_secs_f64();
        // The held-out loss every train.eval_every steps and after the last (not timed with the step).
        let due = (t.eval_every > 0 && (step + 1) % t.eval_every == 0) || step + 1 == t.steps;
        let eval_loss = match eval.as_ref().filter(|_| due) {
            Some(eval) => Some(eval_loss(&mut engine, eval).map_err(oom("evaluation"))?),
            None => None,
        };
        first_loss.get_or_insert(stats.loss);
        last_loss = stats.loss;
        let m = StepMetrics {
            step: step as u64 + 1,
            loss: stats.loss,
            lr: stats.lr,
            grad_norm: stats.grad_norm,
            tokens: tokens_per_step * (step as u64 + 1),
            tokens_per_s: tokens_per_step as f64 / secs,
            mfu: None,
            step_ms: secs * 1e3,
            peak_mem_bytes: peak_rss_bytes(),
            loss_scale: stats.loss_scale,
            eval_loss,
            extra: {
                let mut extra = step_extras(&engine, step, stats.skipped, &device);
                // The model's statistics (`Block::metrics`), e.g. an MoE router's load.
                extra.extend(stats.metrics.iter().map(|(k, v)| (k.clone(), (*v).into())));
                extra
            },
        };
        // Ranks agree on stopping, so that all of them save (a collective) at the same step.
        let stop = any_rank(&engine, interrupted.load(Ordering::SeqCst))?;
        let done = step + 1;
        // Early stopping: the held-out loss (the same bits on every rank) has not improved for
        // train.early_stopping_patience evaluations in a row.
        // Only the evaluations every train.eval_every steps count (not the extra one after the last
        // step, which a longer run would not make); a loss that is not finite never counts as better.
        let counted = eval_loss.filter(|_| t.eval_every > 0 && done % t.eval_every == 0);
        if let Some(e) = counted {
            if e.is_finite() && best_eval.is_none_or(|b| e < b) {
                (best_eval, bad_evals) = (Some(e), 0);
            } else {
                bad_evals += 1;
            }
            acc.record("eval_best", best_eval.into());
            acc.record("eval_bad", bad_evals.into());
        }
        let early = counted.is_some() && patience > 0 && bad_evals >= patience && done < t.steps;
        if early {
            acc.record("early_stopped_at", done.into());
        }
        if acc.checkpoint_due(done as u64) || (early && cfg.checkpoint.dir.is_some()) || (stop && cfg.checkpoint.save_on_interrupt && cfg.checkpoint.dir.is_some()) {
            // The checkpoint carries its step's row: a run that dies after the save and before the
            // row is written gets it back when it continues.
            acc.record_checkpoint_row(&m)?;
            save_checkpoint(&acc, &mut engine)?;
            last_saved = Some(done);
        }
        // The row after the save: a checkpoint step's row means its checkpoint exists, so a run that
        // dies never has to train again more than checkpoint.every − 1 logged steps.
        acc.log(&m)?;
        if let Some(progress) = progress.as_mut() {
            progress.update(&m);
        }
        last_row = Some(m);
        if stop {
            stopped_at = Some(done);
            break;
        }
        if early {
            if rank == 0 {
                println!("stopping early after step {done}: the held-out loss has not improved on {:.4} for {bad_evals} evaluations (train.early_stopping_patience)", best_eval.unwrap_or(f64::NAN));
            }
            ended_at = done;
            break;
        }
    }
    let ckpt_dir = cfg.checkpoint.dir.clone();
    if let Some(step) = stopped_at {
        if rank == 0 {
            match (&ckpt_dir, last_saved == Some(step)) {
                (Some(dir), true) => eprintln!("interrupted after step {step}: checkpoint saved in {}; run the same command to resume", dir.display()),
                _ => eprintln!("interrupted after step {step}; no checkpoint saved (set checkpoint.dir to keep progress)"),
            }
        }
        acc.interrupted();
        return Ok(ExitCode::from(130));
    }
    // train.steps = 0 converts: the imported (or initial) weights become a checkpoint to export.
    if ckpt_dir.is_some() && last_saved != Some(ended_at) && (start_step < t.steps || t.steps == 0 && start_step == 0) {
        // The last step's row, held-out loss included (what checkpoint.keep_best ranks by).
        if let Some(m) = &last_row {
            acc.record_checkpoint_row(m)?;
        }
        save_checkpoint(&acc, &mut engine)?;
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
    // Sampling is GPT's with the bytes tokenizer (generation for every family comes with `generate`).
    let gpt = match (&family, &tokenizer) {
        (Family::Gpt(g), Tokenizer::Bytes) => Some(g),
        _ => None,
    };
    // A pipeline stage holds part of the model: no sample there (generate one from an export).
    let sample_params = if t.sample_tokens > 0 && gpt.is_some() && !engine.is_pipeline() { Some(engine.slot_tensors()?) } else { None };
    if let Some(progress) = progress {
        // The run as a picture; failing to draw it costs a warning, never the run.
        let plot = match acc.tracker().map(|t| t.plot()) {
            Some(Ok(path)) => Some(path),
            Some(Err(e)) => {
                eprintln!("warning: no plot of this run: {e}");
                None
            }
            None => None,
        };
        let mut first = first_loss.unwrap_or(f64::NAN);
        let mut tok_s = (tokens_per_step * (ended_at - start_step.min(ended_at)) as u64) as f64 / elapsed;
        let mut elapsed = elapsed;
        if first_loss.is_none() {
            // Nothing trained in this attempt (it only finishes the run): the run's own rows say
            // what it did.
            if let Ok(run) = ferrospeed::track::RunSeries::read(acc.track_dir()) {
                first = run.rows.first().map_or(f64::NAN, |r| r.loss);
                last_loss = run.rows.last().map_or(f64::NAN, |r| r.loss);
                elapsed = run.rows.iter().map(|r| r.step_ms).sum::<f64>() / 1e3;
                tok_s = (tokens_per_step * run.rows.len() as u64) as f64 / elapsed;
            }
        }
        let sample = match (&sample_params, gpt) {
            (Some(params), Some(gpt)) => sample_text(gpt, params, t.sample_tokens, t.seed)?,
            _ => String::new(),
        };
        let peak_text: Vec<String> = peaks.iter().map(|mb| format!("{mb:.0}")).collect();
        progress.finish(&format!(
            "done: {} steps in {elapsed:.1} s, loss {first:.4} → {last_loss:.4}, {tok_s:.0} tokens/s, peak memory per rank {} MB; outputs in {}{}",
            ended_at,
            peak_text.join("/"),
            acc.track_dir().display(),
            plot.as_ref().map_or_else(String::new, |p| format!(", plot {}", p.display()))
        ));
        if !sample.is_empty() {
            println!("sample:\n{sample}");
        }
        let disk = engine.disk_traffic();
        if let Some(d) = disk {
            println!(
                "NVMe (rank 0): read {:.2} GB at {:.2} GB/s, wrote {:.2} GB at {:.2} GB/s{}",
                d.read_bytes as f64 / 1e9,
                d.read_gbps(),
                d.write_bytes as f64 / 1e9,
                d.write_gbps(),
                if d.direct { "" } else { " (buffered: the file system refuses O_DIRECT)" }
            );
        }
        let memory = engine.memory();
        acc.finish(&serde_json::json!({
            "steps": ended_at,
            "stopped_early": ended_at < t.steps,
            "best_eval_loss": best_eval,
            "world_size": world_size,
            "seconds": elapsed,
            "first_loss": first,
            "final_loss": last_loss,
            "tokens_per_s": tok_s,
            "sample": sample,
            "memory": memory,
            "peak_rss_bytes": peak_bytes,
            "plot": plot.map(|p| p.display().to_string()),
            "nvme": disk.map(|d| serde_json::json!({
                "read_bytes": d.read_bytes, "read_gbps": d.read_gbps(), "write_bytes": d.write_bytes, "write_gbps": d.write_gbps(), "direct": d.direct,
            })),
        }))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// The held-out loss: the mean over every counted target of the evaluation loader's batches (each
/// batch's loss weighted by its counted targets; batches of equal weight where every target counts).
/// Every rank takes part.
fn eval_loss<D: Dataset + ?Sized>(engine: &mut Engine, eval: &ferrospeed::data::DataLoader<'_, D>) -> Result<f64, ferrospeed::engine::EngineError> {
    let (mut sum, mut weight) = (0.0, 0.0);
    for j in 0..eval.steps() {
        let w = eval.counted_targets(j).unwrap_or(1.0);
        if w == 0.0 {
            continue;
        }
        let batches = eval.micro_batches(j).map_err(|e| ferrospeed::engine::EngineError::Unsupported(e.to_string()))?;
        sum += w * engine.eval_loss(&batches)?;
        weight += w;
    }
    Ok(if weight > 0.0 { sum / weight } else { f64::NAN })
}

/// An `Accelerator` error: bad input exits with 2 (nothing started), the rest as failures.
pub fn accel_error(e: AccelError) -> anyhow::Error {
    if e.is_usage() {
        usage_error(e.to_string())
    } else {
        e.into()
    }
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

fn save_checkpoint(acc: &Accelerator, engine: &mut Engine) -> Result<()> {
    let t0 = Instant::now();
    let saved = match acc.save_checkpoint(engine) {
        Ok(saved) => saved,
        // Training on would only lose more: the disk needs the user (exit 2, not restarted).
        Err(e @ AccelError::Checkpoint(ferrospeed::checkpoint::CheckpointError::DiskFull { .. })) => return Err(usage_error(e.to_string())),
        Err(e) => return Err(anyhow::Error::from(e).context("saving a checkpoint")),
    };
    if acc.is_main_process() {
        tracing::info!("saved {} in {:.2} s", saved.display(), t0.elapsed().as_secs_f64());
    }
    Ok(())
}

/// Where `checkpoint export` finds the tokenizer files: the tokenizer.json, or for one built from a GGUF
/// file, a tokenizer.json and tokenizer_config.json (special tokens, chat template) written into the run
/// directory by rank 0.
fn tokenizer_files(acc: &Accelerator, tokenizer: &Tokenizer) -> Result<Option<PathBuf>> {
    let Tokenizer::Hf(t) = tokenizer else { return Ok(None) };
    if t.path.extension().is_none_or(|e| e != "gguf") {
        return Ok(Some(t.path.clone()));
    }
    let dir = acc.track_dir().join("tokenizer");
    let path = dir.join("tokenizer.json");
    if acc.is_main_process() {
        std::fs::create_dir_all(&dir)?;
        t.tokenizer.save(&path, false).map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
        let s = &t.specials;
        let config = serde_json::json!({
            "eos_token": s.eos.as_ref().map(|e| e.0.clone()),
            "bos_token": s.bos,
            "chat_template": s.chat_template,
            "tokenizer_class": "PreTrainedTokenizerFast",
        });
        std::fs::write(dir.join("tokenizer_config.json"), serde_json::to_string_pretty(&config)?)?;
    }
    Ok(Some(path))
}

fn config_stem(path: &Path) -> String {
    path.file_stem().map_or_else(|| "run".into(), |s| s.to_string_lossy().into_owned())
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
