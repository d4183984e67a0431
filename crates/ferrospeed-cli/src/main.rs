//! The `ferrospeed` command: `launch` starts ranks, `comm` checks and measures collectives.

mod bench_adamw;
mod estimate_cmd;
mod runs_cmd;
mod config_cmd;
mod config_wizard;
mod bench_cmd;
mod checkpoint_cmd;
mod comm_cmd;
mod data_cmd;
mod env_cmd;
mod generate_cmd;
mod launch;
mod lora_export;
mod plot_cmd;
mod train;
mod train_data;
mod usage;

use clap::{Parser, Subcommand};
use std::process::ExitCode;
use usage::UsageError;

#[derive(Parser)]
#[command(name = "ferrospeed", version, about = "Distributed training for Rust: launch ranks, check collectives")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start N ranks of PROGRAM on this node (torchrun-style environment); stop them all if one fails
    Launch(launch::LaunchArgs),
    /// Train a model from a TOML config (run it under `launch` for several ranks)
    Train(train::TrainArgs),
    /// Measure training throughput on a synthetic GPT-2- or Llama-shaped model (random tokens), as JSON
    BenchTrain(bench_cmd::BenchTrainArgs),
    /// Measure the CPU AdamW (parameters/s, GB/s) against this host's memory bandwidth, as JSON
    BenchAdamw(bench_adamw::BenchAdamwArgs),
    /// GPU, host and NVMe memory per rank of a config for every ZeRO stage and offload choice
    EstimateMemory(estimate_cmd::EstimateArgs),
    /// Write a commented, validated run config: asks on a terminal, or --defaults
    Config(config_cmd::ConfigArgs),
    /// List the runs of a folder: steps, final loss, tokens/s, status
    Runs(runs_cmd::RunsArgs),
    /// Draw runs' metrics as one PNG: loss, learning rate, gradient norm, throughput, memory over steps
    Plot(plot_cmd::PlotArgs),
    /// Print what a bug report needs: version, features, devices, driver, libraries
    Env,
    /// Generate text from a Llama (checkpoint, transformers directory or GGUF file), with a KV cache
    Generate(generate_cmd::GenerateArgs),
    /// Prepare training data: tokenize text and JSONL into token shards
    #[command(subcommand)]
    Data(data_cmd::DataCommand),
    /// Inspect or export checkpoints
    #[command(subcommand)]
    Checkpoint(checkpoint_cmd::CheckpointCommand),
    /// Check collectives against a single-process reference, or measure their bandwidth
    #[command(subcommand)]
    Comm(comm_cmd::CommCommand),
}

fn main() -> ExitCode {
    if std::env::args().nth(1).as_deref() == Some(launch::guard::GUARD_COMMAND) {
        return launch::guard::run();
    }
    keep_freed_memory();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage::report_clap_error(e),
    };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("FERROSPEED_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Launch(args) => launch::run(args),
        Command::Comm(cmd) => comm_cmd::run(cmd),
        Command::Train(args) => train::run(args),
        Command::Checkpoint(cmd) => checkpoint_cmd::run(cmd),
        Command::Data(cmd) => data_cmd::run(cmd),
        Command::Generate(args) => generate_cmd::run(args),
        Command::Env => env_cmd::run(),
        Command::EstimateMemory(args) => estimate_cmd::run(args),
        Command::Runs(args) => runs_cmd::run(args),
        Command::Plot(args) => plot_cmd::run(args),
        Command::Config(args) => config_cmd::run(args),
        Command::BenchTrain(args) => bench_cmd::run(args),
        Command::BenchAdamw(args) => bench_adamw::run(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            if e.downcast_ref::<UsageError>().is_some() {
                eprintln!("error: {e}");
                ExitCode::from(2)
            } else {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        }
    }
}

/// Training allocates and frees the same large activation buffers every step. glibc's default hands
/// big blocks back to the kernel (mmap/munmap), so each step pays page faults and zeroing again;
/// keeping freed memory in the heap made CPU training about 40% faster (see bench/results).
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only tunes the allocator; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}
