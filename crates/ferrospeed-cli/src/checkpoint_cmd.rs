//! `ferrospeed checkpoint inspect|export`: look inside a checkpoint, or export it: as a directory
//! transformers' `from_pretrained` loads (config.json, sharded safetensors with their index, the
//! tokenizer files), or as one f32 safetensors file when OUT ends in `.safetensors`.

use crate::usage::usage_error;
use anyhow::Result;
use clap::Subcommand;
use ferrospeed::checkpoint::{self, Meta};
use ferrospeed::accelerator::ParamNames;
use ferrospeed::checkpoint::{DirExport, WeightDtype};
use ferrospeed_models::gpt::HF_NAMES;
use ferrospeed_models::hf::TOKENIZER_FILES;
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
    /// Write the weights as a transformers model directory (or one f32 file if OUT ends in .safetensors),
    /// with transformers' names, one block at a time
    Export {
        path: PathBuf,
        out: PathBuf,
        /// Element type of the written weights: bf16 (default), f16 or f32
        #[arg(long, default_value = "bf16")]
        dtype: String,
        /// Largest shard file in GB (transformers' max_shard_size)
        #[arg(long, default_value_t = 5.0)]
        max_shard_gb: f64,
        /// A LoRA run's adapters as a PEFT directory (adapter_config.json, adapter_model.safetensors)
        /// that PeftModel.from_pretrained loads over the base
        #[arg(long)]
        adapter: bool,
        /// A LoRA run's adapters merged into their base (W + s·B·A) as a transformers directory, in
        /// the base's element type
        #[arg(long, conflicts_with = "adapter")]
        merge: bool,
    },
}

/// The names a checkpoint's parameters are exported under: the ones its run recorded (`param_names`);
/// checkpoints from before that record are the built-in GPT's, with HuggingFace GPT-2 names.
pub(crate) fn export_names(meta: &checkpoint::Meta) -> fn(&str, &str) -> String {
    let tag = meta.run.get("param_names").and_then(|t| t.as_str());
    let kind = meta.run.get("model").and_then(|m| m.get("kind"));
    let gpt = kind.and_then(|k| k.as_str()) == Some("gpt") || kind.is_some_and(|k| k.is_null()) && tag.is_none();
    match tag {
        Some(t) if t == HF_NAMES.tag => HF_NAMES.map,
        Some(t) if t == ferrospeed_models::llama::HF_NAMES.tag => ferrospeed_models::llama::HF_NAMES.map,
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
        CheckpointCommand::Export { path, out, dtype, max_shard_gb, adapter, merge } => {
            let dir = checkpoint::resolve(&path).map_err(|e| usage_error(e.to_string()))?;
            let t0 = Instant::now();
            let meta = checkpoint::read_meta(&dir)?;
            let names = export_names(&meta);
            if crate::lora_export::recorded(&meta).is_some() && !adapter && !merge {
                return Err(usage_error(format!(
                    "{} holds LoRA adapters, not a whole model: export them with --adapter (a PEFT directory to load over the base), or --merge (merged into the base)",
                    dir.display()
                )));
            }
            if !(max_shard_gb > 0.0) {
                return Err(usage_error(format!("--max-shard-gb {max_shard_gb} must be positive")));
            }
            let weight_dtype = |d: &str| match d {
                "bf16" => Ok((WeightDtype::Bf16, "bfloat16")),
                "f16" => Ok((WeightDtype::F16, "float16")),
                "f32" => Ok((WeightDtype::F32, "float32")),
                other => Err(usage_error(format!("--dtype {other} is not a weight type: use bf16, f16 or f32"))),
            };
            let stats = if adapter {
                crate::lora_export::export_adapter(&dir, &out, &meta, weight_dtype(&dtype)?.0)?
            } else if merge {
                let files = dir_files(&meta, "float32")?;
                crate::lora_export::export_merged(&dir, &out, &meta, (max_shard_gb * 1e9) as u64, files).map_err(|e| match e.downcast::<checkpoint::CheckpointError>() {
                    Ok(e @ checkpoint::CheckpointError::Exists { .. }) => usage_error(e.to_string()),
                    Ok(e) => e.into(),
                    Err(e) => e,
                })?
            } else if out.extension().is_some_and(|e| e == "safetensors") {
                checkpoint::export(&dir, &out, &names)?
            } else {
                let (dtype, torch) = weight_dtype(&dtype)?;
                if !(max_shard_gb > 0.0) {
                    return Err(usage_error(format!("--max-shard-gb {max_shard_gb} must be positive")));
                }
                let files = dir_files(&meta, torch)?;
                // Experts in the layout of the source, as the run recorded it (transformers 5's fused
                // tensors where it recorded none).
                let layout = meta.run.get("expert_layout").and_then(|v| v.as_str()).and_then(ferrospeed_models::llama::ExpertLayout::from_name);
                let regroup = move |params: &[(String, Vec<usize>)]| ferrospeed_models::llama::ExpertLayout::regroup(layout, params);
                let opts = DirExport { name_of: &names, dtype, max_shard_bytes: (max_shard_gb * 1e9) as u64, files, single_file: None, regroup: Some(&regroup) };
                checkpoint::export_dir(&dir, &out, &opts).map_err(|e| match e {
                    checkpoint::CheckpointError::Exists { .. } => usage_error(e.to_string()),
                    e => e.into(),
                })?
            };
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

/// The files of an exported directory besides the weights: `config.json` (the one the run recorded:
/// its source's own, or the model's shape; in `torch_dtype`), and the tokenizer files of the run's
/// tokenizer or model directory.
pub(crate) fn dir_files(meta: &Meta, torch_dtype: &str) -> Result<Vec<(String, Vec<u8>)>> {
    let mut config = meta.run.get("hf_config").cloned().ok_or_else(|| {
        usage_error("this checkpoint does not record its model's config.json (saved before HuggingFace export existed): export to a FILE.safetensors instead")
    })?;
    ferrospeed_models::hf::set_dtype(&mut config, torch_dtype);
    let mut files = vec![("config.json".to_string(), serde_json::to_vec_pretty(&config)?)];
    let from = |key: &str| meta.run.get(key).and_then(|v| v.as_str()).map(std::path::PathBuf::from);
    // The model directory's tokenizer files, with the run's own tokenizer.json (model.tokenizer) first.
    if let Some(tok) = from("tokenizer").filter(|t| t.is_file()) {
        files.push(("tokenizer.json".to_string(), std::fs::read(&tok)?));
    }
    // The tokenizer.json's own directory (a run directory's tokenizer/ for a GGUF model), then the model's.
    let beside = from("tokenizer").and_then(|t| t.parent().map(std::path::Path::to_path_buf));
    for src in beside.into_iter().chain(from("init_from_dir")) {
        for name in TOKENIZER_FILES {
            let path = src.join(name);
            if path.is_file() && !files.iter().any(|(n, _)| n == name) {
                files.push((name.to_string(), std::fs::read(&path)?));
            }
        }
    }
    Ok(files)
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
