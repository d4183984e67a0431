//! `ferrospeed data prepare INPUT… --tokenizer T --out DIR`: text and JSONL (plain or chat) into token
//! shards that `train` memory-maps (`data.path = DIR`), on all cores, with a progress bar and a summary.

use crate::usage::usage_error;
use anyhow::Result;
use clap::{Args, Subcommand};
use ferrospeed_models::prepared::{prepare, PrepareOptions};
use ferrospeed_models::Tokenizer;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Subcommand, Debug)]
pub enum DataCommand {
    /// Tokenize text files and JSONL ({"text"} or chat {"messages"}) into token shards for training
    Prepare(PrepareArgs),
}

#[derive(Args, Debug)]
pub struct PrepareArgs {
    /// Text files, .jsonl files, or directories of them
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    /// `bytes`, a tokenizer.json, a model directory holding one, or a .gguf file
    #[arg(long)]
    pub tokenizer: String,
    /// The output directory (created; re-running on the same inputs does nothing)
    #[arg(long)]
    pub out: PathBuf,
    /// A Jinja chat template file, instead of the tokenizer's own
    #[arg(long)]
    pub chat_template: Option<PathBuf>,
    /// Replace a directory prepared from other inputs
    #[arg(long)]
    pub force: bool,
    /// Worker threads (default: all cores)
    #[arg(long)]
    pub threads: Option<usize>,
}

pub fn run(cmd: DataCommand) -> Result<ExitCode> {
    let DataCommand::Prepare(args) = cmd;
    let tokenizer = Tokenizer::open(&args.tokenizer).map_err(|e| usage_error(e.to_string()))?;
    let template = match &args.chat_template {
        Some(p) => Some(std::fs::read_to_string(p).map_err(|e| usage_error(format!("cannot read the chat template {}: {e}", p.display())))?),
        None => None,
    };
    if let Some(n) = args.threads {
        rayon::ThreadPoolBuilder::new().num_threads(n).build_global().map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let total: u64 = args.inputs.iter().map(|p| dir_bytes(p)).sum();
    let bar = indicatif::ProgressBar::with_draw_target(Some(total), if std::io::stderr().is_terminal() { indicatif::ProgressDrawTarget::stderr() } else { indicatif::ProgressDrawTarget::hidden() });
    bar.set_style(indicatif::ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}").unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()));
    let progress = |done: u64| bar.set_position(done);
    let mut opts = PrepareOptions::new(args.inputs.clone(), args.out.clone(), &tokenizer);
    opts.chat_template = template;
    opts.force = args.force;
    opts.progress = Some(&progress);
    let s = prepare(&opts).map_err(|e| usage_error(e.to_string()))?;
    bar.finish_and_clear();
    let i = &s.index;
    if s.up_to_date {
        println!("{} is up to date ({} documents, {} tokens; content hash {})", args.out.display(), i.documents, i.tokens, &i.hash[..12]);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "prepared {} documents ({} chat), {} tokens ({} in the loss; longest document {}) from {:.1} MB in {:.2} s: {:.0} tokens/s on {} threads → {}",
        i.documents,
        i.chat_documents,
        i.tokens,
        i.loss_tokens,
        i.longest,
        s.input_bytes as f64 / 1e6,
        s.seconds,
        i.tokens as f64 / s.seconds.max(1e-9),
        s.threads,
        args.out.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn dir_bytes(p: &std::path::Path) -> u64 {
    if p.is_dir() {
        std::fs::read_dir(p).map(|d| d.filter_map(|e| e.ok()).map(|e| dir_bytes(&e.path())).sum()).unwrap_or(0)
    } else {
        p.metadata().map(|m| m.len()).unwrap_or(0)
    }
}
