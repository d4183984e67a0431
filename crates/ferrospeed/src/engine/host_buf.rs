//! A host buffer in one of the compute dtypes (f32, bf16, f16), with the conversions the engine needs.

use crate::comm::{Buf, BufMut};
use candle_core::{DType, Device, Tensor, Var};
use half::{bf16, f16};
use std::ops::Range;

/// Parameters or gradients in a compute dtype.
#[derive(Debug, Clone)]
pub enum HostBuf {
    /// Values in f32.
    F32(Vec<f32>),
    /// Values in bf16.
    Bf16(Vec<bf16>),
    /// Values in f16.
    F16(Vec<f16>),
}

impl HostBuf {
    /// `values` rounded to `dtype` (f32, bf16 or f16).
    pub fn from_f32(dtype: DType, values: &[f32]) -> Self {
        match dtype {
            DType::BF16 => Self::Bf16(values.iter().map(|&v| bf16::from_f32(v)).collect()),
            DType::F16 => Self::F16(values.iter().map(|&v| f16::from_f32(v)).collect()),
            _ => Self::F32(values.to_vec()),
        }
    }

    /// `len` zeros in `dtype` (f32 for any dtype other than bf16 and f16).
    pub fn zeros(dtype: DType, len: usize) -> Self {
        match dtype {
            DType::BF16 => Self::Bf16(vec![bf16::ZERO; len]),
            DType::F16 => Self::F16(vec![f16::ZERO; len]),
            _ => Self::F32(vec![0.0; len]),
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Self::F32(v) => v.len(),
            Self::Bf16(v) => v.len(),
            Self::F16(v) => v.len(),
        }
    }

    /// Whether the buffer has no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        match self {
            Self::F32(v) => v.len() * 4,
            Self::Bf16(v) => v.len() * 2,
            Self::F16(v) => v.len() * 2,
        }
    }

    /// Write `values` (rounded) at `offset`.
    pub fn write_f32(&mut self, offset: usize, values: &[f32]) {
        match self {
            Self::F32(v) => v[offset..offset + values.len()].copy_from_slice(values),
            Self::Bf16(v) => v[offset..offset + values.len()].iter_mut().zip(values).for_each(|(d, s)| *d = bf16::from_f32(*s)),
            Self::F16(v) => v[offset..offset + values.len()].iter_mut().zip(values).for_each(|(d, s)| *d = f16::from_f32(*s)),
        }
    }

    /// The values as f32.
    pub fn to_f32(&self) -> Vec<f32> {
        match self {
            Self::F32(v) => v.clone(),
            Self::Bf16(v) => v.iter().map(|x| x.to_f32()).collect(),
            Self::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
        }
    }

    /// The values as a communication buffer, for sending in a collective (no copy).
    pub fn as_buf(&self) -> Buf<'_> {
        match self {
            Self::F32(v) => Buf::F32(v),
            Self::Bf16(v) => Buf::Bf16(v),
            Self::F16(v) => Buf::F16(v),
        }
    }

    /// The values as a writable communication buffer, for receiving in a collective (no copy).
    pub fn as_buf_mut(&mut self) -> BufMut<'_> {
        match self {
            Self::F32(v) => BufMut::F32(v),
            Self::Bf16(v) => BufMut::Bf16(v),
            Self::F16(v) => BufMut::F16(v),
        }
    }

    /// A variable holding `range` of the buffer with `shape` (a copy: candle owns its storage).
    pub fn var(&self, range: Range<usize>, shape: &[usize], device: &Device) -> candle_core::Result<Var> {
        match self {
            Self::F32(v) => Var::from_slice(&v[range], shape, device),
            Self::Bf16(v) => Var::from_slice(&v[range], shape, device),
            Self::F16(v) => Var::from_slice(&v[range], shape, device),
        }
    }
}

impl HostBuf {
    /// The buffer as a one-dimensional tensor on `device` (one copy).
    pub fn tensor(&self, device: &Device) -> candle_core::Result<Tensor> {
        match self {
            Self::F32(v) => Tensor::from_slice(v, v.len(), device),
            Self::Bf16(v) => Tensor::from_slice(v, v.len(), device),
            Self::F16(v) => Tensor::from_slice(v, v.len(), device),
        }
    }

    /// The elements of a tensor (f32, bf16 or f16; one copy from a device).
    pub fn from_tensor(t: &Tensor) -> candle_core::Result<Self> {
        let flat = t.flatten_all()?;
        Ok(match t.dtype() {
            DType::BF16 => Self::Bf16(flat.to_vec1()?),
            DType::F16 => Self::F16(flat.to_vec1()?),
            DType::F32 => Self::F32(flat.to_vec1()?),
            other => candle_core::bail!("no host buffer for dtype {other:?}"),
        })
    }
}

/// Add a gradient tensor (any float dtype) into an f32 accumulator, converting on the way.
pub fn add_tensor_into(dst: &mut [f32], grad: &Tensor) -> candle_core::Result<()> {
    let g = grad.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    if g.len() != dst.len() {
        return Err(candle_core::Error::Msg(format!("gradient of {} elements for a parameter of {}", g.len(), dst.len())));
    }
    dst.iter_mut().zip(&g).for_each(|(d, s)| *d += s);
    Ok(())
}
