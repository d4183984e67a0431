//! Causal self-attention read straight from the QKV projection `[b·t, (nh + 2·nkv)·hd]` (per row: the nh
//! query heads, then the nkv key heads, then the nkv value heads; nkv < nh is grouped-query attention,
//! query head h reading key/value head h / (nh / nkv), with no repeated K/V in memory) and written
//! straight in the output projection's layout `[b·t, d]`: no head split or merge copies, and on CUDA no
//! `t × t` scores in memory (`attention_kernels.cu`, tensor cores, bf16/f16). The forward keeps the
//! log-sum-exp of each row, which is all the backward needs to recompute the probabilities.
//!
//! The CPU functions are the reference, in f64 (what the GPU tests compare the kernels with); the layer
//! uses this path only where [`fused_attention_available`] says the kernels run.

use candle_core::{DType, Device, Result, Tensor};

/// The output `[b·t, d]` of the attention and the natural-log log-sum-exp `[b, nh, t]` (f32) of each
/// row's scaled scores.
pub struct AttnOut {
    pub y: Tensor,
    pub lse: Tensor,
}

/// Whether the fused kernels run for `qkv` with head dimension `hd`: a CUDA tensor in bf16 or f16 on a
/// device of compute capability 8.0 or later, `hd` one of 32, 64, 128. `FERROSPEED_FUSED_ATTENTION=0`
/// turns them off (the composed path, for comparisons).
pub fn fused_attention_available(qkv: &Tensor, hd: usize) -> bool {
    if std::env::var("FERROSPEED_FUSED_ATTENTION").is_ok_and(|v| v == "0") {
        return false;
    }
    match qkv.device() {
        #[cfg(feature = "cuda")]
        Device::Cuda(dev) => super::attention_cuda::supported(dev, qkv.dtype(), hd),
        _ => {
            let _ = hd;
            false
        }
    }
}

fn check(qkv: &Tensor, b: usize, t: usize, nh: usize, nkv: usize) -> Result<(usize, usize)> {
    let (n, w) = qkv.dims2()?;
    if n != b * t || nkv == 0 || nh % nkv != 0 || w % (nh + 2 * nkv) != 0 {
        candle_core::bail!("attention: qkv {:?} is not [b·t, (nh + 2·nkv)·hd] for b={b}, t={t}, nh={nh}, nkv={nkv}", qkv.dims())
    }
    let hd = w / (nh + 2 * nkv);
    Ok((nh * hd, hd))
}

/// Offsets of the q, k and v vectors of query head `h` in row `row` of a qkv `[n, (nh + 2·nkv)·hd]`.
fn offsets(row: usize, h: usize, nh: usize, nkv: usize, hd: usize) -> [usize; 3] {
    let (w, kv) = ((nh + 2 * nkv) * hd, h / (nh / nkv));
    [row * w + h * hd, row * w + (nh + kv) * hd, row * w + (nh + nkv + kv) * hd]
}

/// Contiguous and starting on a 16-byte boundary (the kernels load 8 halves at a time).
#[cfg(feature = "cuda")]
fn aligned(t: &Tensor) -> Result<Tensor> {
    let t = t.contiguous()?;
    if t.layout().start_offset() % 8 == 0 {
        Ok(t)
    } else {
        t.copy()
    }
}

fn f64s(t: &Tensor) -> Result<Vec<f64>> {
    t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()
}

/// The first key each query may see: `starts[b·t]` (a packed batch, [`super::docs::Docs`]) or 0.
fn first_keys(starts: Option<&Tensor>, n: usize) -> Result<Vec<usize>> {
    match starts {
        None => Ok(vec![0; n]),
        Some(s) => {
            let s = s.flatten_all()?.to_dtype(DType::U32)?.to_vec1::<u32>()?;
            if s.len() != n {
                candle_core::bail!("attention: {} document starts for {n} rows", s.len())
            }
            Ok(s.into_iter().map(|v| v as usize).collect())
        }
    }
}

/// `softmax(q·kᵀ/√hd + causal mask)·v` per query head, `nkv` key/value heads. With `starts` (a packed
/// batch) query `i` sees only keys `starts[i] ..= i`, those of its own document.
pub fn attention_forward(qkv: &Tensor, b: usize, t: usize, nh: usize, nkv: usize, starts: Option<&Tensor>) -> Result<AttnOut> {
    let (d, hd) = check(qkv, b, t, nh, nkv)?;
    #[cfg(feature = "cuda")]
    if let Device::Cuda(_) = qkv.device() {
        return super::attention_cuda::forward(&aligned(qkv)?, b, t, nh, nkv, hd, starts);
    }
    let first = first_keys(starts, b * t)?;
    let x = f64s(qkv)?;
    let scale = 1.0 / (hd as f64).sqrt();
    let (mut y, mut lse) = (vec![0.0; b * t * d], vec![0.0; b * nh * t]);
    let at = |bi: usize, ti: usize, part: usize, h: usize| offsets(bi * t + ti, h, nh, nkv, hd)[part];
    for bi in 0..b {
        for h in 0..nh {
            for i in 0..t {
                let q = &x[at(bi, i, 0, h)..][..hd];
                let j0 = first[bi * t + i];
                let s: Vec<f64> = (j0..=i).map(|j| scale * dot(q, &x[at(bi, j, 1, h)..][..hd])).collect();
                let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let l = m + s.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
                let out = &mut y[(bi * t + i) * d + h * hd..][..hd];
                for (j, sj) in s.iter().enumerate() {
                    let p = (sj - l).exp();
                    out.iter_mut().zip(&x[at(bi, j0 + j, 2, h)..][..hd]).for_each(|(o, v)| *o += p * v);
                }
                lse[(bi * nh + h) * t + i] = l;
            }
        }
    }
    let y = Tensor::from_vec(y, (b * t, d), &Device::Cpu)?.to_dtype(qkv.dtype())?;
    Ok(AttnOut { y, lse: Tensor::from_vec(lse, (b, nh, t), &Device::Cpu)?.to_dtype(DType::F32)? })
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// The gradient `[b·t, 3·d]` with respect to `qkv` for the output gradient `dy` `[b·t, d]`, given the
/// forward's output `y` and `lse`. The probabilities are recomputed; `Σ dy·y` uses the `y` given (as
/// the kernels do).
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(qkv: &Tensor, y: &Tensor, lse: &Tensor, dy: &Tensor, b: usize, t: usize, nh: usize, nkv: usize, starts: Option<&Tensor>) -> Result<Tensor> {
    let (d, hd) = check(qkv, b, t, nh, nkv)?;
    #[cfg(feature = "cuda")]
    if let Device::Cuda(_) = qkv.device() {
        return super::attention_cuda::backward(&aligned(qkv)?, &aligned(y)?, &lse.contiguous()?, &aligned(dy)?, b, t, nh, nkv, hd, starts);
    }
    let first = first_keys(starts, b * t)?;
    let (x, yv, lv, g) = (f64s(qkv)?, f64s(y)?, f64s(lse)?, f64s(dy)?);
    let scale = 1.0 / (hd as f64).sqrt();
    let w = (nh + 2 * nkv) * hd;
    let mut dx = vec![0.0; b * t * w];
    let at = |bi: usize, ti: usize, part: usize, h: usize| offsets(bi * t + ti, h, nh, nkv, hd)[part];
    for bi in 0..b {
        for h in 0..nh {
            for i in 0..t {
                let row = (bi * t + i) * d + h * hd;
                let (gi, yi) = (&g[row..][..hd], &yv[row..][..hd]);
                let delta = dot(gi, yi);
                let l = lv[(bi * nh + h) * t + i];
                for j in first[bi * t + i]..=i {
                    let (qi, kj, vj) = (at(bi, i, 0, h), at(bi, j, 1, h), at(bi, j, 2, h));
                    let p = (scale * dot(&x[qi..][..hd], &x[kj..][..hd]) - l).exp();
                    let ds = scale * p * (dot(gi, &x[vj..][..hd]) - delta);
                    for e in 0..hd {
                        dx[qi + e] += ds * x[kj + e];
                        dx[kj + e] += ds * x[qi + e];
                        dx[vj + e] += p * gi[e];
                    }
                }
            }
        }
    }
    Tensor::from_vec(dx, (b * t, w), &Device::Cpu)?.to_dtype(qkv.dtype())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::causal_softmax;
    use crate::ops::fused::tests::{max_diff, randn};
    use candle_core::Var;

    /// The composed attention (split heads, K/V heads repeated for their query groups, scores, causal
    /// softmax, merge), with autograd.
    fn composed(qkv: &Tensor, b: usize, t: usize, nh: usize, nkv: usize) -> Tensor {
        let hd = qkv.dim(1).unwrap() / (nh + 2 * nkv);
        let heads = |from: usize, h: usize| qkv.narrow(1, from * hd, h * hd).unwrap().reshape((b, t, h, hd)).unwrap().transpose(1, 2).unwrap().contiguous().unwrap();
        let repeat = |x: Tensor| {
            let per: Vec<Tensor> = (0..nh).map(|h| x.narrow(1, h / (nh / nkv), 1).unwrap()).collect();
            Tensor::cat(&per, 1).unwrap()
        };
        let (q, k, v) = (heads(0, nh), repeat(heads(nh, nkv)), repeat(heads(nh + nkv, nkv)));
        let p = causal_softmax(&q.matmul(&k.t().unwrap()).unwrap(), 1.0 / (hd as f64).sqrt()).unwrap();
        p.matmul(&v).unwrap().transpose(1, 2).unwrap().contiguous().unwrap().reshape((b * t, nh * hd)).unwrap()
    }

    #[test]
    fn reference_matches_autograd_of_the_composed_attention() {
        for nkv in [3, 1] {
            check_against_composed(3, nkv);
        }
        check_against_composed(4, 2);
    }

    fn check_against_composed(nh: usize, nkv: usize) {
        let (b, t, hd) = (2, 5, 4);
        let qkv = Var::from_tensor(&randn(&[b * t, (nh + 2 * nkv) * hd], 1)).unwrap();
        let g = randn(&[b * t, nh * hd], 2);
        let want = composed(&qkv, b, t, nh, nkv);
        let grads = (&want * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let out = attention_forward(&qkv.detach(), b, t, nh, nkv, None).unwrap();
        assert!(max_diff(&out.y, &want) < 1e-12);
        // The log-sum-exp of row 0 of every head is its only scaled score, q₀·k₀/√hd.
        let x = qkv.detach().to_vec2::<f64>().unwrap();
        let l0 = dot(&x[0][..hd], &x[0][nh * hd..nh * hd + hd]) / (hd as f64).sqrt();
        assert!((out.lse.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap()[0] - l0).abs() < 1e-6);
        let dqkv = attention_backward(&qkv.detach(), &out.y, &out.lse.to_dtype(DType::F64).unwrap(), &g, b, t, nh, nkv, None).unwrap();
        // lse went through f32: the gradient is exact to f32 rounding of the log-sum-exp.
        assert!(max_diff(&dqkv, grads.get(&qkv).unwrap()) < 1e-5, "{}", max_diff(&dqkv, grads.get(&qkv).unwrap()));
    }

    #[test]
    fn bad_shapes_are_named() {
        let e = attention_forward(&Tensor::zeros((6, 9), DType::F32, &Device::Cpu).unwrap(), 2, 4, 3, 3, None).err().unwrap();
        assert!(e.to_string().contains("[b·t, (nh + 2·nkv)·hd]"), "{e}");
    }
}
