//! An MLflow-compatible local file store in `<run dir>/mlruns/`, which `mlflow ui --backend-store-uri
//! <run dir>/mlruns` reads: experiment `0` ("Default", as MLflow creates it) holding one run per run
//! directory, with `meta.yaml`, one file per metric (`<timestamp ms> <value> <step>` lines), one file
//! per parameter (the config's keys, `section.key`) and the `mlflow.runName` tag. Written by hand: the
//! layout is a handful of plain files, and MLflow has no Rust client that writes them.

use super::{StepMetrics, TrackError};
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// MLflow's `RunStatus`: RUNNING = 1, FINISHED = 3.
const RUNNING: u8 = 1;
const FINISHED: u8 = 3;

fn now_ms() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis())
}

fn write(path: &Path, text: &str) -> Result<(), TrackError> {
    std::fs::write(path, text).map_err(|source| TrackError::Write { path: path.to_path_buf(), source })
}

fn mkdir(path: &Path) -> Result<(), TrackError> {
    std::fs::create_dir_all(path).map_err(|source| TrackError::CreateDir { path: path.to_path_buf(), source })
}

/// The run's directory in the store and what its `meta.yaml` says.
pub struct MlflowRun {
    dir: PathBuf,
    run_id: String,
    name: String,
    start_ms: u128,
}

/// `section.key` = value for every leaf of the config (lists and tables joined as JSON).
pub(super) fn params(config: &serde_json::Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    if let Some(sections) = config.as_object() {
        for (section, keys) in sections {
            match keys.as_object() {
                Some(keys) => out.extend(keys.iter().map(|(k, v)| (format!("{section}.{k}"), v.as_str().map_or_else(|| v.to_string(), str::to_string)))),
                None => out.push((section.clone(), keys.to_string())),
            }
        }
    }
    out
}

impl MlflowRun {
    /// The run of `run_dir` in `<run_dir>/mlruns` (created with the experiment on first use; an
    /// existing run is continued), named `name`, with the config's parameters.
    pub fn open(run_dir: &Path, name: &str, config: &serde_json::Value) -> Result<Self, TrackError> {
        let experiment = run_dir.join("mlruns").join("0");
        mkdir(&experiment)?;
        let start_ms = now_ms();
        let exp_meta = experiment.join("meta.yaml");
        if !exp_meta.is_file() {
            let location = format!("file://{}", experiment.canonicalize().unwrap_or(experiment.clone()).display());
            write(&exp_meta, &format!("artifact_location: {location}\ncreation_time: {start_ms}\nexperiment_id: '0'\nlast_update_time: {start_ms}\nlifecycle_stage: active\nname: Default\n"))?;
        }
        // One run per run directory: continue it if it is there.
        let existing = std::fs::read_dir(&experiment).into_iter().flatten().flatten().find(|e| e.path().join("meta.yaml").is_file());
        let run_id = match existing {
            Some(e) => e.file_name().to_string_lossy().into_owned(),
            None => {
                let seed = format!("{}{}{}", run_dir.display(), start_ms, std::process::id());
                let h = |salt: u32| seed.bytes().fold(0xcbf2_9ce4_8422_2325u64 ^ u64::from(salt), |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
                format!("{:016x}{:016x}", h(1), h(2))
            }
        };
        let dir = experiment.join(&run_id);
        for sub in ["metrics", "params", "tags", "artifacts"] {
            mkdir(&dir.join(sub))?;
        }
        for (k, v) in params(config) {
            write(&dir.join("params").join(k.replace('/', "_")), &v)?;
        }
        write(&dir.join("tags").join("mlflow.runName"), name)?;
        let run = Self { dir, run_id, name: name.to_string(), start_ms };
        run.write_meta(RUNNING, None)?;
        Ok(run)
    }

    fn write_meta(&self, status: u8, end_ms: Option<u128>) -> Result<(), TrackError> {
        let artifacts = format!("file://{}", self.dir.join("artifacts").canonicalize().unwrap_or(self.dir.join("artifacts")).display());
        let end = end_ms.map_or("null".to_string(), |t| t.to_string());
        write(
            &self.dir.join("meta.yaml"),
            &format!(
                "artifact_uri: {artifacts}\nend_time: {end}\nentry_point_name: ''\nexperiment_id: '0'\nlifecycle_stage: active\nrun_id: {id}\nrun_name: {name}\nrun_uuid: {id}\nsource_name: ''\nsource_type: 4\nsource_version: ''\nstart_time: {start}\nstatus: {status}\ntags: []\nuser_id: ferrospeed\n",
                id = self.run_id,
                name = self.name,
                start = self.start_ms
            ),
        )
    }

    /// Append one step's metrics, one line per metric file.
    pub fn log(&mut self, m: &StepMetrics) -> Result<(), TrackError> {
        let t = now_ms();
        for (name, value) in super::tracker::scalars(m) {
            let path = self.dir.join("metrics").join(name);
            let mut f = OpenOptions::new().create(true).append(true).open(&path).map_err(|source| TrackError::CreateFile { path: path.clone(), source })?;
            writeln!(f, "{t} {value} {}", m.step).map_err(|source| TrackError::Write { path, source })?;
        }
        Ok(())
    }

    /// Replace the metric files by `rows` (a continued run's rows kept).
    pub fn rebuild(&mut self, rows: &[StepMetrics]) -> Result<(), TrackError> {
        let metrics = self.dir.join("metrics");
        let _ = std::fs::remove_dir_all(&metrics);
        mkdir(&metrics)?;
        rows.iter().try_for_each(|m| self.log(m))
    }

    /// Mark the run finished.
    pub fn finish(&self) -> Result<(), TrackError> {
        self.write_meta(FINISHED, Some(now_ms()))
    }
}
