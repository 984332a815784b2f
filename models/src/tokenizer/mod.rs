//! Tokenizers: llama2.c's `tokenizer.bin` (score-ordered merges with byte
//! fallback) and the GPT-2-style byte-level BPE whose merges GGUF embeds.
//! Both implement [`Tokenizer`], so the CLI and the forward pass need not care.

pub mod llama2c;

pub use llama2c::Llama2cTokenizer;

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
