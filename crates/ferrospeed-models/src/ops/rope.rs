//! Rotary position embeddings (RoPE) as Llama applies them, in transformers' "rotate half" layout:
//! each head vector's first half pairs with its second half. Applied to the q and k heads of a fused
//! projection `[b·t, (nh + 2·nkv)·hd]` (v passes through), so the attention reads positions already
//! rotated. The backward is the inverse rotation. The tables are built as transformers builds them
//! (inverse frequencies and angles rounded to f32, Llama-3 frequency scaling) so that logits agree.

use super::fused::{f64s, tensor};
use candle_core::{Device, Result, Tensor};

/// Llama 3's scaling of the rotary frequencies (`rope_scaling` with `rope_type = "llama3"`).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Llama3Scaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

/// The inverse frequencies `[hd/2]`, each rounded to f32 as transformers computes them.
pub fn inv_freq(head_dim: usize, theta: f64, scaling: Option<Llama3Scaling>) -> Vec<f32> {
    let base: Vec<f32> = (0..head_dim / 2).map(|i| (1.0 / theta.powf((2 * i) as f64 / head_dim as f64)) as f32).collect();
    let Some(s) = scaling else { return base };
    let old = s.original_max_position_embeddings as f64;
    let (low_wavelen, high_wavelen) = (old / s.low_freq_factor, old / s.high_freq_factor);
    base.iter()
        .map(|&f| {
            let f = f as f64;
            let wavelen = 2.0 * std::f64::consts::PI / f;
            let scaled = if wavelen > low_wavelen { f / s.factor } else { f };
            if wavelen < high_wavelen || wavelen > low_wavelen {
                return scaled as f32;
            }
            let smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
            ((1.0 - smooth) * scaled / s.factor + smooth * scaled) as f32
        })
        .collect()
}

/// `cos` and `sin` tables `[t, hd/2]` (f32) for positions `0..t`.
pub fn tables(inv_freq: &[f32], t: usize, device: &Device) -> Result<(Tensor, Tensor)> {
    let half = inv_freq.len();
    let (mut cos, mut sin) = (Vec::with_capacity(t * half), Vec::with_capacity(t * half));
    for p in 0..t {
        for &f in inv_freq {
            let angle = (p as f32 * f) as f64;
            cos.push(angle.cos() as f32);
            sin.push(angle.sin() as f32);
        }
    }
    Ok((Tensor::from_vec(cos, (t, half), device)?, Tensor::from_vec(sin, (t, half), device)?))
}

/// The q and k heads of `qkv` `[b·t, (nh + 2·nkv)·hd]` rotated to their positions (`row % t`); with
/// `inverse`, rotated back (the backward of the forward rotation).
pub fn rope_qkv(qkv: &Tensor, cos: &Tensor, sin: &Tensor, t: usize, nh: usize, nkv: usize, inverse: bool) -> Result<Tensor> {
    let (n, w) = qkv.dims2()?;
    let hd = w / (nh + 2 * nkv);
    if hd * (nh + 2 * nkv) != w || hd % 2 != 0 || n % t != 0 {
        candle_core::bail!("rope: qkv {:?} is not [b·t, (nh + 2·nkv)·hd] for t={t}, nh={nh}, nkv={nkv}", qkv.dims())
    }
    #[cfg(feature = "cuda")]
    if let Device::Cuda(_) = qkv.device() {
        return super::llama_cuda::rope(&qkv.contiguous()?, &cos.contiguous()?, &sin.contiguous()?, t, nh, nkv, hd, inverse);
    }
    let (x, c, s) = (f64s(qkv)?, f64s(cos)?, f64s(sin)?);
    let half = hd / 2;
    let sign = if inverse { -1.0 } else { 1.0 };
    let mut y = x.clone();
    for r in 0..n {
        let p = r % t;
        for h in 0..nh + nkv {
            let at = r * w + h * hd;
            for i in 0..half {
                let (x1, x2) = (x[at + i], x[at + half + i]);
                let (cc, ss) = (c[p * half + i], sign * s[p * half + i]);
                y[at + i] = x1 * cc - x2 * ss;
                y[at + half + i] = x2 * cc + x1 * ss;
            }
        }
    }
    tensor(y, &[n, w], qkv.dtype())
}

/// RoPE composed of candle ops on heads `x` `[b, h, t, hd]` (differentiable by autograd):
/// `x · cos + rotate_half(x) · sin` with the tables' dtype cast to `x`'s. The tables are `[T ≥ t, hd/2]`
/// (positions `0..t`) or `[b, t, hd/2]` (each token's own position, a packed batch).
pub fn rope_composed(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (b, _, t, hd) = x.dims4()?;
    let half = hd / 2;
    let full = |c: &Tensor| -> Result<Tensor> {
        if c.rank() == 3 {
            Tensor::cat(&[c, c], 2)?.reshape((b, 1, t, hd))?.to_dtype(x.dtype())
        } else {
            Tensor::cat(&[c.narrow(0, 0, t)?, c.narrow(0, 0, t)?], 1)?.to_dtype(x.dtype())
        }
    };
    let (cos, sin) = (full(cos)?, full(sin)?);
    let rotated = Tensor::cat(&[x.narrow(3, half, half)?.neg()?, x.narrow(3, 0, half)?], 3)?;
    x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::fused::tests::{max_diff, randn};
    use candle_core::DType;

    #[test]
    fn rope_matches_the_composed_op_and_inverts() {
        let (b, t, nh, nkv, hd) = (2, 3, 4, 2, 6);
        let qkv = randn(&[b * t, (nh + 2 * nkv) * hd], 31);
        let (cos, sin) = tables(&inv_freq(hd, 10_000.0, None), t, &Device::Cpu).unwrap();
        let (cos, sin) = (cos.to_dtype(DType::F64).unwrap(), sin.to_dtype(DType::F64).unwrap());
        let y = rope_qkv(&qkv, &cos, &sin, t, nh, nkv, false).unwrap();
        let heads = |m: &Tensor, from: usize, h: usize| m.narrow(1, from * hd, h * hd).unwrap().reshape((b, t, h, hd)).unwrap().transpose(1, 2).unwrap().contiguous().unwrap();
        assert!(max_diff(&heads(&y, 0, nh), &rope_composed(&heads(&qkv, 0, nh), &cos, &sin).unwrap()) < 1e-12);
        assert!(max_diff(&heads(&y, nh, nkv), &rope_composed(&heads(&qkv, nh, nkv), &cos, &sin).unwrap()) < 1e-12);
        assert!(max_diff(&heads(&y, nh + nkv, nkv), &heads(&qkv, nh + nkv, nkv)) == 0.0, "v is not rotated");
        // The tables are f32: cos² + sin² is 1 to f32 rounding.
        assert!(max_diff(&rope_qkv(&y, &cos, &sin, t, nh, nkv, true).unwrap(), &qkv) < 1e-6);
    }

    #[test]
    fn llama3_scaling_keeps_high_frequencies_and_divides_low_ones() {
        let s = Llama3Scaling { factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 8192 };
        let (plain, scaled) = (inv_freq(64, 500_000.0, None), inv_freq(64, 500_000.0, Some(s)));
        assert_eq!(plain[0], scaled[0]);
        assert_eq!(plain[31] / 8.0, scaled[31]);
        assert!(plain.iter().zip(&scaled).all(|(p, s)| s <= p));
    }
}
