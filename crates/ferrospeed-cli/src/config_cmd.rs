//! `ferrospeed config --defaults --out FILE [--data PATH]`: a commented config with every section,
//! the defaults a first run needs (the built-in GPT on the shipped corpus, one rank, ZeRO stage 0),
//! validated through the same schema `train` uses before it is written. The interactive
//! questionnaire of `accelerate config` is not built yet (issue 17); this is its non-interactive end.

use crate::usage::usage_error;
use anyhow::Result;
use clap::Args;
use ferrospeed::config::Config;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Args, Debug)]
pub struct ConfigArgs {
    /// Write the defaults without asking (the questionnaire is not available yet)
    #[arg(long, required = true)]
    pub defaults: bool,
    /// Where to write the TOML
    #[arg(long)]
    pub out: PathBuf,
    /// The training text (a file or a folder of text files, or `data prepare` output)
    #[arg(long, default_value = "data/rust-book.txt")]
    pub data: PathBuf,
    /// Replace FILE if it exists
    #[arg(long)]
    pub force: bool,
}

/// The commented TOML of the defaults, training on `data`.
pub fn defaults_toml(data: &str) -> String {
    format!(
        r#"# ferrospeed run configuration, written by `ferrospeed config --defaults`.
# Train with:  ferrospeed launch --nproc-per-node 1 train --config THIS_FILE
# Any key can be overridden on the command line: --set train.steps=50

[model]
kind = "gpt"              # "gpt" (GPT-2 family) or "llama"
n_layer = 2               # transformer layers
n_head = 2                # attention heads (d_model must divide by it)
d_model = 64              # width of the residual stream
seq_len = 64              # tokens per training sequence
vocab = "bytes"           # "bytes", "gpt2", or a tokenizer.json
# init_from = "path/to/hf-model-dir"   # a transformers directory or a llama GGUF file: its shape wins

[data]
path = {data:?}
# packing = true          # prepared data only: pack documents, attention stays inside each
# allow_binary = false    # refuse raw files that are not text

[train]
steps = 50
global_batch = 8          # sequences per optimizer step, all ranks together
micro_batch = 4           # sequences per rank per forward; accumulation = global / (micro × ranks)
lr = 3e-3
warmup = 5
weight_decay = 0.1
grad_clip = 1.0           # 0 disables clipping
seed = 1234
precision = "fp32"        # "fp32", "bf16", or "fp16" (dynamic loss scaling)
activation_checkpointing = true   # recompute each block in the backward: less memory, ~30% more compute
device = "auto"           # "auto" (the GPU of LOCAL_RANK when built with --features cuda), "cpu", "cuda"

[zero]
stage = 0                 # 0 (DDP), 1 (optimizer state sharded), 2 (+ gradients), 3 (+ parameters)
offload_optimizer = "none"   # "none", "cpu" or "nvme": where the fp32 optimizer state lives
offload_ratio = 1.0       # share of the optimizer state offloaded, in (0, 1]
# nvme_dir = "/path/on/fast/disk"   # needed when an offload is "nvme"

[checkpoint]
dir = "runs/default/ckpt" # remove to train without checkpoints
every = 10                # steps between checkpoints (0: only at the end)
keep = 3                  # checkpoints kept, the oldest removed
resume = true             # continue from the latest checkpoint (the same command continues a run)

[track]
dir = "runs/default"      # metrics.jsonl, config.json, summary.json, and the backends below
backends = ["tensorboard"]   # any of "tensorboard", "csv", "mlflow"
"#
    )
}

pub fn run(args: ConfigArgs) -> Result<ExitCode> {
    if args.out.exists() && !args.force {
        return Err(usage_error(format!("{} exists: choose another --out, or pass --force to replace it", args.out.display())));
    }
    let text = defaults_toml(&args.data.display().to_string());
    // Validated exactly as `train` will read it: nothing is written if it would not train.
    Config::from_toml_str(&text, &args.out.display().to_string(), &[]).map_err(|e| usage_error(format!("{e} (pass --data PATH to train on other text)")))?;
    std::fs::write(&args.out, text).map_err(|e| usage_error(format!("cannot write {}: {e}", args.out.display())))?;
    println!("wrote {}; train with: ferrospeed launch --nproc-per-node 1 train --config {}", args.out.display(), args.out.display());
    Ok(ExitCode::SUCCESS)
}
