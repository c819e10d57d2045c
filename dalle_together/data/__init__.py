"""Data sets: the built-in procedural ``shapes`` set (later: sharded codes, real data sets)."""

from dalle_together.data.shapes import (
    COLORS,
    HOLDOUT_PAIRS,
    POSITIONS,
    SHAPES,
    SIZES,
    SPLITS,
    Attributes,
    Sample,
    ShapesStream,
    Split,
    all_attributes,
    fixed_eval_set,
    jitter_px,
    object_size_px,
    render,
)

__all__ = [
    "COLORS",
    "HOLDOUT_PAIRS",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "SPLITS",
    "Attributes",
    "Sample",
    "ShapesStream",
    "Split",
    "all_attributes",
    "fixed_eval_set",
    "jitter_px",
    "object_size_px",
    "render",
]
