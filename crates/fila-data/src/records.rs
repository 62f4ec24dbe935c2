//! LLaVA records from JSON lists and JSONL files, several sources with sampling rules, exposed as
//! a burn-dataset `Dataset<Record>`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use crate::bad::{BadReason, BadRecord, BadRecordCounts};
use crate::config::{DataConfig, OnBadRecord, Sampling, SourceConfig};
use crate::error::{DataError, Result};
use crate::sampler::permutation;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Turn {
    pub role: Role,
    pub text: String,
}

/// One conversation with its images, and where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub id: String,
    /// Image paths relative to `image_folder`; empty for text-only records.
    pub images: Vec<String>,
    pub turns: Vec<Turn>,
    /// Index of the source in the config.
    pub source: usize,
    pub file: Arc<PathBuf>,
    /// 1-based line (JSONL) or item index (JSON list).
    pub line: usize,
    /// The source's image folder, canonicalised.
    pub image_folder: Arc<PathBuf>,
}

impl Record {
    pub fn bad(&self, reason: BadReason, detail: impl Into<String>) -> BadRecord {
        BadRecord { reason, record_id: self.id.clone(), file: self.file.as_ref().clone(), line: self.line, detail: detail.into() }
    }
}

#[derive(Deserialize)]
struct RawRecord {
    #[serde(default)]
    id: Option<serde_json::Value>,
    #[serde(default)]
    image: Option<RawImage>,
    conversations: Vec<RawTurn>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawImage {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct RawTurn {
    from: String,
    value: String,
}

/// All sources' records after sampling, in source order then file order.
#[derive(Debug, Clone)]
pub struct RecordSet {
    pub records: Vec<Record>,
    /// Records that failed to parse (malformed JSON), counted once at load.
    pub load_bad: BadRecordCounts,
    /// Records per source after sampling.
    pub per_source: Vec<usize>,
}

impl RecordSet {
    pub fn load(cfg: &DataConfig) -> Result<Self> {
        let mut records = Vec::new();
        let mut load_bad = BadRecordCounts::new(cfg.bad_examples);
        let mut per_source = Vec::new();
        for (i, src) in cfg.sources.iter().enumerate() {
            let (parsed, bad) = load_source(src, i)?;
            for b in bad {
                if cfg.on_bad_record == OnBadRecord::Error {
                    return Err(DataError::BadRecord(Box::new(b)));
                }
                load_bad.add(&b);
            }
            let kept = apply_sampling(parsed, src.sampling().expect("validated config"));
            per_source.push(kept.len());
            records.extend(kept);
        }
        Ok(Self { records, load_bad, per_source })
    }
}

impl burn_dataset::Dataset<Record> for RecordSet {
    fn get(&self, index: usize) -> Option<Record> {
        self.records.get(index).cloned()
    }
    fn len(&self) -> usize {
        self.records.len()
    }
}

/// Parses one source file; malformed entries come back as bad records, an unreadable file as an error.
pub fn load_source(src: &SourceConfig, source: usize) -> Result<(Vec<Record>, Vec<BadRecord>)> {
    let folder = src.image_folder.canonicalize().map_err(|e| DataError::Config {
        file: src.path.clone(),
        message: format!("image_folder {}: {e}", src.image_folder.display()),
        hint: "image_folder must be an existing directory".into(),
    })?;
    let folder = Arc::new(folder);
    let file = Arc::new(src.path.clone());
    let text = std::fs::read_to_string(&src.path).map_err(|e| DataError::io(&src.path, e))?;
    let is_list = match src.path.extension().and_then(|e| e.to_str()) {
        Some("jsonl") => false,
        Some("json") => true,
        _ => text.trim_start().starts_with('['),
    };
    let mut records = Vec::new();
    let mut bad = Vec::new();
    let mut push = |line: usize, value: std::result::Result<RawRecord, String>| match value.and_then(|raw| to_record(raw, source, &file, line, &folder)) {
        Ok(r) => records.push(r),
        Err(detail) => bad.push(BadRecord { reason: BadReason::MalformedJson, record_id: format!("line {line}"), file: src.path.clone(), line, detail }),
    };
    if is_list {
        let items: Vec<serde_json::Value> =
            serde_json::from_str(&text).map_err(|e| DataError::RecordFile { file: src.path.clone(), message: e.to_string() })?;
        for (i, item) in items.into_iter().enumerate() {
            push(i + 1, serde_json::from_value(item).map_err(|e| e.to_string()));
        }
    } else {
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            push(i + 1, serde_json::from_str(line).map_err(|e| e.to_string()));
        }
    }
    Ok((records, bad))
}

fn to_record(raw: RawRecord, source: usize, file: &Arc<PathBuf>, line: usize, folder: &Arc<PathBuf>) -> std::result::Result<Record, String> {
    let id = match raw.id {
        Some(serde_json::Value::String(s)) => s,
        Some(v) => v.to_string(),
        None => format!("{}:{line}", file_stem(file)),
    };
    let images = match raw.image {
        None => vec![],
        Some(RawImage::One(s)) => vec![s],
        Some(RawImage::Many(v)) => v,
    };
    let mut turns = Vec::with_capacity(raw.conversations.len());
    for t in raw.conversations {
        let role = match t.from.as_str() {
            "human" | "user" => Role::User,
            "gpt" | "assistant" => Role::Assistant,
            "system" => Role::System,
            other => return Err(format!("record {id}: unknown speaker `from: {other}`")),
        };
        turns.push(Turn { role, text: t.value });
    }
    Ok(Record { id, images, turns, source, file: file.clone(), line, image_folder: folder.clone() })
}

fn file_stem(p: &Path) -> String {
    p.file_stem().map_or_else(String::new, |s| s.to_string_lossy().into_owned())
}

/// Keeps the records a sampling rule selects, in file order.
pub fn apply_sampling(records: Vec<Record>, sampling: Sampling) -> Vec<Record> {
    let n = records.len();
    let pick_random = |records: Vec<Record>, count: usize, seed: u64| {
        let mut keep = vec![false; n];
        for &i in permutation(n, seed, u64::MAX).iter().take(count) {
            keep[i] = true;
        }
        records.into_iter().zip(keep).filter_map(|(r, k)| k.then_some(r)).collect()
    };
    match sampling {
        Sampling::All => records,
        Sampling::First(k) => records.into_iter().take(k).collect(),
        Sampling::Random { count, seed } => pick_random(records, count, seed),
        Sampling::Percent { percent, seed } => {
            let count = (n as f64 * percent / 100.0).round() as usize;
            pick_random(records, count, seed)
        }
    }
}
