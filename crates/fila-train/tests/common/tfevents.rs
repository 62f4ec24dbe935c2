//! Reads back TensorBoard event files (`events.out.tfevents.*`) in the tests, without Python or
//! TensorFlow: the TFRecord framing with both masked CRC-32C checks, and the few `Event`/`Summary`
//! protobuf fields that scalars use. Written independently of the writer (tensorboard-rs) so that
//! reading back checks what it wrote; `scripts/read_tensorboard.py` is TensorBoard's own reading.
//! Its own tests are in `tests/tfevents.rs`.

use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One `tensorflow.Event` with just the fields scalars need.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Event {
    pub wall_time: f64,
    pub step: i64,
    /// Set on the first event of a file (`brain.Event:2`).
    pub file_version: Option<String>,
    /// The summary's values: `(tag, simple_value)`; `None` for non-scalar values (images, tensors).
    pub values: Vec<(String, Option<f32>)>,
}

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), bit by bit: event files are small, so
/// clarity beats a table.
pub fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= byte as u32;
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0x82F6_3B78 } else { crc >> 1 };
        }
    }
    !crc
}

/// TFRecord's masking of a stored CRC (so that CRCs of data holding CRCs stay well distributed).
pub fn masked_crc32c(data: &[u8]) -> u32 {
    crc32c(data).rotate_right(15).wrapping_add(0xa282_ead8)
}

/// Splits TFRecord framing into `(offset of the record, payload)`; both CRCs must match and the
/// data must end on a record boundary. Errors name the record's byte offset.
pub fn records(data: &[u8]) -> Result<Vec<(usize, &[u8])>> {
    let mut out = Vec::new();
    let mut at = 0usize;
    while at < data.len() {
        let header = data.get(at..at + 12).with_context(|| format!("record at byte {at}: truncated header ({} of 12 bytes)", data.len() - at))?;
        let len_bytes = &header[..8];
        let stored = u32::from_le_bytes(header[8..12].try_into().unwrap());
        let actual = masked_crc32c(len_bytes);
        if stored != actual {
            bail!("record at byte {at}: length CRC mismatch (stored {stored:#010x}, computed {actual:#010x})");
        }
        let len = u64::from_le_bytes(len_bytes.try_into().unwrap());
        let start = at + 12;
        let left = data.len() - start;
        // The payload and its 4-byte CRC must fit in what is left.
        if len.saturating_add(4) > left as u64 {
            bail!("record at byte {at}: truncated ({len} payload bytes and a 4-byte CRC announced, {left} bytes left)");
        }
        let end = start + len as usize;
        let payload = &data[start..end];
        let stored = u32::from_le_bytes(data[end..end + 4].try_into().unwrap());
        let actual = masked_crc32c(payload);
        if stored != actual {
            bail!("record at byte {at}: payload CRC mismatch (stored {stored:#010x}, computed {actual:#010x})");
        }
        out.push((at, payload));
        at = end + 4;
    }
    Ok(out)
}

/// Every event of one event file, in file order.
pub fn read_events(file: &Path) -> Result<Vec<Event>> {
    let data = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let records = records(&data).with_context(|| format!("{}", file.display()))?;
    records.into_iter().map(|(at, payload)| decode_event(payload).with_context(|| format!("{}: event record at byte {at}", file.display()))).collect()
}

/// The event files of a run folder (not its subfolders, as TensorBoard treats each folder as one
/// run), in name order, which is creation order since names start with the creation time.
pub fn event_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry.with_context(|| format!("reading {}", dir.display()))?.path();
        let is_events = path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.contains("tfevents"));
        if is_events && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Scalars of a run folder: tag → `(step, value)` in the order written, over all its event files.
pub fn read_scalars(dir: &Path) -> Result<BTreeMap<String, Vec<(i64, f32)>>> {
    let files = event_files(dir)?;
    if files.is_empty() {
        bail!("{}: no TensorBoard event files (events.out.tfevents.*)", dir.display());
    }
    let mut scalars: BTreeMap<String, Vec<(i64, f32)>> = BTreeMap::new();
    for file in files {
        for event in read_events(&file)? {
            for (tag, value) in event.values {
                if let Some(v) = value {
                    scalars.entry(tag).or_default().push((event.step, v));
                }
            }
        }
    }
    Ok(scalars)
}

/// Decodes `tensorflow.Event`: wall_time = 1 (double), step = 2 (int64), file_version = 3
/// (string), summary = 5 (message); other fields are skipped.
pub fn decode_event(bytes: &[u8]) -> Result<Event> {
    let mut event = Event::default();
    let mut r = Reader { bytes, at: 0 };
    while let Some((field, wire)) = r.key()? {
        match (field, wire) {
            (1, Wire::Fixed64) => event.wall_time = f64::from_le_bytes(r.take(8)?.try_into().unwrap()),
            // int64 is a two's-complement varint, so the cast restores negative steps.
            (2, Wire::Varint) => event.step = r.varint()? as i64,
            (3, Wire::Len) => event.file_version = Some(r.string()?),
            (5, Wire::Len) => {
                let at = r.at;
                let summary = r.len_delimited()?;
                decode_summary(summary, &mut event.values).with_context(|| format!("summary at byte {at} of the event"))?;
            }
            _ => r.skip(field, wire)?,
        }
    }
    Ok(event)
}

/// `tensorflow.Summary`: repeated value = 1, each with tag = 1 (string) and simple_value = 2
/// (float).
fn decode_summary(bytes: &[u8], values: &mut Vec<(String, Option<f32>)>) -> Result<()> {
    let mut r = Reader { bytes, at: 0 };
    while let Some((field, wire)) = r.key()? {
        if (field, wire) != (1, Wire::Len) {
            r.skip(field, wire)?;
            continue;
        }
        let at = r.at;
        let mut v = Reader { bytes: r.len_delimited()?, at: 0 };
        let (mut tag, mut simple) = (String::new(), None);
        let mut inner = || -> Result<()> {
            while let Some((field, wire)) = v.key()? {
                match (field, wire) {
                    (1, Wire::Len) => tag = v.string()?,
                    (2, Wire::Fixed32) => simple = Some(f32::from_le_bytes(v.take(4)?.try_into().unwrap())),
                    _ => v.skip(field, wire)?,
                }
            }
            Ok(())
        };
        inner().with_context(|| format!("summary value at byte {at}"))?;
        values.push((tag, simple));
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Wire {
    Varint,
    Fixed64,
    Len,
    Fixed32,
}

/// A cursor over protobuf wire format; errors name the byte offset inside the message.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len());
        let end = end.with_context(|| format!("byte {}: {n} bytes needed, {} left", self.at, self.bytes.len() - self.at))?;
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }

    fn varint(&mut self) -> Result<u64> {
        let start = self.at;
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *self.take(1).with_context(|| format!("byte {start}: truncated varint"))?.first().unwrap();
            value |= ((byte & 0x7f) as u64) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        bail!("byte {start}: varint longer than 10 bytes")
    }

    /// The next field's number and wire type, or `None` at the end of the message.
    fn key(&mut self) -> Result<Option<(u64, Wire)>> {
        if self.at == self.bytes.len() {
            return Ok(None);
        }
        let at = self.at;
        let key = self.varint()?;
        let wire = match key & 7 {
            0 => Wire::Varint,
            1 => Wire::Fixed64,
            2 => Wire::Len,
            5 => Wire::Fixed32,
            // Groups (3, 4) are deprecated and never used by TensorBoard's messages.
            w => bail!("byte {at}: field {} has unsupported wire type {w}", key >> 3),
        };
        Ok(Some((key >> 3, wire)))
    }

    fn len_delimited(&mut self) -> Result<&'a [u8]> {
        let len = self.varint()?;
        self.take(usize::try_from(len).unwrap_or(usize::MAX))
    }

    fn string(&mut self) -> Result<String> {
        let at = self.at;
        let bytes = self.len_delimited()?;
        String::from_utf8(bytes.to_vec()).map_err(|_| anyhow::anyhow!("byte {at}: string is not UTF-8"))
    }

    fn skip(&mut self, field: u64, wire: Wire) -> Result<()> {
        let at = self.at;
        let skipped = match wire {
            Wire::Varint => self.varint().map(drop),
            Wire::Fixed64 => self.take(8).map(drop),
            Wire::Len => self.len_delimited().map(drop),
            Wire::Fixed32 => self.take(4).map(drop),
        };
        skipped.with_context(|| format!("skipping field {field} at byte {at}"))
    }
}
