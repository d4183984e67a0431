//! What `train` trains and evaluates on: raw text (random windows) or prepared data (packed windows
//! or padded documents) from `data.path`, and the held-out data from `data.eval_path` or
//! `data.eval_split` — raw text's last tokens, or prepared data's documents drawn by the seed — read
//! as non-overlapping samples in order. Every check is a one-line error before anything is written.

use crate::usage::usage_error;
use anyhow::Result;
use ferrospeed::config::Config;
use ferrospeed::data::{held_out, Dataset, Subset};
use ferrospeed_models::prepared::is_prepared;
use ferrospeed_models::{PackedDocs, PackedWindows, PaddedDocs, PreparedData, TextCorpus, TextWindows, Tokenizer};
use std::path::Path;

/// The run's data: raw text (random windows) or a directory written by `data prepare`.
pub enum TrainData {
    Text(TextCorpus),
    Prepared(PreparedData),
}

/// The data at `path` (the config's `key`), checked against the run's tokenizer and window.
pub fn load_data(cfg: &Config, path: &Path, key: &str, tokenizer: &Tokenizer) -> Result<TrainData> {
    if !is_prepared(path) && !cfg.data.packing {
        return Err(usage_error(format!(
            "data.packing = false applies to data written by `ferrospeed data prepare`, and {} is raw text: prepare it (one document per file or JSONL line), or remove the key",
            path.display()
        )));
    }
    // JSONL read as raw text would train on the JSON syntax: it goes through `data prepare`.
    let jsonl = |p: &Path| p.extension().is_some_and(|e| e == "jsonl");
    let has_jsonl = if path.is_dir() { std::fs::read_dir(path).map(|d| d.filter_map(|e| e.ok()).any(|e| jsonl(&e.path()))).unwrap_or(false) } else { jsonl(path) };
    if !is_prepared(path) && has_jsonl {
        let tok = tokenizer.path().map_or_else(|| "bytes".to_string(), |p| p.display().to_string());
        return Err(usage_error(format!(
            "{key} = {} holds JSONL: tokenize it first (`ferrospeed data prepare {} --tokenizer {tok} --out DIR`), then set {key} = DIR",
            path.display(),
            path.display()
        )));
    }
    if !is_prepared(path) {
        let corpus = TextCorpus::load_tokenized(path, tokenizer, cfg.data.allow_binary).map_err(|e| usage_error(e.to_string()))?;
        corpus.check_window(cfg.model.seq_len).map_err(|e| usage_error(e.to_string()))?;
        return Ok(TrainData::Text(corpus));
    }
    let data = PreparedData::open(path).map_err(|e| usage_error(e.to_string()))?;
    if data.index.tokenizer != tokenizer.fingerprint() {
        return Err(usage_error(format!(
            "{key} = {} was prepared with another tokenizer ({}) than this run's ({}): prepare it again with --tokenizer set to this model's",
            path.display(),
            data.index.tokenizer,
            tokenizer.fingerprint()
        )));
    }
    if cfg.data.packing && data.index.tokens < cfg.model.seq_len as u64 + 1 {
        return Err(usage_error(format!(
            "{key} = {} has {} tokens, fewer than one window of model.seq_len + 1 = {}: prepare more data or lower model.seq_len",
            path.display(),
            data.index.tokens,
            cfg.model.seq_len + 1
        )));
    }
    Ok(TrainData::Prepared(data))
}


/// A source's samples: windows of raw text, packed windows or padded documents.
pub enum Samples<'a> {
    Windows(TextWindows<'a>),
    Packed(PackedWindows<'a>),
    Padded(PaddedDocs<'a>),
}

impl<'a> Samples<'a> {
    pub fn of(data: &'a TrainData, cfg: &Config) -> Result<Self> {
        let seq_len = cfg.model.seq_len;
        Ok(match data {
            TrainData::Text(corpus) => Samples::Windows(TextWindows { corpus, seq_len }),
            TrainData::Prepared(data) if cfg.data.packing => Samples::Packed(PackedWindows { data, seq_len }),
            TrainData::Prepared(data) => Samples::Padded(PaddedDocs::new(data, seq_len).map_err(usage_error)?),
        })
    }

    pub fn dataset(&self) -> &(dyn Dataset + 'a) {
        match self {
            Samples::Windows(w) => w,
            Samples::Packed(p) => p,
            Samples::Padded(p) => p,
        }
    }

    /// The samples an evaluation reads: every one, but raw text's windows only every `seq_len`
    /// tokens (training draws them at any offset; held out, each token is read once).
    fn eval_indices(&self, seq_len: usize) -> Vec<usize> {
        let n = self.dataset().len();
        match self {
            Samples::Windows(_) => (0..n).step_by(seq_len).collect(),
            _ => (0..n).collect(),
        }
    }
}

/// The run's data and its held-out data, as loaded: `data.eval_split` of raw text splits the
/// corpus here (its last tokens); of prepared data, later by sample ([`split`]).
pub fn load(cfg: &Config, tokenizer: &Tokenizer) -> Result<(TrainData, Option<TrainData>)> {
    let source = load_data(cfg, &cfg.data.path, "data.path", tokenizer)?;
    let split = cfg.data.eval_split;
    Ok(match (source, &cfg.data.eval_path) {
        (_, Some(path)) if split > 0.0 => unreachable!("refused by validation: {}", path.display()),
        (source, Some(path)) => (source, Some(load_data(cfg, path, "data.eval_path", tokenizer)?)),
        (TrainData::Text(corpus), None) if split > 0.0 => {
            let (train, eval) = corpus.split_tail(split);
            for (part, what) in [(&train, "the rest"), (&eval, "the held-out part")] {
                part.check_window(cfg.model.seq_len)
                    .map_err(|_| usage_error(format!("data.eval_split = {split} leaves {} {} tokens of data.path, fewer than one window of model.seq_len + 1 = {}: change data.eval_split, or use more data", what, part.len(), cfg.model.seq_len + 1)))?;
            }
            (TrainData::Text(train), Some(TrainData::Text(eval)))
        }
        (source, None) => (source, None),
    })
}

/// A dataset of its own (a subset, or some documents packed).
pub type Owned<'a> = Box<dyn Dataset + 'a>;

/// The training samples (without the held-out ones of `data.eval_split` of prepared data: whole
/// documents, packed or padded) and the held-out samples (`None` without held-out data), the latter
/// refused in one line when they do not fill one global batch.
pub fn split<'a>(cfg: &Config, samples: &'a Samples<'a>, eval: Option<&'a Samples<'a>>) -> Result<(Option<Owned<'a>>, Option<Owned<'a>>)> {
    let (seq_len, fraction, seed) = (cfg.model.seq_len, cfg.data.eval_split, cfg.train.seed);
    let (train, held): (Option<Owned<'a>>, Option<Owned<'a>>) = match (eval, samples) {
        (Some(e), _) => (None, Some(Box::new(Subset::new(e.dataset(), e.eval_indices(seq_len))))),
        (None, Samples::Packed(p)) if fraction > 0.0 => {
            let (train, held) = held_out(p.data.documents(), fraction, seed);
            (Some(Box::new(PackedDocs::new(p.data, seq_len, train))), Some(Box::new(PackedDocs::new(p.data, seq_len, held))))
        }
        (None, Samples::Padded(_)) if fraction > 0.0 => {
            let (train, held) = held_out(samples.dataset().len(), fraction, seed);
            (Some(Box::new(Subset::new(samples.dataset(), train))), Some(Box::new(Subset::new(samples.dataset(), held))))
        }
        // Raw text is split in `load` (its last tokens came back as `eval`); nothing held out otherwise.
        _ => (None, None),
    };
    if let Some(h) = held.as_ref().filter(|h| h.len() < cfg.train.global_batch) {
        let source = match &cfg.data.eval_path {
            Some(p) => format!("data.eval_path = {}", p.display()),
            None => format!("data.eval_split = {} of data.path", cfg.data.eval_split),
        };
        return Err(usage_error(format!(
            "{source} holds {} samples, fewer than one global batch of {}: hold out more (a larger data.eval_split, or more data in data.eval_path), or lower train.global_batch",
            h.len(),
            cfg.train.global_batch
        )));
    }
    Ok((train, held))
}
