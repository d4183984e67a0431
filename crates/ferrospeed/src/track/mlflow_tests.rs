//! Tests of [`ServerRun`] against a stand-in for a tracking server (an HTTP listener on a loopback
//! port that records every request and answers as MLflow does): batches within MLflow's limits,
//! retries that deliver each value once, a continued run that sends only what the server lacks.
//! `ferrospeed-cli/tests/mlflow.rs` runs the real server.

use super::mlflow_server::{MlflowServer, RunEnd, ServerRun, RUN_FILE};
use super::StepMetrics;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// One request the stand-in received.
#[derive(Debug, Clone)]
struct Request {
    method: String,
    /// The path after `/api/2.0/mlflow/`, with its query.
    endpoint: String,
    body: serde_json::Value,
}

/// A tracking server's stand-in: experiment "7", new runs "new-run"; run "old-run" has
/// `old_steps` of every metric and the parameter `train.steps = "4"`.
struct Fake {
    port: u16,
    requests: Arc<Mutex<Vec<Request>>>,
}

impl Fake {
    /// Answers 503 to the first `failures` log-batch requests.
    fn start(failures: usize, old_steps: Vec<u64>) -> Fake {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let failures = Arc::new(AtomicUsize::new(failures));
        let log = requests.clone();
        // The thread ends with the test process; each connection carries one request.
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let _ = serve(stream, &log, &failures, &old_steps);
            }
        });
        Fake { port, requests }
    }

    fn server(&self) -> MlflowServer {
        MlflowServer { uri: format!("http://127.0.0.1:{}", self.port), experiment: "exp".into(), source: "track.mlflow_uri" }
    }

    fn requests(&self) -> Vec<Request> {
        self.requests.lock().unwrap().clone()
    }
}

fn serve(stream: TcpStream, log: &Mutex<Vec<Request>>, failures: &AtomicUsize, old_steps: &[u64]) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or("").to_string(), parts.next().unwrap_or("").to_string());
    let mut length = 0;
    loop {
        let mut header = String::new();
        reader.read_line(&mut header)?;
        if header.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = header.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                length = v.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    let endpoint = path.trim_start_matches("/api/2.0/mlflow/").to_string();
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    let route = endpoint.split('?').next().unwrap_or("").to_string();
    let (status, answer) = match route.as_str() {
        "experiments/get-by-name" => (200, serde_json::json!({"experiment": {"experiment_id": "7"}})),
        "runs/create" => (200, serde_json::json!({"run": {"info": {"run_id": "new-run"}}})),
        "runs/get" => (200, serde_json::json!({"run": {"info": {"lifecycle_stage": "active"}, "data": {"params": [{"key": "train.steps", "value": "4"}]}}})),
        "metrics/get-history" => {
            let key = endpoint.split("metric_key=").nth(1).unwrap_or("").split('&').next().unwrap_or("").to_string();
            let points: Vec<serde_json::Value> = old_steps.iter().map(|s| serde_json::json!({"key": key, "value": 1.0, "timestamp": 0, "step": s})).collect();
            (200, serde_json::json!({ "metrics": points }))
        }
        "runs/log-batch" if failures.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok() => (503, serde_json::json!({})),
        _ => (200, serde_json::json!({})),
    };
    if status == 200 {
        log.lock().unwrap().push(Request { method, endpoint, body });
    }
    let text = answer.to_string();
    let mut stream = stream;
    write!(stream, "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}", text.len())?;
    stream.flush()
}

fn row(step: u64) -> StepMetrics {
    StepMetrics { step, loss: 4.0 / step as f64, lr: 1e-3, grad_norm: 0.5, tokens: 64 * step, tokens_per_s: 1e4, mfu: None, step_ms: 10.0, peak_mem_bytes: 1, loss_scale: None, eval_loss: None, extra: BTreeMap::new() }
}

/// Every metric value the stand-in accepted, as (key, step), in arrival order.
fn logged_points(requests: &[Request]) -> Vec<(String, u64)> {
    let batches = requests.iter().filter(|r| r.endpoint == "runs/log-batch");
    batches.flat_map(|r| r.body["metrics"].as_array().cloned().unwrap_or_default()).map(|m| (m["key"].as_str().unwrap().to_string(), m["step"].as_u64().unwrap())).collect()
}

#[test]
fn batches_keep_within_mlflow_limits_and_retries_deliver_each_value_once() {
    let fake = Fake::start(2, vec![]);
    let dir = tempfile::tempdir().unwrap();
    // 150 parameters, one longer than MLflow takes.
    let mut section = serde_json::Map::new();
    for i in 0..149 {
        section.insert(format!("k{i:03}"), serde_json::json!(i));
    }
    section.insert("long".into(), serde_json::json!("x".repeat(7000)));
    let config = serde_json::json!({ "s": section });
    let run = ServerRun::start(&fake.server(), dir.path(), "run-a", &config, false).unwrap();
    // 450 steps of five metrics: 2250 values, more than two batches.
    for step in 1..=450 {
        run.log(&row(step));
    }
    run.end(RunEnd::Finished);

    let requests = fake.requests();
    let batches: Vec<&Request> = requests.iter().filter(|r| r.endpoint == "runs/log-batch").collect();
    for b in &batches {
        let count = |k: &str| b.body[k].as_array().map_or(0, |a| a.len());
        assert!(count("metrics") <= 1000 && count("params") <= 100, "{} metrics, {} params", count("metrics"), count("params"));
    }
    let params: Vec<&serde_json::Value> = batches.iter().flat_map(|b| b.body["params"].as_array().unwrap().iter()).collect();
    assert_eq!(params.len(), 150);
    let long = params.iter().find(|p| p["key"] == "s.long").unwrap();
    assert_eq!(long["value"].as_str().unwrap().len(), 6000);

    // The two refused batches came again: every value once, in order.
    let points = logged_points(&requests);
    let want: Vec<(String, u64)> = (1..=450).flat_map(|s| ["loss", "lr", "grad_norm", "tokens_per_s", "step_ms"].map(|k| (k.to_string(), s))).collect();
    assert_eq!(points, want);
    let last = requests.last().unwrap();
    assert_eq!((last.endpoint.as_str(), &last.body["status"], &last.body["run_id"]), ("runs/update", &serde_json::json!("FINISHED"), &serde_json::json!("new-run")));
    assert!(requests.iter().all(|r| r.method == "GET" || r.method == "POST"));
    let stored: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.path().join(RUN_FILE)).unwrap()).unwrap();
    assert_eq!((stored["run_id"].as_str(), stored["experiment_id"].as_str()), (Some("new-run"), Some("7")));
}

/// A run continued in `dir` whose run directory names run "old-run" of `fake`.
fn continued(fake: &Fake, dir: &std::path::Path, config: &serde_json::Value) -> ServerRun {
    let stored = serde_json::json!({ "tracking_uri": fake.server().uri, "experiment_id": "7", "run_id": "old-run" });
    std::fs::write(dir.join(RUN_FILE), stored.to_string()).unwrap();
    ServerRun::start(&fake.server(), dir, "run-a", config, true).unwrap()
}

#[test]
fn a_continued_run_sends_only_what_its_mlflow_run_lacks() {
    // The earlier attempt delivered steps 1 and 2 (of 3 kept) before it died.
    let fake = Fake::start(0, vec![1, 2]);
    let dir = tempfile::tempdir().unwrap();
    let run = continued(&fake, dir.path(), &serde_json::json!({ "train": { "steps": 6, "lr": 0.001 } }));
    run.resend(&(1..=3).map(row).collect::<Vec<_>>());
    for step in 4..=6 {
        run.log(&row(step));
    }
    run.end(RunEnd::Finished);

    let requests = fake.requests();
    assert!(!requests.iter().any(|r| r.endpoint == "runs/create"), "the same run goes on");
    let steps: Vec<u64> = logged_points(&requests).into_iter().filter(|(k, _)| k == "loss").map(|(_, s)| s).collect();
    assert_eq!(steps, [3, 4, 5, 6]);
    assert!(logged_points(&requests).iter().all(|(_, s)| *s >= 3));
    // train.steps keeps its first value (MLflow's params cannot change); lr is new.
    let params: Vec<serde_json::Value> = requests.iter().filter(|r| r.endpoint == "runs/log-batch").flat_map(|r| r.body["params"].as_array().cloned().unwrap_or_default()).collect();
    assert_eq!(params, [serde_json::json!({"key": "train.lr", "value": "0.001"})]);
    let statuses: Vec<&serde_json::Value> = requests.iter().filter(|r| r.endpoint == "runs/update").map(|r| &r.body["status"]).collect();
    assert_eq!(statuses, [&serde_json::json!("RUNNING"), &serde_json::json!("FINISHED")]);
}

#[test]
fn a_continued_run_with_nothing_new_keeps_its_status_when_dropped() {
    let fake = Fake::start(0, vec![1, 2]);
    let dir = tempfile::tempdir().unwrap();
    let run = continued(&fake, dir.path(), &serde_json::json!({}));
    run.resend(&(1..=2).map(row).collect::<Vec<_>>());
    drop(run);
    let requests = fake.requests();
    assert!(!requests.iter().any(|r| r.endpoint == "runs/update" || r.endpoint == "runs/log-batch"), "{requests:?}");
}
