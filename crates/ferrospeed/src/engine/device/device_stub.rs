//! Without the `cuda` feature there is no device state: these types have no values, so every
//! `Option` of them is `None` and the engine takes its host paths (none of these bodies can run).

use super::comm_worker::{CommWorker, Pending};
use super::error::EngineError;
use super::grads::Reduced;
use super::host_buf::HostBuf;
use super::grads::BlockGrads;
use crate::comm::CommError;
use crate::shard::{FlatParam, GradReduction};
use candle_core::{DType, Device, Result, Tensor, Var};
use std::ops::Range;

pub enum DeviceWindow {}

/// No NCCL without the `cuda` feature.
pub enum Nccl {}

impl Nccl {
    pub fn sync(&self) -> std::result::Result<(), CommError> {
        match *self {}
    }
}

impl DeviceWindow {
    pub fn new(_: &Device, _: &[f32], _: &[f32], _: &[f32], _: Option<&HostBuf>) -> Result<Option<Self>> {
        Ok(None)
    }

    pub fn download(&self) -> Result<[Vec<f32>; 3]> {
        match *self {}
    }

    pub fn upload(&mut self, _: &[f32], _: &[f32], _: &[f32], _: &FlatParam, _: &Range<usize>, _: Option<&[Var]>) -> Result<()> {
        match *self {}
    }

    pub fn compute_host(&self) -> Result<Option<HostBuf>> {
        match *self {}
    }

    pub fn start_gather(&self, _: Option<&Nccl>, _: usize) -> std::result::Result<Option<DeviceGather>, CommError> {
        match *self {}
    }

    pub fn gathers_on_device(&self, _: bool, _: usize) -> bool {
        match *self {}
    }

    pub fn compute_bytes(&self) -> usize {
        match *self {}
    }
}

/// No device memory without the `cuda` feature: shards stay in host memory.
pub enum DeviceShard {}

impl DeviceShard {
    pub fn new(_: &Device, _: &HostBuf) -> Result<Option<Self>> {
        Ok(None)
    }

    pub fn tensor(&self) -> &candle_core::Tensor {
        match *self {}
    }

    pub fn set(&mut self, _: &HostBuf) -> Result<()> {
        match *self {}
    }

    pub fn to_host(&self) -> Result<HostBuf> {
        match *self {}
    }

    pub fn start_gather(&self, _: Option<&Nccl>, _: usize) -> std::result::Result<Option<DeviceGather>, CommError> {
        match *self {}
    }

    pub fn bytes(&self) -> usize {
        match *self {}
    }
}

pub enum PinnedShard {}

impl PinnedShard {
    pub fn set(&mut self, _: &HostBuf) -> Result<()> {
        match *self {}
    }

    pub fn host_mut(&mut self) -> Result<&mut [u8]> {
        match *self {}
    }

    pub fn start_upload(&self, _: usize) -> Result<DeviceGather> {
        match *self {}
    }

    pub fn bytes(&self) -> usize {
        match *self {}
    }
}

pub enum CopyStream {}

impl CopyStream {
    pub fn new(_: &Device) -> Result<Option<Self>> {
        Ok(None)
    }

    pub fn pinned(&self, _: &HostBuf) -> Result<PinnedShard> {
        match *self {}
    }
}

pub enum DeviceGather {}

impl DeviceGather {
    pub fn finish(self) -> std::result::Result<Tensor, CommError> {
        match self {}
    }
}

pub enum DeviceGrads {}

impl DeviceGrads {
    pub fn new(_: &Device) -> Result<Option<Self>> {
        Ok(None)
    }

    pub fn begin_step(&mut self, _: usize, _: GradReduction) -> Result<()> {
        match *self {}
    }

    pub fn accumulate(&mut self, _: usize, _: Range<usize>, _: &Tensor) -> Result<()> {
        match *self {}
    }

    pub fn poison(&mut self, _: usize) -> Result<()> {
        match *self {}
    }

    pub fn start_reduce(
        &mut self,
        _: &CommWorker,
        _: Option<&Nccl>,
        _: DType,
        _: usize,
        _: GradReduction,
        _: Range<usize>,
    ) -> std::result::Result<Pending<std::result::Result<Reduced, CommError>>, EngineError> {
        match *self {}
    }

    pub fn finish_reduce(&mut self, _: Reduced) -> Result<()> {
        match *self {}
    }

    pub fn persistent_bytes(&self) -> usize {
        match *self {}
    }

    pub fn download_reduced(&self, _: GradReduction) -> Result<Option<Vec<f32>>> {
        match *self {}
    }

    pub fn download_window(&mut self, _: GradReduction, _: usize, _: &Range<usize>) -> Result<Vec<f32>> {
        match *self {}
    }
}

/// Without CUDA the gradients are always in host memory.
pub(super) fn device_overflow(_: &[BlockGrads]) -> std::result::Result<Option<bool>, EngineError> {
    Ok(None)
}

/// Without CUDA the gradients are always in host memory.
pub(super) fn device_shard_sums(_: &[BlockGrads], _: &[Vec<Range<usize>>]) -> std::result::Result<Option<Vec<f64>>, EngineError> {
    Ok(None)
}
