//! Tiling geometry: canvas choice, tile grid, padded placement, visual-token counts.
//! Pure integer/float arithmetic, no pixels.

use crate::config::GeometryConfig;

/// A stage-2 canvas: `cols × rows` tiles of `tile` pixels (width = cols·tile).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TileGrid {
    pub cols: u32,
    pub rows: u32,
}

impl TileGrid {
    pub fn tiles(&self) -> u32 {
        self.cols * self.rows
    }
}

/// Where a resized image sits inside a padded canvas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    /// Canvas size (w, h).
    pub canvas: (u32, u32),
    /// Resized image size (w, h).
    pub content: (u32, u32),
    /// Top-left corner of the resized image.
    pub offset: (u32, u32),
}

/// Geometry derived from the config, with the 32/14 ViT-ConvNeXt alignment checked once.
#[derive(Debug, Clone, PartialEq)]
pub struct Geometry {
    pub tile: u32,
    pub patch: u32,
    /// ViT cells per tile side (`tile / patch`).
    pub grid: u32,
    /// ConvNeXt pixels per tile side (`grid · 32` for the real model).
    pub hires_tile: u32,
    pub square_vit: u32,
    pub square_hires: u32,
    pub canvases: Vec<TileGrid>,
}

impl Geometry {
    /// Panics if the config breaks the ViT/ConvNeXt alignment; `DataConfig::validate` reports
    /// the same conditions as errors first.
    pub fn new(cfg: &GeometryConfig) -> Self {
        let [num, den] = cfg.hires_factor;
        assert!(cfg.tile_size.is_multiple_of(cfg.patch_size), "tile must be a multiple of patch");
        assert!((cfg.tile_size * num).is_multiple_of(den), "tile × factor must be an integer");
        let hires_tile = cfg.tile_size * num / den;
        // The stride-32 ConvNeXt stage must land on the ViT grid: one stage-4 cell per ViT cell.
        let grid = cfg.tile_size / cfg.patch_size;
        assert_eq!(hires_tile % grid, 0, "ConvNeXt side per tile must be a multiple of the ViT grid");
        assert_eq!(cfg.square_vit_size as u64 * num as u64, cfg.square_hires_size as u64 * den as u64);
        Self {
            tile: cfg.tile_size,
            patch: cfg.patch_size,
            grid,
            hires_tile,
            square_vit: cfg.square_vit_size,
            square_hires: cfg.square_hires_size,
            canvases: cfg.canvases.iter().map(|&[cols, rows]| TileGrid { cols, rows }).collect(),
        }
    }

    /// Visual tokens of one ViT view (`grid²`, 576 for the real model).
    pub fn tokens_per_view(&self) -> usize {
        (self.grid * self.grid) as usize
    }

    /// Visual tokens of a stage-1 image.
    pub fn square_tokens(&self) -> usize {
        let g = self.square_vit / self.patch;
        (g * g) as usize
    }

    /// Visual tokens of a stage-2 image on `grid`: global view first, then each tile.
    pub fn tiled_tokens(&self, grid: TileGrid) -> usize {
        (1 + grid.tiles() as usize) * self.tokens_per_view()
    }

    /// Canvas size in ViT pixels (w, h).
    pub fn canvas_pixels(&self, grid: TileGrid) -> (u32, u32) {
        (grid.cols * self.tile, grid.rows * self.tile)
    }

    /// Canvas size in ConvNeXt pixels (w, h): canvas × 32/14.
    pub fn hires_pixels(&self, grid: TileGrid) -> (u32, u32) {
        (grid.cols * self.hires_tile, grid.rows * self.hires_tile)
    }

    /// The canvas for an image of `width × height` by the LLaVA-NeXT rule.
    pub fn select_canvas(&self, width: u32, height: u32) -> TileGrid {
        let sizes: Vec<(u32, u32)> = self.canvases.iter().map(|&g| self.canvas_pixels(g)).collect();
        let best = select_canvas(width, height, &sizes);
        self.canvases[best]
    }
}

/// Index of the canvas (w, h) in `canvases` that LLaVA-NeXT's `select_best_resolution` picks:
/// the largest effective resolution `min(⌊W·s⌋·⌊H·s⌋, W·H)` with `s = min(cw/W, ch/H)`; among
/// equals, the least wasted area `cw·ch − effective`; among full ties, the first in the list.
/// Floats are f64 like Python's, so truncation matches it bit for bit.
pub fn select_canvas(width: u32, height: u32, canvases: &[(u32, u32)]) -> usize {
    assert!(!canvases.is_empty(), "no canvases configured");
    let (w, h) = (width as f64, height as f64);
    let original = width as u64 * height as u64;
    let mut best = 0;
    let mut best_effective = 0u64;
    let mut best_wasted = u64::MAX;
    for (i, &(cw, ch)) in canvases.iter().enumerate() {
        let scale = (cw as f64 / w).min(ch as f64 / h);
        let scaled = (w * scale) as u64 * (h * scale) as u64;
        let effective = scaled.min(original);
        let wasted = (cw as u64 * ch as u64).saturating_sub(effective);
        if effective > best_effective || (effective == best_effective && wasted < best_wasted) {
            best = i;
            best_effective = effective;
            best_wasted = wasted;
        }
    }
    best
}

/// LLaVA-NeXT's `resize_and_pad_image` placement: scale to touch the canvas on the tighter side
/// (the other side rounded up, capped at the canvas) and centre the result.
pub fn fit_and_center(width: u32, height: u32, canvas_w: u32, canvas_h: u32) -> Placement {
    let scale_w = canvas_w as f64 / width as f64;
    let scale_h = canvas_h as f64 / height as f64;
    let (cw, ch) = if scale_w < scale_h {
        let h = ((height as f64 * scale_w).ceil() as u32).clamp(1, canvas_h);
        (canvas_w, h)
    } else {
        let w = ((width as f64 * scale_h).ceil() as u32).clamp(1, canvas_w);
        (w, canvas_h)
    };
    Placement { canvas: (canvas_w, canvas_h), content: (cw, ch), offset: ((canvas_w - cw) / 2, (canvas_h - ch) / 2) }
}

/// LLaVA's `expand2square` placement: the image on a square of its longer side, centred
/// on the shorter axis (offset rounded down).
pub fn square_placement(width: u32, height: u32) -> Placement {
    let side = width.max(height);
    Placement { canvas: (side, side), content: (width, height), offset: ((side - width) / 2, (side - height) / 2) }
}
