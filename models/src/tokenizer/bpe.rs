//! GPT-2-style byte-level BPE, built from the vocabulary and merges that GGUF
//! files embed (`tokenizer.ggml.model = "gpt2"`), as SmolLM2 ships it.
//!
//! Encoding, in llama.cpp's order (`llm_tokenizer_bpe_session::tokenize`):
//! ```text
//!   text ──split on special tokens (control / user-defined, longest first)──▶ runs
//!   run  ──pre-tokenizer regexes, applied in sequence, keeping unmatched gaps──▶ words
//!   word ──bytes mapped to printable chars (GPT-2 bytes_to_unicode)──▶ symbols
//!   symbols ──repeatedly merge the adjacent pair of lowest merge rank──▶ token ids
//! ```
//! Decoding maps every token back to bytes (inverse char map; special tokens
//! give their text) and reads the bytes as UTF-8 (lossy only if the ids cut a
//! character).
//!
//! Unrepresentable bytes: a byte-level vocabulary need not hold all 256
//! byte-characters. SmolLM2's lacks 21: the control bytes 0x04 0x06 0x13 0x14
//! 0x16 0x1d, the never-valid UTF-8 bytes 0xc0 0xc1 0xf5..0xff, and 0xf1..0xf4
//! (lead bytes of U+40000..U+10FFFF). llama.cpp drops such bytes silently;
//! here [`BpeTokenizer::try_encode`] reports them, and the infallible
//! [`Tokenizer::encode`] writes the unknown token (`tokenizer.ggml.unknown_token_id`)
//! in their place, so the loss is visible in the ids. Every other string
//! round-trips: `decode(encode(s)) == s`.
//!
//! Merges are stored as token-id pairs → (rank, merged id): a merge whose
//! result is not in the vocabulary is a load error, so the merge loop never
//! looks up strings. A word of n symbols costs O(n²) pair scans, fine for
//! words of a few dozen bytes.

use std::collections::HashMap;
use std::path::Path;

use fancy_regex::Regex;

use super::Tokenizer;
use crate::gguf::{GgufFile, MetaValue};
use crate::{ModelsError, Result};

/// GPT-2's split regex as llama.cpp writes it (`LLAMA_VOCAB_PRE_TYPE_GPT2`).
pub const GPT2_REGEX: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenType {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl TokenType {
    fn from_id(id: i64) -> Option<TokenType> {
        Some(match id {
            1 => TokenType::Normal,
            2 => TokenType::Unknown,
            3 => TokenType::Control,
            4 => TokenType::UserDefined,
            5 => TokenType::Unused,
            6 => TokenType::Byte,
            _ => return None,
        })
    }
    /// Matched as a whole string before pre-tokenization.
    fn is_special(self) -> bool {
        matches!(self, TokenType::Control | TokenType::UserDefined)
    }
}

/// Which pre-tokenizer (`tokenizer.ggml.pre`) splits text into words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PreTokenizer {
    /// `gpt2` (and `default`): [`GPT2_REGEX`].
    Gpt2,
    /// `smollm`, `starcoder`, `refact`, `codeshell`: every digit alone (`\p{N}`),
    /// then [`GPT2_REGEX`] (llama.cpp `LLAMA_VOCAB_PRE_TYPE_SMOLLM` and kin; HF's
    /// `Digits(individual_digits=true)` + `ByteLevel`).
    DigitsThenGpt2,
}

impl PreTokenizer {
    pub fn from_gguf_name(name: &str) -> Option<PreTokenizer> {
        match name {
            "gpt2" | "default" | "gpt-2" => Some(PreTokenizer::Gpt2),
            "smollm" | "starcoder" | "refact" | "codeshell" => Some(PreTokenizer::DigitsThenGpt2),
            _ => None,
        }
    }
    fn regexes(&self) -> Vec<&'static str> {
        match self {
            PreTokenizer::Gpt2 => vec![GPT2_REGEX],
            PreTokenizer::DigitsThenGpt2 => vec![r"\p{N}", GPT2_REGEX],
        }
    }
}

/// GPT-2's `bytes_to_unicode`: printable Latin-1 bytes map to themselves, the
/// other 68 bytes (controls, space, 0x7f-0xa0, 0xad) to U+0100.. in byte order,
/// so every byte has a visible, non-space character (space becomes `Ġ`).
pub fn byte_to_unicode() -> [char; 256] {
    let mut map = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xa1..=0xac | 0xae..=0xff);
        map[b as usize] = if printable {
            b as char
        } else {
            let c = char::from_u32(256 + n).expect("U+0100.. are chars");
            n += 1;
            c
        };
    }
    map
}

/// A byte of the input that no token of the vocabulary spells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("byte 0x{byte:02x} has no token in this vocabulary")]
pub struct UnrepresentableByte {
    pub byte: u8,
}

/// A byte-level BPE tokenizer.
#[derive(Debug, Clone)]
pub struct BpeTokenizer {
    /// Bytes each token decodes to.
    token_bytes: Vec<Vec<u8>>,
    /// Token text (byte-chars form) -> id.
    vocab: HashMap<String, u32>,
    /// (left, right) -> (rank, merged id).
    merges: HashMap<(u32, u32), (u32, u32)>,
    /// Special tokens, longest text first (ties by id).
    specials: Vec<(String, u32)>,
    byte_token: [Option<u32>; 256],
    unknown: Option<u32>,
    byte_char: [char; 256],
    regexes: Vec<Regex>,
    bos: Option<u32>,
    eos: Option<u32>,
}

impl BpeTokenizer {
    /// Builds a tokenizer from its parts; `origin` names the file in errors.
    ///
    /// `tokens` are in byte-char form (`Ġthe`), `merges` are `"left right"`
    /// lines in rank order, `types` is llama.cpp's token type per token (all
    /// normal when `None`).
    pub fn new(
        origin: &Path,
        tokens: &[String],
        types: Option<&[TokenType]>,
        merges: &[String],
        pre: PreTokenizer,
        bos: Option<u32>,
        eos: Option<u32>,
    ) -> Result<BpeTokenizer> {
        let field = |f: &str, reason: String| ModelsError::Field {
            path: origin.to_path_buf(),
            field: f.into(),
            reason,
        };
        if tokens.is_empty() || tokens.len() > u32::MAX as usize {
            return Err(field(
                "tokenizer.ggml.tokens",
                format!("{} tokens", tokens.len()),
            ));
        }
        if let Some(t) = types {
            if t.len() != tokens.len() {
                return Err(field(
                    "tokenizer.ggml.token_type",
                    format!("{} types for {} tokens", t.len(), tokens.len()),
                ));
            }
        }
        let byte_char = byte_to_unicode();
        let mut char_byte = HashMap::new();
        for (b, &c) in byte_char.iter().enumerate() {
            char_byte.insert(c, b as u8);
        }
        let mut vocab = HashMap::with_capacity(tokens.len());
        let mut token_bytes = Vec::with_capacity(tokens.len());
        let mut specials = Vec::new();
        for (i, t) in tokens.iter().enumerate() {
            let ty = types.map_or(TokenType::Normal, |ts| ts[i]);
            if ty.is_special() {
                if t.is_empty() {
                    return Err(field(
                        "tokenizer.ggml.tokens",
                        format!("special token {i} is empty"),
                    ));
                }
                specials.push((t.clone(), i as u32));
                token_bytes.push(t.as_bytes().to_vec());
            } else {
                // Normal tokens are byte-chars; a char outside the map (seen in
                // some vocabularies' unused slots) decodes as its own UTF-8.
                let mut bytes = Vec::with_capacity(t.len());
                for c in t.chars() {
                    match char_byte.get(&c) {
                        Some(&b) => bytes.push(b),
                        None => {
                            let mut buf = [0u8; 4];
                            bytes.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                        }
                    }
                }
                token_bytes.push(bytes);
            }
            // First occurrence wins for duplicate strings (as llama.cpp's map insert).
            vocab.entry(t.clone()).or_insert(i as u32);
        }
        specials.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));
        let mut byte_token = [None; 256];
        for b in 0..256 {
            byte_token[b] = vocab.get(&byte_char[b].to_string()).copied();
        }
        // Printable ASCII must be there, or this is not a byte-level vocabulary
        // (e.g. a SentencePiece one whose tokens use `▁`).
        if let Some(b) = (b'!'..=b'~').find(|&b| byte_token[b as usize].is_none()) {
            return Err(field(
                "tokenizer.ggml.tokens",
                format!(
                    "no token for byte 0x{b:02x} (`{}`): not a byte-level BPE vocabulary",
                    b as char
                ),
            ));
        }
        let mut merge_map = HashMap::with_capacity(merges.len());
        for (rank, m) in merges.iter().enumerate() {
            let bad = |why: &str| {
                field(
                    "tokenizer.ggml.merges",
                    format!("merge #{rank} `{m}`: {why}"),
                )
            };
            let (l, r) = m.split_once(' ').ok_or_else(|| bad("not `left right`"))?;
            let (Some(&li), Some(&ri)) = (vocab.get(l), vocab.get(r)) else {
                return Err(bad("a side is not in the vocabulary"));
            };
            let merged = format!("{l}{r}");
            let &mi = vocab
                .get(&merged)
                .ok_or_else(|| bad("the merged token is not in the vocabulary"))?;
            merge_map.entry((li, ri)).or_insert((rank as u32, mi));
        }
        let regexes = pre
            .regexes()
            .into_iter()
            .map(|r| Regex::new(r).expect("built-in pre-tokenizer regex compiles"))
            .collect();
        for (name, id) in [("bos", bos), ("eos", eos)] {
            if let Some(id) = id {
                if id as usize >= tokens.len() {
                    return Err(field(
                        &format!("tokenizer.ggml.{name}_token_id"),
                        format!("{id} is not below the vocabulary size {}", tokens.len()),
                    ));
                }
            }
        }
        Ok(BpeTokenizer {
            token_bytes,
            vocab,
            merges: merge_map,
            specials,
            byte_token,
            unknown: None,
            byte_char,
            regexes,
            bos,
            eos,
        })
    }

    /// Reads the tokenizer embedded in a GGUF file. [`Tokenizer::bos`] is the
    /// BOS id only when `tokenizer.ggml.add_bos_token` is true (llama.cpp
    /// prepends it only then); GPT-2-style vocabularies usually say false.
    pub fn from_gguf(f: &GgufFile) -> Result<BpeTokenizer> {
        let path = f.path();
        let model = f.get_str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(ModelsError::Unsupported {
                path: path.to_path_buf(),
                what: format!(
                    "tokenizer.ggml.model `{model}` (this tokenizer reads `gpt2` byte-level BPE)"
                ),
            });
        }
        let pre_name = match f.get("tokenizer.ggml.pre") {
            None => "default",
            Some(_) => f.get_str("tokenizer.ggml.pre")?,
        };
        let pre = PreTokenizer::from_gguf_name(pre_name).ok_or_else(|| ModelsError::Unsupported {
            path: path.to_path_buf(),
            what: format!("tokenizer.ggml.pre `{pre_name}` (known: gpt2, default, smollm, starcoder, refact, codeshell)"),
        })?;
        let tokens = f.get_str_array("tokenizer.ggml.tokens")?;
        let merges = f.get_str_array("tokenizer.ggml.merges")?;
        let types = match f.get("tokenizer.ggml.token_type") {
            None => None,
            Some(MetaValue::Array(a)) => {
                let ids = a.as_i64s().ok_or_else(|| ModelsError::Field {
                    path: path.to_path_buf(),
                    field: "tokenizer.ggml.token_type".into(),
                    reason: "not an integer array".into(),
                })?;
                Some(
                    ids.iter()
                        .enumerate()
                        .map(|(i, &t)| {
                            TokenType::from_id(t).ok_or_else(|| ModelsError::Field {
                                path: path.to_path_buf(),
                                field: "tokenizer.ggml.token_type".into(),
                                reason: format!("token {i} has unknown type {t}"),
                            })
                        })
                        .collect::<Result<Vec<_>>>()?,
                )
            }
            Some(v) => {
                return Err(ModelsError::Field {
                    path: path.to_path_buf(),
                    field: "tokenizer.ggml.token_type".into(),
                    reason: format!("expected an array, found {}", v.type_name()),
                })
            }
        };
        let id = |k: &str| -> Result<Option<u32>> {
            Ok(f.opt_u64(k)?.map(|v| v.min(u32::MAX as u64) as u32))
        };
        // `bos()` means "prepend this": a model converted with
        // add_bos_token = false (SmolLM2) has a BOS id but is not fed one.
        let add_bos = match f.get("tokenizer.ggml.add_bos_token") {
            Some(MetaValue::Bool(b)) => *b,
            Some(v) => {
                return Err(ModelsError::Field {
                    path: path.to_path_buf(),
                    field: "tokenizer.ggml.add_bos_token".into(),
                    reason: format!("expected a bool, found {}", v.type_name()),
                })
            }
            None => false,
        };
        BpeTokenizer::new(
            path,
            tokens,
            types.as_deref(),
            merges,
            pre,
            if add_bos {
                id("tokenizer.ggml.bos_token_id")?
            } else {
                None
            },
            id("tokenizer.ggml.eos_token_id")?,
        )
        .map(|t| t.with_unknown(id("tokenizer.ggml.unknown_token_id").ok().flatten()))
    }

    /// The id [`Tokenizer::encode`] writes for bytes the vocabulary lacks.
    pub fn with_unknown(mut self, id: Option<u32>) -> Self {
        self.unknown = id.filter(|&i| (i as usize) < self.token_bytes.len());
        self
    }

    /// Opens a GGUF file and reads its tokenizer.
    pub fn open_gguf(path: impl AsRef<Path>) -> Result<BpeTokenizer> {
        BpeTokenizer::from_gguf(&GgufFile::open(path)?)
    }

    /// The id of a token by its vocabulary text (byte-char form, e.g. `ĠParis`).
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.vocab.get(text).copied()
    }

    /// The bytes a token decodes to (for streaming output: print bytes as
    /// they complete UTF-8 characters).
    pub fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        self.token_bytes.get(id as usize).map(|b| b.as_slice())
    }

    /// The vocabulary text of a token in byte-char form (`Ġthe`).
    pub fn token_text(&self, id: u32) -> Option<String> {
        self.token_bytes(id)
            .map(|b| b.iter().map(|&x| self.byte_char[x as usize]).collect())
    }

    /// The pre-tokenizer's words of a run without special tokens.
    pub fn pre_tokenize<'t>(&self, text: &'t str) -> Vec<&'t str> {
        let mut pieces = vec![text];
        for re in &self.regexes {
            let mut next = Vec::with_capacity(pieces.len());
            for p in pieces {
                let mut last = 0;
                for m in re.find_iter(p) {
                    // fancy-regex fails only on backtrack limits; these regexes
                    // have no nested quantifiers, so a failure is a bug.
                    let m = m.expect("pre-tokenizer regex does not backtrack catastrophically");
                    if m.start() > last {
                        next.push(&p[last..m.start()]);
                    }
                    if m.end() > m.start() {
                        next.push(m.as_str());
                    }
                    last = m.end();
                }
                if last < p.len() {
                    next.push(&p[last..]);
                }
            }
            pieces = next;
        }
        pieces
    }

    /// BPE on one word, appending ids to `out`. A byte without a token ends
    /// the current run of symbols and becomes `on_missing(byte)`.
    fn encode_word(
        &self,
        word: &str,
        out: &mut Vec<u32>,
        on_missing: &mut dyn FnMut(u8) -> Option<u32>,
    ) {
        let mut syms: Vec<u32> = Vec::with_capacity(word.len());
        for b in word.bytes() {
            match self.byte_token[b as usize] {
                Some(t) => syms.push(t),
                None => {
                    self.merge(&mut syms);
                    out.append(&mut syms);
                    out.extend(on_missing(b));
                }
            }
        }
        self.merge(&mut syms);
        out.append(&mut syms);
    }

    /// Applies merges by rank until none applies.
    fn merge(&self, syms: &mut Vec<u32>) {
        loop {
            let mut best: Option<(u32, usize, u32)> = None;
            for i in 0..syms.len().saturating_sub(1) {
                if let Some(&(rank, merged)) = self.merges.get(&(syms[i], syms[i + 1])) {
                    if best.is_none_or(|(r, _, _)| rank < r) {
                        best = Some((rank, i, merged));
                    }
                }
            }
            let Some((_, i, merged)) = best else { break };
            syms[i] = merged;
            syms.remove(i + 1);
        }
    }

    /// Encodes text that holds no special tokens.
    fn encode_ordinary(
        &self,
        text: &str,
        out: &mut Vec<u32>,
        on_missing: &mut dyn FnMut(u8) -> Option<u32>,
    ) {
        for w in self.pre_tokenize(text) {
            self.encode_word(w, out, on_missing);
        }
    }

    fn encode_with(&self, text: &str, on_missing: &mut dyn FnMut(u8) -> Option<u32>) -> Vec<u32> {
        let mut out = Vec::new();
        let mut pos = 0;
        while pos < text.len() {
            match self.next_special(text, pos) {
                Some((at, s, id)) => {
                    self.encode_ordinary(&text[pos..at], &mut out, on_missing);
                    out.push(id);
                    pos = at + s.len();
                }
                None => {
                    self.encode_ordinary(&text[pos..], &mut out, on_missing);
                    break;
                }
            }
        }
        out
    }

    /// Encodes `text`, or names the first byte the vocabulary cannot express
    /// (see the module doc); `Ok` results decode back to `text` exactly.
    pub fn try_encode(&self, text: &str) -> Result<Vec<u32>, UnrepresentableByte> {
        let mut first = None;
        let ids = self.encode_with(text, &mut |b| {
            first.get_or_insert(b);
            None
        });
        match first {
            None => Ok(ids),
            Some(byte) => Err(UnrepresentableByte { byte }),
        }
    }

    /// Whether every byte of `text` has a token.
    pub fn can_encode(&self, text: &str) -> bool {
        text.bytes().all(|b| self.byte_token[b as usize].is_some())
    }

    /// The earliest (then longest) special token in `text[from..]`.
    fn next_special(&self, text: &str, from: usize) -> Option<(usize, &str, u32)> {
        let mut best: Option<(usize, &str, u32)> = None;
        for (s, id) in &self.specials {
            if let Some(pos) = text[from..].find(s.as_str()) {
                let pos = from + pos;
                // `specials` is longest first, so a tie on position keeps the longer one.
                if best.is_none_or(|(p, _, _)| pos < p) {
                    best = Some((pos, s.as_str(), *id));
                }
            }
        }
        best
    }
}

impl Tokenizer for BpeTokenizer {
    /// Bytes the vocabulary lacks become the unknown token (dropped only
    /// when the file names none); see [`BpeTokenizer::try_encode`].
    fn encode(&self, text: &str) -> Vec<u32> {
        let unk = self.unknown;
        self.encode_with(text, &mut |_| unk)
    }

    fn decode(&self, tokens: &[u32]) -> String {
        let mut bytes = Vec::new();
        for &t in tokens {
            match self.token_bytes.get(t as usize) {
                Some(b) => bytes.extend_from_slice(b),
                None => bytes.extend_from_slice("\u{fffd}".as_bytes()),
            }
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    fn bos(&self) -> Option<u32> {
        self.bos
    }
    fn eos(&self) -> Option<u32> {
        self.eos
    }
    fn vocab_size(&self) -> usize {
        self.token_bytes.len()
    }
}

#[cfg(test)]
mod tests;
