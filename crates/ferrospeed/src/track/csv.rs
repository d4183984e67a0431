//! `metrics.csv`: the run's metrics as a CSV file (one header line, one row per step), for
//! spreadsheets and pandas. Written by hand: ten numeric columns need no CSV crate's quoting.

use super::{StepMetrics, TrackError};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

const HEADER: &str = "step,loss,lr,grad_norm,tokens,tokens_per_s,step_ms,peak_mem_bytes,loss_scale,eval_loss\n";

/// Appends each step's metrics to `<dir>/metrics.csv`.
pub struct CsvWriter {
    path: PathBuf,
    file: File,
}

fn row(m: &StepMetrics) -> String {
    let opt = |v: Option<f64>| v.map_or(String::new(), |s| s.to_string());
    format!("{},{},{},{},{},{},{},{},{},{}\n", m.step, m.loss, m.lr, m.grad_norm, m.tokens, m.tokens_per_s, m.step_ms, m.peak_mem_bytes, opt(m.loss_scale), opt(m.eval_loss))
}

impl CsvWriter {
    /// `<dir>/metrics.csv` holding the header and `rows` (replacing any earlier file).
    pub fn create(dir: &Path, rows: &[StepMetrics]) -> Result<Self, TrackError> {
        let path = dir.join("metrics.csv");
        let mut text = String::from(HEADER);
        rows.iter().for_each(|m| text.push_str(&row(m)));
        let tmp = dir.join(".metrics.csv.tmp");
        std::fs::write(&tmp, text).map_err(|source| TrackError::Write { path: tmp.clone(), source })?;
        std::fs::rename(&tmp, &path).map_err(|source| TrackError::Write { path: path.clone(), source })?;
        let file = OpenOptions::new().append(true).open(&path).map_err(|source| TrackError::CreateFile { path: path.clone(), source })?;
        Ok(Self { path, file })
    }

    /// Append one step's row.
    pub fn log(&mut self, m: &StepMetrics) -> Result<(), TrackError> {
        self.file.write_all(row(m).as_bytes()).map_err(|source| TrackError::Write { path: self.path.clone(), source })
    }
}
