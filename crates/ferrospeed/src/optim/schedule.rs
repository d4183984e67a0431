//! Learning-rate schedule: linear warmup, then cosine decay to a floor.

/// Linear warmup over `warmup` steps to `lr`, then cosine decay to `min_lr` at `total` steps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    /// Peak learning rate, reached after `warmup` steps.
    pub lr: f64,
    /// Learning rate at `total` steps and after.
    pub min_lr: f64,
    /// Steps of linear warmup.
    pub warmup: usize,
    /// Steps of the whole schedule.
    pub total: usize,
}

impl LrSchedule {
    /// The same learning rate at every step.
    pub fn constant(lr: f64) -> Self {
        Self { lr, min_lr: lr, warmup: 0, total: 0 }
    }

    /// The learning rate of optimizer step `step` (0-based).
    pub fn at(&self, step: usize) -> f64 {
        if step < self.warmup {
            return self.lr * (step + 1) as f64 / self.warmup as f64;
        }
        let span = self.total.saturating_sub(self.warmup).max(1);
        let progress = ((step - self.warmup) as f64 / span as f64).min(1.0);
        self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + (std::f64::consts::PI * progress).cos())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine() {
        let s = LrSchedule { lr: 1.0, min_lr: 0.1, warmup: 2, total: 12 };
        assert_eq!(s.at(0), 0.5);
        assert_eq!(s.at(1), 1.0);
        assert_eq!(s.at(2), 1.0);
        assert!((s.at(7) - 0.55).abs() < 1e-12, "halfway is the midpoint");
        assert!((s.at(12) - 0.1).abs() < 1e-12);
        assert!((s.at(100) - 0.1).abs() < 1e-12, "stays at the floor");
        assert!((1..12).all(|i| s.at(i + 1) <= s.at(i) + 1e-12 || i < 2));
        let c = LrSchedule::constant(0.25);
        assert!((0..5).all(|i| c.at(i) == 0.25));
    }
}
