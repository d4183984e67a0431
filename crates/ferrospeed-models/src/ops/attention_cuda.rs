//! Launches of the fused attention kernels (`attention_kernels.cu`, NVRTC for compute_80: `mma.sync` on
//! bf16 needs Ampere or later): forward, then in the backward `Σ dy·y` per row, dQ, and dK with dV.

use super::attention::AttnOut;
use super::cuda_kernels::{compile_for, compute_capability, launch_err, suffix};
use super::fused_cuda::{view, wrap};
use candle_core::cuda::cudarc::driver::{CudaFunction, DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda::{CudaDType, CudaDevice};
use candle_core::{DType, Result, Tensor};
use half::{bf16, f16};
use std::sync::OnceLock;

const SRC: &str = include_str!("attention_kernels.cu");
const HEAD_DIMS: [usize; 3] = [32, 64, 128];
/// Rows of a tile (queries or keys): the kernels' `TILE`.
const TILE: usize = 64;

fn func(dev: &CudaDevice, name: &str) -> Result<CudaFunction> {
    static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    let ptx = compile_for(&PTX, SRC, "fused attention", Some("compute_80"))?;
    Ok(dev.get_or_load_custom_func(name, "ferrospeed_attention", ptx)?.into_cuda_function())
}

pub fn supported(dev: &CudaDevice, dtype: DType, hd: usize) -> bool {
    static SM80: OnceLock<bool> = OnceLock::new();
    matches!(dtype, DType::BF16 | DType::F16) && HEAD_DIMS.contains(&hd) && *SM80.get_or_init(|| compute_capability(dev).is_ok_and(|(major, _)| major >= 8))
}

/// One block per 64-row tile and (batch row, head): the second grid dimension holds at most 65,535.
fn tiles(b: usize, t: usize, nh: usize) -> Result<LaunchConfig> {
    if b * nh > 65_535 {
        candle_core::bail!(
            "fused attention: micro-batch × heads = {} exceeds the 65,535 blocks of a CUDA grid dimension; use a smaller \
             micro-batch or FERROSPEED_FUSED_ATTENTION=0",
            b * nh
        )
    }
    Ok(LaunchConfig { grid_dim: (t.div_ceil(TILE) as u32, (b * nh) as u32, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 })
}

fn name(kernel: &str, dtype: DType, hd: usize) -> Result<String> {
    if !HEAD_DIMS.contains(&hd) {
        candle_core::bail!("fused attention: head dimension {hd} is not one of {HEAD_DIMS:?}")
    }
    Ok(format!("attn_{kernel}_{}_{hd}", suffix(dtype, "fused attention")?))
}

/// The document starts of a packed batch (u32 `[b·t]`) on the device, or one placeholder word with
/// `docs = 0` (the kernels then never read it).
fn starts_or_placeholder(starts: Option<&Tensor>, qkv: &Tensor) -> Result<(Tensor, i32)> {
    match starts {
        Some(s) => Ok((s.to_dtype(DType::U32)?.contiguous()?, 1)),
        None => Ok((Tensor::zeros(1, DType::U32, qkv.device())?, 0)),
    }
}

pub fn forward(qkv: &Tensor, b: usize, t: usize, nh: usize, nkv: usize, hd: usize, starts: Option<&Tensor>) -> Result<AttnOut> {
    fn run<T: CudaDType + DeviceRepr>(qkv: &Tensor, b: usize, t: usize, nh: usize, nkv: usize, hd: usize, starts: &Tensor, docs: i32) -> Result<AttnOut> {
        let name = name("fwd", qkv.dtype(), hd)?;
        view::<T, _>(qkv, |dev, qv| view::<u32, _>(starts, |_, sv| {
            let y = unsafe { dev.alloc::<T>(b * t * nh * hd)? };
            let lse = unsafe { dev.alloc::<f32>(b * nh * t)? };
            let (t_i, nh_i, nkv_i, scale) = (t as i32, nh as i32, nkv as i32, 1.0 / (hd as f32).sqrt());
            let f = func(dev, &name)?;
            let stream = dev.cuda_stream();
            let mut l = stream.launch_builder(&f);
            l.arg(&qv).arg(&y).arg(&lse).arg(&sv).arg(&docs).arg(&t_i).arg(&nh_i).arg(&nkv_i).arg(&scale);
            unsafe { l.launch(tiles(b, t, nh)?) }.map_err(launch_err)?;
            Ok(AttnOut { y: wrap(y, dev, &[b * t, nh * hd]), lse: wrap(lse, dev, &[b, nh, t]) })
        }))
    }
    let (starts, docs) = starts_or_placeholder(starts, qkv)?;
    match qkv.dtype() {
        DType::BF16 => run::<bf16>(qkv, b, t, nh, nkv, hd, &starts, docs),
        DType::F16 => run::<f16>(qkv, b, t, nh, nkv, hd, &starts, docs),
        other => candle_core::bail!("fused attention: unsupported dtype {other:?} (bf16 or f16)"),
    }
}

#[allow(clippy::too_many_arguments)]
pub fn backward(qkv: &Tensor, y: &Tensor, lse: &Tensor, dy: &Tensor, b: usize, t: usize, nh: usize, nkv: usize, hd: usize, starts: Option<&Tensor>) -> Result<Tensor> {
    #[allow(clippy::too_many_arguments)]
    fn run<T: CudaDType + DeviceRepr>(qkv: &Tensor, y: &Tensor, lse: &Tensor, dy: &Tensor, b: usize, t: usize, nh: usize, nkv: usize, hd: usize, starts: &Tensor, docs: i32) -> Result<Tensor> {
        let dtype = qkv.dtype();
        view::<T, _>(qkv, |dev, qv| view::<u32, _>(starts, |_, sv| {
            view::<T, _>(y, |_, yv| {
                view::<T, _>(dy, |_, gv| {
                    view::<f32, _>(lse, |_, lv| {
                        let rows = (b * t * nh) as i64;
                        let delta = unsafe { dev.alloc::<f32>(b * nh * t)? };
                        let w = (nh + 2 * nkv) * hd;
                        let dqkv = unsafe { dev.alloc::<T>(b * t * w)? };
                        let (t_i, nh_i, nkv_i, scale) = (t as i32, nh as i32, nkv as i32, 1.0 / (hd as f32).sqrt());
                        let stream = dev.cuda_stream();
                        let f = func(dev, &name("delta", dtype, hd)?)?;
                        let mut l = stream.launch_builder(&f);
                        l.arg(&yv).arg(&gv).arg(&delta).arg(&t_i).arg(&nh_i).arg(&rows);
                        let cfg = LaunchConfig { grid_dim: ((rows as usize).div_ceil(8) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
                        unsafe { l.launch(cfg) }.map_err(launch_err)?;
                        // dQ per query head; dK and dV per key/value head, summing its query group in order.
                        for (kernel, heads) in [("bwd_dq", nh), ("bwd_dkv", nkv)] {
                            let f = func(dev, &name(kernel, dtype, hd)?)?;
                            let mut l = stream.launch_builder(&f);
                            l.arg(&qv).arg(&gv).arg(&lv).arg(&delta).arg(&dqkv).arg(&sv).arg(&docs).arg(&t_i).arg(&nh_i).arg(&nkv_i).arg(&scale);
                            unsafe { l.launch(tiles(b, t, heads)?) }.map_err(launch_err)?;
                        }
                        Ok(wrap(dqkv, dev, &[b * t, w]))
                    })
                })
            })
        }))
    }
    if lse.dtype() != DType::F32 {
        candle_core::bail!("fused attention backward: lse must be f32, got {:?}", lse.dtype())
    }
    let (starts, docs) = starts_or_placeholder(starts, qkv)?;
    match qkv.dtype() {
        DType::BF16 => run::<bf16>(qkv, y, lse, dy, b, t, nh, nkv, hd, &starts, docs),
        DType::F16 => run::<f16>(qkv, y, lse, dy, b, t, nh, nkv, hd, &starts, docs),
        other => candle_core::bail!("fused attention: unsupported dtype {other:?} (bf16 or f16)"),
    }
}
