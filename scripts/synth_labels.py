"""Labels of the built-in synthetic dataset, shared by the Python tools that read it.

Stage-1 captions name each image's count, colour, shape and code ("3 red circles and the code
K7QZ."); the names and their order follow `crates/fila-synth/src/scene.rs`, the code
alphabet `crates/fila-synth/src/font.rs`.
"""

import re

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
SHAPES = ["square", "circle", "triangle"]
CODE_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ0123456789"


def labels_of(caption):
    """(colour, shape, count - 1) from a stage-1 caption such as "3 red circles and the code K7QZ."."""
    m = re.search(r"\b([1-5]) (" + "|".join(COLOURS) + r") (" + "|".join(SHAPES) + r")", caption)
    if not m:
        raise ValueError(f"caption without count, colour and shape: {caption!r}")
    return COLOURS.index(m.group(2)), SHAPES.index(m.group(3)), int(m.group(1)) - 1


def code_of(caption):
    """The code named by a stage-1 caption."""
    m = re.search(r"code (?:is )?([A-Z0-9]+)", caption)
    if not m:
        raise ValueError(f"caption without a code: {caption!r}")
    return m.group(1)
