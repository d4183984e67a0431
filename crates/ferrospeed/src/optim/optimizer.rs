//! The optimizer trait the strategies shard: an elementwise update of flat f32 slices with per-element
//! state buffers (AdamW's two moments, SGD's momentum), so that any shard of a block can be updated on
//! its own and give the unsharded result bit for bit. Also SGD with momentum.

use std::fmt::Debug;

/// Per-call hyper-parameters: what the schedule and the parameter's group decide.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hyper {
    /// Learning rate of this step for this parameter (the schedule's times the group's scale).
    pub lr: f64,
    /// Optimizer step, 1-based (bias corrections).
    pub step: u64,
    /// Weight decay of the parameter's group; 0 for none.
    pub weight_decay: f64,
}

/// An optimizer over flat f32 slices. Implementations must be elementwise: the new value of an
/// element depends only on that element's parameter, gradient and state (the ZeRO stages rely on it).
pub trait Optimizer: Send + Sync + Debug {
    /// A short name, recorded in checkpoints (`"adamw"`, `"sgd"`).
    fn name(&self) -> &'static str;

    /// Names of the per-element fp32 state buffers, in the order [`Optimizer::update`] receives them;
    /// also their tensor names in checkpoints (PyTorch's: `exp_avg`, `momentum_buffer`).
    fn state_names(&self) -> &'static [&'static str];

    /// The weight decay of parameters that decay, unless a parameter group says otherwise.
    fn weight_decay(&self) -> f64;

    /// Update `params` in place from `grads` and `state` (one slice per state name, all of one length).
    fn update(&self, params: &mut [f32], grads: &[f32], state: &mut [&mut [f32]], hp: Hyper);

    /// The AdamW hyper-parameters when this is AdamW: the CUDA path runs its fused kernel.
    fn as_adamw(&self) -> Option<&super::AdamW> {
        None
    }
}

/// Stochastic gradient descent with momentum and L2 weight decay, as PyTorch's `torch.optim.SGD`
/// (dampening 0): `g += wd·p; buf = μ·buf + g; p -= lr·(nesterov ? g + μ·buf : buf)`. With
/// momentum 0 it keeps no state and is `p -= lr·g`, candle-nn's `SGD`.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Sgd {
    /// Momentum μ; 0 for plain SGD.
    pub momentum: f64,
    /// L2 penalty added to the gradient of parameters that decay.
    pub weight_decay: f64,
    /// Nesterov momentum.
    pub nesterov: bool,
}

impl Optimizer for Sgd {
    fn name(&self) -> &'static str {
        "sgd"
    }

    fn state_names(&self) -> &'static [&'static str] {
        if self.momentum != 0.0 {
            &["momentum_buffer"]
        } else {
            &[]
        }
    }

    fn weight_decay(&self) -> f64 {
        self.weight_decay
    }

    fn update(&self, params: &mut [f32], grads: &[f32], state: &mut [&mut [f32]], hp: Hyper) {
        let (lr, wd, mu) = (hp.lr as f32, hp.weight_decay as f32, self.momentum as f32);
        let step = |p: &mut f32, g: f32, buf: Option<&mut f32>| {
            let g = if wd != 0.0 { g + wd * *p } else { g };
            let d = match buf {
                None => g,
                Some(b) => {
                    *b = mu * *b + g;
                    if self.nesterov {
                        g + mu * *b
                    } else {
                        *b
                    }
                }
            };
            *p -= lr * d;
        };
        match state {
            [] => params.iter_mut().zip(grads).for_each(|(p, &g)| step(p, g, None)),
            [buf] => params.iter_mut().zip(grads).zip(buf.iter_mut()).for_each(|((p, &g), b)| step(p, g, Some(b))),
            _ => unreachable!("the engine allocates SGD's state buffers from state_names"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sgd_matches_pytorch_formulas_and_splits_give_the_same_bits() {
        let sgd = Sgd { momentum: 0.9, weight_decay: 0.01, nesterov: false };
        let (mut p, mut buf) = (vec![1.0f32, -2.0, 0.5], vec![0.0f32; 3]);
        let g = [0.1f32, 0.2, -0.3];
        let hp = |step| Hyper { lr: 0.1, step, weight_decay: 0.01 };
        sgd.update(&mut p, &g, &mut [&mut buf], hp(1));
        sgd.update(&mut p, &g, &mut [&mut buf], hp(2));
        // By hand in f64 for element 0: g' = 0.1 + 0.01·1 = 0.11, buf = 0.11, p = 0.989;
        // g' = 0.1 + 0.00989 = 0.10989, buf = 0.9·0.11 + 0.10989 = 0.20889, p = 0.989 − 0.020889.
        assert!((f64::from(p[0]) - (0.989 - 0.020889)).abs() < 1e-6, "{}", p[0]);
        let (mut q, mut qb) = (vec![1.0f32, -2.0, 0.5], vec![0.0f32; 3]);
        for step in 1..=2 {
            let (a, b) = q.split_at_mut(1);
            let (ba, bb) = qb.split_at_mut(1);
            sgd.update(a, &g[..1], &mut [ba], hp(step));
            sgd.update(b, &g[1..], &mut [bb], hp(step));
        }
        assert_eq!(p, q);
        let plain = Sgd::default();
        assert!(plain.state_names().is_empty());
        let mut r = vec![1.0f32];
        plain.update(&mut r, &[0.5], &mut [], Hyper { lr: 0.1, step: 1, weight_decay: 0.0 });
        assert_eq!(r[0], 1.0 - 0.1f32 * 0.5);
    }
}
