//! Prepared training data: `ferrospeed data prepare` tokenizes text files and JSONL (plain text or chat
//! conversations) into token shards that training memory-maps, with the documents' boundaries and a
//! loss mask (1 where a token counts in the loss: all of a text document, an assistant's replies in a
//! chat).
//!
//! A prepared directory holds `index.json` (format, content hash, tokenizer, counts, shards) and per
//! shard `NAME.tokens` (u16 or u32 little-endian, by vocabulary size), `NAME.mask` (one byte a token)
//! and `NAME.docs` (u64 little-endian: the start of every document in the shard, then its end). A text
//! document ends with the tokenizer's EOS; a chat document is its rendered conversation, which its
//! template's end-of-turn ends (nothing is appended, as in TRL's SFTTrainer). Training reads it through [`PackedWindows`] or [`PaddedDocs`].

mod chat;
mod packed_docs;
mod samples;
mod write;

pub use chat::{ChatTemplate, Rendered};
pub use packed_docs::PackedDocs;
pub use samples::{PackedWindows, PaddedDocs};
pub use write::{prepare, PrepareOptions, PrepareSummary};

use memmap2::Mmap;
use std::path::{Path, PathBuf};

/// The `format` of `index.json`.
pub const FORMAT: &str = "ferrospeed-tokens/1";

/// How chat documents are rendered and masked (`index.json`'s `chat_rendering`; 0 where it is absent):
/// 1 appended an EOS after the template's last end-of-turn; 2 writes the rendered conversation alone,
/// as transformers' `apply_chat_template` and TRL's SFTTrainer do. A directory with chat documents of
/// another rendering is refused (prepare it again).
pub const CHAT_RENDERING: u32 = 2;

/// One message of a chat conversation.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// The roles a conversation may use.
pub const ROLES: [&str; 4] = ["system", "user", "assistant", "tool"];

/// Bad input to `data prepare` or a prepared directory that cannot be used: one line, naming the file
/// (and line) and what to do.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}:{line}: {reason}")]
    Line { path: PathBuf, line: usize, reason: String },
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    /// The output directory `path` (the one the caller named) could not be written.
    #[error("cannot write {path}: {source}; {}", write_fix(.source))]
    Write { path: PathBuf, source: std::io::Error },
}

/// What to do when the output cannot be written.
fn write_fix(e: &std::io::Error) -> &'static str {
    if e.kind() == std::io::ErrorKind::StorageFull {
        "free space on that disk, or choose an --out on another"
    } else {
        "choose an --out in a folder you can write to"
    }
}

impl PrepareError {
    pub(crate) fn line(path: &Path, line: usize, reason: impl Into<String>) -> Self {
        PrepareError::Line { path: path.to_path_buf(), line, reason: reason.into() }
    }
    pub(crate) fn file(path: &Path, reason: impl Into<String>) -> Self {
        PrepareError::File { path: path.to_path_buf(), reason: reason.into() }
    }
}

/// Width of the stored token ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenWidth {
    U16,
    U32,
}

impl TokenWidth {
    pub fn for_vocab(vocab: usize) -> Self {
        if vocab <= 1 << 16 {
            TokenWidth::U16
        } else {
            TokenWidth::U32
        }
    }
    pub fn bytes(self) -> usize {
        match self {
            TokenWidth::U16 => 2,
            TokenWidth::U32 => 4,
        }
    }
}

/// One shard of a prepared directory.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ShardInfo {
    pub name: String,
    pub documents: u64,
    pub tokens: u64,
}

/// `index.json`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Index {
    pub format: String,
    /// SHA-256 of everything the tokens depend on: the inputs' bytes, the tokenizer, the template, the
    /// format.
    pub hash: String,
    /// [`crate::Tokenizer::fingerprint`] of the tokenizer used.
    pub tokenizer: String,
    pub vocab_size: usize,
    pub eos: u32,
    pub width: TokenWidth,
    pub documents: u64,
    pub tokens: u64,
    /// Tokens with mask 1.
    pub loss_tokens: u64,
    /// The longest document, in tokens.
    pub longest: u64,
    pub chat_documents: u64,
    /// [`CHAT_RENDERING`] of the build that wrote it.
    #[serde(default)]
    pub chat_rendering: u32,
    pub shards: Vec<ShardInfo>,
    pub inputs: Vec<String>,
}

struct Shard {
    tokens: Mmap,
    mask: Mmap,
}

/// A prepared directory, memory-mapped.
pub struct PreparedData {
    pub index: Index,
    dir: PathBuf,
    shards: Vec<Shard>,
    /// Global token offset of every shard's start, then the total.
    shard_starts: Vec<u64>,
    /// Global start of every document, then the total.
    doc_starts: Vec<u64>,
}

impl std::fmt::Debug for PreparedData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PreparedData({}, {} documents, {} tokens)", self.dir.display(), self.index.documents, self.index.tokens)
    }
}

/// Whether `path` is a directory written by `data prepare`.
pub fn is_prepared(path: &Path) -> bool {
    path.join("index.json").is_file()
}

fn map(path: &Path, expect: u64) -> Result<Mmap, PrepareError> {
    let file = std::fs::File::open(path).map_err(|source| PrepareError::Read { path: path.to_path_buf(), source })?;
    let len = file.metadata().map_err(|source| PrepareError::Read { path: path.to_path_buf(), source })?.len();
    if len != expect {
        return Err(PrepareError::file(path, format!("has {len} bytes, index.json says {expect}: the directory is damaged; run data prepare again")));
    }
    // SAFETY: the shards are written once by `data prepare` (renamed into place) and only read after.
    unsafe { Mmap::map(&file) }.map_err(|source| PrepareError::Read { path: path.to_path_buf(), source })
}

impl PreparedData {
    /// Open and check a prepared directory (sizes of every file against the index).
    pub fn open(dir: &Path) -> Result<Self, PrepareError> {
        let index_path = dir.join("index.json");
        let text = std::fs::read_to_string(&index_path).map_err(|source| PrepareError::Read { path: index_path.clone(), source })?;
        let index: Index = serde_json::from_str(&text).map_err(|e| PrepareError::file(&index_path, format!("is not a prepared-data index ({e})")))?;
        if index.format != FORMAT {
            return Err(PrepareError::file(&index_path, format!("has format {:?}, this build reads {FORMAT:?}: run data prepare again", index.format)));
        }
        if index.chat_documents > 0 && index.chat_rendering != CHAT_RENDERING {
            return Err(PrepareError::file(
                &index_path,
                "holds chat documents rendered by an older ferrospeed (an extra EOS after each conversation, in the loss): run data prepare again with --force",
            ));
        }
        let (mut shards, mut shard_starts, mut doc_starts) = (Vec::new(), vec![0u64], Vec::new());
        for s in &index.shards {
            let base = *shard_starts.last().unwrap_or(&0);
            let tokens = map(&dir.join(format!("{}.tokens", s.name)), s.tokens * index.width.bytes() as u64)?;
            let mask = map(&dir.join(format!("{}.mask", s.name)), s.tokens)?;
            let docs_path = dir.join(format!("{}.docs", s.name));
            let docs = map(&docs_path, (s.documents + 1) * 8)?;
            let offsets: Vec<u64> = docs.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default())).collect();
            if offsets.first() != Some(&0) || offsets.last() != Some(&s.tokens) || offsets.windows(2).any(|w| w[0] >= w[1]) {
                return Err(PrepareError::file(&docs_path, "has document offsets out of order: the directory is damaged; run data prepare again"));
            }
            doc_starts.extend(offsets[..offsets.len() - 1].iter().map(|o| base + o));
            shard_starts.push(base + s.tokens);
            shards.push(Shard { tokens, mask });
        }
        let total = *shard_starts.last().unwrap_or(&0);
        doc_starts.push(total);
        if total != index.tokens || doc_starts.len() as u64 != index.documents + 1 {
            return Err(PrepareError::file(&index_path, "totals disagree with its shards: the directory is damaged; run data prepare again"));
        }
        Ok(Self { index, dir: dir.to_path_buf(), shards, shard_starts, doc_starts })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn documents(&self) -> usize {
        self.index.documents as usize
    }

    pub fn tokens(&self) -> u64 {
        self.index.tokens
    }

    /// Global token range of document `i`.
    pub fn doc_range(&self, i: usize) -> (u64, u64) {
        (self.doc_starts[i], self.doc_starts[i + 1])
    }

    /// The document containing global token `g`.
    pub fn doc_of(&self, g: u64) -> usize {
        self.doc_starts.partition_point(|&s| s <= g) - 1
    }

    /// Tokens and mask of the global range `start..start + len` (may span shards).
    pub fn read(&self, start: u64, len: usize) -> (Vec<u32>, Vec<u8>) {
        let (mut tokens, mut mask) = (Vec::with_capacity(len), Vec::with_capacity(len));
        let mut g = start;
        let end = start + len as u64;
        while g < end {
            let s = self.shard_starts.partition_point(|&b| b <= g) - 1;
            let (lo, hi) = (g - self.shard_starts[s], (end.min(self.shard_starts[s + 1])) - self.shard_starts[s]);
            let shard = &self.shards[s];
            let (lo_u, hi_u) = (lo as usize, hi as usize);
            match self.index.width {
                TokenWidth::U16 => tokens.extend(shard.tokens[lo_u * 2..hi_u * 2].chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]]) as u32)),
                TokenWidth::U32 => tokens.extend(shard.tokens[lo_u * 4..hi_u * 4].chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))),
            }
            mask.extend_from_slice(&shard.mask[lo_u..hi_u]);
            g = self.shard_starts[s] + hi;
        }
        (tokens, mask)
    }

    /// Tokens and mask of document `i`.
    pub fn document(&self, i: usize) -> (Vec<u32>, Vec<u8>) {
        let (a, b) = self.doc_range(i);
        self.read(a, (b - a) as usize)
    }
}
