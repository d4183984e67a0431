//! `ferrospeed plot RUN_DIR [RUN_DIR…] [--out FILE.png]`: the runs' `metrics.jsonl` as one PNG (loss,
//! learning rate, gradient norm, throughput, memory over steps; the runs overlaid), drawn by the
//! library's `track::plot_runs` — the same picture `train` leaves in every run directory. Lines of a
//! `metrics.jsonl` that are not rows are named in one warning per file and the other rows drawn; a
//! file with no row at all is refused.

use crate::usage::usage_error;
use anyhow::Result;
use clap::Args;
use ferrospeed::track::{plot_runs, RunSeries, TrackError};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Args, Debug)]
pub struct PlotArgs {
    /// Run directories (a run's track.dir, holding metrics.jsonl); several are overlaid
    #[arg(required = true, value_name = "RUN_DIR")]
    pub runs: Vec<PathBuf>,
    /// The PNG to write. Default for one run: RUN_DIR/plot.png (what `train` writes there, redrawn);
    /// several runs need --out, so that no run's own plot is replaced by a comparison
    #[arg(long, value_name = "FILE.png")]
    pub out: Option<PathBuf>,
}

pub fn run(args: PlotArgs) -> Result<ExitCode> {
    let out = match (&args.out, args.runs.as_slice()) {
        (Some(out), _) => out.clone(),
        (None, [one]) => one.join("plot.png"),
        (None, _) => return Err(usage_error(format!("{} runs to overlay: give --out FILE.png (one run's plot goes to RUN_DIR/plot.png)", args.runs.len()))),
    };
    let mut runs = Vec::with_capacity(args.runs.len());
    for dir in &args.runs {
        let (run, warning) = RunSeries::read_noting(dir).map_err(|e| usage_error(e.to_string()))?;
        if let Some(w) = warning {
            eprintln!("{w}");
        }
        runs.push(run);
    }
    plot_runs(&runs, &out).map_err(|e| match e {
        TrackError::Write { .. } => usage_error(e.to_string()),
        e => e.into(),
    })?;
    let steps: Vec<String> = runs.iter().map(|r| format!("{} ({} steps)", r.name, r.rows.len())).collect();
    println!("wrote {}: {}", out.display(), steps.join(", "));
    Ok(ExitCode::SUCCESS)
}
