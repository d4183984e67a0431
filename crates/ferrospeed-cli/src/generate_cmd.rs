//! `ferrospeed generate --model CKPT_OR_DIR_OR_GGUF --prompt "…" [--chat]`: text from a Llama or GPT-2
//! with a key/value cache, on the CPU or a GPU, greedy or top-p. A checkpoint is first exported (f32) to a
//! temporary transformers directory, as `checkpoint export` would write it.

use crate::checkpoint_cmd::{dir_files, export_names};
use crate::usage::usage_error;
use anyhow::Result;
use clap::Args;
use ferrospeed::checkpoint::{self, DirExport, WeightDtype, WeightFiles};
use ferrospeed::device::DeviceChoice;
use ferrospeed::rng::Rng;
use ferrospeed_models::gguf::GgufFile;
use ferrospeed_models::hf::{read_config, HfModel};
use ferrospeed_models::gpt::infer::GptInfer;
use ferrospeed_models::infer::{Generator, Sampler};
use ferrospeed_models::llama::infer::LlamaInfer;
use ferrospeed_models::prepared::{ChatTemplate, Message};
use ferrospeed_models::{Family, Gpt, Llama, Tokenizer};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// A checkpoint (or checkpoint.dir), a transformers model directory, or a llama .gguf file
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long)]
    pub prompt: String,
    /// Render the prompt as a user message with the tokenizer's chat template
    #[arg(long)]
    pub chat: bool,
    /// A system message (with --chat)
    #[arg(long)]
    pub system: Option<String>,
    /// New tokens at most, 1 or more (generation stops at EOS)
    #[arg(long, default_value_t = 128, value_parser = max_tokens, allow_negative_numbers = true)]
    pub max_tokens: usize,
    /// A finite number ≥ 0; 0 is greedy
    #[arg(long, default_value_t = 0.0, value_parser = temperature, allow_negative_numbers = true)]
    pub temperature: f64,
    /// Nucleus sampling: keep the most likely tokens up to this probability (above 0, at most 1)
    #[arg(long, default_value_t = 0.9, value_parser = top_p, allow_negative_numbers = true)]
    pub top_p: f64,
    /// A whole number from 0 to 2^64 − 1
    #[arg(long, default_value_t = 0, value_parser = seed, allow_negative_numbers = true)]
    pub seed: u64,
    /// auto (a GPU when there is one), cpu or cuda
    #[arg(long, default_value = "auto")]
    pub device: String,
}

fn max_tokens(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err("it must be a whole number of tokens, 1 or more".into()),
    }
}

fn seed(s: &str) -> Result<u64, String> {
    s.parse::<u64>().map_err(|_| format!("it must be a whole number from 0 to {}", u64::MAX))
}

fn number(s: &str) -> Result<f64, String> {
    s.parse::<f64>().map_err(|_| "it must be a number".to_string())
}

fn temperature(s: &str) -> Result<f64, String> {
    Sampler::check_temperature(number(s)?).map_err(|e| e.to_string())
}

fn top_p(s: &str) -> Result<f64, String> {
    Sampler::check_top_p(number(s)?).map_err(|e| e.to_string())
}

/// Positions the rotary tables of a model without a limit of its own cover.
const DEFAULT_CONTEXT: usize = 4096;
/// Rotary tables beyond this are not built (a model may declare 128k positions).
const MAX_CONTEXT: usize = 32_768;

/// The model's shape, weights and tokenizer, from whichever source `path` is; Llama contexts are the
/// model's own (`llama.context_length`, `max_position_embeddings`), at most [`MAX_CONTEXT`]. The
/// weights are checked against the shape as `train` checks them: every tensor there with its shape,
/// none left unused.
fn open(path: &Path, tmp: &tempfile::TempDir) -> Result<(HfModel, WeightFiles, Tokenizer)> {
    let (cfg, weights, tok) = open_unchecked(path, tmp)?;
    let family = match cfg {
        HfModel::Llama(c) => Family::Llama(Llama::new(c)),
        HfModel::Gpt(c) => Family::Gpt(Gpt::new(c)),
    };
    if let Some(note) = family.check_inputs(Some(&weights), &tok, "the weights of --model").map_err(usage_error)? {
        eprintln!("warning: {note}");
    }
    let files = ferrospeed_models::llama::open_weights(&weights).map_err(|e| usage_error(format!("--model {}: {e}", path.display())))?;
    Ok((cfg, files, tok))
}

/// [`open`] before the check: the shape, where the weights are, the tokenizer.
fn open_unchecked(path: &Path, tmp: &tempfile::TempDir) -> Result<(HfModel, PathBuf, Tokenizer)> {
    let bad = |e: String| usage_error(format!("--model {}: {e}", path.display()));
    if path.extension().is_some_and(|e| e == "gguf") {
        let g = GgufFile::open(path).map_err(|e| bad(e.reason))?;
        let cfg = g.llama_config(g.context_length().unwrap_or(DEFAULT_CONTEXT).min(MAX_CONTEXT)).map_err(|e| bad(e.reason))?;
        let tok = g.tokenizer().map_err(|e| bad(e.reason))?;
        return Ok((HfModel::Llama(cfg), path.to_path_buf(), tok));
    }
    let dir = if path.join("config.json").is_file() {
        path.to_path_buf()
    } else {
        let ckpt = checkpoint::resolve(path).map_err(|e| bad(format!("not a model directory, GGUF file or checkpoint ({e})")))?;
        let meta = checkpoint::read_meta(&ckpt)?;
        let out = tmp.path().join("model");
        if crate::lora_export::recorded(&meta).is_some() {
            // A LoRA run's adapters, merged into their base for generation.
            crate::lora_export::export_merged(&ckpt, &out, &meta, u64::MAX, dir_files(&meta, "float32")?)?;
        } else {
            let names = export_names(&meta);
            let opts = DirExport { name_of: &names, dtype: WeightDtype::F32, max_shard_bytes: u64::MAX, files: dir_files(&meta, "float32")?, single_file: None, regroup: None };
            checkpoint::export_dir(&ckpt, &out, &opts)?;
        }
        out
    };
    let declared: Option<usize> = std::fs::read_to_string(dir.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|c| c.get("max_position_embeddings").and_then(|v| v.as_u64()))
        .map(|v| v as usize);
    let cfg = read_config(&dir, declared.unwrap_or(DEFAULT_CONTEXT).min(MAX_CONTEXT)).map_err(|e| bad(e.to_string()))?;
    let tok_path = dir.join("tokenizer.json");
    let vocab = match &cfg {
        HfModel::Llama(c) => c.vocab_size,
        HfModel::Gpt(c) => c.vocab_size,
    };
    let tok = if tok_path.is_file() {
        Tokenizer::from_file(&tok_path).map_err(|e| bad(e.to_string()))?
    } else if vocab == ferrospeed_models::ByteTokenizer::VOCAB_SIZE {
        Tokenizer::Bytes
    } else {
        return Err(bad(format!("no tokenizer.json for its vocabulary of {vocab} (the run's tokenizer files were moved or deleted?): copy the model's tokenizer files beside its config.json")));
    };
    Ok((cfg, dir, tok))
}

pub fn run(args: GenerateArgs) -> Result<ExitCode> {
    let choice = DeviceChoice::from_name(&args.device).ok_or_else(|| usage_error(format!("--device {} is not one of auto, cpu, cuda", args.device)))?;
    let device = ferrospeed::device::select(choice, 0).map_err(usage_error)?;
    let tmp = tempfile::tempdir()?;
    let (cfg, mut files, tok) = open(&args.model, &tmp)?;
    let t0 = Instant::now();
    let model: Box<dyn Generator> = match cfg {
        HfModel::Llama(c) => Box::new(LlamaInfer::load(c, &mut files, &device, c.seq_len).map_err(|e| usage_error(format!("--model {}: {e}", args.model.display())))?),
        HfModel::Gpt(c) => Box::new(GptInfer::load(c, &mut files, &device).map_err(|e| usage_error(format!("--model {}: {e}", args.model.display())))?),
    };
    let load_s = t0.elapsed().as_secs_f64();
    let text = if args.chat {
        let s = tok.specials();
        let template = s.chat_template.as_deref().ok_or_else(|| usage_error(format!("--chat: the tokenizer of {} has no chat template", args.model.display())))?;
        let t = ChatTemplate::new(template, s.bos.as_deref().unwrap_or(""), s.eos.as_ref().map_or("", |e| e.0.as_str())).map_err(usage_error)?;
        let mut messages = Vec::new();
        if let Some(sys) = &args.system {
            messages.push(Message { role: "system".into(), content: sys.clone() });
        }
        messages.push(Message { role: "user".into(), content: args.prompt.clone() });
        t.render(&messages, true).map_err(|e| usage_error(format!("the chat template failed: {e}")))?
    } else {
        args.prompt.clone()
    };
    let prompt = tok.encode(&text)?;
    if prompt.is_empty() {
        return Err(usage_error("--prompt is empty"));
    }
    if prompt.len() >= model.max_len() {
        return Err(usage_error(format!("the prompt has {} tokens but the model holds {} positions: shorten --prompt", prompt.len(), model.max_len())));
    }
    if prompt.len() + args.max_tokens > model.max_len() {
        eprintln!("note: generation stops at the model's {} positions, before --max-tokens {}", model.max_len(), args.max_tokens);
    }
    let mut sampler = Sampler::new(args.temperature, args.top_p, Rng::derive(args.seed, "generate")).map_err(|e| usage_error(e.to_string()))?;
    let t1 = Instant::now();
    let (out, prefill) = model.generate(&prompt, args.max_tokens, tok.eos_id(), &mut sampler)?;
    let secs = t1.elapsed().as_secs_f64();
    // The EOS that ended the text is not part of it.
    let text_ids = if out.last().is_some_and(|&t| Some(t) == tok.eos_id()) { &out[..out.len() - 1] } else { &out[..] };
    println!("{}", tok.decode(text_ids)?);
    let decode = (secs - prefill).max(1e-9);
    eprintln!(
        "generate: {} prompt tokens in {:.3} s, {} new tokens in {:.2} s ({:.1} tokens/s) on {:?}; weights loaded in {:.1} s",
        prompt.len(),
        prefill,
        out.len(),
        decode,
        out.len().saturating_sub(1) as f64 / decode,
        device.location(),
        load_s
    );
    Ok(ExitCode::SUCCESS)
}
