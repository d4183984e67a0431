//! [`Progress`]: a progress bar when stdout is a terminal, plain periodic lines when it is not (logs, CI).
//!
//! The text is produced by pure functions ([`format_rate`], [`format_eta`], [`plain_line`], …) so the
//! formats are unit-tested without a terminal; the [`Progress`] type only decides when to show what.

use super::StepMetrics;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

const BAR_TEMPLATE: &str = "{bar} {pos}/{len} {msg} ETA {eta}";

/// Shows training progress on rank 0.
pub struct Progress {
    total_steps: u64,
    display: Display,
}

enum Display {
    /// An indicatif bar; it estimates the ETA itself.
    Bar { bar: ProgressBar, seen_first_update: bool },
    /// Plain lines every `every` steps, with the ETA from the mean step time of the updates seen so far.
    Plain { every: u64, step_ms_sum: f64, num_updates: u64 },
}

impl Progress {
    /// `interactive` says whether stdout is a terminal (`std::io::stdout().is_terminal()`): a bar there,
    /// otherwise one plain line every `every` steps (0 is taken as 1) and always one at the last step.
    pub fn new(total_steps: u64, interactive: bool, every: u64) -> Self {
        if interactive {
            Self::with_bar(total_steps, ProgressDrawTarget::stdout())
        } else {
            Self { total_steps, display: Display::Plain { every: every.max(1), step_ms_sum: 0.0, num_updates: 0 } }
        }
    }

    fn with_bar(total_steps: u64, target: ProgressDrawTarget) -> Self {
        // The template is a constant; should it ever fail to parse, a default bar beats no progress.
        let style = ProgressStyle::with_template(BAR_TEMPLATE).unwrap_or_else(|_| ProgressStyle::default_bar());
        let bar = ProgressBar::with_draw_target(Some(total_steps), target).with_style(style);
        Self { total_steps, display: Display::Bar { bar, seen_first_update: false } }
    }

    /// Reports a finished step. Call it every step; plain mode decides itself which steps to print.
    pub fn update(&mut self, m: &StepMetrics) {
        match &mut self.display {
            Display::Bar { bar, seen_first_update } => {
                bar.set_message(bar_message(m));
                bar.set_position(m.step.min(self.total_steps));
                // A resumed run starts at a high step; without this the jump from 0 would look like
                // thousands of steps per second and the first ETAs would be nonsense.
                if !*seen_first_update {
                    bar.reset_eta();
                    *seen_first_update = true;
                }
            }
            Display::Plain { .. } => {
                if let Some(line) = self.plain_update(m) {
                    println!("{line}");
                }
            }
        }
    }

    /// Plain mode's bookkeeping for one update; returns the line to print, if this step prints one.
    fn plain_update(&mut self, m: &StepMetrics) -> Option<String> {
        let Display::Plain { every, step_ms_sum, num_updates } = &mut self.display else { return None };
        if m.step_ms.is_finite() {
            *step_ms_sum += m.step_ms;
            *num_updates += 1;
        }
        if !should_print(m.step, self.total_steps, *every) {
            return None;
        }
        let mean_step_ms = if *num_updates > 0 { *step_ms_sum / *num_updates as f64 } else { f64::NAN };
        let remaining_steps = self.total_steps.saturating_sub(m.step);
        let eta_secs = mean_step_ms * remaining_steps as f64 / 1000.0;
        Some(plain_line(m, self.total_steps, eta_secs))
    }

    /// Prints a line without tearing the bar (plain mode: just prints it).
    pub fn println(&self, line: &str) {
        match &self.display {
            Display::Bar { bar, .. } => bar.println(line),
            Display::Plain { .. } => println!("{line}"),
        }
    }

    /// Ends the bar (leaving it on screen) and prints `line`, e.g. a summary of the run.
    pub fn finish(&self, line: &str) {
        if let Display::Bar { bar, .. } = &self.display {
            bar.finish();
        }
        if !line.is_empty() {
            println!("{line}");
        }
    }
}

/// Whether plain mode prints at `step`: every `every` steps, and always at the last step.
fn should_print(step: u64, total_steps: u64, every: u64) -> bool {
    step >= total_steps || step % every.max(1) == 0
}

/// The bar's message: `loss 4.1234 | 12.3k tok/s`.
pub fn bar_message(m: &StepMetrics) -> String {
    format!("loss {:.4} | {} tok/s", m.loss, format_rate(m.tokens_per_s))
}

/// One plain progress line:
/// `step 5/20 | loss 4.1234 | lr 3.00e-3 | grad 0.812 | 12.3k tok/s | 210 ms/step | ETA 1m02s`.
pub fn plain_line(m: &StepMetrics, total_steps: u64, eta_secs: f64) -> String {
    format!(
        "step {}/{} | loss {:.4}{} | lr {:.2e} | grad {:.3} | {} tok/s | {:.0} ms/step | ETA {}",
        m.step,
        total_steps,
        m.loss,
        m.eval_loss.map_or_else(String::new, |e| format!(" | eval {e:.4}")),
        m.lr,
        m.grad_norm,
        format_rate(m.tokens_per_s),
        m.step_ms,
        format_eta(eta_secs)
    )
}

/// A rate with a metric suffix and three significant figures at most: `850`, `12.3k`, `4.5M`, `1.2G`.
pub fn format_rate(per_sec: f64) -> String {
    if !per_sec.is_finite() {
        return "?".to_string();
    }
    let magnitude = per_sec.abs();
    // Compare after rounding so 999.96 shows as "1.0k" rather than "1000.0".
    if magnitude.round() < 1e3 {
        format!("{per_sec:.0}")
    } else if (magnitude / 1e2).round() < 1e4 {
        format!("{:.1}k", per_sec / 1e3)
    } else if (magnitude / 1e5).round() < 1e4 {
        format!("{:.1}M", per_sec / 1e6)
    } else {
        format!("{:.1}G", per_sec / 1e9)
    }
}

/// A duration in whole seconds, compactly: `45s`, `1m02s`, `2h05m`, `3d04h`. Unknown (NaN, negative or
/// infinite, e.g. before any step time is known) shows as `?`.
pub fn format_eta(secs: f64) -> String {
    if !secs.is_finite() || secs < 0.0 {
        return "?".to_string();
    }
    // Saturates for absurd values instead of overflowing: `as` on a float clamps.
    let total = secs.round() as u64;
    let (days, hours, minutes, seconds) = (total / 86_400, total / 3600 % 24, total / 60 % 60, total % 60);
    if total < 60 {
        format!("{seconds}s")
    } else if total < 3600 {
        format!("{minutes}m{seconds:02}s")
    } else if total < 86_400 {
        format!("{}h{minutes:02}m", total / 3600)
    } else {
        format!("{days}d{hours:02}h")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics(step: u64, step_ms: f64) -> StepMetrics {
        StepMetrics {
            step,
            loss: 4.12341,
            lr: 3e-3,
            grad_norm: 0.8124,
            tokens: 4096 * step,
            tokens_per_s: 12_345.0,
            mfu: None,
            step_ms,
            peak_mem_bytes: 0,
            loss_scale: None,
            eval_loss: None,
            extra: Default::default(),
        }
    }

    #[test]
    fn rates() {
        for (rate, expect) in [
            (0.0, "0"),
            (850.4, "850"),
            (999.96, "1.0k"),
            (12_345.0, "12.3k"),
            (999_960.0, "1.0M"),
            (4_500_000.0, "4.5M"),
            (1.2e9, "1.2G"),
            (f64::NAN, "?"),
        ] {
            assert_eq!(format_rate(rate), expect, "rate {rate}");
        }
    }

    #[test]
    fn etas() {
        for (secs, expect) in [
            (0.0, "0s"),
            (45.4, "45s"),
            (59.6, "1m00s"),
            (62.0, "1m02s"),
            (3599.0, "59m59s"),
            (7500.0, "2h05m"),
            (3.0 * 86_400.0 + 4.0 * 3600.0, "3d04h"),
            (f64::NAN, "?"),
            (-1.0, "?"),
            (f64::INFINITY, "?"),
        ] {
            assert_eq!(format_eta(secs), expect, "eta {secs}");
        }
    }

    #[test]
    fn plain_line_format() {
        assert_eq!(
            plain_line(&metrics(5, 210.0), 20, 62.0),
            "step 5/20 | loss 4.1234 | lr 3.00e-3 | grad 0.812 | 12.3k tok/s | 210 ms/step | ETA 1m02s"
        );
    }

    #[test]
    fn bar_message_format() {
        assert_eq!(bar_message(&metrics(5, 210.0)), "loss 4.1234 | 12.3k tok/s");
    }

    #[test]
    fn plain_mode_prints_every_n_steps_and_the_last_with_mean_step_time_eta() {
        let mut progress = Progress::new(10, false, 4);
        let printed: Vec<(u64, String)> = (1..=10)
            .filter_map(|step| {
                // Step times 100, 200, …: the mean after step s is 50 * (s + 1) ms.
                let line = progress.plain_update(&metrics(step, 100.0 * step as f64))?;
                Some((step, line))
            })
            .collect();
        let steps: Vec<u64> = printed.iter().map(|(s, _)| *s).collect();
        assert_eq!(steps, vec![4, 8, 10]);
        // After step 4: mean 250 ms, 6 steps left -> 1.5 s -> "2s" (rounded half away from zero).
        assert!(printed[0].1.ends_with("| 400 ms/step | ETA 2s"), "{}", printed[0].1);
        assert!(printed[0].1.starts_with("step 4/10 |"), "{}", printed[0].1);
        assert!(printed[2].1.ends_with("ETA 0s"), "{}", printed[2].1);
    }

    #[test]
    fn bar_mode_tracks_position_and_message() {
        let mut progress = Progress::with_bar(20, ProgressDrawTarget::hidden());
        progress.update(&metrics(7, 210.0));
        let Display::Bar { bar, .. } = &progress.display else { panic!("expected a bar") };
        assert_eq!(bar.position(), 7);
        assert_eq!(bar.length(), Some(20));
        assert_eq!(bar.message(), "loss 4.1234 | 12.3k tok/s");
        progress.finish("");
        let Display::Bar { bar, .. } = &progress.display else { panic!("expected a bar") };
        assert!(bar.is_finished());
    }
}
