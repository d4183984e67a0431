//! Fused AdamW on CUDA: fp32 master weights and moments updated in one pass from an f32 gradient
//! times `factor`, writing the compute-dtype copy of the new weights — the arithmetic of
//! `AdamW::update` step for step (`_rn` intrinsics: no FMA contraction, IEEE sqrt and division), so
//! the results are the CPU's bit for bit. Also the plain cast of master weights into a compute copy.

use super::adamw::{AdamW, AdamWCoefficients};
use crate::cuda_kernels::{compile, elementwise, launch_err, suffix, with_tensor_view};
use candle_core::cuda::cudarc::driver::{CudaView, CudaViewMut, DeviceRepr, PushKernelArg};
use candle_core::cuda::CudaDType;
use candle_core::{DType, Result, Tensor};
use half::{bf16, f16};
use std::ops::Range;
use std::sync::OnceLock;

const SRC: &str = r#"
#define ADAMW_KERNELS(NAME, T, ST) \
extern "C" __global__ void adamw_##NAME(float* p, float* m, float* v, const float* g, T* out, long n, float factor, \
    float b1, float b2, float omb1, float omb2, float bias2_sqrt, float step, float eps, float shrink) { \
  GRID_STRIDE(i, n) { \
    float gi = __fmul_rn(g[i], factor); \
    float mi = __fadd_rn(__fmul_rn(b1, m[i]), __fmul_rn(omb1, gi)); \
    float vi = __fadd_rn(__fmul_rn(b2, v[i]), __fmul_rn(__fmul_rn(omb2, gi), gi)); \
    float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vi), bias2_sqrt), eps); \
    float pi = __fsub_rn(__fmul_rn(p[i], shrink), __fdiv_rn(__fmul_rn(step, mi), denom)); \
    m[i] = mi; v[i] = vi; p[i] = pi; out[i] = ST(pi); } } \
extern "C" __global__ void cast_##NAME(const float* p, T* out, long n) { GRID_STRIDE(i, n) out[i] = ST(p[i]); }
ADAMW_KERNELS(f32, float, st_f32)
ADAMW_KERNELS(bf16, unsigned short, st_bf16)
ADAMW_KERNELS(f16, unsigned short, st_f16)
"#;

const MODULE: &str = "ferrospeed_adamw";

fn ptx() -> Result<&'static str> {
    static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    compile(&PTX, SRC, "AdamW")
}

/// One AdamW step on the device: `master`, `m`, `v` updated in place from `grad · factor` (all of
/// one length), and the new weights rounded into elements `out_range` of the contiguous tensor `out`
/// (f32, bf16 or f16; e.g. the parameter's own variable). `weight_decay` as in [`AdamW::update_decayed`].
#[allow(clippy::too_many_arguments)]
pub fn adamw_update(
    opt: &AdamW,
    master: &mut CudaViewMut<'_, f32>,
    m: &mut CudaViewMut<'_, f32>,
    v: &mut CudaViewMut<'_, f32>,
    grad: &CudaView<'_, f32>,
    factor: f32,
    out: &Tensor,
    out_range: Range<usize>,
    lr: f64,
    t: u64,
    weight_decay: f64,
) -> Result<()> {
    let n = master.len();
    if m.len() != n || v.len() != n || grad.len() != n || out_range.len() != n {
        candle_core::bail!(
            "AdamW on CUDA: lengths differ (master {n}, m {}, v {}, grad {}, output {})",
            m.len(),
            v.len(),
            grad.len(),
            out_range.len()
        )
    }
    if n == 0 {
        return Ok(());
    }
    let c = opt.coefficients_decayed(lr, t, weight_decay);
    fn run<T: CudaDType + DeviceRepr>(
        st: (&mut CudaViewMut<'_, f32>, &mut CudaViewMut<'_, f32>, &mut CudaViewMut<'_, f32>, &CudaView<'_, f32>),
        factor: f32,
        c: AdamWCoefficients,
        out: &Tensor,
        out_range: Range<usize>,
    ) -> Result<()> {
        let (master, m, v, grad) = st;
        with_tensor_view::<T, _>(out, out_range, |dev, ov| {
            let func = dev.get_or_load_custom_func(&format!("adamw_{}", suffix(out.dtype(), "AdamW")?), MODULE, ptx()?)?;
            let n = master.len() as i64;
            // The same f32 subtractions the CPU loop performs.
            let (omb1, omb2) = (1.0f32 - c.b1, 1.0f32 - c.b2);
            let mut b = func.builder();
            b.arg(master).arg(m).arg(v).arg(grad).arg(ov).arg(&n).arg(&factor);
            b.arg(&c.b1).arg(&c.b2).arg(&omb1).arg(&omb2).arg(&c.bias2_sqrt).arg(&c.step).arg(&c.eps).arg(&c.shrink);
            unsafe { b.launch(elementwise(n as usize)) }.map(|_| ()).map_err(launch_err)
        })
    }
    let st = (master, m, v, grad);
    match out.dtype() {
        DType::F32 => run::<f32>(st, factor, c, out, out_range),
        DType::BF16 => run::<bf16>(st, factor, c, out, out_range),
        DType::F16 => run::<f16>(st, factor, c, out, out_range),
        other => candle_core::bail!("AdamW on CUDA: unsupported output dtype {other:?}"),
    }
}

/// Round `master` into elements `out_range` of the contiguous tensor `out` (its dtype).
pub fn cast_into(master: &CudaView<'_, f32>, out: &Tensor, out_range: Range<usize>) -> Result<()> {
    let n = master.len();
    if out_range.len() != n {
        candle_core::bail!("cast on CUDA: {n} master weights for {} outputs", out_range.len())
    }
    if n == 0 {
        return Ok(());
    }
    fn run<T: CudaDType + DeviceRepr>(master: &CudaView<'_, f32>, out: &Tensor, out_range: Range<usize>) -> Result<()> {
        with_tensor_view::<T, _>(out, out_range, |dev, ov| {
            let func = dev.get_or_load_custom_func(&format!("cast_{}", suffix(out.dtype(), "cast")?), MODULE, ptx()?)?;
            let n = master.len() as i64;
            let mut b = func.builder();
            b.arg(master).arg(ov).arg(&n);
            unsafe { b.launch(elementwise(n as usize)) }.map(|_| ()).map_err(launch_err)
        })
    }
    match out.dtype() {
        DType::F32 => run::<f32>(master, out, out_range),
        DType::BF16 => run::<bf16>(master, out, out_range),
        DType::F16 => run::<f16>(master, out, out_range),
        other => candle_core::bail!("cast on CUDA: unsupported output dtype {other:?}"),
    }
}
