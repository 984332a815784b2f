//! llama2.c's `tokenizer.bin` and the exact `encode`/`decode` of its `run.c`.
//!
//! File layout (little-endian):
//! ```text
//!   i32 max_token_length
//!   vocab_size times: f32 score | i32 len | len bytes (the token's text, no NUL)
//! ```
//! The file does not store `vocab_size`; run.c reads as many entries as the
//! model's header says. [`Llama2cTokenizer::load`] reads entries to the end of
//! the file, and [`Llama2cTokenizer::load_with_vocab`] reads exactly `n` and
//! rejects a short file (the CLI passes the model's vocabulary size).
//!
//! `encode` is run.c's (SentencePiece-like) algorithm, step for step:
//! 1. a dummy-prefix token `" "` when the text is non-empty;
//! 2. each UTF-8 code point (at most 4 bytes) looked up whole, else one
//!    byte-fallback token per byte, id = byte + 3 (after `<unk>`, `<s>`, `</s>`);
//! 3. repeatedly merge the adjacent pair whose concatenation is in the vocabulary
//!    with the highest score (strictly greater wins, so the leftmost of equal
//!    scores), until no pair merges.
//!
//! `decode` follows run.c's `decode(prev, token)`: after BOS (id 1) a leading
//! space is stripped, and a piece `<0xXX>` is the raw byte XX. Unlike run.c's
//! `safe_printf` (which drops every non-printable single byte, including UTF-8
//! continuation bytes), bytes are kept and joined, so multi-byte characters
//! encoded by byte fallback decode back to themselves.

use std::collections::HashMap;
use std::path::Path;

use super::Tokenizer;
use crate::{ModelsError, Result};

/// A llama2.c BPE vocabulary.
#[derive(Debug, Clone)]
pub struct Llama2cTokenizer {
    vocab: Vec<Vec<u8>>,
    scores: Vec<f32>,
    /// Text -> first id with that text (run.c's bsearch over a sorted copy
    /// finds *an* equal entry; vocabularies in practice have no duplicates).
    lookup: HashMap<Vec<u8>, u32>,
    pub max_token_length: usize,
}

pub const BOS: u32 = 1;
pub const EOS: u32 = 2;

impl Llama2cTokenizer {
    /// Read every entry up to the end of the file.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = read(path)?;
        Self::parse(path, &bytes, None)
    }

    /// Read exactly `vocab_size` entries (run.c's behaviour); a short file is an error.
    pub fn load_with_vocab(path: impl AsRef<Path>, vocab_size: usize) -> Result<Self> {
        let path = path.as_ref();
        let bytes = read(path)?;
        Self::parse(path, &bytes, Some(vocab_size))
    }

    /// Parse a tokenizer held in memory (`path` names it in errors).
    pub fn parse(path: &Path, bytes: &[u8], vocab_size: Option<usize>) -> Result<Self> {
        let len = bytes.len() as u64;
        let trunc = |what: String, start: usize, end: usize| ModelsError::Truncated {
            path: path.to_path_buf(),
            what,
            start: start as u64,
            end: end as u64,
            len,
        };
        if bytes.len() < 4 {
            return Err(trunc("max_token_length".into(), 0, 4));
        }
        let mtl = i32::from_le_bytes(bytes[0..4].try_into().expect("4 bytes"));
        if mtl <= 0 {
            return Err(ModelsError::Field {
                path: path.to_path_buf(),
                field: "max_token_length".into(),
                reason: format!("{mtl} is not positive"),
            });
        }
        let mut vocab = Vec::new();
        let mut scores = Vec::new();
        let mut at = 4usize;
        loop {
            let i = vocab.len();
            match vocab_size {
                Some(n) if i == n => break,
                None if at == bytes.len() => break,
                _ => {}
            }
            if at + 8 > bytes.len() {
                return Err(trunc(format!("token {i} (score, length)"), at, at + 8));
            }
            let score = f32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
            let n = i32::from_le_bytes(bytes[at + 4..at + 8].try_into().expect("4 bytes"));
            if n < 0 || n > mtl {
                return Err(ModelsError::Field {
                    path: path.to_path_buf(),
                    field: format!("token {i} length"),
                    reason: format!("{n} is outside 0..={mtl} (max_token_length)"),
                });
            }
            if !score.is_finite() {
                return Err(ModelsError::Field {
                    path: path.to_path_buf(),
                    field: format!("token {i} score"),
                    reason: format!("{score} is not finite"),
                });
            }
            let start = at + 8;
            let end = start + n as usize;
            if end > bytes.len() {
                return Err(trunc(format!("token {i} text"), start, end));
            }
            vocab.push(bytes[start..end].to_vec());
            scores.push(score);
            at = end;
        }
        if vocab.len() < 3 {
            return Err(ModelsError::Field {
                path: path.to_path_buf(),
                field: "vocab_size".into(),
                reason: format!("{} tokens; need at least <unk>, <s>, </s>", vocab.len()),
            });
        }
        if vocab.len() > u32::MAX as usize {
            return Err(ModelsError::Field {
                path: path.to_path_buf(),
                field: "vocab_size".into(),
                reason: "too many tokens".into(),
            });
        }
        let mut lookup = HashMap::with_capacity(vocab.len());
        for (i, t) in vocab.iter().enumerate() {
            lookup.entry(t.clone()).or_insert(i as u32);
        }
        Ok(Self {
            vocab,
            scores,
            lookup,
            max_token_length: mtl as usize,
        })
    }

    /// The raw bytes of token `id`'s vocabulary entry.
    pub fn piece(&self, id: u32) -> Option<&[u8]> {
        self.vocab.get(id as usize).map(|v| v.as_slice())
    }

    pub fn score(&self, id: u32) -> Option<f32> {
        self.scores.get(id as usize).copied()
    }

    /// run.c's `encode(text, bos, eos)`.
    pub fn encode_with(&self, text: &str, bos: bool, eos: bool) -> Vec<u32> {
        self.encode_impl(text, bos, eos, MergeImpl::Heap)
    }

    /// The slow twin of [`Self::encode_with`]: run.c's O(n²) merge loop verbatim.
    pub fn encode_with_slow(&self, text: &str, bos: bool, eos: bool) -> Vec<u32> {
        self.encode_impl(text, bos, eos, MergeImpl::Scan)
    }

    fn encode_impl(&self, text: &str, bos: bool, eos: bool, how: MergeImpl) -> Vec<u32> {
        let mut tokens = Vec::with_capacity(text.len() + 3);
        if bos {
            tokens.push(BOS);
        }
        let bytes = text.as_bytes();
        if !bytes.is_empty() {
            if let Some(&id) = self.lookup.get(&b" "[..]) {
                tokens.push(id);
            }
            // run.c pushes -1 when " " is missing; we skip it (no such vocabulary in use).
        }
        let mut buf: Vec<u8> = Vec::with_capacity(8);
        for (i, &c) in bytes.iter().enumerate() {
            if c & 0xC0 != 0x80 {
                buf.clear();
            }
            buf.push(c);
            let next_is_cont = bytes.get(i + 1).is_some_and(|&n| n & 0xC0 == 0x80);
            if next_is_cont && buf.len() < 4 {
                continue;
            }
            match self.lookup.get(&buf) {
                Some(&id) => tokens.push(id),
                None => tokens.extend(buf.iter().map(|&b| b as u32 + 3)),
            }
            buf.clear();
        }
        let mut tokens = match how {
            MergeImpl::Heap => self.merge_heap(tokens),
            MergeImpl::Scan => self.merge_scan(tokens),
        };
        if eos {
            tokens.push(EOS);
        }
        tokens
    }

    /// run.c's merge loop: scan all adjacent pairs, merge the best-scoring one
    /// (strictly greater than -1e10 and than earlier pairs: the leftmost wins
    /// ties), repeat. O(n²) lookups.
    fn merge_scan(&self, mut tokens: Vec<u32>) -> Vec<u32> {
        let mut pair = Vec::with_capacity(2 * self.max_token_length);
        loop {
            let mut best: Option<(f32, u32, usize)> = None;
            for i in 0..tokens.len().saturating_sub(1) {
                pair.clear();
                pair.extend_from_slice(&self.vocab[tokens[i] as usize]);
                pair.extend_from_slice(&self.vocab[tokens[i + 1] as usize]);
                if let Some(&id) = self.lookup.get(&pair) {
                    let s = self.scores[id as usize];
                    if s > best.map_or(-1e10, |b| b.0) {
                        best = Some((s, id, i));
                    }
                }
            }
            let Some((_, id, i)) = best else { break };
            tokens[i] = id;
            tokens.remove(i + 1);
        }
        tokens
    }

    /// The same merges in O(n log n): symbols in a linked list, candidate pairs
    /// in a max-heap keyed by (score, leftmost first). Merging never reorders
    /// symbols, so "smallest current index" (run.c's tie rule) is "smallest
    /// original position of the left symbol". Stale candidates (a side already
    /// merged) are skipped when popped.
    fn merge_heap(&self, tokens: Vec<u32>) -> Vec<u32> {
        use std::cmp::Ordering;
        use std::collections::BinaryHeap;
        #[derive(PartialEq)]
        struct Cand {
            score: f32,
            left: usize,
            right: usize,
            id: u32,
            // Token ids the candidate was built from (to detect staleness).
            lt: u32,
            rt: u32,
        }
        impl Eq for Cand {}
        impl Ord for Cand {
            fn cmp(&self, o: &Self) -> Ordering {
                self.score.total_cmp(&o.score).then(o.left.cmp(&self.left))
            }
        }
        impl PartialOrd for Cand {
            fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
                Some(self.cmp(o))
            }
        }
        let n = tokens.len();
        let mut tok = tokens;
        let mut alive = vec![true; n];
        let mut next: Vec<usize> = (1..=n).collect();
        let mut prev: Vec<usize> = (0..n).map(|i| i.wrapping_sub(1)).collect();
        let mut heap = BinaryHeap::new();
        let mut pair = Vec::with_capacity(2 * self.max_token_length);
        let mut push = |heap: &mut BinaryHeap<Cand>, tok: &[u32], l: usize, r: usize| {
            pair.clear();
            pair.extend_from_slice(&self.vocab[tok[l] as usize]);
            pair.extend_from_slice(&self.vocab[tok[r] as usize]);
            if let Some(&id) = self.lookup.get(&pair) {
                // + 0.0 maps -0.0 to 0.0: run.c's `>` treats them as equal.
                let score = self.scores[id as usize] + 0.0;
                if score > -1e10 {
                    heap.push(Cand {
                        score,
                        left: l,
                        right: r,
                        id,
                        lt: tok[l],
                        rt: tok[r],
                    });
                }
            }
        };
        for i in 0..n.saturating_sub(1) {
            push(&mut heap, &tok, i, i + 1);
        }
        while let Some(c) = heap.pop() {
            let (l, r) = (c.left, c.right);
            if !alive[l] || !alive[r] || next[l] != r || tok[l] != c.lt || tok[r] != c.rt {
                continue;
            }
            tok[l] = c.id;
            alive[r] = false;
            next[l] = next[r];
            if next[r] < n {
                prev[next[r]] = l;
            }
            if prev[l] < n {
                push(&mut heap, &tok, prev[l], l);
            }
            if next[l] < n {
                push(&mut heap, &tok, l, next[l]);
            }
        }
        (0..n).filter(|&i| alive[i]).map(|i| tok[i]).collect()
    }

    /// run.c's `decode(prev_token, token)`: the bytes this token prints.
    pub fn decode_piece(&self, prev: Option<u32>, token: u32) -> Vec<u8> {
        let Some(mut piece) = self.piece(token) else {
            return Vec::new();
        };
        if prev == Some(BOS) && piece.first() == Some(&b' ') {
            piece = &piece[1..];
        }
        if let Some(b) = parse_byte_piece(piece) {
            return vec![b];
        }
        piece.to_vec()
    }
}

#[derive(Clone, Copy)]
enum MergeImpl {
    Heap,
    Scan,
}

/// `sscanf(piece, "<0x%02hhX>", &b) == 1`: "<0x" then one or two hex digits.
fn parse_byte_piece(p: &[u8]) -> Option<u8> {
    let rest = p.strip_prefix(b"<0x")?;
    let digits: Vec<u8> = rest
        .iter()
        .take(2)
        .take_while(|c| c.is_ascii_hexdigit())
        .copied()
        .collect();
    if digits.is_empty() {
        return None;
    }
    u8::from_str_radix(std::str::from_utf8(&digits).ok()?, 16).ok()
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| ModelsError::Io {
        path: path.to_path_buf(),
        source,
    })
}

impl Tokenizer for Llama2cTokenizer {
    /// run.c's encode without BOS/EOS (the dummy-prefix space is included).
    fn encode(&self, text: &str) -> Vec<u32> {
        self.encode_with(text, false, false)
    }

    /// Joins run.c's pieces as if the sequence followed BOS, so the dummy
    /// prefix is stripped and `decode(encode(s)) == s`.
    fn decode(&self, tokens: &[u32]) -> String {
        let mut out = Vec::new();
        let mut prev = Some(BOS);
        for &t in tokens {
            out.extend(self.decode_piece(prev, t));
            prev = Some(t);
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    fn bos(&self) -> Option<u32> {
        Some(BOS)
    }

    fn eos(&self) -> Option<u32> {
        Some(EOS)
    }

    fn vocab_size(&self) -> usize {
        self.vocab.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A vocabulary in tokenizer.bin form: <unk> <s> </s>, 256 byte tokens, then `extra`.
    fn bin(extra: &[(&str, f32)]) -> Vec<u8> {
        let mut toks: Vec<(Vec<u8>, f32)> = vec![
            (b"<unk>".to_vec(), 0.0),
            (b"<s>".to_vec(), 0.0),
            (b"</s>".to_vec(), 0.0),
        ];
        for b in 0..256 {
            toks.push((format!("<0x{b:02X}>").into_bytes(), 0.0));
        }
        for (t, s) in extra {
            toks.push((t.as_bytes().to_vec(), *s));
        }
        let mut out = 16i32.to_le_bytes().to_vec();
        for (t, s) in toks {
            out.extend_from_slice(&s.to_le_bytes());
            out.extend_from_slice(&(t.len() as i32).to_le_bytes());
            out.extend_from_slice(&t);
        }
        out
    }

    fn tok(extra: &[(&str, f32)]) -> Llama2cTokenizer {
        Llama2cTokenizer::parse(Path::new("t.bin"), &bin(extra), None).unwrap()
    }

    #[test]
    fn merges_best_score_first_and_falls_back_to_bytes() {
        let t = tok(&[
            (" ", -1.0),
            ("a", -1.0),
            ("b", -1.0),
            ("ab", -5.0),
            (" a", -2.0),
            (" ab", -3.0),
        ]);
        let id = |s: &str| t.lookup[s.as_bytes()];
        // " a" (-2) beats "ab" (-5), then " ab" (-3).
        assert_eq!(t.encode("ab"), vec![id(" ab")]);
        // 'é' is not in the vocab: two byte tokens 0xC3+3, 0xA9+3.
        assert_eq!(t.encode("é"), vec![id(" "), 0xC3 + 3, 0xA9 + 3]);
        assert_eq!(t.encode_with("", true, true), vec![BOS, EOS]);
        assert_eq!(t.decode(&t.encode("abé b")), "abé b");
        // After BOS the leading space is stripped; otherwise kept.
        assert_eq!(t.decode_piece(Some(BOS), id(" a")), b"a");
        assert_eq!(t.decode_piece(Some(5), id(" a")), b" a");
    }

    /// The heap merge equals run.c's scan on random text over a small alphabet
    /// (many equal scores, so the tie rule is exercised).
    #[test]
    fn heap_merge_equals_scan() {
        let t = tok(&[
            (" ", -1.0),
            ("a", -1.0),
            ("b", -1.0),
            ("aa", -2.0),
            ("ab", -2.0),
            ("ba", -2.0),
            ("aab", -1.5),
            (" a", -3.0),
            ("abab", -0.5),
            ("bb", -2.0),
            ("bbb", -2.0),
            ("é", -4.0),
        ]);
        // A fixed linear congruential sequence (this crate has no rand dependency).
        let mut state = 1u64;
        let mut next = move |n: usize| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) as usize % n
        };
        let alphabet = ['a', 'b', ' ', 'é', 'z'];
        for len in 0..60 {
            for _ in 0..20 {
                let s: String = (0..len).map(|_| alphabet[next(alphabet.len())]).collect();
                assert_eq!(
                    t.encode_with(&s, true, false),
                    t.encode_with_slow(&s, true, false),
                    "{s:?}"
                );
            }
        }
    }

    #[test]
    fn bad_tokenizer_files() {
        let good = bin(&[]);
        let mut bad_len = good.clone();
        // token 0's length field (bytes 8..12) -> 1000 > max_token_length 16
        bad_len[8..12].copy_from_slice(&1000i32.to_le_bytes());
        let mut neg_len = good.clone();
        neg_len[8..12].copy_from_slice(&(-1i32).to_le_bytes());
        let mut nan_score = good.clone();
        nan_score[4..8].copy_from_slice(&f32::NAN.to_le_bytes());
        let cases: Vec<(&str, Vec<u8>, Option<usize>, &str)> = vec![
            ("empty", vec![], None, "max_token_length"),
            (
                "zero max len",
                0i32.to_le_bytes().to_vec(),
                None,
                "max_token_length",
            ),
            ("cut in text", good[..good.len() - 1].to_vec(), None, "text"),
            (
                "cut in header",
                good[..good.len() - 7].to_vec(),
                None,
                "token",
            ),
            ("too few for vocab", good.clone(), Some(300), "token 259"),
            ("lying length", bad_len, None, "token 0 length"),
            ("negative length", neg_len, None, "token 0 length"),
            ("nan score", nan_score, None, "token 0 score"),
        ];
        for (what, bytes, n, expect) in cases {
            let err = Llama2cTokenizer::parse(Path::new("/x/tok.bin"), &bytes, n)
                .err()
                .unwrap_or_else(|| panic!("{what}: parsed"));
            let msg = err.to_string();
            assert!(msg.contains("/x/tok.bin"), "{what}: {msg}");
            assert!(msg.contains(expect), "{what}: `{msg}` lacks `{expect}`");
        }
    }

    #[test]
    fn stories260k_tokenizer_roundtrips() {
        let Some(p) = crate::assets::require(
            crate::assets::stories260k_tokenizer(),
            "stories260k_tokenizer_roundtrips",
        ) else {
            return;
        };
        let t = Llama2cTokenizer::load_with_vocab(&p, 512).unwrap();
        assert_eq!(t.vocab_size(), 512);
        for s in [
            "Once upon a time",
            "Lily's dog said: \"hi!\"\n",
            "naïve 日本 🦀",
            "",
        ] {
            assert_eq!(t.decode(&t.encode(s)), s, "{s:?}");
        }
        // Heap merge equals run.c's scan on real text.
        let text = std::fs::read_to_string(crate::assets::tinystories_valid()).unwrap_or_default();
        for line in text.lines().take(6) {
            assert_eq!(t.encode(line), t.encode_with_slow(line, false, false));
        }
        // Reading the whole file gives the same 512 entries.
        assert_eq!(Llama2cTokenizer::load(&p).unwrap().vocab_size(), 512);
    }
}
