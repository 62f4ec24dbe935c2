//! The `[data]` section of the trainer's TOML: sources, geometry, normalisation, text template
//! and loader settings. Unknown keys are rejected; every default is written out here, once: a
//! section whose keys are all optional (`geometry`, `loader`) reads missing keys from its `Default`
//! impl, and a key beside a required one (`sources`, `tokenizer`) from its `default_*` function.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};

/// CLIP's pixel mean and std (also OpenCLIP ConvNeXt's).
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
#[allow(clippy::excessive_precision)] // as published; f32 rounds the last digit
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];
/// ImageNet's pixel mean and std (`facebook/convnext-*`).
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// `[[data.sources]]`: one entry per JSON/JSONL file.
    pub sources: Vec<SourceConfig>,
    /// Path of a Hugging Face `tokenizer.json`.
    pub tokenizer: PathBuf,
    #[serde(default)]
    pub template: TemplateKind,
    /// `square` (stage 1: pad to square, no tiling) or `tiled` (stage 2: dynamic tiling).
    #[serde(default)]
    pub image_mode: ImageMode,
    #[serde(default)]
    pub geometry: GeometryConfig,
    /// Normalisation of the ViT input (tiles and global view).
    #[serde(default = "Normalization::clip")]
    pub vit_norm: Normalization,
    /// Normalisation of the ConvNeXt (high-resolution) input.
    #[serde(default = "Normalization::clip")]
    pub hires_norm: Normalization,
    /// Fill of the stage-1 square padding; default LLaVA's `int(255 * vit_norm.mean)`.
    #[serde(default)]
    pub square_pad_color: Option<[u8; 3]>,
    /// Fill around the resized image on a stage-2 canvas; LLaVA-NeXT pads with black.
    #[serde(default)]
    pub canvas_pad_color: [u8; 3],
    /// Images with more pixels are bad records (PIL's decompression-bomb threshold by default).
    #[serde(default = "default_max_image_pixels")]
    pub max_image_pixels: u64,
    /// Longest token sequence; longer samples are truncated, never through visual tokens.
    #[serde(default = "default_max_len")]
    pub max_len: usize,
    /// Text marking where an image's visual tokens go.
    #[serde(default = "default_image_marker")]
    pub image_marker: String,
    /// Id written at every visual-token position. Default: the tokenizer's id for `image_marker`.
    #[serde(default)]
    pub image_token_id: Option<i64>,
    /// Id used to right-pad `input_ids` (masked by the attention mask and labels).
    #[serde(default)]
    pub pad_token_id: i64,
    /// Begin-of-sequence token put first by both templates; "" for none.
    #[serde(default = "default_bos")]
    pub bos_token: String,
    /// Token closing the caption in the `plain` template.
    #[serde(default = "default_plain_end")]
    pub plain_end_token: String,
    /// Optional system prompt of the `llama3` template (not supervised).
    #[serde(default)]
    pub system_prompt: Option<String>,
    #[serde(default)]
    pub on_bad_record: OnBadRecord,
    /// Bad-record examples kept per reason.
    #[serde(default = "default_bad_examples")]
    pub bad_examples: usize,
    #[serde(default)]
    pub loader: LoaderConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// LLaVA JSON list (`.json`) or one record per line (`.jsonl`).
    pub path: PathBuf,
    /// Folder the records' `image` paths are relative to; they may not leave it.
    pub image_folder: PathBuf,
    /// Keep only the first N records.
    #[serde(default)]
    pub first: Option<usize>,
    /// Keep N records drawn at random (seeded by `seed`), in file order.
    #[serde(default)]
    pub random: Option<usize>,
    /// Keep this percentage of records drawn at random (seeded by `seed`), in file order.
    #[serde(default)]
    pub percent: Option<f64>,
    #[serde(default)]
    pub seed: u64,
}

/// How many records of a source are used.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampling {
    All,
    First(usize),
    Random { count: usize, seed: u64 },
    Percent { percent: f64, seed: u64 },
}

impl SourceConfig {
    pub fn sampling(&self) -> std::result::Result<Sampling, String> {
        match (self.first, self.random, self.percent) {
            (None, None, None) => Ok(Sampling::All),
            (Some(n), None, None) => Ok(Sampling::First(n)),
            (None, Some(n), None) => Ok(Sampling::Random { count: n, seed: self.seed }),
            (None, None, Some(p)) if (0.0..=100.0).contains(&p) => Ok(Sampling::Percent { percent: p, seed: self.seed }),
            (None, None, Some(p)) => Err(format!("percent = {p} is outside 0..=100")),
            _ => Err("set at most one of `first`, `random`, `percent`".into()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TemplateKind {
    /// Stage 1: visual tokens, caption, end token; loss on caption and end token.
    #[default]
    Plain,
    /// Stage 2: Llama-3 chat; loss on assistant content and its `<|eot_id|>`.
    Llama3,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageMode {
    #[default]
    Square,
    Tiled,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnBadRecord {
    #[default]
    Skip,
    Error,
}

/// Image geometry in pixels and tiles; the real model's values are the defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GeometryConfig {
    /// Side of a ViT tile (and of the global view).
    pub tile_size: u32,
    pub patch_size: u32,
    /// ConvNeXt pixels per ViT pixel as [numerator, denominator]: its stride-32 map then lands on
    /// the ViT's patch-14 grid.
    pub hires_factor: [u32; 2],
    /// Stage-1 ViT input side.
    pub square_vit_size: u32,
    /// Stage-1 ConvNeXt input side.
    pub square_hires_size: u32,
    /// Stage-2 canvases as [columns, rows] in tiles (w × h).
    pub canvases: Vec<[u32; 2]>,
}

impl Default for GeometryConfig {
    /// CLIP ViT-L/14-336 tiles and the ConvNeXt at 32/14 of their size (LLaVA-NeXT's canvases).
    fn default() -> Self {
        Self {
            tile_size: 336,
            patch_size: 14,
            hires_factor: [32, 14],
            square_vit_size: 336,
            square_hires_size: 768,
            canvases: vec![[1, 2], [2, 1], [2, 2], [3, 1], [1, 3]],
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Normalization {
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Normalization {
    pub fn clip() -> Self {
        Self { mean: CLIP_MEAN, std: CLIP_STD }
    }
    pub fn imagenet() -> Self {
        Self { mean: IMAGENET_MEAN, std: IMAGENET_STD }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoaderConfig {
    /// Samples per batch on each rank.
    pub batch_size: usize,
    /// Seed of the per-epoch permutation.
    pub seed: u64,
    pub shuffle: bool,
    /// Preprocessing threads; 0 = all cores.
    pub workers: usize,
    /// Batches prepared ahead of the training step.
    pub prefetch_batches: usize,
    /// Drop an epoch's last, smaller batch.
    pub drop_last: bool,
    /// Cut each epoch to a multiple of the world size so every rank sees as many records.
    pub even_shards: bool,
    /// Sequence-length buckets: a batch is right-padded to the smallest bucket that holds its
    /// longest sample (or to that sample's length when none does), so a GPU sees a few sequence
    /// shapes instead of one per batch. Empty: pad to the longest sample.
    pub seq_len_buckets: Vec<usize>,
}

impl LoaderConfig {
    /// The padded length of a batch whose longest sample has `longest` tokens.
    pub fn padded_len(&self, longest: usize) -> usize {
        self.seq_len_buckets.iter().copied().filter(|&b| b >= longest).min().unwrap_or(longest)
    }
}

impl Default for LoaderConfig {
    fn default() -> Self {
        Self { batch_size: 8, seed: 0, shuffle: true, workers: 0, prefetch_batches: 4, drop_last: false, even_shards: true, seq_len_buckets: Vec::new() }
    }
}

fn default_max_image_pixels() -> u64 {
    89_478_485
}
fn default_max_len() -> usize {
    2048
}
fn default_image_marker() -> String {
    "<image>".into()
}
fn default_bos() -> String {
    "<|begin_of_text|>".into()
}
fn default_plain_end() -> String {
    "<|end_of_text|>".into()
}
fn default_bad_examples() -> usize {
    5
}

impl DataConfig {
    /// Reads the `[data]` table of a TOML file, ignoring its other tables. Relative paths in it are
    /// resolved against the file's folder.
    pub fn from_toml_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
        let mut cfg = Self::from_toml_str(&text, path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        cfg.resolve_paths(base);
        Ok(cfg)
    }

    /// Parses the `[data]` table of TOML text; `file` only names the source in errors.
    pub fn from_toml_str(text: &str, file: &Path) -> Result<Self> {
        let config_error = |message: String, hint: &str| DataError::Config { file: file.to_path_buf(), message, hint: hint.into() };
        let mut doc: toml::Table = toml::from_str(text).map_err(|e| config_error(e.to_string(), "fix the TOML syntax at the position shown"))?;
        let data = doc.remove("data").ok_or_else(|| config_error("no [data] table".into(), "add a [data] section"))?;
        let cfg: DataConfig = data
            .try_into()
            .map_err(|e: toml::de::Error| config_error(format!("in [data]: {}", e.message()), "check the key names and types against docs/data.md"))?;
        cfg.validate().map_err(|m| config_error(format!("in [data]: {m}"), "see docs/data.md"))?;
        Ok(cfg)
    }

    /// Makes the tokenizer and source paths absolute, relative to `base` (the config's folder).
    pub fn resolve_paths(&mut self, base: &Path) {
        let join = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        join(&mut self.tokenizer);
        for s in &mut self.sources {
            join(&mut s.path);
            join(&mut s.image_folder);
        }
    }

    /// Checks values serde cannot: geometry divisibility, sampling rules, non-empty lists.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.sources.is_empty() {
            return Err("`sources` is empty: add at least one [[data.sources]]".into());
        }
        for (i, s) in self.sources.iter().enumerate() {
            s.sampling().map_err(|m| format!("sources[{i}]: {m}"))?;
        }
        let g = &self.geometry;
        let [num, den] = g.hires_factor;
        if g.patch_size == 0 || num == 0 || den == 0 {
            return Err("geometry: patch_size and hires_factor must be positive".into());
        }
        if g.tile_size == 0 || !g.tile_size.is_multiple_of(g.patch_size) {
            return Err(format!("geometry.tile_size = {} is not a positive multiple of patch_size = {}", g.tile_size, g.patch_size));
        }
        if !(g.tile_size * num).is_multiple_of(den) {
            return Err(format!("geometry.tile_size = {} × {num}/{den} is not an integer", g.tile_size));
        }
        if !g.square_vit_size.is_multiple_of(g.patch_size) || g.square_vit_size as u64 * num as u64 != g.square_hires_size as u64 * den as u64 {
            return Err(format!(
                "geometry: square_hires_size = {} must equal square_vit_size = {} × {num}/{den}, \
                 and square_vit_size must be a multiple of patch_size",
                g.square_hires_size, g.square_vit_size
            ));
        }
        if g.canvases.is_empty() || g.canvases.iter().any(|c| c[0] == 0 || c[1] == 0) {
            return Err("geometry.canvases must be a non-empty list of [columns, rows] ≥ 1".into());
        }
        if self.loader.batch_size == 0 {
            return Err("loader.batch_size must be ≥ 1".into());
        }
        if self.loader.seq_len_buckets.contains(&0) {
            return Err("loader.seq_len_buckets must hold lengths ≥ 1".into());
        }
        if self.max_len == 0 {
            return Err("max_len must be ≥ 1".into());
        }
        if self.image_marker.is_empty() {
            return Err("image_marker must not be empty".into());
        }
        Ok(())
    }

    /// Fill of the stage-1 square padding: LLaVA's `tuple(int(x * 255) for x in image_mean)`.
    pub fn square_fill(&self) -> [u8; 3] {
        self.square_pad_color.unwrap_or_else(|| {
            let m = self.vit_norm.mean;
            [(m[0] * 255.0) as u8, (m[1] * 255.0) as u8, (m[2] * 255.0) as u8]
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read<T: serde::de::DeserializeOwned>(text: &str) -> T {
        toml::Value::Table(toml::from_str(text).unwrap()).try_into().unwrap()
    }

    const MINIMAL: &str = "[data]\ntokenizer = \"t.json\"\n[[data.sources]]\npath = \"a.jsonl\"\nimage_folder = \"img\"\n";

    /// A left-out key or section reads as the `Default` impl, so the file and the code cannot
    /// disagree about a default.
    #[test]
    fn left_out_keys_and_sections_read_as_the_defaults() {
        assert_eq!(read::<GeometryConfig>(""), GeometryConfig::default());
        assert_eq!(read::<LoaderConfig>(""), LoaderConfig::default());
        let minimal = DataConfig::from_toml_str(MINIMAL, Path::new("minimal.toml")).unwrap();
        assert_eq!(minimal.geometry, GeometryConfig::default());
        assert_eq!(minimal.loader, LoaderConfig::default());
        let one_key = format!("{MINIMAL}[data.loader]\nworkers = 3\n[data.geometry]\ncanvases = [[1, 2]]\n");
        let one_key = DataConfig::from_toml_str(&one_key, Path::new("one_key.toml")).unwrap();
        assert_eq!(one_key.loader, LoaderConfig { workers: 3, ..LoaderConfig::default() });
        assert_eq!(one_key.geometry, GeometryConfig { canvases: vec![[1, 2]], ..GeometryConfig::default() });
    }

    /// The values themselves: the real model's geometry and LLaVA's text settings.
    #[test]
    fn the_defaults_are_the_recipe() {
        let c = DataConfig::from_toml_str(MINIMAL, Path::new("minimal.toml")).unwrap();
        let g = &c.geometry;
        assert_eq!((g.tile_size, g.patch_size, g.hires_factor), (336, 14, [32, 14]));
        assert_eq!((g.square_vit_size, g.square_hires_size), (336, 768));
        assert_eq!(g.canvases, vec![[1, 2], [2, 1], [2, 2], [3, 1], [1, 3]]);
        let l = &c.loader;
        assert_eq!((l.batch_size, l.seed, l.shuffle, l.workers), (8, 0, true, 0));
        assert_eq!((l.prefetch_batches, l.drop_last, l.even_shards), (4, false, true));
        assert_eq!((c.template, c.image_mode, c.on_bad_record), (TemplateKind::Plain, ImageMode::Square, OnBadRecord::Skip));
        assert_eq!((c.vit_norm.clone(), c.hires_norm.clone()), (Normalization::clip(), Normalization::clip()));
        assert_eq!((c.max_image_pixels, c.max_len, c.bad_examples), (89_478_485, 2048, 5));
        assert_eq!((c.image_marker.as_str(), c.bos_token.as_str()), ("<image>", "<|begin_of_text|>"));
        assert_eq!(c.plain_end_token, "<|end_of_text|>");
        assert_eq!((c.square_fill(), c.canvas_pad_color, c.pad_token_id), ([122, 116, 104], [0, 0, 0], 0));
    }
}
