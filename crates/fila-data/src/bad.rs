//! Bad records: why a record was skipped, and the counts by reason that the trainer logs and
//! `fila data check` prints.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Why a record cannot be used. Stable snake_case names: they become log keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BadReason {
    /// A JSONL line (or list item) that is not valid JSON or not a LLaVA record.
    MalformedJson,
    MissingImage,
    /// The image file exists but does not decode (corrupt, truncated, unknown format).
    CorruptImage,
    /// `..`, an absolute path, or a symlink that leads outside the source's image folder.
    ImagePathEscapes,
    /// Width × height above `max_image_pixels`.
    ImageTooLarge,
    NoAssistantTurn,
    /// The number of `<image>` markers differs from the number of images.
    ImageTokenMismatch,
    /// The sequence exceeds `max_len` and truncating would cut visual tokens or leave no supervised token.
    TooLong,
}

impl BadReason {
    pub const ALL: [BadReason; 8] = [
        BadReason::MalformedJson,
        BadReason::MissingImage,
        BadReason::CorruptImage,
        BadReason::ImagePathEscapes,
        BadReason::ImageTooLarge,
        BadReason::NoAssistantTurn,
        BadReason::ImageTokenMismatch,
        BadReason::TooLong,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            BadReason::MalformedJson => "malformed_json",
            BadReason::MissingImage => "missing_image",
            BadReason::CorruptImage => "corrupt_image",
            BadReason::ImagePathEscapes => "image_path_escapes",
            BadReason::ImageTooLarge => "image_too_large",
            BadReason::NoAssistantTurn => "no_assistant_turn",
            BadReason::ImageTokenMismatch => "image_token_mismatch",
            BadReason::TooLong => "too_long",
        }
    }
}

impl fmt::Display for BadReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One skipped record: where it came from and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BadRecord {
    pub reason: BadReason,
    /// The record's `id`, or `line <n>` when the line did not parse.
    pub record_id: String,
    /// The JSON/JSONL file holding the record.
    pub file: PathBuf,
    /// 1-based line for JSONL, 1-based item index for a JSON list.
    pub line: usize,
    pub detail: String,
}

impl fmt::Display for BadRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "bad record ({}) {} at {}:{}: {}", self.reason, self.record_id, self.file.display(), self.line, self.detail)
    }
}

/// Count and first examples for one reason.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReasonCount {
    pub count: u64,
    /// The first few records, as `id (file:line): detail`.
    pub examples: Vec<String>,
}

/// Skipped records by reason; merged across workers and saved in checkpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BadRecordCounts {
    pub by_reason: BTreeMap<BadReason, ReasonCount>,
    /// How many examples to keep per reason.
    pub max_examples: usize,
}

impl Default for BadRecordCounts {
    fn default() -> Self {
        Self::new(5)
    }
}

impl BadRecordCounts {
    pub fn new(max_examples: usize) -> Self {
        Self { by_reason: BTreeMap::new(), max_examples }
    }

    pub fn add(&mut self, bad: &BadRecord) {
        let entry = self.by_reason.entry(bad.reason).or_default();
        entry.count += 1;
        if entry.examples.len() < self.max_examples {
            entry.examples.push(format!("{} ({}:{}): {}", bad.record_id, bad.file.display(), bad.line, bad.detail));
        }
    }

    pub fn merge(&mut self, other: &BadRecordCounts) {
        for (reason, rc) in &other.by_reason {
            let entry = self.by_reason.entry(*reason).or_default();
            entry.count += rc.count;
            for ex in &rc.examples {
                if entry.examples.len() < self.max_examples {
                    entry.examples.push(ex.clone());
                }
            }
        }
    }

    pub fn count(&self, reason: BadReason) -> u64 {
        self.by_reason.get(&reason).map_or(0, |r| r.count)
    }

    pub fn total(&self) -> u64 {
        self.by_reason.values().map(|r| r.count).sum()
    }

    /// `reason -> count`, the form the trainer logs.
    pub fn counts(&self) -> BTreeMap<&'static str, u64> {
        self.by_reason.iter().map(|(r, c)| (r.as_str(), c.count)).collect()
    }
}

impl fmt::Display for BadRecordCounts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.by_reason.is_empty() {
            return writeln!(f, "  none");
        }
        for (reason, rc) in &self.by_reason {
            writeln!(f, "  {reason}: {}", rc.count)?;
            for ex in &rc.examples {
                writeln!(f, "    e.g. {ex}")?;
            }
        }
        Ok(())
    }
}
