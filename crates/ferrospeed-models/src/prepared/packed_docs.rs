//! [`PackedDocs`]: some of a prepared directory's documents, packed as [`super::PackedWindows`] packs
//! all of them — the chosen documents in order as one token stream cut into windows, positions
//! restarting and targets across a document boundary out of the loss. What `data.eval_split` holds
//! out of packed data, and what the rest trains on: whole documents, never a window shared between
//! the two.

use super::samples::{single, tensors, Row};
use super::PreparedData;
use ferrospeed::data::{DataError, Dataset, Sampling};
use ferrospeed::engine::Batch;

/// The documents `docs` of `data`, packed into windows of `seq_len`.
#[derive(Debug, Clone)]
pub struct PackedDocs<'a> {
    data: &'a PreparedData,
    seq_len: usize,
    docs: Vec<usize>,
    /// Where each chosen document starts in the packed stream, and the stream's length last.
    starts: Vec<u64>,
}

impl<'a> PackedDocs<'a> {
    /// `docs` (indices of `data`'s documents, in the order to pack them).
    pub fn new(data: &'a PreparedData, seq_len: usize, docs: Vec<usize>) -> Self {
        let mut starts = Vec::with_capacity(docs.len() + 1);
        let mut at = 0u64;
        for &d in &docs {
            starts.push(at);
            let (a, b) = data.doc_range(d);
            at += b - a;
        }
        starts.push(at);
        Self { data, seq_len, docs, starts }
    }

    /// Tokens in the packed stream.
    pub fn tokens(&self) -> u64 {
        *self.starts.last().unwrap_or(&0)
    }

    /// Window `w`: inputs, targets, loss mask and positions (as `PackedWindows::row`).
    pub fn row(&self, w: usize) -> Row {
        let t = self.seq_len;
        let start = (w * t) as u64;
        let (mut tokens, mut mask, mut doc) = (Vec::with_capacity(t + 1), Vec::with_capacity(t + 1), Vec::with_capacity(t + 1));
        let mut k = self.starts.partition_point(|&s| s <= start) - 1;
        let mut v = start;
        while tokens.len() < t + 1 && k < self.docs.len() {
            let (a, b) = self.data.doc_range(self.docs[k]);
            let off = v - self.starts[k];
            let n = ((b - a - off) as usize).min(t + 1 - tokens.len());
            let (tk, mk) = self.data.read(a + off, n);
            tokens.extend(tk);
            mask.extend(mk);
            doc.extend(std::iter::repeat_n(k, n));
            v += n as u64;
            k += 1;
        }
        let mut positions = Vec::with_capacity(t);
        let mut loss = Vec::with_capacity(t);
        for i in 0..t {
            let doc_start = self.starts[doc[i]].max(start);
            positions.push((start + i as u64 - doc_start) as u32);
            // The target is token i + 1: it counts if it is in the same document and masked in.
            loss.push(if doc[i + 1] == doc[i] && mask[i + 1] == 1 { 1.0 } else { 0.0 });
        }
        (tokens[..t].to_vec(), tokens[1..].to_vec(), loss, Some(positions))
    }
}

impl Dataset for PackedDocs<'_> {
    fn counted_targets(&self, index: usize) -> Option<f64> {
        Some(self.row(index).2.iter().map(|&m| f64::from(m)).sum())
    }

    fn len(&self) -> usize {
        (self.tokens().saturating_sub(1) / self.seq_len as u64) as usize
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
