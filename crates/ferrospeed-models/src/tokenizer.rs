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

/// What a chat template and document boundaries need besides the vocabulary: the special tokens (from
/// `tokenizer_config.json` next to a `tokenizer.json`, or a GGUF file's metadata) and the template.
#[derive(Debug, Clone, Default)]
pub struct Specials {
    /// The end-of-sequence token as text and its id.
    pub eos: Option<(String, u32)>,
    /// The beginning-of-sequence token as text, for templates that print it.
    pub bos: Option<String>,
    /// The Jinja chat template.
    pub chat_template: Option<String>,
}

/// A `tokenizers` tokenizer, where it came from, and its special tokens.
#[derive(Clone)]
pub struct HfTokenizer {
    pub tokenizer: tokenizers::Tokenizer,
    pub path: PathBuf,
    pub specials: Specials,
}

/// The tokenizer of a run.
#[derive(Clone)]
pub enum Tokenizer {
    Bytes,
    /// A `tokenizer.json` (or one built from a GGUF file's vocabulary) and where it came from.
    Hf(Box<HfTokenizer>),
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Tokenizer::Bytes => write!(f, "Tokenizer::Bytes"),
            Tokenizer::Hf(t) => write!(f, "Tokenizer::Hf({})", t.path.display()),
        }
    }
}

/// A special token in `tokenizer_config.json`: a string or `{"content": …}`.
fn token_text(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(str::to_string),
        _ => None,
    }
}

impl Tokenizer {
    /// Read a `tokenizer.json`, with the special tokens and chat template of the `tokenizer_config.json`
    /// (and transformers 5's `chat_template.jinja`) beside it when they exist.
    pub fn from_file(path: &Path) -> Result<Self, TokenizerError> {
        let t = tokenizers::Tokenizer::from_file(path).map_err(|e| TokenizerError::Parse { path: path.to_path_buf(), reason: e.to_string() })?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let config: serde_json::Value = std::fs::read_to_string(dir.join("tokenizer_config.json"))
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or_default();
        let eos = token_text(config.get("eos_token")).and_then(|text| t.token_to_id(&text).map(|id| (text, id)));
        let template = match config.get("chat_template") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            // A list of named templates: the default one.
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|e| e.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|e| e.get("template")?.as_str().map(str::to_string)),
            _ => std::fs::read_to_string(dir.join("chat_template.jinja")).ok(),
        };
        let specials = Specials { eos, bos: token_text(config.get("bos_token")), chat_template: template };
        Ok(Tokenizer::Hf(Box::new(HfTokenizer { tokenizer: t, path: path.to_path_buf(), specials })))
    }

    /// `bytes`, a `tokenizer.json`, a model directory holding one, or a `.gguf` file (its vocabulary).
    pub fn open(spec: &str) -> Result<Self, TokenizerError> {
        let path = Path::new(spec);
        if spec == "bytes" {
            return Ok(Tokenizer::Bytes);
        }
        if path.is_dir() {
            return Self::from_file(&path.join("tokenizer.json"));
        }
        if path.extension().is_some_and(|e| e == "gguf") {
            return crate::gguf::GgufFile::open(path).and_then(|g| g.tokenizer()).map_err(|e| TokenizerError::Parse { path: path.to_path_buf(), reason: e.to_string() });
        }
        Self::from_file(path)
    }

    /// Token ids of `text`, without special tokens added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        Ok(self.encode_with_offsets(text)?.0)
    }

    /// Token ids of `text` and each token's byte range in it (special tokens written in the text are
    /// recognised; none is added).
    pub fn encode_with_offsets(&self, text: &str) -> Result<(Vec<u32>, Vec<(usize, usize)>), TokenizerError> {
        match self {
            Tokenizer::Bytes => Ok((ByteTokenizer.encode(text), (0..text.len()).map(|i| (i, i + 1)).collect())),
            Tokenizer::Hf(t) => {
                let e = t.tokenizer.encode(text, false).map_err(|e| TokenizerError::Encode { path: t.path.clone(), reason: e.to_string() })?;
                Ok((e.get_ids().to_vec(), e.get_offsets().to_vec()))
            }
        }
    }

    /// Text of `tokens` (special tokens skipped).
    pub fn decode(&self, tokens: &[u32]) -> Result<String, TokenizerError> {
        match self {
            Tokenizer::Bytes => Ok(ByteTokenizer.decode(tokens)),
            Tokenizer::Hf(t) => t.tokenizer.decode(tokens, true).map_err(|e| TokenizerError::Encode { path: t.path.clone(), reason: e.to_string() }),
        }
    }

    /// Ids the tokenizer can produce (added tokens included).
    pub fn vocab_size(&self) -> usize {
        match self {
            Tokenizer::Bytes => ByteTokenizer::VOCAB_SIZE,
            Tokenizer::Hf(t) => t.tokenizer.get_vocab_size(true),
        }
    }

    /// The `tokenizer.json` (or GGUF file) it was read from.
    pub fn path(&self) -> Option<&Path> {
        match self {
            Tokenizer::Bytes => None,
            Tokenizer::Hf(t) => Some(&t.path),
        }
    }

    /// Special tokens and chat template (none for `bytes`).
    pub fn specials(&self) -> Specials {
        match self {
            Tokenizer::Bytes => Specials::default(),
            Tokenizer::Hf(t) => t.specials.clone(),
        }
    }

    /// The id of `token` (a special token's text), if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        match self {
            Tokenizer::Bytes => None,
            Tokenizer::Hf(t) => t.tokenizer.token_to_id(token),
        }
    }

    /// The token that ends every document: the tokenizer's EOS, and for `bytes` the NUL byte (0).
    pub fn eos_id(&self) -> Option<u32> {
        match self {
            Tokenizer::Bytes => Some(0),
            Tokenizer::Hf(t) => t.specials.eos.as_ref().map(|e| e.1),
        }
    }

    /// A short stable description and a hash of the vocabulary (what a prepared dataset records to
    /// check that training uses the tokenizer it was prepared with).
    pub fn fingerprint(&self) -> String {
        match self {
            Tokenizer::Bytes => "bytes".into(),
            Tokenizer::Hf(t) => {
                let mut vocab: Vec<(String, u32)> = t.tokenizer.get_vocab(true).into_iter().collect();
                vocab.sort_by_key(|e| e.1);
                let mut h = crc32c::crc32c(&[]);
                for (tok, id) in &vocab {
                    h = crc32c::crc32c_append(h, tok.as_bytes());
                    h = crc32c::crc32c_append(h, &id.to_le_bytes());
                }
                format!("vocab {} crc32c {h:08x}", vocab.len())
            }
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
