//! One record in, one training sample out: structure checks, images, tokens, pixels, in the
//! order that fails cheapest first.

use std::sync::Arc;

use crate::bad::BadRecord;
use crate::config::{DataConfig, OnBadRecord};
use crate::error::{DataError, Result};
use crate::pixels::{resolve_image_path, ImagePreprocessor, ImageViews};
use crate::records::{Record, RecordSet};
use crate::text::{TextEncoder, TokenizedSample};

/// A preprocessed record, ready for collation.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub record_id: String,
    pub input_ids: Vec<i64>,
    pub labels: Vec<i64>,
    /// One entry per image, in the order of its `<image>` marker.
    pub images: Vec<ImageViews>,
    pub truncated: bool,
}

impl Sample {
    pub fn num_views(&self) -> usize {
        self.images.iter().map(|i| i.num_views()).sum()
    }
}

/// What `fila data check` learns about a record without resizing anything.
#[derive(Debug, Clone, PartialEq)]
pub struct ScannedRecord {
    pub seq_len: usize,
    pub image_sizes: Vec<(u32, u32)>,
    pub truncated: bool,
}

/// Config, tokenizer and image geometry: everything needed to turn a record into a sample.
pub struct Pipeline {
    pub config: DataConfig,
    pub images: ImagePreprocessor,
    pub text: TextEncoder,
}

impl Pipeline {
    pub fn new(config: DataConfig) -> Result<Self> {
        config.validate().map_err(|m| DataError::Config { file: "[data]".into(), message: m, hint: "see docs/data.md".into() })?;
        let text = TextEncoder::from_config(&config)?;
        Ok(Self { images: ImagePreprocessor::new(&config), text, config })
    }

    /// Reads the `[data]` table of `path` and builds the pipeline and the record set.
    pub fn open(path: &std::path::Path) -> Result<(Arc<Pipeline>, Arc<RecordSet>)> {
        let cfg = DataConfig::from_toml_file(path)?;
        let records = RecordSet::load(&cfg)?;
        Ok((Arc::new(Pipeline::new(cfg)?), Arc::new(records)))
    }

    fn decode_images(&self, record: &Record) -> std::result::Result<Vec<image::RgbImage>, BadRecord> {
        record
            .images
            .iter()
            .map(|rel| {
                let path = resolve_image_path(&record.image_folder, rel).map_err(|(r, d)| record.bad(r, d))?;
                self.images.load(&path).map_err(|(r, d)| record.bad(r, d))
            })
            .collect()
    }

    fn tokenize(&self, record: &Record, images: &[image::RgbImage]) -> std::result::Result<TokenizedSample, BadRecord> {
        let visual: Vec<usize> = images.iter().map(|i| self.images.visual_tokens_for(i.width(), i.height())).collect();
        self.text.encode(record, &visual).map_err(|(r, d)| record.bad(r, d))
    }

    /// The full sample, or why the record is bad.
    pub fn process(&self, record: &Record) -> std::result::Result<Sample, BadRecord> {
        self.text.check_structure(record).map_err(|(r, d)| record.bad(r, d))?;
        let decoded = self.decode_images(record)?;
        let tokens = self.tokenize(record, &decoded)?;
        let images: Vec<ImageViews> = decoded.iter().map(|i| self.images.process(i)).collect();
        debug_assert!(images.iter().zip(&tokens.visual_spans).all(|(i, s)| i.visual_tokens == s.len()));
        Ok(Sample { record_id: record.id.clone(), input_ids: tokens.input_ids, labels: tokens.labels, images, truncated: tokens.truncated })
    }

    /// Decodes images and tokenises without producing pixels (for `check`).
    pub fn scan(&self, record: &Record) -> std::result::Result<ScannedRecord, BadRecord> {
        self.text.check_structure(record).map_err(|(r, d)| record.bad(r, d))?;
        let decoded = self.decode_images(record)?;
        let tokens = self.tokenize(record, &decoded)?;
        Ok(ScannedRecord { seq_len: tokens.input_ids.len(), image_sizes: decoded.iter().map(|i| i.dimensions()).collect(), truncated: tokens.truncated })
    }

    /// Applies `on_bad_record`: `Ok(None)` when the record is skipped.
    pub fn process_or_skip(&self, record: &Record) -> Result<std::result::Result<Sample, BadRecord>> {
        match self.process(record) {
            Err(bad) if self.config.on_bad_record == OnBadRecord::Error => Err(DataError::BadRecord(Box::new(bad))),
            other => Ok(other),
        }
    }
}

/// A burn-dataset view of preprocessed samples: item `i` is record `i` processed, or why it is bad.
pub struct SampleDataset<D> {
    pub records: D,
    pub pipeline: Arc<Pipeline>,
}

impl<D: burn_dataset::Dataset<Record>> burn_dataset::Dataset<std::result::Result<Sample, BadRecord>> for SampleDataset<D> {
    fn get(&self, index: usize) -> Option<std::result::Result<Sample, BadRecord>> {
        self.records.get(index).map(|r| self.pipeline.process(&r))
    }
    fn len(&self) -> usize {
        self.records.len()
    }
}
