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
    /// Tensors over the whole block (parameters resident; with NF4, the dense ones only).
    resident: Option<FrozenSet>,
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
            // Linear weights quantised, the rest dense, each its own tensor (a quantised one an empty
            // placeholder): no dense copy of the whole block (a 70B layer is 0.86 G values).
            let err = || EngineError::tensor(self.name.clone());
            self.quantized = (0..self.flat.specs().len())
                .map(|j| {
                    let spec = &self.flat.specs()[j];
                    (spec.linear && spec.numel() % crate::quant::BLOCK == 0).then(|| crate::quant::quantize(&values[self.flat.range(j)]))
                })
                .collect();
            let each = (0..self.flat.specs().len())
                .map(|j| match self.quantized[j] {
                    Some(_) => Tensor::zeros(0, self.dtype, &self.device).map_err(err()),
                    None => {
                        let r = self.flat.range(j);
                        HostBuf::from_f32(self.dtype, &values[r.clone()]).var(0..r.len(), &self.flat.specs()[j].shape, &self.device).map(|v| v.as_tensor().detach()).map_err(err())
                    }
                })
                .collect::<Result<_, _>>()?;
            self.resident = Some(FrozenSet { all: None, each, starts: Vec::new() });
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

    /// The values of this rank's window, in f32 (exact: widened from the compute dtype), as blocks
    /// compute with them (NF4 weights dequantised).
    pub fn values(&self) -> Result<Vec<f32>, EngineError> {
        let err = || EngineError::tensor(self.name.clone());
        match (self.resident_tensors()?, &self.shard) {
            (_, Some(shard)) => Ok(shard.to_f32()),
            (Some(ts), None) => {
                let mut out = vec![0f32; self.window.len()];
                for (j, t) in ts.each.iter().enumerate() {
                    let v = t.flatten_all().and_then(|t| t.to_dtype(DType::F32)).and_then(|t| t.to_vec1::<f32>()).map_err(err())?;
                    out[self.flat.range(j)].copy_from_slice(&v);
                }
                Ok(out)
            }
            (None, None) => Ok(Vec::new()),
        }
    }

    /// The resident tensors (stages 0–2), NF4 weights dequantised for this use into one buffer over
    /// the block (a kernel per weight on a GPU).
    pub fn resident_tensors(&self) -> Result<Option<FrozenSet>, EngineError> {
        let Some(set) = &self.resident else { return Ok(None) };
        if !self.quantized.iter().any(Option::is_some) {
            return Ok(Some(set.clone()));
        }
        crate::profile::scoped_as(crate::profile::Kind::Copy, "nf4_dequantize", || self.dequantized(&set.each)).map(Some)
    }

    /// The block's buffer with its NF4 weights dequantised and its dense parameters (`dense`, an empty
    /// placeholder for each NF4 weight) in their places, and each parameter's view of it.
    fn dequantized(&self, dense: &[Tensor]) -> Result<FrozenSet, EngineError> {
        let err = || EngineError::tensor(self.name.clone());
        #[cfg(feature = "cuda")]
        if let Device::Cuda(dev) = &self.device {
            let mut plain = Vec::new();
            let mut quant = Vec::new();
            for (j, (t, q)) in dense.iter().zip(&self.on_device).enumerate() {
                match q {
                    Some(q) => quant.push((self.flat.range(j).start, q)),
                    None => plain.push((self.flat.range(j).start, t)),
                }
            }
            let all = crate::quant_cuda::assemble(dev, self.dtype, self.flat.padded_numel(), &plain, &quant).map_err(err())?;
            return self.views(all);
        }
        let mut full = vec![0f32; self.flat.padded_numel()];
        for (j, (t, q)) in dense.iter().zip(&self.quantized).enumerate() {
            let r = self.flat.range(j);
            match q {
                Some(q) => crate::quant::dequantize(q, &mut full[r]),
                None => full[r].copy_from_slice(&t.flatten_all().and_then(|t| t.to_dtype(DType::F32)).and_then(|t| t.to_vec1::<f32>()).map_err(err())?),
            }
        }
        self.tensors(&HostBuf::from_f32(self.dtype, &full))
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
    pub fn finish_gather(&self, gather: Option<Pending<Result<HostBuf, EngineError>>>) -> Result<FrozenSet, EngineError> {
        match gather {
            Some(p) => self.tensors(&p.wait()??),
            None => Ok(FrozenSet::default()),
        }
    }

    /// Bytes this rank holds (NF4 weights: their codes and scales; the dense buffer's zeroed places of
    /// them are not counted, being what a device copy would leave out).
    pub fn bytes(&self) -> usize {
        let q: usize = self.quantized.iter().flatten().map(|q| q.packed.len() + q.qabsmax.len() + 4 * q.absmax2.len() + 4).sum();
        let dense = self.window.len() - self.quantized.iter().flatten().map(|q| q.len).sum::<usize>();
        dense * self.dtype.size_in_bytes() + q
    }

    /// The tensors over `full` (the padded buffer): one upload for the block, each parameter a view of
    /// its range.
    fn tensors(&self, full: &HostBuf) -> Result<FrozenSet, EngineError> {
        self.views(full.tensor(&self.device).map_err(EngineError::tensor(self.name.clone()))?)
    }

    /// Each parameter's view of `all`, the padded buffer on the device.
    fn views(&self, all: Tensor) -> Result<FrozenSet, EngineError> {
        let each = (0..self.flat.specs().len())
            .map(|j| {
                let r = self.flat.range(j);
                all.narrow(0, r.start, r.len())?.reshape(self.flat.specs()[j].shape.as_slice())
            })
            .collect::<candle_core::Result<_>>()
            .map_err(EngineError::tensor(self.name.clone()))?;
        Ok(FrozenSet { starts: (0..self.flat.specs().len()).map(|j| self.flat.range(j).start).collect(), all: Some(all), each })
    }
}

/// A block's frozen tensors for one use: each parameter's tensor, a view of one buffer over the block
/// (`all`) where there is one, so that adjacent parameters can be read as one matrix without a copy.
#[derive(Clone, Default)]
pub struct FrozenSet {
    all: Option<Tensor>,
    /// Each parameter's tensor.
    pub each: Vec<Tensor>,
    /// Where each parameter starts in `all`.
    starts: Vec<usize>,
}

impl FrozenSet {
    /// Parameters `js` as one matrix stacked along their first dimension, a view of the block's buffer:
    /// `None` unless they lie next to each other there and agree in their other dimensions.
    pub fn stacked(&self, js: Range<usize>) -> Option<Tensor> {
        let all = self.all.as_ref()?;
        let first = self.each.get(js.start)?;
        let rest = first.dims().get(1..)?.to_vec();
        let mut rows = 0;
        for j in js.clone() {
            let t = self.each.get(j)?;
            if t.dims().get(1..)? != rest.as_slice() || self.starts[j] != self.starts[js.start] + rows * rest.iter().product::<usize>() {
                return None;
            }
            rows += t.dims()[0];
        }
        let shape: Vec<usize> = std::iter::once(rows).chain(rest.iter().copied()).collect();
        all.narrow(0, self.starts[js.start], shape.iter().product()).and_then(|t| t.reshape(shape)).ok()
    }
}
