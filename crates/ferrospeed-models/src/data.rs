//! Training data: a text corpus, and the deterministic choice of which windows each rank trains on.
//!
//! Sample `g` of the global batch of step `s` is the window at an offset drawn from `(seed, s, g)`.
//! Rank `r` takes, for micro-batch `k`, the samples `(k·W + r)·m .. (k·W + r + 1)·m` (W ranks,
//! micro-batch m): disjoint across ranks, and together always the same global batch, whatever W.

use candle_core::{Device, Tensor};
use ferrospeed::data::{Dataset, Sampler, Sampling};
use ferrospeed::engine::Batch;
use crate::tokenizer::Tokenizer;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("cannot read data from {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cannot tokenize {path}: {reason}")]
    Tokenize { path: PathBuf, reason: String },
    #[error("data at {path} has {len} tokens, fewer than one window of model.seq_len + 1 = {needed} tokens; use more text or a smaller model.seq_len")]
    TooShort { path: PathBuf, len: usize, needed: usize },
    #[error("{path} is not text ({reason}): point data.path at text files, or set data.allow_binary = true to train on its bytes anyway")]
    Binary { path: PathBuf, reason: String },
}

/// Why `bytes` do not look like text: invalid UTF-8, or more than 10% control bytes (other than
/// tab, newline and carriage return); `None` for text.
pub fn not_text(bytes: &[u8]) -> Option<String> {
    if let Err(e) = std::str::from_utf8(bytes) {
        return Some(format!("invalid UTF-8 at byte {}", e.valid_up_to()));
    }
    let control = bytes.iter().filter(|&&b| (b < 0x20 && !matches!(b, b'\t' | b'\n' | b'\r')) || b == 0x7f).count();
    (control * 10 > bytes.len()).then(|| format!("{:.0}% control bytes", 100.0 * control as f64 / bytes.len() as f64))
}

/// A text corpus as token ids (one per byte unless tokenized with [`TextCorpus::load_tokenized`]).
#[derive(Debug, Clone)]
pub struct TextCorpus {
    tokens: Vec<u32>,
    path: PathBuf,
}

impl TextCorpus {
    /// A text file, or every regular file (not hidden) of a directory in name order, joined by newlines;
    /// a file that is not text ([`not_text`]) is refused, naming it.
    pub fn load(path: &Path) -> Result<Self, DataError> {
        Self::load_checked(path, false)
    }

    /// [`TextCorpus::load`]; with `allow_binary` a file that is not text is kept (and warned about).
    pub fn load_checked(path: &Path, allow_binary: bool) -> Result<Self, DataError> {
        let check = |file: &Path, bytes: &[u8]| -> Result<(), DataError> {
            match not_text(bytes) {
                Some(reason) if !allow_binary => Err(DataError::Binary { path: file.to_path_buf(), reason }),
                Some(reason) => {
                    tracing::warn!("{} is not text ({reason}); training on its bytes (data.allow_binary = true)", file.display());
                    Ok(())
                }
                None => Ok(()),
            }
        };
        let read_err = |source| DataError::Read { path: path.to_path_buf(), source };
        let bytes = if path.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(read_err)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file() && !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')))
                .collect();
            files.sort();
            let mut all = Vec::new();
            for f in files {
                let mut b = std::fs::read(&f).map_err(|source| DataError::Read { path: f.clone(), source })?;
                check(&f, &b)?;
                all.append(&mut b);
                all.push(b'\n');
            }
            all
        } else {
            let b = std::fs::read(path).map_err(read_err)?;
            check(path, &b)?;
            b
        };
        Ok(Self { tokens: bytes.into_iter().map(u32::from).collect(), path: path.to_path_buf() })
    }

    /// [`TextCorpus::load`] tokenized with `tokenizer` (the bytes must be UTF-8 for a tokenizer.json).
    pub fn load_tokenized(path: &Path, tokenizer: &Tokenizer, allow_binary: bool) -> Result<Self, DataError> {
        let corpus = Self::load_checked(path, allow_binary)?;
        if matches!(tokenizer, Tokenizer::Bytes) {
            return Ok(corpus);
        }
        let bytes: Vec<u8> = corpus.tokens.iter().map(|&t| t as u8).collect();
        let text = String::from_utf8(bytes).map_err(|e| DataError::Tokenize { path: path.to_path_buf(), reason: format!("not UTF-8 text ({e})") })?;
        let tokens = tokenizer.encode(&text).map_err(|e| DataError::Tokenize { path: path.to_path_buf(), reason: e.to_string() })?;
        Ok(Self { tokens, path: path.to_path_buf() })
    }

    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        Self { tokens: bytes.into_iter().map(u32::from).collect(), path: PathBuf::from("<memory>") }
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// The corpus without its last `fraction` of tokens, and those tokens (held out for evaluation).
    pub fn split_tail(self, fraction: f64) -> (Self, Self) {
        let n = self.tokens.len();
        let held = ((n as f64 * fraction).ceil() as usize).min(n);
        let mut tokens = self.tokens;
        let tail = tokens.split_off(n - held);
        let path = self.path;
        (Self { tokens, path: path.clone() }, Self { tokens: tail, path })
    }

    /// Check that at least one window fits.
    pub fn check_window(&self, seq_len: usize) -> Result<(), DataError> {
        if self.tokens.len() < seq_len + 1 {
            return Err(DataError::TooShort { path: self.path.clone(), len: self.tokens.len(), needed: seq_len + 1 });
        }
        Ok(())
    }
}

/// The training windows of a corpus as a [`Dataset`]: sample `i` is `seq_len` tokens from byte `i`,
/// with the next `seq_len` as targets (`tokens` and `targets`, u32). Windows are drawn with
/// replacement, each from `(seed, step, position)`, as language-model pretraining does.
#[derive(Debug, Clone, Copy)]
pub struct TextWindows<'a> {
    pub corpus: &'a TextCorpus,
    pub seq_len: usize,
}

impl TextWindows<'_> {
    /// The `seq_len + 1` tokens of window `i`.
    fn window(&self, i: usize) -> &[u32] {
        &self.corpus.tokens()[i..i + self.seq_len + 1]
    }

    /// The micro-batch of windows `indices` as flat token and target vectors, row-major.
    pub fn micro_batch(&self, indices: &[usize]) -> MicroBatch {
        let mut mb = MicroBatch { tokens: Vec::with_capacity(indices.len() * self.seq_len), targets: Vec::with_capacity(indices.len() * self.seq_len) };
        for &i in indices {
            let window = self.window(i);
            mb.tokens.extend_from_slice(&window[..self.seq_len]);
            mb.targets.extend_from_slice(&window[1..]);
        }
        mb
    }
}

impl Dataset for TextWindows<'_> {
    fn len(&self) -> usize {
        // Number of valid start offsets (windows of seq_len + 1).
        self.corpus.len().saturating_sub(self.seq_len)
    }

    fn get(&self, index: usize) -> Result<Batch, ferrospeed::data::DataError> {
        self.collate(&[index]).and_then(|b| {
            let squeeze = |name: &str| b.get(name).and_then(|t| t.squeeze(0));
            let err = |e: candle_core::Error| ferrospeed::data::DataError::Sample { index, reason: e.to_string() };
            Ok(Batch::tokens(squeeze("tokens").map_err(err)?, squeeze("targets").map_err(err)?))
        })
    }

    fn collate(&self, indices: &[usize]) -> Result<Batch, ferrospeed::data::DataError> {
        let mb = self.micro_batch(indices);
        let shape = (indices.len(), self.seq_len);
        let err = |e: candle_core::Error| ferrospeed::data::DataError::Sample { index: indices.first().copied().unwrap_or(0), reason: e.to_string() };
        let tokens = Tensor::from_vec(mb.tokens, shape, &Device::Cpu).map_err(err)?;
        let targets = Tensor::from_vec(mb.targets, shape, &Device::Cpu).map_err(err)?;
        Ok(Batch::tokens(tokens, targets))
    }

    fn sampling(&self) -> Sampling {
        Sampling::WithReplacement
    }
}

/// Which windows a rank trains on at each step: [`ferrospeed::data::Sampler`] over [`TextWindows`].
#[derive(Debug, Clone, Copy)]
pub struct BatchSampler {
    pub seed: u64,
    pub seq_len: usize,
    pub micro_batch: usize,
    pub accumulation: usize,
    pub world_size: usize,
    pub rank: usize,
}

/// One micro-batch: `micro_batch × seq_len` inputs and the next tokens as targets, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct MicroBatch {
    pub tokens: Vec<u32>,
    pub targets: Vec<u32>,
}

impl BatchSampler {
    /// The micro-batches of this rank for optimizer step `step`. The corpus must hold one window.
    pub fn micro_batches(&self, corpus: &TextCorpus, step: u64) -> Vec<MicroBatch> {
        let windows = TextWindows { corpus, seq_len: self.seq_len };
        let sampler = Sampler::new(self.seed, Sampling::WithReplacement, self.micro_batch, self.accumulation, self.world_size, self.rank, windows.len());
        match sampler {
            Ok(s) => (0..self.accumulation).map(|k| windows.micro_batch(&s.indices(step, k))).collect(),
            Err(_) => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(world: usize, rank: usize, micro: usize, accum: usize) -> BatchSampler {
        BatchSampler { seed: 3, seq_len: 8, micro_batch: micro, accumulation: accum, world_size: world, rank }
    }

    /// All windows of a step, over all ranks, sorted: the global batch as a set.
    fn global_batch(world: usize, micro: usize, accum: usize, corpus: &TextCorpus) -> Vec<Vec<u32>> {
        let mut rows = Vec::new();
        for rank in 0..world {
            for mb in sampler(world, rank, micro, accum).micro_batches(corpus, 5) {
                rows.extend(mb.tokens.chunks(8).map(<[u32]>::to_vec));
            }
        }
        rows.sort();
        rows
    }

    #[test]
    fn the_global_batch_does_not_depend_on_world_size_or_accumulation() {
        let corpus = TextCorpus::from_bytes((0..5000u32).map(|i| (i * 7 % 251) as u8).collect());
        let reference = global_batch(1, 8, 1, &corpus);
        assert_eq!(reference.len(), 8);
        for (world, micro, accum) in [(2, 4, 1), (4, 2, 1), (2, 1, 4), (1, 1, 8), (4, 1, 2)] {
            assert_eq!(global_batch(world, micro, accum, &corpus), reference, "W={world} m={micro} a={accum}");
        }
    }

    #[test]
    fn targets_are_inputs_shifted_by_one_and_steps_differ() {
        let corpus = TextCorpus::from_bytes(b"abcdefghijklmnopqrstuvwxyz0123456789".to_vec());
        let s = sampler(1, 0, 2, 1);
        let mb = &s.micro_batches(&corpus, 0)[0];
        assert_eq!(mb.tokens.len(), 16);
        assert_eq!(&mb.tokens[1..8], &mb.targets[..7]);
        assert_ne!(s.micro_batches(&corpus, 0), s.micro_batches(&corpus, 1));
        assert_eq!(s.micro_batches(&corpus, 1), s.micro_batches(&corpus, 1));
    }

    #[test]
    fn too_short_corpus_is_an_error() {
        let err = TextCorpus::from_bytes(vec![1; 5]).check_window(8).unwrap_err();
        assert!(err.to_string().contains("seq_len"), "{err}");
    }
}
