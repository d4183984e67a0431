//! Prepared data as training samples, with the loss mask and (packed) the document positions.
//!
//! [`PackedWindows`]: the documents, in order, as one token stream cut into consecutive windows of
//! `seq_len + 1` tokens (inputs and the next tokens as targets). Positions restart at every document
//! start inside a window (and at the window's start), attention stays inside each document, and a
//! target that begins a new document (or has mask 0) is left out of the loss.
//!
//! [`PaddedDocs`]: one document per sample, padded with EOS to `seq_len` (padding out of the loss);
//! plain causal rows, no positions needed: a document longer than `seq_len + 1` tokens is refused
//! (say so before training: [`PaddedDocs::new`]).
//!
//! Both count their samples' targets in the loss, so the loader normalises the loss over the whole
//! global batch (`ferrospeed::data::Dataset::counted_targets`). Both draw samples in shuffled epochs (`Sampling::Epochs`): the position in the data is the step,
//! which checkpoints hold, so a resumed run continues the same order.

use super::PreparedData;
use crate::ops::docs::{LOSS_MASK, POSITIONS};
use candle_core::{Device, Tensor};
use ferrospeed::data::{DataError, Dataset, Sampling};
use ferrospeed::engine::Batch;

pub(super) fn tensors(indices: &[usize], seq_len: usize, rows: Vec<(Vec<u32>, Vec<u32>, Vec<f32>, Option<Vec<u32>>)>) -> Result<Batch, DataError> {
    let err = |e: candle_core::Error| DataError::Sample { index: indices.first().copied().unwrap_or(0), reason: e.to_string() };
    let shape = (rows.len(), seq_len);
    let (mut tok, mut tgt, mut mask, mut pos) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let packed = rows.first().is_some_and(|r| r.3.is_some());
    for (a, b, c, d) in rows {
        tok.extend(a);
        tgt.extend(b);
        mask.extend(c);
        pos.extend(d.unwrap_or_default());
    }
    let mut batch = Batch::tokens(Tensor::from_vec(tok, shape, &Device::Cpu).map_err(err)?, Tensor::from_vec(tgt, shape, &Device::Cpu).map_err(err)?)
        .with(LOSS_MASK, Tensor::from_vec(mask, shape, &Device::Cpu).map_err(err)?);
    if packed {
        batch.insert(POSITIONS, Tensor::from_vec(pos, shape, &Device::Cpu).map_err(err)?);
    }
    Ok(batch)
}

/// Sample `index` alone: its micro-batch of one without the batch dimension.
pub(super) fn single(ds: &dyn Dataset, index: usize) -> Result<Batch, DataError> {
    let b = ds.collate(&[index])?;
    let mut one = Batch::new();
    for (name, t) in b.iter() {
        one.insert(name, t.squeeze(0).map_err(|e| DataError::Sample { index, reason: e.to_string() })?);
    }
    Ok(one)
}

/// Packed windows of a prepared directory (see the module docs).
#[derive(Debug, Clone, Copy)]
pub struct PackedWindows<'a> {
    pub data: &'a PreparedData,
    pub seq_len: usize,
}

pub(super) type Row = (Vec<u32>, Vec<u32>, Vec<f32>, Option<Vec<u32>>);

impl PackedWindows<'_> {
    /// Window `w`: inputs, targets, loss mask and positions.
    pub fn row(&self, w: usize) -> Row {
        let t = self.seq_len;
        let start = (w * t) as u64;
        let (tokens, mask) = self.data.read(start, t + 1);
        let mut positions = Vec::with_capacity(t);
        let mut loss = Vec::with_capacity(t);
        let mut doc = self.data.doc_of(start);
        let mut doc_start = self.data.doc_range(doc).0.max(start);
        for i in 0..t {
            let g = start + i as u64;
            if g >= self.data.doc_range(doc).1 {
                doc += 1;
                doc_start = g;
            }
            positions.push((g - doc_start) as u32);
            // The target is token g + 1: it counts if it is in the same document and masked in.
            let same_doc = g + 1 < self.data.doc_range(doc).1;
            loss.push(if same_doc && mask[i + 1] == 1 { 1.0 } else { 0.0 });
        }
        (tokens[..t].to_vec(), tokens[1..].to_vec(), loss, Some(positions))
    }
}

impl Dataset for PackedWindows<'_> {
    fn counted_targets(&self, index: usize) -> Option<f64> {
        Some(self.row(index).2.iter().map(|&m| f64::from(m)).sum())
    }

    fn len(&self) -> usize {
        (self.data.tokens().saturating_sub(1) / self.seq_len as u64) as usize
    }

    fn get(&self, index: usize) -> Result<Batch, DataError> {
        single(self, index)
    }

    fn collate(&self, indices: &[usize]) -> Result<Batch, DataError> {
        tensors(indices, self.seq_len, indices.iter().map(|&w| self.row(w)).collect())
    }

    fn sampling(&self) -> Sampling {
        Sampling::Epochs { shuffle: true }
    }
}

/// One padded document per sample (see the module docs).
#[derive(Debug, Clone, Copy)]
pub struct PaddedDocs<'a> {
    data: &'a PreparedData,
    seq_len: usize,
}

impl<'a> PaddedDocs<'a> {
    /// Refuses documents longer than `seq_len + 1` tokens, naming the longest and what to set.
    pub fn new(data: &'a PreparedData, seq_len: usize) -> Result<Self, String> {
        let longest = data.index.longest as usize;
        if longest > seq_len + 1 {
            let doc = (0..data.documents()).find(|&i| {
                let (a, b) = data.doc_range(i);
                (b - a) as usize > seq_len + 1
            });
            return Err(format!(
                "{}: document {} has {longest} tokens, more than model.seq_len + 1 = {} with data.packing = false; set model.seq_len = {} or data.packing = true",
                data.dir().display(),
                doc.map_or(0, |d| d + 1),
                seq_len + 1,
                longest - 1
            ));
        }
        Ok(Self { data, seq_len })
    }

    pub fn row(&self, i: usize) -> Row {
        let t = self.seq_len;
        let (tokens, mask) = self.data.document(i);
        let n = tokens.len().saturating_sub(1);
        let eos = self.data.index.eos;
        let mut input: Vec<u32> = tokens[..n].to_vec();
        let mut target: Vec<u32> = tokens[1..].to_vec();
        let mut loss: Vec<f32> = mask[1..].iter().map(|&m| f32::from(m)).collect();
        input.resize(t, eos);
        target.resize(t, eos);
        loss.resize(t, 0.0);
        (input, target, loss, None)
    }
}

impl Dataset for PaddedDocs<'_> {
    fn counted_targets(&self, index: usize) -> Option<f64> {
        Some(self.row(index).2.iter().map(|&m| f64::from(m)).sum())
    }

    fn len(&self) -> usize {
        self.data.documents()
    }

    fn get(&self, index: usize) -> Result<Batch, DataError> {
        single(self, index)
    }

    fn collate(&self, indices: &[usize]) -> Result<Batch, DataError> {
        tensors(indices, self.seq_len, indices.iter().map(|&i| self.row(i)).collect())
    }

    fn sampling(&self) -> Sampling {
        Sampling::Epochs { shuffle: true }
    }
}
