//! [`Tracker`]: owns one run directory and appends each step's metrics to it (and to TensorBoard).
//!
//! Layout of a run directory:
//! - `config.json`: the effective config, pretty-printed, written at start;
//! - `metrics.jsonl`: one [`StepMetrics`] JSON object per line, appended and flushed every step;
//! - `events.out.tfevents.*`: TensorBoard scalars, when enabled;
//! - `metrics.csv` and `mlruns/` (an MLflow file store), when enabled (`track.backends`); with an
//!   MLflow tracking server instead, `mlflow_run.json` names the run there (`mlflow_server.rs`);
//! - `plot.png`: the metrics as a picture, written by [`Tracker::plot`] (a program calls it at the end);
//! - `summary.json`: written by [`Tracker::finish`], so its presence means the run ended cleanly.
//!
//! A run that resumes (`checkpoint.resume`) into its own directory continues it: [`Tracker::continue_or_create`]
//! opens it, [`Tracker::rewind`] drops the rows after the checkpoint's step (they are computed again)
//! and rebuilds the TensorBoard file from the rows kept, so no step is ever duplicated or lost.

use super::csv::CsvWriter;
use super::mlflow::MlflowRun;
use super::mlflow_server::{MlflowServer, RunEnd, ServerRun};
use super::run_dir::write_json_pretty;
use super::{StepMetrics, TensorBoardWriter, TrackError};
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};

pub(super) const METRICS_FILE: &str = "metrics.jsonl";
const CONFIG_FILE: &str = "config.json";
const SUMMARY_FILE: &str = "summary.json";
const PLOT_FILE: &str = "plot.png";

/// Which outputs a run writes besides `metrics.jsonl` (always written: the others are built from it).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Backends {
    pub tensorboard: bool,
    pub csv: bool,
    pub mlflow: Option<MlflowTarget>,
}

/// Where MLflow logging goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MlflowTarget {
    /// The file store `mlruns/` in the run directory; `ignored_env_uri`: an `MLFLOW_TRACKING_URI`
    /// that names no http(s) server, said once at the start.
    FileStore { ignored_env_uri: Option<String> },
    /// A tracking server, through its REST API.
    Server(MlflowServer),
}

/// A run's MLflow output, of either kind.
enum Mlflow {
    Files(MlflowRun),
    Server(ServerRun),
}

impl Mlflow {
    fn open(target: &MlflowTarget, dir: &Path, config_json: &serde_json::Value, continuing: bool) -> Result<Self, TrackError> {
        match target {
            MlflowTarget::FileStore { ignored_env_uri } => {
                if let Some(uri) = ignored_env_uri {
                    eprintln!("note: MLFLOW_TRACKING_URI = {uri} is not an http(s) tracking server: MLflow logging goes to the file store {}", dir.join("mlruns").display());
                }
                Ok(Mlflow::Files(MlflowRun::open(dir, &run_name(dir), config_json)?))
            }
            MlflowTarget::Server(server) => Ok(Mlflow::Server(ServerRun::start(server, dir, &run_name(dir), config_json, continuing)?)),
        }
    }
}

/// Writes a run's outputs into its directory. Create one on rank 0 only.
impl Backends {
    /// TensorBoard only (or nothing but `metrics.jsonl`).
    pub fn tensorboard(on: bool) -> Self {
        Self { tensorboard: on, ..Self::default() }
    }
}

pub struct Tracker {
    dir: PathBuf,
    metrics_path: PathBuf,
    metrics: File,
    tensorboard: Option<TensorBoardWriter>,
    csv: Option<CsvWriter>,
    mlflow: Option<Mlflow>,
    /// The outputs asked for (a continued run's are created at `rewind`).
    backends: Backends,
    /// A continued run: `summary.json` of its earlier part is removed at the first new row.
    continued: bool,
}

/// The TensorBoard (and MLflow) scalars of one step's metrics.
pub(super) fn scalars(m: &StepMetrics) -> Vec<(&'static str, f64)> {
    let mut scalars = vec![("loss", m.loss), ("lr", m.lr), ("grad_norm", m.grad_norm), ("tokens_per_s", m.tokens_per_s), ("step_ms", m.step_ms)];
    if let Some(mfu) = m.mfu {
        scalars.push(("mfu", mfu));
    }
    if let Some(loss_scale) = m.loss_scale {
        scalars.push(("loss_scale", loss_scale));
    }
    if let Some(eval_loss) = m.eval_loss {
        scalars.push(("eval_loss", eval_loss));
    }
    scalars
}

/// The run's name: its directory's.
fn run_name(dir: &Path) -> String {
    dir.file_name().map_or_else(|| "run".to_string(), |n| n.to_string_lossy().into_owned())
}

impl Tracker {
    /// Creates `dir` (and its parents), claims it for this run and writes `config.json`.
    ///
    /// Refuses with [`TrackError::RunExists`] if `dir/metrics.jsonl` exists, writing nothing: an earlier
    /// run's outputs are never overwritten or appended to. The claim itself is atomic (the metrics file is
    /// opened with `create_new`), so two processes pointed at the same directory cannot both succeed.
    pub fn create(dir: &Path, backends: Backends, config_json: &serde_json::Value) -> Result<Self, TrackError> {
        let metrics_path = dir.join(METRICS_FILE);
        // Checked before creating anything so a refused run leaves no trace, not even a directory.
        if metrics_path.symlink_metadata().is_ok() {
            return Err(TrackError::RunExists { dir: dir.to_path_buf() });
        }
        std::fs::create_dir_all(dir).map_err(|source| TrackError::CreateDir { path: dir.to_path_buf(), source })?;
        let metrics = match OpenOptions::new().append(true).create_new(true).open(&metrics_path) {
            Ok(file) => file,
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                return Err(TrackError::RunExists { dir: dir.to_path_buf() })
            }
            Err(source) => return Err(TrackError::CreateFile { path: metrics_path, source }),
        };

        // If the rest of the setup fails, release the claim so the user can fix the cause and rerun into
        // the same directory: the files removed here are the ones this call just created.
        let config_path = dir.join(CONFIG_FILE);
        let rest = write_json_pretty(&config_path, config_json).and_then(|()| {
            let tb = if backends.tensorboard { Some(TensorBoardWriter::create(dir)?) } else { None };
            let csv = if backends.csv { Some(CsvWriter::create(dir, &[])?) } else { None };
            let mlflow = backends.mlflow.as_ref().map(|m| Mlflow::open(m, dir, config_json, false)).transpose()?;
            Ok((tb, csv, mlflow))
        });
        match rest {
            Ok((tensorboard, csv, mlflow)) => Ok(Self { dir: dir.to_path_buf(), metrics_path, metrics, tensorboard, csv, mlflow, backends, continued: false }),
            Err(e) => {
                let _ = std::fs::remove_file(&config_path);
                let _ = std::fs::remove_file(&metrics_path);
                Err(e)
            }
        }
    }

    /// As [`Tracker::create`]; when `dir` already holds a run with this config (but for `train.steps`)
    /// and `continuing` (the run resumes from its checkpoint), opens it instead: `config.json` is
    /// rewritten, and [`Tracker::rewind`] must be called with the step the run continues from before
    /// anything is logged. A run with another config is refused as by `create`.
    pub fn continue_or_create(dir: &Path, backends: Backends, config_json: &serde_json::Value, continuing: bool) -> Result<Self, TrackError> {
        let metrics_path = dir.join(METRICS_FILE);
        if !continuing || metrics_path.symlink_metadata().is_err() {
            return Self::create(dir, backends, config_json);
        }
        // Only the same run continues: its config must be this one (train.steps may grow).
        let same = std::fs::read_to_string(dir.join(CONFIG_FILE)).ok().and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok()).is_some_and(|old| {
            let strip = |mut v: serde_json::Value| {
                if let Some(t) = v.get_mut("train").and_then(|t| t.as_object_mut()) {
                    t.remove("steps");
                }
                v
            };
            strip(old) == strip(config_json.clone())
        });
        if !same {
            return Err(TrackError::RunExists { dir: dir.to_path_buf() });
        }
        let metrics = OpenOptions::new().append(true).open(&metrics_path).map_err(|source| TrackError::CreateFile { path: metrics_path.clone(), source })?;
        write_json_pretty(&dir.join(CONFIG_FILE), config_json)?;
        let mlflow = backends.mlflow.as_ref().map(|m| Mlflow::open(m, dir, config_json, true)).transpose()?;
        Ok(Self { dir: dir.to_path_buf(), metrics_path, metrics, tensorboard: None, csv: None, mlflow, backends, continued: true })
    }

    /// Continue after `step` optimizer steps: rows of later steps (and a torn last line) are dropped
    /// from `metrics.jsonl`, which is replaced atomically, and the TensorBoard file is rebuilt from
    /// the rows kept. `checkpoint_row`, the line of the row the checkpoint of `step` saved, is added
    /// as it is when the file lacks it (the run died between the save and the row); a line of
    /// another step is ignored. Returns how many rows were dropped. A fresh run has nothing to drop.
    pub fn rewind(&mut self, step: u64, checkpoint_row: Option<&str>) -> Result<usize, TrackError> {
        if !self.continued {
            return Ok(0);
        }
        let path = self.metrics_path.clone();
        let text = std::fs::read_to_string(&path).map_err(|source| TrackError::CreateFile { path: path.clone(), source })?;
        let rows: Vec<(&str, Option<StepMetrics>)> = text.lines().map(|l| (l, serde_json::from_str::<StepMetrics>(l).ok())).collect();
        let mut kept: Vec<(String, StepMetrics)> = rows.iter().filter_map(|(l, m)| m.clone().filter(|m| m.step <= step).map(|m| (l.to_string(), m))).collect();
        let dropped = rows.len() - kept.len();
        let row = checkpoint_row.and_then(|l| serde_json::from_str::<StepMetrics>(l).ok().map(|m| (l.to_string(), m)));
        if let Some((line, m)) = row.filter(|(_, m)| m.step == step && kept.last().is_none_or(|(_, last)| last.step < m.step)) {
            kept.push((line, m));
        }
        let tmp = self.dir.join(format!(".{METRICS_FILE}.rewind"));
        let out: String = kept.iter().map(|(l, _)| format!("{l}\n")).collect();
        std::fs::write(&tmp, out).map_err(|source| TrackError::Write { path: tmp.clone(), source })?;
        std::fs::rename(&tmp, &path).map_err(|source| TrackError::Write { path: path.clone(), source })?;
        self.metrics = OpenOptions::new().append(true).open(&path).map_err(|source| TrackError::CreateFile { path: path.clone(), source })?;
        let kept: Vec<StepMetrics> = kept.into_iter().map(|(_, m)| m).collect();
        if self.backends.csv {
            self.csv = Some(CsvWriter::create(&self.dir, &kept)?);
        }
        match self.mlflow.as_mut() {
            Some(Mlflow::Files(run)) => run.rebuild(&kept)?,
            Some(Mlflow::Server(run)) => run.resend(&kept),
            None => {}
        }
        if self.backends.tensorboard {
            for e in std::fs::read_dir(&self.dir).map_err(|source| TrackError::CreateDir { path: self.dir.clone(), source })?.flatten() {
                if e.file_name().to_string_lossy().contains("tfevents") {
                    let _ = std::fs::remove_file(e.path());
                }
            }
            let mut tb = TensorBoardWriter::create(&self.dir)?;
            for m in &kept {
                tb.add_scalars(m.step, &scalars(m))?;
            }
            tb.flush()?;
            self.tensorboard = Some(tb);
        }
        Ok(dropped)
    }

    /// Whether the run has ended cleanly: its `summary.json` is there (a continued run's earlier
    /// summary is removed at its first new row).
    pub fn finished(&self) -> bool {
        self.dir.join(SUMMARY_FILE).is_file()
    }

    /// The run directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The TensorBoard event file, when TensorBoard is enabled.
    pub fn tensorboard_path(&self) -> Option<&Path> {
        self.tensorboard.as_ref().map(|tb| tb.path())
    }

    /// Appends `m` as one line of `metrics.jsonl` and to TensorBoard.
    ///
    /// The line goes out in a single unbuffered write, so a crash loses at most the current step and
    /// never leaves a half line in the middle of the file. No fsync per step: surviving a process crash
    /// is what matters here, and a sync every step would cost more than the step on small models.
    pub fn log(&mut self, m: &StepMetrics) -> Result<(), TrackError> {
        let mut line = serde_json::to_string(m)
            .map_err(|source| TrackError::Json { path: self.metrics_path.clone(), source })?;
        line.push('\n');
        self.metrics
            .write_all(line.as_bytes())
            .and_then(|()| self.metrics.flush())
            .map_err(|source| TrackError::Write { path: self.metrics_path.clone(), source })?;

        if std::mem::take(&mut self.continued) {
            // The run goes on: the summary of its earlier part no longer describes it.
            let _ = std::fs::remove_file(self.dir.join(SUMMARY_FILE));
        }
        if let Some(csv) = self.csv.as_mut() {
            csv.log(m)?;
        }
        match self.mlflow.as_mut() {
            Some(Mlflow::Files(run)) => run.log(m)?,
            // Queued for the server's thread: never waits.
            Some(Mlflow::Server(run)) => run.log(m),
            None => {}
        }
        if let Some(tb) = self.tensorboard.as_mut() {
            tb.add_scalars(m.step, &scalars(m))?;
            // Flushed every step so TensorBoard shows a live run; one small write per step is cheap.
            tb.flush()?;
        }
        Ok(())
    }

    /// Draws `plot.png` in the run directory from the rows logged so far (every row is on disk once
    /// [`Tracker::log`] returns) and returns its path.
    pub fn plot(&self) -> Result<PathBuf, TrackError> {
        let path = self.dir.join(PLOT_FILE);
        super::plot_runs(&[super::RunSeries::read(&self.dir)?], &path)?;
        Ok(path)
    }

    /// Ends the run: syncs the metrics to disk and writes `summary.json` with `summary`.
    pub fn finish(mut self, summary: &serde_json::Value) -> Result<(), TrackError> {
        if let Some(tb) = self.tensorboard.as_mut() {
            tb.flush()?;
        }
        self.metrics.sync_data().map_err(|source| TrackError::Write { path: self.metrics_path.clone(), source })?;
        match self.mlflow.take() {
            Some(Mlflow::Files(run)) => run.finish()?,
            // Waits a bounded time for the values still on their way.
            Some(Mlflow::Server(run)) => run.end(RunEnd::Finished),
            None => {}
        }
        write_json_pretty(&self.dir.join(SUMMARY_FILE), summary)
    }

    /// Ends a run stopped by a signal before its last step: no summary (the run is not over; the
    /// same command continues it), an MLflow server's run is marked KILLED. Dropping a tracker
    /// without [`Tracker::finish`] marks it FAILED.
    pub fn interrupted(mut self) {
        if let Some(Mlflow::Server(run)) = self.mlflow.take() {
            run.end(RunEnd::Killed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::event_reader::read_events;
    use super::*;
    use std::collections::BTreeMap;

    fn metrics(step: u64) -> StepMetrics {
        StepMetrics {
            step,
            loss: 5.0 - step as f64 * 0.25,
            lr: 1e-3 * step as f64,
            grad_norm: 0.5,
            tokens: 4096 * step,
            tokens_per_s: 20_000.0,
            mfu: if step % 2 == 0 { Some(0.4) } else { None },
            step_ms: 204.8,
            peak_mem_bytes: 3 << 30,
            loss_scale: if step == 3 { Some(1024.0) } else { None },
            eval_loss: if step == 3 { Some(4.5) } else { None },
            extra: BTreeMap::new(),
        }
    }

    fn config() -> serde_json::Value {
        serde_json::json!({"model": {"n_layer": 2}, "train": {"steps": 3}})
    }

    fn tfevents_files(dir: &Path) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.file_name().unwrap().to_string_lossy().contains("tfevents"))
            .collect();
        files.sort();
        files
    }

    #[test]
    fn run_writes_config_metrics_and_summary() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("nested/runs/a");
        let mut tracker = Tracker::create(&dir, Backends::tensorboard(false), &config()).unwrap();
        let logged: Vec<StepMetrics> = (1..=3).map(metrics).collect();
        for m in &logged {
            tracker.log(m).unwrap();
        }
        tracker.finish(&serde_json::json!({"final_loss": 4.25})).unwrap();

        let config_text = std::fs::read_to_string(dir.join(CONFIG_FILE)).unwrap();
        assert!(config_text.contains("\n  "), "config.json is pretty-printed");
        assert_eq!(serde_json::from_str::<serde_json::Value>(&config_text).unwrap(), config());

        let text = std::fs::read_to_string(dir.join(METRICS_FILE)).unwrap();
        let read: Vec<StepMetrics> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(read, logged);
        assert!(text.ends_with('\n'));

        let summary: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join(SUMMARY_FILE)).unwrap()).unwrap();
        assert_eq!(summary["final_loss"], 4.25);
        assert!(tfevents_files(&dir).is_empty(), "no TensorBoard file when disabled");
    }

    #[test]
    fn csv_and_mlflow_hold_every_step_and_a_rewind_keeps_them_consistent() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("run-a");
        let all = Backends { tensorboard: true, csv: true, mlflow: Some(MlflowTarget::FileStore { ignored_env_uri: None }) };
        let mut tracker = Tracker::create(&dir, all.clone(), &config()).unwrap();
        for step in 1..=3 {
            tracker.log(&metrics(step)).unwrap();
        }
        tracker.finish(&serde_json::json!({})).unwrap();
        let csv = std::fs::read_to_string(dir.join("metrics.csv")).unwrap();
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines[0], "step,loss,lr,grad_norm,tokens,tokens_per_s,step_ms,peak_mem_bytes,loss_scale,eval_loss");
        assert_eq!(lines.len(), 4);
        assert_eq!(lines[2], "2,4.5,0.002,0.5,8192,20000,204.8,3221225472,,");
        assert_eq!(lines[3], "3,4.25,0.003,0.5,12288,20000,204.8,3221225472,1024,4.5");
        // The MLflow file store: experiment 0, one run, its metrics, params and name.
        let exp = dir.join("mlruns/0");
        assert!(std::fs::read_to_string(exp.join("meta.yaml")).unwrap().contains("experiment_id: '0'\n"));
        let runs: Vec<PathBuf> = std::fs::read_dir(&exp).unwrap().flatten().map(|e| e.path()).filter(|p| p.is_dir()).collect();
        assert_eq!(runs.len(), 1);
        let run = &runs[0];
        let id = run.file_name().unwrap().to_string_lossy().to_string();
        assert_eq!(id.len(), 32);
        let meta = std::fs::read_to_string(run.join("meta.yaml")).unwrap();
        for want in [format!("run_id: {id}\n"), format!("run_uuid: {id}\n"), "status: 3\n".into(), "run_name: run-a\n".into(), "lifecycle_stage: active\n".into()] {
            assert!(meta.contains(&want), "{want:?} in {meta}");
        }
        let loss = std::fs::read_to_string(run.join("metrics/loss")).unwrap();
        let rows: Vec<Vec<&str>> = loss.lines().map(|l| l.split(' ').collect()).collect();
        assert_eq!(rows.len(), 3);
        assert!(rows.iter().all(|r| r.len() == 3 && r[0].parse::<u128>().is_ok()), "{loss}");
        assert_eq!((rows[2][1], rows[2][2]), ("4.25", "3"));
        assert!(run.join("metrics/loss_scale").is_file() && run.join("metrics/mfu").is_file());
        assert_eq!(std::fs::read_to_string(run.join("params/model.n_layer")).unwrap(), "2");
        assert_eq!(std::fs::read_to_string(run.join("tags/mlflow.runName")).unwrap(), "run-a");

        // Continued after step 1: every output holds steps 1, 2 (the new one) once.
        let mut again = Tracker::continue_or_create(&dir, all, &config(), true).unwrap();
        assert_eq!(again.rewind(1, None).unwrap(), 2);
        again.log(&metrics(2)).unwrap();
        again.finish(&serde_json::json!({})).unwrap();
        assert_eq!(std::fs::read_to_string(dir.join("metrics.csv")).unwrap().lines().count(), 3);
        let loss = std::fs::read_to_string(run.join("metrics/loss")).unwrap();
        assert_eq!(loss.lines().map(|l| l.split(' ').nth(2).unwrap()).collect::<Vec<_>>(), ["1", "2"]);
        let steps: Vec<u64> = tfevents_files(&dir).iter().flat_map(|p| read_events(p)).filter(|e| !e.values.is_empty()).map(|e| e.step).collect();
        assert_eq!(steps, [1, 2]);
        let text = std::fs::read_to_string(dir.join(METRICS_FILE)).unwrap();
        assert_eq!(text.lines().count(), 2);
    }

    #[test]
    fn existing_run_is_refused_and_left_untouched() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("run");
        let mut first = Tracker::create(&dir, Backends::tensorboard(true), &config()).unwrap();
        first.log(&metrics(1)).unwrap();
        first.log(&metrics(2)).unwrap();
        drop(first); // a crashed run: no summary.json

        let snapshot = |name: &str| std::fs::read(dir.join(name)).unwrap();
        let (old_metrics, old_config) = (snapshot(METRICS_FILE), snapshot(CONFIG_FILE));
        let old_entries = std::fs::read_dir(&dir).unwrap().count();

        let other_config = serde_json::json!({"different": true});
        let err = Tracker::create(&dir, Backends::tensorboard(true), &other_config).err().expect("reuse must be refused");
        assert!(matches!(&err, TrackError::RunExists { dir: d } if d == &dir), "{err}");
        let message = err.to_string();
        assert!(message.contains(&dir.display().to_string()), "{message}");
        assert!(message.contains("choose another track.dir or move the old run away"), "{message}");

        assert_eq!(snapshot(METRICS_FILE), old_metrics, "metrics.jsonl must be byte-identical");
        assert_eq!(snapshot(CONFIG_FILE), old_config);
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), old_entries, "nothing new written");
    }

    #[test]
    fn tensorboard_gets_scalars_for_each_step() {
        let base = tempfile::tempdir().unwrap();
        let mut tracker = Tracker::create(base.path(), Backends::tensorboard(true), &config()).unwrap();
        for step in 1..=3 {
            tracker.log(&metrics(step)).unwrap();
        }
        let path = tracker.tensorboard_path().unwrap().to_path_buf();
        tracker.finish(&serde_json::json!({})).unwrap();
        assert_eq!(tfevents_files(base.path()), vec![path.clone()]);

        let events = read_events(&path);
        assert_eq!(events.len(), 4, "version event plus one per step");
        let tags = |i: usize| events[i].values.iter().map(|(t, _)| t.as_str()).collect::<Vec<_>>();
        let base_tags = ["loss", "lr", "grad_norm", "tokens_per_s", "step_ms"];
        assert_eq!(tags(1), base_tags);
        assert_eq!(tags(2), [&base_tags[..], &["mfu"]].concat());
        assert_eq!(tags(3), [&base_tags[..], &["loss_scale", "eval_loss"]].concat());
        assert_eq!(events[2].step, 2);
        assert_eq!(events[2].values[0].1, 4.5f32);
        assert_eq!(events[3].values[5].1, 1024.0f32);
    }

    #[test]
    fn directory_that_is_a_file_reports_the_path() {
        let base = tempfile::tempdir().unwrap();
        let blocker = base.path().join("not-a-dir");
        std::fs::write(&blocker, b"x").unwrap();
        let dir = blocker.join("run");
        let err = Tracker::create(&dir, Backends::tensorboard(false), &config()).err().expect("cannot create under a file");
        assert!(err.to_string().contains(&dir.display().to_string()), "{err}");
    }
}
