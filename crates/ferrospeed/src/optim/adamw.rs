//! AdamW with decoupled weight decay (Loshchilov & Hutter), elementwise over flat f32 slices.
//!
//! Elementwise means the result for an element does not depend on how a buffer is split, so any
//! shard of a FlatParam can be updated on its own and match the unsharded update bit for bit.

use super::optimizer::{Hyper, Optimizer};

/// Hyper-parameters of AdamW (the learning rate comes per step from the schedule).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamW {
    /// Decay of the first moment, e.g. 0.9.
    pub beta1: f64,
    /// Decay of the second moment, e.g. 0.95 or 0.999.
    pub beta2: f64,
    /// Added to the denominator, e.g. 1e-8.
    pub eps: f64,
    /// Decoupled weight decay of parameters that decay (see `ParamGroups`).
    pub weight_decay: f64,
}

/// The per-step constants of one AdamW update, in f32: `m = b1·m + (1−b1)·g`,
/// `v = b2·v + (1−b2)·g·g`, `p = p·shrink − step·m / (√v / bias2_sqrt + eps)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWCoefficients {
    /// Decay of the first moment (`beta1`).
    pub b1: f32,
    /// Decay of the second moment (`beta2`).
    pub b2: f32,
    /// Square root of the second moment's bias correction, `√(1 − beta2^t)`.
    pub bias2_sqrt: f32,
    /// Step size: the learning rate divided by the first moment's bias correction, `lr / (1 − beta1^t)`.
    pub step: f32,
    /// Added to the denominator.
    pub eps: f32,
    /// Factor of decoupled weight decay, `1 − lr·weight_decay` (1 without decay).
    pub shrink: f32,
}

impl AdamW {
    /// Update `params` in place from `grads`, with first and second moments `m` and `v`, at step `t`
    /// (1-based). Decay applies only when `decay` is true (weights, not biases or norms).
    pub fn update(&self, params: &mut [f32], grads: &[f32], m: &mut [f32], v: &mut [f32], lr: f64, t: u64, decay: bool) {
        self.update_decayed(params, grads, m, v, lr, t, if decay { self.weight_decay } else { 0.0 });
    }

    /// [`AdamW::update`] with the weight decay given (a parameter group's), 0 for none.
    #[allow(clippy::too_many_arguments)]
    pub fn update_decayed(&self, params: &mut [f32], grads: &[f32], m: &mut [f32], v: &mut [f32], lr: f64, t: u64, weight_decay: f64) {
        debug_assert!(params.len() == grads.len() && grads.len() == m.len() && m.len() == v.len());
        use rayon::prelude::*;
        // Elementwise, so any split gives the same bits: chunks run on all cores.
        const CHUNK: usize = 1 << 16;
        let c = self.coefficients_decayed(lr, t, weight_decay);
        params
            .par_chunks_mut(CHUNK)
            .zip(grads.par_chunks(CHUNK))
            .zip(m.par_chunks_mut(CHUNK))
            .zip(v.par_chunks_mut(CHUNK))
            .for_each(|(((p, g), m), v)| update_serial(c, p, g, m, v));
    }

    /// [`AdamW::update_decayed`] from `grads × factor` (the clipping coefficient over the loss scale,
    /// the same product the CUDA kernel forms), also writing each updated parameter, rounded to
    /// nearest, into `out` (the compute copy): one pass over memory where an update then a cast
    /// would make two. Bitwise the parameters and moments of scaling the gradient first.
    #[allow(clippy::too_many_arguments)]
    pub fn update_fused<T: ComputeElem>(&self, params: &mut [f32], grads: &[f32], m: &mut [f32], v: &mut [f32], factor: f32, lr: f64, t: u64, weight_decay: f64, out: &mut [T]) {
        debug_assert!(params.len() == grads.len() && grads.len() == m.len() && m.len() == v.len() && v.len() == out.len());
        use rayon::prelude::*;
        const CHUNK: usize = 1 << 16;
        let AdamWCoefficients { b1, b2, bias2_sqrt, step, eps, shrink } = self.coefficients_decayed(lr, t, weight_decay);
        params
            .par_chunks_mut(CHUNK)
            .zip(grads.par_chunks(CHUNK))
            .zip(m.par_chunks_mut(CHUNK))
            .zip(v.par_chunks_mut(CHUNK))
            .zip(out.par_chunks_mut(CHUNK))
            .for_each(|((((p, g), m), v), o)| {
                for ((((p, &g), m), v), o) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()).zip(o.iter_mut()) {
                    let g = g * factor;
                    *m = b1 * *m + (1.0 - b1) * g;
                    *v = b2 * *v + (1.0 - b2) * g * g;
                    let denom = v.sqrt() / bias2_sqrt + eps;
                    *p = *p * shrink - step * *m / denom;
                    *o = T::from_f32(*p);
                }
            });
    }

    /// The f32 constants of the update at step `t` (computed in f64 on the host, then rounded): the
    /// CPU loop and the CUDA kernel both use exactly these.
    pub fn coefficients(&self, lr: f64, t: u64, decay: bool) -> AdamWCoefficients {
        self.coefficients_decayed(lr, t, if decay { self.weight_decay } else { 0.0 })
    }

    /// [`AdamW::coefficients`] with the weight decay given, 0 for none.
    pub fn coefficients_decayed(&self, lr: f64, t: u64, weight_decay: f64) -> AdamWCoefficients {
        let t = t.max(1) as i32;
        let (b1, b2) = (self.beta1 as f32, self.beta2 as f32);
        let bias1 = (1.0 - self.beta1.powi(t)) as f32;
        let bias2_sqrt = (1.0 - self.beta2.powi(t)).sqrt() as f32;
        let step = (lr / f64::from(bias1)) as f32;
        let eps = self.eps as f32;
        let shrink = if weight_decay != 0.0 { (1.0 - lr * weight_decay) as f32 } else { 1.0 };
        AdamWCoefficients { b1, b2, bias2_sqrt, step, eps, shrink }
    }
}

/// An element type of the compute copy a fused update writes (rounded to nearest even).
pub trait ComputeElem: Copy + Send + Sync {
    /// `x` rounded to this type.
    fn from_f32(x: f32) -> Self;
}

impl ComputeElem for f32 {
    fn from_f32(x: f32) -> Self {
        x
    }
}

impl ComputeElem for half::bf16 {
    fn from_f32(x: f32) -> Self {
        half::bf16::from_f32(x)
    }
}

impl ComputeElem for half::f16 {
    fn from_f32(x: f32) -> Self {
        half::f16::from_f32(x)
    }
}

fn update_serial(c: AdamWCoefficients, params: &mut [f32], grads: &[f32], m: &mut [f32], v: &mut [f32]) {
    let AdamWCoefficients { b1, b2, bias2_sqrt, step, eps, shrink } = c;
    for (((p, &g), m), v) in params.iter_mut().zip(grads).zip(m.iter_mut()).zip(v.iter_mut()) {
        *m = b1 * *m + (1.0 - b1) * g;
        *v = b2 * *v + (1.0 - b2) * g * g;
        let denom = v.sqrt() / bias2_sqrt + eps;
        *p = *p * shrink - step * *m / denom;
    }
}

impl Optimizer for AdamW {
    fn name(&self) -> &'static str {
        "adamw"
    }

    fn state_names(&self) -> &'static [&'static str] {
        &["exp_avg", "exp_avg_sq"]
    }

    fn weight_decay(&self) -> f64 {
        self.weight_decay
    }

    fn update(&self, params: &mut [f32], grads: &[f32], state: &mut [&mut [f32]], hp: Hyper) {
        let [m, v] = state else { unreachable!("the engine allocates AdamW's two state buffers") };
        self.update_decayed(params, grads, m, v, hp.lr, hp.step, hp.weight_decay);
    }

    fn as_adamw(&self) -> Option<&AdamW> {
        Some(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The textbook formulation in f64, for comparison.
    fn reference(p: f64, g: f64, steps: u64, lr: f64, h: &AdamW, decay: bool) -> f64 {
        let (mut p, mut m, mut v) = (p, 0.0, 0.0);
        for t in 1..=steps {
            if decay {
                p -= lr * h.weight_decay * p;
            }
            m = h.beta1 * m + (1.0 - h.beta1) * g;
            v = h.beta2 * v + (1.0 - h.beta2) * g * g;
            let mhat = m / (1.0 - h.beta1.powi(t as i32));
            let vhat = v / (1.0 - h.beta2.powi(t as i32));
            p -= lr * mhat / (vhat.sqrt() + h.eps);
        }
        p
    }

    #[test]
    fn matches_the_textbook_update() {
        let h = AdamW { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };
        for decay in [false, true] {
            let mut p = vec![0.5f32, -1.0, 2.0];
            let g = vec![0.1f32, -0.02, 3.0];
            let (mut m, mut v) = (vec![0.0; 3], vec![0.0; 3]);
            for t in 1..=5 {
                h.update(&mut p, &g, &mut m, &mut v, 1e-2, t, decay);
            }
            for (i, (&got, (&p0, &g0))) in p.iter().zip([0.5f32, -1.0, 2.0].iter().zip(&g)).enumerate() {
                let want = reference(f64::from(p0), f64::from(g0), 5, 1e-2, &h, decay);
                assert!((f64::from(got) - want).abs() < 1e-6, "element {i} decay {decay}: {got} vs {want}");
            }
        }
    }

    #[test]
    fn the_fused_update_equals_scaling_then_updating_then_casting() {
        let h = AdamW { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };
        let n = 200_000; // several chunks
        let g: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let factor = 0.37f32;
        let (mut p1, mut m1, mut v1) = (vec![0.5f32; n], vec![0.01f32; n], vec![0.02f32; n]);
        let (mut p2, mut m2, mut v2) = (p1.clone(), m1.clone(), v1.clone());
        let scaled: Vec<f32> = g.iter().map(|x| x * factor).collect();
        h.update_decayed(&mut p1, &scaled, &mut m1, &mut v1, 3e-3, 4, 0.1);
        let mut out = vec![half::bf16::ZERO; n];
        h.update_fused(&mut p2, &g, &mut m2, &mut v2, factor, 3e-3, 4, 0.1, &mut out);
        assert_eq!((p1.clone(), m1, v1), (p2, m2, v2));
        assert!(out.iter().zip(&p1).all(|(o, p)| *o == half::bf16::from_f32(*p)));
    }

    #[test]
    fn split_updates_equal_the_whole() {
        let h = AdamW { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };
        let g: Vec<f32> = (0..100).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut whole = vec![1f32; 100];
        let (mut m, mut v) = (vec![0f32; 100], vec![0f32; 100]);
        h.update(&mut whole, &g, &mut m, &mut v, 3e-3, 1, true);
        let mut parts = vec![1f32; 100];
        let (mut m2, mut v2) = (vec![0f32; 100], vec![0f32; 100]);
        for r in [0..37, 37..64, 64..100] {
            h.update(&mut parts[r.clone()], &g[r.clone()], &mut m2[r.clone()], &mut v2[r.clone()], 3e-3, 1, true);
        }
        assert_eq!(whole, parts);
    }
}
