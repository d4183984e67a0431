//! Collectives on candle tensors (CPU): thin wrappers that move the data through the typed buffers.

use super::element::Element;
use super::error::CommError;
use super::{CommExt, Communicator, ReduceOp};
use candle_core::{DType as CDType, Device, Tensor};
use half::{bf16, f16};

/// Tensor-level collectives for any [`Communicator`]. Tensors must live on the CPU and be f32, bf16
/// or f16; the result has the input's shape (`all_gather_tensor` returns a flat tensor).
pub trait TensorCollectives: Communicator {
    fn all_reduce_tensor(&self, t: &Tensor, op: ReduceOp) -> Result<Tensor, CommError> {
        with_host_data(t, "all_reduce_tensor", |data| match data {
            HostData::F32(mut v) => self.all_reduce_slice(&mut v, op).map(|()| HostData::F32(v)),
            HostData::Bf16(mut v) => self.all_reduce_slice(&mut v, op).map(|()| HostData::Bf16(v)),
            HostData::F16(mut v) => self.all_reduce_slice(&mut v, op).map(|()| HostData::F16(v)),
        })
    }

    fn broadcast_tensor(&self, t: &Tensor, root: usize) -> Result<Tensor, CommError> {
        with_host_data(t, "broadcast_tensor", |data| match data {
            HostData::F32(mut v) => self.broadcast_slice(&mut v, root).map(|()| HostData::F32(v)),
            HostData::Bf16(mut v) => self.broadcast_slice(&mut v, root).map(|()| HostData::Bf16(v)),
            HostData::F16(mut v) => self.broadcast_slice(&mut v, root).map(|()| HostData::F16(v)),
        })
    }

    /// Gather every rank's `shard` into a flat tensor of `numel` elements (rank `r`'s shard at
    /// `ShardLayout::new(numel, world, 1).range(r)`).
    fn all_gather_tensor(&self, shard: &Tensor, numel: usize) -> Result<Tensor, CommError> {
        fn gather<C: Communicator + ?Sized, T: Element>(c: &C, s: Vec<T>, numel: usize) -> Result<Vec<T>, CommError> {
            let mut out = vec![T::default(); numel];
            c.all_gather_slice(&s, &mut out)?;
            Ok(out)
        }
        let flat = shard.flatten_all().map_err(candle_err("all_gather_tensor"))?;
        with_host_data(&flat, "all_gather_tensor", |data| match data {
            HostData::F32(v) => gather(self, v, numel).map(HostData::F32),
            HostData::Bf16(v) => gather(self, v, numel).map(HostData::Bf16),
            HostData::F16(v) => gather(self, v, numel).map(HostData::F16),
        })
    }
}

impl<C: Communicator + ?Sized> TensorCollectives for C {}

enum HostData {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
    F16(Vec<f16>),
}

fn candle_err(what: &'static str) -> impl Fn(candle_core::Error) -> CommError {
    move |e| CommError::Unsupported { what: what.into(), reason: e.to_string() }
}

/// Copy `t` to host vectors, run `f`, and build a tensor of the result (same shape if same length).
fn with_host_data(
    t: &Tensor,
    what: &'static str,
    f: impl FnOnce(HostData) -> Result<HostData, CommError>,
) -> Result<Tensor, CommError> {
    if !matches!(t.device(), Device::Cpu) {
        return Err(CommError::Unsupported { what: what.into(), reason: "the TCP backend takes CPU tensors".into() });
    }
    let flat = t.flatten_all().map_err(candle_err(what))?;
    let data = match t.dtype() {
        CDType::F32 => HostData::F32(flat.to_vec1().map_err(candle_err(what))?),
        CDType::BF16 => HostData::Bf16(flat.to_vec1().map_err(candle_err(what))?),
        CDType::F16 => HostData::F16(flat.to_vec1().map_err(candle_err(what))?),
        other => {
            return Err(CommError::Unsupported {
                what: what.into(),
                reason: format!("dtype {other:?}; collectives take f32, bf16 or f16"),
            })
        }
    };
    let out = match f(data)? {
        HostData::F32(v) => {
            let n = v.len();
            Tensor::from_vec(v, n, &Device::Cpu)
        }
        HostData::Bf16(v) => {
            let n = v.len();
            Tensor::from_vec(v, n, &Device::Cpu)
        }
        HostData::F16(v) => {
            let n = v.len();
            Tensor::from_vec(v, n, &Device::Cpu)
        }
    };
    let out = out.map_err(candle_err(what))?;
    if out.elem_count() == t.elem_count() {
        out.reshape(t.shape()).map_err(candle_err(what))
    } else {
        Ok(out)
    }
}
