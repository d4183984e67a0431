//! Typed host buffers that cross the object-safe [`super::Communicator`] boundary.

use half::{bf16, f16};
use std::fmt;

/// Element types the collectives move.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum DType {
    F32 = 1,
    Bf16 = 2,
    F16 = 3,
}

impl DType {
    pub(crate) fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::F32,
            2 => Self::Bf16,
            3 => Self::F16,
            _ => return None,
        })
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::Bf16 | Self::F16 => 2,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::F16 => "f16",
        })
    }
}

/// A read-only buffer of one of the supported dtypes.
#[derive(Debug, Clone, Copy)]
pub enum Buf<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
    F16(&'a [f16]),
}

/// A writable buffer of one of the supported dtypes.
#[derive(Debug)]
pub enum BufMut<'a> {
    F32(&'a mut [f32]),
    Bf16(&'a mut [bf16]),
    F16(&'a mut [f16]),
}

impl Buf<'_> {
    pub fn dtype(&self) -> DType {
        match self {
            Self::F32(_) => DType::F32,
            Self::Bf16(_) => DType::Bf16,
            Self::F16(_) => DType::F16,
        }
    }
    pub fn len(&self) -> usize {
        match self {
            Self::F32(s) => s.len(),
            Self::Bf16(s) => s.len(),
            Self::F16(s) => s.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The elements' bytes, as they travel.
    pub fn bytes(&self) -> &[u8] {
        match self {
            Self::F32(s) => bytemuck::cast_slice(s),
            Self::Bf16(s) => bytemuck::cast_slice(s),
            Self::F16(s) => bytemuck::cast_slice(s),
        }
    }
}

impl BufMut<'_> {
    pub fn dtype(&self) -> DType {
        match self {
            Self::F32(_) => DType::F32,
            Self::Bf16(_) => DType::Bf16,
            Self::F16(_) => DType::F16,
        }
    }
    pub fn len(&self) -> usize {
        match self {
            Self::F32(s) => s.len(),
            Self::Bf16(s) => s.len(),
            Self::F16(s) => s.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The elements' bytes, to be overwritten with received ones.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        match self {
            Self::F32(s) => bytemuck::cast_slice_mut(s),
            Self::Bf16(s) => bytemuck::cast_slice_mut(s),
            Self::F16(s) => bytemuck::cast_slice_mut(s),
        }
    }
}

impl<'a> From<&'a [f32]> for Buf<'a> {
    fn from(s: &'a [f32]) -> Self {
        Self::F32(s)
    }
}
impl<'a> From<&'a [bf16]> for Buf<'a> {
    fn from(s: &'a [bf16]) -> Self {
        Self::Bf16(s)
    }
}
impl<'a> From<&'a [f16]> for Buf<'a> {
    fn from(s: &'a [f16]) -> Self {
        Self::F16(s)
    }
}
impl<'a> From<&'a mut [f32]> for BufMut<'a> {
    fn from(s: &'a mut [f32]) -> Self {
        Self::F32(s)
    }
}
impl<'a> From<&'a mut [bf16]> for BufMut<'a> {
    fn from(s: &'a mut [bf16]) -> Self {
        Self::Bf16(s)
    }
}
impl<'a> From<&'a mut [f16]> for BufMut<'a> {
    fn from(s: &'a mut [f16]) -> Self {
        Self::F16(s)
    }
}
