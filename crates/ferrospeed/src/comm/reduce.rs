//! The reduction arithmetic, shared by the TCP backend and the single-process reference in tests.
//!
//! A reduction is a left fold over contributions in rank order, in f32: `((x0 ∘ x1) ∘ x2) ∘ …`.
//! Because the order depends only on the ranks, not on how a buffer was chunked, every algorithm
//! built on it gives the same bits.

use super::element::Element;
use super::ReduceOp;

/// Start an accumulator from the first contribution.
pub(crate) fn init<T: Element>(acc: &mut [f32], x: &[T]) {
    for (a, v) in acc.iter_mut().zip(x) {
        *a = v.to_f32();
    }
}

/// Fold one more contribution into the accumulator.
pub(crate) fn fold<T: Element>(acc: &mut [f32], x: &[T], op: ReduceOp) {
    match op {
        ReduceOp::Sum | ReduceOp::Avg => {
            for (a, v) in acc.iter_mut().zip(x) {
                *a += v.to_f32();
            }
        }
        ReduceOp::Max => {
            for (a, v) in acc.iter_mut().zip(x) {
                *a = nan_max(*a, v.to_f32());
            }
        }
    }
}

/// Round the accumulator into the output, dividing by the world size for `Avg`.
pub(crate) fn finish<T: Element>(acc: &[f32], out: &mut [T], op: ReduceOp, world_size: usize) {
    match op {
        ReduceOp::Avg => {
            let w = world_size as f32;
            for (o, a) in out.iter_mut().zip(acc) {
                *o = T::from_f32(*a / w);
            }
        }
        ReduceOp::Sum | ReduceOp::Max => {
            for (o, a) in out.iter_mut().zip(acc) {
                *o = T::from_f32(*a);
            }
        }
    }
}

/// Maximum in which NaN wins, so that a non-finite value on any rank reaches every rank.
fn nan_max(a: f32, b: f32) -> f32 {
    if a.is_nan() || b.is_nan() {
        f32::NAN
    } else if b > a {
        b
    } else {
        a
    }
}

/// The single-process reference: reduce `inputs` (one slice per rank, equal lengths) in rank order.
///
/// Public so tests and `ferrospeed comm check` compare the distributed result against it bit for bit.
pub fn reference_reduce<T: Element>(inputs: &[Vec<T>], op: ReduceOp) -> Vec<T> {
    let n = inputs.first().map_or(0, Vec::len);
    let mut acc = vec![0f32; n];
    let mut out = vec![T::default(); n];
    if let Some((first, rest)) = inputs.split_first() {
        init(&mut acc, first);
        for x in rest {
            fold(&mut acc, x, op);
        }
    }
    finish(&acc, &mut out, op, inputs.len());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sum_is_a_left_fold_in_rank_order() {
        // 1e8 + 1 - 1e8 in f32 is 0 (the 1 is absorbed), whereas 1e8 - 1e8 + 1 would be 1.
        let inputs = vec![vec![1e8f32], vec![1.0], vec![-1e8]];
        assert_eq!(reference_reduce(&inputs, ReduceOp::Sum), vec![0.0]);
    }

    #[test]
    fn avg_and_max() {
        let inputs = vec![vec![1.0f32, -3.0], vec![2.0, 5.0], vec![6.0, f32::NAN]];
        assert_eq!(reference_reduce(&inputs, ReduceOp::Avg)[0], 3.0);
        let m = reference_reduce(&inputs, ReduceOp::Max);
        assert_eq!(m[0], 6.0);
        assert!(m[1].is_nan(), "NaN must win a max so overflow is seen on every rank");
    }

    #[test]
    fn the_reference_is_the_plain_rank_order_loop() {
        // `ferrospeed comm check` compares against `reference_reduce`; here it is held to the documented
        // fold written out without `init`/`fold`/`finish`. Magnitudes from 1 to 1e8 make the order matter.
        let mut rng = crate::rng::Rng::new(11);
        let mut inputs: Vec<Vec<f32>> =
            (0..4).map(|_| (0..500).map(|_| (rng.normal() * 10f64.powi(rng.below(9) as i32)) as f32).collect()).collect();
        inputs[0][3] = f32::NAN; // a NaN that starts the fold must win a Max too
        inputs[2][7] = f32::NAN;
        for op in [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max] {
            let want: Vec<f32> = (0..500)
                .map(|i| {
                    let mut acc = inputs[0][i];
                    for x in &inputs[1..] {
                        acc = match op {
                            ReduceOp::Sum | ReduceOp::Avg => acc + x[i],
                            ReduceOp::Max if acc.is_nan() || x[i].is_nan() => f32::NAN,
                            ReduceOp::Max => if x[i] > acc { x[i] } else { acc },
                        };
                    }
                    if op == ReduceOp::Avg { acc / 4.0 } else { acc }
                })
                .collect();
            let got = reference_reduce(&inputs, op);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()), "{op:?} element {i}: {g} vs {w}");
            }
            let reversed: Vec<Vec<f32>> = inputs.iter().rev().cloned().collect();
            if op != ReduceOp::Max {
                let moved = reference_reduce(&reversed, op).iter().zip(&want).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
                assert!(moved > 0, "{op:?}: the data does not tell rank orders apart");
            }
        }
    }

    #[test]
    fn half_types_accumulate_in_f32_and_round_once() {
        use half::bf16;
        // 256 + 1 + 1 in bf16 step by step stays 256 (8 bits of mantissa); in f32 it is 258 → bf16 258.
        let inputs = vec![vec![bf16::from_f32(256.0)], vec![bf16::ONE], vec![bf16::ONE]];
        assert_eq!(reference_reduce(&inputs, ReduceOp::Sum)[0].to_f32(), 258.0);
    }
}
