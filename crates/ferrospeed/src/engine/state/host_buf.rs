//! A host buffer in one of the compute dtypes (f32, bf16, f16), with the conversions the engine needs.

use crate::comm::{Buf, BufMut};
use candle_core::{DType, Device, Tensor, Var};
use half::{bf16, f16};
use rayon::prelude::*;
use std::ops::Range;

/// Elements below which a conversion runs on the calling thread.
const PARALLEL_MIN: usize = 1 << 16;

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
    /// `values` rounded to `dtype` (f32, bf16 or f16); on every core for a large buffer (a block's
    /// compute copy at start-up and at each publish), the same values either way.
    pub fn from_f32(dtype: DType, values: &[f32]) -> Self {
        fn convert<T: Send>(values: &[f32], f: impl Fn(f32) -> T + Sync) -> Vec<T> {
            if values.len() < PARALLEL_MIN {
                return values.iter().map(|&v| f(v)).collect();
            }
            values.par_iter().with_min_len(PARALLEL_MIN).map(|&v| f(v)).collect()
        }
        match dtype {
            DType::BF16 => Self::Bf16(convert(values, bf16::from_f32)),
            DType::F16 => Self::F16(convert(values, f16::from_f32)),
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

    /// f32 words that hold `len` elements of `dtype` packed by [`HostBuf::pack_into`] (two 16-bit
    /// values a word).
    pub fn packed_words(dtype: DType, len: usize) -> usize {
        match dtype {
            DType::BF16 | DType::F16 => len.div_ceil(2),
            _ => len,
        }
    }

    /// The elements' bits packed into the first `packed_words` f32 words of `words` (an f32 file
    /// page holds them exactly: only bits are moved, no value is converted).
    pub fn pack_into(&self, words: &mut [f32]) {
        fn pack16<T: Copy>(v: &[T], bits: impl Fn(T) -> u16, words: &mut [f32]) {
            for (w, pair) in words.iter_mut().zip(v.chunks(2)) {
                let hi = pair.get(1).map_or(0, |&x| bits(x));
                *w = f32::from_bits(u32::from(bits(pair[0])) | u32::from(hi) << 16);
            }
        }
        match self {
            Self::F32(v) => words[..v.len()].copy_from_slice(v),
            Self::Bf16(v) => pack16(v, bf16::to_bits, words),
            Self::F16(v) => pack16(v, f16::to_bits, words),
        }
    }

    /// `len` elements of `dtype` from `words` as [`HostBuf::pack_into`] packed them.
    pub fn unpack(dtype: DType, words: &[f32], len: usize) -> Self {
        let bits = || words.iter().flat_map(|w| [w.to_bits() as u16, (w.to_bits() >> 16) as u16]).take(len);
        match dtype {
            DType::BF16 => Self::Bf16(bits().map(bf16::from_bits).collect()),
            DType::F16 => Self::F16(bits().map(f16::from_bits).collect()),
            _ => Self::F32(words[..len].to_vec()),
        }
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        match self {
            Self::F32(_) => DType::F32,
            Self::Bf16(_) => DType::BF16,
            Self::F16(_) => DType::F16,
        }
    }

    /// The elements' bytes (no copy).
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Self::F32(v) => bytemuck::cast_slice(v),
            Self::Bf16(v) => bytemuck::cast_slice(v),
            Self::F16(v) => bytemuck::cast_slice(v),
        }
    }

    /// The elements' bytes, writable in place.
    pub fn as_bytes_mut(&mut self) -> &mut [u8] {
        match self {
            Self::F32(v) => bytemuck::cast_slice_mut(v),
            Self::Bf16(v) => bytemuck::cast_slice_mut(v),
            Self::F16(v) => bytemuck::cast_slice_mut(v),
        }
    }

    /// Elements of `dtype` from their bytes (any alignment; one copy).
    pub fn from_bytes(dtype: DType, bytes: &[u8]) -> Self {
        let mut out = Self::zeros(dtype, bytes.len() / dtype.size_in_bytes().max(1));
        let dst: &mut [u8] = match &mut out {
            Self::F32(v) => bytemuck::cast_slice_mut(v),
            Self::Bf16(v) => bytemuck::cast_slice_mut(v),
            Self::F16(v) => bytemuck::cast_slice_mut(v),
        };
        let n = dst.len();
        dst.copy_from_slice(&bytes[..n]);
        out
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
    if grad.elem_count() != dst.len() {
        return Err(candle_core::Error::Msg(format!("gradient of {} elements for a parameter of {}", grad.elem_count(), dst.len())));
    }
    // A contiguous CPU tensor is read where it is: no copy of it per micro-batch (a copy of every
    // gradient was most of a CPU step's time, in clearing the pages of fresh allocations).
    {
        let (storage, layout) = grad.storage_and_layout();
        if let (candle_core::Storage::Cpu(cpu), Some((start, end))) = (&*storage, layout.contiguous_offsets()) {
            match cpu {
                candle_core::CpuStorage::F32(v) => return Ok(add_into(dst, &v[start..end], |x| x)),
                candle_core::CpuStorage::BF16(v) => return Ok(add_into(dst, &v[start..end], bf16::to_f32)),
                candle_core::CpuStorage::F16(v) => return Ok(add_into(dst, &v[start..end], f16::to_f32)),
                _ => {}
            }
        }
    }
    let g = grad.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    add_into(dst, &g, |x| x);
    Ok(())
}

/// `dst[i] += f(src[i])`, on every core for a large buffer (elementwise: the same sums either way).
fn add_into<T: Copy + Sync>(dst: &mut [f32], src: &[T], f: impl Fn(T) -> f32 + Sync) {
    if dst.len() < PARALLEL_MIN {
        dst.iter_mut().zip(src).for_each(|(d, &s)| *d += f(s));
        return;
    }
    dst.par_chunks_mut(PARALLEL_MIN).zip(src.par_chunks(PARALLEL_MIN)).for_each(|(d, s)| d.iter_mut().zip(s).for_each(|(d, &s)| *d += f(s)));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_into_f32_words_gives_back_every_bit_in_each_dtype() {
        // Odd lengths, and bit patterns that are NaNs or subnormals as f32 words.
        let values: Vec<f32> = (0..1001).map(|i| ((i as f32) * 0.37 - 150.0).powi(3) * 1e-3).chain([f32::NAN, -0.0, f32::INFINITY, 1e-40]).collect();
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let buf = HostBuf::from_f32(dtype, &values);
            let mut words = vec![0f32; HostBuf::packed_words(dtype, buf.len()) + 3];
            buf.pack_into(&mut words);
            let back = HostBuf::unpack(dtype, &words, buf.len());
            let bits = |b: &HostBuf| b.to_f32().iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&back), bits(&buf), "{dtype:?}");
            assert_eq!(back.bytes(), buf.bytes());
        }
        assert_eq!(HostBuf::packed_words(DType::BF16, 5), 3);
    }

    #[test]
    fn adding_a_gradient_in_place_gives_the_sums_of_adding_a_copy() {
        let dev = Device::Cpu;
        // Large enough for the parallel path, and a small one; a transposed (non-contiguous) view
        // and a narrowed one (an offset into its storage).
        let big = Tensor::arange(0f32, 300_000.0, &dev).unwrap().affine(1e-3, -7.0).unwrap().reshape((600, 500)).unwrap();
        let small = Tensor::arange(0f32, 60.0, &dev).unwrap().affine(0.3, -2.0).unwrap().reshape((6, 10)).unwrap();
        let cases = [big.clone(), big.t().unwrap(), big.narrow(0, 100, 300).unwrap(), small.clone(), small.t().unwrap()];
        for t in cases {
            for dtype in [DType::F32, DType::BF16, DType::F16] {
                let g = t.to_dtype(dtype).unwrap();
                let start: Vec<f32> = (0..g.elem_count()).map(|i| (i % 97) as f32 * 0.25 - 3.0).collect();
                let copy = g.flatten_all().unwrap().to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
                let want: Vec<u32> = start.iter().zip(&copy).map(|(a, b)| (a + b).to_bits()).collect();
                let mut got = start.clone();
                add_tensor_into(&mut got, &g).unwrap();
                assert_eq!(got.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), want, "{:?} {dtype:?}", g.dims());
            }
        }
        assert!(add_tensor_into(&mut [0.0; 3], &small).is_err(), "a wrong size is an error");
        assert_eq!(HostBuf::packed_words(DType::F32, 5), 5);
    }
}
