//! The calls of MLflow's tracking REST API (`/api/2.0/mlflow/…`) that a training run makes, over a
//! blocking HTTP client (ureq: no async runtime for a handful of requests a second), with the
//! Python client's authentication (`MLFLOW_TRACKING_USERNAME`/`PASSWORD` as Basic, else
//! `MLFLOW_TRACKING_TOKEN` as Bearer) and its proxy variables.
//!
//! Every call answers [`CallError::Unreachable`] for what may pass (no connection, a timeout, 429,
//! 5xx: the caller retries later) and [`CallError::Rejected`] for what will not (any other 4xx: the
//! request itself is wrong, or the run is gone). Knows nothing of threads or queues.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// MLflow's request limits (`mlflow/utils/validation.py`): metrics and params of one `log-batch`,
/// and the length of a parameter's value.
pub(super) const MAX_METRICS_PER_BATCH: usize = 1000;
pub(super) const MAX_PARAMS_PER_BATCH: usize = 100;
pub(super) const MAX_PARAM_VALUE_CHARS: usize = 6000;
/// One request's time limit, and the part of it a connection may take: a server that is gone costs
/// the background thread this much per try, never the training thread.
pub(super) const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Why a call failed.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum CallError {
    /// Worth retrying: the server could not be reached, timed out, is overloaded or failing.
    Unreachable(String),
    /// Not worth retrying: the server refused the request (`error_code`: MLflow's, e.g.
    /// `RESOURCE_DOES_NOT_EXIST`).
    Rejected { status: u16, error_code: String, message: String },
}

impl CallError {
    /// One line for a warning.
    pub(super) fn describe(&self) -> String {
        match self {
            CallError::Unreachable(why) => why.clone(),
            CallError::Rejected { status, error_code, message } => {
                let message: String = message.chars().map(|c| if c.is_control() { ' ' } else { c }).take(300).collect();
                format!("HTTP {status} {error_code}: {message}")
            }
        }
    }

    fn is(&self, code: &str) -> bool {
        matches!(self, CallError::Rejected { error_code, .. } if error_code == code)
    }
}

/// One value of one metric at one step.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Point {
    pub key: &'static str,
    pub value: f64,
    /// Milliseconds since the epoch, when the step was logged.
    pub timestamp_ms: u64,
    pub step: u64,
}

/// What `runs/get` says of a run that continues.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct RunState {
    pub params: BTreeMap<String, String>,
    /// `lifecycle_stage == "active"` (a deleted run takes no more values).
    pub active: bool,
}

/// A JSON number, or the strings protobuf's JSON mapping uses for what JSON has no number for (the
/// server reads both; a bare `NaN` would be misread).
fn json_f64(v: f64) -> serde_json::Value {
    match serde_json::Number::from_f64(v) {
        Some(n) => serde_json::Value::Number(n),
        None if v.is_nan() => "NaN".into(),
        None if v > 0.0 => "Infinity".into(),
        None => "-Infinity".into(),
    }
}

/// `value` cut to MLflow's limit on a parameter's length (whole characters).
pub(super) fn param_value(value: &str) -> String {
    value.chars().take(MAX_PARAM_VALUE_CHARS).collect()
}

/// A client of one tracking server.
pub(super) struct RestClient {
    agent: ureq::Agent,
    /// `<uri>/api/2.0/mlflow`.
    api: String,
    authorization: Option<String>,
}

/// The `Authorization` header MLflow's Python client sends for this environment.
pub(super) fn authorization(env: impl Fn(&str) -> Option<String>) -> Option<String> {
    use base64::Engine;
    match (env("MLFLOW_TRACKING_USERNAME"), env("MLFLOW_TRACKING_PASSWORD"), env("MLFLOW_TRACKING_TOKEN")) {
        (Some(user), Some(password), _) => Some(format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}")))),
        (_, _, Some(token)) => Some(format!("Bearer {token}")),
        _ => None,
    }
}

impl RestClient {
    /// A client of the server at `uri` (validated, no trailing `/`), authenticated from the
    /// environment.
    pub(super) fn new(uri: &str) -> Self {
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(REQUEST_TIMEOUT))
            .timeout_connect(Some(CONNECT_TIMEOUT))
            // Statuses are answers here (a 404 of a run that is gone), not transport errors.
            .http_status_as_error(false)
            .user_agent(concat!("ferrospeed/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        Self { agent, api: format!("{uri}/api/2.0/mlflow"), authorization: authorization(|n| std::env::var(n).ok().filter(|v| !v.is_empty())) }
    }

    fn answer(result: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Result<serde_json::Value, CallError> {
        let mut response = result.map_err(|e| CallError::Unreachable(e.to_string()))?;
        let status = response.status().as_u16();
        let text = response.body_mut().read_to_string().map_err(|e| CallError::Unreachable(format!("reading the answer: {e}")))?;
        if status == 429 || status >= 500 {
            return Err(CallError::Unreachable(format!("HTTP {status}")));
        }
        let json: serde_json::Value = serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
        if !(200..300).contains(&status) {
            let field = |k: &str| json.get(k).and_then(|v| v.as_str()).unwrap_or_default().to_string();
            let message = if json.is_null() { text.chars().take(200).collect() } else { field("message") };
            return Err(CallError::Rejected { status, error_code: field("error_code"), message });
        }
        Ok(json)
    }

    fn get(&self, endpoint: &str, query: &[(&str, &str)]) -> Result<serde_json::Value, CallError> {
        let mut request = self.agent.get(format!("{}/{endpoint}", self.api));
        for (k, v) in query {
            request = request.query(*k, *v);
        }
        if let Some(auth) = &self.authorization {
            request = request.header("Authorization", auth);
        }
        Self::answer(request.call())
    }

    fn post(&self, endpoint: &str, body: &serde_json::Value) -> Result<serde_json::Value, CallError> {
        let mut request = self.agent.post(format!("{}/{endpoint}", self.api)).content_type("application/json");
        if let Some(auth) = &self.authorization {
            request = request.header("Authorization", auth);
        }
        Self::answer(request.send(body.to_string()))
    }

    /// The id of the experiment `name`, created if the server has none of that name (two jobs that
    /// create it at once both end with the one that won).
    pub(super) fn experiment_id(&self, name: &str) -> Result<String, CallError> {
        let id = |v: &serde_json::Value, path: &[&str]| path.iter().try_fold(v, |v, k| v.get(k)).and_then(|v| v.as_str()).map(str::to_string);
        match self.get("experiments/get-by-name", &[("experiment_name", name)]) {
            Ok(v) => return id(&v, &["experiment", "experiment_id"]).ok_or_else(|| CallError::Unreachable("experiments/get-by-name: no experiment_id in the answer".into())),
            Err(e) if e.is("RESOURCE_DOES_NOT_EXIST") => {}
            Err(e) => return Err(e),
        }
        match self.post("experiments/create", &serde_json::json!({ "name": name })) {
            Ok(v) => id(&v, &["experiment_id"]).ok_or_else(|| CallError::Unreachable("experiments/create: no experiment_id in the answer".into())),
            Err(e) if e.is("RESOURCE_ALREADY_EXISTS") => {
                let v = self.get("experiments/get-by-name", &[("experiment_name", name)])?;
                id(&v, &["experiment", "experiment_id"]).ok_or_else(|| CallError::Unreachable("experiments/get-by-name: no experiment_id".into()))
            }
            Err(e) => Err(e),
        }
    }

    /// A new run named `name` in `experiment_id`, started at `start_ms`, with `tags`; its id.
    pub(super) fn create_run(&self, experiment_id: &str, name: &str, start_ms: u64, tags: &[(String, String)]) -> Result<String, CallError> {
        let tags: Vec<serde_json::Value> = tags.iter().map(|(k, v)| serde_json::json!({ "key": k, "value": v })).collect();
        let body = serde_json::json!({ "experiment_id": experiment_id, "run_name": name, "start_time": start_ms, "tags": tags });
        let v = self.post("runs/create", &body)?;
        v.pointer("/run/info/run_id").and_then(|v| v.as_str()).map(str::to_string).ok_or_else(|| CallError::Unreachable("runs/create: no run_id in the answer".into()))
    }

    /// The parameters and state of run `run_id`.
    pub(super) fn run_state(&self, run_id: &str) -> Result<RunState, CallError> {
        let v = self.get("runs/get", &[("run_id", run_id)])?;
        let params = v.pointer("/run/data/params").and_then(|p| p.as_array()).into_iter().flatten();
        let params = params.filter_map(|p| Some((p.get("key")?.as_str()?.to_string(), p.get("value")?.as_str()?.to_string()))).collect();
        let active = v.pointer("/run/info/lifecycle_stage").and_then(|s| s.as_str()) == Some("active");
        Ok(RunState { params, active })
    }

    /// The steps at which run `run_id` has a value of metric `key` (every page of its history).
    pub(super) fn metric_steps(&self, run_id: &str, key: &str) -> Result<BTreeSet<u64>, CallError> {
        let mut steps = BTreeSet::new();
        let mut token = String::new();
        loop {
            let mut query = vec![("run_id", run_id), ("metric_key", key), ("max_results", "25000")];
            if !token.is_empty() {
                query.push(("page_token", &token));
            }
            let v = self.get("metrics/get-history", &query)?;
            let metrics = v.get("metrics").and_then(|m| m.as_array()).into_iter().flatten();
            steps.extend(metrics.filter_map(|m| m.get("step").and_then(|s| s.as_u64().or_else(|| s.as_str()?.parse().ok()))));
            match v.get("next_page_token").and_then(|t| t.as_str()).filter(|t| !t.is_empty()) {
                Some(next) => token = next.to_string(),
                None => return Ok(steps),
            }
        }
    }

    /// One `runs/log-batch` (the caller keeps within MLflow's limits).
    pub(super) fn log_batch(&self, run_id: &str, metrics: &[Point], params: &[(String, String)], tags: &[(String, String)]) -> Result<(), CallError> {
        debug_assert!(metrics.len() <= MAX_METRICS_PER_BATCH && params.len() <= MAX_PARAMS_PER_BATCH);
        let metrics: Vec<serde_json::Value> =
            metrics.iter().map(|p| serde_json::json!({ "key": p.key, "value": json_f64(p.value), "timestamp": p.timestamp_ms, "step": p.step })).collect();
        let pairs = |kv: &[(String, String)]| kv.iter().map(|(k, v)| serde_json::json!({ "key": k, "value": v })).collect::<Vec<_>>();
        self.post("runs/log-batch", &serde_json::json!({ "run_id": run_id, "metrics": metrics, "params": pairs(params), "tags": pairs(tags) })).map(drop)
    }

    /// Set run `run_id`'s status (`RUNNING`, `FINISHED`, `FAILED`, `KILLED`) and, when it ended,
    /// its end time.
    pub(super) fn update_run(&self, run_id: &str, status: &str, end_ms: Option<u64>) -> Result<(), CallError> {
        let mut body = serde_json::json!({ "run_id": run_id, "status": status });
        if let Some(end) = end_ms {
            body["end_time"] = end.into();
        }
        self.post("runs/update", &body).map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_follow_the_python_client() {
        let env = |vars: &'static [(&'static str, &'static str)]| move |n: &str| vars.iter().find(|(k, _)| *k == n).map(|(_, v)| v.to_string());
        assert_eq!(authorization(env(&[])), None);
        assert_eq!(authorization(env(&[("MLFLOW_TRACKING_TOKEN", "t0k")])), Some("Bearer t0k".into()));
        // Basic wins over a token, as in mlflow.utils.rest_utils; "user:pass" in base64.
        let both = env(&[("MLFLOW_TRACKING_USERNAME", "user"), ("MLFLOW_TRACKING_PASSWORD", "pass"), ("MLFLOW_TRACKING_TOKEN", "t")]);
        assert_eq!(authorization(both), Some("Basic dXNlcjpwYXNz".into()));
        assert_eq!(authorization(env(&[("MLFLOW_TRACKING_USERNAME", "user")])), None);
    }

    #[test]
    fn values_json_cannot_hold_are_spelled_as_protobuf_does() {
        assert_eq!(json_f64(0.5), serde_json::json!(0.5));
        assert_eq!(json_f64(f64::NAN), serde_json::json!("NaN"));
        assert_eq!(json_f64(f64::INFINITY), serde_json::json!("Infinity"));
        assert_eq!(json_f64(f64::NEG_INFINITY), serde_json::json!("-Infinity"));
        assert_eq!(param_value(&"é".repeat(7000)).chars().count(), MAX_PARAM_VALUE_CHARS);
    }
}
