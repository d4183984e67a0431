//! Global-norm gradient clipping.
//!
//! The squared norm is summed per shard (in f64, then rounded to f32) and the shard sums are added in
//! rank order, at every ZeRO stage: unsharded stages compute the same shard sums locally, so the norm,
//! hence the clipping, is bitwise the same whatever the stage.

/// Sum of squares of `g`, accumulated in f64.
pub fn sum_squares(g: &[f32]) -> f64 {
    g.iter().map(|&x| f64::from(x) * f64::from(x)).sum()
}

/// The factor to multiply gradients by so their global norm is at most `max_norm` (1 when it already
/// is, or when `max_norm` is 0: clipping off).
pub fn clip_coefficient(norm: f64, max_norm: f64) -> f64 {
    if max_norm > 0.0 && norm > max_norm {
        max_norm / (norm + 1e-6)
    } else {
        1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clipping() {
        assert_eq!(sum_squares(&[3.0, 4.0]), 25.0);
        assert_eq!(clip_coefficient(5.0, 10.0), 1.0);
        assert_eq!(clip_coefficient(5.0, 0.0), 1.0);
        assert!((clip_coefficient(5.0, 1.0) * 5.0 - 1.0).abs() < 1e-6);
    }
}
