//! The questions of `ferrospeed config` (as `accelerate config` asks them): compute, ZeRO, offload,
//! precision, activation checkpointing, model, data, batch sizes, steps, checkpoints. Each answer is
//! put into the [`Answers`] and the whole config is validated through the schema `train` uses; an
//! answer the schema refuses is asked again with its one-line error. Keys not asked yet keep their
//! defaults, and their errors wait for their own question (`ConfigError::key`).
//!
//! The prompts are `dialoguer`'s: it draws with `console`, which `indicatif` (our progress bars)
//! already brings in, and its `Input::validate_with` re-asks with a message, which is the behaviour
//! wanted here; `inquire` would add `crossterm` for the same prompts.

use crate::config_cmd::{Answers, ModelChoice};
use anyhow::{Context, Result};
use dialoguer::theme::SimpleTheme;
use dialoguer::{Confirm, Input, Select};
use ferrospeed::config::{Config, DeviceChoice, Offload, Precision, ZeroStage};
use std::path::Path;

/// The built-in GPT sizes offered: label, layers, heads, width, default sequence length.
const GPT_SIZES: [(&str, usize, usize, usize, usize); 3] = [
    ("built-in GPT, tiny: 2 layers × 64 wide (a first run, seconds on a CPU)", 2, 2, 64, 64),
    ("built-in GPT, GPT-2 small: 12 layers × 768, 124M parameters", 12, 12, 768, 1024),
    ("built-in GPT, GPT-2 medium: 24 layers × 1024, 350M parameters", 24, 16, 1024, 1024),
];

struct Wizard {
    answers: Answers,
    /// The keys answered so far: errors about them are the answer's fault.
    asked: Vec<&'static str>,
    source: String,
}

/// Asks every question on the terminal and returns the answers for a config to be written to `out`.
pub fn ask(out: &Path, data: &str) -> Result<Answers> {
    let stem = out.file_stem().map_or_else(|| "run".into(), |s| s.to_string_lossy().into_owned());
    let answers = Answers {
        written_by: "ferrospeed config",
        checkpoint: Some((format!("runs/{stem}/ckpt"), 10)),
        track_dir: format!("runs/{stem}"),
        ..Answers::defaults(data)
    };
    let mut w = Wizard { answers, asked: Vec::new(), source: out.display().to_string() };
    w.compute()?;
    w.zero()?;
    w.precision()?;
    w.model()?;
    w.ask("Training data (a text file or folder, or `data prepare` output)", data.into(), &["data.path"], |a, s| {
        a.data = s.into();
        Ok(())
    }, no_more)?;
    w.batches()?;
    w.ask("Optimizer steps", w.answers.steps.to_string(), &["train.steps", "train.warmup"], |a, s| number(s).map(|v| a.steps = v), no_more)?;
    w.checkpoints()?;
    let cfg = w.answers.validate(&w.source).map_err(|e| crate::usage::usage_error(e.to_string()))?;
    w.show_estimate(&cfg);
    Ok(w.answers)
}

/// A whole number, or the one-line reason it is not; its range is the schema's to judge.
fn number(s: &str) -> Result<usize, String> {
    s.trim().parse::<usize>().map_err(|_| format!("{s:?} is not a whole number"))
}

/// A share such as 0.5, or the one-line reason it is not a number; its range is the schema's to judge.
fn share(s: &str) -> Result<f64, String> {
    s.trim().parse::<f64>().map_err(|_| format!("{s:?} is not a number: give e.g. 0.5 or 1.0"))
}

/// A count of the launcher's (processes, nodes: not config keys), at least 1.
fn count(s: &str) -> Result<usize, String> {
    number(s).and_then(|n| if n > 0 { Ok(n) } else { Err("must be at least 1".into()) })
}

/// No check beyond the schema's.
fn no_more(_: &Answers, _: &Config) -> Result<(), String> {
    Ok(())
}

impl Wizard {
    /// The config with `a`'s answers, or the error that is an answered key's fault (`Ok(None)`: the
    /// only error is about a key still to be asked).
    fn check(&self, a: &Answers) -> Result<Option<Config>, String> {
        match a.validate(&self.source) {
            Ok(cfg) => Ok(Some(cfg)),
            Err(e) if e.key().is_some_and(|k| !self.asked.contains(&k)) => Ok(None),
            Err(e) => Err(e.to_string()),
        }
    }

    /// One typed answer for `keys`: `apply` puts it into the answers, then the schema and `more`
    /// judge it; a refused answer is asked again with the reason.
    fn ask<F, M>(&mut self, prompt: &str, default: String, keys: &[&'static str], apply: F, more: M) -> Result<()>
    where
        F: Fn(&mut Answers, &str) -> Result<(), String>,
        M: Fn(&Answers, &Config) -> Result<(), String>,
    {
        self.asked.extend_from_slice(keys);
        let judge = |text: &str| -> Result<Answers, String> {
            let mut candidate = self.answers.clone();
            apply(&mut candidate, text)?;
            if let Some(cfg) = self.check(&candidate)? {
                more(&candidate, &cfg)?;
            }
            Ok(candidate)
        };
        let mut input = Input::with_theme(&SimpleTheme).with_prompt(prompt);
        if !default.is_empty() {
            input = input.default(default);
        }
        let text: String = input.validate_with(|s: &String| judge(s).map(|_| ())).interact_text().context("reading an answer (nothing written)")?;
        self.answers = judge(&text).map_err(anyhow::Error::msg)?;
        Ok(())
    }

    fn choose(&self, prompt: &str, items: &[&str], default: usize) -> Result<usize> {
        Select::with_theme(&SimpleTheme).with_prompt(prompt).items(items).default(default).interact().context("reading an answer (nothing written)")
    }

    fn confirm(&self, prompt: &str, default: bool) -> Result<bool> {
        Confirm::with_theme(&SimpleTheme).with_prompt(prompt).default(default).wait_for_newline(true).interact().context("reading an answer (nothing written)")
    }

    fn compute(&mut self) -> Result<()> {
        let gpu = self.choose("Where does it train?", &["CPU", "GPUs (CUDA; needs a build with --features cuda)"], 0)? == 1;
        self.answers.device = if gpu { DeviceChoice::Cuda } else { DeviceChoice::Cpu };
        self.asked.push("train.device");
        let per_node = if gpu { "Processes per node (one per GPU)" } else { "Processes per node" };
        self.ask(per_node, "1".into(), &[], |a, s| count(s).map(|v| a.num_procs_per_node = v), no_more)?;
        self.ask("Nodes (machines)", "1".into(), &[], |a, s| count(s).map(|v| a.num_nodes = v), no_more)?;
        self.asked.push("parallel.pp");
        if self.answers.world_size() == 1 {
            return Ok(());
        }
        // The mesh's own check (the stages must divide the ranks), whatever is still unanswered.
        let prompt = format!("Pipeline stages (parallel.pp; 1: every rank holds the whole model; must divide the {} ranks)", self.answers.world_size());
        self.ask(&prompt, "1".into(), &["parallel.pp"], |a, s| {
            let pp = count(s)?;
            ferrospeed::parallel::Mesh::new(a.world_size(), pp, 1, 1, 1).map_err(|e| e.to_string())?;
            a.pp = pp;
            Ok(())
        }, no_more)
    }

    fn zero(&mut self) -> Result<()> {
        let stages = [
            "0: every rank holds everything (DDP)",
            "1: the optimizer state is sharded over the ranks",
            "2: the optimizer state and the gradients are sharded",
            "3: parameters too (gathered block by block)",
        ];
        let stage = self.choose("ZeRO stage", &stages, 0)?;
        self.answers.zero_stage = ZeroStage::from_int(stage as i64).context("a listed stage")?;
        self.asked.push("zero.stage");
        let offload = match self.choose("Optimizer state offload", &["none: on the device", "cpu: in host memory", "nvme: in files on a fast disk"], 0)? {
            0 => Offload::None,
            1 => Offload::Cpu,
            _ => Offload::Nvme,
        };
        self.answers.offload = offload;
        self.asked.push("zero.offload_optimizer");
        if offload == Offload::None {
            return Ok(());
        }
        if offload == Offload::Nvme {
            self.ask("Folder for the optimizer state files (zero.nvme_dir)", "/tmp".into(), &["zero.nvme_dir"], |a, s| {
                a.nvme_dir = Some(s.into());
                Ok(())
            }, no_more)?;
        }
        self.ask("Share of the optimizer state offloaded, in (0, 1]", "1.0".into(), &["zero.offload_ratio"], |a, s| {
            a.offload_ratio = share(s)?;
            Ok(())
        }, no_more)?;
        if offload != Offload::Nvme {
            return Ok(());
        }
        let all = format!("{:?}", self.answers.offload_ratio);
        self.ask("Share of the whole optimizer state in NVMe files, at most the offloaded share (the offloaded rest stays in host memory)", all, &["zero.nvme_ratio"], |a, s| {
            let q = share(s)?;
            a.nvme_ratio = (q != a.offload_ratio).then_some(q);
            Ok(())
        }, no_more)
    }

    fn precision(&mut self) -> Result<()> {
        let gpu = self.answers.device == DeviceChoice::Cuda;
        let choice = self.choose("Precision", &["fp32", "bf16", "fp16 (dynamic loss scaling)"], usize::from(gpu))?;
        self.answers.precision = [Precision::Fp32, Precision::Bf16, Precision::Fp16][choice];
        self.asked.push("train.precision");
        self.answers.activation_checkpointing = self.confirm("Activation checkpointing (recompute blocks in the backward: less memory, ~30% more compute)?", true)?;
        self.asked.push("train.activation_checkpointing");
        Ok(())
    }

    fn model(&mut self) -> Result<()> {
        let mut items: Vec<&str> = GPT_SIZES.iter().map(|s| s.0).collect();
        items.push("a transformers directory or a llama GGUF file (model.init_from)");
        let choice = self.choose("Model", &items, 0)?;
        let seq_default = if let Some(&(_, n_layer, n_head, d_model, seq)) = GPT_SIZES.get(choice) {
            self.answers.model = ModelChoice::Gpt { n_layer, n_head, d_model };
            seq
        } else {
            let family = |_: &Answers, cfg: &Config| ferrospeed_models::Family::from_config(&cfg.model).map(|_| ()).map_err(|e| e.to_string());
            self.ask("Model directory or GGUF file", String::new(), &["model.init_from", "model.kind"], |a, s| {
                let path = s.trim();
                if !Path::new(path).is_dir() && !path.ends_with(".gguf") {
                    return Err(format!("{path:?} is not a directory: give a transformers model directory (config.json, safetensors) or a llama .gguf file"));
                }
                a.model = ModelChoice::InitFrom(path.into());
                Ok(())
            }, family)?;
            512
        };
        self.asked.extend(["model.n_layer", "model.n_head", "model.d_model"]);
        self.ask("Sequence length (tokens per sample)", seq_default.to_string(), &["model.seq_len"], |a, s| number(s).map(|v| a.seq_len = v), no_more)
    }

    fn batches(&mut self) -> Result<()> {
        self.ask("Global batch (sequences per optimizer step, all ranks together)", self.answers.global_batch.to_string(), &["train.global_batch"], |a, s| number(s).map(|v| a.global_batch = v), no_more)?;
        let accumulation = |a: &Answers, cfg: &Config| cfg.accumulation_steps(a.data_parallel_size()).map(|_| ()).map_err(|e| e.to_string());
        let default = self.answers.micro_batch.min(self.answers.global_batch).to_string();
        self.ask("Micro-batch (sequences per rank per forward)", default, &["train.micro_batch"], |a, s| number(s).map(|v| a.micro_batch = v), accumulation)?;
        let a = &self.answers;
        eprintln!(
            "  gradient accumulation steps = global batch / (micro-batch × {}ranks) = {} / ({} × {}) = {}",
            if a.pp > 1 { "data-parallel " } else { "" },
            a.global_batch,
            a.micro_batch,
            a.data_parallel_size(),
            a.global_batch / (a.micro_batch * a.data_parallel_size())
        );
        Ok(())
    }

    fn checkpoints(&mut self) -> Result<()> {
        self.asked.extend(["checkpoint.dir", "checkpoint.every"]);
        let Some((dir, every)) = self.answers.checkpoint.clone() else { return Ok(()) };
        if !self.confirm("Save checkpoints (a run that dies continues from the latest)?", true)? {
            self.answers.checkpoint = None;
            return Ok(());
        }
        self.ask("Checkpoint folder", dir, &[], |a, s| {
            a.checkpoint = Some((s.trim().into(), every));
            Ok(())
        }, no_more)?;
        self.ask("Steps between checkpoints (0: only at the end)", every.to_string(), &[], |a, s| {
            a.checkpoint.as_mut().expect("asked with a folder").1 = number(s)?;
            Ok(())
        }, no_more)
    }

    /// The memory per rank the config needs, where the model's shape is known here.
    fn show_estimate(&self, cfg: &Config) {
        let on_gpu = self.answers.device == DeviceChoice::Cuda;
        match crate::estimate_cmd::estimate_config(cfg, self.answers.world_size(), on_gpu) {
            Ok((params, e)) => {
                let gib = crate::estimate_cmd::gib;
                let gpu = if on_gpu { format!("GPU {:.2} GiB, ", gib(e.device)) } else { String::new() };
                eprintln!(
                    "  memory per rank (estimate, {:.1}M parameters): {gpu}host {:.2} GiB, NVMe {:.2} GiB; `ferrospeed estimate-memory --config FILE` compares every stage and offload",
                    params as f64 / 1e6,
                    gib(e.host),
                    gib(e.nvme)
                );
            }
            Err(e) => eprintln!("  (no memory estimate: {e})"),
        }
    }
}
