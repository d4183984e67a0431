//! `ConfigError`: every way a config file or a `--set` override can be wrong, as one-line messages.
//!
//! Each message names the key, the offending value and what to do instead, because the person reading
//! it is at a terminal with the file open and should not need the docs to fix it. Messages are kept to
//! one line (user-controlled text is passed through [`one_line`]) so they read well after `Error:` in
//! the CLI and inside log files.

use std::path::PathBuf;

/// An invalid configuration: a file that cannot be read or parsed, an unknown key, a wrong type, a value
/// out of range, or settings that contradict each other.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {}: {reason}; check the path given to --config", path.display())]
    Read { path: PathBuf, reason: String },

    /// The text is not valid TOML.
    #[error("TOML syntax error in {source_name} at {location}: {message}; fix the syntax there (strings need quotes, tables are [name])")]
    Syntax { source_name: String, location: String, message: String },

    /// A section or key the schema does not know (usually a typo).
    #[error("unknown key `{key}` in {source_name}; {hint}")]
    UnknownKey { key: String, source_name: String, hint: String },

    /// A required section or key is absent.
    #[error("missing {what} in {source_name}: {fix}")]
    Missing { what: String, source_name: String, fix: String },

    /// A value of the wrong TOML type (a string where a number is expected, …).
    #[error("{key} = {value} has the wrong type: expected {expected}")]
    WrongType { key: String, value: String, expected: String },

    /// A value of the right type that is out of range or contradicts another setting.
    #[error("{key} = {value} {problem}: {fix}")]
    Invalid { key: String, value: String, problem: String, fix: String },

    /// A `--set` argument that is not of the form `section.key=value`.
    #[error("bad override `--set {arg}`: {problem}; expected the form `--set train.steps=50`")]
    BadOverride { arg: String, problem: String },

    /// The global batch cannot be split evenly into micro-batches over the ranks.
    #[error("[parallel] does not fit the job: {0}")]
    Mesh(#[from] crate::parallel::MeshError),

    #[error("[parallel] {0}")]
    NotBuilt(String),

    #[error("train.global_batch = {global_batch} is not divisible by train.micro_batch ({micro_batch}) × world size ({world_size}) = {product}: {fix}")]
    Batch { global_batch: usize, micro_batch: usize, world_size: usize, product: String, fix: String },
}

impl ConfigError {
    /// The key the error is about, where it names one (`train.micro_batch`); `None` for errors of the
    /// whole file (unreadable, bad syntax, a missing section). A questionnaire uses it to tell a bad
    /// answer from a key not asked yet.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::UnknownKey { key, .. } | ConfigError::WrongType { key, .. } | ConfigError::Invalid { key, .. } => Some(key),
            ConfigError::Batch { .. } => Some("train.global_batch"),
            ConfigError::Mesh(_) | ConfigError::NotBuilt(_) => Some("parallel"),
            ConfigError::Read { .. } | ConfigError::Syntax { .. } | ConfigError::Missing { .. } | ConfigError::BadOverride { .. } => None,
        }
    }

    /// An `Invalid` error; all arguments are flattened to one line.
    pub(crate) fn invalid(key: &str, value: impl ToString, problem: &str, fix: impl ToString) -> Self {
        ConfigError::Invalid {
            key: key.to_string(),
            value: one_line(&value.to_string()),
            problem: problem.to_string(),
            fix: one_line(&fix.to_string()),
        }
    }

    /// The error for a size that must be a positive integer; shared by parsing (negative numbers never
    /// reach a `usize`) and validation (configs built in code) so both read the same.
    pub(crate) fn below_one(key: &str, value: impl ToString) -> Self {
        Self::invalid(key, value, "is out of range", "must be ≥ 1 (a positive integer)")
    }
}

/// Replaces line breaks and other control characters so that a message stays on one line.
pub(crate) fn one_line(text: &str) -> String {
    text.chars().map(|c| if c.is_control() { ' ' } else { c }).collect()
}

/// A TOML value as it would appear on the right of `=`, on one line (strings quoted, tables inline).
pub(crate) fn render_value(value: &toml::Value) -> String {
    match value {
        toml::Value::String(s) => quote(s),
        toml::Value::Integer(i) => i.to_string(),
        toml::Value::Float(f) => f.to_string(),
        toml::Value::Boolean(b) => b.to_string(),
        toml::Value::Datetime(d) => d.to_string(),
        toml::Value::Array(items) => {
            let items: Vec<String> = items.iter().map(render_value).collect();
            format!("[{}]", items.join(", "))
        }
        toml::Value::Table(table) => {
            let entries: Vec<String> =
                table.iter().map(|(k, v)| format!("{k} = {}", render_value(v))).collect();
            format!("{{ {} }}", entries.join(", "))
        }
    }
}

/// A string in double quotes with escapes, as TOML would write it (`Debug` escapes newlines too).
pub(crate) fn quote(text: &str) -> String {
    format!("{text:?}")
}

/// A path in double quotes, for messages about path-valued keys.
pub(crate) fn quote_path(path: &std::path::Path) -> String {
    quote(&path.to_string_lossy())
}
