use super::*;
use proptest::prelude::*;
use std::sync::OnceLock;

#[test]
fn byte_map_is_gpt2s() {
    let m = byte_to_unicode();
    let distinct: std::collections::BTreeSet<char> = m.iter().copied().collect();
    assert_eq!(distinct.len(), 256);
    assert_eq!(m[b' ' as usize], 'Ġ'); // U+0120: space is the 33rd remapped byte
    assert_eq!(m[b'\n' as usize], 'Ċ'); // U+010A
    assert_eq!(m[0], 'Ā'); // U+0100
    assert_eq!(m[b'a' as usize], 'a');
    assert_eq!(m[0xad], 'Ń'); // soft hyphen, the last remapped byte: U+0143
}

/// A toy vocabulary: the 256 byte-chars, then merged tokens, and one special.
fn toy() -> BpeTokenizer {
    let bc = byte_to_unicode();
    let mut tokens: Vec<String> = bc.iter().map(|c| c.to_string()).collect();
    let merges: Vec<String> = ["l l", "h e", "he ll", "hell o", "Ġ w", "Ġw o"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    for m in &merges {
        tokens.push(m.replace(' ', ""));
    }
    tokens.push("<|end|>".into());
    let mut types = vec![TokenType::Normal; tokens.len()];
    *types.last_mut().unwrap() = TokenType::Control;
    BpeTokenizer::new(
        Path::new("toy"),
        &tokens,
        Some(&types),
        &merges,
        PreTokenizer::DigitsThenGpt2,
        None,
        Some(262),
    )
    .unwrap()
}

#[test]
fn toy_merges_by_rank() {
    let t = toy();
    // "hello" -> h e l l o -> (l l) -> (h e) -> (he ll) -> (hell o): one token.
    assert_eq!(t.encode("hello"), [259]);
    // " wo" -> Ġw -> Ġwo (261); "rld" stays bytes.
    // (token i < 256 is byte i's char in this toy vocabulary)
    assert_eq!(
        t.encode(" world"),
        [261, b'r' as u32, b'l' as u32, b'd' as u32]
    );
    assert_eq!(t.decode(&t.encode("hello world")), "hello world");
    // Special token recognized whole, even glued to text.
    let ids = t.encode("hello<|end|>hello");
    assert_eq!(ids, [259, 262, 259]);
    assert_eq!(t.decode(&ids), "hello<|end|>hello");
}

#[test]
fn pre_tokenizer_splits() {
    let t = toy();
    let check = |text: &str, want: &[&str]| assert_eq!(t.pre_tokenize(text), want, "{text:?}");
    check("I'm 42 years", &["I", "'m", " ", "4", "2", " years"]);
    check(
        "Hello,  world!\n\nok",
        &["Hello", ",", " ", " world", "!", "\n", "\n", "ok"],
    );
    check("a   ", &["a", "   "]);
    check("x 3.14", &["x", " ", "3", ".", "1", "4"]);
    check("", &[] as &[&str]);
}

#[test]
fn bad_vocabularies_are_errors() {
    let bc = byte_to_unicode();
    let tokens: Vec<String> = bc
        .iter()
        .filter(|&&c| c != 'a')
        .map(|c| c.to_string())
        .collect();
    let e = BpeTokenizer::new(
        Path::new("v.gguf"),
        &tokens,
        None,
        &[],
        PreTokenizer::Gpt2,
        None,
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("v.gguf") && e.contains("byte 0x61"), "{e}");
    let tokens: Vec<String> = bc.iter().map(|c| c.to_string()).collect();
    let e = BpeTokenizer::new(
        Path::new("v.gguf"),
        &tokens,
        None,
        &["a b".into()],
        PreTokenizer::Gpt2,
        None,
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("merges") && e.contains("merged token"), "{e}");
    let e = BpeTokenizer::new(
        Path::new("v.gguf"),
        &tokens,
        None,
        &[],
        PreTokenizer::Gpt2,
        Some(999),
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("bos_token_id"), "{e}");
}

fn smollm2() -> Option<&'static BpeTokenizer> {
    static T: OnceLock<Option<BpeTokenizer>> = OnceLock::new();
    T.get_or_init(|| {
        crate::assets::require(crate::assets::smollm2_gguf(), "bpe::smollm2")
            .map(|p| BpeTokenizer::open_gguf(p).unwrap())
    })
    .as_ref()
}

#[test]
fn smollm2_known_encodings() {
    let Some(t) = smollm2() else { return };
    assert_eq!(t.vocab_size(), 49152);
    // add_bos_token is false in this file: nothing to prepend.
    assert_eq!(t.bos(), None);
    assert_eq!(t.eos(), Some(2));
    // Each word is one vocabulary entry (ids read from tokenizer.ggml.tokens),
    // and BPE must reach it: "The"=504, "Ġcapital"=3575, "Ġof"=282,
    // "ĠFrance"=4649, "Ġis"=314.
    let ids = t.encode("The capital of France is");
    assert_eq!(ids, [504, 3575, 282, 4649, 314]);
    for (id, text) in ids.iter().zip(["The", "Ġcapital", "Ġof", "ĠFrance", "Ġis"]) {
        assert_eq!(t.token_id(text), Some(*id));
    }
    // " Paris" is a single token.
    assert_eq!(t.encode(" Paris"), [7042]);
    assert_eq!(t.token_text(7042).unwrap(), "ĠParis");
    // Digits are split one by one (smollm pre-tokenizer).
    let d = t.encode("2024");
    assert_eq!(d.len(), 4);
    assert_eq!(t.decode(&d[..1]), "2");
    // Chat-template control tokens are whole tokens.
    let chat = t.encode("<|im_start|>user\nHi<|im_end|>\n");
    assert_eq!(chat[0], 1);
    assert_eq!(chat[chat.len() - 2], 2);
    assert_eq!(t.decode(&chat), "<|im_start|>user\nHi<|im_end|>\n");
    // Bytes the vocabulary lacks (0x04; 0xf1 leads U+40000..): reported by
    // try_encode, written as the unknown token (id 0) by encode.
    for (text, byte) in [("a\u{4}b", 0x04u8), ("x\u{40000}", 0xf1)] {
        assert!(!t.can_encode(text));
        assert_eq!(t.try_encode(text).unwrap_err().byte, byte);
        assert!(t.encode(text).contains(&0));
    }
}

#[test]
fn smollm2_round_trips_wikitext() {
    let Some(t) = smollm2() else { return };
    let Some(p) = crate::assets::require(crate::assets::wikitext2_test(), "bpe::wikitext") else {
        return;
    };
    let text = std::fs::read_to_string(p).unwrap();
    let head: String = text.chars().take(200_000).collect();
    let ids = t.encode(&head);
    assert_eq!(t.decode(&ids), head);
    // Sanity on the compression: English BPE gives ~3-5 bytes per token.
    let ratio = head.len() as f64 / ids.len() as f64;
    assert!((3.0..6.0).contains(&ratio), "{ratio} bytes/token");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    #[test]
    fn toy_round_trip(s in any::<String>()) {
        let t = toy();
        prop_assert_eq!(t.decode(&t.encode(&s)), s);
    }

    /// Arbitrary UTF-8, less the characters containing one of the 21 bytes
    /// SmolLM2's vocabulary lacks (module doc): those cannot round-trip.
    #[test]
    fn smollm2_round_trip(s in any::<String>(), ascii in "[ -~\n\t]{0,64}") {
        if let Some(t) = smollm2() {
            let s: String = s.chars().filter(|c| t.can_encode(c.encode_utf8(&mut [0; 4]))).collect();
            prop_assert_eq!(t.try_encode(&s).map(|ids| t.decode(&ids)), Ok(s.clone()));
            prop_assert_eq!(t.decode(&t.encode(&s)), s.clone());
            prop_assert_eq!(t.decode(&t.encode(&ascii)), ascii.clone());
            for id in t.encode(&ascii) {
                prop_assert!((id as usize) < t.vocab_size());
            }
        }
    }
}
