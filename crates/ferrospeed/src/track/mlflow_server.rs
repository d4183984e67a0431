//! Logging a run to an MLflow tracking server without ever holding up training: [`ServerRun`]
//! hands each step's metrics to a background thread through a bounded queue and returns at once;
//! the thread creates (or finds again) the run, logs the config as parameters, sends the metrics in
//! batches within MLflow's limits, retries what fails with backoff, and ends the run.
//!
//! A server that cannot be reached costs one warning line; the values wait (up to a bound) and go
//! out when it answers again. At the end the thread gets [`FLUSH_TIMEOUT`] to deliver what is left
//! and says in one line how many values never arrived (`metrics.jsonl` has them all).
//!
//! A run directory is one MLflow run: its id is kept in `<run dir>/mlflow_run.json`, so a run that
//! continues from its checkpoint continues the same MLflow run. MLflow keeps every value logged and
//! cannot delete one, so a continued run asks the server which steps it already has and sends
//! only the others: each step has exactly one value on the server, the one first delivered (on CPU
//! the recomputed steps are bitwise the same; on a GPU they may differ in the last bits from
//! `metrics.jsonl`). Steps the server missed while it was away are sent again from the rows kept.

use super::mlflow_rest::{self, CallError, Point, RestClient, MAX_METRICS_PER_BATCH, MAX_PARAMS_PER_BATCH};
use super::{StepMetrics, TrackError};
use std::collections::{HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Where a run's MLflow server is, from the config (or the environment).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MlflowServer {
    /// `http(s)://host[:port][/path]`, no trailing `/`.
    pub uri: String,
    pub experiment: String,
    /// Where the URI came from (`track.mlflow_uri` or `MLFLOW_TRACKING_URI`), for messages.
    pub source: &'static str,
}

/// The file in the run directory that names the run's MLflow run.
pub(super) const RUN_FILE: &str = "mlflow_run.json";
/// Time the end of a run gives the thread to deliver what is left.
pub(super) const FLUSH_TIMEOUT: Duration = Duration::from_secs(10);
/// Steps the queue holds before the training thread drops rows (counted) rather than wait.
const QUEUE_ROWS: usize = 4096;
/// Values held for a server that does not answer; the oldest go first beyond this (8 MB).
const MAX_PENDING: usize = 200_000;
/// How long values gather before a batch goes out (fewer requests; a chart a second behind).
const BATCH_EVERY: Duration = Duration::from_secs(1);
/// Retry delays: doubling from the first to the last.
const BACKOFF_FIRST: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// How a run ended, as MLflow's `RunStatus` says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunEnd {
    Finished,
    /// An error ended it (the tracker was dropped without finishing).
    Failed,
    /// Stopped by a signal.
    Killed,
}

impl RunEnd {
    fn status(self) -> &'static str {
        match self {
            RunEnd::Finished => "FINISHED",
            RunEnd::Failed => "FAILED",
            RunEnd::Killed => "KILLED",
        }
    }
}

enum Msg {
    /// New steps, logged at this time (ms since the epoch).
    Rows(Vec<StepMetrics>, u64),
    /// A continued run's earlier rows: sent where the server lacks them.
    Resend(Vec<StepMetrics>, u64),
    End(RunEnd),
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// The points of `rows` logged at `timestamp_ms`.
fn points(rows: &[StepMetrics], timestamp_ms: u64) -> impl Iterator<Item = Point> + '_ {
    rows.iter().flat_map(move |m| super::tracker::scalars(m).into_iter().map(move |(key, value)| Point { key, value, timestamp_ms, step: m.step }))
}

/// What `<run dir>/mlflow_run.json` holds.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct StoredRun {
    tracking_uri: String,
    experiment_id: String,
    run_id: String,
}

/// The training thread's end of a run on a tracking server (rank 0 only).
pub struct ServerRun {
    queue: Option<SyncSender<Msg>>,
    done: Receiver<()>,
    /// Rows dropped because the queue was full (the thread was behind by [`QUEUE_ROWS`] steps).
    dropped_rows: Arc<AtomicU64>,
}

impl ServerRun {
    /// Starts the thread that logs the run of `run_dir`, named `name`, with the config's parameters.
    /// `continuing`: the run directory's MLflow run (if it has one on this server) goes on.
    /// Nothing here touches the network: the thread does, so a server that is down delays nothing.
    pub fn start(server: &MlflowServer, run_dir: &Path, name: &str, config: &serde_json::Value, continuing: bool) -> Result<Self, TrackError> {
        let stored = continuing
            .then(|| std::fs::read_to_string(run_dir.join(RUN_FILE)).ok())
            .flatten()
            .and_then(|t| serde_json::from_str::<StoredRun>(&t).ok())
            .filter(|s| s.tracking_uri == server.uri);
        let (queue, inbox) = sync_channel(QUEUE_ROWS);
        let (done_tx, done) = sync_channel(1);
        let dropped_rows = Arc::new(AtomicU64::new(0));
        let mut worker = Worker {
            rest: RestClient::new(&server.uri),
            server: server.clone(),
            run_dir: run_dir.to_path_buf(),
            name: name.to_string(),
            start_ms: now_ms(),
            params_left: super::mlflow::params(config).into_iter().map(|(k, v)| (k, mlflow_rest::param_value(&v))).collect(),
            stored,
            run_id: None,
            present: HashSet::new(),
            touched: !continuing,
            continuing,
            reopen: false,
            reopened: false,
            pending: VecDeque::new(),
            end: None,
            end_sent: false,
            stats: Stats::default(),
            warned: false,
            backoff: BACKOFF_FIRST,
            next_try: Instant::now(),
            last_batch: Instant::now(),
            gave_up: None,
            dropped_rows: dropped_rows.clone(),
        };
        std::thread::Builder::new()
            .name("mlflow".into())
            .spawn(move || {
                worker.run(&inbox);
                let _ = done_tx.send(());
            })
            .map_err(|source| TrackError::Write { path: run_dir.join(RUN_FILE), source })?;
        Ok(Self { queue: Some(queue), done, dropped_rows })
    }

    /// Queue one step's metrics; never waits. A full queue drops the row (counted, reported at
    /// the end): the thread is then `QUEUE_ROWS` steps behind and training goes first.
    pub fn log(&self, m: &StepMetrics) {
        self.send(Msg::Rows(vec![m.clone()], now_ms()), 1);
    }

    /// A continued run's rows kept from its earlier part: those the server lacks are sent.
    pub fn resend(&self, rows: &[StepMetrics]) {
        self.send(Msg::Resend(rows.to_vec(), now_ms()), rows.len() as u64);
    }

    fn send(&self, msg: Msg, rows: u64) {
        if let Some(q) = &self.queue {
            if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = q.try_send(msg) {
                self.dropped_rows.fetch_add(rows, Ordering::Relaxed);
            }
        }
    }

    /// End the run with `how`: the thread delivers what it holds, for at most `FLUSH_TIMEOUT`
    /// (plus one request in flight), sets the run's status and reports what it could not send.
    pub fn end(mut self, how: RunEnd) {
        self.end_once(how);
    }

    fn end_once(&mut self, how: RunEnd) {
        if let Some(q) = self.queue.take() {
            // A blocking send: the thread drains the queue between requests, so this waits at most
            // for the request in flight.
            if q.send(Msg::End(how)).is_ok() {
                let _ = self.done.recv_timeout(FLUSH_TIMEOUT + 2 * mlflow_rest::REQUEST_TIMEOUT + Duration::from_secs(1));
            }
        }
    }
}

impl Drop for ServerRun {
    /// A run dropped without [`ServerRun::end`] ended by an error.
    fn drop(&mut self) {
        self.end_once(RunEnd::Failed);
    }
}


#[derive(Debug, Default)]
struct Stats {
    /// Values handed to the thread; lost (held too long for a silent server, or refused).
    queued: u64,
    lost: u64,
    last_error: Option<String>,
}

/// Which request failed.
enum Stage {
    Run,
    Params,
    Metrics(usize),
    Status,
}

/// The background thread's state.
struct Worker {
    rest: RestClient,
    server: MlflowServer,
    run_dir: PathBuf,
    name: String,
    start_ms: u64,
    /// Parameters still to log (a continued run's run keeps those it has: MLflow's cannot change).
    params_left: Vec<(String, String)>,
    /// The run this run directory logged to before (a continued run), not yet looked up.
    stored: Option<StoredRun>,
    run_id: Option<String>,
    /// (metric, step) pairs the server already had when a continued run found its run again.
    present: HashSet<(&'static str, u64)>,
    /// New steps were logged in this process (a fresh run always counts as such): only then does
    /// the run's status change, so asking a finished run again leaves it finished.
    touched: bool,
    continuing: bool,
    /// A continued run that logs again is RUNNING again: to send (`reopen`), decided (`reopened`).
    reopen: bool,
    reopened: bool,
    pending: VecDeque<Point>,
    /// How the run ends, and until when the thread may try to deliver.
    end: Option<(RunEnd, Instant)>,
    end_sent: bool,
    stats: Stats,
    /// The one warning of an unreachable server was printed.
    warned: bool,
    backoff: Duration,
    next_try: Instant,
    last_batch: Instant,
    /// Why the server will take nothing for this run (it refused to create or find it).
    gave_up: Option<String>,
    dropped_rows: Arc<AtomicU64>,
}

/// The metrics a step can have (`tracker::scalars`), whose history a continued run reads.
const METRIC_KEYS: [&str; 8] = ["loss", "lr", "grad_norm", "tokens_per_s", "step_ms", "mfu", "loss_scale", "eval_loss"];
/// Batches sent before the thread looks at its queue again.
const BATCHES_PER_TURN: usize = 8;

impl Worker {
    fn run(&mut self, inbox: &Receiver<Msg>) {
        let mut inbox_open = true;
        loop {
            let wait = if self.has_work() {
                self.next_try.saturating_duration_since(Instant::now())
            } else if self.pending.is_empty() {
                // Nothing to do until a message comes.
                Duration::from_secs(3600)
            } else {
                BATCH_EVERY.saturating_sub(self.last_batch.elapsed())
            };
            let wait = wait.max(Duration::from_millis(1));
            if !inbox_open {
                // After the end the queue is closed: only the retries' waits remain.
                std::thread::sleep(wait);
            } else {
                match inbox.recv_timeout(wait) {
                    Ok(msg) => self.take(msg),
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => {
                        inbox_open = false;
                        // The training side went away without a word: as a drop, an error.
                        self.take(Msg::End(RunEnd::Failed));
                    }
                }
            }
            while let Ok(msg) = inbox.try_recv() {
                self.take(msg);
            }
            if self.has_work() && Instant::now() >= self.next_try {
                match self.work() {
                    Ok(()) => self.backoff = BACKOFF_FIRST,
                    Err((stage, e)) => self.failed(stage, e),
                }
            }
            if let Some((_, deadline)) = self.end {
                if self.end_sent || self.gave_up.is_some() || Instant::now() >= deadline {
                    break;
                }
            }
        }
        self.report();
    }

    fn take(&mut self, msg: Msg) {
        let (rows, timestamp_ms) = match msg {
            Msg::Rows(rows, t) => {
                self.touched = true;
                if self.continuing && !self.reopened {
                    self.reopen = true;
                    self.reopened = true;
                }
                (rows, t)
            }
            Msg::Resend(rows, t) => (rows, t),
            Msg::End(how) => {
                if self.end.is_none() {
                    self.end = Some((how, Instant::now() + FLUSH_TIMEOUT));
                    // One try right away, whatever the backoff had planned.
                    self.next_try = Instant::now();
                    // A start that failed before its first step, with no run on the server yet:
                    // nothing to say there (and no wait for a server that is away).
                    if self.run_id.is_none() && self.pending.is_empty() && how != RunEnd::Finished {
                        self.end_sent = true;
                    }
                }
                return;
            }
        };
        for p in points(&rows, timestamp_ms) {
            self.stats.queued += 1;
            if self.gave_up.is_some() {
                self.stats.lost += 1;
                continue;
            }
            if self.pending.len() >= MAX_PENDING {
                self.pending.pop_front();
                self.stats.lost += 1;
            }
            self.pending.push_back(p);
        }
    }
}

impl Worker {
    /// Whether a request is to be made (when `next_try` comes): the run to find or create, its
    /// parameters or status to send, a batch due (enough values for a full one, or a second since
    /// the last), or the end.
    fn has_work(&self) -> bool {
        let batch_due = !self.pending.is_empty() && (self.pending.len() >= MAX_METRICS_PER_BATCH || self.last_batch.elapsed() >= BATCH_EVERY);
        self.gave_up.is_none() && (self.end.is_some() || self.run_id.is_none() || !self.params_left.is_empty() || self.reopen || batch_due)
    }

    /// Everything that can be done now, in order: the run, its parameters, RUNNING again, the
    /// metrics, and at the end the status.
    fn work(&mut self) -> Result<(), (Stage, CallError)> {
        if self.run_id.is_none() {
            self.find_or_create_run().map_err(|e| (Stage::Run, e))?;
        }
        let run_id = self.run_id.clone().unwrap_or_default();
        while !self.params_left.is_empty() {
            let n = self.params_left.len().min(MAX_PARAMS_PER_BATCH);
            self.rest.log_batch(&run_id, &[], &self.params_left[..n], &[]).map_err(|e| (Stage::Params, e))?;
            self.params_left.drain(..n);
        }
        if self.reopen {
            self.rest.update_run(&run_id, "RUNNING", None).map_err(|e| (Stage::Status, e))?;
            self.reopen = false;
        }
        for _ in 0..BATCHES_PER_TURN {
            if self.pending.is_empty() {
                break;
            }
            let n = self.pending.len().min(MAX_METRICS_PER_BATCH);
            let batch: Vec<Point> = self.pending.iter().take(n).filter(|p| !self.present.contains(&(p.key, p.step))).cloned().collect();
            if !batch.is_empty() {
                self.rest.log_batch(&run_id, &batch, &[], &[]).map_err(|e| (Stage::Metrics(n), e))?;
            }
            self.pending.drain(..n);
            self.last_batch = Instant::now();
        }
        if let (Some((how, _)), true, false) = (self.end, self.pending.is_empty(), self.end_sent) {
            // A continued run that logged nothing new (asked again after it ended) keeps its status.
            if self.touched || how == RunEnd::Finished {
                self.rest.update_run(&run_id, how.status(), Some(now_ms())).map_err(|e| (Stage::Status, e))?;
            }
            self.end_sent = true;
        }
        Ok(())
    }

    /// The run of this run directory: the one it logged to before if the server still has it,
    /// else a new one, whose id goes into the run directory.
    fn find_or_create_run(&mut self) -> Result<(), CallError> {
        if let Some(stored) = self.stored.take() {
            match self.rest.run_state(&stored.run_id) {
                Ok(state) if state.active => {
                    let mut present = HashSet::new();
                    for key in METRIC_KEYS {
                        let steps = self.rest.metric_steps(&stored.run_id, key).inspect_err(|_| self.stored = Some(stored.clone()))?;
                        present.extend(steps.into_iter().map(|s| (key, s)));
                    }
                    self.present = present;
                    // A continued run that raised train.steps keeps the first value (config.json
                    // has the new one).
                    self.params_left.retain(|(k, _)| !state.params.contains_key(k));
                    self.run_id = Some(stored.run_id);
                    return Ok(());
                }
                // A deleted run takes no more values.
                Ok(_) | Err(CallError::Rejected { status: 404, .. }) => {
                    eprintln!("warning: mlflow: run {} of {} is gone from {} (deleted?): this run continues in a new MLflow run", stored.run_id, self.run_dir.display(), self.server.uri);
                }
                Err(e) => {
                    self.stored = Some(stored);
                    return Err(e);
                }
            }
        }
        let experiment_id = self.rest.experiment_id(&self.server.experiment)?;
        let run_dir = self.run_dir.canonicalize().unwrap_or_else(|_| self.run_dir.clone());
        let mut tags = vec![
            ("mlflow.source.name".to_string(), "ferrospeed".to_string()),
            ("mlflow.source.type".to_string(), "LOCAL".to_string()),
            ("ferrospeed.run_dir".to_string(), run_dir.display().to_string()),
        ];
        if let Some(user) = std::env::var("USER").ok().or_else(|| std::env::var("LOGNAME").ok()) {
            tags.push(("mlflow.user".to_string(), user));
        }
        let run_id = self.rest.create_run(&experiment_id, &self.name, self.start_ms, &tags)?;
        let stored = StoredRun { tracking_uri: self.server.uri.clone(), experiment_id: experiment_id.clone(), run_id: run_id.clone() };
        if let Err(e) = write_stored(&self.run_dir, &stored) {
            eprintln!("warning: mlflow: cannot keep the run id in {}: {e}; a continued run would log to a new MLflow run", self.run_dir.display());
        }
        eprintln!("mlflow: run {} in experiment \"{}\": {}/#/experiments/{experiment_id}/runs/{run_id}", self.name, self.server.experiment, self.server.uri);
        self.run_id = Some(run_id);
        Ok(())
    }

    /// A request failed: retry later if the server may come back, else drop what it refused.
    fn failed(&mut self, stage: Stage, e: CallError) {
        let why = e.describe();
        self.stats.last_error = Some(why.clone());
        match (e, stage) {
            (CallError::Unreachable(_), _) => {
                if !std::mem::replace(&mut self.warned, true) {
                    eprintln!("warning: mlflow: cannot reach {} ({why}); training goes on, the values are kept and sent when it answers", self.server.uri);
                }
                // At the end, tries come at least every second until the deadline.
                let cap = if self.end.is_some() { Duration::from_secs(1) } else { BACKOFF_MAX };
                self.next_try = Instant::now() + self.backoff.min(cap);
                self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
            }
            (CallError::Rejected { .. }, Stage::Run) => {
                eprintln!("warning: mlflow: {} refused the run ({why}); nothing is logged there", self.server.uri);
                self.gave_up = Some(why);
            }
            (CallError::Rejected { .. }, Stage::Params) => {
                eprintln!("warning: mlflow: {} refused the parameters ({why}); the metrics are still logged", self.server.uri);
                self.params_left.clear();
            }
            (CallError::Rejected { .. }, Stage::Metrics(n)) => {
                self.pending.drain(..n.min(self.pending.len()));
                self.stats.lost += n as u64;
            }
            (CallError::Rejected { .. }, Stage::Status) => {
                self.reopen = false;
                if self.end.is_some() {
                    self.end_sent = true;
                }
            }
        }
    }

    /// One line at the end when anything did not reach the server.
    fn report(&self) {
        let left = self.pending.len() as u64;
        let lost = self.stats.lost + left;
        let dropped = self.dropped_rows.load(Ordering::Relaxed);
        if lost == 0 && dropped == 0 && (self.end_sent || self.gave_up.is_some()) {
            return;
        }
        let mut what = format!("{lost} of {} values did not reach {}", self.stats.queued, self.server.uri);
        if dropped > 0 {
            what.push_str(&format!(", and {dropped} steps were dropped while the queue to it was full"));
        }
        if self.run_id.is_none() {
            what.push_str(", nor did the run itself");
        } else if !self.end_sent && self.gave_up.is_none() {
            what.push_str(", and the run's status was not set");
        }
        let why = self.gave_up.as_ref().or(self.stats.last_error.as_ref()).map_or(String::new(), |w| format!(" (last error: {w})"));
        eprintln!("warning: mlflow: {what}{why}; {} has every step", self.run_dir.join(super::tracker::METRICS_FILE).display());
    }
}

/// Write `<run dir>/mlflow_run.json` through a temporary file and a rename (never half a file).
fn write_stored(run_dir: &Path, stored: &StoredRun) -> std::io::Result<()> {
    let tmp = run_dir.join(format!(".{RUN_FILE}.tmp"));
    std::fs::write(&tmp, serde_json::to_string_pretty(stored).map_err(std::io::Error::other)?)?;
    std::fs::rename(&tmp, run_dir.join(RUN_FILE))
}
