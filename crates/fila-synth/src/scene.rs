//! One synthetic image: a light background, 1-5 shapes of one kind and colour, and a short code in
//! the bitmap font. A scene is sampled from a PRNG, then rendered as a pure function of itself.

use image::{Rgb, RgbImage};

use super::font::{self, CODE_ALPHABET, GLYPH_H};
use super::Rng;
use fila_data::TileGrid;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShapeKind {
    Square,
    Circle,
    Triangle,
}

impl ShapeKind {
    pub const ALL: [ShapeKind; 3] = [ShapeKind::Square, ShapeKind::Circle, ShapeKind::Triangle];
    pub fn name(self) -> &'static str {
        match self {
            ShapeKind::Square => "square",
            ShapeKind::Circle => "circle",
            ShapeKind::Triangle => "triangle",
        }
    }
}

/// Named shape colours: saturated, far from the light backgrounds and the dark code ink.
pub const COLOURS: [(&str, [u8; 3]); 6] = [
    ("red", [215, 40, 40]),
    ("green", [30, 160, 70]),
    ("blue", [40, 90, 225]),
    ("yellow", [235, 200, 20]),
    ("purple", [150, 60, 185]),
    ("orange", [245, 130, 25]),
];
const BACKGROUNDS: [[u8; 3]; 4] = [[250, 250, 250], [222, 222, 222], [245, 238, 215], [220, 232, 245]];
/// Code ink: every channel below [`INK_MAX`] even with background noise added.
const INKS: [[u8; 3]; 3] = [[10, 10, 10], [45, 45, 45], [20, 30, 60]];
pub const INK_MAX: u8 = 90;
const MAX_NOISE: u32 = 6;

/// How the code is sized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Code glyphs a few tiles' pixels tall: readable in the tiles, mostly in the global view too.
    Normal,
    /// Code glyphs 7 pixels tall in an image the pipeline shrinks, so the global view gets about
    /// one pixel per glyph and the ConvNeXt view six to eight (see [`FINE_CANVASES`]).
    Fine,
}

impl Layout {
    pub fn name(self) -> &'static str {
        match self {
            Layout::Normal => "normal",
            Layout::Fine => "fine",
        }
    }
}

/// Fine-layout canvases (cols, rows) with the image-to-canvas scale as (num, den). The code's
/// glyph height on the canvas is `7 · num/den`; the global view divides it by `rows`, ConvNeXt
/// multiplies it by 32/14: 1×2 and 2×2 → 2.8 px on the canvas, 1.4 global, 6.4 ConvNeXt;
/// 1×3 → 3.5, 1.17, 8.0. Only canvases with ≥ 2 rows can separate the two views this much.
pub const FINE_CANVASES: [(u32, u32, u32, u32); 3] = [(1, 2, 2, 5), (2, 2, 2, 5), (1, 3, 1, 2)];

#[derive(Debug, Clone, PartialEq)]
pub struct Scene {
    pub width: u32,
    pub height: u32,
    pub layout: Layout,
    pub background: [u8; 3],
    /// Uniform per-pixel luminance noise in ±noise (0 = plain).
    pub noise: u8,
    pub noise_seed: u64,
    pub shape: ShapeKind,
    /// Index into [`COLOURS`].
    pub colour: usize,
    /// Top-left corner and side of each shape's bounding square.
    pub shapes: Vec<(u32, u32, u32)>,
    pub code: String,
    /// Font pixels per glyph pixel: glyphs are `7 · code_scale` image pixels tall.
    pub code_scale: u32,
    pub code_pos: (u32, u32),
    pub ink: [u8; 3],
}

impl Scene {
    pub fn colour_name(&self) -> &'static str {
        COLOURS[self.colour].0
    }
    pub fn count(&self) -> usize {
        self.shapes.len()
    }
    pub fn glyph_px(&self) -> u32 {
        GLYPH_H * self.code_scale
    }
    /// The code's box in image pixels: left, top, width, height.
    pub fn code_box(&self) -> [u32; 4] {
        let (w, h) = font::text_size(&self.code, self.code_scale);
        [self.code_pos.0, self.code_pos.1, w, h]
    }

    /// Samples a scene; `code` is drawn by the caller (which keeps codes unique across splits).
    pub fn sample(rng: &mut Rng, tile: u32, layout: Layout, canvases: &[TileGrid], code: String) -> Self {
        let (width, height, code_scale) = match layout {
            Layout::Normal => {
                // Aim at a random canvas, at 0.7-0.95× its size, with ±5 % aspect jitter: an
                // image larger than its canvas on either side would go to a bigger canvas
                // (LLaVA-NeXT's rule prefers the canvas that keeps the most original pixels),
                // starving 2×1 and 1×2.
                let c = canvases[rng.below(canvases.len())];
                let u = rng.uniform(0.7, 0.95);
                let w = (c.cols as f64 * tile as f64 * u * rng.uniform(0.95, 1.05)).round() as u32;
                let h = (c.rows as f64 * tile as f64 * u * rng.uniform(0.95, 1.05)).round() as u32;
                let min_side = w.min(h) as f64;
                let scale = ((min_side * rng.uniform(0.08, 0.14)) / GLYPH_H as f64).round().max(2.0) as u32;
                let (w, h) = (w.max(16), h.max(16));
                // Small tiles: shrink the code until it fits with its margins (at least scale 1).
                let (unit_w, unit_h) = font::text_size(&code, 1);
                let fits = |k: u32| unit_w * k + 2 * k.max(2) <= w && unit_h * k + 2 * k.max(2) <= h;
                let scale = (1..=scale).rev().find(|&k| fits(k)).unwrap_or(1);
                (w, h, scale)
            }
            Layout::Fine => {
                let (cols, rows, num, den) = FINE_CANVASES[rng.below(FINE_CANVASES.len())];
                (cols * tile * den / num, rows * tile * den / num, 1)
            }
        };
        let background = BACKGROUNDS[rng.below(BACKGROUNDS.len())];
        let noise = if rng.below(2) == 0 { 0 } else { 2 + rng.below(MAX_NOISE as usize - 1) as u8 };
        let noise_seed = rng.next_u64();
        let shape = ShapeKind::ALL[rng.below(3)];
        let colour = rng.below(COLOURS.len());
        let ink = INKS[rng.below(INKS.len())];
        let count = 1 + rng.below(5);

        let (cw, ch) = font::text_size(&code, code_scale);
        let margin = code_scale.max(2);
        let code_pos = (margin + rng.below((width - cw - 2 * margin + 1) as usize) as u32, margin + rng.below((height - ch - 2 * margin + 1) as usize) as u32);
        let code_box = (code_pos.0 - margin, code_pos.1 - margin, cw + 2 * margin, ch + 2 * margin);

        // Rejection sampling of non-overlapping shapes; shrink and retry when the image is full.
        let min_side = width.min(height) as f64;
        let mut side = min_side * rng.uniform(0.14, 0.26);
        let mut attempts = 0;
        let shapes = 'layout: loop {
            attempts += 1;
            assert!(attempts < 60, "cannot place {count} shapes in a {width}x{height} image");
            let s = side.round().max(6.0) as u32;
            let gap = (s / 6).max(2);
            let mut boxes = vec![code_box];
            let mut shapes = vec![];
            'shape: for _ in 0..count {
                for _ in 0..200 {
                    if width < s + 2 * gap || height < s + 2 * gap {
                        break;
                    }
                    let x = gap + rng.below((width - s - 2 * gap + 1) as usize) as u32;
                    let y = gap + rng.below((height - s - 2 * gap + 1) as usize) as u32;
                    let candidate = (x - gap, y - gap, s + 2 * gap, s + 2 * gap);
                    if boxes.iter().all(|b| !overlaps(*b, candidate)) {
                        boxes.push(candidate);
                        shapes.push((x, y, s));
                        continue 'shape;
                    }
                }
                side *= 0.85;
                continue 'layout;
            }
            break shapes;
        };
        Scene { width, height, layout, background, noise, noise_seed, shape, colour, shapes, code, code_scale, code_pos, ink }
    }

    pub fn render(&self) -> RgbImage {
        let mut img = RgbImage::from_pixel(self.width, self.height, Rgb(self.background));
        let fill = Rgb(COLOURS[self.colour].1);
        for &(x, y, s) in &self.shapes {
            let sf = s as f64;
            for py in y..y + s {
                for px in x..x + s {
                    // Pixel centres relative to the bounding square.
                    let (u, v) = (px as f64 + 0.5 - x as f64, py as f64 + 0.5 - y as f64);
                    let inside = match self.shape {
                        ShapeKind::Square => true,
                        ShapeKind::Circle => {
                            let r = sf / 2.0;
                            (u - r).powi(2) + (v - r).powi(2) <= r * r
                        }
                        // Apex at the top centre, base along the bottom.
                        ShapeKind::Triangle => (u - sf / 2.0).abs() <= v / 2.0,
                    };
                    if inside {
                        img.put_pixel(px, py, fill);
                    }
                }
            }
        }
        font::draw_text(&mut img, &self.code, self.code_pos.0, self.code_pos.1, self.code_scale, self.ink);
        if self.noise > 0 {
            let mut rng = Rng::new(self.noise_seed);
            let span = 2 * self.noise as u64 + 1;
            let mut bits = 0u64;
            for (i, p) in img.pixels_mut().enumerate() {
                // One 64-bit draw per 8 pixels; the modulo bias of a byte over ≤ 13 values is harmless.
                if i % 8 == 0 {
                    bits = rng.next_u64();
                }
                let d = ((bits >> (8 * (i % 8))) & 0xFF) as i16 % span as i16 - self.noise as i16;
                for c in p.0.iter_mut() {
                    *c = (*c as i16 + d).clamp(0, 255) as u8;
                }
            }
        }
        img
    }
}

/// Draws a code of 3 or 4 characters.
pub fn sample_code(rng: &mut Rng) -> String {
    let len = 3 + rng.below(2);
    (0..len).map(|_| CODE_ALPHABET[rng.below(CODE_ALPHABET.len())] as char).collect()
}

fn overlaps(a: (u32, u32, u32, u32), b: (u32, u32, u32, u32)) -> bool {
    a.0 < b.0 + b.2 && b.0 < a.0 + a.2 && a.1 < b.1 + b.3 && b.1 < a.1 + a.3
}
