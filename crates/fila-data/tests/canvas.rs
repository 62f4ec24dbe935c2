//! Canvas choice against an independent Python implementation of LLaVA-NeXT's rule
//! (`scripts/fixtures/data_canvas_reference.py`, whose output is pasted below), plus tile and token counts.

use fila_data::geometry::{fit_and_center, square_placement, Geometry, TileGrid};
use fila_data::GeometryConfig;

/// ((image w, h), (canvas w, h)) from `python scripts/fixtures/data_canvas_reference.py`.
/// ((image w, h), (canvas w, h)).
type Case = ((u32, u32), (u32, u32));

const TABLE: &[Case] = &[
    ((336, 336), (336, 672)), // ties on effective: all five; least waste → first listed
    ((100, 100), (336, 672)), // ties on effective: all five
    ((1000, 1000), (672, 672)),
    ((672, 336), (672, 336)),  // ties on effective: [(672, 336), (672, 672), (1008, 336)]
    ((336, 672), (336, 672)),  // ties on effective: [(336, 672), (672, 672), (336, 1008)]
    ((1344, 672), (672, 336)), // ties on effective: [(672, 336), (672, 672), (1008, 336)]
    ((640, 480), (672, 672)),
    ((480, 640), (672, 672)),
    ((1024, 768), (672, 672)),
    ((2000, 1500), (672, 672)),
    ((1920, 1080), (672, 672)),
    ((1080, 1920), (672, 672)),
    ((800, 200), (1008, 336)),
    ((200, 800), (336, 1008)),
    ((1008, 336), (1008, 336)),
    ((336, 1008), (336, 1008)),
    ((3000, 1000), (1008, 336)),
    ((500, 250), (672, 336)), // ties on effective: [(672, 336), (672, 672), (1008, 336)]
    ((250, 500), (336, 672)), // ties on effective: [(336, 672), (672, 672), (336, 1008)]
    ((700, 300), (1008, 336)),
    ((300, 700), (336, 1008)),
    ((1, 1), (336, 672)), // ties on effective: all five
    ((5000, 10), (1008, 336)),
    ((10, 5000), (336, 1008)),
    ((673, 673), (672, 672)),
    ((671, 335), (672, 336)),  // ties on effective: [(672, 336), (672, 672), (1008, 336)]
    ((1200, 600), (672, 336)), // ties on effective: [(672, 336), (672, 672), (1008, 336)]
    ((600, 1200), (336, 672)), // ties on effective: [(336, 672), (672, 672), (336, 1008)]
    ((900, 450), (672, 336)),  // ties on effective: [(672, 336), (672, 672), (1008, 336)]
    ((2016, 672), (1008, 336)),
    ((1500, 700), (1008, 336)),
    ((400, 300), (672, 336)), // ties on effective: [(672, 336), (672, 672), (1008, 336)]
    ((336, 200), (336, 672)), // ties on effective: all five
    ((200, 336), (336, 672)), // ties on effective: all five
    ((1100, 500), (1008, 336)),
    ((333, 999), (336, 1008)),
];

fn real() -> Geometry {
    Geometry::new(&GeometryConfig::default())
}

#[test]
fn canvas_choice_matches_the_llava_next_rule() {
    let geo = real();
    assert!(TABLE.len() >= 20);
    for &((w, h), expected) in TABLE {
        let grid = geo.select_canvas(w, h);
        assert_eq!(geo.canvas_pixels(grid), expected, "image {w}x{h}");
    }
}

#[test]
fn canvas_list_order_breaks_full_ties() {
    // 100x100 ties on effective area everywhere; 672x336 and 336x672 also tie on waste, so the
    // one listed first wins: index 3 here, where the default list picks 336x672.
    let canvases = [(336, 1008), (1008, 336), (672, 672), (672, 336), (336, 672)];
    assert_eq!(fila_data::select_canvas(100, 100, &canvases), 3);
    // 672x336 wins its three-way effective tie on waste regardless of order.
    assert_eq!(canvases[fila_data::select_canvas(1344, 672, &canvases)], (672, 336));
}

#[test]
fn tile_and_visual_token_counts() {
    let geo = real();
    assert_eq!(geo.grid, 24);
    assert_eq!(geo.hires_tile, 768);
    assert_eq!(geo.tokens_per_view(), 576);
    assert_eq!(geo.square_tokens(), 576);
    let cases = [
        (TileGrid { cols: 1, rows: 2 }, 2, 1728, (768, 1536)),
        (TileGrid { cols: 2, rows: 1 }, 2, 1728, (1536, 768)),
        (TileGrid { cols: 2, rows: 2 }, 4, 2880, (1536, 1536)),
        (TileGrid { cols: 3, rows: 1 }, 3, 2304, (2304, 768)),
        (TileGrid { cols: 1, rows: 3 }, 3, 2304, (768, 2304)),
    ];
    for (grid, tiles, tokens, hires) in cases {
        assert_eq!(grid.tiles(), tiles);
        assert_eq!(geo.tiled_tokens(grid), tokens);
        assert_eq!(geo.hires_pixels(grid), hires);
    }
    // Tiny geometry, same shape of numbers: tile 56 → 4×4 grid, ConvNeXt 128 per tile.
    let tiny = Geometry::new(&GeometryConfig { tile_size: 56, square_vit_size: 56, square_hires_size: 128, ..GeometryConfig::default() });
    assert_eq!((tiny.grid, tiny.hires_tile), (4, 128));
    assert_eq!(tiny.tiled_tokens(TileGrid { cols: 2, rows: 2 }), 80);
}

#[test]
fn resize_and_pad_placement() {
    // 1024x768 on 672x672: width-limited, height ceil(768*0.65625) = 504, centred at y = 84.
    let p = fit_and_center(1024, 768, 672, 672);
    assert_eq!((p.content, p.offset), ((672, 504), (0, 84)));
    // 500x250 on 672x336: both scales equal (1.344) → height-limited branch, width 672.
    let p = fit_and_center(500, 250, 672, 336);
    assert_eq!((p.content, p.offset), ((672, 336), (0, 0)));
    // 333x999 on 768x2304: equal scales → height-limited branch, ceil(333 × 2304/999) = 768.
    let p = fit_and_center(333, 999, 768, 2304);
    assert_eq!(p.content, (768, 2304));
    // expand2square puts the odd pixel after the image: (61-37)/2 = 12 above.
    let s = square_placement(61, 37);
    assert_eq!((s.canvas, s.offset), ((61, 61), (0, 12)));
}
