//! Tokenizer parity with Python, and label masks token by token for both templates.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use fila_data::records::{Record, Role, Turn};
use fila_data::text::{TextEncoder, IGNORE_INDEX};
use fila_data::{BadReason, TemplateKind};

#[test]
fn rust_tokenizer_gives_python_ids() {
    let cases: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(common::fixtures().join("tokenizer_cases.json")).unwrap()).unwrap();
    let tok = tokenizers::Tokenizer::from_file(common::tokenizer_path()).unwrap();
    for case in cases["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        assert_eq!(tok.encode(text, false).unwrap().get_ids(), want.as_slice(), "{text:?}");
    }
    for (name, id) in cases["special"].as_object().unwrap() {
        assert_eq!(tok.token_to_id(name), Some(id.as_u64().unwrap() as u32), "{name}");
    }
}

fn encoder(template: &str, max_len: usize) -> TextEncoder {
    let cfg = common::config(Path::new("/x"), &format!("template = \"{template}\"\nmax_len = {max_len}"));
    TextEncoder::from_config(&cfg).unwrap()
}

fn rec(images: usize, turns: &[(Role, &str)]) -> Record {
    Record {
        id: "r1".into(),
        images: (0..images).map(|i| format!("{i}.png")).collect(),
        turns: turns.iter().map(|(r, t)| Turn { role: *r, text: t.to_string() }).collect(),
        source: 0,
        file: Arc::new(PathBuf::from("data.jsonl")),
        line: 1,
        image_folder: Arc::new(PathBuf::from("/x")),
    }
}

// Ids of the fixture tokenizer's special tokens (tests/fixtures/tokenizer_cases.json).
const BOS: i64 = 644;
const END: i64 = 645;
const SH: i64 = 646;
const EH: i64 = 647;
const EOT: i64 = 648;
const IMG: i64 = 649;

/// Expected sequence built piece by piece: (ids, supervised).
struct Expect<'a> {
    enc: &'a TextEncoder,
    ids: Vec<i64>,
    labels: Vec<i64>,
}

impl<'a> Expect<'a> {
    fn new(enc: &'a TextEncoder) -> Self {
        Self { enc, ids: vec![], labels: vec![] }
    }
    fn id(&mut self, id: i64, sup: bool) -> &mut Self {
        self.ids.push(id);
        self.labels.push(if sup { id } else { IGNORE_INDEX });
        self
    }
    fn text(&mut self, t: &str, sup: bool) -> &mut Self {
        let ids = self.enc.tokenizer.encode(t, false).unwrap().get_ids().to_vec();
        assert!(!ids.is_empty());
        for i in ids {
            self.id(i as i64, sup);
        }
        self
    }
    fn header(&mut self, role: &str) -> &mut Self {
        self.id(SH, false).text(role, false).id(EH, false).text("\n\n", false)
    }
    fn image(&mut self, n: usize) -> &mut Self {
        for _ in 0..n {
            self.id(IMG, false);
        }
        self
    }
}

#[test]
fn plain_template_supervises_caption_and_end_only() {
    let enc = encoder("plain", 256);
    assert_eq!(enc.template, TemplateKind::Plain);
    let r = rec(1, &[(Role::User, "<image>\nDescribe it."), (Role::Assistant, "A cat sits on a red sofa.")]);
    let got = enc.encode(&r, &[4]).unwrap();
    let mut want = Expect::new(&enc);
    want.id(BOS, false).image(4).text("A cat sits on a red sofa.", true).id(END, true);
    assert_eq!(got.input_ids, want.ids);
    assert_eq!(got.labels, want.labels);
    assert_eq!(got.visual_spans, vec![1..5]);
    // The five leading positions (BOS + 4 visual) are the only masked ones.
    assert_eq!(got.labels.iter().take_while(|&&l| l == IGNORE_INDEX).count(), 5);
    assert!(got.labels[5..].iter().all(|&l| l != IGNORE_INDEX));
}

fn conversation() -> Record {
    rec(
        1,
        &[
            (Role::User, "<image>\nWhat is in the image?"),
            (Role::Assistant, "Two people walking along a beach."),
            (Role::User, "How many apples are on the table?"),
            (Role::Assistant, "There are three green apples."),
        ],
    )
}

fn llama3_expected(enc: &TextEncoder) -> Expect<'_> {
    let mut e = Expect::new(enc);
    e.id(BOS, false);
    e.header("user").image(6).text("\nWhat is in the image?", false).id(EOT, false);
    e.header("assistant").text("Two people walking along a beach.", true).id(EOT, true);
    e.header("user").text("How many apples are on the table?", false).id(EOT, false);
    e.header("assistant").text("There are three green apples.", true).id(EOT, true);
    e
}

#[test]
fn llama3_multi_turn_masks_token_by_token() {
    let enc = encoder("llama3", 256);
    let got = enc.encode(&conversation(), &[6]).unwrap();
    let want = llama3_expected(&enc);
    assert_eq!(got.input_ids, want.ids);
    for (pos, (g, w)) in got.labels.iter().zip(&want.labels).enumerate() {
        assert_eq!(g, w, "label at position {pos}");
    }
    assert!(!got.truncated);
    // Supervised = the two answers and their two <|eot_id|>; every header stays masked.
    let answers =
        ["Two people walking along a beach.", "There are three green apples."].iter().map(|t| enc.tokenizer.encode(*t, false).unwrap().len()).sum::<usize>();
    assert_eq!(got.labels.iter().filter(|&&l| l != IGNORE_INDEX).count(), answers + 2);
    assert_eq!(got.labels.iter().filter(|&&l| l == EOT).count(), 2);
    assert_eq!(got.input_ids.iter().filter(|&&i| i == EOT).count(), 4);
}

#[test]
fn truncation_keeps_the_prefix_and_its_mask() {
    let big = encoder("llama3", 256);
    let full = llama3_expected(&big);
    // Cut in the middle of the second answer.
    let cut = full.ids.len() - 4;
    let enc = encoder("llama3", cut);
    let got = enc.encode(&conversation(), &[6]).unwrap();
    assert!(got.truncated);
    assert_eq!(got.input_ids, full.ids[..cut]);
    assert_eq!(got.labels, full.labels[..cut]);
}

#[test]
fn truncation_never_cuts_visual_tokens() {
    // Cutting anywhere inside (or just before) the 6 visual tokens must skip the record, never
    // shorten or drop the image.
    let enc = encoder("llama3", 256);
    let full = enc.encode(&conversation(), &[6]).unwrap();
    let span = full.visual_spans[0].clone();
    // BOS, <|start_header_id|>, "user" (3 tokens here), <|end_header_id|>, "\n\n" (2 tokens).
    assert_eq!(span.start, 8);
    for max_len in span.start..span.end {
        let (reason, detail) = encoder("llama3", max_len).encode(&conversation(), &[6]).unwrap_err();
        assert_eq!(reason, BadReason::TooLong, "max_len {max_len}");
        assert!(detail.contains("visual tokens"), "{detail}");
    }
    // Visual tokens fit but no answer does: also skipped, there would be no loss.
    let after_user = full.labels.iter().position(|&l| l != IGNORE_INDEX).unwrap();
    let err = encoder("llama3", after_user).encode(&conversation(), &[6]).unwrap_err();
    assert_eq!(err.0, BadReason::TooLong);
    assert!(err.1.contains("no supervised token"), "{}", err.1);
}

#[test]
fn system_prompt_and_text_only_records() {
    let cfg = common::config(Path::new("/x"), "template = \"llama3\"\nsystem_prompt = \"Be brief.\"");
    let enc = TextEncoder::from_config(&cfg).unwrap();
    let r = rec(0, &[(Role::User, "Hello world!"), (Role::Assistant, "Hi.")]);
    let got = enc.encode(&r, &[]).unwrap();
    let mut want = Expect::new(&enc);
    want.id(BOS, false).header("system").text("Be brief.", false).id(EOT, false);
    want.header("user").text("Hello world!", false).id(EOT, false);
    want.header("assistant").text("Hi.", true).id(EOT, true);
    assert_eq!(got.input_ids, want.ids);
    assert_eq!(got.labels, want.labels);
    assert!(got.visual_spans.is_empty());
}

#[test]
fn two_images_in_one_turn_get_their_own_token_counts() {
    let enc = encoder("llama3", 256);
    let r = rec(2, &[(Role::User, "<image> and <image>: same?"), (Role::Assistant, "No.")]);
    let got = enc.encode(&r, &[4, 12]).unwrap();
    assert_eq!(got.visual_spans.iter().map(|s| s.len()).collect::<Vec<_>>(), vec![4, 12]);
    assert_eq!(got.input_ids.iter().filter(|&&i| i == IMG).count(), 16);
}

#[test]
fn inference_prompt_is_the_training_sequence_up_to_the_answer() {
    let enc = encoder("llama3", 4096);
    let question = "<image>\nWhat is the code?";
    let prompt = enc.encode_prompt(question, &[3]).unwrap();
    let full = enc.encode(&rec(1, &[(Role::User, question), (Role::Assistant, "K7Q")]), &[3]).unwrap();
    let n = prompt.input_ids.len();
    assert_eq!(prompt.input_ids[..], full.input_ids[..n]);
    assert_eq!(prompt.visual_spans, full.visual_spans);
    // The answer starts right after the prompt: its first token is the first supervised one.
    let first_supervised = full.labels.iter().position(|&l| l != IGNORE_INDEX).unwrap();
    assert_eq!(first_supervised, n);
    assert!(prompt.labels.iter().all(|&l| l == IGNORE_INDEX));
    let last_header = prompt.input_ids.iter().rposition(|&i| i == SH).unwrap();
    let role: String = prompt.input_ids[last_header + 1..].iter().take_while(|&&i| i != EH).map(|&i| enc.piece(i)).collect();
    assert_eq!(role, "assistant");
    let err = enc.encode_prompt("no marker", &[3]).unwrap_err();
    assert_eq!(err.0, BadReason::ImageTokenMismatch);
    assert!(err.1.contains("0 `<image>` marker(s) in the prompt for 1 image(s)"), "{}", err.1);
}
