//! FILA data pipeline: LLaVA-format records, stage-1 square padding and stage-2 dynamic tiling at
//! both tower resolutions, chat templates with turn-by-turn labels, and a deterministic, resumable,
//! shardable loader. Knows nothing of the model: every size comes from [`DataConfig`].
//! See `docs/data.md`.

pub mod bad;
pub mod commands;
pub mod config;
pub mod error;
pub mod geometry;
pub mod loader;
pub mod pipeline;
pub mod pixels;
pub mod records;
pub mod sampler;
pub mod text;

pub use bad::{BadReason, BadRecord, BadRecordCounts, ReasonCount};
/// Re-exported so callers name the same `Dataset` trait version.
pub use burn_dataset;
pub use commands::{check, inspect, DataCheck, ImageInfo, Inspection, LengthStats};
pub use config::{DataConfig, GeometryConfig, ImageMode, LoaderConfig, Normalization, OnBadRecord, Sampling, SourceConfig, TemplateKind};
pub use error::{DataError, Result};
pub use geometry::{select_canvas, Geometry, Placement, TileGrid};
pub use loader::{collate, Batch, DataLoader, LoaderOptions};
pub use pipeline::{Pipeline, Sample, SampleDataset, ScannedRecord};
pub use pixels::{ImagePreprocessor, ImageViews, PixelTensor};
pub use records::{Record, RecordSet, Role, Turn};
pub use sampler::{permutation, DataCursor, EpochSampler, SplitMix64};
pub use text::{TextEncoder, TokenizedSample, IGNORE_INDEX};
