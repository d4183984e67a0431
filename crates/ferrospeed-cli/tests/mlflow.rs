//! Logging to an MLflow tracking server: a real `mlflow server` (installed from PyPI by
//! `scripts/install-mlflow.sh`; `.ci/run` does it and sets `FERROSPEED_MLFLOW` and
//! `FERROSPEED_REQUIRE_MLFLOW=1`, which makes its absence a failure; elsewhere the tests skip,
//! recorded by `support::skip`) receives the params
//! and every step of a run, read back through its REST API; a run that continues logs each step
//! once into the same MLflow run; a server that stops answering or dies mid-run costs a warning,
//! never the run or its pace. A server that is not there at all needs no MLflow to test.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};
use support::*;

/// The `mlflow` command: `FERROSPEED_MLFLOW`, else the repository's `.mlflow-venv`, else `PATH`.
fn mlflow_command() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("FERROSPEED_MLFLOW").map(PathBuf::from).filter(|p| p.is_file()) {
        return Some(p);
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.mlflow-venv/bin/mlflow");
    if venv.is_file() {
        return Some(venv);
    }
    std::env::split_paths(&std::env::var_os("PATH")?).map(|d| d.join("mlflow")).find(|p| p.is_file())
}

/// A tracking server on a loopback port with a sqlite store in a temporary folder, in a process
/// group of its own (its workers go with it).
struct Server {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
    /// One server at a time: each takes seconds of CPU to start, and a 2-core machine running
    /// several at once with training beside them measures contention, not this code.
    _turn: MutexGuard<'static, ()>,
}

static TURN: Mutex<()> = Mutex::new(());

impl Server {
    /// A started server, or `None` (with a SKIPPED line) where MLflow is not installed and not required.
    fn start(test: &str) -> Option<Server> {
        let Some(mlflow) = mlflow_command() else {
            assert!(std::env::var("FERROSPEED_REQUIRE_MLFLOW").is_err(), "{test}: no mlflow command (FERROSPEED_MLFLOW, .mlflow-venv or PATH): run scripts/install-mlflow.sh");
            skip(test, "no mlflow command (scripts/install-mlflow.sh installs it)");
            return None;
        };
        let turn = TURN.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let dir = tempfile::tempdir().unwrap();
        // uvicorn takes a port, not a socket: a port found free may be taken before the server binds
        // it, so a server that exits at once is started again on another.
        for _ in 0..3 {
            let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let log = std::fs::File::create(dir.path().join("server.log")).unwrap();
            let mut child = Command::new(&mlflow)
                .args(["server", "--host", "127.0.0.1", "--port", &port.to_string(), "--workers", "1"])
                .arg("--backend-store-uri")
                .arg(format!("sqlite:///{}", dir.path().join("mlflow.db").display()))
                .arg("--default-artifact-root")
                .arg(dir.path().join("artifacts"))
                // No background job runner (a dozen processes this test has no use for).
                .env("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .process_group(0)
                .spawn()
                .expect("spawn mlflow server");
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(180) && child.try_wait().unwrap().is_none() {
                if http(port, "GET", "/health", "").is_some_and(|(status, _)| status == 200) {
                    return Some(Server { child, port, _dir: dir, _turn: turn });
                }
                std::thread::sleep(Duration::from_millis(250));
            }
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.wait();
            let log = std::fs::read_to_string(dir.path().join("server.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            eprintln!("mlflow server on port {port} did not come up:\n{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
        }
        panic!("{test}: the mlflow server did not start");
    }

    fn uri(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Send `signal` to the server's process group.
    fn signal(&self, signal: i32) {
        unsafe { libc::kill(-(self.child.id() as i32), signal) };
    }

    fn get(&self, path: &str) -> serde_json::Value {
        let (status, body) = http(self.port, "GET", path, "").expect("the server answers");
        assert_eq!(status, 200, "GET {path}: {body}");
        serde_json::from_str(&body).unwrap()
    }

    fn post(&self, path: &str, body: &serde_json::Value) -> serde_json::Value {
        let (status, text) = http(self.port, "POST", path, &body.to_string()).expect("the server answers");
        assert_eq!(status, 200, "POST {path}: {text}");
        serde_json::from_str(&text).unwrap()
    }

    /// (step, value) of every value of `key` in run `run_id`, in the server's order.
    fn history(&self, run_id: &str, key: &str) -> Vec<(u64, f64)> {
        let v = self.get(&format!("/api/2.0/mlflow/metrics/get-history?run_id={run_id}&metric_key={key}"));
        let points = v["metrics"].as_array().cloned().unwrap_or_default();
        points.iter().map(|m| (m["step"].as_u64().unwrap(), m["value"].as_f64().unwrap())).collect()
    }

    /// The runs of experiment `name`.
    fn runs(&self, name: &str) -> Vec<serde_json::Value> {
        let id = self.get(&format!("/api/2.0/mlflow/experiments/get-by-name?experiment_name={name}"))["experiment"]["experiment_id"].as_str().unwrap().to_string();
        self.post("/api/2.0/mlflow/runs/search", &serde_json::json!({ "experiment_ids": [id] }))["runs"].as_array().cloned().unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.signal(libc::SIGKILL);
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 request to the loopback port (`Connection: close`): (status, body), or `None`
/// when nothing answers within 10 s.
fn http(port: u16, method: &str, path: &str, body: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let request = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
    s.write_all(request.as_bytes()).ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, rest) = text.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    // A chunked answer: the chunks' bodies joined.
    let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        let mut out = String::new();
        let mut rest = rest;
        while let Some((size, tail)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).ok()?;
            if n == 0 {
                break;
            }
            out.push_str(tail.get(..n)?);
            rest = tail.get(n + 2..)?;
        }
        out
    } else {
        rest.to_string()
    };
    Some((status, body))
}

/// Every row of `TRACK/metrics.jsonl` as JSON.
fn rows(track: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(track.join("metrics.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// The run id the run directory keeps.
fn run_id(track: &Path) -> String {
    let stored: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(track.join("mlflow_run.json")).unwrap()).unwrap();
    stored["run_id"].as_str().unwrap().to_string()
}

/// The server holds exactly one value of each of these metrics per step of `metrics.jsonl`,
/// equal to it bit for bit.
fn assert_history_is_the_metrics(server: &Server, run_id: &str, track: &Path) {
    let rows = rows(track);
    for key in ["loss", "lr", "grad_norm"] {
        let want: Vec<(u64, f64)> = rows.iter().map(|r| (r["step"].as_u64().unwrap(), r[key].as_f64().unwrap())).collect();
        let mut got = server.history(run_id, key);
        got.sort_by_key(|p| p.0);
        assert_eq!(got.len(), want.len(), "{key}: one value per step: {got:?}");
        for ((gs, gv), (ws, wv)) in got.iter().zip(&want) {
            assert_eq!((gs, gv.to_bits()), (ws, wv.to_bits()), "{key} at step {ws}: server {gv}, metrics.jsonl {wv}");
        }
    }
}

fn mlflow_sets(server_uri: &str, experiment: &str) -> Vec<String> {
    vec![format!("track.mlflow_uri={server_uri}"), format!("track.mlflow_experiment={experiment}")]
}

#[test]
fn a_run_logs_its_params_and_every_step_to_the_tracking_server() {
    let Some(server) = Server::start("a_run_logs_its_params_and_every_step_to_the_tracking_server") else { return };
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), TINY, "steps = 12\nglobal_batch = 4\nmicro_batch = 2\nwarmup = 2");
    let track = dir.path().join("tiny-run");
    // Two ranks: only rank 0 logs, so the experiment holds one run.
    let f = run(&mut train_command(2, &config, &track, &mlflow_sets(&server.uri(), "ferrospeed-test")), Duration::from_secs(300));
    assert!(f.status.success(), "{}\n{}", f.stdout, f.stderr);
    assert!(!f.stderr.contains("warning: mlflow"), "{}", f.stderr);
    let id = run_id(&track);
    assert!(f.stderr.contains(&format!("mlflow: run tiny-run in experiment \"ferrospeed-test\": {}/#/experiments/", server.uri())), "{}", f.stderr);

    let runs = server.runs("ferrospeed-test");
    assert_eq!(runs.len(), 1, "{runs:?}");
    let info = &runs[0]["info"];
    assert_eq!((info["run_id"].as_str(), info["run_name"].as_str(), info["status"].as_str()), (Some(id.as_str()), Some("tiny-run"), Some("FINISHED")));
    assert!(info["end_time"].as_u64().is_some_and(|end| end >= info["start_time"].as_u64().unwrap()), "{info}");

    let run = server.get(&format!("/api/2.0/mlflow/runs/get?run_id={id}"));
    let pairs = |what: &str| -> Vec<(String, String)> {
        run["run"]["data"][what].as_array().unwrap().iter().map(|p| (p["key"].as_str().unwrap().to_string(), p["value"].as_str().unwrap().to_string())).collect()
    };
    let params = pairs("params");
    for want in [("model.n_layer", "2"), ("train.steps", "12"), ("train.global_batch", "4"), ("zero.stage", "0"), ("track.mlflow_experiment", "ferrospeed-test")] {
        assert!(params.contains(&(want.0.to_string(), want.1.to_string())), "{want:?} in {params:?}");
    }
    let tags = pairs("tags");
    let run_dir = track.canonicalize().unwrap().display().to_string();
    assert!(tags.contains(&("ferrospeed.run_dir".to_string(), run_dir)), "{tags:?}");
    assert_eq!(rows(&track).len(), 12);
    assert_history_is_the_metrics(&server, &id, &track);
}

#[test]
fn a_continued_run_logs_each_step_once_into_the_same_mlflow_run() {
    let Some(server) = Server::start("a_continued_run_logs_each_step_once_into_the_same_mlflow_run") else { return };
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), TINY, "steps = 4\nglobal_batch = 4\nmicro_batch = 2\nwarmup = 2");
    let track = dir.path().join("run");
    let ck = dir.path().join("ck");
    let mut sets = mlflow_sets(&server.uri(), "continued");
    sets.extend([format!("checkpoint.dir={}", ck.display()), "checkpoint.every=2".into()]);
    let steps = |n: u64| [sets.clone(), vec![format!("train.steps={n}")]].concat();
    // Four steps, then the same run raised to eight dies saving step 6 (rows 1-5, `latest` at 4),
    // then the identical command finishes it.
    train(2, &config, &track, &steps(4));
    let id = run_id(&track);
    let f = run(train_command(2, &config, &track, &steps(8)).env("FERROSPEED_FAULT", "shards-written@6@1"), Duration::from_secs(120));
    assert!(!f.status.success(), "the run must die: {}", f.stdout);
    let f = run(&mut train_command(2, &config, &track, &steps(8)), Duration::from_secs(300));
    assert!(f.status.success(), "{}\n{}", f.stdout, f.stderr);
    assert!(!f.stderr.contains("warning: mlflow"), "{}", f.stderr);

    assert_eq!(run_id(&track), id, "the same MLflow run goes on");
    let runs = server.runs("continued");
    assert_eq!(runs.len(), 1, "{runs:?}");
    assert_eq!(runs[0]["info"]["status"].as_str(), Some("FINISHED"));
    assert_eq!(rows(&track).iter().map(|r| r["step"].as_u64().unwrap()).collect::<Vec<_>>(), (1..=8).collect::<Vec<u64>>());
    assert_history_is_the_metrics(&server, &id, &track);
    // A parameter keeps its first value in MLflow; config.json has the raised one.
    let run = server.get(&format!("/api/2.0/mlflow/runs/get?run_id={id}"));
    let steps_param = run["run"]["data"]["params"].as_array().unwrap().iter().find(|p| p["key"] == "train.steps").cloned();
    assert_eq!(steps_param.map(|p| p["value"].clone()), Some(serde_json::json!("4")));
}

#[test]
fn a_server_that_hangs_then_dies_mid_run_costs_a_warning_not_the_run() {
    let Some(server) = Server::start("a_server_that_hangs_then_dies_mid_run_costs_a_warning_not_the_run") else { return };
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), TINY, "steps = 300\nglobal_batch = 4\nmicro_batch = 2\nwarmup = 2");
    let track = dir.path().join("run");
    let child = start(&mut train_command(1, &config, &track, &mlflow_sets(&server.uri(), "gone")));
    // Once the run is on the server, the server stops answering (connections accepted by the
    // kernel, never served: every request runs into its time limit), then dies.
    let begun = Instant::now();
    while !track.join("mlflow_run.json").exists() {
        assert!(begun.elapsed() < Duration::from_secs(120), "the run never reached the server");
        std::thread::sleep(Duration::from_millis(20));
    }
    server.signal(libc::SIGSTOP);
    let done_then = rows(&track).len();
    assert!(done_then < 300, "the server must go away mid-run: training was over when it did");
    // Longer than a request's time limit (5 s): a client that made training wait would show it.
    std::thread::sleep(Duration::from_secs(7));
    server.signal(libc::SIGKILL);
    let killed = Instant::now();
    let f = finish(child, Duration::from_secs(300));
    assert!(f.status.success(), "{}\n{}", f.stdout, f.stderr);
    let rows = rows(&track);
    assert_eq!(rows.len(), 300, "every step in metrics.jsonl");
    // Training never waited on the server: the training loop's time outside its steps (logging
    // among them; a step's own time is measured before its row is logged) stayed under a request's
    // time limit (5 s) and the server's 7 hung seconds, and the run ended within the end's delivery
    // time (10 s) and one request of the kill.
    let summary: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(track.join("summary.json")).unwrap()).unwrap();
    let in_steps: f64 = rows.iter().map(|r| r["step_ms"].as_f64().unwrap()).sum::<f64>() / 1e3;
    let outside = summary["seconds"].as_f64().unwrap() - in_steps;
    eprintln!("the loop spent {outside:.2} s outside its steps; the run ended {:?} after the kill", killed.elapsed());
    assert!(outside < 4.0, "the loop spent {outside:.1} s outside its steps");
    assert!(killed.elapsed() < Duration::from_secs(40), "the run ended {:?} after the server died", killed.elapsed());
    let warnings: Vec<&str> = f.stderr.lines().filter(|l| l.contains("warning: mlflow")).collect();
    assert_eq!(warnings.len(), 2, "one warning when the server went away, one summary at the end: {}", f.stderr);
    assert!(warnings[0].contains(&format!("cannot reach {}", server.uri())) && warnings[0].contains("training goes on"), "{}", warnings[0]);
    assert!(warnings[1].contains("values did not reach") && warnings[1].contains("metrics.jsonl has every step"), "{}", warnings[1]);
}

#[test]
fn a_tracking_server_that_is_not_there_costs_a_warning_not_the_run() {
    // Needs no MLflow: a port that refuses connections.
    let nothing = RefusingPort::new();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), TINY, "steps = 6\nglobal_batch = 4\nmicro_batch = 2\nwarmup = 2");
    let track = dir.path().join("run");
    let uri = format!("http://127.0.0.1:{}", nothing.port);
    let f = run(&mut train_command(1, &config, &track, &mlflow_sets(&uri, "none")), Duration::from_secs(120));
    assert!(f.status.success(), "{}\n{}", f.stdout, f.stderr);
    assert_eq!(rows(&track).len(), 6);
    let warnings: Vec<&str> = f.stderr.lines().filter(|l| l.contains("warning: mlflow")).collect();
    assert_eq!(warnings.len(), 2, "{}", f.stderr);
    assert!(warnings[0].contains(&format!("cannot reach {uri}")), "{}", warnings[0]);
    // Six steps of five metrics; nothing reached the server.
    assert!(warnings[1].contains("30 of 30 values did not reach"), "{}", warnings[1]);
    assert!(!track.join("mlflow_run.json").exists());
    // A URL that is not one is a config error naming the key, before anything is written.
    let f = run(&mut train_command(1, &config, &dir.path().join("bad"), &mlflow_sets("localhost:5000", "none")), Duration::from_secs(60));
    assert_eq!(f.status.code(), Some(2), "{}", f.stderr);
    assert!(f.stderr.contains("track.mlflow_uri = \"localhost:5000\" is not an http or https URL"), "{}", f.stderr);
    assert!(!dir.path().join("bad").exists());
}
