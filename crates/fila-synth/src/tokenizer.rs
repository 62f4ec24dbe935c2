//! The synthetic dataset's tokenizer: byte-level BPE (GPT-2 byte alphabet, so any text encodes),
//! Llama-3-style special tokens, and merges learned here from the dataset's templates only, so
//! the vocabulary is the same for every seed and every split size.
//!
//! Merges only join lowercase letters, spaces and newlines: codes (capitals and digits) and counts
//! stay one token per character, which is what reading a glyph should predict.

use std::collections::BTreeMap;

use serde_json::json;
use tokenizers::Tokenizer;

/// Special tokens and their ids (0-6); `<pad>` is 0, the `[data]` default `pad_token_id`.
pub const SPECIAL_TOKENS: [&str; 7] = ["<pad>", "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<image>"];

/// Llama-3's split rule with single digits (`\p{N}` instead of `\p{N}{1,3}`), without the
/// English contractions the templates never use.
const SPLIT_REGEX: &str = r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// GPT-2's `bytes_to_unicode`: printable bytes map to themselves, the rest to U+0100 onwards.
fn byte_chars() -> [char; 256] {
    let mut out = ['\0'; 256];
    let mut extra = 0u32;
    for b in 0..=255u32 {
        let printable = (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        out[b as usize] = if printable {
            char::from_u32(b).unwrap()
        } else {
            extra += 1;
            char::from_u32(255 + extra).unwrap()
        };
    }
    out
}

/// Symbols a merge may join: lowercase letters, `Ġ` (space) and `Ċ` (newline).
fn mergeable(symbol: &str) -> bool {
    symbol.chars().all(|c| c.is_ascii_lowercase() || c == 'Ġ' || c == 'Ċ')
}

/// Greedy BPE on `words` (byte-level strings with counts): the most frequent adjacent pair
/// first, ties by the smaller pair, until no mergeable pair is left. Deterministic.
fn learn_merges(words: &BTreeMap<String, u64>) -> Vec<(String, String)> {
    let mut split: Vec<(Vec<String>, u64)> = words.iter().map(|(w, &n)| (w.chars().map(String::from).collect(), n)).collect();
    let mut merges = vec![];
    loop {
        let mut pairs: BTreeMap<(&str, &str), u64> = BTreeMap::new();
        for (symbols, n) in &split {
            for p in symbols.windows(2) {
                if mergeable(&p[0]) && mergeable(&p[1]) {
                    *pairs.entry((p[0].as_str(), p[1].as_str())).or_default() += n;
                }
            }
        }
        let mut best: Option<((&str, &str), u64)> = None;
        for (pair, n) in pairs {
            if best.is_none_or(|(_, m)| n > m) {
                best = Some((pair, n));
            }
        }
        let Some(((a, b), _)) = best else { break };
        let (a, b) = (a.to_string(), b.to_string());
        let joined = format!("{a}{b}");
        for (symbols, _) in &mut split {
            let mut i = 0;
            while i + 1 < symbols.len() {
                if symbols[i] == a && symbols[i + 1] == b {
                    symbols[i] = joined.clone();
                    symbols.remove(i + 1);
                }
                i += 1;
            }
        }
        merges.push((a, b));
    }
    merges
}

/// Byte-level words of `text` for merge learning: letter runs with their leading space, and
/// newline runs (what [`SPLIT_REGEX`] makes of the templates' ASCII text; other pieces never merge).
fn corpus_words(text: &str, map: &[char; 256], words: &mut BTreeMap<String, u64>) {
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let start = i;
        if bytes[i] == b'\n' {
            while i < bytes.len() && bytes[i] == b'\n' {
                i += 1;
            }
        } else {
            if bytes[i] == b' ' && i + 1 < bytes.len() && bytes[i + 1].is_ascii_alphabetic() {
                i += 1;
            }
            if !bytes[i].is_ascii_alphabetic() {
                i += 1;
                continue;
            }
            while i < bytes.len() && bytes[i].is_ascii_alphabetic() {
                i += 1;
            }
        }
        let word: String = bytes[start..i].iter().map(|&b| map[b as usize]).collect();
        *words.entry(word).or_default() += 1;
    }
}

/// The tokenizer for `texts` (every template piece the dataset and the chat template write).
pub fn build(texts: &[String]) -> tokenizers::Result<Tokenizer> {
    let map = byte_chars();
    let mut words = BTreeMap::new();
    for t in texts {
        corpus_words(t, &map, &mut words);
    }
    let merges = learn_merges(&words);

    let mut vocab = serde_json::Map::new();
    let mut next = 0u32;
    for s in SPECIAL_TOKENS.iter().map(|s| s.to_string()).chain(map.iter().map(|c| c.to_string())) {
        vocab.insert(s, json!(next));
        next += 1;
    }
    for (a, b) in &merges {
        vocab.insert(format!("{a}{b}"), json!(next));
        next += 1;
    }
    let added: Vec<_> = SPECIAL_TOKENS
        .iter()
        .enumerate()
        .map(|(id, s)| {
            json!({"id": id, "content": s, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let doc = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": SPLIT_REGEX}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}
        ]},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": vocab,
                  "merges": merges.iter().map(|(a, b)| json!([a, b])).collect::<Vec<_>>()}
    });
    doc.to_string().parse::<Tokenizer>()
}
