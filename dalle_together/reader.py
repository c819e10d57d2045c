"""A rule-based reader of ``shapes`` images: which colour, shape, position and size does it show?

Evaluation uses it to score generated images against their captions, so it must read decoded
(blurry, slightly noisy) images as well as clean renders. Rules, in order:

1. Object pixels are those whose brightest channel reaches half of the image's brightest value
   (every palette colour has a channel at 255, so brightness is the max channel); an image whose
   brightest value is below ``MIN_PEAK`` is empty and reads as all None.
2. Of several blobs, the largest 8-connected one is the object.
3. Colour: the median of its pixels after scaling each to full brightness (so dark, blurred edges
   keep their hue), then the nearest palette colour.
4. Size: the longer side of its bounding box against a threshold halfway between the two sizes.
5. Position: the centre of its bounding box, nearest of the five positions (the centroid would be
   pulled down in triangles, whose mass lies low).
6. Shape: a triangle's rows are skewed (most pixels low, a thin apex above), so the skewness of
   its pixels' rows is clearly negative (-0.6 when sharp), while circles and squares are
   symmetric (0); of those, a square fills its bounding box, a circle about pi/4 of it.

The thresholds were chosen by measuring every attribute combination at 32 and 64 px under 3x3 box
blur (once and twice), Gaussian blur, pixel noise, and 2x down-and-up sampling: triangles' skewness
stayed below -0.22 and the others' within +-0.10; circles filled at most 0.84 of their box, squares
at least 0.89 (``tests/test_reader.py`` holds the accuracy this gives).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dalle_together.data.shapes import COLORS, POSITIONS, SIZES, Attributes

MIN_PEAK = 64
"""Brightest channel value (0-255) below which an image counts as empty."""
TRIANGLE_MAX_SKEW = -0.16
"""Largest skewness of the object's pixel rows that still reads as a triangle."""
SQUARE_MIN_FILL = 0.86
"""Smallest share of its bounding box that a non-triangle must fill to read as a square."""

_PALETTE_NAMES = list(COLORS)
_PALETTE = np.array([COLORS[c] for c in _PALETTE_NAMES], dtype=np.float32)  # (8, 3)
_POSITION_NAMES = list(POSITIONS)
_POSITION_XY = np.array([POSITIONS[p] for p in _POSITION_NAMES])  # (5, 2) fractions of the side
_SIZE_THRESHOLD = sum(SIZES.values()) / len(SIZES)
"""Bounding-box side over image side that separates ``small`` (0.2) from ``large`` (0.4)."""


@dataclass(frozen=True)
class Reading:
    """What the reader sees; a field is None where it cannot tell (e.g. an empty image)."""

    color: str | None = None
    shape: str | None = None
    position: str | None = None
    size: str | None = None


def read_image(image: np.ndarray) -> Reading:
    """Read one (H, W, 3) uint8 image."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {image.dtype} of shape {image.shape}")
    pixels = image.astype(np.float32)
    brightness = pixels.max(axis=2)  # (H, W)
    peak = float(brightness.max())
    if peak < MIN_PEAK:
        return Reading()
    blob = _largest_component(brightness >= peak / 2)
    ys, xs = np.nonzero(blob)
    y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
    height, width = y1 - y0 + 1, x1 - x0 + 1
    image_height, image_width = brightness.shape

    color = _nearest_color(pixels[blob])
    size = "large" if max(height / image_height, width / image_width) > _SIZE_THRESHOLD else "small"
    center = np.array([(x0 + x1) / 2 / image_width, (y0 + y1) / 2 / image_height])
    position = _POSITION_NAMES[int(np.argmin(np.sum((_POSITION_XY - center) ** 2, axis=1)))]

    # Skewness of the rows is scale-free and survives blur far better than "share of pixels in
    # the top half", which a blurred small triangle pushes towards 0.5.
    row_offsets = ys - ys.mean()
    variance = float(np.mean(row_offsets**2))
    skew = float(np.mean(row_offsets**3)) / variance**1.5 if variance > 0 else 0.0
    fill = len(ys) / (height * width)
    if skew <= TRIANGLE_MAX_SKEW:
        shape = "triangle"
    elif fill >= SQUARE_MIN_FILL:
        shape = "square"
    else:
        shape = "circle"
    return Reading(color=color, shape=shape, position=position, size=size)


def score(reading: Reading, attrs: Attributes) -> dict[str, bool]:
    """Whether each attribute of ``reading`` matches ``attrs``; a None reading is wrong."""
    return {
        "color": reading.color == attrs.color,
        "shape": reading.shape == attrs.shape,
        "position": reading.position == attrs.position,
        "size": reading.size == attrs.size,
    }


def _nearest_color(rgb: np.ndarray) -> str:
    """Palette name nearest to the median hue of (N, 3) pixels, each scaled to full brightness."""
    full = rgb * (255.0 / np.maximum(rgb.max(axis=1, keepdims=True), 1.0))
    median = np.median(full, axis=0)
    return _PALETTE_NAMES[int(np.argmin(np.sum((_PALETTE - median) ** 2, axis=1)))]


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected region of a boolean (H, W) mask, by flood fill."""
    height, width = mask.shape
    inside = mask.tolist()  # plain lists: much faster than indexing numpy one element at a time
    label = [[0] * width for _ in range(height)]
    best, best_count = 0, 0
    for current, (y0, x0) in enumerate(zip(*np.nonzero(mask), strict=True), start=1):
        if label[y0][x0]:
            continue
        label[y0][x0] = current
        stack, count = [(int(y0), int(x0))], 0
        while stack:
            y, x = stack.pop()
            count += 1
            for ny in range(max(y - 1, 0), min(y + 2, height)):
                for nx in range(max(x - 1, 0), min(x + 2, width)):
                    if inside[ny][nx] and not label[ny][nx]:
                        label[ny][nx] = current
                        stack.append((ny, nx))
        if count > best_count:
            best, best_count = current, count
    return np.array(label) == best
