//! Image decoding and preprocessing: stage-1 square padding, stage-2 dynamic tiling, and the
//! ConvNeXt input rendered from the original pixels. Output is normalised f32 CHW.
//!
//! Resizing is bicubic (Catmull-Rom, a = −0.5, support widened when downscaling) like PIL's
//! `Image.resize(..., BICUBIC)`, on 8-bit RGB, so the results follow LLaVA's PIL pipeline.

use std::cell::RefCell;
use std::io::Cursor;
use std::path::{Component, Path, PathBuf};

use fast_image_resize as fr;
use image::{ImageReader, RgbImage};

use crate::bad::BadReason;
use crate::config::{DataConfig, ImageMode, Normalization};
use crate::geometry::{fit_and_center, square_placement, Geometry, Placement, TileGrid};

/// A dense f32 tensor in row-major order; the trainer turns it into a Burn tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct PixelTensor {
    pub data: Vec<f32>,
    pub shape: Vec<usize>,
}

impl PixelTensor {
    pub fn zeros(shape: Vec<usize>) -> Self {
        let n = shape.iter().product();
        Self { data: vec![0.0; n], shape }
    }
}

/// What one image becomes.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageViews {
    /// ViT views `[views, 3, t, t]`: stage 1 one view; stage 2 the global view then the tiles
    /// row-major.
    pub views: PixelTensor,
    /// ConvNeXt input `[3, H, W]`.
    pub hires: PixelTensor,
    /// Stage-2 canvas in tiles; `None` in stage 1.
    pub grid: Option<TileGrid>,
    /// Size of the decoded image (w, h).
    pub original_size: (u32, u32),
    /// Visual tokens this image contributes to the sequence.
    pub visual_tokens: usize,
}

impl ImageViews {
    pub fn num_views(&self) -> usize {
        self.views.shape[0]
    }
}

/// A reason to skip an image, with a human-readable detail.
pub type ImageProblem = (BadReason, String);

/// Per-channel lookup table from an 8-bit value to its normalised f32.
#[derive(Debug, Clone)]
struct NormLut([[f32; 256]; 3]);

impl NormLut {
    fn new(norm: &Normalization) -> Self {
        let mut t = [[0f32; 256]; 3];
        for (c, row) in t.iter_mut().enumerate() {
            for (v, out) in row.iter_mut().enumerate() {
                // Same order of operations as numpy's (x / 255 - mean) / std in f32.
                *out = ((v as f32 / 255.0) - norm.mean[c]) / norm.std[c];
            }
        }
        NormLut(t)
    }
}

/// Turns decoded RGB images into the tensors of both towers, following the config's geometry.
#[derive(Debug, Clone)]
pub struct ImagePreprocessor {
    pub geometry: Geometry,
    pub mode: ImageMode,
    vit_lut: NormLut,
    hires_lut: NormLut,
    square_fill: [u8; 3],
    canvas_fill: [u8; 3],
    pub max_pixels: u64,
}

impl ImagePreprocessor {
    pub fn new(cfg: &DataConfig) -> Self {
        Self {
            geometry: Geometry::new(&cfg.geometry),
            mode: cfg.image_mode,
            vit_lut: NormLut::new(&cfg.vit_norm),
            hires_lut: NormLut::new(&cfg.hires_norm),
            square_fill: cfg.square_fill(),
            canvas_fill: cfg.canvas_pad_color,
            max_pixels: cfg.max_image_pixels,
        }
    }

    /// Visual tokens for an image of this size, without touching pixels.
    pub fn visual_tokens_for(&self, width: u32, height: u32) -> usize {
        match self.mode {
            ImageMode::Square => self.geometry.square_tokens(),
            ImageMode::Tiled => self.geometry.tiled_tokens(self.geometry.select_canvas(width, height)),
        }
    }

    /// Reads and decodes an image file, checking the pixel limit before decoding.
    pub fn load(&self, path: &Path) -> Result<RgbImage, ImageProblem> {
        let bytes = std::fs::read(path).map_err(|e| (BadReason::MissingImage, format!("{}: {e}", path.display())))?;
        decode_rgb(&bytes, self.max_pixels).map_err(|(r, d)| (r, format!("{}: {d}", path.display())))
    }

    pub fn process(&self, img: &RgbImage) -> ImageViews {
        match self.mode {
            ImageMode::Square => self.process_square(img),
            ImageMode::Tiled => self.process_tiled(img),
        }
    }

    /// Stage 1: `expand2square` with the mean colour, then one resize per tower.
    pub fn process_square(&self, img: &RgbImage) -> ImageViews {
        let (w, h) = img.dimensions();
        let placement = square_placement(w, h);
        let sv = self.geometry.square_vit;
        let sh = self.geometry.square_hires;
        let (vit, hires) = if w > h {
            // Pad rows are constant: resize the image rows and one fill row instead of the square.
            let fill = self.square_fill;
            (resize_row_padded(img.as_raw(), (w, h), placement.offset.1, fill, sv), resize_row_padded(img.as_raw(), (w, h), placement.offset.1, fill, sh))
        } else {
            let square;
            let sq = if w == h {
                img.as_raw().as_slice()
            } else {
                square = paste_on_canvas(img.as_raw(), placement, self.square_fill);
                square.as_slice()
            };
            let side = placement.canvas.0;
            (resize_rgb(sq, side, side, sv, sv), resize_rgb(sq, side, side, sh, sh))
        };
        let mut views = PixelTensor::zeros(vec![1, 3, sv as usize, sv as usize]);
        normalize_region(&vit, sv, (0, 0, sv, sv), &self.vit_lut, &mut views.data);
        let mut hires_t = PixelTensor::zeros(vec![3, sh as usize, sh as usize]);
        normalize_region(&hires, sh, (0, 0, sh, sh), &self.hires_lut, &mut hires_t.data);
        ImageViews { views, hires: hires_t, grid: None, original_size: (w, h), visual_tokens: self.geometry.square_tokens() }
    }

    /// Stage 2: canvas choice, aspect-preserving resize, centre padding, row-major tiles, the
    /// global view from the padded canvas, and the ConvNeXt canvas from the original pixels.
    pub fn process_tiled(&self, img: &RgbImage) -> ImageViews {
        let geo = &self.geometry;
        let (w, h) = img.dimensions();
        let grid = geo.select_canvas(w, h);
        let (cw, ch) = geo.canvas_pixels(grid);
        let canvas = render_canvas(img, fit_and_center(w, h, cw, ch), self.canvas_fill);

        let t = geo.tile;
        let view_len = 3 * (t * t) as usize;
        let n_views = 1 + grid.tiles() as usize;
        let mut views = PixelTensor::zeros(vec![n_views, 3, t as usize, t as usize]);
        let global = resize_rgb(&canvas, cw, ch, t, t);
        normalize_region(&global, t, (0, 0, t, t), &self.vit_lut, &mut views.data[..view_len]);
        for row in 0..grid.rows {
            for col in 0..grid.cols {
                let k = 1 + (row * grid.cols + col) as usize;
                let out = &mut views.data[k * view_len..(k + 1) * view_len];
                normalize_region(&canvas, cw, (col * t, row * t, t, t), &self.vit_lut, out);
            }
        }

        let (hw, hh) = geo.hires_pixels(grid);
        // Padding is written straight into the tensor: no padded 8-bit canvas at this size.
        let placement = fit_and_center(w, h, hw, hh);
        let (cw, ch) = placement.content;
        let content = resize_rgb(img.as_raw(), w, h, cw, ch);
        let mut hires = PixelTensor::zeros(vec![3, hh as usize, hw as usize]);
        normalize_padded(&content, placement, self.canvas_fill, &self.hires_lut, &mut hires.data);
        ImageViews { views, hires, grid: Some(grid), original_size: (w, h), visual_tokens: geo.tiled_tokens(grid) }
    }
}

/// Decodes JPEG/PNG/WebP/GIF/BMP/TIFF bytes to 8-bit RGB (alpha dropped, like PIL's
/// `convert("RGB")`); an animated GIF gives its first frame, as PIL's `open` does.
pub fn decode_rgb(bytes: &[u8], max_pixels: u64) -> Result<RgbImage, ImageProblem> {
    let corrupt = |e: &dyn std::fmt::Display| (BadReason::CorruptImage, e.to_string());
    let reader = ImageReader::new(Cursor::new(bytes)).with_guessed_format().map_err(|e| corrupt(&e))?;
    if reader.format().is_none() {
        return Err((BadReason::CorruptImage, "unknown image format".into()));
    }
    let (w, h) = reader.into_dimensions().map_err(|e| corrupt(&e))?;
    if w as u64 * h as u64 > max_pixels {
        return Err((BadReason::ImageTooLarge, format!("{w}×{h} = {} pixels > max_image_pixels = {max_pixels}", w as u64 * h as u64)));
    }
    if looks_truncated(bytes) {
        return Err((BadReason::CorruptImage, "truncated JPEG (no end-of-image marker)".into()));
    }
    let mut reader = ImageReader::new(Cursor::new(bytes)).with_guessed_format().map_err(|e| corrupt(&e))?;
    reader.no_limits(); // the pixel limit above is the one that applies
    let img = reader.decode().map_err(|e| corrupt(&e))?;
    Ok(img.into_rgb8())
}

/// The JPEG decoder fills a cut-off file with grey instead of failing, so require an end-of-image
/// marker somewhere. Searching the whole file (not just its tail) keeps JPEGs with appended data
/// (motion photos, trailers) valid; entropy-coded data cannot contain FF D9 thanks to byte stuffing.
fn looks_truncated(bytes: &[u8]) -> bool {
    // From the end: a whole file finds its marker in the last bytes.
    bytes.starts_with(&[0xFF, 0xD8]) && !bytes.windows(2).rev().any(|w| w == [0xFF, 0xD9])
}

/// Resolves a record's image path inside `folder` (already canonical), refusing absolute paths,
/// `..` and symlinks that lead outside it.
pub fn resolve_image_path(folder: &Path, relative: &str) -> Result<PathBuf, ImageProblem> {
    let rel = Path::new(relative);
    for comp in rel.components() {
        match comp {
            Component::Normal(_) | Component::CurDir => {}
            Component::ParentDir => return Err((BadReason::ImagePathEscapes, format!("`{relative}` contains `..`"))),
            Component::RootDir | Component::Prefix(_) => return Err((BadReason::ImagePathEscapes, format!("`{relative}` is absolute"))),
        }
    }
    let joined = folder.join(rel);
    let real = joined.canonicalize().map_err(|e| (BadReason::MissingImage, format!("{}: {e}", joined.display())))?;
    if !real.starts_with(folder) {
        return Err((BadReason::ImagePathEscapes, format!("`{relative}` leads to {} outside {}", real.display(), folder.display())));
    }
    Ok(real)
}

thread_local! {
    // Reused scratch buffers: one resizer per worker thread.
    static RESIZER: RefCell<fr::Resizer> = RefCell::new(fr::Resizer::new());
    // The 8-bit intermediate between the two passes, kept to avoid page-faulting a fresh buffer.
    static SCRATCH: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Bicubic resize of packed RGB8, PIL-style (see module doc). Horizontal pass first, rounded to
/// 8 bits, then vertical: PIL's order. fast_image_resize would run the vertical pass first for u8,
/// and with overshoot clipped in the intermediate that differs by up to ~15 levels at sharp edges.
pub fn resize_rgb(src: &[u8], sw: u32, sh: u32, dw: u32, dh: u32) -> Vec<u8> {
    if (sw, sh) == (dw, dh) {
        return src[..(sw * sh * 3) as usize].to_vec();
    }
    if sw == dw || sh == dh {
        return resize_one_pass(src, sw, sh, dw, dh);
    }
    SCRATCH.with(|scratch| {
        let mut horizontal = scratch.take();
        resize_one_pass_into(src, sw, sh, dw, sh, &mut horizontal);
        let mut out = Vec::new();
        resize_one_pass_into(&horizontal, dw, sh, dw, dh, &mut out);
        scratch.replace(horizontal);
        out
    })
}

/// Bicubic resize of a `side × side` square made of `image` (`w × h`, `w = side`) with `offset_y`
/// fill rows above and the rest below: identical to padding then [`resize_rgb`], because the
/// horizontal pass treats rows independently, but without the padded copy or its horizontal pass.
fn resize_row_padded(image: &[u8], (w, h): (u32, u32), offset_y: u32, fill: [u8; 3], out_side: u32) -> Vec<u8> {
    let side = w;
    let fill_row: Vec<u8> = fill.iter().copied().cycle().take(3 * w as usize).collect();
    let pad_h = resize_one_pass(&fill_row, w, 1, out_side, 1);
    SCRATCH.with(|scratch| {
        let mut rows = scratch.take();
        resize_one_pass_into(image, w, h, out_side, h, &mut rows);
        let row_bytes = 3 * out_side as usize;
        let mut square = Vec::with_capacity(row_bytes * side as usize);
        for _ in 0..offset_y {
            square.extend_from_slice(&pad_h);
        }
        square.extend_from_slice(&rows[..row_bytes * h as usize]);
        for _ in offset_y + h..side {
            square.extend_from_slice(&pad_h);
        }
        scratch.replace(rows);
        resize_one_pass(&square, out_side, side, out_side, out_side)
    })
}

/// One fast_image_resize call; with one side unchanged it runs a single 1-D pass.
fn resize_one_pass(src: &[u8], sw: u32, sh: u32, dw: u32, dh: u32) -> Vec<u8> {
    let mut out = Vec::new();
    resize_one_pass_into(src, sw, sh, dw, dh, &mut out);
    out
}

/// Typed to RGB8: the untyped `Resizer::resize` would instantiate the kernels of every pixel type
/// in this crate (most of its build time).
fn resize_one_pass_into(src: &[u8], sw: u32, sh: u32, dw: u32, dh: u32, out: &mut Vec<u8>) {
    type Rgb8 = fr::pixels::U8x3;
    let src_img = fr::images::TypedImageRef::<Rgb8>::from_buffer(sw, sh, src).expect("source buffer holds sw×sh RGB pixels");
    out.resize((dw * dh * 3) as usize, 0);
    let mut dst = fr::images::TypedImage::<Rgb8>::from_buffer(dw, dh, out).expect("destination buffer holds dw×dh RGB pixels");
    let options = fr::ResizeOptions::new().resize_alg(fr::ResizeAlg::Convolution(fr::FilterType::CatmullRom));
    RESIZER.with(|r| r.borrow_mut().resize_typed(&src_img, &mut dst, &options).expect("resizing RGB8 into RGB8 cannot fail"));
}

/// Resizes `img` to `placement.content` and pastes it on a canvas filled with `fill`.
fn render_canvas(img: &RgbImage, placement: Placement, fill: [u8; 3]) -> Vec<u8> {
    let (w, h) = img.dimensions();
    let (cw, ch) = placement.content;
    let resized = resize_rgb(img.as_raw(), w, h, cw, ch);
    paste_on_canvas(&resized, placement, fill)
}

/// A canvas of `placement.canvas` filled with `fill`, with `content` (of `placement.content`
/// size) copied at `placement.offset`.
fn paste_on_canvas(content: &[u8], placement: Placement, fill: [u8; 3]) -> Vec<u8> {
    pad_to_canvas(content, placement.content, placement.canvas, placement.offset, fill)
}

/// Packed RGB8 `content` of size `content_size` on a `canvas` filled with `fill`, at `offset`.
pub fn pad_to_canvas(content: &[u8], content_size: (u32, u32), canvas: (u32, u32), offset: (u32, u32), fill: [u8; 3]) -> Vec<u8> {
    let (cw, ch) = (canvas.0 as usize, canvas.1 as usize);
    let (w, h) = (content_size.0 as usize, content_size.1 as usize);
    let (ox, oy) = (offset.0 as usize, offset.1 as usize);
    let row_bytes = cw * 3;
    // One filled row, then whole-row copies: byte-by-byte filling dominated stage 1 on big images.
    let fill_row: Vec<u8> = fill.iter().copied().cycle().take(row_bytes).collect();
    let mut out = vec![0u8; row_bytes * ch];
    for (y, row) in out.chunks_exact_mut(row_bytes).enumerate() {
        if y < oy || y >= oy + h {
            row.copy_from_slice(&fill_row);
        } else {
            let src = &content[(y - oy) * w * 3..(y - oy + 1) * w * 3];
            row[..ox * 3].copy_from_slice(&fill_row[..ox * 3]);
            row[ox * 3..(ox + w) * 3].copy_from_slice(src);
            row[(ox + w) * 3..].copy_from_slice(&fill_row[(ox + w) * 3..]);
        }
    }
    out
}

/// Writes the region `(x, y, w, h)` of a packed RGB8 image of row width `stride_w` into `out` as
/// normalised CHW f32 (`out.len() == 3·w·h`).
fn normalize_region(src: &[u8], stride_w: u32, region: (u32, u32, u32, u32), lut: &NormLut, out: &mut [f32]) {
    let (x0, y0, w, h) = region;
    let (w, h) = (w as usize, h as usize);
    let plane = w * h;
    assert_eq!(out.len(), 3 * plane);
    let (r_out, rest) = out.split_at_mut(plane);
    let (g_out, b_out) = rest.split_at_mut(plane);
    let [lr, lg, lb] = &lut.0;
    for y in 0..h {
        let start = ((y0 as usize + y) * stride_w as usize + x0 as usize) * 3;
        let row = &src[start..start + 3 * w];
        let o = y * w;
        for (x, px) in row.chunks_exact(3).enumerate() {
            r_out[o + x] = lr[px[0] as usize];
            g_out[o + x] = lg[px[1] as usize];
            b_out[o + x] = lb[px[2] as usize];
        }
    }
}

/// Normalised CHW f32 of a canvas holding `content` at `placement`, the rest `fill`, without
/// building the 8-bit canvas.
fn normalize_padded(content: &[u8], placement: Placement, fill: [u8; 3], lut: &NormLut, out: &mut [f32]) {
    let (cw, ch) = (placement.canvas.0 as usize, placement.canvas.1 as usize);
    let (w, h) = (placement.content.0 as usize, placement.content.1 as usize);
    let (ox, oy) = (placement.offset.0 as usize, placement.offset.1 as usize);
    let plane = cw * ch;
    assert_eq!(out.len(), 3 * plane);
    for c in 0..3 {
        let fill_value = lut.0[c][fill[c] as usize];
        let out_c = &mut out[c * plane..(c + 1) * plane];
        let table = &lut.0[c];
        for (y, row) in out_c.chunks_exact_mut(cw).enumerate() {
            if y < oy || y >= oy + h {
                row.fill(fill_value);
                continue;
            }
            row[..ox].fill(fill_value);
            row[ox + w..].fill(fill_value);
            let src = &content[(y - oy) * w * 3..(y - oy + 1) * w * 3];
            for (o, px) in row[ox..ox + w].iter_mut().zip(src.chunks_exact(3)) {
                *o = table[px[c] as usize];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noise(w: u32, h: u32) -> Vec<u8> {
        let mut s = 12345u32;
        (0..w * h * 3)
            .map(|_| {
                s = s.wrapping_mul(1_103_515_245).wrapping_add(12345);
                (s >> 16) as u8
            })
            .collect()
    }

    #[test]
    fn row_padded_resize_equals_padding_first() {
        // The stage-1 shortcut must be bit-identical to expand2square followed by the resize.
        for (w, h, out) in [(61, 37, 28), (200, 150, 64), (97, 10, 97), (50, 49, 120)] {
            let img = noise(w, h);
            let p = square_placement(w, h);
            let fill = [122, 116, 104];
            let square = paste_on_canvas(&img, p, fill);
            let want = resize_rgb(&square, w, w, out, out);
            let got = resize_row_padded(&img, (w, h), p.offset.1, fill, out);
            assert_eq!(got, want, "{w}x{h} -> {out}");
        }
    }

    #[test]
    fn normalising_with_virtual_padding_equals_a_padded_canvas() {
        let lut = NormLut::new(&Normalization::clip());
        let (w, h) = (30, 17);
        let content = noise(w, h);
        let p = fit_and_center(w, h, 30, 40);
        assert_eq!((p.content, p.offset), ((30, 17), (0, 11)));
        let canvas = paste_on_canvas(&content, p, [0, 0, 0]);
        let mut want = vec![0f32; 3 * 30 * 40];
        normalize_region(&canvas, 30, (0, 0, 30, 40), &lut, &mut want);
        let mut got = vec![0f32; 3 * 30 * 40];
        normalize_padded(&content, p, [0, 0, 0], &lut, &mut got);
        assert_eq!(got, want);
        // Horizontal padding too.
        let p = Placement { canvas: (40, 17), content: (30, 17), offset: (5, 0) };
        let canvas = paste_on_canvas(&content, p, [9, 200, 3]);
        let mut want = vec![0f32; 3 * 40 * 17];
        normalize_region(&canvas, 40, (0, 0, 40, 17), &lut, &mut want);
        let mut got = vec![0f32; 3 * 40 * 17];
        normalize_padded(&content, p, [9, 200, 3], &lut, &mut got);
        assert_eq!(got, want);
    }
}
