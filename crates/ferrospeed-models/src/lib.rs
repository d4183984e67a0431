//! Model families for ferrospeed, expressed as sequences of blocks, with their tokenizers and datasets.
//!
//! Nothing here knows about ranks, shards or strategies: a model is blocks that receive their
//! parameters as tensors (see `ferrospeed::engine::Block`).

pub mod data;
pub mod family;
pub mod gguf;
pub mod gpt;
pub mod hf;
pub mod infer;
pub mod llama;
pub mod ops;
pub mod prepared;
pub mod tokenizer;

pub use data::{BatchSampler, DataError, TextCorpus, TextWindows};
pub use family::{Family, FamilyError};
pub use gpt::{GptConfig, Gpt};
pub use llama::{Llama, LlamaConfig};
pub use prepared::{PackedDocs, PackedWindows, PaddedDocs, PreparedData};
pub use tokenizer::{ByteTokenizer, Tokenizer, TokenizerError};
