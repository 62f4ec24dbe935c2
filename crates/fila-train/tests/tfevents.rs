//! The TensorBoard event-file reader of the tests (`common/tfevents.rs`) against known answers,
//! hand-framed records, corruption, and the files tensorboard-rs writes.

mod common;

use common::tfevents::*;

#[test]
fn crc32c_known_answers() {
    // The standard check value of CRC-32C (RFC 3720 / iSCSI).
    assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    assert_eq!(crc32c(b""), 0);
    // 32 zero bytes, RFC 3720 B.4.
    assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
    // ((crc >> 15) | (crc << 17)) + 0xa282ead8, wrapping.
    assert_eq!(masked_crc32c(b"123456789"), 0xC78A_B0E5);
}

/// Frames payloads the way TFRecord does (independently of `records`).
fn frame(payloads: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for p in payloads {
        let len = (p.len() as u64).to_le_bytes();
        out.extend_from_slice(&len);
        out.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
        out.extend_from_slice(p);
        out.extend_from_slice(&masked_crc32c(p).to_le_bytes());
    }
    out
}

/// A scalar event encoded by hand: wall_time 1.5, the step, summary { value { tag, simple_value } }.
fn scalar_event(tag: &str, step: u8, value: f32) -> Vec<u8> {
    let mut v = vec![0x0a, tag.len() as u8];
    v.extend_from_slice(tag.as_bytes());
    v.push(0x15);
    v.extend_from_slice(&value.to_le_bytes());
    let mut summary = vec![0x0a, v.len() as u8];
    summary.extend_from_slice(&v);
    let mut e = vec![0x09];
    e.extend_from_slice(&1.5f64.to_le_bytes());
    e.extend_from_slice(&[0x10, step]);
    // An unknown varint field (7) is skipped.
    e.extend_from_slice(&[0x38, 0x01]);
    e.extend_from_slice(&[0x2a, summary.len() as u8]);
    e.extend_from_slice(&summary);
    e
}

#[test]
fn decodes_framed_scalar_events() {
    let mut version = vec![0x1a, 13];
    version.extend_from_slice(b"brain.Event:2");
    let (a, b) = (scalar_event("train/loss", 1, 2.25), scalar_event("train/lr", 2, -0.5));
    let data = frame(&[&version, &a, &b]);
    let recs = records(&data).unwrap();
    assert_eq!(recs.len(), 3);
    assert_eq!(recs[1].0, 12 + version.len() + 4);
    let first = decode_event(recs[0].1).unwrap();
    assert_eq!(first.file_version.as_deref(), Some("brain.Event:2"));
    let e = decode_event(recs[2].1).unwrap();
    assert_eq!((e.wall_time, e.step), (1.5, 2));
    assert_eq!(e.values, vec![("train/lr".to_string(), Some(-0.5))]);
}

#[test]
fn corrupted_records_are_errors_naming_the_offset() {
    let a = scalar_event("a", 1, 1.0);
    let data = frame(&[&a, &a]);
    let second = 12 + a.len() + 4;
    // A flipped payload bit in the second record.
    let mut bad = data.clone();
    bad[second + 12 + 3] ^= 0x10;
    let e = format!("{:#}", records(&bad).unwrap_err());
    assert!(e.contains(&format!("byte {second}")) && e.contains("payload CRC"), "{e}");
    // A flipped length bit.
    let mut bad = data.clone();
    bad[second] ^= 0x01;
    let e = format!("{:#}", records(&bad).unwrap_err());
    assert!(e.contains(&format!("byte {second}")) && e.contains("length CRC"), "{e}");
    // Cut short.
    let e = format!("{:#}", records(&data[..data.len() - 1]).unwrap_err());
    assert!(e.contains(&format!("byte {second}")) && e.contains("truncated"), "{e}");
    // The file name and the record reach the message.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("events.out.tfevents.0.test");
    std::fs::write(&file, &bad).unwrap();
    let e = format!("{:#}", read_scalars(dir.path()).unwrap_err());
    assert!(e.contains("events.out.tfevents.0.test") && e.contains(&format!("byte {second}")), "{e}");
}

#[test]
fn malformed_protobuf_is_an_error() {
    let mut e = scalar_event("train/loss", 1, 2.0);
    e.truncate(e.len() - 2);
    let err = format!("{:#}", decode_event(&e).unwrap_err());
    assert!(err.contains("bytes needed"), "{err}");
}

#[test]
fn reads_what_tensorboard_rs_writes() {
    let dir = tempfile::tempdir().unwrap();
    fila_train::logging::write_scalars(dir.path(), 3, &[("eval/acc".to_string(), 0.75), ("eval/loss".to_string(), 1.25)]);
    let s = read_scalars(dir.path()).unwrap();
    assert_eq!(s["eval/acc"], vec![(3, 0.75)]);
    assert_eq!(s["eval/loss"], vec![(3, 1.25)]);
    let files = event_files(dir.path()).unwrap();
    assert_eq!(read_events(&files[0]).unwrap()[0].file_version.as_deref(), Some("brain.Event:2"));
}
