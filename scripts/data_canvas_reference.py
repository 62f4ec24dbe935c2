#!/usr/bin/env python3
"""Independent reference for fila-data's canvas choice (LLaVA-NeXT `select_best_resolution` rule).

Written from the rule's statement, not copied: maximise the effective resolution
min(int(W*s)*int(H*s), W*H) with s = min(cw/W, ch/H); on equal effective resolution keep the canvas
with the least wasted area cw*ch - effective; a full tie keeps the earlier canvas in the list.
Prints the Rust table pasted into crates/fila-data/tests/canvas.rs.

    python scripts/data_canvas_reference.py
"""

CANVASES = [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)]  # (w, h)

SIZES = [
    (336, 336), (100, 100), (1000, 1000), (672, 336), (336, 672), (1344, 672), (640, 480),
    (480, 640), (1024, 768), (2000, 1500), (1920, 1080), (1080, 1920), (800, 200), (200, 800),
    (1008, 336), (336, 1008), (3000, 1000), (500, 250), (250, 500), (700, 300), (300, 700),
    (1, 1), (5000, 10), (10, 5000), (673, 673), (671, 335), (1200, 600), (600, 1200), (900, 450),
    (2016, 672), (1500, 700), (400, 300), (336, 200), (200, 336), (1100, 500), (333, 999),
]


def choose(w: int, h: int) -> tuple[int, int, int, int]:
    best = None
    best_eff, best_waste = -1, None
    for cw, ch in CANVASES:
        s = min(cw / w, ch / h)
        eff = min(int(w * s) * int(h * s), w * h)
        waste = cw * ch - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (cw, ch), eff, waste
    return best[0], best[1], best_eff, best_waste


if __name__ == "__main__":
    for w, h in SIZES:
        cw, ch, eff, waste = choose(w, h)
        ties = [c for c in CANVASES if (lambda s: min(int(w * s) * int(h * s), w * h))(min(c[0] / w, c[1] / h)) == eff]
        note = f"  // ties on effective: {ties}" if len(ties) > 1 else ""
        print(f"    (({w}, {h}), ({cw}, {ch})),{note}")
