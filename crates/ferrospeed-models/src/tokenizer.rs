//! The `bytes` tokenizer: one token per byte, 256 symbols, nothing to download.

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

#[cfg(test)]
mod tests {
    #[test]
    fn round_trip() {
        let t = super::ByteTokenizer;
        assert_eq!(t.decode(&t.encode("fn main() {}")), "fn main() {}");
        assert_eq!(t.encode("A"), vec![65]);
    }
}
