//! One test per kind of bad input: each is skipped and counted by reason, or, with
//! `on_bad_record = "error"`, stops with an error naming the record.

mod common;

use std::path::Path;

use common::{record, write_image, write_jsonl};
use fila_data::{check, BadReason, DataError, Pipeline, RecordSet};

fn q(text: &str) -> (&'static str, String) {
    ("human", text.to_string())
}

/// Processes the dataset in `dir` and returns the single record's bad reason and detail.
fn reason_of(dir: &Path, extra: &str) -> (BadReason, String) {
    let cfg = common::config(dir, extra);
    let records = RecordSet::load(&cfg).unwrap();
    let pipeline = Pipeline::new(cfg).unwrap();
    assert_eq!(records.records.len(), 1);
    let bad = pipeline.process(&records.records[0]).unwrap_err();
    assert_eq!(bad.record_id, "r");
    (bad.reason, bad.detail)
}

fn one(dir: &Path, image: Option<&str>, human: &str) {
    let (_, h) = q(human);
    write_jsonl(dir, &[record("r", image, &[("human", &h), ("gpt", "A cat.")])]);
}

#[test]
fn missing_image() {
    let d = tempfile::tempdir().unwrap();
    one(d.path(), Some("nope.png"), "<image>\nWhat?");
    assert_eq!(reason_of(d.path(), "").0, BadReason::MissingImage);
}

#[test]
fn corrupt_image() {
    let d = tempfile::tempdir().unwrap();
    one(d.path(), Some("bad.png"), "<image>\nWhat?");
    std::fs::write(d.path().join("images/bad.png"), b"\x89PNG\r\n\x1a\nthis is not a png").unwrap();
    assert_eq!(reason_of(d.path(), "").0, BadReason::CorruptImage);
}

#[test]
fn truncated_png_and_jpeg() {
    for ext in ["png", "jpg"] {
        let d = tempfile::tempdir().unwrap();
        let name = format!("cut.{ext}");
        one(d.path(), Some(&name), "<image>\nWhat?");
        write_image(d.path(), &name, 64, 48);
        let path = d.path().join("images").join(&name);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() * 2 / 3]).unwrap();
        let (reason, detail) = reason_of(d.path(), "");
        assert_eq!(reason, BadReason::CorruptImage, "{ext}: {detail}");
    }
}

#[test]
fn image_paths_cannot_escape_the_folder() {
    let d = tempfile::tempdir().unwrap();
    let outside = d.path().join("secret.png");
    common::pattern(8, 8, 1).save(&outside).unwrap();
    for path in ["../secret.png", outside.to_str().unwrap(), "sub/../../secret.png"] {
        one(d.path(), Some(path), "<image>\nWhat?");
        assert_eq!(reason_of(d.path(), "").0, BadReason::ImagePathEscapes, "{path}");
    }
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink(&outside, d.path().join("images/link.png")).unwrap();
        one(d.path(), Some("link.png"), "<image>\nWhat?");
        let (reason, detail) = reason_of(d.path(), "");
        assert_eq!(reason, BadReason::ImagePathEscapes, "{detail}");
        // A symlink that stays inside the folder is fine.
        write_image(d.path(), "real.png", 8, 8);
        std::os::unix::fs::symlink(d.path().join("images/real.png"), d.path().join("images/inside.png")).unwrap();
        one(d.path(), Some("inside.png"), "<image>\nWhat?");
        let cfg = common::config(d.path(), "");
        let records = RecordSet::load(&cfg).unwrap();
        assert!(Pipeline::new(cfg).unwrap().process(&records.records[0]).is_ok());
    }
}

#[test]
fn image_over_the_pixel_limit() {
    let d = tempfile::tempdir().unwrap();
    one(d.path(), Some("big.png"), "<image>\nWhat?");
    write_image(d.path(), "big.png", 40, 30);
    let (reason, detail) = reason_of(d.path(), "max_image_pixels = 1199");
    assert_eq!(reason, BadReason::ImageTooLarge);
    assert!(detail.contains("1200 pixels"), "{detail}");
}

#[test]
fn malformed_json_line_reports_its_line_number() {
    let d = tempfile::tempdir().unwrap();
    let good = record("ok", None, &[("human", "Hi"), ("gpt", "Hello")]);
    write_jsonl(d.path(), &[good.clone(), "{\"id\": \"x\", \"conversations\": [".into(), good.clone(), "{\"id\": 3}".into()]);
    let cfg = common::config(d.path(), "");
    let records = RecordSet::load(&cfg).unwrap();
    assert_eq!(records.records.len(), 2);
    assert_eq!(records.records[1].line, 3);
    let bad = &records.load_bad.by_reason[&BadReason::MalformedJson];
    assert_eq!(bad.count, 2);
    assert!(bad.examples[0].starts_with("line 2 ("), "{}", bad.examples[0]);
    assert!(bad.examples[0].contains("data.jsonl:2"), "{}", bad.examples[0]);
    assert!(bad.examples[1].contains("data.jsonl:4"), "{}", bad.examples[1]);
    // With on_bad_record = "error" the load stops and names the line.
    let cfg = common::config(d.path(), "on_bad_record = \"error\"");
    let err = RecordSet::load(&cfg).unwrap_err().to_string();
    assert!(err.contains("data.jsonl:2") && err.contains("malformed_json"), "{err}");
}

#[test]
fn record_without_an_assistant_turn() {
    let d = tempfile::tempdir().unwrap();
    write_jsonl(d.path(), &[record("r", None, &[("human", "Anyone there?")])]);
    assert_eq!(reason_of(d.path(), "").0, BadReason::NoAssistantTurn);
}

#[test]
fn image_marker_count_must_match_the_images() {
    let d = tempfile::tempdir().unwrap();
    write_image(d.path(), "a.png", 8, 8);
    // An image but no marker.
    one(d.path(), Some("a.png"), "What?");
    assert_eq!(reason_of(d.path(), "").0, BadReason::ImageTokenMismatch);
    // A marker but no image.
    one(d.path(), None, "<image>\nWhat?");
    assert_eq!(reason_of(d.path(), "").0, BadReason::ImageTokenMismatch);
    // Two markers, one image.
    one(d.path(), Some("a.png"), "<image> <image>");
    let (reason, detail) = reason_of(d.path(), "");
    assert_eq!(reason, BadReason::ImageTokenMismatch);
    assert!(detail.contains("2 `<image>` marker(s) for 1 image(s)"), "{detail}");
}

#[test]
fn check_counts_every_reason_with_examples() {
    let d = tempfile::tempdir().unwrap();
    write_image(d.path(), "ok.png", 50, 30);
    write_image(d.path(), "big.png", 60, 60);
    let lines = vec![
        record("good1", Some("ok.png"), &[("human", "<image>\nWhat?"), ("gpt", "A cat.")]),
        record("good2", None, &[("human", "Hi"), ("gpt", "Hello there.")]),
        record("miss1", Some("gone.png"), &[("human", "<image>"), ("gpt", "x")]),
        record("miss2", Some("gone2.png"), &[("human", "<image>"), ("gpt", "x")]),
        record("esc", Some("../x.png"), &[("human", "<image>"), ("gpt", "x")]),
        record("big", Some("big.png"), &[("human", "<image>"), ("gpt", "x")]),
        record("noans", None, &[("human", "Hi")]),
        record("count", Some("ok.png"), &[("human", "no marker"), ("gpt", "x")]),
        "not json".into(),
    ];
    write_jsonl(d.path(), &lines);
    let cfg = common::config(d.path(), "max_image_pixels = 2000\ntemplate = \"llama3\"\nimage_mode = \"tiled\"");
    let records = RecordSet::load(&cfg).unwrap();
    let pipeline = Pipeline::new(cfg).unwrap();
    let report = check(&pipeline, &records);
    assert_eq!(report.records, 9);
    assert_eq!(report.good, 2);
    let counts = report.bad.counts();
    let expect =
        [("malformed_json", 1), ("missing_image", 2), ("image_path_escapes", 1), ("image_too_large", 1), ("no_assistant_turn", 1), ("image_token_mismatch", 1)];
    assert_eq!(counts, expect.into_iter().collect());
    let miss = &report.bad.by_reason[&BadReason::MissingImage].examples;
    assert!(miss[0].starts_with("miss1 ") && miss[1].starts_with("miss2 "), "{miss:?}");
    // 50x30 on tiny canvases: 2x2 (56x56) wins, its effective area 1500 beats 2x1's 46x28.
    assert_eq!(report.canvases.get(&(2, 2)), Some(&1));
    let text = report.to_string();
    assert!(text.contains("missing_image: 2") && text.contains("tokens:  min"), "{text}");
}

#[test]
fn on_bad_record_error_names_the_record() {
    let d = tempfile::tempdir().unwrap();
    one(d.path(), Some("gone.png"), "<image>\nWhat?");
    let cfg = common::config(d.path(), "on_bad_record = \"error\"");
    let records = RecordSet::load(&cfg).unwrap();
    let pipeline = Pipeline::new(cfg).unwrap();
    let err = pipeline.process_or_skip(&records.records[0]).unwrap_err();
    assert!(matches!(err, DataError::BadRecord(_)));
    let msg = err.to_string();
    assert!(msg.contains("missing_image") && msg.contains(" r at ") && msg.contains("data.jsonl:1"), "{msg}");
    assert!(msg.contains("hint"), "{msg}");
}
