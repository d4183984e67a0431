//! One block's frozen parameters (`ParamRef::Frozen`, a LoRA base): values in the compute dtype in a
//! flat buffer of their own, never given a gradient or optimizer state. Resident tensors where the
//! strategy keeps parameters resident (stages 0–2); at stage 3 this rank's shard of the buffer, all-gathered
//! with the block's trainable shard before each use and released after it, like any parameter.
//! Their values come from the seed (the draw of a trainable parameter of the same name) or an import
//! (`Engine::overwrite_frozen`), and a checkpoint does not hold them: they are the base it was trained on.
//! With `frozen_nf4` (QLoRA) the linear weights of resident blocks are kept in NF4 with double
//! quantisation (`crate::quant`, bitsandbytes' format, per weight) and dequantised to the compute dtype
//! at each use, on the host; the other frozen parameters stay in the compute dtype.

use super::comm_worker::{CommWorker, Pending};
use super::error::EngineError;
use super::host_buf::HostBuf;
use super::model::Model;
use crate::shard::{FlatParam, ParamPlacement, Strategy};
use candle_core::{DType, Device, Tensor};
use std::ops::Range;
use std::sync::Arc;

/// A block's frozen parameters on this rank.
pub struct FrozenParams {
    /// Their layout in the block's frozen flat buffer (padded for the data-parallel group).
    pub flat: FlatParam,
    name: String,
    dtype: DType,
    device: Device,
    /// The part of the padded buffer this rank holds: all of it, or its shard (stage 3).
    window: Range<usize>,
    /// Parameters are gathered before each use (stage 3), from `shard`.
    gathered: bool,
    /// Tensors over the whole block (parameters resident).
    resident: Option<Vec<Tensor>>,
    /// This rank's shard (parameters gathered).
    shard: Option<Arc<HostBuf>>,
    /// Keep linear weights in NF4 (resident blocks only).
    nf4: bool,
    /// The NF4 weights, one entry per parameter (`None`: the parameter is in `resident`).
    quantized: Vec<Option<crate::quant::Nf4>>,
    /// On a GPU: the same in device memory, dequantised there by a kernel at each use.
    #[cfg(feature = "cuda")]
    on_device: Vec<Option<crate::quant_cuda::DeviceNf4>>,
}

impl FrozenParams {
    /// Block `i`'s frozen parameters from their values over the padded flat buffer (`full`, the same on
    /// every rank), keeping what the strategy says this rank holds.
    #[allow(clippy::too_many_arguments)]
    pub fn new(model: &Model, i: usize, full: &[f32], strategy: Strategy, rank: usize, world: usize, dtype: DType, device: &Device, nf4: bool) -> Result<Self, EngineError> {
        let flat = FlatParam::new(model.frozen_params(i), world);
        let name = model.block(i).name();
        if full.len() != flat.padded_numel() {
            return Err(EngineError::Unsupported(format!("block {name}: {} frozen values for a flat buffer of {}", full.len(), flat.padded_numel())));
        }
        let gathered = strategy.param_placement() == ParamPlacement::Gathered;
        let window = match strategy.param_placement() {
            ParamPlacement::Resident => 0..flat.padded_numel(),
            ParamPlacement::Gathered => flat.layout().padded_range(rank),
        };
        if nf4 && gathered {
            return Err(EngineError::Unsupported(format!("block {name}: an NF4 base at ZeRO stage 3 is not built yet: use zero.stage ≤ 2, or lora.base = \"bf16\"")));
        }
        let mut p = Self {
            flat,
            name,
            dtype,
            device: device.clone(),
            window,
            gathered,
            resident: None,
            shard: None,
            nf4,
            quantized: Vec::new(),
            #[cfg(feature = "cuda")]
            on_device: Vec::new(),
        };
        p.set(&full[p.window.clone()])?;
        Ok(p)
    }

    /// Whether the block has no frozen parameters.
    pub fn is_empty(&self) -> bool {
        self.flat.specs().is_empty()
    }

    /// The range of the padded flat buffer this rank holds.
    pub fn window(&self) -> Range<usize> {
        self.window.clone()
    }

    /// Replace the values of this rank's window (`values`: f32, rounded to the compute dtype).
    pub fn set(&mut self, values: &[f32]) -> Result<(), EngineError> {
        if self.nf4 {
            // Linear weights quantised (their places in the dense buffer left zero), the rest dense.
            let mut dense = values.to_vec();
            self.quantized = (0..self.flat.specs().len())
                .map(|j| {
                    let spec = &self.flat.specs()[j];
                    (spec.linear && spec.numel() % crate::quant::BLOCK == 0).then(|| {
                        let r = self.flat.range(j);
                        let q = crate::quant::quantize(&values[r.clone()]);
                        dense[r].fill(0.0);
                        q
                    })
                })
                .collect();
            // Each dense parameter its own tensor; a quantised one an empty placeholder.
            let buf = HostBuf::from_f32(self.dtype, &dense);
            let err = || EngineError::tensor(self.name.clone());
            self.resident = Some(
                (0..self.flat.specs().len())
                    .map(|j| match self.quantized[j] {
                        Some(_) => Tensor::zeros(0, self.dtype, &self.device).map_err(err()),
                        None => buf.var(self.flat.range(j), &self.flat.specs()[j].shape, &self.device).map(|v| v.as_tensor().detach()).map_err(err()),
                    })
                    .collect::<Result<_, _>>()?,
            );
            #[cfg(feature = "cuda")]
            if let candle_core::Device::Cuda(dev) = &self.device {
                self.on_device = self.quantized.iter().map(|q| q.as_ref().map(|q| crate::quant_cuda::DeviceNf4::new(dev, q)).transpose()).collect::<candle_core::Result<_>>().map_err(err())?;
            }
            return Ok(());
        }
        let buf = HostBuf::from_f32(self.dtype, values);
        if self.gathered {
            self.shard = Some(Arc::new(buf));
        } else {
            self.resident = Some(self.tensors(&buf)?);
        }
        Ok(())
    }

    /// Parameter `j` dequantised to the compute dtype, as a tensor on the device (by a kernel there
    /// on a GPU).
    fn dequantized(&self, j: usize, q: &crate::quant::Nf4) -> Result<Tensor, EngineError> {
        #[cfg(feature = "cuda")]
        if let Some(Some(d)) = self.on_device.get(j) {
            return d.dequantize(self.dtype, &self.flat.specs()[j].shape).map_err(EngineError::tensor(self.name.clone()));
        }
        let mut v = vec![0f32; q.len];
        crate::quant::dequantize(q, &mut v);
        HostBuf::from_f32(self.dtype, &v).var(0..v.len(), &self.flat.specs()[j].shape, &self.device).map(|t| t.as_tensor().detach()).map_err(EngineError::tensor(self.name.clone()))
    }

    /// The values of this rank's window, in f32 (exact: widened from the compute dtype), as blocks
    /// compute with them (NF4 weights dequantised).
    pub fn values(&self) -> Result<Vec<f32>, EngineError> {
        let err = || EngineError::tensor(self.name.clone());
        match (self.resident_tensors()?, &self.shard) {
            (_, Some(shard)) => Ok(shard.to_f32()),
            (Some(ts), None) => {
                let mut out = vec![0f32; self.window.len()];
                for (j, t) in ts.iter().enumerate() {
                    let v = t.flatten_all().and_then(|t| t.to_dtype(DType::F32)).and_then(|t| t.to_vec1::<f32>()).map_err(err())?;
                    out[self.flat.range(j)].copy_from_slice(&v);
                }
                Ok(out)
            }
            (None, None) => Ok(Vec::new()),
        }
    }

    /// The resident tensors (stages 0–2), NF4 weights dequantised for this use.
    pub fn resident_tensors(&self) -> Result<Option<Vec<Tensor>>, EngineError> {
        let Some(ts) = &self.resident else { return Ok(None) };
        if !self.quantized.iter().any(Option::is_some) {
            return Ok(Some(ts.clone()));
        }
        ts.iter().zip(&self.quantized).enumerate().map(|(j, (t, q))| match q {
            Some(q) => crate::profile::scoped_as(crate::profile::Kind::Copy, "nf4_dequantize", || self.dequantized(j, q)),
            None => Ok(t.clone()),
        }).collect::<Result<Vec<_>, _>>().map(Some)
    }

    /// Start all-gathering the shard (stage 3); `None` for a block without frozen parameters.
    pub fn start_gather(&self, worker: &CommWorker) -> Option<Pending<Result<HostBuf, EngineError>>> {
        let shard = self.shard.clone().filter(|_| !self.is_empty())?;
        let (dtype, padded) = (self.dtype, self.flat.padded_numel());
        Some(worker.submit(move |c| {
            let mut full = HostBuf::zeros(dtype, padded);
            c.all_gather(shard.as_buf(), full.as_buf_mut())?;
            Ok(full)
        }))
    }

    /// The tensors of a finished gather (none for a block without frozen parameters).
    pub fn finish_gather(&self, gather: Option<Pending<Result<HostBuf, EngineError>>>) -> Result<Vec<Tensor>, EngineError> {
        match gather {
            Some(p) => self.tensors(&p.wait()??),
            None => Ok(Vec::new()),
        }
    }

    /// Bytes this rank holds (NF4 weights: their codes and scales; the dense buffer's zeroed places of
    /// them are not counted, being what a device copy would leave out).
    pub fn bytes(&self) -> usize {
        let q: usize = self.quantized.iter().flatten().map(|q| q.packed.len() + q.qabsmax.len() + 4 * q.absmax2.len() + 4).sum();
        let dense = self.window.len() - self.quantized.iter().flatten().map(|q| q.len).sum::<usize>();
        dense * self.dtype.size_in_bytes() + q
    }

    fn tensors(&self, full: &HostBuf) -> Result<Vec<Tensor>, EngineError> {
        let err = || EngineError::tensor(self.name.clone());
        if self.device.is_cuda() {
            // One upload for the block; each tensor is then a view of its range.
            let all = full.tensor(&self.device).map_err(err())?;
            return (0..self.flat.specs().len())
                .map(|j| {
                    let r = self.flat.range(j);
                    all.narrow(0, r.start, r.len())?.reshape(self.flat.specs()[j].shape.as_slice())
                })
                .collect::<candle_core::Result<_>>()
                .map_err(err());
        }
        (0..self.flat.specs().len())
            .map(|j| full.var(self.flat.range(j), &self.flat.specs()[j].shape, &self.device).map(|v| v.as_tensor().detach()))
            .collect::<candle_core::Result<_>>()
            .map_err(err())
    }
}
