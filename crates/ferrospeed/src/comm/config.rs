//! Timeouts and limits of a communicator, with defaults and environment overrides.

use super::error::CommError;
use std::time::Duration;

/// Settings of a communicator. `Default` gives the production values.
#[derive(Debug, Clone)]
pub struct CommConfig {
    /// How long one collective may wait for the other ranks before failing.
    pub timeout: Duration,
    /// How long forming the group may take (store connection, address exchange, mesh connections).
    pub rendezvous_timeout: Duration,
    /// How many recent operations the flight recorder keeps.
    pub recorder_len: usize,
}

impl Default for CommConfig {
    fn default() -> Self {
        Self { timeout: Duration::from_secs(300), rendezvous_timeout: Duration::from_secs(300), recorder_len: 16 }
    }
}

/// Environment variable overriding [`CommConfig::timeout`], in seconds.
pub const ENV_TIMEOUT: &str = "FERROSPEED_COLLECTIVE_TIMEOUT_S";
/// Environment variable overriding [`CommConfig::rendezvous_timeout`], in seconds.
pub const ENV_RDZV_TIMEOUT: &str = "FERROSPEED_RDZV_TIMEOUT_S";

impl CommConfig {
    /// Defaults, overridden by `FERROSPEED_COLLECTIVE_TIMEOUT_S` and `FERROSPEED_RDZV_TIMEOUT_S`.
    pub fn from_env() -> Result<Self, CommError> {
        let mut cfg = Self::default();
        if let Some(t) = seconds_from_env(ENV_TIMEOUT)? {
            cfg.timeout = t;
        }
        if let Some(t) = seconds_from_env(ENV_RDZV_TIMEOUT)? {
            cfg.rendezvous_timeout = t;
        }
        Ok(cfg)
    }
}

fn seconds_from_env(var: &str) -> Result<Option<Duration>, CommError> {
    let Ok(value) = std::env::var(var) else { return Ok(None) };
    match value.trim().parse::<f64>() {
        Ok(s) if s.is_finite() && s > 0.0 => Ok(Some(Duration::from_secs_f64(s))),
        _ => Err(CommError::BadEnv {
            var: var.to_string(),
            value,
            reason: "expected a positive number of seconds, e.g. 300".into(),
        }),
    }
}
