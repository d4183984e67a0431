//! `ferrospeed checkpoint inspect|export`: look inside a checkpoint, or consolidate it into one
//! safetensors file with HuggingFace GPT-2 names.

use crate::usage::usage_error;
use anyhow::Result;
use clap::Subcommand;
use ferrospeed::checkpoint::{self, Meta};
use ferrospeed::accelerator::ParamNames;
use ferrospeed_models::gpt::HF_NAMES;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

#[derive(Subcommand, Debug)]
pub enum CheckpointCommand {
    /// Print a summary of a checkpoint (a step-NNNNNNNN folder, or a checkpoint.dir with `latest`)
    Inspect {
        path: PathBuf,
        /// Also verify every file's checksum
        #[arg(long)]
        verify: bool,
    },
    /// Write the weights as one safetensors file with HuggingFace GPT-2 names, one block at a time
    Export { path: PathBuf, out: PathBuf },
}

/// The names a checkpoint's parameters are exported under: the ones its run recorded (`param_names`);
/// checkpoints from before that record are the built-in GPT's, with HuggingFace GPT-2 names.
fn export_names(meta: &checkpoint::Meta) -> fn(&str, &str) -> String {
    let tag = meta.run.get("param_names").and_then(|t| t.as_str());
    let gpt = meta.run.get("model").and_then(|m| m.get("kind")).and_then(|k| k.as_str()) == Some("gpt");
    match tag {
        Some(t) if t == HF_NAMES.tag => HF_NAMES.map,
        None if gpt => HF_NAMES.map,
        _ => ParamNames::BLOCK.map,
    }
}

pub fn run(cmd: CheckpointCommand) -> Result<ExitCode> {
    match cmd {
        CheckpointCommand::Inspect { path, verify } => {
            let dir = checkpoint::resolve(&path).map_err(|e| usage_error(e.to_string()))?;
            let meta = if verify { checkpoint::verify(&dir)? } else { checkpoint::read_meta(&dir)? };
            print!("{}", summary(&dir, &meta));
            if verify {
                println!("verified: every file matches its checksum");
            }
        }
        CheckpointCommand::Export { path, out } => {
            let dir = checkpoint::resolve(&path).map_err(|e| usage_error(e.to_string()))?;
            let t0 = Instant::now();
            let names = export_names(&checkpoint::read_meta(&dir)?);
            let stats = checkpoint::export(&dir, &out, &names)?;
            println!(
                "exported {} tensors ({:.1} MB) to {} in {:.1} s; largest block in memory {:.1} MB; peak memory {:.1} MB",
                stats.tensors,
                stats.bytes as f64 / 1e6,
                out.display(),
                t0.elapsed().as_secs_f64(),
                stats.largest_block_bytes as f64 / 1e6,
                ferrospeed::track::peak_rss_bytes() as f64 / 1e6
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn summary(dir: &std::path::Path, meta: &Meta) -> String {
    let params: usize = meta.blocks.iter().map(|b| b.numel).sum();
    let mut out = format!(
        "checkpoint {}\n  step {} ({} samples), saved by {} rank(s), ZeRO stage {}, {}\n",
        dir.display(),
        meta.step,
        meta.samples,
        meta.world_size,
        meta.zero_stage,
        meta.precision
    );
    if let Some(s) = &meta.loss_scaler {
        out += &format!("  loss scale {} ({} steps skipped)\n", s.scale, s.skipped);
    }
    out += &format!("  {} blocks, {} parameters ({:.2}M)\n", meta.blocks.len(), params, params as f64 / 1e6);
    if let Some(model) = meta.run.get("model") {
        out += &format!("  model {model}\n");
    }
    for f in &meta.files {
        out += &format!("  {} {} bytes crc32c {:08x}\n", f.name, f.bytes, f.crc32c);
    }
    out
}
