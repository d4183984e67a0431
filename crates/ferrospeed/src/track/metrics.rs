//! [`StepMetrics`]: the record written once per optimizer step, one JSON object per line of `metrics.jsonl`.

use serde::{Deserialize, Deserializer, Serialize};
use std::collections::BTreeMap;

/// What happened in one optimizer step. Every run output (metrics.jsonl, TensorBoard, progress) is built
/// from this one record so they cannot disagree.
///
/// JSON has no NaN or infinity: serde_json writes a non-finite float as `null`. A diverging run produces
/// exactly such values, so the plain `f64` fields read `null` back as NaN instead of failing to parse,
/// which keeps a diverged run's `metrics.jsonl` readable.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StepMetrics {
    /// Optimizer step just completed (1-based: the first step is 1).
    pub step: u64,
    #[serde(deserialize_with = "f64_or_nan")]
    pub loss: f64,
    #[serde(deserialize_with = "f64_or_nan")]
    pub lr: f64,
    /// Global gradient norm before clipping.
    #[serde(deserialize_with = "f64_or_nan")]
    pub grad_norm: f64,
    /// Cumulative number of tokens trained on so far, including this step.
    pub tokens: u64,
    #[serde(deserialize_with = "f64_or_nan")]
    pub tokens_per_s: f64,
    /// Model FLOPs utilisation in [0, 1]; `null` when the device's peak FLOPs are unknown.
    pub mfu: Option<f64>,
    #[serde(deserialize_with = "f64_or_nan")]
    pub step_ms: f64,
    pub peak_mem_bytes: u64,
    /// Dynamic loss scale; present only when training in fp16.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<f64>,
    /// The loss on the held-out data (`Engine::eval_loss` over `train.eval_batches`); present only on
    /// the steps that evaluated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_loss: Option<f64>,
    /// Further values (e.g. per-phase timings) written as top-level keys. Keys must not repeat the
    /// names of the fields above, or the JSON object would hold the same key twice.
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// A `metrics.jsonl` as read back: every line that is a [`StepMetrics`], in file order, and the
/// 1-based numbers of the lines that are not (not JSON, a field missing or of another type, a torn
/// last line). Blank lines are neither.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MetricsLines {
    pub rows: Vec<StepMetrics>,
    pub bad_lines: Vec<usize>,
}

impl MetricsLines {
    pub fn parse(text: &str) -> Self {
        let mut out = Self::default();
        for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            match serde_json::from_str(line) {
                Ok(row) => out.rows.push(row),
                Err(_) => out.bad_lines.push(i + 1),
            }
        }
        out
    }

    /// One line for a person reading `path`, when some of its lines are not rows: how many, and
    /// which (the first five).
    pub fn warning(&self, path: &std::path::Path) -> Option<String> {
        let n = self.bad_lines.len();
        if n == 0 {
            return None;
        }
        let mut which: Vec<String> = self.bad_lines.iter().take(5).map(usize::to_string).collect();
        if n > 5 {
            which.push("…".into());
        }
        let (lines, are) = if n == 1 { ("line", "is") } else { ("lines", "are") };
        Some(format!("warning: {}: {n} {lines} {are} not metrics rows and skipped ({lines} {})", path.display(), which.join(", ")))
    }
}

/// Reads a float that serde_json may have written as `null` (NaN or infinity) back as NaN.
fn f64_or_nan<'de, D: Deserializer<'de>>(deserializer: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(deserializer)?.unwrap_or(f64::NAN))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> StepMetrics {
        StepMetrics {
            step: 5,
            loss: 4.1234,
            lr: 3e-3,
            grad_norm: 0.812,
            tokens: 40_960,
            tokens_per_s: 12_345.0,
            mfu: None,
            step_ms: 210.0,
            peak_mem_bytes: 1 << 30,
            loss_scale: None,
            eval_loss: None,
            extra: BTreeMap::new(),
        }
    }

    #[test]
    fn unknown_mfu_is_null_and_absent_loss_scale_is_omitted() {
        let json: serde_json::Value = serde_json::to_value(sample()).unwrap();
        assert_eq!(json["mfu"], serde_json::Value::Null);
        assert!(json.as_object().unwrap().contains_key("mfu"));
        assert!(!json.as_object().unwrap().contains_key("loss_scale"));
    }

    #[test]
    fn round_trips_with_loss_scale_and_extra_keys() {
        let mut m = sample();
        m.mfu = Some(0.41);
        m.loss_scale = Some(65536.0);
        m.extra.insert("fwd_ms".into(), serde_json::json!(80.5));
        let line = serde_json::to_string(&m).unwrap();
        assert!(line.contains("\"fwd_ms\":80.5"), "extra keys are flattened: {line}");
        let back: StepMetrics = serde_json::from_str(&line).unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn non_finite_loss_reads_back_as_nan() {
        let mut m = sample();
        m.loss = f64::NAN;
        m.grad_norm = f64::INFINITY;
        let line = serde_json::to_string(&m).unwrap();
        let back: StepMetrics = serde_json::from_str(&line).unwrap();
        assert!(back.loss.is_nan());
        assert!(back.grad_norm.is_nan());
        assert_eq!(back.step, 5);
    }
}

/// Peak resident memory of this process (Linux `VmHWM`), 0 where unknown.
pub fn peak_rss_bytes() -> u64 {
    status_kb("VmHWM:")
}

/// Resident memory now, in bytes (Linux; 0 elsewhere).
pub fn rss_bytes() -> u64 {
    status_kb("VmRSS:")
}

/// Restart the peak of [`peak_rss_bytes`] from the current resident memory (Linux `clear_refs`), so a
/// phase's own peak can be measured; false where that is not possible.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

fn status_kb(key: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with(key)).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok()))
        .map_or(0, |kb| kb * 1024)
}
