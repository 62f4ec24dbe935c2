//! fila-synth: FILA's built-in synthetic dataset: images of shapes and short codes in a bitmap
//! font, generated from a seed with no external assets, in LLaVA format, plus its tokenizer. The
//! `fine` split puts codes where only the ConvNeXt resolution can read them. It needs fila-data only
//! for the loader's tiling geometry (so fine codes are checked in the views the loader makes) and
//! its SplitMix64. See `datasets/synth/README.md`.
//!
//! Same options → byte-identical files: every record draws from its own SplitMix64 stream keyed by
//! (seed, split, index), PNGs are encoded with fixed settings, and the tokenizer depends on the
//! templates only.

pub mod error;
mod font;
mod scene;
mod tokenizer;

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::Serialize;

use fila_data::geometry::{fit_and_center, Geometry, TileGrid};
use fila_data::{GeometryConfig, SplitMix64};

pub use error::{Result, SynthError};

pub use font::{draw_text, glyph, text_size, CODE_ALPHABET, GLYPH_GAP, GLYPH_H, GLYPH_W};
pub use scene::{Layout, Scene, ShapeKind, COLOURS, FINE_CANVASES, INK_MAX};
pub use tokenizer::SPECIAL_TOKENS;

/// What a question asks; answers are one word, a number or the code, for exact-match scoring.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum QuestionType {
    Colour,
    Shape,
    Count,
    Code,
}

impl QuestionType {
    pub const ALL: [QuestionType; 4] = [QuestionType::Colour, QuestionType::Shape, QuestionType::Count, QuestionType::Code];

    pub fn as_str(self) -> &'static str {
        match self {
            QuestionType::Colour => "colour",
            QuestionType::Shape => "shape",
            QuestionType::Count => "count",
            QuestionType::Code => "code",
        }
    }

    /// Phrasings; a record uses one at random.
    pub fn templates(self) -> [&'static str; 2] {
        match self {
            QuestionType::Colour => ["What colour are the shapes?", "Which colour do the shapes have?"],
            QuestionType::Shape => ["What shape is shown?", "Which shape do you see?"],
            QuestionType::Count => ["How many shapes are there?", "How many objects are in the image?"],
            QuestionType::Code => ["What is the code?", "What code is written in the image?"],
        }
    }

    /// The canonical answer for `scene`.
    pub fn answer(self, scene: &Scene) -> String {
        match self {
            QuestionType::Colour => scene.colour_name().into(),
            QuestionType::Shape => scene.shape.name().into(),
            QuestionType::Count => scene.count().to_string(),
            QuestionType::Code => scene.code.clone(),
        }
    }
}

impl fmt::Display for QuestionType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Stage-1 caption templates: `{n}` count, `{colour}`, `{shapes}` (plural when n > 1), `{code}`.
pub const CAPTIONS: [&str; 3] = [
    "{n} {colour} {shapes} and the code {code}.",
    "An image with {n} {colour} {shapes}. The code is {code}.",
    "The code {code} next to {n} {colour} {shapes}.",
];

fn caption(template: &str, scene: &Scene) -> String {
    let n = scene.count();
    let shapes = if n == 1 { scene.shape.name().to_string() } else { format!("{}s", scene.shape.name()) };
    template.replace("{n}", &n.to_string()).replace("{colour}", scene.colour_name()).replace("{shapes}", &shapes).replace("{code}", &scene.code)
}

#[derive(Debug, Clone, PartialEq)]
pub struct SynthOptions {
    pub seed: u64,
    /// Caption records (`stage1.jsonl`), normal layout.
    pub stage1: usize,
    /// Multi-turn question-answer records (`stage2_train.jsonl`).
    pub stage2: usize,
    /// One-question records from the stage-2 distribution with other seeds (`heldout.jsonl`).
    pub heldout: usize,
    /// One `code` question each on a fine-layout image (`fine.jsonl`).
    pub fine: usize,
    /// ViT tile side of the configs that will read the data; image sizes scale with it.
    /// A multiple of 14 (patch 14, ConvNeXt factor 32/14), at least 56.
    pub tile_size: u32,
    /// Share of stage-2 and held-out images with the fine layout.
    pub fine_fraction: f64,
}

impl Default for SynthOptions {
    fn default() -> Self {
        Self { seed: 0, stage1: 600, stage2: 600, heldout: 100, fine: 100, tile_size: 112, fine_fraction: 0.25 }
    }
}

/// What one split holds.
#[derive(Debug, Clone, PartialEq)]
pub struct SplitSummary {
    /// `stage1`, `stage2_train`, `heldout` or `fine`; the file is `{name}.jsonl`.
    pub name: &'static str,
    pub records: usize,
    /// Questions per type (assistant turns; none for stage 1).
    pub questions: BTreeMap<QuestionType, usize>,
    pub fine_layout_images: usize,
    /// Images per stage-2 canvas (cols, rows) under the options' tile size.
    pub canvases: BTreeMap<(u32, u32), usize>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SynthSummary {
    pub out_dir: PathBuf,
    pub splits: Vec<SplitSummary>,
    pub images: usize,
    /// Bytes written: images, JSONL files and the tokenizer.
    pub bytes: u64,
    pub tokenizer: PathBuf,
    pub vocab_size: usize,
}

impl SynthSummary {
    pub fn split(&self, name: &str) -> Option<&SplitSummary> {
        self.splits.iter().find(|s| s.name == name)
    }
}

impl fmt::Display for SynthSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "synthetic dataset in {}", self.out_dir.display())?;
        for s in &self.splits {
            write!(f, "  {:<13} {:>5} records", format!("{}.jsonl", s.name), s.records)?;
            for (q, n) in &s.questions {
                write!(f, "  {q} {n}")?;
            }
            if s.fine_layout_images > 0 {
                write!(f, "  (fine layout: {})", s.fine_layout_images)?;
            }
            writeln!(f)?;
            if !s.canvases.is_empty() {
                write!(f, "                canvases:")?;
                for ((c, r), n) in &s.canvases {
                    write!(f, " {c}x{r}: {n}")?;
                }
                writeln!(f)?;
            }
        }
        writeln!(f, "  {} images, {:.1} MB in all", self.images, self.bytes as f64 / 1e6)?;
        writeln!(f, "  tokenizer {} ({} ids)", self.tokenizer.display(), self.vocab_size)
    }
}

/// A SplitMix64 stream with the few draws the generator needs.
pub struct Rng(SplitMix64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(SplitMix64::new(seed))
    }
    /// Independent stream for record `index` of split `tag`.
    fn for_record(seed: u64, tag: u64, index: usize) -> Self {
        let mix = |a: u64, b: u64| SplitMix64::new(a ^ SplitMix64::new(b).next_u64()).next_u64();
        Self::new(mix(mix(seed, tag), index as u64))
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }
    pub fn below(&mut self, n: usize) -> usize {
        self.0.below(n as u64) as usize
    }
    /// Uniform in [lo, hi).
    pub fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * (self.0.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[derive(Serialize)]
struct TurnOut {
    from: &'static str,
    value: String,
}

#[derive(Serialize)]
struct RecordOut {
    id: String,
    image: String,
    conversations: Vec<TurnOut>,
    /// The question type of a one-question record (held-out, fine).
    #[serde(skip_serializing_if = "Option::is_none")]
    qtype: Option<&'static str>,
    /// One type per assistant turn (stage 2).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    qtypes: Vec<&'static str>,
    layout: &'static str,
    /// Code glyph height in image pixels.
    glyph_px: u32,
    /// Where the code is drawn, in image pixels: left, top, width, height. Each character takes a
    /// `5k × 7k` cell followed by a `k`-pixel gap (`k = glyph_px / 7`), so character `i` starts
    /// at `left + 6k·i`.
    code_box: [u32; 4],
}

#[derive(Clone, Copy)]
enum Split {
    Stage1,
    Stage2,
    Heldout,
    Fine,
}

impl Split {
    fn name(self) -> &'static str {
        match self {
            Split::Stage1 => "stage1",
            Split::Stage2 => "stage2_train",
            Split::Heldout => "heldout",
            Split::Fine => "fine",
        }
    }
    fn tag(self) -> u64 {
        self as u64 + 1
    }
}

/// The geometry of configs with this tile size: patch 14, ConvNeXt × 32/14, default canvases.
pub fn geometry_for(tile_size: u32) -> Geometry {
    Geometry::new(&GeometryConfig { tile_size, square_vit_size: tile_size, square_hires_size: tile_size * 32 / 14, ..GeometryConfig::default() })
}

/// Code glyph height in (global view, ConvNeXt view) pixels for a `width × height` image whose
/// glyphs are `glyph_px` tall, under stage-2 tiling with `geo`.
pub fn view_glyph_heights(geo: &Geometry, width: u32, height: u32, glyph_px: u32) -> (TileGrid, f64, f64) {
    let grid = geo.select_canvas(width, height);
    let (cw, ch) = geo.canvas_pixels(grid);
    let placed = fit_and_center(width, height, cw, ch);
    let on_canvas = glyph_px as f64 * placed.content.1 as f64 / height as f64;
    let global = on_canvas * geo.tile as f64 / ch as f64;
    let hires = on_canvas * geo.hires_tile as f64 / geo.tile as f64;
    (grid, global, hires)
}

/// Every text the templates write, for the tokenizer's merges (codes and counts excluded on purpose).
fn template_texts() -> Vec<String> {
    let mut texts: Vec<String> = ["user", "assistant", "system", "\n\n"].map(String::from).to_vec();
    for q in QuestionType::ALL {
        texts.extend(q.templates().map(|t| format!("\n{t}")));
    }
    for (colour, _) in COLOURS {
        texts.push(colour.into());
        for shape in ShapeKind::ALL {
            for t in CAPTIONS {
                for plural in ["", "s"] {
                    texts.push(
                        t.replace("{n}", "1").replace("{colour}", colour).replace("{shapes}", &format!("{}{plural}", shape.name())).replace("{code}", "X"),
                    );
                }
            }
        }
    }
    texts.extend(ShapeKind::ALL.map(|s| s.name().to_string()));
    texts
}

/// The synthetic dataset's tokenizer (the same for every seed and size).
pub fn build_tokenizer() -> Result<tokenizers::Tokenizer> {
    tokenizer::build(&template_texts()).map_err(|e| SynthError::Tokenizer { message: e.to_string() })
}

fn check_options(o: &SynthOptions) -> std::result::Result<(), String> {
    if o.tile_size < 56 || !o.tile_size.is_multiple_of(14) {
        return Err(format!("tile_size = {} must be a multiple of 14 and at least 56", o.tile_size));
    }
    if !(0.0..=1.0).contains(&o.fine_fraction) {
        return Err(format!("fine_fraction = {} is outside 0..=1", o.fine_fraction));
    }
    Ok(())
}

struct Planned {
    scene: Scene,
    image: String,
    record: RecordOut,
}

/// Writes the dataset into `out_dir` (created if needed; existing files of the same names are
/// replaced, others left alone): `images/*.png`, `stage1.jsonl`, `stage2_train.jsonl`,
/// `heldout.jsonl`, `fine.jsonl` and `tokenizer.json`.
pub fn generate(out_dir: &Path, options: &SynthOptions) -> Result<SynthSummary> {
    check_options(options).map_err(|message| SynthError::Options { message })?;
    let geo = geometry_for(options.tile_size);
    std::fs::create_dir_all(out_dir.join("images")).map_err(|e| SynthError::io(out_dir.join("images"), e))?;

    // Scenes are planned in a fixed order so codes can be kept unique across all splits
    // (held-out codes never appear in training); images are then rendered in parallel.
    let mut used_codes = HashSet::new();
    let splits = [(Split::Stage1, options.stage1), (Split::Stage2, options.stage2), (Split::Heldout, options.heldout), (Split::Fine, options.fine)];
    let mut bytes = 0u64;
    let mut summaries = vec![];
    let mut images = 0;
    for (split, count) in splits {
        let mut planned = Vec::with_capacity(count);
        for i in 0..count {
            let mut rng = Rng::for_record(options.seed, split.tag(), i);
            planned.push(plan_record(split, i, &mut rng, options, &geo, &mut used_codes));
        }
        let written: Vec<u64> = planned.par_iter().map(|p| write_png(&out_dir.join("images").join(&p.image), &p.scene)).collect::<Result<_>>()?;
        bytes += written.iter().sum::<u64>();
        images += planned.len();

        let path = out_dir.join(format!("{}.jsonl", split.name()));
        let mut text = String::new();
        let mut summary = SplitSummary { name: split.name(), records: count, questions: BTreeMap::new(), fine_layout_images: 0, canvases: BTreeMap::new() };
        for p in &planned {
            text.push_str(&serde_json::to_string(&p.record).expect("records serialise"));
            text.push('\n');
            for q in p.record.qtype.iter().chain(&p.record.qtypes) {
                let q = QuestionType::ALL.into_iter().find(|t| t.as_str() == *q).expect("known type");
                *summary.questions.entry(q).or_default() += 1;
            }
            summary.fine_layout_images += usize::from(p.scene.layout == Layout::Fine);
            if !matches!(split, Split::Stage1) {
                let g = geo.select_canvas(p.scene.width, p.scene.height);
                *summary.canvases.entry((g.cols, g.rows)).or_default() += 1;
            }
        }
        bytes += text.len() as u64;
        std::fs::write(&path, text).map_err(|e| SynthError::io(&path, e))?;
        summaries.push(summary);
    }

    let tok = build_tokenizer()?;
    let tok_path = out_dir.join("tokenizer.json");
    let json = tok.to_string(true).map_err(|e| SynthError::Encode { path: tok_path.clone(), message: e.to_string() })?;
    bytes += json.len() as u64;
    std::fs::write(&tok_path, json).map_err(|e| SynthError::io(&tok_path, e))?;
    Ok(SynthSummary { out_dir: out_dir.to_path_buf(), splits: summaries, images, bytes, tokenizer: tok_path, vocab_size: tok.get_vocab_size(true) })
}

fn plan_record(split: Split, index: usize, rng: &mut Rng, options: &SynthOptions, geo: &Geometry, used_codes: &mut HashSet<String>) -> Planned {
    let layout = match split {
        Split::Stage1 => Layout::Normal,
        Split::Fine => Layout::Fine,
        Split::Stage2 | Split::Heldout if rng.uniform(0.0, 1.0) < options.fine_fraction => Layout::Fine,
        Split::Stage2 | Split::Heldout => Layout::Normal,
    };
    let code = loop {
        let c = scene::sample_code(rng);
        if used_codes.insert(c.clone()) {
            break c;
        }
    };
    let scene = Scene::sample(rng, geo.tile, layout, &geo.canvases, code);
    if layout == Layout::Fine {
        let (grid, global, hires) = view_glyph_heights(geo, scene.width, scene.height, scene.glyph_px());
        assert!(
            global < 1.5 && hires >= 5.0,
            "fine layout {}x{} on canvas {grid:?}: glyphs {global:.2} px global, {hires:.2} px ConvNeXt",
            scene.width,
            scene.height
        );
    }
    let id = format!("{}-{index:06}", split.name());
    let image = format!("{id}.png");
    let human = |text: String| TurnOut { from: "human", value: text };
    let gpt = |text: String| TurnOut { from: "gpt", value: text };
    let mut record = RecordOut {
        id,
        image: format!("images/{image}"),
        conversations: vec![],
        qtype: None,
        qtypes: vec![],
        layout: layout.name(),
        glyph_px: scene.glyph_px(),
        code_box: scene.code_box(),
    };
    let ask = |q: QuestionType, rng: &mut Rng| q.templates()[rng.below(2)].to_string();
    match split {
        Split::Stage1 => {
            let c = caption(CAPTIONS[rng.below(CAPTIONS.len())], &scene);
            record.conversations = vec![human("<image>".into()), gpt(c)];
        }
        Split::Stage2 => {
            // 2-4 distinct question types in random order; fine-layout images always ask the code.
            let mut types = QuestionType::ALL;
            for i in (1..types.len()).rev() {
                types.swap(i, rng.below(i + 1));
            }
            let turns = 2 + rng.below(3);
            if layout == Layout::Fine && !types[..turns].contains(&QuestionType::Code) {
                let at = types.iter().position(|&t| t == QuestionType::Code).expect("all types");
                types.swap(turns - 1, at);
            }
            for (t, &q) in types[..turns].iter().enumerate() {
                let text = ask(q, rng);
                record.conversations.push(human(if t == 0 { format!("<image>\n{text}") } else { text }));
                record.conversations.push(gpt(q.answer(&scene)));
                record.qtypes.push(q.as_str());
            }
        }
        Split::Heldout | Split::Fine => {
            // Held-out types cycle, so each has exactly a quarter of the records.
            let q = if matches!(split, Split::Fine) { QuestionType::Code } else { QuestionType::ALL[index % 4] };
            record.id = format!("{}-{}", record.id, q.as_str());
            record.conversations = vec![human(format!("<image>\n{}", ask(q, rng))), gpt(q.answer(&scene))];
            record.qtype = Some(q.as_str());
        }
    }
    Planned { scene, image, record }
}

fn write_png(path: &Path, scene: &Scene) -> Result<u64> {
    use image::codecs::png::{CompressionType, FilterType, PngEncoder};
    use image::ImageEncoder;
    let img = scene.render();
    let mut buf = Vec::new();
    PngEncoder::new_with_quality(&mut buf, CompressionType::Default, FilterType::Adaptive)
        .write_image(img.as_raw(), img.width(), img.height(), image::ExtendedColorType::Rgb8)
        .map_err(|e| SynthError::Encode { path: path.to_path_buf(), message: e.to_string() })?;
    let mut f = std::fs::File::create(path).map_err(|e| SynthError::io(path, e))?;
    f.write_all(&buf).map_err(|e| SynthError::io(path, e))?;
    Ok(buf.len() as u64)
}
