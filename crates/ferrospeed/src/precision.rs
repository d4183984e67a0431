//! Mixed precision: the compute dtype of a run, and the dynamic loss scaler fp16 needs.
//!
//! Master weights and optimizer moments are always fp32; blocks compute in the compute dtype;
//! gradients are accumulated in fp32 and reduced in fp32 or the compute dtype.

/// Numeric format of activations and gradients (master weights stay fp32).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    Fp32,
    Bf16,
    /// With dynamic loss scaling.
    Fp16,
}
crate::named_enum!(Precision { Fp32 => "fp32", Bf16 => "bf16", Fp16 => "fp16" });

use candle_core::DType;

impl Precision {
    /// The candle dtype blocks compute in.
    pub fn compute_dtype(self) -> DType {
        match self {
            Precision::Fp32 => DType::F32,
            Precision::Bf16 => DType::BF16,
            Precision::Fp16 => DType::F16,
        }
    }
}

/// Settings of dynamic loss scaling (fp16).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossScalerConfig {
    pub initial: f64,
    /// Steps without overflow before the scale doubles.
    pub growth_interval: u64,
    /// Factor applied to the scale after an overflow.
    pub backoff: f64,
    /// Below this the run is declared diverged.
    pub min: f64,
}

/// What the scaler decided about a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleDecision {
    /// Gradients are finite: unscale them and take the step.
    Step,
    /// Gradients overflowed: skip the step on every rank; the scale backed off.
    Skip,
}

/// Error when the scale cannot back off any further.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error(
    "fp16 loss scale fell below its minimum {min} after overflow at step {step}: gradients overflow even \
     at the smallest scale; lower train.lr, or use train.precision = \"bf16\""
)]
pub struct ScaleUnderflow {
    pub step: u64,
    pub min: f64,
}

/// What a checkpoint keeps of the scaler.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ScalerState {
    pub scale: f64,
    pub good_steps: u64,
    pub skipped: u64,
}

/// Dynamic loss scaling: multiply the loss so fp16 gradients do not underflow; on overflow, skip the
/// step and halve the scale; after `growth_interval` good steps, double it.
#[derive(Debug, Clone, PartialEq)]
pub struct LossScaler {
    cfg: LossScalerConfig,
    scale: f64,
    good_steps: u64,
    /// Steps skipped so far.
    pub skipped: u64,
}

impl LossScaler {
    pub fn new(cfg: LossScalerConfig) -> Self {
        Self { cfg, scale: cfg.initial, good_steps: 0, skipped: 0 }
    }

    pub fn state(&self) -> ScalerState {
        ScalerState { scale: self.scale, good_steps: self.good_steps, skipped: self.skipped }
    }

    pub fn restore(&mut self, state: ScalerState) {
        self.scale = state.scale;
        self.good_steps = state.good_steps;
        self.skipped = state.skipped;
    }

    /// The current scale.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// Record whether the step's gradients (seen by all ranks alike) overflowed.
    pub fn update(&mut self, overflow: bool, step: u64) -> Result<ScaleDecision, ScaleUnderflow> {
        if overflow {
            self.skipped += 1;
            self.good_steps = 0;
            let next = self.scale * self.cfg.backoff;
            if next < self.cfg.min {
                return Err(ScaleUnderflow { step, min: self.cfg.min });
            }
            self.scale = next;
            return Ok(ScaleDecision::Skip);
        }
        self.good_steps += 1;
        if self.good_steps >= self.cfg.growth_interval {
            self.scale *= 2.0;
            self.good_steps = 0;
        }
        Ok(ScaleDecision::Step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backs_off_grows_and_gives_up() {
        let mut s = LossScaler::new(LossScalerConfig { initial: 8.0, growth_interval: 2, backoff: 0.5, min: 2.0 });
        assert_eq!(s.update(true, 1), Ok(ScaleDecision::Skip));
        assert_eq!(s.scale(), 4.0);
        assert_eq!(s.update(false, 2), Ok(ScaleDecision::Step));
        assert_eq!(s.update(false, 3), Ok(ScaleDecision::Step));
        assert_eq!(s.scale(), 8.0, "doubles after growth_interval good steps");
        assert_eq!(s.update(true, 4), Ok(ScaleDecision::Skip));
        assert_eq!(s.update(true, 5), Ok(ScaleDecision::Skip));
        assert_eq!(s.scale(), 2.0);
        let err = s.update(true, 6).unwrap_err();
        assert!(err.to_string().contains("minimum 2") && err.to_string().contains("bf16"), "{err}");
        assert_eq!(s.skipped, 4);
    }
}
