//! `ferrospeed estimate-memory --config FILE [--world N]`: the GPU, host and NVMe bytes per rank of
//! that model for every ZeRO stage and offload choice (the library's `engine::estimate`, activations
//! from the model family); and the check `train` runs before allocating anything, which stops a
//! config that cannot fit this machine with one line naming the shortfall and a setting that fits.

use crate::usage::usage_error;
use anyhow::Result;
use clap::Args;
use ferrospeed::config::{Config, Offload, Precision};
use ferrospeed::engine::{estimate, EstimatePlan, MemoryEstimate, Model};
use ferrospeed::shard::Strategy;
use ferrospeed::WorldInfo;
use ferrospeed_models::Family;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Args, Debug)]
pub struct EstimateArgs {
    /// The run's TOML configuration
    #[arg(long)]
    pub config: PathBuf,
    /// Ranks (default: WORLD_SIZE, or 1)
    #[arg(long)]
    pub world: Option<usize>,
    /// Estimate for a GPU run even where this machine has none (default: the config's device)
    #[arg(long)]
    pub gpu: bool,
    /// Override a configuration key (repeatable)
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
}

/// A pipeline's shape, for the estimate of its ranks.
#[derive(Debug, Clone, PartialEq)]
pub struct PipeShape {
    /// Pipeline ranks (`parallel.pp`).
    pub pp: usize,
    /// Stages a rank holds (`parallel.pp_virtual`).
    pub virtual_stages: usize,
    /// `parallel.pp_schedule`.
    pub schedule: ferrospeed::config::PipelineSchedule,
    /// `parallel.pp_split` (empty: by cost).
    pub split: Vec<usize>,
}

/// How a run of `cfg` sets up: what the estimate needs besides the model.
#[derive(Debug, Clone)]
pub struct RunShape {
    pub micro_batch: usize,
    pub seq_len: usize,
    pub precision: Precision,
    pub accumulation: usize,
    pub checkpointing: bool,
    pub world: usize,
    pub on_gpu: bool,
    /// Threads drawing the initial values (this machine's cores).
    pub threads: usize,
    /// The pipeline, where `parallel.pp > 1` (`world` is then the data-parallel size).
    pub pipe: Option<PipeShape>,
    /// Expert-parallel ranks (`parallel.ep`).
    pub ep: usize,
    /// Tensor-parallel ranks (`parallel.tp`): split blocks hold their slices (activations are counted
    /// whole: an overestimate).
    pub tp: usize,
    /// Context-parallel ranks (`parallel.cp`): each holds `seq_len / cp` tokens of every sequence
    /// (`world` then counts them with the data-parallel ranks, which ZeRO shards over).
    pub cp: usize,
}

/// The estimate of `model` (of `family`) under `strategy` for a run shaped `run`: per rank, or in a
/// pipeline that of its most demanding rank (see [`estimate_pipeline`]).
pub fn estimate_run(family: &Family, model: &Model, strategy: Strategy, run: &RunShape) -> MemoryEstimate {
    match &run.pipe {
        None => estimate_whole(model, strategy, run, family.activations(run.micro_batch, run.seq_len / run.cp.max(1), run.precision.compute_dtype().size_in_bytes())),
        Some(pipe) => estimate_pipeline(family, model, strategy, run, pipe)
            .into_iter()
            .max_by_key(|e| if run.on_gpu { (e.device, e.host) } else { (e.host, e.device) })
            .unwrap_or_default(),
    }
}

/// Each pipeline rank's estimate: its blocks (and ghosts) as the engine cuts them, with the
/// activations of the micro-batches its schedule holds at once (1f1b: `pp − rank`; gpipe: all of
/// them; interleaved: its warm-up plus one, in units of one of its stages; zb: up to `pp + 1`, a
/// micro-batch counted until its weight half), each the rank's share of
/// the model's activations by its blocks' forward FLOPs.
pub fn estimate_pipeline(family: &Family, model: &Model, strategy: Strategy, run: &RunShape, pipe: &PipeShape) -> Vec<MemoryEstimate> {
    use ferrospeed::config::PipelineSchedule;
    let stages = pipe.pp * pipe.virtual_stages;
    let costs = model.stage_costs();
    let Ok(ranges) = ferrospeed::parallel::stage_blocks(&costs, stages, &pipe.split) else {
        return vec![estimate_whole(model, strategy, run, family.activations(run.micro_batch, run.seq_len, run.precision.compute_dtype().size_in_bytes()))];
    };
    let total_flops: f64 = costs.iter().map(|c| c.flops).sum::<f64>().max(1.0);
    let whole = family.activations(run.micro_batch, run.seq_len, run.precision.compute_dtype().size_in_bytes());
    let m = run.accumulation;
    let schedule = ferrospeed::parallel::Schedule::new(pipe.schedule.into(), pipe.pp, pipe.virtual_stages, m).and_then(|s| s.simulate(ferrospeed::parallel::Costs::UNIT)).ok();
    (0..pipe.pp)
        .map(|r| {
            let chunks: Vec<std::ops::Range<usize>> = ranges.iter().skip(r).step_by(pipe.pp).cloned().collect();
            let share = chunks.iter().flat_map(|c| c.clone()).map(|i| costs[i].flops).sum::<f64>() / total_flops;
            // Micro-batches of the rank's blocks held at once (interleaved: stage-sized units): what the
            // schedule itself holds, run on the unit-cost model (zb: until each weight half).
            let held = match &schedule {
                Some(s) => s.peak_in_flight[r] as f64 / pipe.virtual_stages as f64,
                None if pipe.schedule == PipelineSchedule::Gpipe => m as f64,
                None => (pipe.pp - r).min(m) as f64,
            };
            let scale = |b: u64| (b as f64 * share * held) as u64;
            // zb: a micro-batch waiting for its weight half keeps what the weight matmuls read (the
            // layers' inputs and output gradients, the head's logit gradient) even with activation
            // checkpointing: about what a block keeps without it.
            let recomputed = if pipe.schedule == PipelineSchedule::ZeroBubble { whole.kept } else { whole.recomputed };
            let acts = ferrospeed::engine::ActivationProfile { kept: scale(whole.kept), recomputed: scale(recomputed) };
            // A rank that cannot be cut (not expected: the engine cuts the same way) is estimated as
            // the whole model, never left out.
            match family.model().ok().and_then(|m| m.cut(&chunks).ok()) {
                Some(cut) => estimate_whole(&cut.model, strategy, run, acts),
                None => estimate_whole(model, strategy, run, whole),
            }
        })
        .collect()
}

/// The estimate of `model` with activations `activations` at one micro-batch.
fn estimate_whole(model: &Model, strategy: Strategy, run: &RunShape, activations: ferrospeed::engine::ActivationProfile) -> MemoryEstimate {
    let compute_bytes = run.precision.compute_dtype().size_in_bytes();
    let plan = EstimatePlan {
        strategy,
        world: run.world,
        compute_bytes,
        num_states: 2,
        accumulation: run.accumulation,
        checkpointing: run.checkpointing,
        on_gpu: run.on_gpu,
        activations,
        init_threads: run.threads,
        ep: run.ep,
        tp: run.tp,
    };
    estimate(model, &plan)
}

/// The run `cfg` describes at `world` ranks (a GPU run when `on_gpu`): the model's parameter count
/// and its memory per rank under the config's own stage and offload.
pub fn estimate_config(cfg: &Config, world: usize, on_gpu: bool) -> Result<(usize, MemoryEstimate)> {
    let (family, _) = Family::for_run(&cfg).map_err(|e| usage_error(e.to_string()))?;
    let model = family.model()?;
    let e = estimate_run(&family, &model, strategy_of(cfg), &shape_of(cfg, world, on_gpu)?);
    Ok((model.num_params(), e))
}

pub fn gib(b: u64) -> f64 {
    b as f64 / (1u64 << 30) as f64
}

fn strategy_of(cfg: &Config) -> Strategy {
    cfg.zero.strategy()
}

/// The run's shape at `world` ranks: ZeRO shards over the data-parallel group; a pipeline's ranks
/// are estimated one by one (`estimate_pipeline`).
fn shape_of(cfg: &Config, world: usize, on_gpu: bool) -> Result<RunShape> {
    let mesh = cfg.mesh(world).map_err(|e| usage_error(e.to_string()))?;
    let dp = mesh.size(ferrospeed::parallel::Axis::Dp);
    Ok(RunShape {
        micro_batch: cfg.train.micro_batch,
        seq_len: cfg.model.seq_len,
        precision: cfg.train.precision,
        accumulation: cfg.accumulation_steps(dp).map_err(|e| usage_error(e.to_string()))?,
        checkpointing: cfg.train.activation_checkpointing,
        // Context-parallel ranks hold whole parameters, sharded with the data-parallel ones.
        world: dp * cfg.parallel.cp,
        on_gpu,
        threads: rayon::current_num_threads(),
        pipe: (cfg.parallel.pp > 1).then(|| PipeShape {
            pp: cfg.parallel.pp,
            virtual_stages: cfg.parallel.pp_virtual,
            schedule: cfg.parallel.pp_schedule,
            split: cfg.parallel.pp_split.clone(),
        }),
        ep: cfg.parallel.ep,
        tp: cfg.parallel.tp,
        cp: cfg.parallel.cp,
    })
}

/// The alternatives to a config, in the order they are suggested: what each changes, its strategy
/// and whether it recomputes activations.
fn alternatives(cfg: &Config, world: usize) -> Vec<(String, Strategy, bool)> {
    let base = strategy_of(cfg);
    let ckpt = cfg.train.activation_checkpointing;
    let mut out = Vec::new();
    if !ckpt {
        out.push(("set train.activation_checkpointing = true".to_string(), base, true));
    }
    if world > 1 && base.stage.as_int() < 3 {
        out.push(("set zero.stage = 3".into(), Strategy { stage: ferrospeed::config::ZeroStage::Three, ..base }, true));
    }
    for ratio in [0.5, 1.0] {
        let s = base.with_offload(Offload::Cpu, ratio, Offload::None);
        out.push((format!("set zero.offload_optimizer = \"cpu\" and zero.offload_ratio = {ratio}, with activation checkpointing"), s, true));
    }
    if cfg.zero.nvme_dir.is_some() {
        out.push(("set zero.offload_optimizer = \"nvme\", with activation checkpointing".into(), base.with_offload(Offload::Nvme, 1.0, Offload::None), true));
        // Host memory and the disk together, for state that fits neither alone.
        out.push((
            "set zero.offload_optimizer = \"nvme\" and zero.nvme_ratio = 0.5 (half in host memory), with activation checkpointing".into(),
            base.with_offload(Offload::Nvme, 1.0, Offload::None).with_nvme_ratio(0.5),
            true,
        ));
    }
    out
}

pub fn run(args: EstimateArgs) -> Result<ExitCode> {
    let cfg = Config::load(&args.config, &args.overrides).map_err(|e| usage_error(e.to_string()))?;
    let (family, _) = Family::for_run(&cfg).map_err(|e| usage_error(e.to_string()))?;
    let model = family.model()?;
    let world = args.world.unwrap_or_else(|| WorldInfo::from_env().map(|w| w.world_size).unwrap_or(1)).max(1);
    let on_gpu = args.gpu || cfg!(feature = "cuda") && cfg.train.device != ferrospeed::config::DeviceChoice::Cpu;
    let run = shape_of(&cfg, world, on_gpu)?;
    println!(
        "{} parameters, micro-batch {} × {} tokens, {}, {} rank(s){}, activation checkpointing {}; GiB per rank{}:",
        model.num_params(),
        run.micro_batch,
        run.seq_len,
        run.precision,
        world,
        match &run.pipe {
            Some(p) => format!(" (a pipeline of {} ranks × {} data-parallel: its most demanding rank)", p.pp, run.world),
            None => String::new(),
        },
        if run.checkpointing { "on" } else { "off" },
        if on_gpu { "" } else { " (a CPU run: everything is host memory; --gpu for a GPU run)" }
    );
    println!("{:<7} {:<22} {:>9} {:>9} {:>9}", "stage", "optimizer state", "GPU", "host", "NVMe");
    let this = strategy_of(&cfg);
    let row = |stage: ferrospeed::config::ZeroStage, label: &str, s: Strategy, mark: &str| {
        let e = estimate_run(&family, &model, s, &run);
        println!("{:<7} {:<22} {:>9.2} {:>9.2} {:>9.2}{mark}", stage.as_int(), label, gib(e.device), gib(e.host), gib(e.nvme));
    };
    let mut shown = false;
    for stage in 0..=3 {
        let stage = ferrospeed::config::ZeroStage::from_int(stage).expect("0..=3");
        for (label, off, ratio) in [("on the device", Offload::None, 1.0), ("half on the CPU", Offload::Cpu, 0.5), ("on the CPU", Offload::Cpu, 1.0), ("on NVMe", Offload::Nvme, 1.0)] {
            let s = Strategy::new(stage).with_offload(off, ratio, Offload::None);
            let is_this = s == this;
            shown |= is_this;
            row(stage, label, s, if is_this { "  ← this config" } else { "" });
        }
    }
    if !shown {
        // A mix the table does not list (another ratio, host and NVMe together, parameter offload).
        let z = &cfg.zero;
        let params = if z.offload_params == Offload::None { String::new() } else { format!(", params {}", z.offload_params) };
        let label = format!("{} {}{}{params}", z.offload_optimizer, z.offload_ratio, z.nvme_ratio.map(|q| format!(", NVMe {q}")).unwrap_or_default());
        row(z.stage, &label, this, "  ← this config");
    }
    Ok(ExitCode::SUCCESS)
}

/// Before `train` allocates: refuse a config whose estimate exceeds this machine's free GPU or host
/// memory, naming the shortfall and the first alternative that fits (`FERROSPEED_MEMORY_CHECK=0`
/// skips the check). Returns the estimate and the free GPU memory, for an out-of-memory message.
pub fn check_fits(cfg: &Config, family: &Family, model: &Model, device: &candle_core::Device, world: &WorldInfo) -> Result<(MemoryEstimate, Option<u64>)> {
    // A pipeline split that does not fit the model is refused here, before any rank claims anything.
    if cfg.parallel.pp > 1 {
        ferrospeed::parallel::stage_blocks(&model.stage_costs(), cfg.parallel.pp * cfg.parallel.pp_virtual, &cfg.parallel.pp_split)
            .map_err(|e| usage_error(e.to_string()))?;
    }
    let on_gpu = device.is_cuda();
    let gpu = ferrospeed::device::device_memory(device).map(|(free, _)| free);
    let run = shape_of(cfg, world.world_size, on_gpu)?;
    let e = estimate_run(family, model, strategy_of(cfg), &run);
    let Some(host) = ferrospeed::device::host_available_bytes() else { return Ok((e, gpu)) };
    if std::env::var("FERROSPEED_MEMORY_CHECK").is_ok_and(|v| v == "0") {
        return Ok((e, gpu));
    }
    // Ranks of this node share the host.
    let local = world.local_world_size.max(1) as u64;
    let fits = |e: &MemoryEstimate| gpu.is_none_or(|g| e.device <= g) && e.host * local <= host;
    if fits(&e) {
        return Ok((e, gpu));
    }
    let (what, need, have) = match gpu {
        Some(g) if e.device > g => ("GPU memory per rank", e.device, g),
        _ => ("host memory for this node's ranks", e.host * local, host),
    };
    let fix = alternatives(cfg, run.world)
        .into_iter()
        .find_map(|(label, s, ckpt)| {
            let alt = estimate_run(family, model, s, &RunShape { checkpointing: ckpt, ..run.clone() });
            fits(&alt).then(|| format!("{label} (estimated {:.1} GiB GPU, {:.1} GiB host per rank)", gib(alt.device), gib(alt.host)))
        })
        .unwrap_or_else(|| "use more ranks or a smaller micro-batch (no offload setting fits this machine)".into());
    Err(usage_error(format!(
        "this run needs about {:.1} GiB of {what} (estimate: parameters {:.1}, gradients {:.1}, optimizer state {:.1}, activations {:.1}, offloaded {:.1}) and {:.1} GiB is free: {fix}; `ferrospeed estimate-memory` shows every choice, FERROSPEED_MEMORY_CHECK=0 skips this check",
        gib(need),
        gib(e.params),
        gib(e.grads),
        gib(e.state),
        gib(e.activations),
        gib(e.offloaded_host),
        gib(have)
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrospeed::config::ZeroStage;

    #[test]
    fn running_out_of_gpu_memory_is_one_line_naming_the_block_phase_and_estimate() {
        let err = ferrospeed::engine::EngineError::Tensor { block: "h.33".into(), source: candle_core::Error::Msg("DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")".into()).bt() };
        let est = MemoryEstimate { device: 80 << 30, params: 20 << 30, ..MemoryEstimate::default() };
        let msg = out_of_memory(err, "forward and backward", &(est, Some(70 << 30))).to_string();
        for want in ["block h.33", "forward and backward", "80.0 GiB", "70.0 GiB free", "zero.offload_optimizer"] {
            assert!(msg.contains(want), "{want}: {msg}");
        }
        assert!(!msg.contains('\n'), "{msg}");
        // Other errors pass through unchanged.
        let other = ferrospeed::engine::EngineError::Unsupported("x".into());
        assert_eq!(out_of_memory(other, "optimizer step", &(est, None)).to_string(), "x");
    }

    /// Every benchmark line recorded with its peak GPU and host memory (bench-train on one H200, 16
    /// cores), against the estimate of the same run: both within 10%.
    #[test]
    fn the_estimate_is_within_ten_percent_of_the_recorded_peaks() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../bench/results");
        let files = [
            "offload-2026-12-01/call4-quick/bench.jsonl",
            "offload-2026-12-01/call2-3b/bench.jsonl",
            "offload-2026-12-01/call3-8b/bench.jsonl",
            "gpu-2026-12-01-llama/call1/bench.jsonl",
            // Measured after the estimator was written (out of sample).
            "offload-2026-12-01/call5-estimate/bench.jsonl",
            "offload-2026-12-01/call6-nvme/bench.jsonl",
            "offload-2026-12-01-large/call1/bench.jsonl",
        ];
        let mut checked = Vec::new();
        for f in files {
            let text = std::fs::read_to_string(root.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
            for line in text.lines() {
                let d: serde_json::Value = serde_json::from_str(line).unwrap();
                let (Some(gpu), Some(host)) = (d["peak_gpu_gib"].as_f64(), d["peak_host_gib"].as_f64()) else { continue };
                let name = d["model"].as_str().unwrap();
                let (b, t) = (d["B"].as_u64().unwrap() as usize, d["T"].as_u64().unwrap() as usize);
                let layers = d["layers"].as_u64().map(|l| l as usize);
                let family = crate::bench_cmd::with_layers(crate::bench_cmd::shape(name, t).unwrap(), layers);
                let model = family.model().unwrap();
                let stage = ZeroStage::from_int(d["stage"].as_i64().unwrap()).unwrap();
                let offload = d["offload_optimizer"].as_str().and_then(Offload::from_name).unwrap_or(Offload::None);
                let ratio = d["offload_ratio"].as_f64().unwrap_or(1.0);
                let run = RunShape {
                    micro_batch: b,
                    seq_len: t,
                    precision: Precision::from_name(d["precision"].as_str().unwrap()).unwrap(),
                    accumulation: 1,
                    checkpointing: d["checkpointing"].as_bool().unwrap(),
                    world: d["world"].as_u64().unwrap() as usize,
                    on_gpu: true,
                    threads: 16,
                    pipe: None,
                    ep: 1,
                    tp: 1,
                    cp: 1,
                };
                let strategy = Strategy::new(stage).with_offload(offload, ratio, Offload::None);
                let strategy = d["nvme_ratio"].as_f64().map_or(strategy, |q| strategy.with_nvme_ratio(q));
                let e = estimate_run(&family, &model, strategy, &run);
                let (eg, eh) = (gib(e.device), gib(e.host));
                let what = format!("{name} stage {} ckpt {} offload {offload} {ratio}: GPU {eg:.2} vs {gpu}, host {eh:.2} vs {host}", stage.as_int(), run.checkpointing);
                eprintln!("{what}");
                assert!((eg / gpu - 1.0).abs() <= 0.10, "{f}: {what}");
                assert!((eh / host - 1.0).abs() <= 0.10, "{f}: {what}");
                checked.push((name.to_string(), stage, offload));
            }
        }
        // At least five configs: stages 0–3, with and without offload, GPT and Llama.
        assert!(checked.len() >= 5, "{checked:?}");
        for stage in [ZeroStage::Zero, ZeroStage::One, ZeroStage::Two, ZeroStage::Three] {
            assert!(checked.iter().any(|c| c.1 == stage), "no record at stage {stage}");
        }
        assert!(checked.iter().any(|c| c.2 != Offload::None) && checked.iter().any(|c| c.2 == Offload::None));
        assert!(checked.iter().any(|c| c.0.starts_with("gpt2")) && checked.iter().any(|c| c.0.starts_with("llama")));
    }

    /// The pipeline recorded on one H100 (bench/results/gpu-2026-12-07-issue26: Llama-1B shape, bf16,
    /// T 1024, micro-batch 2, 4 micro-batches, 1f1b): pp = 1's peak and pp = 2's rank 0 (the one that
    /// prints) against their estimates, within 10%.
    #[test]
    fn a_pipeline_rank_is_estimated_by_its_own_blocks_and_micro_batches() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../bench/results/gpu-2026-12-07-issue26/pipe.jsonl");
        let text = std::fs::read_to_string(&root).unwrap();
        let mut seen = 0;
        for line in text.lines() {
            let d: serde_json::Value = serde_json::from_str(line).unwrap();
            let pp = d["pp"].as_u64().unwrap() as usize;
            let family = crate::bench_cmd::shape(d["model"].as_str().unwrap(), d["T"].as_u64().unwrap() as usize).unwrap();
            let model = family.model().unwrap();
            let run = RunShape {
                micro_batch: d["B"].as_u64().unwrap() as usize,
                seq_len: d["T"].as_u64().unwrap() as usize,
                precision: Precision::from_name(d["precision"].as_str().unwrap()).unwrap(),
                accumulation: d["micro_batches"].as_u64().unwrap() as usize,
                checkpointing: false,
                world: 1,
                on_gpu: true,
                threads: 16,
                pipe: (pp > 1).then(|| PipeShape { pp, virtual_stages: 1, schedule: ferrospeed::config::PipelineSchedule::OneFOneB, split: vec![] }),
                ep: 1,
                tp: 1,
                cp: 1,
            };
            let strategy = Strategy::new(ZeroStage::Zero);
            let e = match &run.pipe {
                None => estimate_run(&family, &model, strategy, &run),
                Some(p) => estimate_pipeline(&family, &model, strategy, &run, p)[0],
            };
            let gpu = d["peak_gpu_gib"].as_f64().unwrap();
            eprintln!("pp {pp}: estimate {:.2} GiB (params {:.2}, grads {:.2}, state {:.2}, activations {:.2}) vs measured {gpu}", gib(e.device), gib(e.params), gib(e.grads), gib(e.state), gib(e.activations));
            assert!((gib(e.device) / gpu - 1.0).abs() <= 0.10, "pp {pp}: {:.2} vs {gpu}", gib(e.device));
            seen += 1;
        }
        assert_eq!(seen, 2);
    }

    /// Each schedule's ranks hold the micro-batches the schedule itself holds: 1f1b `pp − rank`, zb up
    /// to one more (until each weight half), gpipe all of them.
    #[test]
    fn a_pipeline_ranks_activations_follow_its_schedule() {
        use ferrospeed::config::PipelineSchedule as S;
        let family = crate::bench_cmd::shape("llama-1b", 1024).unwrap();
        let model = family.model().unwrap();
        let acts = |schedule: S| -> Vec<u64> {
            let pipe = PipeShape { pp: 4, virtual_stages: 1, schedule, split: vec![] };
            let run = RunShape { micro_batch: 2, seq_len: 1024, precision: Precision::from_name("bf16").unwrap(), accumulation: 8, checkpointing: false, world: 4, on_gpu: true, threads: 16, pipe: Some(pipe.clone()), ep: 1, tp: 1, cp: 1 };
            estimate_pipeline(&family, &model, Strategy::new(ZeroStage::Zero), &run, &pipe).iter().map(|e| e.activations).collect()
        };
        let (one, zb, all) = (acts(S::OneFOneB), acts(S::ZeroBubble), acts(S::Gpipe));
        for r in 0..4 {
            assert!(one[r] <= zb[r] && zb[r] <= all[r], "rank {r}: 1f1b {} zb {} gpipe {}", one[r], zb[r], all[r]);
        }
        assert!((0..4).any(|r| zb[r] > one[r]), "zb holds no more than 1f1b: {zb:?} vs {one:?}");
        // 1f1b's last rank holds one micro-batch, gpipe's all eight (same blocks, same share).
        assert!((all[3] as f64 / one[3] as f64 - 8.0).abs() < 1e-3, "{all:?} vs {one:?}");
    }

    /// Expert parallelism: at stage 0 each rank holds `1/ep` of every expert block (the rest of the
    /// model whole); at stage 3 a rank's shards are `1/dp` of everything either way.
    #[test]
    fn expert_groups_hold_their_share_of_the_experts() {
        let family = crate::bench_cmd::with_layers(crate::bench_cmd::shape("olmoe-1b-7b", 128).unwrap(), Some(2));
        let model = family.model().unwrap();
        let experts: usize = (0..model.num_blocks()).filter(|&b| model.block(b).experts() > 0).flat_map(|b| model.own_params(b).iter().map(|p| p.numel())).sum();
        assert!(experts > model.num_params() / 2, "{experts} of {}", model.num_params());
        let run = |stage, ep| {
            let r = RunShape { micro_batch: 1, seq_len: 128, precision: Precision::from_name("bf16").unwrap(), accumulation: 1, checkpointing: true, world: 4, on_gpu: true, threads: 1, pipe: None, ep, tp: 1, cp: 1 };
            estimate_run(&family, &model, Strategy::new(stage), &r)
        };
        let (one, four) = (run(ferrospeed::config::ZeroStage::Zero, 1), run(ferrospeed::config::ZeroStage::Zero, 4));
        let saved = (one.params - four.params) as f64;
        let want = 0.75 * experts as f64 * 2.0;
        assert!((saved / want - 1.0).abs() < 0.01, "stage 0: ep 4 holds {saved} bytes fewer parameters, expected {want}");
        assert!(four.grads < one.grads && four.state < one.state);
        let (one, four) = (run(ferrospeed::config::ZeroStage::Three, 1), run(ferrospeed::config::ZeroStage::Three, 4));
        assert!((four.state as f64 / one.state as f64 - 1.0).abs() < 0.01, "stage 3: {} vs {}", four.state, one.state);
    }

    /// Tensor parallelism: each rank holds its slices of every split block (the norms whole), so the
    /// Llama-1B shape's parameters, gradients and state per rank at tp 4 are a quarter of tp 1's
    /// within 1%; context parallelism keeps them whole and shrinks the activations.
    #[test]
    fn tensor_parallel_ranks_hold_their_slices_and_context_parallel_ones_their_chunk() {
        let family = crate::bench_cmd::with_layers(crate::bench_cmd::shape("llama-1b", 512).unwrap(), Some(2));
        let model = family.model().unwrap();
        let run = |tp, cp| {
            let r = RunShape { micro_batch: 1, seq_len: 512, precision: Precision::from_name("bf16").unwrap(), accumulation: 1, checkpointing: false, world: 1, on_gpu: true, threads: 1, pipe: None, ep: 1, tp, cp };
            estimate_run(&family, &model, Strategy::new(ferrospeed::config::ZeroStage::Zero), &r)
        };
        let (one, four) = (run(1, 1), run(4, 1));
        for (what, a, b) in [("parameters", one.params, four.params), ("gradients", one.grads, four.grads), ("state", one.state, four.state)] {
            assert!((b as f64 * 4.0 / a as f64 - 1.0).abs() < 0.01, "{what}: tp 4 {b} vs tp 1 {a}");
        }
        let cp = run(1, 4);
        assert!(cp.params == one.params && cp.activations < one.activations, "cp 4: {cp:?} vs {one:?}");
        // Long context: past 2^30 gate/up elements the MLP is tiled, so a token keeps 5·d + q/k/v
        // values a layer, not 3·d_ff more (Llama-1B: d 2048, q/k/v 3072, d_ff 8192; 2 layers, bf16).
        let growth = |t: usize| (family.activations(1, 2 * t, 2).kept - family.activations(1, t, 2).kept) as f64 / t as f64;
        assert_eq!(growth(131_072), 2.0 * (5.0 * 2048.0 + 3072.0) * 2.0, "tiled");
        assert_eq!(growth(1024), 2.0 * (5.0 * 2048.0 + 3072.0 + 3.0 * 8192.0) * 2.0 + 128_256.0 * 4.0, "whole (and the logits)");
    }
}

/// An engine error of `phase` as one line when the GPU ran out of memory anyway: the block, the phase,
/// what the estimate said and the settings to change; any other error unchanged.
pub fn out_of_memory(e: ferrospeed::engine::EngineError, phase: &str, estimate: &(MemoryEstimate, Option<u64>)) -> anyhow::Error {
    let oom = format!("{e:?}").contains("OUT_OF_MEMORY");
    match e {
        ferrospeed::engine::EngineError::Tensor { block, .. } if oom => usage_error(format!(
            "out of GPU memory in block {block} during the {phase}: the estimate was {:.1} GiB per rank (parameters {:.1}, gradients {:.1}, optimizer state {:.1}, activations {:.1}) with {} free; set train.activation_checkpointing = true, a smaller train.micro_batch, a higher zero.stage or zero.offload_optimizer = \"cpu\" (`ferrospeed estimate-memory` shows each)",
            gib(estimate.0.device),
            gib(estimate.0.params),
            gib(estimate.0.grads),
            gib(estimate.0.state),
            gib(estimate.0.activations),
            estimate.1.map_or("unknown".to_string(), |g| format!("{:.1} GiB", gib(g)))
        )),
        e => e.into(),
    }
}
