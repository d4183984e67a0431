//! `ferrospeed runs [DIR]`: the runs under DIR (default `runs/`) as a table — name, steps done of
//! planned, final loss, tokens/s, status (finished: `summary.json` is there; stopped: it is not) —
//! read from each run directory's `config.json`, `metrics.jsonl` and `summary.json`.

use anyhow::Result;
use clap::Args;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Args, Debug)]
pub struct RunsArgs {
    /// Folder holding run directories (or one run directory)
    #[arg(default_value = "runs")]
    pub dir: PathBuf,
}

/// One run directory, as the table shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct RunRow {
    pub name: String,
    pub steps: u64,
    pub planned: Option<u64>,
    pub final_loss: Option<f64>,
    pub tokens_per_s: Option<f64>,
    pub finished: bool,
}

fn json(path: &Path) -> Option<serde_json::Value> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

/// The run in `dir`, if it is one (it holds `metrics.jsonl`).
pub fn read_run(dir: &Path) -> Option<RunRow> {
    let metrics = std::fs::read_to_string(dir.join("metrics.jsonl")).ok()?;
    let rows: Vec<serde_json::Value> = metrics.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let last = rows.last();
    let summary = json(&dir.join("summary.json"));
    let mean_tok_s = (!rows.is_empty()).then(|| rows.iter().filter_map(|r| r["tokens_per_s"].as_f64()).sum::<f64>() / rows.len() as f64);
    Some(RunRow {
        name: dir.file_name().map_or_else(|| dir.display().to_string(), |n| n.to_string_lossy().into_owned()),
        steps: last.and_then(|r| r["step"].as_u64()).unwrap_or(0),
        planned: json(&dir.join("config.json")).and_then(|c| c["train"]["steps"].as_u64()),
        final_loss: last.and_then(|r| r["loss"].as_f64()),
        tokens_per_s: summary.as_ref().and_then(|s| s["tokens_per_s"].as_f64()).or(mean_tok_s),
        finished: summary.is_some(),
    })
}

pub fn run(args: RunsArgs) -> Result<ExitCode> {
    let mut rows: Vec<RunRow> = match read_run(&args.dir) {
        Some(one) => vec![one],
        None => {
            let entries = std::fs::read_dir(&args.dir).map_err(|e| crate::usage::usage_error(format!("{}: {e}: give a folder of run directories (track.dir's parent)", args.dir.display())))?;
            entries.flatten().filter(|e| e.path().is_dir()).filter_map(|e| read_run(&e.path())).collect()
        }
    };
    rows.sort_by(|a, b| a.name.cmp(&b.name));
    println!("{:<28} {:>13} {:>11} {:>12} {:>9}", "name", "steps", "final loss", "tokens/s", "status");
    for r in &rows {
        let steps = r.planned.map_or(r.steps.to_string(), |p| format!("{}/{p}", r.steps));
        let loss = r.final_loss.map_or("-".into(), |l| format!("{l:.4}"));
        let tok = r.tokens_per_s.map_or("-".into(), |t| format!("{t:.0}"));
        println!("{:<28} {:>13} {:>11} {:>12} {:>9}", r.name, steps, loss, tok, if r.finished { "finished" } else { "stopped" });
    }
    if rows.is_empty() {
        println!("(no runs in {})", args.dir.display());
    }
    Ok(ExitCode::SUCCESS)
}
