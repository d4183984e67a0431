//! `ferrospeed bench-train`: training throughput on a synthetic GPT-2- or Llama-shaped model with random
//! tokens, the shape and batch of the PyTorch/DeepSpeed/FSDP2 anchors (`anchor_torch.py`,
//! `anchor_llama.py`), printed as one JSON line (tok/s, MFU, memory, and where the step time went).

use crate::usage::usage_error;
use anyhow::Result;
use ferrospeed::CommExt;
use candle_core::Tensor;
use clap::Args;
use ferrospeed::accelerator::{Accelerator, Options, PrepareOptions};
use ferrospeed::config::{Config, DeviceChoice, Precision, ZeroStage};
use ferrospeed::engine::{Batch, Engine, StepTimes};
use ferrospeed::rng::Rng;
use ferrospeed::WorldInfo;
use ferrospeed_models::llama::{MoeConfig, QkNorm};
use ferrospeed_models::{Family, Gpt, GptConfig, Llama, LlamaConfig};
use std::process::ExitCode;
use std::time::Instant;

#[derive(Args, Debug)]
pub struct BenchTrainArgs {
    /// gpt2-124m, gpt2-350m, gpt2-774m, gpt2-1.5b (vocabulary 50304, as the anchors), or the shapes of
    /// anchor_llama.py: llama-tiny, llama-1b, llama-3b, llama-8b, llama-13b, llama-70b, llama-405b;
    /// mixtures of experts (bench/anchor_moe.py): olmoe-1b-7b, qwen3-30b-a3b
    #[arg(long, default_value = "gpt2-124m")]
    pub model: String,
    /// Layers instead of the shape's own count (a deeper or shallower model of the same width)
    #[arg(long)]
    pub layers: Option<usize>,
    #[arg(long, default_value_t = 16)]
    pub micro_batch: usize,
    #[arg(long, default_value_t = 1024)]
    pub seq_len: usize,
    #[arg(long, default_value_t = 0)]
    pub stage: i64,
    /// fp32, bf16 or fp16
    #[arg(long, default_value = "bf16")]
    pub precision: String,
    /// auto, cpu or cuda
    #[arg(long, default_value = "auto")]
    pub device: String,
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    #[arg(long)]
    pub checkpointing: bool,
    /// After the timed steps, run one more step with CUDA events around every op and print where its
    /// time went by kind of work (matmul, attention, elementwise, copy, optimizer, communication, idle)
    #[arg(long)]
    pub profile: bool,
    /// Where the optimizer state lives: none, cpu or nvme (zero.offload_optimizer)
    #[arg(long, default_value = "none")]
    pub offload_optimizer: String,
    /// Share of the optimizer state offloaded, in (0, 1] (zero.offload_ratio)
    #[arg(long, default_value_t = 1.0)]
    pub offload_ratio: f64,
    /// With --offload-optimizer nvme: the share of the state in NVMe files, the offloaded rest in host
    /// memory (zero.nvme_ratio; default: all of the offloaded state)
    #[arg(long)]
    pub nvme_ratio: Option<f64>,
    /// Folder of the NVMe tier's files (zero.nvme_dir)
    #[arg(long)]
    pub nvme_dir: Option<std::path::PathBuf>,
    /// Where stage 3 keeps parameter shards between uses: none, cpu or nvme (zero.offload_params)
    #[arg(long, default_value = "none")]
    pub offload_params: String,
    /// Pipeline stages (parallel.pp; run under `launch` with a multiple of it)
    #[arg(long, default_value_t = 1)]
    pub pp: usize,
    /// The pipeline schedule: 1f1b, gpipe, interleaved or zb (parallel.pp_schedule)
    #[arg(long, default_value = "1f1b")]
    pub schedule: String,
    /// Stages a rank holds with --schedule interleaved (parallel.pp_virtual)
    #[arg(long, default_value_t = 1)]
    pub pp_virtual: usize,
    /// Blocks per stage, comma-separated (parallel.pp_split; default: split by cost)
    #[arg(long)]
    pub pp_split: Option<String>,
    /// Micro-batches per step per data-parallel rank (the accumulation; a pipeline's micro-batches)
    #[arg(long, default_value_t = 1)]
    pub micro_batches: usize,
    /// Vocabulary instead of the shape's own (a lighter or heavier head)
    #[arg(long)]
    pub vocab: Option<usize>,
    /// Train LoRA adapters of this rank on every projection of a frozen base (lora.r; alpha 2·r,
    /// targets "all-linear") instead of every weight (Llama shapes)
    #[arg(long)]
    pub lora_r: Option<usize>,
    /// With --lora-r: how the frozen base is stored, bf16 (the compute dtype) or nf4 (QLoRA; lora.base)
    #[arg(long, default_value = "bf16")]
    pub lora_base: String,
}

/// The model `name` for sequences of `seq_len`: GPT-2 sizes, or the Llama shapes of `anchor_llama.py`
/// (rope theta 500000, eps 1e-5, as there).
pub(crate) fn shape(name: &str, seq_len: usize) -> Option<Family> {
    let gpt = |n_layer, d_model, n_head| Family::Gpt(Gpt::new(GptConfig { n_layer, n_head, d_model, seq_len, vocab_size: 50304 }));
    let llama = |l, d, h, kv, ffn, v, tied| {
        let cfg = LlamaConfig { d_ff: ffn, rope_theta: 500_000.0, tie_word_embeddings: tied, ..LlamaConfig::tiny(l, d, h, kv, v, seq_len) };
        Family::Llama(Llama::new(cfg))
    };
    Some(match name {
        "gpt2-124m" => gpt(12, 768, 12),
        "gpt2-350m" => gpt(24, 1024, 16),
        "gpt2-774m" => gpt(36, 1280, 20),
        "gpt2-1.5b" => gpt(48, 1600, 25),
        "llama-tiny" => llama(2, 256, 4, 2, 688, 32000, false),
        "llama-1b" => llama(16, 2048, 32, 8, 8192, 128_256, true),
        "llama-3b" => llama(28, 3072, 24, 8, 8192, 128_256, true),
        "llama-8b" => llama(32, 4096, 32, 8, 14336, 128_256, false),
        "llama-13b" => llama(40, 5120, 40, 40, 13824, 32000, false),
        // Llama-3.1-70B and -405B (the QLoRA shapes of issue 27).
        "llama-70b" => llama(80, 8192, 64, 8, 28672, 128_256, false),
        "llama-405b" => llama(126, 16384, 128, 8, 53248, 128_256, false),
        // Mixtures of experts (issue 28): OLMoE-1B-7B and Qwen3-30B-A3B as their configs give them.
        "olmoe-1b-7b" => moe_shape(16, 2048, 16, 16, 128, 50304, 10_000.0, 1e-5, QkNorm::Full, (64, 8, 1024, false, 0.01), seq_len),
        "qwen3-30b-a3b" => moe_shape(48, 2048, 32, 4, 128, 151_936, 1_000_000.0, 1e-6, QkNorm::PerHead, (128, 8, 768, true, 0.001), seq_len),
        _ => return None,
    })
}

/// A Llama-family mixture of experts: every layer sparse, `(experts, top k, expert width,
/// norm_topk_prob, router_aux_loss_coef)`, no shared expert, the load-balancing loss off (transformers' default).
#[allow(clippy::too_many_arguments)]
fn moe_shape(l: usize, d: usize, h: usize, kv: usize, head_dim: usize, v: usize, theta: f64, eps: f64, qk_norm: QkNorm, e: (usize, usize, usize, bool, f64), seq_len: usize) -> Family {
    let (num_experts, top_k, d_expert, norm_topk_prob, aux_coef) = e;
    let moe = MoeConfig { num_experts, top_k, d_expert, norm_topk_prob, d_shared: 0, sparse_step: 1, first_dense: 0, mlp_only: 0, aux_coef, aux_loss: false, z_loss_coef: 0.0, capacity_factor: None };
    let cfg = LlamaConfig { head_dim, d_ff: d_expert, rope_theta: theta, rms_norm_eps: eps, qk_norm, moe: Some(moe), ..LlamaConfig::tiny(l, d, h, kv, v, seq_len) };
    Family::Llama(Llama::new(cfg))
}

/// `family` with `layers` layers, if given.
pub(crate) fn with_layers(family: Family, layers: Option<usize>) -> Family {
    match (family, layers) {
        (Family::Gpt(g), Some(n)) => Family::Gpt(Gpt::new(GptConfig { n_layer: n, ..g.cfg })),
        (Family::Llama(l), Some(n)) => Family::Llama(Llama::new(LlamaConfig { n_layer: n, ..l.cfg })),
        (f, None) => f,
    }
}

/// `family` with a vocabulary of `vocab`, if given.
fn with_vocab(family: Family, vocab: Option<usize>) -> Family {
    match (family, vocab) {
        (Family::Gpt(g), Some(v)) => Family::Gpt(Gpt::new(GptConfig { vocab_size: v, ..g.cfg })),
        (Family::Llama(l), Some(v)) => Family::Llama(Llama::new(LlamaConfig { vocab_size: v, ..l.cfg })),
        (f, None) => f,
    }
}

/// Layers, width and vocabulary of a bench model.
fn dims(f: &Family) -> (usize, usize, usize) {
    match f {
        Family::Gpt(g) => (g.cfg.n_layer, g.cfg.d_model, g.cfg.vocab_size),
        Family::Llama(l) => (l.cfg.n_layer, l.cfg.d_model, l.cfg.vocab_size),
    }
}

pub fn run(args: BenchTrainArgs) -> Result<ExitCode> {
    let family = shape(&args.model, args.seq_len).map(|f| with_vocab(with_layers(f, args.layers), args.vocab)).ok_or_else(|| {
        usage_error(format!("--model {} is unknown: use gpt2-124m, gpt2-350m, gpt2-774m, gpt2-1.5b, llama-tiny, llama-1b, llama-3b, llama-8b, llama-13b, llama-70b, llama-405b, olmoe-1b-7b or qwen3-30b-a3b", args.model))
    })?;
    let family = match args.lora_r {
        Some(r) => {
            let base = ferrospeed::config::LoraBase::from_name(&args.lora_base).ok_or_else(|| usage_error("--lora-base: use bf16 or nf4"))?;
            family.with_lora(&ferrospeed::config::LoraConfig { r, alpha: 2.0 * r as f64, base, ..Default::default() }).map_err(|e| usage_error(format!("--lora-r: {e}")))?
        }
        None => family,
    };
    let (n_layer, d_model, vocab) = dims(&family);
    let precision = Precision::from_name(&args.precision).ok_or_else(|| usage_error("--precision: use fp32, bf16 or fp16"))?;
    let stage = ZeroStage::from_int(args.stage).ok_or_else(|| usage_error("--stage: use 0, 1, 2 or 3"))?;
    let choice = DeviceChoice::from_name(&args.device).ok_or_else(|| usage_error("--device: use auto, cpu or cuda"))?;
    let world = WorldInfo::from_env()?;
    let offload = ferrospeed::config::Offload::from_name(&args.offload_optimizer).ok_or_else(|| usage_error("--offload-optimizer: use none, cpu or nvme"))?;
    let offload_params = ferrospeed::config::Offload::from_name(&args.offload_params).ok_or_else(|| usage_error("--offload-params: use none, cpu or nvme"))?;
    let nvme_dir = args.nvme_dir.as_ref().map(|d| format!("nvme_dir = {:?}\n", d.display().to_string())).unwrap_or_default()
        + &args.nvme_ratio.map(|q| format!("nvme_ratio = {q}\n")).unwrap_or_default();
    if args.pp == 0 || world.world_size % args.pp != 0 || args.micro_batches == 0 {
        return Err(usage_error(format!("--pp {} and --micro-batches {}: both at least 1, and --pp must divide the {} rank(s)", args.pp, args.micro_batches, world.world_size)));
    }
    let dp = world.world_size / args.pp;
    let split = args.pp_split.as_deref().map(|s| format!("pp_split = [{s}]\n")).unwrap_or_default();
    let parallel = format!("\n[parallel]\npp = {}\npp_schedule = \"{}\"\npp_virtual = {}\n{split}", args.pp, args.schedule, args.pp_virtual);
    // The anchors' settings, as a config: AdamW (0.9, 0.95, 1e-8, decay 0.1), clipping at 1, a constant
    // learning rate of 1e-4, seed 0, one micro-batch per rank per step (--micro-batches: more).
    let toml = format!(
        "[train]\nsteps = {steps}\nglobal_batch = {global}\nmicro_batch = {micro}\nlr = 1e-4\nmin_lr = 1e-4\nwarmup = 0\nweight_decay = 0.1\nbeta1 = 0.9\nbeta2 = 0.95\neps = 1e-8\ngrad_clip = 1.0\nseed = 0\nprecision = \"{precision}\"\nactivation_checkpointing = {ckpt}\ndevice = \"{device}\"\nloss_scale_initial = 65536.0\nloss_scale_growth_interval = 2000\n\n[zero]\nstage = {stage}\noffload_optimizer = \"{offload}\"\noffload_ratio = {ratio}\noffload_params = \"{offload_params}\"\n{nvme_dir}{parallel}",
        steps = args.warmup + args.steps + 1,
        global = args.micro_batch * dp * args.micro_batches,
        micro = args.micro_batch,
        precision = precision.name(),
        ckpt = args.checkpointing,
        device = choice.name(),
        stage = stage.as_int(),
        ratio = args.offload_ratio,
    );
    // The adapters' base storage reaches the engine through the config, as in a training run.
    let toml = match args.lora_r {
        Some(r) => format!("{toml}\n[lora]\nr = {r}\nalpha = {}\nbase = \"{}\"\n", 2 * r, args.lora_base),
        None => toml,
    };
    let cfg = Config::from_toml_str_for_program(&toml, "bench-train", &[]).map_err(|e| usage_error(e.to_string()))?;
    let mut acc = Accelerator::new(&cfg, Options { run_name: "bench".into(), track: false }).map_err(crate::train::accel_error)?;
    let device = acc.device().clone();
    let t_init = Instant::now();
    let optimizer = acc.optimizer_from_config();
    let mut engine = acc.prepare(family.model()?, optimizer, PrepareOptions::default()).map_err(crate::train::accel_error)?;
    let init_s = t_init.elapsed().as_secs_f64();
    if acc.is_main_process() {
        eprintln!("initialised in {init_s:.1} s; GPU peak {:?} bytes, host peak {} bytes", ferrospeed::device::peak_device_bytes(&device), ferrospeed::track::peak_rss_bytes());
    }
    let params = engine.model().num_params();
    // Tokens by data-parallel rank: the stages of a pipeline read the same micro-batches.
    let mut rng = Rng::derive(0, &format!("bench/{}", acc.data_parallel_rank()));
    let n = args.micro_batch * args.seq_len;
    let mut random = |len: usize| -> Result<Tensor> {
        let v: Vec<u32> = (0..len).map(|_| rng.below(vocab as u64) as u32).collect();
        Ok(Tensor::from_vec(v, (args.micro_batch, args.seq_len), &device)?)
    };
    let batches = (0..args.micro_batches).map(|_| Ok(Batch::tokens(random(n)?, random(n)?))).collect::<Result<Vec<_>>>()?;
    let mut step_secs = Vec::new();
    let mut phases = Vec::new();
    let mut losses = Vec::new();
    for i in 0..args.warmup + args.steps {
        device.synchronize()?;
        let t0 = Instant::now();
        let stats = engine.train_step(&batches)?;
        device.synchronize()?;
        let secs = t0.elapsed().as_secs_f64();
        if i >= args.warmup {
            step_secs.push(secs);
            phases.push(stats.times);
        }
        // Progress on stderr: a run that is stopped still says how far it came.
        if acc.is_main_process() {
            let t = &stats.times;
            eprintln!(
                "step {}/{}: loss {:.4}, {secs:.2} s (optimizer {:.2} s: transfers waited {:.2} s, disk {:.2} s)",
                i + 1,
                args.warmup + args.steps,
                stats.loss,
                t.optimizer,
                t.transfer_wait,
                t.disk_wait
            );
        }
        losses.push(stats.loss);
    }
    step_secs.sort_by(f64::total_cmp);
    let dt = step_secs[step_secs.len() / 2];
    let tokens = (n * dp * args.micro_batches) as f64;
    // Each stage's idle share: its waits for the stages beside it over its own work, against the
    // schedule's analytic bubble ((pp − 1)/m for 1f1b and gpipe, (pp − 1)/(v·m) interleaved, and
    // (pp − 1)/(3m) for zb with a forward and each backward half of equal cost).
    let idle: Vec<f64> = phases.iter().map(|t| t.pipeline_wait / (t.forward_backward - t.pipeline_wait).max(1e-12)).collect();
    let mut idle_sorted = idle.clone();
    idle_sorted.sort_by(f64::total_cmp);
    let my_idle = idle_sorted.get(idle_sorted.len() / 2).copied().unwrap_or(0.0) as f32;
    // And each rank's compute per micro-batch by kind of action (median step): forward, backward
    // (input half under zb), weight half — the costs its schedule is measured against.
    let per_micro = |f: fn(&StepTimes) -> f64| {
        let mut v: Vec<f64> = phases.iter().map(|t| f(t) / args.micro_batches as f64).collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0) as f32
    };
    let mine = [my_idle, per_micro(|t| t.pipeline_compute.forward), per_micro(|t| t.pipeline_compute.backward), per_micro(|t| t.pipeline_compute.weight)];
    let gathered = engine.comm().run(move |c| {
        let mut all = vec![0f32; 4 * c.world_size()];
        c.all_gather_slice(&mine, &mut all).map(|()| all)
    })??;
    let stage_idle: Vec<f32> = gathered.chunks(4).map(|c| c[0]).collect();
    let stage_costs: Vec<[f64; 3]> = gathered.chunks(4).map(|c| [f64::from(c[1]), f64::from(c[2]), f64::from(c[3])]).collect();
    let tok_s = tokens / dt;
    // 6 FLOPs a trainable weight a token (forward, input and weight gradients), 4 a frozen one (no
    // weight gradient: a LoRA base), and the attention's scores and weighted values.
    let frozen = engine.model().num_frozen_params();
    let flops_per_token = 6.0 * params as f64 + 4.0 * frozen as f64 + 12.0 * (n_layer * d_model * args.seq_len) as f64;
    let mean = |f: fn(&StepTimes) -> f64| phases.iter().map(f).sum::<f64>() / phases.len().max(1) as f64 * 1e3;
    let profile = if args.profile { Some(profile_step(&mut engine, &batches, &device)?) } else { None };
    let analytic = if args.pp > 1 { analytic_bubble(&args)? } else { 0.0 };
    // The same schedule at the costs measured (their mean over the first data-parallel group's stages):
    // its formula, and its simulated timeline (what the executor would reach with no other waits).
    let measured = (args.pp > 1).then(|| measured_bubble(&args, &stage_costs, dp)).transpose()?;
    if acc.is_main_process() {
        let line = serde_json::json!({
            "engine": "ferrospeed",
            "model": args.model,
            "layers": n_layer,
            "params": params,
            "frozen_params": frozen,
            "B": args.micro_batch,
            "T": args.seq_len,
            "world": acc.world_size(),
            "pp": args.pp,
            "micro_batches": args.micro_batches,
            "schedule": if args.pp > 1 { Some(&args.schedule) } else { None },
            "bubble": (args.pp > 1).then(|| serde_json::json!({
                "analytic": analytic,
                "virtual_stages": args.pp_virtual,
                // Stage s's idle over busy time (median over the timed steps), first data-parallel group.
                "measured_per_stage": (0..args.pp).map(|s| (f64::from(stage_idle[s * dp]) * 1e4).round() / 1e4).collect::<Vec<_>>(),
                "costs_ms_per_stage": (0..args.pp).map(|s| stage_costs[s * dp].map(|c| (c * 1e5).round() / 1e2)).collect::<Vec<_>>(),
                "at_measured_costs": measured,
            })),
            "stage": args.stage,
            "precision": args.precision,
            "device": format!("{device:?}").split('(').next().unwrap_or("").to_lowercase(),
            "checkpointing": args.checkpointing,
            "offload_optimizer": args.offload_optimizer,
            "offload_ratio": args.offload_ratio,
            "nvme_ratio": args.nvme_ratio,
            "offload_params": args.offload_params,
            "memory": engine.memory(),
            "nvme": engine.disk_traffic().map(|d| serde_json::json!({"read_gbps": d.read_gbps(), "write_gbps": d.write_gbps(), "read_gb": d.read_bytes as f64 / 1e9, "direct": d.direct})),
            "step_ms": (dt * 1e3 * 100.0).round() / 100.0,
            "tok_s": tok_s.round(),
            "tflops": (tok_s * flops_per_token / 1e12 * 10.0).round() / 10.0,
            "mfu_989": (tok_s * flops_per_token / 989e12 * 1000.0).round() / 1000.0,
            "peak_gpu_gib": ferrospeed::device::peak_device_bytes(&device).map(|b| (b as f64 / (1u64 << 30) as f64 * 100.0).round() / 100.0),
            "peak_host_gib": (ferrospeed::track::peak_rss_bytes() as f64 / (1u64 << 30) as f64 * 100.0).round() / 100.0,
            "init_s": (init_s * 10.0).round() / 10.0,
            "phases_ms": {
                "forward_backward": mean(|t| t.forward_backward),
                "reduce_wait": mean(|t| t.reduce_wait),
                "optimizer": mean(|t| t.optimizer),
                "publish": mean(|t| t.publish),
                "transfer_wait": mean(|t| t.transfer_wait),
                "disk_wait": mean(|t| t.disk_wait),
                "pipeline_wait": mean(|t| t.pipeline_wait),
            },
            "loss": (losses.last().copied().unwrap_or(f64::NAN) * 1000.0).round() / 1000.0,
            "losses": losses.iter().map(|l| (l * 1e4).round() / 1e4).collect::<Vec<_>>(),
            "breakdown_ms": profile,
        });
        println!("{line}");
    }
    Ok(ExitCode::SUCCESS)
}

/// The analytic bubble of the run's schedule, at unit costs (forward, input and weight halves alike).
fn analytic_bubble(args: &BenchTrainArgs) -> Result<f64> {
    Ok(schedule(args)?.analytic_bubble(ferrospeed::parallel::Costs::UNIT))
}

/// The run's pipeline schedule (`--schedule`, `--pp`, `--pp-virtual`, `--micro-batches`).
fn schedule(args: &BenchTrainArgs) -> Result<ferrospeed::parallel::Schedule> {
    use ferrospeed::config::PipelineSchedule;
    let kind = PipelineSchedule::from_name(&args.schedule).ok_or_else(|| anyhow::anyhow!("--schedule {}: use 1f1b, gpipe, interleaved or zb", args.schedule))?;
    Ok(ferrospeed::parallel::Schedule::new(kind.into(), args.pp, args.pp_virtual, args.micro_batches)?)
}

/// The run's schedule at the compute each stage measured per micro-batch (`[forward, backward or its
/// input half, weight half]`, mean over the stages of the first data-parallel group): the analytic
/// bubble and the simulated one (a whole backward's cost split evenly where the schedule does not split).
fn measured_bubble(args: &BenchTrainArgs, stage_costs: &[[f64; 3]], dp: usize) -> Result<serde_json::Value> {
    use ferrospeed::parallel::Costs;
    let mean = |k: usize| (0..args.pp).map(|s| stage_costs[s * dp][k]).sum::<f64>() / args.pp as f64;
    // Per stage of the run's `v` stages a rank.
    let v = args.pp_virtual.max(1) as f64;
    let (f, b, w) = (mean(0) / v, mean(1) / v, mean(2) / v);
    let costs = if w > 0.0 { Costs { forward: f, backward_input: b, backward_weight: w } } else { Costs { forward: f, backward_input: b / 2.0, backward_weight: b / 2.0 } };
    let schedule = schedule(args)?;
    let simulated = schedule.simulate(costs)?.bubble();
    let round = |x: f64| (x * 1e4).round() / 1e4;
    Ok(serde_json::json!({"forward_ms": round(f * 1e3), "backward_input_ms": round(costs.backward_input * 1e3), "backward_weight_ms": round(costs.backward_weight * 1e3),
        "analytic": round(schedule.analytic_bubble(costs)), "simulated": round(simulated)}))
}

/// One more step with every op's kind of work timed by CUDA events (host clock on the CPU).
fn profile_step(engine: &mut Engine, batches: &[Batch], device: &candle_core::Device) -> Result<serde_json::Value> {
    use ferrospeed::profile::{self, Kind};
    device.synchronize()?;
    profile::start(device);
    let step = engine.train_step(batches);
    device.synchronize()?;
    let b = profile::finish().map_err(|e| anyhow::anyhow!("profiling the step: {e}"))?;
    step?;
    let mut rows = serde_json::Map::new();
    for kind in Kind::ALL {
        rows.insert(kind.name().into(), round(b.seconds.get(&kind).copied().unwrap_or(0.0) * 1e3).into());
    }
    rows.insert("idle".into(), round(b.idle() * 1e3).into());
    rows.insert("wall".into(), round(b.wall * 1e3).into());
    let mut ops: Vec<_> = b.by_label.iter().collect();
    ops.sort_by(|a, b| b.1.total_cmp(a.1));
    let ops: serde_json::Map<String, serde_json::Value> = ops.into_iter().map(|(l, s)| (l.to_string(), round(s * 1e3).into())).collect();
    rows.insert("by_op".into(), serde_json::Value::Object(ops));
    Ok(serde_json::Value::Object(rows))
}

fn round(ms: f64) -> f64 {
    (ms * 10.0).round() / 10.0
}
