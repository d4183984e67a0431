//! The element types collectives move, and how they convert to the f32 the reductions use.

use super::buffer::{Buf, BufMut, DType};
use half::{bf16, f16};

/// A plain element type the collectives can send and reduce.
///
/// Reductions convert each contribution to f32, combine them in rank order, and round once.
pub trait Element: bytemuck::Pod + Default + Send + Sync + 'static {
    const DTYPE: DType;
    fn to_f32(self) -> f32;
    fn from_f32(v: f32) -> Self;
    fn buf(s: &[Self]) -> Buf<'_>;
    fn buf_mut(s: &mut [Self]) -> BufMut<'_>;
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(v: f32) -> Self {
        v
    }
    fn buf(s: &[Self]) -> Buf<'_> {
        Buf::F32(s)
    }
    fn buf_mut(s: &mut [Self]) -> BufMut<'_> {
        BufMut::F32(s)
    }
}

impl Element for bf16 {
    const DTYPE: DType = DType::Bf16;
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
    fn buf(s: &[Self]) -> Buf<'_> {
        Buf::Bf16(s)
    }
    fn buf_mut(s: &mut [Self]) -> BufMut<'_> {
        BufMut::Bf16(s)
    }
}

impl Element for f16 {
    const DTYPE: DType = DType::F16;
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
    fn buf(s: &[Self]) -> Buf<'_> {
        Buf::F16(s)
    }
    fn buf_mut(s: &mut [Self]) -> BufMut<'_> {
        BufMut::F16(s)
    }
}
