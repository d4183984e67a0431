//! `ferrospeed runs [DIR]`: the runs under DIR (default `runs/`) as a table — name, steps done of
//! planned, final loss, the last held-out loss, tokens/s, status (finished: `summary.json` is there; stopped: it is not) —
//! read from each run directory's `config.json`, `metrics.jsonl` and `summary.json`. Lines of a
//! `metrics.jsonl` that are not rows are named in one warning per file (on stderr) and left out.

use anyhow::Result;
use clap::Args;
use ferrospeed::track::MetricsLines;
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
    /// The last held-out loss the run logged.
    pub eval_loss: Option<f64>,
    pub tokens_per_s: Option<f64>,
    pub finished: bool,
}

fn json(path: &Path) -> Option<serde_json::Value> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

/// The run in `dir`, if it is one (it holds `metrics.jsonl`), and a warning naming the lines of its
/// `metrics.jsonl` that are not rows, if there are any.
pub fn read_run(dir: &Path) -> Option<(RunRow, Option<String>)> {
    let path = dir.join("metrics.jsonl");
    let metrics = MetricsLines::parse(&std::fs::read_to_string(&path).ok()?);
    let warning = metrics.warning(&path);
    let rows = &metrics.rows;
    let last = rows.last();
    let summary = json(&dir.join("summary.json"));
    // A value serde_json wrote as null (NaN: a diverged step) shows as missing.
    let finite = |v: f64| v.is_finite().then_some(v);
    let mean_tok_s = (!rows.is_empty()).then(|| rows.iter().filter_map(|r| finite(r.tokens_per_s)).sum::<f64>() / rows.len() as f64);
    let row = RunRow {
        name: dir.file_name().map_or_else(|| dir.display().to_string(), |n| n.to_string_lossy().into_owned()),
        steps: last.map_or(0, |r| r.step),
        planned: json(&dir.join("config.json")).and_then(|c| c["train"]["steps"].as_u64()),
        final_loss: last.and_then(|r| finite(r.loss)),
        eval_loss: rows.iter().rev().find_map(|r| r.eval_loss).and_then(finite),
        tokens_per_s: summary.as_ref().and_then(|s| s["tokens_per_s"].as_f64()).or(mean_tok_s),
        finished: summary.is_some(),
    };
    Some((row, warning))
}

pub fn run(args: RunsArgs) -> Result<ExitCode> {
    let mut runs: Vec<(RunRow, Option<String>)> = match read_run(&args.dir) {
        Some(one) => vec![one],
        None => {
            let entries = std::fs::read_dir(&args.dir).map_err(|e| crate::usage::usage_error(format!("{}: {e}: give a folder of run directories (track.dir's parent)", args.dir.display())))?;
            entries.flatten().filter(|e| e.path().is_dir()).filter_map(|e| read_run(&e.path())).collect()
        }
    };
    runs.sort_by(|a, b| a.0.name.cmp(&b.0.name));
    for w in runs.iter().filter_map(|r| r.1.as_ref()) {
        eprintln!("{w}");
    }
    let rows: Vec<RunRow> = runs.into_iter().map(|r| r.0).collect();
    println!("{:<28} {:>13} {:>11} {:>10} {:>12} {:>9}", "name", "steps", "final loss", "eval loss", "tokens/s", "status");
    for r in &rows {
        let steps = r.planned.map_or(r.steps.to_string(), |p| format!("{}/{p}", r.steps));
        let loss = r.final_loss.map_or("-".into(), |l| format!("{l:.4}"));
        let eval = r.eval_loss.map_or("-".into(), |l| format!("{l:.4}"));
        let tok = r.tokens_per_s.map_or("-".into(), |t| format!("{t:.0}"));
        println!("{:<28} {:>13} {:>11} {:>10} {:>12} {:>9}", r.name, steps, loss, eval, tok, if r.finished { "finished" } else { "stopped" });
    }
    if rows.is_empty() {
        println!("(no runs in {})", args.dir.display());
    }
    Ok(ExitCode::SUCCESS)
}
