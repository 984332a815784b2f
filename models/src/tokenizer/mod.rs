//! Tokenizers: llama2.c's `tokenizer.bin` (score-ordered merges with byte
//! fallback) and the GPT-2-style byte-level BPE whose merges GGUF embeds.
//! Both implement [`Tokenizer`], so the CLI and the forward pass need not care.

use std::path::Path;

use crate::Result;

pub mod bpe;
pub mod llama2c;

pub use bpe::BpeTokenizer;
pub use llama2c::Llama2cTokenizer;

/// The tokenizer a model file carries inside itself: `Some` for a `.gguf`
/// (its `tokenizer.ggml.*` vocabulary and merges), `None` for formats that
/// keep the tokenizer in a separate file (llama2.c `tokenizer.bin`).
pub fn embedded_in(model_path: &Path) -> Result<Option<Box<dyn Tokenizer>>> {
    let is_gguf = model_path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
    if is_gguf {
        Ok(Some(Box::new(BpeTokenizer::open_gguf(model_path)?)))
    } else {
        Ok(None)
    }
}

/// Text <-> token ids.
pub trait Tokenizer: Send + Sync {
    /// Token ids for `text` (no BOS/EOS added; see [`Tokenizer::bos`]).
    fn encode(&self, text: &str) -> Vec<u32>;
    /// The text of a token sequence (lossy only for invalid UTF-8 byte runs).
    fn decode(&self, tokens: &[u32]) -> String;
    /// The beginning-of-sequence id, if the model uses one.
    fn bos(&self) -> Option<u32>;
    /// The end-of-sequence id, if the model uses one.
    fn eos(&self) -> Option<u32>;
    fn vocab_size(&self) -> usize;
}
