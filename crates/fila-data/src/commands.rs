//! Library side of `fila data check` and `fila data inspect`: the binary parses arguments,
//! calls these, and prints their `Display`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use rayon::prelude::*;

use crate::bad::BadRecordCounts;
use crate::error::{DataError, Result};
use crate::geometry::TileGrid;
use crate::pipeline::{Pipeline, Sample};
use crate::records::RecordSet;
use crate::text::IGNORE_INDEX;

/// Token-length statistics over good records.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LengthStats {
    pub min: usize,
    pub mean: f64,
    pub p50: usize,
    pub p95: usize,
    pub max: usize,
}

impl LengthStats {
    /// Nearest-rank percentiles of `lengths`.
    pub fn of(mut lengths: Vec<usize>) -> Option<Self> {
        if lengths.is_empty() {
            return None;
        }
        lengths.sort_unstable();
        let n = lengths.len();
        let rank = |p: f64| lengths[((p / 100.0 * n as f64).ceil() as usize).clamp(1, n) - 1];
        Some(Self { min: lengths[0], mean: lengths.iter().sum::<usize>() as f64 / n as f64, p50: rank(50.0), p95: rank(95.0), max: lengths[n - 1] })
    }
}

/// Result of scanning a whole dataset.
#[derive(Debug, Clone, PartialEq)]
pub struct DataCheck {
    /// Records after sampling, plus lines that did not parse.
    pub records: usize,
    pub good: usize,
    pub bad: BadRecordCounts,
    pub images: usize,
    pub truncated: usize,
    pub lengths: Option<LengthStats>,
    /// Stage 2: images per chosen canvas (cols × rows).
    pub canvases: BTreeMap<(u32, u32), usize>,
    pub max_len: usize,
}

/// Decodes every image and tokenises every record (no resizing), in parallel.
pub fn check(pipeline: &Pipeline, records: &RecordSet) -> DataCheck {
    let scans: Vec<_> = records.records.par_iter().map(|r| pipeline.scan(r)).collect();
    let mut bad = records.load_bad.clone();
    let mut lengths = vec![];
    let mut canvases = BTreeMap::new();
    let (mut images, mut truncated) = (0, 0);
    let tiled = pipeline.config.image_mode == crate::config::ImageMode::Tiled;
    for s in scans {
        match s {
            Ok(s) => {
                lengths.push(s.seq_len);
                images += s.image_sizes.len();
                truncated += usize::from(s.truncated);
                if tiled {
                    for (w, h) in s.image_sizes {
                        let g = pipeline.images.geometry.select_canvas(w, h);
                        *canvases.entry((g.cols, g.rows)).or_insert(0) += 1;
                    }
                }
            }
            Err(b) => bad.add(&b),
        }
    }
    DataCheck {
        records: records.records.len() + records.load_bad.total() as usize,
        good: lengths.len(),
        bad,
        images,
        truncated,
        lengths: LengthStats::of(lengths),
        canvases,
        max_len: pipeline.config.max_len,
    }
}

impl fmt::Display for DataCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "records: {}", self.records)?;
        writeln!(f, "good:    {} ({} images, {} truncated to max_len {})", self.good, self.images, self.truncated, self.max_len)?;
        writeln!(f, "bad:     {}", self.bad.total())?;
        write!(f, "{}", self.bad)?;
        match &self.lengths {
            Some(l) => writeln!(f, "tokens:  min {} mean {:.1} p50 {} p95 {} max {}", l.min, l.mean, l.p50, l.p95, l.max)?,
            None => writeln!(f, "tokens:  no good records")?,
        }
        if !self.canvases.is_empty() {
            write!(f, "canvases:")?;
            for ((c, r), n) in &self.canvases {
                write!(f, " {c}x{r}: {n}")?;
            }
            writeln!(f)?;
        }
        Ok(())
    }
}

/// One record as the model will see it.
#[derive(Debug, Clone)]
pub struct Inspection {
    pub record_id: String,
    pub location: String,
    pub sample: Sample,
    /// Per image: original size, canvas in pixels (w, h) and tiles (stage 2).
    pub image_info: Vec<ImageInfo>,
    /// Per position: id, readable piece, whether the label is masked.
    pub tokens: Vec<(i64, String, bool)>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ImageInfo {
    pub original: (u32, u32),
    pub canvas: (u32, u32),
    pub grid: Option<TileGrid>,
    pub views: usize,
    pub visual_tokens: usize,
    pub hires_shape: Vec<usize>,
}

/// Processes record `index` (after sampling); a bad record is an error naming it.
pub fn inspect(pipeline: &Pipeline, records: &RecordSet, index: usize) -> Result<Inspection> {
    let record = records.records.get(index).ok_or(DataError::IndexOutOfRange { index, len: records.records.len() })?;
    let sample = pipeline.process(record).map_err(|b| DataError::BadRecord(Box::new(b)))?;
    let geo = &pipeline.images.geometry;
    let image_info = sample
        .images
        .iter()
        .map(|i| ImageInfo {
            original: i.original_size,
            canvas: i.grid.map_or((geo.square_vit, geo.square_vit), |g| geo.canvas_pixels(g)),
            grid: i.grid,
            views: i.num_views(),
            visual_tokens: i.visual_tokens,
            hires_shape: i.hires.shape.clone(),
        })
        .collect();
    let tokens = sample
        .input_ids
        .iter()
        .zip(&sample.labels)
        .map(|(&id, &l)| {
            let piece = if id == pipeline.text.special.image {
                pipeline.text.image_marker.clone()
            } else {
                u32::try_from(id).ok().and_then(|i| pipeline.text.tokenizer.decode(&[i], false).ok()).unwrap_or_else(|| pipeline.text.piece(id))
            };
            (id, piece, l == IGNORE_INDEX)
        })
        .collect();
    Ok(Inspection { record_id: record.id.clone(), location: format!("{}:{}", record.file.display(), record.line), sample, image_info, tokens })
}

impl fmt::Display for Inspection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "record {} ({})", self.record_id, self.location)?;
        for (k, i) in self.image_info.iter().enumerate() {
            let grid = i.grid.map_or("no tiling".to_string(), |g| format!("{}x{} tiles", g.cols, g.rows));
            writeln!(
                f,
                "image {k}: {}x{} -> canvas {}x{} ({grid}), {} views, {} visual tokens, hires {:?}",
                i.original.0, i.original.1, i.canvas.0, i.canvas.1, i.views, i.visual_tokens, i.hires_shape
            )?;
        }
        let supervised = self.tokens.iter().filter(|t| !t.2).count();
        writeln!(
            f,
            "tokens: {} ({} supervised; [..] = masked, no loss){}",
            self.tokens.len(),
            supervised,
            if self.sample.truncated { ", truncated" } else { "" }
        )?;
        // Runs of identical masked tokens (visual tokens) print once with a count.
        let mut i = 0;
        while i < self.tokens.len() {
            let (id, piece, masked) = &self.tokens[i];
            let mut j = i + 1;
            while j < self.tokens.len() && self.tokens[j].0 == *id && self.tokens[j].2 == *masked {
                j += 1;
            }
            let run = j - i;
            let shown = format!("{piece:?}");
            let rep = if run > 3 { format!("{shown}x{run}") } else { vec![shown; run].join(" ") };
            if *masked {
                write!(f, "[{rep}] ")?;
            } else {
                write!(f, "{rep} ")?;
            }
            i = j;
        }
        writeln!(f)
    }
}

impl Inspection {
    /// Writes `global` [3,t,t], `tiles` [n,3,t,t] (stage 2), `hires` [3,H,W], `input_ids`,
    /// `labels` and `canvas` [w,h] of the first image (later images get a `_<k>` suffix).
    pub fn write_safetensors(&self, path: &Path) -> Result<()> {
        use safetensors::tensor::{Dtype, TensorView};
        let f32_bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let i64_bytes = |v: &[i64]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let mut owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = vec![
            ("input_ids".into(), Dtype::I64, vec![self.sample.input_ids.len()], i64_bytes(&self.sample.input_ids)),
            ("labels".into(), Dtype::I64, vec![self.sample.labels.len()], i64_bytes(&self.sample.labels)),
        ];
        for (k, (img, info)) in self.sample.images.iter().zip(&self.image_info).enumerate() {
            let sfx = if k == 0 { String::new() } else { format!("_{k}") };
            let s = &img.views.shape;
            let view_len = 3 * s[2] * s[3];
            owned.push((format!("global{sfx}"), Dtype::F32, s[1..].to_vec(), f32_bytes(&img.views.data[..view_len])));
            if img.grid.is_some() {
                let n = s[0] - 1;
                owned.push((format!("tiles{sfx}"), Dtype::F32, vec![n, 3, s[2], s[3]], f32_bytes(&img.views.data[view_len..])));
            }
            owned.push((format!("hires{sfx}"), Dtype::F32, img.hires.shape.clone(), f32_bytes(&img.hires.data)));
            let canvas = [info.canvas.0 as i64, info.canvas.1 as i64];
            owned.push((format!("canvas{sfx}"), Dtype::I64, vec![2], i64_bytes(&canvas)));
        }
        let write_err = |m: String| DataError::Write { path: path.to_path_buf(), message: m };
        let views = owned
            .iter()
            .map(|(n, d, s, b)| TensorView::new(*d, s.clone(), b).map(|v| (n.clone(), v)))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| write_err(e.to_string()))?;
        let meta = [("record_id".to_string(), self.record_id.clone())].into_iter().collect();
        safetensors::tensor::serialize_to_file(views, Some(meta), path).map_err(|e| write_err(e.to_string()))
    }
}
