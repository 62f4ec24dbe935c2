//! The loader: sampler order → rayon-parallel preprocessing → bounded prefetch queue → batches,
//! in exactly the sampler's order, resumable from the cursor each batch carries.

use std::collections::VecDeque;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use burn_dataset::Dataset;
use rayon::prelude::*;

use crate::bad::{BadRecord, BadRecordCounts};
use crate::config::{ImageMode, LoaderConfig, OnBadRecord};
use crate::error::{DataError, Result};
use crate::geometry::TileGrid;
use crate::pipeline::{Pipeline, Sample};
use crate::pixels::PixelTensor;
use crate::records::Record;
use crate::sampler::{DataCursor, EpochSampler};
use crate::text::IGNORE_INDEX;

/// A collated batch. Sequences are right-padded; pixel views of all images are concatenated.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// `[batch, seq_len]`, padded with `pad_token_id`.
    pub input_ids: Vec<i64>,
    /// `[batch, seq_len]`, padded with −100.
    pub labels: Vec<i64>,
    /// `[batch, seq_len]`, true on real tokens.
    pub attention_mask: Vec<bool>,
    pub batch_size: usize,
    pub seq_len: usize,
    /// Unpadded length of each sample.
    pub lengths: Vec<usize>,
    /// ViT views `[total_views, 3, t, t]`: per image its global view then tiles, images in sample order.
    pub views: PixelTensor,
    pub views_per_image: Vec<usize>,
    pub images_per_sample: Vec<usize>,
    pub views_per_sample: Vec<usize>,
    /// ConvNeXt input `[3, H, W]` per image (stage-2 canvases differ in size).
    pub hires: Vec<PixelTensor>,
    /// Stage-2 canvas per image; `None` in stage 1.
    pub grids: Vec<Option<TileGrid>>,
    pub record_ids: Vec<String>,
    /// Where to resume to get the batch after this one.
    pub cursor: DataCursor,
    /// Records skipped while assembling this batch, in order.
    pub skipped: Vec<BadRecord>,
}

/// Right-pads and stacks samples to `padded_len(longest sample)` tokens
/// ([`crate::config::LoaderConfig::padded_len`]). `view_side` gives the view shape when no sample
/// has an image.
pub fn collate(samples: Vec<Sample>, pad_token_id: i64, view_side: usize, padded_len: impl Fn(usize) -> usize) -> Batch {
    let batch_size = samples.len();
    let longest = samples.iter().map(|s| s.input_ids.len()).max().unwrap_or(0);
    let seq_len = padded_len(longest).max(longest);
    let mut input_ids = vec![pad_token_id; batch_size * seq_len];
    let mut labels = vec![IGNORE_INDEX; batch_size * seq_len];
    let mut attention_mask = vec![false; batch_size * seq_len];
    let mut lengths = Vec::with_capacity(batch_size);
    let total_views: usize = samples.iter().map(|s| s.num_views()).sum();
    let view_len = 3 * view_side * view_side;
    let mut views = Vec::with_capacity(total_views * view_len);
    let (mut views_per_image, mut images_per_sample, mut views_per_sample) = (vec![], vec![], vec![]);
    let (mut hires, mut grids, mut record_ids) = (vec![], vec![], vec![]);
    for (b, s) in samples.into_iter().enumerate() {
        let n = s.input_ids.len();
        let row = b * seq_len;
        input_ids[row..row + n].copy_from_slice(&s.input_ids);
        labels[row..row + n].copy_from_slice(&s.labels);
        attention_mask[row..row + n].fill(true);
        lengths.push(n);
        images_per_sample.push(s.images.len());
        views_per_sample.push(s.num_views());
        for img in s.images {
            assert_eq!(img.views.data.len(), img.num_views() * view_len, "view side differs from the batch's");
            views_per_image.push(img.num_views());
            views.extend_from_slice(&img.views.data);
            hires.push(img.hires);
            grids.push(img.grid);
        }
        record_ids.push(s.record_id);
    }
    Batch {
        input_ids,
        labels,
        attention_mask,
        batch_size,
        seq_len,
        lengths,
        views: PixelTensor { data: views, shape: vec![total_views, 3, view_side, view_side] },
        views_per_image,
        images_per_sample,
        views_per_sample,
        hires,
        grids,
        record_ids,
        cursor: DataCursor::default(),
        skipped: vec![],
    }
}

/// What the loader reads and from where.
#[derive(Debug, Clone, PartialEq)]
pub struct LoaderOptions {
    pub batch_size: usize,
    pub seed: u64,
    pub shuffle: bool,
    pub rank: usize,
    pub world: usize,
    pub even_shards: bool,
    pub drop_last: bool,
    /// Preprocessing threads; 0 = all cores.
    pub workers: usize,
    pub prefetch_batches: usize,
    /// Resume point (`DataCursor::default()` for a fresh start).
    pub start: DataCursor,
    /// Stop before this epoch.
    pub end_epoch: u64,
}

impl LoaderOptions {
    pub fn from_config(cfg: &LoaderConfig, rank: usize, world: usize, start: DataCursor, end_epoch: u64) -> Self {
        Self {
            batch_size: cfg.batch_size,
            seed: cfg.seed,
            shuffle: cfg.shuffle,
            rank,
            world,
            even_shards: cfg.even_shards,
            drop_last: cfg.drop_last,
            workers: cfg.workers,
            prefetch_batches: cfg.prefetch_batches,
            start,
            end_epoch,
        }
    }

    pub fn sampler(&self, len: usize) -> EpochSampler {
        let mut s = EpochSampler::new(len, self.seed, self.shuffle).sharded(self.rank, self.world);
        s.even_shards = self.even_shards;
        s
    }
}

/// Iterator over batches, prepared by a producer thread `prefetch_batches` ahead.
pub struct DataLoader {
    rx: Option<Receiver<Result<Batch>>>,
    /// Returns the bad records that ended an epoch without a batch to carry them.
    producer: Option<JoinHandle<Vec<BadRecord>>>,
    /// Bad records of the batches yielded so far (not those prepared ahead), for logging and checkpoints.
    bad: BadRecordCounts,
    pub sampler: EpochSampler,
}

impl DataLoader {
    pub fn start(records: Arc<dyn Dataset<Record>>, pipeline: Arc<Pipeline>, opts: LoaderOptions) -> Result<Self> {
        assert!(opts.batch_size > 0, "batch_size must be ≥ 1");
        let sampler = opts.sampler(records.len());
        let pool =
            rayon::ThreadPoolBuilder::new().num_threads(opts.workers).thread_name(|i| format!("fila-data-{i}")).build().map_err(|e| DataError::Config {
                file: "[data.loader]".into(),
                message: format!("cannot start {} preprocessing threads: {e}", opts.workers),
                hint: "lower loader.workers".into(),
            })?;
        let (tx, rx) = sync_channel(opts.prefetch_batches.max(1));
        let bad = BadRecordCounts::new(pipeline.config.bad_examples);
        let producer_sampler = sampler.clone();
        let producer = std::thread::Builder::new()
            .name("fila-data-producer".into())
            .spawn(move || {
                let mut producer = Producer { records, pipeline, pool, sampler: producer_sampler, opts };
                producer.run(|item| tx.send(item).is_ok())
            })
            .map_err(|e| DataError::io("fila-data-producer thread", e))?;
        Ok(Self { rx: Some(rx), producer: Some(producer), bad, sampler })
    }

    pub fn bad_counts(&self) -> &BadRecordCounts {
        &self.bad
    }

    /// Continue counting from a checkpoint's counts.
    pub fn restore_bad_counts(&mut self, counts: BadRecordCounts) {
        self.bad = counts;
    }
}

impl Iterator for DataLoader {
    type Item = Result<Batch>;
    fn next(&mut self) -> Option<Self::Item> {
        let Ok(item) = self.rx.as_ref()?.recv() else {
            // The producer is gone: the data ended, or it panicked, which must not look like an end.
            match self.producer.take().map(|h| h.join()) {
                Some(Err(panic)) => std::panic::resume_unwind(panic),
                Some(Ok(trailing)) => trailing.iter().for_each(|b| self.bad.add(b)),
                None => {}
            }
            return None;
        };
        if let Ok(batch) = &item {
            for b in &batch.skipped {
                self.bad.add(b);
            }
        }
        Some(item)
    }
}

impl Drop for DataLoader {
    fn drop(&mut self) {
        // Closing the queue makes the producer's next send fail, so it stops.
        self.rx.take();
        if let Some(h) = self.producer.take() {
            let _ = h.join();
        }
    }
}

struct Producer {
    records: Arc<dyn Dataset<Record>>,
    pipeline: Arc<Pipeline>,
    pool: rayon::ThreadPool,
    sampler: EpochSampler,
    opts: LoaderOptions,
}

type Outcome = std::result::Result<Sample, BadRecord>;

/// One epoch's records processed so far, in sampler order, not yet put in a batch.
struct EpochQueue {
    order: Vec<usize>,
    /// Next position to preprocess.
    next: usize,
    /// Preprocessed records starting at position `first`.
    ready: VecDeque<Outcome>,
    first: usize,
}

impl Producer {
    fn view_side(&self) -> usize {
        match self.pipeline.config.image_mode {
            ImageMode::Square => self.pipeline.images.geometry.square_vit as usize,
            ImageMode::Tiled => self.pipeline.images.geometry.tile as usize,
        }
    }

    /// Preprocesses the next chunk of the epoch in parallel; false at the end of the epoch.
    fn fill(&self, q: &mut EpochQueue) -> bool {
        if q.next >= q.order.len() {
            return false;
        }
        let chunk = self.opts.batch_size.max(2 * self.pool.current_num_threads());
        let end = (q.next + chunk).min(q.order.len());
        let outs: Vec<Outcome> = self.pool.install(|| {
            q.order[q.next..end]
                .par_iter()
                .map(|&i| {
                    let record = self.records.get(i).expect("sampler index within the dataset");
                    self.pipeline.process(&record)
                })
                .collect()
        });
        q.ready.extend(outs);
        q.next = end;
        true
    }

    /// Whether every record from the front of the queue to the epoch's end is bad.
    fn only_bad_left(&self, q: &mut EpochQueue) -> bool {
        let mut k = 0;
        loop {
            while k < q.ready.len() {
                if q.ready[k].is_ok() {
                    return false;
                }
                k += 1;
            }
            if !self.fill(q) {
                return true;
            }
        }
    }

    /// Sends the batches; returns the bad records that no batch carried (an epoch whose remaining
    /// records were all bad, or a dropped last batch), which the loader counts when the data ends.
    fn run(&mut self, mut send: impl FnMut(Result<Batch>) -> bool) -> Vec<BadRecord> {
        let mut trailing = vec![];
        let error_mode = self.pipeline.config.on_bad_record == OnBadRecord::Error;
        let pad = self.pipeline.config.pad_token_id;
        let side = self.view_side();
        for epoch in self.opts.start.epoch..self.opts.end_epoch {
            let start = if epoch == self.opts.start.epoch { self.opts.start.position } else { 0 };
            let order = self.sampler.epoch_order(epoch);
            let start = start.min(order.len());
            let mut q = EpochQueue { order, next: start, ready: VecDeque::new(), first: start };
            loop {
                let mut samples = Vec::with_capacity(self.opts.batch_size);
                let mut skipped = vec![];
                while samples.len() < self.opts.batch_size {
                    if q.ready.is_empty() && !self.fill(&mut q) {
                        break;
                    }
                    let outcome = q.ready.pop_front().expect("filled");
                    q.first += 1;
                    match outcome {
                        Ok(s) => samples.push(s),
                        Err(bad) if error_mode => {
                            send(Err(DataError::BadRecord(Box::new(bad))));
                            return trailing;
                        }
                        Err(bad) => skipped.push(bad),
                    }
                }
                // Bad records that end the epoch belong to its last batch, so their counts are logged.
                if !samples.is_empty() && !error_mode && self.only_bad_left(&mut q) {
                    while let Some(Err(bad)) = q.ready.pop_front() {
                        q.first += 1;
                        skipped.push(bad);
                    }
                }
                let full = samples.len() == self.opts.batch_size;
                if samples.is_empty() || (!full && self.opts.drop_last) {
                    trailing.extend(skipped);
                    break;
                }
                let mut batch = collate(samples, pad, side, |longest| self.pipeline.config.loader.padded_len(longest));
                batch.skipped = skipped;
                batch.cursor = if q.first >= q.order.len() { DataCursor { epoch: epoch + 1, position: 0 } } else { DataCursor { epoch, position: q.first } };
                if !send(Ok(batch)) {
                    return trailing;
                }
            }
        }
        trailing
    }
}
