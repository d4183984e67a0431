//! Tokenizers: `bytes` (one token per byte, 256 symbols, nothing to download) for the tiny examples,
//! and HuggingFace `tokenizer.json` files (BPE of GPT-2 and Llama 3, SentencePiece-style of Llama 2
//! and Mistral, …) through the `tokenizers` crate, built with its pure-Rust regex engine.

use std::path::{Path, PathBuf};

/// A tokenizer file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("{path} is not a tokenizer.json the tokenizers library can read: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("tokenizing with {path}: {reason}")]
    Encode { path: PathBuf, reason: String },
}

/// Bytes in, bytes out.
#[derive(Debug, Clone, Copy, Default)]
pub struct ByteTokenizer;

impl ByteTokenizer {
    pub const VOCAB_SIZE: usize = 256;

    pub fn encode(&self, text: &str) -> Vec<u32> {
        text.bytes().map(u32::from).collect()
    }

    /// Tokens back to text; bytes that are not valid UTF-8 become U+FFFD.
    pub fn decode(&self, tokens: &[u32]) -> String {
        let bytes: Vec<u8> = tokens.iter().map(|&t| t.min(255) as u8).collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// The tokenizer of a run.
#[derive(Clone)]
pub enum Tokenizer {
    Bytes,
    /// A `tokenizer.json` and where it came from.
    Hf(Box<tokenizers::Tokenizer>, PathBuf),
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Tokenizer::Bytes => write!(f, "Tokenizer::Bytes"),
            Tokenizer::Hf(_, path) => write!(f, "Tokenizer::Hf({})", path.display()),
        }
    }
}

impl Tokenizer {
    /// Read a `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self, TokenizerError> {
        let t = tokenizers::Tokenizer::from_file(path).map_err(|e| TokenizerError::Parse { path: path.to_path_buf(), reason: e.to_string() })?;
        Ok(Tokenizer::Hf(Box::new(t), path.to_path_buf()))
    }

    /// Token ids of `text`, without special tokens added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        match self {
            Tokenizer::Bytes => Ok(ByteTokenizer.encode(text)),
            Tokenizer::Hf(t, path) => t.encode(text, false).map(|e| e.get_ids().to_vec()).map_err(|e| TokenizerError::Encode { path: path.clone(), reason: e.to_string() }),
        }
    }

    /// Text of `tokens` (special tokens skipped).
    pub fn decode(&self, tokens: &[u32]) -> Result<String, TokenizerError> {
        match self {
            Tokenizer::Bytes => Ok(ByteTokenizer.decode(tokens)),
            Tokenizer::Hf(t, path) => t.decode(tokens, true).map_err(|e| TokenizerError::Encode { path: path.clone(), reason: e.to_string() }),
        }
    }

    /// Ids the tokenizer can produce (added tokens included).
    pub fn vocab_size(&self) -> usize {
        match self {
            Tokenizer::Bytes => ByteTokenizer::VOCAB_SIZE,
            Tokenizer::Hf(t, _) => t.get_vocab_size(true),
        }
    }

    /// The `tokenizer.json` it was read from.
    pub fn path(&self) -> Option<&Path> {
        match self {
            Tokenizer::Bytes => None,
            Tokenizer::Hf(_, p) => Some(p),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn round_trip() {
        let t = super::ByteTokenizer;
        assert_eq!(t.decode(&t.encode("fn main() {}")), "fn main() {}");
        assert_eq!(t.encode("A"), vec![65]);
    }

    #[test]
    fn a_file_that_does_not_parse_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        std::fs::write(&path, "{\"model\": 3}").unwrap();
        let e = super::Tokenizer::from_file(&path).unwrap_err().to_string();
        assert!(e.contains("tokenizer.json") && e.contains("is not a tokenizer.json"), "{e}");
    }
}
