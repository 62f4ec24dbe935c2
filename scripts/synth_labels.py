"""Labels of the built-in synthetic dataset, shared by the Python tools that read it.

Stage-1 captions name each image's count, colour and shape ("3 red circles and the code K7QZ.");
the names and their order follow `crates/fila-data/src/synth/scene.rs`.
"""

import re

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
SHAPES = ["square", "circle", "triangle"]


def labels_of(caption):
    """(colour, shape, count - 1) from a stage-1 caption such as "3 red circles and the code K7QZ."."""
    m = re.search(r"\b([1-5]) (" + "|".join(COLOURS) + r") (" + "|".join(SHAPES) + r")", caption)
    if not m:
        raise ValueError(f"caption without count, colour and shape: {caption!r}")
    return COLOURS.index(m.group(2)), SHAPES.index(m.group(3)), int(m.group(1)) - 1
